//! The configuration's ranges, refused outside and accepted at both ends, and where the routes come from
//! when the configuration names none.

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::{BIN, Env, Response, Server};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `hookrunner check` on an env whose config ends with `setting`, and the line `setting` starts on.
fn check_setting(setting: &str) -> (Output, usize) {
    // A comment first, so that an error placed on the table's first line, not the key's, is caught.
    let env = Env::new()
        .config("# the setting under test:")
        .config(setting);
    let text = fs::read_to_string(env.config_path()).expect("read config");
    let first = setting.lines().next().expect("a setting");
    let line = text
        .lines()
        .position(|l| l == first)
        .expect("setting written")
        + 1;
    (env.check(), line)
}

/// `setting` is refused: exit 78, on its own line, with a message naming `key` and containing `range`.
fn refused(setting: &str, key: &str, range: &str) {
    let (out, line) = check_setting(setting);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(78),
        "{setting:?} was accepted: {err}"
    );
    let Some((_, message)) = err.split_once(&format!("hookrunner.toml:{line}: ")) else {
        panic!("{setting:?}: not on line {line}: {err}");
    };
    assert!(
        message.contains(key) && message.contains(range),
        "{setting:?}: {key} or {range:?} not named: {err}"
    );
}

fn accepted(setting: &str) {
    let (out, _) = check_setting(setting);
    assert!(
        out.status.success(),
        "{setting:?} was refused: {}",
        stderr(&out)
    );
}

#[test]
fn timeout_is_100ms_to_24h() {
    let (out, _) = check_setting("timeout = \"0s\"");
    assert!(
        stderr(&out).contains("timeout = 0s is out of range: use 100ms to 24h"),
        "{}",
        stderr(&out)
    );
    for bad in ["0s", "99ms", "86400001ms", "25h"] {
        refused(&format!("timeout = \"{bad}\""), "timeout", "100ms to 24h");
    }
    accepted("timeout = \"100ms\"");
    accepted("timeout = \"24h\"");
}

#[test]
fn a_routes_timeout_has_the_same_range_as_the_key() {
    let env = Env::new();
    env.script("a.sh", "exit 0");
    for bad in ["0s", "99ms", "25h"] {
        env.routes(&format!("# first\na a.sh timeout={bad}\n"));
        let out = env.check();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(78), "timeout={bad}: {err}");
        assert!(
            err.contains(&format!(
                "routes:2: timeout={bad} is out of range: use 100ms to 24h"
            )),
            "{err}"
        );
    }
    env.routes("a a.sh timeout=100ms\nb a.sh timeout=24h\n");
    let out = env.check();
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("timeout=100ms") && table.contains("timeout=24h"),
        "{table}"
    );
}

#[test]
fn kill_grace_is_0s_to_1h() {
    for bad in ["3600001ms", "61m", "2h"] {
        refused(&format!("kill_grace = \"{bad}\""), "kill_grace", "0s to 1h");
    }
    accepted("kill_grace = \"0s\"");
    accepted("kill_grace = \"1h\"");
}

#[test]
fn max_running_is_1_to_4096() {
    for bad in ["0", "-1", "4097", "9223372036854775807"] {
        refused(&format!("max_running = {bad}"), "max_running", "1 to 4096");
    }
    accepted("max_running = 1");
    accepted("max_running = 4096");
    // In quotes it is a string: said in the operator's words, not serde's ("expected i64").
    refused(
        "max_running = \"32\"",
        "max_running",
        "expected a whole number (without quotes)",
    );
}

#[test]
fn queue_wait_is_0s_to_1h() {
    for bad in ["3600001ms", "2h"] {
        refused(&format!("queue_wait = \"{bad}\""), "queue_wait", "0s to 1h");
    }
    accepted("queue_wait = \"0s\"");
    accepted("queue_wait = \"1h\"");
}

#[test]
fn max_connections_is_1_to_16384() {
    for bad in ["0", "-5", "16385"] {
        refused(
            &format!("max_connections = {bad}"),
            "max_connections",
            "1 to 16384",
        );
    }
    accepted("max_connections = 1");
    accepted("max_connections = 16384");
}

