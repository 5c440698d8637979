//! The `[tls]` table: a certificate chain, its private key and an optional client CA bundle become one
//! rustls [`ServerConfig`], or an error that names the file and what is wrong with it. It is loaded with the
//! rest of the configuration, so `check` validates the files, and a reload that finds a bad pair keeps the
//! whole previous configuration, certificate included.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// The table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
}

/// A validated `[tls]` table: with it, hookrunner speaks HTTPS only (TLS 1.2 and 1.3) on its TCP listener.
#[derive(Debug, Clone)]
pub struct Tls {
    /// `cert_file`: the server's certificate chain in PEM, its own certificate first, then the intermediates
    /// (certbot's `fullchain.pem`). Re-read on SIGHUP.
    pub cert_file: PathBuf,
    /// `key_file`: the certificate's private key in PEM (PKCS#8, or the older RSA or EC forms); RSA, ECDSA
    /// (P-256, P-384) or Ed25519. Re-read on SIGHUP.
    pub key_file: PathBuf,
    /// `client_ca_file`: optional PEM bundle of the CA certificates that may issue client certificates. With
    /// it, hookrunner asks each client for a certificate and refuses the handshake of a client whose
    /// certificate does not verify against these CAs; a client that sends none is still served, without a
    /// client identity (a `mtls` sender then refuses it). Re-read on SIGHUP.
    pub client_ca_file: Option<PathBuf>,
    /// The rustls configuration built from the three files.
    pub server: Arc<ServerConfig>,
    /// When the server's own certificate (the first in `cert_file`) becomes valid and stops being valid,
    /// in seconds since the epoch; `None` if it cannot be read.
    pub valid: Option<(i64, i64)>,
    /// What is wrong with the chain that still lets it load: a certificate that does not issue the one
    /// before it, or the server's certificate alone where it needs an intermediate.
    pub chain_warning: Option<String>,
}

/// How long before a certificate's end its warnings start: two weeks, time enough to mend a renewal.
pub const EXPIRY_NOTICE: i64 = 14 * 86_400;

impl Tls {
    /// [`Tls::expiry_warning`] against the clock and [`EXPIRY_NOTICE`].
    pub fn expiry_warning_now(&self) -> Option<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.expiry_warning(now, EXPIRY_NOTICE)
    }

    /// A warning when group or others can read `key_file`, as for a sender's secret file: with the key,
    /// anyone can pose as this server or read what senders send it.
    /// Read through its group is how a daemon that does not own the key reads one root keeps (certbot's
    /// are root's): not warned of when the group is one of this daemon's and the file not its own.
    pub fn key_warning(&self) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&self.key_file).ok()?;
        let mode = meta.mode();
        let through_our_group =
            meta.uid() != rustix::process::geteuid().as_raw() && in_our_groups(meta.gid());
        if mode & 0o007 != 0 {
            return Some(format!(
                "[tls] key_file {} is readable by others (mode {:o}): chmod o-rwx it",
                self.key_file.display(),
                mode & 0o777
            ));
        }
        // Group access to a key this user owns: right when the daemon is another user who reads it
        // through that group (root's certbot key, chgrp'd to the daemon's group), as `check` run by root
        // sees it; else one user too many.
        (!through_our_group && mode & 0o070 != 0).then(|| {
            format!(
                "[tls] key_file {} is readable by its group (gid {}, mode {:o}): right if the daemon \
                 reads it through that group, else chmod 600 it",
                self.key_file.display(),
                meta.gid(),
                mode & 0o777
            )
        })
    }

    /// A warning when the server's certificate has expired or expires within `soon` of `now` (seconds
    /// since the epoch): senders refuse an expired one, and a renewal that stopped working shows here first.
    /// Also when it is not valid yet (a clock behind, or a certificate issued for later).
    pub fn expiry_warning(&self, now: i64, soon: i64) -> Option<String> {
        let (start, end) = self.valid?;
        let date = |t: i64| {
            httpdate::fmt_http_date(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64),
            )
        };
        if start > now {
            Some(format!(
                "[tls] cert_file {}: the certificate is not valid until {}; senders will refuse it \
                 until then",
                self.cert_file.display(),
                date(start)
            ))
        } else if end <= now {
            Some(format!(
                "[tls] cert_file {}: the certificate expired on {}; senders will refuse it",
                self.cert_file.display(),
                date(end)
            ))
        } else if end - now <= soon {
            let left = end - now;
            let left = if left < 86_400 {
                format!("in {} hour(s)", (left + 3_599) / 3_600)
            } else {
                format!("in {} day(s)", (left + 86_399) / 86_400)
            };
            Some(format!(
                "[tls] cert_file {}: the certificate expires on {}, {left}: is its renewal working?",
                self.cert_file.display(),
                date(end)
            ))
        } else {
            None
        }
    }
}

