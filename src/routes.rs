//! The routing table: which script runs for which event.
//!
//! The file is line-based: `EVENT-PATTERN SCRIPT [OPTION ...]`, `#` starts a comment, a token may contain
//! double-quoted parts (`/event/deviceName="Charly's iMac"`) with `\"` and `\\` escapes. The first line whose
//! pattern matches the event (ASCII case-insensitively), whose field filters all hold and whose script exists,
//! wins. Parsing is pure ([`parse_lines`]); checking the scripts on disk is a second step.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::event::Source;
use crate::units::{Quantity, Range, parse_duration};

/// The placeholder for the event name in a SCRIPT.
const EVENT_PLACEHOLDER: &str = "{event}";

/// A `*`/`?` glob. Event patterns compare ASCII case-insensitively, field filters exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    pattern: String,
    ignore_case: bool,
}

impl Glob {
    pub fn new(pattern: &str, ignore_case: bool) -> Glob {
        Glob {
            pattern: pattern.to_string(),
            ignore_case,
        }
    }

    /// Iterative matcher over characters (`?` is one character, not one byte) with single-star
    /// backtracking: at most pattern × text steps, never exponential.
    pub fn matches(&self, text: &str) -> bool {
        let eq = |a: char, b: char| {
            if self.ignore_case {
                a.eq_ignore_ascii_case(&b)
            } else {
                a == b
            }
        };
        let p = self.pattern.as_str();
        // Byte offsets into `p` and `text`, always on character boundaries.
        let (mut pi, mut ti) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while let Some(t) = text[ti..].chars().next() {
            match p[pi..].chars().next() {
                Some('*') => {
                    star = Some((pi, ti));
                    pi += 1;
                }
                Some(c) if c == '?' || eq(c, t) => {
                    pi += c.len_utf8();
                    ti += t.len_utf8();
                }
                _ => match star {
                    // Let the last star take one more character and try again after it.
                    Some((sp, st)) => {
                        let taken = text[st..].chars().next().map_or(1, char::len_utf8);
                        pi = sp + 1;
                        ti = st + taken;
                        star = Some((sp, ti));
                    }
                    None => return false,
                },
            }
        }
        p[pi..].chars().all(|c| c == '*')
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)
    }
}

/// A field filter: the value at `path` in the body must match `value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub path: String,
    pub value: Glob,
}

/// What a route runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    /// A script named as written: checked when the routes load, and again per request (it may have been
    /// removed or made unsafe since).
    Fixed { written: String, path: PathBuf },
    /// A path containing `{event}`, resolved per request; the line matches only if the file exists.
    Template(String),
}

/// One line of the routing file, as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub line: usize,
    pub pattern: Glob,
    pub script: String,
    pub options: RouteOptions,
}

/// How long a script may be given, as the top-level `timeout` key or a route's `timeout=`: 100ms to 24h.
/// Below 100ms a script barely starts; past a day a stuck script would go unnoticed.
pub const TIMEOUT: Range<Duration> =
    Range::new(Duration::from_millis(100), Duration::from_secs(24 * 3600));

/// How many retries a route's `retries=N` may ask for: 0 (one attempt) to 100.
pub const RETRIES: Range<usize> = Range::new(0, 100);
/// The longest pause between attempts, as `retry_max=DURATION` sets it: 100ms to 24h.
pub const RETRY_MAX: Range<Duration> =
    Range::new(Duration::from_millis(100), Duration::from_secs(24 * 3600));

/// A route's options. New options are new fields here and new keys in [`parse_option`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteOptions {
    /// `timeout=DURATION`: overrides the configured `timeout`, within the same range, [`TIMEOUT`].
    pub timeout: Option<Duration>,
    /// `sender=NAME[,NAME...]`: the line is for requests from these senders only (empty: any). The
    /// sender's `path` does not choose the route, the event does: this is what ties a line to a sender.
    pub senders: Vec<String>,
    pub filters: Vec<Filter>,
    pub queueing: Queueing,
}

/// How a route's deliveries are queued, when they are (the options after `async`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Queueing {
    /// `async` or `sync`: overrides the configuration's `async` default.
    pub run_async: Option<bool>,
    /// `ack_status=200|202`: the status an accepted async delivery is answered with (default 202; Kazoo
    /// takes anything but 200 as a failure).
    pub ack_status: Option<u16>,
    /// `retries=N`: attempts after the first (default 4, so 5 in all; range [`RETRIES`]).
    pub retries: Option<u32>,
    /// `retry_max=DURATION`: the longest pause between attempts (default 1h; range [`RETRY_MAX`]).
    pub retry_max: Option<Duration>,
    /// `serial`: this route's entries run one at a time, in arrival order.
    pub serial: bool,
    /// `dedupe_key=SOURCE` (`json:/delivery/id`, `header:NAME`, ...): where the delivery id is for a
    /// sender whose id is in the body, in place of the sender's delivery-id header. (Not Jamf's
    /// `/webhook/id`: that numbers the webhook's definition and is the same on every event.)
    pub dedupe_key: Option<Source>,
}

impl Queueing {
    /// The first option set that only an async route uses, as written.
    pub fn async_only_option(&self) -> Option<&'static str> {
        [
            (self.retries.is_some(), "retries="),
            (self.retry_max.is_some(), "retry_max="),
            (self.serial, "serial"),
            (self.dedupe_key.is_some(), "dedupe_key="),
            (self.ack_status.is_some(), "ack_status="),
        ]
        .into_iter()
        .find_map(|(set, name)| set.then_some(name))
    }
}

/// A route ready to serve.
#[derive(Debug, Clone)]
pub struct Route {
    pub line: usize,
    pub pattern: Glob,
    pub script: Script,
    pub options: RouteOptions,
}

/// The validated routing table.
#[derive(Debug)]
pub struct Routes {
    /// The file the table came from; `None` for the embedded default.
    pub source: Option<PathBuf>,
    pub routes: Vec<Route>,
    scripts_dir: PathBuf,
    /// `scripts_dir`'s device and inode when the table loaded: while its path still reaches that directory,
    /// a regular file directly in it is its own real path (see [`check_script`]).
    scripts_dir_id: Option<(u64, u64)>,
    /// The scripts lines name (resolved, with the first line naming each): such a script runs only through
    /// its lines, with their filters and options, never as an `{event}` script of another line, under any
    /// name.
    reserved: Vec<(Real, usize)>,
}

