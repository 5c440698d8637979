//! `hookrunner send`: the headers a sender profile's real sender would add, and the rest of a send that is
//! pure (where to send by default, the pace). The secrets come from the profile, as the daemon read them
//! from their files; they go into headers only, never onto the terminal.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::auth::Scheme;
use crate::auth::verify::{Algorithm, Mac};
use crate::config::Listen;
use crate::tools::http::Url;
use crate::tools::samples::Random;

/// The headers that authenticate `body` under `scheme` at `now` (Unix seconds).
pub fn sign(scheme: &Scheme, body: &[u8], now: i64, random: &mut Random) -> Vec<(String, String)> {
    match scheme {
        // A client certificate is the transport's, not a header (`send --cert --key`).
        Scheme::None | Scheme::Mtls { .. } => Vec::new(),
        Scheme::Basic { user, password } => {
            let mut pair = format!("{user}:").into_bytes();
            pair.extend_from_slice(password.bytes());
            vec![(
                "Authorization".into(),
                format!("Basic {}", BASE64.encode(pair)),
            )]
        }
        Scheme::Headers(expected) => expected
            .iter()
            .map(|(name, secret)| {
                (
                    name.clone(),
                    String::from_utf8_lossy(secret.bytes()).into_owned(),
                )
            })
            .collect(),
        Scheme::Gitlab(secret) => vec![(
            "X-Gitlab-Token".into(),
            String::from_utf8_lossy(secret.bytes()).into_owned(),
        )],
        Scheme::Signed { header, key } => {
            let mut mac = Mac::new(header.algorithm, key.bytes());
            mac.update(body);
            let code = header.encoding.encode(&mac.code());
            vec![(header.header.clone(), format!("{}{code}", header.prefix))]
        }
        Scheme::StandardWebhooks { key, .. } => {
            let id = format!(
                "msg_{}",
                crate::tools::samples::uuid(random).replace('-', "")
            );
            let mut mac = Mac::new(Algorithm::Sha256, key.bytes());
            mac.update(format!("{id}.{now}.").as_bytes());
            mac.update(body);
            vec![
                ("webhook-id".into(), id),
                ("webhook-timestamp".into(), now.to_string()),
                (
                    "webhook-signature".into(),
                    format!("v1,{}", BASE64.encode(mac.code())),
                ),
            ]
        }
    }
}

/// The daemon's own address from its `listen`, at `path`: a wildcard address is reached on loopback; over
/// TLS when it has `[tls]` (`secure`), which applies to a TCP listener only.
pub fn default_url(listen: &Listen, path: &str, secure: bool) -> Result<Url, String> {
    match listen {
        Listen::Unix(socket) => {
            let mut url = Url::parse(&format!("unix:{}", socket.display()))?;
            url.target = path.to_string();
            Ok(url)
        }
        Listen::Tcp(address) => {
            let (host, port) = address.rsplit_once(':').unwrap_or((address, "80"));
            if port == "0" {
                return Err(
                    "listen has port 0, so the daemon's port is not known here: give --url".into(),
                );
            }
            let host = match host {
                "0.0.0.0" | "" => "127.0.0.1",
                "[::]" => "[::1]",
                other => other,
            };
            let scheme = if secure { "https" } else { "http" };
            Url::parse(&format!("{scheme}://{host}:{port}{path}"))
        }
    }
}

/// `--rate 5/s` (or `5`): the pause between two sends.
pub fn parse_rate(text: &str) -> Result<Duration, String> {
    let number = text.strip_suffix("/s").unwrap_or(text);
    match number.parse::<f64>() {
        Ok(rate) if rate > 0.0 && rate.is_finite() && rate <= 10_000.0 => {
            Ok(Duration::from_secs_f64(1.0 / rate))
        }
        _ => Err(format!(
            "rate {text:?}: give requests per second, from 0.001/s to 10000/s"
        )),
    }
}