impl RawTls {
    /// Reads and checks the files (relative paths already resolved by `relative`), and builds the server
    /// configuration. The error names the key (`cert_file`, ...), the file, and what is wrong.
    pub fn load(self, relative: impl Fn(PathBuf) -> PathBuf) -> Result<Tls, String> {
        let cert_file = relative(self.cert_file);
        let key_file = relative(self.key_file);
        let client_ca_file = self.client_ca_file.map(relative);
        // Read once: what is served is what the warnings are about, even if certbot swaps the files.
        let chain = certificates("cert_file", &cert_file)?;
        let valid = x509_parser::parse_x509_certificate(&chain[0])
            .ok()
            .map(|(_, cert)| {
                let v = cert.validity();
                (v.not_before.timestamp(), v.not_after.timestamp())
            });
        let chain_warning =
            chain_warning(&chain).map(|w| format!("[tls] cert_file {}: {w}", cert_file.display()));
        let server = server_config(chain, &cert_file, &key_file, client_ca_file.as_deref())?;
        Ok(Tls {
            cert_file,
            key_file,
            client_ca_file,
            server: Arc::new(server),
            valid,
            chain_warning,
        })
    }
}

/// ring, not aws-lc-rs: ring builds with the C compiler alone, aws-lc-rs also needs cmake (see Cargo.toml).
/// ring's suites, with TLS_AES_128_GCM_SHA256 first: see `ignore_client_order` below.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // A stable sort: the other suites keep ring's order.
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// Whether a group id is this process's effective or one of its supplementary groups.
fn in_our_groups(gid: u32) -> bool {
    gid == rustix::process::getegid().as_raw()
        || rustix::process::getgroups().is_ok_and(|groups| groups.iter().any(|g| g.as_raw() == gid))
}

