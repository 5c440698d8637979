//! The HTTP layer's limits and fault paths, against the real binary over raw TCP sockets: sizes, framing,
//! slow and idle clients, keep-alive, connection and descriptor exhaustion.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::util::{Env, Response, Server};

/// A script that copies its payload file to `<env>/body`; returns that path.
fn copier(env: &Env, name: &str) -> PathBuf {
    let out = env.path().join("body");
    env.script(name, &format!("cp \"$1\" {out:?}"));
    out
}

/// Connects and writes `bytes` as they are.
fn raw(server: &Server, bytes: &[u8]) -> TcpStream {
    let mut stream = server.connect();
    stream.write_all(bytes).expect("send");
    stream
}

/// Reads one response, or fails the test with the server's log.
fn answer(server: &Server, stream: &mut TcpStream) -> Response {
    Response::read(stream).unwrap_or_else(|e| panic!("no response: {e}\nlog:\n{}", server.log()))
}

/// Sends `bytes` on a new connection and reads the answer.
fn exchange(server: &Server, bytes: &[u8]) -> Response {
    let mut stream = raw(server, bytes);
    answer(server, &mut stream)
}

/// Reads until the server closes (EOF or reset) and returns what arrived; `None` if still open at `limit`.
fn until_closed(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + limit;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        stream.set_read_timeout(Some(left)).expect("read timeout");
        match stream.read(&mut buf) {
            Ok(0) => return Some(received),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Some(received),
        }
    }
}

/// True when the server has neither answered nor closed the connection (checked without blocking).
fn still_open(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).expect("nonblocking");
    let open = matches!(stream.peek(&mut [0u8; 1]), Err(e) if e.kind() == ErrorKind::WouldBlock);
    stream.set_nonblocking(false).expect("blocking");
    open
}

/// A bodiless GET head on HTTP/1.1.
fn get(path: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n").into_bytes()
}

fn chunked_head(path: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n")
}

/// The status line of a raw answer.
fn status_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn assert_healthy(server: &mut Server) {
    assert!(
        server.child.try_wait().expect("try_wait").is_none(),
        "the daemon exited:\n{}",
        server.log()
    );
    let response = server.get("/healthz");
    assert_eq!(response.status, 200, "{}", response.text());
}

#[test]
fn huge_content_length_is_413_without_reading_the_body() {
    let env = Env::new();
    let mut server = env.serve();
    let head = "POST /hooks/x HTTP/1.1\r\nHost: test\r\nContent-Length: 1099511627776\r\n\r\n";
    // No body follows: the answer can only come from the head.
    let mut stream = raw(&server, head.as_bytes());
    let response = answer(&server, &mut stream);
    assert_eq!(response.status, 413, "{}", response.text());
    assert_eq!(response.header("Connection"), Some("close"));
    assert!(
        until_closed(&mut stream, Duration::from_secs(10)).is_some_and(|rest| rest.is_empty()),
        "closed after the 413, with nothing more sent"
    );
    assert_healthy(&mut server);
}

#[test]
fn expect_continue_with_a_huge_content_length_is_413_without_100_continue() {
    let env = Env::new();
    let mut server = env.serve();
    let head = "POST /hooks/x HTTP/1.1\r\nHost: test\r\nContent-Length: 1099511627776\r\n\
                Expect: 100-continue\r\n\r\n";
    let mut stream = raw(&server, head.as_bytes());
    let all = until_closed(&mut stream, Duration::from_secs(10)).expect("closed after answering");
    assert!(
        status_line(&all).starts_with("HTTP/1.1 413 "),
        "the first thing sent is the 413, not 100 Continue: {:?}",
        String::from_utf8_lossy(&all)
    );
    assert!(
        !String::from_utf8_lossy(&all).contains(" 100 Continue"),
        "{:?}",
        String::from_utf8_lossy(&all)
    );
    assert_healthy(&mut server);
}

#[test]
fn expect_continue_gets_100_before_the_body_then_the_answer() {
    let env = Env::new();
    let out = copier(&env, "copy");
    let server = env.serve();
    let body = b"{\"sent\":\"after 100 Continue\"}";
    let head = format!(
        "POST /hooks/copy HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    let mut stream = raw(&server, head.as_bytes());
    let interim = answer(&server, &mut stream);
    assert_eq!(
        interim.status, 100,
        "100 Continue before any body byte: {interim:?}"
    );
    stream.write_all(body).expect("send body");
    let response = answer(&server, &mut stream);
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(fs::read(out).expect("copied body"), body);
}

#[test]
fn expect_continue_for_a_body_the_handler_does_not_read_is_answered_at_once() {
    // /healthz never reads a body. The client waits for 100 Continue before sending it, so the server must
    // answer (and close) rather than wait for the body until it times out.
    let env = Env::new().config("header_timeout = \"3s\"");
    let server = env.serve();
    let mut stream = raw(
        &server,
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    );
    let response = answer(&server, &mut stream);
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(
        response.header("Connection"),
        Some("close"),
        "the unread body leaves the connection unusable"
    );
    assert!(
        until_closed(&mut stream, Duration::from_secs(10)).is_some_and(|rest| rest.is_empty()),
        "closed after the answer"
    );
    // A client that sent the body without waiting keeps its connection: the body is drained.
    let mut both = b"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello".to_vec();
    both.extend_from_slice(&get("/healthz", ""));
    let mut stream = raw(&server, &both);
    let first = answer(&server, &mut stream);
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("Connection"), Some("keep-alive"));
    assert_eq!(answer(&server, &mut stream).status, 200);
}

#[test]
fn content_length_over_max_body_is_413() {
    let env = Env::new().config("max_body = \"1KiB\"");
    copier(&env, "copy");
    let server = env.serve();
    assert_eq!(server.post("/hooks/copy", &[b'a'; 1024]).status, 200);
    let response = server.post("/hooks/copy", &[b'a'; 1025]);
    assert_eq!(response.status, 413, "{}", response.text());
}

