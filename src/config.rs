//! The daemon's configuration: a TOML file becomes one validated [`Config`], or a [`ConfigError`] that names
//! the file and line. Nothing past [`Config::load`] re-checks what is validated here; a reload builds a whole
//! new `Config` and swaps it in, or keeps the old one.

use std::fmt;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::auth::Senders;
use crate::auth::net::{Cidr, Trusted};
use crate::auth::profile::{self, RawSender};
use crate::event::Source;
use crate::routes::{self, Routes, RoutesError};
use crate::units::{Bytes, Quantity, Range, parse_duration, parse_size};

/// Where the daemon reads its configuration when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/hookrunner/hookrunner.toml";
/// Where the daemon listens when neither the file nor `--listen` says.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Where the daemon reads its routes when there is no configuration file to find them beside.
pub const DEFAULT_ROUTES: &str = "/etc/hookrunner/routes";
/// The routes file's name beside a configuration file that has no `routes` key.
const ROUTES_BESIDE: &str = "routes";

/// A validated configuration. Every field is documented once, here, with its default and its range;
/// README.md repeats the same text, and a test checks that it names the same ranges.
#[derive(Debug)]
pub struct Config {
    /// `listen`: where to accept connections: `HOST:PORT` (default `127.0.0.1:8080`; port 0 to 65535, 0
    /// picks a free one) or `unix:/path` (an absolute path of at most 107 bytes, what a socket address
    /// holds).
    pub listen: Listen,
    /// `routes`: the routing file, which must exist. Without the key: the file `routes` beside the
    /// configuration file (so `/etc/hookrunner/routes` for `/etc/hookrunner/hookrunner.toml`), or
    /// `/etc/hookrunner/routes` when there is no configuration file; where that file does not exist, the
    /// embedded routing table `* {event}`.
    pub routes: Routes,
    /// `scripts_dir`: the existing directory where scripts named in the routes live (default
    /// `/etc/hookrunner.d`).
    pub scripts_dir: PathBuf,
    /// `payload_dir`: the private (0700) directory for payload files (default `$RUNTIME_DIRECTORY`, else
    /// `$TMPDIR/hookrunner-<uid>`). Stale files in it are removed at start and one daemon owns it at a time,
    /// so it must not hold the configuration, the routes or the scripts.
    pub payload_dir: PathBuf,
    /// `timeout`: how long a script may run before its process group gets SIGTERM (default `30s`, range
    /// 100ms to 24h, [`routes::TIMEOUT`]); a route's `timeout=` option overrides it within the same range.
    pub timeout: Duration,
    /// `kill_grace`: how long after SIGTERM the group gets SIGKILL (default `5s`, range 0s to 1h,
    /// [`KILL_GRACE`]; 0s sends SIGKILL right after SIGTERM).
    pub kill_grace: Duration,
    /// `max_running`: how many scripts may run at once (default 32, range 1 to 4096, [`MAX_RUNNING`]).
    pub max_running: usize,
    /// `queue_wait`: how long a request may wait for a free script slot before it is answered 503 with
    /// `Retry-After` (default `2s`, range 0s to 1h, [`QUEUE_WAIT`]; 0s answers 503 at once when no slot is
    /// free).
    pub queue_wait: Duration,
    /// `max_connections`: how many client connections may be open at once; past that a connection is
    /// answered 503 with `Retry-After` and closed (default 256, range 1 to 16384, [`MAX_CONNECTIONS`]). Each
    /// open connection holds one worker thread with a 512 KiB stack: 16384 of them reserve 8 GiB of address
    /// space and stay within the kernel's default limit of memory maps.
    pub max_connections: usize,
    /// `max_body`: the largest request body accepted; larger ones are answered 413 (default `10MiB`, range
    /// 0 to 64GiB, [`MAX_BODY`]; 0 accepts only requests without a body).
    pub max_body: u64,
    /// `max_header_bytes`: the largest request head (request line and headers) accepted; larger ones are
    /// answered 431 (default `16KiB`, range 1KiB to 1MiB, [`MAX_HEADER_BYTES`]). Each connection holds a
    /// buffer of this size (8 KiB at least).
    pub max_header_bytes: usize,
    /// `header_timeout`: how long a client has to send a whole request head, and the grace before the
    /// minimum body pace (4 KiB/s) applies (default `10s`, range 100ms to 1h, [`HEADER_TIMEOUT`]).
    pub header_timeout: Duration,
    /// `keepalive_timeout`: how long an idle keep-alive connection stays open (default `5s`, range 100ms to
    /// 1h, [`KEEPALIVE_TIMEOUT`]).
    pub keepalive_timeout: Duration,
    /// `event`: where to look for the event name, in order; the first source that yields a name wins. Each
    /// entry is `path`, `header:NAME`, `gitlab`, `json:/pointer`, `xml:/path`, `form:FIELD` or `query:FIELD`;
    /// 1 to 64 entries ([`EVENT_SOURCES`]: an empty list would refuse every request). Default: see
    /// [`crate::event::default_sources`].
    pub event: Vec<Source>,
    /// `[[sender]]`: the sender profiles (README, "Sender authentication"). With none, every request is
    /// accepted, and only on a loopback address or a unix socket unless `allow_unauthenticated`.
    pub senders: Senders,
    /// `allow_unauthenticated`: serve without any sender, or with a `none` sender without `allow_ips`, on a
    /// non-loopback address (default false).
    pub allow_unauthenticated: bool,
    /// `trusted_proxies`: the peers whose `X-Forwarded-For` is believed, as addresses or blocks
    /// (`127.0.0.1/32`), and `unix` for a reverse proxy on the unix socket (default: none).
    pub trusted_proxies: Trusted,
    /// The durable store and the async path (README, "Async delivery").
    pub store: StoreSettings,
    /// What loading noticed that is not an error (a secret file others can read): `check` prints these,
    /// `serve` logs them.
    pub warnings: Vec<String>,
    /// `metrics_listen`: a loopback `HOST:PORT` (`127.0.0.1:9464`) where `GET /metrics` answers in the
    /// Prometheus (OpenMetrics) text format (default: none, no metrics). Loopback only, because the figures
    /// name senders and scripts; a remote Prometheus reaches it through a proxy or its own agent. Takes
    /// effect at start.
    pub metrics_listen: Option<SocketAddr>,
    /// `log_file`: append log lines to this file instead of stderr (default: stderr, i.e. the journal under
    /// systemd). Reopened on every SIGHUP, so logrotate can rename it and then reload.
    pub log_file: Option<PathBuf>,
    /// `[tls]`: serve HTTPS on the TCP listener; its keys are documented in [`crate::tls::Tls`].
    pub tls: Option<crate::tls::Tls>,
    /// The file this was read from; none for the built-in defaults.
    pub source: Option<PathBuf>,
}

