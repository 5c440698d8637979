//! A closed-loop HTTP/1.1 load client of the benchmark harness (see bench/README.md), for the TLS
//! comparison with a new connection per request.
//!
//! wrk (OpenSSL 3) spends about 2.4 ms of CPU per TLS connection here, 1 ms of it in system calls: it
//! waits for the handshake by polling for writability, which the socket always has, so it spins. On a
//! 2-CPU machine shared with the server, that client cost, not the server's, bounds the ratio the harness
//! measures. This client does what a sender does and no more: one thread per connection, each sending a
//! POST, reading the whole answer, and (with `--close`) closing and connecting again, over rustls with
//! session resumption (what a sender's TLS library does by default), verifying the server's certificate
//! against `--ca`. Every request's own time is kept (no correction for coordinated omission).
//!
//! Usage: load URL BODY_FILE --connections N --duration SECS [--ca PEM] [--close] [--header "Name: value"]
//!
//! Prints one line `BENCH_JSON {...}` with the fields of bench/wrk/post.lua's, so bench/run reads either.
//! Exits 2 on a usage or set-up error.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

const USAGE: &str = "usage: load URL BODY_FILE --connections N --duration SECS [--ca PEM] [--close] \
                     [--header \"Name: value\"]";
/// An answer not complete within this long counts as a timeout and its connection is dropped.
const TIMEOUT: Duration = Duration::from_secs(10);

struct Args {
    tls: bool,
    host: String,
    port: u16,
    path: String,
    body: Vec<u8>,
    connections: usize,
    duration: Duration,
    ca: Option<String>,
    close: bool,
    header: Option<String>,
}

#[derive(Default)]
struct Errors {
    connect: u64,
    read: u64,
    write: u64,
    timeout: u64,
}

