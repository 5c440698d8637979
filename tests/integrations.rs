//! The integration scripts in scripts/integrations, end to end: the real daemon runs each script, the
//! event comes from `hookrunner send` (JSON and XML), and real receivers on loopback capture what the
//! script sent: a small HTTP server standing in for Slack, Teams and the Jamf Pro login page, and
//! aiosmtpd (installed into the build directory on first use) for mail. Each test checks the content.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::util::{BIN, Env, Server, wait_until};

/// Records every POST as a JSON line {path, headers, body} in `requests.jsonl`, and answers GET with a
/// Jamf-like login page whose version is the content of `version.txt`. Prints its port. While a file
/// `fail-PATH` (`fail-slack` for /slack) exists, a POST to PATH is answered 500 and not recorded.
const HTTP_RECEIVER: &str = r#"
import http.server, json, os, sys
dir = sys.argv[1]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        if os.path.exists(os.path.join(dir, "fail-" + self.path.strip("/"))):
            self.send_response(500); self.send_header("Content-Length", "0"); self.end_headers()
            return
        with open(os.path.join(dir, "requests.jsonl"), "a") as f:
            f.write(json.dumps({"path": self.path, "headers": dict(self.headers), "body": body}) + "\n")
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def do_GET(self):
        version = open(os.path.join(dir, "version.txt")).read().strip()
        page = f'<!DOCTYPE html><html><head><meta name="version" content="{version}-t1723456789"><title>Jamf Pro Login</title></head><body></body></html>'.encode()
        self.send_response(200); self.send_header("Content-Length", str(len(page))); self.end_headers(); self.wfile.write(page)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// An aiosmtpd server writing each message to `mail-N.json` as {from, to, data, login, password}. Prints
/// its port. Given a certificate and key, it requires STARTTLS before it takes a message. It refuses the
/// recipients whose address starts with `refused`, as a relay refuses outside domains, and takes any
/// AUTH login, keeping the credentials it was given.
const SMTP_RECEIVER: &str = r#"
import json, os, socket, sys, time
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
dir = sys.argv[1]
credentials = {}
def authenticator(server, session, envelope, mechanism, auth_data):
    credentials["login"] = auth_data.login.decode("utf-8", "backslashreplace")
    credentials["password"] = auth_data.password.decode("utf-8", "backslashreplace")
    return AuthResult(success=True)
class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("refused"):
            return "550 relay access denied"
        envelope.rcpt_tos.append(address)
        return "250 OK"
    async def handle_DATA(self, server, session, envelope):
        n = len([f for f in os.listdir(dir) if f.startswith("mail-")])
        with open(os.path.join(dir, f"mail-{n}.json.tmp"), "w") as f:
            json.dump({"from": envelope.mail_from, "to": envelope.rcpt_tos, "data": envelope.content.decode(), **credentials}, f)
        os.rename(os.path.join(dir, f"mail-{n}.json.tmp"), os.path.join(dir, f"mail-{n}.json"))
        return "250 OK"
tls = {}
if len(sys.argv) > 3:
    import ssl
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(sys.argv[2], sys.argv[3])
    tls = {"tls_context": context, "require_starttls": True}
# A free port, probed and let go: another test's daemon may take it first, so a few tries.
for attempt in range(5):
    probe = socket.socket(); probe.bind(("127.0.0.1", 0)); port = probe.getsockname()[1]; probe.close()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port, authenticator=authenticator,
                            auth_require_tls=bool(tls), **tls)
    try:
        controller.start()
        break
    except OSError:
        if attempt == 4:
            raise
print(port, flush=True)
while True:
    time.sleep(3600)
"#;

/// A receiver process, killed on drop.
struct Receiver {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Receiver {
    fn start(script: &str, dir: &Path, python_path: Option<&Path>) -> Receiver {
        Receiver::start_with(script, dir, python_path, &[])
    }

