//! Running scripts: which file a route finds and which it refuses, how a script starts (stdin, a busy or
//! broken file, running out of descriptors), deadlines on the whole process group, leftovers ended and
//! detached survivors outlived, output floods logged with a cap, the concurrency limit, and payload files and
//! their directory.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::util::{
    Env, KillOnDrop, Release, Response, Server, alive, open_payload_files, payload_files, read_pid,
    send, wait_file, wait_for_release, wait_gone, wait_until,
};

/// How long a killed process may take to disappear.
const GONE: Duration = Duration::from_secs(5);
/// Scripts here sleep 30 s; their groups must be gone well before, 4 s after the start (timeout + grace).
const GROUP_GONE: Duration = Duration::from_secs(20);

/// Shell lines that start a background `sleep` and publish its pid in `file` (atomically, by rename), and the
/// script's own pid in `file.leader`.
fn background_sleep(file: &Path) -> String {
    format!(
        "echo $$ > {leader:?}\nsleep 30 &\necho $! > {tmp:?}\nmv {tmp:?} {file:?}",
        leader = file.with_extension("leader"),
        tmp = file.with_extension("tmp")
    )
}

/// Kills, when the test ends, what is left of a script that ran [`background_sleep`] with `file`.
fn cleanup(file: &Path) -> KillOnDrop {
    KillOnDrop(vec![file.to_path_buf(), file.with_extension("leader")])
}

/// Posts to `/hooks/{event}`, checking while the script runs that the grandchild whose pid it writes to
/// `pid_file` is alive; returns the answer, after the timeout.
fn run_hanging(server: &Server, event: &str, pid_file: &Path) -> Response {
    std::thread::scope(|s| {
        let request = s.spawn(|| server.post(&format!("/hooks/{event}"), b""));
        assert!(
            wait_file(pid_file, Duration::from_secs(10)),
            "the script did not start its grandchild\n{}",
            server.log()
        );
        assert!(
            alive(read_pid(pid_file)),
            "the grandchild runs while the script does"
        );
        request.join().expect("request thread")
    })
}

#[test]
fn a_hung_script_is_answered_504_and_its_whole_group_ends() {
    let env = Env::new().config("timeout = \"3s\"\nkill_grace = \"1s\"");
    let grandchild = env.path().join("grandchild");
    env.script(
        "hang",
        &format!("{}\nsleep 30", background_sleep(&grandchild)),
    );
    let _cleanup = cleanup(&grandchild);
    let server = env.serve();
    let started = Instant::now();
    let response = run_hanging(&server, "hang", &grandchild);
    assert_eq!(response.status, 504, "{}", response.text());
    assert_eq!(response.json()["timed_out"], true);
    assert!(response.json()["exit_code"].is_null());
    assert_group_ended(
        &server,
        "hang: timed out after 3s; sending SIGTERM",
        &grandchild,
        started,
    );
}

/// A child that left the script's process group (GNU `timeout` puts itself in one of its own) is still the
/// script's at its deadline: its group is signalled too, and nothing outlives the 504.
#[test]
fn a_child_in_a_group_of_its_own_ends_at_the_scripts_deadline() {
    let env = Env::new().config("timeout = \"3s\"\nkill_grace = \"1s\"");
    let grandchild = env.path().join("grandchild");
    env.script(
        "escape",
        &format!(
            "timeout 40 sh -c 'echo $$ > {tmp:?}; mv {tmp:?} {grandchild:?}; exec sleep 30'",
            tmp = grandchild.with_extension("tmp")
        ),
    );
    let _cleanup = cleanup(&grandchild);
    let server = env.serve();
    let started = Instant::now();
    let response = run_hanging(&server, "escape", &grandchild);
    assert_eq!(response.status, 504, "{}", response.text());
    assert_group_ended(
        &server,
        "escape: timed out after 3s; sending SIGTERM to its group and to one group of its own children",
        &grandchild,
        started,
    );
}

/// The daemon logged `line`, and the script's background process died well before its own sleep would end.
fn assert_group_ended(server: &Server, line: &str, grandchild: &Path, started: Instant) {
    assert!(
        server.wait_log(line, Duration::from_secs(5)).is_some(),
        "no {line:?} in\n{}",
        server.log()
    );
    assert!(
        wait_gone(read_pid(grandchild), GONE),
        "the grandchild in the script's group was killed"
    );
    let took = started.elapsed();
    assert!(
        took < GROUP_GONE,
        "the group was gone only after {took:?}, as if left to finish its sleeps"
    );
}

/// A seccomp filter, installed in the daemon before it starts, that refuses `pidfd_open` with EPERM, as
/// Docker before 20.10 did for system calls it did not know.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn refuse_pidfd_open() -> std::io::Result<()> {
    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xC000_003E;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xC000_00B7;
    const LOAD_WORD: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JUMP_IF_EQUAL: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RETURN: u16 = 0x06; // BPF_RET | BPF_K
    const ALLOW: u32 = 0x7FFF_0000; // SECCOMP_RET_ALLOW
    let refuse = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let program = [
        op(LOAD_WORD, 0, 0, 4), // seccomp_data.arch
        op(JUMP_IF_EQUAL, 1, 0, AUDIT_ARCH),
        op(RETURN, 0, 0, ALLOW),
        op(LOAD_WORD, 0, 0, 0), // seccomp_data.nr
        op(JUMP_IF_EQUAL, 0, 1, libc::SYS_pidfd_open as u32),
        op(RETURN, 0, 0, refuse),
        op(RETURN, 0, 0, ALLOW),
    ];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: prctl and seccomp only read their arguments; `fprog` and `program` outlive the calls, and
    // both are async-signal-safe system calls in the child between fork and exec.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &fprog as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[test]
