//! The durable store and async delivery, against the real binary: acknowledgement before the run, retries,
//! dead letters and the exit-code convention, dedupe across restarts, recovery after kill -9, SIGTERM, a
//! full disk, a failed fsync, the history of sync requests, pruning, and the `deliveries` CLI while the
//! daemon runs. Every wait is bounded.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{BIN, Env, Response, Server, github_sign, wait_file, wait_until};

/// Runs `hookrunner deliveries ARGS` on the env's config and store.
pub(crate) fn deliveries(env: &Env, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("deliveries")
        .arg("--config")
        .arg(env.config_path())
        .args(args)
        .env("STATE_DIRECTORY", env.state())
        .output()
        .expect("run deliveries")
}

/// `deliveries list --json ARGS`, parsed.
fn rows(env: &Env, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["list", "--json", "--limit", "100000"];
    all.extend_from_slice(args);
    let out = deliveries(env, &all);
    assert!(
        out.status.success(),
        "deliveries list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout) {
        Ok(Value::Array(rows)) => rows,
        other => panic!("not a JSON array: {other:?}"),
    }
}

/// `deliveries show ID`, parsed.
fn show(env: &Env, id: &str) -> Value {
    let out = deliveries(env, &["show", id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("show prints JSON")
}

/// Waits (bounded) until the store holds a row of `event` in `state`; returns the row.
fn wait_state(env: &Env, event: &str, state: &str, timeout: Duration) -> Value {
    let mut found = None;
    let done = wait_until(timeout, || {
        found = rows(env, &["--event", event, "--status", state])
            .into_iter()
            .next();
        found.is_some()
    });
    assert!(done, "no {event} row became {state}: {:?}", rows(env, &[]));
    found.expect("found")
}

/// The lines a script appended to `path` (each run one line).
fn lines(path: &std::path::Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn post_to(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<Response> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    // Written here rather than with util::send, which panics on a failed write: a daemon killed mid-request
    // resets the connection, and the client must see that as "no answer".
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).ok()?;
    Response::read(&mut stream).ok()
}

#[test]
fn an_async_delivery_is_answered_before_its_script_runs_and_runs_with_the_same_contract() {
    let env = Env::new().config("[[sender]]\nname = \"jamf\"\ntype = \"none\"\n");
    let dir = env.path().to_path_buf();
    env.script(
        "a.sh",
        &format!(
            "while [ ! -e {release:?} ]; do sleep 0.02; done\n\
             printf '%s|%s|%s|%s\\n' \"$HOOKRUNNER_ATTEMPT\" \"$HOOKRUNNER_QUEUED_AT\" \"$HOOKRUNNER_EVENT\" \"$(cat \"$1\")\" >> {ran:?}",
            release = dir.join("release"),
            ran = dir.join("ran")
        ),
    );
    env.script("k.sh", "exit 0");
    env.routes("A a.sh async\nK k.sh async ack_status=200\nS k.sh\n");
    let server = env.serve();
    let _release = crate::util::Release(dir.join("release"));
    let r = server.post("/hooks/A", b"{\"n\":1}");
    // Answered while the script cannot have finished: it waits for the release file.
    assert_eq!(r.status, 202, "{}", r.text());
    let body = r.json();
    assert_eq!(body["queued"], true);
    assert_eq!(body["event"], "A");
    let request_id = body["request_id"].as_str().expect("request id").to_string();
    let line = server
        .wait_log(&format!("{request_id} "), Duration::from_secs(5))
        .expect("the request's line");
    assert!(
        line.contains(" status=202 ") && line.contains(" sender=jamf event=A script=a.sh queued="),
        "{line}"
    );
    assert!(lines(&dir.join("ran")).is_empty());
    fs::write(dir.join("release"), "").expect("release");
    assert!(wait_until(Duration::from_secs(10), || !lines(
        &dir.join("ran")
    )
    .is_empty()));
    let ran = lines(&dir.join("ran"));
    let fields: Vec<&str> = ran[0].split('|').collect();
    assert_eq!(fields[0], "1", "HOOKRUNNER_ATTEMPT: {ran:?}");
    assert!(
        fields[1].starts_with("20") && fields[1].ends_with('Z'),
        "HOOKRUNNER_QUEUED_AT: {ran:?}"
    );
    assert_eq!(&fields[2..], ["A", "{\"n\":1}"]);
    let row = wait_state(&env, "A", "done", Duration::from_secs(10));
    assert_eq!(row["request_id"], request_id.as_str());
    assert_eq!(row["mode"], "async");
    // A sender that insists on 200 gets it; a route without `async` stays sync.
    assert_eq!(server.post("/hooks/K", b"{}").status, 200);
    assert_eq!(server.post("/hooks/K", b"{}").json()["queued"], true);
    assert!(server.post("/hooks/S", b"{}").json()["exit_code"] == 0);
}

/// What a queued entry keeps of its route's policy: without options, 5 attempts, pauses up to an hour and
/// the configuration's timeout; with `retries=`, `retry_max=` and `timeout=`, those. Read from the store
/// itself, as the dispatcher will.
#[test]
fn a_queued_entry_keeps_its_routes_policy_and_the_defaults() {
    let env = Env::new().config("timeout = \"45s\"\n");
    let dir = env.path().to_path_buf();
    let release = dir.join("release");
    env.script(
        "held.sh",
        &format!("while [ ! -e {release:?} ]; do sleep 0.05; done"),
    );
    env.routes("A held.sh async\nB held.sh async retries=2 retry_max=5m timeout=7s\n");
    let server = env.serve();
    let _release = crate::util::Release(release);
    assert_eq!(server.post("/hooks/A", b"{}").status, 202);
    assert_eq!(server.post("/hooks/B", b"{}").status, 202);
    let db = rusqlite::Connection::open(env.state().join("hookrunner.db")).expect("open the store");
    let policy = |event: &str| -> (i64, i64, i64) {
        db.query_row(
            "SELECT max_attempts, retry_max_ms, timeout_ms FROM deliveries WHERE event = ?1",
            [event],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("the entry")
    };
    assert_eq!(policy("A"), (5, 3_600_000, 45_000));
    assert_eq!(policy("B"), (3, 300_000, 7_000));
}

/// A sender that insists on 200 (Kazoo takes anything else for a failure) says so once, in its `[[sender]]`
/// table: its async deliveries are answered 200 on every route that does not say otherwise, a repeated one
/// as the first was, and `check --payload` tells the same; other senders' are answered 202, a sync route
/// as its script ended, and `check` refuses any other status.
#[test]
fn a_senders_ack_status_answers_its_async_deliveries_where_the_route_does_not_say() {
    let senders = "[[sender]]\nname = \"kazoo\"\npath = \"/kazoo\"\ntype = \"none\"\n\
                   allow_ips = [\"127.0.0.1\"]\nack_status = 200\n\
                   [[sender]]\nname = \"other\"\npath = \"/other\"\ntype = \"none\"\n\
                   allow_ips = [\"127.0.0.1\"]\n";
    let env = Env::new().config(senders);
    env.script("k.sh", "exit 0");
    env.routes("K k.sh async\nR k.sh async ack_status=202\nS k.sh\n");
    let server = env.serve();
    let first = server.request(
        "POST",
        "/kazoo/hooks/K",
        &[("X-GitHub-Delivery", "d-1")],
        b"{}",
    );
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.json()["queued"], true, "{}", first.text());
    let again = server.request(
        "POST",
        "/kazoo/hooks/K",
        &[("X-GitHub-Delivery", "d-1")],
        b"{}",
    );
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.json()["duplicate"], true, "{}", again.text());
    let routed = server.post("/kazoo/hooks/R", b"{}");
    assert_eq!(
        routed.status,
        202,
        "the route's own word wins: {}",
        routed.text()
    );
    let other = server.post("/other/hooks/K", b"{}");
    assert_eq!(other.status, 202, "{}", other.text());
    let sync = server.post("/kazoo/hooks/S", b"{}");
    assert_eq!(
        (sync.status, sync.json()["exit_code"].as_i64()),
        (200, Some(0))
    );
    assert!(
        wait_until(Duration::from_secs(20), || rows(
            &env,
            &["--event", "K", "--status", "done"]
        )
        .len()
            == 2),
        "{:?}",
        rows(&env, &[])
    );

    let payload = env.path().join("dry-payload");
    fs::write(&payload, b"{}").expect("write payload");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(env.config_path())
        .arg("--payload")
        .arg(&payload)
        .args(["--path", "/kazoo/hooks/K"])
        .output()
        .expect("run check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("async: answered 200 once queued"), "{text}");

    let env = Env::new().config(&senders.replace("ack_status = 200", "ack_status = 201"));
    let out = env.check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("ack_status = 201: use 200 or 202"), "{err}");
}

/// `async = true` makes every route async unless it says `sync`; past `max_queued` waiting entries
/// (running ones count) a request is answered 503 with `Retry-After`, and nothing of it is kept or run.
#[test]
fn async_by_default_and_the_queue_bound_answers_503() {
    let env = Env::new().config("async = true\nmax_queued = 2");
    let dir = env.path().to_path_buf();
    let release = dir.join("release");
    let _release = crate::util::Release(release.clone());
    env.script(
        "w.sh",
        &format!(
            "while [ ! -e {release:?} ]; do sleep 0.02; done\nprintf '%s\\n' \"$(cat \"$1\")\" >> {ran:?}",
            ran = dir.join("ran")
        ),
    );
    env.script("s.sh", "exit 0");
    env.routes("W w.sh\nS s.sh sync\n");
    let server = env.serve();
    for n in ["1", "2"] {
        let r = server.post("/hooks/W", n.as_bytes());
        assert_eq!(
            (r.status, r.json()["queued"].clone()),
            (202, true.into()),
            "{}",
            r.text()
        );
    }
    let full = server.post("/hooks/W", b"3");
    assert_eq!(full.status, 503, "{}", full.text());
    assert!(full.header("Retry-After").is_some());
    assert!(
        full.text().contains("cannot queue the delivery"),
        "{}",
        full.text()
    );
    // A sync route is not queued, so the bound does not touch it.
    assert_eq!(server.post("/hooks/S", b"{}").json()["exit_code"], 0);
    fs::write(&release, "").expect("release");
    assert!(wait_until(Duration::from_secs(10), || lines(
        &dir.join("ran")
    )
    .len()
        == 2));
    assert!(wait_until(Duration::from_secs(10), || rows(
        &env,
        &["--status", "done", "--event", "W"]
    )
    .len()
        == 2));
    assert_eq!(server.post("/hooks/W", b"4").status, 202, "room again");
    assert!(wait_until(Duration::from_secs(10), || lines(
        &dir.join("ran")
    )
    .len()
        == 3));
    let mut ran = lines(&dir.join("ran"));
    ran.sort();
    assert_eq!(ran, ["1", "2", "4"], "the refused delivery never runs");
}

#[test]
fn queued_scripts_run_at_the_lowest_priority_and_sync_ones_at_the_daemons() {
    let env = Env::new();
    let dir = env.path().to_path_buf();
    env.script("n.sh", &format!("nice >> {:?}", dir.join("nice")));
    env.routes("A n.sh async\nS n.sh\n");
    let server = env.serve();
    assert_eq!(server.post("/hooks/S", b"{}").json()["exit_code"], 0);
    assert_eq!(server.post("/hooks/A", b"{}").status, 202);
    assert!(wait_until(Duration::from_secs(10), || lines(
        &dir.join("nice")
    )
    .len()
        == 2));
    let nice: Vec<i32> = lines(&dir.join("nice"))
        .iter()
        .map(|l| l.trim().parse().expect("nice prints a number"))
        .collect();
    assert!(
        nice[0] < 19,
        "a sync script at the daemon's priority: {nice:?}"
    );
    assert_eq!(nice[1], 19, "sync, then async: {nice:?}");
}

#[test]
fn without_a_crash_every_attempt_runs_once() {
    // Quick runs that fail once each: results are committed while the dispatcher reads the queue, and
    // a read taken before a result's commit must not start that attempt a second time.
    let env = Env::new();
    let ran = env.path().join("ran");
    env.script(
        "once.sh",
        &format!(
            "echo \"$HOOKRUNNER_REQUEST_ID $HOOKRUNNER_ATTEMPT\" >> {ran:?}\n[ \"$HOOKRUNNER_ATTEMPT\" = 2 ]"
        ),
    );
    env.routes("* once.sh async retries=2 retry_max=100ms\n");
    let server = env.serve();
    const N: usize = 200;
    for _ in 0..N {
        assert_eq!(server.post("/hooks/E", b"{}").status, 202);
    }
    assert!(
        wait_until(Duration::from_secs(60), || lines(&ran).len() >= 2 * N),
        "{} of {} attempts ran",
        lines(&ran).len(),
        2 * N
    );
    // Anything started twice has had time to run again.
    std::thread::sleep(Duration::from_millis(500));
    let all = lines(&ran);
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(
        all.len(),
        unique.len(),
        "attempts that ran twice: {:?}",
        all.iter()
            .filter(|l| all.iter().filter(|m| m == l).count() > 1)
            .collect::<HashSet<_>>()
    );
    assert_eq!(all.len(), 2 * N);
}

#[test]
fn a_failing_script_is_retried_with_backoff_then_dead_with_every_attempt_kept() {
    let env = Env::new();
    let count = env.path().join("count");
    env.script("fail.sh", "echo \"try $HOOKRUNNER_ATTEMPT\"\nexit 3");
    env.script(
        "flaky.sh",
        &format!("echo x >> {count:?}\n[ $(wc -l < {count:?}) -ge 3 ]"),
    );
    env.routes(
        "F fail.sh async retries=2 retry_max=100ms\nR flaky.sh async retries=5 retry_max=100ms\n",
    );
    let server = env.serve();
    assert_eq!(server.post("/hooks/F", b"{}").status, 202);
    assert_eq!(server.post("/hooks/R", b"{}").status, 202);
    let dead = wait_state(&env, "F", "dead", Duration::from_secs(20));
    let shown = show(&env, &dead["id"].to_string());
    let attempts = shown["attempts_made"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 3, "{shown}");
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a["exit_code"], 3);
        assert_eq!(a["output_tail"], format!("try {}\n", i + 1));
        assert!(a["duration_ms"].as_f64().is_some());
    }
    let done = wait_state(&env, "R", "done", Duration::from_secs(20));
    assert_eq!(done["attempts"], 3, "{done}");
    assert_eq!(lines(&count).len(), 3);
}

#[test]
fn exit_65_is_dead_at_once_and_exit_75_is_retried_past_the_attempts() {
    let env = Env::new();
    let count = env.path().join("count");
    env.script("data.sh", "exit 65");
    env.script(
        "temp.sh",
        &format!("echo x >> {count:?}\n[ $(wc -l < {count:?}) -ge 3 ] || exit 75"),
    );
    env.routes(
        "D data.sh async retries=5 retry_max=100ms\nT temp.sh async retries=0 retry_max=100ms\n",
    );
    let server = env.serve();
    assert_eq!(server.post("/hooks/D", b"{}").status, 202);
    assert_eq!(server.post("/hooks/T", b"{}").status, 202);
    let dead = wait_state(&env, "D", "dead", Duration::from_secs(20));
    assert_eq!(dead["attempts"], 1, "65 never retries: {dead}");
    let done = wait_state(&env, "T", "done", Duration::from_secs(20));
    assert_eq!(done["attempts"], 3, "75 retried although retries=0: {done}");
}

#[test]
fn the_cli_retries_shows_and_drops_entries_while_the_daemon_runs() {
    let env = Env::new();
    let fixed = env.path().join("fixed");
    env.script(
        "x.sh",
        &format!("echo \"payload $(cat \"$1\")\"\n[ -e {fixed:?} ]"),
    );
    env.routes("X x.sh async retries=0\nY x.sh async retries=0\n");
    let server = env.serve();
    assert_eq!(server.post("/hooks/X", b"{\"x\":1}").status, 202);
    assert_eq!(server.post("/hooks/Y", b"{\"y\":1}").status, 202);
    let x = wait_state(&env, "X", "dead", Duration::from_secs(10));
    wait_state(&env, "Y", "dead", Duration::from_secs(10));
    let id = x["id"].to_string();
    let payload = deliveries(&env, &["show", &id, "--payload"]);
    assert_eq!(payload.stdout, b"{\"x\":1}");
    let summary = deliveries(&env, &["list"]);
    let text = String::from_utf8_lossy(&summary.stdout);
    assert!(
        text.contains("total 2, done 0, failed 0, dead 2, queued 0"),
        "{text}"
    );
    // A filter written before the command would be dropped by the parser and every dead entry retried:
    // it is refused, and nothing changes.
    let misplaced = deliveries(&env, &["--event", "Y", "retry", "--dead"]);
    assert_eq!(misplaced.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&misplaced.stderr).contains("go after the command"),
        "{}",
        String::from_utf8_lossy(&misplaced.stderr)
    );
    fs::write(&fixed, "").expect("fix");
    let retried = deliveries(&env, &["retry", "--dead", "--event", "X"]);
    assert!(
        retried.status.success(),
        "{}",
        String::from_utf8_lossy(&retried.stderr)
    );
    // The daemon sees the CLI's change at its next look (every 250 ms), and runs it at nice 19: the bound
    // is the other queued runs' one, for a CI machine whose CPUs other tests keep busy.
    let done = wait_state(&env, "X", "done", Duration::from_secs(20));
    assert_eq!(done["attempts"], 2);
    assert_eq!(done["id"].to_string(), id);
    // Only the dead entries of the glob's events were retried.
    let y = rows(&env, &["--event", "Y"]);
    assert_eq!(
        (y[0]["state"].as_str(), &y[0]["attempts"]),
        (Some("dead"), &1.into())
    );
    let y_id = y[0]["id"].to_string();
    assert!(deliveries(&env, &["retry", &y_id]).status.success());
    let y = wait_state(&env, "Y", "done", Duration::from_secs(20));
    assert_eq!(y["attempts"], 2);
    let dropped = deliveries(&env, &["drop", &y_id]);
    assert!(dropped.status.success());
    assert!(rows(&env, &["--event", "Y"]).is_empty());
    assert_eq!(deliveries(&env, &["drop", &y_id]).status.code(), Some(1));
    assert_eq!(
        deliveries(&env, &["retry", "--dead"]).status.code(),
        Some(1),
        "nothing dead is left"
    );
    // Each attempt's line names its script and how long it ran.
    let log = server.log();
    let line = log
        .lines()
        .find(|l| l.contains("event=Y attempt=2 exit=0 done script=x.sh time="))
        .unwrap_or_else(|| panic!("no attempt line:\n{log}"));
    assert!(line.trim_end().ends_with("ms"), "{line}");
}

