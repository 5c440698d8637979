//! The daemon's life: reload on SIGHUP, drain on SIGTERM and SIGINT, restart after a crash, one daemon per
//! payload directory, configuration errors at start, a unix socket, the log, and the command line.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::util::{
    BIN, Env, KillOnDrop, Release, Response, Server, listens, payload_files, send, wait_file,
    wait_for_release, wait_until,
};

const EXIT: Duration = Duration::from_secs(10);

/// Starts `serve` on this env, expecting it to exit at once; returns how, and the server for its log.
fn start_failing(env: &Env) -> (ExitStatus, Server) {
    exits(env.serve_command("127.0.0.1:0"))
}

/// Runs a daemon that is to exit by itself; its status and its log.
fn exits(command: std::process::Command) -> (ExitStatus, Server) {
    let mut server = Server::spawn(command);
    let status = server
        .wait_exit(EXIT)
        .unwrap_or_else(|| panic!("still running:\n{}", server.log()));
    (status, server)
}

/// Waits for `needle` in the log, returning its line or failing with the whole log.
fn logged(server: &Server, needle: &str) -> String {
    server
        .wait_log(needle, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no {needle:?} in the log:\n{}", server.log()))
}

#[test]
fn sighup_reloads_the_routes_and_keeps_the_old_ones_when_the_new_are_invalid() {
    let env = Env::new();
    env.script("old.sh", "exit 0");
    env.script("new.sh", "exit 0");
    env.routes("Old old.sh\n");
    let server = env.serve();
    assert_eq!(
        server.post("/hooks/New", b"").status,
        404,
        "not routed before the reload"
    );
    env.routes("Old old.sh\nNew new.sh\n");
    server.signal(libc::SIGHUP);
    let reloaded = logged(&server, "reloaded");
    assert!(reloaded.contains("reloaded: 2 route(s)"), "{reloaded}");
    let new = server.post("/hooks/New", b"");
    assert_eq!(new.status, 200, "{}", new.text());
    assert_eq!(new.json()["script"], "new.sh");
    // Line 1 alone would drop the route for Old; line 2 is invalid, so nothing of this file may apply.
    env.routes("Other old.sh\nNew new.sh colour=red\n");
    server.signal(libc::SIGHUP);
    let failed = logged(&server, "reload failed");
    assert!(
        failed.contains("routes:2:") && failed.contains("unknown option"),
        "the failure names the file and line: {failed}"
    );
    for event in ["Old", "New"] {
        let response = server.post(&format!("/hooks/{event}"), b"");
        assert_eq!(
            response.status,
            200,
            "{event} still served after the failed reload: {}",
            response.text()
        );
    }
}

/// A routes file beside the configuration that is gone at a reload (renamed away mid-edit, moved aside)
/// fails the reload: the embedded `* {event}` that a start without one falls back to would widen what
/// runs to any script named like an event.
#[test]
fn a_reload_with_the_routes_file_gone_keeps_the_old_routes() {
    let env = Env::new();
    env.script("old.sh", "exit 0");
    env.script("Evil", "exit 0");
    // No routes file at start, so no `routes` key: the file beside the configuration is read on reload.
    let server = env.serve();
    let beside = env.path().join("routes");
    fs::write(&beside, "Old old.sh\n").expect("routes");
    reload(&server);
    assert_eq!(server.post("/hooks/Evil", b"").status, 404);
    fs::remove_file(&beside).expect("rm routes");
    server.signal(libc::SIGHUP);
    let failed = logged(&server, "reload failed");
    assert!(failed.contains("is gone"), "{failed}");
    assert_eq!(
        server.post("/hooks/Evil", b"").status,
        404,
        "still routed by the old file"
    );
    assert_eq!(server.post("/hooks/Old", b"").status, 200);
}

/// Without `--config` the daemon reads /etc/hookrunner/hookrunner.toml. Should that file be gone at a reload
/// (moved aside mid-edit, a tool's rename), the built-in defaults it would fall back to have no sender and
/// no trusted proxy: a daemon behind a proxy on loopback would serve everyone, unauthenticated. The reload
/// fails instead. Root only: the test gives the daemon a mount namespace whose /etc is an overlay, so the
/// machine's own /etc is never written.
#[test]
fn a_reload_with_the_default_configuration_file_gone_keeps_the_senders() {
    if !rustix::process::geteuid().is_root() {
        println!("skipped: a private /etc needs root");
        return;
    }
    let env = Env::new();
    let ran = env.path().join("ran");
    env.script("ok.sh", &format!("touch {}", ran.display()));
    env.routes("* ok.sh\n");
    let password = env.path().join("password");
    fs::write(&password, "a-password-of-some-length\n").expect("password");
    fs::set_permissions(
        &password,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    let env = env.config(&format!(
        "[[sender]]\nname = \"jamf\"\ntype = \"basic\"\nuser = \"jamf\"\npassword_file = {password:?}"
    ));
    let (upper, work) = (env.path().join("upper"), env.path().join("work"));
    fs::create_dir(&upper).expect("upper");
    fs::create_dir(&work).expect("work");
    let overlay = format!(
        "mount -t overlay overlay -o lowerdir=/etc,upperdir={},workdir={} /etc",
        upper.display(),
        work.display()
    );
    let probe = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &overlay])
        .status();
    if !probe.as_ref().is_ok_and(|s| s.success()) {
        println!("skipped: cannot mount an overlay on /etc in a mount namespace here ({probe:?})");
        return;
    }
    let command = env.serve_command("127.0.0.1:0");
    let start = format!(
        "{overlay} && mkdir -p /etc/hookrunner && cp {} /etc/hookrunner/hookrunner.toml && exec {BIN} serve \
         --listen 127.0.0.1:0",
        env.config_path().display()
    );
    // `unshare` without --fork and `exec`: the daemon keeps the pid the test signals.
    let mut unshared = Command::new("unshare");
    unshared.args(["-m", "--propagation", "private", "sh", "-c", &start]);
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => unshared.env(key, value),
            None => unshared.env_remove(key),
        };
    }
    unshared
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let server = Server::start(unshared);
    // Read from the file the start found, not the defaults.
    logged(&server, "1 sender(s): jamf");
    assert_eq!(server.post("/hooks/Any", b"{}").status, 401);
    let pid = server.child.id().to_string();
    let moved = Command::new("nsenter")
        .args(["-t", &pid, "-m", "mv", "/etc/hookrunner/hookrunner.toml"])
        .arg("/etc/hookrunner/hookrunner.toml.bak")
        .status()
        .expect("nsenter");
    assert!(moved.success());
    server.signal(libc::SIGHUP);
    let failed = logged(&server, "reload failed");
    assert!(
        failed.contains("/etc/hookrunner/hookrunner.toml"),
        "{failed}"
    );
    assert_eq!(
        server.post("/hooks/Any", b"{}").status,
        401,
        "the sender still checks every request:\n{}",
        server.log()
    );
    assert!(!ran.exists(), "a script ran:\n{}", server.log());
}

