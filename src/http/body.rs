//! A request body as a stream: framed by `Content-Length` or `chunked` (RFC 9112 §6-7), counted against
//! `max_body`, held to a minimum pace, never buffered whole. The chunked decoder is strict: every line ends
//! in CRLF, chunk extensions are `;token[=token|quoted-string]`, trailers are well-formed field lines, and
//! anything else is a [`BodyError::Malformed`] after which the connection is closed, so a front proxy that
//! framed the body differently can never make us run a request it did not see.

use std::io::{self, Read};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::conn::{Conn, ReadStop};

/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 1 << 10;
/// The chunk extensions of one body together (nothing reads them): without a bound, a small body could come
/// wrapped in gigabytes of them, each line within `MAX_CHUNK_LINE`.
const MAX_CHUNK_EXTENSIONS: usize = 16 << 10;
/// The slowest body a client may send once `header_timeout` has passed, in bytes per second.
const MIN_BODY_RATE: u64 = 4 << 10;
/// A body read waits at most this long before it looks at its deadline again.
const BODY_WAIT_SLICE: Duration = Duration::from_secs(1);
/// A body left unread by the handler is drained this far to keep the connection alive; beyond, it closes.
const DRAIN_BYTES: u64 = 64 << 10;

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
    /// The body error inside an `io::Error` from [`Body::read`]. Every error a body read returns is one.
    pub fn of(error: &io::Error) -> BodyError {
        error
            .get_ref()
            .and_then(|e| e.downcast_ref::<BodyError>())
            .copied()
            .unwrap_or(BodyError::Closed)
    }

    /// The status a request whose body failed this way is answered with, in every layer.
    pub fn status(self) -> u16 {
        match self {
            BodyError::TooLarge => 413,
            BodyError::Malformed(_) | BodyError::Closed => 400,
            BodyError::TooSlow => 408,
        }
    }

    fn into_io(self) -> io::Error {
        let kind = match self {
            BodyError::TooSlow => io::ErrorKind::TimedOut,
            BodyError::Closed => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }
}

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
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
    /// When the last bytes arrived.
    progress: Instant,
    grace: Duration,
    send_continue: bool,
    done: bool,
    /// Set by the first read error; the connection cannot be reused after it.
    failure: Option<BodyError>,
    trailer_bytes: usize,
    max_trailer_bytes: usize,
    /// Bytes of chunk extensions so far (from each size line's first `;`).
    extension_bytes: usize,
    /// The server's shutdown instant, once set (none in unit tests).
    stopped_at: Option<&'c OnceLock<Instant>>,
}

/// What became of the body once the handler was done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Drained {
    Complete,
    /// More than `DRAIN_BYTES` were left unread, the client still waits for 100 Continue to send it, or
    /// the connection closes after the answer anyway.
    Unread,
    Failed(BodyError),
}

