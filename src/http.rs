//! A small HTTP/1.1 server over `std::net` and `httparse`, behind a narrow interface: a [`Handler`] gets a
//! [`Request`] (head plus a streaming, bounded [`Body`]) and returns a [`Response`]. Nothing outside this
//! module sees a socket.
//!
//! Invariants it keeps:
//! - the accept loop never ends on an accept error (EMFILE, ECONNABORTED, ...): it logs, backs off, goes on;
//! - at most `max_connections` connections are open; past that a connection gets a canned 503 and is closed;
//! - each open connection is served by one worker from a pool that grows up to `max_connections` and never
//!   shrinks, so no thread is created per request once the pool is warm;
//! - a client has `header_timeout` to send a head, must then keep its body at a minimum pace, and an idle
//!   keep-alive connection closes after `keepalive_timeout`: no client can pin a worker;
//! - heads are bounded in bytes and header count; bodies are framed by one valid `Content-Length` or by
//!   `chunked` (never both), counted against `max_body`, and never buffered whole here;
//! - every response carries `X-Request-Id` and `Date`, and every request is logged in one line.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::Listen;

/// The most header fields in one request head (more: 431).
const MAX_HEADERS: usize = 100;
/// The longest request line (longer: 414).
const MAX_REQUEST_LINE: usize = 8 << 10;
/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 1 << 10;
/// The slowest body a client may send once `header_timeout` has passed, in bytes per second.
const MIN_BODY_RATE: u64 = 4 << 10;
/// A body read waits at most this long before it looks at its deadline again.
const BODY_WAIT_SLICE: Duration = Duration::from_secs(1);
/// How long a write to a client may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// After answering a request whose body was not read, how much of it to read and discard so the answer is
/// not lost to a reset (a "lingering close"), and for how long.
const LINGER_BYTES: u64 = 1 << 20;
const LINGER_TIME: Duration = Duration::from_secs(2);
/// A body left unread by the handler is drained this far to keep the connection alive; beyond, it closes.
const DRAIN_BYTES: u64 = 64 << 10;
/// Worker threads are small: the request path has no deep recursion (serde_json stops at 128 levels).
const WORKER_STACK: usize = 512 << 10;

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
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
        }
    }
}

/// A request as a handler sees it.
pub struct Request<'c> {
    /// The request id: the client's `X-Request-Id` (sanitised) or a generated one.
    pub id: String,
    pub method: Method,
    /// The path part of the target, undecoded.
    pub path: String,
    /// The query string without `?`, undecoded.
    pub query: String,
    pub remote: String,
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
}

/// What a handler answers.
#[derive(Debug, Default)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// Seconds, for 503.
    pub retry_after: Option<u32>,
    /// Close the connection after this response.
    pub close: bool,
    /// Extra fields for the request's log line.
    pub note: String,
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

/// Why reading a body failed. Carried inside the `io::Error` a [`Body`] read returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    TooLarge,
    Malformed(&'static str),
    TooSlow,
    Closed,
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge => f.write_str("request body is larger than max_body"),
            BodyError::Malformed(what) => write!(f, "malformed request body: {what}"),
            BodyError::TooSlow => f.write_str("request body arrived too slowly"),
            BodyError::Closed => f.write_str("client closed the connection mid-body"),
        }
    }
}

impl std::error::Error for BodyError {}

impl BodyError {
    /// The body error inside an `io::Error` from [`Body::read`], if it is one.
    pub fn of(error: &io::Error) -> Option<BodyError> {
        error.get_ref()?.downcast_ref::<BodyError>().copied()
    }

    fn into_io(self) -> io::Error {
        let kind = match self {
            BodyError::TooSlow => io::ErrorKind::TimedOut,
            BodyError::Closed => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }

    fn status(self) -> u16 {
        match self {
            BodyError::TooLarge => 413,
            BodyError::Malformed(_) => 400,
            BodyError::TooSlow => 408,
            BodyError::Closed => 400,
        }
    }
}

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub fn bind(listen: &Listen) -> io::Result<Listener> {
        let listener = match listen {
            Listen::Tcp(addr) => Listener::Tcp(TcpListener::bind(addr.as_str())?),
            Listen::Unix(path) => {
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    if UnixStream::connect(path).is_ok() {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!("{} is in use by a running server", path.display()),
                        ));
                    }
                    std::fs::remove_file(path)?;
                }
                Listener::Unix(UnixListener::bind(path)?, path.clone())
            }
        };
        match &listener {
            Listener::Tcp(l) => l.set_nonblocking(true)?,
            Listener::Unix(l, _) => l.set_nonblocking(true)?,
        }
        Ok(listener)
    }

    /// The address actually bound, e.g. `127.0.0.1:41234` for `127.0.0.1:0`.
    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| format!("?({e})"), |a| a.to_string()),
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }

    fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, addr) = l.accept()?;
                // One write per response, but keep-alive clients must never wait on Nagle.
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), addr.to_string()))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept()?;
                Ok((Stream::Unix(s), "unix".to_string()))
            }
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(on),
            Stream::Unix(s) => s.set_nonblocking(on),
        }
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connection with its read buffer. Bytes past one request's head and body stay buffered for the next
/// request on the connection (pipelining).
struct Conn {
    stream: Stream,
    remote: String,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// Why reading from a client stopped.
enum ReadStop {
    Eof,
    Timeout,
    Io,
}

impl Conn {
    fn new(stream: Stream, remote: String, capacity: usize) -> Conn {
        Conn {
            stream,
            remote,
            buf: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more into the buffer before `deadline`; Ok(n > 0) or why not.
    fn fill(&mut self, deadline: Instant) -> Result<usize, ReadStop> {
        if self.end == self.buf.len() {
            if self.start == 0 {
                return Ok(0);
            }
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadStop::Timeout);
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|_| ReadStop::Io)?;
            match self.stream.read(&mut self.buf[self.end..]) {
                Ok(0) => return Err(ReadStop::Eof),
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ReadStop::Timeout);
                }
                Err(_) => return Err(ReadStop::Io),
            }
        }
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream.write_all(data)
    }

    /// Reads and discards what the client still sends, within bounds, so that closing does not reset the
    /// connection before the client has read our answer.
    fn linger(mut self) {
        self.stream.shutdown_write();
        let deadline = Instant::now() + LINGER_TIME;
        let mut discarded = 0u64;
        while discarded < LINGER_BYTES {
            self.start = 0;
            self.end = 0;
            match self.fill(deadline) {
                Ok(n) => discarded += n as u64,
                Err(_) => break,
            }
        }
    }
}

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// A request body as a stream. Reads enforce `max_body` and the minimum pace; a read error leaves the
/// connection unusable, and the server closes it after answering.
pub struct Body<'c> {
    conn: &'c mut Conn,
    framing: Framing,
    chunk: ChunkState,
    remaining: u64,
    received: u64,
    max: u64,
    start: Instant,
    grace: Duration,
    send_continue: bool,
    done: bool,
    /// Set by the first read error; the connection cannot be reused after it.
    failure: Option<BodyError>,
    trailer_bytes: usize,
    max_trailer_bytes: usize,
    /// The server's shutdown instant, once set (none in unit tests).
    stopped_at: Option<&'c OnceLock<Instant>>,
}

