//! The dispatcher: runs the store's queued deliveries with the same contract as a sync run (`$1` a private
//! payload file, the same environment plus `HOOKRUNNER_ATTEMPT` and `HOOKRUNNER_QUEUED_AT`, its own process
//! group, the route's timeout, output logged and its tail kept), through [`Runner::run`].
//!
//! What it guarantees:
//! - at least once: an entry leaves the queue only when an attempt's result is committed; one interrupted
//!   by a crash is queued again at start and runs again (the script sees the attempt number);
//! - order: entries start in the order they came due, a first attempt when it arrived, a retry when its
//!   pause ended; so one route's first attempts start in arrival order, and entries that arrived while a
//!   retry waited overtake it. A `serial` route runs one entry at a time, strictly in arrival
//!   order: a later entry waits while an earlier one waits to retry (held by script, so across reloads that
//!   move the route's line: [`Pending::serial_lane`]);
//! - sync requests are not starved: queued deliveries take script slots only through
//!   [`Limiter::try_background`];
//! - requests and their acknowledgements stay ahead of queued runs for the CPUs: the dispatcher and
//!   everything it starts run at the lowest priority ([`NICE`]), so in a burst the queue absorbs what
//!   the CPUs cannot run at once, rather than the scripts' start-ups (a fork and an exec or more each)
//!   slowing the answers; and while a burst is being acknowledged (more than [`BURST_ACKS_PER_SECOND`]),
//!   queued runs start at most one per [`BURST_START_EVERY`]: a run's start, however niced, takes the
//!   process's locks (its memory map, its allocator's arenas) that the threads answering need, and a
//!   thousand of them during a burst held the acknowledgements up by tens of milliseconds. The burst's
//!   entries wait in the queue and start as soon as it ends;
//! - outcome: exit 0 is done; 65 (EX_DATAERR) is dead at once; 75 (EX_TEMPFAIL) is retried whatever the
//!   attempt count; anything else (another code, a signal, a timeout, a failed start) is retried until the
//!   route's attempts are spent, then dead. Pauses double from 1 s up to `retry_max`, each drawn between
//!   half and all of that (jitter, so retries of many entries spread out).

use std::collections::hash_map::RandomState;
use std::collections::{HashSet, VecDeque};
use std::hash::BuildHasher;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::logging::Escaped;
use crate::metrics::{Metrics, RunOutcome};
use crate::payload::PayloadDir;
use crate::routes;
use crate::runner::{Exit, Job, Limiter, Runner};
use crate::store::{After, Attempt, Next, Pending, Retention, Shared, StoreError, now_ms};

/// EX_DATAERR: the script says the payload can never succeed. Dead at once.
pub const EXIT_NEVER_RETRY: i32 = 65;
/// EX_TEMPFAIL: the script says try again later. Retried even past the route's attempts.
pub const EXIT_TEMPFAIL: i32 = 75;
/// The pause before the second attempt; each next one doubles, up to the route's `retry_max`.
const FIRST_PAUSE: Duration = Duration::from_secs(1);
/// How often the queue is looked at without being told: entries the CLI queued again, retries coming due.
const POLL: Duration = Duration::from_millis(250);
/// Entries read at a time while looking at the queue: a look that starts a few entries (as each finished
/// run frees a slot) reads a few rows, not the whole queue.
const PAGE: usize = 32;
/// After a result could not be committed, the first pause before trying again; each next one doubles, up
/// to [`RECORD_PAUSE_MAX`].
const RECORD_PAUSE: Duration = Duration::from_millis(500);
/// How long an entry waits after the daemon could not prepare its attempt (its payload file could not be
/// written, its payload not read): until then the disk may have room again.
const HERE_PAUSE: Duration = Duration::from_secs(5);
const RECORD_PAUSE_MAX: Duration = Duration::from_secs(10);
/// How often finished history is pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How long a run killed by a signal waits for the daemon's stop before it counts as the script's failure
/// ([`Dispatcher::stopping_within`]).
const STOP_SIGNAL_SLACK: Duration = Duration::from_millis(500);
/// How much lower the dispatcher's CPU priority is than the daemon's, in nice steps: as low as it goes (a
/// nice value is at most 19). Each niced thread still weighs something, and a burst starts as many runs as
/// there are slots: at 10, a thousand of them together outweighed the few threads answering requests.
pub const NICE: i32 = 19;

/// Acknowledgements a second above which they are a burst, during which queued runs start at most one per
/// [`BURST_START_EVERY`]. Far above what a steady sender sends (a 10,000-device Jamf Pro estate, about 11
/// a second), far below what a burst is acknowledged at (10,000-25,000 a second on 2 CPUs).
pub const BURST_ACKS_PER_SECOND: u64 = 1_000;
/// During a burst, at least this long between two starts: the queue moves on, slowly.
pub const BURST_START_EVERY: Duration = Duration::from_millis(100);
/// The span over which the acknowledgement rate is measured.
const PACE_WINDOW: Duration = Duration::from_millis(20);

