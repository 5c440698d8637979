//! The durable store: the queue of accepted async deliveries, their dead letters, the dedupe keys and the
//! history of every delivery, sync or async. Everything the rest of the program needs from it is the
//! [`Store`] trait and the plain types below; [`sqlite`] is the one backend. A second one (PostgreSQL, so
//! several instances share one queue) would implement the same trait and leave the gateway, the dispatcher
//! and the runner as they are.

mod schema;
pub mod sqlite;

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the dispatcher needs to run an entry again as it was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Attempts in all (the first run and its retries).
    pub max_attempts: u32,
    /// The longest pause between two attempts.
    pub retry_max: Duration,
    pub timeout: Duration,
    /// Entries of this route run one at a time, in arrival order.
    pub serial: bool,
}

/// An async delivery, authenticated and routed, to be committed before it is answered.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub request_id: String,
    /// Milliseconds since the epoch.
    pub received_at: i64,
    pub sender: Option<String>,
    pub event: String,
    /// The route's line in the routes file and its script (absolute): together, the route.
    pub route_line: usize,
    pub script: String,
    pub delivery_id: Option<String>,
    /// The key a repeat of this delivery would carry (sender and delivery id), if it has one.
    pub dedupe_key: Option<String>,
    /// The `HOOKRUNNER_*` variables as the request gave them.
    pub env: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The status the sender is answered (202, or 200 where a sender insists).
    pub ack_status: u16,
    pub policy: Policy,
}

/// The bounds an accept is checked against, in the same transaction that commits it.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub max_queued: u64,
    pub max_queued_bytes: u64,
    pub dedupe_window: Duration,
}

/// How an accept ended once committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Queued as a new entry.
    Queued { id: i64 },
    /// A delivery with this key was accepted within the dedupe window: answered as that one was.
    Duplicate {
        id: i64,
        request_id: String,
        status: u16,
    },
}

/// Why the store could not do what was asked. Every one of them is a 503 to a sender: the request may
/// succeed later. Nothing of it was kept, but for [`StoreError::Broken`]: the commit whose sync failed
/// may have reached the disk, and SQLite's recovery then keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// `max_queued` or `max_queued_bytes` is reached.
    Full(String),
    /// The disk is full, the database is locked or busy: it may pass by itself.
    Unavailable(String),
    /// A failed fsync: the kernel may have dropped the dirty pages it could not write, so what this process
    /// reads back can no longer be trusted. The daemon stops with a failure for its supervisor to restart
    /// it, and SQLite's recovery starts from the disk. (A failed write is `Unavailable`: SQLite rolls the
    /// transaction back, and frames without their commit are never read.)
    Broken(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Full(what) => write!(f, "the queue is full ({what})"),
            StoreError::Unavailable(what) => write!(f, "the store is unavailable: {what}"),
            StoreError::Broken(what) => write!(f, "the store failed: {what}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// One run of a script, as the history keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// 1 for the first run.
    pub n: u32,
    pub started_at: i64,
    pub duration_ms: f64,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// The last bytes the script wrote to stdout and stderr.
    pub output: String,
}

/// A sync delivery's row, written off the request's path.
#[derive(Debug, Clone)]
pub struct SyncRecord {
    pub request_id: String,
    pub received_at: i64,
    /// When the answer was known: the script's end, or the refusal's.
    pub finished_at: i64,
    pub sender: Option<String>,
    pub event: String,
    pub route_line: usize,
    pub script: String,
    pub delivery_id: Option<String>,
    pub status: u16,
    pub attempt: Option<Attempt>,
    /// The body, when it was small enough to be held in memory (a larger one is not kept).
    pub body: Option<Vec<u8>>,
    /// The body's length, kept or not.
    pub body_bytes: u64,
}

/// A queued entry the dispatcher may start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub id: i64,
    pub request_id: String,
    pub received_at: i64,
    pub event: String,
    pub route_line: usize,
    pub script: String,
    pub env: Vec<(String, String)>,
    /// Attempts made so far.
    pub attempts: u32,
    pub due_at: i64,
    pub policy: Policy,
}

impl Pending {
    /// The lane a `serial` entry runs in: its script. Not its route's line, which a reload that adds or
    /// removes a line above it moves while older entries wait with the old one; two serial routes that
    /// run one script share a lane, which holds each of them to one run at a time all the same.
    pub fn serial_lane(&self) -> &str {
        &self.script
    }
}

/// Where a read of the queue goes on from: past the entry due at `due_at` whose id is `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct After {
    pub due_at: i64,
    pub id: i64,
}

impl After {
    /// Before every entry.
    pub const START: After = After {
        due_at: i64::MIN,
        id: i64::MIN,
    };

    /// Just past `entry`.
    pub fn entry(entry: &Pending) -> After {
        After {
            due_at: entry.due_at,
            id: entry.id,
        }
    }
}

/// Where an entry goes after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Done,
    /// Failed; runs again at this time (ms since the epoch).
    Retry(i64),
    Dead,
}

