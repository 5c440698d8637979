//! The one writer of a response head and body, used for handlers' answers and for the canned 503 the accept
//! loop sends alike, so every answer carries the same fields.

use std::fmt::Write as _;
use std::time::SystemTime;

use super::Response;

/// Seconds a client is asked to wait before retrying a 503.
const RETRY_AFTER: u32 = 1;

/// The bytes of `response`: status line, `Date`, `Content-Type`, `Content-Length`, `X-Request-Id`
/// (`echo_id`), `Retry-After` on a 503, `Allow` on a 405, `Connection`, then the body.
pub(super) fn encode(response: &Response, echo_id: &str, close: bool) -> Vec<u8> {
    let mut head = String::with_capacity(256);
    let _ = write!(
        head,
        "HTTP/1.1 {} {}\r\nDate: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Request-Id: {echo_id}\r\n",
        response.status,
        reason(response.status),
        httpdate::fmt_http_date(SystemTime::now()),
        response.body.len()
    );
    if response.status == 503 {
        let _ = write!(head, "Retry-After: {RETRY_AFTER}\r\n");
    }
    if response.status == 405 {
        head.push_str("Allow: GET, POST, PUT\r\n");
    }
    for (name, value) in &response.headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    head.push_str(if close {
        "Connection: close\r\n\r\n"
    } else {
        "Connection: keep-alive\r\n\r\n"
    });
    let mut out = head.into_bytes();
    out.extend_from_slice(&response.body);
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(response: &Response, close: bool) -> String {
        String::from_utf8(encode(response, "id-1", close)).expect("ASCII")
    }

    #[test]
    fn every_answer_has_its_fields_and_a_503_its_retry_after() {
        let ok = text(&Response::error(200, "id-1", "x"), false);
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\nDate: "), "{ok}");
        assert!(ok.contains(" GMT\r\n"), "{ok}");
        assert!(ok.contains("\r\nX-Request-Id: id-1\r\n"), "{ok}");
        assert!(ok.contains("\r\nConnection: keep-alive\r\n\r\n{"), "{ok}");
        assert!(!ok.contains("Retry-After"), "{ok}");
        let busy = text(&Response::error(503, "id-1", "busy"), true);
        assert!(busy.contains("\r\nRetry-After: 1\r\n"), "{busy}");
        assert!(busy.contains("\r\nConnection: close\r\n"), "{busy}");
        let method = text(&Response::error(405, "id-1", "no"), true);
        assert!(method.contains("\r\nAllow: GET, POST, PUT\r\n"), "{method}");
        let body = Response::error(400, "id-1", "bad");
        let length = format!("\r\nContent-Length: {}\r\n", body.body.len());
        assert!(text(&body, true).contains(&length));
    }
}
