//! The SQLite backend: one database file in WAL mode with `synchronous=FULL`, so a committed transaction
//! survives a crash, a kill -9 or a power cut (SQLite's WAL document: with FULL, the WAL is synced at every
//! commit).
//!
//! Group commit: one writer thread owns the write connection. Requests hand it their work through a bounded
//! channel and wait for their own reply; it takes everything that has gathered, runs it in one transaction
//! (tried again with a savepoint around each piece if one fails, so one failing piece does not undo the
//! others), commits once, and only then answers every waiter. Many connections' accepts cost one fsync.
//! Work nobody waits for (history rows) is set aside in a list instead, which wakes the writer only when it
//! was empty: the first row of a gather wakes it, the rest of the rows cost a lock. A run's "running" mark
//! is waited for, so that no one can drop its entry once the script starts, but not synced.
//! Reads (the dispatcher, the CLI) use their own connection and never wait for the writer.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, OptionalExtension, Row as SqlRow, params};

use super::{
    Accepted, After, Attempt, Bounds, NewDelivery, Next, OpenError, Pending, Policy, Pruned, Query,
    Retention, Retried, Row, State, Store, StoreError, Summary, SyncRecord, Target, now_ms, schema,
};
use crate::routes::Glob;

/// Work waiting for the writer. More than this and a request waits to hand its work over (back-pressure,
/// bounded memory); one transaction takes all that has gathered, up to this many.
const CHANNEL: usize = 1024;
/// How long history rows wait for more before their transaction begins (never work someone waits for).
/// A transaction's own cost (its WAL frames and their checksums, the locks) is shared by every row in it:
/// at a Jamf estate's ~11 check-ins a second, 250 ms puts about three rows in each rather than one, and
/// the CLI still shows a row well within a second.
const GATHER: Duration = Duration::from_millis(250);
/// Each connection's page cache, in KiB (SQLite's negative `cache_size`).
const CACHE_KIB: i64 = -256;
/// What the write-ahead log is cut back to when SQLite starts it over after a checkpoint. It grows by a
/// transaction's pages past the 1,000-page checkpoint (~4 MiB), and without a limit the file keeps its
/// largest size for good: one 40 MB async body left a 41 MB log behind it.
const WAL_LIMIT: i64 = 8 << 20;
/// How long a connection waits for another process's write lock (the CLI's) before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The same for the daemon's writer, once the store is open: every accept waits for the writer, so a lock
/// held elsewhere (an operator's `BEGIN IMMEDIATE` in sqlite3) must turn into 503s soon enough for the
/// sender to read them (Jamf Pro waits 2 s), not into waits of a batch, then the next, at 5 s each.
pub(super) const SERVING_BUSY_TIMEOUT: Duration = Duration::from_millis(750);
/// What a history row takes besides its payload (its columns, attempts, index entries), to estimate how
/// many rows pruning must remove.
const ROW_OVERHEAD: i64 = 512;

/// Counts of waiting entries, read when first needed and then kept up to date by the writer's own changes,
/// so an accept's bounds are checked against what is committed plus what its transaction adds without
/// counting the queue: in a burst the queue grows to many thousands of entries, and a count in every
/// transaction made each commit scan all of them (12 ms at 3,000 entries, 125 ms at 24,000). They are read
/// again when another connection (the CLI's `retry` or `drop`) has committed since, and after a failed
/// commit. A transaction of history rows alone never reads them.
#[derive(Default)]
struct Counts {
    loaded: Option<Waiting>,
    /// `PRAGMA data_version` when they were read: it changes when another connection commits, never for
    /// this one's own commits.
    version: Option<i64>,
    /// Whether the writer's connection is at `synchronous = FULL` (`Some(false)`: NORMAL; `None`: not
    /// known). Kept here, beside the counts the writer keeps, so the level is set only when it changes:
    /// SQLite prepares a `PRAGMA synchronous` again at every run that follows the other level's.
    synchronous_full: Option<bool>,
}

#[derive(Clone, Copy)]
struct Waiting {
    queued: u64,
    queued_bytes: u64,
}

impl Counts {
    /// At the start of a transaction, under the write lock: forgets the counts if another connection has
    /// committed since they were read.
    fn check(&mut self, conn: &Connection) {
        let version = conn
            .prepare_cached("PRAGMA data_version")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .ok();
        if version.is_none() || version != self.version {
            self.loaded = None;
        }
        self.version = version;
    }

    fn forget(&mut self) {
        self.loaded = None;
    }

    /// An entry of `bytes` stopped waiting (done or dead).
    fn left(&mut self, bytes: u64) {
        if let Some(w) = &mut self.loaded {
            w.queued = w.queued.saturating_sub(1);
            w.queued_bytes = w.queued_bytes.saturating_sub(bytes);
        }
    }

    fn get(&mut self, conn: &Connection) -> Result<&mut Waiting, StoreError> {
        if self.loaded.is_none() {
            self.loaded = Some(waiting(conn)?);
        }
        Ok(self.loaded.get_or_insert(Waiting {
            queued: 0,
            queued_bytes: 0,
        }))
    }
}

/// A piece of work for the writer.
trait Work: Send {
    /// Runs it in the open transaction and keeps its result; says whether it succeeded. It runs again
    /// when its batch is tried a second time (see [`commit_batch`]), after the first try was rolled back.
    fn run(&mut self, conn: &Connection, counts: &mut Counts) -> bool;
    /// Answers it with its last run's result, now that the transaction that held it has ended thus.
    fn answer(self: Box<Self>, commit: Result<(), StoreError>);
    /// Answers it without running it.
    fn fail(self: Box<Self>, error: StoreError);
    /// Its last run's error, if it failed.
    fn failure(&self) -> Option<StoreError>;
    /// What its caller needs of the commit that holds it.
    fn wait(&self) -> Wait;
    fn durable(&self) -> bool {
        self.wait() == Wait::Durable
    }
}

/// What the caller of a piece of work needs of the commit that holds it. Work that need not be durable is
/// a single statement, which SQLite applies whole or not at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// On disk before it is answered (an accept, an attempt's result): the transaction is synced.
    Durable,
    /// Committed, so every other connection sees it, before it is answered, but not synced (a "running"
    /// mark, which the operator's `drop` must see before the script starts). It ends the writer's
    /// gathering at once, as durable work does.
    Committed,
    /// Nobody waits (a history row): set aside in the [`Later`] list, and committed with whatever comes
    /// next.
    SetAside,
}

type Job = Box<dyn Work>;

/// Work, what to do with its result, and the result of its last run.
struct Task<W, D, T> {
    work: W,
    done: D,
    wait: Wait,
    result: Option<Result<T, StoreError>>,
}

impl<W, D, T> Task<W, D, T> {
    fn new(work: W, done: D, wait: Wait) -> Task<W, D, T> {
        Task {
            work,
            done,
            wait,
            result: None,
        }
    }
}

