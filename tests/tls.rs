//! TLS against the real binary: certificates made here (rcgen), clients curl, openssl and rustls.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, Resumption, Tls12ClientSessionValue,
    Tls13ClientSessionValue,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, HandshakeKind, NamedGroup, RootCertStore, StreamOwned,
};

use crate::util::{Env, Response, Server, payload};

/// A certificate authority made for one test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, in PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("ca key");
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).expect("ca cert"),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// An ECDSA P-256 certificate for these subjectAltNames (DNS names or IPs) and this CN.
    fn issue(&self, sans: &[&str], cn: &str) -> Leaf {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("leaf params");
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.issuer.der().clone()).expect("add root");
        roots
    }
}

/// The server's certificate for this machine's loopback names.
fn server_leaf(ca: &Ca) -> Leaf {
    ca.issue(&["localhost", "127.0.0.1"], "hookrunner test")
}

/// Writes the server's certificate and key (and a client CA) into the env, with a `[tls]` table naming them
/// by relative paths. `top` are top-level keys, which TOML wants before the table.
fn tls_env(leaf: &Leaf, client_ca: Option<&Ca>, top: &str) -> Env {
    let env = Env::new();
    fs::write(env.path().join("cert.pem"), &leaf.cert).expect("write cert");
    fs::write(env.path().join("key.pem"), &leaf.key).expect("write key");
    fs::set_permissions(
        env.path().join("key.pem"),
        fs::Permissions::from_mode(0o600),
    )
    .expect("chmod key");
    let mut table = format!("{top}\n[tls]\ncert_file = \"cert.pem\"\nkey_file = \"key.pem\"\n");
    if let Some(ca) = client_ca {
        fs::write(env.path().join("clients.pem"), ca.pem()).expect("write client ca");
        table.push_str("client_ca_file = \"clients.pem\"\n");
    }
    env.config(&table)
}

fn write_ca(env: &Env, name: &str, ca: &Ca) -> String {
    let path = env.path().join(name);
    fs::write(&path, ca.pem()).expect("write ca");
    path.display().to_string()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(trust: &Ca, identity: Option<&Leaf>) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(trust.roots());
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(leaf) => {
            let chain = CertificateDer::pem_slice_iter(leaf.cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("client chain");
            let key = PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).expect("client key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client auth")
        }
    };
    Arc::new(config)
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

fn connect(server: &Server, config: Arc<ClientConfig>) -> Tls {
    let name = ServerName::try_from("localhost").expect("name");
    let conn = ClientConnection::new(config, name).expect("client connection");
    StreamOwned::new(conn, server.connect())
}

/// One keep-alive GET on an open TLS connection.
fn get(tls: &mut Tls, path: &str) -> std::io::Result<Response> {
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())?;
    Response::read(tls)
}

/// curl over TLS, trusting `ca_file`; returns (exit ok, stdout, stderr).
fn curl(server: &Server, ca_file: &str, args: &[&str], path: &str) -> (bool, String, String) {
    let port = server.addr.port();
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert", ca_file, "--resolve"])
        .arg(format!("localhost:{port}:127.0.0.1"))
        .args(args)
        .arg(format!("https://localhost:{port}{path}"))
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn curl_gets_healthz_and_runs_a_script_over_tls() {
    let ca = Ca::new("server CA");
    let env = tls_env(&server_leaf(&ca), None, "");
    let out = env.path().join("body");
    env.script("computer-added.sh", &format!("cp \"$1\" {out:?}"));
    env.routes("ComputerAdded computer-added.sh\n");
    let server = env.serve();
    let ca_file = write_ca(&env, "ca.pem", &ca);

    let (ok, body, err) = curl(&server, &ca_file, &["-w", "%{http_code}"], "/healthz");
    assert!(ok, "curl failed: {err}\n{}", server.log());
    assert!(body.ends_with("200"), "{body}");

    let sample = env.path().join("sample.json");
    let jamf = payload("jamf-json-ComputerAdded.chook.json");
    fs::write(&sample, &jamf).expect("write sample");
    let data = format!("@{}", sample.display());
    let (ok, body, err) = curl(
        &server,
        &ca_file,
        &[
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &data,
        ],
        "/jamf",
    );
    assert!(ok, "curl failed: {err}\n{}", server.log());
    let json: serde_json::Value = serde_json::from_str(&body).expect("json answer");
    assert_eq!(json["event"], "ComputerAdded", "{body}");
    assert_eq!(json["exit_code"], 0, "{body}");
    assert_eq!(fs::read(&out).expect("the script ran"), jamf);

    // Only TLS is spoken: a plain client gets no HTTP answer.
    let mut plain = server.connect();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");
}

#[test]
fn tls_1_1_is_refused_by_the_server() {
    let ca = Ca::new("server CA");
    let env = tls_env(&server_leaf(&ca), None, "");
    let server = env.serve();
    // SECLEVEL=0 lets Debian's OpenSSL offer TLS 1.1 at all: the refusal must be the server's.
    let output = Command::new("openssl")
        .args(["s_client", "-connect"])
        .arg(server.addr.to_string())
        .args(["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"])
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{text}");
    // The server read a TLS 1.1 ClientHello and answered with an alert.
    assert!(text.contains("alert"), "{text}");
    assert!(
        server
            .wait_log("TLS handshake failed", Duration::from_secs(5))
            .is_some(),
        "{}",
        server.log()
    );

    // TLS 1.2 is served.
    let ca_file = write_ca(&env, "ca.pem", &ca);
    let (ok, body, err) = curl(&server, &ca_file, &["--tls-max", "1.2"], "/healthz");
    assert!(ok && body.contains("ok"), "{err}\n{}", server.log());
}

/// The first bytes a real TLS client sends: its ClientHello.
fn client_hello(ca: &Ca) -> Vec<u8> {
    let name = ServerName::try_from("localhost").expect("name");
    let mut conn = ClientConnection::new(client_config(ca, None), name).expect("client");
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).expect("client hello");
    }
    hello
}

