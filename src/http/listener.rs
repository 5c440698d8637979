//! The listening socket and the byte streams it accepts. A transport (TLS) is one more kind of [`Stream`];
//! nothing above this file knows which kind it reads.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use super::tls::{TlsConfig, TlsStream};
use crate::config::Listen;

pub enum Listener {
    Tcp(TcpListener),
    /// The path, and whether the socket file is ours to remove (not when a service manager passed it).
    Unix(UnixListener, PathBuf, bool),
}

impl Listener {
    pub fn bind(listen: &Listen) -> io::Result<Listener> {
        let listener = match listen {
            Listen::Tcp(addr) => Listener::Tcp(TcpListener::bind(addr.as_str())?),
            Listen::Unix(path) => {
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    if UnixStream::connect(path).is_ok() {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!("{} is in use by a running server", path.display()),
                        ));
                    }
                    std::fs::remove_file(path)?;
                }
                let listener = UnixListener::bind(path)?;
                // Connecting takes write permission on the socket file. Whatever the umask (the unit's
                // is 0077), the daemon's group may connect too: a proxy is given access by being put in
                // that group, and the socket's directory decides who else can reach it.
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
                Listener::Unix(listener, path.clone(), true)
            }
        };
        listener.set_nonblocking()?;
        Ok(listener)
    }

    /// A listening socket someone else bound (systemd's socket activation): a stream socket, TCP or unix,
    /// that `listen` was already called on. Anything else is refused rather than half-served.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Listener> {
        use rustix::net::{AddressFamily, SocketType, sockopt};
        let refuse = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
        // What the socket unit passed is the unit's doing (a ListenFIFO= or ListenSpecial= is no socket at
        // all): every such refusal is InvalidInput, which `serve` reports as a configuration error.
        let kind = sockopt::socket_type(&fd)
            .map_err(|e| refuse(&format!("the passed descriptor is not a socket ({e})")))?;
        if kind != SocketType::STREAM {
            return Err(refuse("the passed socket is not a stream socket"));
        }
        if !sockopt::socket_acceptconn(&fd)? {
            return Err(refuse("the passed socket is not listening"));
        }
        let family = rustix::net::getsockname(&fd)?.address_family();
        let listener = if family == AddressFamily::INET || family == AddressFamily::INET6 {
            Listener::Tcp(TcpListener::from(fd))
        } else if family == AddressFamily::UNIX {
            let listener = UnixListener::from(fd);
            let path = listener
                .local_addr()?
                .as_pathname()
                .map_or_else(|| PathBuf::from("(unnamed)"), PathBuf::from);
            // systemd owns the socket file and keeps it across our restarts.
            Listener::Unix(listener, path, false)
        } else {
            return Err(refuse("the passed socket is neither TCP nor unix"));
        };
        listener.set_nonblocking()?;
        Ok(listener)
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l, _, _) => l.set_nonblocking(true),
        }
    }

    /// What is really listening, as a `listen` value: for a socket systemd passed, the configuration's
    /// checks (no unauthenticated serving beyond loopback) apply to this, not to the file's `listen`.
    pub fn bound(&self) -> io::Result<Listen> {
        Ok(match self {
            Listener::Tcp(l) => Listen::Tcp(l.local_addr()?.to_string()),
            Listener::Unix(_, path, _) => Listen::Unix(path.clone()),
        })
    }

    /// The address actually bound, e.g. `127.0.0.1:41234` for `127.0.0.1:0`.
    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| format!("?({e})"), |a| a.to_string()),
            Listener::Unix(_, path, _) => format!("unix:{}", path.display()),
        }
    }

    /// A pending connection and its peer's address (`unix` for a unix socket).
    pub(super) fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, addr) = l.accept()?;
                // One write per response, but keep-alive clients must never wait on Nagle.
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), addr.to_string()))
            }
            Listener::Unix(l, _, _) => {
                let (s, _) = l.accept()?;
                Ok((Stream::Unix(s), "unix".to_string()))
            }
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _, _) => l.as_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path, true) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// One accepted connection's bytes.
pub(super) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// Boxed: a TLS session's state is large, and most streams are not TLS.
    Tls(Box<TlsStream>),
}

impl Stream {
    /// This TCP stream as the server side of a TLS session. No I/O: the worker does the handshake.
    pub(super) fn into_tls(self, config: &TlsConfig, remote: &str) -> io::Result<Stream> {
        match self {
            Stream::Tcp(s) => Ok(Stream::Tls(Box::new(config.accept(s, remote)?))),
            Stream::Unix(_) | Stream::Tls(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "TLS is served on TCP listeners only",
            )),
        }
    }

    pub(super) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tls(s) => s.sock().set_read_timeout(t),
        }
    }

    pub(super) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tls(s) => s.sock().set_write_timeout(t),
        }
    }

    pub(super) fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(on),
            Stream::Unix(s) => s.set_nonblocking(on),
            Stream::Tls(s) => s.sock().set_nonblocking(on),
        }
    }

    pub(super) fn shutdown_write(&mut self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
            Stream::Tls(s) => {
                s.shutdown_write();
                Ok(())
            }
        };
    }

    /// The names the client's verified certificate gives it; empty unless TLS with a client certificate.
    pub(super) fn client_names(&self) -> &[String] {
        match self {
            Stream::Tls(s) => s.client_names(),
            Stream::Tcp(_) | Stream::Unix(_) => &[],
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tls(s) => s.flush(),
            Stream::Tcp(_) | Stream::Unix(_) => Ok(()),
        }
    }
}