/// The store's keys, top-level in the file like every other key.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// `state_dir`: the directory of the store's database, created 0700 if missing (default
    /// `$STATE_DIRECTORY` under systemd, its first entry if it lists several; else `/var/lib/hookrunner`
    /// for root and `$XDG_STATE_HOME/hookrunner` or `~/.local/state/hookrunner` for anyone else). It must
    /// not be `payload_dir`, whose files are removed at start.
    pub state_dir: PathBuf,
    /// `async`: whether routes without an `async` or `sync` option are async (default false).
    pub run_async: bool,
    /// `history`: whether sync deliveries leave a row in the store (default true; async ones always do).
    pub history: bool,
    /// `max_queued`: entries waiting to run at most; past it an async delivery is answered 503 (default
    /// 100000, range 1 to 10000000, [`MAX_QUEUED`]).
    pub max_queued: u64,
    /// `max_queued_bytes`: payload bytes waiting to run at most; past it an async delivery is answered 503
    /// (default `1GiB`, range 1KiB to 1024GiB, [`MAX_QUEUED_BYTES`]).
    pub max_queued_bytes: u64,
    /// `dedupe_window`: how long a delivery id is remembered, so a sender's repeat is answered as the first
    /// was and not run again (default `24h`, range 0s to 720h, [`DEDUPE_WINDOW`]; 0s remembers none).
    pub dedupe_window: Duration,
    /// `keep_payloads`: how long the body of a finished delivery is kept for `deliveries show --payload`
    /// and `retry` (default `168h`, 7 days; range 0s to 8760h, [`KEEP_PAYLOADS`]).
    pub keep_payloads: Duration,
    /// `keep_history`: how long a finished delivery's row is kept (default `720h`, 30 days; range 1h to
    /// 8760h, [`KEEP_HISTORY`]).
    pub keep_history: Duration,
    /// `max_store_bytes`: the store's size above which the oldest finished rows are removed, never an
    /// entry still waiting (default `1GiB`, range 1MiB to 1024GiB, [`MAX_STORE_BYTES`]).
    pub max_store_bytes: u64,
}

// The ranges of the keys above, as their fields document them.
const KILL_GRACE: Range<Duration> = Range::new(Duration::ZERO, Duration::from_secs(3600));
const MAX_RUNNING: Range<usize> = Range::new(1, 4096);
const QUEUE_WAIT: Range<Duration> = Range::new(Duration::ZERO, Duration::from_secs(3600));
const MAX_CONNECTIONS: Range<usize> = Range::new(1, 16384);
const MAX_BODY: Range<Bytes> = Range::new(Bytes(0), Bytes(64 << 30));
const MAX_HEADER_BYTES: Range<Bytes> = Range::new(Bytes(1 << 10), Bytes(1 << 20));
const HEADER_TIMEOUT: Range<Duration> =
    Range::new(Duration::from_millis(100), Duration::from_secs(3600));
const KEEPALIVE_TIMEOUT: Range<Duration> =
    Range::new(Duration::from_millis(100), Duration::from_secs(3600));
const EVENT_SOURCES: Range<usize> = Range::new(1, 64);
const MAX_QUEUED: Range<usize> = Range::new(1, 10_000_000);
const MAX_QUEUED_BYTES: Range<Bytes> = Range::new(Bytes(1 << 10), Bytes(1 << 40));
const DEDUPE_WINDOW: Range<Duration> = Range::new(Duration::ZERO, Duration::from_secs(720 * 3600));
const KEEP_PAYLOADS: Range<Duration> = Range::new(Duration::ZERO, Duration::from_secs(8760 * 3600));
const KEEP_HISTORY: Range<Duration> =
    Range::new(Duration::from_secs(3600), Duration::from_secs(8760 * 3600));
const MAX_STORE_BYTES: Range<Bytes> = Range::new(Bytes(1 << 20), Bytes(1 << 40));
/// The longest path a unix socket address holds: `sun_path` is 108 bytes, one of them the final NUL.
const MAX_UNIX_PATH: usize = 107;

/// A listening address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(String),
    Unix(PathBuf),
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(addr) => f.write_str(addr),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Listen {
    /// A unix socket or a loopback address: reachable only from this machine.
    pub fn is_local(&self) -> bool {
        match self {
            Listen::Unix(_) => true,
            Listen::Tcp(addr) => {
                let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                host.eq_ignore_ascii_case("localhost")
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        }
    }

    pub fn parse(text: &str) -> Result<Listen, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("unix socket path must be absolute: {text:?}"));
            }
            if path.len() > MAX_UNIX_PATH {
                return Err(format!(
                    "unix socket path {path:?} is {} bytes: a socket address holds at most {MAX_UNIX_PATH}",
                    path.len()
                ));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        match text.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Listen::Tcp(text.to_string()))
            }
            _ => Err(format!(
                "listen address {text:?} is neither HOST:PORT with a port from 0 to 65535 (e.g. 127.0.0.1:8080) nor unix:/absolute/path"
            )),
        }
    }
}

/// Settings given on the command line, which win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<Listen>,
    pub scripts_dir: Option<PathBuf>,
}

/// A configuration mistake, located in a file where possible.
#[derive(Debug)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub line: Option<usize>,
    pub message: String,
}

