//! systemd's side of the daemon's life, spoken natively and without libsystemd: readiness and state
//! (`Type=notify`, sd_notify(3)) and a listening socket passed in (socket activation, sd_listen_fds(3)).
//! Outside systemd (no `NOTIFY_SOCKET`, no `LISTEN_FDS`) every function here does nothing.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use sd_notify::NotifyState;

/// The listening socket systemd passed (fd 3), if it passed one to this process. `LISTEN_FDS`,
/// `LISTEN_PID` and `LISTEN_FDNAMES` are removed from the environment either way, so nothing started
/// later takes them for its own; the descriptor is close-on-exec, so no script inherits it.
///
/// Must be called before the daemon starts any thread: it changes the environment.
pub fn take_listen_fd() -> io::Result<Option<OwnedFd>> {
    // SAFETY: `serve` calls this first, while the main thread is the only one, so nothing reads the
    // environment while it changes.
    let fds = unsafe {
        let fds = sd_notify::listen_fds_and_unset_env();
        std::env::remove_var("LISTEN_FDNAMES");
        fds
    }?;
    // SAFETY: systemd hands these descriptors to this process (LISTEN_PID is ours); nothing else in it owns
    // them, so each becomes owned exactly once here.
    let mut fds: Vec<OwnedFd> = fds.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect();
    if fds.len() > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "systemd passed {} sockets; hookrunner serves exactly one (one ListenStream= per socket unit)",
                fds.len()
            ),
        ));
    }
    Ok(fds.pop())
}

/// `READY=1`: the socket is listening and the configuration is in force.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1` with the monotonic time systemd wants beside it; [`ready`] follows when the reload is done
/// (or has failed and the old configuration stays).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading"),
        ]),
        Err(e) => log::warn!("systemd notification: no monotonic clock: {e}"),
    }
}

/// `STOPPING=1`: draining; systemd's stop timeout runs from here.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: waiting for requests in flight"),
    ]);
}

/// `EXTEND_TIMEOUT_USEC=`: the start (or stop) may take `more` from now before systemd gives up on it.
pub fn extend_start(more: std::time::Duration) {
    let usec = u32::try_from(more.as_micros()).unwrap_or(u32::MAX);
    send(&[
        NotifyState::ExtendTimeoutUsec(usec),
        NotifyState::Status("migrating the store"),
    ]);
}

/// A `STATUS=` line alone (what `systemctl status` shows).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

fn send(states: &[NotifyState]) {
    // A lost notification must not stop the daemon; systemd's timeouts cover a READY=1 that never arrives.
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("systemd notification failed: {e}");
    }
}
