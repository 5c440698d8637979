//! The per-scheme checks, as pure functions over header values and body bytes: no I/O, no clock (the time
//! is a parameter), so each is unit-tested against the senders' published vectors. Every comparison of a
//! secret or a signature is constant-time.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac as _};
use sha2::{Digest as _, Sha256, Sha512};
use subtle::ConstantTimeEq;

use super::Failure;

/// A secret read from a file: never printed, not even by `{:?}`.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(bytes)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether `given` is this secret. Both sides are hashed first, so the time taken says nothing about
    /// the secret's length either.
    pub fn matches(&self, given: &[u8]) -> bool {
        Sha256::digest(&self.0).ct_eq(&Sha256::digest(given)).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Hex,
    Base64,
}

impl Algorithm {
    fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// The length of its HMAC, in bytes.
    fn len(self) -> usize {
        match self {
            Algorithm::Sha256 => 32,
            Algorithm::Sha512 => 64,
        }
    }
}

impl Encoding {
    fn name(self) -> &'static str {
        match self {
            Encoding::Hex => "hex",
            Encoding::Base64 => "base64",
        }
    }

    pub fn encode(self, code: &[u8]) -> String {
        match self {
            Encoding::Hex => hex::encode(code),
            Encoding::Base64 => BASE64.encode(code),
        }
    }

    fn decode(self, text: &str) -> Option<Vec<u8>> {
        match self {
            Encoding::Hex => hex::decode(text).ok(),
            Encoding::Base64 => BASE64.decode(text).ok(),
        }
    }
}

/// An HMAC computed while a body streams in.
pub enum Mac {
    Sha256(Hmac<Sha256>),
    Sha512(Hmac<Sha512>),
}

impl Mac {
    pub fn new(algorithm: Algorithm, key: &[u8]) -> Mac {
        // HMAC takes a key of any length: a longer one is hashed, a shorter one padded.
        match algorithm {
            Algorithm::Sha256 => Mac::Sha256(
                Hmac::new_from_slice(key)
                    .unwrap_or_else(|_| unreachable!("HMAC keys have any length")),
            ),
            Algorithm::Sha512 => Mac::Sha512(
                Hmac::new_from_slice(key)
                    .unwrap_or_else(|_| unreachable!("HMAC keys have any length")),
            ),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Mac::Sha256(mac) => mac.update(data),
            Mac::Sha512(mac) => mac.update(data),
        }
    }

    /// The code itself: what a sender puts in its header (`hookrunner send` signs with it).
    pub fn code(self) -> Vec<u8> {
        match self {
            Mac::Sha256(mac) => mac.finalize().into_bytes().to_vec(),
            Mac::Sha512(mac) => mac.finalize().into_bytes().to_vec(),
        }
    }

    /// Whether the code equals any of `candidates` (each compared in constant time).
    pub fn matches_any(self, candidates: &[Vec<u8>]) -> bool {
        let code = self.code();
        candidates
            .iter()
            .fold(subtle::Choice::from(0), |any, c| any | code.ct_eq(c))
            .into()
    }
}

/// How a body signature is sent: which header, what precedes the code (`sha256=` for GitHub), how it is
/// encoded, and which hash.
#[derive(Debug, Clone)]
pub struct SignatureHeader {
    /// The sender `type` this format was configured as: `github`, `scalefusion` or `hmac`.
    pub kind: &'static str,
    pub header: String,
    pub prefix: String,
    pub encoding: Encoding,
    pub algorithm: Algorithm,
}

impl SignatureHeader {
    pub fn github() -> SignatureHeader {
        SignatureHeader {
            kind: "github",
            header: "X-Hub-Signature-256".into(),
            prefix: "sha256=".into(),
            encoding: Encoding::Hex,
            algorithm: Algorithm::Sha256,
        }
    }

    pub fn scalefusion() -> SignatureHeader {
        SignatureHeader {
            kind: "scalefusion",
            header: "X-SF-Signature".into(),
            prefix: String::new(),
            encoding: Encoding::Hex,
            algorithm: Algorithm::Sha256,
        }
    }

