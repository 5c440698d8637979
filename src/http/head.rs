//! Reading a request head with httparse under the size, count and time limits, and checking what httparse
//! leaves to the server: the version, the request target's form (RFC 9112 §3.2), Host (§3.2), and the body's
//! framing (§6).

use std::time::Instant;

use super::body::Framing;
use super::conn::{Conn, ReadStop};
use super::refusal::Refused;
use super::{Limits, Method};

/// The most header fields in one request head (more: 431).
pub(super) const MAX_HEADERS: usize = 100;
/// The longest request line (longer: 414).
pub(super) const MAX_REQUEST_LINE: usize = 8 << 10;

/// A parsed request head.
#[derive(Debug)]
pub(super) struct Head {
    pub(super) method: String,
    pub(super) target: String,
    pub(super) http10: bool,
    pub(super) headers: Vec<(String, String)>,
}

/// A head that passed every check: what the request is and how its body is framed.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Accepted {
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) query: String,
    pub(super) framing: Framing,
}

/// A list element without the optional whitespace around it: spaces and tabs only (RFC 9110 §5.6.3).
/// `str::trim` would also take Unicode spaces (U+00A0, U+3000, ...) that a header value may carry as
/// UTF-8: `Content-Length: 33` followed by a no-break space was read as 33, where a front proxy may read
/// no length at all, and the two would frame the body differently.
fn trim_ows(value: &str) -> &str {
    value.trim_matches([' ', '\t'])
}

impl Head {
    pub(super) fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(super) fn has_token(&self, name: &str, token: &str) -> bool {
        self.values(name)
            .flat_map(|v| v.split(','))
            .any(|t| trim_ows(t).eq_ignore_ascii_case(token))
    }

    pub(super) fn keep_alive(&self) -> bool {
        if self.http10 {
            self.has_token("Connection", "keep-alive")
        } else {
            !self.has_token("Connection", "close")
        }
    }

    /// The path and query of the target: origin-form `/path?query`, or absolute-form
    /// `http://authority/path?query`, whose path is taken (a server must accept both, §3.2.2).
    /// What the log shows of a target refused before it could be taken apart: without its query and
    /// fragment (`?private_token=...`) and without userinfo (`http://user:password@host/`), either of
    /// which may carry a secret a client put there.
    pub(super) fn shown_target(&self) -> String {
        let target = self.target.as_str();
        if target.starts_with('/') {
            return target
                .split(['?', '#'])
                .next()
                .unwrap_or_default()
                .to_string();
        }
        // Not a path: whatever comes before the last `@` may be userinfo, however it is written (a `/`,
        // `?` or `#` in a password included), so it goes first, then the query.
        let (scheme, rest) = target.split_once("://").unwrap_or(("", target));
        let rest = rest.rsplit_once('@').map_or(rest, |(_, after)| after);
        let rest = rest.split(['?', '#']).next().unwrap_or_default();
        if scheme.is_empty() {
            rest.to_string()
        } else {
            format!("{scheme}://{rest}")
        }
    }

    pub(super) fn path_and_query(&self) -> Result<(&str, &str), Refused> {
        let target = self.target.as_str();
        let rest = if target.starts_with('/') {
            target
        } else {
            let after_scheme = ["http://", "https://"].iter().find_map(|scheme| {
                let head = target.get(..scheme.len())?;
                head.eq_ignore_ascii_case(scheme)
                    .then(|| &target[scheme.len()..])
            });
            let Some(after) = after_scheme else {
                return Err(Refused::Malformed(
                    "request target is neither a path nor an http(s) URI",
                ));
            };
            let end = after.find(['/', '?']).unwrap_or(after.len());
            if end == 0 || !is_host(&after[..end]) {
                return Err(Refused::Malformed(
                    "invalid authority in the request target",
                ));
            }
            &after[end..]
        };
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        // A `.` or `..` segment would make the path that picks the sender profile (taken as sent) differ
        // from the one a reverse proxy in front matched its rules on (normalised, RFC 3986 §5.2.4). No
        // sender sends one, so it is refused rather than resolved.
        if path.split('/').any(is_dot_segment) {
            return Err(Refused::Malformed("a . or .. segment in the request path"));
        }
        Ok((if path.is_empty() { "/" } else { path }, query))
    }