/// A directory's device and inode, following symlinks: which directory its path reaches now.
fn dir_id(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

/// Whether a glob can match some event name (letters, digits, `_`, `.`, `-`; see `event::is_valid_name`):
/// `Computer Added` or `push,ping` never can, and a line or sender limited by one is dead.
pub fn can_match_an_event(pattern: &str) -> bool {
    pattern
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.-*?".contains(&b))
}

impl Routes {
    /// What loads but can never do what it says: a pattern no event name can match, a line below a bare
    /// `*` line (whose script exists) that no request reaches, a `{event}` script in a directory that does
    /// not exist. Warnings, for `check` and each start: an upgrade must not stop a running setup.
    pub fn warnings(&self) -> Vec<String> {
        let at = |line: usize| match &self.source {
            Some(path) => format!("{}:{line}", path.display()),
            None => format!("routes:{line}"),
        };
        let mut warnings = Vec::new();
        // Loaded all the same (an empty table is valid), but a file caught mid-write looks like this.
        if self.routes.is_empty() {
            warnings.push(format!(
                "{}: no route line: every event is answered 404",
                self.source
                    .as_ref()
                    .map_or_else(|| "routes".to_string(), |p| p.display().to_string())
            ));
        }
        let mut catch_all: Option<usize> = None;
        for route in &self.routes {
            let pattern = route.pattern.to_string();
            if let Some(first) = catch_all {
                warnings.push(format!(
                    "{}: no request reaches this line: line {first} above it takes every event",
                    at(route.line)
                ));
            } else if !can_match_an_event(&pattern) {
                warnings.push(format!(
                    "{}: the pattern {pattern:?} can never match: event names hold only letters, digits, \
                     `_`, `.` and `-`",
                    at(route.line)
                ));
            }
            match &route.script {
                Script::Fixed { .. } => {
                    if pattern.bytes().all(|b| b == b'*')
                        && route.options.filters.is_empty()
                        && route.options.senders.is_empty()
                    {
                        catch_all.get_or_insert(route.line);
                    }
                }
                Script::Template(template) => {
                    let path = self.scripts_dir.join(template);
                    let dir = path.parent().unwrap_or(&self.scripts_dir);
                    if !dir.is_dir() && !dir.to_string_lossy().contains("{event}") {
                        warnings.push(format!(
                            "{}: {template} is in {}, which is not a directory: the line never matches",
                            at(route.line),
                            dir.display()
                        ));
                    }
                }
            }
        }
        warnings
    }
}

/// The script a request resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    pub line: usize,
    pub script: PathBuf,
    pub timeout: Option<Duration>,
    pub queueing: Queueing,
}

/// Why a matching route's script cannot be run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsafeScript(pub String, Public);

/// What a sender may be told of an unsafe script: its name as the route wrote it and what is wrong, without
/// the paths of this machine the operator's message names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Public(String);

impl UnsafeScript {
    /// The message for the sender (the log and `check` have the whole of it).
    pub fn public(&self) -> &str {
        &self.1.0
    }
}

/// Why a routing table cannot be loaded. It knows no file name: the configuration, which chose the file,
/// wraps it into a `file:line` error.
#[derive(Debug)]
pub enum RoutesError {
    /// The file cannot be read (`NotFound` lets the caller fall back to the embedded table).
    Read(io::Error),
    /// A line is malformed, or names a script that is missing or unsafe.
    Line { line: usize, message: String },
}

impl Routes {
    /// Whether `scripts_dir`'s path still reaches the directory it reached at load. Replaced by a symlink
    /// (it, or a directory above it), a script's path must be resolved again to be found outside it.
    fn unmoved(&self) -> bool {
        self.scripts_dir_id.is_some() && dir_id(&self.scripts_dir) == self.scripts_dir_id
    }

    pub fn load(path: &Path, scripts_dir: &Path) -> Result<Routes, RoutesError> {
        let text = fs::read_to_string(path).map_err(RoutesError::Read)?;
        Routes::parse(&text, Some(path), scripts_dir)
    }

    /// The table used when there is no routes file: `* {event}`, the script named after the event.
    pub fn embedded(scripts_dir: &Path) -> Routes {
        Routes {
            source: None,
            routes: vec![Route {
                line: 1,
                pattern: Glob::new("*", true),
                script: Script::Template(EVENT_PLACEHOLDER.to_string()),
                options: RouteOptions::default(),
            }],
            scripts_dir: scripts_dir.to_path_buf(),
            scripts_dir_id: dir_id(scripts_dir),
            reserved: Vec::new(),
        }
    }

    /// Parses `text`; `source` is the file it came from, shown by `hookrunner check`.
    pub fn parse(
        text: &str,
        source: Option<&Path>,
        scripts_dir: &Path,
    ) -> Result<Routes, RoutesError> {
        let specs =
            parse_lines(text).map_err(|(line, message)| RoutesError::Line { line, message })?;
        let mut routes = Vec::with_capacity(specs.len());
        let mut reserved: Vec<(Real, usize)> = Vec::new();
        for spec in specs {
            let script = if spec.script.contains(EVENT_PLACEHOLDER) {
                Script::Template(spec.script)
            } else {
                let path = resolve_path(scripts_dir, &spec.script);
                let real = check_script(scripts_dir, &spec.script, &path, None).map_err(|e| {
                    RoutesError::Line {
                        line: spec.line,
                        message: e.0,
                    }
                })?;
                if !reserved.iter().any(|(r, _)| r.same_file(&real)) {
                    reserved.push((real, spec.line));
                }
                Script::Fixed {
                    written: spec.script,
                    path,
                }
            };
            routes.push(Route {
                line: spec.line,
                pattern: spec.pattern,
                script,
                options: spec.options,
            });
        }
        Ok(Routes {
            source: source.map(Path::to_path_buf),
            routes,
            scripts_dir: scripts_dir.to_path_buf(),
            scripts_dir_id: dir_id(scripts_dir),
            reserved,
        })
    }

    /// Finds the route for `event`. `field` looks a path up in the request body; it is called only for
    /// routes with filters, so a body is parsed only when a route needs it.
    pub fn select<E>(
        &self,
        event: &str,
        sender: Option<&str>,
        field: impl FnMut(&str) -> Result<Option<String>, E>,
    ) -> Result<Option<Selected>, SelectError<E>> {
        self.select_explained(event, sender, field, |_, _| {})
    }

    /// [`Routes::select`], telling `skipped` each line that did not win and why (`hookrunner check
    /// --payload`).
    pub fn select_explained<E>(
        &self,
        event: &str,
        sender: Option<&str>,
        mut field: impl FnMut(&str) -> Result<Option<String>, E>,
        mut skipped: impl FnMut(usize, Skip<'_>),
    ) -> Result<Option<Selected>, SelectError<E>> {
        for route in &self.routes {
            if !route.pattern.matches(event) {
                skipped(route.line, Skip::Pattern(&route.pattern));
                continue;
            }
            let senders = &route.options.senders;
            if !senders.is_empty() && !sender.is_some_and(|s| senders.iter().any(|n| n == s)) {
                skipped(route.line, Skip::Sender(senders));
                continue;
            }
            let mut filters_hold = true;
            for filter in &route.options.filters {
                let value = field(&filter.path).map_err(SelectError::Body)?;
                if !value.as_deref().is_some_and(|v| filter.value.matches(v)) {
                    skipped(route.line, Skip::Filter { filter, value });
                    filters_hold = false;
                    break;
                }
            }
            if !filters_hold {
                continue;
            }
            let script = match &route.script {
                Script::Fixed { written, path } => {
                    match recheck_script(&self.scripts_dir, written, path, self.unmoved()) {
                        None => {
                            skipped(route.line, Skip::Gone(path));
                            continue;
                        }
                        Some(checked) => {
                            checked.map_err(SelectError::Unsafe)?;
                            path.clone()
                        }
                    }
                }
                Script::Template(template) => {
                    let written = template.replace(EVENT_PLACEHOLDER, event);
                    let wanted = resolve_path(&self.scripts_dir, &written);
                    let Some((path, own)) = find_file(&wanted) else {
                        skipped(route.line, Skip::NoScript(wanted));
                        continue;
                    };
                    if never_a_script(&path) {
                        skipped(route.line, Skip::NotAScript(path));
                        continue;
                    }
                    let own = own.filter(|_| self.unmoved());
                    let real = check_script(&self.scripts_dir, &written, &path, own.as_ref())
                        .map_err(SelectError::Unsafe)?;
                    if let Some((_, named)) = self.reserved.iter().find(|(r, _)| r.same_file(&real))
                    {
                        skipped(route.line, Skip::Reserved { path, line: *named });
                        continue;
                    }
                    path
                }
            };
            return Ok(Some(Selected {
                line: route.line,
                script,
                timeout: route.options.timeout,
                queueing: route.options.queueing.clone(),
            }));
        }
        Ok(None)
    }
}

/// Why a line did not win, as [`Routes::select_explained`] reports it: what was already at hand, so
/// `select` pays nothing for the explanation it does not want.
pub enum Skip<'a> {
    Pattern(&'a Glob),
    /// The line is for these senders only.
    Sender(&'a [String]),
    Filter {
        filter: &'a Filter,
        value: Option<String>,
    },
    /// A fixed script removed since the routes loaded.
    Gone(&'a Path),
    /// No file for an `{event}` script.
    NoScript(PathBuf),
    /// The file for an `{event}` script is one that is never a script ([`never_a_script`]).
    NotAScript(PathBuf),
    /// The `{event}` script is one that `line` names: it runs only through the lines that name it.
    Reserved {
        path: PathBuf,
        line: usize,
    },
}

impl fmt::Display for Skip<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::Pattern(glob) => write!(f, "the pattern {glob} does not match the event"),
            Skip::Sender(names) => write!(
                f,
                "sender={} does not include this request's sender",
                names.join(",")
            ),
            Skip::Filter {
                filter,
                value: Some(v),
            } => write!(f, "{} is {v:?}, not {}", filter.path, filter.value),
            Skip::Filter {
                filter,
                value: None,
            } => {
                write!(f, "the body has no value at {}", filter.path)
            }
            Skip::Gone(path) => write!(f, "the script {} no longer exists", path.display()),
            Skip::NoScript(path) => write!(f, "there is no script {}", path.display()),
            Skip::NotAScript(path) => write!(
                f,
                "{} is a README, a backup or a package manager's copy, never a script",
                path.display()
            ),
            Skip::Reserved { path, line } => write!(
                f,
                "the script {} is named by line {line}, and runs only through the lines that name it",
                path.display()
            ),
        }
    }
}