/// Rung when something may have become runnable (an entry accepted, a run finished).
#[derive(Default)]
pub struct Bell {
    rung: Mutex<bool>,
    ringing: Condvar,
    /// Entries accepted (queued) since the start, for the burst's pace ([`Pace`]).
    accepted: AtomicU64,
}

impl Bell {
    pub fn ring(&self) {
        *self.rung.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.ringing.notify_one();
    }

    /// An entry was accepted into the queue: counted, then rung.
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.ring();
    }

    fn wait(&self, timeout: Duration) {
        let rung = self.rung.lock().unwrap_or_else(|e| e.into_inner());
        let (mut rung, _) = self
            .ringing
            .wait_timeout_while(rung, timeout, |rung| !*rung)
            .unwrap_or_else(|e| e.into_inner());
        *rung = false;
    }
}

/// What a look at the queue asks of the dispatcher's loop.
enum Look {
    /// Look again after this long, or when the bell rings (an entry accepted, a run ended).
    Wait(Duration),
    /// A burst is being acknowledged: look again after this long, whatever rings.
    Paced(Duration),
}

/// Whether queued runs may start now, or wait for a burst of acknowledgements to pass. Pure: it is given
/// the count of accepted entries and the time.
#[derive(Debug)]
struct Pace {
    /// When the current measuring span began, and the count then.
    since: Instant,
    count_then: u64,
    /// Whether the last complete span was a burst.
    burst: bool,
    /// When a run last started.
    last_start: Option<Instant>,
}

impl Pace {
    fn new(now: Instant, count: u64) -> Pace {
        Pace {
            since: now,
            count_then: count,
            burst: false,
            last_start: None,
        }
    }

    /// How long the next start must wait (zero: it may start now), given the accepted count now.
    fn wait(&mut self, now: Instant, count: u64) -> Duration {
        let span = now.saturating_duration_since(self.since);
        let acks = count.saturating_sub(self.count_then);
        // Over a whole window at least: a few acks just after a quiet spell are no burst. But a window's
        // worth of them before the window is over is one already, not 20 ms of unpaced starts later.
        let budget_ms = span.max(PACE_WINDOW).as_millis() as u64;
        let burst = acks.saturating_mul(1000) >= BURST_ACKS_PER_SECOND.saturating_mul(budget_ms);
        if span >= PACE_WINDOW {
            self.burst = burst;
            self.since = now;
            self.count_then = count;
        } else if burst {
            self.burst = true;
        }
        match self.last_start {
            Some(at) if self.burst => {
                BURST_START_EVERY.saturating_sub(now.saturating_duration_since(at))
            }
            _ => Duration::ZERO,
        }
    }

    fn started(&mut self, now: Instant) {
        self.last_start = Some(now);
    }
}

pub struct Dispatcher {
    pub store: Shared,
    pub limiter: Arc<Limiter>,
    pub payloads: Arc<PayloadDir>,
    pub runner: Runner,
    /// The configuration in force (kill_grace, retention), as the gateway has it after a reload.
    pub config: Box<dyn Fn() -> Arc<Config> + Send + Sync>,
    pub bell: Arc<Bell>,
    /// The gateway's: queued runs count in the same run figures as sync ones.
    pub metrics: Arc<Metrics>,
    /// Set at SIGTERM: start nothing more.
    pub stop: Arc<AtomicBool>,
    /// Written to when the store breaks, to wake the accept loop so the daemon stops.
    pub waker: UnixStream,
}

/// What is running now: entries, and the serial lanes (scripts, see [`Pending::serial_lane`]) they hold.
#[derive(Default)]
struct Running {
    ids: HashSet<i64>,
    serial_lanes: HashSet<String>,
    /// Entries whose run ended since the current look at the queue began. Its reads may have been taken
    /// before their result was committed and show them still waiting: they are not started in this look
    /// (the run's end rings the bell, and the next look's reads show them as they are).
    ended: HashSet<i64>,
    /// The serial lanes of those entries: a read taken before an ended run's retry was committed does not
    /// show it waiting, and a later entry of its lane must not start from that read.
    ended_lanes: HashSet<String>,
}

impl Running {
    /// Whether `entry`, read in the current look at the queue, may start as far as what runs allows: not
    /// while it runs or its result may be newer than the read, and for a serial entry, not behind an
    /// earlier entry of its lane that runs, has just ended, or came before it in this look (`held`, kept
    /// for the whole look). The lane goes into `held` at its first entry of the look whether that one
    /// starts or not, so a lane whose run ends between two pages stays held for its later entries.
    fn may_start(&self, entry: &Pending, held: &mut HashSet<String>) -> bool {
        if self.ids.contains(&entry.id) || self.ended.contains(&entry.id) {
            return false;
        }
        if !entry.policy.serial {
            return true;
        }
        let lane = entry.serial_lane();
        let first = held.insert(lane.to_owned());
        first && !self.serial_lanes.contains(lane) && !self.ended_lanes.contains(lane)
    }
}

