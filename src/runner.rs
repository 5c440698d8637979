//! Running one script: `argv = [script, payload]`, no shell, a cleared environment, stdin `/dev/null`, its
//! own process group, output logged line by line with a cap, and a deadline enforced on the whole group.
//!
//! The worker's own thread does it all with `poll` on a pidfd (readable when the script exits) and the two
//! output pipes: no SIGCHLD handler and no polling loop, so a script that ends in 1 ms is answered in about
//! 1 ms, and a pipe that fills can never deadlock the wait. The group is signalled only while its leader is
//! unreaped (a zombie still owns its pid), so a reused pid can never be hit. Two exceptions: where there is no
//! pidfd (see [`ExitWatch`]), one short-lived helper thread per script stands in for it, and a spawn that
//! meets "text file busy" sleeps briefly between retries (see [`spawn`]).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::pipe::PipeFlags;
use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};

/// The fixed `PATH` scripts get; the daemon's own environment is not passed on.
const SCRIPT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How much of a run's output is logged; the rest is read and counted, so a flood cannot fill the journal.
const LOG_BUDGET: usize = 64 << 10;
/// After the script exits, at most this many reads (16 KiB each) collect what is left in its pipes.
const POST_EXIT_READS: usize = 128;
/// A longer line is logged in pieces of this size.
const MAX_LINE: usize = 4 << 10;
/// How much of a run's last output the history keeps (stdout and stderr as they came).
pub const OUTPUT_TAIL: usize = 4 << 10;

/// What to run.
pub struct Job<'a> {
    pub script: &'a Path,
    pub payload: &'a Path,
    /// `HOOKRUNNER_*` variables, added to `PATH` and `LANG`.
    pub env: &'a [(&'a str, &'a str)],
    pub timeout: Duration,
    pub kill_grace: Duration,
    /// Prefixes every logged output line.
    pub request_id: &'a str,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    /// Killed by a signal hookrunner did not send.
    Signal(i32),
    /// Ran past its timeout and was terminated.
    TimedOut,
}

#[derive(Debug)]
pub struct Outcome {
    pub exit: Exit,
    pub duration: Duration,
    /// The last [`OUTPUT_TAIL`] bytes of output, for the delivery history.
    pub output: Vec<u8>,
}

/// Starts scripts. Holds `/dev/null` open so each spawn only dups it.
pub struct Runner {
    dev_null: File,
}

impl Runner {
    pub fn new() -> io::Result<Runner> {
        Ok(Runner {
            dev_null: File::open("/dev/null")?,
        })
    }