/// The operator's commands read only the store's keys: a route whose script became unsafe (which stops
/// the daemon's start) does not keep the operator from the deliveries, while a bad store key is still
/// refused with its line.
#[test]
fn the_cli_reads_the_store_when_the_rest_of_the_config_would_stop_the_daemon() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let script = env.script("x.sh", "exit 0");
    env.routes("X x.sh async\n");
    let server = env.serve();
    assert_eq!(server.post("/hooks/X", b"{}").status, 202);
    wait_state(&env, "X", "done", Duration::from_secs(10));
    drop(server);
    fs::set_permissions(&script, fs::Permissions::from_mode(0o777)).expect("chmod");
    let check = env.check();
    assert_eq!(check.status.code(), Some(78), "the daemon would not start");
    let listed = rows(&env, &["--event", "X"]);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["state"], "done");
    let env = env.config("max_queued = 0");
    let refused = deliveries(&env, &["list"]);
    assert_eq!(refused.status.code(), Some(78));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("hookrunner.toml:") && said.contains("max_queued = 0"),
        "{said}"
    );
}

/// A daemon with no async route and `history = false` does not open the store (when nothing waits in it
/// at its start): an entry `deliveries retry` queues then waits for a daemon that does, and the CLI says
/// so; a reload that turns the history on cannot open it either, and the log says that.
#[test]
fn without_a_daemon_on_the_store_retry_says_when_the_entry_will_run() {
    let mut env = Env::new();
    env.script("dead.sh", "exit 65");
    env.routes("D dead.sh async\n");
    let server = env.serve();
    assert_eq!(server.post("/hooks/D", b"{}").status, 202);
    wait_state(&env, "D", "dead", Duration::from_secs(10));
    let retried = deliveries(&env, &["retry", "--dead"]);
    assert!(retried.status.success());
    assert!(
        !String::from_utf8_lossy(&retried.stderr).contains("no daemon has this store open"),
        "{}",
        String::from_utf8_lossy(&retried.stderr)
    );
    wait_state(&env, "D", "dead", Duration::from_secs(10));
    drop(server);
    env.routes("D dead.sh\n");
    env.reconfigure("history = false");
    let server = env.serve();
    let retried = deliveries(&env, &["retry", "--dead"]);
    assert!(retried.status.success());
    assert_eq!(
        String::from_utf8_lossy(&retried.stdout),
        "1 entry queued to run now\n"
    );
    let said = String::from_utf8_lossy(&retried.stderr);
    assert!(
        said.contains("no daemon has this store open now")
            && said.contains("it runs at the next start"),
        "{said}"
    );
    env.reconfigure("history = true");
    server.signal(libc::SIGHUP);
    assert!(
        server
            .wait_log(
                "reload: history = true needs the store, which was not opened at start",
                Duration::from_secs(10)
            )
            .is_some(),
        "{}",
        server.log()
    );
    drop(server);
    // The next daemon that opens the store runs it.
    let _server = env.serve();
    let row = wait_state(&env, "D", "dead", Duration::from_secs(10));
    assert_eq!(row["attempts"], 3);
}

/// `deliveries retry` queues an entry again only while the queue has room, as an accept would: past
/// `max_queued` it says so, exits 1 and leaves the entry as it was.
#[test]
fn the_cli_retry_keeps_to_the_queue_bound() {
    let env = Env::new().config("max_queued = 1");
    let dir = env.path().to_path_buf();
    let go = dir.join("go");
    let _release = crate::util::Release(go.clone());
    env.script("dead.sh", "exit 65");
    env.script(
        "w.sh",
        &crate::util::wait_for_release(&dir.join("started"), &go),
    );
    env.routes("D dead.sh async\nW w.sh async\n");
    let server = env.serve();
    assert_eq!(server.post("/hooks/D", b"{}").status, 202);
    wait_state(&env, "D", "dead", Duration::from_secs(10));
    assert_eq!(server.post("/hooks/W", b"{}").status, 202);
    assert!(wait_until(Duration::from_secs(10), || dir
        .join("started")
        .exists()));
    let refused = deliveries(&env, &["retry", "--dead"]);
    assert_eq!(refused.status.code(), Some(1));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("1 entry left as it was: the queue is full (max_queued = 1"),
        "{said}"
    );
    assert_eq!(rows(&env, &["--event", "D"])[0]["state"], "dead");
    fs::write(&go, "").expect("go");
    wait_state(&env, "W", "done", Duration::from_secs(10));
    let retried = deliveries(&env, &["retry", "--dead"]);
    assert!(
        retried.status.success(),
        "{}",
        String::from_utf8_lossy(&retried.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&retried.stdout),
        "1 entry queued to run now\n"
    );
    drop(server);
}

/// Two `type = "none"` senders on their own paths, each with a sync and an async route line of its own.
const TWO_SENDERS: &str = "[[sender]]\nname = \"a\"\npath = \"/a\"\ntype = \"none\"\n\
                           allow_ips = [\"127.0.0.1\"]\n\
                           [[sender]]\nname = \"b\"\npath = \"/b\"\ntype = \"none\"\n\
                           allow_ips = [\"127.0.0.1\"]\n";

/// `deliveries list --sender NAME` lists that sender's rows alone, sync and async, each naming its sender,
/// the script that ran and the routes file's line that chose it; `--since` leaves out the rows received
/// before it and keeps the later ones.
#[test]
fn the_cli_lists_one_senders_rows_and_only_those_since_a_time() {
    let env = Env::new().config(TWO_SENDERS);
    for script in ["a-sync.sh", "b-sync.sh", "a-async.sh", "b-async.sh"] {
        env.script(script, "exit 0");
    }
    // Line 1 is a comment, so a route's line is not its index among the routes.
    env.routes(
        "# sync lines 2-3, async lines 4-5\n\
         S a-sync.sh sender=a\n\
         S b-sync.sh sender=b\n\
         Q a-async.sh async sender=a\n\
         Q b-async.sh async sender=b\n",
    );
    let server = env.serve();
    // One sync and one async request from each sender; waits until their rows are done.
    let send_round = |done: usize| {
        for sender in ["a", "b"] {
            let sync = server.post(&format!("/{sender}/hooks/S"), b"{}");
            assert_eq!(sync.status, 200, "{}\n{}", sync.text(), server.log());
            let queued = server.post(&format!("/{sender}/hooks/Q"), b"{}");
            assert_eq!(queued.status, 202, "{}\n{}", queued.text(), server.log());
        }
        assert!(
            wait_until(Duration::from_secs(20), || rows(
                &env,
                &["--status", "done"]
            )
            .len()
                == done),
            "{:?}\n{}",
            rows(&env, &[]),
            server.log()
        );
    };
    send_round(4);
    for sender in ["a", "b"] {
        let listed = rows(&env, &["--sender", sender]);
        let mut seen: Vec<(String, String, String, u64)> = listed
            .iter()
            .map(|r| {
                assert_eq!(r["sender"], sender, "{r}");
                (
                    r["mode"].as_str().unwrap_or_default().to_string(),
                    r["event"].as_str().unwrap_or_default().to_string(),
                    // A sync row names the script as its route line does, an async one by the path the
                    // dispatcher runs (scripts_dir joined): the same file either way.
                    std::path::Path::new(r["script"].as_str().unwrap_or_default())
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    r["route_line"].as_u64().unwrap_or_default(),
                )
            })
            .collect();
        seen.sort();
        let (sync_line, async_line) = if sender == "a" { (2, 4) } else { (3, 5) };
        assert_eq!(
            seen,
            [
                (
                    "async".into(),
                    "Q".into(),
                    format!("{sender}-async.sh"),
                    async_line
                ),
                (
                    "sync".into(),
                    "S".into(),
                    format!("{sender}-sync.sh"),
                    sync_line
                ),
            ],
            "--sender {sender}: {listed:?}\nall: {:?}",
            rows(&env, &[])
        );
    }
    assert!(rows(&env, &["--sender", "nobody"]).is_empty());

    // A second round 1.5 s after the first's last row was received: `--since` reaches back to just after it.
    let first: Vec<Value> = rows(&env, &[]);
    let last_of_first = first
        .iter()
        .map(|r| millis(&r["received"]))
        .max()
        .expect("rows");
    let first_ids: HashSet<String> = first.iter().map(|r| r["id"].to_string()).collect();
    assert!(wait_until(Duration::from_secs(5), || now_ms() >= last_of_first + 1_500));
    send_round(8);
    let all = rows(&env, &[]);
    let second_ids: HashSet<String> = all
        .iter()
        .map(|r| r["id"].to_string())
        .filter(|id| !first_ids.contains(id))
        .collect();
    assert_eq!(second_ids.len(), 4, "{all:?}");
    // The CLI reads the clock after this test does: its cutoff comes later than the one meant, by as long
    // as it takes to start. Never early, so the first round must never be listed; the second must be,
    // once the CLI started within the 1.4 s margin (tried again on a machine too loaded for that).
    let mut last = Vec::new();
    let listed_all_of_second = wait_until(Duration::from_secs(30), || {
        let since = now_ms() - (last_of_first + 100);
        last = rows(&env, &["--since", &format!("{since}ms")]);
        let ids: HashSet<String> = last.iter().map(|r| r["id"].to_string()).collect();
        assert!(
            ids.is_disjoint(&first_ids),
            "--since {since}ms listed a row of the first round: {last:?}\nall: {all:?}"
        );
        ids == second_ids
    });
    assert!(
        listed_all_of_second,
        "--since left out rows received after it: {last:?}\nall: {all:?}"
    );
    assert_eq!(rows(&env, &["--since", "1h"]).len(), 8, "{all:?}");
    let b_since = rows(
        &env,
        &["--sender", "b", "--since", "1h", "--status", "done"],
    );
    assert_eq!(b_since.len(), 4, "{b_since:?}");
}