/// What is wrong with a chain that loads all the same. Each certificate after the first must have issued the
/// one before it (RFC 8446, 4.4.2); the server's own alone, issued by another, leaves a client to find
/// the intermediate itself, which Java (so Jamf Pro) does not.
fn chain_warning(chain: &[CertificateDer<'_>]) -> Option<String> {
    let parsed: Vec<_> = chain
        .iter()
        .map(|der| {
            x509_parser::parse_x509_certificate(der)
                .ok()
                .map(|(_, c)| c)
        })
        .collect::<Option<_>>()?;
    if let [only] = &parsed[..] {
        if only.issuer() != only.subject() {
            return Some(
                "it holds the server's certificate alone: if an intermediate CA issued it (as public CAs \
                 do), clients that do not fetch the intermediate themselves (Java's, so Jamf Pro's) will \
                 refuse the connection; give the full chain (certbot's fullchain.pem). (Issued by a root \
                 the senders trust, it needs none.)"
                    .to_string(),
            );
        }
    }
    parsed.windows(2).enumerate().find_map(|(i, pair)| {
        (pair[0].issuer() != pair[1].subject()).then(|| {
            format!(
                "certificate {} in it did not issue certificate {} before it: each certificate must be \
                 followed by its issuer (certbot's fullchain.pem is in that order)",
                i + 2,
                i + 1
            )
        })
    })
}

fn server_config(
    chain: Vec<CertificateDer<'static>>,
    cert_file: &Path,
    key_file: &Path,
    client_ca_file: Option<&Path>,
) -> Result<ServerConfig, String> {
    let key = private_key("key_file", key_file)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("[tls]: {e}"))?;
    let builder = match client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates("client_ca_file", path)? {
                roots.add(ca).map_err(|e| {
                    format!(
                        "[tls] client_ca_file {}: a certificate in it: {e}",
                        path.display()
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                // Asked for, not required: a client without one is served with no identity, and a sender
                // profile decides whether that is enough.
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("[tls] client_ca_file {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
        // Either the wrong key, or the right one with the chain in the wrong order: the server's own
        // certificate must come first (certbot's fullchain.pem is in that order).
        rustls::Error::InconsistentKeys(_) => format!(
            "[tls] key_file {} is not the private key of the certificate in cert_file {}: the first \
             certificate in the file must be the server's own, then its chain",
            key_file.display(),
            cert_file.display()
        ),
        // A key that is PEM and DER, but of a type or size rustls does not sign with.
        rustls::Error::General(message) if message.contains("failed to parse private key") => format!(
            "[tls] key_file {}: a key of a type or size hookrunner cannot use: RSA (2048 bits or \
             more), ECDSA on P-256 or P-384, or Ed25519",
            key_file.display()
        ),
        e => format!(
            "[tls] cert_file {} with key_file {}: {e}",
            cert_file.display(),
            key_file.display()
        ),
    })?;
    // We speak HTTP/1.1 only; saying so lets a client that offers h2 first settle on HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Our order, not the client's: OpenSSL and most clients put AES-256-GCM-SHA384 first, whose key
    // schedule hashes with SHA-384, which has no CPU instructions where SHA-256 has (SHA-NI). A new
    // connection's handshake costs this server about 6 % fewer instructions with AES-128-GCM-SHA256,
    // and the client less too. It is the suite every TLS 1.3 peer must implement (RFC 8446, 9.1); AES-256
    // and ChaCha20 stay offered to clients that support nothing else.
    config.ignore_client_order = true;
    // Resumption stays rustls's default: tickets are ids into a per-configuration in-memory cache of 256
    // sessions, each usable once, so no ticket key exists to rotate or leak, and a reload (a new
    // configuration) forgets them with the old certificate. A resumed handshake skips the certificate and
    // its signature on both sides. One ticket per connection, not the default two: a client that
    // reconnects uses one (and gets the next one then); a second costs both sides a message and a cache
    // entry for nothing.
    config.send_tls13_tickets = 1;
    Ok(config)
}

/// Every certificate in a PEM file, in order; at least one.
pub(crate) fn certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let text = read(key, path)?;
    let chain = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_pem(key, path, &e))?;
    if chain.is_empty() {
        return Err(format!(
            "[tls] {key} {}: no certificate in it (a PEM \"BEGIN CERTIFICATE\" section)",
            path.display()
        ));
    }
    Ok(chain)
}

/// The private key in a PEM file; `key` names it in errors (`key_file`, or `send`'s `--key`).
pub(crate) fn private_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let text = read(key, path)?;
    // PKCS#8's "BEGIN ENCRYPTED PRIVATE KEY", or the older forms' "Proc-Type: 4,ENCRYPTED" header.
    let encrypted = |needle: &[u8]| text.windows(needle.len()).any(|w| w == needle);
    if encrypted(b"BEGIN ENCRYPTED PRIVATE KEY") || encrypted(b"Proc-Type: 4,ENCRYPTED") {
        return Err(format!(
            "[tls] {key} {}: the key is encrypted with a passphrase, which a daemon has no one to ask \
             for: keep it decrypted, readable by the daemon alone (openssl pkey -in KEY -out NEW)",
            path.display()
        ));
    }
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| match e {
        pem::Error::NoItemsFound => format!(
            "[tls] {key} {}: no private key in it (a PEM \"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE \
             KEY\" or \"BEGIN EC PRIVATE KEY\" section)",
            path.display()
        ),
        e => not_pem(key, path, &e),
    })
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, String> {
    let mut text =
        fs::read(path).map_err(|e| format!("[tls] {key} {}: cannot read: {e}", path.display()))?;
    // A byte-order mark, as some Windows editors write (OpenSSL skips it too).
    if text.starts_with(b"\xef\xbb\xbf") {
        text.drain(..3);
    }
    Ok(text)
}

/// The PEM error's own text may quote a line of the file: never for a key file, whose lines are the secret.
fn not_pem(key: &str, path: &Path, e: &pem::Error) -> String {
    let what = match e {
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line".to_string(),
        pem::Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed".to_string(),
        pem::Error::Base64Decode(_) => "a PEM section is not valid base64".to_string(),
        e => e.to_string(),
    };
    format!("[tls] {key} {}: not PEM: {what}", path.display())
}