impl ConfigError {
    pub fn new(
        file: Option<&Path>,
        line: Option<usize>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: file.map(Path::to_path_buf),
            line,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{}:{}: {}", file.display(), line, self.message),
            (Some(file), None) => write!(f, "{}: {}", file.display(), self.message),
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The file as written. Values are parsed into their types during deserialisation, so a bad value is
/// reported by the TOML parser with its line.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<ListenValue>,
    routes: Option<PathBuf>,
    scripts_dir: Option<PathBuf>,
    payload_dir: Option<PathBuf>,
    timeout: Option<DurationValue>,
    kill_grace: Option<DurationValue>,
    max_running: Option<Count>,
    queue_wait: Option<DurationValue>,
    max_connections: Option<Count>,
    max_body: Option<SizeValue>,
    max_header_bytes: Option<SizeValue>,
    header_timeout: Option<DurationValue>,
    keepalive_timeout: Option<DurationValue>,
    event: Option<Vec<SourceValue>>,
    trusted_proxies: Option<Vec<String>>,
    allow_unauthenticated: Option<bool>,
    sender: Option<Vec<RawSender>>,
    state_dir: Option<PathBuf>,
    #[serde(rename = "async")]
    run_async: Option<bool>,
    history: Option<bool>,
    max_queued: Option<Count>,
    max_queued_bytes: Option<SizeValue>,
    dedupe_window: Option<DurationValue>,
    keep_payloads: Option<DurationValue>,
    keep_history: Option<DurationValue>,
    max_store_bytes: Option<SizeValue>,
    metrics_listen: Option<String>,
    log_file: Option<PathBuf>,
    tls: Option<crate::tls::RawTls>,
}

/// The one rule of "secure by default": without a sender that checks something, only a loopback address or
/// a unix socket that no proxy forwards to (`trusted_proxies` empty), unless the operator opted in. `None`
/// when `listen` may be served; else why not. Checked at load against the configured address, and on
/// reload against the address actually served (which a reload cannot change).
pub fn open_to_anyone(
    listen: &Listen,
    senders: &Senders,
    trusted_proxies: &Trusted,
    allow_unauthenticated: bool,
) -> Option<String> {
    let proxied = !trusted_proxies.is_empty();
    if allow_unauthenticated || (listen.is_local() && !proxied) {
        return None;
    }
    let reached = if listen.is_local() {
        format!(
            "listen = {listen} is reached through a proxy (trusted_proxies is set), which forwards other \
             machines' requests"
        )
    } else {
        format!("listen = {listen} is not a loopback address or a unix socket")
    };
    if senders.is_empty() {
        return Some(format!(
            "{reached}, and no [[sender]] is configured: anyone who can reach it could run your scripts. \
             Configure a sender (README, \"Sender authentication\"), or set allow_unauthenticated = true"
        ));
    }
    senders.open().map(|s| {
        format!(
            "{reached}, and sender {:?} is type \"none\" without allow_ips (or with allow_ips that hold \
             every address): anyone who can reach it could run the scripts under {}. Give it allow_ips \
             or a type that checks the sender, or set allow_unauthenticated = true",
            s.name, s.path
        )
    })
}

impl Config {
    /// Loads the configuration: `path` if given (it must exist), else [`DEFAULT_CONFIG`] if it exists, else
    /// the built-in defaults.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let (path, text) = read(path)?;
        let file = ConfigFile {
            path: path.as_deref(),
            text: &text,
        };
        let raw = parse_toml(file.path, file.text)?;
        Config::from_raw(raw, &file, overrides)
    }

    /// Loads only what the operator's `deliveries` commands need, the store's keys, from the file
    /// [`Config::load`] would read: a route's unsafe script, a secret file this user cannot read or a missing
    /// `scripts_dir` stops the daemon, but must not keep the operator from the deliveries.
    pub fn load_store(path: Option<&Path>) -> Result<StoreSettings, ConfigError> {
        let (path, text) = read(path)?;
        let file = ConfigFile {
            path: path.as_deref(),
            text: &text,
        };
        let mut raw = parse_toml(file.path, file.text)?;
        let payload_dir = file
            .path_of("payload_dir", raw.payload_dir.take())?
            .unwrap_or_else(default_payload_dir);
        store_settings(&mut raw, &file, &payload_dir)
    }

