//! Test fixtures: a private directory per test with its own scripts, routes and config, and the real
//! `hookrunner` binary started on `127.0.0.1:0`, its bound address read from its log.

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_hookrunner");

/// A sample payload from `tests/fixtures/payloads` (see its SOURCES.md).
pub fn payload(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/payloads")
        .join(name);
    fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One test's world: `scripts/`, `payloads/`, `routes`, `hookrunner.toml` in a temp dir.
pub struct Env {
    pub dir: tempfile::TempDir,
    extra: String,
    /// Whether the config names `payload_dir` (see [`Env::default_payload_dir`]).
    payload_dir_key: bool,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("scripts")).expect("scripts dir");
        Env {
            dir,
            extra: String::new(),
            payload_dir_key: true,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn scripts(&self) -> PathBuf {
        self.dir.path().join("scripts")
    }

    pub fn payloads(&self) -> PathBuf {
        self.dir.path().join("payloads")
    }

    /// The store's directory (`state_dir`).
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Writes an executable `sh` script; `body` follows the `#!/bin/sh` line.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.scripts().join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod script");
        path
    }

    pub fn routes(&self, text: &str) -> &Env {
        fs::write(self.dir.path().join("routes"), text).expect("write routes");
        self
    }

    /// Extra TOML lines for the config file.
    pub fn config(mut self, extra: &str) -> Env {
        self.extra.push_str(extra);
        self.extra.push('\n');
        self
    }

    pub fn config_path(&self) -> PathBuf {
        let path = self.dir.path().join("hookrunner.toml");
        let routes = self.dir.path().join("routes");
        let mut text = format!("scripts_dir = {:?}\n", self.scripts());
        if self.payload_dir_key {
            text.push_str(&format!("payload_dir = {:?}\n", self.payloads()));
        }
        if routes.exists() {
            text.push_str(&format!("routes = {routes:?}\n"));
        }
        text.push_str(&self.extra);
        fs::write(&path, text).expect("write config");
        path
    }

    pub fn serve(&self) -> Server {
        self.serve_with(|_| {})
    }

    /// Starts the daemon; `tweak` may adjust the command (environment, pre_exec limits).
    pub fn serve_with(&self, tweak: impl FnOnce(&mut Command)) -> Server {
        let mut command = self.serve_command("127.0.0.1:0");
        tweak(&mut command);
        Server::start(command)
    }

    /// Leaves `payload_dir` out of the config, so the daemon picks its default (from its environment).
    pub fn default_payload_dir(mut self) -> Env {
        self.payload_dir_key = false;
        self
    }

    /// Runs `hookrunner check` on this env's config.
    pub fn check(&self) -> std::process::Output {
        Command::new(BIN)
            .args(["check", "--config"])
            .arg(self.config_path())
            .env("STATE_DIRECTORY", self.state())
            .output()
            .expect("run check")
    }
}

/// The daemon's stderr, collected by a thread, with a condition to wait on.
#[derive(Default)]
pub struct Log {
    text: Mutex<String>,
    grew: Condvar,
}

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Log>,
}

impl Server {
    pub fn start(command: Command) -> Server {
        let mut server = Server::spawn(command);
        // 20 s: a daemon under strace starts slowly on a busy machine.
        let line = server
            .wait_log("listening on ", Duration::from_secs(20))
            .unwrap_or_else(|| panic!("hookrunner did not start:\n{}", server.log()));
        let addr = line.split("listening on ").nth(1).expect("address").trim();
        server.addr = addr
            .parse()
            .unwrap_or_else(|e| panic!("bad address {addr:?}: {e}"));
        server
    }

    pub fn log(&self) -> String {
        self.log.text.lock().expect("log lock").clone()
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut text = self.log.text.lock().expect("log lock");
        loop {
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return Some(line.to_string());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            text = self.log.grew.wait_timeout(text, left).expect("log lock").0;
        }
    }