#[test]
fn max_body_is_0_to_64gib() {
    for bad in ["-1", "68719476737", "\"65GiB\"", "\"1024GiB\""] {
        refused(&format!("max_body = {bad}"), "max_body", "0 to 64GiB");
    }
    accepted("max_body = 0");
    accepted("max_body = \"64GiB\"");
    accepted("max_body = 68719476736");
}

#[test]
fn max_header_bytes_is_1kib_to_1mib() {
    let (out, _) = check_setting("max_header_bytes = \"1024GiB\"");
    assert!(
        stderr(&out).contains("max_header_bytes = 1024GiB is out of range: use 1KiB to 1MiB"),
        "{}",
        stderr(&out)
    );
    for bad in ["0", "1023", "-1", "\"1025KiB\"", "\"1024GiB\""] {
        refused(
            &format!("max_header_bytes = {bad}"),
            "max_header_bytes",
            "1KiB to 1MiB",
        );
    }
    accepted("max_header_bytes = 1024");
    accepted("max_header_bytes = \"1KiB\"");
    accepted("max_header_bytes = \"1MiB\"");
}

#[test]
fn header_timeout_is_100ms_to_1h() {
    for bad in ["0s", "99ms", "61m"] {
        refused(
            &format!("header_timeout = \"{bad}\""),
            "header_timeout",
            "100ms to 1h",
        );
    }
    accepted("header_timeout = \"100ms\"");
    accepted("header_timeout = \"1h\"");
}

#[test]
fn keepalive_timeout_is_100ms_to_1h() {
    for bad in ["0s", "99ms", "61m"] {
        refused(
            &format!("keepalive_timeout = \"{bad}\""),
            "keepalive_timeout",
            "100ms to 1h",
        );
    }
    accepted("keepalive_timeout = \"100ms\"");
    accepted("keepalive_timeout = \"1h\"");
}

#[test]
fn event_lists_1_to_64_sources() {
    refused("event = []", "event", "1 to 64");
    // A list over several lines is placed on the key's line.
    refused("event = [\n]", "event", "1 to 64");
    let list = |n: usize| {
        let sources: Vec<String> = (0..n).map(|i| format!("\"header:X-E{i}\"")).collect();
        format!("event = [{}]", sources.join(", "))
    };
    refused(&list(65), "event", "1 to 64");
    accepted(&list(1));
    accepted(&list(64));
}

#[test]
fn listen_takes_a_port_to_65535_or_a_short_absolute_unix_path() {
    for bad in ["127.0.0.1:65536", "127.0.0.1:-1", "127.0.0.1", ":80"] {
        refused(&format!("listen = \"{bad}\""), "listen", "0 to 65535");
    }
    refused("listen = \"unix:hook.sock\"", "listen", "absolute");
    let longest = format!("/{}", "s".repeat(106));
    let too_long = format!("/{}", "s".repeat(107));
    refused(
        &format!("listen = \"unix:{too_long}\""),
        "listen",
        "at most 107",
    );
    accepted(&format!("listen = \"unix:{longest}\""));
    accepted("listen = \"127.0.0.1:0\"");
    accepted("listen = \"127.0.0.1:65535\"");
}