    pub fn run(&self, job: &Job<'_>) -> io::Result<Outcome> {
        let stdout = Pipe::new("stdout")?;
        let stderr = Pipe::new("stderr")?;
        let mut command = Command::new(job.script);
        command
            .arg(job.payload)
            .env_clear()
            .env("PATH", SCRIPT_PATH)
            .env("LANG", "C.UTF-8")
            .envs(job.env.iter().copied())
            .stdin(Stdio::from(self.dev_null.try_clone()?))
            .stdout(Stdio::from(stdout.writer_for_child()?))
            .stderr(Stdio::from(stderr.writer_for_child()?))
            // Its own group, so a timeout reaches everything it started. (std still uses posix_spawn.)
            .process_group(0);
        let name = job
            .script
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let start = Instant::now();
        let mut child = spawn(&mut command, job.request_id, &name)?;
        let pid = Pid::from_child(&child);
        let exited = match ExitWatch::new(pid) {
            Ok(watch) => watch,
            Err(e) => {
                kill_group(pid, Signal::KILL);
                let _ = child.wait();
                return Err(e);
            }
        };
        let mut output = Output::new(job.request_id, &name);
        // The child's copies of the write ends close with the command.
        drop(command);
        let mut pipes = [Some(stdout), Some(stderr)];
        // Everything between spawn and reaping is in this closure so that, should a system call fail in it,
        // the group is still killed and the script reaped: no script outlives its deadline, no zombie stays.
        let mut watch = || -> io::Result<bool> {
            let mut phase = Phase::Running(start + job.timeout);
            let mut timed_out = false;
            let mut escaped: Vec<Pid> = Vec::new();
            loop {
                let now = Instant::now();
                match phase {
                    Phase::Running(deadline) if now >= deadline => {
                        // Its descendants that made groups of their own (GNU `timeout` does, and job
                        // control), found before anything is signalled: once their parent dies they are
                        // no longer the script's.
                        escaped = escaped_groups(pid);
                        log::warn!(
                            "{} {name}: timed out after {:?}; sending SIGTERM to its group{}",
                            job.request_id,
                            job.timeout,
                            groups_note(&escaped)
                        );
                        kill_group(pid, Signal::TERM);
                        kill_groups(&escaped, Signal::TERM);
                        timed_out = true;
                        phase = Phase::Terminating(now + job.kill_grace);
                    }
                    Phase::Terminating(deadline) if now >= deadline => {
                        for group in escaped_groups(pid) {
                            if !escaped.contains(&group) {
                                escaped.push(group);
                            }
                        }
                        log::warn!(
                            "{} {name}: still running {:?} after SIGTERM; sending SIGKILL",
                            job.request_id,
                            job.kill_grace
                        );
                        kill_group(pid, Signal::KILL);
                        kill_groups(&escaped, Signal::KILL);
                        phase = Phase::Killed;
                    }
                    _ => {}
                }
                let wait = match phase {
                    Phase::Running(d) | Phase::Terminating(d) => {
                        Some(d.saturating_duration_since(now))
                    }
                    Phase::Killed => None,
                };
                if wait_readable(exited.fd(), &mut pipes, wait, &mut output)?.exited {
                    break;
                }
            }
            // The script has exited but is not yet reaped. End anything it left behind in its group (which would
            // otherwise hold the pipes or outlive the request), then take what is still in the pipes, bounded: a
            // process that escaped the group (setsid) could otherwise keep the answer waiting by writing forever.
            kill_group(pid, Signal::KILL);
            kill_groups(&escaped, Signal::KILL);
            for pipe in pipes.iter_mut().flatten() {
                pipe.writer = None;
            }
            drain(exited.fd(), &mut pipes, POST_EXIT_READS, &mut output)?;
            Ok(timed_out)
        };
        let timed_out = match watch() {
            Ok(timed_out) => timed_out,
            Err(e) => {
                kill_group(pid, Signal::KILL);
                let _ = child.wait();
                return Err(e);
            }
        };
        let status = child.wait()?;
        drop(pipes);
        output.finish();
        let tail = output.tail();
        let exit = if timed_out {
            Exit::TimedOut
        } else if let Some(code) = status.code() {
            Exit::Code(code)
        } else {
            Exit::Signal(status.signal().unwrap_or(0))
        };
        Ok(Outcome {
            exit,
            duration: start.elapsed(),
            output: tail,
        })
    }
}

/// What to add to a script's spawn error for the operator: "Exec format error" alone does not say that a
/// script without a `#!` line (one a PHP `shell_exec` ran through a shell) is the usual cause.
pub fn spawn_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOEXEC) => {
            " (a script needs a #! line, such as #!/bin/sh, as its first line; or this is not a program \
             for this machine)"
        }
        // The script itself was checked just before: what is missing is what its #! line names (or a
        // Windows line ending after it, which makes the name end in \r).
        Some(libc::ENOENT) => {
            " (the interpreter its #! line names is not there: check that line, and that the file has no \
             Windows line endings; or the script was removed this instant)"
        }
        _ => "",
    }
}

/// The first pause before retrying a "text file busy" script; each next one doubles, up to the last.
const BUSY_FIRST_PAUSE: Duration = Duration::from_millis(5);
/// Pauses of 5 ms doubling to 320 ms add up to 635 ms: longer than saving a script takes, short against a
/// sender's own timeout.
const BUSY_LAST_PAUSE: Duration = Duration::from_millis(320);

