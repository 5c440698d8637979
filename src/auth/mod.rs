//! Sender authentication: which sender profile a request falls under (by path), whether it passes that
//! profile's checks (IP allow-list, credentials or a signature over the raw body, the events it may send),
//! and why not. Called from the one place in `Gateway::serve` that waits for it, before anything touches
//! the disk or runs.
//!
//! A check has two halves: what the head alone decides ([`Sender::admit`]), then, for schemes that sign the
//! body, a [`BodyCheck`] fed every byte as it streams in and finished once the body is whole.

pub mod net;
pub mod profile;
pub mod replay;
pub mod verify;

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use crate::routes::Glob;
use net::{Cidr, Trusted};
use verify::{Mac, Secret, SignatureHeader};

/// Why a request failed authentication, in words for the operator's log (never a secret, never what the
/// client sent as one). The client only ever sees a generic answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Under no sender's `path`, while senders are configured.
    NoSender,
    /// A header the scheme needs is absent.
    Missing(String),
    /// A header is present but not in the scheme's form.
    Malformed(String),
    /// A signature header that is not in the form its profile configures (which `form` describes).
    Form { header: String, form: String },
    /// A signature header that decodes to the wrong number of bytes for its profile's algorithm.
    Length {
        header: String,
        got: usize,
        want: usize,
        form: String,
    },
    /// Basic credentials that are not the configured pair.
    WrongCredentials,
    /// A header whose value is not the configured secret.
    WrongToken(String),
    /// A body signature that does not match the body.
    Mismatch,
    /// No client certificate came (or none that verified: such a handshake fails before this).
    NoCertificate,
    /// A client certificate whose names are not among the sender's subjects.
    Subject(Vec<String>),
    /// A signed timestamp too far from now (`age` negative: in the future).
    OutOfWindow { age: i64, window: u64 },
    /// The client's address is not in the sender's allow-list.
    Address(IpAddr),
    /// The client's address could not be told, so no allow-list can admit it.
    UnknownClient(net::Unknown),
    /// The sender may not send this event.
    Event(String),
    /// A Standard Webhooks delivery id first tried as another event (named): the signed parts were sent
    /// again with an event from what the signature does not cover.
    OtherEvent(String),
}

impl Failure {
    /// 403 for a sender that proved who it is but may not do this; 401 for everything else.
    pub fn status(&self) -> u16 {
        match self {
            Failure::Address(_) | Failure::UnknownClient(_) | Failure::Event(_) => 403,
            _ => 401,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::NoSender => f.write_str("the path is under no sender's path"),
            Failure::Missing(header) => write!(f, "no {header} header"),
            Failure::Malformed(header) => write!(f, "{header} header is not in the scheme's form"),
            Failure::Form { header, form } => {
                write!(f, "{header} header is not in the profile's form ({form})")
            }
            Failure::Length {
                header,
                got,
                want,
                form,
            } => write!(
                f,
                "{header} header holds {got} bytes where the profile's HMAC has {want} ({form}): check \
                 algorithm and encoding"
            ),
            Failure::WrongCredentials => f.write_str("user or password does not match"),
            Failure::WrongToken(header) => {
                write!(f, "{header} does not match the configured secret")
            }
            Failure::Mismatch => f.write_str("signature does not match the body"),
            // Also a verified certificate that names no one: a subjectAltName without a DNS name.
            Failure::NoCertificate => f.write_str(
                "no client certificate with a name (none was sent, or its subjectAltName has no DNS name)",
            ),
            Failure::Subject(names) => write!(
                f,
                "client certificate for {} is not among the sender's subjects",
                names.join(", ")
            ),
            Failure::OutOfWindow { age, window } if *age >= 0 => {
                write!(f, "timestamp {age} s old, window {window} s")
            }
            Failure::OutOfWindow { age, window } => {
                write!(
                    f,
                    "timestamp {} s in the future, window {window} s",
                    age.unsigned_abs()
                )
            }
            Failure::Address(ip) => write!(f, "client address {ip} is not allowed"),
            Failure::UnknownClient(why) => write!(f, "client address unknown: {why}"),
            Failure::Event(event) => write!(f, "event {event} is not one this sender may send"),
            Failure::OtherEvent(first) if first.is_empty() => f.write_str(
                "the delivery id was first tried with no event found, and the event is not signed",
            ),
            Failure::OtherEvent(first) => write!(
                f,
                "the delivery id was first tried as event {first}, and the event is not signed"
            ),
        }
    }
}