/// The names hookrunner knows a client by: the DNS names in its certificate's subjectAltName, or, only when
/// it has no subjectAltName at all, its subject's common name. A certificate whose subjectAltName names it
/// otherwise (a URI, an e-mail address, an IP address) is not known by a CN its holder may have chosen
/// freely (RFC 6125, 6.4.4), and one whose extension does not parse is known by nothing. `der` is a
/// certificate that already verified against `client_ca_file`.
pub fn client_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_string()),
                _ => None,
            })
            .collect(),
        Ok(None) => cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .map(str::to_string)
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(sans: &[&str], cn: Option<&str>) -> (String, String, Vec<u8>) {
        let params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        cert_with(params, cn)
    }

    fn cert_with(
        mut params: rcgen::CertificateParams,
        cn: Option<&str>,
    ) -> (String, String, Vec<u8>) {
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    #[test]
    fn names_are_the_dns_sans_else_the_common_name() {
        let (_, _, der) = cert(&["jamf.example.com", "alt.example.com"], Some("ignored"));
        assert_eq!(client_names(&der), ["jamf.example.com", "alt.example.com"]);
        let (_, _, der) = cert(&[], Some("jamf-cn.example.com"));
        assert_eq!(client_names(&der), ["jamf-cn.example.com"]);
        let (_, _, der) = cert(&[], None);
        assert!(client_names(&der).is_empty());
        assert!(client_names(b"not a certificate").is_empty());
        // A subjectAltName without DNS names (a URI, an e-mail address, an IP address): not its CN.
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![
            rcgen::SanType::URI("spiffe://example.com/jamf".try_into().expect("uri")),
            rcgen::SanType::Rfc822Name("ops@example.com".try_into().expect("mail")),
            rcgen::SanType::IpAddress([192, 0, 2, 1].into()),
        ];
        let (_, _, der) = cert_with(params, Some("jamf.example.com"));
        assert!(client_names(&der).is_empty(), "{:?}", client_names(&der));
    }

    fn load(dir: &Path, cert: &str, key: &str, ca: Option<&str>) -> Result<Tls, String> {
        RawTls {
            cert_file: cert.into(),
            key_file: key.into(),
            client_ca_file: ca.map(PathBuf::from),
        }
        .load(|p| dir.join(p))
    }

    #[test]
    fn each_file_problem_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let (cert_pem, key_pem, _) = cert(&["localhost"], None);
        let (other_cert, _, _) = cert(&["other"], None);
        fs::write(d.join("cert.pem"), &cert_pem).expect("write");
        fs::write(d.join("key.pem"), &key_pem).expect("write");
        fs::write(d.join("other.pem"), &other_cert).expect("write");
        fs::write(d.join("junk"), "hello\n").expect("write");
        fs::write(
            d.join("broken.pem"),
            "-----BEGIN PRIVATE KEY-----\nsecretsecret\n",
        )
        .expect("write");

        let tls = load(d, "cert.pem", "key.pem", Some("other.pem")).expect("a good pair loads");
        assert_eq!(tls.cert_file, d.join("cert.pem"));
        assert_eq!(tls.client_ca_file, Some(d.join("other.pem")));

        let cases = [
            (("missing.pem", "key.pem", None), "cert_file", "cannot read"),
            (("cert.pem", "missing.pem", None), "key_file", "cannot read"),
            (
                ("junk", "key.pem", None),
                "cert_file",
                "no certificate in it",
            ),
            (
                ("cert.pem", "junk", None),
                "key_file",
                "no private key in it",
            ),
            // A certificate is not a key.
            (("cert.pem", "cert.pem", None), "key_file", "no private key"),
            (("key.pem", "key.pem", None), "cert_file", "no certificate"),
            (("cert.pem", "broken.pem", None), "key_file", "not PEM"),
            (
                ("other.pem", "key.pem", None),
                "is not the private key of the certificate",
                "other.pem",
            ),
            (
                ("other.pem", "key.pem", None),
                "the first certificate in the file must be the server's own",
                "then its chain",
            ),
            (
                ("cert.pem", "key.pem", Some("junk")),
                "client_ca_file",
                "no certificate in it",
            ),
            (
                ("cert.pem", "key.pem", Some("missing.pem")),
                "client_ca_file",
                "cannot read",
            ),
        ];
        for ((c, k, ca), want1, want2) in cases {
            let err = load(d, c, k, ca).err().unwrap_or_default();
            assert!(
                err.contains(want1) && err.contains(want2),
                "{c} {k} {ca:?}: {err}"
            );
            assert!(!err.contains("secretsecret"), "{err}");
        }
    }
}