/// Spawns, retrying briefly while the script is "text file busy": open for writing somewhere, which happens
/// while an admin saves it, or for an instant when another thread forks while holding it open.
fn spawn(command: &mut Command, request_id: &str, name: &str) -> io::Result<std::process::Child> {
    let mut pause = BUSY_FIRST_PAUSE;
    loop {
        match command.spawn() {
            Err(e)
                if Errno::from_io_error(&e) == Some(Errno::TXTBSY) && pause <= BUSY_LAST_PAUSE =>
            {
                if pause == BUSY_FIRST_PAUSE {
                    // Said once per request, so an operator sees why it was slow, or why it failed.
                    log::info!(
                        "{request_id} {name}: text file busy (open for writing, as while being saved); \
                         retrying for up to {:?}",
                        BUSY_LAST_PAUSE * 2 - BUSY_FIRST_PAUSE
                    );
                }
                std::thread::sleep(pause);
                pause *= 2;
            }
            result => return result,
        }
    }
}

#[derive(Clone, Copy)]
enum Phase {
    Running(Instant),
    Terminating(Instant),
    Killed,
}

/// A descriptor that turns readable once the script has exited, while it stays unreaped (so its pid, and
/// with it the group id, cannot be reused before we reap it).
enum ExitWatch {
    /// Linux 5.3 and later.
    Pidfd(OwnedFd),
    /// Where `pidfd_open` does not exist (older kernels, valgrind) or is refused (seccomp): a thread blocks in
    /// `waitid(WEXITED | WNOWAIT)`, which does not reap, and then closes its end of a pipe.
    Thread(OwnedFd),
}

/// Set once `pidfd_open` has been found missing or refused, so the fallback is announced once and not retried.
static NO_PIDFD: AtomicBool = AtomicBool::new(false);

impl ExitWatch {
    fn new(pid: Pid) -> io::Result<ExitWatch> {
        if !NO_PIDFD.load(Ordering::Relaxed) {
            match rustix::process::pidfd_open(pid, PidfdFlags::empty()) {
                Ok(fd) => return Ok(ExitWatch::Pidfd(fd)),
                // ENOSYS: Linux before 5.3, or valgrind. EPERM: a seccomp filter that refuses system calls it
                // does not know (Docker before 20.10, some SystemCallFilter= lists); pidfd_open itself
                // never fails with EPERM.
                Err(e @ (Errno::NOSYS | Errno::PERM)) => {
                    if !NO_PIDFD.swap(true, Ordering::Relaxed) {
                        log::info!(
                            "pidfd_open is not available ({}); waiting on each script from a helper thread",
                            io::Error::from(e)
                        );
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        ExitWatch::thread(pid)
    }

    fn thread(pid: Pid) -> io::Result<ExitWatch> {
        let (reader, writer) = pipe()?;
        std::thread::Builder::new()
            .name("hookrunner-wait".into())
            .spawn(move || {
                wait_exited(pid);
                drop(writer);
            })?;
        Ok(ExitWatch::Thread(reader))
    }

    fn fd(&self) -> &OwnedFd {
        match self {
            ExitWatch::Pidfd(fd) | ExitWatch::Thread(fd) => fd,
        }
    }
}

/// Blocks until `pid` (our child) has exited, without reaping it (WNOWAIT). Returns early only if it is no
/// longer waitable (already reaped by the worker's error path).
fn wait_exited(pid: Pid) {
    let _ = rustix::io::retry_on_intr(|| {
        rustix::process::waitid(
            WaitId::Pid(pid),
            WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
        )
    });
}

/// Signals the script's group. ESRCH (the group is already gone) is expected and harmless.
fn kill_group(pgid: Pid, signal: Signal) {
    let _ = rustix::process::kill_process_group(pgid, signal);
}

/// How many bytes at the end of `bytes` are the start of a UTF-8 character that is not complete (0 to 3).
fn incomplete_utf8_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back for its lead
        }
        let needs = match b {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return 0, // ASCII or not UTF-8: nothing to carry
        };
        return if back < needs { back } else { 0 };
    }
    0
}

fn kill_groups(groups: &[Pid], signal: Signal) {
    for &group in groups {
        kill_group(group, signal);
    }
}

/// The process groups, other than its own, of the processes descended from the script `leader` (from
/// `/proc`: every process's parent and group). Read at its deadline, while it still runs: a child that
/// left the script's group (GNU `timeout` puts itself in a group of its own) would otherwise outlive the
/// deadline, and once its parent is killed nothing ties it to the script any more. Groups in another
/// session are left alone: a job detached on purpose (`setsid`) is not the script's to end.
fn escaped_groups(leader: Pid) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    // (pid, parent, group, session) of every process.
    let processes: Vec<(i32, i32, i32, i32)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // After the command's closing parenthesis: state, ppid, pgrp, session.
            let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(1);
            let mut next = || fields.next()?.parse::<i32>().ok();
            Some((pid, next()?, next()?, next()?))
        })
        .collect();
    let leader = leader.as_raw_nonzero().get();
    let Some(&(_, _, _, session)) = processes.iter().find(|p| p.0 == leader) else {
        return Vec::new();
    };
    let mut descendants = vec![leader];
    let mut groups = Vec::new();
    let mut i = 0;
    while let Some(&parent) = descendants.get(i) {
        i += 1;
        for &(pid, ppid, pgrp, sid) in &processes {
            if ppid != parent || descendants.contains(&pid) {
                continue;
            }
            descendants.push(pid);
            if pgrp != leader && sid == session && !groups.contains(&pgrp) {
                groups.push(pgrp);
            }
        }
    }
    groups.into_iter().filter_map(Pid::from_raw).collect()
}