/// How a sender proves who it is.
#[derive(Debug, Clone)]
pub enum Scheme {
    None,
    Basic {
        user: String,
        password: Secret,
    },
    /// Header name → the secret its value must equal (Jamf's header authentication).
    Headers(Vec<(String, Secret)>),
    Gitlab(Secret),
    /// An HMAC of the raw body in a header: GitHub, Scalefusion, the generic `hmac` type.
    Signed {
        header: SignatureHeader,
        key: Secret,
    },
    /// Standard Webhooks (and Svix): an HMAC-SHA256 of `id.timestamp.body`.
    StandardWebhooks {
        key: Secret,
        window: Duration,
    },
    /// Mutual TLS: a client certificate that verified against `[tls] client_ca_file` and names one of
    /// these (globs, compared ignoring ASCII case, against its DNS names, its CN only without a subjectAltName).
    Mtls {
        subjects: Vec<Glob>,
    },
}

impl Scheme {
    /// The `type` it was configured as (`github` and `scalefusion` are `hmac` with a fixed header; a generic
    /// `hmac` that names GitHub's header is still `hmac`).
    pub fn name(&self) -> &'static str {
        match self {
            Scheme::None => "none",
            Scheme::Basic { .. } => "basic",
            Scheme::Headers(_) => "headers",
            Scheme::Gitlab(_) => "gitlab",
            Scheme::Signed { header, .. } => header.kind,
            Scheme::StandardWebhooks { .. } => "standard-webhooks",
            Scheme::Mtls { .. } => "mtls",
        }
    }
}

/// A validated `[[sender]]` profile.
#[derive(Debug, Clone)]
pub struct Sender {
    pub name: String,
    /// Requests whose path is this or below it.
    pub path: String,
    pub scheme: Scheme,
    pub allow_ips: Vec<Cidr>,
    /// Globs; empty: any event.
    pub events: Vec<Glob>,
    /// `ack_status`: what an accepted async delivery is answered with, where its route line does not say
    /// (`ack_status=`); else 202.
    pub ack_status: Option<u16>,
}

/// The header names of Standard Webhooks, and the same scheme as Svix sends it.
const STANDARD_WEBHOOKS_HEADERS: [[&str; 3]; 2] = [
    ["webhook-id", "webhook-timestamp", "webhook-signature"],
    ["svix-id", "svix-timestamp", "svix-signature"],
];

/// The longest delivery id accepted, in bytes (see [`delivery_id`]). Svix and the
/// Standard Webhooks libraries send ids of about 30 characters (`msg_` and a KSUID), so this refuses no
/// real sender; without it an id is bounded only by the head limit (up to 1 MiB), and every accepted one
/// is kept in the replay memory (see [`replay`]) for two windows.
pub const MAX_DELIVERY_ID_BYTES: usize = 256;

/// What the head of a request said, as the checks need it.
pub struct Head<'a> {
    pub header: &'a dyn Fn(&str) -> Option<&'a str>,
    /// Every value of `X-Forwarded-For`, in order.
    pub forwarded_for: Vec<&'a str>,
    /// `None` for a peer on the unix socket.
    pub peer: Option<IpAddr>,
    /// A verified TLS client certificate's DNS names, its CN only without a subjectAltName; empty without one.
    pub client_names: &'a [String],
    /// Seconds since the epoch.
    pub now: i64,
}

/// A request that passed its head's checks.
pub struct Admitted {
    /// Present when the scheme signs the body: every byte must go through it before anything is run.
    pub body: Option<BodyCheck>,
}