/// Why selecting a route failed.
#[derive(Debug, PartialEq, Eq)]
pub enum SelectError<E> {
    /// Reading a field from the body failed (e.g. the body is malformed).
    Body(E),
    /// The matching script exists but is not safe to run.
    Unsafe(UnsafeScript),
}

fn resolve_path(scripts_dir: &Path, written: &str) -> PathBuf {
    let path = Path::new(written);
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        scripts_dir.join(path)
    };
    // One spelling for one path (`./x`, `a//x` are `x`, `a/x`): a serial lane is its script's path, so
    // two lines naming one script differently share it.
    path.components().collect()
}

/// Files a scripts directory holds that are not scripts, which an event named after one must not reach:
/// the package's README (and any README.*), the copies dpkg, ucf and rpm leave beside a changed file
/// (`.dpkg-dist`, `.dpkg-old`, `.ucf-dist`, `.rpmnew`, ...), `patch`'s and editors' leftovers (`.orig`,
/// `.rej`, `.bak`, `~`). Addressed as an event, such a file
/// is no route (404), not a script that failed (500) with advice to make it executable.
fn never_a_script(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let lower = name.to_ascii_lowercase();
    lower == "readme"
        || lower.starts_with("readme.")
        || lower.contains(".dpkg-")
        || lower.contains(".ucf-")
        || [".orig", ".bak", ".rej", ".rpmnew", ".rpmsave"]
            .iter()
            .any(|suffix| lower.ends_with(suffix))
        || name.ends_with('~')
}

/// Finds `path`, comparing its file name exactly first and then ignoring ASCII case, because senders are
/// inconsistent about case (`ComputerCheckin`). Of several case-insensitive matches the first in byte order
/// wins, so the choice does not depend on directory order.
/// The file's own metadata comes with it when the exact name was found (not following a symlink).
fn find_file(path: &Path) -> Option<(PathBuf, Option<fs::Metadata>)> {
    if let Ok(own) = path.symlink_metadata() {
        return Some((path.to_path_buf(), Some(own)));
    }
    let name = path.file_name()?.to_str()?;
    let dir = path.parent()?;
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
        .map(|entry| entry.path())
        .collect();
    found.sort();
    found.into_iter().next().map(|path| (path, None))
}

/// A script must be a regular executable file owned by root or the daemon's user and not writable by group
/// or others, in directories of which the same holds below `scripts_dir` (whose own mode `check` warns
/// about), and (unless written as an absolute path) inside `scripts_dir` after following symlinks.
///
/// `own` is the path's own metadata (not following a symlink) when the caller has it at hand and knows that
/// `scripts_dir` (canonical) still reaches the directory checked at load. A regular file directly in it is
/// then its own real path, with no directory on its way below `scripts_dir`: it is judged on that metadata
/// alone. Resolving the path again would ask for each of its components (`realpath` reads each as a
/// link): five system calls of an acknowledged request's dozen.
fn check_script(
    scripts_dir: &Path,
    written: &str,
    path: &Path,
    own: Option<&fs::Metadata>,
) -> Result<Real, UnsafeScript> {
    use std::os::unix::fs::MetadataExt;
    if let Some(meta) = own.filter(|m| m.is_file() && path.parent() == Some(scripts_dir)) {
        check_mode(written, path, meta)?;
        check_owner(written, path, "", meta)?;
        return Ok(Real {
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
        });
    }
    let real = path
        .canonicalize()
        .map_err(|e| refusal(written, format!("{}: {e}", path.display()), &e.to_string()))?;
    if !Path::new(written).is_absolute() && !real.starts_with(scripts_dir) {
        return Err(refusal(
            written,
            format!(
                "resolves to {}, outside scripts_dir {}",
                real.display(),
                scripts_dir.display()
            ),
            "resolves outside scripts_dir",
        ));
    }
    let meta = fs::metadata(&real)
        .map_err(|e| refusal(written, format!("{}: {e}", real.display()), &e.to_string()))?;
    check_mode(written, &real, &meta)?;
    check_owner(written, &real, "", &meta)?;
    // Whoever may write a directory on the way may put another file in the script's place.
    let mut dir = real.parent();
    while let Some(d) = dir {
        if d == scripts_dir || !d.starts_with(scripts_dir) {
            break;
        }
        let meta = fs::metadata(d)
            .map_err(|e| refusal(written, format!("{}: {e}", d.display()), &e.to_string()))?;
        check_unshared(written, d, "its directory ", &meta)?;
        check_owner(written, d, "its directory ", &meta)?;
        dir = d.parent();
    }
    Ok(Real {
        path: real,
        id: (meta.dev(), meta.ino()),
    })
}

/// A checked script: its real path, and its file's (device, inode), which another name for it (a hard
/// link, another spelling on a case-insensitive directory) shares.
#[derive(Debug, Clone)]
struct Real {
    path: PathBuf,
    id: (u64, u64),
}

impl Real {
    /// `other` is this script: the same path, or the same file under another name. A file replaced since
    /// this one was checked (an editor's save renames a new file into place) may give a later file its
    /// freed inode number, so the number counts only while this path still holds it.
    fn same_file(&self, other: &Real) -> bool {
        use std::os::unix::fs::MetadataExt;
        self.path == other.path
            || self.id == other.id
                && fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id)
    }
}

/// The user scripts are checked for: the one that runs them. `serve` is that user; `check` run as root
/// is not, and checks for the daemon's user instead ([`judge_as`]).
struct Judge {
    uid: u32,
    /// Its primary and supplementary groups.
    gids: Vec<u32>,
    /// This process itself: the kernel answers whether it may execute a file (`faccessat`), ACLs
    /// included. For another user only the mode bits can be read.
    this_process: bool,
}

static JUDGE: OnceLock<Judge> = OnceLock::new();