    fn from_raw(
        mut raw: RawConfig,
        file: &ConfigFile<'_>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let base = file.path.and_then(Path::parent).unwrap_or(Path::new("."));
        let path = |key: &str, value: Option<PathBuf>| file.path_of(key, value);
        let payload_dir =
            path("payload_dir", raw.payload_dir.take())?.unwrap_or_else(default_payload_dir);
        let store = store_settings(&mut raw, file, &payload_dir)?;
        let scripts_dir = match &overrides.scripts_dir {
            Some(dir) => canonical_dir(dir).map_err(|e| {
                ConfigError::new(None, None, format!("--scripts-dir {}: {e}", dir.display()))
            })?,
            None => {
                let dir = path("scripts_dir", raw.scripts_dir)?
                    .unwrap_or_else(|| PathBuf::from("/etc/hookrunner.d"));
                canonical_dir(&dir).map_err(|e| {
                    file.error("scripts_dir", format!("scripts_dir {}: {e}", dir.display()))
                })?
            }
        };
        let routes = match path("routes", raw.routes)? {
            // A file that cannot be read is the `routes` key's mistake: its line.
            Some(named) => match Routes::load(&named, &scripts_dir) {
                Err(RoutesError::Read(e)) => {
                    return Err(file.error(
                        "routes",
                        format!("routes {}: cannot read: {e}", named.display()),
                    ));
                }
                loaded => loaded.map_err(|e| routes_error(&named, e))?,
            },
            None => {
                // Beside the configuration file, so that a test's or a second daemon's configuration never
                // picks up the installed routes.
                let beside = match file.path {
                    Some(_) => base.join(ROUTES_BESIDE),
                    None => PathBuf::from(DEFAULT_ROUTES),
                };
                match Routes::load(&beside, &scripts_dir) {
                    Err(RoutesError::Read(e)) if e.kind() == io::ErrorKind::NotFound => {
                        Routes::embedded(&scripts_dir)
                    }
                    loaded => loaded.map_err(|e| routes_error(&beside, e))?,
                }
            }
        };
        check_payload_dir(&payload_dir, file, &routes, &scripts_dir)?;
        // An option only the queue reads, on a route that runs sync, would do nothing: no retries, no
        // order, no dedupe, while `check` showed it. Refused where it is written.
        for route in &routes.routes {
            let q = &route.options.queueing;
            if q.run_async.unwrap_or(store.run_async) {
                continue;
            }
            if let Some(option) = q.async_only_option() {
                let why = if q.run_async.is_some() {
                    "it is marked sync"
                } else {
                    "it runs sync (the configuration's async = false, the default)"
                };
                return Err(ConfigError::new(
                    routes.source.as_deref(),
                    Some(route.line),
                    format!(
                        "{option} applies to async routes only, and {why}: add async to the line, or \
                         remove {option}"
                    ),
                ));
            }
        }
        let listen = overrides
            .listen
            .clone()
            .or(raw.listen.map(|l| l.0))
            .unwrap_or_else(|| Listen::Tcp(DEFAULT_LISTEN.to_string()));
        if let Listen::Unix(socket) = &listen {
            // payload_dir is the daemon's alone: 0700 (a proxy could not reach the socket), and a socket
            // left there by a crash would stop the next start as a foreign file.
            let real = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
            if socket
                .parent()
                .is_some_and(|dir| real(dir).starts_with(real(&payload_dir)))
            {
                let message = format!(
                    "listen = unix:{} is inside payload_dir {}, which is the daemon's alone (mode 0700, \
                     nothing but payload files): put the socket in a directory of its own, or have systemd \
                     make it (hookrunner.socket)",
                    socket.display(),
                    payload_dir.display()
                );
                return Err(match overrides.listen {
                    Some(_) => ConfigError::new(None, None, format!("--listen: {message}")),
                    None => file.error("listen", message),
                });
            }
        }
        let mut warnings = Vec::new();
        for (what, path, why) in [
            (
                "scripts_dir",
                Some(scripts_dir.as_path()),
                "whoever can write there can add a script that runs as this daemon's user",
            ),
            (
                "the routes file",
                routes.source.as_deref(),
                "whoever can write it chooses the programs that run as this daemon's user",
            ),
            (
                "the configuration file",
                file.path,
                "whoever can write it chooses this daemon's routes, senders and secrets",
            ),
            (
                "state_dir",
                Some(store.state_dir.as_path()),
                "whoever can write there can put a store of their own in it, whose queued deliveries \
                 run as this daemon's user",
            ),
        ] {
            warnings.extend(path.and_then(|path| writable_warning(what, path, why)));
        }
        warnings.extend(writable_files_warning(&scripts_dir));
        warnings.extend(routes.warnings());
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let mut senders = Vec::new();
        for (index, raw_sender) in raw.sender.into_iter().flatten().enumerate() {
            let name = raw_sender.name().to_string();
            let mut context = profile::Context {
                credentials: credentials.as_deref(),
                base,
                warnings: &mut warnings,
            };
            let sender = raw_sender.build(&mut context).map_err(|e| {
                ConfigError::new(
                    file.path,
                    message_key_line(file.text, table_line(file.text, "[[sender]]", index), &e),
                    format!("sender {name:?}: {e}"),
                )
            })?;
            if senders
                .iter()
                .any(|s: &crate::auth::Sender| s.name == sender.name)
            {
                return Err(ConfigError::new(
                    file.path,
                    table_line(file.text, "[[sender]]", index),
                    format!(
                        "sender {name:?} is named twice: names appear in logs and must be unique"
                    ),
                ));
            }
            // The longest path decides, so of two senders on one path only one could ever apply.
            if let Some(other) = senders
                .iter()
                .find(|s: &&crate::auth::Sender| s.path == sender.path)
            {
                return Err(ConfigError::new(
                    file.path,
                    table_line(file.text, "[[sender]]", index),
                    format!(
                        "sender {name:?}: path {:?} is already sender {:?}'s; a request under it is \
                         checked by one sender only, so give each sender its own path",
                        sender.path, other.name
                    ),
                ));
            }
            // `/hooks/NAME` in a sender's path reads as "this event is this sender's", but the event does
            // not choose the sender (the path does) nor the path the route (the event does).
            if sender
                .path
                .split_once("/hooks/")
                .is_some_and(|(_, event)| !event.trim_matches('/').is_empty())
            {
                warnings.push(format!(
                    "sender {name:?}: its path {:?} names an event, but that does not tie the event to this \
                     sender: the same event sent under another sender's path runs the same route; give \
                     the route line sender={name} (or the other senders `events = [...]`)",
                    sender.path
                ));
            }
            senders.push(sender);
        }
        let mut trusted_proxies = Trusted::default();
        for entry in raw.trusted_proxies.into_iter().flatten() {
            if entry == "unix" {
                trusted_proxies.unix = true;
            } else {
                let block = Cidr::parse(&entry)
                    .map_err(|e| file.error("trusted_proxies", format!("trusted_proxies: {e}")))?;
                trusted_proxies.blocks.push(block);
            }
        }
        if crate::auth::net::cover_everyone(&trusted_proxies.blocks) {
            return Err(file.error(
                "trusted_proxies",
                "trusted_proxies holds every address: any client could then name any address in \
                 X-Forwarded-For, and allow_ips would check nothing. List the proxies' own addresses"
                    .to_string(),
            ));
        }
        // On a unix socket a client has no address but what a trusted proxy names: without "unix" in
        // trusted_proxies, a sender's allow_ips admits no one there.
        if matches!(listen, Listen::Unix(_)) && !trusted_proxies.unix {
            for sender in senders.iter().filter(|s| !s.allow_ips.is_empty()) {
                warnings.push(format!(
                    "sender {:?}: its allow_ips admits no one on listen = {listen}: a client there has no \
                     address but the X-Forwarded-For of a proxy, believed only with \"unix\" in \
                     trusted_proxies",
                    sender.name
                ));
            }
        }
        // `allow_unauthenticated`: serve without any sender, or with a `none` sender open to every address,
        // on a non-loopback address (default false; the daemon warns at every start when it does).
        let allow_unauthenticated = raw.allow_unauthenticated.unwrap_or(false);
        let senders = Senders { senders };
        // A route line for a sender that is not configured could never match: a misspelt name.
        for route in &routes.routes {
            if let Some(name) = route
                .options
                .senders
                .iter()
                .find(|n| !senders.senders.iter().any(|s| &s.name == *n))
            {
                let known: Vec<&str> = senders.senders.iter().map(|s| s.name.as_str()).collect();
                return Err(ConfigError::new(
                    routes.source.as_deref(),
                    Some(route.line),
                    if known.is_empty() {
                        format!("sender={name}: no [[sender]] is configured, so no request has one")
                    } else {
                        format!(
                            "sender={name}: no [[sender]] has that name (the senders are {})",
                            known.join(", ")
                        )
                    },
                ));
            }
        }
        if let Some(message) =
            open_to_anyone(&listen, &senders, &trusted_proxies, allow_unauthenticated)
        {
            return Err(match overrides.listen {
                Some(_) => ConfigError::new(None, None, format!("--listen: {message}")),
                None => file.error("listen", message),
            });
        }
        let duration = |key: &str, value, default, range| file.duration(key, value, default, range);
        let count = |key: &str, value, default, range| file.count(key, value, default, range);
        let size = |key: &str, value, default, range| file.size(key, value, default, range);
        let max_header_bytes = size(
            "max_header_bytes",
            raw.max_header_bytes,
            16 << 10,
            MAX_HEADER_BYTES,
        )?;
        let metrics_listen = match &raw.metrics_listen {
            None => None,
            Some(text) => match text.parse::<SocketAddr>() {
                Ok(addr) if addr.ip().is_loopback() => Some(addr),
                _ => {
                    return Err(file.error(
                        "metrics_listen",
                        format!(
                            "metrics_listen = {text:?}: give a loopback IP:PORT, e.g. 127.0.0.1:9464 (metrics \
                             name senders and scripts, so they are never served beyond this machine)"
                        ),
                    ));
                }
            },
        };
        let event = raw.event.map_or_else(crate::event::default_sources, |v| {
            v.into_iter().map(|s| s.0).collect()
        });
        if !EVENT_SOURCES.contains(event.len()) {
            return Err(file.error(
                "event",
                format!("event lists {} sources: list {EVENT_SOURCES}", event.len()),
            ));
        }
        // Relative paths as for the other keys; an error is placed on the `[tls]` line.
        let relative = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let tls_line = table_line(file.text, "[tls]", 0);
        let tls = match raw.tls {
            None => None,
            Some(_) if matches!(listen, Listen::Unix(_)) => {
                return Err(ConfigError::new(
                    file.path,
                    tls_line,
                    "[tls] needs a HOST:PORT listen address: a unix socket is for a proxy that terminates TLS",
                ));
            }
            Some(tls) => Some(tls.load(relative).map_err(|e| {
                let line = message_key_line(file.text, tls_line, &e);
                ConfigError::new(file.path, line, e)
            })?),
        };
        warnings.extend(tls.as_ref().and_then(crate::tls::Tls::expiry_warning_now));
        warnings.extend(tls.as_ref().and_then(crate::tls::Tls::key_warning));
        warnings.extend(tls.as_ref().and_then(|t| t.chain_warning.clone()));
        // An mtls sender checks the names of a certificate the TLS layer verified: it needs one to be asked for.
        let asks_for_certificates = tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
        if let Some((index, sender)) = senders
            .senders
            .iter()
            .enumerate()
            .find(|(_, s)| matches!(s.scheme, crate::auth::Scheme::Mtls { .. }))
        {
            if !asks_for_certificates {
                return Err(ConfigError::new(
                    file.path,
                    table_line(file.text, "[[sender]]", index),
                    format!(
                        "sender {:?}: type mtls needs [tls] with client_ca_file, so that clients are asked for \
                         a certificate and it is verified",
                        sender.name
                    ),
                ));
            }
        }
        let log_file = path("log_file", raw.log_file)?;
        if let Some(log_file) = &log_file {
            missing_parent(file, "log_file", log_file, "creates the file")?;
        }
        Ok(Config {
            listen,
            routes,
            scripts_dir,
            payload_dir,
            timeout: duration("timeout", raw.timeout, 30_000, routes::TIMEOUT)?,
            kill_grace: duration("kill_grace", raw.kill_grace, 5_000, KILL_GRACE)?,
            max_running: count("max_running", raw.max_running, 32, MAX_RUNNING)?,
            queue_wait: duration("queue_wait", raw.queue_wait, 2_000, QUEUE_WAIT)?,
            max_connections: count("max_connections", raw.max_connections, 256, MAX_CONNECTIONS)?,
            max_body: size("max_body", raw.max_body, 10 << 20, MAX_BODY)?,
            max_header_bytes: usize::try_from(max_header_bytes).map_err(|_| {
                file.error(
                    "max_header_bytes",
                    format!("max_header_bytes = {max_header_bytes} does not fit in memory"),
                )
            })?,
            header_timeout: duration("header_timeout", raw.header_timeout, 10_000, HEADER_TIMEOUT)?,
            keepalive_timeout: duration(
                "keepalive_timeout",
                raw.keepalive_timeout,
                5_000,
                KEEPALIVE_TIMEOUT,
            )?,
            event,
            senders,
            allow_unauthenticated,
            trusted_proxies,
            store,
            warnings,
            metrics_listen,
            log_file,
            tls,
            source: file.path.map(Path::to_path_buf),
        })
    }
}