fn where_pidfd_open_is_refused_scripts_still_run_and_hung_ones_still_end() {
    use std::os::unix::process::CommandExt;
    let env = Env::new().config("timeout = \"3s\"\nkill_grace = \"1s\"");
    env.script("ok", "echo fine\nexit 0");
    env.script("fail", "exit 3");
    let grandchild = env.path().join("grandchild");
    env.script(
        "hang",
        &format!("{}\nsleep 30", background_sleep(&grandchild)),
    );
    let _cleanup = cleanup(&grandchild);
    // SAFETY: refuse_pidfd_open makes only async-signal-safe system calls.
    let server = env.serve_with(|command| unsafe {
        command.pre_exec(refuse_pidfd_open);
    });
    let ok = server.post("/hooks/ok", b"{}");
    assert_eq!(ok.status, 200, "{}\n{}", ok.text(), server.log());
    assert_eq!(server.post("/hooks/fail", b"{}").status, 500);
    assert!(
        server
            .wait_log("pidfd_open is not available", Duration::from_secs(5))
            .is_some(),
        "{}",
        server.log()
    );
    assert!(
        server
            .wait_log("ok[stdout]: fine", Duration::from_secs(5))
            .is_some(),
        "output is still logged:\n{}",
        server.log()
    );
    let started = Instant::now();
    let response = run_hanging(&server, "hang", &grandchild);
    assert_eq!(response.status, 504, "{}", response.text());
    assert_group_ended(
        &server,
        "hang: timed out after 3s; sending SIGTERM",
        &grandchild,
        started,
    );
    assert_eq!(payload_files(&env), [".lock"], "no payload file is left");
}

#[test]
fn a_script_ignoring_sigterm_is_killed_after_the_grace() {
    let env = Env::new().config("timeout = \"3s\"\nkill_grace = \"1s\"");
    let grandchild = env.path().join("grandchild");
    env.script(
        "stubborn",
        &format!("trap '' TERM\n{}\nsleep 30", background_sleep(&grandchild)),
    );
    let _cleanup = cleanup(&grandchild);
    let server = env.serve();
    let started = Instant::now();
    let response = run_hanging(&server, "stubborn", &grandchild);
    assert_eq!(response.status, 504, "{}", response.text());
    assert_eq!(response.json()["timed_out"], true);
    assert_group_ended(
        &server,
        "stubborn: still running 1s after SIGTERM; sending SIGKILL",
        &grandchild,
        started,
    );
}

#[test]
fn leftovers_holding_stdout_do_not_delay_the_answer_and_are_killed() {
    let env = Env::new();
    let background = env.path().join("background");
    let was_alive = env.path().join("was-alive");
    env.script(
        "leftover",
        &format!(
            "{}\nkill -0 $! && touch {was_alive:?}\necho done\nexit 0",
            background_sleep(&background)
        ),
    );
    let _cleanup = cleanup(&background);
    let server = env.serve();
    let started = Instant::now();
    let response = server.post("/hooks/leftover", b"");
    let elapsed = started.elapsed();
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(
        elapsed < Duration::from_secs(10),
        "answered after {elapsed:?}: it waited for the background sleep"
    );
    assert!(was_alive.exists(), "the background sleep had started");
    assert!(
        wait_gone(read_pid(&background), GONE),
        "the leftover in the script's group was killed when the script exited"
    );
    assert!(
        server
            .wait_log("leftover[stdout]: done", Duration::from_secs(5))
            .is_some(),
        "output before the exit is still logged\n{}",
        server.log()
    );
}

/// A line longer than a log line (4 KiB) is logged in pieces; a UTF-8 character where it is cut goes whole
/// into the next piece rather than as two replacement characters.
#[test]
fn a_long_line_is_cut_between_utf8_characters() {
    let env = Env::new();
    env.script(
        "utf",
        "printf '%04095d' 0 | tr 0 a; printf '\\303\\251tail\\n'",
    );
    let server = env.serve();
    assert_eq!(server.post("/hooks/utf", b"{}").status, 200);
    let line = server
        .wait_log("utf[stdout]: ", Duration::from_secs(5))
        .expect("logged");
    assert!(line.ends_with(&"a".repeat(4095)), "{line}");
    assert!(
        server
            .wait_log("utf[stdout]: étail", Duration::from_secs(5))
            .is_some(),
        "{}",
        server.log()
    );
    assert!(!server.log().contains('\u{FFFD}'), "{}", server.log());
}

/// The daemon's peak resident memory, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in\n{status}"))
}