/// `--set /path=value`.
pub fn parse_set(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((path, value)) if path.starts_with('/') => Ok((path.into(), value.into())),
        _ => Err(format!("--set {text:?}: write /path=value")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::verify::{Encoding, Secret, SignatureHeader};
    use crate::auth::{Head, Sender, net::Trusted};

    fn sender(scheme: Scheme) -> Sender {
        Sender {
            name: "s".into(),
            path: "/".into(),
            scheme,
            allow_ips: Vec::new(),
            events: Vec::new(),
            ack_status: None,
        }
    }

    /// What the daemon's own check says about the headers `sign` made.
    fn admitted(scheme: Scheme, body: &[u8], now: i64) -> Result<(), crate::auth::Failure> {
        let headers = sign(&scheme, body, now, &mut Random::new());
        let lookup = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let head = Head {
            header: &lookup,
            forwarded_for: Vec::new(),
            peer: None,
            client_names: &[],
            now,
        };
        let sender = sender(scheme);
        let admitted = sender.admit(&head, &Trusted::default())?;
        match admitted.body {
            Some(mut check) => {
                check.update(body);
                check.finish()
            }
            None => Ok(()),
        }
    }

    fn secret(text: &str) -> Secret {
        Secret::new(text.as_bytes().to_vec())
    }

    #[test]
    fn every_scheme_signs_what_the_daemon_accepts() {
        let body = br#"{"webhook":{"webhookEvent":"ComputerAdded"}}"#;
        let now = 1_765_000_000;
        let schemes = [
            Scheme::None,
            Scheme::Basic {
                user: "jamf".into(),
                password: secret("pa:ss wörd"),
            },
            Scheme::Headers(vec![
                ("X-Api-Key".into(), secret("k1")),
                ("X-Other".into(), secret("k2")),
            ]),
            Scheme::Gitlab(secret("token")),
            Scheme::Signed {
                header: SignatureHeader::github(),
                key: secret("It's a Secret to Everybody"),
            },
            Scheme::Signed {
                header: SignatureHeader::scalefusion(),
                key: secret("sf"),
            },
            Scheme::Signed {
                header: SignatureHeader {
                    kind: "hmac",
                    header: "X-Signature".into(),
                    prefix: "sha512=".into(),
                    encoding: Encoding::Base64,
                    algorithm: Algorithm::Sha512,
                },
                key: secret("jamf-signing-secret"),
            },
            Scheme::StandardWebhooks {
                key: secret("0123456789abcdef"),
                window: Duration::from_secs(300),
            },
        ];
        for scheme in schemes {
            let name = scheme.name();
            assert_eq!(admitted(scheme, body, now), Ok(()), "{name}");
        }
    }

    #[test]
    fn a_wrong_secret_is_refused_by_the_daemon() {
        let body = b"{}";
        let headers = sign(
            &Scheme::Signed {
                header: SignatureHeader::github(),
                key: secret("right"),
            },
            body,
            0,
            &mut Random::new(),
        );
        let lookup = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let head = Head {
            header: &lookup,
            forwarded_for: Vec::new(),
            peer: None,
            client_names: &[],
            now: 0,
        };
        let wrong = sender(Scheme::Signed {
            header: SignatureHeader::github(),
            key: secret("wrong"),
        });
        let mut check = wrong
            .admit(&head, &Trusted::default())
            .expect("head passes")
            .body
            .expect("signed");
        check.update(body);
        assert!(check.finish().is_err());
        // GitHub's published vector, through `sign`.
        let github = sign(
            &Scheme::Signed {
                header: SignatureHeader::github(),
                key: secret("It's a Secret to Everybody"),
            },
            b"Hello, World!",
            0,
            &mut Random::new(),
        );
        assert_eq!(
            github[0].1,
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[test]
    fn urls_rates_and_sets() {
        let url = default_url(&Listen::Tcp("0.0.0.0:8080".into()), "/jamf", false).expect("url");
        assert_eq!(
            (url.host.as_str(), url.target.as_str()),
            ("127.0.0.1:8080", "/jamf")
        );
        assert!(default_url(&Listen::Tcp("127.0.0.1:0".into()), "/", false).is_err());
        let secure = default_url(&Listen::Tcp("0.0.0.0:8443".into()), "/j", true).expect("url");
        assert!(secure.secure);
        assert_eq!(
            (secure.host.as_str(), secure.target.as_str()),
            ("127.0.0.1:8443", "/j")
        );
        let unix = default_url(&Listen::Unix("/run/h.sock".into()), "/gh", false).expect("url");
        assert_eq!(unix.target, "/gh");
        assert_eq!(parse_rate("4/s"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_rate("2"), Ok(Duration::from_millis(500)));
        for bad in ["0/s", "-1", "x", "inf"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_set("/a/b=c=d"), Ok(("/a/b".into(), "c=d".into())));
        assert!(parse_set("a=b").is_err());
    }
}