impl Sender {
    /// The checks the head decides: the address, then the scheme's headers.
    pub fn admit(&self, head: &Head<'_>, trusted: &Trusted) -> Result<Admitted, Failure> {
        if !self.allow_ips.is_empty() {
            let client = net::client(head.peer, &head.forwarded_for, trusted)
                .map_err(Failure::UnknownClient)?;
            if !self.allow_ips.iter().any(|c| c.contains(client)) {
                return Err(Failure::Address(client));
            }
        }
        let header = head.header;
        let body = match &self.scheme {
            Scheme::None => None,
            Scheme::Basic { user, password } => {
                verify::basic(header("Authorization"), user, password)?;
                None
            }
            Scheme::Headers(expected) => {
                // Every header is checked, so which one was wrong does not change the time taken.
                let mut first_failure = None;
                for (name, secret) in expected {
                    if let Err(failure) = verify::token(name, header(name), secret) {
                        first_failure.get_or_insert(failure);
                    }
                }
                if let Some(failure) = first_failure {
                    return Err(failure);
                }
                None
            }
            Scheme::Gitlab(secret) => {
                verify::token("X-Gitlab-Token", header("X-Gitlab-Token"), secret)?;
                None
            }
            Scheme::Signed { header: how, key } => {
                let expected = how.expected(header(&how.header))?;
                Some(BodyCheck {
                    mac: Mac::new(how.algorithm, key.bytes()),
                    expected: vec![expected],
                })
            }
            Scheme::Mtls { subjects } => {
                if head.client_names.is_empty() {
                    return Err(Failure::NoCertificate);
                }
                let admitted = head
                    .client_names
                    .iter()
                    .any(|name| subjects.iter().any(|glob| glob.matches(name)));
                if !admitted {
                    return Err(Failure::Subject(head.client_names.to_vec()));
                }
                None
            }
            Scheme::StandardWebhooks { key, window } => {
                let names = STANDARD_WEBHOOKS_HEADERS
                    .iter()
                    .find(|names| header(names[0]).is_some())
                    .unwrap_or(&STANDARD_WEBHOOKS_HEADERS[0]);
                let id = header(names[0]).ok_or_else(|| Failure::Missing(names[0].into()))?;
                // Before the signature is computed or the id claimed: a sender with the secret could
                // otherwise fill the replay memory with ids of up to the head limit each. An empty id
                // names no delivery, so it could be neither deduplicated nor told from a replay.
                if id.len() > MAX_DELIVERY_ID_BYTES || id.trim().is_empty() {
                    return Err(Failure::Malformed(names[0].into()));
                }
                let timestamp =
                    header(names[1]).ok_or_else(|| Failure::Missing(names[1].into()))?;
                let signature =
                    header(names[2]).ok_or_else(|| Failure::Missing(names[2].into()))?;
                verify::timestamp_within(timestamp, head.now, window.as_secs()).map_err(
                    |failure| match failure {
                        Failure::Malformed(_) => Failure::Malformed(names[1].into()),
                        other => other,
                    },
                )?;
                let expected = verify::standard_webhooks_signatures(signature);
                if expected.is_empty() {
                    return Err(Failure::Malformed(names[2].into()));
                }
                let mut mac = Mac::new(verify::Algorithm::Sha256, key.bytes());
                for part in [id.as_bytes(), b".", timestamp.as_bytes(), b"."] {
                    mac.update(part);
                }
                Some(BodyCheck { mac, expected })
            }
        };
        Ok(Admitted { body })
    }

    /// The event check, once the event is known.
    pub fn may_send(&self, event: &str) -> Result<(), Failure> {
        if self.events.is_empty() || self.events.iter().any(|g| g.matches(event)) {
            Ok(())
        } else {
            Err(Failure::Event(event.to_string()))
        }
    }
}

/// A delivery id a sender put on a request, and the header it came in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryId {
    pub id: String,
    pub header: &'static str,
}