impl<T, W, D> Work for Task<W, D, T>
where
    T: Send + 'static,
    W: FnMut(&Connection, &mut Counts) -> Result<T, StoreError> + Send + 'static,
    D: FnOnce(Result<T, StoreError>) + Send + 'static,
{
    fn run(&mut self, conn: &Connection, counts: &mut Counts) -> bool {
        let result = (self.work)(conn, counts);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn answer(self: Box<Self>, commit: Result<(), StoreError>) {
        let Task { done, result, .. } = *self;
        let ran = || Err(StoreError::Unavailable("the work was not run".into()));
        done(commit.and_then(|()| result.unwrap_or_else(ran)));
    }

    fn fail(self: Box<Self>, error: StoreError) {
        (self.done)(Err(error));
    }

    fn failure(&self) -> Option<StoreError> {
        self.result.as_ref()?.as_ref().err().cloned()
    }

    fn wait(&self) -> Wait {
        self.wait
    }
}

pub struct Sqlite {
    path: PathBuf,
    jobs: SyncSender<Job>,
    later: Arc<Later>,
    reader: Mutex<Connection>,
    broken: Arc<AtomicBool>,
    /// The daemon's claim on the store (see [`Sqlite::claim`]), held until the store is dropped.
    /// The state directory and `hookrunner.db.lock`, both flocked (see [`Sqlite::claim`]).
    claim: Mutex<Option<[fs::File; 2]>>,
}

impl Sqlite {
    /// Creates `dir` (0700) if it is missing, opens or creates the database in it (0600), migrates it to
    /// the newest schema and starts the writer thread.
    pub fn open(dir: &Path) -> Result<Sqlite, OpenError> {
        Sqlite::open_with(dir, BUSY_TIMEOUT)
    }

    /// [`Sqlite::open`], its writer waiting at most `busy` for another process's write lock once the
    /// schema is migrated.
    pub fn open_with(dir: &Path, busy: Duration) -> Result<Sqlite, OpenError> {
        let context = |what: &str, e: &dyn std::fmt::Display| {
            format!("state_dir {}: {what}: {e}", dir.display())
        };
        // What a restart cannot mend is told apart, so that a supervisor does not try.
        let sql_error = |what: &str, e: &rusqlite::Error| {
            if is_damage(e) {
                OpenError::Unusable(format!("{}{DAMAGE_HINT}", context(what, e)))
            } else {
                OpenError::Other(context(what, e))
            }
        };
        let io_error = |what: &str, e: &io::Error| {
            if e.kind() == io::ErrorKind::ReadOnlyFilesystem {
                OpenError::Unusable(context(what, e))
            } else {
                OpenError::Other(context(what, e))
            }
        };
        match fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
        {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_error("cannot create", &e)),
        }
        let path = dir.join(super::DATABASE);
        // Created here so it is private from the start; SQLite gives its -wal and -shm files the same mode.
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_error("cannot create the database", &e))?;
        let mut writer = connect(&path).map_err(|e| sql_error("cannot open the database", &e))?;
        // Only takes effect on a new, empty database: freed pages can then be given back with
        // `PRAGMA incremental_vacuum` instead of a full VACUUM that rewrites the file. Set only there:
        // on an existing database the pragma rewrites the header, a commit and two fsyncs at every start.
        let pages: i64 = writer
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .map_err(|e| sql_error("cannot read the database", &e))?;
        if pages == 0 {
            writer
                .pragma_update(None, "auto_vacuum", "INCREMENTAL")
                .map_err(|e| context("cannot set auto_vacuum", &e))?;
        }
        let mode: String = writer
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| sql_error("cannot enable WAL", &e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(context("cannot enable WAL", &format!("journal mode is {mode}")).into());
        }
        schema::migrate(&mut writer).map_err(|e| match e {
            OpenError::Newer(m) => OpenError::Newer(context("schema", &m)),
            OpenError::Unusable(m) => OpenError::Unusable(context("schema", &m)),
            OpenError::Other(m) => OpenError::Other(context("schema", &m)),
        })?;
        writer
            .busy_timeout(busy)
            .map_err(|e| context("cannot set the busy timeout", &e))?;
        let reader = connect(&path).map_err(|e| context("cannot open the database", &e))?;
        let (jobs, queue) = mpsc::sync_channel(CHANNEL);
        let broken = Arc::new(AtomicBool::new(false));
        let later = Arc::new(Later::default());
        let (flag, set_aside) = (Arc::clone(&broken), Arc::clone(&later));
        std::thread::Builder::new()
            .name("hookrunner-store".into())
            .spawn(move || write_loop(&writer, &queue, &set_aside, &flag))
            .map_err(|e| context("cannot start the writer thread", &e))?;
        Ok(Sqlite {
            path,
            jobs,
            later,
            reader: Mutex::new(reader),
            broken,
            claim: Mutex::new(None),
        })
    }

    /// `hookrunner.db.lock`, beside the database.
    fn lock_path(&self) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(".lock");
        PathBuf::from(name)
    }

    /// Takes an exclusive `flock` on the state directory and on `hookrunner.db.lock` beside the database,
    /// for as long as this store is open. Two daemons on one store would each take the other's running entries for ones a crash
    /// left behind, queue them again at start (`recover`) and run them a second time, even at once; the
    /// second daemon is refused instead. Its payload directory has a lock of its own, but two daemons can
    /// have different payload directories (a `sudo hookrunner serve` beside the service gets another
    /// default) and still share the store. The lock goes with the process, however it ends.
    fn claim(&self) -> Result<(), StoreError> {
        let mut claim = self.claim.lock().unwrap_or_else(PoisonError::into_inner);
        if claim.is_some() {
            return Ok(());
        }
        // The directory too, first: a removed `hookrunner.db.lock` must not let a second daemon in.
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let directory = fs::File::open(dir)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", dir.display())))?;
        let lock_path = self.lock_path();
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot open {}: {e}", lock_path.display()))
            })?;
        for (file, path) in [(&directory, dir), (&lock, lock_path.as_path())] {
            match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    return Err(StoreError::Unavailable(format!(
                        "{} is in use by another hookrunner serve; give each daemon its own state_dir",
                        self.path.display()
                    )));
                }
                Err(e) => {
                    return Err(StoreError::Unavailable(format!(
                        "cannot lock {}: {e}",
                        path.display()
                    )));
                }
            }
        }
        *claim = Some([directory, lock]);
        Ok(())
    }

    /// Hands `work` to the writer and waits until the transaction that holds it is on disk.
    fn write<T: Send + 'static>(
        &self,
        work: impl FnMut(&Connection, &mut Counts) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.write_as(Wait::Durable, work)
    }

    /// Hands `work` to the writer and waits until the transaction that holds it has ended as `wait`
    /// asks (durable or committed).
    fn write_as<T: Send + 'static>(
        &self,
        wait: Wait,
        work: impl FnMut(&Connection, &mut Counts) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(
            work,
            move |result| {
                let _ = tx.send(result);
            },
            wait,
        )?;
        rx.recv().unwrap_or_else(|_| Err(self.writer_gone()))
    }

    /// A job dropped unanswered, or a channel closed: the writer thread is gone (it unwound). Said here
    /// too, not only by the writer's own guard, which runs after the batch it dropped: whoever learns of
    /// it first must find the store broken already.
    fn writer_gone(&self) -> StoreError {
        self.broken.store(true, Ordering::SeqCst);
        StoreError::Broken("the writer thread stopped".into())
    }

    /// Hands `work` to the writer; `done` gets its result once its transaction has ended.
    fn submit<T: Send + 'static>(
        &self,
        work: impl FnMut(&Connection, &mut Counts) -> Result<T, StoreError> + Send + 'static,
        done: impl FnOnce(Result<T, StoreError>) + Send + 'static,
        wait: Wait,
    ) -> Result<(), StoreError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(broken_error());
        }
        let job: Job = Box::new(Task::new(work, done, wait));
        if wait == Wait::SetAside {
            self.set_aside(job)
        } else {
            self.jobs.send(job)
        }
        .map_err(|_| self.writer_gone())
    }

    /// Puts work nobody waits for in the [`Later`] list, waking the writer when the list asks for it.
    fn set_aside(&self, job: Job) -> Result<(), mpsc::SendError<Job>> {
        match self.later.push(job) {
            Ok(false) => return Ok(()),
            Ok(true) => {}
            Err(job) => return Err(mpsc::SendError(job)),
        }
        // A wake-up with no work of its own: the writer gathers, then takes the list. The channel is
        // bounded: a writer that has fallen behind holds the caller here.
        self.jobs.send(nothing())
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        f(&conn).map_err(|e| {
            let failure = classify(&e);
            // A read that finds the file damaged: the writer may still commit pages it holds, and acks
            // would go on for entries that no start will find. The daemon stops instead.
            if matches!(failure, StoreError::Broken(_)) && !self.broken.swap(true, Ordering::SeqCst)
            {
                log::error!("store: {failure}; nothing more is written and the daemon stops");
            }
            failure
        })
    }

    /// A row's number from `deliveries show ID`: the number itself, or the row of a request id.
    fn resolve(&self, id: &str) -> Result<Option<i64>, StoreError> {
        if let Ok(n) = id.parse::<i64>() {
            return Ok(Some(n));
        }
        let id = id.to_string();
        self.read(move |c| {
            c.query_row(
                "SELECT id FROM deliveries WHERE request_id = ?1 ORDER BY id DESC LIMIT 1",
                [id],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// The database file and its WAL, as they take space on the disk.
    fn bytes_on_disk(&self) -> u64 {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        [self.path.as_os_str(), wal.as_os_str()]
            .iter()
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// Work that does nothing and that nobody waits for.
fn nothing() -> Job {
    Box::new(Task::new(
        |_: &Connection, _: &mut Counts| Ok(()),
        |_| {},
        Wait::SetAside,
    ))
}

fn broken_error() -> StoreError {
    StoreError::Broken(
        "an earlier write to the store failed; the daemon is stopping for its supervisor to restart it"
            .into(),
    )
}

fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // The default page cache (2 MiB) per connection would triple the daemon's idle memory; the writer
    // appends and the readers look at the recent end of the queue, which a small cache holds.
    conn.pragma_update(None, "cache_size", CACHE_KIB)?;
    conn.pragma_update(None, "journal_size_limit", WAL_LIMIT)?;
    // The writer's statements (each kind of work, the transaction's own) all stay prepared.
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// SQLite finding the file damaged, or no database at all: written to while the daemon ran (a restore
/// over it, its `-wal` removed or truncated), or broken on the disk.
fn is_damage(e: &rusqlite::Error) -> bool {
    // A file shorter than SQLite's own record of it says (a -wal truncated under it).
    const SQLITE_IOERR_SHORT_READ: i32 = 522;
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
                || f.extended_code == SQLITE_IOERR_SHORT_READ
    )
}

const DAMAGE_HINT: &str = " (the database or its -wal was changed while a daemon had it open, or is \
     damaged on the disk: see the README on restoring the store)";

/// Maps SQLite's errors to what a sender is told and what the daemon does. A failed fsync poisons the store
/// (see [`StoreError::Broken`]); a full disk, a lock held too long or anything else fails this work only.
fn classify(e: &rusqlite::Error) -> StoreError {
    const SQLITE_IOERR_FSYNC: i32 = 1034;
    const SQLITE_IOERR_DIR_FSYNC: i32 = 1290;
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.extended_code, SQLITE_IOERR_FSYNC | SQLITE_IOERR_DIR_FSYNC) =>
        {
            StoreError::Broken(format!(
                "{e}: after a failed fsync the kernel may have dropped what it could not write"
            ))
        }
        _ if is_damage(e) => StoreError::Broken(format!("{e}{DAMAGE_HINT}")),
        rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::DiskFull => {
            StoreError::Unavailable("the disk is full".into())
        }
        _ => StoreError::Unavailable(e.to_string()),
    }
}

/// Work nobody waits for, set aside for the writer's next transaction. Whoever finds it empty wakes the
/// writer (through the channel), and so does whoever makes it [`CHANNEL`] long, which ends the writer's
/// gather; past that, callers wait until the writer has taken it (back-pressure, bounded memory, as the
/// bounded channel gives the work that comes through it).
#[derive(Default)]
struct Later {
    list: Mutex<List>,
    taken: Condvar,
}

#[derive(Default)]
struct List {
    jobs: Vec<Job>,
    /// The writer is gone: nothing pushed now would ever be taken.
    closed: bool,
}

impl Later {
    /// Adds `job`, once there is room; says whether the writer must be woken for it. Gives the job back
    /// when the writer is gone.
    fn push(&self, job: Job) -> Result<bool, Job> {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        let mut list = self
            .taken
            .wait_while(list, |l| l.jobs.len() >= CHANNEL && !l.closed)
            .unwrap_or_else(|e| e.into_inner());
        if list.closed {
            return Err(job);
        }
        list.jobs.push(job);
        Ok(list.jobs.len() == 1 || list.jobs.len() == CHANNEL)
    }

    /// Whether the writer should stop gathering and take the list now.
    fn long(&self) -> bool {
        self.list
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .jobs
            .len()
            >= CHANNEL
    }

    fn take(&self) -> Vec<Job> {
        let jobs = std::mem::take(&mut self.list.lock().unwrap_or_else(|e| e.into_inner()).jobs);
        self.taken.notify_all();
        jobs
    }

    /// The writer is ending: whoever waits for room, and whoever comes later, is refused; returns what
    /// was still set aside.
    fn close(&self) -> Vec<Job> {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.closed = true;
        let jobs = std::mem::take(&mut list.jobs);
        self.taken.notify_all();
        jobs
    }
}

/// Held by the writer thread for its whole life. When it ends, by a panic too (a bug: the release
/// profile unwinds), the store is marked broken, so the daemon stops for its supervisor to restart it,
/// and the set-aside list is closed and its work failed, so no caller waits for room forever.
struct WriterEnd<'a> {
    later: &'a Later,
    broken: &'a AtomicBool,
}

impl Drop for WriterEnd<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            log::error!(
                "store: the writer thread failed; nothing more is written and the daemon stops"
            );
        }
        self.broken.store(true, Ordering::SeqCst);
        for job in self.later.close() {
            job.fail(broken_error());
        }
    }
}

fn write_loop(conn: &Connection, queue: &Receiver<Job>, later: &Later, broken: &AtomicBool) {
    let _end = WriterEnd { later, broken };
    let mut counts = Counts::default();
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        // History rows wait a moment for company, so a stream of sync requests costs one transaction per
        // up to GATHER rather than one per request; work someone waits for ends the wait at once.
        let gather = Instant::now() + GATHER;
        while batch.len() < CHANNEL
            && batch.iter().all(|j| j.wait() == Wait::SetAside)
            && !later.long()
        {
            let left = gather.saturating_duration_since(Instant::now());
            match queue.recv_timeout(left) {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        while batch.len() < CHANNEL {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // The set-aside work goes first: a piece of it was set aside before any work of the same thread
        // that came through the channel meanwhile, and the channel's work of other threads does not
        // depend on it.
        let mut set_aside = later.take();
        if !set_aside.is_empty() {
            set_aside.append(&mut batch);
            batch = set_aside;
        }
        if broken.load(Ordering::SeqCst) {
            for job in batch {
                job.fail(broken_error());
            }
            continue;
        }
        let result = commit_batch(conn, batch, &mut counts);
        if let Err(StoreError::Broken(e)) = &result {
            if !broken.swap(true, Ordering::SeqCst) {
                log::error!("store: {e}; nothing more is written and the daemon stops");
            }
        }
    }
}

/// Runs a batch in one transaction and answers each job with the commit's result. A batch of which no job
/// needs its commit on disk is committed without an fsync (`synchronous=NORMAL`: in WAL mode that can lose
/// the last such commits in a power cut, never a process crash, and never corrupts); the next durable
/// commit syncs them with it.
///
/// The first try runs every job straight in the transaction. A durable job is several statements, and if
/// one of them fails (a full disk, a constraint) its earlier ones must not commit with the others: the
/// whole try is rolled back and the batch runs again with a savepoint around each durable job, so only the
/// failing one's writes are undone. Savepoints only then, because the statement journal SQLite keeps for
/// each one (a copy of every page it changes) was an eighth of the writer's instructions.
fn commit_batch(
    conn: &Connection,
    mut batch: Vec<Job>,
    counts: &mut Counts,
) -> Result<(), StoreError> {
    let durable = batch.iter().any(|j| j.durable());
    let result = transaction(conn, &mut batch, counts, durable, false);
    for job in batch {
        job.answer(result.clone());
    }
    result
}

/// One try at `batch` (see [`commit_batch`]): how its transaction ended. A try without savepoints in which
/// a durable job fails is rolled back and followed by the try with them.
fn transaction(
    conn: &Connection,
    batch: &mut [Job],
    counts: &mut Counts,
    durable: bool,
    savepoints: bool,
) -> Result<(), StoreError> {
    // Cached: parsing these statements again cost more than a history row's own insert.
    let run = |sql: &str| conn.prepare_cached(sql).and_then(|mut s| s.execute([]));
    let level = if counts.synchronous_full == Some(durable) {
        Ok(0)
    } else if durable {
        run("PRAGMA synchronous = FULL")
    } else {
        run("PRAGMA synchronous = NORMAL")
    };
    counts.synchronous_full = level.as_ref().ok().map(|_| durable);
    let begun = level
        .and_then(|_| run("BEGIN IMMEDIATE"))
        .map(|_| ())
        .map_err(|e| classify(&e));
    if let Err(e) = begun {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(e);
    }
    counts.check(conn);
    for job in batch.iter_mut() {
        let saved = savepoints && job.durable() && run("SAVEPOINT job").is_ok();
        let ok = job.run(conn, counts);
        if conn.is_autocommit() {
            // SQLite rolled the whole transaction back by itself (an I/O error; a full disk where no
            // statement journal could undo the one statement): what ran before is gone, and whatever ran
            // next, a savepoint included, would commit on its own while every job is answered with an
            // error. So the batch ends here, all of it undone.
            counts.forget();
            return Err(job.failure().unwrap_or_else(|| {
                StoreError::Unavailable("SQLite rolled the transaction back".into())
            }));
        }
        if saved {
            if !ok {
                let _ = conn.execute_batch("ROLLBACK TO job");
            }
            let _ = run("RELEASE job");
        } else if !ok && job.durable() && !matches!(job.failure(), Some(StoreError::Full(_))) {
            // (A full queue is found before anything is written: that job is refused, the rest stand.)
            counts.forget();
            let _ = conn.execute_batch("ROLLBACK");
            if savepoints {
                // No savepoint could be opened: nothing of this batch can be kept apart from the rest.
                return Err(StoreError::Unavailable("could not open a savepoint".into()));
            }
            return transaction(conn, batch, counts, durable, true);
        }
    }
    let result = run("COMMIT").map(|_| ()).map_err(|e| classify(&e));
    if result.is_err() {
        counts.forget();
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
    }
    result
}

/// Rows one step of pruning changes at most.
const PRUNE_STEP: i64 = 1000;
/// Pages one step of pruning gives back to the file system at most (4 MiB of 4 KiB pages).
const VACUUM_STEP: i64 = 1024;

/// The oldest finished rows whose room covers `?1` bytes, each counted as `?2` plus its payload, among
/// the first `?3` of them numbered `?4` or less that are dead letters (`?5` true) or not (false).
const PRUNE_OLDEST: &str = "DELETE FROM deliveries WHERE id IN (
         SELECT id FROM (
             SELECT id, cost, sum(cost) OVER (ORDER BY id) AS upto FROM (
                 SELECT id, ?2 + CASE WHEN payload IS NULL THEN 0 ELSE payload_bytes END AS cost
                 FROM deliveries
                 WHERE finished_at IS NOT NULL AND id <= ?4 AND (state = 'dead') = ?5
                 ORDER BY id LIMIT ?3))
         WHERE upto - cost < ?1)";
/// Payloads of rows finished before `?1`, at most `?2` of them. The keeping counts from the end, not from
/// the arrival: an entry that went on retrying for longer keeps its body for `deliveries retry`. (A row
/// finishes after it arrives, so `received_at` bounds the index's range; the few retried for long are
/// read and passed over.)
const PRUNE_PAYLOADS: &str = "UPDATE deliveries SET payload = NULL WHERE id IN (
         SELECT id FROM deliveries
         WHERE payload IS NOT NULL AND finished_at IS NOT NULL AND received_at < ?1
           AND finished_at < ?1
         LIMIT ?2)";
