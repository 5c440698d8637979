//! The daemon's configuration: a TOML file becomes one validated [`Config`], or a [`ConfigError`] that names
//! the file and line. Nothing past [`Config::load`] re-checks what is validated here; a reload builds a whole
//! new `Config` and swaps it in, or keeps the old one.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::event::Source;
use crate::routes::Routes;

/// Where the daemon reads its configuration when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/hookrunner/hookrunner.toml";
/// Where the daemon reads its routes when the configuration does not name a file.
pub const DEFAULT_ROUTES: &str = "/etc/hookrunner/routes";

/// A validated configuration. Every field is documented once, here; README.md repeats the same text.
#[derive(Debug)]
pub struct Config {
    /// `listen`: where to accept connections: `HOST:PORT` (default `127.0.0.1:8080`) or `unix:/path`.
    pub listen: Listen,
    /// `routes`: the routing file (default `/etc/hookrunner/routes`; when that file does not exist, the
    /// embedded routing table `* {event}`). A file named explicitly must exist.
    pub routes: Routes,
    /// `scripts_dir`: where scripts named in the routes live (default `/etc/hookrunner.d`).
    pub scripts_dir: PathBuf,
    /// `payload_dir`: the private (0700) directory for payload files (default `$RUNTIME_DIRECTORY`, else
    /// `$TMPDIR/hookrunner-<uid>`). Stale files in it are removed at start; one daemon owns it at a time.
    pub payload_dir: PathBuf,
    /// `timeout`: how long a script may run before its process group gets SIGTERM (default `30s`); a route's
    /// `timeout=` option overrides it.
    pub timeout: Duration,
    /// `kill_grace`: how long after SIGTERM the group gets SIGKILL (default `5s`).
    pub kill_grace: Duration,
    /// `max_running`: how many scripts may run at once (default 32).
    pub max_running: usize,
    /// `queue_wait`: how long a request may wait for a free script slot before it is answered 503 with
    /// `Retry-After` (default `2s`).
    pub queue_wait: Duration,
    /// `max_connections`: how many client connections may be open at once; past that a connection is
    /// answered 503 with `Retry-After` and closed (default 256). Each open connection holds one worker thread.
    pub max_connections: usize,
    /// `max_body`: the largest request body accepted; larger ones are answered 413 (default `10MiB`).
    pub max_body: u64,
    /// `max_header_bytes`: the largest request head (request line and headers) accepted; larger ones are
    /// answered 431 (default `16KiB`).
    pub max_header_bytes: usize,
    /// `header_timeout`: how long a client has to send a whole request head, and the grace before the
    /// minimum body pace (4 KiB/s) applies (default `10s`).
    pub header_timeout: Duration,
    /// `keepalive_timeout`: how long an idle keep-alive connection stays open (default `5s`).
    pub keepalive_timeout: Duration,
    /// `event`: where to look for the event name, in order; the first source that yields a name wins. Each
    /// entry is `path`, `header:NAME`, `gitlab`, `json:/pointer`, `xml:/path`, `form:FIELD` or `query:FIELD`.
    /// Default: see [`crate::event::default_sources`].
    pub event: Vec<Source>,
}

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
    pub fn parse(text: &str) -> Result<Listen, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("unix socket path must be absolute: {text:?}"));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        match text.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Listen::Tcp(text.to_string()))
            }
            _ => Err(format!(
                "listen address {text:?} is neither HOST:PORT (e.g. 127.0.0.1:8080) nor unix:/path"
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
}

impl Config {
    /// Loads the configuration: `path` if given (it must exist), else [`DEFAULT_CONFIG`] if it exists, else
    /// the built-in defaults.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let (file, text) = match path {
            Some(path) => {
                let text = fs::read_to_string(path)
                    .map_err(|e| ConfigError::new(Some(path), None, format!("cannot read: {e}")))?;
                (Some(path), Some(text))
            }
            None => match fs::read_to_string(DEFAULT_CONFIG) {
                Ok(text) => (Some(Path::new(DEFAULT_CONFIG)), Some(text)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => (None, None),
                Err(e) => {
                    return Err(ConfigError::new(
                        Some(Path::new(DEFAULT_CONFIG)),
                        None,
                        format!("cannot read: {e}"),
                    ));
                }
            },
        };
        let raw = match text {
            Some(text) => parse_toml(file, &text)?,
            None => RawConfig::default(),
        };
        Config::from_raw(raw, file, overrides)
    }

    fn from_raw(
        raw: RawConfig,
        file: Option<&Path>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let base = file.and_then(Path::parent).unwrap_or(Path::new("."));
        // Relative paths in the file are relative to the file, so a config works from any working directory.
        let relative = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let scripts_dir = match &overrides.scripts_dir {
            Some(dir) => dir.clone(),
            None => raw
                .scripts_dir
                .map(relative)
                .unwrap_or_else(|| PathBuf::from("/etc/hookrunner.d")),
        };
        let scripts_dir = scripts_dir.canonicalize().map_err(|e| {
            ConfigError::new(
                file,
                None,
                format!("scripts_dir {}: {e}", scripts_dir.display()),
            )
        })?;
        let routes = match raw.routes.map(relative) {
            Some(path) => Routes::load(&path, &scripts_dir)?,
            None => match fs::read_to_string(DEFAULT_ROUTES) {
                Ok(text) => Routes::parse(&text, Some(Path::new(DEFAULT_ROUTES)), &scripts_dir)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => Routes::embedded(&scripts_dir)?,
                Err(e) => {
                    return Err(ConfigError::new(
                        Some(Path::new(DEFAULT_ROUTES)),
                        None,
                        format!("cannot read: {e}"),
                    ));
                }
            },
        };
        let payload_dir = raw
            .payload_dir
            .map(relative)
            .unwrap_or_else(default_payload_dir);
        let listen = overrides
            .listen
            .clone()
            .or(raw.listen.map(|l| l.0))
            .unwrap_or_else(|| Listen::Tcp("127.0.0.1:8080".to_string()));
        Ok(Config {
            listen,
            routes,
            scripts_dir,
            payload_dir,
            timeout: raw.timeout.map_or(Duration::from_secs(30), |d| d.0),
            kill_grace: raw.kill_grace.map_or(Duration::from_secs(5), |d| d.0),
            max_running: raw.max_running.map_or(32, |c| c.0),
            queue_wait: raw.queue_wait.map_or(Duration::from_secs(2), |d| d.0),
            max_connections: raw.max_connections.map_or(256, |c| c.0),
            max_body: raw.max_body.map_or(10 << 20, |s| s.0),
            max_header_bytes: raw
                .max_header_bytes
                .map_or(16 << 10, |s| usize::try_from(s.0).unwrap_or(usize::MAX)),
            header_timeout: raw.header_timeout.map_or(Duration::from_secs(10), |d| d.0),
            keepalive_timeout: raw
                .keepalive_timeout
                .map_or(Duration::from_secs(5), |d| d.0),
            event: raw.event.map_or_else(crate::event::default_sources, |v| {
                v.into_iter().map(|s| s.0).collect()
            }),
        })
    }
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
        // key's own line instead. All our keys are top-level.
        let key = what
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(key, _)| key)
            .or_else(|| {
                what.rsplit_once(" for key `")
                    .map(|(_, k)| k.trim_end_matches('`'))
            });
        let what = what.rsplit_once(" for key `").map_or(what, |(w, _)| w);
        let key_line = key
            .and_then(|key| {
                text.lines().position(|l| {
                    l.trim_start()
                        .strip_prefix(key)
                        .is_some_and(|after| after.trim_start().starts_with('='))
                })
            })
            .map(|index| index + 1);
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
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir().join(format!("hookrunner-{uid}"))
}