/// The 1-based line of the `index`-th (from 0) `header` table line, such as `[[sender]]`.
fn table_line(text: &str, header: &str, index: usize) -> Option<usize> {
    text.lines()
        .enumerate()
        // `[[sender]]  # jamf`: a table line may end in a comment.
        .filter(|(_, l)| l.split('#').next().unwrap_or("").trim() == header)
        .nth(index)
        .map(|(i, _)| i + 1)
}

/// The configuration file's name and text, to place an error about a key on the key's line.
struct ConfigFile<'a> {
    path: Option<&'a Path>,
    text: &'a str,
}

impl ConfigFile<'_> {
    /// An error about `key`: on its line when the file sets it, else on the file.
    fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::new(self.path, key_line(self.text, key), message)
    }

    /// `value` if it lies in `range`, else an error naming the key, the value and the range.
    fn within<T: Quantity>(&self, key: &str, value: T, range: Range<T>) -> Result<T, ConfigError> {
        range
            .check(value)
            .map_err(|e| self.error(key, format!("{key} = {e}")))
    }

    /// A path key's value: relative to the file's directory, so a config works from any working directory.
    fn path_of(&self, key: &str, value: Option<PathBuf>) -> Result<Option<PathBuf>, ConfigError> {
        let base = self.path.and_then(Path::parent).unwrap_or(Path::new("."));
        match value {
            Some(p) if p.as_os_str().is_empty() => Err(self.error(key, format!("{key} is empty"))),
            Some(p) if p.is_absolute() => Ok(Some(p)),
            Some(p) => Ok(Some(base.join(p))),
            None => Ok(None),
        }
    }

    fn duration(
        &self,
        key: &str,
        value: Option<DurationValue>,
        default: u64,
        range: Range<Duration>,
    ) -> Result<Duration, ConfigError> {
        self.within(
            key,
            value.map_or(Duration::from_millis(default), |d| d.0),
            range,
        )
    }

    fn count(
        &self,
        key: &str,
        value: Option<Count>,
        default: usize,
        range: Range<usize>,
    ) -> Result<usize, ConfigError> {
        let Some(Count(n)) = value else {
            return self.within(key, default, range);
        };
        let n = usize::try_from(n)
            .map_err(|_| self.error(key, format!("{key} = {n} is out of range: use {range}")))?;
        self.within(key, n, range)
    }

    fn size(
        &self,
        key: &str,
        value: Option<SizeValue>,
        default: u64,
        range: Range<Bytes>,
    ) -> Result<u64, ConfigError> {
        let Some(SizeValue(n)) = value else {
            return self.within(key, Bytes(default), range).map(|b| b.0);
        };
        let n = u64::try_from(n)
            .map_err(|_| self.error(key, format!("{key} = {n} is out of range: use {range}")))?;
        self.within(key, Bytes(n), range).map(|b| b.0)
    }
}