impl DeliveryId {
    /// Whether the id names one delivery, the same on each of its retries and on no other: then a second
    /// request with it is that delivery again, and the store's dedupe may answer it without a run.
    /// GitLab's `X-Gitlab-Event-UUID` is not such an id: it names the event that set off a chain of hooks,
    /// and a hook's script that acts through GitLab's API sets off new events that carry the same UUID, of
    /// the same kind or another. Deduped by it, each of those would be answered and never run.
    pub fn names_one_delivery(&self) -> bool {
        self.header != "X-Gitlab-Event-UUID"
    }
}

/// The delivery id a sender puts on a request, from the first of these headers present; `Err` names a
/// header whose id is longer than [`MAX_DELIVERY_ID_BYTES`]. Real senders send UUIDs or ids of about 30
/// characters; a longer one would be kept in the store's dedupe table for a whole window and handed to the
/// script's environment, where past 128 KiB (the kernel's limit on one string) the script could not start.
pub fn delivery_id<'a>(
    header: &dyn Fn(&str) -> Option<&'a str>,
) -> Result<Option<DeliveryId>, &'static str> {
    // GitLab sends Idempotency-Key (the same on each retry of a delivery, since 17.4) beside
    // X-Gitlab-Event-UUID (see `names_one_delivery`): the first is the better id. An empty value is no id
    // (it would make every empty-id delivery of the sender one).
    let found = [
        "webhook-id",
        "svix-id",
        "X-GitHub-Delivery",
        "Idempotency-Key",
        "X-Gitlab-Event-UUID",
    ]
    .into_iter()
    .find_map(|name| {
        header(name)
            .filter(|id| !id.trim().is_empty())
            .map(|id| (name, id))
    });
    match found {
        Some((name, id)) if id.len() > MAX_DELIVERY_ID_BYTES => Err(name),
        found => Ok(found.map(|(header, id)| DeliveryId {
            id: id.to_string(),
            header,
        })),
    }
}

/// A body signature being checked as the body streams in.
pub struct BodyCheck {
    mac: Mac,
    expected: Vec<Vec<u8>>,
}

impl BodyCheck {
    pub fn update(&mut self, data: &[u8]) {
        self.mac.update(data);
    }

    pub fn finish(self) -> Result<(), Failure> {
        if self.mac.matches_any(&self.expected) {
            Ok(())
        } else {
            Err(Failure::Mismatch)
        }
    }
}

/// The configured senders: the one whose `path` is the longest prefix of a request's path applies.
#[derive(Debug, Clone, Default)]
pub struct Senders {
    pub senders: Vec<Sender>,
}

impl Senders {
    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    /// A sender that admits anyone who can reach the daemon: `type = "none"` without `allow_ips`, or with
    /// an `allow_ips` that holds every address (only its path and its `events` stand in the way), as open
    /// as no sender at all.
    pub fn open(&self) -> Option<&Sender> {
        self.senders.iter().find(|s| {
            matches!(s.scheme, Scheme::None)
                && (s.allow_ips.is_empty() || net::cover_everyone(&s.allow_ips))
        })
    }

    /// The sender a path falls under: `path` equal to the sender's, or below it (`/jamf` covers
    /// `/jamf/x`, not `/jamfx`).
    pub fn select(&self, path: &str) -> Option<&Sender> {
        self.senders
            .iter()
            .filter(|s| under(path, &s.path))
            .max_by_key(|s| s.path.len())
    }
}

