//! The accept loop: polls the listener and the control descriptor, counts connections against
//! `max_connections` (past it: a canned 503), hands connections to the worker pool, and on stop waits for
//! the requests in flight.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};

use super::conn::Conn;
use super::id::Ids;
use super::listener::{Listener, Stream};
use super::pool::{self, Pool};
use super::refusal::Refused;
use super::tls::TlsConfig;
use super::{Handler, Limits, Response, response};
use crate::logging::RateLimit;

pub(super) struct Shared {
    pub(super) limits: Limits,
    pub(super) handler: Arc<dyn Handler>,
    pub(super) ids: Ids,
    pub(super) open: AtomicUsize,
    /// When shutdown began; requests still arriving then are refused, bodies still arriving get
    /// `header_timeout` more.
    pub(super) stopped_at: OnceLock<Instant>,
    in_flight: Mutex<usize>,
    idle: Condvar,
    pub(super) pool: Pool,
    /// With TLS, every accepted connection becomes a TLS session with the configuration current then.
    tls: Option<TlsConfig>,
}

/// Counts a request as in flight until dropped, so shutdown can wait for it.
pub(super) struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    pub(super) fn enter(shared: &'a Shared) -> InFlight<'a> {
        *shared.in_flight.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut n = self.0.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        if *n == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// What the accept loop does when woken by the control descriptor.
pub enum Control {
    Continue,
    Stop,
}

/// Runs the server until `on_wake` (called when `wake` becomes readable) says stop; then stops accepting,
/// lets in-flight requests finish, and returns. With `tls`, it serves HTTPS only.
pub fn serve(
    listener: Listener,
    limits: Limits,
    handler: Arc<dyn Handler>,
    tls: Option<TlsConfig>,
    wake: &UnixStream,
    mut on_wake: impl FnMut() -> Control,
) -> io::Result<()> {
    let shared = Arc::new(Shared {
        limits,
        handler,
        ids: Ids::new(),
        open: AtomicUsize::new(0),
        stopped_at: OnceLock::new(),
        in_flight: Mutex::new(0),
        idle: Condvar::new(),
        pool: Pool::new(),
        tls,
    });
    wake.set_nonblocking(true)?;
    let mut reserve = File::open("/dev/null").ok();
    let mut logs = AcceptLogs {
        errors: RateLimit::new(log::Level::Error),
        rejections: RateLimit::new(log::Level::Warn),
    };
    loop {
        let mut fds = [
            PollFd::new(&listener, PollFlags::IN),
            PollFd::new(wake, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let (accept, woken) = (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
        if woken {
            let mut drain = [0u8; 64];
            while matches!((&*wake).read(&mut drain), Ok(n) if n > 0) {}
            if let Control::Stop = on_wake() {
                break;
            }
        }
        if accept {
            accept_ready(&listener, &shared, &mut reserve, &mut logs);
        }
    }
    let _ = shared.stopped_at.set(Instant::now());
    drop(listener);
    // Logged after the two steps above, so that whoever reads it may rely on them: nothing new is accepted,
    // and a request that arrives from now on is answered 503.
    log::info!("stopping: no new connections; waiting for requests in flight");
    let mut n = shared.in_flight.lock().unwrap_or_else(|e| e.into_inner());
    while *n > 0 {
        n = shared.idle.wait(n).unwrap_or_else(|e| e.into_inner());
    }
    Ok(())
}

/// Accepts every pending connection. Errors never end the loop: out of descriptors, the reserve descriptor is
/// released to accept one connection and answer it 503, then the loop backs off briefly.
fn accept_ready(
    listener: &Listener,
    shared: &Arc<Shared>,
    reserve: &mut Option<File>,
    logs: &mut AcceptLogs,
) {
    loop {
        match listener.accept() {
            Ok((stream, remote)) => {
                if shared.open.load(Ordering::SeqCst) >= shared.limits.max_connections {
                    let line = reject_busy(stream, shared, &remote, "too many open connections");
                    logs.rejections.log(&line);
                    continue;
                }
                let stream = match &shared.tls {
                    Some(tls) => match stream.into_tls(tls, &remote) {
                        Ok(stream) => stream,
                        Err(e) => {
                            logs.errors
                                .log(&format!("{remote} TLS session not started: {e}"));
                            continue;
                        }
                    },
                    None => stream,
                };
                shared.open.fetch_add(1, Ordering::SeqCst);
                let conn = Conn::new(
                    stream,
                    remote,
                    shared.limits.max_header_bytes.max(8 << 10) + 1,
                );
                pool::submit(shared, conn);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO)
                ) =>
            {
                continue;
            }
            Err(e) => {
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    *reserve = None;
                    if let Ok((stream, remote)) = listener.accept() {
                        let line = reject_busy(stream, shared, &remote, "out of file descriptors");
                        logs.rejections.log(&line);
                    }
                    *reserve = File::open("/dev/null").ok();
                }
                logs.errors.log(&format!("accept failed: {e}; backing off"));
                std::thread::sleep(Duration::from_millis(20));
                return;
            }
        }
    }
}

/// Answers 503 and closes; returns the line to log (through a rate limit: a flood must not flood the log).
/// On a TLS listener it only closes: an answer would need a handshake, which the accept loop never does.
pub(super) fn reject_busy(
    mut stream: Stream,
    shared: &Shared,
    remote: &str,
    why: &'static str,
) -> String {
    let id = shared.ids.next();
    let refused = Refused::Busy(why);
    let answer = Response::error(refused.status(), &id, &refused.to_string());
    if shared.tls.is_some() {
        return format!("{id} {remote} - - closed unanswered, TLS ({why})");
    }
    // Never block the accept loop on a client: one non-blocking write, then close.
    let _ = stream.set_nonblocking(true);
    let _ = stream.write(&response::encode(&answer, &id, true));
    format!("{id} {remote} - - status={} ({why})", answer.status)
}

/// The accept loop's own log lines, each kind at most once a second.
struct AcceptLogs {
    errors: RateLimit,
    rejections: RateLimit,
}
