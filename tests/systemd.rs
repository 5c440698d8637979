//! systemd's protocols against the real binary, without systemd: the test plays the service manager. It
//! owns the notification socket (`NOTIFY_SOCKET`) and reads what the daemon says, or binds the listening
//! socket itself and passes it as fd 3 (`LISTEN_FDS`/`LISTEN_PID`).

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::*;

/// How long a daemon may take to exit.
const EXIT: Duration = Duration::from_secs(10);

/// The notification socket, with the daemon's messages read one datagram at a time.
struct Manager {
    socket: UnixDatagram,
}

impl Manager {
    fn new(env: &Env) -> (Manager, std::path::PathBuf) {
        let path = env.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        (Manager { socket }, path)
    }

    /// The next message that sets `key` (a `STATUS=`-only update may come between), as its lines.
    fn next_with(&self, key: &str) -> Vec<String> {
        let mut buf = [0u8; 4096];
        loop {
            let n = self
                .socket
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no message with {key}: {e}"));
            let lines: Vec<String> = String::from_utf8_lossy(&buf[..n])
                .lines()
                .map(str::to_string)
                .collect();
            if lines.iter().any(|l| l.starts_with(key)) {
                return lines;
            }
        }
    }
}

fn field<'a>(lines: &'a [String], key: &str) -> Option<&'a str> {
    lines.iter().find_map(|l| l.strip_prefix(key))
}

#[test]
fn the_daemon_tells_systemd_ready_reloading_and_stopping() {
    let env = Env::new();
    env.script("Ping", "exit 0");
    let (manager, path) = Manager::new(&env);
    let mut server = env.serve_with(|c| {
        c.env("NOTIFY_SOCKET", &path);
    });
    let ready = manager.next_with("READY=1");
    let status = field(&ready, "STATUS=").expect("a status with READY=1");
    assert!(
        status.contains("1 route(s) loaded; 0 request(s) served")
            && status.contains(&server.addr.to_string()),
        "{status}"
    );
    // READY=1 means listening: a request right away is served.
    assert_eq!(server.post("/hooks/Ping", b"").status, 200);

    server.signal(libc::SIGHUP);
    let reloading = manager.next_with("RELOADING=1");
    let usec: u64 = field(&reloading, "MONOTONIC_USEC=")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reloading:?}"));
    assert!(usec > 0);
    let ready = manager.next_with("READY=1");
    let status = field(&ready, "STATUS=").expect("a status with READY=1");
    assert!(status.contains("1 request(s) served"), "{status}");
    server
        .wait_log("reloaded", Duration::from_secs(5))
        .expect("reloaded");

    server.signal(libc::SIGTERM);
    manager.next_with("STOPPING=1");
    let status = server.wait_exit(EXIT).expect("exits");
    assert_eq!(status.code(), Some(0));
}

/// `hookrunner serve` with `fd` as its fd 3 and `LISTEN_PID` set to its own pid (unless `listen_pid` says
/// otherwise): the shell's `$$` is the pid `exec` keeps, and std builds the environment before `pre_exec`
/// runs, so it cannot be set there. `--listen` is given when `listen` is.
fn activated(env: &Env, fd: i32, listen_pid: Option<&str>, listen: Option<&str>) -> Command {
    let pid = listen_pid.unwrap_or("$$");
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!("LISTEN_PID={pid} LISTEN_FDS=1 exec \"$@\""))
        .args(["sh", BIN, "serve"]);
    if let Some(listen) = listen {
        command.args(["--listen", listen]);
    }
    command
        .arg("--config")
        .arg(env.config_path())
        .env("RUST_LOG", "info")
        // The test's own store, never the system's /var/lib/hookrunner (the history is on by default).
        .env("STATE_DIRECTORY", env.state())
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    pass_as_fd_3(&mut command, fd);
    command
}