    /// The code the header carries, decoded. A failure says what the profile expects (its prefix, encoding
    /// and algorithm: configuration, no secret), so that an operator trying out a sender that does not
    /// publish its format (Jamf's Hash Signature) sees which setting is off.
    pub fn expected(&self, value: Option<&str>) -> Result<Vec<u8>, Failure> {
        let value = value.ok_or_else(|| Failure::Missing(self.header.clone()))?;
        let form = || {
            let prefix = if self.prefix.is_empty() {
                "no prefix".to_string()
            } else {
                format!("the prefix {:?}", self.prefix)
            };
            format!(
                "{prefix}, then the {} {} HMAC",
                self.encoding.name(),
                self.algorithm.name()
            )
        };
        let code = value
            .trim()
            .strip_prefix(self.prefix.as_str())
            .and_then(|code| self.encoding.decode(code))
            .ok_or_else(|| Failure::Form {
                header: self.header.clone(),
                form: form(),
            })?;
        // The length of what was sent is no secret, and a wrong one names the setting to change: a sha256
        // HMAC against a sha512 profile, or hex read as base64.
        if code.len() != self.algorithm.len() {
            return Err(Failure::Length {
                header: self.header.clone(),
                got: code.len(),
                want: self.algorithm.len(),
                form: form(),
            });
        }
        Ok(code)
    }
}

/// `Authorization: Basic base64(user:password)` against the configured pair; both halves are always
/// compared, so a right user with a wrong password takes as long as anything else.
pub fn basic(authorization: Option<&str>, user: &str, password: &Secret) -> Result<(), Failure> {
    let value = authorization.ok_or_else(|| Failure::Missing("Authorization".into()))?;
    let (scheme, credentials) = value.trim().split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(Failure::Malformed("Authorization".into()));
    }
    let decoded = BASE64
        .decode(credentials.trim())
        .map_err(|_| Failure::Malformed("Authorization".into()))?;
    let colon = decoded
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| Failure::Malformed("Authorization".into()))?;
    let (given_user, given_password) = (&decoded[..colon], &decoded[colon + 1..]);
    let user_ok = Sha256::digest(user.as_bytes()).ct_eq(&Sha256::digest(given_user));
    let password_ok = Sha256::digest(password.bytes()).ct_eq(&Sha256::digest(given_password));
    if bool::from(user_ok & password_ok) {
        Ok(())
    } else {
        Err(Failure::WrongCredentials)
    }
}

/// A header whose value must equal a secret (Jamf's header authentication, GitLab's token).
pub fn token(header: &str, value: Option<&str>, secret: &Secret) -> Result<(), Failure> {
    let value = value.ok_or_else(|| Failure::Missing(header.to_string()))?;
    if secret.matches(value.as_bytes()) {
        Ok(())
    } else {
        Err(Failure::WrongToken(header.to_string()))
    }
}

/// The Standard Webhooks key: the secret's base64 after `whsec_` (the prefix is optional). Never empty: a
/// bare `whsec_` decodes to no bytes, and an HMAC under the empty key is one anybody can compute.
pub fn standard_webhooks_key(secret: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(secret).ok()?.trim();
    BASE64
        .decode(text.strip_prefix("whsec_").unwrap_or(text))
        .ok()
        .filter(|key| !key.is_empty())
}

/// The signatures of a `webhook-signature` header: its space-separated `v1,<base64>` entries (other
/// versions, such as the asymmetric `v1a`, are not ours to check and are skipped).
pub fn standard_webhooks_signatures(value: &str) -> Vec<Vec<u8>> {
    value
        .split(' ')
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|code| BASE64.decode(code).ok())
        .collect()
}