/// ", and to N other groups it started" for the log line, when there are any.
fn groups_note(groups: &[Pid]) -> String {
    match groups.len() {
        0 => String::new(),
        1 => " and to one group of its own children that left it".into(),
        n => format!(" and to {n} groups of its own children that left it"),
    }
}

/// One output stream of a script. hookrunner holds a write end of its own until the script has exited, so
/// the script's exit does not also wake the waiting thread with a hang-up on each pipe before its pidfd
/// turns readable: a quiet script costs one wake-up, not three. Output still wakes it, as it must.
struct Pipe {
    file: File,
    writer: Option<OwnedFd>,
    stream: &'static str,
}

impl Pipe {
    fn new(stream: &'static str) -> io::Result<Pipe> {
        let (reader, writer) = pipe()?;
        Ok(Pipe {
            file: File::from(reader),
            writer: Some(writer),
            stream,
        })
    }

    /// A copy of the write end for the child's stdout or stderr (close-on-exec here; std dups it into place).
    fn writer_for_child(&self) -> io::Result<OwnedFd> {
        match &self.writer {
            Some(writer) => writer.try_clone(),
            None => Err(io::Error::other("pipe already closed")),
        }
    }
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?)
}

/// What one wait saw.
struct Woken {
    /// The script has exited.
    exited: bool,
    /// A pipe had output or was closed (and was read).
    output: bool,
}

/// Waits up to `wait` for the script to exit or a pipe to turn readable, and reads the pipes that did.
fn wait_readable(
    exited: &OwnedFd,
    pipes: &mut [Option<Pipe>; 2],
    wait: Option<Duration>,
    output: &mut Output,
) -> io::Result<Woken> {
    let mut ready = [false; 2];
    let woken_by_exit = {
        // Slots for the exit watch and both pipes; the ones in use come first.
        let mut fds = [
            PollFd::new(exited, PollFlags::IN),
            PollFd::new(exited, PollFlags::IN),
            PollFd::new(exited, PollFlags::IN),
        ];
        let mut pipe_of = [0; 3];
        let mut n = 1;
        for (i, pipe) in pipes.iter().enumerate() {
            if let Some(pipe) = pipe {
                fds[n].set_fd(&pipe.file);
                pipe_of[n] = i;
                n += 1;
            }
        }
        if poll(&mut fds[..n], wait)? == 0 {
            return Ok(Woken {
                exited: false,
                output: false,
            });
        }
        for (fd, &i) in fds[1..n].iter().zip(&pipe_of[1..n]) {
            ready[i] = !fd.revents().is_empty();
        }
        !fds[0].revents().is_empty()
    };
    for (slot, _) in pipes.iter_mut().zip(ready).filter(|(_, ready)| *ready) {
        read_pipe(slot, output)?;
    }
    Ok(Woken {
        exited: woken_by_exit,
        output: ready.contains(&true),
    })
}