impl Dispatcher {
    /// Runs until `stop` is set, then waits for the scripts it started to end (each within its timeout
    /// and kill grace) and returns. Whatever did not start stays in the store.
    pub fn run(&self) {
        lower_priority();
        let running = Mutex::new(Running::default());
        std::thread::scope(|scope| {
            // On a thread of its own (niced too): a long pass over a large store must not hold up starts.
            // Without one (out of threads at start), pruning waits for the next start: the queue still runs.
            let pruning = std::thread::Builder::new()
                .name("hookrunner-prune".into())
                .spawn_scoped(scope, || {
                    while !self.stop.load(Ordering::SeqCst) && !self.store.broken() {
                        self.prune();
                        self.pause(PRUNE_EVERY);
                    }
                });
            if let Err(e) = pruning {
                log::error!(
                    "cannot start the pruning thread: {e}; the store is not pruned until a restart"
                );
            }
            // Due times are the wall clock's: entries queued while it read ahead, before a step back
            // (at start: while the daemon was down), would otherwise wait for as long as it was ahead.
            let mut clock = WallClock::new();
            let mut pace = Pace::new(Instant::now(), self.bell.accepted.load(Ordering::Relaxed));
            self.due_again();
            while !self.stop.load(Ordering::SeqCst) {
                if clock.set_back() {
                    self.due_again();
                }
                if self.store.broken() {
                    // The accept loop stops the daemon when it wakes and finds the store broken.
                    let _ = (&self.waker).write_all(b"!");
                    break;
                }
                match self.start_due(scope, &running, &mut pace) {
                    Look::Wait(wait) => self.bell.wait(wait),
                    // Every accepted entry rings the bell: a burst's next start waits out the pace alone.
                    Look::Paced(wait) => self.pause(wait),
                }
            }
        });
    }