/// Rows finished before `?1`, at most `?2` of them.
const PRUNE_HISTORY: &str = "DELETE FROM deliveries WHERE id IN (
         SELECT id FROM deliveries
         WHERE finished_at IS NOT NULL AND received_at < ?1 AND finished_at < ?1 LIMIT ?2)";
/// Dedupe keys accepted before `?1`, at most `?2` of them.
const PRUNE_DEDUPE: &str = "DELETE FROM dedupe WHERE key IN (
         SELECT key FROM dedupe WHERE accepted_at < ?1 LIMIT ?2)";

/// What one step of pruning did.
enum Step {
    Payloads(u64),
    Rows(u64),
    Other,
}

/// The first piece of pruning that has work left, at most [`PRUNE_STEP`] rows of it; `None` when there
/// is none: payloads past `keep_payloads`, rows past `keep_history`, dedupe keys past `dedupe_window`, the
/// oldest finished rows up to `newest` while the store is over `max_store_bytes` (dead letters after the
/// others, never an entry still waiting), and last the freed pages given back to the file system.
fn prune_step(
    conn: &Connection,
    retention: &Retention,
    now: i64,
    newest: i64,
    by_size: bool,
) -> Result<Option<Step>, StoreError> {
    // What time has put past its keeping, a step's worth of the first that has any.
    type Past = (&'static str, Duration, fn(u64) -> Step);
    let past: [Past; 3] = [
        (PRUNE_PAYLOADS, retention.keep_payloads, Step::Payloads),
        (PRUNE_HISTORY, retention.keep_history, Step::Rows),
        (PRUNE_DEDUPE, retention.dedupe_window, |_| Step::Other),
    ];
    for (statement, keep, step) in past {
        let n = conn
            .prepare_cached(statement)?
            .execute(params![now - keep.as_millis() as i64, PRUNE_STEP])
            .map_err(sql)? as u64;
        if n > 0 {
            return Ok(Some(step(n)));
        }
    }
    let used = used_bytes(conn).map_err(sql)?;
    if by_size && used > retention.max_store_bytes as i64 {
        // The oldest finished rows (by number, which is arrival order), as many as the excess is estimated
        // to take (their payloads and a row's overhead) and at most a step's worth; the next step looks at
        // the size again. Dead letters go only when no other finished row is left: they wait for an
        // operator's `deliveries retry`, and a busy route's history must not push them out.
        for dead in [false, true] {
            let rows = conn
                .prepare_cached(PRUNE_OLDEST)?
                .execute(params![
                    used - retention.max_store_bytes as i64,
                    ROW_OVERHEAD,
                    PRUNE_STEP,
                    newest,
                    dead
                ])
                .map_err(sql)? as u64;
            if rows > 0 {
                return Ok(Some(Step::Rows(rows)));
            }
        }
    }
    let free: i64 = conn
        .query_row("PRAGMA freelist_count", [], |r| r.get(0))
        .map_err(sql)?;
    if free > 0 {
        // Gives freed pages back to the file system (auto_vacuum = INCREMENTAL). The pragma frees one
        // page per row it returns, so it is read to its end (executing it would free one).
        let mut vacuum =
            conn.prepare_cached(&format!("PRAGMA incremental_vacuum({VACUUM_STEP})"))?;
        let mut freed = vacuum.query([])?;
        while freed.next()?.is_some() {}
        drop(freed);
        let left: i64 = conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))
            .map_err(sql)?;
        // A database made before auto_vacuum was set cannot give pages back: nothing changes, and
        // pruning ends rather than try again.
        if left < free {
            return Ok(Some(Step::Other));
        }
    }
    Ok(None)
}

/// The bytes of the database's pages in use (its size less the pages free for reuse).
fn used_bytes(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT (page_count - freelist_count) * page_size
         FROM pragma_page_count, pragma_freelist_count, pragma_page_size",
        [],
        |r| r.get(0),
    )
}

/// Over `max_store_bytes`: whether removing finished rows can bring the store under it; with the bytes in
/// use and an estimate of those nothing may prune (entries not finished, dedupe keys). When those are over
/// the bound by themselves, removing every finished row would gain nothing and lose the history and the
/// dead letters: they are kept. The estimate counts what the rows hold and a row's overhead, not how they
/// fill their pages, so it errs low: towards pruning, as before. Read on a reader, only while the store is
/// over the bound.
fn size_can_help(conn: &Connection, max_store_bytes: u64) -> rusqlite::Result<(bool, i64, i64)> {
    let used = used_bytes(conn)?;
    if used <= max_store_bytes as i64 {
        return Ok((true, used, 0));
    }
    let kept: f64 = conn.query_row(
        "SELECT (SELECT total(?1 + coalesce(payload_bytes, 0)) FROM deliveries WHERE finished_at IS NULL)
              + (SELECT total(2 * length(key) + length(request_id) + 64) FROM dedupe)",
        [ROW_OVERHEAD],
        |r| r.get(0),
    )?;
    let kept = kept as i64;
    Ok((kept < max_store_bytes as i64, used, kept))
}

fn waiting(conn: &Connection) -> Result<Waiting, StoreError> {
    conn.query_row(
        "SELECT count(*), total(payload_bytes) FROM deliveries
         WHERE state NOT IN ('done', 'dead') AND mode = 'async'",
        [],
        |r| {
            Ok(Waiting {
                queued: r.get::<_, i64>(0)? as u64,
                queued_bytes: r.get::<_, f64>(1)? as u64,
            })
        },
    )
    .map_err(|e| classify(&e))
}

fn sql(e: rusqlite::Error) -> StoreError {
    classify(&e)
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        classify(&e)
    }
}

fn accept_in(
    conn: &Connection,
    counts: &mut Counts,
    d: &NewDelivery,
    bounds: Bounds,
) -> Result<Accepted, StoreError> {
    let now = now_ms();
    if let Some(key) = &d.dedupe_key {
        let since = now - bounds.dedupe_window.as_millis() as i64;
        let first = conn
            .query_row(
                "SELECT delivery, request_id, status FROM dedupe WHERE key = ?1 AND accepted_at >= ?2",
                params![key, since],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(sql)?;
        if let Some((id, request_id, status)) = first {
            return Ok(Accepted::Duplicate {
                id,
                request_id,
                status,
            });
        }
    }
    let counts = counts.get(conn)?;
    if counts.queued >= bounds.max_queued {
        return Err(StoreError::Full(format!(
            "max_queued = {} entries",
            bounds.max_queued
        )));
    }
    let bytes = d.body.len() as u64;
    if counts.queued_bytes.saturating_add(bytes) > bounds.max_queued_bytes {
        return Err(StoreError::Full(format!(
            "max_queued_bytes = {} bytes",
            bounds.max_queued_bytes
        )));
    }
    let env = serde_json::to_string(&d.env).unwrap_or_else(|_| "[]".into());
    conn.prepare_cached("INSERT INTO deliveries (request_id, received_at, mode, sender, event, route_line, script,
             delivery_id, state, status, max_attempts, retry_max_ms, timeout_ms, serial, due_at, env,
             payload, payload_bytes)
         VALUES (?1, ?2, 'async', ?3, ?4, ?5, ?6, ?7, 'queued', ?8, ?9, ?10, ?11, ?12, ?2, ?13, ?14, ?15)")?
.execute(
        params![
            d.request_id,
            d.received_at,
            d.sender,
            d.event,
            d.route_line as i64,
            d.script,
            d.delivery_id,
            d.ack_status,
            d.policy.max_attempts,
            d.policy.retry_max.as_millis() as i64,
            d.policy.timeout.as_millis() as i64,
            d.policy.serial,
            env,
            d.body,
            bytes as i64,
        ],
    )
    .map_err(sql)?;
    let id = conn.last_insert_rowid();
    if let Some(key) = &d.dedupe_key {
        conn.prepare_cached(
            "INSERT OR REPLACE INTO dedupe (key, delivery, request_id, status, accepted_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![key, id, d.request_id, d.ack_status, now])
        .map_err(sql)?;
    }
    counts.queued += 1;
    counts.queued_bytes += bytes;
    Ok(Accepted::Queued { id })
}

/// An entry retried past its route's attempts (exit 75, through a long outage: two dozen attempts a day
/// at the default `retry_max`, each with up to 4 KiB of output) keeps its first attempts, which say how
/// the trouble began, and its latest, which say where it stands; those between go. Otherwise a waiting
/// entry, which pruning never touches, would grow the store without bound. An entry keeps
/// `ATTEMPTS_KEPT` or its route's attempts, whichever is more, so within its attempts it keeps every
/// one; never more than the most a route may have. (`max_attempts` grows by one with each `deliveries
/// retry` and each restart that finds the entry running, so it alone is no bound.) The row's `attempts`
/// still counts every one.
const FIRST_ATTEMPTS_KEPT: u32 = 5;
const ATTEMPTS_KEPT: u32 = 25;
/// The most attempts a route may have: `retries=100` and the first.
const MOST_ATTEMPTS_KEPT: u32 = crate::routes::RETRIES.max as u32 + 1;

/// Writes attempt `a` of entry `id`, whose route allows `max_attempts`.
fn insert_attempt(
    conn: &Connection,
    id: i64,
    a: &Attempt,
    max_attempts: u32,
) -> rusqlite::Result<()> {
    let kept = ATTEMPTS_KEPT.max(max_attempts).min(MOST_ATTEMPTS_KEPT);
    if a.n > kept {
        conn.prepare_cached("DELETE FROM attempts WHERE delivery = ?1 AND n > ?2 AND n <= ?3")?
            .execute(params![
                id,
                FIRST_ATTEMPTS_KEPT,
                a.n - (kept - FIRST_ATTEMPTS_KEPT)
            ])?;
    }
    conn.prepare_cached(
        "INSERT OR REPLACE INTO attempts (delivery, n, started_at, duration_ms, exit_code, signal,
             timed_out, output)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        id,
        a.n,
        a.started_at,
        a.duration_ms,
        a.exit_code,
        a.signal,
        a.timed_out,
        a.output
    ])
    .map(drop)
}

/// A sync row and its one attempt, in one statement (see schema's migration 2).
fn record_in(conn: &Connection, r: &SyncRecord) -> rusqlite::Result<()> {
    let a = r.attempt.as_ref();
    let ok = a.is_some_and(|a| a.exit_code == Some(0));
    let state = if ok { State::Done } else { State::Failed };
    let bytes = r.body_bytes as i64;
    conn.prepare_cached(
        "INSERT INTO deliveries (request_id, received_at, mode, sender, event, route_line, script,
             delivery_id, state, status, attempts, last_exit, finished_at, payload, payload_bytes,
             run_started_at, run_ms, run_signal, run_timed_out, run_output)
         VALUES (?1, ?2, 'sync', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
             ?18, ?19)",
    )?
    .execute(params![
        r.request_id,
        r.received_at,
        r.sender,
        r.event,
        r.route_line as i64,
        r.script,
        r.delivery_id,
        state.as_str(),
        r.status,
        u32::from(r.attempt.is_some()),
        r.attempt.as_ref().and_then(|a| a.exit_code),
        r.finished_at,
        r.body,
        bytes,
        a.map(|a| a.started_at),
        a.map(|a| a.duration_ms),
        a.and_then(|a| a.signal),
        a.map(|a| a.timed_out),
        a.map(|a| a.output.as_str()),
    ])?;
    Ok(())
}

/// Answered from the covering index `deliveries_async_open` alone (a test in `metrics` checks the plan).
pub(crate) const BACKLOG: &str = "SELECT state, count(*) FROM deliveries
     WHERE mode = 'async' AND state != 'done' GROUP BY state";

/// The dispatcher's read of the queue, a page at a time past (`?1` due time, `?2` id): the entries of
/// routes that are not serial (the index's `serial = 0` part), due by `?3`, in the order they came due.
/// The state and mode terms are the waiting index's own condition, written out: SQLite uses a partial
/// index only where it finds that condition in the query, and without it this read scanned the whole
/// history. The index is ordered by due time, so the read is one range of it and ends at the first entry
/// not due: the entries waiting to retry later are never walked. No `LIMIT ?`: SQLite plans with a
/// bound LIMIT's value, so binding it again at every look made it prepare the statement again (most of a
/// look's cost); the caller stops reading at its page's end instead.
const PENDING: &str =
    "SELECT id, request_id, received_at, event, route_line, script, env, attempts,
         due_at, max_attempts, retry_max_ms, timeout_ms, serial
     FROM deliveries
     WHERE state NOT IN ('done', 'dead') AND state != 'running'
       AND mode = 'async' AND serial = 0 AND (due_at, id) > (?1, ?2) AND due_at <= ?3
     ORDER BY due_at, id";