/// `--status` finds an entry by where it is: `running` the serial lane's entry whose script runs, `queued`
/// the one held behind it, `failed` both a sync request answered 500 and an async entry waiting to retry;
/// the summary line counts the same.
#[test]
fn the_cli_lists_entries_by_status_and_its_summary_counts_them() {
    // One slot for queued runs: once the lane's first entry holds it, the failed entry cannot start its
    // retry, so every state below stays still while it is read.
    let env = Env::new().config(&format!("max_running = 2\n{TWO_SENDERS}"));
    let dir = env.path().to_path_buf();
    let go = dir.join("go");
    let _release = crate::util::Release(go.clone());
    env.script("fail.sh", "exit 1");
    env.script(
        "held.sh",
        &format!(
            "echo \"$HOOKRUNNER_REQUEST_ID\" >> {ran:?}\n{}",
            crate::util::wait_for_release(&dir.join("started"), &go),
            ran = dir.join("ran")
        ),
    );
    env.routes("F fail.sh\nR fail.sh async retries=5\nL held.sh async serial\n");
    let server = env.serve();
    let id_of = |r: &Response| {
        r.json()["request_id"]
            .as_str()
            .expect("request id")
            .to_string()
    };
    let retrying = server.post("/a/hooks/R", b"{}");
    assert_eq!(retrying.status, 202, "{}", retrying.text());
    let retrying = id_of(&retrying);
    wait_state(&env, "R", "failed", Duration::from_secs(20));
    let first = server.post("/b/hooks/L", b"{}");
    assert_eq!(first.status, 202, "{}", first.text());
    let second = server.post("/b/hooks/L", b"{}");
    assert_eq!(second.status, 202, "{}", second.text());
    let (first, second) = (id_of(&first), id_of(&second));
    assert!(
        wait_file(&dir.join("started"), Duration::from_secs(20)),
        "the lane's first entry never ran:\n{}",
        server.log()
    );
    let answered = server.post("/a/hooks/F", b"{}");
    assert_eq!(answered.status, 500, "{}", answered.text());
    let answered = id_of(&answered);
    // The sync row is written after the answer (within 250 ms).
    assert!(
        wait_until(Duration::from_secs(10), || rows(&env, &[]).len() == 4),
        "{:?}",
        rows(&env, &[])
    );
    assert_eq!(
        lines(&dir.join("ran")),
        [first.as_str()],
        "{}",
        server.log()
    );

    let ids = |state: &str| -> Vec<String> {
        rows(&env, &["--status", state])
            .iter()
            .map(|r| r["request_id"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let all = rows(&env, &[]);
    assert_eq!(ids("running"), [first.as_str()], "{all:?}");
    assert_eq!(ids("queued"), [second.as_str()], "{all:?}");
    let failed = rows(&env, &["--status", "failed"]);
    let mut found: Vec<(String, String, String)> = failed
        .iter()
        .map(|r| {
            (
                r["request_id"].as_str().unwrap_or_default().to_string(),
                r["mode"].as_str().unwrap_or_default().to_string(),
                r["status"].to_string(),
            )
        })
        .collect();
    found.sort();
    let mut expected = vec![
        (answered.clone(), "sync".to_string(), "500".to_string()),
        (retrying.clone(), "async".to_string(), "202".to_string()),
    ];
    expected.sort();
    assert_eq!(found, expected, "{failed:?}\nall: {all:?}");
    let waiting = failed
        .iter()
        .find(|r| r["request_id"] == retrying.as_str())
        .expect("the retrying entry");
    assert!(
        waiting["next_attempt"].is_string() && waiting["exit_code"] == 1,
        "{waiting}"
    );
    assert!(ids("dead").is_empty() && ids("done").is_empty(), "{all:?}");
    // The human listing's summary: the same figures, the failed ones both kinds.
    let listed = deliveries(&env, &["list"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        text.contains("total 4, done 0, failed 2, dead 0, queued 1, running 1;"),
        "{text}\nall: {all:?}"
    );
    let failed_only = deliveries(&env, &["list", "--status", "failed"]);
    let text = String::from_utf8_lossy(&failed_only.stdout);
    assert_eq!(
        text.lines()
            .filter(|l| l.split_whitespace().nth(3) == Some("failed"))
            .count(),
        2,
        "{text}"
    );
    assert!(text.contains(", failed 2,"), "{text}");
    drop(server);
}

/// A queued run gets the environment a sync run of the same request gets: the same request (sender, query
/// string, Content-Type, delivery id) sent to a sync route, then to the same route made async by a reload,
/// runs a script that records its whole environment; only the request id, the peer's port (a new
/// connection) and the queued run's own `HOOKRUNNER_ATTEMPT` and `HOOKRUNNER_QUEUED_AT` differ.
#[test]
fn a_queued_run_gets_the_environment_a_sync_run_of_the_same_request_gets() {
    let env = Env::new().config(TWO_SENDERS);
    let dir = env.path().to_path_buf();
    env.script(
        "dump.sh",
        &format!(
            "out={dir:?}/env-${{HOOKRUNNER_ATTEMPT:-sync}}\nenv | sort > \"$out.tmp\" && mv \"$out.tmp\" \"$out\""
        ),
    );
    env.routes("E dump.sh\n");
    let server = env.serve();
    let send = || {
        server.request(
            "POST",
            "/b/hooks/E?x=1&y=two%20words",
            &[
                ("Content-Type", "application/json; charset=utf-8"),
                ("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
            ],
            b"{\"n\":1}",
        )
    };
    let sync = send();
    assert_eq!(sync.status, 200, "{}\n{}", sync.text(), server.log());
    env.routes("E dump.sh async\n");
    server.signal(libc::SIGHUP);
    assert!(
        server
            .wait_log("reloaded: 1 route(s)", Duration::from_secs(10))
            .is_some(),
        "{}",
        server.log()
    );
    let queued = send();
    assert_eq!(queued.status, 202, "{}\n{}", queued.text(), server.log());
    assert_eq!(queued.json()["queued"], true, "{}", queued.text());
    assert!(
        wait_file(&dir.join("env-1"), Duration::from_secs(20)),
        "the queued run never ran:\n{}",
        server.log()
    );
    let read = |name: &str| -> std::collections::BTreeMap<String, String> {
        fs::read_to_string(dir.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let mut sync_env = read("env-sync");
    let mut queued_env = read("env-1");
    let log = server.log();
    // What differs by nature: each request its id, each connection its port.
    assert_eq!(
        sync_env.remove("HOOKRUNNER_REQUEST_ID").as_deref(),
        sync.json()["request_id"].as_str(),
        "{log}"
    );
    assert_eq!(
        queued_env.remove("HOOKRUNNER_REQUEST_ID").as_deref(),
        queued.json()["request_id"].as_str(),
        "{log}"
    );
    let ip = |v: Option<String>| -> String {
        let v = v.unwrap_or_else(|| panic!("no HOOKRUNNER_REMOTE_ADDR:\n{log}"));
        let addr: SocketAddr = v.parse().unwrap_or_else(|e| panic!("{v:?}: {e}"));
        addr.ip().to_string()
    };
    let (sync_peer, queued_peer) = (
        ip(sync_env.remove("HOOKRUNNER_REMOTE_ADDR")),
        ip(queued_env.remove("HOOKRUNNER_REMOTE_ADDR")),
    );
    assert_eq!(sync_peer, queued_peer);
    // What only a queued run has.
    assert_eq!(
        queued_env.remove("HOOKRUNNER_ATTEMPT").as_deref(),
        Some("1")
    );
    let queued_at = queued_env
        .remove("HOOKRUNNER_QUEUED_AT")
        .expect("HOOKRUNNER_QUEUED_AT");
    assert!(humantime::parse_rfc3339(&queued_at).is_ok(), "{queued_at}");
    assert_eq!(queued_env, sync_env, "{log}");
    // And the request's own values are there, not the same emptiness twice.
    for (name, value) in [
        ("HOOKRUNNER_SENDER", "b"),
        ("HOOKRUNNER_EVENT", "E"),
        ("HOOKRUNNER_PATH", "/b/hooks/E"),
        ("HOOKRUNNER_QUERY", "x=1&y=two%20words"),
        ("HOOKRUNNER_CONTENT_TYPE", "application/json; charset=utf-8"),
        (
            "HOOKRUNNER_DELIVERY_ID",
            "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        ),
        ("HOOKRUNNER_METHOD", "POST"),
        ("HOOKRUNNER_CLIENT_ADDR", "127.0.0.1"),
    ] {
        assert_eq!(
            sync_env.get(name).map(String::as_str),
            Some(value),
            "{name}: {sync_env:?}"
        );
    }
}

/// The wall clock, in milliseconds since the epoch, as the store writes `received_at`.
fn now_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970");
    i64::try_from(since.as_millis()).expect("fits")
}

#[test]
fn a_repeated_delivery_id_is_answered_as_the_first_and_not_run_again_across_a_restart() {
    let env = Env::new();
    let ran = env.path().join("ran");
    env.script(
        "d.sh",
        &format!("printf '%s\\n' \"$(cat \"$1\")\" >> {ran:?}"),
    );
    env.routes(
        "D d.sh async\nB d.sh async dedupe_key=json:/delivery/id\nC d.sh async dedupe_key=json:/delivery/id\n",
    );
    let first = {
        let server = env.serve();
        let r = server.request(
            "POST",
            "/hooks/D",
            &[("X-GitHub-Delivery", "abc-1")],
            b"first",
        );
        assert_eq!(r.status, 202);
        // Done, not only run: a daemon killed before the result is committed runs it again (at least once).
        wait_state(&env, "D", "done", Duration::from_secs(10));
        r.json()["request_id"].clone()
    };
    let server = env.serve();
    let again = server.request(
        "POST",
        "/hooks/D",
        &[("X-GitHub-Delivery", "abc-1")],
        b"again",
    );
    assert_eq!(again.status, 202);
    assert_eq!(again.json()["duplicate"], true);
    assert_eq!(
        again.json()["request_id"],
        first,
        "answered as the first one was"
    );
    let logged = server
        .wait_log("duplicate=true", Duration::from_secs(5))
        .unwrap_or_else(|| server.log());
    let first_id = first.as_str().expect("a request id");
    assert!(
        logged.contains(&format!("duplicate=true duplicate_of={first_id} row=")),
        "{logged}"
    );
    // Without a delivery id two identical bodies are two events; an id in the body works like a header's.
    for _ in 0..2 {
        assert_eq!(server.post("/hooks/D", b"same").status, 202);
    }
    let body = br#"{"delivery":{"id":7}}"#;
    assert_eq!(
        server.post("/hooks/B", body).json()["duplicate"],
        Value::Null
    );
    assert_eq!(server.post("/hooks/B", body).json()["duplicate"], true);
    // An id from the body is one event's numbering: the same number in another event is another delivery.
    assert_eq!(
        server.post("/hooks/C", body).json()["duplicate"],
        Value::Null
    );
    assert!(wait_until(Duration::from_secs(10), || lines(&ran).len() >= 5));
    std::thread::sleep(Duration::from_millis(500));
    let got = lines(&ran);
    assert_eq!(
        got.iter().filter(|l| l.starts_with("again")).count(),
        0,
        "{got:?}"
    );
    let count = |text: &str| got.iter().filter(|l| l.as_str() == text).count();
    assert_eq!(count("first"), 1, "{got:?}");
    assert_eq!(count("same"), 2, "{got:?}");
    assert_eq!(count(r#"{"delivery":{"id":7}}"#), 2, "{got:?}");
}

/// What makes a dedupe key: an empty delivery id header is no id (the next header is tried); a route's
/// `dedupe_key` from a header or the query is the value as sent, whatever its characters; a body field as
/// long as the body is kept as its hash, and still tells deliveries apart.
#[test]
fn empty_ids_are_no_ids_and_a_dedupe_key_is_the_value_as_sent() {
    let env = Env::new();
    let ran = env.path().join("ran");
    env.script(
        "d.sh",
        &format!("printf '%s\\n' \"$HOOKRUNNER_EVENT $HOOKRUNNER_DELIVERY_ID\" >> {ran:?}"),
    );
    env.routes(
        "H* d.sh async dedupe_key=header:X-Id\nQ* d.sh async dedupe_key=query:id\n\
         J* d.sh async dedupe_key=json:/id\n* d.sh async\n",
    );
    let server = env.serve();
    let post = |path: &str, headers: &[(&str, &str)], body: &[u8]| {
        let r = server.request("POST", path, headers, body);
        assert_eq!(r.status, 202, "{}", r.text());
        r.json()["duplicate"] == true
    };
    // Two events, each with an empty Idempotency-Key: two deliveries, not one.
    assert!(!post("/hooks/One", &[("Idempotency-Key", "")], b"{}"));
    assert!(!post("/hooks/Two", &[("Idempotency-Key", " ")], b"{}"));
    // An empty webhook-id does not hide the GitHub delivery id behind it.
    assert!(!post(
        "/hooks/Three",
        &[("webhook-id", ""), ("X-GitHub-Delivery", "gh-1")],
        b"{}"
    ));
    assert!(post(
        "/hooks/Three",
        &[("X-GitHub-Delivery", "gh-1")],
        b"{}"
    ));
    // Ids with characters no event name may hold.
    assert!(!post("/hooks/Hdr", &[("X-Id", "order:42 / a+b=c")], b"{}"));
    assert!(post("/hooks/Hdr", &[("X-Id", "order:42 / a+b=c")], b"{}"));
    assert!(!post("/hooks/Hdr", &[("X-Id", "order:43 / a+b=c")], b"{}"));
    assert!(!post("/hooks/Qry?id=a%2Bb", &[], b"{}"));
    assert!(post("/hooks/Qry?id=a%2Bb", &[], b"{}"));
    assert!(
        !post("/hooks/Qry?id=a+b", &[], b"{}"),
        "a+b is \"a b\", another id"
    );
    // Ids longer than a delivery id's cap, the same for their first 300 bytes.
    let long = |end: &str| format!("{{\"id\":\"{}{end}\"}}", "x".repeat(300));
    assert!(!post("/hooks/Json", &[], long("1").as_bytes()));
    assert!(post("/hooks/Json", &[], long("1").as_bytes()));
    assert!(!post("/hooks/Json", &[], long("2").as_bytes()));
    assert!(wait_until(Duration::from_secs(10), || lines(&ran).len() >= 9));
    std::thread::sleep(Duration::from_millis(300));
    let mut got = lines(&ran);
    got.sort();
    assert_eq!(
        got,
        [
            "Hdr ",
            "Hdr ",
            "Json ",
            "Json ",
            "One ",
            "Qry ",
            "Qry ",
            "Three gh-1",
            "Two "
        ]
    );
}

/// A `dedupe_key` value that is empty, or that does not print one way per value, is no id: two deliveries
/// that carry it are two deliveries, and both run.
#[test]
fn a_dedupe_key_that_is_empty_or_inexact_dedupes_nothing() {
    let env = Env::new();
    let ran = env.path().join("ran");
    env.script(
        "d.sh",
        &format!("printf '%s %s\\n' \"$HOOKRUNNER_EVENT\" \"$(cat \"$1\")\" >> {ran:?}"),
    );
    env.routes(
        "J* d.sh async dedupe_key=json:/delivery/id\nX* d.sh async dedupe_key=xml:/webhook/id\n\
         H* d.sh async dedupe_key=header:X-Id\nQ* d.sh async dedupe_key=query:id\n\
         F* d.sh async dedupe_key=form:id\n",
    );
    let server = env.serve();
    const JSON: (&str, &str) = ("Content-Type", "application/json");
    const XML: (&str, &str) = ("Content-Type", "application/xml");
    const FORM: (&str, &str) = ("Content-Type", "application/x-www-form-urlencoded");
    /// A path, its headers, and the bodies of its two deliveries.
    type Twice<'a> = (&'a str, Vec<(&'a str, &'a str)>, [&'a str; 2]);
    let twice: [Twice; 8] = [
        // An empty string, and one of spaces.
        (
            "/hooks/Jempty",
            vec![JSON],
            [
                r#"{"delivery":{"id":""},"n":1}"#,
                r#"{"delivery":{"id":""},"n":2}"#,
            ],
        ),
        (
            "/hooks/Jspace",
            vec![JSON],
            [
                r#"{"delivery":{"id":" "},"n":1}"#,
                r#"{"delivery":{"id":" "},"n":2}"#,
            ],
        ),
        // Two integers past 64 bits, one f64 apart from nothing: they would print the same.
        (
            "/hooks/Jbig",
            vec![JSON],
            [
                r#"{"delivery":{"id":18446744073709551616}}"#,
                r#"{"delivery":{"id":18446744073709551617}}"#,
            ],
        ),
        // An element that holds only elements has no text of its own.
        (
            "/hooks/Xnested",
            vec![XML],
            [
                "<e><webhook><id><v>1</v></id></webhook></e>",
                "<e><webhook><id><v>2</v></id></webhook></e>",
            ],
        ),
        (
            "/hooks/Hempty",
            vec![JSON, ("X-Id", "")],
            ["{\"n\":1}", "{\"n\":2}"],
        ),
        ("/hooks/Qempty?id=", vec![JSON], ["{\"n\":1}", "{\"n\":2}"]),
        ("/hooks/Fempty", vec![FORM], ["id=&n=1", "id=&n=2"]),
        // The control: an integer that fits is an id, and the second delivery with it is the first again.
        (
            "/hooks/Jint",
            vec![JSON],
            [
                r#"{"delivery":{"id":42},"n":1}"#,
                r#"{"delivery":{"id":42},"n":2}"#,
            ],
        ),
    ];
    for (path, headers, bodies) in &twice {
        for (n, body) in bodies.iter().enumerate() {
            let r = server.request("POST", path, headers, body.as_bytes());
            assert_eq!(r.status, 202, "{path}: {}", r.text());
            let duplicate = r.json()["duplicate"] == true;
            let expected = *path == "/hooks/Jint" && n == 1;
            assert_eq!(
                duplicate,
                expected,
                "{path} delivery {}: {}",
                n + 1,
                r.text()
            );
        }
    }
    assert!(wait_until(Duration::from_secs(10), || lines(&ran).len() >= 15));
    std::thread::sleep(Duration::from_millis(300));
    let mut got = lines(&ran);
    got.sort();
    let mut expected: Vec<String> = twice
        .iter()
        .flat_map(|(path, _, bodies)| {
            let event = path
                .trim_start_matches("/hooks/")
                .split('?')
                .next()
                .unwrap_or_default();
            let runs = if event == "Jint" {
                &bodies[..1]
            } else {
                &bodies[..]
            };
            runs.iter().map(move |body| format!("{event} {body}"))
        })
        .collect();
    expected.sort();
    assert_eq!(got, expected);
}

/// GitLab's `X-Gitlab-Event-UUID` is shared by the events a hook's own API calls set off: it is the
/// script's `HOOKRUNNER_DELIVERY_ID` but no dedupe key, so each of those events runs. `Idempotency-Key`
/// (GitLab 17.4 on) names one delivery and its retries, and dedupes.
#[test]
fn gitlab_event_uuid_is_a_delivery_id_but_not_a_dedupe_key() {
    let env = Env::new().config("event = [\"gitlab\", \"path\"]");
    let ran = env.path().join("ran");
    env.script(
        "g.sh",
        &format!("printf '%s\\n' \"$HOOKRUNNER_EVENT $HOOKRUNNER_DELIVERY_ID\" >> {ran:?}"),
    );
    env.routes("* g.sh async\n");
    let server = env.serve();
    let post = |kind: &str, headers: &[(&str, &str)]| {
        let mut all = vec![
            ("X-Gitlab-Event", kind),
            ("Content-Type", "application/json"),
        ];
        all.extend_from_slice(headers);
        let r = server.request("POST", "/", &all, b"{}");
        assert_eq!(r.status, 202, "{}", r.text());
        r.json()["duplicate"] == true
    };
    let chain = (
        "X-Gitlab-Event-UUID",
        "11111111-2222-3333-4444-555555555555",
    );
    assert!(!post("Push Hook", &[chain]));
    assert!(!post("Note Hook", &[chain]), "another event of the chain");
    assert!(
        !post("Note Hook", &[chain]),
        "a note a note hook's script made"
    );
    let retried = [("Idempotency-Key", "retry-1"), chain];
    assert!(!post("Push Hook", &retried));
    assert!(post("Push Hook", &retried), "a retry of one delivery");
    assert!(wait_until(Duration::from_secs(10), || lines(&ran).len() >= 4));
    std::thread::sleep(Duration::from_millis(300));
    let mut got = lines(&ran);
    got.sort();
    assert_eq!(
        got,
        [
            "note 11111111-2222-3333-4444-555555555555",
            "note 11111111-2222-3333-4444-555555555555",
            "push 11111111-2222-3333-4444-555555555555",
            "push retry-1",
        ]
    );
}

/// An entry queued by a hookrunner that left empty variables out of its environment (as it was stored)
/// gets every one when it runs now, empty where it had none, as an entry queued now does: a `set -u`
/// script written to today's README must not fail on what was queued before an upgrade.
#[test]
fn an_entry_queued_without_the_empty_variables_gets_them_when_it_runs() {
    let env = Env::new();
    let seen = env.path().join("seen");
    env.script(
        "strict.sh",
        &format!(
            "set -eu\nprintf '%s|%s|%s|%s\\n' \"$HOOKRUNNER_QUERY\" \"$HOOKRUNNER_SENDER\" \
             \"$HOOKRUNNER_EVENT\" \"$HOOKRUNNER_ATTEMPT\" > {seen:?}\n"
        ),
    );
    env.routes("* strict.sh async\n");
    let mut server = env.serve();
    server.signal(libc::SIGTERM);
    server.wait_exit(Duration::from_secs(10)).expect("stopped");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let script = env.scripts().join("strict.sh");
    let db = rusqlite::Connection::open(env.state().join("hookrunner.db")).expect("open the store");
    db.execute(
        "INSERT INTO deliveries (request_id, received_at, mode, event, route_line, script, state, status,
             attempts, max_attempts, retry_max_ms, timeout_ms, serial, due_at, env, payload, payload_bytes)
         VALUES ('old-1', ?1, 'async', 'Old', 1, ?2, 'queued', 202, 0, 5, 3600000, 30000, 0, ?1, ?3,
             x'7b7d', 2)",
        rusqlite::params![
            now,
            script.to_str().expect("utf-8"),
            r#"[["HOOKRUNNER_EVENT","Old"],["HOOKRUNNER_REQUEST_ID","old-1"]]"#
        ],
    )
    .expect("an entry as an older hookrunner queued it");
    drop(db);
    let server = restart(&env);
    assert!(
        wait_until(Duration::from_secs(10), || seen.exists()),
        "{}",
        server.log()
    );
    assert!(wait_until(Duration::from_secs(5), || fs::read_to_string(
        &seen
    )
    .is_ok_and(|s| s.ends_with('\n'))));
    assert_eq!(fs::read_to_string(&seen).expect("seen"), "||Old|1\n");
}

/// A store a newer hookrunner migrated (a downgrade) cannot be opened by this one, however often it
/// starts: a configuration error (78), which the service unit does not restart, and no word of bringing
/// the store anywhere.
#[test]
fn a_store_of_a_newer_schema_is_a_configuration_error() {
    let env = Env::new();
    env.routes("* x.sh async\n");
    env.script("x.sh", "true");
    let mut server = env.serve();
    server.signal(libc::SIGTERM);
    server.wait_exit(Duration::from_secs(10)).expect("stopped");
    let db = rusqlite::Connection::open(env.state().join("hookrunner.db")).expect("open the store");
    db.pragma_update(None, "user_version", 99)
        .expect("as a newer hookrunner left it");
    drop(db);
    let mut refused = Server::spawn(env.serve_command("127.0.0.1:0"));
    let status = refused
        .wait_exit(Duration::from_secs(10))
        .expect("exits at start");
    assert_eq!(status.code(), Some(78), "{}", refused.log());
    assert!(
        refused
            .wait_log(
                "the database has schema version 99, newer than this hookrunner knows",
                Duration::from_secs(5)
            )
            .is_some(),
        "{}",
        refused.log()
    );
    assert!(
        !refused.log().contains("bringing the store"),
        "{}",
        refused.log()
    );
    // check says so before a start does, reading the file's header alone (it leaves no -wal or -shm,
    // which as another user would stop the daemon).
    let out = env.check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("schema version 99, newer"), "{err}");
}

#[test]
fn entries_left_queued_by_a_kill_run_after_the_restart() {
    let env = Env::new().config("max_running = 8");
    let dir = env.path().to_path_buf();
    let go = dir.join("go");
    env.script(
        "q.sh",
        &format!(
            "while [ ! -e {go:?} ]; do sleep 0.05; done\nprintf '%s\\n' \"$(cat \"$1\")\" >> {ran:?}",
            ran = dir.join("ran")
        ),
    );
    env.routes("Q q.sh async\n");
    const N: usize = 1000;
    let mut server = env.serve();
    let addr = server.addr;
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= N {
                        break;
                    }
                    let r =
                        post_to(addr, "/hooks/Q", &[], n.to_string().as_bytes()).expect("answer");
                    assert_eq!(r.status, 202);
                }
            });
        }
    });
    server.signal(libc::SIGKILL);
    server.wait_exit(Duration::from_secs(10)).expect("killed");
    let _release = crate::util::Release(go.clone());
    let server = restart(&env);
    // Those the kill caught running are queued again, and counted with the rest.
    let line = server.wait_log("queued deliveries to run", Duration::from_secs(10));
    assert!(
        line.as_deref()
            .is_some_and(|l| l.contains(&format!(": {N} queued deliveries to run"))),
        "{}",
        server.log()
    );
    fs::write(&go, "").expect("go");
    let expected: HashSet<String> = (0..N).map(|n| n.to_string()).collect();
    let all = || expected.is_subset(&lines(&dir.join("ran")).into_iter().collect());
    assert!(
        wait_until(Duration::from_secs(90), all),
        "ran {}",
        lines(&dir.join("ran")).len()
    );
    // A script the kill orphaned may find its payload file removed by the restart (stale files go at
    // start), and print nothing: that is not a run of its entry, which runs again.
    let unexpected: Vec<String> = lines(&dir.join("ran"))
        .into_iter()
        .filter(|l| !l.is_empty() && !expected.contains(l))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
}

/// A script `name` that appends its attempt number to `<env>/attempts`, touches `<env>/started`, then
/// waits (10 s at most) for `<env>/go`, which the returned guard creates when dropped.
fn held_script(env: &Env, name: &str) -> crate::util::Release {
    let dir = env.path();
    env.script(
        name,
        &format!(
            "echo \"$HOOKRUNNER_ATTEMPT\" >> {attempts:?}\n{}",
            crate::util::wait_for_release(&dir.join("started"), &dir.join("go")),
            attempts = dir.join("attempts")
        ),
    );
    crate::util::Release(dir.join("go"))
}

/// A store others can write, or another user's, decides what runs as the daemon's user (its queued entries
/// name their scripts), and so does a state_dir others can add files to or a log beside the database that
/// is not the daemon's: the daemon refuses them at start, naming the file and what to do.
#[test]
fn a_store_others_can_write_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    env.script("a.sh", "exit 0");
    env.routes("A a.sh async\n");
    drop(env.serve());
    let db = env.state().join("hookrunner.db");
    // A configuration error (78: the unit does not restart it), and one `check` reports too where it is
    // the modes; the owners `check` leaves alone, as it may run as another user than the daemon.
    let refused = |path: &std::path::Path, why: &str| {
        let mut server = Server::spawn(env.serve_command("127.0.0.1:0"));
        let status = server
            .wait_exit(Duration::from_secs(10))
            .expect("the daemon exits");
        assert_eq!(status.code(), Some(78), "{why}: {}", server.log());
        let check = env.check();
        let said = String::from_utf8_lossy(&check.stderr);
        let by_mode = !why.contains("owned") && !why.contains("another user");
        assert_eq!(
            check.status.code(),
            Some(if by_mode { 78 } else { 0 }),
            "{why}: {said}"
        );
        assert_eq!(
            said.contains(&format!("state_dir: {} belongs to uid", path.display())),
            by_mode,
            "{why}: {said}"
        );
        assert!(
            server
                .log()
                .contains(&format!("{} belongs to uid", path.display())),
            "{why}: {}",
            server.log()
        );
    };
    fs::set_permissions(&db, fs::Permissions::from_mode(0o666)).expect("chmod");
    refused(&db, "mode 0666");
    fs::set_permissions(&db, fs::Permissions::from_mode(0o600)).expect("chmod");
    // A directory others can add files to (sticky or not): they could put a log of theirs beside it.
    fs::set_permissions(env.state(), fs::Permissions::from_mode(0o1777)).expect("chmod");
    refused(&env.state(), "a sticky state_dir anyone can write to");
    fs::set_permissions(env.state(), fs::Permissions::from_mode(0o700)).expect("chmod");
    if is_root() {
        std::os::unix::fs::chown(&db, Some(65534), None).expect("chown");
        refused(&db, "owned by nobody");
        std::os::unix::fs::chown(&db, Some(0), None).expect("chown");
        // SQLite replays a log it finds beside the database, whoever wrote it.
        let wal = env.state().join("hookrunner.db-wal");
        fs::write(&wal, b"").expect("a planted log");
        std::os::unix::fs::chown(&wal, Some(65534), None).expect("chown");
        refused(&wal, "a log that is another user's");
        fs::remove_file(&wal).expect("remove");
    }
    let server = env.serve();
    assert_eq!(server.post("/hooks/A", b"{}").status, 202);
}

/// `check` run by another user than the daemon's (an operator who is not root) cannot look into a private
/// state_dir, 0700 as the package makes it: that is no error, the daemon checks the files itself.
#[test]
fn check_by_another_user_passes_a_state_dir_it_cannot_look_into() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !is_root() {
        println!("skipped: running check as another user needs root");
        return;
    }
    let env = Env::new();
    env.script("a.sh", "exit 0");
    env.routes("A a.sh async\n");
    drop(env.serve());
    assert!(env.state().join("hookrunner.db").exists());
    // All the rest readable by others; the state and payload directories stay the daemon's (0700).
    let config = env.config_path();
    for (path, mode) in [
        (env.path().to_path_buf(), 0o755),
        (env.scripts(), 0o755),
        (config.clone(), 0o644),
        (env.path().join("routes"), 0o644),
    ] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let check_as_nobody = || {
        Command::new(crate::util::BIN)
            .arg("check")
            .arg("--config")
            .arg(&config)
            .env("STATE_DIRECTORY", env.state())
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run check as nobody")
    };
    let out = check_as_nobody();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("# configuration OK"),
        "{said}"
    );
    // The operator's CLI as that user: a store it may not read is said to be so, not missing.
    let out = Command::new(crate::util::BIN)
        .args(["deliveries", "list", "--config"])
        .arg(&config)
        .env("STATE_DIRECTORY", env.state())
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run deliveries as nobody");
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("cannot read the store in ")
            && said.contains("(run as root or as the daemon's user)"),
        "{said}"
    );
    // Yet what it can see, it checks: the same directory open to everyone is refused.
    fs::set_permissions(env.state(), fs::Permissions::from_mode(0o777)).expect("chmod");
    let out = check_as_nobody();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{said}");
    assert!(said.contains("state_dir: "), "{said}");
}