/// An entry's state as the history shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Queued,
    Running,
    Done,
    /// A sync run that failed, or an async entry whose last attempt failed and that waits to retry.
    Failed,
    Dead,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Done => "done",
            State::Failed => "failed",
            State::Dead => "dead",
        }
    }

    pub fn parse(text: &str) -> Option<State> {
        [
            State::Queued,
            State::Running,
            State::Done,
            State::Failed,
            State::Dead,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// A row of the history.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: i64,
    pub request_id: String,
    pub received_at: i64,
    pub mode: &'static str,
    pub sender: Option<String>,
    pub event: String,
    pub route_line: usize,
    pub script: String,
    pub delivery_id: Option<String>,
    pub state: State,
    pub status: u16,
    pub attempts: u32,
    pub last_exit: Option<i32>,
    pub due_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub payload_bytes: u64,
    pub payload_kept: bool,
}

/// What `deliveries list` selects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// A glob on the event name.
    pub event: Option<String>,
    pub state: Option<State>,
    /// Rows whose last exit code is this.
    pub exit_code: Option<i32>,
    pub sender: Option<String>,
    pub since: Option<i64>,
    pub limit: usize,
}

/// The summary line: totals as a sender's own log screen shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub total: u64,
    pub done: u64,
    pub failed: u64,
    pub dead: u64,
    pub queued: u64,
    pub running: u64,
    pub store_bytes: u64,
}

/// The async entries not yet done, by state, for the metrics: read from an index that holds only them, so
/// it costs what is waiting and dead, never the size of the history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Waiting for their first attempt, or queued again by `deliveries retry`.
    pub queued: u64,
    /// Failed, waiting to retry (the async part of `failed`).
    pub retrying: u64,
    pub running: u64,
    pub dead: u64,
}

/// How long finished history is kept, and how large the store may grow.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub keep_payloads: Duration,
    pub keep_history: Duration,
    pub max_store_bytes: u64,
    pub dedupe_window: Duration,
}

/// What a pruning pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub payloads: u64,
    pub rows: u64,
}

/// Which entries `deliveries retry` runs again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    One(String),
    /// Every dead entry, of events matching the glob if one is given.
    Dead(Option<String>),
}

/// What a `retry` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retried {
    /// Entries queued to run now.
    pub queued: u64,
    /// Entries left as they were because the queue had no room for them.
    pub no_room: u64,
}

/// The store as the gateway, the dispatcher and the CLI see it.
pub trait Store: Send + Sync {
    /// Commits an async delivery (durably, before returning) or finds it a duplicate.
    fn accept(&self, delivery: NewDelivery, bounds: Bounds) -> Result<Accepted, StoreError>;
    /// Writes a sync delivery's row later, without making the request wait for it.
    fn record(&self, record: SyncRecord);
    /// Waits until every row handed to [`Store::record`] so far is committed (at shutdown).
    fn flush(&self);
    /// Up to `limit` entries of routes that are not serial, waiting to run and due by `due_by`, in the
    /// order they came due (a first attempt is due when it arrived), then by id, from the first one past
    /// `after` on. Entries waiting to retry later are not read at all, nor walked past: in an outage
    /// thousands may wait.
    fn pending(&self, after: After, due_by: i64, limit: usize) -> Result<Vec<Pending>, StoreError>;
    /// The first entry waiting in each serial lane ([`Pending::serial_lane`]), due or not, oldest first:
    /// the only one of its lane that may start, so what waits behind it is not read (in an outage, a
    /// whole backlog).
    fn lane_heads(&self) -> Result<Vec<Pending>, StoreError>;
    fn payload(&self, id: i64) -> Result<Option<Vec<u8>>, StoreError>;
    /// Marks an entry as running, committed (not synced) before it returns, so that the operator's `drop`
    /// cannot remove it while it runs and a crash counts its attempt as interrupted; false when it no
    /// longer waits to run (dropped meanwhile). A power cut may lose the mark: the attempt then does not
    /// count, and the entry runs again all the same. The request id must match too, so that a read taken
    /// before a drop cannot start another entry under the dropped one's number, whatever a backend does
    /// with the numbers of dropped rows (SQLite's are never given again, see the schema's version 7).
    fn started(&self, id: i64, request_id: &str) -> Result<bool, StoreError>;
    /// Keeps an attempt and moves the entry on.
    fn finish(&self, id: i64, attempt: Attempt, next: Next) -> Result<(), StoreError>;
    /// Puts an entry marked running back in the queue, due at `due_at`, with no attempt counted: its
    /// script never started, for a reason of the daemon's own.
    fn put_back(&self, id: i64, due_at: i64) -> Result<(), StoreError>;
    /// Makes due at `now` every waiting entry due later than any pause could have put it: a first
    /// attempt more than `pause` after `now`, a retry more than its route's `retry_max` (or `pause`, if
    /// longer). Such an entry was queued while the clock read ahead of `now`: it was set back since (a
    /// step by NTP, a clock that started the boot hours fast). Returns how many.
    fn due_again(&self, now: i64, pause: Duration) -> Result<usize, StoreError>;
    /// At a daemon's start: claims the store for this daemon alone, for as long as the store is open (a
    /// second daemon on the same store is refused here, before it touches anything), then queues again the
    /// entries a crash left running. Returns how many are waiting. Only a daemon calls it: the operator's
    /// CLI works beside the daemon without a claim.
    fn recover(&self) -> Result<u64, StoreError>;
    /// Removes what `retention` no longer keeps, in steps, for as long as `go_on` says (it is asked
    /// between steps). Only what was there when it began: rows written meanwhile wait for the next pass.
    fn prune(&self, retention: Retention, go_on: &dyn Fn() -> bool) -> Result<Pruned, StoreError>;
    fn list(&self, query: &Query) -> Result<Vec<Row>, StoreError>;
    /// A row by its number or its request id, with its attempts.
    fn show(&self, id: &str) -> Result<Option<(Row, Vec<Attempt>)>, StoreError>;
    /// Queues entries again to run now, within `bounds`' `max_queued` and `max_queued_bytes` (an entry
    /// waiting to retry is already counted; a dead or done one is counted again), in the transaction
    /// that queues them.
    fn retry(&self, target: &Target, bounds: Bounds) -> Result<Retried, StoreError>;
    /// Removes an entry that is not running; returns whether there was one.
    fn drop_entry(&self, id: &str) -> Result<bool, StoreError>;
    fn summary(&self) -> Result<Summary, StoreError>;
    fn backlog(&self) -> Result<Backlog, StoreError>;
    /// A write failed in a way that makes the store untrustworthy (see [`StoreError::Broken`]).
    fn broken(&self) -> bool;
    /// Whether a daemon holds the store (claimed by its [`Store::recover`]) and so runs what is queued;
    /// `None` when that cannot be told. The CLI says when a retried entry waits for a daemon's start.
    fn claimed(&self) -> Option<bool>;
}