/// The store's keys (checked as [`Config::load`] checks every key); `payload_dir` is the one the rest of
/// the file gives, which the store must not share.
fn store_settings(
    raw: &mut RawConfig,
    file: &ConfigFile<'_>,
    payload_dir: &Path,
) -> Result<StoreSettings, ConfigError> {
    let state_dir = file
        .path_of("state_dir", raw.state_dir.take())?
        .unwrap_or_else(default_state_dir);
    if state_dir == payload_dir {
        return Err(file.error(
            "state_dir",
            format!(
                "state_dir {} is payload_dir, whose files are removed at start: give the store a \
                 directory of its own",
                state_dir.display()
            ),
        ));
    }
    Ok(StoreSettings {
        state_dir,
        run_async: raw.run_async.unwrap_or(false),
        history: raw.history.unwrap_or(true),
        max_queued: file.count("max_queued", raw.max_queued.take(), 100_000, MAX_QUEUED)? as u64,
        max_queued_bytes: file.size(
            "max_queued_bytes",
            raw.max_queued_bytes.take(),
            1 << 30,
            MAX_QUEUED_BYTES,
        )?,
        dedupe_window: file.duration(
            "dedupe_window",
            raw.dedupe_window.take(),
            24 * 3_600_000,
            DEDUPE_WINDOW,
        )?,
        keep_payloads: file.duration(
            "keep_payloads",
            raw.keep_payloads.take(),
            7 * 24 * 3_600_000,
            KEEP_PAYLOADS,
        )?,
        keep_history: file.duration(
            "keep_history",
            raw.keep_history.take(),
            30 * 24 * 3_600_000,
            KEEP_HISTORY,
        )?,
        max_store_bytes: file.size(
            "max_store_bytes",
            raw.max_store_bytes.take(),
            1 << 30,
            MAX_STORE_BYTES,
        )?,
    })
}

/// The configuration file's path and text: `path` if given (it must exist), else [`DEFAULT_CONFIG`] if it
/// exists, else none (the built-in defaults).
fn read(path: Option<&Path>) -> Result<(Option<PathBuf>, String), ConfigError> {
    match path {
        Some(path) => {
            let text = fs::read_to_string(path)
                .map_err(|e| ConfigError::new(Some(path), None, format!("cannot read: {e}")))?;
            Ok((Some(path.to_path_buf()), text))
        }
        None => match fs::read_to_string(DEFAULT_CONFIG) {
            Ok(text) => Ok((Some(PathBuf::from(DEFAULT_CONFIG)), text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((None, String::new())),
            Err(e) => Err(ConfigError::new(
                Some(Path::new(DEFAULT_CONFIG)),
                None,
                format!("cannot read: {e}"),
            )),
        },
    }
}

/// The 1-based line on which `key` is set, if it is. All our keys are top-level, so the first line that
/// starts with the key and an `=` is it.
fn key_line(text: &str, key: &str) -> Option<usize> {
    key_line_from(text, key, 1)
}

/// The line of the key an error about a table's values names first (`secret_file: cannot read ...`,
/// `user must not ...`), when the table that starts on line `table` sets it; else the table's line.
fn message_key_line(text: &str, table: Option<usize>, message: &str) -> Option<usize> {
    let table = table?;
    // `[tls] key_file ...`: the key after the table's name.
    let message = message
        .strip_prefix('[')
        .and_then(|m| m.split_once("] "))
        .map_or(message, |(_, rest)| rest);
    let key = message.split([' ', ':']).next().unwrap_or("");
    if key.is_empty() {
        return Some(table);
    }
    let line = text
        .lines()
        .enumerate()
        .skip(table)
        .take_while(|(_, l)| !l.trim_start().starts_with('['))
        .find(|(_, l)| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|after| after.trim_start().starts_with('='))
        })
        .map(|(index, _)| index + 1);
    line.or(Some(table))
}

/// The first line at or after `from` (1-based) on which `key` is set.
fn key_line_from(text: &str, key: &str, from: usize) -> Option<usize> {
    text.lines()
        .enumerate()
        .skip(from.saturating_sub(1))
        .find(|(_, l)| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|after| after.trim_start().starts_with('='))
        })
        .map(|(index, _)| index + 1)
}

/// basic-toml quotes the value it could not take (`invalid type: integer \`123456\``). Where the key names a
/// file holding a secret, what was written there may be the secret itself, pasted in: it is not repeated.
fn without_values(message: &str) -> String {
    // A string value comes in double quotes: `invalid type: string "X-Api-Key: 0f9e", expected a map`.
    if let Some(start) = message.find("string \"") {
        let from = start + "string ".len();
        let end = message.rfind("\", expected").filter(|&e| e > from);
        let rest = end.map_or("", |e| &message[e + 1..]);
        return format!("{}(the value){rest}", &message[..from]);
    }
    let mut out = String::new();
    let mut parts = message.split('`');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    let mut quoted = true;
    for part in parts {
        out.push_str(if quoted { "(the value)" } else { part });
        quoted = !quoted;
    }
    out
}

/// A file or directory that decides what runs as this daemon's user, which group or others may write to:
/// `scripts_dir` (a script is refused when others can write it, but whoever can write the directory can
/// add one of their own, mode 0755, that `* {event}` runs), the routes file, the config file, and
/// `state_dir` (a store put there, whose queued entries name their scripts, runs them at the next start;
/// the daemon refuses such a `state_dir`, see `store::check_private`). Sticky or not: in a sticky
/// directory others still add files. A warning rather than an error, so an upgrade does not stop a
/// running setup.
fn writable_warning(what: &str, path: &Path, why: &str) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.mode();
    if mode & 0o022 == 0 {
        return None;
    }
    Some(format!(
        "{what} {} is writable by {} (mode {:04o}): {why}; chmod go-w it",
        path.display(),
        if mode & 0o002 != 0 {
            "anyone"
        } else {
            "its group"
        },
        mode & 0o7777
    ))
}

/// How deep and how many entries of `scripts_dir` [`writable_files_warning`] looks at: a scripts directory
/// holds scripts and what they read, not a tree to walk at every reload.
const SCAN_DEPTH: usize = 4;
const SCAN_ENTRIES: usize = 10_000;