    /// One valid Host field in HTTP/1.1 (none or one valid in HTTP/1.0).
    fn check_host(&self) -> Result<(), Refused> {
        let mut hosts = self.values("Host");
        match (hosts.next(), hosts.next()) {
            (None, _) if self.http10 => Ok(()),
            (None, _) => Err(Refused::Malformed(
                "an HTTP/1.1 request needs a Host header",
            )),
            (Some(_), Some(_)) => Err(Refused::Malformed("more than one Host header")),
            (Some(host), None) if is_host(host) => Ok(()),
            (Some(_), None) => Err(Refused::Malformed("invalid Host header")),
        }
    }

    /// Everything the server checks before a handler sees the request, in order: target, Host, framing,
    /// method.
    pub(super) fn accept(&self, max_body: u64) -> Result<Accepted, Refused> {
        let (path, query) = self.path_and_query()?;
        self.check_host()?;
        let framing = self.framing(max_body)?;
        let method =
            Method::parse(&self.method).ok_or_else(|| Refused::Method(self.method.clone()))?;
        Ok(Accepted {
            method,
            path: path.to_string(),
            query: query.to_string(),
            framing,
        })
    }

    /// The body's framing, or why it is refused.
    pub(super) fn framing(&self, max_body: u64) -> Result<Framing, Refused> {
        let te: Vec<&str> = self.values("Transfer-Encoding").collect();
        let has_cl = self.values("Content-Length").next().is_some();
        if !te.is_empty() {
            // RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing, whatever else is there.
            if self.http10 {
                return Err(Refused::Malformed(
                    "Transfer-Encoding in an HTTP/1.0 request",
                ));
            }
            if has_cl {
                return Err(Refused::Malformed(
                    "both Transfer-Encoding and Content-Length",
                ));
            }
            let codings: Vec<&str> = te.iter().flat_map(|v| v.split(',')).map(trim_ows).collect();
            if codings.len() > 1 && codings.iter().all(|c| c.eq_ignore_ascii_case("chunked")) {
                return Err(Refused::Malformed(
                    "chunked more than once in Transfer-Encoding",
                ));
            }
            if codings.len() != 1 || !codings[0].eq_ignore_ascii_case("chunked") {
                return Err(Refused::Malformed(
                    "unsupported Transfer-Encoding: only chunked is accepted",
                ));
            }
            return Ok(Framing::Chunked);
        }
        let mut length: Option<u64> = None;
        for value in self.values("Content-Length").flat_map(|v| v.split(',')) {
            let value = trim_ows(value);
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Refused::Malformed("invalid Content-Length"));
            }
            // All digits but too big for u64: certainly over any max_body.
            let n = value.parse::<u64>().unwrap_or(u64::MAX);
            if length.is_some_and(|l| l != n) {
                return Err(Refused::Malformed("conflicting Content-Length values"));
            }
            length = Some(n);
        }
        match length {
            Some(n) if n > max_body => Err(Refused::BodyTooLarge),
            Some(n) => Ok(Framing::Length(n)),
            None => Ok(Framing::Length(0)),
        }
    }
}

/// `.` or `..`, also percent-encoded (`%2e`, `%2E`).
fn is_dot_segment(segment: &str) -> bool {
    let decoded = segment.replace("%2e", ".").replace("%2E", ".");
    decoded == "." || decoded == ".."
}

/// `uri-host [ ":" port ]` (RFC 3986 §3.2.2): a bracketed IP literal, or a reg-name / IPv4 address of
/// unreserved characters, percent-escapes and sub-delims; the port all digits. Empty is allowed (§7.2 of
/// RFC 9110: a target without an authority).
fn is_host(value: &str) -> bool {
    let (host, port) = if let Some(literal) = value.strip_prefix('[') {
        let Some((inside, after)) = literal.split_once(']') else {
            return false;
        };
        let literal_ok = !inside.is_empty()
            && inside
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.' | b'v' | b'V'));
        if !literal_ok {
            return false;
        }
        match after.strip_prefix(':') {
            Some(port) => ("", port),
            None if after.is_empty() => ("", ""),
            None => return false,
        }
    } else {
        value.rsplit_once(':').unwrap_or((value, ""))
    };
    is_reg_name(host.as_bytes()) && port.bytes().all(|b| b.is_ascii_digit())
}