    pub fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        stream
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        let mut stream = self.connect();
        send(&mut stream, method, path, headers, body, true);
        Response::read(&mut stream)
            .unwrap_or_else(|e| panic!("no response: {e}\nlog:\n{}", self.log()))
    }

    pub fn post(&self, path: &str, body: &[u8]) -> Response {
        self.request("POST", path, &[("Content-Type", "application/json")], body)
    }

    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[], b"")
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    /// Waits for the daemon to exit, then (for a few seconds at most: a script it left may still hold its
    /// stderr) for its log to be read to the end, so a caller can assert on its last lines.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.wait_log_complete(Duration::from_secs(5));
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a request (over TCP, TLS or a unix socket); `close` adds `Connection: close`.
pub fn send(
    stream: &mut impl Write,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    close: bool,
) {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).expect("send request");
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// Reads one response (Content-Length framed, as hookrunner always answers).
    pub fn read(stream: &mut impl Read) -> std::io::Result<Response> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = match stream.read(&mut byte) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => other?,
            };
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("closed after {:?}", String::from_utf8_lossy(&head)),
                ));
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        stream.read_exact(&mut body)?;
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

// Helpers for the runner and lifecycle tests: daemons started by hand, and processes scripts leave behind.

impl Env {
    /// The command `serve` runs, listening on `listen`: for tests that start the daemon themselves.
    pub fn serve_command(&self, listen: &str) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--listen", listen, "--config"])
            .arg(self.config_path())
            .env("RUST_LOG", "info")
            // Every test its own store (the default `state_dir` under systemd), never the system's.
            .env("STATE_DIRECTORY", self.state())
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }
}

impl Env {
    /// `serve_command` run by `wrapper` (`strace` and its options), which takes the command as its last
    /// arguments; the environment is the same.
    pub fn serve_command_under(&self, wrapper: &[&str], listen: &str) -> Command {
        let inner = self.serve_command(listen);
        let mut command = Command::new(wrapper[0]);
        command
            .args(&wrapper[1..])
            .arg(inner.get_program())
            .args(inner.get_args());
        for (key, value) in inner.get_envs() {
            match value {
                Some(value) => command.env(key, value),
                None => command.env_remove(key),
            };
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }
}

impl Env {
    /// The daemon under `strace -f -qq` with `options`, started (listening), and a guard that kills the
    /// daemon itself on the way out: strace killed leaves its tracee running.
    pub fn serve_under_strace(&self, options: &[&str]) -> (Server, KillOnDrop) {
        let mut wrapper = vec!["strace", "-f", "-qq"];
        wrapper.extend_from_slice(options);
        let server = Server::start(self.serve_command_under(&wrapper, "127.0.0.1:0"));
        let strace = server.child.id();
        let daemon = fs::read_to_string(format!("/proc/{strace}/task/{strace}/children"))
            .expect("strace's children");
        assert!(!daemon.trim().is_empty(), "strace has no child");
        let pid_file = self.path().join("daemon.pid");
        fs::write(&pid_file, daemon.trim()).expect("pid file");
        (server, KillOnDrop(vec![pid_file]))
    }
}

/// Writes a secret file (mode 0600, `value` and a newline) in the test's directory and returns its path.
pub fn secret(env: &Env, name: &str, value: &str) -> PathBuf {
    let path = env.path().join(name);
    fs::write(&path, format!("{value}\n")).expect("write secret");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod secret");
    path
}

/// Whether strace runs here; a test that needs it says it is skipped otherwise (.ci/run installs it).
pub fn has_strace() -> bool {
    let found = Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        println!("skipped: strace is not installed (.ci/run installs it)");
    }
    found
}

impl Server {
    /// Starts `command` and collects its log like `Env::serve`, without waiting for it to listen: for a
    /// daemon that must fail at start, or that listens on a unix socket. `addr` stays a placeholder.
    pub fn spawn(mut command: Command) -> Server {
        let mut child = command.spawn().expect("start hookrunner");
        let stderr = child.stderr.take().expect("stderr piped");
        let log = Arc::new(Log::default());
        let writer = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("HOOKRUNNER_TEST_LOG").is_some() {
                    eprintln!("[hookrunner] {line}");
                }
                let mut text = writer.text.lock().expect("log lock");
                text.push_str(&line);
                text.push('\n');
                writer.grew.notify_all();
            }
        });
        Server {
            child,
            addr: "127.0.0.1:1".parse().expect("placeholder address"),
            log,
        }
    }
}