/// Reads until the server closes; how long that took, and what it sent.
fn until_closed(mut stream: TcpStream, start: Instant) -> (Duration, Vec<u8>) {
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    (start.elapsed(), got)
}

#[test]
fn stalled_dribbled_and_plain_clients_hold_only_their_own_connection() {
    let ca = Ca::new("server CA");
    // Long enough for the other client's handshake and request on a loaded machine.
    // (And a keep-alive longer than the wait for the stalled ones, for the served client's second request.)
    let env = tls_env(
        &server_leaf(&ca),
        None,
        "header_timeout = \"5s\"\nkeepalive_timeout = \"30s\"",
    );
    let server = env.serve();
    let hello = client_hello(&ca);
    let start = Instant::now();

    // Connects and sends nothing.
    let silent = server.connect();
    // Half a ClientHello, then nothing.
    let mut half = server.connect();
    half.write_all(&hello[..hello.len() / 2]).expect("half");
    // The ClientHello a byte every 200 ms: always sending, never done within the head deadline.
    let mut dribble = server.connect();
    let dribble_reader = dribble.try_clone().expect("clone");
    let dribbler = std::thread::spawn(move || {
        for byte in &hello {
            if dribble.write_all(std::slice::from_ref(byte)).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let watch = |stream: TcpStream| std::thread::spawn(move || until_closed(stream, start));
    let (silent, half, dribbled) = (watch(silent), watch(half), watch(dribble_reader));

    // Meanwhile another client is served at once.
    let mut tls = connect(&server, client_config(&ca, None));
    let response = get(&mut tls, "/healthz").expect("served while the others stall");
    assert_eq!(response.status, 200);
    assert!(
        !silent.is_finished() && !half.is_finished() && !dribbled.is_finished(),
        "stalled clients were closed before header_timeout"
    );

    // Plain HTTP to the TLS port is closed at once with an alert, not an HTTP answer.
    let mut plain = server.connect();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let (took, got) = until_closed(plain, Instant::now());
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(
        !got.is_empty() && got[0] == 0x15,
        "a TLS alert record: {got:?}"
    );

    for (what, watcher) in [("silent", silent), ("half", half), ("dribbled", dribbled)] {
        let (took, _) = watcher.join().expect("watcher");
        assert!(
            took >= Duration::from_millis(4800) && took < Duration::from_secs(15),
            "{what} closed after {took:?}, header_timeout is 5s"
        );
    }
    let _ = dribbler.join();
    // The served client's connection is still good.
    assert_eq!(get(&mut tls, "/healthz").expect("again").status, 200);
}

/// The server certificate a new connection trusting `ca` is served.
fn served_cert(server: &Server, ca: &Ca) -> Result<Vec<u8>, std::io::Error> {
    let mut tls = connect(server, client_config(ca, None));
    get(&mut tls, "/healthz")?;
    let chain = tls.conn.peer_certificates().expect("server chain");
    Ok(chain[0].to_vec())
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("pem")
        .to_vec()
}

#[test]
fn sighup_gives_new_connections_the_new_certificate_and_open_ones_keep_theirs() {
    let old_ca = Ca::new("old CA");
    let old = server_leaf(&old_ca);
    let env = tls_env(&old, None, "keepalive_timeout = \"30s\"");
    let server = env.serve();
    let mut open = connect(&server, client_config(&old_ca, None));
    assert_eq!(get(&mut open, "/healthz").expect("first").status, 200);
    assert_eq!(served_cert(&server, &old_ca).expect("old"), der(&old.cert));

    let new_ca = Ca::new("new CA");
    let new = server_leaf(&new_ca);
    fs::write(env.path().join("cert.pem"), &new.cert).expect("new cert");
    fs::write(env.path().join("key.pem"), &new.key).expect("new key");
    server.signal(libc::SIGHUP);
    assert!(
        server
            .wait_log("reloaded: ", Duration::from_secs(10))
            .is_some(),
        "{}",
        server.log()
    );
    assert!(server.log().contains("reloaded the TLS certificate from"));

    assert_eq!(served_cert(&server, &new_ca).expect("new"), der(&new.cert));
    assert!(
        served_cert(&server, &old_ca).is_err(),
        "a new connection still got the old certificate"
    );
    // The connection opened before the reload goes on, with its old session.
    assert_eq!(get(&mut open, "/healthz").expect("kept alive").status, 200);
}

#[test]
fn a_bad_new_pair_on_sighup_is_logged_and_the_old_one_kept() {
    let ca = Ca::new("server CA");
    let leaf = server_leaf(&ca);
    let env = tls_env(&leaf, None, "");
    let server = env.serve();
    // A key that is not the certificate's.
    let stranger = server_leaf(&ca);
    fs::write(env.path().join("key.pem"), &stranger.key).expect("other key");
    server.signal(libc::SIGHUP);
    let line = server
        .wait_log("reload failed", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{}", server.log()));
    assert!(
        line.contains("ERROR")
            && line.contains("key_file")
            && line.contains("is not the private key"),
        "{line}"
    );
    assert!(
        !server
            .log()
            .contains(stranger.key.lines().nth(1).unwrap_or("-"))
    );
    assert_eq!(
        served_cert(&server, &ca).expect("old pair"),
        der(&leaf.cert)
    );
}

#[test]
fn client_certificates_from_client_ca_name_the_client_and_others_are_refused() {
    let server_ca = Ca::new("server CA");
    let clients = Ca::new("client CA");
    let env = tls_env(&server_leaf(&server_ca), Some(&clients), "");
    let server = env.serve();

    let jamf = clients.issue(&["jamf.example.com"], "not this");
    let mut tls = connect(&server, client_config(&server_ca, Some(&jamf)));
    let response = get(&mut tls, "/healthz").expect("client with a certificate");
    assert_eq!(response.status, 200);
    let line = server
        .wait_log(" GET /healthz ", Duration::from_secs(5))
        .unwrap_or_default();
    assert!(
        line.contains(" tls_client=jamf.example.com status=200"),
        "{line}"
    );

    // Without DNS names, the subject's CN.
    let cn_only = clients.issue(&[], "kazoo-cn");
    let mut tls = connect(&server, client_config(&server_ca, Some(&cn_only)));
    assert_eq!(get(&mut tls, "/healthz").expect("cn only").status, 200);
    assert!(
        server
            .wait_log(" tls_client=kazoo-cn ", Duration::from_secs(5))
            .is_some(),
        "{}",
        server.log()
    );

    // No certificate: served, with no identity.
    let before = server.log().lines().count();
    let mut tls = connect(&server, client_config(&server_ca, None));
    assert_eq!(
        get(&mut tls, "/healthz").expect("no certificate").status,
        200
    );
    assert!(crate::util::wait_until(Duration::from_secs(5), || {
        server.log().lines().count() > before
    }));
    let log = server.log();
    let last = log.lines().nth(before).unwrap_or_default();
    assert!(
        last.contains("/healthz status=200") && !last.contains("tls_client"),
        "{last}"
    );

    // A certificate from another CA: the handshake is refused.
    let stranger = Ca::new("other CA").issue(&["jamf.example.com"], "jamf");
    let mut tls = connect(&server, client_config(&server_ca, Some(&stranger)));
    assert!(
        get(&mut tls, "/healthz").is_err(),
        "served a foreign client certificate"
    );
    assert!(
        server
            .wait_log("TLS handshake failed", Duration::from_secs(5))
            .is_some(),
        "{}",
        server.log()
    );
}

#[test]
fn check_validates_the_tls_files() {
    let ca = Ca::new("server CA");
    let leaf = server_leaf(&ca);
    let env = tls_env(&leaf, Some(&ca), "");
    let output = env.check();
    assert!(output.status.success(), "{output:?}");
    assert!(
        !String::from_utf8_lossy(&output.stderr).contains("expire")
            && !String::from_utf8_lossy(&output.stderr).contains("readable by"),
        "{output:?}"
    );
    // A key others can read is warned about, as a sender's secret file is.
    fs::set_permissions(
        env.path().join("key.pem"),
        fs::Permissions::from_mode(0o640),
    )
    .expect("chmod");
    let output = env.check();
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "[tls] key_file {} is readable by its group (gid ",
            path_text(env.path(), "key.pem")
        )) && stderr.contains(
            "mode 640): right if the daemon reads it through that group, else chmod 600 it"
        ),
        "{stderr}"
    );
    fs::set_permissions(
        env.path().join("key.pem"),
        fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    // An expired certificate still loads (a reload must not stop the daemon), and check says so.
    let expired = {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("leaf params");
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 2);
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &ca.issuer).expect("leaf cert");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    };
    let old = tls_env(&expired, None, "");
    let output = old.check();
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the certificate expired on Thu, 02 Jan 2020"),
        "{stderr}"
    );

    fs::write(env.path().join("key.pem"), server_leaf(&ca).key).expect("other key");
    let output = env.check();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("hookrunner.toml") && stderr.contains("is not the private key"),
        "{stderr}"
    );

    fs::remove_file(env.path().join("clients.pem")).expect("remove ca");
    fs::write(env.path().join("key.pem"), &leaf.key).expect("key back");
    let output = env.check();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("client_ca_file") && stderr.contains(&path_text(env.path(), "clients.pem")),
        "{stderr}"
    );
    // On the line that names the file, not the [tls] line.
    let text = fs::read_to_string(env.config_path()).expect("config");
    let line = 1 + text
        .lines()
        .position(|l| l.starts_with("client_ca_file ="))
        .expect("the key");
    assert!(
        stderr.contains(&format!("hookrunner.toml:{line}: [tls] client_ca_file")),
        "{stderr}"
    );
}

