//! The daemon's life: load the configuration, bind (or take systemd's socket), serve, reload on SIGHUP,
//! drain and stop on SIGTERM/SIGINT, telling systemd each step (see `systemd.rs`).

use std::io;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGXFSZ};

use crate::config::{Config, ConfigError, Overrides};
use crate::dispatch::{Bell, Dispatcher};
use crate::gateway::Gateway;
use crate::http::{self, Control, Handler, Limits, Listener, Request, Response};
use crate::payload::PayloadDir;
use crate::runner::{Limiter, Runner};
use crate::store;
use crate::systemd;

/// How often a running daemon looks at its TLS certificate's end of validity.
const EXPIRY_CHECK: Duration = Duration::from_secs(24 * 3600);

/// Why the daemon could not run.
#[derive(Debug)]
pub enum Error {
    Config(ConfigError),
    Start(String, io::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Config(e) => write!(f, "{e}"),
            Error::Start(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

pub fn serve(config_path: Option<PathBuf>, mut overrides: Overrides) -> Result<(), Error> {
    close_inherited_on_exec();
    // Sockets systemd passed that hookrunner cannot serve (more than one, one not listening, not a
    // stream) are what the socket unit says, and a restart gets the same: a configuration error (78),
    // which the service unit does not restart.
    let passed_error = |what: &str, e: io::Error| match e.kind() {
        io::ErrorKind::InvalidInput => {
            Error::Config(ConfigError::new(None, None, format!("{what}: {e}")))
        }
        _ => Error::Start(what.into(), e),
    };
    // First, while no other thread exists: it edits the environment.
    let passed =
        systemd::take_listen_fd().map_err(|e| passed_error("socket activation (LISTEN_FDS)", e))?;
    // A socket systemd passed wins over `listen` (its unit, not our file, says where to listen), and is
    // loaded as the `listen` value, so that the configuration is checked against where it really listens.
    let passed = match passed {
        Some(fd) => {
            let listener =
                Listener::from_fd(fd).map_err(|e| passed_error("the socket systemd passed", e))?;
            overrides.listen = Some(
                listener
                    .bound()
                    .map_err(|e| Error::Start("the socket systemd passed".into(), e))?,
            );
            Some(listener)
        }
        None => None,
    };
    // Under a file-size limit (`LimitFSIZE=`, `ulimit -f`) a write past it raises SIGXFSZ, whose default
    // action ends the process without a word: with a handler the write fails with EFBIG instead, so a
    // payload written past it is that request's 500, and a store that cannot grow at start is an error
    // that says so. Handled before anything is opened. Scripts get the default action back at exec, as
    // with any handled signal.
    signal_hook::flag::register(SIGXFSZ, Arc::new(AtomicBool::new(false)))
        .map_err(|e| Error::Start("signal handlers".into(), e))?;
    let config = Config::load(config_path.as_deref(), &overrides).map_err(|mut e| {
        if passed.is_some() {
            // The override's error names `--listen`; here it was the socket unit's ListenStream=.
            if let Some(rest) = e.message.strip_prefix("--listen: ") {
                e.message = format!("the socket systemd passed (ListenStream=): {rest}");
            }
        }
        Error::Config(e)
    })?;
    // A reload reads the file this start read. Without --config that was /etc/hookrunner/hookrunner.toml
    // if it existed; should it be gone at a reload (moved aside mid-edit, a package tool's rename), the
    // built-in defaults would drop every sender and trusted proxy and serve unauthenticated. Pinned, its
    // absence is a failed reload that keeps the configuration in force.
    let config_path = config.source.clone();
    open_log_file(&config)?;
    // The store first: its checks refuse a state_dir of another user's (a `sudo hookrunner serve` beside
    // the service) before the payload directory, often inside it, is made, as that user could not use it.
    let (store, waiting) = open_store(&config)?;
    let (payloads, stale) = PayloadDir::open(&config.payload_dir).map_err(|e| {
        // Another user's directory, or one holding files not ours: only the operator can mend it.
        if e.kind() == io::ErrorKind::InvalidInput {
            Error::Config(ConfigError::new(
                None,
                None,
                format!("payload directory: {e}"),
            ))
        } else {
            Error::Start("payload directory".into(), e)
        }
    })?;
    let runner = Runner::new().map_err(|e| Error::Start("script runner".into(), e))?;
    let listener = match passed {
        Some(listener) => listener,
        None => Listener::bind(&config.listen)
            .map_err(|e| Error::Start(format!("cannot listen on {}", config.listen), e))?,
    };
    let limits = Limits {
        max_connections: config.max_connections,
        max_header_bytes: config.max_header_bytes,
        header_timeout: config.header_timeout,
        keepalive_timeout: config.keepalive_timeout,
    };
    let (wake, waker) = UnixStream::pair().map_err(|e| Error::Start("signal pipe".into(), e))?;
    let stop = Arc::new(AtomicBool::new(false));
    let reload = Arc::new(AtomicBool::new(false));
    // The dispatcher's own stop: set by SIGTERM/SIGINT themselves, not only once the accept loop wakes, so
    // that a run killed along with the daemon is seen as the stop's doing (dispatch.rs), and later by the
    // accept loop when the store breaks.
    let dispatching = Arc::new(AtomicBool::new(false));
    register_signals(&waker, &[&stop, &dispatching], &reload)
        .map_err(|e| Error::Start("signal handlers".into(), e))?;
    // Logged first (README): whoever started us (a test, a supervisor) reads the bound address from it.
    log::info!("listening on {}", listener.local_addr());
    if stale > 0 {
        log::warn!(
            "removed {stale} stale payload file(s) from {}",
            payloads.path().display()
        );
    }
    log::info!(
        "{} route(s) from {}; scripts in {}; payloads in {}",
        config.routes.routes.len(),
        config.routes.source.as_ref().map_or_else(
            || "the embedded default".to_string(),
            |p| p.display().to_string()
        ),
        config.scripts_dir.display(),
        payloads.path().display()
    );
    announce_senders(&config);
    if let Some(waiting) = waiting {
        log::info!(
            "store in {}: {waiting} queued deliver{} to run",
            config.store.state_dir.display(),
            if waiting == 1 { "y" } else { "ies" }
        );
    }
    let limiter = Arc::new(Limiter::new(config.max_running));
    let payloads = Arc::new(payloads);
    let bell = Arc::new(Bell::default());
    if let Some(tls) = &config.tls {
        log::info!(
            "TLS with the certificate {} and key {}; client certificates: {}",
            tls.cert_file.display(),
            tls.key_file.display(),
            tls.client_ca_file.as_ref().map_or_else(
                || "not asked for".to_string(),
                |ca| format!("asked for, verified against {}", ca.display())
            )
        );
    }
    let tls = config
        .tls
        .as_ref()
        .map(|t| http::TlsConfig::new(Arc::clone(&t.server)));
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .map_err(|e| Error::Start(format!("cannot listen for metrics on {addr}"), e))?,
        ),
        None => None,
    };
    let gateway = Arc::new(Gateway::new(
        config,
        Arc::clone(&payloads),
        runner,
        Arc::clone(&limiter),
        store.clone(),
        Arc::clone(&bell),
    ));
    if let Some(listener) = metrics_listener {
        if let Ok(addr) = listener.local_addr() {
            log::info!("metrics on http://{addr}/metrics");
        }
        let metrics = gateway.metrics();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || crate::metrics::serve(listener, metrics))
            .map_err(|e| Error::Start("metrics thread".into(), e))?;
    }
    // A renewal that stopped working sends no SIGHUP, so no reload would warn of the certificate's end:
    // it is looked at daily too.
    if gateway.config().tls.is_some() {
        let gateway = Arc::clone(&gateway);
        std::thread::Builder::new()
            .name("tls-expiry".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(EXPIRY_CHECK);
                    let config = gateway.config();
                    if let Some(warning) = config.tls.as_ref().and_then(|t| t.expiry_warning_now())
                    {
                        log::warn!("{warning}");
                    }
                }
            })
            .map_err(|e| Error::Start("certificate expiry thread".into(), e))?;
    }
    let dispatcher = match &store {
        Some(store) => Some(start_dispatcher(Dispatcher {
            store: Arc::clone(store),
            limiter,
            payloads,
            runner: Runner::new().map_err(|e| Error::Start("script runner".into(), e))?,
            config: {
                let gateway = Arc::clone(&gateway);
                Box::new(move || gateway.config())
            },
            bell: Arc::clone(&bell),
            metrics: gateway.metrics(),
            stop: Arc::clone(&dispatching),
            waker: waker
                .try_clone()
                .map_err(|e| Error::Start("signal pipe".into(), e))?,
        })?),
        None => None,
    };
    let broken = || store.as_ref().is_some_and(|s| s.broken());
    let counted = Arc::new(Counted {
        gateway: Arc::clone(&gateway),
        addr: listener.local_addr(),
        served: AtomicU64::new(0),
        last_status: Mutex::new(Instant::now()),
    });
    systemd::ready(&counted.status());
    let handler: Arc<dyn Handler> = counted.clone();
    let mut stopping = false;
    let served = http::serve(listener, limits, handler, tls.clone(), &wake, || {
        if reload.swap(false, Ordering::SeqCst) {
            systemd::reloading();
            reload_config(&gateway, tls.as_ref(), config_path.as_deref(), &overrides);
            // READY=1 also after a failed reload: the old configuration is still serving.
            systemd::ready(&counted.status());
        }
        if stop.load(Ordering::SeqCst) || broken() {
            if !stopping {
                stopping = true;
                systemd::stopping();
                // No queued run starts from now on, not only once the open requests are answered: a sync
                // script still running would otherwise keep the dispatcher starting runs until it ends.
                dispatching.store(true, Ordering::SeqCst);
                bell.ring();
            }
            Control::Stop
        } else {
            Control::Continue
        }
    });
    // Queued deliveries: start no new run, let the running ones end, leave the rest in the store. (Said
    // at the stop above already; again here for an accept loop that ended by itself.)
    dispatching.store(true, Ordering::SeqCst);
    bell.ring();
    if let Some(dispatcher) = dispatcher {
        let _ = dispatcher.join();
    }
    // History rows still gathering in the writer would die with the process.
    if let Some(store) = &store {
        store.flush();
    }
    served.map_err(|e| Error::Start("accept loop".into(), e))?;
    if broken() {
        return Err(Error::Start(
            "store".into(),
            io::Error::other("the store failed (see above); stopped for the supervisor to restart"),
        ));
    }
    log::info!("stopped");
    Ok(())
}