/// Sends SIGHUP and waits for the reload to be logged as done: from that line on, the new configuration is in
/// force.
fn reload(server: &Server) {
    let done = |server: &Server| server.log().matches("reloaded: ").count();
    let before = done(server);
    server.signal(libc::SIGHUP);
    assert!(
        wait_until(EXIT, || done(server) > before),
        "no reload logged:\n{}",
        server.log()
    );
}

#[test]
fn sighup_applies_a_new_max_body_at_once() {
    let mut env = Env::new().config("max_body = \"1KiB\"");
    env.script("a", "exit 0");
    let server = env.serve();
    let body = format!("{{\"pad\":\"{}\"}}", "x".repeat(200));
    let before = server.post("/hooks/a", body.as_bytes());
    assert_eq!(before.status, 200, "{}", before.text());
    env.reconfigure("max_body = \"100\"");
    reload(&server);
    let after = server.post("/hooks/a", body.as_bytes());
    assert_eq!(after.status, 413, "{}", after.text());
}

#[test]
fn sighup_applies_a_new_timeout_at_once() {
    let mut env = Env::new().config("timeout = \"30s\"");
    env.script("a", "sleep 1");
    let server = env.serve();
    let before = server.post("/hooks/a", b"");
    assert_eq!(before.status, 200, "{}", before.text());
    env.reconfigure("timeout = \"200ms\"");
    reload(&server);
    let after = server.post("/hooks/a", b"");
    assert_eq!(after.status, 504, "{}", after.text());
    assert_eq!(after.json()["timed_out"], true);
}