/// `send` reaches a TLS listener: trusting the configuration's own certificate (pinned, whatever names it
/// carries: this one names localhost alone, and is reached at 127.0.0.1), or the CAs of `--cacert`,
/// checked with the URL's host name. A certificate another CA issued, or for another name, is refused,
/// and nothing runs for it.
#[test]
fn send_posts_over_tls_trusting_the_daemons_certificate_or_a_ca() {
    let ca = Ca::new("send ca");
    let env = tls_env(&ca.issue(&["localhost"], "send test"), None, "");
    let runs = env.path().join("runs");
    env.script("ComputerAdded", &format!("echo ran >> {runs:?}"));
    let server = env.serve();
    let port = server.addr.port();
    let send = |args: &[&str]| {
        let out = Command::new(crate::util::BIN)
            .args(["send", "ComputerAdded", "--config"])
            .arg(env.config_path())
            .args(args)
            .output()
            .expect("run send");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let pinned = send(&["--url", &format!("https://127.0.0.1:{port}/")]);
    assert_eq!(pinned.0, Some(0), "{pinned:?}");
    assert!(pinned.1.contains("HTTP 200"), "{pinned:?}");
    let ca_file = write_ca(&env, "ca.pem", &ca);
    let url = format!("https://localhost:{port}/");
    let by_ca = send(&["--cacert", &ca_file, "--url", &url]);
    assert_eq!(by_ca.0, Some(0), "{by_ca:?}");
    assert!(by_ca.1.contains("HTTP 200"), "{by_ca:?}");
    // With --cacert the name is checked: the certificate names localhost, not 127.0.0.1.
    let wrong_name = send(&[
        "--cacert",
        &ca_file,
        "--url",
        &format!("https://127.0.0.1:{port}/"),
    ]);
    assert_eq!(wrong_name.0, Some(1), "{wrong_name:?}");
    assert!(wrong_name.2.contains("certificate"), "{wrong_name:?}");
    let other = write_ca(&env, "other.pem", &Ca::new("another CA"));
    let refused = send(&["--cacert", &other, "--url", &url]);
    assert_eq!(refused.0, Some(1), "{refused:?}");
    assert!(refused.2.contains("certificate"), "{refused:?}");
    // CAs given for a plain URL: refused, rather than sending in the clear what was meant for TLS.
    let plain = send(&[
        "--cacert",
        &ca_file,
        "--url",
        &format!("http://127.0.0.1:{port}/"),
    ]);
    assert_eq!(plain.0, Some(64), "{plain:?}");
    assert!(
        plain.2.contains("--cacert and --cert are for an https URL"),
        "{plain:?}"
    );
    assert_eq!(fs::read_to_string(&runs).expect("runs").lines().count(), 2);
}

/// `send --cert --key` presents a client certificate, as Jamf Pro's Mutual TLS does: an mtls sender admits
/// the one naming its subject; without one, or with a certificate naming another, nothing runs.
#[test]
fn send_presents_a_client_certificate_to_an_mtls_sender() {
    let server_ca = Ca::new("server CA");
    let clients = Ca::new("client CA");
    let env = tls_env(&server_leaf(&server_ca), Some(&clients), "").config(
        "[[sender]]\nname = \"jamf\"\ntype = \"mtls\"\nsubjects = [\"jamf.example.com\"]\n",
    );
    let ran = env.path().join("ran");
    env.script(
        "ComputerAdded",
        &format!("echo \"$HOOKRUNNER_SENDER\" >> {ran:?}"),
    );
    let server = env.serve();
    let write_leaf = |name: &str, leaf: &Leaf| {
        let (cert, key) = (
            env.path().join(format!("{name}.pem")),
            env.path().join(format!("{name}.key")),
        );
        fs::write(&cert, &leaf.cert).expect("cert");
        fs::write(&key, &leaf.key).expect("key");
        (cert.display().to_string(), key.display().to_string())
    };
    let (jamf_cert, jamf_key) = write_leaf("jamf", &clients.issue(&["jamf.example.com"], "jamf"));
    let (evil_cert, evil_key) = write_leaf("evil", &clients.issue(&["evil.example.com"], "evil"));
    let url = format!("https://127.0.0.1:{}/", server.addr.port());
    let send = |extra: &[&str]| {
        let out = Command::new(crate::util::BIN)
            .args([
                "send",
                "ComputerAdded",
                "--sender",
                "jamf",
                "--url",
                &url,
                "--config",
            ])
            .arg(env.config_path())
            .args(extra)
            .output()
            .expect("run send");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let admitted = send(&["--cert", &jamf_cert, "--key", &jamf_key]);
    assert_eq!(admitted.0, Some(0), "{admitted:?}\n{}", server.log());
    assert!(admitted.1.contains("HTTP 200"), "{admitted:?}");
    let refused = send(&["--cert", &evil_cert, "--key", &evil_key]);
    assert_eq!(refused.0, Some(1), "{refused:?}");
    assert!(refused.1.contains("HTTP 401"), "{refused:?}");
    // Without a certificate an mtls profile can only be refused: send says so and sends nothing.
    let unsent = send(&[]);
    assert_eq!(unsent.0, Some(64), "{unsent:?}");
    assert!(
        unsent
            .2
            .contains("sender \"jamf\" is mtls: give --cert FILE --key FILE"),
        "{unsent:?}"
    );
    assert_eq!(fs::read_to_string(&ran).expect("ran"), "jamf\n");
}

#[test]
fn tls_on_a_unix_socket_is_a_config_error() {
    let ca = Ca::new("server CA");
    let env = tls_env(&server_leaf(&ca), None, "");
    let socket = env.path().join("h.sock");
    let mut server = Server::spawn(env.serve_command(&format!("unix:{}", socket.display())));
    let status = server.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(78), "{}", server.log());
    assert!(server.wait_log_complete(Duration::from_secs(5)));
    assert!(
        server.log().contains("needs a HOST:PORT listen address"),
        "{}",
        server.log()
    );
}

fn path_text(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// A self-signed certificate for localhost made by openssl with `newkey`, its key then rewritten by
/// `convert` (an openssl subcommand and its arguments) into another PEM form, if given.
fn openssl_pair(dir: &Path, newkey: &[&str], convert: Option<&[&str]>) -> (String, String) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost", "-newkey"])
        .args(newkey)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("run openssl");
    assert!(status.success(), "openssl req {newkey:?}");
    if let Some(convert) = convert {
        let status = Command::new("openssl")
            .args(convert)
            .arg("-in")
            .arg(&key)
            .arg("-out")
            .arg(&key)
            .stderr(Stdio::null())
            .status()
            .expect("run openssl");
        assert!(status.success(), "openssl {convert:?}");
    }
    let read = |p: &Path| fs::read_to_string(p).expect("read pem");
    (read(&cert), read(&key))
}

/// openssl's `-newkey` arguments, the key's conversion if any, and the PEM form that gives.
type KeyKind = (
    &'static [&'static str],
    Option<&'static [&'static str]>,
    &'static str,
);