    /// Starts every due entry a slot can be had for; returns how long to wait before looking again.
    fn start_due<'s>(
        &'s self,
        scope: &'s std::thread::Scope<'s, '_>,
        running: &'s Mutex<Running>,
        pace: &mut Pace,
    ) -> Look {
        // A burst being acknowledged goes first (module docs): no start, and no slot held, until its
        // turn. The look ends here, so the queue is read afresh (what came due, serial lanes) when it comes.
        let paced = pace.wait(Instant::now(), self.bell.accepted.load(Ordering::Relaxed));
        if !paced.is_zero() {
            return Look::Paced(paced.min(PACE_WINDOW));
        }
        // No slot, nothing to start: the queue is not read while every slot is busy.
        let Some(mut slot) = self.limiter.try_background() else {
            return Look::Wait(POLL);
        };
        let now = now_ms();
        let mut wait = POLL;
        // Serial lanes that already have an earlier entry waiting or running: later ones wait behind it.
        let mut held = HashSet::new();
        // What ended before this look is in the store as it read; what ends during it may be newer than
        // the read, so it is not started again in this look (the end rings for the next one).
        {
            let mut running = running.lock().unwrap_or_else(|e| e.into_inner());
            running.ended.clear();
            running.ended_lanes.clear();
        }
        // The first entry of each serial lane, due or not, and the other routes' due entries a page at a
        // time, taken together in the order they came due: a busy lane takes no slot from an entry that
        // came due before its own.
        let mut heads: VecDeque<Pending> = match self.store.lane_heads() {
            Ok(mut heads) => {
                heads.sort_by_key(|h| (h.due_at, h.id));
                heads.into()
            }
            Err(e) => {
                log::error!("cannot read the queue: {e}");
                return Look::Wait(POLL);
            }
        };
        let mut after = After::START;
        loop {
            let page = match self.store.pending(after, now, PAGE) {
                Ok(page) => page,
                Err(e) => {
                    log::error!("cannot read the queue: {e}");
                    return Look::Wait(POLL);
                }
            };
            let last = page.len() < PAGE;
            let mut page = page.into_iter().peekable();
            loop {
                let entry = match (heads.front(), page.peek()) {
                    (Some(head), Some(next)) if (head.due_at, head.id) < (next.due_at, next.id) => {
                        heads.pop_front()
                    }
                    (_, Some(_)) => page.next(),
                    (Some(_), None) if last => heads.pop_front(),
                    _ => break,
                };
                let Some(entry) = entry else { break };
                if !entry.policy.serial {
                    after = After::entry(&entry);
                }
                let lane = entry.serial_lane().to_owned();
                {
                    let running = running.lock().unwrap_or_else(|e| e.into_inner());
                    if !running.may_start(&entry, &mut held) {
                        continue;
                    }
                }
                // Only the first entry of a serial lane comes before it is due (the store leaves out the
                // others): waiting to retry, it holds the later ones of its lane. The others are seen once
                // due, at the next look (POLL at the latest).
                if entry.due_at > now {
                    let until = Duration::from_millis((entry.due_at - now) as u64);
                    wait = wait.min(until);
                    continue;
                }
                // During a burst, one start per look: the next waits out the pace (above), slot freed.
                let paced = pace.wait(Instant::now(), self.bell.accepted.load(Ordering::Relaxed));
                if !paced.is_zero() {
                    return Look::Paced(paced.min(PACE_WINDOW));
                }
                pace.started(Instant::now());
                {
                    let mut running = running.lock().unwrap_or_else(|e| e.into_inner());
                    running.ids.insert(entry.id);
                    if entry.policy.serial {
                        running.serial_lanes.insert(lane.clone());
                    }
                }
                let (id, serial) = (entry.id, entry.policy.serial);
                let started = std::thread::Builder::new()
                    .name("hookrunner-run".into())
                    .spawn_scoped(scope, {
                        let lane = lane.clone();
                        move || {
                            // On the run's own thread, so that its commit holds up no other start.
                            let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
                                if self.mark_running(&entry) {
                                    self.run_one(&entry);
                                }
                            }));
                            if ran.is_err() {
                                self.fail_after_panic(&entry);
                            }
                            drop(slot);
                            let mut running = running.lock().unwrap_or_else(|e| e.into_inner());
                            running.ids.remove(&entry.id);
                            running.ended.insert(entry.id);
                            // Only a serial entry holds its lane: a route that runs the same script
                            // without `serial` must not free the lane of one that runs it with.
                            if serial && running.serial_lanes.remove(&lane) {
                                running.ended_lanes.insert(lane);
                            }
                            drop(running);
                            self.bell.ring();
                        }
                    });
                if let Err(e) = started {
                    // Out of threads (TasksMax, RLIMIT_NPROC): the entry was not touched and waits; looked at
                    // again after a pause. (Scope::spawn would panic and end the dispatcher for good.)
                    let mut running = running.lock().unwrap_or_else(|e| e.into_inner());
                    running.ids.remove(&id);
                    if serial {
                        running.serial_lanes.remove(&lane);
                    }
                    drop(running);
                    log::error!(
                        "cannot start a thread for a queued run: {e}; trying again shortly"
                    );
                    return Look::Wait(POLL);
                }
                match self.limiter.try_background() {
                    Some(next) => slot = next,
                    None => return Look::Wait(POLL),
                }
                if self.stop.load(Ordering::SeqCst) {
                    return Look::Wait(wait);
                }
            }
            if last {
                return Look::Wait(wait);
            }
        }
    }

    /// Makes the entries due later than any pause could have put them due now ([`Store::due_again`]).
    fn due_again(&self) {
        match self.store.due_again(now_ms(), HERE_PAUSE) {
            Ok(0) => {}
            Ok(n) => log::warn!(
                "{n} queued deliveries were due later than any pause could put them (the clock was set \
                 back since they were queued): they are due now"
            ),
            Err(e) => log::error!("cannot look for deliveries the clock set back: {e}"),
        }
    }

    /// After a run's thread panicked (a bug in hookrunner): its entry, left running, gets a failed
    /// attempt, so it is retried and at last dead like any failure, rather than held running (and its
    /// serial lane with it) until a restart that would only run it into the same panic.
    fn fail_after_panic(&self, entry: &Pending) {
        let n = entry.attempts + 1;
        log::error!(
            "{} async id={} event={}: hookrunner failed while running attempt {n} (a bug; the panic \
             is above); counted as a failed attempt",
            entry.request_id,
            entry.id,
            entry.event
        );
        let attempt = Attempt {
            n,
            started_at: now_ms(),
            duration_ms: 0.0,
            exit_code: None,
            signal: None,
            timed_out: false,
            output: "hookrunner failed while running this attempt (a bug; see the daemon's log)"
                .into(),
        };
        let next = next_step(entry, n, None, now_ms(), random_unit());
        // Tried until the store takes it, as any result is: the lane is let go once this returns.
        let recorded = self.keep_trying(
            || self.store.finish(entry.id, attempt.clone(), next),
            |e, pause| {
                log::error!(
                    "{} cannot record the failed attempt of id={}: {e}; trying again in {} ms",
                    entry.request_id,
                    entry.id,
                    pause.as_millis()
                )
            },
        );
        if let Err(e) = recorded {
            log::error!(
                "{} cannot record the failed attempt of id={}: {e}; it stays running until a restart",
                entry.request_id,
                entry.id
            );
        }
    }

    fn prune(&self) {
        let config = (self.config)();
        let s = &config.store;
        let retention = Retention {
            keep_payloads: s.keep_payloads,
            keep_history: s.keep_history,
            max_store_bytes: s.max_store_bytes,
            dedupe_window: s.dedupe_window,
        };
        match self
            .store
            .prune(retention, &|| !self.stop.load(Ordering::SeqCst))
        {
            Ok(p) if p.rows > 0 || p.payloads > 0 => log::info!(
                "store pruned: {} finished row(s) removed, {} payload(s) dropped",
                p.rows,
                p.payloads
            ),
            Ok(_) => {}
            Err(e) => log::warn!("cannot prune the store: {e}"),
        }
    }

    /// Marks `entry` running before its script starts; says whether it may start. Not when the operator
    /// dropped it meanwhile. While the mark cannot be written (a full disk, a lock held too long) it is
    /// tried again ([`Dispatcher::keep_trying`]), holding the entry's slot: it starts once the store takes
    /// writes again, and at SIGTERM, or when the store is broken, it stays queued.
    fn mark_running(&self, entry: &Pending) -> bool {
        if self.stop.load(Ordering::SeqCst) {
            return false;
        }
        let marked = self.keep_trying(
            || self.store.started(entry.id, &entry.request_id),
            |e, pause| {
                log::error!(
                    "{} cannot mark id={} running: {e}; trying again in {} ms",
                    entry.request_id,
                    entry.id,
                    pause.as_millis()
                )
            },
        );
        match marked {
            Ok(true) => true,
            Ok(false) => {
                log::info!(
                    "{} async id={} event={} no longer waits to run (dropped): not started",
                    entry.request_id,
                    entry.id,
                    entry.event
                );
                false
            }
            Err(_) => false,
        }
    }

    /// Puts a running entry back in the queue, due at `due_at`, with no attempt counted
    /// ([`crate::store::Store::put_back`]), trying again while the store cannot write; says whether it
    /// was put back.
    fn put_back(&self, entry: &Pending, due_at: i64) -> bool {
        self.keep_trying(
            || self.store.put_back(entry.id, due_at),
            |e, pause| {
                log::error!(
                    "{} cannot put id={} back in the queue: {e}; trying again in {} ms",
                    entry.request_id,
                    entry.id,
                    pause.as_millis()
                )
            },
        )
        .is_ok()
    }

    /// One attempt of one entry, its result committed before the entry counts as run.
    fn run_one(&self, entry: &Pending) {
        let n = entry.attempts + 1;
        let started_at = now_ms();
        let started = Instant::now();
        let ran = {
            let _running = self.metrics.running();
            self.attempt(entry, n)
        };
        let (exit, output) = match ran {
            Err(Unstarted::Here(e)) => {
                // The script never had its chance: not an attempt, so a full payload directory or a
                // store that cannot be read spends none of the route's attempts.
                if self.put_back(entry, now_ms() + HERE_PAUSE.as_millis() as i64) {
                    log::error!(
                        "{} async id={} event={} cannot prepare attempt {n}: {e}; not counted as an \
                         attempt, tried again in {} ms",
                        entry.request_id,
                        entry.id,
                        entry.event,
                        HERE_PAUSE.as_millis()
                    );
                }
                return;
            }
            Err(Unstarted::Script(e)) => {
                let hint = crate::runner::spawn_hint(&e);
                log::error!(
                    "{} cannot run {}: {e}{hint}",
                    entry.request_id,
                    Escaped(&entry.script)
                );
                (None, format!("{e}{hint}").into_bytes())
            }
            Ok(outcome) => {
                let config = (self.config)();
                let script = Path::new(&entry.script);
                let script = script.strip_prefix(&config.scripts_dir).unwrap_or(script);
                self.metrics.ran(
                    entry.route_line,
                    &script.display().to_string(),
                    RunOutcome::of(outcome.exit),
                    outcome.duration,
                );
                (Some(outcome.exit), outcome.output)
            }
        };
        if matches!(exit, Some(Exit::Signal(_))) && self.stopping_within(STOP_SIGNAL_SLACK) {
            // Killed from outside while the daemon stops: a supervisor that signals every process of the
            // service at once (systemd's default KillMode, an operator's `pkill -g`). That is the stop's
            // doing, not the script's: the entry waits for the next start, and the attempt is not counted.
            if self.put_back(entry, now_ms()) {
                log::warn!(
                    "{} async id={} event={} attempt {n} was killed by a signal while the daemon stops: \
                     not counted, it runs again at the next start",
                    entry.request_id,
                    entry.id,
                    entry.event
                );
            }
            return;
        }
        let next = next_step(entry, n, exit, now_ms(), random_unit());
        let (exit_code, signal, timed_out) = match exit {
            Some(Exit::Code(code)) => (Some(code), None, false),
            Some(Exit::Signal(signal)) => (None, Some(signal), false),
            Some(Exit::TimedOut) => (None, None, true),
            None => (None, None, false),
        };
        let attempt = Attempt {
            n,
            started_at,
            duration_ms: (started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            exit_code,
            signal,
            timed_out,
            output: String::from_utf8_lossy(&output).into_owned(),
        };
        let shown = match exit {
            Some(Exit::Code(code)) => code.to_string(),
            Some(Exit::Signal(signal)) => format!("signal{signal}"),
            Some(Exit::TimedOut) => "timeout".to_string(),
            None => "not-started".to_string(),
        };
        let then = match next {
            Next::Done => "done".to_string(),
            Next::Dead => "dead".to_string(),
            Next::Retry(at) => format!("retry_in={}ms", (at - now_ms()).max(0)),
        };
        // The run's own time, as `deliveries show` has it, not the commit's after it.
        let ran_ms = attempt.duration_ms;
        if !self.record(entry, attempt, next) {
            return;
        }
        let config = (self.config)();
        let script = Path::new(&entry.script);
        let script = script.strip_prefix(&config.scripts_dir).unwrap_or(script);
        log::info!(
            "{} async id={} event={} attempt={n} exit={shown} {then} script={} time={:.1}ms",
            entry.request_id,
            entry.id,
            entry.event,
            Escaped(&script.display().to_string()),
            ran_ms
        );
    }

    /// Whether the daemon stops, or is told to within `slack`. A supervisor that stops a service signals its
    /// processes one by one, in no order it promises: a script may die of its signal a moment before the
    /// daemon's own has been handled.
    fn stopping_within(&self, slack: Duration) -> bool {
        let until = Instant::now() + slack;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Commits an attempt's result, trying again while the store cannot write (a full disk, a lock held
    /// by someone else): until then the entry is marked running, which nothing but this or a restart
    /// changes, so giving up would leave it waiting until the next start. Gives up only at SIGTERM or when
    /// the store is broken, when the daemon is stopping anyway: the entry is then queued again at start
    /// and runs again (at least once). Says whether the result was committed.
    fn record(&self, entry: &Pending, attempt: Attempt, next: Next) -> bool {
        let n = attempt.n;
        let recorded = self.keep_trying(
            || self.store.finish(entry.id, attempt.clone(), next),
            |e, pause| {
                log::error!(
                    "{} cannot record attempt {n}: {e}; trying again in {} ms",
                    entry.request_id,
                    pause.as_millis()
                )
            },
        );
        if let Err(e) = &recorded {
            log::error!(
                "{} cannot record attempt {n}: {e}; it runs again after the restart",
                entry.request_id
            );
        }
        recorded.is_ok()
    }

    /// Runs `write` until the store takes it, calling `failed` with each error and the pause before the
    /// next try (doubling from [`RECORD_PAUSE`] to [`RECORD_PAUSE_MAX`]); gives up with the last error at
    /// SIGTERM or when the store is broken.
    fn keep_trying<T>(
        &self,
        mut write: impl FnMut() -> Result<T, StoreError>,
        failed: impl Fn(&StoreError, Duration),
    ) -> Result<T, StoreError> {
        let mut pause = RECORD_PAUSE;
        loop {
            let e = match write() {
                Ok(done) => return Ok(done),
                Err(e) => e,
            };
            if self.stop.load(Ordering::SeqCst) || self.store.broken() {
                return Err(e);
            }
            failed(&e, pause);
            self.pause(pause);
            pause = (pause * 2).min(RECORD_PAUSE_MAX);
        }
    }

    /// Sleeps for `length`, or until SIGTERM.
    fn pause(&self, length: Duration) {
        let until = Instant::now() + length;
        while !self.stop.load(Ordering::SeqCst) && Instant::now() < until {
            std::thread::sleep(until.saturating_duration_since(Instant::now()).min(POLL));
        }
    }

    fn attempt(&self, entry: &Pending, n: u32) -> Result<crate::runner::Outcome, Unstarted> {
        let script = Path::new(&entry.script);
        let config = (self.config)();
        routes::check_before_run(&config.scripts_dir, script)
            .map_err(|e| Unstarted::Script(io::Error::other(e.0)))?;
        let body = self
            .store
            .payload(entry.id)
            .map_err(|e| Unstarted::Here(io::Error::other(e)))?
            // Pruning never takes a waiting entry's payload: only a broken store loses one, and then
            // no later attempt can do better.
            .ok_or_else(|| {
                Unstarted::Script(io::Error::other("the entry has no payload any more"))
            })?;
        let mut payload = self.payloads.create().map_err(Unstarted::Here)?;
        payload.write_all(&body).map_err(Unstarted::Here)?;
        payload.finish().map_err(Unstarted::Here)?;
        let attempt = n.to_string();
        let queued_at = queued_at(entry.received_at);
        let mut env: Vec<(&str, &str)> = entry
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        // An entry queued by a hookrunner that left empty values out gets them, as one queued now does.
        for name in crate::gateway::REQUEST_VARIABLES {
            if !env.iter().any(|(k, _)| *k == name) {
                env.push((name, ""));
            }
        }
        env.push(("HOOKRUNNER_ATTEMPT", &attempt));
        env.push(("HOOKRUNNER_QUEUED_AT", &queued_at));
        let job = Job {
            script,
            payload: payload.path(),
            env: &env,
            timeout: entry.policy.timeout,
            kill_grace: config.kill_grace,
            request_id: &entry.request_id,
        };
        self.runner.run(&job).map_err(|e| {
            // Out of processes, descriptors or memory: the daemon's shortage, which the sync path answers
            // 503. The script never started, so it spends none of the route's attempts.
            if crate::gateway::is_resource_shortage(&e) {
                Unstarted::Here(e)
            } else {
                Unstarted::Script(e)
            }
        })
    }
}

/// Why an attempt did not start.
enum Unstarted {
    /// The daemon's own failure (reading the payload from the store, writing its file: a full or failing
    /// disk; no process, descriptor or memory to start the script with): the entry is put back, and the
    /// attempt does not count.
    Here(io::Error),
    /// The script's (missing, not executable, cannot be started): an attempt that failed.
    Script(io::Error),
}

impl std::fmt::Display for Unstarted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unstarted::Here(e) | Unstarted::Script(e) => e.fmt(f),
        }
    }
}