fn under(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/') || prefix.ends_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender(name: &str, path: &str, scheme: Scheme) -> Sender {
        Sender {
            name: name.into(),
            path: path.into(),
            scheme,
            allow_ips: Vec::new(),
            events: Vec::new(),
            ack_status: None,
        }
    }

    fn admit(
        sender: &Sender,
        headers: &[(&str, &str)],
        peer: &str,
        trusted: &Trusted,
    ) -> Result<Admitted, Failure> {
        let owned: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = |name: &str| {
            owned
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let forwarded_for = owned
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("X-Forwarded-For"))
            .map(|(_, v)| v.as_str())
            .collect();
        let head = Head {
            header: &lookup,
            forwarded_for,
            peer: peer.parse().ok(),
            client_names: &[],
            now: 1_649_367_600,
        };
        sender.admit(&head, trusted)
    }

    #[test]
    fn the_longest_matching_path_decides() {
        let senders = Senders {
            senders: vec![
                sender("root", "/", Scheme::None),
                sender("jamf", "/jamf", Scheme::None),
                sender("jamf-signed", "/jamf/signed", Scheme::None),
            ],
        };
        let name = |path| senders.select(path).map(|s| s.name.as_str());
        assert_eq!(name("/jamf"), Some("jamf"));
        assert_eq!(name("/jamf/x"), Some("jamf"));
        assert_eq!(name("/jamf/signed/x"), Some("jamf-signed"));
        assert_eq!(
            name("/jamfx"),
            Some("root"),
            "a prefix of the name is not a path below it"
        );
        let no_root = Senders {
            senders: senders.senders[1..].to_vec(),
        };
        assert_eq!(no_root.select("/other").map(|s| s.name.as_str()), None);
    }

    #[test]
    fn header_names_match_in_any_case_and_values_exactly() {
        let s = sender(
            "h",
            "/",
            Scheme::Headers(vec![("X-Api-Key".into(), Secret::new(b"k1".to_vec()))]),
        );
        assert!(admit(&s, &[("x-api-key", "k1")], "127.0.0.1", &Trusted::default()).is_ok());
        assert_eq!(
            admit(&s, &[("X-Api-Key", "K1")], "127.0.0.1", &Trusted::default()).err(),
            Some(Failure::WrongToken("X-Api-Key".into()))
        );
        assert_eq!(
            admit(&s, &[], "127.0.0.1", &Trusted::default()).err(),
            Some(Failure::Missing("X-Api-Key".into()))
        );
    }

    #[test]
    fn allow_lists_see_the_client_behind_a_trusted_proxy_only() {
        let mut s = sender("k", "/", Scheme::None);
        s.allow_ips = vec![Cidr::parse("203.0.113.0/24").expect("block")];
        let trusted = Trusted {
            blocks: vec![Cidr::parse("127.0.0.1").expect("proxy")],
            unix: false,
        };
        assert!(admit(&s, &[], "203.0.113.9", &trusted).is_ok());
        assert!(
            admit(
                &s,
                &[("X-Forwarded-For", "203.0.113.9")],
                "127.0.0.1",
                &trusted
            )
            .is_ok()
        );
        let forged = admit(
            &s,
            &[("X-Forwarded-For", "203.0.113.9")],
            "198.51.100.1",
            &trusted,
        );
        assert_eq!(
            forged.err(),
            Some(Failure::Address("198.51.100.1".parse().expect("ip")))
        );
        let err = admit(&s, &[], "127.0.0.1", &trusted)
            .err()
            .expect("refused");
        assert_eq!(err.status(), 403);
    }

    #[test]
    fn standard_webhooks_reads_svix_headers_too_and_checks_the_window() {
        let key = Secret::new(
            verify::standard_webhooks_key(b"whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").expect("key"),
        );
        let s = sender(
            "sw",
            "/",
            Scheme::StandardWebhooks {
                key,
                window: Duration::from_secs(300),
            },
        );
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        for prefix in ["webhook", "svix"] {
            let headers = [
                (format!("{prefix}-id"), "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk"),
                (format!("{prefix}-timestamp"), "1649367553"),
                (
                    format!("{prefix}-signature"),
                    "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
                ),
            ];
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            let admitted = admit(&s, &headers, "127.0.0.1", &Trusted::default()).expect("admitted");
            let lookup = |name: &str| {
                headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| *v)
            };
            assert_eq!(
                delivery_id(&lookup).map(|d| d.map(|d| d.id)),
                Ok(Some("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk".to_string()))
            );
            let mut check = admitted.body.expect("the body is signed");
            check.update(&body[..10]);
            check.update(&body[10..]);
            assert_eq!(check.finish(), Ok(()), "{prefix}");
        }
        let stale = [
            ("webhook-id", "msg_1"),
            ("webhook-timestamp", "1649367000"),
            ("webhook-signature", "v1,AAAA"),
        ];
        assert_eq!(
            admit(&s, &stale, "127.0.0.1", &Trusted::default()).err(),
            Some(Failure::OutOfWindow {
                age: 600,
                window: 300
            })
        );
        assert_eq!(
            Failure::OutOfWindow {
                age: 412,
                window: 300
            }
            .to_string(),
            "timestamp 412 s old, window 300 s"
        );
        // A malformed timestamp is named as it was sent.
        let garbled = [
            ("svix-id", "msg_1"),
            ("svix-timestamp", "soon"),
            ("svix-signature", "v1,AAAA"),
        ];
        assert_eq!(
            admit(&s, &garbled, "127.0.0.1", &Trusted::default()).err(),
            Some(Failure::Malformed("svix-timestamp".into()))
        );
    }

    /// An id past the cap is refused as malformed (401) from the head alone, under either scheme's name;
    /// one at the cap goes on to the signature check.
    #[test]
    fn a_standard_webhooks_id_longer_than_the_cap_is_malformed() {
        let key = Secret::new(
            verify::standard_webhooks_key(b"whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").expect("key"),
        );
        let s = sender(
            "sw",
            "/",
            Scheme::StandardWebhooks {
                key,
                window: Duration::from_secs(300),
            },
        );
        let at_cap = "m".repeat(MAX_DELIVERY_ID_BYTES);
        let past_cap = "m".repeat(MAX_DELIVERY_ID_BYTES + 1);
        for prefix in ["webhook", "svix"] {
            let id_header = format!("{prefix}-id");
            let timestamp = format!("{prefix}-timestamp");
            let signature = format!("{prefix}-signature");
            let with_id = |id: &str| {
                admit(
                    &s,
                    &[
                        (&id_header, id),
                        (&timestamp, "1649367553"),
                        (&signature, "v1,AAAA"),
                    ],
                    "127.0.0.1",
                    &Trusted::default(),
                )
            };
            let refused = with_id(&past_cap).err().expect("refused");
            assert_eq!(refused, Failure::Malformed(id_header.clone()));
            assert_eq!(refused.status(), 401);
            let admitted = with_id(&at_cap).expect("an id at the cap is admitted");
            assert!(
                admitted.body.is_some(),
                "{prefix}: its signature is still checked"
            );
        }
    }

    #[test]
    fn events_limit_what_a_sender_may_trigger() {
        let mut s = sender("jamf", "/", Scheme::None);
        assert!(s.may_send("Anything").is_ok());
        s.events = vec![Glob::new("Computer*", true), Glob::new("Mobile*", true)];
        assert!(s.may_send("ComputerAdded").is_ok());
        assert!(s.may_send("mobiledeviceenrolled").is_ok());
        let err = s.may_send("JSSStartup").expect_err("refused");
        assert_eq!(err.status(), 403);
    }

    #[test]
    fn mtls_admits_only_a_certificate_naming_a_subject() {
        let s = sender(
            "jamf",
            "/",
            Scheme::Mtls {
                subjects: vec![
                    Glob::new("jamf.example.com", true),
                    Glob::new("*.jamfcloud.com", true),
                ],
            },
        );
        let admit_names = |names: &[String]| {
            let lookup = |_: &str| None;
            let head = Head {
                header: &lookup,
                forwarded_for: Vec::new(),
                peer: None,
                client_names: names,
                now: 0,
            };
            s.admit(&head, &Trusted::default()).map(|_| ())
        };
        assert_eq!(admit_names(&["JAMF.example.com".into()]), Ok(()));
        assert_eq!(
            admit_names(&["other".into(), "acme.jamfcloud.com".into()]),
            Ok(())
        );
        assert_eq!(admit_names(&[]), Err(Failure::NoCertificate));
        assert_eq!(
            admit_names(&["evil.example.com".into()]),
            Err(Failure::Subject(vec!["evil.example.com".into()]))
        );
    }
}
