//! A small HTTP/1.1 server over `std::net` and `httparse`, behind a narrow interface: a [`Handler`] gets a
//! [`Request`] (head plus a streaming, bounded [`Body`]) and returns a [`Response`]. Nothing outside this
//! module sees a socket.
//!
//! Its parts, in the order a connection meets them:
//! - [`listener`]: the listening socket and the byte streams it accepts (TCP or a unix socket);
//! - [`tls`]: TLS as one more kind of stream, its handshake read under the head deadline;
//! - [`server`]: the accept loop, the connection limit, shutdown, and the rate-limited accept log;
//! - [`pool`]: the worker threads, one per open connection, that never shrink;
//! - [`connection`]: one connection's requests in turn, keep-alive, draining and lingering;
//! - [`conn`]: a connection's read buffer and deadlines;
//! - [`head`]: reading and validating a request head (request line, target, Host, framing);
//! - [`body`]: the streaming body (Content-Length or chunked), its limits and its errors;
//! - [`refusal`]: every failure the server detects itself, and the one place each becomes a status;
//! - [`response`]: the one writer of a response, for handlers' answers and the canned 503 alike;
//! - [`id`]: request ids.
//!
//! Invariants it keeps:
//! - the accept loop never ends on an accept error (EMFILE, ECONNABORTED, ...): it logs, backs off, goes on;
//! - at most `max_connections` connections are open; past that a connection gets a canned 503 and is closed;
//! - a client has `header_timeout` to send a head, must then keep its body at a minimum pace, and an idle
//!   keep-alive connection closes after `keepalive_timeout`: no client can pin a worker;
//! - heads are bounded in bytes and header count; bodies are framed by one valid `Content-Length` or by
//!   `chunked` (never both, never in HTTP/1.0), counted against `max_body`, and never buffered whole here; a
//!   request whose framing is faulty is answered and its connection closed, so nothing behind it is run;
//! - every response carries `X-Request-Id` and `Date`, and every request is logged in one line that starts
//!   with our own request id.

mod body;
mod conn;
mod connection;
mod head;
mod id;
mod listener;
mod pool;
mod refusal;
mod response;
mod server;
mod tls;

use std::time::Duration;

pub use body::{Body, BodyError};
pub use listener::Listener;
pub use server::{Control, serve};
pub use tls::TlsConfig;

/// Limits the server enforces before a handler sees anything.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
}

/// The program's side of the interface.
pub trait Handler: Send + Sync + 'static {
    /// The largest body to accept now (it may change on reload).
    fn max_body(&self) -> u64;
    fn handle(&self, request: &mut Request<'_>) -> Response;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    /// For `/healthz` alone (a load balancer's or a monitor's check): its answer is the head of GET's.
    Head,
}

impl Method {
    fn parse(text: &str) -> Option<Method> {
        match text {
            "GET" => Some(Method::Get),
            "POST" => Some(Method::Post),
            "PUT" => Some(Method::Put),
            "HEAD" => Some(Method::Head),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Head => "HEAD",
        }
    }
}

/// A request as a handler sees it.
pub struct Request<'c> {
    /// Our own id for this request: unique within the process, on every log line about it.
    pub id: String,
    /// The client's `X-Request-Id`, sanitised (`[A-Za-z0-9._:-]`, at most 64 characters), if it sent one.
    /// Neither unique nor ours: logged as its own field and echoed in the answer, never used as our id.
    pub client_id: Option<String>,
    pub method: Method,
    /// The path part of the target (of an absolute-form target, its URI's path), undecoded.
    pub path: String,
    /// The query string without `?`, undecoded.
    pub query: String,
    pub remote: String,
    /// Who the client is by its TLS client certificate, verified against `client_ca_file`: the
    /// certificate's DNS subjectAltNames, or when it has none its subject CN. Empty when the client sent no
    /// certificate, or the connection is not TLS with a `client_ca_file`.
    pub client_names: Vec<String>,
    headers: Vec<(String, String)>,
    pub body: Body<'c>,
}

impl Request<'_> {
    /// The first header with this name (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every header with this name, in order.
    pub fn headers<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The names of the headers that came, in order (for the operator to see what a sender sends).
    pub fn header_names(&self) -> impl Iterator<Item = &str> {
        self.headers.iter().map(|(k, _)| k.as_str())
    }
}

/// What a handler answers. A 503 always carries `Retry-After` (the writer adds it).
#[derive(Debug, Default)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// Close the connection after this response.
    pub close: bool,
    /// Extra fields for the request's log line, each ` key=value` with any client text escaped.
    pub note: String,
    /// Extra header fields, such as `WWW-Authenticate`.
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        let mut body = serde_json::to_vec(value).unwrap_or_default();
        body.push(b'\n');
        Response {
            status,
            body,
            ..Response::default()
        }
    }

    /// An error answer: `{"request_id": .., "error": message}`.
    pub fn error(status: u16, request_id: &str, message: &str) -> Response {
        Response::json(
            status,
            &serde_json::json!({ "request_id": request_id, "error": message }),
        )
    }
}
