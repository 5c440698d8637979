//! One connection's requests, in turn: read a head, refuse it or hand the request to the handler, drain what
//! the handler left of the body, write the answer, log one line, then keep the connection alive, close it,
//! or linger so a refused body cannot turn the answer into a reset.

use std::time::{Duration, Instant};

use super::body::{Body, Drained};
use super::conn::Conn;
use super::head::{HeadError, read_head};
use super::id::client_id;
use super::refusal::Refused;
use super::server::{InFlight, Shared};
use super::{Request, Response, response};
use crate::logging::Escaped;

/// How long a write to a client may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What to do with a connection after a request.
enum Next {
    KeepAlive,
    Close,
    /// Close, but first read and discard what the client still sends (its body was not read).
    Linger,
}

/// Who a request's log line is about.
struct Exchange<'a> {
    id: &'a str,
    client_id: Option<&'a str>,
    method: &'a str,
    path: &'a str,
    /// The TLS client certificate's names (see [`Request::client_names`]).
    client_names: &'a [String],
}

pub(super) fn serve_connection(shared: &Shared, mut conn: Conn) {
    // Set before the first read: a TLS handshake writes to the client while it is read.
    let _ = conn.stream.set_write_timeout(Some(WRITE_TIMEOUT));
    // The first head must be complete `header_timeout` after the connection opened; a later one within
    // `header_timeout` of its first byte, which must come within `keepalive_timeout` of the last answer.
    let first = Instant::now() + shared.limits.header_timeout;
    let mut head_deadline = Some(first);
    let mut idle_deadline = first;
    loop {
        if conn.buffered().is_empty() && conn.fill(idle_deadline).is_err() {
            return;
        }
        let deadline = head_deadline
            .take()
            .unwrap_or_else(|| Instant::now() + shared.limits.header_timeout);
        let next = serve_request(shared, &mut conn, deadline);
        idle_deadline = Instant::now() + shared.limits.keepalive_timeout;
        match next {
            Next::KeepAlive => {}
            Next::Close => return,
            Next::Linger => return conn.linger(shared.handler.max_body()),
        }
    }
}

/// Serves one request whose first bytes are buffered.
fn serve_request(shared: &Shared, conn: &mut Conn, head_deadline: Instant) -> Next {
    let started = Instant::now();
    let _in_flight = InFlight::enter(shared);
    let id = shared.ids.next();
    let head = match read_head(conn, &shared.limits, head_deadline) {
        Ok(head) => head,
        Err(HeadError::Quiet) => return Next::Close,
        Err(HeadError::Refused(refused)) => {
            let names = conn.stream.client_names().to_vec();
            let exchange = Exchange {
                id: &id,
                client_id: None,
                method: "-",
                path: "-",
                client_names: &names,
            };
            refuse(conn, &exchange, started, &refused);
            return Next::Linger;
        }
    };
    let client = client_id(head.values("X-Request-Id").next());
    let max_body = shared.handler.max_body();
    let accepted = head
        .accept(max_body)
        .and_then(|accepted| match shared.stopped_at.get() {
            Some(_) => Err(Refused::Busy("shutting down")),
            None => Ok(accepted),
        });
    let accepted = match accepted {
        Ok(accepted) => accepted,
        Err(refused) => {
            let path = head
                .path_and_query()
                .map_or_else(|_| head.shown_target(), |(p, _)| p.to_string());
            let names = conn.stream.client_names().to_vec();
            let exchange = Exchange {
                id: &id,
                client_id: client.as_deref(),
                method: &head.method,
                path: &path,
                client_names: &names,
            };
            refuse(conn, &exchange, started, &refused);
            return Next::Linger;
        }
    };
    let keep_alive = head.keep_alive();
    let send_continue = !head.http10 && head.has_token("Expect", "100-continue");
    let mut request = Request {
        id,
        client_id: client,
        method: accepted.method,
        path: accepted.path,
        query: accepted.query,
        remote: conn.remote.clone(),
        client_names: conn.stream.client_names().to_vec(),
        headers: head.headers,
        body: Body::new(
            conn,
            accepted.framing,
            max_body,
            shared.limits.header_timeout,
            send_continue,
            shared.limits.max_header_bytes,
            Some(&shared.stopped_at),
        ),
    };
    let response = shared.handler.handle(&mut request);
    // The handler's status stands. A body it left unread is drained so the connection can be reused; if
    // that body turns out faulty, the connection closes after the answer (nothing behind it is trusted).
    // An answer that closes the connection anyway goes out at once: the rest of the body is lingered on.
    let drained = if response.close {
        request.body.left()
    } else {
        request.body.drain()
    };
    let Request {
        id,
        client_id,
        method,
        path,
        client_names,
        ..
    } = request;
    let close = response.close
        || drained != Drained::Complete
        || shared.stopped_at.get().is_some()
        || !keep_alive;
    let exchange = Exchange {
        id: &id,
        client_id: client_id.as_deref(),
        method: method.as_str(),
        path: &path,
        client_names: &client_names,
    };
    if !finish(conn, &exchange, started, &response, close) {
        return Next::Close;
    }
    match drained {
        Drained::Complete if !close => Next::KeepAlive,
        // The handler closes though the body was read: a client may have sent more behind it, which a
        // close would answer with a reset that can take the answer with it.
        Drained::Complete if response.close => Next::Linger,
        Drained::Complete => Next::Close,
        Drained::Unread => Next::Linger,
        Drained::Failed(super::BodyError::Closed) => Next::Close,
        // The client may still be sending the body we gave up on: linger so it reads the answer.
        Drained::Failed(_) => Next::Linger,
    }
}

/// Answers a request the server refuses itself, and closes after it.
fn refuse(conn: &mut Conn, exchange: &Exchange<'_>, started: Instant, refused: &Refused) {
    let response = Response::error(refused.status(), exchange.id, &refused.to_string());
    finish(conn, exchange, started, &response, true);
}

/// Writes the response and logs the request's line. False when the client could not be written to.
fn finish(
    conn: &mut Conn,
    exchange: &Exchange<'_>,
    started: Instant,
    response: &Response,
    close: bool,
) -> bool {
    let echo = exchange.client_id.unwrap_or(exchange.id);
    let mut bytes = response::encode(response, echo, close);
    if exchange.method == "HEAD" {
        // The answer to HEAD carries no content (RFC 9110 §9.3.2): a client reads the head alone, and
        // a body would be taken for the start of the next answer.
        bytes.truncate(bytes.len() - response.body.len());
    }
    let written = conn.write_all(&bytes);
    let path: String = exchange.path.chars().take(200).collect();
    let mut client = exchange
        .client_id
        .map(|c| format!(" client_id={c}"))
        .unwrap_or_default();
    if !exchange.client_names.is_empty() {
        let names = exchange.client_names.join(",");
        client.push_str(&format!(" tls_client={}", Escaped(&names)));
    }
    log::info!(
        "{} {} {} {}{client}{} status={} time={:.1}ms{}",
        exchange.id,
        conn.remote,
        Escaped(exchange.method),
        Escaped(&path),
        response.note,
        response.status,
        started.elapsed().as_secs_f64() * 1000.0,
        if written.is_err() {
            " (client gone before the answer)"
        } else {
            ""
        }
    );
    written.is_ok()
}