impl<'c> Body<'c> {
    /// A body read from `conn`: `grace` before the minimum pace applies, `send_continue` if the client waits
    /// for `100 Continue`, trailers bounded like a head.
    fn new(
        conn: &'c mut Conn,
        framing: Framing,
        max: u64,
        grace: Duration,
        send_continue: bool,
        max_trailer_bytes: usize,
        stopped_at: Option<&'c OnceLock<Instant>>,
    ) -> Body<'c> {
        Body {
            conn,
            framing,
            chunk: ChunkState::Size,
            remaining: match framing {
                Framing::Length(n) => n,
                Framing::Chunked => 0,
            },
            received: 0,
            max,
            start: Instant::now(),
            grace,
            send_continue,
            done: false,
            failure: None,
            trailer_bytes: 0,
            max_trailer_bytes,
            stopped_at,
        }
    }

    /// The minimum pace, and once shutdown has begun, `grace` from then at most: a slow upload must not hold
    /// the daemon's exit for the better part of an hour.
    fn deadline(&self) -> Instant {
        let pace = self.start
            + self.grace
            + Duration::from_millis(self.received.saturating_mul(1000) / MIN_BODY_RATE);
        match self.stopped_at.and_then(OnceLock::get) {
            Some(&stopped) => pace.min(stopped + self.grace),
            None => pace,
        }
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.send_continue {
            self.send_continue = false;
            if self.conn.buffered().is_empty() {
                self.conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            }
        }
        loop {
            // Wait in slices, so a shutdown that begins meanwhile shortens the deadline.
            let deadline = self.deadline();
            match self
                .conn
                .fill(deadline.min(Instant::now() + BODY_WAIT_SLICE))
            {
                Ok(_) => return Ok(()),
                Err(ReadStop::Timeout) if Instant::now() < self.deadline() => continue,
                Err(ReadStop::Timeout) => return Err(self.fail(BodyError::TooSlow)),
                Err(_) => return Err(self.fail(BodyError::Closed)),
            }
        }
    }

    fn fail(&mut self, error: BodyError) -> io::Error {
        self.failure = Some(error);
        error.into_io()
    }

    /// One line of a chunked body (chunk size or trailer), without its CRLF. `max` bounds the bytes before
    /// the LF, so it counts the CR.
    fn line(&mut self, max: usize) -> io::Result<Vec<u8>> {
        loop {
            if let Some(nl) = self.conn.buffered().iter().position(|&b| b == b'\n') {
                if nl > max {
                    return Err(self.fail(BodyError::Malformed("chunk line too long")));
                }
                let mut line = self.conn.buffered()[..nl].to_vec();
                self.conn.consume(nl + 1);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.conn.buffered().len() > max {
                return Err(self.fail(BodyError::Malformed("chunk line too long")));
            }
            self.fill()?;
        }
    }

    fn copy_out(&mut self, out: &mut [u8], limit: u64) -> io::Result<usize> {
        if self.conn.buffered().is_empty() {
            self.fill()?;
        }
        let n = self
            .conn
            .buffered()
            .len()
            .min(out.len())
            .min(usize::try_from(limit).unwrap_or(usize::MAX));
        out[..n].copy_from_slice(&self.conn.buffered()[..n]);
        self.conn.consume(n);
        self.received += n as u64;
        Ok(n)
    }

    fn read_chunked(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.chunk {
                ChunkState::Size => {
                    let line = self.line(MAX_CHUNK_LINE)?;
                    let size = parse_chunk_size(&line)
                        .ok_or_else(|| self.fail(BodyError::Malformed("bad chunk size")))?;
                    if size == 0 {
                        self.chunk = ChunkState::Trailers;
                    } else if self.received.saturating_add(size) > self.max {
                        return Err(self.fail(BodyError::TooLarge));
                    } else {
                        self.chunk = ChunkState::Data(size);
                    }
                }
                ChunkState::Data(left) => {
                    let n = self.copy_out(out, left)?;
                    self.chunk = if n as u64 == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n as u64)
                    };
                    return Ok(n);
                }
                ChunkState::DataEnd => {
                    // At most the CR before the LF: `line(0)` refused the CRLF every chunk ends with.
                    if !self.line(1)?.is_empty() {
                        return Err(
                            self.fail(BodyError::Malformed("chunk data longer than its size"))
                        );
                    }
                    self.chunk = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let line = self.line(self.max_trailer_bytes)?;
                    self.trailer_bytes += line.len() + 2;
                    if self.trailer_bytes > self.max_trailer_bytes {
                        return Err(self.fail(BodyError::Malformed("trailers too large")));
                    }
                    if line.is_empty() {
                        self.done = true;
                        return Ok(0);
                    }
                }
            }
        }
    }
}

impl Read for Body<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.done || out.is_empty() {
            return Ok(0);
        }
        if let Some(failure) = self.failure {
            return Err(failure.into_io());
        }
        match self.framing {
            Framing::Length(_) if self.remaining == 0 => {
                self.done = true;
                Ok(0)
            }
            Framing::Length(_) => {
                let n = self.copy_out(out, self.remaining)?;
                self.remaining -= n as u64;
                Ok(n)
            }
            Framing::Chunked => self.read_chunked(out),
        }
    }
}

fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let end = line.iter().position(|&b| b == b';').unwrap_or(line.len());
    let digits = line[..end].trim_ascii_end();
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    let text = std::str::from_utf8(digits).ok()?;
    u64::from_str_radix(text, 16)
        .ok()
        .filter(|_| text.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A parsed request head.
#[derive(Debug)]
struct Head {
    method: String,
    target: String,
    http10: bool,
    headers: Vec<(String, String)>,
}

impl Head {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.values(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    fn keep_alive(&self) -> bool {
        if self.http10 {
            self.has_token("Connection", "keep-alive")
        } else {
            !self.has_token("Connection", "close")
        }
    }

    /// The body's framing, or the status and reason to refuse it with.
    fn framing(&self, max_body: u64) -> Result<Framing, (u16, &'static str)> {
        let te: Vec<&str> = self.values("Transfer-Encoding").collect();
        let has_cl = self.values("Content-Length").next().is_some();
        if !te.is_empty() {
            if has_cl {
                return Err((400, "both Transfer-Encoding and Content-Length"));
            }
            let codings: Vec<&str> = te
                .iter()
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .collect();
            if codings.len() != 1 || !codings[0].eq_ignore_ascii_case("chunked") {
                return Err((
                    400,
                    "unsupported Transfer-Encoding: only chunked is accepted",
                ));
            }
            return Ok(Framing::Chunked);
        }
        let mut length: Option<u64> = None;
        for value in self.values("Content-Length").flat_map(|v| v.split(',')) {
            let value = value.trim();
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err((400, "invalid Content-Length"));
            }
            // All digits but too big for u64: certainly over any max_body.
            let n = value.parse::<u64>().unwrap_or(u64::MAX);
            if length.is_some_and(|l| l != n) {
                return Err((400, "conflicting Content-Length values"));
            }
            length = Some(n);
        }
        match length {
            Some(n) if n > max_body => Err((413, "request body is larger than max_body")),
            Some(n) => Ok(Framing::Length(n)),
            None => Ok(Framing::Length(0)),
        }
    }
}

enum HeadError {
    /// Closed or timed out before any byte: nothing to answer.
    Quiet,
    Status(u16, &'static str),
}

fn read_head(conn: &mut Conn, limits: &Limits, deadline: Instant) -> Result<Head, HeadError> {
    loop {
        let buffered = conn.buffered();
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(buffered) {
            Ok(httparse::Status::Complete(len)) => {
                // A whole head can arrive in one read; its request line is bounded all the same.
                if request_line_too_long(buffered) {
                    return Err(HeadError::Status(414, "request line too long"));
                }
                if len > limits.max_header_bytes {
                    return Err(HeadError::Status(431, "request head too large"));
                }
                let head = Head {
                    method: parsed.method.unwrap_or_default().to_string(),
                    target: parsed.path.unwrap_or_default().to_string(),
                    http10: parsed.version == Some(0),
                    headers: parsed
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                };
                conn.consume(len);
                return Ok(head);
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Err(HeadError::Status(431, "too many header fields"));
            }
            Err(_) => return Err(HeadError::Status(400, "malformed request head")),
        }
        if request_line_too_long(buffered) {
            return Err(HeadError::Status(414, "request line too long"));
        }
        if buffered.len() >= limits.max_header_bytes {
            return Err(HeadError::Status(431, "request head too large"));
        }
        // Blank lines before a request are allowed (RFC 9112 §2.2); a client that sent only those has not
        // started a request, so it is closed quietly rather than answered.
        let had_bytes = buffered.iter().any(|&b| b != b'\r' && b != b'\n');
        match conn.fill(deadline) {
            Ok(_) => {}
            Err(ReadStop::Timeout) if had_bytes => {
                return Err(HeadError::Status(408, "request head not received in time"));
            }
            Err(_) => return Err(HeadError::Quiet),
        }
    }
}

/// Whether the request line at the start of `buffered` (complete or not) is longer than `MAX_REQUEST_LINE`.
/// Empty lines before it are skipped, as httparse skips them.
fn request_line_too_long(buffered: &[u8]) -> bool {
    let start = buffered
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buffered.len());
    let line = &buffered[start..];
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    end > MAX_REQUEST_LINE
}

/// Request ids: a random per-process prefix and a counter.
struct Ids {
    prefix: u32,
    next: AtomicU64,
}

impl Ids {
    fn new() -> Ids {
        let mut seed = [0u8; 4];
        let random = File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .is_ok();
        let prefix = if random {
            u32::from_ne_bytes(seed)
        } else {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        };
        Ids {
            prefix,
            next: AtomicU64::new(1),
        }
    }

    fn next(&self) -> String {
        format!(
            "{:08x}-{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// The client's id if it is usable: `[A-Za-z0-9._:-]`, at most 64 characters.
    fn pick(&self, given: Option<&str>) -> String {
        let clean: String = given
            .unwrap_or("")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
            .take(64)
            .collect();
        if clean.is_empty() { self.next() } else { clean }
    }
}

struct Shared {
    limits: Limits,
    handler: Arc<dyn Handler>,
    ids: Ids,
    open: AtomicUsize,
    /// When shutdown began; requests still arriving then are refused, bodies still arriving get
    /// `header_timeout` more.
    stopped_at: OnceLock<Instant>,
    in_flight: Mutex<usize>,
    idle: Condvar,
    pool: Mutex<PoolState>,
    work: Condvar,
}

struct PoolState {
    queue: VecDeque<Conn>,
    idle: usize,
    workers: usize,
}

/// Counts a request as in flight until dropped, so shutdown can wait for it.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> InFlight<'a> {
        *shared.in_flight.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut n = self.0.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        if *n == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// What the accept loop does when woken by the control descriptor.
pub enum Control {
    Continue,
    Stop,
}

/// Runs the server until `on_wake` (called when `wake` becomes readable) says stop; then stops accepting,
/// lets in-flight requests finish, and returns.
pub fn serve(
    listener: Listener,
    limits: Limits,
    handler: Arc<dyn Handler>,
    wake: &UnixStream,
    mut on_wake: impl FnMut() -> Control,
) -> io::Result<()> {
    let shared = Arc::new(Shared {
        limits,
        handler,
        ids: Ids::new(),
        open: AtomicUsize::new(0),
        stopped_at: OnceLock::new(),
        in_flight: Mutex::new(0),
        idle: Condvar::new(),
        pool: Mutex::new(PoolState {
            queue: VecDeque::new(),
            idle: 0,
            workers: 0,
        }),
        work: Condvar::new(),
    });
    wake.set_nonblocking(true)?;
    let mut reserve = File::open("/dev/null").ok();
    let mut logs = AcceptLogs {
        errors: RateLimit::new(log::Level::Error),
        rejections: RateLimit::new(log::Level::Warn),
    };
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        if fds[1].revents != 0 {
            let mut drain = [0u8; 64];
            while matches!((&*wake).read(&mut drain), Ok(n) if n > 0) {}
            if let Control::Stop = on_wake() {
                break;
            }
        }
        if fds[0].revents != 0 {
            accept_ready(&listener, &shared, &mut reserve, &mut logs);
        }
    }
    let _ = shared.stopped_at.set(Instant::now());
    drop(listener);
    // Logged after the two steps above, so that whoever reads it may rely on them: nothing new is accepted,
    // and a request that arrives from now on is answered 503.
    log::info!("stopping: no new connections; waiting for requests in flight");
    let mut n = shared.in_flight.lock().unwrap_or_else(|e| e.into_inner());
    while *n > 0 {
        n = shared.idle.wait(n).unwrap_or_else(|e| e.into_inner());
    }
    Ok(())
}

/// Accepts every pending connection. Errors never end the loop: out of descriptors, the reserve descriptor is
/// released to accept one connection and answer it 503, then the loop backs off briefly.
fn accept_ready(
    listener: &Listener,
    shared: &Arc<Shared>,
    reserve: &mut Option<File>,
    logs: &mut AcceptLogs,
) {
    loop {
        match listener.accept() {
            Ok((stream, remote)) => {
                if shared.open.load(Ordering::SeqCst) >= shared.limits.max_connections {
                    let line =
                        reject_busy(stream, &shared.ids, &remote, "too many open connections");
                    logs.rejections.log(&line);
                    continue;
                }
                shared.open.fetch_add(1, Ordering::SeqCst);
                let conn = Conn::new(
                    stream,
                    remote,
                    shared.limits.max_header_bytes.max(8 << 10) + 1,
                );
                submit(shared, conn);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO)
                ) =>
            {
                continue;
            }
            Err(e) => {
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    *reserve = None;
                    if let Ok((stream, remote)) = listener.accept() {
                        let line =
                            reject_busy(stream, &shared.ids, &remote, "out of file descriptors");
                        logs.rejections.log(&line);
                    }
                    *reserve = File::open("/dev/null").ok();
                }
                logs.errors.log(&format!("accept failed: {e}; backing off"));
                std::thread::sleep(Duration::from_millis(20));
                return;
            }
        }
    }
}