/// Whether `pid` is a live process. A zombie counts as gone: it holds nothing any more, and orphans may stay
/// zombies for a while where init is slow to reap them.
pub fn alive(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may itself contain ") ".
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .is_some_and(|state| !matches!(state, 'Z' | 'X'))
}

/// Checks `done` every 20 ms until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Waits until `pid` is gone; false if it is still alive after `timeout`.
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    wait_until(timeout, || !alive(pid))
}

/// Waits until `path` exists; false if it does not after `timeout`.
pub fn wait_file(path: &Path, timeout: Duration) -> bool {
    wait_until(timeout, || path.exists())
}

/// A pid a script wrote to `path`.
pub fn read_pid(path: &Path) -> i32 {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {text:?}: {e}", path.display()))
}

/// On drop, SIGKILLs whatever is still alive of the processes whose pids scripts wrote to these files, with
/// their process groups: a test that fails early leaves nothing running.
pub struct KillOnDrop(pub Vec<PathBuf>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for file in &self.0 {
            let Some(pid) = fs::read_to_string(file)
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok())
            else {
                continue;
            };
            if pid <= 1 || !alive(pid) {
                continue;
            }
            // SAFETY: signalling a process a test script started; never our own group.
            unsafe {
                let group = libc::getpgid(pid);
                if group > 1 && group != libc::getpgrp() {
                    libc::killpg(group, libc::SIGKILL);
                } else {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// The names in the payload directory, sorted.
pub fn payload_files(env: &Env) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(env.payloads())
        .expect("read payload dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Creates its file when dropped, releasing a script waiting in [`wait_for_release`] even when the test fails
/// early.
pub struct Release(pub PathBuf);

impl Drop for Release {
    fn drop(&mut self) {
        let _ = fs::write(&self.0, "");
    }
}

/// Shell lines that touch `started`, then wait (60 s at most) for `release` to exist.
pub fn wait_for_release(started: &Path, release: &Path) -> String {
    format!(
        "touch {started:?}\ni=0\nwhile [ ! -e {release:?} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done"
    )
}

// Helpers for the lifecycle tests: a reload's new configuration, the whole log of a daemon that exited, and
// whether a daemon still holds its listening socket.

impl Env {
    /// Replaces the extra TOML lines and rewrites the config file, for a daemon to re-read on SIGHUP.
    pub fn reconfigure(&mut self, extra: &str) {
        self.extra = format!("{extra}\n");
        self.config_path();
    }
}

impl Server {
    /// Waits until the thread collecting the log has read its last line, which it does once the daemon has
    /// exited and closed its stderr: the log is then complete, and a line missing from it will never come.
    /// That thread holds the only other reference to the log, and drops it when it ends.
    pub fn wait_log_complete(&self, timeout: Duration) -> bool {
        wait_until(timeout, || Arc::strong_count(&self.log) == 1)
    }
}

/// Whether process `pid` holds a TCP socket listening on `addr`'s port. It looks at the process's own
/// descriptors, so a socket another process opens on a freed port does not count.
pub fn listens(pid: u32, addr: SocketAddr) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let inodes: Vec<String> = fds
        .filter_map(Result::ok)
        .filter_map(|fd| fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let table = if addr.is_ipv4() { "tcp" } else { "tcp6" };
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
        return false;
    };
    // Columns: sl, local address (hex IP:port), remote address, state (0A is LISTEN), ..., inode (the 10th).
    let port = format!(":{:04X}", addr.port());
    text.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 9
            && fields[1].ends_with(&port)
            && fields[3] == "0A"
            && inodes.iter().any(|inode| inode == fields[9])
    })
}

// Signers nobody here wrote, for the authentication tests: the Standard Webhooks reference library (PyPI)
// and GitHub's own (npm), installed once per build directory.

/// Installs the PyPI package `package` into `dir` unless it is there already (its import directory exists).
pub fn pip_install(dir: &Path, package: &str) {
    if dir.join(package).exists() {
        return;
    }
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(dir)
        .arg(package)
        .status()
        .expect("run pip");
    assert!(status.success(), "pip install {package} failed");
}

/// The trimmed stdout of a signer that must have succeeded.
fn signed(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("UTF-8")
        .trim()
        .to_string()
}

/// A directory holding the `standardwebhooks` Python package and `@octokit/webhooks-methods`, installed on
/// first use from the registries (CI reaches them; so does a developer's machine).
pub fn signers() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("signers");
        let python = dir.join("python");
        pip_install(&python, "standardwebhooks");
        let node = dir.join("node");
        if !node.join("node_modules/@octokit/webhooks-methods").exists() {
            fs::create_dir_all(&node).expect("node dir");
            let status = Command::new("npm")
                .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
                .arg(&node)
                .arg("@octokit/webhooks-methods@6")
                .status()
                .expect("run npm");
            assert!(
                status.success(),
                "npm install @octokit/webhooks-methods failed"
            );
        }
        // Written once, here: rewritten per signature, a concurrent test's node could load it empty.
        let script = "import { sign } from '@octokit/webhooks-methods';\n\
                      import { readFileSync } from 'node:fs';\n\
                      console.log(await sign(process.argv[2], readFileSync(process.argv[3], 'utf8')));";
        fs::write(node.join("sign.mjs"), script).expect("write sign.mjs");
        dir
    })
}