/// Files in `scripts_dir` group or others can write. A script is refused when it is one, but what scripts
/// source or read (a shared `lib.sh`, an `integrations.env`) runs as the daemon's user just the same.
fn writable_files_warning(scripts_dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let mut found = Vec::new();
    let mut pending = vec![(scripts_dir.to_path_buf(), 0)];
    let mut seen = 0;
    while let Some((dir, depth)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            seen += 1;
            if seen > SCAN_ENTRIES {
                break;
            }
            // Not through symlinks: a link's own mode says nothing, and its target may be anywhere.
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            // A directory others can write lets them replace what is in it, whatever its files' modes.
            if (meta.is_file() || meta.is_dir()) && meta.mode() & 0o022 != 0 {
                found.push(entry.path());
            }
            if meta.is_dir() && depth + 1 < SCAN_DEPTH {
                pending.push((entry.path(), depth + 1));
            }
        }
    }
    let first = found.iter().min()?;
    let name = first.strip_prefix(scripts_dir).unwrap_or(first);
    Some(format!(
        "{} file(s) or directories in scripts_dir {} are writable by group or others ({}{}): a script \
         that runs, sources or reads what is there runs what whoever can write it put there; chmod go-w \
         them",
        found.len(),
        scripts_dir.display(),
        name.display(),
        if found.len() > 1 { ", ..." } else { "" }
    ))
}

fn canonical_dir(dir: &Path) -> io::Result<PathBuf> {
    let real = dir.canonicalize()?;
    if real.is_dir() {
        Ok(real)
    } else {
        Err(io::Error::other(format!(
            "{} is not a directory",
            real.display()
        )))
    }
}

fn routes_error(path: &Path, error: RoutesError) -> ConfigError {
    match error {
        RoutesError::Read(e) => {
            ConfigError::new(Some(path), None, format!("cannot read routes: {e}"))
        }
        RoutesError::Line { line, message } => ConfigError::new(Some(path), Some(line), message),
    }
}

/// A path the daemon creates at start whose parent directory does not exist: an error on the key's line. A
/// parent that is there but cannot be looked into (`check` run by another user) is left to the start.
fn missing_parent(
    file: &ConfigFile<'_>,
    key: &str,
    path: &Path,
    what: &str,
) -> Result<(), ConfigError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => return Ok(()),
    };
    match std::fs::metadata(parent) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(file.error(
            key,
            format!(
                "{key} {}: its directory {} does not exist (the daemon {what}, not its directory)",
                path.display(),
                parent.display()
            ),
        )),
        Ok(meta) if !meta.is_dir() => Err(file.error(
            key,
            format!(
                "{key} {}: {} is not a directory",
                path.display(),
                parent.display()
            ),
        )),
        _ => Ok(()),
    }
}

/// The daemon removes every file it finds in `payload_dir` at start: refuse a directory that holds the
/// configuration, the routes or the scripts. One that does not exist yet holds nothing.
fn check_payload_dir(
    payload_dir: &Path,
    file: &ConfigFile<'_>,
    routes: &Routes,
    scripts_dir: &Path,
) -> Result<(), ConfigError> {
    let real = match payload_dir.canonicalize() {
        Ok(real) => real,
        // Created at start, one level deep: its parent must be there (else `serve` fails to create it, with
        // exit 1, which systemd restarts every two seconds).
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return missing_parent(file, "payload_dir", payload_dir, "creates it");
        }
        Err(_) => return Ok(()),
    };
    let held = [
        ("the configuration file", file.path),
        ("the routes file", routes.source.as_deref()),
        ("scripts_dir", Some(scripts_dir)),
    ];
    for (what, path) in held {
        let inside = path
            .and_then(|p| p.canonicalize().ok())
            .is_some_and(|p| p.starts_with(&real));
        if inside {
            return Err(file.error(
                "payload_dir",
                format!(
                    "payload_dir {} holds {what}: files in it are removed at start, so give it a directory of its own",
                    payload_dir.display()
                ),
            ));
        }
    }
    // What the daemon's start refuses to adopt (a directory that holds anything but its own files), found
    // here too: `check` says so with the key's line, and `serve` exits 78, which systemd does not restart,
    // instead of 1 every two seconds.
    let foreign = std::fs::read_dir(&real).ok().and_then(|entries| {
        entries
            .filter_map(Result::ok)
            .map(|entry| entry.file_name())
            .find(|name| !crate::payload::is_ours(name))
    });
    if let Some(name) = foreign {
        return Err(file.error(
            "payload_dir",
            format!(
                "payload_dir {} holds {name:?}, which is not a hookrunner payload file: give hookrunner a \
                 directory of its own",
                payload_dir.display()
            ),
        ));
    }
    Ok(())
}

fn parse_toml(file: Option<&Path>, text: &str) -> Result<RawConfig, ConfigError> {
    basic_toml::from_str(text).map_err(|e| {
        // basic-toml ends its messages with "at line L column C"; lift the line into our file:line form.
        let message = e.to_string();
        let (what, line) = match message.rsplit_once(" at line ") {
            Some((what, at)) => (
                what,
                at.split_whitespace().next().and_then(|l| l.parse().ok()),
            ),
            None => (message.as_str(), None),
        };
        // basic-toml places errors about a key (unknown, or a bad value) at the start of its table; find the
        // key's own line instead.
        let key = what
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(key, _)| key)
            .or_else(|| {
                what.rsplit_once(" for key `")
                    .map(|(_, k)| k.trim_end_matches('`'))
            });
        // serde names Rust's integer types; an operator wrote a number in quotes.
        let what = what
            .replace("expected i64", "expected a whole number (without quotes)")
            .replace("expected u64", "expected a whole number (without quotes)");
        let what = what.as_str();
        // "invalid size \"lots\" for key `max_body`" becomes "max_body: invalid size \"lots\"".
        let what = match what.rsplit_once(" for key `") {
            // A `*_file` value, or a `headers` value (a file name too), may be a pasted secret.
            Some((what, key))
                if key.trim_end_matches('`').ends_with("_file")
                    || key.trim_end_matches('`').ends_with("headers") =>
            {
                format!("{}: {}", key.trim_end_matches('`'), without_values(what))
            }
            Some((what, key)) => format!("{}: {what}", key.trim_end_matches('`')),
            None => what.to_string(),
        };
        // The key's line in the table basic-toml names (the line where that table starts): a top-level key
        // set again below `[[sender]]` belongs to the sender, and its error to that line.
        let last = key.map(|key| key.rsplit('.').next().unwrap_or(key));
        let key_line = last.and_then(|key| {
            line.and_then(|from| key_line_from(text, key, from))
                .or_else(|| key_line(text, key))
        });
        ConfigError::new(file, key_line.or(line), what)
    })
}