#[test]
fn rsa_ecdsa_and_ed25519_keys_in_each_pem_form_are_served() {
    let kinds: [KeyKind; 4] = [
        (
            &["rsa:2048"],
            Some(&["rsa", "-traditional"]),
            "BEGIN RSA PRIVATE KEY",
        ),
        (
            &["ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
            Some(&["ec"]),
            "BEGIN EC PRIVATE KEY",
        ),
        (
            &["ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
            None,
            "BEGIN PRIVATE KEY",
        ),
        (&["ed25519"], None, "BEGIN PRIVATE KEY"),
    ];
    for (newkey, convert, form) in kinds {
        let scratch = tempfile::tempdir().expect("tempdir");
        let (cert, key) = openssl_pair(scratch.path(), newkey, convert);
        assert!(key.contains(form), "{newkey:?}: {key:.40}");
        let env = tls_env(&Leaf { cert, key }, None, "");
        let server = env.serve();
        let ca_file = env.path().join("cert.pem").display().to_string();
        let (ok, body, err) = curl(&server, &ca_file, &[], "/healthz");
        assert!(
            ok && body.contains("ok"),
            "{newkey:?}: {err}\n{}",
            server.log()
        );
    }
}

#[test]
fn past_max_connections_a_tls_connection_is_closed_unanswered() {
    let ca = Ca::new("server CA");
    let env = tls_env(&server_leaf(&ca), None, "max_connections = 1");
    let server = env.serve();
    let mut held = connect(&server, client_config(&ca, None));
    assert_eq!(get(&mut held, "/healthz").expect("first").status, 200);
    // No handshake on the accept loop, so no 503 either: the connection is closed, and that is logged.
    let (took, got) = until_closed(server.connect(), Instant::now());
    assert!(
        got.is_empty() && took < Duration::from_secs(5),
        "{got:?} after {took:?}"
    );
    assert!(
        server
            .wait_log(
                "closed unanswered, TLS (too many open connections)",
                Duration::from_secs(5)
            )
            .is_some(),
        "{}",
        server.log()
    );
    assert_eq!(get(&mut held, "/healthz").expect("held").status, 200);
}

/// One POST on an open TLS connection.
fn post(tls: &mut Tls, path: &str) -> std::io::Result<Response> {
    tls.write_all(
        format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{{}}")
            .as_bytes(),
    )?;
    Response::read(tls)
}

/// A dry run has no TLS client: `check --payload` says the certificate is not checked and goes on to the
/// event and the route, as it does for `allow_ips`, instead of stopping at a refusal.
#[test]
fn check_payload_dry_runs_an_mtls_sender_past_its_certificate() {
    let server_ca = Ca::new("server CA");
    let clients = Ca::new("client CA");
    let env = tls_env(&server_leaf(&server_ca), Some(&clients), "").config(
        "[[sender]]\nname = \"jamf\"\ntype = \"mtls\"\nsubjects = [\"jamf.example.com\"]\n",
    );
    env.script("ComputerAdded", "exit 0");
    let payload = env.path().join("payload.json");
    fs::write(&payload, br#"{"webhook":{"webhookEvent":"ComputerAdded"}}"#).expect("payload");
    let out = Command::new(crate::util::BIN)
        .args(["check", "--config"])
        .arg(env.config_path())
        .arg("--payload")
        .arg(&payload)
        .output()
        .expect("run check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "sender: jamf (mtls on /)",
        "credentials: not checked, a dry run has no TLS client (the daemon admits a certificate from \
         client_ca_file naming jamf.example.com)",
        "event: ComputerAdded",
        "matches: runs",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

#[test]
fn an_mtls_sender_admits_only_a_verified_certificate_naming_one_of_its_subjects() {
    let server_ca = Ca::new("server CA");
    let clients = Ca::new("client CA");
    let env = tls_env(&server_leaf(&server_ca), Some(&clients), "").config(
        "[[sender]]\nname = \"jamf\"\ntype = \"mtls\"\nsubjects = [\"jamf.example.com\", \"*.jamfcloud.com\"]\n",
    );
    let ran = env.path().join("ran");
    env.script("x", &format!("echo \"$HOOKRUNNER_SENDER\" >> {ran:?}"));
    let server = env.serve();
    for (who, names) in [
        ("jamf", &["jamf.example.com"][..]),
        ("cloud", &["acme.jamfcloud.com"]),
    ] {
        let leaf = clients.issue(names, who);
        let mut tls = connect(&server, client_config(&server_ca, Some(&leaf)));
        let response = post(&mut tls, "/hooks/x").expect("answer");
        assert_eq!(response.status, 200, "{who}: {}", response.text());
    }
    assert_eq!(fs::read_to_string(&ran).expect("ran"), "jamf\njamf\n");
    // A certificate from the right CA that names someone else, and none at all.
    let other = clients.issue(&["evil.example.com"], "evil");
    let mut tls = connect(&server, client_config(&server_ca, Some(&other)));
    let response = post(&mut tls, "/hooks/x").expect("answer");
    assert_eq!(response.status, 401, "{}", response.text());
    let mut tls = connect(&server, client_config(&server_ca, None));
    let response = post(&mut tls, "/hooks/x").expect("answer");
    assert_eq!(response.status, 401, "{}", response.text());
    assert_eq!(
        fs::read_to_string(&ran).expect("ran").lines().count(),
        2,
        "nothing else ran"
    );
    for reason in [
        "auth=\"client certificate for evil.example.com is not among the sender's subjects\"",
        "auth=\"no client certificate with a name (none was sent",
    ] {
        assert!(
            server.wait_log(reason, Duration::from_secs(5)).is_some(),
            "{reason}:\n{}",
            server.log()
        );
    }
    // Without client_ca_file nothing asks for a certificate: an mtls sender is a config error.
    let env = tls_env(&server_leaf(&server_ca), None, "").config(
        "[[sender]]\nname = \"jamf\"\ntype = \"mtls\"\nsubjects = [\"jamf.example.com\"]\n",
    );
    let out = env.check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("type mtls needs [tls] with client_ca_file"),
        "{err}"
    );
}

/// An mtls sender reads a certificate's CN only when it has no subjectAltName at all: a CN-only certificate
/// naming one of its subjects is admitted, and named in the log line, but one whose subjectAltName holds
/// only an IP address names no one, whatever its CN says, and is refused without running anything.
#[test]
fn an_mtls_sender_reads_the_cn_only_of_a_certificate_without_subject_alt_names() {
    let server_ca = Ca::new("server CA");
    let clients = Ca::new("client CA");
    let env = tls_env(&server_leaf(&server_ca), Some(&clients), "").config(
        "[[sender]]\nname = \"jamf\"\ntype = \"mtls\"\nsubjects = [\"jamf.example.com\"]\n",
    );
    let ran = env.path().join("ran");
    env.script("x", &format!("echo \"$HOOKRUNNER_SENDER\" >> {ran:?}"));
    let server = env.serve();
    // The request's access line (the one with its status), found by the id the answer carries.
    let line_of = |response: &Response| {
        let id = response.header("X-Request-Id").expect("a request id");
        let find = || {
            server
                .log()
                .lines()
                .find(|l| l.contains(&format!(" {id} ")) && l.contains(" status="))
                .map(str::to_string)
        };
        crate::util::wait_until(Duration::from_secs(10), || find().is_some());
        find().unwrap_or_else(|| panic!("no access line for {id}:\n{}", server.log()))
    };

    let cn_only = clients.issue(&[], "jamf.example.com");
    let mut tls = connect(&server, client_config(&server_ca, Some(&cn_only)));
    let response = post(&mut tls, "/hooks/x").expect("answer");
    assert_eq!(
        response.status,
        200,
        "CN only: {}\n{}",
        response.text(),
        server.log()
    );
    let line = line_of(&response);
    assert!(
        line.contains(" tls_client=jamf.example.com sender=jamf ") && line.contains(" status=200 "),
        "{line}\n{}",
        server.log()
    );
    assert_eq!(
        fs::read_to_string(&ran).unwrap_or_default(),
        "jamf\n",
        "{}",
        server.log()
    );

    // The same CN under a subjectAltName of one IP address: the certificate names no one.
    let ip_san = clients.issue(&["127.0.0.1"], "jamf.example.com");
    let mut tls = connect(&server, client_config(&server_ca, Some(&ip_san)));
    let response = post(&mut tls, "/hooks/x").expect("answer");
    assert_eq!(
        response.status,
        401,
        "IP SAN: {}\n{}",
        response.text(),
        server.log()
    );
    let line = line_of(&response);
    assert!(
        line.contains(
            "auth=\"no client certificate with a name (none was sent, or its subjectAltName has no \
             DNS name)\""
        ) && !line.contains("tls_client"),
        "{line}\n{}",
        server.log()
    );
    assert_eq!(
        fs::read_to_string(&ran).unwrap_or_default(),
        "jamf\n",
        "nothing ran for the IP SAN certificate:\n{}",
        server.log()
    );
}

/// rustls's own client session cache, counting the TLS 1.3 tickets the server sent.
#[derive(Debug)]
struct CountingTickets {
    cache: ClientSessionMemoryCache,
    tickets: AtomicUsize,
}

impl CountingTickets {
    fn count(&self) -> usize {
        self.tickets.load(Ordering::SeqCst)
    }
}

impl ClientSessionStore for CountingTickets {
    fn set_kx_hint(&self, name: ServerName<'static>, group: NamedGroup) {
        self.cache.set_kx_hint(name, group)
    }
    fn kx_hint(&self, name: &ServerName<'_>) -> Option<NamedGroup> {
        self.cache.kx_hint(name)
    }
    fn set_tls12_session(&self, name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.cache.set_tls12_session(name, value)
    }
    fn tls12_session(&self, name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.cache.tls12_session(name)
    }
    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        self.cache.remove_tls12_session(name)
    }
    fn insert_tls13_ticket(&self, name: ServerName<'static>, value: Tls13ClientSessionValue) {
        self.tickets.fetch_add(1, Ordering::SeqCst);
        self.cache.insert_tls13_ticket(name, value)
    }
    fn take_tls13_ticket(&self, name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.cache.take_tls13_ticket(name)
    }
}

#[test]
fn one_ticket_comes_with_the_first_answer_and_the_next_connection_resumes_with_it() {
    let ca = Ca::new("server CA");
    let env = tls_env(&server_leaf(&ca), None, "");
    let server = env.serve();
    let store = Arc::new(CountingTickets {
        cache: ClientSessionMemoryCache::new(8),
        tickets: AtomicUsize::new(0),
    });
    let mut config = (*client_config(&ca, None)).clone();
    config.resumption = Resumption::store(Arc::clone(&store) as Arc<dyn ClientSessionStore>);
    let config = Arc::new(config);

    let mut tls = connect(&server, Arc::clone(&config));
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("handshake");
    }
    assert_eq!(tls.conn.handshake_kind(), Some(HandshakeKind::Full));
    // The client (ring's order) offers AES-256-GCM-SHA384 first; the server's order wins.
    assert_eq!(
        tls.conn.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
    // The client's Finished is sent; the ticket waits for the first answer, so it costs no write of its own.
    tls.sock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let early = tls.sock.read(&mut [0u8; 64]);
    assert!(
        matches!(&early, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "bytes before the first answer: {early:?}"
    );
    tls.sock.set_read_timeout(None).expect("timeout");
    assert_eq!(get(&mut tls, "/healthz").expect("healthz").status, 200);
    // One ticket, not rustls's default two: a client resumes with one, and each costs both sides work.
    assert_eq!(store.count(), 1);
    drop(tls);

    let mut again = connect(&server, config);
    assert_eq!(get(&mut again, "/healthz").expect("healthz").status, 200);
    assert_eq!(again.conn.handshake_kind(), Some(HandshakeKind::Resumed));
    assert_eq!(
        store.count(),
        2,
        "a resumed connection gets the ticket for the next"
    );
}

#[test]
fn a_tls_1_2_client_gets_the_servers_last_flight_and_an_answer() {
    let ca = Ca::new("server CA");
    let env = tls_env(&server_leaf(&ca), None, "");
    let server = env.serve();
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("versions")
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    let mut tls = connect(&server, Arc::new(config));
    // In TLS 1.2 the client waits for the server's Finished: were it held back like a TLS 1.3 ticket,
    // this would wait for the server's header timeout.
    tls.sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    assert_eq!(get(&mut tls, "/healthz").expect("healthz").status, 200);
    assert_eq!(
        tls.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
}

/// What loads but will fail senders is said by check (and at every start and reload): the server's
/// certificate without its intermediate, a chain out of order, a certificate not valid yet. A key that
/// cannot be used is refused with what to do: one encrypted with a passphrase, one of a curve rustls does
/// not sign with. A byte-order mark before the PEM is no obstacle.
#[test]
fn check_tells_a_chain_that_clients_will_refuse_and_keys_it_cannot_use() {
    let root = Ca::new("root CA");
    let intermediate = {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "intermediate CA");
        let key = KeyPair::generate().expect("key");
        Ca {
            issuer: CertifiedIssuer::signed_by(params, key, &root.issuer).expect("intermediate"),
        }
    };
    let leaf = server_leaf(&intermediate);
    let check = |cert: &str, key: &str| {
        let env = tls_env(
            &Leaf {
                cert: cert.to_string(),
                key: key.to_string(),
            },
            None,
            "",
        );
        let out = env.check();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The full chain, after a byte-order mark: clean.
    let full = format!("\u{feff}{}{}", leaf.cert, intermediate.pem());
    let (code, err) = check(&full, &leaf.key);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("warning"), "{err}");
    // The leaf alone.
    let (code, err) = check(&leaf.cert, &leaf.key);
    assert_eq!(code, Some(0), "a warning, not an error: {err}");
    assert!(
        err.contains("it holds the server's certificate alone: if an intermediate CA issued it"),
        "{err}"
    );
    // Root before intermediate.
    let (code, err) = check(
        &format!("{}{}{}", leaf.cert, root.pem(), intermediate.pem()),
        &leaf.key,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("certificate 2 in it did not issue certificate 1 before it"),
        "{err}"
    );
    // Not valid for two more days.
    assert_eq!(
        [civil(0), civil(11_016), civil(20_794)],
        [(1970, 1, 1), (2000, 2, 29), (2026, 12, 7)]
    );
    let later = {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        let soon = std::time::SystemTime::now() + Duration::from_secs(2 * 86_400);
        let days = soon
            .duration_since(std::time::UNIX_EPOCH)
            .expect("epoch")
            .as_secs()
            / 86_400;
        let date = |days| {
            let (y, m, d) = civil(days);
            rcgen::date_time_ymd(y, m, d)
        };
        params.not_before = date(days);
        params.not_after = date(days + 30);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &root.issuer).expect("cert");
        (cert.pem(), key.serialize_pem())
    };
    let (code, err) = check(&format!("{}{}", later.0, root.pem()), &later.1);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("the certificate is not valid until"), "{err}");
    // An encrypted key, and a P-521 key: refused, saying why, without a line of the key.
    let dir = tempfile::tempdir().expect("tempdir");
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-aes-128-cbc",
        "-pass",
        "pass:secret",
        "-out",
        "encrypted.pem",
    ]);
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-521",
        "-out",
        "p521.pem",
    ]);
    let encrypted = fs::read_to_string(dir.path().join("encrypted.pem")).expect("key");
    let (code, err) = check(&full, &encrypted);
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("the key is encrypted with a passphrase") && !err.contains("MII"),
        "{err}"
    );
    let p521 = fs::read_to_string(dir.path().join("p521.pem")).expect("key");
    let (code, err) = check(&full, &p521);
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("a key of a type or size hookrunner cannot use") && !err.contains("MI"),
        "{err}"
    );
}