pub type Shared = Arc<dyn Store>;

/// The database file under `state_dir`.
pub const DATABASE: &str = "hookrunner.db";

/// Why the store could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// The database has a schema a newer hookrunner made: starting this one again cannot mend that.
    Newer(String),
    /// The file is not a database, or a damaged one, or on a file system that takes no writes: nor can a
    /// restart mend this.
    Unusable(String),
    Other(String),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Newer(message)
            | OpenError::Unusable(message)
            | OpenError::Other(message) => f.write_str(message),
        }
    }
}

impl From<String> for OpenError {
    fn from(message: String) -> Self {
        OpenError::Other(message)
    }
}

/// Opens (creating and migrating) the store in `dir`.
pub fn open(dir: &Path) -> Result<Shared, OpenError> {
    sqlite::Sqlite::open(dir).map(|s| Arc::new(s) as Shared)
}

/// [`open`] for the daemon: a write lock another process holds is waited for briefly, so that requests
/// waiting for a commit get 503 while the sender still listens.
pub fn open_serving(dir: &Path) -> Result<Shared, OpenError> {
    sqlite::Sqlite::open_with(dir, sqlite::SERVING_BUSY_TIMEOUT).map(|s| Arc::new(s) as Shared)
}

/// `check`'s look at the store's database file: see [`schema::inspect`].
pub fn inspect(dir: &Path) -> Result<(), String> {
    schema::inspect(&dir.join(DATABASE))
}

/// Before the daemon opens its store: `dir` and what SQLite reads in it must be writable by this user
/// alone. The store's queued entries name the scripts they run, and SQLite replays a log (`-wal`) or a
/// hot journal it finds beside the database, whoever wrote it: another user able to write any of them
/// decides what runs as this one. The directory may be root's; the files must be `owner`'s (this user's
/// in the daemon; `None` in `check`, which may run as another user than the daemon, and checks the modes
/// alone). (The operator's CLI only reads, and checks nothing.)
pub fn check_private(dir: &Path, owner: Option<u32>) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let mut paths = vec![(dir.to_path_buf(), true)];
    for suffix in ["", "-wal", "-shm", "-journal", ".lock"] {
        paths.push((dir.join(format!("{DATABASE}{suffix}")), false));
    }
    for (path, is_dir) in paths {
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            // `check` run by another user than the daemon's may not see into a private state_dir
            // (0700, the package's): that is as it should be, and the daemon checks the rest itself.
            Err(e) if owner.is_none() && e.kind() == std::io::ErrorKind::PermissionDenied => {
                continue;
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let owner_ok = owner.is_none_or(|euid| meta.uid() == euid || (is_dir && meta.uid() == 0));
        if !owner_ok || meta.mode() & 0o022 != 0 {
            let daemon = owner.map_or_else(
                || "the daemon's user".to_string(),
                |euid| format!("this daemon's user (uid {euid})"),
            );
            return Err(format!(
                "{} belongs to uid {} with mode {:04o}, and whoever can write it decides what runs as \
                 {daemon}: make it that user's (chown) and chmod {} it",
                path.display(),
                meta.uid(),
                meta.mode() & 0o7777,
                if is_dir { "700" } else { "600" }
            ));
        }
    }
    Ok(())
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