/// A `webhook-timestamp` within `window` seconds of `now`, either way (a malformed one is named so; the
/// caller renames it for Svix's `svix-timestamp`).
pub fn timestamp_within(value: &str, now: i64, window: u64) -> Result<i64, Failure> {
    let sent: i64 = value
        .trim()
        .parse()
        .map_err(|_| Failure::Malformed("webhook-timestamp".into()))?;
    let age = now.saturating_sub(sent);
    if age.unsigned_abs() > window {
        return Err(Failure::OutOfWindow { age, window });
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac_of(algorithm: Algorithm, key: &[u8], parts: &[&[u8]]) -> Mac {
        let mut mac = Mac::new(algorithm, key);
        for part in parts {
            mac.update(part);
        }
        mac
    }

    #[test]
    fn githubs_published_vector_verifies_and_one_flipped_byte_fails() {
        let key = b"It's a Secret to Everybody";
        let header = SignatureHeader::github();
        let good = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let expected = header.expected(Some(good)).expect("well-formed");
        assert!(
            mac_of(Algorithm::Sha256, key, &[b"Hello, World!"])
                .matches_any(std::slice::from_ref(&expected))
        );
        assert!(
            !mac_of(Algorithm::Sha256, key, &[b"Hello, World?"])
                .matches_any(std::slice::from_ref(&expected))
        );
        assert!(
            !mac_of(
                Algorithm::Sha256,
                b"It's a Secret to Everybodz",
                &[b"Hello, World!"]
            )
            .matches_any(std::slice::from_ref(&expected))
        );
        let mut flipped = expected;
        flipped[0] ^= 1;
        assert!(!mac_of(Algorithm::Sha256, key, &[b"Hello, World!"]).matches_any(&[flipped]));
        // Streaming in pieces gives the same code.
        let whole = header.expected(Some(good)).expect("well-formed");
        assert!(
            mac_of(Algorithm::Sha256, key, &[b"Hel", b"lo, ", b"World!"]).matches_any(&[whole])
        );
    }

    #[test]
    fn signature_headers_must_be_present_and_well_formed() {
        let header = SignatureHeader::github();
        assert!(matches!(header.expected(None), Err(Failure::Missing(_))));
        for bad in ["757107ea", "sha1=757107ea", "sha256=zz", "sha256=757"] {
            let failure = header.expected(Some(bad)).expect_err(bad);
            assert!(matches!(failure, Failure::Form { .. }), "{bad}");
            assert_eq!(
                failure.to_string(),
                "X-Hub-Signature-256 header is not in the profile's form (the prefix \"sha256=\", then the \
                 hex sha256 HMAC)"
            );
        }
        // Well-formed, but of another length: what a sha1 code, or a sha512 one, would be.
        let short = header.expected(Some("sha256=757107ea"));
        assert_eq!(
            short.expect_err("4 bytes").to_string(),
            "X-Hub-Signature-256 header holds 4 bytes where the profile's HMAC has 32 (the prefix \
             \"sha256=\", then the hex sha256 HMAC): check algorithm and encoding"
        );
    }

    #[test]
    fn the_generic_scheme_does_sha512_and_base64() {
        let header = SignatureHeader {
            kind: "hmac",
            header: "X-Signature".into(),
            prefix: String::new(),
            encoding: Encoding::Base64,
            algorithm: Algorithm::Sha512,
        };
        // HMAC-SHA512 of "what do ya want for nothing?" keyed "Jefe": RFC 4231 test case 2.
        let code = hex::decode(
            "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea2505549758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737",
        )
        .expect("hex");
        let sent = BASE64.encode(&code);
        let expected = header.expected(Some(&sent)).expect("base64");
        assert!(
            mac_of(
                Algorithm::Sha512,
                b"Jefe",
                &[b"what do ya want for nothing?"]
            )
            .matches_any(&[expected])
        );
        let hex_header = SignatureHeader {
            kind: "hmac",
            encoding: Encoding::Hex,
            prefix: "sha512=".into(),
            ..header
        };
        let expected = hex_header
            .expected(Some(&format!("sha512={}", hex::encode(&code))))
            .expect("hex");
        assert!(
            mac_of(
                Algorithm::Sha512,
                b"Jefe",
                &[b"what do ya want for nothing?"]
            )
            .matches_any(&[expected])
        );
    }

    #[test]
    fn a_standard_webhooks_secret_must_decode_to_a_key() {
        for empty in [&b"whsec_"[..], b"whsec_\n", b"", b"  "] {
            assert_eq!(
                standard_webhooks_key(empty),
                None,
                "{:?}",
                String::from_utf8_lossy(empty)
            );
        }
        assert_eq!(standard_webhooks_key(b"whsec_not base64!"), None);
        assert_eq!(
            standard_webhooks_key(b"whsec_MDEyMzQ1Njc4OWFiY2RlZg==\n").as_deref(),
            Some(&b"0123456789abcdef"[..])
        );
    }

    #[test]
    fn standard_webhooks_published_vector_verifies() {
        let key = standard_webhooks_key(b"whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").expect("key");
        let id = b"msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
        let timestamp = b"1649367553";
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        let header = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";
        let signatures = standard_webhooks_signatures(header);
        let signed = |id: &[u8], ts: &[u8], body: &[u8]| {
            mac_of(Algorithm::Sha256, &key, &[id, b".", ts, b".", body]).matches_any(&signatures)
        };
        assert!(signed(id, timestamp, body));
        assert!(
            !signed(b"msg_27UH4WbU6Z5A5EzD8u03UvzRbpK", timestamp, body),
            "id flipped"
        );
        assert!(!signed(id, b"1649367554", body), "timestamp flipped");
        assert!(!signed(
            id,
            timestamp,
            br#"{"email":"test@example.com","username":"test_usex"}"#
        ));
        // Several entries, one right, in any order; other versions are skipped.
        let several =
            standard_webhooks_signatures(&format!("v1a,AAAA v1,bm90IGl0 {header} v2,Zm9v"));
        assert_eq!(several.len(), 2);
        assert!(
            mac_of(Algorithm::Sha256, &key, &[id, b".", timestamp, b".", body])
                .matches_any(&several)
        );
        let wrong = standard_webhooks_signatures("v1,bm90IGl0 v1,dGhpcyBuZWl0aGVy");
        assert!(
            !mac_of(Algorithm::Sha256, &key, &[id, b".", timestamp, b".", body])
                .matches_any(&wrong)
        );
    }

    #[test]
    fn timestamps_outside_the_window_fail_both_ways() {
        assert_eq!(timestamp_within("1000", 1000, 300), Ok(1000));
        assert_eq!(timestamp_within("700", 1000, 300), Ok(700));
        assert_eq!(timestamp_within("1300", 1000, 300), Ok(1300));
        assert_eq!(
            timestamp_within("699", 1000, 300),
            Err(Failure::OutOfWindow {
                age: 301,
                window: 300
            })
        );
        assert_eq!(
            timestamp_within("1412", 1000, 300),
            Err(Failure::OutOfWindow {
                age: -412,
                window: 300
            })
        );
        for bad in ["", "12.5", "abc", "99999999999999999999"] {
            assert!(
                matches!(timestamp_within(bad, 1000, 300), Err(Failure::Malformed(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn basic_credentials() {
        let password = Secret::new(b"s3cret:with:colons".to_vec());
        let header =
            |user: &str, pass: &str| format!("Basic {}", BASE64.encode(format!("{user}:{pass}")));
        assert_eq!(
            basic(
                Some(&header("jamf", "s3cret:with:colons")),
                "jamf",
                &password
            ),
            Ok(())
        );
        assert_eq!(
            basic(
                Some(&header("jamf", "s3cret:with:colon")),
                "jamf",
                &password
            ),
            Err(Failure::WrongCredentials)
        );
        assert_eq!(
            basic(
                Some(&header("Jamf", "s3cret:with:colons")),
                "jamf",
                &password
            ),
            Err(Failure::WrongCredentials)
        );
        assert_eq!(
            basic(
                Some(&header("jamf", "s3cret:with:colons").replace("Basic", "basic")),
                "jamf",
                &password
            ),
            Ok(()),
            "the scheme name is case-insensitive"
        );
        assert!(matches!(
            basic(None, "jamf", &password),
            Err(Failure::Missing(_))
        ));
        for bad in [
            "Bearer abc",
            "Basic !!!",
            &format!("Basic {}", BASE64.encode("nocolon")),
        ] {
            assert!(
                matches!(
                    basic(Some(bad), "jamf", &password),
                    Err(Failure::Malformed(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn tokens_and_secrets() {
        let secret = Secret::new(b"tok".to_vec());
        assert_eq!(token("X-Gitlab-Token", Some("tok"), &secret), Ok(()));
        assert!(matches!(
            token("X-Gitlab-Token", Some("tok "), &secret),
            Err(Failure::WrongToken(_))
        ));
        assert!(matches!(
            token("X-Gitlab-Token", Some(""), &secret),
            Err(Failure::WrongToken(_))
        ));
        assert!(matches!(
            token("X-Gitlab-Token", None, &secret),
            Err(Failure::Missing(_))
        ));
        assert_eq!(format!("{secret:?}"), "Secret(..)");
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn signature_header_parsing_never_panics(value in "\\PC{0,80}") {
            let _ = SignatureHeader::github().expected(Some(&value));
            let _ = standard_webhooks_signatures(&value);
            let _ = timestamp_within(&value, 0, 300);
            let _ = basic(Some(&value), "u", &Secret::new(b"p".to_vec()));
        }

        /// Any profile's form read back: the code as the profile writes it (prefix, then the encoding) is
        /// the code; without the prefix it is the wrong form; a code of another algorithm's length is
        /// refused for its length, naming the form.
        #[test]
        fn every_profiles_form_reads_back_its_code_and_refuses_others(
            sha512 in any::<bool>(),
            base64 in any::<bool>(),
            prefix in "[a-z0-9=]{0,8}",
            seed in prop::collection::vec(any::<u8>(), 64),
        ) {
            let algorithm = if sha512 { Algorithm::Sha512 } else { Algorithm::Sha256 };
            let encoding = if base64 { Encoding::Base64 } else { Encoding::Hex };
            let header = SignatureHeader {
                kind: "hmac",
                header: "X-Sig".into(),
                prefix: prefix.clone(),
                encoding,
                algorithm,
            };
            let code = seed[..algorithm.len()].to_vec();
            let sent = format!("{prefix}{}", encoding.encode(&code));
            prop_assert_eq!(header.expected(Some(&sent)), Ok(code.clone()));
            // Surrounding blanks are no part of a header's value.
            prop_assert_eq!(header.expected(Some(&format!(" {sent}\t"))), Ok(code.clone()));
            if !prefix.is_empty() {
                let bare = encoding.encode(&code);
                // A bare code that happens to start with the prefix is read past it, and is then no code.
                if !bare.starts_with(&prefix) {
                    let is_form = matches!(header.expected(Some(&bare)), Err(Failure::Form { .. }));
                    prop_assert!(is_form);
                }
            }
            let other = if sha512 { 32 } else { 64 };
            let wrong = format!("{prefix}{}", encoding.encode(&seed[..other]));
            let is_length = matches!(
                header.expected(Some(&wrong)),
                Err(Failure::Length { got, want, .. }) if got == other && want == algorithm.len()
            );
            prop_assert!(is_length);
        }

        #[test]
        fn a_signature_made_for_a_body_verifies_only_that_body(
            key in prop::collection::vec(any::<u8>(), 0..80),
            body in prop::collection::vec(any::<u8>(), 0..300),
            flip in any::<prop::sample::Index>(),
        ) {
            let mut mac = Mac::new(Algorithm::Sha256, &key);
            mac.update(&body);
            let Mac::Sha256(inner) = mac else { unreachable!() };
            let code = inner.finalize().into_bytes().to_vec();
            let header = SignatureHeader::github();
            let sent = format!("sha256={}", hex::encode(&code));
            let expected = header.expected(Some(&sent)).expect("ours is well-formed");
            prop_assert!(mac_of(Algorithm::Sha256, &key, &[&body]).matches_any(std::slice::from_ref(&expected)));
            if !body.is_empty() {
                let mut other = body.clone();
                other[flip.index(body.len())] ^= 0x01;
                prop_assert!(!mac_of(Algorithm::Sha256, &key, &[&other]).matches_any(&[expected]));
            }
        }
    }
}