fn is_reg_name(mut host: &[u8]) -> bool {
    while let Some((&b, rest)) = host.split_first() {
        host = match b {
            b'%' if rest.len() >= 2 && rest[..2].iter().all(u8::is_ascii_hexdigit) => &rest[2..],
            b if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b) => rest,
            _ => return false,
        };
    }
    true
}

/// Why no head could be read.
pub(super) enum HeadError {
    /// Closed or timed out before any byte: nothing to answer.
    Quiet,
    Refused(Refused),
}

pub(super) fn read_head(
    conn: &mut Conn,
    limits: &Limits,
    deadline: Instant,
) -> Result<Head, HeadError> {
    let refuse = |refused| Err(HeadError::Refused(refused));
    loop {
        let buffered = conn.buffered();
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(buffered) {
            Ok(httparse::Status::Complete(len)) => {
                // A whole head can arrive in one read; its request line is bounded all the same.
                if request_line(buffered).len() > MAX_REQUEST_LINE {
                    return refuse(Refused::LineTooLong);
                }
                if len > limits.max_header_bytes {
                    return refuse(Refused::HeadTooLarge("request head too large"));
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
                return refuse(Refused::HeadTooLarge("too many header fields"));
            }
            // A version is judged on the whole line: `HTTP/2` may still become `HTTP/2.0`.
            Err(httparse::Error::Version) if !line_complete(buffered) => {}
            Err(httparse::Error::Version) => {
                return refuse(match other_version(request_line(buffered)) {
                    Some(version) => Refused::Version(version),
                    None => Refused::Malformed("malformed request line"),
                });
            }
            Err(_) => return refuse(Refused::Malformed("malformed request head")),
        }
        if request_line(buffered).len() > MAX_REQUEST_LINE {
            return refuse(Refused::LineTooLong);
        }
        if buffered.len() >= limits.max_header_bytes {
            return refuse(Refused::HeadTooLarge("request head too large"));
        }
        // Blank lines before a request are allowed (RFC 9112 §2.2); a client that sent only those has not
        // started a request, so it is closed quietly rather than answered.
        let had_bytes = buffered.iter().any(|&b| b != b'\r' && b != b'\n');
        match conn.fill(deadline) {
            Ok(_) => {}
            Err(ReadStop::Timeout) if had_bytes => return refuse(Refused::HeadTimeout),
            Err(_) => return Err(HeadError::Quiet),
        }
    }
}

/// The request line at the start of `buffered` (complete or not) without its line end; empty lines before
/// it are skipped, as httparse skips them.
fn request_line(buffered: &[u8]) -> &[u8] {
    let start = buffered
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buffered.len());
    let line = &buffered[start..];
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    line[..end].strip_suffix(b"\r").unwrap_or(&line[..end])
}

fn line_complete(buffered: &[u8]) -> bool {
    buffered
        .iter()
        .skip_while(|&&b| b == b'\r' || b == b'\n')
        .any(|&b| b == b'\n')
}

/// The version of a request line that httparse refused for its version, if it is a well-formed
/// `HTTP/DIGIT[.DIGIT]` other than 1.0 and 1.1 (505), rather than no version at all (400).
fn other_version(line: &[u8]) -> Option<String> {
    let version = &line[line.iter().rposition(|&b| b == b' ')? + 1..];
    let digits = version.strip_prefix(b"HTTP/")?;
    let well_formed = match digits {
        [major] => major.is_ascii_digit(),
        [major, b'.', minor] => major.is_ascii_digit() && minor.is_ascii_digit(),
        _ => false,
    };
    (well_formed && digits != b"1.0" && digits != b"1.1")
        .then(|| String::from_utf8_lossy(version).into_owned())
}