/// Errors land on the line that caused them: a table line may end in a comment, and a top-level key set
/// again below a table belongs to that table, so its error is there, not on the first line setting it.
#[test]
fn an_error_is_placed_on_its_own_line_past_comments_and_tables() {
    let (out, line) = check_setting(
        "[[sender]]   # jamf\nname = \"jamf\"\ntype = \"basic\"\nuser = \"u\"\npassword_file = \"/nonexistent\"",
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    // On the line of the key the message is about, in the table the comment ends.
    assert!(
        err.contains(&format!(
            "hookrunner.toml:{}: sender \"jamf\": password_file",
            line + 4
        )),
        "{err}"
    );
    let (out, line) = check_setting(
        "max_body = \"1MiB\"\n[[sender]]\nname = \"y\"\ntype = \"none\"\nallow_ips = [\"10.0.0.0/8\"]\nmax_body = \"2MiB\"",
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains(&format!(
            "hookrunner.toml:{}: sender: unknown field `max_body`",
            line + 5
        )),
        "{err}"
    );
}

#[test]
fn the_paths_must_name_something_usable() {
    // Env's config sets scripts_dir and payload_dir itself: write these configs by hand.
    let dir = tempfile::tempdir().expect("tempdir");
    fs::create_dir(dir.path().join("scripts")).expect("scripts dir");
    fs::write(dir.path().join("plain-file"), "").expect("write file");
    let config = dir.path().join("hookrunner.toml");
    let scripts = "scripts_dir = \"scripts\"";
    let payloads = "payload_dir = \"payloads\"";
    for (lines, want) in [
        (
            [scripts, payloads, "routes = \"\""],
            "hookrunner.toml:3: routes is empty",
        ),
        (
            [scripts, "payload_dir = \"\"", "# end"],
            "hookrunner.toml:2: payload_dir is empty",
        ),
        (
            ["# start", payloads, "scripts_dir = \"\""],
            "hookrunner.toml:3: scripts_dir is empty",
        ),
        (
            [payloads, "# start", "scripts_dir = \"plain-file\""],
            "hookrunner.toml:3: scripts_dir",
        ),
        (
            [payloads, "# start", "scripts_dir = \"none\""],
            "hookrunner.toml:3: scripts_dir",
        ),
        (
            [scripts, payloads, "routes = \"missing\""],
            "hookrunner.toml:3: routes ",
        ),
        // Created at start, but not their directories: found here, not by a start that exits 1.
        (
            [
                scripts,
                "payload_dir = \"/nonexistent-hookrunner-test/payloads\"",
                "# end",
            ],
            "hookrunner.toml:2: payload_dir /nonexistent-hookrunner-test/payloads: its directory \
             /nonexistent-hookrunner-test does not exist",
        ),
        (
            [
                scripts,
                payloads,
                "log_file = \"/nonexistent-hookrunner-test/hookrunner.log\"",
            ],
            "hookrunner.toml:3: log_file /nonexistent-hookrunner-test/hookrunner.log: its directory",
        ),
    ] {
        fs::write(&config, lines.join("\n")).expect("write config");
        let out = check(&config);
        assert_eq!(out.status.code(), Some(78), "{lines:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{lines:?}: {}", stderr(&out));
    }
    fs::write(
        &config,
        format!("{payloads}\nscripts_dir = \"plain-file\"\n"),
    )
    .expect("write");
    assert!(stderr(&check(&config)).contains("is not a directory"));
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .arg("--scripts-dir")
        .arg(dir.path().join("plain-file"))
        .output()
        .expect("run check");
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("--scripts-dir") && stderr(&out).contains("is not a directory"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn payload_dir_may_not_hold_what_its_start_up_cleaning_would_remove() {
    // Env's config sets scripts_dir and payload_dir itself: write these configs by hand.
    let dir = tempfile::tempdir().expect("tempdir");
    let scripts = dir.path().join("scripts");
    fs::create_dir(&scripts).expect("scripts dir");
    let config = dir.path().join("hookrunner.toml");
    for (payload_dir, what) in [
        (".", "the configuration file"),
        ("scripts", "scripts_dir"),
        ("..", "the configuration file"),
    ] {
        fs::write(
            &config,
            format!("scripts_dir = \"scripts\"\n\npayload_dir = \"{payload_dir}\"\n"),
        )
        .expect("write config");
        let out = check(&config);
        assert_eq!(out.status.code(), Some(78), "{payload_dir}");
        assert!(
            stderr(&out).contains("hookrunner.toml:3: payload_dir")
                && stderr(&out).contains(&format!("holds {what}")),
            "{payload_dir}: {}",
            stderr(&out)
        );
    }
    let elsewhere = tempfile::tempdir().expect("tempdir");
    fs::write(elsewhere.path().join("routes"), "* {event}\n").expect("write routes");
    fs::write(
        &config,
        format!(
            "scripts_dir = \"scripts\"\nroutes = {:?}\npayload_dir = {:?}\n",
            elsewhere.path().join("routes"),
            elsewhere.path()
        ),
    )
    .expect("write config");
    let out = check(&config);
    assert!(
        stderr(&out).contains("hookrunner.toml:3: payload_dir")
            && stderr(&out).contains("holds the routes file"),
        "{}",
        stderr(&out)
    );
    fs::write(
        &config,
        "scripts_dir = \"scripts\"\npayload_dir = \"payloads\"\n",
    )
    .expect("write config");
    let out = check(&config);
    assert!(out.status.success(), "{}", stderr(&out));
    // A file of someone else's in it: what the start would refuse, `check` refuses, and `serve` exits 78
    // (a configuration error, which systemd does not restart) rather than 1.
    fs::create_dir(dir.path().join("payloads")).expect("payloads");
    fs::write(dir.path().join("payloads").join("foreign.txt"), "x").expect("foreign");
    let out = check(&config);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("hookrunner.toml:2: payload_dir")
            && stderr(&out).contains("holds \"foreign.txt\""),
        "{}",
        stderr(&out)
    );
    let served = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env("STATE_DIRECTORY", dir.path().join("state"))
        .output()
        .expect("run serve");
    assert_eq!(served.status.code(), Some(78), "{}", stderr(&served));
    assert!(
        dir.path().join("payloads").join("foreign.txt").exists(),
        "left as it was"
    );
}

/// What decides what runs as the daemon's user, when others can write it, is warned about: a scripts_dir
/// (whoever can write there can add a script that passes every check on the file itself), the routes
/// file, the config file, and state_dir (a store put there runs its queued entries), a sticky directory
/// too (others can still add files to it).
#[test]
fn check_warns_of_what_decides_what_runs_when_others_can_write_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let scripts = dir.path().join("scripts");
    fs::create_dir(&scripts).expect("scripts dir");
    let state = dir.path().join("state");
    fs::create_dir(&state).expect("state dir");
    let routes = dir.path().join("routes");
    fs::write(&routes, "* {event}\n").expect("routes");
    let config = dir.path().join("hookrunner.toml");
    fs::write(
        &config,
        "scripts_dir = \"scripts\"\npayload_dir = \"payloads\"\nstate_dir = \"state\"\n\
         routes = \"routes\"\nhistory = false\n",
    )
    .expect("config");
    // With no store to open (no history, nothing async): where one is opened, such a state_dir is an
    // error (store::a_store_others_can_write_is_refused_at_start).
    for (what, path, dir) in [
        ("scripts_dir", &scripts, true),
        ("state_dir", &state, true),
        ("the routes file", &routes, false),
        ("the configuration file", &config, false),
    ] {
        let usual = if dir { 0o755 } else { 0o644 };
        for (mode, warned) in [
            (usual, None),
            (usual | 0o020, Some("its group")),
            (usual | 0o022, Some("anyone")),
            // Sticky: others cannot replace what is there, but they can add to it.
            (0o1777, Some("anyone")),
        ] {
            if mode == 0o1777 && !dir {
                continue;
            }
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
            let out = check(&config);
            assert!(out.status.success(), "{what} {mode:o}: {}", stderr(&out));
            match warned {
                Some(who) => assert!(
                    stderr(&out)
                        .contains(&format!("{what} {} is writable by {who}", path.display())),
                    "{what} {mode:o}: {}",
                    stderr(&out)
                ),
                None => assert!(
                    !stderr(&out).contains("is writable by"),
                    "{what} {mode:o}: {}",
                    stderr(&out)
                ),
            }
        }
        fs::set_permissions(path, fs::Permissions::from_mode(usual)).expect("chmod back");
    }
}

#[test]
fn the_ends_of_the_ranges_serve() {
    let smallest = Env::new().config(
        "timeout = \"100ms\"\nkill_grace = \"0s\"\nmax_running = 1\nqueue_wait = \"0s\"\n\
         max_connections = 1\nmax_body = 0\nmax_header_bytes = \"1KiB\"\nheader_timeout = \"100ms\"\n\
         keepalive_timeout = \"100ms\"\nevent = [\"path\"]",
    );
    smallest.script("quick", "exit 0");
    let server = smallest.serve();
    // One connection at a time: a request may meet the last one's connection not yet closed (503), so
    // each is sent again until it meets a free slot; and on a busy machine 100 ms may pass before the
    // daemon reads the head (408) or before the script has started and ended (504).
    let answer = |send: &dyn Fn() -> Response| {
        let mut response = send();
        let deadline = Instant::now() + Duration::from_secs(10);
        while [503, 504, 408].contains(&response.status) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            response = send();
        }
        response
    };
    let ok = answer(&|| server.post("/hooks/quick", b""));
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(answer(&|| server.post("/hooks/quick", b"x")).status, 413);
    let long_head = "x".repeat(1100);
    let big = answer(&|| server.request("GET", "/healthz", &[("X-Pad", &long_head)], b""));
    assert_eq!(big.status, 431);

    let largest = Env::new().config(
        "timeout = \"24h\"\nkill_grace = \"1h\"\nmax_running = 4096\nqueue_wait = \"1h\"\n\
         max_connections = 16384\nmax_body = \"64GiB\"\nmax_header_bytes = \"1MiB\"\n\
         header_timeout = \"1h\"\nkeepalive_timeout = \"1h\"",
    );
    largest.script("quick", "exit 0");
    let server = largest.serve();
    // The head buffer is allocated per connection: the largest one must not abort the daemon.
    let pad = "x".repeat(500 << 10);
    let ok = server.request("POST", "/hooks/quick", &[("X-Pad", &pad)], b"{}");
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(server.get("/healthz").status, 200);
}