/// Entries queued while the clock read an hour ahead (the store is edited while the daemon is down, as a
/// clock stepped back at boot leaves it) run at the next start, not an hour later: a first attempt of a
/// route and one of a serial lane, whose wait would hold the lane too.
#[test]
fn entries_queued_while_the_clock_read_ahead_run_when_it_was_set_back() {
    let env = Env::new().config("max_running = 2");
    let dir = env.path().to_path_buf();
    let ran = dir.join("ran");
    let _release = held_script(&env, "h.sh");
    env.script(
        "c.sh",
        &format!("printf '%s\\n' \"$(cat \"$1\")\" >> {ran:?}"),
    );
    env.routes("H h.sh async\nC c.sh async\nS c.sh async serial\n");
    let mut server = env.serve();
    assert_eq!(server.post("/hooks/H", b"H").status, 202);
    assert!(wait_until(Duration::from_secs(10), || dir
        .join("started")
        .exists()));
    // The one slot for queued runs is held: these two wait.
    assert_eq!(server.post("/hooks/C", b"C").status, 202);
    assert_eq!(server.post("/hooks/S", b"S").status, 202);
    server.signal(libc::SIGKILL);
    server.wait_exit(Duration::from_secs(10)).expect("killed");
    let db = rusqlite::Connection::open(env.state().join("hookrunner.db")).expect("open the store");
    let ahead = db
        .execute(
            "UPDATE deliveries SET received_at = received_at + 3600000, due_at = due_at + 3600000
             WHERE event IN ('C', 'S')",
            [],
        )
        .expect("as if queued an hour ahead");
    assert_eq!(ahead, 2);
    drop(db);
    fs::write(dir.join("go"), "").expect("go");
    let server = restart(&env);
    assert!(
        wait_until(Duration::from_secs(10), || lines(&ran).len() >= 2),
        "{:?}\n{}",
        lines(&ran),
        server.log()
    );
    let mut got = lines(&ran);
    got.sort();
    assert_eq!(got, ["C", "S"]);
    assert!(
        server.log().contains(
            "2 queued deliveries were due later than any pause could put them (the clock was set back"
        ),
        "{}",
        server.log()
    );
}

/// A daemon on `env` whose one async entry (route `R`, a script held until released) is running: the server,
/// the entry's request id, and the release of its script.
fn held_entry_running(env: &Env) -> (Server, String, crate::util::Release) {
    let release = held_script(env, "r.sh");
    env.routes("R r.sh async\n");
    let server = env.serve();
    let accepted = server.post("/hooks/R", b"{}");
    assert_eq!(accepted.status, 202);
    let request_id = accepted.json()["request_id"]
        .as_str()
        .expect("request id")
        .to_string();
    assert!(wait_until(Duration::from_secs(10), || env
        .path()
        .join("started")
        .exists()));
    (server, request_id, release)
}

/// An entry is marked running before its script starts: the operator's `drop` cannot remove it while the
/// script runs, and a kill mid-run counts the interrupted attempt, so the run after the restart is told it
/// is the second.
#[test]
fn a_running_entry_cannot_be_dropped_and_a_kill_mid_run_counts_its_attempt() {
    let env = Env::new();
    let dir = env.path().to_path_buf();
    let go = dir.join("go");
    let (mut server, request_id, _release) = held_entry_running(&env);
    // At once, while the script runs: refused, and the entry stays.
    let dropped = deliveries(&env, &["drop", &request_id]);
    assert_eq!(
        dropped.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&dropped.stdout)
    );
    assert_eq!(show(&env, &request_id)["state"], "running");
    server.signal(libc::SIGKILL);
    server.wait_exit(Duration::from_secs(10)).expect("killed");
    fs::remove_file(dir.join("started")).expect("remove");
    let server = restart(&env);
    assert!(wait_until(Duration::from_secs(10), || dir
        .join("started")
        .exists()));
    assert_eq!(lines(&dir.join("attempts")), ["1", "2"]);
    fs::write(&go, "").expect("go");
    let done = wait_state(&env, "R", "done", Duration::from_secs(10));
    assert_eq!(done["attempts"], 2);
    drop(server);
}

/// With no daemon on the store, an entry a kill left "running" is an interrupted one that the next start
/// would run at once: `drop` removes it (a script that takes the daemon down with it must be stoppable
/// without starting the daemon).
#[test]
fn an_entry_a_kill_left_running_can_be_dropped_while_no_daemon_runs() {
    let env = Env::new();
    let dir = env.path().to_path_buf();
    let (mut server, request_id, _release) = held_entry_running(&env);
    server.signal(libc::SIGKILL);
    server.wait_exit(Duration::from_secs(10)).expect("killed");
    assert_eq!(show(&env, &request_id)["state"], "running");
    let dropped = deliveries(&env, &["drop", &request_id]);
    assert!(
        dropped.status.success(),
        "{}{}",
        String::from_utf8_lossy(&dropped.stdout),
        String::from_utf8_lossy(&dropped.stderr)
    );
    fs::remove_file(dir.join("started")).expect("remove");
    let server = restart(&env);
    let started = wait_until(Duration::from_secs(2), || dir.join("started").exists());
    assert!(!started, "the dropped entry ran again:\n{}", server.log());
    assert_eq!(lines(&dir.join("attempts")), ["1"]);
}

/// A second daemon on the same store (here with a payload directory of its own, as `sudo hookrunner serve`
/// beside the service gets) is refused before it touches the store: it would take the first daemon's
/// running entry for one a crash left, queue it again and run it a second time.
#[test]
fn a_second_daemon_on_the_same_store_is_refused_and_a_running_entry_runs_once() {
    let env = Env::new();
    let dir = env.path().to_path_buf();
    let go = dir.join("go");
    let _release = held_script(&env, "r.sh");
    env.routes("R r.sh async\n");
    let server = env.serve();
    assert_eq!(server.post("/hooks/R", b"{}").status, 202);
    assert!(wait_until(Duration::from_secs(10), || dir
        .join("started")
        .exists()));
    // The same scripts and routes, its own payload directory, the first one's store.
    let other = Env::new();
    other.script("r.sh", "exit 0");
    other.routes("R r.sh async\n");
    let refused = || {
        let mut command = other.serve_command("127.0.0.1:0");
        command.env("STATE_DIRECTORY", env.state());
        let mut second = Server::spawn(command);
        let status = second
            .wait_exit(Duration::from_secs(10))
            .expect("the second daemon exits");
        assert!(!status.success(), "{status:?}");
        assert!(
            second.log().contains(
                "is in use by another hookrunner serve; give each daemon its own state_dir"
            ),
            "{}",
            second.log()
        );
    };
    refused();
    // With the lock file removed, the directory's own lock still holds.
    fs::remove_file(env.state().join("hookrunner.db.lock")).expect("rm the lock file");
    refused();
    assert_eq!(
        rows(&env, &["--event", "R"])[0]["state"],
        "running",
        "the first daemon's entry is left as it was"
    );
    fs::write(&go, "").expect("go");
    let done = wait_state(&env, "R", "done", Duration::from_secs(10));
    assert_eq!(done["attempts"], 1);
    assert_eq!(lines(&dir.join("attempts")), ["1"], "ran once");
    drop(server);
}

/// Starts the daemon right after a kill -9 of the last one. The killed daemon's lock on `payload_dir` can
/// outlive it for an instant: a script it was starting holds a copy of every descriptor between fork and
/// exec. A start refused for that alone is tried again, briefly.
fn restart(env: &Env) -> Server {
    for _ in 0..50 {
        let mut server = Server::spawn(env.serve_command("127.0.0.1:0"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let log = server.log();
            if let Some(line) = log.lines().find(|l| l.contains("listening on ")) {
                server.addr = line
                    .split("listening on ")
                    .nth(1)
                    .and_then(|a| a.trim().parse().ok())
                    .expect("address");
                return server;
            }
            if log.contains("is in use by another hookrunner") {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            server.log().contains("is in use by another hookrunner"),
            "did not start:\n{}",
            server.log()
        );
        server.wait_exit(Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("payload_dir stayed locked after the kill");
}

/// Acknowledging a burst comes before running it: while acks come faster than 1,000 a second, queued runs
/// start at most one per 100 ms (after the few that start before the burst is told from steady traffic),
/// so the burst's answers do not wait behind a thousand script start-ups; when it ends, every entry runs.
#[test]
fn a_burst_is_acknowledged_before_its_runs_start_and_all_of_it_runs_after() {
    const CLIENTS: usize = 8;
    const EACH: usize = 600;
    let env = Env::new();
    let started = env.path().join("started");
    // The script's first act is to note when it started, in nanoseconds of the wall clock.
    env.script("burst.sh", &format!("date +%s%N >> {started:?}"));
    env.routes("* burst.sh async\n");
    let server = env.serve();
    let began = Instant::now();
    let mut acked_at: Vec<Instant> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                s.spawn(|| {
                    let mut stream = server.connect();
                    let mut at = Vec::with_capacity(EACH);
                    for _ in 0..EACH {
                        let headers = [("Content-Type", "application/json")];
                        crate::util::send(
                            &mut stream,
                            "POST",
                            "/hooks/Burst",
                            &headers,
                            b"{}",
                            false,
                        );
                        let answer = Response::read(&mut stream).expect("an answer");
                        assert_eq!(answer.status, 202, "{}", answer.text());
                        at.push(Instant::now());
                    }
                    at
                })
            })
            .collect();
        clients
            .into_iter()
            .flat_map(|c| c.join().expect("client"))
            .collect()
    });
    let took = began.elapsed();
    let ended_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos();
    let acks = CLIENTS * EACH;
    let lines = || {
        fs::read_to_string(&started)
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim().parse::<u128>().expect("a time in ns"))
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(Duration::from_secs(300), || lines().len() >= acks),
        "{} of {acks} acknowledged entries ran\n{}",
        lines().len(),
        server.log()
    );
    assert_eq!(lines().len(), acks, "an entry ran twice");
    let rate = acks as f64 / took.as_secs_f64();
    if rate < 2_000.0 {
        println!(
            "the pace not checked: {rate:.0} acks a second here is too close to a burst's 1,000"
        );
        return;
    }
    let during = lines().iter().filter(|&&t| t <= ended_ns).count();
    // The daemon tells a burst by 20 ms spans of 20 acks or more. Where the acks stalled (a machine busy
    // with other work), a span of fewer looks like the burst's end, and up to `max_running` (32) runs may
    // start then: such stretches are counted, each 20 acks that took over 20 ms, and three at most are
    // allowed for. Not more: unpaced runs stall the acks themselves (without the pace, 190-300 runs
    // started here during such a burst, with 2-11 stalls).
    acked_at.sort();
    let (mut stalls, mut i) = (0, 0);
    while i + 20 < acked_at.len() {
        if acked_at[i + 20] - acked_at[i] > Duration::from_millis(20) {
            stalls += 1;
            i += 20;
        } else {
            i += 1;
        }
    }
    // The starts before the burst is told (20 acks' worth at most: a few ms of them), then one per 100 ms.
    let allowed = 50 + (took.as_millis() / 100) as usize + 32 * stalls.min(3);
    println!(
        "{during} runs started during a {took:?} burst of {acks} acks ({rate:.0} a second, {stalls} \
         stalls)"
    );
    assert!(
        during <= allowed,
        "{during} runs started during a {took:?} burst of {acks} acks ({rate:.0} a second); at most \
         {allowed} may"
    );
}