/// Answers 503 and closes; returns the line to log (through a rate limit: a flood must not flood the log).
fn reject_busy(mut stream: Stream, ids: &Ids, remote: &str, why: &str) -> String {
    let id = ids.next();
    let body =
        format!("{{\"request_id\":\"{id}\",\"error\":\"server busy: {why}; retry later\"}}\n");
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nDate: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         X-Request-Id: {id}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        http_date(SystemTime::now()),
        body.len()
    );
    // Never block the accept loop on a client: one non-blocking write, then close.
    let _ = stream.set_nonblocking(true);
    let _ = stream.write(response.as_bytes());
    format!("{id} {remote} - - status=503 ({why})")
}

/// The accept loop's own log lines, each kind at most once a second.
struct AcceptLogs {
    errors: RateLimit,
    rejections: RateLimit,
}

/// Logs at most one message a second, counting the ones it holds back in the next it lets through.
struct RateLimit {
    level: log::Level,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    fn new(level: log::Level) -> RateLimit {
        RateLimit {
            level,
            last: None,
            suppressed: 0,
        }
    }

    fn log(&mut self, message: &str) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        if self.suppressed > 0 {
            log::log!(
                self.level,
                "{message} ({} similar messages suppressed)",
                self.suppressed
            );
        } else {
            log::log!(self.level, "{message}");
        }
        self.last = Some(now);
        self.suppressed = 0;
    }
}

fn submit(shared: &Arc<Shared>, conn: Conn) {
    let mut pool = shared.pool.lock().unwrap_or_else(|e| e.into_inner());
    pool.queue.push_back(conn);
    if pool.idle < pool.queue.len() && pool.workers < shared.limits.max_connections {
        let worker = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("hookrunner-worker".into())
            .stack_size(WORKER_STACK)
            .spawn(move || work(&worker));
        match spawned {
            Ok(_) => pool.workers += 1,
            // The connection stays queued for the next free worker.
            Err(e) => log::error!("cannot start a worker thread: {e}"),
        }
    }
    shared.work.notify_one();
}

fn work(shared: &Shared) {
    loop {
        let conn = {
            let mut pool = shared.pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.idle += 1;
            let mut pool = shared
                .work
                .wait_while(pool, |p| p.queue.is_empty())
                .unwrap_or_else(|e| e.into_inner());
            pool.idle -= 1;
            pool.queue.pop_front()
        };
        let Some(conn) = conn else { continue };
        // A bug must cost one connection, not a worker: the pool would shrink and the open count leak.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            serve_connection(shared, conn)
        }));
        if outcome.is_err() {
            log::error!("a connection handler panicked; the connection was closed");
        }
        shared.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What to do with a connection after a request.
enum Next {
    KeepAlive,
    Close,
    /// Close, but first read and discard what the client still sends (its body was not read).
    Linger,
}

fn serve_connection(shared: &Shared, mut conn: Conn) {
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
            Next::Linger => return conn.linger(),
        }
    }
}