#[test]
fn sighup_applies_new_event_sources_at_once() {
    let mut env = Env::new();
    env.script("from-path", "exit 0");
    env.script("from-header", "exit 0");
    let server = env.serve();
    let named = || {
        server.request(
            "POST",
            "/hooks/from-path",
            &[("X-Kind", "from-header")],
            b"",
        )
    };
    let before = named();
    assert_eq!(before.status, 200, "{}", before.text());
    assert_eq!(before.json()["script"], "from-path");
    env.reconfigure(r#"event = ["header:X-Kind"]"#);
    reload(&server);
    let after = named();
    assert_eq!(after.status, 200, "{}", after.text());
    assert_eq!(after.json()["script"], "from-header");
}

#[test]
fn sighup_warns_that_restart_only_keys_wait_for_a_restart_and_keeps_their_old_values() {
    let mut env = Env::new().config("max_connections = 1\nkeepalive_timeout = \"60s\"");
    env.script("a", "exit 0");
    let server = env.serve();
    // The one connection allowed, kept open (and idle) through the reload.
    let mut kept = server.connect();
    send(&mut kept, "POST", "/hooks/a", &[], b"", false);
    assert_eq!(Response::read(&mut kept).expect("first answer").status, 200);
    env.reconfigure("max_connections = 2\nkeepalive_timeout = \"30s\"");
    reload(&server);
    let log = server.log();
    for key in ["max_connections", "keepalive_timeout"] {
        assert!(
            log.contains(&format!(
                "a change to {key} takes effect only after a restart"
            )),
            "no warning for {key}:\n{log}"
        );
    }
    assert_eq!(
        log.matches("takes effect only after a restart").count(),
        2,
        "a warning for each changed key, none for the others:\n{log}"
    );
    // Answered on accept, so it only reads (see the max_connections tests in http.rs).
    let mut second = server.connect();
    let refused = Response::read(&mut second).expect("an answer");
    assert_eq!(
        refused.status,
        503,
        "max_connections is still 1: {}",
        refused.text()
    );
}

#[test]
fn rust_log_sets_the_level_and_info_is_the_default() {
    // Under each level: the daemon's warning about a stale payload file, its info lines (`listening on`, the
    // request's line), and the request's answer. A unix socket, since `listening on` may not be logged.
    let run = |level: Option<&str>| -> String {
        let env = Env::new();
        env.script("a", "exit 0");
        fs::create_dir(env.payloads()).expect("payload dir");
        fs::write(env.payloads().join("payload-0"), "left by a crash").expect("stale file");
        let socket = env.path().join("hookrunner.sock");
        let mut command = env.serve_command(&format!("unix:{}", socket.display()));
        match level {
            Some(level) => command.env("RUST_LOG", level),
            None => command.env_remove("RUST_LOG"),
        };
        let mut server = Server::spawn(command);
        assert!(
            wait_until(EXIT, || UnixStream::connect(&socket).is_ok()),
            "RUST_LOG={level:?}: not serving:\n{}",
            server.log()
        );
        let response = unix_post(&socket, "/hooks/a");
        assert_eq!(
            response.status,
            200,
            "RUST_LOG={level:?}: {}",
            response.text()
        );
        server.signal(libc::SIGTERM);
        let status = server.wait_exit(EXIT).expect("exits");
        assert_eq!(
            status.code(),
            Some(0),
            "RUST_LOG={level:?}: {}",
            server.log()
        );
        assert!(server.wait_log_complete(EXIT), "the log did not end");
        server.log()
    };
    let shown = |log: &str| {
        [
            log.contains("stale payload file"),
            log.contains("listening on"),
            log.contains("POST /hooks/a"),
        ]
    };
    let default = run(None);
    assert_eq!(shown(&default), [true, true, true], "{default}");
    let warn = run(Some("warn"));
    assert_eq!(shown(&warn), [true, false, false], "{warn}");
    let error = run(Some("error"));
    assert_eq!(shown(&error), [false, false, false], "{error}");
}

/// SIGTERM and SIGINT alike: the daemon stops listening at once, still answers the request in flight (the
/// script is held until the listening socket is seen gone), then exits 0.
fn a_stop_signal_drains_then_exits_0(signal: i32) {
    let env = Env::new();
    let started = env.path().join("started");
    let release = Release(env.path().join("release"));
    env.script("slow", &wait_for_release(&started, &release.0));
    let mut server = env.serve();
    let pid = server.child.id();
    assert!(listens(pid, server.addr), "listening before the signal");
    let response = std::thread::scope(|s| {
        let request = s.spawn(|| server.post("/hooks/slow", b""));
        assert!(
            wait_file(&started, EXIT),
            "the script did not start\n{}",
            server.log()
        );
        server.signal(signal);
        logged(&server, "stopping");
        // The daemon's own descriptors, not a connect: another test may by now listen on the freed port.
        assert!(
            !listens(pid, server.addr),
            "still listening while draining\n{}",
            server.log()
        );
        drop(release);
        request.join().expect("the request in flight is answered")
    });
    assert_eq!(response.status, 200, "{}", response.text());
    let status = server
        .wait_exit(EXIT)
        .unwrap_or_else(|| panic!("did not exit after draining:\n{}", server.log()));
    assert_eq!(status.code(), Some(0), "{}", server.log());
    assert!(server.wait_log_complete(EXIT), "the log did not end");
    let log = server.log();
    let (_, drained) = log.split_once("stopping").unwrap_or_default();
    assert!(
        drained
            .lines()
            .any(|l| l.contains("POST /hooks/slow") && l.contains("status=200"))
            && drained.trim_end().ends_with(" stopped"),
        "after stopping: the request answered, then stopped:\n{log}"
    );
}

#[test]
fn sigterm_stops_listening_answers_the_request_in_flight_and_exits_0() {
    a_stop_signal_drains_then_exits_0(libc::SIGTERM);
}

#[test]
fn sigint_stops_listening_answers_the_request_in_flight_and_exits_0() {
    a_stop_signal_drains_then_exits_0(libc::SIGINT);
}

#[test]
fn sigterm_gives_a_stalled_upload_header_timeout_more_then_answers_408() {
    let env = Env::new().config("header_timeout = \"1s\"");
    let mut server = env.serve();
    let mut stream = server.connect();
    // The bound on the answer: header_timeout (1 s) after the signal, with room for a loaded machine, and
    // far below the 256 s the client's pace alone would still allow.
    stream.set_read_timeout(Some(EXIT)).expect("read timeout");
    let head = "POST /hooks/x HTTP/1.1\r\nHost: t\r\nContent-Length: 2097152\r\nExpect: 100-continue\r\n\r\n";
    stream.write_all(head.as_bytes()).expect("head");
    // 100 Continue comes once the daemon has read the head, admitted the request and begun reading the body:
    // the request is in flight before the signal.
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).expect("100 Continue");
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    // 1 MiB at once puts the client 256 s ahead of the 4 KiB/s minimum pace; then it stalls.
    stream
        .write_all(&vec![b'x'; 1 << 20])
        .expect("part of the body");
    let stopped = Instant::now();
    server.signal(libc::SIGTERM);
    let answer = Response::read(&mut stream).unwrap_or_else(|e| {
        panic!(
            "no answer {:?} after SIGTERM: {e}\n{}",
            stopped.elapsed(),
            server.log()
        )
    });
    assert_eq!(answer.status, 408, "{}", answer.text());
    let status = server
        .wait_exit(EXIT)
        .unwrap_or_else(|| panic!("still waiting on the stalled upload:\n{}", server.log()));
    assert_eq!(status.code(), Some(0), "{}", server.log());
    let line = logged(&server, "/hooks/x");
    assert!(line.contains("status=408"), "{line}");
}