/// Clients that send their whole body before they read (Python's urllib, wget) read the refusal of a body
/// up to just over `max_body`, not a reset: the server reads and discards it after answering. Here a 401
/// for an unauthenticated body of `max_body`, and a 413 for one a byte over it.
#[test]
fn a_client_that_sends_all_before_reading_reads_the_refusal() {
    let env = Env::new().config(
        "max_body = \"8MiB\"\n[[sender]]\nname = \"u\"\ntype = \"headers\"\nheaders = { \"X-Key\" = \"key\" }\n",
    );
    std::fs::write(env.path().join("key"), "right").expect("key");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            env.path().join("key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
    }
    copier(&env, "copy");
    let server = env.serve();
    for (len, status) in [(8 << 20, 401), ((8 << 20) + 1, 413)] {
        let mut stream = server.connect();
        let head = format!(
            "POST /hooks/copy HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).expect("head");
        let body = vec![b'a'; len];
        stream
            .write_all(&body)
            .unwrap_or_else(|e| panic!("{len} bytes: the body could not be sent whole: {e}"));
        let response = answer(&server, &mut stream);
        assert_eq!(response.status, status, "{}", response.text());
    }
}

#[test]
fn chunked_body_over_max_body_is_413() {
    let env = Env::new().config("max_body = \"1KiB\"");
    copier(&env, "copy");
    let server = env.serve();
    // Two chunks that fit alone but not together.
    let mut request = chunked_head("/hooks/copy").into_bytes();
    request.extend_from_slice(b"\r\n300\r\n");
    request.extend_from_slice(&[b'a'; 0x300]);
    request.extend_from_slice(b"\r\n300\r\n");
    request.extend_from_slice(&[b'b'; 0x300]);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    let response = exchange(&server, &request);
    assert_eq!(response.status, 413, "{}", response.text());
    assert!(response.header("X-Request-Id").is_some(), "{response:?}");
}

#[test]
fn chunked_body_far_over_max_body_still_gets_its_413() {
    // A sender streaming a large chunked body without waiting must still read the 413, not a reset.
    let env = Env::new().config("max_body = \"1KiB\"");
    copier(&env, "copy");
    let server = env.serve();
    let mut request = chunked_head("/hooks/copy").into_bytes();
    request.extend_from_slice(b"\r\n");
    for _ in 0..64 {
        request.extend_from_slice(b"1000\r\n");
        request.extend_from_slice(&[b'z'; 0x1000]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let mut stream = server.connect();
    let mut writer = stream.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        // The server may stop reading; a failed write is expected then.
        let _ = writer.write_all(&request);
    });
    let response = answer(&server, &mut stream);
    assert_eq!(response.status, 413, "{}", response.text());
    drop(stream);
    sender.join().expect("sender thread");
}

#[test]
fn head_over_max_header_bytes_is_431_and_the_server_keeps_serving() {
    let env = Env::new();
    let mut server = env.serve();
    let big = format!("X-Big: {}\r\n", "v".repeat(17 << 10));
    let response = exchange(&server, &get("/healthz", &big));
    assert_eq!(response.status, 431, "{}", response.text());
    // Just under the default 16 KiB is fine.
    let fits = format!("X-Big: {}\r\n", "v".repeat(15 << 10));
    assert_eq!(exchange(&server, &get("/healthz", &fits)).status, 200);
    assert_healthy(&mut server);
}

#[test]
fn more_than_100_header_fields_is_431_and_the_server_keeps_serving() {
    let env = Env::new();
    let mut server = env.serve();
    let fields = |n: usize| {
        (1..n)
            .map(|i| format!("X-F{i}: {i}\r\n"))
            .collect::<String>()
    };
    // Host plus 99 more: exactly 100 fields.
    assert_eq!(
        exchange(&server, &get("/healthz", &fields(100))).status,
        200
    );
    let response = exchange(&server, &get("/healthz", &fields(101)));
    assert_eq!(response.status, 431, "{}", response.text());
    assert!(response.text().contains("too many header fields"));
    assert_healthy(&mut server);
}

#[test]
fn request_line_over_8kib_is_414_however_it_arrives() {
    let env = Env::new();
    let mut server = env.serve();
    let long = format!("/healthz?{}", "q".repeat(9 << 10));
    // Whole request in one write.
    let response = exchange(&server, &get(&long, ""));
    assert_eq!(response.status, 414, "{}", response.text());
    // The line alone, without its end yet.
    let mut stream = raw(&server, format!("GET {long}").as_bytes());
    let response = answer(&server, &mut stream);
    assert_eq!(response.status, 414, "{}", response.text());
    // Under the limit, the long query is no problem.
    let fits = format!("/healthz?{}", "q".repeat(7 << 10));
    assert_eq!(exchange(&server, &get(&fits, "")).status, 200);
    assert_healthy(&mut server);
}

/// A body of one-byte chunks costs the daemon one write per 16 KiB of its payload file, not one per byte
/// (400 KiB of them were 140,000 write calls). Counted with strace, which .ci/run installs.
#[test]
fn a_body_of_one_byte_chunks_is_written_in_large_writes() {
    if !crate::util::has_strace() {
        return;
    }
    let env = Env::new();
    let out = copier(&env, "copy");
    let trace = env.path().join("trace");
    let trace_arg = trace.to_string_lossy().into_owned();
    let (server, _daemon) = env.serve_under_strace(&[
        "--seccomp-bpf",
        "-e",
        "trace=write,pwrite64",
        "-o",
        &trace_arg,
    ]);
    // Past the 256 KiB a request keeps in memory, so the body goes to its file as it arrives.
    let body: Vec<u8> = (0..=255u8).cycle().take(320 << 10).collect();
    let mut request = chunked_head("/hooks/copy").into_bytes();
    request.extend_from_slice(b"\r\n");
    for byte in &body {
        request.extend_from_slice(b"1\r\n");
        request.push(*byte);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let mut stream = raw(&server, &request);
    let response = answer(&server, &mut stream);
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(fs::read(&out).expect("copied body"), body, "exact bytes");
    let writes = fs::read_to_string(&trace).expect("trace");
    let small = writes
        .lines()
        .filter(|l| l.contains("write") && l.trim_end().ends_with("= 1"))
        .count();
    assert!(small < 100, "{small} one-byte writes");
}

#[test]
fn chunked_bodies_reach_the_script_byte_exact() {
    let env = Env::new();
    let out = copier(&env, "copy");
    let server = env.serve();
    let body: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    let mut request = chunked_head("/hooks/copy").into_bytes();
    request.extend_from_slice(b"\r\n");
    let mut rest = &body[..];
    for (i, size) in [1usize, 0x10, 0x3ff, 7, 0x100, 2000]
        .into_iter()
        .enumerate()
    {
        let size = size.min(rest.len());
        if size == 0 {
            break;
        }
        let extension = match i % 3 {
            0 => "",
            1 => ";name=value",
            _ => ";a;b=\"quoted; value\"",
        };
        request.extend_from_slice(format!("{size:X}{extension}\r\n").as_bytes());
        request.extend_from_slice(&rest[..size]);
        request.extend_from_slice(b"\r\n");
        rest = &rest[size..];
    }
    assert!(rest.is_empty(), "the test sends the whole body");
    request.extend_from_slice(b"0;last\r\nX-Trailer: one\r\nX-Other: two\r\n\r\n");
    // The connection stays usable: the decoder stopped exactly at the body's end.
    request.extend_from_slice(&get("/healthz", ""));
    let mut stream = raw(&server, &request);
    let response = answer(&server, &mut stream);
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(fs::read(&out).expect("copied body"), body, "exact bytes");
    let next = answer(&server, &mut stream);
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(next.json()["status"], "ok");
}

#[test]
fn ambiguous_or_unsupported_framing_is_400() {
    let env = Env::new();
    copier(&env, "copy");
    let server = env.serve();
    let cases = [
        (
            "Content-Length and Transfer-Encoding",
            "POST /hooks/copy HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "conflicting Content-Length",
            "POST /hooks/copy HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
        (
            "conflicting Content-Length in one field",
            "POST /hooks/copy HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 6\r\n\r\nhello!",
        ),
        (
            "bad chunk size",
            "POST /hooks/copy HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "chunk longer than its size",
            "POST /hooks/copy HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "gzip",
            "POST /hooks/copy HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n",
        ),
        (
            "gzip, chunked",
            "POST /hooks/copy HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        ),
        // Only spaces and tabs surround a value: a no-break space (UTF-8 C2 A0) or an ideographic space
        // is part of it, so these are no length and no coding a front proxy would agree on.
        (
            "Content-Length with a no-break space",
            "POST /hooks/copy HTTP/1.1\r\nHost: t\r\nContent-Length: 5\u{a0}\r\n\r\nhello",
        ),
        (
            "chunked with an ideographic space",
            "POST /hooks/copy HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: \u{3000}chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
    ];
    for (what, request) in cases {
        let mut stream = raw(&server, request.as_bytes());
        let response = answer(&server, &mut stream);
        assert_eq!(response.status, 400, "{what}: {}", response.text());
        assert!(response.header("X-Request-Id").is_some(), "{what}");
        assert_eq!(
            response.header("Connection"),
            Some("close"),
            "{what}: the framing is unknown, so the connection cannot be reused"
        );
        assert!(
            until_closed(&mut stream, Duration::from_secs(10)).is_some(),
            "{what}: closed"
        );
    }
    assert!(
        !env.path().join("body").exists(),
        "no script ran for a badly framed request"
    );
}

/// Sends a partial head, then one more header byte every 200 ms, until the server answers or closes;
/// returns what it sent back, or `None` if the connection was still open after `limit`.
fn trickle_head(server: &Server, limit: Duration) -> Option<Vec<u8>> {
    let mut stream = raw(server, b"POST /hooks/x HTTP/1.1\r\nHost: test\r\nX-Slow: ");
    let deadline = Instant::now() + limit;
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    while Instant::now() < deadline {
        if stream.write_all(b"a").is_err() {
            // The server stopped reading: what it answered is still there to read.
            let _ = stream.read_to_end(&mut received);
            return Some(received);
        }
        match stream.read(&mut buf) {
            Ok(0) => return Some(received),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(received),
        }
    }
    None
}

#[test]
fn a_head_trickling_in_is_cut_off_at_header_timeout() {
    let env = Env::new().config("header_timeout = \"1s\"");
    let mut server = env.serve();
    let started = Instant::now();
    let sent = trickle_head(&server, Duration::from_secs(6))
        .expect("the slow client was not cut off within 6 s of a 1 s header_timeout");
    assert!(
        status_line(&sent).starts_with("HTTP/1.1 408 "),
        "the README promises 408: {:?}",
        String::from_utf8_lossy(&sent)
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "not before the deadline: {:?}",
        started.elapsed()
    );
    assert_healthy(&mut server);
}

#[test]
fn slow_clients_do_not_hold_up_other_requests() {
    // Long enough that the other request is answered first on a loaded machine too.
    let env = Env::new().config("header_timeout = \"10s\"");
    let server = env.serve();
    let mut slow: Vec<TcpStream> = (0..6)
        .map(|_| raw(&server, b"POST /hooks/x HTTP/1.1\r\nHost: te"))
        .collect();
    let response = server.get("/healthz");
    assert_eq!(response.status, 200, "{}", response.text());
    for (i, stream) in slow.iter().enumerate() {
        assert!(
            still_open(stream),
            "slow client {i} was still waiting when the other request was answered"
        );
    }
    for (i, stream) in slow.iter_mut().enumerate() {
        let sent = until_closed(stream, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("slow client {i} not cut off after header_timeout"));
        let text = String::from_utf8_lossy(&sent);
        assert!(status_line(&sent).starts_with("HTTP/1.1 408 "), "{text:?}");
        assert!(text.contains("\r\nX-Request-Id: "), "{text:?}");
    }
}

#[test]
fn a_body_trickling_in_is_cut_off() {
    let env = Env::new().config("header_timeout = \"1s\"");
    copier(&env, "copy");
    let mut server = env.serve();
    // 12 bytes at 2 bytes/s would be complete after 6 s; the pace rule must cut it off long before.
    const LENGTH: usize = 12;
    let mut stream = raw(
        &server,
        format!("POST /hooks/copy HTTP/1.1\r\nHost: test\r\nContent-Length: {LENGTH}\r\n\r\n")
            .as_bytes(),
    );
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("read timeout");
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    let mut sent = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "a body at 2 bytes/s was not cut off within 8 s"
        );
        if sent < LENGTH && stream.write_all(b"b").is_ok() {
            sent += 1;
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    assert!(
        status_line(&received).starts_with("HTTP/1.1 408 "),
        "{:?}",
        String::from_utf8_lossy(&received)
    );
    assert!(
        sent < LENGTH,
        "cut off before the whole body arrived ({sent} of {LENGTH} bytes sent)"
    );
    assert!(!env.path().join("body").exists(), "the script did not run");
    // The log says why, for the operator whose sender never read the answer.
    let line = server
        .wait_log("status=408", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{}", server.log()));
    assert!(line.contains(" body=\"") && line.contains("slow"), "{line}");
    assert_healthy(&mut server);
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_keepalive_timeout() {
    let env = Env::new().config("keepalive_timeout = \"1s\"");
    let server = env.serve();
    // Taken before the request is sent, so before the server's timer starts however slow this thread is.
    let asked = Instant::now();
    let mut stream = raw(&server, &get("/healthz", ""));
    let response = answer(&server, &mut stream);
    assert_eq!(response.status, 200);
    assert_eq!(response.header("Connection"), Some("keep-alive"));
    assert_closed_silently(&mut stream);
    // Not closed right after the answer: the server kept its word for the whole second.
    assert!(
        asked.elapsed() >= Duration::from_millis(950),
        "closed {:?} after the request, before the 1 s keepalive_timeout",
        asked.elapsed()
    );
}

/// The server closes the connection within 6 s (of a 1 s timeout) without writing anything more.
fn assert_closed_silently(stream: &mut TcpStream) {
    let rest = until_closed(stream, Duration::from_secs(6))
        .expect("idle connection not closed within 6 s of a 1 s timeout");
    assert!(
        rest.is_empty(),
        "closed without a word: {:?}",
        String::from_utf8_lossy(&rest)
    );
}

#[test]
fn a_stray_crlf_after_a_request_is_not_answered() {
    let env = Env::new().config("keepalive_timeout = \"1s\"\nheader_timeout = \"1s\"");
    let server = env.serve();
    let mut stream = raw(&server, &get("/healthz", ""));
    assert_eq!(answer(&server, &mut stream).status, 200);
    // Some old clients send CRLF after a body; that is no request, so no 408 may follow it.
    stream.write_all(b"\r\n").expect("send CRLF");
    assert_closed_silently(&mut stream);
}

#[test]
fn several_requests_share_one_connection() {
    let env = Env::new();
    let out = copier(&env, "copy");
    let server = env.serve();
    let mut stream = server.connect();
    for i in 0..3 {
        let body = format!("{{\"n\":{i}}}");
        crate::util::send(
            &mut stream,
            "POST",
            "/hooks/copy",
            &[],
            body.as_bytes(),
            false,
        );
        let response = answer(&server, &mut stream);
        assert_eq!(response.status, 200, "request {i}: {}", response.text());
        assert_eq!(response.header("Connection"), Some("keep-alive"));
        assert_eq!(fs::read(&out).expect("copied body"), body.as_bytes());
    }
    crate::util::send(&mut stream, "GET", "/healthz", &[], b"", true);
    let last = answer(&server, &mut stream);
    assert_eq!(last.status, 200);
    assert_eq!(last.header("Connection"), Some("close"));
    assert!(
        until_closed(&mut stream, Duration::from_secs(10)).is_some_and(|r| r.is_empty()),
        "closed after the request that asked for it"
    );
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let env = Env::new();
    let out = copier(&env, "copy");
    let server = env.serve();
    let mut both = b"POST /hooks/copy HTTP/1.1\r\nHost: t\r\nX-Request-Id: first\r\nContent-Length: 5\r\n\r\nfirst".to_vec();
    both.extend_from_slice(&get("/healthz", "X-Request-Id: second\r\n"));
    let mut stream = raw(&server, &both);
    let first = answer(&server, &mut stream);
    let second = answer(&server, &mut stream);
    assert_eq!(first.header("X-Request-Id"), Some("first"), "{first:?}");
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.json()["script"], "copy");
    assert_eq!(second.header("X-Request-Id"), Some("second"), "{second:?}");
    assert_eq!(second.json()["status"], "ok");
    assert_eq!(fs::read(&out).expect("copied body"), b"first");
}

#[test]
fn http_1_0_closes_unless_keep_alive_is_asked_for() {
    let env = Env::new();
    let server = env.serve();
    let mut plain = raw(&server, b"GET /healthz HTTP/1.0\r\n\r\n");
    let response = answer(&server, &mut plain);
    assert_eq!(response.status, 200);
    assert_eq!(response.header("Connection"), Some("close"));
    assert!(
        until_closed(&mut plain, Duration::from_secs(10)).is_some(),
        "HTTP/1.0 without keep-alive is closed after the answer"
    );
    let ask = b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
    let mut kept = raw(&server, ask);
    for i in 0..2 {
        let response = answer(&server, &mut kept);
        assert_eq!(response.status, 200, "answer {i}");
        assert_eq!(
            response.header("Connection"),
            Some("keep-alive"),
            "answer {i}"
        );
        if i == 0 {
            assert!(still_open(&kept), "kept open after the first answer");
            kept.write_all(ask)
                .expect("second request on the same connection");
        }
    }
}

#[test]
fn delete_is_405_with_allow() {
    let env = Env::new();
    let server = env.serve();
    let response = server.request("DELETE", "/hooks/x", &[], b"");
    assert_eq!(response.status, 405, "{}", response.text());
    assert_eq!(response.header("Allow"), Some("GET, POST, PUT"));
}

/// HEAD /healthz is a health check's (load balancers send it): GET's head, without its content. Any
/// other HEAD is 405 and runs nothing. Either answer is the head alone: a body after it would be read as
/// the start of the next answer.
#[test]
fn head_is_for_healthz_alone_and_has_no_content() {
    let env = Env::new();
    let marker = env.path().join("ran");
    env.script("x", &format!("touch {marker:?}"));
    let server = env.serve();
    for (target, status) in [("/healthz", "200"), ("/hooks/x", "405")] {
        let mut stream = raw(
            &server,
            format!("HEAD {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        let all = until_closed(&mut stream, Duration::from_secs(10)).expect("closed");
        let text = String::from_utf8_lossy(&all);
        assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
        assert!(
            text.ends_with("\r\n\r\n"),
            "content after the head: {text:?}"
        );
        if status == "405" {
            assert!(text.contains("\r\nAllow: GET, POST, PUT\r\n"), "{text}");
        } else {
            // The length GET's content has, as RFC 9110 §9.3.2 lets a HEAD answer say.
            assert!(text.contains("\r\nContent-Length: 16\r\n"), "{text}");
        }
    }
    assert!(!marker.exists(), "HEAD ran nothing");
}

/// 503 and 408 are checked where they happen: the connection-limit, descriptor and slow-client tests.
#[test]
fn every_response_carries_a_request_id() {
    let env = Env::new().config("max_body = \"1KiB\"");
    env.script("ok", "exit 0");
    let server = env.serve();
    let head_431 = get("/", &format!("X-Big: {}\r\n", "v".repeat(17 << 10)));
    let cases: Vec<(u16, Vec<u8>)> = vec![
        (200, get("/healthz", "")),
        (
            200,
            b"POST /hooks/ok HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ),
        (
            400,
            b"POST /hooks/ok HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n".to_vec(),
        ),
        (400, b"\x01\x02 nonsense\r\n\r\n".to_vec()),
        (
            400,
            b"POST /hooks/ok HTTP/1.1\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ),
        (
            404,
            b"POST /hooks/missing HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ),
        (405, b"DELETE / HTTP/1.1\r\nHost: t\r\n\r\n".to_vec()),
        (
            413,
            b"POST /hooks/ok HTTP/1.1\r\nHost: t\r\nContent-Length: 2048\r\n\r\n".to_vec(),
        ),
        (505, b"GET / HTTP/2.0\r\nHost: t\r\n\r\n".to_vec()),
        (414, get(&format!("/{}", "a".repeat(9 << 10)), "")),
        (431, head_431),
    ];
    for (status, request) in cases {
        let response = exchange(&server, &request);
        assert_eq!(response.status, status, "{}", response.text());
        let id = response.header("X-Request-Id").unwrap_or_default();
        assert!(
            !id.is_empty(),
            "{status} without X-Request-Id: {response:?}"
        );
        if status != 200 {
            assert_eq!(
                response.json()["request_id"],
                id,
                "{status}: the error body names the same id"
            );
        }
    }
}

#[test]
fn a_junk_request_id_is_sanitised() {
    let env = Env::new();
    let server = env.serve();
    let response = server.request(
        "GET",
        "/healthz",
        &[("X-Request-Id", "a b\t<script>\"x\";.:_-9")],
        b"",
    );
    assert_eq!(response.status, 200);
    assert_eq!(response.header("X-Request-Id"), Some("abscriptx.:_-9"));
    let ours = response.json()["request_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let line = server
        .wait_log(" client_id=abscriptx.:_-9 ", Duration::from_secs(5))
        .unwrap_or_else(|| {
            panic!(
                "the sanitised id is logged as its own field:\n{}",
                server.log()
            )
        });
    assert!(
        line.contains(&format!("{ours} 127.0.0.1:")),
        "our own id leads the line: {line}"
    );
    let unusable = server.request("GET", "/healthz", &[("X-Request-Id", "<<>>")], b"");
    let id = unusable.header("X-Request-Id").unwrap_or_default();
    assert!(
        !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
        "an id with nothing usable is replaced by a generated one: {id:?}"
    );
}

/// One request on a new connection; its status, or `None` if the connection failed.
fn try_status(server: &Server, request: &[u8]) -> Option<u16> {
    let mut stream = TcpStream::connect(server.addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    stream.write_all(request).ok()?;
    Response::read(&mut stream).ok().map(|r| r.status)
}

/// Retries a request until it gets 200 or `limit` passes.
fn eventually_ok(server: &Server, request: &[u8], limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if try_status(server, request) == Some(200) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn past_max_connections_a_client_gets_503_and_is_closed() {
    let env = Env::new().config("max_connections = 4\nheader_timeout = \"30s\"");
    let mut server = env.serve();
    let idle: Vec<TcpStream> = (0..4).map(|_| server.connect()).collect();
    // Connections are accepted in order, so these four are counted before the fifth arrives. The fifth only
    // reads: it is answered on accept.
    let mut fifth = server.connect();
    let sent = until_closed(&mut fifth, Duration::from_secs(10)).expect("fifth connection closed");
    let text = String::from_utf8_lossy(&sent);
    assert!(status_line(&sent).starts_with("HTTP/1.1 503 "), "{text:?}");
    assert!(text.contains("\r\nRetry-After: 1\r\n"), "{text:?}");
    assert!(text.contains("\r\nX-Request-Id: "), "{text:?}");
    for stream in &idle {
        assert!(still_open(stream), "the idle connections are untouched");
    }
    drop(idle);
    assert!(
        eventually_ok(
            &server,
            &get("/healthz", "Connection: close\r\n"),
            Duration::from_secs(10)
        ),
        "requests succeed again once the idle connections closed:\n{}",
        server.log()
    );
    assert_healthy(&mut server);
}

#[test]
fn past_max_connections_a_client_that_sent_its_request_reads_the_whole_503() {
    // The 503 is written without reading the request, so closing the socket with input unread (or still
    // arriving) makes the kernel send a reset after it. The answer must still arrive whole, for a small
    // request and for a 1 MiB body whose sending the reset cuts short.
    let env = Env::new().config("max_connections = 1\nheader_timeout = \"30s\"");
    let server = env.serve();
    let _idle = server.connect();
    let mut resets = 0;
    for (size, attempts) in [(64, 40), (1 << 20, 5)] {
        let head = format!(
            "POST /hooks/ComputerAdded HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
             Content-Length: {size}\r\n\r\n"
        );
        let mut request = head.into_bytes();
        request.resize(request.len() + size, b' ');
        for attempt in 1..=attempts {
            let mut stream = server.connect();
            let wrote = stream.write_all(&request);
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("read timeout");
            let mut sent = Vec::new();
            let read = stream.read_to_end(&mut sent);
            resets += usize::from(wrote.is_err() || read.is_err());
            let text = String::from_utf8_lossy(&sent);
            let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
            let whole = serde_json::from_str::<serde_json::Value>(body).is_ok_and(|json| {
                json["error"]
                    .as_str()
                    .is_some_and(|e| e.ends_with("retry later"))
            });
            assert!(
                status_line(&sent).starts_with("HTTP/1.1 503 ") && whole,
                "{size}-byte body, attempt {attempt}: sending {wrote:?}, reading {read:?} after {text:?}"
            );
        }
    }
    assert!(
        resets > 0,
        "no attempt met a reset, so none tested what it is for"
    );
}

#[test]
fn out_of_file_descriptors_the_server_answers_503_and_recovers() {
    const LIMIT: libc::rlim_t = 64;
    let env = Env::new().config("max_connections = 1000\nheader_timeout = \"30s\"");
    let out = copier(&env, "copy");
    let mut server = env.serve_with(|command| {
        // SAFETY: setrlimit is async-signal-safe and touches only the child about to exec.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: LIMIT,
                    rlim_max: LIMIT,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let mut idle: Vec<TcpStream> = (0..2 * LIMIT).map(|_| server.connect()).collect();
    // More than LIMIT connections cannot all hold a descriptor: at least LIMIT of them are answered and
    // closed. Which ones depends on how many descriptors the daemon holds at each moment (its own start-up
    // work may still open and close some), so every connection is watched, not the last one alone.
    let mut answers: Vec<Option<Vec<u8>>> = vec![None; idle.len()];
    let mut partial: Vec<Vec<u8>> = vec![Vec::new(); idle.len()];
    for conn in &idle {
        conn.set_nonblocking(true).expect("nonblocking");
    }
    let all_in = crate::util::wait_until(Duration::from_secs(20), || {
        for (i, conn) in idle.iter_mut().enumerate() {
            let mut chunk = [0u8; 4096];
            while answers[i].is_none() {
                match conn.read(&mut chunk) {
                    Ok(0) | Err(_) if !partial[i].is_empty() => {
                        answers[i] = Some(std::mem::take(&mut partial[i]));
                    }
                    Ok(0) => answers[i] = Some(Vec::new()),
                    Ok(n) => partial[i].extend_from_slice(&chunk[..n]),
                    Err(_) => break,
                }
            }
        }
        answers.iter().flatten().count() >= LIMIT as usize
    });
    assert!(
        all_in,
        "{} answered past the descriptor limit:\n{}",
        answers.iter().flatten().count(),
        server.log()
    );
    let sent = answers
        .iter()
        .flatten()
        .find(|a| !a.is_empty())
        .expect("an answer")
        .clone();
    let text = String::from_utf8_lossy(&sent);
    assert!(status_line(&sent).starts_with("HTTP/1.1 503 "), "{text:?}");
    assert!(text.contains("\r\nRetry-After: 1\r\n"), "{text:?}");
    assert!(text.contains("\r\nX-Request-Id: "), "{text:?}");
    assert!(
        server
            .wait_log("out of file descriptors", Duration::from_secs(5))
            .is_some()
            && server
                .wait_log("accept failed", Duration::from_secs(5))
                .is_some(),
        "{}",
        server.log()
    );
    assert!(
        server.child.try_wait().expect("try_wait").is_none(),
        "the daemon survived:\n{}",
        server.log()
    );
    // Every connection past the limit was answered 503; the log holds far fewer lines than that, because
    // accept errors and rejections are each logged at most once a second.
    let rejected = answers
        .iter()
        .flatten()
        .filter(|a| a.starts_with(b"HTTP/1.1 503"))
        .count();
    let log = server.log();
    let logged =
        log.matches("accept failed").count() + log.matches("(out of file descriptors)").count();
    assert!(
        rejected >= 4 && logged < rejected,
        "accept errors are rate-limited: {logged} lines for {rejected} rejections"
    );
    drop(idle);
    let request = b"POST /hooks/copy HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\nConnection: close\r\n\r\nrecovered";
    assert!(
        eventually_ok(&server, request, Duration::from_secs(15)),
        "a script runs again once descriptors are free:\n{}",
        server.log()
    );
    assert_eq!(fs::read(&out).expect("copied body"), b"recovered");
    assert_healthy(&mut server);
}

/// A request that must never run: it stands behind a faulty one on the same connection.
const SMUGGLED: &str = "POST /hooks/smuggled HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n";

#[test]
fn faulty_framing_is_400_and_closes_so_nothing_behind_it_runs() {
    let env = Env::new();
    let body = copier(&env, "copy");
    let smuggled = env.path().join("smuggled-ran");
    env.script("smuggled", &format!("touch {smuggled:?}"));
    let server = env.serve();
    let chunked = chunked_head("/hooks/copy") + "\r\n";
    let cases = [
        (
            "HTTP/1.0 with Transfer-Encoding",
            "POST /hooks/copy HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_string(),
            "Transfer-Encoding in an HTTP/1.0 request",
        ),
        (
            "HTTP/1.0 with Transfer-Encoding and Content-Length",
            "POST /hooks/copy HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 17\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_string(),
            "Transfer-Encoding in an HTTP/1.0 request",
        ),
        ("bare LF after a chunk size", format!("{chunked}5\nhello\r\n0\r\n\r\n"), "not ended by CRLF"),
        ("bare CR in a chunk size", format!("{chunked}5\r;a\r\nhello\r\n0\r\n\r\n"), "bare CR"),
        ("bare CR in an extension", format!("{chunked}5;a=b\rc\r\nhello\r\n0\r\n\r\n"), "bare CR"),
        ("NUL in an extension", format!("{chunked}5;a\0\r\nhello\r\n0\r\n\r\n"), "bad chunk extension"),
        ("control byte in a quoted extension", format!("{chunked}5;a=\"\x07\"\r\nhello\r\n0\r\n\r\n"), "bad chunk extension"),
        ("empty extension name", format!("{chunked}5;=x\r\nhello\r\n0\r\n\r\n"), "empty chunk extension name"),
        ("LF alone after chunk data", format!("{chunked}5\r\nhello\n0\r\n\r\n"), "chunk data longer than its size"),
        ("data longer than its size", format!("{chunked}3\r\nhello\r\n0\r\n\r\n"), "chunk data longer than its size"),
        ("LF-only end of the last chunk", format!("{chunked}5\r\nhello\r\n0\n\n"), "not ended by CRLF"),
        ("LF-only end of the trailers", format!("{chunked}5\r\nhello\r\n0\r\n\n"), "not ended by CRLF"),
        ("invalid trailer line", format!("{chunked}5\r\nhello\r\n0\r\nnot a field\r\n\r\n"), "invalid trailer field"),
        ("trailer with a NUL", format!("{chunked}5\r\nhello\r\n0\r\nX-T: a\0b\r\n\r\n"), "invalid trailer field"),
        // As long as the read buffer (max_header_bytes + 1), with no end: once spun a CPU for good.
        ("a trailer line filling the buffer", format!("{chunked}5\r\nhello\r\n0\r\n{}", "A".repeat(16385)), "chunk line too long"),
    ];
    for (what, request, says) in cases {
        let mut stream = raw(&server, format!("{request}{SMUGGLED}").as_bytes());
        let response = answer(&server, &mut stream);
        assert_eq!(response.status, 400, "{what}: {}", response.text());
        assert!(
            response.text().contains(says),
            "{what}: {}",
            response.text()
        );
        assert_eq!(response.header("Connection"), Some("close"), "{what}");
        let rest = until_closed(&mut stream, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{what}: the connection stayed open"));
        assert!(
            rest.is_empty(),
            "{what}: a second answer: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    // A handler that reads no body (/healthz) leaves it to be drained, through the same decoder: the
    // overlong trailer line ends the drain and the connection.
    let drained = format!(
        "GET /healthz HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n{}",
        "A".repeat(16385)
    );
    let mut stream = raw(&server, drained.as_bytes());
    assert!(
        until_closed(&mut stream, Duration::from_secs(10)).is_some(),
        "the drain of an overlong trailer line never ended"
    );
    // The smuggled request would have been answered within this; give a late run the chance to show.
    assert_eq!(server.get("/healthz").status, 200);
    assert!(!smuggled.exists(), "a request behind faulty framing ran");
    assert!(!body.exists(), "a badly framed body ran its script");
    // A well-formed chunked body with extensions and trailers still runs, and so does what follows it.
    let good = format!("{chunked}5 ; a = \"q;\\\"x\" ;b\r\nhello\r\n0\r\nX-T: 1\r\n\r\n{SMUGGLED}");
    let mut stream = raw(&server, good.as_bytes());
    assert_eq!(answer(&server, &mut stream).status, 200);
    assert_eq!(answer(&server, &mut stream).status, 200);
    assert_eq!(fs::read(&body).expect("body"), b"hello");
    assert!(
        smuggled.exists(),
        "a well-framed request behind a good one runs"
    );
}

#[test]
fn an_absolute_form_target_is_routed_by_its_path() {
    let env = Env::new();
    let out = env.path().join("seen");
    env.script(
        "where",
        &format!("printf '%s|%s' \"$HOOKRUNNER_PATH\" \"$HOOKRUNNER_QUERY\" > {out:?}"),
    );
    let server = env.serve();
    for (target, path, query) in [
        ("http://example.com/hooks/where?x=1", "/hooks/where", "x=1"),
        ("HTTP://example.com:8080/hooks/where", "/hooks/where", ""),
    ] {
        let request =
            format!("POST {target} HTTP/1.1\r\nHost: example.com\r\nContent-Length: 0\r\n\r\n");
        let response = exchange(&server, request.as_bytes());
        assert_eq!(response.status, 200, "{target}: {}", response.text());
        assert_eq!(
            fs::read_to_string(&out).expect("seen"),
            format!("{path}|{query}"),
            "{target}"
        );
    }
    let other = exchange(
        &server,
        b"POST ftp://example.com/hooks/where HTTP/1.1\r\nHost: e\r\n\r\n",
    );
    assert_eq!(other.status, 400, "{}", other.text());
}

#[test]
fn http_1_1_needs_exactly_one_valid_host() {
    let env = Env::new();
    let server = env.serve();
    for (what, request) in [
        ("no Host", "GET /healthz HTTP/1.1\r\n\r\n"),
        (
            "two Host fields",
            "GET /healthz HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
        ),
        (
            "two Host fields in two cases",
            "GET /healthz HTTP/1.1\r\nHost: a\r\nhOsT: b\r\n\r\n",
        ),
        (
            "a space in Host",
            "GET /healthz HTTP/1.1\r\nHost: a b\r\n\r\n",
        ),
        (
            "a path in Host",
            "GET /healthz HTTP/1.1\r\nHost: a/b\r\n\r\n",
        ),
        ("a bad port", "GET /healthz HTTP/1.1\r\nHost: a:80x\r\n\r\n"),
        (
            "an open IPv6 literal",
            "GET /healthz HTTP/1.1\r\nHost: [::1\r\n\r\n",
        ),
        ("userinfo", "GET /healthz HTTP/1.1\r\nHost: user@a\r\n\r\n"),
    ] {
        let mut stream = raw(&server, request.as_bytes());
        let response = answer(&server, &mut stream);
        assert_eq!(response.status, 400, "{what}: {}", response.text());
        assert!(
            response.text().contains("Host"),
            "{what}: {}",
            response.text()
        );
    }
    for ok in [
        "GET /healthz HTTP/1.1\r\nHost: example.com:8080\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nHost:\r\n\r\n",
        "GET /healthz HTTP/1.0\r\n\r\n",
    ] {
        assert_eq!(exchange(&server, ok.as_bytes()).status, 200, "{ok:?}");
    }
}

#[test]
fn unsupported_http_versions_are_505() {
    let env = Env::new();
    let server = env.serve();
    for version in ["HTTP/2.0", "HTTP/1.2", "HTTP/3"] {
        let request = format!("GET /healthz {version}\r\nHost: t\r\n\r\n");
        let response = exchange(&server, request.as_bytes());
        assert_eq!(response.status, 505, "{version}: {}", response.text());
        assert!(response.text().contains(version), "{}", response.text());
    }
    // Sent in pieces, the version is judged only once its line is whole.
    let mut stream = raw(&server, b"GET /healthz HTTP/2");
    std::thread::sleep(Duration::from_millis(100));
    stream
        .write_all(b".0\r\nHost: t\r\n\r\n")
        .expect("rest of the line");
    assert_eq!(answer(&server, &mut stream).status, 505);
    for bad in [
        "GET /healthz http/1.1\r\n\r\n",
        "GET /healthz HTTP/x.y\r\n\r\n",
    ] {
        assert_eq!(exchange(&server, bad.as_bytes()).status, 400, "{bad:?}");
    }
}

#[test]
fn client_and_script_text_cannot_forge_or_repaint_a_log_line() {
    let env = Env::new();
    env.script("echoes", r"printf 'a\rb\033[31mc\000d\342\200\250e\n'");
    let server = env.serve();
    // Raw bytes in the path: a line separator, a bidi override, a C1 control (NEL) and a fake line start.
    let path = "/hooks/x\u{2028}<0>forged\u{202e}gnp.exe\u{85}next";
    let request = format!("POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    let response = exchange(&server, request.as_bytes());
    assert!(
        response.status == 400 || response.status == 404,
        "{}",
        response.text()
    );
    let line = server
        .wait_log("/hooks/x", Duration::from_secs(5))
        .expect("request logged");
    assert!(
        line.contains(r"/hooks/x\u{2028}<0>forged\u{202e}gnp.exe\u{0085}next"),
        "{line}"
    );
    let ran = server.post("/hooks/echoes", b"");
    assert_eq!(ran.status, 200, "{}", ran.text());
    let output = server
        .wait_log("echoes[stdout]: ", Duration::from_secs(5))
        .expect("script output logged");
    assert!(
        output.ends_with(r"a\x0db\x1b[31mc\x00d\u{2028}e"),
        "{output}"
    );
    let log = server.log();
    for raw in ['\u{2028}', '\u{202e}', '\u{85}', '\u{1b}', '\r', '\0'] {
        assert!(!log.contains(raw), "{raw:?} reached the log:\n{log}");
    }
    // Two requests with one client id: each line still leads with an id of ours, and they differ.
    let ids: Vec<String> = (0..2)
        .map(|_| {
            let r = server.request("POST", "/hooks/none", &[("X-Request-Id", "same")], b"");
            assert_eq!(
                r.header("X-Request-Id"),
                Some("same"),
                "the client's id is echoed"
            );
            r.json()["request_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_ne!(ids[0], ids[1]);
    for id in &ids {
        let line = server
            .wait_log(&format!("{id} 127.0.0.1:"), Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no line for {id}:\n{}", server.log()));
        assert!(line.contains(" client_id=same "), "{line}");
    }
}

/// The body's minimum pace is an average; a client that sent 256 KiB at once may not then sit silent on the
/// connection for the minute that average would allow: any silence ends at header_timeout.
#[test]
fn a_body_that_stops_after_a_fast_start_is_cut_off_at_header_timeout() {
    let env = Env::new().config("header_timeout = \"1s\"");
    let out = copier(&env, "copy");
    let server = env.serve();
    let mut request = format!(
        "POST /hooks/copy HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        (256 << 10) + 1
    )
    .into_bytes();
    request.extend(std::iter::repeat_n(b'x', 256 << 10));
    let mut stream = raw(&server, &request);
    let started = Instant::now();
    let sent = until_closed(&mut stream, Duration::from_secs(10))
        .expect("still open 10 s into a silence, with header_timeout 1 s");
    assert!(
        status_line(&sent).starts_with("HTTP/1.1 408 "),
        "{:?}",
        String::from_utf8_lossy(&sent)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(!out.exists(), "no script ran");
}

#[test]
fn a_later_keep_alive_request_has_header_timeout_to_arrive_whole() {
    let env = Env::new().config("header_timeout = \"1s\"\nkeepalive_timeout = \"10s\"");
    let server = env.serve();
    let mut stream = raw(&server, &get("/healthz", ""));
    assert_eq!(answer(&server, &mut stream).status, 200);
    // Idle for longer than header_timeout: keep-alive allows it, since no byte of a request has come.
    std::thread::sleep(Duration::from_millis(1500));
    // Taken before the first byte is sent, so before the server's timer starts.
    let started = Instant::now();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHo")
        .expect("half a head");
    let sent = until_closed(&mut stream, Duration::from_secs(6))
        .expect("the half head was not cut off within 6 s of a 1 s header_timeout");
    assert!(
        status_line(&sent).starts_with("HTTP/1.1 408 "),
        "{:?}",
        String::from_utf8_lossy(&sent)
    );
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "cut off {:?} after its first byte, before header_timeout",
        started.elapsed()
    );
}

/// A target refused before it is taken apart is logged without its query or userinfo, where a client may
/// have put a token or a password.
#[test]
fn a_refused_targets_query_and_userinfo_stay_out_of_the_log() {
    let env = Env::new();
    let server = env.serve();
    for target in [
        "http://jamf:URLPASS_leak@127.0.0.1:8080/basic?token=QUERYTOK_leak",
        "/gl/./x?private_token=DOTTOK_leak",
    ] {
        let response = exchange(
            &server,
            format!("POST {target} HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n").as_bytes(),
        );
        assert_eq!(response.status, 400, "{target}");
        let id = response.header("X-Request-Id").expect("id").to_string();
        let line = server
            .wait_log(&format!("{id} "), Duration::from_secs(5))
            .expect("the request's line");
        assert!(line.contains("status=400"), "{line}");
    }
    let log = server.log();
    assert!(log.contains(" POST http://127.0.0.1:8080/basic "), "{log}");
    assert!(log.contains(" POST /gl/./x "), "{log}");
    assert!(!log.contains("leak"), "{log}");
}