/// The kill -9 storm: numbered events from 4 clients while the daemon is killed and restarted at random;
/// every event that was answered 2xx must have run at least once.
#[test]
fn kill_9_storm_loses_no_acknowledged_event() {
    const EVENTS: usize = 2000;
    const KILLS: usize = 50;
    let env = Env::new();
    let ran = env.path().join("ran");
    env.script(
        "n.sh",
        &format!("printf '%s\\n' \"$(cat \"$1\")\" >> {ran:?}"),
    );
    env.routes("N n.sh async\n");
    let addr: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
    let acked = Mutex::new(HashSet::new());
    let next = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let started = Instant::now();
    let mut kills = 0;
    let mut last: Option<Server> = None;
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let mut retry: Option<usize> = None;
                // A bound for a machine far too slow; the clients finish on the last daemon.
                while started.elapsed() < Duration::from_secs(400) {
                    let n = match retry.take() {
                        Some(n) => n,
                        None => {
                            let n = next.fetch_add(1, Ordering::SeqCst);
                            if n >= EVENTS {
                                break;
                            }
                            n
                        }
                    };
                    let Some(to) = *addr.lock().expect("addr") else {
                        retry = Some(n);
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    match post_to(to, "/hooks/N", &[], n.to_string().as_bytes()) {
                        Some(r) if (200..300).contains(&r.status) => {
                            acked.lock().expect("acked").insert(n);
                            // Paced, so the events spread over the whole storm.
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        // Refused or cut off by the kill: the client tries the same event again.
                        _ => retry = Some(n),
                    }
                }
            });
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut random = move |max: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % max
        };
        // Every kill made, and then more while events are still to be sent, for 100 s at most.
        while kills < KILLS
            || (next.load(Ordering::SeqCst) < EVENTS
                && started.elapsed() < Duration::from_secs(100))
        {
            let mut server = restart(&env);
            *addr.lock().expect("addr") = Some(server.addr);
            std::thread::sleep(Duration::from_millis(20 + random(80)));
            *addr.lock().expect("addr") = None;
            server.signal(libc::SIGKILL);
            server.wait_exit(Duration::from_secs(10)).expect("killed");
            kills += 1;
        }
        done.store(true, Ordering::SeqCst);
        // The clients finish what they had left on this last daemon; the scope waits for them.
        let server = restart(&env);
        *addr.lock().expect("addr") = Some(server.addr);
        last = Some(server);
    });
    assert!(last.is_some());
    assert!(done.load(Ordering::SeqCst));
    let acked = acked.into_inner().expect("acked");
    let all_ran = || {
        let ran: HashSet<usize> = lines(&ran).iter().filter_map(|l| l.parse().ok()).collect();
        acked.is_subset(&ran)
    };
    let settled = wait_until(Duration::from_secs(60), all_ran);
    let runs: Vec<usize> = lines(&ran).iter().filter_map(|l| l.parse().ok()).collect();
    let unique: HashSet<usize> = runs.iter().copied().collect();
    let lost = acked.difference(&unique).count();
    println!(
        "kill -9 storm: {kills} kills, acked {}, lost {lost}, duplicates {}",
        acked.len(),
        runs.len() - unique.len()
    );
    assert!(kills >= KILLS, "only {kills} kills");
    assert_eq!(
        acked.len(),
        EVENTS,
        "every event was acknowledged in the end"
    );
    assert!(settled && lost == 0, "lost {lost} acknowledged events");
}

/// An acknowledged entry is a promise even after its route is made sync and the history turned off: the
/// store, which nothing else needs any more, is opened to run it, and the daemon says why.
#[test]
fn entries_left_queued_run_after_their_route_is_made_sync_with_the_history_off() {
    let mut env = Env::new();
    let dir = env.path().to_path_buf();
    let (started, never, tries) = (dir.join("started"), dir.join("never"), dir.join("tries"));
    env.script(
        "q.sh",
        &format!(
            "echo \"$HOOKRUNNER_ATTEMPT\" >> {tries:?}\nif [ \"$HOOKRUNNER_ATTEMPT\" = 1 ]; then\n{}\nfi",
            crate::util::wait_for_release(&started, &never)
        ),
    );
    env.routes("Q q.sh async\n");
    let id;
    {
        let mut server = env.serve();
        let r = server.post("/hooks/Q", b"{}");
        assert_eq!(r.status, 202);
        id = r.json()["request_id"].as_str().expect("id").to_string();
        assert!(wait_until(Duration::from_secs(10), || started.exists()));
        // The "running" mark is committed within the writer's 250 ms gather.
        std::thread::sleep(Duration::from_millis(750));
        server.child.kill().expect("kill -9");
        server.child.wait().expect("reap");
    }
    env.routes("Q q.sh\n");
    env.reconfigure("history = false");
    let server = env.serve();
    assert!(
        wait_until(Duration::from_secs(10), || lines(&tries) == ["1", "2"]),
        "{:?}\n{}",
        lines(&tries),
        server.log()
    );
    assert!(
        server
            .wait_log(
                "acknowledged delivery from before still waits",
                Duration::from_secs(5)
            )
            .is_some(),
        "{}",
        server.log()
    );
    // The interrupted attempt is in the history: the script saw attempt 2 the second time.
    let show = || String::from_utf8_lossy(&deliveries(&env, &["show", &id]).stdout).into_owned();
    assert!(
        wait_until(Duration::from_secs(10), || show().contains("done")),
        "{}",
        show()
    );
    assert!(
        show().contains("interrupted: hookrunner stopped"),
        "{}",
        show()
    );
}

/// A serial route runs its entries one at a time and strictly in arrival order, and a later entry waits
/// while an earlier one waits to retry (README, "Ordering").
#[test]
fn a_serial_route_runs_in_arrival_order_one_at_a_time_waiting_for_retries() {
    let env = Env::new();
    let log = env.path().join("log");
    env.script(
        "s.sh",
        &format!(
            "n=$(cat \"$1\")\necho \"start $n $HOOKRUNNER_ATTEMPT\" >> {log:?}\nsleep 0.05\n\
             echo \"end $n\" >> {log:?}\n\
             [ \"$n\" != 0 ] && [ \"$n\" != 3 ] || [ \"$HOOKRUNNER_ATTEMPT\" != 1 ]"
        ),
    );
    env.routes("S s.sh async serial retries=2 retry_max=1s\n");
    let server = env.serve();
    for n in 0..8 {
        assert_eq!(
            server.post("/hooks/S", n.to_string().as_bytes()).status,
            202
        );
    }
    // Entries 0 and 3 fail their first attempt and are retried 0.5-1 s later.
    let mut want = Vec::new();
    for n in 0..8 {
        let attempts: &[u32] = if n == 0 || n == 3 { &[1, 2] } else { &[1] };
        for attempt in attempts {
            want.push(format!("start {n} {attempt}"));
            want.push(format!("end {n}"));
        }
    }
    assert!(
        wait_until(Duration::from_secs(30), || lines(&log).len() >= want.len()),
        "{:?}\n{}",
        lines(&log),
        server.log()
    );
    assert_eq!(lines(&log), want);
}

/// The other routes' entries start in the order they came due: a first attempt when it arrived, a retry
/// when it is due (README, "Order"). With one slot for queued runs, held by entry 1: entries 2-4 arrive
/// before entry 0 is made due again (`deliveries retry`), 5-7 after, so its run comes between them.
#[test]
fn entries_start_in_the_order_they_came_due() {
    let env = Env::new().config("max_running = 2");
    let dir = env.path().to_path_buf();
    let log = dir.join("log");
    env.script(
        "q.sh",
        &format!(
            "n=$(cat \"$1\")\necho \"$n $HOOKRUNNER_ATTEMPT\" >> {log:?}\n\
             if [ \"$n\" = 1 ]; then {hold}; fi\n\
             [ \"$n\" != 0 ] || [ \"$HOOKRUNNER_ATTEMPT\" != 1 ]",
            hold = crate::util::wait_for_release(&dir.join("started"), &dir.join("go"))
        ),
    );
    env.routes("Q q.sh async retries=0\n");
    let server = env.serve();
    let post = |n: u32| {
        let answer = server.post("/hooks/Q", n.to_string().as_bytes());
        assert_eq!(answer.status, 202);
        answer.json()["request_id"]
            .as_str()
            .expect("request id")
            .to_string()
    };
    let first = post(0);
    wait_state(&env, "Q", "dead", Duration::from_secs(10));
    let release = crate::util::Release(dir.join("go"));
    post(1);
    assert!(wait_until(Duration::from_secs(10), || dir
        .join("started")
        .exists()));
    for n in 2..5 {
        post(n);
    }
    let retried = deliveries(&env, &["retry", &first]);
    assert!(
        retried.status.success(),
        "{}",
        String::from_utf8_lossy(&retried.stderr)
    );
    for n in 5..8 {
        post(n);
    }
    drop(release);
    assert!(
        wait_until(Duration::from_secs(20), || lines(&log).len() >= 9),
        "{:?}\n{}",
        lines(&log),
        server.log()
    );
    assert_eq!(
        lines(&log),
        [
            "0 1", "1 1", "2 1", "3 1", "4 1", "0 2", "5 1", "6 1", "7 1"
        ]
    );
}

/// A busy serial lane takes no slot from an entry of another route that came due before its next entry:
/// with one slot for queued runs, S0 holds it while S1, P and S2 arrive in that order; they run in that
/// order, not the lane's entries first.
#[test]
fn a_serial_lane_does_not_take_the_slots_of_entries_that_came_due_first() {
    let env = Env::new().config("max_running = 2");
    let dir = env.path().to_path_buf();
    let log = dir.join("log");
    env.script(
        "s.sh",
        &format!(
            "n=$(cat \"$1\")\necho \"$n\" >> {log:?}\n\
             if [ \"$n\" = S0 ]; then {hold}; fi",
            hold = crate::util::wait_for_release(&dir.join("started"), &dir.join("go"))
        ),
    );
    env.routes("S s.sh async serial\nP s.sh async\n");
    let server = env.serve();
    let release = crate::util::Release(dir.join("go"));
    let post = |route: &str, body: &str| {
        assert_eq!(
            server
                .post(&format!("/hooks/{route}"), body.as_bytes())
                .status,
            202
        );
    };
    post("S", "S0");
    assert!(wait_until(Duration::from_secs(10), || dir
        .join("started")
        .exists()));
    post("S", "S1");
    post("P", "P");
    post("S", "S2");
    drop(release);
    assert!(
        wait_until(Duration::from_secs(20), || lines(&log).len() >= 4),
        "{:?}\n{}",
        lines(&log),
        server.log()
    );
    assert_eq!(lines(&log), ["S0", "S1", "P", "S2"]);
}

/// A route that runs a serial lane's script without `serial` does not free the lane when its runs end:
/// the lane's entries still run one at a time, in order, while the other route's run beside them.
#[test]
fn a_serial_lane_stays_one_at_a_time_beside_a_route_running_its_script_without_serial() {
    let env = Env::new().config("max_running = 8");
    let log = env.path().join("log");
    env.script(
        "s.sh",
        &format!(
            "n=$(cat \"$1\")\necho \"start $n\" >> {log:?}\nsleep 0.05\necho \"end $n\" >> {log:?}"
        ),
    );
    env.routes("S s.sh async serial\nP s.sh async\n");
    let server = env.serve();
    for n in 0..6 {
        assert_eq!(
            server.post("/hooks/S", format!("s{n}").as_bytes()).status,
            202
        );
        for m in 0..3 {
            assert_eq!(
                server
                    .post("/hooks/P", format!("p{n}{m}").as_bytes())
                    .status,
                202
            );
        }
    }
    assert!(
        wait_until(Duration::from_secs(30), || lines(&log).len() >= 48),
        "{:?}\n{}",
        lines(&log),
        server.log()
    );
    let serial: Vec<String> = lines(&log)
        .into_iter()
        .filter(|l| l.ends_with(|c: char| c.is_ascii_digit()) && l.contains(" s"))
        .collect();
    let want: Vec<String> = (0..6)
        .flat_map(|n| [format!("start s{n}"), format!("end s{n}")])
        .collect();
    assert_eq!(serial, want);
}

/// A serial route keeps its order across a reload that moves it to another line of the routes file: a
/// later entry, queued under the new line, still waits while an earlier one waits to retry.
#[test]
fn a_serial_route_keeps_its_order_across_a_reload_that_moves_its_line() {
    let env = Env::new();
    let log = env.path().join("log");
    env.script(
        "s.sh",
        &format!(
            "n=$(cat \"$1\")\necho \"start $n $HOOKRUNNER_ATTEMPT\" >> {log:?}\n\
             [ \"$n\" != 0 ] || [ \"$HOOKRUNNER_ATTEMPT\" != 1 ]"
        ),
    );
    env.routes("S s.sh async serial retries=2 retry_max=1s\n");
    let server = env.serve();
    assert_eq!(server.post("/hooks/S", b"0").status, 202);
    // Entry 0 failed its first attempt and waits 0.5-1 s for its second.
    // The first line, not the whole log: on a slow machine the retry may have come before this look.
    assert!(
        wait_until(Duration::from_secs(10), || lines(&log)
            .first()
            .is_some_and(|l| l == "start 0 1")),
        "{:?}\n{}",
        lines(&log),
        server.log()
    );
    env.routes(
        "# a line above the route moves it to line 2\nS s.sh async serial retries=2 retry_max=1s\n",
    );
    server.signal(libc::SIGHUP);
    assert!(
        server
            .wait_log("reloaded", Duration::from_secs(5))
            .is_some(),
        "{}",
        server.log()
    );
    assert_eq!(server.post("/hooks/S", b"1").status, 202);
    let want = ["start 0 1", "start 0 2", "start 1 1"];
    assert!(
        wait_until(Duration::from_secs(10), || lines(&log).len() >= want.len()),
        "{:?}\n{}",
        lines(&log),
        server.log()
    );
    assert_eq!(lines(&log), want, "{}", server.log());
}