/// The store, when anything needs it: an async route, the history of sync ones, or entries acknowledged
/// earlier that still wait (a route since made sync, with `history = false`: they were promised a run).
/// Entries a crash left running are queued again before anything is served; returns how many entries wait.
fn open_store(config: &Config) -> Result<(Option<store::Shared>, Option<u64>), Error> {
    let settings = &config.store;
    let needed = settings.history || any_async(config);
    if !opens_store(config) {
        return Ok((None, None));
    }
    // A configuration error (78), as `check` reports it: restarting cannot mend it.
    let euid = rustix::process::geteuid().as_raw();
    store::check_private(&settings.state_dir, Some(euid))
        .map_err(|e| Error::Config(ConfigError::new(None, None, format!("state_dir: {e}"))))?;
    // A database a newer hookrunner made stays newer, a damaged one damaged, a read-only file system
    // read-only: a configuration error (78), not restarted.
    let store = store::open_serving(&settings.state_dir).map_err(|e| match e {
        store::OpenError::Newer(m) | store::OpenError::Unusable(m) => {
            Error::Config(ConfigError::new(None, None, m))
        }
        store::OpenError::Other(m) => Error::Start("store".into(), io::Error::other(m)),
    })?;
    let waiting = store
        .recover()
        .map_err(|e| Error::Start("store".into(), io::Error::other(e)))?;
    if !needed {
        if waiting == 0 {
            return Ok((None, None));
        }
        log::warn!(
            "no route is async and history = false, but {waiting} acknowledged deliver{} from before still \
             wait{} in the store: the store stays open to run them",
            if waiting == 1 { "y" } else { "ies" },
            if waiting == 1 { "s" } else { "" }
        );
    }
    Ok((Some(store), Some(waiting)))
}