/// Serves one request whose first bytes are buffered.
fn serve_request(shared: &Shared, conn: &mut Conn, head_deadline: Instant) -> Next {
    let started = Instant::now();
    let _in_flight = InFlight::enter(shared);
    let head = match read_head(conn, &shared.limits, head_deadline) {
        Ok(head) => head,
        Err(HeadError::Quiet) => return Next::Close,
        Err(HeadError::Status(status, why)) => {
            let id = shared.ids.next();
            finish(
                conn,
                &id,
                "-",
                "-",
                started,
                Response::error(status, &id, why),
                true,
            );
            return Next::Linger;
        }
    };
    let id = shared.ids.pick(head.values("X-Request-Id").next());
    let (path, query) = head.target.split_once('?').unwrap_or((&head.target, ""));
    let (path, query) = (path.to_string(), query.to_string());
    let max_body = shared.handler.max_body();
    let method = match head.method.as_str() {
        "GET" => Some(Method::Get),
        "POST" => Some(Method::Post),
        "PUT" => Some(Method::Put),
        _ => None,
    };
    let accepted = match (method, head.framing(max_body)) {
        (_, Err((status, why))) => Err((status, why.to_string())),
        (None, _) => Err((
            405,
            format!("method {} not allowed; use GET, POST or PUT", head.method),
        )),
        _ if shared.stopped_at.get().is_some() => {
            Err((503, "shutting down; retry later".to_string()))
        }
        (Some(method), Ok(framing)) => Ok((method, framing)),
    };
    let (method, framing) = match accepted {
        Ok(accepted) => accepted,
        Err((status, why)) => {
            let mut response = Response::error(status, &id, &why);
            if status == 503 {
                response.retry_after = Some(1);
            }
            finish(conn, &id, &head.method, &path, started, response, true);
            return Next::Linger;
        }
    };
    let keep_alive = head.keep_alive();
    let send_continue = !head.http10 && head.has_token("Expect", "100-continue");
    let mut request = Request {
        id,
        method,
        path,
        query,
        remote: conn.remote.clone(),
        headers: head.headers,
        body: Body::new(
            conn,
            framing,
            max_body,
            shared.limits.header_timeout,
            send_continue,
            shared.limits.max_header_bytes,
            Some(&shared.stopped_at),
        ),
    };
    let mut response = shared.handler.handle(&mut request);
    let drained = drain(&mut request.body);
    let Request { id, path, .. } = request;
    if let Drained::Failed(error) = drained {
        // The handler may have answered generically; the body's own failure is the truth.
        if response.status < 400 || response.status == 500 {
            response = Response::error(error.status(), &id, &error.to_string());
        }
    }
    let close = response.close
        || drained != Drained::Complete
        || shared.stopped_at.get().is_some()
        || !keep_alive;
    if !finish(conn, &id, method.as_str(), &path, started, response, close) {
        return Next::Close;
    }
    match drained {
        Drained::Complete if !close => Next::KeepAlive,
        Drained::Complete => Next::Close,
        Drained::Unread => Next::Linger,
        // The client may still be sending the body we refused: linger so it reads the answer, not a reset.
        Drained::Failed(BodyError::Closed) => Next::Close,
        Drained::Failed(_) => Next::Linger,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drained {
    Complete,
    /// More than `DRAIN_BYTES` were left unread, or the client still waits for 100 Continue to send it.
    Unread,
    Failed(BodyError),
}

/// Reads what the handler left of the body, up to `DRAIN_BYTES`, so the connection can be reused.
fn drain(body: &mut Body<'_>) -> Drained {
    if let Some(failure) = body.failure {
        return Drained::Failed(failure);
    }
    // A client waiting for 100 Continue sends no body until it gets one, and a handler that did not read the
    // body did not ask for it: waiting for the body here would hold the answer until the body timed out (and
    // turn it into a 408). Answer now and close instead.
    let nothing_arrived = !body.done
        && body.framing != Framing::Length(0)
        && body.received == 0
        && body.chunk == ChunkState::Size
        && body.conn.buffered().is_empty();
    if body.send_continue && nothing_arrived {
        return Drained::Unread;
    }
    let mut scratch = [0u8; 8 << 10];
    let mut left = DRAIN_BYTES;
    while !body.done {
        if left == 0 {
            return Drained::Unread;
        }
        let want = scratch
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        // A handler that did not read the body did not ask for it: no 100 Continue for a drain.
        body.send_continue = false;
        match body.read(&mut scratch[..want]) {
            Ok(n) => left = left.saturating_sub(n as u64),
            Err(e) => return Drained::Failed(BodyError::of(&e).unwrap_or(BodyError::Closed)),
        }
    }
    Drained::Complete
}

/// Writes the response and logs the request's line. False when the client could not be written to.
fn finish(
    conn: &mut Conn,
    id: &str,
    method: &str,
    path: &str,
    started: Instant,
    response: Response,
    close: bool,
) -> bool {
    let mut head = String::with_capacity(256);
    let _ = write!(
        head,
        "HTTP/1.1 {} {}\r\nDate: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Request-Id: {id}\r\n",
        response.status,
        reason(response.status),
        http_date(SystemTime::now()),
        response.body.len()
    );
    if let Some(seconds) = response.retry_after {
        let _ = write!(head, "Retry-After: {seconds}\r\n");
    }
    if response.status == 405 {
        head.push_str("Allow: GET, POST, PUT\r\n");
    }
    head.push_str(if close {
        "Connection: close\r\n\r\n"
    } else {
        "Connection: keep-alive\r\n\r\n"
    });
    let mut out = head.into_bytes();
    out.extend_from_slice(&response.body);
    let _ = conn.stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let written = conn.write_all(&out);
    let elapsed = started.elapsed();
    let path: String = path.chars().take(200).collect();
    log::info!(
        "{id} {} {method} {}{} status={} time={:.1}ms{}",
        conn.remote,
        crate::logging::Escaped(&path),
        response.note,
        response.status,
        elapsed.as_secs_f64() * 1000.0,
        if written.is_err() {
            " (client gone before the answer)"
        } else {
            ""
        }
    );
    written.is_ok()
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), cached per thread for the current second.
pub fn http_date(now: SystemTime) -> String {
    thread_local! {
        static CACHE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != secs {
            *cache = (secs, format_http_date(secs));
        }
        cache.1.clone()
    })
}

fn format_http_date(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = secs / 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    let rem = secs % 86_400;
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar (Howard Hinnant's
/// published algorithm).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&str, &str)]) -> Head {
        Head {
            method: "POST".into(),
            target: "/".into(),
            http10: false,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn framing_rules() {
        assert_eq!(head(&[]).framing(10), Ok(Framing::Length(0)));
        assert_eq!(
            head(&[("Content-Length", "5")]).framing(10),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            head(&[("content-length", "5"), ("Content-Length", "5")]).framing(10),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            head(&[("Content-Length", "5, 5")]).framing(10),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            head(&[("Transfer-Encoding", "Chunked")]).framing(10),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            head(&[("Content-Length", "11")])
                .framing(10)
                .map_err(|e| e.0),
            Err(413)
        );
        assert_eq!(
            head(&[("Content-Length", "1099511627776")])
                .framing(10)
                .map_err(|e| e.0),
            Err(413)
        );
        assert_eq!(
            head(&[("Content-Length", "99999999999999999999999")])
                .framing(10)
                .map_err(|e| e.0),
            Err(413)
        );
        for bad in [
            vec![("Content-Length", "5"), ("Content-Length", "6")],
            vec![("Content-Length", "-1")],
            vec![("Content-Length", "+5")],
            vec![("Content-Length", "")],
            vec![("Content-Length", "0x10")],
            vec![("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
            vec![("Transfer-Encoding", "gzip, chunked")],
            vec![("Transfer-Encoding", "identity")],
        ] {
            assert_eq!(head(&bad).framing(10).map_err(|e| e.0), Err(400), "{bad:?}");
        }
    }

    #[test]
    fn keep_alive_rules() {
        assert!(head(&[]).keep_alive());
        assert!(!head(&[("Connection", "close")]).keep_alive());
        assert!(!head(&[("Connection", "TE, Close")]).keep_alive());
        let mut old = head(&[]);
        old.http10 = true;
        assert!(!old.keep_alive());
        old.headers.push(("Connection".into(), "Keep-Alive".into()));
        assert!(old.keep_alive());
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size(b"1a"), Some(26));
        assert_eq!(parse_chunk_size(b"0"), Some(0));
        assert_eq!(parse_chunk_size(b"A;name=value"), Some(10));
        assert_eq!(parse_chunk_size(b"ffffffffffffffff"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"g",
            b"+1",
            b"-1",
            b"1 2",
            b"10000000000000000",
            b" 1",
        ] {
            assert_eq!(
                parse_chunk_size(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn dates() {
        assert_eq!(
            format_http_date(784_111_777),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(format_http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            format_http_date(951_782_400),
            "Tue, 29 Feb 2000 00:00:00 GMT"
        );
        assert_eq!(
            format_http_date(1_798_761_599),
            "Thu, 31 Dec 2026 23:59:59 GMT"
        );
    }

    #[test]
    fn request_ids() {
        let ids = Ids::new();
        assert_ne!(ids.next(), ids.next());
        assert_eq!(ids.pick(Some("abc-123")), "abc-123");
        assert_eq!(ids.pick(Some("a b\r\n<c>")), "abc");
        assert_eq!(ids.pick(Some(&"x".repeat(500))).len(), 64);
        assert!(
            ids.pick(Some("\u{1F600}")).contains('-'),
            "unusable ids are replaced"
        );
    }

    // Property tests for the framing: the chunked decoder and the head reader driven over a real socket pair,
    // and the Content-Length/Transfer-Encoding rules over generated header sets.

    use proptest::prelude::*;
    use std::thread::JoinHandle;

    /// A connection whose peer writes `input` from its own thread and then closes.
    fn fed(input: Vec<u8>, capacity: usize) -> (Conn, JoinHandle<()>) {
        let (ours, mut theirs) = UnixStream::pair().expect("socket pair");
        let writer = std::thread::spawn(move || {
            // The reader may stop early and close; a failed write is expected then.
            let _ = theirs.write_all(&input);
        });
        (
            Conn::new(Stream::Unix(ours), "test".into(), capacity),
            writer,
        )
    }

    /// A body as `serve_request` builds it.
    fn body(conn: &mut Conn, framing: Framing, max: u64) -> Body<'_> {
        Body::new(
            conn,
            framing,
            max,
            Duration::from_secs(10),
            false,
            16 << 10,
            None,
        )
    }

    /// How a body is cut into chunks and dressed.
    #[derive(Debug, Clone)]
    struct Chunking {
        sizes: Vec<usize>,
        extensions: Vec<String>,
        upper: bool,
        zeros: usize,
        trailers: Vec<String>,
    }

    /// A chunk extension: none, a name, `name=token` after optional whitespace, or `name="quoted; string"`.
    fn extension() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-z]{1,8}".prop_map(|n| format!(";{n}")),
            ("[ \t]{0,2}", "[a-z]{1,8}", "[A-Za-z0-9]{0,8}")
                .prop_map(|(ws, n, v)| format!("{ws};{n}={v}")),
            ("[a-z]{1,8}", "[ -~]{0,12}")
                .prop_map(|(n, v)| format!(";{n}=\"{}\"", v.replace(['"', '\\'], ""))),
        ]
    }

    fn chunking() -> impl Strategy<Value = Chunking> {
        (
            prop::collection::vec(1usize..700, 1..12),
            prop::collection::vec(extension(), 1..6),
            any::<bool>(),
            0usize..3,
            prop::collection::vec("X-[A-Za-z]{1,8}: [ -~]{0,20}", 0..3),
        )
            .prop_map(|(sizes, extensions, upper, zeros, trailers)| Chunking {
                sizes,
                extensions,
                upper,
                zeros,
                trailers,
            })
    }

    fn encode_chunked(data: &[u8], how: &Chunking) -> Vec<u8> {
        let mut out = Vec::new();
        let size_line = |n: usize, i: usize| {
            let zeros = "0".repeat(how.zeros);
            let extension = &how.extensions[i % how.extensions.len()];
            if how.upper {
                format!("{zeros}{n:X}{extension}\r\n")
            } else {
                format!("{zeros}{n:x}{extension}\r\n")
            }
        };
        let mut rest = data;
        let mut i = 0;
        while !rest.is_empty() {
            let n = how.sizes[i % how.sizes.len()].min(rest.len());
            out.extend_from_slice(size_line(n, i).as_bytes());
            out.extend_from_slice(&rest[..n]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[n..];
            i += 1;
        }
        out.extend_from_slice(size_line(0, i).as_bytes());
        for trailer in &how.trailers {
            out.extend_from_slice(trailer.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// What decoding `input` as a chunked body gave: the bytes read, how reading ended, and every byte after
    /// the body (left buffered or still unread on the socket).
    fn decode_chunked(
        input: Vec<u8>,
        max: u64,
        read_size: usize,
    ) -> (Vec<u8>, io::Result<()>, Vec<u8>) {
        let (mut conn, writer) = fed(input, 8 << 10);
        let mut out = Vec::new();
        let mut buf = vec![0u8; read_size];
        let mut body = body(&mut conn, Framing::Chunked, max);
        let ended = loop {
            match body.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => break Err(e),
            }
        };
        assert_eq!(
            body.received,
            out.len() as u64,
            "received() counts what was read"
        );
        let mut rest = conn.buffered().to_vec();
        if ended.is_ok() {
            conn.stream.read_to_end(&mut rest).expect("read the rest");
        }
        drop(conn);
        writer.join().expect("writer thread");
        (out, ended, rest)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn chunked_bodies_round_trip(
            data in prop::collection::vec(any::<u8>(), 0..3000),
            how in chunking(),
            read_size in 1usize..5000,
        ) {
            let mut input = encode_chunked(&data, &how);
            input.extend_from_slice(b"NEXT");
            let (out, ended, rest) = decode_chunked(input, data.len() as u64, read_size);
            prop_assert!(ended.is_ok(), "{:?}", ended);
            prop_assert_eq!(out, data);
            prop_assert_eq!(rest, b"NEXT".to_vec(), "the decoder stops exactly at the body's end");
        }

        #[test]
        fn chunked_bodies_over_max_are_refused(
            data in prop::collection::vec(any::<u8>(), 1..3000),
            how in chunking(),
            read_size in 1usize..5000,
            under in 1u64..100,
        ) {
            let max = (data.len() as u64).saturating_sub(under);
            let (out, ended, _) = decode_chunked(encode_chunked(&data, &how), max, read_size);
            let error = ended.expect_err("a body over max_body is an error");
            prop_assert_eq!(BodyError::of(&error), Some(BodyError::TooLarge));
            prop_assert!(out.len() as u64 <= max, "{} bytes read past max {max}", out.len());
        }

        #[test]
        fn read_head_answers_every_input(
            input in request_head(),
            max_header_bytes in prop::sample::select(vec![512usize, 4 << 10, 16 << 10]),
        ) {
            let limits = Limits {
                max_connections: 1,
                max_header_bytes,
                header_timeout: Duration::from_secs(10),
                keepalive_timeout: Duration::from_secs(10),
            };
            let (mut conn, writer) = fed(input.clone(), max_header_bytes.max(8 << 10) + 1);
            let result = read_head(&mut conn, &limits, Instant::now() + Duration::from_secs(10));
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let whole = httparse::Request::new(&mut slots).parse(&input);
            // The request line as a client would measure it: after empty lines, up to the LF.
            let line = {
                let start = input.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(input.len());
                input[start..].iter().position(|&b| b == b'\n').unwrap_or(input.len() - start)
            };
            match result {
                Ok(head) => {
                    let Ok(httparse::Status::Complete(len)) = whole else {
                        return Err(TestCaseError::fail(format!("a head from an incomplete input: {whole:?}")));
                    };
                    prop_assert!(len <= max_header_bytes && line <= MAX_REQUEST_LINE);
                    prop_assert!(!head.method.is_empty());
                    prop_assert!(input[len..].starts_with(conn.buffered()), "what follows the head stays buffered");
                }
                Err(HeadError::Status(status, _)) => {
                    prop_assert!([400, 414, 431].contains(&status), "status {}", status);
                    if status == 400 {
                        prop_assert!(matches!(whole, Err(e) if e != httparse::Error::TooManyHeaders), "{:?}", whole);
                    }
                    if let Ok(httparse::Status::Complete(len)) = whole {
                        prop_assert!(
                            len > max_header_bytes || line > MAX_REQUEST_LINE,
                            "a head within the limits was refused with {}", status
                        );
                    }
                }
                Err(HeadError::Quiet) => {
                    prop_assert!(matches!(whole, Ok(httparse::Status::Partial)), "{:?}", whole);
                }
            }
            drop(conn);
            writer.join().expect("writer thread");
        }
    }

    /// Request heads: random bytes, or (mostly) a request line and header fields with random parts: long
    /// lines, many fields, odd line ends, junk, a missing end, bytes after the head. Well-formed parts are
    /// weighted up so that many heads get past the parser.
    fn request_head() -> impl Strategy<Value = Vec<u8>> {
        let method = prop_oneof![
            8 => prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "get"]),
            1 => prop::sample::select(vec!["", "G T"]),
        ];
        let target = (
            prop::sample::select(vec![0usize, 0, 0, 100, 8 << 10, (8 << 10) + 200, 9 << 10]),
            "[A-Za-z0-9/?=&%._~-]{0,20}",
        )
            .prop_map(|(n, tail)| format!("/{}{tail}", "a".repeat(n)));
        let version = prop_oneof![
            8 => prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0"]),
            1 => prop::sample::select(vec!["HTTP/2.0", "http/1.1", "", "HTTP/1.1 "]),
        ];
        let valid = (
            prop_oneof![
                "[A-Za-z-]{1,12}",
                prop::sample::select(vec!["Content-Length", "Transfer-Encoding", "X-Request-Id"])
                    .prop_map(String::from),
            ],
            "[ -~]{0,30}".prop_map(String::into_bytes),
        );
        let junk = ("[ -~]{0,5}", prop::collection::vec(any::<u8>(), 0..10));
        let fields = prop_oneof![
            4 => prop::collection::vec(valid.clone(), 0..8),
            2 => prop::collection::vec(valid.clone(), 95..110),
            2 => prop::collection::vec(prop_oneof![4 => valid, 1 => junk], 0..20),
        ];
        let end = prop_oneof![8 => Just("\r\n"), 2 => Just("\n"), 1 => Just("\r")];
        let structured = (
            (
                prop::sample::select(vec!["", "", "\r\n"]),
                method,
                target,
                version,
            ),
            fields,
            end,
            prop::bool::weighted(0.8),
            prop::collection::vec(any::<u8>(), 0..32),
        )
            .prop_map(
                |((lead, method, target, version), fields, end, terminated, tail)| {
                    let mut out = format!("{lead}{method} {target} {version}{end}").into_bytes();
                    for (name, value) in fields {
                        out.extend_from_slice(name.as_bytes());
                        out.extend_from_slice(b": ");
                        out.extend_from_slice(&value);
                        out.extend_from_slice(end.as_bytes());
                    }
                    if terminated {
                        out.extend_from_slice(end.as_bytes());
                    }
                    out.extend_from_slice(&tail);
                    out
                },
            );
        prop_oneof![
            1 => prop::collection::vec(any::<u8>(), 0..2048),
            4 => structured,
        ]
    }

    /// `name` with each letter in a random case.
    fn any_case(name: &'static str) -> impl Strategy<Value = String> {
        prop::collection::vec(any::<bool>(), name.len()).prop_map(move |upper| {
            name.chars()
                .zip(upper)
                .map(|(c, up)| {
                    if up {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_ascii_lowercase()
                    }
                })
                .collect()
        })
    }

    /// Fields that do not frame a body.
    fn others() -> impl Strategy<Value = Vec<(String, String)>> {
        prop::collection::vec(
            ("X-[A-Za-z]{1,10}|Host|Content-Type|Expect", "[ -~]{0,20}"),
            0..5,
        )
    }

    /// A head with `others`, and `fields` inserted at the given positions.
    fn head_with(
        mut others: Vec<(String, String)>,
        fields: Vec<(prop::sample::Index, String, String)>,
    ) -> Head {
        for (at, name, value) in fields {
            let at = at.index(others.len() + 1);
            others.insert(at, (name, value));
        }
        Head {
            method: "POST".into(),
            target: "/".into(),
            http10: false,
            headers: others,
        }
    }

    /// `values` as one comma-separated field or as one field each.
    fn length_fields(
        name: String,
        values: &[String],
        one_field: bool,
        at: &[prop::sample::Index],
    ) -> Vec<(prop::sample::Index, String, String)> {
        if one_field {
            vec![(at[0], name, values.join(", "))]
        } else {
            values
                .iter()
                .zip(at)
                .map(|(v, at)| (*at, name.clone(), v.clone()))
                .collect()
        }
    }

    proptest! {
        #[test]
        fn framing_content_length_with_transfer_encoding_is_400(
            others in others(),
            cl in (any::<prop::sample::Index>(), any_case("Content-Length"), "[0-9]{1,25}|[ -~]{0,10}"),
            te in (any::<prop::sample::Index>(), any_case("Transfer-Encoding"), "chunked|[ -~]{0,12}"),
            cl_first in any::<bool>(),
            max in any::<u64>(),
        ) {
            let fields = if cl_first { vec![cl, te] } else { vec![te, cl] };
            prop_assert_eq!(head_with(others, fields).framing(max).map_err(|e| e.0), Err(400));
        }

        #[test]
        fn framing_different_lengths_are_400(
            others in others(),
            name in any_case("Content-Length"),
            (a, b) in (any::<u64>(), any::<u64>()).prop_filter("different", |(a, b)| a != b),
            one_field in any::<bool>(),
            at in prop::collection::vec(any::<prop::sample::Index>(), 2),
            max in any::<u64>(),
        ) {
            let fields = length_fields(name, &[a.to_string(), b.to_string()], one_field, &at);
            prop_assert_eq!(head_with(others, fields).framing(max).map_err(|e| e.0), Err(400));
        }

        #[test]
        fn framing_one_length_is_held_against_max(
            others in others(),
            name in any_case("Content-Length"),
            n in any::<u64>(),
            delta in -3i64..=3,
            copies in 1usize..4,
            one_field in any::<bool>(),
            at in prop::collection::vec(any::<prop::sample::Index>(), 3),
        ) {
            let max = n.saturating_add_signed(delta);
            let fields = length_fields(name, &vec![n.to_string(); copies], one_field, &at);
            let expected = if n > max { Err(413) } else { Ok(Framing::Length(n)) };
            prop_assert_eq!(head_with(others, fields).framing(max).map_err(|e| e.0), expected);
        }

        #[test]
        fn framing_malformed_length_is_400(
            others in others(),
            name in any_case("Content-Length"),
            value in "[0-9]{0,3}[A-Za-z+.\\-_/][0-9]{0,3}",
            at in any::<prop::sample::Index>(),
            max in any::<u64>(),
        ) {
            let head = head_with(others, vec![(at, name, value)]);
            prop_assert_eq!(head.framing(max).map_err(|e| e.0), Err(400));
        }

        #[test]
        fn framing_only_chunked_alone_is_accepted(
            others in others(),
            name in any_case("Transfer-Encoding"),
            codings in prop::collection::vec(
                prop::sample::select(vec!["chunked", "Chunked", "CHUNKED", " chunked ", "gzip", "identity", "deflate", "x-custom"]),
                1..4,
            ),
            one_field in any::<bool>(),
            at in prop::collection::vec(any::<prop::sample::Index>(), 3),
            max in any::<u64>(),
        ) {
            let values: Vec<String> = codings.iter().map(|c| c.to_string()).collect();
            let fields = length_fields(name, &values, one_field, &at);
            let expected = if codings.len() == 1 && codings[0].trim().eq_ignore_ascii_case("chunked") {
                Ok(Framing::Chunked)
            } else {
                Err(400)
            };
            prop_assert_eq!(head_with(others, fields).framing(max).map_err(|e| e.0), expected);
        }

        #[test]
        fn framing_without_framing_fields_is_an_empty_body(others in others(), max in any::<u64>()) {
            prop_assert_eq!(head_with(others, vec![]).framing(max), Ok(Framing::Length(0)));
        }
    }
}