fn check(config: &Path) -> Output {
    Command::new(BIN)
        .args(["check", "--config"])
        .arg(config)
        .output()
        .expect("run check")
}

/// Starts `serve` on `config` from the working directory `cwd`, the way Env::serve does for its own config.
fn serve(config: &Path, cwd: &Path) -> Server {
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .current_dir(cwd)
        .env("RUST_LOG", "info")
        .env("STATE_DIRECTORY", cwd.join("state"))
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut server = Server::spawn(command);
    let line = server
        .wait_log("listening on ", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("hookrunner did not start:\n{}", server.log()));
    let addr = line.split("listening on ").nth(1).expect("address").trim();
    server.addr = addr.parse().expect("an address");
    server
}

/// A config in `dir/etc` with no `routes` key, scripts in `dir/scripts`, payloads in `dir/payloads`; and,
/// in `dir` (the daemon's working directory), a `routes` file that must never be read.
fn world_without_a_routes_key() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    fs::create_dir(root.join("etc")).expect("etc dir");
    fs::create_dir(root.join("scripts")).expect("scripts dir");
    for name in ["known.sh", "other", "decoy.sh"] {
        let path = root.join("scripts").join(name);
        fs::write(&path, "#!/bin/sh\nexit 0\n").expect("write script");
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    fs::write(root.join("routes"), "* decoy.sh\n").expect("write decoy routes");
    let config = root.join("etc/hookrunner.toml");
    fs::write(
        &config,
        format!(
            "scripts_dir = {:?}\npayload_dir = {:?}\n",
            root.join("scripts"),
            root.join("payloads")
        ),
    )
    .expect("write config");
    (dir, config)
}