/// Lowers the calling thread's CPU priority by [`NICE`]. Linux keeps a nice value per thread, and a new
/// thread or process takes its creator's: the threads that run entries, and their scripts, inherit it,
/// while the gateway's threads and the store's writer keep the daemon's. (No `pre_exec` in the child:
/// that would make std fork instead of using posix_spawn.)
fn lower_priority() {
    use rustix::process::{getpriority_process, setpriority_process};
    let lowered =
        getpriority_process(None).and_then(|nice| setpriority_process(None, (nice + NICE).min(19)));
    if let Err(e) = lowered {
        log::warn!("cannot lower the priority of queued runs: {e}; they compete with requests");
    }
}

/// Notices the wall clock being set back, against the monotonic one.
struct WallClock {
    at: Instant,
    wall: i64,
}

impl WallClock {
    fn new() -> WallClock {
        WallClock {
            at: Instant::now(),
            wall: now_ms(),
        }
    }

    /// Whether the wall clock went back by more than a second since the last call (or `new`).
    fn set_back(&mut self) -> bool {
        let last = std::mem::replace(self, WallClock::new());
        last.went_back_by_now(self)
    }

    /// Whether, from this reading to `now`, the wall clock moved back by more than a second against the
    /// monotonic one.
    fn went_back_by_now(&self, now: &WallClock) -> bool {
        let expected = self.wall + now.at.duration_since(self.at).as_millis() as i64;
        now.wall + 1000 < expected
    }
}

