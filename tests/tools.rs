//! `hookrunner get` and `hookrunner send` against the real binary: get's exit codes and shell output
//! evaluated by a real shell; every sample sent, resolved and routed by a real daemon, signed as each kind
//! of sender profile would sign it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::util::{BIN, Env, wait_until};

fn hookrunner(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run hookrunner")
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const JAMF_XML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><JSSEvent><webhook><webhookEvent>ComputerAdded</webhookEvent></webhook>\
<event><deviceName>Ada&apos;s \"Mac\" $(id) `id`</deviceName><ids><id>4</id><id>5</id></ids></event></JSSEvent>";

#[test]
fn get_reads_json_xml_and_forms_with_documented_exit_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let xml = dir.path().join("payload.xml");
    fs::write(&xml, JAMF_XML).expect("write");
    let json = dir.path().join("payload.json");
    fs::write(&json, r#"{"webhook":{"webhookEvent":"ComputerAdded"},"event":{"deviceName":"Ada's \"Mac\" $(id) `id`","ids":[4,5]}}"#)
        .expect("write");
    let form = dir.path().join("payload.form");
    fs::write(&form, "event_name=voicemail_new&caller=%2B1%20555").expect("write");
    for file in [&xml, &json] {
        let file = file.to_str().expect("utf-8");
        let out = hookrunner(&["get", file, "/webhook/webhookEvent", "/event/ids/1"]);
        assert_eq!(
            (code(&out), stdout(&out).as_str()),
            (0, "ComputerAdded\n5\n"),
            "{file}"
        );
        // A missing path: exit 3 and nothing on stdout, unless there is a default.
        let out = hookrunner(&["get", file, "/webhook/webhookEvent", "/event/nope"]);
        assert_eq!((code(&out), stdout(&out).as_str()), (3, ""), "{file}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("/event/nope"));
        let out = hookrunner(&["get", "--default", "n/a", file, "/event/nope"]);
        assert_eq!((code(&out), stdout(&out).as_str()), (0, "n/a\n"));
    }
    let out = hookrunner(&["get", "--json", json.to_str().expect("utf-8"), "/event/ids"]);
    assert_eq!(stdout(&out), "[4,5]\n");
    // A JSON number keeps its type with --json (jq reads it as a number); XML's values are strings.
    let out = hookrunner(&[
        "get",
        "--json",
        json.to_str().expect("utf-8"),
        "/event/ids/1",
    ]);
    assert_eq!(stdout(&out), "5\n");
    let out = hookrunner(&[
        "get",
        "--json",
        xml.to_str().expect("utf-8"),
        "/event/ids/1",
    ]);
    assert_eq!(stdout(&out), "\"5\"\n");
    let out = hookrunner(&["get", "--json", xml.to_str().expect("utf-8"), "/event/ids"]);
    assert_eq!(stdout(&out), "{\"id\":[\"4\",\"5\"]}\n");
    let out = hookrunner(&["get", form.to_str().expect("utf-8"), "/caller"]);
    assert_eq!((code(&out), stdout(&out).as_str()), (0, "+1 555\n"));
    // Not parseable, not readable, bad usage.
    let broken = dir.path().join("broken");
    fs::write(&broken, "{\"webhook\":").expect("write");
    assert_eq!(
        code(&hookrunner(&["get", broken.to_str().expect("utf-8"), "/a"])),
        65
    );
    assert_eq!(
        code(&hookrunner(&["get", "/nonexistent/payload", "/a"])),
        66
    );
    assert_eq!(
        code(&hookrunner(&["get", broken.to_str().expect("utf-8")])),
        64
    );
}

#[test]
fn get_shell_output_is_evaluated_back_to_the_same_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let xml = dir.path().join("payload.xml");
    fs::write(&xml, JAMF_XML).expect("write");
    let script = format!(
        "vars=$({BIN} get --shell \"$1\" NAME=/event/deviceName /webhook/webhookEvent) || exit 9; \
         eval \"$vars\"; printf '%s|%s' \"$NAME\" \"$webhookEvent\""
    );
    let out = Command::new("sh")
        .args(["-c", &script, "sh"])
        .arg(&xml)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout(&out), "Ada's \"Mac\" $(id) `id`|ComputerAdded");
}

/// An env whose every event runs a script that prints its event.
fn routed_env(extra: &str) -> Env {
    let env = Env::new().config(extra);
    env.script(
        "any",
        "echo \"ran $HOOKRUNNER_EVENT sender=$HOOKRUNNER_SENDER\"",
    );
    env.routes("* any\n");
    env
}