#[test]
fn without_a_routes_key_the_routes_file_beside_the_config_is_used() {
    let (dir, config) = world_without_a_routes_key();
    let beside = dir.path().join("etc/routes");
    fs::write(&beside, "Known known.sh\n").expect("write routes");
    let out = check(&config);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(&format!("# routes from {}", beside.display())) && table.contains("Known"),
        "{table}"
    );
    let server = serve(&config, dir.path());
    let known = server.post("/hooks/Known", b"{}");
    assert_eq!(known.status, 200, "{}", known.text());
    assert_eq!(known.json()["script"], "known.sh");
    // The embedded `* {event}` would run `other`; the decoy routes in the working directory would run
    // decoy.sh. The file beside the config has no route for it.
    let other = server.post("/hooks/other", b"{}");
    assert_eq!(other.status, 404, "{}", other.text());
}

#[test]
fn without_a_routes_key_or_a_routes_file_beside_the_config_the_embedded_table_is_used() {
    let (dir, config) = world_without_a_routes_key();
    let out = check(&config);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("# embedded default routes"), "{table}");
    let server = serve(&config, dir.path());
    assert!(
        server
            .wait_log("route(s) from the embedded default", Duration::from_secs(5))
            .is_some(),
        "{}",
        server.log()
    );
    let other = server.post("/hooks/other", b"{}");
    assert_eq!(other.status, 200, "{}", other.text());
    assert_eq!(other.json()["script"], "other");
}