/// `HOOKRUNNER_QUEUED_AT`: when the entry arrived, in RFC 3339 UTC; the milliseconds themselves for a
/// time RFC 3339 cannot write (after the year 9999), rather than a panic.
fn queued_at(received_at: i64) -> String {
    use std::fmt::Write;
    let time = UNIX_EPOCH + Duration::from_millis(received_at.max(0) as u64);
    let mut text = String::new();
    match write!(text, "{}", humantime::format_rfc3339_millis(time)) {
        Ok(()) => text,
        Err(_) => received_at.to_string(),
    }
}

/// Where an entry goes after attempt `n` ended with `exit` (`None`: it could not be started). `unit` is a
/// random number in [0, 1) for the jitter.
fn next_step(entry: &Pending, n: u32, exit: Option<Exit>, now: i64, unit: f64) -> Next {
    let retry = || Next::Retry(now + pause(n, entry.policy.retry_max, unit).as_millis() as i64);
    match exit {
        Some(Exit::Code(0)) => Next::Done,
        Some(Exit::Code(EXIT_NEVER_RETRY)) => Next::Dead,
        Some(Exit::Code(EXIT_TEMPFAIL)) => retry(),
        _ if n >= entry.policy.max_attempts => Next::Dead,
        _ => retry(),
    }
}