#[test]
fn a_restart_after_kill_9_removes_the_stale_payload_file_and_serves() {
    let env = Env::new();
    let pid = env.path().join("script.pid");
    let tmp = pid.with_extension("tmp");
    env.script(
        "slow",
        &format!("echo $$ > {tmp:?}\nmv {tmp:?} {pid:?}\nsleep 30"),
    );
    env.script("quick", "exit 0");
    // The orphaned script outlives the killed daemon; it goes when the test ends, whatever happens.
    let _cleanup = KillOnDrop(vec![pid.clone()]);
    let mut server = env.serve();
    let mut stream = server.connect();
    send(&mut stream, "POST", "/hooks/slow", &[], b"{\"n\":1}", true);
    assert!(
        wait_file(&pid, Duration::from_secs(10)),
        "the script did not start\n{}",
        server.log()
    );
    server.child.kill().expect("kill -9");
    server.child.wait().expect("reap");
    drop(stream);
    let stale: Vec<String> = payload_files(&env)
        .into_iter()
        .filter(|n| n != ".lock")
        .collect();
    assert_eq!(
        stale.len(),
        1,
        "the killed daemon left its payload file: {stale:?}"
    );
    // The orphaned script still runs: what it inherited must not keep the directory locked.
    let restarted = env.serve();
    assert!(
        logged(&restarted, "stale payload file").contains("removed 1 stale payload file"),
        "{}",
        restarted.log()
    );
    assert_eq!(payload_files(&env), [".lock"]);
    let response = restarted.post("/hooks/quick", b"{}");
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(payload_files(&env), [".lock"]);
}

