//! The operator's tools beside the daemon: `get` (values from a payload file, for scripts), `send`
//! (realistic test events, signed as a sender would), `check --payload` (a dry run that explains routing).
//! Each command's logic is pure and unit-tested in its module; this file holds their arguments (clap `Args`,
//! joined into the one definition in `cli`, which has their help texts) and runs them.

pub mod explain;
pub mod get;
pub mod http;
pub mod https;
pub mod samples;
pub mod send;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use crate::config::{Config, Listen, Overrides};
use crate::document::Format;

/// sysexits.h: bad usage, bad configuration (as in `cli`).
const EX_USAGE: u8 = 64;
const EX_CONFIG: u8 = 78;

/// `hookrunner get`'s arguments (its help is in `cli`).
#[derive(Args, Debug)]
pub struct GetArgs {
    /// The payload file
    pub file: PathBuf,
    /// Paths to read; with --shell, NAME=/path names the variable (else the path's last name)
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<String>,
    /// Print this for a path that is not there, instead of failing
    #[arg(long, value_name = "VALUE")]
    pub default: Option<String>,
    /// Print each value as JSON (objects and arrays whole)
    #[arg(long, conflicts_with = "shell")]
    pub json: bool,
    /// Print NAME='value' lines to eval in a shell script
    #[arg(long)]
    pub shell: bool,
    /// The body's format, whatever HOOKRUNNER_CONTENT_TYPE says (without it: that variable, else the
    /// body's first character)
    #[arg(long, value_parser = parse_format)]
    pub format: Option<Format>,
}

fn parse_format(text: &str) -> Result<Format, String> {
    match text {
        "json" => Ok(Format::Json),
        "xml" => Ok(Format::Xml),
        "form" => Ok(Format::Form),
        _ => Err("use json, xml or form".into()),
    }
}

