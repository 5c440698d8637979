//! A small HTTP/1.1 client for `hookrunner send`: one request per connection (`Connection: close`), over
//! TCP, TLS (rustls, which the daemon has anyway; whom it trusts is [`super::https`]'s) or a unix socket.
//! Webhook senders need nothing more, and a client library would be the largest dependency of the binary.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where to send: `http://HOST:PORT/path?query`, `https://...` or `unix:/path/to/socket` (then the path is
/// `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub transport: Transport,
    /// `https`: TLS over the TCP connection.
    pub secure: bool,
    /// The `Host` header.
    pub host: String,
    /// Path and query.
    pub target: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Tcp(String),
    Unix(PathBuf),
}

const CREDENTIALS: &str = "a URL with credentials (user:password@) is not taken: give the host alone, \
     and --sender for the sender whose credentials to send";

impl Url {
    pub fn parse(text: &str) -> Result<Url, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            return Ok(Url {
                transport: Transport::Unix(PathBuf::from(path)),
                secure: false,
                host: "localhost".into(),
                target: "/".into(),
            });
        }
        let (secure, rest) = match (text.strip_prefix("http://"), text.strip_prefix("https://")) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ if text.contains('@') => return Err(CREDENTIALS.into()),
            _ => {
                return Err(format!(
                    "{text:?}: use http://HOST:PORT/path, https://HOST:PORT/path or unix:/path/to/socket"
                ));
            }
        };
        let (authority, target) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('?') => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        // `user:password@host`: not ours to send (a sender's credentials come from its files), and the
        // URL is not repeated, since every later error would print the password with it.
        if authority.contains('@') {
            return Err(CREDENTIALS.into());
        }
        if authority.is_empty() {
            return Err(format!("{text:?} names no host"));
        }
        let address = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_string()
        } else {
            format!("{authority}:{}", if secure { 443 } else { 80 })
        };
        Ok(Url {
            transport: Transport::Tcp(address),
            secure,
            host: authority.to_string(),
            target,
        })
    }

    /// Whether `text`, a URL as [`Url::parse`] takes it, names a path or a query of its own: `http://h:1`
    /// and `unix:/run/sock` do not, and are given `/`.
    pub fn names_target(text: &str) -> bool {
        !text.starts_with("unix:")
            && text
                .split_once("://")
                .is_some_and(|(_, rest)| rest.contains(['/', '?']))
    }

    /// The host without its port (`[::1]` stays bracketed), the name a certificate is checked against.
    pub fn host_name(&self) -> &str {
        match self.host.rsplit_once(':') {
            Some((name, port)) if port.parse::<u16>().is_ok() && !name.ends_with(':') => name,
            _ => &self.host,
        }
    }
}