/// `webhook-signature` for a delivery, made by the Standard Webhooks reference library.
pub fn standard_webhooks_sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let script = "import sys, datetime\nfrom standardwebhooks import Webhook\n\
                  body = open(sys.argv[4], 'rb').read().decode()\n\
                  ts = datetime.datetime.fromtimestamp(int(sys.argv[3]), tz=datetime.timezone.utc)\n\
                  print(Webhook(sys.argv[1]).sign(sys.argv[2], ts, body))";
    let body_file = tempfile::NamedTempFile::new().expect("body file");
    fs::write(body_file.path(), body).expect("write body");
    let out = Command::new("python3")
        .env("PYTHONPATH", signers().join("python"))
        .args(["-c", script, secret, id, &timestamp.to_string()])
        .arg(body_file.path())
        .output()
        .expect("run python3");
    signed(out)
}

/// `X-Hub-Signature-256` for a body, made by GitHub's own @octokit/webhooks-methods.
pub fn github_sign(secret: &str, body: &[u8]) -> String {
    let script_file = signers().join("node/sign.mjs");
    let body_file = tempfile::NamedTempFile::new().expect("body file");
    fs::write(body_file.path(), body).expect("write body");
    let out = Command::new("node")
        .arg(&script_file)
        .arg(secret)
        .arg(body_file.path())
        .output()
        .expect("run node");
    signed(out)
}

/// The descriptor numbers `pid` has open.
pub fn open_fds(pid: u32) -> Vec<u32> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list the daemon's descriptors")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Whether every byte sent over loopback TCP to or from `port` has been read: no established connection
/// with that port at either end has any in its send or receive queue (`/proc/net/tcp`). A server that
/// reads until it has everything it was sent has then taken it all.
pub fn loopback_queues_empty(port: u16) -> bool {
    let Ok(table) = fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let port_of = |address: &str| {
        address
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    table.lines().skip(1).all(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // local, remote, state (01: established), tx_queue:rx_queue
        let [_, local, remote, state, queues, ..] = fields.as_slice() else {
            return true;
        };
        let involved = port_of(local) == Some(port) || port_of(remote) == Some(port);
        !involved || *state != "01" || *queues == "00000000:00000000"
    })
}

/// How many files in the payload directory the daemon `pid` holds open, named or not (not the directory
/// itself, nor `.lock`, which it holds locked).
pub fn open_payload_files(pid: u32, env: &Env) -> usize {
    let dir = env.payloads().canonicalize().expect("payload dir");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|target| {
                    target.starts_with(&dir) && *target != dir && !target.ends_with(".lock")
                })
                .count()
        })
        .unwrap_or(0)
}