#[cfg(test)]
mod tests {
    use super::super::conn::fed;
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

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
    fn a_refused_target_is_logged_without_its_query_or_userinfo() {
        let shown = |target: &str| {
            Head {
                target: target.into(),
                ..head(&[])
            }
            .shown_target()
        };
        assert_eq!(
            shown("http://jamf:URLPASS@127.0.0.1:8080/basic?token=QUERYTOK"),
            "http://127.0.0.1:8080/basic"
        );
        assert_eq!(shown("/gl/./x?private_token=QK#frag"), "/gl/./x");
        assert_eq!(shown("https://u@h"), "https://h");
        assert_eq!(shown("*"), "*");
        assert_eq!(
            shown("http://jamf:se/cret@127.0.0.1/x"),
            "http://127.0.0.1/x"
        );
        assert_eq!(shown("jamf:PASS@127.0.0.1/x"), "127.0.0.1/x");
        assert_eq!(shown("http://u:p?ss@h/x"), "http://h/x");
        assert_eq!(shown("http://u:p#ss@h/x?q=1"), "http://h/x");
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
                .map_err(|e| e.status()),
            Err(413)
        );
        assert_eq!(
            head(&[("Content-Length", "1099511627776")])
                .framing(10)
                .map_err(|e| e.status()),
            Err(413)
        );
        assert_eq!(
            head(&[("Content-Length", "99999999999999999999999")])
                .framing(10)
                .map_err(|e| e.status()),
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
            assert_eq!(
                head(&bad).framing(10).map_err(|e| e.status()),
                Err(400),
                "{bad:?}"
            );
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

    fn with(method: &str, target: &str, http10: bool, headers: &[(&str, &str)]) -> Head {
        let mut h = head(headers);
        h.method = method.into();
        h.target = target.into();
        h.http10 = http10;
        h
    }

    #[test]
    fn absolute_form_targets_give_their_path() {
        for (target, path, query) in [
            ("/hooks/A?x=1", "/hooks/A", "x=1"),
            ("http://host/hooks/A", "/hooks/A", ""),
            ("HTTP://host:8080/hooks/A?b=2", "/hooks/A", "b=2"),
            ("https://[::1]:443/x", "/x", ""),
            ("http://host", "/", ""),
            ("http://host?q", "/", "q"),
            ("/hooks/A.B/..x/.y?z=..", "/hooks/A.B/..x/.y", "z=.."),
        ] {
            let h = with("POST", target, false, &[("Host", "h")]);
            assert_eq!(h.path_and_query(), Ok((path, query)), "{target}");
        }
        for bad in [
            "*",
            "hooks/A",
            "ftp://host/x",
            "http:///x",
            "http://ho st/x",
            "http://a@b/x",
            "/jamf/../github/hooks/push",
            "/hooks/./A",
            "/hooks/%2E%2e/A",
            "/..",
            "http://host/a/./b",
        ] {
            let h = with("POST", bad, false, &[("Host", "h")]);
            assert_eq!(h.accept(10).map_err(|e| e.status()), Err(400), "{bad}");
        }
    }

    #[test]
    fn host_is_required_once_and_valid() {
        let ok =
            |headers: &[(&str, &str)], http10: bool| with("GET", "/", http10, headers).accept(10);
        for host in [
            "example.com",
            "example.com:8080",
            "127.0.0.1",
            "[::1]:80",
            "",
            "a-b.c_d~e",
            "xn--bcher-kva.example",
            "%41b",
        ] {
            assert!(ok(&[("Host", host)], false).is_ok(), "{host:?}");
        }
        assert!(ok(&[], true).is_ok(), "HTTP/1.0 may omit Host");
        for headers in [
            &[][..],
            &[("Host", "a"), ("host", "a")],
            &[("Host", "a b")],
            &[("Host", "a/b")],
            &[("Host", "a:8x")],
            &[("Host", "[::1")],
            &[("Host", "[zz]")],
            &[("Host", "h\u{e9}")],
            &[("Host", "a@b")],
            &[("Host", "%4")],
        ] {
            assert_eq!(
                ok(headers, false).map_err(|e| e.status()),
                Err(400),
                "{headers:?}"
            );
        }
        assert_eq!(
            ok(&[("Host", "a"), ("Host", "b")], true).map_err(|e| e.status()),
            Err(400),
            "two Host fields in HTTP/1.0 too"
        );
    }

    #[test]
    fn transfer_encoding_in_http_1_0_is_faulty_framing() {
        for headers in [
            &[("Transfer-Encoding", "chunked")][..],
            &[("Transfer-Encoding", "chunked"), ("Content-Length", "5")],
            &[("Transfer-Encoding", "identity")],
        ] {
            let h = with("POST", "/", true, headers);
            assert_eq!(
                h.framing(10),
                Err(Refused::Malformed(
                    "Transfer-Encoding in an HTTP/1.0 request"
                )),
                "{headers:?}"
            );
        }
    }

    #[test]
    fn chunked_twice_is_said_to_be_so() {
        for headers in [
            &[
                ("Transfer-Encoding", "chunked"),
                ("Transfer-Encoding", "chunked"),
            ][..],
            &[("Transfer-Encoding", "chunked, chunked")],
        ] {
            let h = with("POST", "/", false, headers);
            assert_eq!(
                h.framing(10),
                Err(Refused::Malformed(
                    "chunked more than once in Transfer-Encoding"
                )),
                "{headers:?}"
            );
        }
    }

    #[test]
    fn other_versions_are_505_and_no_version_400() {
        assert_eq!(other_version(b"GET / HTTP/2.0"), Some("HTTP/2.0".into()));
        assert_eq!(other_version(b"GET / HTTP/1.2"), Some("HTTP/1.2".into()));
        assert_eq!(other_version(b"GET / HTTP/3"), Some("HTTP/3".into()));
        for bad in [
            &b"GET / HTTP/1.1"[..],
            b"GET / http/2.0",
            b"GET / HTTP/22.0",
            b"GET / HTTP/2.",
            b"GET /",
            b"GET / FOO/1.0",
        ] {
            assert_eq!(
                other_version(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn limits(max_header_bytes: usize) -> Limits {
        Limits {
            max_connections: 1,
            max_header_bytes,
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(10),
        }
    }

    /// The status `read_head` refuses `input` with, or 0 when it reads a head.
    fn head_status(input: &[u8]) -> u16 {
        let (mut conn, writer) = fed(input.to_vec(), 16 << 10);
        let status = match read_head(
            &mut conn,
            &limits(16 << 10),
            Instant::now() + Duration::from_secs(10),
        ) {
            Ok(_) => 0,
            Err(HeadError::Refused(r)) => r.status(),
            Err(HeadError::Quiet) => 1,
        };
        drop(conn);
        writer.join().expect("writer thread");
        status
    }

    #[test]
    fn unsupported_versions_get_505_however_the_line_arrives() {
        assert_eq!(head_status(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"), 505);
        assert_eq!(head_status(b"GET / HTTP/1.2\r\nHost: a\r\n\r\n"), 505);
        assert_eq!(head_status(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), 0);
        assert_eq!(head_status(b"GET / HTTP/x\r\n\r\n"), 400);
        assert_eq!(
            head_status(b"GET / HTTP/2."),
            1,
            "an incomplete line is not judged"
        );
    }

    proptest! {
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
                Err(HeadError::Refused(refused)) => {
                    let status = refused.status();
                    prop_assert!([400, 414, 431, 505].contains(&status), "status {}", status);
                    if status == 505 {
                        prop_assert!(matches!(whole, Err(httparse::Error::Version)), "{:?}", whole);
                    }
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
                    // Incomplete, or a version judged only on a whole line that never came.
                    let partial = matches!(whole, Ok(httparse::Status::Partial))
                        || (matches!(whole, Err(httparse::Error::Version)) && !line_complete(&input));
                    prop_assert!(partial, "{:?}", whole);
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
            prop_assert_eq!(head_with(others, fields).framing(max).map_err(|e| e.status()), Err(400));
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
            prop_assert_eq!(head_with(others, fields).framing(max).map_err(|e| e.status()), Err(400));
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
            prop_assert_eq!(head_with(others, fields).framing(max).map_err(|e| e.status()), expected);
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
            prop_assert_eq!(head.framing(max).map_err(|e| e.status()), Err(400));
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
            prop_assert_eq!(head_with(others, fields).framing(max).map_err(|e| e.status()), expected);
        }

        #[test]
        fn framing_without_framing_fields_is_an_empty_body(others in others(), max in any::<u64>()) {
            prop_assert_eq!(head_with(others, vec![]).framing(max), Ok(Framing::Length(0)));
        }
    }
}