#[test]
fn a_second_daemon_on_the_same_payload_dir_is_refused_and_the_first_keeps_serving() {
    let env = Env::new();
    let started = env.path().join("started");
    let release = Release(env.path().join("release"));
    // Succeeds only if its payload file is still there once released.
    env.script(
        "slow",
        &format!("{}\ntest -f \"$1\"", wait_for_release(&started, &release.0)),
    );
    env.script("quick", "exit 0");
    let server = env.serve();
    std::thread::scope(|s| {
        let request = s.spawn(|| server.post("/hooks/slow", b"{}"));
        assert!(
            wait_file(&started, Duration::from_secs(10)),
            "the script did not start\n{}",
            server.log()
        );
        // Each with a store of its own: the store is opened (and its lock taken) before the payload
        // directory, and the same store would refuse them first.
        let beside = |n: &str| {
            let mut command = env.serve_command("127.0.0.1:0");
            command.env("STATE_DIRECTORY", env.path().join(n));
            exits(command)
        };
        let (status, second) = beside("state-2");
        // With `.lock` removed (a cleanup by hand, a tmpfiles rule), the directory's own lock still holds.
        fs::remove_file(env.payloads().join(".lock")).expect("rm .lock");
        let (third_status, third) = beside("state-3");
        drop(release);
        assert!(
            status.code().is_some_and(|c| c != 0),
            "the second daemon failed: {status}\n{}",
            second.log()
        );
        let line = logged(&second, "in use by another hookrunner");
        assert!(
            line.contains(&env.payloads().display().to_string()),
            "{line}"
        );
        assert!(!second.log().contains("listening on"), "{}", second.log());
        assert!(
            third_status.code().is_some_and(|c| c != 0),
            "{third_status}"
        );
        let line = logged(&third, "in use by another hookrunner");
        assert!(
            line.contains(&env.payloads().display().to_string()),
            "{line}"
        );
        let response = request.join().expect("request thread");
        assert_eq!(
            response.status,
            200,
            "the first daemon's payload file survived the second's start: {}",
            response.text()
        );
    });
    let response = server.post("/hooks/quick", b"");
    assert_eq!(response.status, 200, "{}", response.text());
}

#[test]
fn a_config_error_at_start_exits_78_naming_file_and_line() {
    let env = Env::new().config("bogus = 1");
    let (status, server) = start_failing(&env);
    assert_eq!(status.code(), Some(78), "{}", server.log());
    let line = logged(&server, "hookrunner.toml:3:");
    assert!(line.contains("unknown field `bogus`"), "{line}");

    let env = Env::new();
    env.script("a.sh", "exit 0");
    env.routes("A a.sh\nB a.sh colour=red\n");
    let (status, server) = start_failing(&env);
    assert_eq!(status.code(), Some(78), "{}", server.log());
    let line = logged(&server, "routes:2:");
    assert!(line.contains("unknown option"), "{line}");
    assert!(!server.log().contains("listening on"), "{}", server.log());
}