/// At SIGTERM the dispatcher starts nothing more at once, even while a sync script keeps the daemon
/// answering its request: a retry that comes due meanwhile waits in the store for the next start.
/// A fixed script's symlink retargeted out of `scripts_dir` after the routes loaded is refused when a
/// request selects it and before a queued entry's attempt, as `check` refuses it, never followed.
#[test]
fn a_fixed_script_symlink_retargeted_out_of_scripts_dir_is_refused_sync_and_queued() {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let env = Env::new();
    let dir = env.path().to_path_buf();
    let (go, escaped) = (dir.join("go"), dir.join("escaped"));
    let _release = crate::util::Release(go.clone());
    let elsewhere = dir.join("elsewhere");
    fs::create_dir(&elsewhere).expect("mkdir");
    let evil = elsewhere.join("evil");
    fs::write(&evil, format!("#!/bin/sh\ntouch {escaped:?}\n")).expect("evil");
    fs::set_permissions(&evil, fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::create_dir(env.scripts().join("sub")).expect("mkdir sub");
    env.script(
        "sub/real",
        &crate::util::wait_for_release(&dir.join("started"), &go),
    );
    symlink("sub/real", env.scripts().join("a.sh")).expect("symlink");
    env.routes("A a.sh\nQ a.sh async serial retries=0\n");
    let server = env.serve();
    // The first queued entry runs (and waits); the second waits behind it in its serial lane.
    assert_eq!(server.post("/hooks/Q", b"{}").status, 202);
    assert!(wait_until(Duration::from_secs(10), || dir
        .join("started")
        .exists()));
    assert_eq!(server.post("/hooks/Q", b"{}").status, 202);
    fs::remove_file(env.scripts().join("a.sh")).expect("rm");
    symlink(&evil, env.scripts().join("a.sh")).expect("retarget");
    let refused = server.post("/hooks/A", b"{}");
    assert_eq!(refused.status, 500, "{}", refused.text());
    assert!(
        refused.text().contains("outside scripts_dir"),
        "{}",
        refused.text()
    );
    fs::write(&go, "").expect("go");
    assert!(
        server
            .wait_log(
                "event=Q attempt=1 exit=not-started dead",
                Duration::from_secs(10)
            )
            .is_some(),
        "{}",
        server.log()
    );
    assert!(!escaped.exists(), "a script outside scripts_dir ran");
    // Back inside, so the CLI (which loads the routes, and refuses them meanwhile) can show the entries.
    fs::remove_file(env.scripts().join("a.sh")).expect("rm");
    symlink("sub/real", env.scripts().join("a.sh")).expect("symlink");
    assert_eq!(rows(&env, &["--event", "Q", "--status", "done"]).len(), 1);
    let dead = rows(&env, &["--event", "Q", "--status", "dead"]);
    assert_eq!(dead.len(), 1);
    let shown = show(&env, &dead[0]["id"].to_string());
    assert!(shown.to_string().contains("outside scripts_dir"), "{shown}");
}

/// Out of descriptors while a queued entry is started (its payload file, its output pipes, its pidfd)
/// is the daemon's shortage, not the script's failure: the entry is put back without an attempt counted,
/// and runs once there are descriptors again, even on a route with no retries.
#[test]
fn out_of_descriptors_when_a_queued_run_starts_spends_no_attempt() {
    use rustix::process::{Pid, Resource, Rlimit, getrlimit, prlimit};
    let env = Env::new();
    let runs = env.path().join("runs");
    env.script("q.sh", &format!("echo ran >> {runs:?}"));
    env.routes("Q q.sh async retries=0\n");
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
    // One keep-alive connection, open before the limit is lowered: the accepts need no descriptor.
    let mut conn = server.connect();
    crate::util::send(&mut conn, "GET", "/healthz", &[], b"", false);
    assert_eq!(Response::read(&mut conn).expect("healthz").status, 200);
    let mut accepted = 0;
    // RLIMIT_NOFILE binds root too. With k descriptors free the k-th start fails a step further on.
    for k in 0..8 {
        set_limit(own.current);
        let idle = crate::util::open_fds(pid);
        let lowest_free = (0..).find(|n| !idle.contains(n)).expect("a free number");
        set_limit(Some(u64::from(lowest_free + k)));
        crate::util::send(&mut conn, "POST", "/hooks/Q", &[], b"{}", false);
        let answer = Response::read(&mut conn).expect("an answer");
        if answer.status != 202 {
            continue;
        }
        accepted += 1;
        // The dispatcher starts it at once, within the lowered limit: wait until it ran or was put back
        // (the dispatcher runs at nice 19, slow to get a CPU on a busy machine).
        let ran = lines(&runs).len();
        let put_back = server.log().matches("not counted as an attempt").count();
        wait_until(Duration::from_secs(10), || {
            lines(&runs).len() > ran
                || server.log().matches("not counted as an attempt").count() > put_back
        });
    }
    set_limit(own.current);
    assert!(accepted >= 4, "{accepted} accepted\n{}", server.log());
    assert!(
        server.log().contains("not counted as an attempt"),
        "no start ran out of descriptors:\n{}",
        server.log()
    );
    // Put back for 5 s, then run.
    assert!(
        wait_until(Duration::from_secs(20), || {
            rows(&env, &["--event", "Q", "--status", "done"]).len() == accepted
        }),
        "{:?}\n{}",
        rows(&env, &["--event", "Q"]),
        server.log()
    );
    for row in rows(&env, &["--event", "Q"]) {
        assert_eq!(row["attempts"], 1, "{row}");
    }
    // At least once each: a start that failed after the spawn (its pidfd) killed a script that may have
    // begun, and it runs again, as a sync request answered 503 is sent again.
    assert!(lines(&runs).len() >= accepted, "{:?}", lines(&runs));
}

/// A supervisor that signals every process of the service at a stop (systemd's default KillMode; the
/// unit we ship sets KillMode=mixed) kills the running script too. That is the stop's doing: the attempt
/// is not counted, and the entry runs again at the next start, even on a route with no retries.
#[test]
fn a_run_killed_along_with_the_daemon_at_a_stop_is_not_counted() {
    let env = Env::new();
    let dir = env.path().to_path_buf();
    let (pid, runs, second) = (dir.join("pid"), dir.join("runs"), dir.join("second"));
    env.script(
        "s.sh",
        &format!(
            "echo \"$HOOKRUNNER_ATTEMPT\" >> {runs:?}\necho $$ > {pid:?}.new && mv {pid:?}.new {pid:?}\n\
             [ -e {second:?} ] || sleep 10"
        ),
    );
    env.routes("S s.sh async retries=0\n");
    let mut server = env.serve();
    assert_eq!(server.post("/hooks/S", b"{}").status, 202);
    let mut group = 0;
    assert!(wait_until(Duration::from_secs(10), || {
        group = fs::read_to_string(&pid)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0);
        group > 0
    }));
    // What a supervisor does: every process of the service, in no promised order (the script runs in a
    // process group of its own, led by its shell). Here the script's group first: it may die before the
    // daemon has handled its own signal.
    // SAFETY: signalling the script's process group, which this test's daemon started.
    unsafe {
        libc::kill(-group, libc::SIGTERM);
    }
    // The daemon's signal follows at once (a fixed sleep could outlast the 0.5 s within which a death is
    // taken for the stop's on a loaded machine).
    assert!(crate::util::wait_gone(group, Duration::from_secs(10)));
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10)).expect("stopped");
    assert!(status.success(), "{status:?}\n{}", server.log());
    assert!(
        server
            .log()
            .contains("not counted, it runs again at the next start"),
        "{}",
        server.log()
    );
    fs::write(&second, "").expect("second");
    let server = restart(&env);
    let done = wait_state(&env, "S", "done", Duration::from_secs(10));
    assert_eq!(done["attempts"], 1, "the killed run was not counted");
    assert_eq!(lines(&runs), ["1", "1"]);
    drop(server);
}

#[test]
fn sigterm_starts_no_queued_run_while_a_sync_script_finishes() {
    let env = Env::new();
    let dir = env.path().to_path_buf();
    let (started, release, tries) = (dir.join("started"), dir.join("release"), dir.join("tries"));
    env.script(
        "sync.sh",
        &crate::util::wait_for_release(&started, &release),
    );
    // Fails its first attempt once the test says (after the stop began, so that however slow the machine
    // the retry comes due during the stop, 0.5-1 s later: the first pause, jittered).
    let fail = dir.join("fail");
    env.script(
        "flaky.sh",
        &format!(
            "echo \"$HOOKRUNNER_ATTEMPT\" >> {tries:?}\n[ \"$HOOKRUNNER_ATTEMPT\" != 1 ] && exit 0\n\
             i=0\nwhile [ ! -e {fail:?} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done\nexit 1"
        ),
    );
    env.routes("Sync sync.sh\nFlaky flaky.sh async retries=3 retry_max=1s\n");
    let mut server = env.serve();
    std::thread::scope(|scope| {
        let answer = scope.spawn(|| server.post("/hooks/Sync", b"{}").status);
        assert!(wait_until(Duration::from_secs(10), || started.exists()));
        assert_eq!(server.post("/hooks/Flaky", b"{}").status, 202);
        assert!(wait_until(Duration::from_secs(10), || lines(&tries) == ["1"]));
        server.signal(libc::SIGTERM);
        assert!(
            server
                .wait_log("stopping", Duration::from_secs(10))
                .is_some(),
            "{}",
            server.log()
        );
        fs::write(&fail, "").expect("fail");
        // Past the retry's due time, with the sync script still running.
        std::thread::sleep(Duration::from_millis(2_000));
        fs::write(&release, "").expect("release");
        assert_eq!(answer.join().expect("sync request"), 200);
    });
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        server.log()
    );
    assert_eq!(
        lines(&tries),
        ["1"],
        "a run started after SIGTERM:\n{}",
        server.log()
    );
    // The retry waited in the store: the next start runs it.
    let server = env.serve();
    assert!(
        wait_until(Duration::from_secs(10), || lines(&tries) == ["1", "2"]),
        "{:?}\n{}",
        lines(&tries),
        server.log()
    );
}

/// SIGTERM lets a queued run that is running finish, and records it: the script is not killed, the
/// daemon exits 0 once it ended, and its entry is done with one attempt (so no restart runs it again).
#[test]
fn sigterm_lets_a_running_queued_script_finish_and_records_it_done() {
    let env = Env::new();
    let dir = env.path().to_path_buf();
    let (started, release, ran) = (dir.join("started"), dir.join("release"), dir.join("ran"));
    env.script(
        "q.sh",
        &format!(
            "{}\necho ran >> {ran:?}",
            crate::util::wait_for_release(&started, &release)
        ),
    );
    env.routes("Q q.sh async\n");
    let mut server = env.serve();
    let _release = crate::util::Release(release.clone());
    assert_eq!(server.post("/hooks/Q", b"{}").status, 202);
    assert!(
        wait_until(Duration::from_secs(20), || started.exists()),
        "{}",
        server.log()
    );
    server.signal(libc::SIGTERM);
    assert!(
        server
            .wait_log("stopping", Duration::from_secs(10))
            .is_some(),
        "{}",
        server.log()
    );
    fs::write(&release, "").expect("release");
    let status = server.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        server.log()
    );
    assert_eq!(lines(&ran), ["ran"], "{}", server.log());
    let row = rows(&env, &["--event", "Q"]);
    assert_eq!(row.len(), 1, "{row:?}");
    assert_eq!(row[0]["state"], "done", "{row:?}\n{}", server.log());
    assert_eq!(row[0]["attempts"], 1, "{row:?}");
}

#[test]
fn sigterm_under_load_exits_within_the_grace_and_loses_nothing_acknowledged() {
    let env = Env::new();
    let ran = env.path().join("ran");
    env.script(
        "s.sh",
        &format!("sleep 0.3\nprintf '%s\\n' \"$(cat \"$1\")\" >> {ran:?}"),
    );
    env.routes("S s.sh async\n");
    let mut server = env.serve();
    let addr = server.addr;
    let acked = Mutex::new(HashSet::new());
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    match post_to(addr, "/hooks/S", &[], n.to_string().as_bytes()) {
                        Some(r) if (200..300).contains(&r.status) => {
                            acked.lock().expect("acked").insert(n);
                        }
                        Some(_) => {}
                        None => break,
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(800));
        let signalled = Instant::now();
        server.signal(libc::SIGTERM);
        let status = server.wait_exit(Duration::from_secs(30)).expect("exited");
        stop.store(true, Ordering::SeqCst);
        assert!(status.success(), "{status:?}");
        // Running scripts (0.3 s each) finish; nothing else holds it: the hundreds still queued would
        // take minutes. (About 1 s here with two busy loops beside it; the bound leaves room for CI.)
        assert!(
            signalled.elapsed() < Duration::from_secs(15),
            "{:?}",
            signalled.elapsed()
        );
    });
    let acked = acked.into_inner().expect("acked");
    assert!(!acked.is_empty());
    let _server = env.serve();
    let all_ran = || {
        let ran: HashSet<usize> = lines(&ran).iter().filter_map(|l| l.parse().ok()).collect();
        acked.is_subset(&ran)
    };
    assert!(
        wait_until(Duration::from_secs(60), all_ran),
        "acked {} ran {}",
        acked.len(),
        lines(&ran).len()
    );
}

#[test]
fn every_sync_request_leaves_a_history_row_with_its_status() {
    let env = Env::new();
    env.script("ok.sh", "echo fine");
    env.script("bad.sh", "echo broken >&2\nexit 4");
    env.script("slow.sh", "sleep 5");
    env.routes("OK ok.sh\nBAD bad.sh\nSLOW slow.sh timeout=200ms\n");
    let server = env.serve();
    assert_eq!(server.post("/hooks/OK", b"{\"a\":1}").status, 200);
    assert_eq!(server.post("/hooks/BAD", b"{}").status, 500);
    assert_eq!(server.post("/hooks/SLOW", b"{}").status, 504);
    assert!(wait_until(Duration::from_secs(10), || rows(&env, &[])
        .len()
        == 3));
    let ok = &rows(&env, &["--event", "OK"])[0];
    assert_eq!(
        (
            ok["mode"].as_str(),
            ok["state"].as_str(),
            ok["status"].as_u64()
        ),
        (Some("sync"), Some("done"), Some(200))
    );
    assert_eq!(ok["exit_code"], 0);
    assert_eq!(
        show(&env, &ok["id"].to_string())["attempts_made"][0]["output_tail"],
        "fine\n"
    );
    let bad = &rows(&env, &["--status", "4"])[0];
    assert_eq!(
        (
            bad["event"].as_str(),
            bad["state"].as_str(),
            bad["status"].as_u64()
        ),
        (Some("BAD"), Some("failed"), Some(500))
    );
    let slow = &rows(&env, &["--event", "sl*"])[0];
    assert_eq!(slow["status"], 504);
    assert_eq!(
        show(&env, &slow["id"].to_string())["attempts_made"][0]["timed_out"],
        true
    );
    let payload = deliveries(
        &env,
        &["show", ok["request_id"].as_str().expect("id"), "--payload"],
    );
    assert_eq!(payload.stdout, b"{\"a\":1}");
    // A body over 256 KiB is not kept in a sync row, but its size is, and show says why it has none.
    let large = vec![b'x'; 300_000];
    assert_eq!(server.post("/hooks/OK", &large).status, 200);
    assert!(wait_until(Duration::from_secs(10), || rows(&env, &[])
        .len()
        == 4));
    let row = &rows(&env, &["--event", "OK"])[0];
    assert_eq!(
        (&row["payload_bytes"], &row["payload_kept"]),
        (&300_000.into(), &false.into())
    );
    let none = deliveries(&env, &["show", &row["id"].to_string(), "--payload"]);
    assert_eq!(none.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&none.stderr)
            .contains("was not kept: a sync delivery's body over 256 KiB is not stored"),
        "{}",
        String::from_utf8_lossy(&none.stderr)
    );
}

/// A time of `deliveries` JSON, in milliseconds since the epoch.
fn millis(v: &Value) -> i64 {
    let t = humantime::parse_rfc3339(v.as_str().expect("a time")).expect("RFC 3339");
    let since = t.duration_since(std::time::UNIX_EPOCH).expect("after 1970");
    i64::try_from(since.as_millis()).expect("fits")
}

#[test]
fn a_sync_row_says_when_its_script_ran_and_the_list_is_in_arrival_order() {
    // One slot: the second request waits for the first's script to end before its own starts.
    let env = Env::new().config("max_running = 1\nqueue_wait = \"10s\"\n");
    let running = env.path().join("a-running");
    env.script("a.sh", &format!(": > {running:?}; sleep 3"));
    env.script("b.sh", "sleep 0.6");
    env.routes("A a.sh\nB b.sh\n");
    let server = env.serve();
    std::thread::scope(|s| {
        let first = s.spawn(|| server.post("/hooks/A", b"{}").status);
        assert!(wait_file(&running, Duration::from_secs(10)), "A never ran");
        assert_eq!(server.post("/hooks/B", b"{}").status, 200);
        assert_eq!(first.join().expect("first"), 200);
    });
    assert!(wait_until(Duration::from_secs(10), || rows(&env, &[])
        .len()
        == 2));
    let listed = rows(&env, &[]);
    // Newest first by arrival, whichever row the store wrote first.
    let events: Vec<_> = listed.iter().map(|r| r["event"].as_str()).collect();
    assert_eq!(events, [Some("B"), Some("A")], "{listed:?}");
    let a = show(&env, &listed[1]["id"].to_string());
    let b = show(&env, &listed[0]["id"].to_string());
    let received = millis(&b["received"]);
    let started = millis(&b["attempts_made"][0]["started"]);
    let finished = millis(&b["finished"]);
    let ran = b["attempts_made"][0]["duration_ms"]
        .as_f64()
        .expect("duration") as i64;
    // A's script ran from before B arrived to 3 s later: B's own started once A's had ended.
    assert!(received < millis(&a["finished"]), "{a}\n{b}");
    assert!(
        started >= millis(&a["finished"]) - 50,
        "B waited for A's script before its own started: {a}\n{b}"
    );
    assert!(
        (finished - started - ran).abs() <= 50,
        "finished is the script's end, not the row's write: {b}"
    );
}

#[test]
fn the_history_rows_of_the_last_requests_are_written_before_a_sigterm_exit() {
    let env = Env::new();
    env.script("ok.sh", "exit 0");
    env.routes("OK ok.sh\n");
    let mut server = env.serve();
    for _ in 0..3 {
        assert_eq!(server.post("/hooks/OK", b"{}").status, 200);
    }
    // At once: the rows are still gathering in the store's writer for company.
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10)).expect("exited");
    assert!(status.success(), "{status:?}");
    assert_eq!(rows(&env, &[]).len(), 3);
}

#[test]
fn pruning_drops_old_payloads_and_the_oldest_rows_but_never_a_waiting_entry() {
    let mut env = Env::new();
    env.script("ok.sh", "exit 0");
    // Retried far apart: it stays waiting through the restart.
    env.script("later.sh", "exit 75");
    env.routes("OK ok.sh\nW later.sh async retry_max=24h\n");
    {
        let server = env.serve();
        assert_eq!(server.post("/hooks/W", b"{\"keep\":1}").status, 202);
        let big = vec![b'x'; 100 << 10];
        for _ in 0..30 {
            assert_eq!(server.post("/hooks/OK", &big).status, 200);
        }
        assert!(wait_until(Duration::from_secs(10), || rows(
            &env,
            &["--event", "OK"]
        )
        .len()
            == 30));
    }
    // Over max_store_bytes: the oldest finished rows go, the older waiting entry stays.
    env.reconfigure("max_store_bytes = \"1MiB\"");
    {
        let server = env.serve();
        assert!(
            wait_until(Duration::from_secs(10), || server
                .log()
                .contains("store pruned")),
            "{}",
            server.log()
        );
    }
    let ok = rows(&env, &["--event", "OK"]);
    assert!(!ok.is_empty() && ok.len() < 30, "{} rows left", ok.len());
    let oldest_left = ok
        .iter()
        .filter_map(|r| r["id"].as_i64())
        .min()
        .expect("ids");
    assert!(oldest_left > 2, "the oldest rows went first");
    let waiting = rows(&env, &["--event", "W"]);
    assert_eq!(waiting.len(), 1, "a waiting entry is never pruned");
    // Past keep_payloads the bodies of finished rows go, not that of a waiting entry.
    env.reconfigure("keep_payloads = \"0s\"");
    let server = env.serve();
    assert!(
        wait_until(Duration::from_secs(10), || server
            .log()
            .contains("payload(s) dropped")),
        "{}",
        server.log()
    );
    let ok = rows(&env, &["--event", "OK"]);
    assert!(
        ok.iter().all(|r| r["payload_kept"] == false),
        "payloads older than 0s are dropped"
    );
    assert_eq!(rows(&env, &["--event", "W"])[0]["payload_kept"], true);
    let summary = String::from_utf8_lossy(&deliveries(&env, &["list"]).stdout).to_string();
    assert!(summary.contains("store "), "{summary}");
}