/// The first entry of every serial lane (a script) that has one waiting, due or not: the lanes are walked
/// through the lanes index, skipping from one script to the next (one search each), and each lane's first
/// entry is found by another. What waits behind it is never read.
const LANE_HEADS: &str = "WITH RECURSIVE lane(script) AS (
         SELECT min(script) FROM deliveries
         WHERE mode = 'async' AND serial AND state IN ('queued', 'failed')
         UNION ALL
         SELECT (SELECT min(script) FROM deliveries
                 WHERE mode = 'async' AND serial AND state IN ('queued', 'failed')
                   AND script > lane.script)
         FROM lane WHERE lane.script IS NOT NULL
     )
     SELECT d.id, d.request_id, d.received_at, d.event, d.route_line, d.script, d.env, d.attempts,
         d.due_at, d.max_attempts, d.retry_max_ms, d.timeout_ms, d.serial
     FROM lane JOIN deliveries AS d ON d.id = (
         SELECT min(id) FROM deliveries
         WHERE mode = 'async' AND serial AND state IN ('queued', 'failed') AND script = lane.script)
     ORDER BY d.id";
/// At start, entries a crash left running (found through the waiting index, not a scan): their
/// interrupted attempt is kept, as one without an exit (when it started is not known, so the time it was
/// due stands in). It counts, so the script sees the next number and can tell it may have run before.
const RECOVER_ATTEMPTS: &str = "INSERT OR IGNORE INTO attempts (delivery, n, started_at, duration_ms,
         exit_code, signal, timed_out, output)
     SELECT id, attempts + 1, coalesce(due_at, received_at), 0, NULL, NULL, 0,
         'interrupted: hookrunner stopped before this attempt''s result was recorded (a crash, kill -9, a \
          power cut); it may have run in part or in full'
     FROM deliveries WHERE state NOT IN ('done', 'dead') AND state = 'running' AND mode = 'async'";
/// ...and then they are queued again, with that attempt counted and one more always allowed (at least
/// once, whatever attempts they had left).
const RECOVER: &str = "UPDATE deliveries SET state = 'queued', attempts = attempts + 1,
         max_attempts = max(max_attempts, attempts + 2)
     WHERE state NOT IN ('done', 'dead') AND state = 'running' AND mode = 'async'";

/// [`Store::due_again`]: the waiting entries due later than `?1` (now) plus the longest pause they could
/// have: `?2` (ms) for a first attempt, put back by the daemon, else their route's `retry_max` if longer.
const DUE_AGAIN: &str = "UPDATE deliveries SET due_at = ?1
     WHERE mode = 'async' AND state NOT IN ('done', 'dead') AND state != 'running'
       AND due_at > ?1 + CASE WHEN attempts = 0 THEN ?2 ELSE max(retry_max_ms, ?2) END";

/// The dead letters `deliveries retry --dead` runs again.
const RETRY_DEAD: &str = "SELECT id, event FROM deliveries
     WHERE mode = 'async' AND state != 'done' AND state = 'dead' ORDER BY id";

/// An entry as [`PENDING`] and [`LANE_HEADS`] read it.
fn pending_row(r: &SqlRow<'_>) -> rusqlite::Result<Pending> {
    let env: String = r.get(6)?;
    Ok(Pending {
        id: r.get(0)?,
        request_id: r.get(1)?,
        received_at: r.get(2)?,
        event: r.get(3)?,
        route_line: r.get::<_, i64>(4)? as usize,
        script: r.get(5)?,
        env: serde_json::from_str(&env).unwrap_or_default(),
        attempts: r.get(7)?,
        due_at: r.get::<_, Option<i64>>(8)?.unwrap_or(0),
        policy: Policy {
            max_attempts: r.get(9)?,
            retry_max: Duration::from_millis(r.get::<_, i64>(10)?.max(0) as u64),
            timeout: Duration::from_millis(r.get::<_, i64>(11)?.max(0) as u64),
            serial: r.get(12)?,
        },
    })
}

const ROW_COLUMNS: &str = "id, request_id, received_at, mode, sender, event, route_line, script, \
     delivery_id, state, status, attempts, last_exit, due_at, finished_at, payload_bytes, \
     payload IS NOT NULL";

fn row(r: &SqlRow<'_>) -> rusqlite::Result<Row> {
    let mode: String = r.get(3)?;
    let state: String = r.get(9)?;
    Ok(Row {
        id: r.get(0)?,
        request_id: r.get(1)?,
        received_at: r.get(2)?,
        mode: if mode == "sync" { "sync" } else { "async" },
        sender: r.get(4)?,
        event: r.get(5)?,
        route_line: r.get::<_, i64>(6)? as usize,
        script: r.get(7)?,
        delivery_id: r.get(8)?,
        state: State::parse(&state).unwrap_or(State::Failed),
        status: r.get(10)?,
        attempts: r.get(11)?,
        last_exit: r.get(12)?,
        due_at: r.get(13)?,
        finished_at: r.get(14)?,
        payload_bytes: r.get::<_, i64>(15)? as u64,
        payload_kept: r.get(16)?,
    })
}

impl Store for Sqlite {
    fn accept(&self, delivery: NewDelivery, bounds: Bounds) -> Result<Accepted, StoreError> {
        self.write(move |conn, counts| accept_in(conn, counts, &delivery, bounds))
    }

    fn flush(&self) {
        // Work someone waits for ends the writer's gather at once, and commits all that came before it.
        let _ = self.write(|_, _| Ok(()));
    }

    fn record(&self, record: SyncRecord) {
        let request_id = record.request_id.clone();
        // Set aside (see [`Later`]); a writer that is behind holds this request back rather than lose
        // the row, and a broken store writes nothing more.
        let _ = self.submit(
            move |conn, _| record_in(conn, &record).map_err(sql),
            move |result| {
                if let Err(e) = result {
                    log::warn!("{request_id} history row not written: {e}");
                }
            },
            Wait::SetAside,
        );
    }

    fn pending(&self, after: After, due_by: i64, limit: usize) -> Result<Vec<Pending>, StoreError> {
        self.read(|c| {
            // Cached: the dispatcher asks whenever a slot frees, and parsing it cost more than running it.
            let mut stmt = c.prepare_cached(PENDING)?;
            let rows = stmt.query_map([after.due_at, after.id, due_by], pending_row)?;
            rows.take(limit).collect()
        })
    }