/// Whether `serve` opens the store: something needs it (see [`open_store`]), or one is there already.
pub fn opens_store(config: &Config) -> bool {
    config.store.history
        || any_async(config)
        || config.store.state_dir.join(store::DATABASE).exists()
}

/// Whether any request may be queued: `async = true`, or a route with the `async` option.
fn any_async(config: &Config) -> bool {
    config.store.run_async
        || config
            .routes
            .routes
            .iter()
            .any(|r| r.options.queueing.run_async == Some(true))
}

fn start_dispatcher(dispatcher: Dispatcher) -> Result<std::thread::JoinHandle<()>, Error> {
    std::thread::Builder::new()
        .name("hookrunner-dispatch".into())
        .spawn(move || dispatcher.run())
        .map_err(|e| Error::Start("dispatcher".into(), e))
}

/// Says at every start (and reload) who may run scripts: the senders, or that anyone who can connect may.
fn announce_senders(config: &Config) {
    for warning in &config.warnings {
        log::warn!("{warning}");
    }
    // Reachable from this machine alone: a loopback address or a unix socket no proxy forwards to.
    let local = config.listen.is_local() && config.trusted_proxies.is_empty();
    if !config.senders.is_empty() {
        let names: Vec<&str> = config
            .senders
            .senders
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        log::info!("{} sender(s): {}", names.len(), names.join(", "));
        if let Some(open) = config.senders.open().filter(|_| !local) {
            log::warn!(
                "open: sender {:?} is type \"none\" without allow_ips and allow_unauthenticated = true: anyone \
                 who can reach {} can run the scripts under {}",
                open.name,
                config.listen,
                open.path
            );
        }
    } else if local {
        log::info!(
            "open: no sender is configured, so every request is accepted; it listens on {} only, \
             reachable from this machine alone",
            if matches!(config.listen, crate::config::Listen::Unix(_)) {
                "a unix socket"
            } else {
                "loopback"
            }
        );
    } else {
        log::warn!(
            "open: no sender is configured and allow_unauthenticated = true: anyone who can reach {} can run \
             the scripts",
            config.listen
        );
    }
}