fn judge() -> &'static Judge {
    JUDGE.get_or_init(|| {
        let mut gids = vec![rustix::process::getegid().as_raw()];
        if let Ok(groups) = rustix::process::getgroups() {
            gids.extend(groups.iter().map(|g| g.as_raw()));
        }
        Judge {
            uid: rustix::process::geteuid().as_raw(),
            gids,
            this_process: true,
        }
    })
}

/// Checks scripts from now on for the user `uid`, with its groups (`gids`), rather than for this process:
/// what `check` run as root does for the daemon's user. Only before the first check; false after it.
pub fn judge_as(uid: u32, gids: Vec<u32>) -> bool {
    JUDGE
        .set(Judge {
            uid,
            gids,
            this_process: false,
        })
        .is_ok()
}

/// Whether `judge` may execute the file at `path` with metadata `meta`.
fn may_execute(judge: &Judge, path: &Path, meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    if judge.this_process {
        use rustix::fs::{Access, AtFlags, CWD};
        rustix::fs::accessat(CWD, path, Access::EXEC_OK, AtFlags::EACCESS).is_ok()
    } else {
        executable_by(judge, meta.mode(), meta.uid(), meta.gid())
    }
}

/// Owned by root or by the user the daemon runs as: anyone else could change what runs as the daemon.
fn check_owner(
    written: &str,
    path: &Path,
    what: &str,
    meta: &fs::Metadata,
) -> Result<(), UnsafeScript> {
    use std::os::unix::fs::MetadataExt;
    let uid = judge().uid;
    if meta.uid() == 0 || meta.uid() == uid {
        return Ok(());
    }
    Err(refusal(
        written,
        format!(
            "{what}{} is owned by another user (uid {}), neither root nor the daemon's user (uid {uid}): \
             chown it",
            path.display(),
            meta.uid()
        ),
        &format!("{what}is owned by another user (uid {})", meta.uid()),
    ))
}

/// Whether the mode lets `judge` execute the file: root, with any execute bit; the owner, with the owner's;
/// a member of the file's group, with the group's; anyone else, with the others' (as the kernel decides,
/// ACLs aside).
fn executable_by(judge: &Judge, mode: u32, owner: u32, group: u32) -> bool {
    if judge.uid == 0 {
        mode & 0o111 != 0
    } else if owner == judge.uid {
        mode & 0o100 != 0
    } else if judge.gids.contains(&group) {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

/// The per-request check of a fixed script: the whole of [`check_script`] again, since the file, or a
/// symlink on its way, may have changed since the routes loaded (a symlink retargeted out of
/// `scripts_dir` was followed when only the mode was checked again). `None` when it no longer exists.
///
/// `unmoved`: `scripts_dir`'s path still reaches the directory checked at load ([`Routes::unmoved`]).
fn recheck_script(
    scripts_dir: &Path,
    written: &str,
    path: &Path,
    unmoved: bool,
) -> Option<Result<(), UnsafeScript>> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        own => {
            let own = own.as_ref().ok().filter(|_| unmoved);
            Some(check_script(scripts_dir, written, path, own).map(drop))
        }
    }
}

/// The check a queued delivery's script gets before each attempt, as a sync request's does when it is
/// selected: it may have been removed or made unsafe since it was accepted. Its path is stored whole; one
/// under `scripts_dir` must still resolve inside it.
pub fn check_before_run(scripts_dir: &Path, path: &Path) -> Result<(), UnsafeScript> {
    let written = if path.starts_with(scripts_dir) {
        path.strip_prefix(scripts_dir)
            .unwrap_or(path)
            .to_string_lossy()
    } else {
        path.to_string_lossy()
    };
    recheck_script(scripts_dir, &written, path, false).unwrap_or_else(|| {
        Err(refusal(
            &written,
            "no longer exists".into(),
            "no longer exists",
        ))
    })
}

fn check_mode(written: &str, path: &Path, meta: &fs::Metadata) -> Result<(), UnsafeScript> {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.permissions().mode();
    if !meta.is_file() {
        Err(refusal(
            written,
            format!("{} is not a regular file", path.display()),
            "is not a regular file",
        ))
    } else if mode & 0o111 == 0 {
        Err(refusal(
            written,
            format!("{} is not executable: chmod 755 it", path.display()),
            "is not executable",
        ))
    } else if !may_execute(judge(), path, meta) {
        let judge = judge();
        let uid = judge.uid;
        let class = if meta.uid() == uid {
            "its owner"
        } else if judge.gids.contains(&meta.gid()) {
            "in its group"
        } else {
            "neither its owner nor in its group"
        };
        Err(refusal(
            written,
            format!(
                "{} is not executable by the daemon's user (uid {uid}, {class}; mode {:o}, owner {}, group \
                 {}): chmod 755 it, or give it the daemon's group and chmod 750",
                path.display(),
                mode & 0o7777,
                meta.uid(),
                meta.gid()
            ),
            &format!("is not executable by the daemon's user (uid {uid})"),
        ))
    } else {
        check_unshared(written, path, "", meta)
    }
}

/// Not writable by group or others, who could otherwise change what runs as the daemon.
fn check_unshared(
    written: &str,
    path: &Path,
    what: &str,
    meta: &fs::Metadata,
) -> Result<(), UnsafeScript> {
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 == 0 {
        return Ok(());
    }
    Err(refusal(
        written,
        format!(
            "{what}{} is writable by group or others (mode {mode:o}): chmod go-w it",
            path.display()
        ),
        &format!("{what}is writable by group or others (mode {mode:o})"),
    ))
}

/// `why` says what is wrong for the operator, paths and all; `public` the same for the sender, without the
/// paths of this machine.
fn refusal(written: &str, why: String, public: &str) -> UnsafeScript {
    UnsafeScript(
        format!("script {written:?}: {why}"),
        Public(format!("script {written:?}: {public}")),
    )
}

/// Parses the routing file's text into specs, or `(line, message)`.
pub fn parse_lines(text: &str) -> Result<Vec<RouteSpec>, (usize, String)> {
    let mut specs = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let tokens = tokenize(raw).map_err(|e| (line, e))?;
        let mut tokens = tokens.into_iter();
        let Some(pattern) = tokens.next() else {
            continue;
        };
        let Some(script) = tokens.next() else {
            return Err((
                line,
                format!("route {pattern:?} names no script: write `PATTERN SCRIPT [OPTION ...]`"),
            ));
        };
        if script.is_empty() {
            return Err((line, "empty script name".to_string()));
        }
        let mut options = RouteOptions::default();
        for token in tokens {
            parse_option(&token, &mut options).map_err(|e| (line, e))?;
        }
        specs.push(RouteSpec {
            line,
            pattern: Glob::new(&pattern, true),
            script,
            options,
        });
    }
    Ok(specs)
}