/// An answer as received.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The request's bytes: head and body. A header value with a line break (a secret file holding two
/// lines) would end the field early and start another, so it is refused.
pub fn request(
    url: &Url,
    target: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<Vec<u8>, String> {
    if let Some((name, _)) = headers.iter().find(|(_, v)| v.contains(['\r', '\n'])) {
        return Err(format!(
            "the value for the {name} header holds a line break"
        ));
    }
    let mut head = format!(
        "POST {target} HTTP/1.1\r\nHost: {}\r\nUser-Agent: hookrunner-send/{}\r\nConnection: close\r\nContent-Length: {}\r\n",
        url.host,
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    Ok(bytes)
}

/// Sends `request` and reads the whole answer, each step within `timeout`; over TLS (an `https` URL) as
/// `tls` trusts.
pub fn exchange(
    url: &Url,
    request: &[u8],
    timeout: Duration,
    tls: Option<&super::https::Client>,
) -> io::Result<Answer> {
    let mut raw = Vec::new();
    match &url.transport {
        Transport::Tcp(address) if url.secure => {
            let client = tls.ok_or_else(|| io::Error::other("an https URL needs a trust"))?;
            let stream = TcpStream::connect(address)?;
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            let connection =
                rustls::ClientConnection::new(Arc::clone(&client.config), client.name.clone())
                    .map_err(io::Error::other)?;
            let mut stream = rustls::StreamOwned::new(connection, stream);
            stream.write_all(request)?;
            stream.flush()?;
            // A server that closes without TLS's close_notify may still have answered whole: the answer's
            // own length says whether it did (`parse_answer` refuses one cut short).
            match stream.read_to_end(&mut raw) {
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
                other => {
                    other?;
                }
            }
        }
        Transport::Tcp(address) => {
            let mut stream = TcpStream::connect(address)?;
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            stream.write_all(request)?;
            stream.read_to_end(&mut raw)?;
        }
        Transport::Unix(path) => {
            let mut stream = UnixStream::connect(path)?;
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            stream.write_all(request)?;
            stream.read_to_end(&mut raw)?;
        }
    }
    parse_answer(&raw)
}

fn parse_answer(raw: &[u8]) -> io::Result<Answer> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("the answer {what}"));
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("has no complete head"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| bad("has no status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    if let Some(length) = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("Content-Length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        // Short of its length: cut off (over TLS, perhaps by a forged end of the connection).
        if body.len() < length {
            return Err(bad(&format!(
                "was cut short: {} of its {length} bytes",
                body.len()
            )));
        }
        body.truncate(length);
    }
    Ok(Answer {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let url = Url::parse("http://127.0.0.1:8080/jamf?x=1").expect("valid");
        assert_eq!(url.transport, Transport::Tcp("127.0.0.1:8080".into()));
        assert_eq!(
            (url.host.as_str(), url.target.as_str()),
            ("127.0.0.1:8080", "/jamf?x=1")
        );
        let url = Url::parse("http://hooks.example.org").expect("valid");
        assert_eq!(url.transport, Transport::Tcp("hooks.example.org:80".into()));
        assert_eq!(url.target, "/");
        assert_eq!(Url::parse("http://h:1?q").expect("valid").target, "/?q");
        // Credentials in the URL are refused without repeating them; an `@` in the path is a path.
        for with in ["http://jamf:Pw0f9e@h:1/jamf", "ftp://u:Pw0f9e@h/"] {
            let err = Url::parse(with).expect_err("refused");
            assert!(
                err.contains("credentials") && !err.contains("Pw0f9e"),
                "{err}"
            );
        }
        assert_eq!(Url::parse("http://h:1/a@b").expect("valid").target, "/a@b");
        assert!(Url::names_target("http://h:1/jamf"));
        assert!(Url::names_target("http://h:1/"));
        assert!(Url::names_target("https://h?x=1"));
        assert!(!Url::names_target("http://h:1"));
        assert!(!Url::names_target("unix:/run/hookrunner/sock"));
        let unix = Url::parse("unix:/run/hookrunner/sock").expect("valid");
        assert_eq!(
            unix.transport,
            Transport::Unix("/run/hookrunner/sock".into())
        );
        let url = Url::parse("https://hooks.example.org/jamf").expect("valid");
        assert_eq!(
            (&url.transport, url.secure, url.host_name()),
            (
                &Transport::Tcp("hooks.example.org:443".into()),
                true,
                "hooks.example.org"
            )
        );
        assert_eq!(
            Url::parse("https://[::1]:8443/")
                .expect("valid")
                .host_name(),
            "[::1]"
        );
        assert_eq!(
            Url::parse("http://[::1]/").expect("valid").host_name(),
            "[::1]"
        );
        for bad in ["ftp://h/", "h:1", "http:///x"] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn answers() {
        let a = parse_answer(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nX-Request-Id: r1\r\n\r\n{}junk",
        )
        .expect("parses");
        assert_eq!(
            (a.status, a.body.as_slice(), a.header("x-request-id")),
            (404, &b"{}"[..], Some("r1"))
        );
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\n").is_err());
        let short =
            parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}").expect_err("short");
        assert!(
            short.to_string().contains("cut short: 2 of its 5 bytes"),
            "{short}"
        );
        let url = Url::parse("http://h:1/").expect("valid");
        let r = request(&url, "/p", &[("A".into(), "b".into())], b"xy").expect("a request");
        let text = String::from_utf8(r).expect("text");
        assert!(request(&url, "/p", &[("X-Key".into(), "a\nX-Evil: 1".into())], b"").is_err());
        assert!(
            text.starts_with("POST /p HTTP/1.1\r\nHost: h:1\r\n"),
            "{text}"
        );
        assert!(
            text.ends_with("Content-Length: 2\r\nA: b\r\n\r\nxy"),
            "{text}"
        );
    }
}