#[test]
fn an_unreadable_routes_file_beside_the_config_is_an_error_not_the_embedded_table() {
    let (dir, config) = world_without_a_routes_key();
    // A directory where the file would be: reading it fails with something other than "not found".
    fs::create_dir(dir.path().join("etc/routes")).expect("routes dir");
    let out = check(&config);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("routes: cannot read routes"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_daemon_refuses_an_out_of_range_value_at_start_and_on_reload() {
    let env = Env::new().config("header_timeout = \"0s\"");
    let mut server = Server::spawn(env.serve_command("127.0.0.1:0"));
    let status = server.wait_exit(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(78), "{}", server.log());
    // The log is read by a thread, which may not have caught up with the exit yet.
    let refused = server
        .wait_log("out of range", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no range error logged:\n{}", server.log()));
    assert!(
        refused.contains("hookrunner.toml:3: header_timeout = 0s is out of range: use 100ms to 1h"),
        "{refused}"
    );

    let env = Env::new();
    env.script("hello", "exit 0");
    let server = env.serve();
    let env = env.config("max_header_bytes = \"1024GiB\"");
    env.config_path();
    server.signal(libc::SIGHUP);
    let failed = server
        .wait_log("reload failed", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no reload failure logged:\n{}", server.log()));
    assert!(
        failed.contains("hookrunner.toml:3: max_header_bytes = 1024GiB is out of range"),
        "{failed}"
    );
    let hello = server.post("/hooks/hello", b"{}");
    assert_eq!(hello.status, 200, "still serving: {}", hello.text());
}

/// The unit runs no `ExecStartPre=check` (systemd restarts a unit whose ExecStartPre fails, whatever
/// its exit status), so `serve` itself must say what `check` says, exit 78 (the unit's
/// RestartPreventExitStatus), and do so before it binds, locks or creates anything.
#[test]
fn serve_refuses_a_bad_routes_file_as_check_does_before_binding_anything() {
    let env = Env::new();
    env.script("ok.sh", "exit 0");
    env.routes("ComputerAdded  ok.sh\nComputerUpdated  no-such-script\n");
    let check = env.check();
    assert_eq!(check.status.code(), Some(78), "{}", stderr(&check));
    let said = stderr(&check);
    let message = said
        .trim()
        .strip_prefix("hookrunner: ")
        .unwrap_or_else(|| panic!("check's error: {said}"));
    assert!(message.contains("routes:2: "), "{message}");
    let mut server = Server::spawn(env.serve_command("127.0.0.1:0"));
    let status = server.wait_exit(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(78), "{}", server.log());
    server
        .wait_log(message, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("not check's message {message:?}:\n{}", server.log()));
    assert!(!server.log().contains("listening on"), "{}", server.log());
    assert!(
        !env.payloads().exists(),
        "the payload directory was made and locked"
    );
    assert!(!env.state().exists(), "the store was created");
}

/// What scripts source or read (a shared lib.sh, a settings file) runs as the daemon's user as surely as
/// a script does: check and every start warn of such files that group or others can write.
#[test]
fn files_in_scripts_dir_that_others_can_write_are_warned_of() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    env.script("ComputerAdded", ". ./lib.sh");
    let nested = env.scripts().join("integrations");
    fs::create_dir(&nested).expect("dir");
    for (path, mode) in [
        (env.scripts().join("lib.sh"), 0o644),
        (nested.join("integrations.env"), 0o644),
    ] {
        fs::write(&path, "X=1\n").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let out = env.check();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("writable by group or others"), "{err}");
    for (path, mode) in [
        (env.scripts().join("lib.sh"), 0o664),
        (nested.join("integrations.env"), 0o646),
    ] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let out = env.check();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "a warning, not an error: {err}");
    assert!(
        err.contains("2 file(s) or directories in scripts_dir")
            && err.contains("are writable by group or others (integrations/integrations.env, ...)"),
        "{err}"
    );
}