fn parse_option(token: &str, options: &mut RouteOptions) -> Result<(), String> {
    if token.starts_with('/') {
        let Some((path, value)) = token.split_once('=') else {
            return Err(format!(
                "field filter {token:?} needs a value: write /path=GLOB"
            ));
        };
        if path.len() < 2 {
            return Err(format!("field filter {token:?} needs a path after '/'"));
        }
        options.filters.push(Filter {
            path: path.to_string(),
            value: Glob::new(value, false),
        });
        return Ok(());
    }
    let queueing = &mut options.queueing;
    match token.split_once('=') {
        None if token == "async" || token == "sync" => {
            let run_async = token == "async";
            if queueing.run_async.is_some_and(|set| set != run_async) {
                return Err("async and sync on one line: give one".into());
            }
            queueing.run_async = Some(run_async);
        }
        None if token == "serial" => queueing.serial = true,
        Some(("timeout", value)) => {
            let timeout = TIMEOUT
                .check(parse_duration(value)?)
                .map_err(|e| format!("timeout={e}"))?;
            options.timeout = Some(timeout);
        }
        Some(("sender", value)) => {
            for name in value.split(',') {
                if name.is_empty() {
                    return Err(format!(
                        "sender={value}: name a sender, or several separated by commas"
                    ));
                }
                if !options.senders.iter().any(|n| n == name) {
                    options.senders.push(name.to_string());
                }
            }
        }
        Some(("ack_status", value)) => match value {
            "200" => queueing.ack_status = Some(200),
            "202" => queueing.ack_status = Some(202),
            _ => return Err(format!("ack_status={value}: use 200 or 202")),
        },
        Some(("retries", value)) => {
            let n: usize = value
                .parse()
                .map_err(|_| format!("retries={value}: write a whole number, {RETRIES}"))?;
            let n = RETRIES.check(n).map_err(|e| format!("retries={e}"))?;
            queueing.retries = Some(n as u32);
        }
        Some(("retry_max", value)) => {
            let max = RETRY_MAX
                .check(parse_duration(value)?)
                .map_err(|e| format!("retry_max={e}"))?;
            queueing.retry_max = Some(max);
        }
        Some(("dedupe_key", value)) => {
            queueing.dedupe_key =
                Some(Source::parse(value).map_err(|e| format!("dedupe_key: {e}"))?);
        }
        _ => {
            return Err(format!(
                "unknown option {token:?}: options are timeout=DURATION, sender=NAME, async, sync, \
                 ack_status=200|202, retries=N, retry_max=DURATION, serial, dedupe_key=SOURCE and field \
                 filters /path=GLOB"
            ));
        }
    }
    Ok(())
}

/// Splits a line into tokens: whitespace separates, `"..."` quotes (with `\"` and `\\`), `#` at the start
/// of a token begins a comment.
fn tokenize(line: &str) -> Result<Vec<String>, String> {
    let mut tokens = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        match chars.peek() {
            None | Some('#') => return Ok(tokens),
            Some(_) => {}
        }
        let mut token = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
            if c != '"' {
                token.push(c);
                continue;
            }
            loop {
                match chars.next() {
                    None => return Err("unterminated quote".to_string()),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(e @ ('"' | '\\')) => token.push(e),
                        _ => {
                            return Err(
                                "in quotes, '\\' must be followed by '\"' or '\\'".to_string()
                            );
                        }
                    },
                    Some(c) => token.push(c),
                }
            }
        }
        tokens.push(token);
    }
}