#[test]
fn check_validates_the_store_options() {
    let env = Env::new().config("max_queued = 0");
    env.script("a.sh", "exit 0");
    let out = env.check();
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("max_queued = 0 is out of range: use 1 to 10000000")
    );
    let env = Env::new();
    env.script("a.sh", "exit 0");
    env.routes("A a.sh async retries=200\n");
    let out = env.check();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("routes:1: retries=200 is out of range"));
    env.routes("A a.sh async ack_status=200 serial retries=3 retry_max=5m dedupe_key=json:/id\n");
    let out = env.check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        table.contains("async ack_status=200 retries=3 retry_max=5m serial dedupe_key=JSON /id"),
        "{table}"
    );
    // Options only the queue reads, on a route that runs sync, would do nothing: refused with their line,
    // whether the route says sync or the configuration's default (async = false) makes it so.
    let refused = |routes: &str, want: &str| {
        env.routes(routes);
        let out = env.check();
        assert_eq!(out.status.code(), Some(78), "{routes}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains(want), "{routes}: {said}");
    };
    refused(
        "A a.sh async\nB a.sh retries=9 retry_max=30m\n",
        "routes:2: retries= applies to async routes only, and it runs sync",
    );
    refused(
        "A a.sh sync serial\n",
        "routes:1: serial applies to async routes only, and it is marked sync",
    );
    refused(
        "A a.sh async sync\n",
        "routes:1: async and sync on one line",
    );
    let env = env.config("async = true");
    env.routes("A a.sh retries=9 serial\n");
    assert!(
        env.check().status.success(),
        "async by default: {}",
        String::from_utf8_lossy(&env.check().stderr)
    );
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Makes `dir` a tmpfs of `size` (mode 0700), unmounted when the result is dropped; `None`, saying the test
/// is skipped, where that cannot be done (not root, no mount).
fn small_tmpfs(dir: &std::path::Path, size: &str) -> Option<Mounted> {
    if !is_root() {
        println!("skipped: mounting a small tmpfs needs root");
        return None;
    }
    fs::create_dir(dir).expect("mount point");
    let mounted = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0700"),
            "tmpfs",
        ])
        .arg(dir)
        .status();
    if !mounted.as_ref().is_ok_and(|s| s.success()) {
        println!("skipped: cannot mount a tmpfs here ({mounted:?})");
        return None;
    }
    Some(Mounted(dir.to_path_buf()))
}

/// A pids cgroup holding one process, whose `pids.max` the test sets; the process is moved back to the
/// root group and the group removed when dropped.
struct PidsGroup {
    dir: std::path::PathBuf,
    pid: u32,
}

impl PidsGroup {
    /// `None`, saying the test is skipped, where no pids cgroup can be made (not root, no controller).
    fn holding(pid: u32) -> Option<PidsGroup> {
        let root = ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"]
            .into_iter()
            .map(std::path::Path::new)
            .find(|root| root.join("cgroup.procs").exists())?;
        let dir = root.join(format!("hookrunner-test-{pid}"));
        if !is_root() || fs::create_dir(&dir).is_err() || !dir.join("pids.max").exists() {
            println!("skipped: no pids cgroup can be made here");
            let _ = fs::remove_dir(&dir);
            return None;
        }
        let group = PidsGroup { dir, pid };
        fs::write(group.dir.join("cgroup.procs"), pid.to_string()).expect("move the daemon");
        Some(group)
    }

    /// No more tasks than there are now (`true`), or no bound.
    fn freeze(&self, frozen: bool) {
        let max = if frozen {
            fs::read_to_string(self.dir.join("pids.current"))
                .expect("pids.current")
                .trim()
                .to_string()
        } else {
            "max".to_string()
        };
        fs::write(self.dir.join("pids.max"), max).expect("pids.max");
    }
}