/// The calendar date (year, month, day) `days` after 1970-01-01: civil from days, the proleptic Gregorian
/// calendar counted in eras of 400 years from March 1st.
fn civil(days: u64) -> (i32, u8, u8) {
    let z = days as i64 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
}

/// The certificate's end of validity is a metric, so an alert can fire long before senders refuse it,
/// and a reload that brings a renewed certificate moves it.
#[test]
fn the_certificates_end_is_a_metric_that_a_reload_moves() {
    let ca = Ca::new("server CA");
    let until = |year: i32| {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("params");
        params.not_after = rcgen::date_time_ymd(year, 1, 1);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &ca.issuer).expect("cert");
        Leaf {
            cert: format!("{}{}", cert.pem(), ca.pem()),
            key: key.serialize_pem(),
        }
    };
    let env = tls_env(&until(2030), None, "metrics_listen = \"127.0.0.1:0\"");
    let server = env.serve();
    let addr = crate::tools::metrics_addr(&server);
    let expiry = || {
        crate::tools::scrape(&addr)
            .lines()
            .find_map(|l| {
                l.strip_prefix("hookrunner_tls_certificate_expiry_timestamp_seconds ")
                    .map(str::to_string)
            })
            .unwrap_or_else(|| panic!("no expiry gauge"))
    };
    assert_eq!(expiry(), "1893456000", "2030-01-01");
    crate::tools::promtool_accepts(&env, &crate::tools::scrape(&addr));
    let renewed = until(2031);
    fs::write(env.path().join("cert.pem"), &renewed.cert).expect("cert");
    fs::write(env.path().join("key.pem"), &renewed.key).expect("key");
    server.signal(libc::SIGHUP);
    // "reloaded: " ends a reload, once the new configuration is in place.
    assert!(
        server
            .wait_log("reloaded: ", Duration::from_secs(10))
            .is_some()
            && server.log().contains("reloaded the TLS certificate"),
        "{}",
        server.log()
    );
    assert_eq!(expiry(), "1924992000", "2031-01-01");
}