    fn start_with(
        script: &str,
        dir: &Path,
        python_path: Option<&Path>,
        args: &[&Path],
    ) -> Receiver {
        fs::create_dir_all(dir).expect("receiver dir");
        let mut command = Command::new("python3");
        command
            .args(["-c", script])
            .arg(dir)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(path) = python_path {
            command.env("PYTHONPATH", path);
        }
        let mut child = command.spawn().expect("start python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("receiver port");
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("receiver said {line:?}"));
        Receiver {
            child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The requests received so far, as {path, headers, body}.
    fn requests(&self) -> Vec<Value> {
        fs::read_to_string(self.dir.join("requests.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("request line"))
            .collect()
    }

    /// The bodies POSTed to `path`, each parsed as JSON (which checks the script wrote valid JSON).
    fn posted(&self, path: &str) -> Vec<Value> {
        self.requests()
            .iter()
            .filter(|r| r["path"] == path)
            .map(|r| {
                let body = r["body"].as_str().expect("body");
                serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
            })
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// aiosmtpd, installed once per build directory (as `util::signers` installs the signing libraries).
fn aiosmtpd() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("aiosmtpd");
        crate::util::pip_install(&dir, "aiosmtpd");
        dir
    })
}

/// An env whose scripts dir holds a copy of scripts/integrations and an integrations.env with `settings`,
/// and whose routes are `routes`.
fn integrations_env(settings: &str, routes: &str) -> Env {
    let env = Env::new();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/integrations");
    let target = env.scripts().join("integrations");
    fs::create_dir(&target).expect("integrations dir");
    for entry in fs::read_dir(&source).expect("scripts/integrations") {
        let entry = entry.expect("entry");
        let to = target.join(entry.file_name());
        fs::copy(entry.path(), &to).expect("copy script");
        let executable = entry.metadata().expect("metadata").permissions().mode() & 0o111 != 0;
        let mode = if executable { 0o755 } else { 0o644 };
        fs::set_permissions(&to, fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let state = env.path().join("state");
    fs::write(
        target.join("integrations.env"),
        format!("STATE_DIR={state:?}\n{settings}\n"),
    )
    .expect("integrations.env");
    env.routes(routes);
    env
}

fn send(server: &Server, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("send")
        .args(args)
        .args(["--url", &format!("http://{}/", server.addr)])
        .output()
        .expect("run send");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "send {args:?}: {text}{}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    text
}

/// `hookrunner send EVENT` where the script fails: the sender is answered 500.
fn send_failing(server: &Server, event: &str) {
    let out = Command::new(BIN)
        .args(["send", event, "--url", &format!("http://{}/", server.addr)])
        .output()
        .expect("run send");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("HTTP 500"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn request_id(send_output: &str) -> String {
    send_output
        .split("request_id=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("request id")
        .to_string()
}

#[test]
fn the_scripts_are_shellcheck_clean() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    let out = Command::new("shellcheck")
        .args(["-x", "-s", "sh"])
        .args(
            [
                "integrations/lib.sh",
                "integrations/integrations.env.example",
                "integrations/enrollment-mail",
                "integrations/jamf-version",
                "integrations/patch-notify",
                "integrations/api-audit",
                "integrations/notify",
                "integrations/archive",
                "ComputerAdded",
                "log-event",
            ]
            .map(|f| dir.join(f)),
        )
        .output()
        .expect("shellcheck (Debian package shellcheck; .ci/run installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn notify_posts_a_card_per_event_to_slack_and_teams() {
    let dir = tempfile::tempdir().expect("tempdir");
    let chat = Receiver::start(HTTP_RECEIVER, &dir.path().join("chat"), None);
    let env = integrations_env(
        &format!(
            "SLACK_WEBHOOK_URL={:?}\nTEAMS_WEBHOOK_URL={:?}\nJAMF_URL=\"https://jamf.example.org:8443/\"",
            chat.url("/slack"),
            chat.url("/teams")
        ),
        "* integrations/notify\n",
    );
    let server = env.serve();
    let set = [
        "--set",
        "/event/serialNumber=C02TESTSERIAL",
        "--set",
        "/event/jssID=417",
        "--set",
        "/event/deviceName=Ada's <Mac> \"Air\"",
    ];
    for format in ["json", "xml"] {
        send(
            &server,
            &[&["ComputerAdded", "--format", format][..], &set].concat(),
        );
    }
    send(
        &server,
        &[
            "MobileDeviceUnEnrolled",
            "--format",
            "xml",
            "--set",
            "/event/jssID=86",
        ],
    );
    let slack = chat.posted("/slack");
    let teams = chat.posted("/teams");
    assert_eq!((slack.len(), teams.len()), (3, 3), "{slack:?}");
    for message in &slack[..2] {
        let card = &message["attachments"][0];
        assert_eq!(card["title"], "Computer: Added");
        assert_eq!(card["color"], "#2f80ed");
        assert_eq!(
            card["title_link"],
            "https://jamf.example.org:8443/computers.html?id=417"
        );
        let field = |name: &str| {
            card["fields"]
                .as_array()
                .expect("fields")
                .iter()
                .find(|f| f["title"] == name)
                .map(|f| f["value"].clone())
        };
        assert_eq!(field("Serial number"), Some("C02TESTSERIAL".into()));
        // As Slack shows it literally: its own markup (<!channel>, <url|text>) is escaped.
        assert_eq!(field("Name"), Some("Ada's &lt;Mac&gt; \"Air\"".into()));
        assert_eq!(field("User"), Some("ada.lovelace".into()));
        assert_eq!(field("ID"), Some("417".into()));
    }
    assert_eq!(
        slack[2]["attachments"][0]["title"],
        "Mobile device unenrolled"
    );
    assert_eq!(slack[2]["attachments"][0]["color"], "#eb5757");
    for message in &teams {
        assert_eq!(message["type"], "message");
        let card = &message["attachments"][0];
        assert_eq!(
            card["contentType"],
            "application/vnd.microsoft.card.adaptive"
        );
        assert_eq!(card["content"]["type"], "AdaptiveCard");
    }
    let card = &teams[0]["attachments"][0]["content"];
    assert_eq!(card["body"][0]["text"], "Computer: Added");
    let facts = card["body"][2]["facts"].as_array().expect("facts");
    assert!(
        facts
            .iter()
            .any(|f| f["title"] == "Serial number" && f["value"] == "C02TESTSERIAL"),
        "{facts:?}"
    );
    assert_eq!(
        card["actions"][0]["url"],
        "https://jamf.example.org:8443/computers.html?id=417"
    );
    assert_eq!(
        teams[2]["attachments"][0]["content"]["actions"][0]["url"],
        "https://jamf.example.org:8443/mobileDevices.html?id=86"
    );
    // The webhook URLs are secrets: not on the daemon's log.
    assert!(!server.log().contains("/slack"), "{}", server.log());
}

#[test]
fn jamf_version_tells_chat_only_when_the_version_went_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let web = Receiver::start(HTTP_RECEIVER, &dir.path().join("web"), None);
    let version = web.dir.join("version.txt");
    fs::write(&version, "11.9.0").expect("version");
    let env = integrations_env(
        &format!(
            "SLACK_WEBHOOK_URL={:?}\nJAMF_URL={:?}",
            web.url("/slack"),
            web.url("/")
        ),
        "JSSStartup integrations/jamf-version\n",
    );
    let server = env.serve();
    let state = env.path().join("state/jamf-version");
    send(&server, &["JSSStartup"]);
    assert_eq!(fs::read_to_string(&state).expect("state").trim(), "11.9.0");
    assert!(
        web.posted("/slack").is_empty(),
        "the first version seen is only recorded"
    );
    fs::write(&version, "11.10.1").expect("version");
    send(&server, &["JSSStartup", "--format", "xml"]);
    let messages = web.posted("/slack");
    assert_eq!(messages.len(), 1, "{messages:?}");
    let text = messages[0]["text"].as_str().expect("text");
    assert!(
        text.contains("from 11.9.0 to 11.10.1") && text.contains("jamf.example.org"),
        "{text}"
    );
    assert_eq!(fs::read_to_string(&state).expect("state").trim(), "11.10.1");
    // Again the same version, then a lower one (a restored backup): no message.
    send(&server, &["JSSStartup"]);
    fs::write(&version, "11.2.0").expect("version");
    send(&server, &["JSSStartup"]);
    assert_eq!(web.posted("/slack").len(), 1);
}

#[test]
fn patch_notify_messages_and_runs_the_follow_up_for_listed_titles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let chat = Receiver::start(HTTP_RECEIVER, &dir.path().join("chat"), None);
    let ran = dir.path().join("follow-up.txt");
    let command = dir.path().join("package-update");
    fs::write(
        &command,
        format!("#!/bin/sh\nprintf '%s|%s\\n' \"$1\" \"$2\" >> {ran:?}\n"),
    )
    .expect("command");
    fs::set_permissions(&command, fs::Permissions::from_mode(0o755)).expect("chmod");
    let env = integrations_env(
        &format!(
            "SLACK_WEBHOOK_URL={:?}\nPATCH_COMMAND={command:?}\nPATCH_TITLES='Google Chrome\n\nMozilla Firefox'",
            chat.url("/slack")
        ),
        "PatchSoftwareTitleUpdated integrations/patch-notify\n",
    );
    let server = env.serve();
    send(&server, &["PatchSoftwareTitleUpdated"]);
    send(
        &server,
        &[
            "PatchSoftwareTitleUpdated",
            "--format",
            "xml",
            "--set",
            "/event/name=Mozilla Thunderbird",
        ],
    );
    // No title: a blank line of PATCH_TITLES is no title to match.
    send(
        &server,
        &["PatchSoftwareTitleUpdated", "--set", "/event/name="],
    );
    let messages = chat.posted("/slack");
    assert_eq!(messages.len(), 3);
    assert_eq!(
        messages[0]["text"],
        "Patch available: Mozilla Firefox 129.0.1 (https://jamf.example.org:8443/patch.html?id=5)"
    );
    assert!(
        messages[1]["text"]
            .as_str()
            .expect("text")
            .contains("Mozilla Thunderbird")
    );
    assert_eq!(
        fs::read_to_string(&ran).expect("follow-up ran"),
        "Mozilla Firefox|129.0.1\n",
        "only for listed titles"
    );
}

#[test]
fn api_audit_reports_changes_but_not_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let chat = Receiver::start(HTTP_RECEIVER, &dir.path().join("chat"), None);
    let env = integrations_env(
        &format!("TEAMS_WEBHOOK_URL={:?}", chat.url("/teams")),
        "RestAPIOperation integrations/api-audit\n",
    );
    let server = env.serve();
    send(
        &server,
        &["RestAPIOperation", "--set", "/event/objectID=417"],
    );
    send(
        &server,
        &[
            "RestAPIOperation",
            "--format",
            "xml",
            "--set",
            "/event/restAPIOperationType=GET",
        ],
    );
    send(
        &server,
        &[
            "RestAPIOperation",
            "--format",
            "xml",
            "--set",
            "/event/restAPIOperationType=DELETE",
            "--set",
            "/event/operationSuccessful=false",
            "--set",
            "/event/objectID=9",
        ],
    );
    let messages = chat.posted("/teams");
    let texts: Vec<&str> = messages
        .iter()
        .map(|m| {
            m["attachments"][0]["content"]["body"][0]["text"]
                .as_str()
                .expect("text")
        })
        .collect();
    assert_eq!(
        texts,
        [
            "Jamf Pro API: api-inventory PUT Computer \"Ada's MacBook Air\" (id 417): succeeded",
            "Jamf Pro API: api-inventory DELETE Computer \"Ada's MacBook Air\" (id 9): FAILED",
        ]
    );
}

#[test]
fn archive_appends_one_json_line_per_event() {
    let env = integrations_env("", "* integrations/archive\n");
    let server = env.serve();
    let first = request_id(&send(
        &server,
        &["ComputerAdded", "--set", "/event/deviceName=Lab 1"],
    ));
    let second = request_id(&send(&server, &["MobileDeviceEnrolled", "--format", "xml"]));
    let text = fs::read_to_string(env.path().join("state/events.jsonl")).expect("archive");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["event"], "ComputerAdded");
    assert_eq!(lines[0]["request_id"], first.as_str());
    assert_eq!(lines[0]["payload"]["event"]["deviceName"], "Lab 1");
    assert_eq!(lines[1]["event"], "MobileDeviceEnrolled");
    assert_eq!(lines[1]["request_id"], second.as_str());
    assert_eq!(
        lines[1]["payload"]["JSSEvent"]["event"]["deviceName"], "Grace's iPad",
        "XML as JSON"
    );
    let time = lines[0]["time"].as_str().expect("time");
    assert!(time.len() == 20 && time.ends_with('Z'), "{time}");
}

#[test]
fn enrollment_mail_sends_plain_and_html_to_the_team_and_the_device_user() {
    let dir = tempfile::tempdir().expect("tempdir");
    let smtp = Receiver::start(SMTP_RECEIVER, &dir.path().join("smtp"), Some(aiosmtpd()));
    let env = integrations_env(
        &format!(
            "SMTP_URL=\"smtp://127.0.0.1:{}\"\nSMTP_STARTTLS=no\nMAIL_FROM=\"jamf@example.org\"\n\
             MAIL_TO=\"it@example.org helpdesk@example.org\"\nMAIL_TO_DEVICE_USER=yes\nJAMF_URL=\"https://jamf.example.org\"",
            smtp.port
        ),
        "MobileDeviceEnrolled integrations/enrollment-mail\nMobileDeviceUnEnrolled integrations/enrollment-mail\n",
    );
    let server = env.serve();
    send(
        &server,
        &[
            "MobileDeviceEnrolled",
            "--set",
            "/event/emailAddress=grace@example.org",
            "--set",
            "/event/deviceName=Grace's <iPad>",
            "--set",
            "/event/jssID=86",
        ],
    );
    send(&server, &["MobileDeviceUnEnrolled", "--format", "xml"]);
    let mail = |n: usize| -> Value {
        let path = smtp.dir.join(format!("mail-{n}.json"));
        assert!(
            wait_until(Duration::from_secs(10), || path.exists()),
            "no mail {n}"
        );
        serde_json::from_str(&fs::read_to_string(&path).expect("mail")).expect("mail JSON")
    };
    let enrolled = mail(0);
    assert_eq!(enrolled["from"], "jamf@example.org");
    assert_eq!(
        enrolled["to"],
        serde_json::json!([
            "it@example.org",
            "helpdesk@example.org",
            "grace@example.org"
        ])
    );
    let data = enrolled["data"].as_str().expect("data");
    assert!(
        data.contains("Subject: Mobile device enrolled: Grace's <iPad>"),
        "{data}"
    );
    assert!(
        data.contains("Content-Type: multipart/alternative"),
        "{data}"
    );
    assert!(
        data.contains("Content-Type: text/plain")
            && data.contains("The mobile device \"Grace's <iPad>\" was enrolled."),
        "{data}"
    );
    assert!(
        data.contains("Content-Type: text/html") && data.contains("<b>Grace's &lt;iPad&gt;</b>"),
        "{data}"
    );
    assert!(
        data.contains("https://jamf.example.org/mobileDevices.html?id=86"),
        "{data}"
    );
    let unenrolled = mail(1);
    assert_eq!(
        unenrolled["to"],
        serde_json::json!(["it@example.org", "helpdesk@example.org"]),
        "no address in the event"
    );
    assert!(
        unenrolled["data"]
            .as_str()
            .expect("data")
            .contains("was unenrolled")
    );
}

#[test]
fn enrollment_mail_with_starttls_sends_only_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let tls = Receiver::start_with(
        SMTP_RECEIVER,
        &dir.path().join("tls"),
        Some(aiosmtpd()),
        &[&cert, &key],
    );
    let plain = Receiver::start(SMTP_RECEIVER, &dir.path().join("plain"), Some(aiosmtpd()));
    let settings = |port: u16| {
        format!(
            "SMTP_URL=\"smtp://127.0.0.1:{port}\"\nSMTP_STARTTLS=yes\nSMTP_CA_FILE={cert:?}\n\
             MAIL_FROM=\"jamf@example.org\"\nMAIL_TO=\"it@example.org\""
        )
    };
    let routes = "MobileDeviceEnrolled integrations/enrollment-mail\n";
    let env = integrations_env(&settings(tls.port), routes);
    let server = env.serve();
    send(&server, &["MobileDeviceEnrolled", "--format", "xml"]);
    let path = tls.dir.join("mail-0.json");
    assert!(
        wait_until(Duration::from_secs(10), || path.exists()),
        "no mail over STARTTLS"
    );
    let mail: Value =
        serde_json::from_str(&fs::read_to_string(&path).expect("mail")).expect("JSON");
    assert!(
        mail["data"]
            .as_str()
            .expect("data")
            .contains("was enrolled")
    );
    // A server that offers no STARTTLS gets nothing, and the failure reaches the sender as a 500.
    let env = integrations_env(&settings(plain.port), routes);
    let server = env.serve();
    send_failing(&server, "MobileDeviceEnrolled");
    assert!(
        !plain.dir.join("mail-0.json").exists(),
        "nothing sent in the clear"
    );
}

/// What a payload carries is the sender's to choose: a device name cannot add a field, nor mention
/// @channel or disguise a link in Slack, and group changes read alike from JSON and XML. An event spelt in another case
/// (Jamf sends ComputerCheckin) is still recognised. Slack failing does not keep the message from Teams,
/// and the failure reaches the sender.
#[test]
fn notify_keeps_payload_text_literal_and_posts_to_each_chat() {
    let dir = tempfile::tempdir().expect("tempdir");
    let chat = Receiver::start(HTTP_RECEIVER, &dir.path().join("chat"), None);
    let env = integrations_env(
        &format!(
            "SLACK_WEBHOOK_URL={:?}\nTEAMS_WEBHOOK_URL={:?}\nJAMF_URL=\"https://jamf.example.org\"",
            chat.url("/slack"),
            chat.url("/teams")
        ),
        "* integrations/notify\n",
    );
    let server = env.serve();
    send(
        &server,
        &[
            "ComputerCheckIn",
            "--set",
            "/webhook/webhookEvent=ComputerCheckin",
            "--set",
            "/event/computer/deviceName=<!channel> Lab-Mac\nUser|ceo@example.org (forged)",
        ],
    );
    for format in ["json", "xml"] {
        send(
            &server,
            &["SmartGroupComputerMembershipChange", "--format", format],
        );
    }
    let slack = chat.posted("/slack");
    assert_eq!(slack.len(), 3, "{slack:?}");
    let card = &slack[0]["attachments"][0];
    assert_eq!(card["title"], "Computer: Checkin");
    assert!(
        card["title_link"]
            .as_str()
            .is_some_and(|l| l.starts_with("https://jamf.example.org/computers.html?id=")),
        "{card}"
    );
    let fields = card["fields"].as_array().expect("fields");
    let users: Vec<&Value> = fields.iter().filter(|f| f["title"] == "User").collect();
    assert_eq!(
        users.len(),
        1,
        "a line break in a value adds no field: {fields:?}"
    );
    let name = fields.iter().find(|f| f["title"] == "Name").expect("name");
    assert_eq!(
        name["value"],
        "&lt;!channel&gt; Lab-Mac User|ceo@example.org (forged)"
    );
    // Teams gets the name as it came (its cards take Markdown links: escaped for Slack only), on one line.
    let teams = chat.posted("/teams");
    let facts = &teams[0]["attachments"][0]["content"]["body"][2]["facts"];
    assert!(
        facts
            .as_array()
            .expect("facts")
            .iter()
            .any(|f| f["value"] == "<!channel> Lab-Mac User|ceo@example.org (forged)"),
        "{facts}"
    );
    for message in &slack[1..] {
        let fields = message["attachments"][0]["fields"]
            .as_array()
            .expect("fields");
        let value = |title: &str| {
            fields
                .iter()
                .find(|f| f["title"] == title)
                .map(|f| f["value"].clone())
        };
        assert_eq!(value("Added"), Some("417,418".into()), "{fields:?}");
        assert_eq!(value("Removed"), Some("390".into()), "{fields:?}");
    }
    // Slack down: Teams still gets its card, and the sender a 500 (an async route would retry).
    fs::write(chat.dir.join("fail-slack"), "").expect("fail slack");
    send_failing(&server, "JSSStartup");
    let teams = chat.posted("/teams");
    assert_eq!(
        teams.last().expect("a card")["attachments"][0]["content"]["body"][0]["text"],
        "Jamf Pro started"
    );
}

/// The device user's address is taken only when it is one plain address; a recipient the server refuses
/// does not keep the mail from the others; an SMTP password reaches the server byte for byte, whatever
/// quotes or backslashes it holds.
#[test]
fn enrollment_mail_takes_one_plain_address_and_survives_a_refused_recipient() {
    let dir = tempfile::tempdir().expect("tempdir");
    let smtp = Receiver::start(SMTP_RECEIVER, &dir.path().join("smtp"), Some(aiosmtpd()));
    let password = dir.path().join("smtp-password");
    fs::write(&password, "pa\"ss\\tw\\\\ord\n").expect("password");
    let env = integrations_env(
        &format!(
            "SMTP_URL=\"smtp://127.0.0.1:{}\"\nSMTP_STARTTLS=no\nMAIL_FROM=\"jamf@example.org\"\n\
             MAIL_TO=\"it@example.org refused@example.org\"\nMAIL_TO_DEVICE_USER=yes\n\
             SMTP_USER=\"mailer\"\nSMTP_PASSWORD_FILE={password:?}",
            smtp.port
        ),
        "MobileDeviceEnrolled integrations/enrollment-mail\n",
    );
    let server = env.serve();
    let addresses = [
        "grace@example.org attacker@evil.example",
        "grace@example.org\nattacker@evil.example",
        "*",
        "grace@example.org",
    ];
    for address in addresses {
        send(
            &server,
            &[
                "MobileDeviceEnrolled",
                "--set",
                &format!("/event/emailAddress={address}"),
                "--set",
                "/event/deviceName=Grace\u{2019}s iPad",
            ],
        );
    }
    let mails: Vec<Value> = (0..addresses.len())
        .map(|n| {
            let path = smtp.dir.join(format!("mail-{n}.json"));
            assert!(
                wait_until(Duration::from_secs(10), || path.exists()),
                "no mail {n}"
            );
            serde_json::from_str(&fs::read_to_string(&path).expect("mail")).expect("JSON")
        })
        .collect();
    for refused in &mails[..3] {
        assert_eq!(refused["to"], serde_json::json!(["it@example.org"]));
    }
    assert_eq!(
        mails[3]["to"],
        serde_json::json!(["it@example.org", "grace@example.org"])
    );
    assert_eq!(
        (&mails[0]["login"], &mails[0]["password"]),
        (&"mailer".into(), &"pa\"ss\\tw\\\\ord".into())
    );
    // A name that is not ASCII is an encoded word in the Subject (RFC 2047), never raw 8-bit bytes.
    let data = mails[0]["data"].as_str().expect("data");
    let subject = data
        .lines()
        .find(|l| l.starts_with("Subject: "))
        .expect("subject");
    assert!(
        subject.starts_with("Subject: =?UTF-8?B?") && subject.is_ascii(),
        "{subject}"
    );
    assert!(
        server
            .log()
            .contains("emailAddress is not one plain address"),
        "{}",
        server.log()
    );
}

/// A Jamf Pro upgrade is recorded only once chat was told: a chat that failed is told by the retry.
#[test]
fn jamf_version_keeps_an_upgrade_untold_until_chat_takes_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let web = Receiver::start(HTTP_RECEIVER, &dir.path().join("web"), None);
    fs::write(web.dir.join("version.txt"), "11.9.0").expect("version");
    let env = integrations_env(
        &format!(
            "SLACK_WEBHOOK_URL={:?}\nJAMF_URL={:?}",
            web.url("/slack"),
            web.url("/")
        ),
        "JSSStartup integrations/jamf-version\n",
    );
    let server = env.serve();
    let state = env.path().join("state/jamf-version");
    send(&server, &["JSSStartup"]);
    fs::write(web.dir.join("version.txt"), "11.10.1").expect("version");
    fs::write(web.dir.join("fail-slack"), "").expect("fail slack");
    send_failing(&server, "JSSStartup");
    assert_eq!(fs::read_to_string(&state).expect("state").trim(), "11.9.0");
    fs::remove_file(web.dir.join("fail-slack")).expect("slack back");
    send(&server, &["JSSStartup"]);
    let messages = web.posted("/slack");
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert!(
        messages[0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("from 11.9.0 to 11.10.1")),
        "{messages:?}"
    );
    assert_eq!(fs::read_to_string(&state).expect("state").trim(), "11.10.1");
}

/// A body no script can read (neither JSON nor XML) ends with 65, which an async route never retries;
/// the archive keeps such a body byte for byte.
#[test]
fn a_payload_no_integration_can_read_is_dead_at_once_and_archived_whole() {
    let env = integrations_env(
        "SLACK_WEBHOOK_URL=\"http://127.0.0.1:9/slack\"",
        "RestAPIOperation integrations/api-audit async retries=3\n* integrations/archive\n",
    );
    let server = env.serve();
    let bad = server.request(
        "POST",
        "/hooks/RestAPIOperation",
        &[("Content-Type", "text/plain")],
        b"not a payload",
    );
    assert_eq!(bad.status, 202, "{}", bad.text());
    let body: &[u8] = b"\x00\xff binary \xfe\n";
    let archived = server.request(
        "POST",
        "/hooks/Blob",
        &[("Content-Type", "application/octet-stream")],
        body,
    );
    assert_eq!(archived.status, 200, "{}", archived.text());
    // Text keeps its trailing line breaks; UTF-8 with a NUL in it is kept whole, in base64.
    for (path, body) in [
        ("/hooks/Text", &b"line1\n\n\n"[..]),
        ("/hooks/Nul", b"abc\x00def\n"),
    ] {
        let response = server.request("POST", path, &[("Content-Type", "text/plain")], body);
        assert_eq!(response.status, 200, "{}", response.text());
    }
    let text = fs::read_to_string(env.path().join("state/events.jsonl")).expect("archive");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[1]["payload"], "line1\n\n\n");
    assert_eq!(lines[2]["payload_base64"], "YWJjAGRlZgo=");
    let line = &lines[0];
    let decoded = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(line["payload_base64"].as_str().expect("base64").as_bytes())?;
            child.wait_with_output()
        })
        .expect("base64 -d");
    assert_eq!(decoded.stdout, body);
    // Dead after its one attempt, exit 65, although three retries were allowed.
    let dead = wait_until(Duration::from_secs(20), || {
        server
            .log()
            .contains("event=RestAPIOperation attempt=1 exit=65 dead")
    });
    assert!(dead, "{}", server.log());
}