/// Once the script has exited: reads what its pipes still hold, without waiting for more, in `rounds` rounds
/// at most, so a writer that outlived it cannot keep the answer waiting by writing as fast as we read.
fn drain(
    exited: &OwnedFd,
    pipes: &mut [Option<Pipe>; 2],
    rounds: usize,
    output: &mut Output,
) -> io::Result<()> {
    for _ in 0..rounds {
        if pipes.iter().all(Option::is_none)
            || !wait_readable(exited, pipes, Some(Duration::ZERO), output)?.output
        {
            break;
        }
    }
    Ok(())
}

fn read_pipe(slot: &mut Option<Pipe>, output: &mut Output) -> io::Result<()> {
    let Some(pipe) = slot.as_mut() else {
        return Ok(());
    };
    let mut buf = [0u8; 16 << 10];
    match pipe.file.read(&mut buf) {
        Ok(0) => {
            output.end(pipe.stream);
            *slot = None;
        }
        Ok(n) => output.add(pipe.stream, &buf[..n]),
        Err(e)
            if e.kind() == io::ErrorKind::Interrupted || e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

/// `poll(2)` (ppoll, to the nanosecond) that retries on EINTR (signal handlers run on any thread) with what
/// is left of `wait`. `None` waits without end, and so does a wait too long to represent.
fn poll(fds: &mut [PollFd<'_>], wait: Option<Duration>) -> io::Result<usize> {
    let deadline = wait.and_then(|w| Instant::now().checked_add(w));
    loop {
        let timeout = deadline
            .and_then(|d| Timespec::try_from(d.saturating_duration_since(Instant::now())).ok());
        match rustix::event::poll(fds, timeout.as_ref()) {
            Err(Errno::INTR) => continue,
            result => return Ok(result?),
        }
    }
}

/// Logs a run's output line by line, `LOG_BUDGET` bytes at most, and counts the rest.
struct Output<'a> {
    request_id: &'a str,
    script: &'a str,
    lines: [Vec<u8>; 2],
    budget: usize,
    dropped: u64,
    /// The last output, logged or not, at most [`OUTPUT_TAIL`] bytes once trimmed.
    tail: Vec<u8>,
}

impl<'a> Output<'a> {
    fn new(request_id: &'a str, script: &'a str) -> Output<'a> {
        Output {
            request_id,
            script,
            lines: [Vec::new(), Vec::new()],
            budget: LOG_BUDGET,
            dropped: 0,
            tail: Vec::new(),
        }
    }

    fn index(stream: &str) -> usize {
        usize::from(stream == "stderr")
    }

    fn add(&mut self, stream: &'static str, mut data: &[u8]) {
        let keep = &data[data.len().saturating_sub(OUTPUT_TAIL)..];
        self.tail.extend_from_slice(keep);
        // Trimmed in bulk, so a flood of small writes does not move the buffer on every one.
        if self.tail.len() > 2 * OUTPUT_TAIL {
            self.tail.drain(..self.tail.len() - OUTPUT_TAIL);
        }
        while !data.is_empty() {
            if self.budget == 0 {
                self.dropped += data.len() as u64;
                return;
            }
            let i = Self::index(stream);
            let room = MAX_LINE
                .saturating_sub(self.lines[i].len())
                .min(self.budget)
                .max(1);
            let (take, complete) = match data.iter().take(room).position(|&b| b == b'\n') {
                Some(nl) => (nl + 1, true),
                None => (
                    room.min(data.len()),
                    self.lines[i].len() + room.min(data.len()) >= MAX_LINE,
                ),
            };
            self.lines[i].extend_from_slice(&data[..take]);
            self.budget = self.budget.saturating_sub(take);
            data = &data[take..];
            if complete || self.budget == 0 {
                self.emit(stream, false);
            }
        }
    }

    /// Logs the line gathered from `stream`; `last` when the stream has ended.
    fn emit(&mut self, stream: &str, last: bool) {
        let i = Self::index(stream);
        let mut line = std::mem::take(&mut self.lines[i]);
        // A line cut at MAX_LINE rather than at its end may end inside a UTF-8 character: those bytes start
        // the next piece, so the character is logged whole (not as two replacement characters).
        if !last && !line.ends_with(b"\n") && self.budget > 0 {
            let carry = incomplete_utf8_tail(&line);
            self.lines[i] = line.split_off(line.len() - carry);
        }
        let line = line.strip_suffix(b"\n").unwrap_or(&line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        // A payload field the script echoes is the client's text: escaped, so it cannot forge a line.
        let text = crate::logging::escape_bytes(line);
        log::info!("{} {}[{stream}]: {text}", self.request_id, self.script);
    }

    fn end(&mut self, stream: &str) {
        if !self.lines[Self::index(stream)].is_empty() {
            self.emit(stream, true);
        }
    }

    fn tail(&mut self) -> Vec<u8> {
        let mut tail = std::mem::take(&mut self.tail);
        tail.drain(..tail.len().saturating_sub(OUTPUT_TAIL));
        tail
    }

    fn finish(&mut self) {
        self.end("stdout");
        self.end("stderr");
        if self.dropped > 0 {
            log::warn!(
                "{} {}: output exceeded {} KiB; {} more bytes were read and not logged",
                self.request_id,
                self.script,
                LOG_BUDGET >> 10,
                self.dropped
            );
        }
    }
}

/// Bounds how many scripts run at once, sync requests' and queued deliveries' together. Queued deliveries
/// never starve requests: they take a slot only while no request is waiting for one, and never more than
/// `max - 1` of them (all of them only when `max` is 1), so a request always has a slot that only other
/// requests can hold.
pub struct Limiter {
    counts: Mutex<Counts>,
    freed: Condvar,
    max: usize,
}

#[derive(Default)]
struct Counts {
    running: usize,
    /// Requests waiting in `acquire`.
    waiting: usize,
    /// Slots held by queued deliveries.
    background: usize,
}

/// A slot to run one script; released on drop.
pub struct Slot<'a> {
    limiter: &'a Limiter,
    background: bool,
}

impl Limiter {
    pub fn new(max: usize) -> Limiter {
        Limiter {
            counts: Mutex::new(Counts::default()),
            freed: Condvar::new(),
            max,
        }
    }

    /// A slot, if one frees up within `wait`.
    pub fn acquire(&self, wait: Duration) -> Option<Slot<'_>> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.waiting += 1;
        let (mut counts, _) = self
            .freed
            .wait_timeout_while(counts, wait, |c| c.running >= self.max)
            .unwrap_or_else(|e| e.into_inner());
        counts.waiting -= 1;
        if counts.running >= self.max {
            return None;
        }
        counts.running += 1;
        Some(Slot {
            limiter: self,
            background: false,
        })
    }

    /// A slot for a queued delivery, now or not at all (see [`Limiter`]).
    pub fn try_background(&self) -> Option<Slot<'_>> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let share = self.max.saturating_sub(1).max(1);
        if counts.waiting > 0 || counts.running >= self.max || counts.background >= share {
            return None;
        }
        counts.running += 1;
        counts.background += 1;
        Some(Slot {
            limiter: self,
            background: true,
        })
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut counts = self
            .limiter
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        counts.running -= 1;
        if self.background {
            counts.background -= 1;
        }
        self.limiter.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_watch_thread_signals_exit_and_leaves_the_child_unreaped() {
        // The child runs until its stdin closes, so the first check cannot race its exit.
        let mut child = Command::new("sh")
            .args(["-c", "read -r line; exit 7"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let watch = ExitWatch::thread(Pid::from_child(&child)).unwrap();
        let mut fds = [PollFd::new(watch.fd(), PollFlags::IN)];
        assert_eq!(
            poll(&mut fds, Some(Duration::ZERO)).unwrap(),
            0,
            "readable while the child runs"
        );
        drop(child.stdin.take());
        assert_eq!(
            poll(&mut fds, Some(Duration::from_secs(10))).unwrap(),
            1,
            "not readable after exit"
        );
        // Still a zombie of ours: the watch did not reap it, so the group could still be signalled safely.
        let status = child
            .try_wait()
            .unwrap()
            .expect("exited and still waitable");
        assert_eq!(status.code(), Some(7));
    }

    /// Whether the thread named `name` in this process is asleep (state `S` in `/proc`).
    fn thread_sleeping(name: &str) -> bool {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(Result::ok)
            .filter(|task| {
                std::fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.trim() == name)
            })
            .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
            .any(|stat| {
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('S'))
            })
    }

    #[test]
    fn an_incomplete_utf8_character_at_the_end_is_found() {
        assert_eq!(incomplete_utf8_tail(b"abc"), 0);
        assert_eq!(incomplete_utf8_tail("abé".as_bytes()), 0);
        assert_eq!(incomplete_utf8_tail(&"abé".as_bytes()[..3]), 1);
        assert_eq!(incomplete_utf8_tail(&"a€".as_bytes()[..2]), 1);
        assert_eq!(incomplete_utf8_tail(&"a€".as_bytes()[..3]), 2);
        assert_eq!(incomplete_utf8_tail(&"a😀".as_bytes()[..4]), 3);
        assert_eq!(incomplete_utf8_tail("a😀".as_bytes()), 0);
        // Not UTF-8 at all: nothing is held back.
        assert_eq!(incomplete_utf8_tail(b"a\x80\x80\x80"), 0);
        assert_eq!(incomplete_utf8_tail(b"a\xff"), 0);
    }

    #[test]
    fn limiter_bounds_and_releases() {
        // Queued work never takes the last slot, nor any while a request waits.
        let limiter = Limiter::new(3);
        let first = limiter.try_background().expect("a free slot");
        let second = limiter.try_background().expect("a second one, of three");
        assert!(
            limiter.try_background().is_none(),
            "the last slot is kept for requests"
        );
        let request = limiter.acquire(Duration::ZERO).expect("the kept slot");
        std::thread::scope(|s| {
            // It keeps the slot it gets until joined, so the slot never frees in between.
            let waiting = s.spawn(|| limiter.acquire(Duration::from_secs(30)));
            let deadline = Instant::now() + Duration::from_secs(10);
            // While the request waits, queued work gets nothing, even a free slot.
            while !limiter
                .counts
                .lock()
                .map(|c| c.waiting == 1)
                .unwrap_or(false)
            {
                assert!(Instant::now() < deadline, "the request never waited");
                std::thread::sleep(Duration::from_millis(1));
            }
            drop(first);
            assert!(limiter.try_background().is_none());
            assert!(
                waiting.join().unwrap().is_some(),
                "the request got the freed slot"
            );
        });
        drop((second, request));
        let single = Limiter::new(1);
        assert!(
            single.try_background().is_some(),
            "with one slot, queued work may use it"
        );

        let limiter = Limiter::new(2);
        let a = limiter.acquire(Duration::ZERO).expect("first slot");
        let b = limiter.acquire(Duration::ZERO).expect("second slot");

        // Full: a waiter gets nothing, and only once its wait has passed.
        let started = Instant::now();
        assert!(limiter.acquire(Duration::from_millis(200)).is_none());
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "gave up after {:?}",
            started.elapsed()
        );

        // A waiter blocked in acquire is woken by a slot dropped on another thread, long before its wait ends.
        let entering = AtomicBool::new(false);
        std::thread::scope(|s| {
            let waiter = std::thread::Builder::new()
                .name("limiter-waiter".into())
                .spawn_scoped(s, || {
                    entering.store(true, Ordering::SeqCst);
                    let started = Instant::now();
                    let slot = limiter.acquire(Duration::from_secs(60));
                    (slot.is_some(), started.elapsed())
                })
                .unwrap();
            // Once the flag is set, the waiter's only way to sleep is the wait in acquire.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !(entering.load(Ordering::SeqCst) && thread_sleeping("limiter-waiter")) {
                assert!(Instant::now() < deadline, "the waiter never blocked");
                std::thread::sleep(Duration::from_millis(1));
            }
            let releaser = s.spawn(|| drop(a));
            releaser.join().unwrap();
            let (got, waited) = waiter.join().unwrap();
            assert!(got, "the waiter got the freed slot");
            assert!(
                waited < Duration::from_secs(30),
                "the waiter was woken only by its timeout, after {waited:?}"
            );
        });

        // The woken waiter's slot was dropped when its thread ended; `b` still holds the other.
        let c = limiter
            .acquire(Duration::ZERO)
            .expect("the waiter's slot was released");
        assert!(
            limiter.acquire(Duration::ZERO).is_none(),
            "still bounded at 2"
        );
        drop((b, c));
    }

    #[test]
    fn reading_after_exit_is_bounded_and_never_waits_for_more() {
        use std::io::Write;
        let mut pipe = Pipe::new("stdout").unwrap();
        let mut writer = File::from(pipe.writer.take().unwrap());
        // Three reads' worth, within the pipe's 64 KiB, and the write end stays open like a survivor's.
        writer.write_all(&[b'x'; 48 << 10]).unwrap();
        let mut pipes = [Some(pipe), None];
        // An exit watch that has fired: the script is gone.
        let (exited, fired) = super::pipe().unwrap();
        drop(fired);
        let mut output = Output::new("r", "s");
        let read = |output: &Output| LOG_BUDGET - output.budget;

        drain(&exited, &mut pipes, 2, &mut output).unwrap();
        assert_eq!(read(&output), 32 << 10, "two rounds, 16 KiB each");
        assert!(
            pipes[0].is_some(),
            "stopped by its bound with output still waiting"
        );

        drain(&exited, &mut pipes, POST_EXIT_READS, &mut output).unwrap();
        assert_eq!(read(&output), 48 << 10, "the rest, and no waiting for more");
        assert!(
            pipes[0].is_some(),
            "the writer is still there: no end of file yet"
        );

        drop(writer);
        drain(&exited, &mut pipes, POST_EXIT_READS, &mut output).unwrap();
        assert!(pipes[0].is_none(), "the end of file closes the pipe");
    }

    #[test]
    fn output_budget_counts_what_it_does_not_log() {
        let mut out = Output::new("r", "s");
        out.add("stdout", &vec![b'x'; LOG_BUDGET + 1000]);
        assert_eq!(out.budget, 0);
        assert_eq!(out.dropped, 1000);
        out.add("stderr", b"more\n");
        assert_eq!(out.dropped, 1005);
    }

    #[test]
    fn output_splits_lines_and_keeps_partial_ones() {
        let mut out = Output::new("r", "s");
        out.add("stdout", b"one\ntw");
        assert!(out.lines[0] == b"tw");
        out.add("stdout", b"o\n");
        assert!(out.lines[0].is_empty());
        out.add("stderr", &vec![b'y'; MAX_LINE + 10]);
        assert_eq!(
            out.lines[1].len(),
            10,
            "a long line is logged in MAX_LINE pieces"
        );
        assert_eq!(out.budget, LOG_BUDGET - 8 - MAX_LINE - 10);
    }
}