/// 100 MiB on `stream`, without and with newlines: 200, the rest counted, 64 KiB logged, memory bounded.
fn flood(stream: &str) {
    const FLOOD: u64 = 100 << 20;
    const BUDGET: u64 = 64 << 10;
    let env = Env::new();
    let redirect = if stream == "stderr" { " >&2" } else { "" };
    env.script(
        "flood-bytes",
        &format!("head -c {FLOOD} /dev/zero | tr '\\0' x{redirect}"),
    );
    env.script("flood-lines", &format!("yes | head -c {FLOOD}{redirect}"));
    let server = env.serve();
    for script in ["flood-bytes", "flood-lines"] {
        let id = format!("{script}-{stream}");
        let response = server.request(
            "POST",
            &format!("/hooks/{script}"),
            &[("X-Request-Id", &id)],
            b"",
        );
        assert_eq!(response.status, 200, "{script}: {}", response.text());
        // Output lines carry our own id (the client's is only a field of the request's line).
        let id = response.json()["request_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let warning = server
            .wait_log(
                &format!("{id} {script}: output exceeded 64 KiB"),
                Duration::from_secs(10),
            )
            .unwrap_or_else(|| panic!("no overflow warning for {id}\n{}", server.log()));
        assert!(
            warning.contains(&format!(
                "; {} more bytes were read and not logged",
                FLOOD - BUDGET
            )),
            "every byte past the budget is counted: {warning}"
        );
        let prefix = format!("{id} {script}[{stream}]: ");
        let logged: usize = server
            .log()
            .lines()
            .filter_map(|l| l.split_once(&prefix))
            .map(|(_, text)| text.len())
            .sum();
        assert!(
            logged > 0 && logged as u64 <= BUDGET,
            "{script}: {logged} bytes of output logged"
        );
    }
    let peak = peak_rss_kib(server.child.id());
    assert!(
        peak < 64 << 10,
        "the daemon's peak memory reached {peak} KiB for a {stream} flood"
    );
}

#[test]
fn a_stdout_flood_is_read_to_the_end_logged_with_a_cap_and_counted() {
    flood("stdout");
}

#[test]
fn a_stderr_flood_is_read_to_the_end_logged_with_a_cap_and_counted() {
    flood("stderr");
}

#[test]
fn past_max_running_a_request_gets_503_with_retry_after_until_a_slot_frees() {
    let env = Env::new().config("max_running = 1\nqueue_wait = \"200ms\"");
    let started = env.path().join("started");
    let release = Release(env.path().join("release"));
    let pid = env.path().join("slow.pid");
    env.script(
        "slow",
        &format!(
            "echo $$ > {pid:?}\n{}",
            wait_for_release(&started, &release.0)
        ),
    );
    env.script("quick", "exit 0");
    let _cleanup = KillOnDrop(vec![pid]);
    let server = env.serve();
    std::thread::scope(|s| {
        let first = s.spawn(|| server.post("/hooks/slow", b""));
        assert!(
            wait_file(&started, Duration::from_secs(10)),
            "the first script did not start\n{}",
            server.log()
        );
        let busy = server.post("/hooks/quick", b"");
        assert_eq!(busy.status, 503, "the only slot is taken: {}", busy.text());
        assert!(
            busy.header("Retry-After")
                .is_some_and(|v| v.parse::<u32>().is_ok_and(|s| s > 0)),
            "503 carries Retry-After: {:?}",
            busy.headers
        );
        // Its line says what it was for, as a run's line does.
        assert!(
            server
                .wait_log(
                    "event=quick script=quick status=503",
                    Duration::from_secs(10)
                )
                .is_some(),
            "{}",
            server.log()
        );
        drop(release);
        let first = first.join().expect("first request");
        assert_eq!(first.status, 200, "{}", first.text());
    });
    let after = server.post("/hooks/quick", b"");
    assert_eq!(after.status, 200, "the slot was freed: {}", after.text());
}

#[test]
fn a_route_timeout_overrides_the_configured_one() {
    let env = Env::new().config("timeout = \"30s\"");
    env.script("slow.sh", "sleep 10");
    env.routes("Slow slow.sh timeout=1s\n");
    let server = env.serve();
    let started = Instant::now();
    let response = server.post("/hooks/Slow", b"");
    let elapsed = started.elapsed();
    assert_eq!(response.status, 504, "{}", response.text());
    assert_eq!(response.json()["timed_out"], true);
    assert!(
        elapsed < Duration::from_secs(8),
        "the route's 1s timeout applied, not 30s: answered after {elapsed:?}"
    );
}

#[test]
fn payload_files_are_removed_whatever_the_outcome() {
    let env = Env::new().config("timeout = \"3s\"\nkill_grace = \"1s\"");
    let seen = env.path().join("seen");
    fs::create_dir(&seen).expect("mkdir seen");
    // A script that runs records its payload file's name and what the payload directory held meanwhile.
    let record = |name: &str, then: &str| {
        env.script(
            name,
            &format!(
                "basename \"$1\" > {:?}\nls -A \"$(dirname \"$1\")\" > {:?}\n{then}",
                seen.join(format!("{name}.name")),
                seen.join(format!("{name}.ls"))
            ),
        );
    };
    record("ok", "exit 0");
    record("fail", "exit 1");
    record("hang", "sleep 30");
    record("killed", "kill -KILL $$");
    record("ok-again", "exit 0");
    // Scripts that cannot start: exec fails after the payload file was written.
    let no_interpreter = env.scripts().join("no-interpreter");
    fs::write(&no_interpreter, "#!/nonexistent/interpreter\n").expect("write");
    let not_executable = env.path().join("not-executable");
    fs::write(&not_executable, "").expect("write");
    let bad_interpreter = env.scripts().join("bad-interpreter");
    fs::write(
        &bad_interpreter,
        format!("#!{}\n", not_executable.display()),
    )
    .expect("write");
    // No #! line: the kernel cannot tell how to run it (a PHP shell_exec ran such scripts through sh).
    let no_shebang = env.scripts().join("no-shebang");
    fs::write(&no_shebang, "echo no shebang\n").expect("write");
    for script in [&no_interpreter, &bad_interpreter, &no_shebang] {
        fs::set_permissions(script, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let server = env.serve();
    let rows = [
        ("ok", 200, r#""exit_code":0"#),
        ("fail", 500, r#""exit_code":1"#),
        ("hang", 504, r#""timed_out":true"#),
        ("killed", 500, r#""signal":9"#),
        (
            "no-interpreter",
            500,
            "No such file or directory (os error 2) (the interpreter its #! line names is not there",
        ),
        (
            "bad-interpreter",
            500,
            "cannot run the script: Permission denied",
        ),
        (
            "no-shebang",
            500,
            "Exec format error (os error 8) (a script needs a #! line",
        ),
        ("ok-again", 200, r#""exit_code":0"#),
    ];
    for (script, status, says) in rows {
        let response = server.post(&format!("/hooks/{script}"), b"{\"a\":1}");
        assert_eq!(response.status, status, "{script}: {}", response.text());
        assert!(
            response.text().contains(says),
            "{script}: {}",
            response.text()
        );
        assert_eq!(payload_files(&env), [".lock"], "payload dir after {script}");
    }
    // Payload files are numbered in order, so the names the running scripts saw show that each request,
    // those whose script could not start included, had its own file before its outcome.
    for (n, (script, ..)) in rows.iter().enumerate() {
        let name = seen.join(format!("{script}.name"));
        if !name.exists() {
            assert!(
                script.ends_with("interpreter") || *script == "no-shebang",
                "{script} did not run"
            );
            continue;
        }
        let name = fs::read_to_string(&name).expect("payload name");
        // payload-RUN-N: RUN is this daemon's, N counts its requests.
        assert!(
            name.trim().starts_with("payload-") && name.trim().ends_with(&format!("-{n}")),
            "{script}'s payload file: {name}"
        );
        let listing = fs::read_to_string(seen.join(format!("{script}.ls"))).expect("listing");
        let mut expected = vec![".lock", name.trim()];
        expected.sort();
        assert_eq!(
            listing.lines().collect::<Vec<_>>(),
            expected,
            "while {script} ran, its payload file was in the payload dir"
        );
    }
}

/// The payload directory's names once `done` holds for them, or after 10 s.
fn wait_payload_files(env: &Env, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    wait_until(Duration::from_secs(10), || done(&payload_files(env)));
    payload_files(env)
}

#[test]
fn payload_files_of_spilled_and_refused_bodies_are_removed_too() {
    // Bodies over 256 KiB are written to their payload file while they arrive, before anything is decided;
    // a request turned away after its file exists must still leave nothing behind.
    let env = Env::new().config("max_body = \"512KiB\"\nmax_running = 1\nqueue_wait = \"200ms\"");
    let started = env.path().join("started");
    let release = Release(env.path().join("release"));
    env.script("slow", &wait_for_release(&started, &release.0));
    env.script("quick", "exit 0");
    let server = env.serve();

    // The client goes away in the middle of a spilled body.
    let mut stream = server.connect();
    let head = "POST /hooks/quick HTTP/1.1\r\nHost: t\r\nContent-Length: 500000\r\n\r\n";
    stream.write_all(head.as_bytes()).expect("head");
    stream
        .write_all(&vec![b'x'; 300 << 10])
        .expect("part of the body");
    // The spilled body is in a file that has no name until the request is routed (O_TMPFILE): the daemon
    // holds it open, and the directory shows nothing.
    let pid = server.child.id();
    assert!(
        wait_until(Duration::from_secs(10), || open_payload_files(pid, &env)
            == 1),
        "the body was spilled to a file the daemon holds open"
    );
    assert_eq!(
        payload_files(&env),
        [".lock"],
        "an unrouted body has no name in the directory"
    );
    drop(stream);
    assert!(
        wait_until(Duration::from_secs(10), || open_payload_files(pid, &env)
            == 0),
        "the spilled file is closed after the client left mid-body"
    );
    assert_eq!(
        payload_files(&env),
        [".lock"],
        "after the client left mid-body"
    );

    // A chunked body that passes max_body only after it was spilled: 413 mid-stream.
    let mut stream = server.connect();
    let mut request =
        b"POST /hooks/quick HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..2 {
        request.extend_from_slice(format!("{:x}\r\n", 300 << 10).as_bytes());
        request.extend_from_slice(&vec![b'y'; 300 << 10]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    // The server may stop reading at the 413, so the sending happens beside the reading.
    let writer = {
        let mut stream = stream.try_clone().expect("clone");
        std::thread::spawn(move || {
            let _ = stream.write_all(&request);
        })
    };
    let refused = Response::read(&mut stream).expect("an answer");
    assert_eq!(refused.status, 413, "{}", refused.text());
    drop(stream);
    writer.join().expect("writer");
    assert_eq!(
        wait_payload_files(&env, |names| names == [".lock"]),
        [".lock"],
        "after a 413 mid-stream"
    );

    // A request whose payload file was written, then found no free script slot: 503.
    std::thread::scope(|s| {
        let first = s.spawn(|| server.post("/hooks/slow", b"{\"a\":1}"));
        assert!(
            wait_file(&started, Duration::from_secs(10)),
            "slow did not start"
        );
        let busy = server.post("/hooks/quick", b"{\"a\":2}");
        assert_eq!(busy.status, 503, "{}", busy.text());
        assert_eq!(
            payload_files(&env).len(),
            2,
            "only the running script's payload file is left: {:?}",
            payload_files(&env)
        );
        drop(release);
        assert_eq!(first.join().expect("first").status, 200);
    });
    assert_eq!(payload_files(&env), [".lock"], "after the 503 and the 200");
}

/// Writes an executable `sh` script at `path`, which may be outside `scripts_dir`.
fn executable(path: &Path, body: &str) {
    fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod script");
}

#[test]
fn stdin_is_dev_null_and_a_read_from_it_ends_at_once() {
    let env = Env::new().config("timeout = \"5s\"");
    let out = env.path().join("stdin");
    env.script(
        "reader",
        &format!("readlink /proc/$$/fd/0 > {out:?}\nhead -c 100 | wc -c >> {out:?}"),
    );
    // The daemon's own stdin is a pipe with data in it whose write end stays open: a script that inherited
    // it, or got a pipe of its own, would read that data or block until its timeout.
    let mut server = env.serve_with(|command| {
        command.stdin(Stdio::piped());
    });
    let mut daemon_stdin = server.child.stdin.take().expect("daemon stdin");
    daemon_stdin
        .write_all(b"the daemon's own stdin\n")
        .expect("write to the daemon's stdin");
    let response = server.post("/hooks/reader", b"{}");
    assert_eq!(response.status, 200, "{}", response.text());
    let seen = fs::read_to_string(&out).expect("what the script saw");
    let seen: Vec<&str> = seen.lines().map(str::trim).collect();
    assert_eq!(
        seen,
        ["/dev/null", "0"],
        "stdin is /dev/null and reading it gives nothing"
    );
    drop(daemon_stdin);
}

#[test]
fn event_template_takes_the_exact_name_else_the_first_case_variant_in_byte_order() {
    let env = Env::new();
    // Byte order: EVENT < EVent < Event < event. The ones expected below are created neither first nor
    // last, so taking a directory listing in creation order, or in its reverse, would pick another.
    for name in ["Event", "EVENT", "EVent", "event"] {
        env.script(name, "exit 0");
    }
    env.routes("* {event}\n");
    let server = env.serve();
    let script = |event: &str| {
        let response = server.post(&format!("/hooks/{event}"), b"");
        assert_eq!(response.status, 200, "{event}: {}", response.text());
        response.json()["script"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        script("eVENT"),
        "EVENT",
        "no exact name: the first in byte order"
    );
    for exact in ["EVent", "Event", "event"] {
        assert_eq!(script(exact), exact, "the exact name wins");
    }
    fs::remove_file(env.scripts().join("EVENT")).expect("rm EVENT");
    assert_eq!(script("eVENT"), "EVent", "the next in byte order");
    assert_eq!(
        script("EVENT"),
        "EVent",
        "a name gone is matched ignoring case"
    );
}

#[test]
fn an_absolute_script_outside_scripts_dir_runs_and_a_relative_one_may_not_leave_it() {
    let env = Env::new();
    let elsewhere = env.path().join("elsewhere");
    fs::create_dir(&elsewhere).expect("mkdir");
    let ran = env.path().join("ran");
    executable(
        &elsewhere.join("abs.sh"),
        &format!("echo abs.sh >> {ran:?}"),
    );
    executable(
        &elsewhere.join("Templated"),
        &format!("echo Templated >> {ran:?}"),
    );
    env.routes("Rel ../elsewhere/abs.sh\n");
    let check = env.check();
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(
        !check.status.success() && stderr.contains(":1:") && stderr.contains("outside scripts_dir"),
        "a relative path that leaves scripts_dir is refused: {stderr}"
    );
    env.routes(&format!(
        "Abs {}\nTemplated {}\n",
        elsewhere.join("abs.sh").display(),
        elsewhere.join("{event}").display()
    ));
    let server = env.serve();
    for event in ["Abs", "Templated"] {
        let response = server.post(&format!("/hooks/{event}"), b"");
        assert_eq!(response.status, 200, "{event}: {}", response.text());
    }
    assert_eq!(
        fs::read_to_string(&ran)
            .expect("ran")
            .lines()
            .collect::<Vec<_>>(),
        ["abs.sh", "Templated"]
    );
}

#[test]
fn an_event_symlink_leaving_scripts_dir_is_refused_per_request_and_one_inside_is_followed() {
    use std::os::unix::fs::symlink;
    let env = Env::new();
    let elsewhere = env.path().join("elsewhere");
    fs::create_dir(&elsewhere).expect("mkdir");
    let escaped = env.path().join("escaped");
    executable(&elsewhere.join("evil"), &format!("touch {escaped:?}"));
    fs::create_dir(env.scripts().join("sub")).expect("mkdir sub");
    let inside = env.path().join("inside");
    env.script("sub/real", &format!("touch {inside:?}"));
    symlink("sub/real", env.scripts().join("Inside")).expect("symlink");
    symlink(elsewhere.join("evil"), env.scripts().join("Absolute")).expect("symlink");
    symlink("../elsewhere/evil", env.scripts().join("Relative")).expect("symlink");
    env.routes("* {event}\n");
    let server = env.serve();

    let response = server.post("/hooks/Inside", b"");
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["script"], "Inside");
    assert!(
        inside.exists(),
        "the symlink inside scripts_dir was followed"
    );

    let refused = |event: &str| {
        let response = server.post(&format!("/hooks/{event}"), b"");
        assert_eq!(response.status, 500, "{event}: {}", response.text());
        let error = response.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            error.contains(&format!("script \"{event}\"")) && error.contains("outside scripts_dir"),
            "{event}: {error}"
        );
    };
    refused("Absolute");
    refused("Relative");
    // Retargeted while the daemon runs: templates are checked on each request, not when routes load.
    fs::remove_file(env.scripts().join("Inside")).expect("rm");
    symlink(elsewhere.join("evil"), env.scripts().join("Inside")).expect("symlink");
    refused("Inside");
    assert!(!escaped.exists(), "no script outside scripts_dir ran");
}

#[test]
fn a_script_that_cannot_start_is_500_saying_why() {
    let env = Env::new();
    let script = env.scripts().join("broken");
    fs::write(&script, "#!/nonexistent/interpreter\n").expect("write");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");
    let server = env.serve();
    let response = server.post("/hooks/broken", b"");
    assert_eq!(response.status, 500, "{}", response.text());
    let error = response.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("cannot run the script: No such file or directory"),
        "{error}"
    );
    assert!(
        server
            .wait_log("cannot run the script", Duration::from_secs(5))
            .is_some_and(|line| line.contains(" ERROR ")),
        "logged as an error:\n{}",
        server.log()
    );
}

/// Posts to `/hooks/busy` while the test holds `script` open for writing (which makes exec fail with
/// ETXTBSY), and releases it once the daemon has said it is retrying and `hold` has passed, or, with no
/// `hold`, only after the answer.
/// Also returns how long after the daemon logged the busy spawn the script was released.
fn run_while_busy(server: &Server, script: &Path, hold: Option<Duration>) -> (Response, Duration) {
    let writer = fs::OpenOptions::new()
        .append(true)
        .open(script)
        .expect("open the script for writing");
    std::thread::scope(|s| {
        let request = s.spawn(|| server.post("/hooks/busy", b""));
        let line = server
            .wait_log("busy: text file busy", Duration::from_secs(10))
            .unwrap_or_else(|| panic!("the spawn never met the busy script\n{}", server.log()));
        let logged = line
            .split_whitespace()
            .next()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .expect("a timestamp at the head of the line");
        let release = |writer: fs::File| {
            drop(writer);
            std::time::SystemTime::now()
                .duration_since(logged)
                .unwrap_or_default()
        };
        match hold {
            Some(hold) => {
                std::thread::sleep(hold);
                let after = release(writer);
                (request.join().expect("request thread"), after)
            }
            None => {
                let response = request.join().expect("request thread");
                (response, release(writer))
            }
        }
    })
}

#[test]
fn a_script_being_written_is_retried_and_runs_once_it_is_closed() {
    let env = Env::new();
    let ran = env.path().join("ran");
    let script = env.script("busy", &format!("touch {ran:?}"));
    // Closed as soon as the busy spawn is logged: the daemon retries for about 0.6 s from then. A machine
    // so busy that the test let go only after 0.4 s may have let the retries run out: that try proves
    // nothing, and is made again, on a daemon of its own (its log is read from the start).
    let mut tries = 0;
    let (response, server) = loop {
        tries += 1;
        let server = env.serve();
        let (response, after) = run_while_busy(&server, &script, Some(Duration::ZERO));
        if response.status == 200 || after < Duration::from_millis(400) || tries == 3 {
            break (response, server);
        }
    };
    assert_eq!(
        response.status,
        200,
        "{}\n{}",
        response.text(),
        server.log()
    );
    assert!(ran.exists(), "the script ran");
}

#[test]
fn a_script_busy_for_longer_than_the_retries_is_500_saying_so() {
    // The retries pause 5 ms doubling to 320 ms, 635 ms in all (runner::spawn): a script held open past that
    // is answered while it is still held.
    let env = Env::new();
    let script = env.script("busy", "exit 0");
    let server = env.serve();
    let (response, _) = run_while_busy(&server, &script, None);
    assert_eq!(response.status, 500, "{}", response.text());
    assert!(
        response
            .text()
            .contains("cannot run the script: Text file busy"),
        "{}",
        response.text()
    );
}

#[test]
fn out_of_descriptors_storing_the_payload_or_starting_the_script_is_503() {
    use rustix::process::{Pid, Resource, Rlimit, getrlimit, prlimit};
    let env = Env::new();
    // A fixed script: selecting it opens no descriptor, so the request's first one is its payload file.
    env.script("quick.sh", "exit 0");
    env.routes("Quick quick.sh\n");
    let server = env.serve();
    let pid = server.child.id();
    let daemon = Pid::from_raw(pid as i32).expect("daemon pid");
    let own = getrlimit(Resource::Nofile);
    let set_limit = |current: Option<u64>| {
        let limit = Rlimit {
            current,
            maximum: own.maximum,
        };
        prlimit(Some(daemon), Resource::Nofile, limit).expect("prlimit");
    };
    // RLIMIT_NOFILE binds root too, and lowering a child's soft limit needs no privilege. Requests go over a
    // keep-alive connection that is already open, so no accept needs a descriptor; the k-th request may open
    // k descriptors before the next one fails.
    let mut refusals = Vec::new();
    let mut stream = None;
    let mut ran = false;
    for k in 0..16 {
        set_limit(own.current);
        let conn = stream.get_or_insert_with(|| {
            let mut conn = server.connect();
            send(&mut conn, "GET", "/healthz", &[], b"", false);
            let ready = Response::read(&mut conn).expect("healthz");
            assert_eq!(ready.status, 200);
            conn
        });
        let idle = crate::util::open_fds(pid);
        let lowest_free = (0..).find(|n| !idle.contains(n)).expect("a free number");
        set_limit(Some(u64::from(lowest_free + k)));
        send(conn, "POST", "/hooks/Quick", &[], b"{}", false);
        let response = Response::read(conn).expect("an answer");
        if response
            .header("Connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            stream = None;
        }
        assert!(
            wait_until(Duration::from_secs(5), || crate::util::open_fds(pid).len()
                <= idle.len()),
            "the request's descriptors were all closed"
        );
        assert_eq!(payload_files(&env), [".lock"], "no payload file is left");
        if response.status == 200 {
            ran = true;
            break;
        }
        assert_eq!(response.status, 503, "{}", response.text());
        assert_eq!(response.header("Retry-After"), Some("1"));
        refusals.push(
            response.json()["error"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert!(
        ran,
        "the script ran once it had descriptors enough: {refusals:?}"
    );
    assert_eq!(
        refusals.first().map(String::as_str),
        Some("cannot store the payload: Too many open files (os error 24)"),
        "{refusals:?}"
    );
    assert!(
        refusals.len() > 1
            && refusals[1..]
                .iter()
                .all(|r| r == "cannot run the script: Too many open files (os error 24)"),
        "{refusals:?}"
    );
}

/// Starts `command` under a file-size limit of `bytes` (`ulimit -f`).
fn limit_file_size(command: &mut std::process::Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is an async-signal-safe system call. SIGXFSZ keeps its default action (end the
    // process): the daemon must handle it itself for a write past the limit to fail with EFBIG instead.
    unsafe {
        command.pre_exec(move || {
            let limit = rustix::process::Rlimit {
                current: Some(bytes),
                maximum: Some(bytes),
            };
            Ok(rustix::process::setrlimit(
                rustix::process::Resource::Fsize,
                limit,
            )?)
        });
    }
}

#[test]
fn a_payload_past_the_file_size_limit_is_500_and_leaves_no_file() {
    // Without the history, so that no store has to fit under the limit (its schema alone takes more).
    let env = Env::new().config("history = false");
    env.script("quick", "exit 0");
    let server = env.serve_with(|command| limit_file_size(command, 64 << 10));
    // Over 64 KiB and under 256 KiB, so it is written in one piece once the route is chosen.
    let response = server.post("/hooks/quick", &vec![b'x'; 100 << 10]);
    assert_eq!(response.status, 500, "{}", response.text());
    assert_eq!(
        response.json()["error"],
        "cannot store the payload: File too large (os error 27)"
    );
    assert_eq!(
        payload_files(&env),
        [".lock"],
        "the partial file is removed"
    );
    let small = server.post("/hooks/quick", b"{}");
    assert_eq!(
        small.status,
        200,
        "the daemon still serves: {}",
        small.text()
    );
    // A store that cannot grow under the limit at start is an error that says so, not a silent death by
    // SIGXFSZ.
    let env = Env::new();
    env.script("quick", "exit 0");
    let mut command = env.serve_command("127.0.0.1:0");
    limit_file_size(&mut command, 4 << 10);
    let mut refused = crate::util::Server::spawn(command);
    let status = refused
        .wait_exit(Duration::from_secs(10))
        .expect("serve exits");
    assert_eq!(status.code(), Some(1), "{status:?}: {}", refused.log());
    assert!(refused.log().contains("ERROR store: "), "{}", refused.log());
}

/// Shell lines that start `command` in its own session (`setsid -f`) with the script's stdout, publish its
/// pid in `file`, and wait until it has: only then has it left the script's group. (Without the wait, a
/// script that exits at once can have its group killed before the forked child has called setsid.)
fn detached(command: &str, file: &Path) -> String {
    format!(
        "setsid -f sh -c 'echo $$ > \"$0.tmp\"; mv \"$0.tmp\" \"$0\"; exec {command}' {file:?}\n\
         i=0\nwhile [ ! -e {file:?} ] && [ $i -lt 1000 ]; do sleep 0.01; i=$((i+1)); done"
    )
}

#[test]
fn a_setsid_survivor_holding_stdout_does_not_hold_the_answer() {
    let env = Env::new();
    let quiet = env.path().join("quiet.pid");
    let loud = env.path().join("loud.pid");
    env.script("quiet", &detached("sleep 30", &quiet));
    // Still writing when the script exits: reading its pipe to the end would never end.
    env.script(
        "loud",
        &format!("{}\nsleep 0.3", detached("yes flood", &loud)),
    );
    let _cleanup = KillOnDrop(vec![quiet.clone(), loud.clone()]);
    let server = env.serve();
    for (script, pid_file) in [("quiet", &quiet), ("loud", &loud)] {
        let started = Instant::now();
        let response = server.post(&format!("/hooks/{script}"), b"");
        let took = started.elapsed();
        assert_eq!(response.status, 200, "{script}: {}", response.text());
        assert!(
            took < Duration::from_secs(10),
            "{script}: answered after {took:?}, as if waiting for the survivor's end of stdout"
        );
        assert!(pid_file.exists(), "{script}: no survivor");
        let pid = read_pid(pid_file);
        if script == "quiet" {
            assert!(
                alive(pid),
                "a process in its own session outlives the request"
            );
        } else {
            assert!(
                server
                    .wait_log("loud: output exceeded 64 KiB", Duration::from_secs(5))
                    .is_some(),
                "the survivor was flooding the script's stdout\n{}",
                server.log()
            );
            assert!(
                wait_gone(pid, GONE),
                "once the answer is out its pipe is closed, and the writer ends on SIGPIPE"
            );
        }
    }
}

#[test]
fn payload_dir_defaults_to_runtime_directory_else_tmpdir() {
    let uid = rustix::process::getuid().as_raw();
    let env = Env::new().default_payload_dir();
    let tmp = env.path().join("tmp");
    fs::create_dir(&tmp).expect("mkdir tmp");
    let seen = env.path().join("seen");
    env.script("where", &format!("dirname \"$1\" > {seen:?}"));
    let runtime = env.path().join("runtime");
    let other = env.path().join("other");
    for (runtime_directory, expected) in [
        (None, tmp.join(format!("hookrunner-{uid}"))),
        // systemd lists one directory per RuntimeDirectory= entry; the first is ours.
        (
            Some(format!("{}:{}", runtime.display(), other.display())),
            runtime.clone(),
        ),
    ] {
        let server = env.serve_with(|command| {
            command.env("TMPDIR", &tmp);
            match &runtime_directory {
                Some(dir) => command.env("RUNTIME_DIRECTORY", dir),
                None => command.env_remove("RUNTIME_DIRECTORY"),
            };
        });
        assert!(
            server
                .wait_log(
                    &format!("payloads in {}", expected.display()),
                    Duration::from_secs(5)
                )
                .is_some(),
            "{runtime_directory:?}:\n{}",
            server.log()
        );
        let response = server.post("/hooks/where", b"");
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(
            fs::read_to_string(&seen).expect("seen").trim(),
            expected.display().to_string()
        );
        let meta = fs::metadata(&expected).expect("payload dir");
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    }
    assert!(!other.exists(), "only the first RUNTIME_DIRECTORY is used");
}

/// Starts the daemon expecting it to exit at once with 78, a configuration error: a restart cannot give a
/// directory back (systemd does not restart it). Returns the exited daemon.
fn exits_78(env: &Env) -> Server {
    let mut server = Server::spawn(env.serve_command("127.0.0.1:0"));
    let status = server
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the daemon did not exit\n{}", server.log()));
    assert_eq!(status.code(), Some(78), "{}", server.log());
    server
}

/// Starts the daemon expecting it to refuse to start on its payload directory; returns its log.
fn refused_at_start(env: &Env) -> String {
    let server = exits_78(env);
    // Its stderr may still be on its way to the collecting thread.
    server.wait_log("payload directory", Duration::from_secs(5));
    let log = server.log();
    assert!(!log.contains("listening on"), "{log}");
    log
}

/// `sudo hookrunner serve` beside the service (whose state_dir, and payload_dir in it, are its user's) is
/// refused on the state_dir before it makes the payload directory as root, which the service could then
/// not use.
#[test]
fn a_start_refused_on_another_users_state_dir_makes_no_payload_directory() {
    use std::os::unix::fs::PermissionsExt;
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: only root can give a directory to another user");
        return;
    }
    let env = Env::new().default_payload_dir();
    let inside = env.state().join("payloads");
    let env = env.config(&format!("payload_dir = {inside:?}"));
    fs::create_dir(env.state()).expect("mkdir state");
    fs::set_permissions(env.state(), fs::Permissions::from_mode(0o700)).expect("chmod");
    std::os::unix::fs::chown(env.state(), Some(65534), Some(65534)).expect("chown");
    let server = exits_78(&env);
    assert!(
        !inside.exists(),
        "{} was made\n{}",
        inside.display(),
        server.log()
    );
}

#[test]
fn payload_dir_is_made_private_and_one_not_ours_is_refused_at_start() {
    let env = Env::new();
    fs::create_dir(env.payloads()).expect("mkdir payloads");
    fs::set_permissions(env.payloads(), fs::Permissions::from_mode(0o755)).expect("chmod");
    drop(env.serve());
    let mode = fs::metadata(env.payloads())
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o700,
        "an existing 0755 directory is made 0700"
    );

    fs::remove_dir_all(env.payloads()).expect("rm");
    fs::write(env.payloads(), "").expect("a file where the directory should be");
    let log = refused_at_start(&env);
    assert!(log.contains("must be a directory owned by uid"), "{log}");

    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped the other-owner case: only root can give a directory to another user");
        return;
    }
    fs::remove_file(env.payloads()).expect("rm");
    fs::create_dir(env.payloads()).expect("mkdir payloads");
    fs::set_permissions(env.payloads(), fs::Permissions::from_mode(0o700)).expect("chmod");
    // 65534: nobody.
    std::os::unix::fs::chown(env.payloads(), Some(65534), Some(65534)).expect("chown");
    let log = refused_at_start(&env);
    assert!(
        log.contains(&format!(
            "payload_dir {} must be a directory owned by uid 0",
            env.payloads().display()
        )),
        "{log}"
    );
}
