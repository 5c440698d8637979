//! Sender authentication against the real binary: each scheme with signatures made by the senders' own
//! libraries, the failures (none of which may write a payload file or run a script, or log a secret), path
//! selection, event and address restrictions, and the secure default.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::io::Write;

use crate::util::{
    BIN, Env, Response, Server, github_sign, open_payload_files, payload, payload_files, secret,
    standard_webhooks_sign, wait_until,
};

/// A script that appends its sender, delivery id and the start of its body (on one line) to
/// `<env>/runs`, one line per run.
fn counter(env: &Env, name: &str) -> PathBuf {
    let out = env.path().join("runs");
    env.script(
        name,
        &format!(
            "printf '%s %s %s\\n' \"$HOOKRUNNER_SENDER\" \"$HOOKRUNNER_DELIVERY_ID\" \"$(tr -d '\\n' < \"$1\" | head -c 20)\" >> {out:?}"
        ),
    );
    out
}

fn runs(path: &PathBuf) -> Vec<String> {
    fs::read_to_string(path)
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// The request's own log line (`<id> <peer> <method> <path> ... status=...`), written after its answer:
/// waited for, over TCP or the unix socket alike (the warning about a failure starts with the id too).
fn request_line(server: &Server, id: &str) -> String {
    let start = format!(" {id} ");
    let mut found = None;
    wait_until(Duration::from_secs(10), || {
        found = server
            .log()
            .lines()
            .find(|l| l.contains(&start) && l.contains(" status="))
            .map(str::to_string);
        found.is_some()
    });
    found.unwrap_or_else(|| panic!("no line for {id}:\n{}", server.log()))
}

/// Asserts a refusal got the generic answer its status stands for (401 "authentication required", 403
/// "forbidden"), ran nothing, left no payload file, and logged neither `secrets` nor what was sent.
fn assert_refused(
    server: &Server,
    env: &Env,
    response: &Response,
    status: u16,
    runs_file: &PathBuf,
    secrets: &[&str],
) {
    assert_eq!(response.status, status, "{}", response.text());
    let error = response.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let generic = match status {
        401 => "authentication required",
        403 => "forbidden",
        other => panic!("{other} is not a sender's refusal: {}", response.text()),
    };
    assert_eq!(error, generic, "the generic answer for {status}");
    assert!(
        runs(runs_file).is_empty(),
        "a refused request ran a script: {:?}",
        runs(runs_file)
    );
    assert_eq!(
        payload_files(env),
        [".lock"],
        "a refused request left a payload file"
    );
    // The request's own line is written after the answer: wait for it before looking for secrets.
    let id = response.json()["request_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let line = request_line(server, &id);
    assert!(
        line.contains(&format!("status={status}")) && line.contains(" auth=\""),
        "{line}"
    );
    let log = server.log();
    for secret in secrets {
        assert!(!log.contains(secret), "{secret:?} is in the log:\n{log}");
    }
}

/// A GET without a body hands its query string to the script as the payload, but a signature covers the
/// body alone: behind a signing sender the query must not become the payload, or one signed empty body
/// (whose HMAC never changes) would carry any payload an attacker writes after the `?`.
#[test]
fn behind_a_signing_sender_a_get_query_does_not_become_the_payload() {
    let env = Env::new();
    let key = "It's a Secret to Everybody";
    let file = secret(&env, "github-secret", key);
    let env = env.config(&format!(
        "[[sender]]\nname = \"gh\"\ntype = \"github\"\nsecret_file = {file:?}\n"
    ));
    let out = env.path().join("payloads-seen");
    env.script(
        "ping",
        &format!("printf '[%s]\\n' \"$(cat \"$1\")\" >> {out:?}"),
    );
    let server = env.serve();
    // (octokit refuses to sign an empty payload; openssl does it.)
    let hmac = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", key])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl");
    let hmac = String::from_utf8_lossy(&hmac.stdout);
    let signature = format!("sha256={}", hmac.trim().rsplit(' ').next().expect("hex"));
    assert_eq!(signature.len(), 7 + 64, "{signature}");
    let r = server.request(
        "GET",
        "/hooks/ping?rm=-rf&target=everything",
        &[("X-Hub-Signature-256", signature.as_str())],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        runs(&out),
        ["[]"],
        "the script saw the unsigned query as its payload"
    );
}

#[test]
fn github_signatures_made_by_octokit_pass_and_anything_else_fails() {
    let env = Env::new();
    let key = "It's a Secret to Everybody";
    let file = secret(&env, "github-secret", key);
    let env = env.config(&format!(
        "[[sender]]\nname = \"gh\"\ntype = \"github\"\nsecret_file = {file:?}\n"
    ));
    let out = counter(&env, "ping");
    let server = env.serve();
    let body = payload("github-json-ping.json");
    let signature = github_sign(key, &body);
    let headers = |sig: &str| {
        vec![
            ("X-GitHub-Event".to_string(), "ping".to_string()),
            (
                "X-GitHub-Delivery".to_string(),
                "72d3162e-cc78-11e3-81ab-4c9367dc0958".to_string(),
            ),
            ("X-Hub-Signature-256".to_string(), sig.to_string()),
            ("Content-Type".to_string(), "application/json".to_string()),
        ]
    };
    let send = |sig: &str, body: &[u8]| {
        let owned = headers(sig);
        let refs: Vec<(&str, &str)> = owned
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        server.request("POST", "/", &refs, body)
    };
    let mut flipped_body = body.clone();
    flipped_body[10] ^= 1;
    let mut flipped_sig = signature.clone().into_bytes();
    let last = flipped_sig.len() - 1;
    flipped_sig[last] = if flipped_sig[last] == b'0' {
        b'1'
    } else {
        b'0'
    };
    let flipped_sig = String::from_utf8(flipped_sig).expect("ASCII");
    for (what, sig, body) in [
        ("a flipped body byte", signature.as_str(), &flipped_body),
        ("a flipped signature digit", flipped_sig.as_str(), &body),
        (
            "no sha256= prefix",
            signature.trim_start_matches("sha256="),
            &body,
        ),
        ("an empty signature", "", &body),
    ] {
        let response = send(sig, body);
        assert_refused(&server, &env, &response, 401, &out, &[key, &signature]);
        assert!(
            response.header("WWW-Authenticate").is_none(),
            "{what}: no Basic challenge for a signature"
        );
    }
    let line = server
        .wait_log(
            "auth=\"signature does not match the body\"",
            Duration::from_secs(5),
        )
        .expect("the request's line says which check failed");
    assert!(
        line.contains(" sender=gh ") && line.contains("status=401"),
        "{line}"
    );
    let response = send(&signature, &body);
    assert_eq!(response.status, 200, "{}", response.text());
    let start: String = String::from_utf8_lossy(&body)
        .replace('\n', "")
        .chars()
        .take(20)
        .collect();
    assert_eq!(
        runs(&out),
        [format!("gh 72d3162e-cc78-11e3-81ab-4c9367dc0958 {start}")]
    );
    assert!(!server.log().contains(key));
}

#[test]
fn a_large_signed_body_with_a_bad_signature_never_becomes_a_payload_file() {
    let env = Env::new();
    let file = secret(&env, "github-secret", "large-body-secret");
    let env = env.config(&format!(
        "max_body = \"2MiB\"\n[[sender]]\nname = \"gh\"\ntype = \"github\"\nsecret_file = {file:?}\n"
    ));
    let out = counter(&env, "big");
    let server = env.serve();
    // 1 MiB: past the 256 KiB an unsigned body keeps in memory; a signed one stays there until it verified.
    let mut body = br#"{"pad":""#.to_vec();
    body.extend(std::iter::repeat_n(b'x', 1 << 20));
    body.extend_from_slice(b"\"}");
    let good = github_sign("large-body-secret", &body);
    let bad = github_sign("another-secret", &body);
    // Over half the body, then a look at the payload directory once the daemon has read it all: no file,
    // not even one without a name.
    let mut stream = server.connect();
    let head = format!(
        "POST /hooks/big HTTP/1.1\r\nHost: t\r\nX-Hub-Signature-256: {bad}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).expect("head");
    stream.write_all(&body[..600 << 10]).expect("first part");
    let pid = server.child.id();
    assert!(
        wait_until(Duration::from_secs(10), || {
            crate::util::loopback_queues_empty(server.addr.port())
        }),
        "the daemon did not read what was sent"
    );
    assert_eq!(
        open_payload_files(pid, &env),
        0,
        "an unverified body went to a file"
    );
    assert_eq!(payload_files(&env), [".lock"]);
    stream.write_all(&body[600 << 10..]).expect("the rest");
    let response = Response::read(&mut stream).expect("an answer");
    assert_refused(&server, &env, &response, 401, &out, &["large-body-secret"]);
    assert!(wait_until(Duration::from_secs(5), || open_payload_files(
        pid, &env
    ) == 0));
    let response = server.request(
        "POST",
        "/hooks/big",
        &[("X-Hub-Signature-256", &good)],
        &body,
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(runs(&out).len(), 1);
}

/// `n` connections each sending `path` a 9 MiB body with a wrong signature, one byte short of its length,
/// so the daemon holds each in memory waiting for the rest and never checks it. Returns the connections
/// (open: the bodies stay held until they are dropped) and the body.
fn unchecked_bodies(
    server: &Server,
    path: &str,
    clients: &[&str],
) -> (Vec<std::net::TcpStream>, Vec<u8>) {
    unchecked_bodies_of(9 << 20, server, path, clients)
}

/// [`unchecked_bodies`] of `len` bytes each.
fn unchecked_bodies_of(
    len: usize,
    server: &Server,
    path: &str,
    clients: &[&str],
) -> (Vec<std::net::TcpStream>, Vec<u8>) {
    let body = vec![b'x'; len];
    let bad = github_sign("another-secret", &body);
    let head = |client: &str| {
        let forwarded = if client.is_empty() {
            String::new()
        } else {
            format!("X-Forwarded-For: {client}\r\n")
        };
        format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nX-Hub-Signature-256: {bad}\r\n{forwarded}\
             Content-Length: {}\r\n\r\n",
            body.len() + 1
        )
    };
    let streams: Vec<std::net::TcpStream> = clients.iter().map(|_| server.connect()).collect();
    std::thread::scope(|scope| {
        for (stream, client) in streams.iter().zip(clients) {
            let (head, body) = (head(client), &body);
            scope.spawn(move || {
                let mut stream = stream;
                // A refused one may be closed before all of it is taken.
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body);
            });
        }
    });
    (streams, body)
}

/// Each stream's answer, read at once so that the held ones' wait is paid once; `None` for one not
/// answered within `limit` (held).
fn answers_within(streams: &[std::net::TcpStream], limit: Duration) -> Vec<Option<Response>> {
    std::thread::scope(|scope| {
        let reads: Vec<_> = streams
            .iter()
            .map(|stream| {
                scope.spawn(move || {
                    stream.set_read_timeout(Some(limit)).expect("timeout");
                    let mut stream = stream;
                    Response::read(&mut stream).ok()
                })
            })
            .collect();
        reads
            .into_iter()
            .map(|read| read.join().expect("read"))
            .collect()
    })
}

/// A `header_timeout` for the held-bodies tests: a held body is silent while the others stream in and are
/// checked (SHA-256 over MiBs, slow in a debug build), and must not be answered 408 meanwhile.
const HELD_HEADER_TIMEOUT: &str = "header_timeout = \"60s\"";

/// An env with one github sender (secret `bound-secret`) for the held-bodies tests, `top` its top-level
/// keys, and the counting script `big`; returns the env and the script's runs file.
fn bound_env(top: &str) -> (Env, PathBuf) {
    let env = Env::new();
    let file = secret(&env, "github-secret", "bound-secret");
    let env = env.config(&format!(
        "{top}\n{HELD_HEADER_TIMEOUT}\n[[sender]]\nname = \"gh\"\ntype = \"github\"\nsecret_file = {file:?}\n"
    ));
    let out = counter(&env, "big");
    (env, out)
}

/// Bodies whose signature is still being checked are held in memory, never on disk, and together at
/// most 64 MiB past the first 256 KiB of each: past that, such a request is answered 503 with
/// Retry-After. What they held is given back when they end, and a signed body is served again.
#[test]
fn unverified_bodies_are_held_up_to_a_bound_then_answered_503() {
    // Behind a proxy, so that each body comes from a client of its own (X-Forwarded-For).
    let (env, out) = bound_env("trusted_proxies = [\"127.0.0.1/32\"]");
    let server = env.serve();
    let pid = server.child.id();
    // Seven bodies of 9 MiB, each one byte short of its length, so none is checked: 7 × 8.75 MiB past
    // the inline part fits in 64 MiB, however their reads interleave...
    let clients: Vec<String> = (1..=7).map(|n| format!("203.0.113.{n}")).collect();
    let clients: Vec<&str> = clients.iter().map(String::as_str).collect();
    let (mut streams, body) = unchecked_bodies(&server, "/hooks/big", &clients);
    // ...and once the daemon has taken every byte sent (the bound counts what arrived), an eighth does
    // not: it is refused, and the seven are still held.
    assert!(
        wait_until(Duration::from_secs(20), || {
            crate::util::loopback_queues_empty(server.addr.port())
        }),
        "the daemon did not take the bodies\n{}",
        server.log()
    );
    let (eighth, _) = unchecked_bodies(&server, "/hooks/big", &["203.0.113.8"]);
    let refused = answers_within(&eighth, Duration::from_secs(10));
    let response = refused[0].as_ref().expect("the eighth is answered");
    assert_eq!(response.status, 503, "{}", response.text());
    assert!(response.header("Retry-After").is_some());
    assert!(
        response.text().contains("retry later"),
        "{}",
        response.text()
    );
    let held = answers_within(&streams, Duration::from_secs(1));
    assert!(held.iter().all(Option::is_none), "{held:?}");
    streams.extend(eighth);
    assert_eq!(
        open_payload_files(pid, &env),
        0,
        "an unverified body went to a file"
    );
    assert!(runs(&out).is_empty());
    drop(streams);
    // Given back: a signed body as large is served (once the ended requests let go of theirs).
    let good = github_sign("bound-secret", &body);
    let mut last = 0;
    assert!(
        wait_until(Duration::from_secs(10), || {
            last = server
                .request(
                    "POST",
                    "/hooks/big",
                    &[("X-Hub-Signature-256", &good)],
                    &body,
                )
                .status;
            last == 200
        }),
        "last answer {last}\n{}",
        server.log()
    );
    assert_eq!(runs(&out).len(), 1);
}

/// A body refused part-way for the bound is answered at once, even when the rest of it is short enough
/// to be drained for keep-alive and its client stalls before the end: the answer closes the connection
/// rather than wait for the body's pace to fail (`header_timeout`, 60 s here).
#[test]
fn a_body_refused_for_the_bound_is_answered_at_once_though_its_client_stalls() {
    let (env, out) = bound_env("trusted_proxies = [\"127.0.0.1/32\"]");
    let server = env.serve();
    let client = ["198.51.100.7"];
    // The client's first body holds 8.75 MiB of its 16 MiB share...
    let (first, _) = unchecked_bodies(&server, "/hooks/big", &client);
    assert!(
        wait_until(Duration::from_secs(20), || {
            crate::util::loopback_queues_empty(server.addr.port())
        }),
        "the daemon did not take the body\n{}",
        server.log()
    );
    // ...and its second passes the share only in its last 32 KiB (7.25 MiB past the inline part fit).
    let (second, _) = unchecked_bodies_of((15 << 19) + (32 << 10), &server, "/hooks/big", &client);
    let answers = answers_within(&second, Duration::from_secs(5));
    let response = answers[0].as_ref().expect("the second body is answered");
    assert_eq!(response.status, 503, "{}", response.text());
    assert!(
        response.text().contains("retry later"),
        "{}",
        response.text()
    );
    assert_eq!(response.header("Connection"), Some("close"));
    let held = answers_within(&first, Duration::from_secs(1));
    assert!(held[0].is_none(), "the first body is held: {held:?}");
    assert!(runs(&out).is_empty());
}

/// One client's unverified bodies hold at most a quarter of that bound: a client that sends large bodies
/// it cannot sign, and stalls, cannot take it from senders elsewhere. Of its three bodies of 9 MiB at
/// once, at most one is held (two would hold 17.5 MiB, over 16); another client's is held.
#[test]
fn one_clients_unverified_bodies_hold_a_quarter_of_the_bound() {
    let (env, out) = bound_env("trusted_proxies = [\"127.0.0.1/32\"]");
    let server = env.serve();
    let (streams, _) = unchecked_bodies(
        &server,
        "/hooks/big",
        &["198.51.100.7", "198.51.100.7", "198.51.100.7"],
    );
    let (other, _) = unchecked_bodies(&server, "/hooks/big", &["203.0.113.9"]);
    // Every byte taken (or refused) first: checking a signature is slow in a debug build on a busy machine.
    assert!(
        wait_until(Duration::from_secs(30), || {
            crate::util::loopback_queues_empty(server.addr.port())
        }),
        "the daemon did not take the bodies\n{}",
        server.log()
    );
    let answers = answers_within(&streams, Duration::from_secs(3));
    // Two at least: the three stream in together, so which reach the share first, and whether one of
    // them is held whole, depends on how their reads interleave; without the share none is refused
    // (26 MiB of 64).
    let refused: Vec<&Response> = answers.iter().flatten().collect();
    assert!(refused.len() >= 2, "{refused:?}\n{}", server.log());
    for response in refused {
        assert_eq!(response.status, 503, "{}", response.text());
        assert!(
            response.text().contains("retry later"),
            "{}",
            response.text()
        );
    }
    let held = answers_within(&other, Duration::from_secs(1));
    assert!(
        held[0].is_none(),
        "the other client's body is held: {held:?}"
    );
    assert!(runs(&out).is_empty());
}

/// With `max_body` over the bound's quarter, one signed body of up to `max_body` is still held and checked:
/// the client's share is never less than one body.
#[test]
fn a_signed_body_up_to_max_body_fits_whatever_the_clients_share() {
    let (env, out) = bound_env("max_body = \"40MiB\"");
    let server = env.serve();
    let body = vec![b'x'; 30_000_000];
    let signature = github_sign("bound-secret", &body);
    let response = server.request(
        "POST",
        "/hooks/big",
        &[("X-Hub-Signature-256", &signature)],
        &body,
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(runs(&out).len(), 1);
}

/// An async request's body over 256 KiB goes to the store from memory, read back from its payload file,
/// within the same budget as bodies being checked: while the budget is held it is answered 503, runs
/// nothing and leaves no file, and it is accepted once the budget is given back.
#[test]
fn large_async_bodies_share_the_bound_of_bodies_held_in_memory() {
    let env = Env::new();
    let file = secret(&env, "github-secret", "bound-secret");
    let env = env.config(&format!(
        "trusted_proxies = [\"127.0.0.1/32\"]\n{HELD_HEADER_TIMEOUT}\n\
         [[sender]]\nname = \"gh\"\npath = \"/gh\"\ntype = \"github\"\nsecret_file = {file:?}\n\
         [[sender]]\nname = \"plain\"\npath = \"/plain\"\ntype = \"none\"\nallow_ips = [\"127.0.0.1\"]\n"
    ));
    let out = counter(&env, "big");
    env.routes("big big async\n");
    let server = env.serve();
    let pid = server.child.id();
    // Seven bodies of 9 MiB that are never checked, from seven clients: 7 × 8.75 MiB of the 64 MiB held.
    let clients: Vec<String> = (1..=7).map(|n| format!("203.0.113.{n}")).collect();
    let clients: Vec<&str> = clients.iter().map(String::as_str).collect();
    let (streams, _) = unchecked_bodies(&server, "/gh/hooks/big", &clients);
    // Every byte read by the daemon, so the seven hold their share.
    assert!(
        wait_until(Duration::from_secs(30), || {
            crate::util::loopback_queues_empty(server.addr.port())
        }),
        "the daemon did not take the bodies\n{}",
        server.log()
    );
    let large = vec![b'{'; 4 << 20];
    let refused = server.post("/plain/hooks/big", &large);
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(refused.header("Retry-After").is_some());
    assert!(refused.text().contains("retry later"), "{}", refused.text());
    assert_eq!(open_payload_files(pid, &env), 0, "its payload file is gone");
    drop(streams);
    let mut last = 0;
    assert!(
        wait_until(Duration::from_secs(10), || {
            last = server.post("/plain/hooks/big", &large).status;
            last == 202
        }),
        "last answer {last}\n{}",
        server.log()
    );
    assert!(wait_until(Duration::from_secs(10), || runs(&out).len() == 1));
}

/// A Standard Webhooks request signed by the reference library.
fn standard_request(
    server: &Server,
    secret: &str,
    prefix: &str,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Response {
    let signature = standard_webhooks_sign(secret, id, timestamp, body);
    let timestamp = timestamp.to_string();
    server.request(
        "POST",
        "/hooks/sw",
        &[
            (&format!("{prefix}-id"), id),
            (&format!("{prefix}-timestamp"), &timestamp),
            (&format!("{prefix}-signature"), &signature),
        ],
        body,
    )
}

/// The event may come from what a Standard Webhooks signature does not cover (here the path). A delivery
/// whose first try failed is sent again by its sender and runs again; the same signed id, timestamp and
/// body sent as another event (by whoever captured them) is refused, runs nothing, and does not take the
/// id from the sender's own retry.
#[test]
fn a_standard_webhooks_delivery_cannot_be_sent_again_as_another_event() {
    let env = Env::new();
    let key = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    let file = secret(&env, "sw-secret", key);
    let env = env.config(&format!(
        "[[sender]]\nname = \"sw\"\ntype = \"standard-webhooks\"\nsecret_file = {file:?}\n"
    ));
    let out = counter(&env, "wipe");
    let tries = env.path().join("tries");
    env.script("pay", &format!("echo try >> {tries:?}\nexit 1"));
    let server = env.serve();
    let signed_at = now();
    // One signed delivery: the same id, timestamp, signature and body, sent to `path` each time.
    let delivery = |id: &'static str, body: &'static [u8]| {
        let signature = standard_webhooks_sign(key, id, signed_at, body);
        let ts = signed_at.to_string();
        let send = {
            let (server, signature) = (&server, signature.clone());
            move |path: &str| {
                server.request(
                    "POST",
                    path,
                    &[
                        ("webhook-id", id),
                        ("webhook-timestamp", ts.as_str()),
                        ("webhook-signature", signature.as_str()),
                    ],
                    body,
                )
            }
        };
        (signature, send)
    };
    // The first try to `first` answered `status`; the same delivery sent as the event wipe is refused,
    // with `why` in the log, and the sender's retry to `first` is answered as the first try was.
    let replay = |id: &'static str, body: &'static [u8], first: &str, status: u16, why: &str| {
        let (signature, send) = delivery(id, body);
        assert_eq!(send(first).status, status, "the first try");
        let replayed = send("/hooks/wipe");
        assert_refused(
            &server,
            &env,
            &replayed,
            401,
            &out,
            &[key, signature.trim_start_matches("v1,")],
        );
        let logged =
            format!("auth=\"the delivery id was first tried {why}, and the event is not signed\"");
        assert!(server.log().contains(&logged), "{}", server.log());
        assert_eq!(send(first).status, status, "the sender's retry");
    };
    replay(
        "msg_replayed",
        b"{\"type\":\"invoice.paid\"}",
        "/hooks/pay",
        500,
        "as event pay",
    );
    assert_eq!(
        lines_of(&tries),
        2,
        "the first try and the sender's retry ran"
    );
    // A delivery whose first try named no event (400) cannot be sent again naming one.
    replay("msg_no_event", b"{}", "/", 400, "with no event found");
}

fn lines_of(path: &std::path::Path) -> usize {
    fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

/// On an async route a replayed Standard Webhooks delivery is answered as its first one was, 202 with
/// that one's request id, whether the daemon's memory of ids or, after a restart, the store's dedupe
/// finds it; it is queued once and runs once.
#[test]
fn a_replay_on_an_async_route_is_answered_as_its_first_delivery_was_before_and_after_a_restart() {
    // 202, and 200 where a sender insists (ack_status=200): queued either way.
    for (option, status) in [("", 202), (" ack_status=200", 200)] {
        let env = Env::new();
        let key = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
        let file = secret(&env, "sw-secret", key);
        let env = env.config(&format!(
            "[[sender]]\nname = \"sw\"\ntype = \"standard-webhooks\"\nsecret_file = {file:?}\n"
        ));
        env.routes(&format!("sw sw async{option}\n"));
        let out = counter(&env, "sw");
        let body = payload("standardwebhooks-json-example.event.json");
        let mut server = env.serve();
        let first = standard_request(&server, key, "webhook", "msg_a", now(), &body);
        assert_eq!(first.status, status, "{}", first.text());
        let first_id = first.json()["request_id"].clone();
        for restarted in [false, true] {
            if restarted {
                server.signal(libc::SIGTERM);
                assert!(server.wait_exit(Duration::from_secs(10)).is_some());
                server = env.serve();
            }
            let again = standard_request(&server, key, "webhook", "msg_a", now(), &body);
            let context = format!("{option:?}, restarted {restarted}: {}", again.text());
            assert_eq!(again.status, status, "{context}");
            let json = again.json();
            assert_eq!(json["duplicate"], true, "{context}");
            assert_eq!(json["queued"], true, "{context}");
            assert_eq!(json["request_id"], first_id, "{context}");
        }
        assert!(wait_until(Duration::from_secs(10), || runs(&out).len() == 1));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(runs(&out).len(), 1, "{:?}", runs(&out));
    }
}

#[test]
fn standard_webhooks_from_the_reference_library_pass_once_and_replays_are_answered_not_run() {
    let env = Env::new();
    let key = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    let file = secret(&env, "sw-secret", key);
    let env = env.config(&format!(
        "[[sender]]\nname = \"sw\"\ntype = \"standard-webhooks\"\nsecret_file = {file:?}\n"
    ));
    let out = counter(&env, "sw");
    let server = env.serve();
    let body = payload("standardwebhooks-json-example.event.json");
    let first = standard_request(&server, key, "webhook", "msg_1", now(), &body);
    assert_eq!(first.status, 200, "{}", first.text());
    assert!(first.json()["duplicate"].is_null());
    // The sender retries (or an attacker replays) the same delivery: answered 200, not run again.
    let again = standard_request(&server, key, "webhook", "msg_1", now(), &body);
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.json()["duplicate"], true);
    assert_eq!(
        again.json()["request_id"],
        first.json()["request_id"],
        "answered as the first was"
    );
    assert_eq!(runs(&out).len(), 1, "{:?}", runs(&out));
    // Svix sends the same scheme under its own names.
    let svix = standard_request(&server, key, "svix", "msg_2", now(), &body);
    assert_eq!(svix.status, 200, "{}", svix.text());
    assert_eq!(runs(&out).len(), 2);
    assert!(runs(&out)[1].starts_with("sw msg_2 "), "{:?}", runs(&out));
    // Stale and future timestamps, a signature for another body, another key.
    for (what, id, ts, sign_key, sent_body) in [
        // Ten seconds past the window either way, so that the clock ticking meanwhile cannot matter.
        ("stale", "msg_3", now() - 310, key, body.clone()),
        ("future", "msg_4", now() + 310, key, body.clone()),
        (
            "another key",
            "msg_5",
            now(),
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            body.clone(),
        ),
    ] {
        let response = standard_request(&server, sign_key, "webhook", id, ts, &sent_body);
        // What was sent as the signature is never logged either.
        let sent = standard_webhooks_sign(sign_key, id, ts, &sent_body);
        let sent = sent.trim_start_matches("v1,");
        assert_refused(
            &server,
            &env,
            &response,
            401,
            &out.with_extension("none"),
            &[key, sent],
        );
        assert_eq!(runs(&out).len(), 2, "{what} ran");
    }
    // The signature made for one body, sent with another.
    let signed_at = now();
    let signature = standard_webhooks_sign(key, "msg_6", signed_at, &body);
    let ts = signed_at.to_string();
    let response = server.request(
        "POST",
        "/hooks/sw",
        &[
            ("webhook-id", "msg_6"),
            ("webhook-timestamp", &ts),
            ("webhook-signature", &signature),
        ],
        b"{\"type\":\"other\"}",
    );
    assert_refused(
        &server,
        &env,
        &response,
        401,
        &out.with_extension("none"),
        &[key, signature.trim_start_matches("v1,")],
    );
    assert_eq!(runs(&out).len(), 2);
    // Several entries, one of them right: accepted.
    let several = format!("v1,bm90IGl0 {signature} v1a,AAAA");
    let response = server.request(
        "POST",
        "/hooks/sw",
        &[
            ("webhook-id", "msg_6"),
            ("webhook-timestamp", &ts),
            ("webhook-signature", &several),
        ],
        &body,
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(runs(&out).len(), 3);
    assert!(
        server
            .wait_log("s old, window 300 s", Duration::from_secs(5))
            .is_some()
    );
    let log = server.log();
    assert!(log.contains("s in the future, window 300 s"), "{log}");
    assert!(!log.contains(key));
}

/// An id is kept in the replay memory once accepted, so its length is capped before anything else is done
/// with it: one byte past the cap is refused however well it is signed, one at the cap runs.
#[test]
fn a_standard_webhooks_id_past_256_bytes_is_refused_before_it_is_run_or_remembered() {
    let env = Env::new();
    let key = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    let file = secret(&env, "sw-secret", key);
    let env = env.config(&format!(
        "[[sender]]\nname = \"sw\"\ntype = \"standard-webhooks\"\nsecret_file = {file:?}\n"
    ));
    let out = counter(&env, "sw");
    let server = env.serve();
    let body = payload("standardwebhooks-json-example.event.json");
    let long = "m".repeat(257);
    let signed_at = now();
    let response = standard_request(&server, key, "webhook", &long, signed_at, &body);
    let sent = standard_webhooks_sign(key, &long, signed_at, &body);
    assert_refused(
        &server,
        &env,
        &response,
        401,
        &out,
        &[key, sent.trim_start_matches("v1,")],
    );
    assert!(
        server
            .log()
            .contains("auth=\"webhook-id header is not in the scheme's form\""),
        "refused for its id, not its signature:\n{}",
        server.log()
    );
    let at_cap = "m".repeat(256);
    let response = standard_request(&server, key, "webhook", &at_cap, now(), &body);
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(runs(&out).len(), 1, "{:?}", runs(&out));
    assert!(
        runs(&out)[0].starts_with(&format!("sw {at_cap} ")),
        "{:?}",
        runs(&out)
    );
}

#[test]
fn a_failed_run_does_not_make_its_retry_a_duplicate() {
    let env = Env::new();
    let key = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    let file = secret(&env, "sw-secret", key);
    let env = env.config(&format!(
        "[[sender]]\nname = \"sw\"\ntype = \"standard-webhooks\"\nsecret_file = {file:?}\n"
    ));
    let flag = env.path().join("fail-once");
    fs::write(&flag, "").expect("flag");
    env.script(
        "sw",
        &format!("if [ -e {flag:?} ]; then rm {flag:?}; exit 1; fi"),
    );
    let server = env.serve();
    let body = payload("standardwebhooks-json-example.event.json");
    assert_eq!(
        standard_request(&server, key, "webhook", "msg_9", now(), &body).status,
        500
    );
    let retry = standard_request(&server, key, "webhook", "msg_9", now(), &body);
    assert_eq!(
        retry.status,
        200,
        "the retry of a failed delivery runs: {}",
        retry.text()
    );
    assert!(retry.json()["duplicate"].is_null());
}

/// A Standard Webhooks sender's `window` is its own: with `window = "30s"` a timestamp 40 s old is refused
/// and the log names that window, while one 20 s old (which the default 5 minutes would take as well) is
/// run. `check` holds the key to 1s to 24h, both ends included, and names the key and the range.
#[test]
fn a_standard_webhooks_window_is_configurable_from_1s_to_24h() {
    let key = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    let sender = |env: &Env, window: &str| {
        let file = secret(env, "sw-secret", key);
        format!(
            "[[sender]]\nname = \"sw\"\ntype = \"standard-webhooks\"\nsecret_file = {file:?}\n\
             window = \"{window}\"\n"
        )
    };
    let env = Env::new();
    let profile = sender(&env, "30s");
    let env = env.config(&profile);
    let out = counter(&env, "sw");
    let server = env.serve();
    let body = payload("standardwebhooks-json-example.event.json");
    // Ten seconds past the window either way, so that signing and a loaded machine cannot matter.
    let stale = standard_request(&server, key, "webhook", "msg_stale", now() - 40, &body);
    assert_refused(&server, &env, &stale, 401, &out, &[key]);
    let id = stale.json()["request_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let line = request_line(&server, &id);
    let age: i64 = line
        .split_once("auth=\"timestamp ")
        .and_then(|(_, rest)| rest.split_once(" s old, window 30 s\""))
        .and_then(|(age, _)| age.parse().ok())
        .unwrap_or_else(|| panic!("the log names the sender's window: {line}"));
    assert!(age >= 40, "{line}");
    let fresh = standard_request(&server, key, "webhook", "msg_fresh", now() - 20, &body);
    assert_eq!(fresh.status, 200, "{}\n{}", fresh.text(), server.log());
    assert_eq!(runs(&out).len(), 1, "{:?}", runs(&out));
    assert!(
        runs(&out)[0].starts_with("sw msg_fresh "),
        "{:?}",
        runs(&out)
    );
    // The range, refused outside and accepted at both ends.
    for (window, accepted) in [
        ("0s", false),
        ("999ms", false),
        ("25h", false),
        ("1s", true),
        ("24h", true),
    ] {
        let env = Env::new();
        let profile = sender(&env, window);
        let env = env.config(&profile);
        let out = env.check();
        let err = String::from_utf8_lossy(&out.stderr);
        if accepted {
            assert!(
                out.status.success(),
                "window = {window:?} was refused: {err}"
            );
            continue;
        }
        assert_eq!(out.status.code(), Some(78), "window = {window:?}: {err}");
        let text = fs::read_to_string(env.config_path()).expect("config");
        let line = text
            .lines()
            .position(|l| l.starts_with("window ="))
            .expect("window written")
            + 1;
        assert!(
            err.contains(&format!(
                "hookrunner.toml:{line}: sender \"sw\": window must be from 1s to 24h"
            )),
            "window = {window:?}: not named with its range on line {line}: {err}"
        );
    }
}

/// A delivery id already answered is a duplicate only for a request that proves it is that delivery: the
/// id sent again with a signature that does not verify (made with another secret, or the signed body
/// changed) is 401 like any bad signature, not answered as the first delivery was (which would answer a
/// forgery 200 and show whoever saw an id the first's request id), and runs nothing. The sender's own
/// retry is still answered as a duplicate.
#[test]
fn a_replayed_standard_webhooks_id_with_a_bad_signature_is_401_not_a_duplicate() {
    let env = Env::new();
    let key = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    let file = secret(&env, "sw-secret", key);
    let env = env.config(&format!(
        "[[sender]]\nname = \"sw\"\ntype = \"standard-webhooks\"\nsecret_file = {file:?}\n"
    ));
    let out = counter(&env, "sw");
    let server = env.serve();
    let body = payload("standardwebhooks-json-example.event.json");
    let signed_at = now();
    let first = standard_request(&server, key, "webhook", "msg_1", signed_at, &body);
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(runs(&out).len(), 1, "{:?}", runs(&out));
    // The same id signed with another secret, and the first's own signature over another body.
    let other = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let forged = standard_request(&server, other, "webhook", "msg_1", now(), &body);
    let signature = standard_webhooks_sign(key, "msg_1", signed_at, &body);
    let ts = signed_at.to_string();
    let changed = server.request(
        "POST",
        "/hooks/sw",
        &[
            ("webhook-id", "msg_1"),
            ("webhook-timestamp", &ts),
            ("webhook-signature", &signature),
        ],
        b"{\"type\":\"other\"}",
    );
    for (what, response) in [("another secret", &forged), ("another body", &changed)] {
        assert_eq!(response.status, 401, "{what}: {}", response.text());
        assert!(
            !response.text().contains("duplicate"),
            "{what}: answered as a duplicate: {}",
            response.text()
        );
        assert_ne!(
            response.json()["request_id"],
            first.json()["request_id"],
            "{what}: the first's request id was shown"
        );
        assert_refused(
            &server,
            &env,
            response,
            401,
            &out.with_extension("none"),
            &[key, signature.trim_start_matches("v1,")],
        );
        let id = response.json()["request_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let line = request_line(&server, &id);
        assert!(
            line.contains("auth=\"signature does not match the body\""),
            "{what}: {line}"
        );
    }
    assert_eq!(runs(&out).len(), 1, "a bad signature ran: {:?}", runs(&out));
    // The sender's retry, signed anew: still the first delivery's answer, not run again.
    let retry = standard_request(&server, key, "webhook", "msg_1", now(), &body);
    assert_eq!(retry.status, 200, "{}", retry.text());
    assert_eq!(retry.json()["duplicate"], true, "{}", retry.text());
    assert_eq!(retry.json()["request_id"], first.json()["request_id"]);
    assert_eq!(runs(&out).len(), 1, "{:?}", runs(&out));
}

#[test]
fn basic_credentials_right_wrong_and_missing() {
    let env = Env::new();
    let file = secret(&env, "jamf-password", "correct horse battery staple");
    let env = env.config(&format!(
        "[[sender]]\nname = \"jamf\"\ntype = \"basic\"\nuser = \"jamf\"\npassword_file = {file:?}\n"
    ));
    let out = counter(&env, "ComputerAdded");
    let server = env.serve();
    let body = payload("jamf-json-ComputerAdded.chook.json");
    let basic = |user: &str, password: &str| {
        let pair = format!("{user}:{password}");
        // The client side of Basic, by hand: base64 of user:password.
        let encoded = std::process::Command::new("base64")
            .arg("-w0")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(pair.as_bytes())?;
                child.wait_with_output()
            })
            .expect("base64");
        format!("Basic {}", String::from_utf8_lossy(&encoded.stdout))
    };
    for auth in [
        Some(basic("jamf", "correct horse battery stapl")),
        Some(basic("Jamf", "correct horse battery staple")),
        Some("Bearer correct horse battery staple".to_string()),
        None,
    ] {
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(auth) = &auth {
            headers.push(("Authorization", auth));
        }
        let response = server.request("POST", "/", &headers, &body);
        assert_refused(
            &server,
            &env,
            &response,
            401,
            &out,
            &["correct horse battery staple"],
        );
        assert_eq!(
            response.header("WWW-Authenticate"),
            Some("Basic realm=\"hookrunner\"")
        );
    }
    let good = basic("jamf", "correct horse battery staple");
    let response = server.request(
        "POST",
        "/",
        &[
            ("Content-Type", "application/json"),
            ("authorization", &good),
        ],
        &body,
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(runs(&out).len(), 1);
    // Once the last request's own line is in: the log then holds all of them.
    let id = response.json()["request_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        server
            .wait_log(&format!("{id} 127.0.0.1:"), Duration::from_secs(5))
            .is_some(),
        "{}",
        server.log()
    );
    assert!(!server.log().contains("correct horse"), "{}", server.log());
}

#[test]
fn header_profiles_match_names_in_any_case_and_values_exactly() {
    let env = Env::new();
    let key = secret(&env, "api-key", "k-123456789");
    let tenant = secret(&env, "tenant", "acme");
    let env = env.config(&format!(
        "[[sender]]\nname = \"jamf-header\"\ntype = \"headers\"\nheaders = {{ \"X-Api-Key\" = {key:?}, \"X-Tenant\" = {tenant:?} }}\n"
    ));
    let out = counter(&env, "x");
    let server = env.serve();
    for headers in [
        vec![("X-Api-Key", "k-123456789")],
        vec![("X-Api-Key", "K-123456789"), ("X-Tenant", "acme")],
        vec![("X-Api-Key", "k-12345678"), ("X-Tenant", "acme")],
        vec![("X-Tenant", "acme")],
    ] {
        let response = server.request("POST", "/hooks/x", &headers, b"{}");
        assert_refused(&server, &env, &response, 401, &out, &["k-123456789"]);
    }
    let response = server.request(
        "POST",
        "/hooks/x",
        &[("x-api-key", "k-123456789"), ("X-TENANT", "acme")],
        b"{}",
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(runs(&out), ["jamf-header  {}"]);
}

/// A sender's path chooses its profile, the event chooses the route: `sender=` on a route line is what ties
/// them. GitHub's and GitLab's `push` are one event; a line for one sender is not run for another, and a
/// sender's path that names an event is warned of, since it ties nothing.
#[test]
fn a_route_line_for_one_sender_is_not_run_for_another() {
    let env = Env::new();
    let gh = secret(&env, "gh", "gh-secret-value-0123");
    let gl = secret(&env, "gl", "glpat-secret");
    let env = env.config(&format!(
        "[[sender]]\nname = \"github\"\npath = \"/github\"\ntype = \"github\"\nsecret_file = {gh:?}\n\
         [[sender]]\nname = \"gitlab\"\npath = \"/gitlab\"\ntype = \"gitlab\"\nsecret_file = {gl:?}\n\
         [[sender]]\nname = \"local\"\npath = \"/\"\ntype = \"none\"\nallow_ips = [\"127.0.0.0/8\"]\n"
    ));
    let ran = env.path().join("ran");
    for script in ["gh-deploy", "gl-deploy"] {
        env.script(
            script,
            &format!("echo \"{script} $HOOKRUNNER_SENDER\" >> {ran:?}"),
        );
    }
    env.routes("push  gh-deploy  sender=github\npush  gl-deploy  sender=gitlab,other\n");
    // A name no [[sender]] has is an error on its line, not a line that silently never runs.
    let out = env.check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("routes:2: sender=other: no [[sender]] has that name (the senders are github, gitlab, local)"),
        "{err}"
    );
    env.routes("push  gh-deploy  sender=github\npush  gl-deploy  sender=gitlab\n");
    let server = env.serve();
    // GitLab's token, with a GitHub event header: GitLab's line runs, as GitLab.
    let response = server.request(
        "POST",
        "/gitlab",
        &[
            ("X-Gitlab-Token", "glpat-secret"),
            ("X-GitHub-Event", "push"),
        ],
        b"{\"object_kind\":\"push\"}",
    );
    assert_eq!(response.status, 200, "{}", response.text());
    // The open local sender names the event in its path: neither line is its.
    let response = server.post("/hooks/push", b"{}");
    assert_eq!(response.status, 404, "{}", response.text());
    assert_eq!(
        fs::read_to_string(&ran).expect("ran"),
        "gl-deploy gitlab\n",
        "{}",
        server.log()
    );
    // A sender whose path names an event: check says that ties nothing.
    let env = Env::new()
        .config("[[sender]]\nname = \"deploy\"\npath = \"/hooks/Deploy\"\ntype = \"none\"\n");
    let out = env.check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("sender \"deploy\": its path \"/hooks/Deploy\" names an event")
            && err.contains("sender=deploy"),
        "{err}"
    );
}

#[test]
fn gitlab_tokens_and_the_generic_hmac_scheme() {
    let env = Env::new();
    let token = secret(&env, "gitlab-token", "glpat-secret");
    let signing = secret(&env, "signing", "a-signing-secret-of-16+");
    let env = env.config(&format!(
        "[[sender]]\nname = \"gl\"\npath = \"/gitlab\"\ntype = \"gitlab\"\nsecret_file = {token:?}\n\
         [[sender]]\nname = \"js\"\npath = \"/js\"\ntype = \"hmac\"\nheader = \"X-Signature\"\n\
         algorithm = \"sha512\"\nencoding = \"base64\"\nprefix = \"v=\"\nsecret_file = {signing:?}\n"
    ));
    let out = counter(&env, "push");
    let server = env.serve();
    let body = payload("gitlab-json-push.docs.json");
    let gl = |token: &str| {
        server.request(
            "POST",
            "/gitlab",
            &[
                ("X-Gitlab-Event", "Push Hook"),
                ("X-Gitlab-Token", token),
                ("X-Gitlab-Event-UUID", "uuid-1"),
            ],
            &body,
        )
    };
    assert_refused(
        &server,
        &env,
        &gl("glpat-wrong"),
        401,
        &out,
        &["glpat-secret"],
    );
    assert_eq!(gl("glpat-secret").status, 200);
    assert_eq!(runs(&out).len(), 1);
    assert!(runs(&out)[0].starts_with("gl uuid-1 "), "{:?}", runs(&out));
    // HMAC-SHA512 in base64 behind a prefix, computed by Python's standard library; other algorithms and
    // encodings for what a sender whose format is guessed would send.
    let sign_as = |algorithm: &str, encoding: &str, key: &str, body: &[u8]| {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys, hmac, hashlib, base64\nd = hmac.new(sys.argv[1].encode(), sys.stdin.buffer.read(), sys.argv[2]).digest()\nprint(base64.b64encode(d).decode() if sys.argv[3] == 'base64' else d.hex())",
                key,
                algorithm,
                encoding,
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().expect("stdin").write_all(body)?;
                child.wait_with_output()
            })
            .expect("python3");
        format!("v={}", String::from_utf8_lossy(&out.stdout).trim())
    };
    let sign = |key: &str, body: &[u8]| sign_as("sha512", "base64", key, body);
    let good = sign("a-signing-secret-of-16+", b"{\"x\":1}");
    let bad = sign("a-signing-secret-of-16-", b"{\"x\":1}");
    // A sender with nothing but the generic Idempotency-Key names its delivery so.
    let js = |sig: &str| {
        server.request(
            "POST",
            "/js/hooks/push",
            &[("X-Signature", sig), ("Idempotency-Key", "idem-1")],
            b"{\"x\":1}",
        )
    };
    assert_refused(
        &server,
        &env,
        &js(&bad),
        401,
        &out.with_extension("none"),
        &["a-signing-secret"],
    );
    assert_eq!(
        js(good.trim_start_matches("v=")).status,
        401,
        "the prefix is part of the scheme"
    );
    // The right secret in another algorithm or encoding: the log says which setting is off.
    for (algorithm, encoding, says) in [
        (
            "sha256",
            "base64",
            "holds 32 bytes where the profile's HMAC has 64",
        ),
        (
            "sha512",
            "hex",
            "holds 96 bytes where the profile's HMAC has 64",
        ),
    ] {
        let other = sign_as(algorithm, encoding, "a-signing-secret-of-16+", b"{\"x\":1}");
        assert_eq!(js(&other).status, 401, "{algorithm} {encoding}");
        let line = server
            .wait_log(
                &format!("X-Signature header {says}"),
                Duration::from_secs(5),
            )
            .unwrap_or_else(|| panic!("{algorithm} {encoding}:\n{}", server.log()));
        assert!(
            line.contains("then the base64 sha512 HMAC): check algorithm and encoding"),
            "{line}"
        );
    }
    assert_eq!(js(&good).status, 200);
    assert_eq!(runs(&out).len(), 2);
    assert!(runs(&out)[1].starts_with("js idem-1 "), "{:?}", runs(&out));
}

/// Any delivery id header, not only Standard Webhooks' own, is held to 256 bytes: a longer one would be
/// kept in the dedupe table for a whole window and handed to the script's environment.
#[test]
fn an_overlong_delivery_id_is_refused_before_anything_is_written() {
    let env = Env::new();
    let out = counter(&env, "push");
    let server = env.serve();
    let post = |name: &str, id: &str| server.request("POST", "/hooks/push", &[(name, id)], b"{}");
    for name in [
        "X-GitHub-Delivery",
        "X-Gitlab-Event-UUID",
        "Idempotency-Key",
    ] {
        let refused = post(name, &"d".repeat(257));
        assert_eq!(refused.status, 400, "{}", refused.text());
        assert_eq!(
            refused.json()["error"],
            format!("{name} is longer than 256 bytes")
        );
    }
    assert!(runs(&out).is_empty(), "{:?}", runs(&out));
    assert_eq!(payload_files(&env), [".lock"]);
    let at_cap = "d".repeat(256);
    assert_eq!(post("Idempotency-Key", &at_cap).status, 200);
    assert_eq!(runs(&out), [format!(" {at_cap} {{}}")]);
}

/// A sender's `path` written with a trailing slash covers the path without it too, and counts as that
/// path for the longest match.
#[test]
fn a_sender_path_with_a_trailing_slash_covers_the_path_itself() {
    let env = Env::new();
    let a = secret(&env, "a", "secret-a");
    let b = secret(&env, "b", "secret-b");
    let env = env.config(&format!(
        "[[sender]]\nname = \"wide\"\npath = \"/\"\ntype = \"headers\"\nheaders = {{ \"X-Key\" = {a:?} }}\n\
         [[sender]]\nname = \"jamf\"\npath = \"/hooks/x/\"\ntype = \"headers\"\nheaders = {{ \"X-Key\" = {b:?} }}\n"
    ));
    let out = counter(&env, "x");
    let server = env.serve();
    let post = |key: &str| server.request("POST", "/hooks/x", &[("X-Key", key)], b"{}");
    assert_eq!(post("secret-b").status, 200, "/hooks/x is under /hooks/x/");
    assert_eq!(
        post("secret-a").status,
        401,
        "the longer path's profile applies"
    );
    assert_eq!(runs(&out), ["jamf  {}"]);
}

#[test]
fn the_longest_path_decides_and_a_path_under_no_sender_is_401() {
    let env = Env::new();
    let a = secret(&env, "a", "secret-a");
    let b = secret(&env, "b", "secret-b");
    let env = env.config(&format!(
        "[[sender]]\nname = \"wide\"\npath = \"/in\"\ntype = \"headers\"\nheaders = {{ \"X-Key\" = {a:?} }}\n\
         [[sender]]\nname = \"narrow\"\npath = \"/in/jamf\"\ntype = \"headers\"\nheaders = {{ \"X-Key\" = {b:?} }}\n"
    ));
    let out = counter(&env, "x");
    let server = env.serve();
    let post = |path: &str, key: &str| server.request("POST", path, &[("X-Key", key)], b"{}");
    assert_eq!(post("/in/hooks/x", "secret-a").status, 200);
    assert_eq!(post("/in/jamf/hooks/x", "secret-b").status, 200);
    assert_eq!(
        post("/in/jamf/hooks/x", "secret-a").status,
        401,
        "the longer path's profile applies"
    );
    assert_eq!(
        post("/in/jamfx/hooks/x", "secret-a").status,
        200,
        "/in/jamfx is under /in only"
    );
    assert_eq!(post("/in/jamfx/hooks/x", "secret-b").status, 401);
    let outside = post("/hooks/x", "secret-a");
    assert_refused(
        &server,
        &env,
        &outside,
        401,
        &out.with_extension("none"),
        &["secret-a"],
    );
    assert!(
        server
            .wait_log("the path is under no sender's path", Duration::from_secs(5))
            .is_some()
    );
    assert_eq!(
        server.get("/healthz").status,
        200,
        "health checks stay open"
    );
    assert_eq!(runs(&out), ["wide  {}", "narrow  {}", "wide  {}"]);
}

/// `allow_ips` binds a signing sender too: a request signed with the right secret from an address outside
/// the list is 403 and runs nothing; the same request from inside it (behind a trusted proxy) runs.
#[test]
fn allow_ips_binds_a_signing_sender_whatever_its_signature() {
    let env = Env::new();
    let file = secret(&env, "github-secret", "ips-secret");
    let env = env.config(&format!(
        "trusted_proxies = [\"127.0.0.1/32\"]\n\
         [[sender]]\nname = \"gh\"\ntype = \"github\"\nsecret_file = {file:?}\n\
         allow_ips = [\"203.0.113.0/24\"]\n"
    ));
    let out = counter(&env, "push");
    let server = env.serve();
    let body = br#"{"ref":"refs/heads/main"}"#;
    let signature = github_sign("ips-secret", body);
    let from = |client: &str| {
        server.request(
            "POST",
            "/hooks/push",
            &[
                ("X-Hub-Signature-256", signature.as_str()),
                ("X-Forwarded-For", client),
            ],
            body,
        )
    };
    assert_refused(
        &server,
        &env,
        &from("198.51.100.7"),
        403,
        &out,
        &["ips-secret"],
    );
    assert!(
        server
            .wait_log(
                "client address 198.51.100.7 is not allowed",
                Duration::from_secs(5)
            )
            .is_some(),
        "{}",
        server.log()
    );
    let admitted = from("203.0.113.7");
    assert_eq!(
        admitted.status,
        200,
        "{}\n{}",
        admitted.text(),
        server.log()
    );
    assert_eq!(runs(&out).len(), 1);
}

#[test]
fn events_and_addresses_a_sender_may_not_use_are_403() {
    let env = Env::new().config(
        "trusted_proxies = [\"127.0.0.1/32\"]\n\
         [[sender]]\nname = \"jamf\"\npath = \"/jamf\"\ntype = \"none\"\nevents = [\"Computer*\"]\nallow_ips = [\"203.0.113.0/24\"]\n\
         [[sender]]\nname = \"local\"\npath = \"/local\"\ntype = \"none\"\nallow_ips = [\"127.0.0.1\"]\n",
    );
    let out = counter(&env, "ComputerAdded");
    env.script("JSSStartup", "exit 0");
    let server = env.serve();
    let via = |path: &str, xff: Option<&str>| {
        let mut headers = vec![];
        if let Some(xff) = xff {
            headers.push(("X-Forwarded-For", xff));
        }
        server.request("POST", path, &headers, b"")
    };
    // 127.0.0.1 is a trusted proxy: the client is whom it names.
    assert_eq!(
        via("/jamf/hooks/ComputerAdded", Some("203.0.113.7")).status,
        200
    );
    assert_refused(
        &server,
        &env,
        &via("/jamf/hooks/ComputerAdded", Some("198.51.100.7")),
        403,
        &out.with_extension("none"),
        &[],
    );
    assert_refused(
        &server,
        &env,
        &via("/jamf/hooks/ComputerAdded", None),
        403,
        &out.with_extension("none"),
        &[],
    );
    // The right address, an event the sender may not send.
    assert_refused(
        &server,
        &env,
        &via("/jamf/hooks/JSSStartup", Some("203.0.113.7")),
        403,
        &out.with_extension("none"),
        &[],
    );
    assert!(
        server
            .wait_log(
                "event JSSStartup is not one this sender may send",
                Duration::from_secs(5)
            )
            .is_some()
    );
    // A trusted proxy that names no address: the client is unknown, never guessed, and the log says why.
    assert_refused(
        &server,
        &env,
        &via("/jamf/hooks/ComputerAdded", Some("unknown")),
        403,
        &out.with_extension("none"),
        &[],
    );
    assert!(
        server
            .wait_log(
                "client address unknown: a trusted proxy sent an X-Forwarded-For entry that is not an address",
                Duration::from_secs(5)
            )
            .is_some(),
        "{}",
        server.log()
    );
    assert_eq!(via("/local/hooks/ComputerAdded", None).status, 200);
    assert_eq!(runs(&out).len(), 2);
}

/// Behind a trusted proxy the script and the log see the client the proxy forwarded, as `allow_ips`
/// does; without one, the peer is the client.
#[test]
fn the_client_behind_a_trusted_proxy_reaches_the_script_and_the_log() {
    // Posts to a script that records what it saw; returns that and the request's log line.
    let who = |env: &Env, forwarded_for: &str| {
        let seen = env.path().join("client");
        env.script(
            "who",
            &format!("echo \"$HOOKRUNNER_CLIENT_ADDR $HOOKRUNNER_REMOTE_ADDR\" > {seen:?}"),
        );
        let server = env.serve();
        let r = server.request(
            "POST",
            "/hooks/who",
            &[("X-Forwarded-For", forwarded_for)],
            b"",
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let id = r.json()["request_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let line = server
            .wait_log(&format!("{id} 127.0.0.1:"), Duration::from_secs(5))
            .expect("request line");
        (fs::read_to_string(&seen).expect("ran"), line)
    };
    let proxied = Env::new().config(
        "trusted_proxies = [\"127.0.0.1/32\"]\n[[sender]]\nname = \"k\"\ntype = \"none\"\n\
         allow_ips = [\"203.0.113.0/24\"]\n",
    );
    let (said, line) = who(&proxied, "198.51.100.1, 203.0.113.7");
    assert!(said.starts_with("203.0.113.7 127.0.0.1:"), "{said}");
    assert!(line.contains(" client=203.0.113.7"), "{line}");
    // No proxy: the peer is the client, and the line names no other.
    let (said, line) = who(&Env::new(), "203.0.113.7");
    assert!(said.starts_with("127.0.0.1 127.0.0.1:"), "{said}");
    assert!(!line.contains("client="), "{line}");
}

#[test]
fn a_forged_forwarded_for_from_an_untrusted_peer_is_ignored() {
    // Only 127.0.0.2 is a trusted proxy; the test connects from 127.0.0.1.
    let env = Env::new().config(
        "trusted_proxies = [\"127.0.0.2\"]\n[[sender]]\nname = \"k\"\ntype = \"none\"\nallow_ips = [\"203.0.113.0/24\"]\n",
    );
    let out = counter(&env, "x");
    let server = env.serve();
    let response = server.request(
        "POST",
        "/hooks/x",
        &[("X-Forwarded-For", "203.0.113.7")],
        b"",
    );
    assert_refused(&server, &env, &response, 403, &out, &[]);
    assert!(
        server
            .wait_log(
                "client address 127.0.0.1 is not allowed",
                Duration::from_secs(5)
            )
            .is_some(),
        "{}",
        server.log()
    );
}

/// Sends one POST with `headers` and the body `{}` over the unix socket at `socket`, and reads its answer.
fn unix_request(socket: &Path, path: &str, headers: &[(&str, &str)]) -> Response {
    let mut stream =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    crate::util::send(&mut stream, "POST", path, headers, b"{}", true);
    Response::read(&mut stream).expect("an answer")
}

/// A reverse proxy on the unix socket is believed only with "unix" in `trusted_proxies`: then `allow_ips`,
/// the script and the log see the client its `X-Forwarded-For` names, and a client outside the list, or
/// none named, is 403 and runs nothing. Without "unix" (no proxies, or only a TCP one) the header from a
/// peer on the socket is not believed, so no allow-list can admit that peer: 403, and the log says why.
#[test]
fn a_proxy_on_the_unix_socket_is_believed_only_when_trusted_proxies_names_unix() {
    let start = |proxies: &str| {
        let env = Env::new().config(&format!(
            "{proxies}\n[[sender]]\nname = \"k\"\ntype = \"none\"\nallow_ips = [\"203.0.113.0/24\"]\n"
        ));
        let out = env.path().join("runs");
        env.script(
            "who",
            &format!(
                "echo \"$HOOKRUNNER_CLIENT_ADDR $HOOKRUNNER_REMOTE_ADDR $HOOKRUNNER_SENDER\" >> {out:?}"
            ),
        );
        let socket = env.path().join("hookrunner.sock");
        let server = Server::spawn(env.serve_command(&format!("unix:{}", socket.display())));
        server
            .wait_log("listening on unix:", Duration::from_secs(10))
            .unwrap_or_else(|| panic!("hookrunner did not start:\n{}", server.log()));
        (env, out, socket, server)
    };
    let (env, out, socket, server) = start("trusted_proxies = [\"unix\"]");
    let unusable = "its allow_ips admits no one on listen = unix:";
    let post = |forwarded_for: Option<&str>| {
        let headers: Vec<(&str, &str)> = forwarded_for
            .map(|a| ("X-Forwarded-For", a))
            .into_iter()
            .collect();
        unix_request(&socket, "/hooks/who", &headers)
    };
    for (forwarded_for, why) in [
        (
            Some("198.51.100.7"),
            "client address 198.51.100.7 is not allowed",
        ),
        (
            None,
            "client address unknown: the trusted proxy on the unix socket sent no X-Forwarded-For",
        ),
    ] {
        let response = post(forwarded_for);
        assert_refused(&server, &env, &response, 403, &out, &[]);
        let id = response.json()["request_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let line = request_line(&server, &id);
        assert!(
            line.contains(&format!(" unix POST /hooks/who sender=k auth=\"{why}\"")),
            "{forwarded_for:?}: {line}"
        );
    }
    let response = post(Some("203.0.113.7"));
    assert_eq!(
        response.status,
        200,
        "{}\n{}",
        response.text(),
        server.log()
    );
    assert_eq!(
        runs(&out),
        ["203.0.113.7 unix k"],
        "the script sees the forwarded client"
    );
    let id = response.json()["request_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let line = request_line(&server, &id);
    assert!(line.contains(" client=203.0.113.7 "), "{line}");
    // The start's lines came before the requests': no warning where the proxy is trusted.
    assert!(!server.log().contains(unusable), "{}", server.log());
    drop(server);

    // No proxy trusted, or only one on TCP: a peer on the socket names no client.
    for proxies in ["", "trusted_proxies = [\"127.0.0.1/32\"]"] {
        let (env, out, socket, server) = start(proxies);
        // Said at the start, as a warning: this sender can admit no one here.
        let warned = server.wait_log(unusable, Duration::from_secs(10));
        assert!(
            warned.is_some_and(|l| l.contains(" WARN ") && l.contains("sender \"k\": ")),
            "{proxies:?}: {}",
            server.log()
        );
        let response = unix_request(&socket, "/hooks/who", &[("X-Forwarded-For", "203.0.113.7")]);
        assert_refused(&server, &env, &response, 403, &out, &[]);
        let id = response.json()["request_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let line = request_line(&server, &id);
        assert!(
            line.contains(
                "auth=\"client address unknown: the peer is on the unix socket, whose X-Forwarded-For is \
                 believed only with \\x22unix\\x22 in trusted_proxies\""
            ) && !line.contains("client="),
            "{proxies:?}: {line}"
        );
    }
}

#[test]
fn without_a_sender_only_loopback_and_unix_are_served() {
    let env = Env::new().config("listen = \"0.0.0.0:0\"");
    let check = env.check();
    assert_eq!(check.status.code(), Some(78));
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(
        err.contains("hookrunner.toml:3:") && err.contains("no [[sender]] is configured"),
        "{err}"
    );
    // serve refuses it as check does, before it listens (--listen is judged like the file's listen).
    let mut refused = Server::spawn(env.serve_command("0.0.0.0:0"));
    let status = refused
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("serve did not refuse to start:\n{}", refused.log()));
    assert_eq!(status.code(), Some(78), "{}", refused.log());
    assert!(
        refused.log().contains("no [[sender]] is configured")
            && !refused.log().contains("listening on"),
        "{}",
        refused.log()
    );
    let open = Env::new().config("listen = \"0.0.0.0:0\"\nallow_unauthenticated = true");
    assert!(open.check().status.success());
    let mut command = open.serve_command("0.0.0.0:0");
    command.env("RUST_LOG", "info");
    let server = Server::spawn(command);
    let line = server
        .wait_log(
            "open: no sender is configured and allow_unauthenticated = true",
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("no warning:\n{}", server.log()));
    assert!(line.contains("WARN"), "{line}");
    // A sender that checks nothing and admits every address is no sender: refused as well, unless allowed.
    let none = "[[sender]]\nname = \"kazoo\"\npath = \"/k\"\ntype = \"none\"\n";
    let env = Env::new().config(&format!("listen = \"0.0.0.0:0\"\n{none}"));
    let check = env.check();
    assert_eq!(check.status.code(), Some(78));
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(
        err.contains("sender \"kazoo\" is type \"none\" without allow_ips"),
        "{err}"
    );
    let env = Env::new().config(&format!(
        "listen = \"0.0.0.0:0\"\n{none}allow_ips = [\"127.0.0.1/32\"]\n"
    ));
    assert!(env.check().status.success(), "with allow_ips it is served");
    // Trusting every address as a proxy lets any client forge X-Forwarded-For past any allow-list.
    let env = Env::new().config(&format!(
        "trusted_proxies = [\"0.0.0.0/1\", \"128.0.0.0/1\"]\n{none}allow_ips = [\"10.0.0.0/8\"]\n"
    ));
    let check = env.check();
    assert_eq!(check.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&check.stderr).contains("trusted_proxies holds every address"),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    // An allow-list that holds every address admits anyone: as open as none.
    for everyone in [
        "[\"0.0.0.0/0\", \"::/0\"]",
        "[\"0.0.0.0/1\", \"128.0.0.0/1\"]",
    ] {
        let env = Env::new().config(&format!(
            "listen = \"0.0.0.0:0\"\n{none}allow_ips = {everyone}\n"
        ));
        let check = env.check();
        assert_eq!(check.status.code(), Some(78), "{everyone}");
        let err = String::from_utf8_lossy(&check.stderr);
        assert!(
            err.contains("with allow_ips that hold every address"),
            "{everyone}: {err}"
        );
    }
    let env = Env::new().config(&format!(
        "listen = \"0.0.0.0:0\"\nallow_unauthenticated = true\n{none}"
    ));
    assert!(env.check().status.success());
    let mut command = env.serve_command("0.0.0.0:0");
    command.env("RUST_LOG", "info");
    let server = Server::spawn(command);
    let line = server
        .wait_log(
            "open: sender \"kazoo\" is type \"none\"",
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("no warning:\n{}", server.log()));
    assert!(line.contains("WARN"), "{line}");
    let local = Env::new().serve();
    assert!(
        local
            .wait_log(
                "open: no sender is configured, so every request is accepted",
                Duration::from_secs(5)
            )
            .is_some(),
        "{}",
        local.log()
    );
}

/// A loopback address or a unix socket that a proxy forwards to (`trusted_proxies` set) is reached from
/// other machines: without a sender that checks something it is refused, as a public address is.
#[test]
fn behind_a_trusted_proxy_a_local_listener_needs_a_sender() {
    for (listen, proxies) in [
        ("127.0.0.1:0", "[\"127.0.0.1/32\"]"),
        ("unix:/run/hookrunner-test.sock", "[\"unix\"]"),
    ] {
        let env = Env::new().config(&format!(
            "listen = \"{listen}\"\ntrusted_proxies = {proxies}"
        ));
        let check = env.check();
        assert_eq!(check.status.code(), Some(78), "{listen}");
        let err = String::from_utf8_lossy(&check.stderr);
        assert!(
            err.contains("is reached through a proxy (trusted_proxies is set)")
                && err.contains("no [[sender]] is configured"),
            "{err}"
        );
        let allowed = Env::new().config(&format!(
            "listen = \"{listen}\"\ntrusted_proxies = {proxies}\nallow_unauthenticated = true"
        ));
        assert!(allowed.check().status.success(), "{listen}");
    }
    // The proxy's clients are told apart by allow_ips, which sees them through X-Forwarded-For.
    let env = Env::new().config(
        "trusted_proxies = [\"127.0.0.1/32\"]\n[[sender]]\nname = \"k\"\ntype = \"none\"\n\
         allow_ips = [\"203.0.113.0/24\"]\n",
    );
    assert!(env.check().status.success());
}

/// A reload cannot move the socket, so it must not drop the last sender while a public address is still
/// served: the configuration file saying `listen` is now loopback does not make the bound socket so.
#[test]
fn a_reload_that_drops_the_last_sender_is_refused_while_a_public_address_is_served() {
    let env = Env::new();
    let key = secret(&env, "key", "s3cret-header-value");
    let out = counter(&env, "ComputerAdded");
    let scripts = env.scripts();
    let config = env.path().join("live.toml");
    let write = |listen: &str, sender: bool| {
        let mut text = format!("listen = {listen:?}\nscripts_dir = {scripts:?}\n");
        if sender {
            text.push_str(&format!(
                "[[sender]]\nname = \"jh\"\ntype = \"headers\"\nheaders = {{ \"X-Api-Key\" = {key:?} }}\n"
            ));
        }
        fs::write(&config, text).expect("write config");
    };
    write("0.0.0.0:0", true);
    let mut command = std::process::Command::new(BIN);
    command
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .env("STATE_DIRECTORY", env.state())
        .env("RUNTIME_DIRECTORY", env.payloads())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let server = Server::start(command);
    let body = b"{}";
    let signed = [("X-Api-Key", "s3cret-header-value")];
    assert_eq!(
        server
            .request("POST", "/hooks/ComputerAdded", &signed, body)
            .status,
        200
    );
    assert_eq!(server.post("/hooks/ComputerAdded", body).status, 401);
    assert_eq!(runs(&out).len(), 1, "{}", server.log());

    write("127.0.0.1:0", false);
    server.signal(libc::SIGHUP);
    let failed = server
        .wait_log("reload failed", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the reload was not refused:\n{}", server.log()));
    assert!(
        failed.contains("listen = 0.0.0.0:") && failed.contains("no [[sender]] is configured"),
        "names the address still served and why: {failed}"
    );
    assert!(
        !server.log().contains("reachable only from this machine"),
        "{}",
        server.log()
    );
    let open = server.post("/hooks/ComputerAdded", body);
    assert_eq!(
        open.status,
        401,
        "the old sender still applies: {}",
        open.text()
    );
    assert_eq!(
        runs(&out).len(),
        1,
        "nothing ran for the unauthenticated request"
    );
    assert_eq!(
        server
            .request("POST", "/hooks/ComputerAdded", &signed, body)
            .status,
        200
    );
}

#[test]
fn check_validates_profiles_and_secret_files() {
    let env = Env::new();
    let readable = env.path().join("readable");
    fs::write(&readable, "s3cr3t-value\n").expect("write");
    fs::set_permissions(&readable, fs::Permissions::from_mode(0o644)).expect("chmod");
    let empty = env.path().join("empty");
    fs::write(&empty, "\n").expect("write");
    let blanks = secret(&env, "blanks", "\n\n");
    let spaces = secret(&env, "spaces", " \t \n");
    let two_lines = secret(&env, "two-lines", "s3cr3t\n\n");
    // Not empty as a file, but no key: an HMAC under the empty key is anybody's.
    let bare_prefix = secret(&env, "bare-prefix", "whsec_");
    let cases = [
        (
            format!(
                "type = \"github\"\nsecret_file = {:?}",
                env.path().join("missing")
            ),
            "No such file",
        ),
        (
            format!("type = \"github\"\nsecret_file = {empty:?}"),
            "is empty",
        ),
        (
            format!("type = \"github\"\nsecret_file = {blanks:?}"),
            "holds only blanks",
        ),
        (
            format!("type = \"github\"\nsecret_file = {spaces:?}"),
            "holds only blanks",
        ),
        ("type = \"github\"".to_string(), "needs secret_file"),
        ("type = \"frobnicate\"".to_string(), "unknown type"),
        (
            format!("type = \"gitlab\"\nsecret_file = {readable:?}\nuser = \"x\""),
            "user does not apply to type gitlab",
        ),
        (
            format!("type = \"scalefusion\"\nsecret_file = {readable:?}\nheader = \"X-Sig\""),
            "header does not apply to type scalefusion (its signature's format is fixed; for another, use \
             type = \"hmac\" with header)",
        ),
        (
            format!(
                "type = \"hmac\"\nheader = \"X-S\"\nalgorithm = \"md5\"\nsecret_file = {readable:?}"
            ),
            "use sha256 or sha512",
        ),
        (
            "type = \"none\"\nallow_ips = [\"10.0.0.1/8\"]".to_string(),
            "host bits set",
        ),
        (
            "type = \"none\"\npath = \"jamf\"".to_string(),
            "must be a URL path",
        ),
        ("type = \"mtls\"".to_string(), "type mtls needs subjects"),
        // RFC 7617 splits at the first colon: no client could send this user.
        (
            format!("type = \"basic\"\nuser = \"jamf:ops\"\npassword_file = {readable:?}"),
            "user must not contain ':'",
        ),
        (
            format!("type = \"standard-webhooks\"\nsecret_file = {bare_prefix:?}"),
            "must hold a Standard Webhooks secret",
        ),
        // Both names would be asked of every request, each with its own value: none could pass.
        (
            format!(
                "type = \"headers\"\nheaders = {{ \"X-Api-Key\" = {readable:?}, \"x-api-key\" = {spaces:?} }}"
            ),
            "headers names \"x-api-key\" twice (header names match whatever their case)",
        ),
    ];
    for (body, says) in cases {
        let env = Env::new().config(&format!("# a comment\n[[sender]]\nname = \"s\"\n{body}\n"));
        let out = env.check();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{body}: {err}");
        assert!(err.contains(says), "{body}: {err}");
        // On the line of the key the message names first, else on the table's.
        let text = fs::read_to_string(env.config_path()).expect("config");
        let message = err
            .split_once(": sender \"s\": ")
            .map(|(_, m)| m)
            .unwrap_or_else(|| panic!("{err}"));
        let key = message.split([' ', ':']).next().unwrap_or("");
        let line = text
            .lines()
            .position(|l| l.starts_with(&format!("{key} =")))
            .map_or(4, |i| i + 1);
        assert!(
            err.contains(&format!("hookrunner.toml:{line}: sender \"s\":")),
            "line {line}: {body}: {err}"
        );
    }
    // An events glob no event name can match loads (an upgrade must not stop a running setup), warned of.
    let env = Env::new().config(&format!(
        "[[sender]]\nname = \"s\"\ntype = \"gitlab\"\nsecret_file = {readable:?}\nevents = [\"Computer Added\", \"Computer*\"]\n"
    ));
    let out = env.check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("sender \"s\": events \"Computer Added\" can never match")
            && !err.contains("\"Computer*\" can never"),
        "{err}"
    );
    // A header's value pasted with its name, or a number (a PIN) where a secret file's path belongs: the
    // error does not repeat it.
    for body in [
        format!("type = \"headers\"\nheaders = {{ \"X-Api-Key: Pasted0f9e\" = {readable:?} }}"),
        "type = \"basic\"\nuser = \"u\"\npassword_file = 98765432109876".to_string(),
        // A header's value (a PIN) where the file naming it belongs.
        "type = \"headers\"\nheaders = { \"X-Api-Key\" = 98765432109876 }".to_string(),
        // The header line pasted whole where the table of them belongs.
        "type = \"headers\"\nheaders = \"X-Api-Key: Pasted0f9e\"".to_string(),
        // user:password pasted into `user`.
        format!("type = \"basic\"\nuser = \"jamf:Pasted0f9e\"\npassword_file = {readable:?}"),
    ] {
        let env = Env::new().config(&format!("[[sender]]\nname = \"s\"\n{body}\n"));
        let out = env.check();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{err}");
        assert!(
            !err.contains("Pasted0f9e") && !err.contains("98765432109876"),
            "{err}"
        );
    }
    // A secret pasted where its file's path belongs is not echoed by the error that it names no file.
    // (A base64 one may start with `/`: an absolute name is shown only in an existing directory but `/`.)
    for pasted in [
        "pasted-Secret-0f9e",
        "/pasted+Secret/0f9e=",
        "/pasted-Secret-0f9e",
    ] {
        let env = Env::new().config(&format!(
            "[[sender]]\nname = \"s\"\ntype = \"github\"\nsecret_file = {pasted:?}\n"
        ));
        let out = env.check();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{err}");
        assert!(
            err.contains("secret_file: cannot read the file it names")
                && !err.contains("pasted")
                && !err.contains("Secret"),
            "{err}"
        );
    }
    // Two senders on one path: only one of them could ever apply.
    let twice = Env::new().config(
        "[[sender]]\nname = \"a\"\ntype = \"none\"\npath = \"/jamf\"\n\
         [[sender]]\nname = \"b\"\ntype = \"none\"\npath = \"/jamf\"\n",
    );
    let out = twice.check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("hookrunner.toml:7: sender \"b\": path \"/jamf\" is already sender \"a\"'s"),
        "{err}"
    );
    let env = Env::new().config(&format!(
        "[[sender]]\nname = \"s\"\ntype = \"gitlab\"\nsecret_file = {readable:?}\n"
    ));
    let out = env.check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("open to group or others (mode 644): chmod 600 it"),
        "{err}"
    );
    assert!(!err.contains("s3cr3t") && !String::from_utf8_lossy(&out.stdout).contains("s3cr3t"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("# sender s: gitlab on /"));
    // A generic hmac on GitHub's header is shown as what it was configured as.
    let env = Env::new().config(&format!(
        "[[sender]]\nname = \"s\"\ntype = \"hmac\"\nheader = \"X-Hub-Signature-256\"\n\
         algorithm = \"sha256\"\nencoding = \"hex\"\nprefix = \"sha256=\"\nsecret_file = {readable:?}\n"
    ));
    let out = env.check();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("# sender s: hmac on /"), "{stdout}");
    // More than one line is warned about, not refused: a key of raw bytes may hold newlines.
    let env = Env::new().config(&format!(
        "[[sender]]\nname = \"s\"\ntype = \"basic\"\nuser = \"u\"\npassword_file = {two_lines:?}\n"
    ));
    let out = env.check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("holds more than one line"), "{err}");
}

#[test]
fn secrets_come_from_the_credentials_directory_when_relative() {
    let env = Env::new();
    let credentials = env.path().join("credentials");
    fs::create_dir(&credentials).expect("mkdir");
    fs::write(credentials.join("gitlab"), "from-credentials\n").expect("write");
    let env =
        env.config("[[sender]]\nname = \"gl\"\ntype = \"gitlab\"\nsecret_file = \"gitlab\"\n");
    let out = counter(&env, "push");
    let server = env.serve_with(|command| {
        command.env("CREDENTIALS_DIRECTORY", &credentials);
    });
    let response = server.request(
        "POST",
        "/hooks/push",
        &[("X-Gitlab-Token", "from-credentials")],
        b"{}",
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(runs(&out).len(), 1);
}

/// The `(N similar messages suppressed)` a rate-limited warning ends with; 0 for one without.
fn suppressed(line: &str) -> u64 {
    line.strip_suffix(" similar messages suppressed)")
        .and_then(|l| l.rsplit_once('('))
        .map_or(0, |(_, n)| n.parse().expect("a count"))
}

/// A client that fails authentication again and again cannot flood the log: the warning naming the failure
/// is written at most once a second, while every request keeps its own line; once a second has passed the
/// next failure is written, saying how many were held back, so every failure is counted.
#[test]
fn the_authentication_failure_warning_is_written_at_most_once_a_second() {
    let env = Env::new();
    let key = secret(&env, "key", "the-right-key");
    let env = env.config(&format!(
        "[[sender]]\nname = \"jamf\"\ntype = \"headers\"\nheaders = {{ \"X-Api-Key\" = {key:?} }}\n"
    ));
    let out = counter(&env, "x");
    let server = env.serve();
    let warnings = || -> Vec<String> {
        server
            .log()
            .lines()
            .filter(|l| l.contains(" authentication failed for sender jamf from 127.0.0.1:"))
            .map(str::to_string)
            .collect()
    };
    let post = || {
        let response = server.request("POST", "/hooks/x", &[("X-Api-Key", "wrong-key")], b"{}");
        assert_eq!(response.status, 401, "{}", response.text());
        let id = response.json()["request_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        (response, id)
    };
    let started = Instant::now();
    let mut sent = 0u64;
    let mut last = String::new();
    while sent < 20 {
        last = post().1;
        sent += 1;
    }
    // Its line is written after its warning would be. Should that warning have been written (the machine
    // stalled a second just before it), more, until one is held back.
    request_line(&server, &last);
    while warnings().iter().any(|l| l.contains(&format!(" {last} "))) {
        assert!(sent < 40, "no warning held back:\n{}", server.log());
        last = post().1;
        sent += 1;
        request_line(&server, &last);
    }
    let took = started.elapsed();
    let burst = warnings();
    assert!(
        !burst.is_empty() && burst.len() as u64 <= 1 + took.as_secs(),
        "{} warnings for {sent} failures in {took:?}:\n{}",
        burst.len(),
        server.log()
    );
    let lines = server
        .log()
        .lines()
        .filter(|l| l.contains(" status=401") && l.contains(" auth=\"X-Api-Key does not match"))
        .count() as u64;
    assert_eq!(lines, sent, "every request has its own line");
    // The limit's period passed since the last warning written (before the burst ended): the next is
    // written, and counts those held back since.
    std::thread::sleep(Duration::from_millis(1100));
    let (response, id) = post();
    assert_refused(&server, &env, &response, 401, &out, &["the-right-key"]);
    let logged = warnings();
    let latest = logged.last().expect("a warning");
    assert_eq!(logged.len(), burst.len() + 1, "{}", server.log());
    assert!(
        latest.contains(&format!(
            " {id} authentication failed for sender jamf from 127.0.0.1:"
        )) && latest.contains(": X-Api-Key does not match the configured secret ("),
        "{latest}"
    );
    let held_back: u64 = burst.iter().map(|l| 1 + suppressed(l)).sum();
    assert_eq!(
        suppressed(latest),
        sent - held_back,
        "the failures since the last warning: {latest}\n{}",
        server.log()
    );
    assert!(suppressed(latest) >= 1, "{latest}");
}

#[test]
fn at_debug_level_a_failure_lists_the_names_of_the_headers_that_came_and_never_their_values() {
    let env = Env::new();
    let file = secret(&env, "key", "the-right-key");
    let env = env.config(&format!(
        "[[sender]]\nname = \"jamf\"\ntype = \"headers\"\nheaders = {{ \"X-Api-Key\" = {file:?} }}\n"
    ));
    let server = env.serve_with(|command| {
        command.env("RUST_LOG", "debug");
    });
    let response = server.request(
        "POST",
        "/hooks/x",
        &[
            ("X-Jamf-Signature", "value-that-must-not-show"),
            ("X-Api-Key", "wrong-key-value"),
        ],
        b"{}",
    );
    assert_eq!(response.status, 401, "{}", response.text());
    let line = server
        .wait_log("header names: ", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no header names at debug:\n{}", server.log()));
    assert!(
        line.contains("X-Jamf-Signature") && line.contains("X-Api-Key"),
        "{line}"
    );
    let log = server.log();
    for value in [
        "value-that-must-not-show",
        "wrong-key-value",
        "the-right-key",
    ] {
        assert!(!log.contains(value), "{value} is in the log:\n{log}");
    }
}

#[test]
fn scalefusion_signatures_made_by_openssl_pass_and_wrong_ones_fail() {
    let env = Env::new();
    let key = "scalefusion-shared-secret";
    let file = secret(&env, "sf", key);
    let env = env.config(&format!(
        "[[sender]]\nname = \"sf\"\ntype = \"scalefusion\"\nsecret_file = {file:?}\n"
    ));
    let out = counter(&env, "device.enrolled");
    let server = env.serve();
    let body = br#"{"event":"device.enrolled","data":{"device_id":42,"device_name":"Kiosk 7"}}"#;
    // The sender's side, by an HMAC nobody here wrote: openssl's, lower-case hex.
    let sign = |key: &str| {
        let mut child = std::process::Command::new("openssl")
            .args(["dgst", "-sha256", "-hmac", key, "-r"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("openssl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(body)
            .expect("write");
        let out = child.wait_with_output().expect("openssl output");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let post = |sig: &str| {
        server.request(
            "POST",
            "/",
            &[
                ("X-SF-Signature", sig),
                ("Content-Type", "application/json"),
            ],
            body,
        )
    };
    assert_refused(
        &server,
        &env,
        &post(&sign("another-secret")),
        401,
        &out,
        &[key],
    );
    assert_refused(&server, &env, &post("not hex"), 401, &out, &[key]);
    let good = post(&sign(key));
    assert_eq!(good.status, 200, "{}", good.text());
    assert_eq!(good.json()["event"], "device.enrolled");
    assert_eq!(runs(&out).len(), 1);
}