    fn lane_heads(&self) -> Result<Vec<Pending>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(LANE_HEADS)?;
            let rows = stmt.query_map([], pending_row)?;
            rows.collect()
        })
    }

    fn payload(&self, id: i64) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|c| {
            c.query_row("SELECT payload FROM deliveries WHERE id = ?1", [id], |r| {
                r.get::<_, Option<Vec<u8>>>(0)
            })
            .optional()
            .map(Option::flatten)
        })
    }

    fn started(&self, id: i64, request_id: &str) -> Result<bool, StoreError> {
        let request_id = request_id.to_owned();
        self.write_as(Wait::Committed, move |conn, _| {
            conn.prepare_cached(
                "UPDATE deliveries SET state = 'running'
                 WHERE id = ?1 AND request_id = ?2 AND mode = 'async' AND state IN ('queued', 'failed')",
            )?
            .execute(params![id, request_id])
            .map(|n| n > 0)
            .map_err(sql)
        })
    }

    fn finish(&self, id: i64, attempt: Attempt, next: Next) -> Result<(), StoreError> {
        self.write(move |conn, counts| {
            let now = now_ms();
            let waited: Option<(bool, i64, u32)> = conn
                .prepare_cached(
                    "SELECT state NOT IN ('done', 'dead') AND mode = 'async', payload_bytes,
                         max_attempts
                     FROM deliveries WHERE id = ?1",
                )?
                .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
                .map_err(sql)?;
            let (state, due, finished) = match next {
                Next::Done => (State::Done, None, Some(now)),
                Next::Retry(at) => (State::Failed, Some(at), None),
                Next::Dead => (State::Dead, None, Some(now)),
            };
            // Only the entry this run marked running, which nothing else changes meanwhile (`drop` and
            // `retry` leave a running entry alone). A row without that mark is not this run's: its number
            // may even have been given to a newer entry, SQLite reusing the highest one after a delete.
            let changed = conn
                .prepare_cached(
                    "UPDATE deliveries SET state = ?2, attempts = ?3, last_exit = ?4, due_at = ?5,
                         finished_at = ?6
                     WHERE id = ?1 AND state = 'running'",
                )?
                .execute(params![
                    id,
                    state.as_str(),
                    attempt.n,
                    attempt.exit_code,
                    due,
                    finished
                ])
                .map_err(sql)?;
            if changed > 0 {
                let max_attempts = waited.map_or(1, |(_, _, max)| max);
                insert_attempt(conn, id, &attempt, max_attempts).map_err(sql)?;
            }
            if let (true, Some((true, bytes, _)), Next::Done | Next::Dead) =
                (changed > 0, waited, next)
            {
                counts.left(bytes.max(0) as u64);
            }
            Ok(())
        })
    }

    fn put_back(&self, id: i64, due_at: i64) -> Result<(), StoreError> {
        self.write(move |conn, _| {
            conn.prepare_cached(
                "UPDATE deliveries SET state = 'queued', due_at = ?2 WHERE id = ?1 AND state = 'running'",
            )?
            .execute([id, due_at])
            .map(drop)
            .map_err(sql)
        })
    }

    fn due_again(&self, now: i64, pause: Duration) -> Result<usize, StoreError> {
        let pause = pause.as_millis() as i64;
        self.write(move |conn, _| {
            conn.prepare_cached(DUE_AGAIN)?
                .execute([now, pause])
                .map_err(sql)
        })
    }

    fn recover(&self) -> Result<u64, StoreError> {
        self.claim()?;
        self.write(|conn, counts| {
            conn.prepare_cached(RECOVER_ATTEMPTS)?
                .execute([])
                .map_err(sql)?;
            conn.prepare_cached(RECOVER)?.execute([]).map_err(sql)?;
            Ok(counts.get(conn)?.queued)
        })
    }

    fn prune(&self, retention: Retention, go_on: &dyn Fn() -> bool) -> Result<Pruned, StoreError> {
        // In steps of at most PRUNE_STEP rows (or VACUUM_STEP pages), each its own transaction, so the
        // accepts waiting for the writer meanwhile are held up by one step at most, not by the whole of a
        // prune of a large store (measured on 1,000,000 rows: 0.15 s for the payloads' UPDATE read through
        // every older row, 1.5 s for one size-bound DELETE over all finished rows). The time cutoffs and
        // the newest row are fixed at the start: history rows written meanwhile (a stream of them under
        // load) are left to the next pass, so a pass always ends.
        let now = now_ms();
        let newest: i64 = self.read(|c| {
            c.query_row("SELECT coalesce(max(id), 0) FROM deliveries", [], |r| {
                r.get(0)
            })
        })?;
        let mut pruned = Pruned::default();
        // First what time has put past its keeping (and the pages that frees), then, if still over
        // `max_store_bytes` and it can help, the oldest finished rows.
        for by_size in [false, true] {
            if by_size {
                let max = retention.max_store_bytes;
                let (helps, used, kept) = self.read(move |c| size_can_help(c, max))?;
                if !helps {
                    log::warn!(
                        "the store uses {used} bytes, over max_store_bytes = {max}, and about {kept} of them \
                         are entries waiting to run and dedupe keys, which are never pruned: the finished \
                         rows (the history, the dead letters) are kept, since removing them cannot bring the \
                         store under the bound; raise max_store_bytes, or lower max_queued_bytes or \
                         dedupe_window"
                    );
                    break;
                }
            }
            while go_on() {
                let step =
                    self.write(move |conn, _| prune_step(conn, &retention, now, newest, by_size))?;
                match step {
                    Some(Step::Payloads(n)) => pruned.payloads += n,
                    Some(Step::Rows(n)) => pruned.rows += n,
                    Some(Step::Other) => {}
                    None => break,
                }
            }
        }
        Ok(pruned)
    }

    fn list(&self, query: &Query) -> Result<Vec<Row>, StoreError> {
        let q = query.clone();
        self.read(move |c| {
            let sql = format!(
                "SELECT {ROW_COLUMNS} FROM deliveries
                 WHERE (?1 IS NULL OR lower(event) GLOB lower(?1))
                   AND (?2 IS NULL OR state = ?2)
                   AND (?3 IS NULL OR last_exit = ?3)
                   AND (?4 IS NULL OR sender = ?4)
                   AND (?5 IS NULL OR received_at >= ?5)
                 ORDER BY received_at DESC, id DESC LIMIT ?6"
            );
            // The same glob as `retry --dead --event` (`routes::Glob`: `*` and `?` only): SQLite's GLOB
            // would read `[...]` as a class, so `[` is made literal (`[[]`).
            let event = q.event.as_deref().map(|e| e.replace('[', "[[]"));
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt.query_map(
                params![
                    event,
                    q.state.map(State::as_str),
                    q.exit_code,
                    q.sender,
                    q.since,
                    q.limit as i64
                ],
                row,
            )?;
            rows.collect()
        })
    }

    fn show(&self, id: &str) -> Result<Option<(Row, Vec<Attempt>)>, StoreError> {
        let Some(id) = self.resolve(id)? else {
            return Ok(None);
        };
        self.read(move |c| {
            let found = c
                .query_row(
                    &format!("SELECT {ROW_COLUMNS} FROM deliveries WHERE id = ?1"),
                    [id],
                    row,
                )
                .optional()?;
            let Some(found) = found else {
                return Ok(None);
            };
            // A sync row's one attempt is in the row itself, an async entry's in `attempts`.
            let mut stmt = c.prepare(
                "SELECT 1, run_started_at, run_ms, last_exit, run_signal, run_timed_out, run_output
                 FROM deliveries WHERE id = ?1 AND run_started_at IS NOT NULL
                 UNION ALL
                 SELECT n, started_at, duration_ms, exit_code, signal, timed_out, output
                 FROM attempts WHERE delivery = ?1 ORDER BY 1",
            )?;
            let attempts = stmt
                .query_map([id], |r| {
                    Ok(Attempt {
                        n: r.get(0)?,
                        started_at: r.get(1)?,
                        duration_ms: r.get(2)?,
                        exit_code: r.get(3)?,
                        signal: r.get(4)?,
                        timed_out: r.get(5)?,
                        output: r.get(6)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some((found, attempts)))
        })
    }

    fn retry(&self, target: &Target, bounds: Bounds) -> Result<Retried, StoreError> {
        let ids: Vec<i64> = match target {
            Target::One(id) => self.resolve(id)?.into_iter().collect(),
            Target::Dead(glob) => {
                let glob = glob.as_ref().map(|g| Glob::new(g, true));
                let dead = self.read(|c| {
                    // The terms of the async_open index, written out, so the dead are found through it
                    // and not by a scan of the history.
                    let mut stmt = c.prepare(RETRY_DEAD)?;
                    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                    rows.collect::<rusqlite::Result<Vec<(i64, String)>>>()
                })?;
                dead.into_iter()
                    .filter(|(_, event)| glob.as_ref().is_none_or(|g| g.matches(event)))
                    .map(|(id, _)| id)
                    .collect()
            }
        };
        self.write(move |conn, counts| {
            // Rare (the operator's): the counts are read again rather than followed.
            counts.forget();
            let now = now_ms();
            let mut retried = Retried::default();
            for &id in &ids {
                // Only async entries whose payload is still kept can run again.
                let found = conn
                    .prepare_cached(
                        "SELECT state, payload_bytes FROM deliveries
                         WHERE id = ?1 AND mode = 'async' AND state IN ('dead', 'failed', 'done')
                           AND payload IS NOT NULL",
                    )?
                    .query_row(params![id], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                    })
                    .optional()
                    .map_err(sql)?;
                let Some((state, bytes)) = found else {
                    continue;
                };
                // An entry waiting to retry is counted already; a dead or done one waits again.
                let again = state != State::Failed.as_str();
                let bytes = bytes.max(0) as u64;
                let waiting = counts.get(conn)?;
                if again
                    && (waiting.queued >= bounds.max_queued
                        || waiting.queued_bytes.saturating_add(bytes) > bounds.max_queued_bytes)
                {
                    retried.no_room += 1;
                    continue;
                }
                // One more attempt, now. An entry waiting to retry keeps the attempts it has left: it
                // only runs sooner.
                conn.prepare_cached(
                    "UPDATE deliveries SET state = 'queued', due_at = ?2, finished_at = NULL,
                         max_attempts = CASE state WHEN 'failed' THEN max(max_attempts, attempts + 1)
                                                   ELSE attempts + 1 END
                     WHERE id = ?1",
                )?
                .execute(params![id, now])
                .map_err(sql)?;
                if again {
                    waiting.queued += 1;
                    waiting.queued_bytes += bytes;
                }
                retried.queued += 1;
            }
            Ok(retried)
        })
    }

    fn drop_entry(&self, id: &str) -> Result<bool, StoreError> {
        let Some(id) = self.resolve(id)? else {
            return Ok(false);
        };
        // With no daemon on the store, a "running" entry is one a crash interrupted, which the next start
        // would run again at once: the operator must be able to drop it before then (a script that kills
        // the daemon, say). A daemon that starts meanwhile finds it gone, as it would a queued one.
        let offline = self.claimed() == Some(false);
        self.write(move |conn, counts| {
            counts.forget();
            conn.prepare_cached(
                "DELETE FROM deliveries WHERE id = ?1 AND (state != 'running' OR ?2)",
            )?
            .execute(params![id, offline])
            .map(|n| n > 0)
            .map_err(sql)
        })
    }

    fn summary(&self) -> Result<Summary, StoreError> {
        let mut summary = self.read(|c| {
            c.query_row(
                "SELECT count(*), total(state = 'done'), total(state = 'failed'), total(state = 'dead'),
                     total(state = 'queued'), total(state = 'running')
                 FROM deliveries",
                [],
                |r| {
                    Ok(Summary {
                        total: r.get::<_, i64>(0)? as u64,
                        done: r.get::<_, f64>(1)? as u64,
                        failed: r.get::<_, f64>(2)? as u64,
                        dead: r.get::<_, f64>(3)? as u64,
                        queued: r.get::<_, f64>(4)? as u64,
                        running: r.get::<_, f64>(5)? as u64,
                        store_bytes: 0,
                    })
                },
            )
        })?;
        summary.store_bytes = self.bytes_on_disk();
        Ok(summary)
    }

    fn backlog(&self) -> Result<super::Backlog, StoreError> {
        self.read(|c| {
            let mut backlog = super::Backlog::default();
            let mut stmt = c.prepare_cached(BACKLOG)?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (state, n) = row?;
                let n = n.max(0) as u64;
                match State::parse(&state) {
                    Some(State::Queued) => backlog.queued = n,
                    Some(State::Failed) => backlog.retrying = n,
                    Some(State::Running) => backlog.running = n,
                    Some(State::Dead) => backlog.dead = n,
                    Some(State::Done) | None => {}
                }
            }
            Ok(backlog)
        })
    }

    fn broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    fn claimed(&self) -> Option<bool> {
        if self
            .claim
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
        {
            return Some(true);
        }
        // A shared lock is refused while a daemon holds its exclusive one, and taken otherwise (then let
        // go at once, with the file). Without the file no daemon has ever claimed the store.
        let lock = match fs::File::open(self.lock_path()) {
            Ok(lock) => lock,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(false),
            Err(_) => return None,
        };
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockShared) {
            Ok(()) => Some(false),
            Err(rustix::io::Errno::WOULDBLOCK) => Some(true),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bounds no test reaches.
    const ROOMY: Bounds = Bounds {
        max_queued: u64::MAX,
        max_queued_bytes: u64::MAX,
        dedupe_window: Duration::ZERO,
    };

    fn delivery(n: u32) -> NewDelivery {
        NewDelivery {
            request_id: format!("r{n}"),
            received_at: now_ms(),
            sender: None,
            event: "E".into(),
            route_line: 1,
            script: "/s".into(),
            delivery_id: None,
            dedupe_key: None,
            env: Vec::new(),
            body: vec![b'x'; 100],
            ack_status: 202,
            policy: Policy {
                max_attempts: 1,
                retry_max: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                serial: false,
            },
        }
    }

    /// A job for [`commit_batch`] that inserts the dedupe keys `keys` one by one (a repeated key fails
    /// with SQLite's UNIQUE constraint), counts its runs, and sends its answer to `answers`.
    fn keys_job(
        keys: &'static [&'static str],
        wait: Wait,
        runs: &Arc<std::sync::atomic::AtomicUsize>,
        answers: &mpsc::Sender<(&'static str, bool)>,
    ) -> Job {
        let runs = Arc::clone(runs);
        let answers = answers.clone();
        Box::new(Task::new(
            move |conn: &Connection, _: &mut Counts| {
                runs.fetch_add(1, Ordering::SeqCst);
                for key in keys {
                    conn.execute(
                        "INSERT INTO dedupe (key, delivery, request_id, status, accepted_at)
                         VALUES (?1, 0, 'r', 202, 0)",
                        [key],
                    )
                    .map_err(sql)?;
                }
                Ok(())
            },
            move |result: Result<(), StoreError>| {
                let _ = answers.send((keys[0], result.is_ok()));
            },
            wait,
        ))
    }

    /// A durable job for [`commit_batch`] that runs `work` (which fails), counts its runs, and sends its
    /// answer to `answers` under `name`.
    fn failing_job(
        name: &'static str,
        work: impl Fn(&Connection) -> Result<(), StoreError> + Send + 'static,
        runs: &Arc<std::sync::atomic::AtomicUsize>,
        answers: &mpsc::Sender<(&'static str, bool)>,
    ) -> Job {
        let runs = Arc::clone(runs);
        let answers = answers.clone();
        Box::new(Task::new(
            move |conn: &Connection, _: &mut Counts| {
                runs.fetch_add(1, Ordering::SeqCst);
                work(conn)
            },
            move |result: Result<(), StoreError>| {
                let _ = answers.send((name, result.is_ok()));
            },
            Wait::Durable,
        ))
    }

    /// The steps SQLite's planner chooses for `sql` (the detail column of EXPLAIN QUERY PLAN).
    fn query_plan(store: &Sqlite, sql: &str, args: &[&dyn rusqlite::ToSql]) -> Vec<String> {
        store
            .read(|c| {
                let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                stmt.query_map(args, |r| r.get(3))?.collect()
            })
            .expect("plan")
    }

    /// The ids of the entries `sql` (a read of [`pending_row`]s) finds, and the steps SQLite's virtual
    /// machine took to find them: a count that grows with the rows a read walks past.
    fn ids_and_steps(store: &Sqlite, sql: &str, args: &[&dyn rusqlite::ToSql]) -> (Vec<i64>, i32) {
        store
            .read(|c| {
                let mut stmt = c.prepare(sql)?;
                let ids = stmt
                    .query_map(args, |r| pending_row(r).map(|p| p.id))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok((ids, stmt.get_status(rusqlite::StatementStatus::VmStep)))
            })
            .expect("read")
    }

    /// The history row of sync request `n`, answered `status` after `attempt`.
    fn sync_record(n: u32, status: u16, attempt: Attempt) -> SyncRecord {
        SyncRecord {
            request_id: format!("sync-{n}"),
            received_at: now_ms(),
            finished_at: now_ms(),
            sender: None,
            event: "E".into(),
            route_line: 1,
            script: "s.sh".into(),
            delivery_id: None,
            status,
            attempt: Some(attempt),
            body: None,
            body_bytes: 0,
        }
    }

    fn dedupe_keys(conn: &Connection) -> Vec<String> {
        let mut stmt = conn
            .prepare("SELECT key FROM dedupe ORDER BY key")
            .expect("prepare");
        let keys = stmt.query_map([], |r| r.get(0)).expect("query");
        keys.collect::<rusqlite::Result<_>>().expect("keys")
    }

    /// A job refused because the queue is full wrote nothing: the batch around it commits in its one try,
    /// without the second try with savepoints (which also re-counts the whole queue).
    #[test]
    fn a_full_queue_refuses_its_job_and_leaves_the_batch_its_one_try() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        let conn = connect(&store.path).expect("connect");
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (answers, answered) = mpsc::channel();
        let full = failing_job(
            "full",
            |_| Err(StoreError::Full("max_queued = 1 entries".into())),
            &runs,
            &answers,
        );
        let batch = vec![
            keys_job(&["before"], Wait::Durable, &runs, &answers),
            full,
            keys_job(&["after"], Wait::Durable, &runs, &answers),
        ];
        commit_batch(&conn, batch, &mut Counts::default()).expect("commit");
        assert_eq!(runs.load(Ordering::SeqCst), 3, "one try");
        assert_eq!(dedupe_keys(&conn), ["after", "before"]);
        let mut told: Vec<(&str, bool)> = answered.try_iter().collect();
        told.sort();
        assert_eq!(told, [("after", true), ("before", true), ("full", false)]);
    }

    /// SQLite ends the whole transaction by itself on some errors (an I/O error, a full disk without a
    /// statement journal). A job that does what SQLite then does, a ROLLBACK, stands in for it: nothing of
    /// the batch may commit, the jobs after it included, and every job hears that it failed.
    #[test]
    fn a_transaction_sqlite_rolled_back_by_itself_commits_nothing_of_its_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        let conn = connect(&store.path).expect("connect");
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (answers, answered) = mpsc::channel();
        let rolled_back = failing_job(
            "rolled back",
            |conn| {
                conn.execute_batch("ROLLBACK").map_err(sql)?;
                Err(StoreError::Unavailable("database or disk is full".into()))
            },
            &runs,
            &answers,
        );
        let batch = vec![
            keys_job(&["before"], Wait::Durable, &runs, &answers),
            rolled_back,
            keys_job(&["after"], Wait::Durable, &runs, &answers),
            keys_job(&["history"], Wait::SetAside, &runs, &answers),
        ];
        let result = commit_batch(&conn, batch, &mut Counts::default());
        assert_eq!(
            result,
            Err(StoreError::Unavailable("database or disk is full".into()))
        );
        assert!(dedupe_keys(&conn).is_empty(), "{:?}", dedupe_keys(&conn));
        assert!(conn.is_autocommit(), "no transaction is left open");
        let mut told: Vec<(&str, bool)> = answered.try_iter().collect();
        told.sort();
        assert_eq!(
            told,
            [
                ("after", false),
                ("before", false),
                ("history", false),
                ("rolled back", false)
            ]
        );
    }

    /// A batch anyone waits on to be on disk commits at `synchronous = FULL`, whatever the batch before
    /// it was; one of history rows alone at NORMAL. The level is set only when it changes.
    #[test]
    fn a_durable_batch_is_synced_whatever_the_batch_before_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        let conn = connect(&store.path).expect("connect");
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (answers, _answered) = mpsc::channel();
        let level = |conn: &Connection| -> i64 {
            conn.query_row("PRAGMA synchronous", [], |r| r.get(0))
                .expect("level")
        };
        let (normal, full) = (1, 2);
        let mut counts = Counts::default();
        for (keys, wait, expected) in [
            (&["a"][..], Wait::SetAside, normal),
            (&["b"][..], Wait::SetAside, normal),
            (&["c"][..], Wait::Durable, full),
            (&["d"][..], Wait::Durable, full),
            (&["e"][..], Wait::SetAside, normal),
            (&["f"][..], Wait::Durable, full),
        ] {
            let keys: &'static [&'static str] = Box::leak(keys.to_vec().into_boxed_slice());
            commit_batch(
                &conn,
                vec![keys_job(keys, wait, &runs, &answers)],
                &mut counts,
            )
            .expect("commit");
            assert_eq!(level(&conn), expected, "after the batch of {keys:?}");
        }
    }

    #[test]
    fn a_batch_runs_once_without_savepoints_and_again_with_them_when_a_job_fails_half_way() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        // The writer thread is idle: this connection runs the batches itself.
        let conn = connect(&store.path).expect("connect");
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (answers, answered) = mpsc::channel();

        let batch = vec![
            keys_job(&["a"], Wait::Durable, &runs, &answers),
            keys_job(&["b"], Wait::SetAside, &runs, &answers),
        ];
        commit_batch(&conn, batch, &mut Counts::default()).expect("commit");
        assert_eq!(runs.load(Ordering::SeqCst), 2, "one try: each job ran once");
        assert_eq!(dedupe_keys(&conn), ["a", "b"]);

        // "c" is written and then "a" again fails: "c" must not commit, the jobs around it must.
        runs.store(0, Ordering::SeqCst);
        let batch = vec![
            keys_job(&["d"], Wait::Durable, &runs, &answers),
            keys_job(&["c", "a"], Wait::Durable, &runs, &answers),
            keys_job(&["e"], Wait::SetAside, &runs, &answers),
        ];
        commit_batch(&conn, batch, &mut Counts::default()).expect("commit");
        assert_eq!(dedupe_keys(&conn), ["a", "b", "d", "e"]);
        // The first try stopped at the failing job; the second ran all three.
        assert_eq!(runs.load(Ordering::SeqCst), 2 + 3);
        let mut told: Vec<(&str, bool)> = answered.try_iter().collect();
        told.sort();
        assert_eq!(
            told,
            [
                ("a", true),
                ("b", true),
                ("c", false),
                ("d", true),
                ("e", true)
            ]
        );
    }

    fn attempt() -> Attempt {
        Attempt {
            n: 1,
            started_at: now_ms(),
            duration_ms: 1.0,
            exit_code: Some(0),
            signal: None,
            timed_out: false,
            output: String::new(),
        }
    }

    fn queued(result: Result<Accepted, StoreError>) -> i64 {
        match result {
            Ok(Accepted::Queued { id }) => id,
            other => panic!("not queued: {other:?}"),
        }
    }

    fn full(result: Result<Accepted, StoreError>) {
        assert!(
            matches!(result, Err(StoreError::Full(_))),
            "not full: {result:?}"
        );
    }

    /// `deliveries retry` of an entry waiting for its next attempt runs it now and keeps the attempts it
    /// has left; of a dead or done one, it allows exactly one more.
    #[test]
    fn an_entry_retried_without_end_keeps_its_first_and_latest_attempts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        let id = queued(store.accept(delivery(1), ROOMY));
        for n in 1..=40 {
            assert_eq!(store.started(id, "r1"), Ok(true));
            let tempfail = Attempt {
                n,
                exit_code: Some(75),
                ..attempt()
            };
            store
                .finish(id, tempfail, Next::Retry(now_ms()))
                .expect("finish");
        }
        let (row, attempts) = store.show(&id.to_string()).expect("show").expect("row");
        assert_eq!(row.attempts, 40, "every attempt counted");
        let kept: Vec<u32> = attempts.iter().map(|a| a.n).collect();
        let expected: Vec<u32> = (1..=5).chain(21..=40).collect();
        assert_eq!(kept, expected);

        // A route with more attempts than that keeps every one of them.
        let mut many = delivery(2);
        many.policy.max_attempts = 30;
        let id = queued(store.accept(many, ROOMY));
        for n in 1..=31 {
            assert_eq!(store.started(id, "r2"), Ok(true));
            let failed = Attempt {
                n,
                exit_code: Some(if n < 30 { 1 } else { 75 }),
                ..attempt()
            };
            store
                .finish(id, failed, Next::Retry(now_ms()))
                .expect("finish");
        }
        let (_, attempts) = store.show(&id.to_string()).expect("show").expect("row");
        let kept: Vec<u32> = attempts.iter().map(|a| a.n).collect();
        let expected: Vec<u32> = (1..=5).chain(7..=31).collect();
        assert_eq!(kept, expected, "30 kept: the route's attempts");

        // `deliveries retry` gives one more attempt each time, and so raises the entry's max_attempts:
        // retried without end, an entry still keeps no more than the most a route may have.
        let id = queued(store.accept(delivery(3), ROOMY));
        for n in 1..=300 {
            assert_eq!(store.started(id, "r3"), Ok(true));
            let failed = Attempt {
                n,
                exit_code: Some(1),
                ..attempt()
            };
            store.finish(id, failed, Next::Dead).expect("finish");
            assert_eq!(
                store
                    .retry(&Target::One(id.to_string()), ROOMY)
                    .map(|r| r.queued),
                Ok(1)
            );
        }
        let (row, attempts) = store.show(&id.to_string()).expect("show").expect("row");
        assert_eq!(row.attempts, 300, "every attempt counted");
        assert_eq!(attempts.len(), MOST_ATTEMPTS_KEPT as usize);
        assert_eq!(attempts.last().map(|a| a.n), Some(300));
    }

    #[test]
    fn list_and_retry_read_an_event_glob_alike() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        for (n, event) in [(1, "ComputerAdded"), (2, "ComputerInventoryCompleted")] {
            let mut d = delivery(n);
            d.event = event.into();
            let id = queued(store.accept(d, ROOMY));
            assert_eq!(store.started(id, &format!("r{n}")), Ok(true));
            store.finish(id, attempt(), Next::Dead).expect("finish");
        }
        let listed = |glob: &str| {
            let query = Query {
                event: Some(glob.into()),
                state: None,
                exit_code: None,
                sender: None,
                since: None,
                limit: 10,
            };
            store.list(&query).expect("list").len()
        };
        assert_eq!(listed("computer*"), 2, "case-insensitive, as routes match");
        assert_eq!(listed("Computer?dded"), 1);
        // `[AI]` is no class to either: it matches nothing, as `retry --dead --event` finds nothing.
        assert_eq!(listed("Computer[AI]*"), 0);
        assert_eq!(
            store.retry(&Target::Dead(Some("Computer[AI]*".into())), ROOMY),
            Ok(Retried::default())
        );
        assert_eq!(
            store
                .retry(&Target::Dead(Some("computer*".into())), ROOMY)
                .map(|r| r.queued),
            Ok(2)
        );
    }

    #[test]
    fn the_write_ahead_log_is_cut_back_after_a_large_delivery() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        let wal = dir.path().join(format!("{}-wal", super::super::DATABASE));
        let mut large = delivery(1);
        large.body = vec![b'x'; 24 << 20];
        queued(store.accept(large, ROOMY));
        assert!(fs::metadata(&wal).expect("wal").len() > 24 << 20);
        // The large one's commit was checkpointed; the next transaction starts the log over and cuts it.
        queued(store.accept(delivery(2), ROOMY));
        let len = fs::metadata(&wal).expect("wal").len();
        assert!(len <= WAL_LIMIT as u64, "the log kept {len} bytes");
    }

    #[test]
    fn retry_brings_an_attempt_forward_without_taking_the_attempts_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        let bounds = Bounds {
            max_queued: 10,
            max_queued_bytes: 1 << 20,
            dedupe_window: Duration::ZERO,
        };
        let mut waiting = delivery(1);
        waiting.policy.max_attempts = 5;
        let waiting = queued(store.accept(waiting, bounds));
        let dead = queued(store.accept(delivery(2), bounds));
        let in_an_hour = now_ms() + 3_600_000;
        let failed = Attempt {
            exit_code: Some(1),
            ..attempt()
        };
        assert_eq!(store.started(waiting, "r1"), Ok(true));
        store
            .finish(waiting, failed.clone(), Next::Retry(in_an_hour))
            .expect("finish");
        assert_eq!(store.started(dead, "r2"), Ok(true));
        store.finish(dead, failed, Next::Dead).expect("finish");
        let row =
            |id: i64| {
                store
                    .read(move |c| {
                        c.query_row(
                        "SELECT state, max_attempts, due_at <= ?2 FROM deliveries WHERE id = ?1",
                        params![id, now_ms()],
                        |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?, r.get::<_, bool>(2)?)),
                    )
                    })
                    .expect("row")
            };
        for id in [waiting, dead] {
            assert_eq!(
                store
                    .retry(&Target::One(id.to_string()), bounds)
                    .expect("retry")
                    .queued,
                1
            );
        }
        assert_eq!(
            row(waiting),
            ("queued".to_string(), 5, true),
            "due now, 4 attempts left"
        );
        assert_eq!(
            row(dead),
            ("queued".to_string(), 2, true),
            "one more attempt"
        );
    }

    #[test]
    fn the_queue_is_read_through_the_waiting_index_not_the_history() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        assert_eq!(
            query_plan(&store, PENDING, &[&0, &0, &0]),
            [
                "SEARCH deliveries USING INDEX deliveries_waiting (serial=? AND due_at>? AND due_at<?)"
            ]
        );
        assert_eq!(
            query_plan(&store, RETRY_DEAD, &[]),
            ["SEARCH deliveries USING INDEX deliveries_async_open (mode=? AND state=?)"]
        );
        let plan = query_plan(&store, LANE_HEADS, &[]);
        assert!(
            plan.iter().all(|step| !step.starts_with("SCAN deliveries"))
                && plan.iter().any(|step| step.contains("deliveries_lanes")),
            "{plan:?}"
        );
    }

    /// Writing a row evaluates every partial index's condition (for an update, on the old and the new
    /// row), and SQLite builds a temporary b-tree for an `IN` list of more than two values at every
    /// statement that evaluates one: a tenth of the writer's work per delivery when the waiting index
    /// listed the three waiting states. No write of a row, and no read of the queue, builds one.
    #[test]
    fn no_write_of_a_row_or_read_of_the_queue_builds_a_temporary_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        for sql in [
            "INSERT INTO deliveries (request_id, received_at, mode, event, route_line, script, state, status,
                 serial, due_at) VALUES ('r', 1, 'async', 'E', 1, 's', 'queued', 202, 0, 1)",
            "UPDATE deliveries SET state = 'running' WHERE id = 1 AND state = 'queued'",
            "UPDATE deliveries SET state = 'failed', due_at = 5 WHERE id = 1 AND state = 'running'",
            "DELETE FROM deliveries WHERE id = 1",
            // Not LANE_HEADS (a recursive query keeps its queue in one, once per look) nor RECOVER (at
            // start, an update of the rows an index finds keeps their ids in one first).
            PENDING,
            RECOVER_ATTEMPTS,
        ] {
            let opcodes: Vec<String> = store
                .read(|c| {
                    let mut stmt = c.prepare(&format!("EXPLAIN {sql}"))?;
                    let unbound = vec![rusqlite::types::Null; stmt.parameter_count()];
                    stmt.query_map(rusqlite::params_from_iter(unbound), |r| r.get(1))?
                        .collect()
                })
                .expect("explain");
            assert!(
                !opcodes.iter().any(|op| op == "OpenEphemeral"),
                "{sql}: {opcodes:?}"
            );
        }
    }

    /// A sync request whose script failed leaves a `failed` row in the history, which is not waiting to run:
    /// the dispatcher's look at the queue (several a second) must not walk past the history's failures.
    #[test]
    fn the_queue_read_does_not_walk_the_failed_sync_history() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        let failures = 2_000;
        for n in 0..failures {
            let failed = Attempt {
                exit_code: Some(1),
                ..attempt()
            };
            store.record(sync_record(n, 500, failed));
        }
        let bounds = Bounds {
            max_queued: 10,
            max_queued_bytes: 1 << 20,
            dedupe_window: Duration::ZERO,
        };
        let queued = queued(store.accept(delivery(1), bounds));
        let failed: i64 = store
            .read(|c| {
                c.query_row(
                    "SELECT count(*) FROM deliveries WHERE mode = 'sync' AND state = 'failed'",
                    [],
                    |r| r.get(0),
                )
            })
            .expect("count");
        assert_eq!(
            failed,
            i64::from(failures),
            "the history rows are written, as failed"
        );
        let (ids, steps) = ids_and_steps(&store, PENDING, &[&0, &0, &now_ms()]);
        assert_eq!(ids, [queued]);
        // 36 steps for the one entry here; walking past the failures cost 12 each (24,039 in all).
        assert!(
            steps < 500,
            "{steps} steps of SQLite's machine to find 1 entry among {failures} failed sync rows"
        );
    }

    /// Entries waiting to retry later are left out of the dispatcher's look, and not walked past (in an
    /// outage thousands wait in front of the new ones); so are serial routes' entries, which come through
    /// the lanes' heads. Entries come in the order they came due, a first attempt when it arrived.
    #[test]
    fn the_queue_read_leaves_out_what_is_not_due_and_the_serial_routes_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        let bounds = Bounds {
            max_queued: 10_000,
            max_queued_bytes: 1 << 30,
            dedupe_window: Duration::ZERO,
        };
        let waiting = 2_000;
        let first = queued(store.accept(delivery(0), bounds));
        for n in 1..waiting {
            queued(store.accept(delivery(n), bounds));
        }
        // All but the newest wait to retry, in an hour, the oldest last: as a failing script leaves them.
        let later = now_ms() + 3_600_000;
        let writer = Connection::open(dir.path().join(super::super::DATABASE)).expect("open");
        writer
            .execute(
                "UPDATE deliveries SET state = 'failed', attempts = 1, due_at = ?1 - id WHERE id < ?2",
                [later + 10_000, first + i64::from(waiting) - 1],
            )
            .expect("retrying");
        let newest = first + i64::from(waiting) - 1;
        let serial = queued(store.accept(serial_delivery(waiting, "/s"), bounds));
        let due = queued(store.accept(delivery(waiting + 1), bounds));
        let ids = |after: After, due_by: i64, limit: usize| -> Vec<i64> {
            store
                .pending(after, due_by, limit)
                .expect("pending")
                .iter()
                .map(|p| p.id)
                .collect()
        };
        assert_eq!(ids(After::START, now_ms(), 100), [newest, due]);
        let (found, steps) = ids_and_steps(&store, PENDING, &[&i64::MIN, &i64::MIN, &now_ms()]);
        assert_eq!(found, [newest, due]);
        // 65 steps here; ordered by id (schema version 7), the read walked past all that wait: 18,054.
        assert!(
            steps < 500,
            "{steps} steps of SQLite's machine to find 2 due entries among {waiting} waiting to retry"
        );
        // Once due, the retries come in the order they came due (the newest first here), after the
        // entries that arrived before that, and a page goes on from where the last one ended.
        let page = ids(After::START, later + 10_000, 3);
        assert_eq!(page, [newest, due, newest - 1]);
        let entry = store
            .pending(After::START, later + 10_000, 3)
            .expect("pending")
            .pop()
            .expect("an entry");
        assert_eq!(
            ids(After::entry(&entry), later + 10_000, 2),
            [newest - 2, newest - 3]
        );
        let all = ids(After::START, later + 10_000, 10_000);
        assert_eq!(all.len(), waiting as usize + 1, "all of them once due");
        let heads: Vec<i64> = store
            .lane_heads()
            .expect("heads")
            .iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(heads, [serial]);
    }

    /// Entries queued while the clock read ahead are due again once it was set back; those due within
    /// the pause they may have (put back for 5 s, a retry within its `retry_max`) keep their time, and
    /// so does anything running or finished.
    #[test]
    fn entries_due_later_than_any_pause_could_put_them_are_due_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        let bounds = Bounds {
            max_queued: 100,
            max_queued_bytes: 1 << 20,
            dedupe_window: Duration::ZERO,
        };
        let now = now_ms();
        let hour = 3_600_000;
        // (state, attempts, due in ms from now, due again?)
        let cases = [
            ("queued", 0, hour, true),
            ("queued", 0, 4_000, false),
            ("failed", 1, 50_000, false),
            ("failed", 1, hour, true),
            ("failed", 3, 61_000, true),
            ("running", 1, hour, false),
            ("done", 1, hour, false),
        ];
        let writer = Connection::open(dir.path().join(super::super::DATABASE)).expect("open");
        let mut ids = Vec::new();
        for (n, (state, attempts, due, _)) in cases.iter().enumerate() {
            let id = queued(store.accept(delivery(n as u32), bounds));
            writer
                .execute(
                    "UPDATE deliveries SET state = ?2, attempts = ?3, due_at = ?4, retry_max_ms = 60000
                     WHERE id = ?1",
                    params![id, state, attempts, now + due],
                )
                .expect("update");
            ids.push(id);
        }
        let again = store
            .due_again(now, Duration::from_secs(5))
            .expect("due again");
        assert_eq!(again, 3);
        for (id, (state, _, due, expected)) in ids.iter().zip(cases) {
            let at: i64 = store
                .read(|c| {
                    c.query_row("SELECT due_at FROM deliveries WHERE id = ?1", [id], |r| {
                        r.get(0)
                    })
                })
                .expect("due_at");
            let want = if expected { now } else { now + due };
            assert_eq!(at, want, "{state} entry due in {due} ms");
        }
    }

    fn serial_delivery(n: u32, script: &str) -> NewDelivery {
        NewDelivery {
            script: script.into(),
            policy: Policy {
                serial: true,
                ..delivery(n).policy
            },
            ..delivery(n)
        }
    }

    /// A serial lane waits behind its first entry: the look reads that one, whether it is due or waits
    /// to retry, and never what waits behind it (a backlog in an outage); a running one is not read.
    #[test]
    fn a_serial_lane_is_read_by_its_first_entry_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        let bounds = Bounds {
            max_queued: 10_000,
            max_queued_bytes: 1 << 30,
            dedupe_window: Duration::ZERO,
        };
        let a = queued(store.accept(serial_delivery(0, "/a"), bounds));
        assert_eq!(store.started(a, "r0"), Ok(true));
        store
            .finish(a, attempt(), Next::Retry(now_ms() + 3_600_000))
            .expect("finish");
        let b = queued(store.accept(serial_delivery(1, "/b"), bounds));
        let behind = 2_000;
        for n in 0..behind {
            let script = if n % 2 == 0 { "/a" } else { "/b" };
            queued(store.accept(serial_delivery(n + 2, script), bounds));
        }
        let c = queued(store.accept(serial_delivery(behind + 2, "/c"), bounds));
        let (found, steps) = ids_and_steps(&store, LANE_HEADS, &[]);
        assert_eq!(found, [a, b, c], "the first entries of lanes /a, /b and /c");
        // 306 steps here; reading the lanes' entries without their index took 123,485.
        assert!(
            steps < 1_000,
            "{steps} steps of SQLite's machine for 3 lanes with {behind} entries behind their heads"
        );
        // Nor does the other routes' read walk past them.
        let (others, steps) = ids_and_steps(&store, PENDING, &[&0, &0, &now_ms()]);
        assert_eq!(others, Vec::<i64>::new());
        assert!(
            steps < 100,
            "{steps} steps to find no entry of a route that is not serial"
        );
        // A lane whose first entry runs shows the next one (held while the first runs); the store's trait
        // method reads the same.
        assert_eq!(store.started(b, "r1"), Ok(true));
        let next_b = b + 2;
        let ids: Vec<i64> = store
            .lane_heads()
            .expect("heads")
            .iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(ids, [a, next_b, c]);
    }

    #[test]
    fn the_queue_bounds_follow_finished_entries_and_the_other_connections_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        let two = Bounds {
            max_queued: 2,
            max_queued_bytes: 1 << 20,
            dedupe_window: Duration::ZERO,
        };
        let first = queued(store.accept(delivery(1), two));
        queued(store.accept(delivery(2), two));
        full(store.accept(delivery(3), two));
        // A finished entry gives its place back, within the counts the writer keeps.
        assert_eq!(store.started(first, "r1"), Ok(true));
        store.finish(first, attempt(), Next::Done).expect("finish");
        let third = queued(store.accept(delivery(3), two));
        full(store.accept(delivery(4), two));
        // One dropped through another connection (as the CLI does) is seen by this one.
        let cli = Sqlite::open(dir.path()).expect("a second connection");
        assert!(cli.drop_entry(&third.to_string()).expect("drop"));
        queued(store.accept(delivery(4), two));
        full(store.accept(delivery(5), two));
        // A finished one queued again by the operator takes a place again.
        assert_eq!(store.started(first + 1, "r2"), Ok(true));
        store
            .finish(first + 1, attempt(), Next::Dead)
            .expect("finish");
        let one = Retried {
            queued: 1,
            no_room: 0,
        };
        let no_room = Retried {
            queued: 0,
            no_room: 1,
        };
        assert_eq!(cli.retry(&Target::One(first.to_string()), two), Ok(one));
        full(store.accept(delivery(5), two));
        // ...and only while the queue has room: the operator's retry is held to the bounds an accept is.
        assert_eq!(
            cli.retry(&Target::One((first + 1).to_string()), two),
            Ok(no_room)
        );
        assert_eq!(cli.retry(&Target::Dead(None), two), Ok(no_room));
        assert_eq!(waiting(&cli.reader.lock().unwrap()).unwrap().queued, 2);

        // The byte bound the same way: 100-byte bodies, room for two.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        let bytes = Bounds {
            max_queued: 100,
            max_queued_bytes: 250,
            dedupe_window: Duration::ZERO,
        };
        let first = queued(store.accept(delivery(1), bytes));
        queued(store.accept(delivery(2), bytes));
        full(store.accept(delivery(3), bytes));
        assert_eq!(store.started(first, "r1"), Ok(true));
        store.finish(first, attempt(), Next::Dead).expect("finish");
        queued(store.accept(delivery(3), bytes));
        full(store.accept(delivery(4), bytes));
        assert_eq!(
            store.retry(&Target::One(first.to_string()), bytes),
            Ok(no_room),
            "100 more bytes than there is room for"
        );
    }

    /// `keep_payloads` and `keep_history` count from when a delivery finished: one that went on retrying
    /// for weeks keeps its body and its row, for `deliveries retry`, as long as one that failed at once.
    #[test]
    fn keeping_counts_from_the_end_not_the_arrival() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        let conn = connect(&store.path).expect("connect");
        let day = 86_400_000;
        let now = now_ms();
        for (request, received, finished) in [
            ("retried-for-40-days", now - 40 * day, now - 60_000),
            ("ended-40-days-ago", now - 41 * day, now - 40 * day),
            ("ended-10-days-ago", now - 10 * day, now - 10 * day),
        ] {
            conn.execute(
                "INSERT INTO deliveries (request_id, received_at, mode, event, route_line, script, state,
                     status, finished_at, payload, payload_bytes)
                 VALUES (?1, ?2, 'async', 'E', 1, 's', 'dead', 202, ?3, zeroblob(100), 100)",
                params![request, received, finished],
            )
            .expect("insert");
        }
        let retention = Retention {
            keep_payloads: Duration::from_secs(7 * 86_400),
            keep_history: Duration::from_secs(30 * 86_400),
            max_store_bytes: 1 << 30,
            dedupe_window: Duration::from_secs(86_400),
        };
        let pruned = store.prune(retention, &|| true).expect("prune");
        // The payloads' step comes first: both rows that ended over 7 days ago lose theirs.
        assert_eq!((pruned.rows, pruned.payloads), (1, 2));
        let kept: Vec<(String, bool)> = conn
            .prepare("SELECT request_id, payload IS NOT NULL FROM deliveries ORDER BY id")
            .expect("prepare")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .collect::<rusqlite::Result<_>>()
            .expect("rows");
        assert_eq!(
            kept,
            [
                ("retried-for-40-days".to_string(), true),
                ("ended-10-days-ago".to_string(), false)
            ]
        );
        assert_eq!(
            store
                .retry(&Target::One("1".into()), ROOMY)
                .map(|r| r.queued),
            Ok(1)
        );
    }

    /// Over `max_store_bytes`, the oldest finished rows go first, but a dead letter only once no other
    /// finished row is left: it waits for an operator, however busy the other routes are.
    #[test]
    fn the_size_bound_takes_dead_letters_last() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        let conn = connect(&store.path).expect("connect");
        let now = now_ms();
        conn.execute_batch("BEGIN").expect("begin");
        // The oldest row is a dead letter; 2,000 newer done rows follow, each with a 2 KiB payload.
        for n in 0..2001i64 {
            conn.execute(
                "INSERT INTO deliveries (request_id, received_at, mode, event, route_line, script, state,
                     status, finished_at, payload, payload_bytes)
                 VALUES (?1, ?2, 'async', 'E', 1, 's', ?3, 202, ?2, zeroblob(2048), 2048)",
                params![format!("r-{n}"), now - 1000 + n, if n == 0 { "dead" } else { "done" }],
            )
            .expect("insert");
        }
        conn.execute_batch("COMMIT").expect("commit");
        let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).expect("count") };
        let used = count(
            "SELECT (page_count - freelist_count) * page_size FROM pragma_page_count, pragma_freelist_count, pragma_page_size",
        );
        let retention = Retention {
            keep_payloads: Duration::from_secs(7 * 86_400),
            keep_history: Duration::from_secs(30 * 86_400),
            // Room for about half of the rows.
            max_store_bytes: (used / 2) as u64,
            dedupe_window: Duration::from_secs(86_400),
        };
        let pruned = store.prune(retention, &|| true).expect("prune");
        assert!(pruned.rows > 0, "over the bound, rows go");
        let done_left = count("SELECT count(*) FROM deliveries WHERE state = 'done'");
        assert!(
            done_left < 2000 && done_left > 0,
            "{done_left} done rows left"
        );
        assert_eq!(
            count("SELECT min(id) FROM deliveries WHERE state = 'done'"),
            2002 - done_left,
            "the oldest done rows went"
        );
        assert_eq!(
            count("SELECT count(*) FROM deliveries WHERE state = 'dead'"),
            1,
            "the dead letter, older than all of them, stays"
        );
        // With room for less than the schema, the dead letter goes too, after every other finished row.
        let none = Retention {
            max_store_bytes: 4096,
            ..retention
        };
        store.prune(none, &|| true).expect("prune");
        assert_eq!(count("SELECT count(*) FROM deliveries"), 0);
    }

    /// When what no pruning may remove (entries waiting to run, here) is over `max_store_bytes` by itself,
    /// removing the finished rows would gain nothing: the history and the dead letters are kept. Once the
    /// finished rows can bring the store under the bound, they go as before.
    #[test]
    fn the_size_bound_keeps_finished_rows_when_removing_them_cannot_help() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        let conn = connect(&store.path).expect("connect");
        let now = now_ms();
        conn.execute_batch("BEGIN").expect("begin");
        // 10 finished rows (one a dead letter) of 2 KiB, and 500 entries waiting to run of 8 KiB.
        for n in 0..510i64 {
            let (state, bytes, finished) = match n {
                0 => ("dead", 2048, Some(now)),
                1..10 => ("done", 2048, Some(now)),
                _ => ("queued", 8192, None),
            };
            conn.execute(
                "INSERT INTO deliveries (request_id, received_at, mode, event, route_line, script, state,
                     status, finished_at, payload, payload_bytes)
                 VALUES (?1, ?2, 'async', 'E', 1, 's', ?3, 202, ?4, zeroblob(?5), ?5)",
                params![format!("r-{n}"), now - 1000 + n, state, finished, bytes],
            )
            .expect("insert");
        }
        conn.execute_batch("COMMIT").expect("commit");
        let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).expect("count") };
        let retention = Retention {
            keep_payloads: Duration::from_secs(7 * 86_400),
            keep_history: Duration::from_secs(30 * 86_400),
            // The waiting entries alone hold about 4 MiB.
            max_store_bytes: 1 << 20,
            dedupe_window: Duration::from_secs(86_400),
        };
        let pruned = store.prune(retention, &|| true).expect("prune");
        assert_eq!(pruned.rows, 0);
        assert_eq!(count("SELECT count(*) FROM deliveries"), 510);
        // Room for the waiting entries and a few finished rows: the oldest finished rows go, the dead
        // letter last, and no waiting entry.
        let used = used_bytes(&conn).expect("used");
        let roomier = Retention {
            max_store_bytes: (used - 4 * 4096) as u64,
            ..retention
        };
        let pruned = store.prune(roomier, &|| true).expect("prune");
        assert!(pruned.rows > 0 && pruned.rows < 10, "{pruned:?}");
        assert_eq!(
            count("SELECT count(*) FROM deliveries WHERE state = 'queued'"),
            500
        );
        assert_eq!(
            count("SELECT count(*) FROM deliveries WHERE state = 'dead'"),
            1
        );
    }

    /// Pruning goes in bounded steps, each its own transaction, so that accepts wait for one step at
    /// most; the payloads' step reads only rows that still hold a payload.
    #[test]
    fn pruning_goes_in_bounded_steps_until_nothing_is_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        let plan = query_plan(&store, PRUNE_PAYLOADS, &[&0, &1]);
        assert!(
            plan.iter().any(|s| s.contains("deliveries_payload_kept")),
            "{plan:?}"
        );
        let conn = connect(&store.path).expect("connect");
        let day = 86_400_000;
        let now = now_ms();
        // 2,500 finished rows 40 days old (past keep_history) and 2,500 of 10 days (past keep_payloads),
        // each with a 2 KiB payload, and one entry still waiting from long ago.
        conn.execute_batch("BEGIN").expect("begin");
        for n in 0..5000i64 {
            let received = if n < 2500 {
                now - 40 * day
            } else {
                now - 10 * day
            };
            conn.execute(
                "INSERT INTO deliveries (request_id, received_at, mode, event, route_line, script, state,
                     status, finished_at, payload, payload_bytes)
                 VALUES (?1, ?2, 'sync', 'E', 1, 's', 'done', 200, ?2, zeroblob(2048), 2048)",
                params![format!("r-{n}"), received],
            )
            .expect("insert");
        }
        conn.execute(
            "INSERT INTO deliveries (request_id, received_at, mode, event, route_line, script, state,
                 status, payload, payload_bytes)
             VALUES ('waiting', ?1, 'async', 'E', 1, 's', 'queued', 202, zeroblob(2048), 2048)",
            [now - 400 * day],
        )
        .expect("insert");
        conn.execute_batch("COMMIT").expect("commit");
        let retention = Retention {
            keep_payloads: Duration::from_secs(7 * 86_400),
            keep_history: Duration::from_secs(30 * 86_400),
            max_store_bytes: 1 << 30,
            dedupe_window: Duration::from_secs(86_400),
        };
        let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).expect("count") };
        let pages = count("PRAGMA page_count");
        let step = store
            .write(move |conn, _| prune_step(conn, &retention, now, i64::MAX, true))
            .expect("step");
        assert!(
            matches!(step, Some(Step::Payloads(n)) if n == PRUNE_STEP as u64),
            "one step changes {PRUNE_STEP} rows at most"
        );
        let pruned = store.prune(retention, &|| true).expect("prune");
        assert_eq!(pruned.payloads, 5000 - PRUNE_STEP as u64);
        assert_eq!(pruned.rows, 2500);
        assert_eq!(count("SELECT count(*) FROM deliveries"), 2501);
        assert_eq!(
            count("SELECT count(*) FROM deliveries WHERE payload IS NOT NULL"),
            1,
            "the waiting entry keeps its payload"
        );
        assert_eq!(count("PRAGMA freelist_count"), 0, "freed pages given back");
        // Over the size bound (less than the schema, more than the waiting entry): the oldest finished
        // rows go, step by step, never the waiting entry.
        let tight = Retention {
            max_store_bytes: 4096,
            ..retention
        };
        assert_eq!(store.prune(tight, &|| true).expect("prune").rows, 2500);
        let left: String = conn
            .query_row("SELECT group_concat(request_id) FROM deliveries", [], |r| {
                r.get(0)
            })
            .expect("left");
        assert_eq!(left, "waiting", "only the waiting entry is left");
        // Rows written while a pass runs (here: one each time it asks whether to go on) wait for the
        // next pass, so the pass ends however fast they come.
        let insert = |id: &str, received: i64| {
            conn.execute(
                "INSERT INTO deliveries (request_id, received_at, mode, event, route_line, script, state,
                     status, finished_at, payload_bytes)
                 VALUES (?1, ?2, 'sync', 'E', 1, 's', 'done', 200, ?2, 0)",
                params![id, received],
            )
            .expect("insert");
        };
        for n in 0..10 {
            insert(&format!("old-{n}"), now - day);
        }
        let asked = std::cell::Cell::new(0);
        let late = || {
            asked.set(asked.get() + 1);
            insert(&format!("late-{}", asked.get()), now);
            asked.get() < 1000
        };
        assert_eq!(store.prune(tight, &late).expect("prune").rows, 10);
        assert!(asked.get() < 1000, "the pass did not end");
        assert_eq!(
            count("SELECT count(*) FROM deliveries WHERE request_id LIKE 'late-%'"),
            asked.get()
        );
        assert!(
            count("PRAGMA page_count") < pages / 10,
            "the file shrinks: {pages} pages before, {} after",
            count("PRAGMA page_count")
        );
    }

    #[test]
    fn the_recovery_at_start_reads_only_the_waiting_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        for sql in [RECOVER, RECOVER_ATTEMPTS] {
            let plan = query_plan(&store, sql, &[]);
            assert!(
                plan.iter().any(|step| step.contains("deliveries_waiting")),
                "{sql}: {plan:?}"
            );
        }
        let plan = query_plan(&store, RECOVER, &[]);
        assert!(
            plan.iter().any(|step| step.contains("deliveries_waiting")),
            "{plan:?}"
        );
    }

    #[test]
    fn the_set_aside_list_wakes_the_writer_when_empty_and_when_long() {
        let later = Later::default();
        let job = nothing;
        let push = |job| later.push(job).map_err(|_| "refused").expect("open list");
        assert!(push(job()), "the first one wakes the writer");
        for n in 2..CHANNEL {
            assert!(!push(job()), "row {n} comes without a wake-up");
        }
        assert!(!later.long());
        assert!(push(job()), "a long list wakes the writer again");
        assert!(later.long());
        // Full: the next one waits until the writer has taken the list.
        let pushed = AtomicBool::new(false);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let woke = push(job());
                pushed.store(true, Ordering::SeqCst);
                woke
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(!pushed.load(Ordering::SeqCst), "pushed into a full list");
            assert_eq!(later.take().len(), CHANNEL);
            assert!(
                waiter.join().expect("join"),
                "once taken, the next one wakes the writer"
            );
        });
        assert_eq!(later.take().len(), 1);
    }

    #[test]
    fn a_writer_that_panics_breaks_the_store_and_leaves_no_caller_waiting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        let failed =
            store.write(|_, _| -> Result<(), StoreError> { panic!("a bug in the writer") });
        assert!(
            matches!(failed, Err(StoreError::Broken(_))),
            "{:?}",
            failed.err()
        );
        assert!(
            store.broken(),
            "the daemon must learn that nothing is written any more"
        );
        // More set-aside work than the list holds: every piece is refused, none waits for room.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let refused = (0..CHANNEL + 10)
                .filter(|_| store.submit(|_, _| Ok(()), |_| {}, Wait::SetAside).is_err())
                .count();
            let _ = tx.send(refused);
        });
        let refused = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a caller is stuck waiting for a writer that is gone");
        assert_eq!(refused, CHANNEL + 10);
    }

    #[test]
    fn a_closed_set_aside_list_gives_work_back_and_wakes_whoever_waits_for_room() {
        let later = Later::default();
        for _ in 0..CHANNEL {
            assert!(later.push(nothing()).is_ok());
        }
        std::thread::scope(|s| {
            let waiter = s.spawn(|| later.push(nothing()).is_err());
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(
                later.close().len(),
                CHANNEL,
                "what was set aside is handed back"
            );
            assert!(
                waiter.join().expect("join"),
                "the waiter is refused, not left waiting"
            );
        });
        assert!(later.push(nothing()).is_err());
    }

    #[test]
    fn a_running_mark_is_committed_before_the_run_starts_and_a_dropped_entry_does_not_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        // As the daemon holds it: without a daemon, a running entry is an interrupted one, and may go.
        store.claim().expect("claim");
        let bounds = Bounds {
            max_queued: 100,
            max_queued_bytes: 1 << 20,
            dedupe_window: Duration::ZERO,
        };
        // What another process (the operator's CLI) sees: its own connection.
        let other = connect(&store.path).expect("connect");
        let state = |id: i64| -> Option<String> {
            other
                .query_row("SELECT state FROM deliveries WHERE id = ?1", [id], |r| {
                    r.get(0)
                })
                .optional()
                .expect("state")
        };
        let mut waited = Duration::ZERO;
        for n in 0..20 {
            let id = queued(store.accept(delivery(n), bounds));
            // A history row set aside just before wakes the writer to gather more for up to 250 ms: the
            // mark, which someone waits for, must end that wait as an accept does.
            store.record(sync_record(n, 200, attempt()));
            let marking = Instant::now();
            let started = store.started(id, &format!("r{n}"));
            waited += marking.elapsed();
            assert_eq!(started, Ok(true), "entry {n}");
            assert_eq!(state(id).as_deref(), Some("running"), "entry {n}");
            assert_eq!(
                store.drop_entry(&id.to_string()),
                Ok(false),
                "a running entry is not dropped"
            );
            let retry = now_ms() + 60_000;
            store
                .finish(id, attempt(), Next::Retry(retry))
                .expect("finish");
            assert_eq!(state(id).as_deref(), Some("failed"), "entry {n}");
        }
        // 20 × 250 ms if the marks waited for the gathering; the marks alone are timed, and the bound is
        // generous, to stay clear of a slow machine's fsyncs.
        assert!(
            waited < GATHER * 10,
            "20 marks took {waited:?}: they waited for the set-aside work's gathering"
        );
        let id = queued(store.accept(delivery(99), bounds));
        assert_eq!(store.drop_entry(&id.to_string()), Ok(true));
        assert_eq!(
            store.started(id, "r99"),
            Ok(false),
            "a dropped entry is not started"
        );
        assert_eq!(state(id), None);
        // A read of the dropped entry taken before the drop does not start another entry in its name.
        let next = queued(store.accept(delivery(100), bounds));
        assert_eq!(store.started(next, "r99"), Ok(false));
        assert_eq!(state(next).as_deref(), Some("queued"));
        assert_eq!(store.started(next, "r100"), Ok(true));
    }

    /// `deliveries drop 3` given twice (or late) must not find another entry under 3: the newest entry
    /// dropped, its number is not given to the next one.
    #[test]
    fn a_dropped_newest_entry_s_number_is_not_given_to_the_next_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(dir.path()).expect("open");
        let bounds = Bounds {
            max_queued: 100,
            max_queued_bytes: 1 << 20,
            dedupe_window: Duration::ZERO,
        };
        let ids: Vec<i64> = (1..=3)
            .map(|n| queued(store.accept(delivery(n), bounds)))
            .collect();
        let newest = ids[2].to_string();
        assert_eq!(store.drop_entry(&newest), Ok(true));
        let next = queued(store.accept(delivery(4), bounds));
        assert!(next > ids[2], "{next} after {ids:?}");
        assert_eq!(store.drop_entry(&newest), Ok(false), "dropped already");
        assert!(store.show(&newest).expect("show").is_none());
        let (row, _) = store
            .show(&next.to_string())
            .expect("show")
            .expect("the next entry is still there");
        assert_eq!(row.request_id, "r4");
    }
}