impl<'c> Body<'c> {
    /// A body read from `conn`: `grace` before the minimum pace applies, `send_continue` if the client waits
    /// for `100 Continue`, trailers bounded like a head.
    pub(super) fn new(
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
            progress: Instant::now(),
            grace,
            send_continue,
            done: false,
            failure: None,
            trailer_bytes: 0,
            max_trailer_bytes,
            extension_bytes: 0,
            stopped_at,
        }
    }

    /// The minimum pace, and once shutdown has begun, `grace` from then at most: a slow upload must not hold
    /// the daemon's exit for the better part of an hour. No silence may last longer than `grace` either: the
    /// pace is an average, and a client that sent most of a large body at once had banked minutes of it
    /// (2.5 s per 10 KiB) to sit on the connection, and on the memory of a signed body held for its check.
    fn deadline(&self) -> Instant {
        let pace = self.start
            + self.grace
            + Duration::from_millis(self.received.saturating_mul(1000) / MIN_BODY_RATE);
        let pace = pace.min(self.progress + self.grace);
        match self.stopped_at.and_then(OnceLock::get) {
            Some(&stopped) => pace.min(stopped + self.grace),
            None => pace,
        }
    }

    fn fill(&mut self) -> Result<(), BodyError> {
        if self.send_continue {
            self.send_continue = false;
            if self.conn.buffered().is_empty()
                && self
                    .conn
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .is_err()
            {
                return Err(BodyError::Closed);
            }
        }
        loop {
            // Wait in slices, so a shutdown that begins meanwhile shortens the deadline.
            let deadline = self.deadline();
            match self
                .conn
                .fill(deadline.min(Instant::now() + BODY_WAIT_SLICE))
            {
                // Nothing read: the buffer is full of one line with no end in it (a trailer line as long
                // as the whole buffer). Taken for progress, it was a loop that spun a CPU for good.
                Ok(0) => return Err(BodyError::Malformed("chunk line too long")),
                Ok(_) => {
                    self.progress = Instant::now();
                    return Ok(());
                }
                Err(ReadStop::Timeout) if Instant::now() < self.deadline() => continue,
                Err(ReadStop::Timeout) => return Err(BodyError::TooSlow),
                Err(ReadStop::Eof | ReadStop::Io) => return Err(BodyError::Closed),
            }
        }
    }

    /// One CRLF-terminated line of a chunked body (chunk size or trailer), without its CRLF. `max` bounds the
    /// line's length without the CRLF.
    fn line(&mut self, max: usize) -> Result<Vec<u8>, BodyError> {
        loop {
            let buffered = self.conn.buffered();
            if let Some(lf) = buffered.iter().position(|&b| b == b'\n') {
                if lf > max + 1 {
                    return Err(BodyError::Malformed("chunk line too long"));
                }
                let line = match buffered[..lf].strip_suffix(b"\r") {
                    Some(line) if !line.contains(&b'\r') => line.to_vec(),
                    Some(_) => return Err(BodyError::Malformed("bare CR in a chunk line")),
                    None => return Err(BodyError::Malformed("chunk line not ended by CRLF")),
                };
                self.conn.consume(lf + 1);
                return Ok(line);
            }
            if buffered.len() > max + 1 {
                return Err(BodyError::Malformed("chunk line too long"));
            }
            self.fill()?;
        }
    }

    fn copy_out(&mut self, out: &mut [u8], limit: u64) -> Result<usize, BodyError> {
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

    fn read_chunked(&mut self, out: &mut [u8]) -> Result<usize, BodyError> {
        loop {
            match self.chunk {
                ChunkState::Size => {
                    let line = self.line(MAX_CHUNK_LINE)?;
                    if let Some(at) = line.iter().position(|&b| b == b';') {
                        self.extension_bytes += line.len() - at;
                        if self.extension_bytes > MAX_CHUNK_EXTENSIONS {
                            return Err(BodyError::Malformed("chunk extensions too long"));
                        }
                    }
                    let size = parse_chunk_line(&line)?;
                    if size == 0 {
                        self.chunk = ChunkState::Trailers;
                    } else if self.received.saturating_add(size) > self.max {
                        return Err(BodyError::TooLarge);
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
                    // Exactly CRLF after the data: anything else means the data ran past its size.
                    while self.conn.buffered().len() < 2 {
                        self.fill()?;
                    }
                    if !self.conn.buffered().starts_with(b"\r\n") {
                        return Err(BodyError::Malformed("chunk data longer than its size"));
                    }
                    self.conn.consume(2);
                    self.chunk = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let line = self.line(self.max_trailer_bytes)?;
                    self.trailer_bytes += line.len() + 2;
                    if self.trailer_bytes > self.max_trailer_bytes {
                        return Err(BodyError::Malformed("trailers too large"));
                    }
                    if line.is_empty() {
                        self.done = true;
                        return Ok(0);
                    }
                    if !is_field_line(&line) {
                        return Err(BodyError::Malformed("invalid trailer field"));
                    }
                }
            }
        }
    }

    /// What the handler left of the body, without reading any more of it: for an answer after which the
    /// connection closes, so a client that stalls cannot hold the answer back.
    pub(super) fn left(&self) -> Drained {
        match self.failure {
            Some(failure) => Drained::Failed(failure),
            None if self.done => Drained::Complete,
            None if matches!(self.framing, Framing::Length(_)) && self.remaining == 0 => {
                Drained::Complete
            }
            None => Drained::Unread,
        }
    }

    /// Reads what the handler left of the body, up to `DRAIN_BYTES`, so the connection can be reused.
    pub(super) fn drain(&mut self) -> Drained {
        if let Some(failure) = self.failure {
            return Drained::Failed(failure);
        }
        // A client waiting for 100 Continue sends no body until it gets one, and a handler that did not read
        // the body did not ask for it: waiting for the body here would hold the answer until the body timed
        // out (and turn it into a 408). Answer now and close instead.
        let nothing_arrived = !self.done
            && self.framing != Framing::Length(0)
            && self.received == 0
            && self.chunk == ChunkState::Size
            && self.conn.buffered().is_empty();
        if self.send_continue && nothing_arrived {
            return Drained::Unread;
        }
        // A handler that did not read the body did not ask for it: no 100 Continue for a drain.
        self.send_continue = false;
        let mut scratch = [0u8; 8 << 10];
        let mut left = DRAIN_BYTES;
        while !self.done {
            if left == 0 {
                return Drained::Unread;
            }
            let want = scratch
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            match self.read(&mut scratch[..want]) {
                Ok(n) => left = left.saturating_sub(n as u64),
                Err(e) => return Drained::Failed(BodyError::of(&e)),
            }
        }
        Drained::Complete
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
        let read = match self.framing {
            Framing::Length(_) if self.remaining == 0 => {
                self.done = true;
                Ok(0)
            }
            Framing::Length(_) => self.copy_out(out, self.remaining).inspect(|&n| {
                self.remaining -= n as u64;
            }),
            Framing::Chunked => self.read_chunked(out),
        };
        read.map_err(|error| {
            self.failure = Some(error);
            error.into_io()
        })
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `chunk-size [ chunk-ext ]` (RFC 9112 §7.1.1): hex digits, then any number of
/// `BWS ";" BWS token [ BWS "=" BWS ( token / quoted-string ) ]`. Returns the size.
pub(super) fn parse_chunk_line(line: &[u8]) -> Result<u64, BodyError> {
    let bad_size = BodyError::Malformed("bad chunk size");
    let bad_extension = BodyError::Malformed("bad chunk extension");
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(bad_size);
    }
    let size = line[..digits].iter().fold(0u64, |n, &b| {
        (n << 4) | u64::from((b as char).to_digit(16).unwrap_or(0))
    });
    let mut rest = &line[digits..];
    let skip_ws =
        |s: &[u8]| -> usize { s.iter().take_while(|&&b| b == b' ' || b == b'\t').count() };
    let mut first = true;
    loop {
        // BWS only before `;`: whitespace that ends the line ("2 ") is malformed, and proxies that
        // read such a line differently from us could frame the body differently.
        let ws = skip_ws(rest);
        rest = &rest[ws..];
        match rest.first() {
            None if ws == 0 => return Ok(size),
            None if first => return Err(bad_size),
            None => return Err(bad_extension),
            Some(b';') => rest = &rest[1..],
            // Before any extension, what follows the digits can only be a bad size ("1 2", "1x").
            Some(_) if first => return Err(bad_size),
            Some(_) => return Err(bad_extension),
        }
        first = false;
        rest = &rest[skip_ws(rest)..];
        let name = rest.iter().take_while(|&&b| is_tchar(b)).count();
        if name == 0 {
            return Err(BodyError::Malformed("empty chunk extension name"));
        }
        rest = &rest[name..];
        let ws = skip_ws(rest);
        if rest.get(ws) != Some(&b'=') {
            continue;
        }
        rest = &rest[ws + 1..];
        rest = &rest[skip_ws(rest)..];
        let value = if rest.first() == Some(&b'"') {
            quoted_string(rest).ok_or(bad_extension)?
        } else {
            rest.iter().take_while(|&&b| is_tchar(b)).count()
        };
        if value == 0 {
            return Err(bad_extension);
        }
        rest = &rest[value..];
    }
}

/// The length of the quoted-string at the start of `s` (RFC 9110 §5.6.4), quotes included.
fn quoted_string(s: &[u8]) -> Option<usize> {
    let qdtext = |b: u8| matches!(b, b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff);
    let mut i = 1;
    loop {
        match *s.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => {
                let escaped = *s.get(i + 1)?;
                if !(escaped == b'\t'
                    || escaped == b' '
                    || (0x21..=0x7e).contains(&escaped)
                    || escaped >= 0x80)
                {
                    return None;
                }
                i += 2;
            }
            b if qdtext(b) => i += 1,
            _ => return None,
        }
    }
}

/// `field-name ":" OWS field-value OWS` (RFC 9112 §5), as a trailer line must be.
fn is_field_line(line: &[u8]) -> bool {
    let name = line.iter().take_while(|&&b| is_tchar(b)).count();
    name > 0
        && line.get(name) == Some(&b':')
        && line[name + 1..]
            .iter()
            .all(|&b| b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80)
}

#[cfg(test)]
mod tests {
    use super::super::conn::fed;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn chunk_lines() {
        assert_eq!(parse_chunk_line(b"1a"), Ok(26));
        assert_eq!(parse_chunk_line(b"0"), Ok(0));
        assert_eq!(parse_chunk_line(b"A;name=value"), Ok(10));
        assert_eq!(parse_chunk_line(b"A ; name = \"v;\\\" x\" ;flag"), Ok(10));
        assert_eq!(parse_chunk_line(b"ffffffffffffffff"), Ok(u64::MAX));
        for (bad, why) in [
            (&b""[..], "bad chunk size"),
            (b"g", "bad chunk size"),
            (b"+1", "bad chunk size"),
            (b"-1", "bad chunk size"),
            (b"1 2", "bad chunk size"),
            (b"10000000000000000", "bad chunk size"),
            (b" 1", "bad chunk size"),
            (b"1;", "empty chunk extension name"),
            (b"1;=v", "empty chunk extension name"),
            (b"1;a=", "bad chunk extension"),
            (b"1;a=\"open", "bad chunk extension"),
            (b"1;a=\"nul\0\"", "bad chunk extension"),
            (b"1;a\x01", "bad chunk extension"),
            (b"1;a=b\x7f", "bad chunk extension"),
            (b"1;a=\"esc\\\x01\"", "bad chunk extension"),
            (b"1;a b", "bad chunk extension"),
            // Whitespace may come before `;` only, never at the end of the line.
            (b"2 ", "bad chunk size"),
            (b"2\t", "bad chunk size"),
            (b"2;a=b ", "bad chunk extension"),
        ] {
            assert_eq!(
                parse_chunk_line(bad),
                Err(BodyError::Malformed(why)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// How reading `input` as a chunked body (max 1 MiB) ended.
    fn chunked_error(input: &[u8]) -> Option<BodyError> {
        let (_, ended, _) = decode_chunked(input.to_vec(), 1 << 20, 64);
        ended.err().map(|e| BodyError::of(&e))
    }

    #[test]
    fn lenient_chunked_framing_is_malformed() {
        for (input, why) in [
            (
                &b"5\nhello\r\n0\r\n\r\n"[..],
                "chunk line not ended by CRLF",
            ),
            (b"5\r\r\nhello\r\n0\r\n\r\n", "bare CR in a chunk line"),
            (b"5;a\rb\r\nhello\r\n0\r\n\r\n", "bare CR in a chunk line"),
            (b"5;\0\r\nhello\r\n0\r\n\r\n", "empty chunk extension name"),
            (b"5;a=\"\x1b\"\r\nhello\r\n0\r\n\r\n", "bad chunk extension"),
            (b"5\r\nhello\n0\r\n\r\n", "chunk data longer than its size"),
            (
                b"5\r\nhelloX\r\n0\r\n\r\n",
                "chunk data longer than its size",
            ),
            (b"5\r\nhello\r0\r\n\r\n", "chunk data longer than its size"),
            (b"5\r\nhello\r\n0\n\n", "chunk line not ended by CRLF"),
            (b"5\r\nhello\r\n0\r\n\n", "chunk line not ended by CRLF"),
            (
                b"5\r\nhello\r\n0\r\nX-T: 1\n\r\n",
                "chunk line not ended by CRLF",
            ),
            (
                b"5\r\nhello\r\n0\r\nno colon\r\n\r\n",
                "invalid trailer field",
            ),
            (b"5\r\nhello\r\n0\r\n: v\r\n\r\n", "invalid trailer field"),
            (
                b"5\r\nhello\r\n0\r\nX-T: a\0b\r\n\r\n",
                "invalid trailer field",
            ),
            (
                b"5\r\nhello\r\n0\r\nX T: v\r\n\r\n",
                "invalid trailer field",
            ),
        ] {
            assert_eq!(
                chunked_error(input),
                Some(BodyError::Malformed(why)),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        let long_line = format!("5;{}\r\nhello\r\n0\r\n\r\n", "a".repeat(MAX_CHUNK_LINE));
        assert_eq!(
            chunked_error(long_line.as_bytes()),
            Some(BodyError::Malformed("chunk line too long"))
        );
        assert_eq!(chunked_error(b"5\r\nhello\r\n0\r\nX-T: v\t1\r\n\r\n"), None);
        // Extensions are bounded per body, not only per line: 17 lines of 1,000 bytes of them around 17
        // bytes of data are refused, 16 are not.
        let wrapped = |lines: usize| {
            let mut body = format!("1;{}\r\nx\r\n", "a".repeat(998)).repeat(lines);
            body.push_str("0\r\n\r\n");
            body
        };
        assert_eq!(chunked_error(wrapped(16).as_bytes()), None);
        assert_eq!(
            chunked_error(wrapped(17).as_bytes()),
            Some(BodyError::Malformed("chunk extensions too long"))
        );
    }

    /// What a closing answer leaves of a body is told without reading any more of it: part of it is unread
    /// (and still there to read), all of it complete, a faulty one failed.
    #[test]
    fn what_is_left_is_told_without_reading() {
        let (mut conn, writer) = fed(b"hello, world".to_vec(), 8 << 10);
        let mut read = body(&mut conn, Framing::Length(12), 1 << 20);
        let mut part = [0u8; 5];
        read.read_exact(&mut part).expect("read");
        assert_eq!(read.left(), Drained::Unread);
        let mut rest = String::new();
        read.read_to_string(&mut rest).expect("read the rest");
        assert_eq!(rest, ", world");
        assert_eq!(read.left(), Drained::Complete);
        writer.join().expect("writer thread");

        let (mut conn, writer) = fed(b"hello".to_vec(), 8 << 10);
        let mut read = body(&mut conn, Framing::Length(5), 1 << 20);
        read.read_exact(&mut part).expect("read");
        assert_eq!(
            read.left(),
            Drained::Complete,
            "all of it, though no read saw the end"
        );
        writer.join().expect("writer thread");

        let (mut conn, writer) = fed(Vec::new(), 8 << 10);
        assert_eq!(
            body(&mut conn, Framing::Length(0), 1 << 20).left(),
            Drained::Complete
        );
        writer.join().expect("writer thread");

        let (mut conn, writer) = fed(b"5\nhello\r\n0\r\n\r\n".to_vec(), 8 << 10);
        let mut read = body(&mut conn, Framing::Chunked, 1 << 20);
        assert!(read.read(&mut part).is_err());
        assert_eq!(
            read.left(),
            Drained::Failed(BodyError::Malformed("chunk line not ended by CRLF"))
        );
        drop(conn);
        writer.join().expect("writer thread");
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
            ("[ \t]{0,2}", "[a-z]{1,8}", "[A-Za-z0-9]{1,8}")
                .prop_map(|(ws, n, v)| format!("{ws};{n}={v}")),
            ("[a-z]{1,8}", "[ -~]{0,12}")
                .prop_map(|(n, v)| format!(";{n}=\"{}\"", v.replace(['"', '\\'], ""))),
        ]
    }

    fn chunking() -> impl Strategy<Value = Chunking> {
        (
            // At least 16 bytes a chunk: 3,000 bytes in chunks of 1 or 2, each with an extension of up
            // to 26 bytes, pass the 16 KiB of extensions a body may carry (refused, as it should be).
            prop::collection::vec(16usize..700, 1..12),
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
            prop_assert_eq!(BodyError::of(&error), BodyError::TooLarge);
            prop_assert!(out.len() as u64 <= max, "{} bytes read past max {max}", out.len());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The CR of any CRLF that frames a valid encoding (not one in its data) replaced by a byte the
        /// grammar does not allow there: the decoder refuses the body as malformed.
        #[test]
        fn a_damaged_line_end_is_an_error(
            data in prop::collection::vec(any::<u8>(), 1..600),
            how in chunking(),
            pick in any::<prop::sample::Index>(),
            bad in prop::sample::select(vec![b'\n', b'\r', b'\0', b'\x1b', b'x']),
        ) {
            let encoded = encode_chunked(&data, &how);
            // The CRLFs of the encoding: every CR followed by LF outside the chunk data.
            let ends = crlf_positions(&encoded, &data, &how);
            let at = ends[pick.index(ends.len())];
            let mut damaged = encoded.clone();
            let replaced = if damaged[at] == bad { b'z' } else { bad };
            damaged[at] = replaced;
            let (_, ended, _) = decode_chunked(damaged, 1 << 20, 64);
            let error = ended.expect_err("a damaged line end is refused");
            prop_assert!(matches!(BodyError::of(&error), BodyError::Malformed(_)), "{:?}", error);
        }
    }

    /// Where the CR of each CRLF that frames `data` in `encoded` (from `encode_chunked`) is.
    fn crlf_positions(encoded: &[u8], data: &[u8], how: &Chunking) -> Vec<usize> {
        let mut positions = Vec::new();
        let mut at = 0;
        let mut rest = data.len();
        let mut i = 0;
        loop {
            let line_end = at
                + encoded[at..]
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .expect("CRLF");
            positions.push(line_end);
            at = line_end + 2;
            if rest == 0 {
                break;
            }
            let n = how.sizes[i % how.sizes.len()].min(rest);
            at += n;
            positions.push(at);
            at += 2;
            rest -= n;
            i += 1;
        }
        // Trailer lines and the final empty line.
        while at < encoded.len() {
            let line_end = at
                + encoded[at..]
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .expect("CRLF");
            positions.push(line_end);
            at = line_end + 2;
        }
        positions
    }
}
