//! Whom `hookrunner send` trusts over HTTPS: the CAs of a `--cacert` file, checked as any client checks
//! (the chain, the validity, the URL's host name); or, without one, the daemon's own certificate as its
//! `[tls] cert_file` holds it, pinned. Pinning is what reaching one's own daemon needs: its address
//! (`127.0.0.1:8443`) is rarely a name its certificate carries, and a self-signed certificate made by
//! `openssl req -x509` is marked as a CA, which no chain check accepts as a server's own.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// A client configuration and the name it asks the server for.
#[derive(Debug, Clone)]
pub struct Client {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
}

/// The certificate (with its chain) and key `send` presents when asked, as Jamf Pro's Mutual TLS does.
pub struct Identity<'a> {
    pub cert_file: &'a Path,
    pub key_file: &'a Path,
}

impl Client {
    /// Trusting the CA certificates in `ca_file` (PEM), for a server known as `host` (the URL's, without
    /// its port).
    pub fn with_cas(
        ca_file: &Path,
        host: &str,
        identity: Option<Identity>,
    ) -> Result<Client, String> {
        let mut roots = RootCertStore::empty();
        for cert in crate::tls::certificates("--cacert", ca_file)? {
            roots
                .add(cert)
                .map_err(|e| format!("--cacert {}: {e}", ca_file.display()))?;
        }
        let config = present(builder()?.with_root_certificates(roots), identity)?;
        Ok(Client {
            config: Arc::new(config),
            name: server_name(host)?,
        })
    }

    /// Trusting only the certificate `cert_file` starts with (the daemon's own: see the module's comment).
    pub fn pinned(
        cert_file: &Path,
        host: &str,
        identity: Option<Identity>,
    ) -> Result<Client, String> {
        let chain = crate::tls::certificates("cert_file", cert_file)?;
        let verifier = Pinned {
            cert: chain[0].clone(),
            algorithms: crate::tls::provider().signature_verification_algorithms,
        };
        let builder = builder()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        Ok(Client {
            config: Arc::new(present(builder, identity)?),
            name: server_name(host)?,
        })
    }
}

fn builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, String> {
    ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS: {e}"))
}

/// The configuration, presenting `identity` when there is one.
fn present(
    builder: rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>,
    identity: Option<Identity>,
) -> Result<ClientConfig, String> {
    let Some(identity) = identity else {
        return Ok(builder.with_no_client_auth());
    };
    let chain = crate::tls::certificates("--cert", identity.cert_file)?;
    let key = crate::tls::private_key("--key", identity.key_file)?;
    builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("--cert and --key: {e}"))
}

/// `host` as a URL gives it (`[::1]` for an IPv6 address), as the name to send and check.
fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(bare.to_string())
        .map_err(|e| format!("{host:?} as a TLS server name: {e}"))
}

/// Accepts the server whose certificate is `cert`, byte for byte, and whose handshake is signed by its key.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        signed: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, signed, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        signed: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, signed, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