/// The pause after attempt `n`: 1 s doubling, at most `max`, drawn between half and all of that.
fn pause(n: u32, max: Duration, unit: f64) -> Duration {
    let doubled = FIRST_PAUSE.saturating_mul(1u32 << (n.saturating_sub(1)).min(20));
    let full = doubled.min(max);
    full.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
}

/// A number in [0, 1), different at every call: the standard library's per-instance random hash keys.
fn random_unit() -> f64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let bits = RandomState::new().hash_one(nanos);
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Policy;

    #[test]
    fn a_burst_of_acks_paces_the_starts_and_its_end_frees_them() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut pace = Pace::new(t0, 0);
        // Steady traffic, a few acks a window: every start at once.
        assert_eq!(pace.wait(ms(10), 1), Duration::ZERO);
        pace.started(ms(10));
        assert_eq!(pace.wait(ms(30), 3), Duration::ZERO);
        pace.started(ms(30));
        assert_eq!(pace.wait(ms(31), 4), Duration::ZERO);
        pace.started(ms(31));
        // 1,000 a second is a burst, told as soon as a window's worth has come (20 within 5 ms), before
        // the window is over: the next start waits until 100 ms after the last.
        assert_eq!(pace.wait(ms(35), 24), Duration::from_millis(96));
        assert_eq!(pace.wait(ms(131), 500), Duration::ZERO);
        pace.started(ms(131));
        assert_eq!(pace.wait(ms(150), 900), Duration::from_millis(81));
        // Still a burst over the next windows: one start per 100 ms, not more.
        assert_eq!(pace.wait(ms(231), 2_000), Duration::ZERO);
        pace.started(ms(231));
        assert_eq!(pace.wait(ms(240), 2_100), Duration::from_millis(91));
        assert_eq!(pace.wait(ms(251), 2_110), Duration::from_millis(80));
        // The burst ends (19 acks in the next 21 ms: under 1,000 a second): starts are free again within
        // a window, however recently the last one was.
        assert_eq!(pace.wait(ms(272), 2_129), Duration::ZERO);
        pace.started(ms(272));
        assert_eq!(pace.wait(ms(273), 2_129), Duration::ZERO);
    }

    fn entry(max_attempts: u32) -> Pending {
        Pending {
            id: 1,
            request_id: "r".into(),
            received_at: 0,
            event: "E".into(),
            route_line: 1,
            script: "/s".into(),
            env: Vec::new(),
            attempts: 0,
            due_at: 0,
            policy: Policy {
                max_attempts,
                retry_max: Duration::from_secs(3600),
                timeout: Duration::from_secs(30),
                serial: false,
            },
        }
    }

    /// A serial lane's run that ends between two pages of one look does not let a later entry of its
    /// lane, on the second page, start ahead of the earlier ones skipped on the first (and of the ended
    /// run's own retry, which the second page does not read again).
    #[test]
    fn a_serial_lane_stays_held_across_the_pages_of_one_look() {
        let serial = |id| Pending {
            id,
            policy: Policy {
                serial: true,
                ..entry(3).policy
            },
            ..entry(3)
        };
        let mut running = Running::default();
        running.ids.insert(1);
        running.serial_lanes.insert("/s".into());
        let mut held = HashSet::new();
        // First page: entry 1 runs, entries 2 and 3 wait behind it.
        assert!(!running.may_start(&serial(1), &mut held));
        assert!(!running.may_start(&serial(2), &mut held));
        assert!(!running.may_start(&serial(3), &mut held));
        // Entry 1 ends (its retry committed) and goes into `ended` and `ended_lanes` (cleared when this
        // look began, so the lane would be free by them alone).
        running.ids.remove(&1);
        running.serial_lanes.remove("/s");
        assert!(
            !running.may_start(&serial(33), &mut held),
            "a later entry overtook entries 2 and 3"
        );
        // Another lane, and entries that are not serial, are not held by it.
        let other = Pending {
            script: "/other".into(),
            ..serial(34)
        };
        assert!(running.may_start(&other, &mut held));
        assert!(!running.may_start(&other, &mut held), "one per lane a look");
        assert!(running.may_start(&entry(3), &mut held));
        // The next look starts with nothing held: the lane's first entry may start.
        assert!(running.may_start(&serial(2), &mut HashSet::new()));
    }

    #[test]
    fn a_wall_clock_set_back_by_more_than_a_second_is_noticed() {
        let at = Instant::now();
        let then = WallClock { at, wall: 100_000 };
        let later = |secs: u64, wall: i64| WallClock {
            at: at + Duration::from_secs(secs),
            wall,
        };
        assert!(!then.went_back_by_now(&later(10, 110_000)), "in step");
        assert!(
            !then.went_back_by_now(&later(10, 109_500)),
            "half a second: a slew"
        );
        assert!(!then.went_back_by_now(&later(10, 200_000)), "forward");
        assert!(
            then.went_back_by_now(&later(10, 108_000)),
            "two seconds back"
        );
        assert!(then.went_back_by_now(&later(0, 50_000)), "back at once");
    }

    #[test]
    fn queued_at_is_rfc_3339_or_the_milliseconds_past_the_year_9999() {
        assert_eq!(queued_at(1_796_606_587_380), "2026-12-07T01:23:07.380Z");
        assert_eq!(queued_at(-5), "1970-01-01T00:00:00.000Z");
        assert_eq!(queued_at(253_402_300_800_001), "253402300800001");
    }

    #[test]
    fn exit_codes_decide_what_happens_next() {
        let e = entry(3);
        assert_eq!(next_step(&e, 1, Some(Exit::Code(0)), 0, 0.0), Next::Done);
        assert_eq!(next_step(&e, 1, Some(Exit::Code(65)), 0, 0.0), Next::Dead);
        assert_eq!(
            next_step(&e, 1, Some(Exit::Code(1)), 0, 0.0),
            Next::Retry(500)
        );
        assert_eq!(
            next_step(&e, 2, Some(Exit::TimedOut), 0, 1.0),
            Next::Retry(2000)
        );
        assert_eq!(next_step(&e, 3, Some(Exit::Code(1)), 0, 0.0), Next::Dead);
        assert_eq!(next_step(&e, 3, None, 0, 0.0), Next::Dead);
        assert_eq!(
            next_step(&e, 2, Some(Exit::Signal(9)), 0, 0.0),
            Next::Retry(1000)
        );
        // 75 is retried past the last attempt.
        assert!(matches!(
            next_step(&e, 9, Some(Exit::Code(75)), 0, 0.0),
            Next::Retry(_)
        ));
    }

    #[test]
    fn pauses_double_up_to_the_maximum_with_jitter() {
        let hour = Duration::from_secs(3600);
        assert_eq!(pause(1, hour, 0.999_999).as_millis(), 999);
        assert_eq!(pause(1, hour, 0.0), Duration::from_millis(500));
        assert_eq!(pause(4, hour, 0.0), Duration::from_secs(4));
        assert_eq!(pause(40, hour, 0.0), Duration::from_secs(1800));
        assert_eq!(
            pause(3, Duration::from_millis(200), 0.0),
            Duration::from_millis(100)
        );
        let a = random_unit();
        assert!((0.0..1.0).contains(&a), "{a}");
    }
}
