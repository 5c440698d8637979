//! Running scripts: deadlines on the whole process group, leftovers ended, output floods logged with a cap,
//! the concurrency limit, and payload files that never outlive their request.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::{
    Env, KillOnDrop, Release, Response, Server, alive, payload_files, read_pid, wait_file,
    wait_for_release, wait_gone, wait_until,
};

/// How long a killed process may take to disappear.
const GONE: Duration = Duration::from_secs(5);
/// Scripts here sleep 30 s; their groups must be gone well before, 2 s after the start (timeout + grace).
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
    let env = Env::new().config("timeout = \"1s\"\nkill_grace = \"1s\"");
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
        "hang: timed out after 1s; sending SIGTERM",
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
    let env = Env::new().config("timeout = \"1s\"\nkill_grace = \"1s\"");
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
        "hang: timed out after 1s; sending SIGTERM",
        &grandchild,
        started,
    );
    assert_eq!(payload_files(&env), [".lock"], "no payload file is left");
}

#[test]
fn a_script_ignoring_sigterm_is_killed_after_the_grace() {
    let env = Env::new().config("timeout = \"1s\"\nkill_grace = \"1s\"");
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
    let env = Env::new().config("timeout = \"1s\"\nkill_grace = \"1s\"");
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
    record("hang", "sleep 5");
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
    for script in [&no_interpreter, &bad_interpreter] {
        fs::set_permissions(script, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let server = env.serve();
    let rows = [
        ("ok", 200, r#""exit_code":0"#),
        ("fail", 500, r#""exit_code":1"#),
        ("hang", 504, r#""timed_out":true"#),
        ("killed", 500, r#""signal":9"#),
        ("no-interpreter", 500, "cannot run the script: No such file"),
        (
            "bad-interpreter",
            500,
            "cannot run the script: Permission denied",
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
            assert!(script.ends_with("interpreter"), "{script} did not run");
            continue;
        }
        let name = fs::read_to_string(&name).expect("payload name");
        assert_eq!(
            name.trim(),
            format!("payload-{n}"),
            "{script}'s payload file"
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
    let spilled = wait_payload_files(&env, |names| names.len() == 2);
    assert_eq!(
        spilled.len(),
        2,
        "the body was spilled to a file: {spilled:?}"
    );
    drop(stream);
    assert_eq!(
        wait_payload_files(&env, |names| names == [".lock"]),
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