/// What one connection's thread did.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<f64>,
    statuses: BTreeMap<u16, u64>,
    errors: Errors,
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("load: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let tls = if args.tls {
        match client_config(args.ca.as_deref()) {
            Ok(config) => Some(config),
            Err(message) => {
                eprintln!("load: {message}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let request = Arc::new(request(&args));
    let started = Instant::now();
    let deadline = started + args.duration;
    let args = Arc::new(args);
    let threads: Vec<_> = (0..args.connections)
        .map(|_| {
            let (args, request, tls) = (Arc::clone(&args), Arc::clone(&request), tls.clone());
            thread::spawn(move || drive(&args, &request, tls, deadline))
        })
        .collect();
    let tallies: Vec<Tally> = threads
        .into_iter()
        .map(|t| t.join().expect("a load thread panicked"))
        .collect();
    println!("BENCH_JSON {}", summary(&tallies, started.elapsed()));
    ExitCode::SUCCESS
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let url = it.next().ok_or("no URL")?;
    let body_file = it.next().ok_or("no body file")?;
    let (mut connections, mut duration, mut ca, mut close, mut header) =
        (None, None, None, false, None);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--connections" => {
                connections = Some(
                    value()?
                        .parse()
                        .map_err(|e| format!("--connections: {e}"))?,
                )
            }
            "--duration" => {
                duration = Some(
                    value()?
                        .parse::<f64>()
                        .map_err(|e| format!("--duration: {e}"))?,
                )
            }
            "--ca" => ca = Some(value()?),
            "--close" => close = true,
            "--header" => header = Some(value()?).filter(|h: &String| !h.is_empty()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(format!("{url}: not http:// or https://"));
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or(format!("{url}: no port"))?;
    let connections: usize = connections.ok_or("no --connections")?;
    if connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    Ok(Args {
        tls,
        host: host.to_owned(),
        port: port.parse().map_err(|e| format!("{url}: port: {e}"))?,
        path: if path.is_empty() {
            "/".into()
        } else {
            path.to_owned()
        },
        body: std::fs::read(&body_file).map_err(|e| format!("{body_file}: {e}"))?,
        connections,
        duration: Duration::from_secs_f64(duration.ok_or("no --duration")?),
        ca,
        close,
        header,
    })
}

fn client_config(ca: Option<&str>) -> Result<Arc<ClientConfig>, String> {
    let ca = ca.ok_or("an https:// URL needs --ca")?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{ca}: {e}"))? {
        roots
            .add(cert.map_err(|e| format!("{ca}: {e}"))?)
            .map_err(|e| format!("{ca}: {e}"))?;
    }
    // X25519 first, as curl, Java and Go offer it: rustls 0.23.48 puts P-384 first in ring's defaults,
    // which the server follows (it takes the client's order), at four times the key exchange's cost.
    let mut provider = rustls::crypto::ring::default_provider();
    provider.kx_groups = vec![
        rustls::crypto::ring::kx_group::X25519,
        rustls::crypto::ring::kx_group::SECP256R1,
        rustls::crypto::ring::kx_group::SECP384R1,
    ];
    let config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn request(args: &Args) -> Vec<u8> {
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        args.path,
        args.host,
        args.port,
        args.body.len()
    );
    if let Some(header) = &args.header {
        head.push_str(header);
        head.push_str("\r\n");
    }
    if args.close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(&args.body);
    request
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// One connection's loop until `deadline`.
fn drive(args: &Args, request: &[u8], tls: Option<Arc<ClientConfig>>, deadline: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut stream: Option<Box<dyn Stream>> = None;
    let mut buf = vec![0u8; 64 << 10];
    while Instant::now() < deadline {
        let sent = Instant::now();
        let mut conn = match stream.take() {
            Some(conn) => conn,
            None => match connect(args, tls.as_ref()) {
                Ok(conn) => conn,
                Err(_) => {
                    tally.errors.connect += 1;
                    thread::sleep(Duration::from_millis(10));
                    continue;
                }
            },
        };
        if conn.write_all(request).and_then(|()| conn.flush()).is_err() {
            // A TLS session that failed its handshake fails here: not again at once.
            tally.errors.write += 1;
            thread::sleep(Duration::from_millis(10));
            continue;
        }
        match read_answer(&mut conn, &mut buf) {
            Ok((status, keep)) => {
                tally.latencies_us.push(sent.elapsed().as_secs_f64() * 1e6);
                *tally.statuses.entry(status).or_default() += 1;
                if keep && !args.close {
                    stream = Some(conn);
                }
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                tally.errors.timeout += 1
            }
            Err(_) => {
                tally.errors.read += 1;
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
    tally
}

fn connect(args: &Args, tls: Option<&Arc<ClientConfig>>) -> io::Result<Box<dyn Stream>> {
    let addr = (args.host.as_str(), args.port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other("no address"))?;
    let sock = TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(TIMEOUT))?;
    let Some(config) = tls else {
        return Ok(Box::new(sock));
    };
    let name = ServerName::try_from(args.host.clone()).map_err(io::Error::other)?;
    let session = ClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
    Ok(Box::new(StreamOwned::new(session, sock)))
}

/// Reads one answer whole; returns its status and whether the connection may be kept.
fn read_answer(conn: &mut Box<dyn Stream>, buf: &mut [u8]) -> io::Result<(u16, bool)> {
    let mut filled = 0;
    let (head_len, status, length, keep) = loop {
        if filled == buf.len() {
            return Err(io::Error::other("answer head too large"));
        }
        let n = conn.read(&mut buf[filled..])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
        if let Some(end) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).map_err(io::Error::other)?;
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| io::Error::other("no status"))?;
            let mut length = 0;
            let mut keep = true;
            for line in head.split("\r\n").skip(1) {
                let Some((name, value)) = line.split_once(':') else {
                    continue;
                };
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse().map_err(io::Error::other)?;
                } else if name.eq_ignore_ascii_case("connection")
                    && value.eq_ignore_ascii_case("close")
                {
                    keep = false;
                }
            }
            break (end + 4, status, length, keep);
        }
    };
    let mut body = filled - head_len;
    while body < length {
        let room = (length - body).min(buf.len());
        let n = conn.read(&mut buf[..room])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        body += n;
    }
    Ok((status, keep))
}

fn summary(tallies: &[Tally], elapsed: Duration) -> String {
    let mut all: Vec<f64> = tallies
        .iter()
        .flat_map(|t| t.latencies_us.iter().copied())
        .collect();
    all.sort_by(f64::total_cmp);
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    let mut errors = Errors::default();
    for t in tallies {
        for (status, n) in &t.statuses {
            *statuses.entry(*status).or_default() += n;
        }
        errors.connect += t.errors.connect;
        errors.read += t.errors.read;
        errors.write += t.errors.write;
        errors.timeout += t.errors.timeout;
    }
    let at = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        all[((all.len() as f64 * p / 100.0).ceil() as usize).clamp(1, all.len()) - 1]
    };
    let mean = if all.is_empty() {
        0.0
    } else {
        all.iter().sum::<f64>() / all.len() as f64
    };
    let seconds = elapsed.as_secs_f64();
    let latency = format!(
        "\"p50_us\":{:.1},\"p90_us\":{:.1},\"p99_us\":{:.1},\"max_us\":{:.1},\"mean_us\":{mean:.1}",
        at(50.0),
        at(90.0),
        at(99.0),
        all.last().copied().unwrap_or(0.0)
    );
    let raw = if all.is_empty() {
        "null".to_owned()
    } else {
        format!("{{\"count\":{},{latency}}}", all.len())
    };
    let statuses: Vec<String> = statuses
        .iter()
        .map(|(s, n)| format!("\"{s}\":{n}"))
        .collect();
    format!(
        "{{\"requests\":{},\"duration_s\":{seconds:.3},\"rps\":{:.1},{latency},\"errors\":{{\"connect\":{},\
         \"read\":{},\"write\":{},\"status\":0,\"timeout\":{}}},\"statuses\":{{{}}},\"raw\":{raw}}}",
        all.len(),
        all.len() as f64 / seconds,
        errors.connect,
        errors.read,
        errors.write,
        errors.timeout,
        statuses.join(",")
    )
}