/// The gateway, counting what it served for systemd's `STATUS=` line (what `systemctl status` shows).
struct Counted {
    gateway: Arc<Gateway>,
    addr: String,
    served: AtomicU64,
    /// When the last `STATUS=` was sent: at most one a second, so a busy daemon does not pay a datagram
    /// per request.
    last_status: Mutex<Instant>,
}

impl Counted {
    fn status(&self) -> String {
        format!(
            "{} route(s) loaded; {} request(s) served; listening on {}",
            self.gateway.config().routes.routes.len(),
            self.served.load(Ordering::Relaxed),
            self.addr
        )
    }
}

impl Handler for Counted {
    fn max_body(&self) -> u64 {
        self.gateway.max_body()
    }

    fn handle(&self, request: &mut Request<'_>) -> Response {
        let response = self.gateway.handle(request);
        self.served.fetch_add(1, Ordering::Relaxed);
        // try_lock: a worker that would wait for another's update skips its own.
        if let Ok(mut last) = self.last_status.try_lock() {
            if last.elapsed() >= Duration::from_secs(1) {
                *last = Instant::now();
                systemd::status(&self.status());
            }
        }
        response
    }
}

fn open_log_file(config: &Config) -> Result<(), Error> {
    crate::logging::use_file(config.log_file.as_deref()).map_err(|e| {
        let path = config
            .log_file
            .as_deref()
            .unwrap_or(std::path::Path::new(""));
        Error::Start(format!("log_file {}", path.display()), e)
    })
}

/// Flags first, then the wake-up write: signal-hook runs actions in registration order, so the accept loop
/// always sees the flag set when it wakes.
fn register_signals(
    waker: &UnixStream,
    stop: &[&Arc<AtomicBool>],
    reload: &Arc<AtomicBool>,
) -> io::Result<()> {
    for flag in stop {
        signal_hook::flag::register(SIGTERM, Arc::clone(flag))?;
        signal_hook::flag::register(SIGINT, Arc::clone(flag))?;
    }
    signal_hook::flag::register(SIGHUP, Arc::clone(reload))?;
    for signal in [SIGTERM, SIGINT, SIGHUP] {
        signal_hook::low_level::pipe::register(signal, waker.try_clone()?)?;
    }
    Ok(())
}

/// Opens `log_file` again (a new file, if logrotate renamed the old one), or keeps logging where it did.
fn reopen_log(log_file: Option<&std::path::Path>) {
    if let Err(e) = crate::logging::use_file(log_file) {
        log::error!("reload: cannot open log_file: {e}; logging where it did before");
    }
}

