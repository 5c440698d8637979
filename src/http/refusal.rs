//! Every failure the server detects itself, before or around a handler: a faulty head, framing or body, a
//! method or version it does not serve, too many connections, shutdown. [`Refused::status`] is the one place
//! in this layer where one becomes an HTTP status. A body's failures surface to the handler, which reads the
//! body, and map through [`BodyError::status`] there.

use std::fmt;

use super::body::BodyError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refused {
    /// A request line or header field that does not parse, a bad target or Host, faulty framing.
    Malformed(&'static str),
    /// A request line over `MAX_REQUEST_LINE`.
    LineTooLong,
    /// A head over `max_header_bytes`, or over `MAX_HEADERS` fields.
    HeadTooLarge(&'static str),
    /// The head did not arrive within `header_timeout`.
    HeadTimeout,
    /// `Content-Length` over `max_body`, refused before reading.
    BodyTooLarge,
    /// A method other than GET, POST, PUT and HEAD (with `Allow`).
    Method(String),
    /// An HTTP version other than 1.0 and 1.1.
    Version(String),
    /// Too many connections, out of descriptors, or shutting down: worth retrying.
    Busy(&'static str),
}

impl Refused {
    pub(super) fn status(&self) -> u16 {
        match self {
            Refused::Malformed(_) => 400,
            Refused::LineTooLong => 414,
            Refused::HeadTooLarge(_) => 431,
            Refused::HeadTimeout => 408,
            Refused::BodyTooLarge => 413,
            Refused::Method(_) => 405,
            Refused::Version(_) => 505,
            Refused::Busy(_) => 503,
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Malformed(what) => write!(f, "bad request: {what}"),
            Refused::LineTooLong => f.write_str("request line too long"),
            Refused::HeadTooLarge(what) => f.write_str(what),
            Refused::HeadTimeout => f.write_str("request head not received in time"),
            Refused::BodyTooLarge => BodyError::TooLarge.fmt(f),
            // The client's own bytes: only what the method token allows (httparse checked it), cut short.
            Refused::Method(method) => write!(
                f,
                "method {} not allowed; use GET, POST or PUT",
                method.chars().take(32).collect::<String>()
            ),
            Refused::Version(version) => write!(
                f,
                "HTTP version {} not supported; use HTTP/1.1 or HTTP/1.0",
                crate::logging::Escaped(&version.chars().take(16).collect::<String>())
            ),
            Refused::Busy(why) => write!(f, "server busy: {why}; retry later"),
        }
    }
}