#[test]
fn a_unix_socket_serves_and_is_removed_at_exit() {
    let env = Env::new();
    env.script("hello", "echo hello");
    let socket = env.path().join("hookrunner.sock");
    let mut server = Server::spawn(env.serve_command(&format!("unix:{}", socket.display())));
    let line = logged(&server, "listening on ");
    assert!(
        line.ends_with(&format!("listening on unix:{}", socket.display())),
        "{line}"
    );
    let response = unix_post(&socket, "/hooks/hello");
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["script"], "hello");
    server.signal(libc::SIGTERM);
    let status = server
        .wait_exit(EXIT)
        .unwrap_or_else(|| panic!("did not exit:\n{}", server.log()));
    assert_eq!(status.code(), Some(0), "{}", server.log());
    assert!(!socket.exists(), "the socket file is removed at exit");
}

/// Under the unit's umask (0077) the socket is still open to the daemon's group, which is how a proxy is
/// given access (README, "Behind nginx or Caddy"); and a socket may not be put in payload_dir, which is
/// 0700 and the daemon's alone.
#[test]
fn a_unix_socket_is_open_to_the_daemons_group_and_never_in_payload_dir() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let env = Env::new();
    env.script("hello", "echo hello");
    let public = tempfile::Builder::new()
        .prefix("hookrunner-socket")
        .tempdir()
        .expect("directory");
    fs::set_permissions(public.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let socket = public.path().join("hookrunner.sock");
    let mut command = env.serve_command(&format!("unix:{}", socket.display()));
    // SAFETY: umask is async-signal-safe and touches nothing but the child's own mask.
    unsafe {
        command.pre_exec(|| {
            libc::umask(0o077);
            Ok(())
        });
    }
    let server = Server::spawn(command);
    logged(&server, "listening on ");
    let mode = fs::metadata(&socket).expect("socket").permissions().mode();
    assert_eq!(mode & 0o777, 0o660, "{mode:o}");
    // Another user in the daemon's group connects (only root can become one here).
    if unsafe { libc::geteuid() } == 0 {
        let gid = unsafe { libc::getegid() }.to_string();
        let curl = Command::new("setpriv")
            .args(["--reuid=65534", &format!("--regid={gid}"), "--clear-groups"])
            .args([
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
            ])
            .arg("--unix-socket")
            .arg(&socket)
            .arg("http://hookrunner/hooks/hello")
            .output()
            .expect("setpriv curl");
        assert_eq!(
            String::from_utf8_lossy(&curl.stdout),
            "200",
            "{}",
            String::from_utf8_lossy(&curl.stderr)
        );
    }
    drop(server);
    let inside = env.payloads().join("hookrunner.sock");
    let env = env.config(&format!("listen = \"unix:{}\"", inside.display()));
    let check = env.check();
    assert_eq!(check.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&check.stderr).contains("is inside payload_dir"),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

fn unix_post(socket: &Path, path: &str) -> Response {
    let mut stream =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    )
    .expect("send request");
    Response::read(&mut stream).expect("response")
}

#[test]
fn version_help_and_usage_errors() {
    let version = Command::new(BIN).arg("--version").output().expect("run");
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("hookrunner {}", env!("CARGO_PKG_VERSION"))
    );
    let help = Command::new(BIN).arg("--help").output().expect("run");
    assert_eq!(help.status.code(), Some(0));
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("Usage: hookrunner <COMMAND>")
            && text.contains("serve")
            && text.contains("check"),
        "{text}"
    );
    let unknown = Command::new(BIN).arg("frobnicate").output().expect("run");
    assert_eq!(unknown.status.code(), Some(64));
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert!(err.contains("unrecognized subcommand"), "{err}");
    // A bad value and a missing command are usage errors too: 64, never clap's own 2.
    for bad in [&["serve", "--listen", "nope"][..], &[]] {
        let out = Command::new(BIN).args(bad).output().expect("run");
        assert_eq!(out.status.code(), Some(64), "{bad:?}");
    }
}