fn reload_config(
    gateway: &Gateway,
    tls: Option<&http::TlsConfig>,
    path: Option<&std::path::Path>,
    overrides: &Overrides,
) {
    let old = gateway.config();
    let mut new = match Config::load(path, overrides) {
        Ok(new) => new,
        Err(e) => {
            // The log is reopened all the same: logrotate renamed it and sent this signal, whatever the
            // state of the configuration, and must not find the daemon still writing to the renamed file.
            reopen_log(old.log_file.as_deref());
            log::error!("reload failed; still serving with the previous configuration: {e}");
            return;
        }
    };
    if let (Some(gone), None) = (&old.routes.source, &new.routes.source) {
        reopen_log(old.log_file.as_deref());
        // The routes file beside the configuration is missing now (renamed away by an editor or a tool
        // mid-edit, or moved aside): falling back to the embedded `* {event}` would widen what runs, from
        // the scripts the file named to any script named like an event, without a word.
        log::error!(
            "reload failed; still serving with the previous configuration: the routes file {} is gone \
             (the embedded default `* {{event}}` is used only at start)",
            gone.display()
        );
        return;
    }
    let fixed = [
        ("listen", old.listen.to_string() != new.listen.to_string()),
        ("payload_dir", old.payload_dir != new.payload_dir),
        ("state_dir", old.store.state_dir != new.store.state_dir),
        ("max_running", old.max_running != new.max_running),
        (
            "max_connections",
            old.max_connections != new.max_connections,
        ),
        (
            "max_header_bytes",
            old.max_header_bytes != new.max_header_bytes,
        ),
        ("header_timeout", old.header_timeout != new.header_timeout),
        // Turning TLS on or off changes what the listener speaks; a new certificate needs no restart.
        ("tls", old.tls.is_some() != new.tls.is_some()),
        (
            "keepalive_timeout",
            old.keepalive_timeout != new.keepalive_timeout,
        ),
        ("metrics_listen", old.metrics_listen != new.metrics_listen),
    ];
    // The socket stays where it is until a restart, so the new senders are judged against it: a reload
    // that moves `listen` to loopback and drops the last sender must not leave a public socket open.
    new.listen = old.listen.clone();
    if let Some(message) = crate::config::open_to_anyone(
        &new.listen,
        &new.senders,
        &new.trusted_proxies,
        new.allow_unauthenticated,
    ) {
        reopen_log(old.log_file.as_deref());
        log::error!(
            "reload failed; still serving with the previous configuration: {message} (the address \
             served until a restart)"
        );
        return;
    }
    // Reopened whether or not the path changed: after logrotate renamed it, this makes a new file.
    reopen_log(new.log_file.as_deref());
    for (key, changed) in fixed {
        if changed {
            log::warn!("reload: a change to {key} takes effect only after a restart");
        }
    }
    if let (Some(live), Some(new_tls)) = (tls, &new.tls) {
        live.replace(Arc::clone(&new_tls.server));
        log::info!(
            "reloaded the TLS certificate from {} for new connections",
            new_tls.cert_file.display()
        );
    }
    if !gateway.has_store() && any_async(&new) {
        log::warn!(
            "reload: an async route needs the store, which was not opened at start (no route was async \
             and history = false): its requests run sync until a restart"
        );
    } else if !gateway.has_store() && new.store.history {
        log::warn!(
            "reload: history = true needs the store, which was not opened at start (no route was async \
             and history = false): sync deliveries leave no row until a restart"
        );
    }
    let routes = new.routes.routes.len();
    announce_senders(&new);
    gateway.replace(new);
    // Only now: whoever reads this line may rely on the new routes being in force.
    log::info!("reloaded: {routes} route(s)");
}

/// Descriptors the daemon inherited (from a shell, a supervisor) must not reach scripts: scripts get fds 0-2
/// only. Everything the daemon opens itself is already close-on-exec (std's default).
fn close_inherited_on_exec() {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range only changes descriptor flags; it touches no memory.
    let done =
        unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC) } == 0;
    if done {
        return;
    }
    // Kernels before 5.11: mark each open descriptor by hand.
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: setting FD_CLOEXEC on a descriptor number; a stale number fails harmlessly with EBADF.
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}