impl fmt::Display for Routes {
    /// The resolved table, as `hookrunner check` prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(path) => writeln!(f, "# routes from {}", path.display())?,
            None => writeln!(f, "# embedded default routes")?,
        }
        writeln!(f, "# scripts_dir {}", self.scripts_dir.display())?;
        for route in &self.routes {
            let script = match &route.script {
                Script::Fixed { path, .. } => path.display().to_string(),
                Script::Template(t) => format!(
                    "{} (if it exists)",
                    resolve_path(&self.scripts_dir, t).display()
                ),
            };
            write!(
                f,
                "line {:<4} {:<28} {}",
                route.line,
                route.pattern.to_string(),
                script
            )?;
            if let Some(timeout) = route.options.timeout {
                // As it would be written: `timeout=90s`, not 90000ms.
                write!(f, " timeout={}", timeout.show())?;
            }
            if !route.options.senders.is_empty() {
                write!(f, " sender={}", route.options.senders.join(","))?;
            }
            let q = &route.options.queueing;
            match q.run_async {
                Some(true) => write!(f, " async")?,
                Some(false) => write!(f, " sync")?,
                None => {}
            }
            if let Some(status) = q.ack_status {
                write!(f, " ack_status={status}")?;
            }
            if let Some(n) = q.retries {
                write!(f, " retries={n}")?;
            }
            if let Some(max) = q.retry_max {
                write!(f, " retry_max={}", max.show())?;
            }
            if q.serial {
                write!(f, " serial")?;
            }
            if let Some(source) = &q.dedupe_key {
                write!(f, " dedupe_key={source}")?;
            }
            for filter in &route.options.filters {
                write!(f, " {}={:?}", filter.path, filter.value.to_string())?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let g = |p: &str, t: &str| Glob::new(p, true).matches(t);
        assert!(g("*", ""));
        assert!(g("*", "ComputerAdded"));
        assert!(g("MobileDevice*", "MobileDeviceEnrolled"));
        assert!(g("mobiledevice*", "MobileDeviceEnrolled"));
        assert!(!g("MobileDevice*", "ComputerAdded"));
        assert!(g("Computer?dded", "ComputerAdded"));
        assert!(g("*Check*", "ComputerCheckin"));
        assert!(g("a*b*c", "aXXbYYc"));
        assert!(!g("a*b*c", "aXXbYY"));
        assert!(!g("abc", "abcd"));
        assert!(!Glob::new("Charly*", false).matches("charly's iMac"));
        assert!(Glob::new("Charly*", false).matches("Charly's iMac"));
    }

    #[test]
    fn globs_work_on_characters() {
        let exact = |p: &str, t: &str| Glob::new(p, false).matches(t);
        assert!(exact("a?b", "aéb"));
        assert!(exact("a?b", "a😀b"));
        assert!(!exact("a??b", "aéb"), "é is one character, not two bytes");
        assert!(exact("?", "é"));
        assert!(!exact("?", ""));
        assert!(exact("*é", "caféé"));
        assert!(exact("*é?", "caféé!"));
        assert!(exact("日本*", "日本語"));
        assert!(exact("*?語", "日本語"));
        assert!(!exact("*?語", "語"));
        assert!(exact("Charly?s iMac", "Charly’s iMac"));
        // Case-insensitivity is ASCII only, as documented.
        assert!(Glob::new("CAF?", true).matches("café"));
        assert!(!Glob::new("É", true).matches("é"));
    }

    #[test]
    fn glob_is_not_exponential() {
        let text = "a".repeat(10_000);
        let pattern = format!("{}b", "*a".repeat(50));
        assert!(!Glob::new(&pattern, true).matches(&text));
    }

    #[test]
    fn parses_the_documented_example() {
        let text = r#"
# EVENT-PATTERN            SCRIPT               [OPTION ...]
ComputerAdded              charly.sh            /event/deviceName="Charly's iMac"
ComputerAdded              computer-added.sh    timeout=60s
MobileDevice*              mobile-device.sh
*                          {event}   # anything else
"#;
        let specs = parse_lines(text).expect("example parses");
        assert_eq!(specs.len(), 4);
        assert_eq!(specs[0].line, 3);
        assert_eq!(
            specs[0].options.filters,
            vec![Filter {
                path: "/event/deviceName".into(),
                value: Glob::new("Charly's iMac", false)
            }]
        );
        assert_eq!(specs[1].options.timeout, Some(Duration::from_secs(60)));
        assert_eq!(specs[2].pattern, Glob::new("MobileDevice*", true));
        assert_eq!(specs[3].script, "{event}");
    }

    #[test]
    fn route_timeouts_accept_the_ends_of_their_range() {
        let specs = parse_lines("a a.sh timeout=100ms\nb b.sh timeout=24h\n").expect("in range");
        assert_eq!(specs[0].options.timeout, Some(TIMEOUT.min));
        assert_eq!(specs[1].options.timeout, Some(TIMEOUT.max));
        assert_eq!(TIMEOUT.to_string(), "100ms to 24h");
    }

    #[test]
    fn queueing_options() {
        let specs = parse_lines(
            "a a.sh async ack_status=200 retries=0 retry_max=100ms serial dedupe_key=json:/delivery/id\n\
             b b.sh sync retries=100 retry_max=24h\n",
        )
        .expect("options parse");
        let q = &specs[0].options.queueing;
        assert_eq!(q.run_async, Some(true));
        assert_eq!(q.ack_status, Some(200));
        assert_eq!((q.retries, q.retry_max), (Some(0), Some(RETRY_MAX.min)));
        assert!(q.serial);
        assert_eq!(q.dedupe_key, Some(Source::Json("/delivery/id".into())));
        let q = &specs[1].options.queueing;
        assert_eq!(q.run_async, Some(false));
        assert_eq!((q.retries, q.retry_max), (Some(100), Some(RETRY_MAX.max)));
        for (text, message) in [
            ("a a.sh ack_status=201\n", "use 200 or 202"),
            (
                "a a.sh retries=101\n",
                "retries=101 is out of range: use 0 to 100",
            ),
            ("a a.sh retries=-1\n", "write a whole number"),
            ("a a.sh retry_max=50ms\n", "retry_max=50ms is out of range"),
            ("a a.sh dedupe_key=body\n", "dedupe_key"),
        ] {
            let (_, got) = parse_lines(text).expect_err(text);
            assert!(got.contains(message), "{text:?}: {got}");
        }
    }

    #[test]
    fn tokens_and_quotes() {
        assert_eq!(
            tokenize(r#"a "b c" d"#),
            Ok(vec!["a".into(), "b c".into(), "d".into()])
        );
        assert_eq!(
            tokenize(r#"x="say \"hi\" \\""#),
            Ok(vec![r#"x=say "hi" \"#.into()])
        );
        assert_eq!(tokenize("a#b # c"), Ok(vec!["a#b".into()]));
        assert_eq!(tokenize("   # only a comment"), Ok(vec![]));
        assert!(tokenize(r#"a "open"#).is_err());
        assert!(tokenize(r#""\n""#).is_err());
    }

    #[test]
    fn bad_lines_name_their_line() {
        let cases = [
            ("ok a.sh\nlonely\n", 2, "names no script"),
            ("a a.sh colour=red\n", 1, "unknown option"),
            ("\n\na a.sh timeout=soon\n", 3, "invalid duration"),
            (
                "a a.sh timeout=0s\n",
                1,
                "timeout=0s is out of range: use 100ms to 24h",
            ),
            ("a a.sh timeout=99ms\n", 1, "timeout=99ms is out of range"),
            ("a a.sh timeout=25h\n", 1, "timeout=25h is out of range"),
            ("a a.sh /event/x\n", 1, "needs a value"),
            ("a a.sh /=x\n", 1, "needs a path"),
            ("a \"a.sh\n", 1, "unterminated quote"),
        ];
        for (text, line, message) in cases {
            let (got_line, got) = parse_lines(text).expect_err(text);
            assert_eq!(got_line, line, "{text:?}");
            assert!(got.contains(message), "{text:?}: {got}");
        }
    }

    fn dir_with(scripts: &[(&str, u32)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, mode) in scripts {
            let path = dir.path().join(name);
            fs::write(&path, "#!/bin/sh\n").expect("write script");
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).expect("chmod");
        }
        dir
    }

    fn no_body(_: &str) -> Result<Option<String>, ()> {
        Ok(None)
    }

    #[test]
    fn first_match_wins_with_filters_and_templates() {
        let dir = dir_with(&[
            ("charly.sh", 0o755),
            ("added.sh", 0o755),
            ("MobileDeviceEnrolled", 0o755),
        ]);
        let scripts = dir.path().canonicalize().expect("canonical");
        let text = "ComputerAdded charly.sh /event/deviceName=\"Charly's*\"\ncomputeradded added.sh timeout=60s\n* {event}\n";
        let routes = Routes::parse(text, None, &scripts).expect("routes load");
        let charly = |path: &str| -> Result<Option<String>, ()> {
            Ok((path == "/event/deviceName").then(|| "Charly's iMac".to_string()))
        };
        let got = routes
            .select("ComputerAdded", None, charly)
            .expect("select");
        assert_eq!(got.map(|s| s.script), Some(scripts.join("charly.sh")));
        let got = routes
            .select("COMPUTERADDED", None, no_body)
            .expect("select");
        assert_eq!(
            got,
            Some(Selected {
                line: 2,
                script: scripts.join("added.sh"),
                timeout: Some(Duration::from_secs(60)),
                queueing: Queueing::default(),
            })
        );
        let got = routes
            .select("MobileDeviceEnrolled", None, no_body)
            .expect("select");
        assert_eq!(
            got.map(|s| s.script),
            Some(scripts.join("MobileDeviceEnrolled"))
        );
        // Case-insensitive file lookup for {event}.
        let got = routes
            .select("mobiledeviceenrolled", None, no_body)
            .expect("select");
        assert_eq!(
            got.map(|s| s.script),
            Some(scripts.join("MobileDeviceEnrolled"))
        );
        // A template whose file does not exist does not match.
        assert_eq!(routes.select("PushSent", None, no_body), Ok(None));
        // A script a line names runs only through its lines: sent as the event, it is not the {event}
        // script (its filter would be bypassed), whatever the case of the name.
        assert_eq!(routes.select("charly.sh", None, no_body), Ok(None));
        assert_eq!(routes.select("ADDED.SH", None, charly), Ok(None));
        let mut why = Vec::new();
        let got = routes
            .select_explained("added.sh", None, no_body, |line, skip| {
                why.push((line, skip.to_string()))
            })
            .expect("select");
        assert_eq!(got, None);
        assert!(
            why.iter()
                .any(|(l, w)| *l == 3 && w.contains("is named by line 2")),
            "{why:?}"
        );
        // Nor under another name for the same file (a hard link; on a case-insensitive directory, another
        // spelling is one too).
        fs::hard_link(scripts.join("charly.sh"), scripts.join("other-name.sh")).expect("link");
        assert_eq!(routes.select("other-name.sh", None, no_body), Ok(None));
        let routes = Routes::parse(text, None, &scripts).expect("routes load");
        assert_eq!(routes.select("other-name.sh", None, no_body), Ok(None));
    }

    /// A reserved script's file number counts while its path still holds that file: a hard link to it is
    /// it, but a later file that got the number of one replaced since is not.
    #[test]
    fn a_reserved_scripts_file_number_counts_only_while_its_path_holds_it() {
        use std::os::unix::fs::MetadataExt;
        let dir = dir_with(&[("a.sh", 0o755), ("b.sh", 0o755)]);
        let real = |path: &Path| {
            let meta = fs::metadata(path).expect("stat");
            Real {
                path: path.to_path_buf(),
                id: (meta.dev(), meta.ino()),
            }
        };
        let (a, b) = (dir.path().join("a.sh"), dir.path().join("b.sh"));
        let link = dir.path().join("link.sh");
        fs::hard_link(&a, &link).expect("link");
        assert!(real(&a).same_file(&real(&link)));
        assert!(!real(&a).same_file(&real(&b)));
        // As if a.sh had been replaced and b.sh had got its old number.
        let stale = Real {
            path: a.clone(),
            id: real(&b).id,
        };
        assert!(!stale.same_file(&real(&b)));
    }

    /// A serial lane is the script's path: two spellings of one path are one script.
    #[test]
    fn one_script_written_two_ways_is_one_path() {
        let dir = dir_with(&[("x.sh", 0o755)]);
        let scripts = dir.path().canonicalize().expect("canonical");
        let absolute = format!("{}//x.sh", scripts.display());
        let text =
            format!("A ./x.sh async serial\nB x.sh async serial\nC {absolute} async serial\n");
        let routes = Routes::parse(&text, None, &scripts).expect("routes load");
        for event in ["A", "B", "C"] {
            let got = routes
                .select(event, None, no_body)
                .expect("select")
                .map(|s| s.script);
            assert_eq!(got, Some(scripts.join("x.sh")), "{event}");
        }
    }

    #[test]
    fn a_line_with_senders_is_for_their_requests_only() {
        let dir = dir_with(&[("gh.sh", 0o755), ("any.sh", 0o755)]);
        let text = "push gh.sh sender=github,github sender=gh2\n* any.sh sender=x\n";
        let routes = Routes::parse(text, None, dir.path()).expect("valid");
        assert_eq!(routes.routes[0].options.senders, ["github", "gh2"]);
        let line = |sender| {
            routes
                .select("push", sender, no_body)
                .expect("select")
                .map(|s| s.line)
        };
        assert_eq!(line(Some("github")), Some(1));
        assert_eq!(line(Some("gh2")), Some(1));
        assert_eq!(line(Some("x")), Some(2));
        assert_eq!(line(Some("gitlab")), None);
        assert_eq!(
            line(None),
            None,
            "a request without a sender is no sender's"
        );
        // A `*` line for one sender does not hide the lines below it from the others.
        assert!(routes.warnings().is_empty(), "{:?}", routes.warnings());
        assert!(routes.to_string().contains("sender=github,gh2"), "{routes}");
        let mut why = Vec::new();
        routes
            .select_explained("push", Some("gitlab"), no_body, |line, skip| {
                why.push((line, skip.to_string()))
            })
            .expect("no error");
        assert_eq!(
            why[0],
            (
                1,
                "sender=github,gh2 does not include this request's sender".to_string()
            )
        );
        for bad in ["a gh.sh sender=\n", "a gh.sh sender=a,,b\n"] {
            let (line, err) = parse_lines(bad).expect_err(bad);
            assert!(line == 1 && err.contains("name a sender"), "{err}");
        }
    }

    #[test]
    fn each_line_that_does_not_win_says_why() {
        let dir = dir_with(&[("fixed.sh", 0o755)]);
        let text = "Other* fixed.sh\nComputer* fixed.sh /event/name=Lab*\nComputer* fixed.sh /event/missing=x\n\
                    * {event}.sh\n* fixed.sh\n";
        let routes = Routes::parse(text, None, dir.path()).expect("valid");
        let mut why = Vec::new();
        let field =
            |path: &str| Ok::<_, ()>((path == "/event/name").then(|| "Office-1".to_string()));
        let selected = routes
            .select_explained("ComputerAdded", None, field, |line, skip| {
                why.push((line, skip.to_string()))
            })
            .expect("no error")
            .expect("a route");
        assert_eq!(selected.line, 5);
        let lines: Vec<usize> = why.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [1, 2, 3, 4]);
        assert!(
            why[0].1.contains("pattern Other* does not match"),
            "{why:?}"
        );
        assert!(
            why[1].1.contains("/event/name is \"Office-1\", not Lab*"),
            "{why:?}"
        );
        assert!(why[2].1.contains("no value at /event/missing"), "{why:?}");
        assert!(why[3].1.contains("ComputerAdded.sh"), "{why:?}");
        let plain = routes
            .select("ComputerAdded", None, field)
            .expect("no error");
        assert_eq!(plain, Some(selected), "select and its explained form agree");
    }

    #[test]
    fn body_errors_surface_only_when_a_filter_needs_the_body() {
        let dir = dir_with(&[("a.sh", 0o755)]);
        let scripts = dir.path().canonicalize().expect("canonical");
        let routes = Routes::parse("X a.sh /k=v\nY a.sh\n", None, &scripts).expect("routes load");
        let broken = |_: &str| -> Result<Option<String>, &str> { Err("malformed") };
        assert_eq!(
            routes.select("X", None, broken),
            Err(SelectError::Body("malformed"))
        );
        assert!(routes.select("Y", None, broken).is_ok());
    }

    #[test]
    fn fixed_scripts_are_checked_again_when_selected() {
        let dir = dir_with(&[
            ("gone.sh", 0o755),
            ("later.sh", 0o755),
            ("fallback.sh", 0o755),
        ]);
        let scripts = dir.path().canonicalize().expect("canonical");
        let routes = Routes::parse("A gone.sh\nA fallback.sh\nB later.sh\n", None, &scripts)
            .expect("routes load");
        fs::remove_file(scripts.join("gone.sh")).expect("remove");
        let got = routes.select("A", None, no_body).expect("select");
        assert_eq!(
            got.map(|s| s.script),
            Some(scripts.join("fallback.sh")),
            "a removed script does not match"
        );
        fs::set_permissions(scripts.join("later.sh"), fs::Permissions::from_mode(0o777))
            .expect("chmod");
        assert!(matches!(
            routes.select("B", None, no_body),
            Err(SelectError::Unsafe(_))
        ));
        // A regular file is judged on its own metadata; one that becomes a symlink is resolved again, and one
        // leading out of scripts_dir is refused, through a fixed line and through {event} alike.
        let outside = dir_with(&[("escape.sh", 0o755)]);
        let routes =
            Routes::parse("C fallback.sh\n* {event}\n", None, &scripts).expect("routes load");
        for (event, name) in [("C", "fallback.sh"), ("later.sh", "later.sh")] {
            fs::set_permissions(scripts.join(name), fs::Permissions::from_mode(0o755))
                .expect("chmod");
            let got = routes.select(event, None, no_body).expect("a regular file");
            assert_eq!(got.map(|s| s.script), Some(scripts.join(name)));
            fs::remove_file(scripts.join(name)).expect("remove");
            std::os::unix::fs::symlink(outside.path().join("escape.sh"), scripts.join(name))
                .expect("symlink");
            assert!(
                matches!(routes.select(event, None, no_body),
                    Err(SelectError::Unsafe(e)) if e.0.contains("outside scripts_dir")),
                "{event}"
            );
        }
    }

    #[test]
    fn a_scripts_dir_replaced_by_a_symlink_after_load_leads_nowhere_outside_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let top = dir.path().canonicalize().expect("canonical");
        let scripts = top.join("scripts");
        let elsewhere = top.join("elsewhere");
        for dir in [&scripts, &elsewhere] {
            fs::create_dir(dir).expect("mkdir");
            fs::write(dir.join("a.sh"), "#!/bin/sh\n").expect("write");
            fs::set_permissions(dir.join("a.sh"), fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        let routes = Routes::parse("A a.sh\n* {event}\n", None, &scripts).expect("routes load");
        assert!(routes.select("A", None, no_body).is_ok());
        fs::rename(&scripts, top.join("old")).expect("rename");
        std::os::unix::fs::symlink(&elsewhere, &scripts).expect("symlink");
        for event in ["A", "a.sh"] {
            assert!(
                matches!(routes.select(event, None, no_body),
                    Err(SelectError::Unsafe(e)) if e.0.contains("outside scripts_dir")),
                "{event}"
            );
        }
    }

    #[test]
    fn lines_that_can_never_match_are_warned_of() {
        let dir = dir_with(&[("a.sh", 0o755)]);
        let scripts = dir.path().canonicalize().expect("canonical");
        let text = "\"Computer Added\" a.sh\npush,ping a.sh\n* nodir/{event}\nComputer* a.sh\n\
                    * a.sh\nLater a.sh\n";
        let routes = Routes::parse(text, Some(Path::new("routes")), &scripts).expect("loads");
        let warnings = routes.warnings();
        assert_eq!(warnings.len(), 4, "{warnings:#?}");
        assert!(
            warnings[0].starts_with("routes:1: the pattern \"Computer Added\" can never match")
        );
        assert!(warnings[1].starts_with("routes:2: the pattern \"push,ping\" can never match"));
        assert!(warnings[2].starts_with("routes:3: nodir/{event} is in "));
        assert!(warnings[3].starts_with("routes:6: no request reaches this line: line 5"));
        let fine =
            Routes::parse("Computer* a.sh\n* {event}\n* a.sh\n", None, &scripts).expect("loads");
        assert!(fine.warnings().is_empty(), "{:?}", fine.warnings());
        // An empty table loads (every event 404), said at every load: a file caught mid-write looks so.
        let empty = Routes::parse("# nothing yet\n", None, dir.path()).expect("valid");
        assert_eq!(
            empty.warnings(),
            ["routes: no route line: every event is answered 404"]
        );
    }

    #[test]
    fn unsafe_scripts_are_refused() {
        let dir = dir_with(&[("plain", 0o644), ("shared", 0o775), ("Open", 0o757)]);
        let scripts = dir.path().canonicalize().expect("canonical");
        // A safe, executable script, but beside scripts_dir rather than in it.
        let outside = dir_with(&[("escape.sh", 0o755)]);
        let escape = format!(
            "a ../{}/escape.sh\n",
            outside.path().file_name().expect("name").to_string_lossy()
        );
        for (text, why) in [
            ("a plain\n", "not executable"),
            ("a shared\n", "writable by group"),
            ("a missing.sh\n", "No such file"),
            (escape.as_str(), "outside scripts_dir"),
        ] {
            let err = Routes::parse(text, Some(Path::new("routes")), &scripts).expect_err(text);
            assert!(
                matches!(&err, RoutesError::Line { line: 1, message } if message.contains(why)),
                "{text:?}: {err:?}"
            );
        }
        // A directory on the way that others may write: a line of the routes file, like the script's mode.
        fs::create_dir(scripts.join("open")).expect("mkdir");
        fs::write(scripts.join("open/in.sh"), "#!/bin/sh\n").expect("write");
        fs::set_permissions(
            scripts.join("open/in.sh"),
            fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        fs::set_permissions(scripts.join("open"), fs::Permissions::from_mode(0o775))
            .expect("chmod");
        let err =
            Routes::parse("# first\na open/in.sh\n", None, &scripts).expect_err("open directory");
        assert!(
            matches!(&err, RoutesError::Line { line: 2, message }
                if message.contains("its directory") && message.contains("(mode 775)")),
            "{err:?}"
        );
        fs::set_permissions(scripts.join("open"), fs::Permissions::from_mode(0o755))
            .expect("chmod");
        Routes::parse("a open/in.sh\n", None, &scripts).expect("a closed directory loads");
        std::os::unix::fs::symlink("/bin/sh", scripts.join("link")).expect("symlink");
        let err = Routes::parse("a link\n", None, &scripts).expect_err("symlink escape");
        assert!(
            matches!(&err, RoutesError::Line { message, .. } if message.contains("outside scripts_dir")),
            "{err:?}"
        );
        let routes = Routes::parse("* {event}\n", None, &scripts).expect("template loads");
        assert!(matches!(
            routes.select("Open", None, no_body),
            Err(SelectError::Unsafe(_))
        ));
    }

    #[test]
    fn execute_permission_is_the_daemons_users_own() {
        // A file owned by uid 10, group 20.
        let can = |mode: u32, judge: &Judge| executable_by(judge, mode, 10, 20);
        let root = Judge {
            uid: 0,
            gids: vec![0],
            this_process: false,
        };
        let the_owner = Judge {
            uid: 10,
            gids: vec![30],
            this_process: false,
        };
        let in_group = Judge {
            uid: 11,
            gids: vec![30, 20],
            this_process: false,
        };
        let stranger = Judge {
            uid: 11,
            gids: vec![30],
            this_process: false,
        };
        // 750: root and the group may run it, anyone else may not (the daemon's user, when `check` run as
        // root passed it).
        assert!(can(0o750, &root) && can(0o750, &in_group) && can(0o750, &the_owner));
        assert!(!can(0o750, &stranger));
        assert!(can(0o755, &stranger));
        // The owner's bits decide for the owner, the group's for the group, whatever the others' say.
        assert!(!can(0o075, &the_owner));
        assert!(!can(0o705, &in_group));
        // Root needs one execute bit, any.
        assert!(can(0o001, &root) && !can(0o644, &root));
    }

    #[test]
    fn an_event_never_reaches_a_readme_or_a_package_managers_copy() {
        for name in [
            "README",
            "readme",
            "README.md",
            "ComputerAdded.dpkg-dist",
            "ComputerAdded.dpkg-old",
            "push.ucf-dist",
            "ComputerAdded~",
            "ComputerAdded.orig",
            "push.bak",
        ] {
            assert!(never_a_script(Path::new(name)), "{name}");
        }
        for name in ["ComputerAdded", "invoice.paid", "Readmes", "push.sh"] {
            assert!(!never_a_script(Path::new(name)), "{name}");
        }
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_literal_pattern_matches_itself_ignoring_case(text in "[A-Za-z0-9_.-]{0,40}") {
            prop_assert!(Glob::new(&text, true).matches(&text.to_ascii_uppercase()));
            prop_assert!(Glob::new(&text, true).matches(&text.to_ascii_lowercase()));
        }

        #[test]
        fn a_star_in_place_of_any_slice_still_matches(
            text in "[A-Za-z0-9_.-]{0,40}",
            a in 0usize..41,
            b in 0usize..41,
        ) {
            let (start, end) = (a.min(b).min(text.len()), a.max(b).min(text.len()));
            let pattern = format!("{}*{}", &text[..start], &text[end..]);
            prop_assert!(Glob::new(&pattern, false).matches(&text));
        }

        #[test]
        fn question_marks_match_exactly_one_character(text in "[A-Za-z]{1,20}") {
            let pattern = "?".repeat(text.len());
            prop_assert!(Glob::new(&pattern, false).matches(&text));
            let longer = format!("{text}x");
            prop_assert!(!Glob::new(&pattern, false).matches(&longer));
        }

        #[test]
        fn question_marks_match_one_character_of_any_text(text in "\\PC{1,20}") {
            let pattern = "?".repeat(text.chars().count());
            prop_assert!(Glob::new(&pattern, false).matches(&text));
            let more = format!("{pattern}?");
            prop_assert!(!Glob::new(&more, false).matches(&text));
            let fewer = "?".repeat(text.chars().count() - 1);
            prop_assert!(!Glob::new(&fewer, true).matches(&text));
        }

        #[test]
        fn a_star_in_place_of_any_characters_still_matches(
            text in "\\PC{0,20}",
            a in 0usize..21,
            b in 0usize..21,
        ) {
            let chars: Vec<char> = text.chars().filter(|c| !matches!(c, '*' | '?')).collect();
            let (start, end) = (a.min(b).min(chars.len()), a.max(b).min(chars.len()));
            let literal: String = chars.iter().collect();
            let pattern: String = chars[..start].iter().chain(&['*']).chain(&chars[end..]).collect();
            prop_assert!(Glob::new(&pattern, false).matches(&literal), "{} {}", pattern, literal);
        }

        #[test]
        fn any_line_parses_or_names_its_line(line in "[ -~]{0,80}") {
            let text = format!("# header\n{line}\n");
            if let Err((n, message)) = parse_lines(&text) {
                prop_assert_eq!(n, 2);
                prop_assert!(!message.is_empty());
            }
        }
    }
}