/// Makes `fd` the child's fd 3, open across exec.
fn pass_as_fd_3(command: &mut Command, fd: i32) {
    // SAFETY: dup2 and fcntl are async-signal-safe. A descriptor dup2'd onto itself keeps its
    // close-on-exec flag, so when it already is fd 3 the flag is cleared by hand.
    unsafe {
        command.pre_exec(move || {
            let ok = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(fd, 3) == 3
            };
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

#[test]
fn a_socket_passed_as_fd_3_is_served_and_never_reaches_a_script() {
    let env = Env::new();
    // What a script sees: no socket among its descriptors, no LISTEN_* in its environment.
    env.script(
        "Probe",
        r#"if ls -l /proc/$$/fd | grep -q socket; then echo "fds=leaked"; else echo "fds=clean"; fi
echo "env=${LISTEN_FDS-none},${LISTEN_PID-none},${LISTEN_FDNAMES-none}""#,
    );
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    // The passed socket wins over `--listen`.
    let mut server = Server::spawn(activated(
        &env,
        listener.as_raw_fd(),
        None,
        Some("127.0.0.1:0"),
    ));
    server.addr = addr;
    let line = server
        .wait_log("listening on ", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("did not start:\n{}", server.log()));
    // The passed socket, not `--listen 127.0.0.1:0`.
    assert!(line.ends_with(&format!("listening on {addr}")), "{line}");
    drop(listener);
    let health = server.get("/healthz");
    assert_eq!(health.status, 200, "{}", health.text());
    assert_eq!(server.post("/hooks/Probe", b"").status, 200);
    server
        .wait_log("Probe[stdout]: fds=clean", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{}", server.log()));
    server
        .wait_log("Probe[stdout]: env=none,none,none", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{}", server.log()));
}

#[test]
fn a_socket_meant_for_another_process_is_ignored() {
    let env = Env::new();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let passed = listener.local_addr().expect("addr");
    let mut server = Server::spawn(activated(
        &env,
        listener.as_raw_fd(),
        Some("1"),
        Some("127.0.0.1:0"),
    ));
    let line = server
        .wait_log("listening on ", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("did not start:\n{}", server.log()));
    let addr = line.split("listening on ").nth(1).expect("address").trim();
    assert_ne!(addr, passed.to_string(), "LISTEN_PID=1 is not this daemon");
    server.addr = addr.parse().expect("address");
    assert_eq!(server.get("/healthz").status, 200);
}

/// What the socket unit passes, a restart passes again: a socket hookrunner cannot serve is a configuration
/// error (78), which the service's `RestartPreventExitStatus=78` keeps from a restart every 2 s forever.
#[test]
fn a_passed_socket_that_is_not_listening_is_a_configuration_error() {
    let env = Env::new();
    // A connected socket, not a listening one: what a unit with Accept=yes would pass.
    let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
    let command = activated(&env, a.as_raw_fd(), None, None);
    let mut server = Server::spawn(command);
    let status = server.wait_exit(EXIT).expect("exits");
    assert_eq!(status.code(), Some(78), "{}", server.log());
    // The log is read by a thread that may still be behind the exit.
    assert!(
        server.wait_log("the socket systemd passed", EXIT).is_some(),
        "{}",
        server.log()
    );
}

/// A socket unit with `ListenFIFO=` passes a pipe, which is no socket at all: a configuration error too.
#[test]
fn a_passed_fifo_is_a_configuration_error() {
    let env = Env::new();
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into the array it is given.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    let mut server = Server::spawn(activated(&env, fds[0], None, None));
    let status = server.wait_exit(EXIT).expect("exits");
    assert_eq!(status.code(), Some(78), "{}", server.log());
    assert!(
        server
            .wait_log("the passed descriptor is not a socket", EXIT)
            .is_some(),
        "{}",
        server.log()
    );
    // SAFETY: both ends are this test's own, closed once.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}

/// A socket unit with two `ListenStream=` lines (a drop-in that adds one without the empty line that
/// clears the first) passes two sockets: a configuration error (78), not a start error restarted forever.
#[test]
fn two_passed_sockets_are_a_configuration_error() {
    let env = Env::new();
    let first = TcpListener::bind("127.0.0.1:0").expect("bind");
    let second = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (a, b) = (first.as_raw_fd(), second.as_raw_fd());
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=2 exec \"$@\"")
        .args(["sh", BIN, "serve", "--config"])
        .arg(env.config_path())
        .env("RUST_LOG", "info")
        .env("STATE_DIRECTORY", env.state())
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: fcntl and dup2 are async-signal-safe. Both listeners are first copied to descriptors of 10
    // or more, so that making one of them fd 3 cannot close the other if it was fd 3 or 4; dup2's copies
    // are open across exec.
    unsafe {
        command.pre_exec(move || {
            let high = [a, b].map(|fd| libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10));
            for (fd, to) in high.into_iter().zip([3, 4]) {
                if fd < 0 || libc::dup2(fd, to) != to {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut server = Server::spawn(command);
    let status = server.wait_exit(EXIT).expect("exits");
    assert_eq!(status.code(), Some(78), "{}", server.log());
    assert!(
        server
            .wait_log(
                "systemd passed 2 sockets; hookrunner serves exactly one",
                EXIT
            )
            .is_some(),
        "{}",
        server.log()
    );
}

#[test]
fn a_passed_unix_socket_is_served_and_its_file_left_to_systemd() {
    let env = Env::new();
    let path = env.path().join("hookrunner.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let command = activated(&env, listener.as_raw_fd(), None, None);
    let mut server = Server::spawn(command);
    let line = server
        .wait_log("listening on ", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("did not start:\n{}", server.log()));
    assert!(
        line.ends_with(&format!("listening on unix:{}", path.display())),
        "{line}"
    );
    drop(listener);
    let mut stream = std::os::unix::net::UnixStream::connect(&path).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    use std::io::Write;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .expect("send");
    assert_eq!(Response::read(&mut stream).expect("answer").status, 200);
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit(EXIT).expect("exits").code(), Some(0));
    // The socket file is the socket unit's: it outlives our restarts.
    assert!(
        path.exists(),
        "the daemon removed a socket file it did not create"
    );
}

#[test]
fn a_passed_socket_beyond_loopback_needs_a_sender_like_listen_does() {
    let env = Env::new();
    // What `ListenStream=0.0.0.0:443` would pass: the file's loopback `listen` must not vouch for it.
    let listener = TcpListener::bind("0.0.0.0:0").expect("bind");
    let mut server = Server::spawn(activated(&env, listener.as_raw_fd(), None, None));
    let status = server.wait_exit(EXIT).expect("exits");
    assert_eq!(status.code(), Some(78), "{}", server.log());
    assert!(
        server
            .wait_log(
                "the socket systemd passed (ListenStream=): listen = 0.0.0.0:",
                EXIT
            )
            .is_some(),
        "{}",
        server.log()
    );
}