impl Drop for PidsGroup {
    fn drop(&mut self) {
        let root = self.dir.parent().expect("root");
        let _ = fs::write(root.join("cgroup.procs"), self.pid.to_string());
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Out of threads (systemd's TasksMax, RLIMIT_NPROC): a queued entry waits and runs once threads can be
/// had again, rather than the dispatcher ending for good while the daemon goes on answering 202; a new
/// connection that no thread can serve is answered 503 at once rather than left waiting.
#[test]
fn out_of_threads_delays_queued_runs_and_refuses_new_connections() {
    let env = Env::new();
    let runs = env.path().join("runs");
    env.script("q.sh", &format!("echo ran >> {runs:?}"));
    env.routes("Q q.sh async retries=0\n");
    let server = env.serve();
    let Some(group) = PidsGroup::holding(server.child.id()) else {
        return;
    };
    // A connection with its worker, before the bound.
    let mut conn = server.connect();
    crate::util::send(&mut conn, "GET", "/healthz", &[], b"", false);
    assert_eq!(Response::read(&mut conn).expect("healthz").status, 200);
    group.freeze(true);
    crate::util::send(&mut conn, "POST", "/hooks/Q", &[], b"{}", false);
    assert_eq!(Response::read(&mut conn).expect("accepted").status, 202);
    assert!(
        server
            .wait_log(
                "cannot start a thread for a queued run",
                Duration::from_secs(10)
            )
            .is_some(),
        "{}",
        server.log()
    );
    let mut fresh = server.connect();
    fresh
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    crate::util::send(&mut fresh, "GET", "/healthz", &[], b"", false);
    let refused = Response::read(&mut fresh).expect("an answer, not a wait");
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(refused.header("Retry-After").is_some());
    assert!(lines(&runs).is_empty());
    group.freeze(false);
    let done = wait_state(&env, "Q", "done", Duration::from_secs(10));
    assert_eq!(done["attempts"], 1);
    assert_eq!(lines(&runs), ["ran"]);
    assert_eq!(server.get("/healthz").status, 200);
}

#[test]
fn a_full_disk_is_answered_503_never_2xx_and_service_resumes_when_space_is_freed() {
    let env = Env::new();
    let Some(_mount) = small_tmpfs(&env.state(), "8m") else {
        return;
    };
    // Space that can be given back later: three quarters of the file system. Until SQLite checkpoints
    // (after a commit past 1,000 pages, and the checkpoint needs room for the database to grow by what the
    // log holds) every write appends to the log, and each entry caught waiting by the full disk still has
    // two of them to come (its "running" mark and its result, each rewriting its 64 KiB row): the room
    // freed must hold those writes and the database's growth at the checkpoint. With 2 MiB freed of 4, the
    // log took it all before a checkpoint could run, and the store stayed full (1 CI run in about 10).
    let filler = env.state().join("filler");
    fs::write(&filler, vec![0u8; 6 << 20]).expect("filler");
    let ran = env.path().join("ran");
    env.script(
        "f.sh",
        // One write per run, so the lines of runs at the same time do not interleave.
        &format!("printf '%s\\n' \"$(head -c 8 \"$1\")\" >> {ran:?}"),
    );
    env.routes("F f.sh async\n");
    let server = env.serve();
    let mut acked = HashSet::new();
    let mut refused = None;
    for n in 0..200usize {
        let mut body = format!("{n:08}").into_bytes();
        body.resize(64 << 10, b'x');
        let r = server.post("/hooks/F", &body);
        match r.status {
            202 => {
                acked.insert(format!("{n:08}"));
            }
            503 => {
                assert!(r.header("Retry-After").is_some());
                assert!(
                    r.text().contains("cannot queue the delivery"),
                    "{}",
                    r.text()
                );
                refused = Some(n);
                break;
            }
            other => panic!("answer {other} to {n}: {}", r.text()),
        }
    }
    assert!(
        !acked.is_empty() && refused.is_some(),
        "acked {} refused {refused:?}",
        acked.len()
    );
    // A failed commit leaves its partial space reusable, so the next may fit: 202 or 503, nothing else.
    let mut big = b"full....".to_vec();
    big.resize(64 << 10, b'x');
    let mut never = vec![format!("{:08}", refused.expect("refused"))];
    match server.post("/hooks/F", &big).status {
        202 => {
            acked.insert("full....".into());
        }
        status => {
            assert_eq!(status, 503);
            never.push("full....".into());
        }
    }
    fs::remove_file(&filler).expect("free space");
    let resumed = server.post("/hooks/F", b"resumed!");
    assert_eq!(resumed.status, 202, "{}", resumed.text());
    acked.insert("resumed!".into());
    let all_ran = || {
        let ran: HashSet<String> = lines(&ran).into_iter().collect();
        acked.is_subset(&ran)
    };
    assert!(
        wait_until(Duration::from_secs(30), all_ran),
        "acked {acked:?} ran {:?}\n{}",
        lines(&ran),
        server.log()
    );
    // What was answered 503 was not kept: it never runs.
    let ran = lines(&ran);
    for body in &never {
        assert!(!ran.contains(body), "{body} was refused but ran: {ran:?}");
    }
}

/// When the daemon itself cannot prepare an attempt (here: the payload directory is full, so the payload
/// file cannot be written), the script never had its chance: the entry waits and runs once there is room,
/// and the failure spends none of its attempts (a route with one attempt is not dead of it).
#[test]
fn a_full_payload_directory_spends_no_attempt_and_the_entry_runs_when_there_is_room() {
    let env = Env::new();
    let Some(_mount) = small_tmpfs(&env.payloads(), "256k") else {
        return;
    };
    let ran = env.path().join("ran");
    env.script(
        "f.sh",
        &format!("echo \"$HOOKRUNNER_ATTEMPT $(wc -c < \"$1\")\" >> {ran:?}"),
    );
    env.routes("F f.sh async retries=0\n");
    let server = env.serve();
    // Filled after the start (the daemon refuses a payload directory holding files not its own).
    let filler = env.payloads().join("filler");
    let mut fill = fs::File::create(&filler).expect("filler");
    while fill.write_all(&[0u8; 4096]).is_ok() {}
    drop(fill);
    let r = server.post("/hooks/F", &[b'x'; 8192]);
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["request_id"]
        .as_str()
        .expect("request_id")
        .to_string();
    assert!(
        server
            .wait_log("not counted as an attempt", Duration::from_secs(10))
            .is_some(),
        "{}",
        server.log()
    );
    let show = || String::from_utf8_lossy(&deliveries(&env, &["show", &id]).stdout).into_owned();
    assert!(!show().contains("dead"), "{}", show());
    assert!(!ran.exists(), "the script ran without its payload");
    fs::remove_file(&filler).expect("free space");
    assert!(
        wait_until(Duration::from_secs(15), || lines(&ran) == ["1 8192"]),
        "{:?}\n{}",
        lines(&ran),
        server.log()
    );
    assert!(
        wait_until(Duration::from_secs(5), || show().contains("done")),
        "{}",
        show()
    );
}

/// An attempt whose result cannot be committed (here: an operator's `sqlite3` holding the write lock
/// past the store's 5 s busy timeout) is not left marked running until a restart: the result is
/// committed once the store can write again, and the entry goes on to its next attempt.
#[test]
fn a_result_that_cannot_be_committed_at_first_is_committed_later_and_the_entry_goes_on() {
    let env = Env::new();
    let dir = env.path().to_path_buf();
    let (started, release, ran) = (dir.join("started"), dir.join("release"), dir.join("ran"));
    env.script(
        "f.sh",
        &format!(
            "if [ \"$HOOKRUNNER_ATTEMPT\" = 1 ]; then\n{}\nexit 1\nfi\necho \"$HOOKRUNNER_ATTEMPT\" >> {ran:?}",
            crate::util::wait_for_release(&started, &release)
        ),
    );
    env.routes("F f.sh async retries=3 retry_max=100ms\n");
    let server = env.serve();
    let r = server.post("/hooks/F", b"{}");
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(wait_until(Duration::from_secs(10), || started.exists()));
    // The "running" mark is committed with the next commit or within the writer's 250 ms gather.
    std::thread::sleep(Duration::from_millis(750));
    // A write lock held from another process, as `sqlite3` in a BEGIN IMMEDIATE would, until the test
    // has seen the result refused (a line on its stdin).
    let mut lock = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)\n\
             c.execute('BEGIN IMMEDIATE')\n\
             print('locked', flush=True)\n\
             sys.stdin.readline()\n\
             c.execute('ROLLBACK')\n",
        )
        .arg(env.state().join("hookrunner.db"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut said = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(lock.stdout.as_mut().expect("stdout")),
        &mut said,
    )
    .expect("read");
    assert_eq!(said.trim(), "locked");
    fs::write(&release, "").expect("release");
    assert!(
        server
            .wait_log("cannot record attempt 1", Duration::from_secs(15))
            .is_some(),
        "the lock did not keep the result out:\n{}",
        server.log()
    );
    // Let go: dropping stdin ends the line python waits for.
    drop(lock.stdin.take());
    assert!(lock.wait().expect("wait").success());
    assert!(
        wait_until(Duration::from_secs(20), || lines(&ran) == ["2"]),
        "attempt 2 never ran: {:?}\n{}",
        lines(&ran),
        server.log()
    );
}

#[test]
fn a_failed_fsync_is_answered_503_and_the_daemon_exits_1_losing_nothing_acknowledged() {
    if !crate::util::has_strace() {
        return;
    }
    let env = Env::new();
    let ran = env.path().join("ran");
    env.script(
        "e.sh",
        &format!("printf '%s\\n' \"$(cat \"$1\")\" >> {ran:?}"),
    );
    env.routes("E e.sh async\n");
    {
        let mut server = env.serve();
        for n in 0..3 {
            assert_eq!(
                server
                    .post("/hooks/E", format!("before-{n}").as_bytes())
                    .status,
                202
            );
        }
        assert!(wait_until(Duration::from_secs(10), || lines(&ran).len() == 3));
        server.signal(libc::SIGTERM);
        assert!(
            server
                .wait_exit(Duration::from_secs(10))
                .is_some_and(|s| s.success())
        );
    }
    // Under the fault the script waits for a release: its result, a synced commit, cannot meet the failed
    // fsync before the requests do (its "running" mark is not synced).
    let release = env.path().join("release");
    env.script(
        "e-held.sh",
        &format!(
            "while [ ! -e {release:?} ]; do sleep 0.05; done\nprintf '%s\\n' \"$(cat \"$1\")\" >> {ran:?}"
        ),
    );
    env.routes("E e-held.sh async\n");
    let _release = crate::util::Release(release.clone());
    // From the third fsync or fdatasync of each thread on, every one fails: starting passes (the main thread
    // syncs twice at most on a database that exists), then the store's writer fails within a few commits.
    let (mut server, daemon) = env.serve_under_strace(&[
        "-o",
        "/dev/null",
        "-e",
        "trace=fsync,fdatasync",
        "-e",
        "inject=fsync,fdatasync:error=EIO:when=3+",
    ]);
    let mut acked: HashSet<String> = (0..3).map(|n| format!("before-{n}")).collect();
    let mut refused = 0;
    for n in 0..20 {
        let body = format!("during-{n}");
        match post_to(server.addr, "/hooks/E", &[], body.as_bytes()) {
            Some(r) if r.status == 202 => {
                // Once a commit's fsync failed, nothing is acknowledged again.
                assert_eq!(
                    refused,
                    0,
                    "a 202 after a 503 for a failed fsync\n{}",
                    server.log()
                );
                acked.insert(body);
            }
            Some(r) => {
                assert_eq!(r.status, 503, "never anything but 202 or 503: {}", r.text());
                assert!(r.header("Retry-After").is_some());
                refused += 1;
            }
            // The daemon is gone, having answered the failed commit's requests.
            None => break,
        }
    }
    assert!(
        refused >= 1,
        "no request met the failed fsync\n{}",
        server.log()
    );
    let status = server
        .wait_exit(Duration::from_secs(15))
        .expect("the daemon stops");
    // Gone by itself: nothing left for the guard, whose pid may be another's by the restart below.
    drop(daemon);
    assert_eq!(
        status.code(),
        Some(1),
        "exits 1 for its supervisor to restart it\n{}",
        server.log()
    );
    assert!(server.log().contains("failed fsync"), "{}", server.log());
    println!(
        "failed fsync: {} acknowledged during, {refused} refused",
        acked.len() - 3
    );
    // Restarted without the fault: everything acknowledged runs, and it serves again.
    fs::write(&release, "").expect("release");
    let server = env.serve();
    assert_eq!(server.post("/hooks/E", b"after").status, 202);
    acked.insert("after".into());
    let all_ran = || acked.is_subset(&lines(&ran).into_iter().collect());
    assert!(
        wait_until(Duration::from_secs(20), all_ran),
        "acked {acked:?} ran {:?}",
        lines(&ran)
    );
}

/// Acknowledging does not cost an fsync a request: the commits of requests that arrive together share one
/// (group commit). Counted by strace: 16 connections sending 50 async requests each at once are acknowledged
/// with at most a quarter as many fsync and fdatasync calls in the whole daemon (one a request without it).
#[test]
fn requests_acknowledged_together_share_their_fsyncs() {
    if !crate::util::has_strace() {
        return;
    }
    const CLIENTS: usize = 16;
    const EACH: usize = 50;
    // One run at a time, held: the runs' own writes stay out of the count.
    let env = Env::new().config("max_running = 1\n");
    let release = env.path().join("release");
    env.script(
        "g.sh",
        &format!("while [ ! -e {release:?} ]; do sleep 0.05; done"),
    );
    env.routes("G g.sh async\n");
    let trace = env.path().join("syncs");
    let trace_arg = trace.to_str().expect("a UTF-8 path");
    // Each sync made to take 20 ms, as a slow disk's does: requests arrive during every one, and a fast
    // disk (or a tmpfs) cannot make each request's commit its own by being quick.
    let (server, _daemon) = env.serve_under_strace(&[
        "-o",
        trace_arg,
        "-e",
        "trace=fsync,fdatasync",
        "-e",
        "inject=fsync,fdatasync:delay_exit=20000",
    ]);
    let _release = crate::util::Release(release);
    let syncs = || {
        fs::read_to_string(&trace)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("fsync(") || l.contains("fdatasync("))
            .count()
    };
    let before = syncs();
    let acked = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for c in 0..CLIENTS {
            let (acked, addr) = (&acked, server.addr);
            s.spawn(move || {
                for n in 0..EACH {
                    let body = format!("{c}-{n}");
                    if post_to(addr, "/hooks/G", &[], body.as_bytes())
                        .is_some_and(|r| r.status == 202)
                    {
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    let acked = acked.into_inner();
    let synced = syncs() - before;
    println!("{acked} acknowledged with {synced} fsync/fdatasync calls");
    assert_eq!(acked, CLIENTS * EACH, "{}", server.log());
    assert!(
        synced * 4 <= acked,
        "{synced} syncs for {acked} acknowledgements: commits are not shared"
    );
}

/// Another process holding the store's write lock (an operator's `BEGIN IMMEDIATE` in sqlite3) turns async
/// requests into 503s with Retry-After soon enough for a sender that waits 2 s to read them, and nothing of
/// them runs; once the lock is let go, the next request is queued and run.
#[test]
fn a_write_lock_held_elsewhere_is_a_prompt_503_not_a_wait() {
    let env = Env::new();
    let ran = env.path().join("ran");
    env.script(
        "a.sh",
        &format!("printf '%s\\n' \"$(cat \"$1\")\" >> {ran:?}"),
    );
    env.routes("A a.sh async\n");
    let server = env.serve();
    assert_eq!(server.post("/hooks/A", b"first").status, 202);
    // The first one's run settled: its marks, had they met the lock, would wait before the request does.
    wait_state(&env, "A", "done", Duration::from_secs(20));
    let db = rusqlite::Connection::open(env.state().join("hookrunner.db")).expect("open the store");
    db.execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let started = Instant::now();
    let refused = server.post("/hooks/A", b"refused");
    let waited = started.elapsed();
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(
        refused.header("Retry-After").is_some(),
        "{:?}",
        refused.headers
    );
    assert!(
        waited < Duration::from_millis(1800),
        "answered after {waited:?}: a sender waiting 2 s would not read it"
    );
    db.execute_batch("COMMIT").expect("let go");
    assert_eq!(server.post("/hooks/A", b"last").status, 202);
    assert!(
        wait_until(Duration::from_secs(10), || lines(&ran).len() == 2),
        "{:?}\n{}",
        lines(&ran),
        server.log()
    );
    let mut ran = lines(&ran);
    ran.sort();
    assert_eq!(ran, ["first", "last"]);
}

/// The store's files changed under a running daemon (its -wal truncated, as a careless restore does):
/// once a read finds the database damaged, the daemon stops answering 2xx for entries no start would
/// find, and exits for its supervisor; a start on a file that is no database at all is a configuration
/// error (78), which a supervisor does not retry, saying what happened.
#[test]
fn a_store_damaged_under_the_daemon_stops_it_and_a_start_on_one_is_refused() {
    let env = Env::new();
    env.script("q.sh", "sleep 1");
    env.routes("Q q.sh async serial\n");
    let mut server = env.serve();
    for _ in 0..3 {
        assert_eq!(server.post("/hooks/Q", b"{}").status, 202);
    }
    let wal = env.state().join("hookrunner.db-wal");
    fs::OpenOptions::new()
        .write(true)
        .open(&wal)
        .and_then(|f| f.set_len(0))
        .expect("truncate the -wal");
    let exited = server
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("still serving on a damaged store:\n{}", server.log()));
    assert_eq!(exited.code(), Some(1), "{}", server.log());
    assert!(
        server.log().contains("changed while a daemon had it open"),
        "{}",
        server.log()
    );
    // No database at all.
    for suffix in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(env.state().join(format!("hookrunner.db{suffix}")));
    }
    fs::write(env.state().join("hookrunner.db"), vec![b'x'; 8192]).expect("garbage");
    let out = env.check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("file is not a database"), "{err}");
    assert!(
        !env.state().join("hookrunner.db-shm").exists(),
        "check created nothing beside it"
    );
    let out = env
        .serve_command("127.0.0.1:0")
        .output()
        .expect("run serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("file is not a database")
            && err.contains("see the README on restoring the store"),
        "{err}"
    );
}

/// A delivery answered 503 because the queue was full was not accepted, so its id is not remembered: the
/// sender's retry of it, once there is room, is a new delivery (202, no `duplicate`) and runs, once. (A
/// full queue is found before the accept writes anything, and the job is refused without a rollback:
/// a dedupe key written before that check would stay, and every retry would be answered as a duplicate
/// of a delivery that never ran.)
#[test]
fn a_delivery_refused_for_a_full_queue_is_not_remembered_for_dedupe() {
    let env = Env::new().config("max_queued = 1");
    let dir = env.path().to_path_buf();
    let (started, release, ran) = (dir.join("started"), dir.join("release"), dir.join("ran"));
    let _release = crate::util::Release(release.clone());
    // Only the first body waits: the retry of d1 runs at once.
    env.script(
        "w.sh",
        &format!(
            "if [ \"$(cat \"$1\")\" = hold ]; then\n{}\nfi\nprintf '%s %s\\n' \"$(cat \"$1\")\" \"$HOOKRUNNER_DELIVERY_ID\" >> {ran:?}",
            crate::util::wait_for_release(&started, &release)
        ),
    );
    env.routes("W w.sh async\n");
    let server = env.serve();
    assert_eq!(server.post("/hooks/W", b"hold").status, 202);
    // Running, and a running entry counts toward max_queued: the queue is full.
    assert!(
        wait_until(Duration::from_secs(10), || started.exists()),
        "{}",
        server.log()
    );
    let delivery = [("X-GitHub-Delivery", "d1")];
    let refused = server.request("POST", "/hooks/W", &delivery, b"d1");
    assert_eq!(refused.status, 503, "{}\n{}", refused.text(), server.log());
    assert!(
        refused.text().contains("max_queued = 1"),
        "refused for the bound: {}",
        refused.text()
    );
    fs::write(&release, "").expect("release");
    wait_state(&env, "W", "done", Duration::from_secs(20));
    let waiting = || {
        ["queued", "running"]
            .iter()
            .map(|state| rows(&env, &["--status", state]).len())
            .sum::<usize>()
    };
    assert!(
        wait_until(Duration::from_secs(10), || waiting() == 0),
        "{:?}",
        rows(&env, &[])
    );
    let again = server.request("POST", "/hooks/W", &delivery, b"d1");
    assert_eq!(again.status, 202, "{}\n{}", again.text(), server.log());
    assert!(
        !again.text().contains("duplicate"),
        "the refused delivery was remembered: {}\n{}",
        again.text(),
        server.log()
    );
    let request_id = again.json()["request_id"]
        .as_str()
        .expect("request id")
        .to_string();
    // Both entries finished, and nothing else was kept that could run later.
    let done = || rows(&env, &["--status", "done"]).len();
    assert!(
        wait_until(Duration::from_secs(20), || done() == 2),
        "{:?}\n{}",
        rows(&env, &[]),
        server.log()
    );
    let all = rows(&env, &[]);
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[0]["request_id"], request_id.as_str(), "{all:?}");
    assert_eq!(all[0]["attempts"], 1, "{all:?}");
    assert_eq!(lines(&ran), ["hold ", "d1 d1"], "{}", server.log());
}

/// An async route is reached only past the same checks as a sync one: a bad signature, a signature made
/// for another body (401), an event the sender may not send (403), and a body no route line's filter
/// takes (404) queue nothing, leave no row and run nothing, and the delivery id they all carried is not
/// taken: the one good request with it is a new delivery, answered 202, and runs.
#[test]
fn async_routes_are_authenticated_and_routed_as_sync_ones_and_refusals_queue_nothing() {
    let env = Env::new();
    let key = "async-github-secret-0123";
    let file = crate::util::secret(&env, "github-secret", key);
    let env = env.config(&format!(
        "[[sender]]\nname = \"gh\"\ntype = \"github\"\nsecret_file = {file:?}\nevents = [\"push\", \"ping\"]\n"
    ));
    let ran = env.path().join("ran");
    env.script(
        "deploy.sh",
        &format!("printf '%s %s %s\\n' \"$HOOKRUNNER_SENDER\" \"$HOOKRUNNER_EVENT\" \"$HOOKRUNNER_DELIVERY_ID\" >> {ran:?}"),
    );
    // `issues` has a line, but the sender may not send it; `ping` may be sent, but has no line.
    env.routes("push deploy.sh async /ref=refs/heads/main\nissues deploy.sh async\n");
    let server = env.serve();
    let main = br#"{"ref":"refs/heads/main"}"#;
    let dev = br#"{"ref":"refs/heads/dev"}"#;
    let good = github_sign(key, main);
    let send = |event: &str, signature: &str, body: &[u8]| {
        server.request(
            "POST",
            "/",
            &[
                ("X-GitHub-Event", event),
                ("X-GitHub-Delivery", "gh-1"),
                ("X-Hub-Signature-256", signature),
                ("Content-Type", "application/json"),
            ],
            body,
        )
    };
    let other_secret = github_sign("another-secret-0123456", main);
    let issues = github_sign(key, br#"{"action":"opened"}"#);
    let ping = github_sign(key, br#"{"zen":"x"}"#);
    // Signed for `dev`: sent with `main` it is a signature for another body, sent with `dev` a good one.
    let dev_signed = github_sign(key, dev);
    let refusals: [(&str, &str, &str, &[u8], u16); 5] = [
        (
            "another secret's signature",
            "push",
            &other_secret,
            main,
            401,
        ),
        (
            "a signature for another body",
            "push",
            &dev_signed,
            main,
            401,
        ),
        (
            "an event outside the sender's events",
            "issues",
            &issues,
            br#"{"action":"opened"}"#,
            403,
        ),
        (
            "a body the route's filter refuses",
            "push",
            &dev_signed,
            dev,
            404,
        ),
        (
            "an event with no route line",
            "ping",
            &ping,
            br#"{"zen":"x"}"#,
            404,
        ),
    ];
    for (what, event, signature, body, status) in refusals {
        let r = send(event, signature, body);
        assert_eq!(r.status, status, "{what}: {}\n{}", r.text(), server.log());
        assert!(!r.text().contains("queued"), "{what}: {}", r.text());
        assert!(rows(&env, &[]).is_empty(), "{what}: {:?}", rows(&env, &[]));
        assert!(lines(&ran).is_empty(), "{what}: {:?}", lines(&ran));
        assert_eq!(
            crate::util::payload_files(&env),
            [".lock"],
            "{what} left a payload file"
        );
    }
    let accepted = send("push", &good, main);
    assert_eq!(
        accepted.status,
        202,
        "{}\n{}",
        accepted.text(),
        server.log()
    );
    assert_eq!(accepted.json()["queued"], true, "{}", accepted.text());
    assert!(
        !accepted.text().contains("duplicate"),
        "a refused request took the delivery id: {}",
        accepted.text()
    );
    let done = wait_state(&env, "push", "done", Duration::from_secs(20));
    assert_eq!(done["sender"], "gh", "{done}");
    // The rows of the refusals, had any been written, would have been committed before this one's.
    let all = rows(&env, &[]);
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(lines(&ran), ["gh push gh-1"], "{}", server.log());
}

/// A route's `timeout=` holds for its queued runs as for sync ones: a script that would sleep 60 s is
/// stopped at 300 ms on each attempt (by SIGTERM: the 30 s `kill_grace` never comes into it), each
/// attempt is kept as timed out, and the entry is dead after its two attempts (`retries=1`) within
/// seconds, not after the configured 120 s timeout.
#[test]
fn a_routes_timeout_applies_to_each_queued_attempt() {
    let env = Env::new().config("timeout = \"120s\"\nkill_grace = \"30s\"");
    let pids = env.path().join("pids");
    env.script(
        "hang.sh",
        &format!("echo $$ >> {pids:?}\necho \"try $HOOKRUNNER_ATTEMPT\"\nsleep 60"),
    );
    env.routes("T hang.sh async timeout=300ms retries=1 retry_max=100ms\n");
    let server = env.serve();
    let r = server.post("/hooks/T", b"{}");
    assert_eq!(r.status, 202, "{}", r.text());
    // Two attempts of 300 ms and a pause of at most 100 ms between them; under the configured timeout
    // alone the first attempt would still be running.
    let dead = wait_state(&env, "T", "dead", Duration::from_secs(20));
    let shown = show(&env, &dead["id"].to_string());
    let attempts = shown["attempts_made"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{shown}\n{}", server.log());
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a["timed_out"], true, "attempt {}: {shown}", i + 1);
        assert_eq!(a["output_tail"], format!("try {}\n", i + 1), "{shown}");
        let ms = a["duration_ms"].as_f64().expect("duration");
        // Stopped at its deadline by SIGTERM, not by the SIGKILL 30 s later (the bound leaves room for a
        // run at nice 19 on a busy machine, slow to see its deadline and reap the script).
        assert!(
            (300.0..10_000.0).contains(&ms),
            "attempt {} ran {ms} ms: {shown}",
            i + 1
        );
    }
    // Every attempt's script is gone, its group killed.
    for pid in lines(&pids) {
        let pid: i32 = pid.parse().expect("a pid");
        assert!(
            crate::util::wait_gone(pid, Duration::from_secs(10)),
            "script {pid} outlived its timeout"
        );
    }
}

/// A delivery id is remembered for `dedupe_window` and no longer: within it a repeat is answered as a
/// duplicate and not run; once it has passed, the same id is a new delivery, answered 202 and run. With
/// `dedupe_window = "0s"` nothing is remembered, not even an id accepted a moment before.
#[test]
fn the_dedupe_window_expires_and_zero_remembers_nothing() {
    const WINDOW: Duration = Duration::from_secs(5);
    let mut env = Env::new().config(&format!("dedupe_window = \"{}s\"", WINDOW.as_secs()));
    let ran = env.path().join("ran");
    env.script(
        "d.sh",
        &format!("printf '%s\\n' \"$(cat \"$1\")\" >> {ran:?}"),
    );
    env.routes("D d.sh async\n");
    let delivery = [("X-GitHub-Delivery", "same-id")];
    let done = |env: &Env| rows(env, &["--status", "done"]).len();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    {
        let server = env.serve();
        let before = Instant::now();
        let first = server.request("POST", "/hooks/D", &delivery, b"first");
        assert_eq!(first.status, 202, "{}", first.text());
        assert_eq!(first.json()["duplicate"], Value::Null, "{}", first.text());
        let first_id = first.json()["request_id"].clone();
        // Posted again until it is no longer a duplicate: each answer that came back within the window
        // (counted from before the first was sent, so from before its key was written) must be one.
        let mut duplicates = 0;
        let mut new = None;
        let expired = wait_until(WINDOW + Duration::from_secs(20), || {
            let r = server.request("POST", "/hooks/D", &delivery, b"again");
            let answered = before.elapsed();
            assert_eq!(r.status, 202, "{}", r.text());
            if r.json()["duplicate"] == true {
                assert_eq!(r.json()["request_id"], first_id, "{}", r.text());
                duplicates += 1;
                return false;
            }
            assert!(
                answered > WINDOW,
                "forgotten {answered:?} after the first was sent, within the window: {}",
                r.text()
            );
            new = Some(r.json()["request_id"].clone());
            true
        });
        assert!(
            expired,
            "still a duplicate after the window:\n{}",
            server.log()
        );
        assert!(duplicates >= 1, "no repeat came within the window");
        let new = new.expect("the new delivery");
        assert_ne!(new, first_id);
        // Two entries, both done: the duplicates left none, so none of them can run later.
        assert!(
            wait_until(Duration::from_secs(20), || done(&env) == 2),
            "{:?}\n{}",
            rows(&env, &[]),
            server.log()
        );
        assert_eq!(rows(&env, &[]).len(), 2, "{:?}", rows(&env, &[]));
        assert_eq!(sorted(lines(&ran)), ["again", "first"], "{}", server.log());
    }
    // Off: the id the daemon accepted a moment ago is not looked at, and a repeat is a new delivery.
    env.reconfigure("dedupe_window = \"0s\"");
    let server = restart(&env);
    for body in ["zero-1", "zero-2"] {
        let r = server.request("POST", "/hooks/D", &delivery, body.as_bytes());
        assert_eq!(r.status, 202, "{}", r.text());
        assert!(
            !r.text().contains("duplicate"),
            "{body}: remembered with dedupe_window = \"0s\": {}",
            r.text()
        );
    }
    assert!(
        wait_until(Duration::from_secs(20), || done(&env) == 4),
        "{:?}\n{}",
        rows(&env, &[]),
        server.log()
    );
    assert_eq!(rows(&env, &[]).len(), 4, "{:?}", rows(&env, &[]));
    // The two entries of the second daemon may run side by side, in either order.
    assert_eq!(
        sorted(lines(&ran)),
        ["again", "first", "zero-1", "zero-2"],
        "{}",
        server.log()
    );
}