fn default_payload_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") {
        // systemd may list several directories separated by ':'; the first is ours.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        if !first.is_empty() {
            return PathBuf::from(first);
        }
    }
    let uid = rustix::process::getuid().as_raw();
    std::env::temp_dir().join(format!("hookrunner-{uid}"))
}

fn default_state_dir() -> PathBuf {
    // systemd may list several directories separated by ':'; the first is ours.
    let from = |var: &str| {
        std::env::var_os(var)
            .map(|v| {
                v.to_string_lossy()
                    .split(':')
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = from("STATE_DIRECTORY") {
        return dir;
    }
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/hookrunner");
    }
    from("XDG_STATE_HOME")
        .or_else(|| from("HOME").map(|home| home.join(".local/state")))
        .unwrap_or_else(std::env::temp_dir)
        .join("hookrunner")
}

struct DurationValue(Duration);
/// As written: a negative size is refused with its range, not as a type error.
struct SizeValue(i128);
/// As written: a negative count is refused with its range, not as a type error.
struct Count(i64);
struct ListenValue(Listen);
struct SourceValue(Source);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string such as \"30s\" (units ms, s, m, h)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                parse_duration(v).map_err(E::custom)
            }
        }
        d.deserialize_str(DurationVisitor).map(DurationValue)
    }
}

impl<'de> Deserialize<'de> for ListenValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Listen::parse(&text)
            .map(ListenValue)
            .map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for SourceValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Source::parse(&text)
            .map(SourceValue)
            .map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        i64::deserialize(d).map(Count)
    }
}

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = i128;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size in bytes, or a string such as \"10MiB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<i128, E> {
                Ok(i128::from(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<i128, E> {
                Ok(i128::from(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<i128, E> {
                parse_size(v).map(i128::from).map_err(E::custom)
            }
        }
        d.deserialize_any(SizeVisitor).map(SizeValue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            Listen::parse("127.0.0.1:0"),
            Ok(Listen::Tcp("127.0.0.1:0".into()))
        );
        assert_eq!(
            Listen::parse("[::1]:8080"),
            Ok(Listen::Tcp("[::1]:8080".into()))
        );
        assert_eq!(
            Listen::parse("unix:/run/h.sock"),
            Ok(Listen::Unix("/run/h.sock".into()))
        );
        let longest = format!("unix:/{}", "s".repeat(MAX_UNIX_PATH - 1));
        assert!(Listen::parse(&longest).is_ok(), "{longest}");
        let too_long = format!("unix:/{}", "s".repeat(MAX_UNIX_PATH));
        for bad in [
            "8080",
            "localhost",
            ":80",
            "unix:rel.sock",
            "unix:",
            "host:99999",
            "host:65536",
            "host:-1",
            &too_long,
        ] {
            assert!(Listen::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn toml_errors_name_the_line() {
        let file = Path::new("h.toml");
        let err = parse_toml(Some(file), "timeout = \"30s\"\nbogus = 1\n")
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.starts_with("h.toml:2: unknown field `bogus`"), "{err}");
        let err = parse_toml(Some(file), "\n\ntimeout = \"30 seconds\"\n")
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(
            err.starts_with("h.toml:3: timeout: invalid duration"),
            "{err}"
        );
    }

    #[test]
    fn a_key_is_found_on_its_own_line() {
        let text = "# timeout = \"1s\" in a comment\nheader_timeout = \"1s\"\ntimeouts = 1\n  timeout= \"2s\"\n";
        assert_eq!(key_line(text, "timeout"), Some(4));
        assert_eq!(key_line(text, "header_timeout"), Some(2));
        assert_eq!(key_line(text, "kill_grace"), None);
    }

    /// Each range as its field documents it, for the checks that README.md and the shipped example say the
    /// same.
    fn documented_ranges() -> Vec<(&'static str, String)> {
        vec![
            ("timeout", routes::TIMEOUT.to_string()),
            ("kill_grace", KILL_GRACE.to_string()),
            ("max_running", MAX_RUNNING.to_string()),
            ("queue_wait", QUEUE_WAIT.to_string()),
            ("max_connections", MAX_CONNECTIONS.to_string()),
            ("max_body", MAX_BODY.to_string()),
            ("max_header_bytes", MAX_HEADER_BYTES.to_string()),
            ("header_timeout", HEADER_TIMEOUT.to_string()),
            ("keepalive_timeout", KEEPALIVE_TIMEOUT.to_string()),
            ("event", format!("{EVENT_SOURCES} sources")),
            ("max_queued", MAX_QUEUED.to_string()),
            ("max_queued_bytes", MAX_QUEUED_BYTES.to_string()),
            ("dedupe_window", DEDUPE_WINDOW.to_string()),
            ("keep_payloads", KEEP_PAYLOADS.to_string()),
            ("keep_history", KEEP_HISTORY.to_string()),
            ("max_store_bytes", MAX_STORE_BYTES.to_string()),
        ]
    }

    #[test]
    fn the_readme_table_states_each_range() {
        let readme = include_str!("../README.md");
        for (key, range) in documented_ranges() {
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{key}` |")))
                .unwrap_or_else(|| panic!("README.md has no row for {key}"));
            assert!(
                row.contains(&range),
                "README.md's {key} row lacks {range:?}: {row}"
            );
        }
    }

    #[test]
    fn the_shipped_example_states_each_range_above_its_key() {
        let example = include_str!("../etc/hookrunner.toml");
        let lines: Vec<&str> = example.lines().collect();
        for (key, range) in documented_ranges() {
            let at = lines
                .iter()
                .position(|l| l.trim_start_matches("# ").starts_with(&format!("{key} =")))
                .unwrap_or_else(|| panic!("etc/hookrunner.toml does not show {key}"));
            // The comment block just above the key (or the key's group) says its range.
            let comment = lines[..at]
                .iter()
                .rev()
                .skip_while(|l| !l.starts_with('#'))
                .take_while(|l| l.starts_with('#'))
                .any(|l| l.contains(&range));
            assert!(
                comment,
                "etc/hookrunner.toml: no {range:?} in the comment above {key}"
            );
        }
    }
}