/// Parses `500ms`, `30s`, `5m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || {
        format!(
            "invalid duration {text:?}: write a whole number and a unit, e.g. 500ms, 30s, 5m, 1h"
        )
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(bad()),
    }
    .ok_or_else(bad)?;
    Ok(Duration::from_millis(ms))
}

/// Parses a byte size: `1048576`, `512B`, `16KiB`, `10MiB`, `1GiB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || {
        format!("invalid size {text:?}: write a whole number and B, KiB, MiB or GiB, e.g. 10MiB")
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        _ => return Err(bad()),
    };
    n.checked_mul(1 << shift).ok_or_else(bad)
}

struct DurationValue(Duration);
struct SizeValue(u64);
struct Count(usize);
struct ListenValue(Listen);
struct SourceValue(Source);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text)
            .map(DurationValue)
            .map_err(de::Error::custom)
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
        let n = u64::deserialize(d)?;
        match usize::try_from(n) {
            Ok(n) if (1..=65_536).contains(&n) => Ok(Count(n)),
            _ => Err(de::Error::custom(format!(
                "{n} is out of range: use a whole number from 1 to 65536"
            ))),
        }
    }
}

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = u64;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size in bytes, or a string such as \"10MiB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
                Ok(v)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
                u64::try_from(v).map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
                parse_size(v).map_err(E::custom)
            }
        }
        d.deserialize_any(SizeVisitor).map(SizeValue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in [
            "",
            "30",
            "s",
            "1.5s",
            "-1s",
            "30 sec",
            "99999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("16KiB"), Ok(16 << 10));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        for bad in ["", "10MB", "ten", "1.5MiB", "18446744073709551615GiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
    }

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
        for bad in ["8080", "localhost", ":80", "unix:rel.sock", "host:99999"] {
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
        assert!(err.starts_with("h.toml:3: invalid duration"), "{err}");
    }
}
