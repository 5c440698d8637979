//! A connection with its read buffer. Bytes past one request's head and body stay buffered for the next
//! request on the connection (pipelining).

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use super::listener::Stream;

/// After answering a request whose body was not read, how much of it to read and discard so the answer is
/// not lost to a reset (a "lingering close"): `max_body` and this much more, so that a client which sends
/// its whole body before it reads (Python's urllib, wget) reads a 401 or a 413 for a body up to just over
/// the limit; and for how long at most.
const LINGER_BYTES: u64 = 1 << 20;
const LINGER_TIME: Duration = Duration::from_secs(5);

pub(super) struct Conn {
    pub(super) stream: Stream,
    pub(super) remote: String,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// Why reading from a client stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReadStop {
    Eof,
    Timeout,
    Io,
}

impl Conn {
    pub(super) fn new(stream: Stream, remote: String, capacity: usize) -> Conn {
        Conn {
            stream,
            remote,
            buf: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    pub(super) fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(super) fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more into the buffer before `deadline`: the number of bytes read, which is 0 only when the
    /// buffer is full of unconsumed bytes; or why nothing could be read.
    pub(super) fn fill(&mut self, deadline: Instant) -> Result<usize, ReadStop> {
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

    pub(super) fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream.write_all(data)
    }

    /// Reads and discards what the client still sends, within bounds, so that closing does not reset the
    /// connection before the client has read our answer.
    pub(super) fn linger(mut self, max_body: u64) {
        self.stream.shutdown_write();
        let deadline = Instant::now() + LINGER_TIME;
        let mut discarded = 0u64;
        while discarded < max_body.saturating_add(LINGER_BYTES) {
            self.start = 0;
            self.end = 0;
            match self.fill(deadline) {
                Ok(n) => discarded += n as u64,
                Err(_) => break,
            }
        }
    }
}

/// A connection whose peer writes `input` from its own thread and then closes: for the decoder's and the
/// head reader's tests.
#[cfg(test)]
pub(super) fn fed(input: Vec<u8>, capacity: usize) -> (Conn, std::thread::JoinHandle<()>) {
    let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().expect("socket pair");
    let writer = std::thread::spawn(move || {
        // The reader may stop early and close; a failed write is expected then.
        let _ = theirs.write_all(&input);
    });
    (
        Conn::new(Stream::Unix(ours), "test".into(), capacity),
        writer,
    )
}
