//! TLS as one more kind of [`Stream`](super::listener::Stream): rustls driven by hand over a TCP socket.
//!
//! rustls's own `StreamOwned` reads in a loop until it has plaintext, so a client dribbling handshake bytes
//! would keep one read alive past any deadline. Here each read does at most one socket read, and when that
//! brought no plaintext it returns `Interrupted`: `Conn::fill` retries with the time left before its
//! deadline, so the handshake runs on the connection's worker under the same head deadline as the request,
//! and the accept loop only creates the `ServerConnection`, which does no I/O.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, RwLock};

use rustls::{ServerConfig, ServerConnection};

use crate::logging::{Escaped, RateLimit};

/// The TLS configuration new connections get. A reload replaces it; a connection already open keeps the
/// configuration it was accepted with (its `ServerConnection` holds it).
#[derive(Clone)]
pub struct TlsConfig(Arc<RwLock<Arc<ServerConfig>>>);

impl TlsConfig {
    pub fn new(config: Arc<ServerConfig>) -> TlsConfig {
        TlsConfig(Arc::new(RwLock::new(config)))
    }

    pub fn replace(&self, config: Arc<ServerConfig>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = config;
    }

    fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Starts the server side of a TLS session on an accepted socket. No I/O happens here: the handshake is
    /// read and written by the connection's worker.
    pub(super) fn accept(&self, sock: TcpStream, remote: &str) -> io::Result<TlsStream> {
        let tls = ServerConnection::new(self.current()).map_err(io::Error::other)?;
        Ok(TlsStream {
            tls,
            sock,
            remote: remote.to_string(),
            client_names: None,
        })
    }
}

/// Failed handshakes and broken sessions are the client's fault and can come in floods: one line a second.
static FAILURES: LazyLock<Mutex<RateLimit>> =
    LazyLock::new(|| Mutex::new(RateLimit::new(log::Level::Info)));

pub(super) struct TlsStream {
    tls: ServerConnection,
    sock: TcpStream,
    remote: String,
    /// Set once the handshake is done.
    client_names: Option<Vec<String>>,
}

impl TlsStream {
    pub(super) fn sock(&self) -> &TcpStream {
        &self.sock
    }

    /// The names of the client's verified certificate (see [`crate::tls::client_names`]); empty when it sent
    /// none, or while the handshake is not done.
    pub(super) fn client_names(&self) -> &[String] {
        self.client_names.as_deref().unwrap_or_default()
    }

    /// Sends the close_notify alert, then shuts the socket's write side.
    pub(super) fn shutdown_write(&mut self) {
        self.tls.send_close_notify();
        let _ = self.flush_tls();
        let _ = self.sock.shutdown(Shutdown::Write);
    }

    /// Writes everything rustls has to send (handshake messages, alerts, records) to the socket, which has
    /// the connection's write timeout.
    fn flush_tls(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Plaintext rustls already holds: `None` when it has none yet.
    fn plaintext(&mut self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        match self.tls.reader().read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            // The client closed the socket without close_notify: to us that is an end like any other.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Some(Ok(0)),
            other => Some(other),
        }
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(result) = self.plaintext(buf) {
            return result;
        }
        if self.tls.read_tls(&mut self.sock)? == 0 {
            return Ok(0);
        }
        let was_handshaking = self.tls.is_handshaking();
        let processed = self.tls.process_new_packets();
        // During the handshake the client waits for what rustls queued: it is written now, and so is the
        // alert after an error (rustls has queued the one that tells the client why). What a TLS 1.3
        // handshake queues as it ends (on the client's Finished) is the session ticket, and after the
        // handshake only what no client waits for (a key update's answer): those go out in the write of
        // the next answer, rather than costing a write here and a wake-up and a read on the client.
        // TLS 1.2's last flight, the server's Finished, is waited for.
        let waited_for = was_handshaking
            && (self.tls.is_handshaking()
                || self.tls.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3));
        let flushed = if processed.is_err() || waited_for {
            self.flush_tls()
        } else {
            Ok(())
        };
        if let Err(e) = processed {
            let what = if self.tls.is_handshaking() {
                "TLS handshake failed"
            } else {
                "TLS session failed"
            };
            FAILURES
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .log(&format!(
                    "{} {what}: {}; closed",
                    self.remote,
                    Escaped(&e.to_string())
                ));
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        flushed?;
        if self.client_names.is_none() && !self.tls.is_handshaking() {
            self.client_names = Some(
                self.tls
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(|cert| crate::tls::client_names(cert))
                    .unwrap_or_default(),
            );
        }
        // One socket read per call: with no plaintext yet, the caller retries with its deadline's time left.
        self.plaintext(buf)
            .unwrap_or_else(|| Err(io::ErrorKind::Interrupted.into()))
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.tls.writer().write(buf)?;
        self.flush_tls()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_tls()
    }
}