/// A key the daemon reads through its group (root's, as certbot keeps them, in the daemon's group) is
/// not warned of for that; one others can read is, with the mode that is enough.
#[test]
fn a_key_read_through_the_daemons_group_is_not_warned_of() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root, to give the key another owner");
        return;
    }
    let ca = Ca::new("server CA");
    let env = tls_env(&server_leaf(&ca), None, "");
    let key = env.path().join("key.pem");
    // Owned by nobody, in this process's group (root's 0): the daemon (root here) reads it as a group
    // member would.
    std::os::unix::fs::chown(&key, Some(65534), Some(0)).expect("chown");
    for (mode, warned) in [
        (0o640, None),
        (0o644, Some("readable by others (mode 644): chmod o-rwx it")),
    ] {
        fs::set_permissions(&key, fs::Permissions::from_mode(mode)).expect("chmod");
        let out = env.check();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        match warned {
            None => assert!(!err.contains("key_file"), "{mode:o}: {err}"),
            Some(says) => assert!(err.contains(says), "{mode:o}: {err}"),
        }
    }
    // Its own key, readable by its group: the group needs nothing of it.
    std::os::unix::fs::chown(&key, Some(0), Some(0)).expect("chown");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).expect("chmod");
    let out = env.check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("readable by its group (gid 0, mode 640): right if the daemon reads it"),
        "{err}"
    );
}