#[test]
fn a_request_arriving_during_shutdown_gets_503_with_retry_after() {
    // The kept connection must stay open, idle, through the whole test, however slow the machine.
    let env = Env::new().config("keepalive_timeout = \"60s\"");
    let started = env.path().join("started");
    let release = Release(env.path().join("release"));
    env.script("slow", &wait_for_release(&started, &release.0));
    env.script("quick", "exit 0");
    let mut server = env.serve();
    // A kept-alive connection, already used once.
    let mut kept = server.connect();
    send(&mut kept, "POST", "/hooks/quick", &[], b"", false);
    assert_eq!(Response::read(&mut kept).expect("first answer").status, 200);
    std::thread::scope(|s| {
        // A slow request keeps the daemon draining while the kept connection asks again.
        let slow = s.spawn(|| server.post("/hooks/slow", b""));
        assert!(wait_file(&started, EXIT), "the slow script did not start");
        server.signal(libc::SIGTERM);
        logged(&server, "stopping");
        send(&mut kept, "POST", "/hooks/quick", &[], b"", false);
        let refused = Response::read(&mut kept).expect("an answer, not a reset");
        assert_eq!(refused.status, 503, "{}", refused.text());
        assert_eq!(refused.header("Retry-After"), Some("1"));
        assert_eq!(refused.header("Connection"), Some("close"));
        // Only now may the daemon finish draining: the slow request kept it serving until here.
        drop(release);
        assert_eq!(slow.join().expect("slow request").status, 200);
    });
    let status = server.wait_exit(EXIT).expect("exits after draining");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn the_first_log_line_names_the_bound_address_and_the_journal_gets_priorities() {
    let env = Env::new();
    let server = env.serve();
    let first = server.log().lines().next().unwrap_or_default().to_string();
    assert!(
        first.contains(&format!("listening on {}", server.addr)),
        "{first}"
    );
    drop(server);
    let server = env.serve_with(|command| {
        command.env("JOURNAL_STREAM", "8:1234");
    });
    let first = server.log().lines().next().unwrap_or_default().to_string();
    assert_eq!(
        first,
        format!("<6>listening on {}", server.addr),
        "no timestamp under the journal"
    );
}

/// Scripts run as the payload directory's owner, and some keep what they make of `$1` beside it (`gzip
/// "$1"`, a `.bak`, a work directory) or move it. That must not stop the next start (it once exited 78,
/// "not a hookrunner payload file", and the unit stayed down), nor log an error for a `$1` that is gone.
#[test]
fn what_a_script_leaves_beside_its_payload_is_removed_at_the_next_start() {
    let env = Env::new();
    env.script(
        "keeps",
        "cp \"$1\" \"$1.bak\" && mkdir \"$1.d\" && cp \"$1\" \"$1.d/\" && mv \"$1\" \"$1.done\"",
    );
    let mut server = env.serve();
    assert_eq!(server.post("/hooks/keeps", b"{}").status, 200);
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(EXIT).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", server.log());
    assert!(!server.log().contains("cannot remove"), "{}", server.log());
    assert_eq!(payload_files(&env).len(), 4, "{:?}", payload_files(&env));
    let restarted = env.serve();
    let warning = logged(&restarted, "stale payload file");
    assert!(
        warning.contains("removed 3 stale payload file(s)"),
        "{warning}"
    );
    assert_eq!(payload_files(&env), [".lock"]);
    assert_eq!(restarted.post("/hooks/keeps", b"{}").status, 200);
}

#[test]
fn the_first_log_line_is_listening_on_even_when_a_crash_left_payload_files() {
    let env = Env::new();
    fs::create_dir(env.payloads()).expect("payload dir");
    fs::write(env.payloads().join("payload-3"), "left by a crash").expect("stale file");
    let server = env.serve();
    let warning = logged(&server, "stale payload file");
    assert!(
        warning.contains("removed 1 stale payload file(s)"),
        "{warning}"
    );
    let log = server.log();
    let first = log.lines().next().unwrap_or_default();
    assert!(
        first.contains(&format!("listening on {}", server.addr)),
        "the address first, the warning after it:\n{log}"
    );
    assert_eq!(payload_files(&env), [".lock"]);
}