fn send(env: &Env, addr: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("send")
        .args(args)
        .args(["--url", addr, "--config"])
        .arg(env.config_path())
        .output()
        .expect("run send")
}

#[test]
fn every_sample_is_resolved_and_routed_in_json_and_xml() {
    let env = routed_env("");
    let server = env.serve();
    let list = hookrunner(&["send", "--list"]);
    let samples: Vec<(String, String)> = stdout(&list)
        .lines()
        .map(|line| {
            let mut words = line.split_whitespace();
            let event = words.next().expect("event").to_string();
            (event, line.to_string())
        })
        .collect();
    assert_eq!(
        samples.len(),
        27,
        "23 Jamf events and 4 others:\n{}",
        stdout(&list)
    );
    let url = format!("http://{}/", server.addr);
    for (event, line) in &samples {
        let formats: &[&str] = if line.contains("xml") {
            &["json", "xml"]
        } else {
            &["json"]
        };
        // The list names GitLab's push as send takes it (`gitlab:push`); its event is `push`.
        let name = event.clone();
        let event = event.strip_prefix("gitlab:").unwrap_or(event);
        assert_eq!(name != event, line.contains("GitLab"), "{line}");
        for format in formats {
            let out = send(&env, &url, &[&name, "--format", format]);
            let text = stdout(&out);
            assert_eq!(
                code(&out),
                0,
                "{name} {format}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(text.contains("HTTP 200 request_id="), "{text}");
            let answer: serde_json::Value =
                serde_json::from_str(text.lines().nth(1).expect("answer line"))
                    .expect("JSON answer");
            assert_eq!(answer["event"], event, "{name} {format}");
            assert_eq!(answer["script"], "any");
        }
    }
    assert!(
        server
            .wait_log("ran SmartGroupUserMembershipChange", Duration::from_secs(5))
            .is_some()
    );
}

#[test]
fn send_sets_fields_and_repeats_at_a_rate() {
    // Scripts get a cleared environment, so the script finds the binary by its absolute path.
    let env = Env::new();
    env.script(
        "ComputerAdded",
        &format!("echo \"device=$({BIN} get \"$1\" /event/deviceName) ts=$({BIN} get \"$1\" /webhook/eventTimestamp)\""),
    );
    let server = env.serve();
    let url = format!("http://{}/", server.addr);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis();
    let paced = std::time::Instant::now();
    let out = send(
        &env,
        &url,
        &[
            "ComputerAdded",
            "--format",
            "xml",
            "--set",
            "/event/deviceName=Lab 01",
            "--count",
            "3",
            "--rate",
            "5/s",
        ],
    );
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    assert_eq!(stdout(&out).matches("HTTP 200").count(), 3);
    // Three at 5/s: 0.4 s at least between the first and the last (a lower bound, which load cannot break).
    assert!(
        paced.elapsed() >= Duration::from_millis(400),
        "3 sends at 5/s took {:?}",
        paced.elapsed()
    );
    let line = server
        .wait_log("device=Lab 01", Duration::from_secs(5))
        .expect("script saw the set field");
    let ts: u128 = line
        .rsplit("ts=")
        .next()
        .expect("ts")
        .trim()
        .parse()
        .expect("a number");
    assert!(
        ts >= before && ts < before + 60_000,
        "eventTimestamp {ts} is now ({before})"
    );
    // An answer that is not 2xx makes send fail.
    let out = send(&env, &url, &["ComputerCheckIn"]);
    assert_eq!(code(&out), 1);
    assert!(stdout(&out).contains("HTTP 404"), "{}", stdout(&out));
    assert_eq!(
        code(&hookrunner(&["send", "NoSuchEvent", "--url", &url])),
        64
    );
    assert_eq!(
        code(&hookrunner(&[
            "send", "push", "--format", "xml", "--url", &url
        ])),
        64
    );
}

fn secret(env: &Env, name: &str, text: &str) -> String {
    let path = env.path().join(name);
    fs::write(&path, text).expect("write secret");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
    path.to_str().expect("utf-8").to_string()
}

#[test]
fn send_authenticates_as_each_kind_of_sender_profile() {
    let env = Env::new();
    let profiles = [
        (
            "basic",
            "type = \"basic\"\nuser = \"jamf\"\npassword_file = {f}\n",
            "ComputerAdded",
        ),
        (
            "headers",
            "type = \"headers\"\nheaders = {{ \"X-Api-Key\" = {f} }}\n",
            "ComputerAdded",
        ),
        (
            "hmac",
            "type = \"hmac\"\nheader = \"X-Signature\"\nalgorithm = \"sha512\"\nencoding = \"base64\"\nsecret_file = {f}\n",
            "ComputerAdded",
        ),
        ("github", "type = \"github\"\nsecret_file = {f}\n", "push"),
        (
            "gitlab",
            "type = \"gitlab\"\nsecret_file = {f}\n",
            "gitlab:push",
        ),
        (
            "scalefusion",
            "type = \"scalefusion\"\nsecret_file = {f}\n",
            "device.enrolled",
        ),
        (
            "sw",
            "type = \"standard-webhooks\"\nsecret_file = {f}\n",
            "ComputerAdded",
        ),
    ];
    let mut config = String::new();
    for (name, table, _) in &profiles {
        let value = if *name == "sw" {
            "whsec_MDEyMzQ1Njc4OWFiY2RlZg=="
        } else {
            "s3cret-value-for-tests"
        };
        let file = format!("{:?}", secret(&env, name, value));
        config.push_str(&format!(
            "[[sender]]\nname = \"{name}\"\npath = \"/{name}\"\n{}",
            table
                .replace("{f}", &file)
                .replace("{{", "{")
                .replace("}}", "}")
        ));
    }
    let env = env.config(&config);
    env.script(
        "any",
        "echo \"ran $HOOKRUNNER_EVENT sender=$HOOKRUNNER_SENDER\"",
    );
    env.routes("* any\n");
    let server = env.serve();
    for (name, _, event) in &profiles {
        let url = format!("http://{}/{name}", server.addr);
        let out = send(&env, &url, &[event, "--sender", name]);
        let text = stdout(&out);
        assert_eq!(code(&out), 0, "{name}: {text}");
        assert!(
            server
                .wait_log(&format!("sender={name}"), Duration::from_secs(5))
                .is_some(),
            "{name}"
        );
        // Once the request's line is in, so that the log holds what it could have leaked.
        assert!(
            !text.contains("s3cret") && !server.log().contains("s3cret"),
            "no secret shown"
        );
        // Without the profile the same request is refused: the signature is what let it in.
        let out = send(&env, &url, &[event]);
        assert_eq!(code(&out), 1, "{name} unsigned");
        assert!(
            stdout(&out).contains("HTTP 401"),
            "{name}: {}",
            stdout(&out)
        );
    }
    // A URL without a path of its own goes to the sender's path, as without --url; one with a path keeps it.
    let bare = format!("http://{}", server.addr);
    let out = send(&env, &bare, &["ComputerAdded", "--sender", "basic"]);
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    let out = send(
        &env,
        &format!("{bare}/"),
        &["ComputerAdded", "--sender", "basic"],
    );
    assert_eq!(
        code(&out),
        1,
        "/ is under no sender's path: {}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("HTTP 401"), "{}", stdout(&out));
    let out = send(
        &env,
        "http://127.0.0.1:9/",
        &["ComputerAdded", "--sender", "nobody"],
    );
    assert_eq!(code(&out), 78);
    // A bare `push` with a GitLab sender is GitLab's push, not GitHub's with GitLab's token.
    let url = format!("http://{}/gitlab", server.addr);
    let out = send(&env, &url, &["push", "--sender", "gitlab"]);
    assert!(
        stdout(&out).starts_with("GitLab push -> HTTP 200"),
        "{}",
        stdout(&out)
    );
    // A reader that goes away does not stop the sends (or panic): all three arrive.
    let before = server.log().matches("sender=basic").count();
    let mut child = Command::new(BIN)
        .args([
            "send",
            "ComputerAdded",
            "--sender",
            "basic",
            "--count",
            "3",
            "--url",
        ])
        .arg(format!("http://{}/basic", server.addr))
        .arg("--config")
        .arg(env.config_path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("send");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("send ends");
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        wait_until(Duration::from_secs(5), || server
            .log()
            .matches("sender=basic")
            .count()
            >= before + 3),
        "{}",
        server.log()
    );
}

fn check_payload(env: &Env, payload: &[u8], extra: &[&str]) -> (i32, String) {
    let file = env.path().join("dry-payload");
    fs::write(&file, payload).expect("write payload");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(env.config_path())
        .arg("--payload")
        .arg(&file)
        .args(extra)
        .output()
        .expect("run check");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (code(&out), stdout(&out))
}

#[test]
fn check_payload_shows_the_delivery_id_it_signed_with() {
    let env = Env::new();
    let key = secret(&env, "sw", "whsec_MDEyMzQ1Njc4OWFiY2RlZg==");
    let env = env.config(&format!(
        "[[sender]]\nname = \"sw\"\ntype = \"standard-webhooks\"\nsecret_file = {key:?}\n"
    ));
    env.script("a.sh", "exit 0");
    env.routes("A a.sh\n");
    // Signed by the dry run itself: the script would get the webhook-id it made.
    let (status, text) = check_payload(&env, b"{}", &["--path", "/hooks/A"]);
    assert_eq!(status, 0, "{text}");
    let id = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("HOOKRUNNER_DELIVERY_ID="))
        .unwrap_or_else(|| panic!("no delivery id line in:\n{text}"));
    assert!(id.starts_with("msg_"), "{text}");
}

#[test]
fn check_payload_explains_sender_event_routes_and_environment_without_running() {
    let key = "dry-run-key";
    let env = Env::new();
    let key_file = secret(&env, "key", key);
    let env = env.config(&format!(
        "[[sender]]\nname = \"jamf\"\npath = \"/jamf\"\ntype = \"headers\"\nheaders = {{ \"X-Api-Key\" = {key_file:?} }}\n"
    ));
    let marker = env.path().join("ran");
    env.script("lab.sh", &format!("touch {marker:?}"));
    env.script("office.sh", &format!("touch {marker:?}"));
    env.routes(
        "# comment\nMobile*  lab.sh\nComputer*  lab.sh  /event/deviceName=Lab*\nComputerAdded  office.sh timeout=5s\n",
    );
    let routes = env.path().join("routes");
    let body = br#"{"webhook":{"webhookEvent":"ComputerAdded"},"event":{"deviceName":"Office-7"}}"#;
    let (status, text) = check_payload(
        &env,
        body,
        &[
            "--path",
            "/jamf",
            "--header",
            "X-Api-Key: dry-run-key",
            "--header",
            "Content-Type: application/json",
        ],
    );
    assert_eq!(status, 0, "{text}");
    for expected in [
        "sender: jamf (headers on /jamf)".to_string(),
        "credentials: pass".to_string(),
        "event: ComputerAdded (from JSON /webhook/webhookEvent)".to_string(),
        format!(
            "{}:2: no match: the pattern Mobile* does not match",
            routes.display()
        ),
        format!(
            "{}:3: no match: /event/deviceName is \"Office-7\", not Lab*",
            routes.display()
        ),
        format!(
            "{}:4: matches: runs {}",
            routes.display(),
            env.scripts().join("office.sh").display()
        ),
        "timeout 5s".to_string(),
        "HOOKRUNNER_SENDER=jamf".to_string(),
        "HOOKRUNNER_EVENT=ComputerAdded".to_string(),
        "HOOKRUNNER_PATH=/jamf".to_string(),
        // Set and empty, as the daemon sets them.
        "  HOOKRUNNER_QUERY=\n".to_string(),
        "  HOOKRUNNER_DELIVERY_ID=\n".to_string(),
    ] {
        assert!(text.contains(&expected), "missing {expected:?} in:\n{text}");
    }
    assert!(!text.contains(key), "the secret is not shown");
    assert!(!marker.exists(), "nothing ran");
    // Without the key, the request is signed with the profile's own, so the operator never types a
    // secret where the process list shows it; a wrong key, or a path outside every sender's, is refused.
    let (status, text) = check_payload(&env, body, &["--path", "/jamf"]);
    assert_eq!(status, 0, "{text}");
    assert!(
        text.contains(
            "credentials: none given; signed with the profile's own secrets, as hookrunner send does: pass"
        ) && text.contains("matches: runs"),
        "{text}"
    );
    assert!(!text.contains(key), "the secret is not shown");
    let (status, text) = check_payload(
        &env,
        body,
        &["--path", "/jamf", "--header", "X-Api-Key: wrong"],
    );
    assert_eq!(status, 1);
    assert!(
        text.contains("credentials: refused with 401: X-Api-Key does not match"),
        "{text}"
    );
    let (status, text) = check_payload(
        &env,
        body,
        &["--path", "/other", "--header", "X-Api-Key: dry-run-key"],
    );
    assert_eq!(status, 1);
    assert!(text.contains("none has a path covering /other"), "{text}");
    // XML, the event from the path, no route.
    let xml = b"<JSSEvent><webhook><webhookEvent>PushSent</webhookEvent></webhook></JSSEvent>";
    let (status, text) = check_payload(
        &env,
        xml,
        &["--path", "/jamf", "--header", "X-Api-Key: dry-run-key"],
    );
    assert_eq!(status, 1);
    assert!(
        text.contains("event: PushSent (from XML /JSSEvent/webhook/webhookEvent)"),
        "{text}"
    );
    assert!(text.contains("route: none matched"), "{text}");
    let (_, text) = check_payload(
        &env,
        b"",
        &[
            "--path",
            "/jamf/hooks/MobileDeviceEnrolled",
            "--header",
            "X-Api-Key: dry-run-key",
        ],
    );
    assert!(
        text.contains("event: MobileDeviceEnrolled (from path /hooks/<name>)"),
        "{text}"
    );
    assert!(text.contains(":2: matches: runs"), "{text}");
    assert!(!text.contains("async:"), "a sync route: {text}");
    assert!(!text.contains("HOOKRUNNER_ATTEMPT"), "{text}");
    // An async route: what the daemon would answer, how it would retry, and the queued run's variables.
    env.routes("Mobile*  lab.sh async retries=3 retry_max=5s serial dedupe_key=json:/event/id\n");
    let (_, text) = check_payload(
        &env,
        b"",
        &[
            "--path",
            "/jamf/hooks/MobileDeviceEnrolled",
            "--header",
            "X-Api-Key: dry-run-key",
        ],
    );
    assert!(
        text.contains(
            "async: answered 202 once queued; run later, retried up to 3 time(s), pauses up to 5s, \
             one at a time (serial), deduplicated by JSON /event/id"
        ),
        "{text}"
    );
    assert!(
        text.contains("HOOKRUNNER_ATTEMPT=") && text.contains("HOOKRUNNER_QUEUED_AT="),
        "{text}"
    );
    assert!(!marker.exists(), "nothing ran");
}

/// The address `metrics_listen` bound, from the daemon's log.
pub(crate) fn metrics_addr(server: &crate::util::Server) -> String {
    let line = server
        .wait_log("metrics on http://", Duration::from_secs(5))
        .expect("metrics address logged");
    line.split("http://")
        .nth(1)
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .expect("address")
        .to_string()
}

/// `GET /metrics`, its body.
pub(crate) fn scrape(addr: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
    std::io::Write::write_all(&mut stream, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let answer = crate::util::Response::read(&mut stream).expect("answer");
    assert_eq!(answer.status, 200);
    answer.text()
}

/// `promtool check metrics` on `text`: it must pass without a complaint.
pub(crate) fn promtool_accepts(env: &Env, text: &str) {
    let file = env.path().join("metrics.txt");
    fs::write(&file, text).expect("write metrics");
    let promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(fs::File::open(&file).expect("open"))
        .output()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    assert!(
        promtool.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&promtool.stdout),
        String::from_utf8_lossy(&promtool.stderr)
    );
}

#[test]
fn metrics_count_requests_runs_and_auth_failures_and_promtool_accepts_them() {
    let env = Env::new();
    let key_file = secret(&env, "key", "metrics-key");
    let env = env.config(&format!(
        "metrics_listen = \"127.0.0.1:0\"\n[[sender]]\nname = \"jamf\"\npath = \"/\"\ntype = \"headers\"\nheaders = {{ \"X-Api-Key\" = {key_file:?} }}\n"
    ));
    env.script("ok", "exit 0");
    env.script("fails", "exit 3");
    env.routes("ComputerAdded ok\nPushSent fails\n");
    let server = env.serve();
    let metrics_addr = metrics_addr(&server);
    let key = [
        ("X-Api-Key", "metrics-key"),
        ("Content-Type", "application/json"),
    ];
    let body = |event: &str| format!(r#"{{"webhook":{{"webhookEvent":"{event}"}}}}"#);
    for _ in 0..2 {
        assert_eq!(
            server
                .request("POST", "/", &key, body("ComputerAdded").as_bytes())
                .status,
            200
        );
    }
    assert_eq!(
        server
            .request("POST", "/", &key, body("PushSent").as_bytes())
            .status,
        500
    );
    assert_eq!(
        server
            .request("POST", "/", &key, body("JSSStartup").as_bytes())
            .status,
        404
    );
    assert_eq!(
        server.post("/", body("ComputerAdded").as_bytes()).status,
        401
    );
    let text = scrape(&metrics_addr);
    for expected in [
        "hookrunner_requests_total{status=\"200\",sender=\"jamf\"} 2",
        "hookrunner_requests_total{status=\"500\",sender=\"jamf\"} 1",
        "hookrunner_requests_total{status=\"404\",sender=\"jamf\"} 1",
        "hookrunner_requests_total{status=\"401\",sender=\"jamf\"} 1",
        "hookrunner_runs_total{line=\"1\",script=\"ok\",outcome=\"ok\"} 2",
        "hookrunner_runs_total{line=\"2\",script=\"fails\",outcome=\"failed\"} 1",
        "hookrunner_run_duration_seconds_count 3",
        "hookrunner_running_scripts 0",
        "hookrunner_auth_failures_total{sender=\"jamf\",reason=\"missing_header\"} 1",
        // The store is open (for the history): its counts are there, none of these sync runs among them.
        "hookrunner_async_deliveries{state=\"queued\"} 0",
        "hookrunner_async_deliveries{state=\"retrying\"} 0",
        "hookrunner_async_deliveries{state=\"dead\"} 0",
        "hookrunner_store_read_errors_total 0",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    assert!(!text.contains("metrics-key"));
    // The webhook port does not serve them.
    assert_ne!(server.get("/metrics").text(), text);
    promtool_accepts(&env, &text);
}

/// The value of the sample `name` in `text` (Prometheus text format).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_count_queued_running_and_dead_deliveries_as_the_store_holds_them() {
    let env = Env::new().config("metrics_listen = \"127.0.0.1:0\"");
    let dir = env.path().to_path_buf();
    let fixed = dir.join("fixed");
    env.script("data.sh", &format!("[ -e {fixed:?} ] || exit 65"));
    env.script(
        "slow.sh",
        &crate::util::wait_for_release(&dir.join("started"), &dir.join("release")),
    );
    env.routes("D data.sh async\nS slow.sh async serial\n");
    let server = env.serve();
    let addr = metrics_addr(&server);
    let _release = crate::util::Release(dir.join("release"));
    let gauge = |text: &str, state: &str| {
        sample(
            text,
            &format!("hookrunner_async_deliveries{{state=\"{state}\"}}"),
        )
    };
    // Waits (bounded) until the scrape shows these counts; returns that scrape.
    let wait_for = |want: [(&str, f64); 4]| {
        let mut text = String::new();
        let seen = crate::util::wait_until(Duration::from_secs(10), || {
            text = scrape(&addr);
            want.iter()
                .all(|(state, n)| gauge(&text, state) == Some(*n))
        });
        assert!(seen, "never {want:?}:\n{text}\n{}", server.log());
        text
    };
    let mut dead = Vec::new();
    for _ in 0..2 {
        let r = server.post("/hooks/D", b"{}");
        assert_eq!(r.status, 202, "{}", r.text());
        dead.push(r.json()["request_id"].as_str().expect("id").to_string());
    }
    // Exit 65: dead at once.
    let text = wait_for([
        ("queued", 0.0),
        ("retrying", 0.0),
        ("running", 0.0),
        ("dead", 2.0),
    ]);
    // Queued runs count in the run figures as sync ones do.
    let runs = |text: &str, line: u32, script: &str, outcome: &str| {
        sample(
            text,
            &format!(
                "hookrunner_runs_total{{line=\"{line}\",script=\"{script}\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(runs(&text, 1, "data.sh", "failed"), Some(2.0), "{text}");
    assert_eq!(
        sample(&text, "hookrunner_run_duration_seconds_count"),
        Some(2.0),
        "{text}"
    );
    // A serial route whose first entry sleeps: the other two wait behind it.
    for _ in 0..3 {
        assert_eq!(server.post("/hooks/S", b"{}").status, 202);
    }
    wait_for([
        ("queued", 2.0),
        ("retrying", 0.0),
        ("running", 1.0),
        ("dead", 2.0),
    ]);
    // The store's "running" mark can be committed (by the next accept's commit) a moment before the
    // dispatcher's thread counts the script as started: the gauge follows, and stays at one.
    let mut text = String::new();
    let started = crate::util::wait_until(Duration::from_secs(10), || {
        text = scrape(&addr);
        sample(&text, "hookrunner_running_scripts") == Some(1.0)
    });
    assert!(
        started,
        "the serial route's script never counted as running:\n{text}"
    );
    assert_eq!(
        gauge(&text, "queued"),
        Some(2.0),
        "the others wait behind it: {text}"
    );
    promtool_accepts(&env, &text);
    // `deliveries drop` from another process: the next scrape reads it from the store (the daemon
    // itself did nothing).
    let cli = |args: &[&str]| {
        let out = crate::store::deliveries(&env, args);
        assert!(
            out.status.success(),
            "deliveries {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cli(&["drop", &dead[0]]);
    let text = scrape(&addr);
    assert_eq!(gauge(&text, "dead"), Some(1.0), "{text}");
    // `deliveries retry` of the other, now fixed: out of dead at once, then run and done.
    fs::write(&fixed, "").expect("fix");
    cli(&["retry", &dead[1]]);
    let text = scrape(&addr);
    assert_eq!(gauge(&text, "dead"), Some(0.0), "{text}");
    wait_for([
        ("queued", 2.0),
        ("retrying", 0.0),
        ("running", 1.0),
        ("dead", 0.0),
    ]);
    // Released, the serial route runs its entries one after the other, and nothing is left.
    fs::write(dir.join("release"), "").expect("release");
    let text = wait_for([
        ("queued", 0.0),
        ("retrying", 0.0),
        ("running", 0.0),
        ("dead", 0.0),
    ]);
    assert_eq!(runs(&text, 2, "slow.sh", "ok"), Some(3.0), "{text}");
    assert_eq!(runs(&text, 1, "data.sh", "ok"), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "hookrunner_running_scripts"),
        Some(0.0),
        "{text}"
    );
}

/// The listener serves one connection at a time, each with 2 s in all to ask: a client that sends its
/// head a byte a second is cut off then, and the scrape waiting behind it is answered.
#[test]
fn a_slow_client_holds_the_metrics_listener_for_2_s_at_most() {
    let env = Env::new().config("metrics_listen = \"127.0.0.1:0\"");
    let server = env.serve();
    let addr = metrics_addr(&server);
    let slow_addr = addr.clone();
    let dribbling = std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(&slow_addr).expect("connect");
        let started = Instant::now();
        let _ = std::io::Write::write_all(&mut stream, b"GET /metrics HTTP/1.1\r\nX-A: ");
        // Until the listener gives up (a failed write), for 20 s at most.
        while started.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(700));
            if std::io::Write::write_all(&mut stream, b"a").is_err() {
                break;
            }
        }
        started.elapsed()
    });
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    assert!(scrape(&addr).contains("hookrunner_"));
    let waited = asked.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "the scrape waited {waited:?} behind a slow client"
    );
    let held = dribbling.join().expect("slow client");
    assert!(held < Duration::from_secs(10), "held for {held:?}");
}

#[test]
fn metrics_listen_must_be_loopback() {
    let env = Env::new().config("metrics_listen = \"0.0.0.0:9464\"");
    let out = env.check();
    assert_eq!(code(&out), 78);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("hookrunner.toml:") && text.contains("metrics_listen"),
        "{text}"
    );
}

#[test]
fn send_reaches_a_unix_socket_from_the_configured_listen_or_a_url() {
    let env = Env::new();
    let socket = env.path().join("hookrunner.sock");
    let env = env.config(&format!("listen = \"unix:{}\"", socket.display()));
    env.script("ComputerAdded", "echo \"unix $HOOKRUNNER_EVENT\"");
    let server =
        crate::util::Server::spawn(env.serve_command(&format!("unix:{}", socket.display())));
    assert!(
        server
            .wait_log("listening on ", Duration::from_secs(10))
            .is_some(),
        "{}",
        server.log()
    );
    // No --url: the configuration's listen decides.
    let out = Command::new(BIN)
        .args(["send", "ComputerAdded", "--config"])
        .arg(env.config_path())
        .output()
        .expect("run send");
    assert_eq!(
        code(&out),
        0,
        "{}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout(&out).contains("HTTP 200"), "{}", stdout(&out));
    let url = format!("unix:{}", socket.display());
    let out = hookrunner(&["send", "ComputerAdded", "--format", "xml", "--url", &url]);
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    assert!(
        server
            .wait_log("unix ComputerAdded", Duration::from_secs(5))
            .is_some()
    );
}