pub fn run_get(args: GetArgs) -> ExitCode {
    let body = match std::fs::read(&args.file) {
        Ok(body) => body,
        Err(e) => {
            eprintln!("hookrunner get: {}: {e}", args.file.display());
            return ExitCode::from(get::exit::UNREADABLE);
        }
    };
    let content_type = std::env::var("HOOKRUNNER_CONTENT_TYPE").ok();
    let mut payload = match get::Payload::parse(body, args.format, content_type.as_deref()) {
        Ok(payload) => payload,
        Err(e) => {
            eprintln!("hookrunner get: {}: {}", args.file.display(), e.0);
            return ExitCode::from(get::exit::UNPARSEABLE);
        }
    };
    let mut out = String::new();
    let mut missing = Vec::new();
    for spec in &args.paths {
        let (name, path) = if args.shell {
            match get::shell_spec(spec) {
                Ok(pair) => pair,
                Err(e) => {
                    eprintln!("hookrunner get: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            }
        } else {
            (String::new(), spec.as_str())
        };
        let found = match (payload.get(path), &args.default) {
            (Some(found), _) => found,
            (None, Some(default)) => get::Found::Scalar(default.clone()),
            (None, None) => {
                missing.push(path.to_string());
                continue;
            }
        };
        if args.shell {
            let text = get::render(&found, matches!(found, get::Found::Tree(_)));
            match get::shell_line(&name, &text) {
                Ok(line) => out.push_str(&line),
                Err(e) => {
                    eprintln!("hookrunner get: {e}");
                    return ExitCode::from(get::exit::UNPARSEABLE);
                }
            }
        } else {
            out.push_str(&get::render(&found, args.json));
        }
        out.push('\n');
    }
    if !missing.is_empty() {
        eprintln!(
            "hookrunner get: {}: no value at {}",
            args.file.display(),
            missing.join(", ")
        );
        return ExitCode::from(get::exit::NOT_FOUND);
    }
    match std::io::stdout().write_all(out.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hookrunner get: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `hookrunner send`'s arguments.
#[derive(Args, Debug)]
pub struct SendArgs {
    /// The sample's event name (github:push and gitlab:push tell the two pushes apart)
    #[arg(required_unless_present = "list")]
    pub event: Option<String>,
    /// List the samples
    #[arg(long)]
    pub list: bool,
    /// Where to post: http://HOST:PORT/path, https://HOST:PORT/path or unix:/path/to/socket (default: the
    /// configuration's listen, at the sender's path; https when it has [tls]). Without a path of its own,
    /// the sender's
    #[arg(long)]
    pub url: Option<String>,
    /// For https: the CA certificates to trust (PEM), checked with the URL's host name (default: the
    /// configuration's [tls] cert_file, trusted as the daemon's own certificate)
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// For https: a client certificate to present (PEM, with its chain), as Jamf Pro's Mutual TLS does for
    /// an mtls sender (which needs one)
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM)
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Jamf's body shape
    #[arg(long, default_value = "json", value_parser = ["json", "xml"])]
    pub format: String,
    /// Authenticate as this [[sender]] profile of the configuration
    #[arg(long, value_name = "NAME")]
    pub sender: Option<String>,
    /// Set a field of the sample before sending, e.g. --set /event/deviceName=Lab-01 (repeatable)
    #[arg(long, value_name = "/PATH=VALUE", value_parser = send::parse_set)]
    pub set: Vec<(String, String)>,
    /// How many to send
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// How fast, in requests per second (e.g. 5/s)
    #[arg(long, value_parser = send::parse_rate)]
    pub rate: Option<std::time::Duration>,
    /// Configuration file (default /etc/hookrunner/hookrunner.toml if it exists, else built-in defaults)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// How long `send` waits for an answer: longer than any script may run by default.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

pub fn run_send(args: SendArgs) -> ExitCode {
    // Written, not printed: a reader that goes away (`| head -1`) must not end the sends with a panic.
    let mut out = std::io::stdout();
    if args.list {
        for sample in samples::SAMPLES {
            let formats = if sample.origin == samples::Origin::Jamf {
                "json, xml"
            } else {
                "json"
            };
            // GitHub's and GitLab's push share a name: `gitlab:push` names GitLab's.
            let name = match sample.origin {
                samples::Origin::Gitlab => format!("gitlab:{}", sample.event),
                _ => sample.event.to_string(),
            };
            let _ = writeln!(out, "{name:<40} {:<12} {formats}", sample.origin.name());
        }
        return ExitCode::SUCCESS;
    }
    let event = args.event.as_deref().unwrap_or_default();
    let Some(sample) = samples::find(event) else {
        eprintln!("hookrunner send: no sample for {event:?}: `hookrunner send --list` lists them");
        return ExitCode::from(EX_USAGE);
    };
    let xml = args.format == "xml";
    if xml && sample.origin != samples::Origin::Jamf {
        eprintln!("hookrunner send: {} sends JSON only", sample.origin.name());
        return ExitCode::from(EX_USAGE);
    }
    // The configuration is read only when it is needed: for the sender's secrets or the daemon's address.
    // Without any configuration file the daemon listens where the defaults say, and so does send.
    let no_file =
        args.config.is_none() && !std::path::Path::new(crate::config::DEFAULT_CONFIG).exists();
    // An https URL without --cacert trusts the configuration's certificate.
    let https_url = args
        .url
        .as_deref()
        .is_some_and(|u| u.starts_with("https://"));
    let config = if args.sender.is_some()
        || (args.url.is_none() && !no_file)
        || (https_url && args.cacert.is_none())
    {
        match Config::load(args.config.as_deref(), &Overrides::default()) {
            Ok(config) => Some(config),
            Err(e) => {
                eprintln!("hookrunner send: {e}");
                return ExitCode::from(EX_CONFIG);
            }
        }
    } else {
        None
    };
    let sender = match (&args.sender, &config) {
        (Some(name), Some(config)) => match config.senders.senders.iter().find(|s| &s.name == name)
        {
            Some(sender) => Some(sender),
            None => {
                eprintln!("hookrunner send: the configuration has no [[sender]] named {name:?}");
                return ExitCode::from(EX_CONFIG);
            }
        },
        _ => None,
    };
    // A bare `push` is GitHub's, unless the sender is a GitLab one: then it means GitLab's.
    let sample = match sender.map(|s| &s.scheme) {
        Some(crate::auth::Scheme::Gitlab(_)) if !event.contains(':') => {
            samples::find(&format!("gitlab:{event}")).unwrap_or(sample)
        }
        _ => sample,
    };
    // An mtls profile's credential is the client certificate: without one the request could only be
    // refused, with a bare 401.
    let mtls = sender.filter(|s| matches!(s.scheme, crate::auth::Scheme::Mtls { .. }));
    if let (Some(sender), None) = (mtls, &args.cert) {
        eprintln!(
            "hookrunner send: sender {:?} is mtls: give --cert FILE --key FILE, the client certificate \
             it presents",
            sender.name
        );
        return ExitCode::from(EX_USAGE);
    }
    let url = match (&args.url, &config) {
        // A URL without a path of its own goes to the sender's path, as without --url.
        (Some(text), _) => http::Url::parse(text).map(|mut url| {
            match sender {
                Some(sender) if !http::Url::names_target(text) => url.target = sender.path.clone(),
                _ => {}
            }
            url
        }),
        (None, Some(config)) => send::default_url(
            &config.listen,
            sender.map_or("/", |s| s.path.as_str()),
            config.tls.is_some(),
        ),
        (None, None) => Listen::parse(crate::config::DEFAULT_LISTEN)
            .and_then(|l| send::default_url(&l, "/", false)),
    };
    let url = match url {
        Ok(url) => url,
        Err(e) => {
            eprintln!("hookrunner send: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if (args.cacert.is_some() || args.cert.is_some()) && !url.secure {
        // Whoever gives CAs or a certificate expects TLS: a sender's credentials must not go out in the
        // clear instead.
        eprintln!(
            "hookrunner send: --cacert and --cert are for an https URL, and {} is not one",
            url_text(&url)
        );
        return ExitCode::from(EX_USAGE);
    }
    let identity = || {
        args.cert
            .as_deref()
            .zip(args.key.as_deref())
            .map(|(cert_file, key_file)| https::Identity {
                cert_file,
                key_file,
            })
    };
    let tls = if url.secure {
        let trust = match (&args.cacert, config.as_ref().and_then(|c| c.tls.as_ref())) {
            (Some(cas), _) => https::Client::with_cas(cas, url.host_name(), identity()),
            (None, Some(tls)) => https::Client::pinned(&tls.cert_file, url.host_name(), identity()),
            (None, None) => Err("an https URL needs --cacert FILE (the CAs to trust), or a \
                                 configuration whose [tls] cert_file is that daemon's certificate"
                .to_string()),
        };
        match trust {
            Ok(client) => Some(client),
            Err(e) => {
                eprintln!("hookrunner send: {e}");
                return ExitCode::from(EX_USAGE);
            }
        }
    } else {
        None
    };
    let mut random = samples::Random::new();
    let mut all_ok = true;
    for n in 0..args.count {
        if n > 0 {
            if let Some(pause) = args.rate {
                std::thread::sleep(pause);
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut body = samples::fresh(sample, now.as_millis() as u64, &mut random);
        for (path, value) in &args.set {
            if let Err(e) = samples::set(&mut body, path, value) {
                eprintln!("hookrunner send: {e}");
                return ExitCode::from(EX_USAGE);
            }
        }
        let bytes = if xml {
            samples::jamf_xml(&body).into_bytes()
        } else {
            format!("{body:#}\n").into_bytes()
        };
        let mut headers = samples::headers(sample, xml);
        if let Some(sender) = sender {
            headers.extend(send::sign(
                &sender.scheme,
                &bytes,
                now.as_secs() as i64,
                &mut random,
            ));
        }
        let request = match http::request(&url, &url.target, &headers, &bytes) {
            Ok(request) => request,
            Err(e) => {
                eprintln!("hookrunner send: {e}");
                return ExitCode::from(EX_CONFIG);
            }
        };
        match http::exchange(&url, &request, SEND_TIMEOUT, tls.as_ref()) {
            Ok(answer) => {
                all_ok &= (200..300).contains(&answer.status);
                let _ = writeln!(
                    out,
                    "{} {event} -> HTTP {} request_id={}",
                    sample.origin.name(),
                    answer.status,
                    answer.header("X-Request-Id").unwrap_or("-")
                );
                let _ = writeln!(out, "{}", String::from_utf8_lossy(&answer.body).trim_end());
            }
            Err(e) => {
                eprintln!("hookrunner send: {}: {e}", url_text(&url));
                all_ok = false;
            }
        }
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn url_text(url: &http::Url) -> String {
    match &url.transport {
        http::Transport::Tcp(_) => format!(
            "{}://{}{}",
            if url.secure { "https" } else { "http" },
            url.host,
            url.target
        ),
        http::Transport::Unix(path) => format!("unix:{}", path.display()),
    }
}

/// `hookrunner check --payload`: the request to explain (`--config` and `--scripts-dir` are `check`'s own).
#[derive(Args, Debug)]
pub struct DryRunArgs {
    /// Explain what would happen to a POST of this body, instead of printing the routing table
    #[arg(long, value_name = "FILE")]
    pub payload: Option<PathBuf>,
    /// With --payload: a request header, 'Name: value' (repeatable)
    #[arg(long, value_name = "'NAME: VALUE'", value_parser = parse_header, requires = "payload")]
    pub header: Vec<(String, String)>,
    /// With --payload: the request's path and query
    #[arg(long, default_value = "/", requires = "payload")]
    pub path: String,
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once(':') {
        Some((name, value)) if !name.trim().is_empty() && !name.contains(' ') => {
            Ok((name.trim().to_string(), value.trim().to_string()))
        }
        _ => Err(format!("{text:?}: write 'Name: value'")),
    }
}

/// `check` run as root is not the daemon: scripts are checked for the daemon's user instead, taken to be
/// the owner of `state_dir` when that is not root (the package's `hookrunner`, which the unit runs as).
/// Returns the line that says whom scripts are checked for when run as root, `None` otherwise.
pub fn judge_as_daemon(config: Option<&Path>) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    if !rustix::process::geteuid().is_root() {
        return None;
    }
    // Said too when it cannot be told: a 750 script of root's passes for root, not for the daemon.
    let as_root = |why: String| Some(format!("# scripts checked for root: {why}"));
    let Ok(store) = Config::load_store(config) else {
        return as_root("its state_dir, which tells the daemon's user, could not be read from the configuration".into());
    };
    let state_dir = store.state_dir;
    let meta = match std::fs::metadata(&state_dir) {
        Ok(meta) if meta.uid() != 0 => meta,
        Ok(_) => return as_root(format!("state_dir {} is root's", state_dir.display())),
        Err(e) => return as_root(format!("state_dir {}: {e}", state_dir.display())),
    };
    let (name, mut gids) = user_groups(meta.uid())
        .unwrap_or_else(|| (format!("uid {}", meta.uid()), vec![meta.gid()]));
    // The unit's Group= (the package's hookrunner) is state_dir's group, whatever passwd says: a user
    // made by hand has nogroup there.
    if !gids.contains(&meta.gid()) {
        gids.push(meta.gid());
    }
    crate::routes::judge_as(meta.uid(), gids).then(|| {
        format!(
            "# scripts checked for the daemon's user {name} (uid {}), the owner of state_dir {}",
            meta.uid(),
            state_dir.display()
        )
    })
}

/// The name and the groups (primary and supplementary) of the user `uid`, from the system's user database
/// (NSS, so LDAP or sssd users too).
fn user_groups(uid: u32) -> Option<(String, Vec<u32>)> {
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: `passwd` is plain old data; all zeroes is a valid value that getpwuid_r overwrites.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is to live memory of the size given; on success `found` points to `pwd`, whose
    // strings point into `buf`.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() {
        return None;
    }
    // SAFETY: a successful getpwuid_r leaves a NUL-terminated name in `buf`, which is still alive.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) }.to_owned();
    let mut room: libc::c_int = 64;
    while room <= 1 << 16 {
        let mut groups = vec![0 as libc::gid_t; room as usize];
        let mut n = room;
        // SAFETY: `groups` has room for `n` entries; getgrouplist writes at most that many, and sets `n` to
        // how many there are.
        let rc =
            unsafe { libc::getgrouplist(name.as_ptr(), pwd.pw_gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n.max(0) as usize);
            return Some((name.to_string_lossy().into_owned(), groups));
        }
        room = n.max(room * 2);
    }
    None
}

/// `check --payload FILE`: explains what the daemon would do with a POST of FILE.
pub fn run_check_payload(
    config: Option<&Path>,
    overrides: &Overrides,
    payload: &Path,
    args: DryRunArgs,
) -> ExitCode {
    judge_as_daemon(config);
    let config = match Config::load(config, overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("hookrunner: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let body = match std::fs::read(payload) {
        Ok(body) => body,
        Err(e) => {
            eprintln!("hookrunner check: {}: {e}", payload.display());
            return ExitCode::FAILURE;
        }
    };
    if !args.path.starts_with('/') {
        eprintln!(
            "hookrunner check: --path {:?} must start with '/'",
            args.path
        );
        return ExitCode::from(EX_USAGE);
    }
    let request = explain::DryRequest {
        target: args.path,
        headers: args.header,
        body,
        now: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
    };
    let explanation = explain::explain(&config, &request);
    print!("{}", explanation.text);
    if explanation.runs {
        println!("# nothing was run");
        ExitCode::SUCCESS
    } else {
        println!("# the request would be refused; nothing was run");
        ExitCode::FAILURE
    }
}
