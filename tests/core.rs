//! The request path end to end: real payloads routed to real scripts, and the statuses that tell the truth.

use std::fs;

use crate::util::{Env, payload};

/// A script that records its `$1` contents, argv, environment and payload file mode for inspection.
fn recorder(env: &Env, name: &str) {
    let out = env.path().join("out");
    env.script(
        name,
        &format!(
            "out={out:?}\nmkdir -p \"$out\"\ncp \"$1\" \"$out/body\"\nstat -c %a \"$1\" > \"$out/mode\"\n\
             stat -c %a \"$(dirname \"$1\")\" > \"$out/dirmode\"\necho \"$1\" > \"$out/path\"\necho $# > \"$out/argc\"\n\
             env | sort > \"$out/env\"\nls /proc/self/fd > \"$out/fds\"\n"
        ),
    );
}

fn recorded(env: &Env, what: &str) -> String {
    fs::read_to_string(env.path().join("out").join(what)).unwrap_or_else(|e| panic!("{what}: {e}"))
}

#[test]
fn jamf_json_runs_the_routed_script_with_the_exact_body_and_environment() {
    let env = Env::new();
    recorder(&env, "computer-added.sh");
    env.routes("ComputerAdded computer-added.sh\n");
    let server = env.serve();
    let body = payload("jamf-json-ComputerAdded.chook.json");
    let response = server.request(
        "POST",
        "/jamf?x=1",
        &[
            ("Content-Type", "application/json"),
            ("X-Request-Id", "abc-123"),
        ],
        &body,
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("X-Request-Id"), Some("abc-123"));
    let json = response.json();
    assert_eq!(json["event"], "ComputerAdded");
    assert_eq!(json["script"], "computer-added.sh");
    assert_eq!(json["exit_code"], 0);
    // Our own id, not the client's: the client's is echoed in the header and logged as its own field.
    let ours = json["request_id"].as_str().expect("request_id").to_string();
    assert!(!ours.is_empty() && ours != "abc-123", "{ours}");
    assert!(json["duration_ms"].as_f64().is_some());
    assert_eq!(
        fs::read(env.path().join("out/body")).expect("body"),
        body,
        "exact bytes"
    );
    assert_eq!(recorded(&env, "mode").trim(), "600");
    assert_eq!(recorded(&env, "dirmode").trim(), "700");
    assert_eq!(recorded(&env, "argc").trim(), "1");
    let vars: Vec<String> = recorded(&env, "env")
        .lines()
        .map(|l| l.split('=').next().unwrap_or("").to_string())
        .collect();
    let allowed = [
        "HOOKRUNNER_BIN",
        "HOOKRUNNER_CLIENT_ADDR",
        "HOOKRUNNER_CONTENT_TYPE",
        "HOOKRUNNER_EVENT",
        "HOOKRUNNER_METHOD",
        "HOOKRUNNER_PATH",
        "HOOKRUNNER_QUERY",
        "HOOKRUNNER_REMOTE_ADDR",
        "HOOKRUNNER_REQUEST_ID",
        "HOOKRUNNER_SENDER",
        "HOOKRUNNER_DELIVERY_ID",
        "LANG",
        "PATH",
        // set by sh itself
        "PWD",
        "SHLVL",
        "_",
        "OLDPWD",
    ];
    for var in &vars {
        assert!(
            allowed.contains(&var.as_str()),
            "unexpected variable {var} in the script's environment"
        );
    }
    let env_text = recorded(&env, "env");
    for expected in [
        "HOOKRUNNER_EVENT=ComputerAdded",
        &format!("HOOKRUNNER_REQUEST_ID={ours}"),
        "HOOKRUNNER_CONTENT_TYPE=application/json",
        "HOOKRUNNER_METHOD=POST",
        &format!("HOOKRUNNER_BIN={}\n", crate::util::BIN),
        "HOOKRUNNER_PATH=/jamf",
        "HOOKRUNNER_QUERY=x=1",
        "HOOKRUNNER_REMOTE_ADDR=127.0.0.1:",
        "HOOKRUNNER_CLIENT_ADDR=127.0.0.1\n",
        // No sender, no delivery id: set, and empty.
        "HOOKRUNNER_SENDER=\n",
        "HOOKRUNNER_DELIVERY_ID=\n",
        "LANG=C.UTF-8",
    ] {
        assert!(
            env_text.contains(expected),
            "missing {expected} in\n{env_text}"
        );
    }
    // `ls` lists its own descriptors: what the shell passed on (0-2) plus the one it opens to read the
    // directory (3). Any descriptor leaked by the daemon would show up as a fifth entry.
    let fds: Vec<String> = recorded(&env, "fds").lines().map(str::to_string).collect();
    assert_eq!(
        fds,
        ["0", "1", "2", "3"],
        "only stdin, stdout and stderr reach the script"
    );
    let path = recorded(&env, "path");
    assert!(
        !std::path::Path::new(path.trim()).exists(),
        "payload file removed after the run"
    );
    assert!(
        server
            .wait_log(
                &format!("{ours} 127.0.0.1:"),
                std::time::Duration::from_secs(5)
            )
            .is_some_and(|l| {
                l.contains("POST /jamf client_id=abc-123 ")
                    && l.contains("event=ComputerAdded")
                    && l.contains("status=200")
                    && l.contains("exit=0")
            })
    );
}

/// A `set -u` script (the shipped examples' style) may read every documented variable, whatever the request
/// lacks: Jamf sends no query string, a Kazoo GET no Content-Type, neither a sender or a delivery id.
#[test]
fn a_set_u_script_reads_every_variable_of_a_request_that_has_none_of_the_optional_ones() {
    let env = Env::new();
    let out = env.path().join("seen");
    env.script(
        "strict.sh",
        &format!(
            "set -eu\nprintf '%s|%s|%s|%s|%s\\n' \"$HOOKRUNNER_QUERY\" \"$HOOKRUNNER_CONTENT_TYPE\" \
             \"$HOOKRUNNER_SENDER\" \"$HOOKRUNNER_DELIVERY_ID\" \"$HOOKRUNNER_EVENT\" > {out:?}\n"
        ),
    );
    env.routes("* strict.sh\n");
    let server = env.serve();
    let answer = server.request("GET", "/hooks/channel_create", &[], b"");
    assert_eq!(answer.status, 200, "{}\n{}", answer.text(), server.log());
    assert_eq!(
        fs::read_to_string(&out).expect("the script ran to its end"),
        "||||channel_create\n"
    );
}

#[test]
fn jamf_xml_is_routed_by_its_webhook_event() {
    let env = Env::new();
    recorder(&env, "ComputerAdded");
    let server = env.serve();
    let body = payload("jamf-xml-ComputerAdded.jook-simulator.xml");
    let response = server.request("POST", "/", &[("Content-Type", "text/xml")], &body);
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(fs::read(env.path().join("out/body")).expect("body"), body);
    assert!(recorded(&env, "env").contains("HOOKRUNNER_CONTENT_TYPE=text/xml"));
}

#[test]
fn every_sample_jamf_json_event_is_named_from_its_body() {
    let env = Env::new();
    env.script("catch-all", "exit 0");
    env.routes("* catch-all\n");
    let server = env.serve();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/payloads");
    let mut seen = 0;
    for entry in fs::read_dir(&dir).expect("payload dir") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        let Some(event) = name
            .strip_prefix("jamf-json-")
            .and_then(|n| n.strip_suffix(".chook.json"))
        else {
            continue;
        };
        let response = server.post("/", &payload(&name));
        assert_eq!(response.status, 200, "{name}: {}", response.text());
        assert!(
            response.json()["event"]
                .as_str()
                .is_some_and(|e| e.eq_ignore_ascii_case(event)),
            "{name}"
        );
        seen += 1;
    }
    assert!(seen >= 18, "only {seen} Jamf samples found");
}

#[test]
fn non_zero_exit_is_500_with_the_code() {
    let env = Env::new();
    env.script("fail", "echo failing >&2; exit 3");
    let server = env.serve();
    let response = server.post("/hooks/fail", b"{}");
    assert_eq!(response.status, 500);
    assert_eq!(response.json()["exit_code"], 3);
    assert_eq!(response.json()["event"], "fail");
    assert!(
        server
            .wait_log("fail[stderr]: failing", std::time::Duration::from_secs(5))
            .is_some(),
        "the script's stderr is logged"
    );
}

#[test]
fn script_killed_by_a_signal_is_500() {
    let env = Env::new();
    env.script("crash", "kill -9 $$");
    let server = env.serve();
    let response = server.post("/hooks/crash", b"");
    assert_eq!(response.status, 500);
    assert_eq!(response.json()["signal"], 9);
    assert!(response.json()["exit_code"].is_null());
}

#[test]
fn unknown_event_is_404_naming_the_event() {
    let env = Env::new();
    env.script("known", "exit 0");
    env.routes("Known known\n");
    let server = env.serve();
    let response = server.post("/hooks/Unknown", b"{}");
    assert_eq!(response.status, 404);
    assert!(response.text().contains("Unknown"), "{}", response.text());
}

#[test]
fn missing_invalid_or_unparsable_event_is_400_saying_what_was_looked_for() {
    let env = Env::new();
    env.script("x", "exit 0");
    let server = env.serve();
    let none = server.post("/", br#"{"nothing":"here"}"#);
    assert_eq!(none.status, 400);
    assert!(
        none.text().contains("/webhook/webhookEvent"),
        "{}",
        none.text()
    );
    let invalid = server.post("/hooks/..%2Fetc%2Fpasswd", b"");
    assert_eq!(invalid.status, 400);
    assert!(
        invalid.text().contains("invalid event name"),
        "{}",
        invalid.text()
    );
    let json = server.post("/", br#"{"webhook": {"webhookEvent": "#);
    assert_eq!(json.status, 400);
    assert!(json.text().contains("malformed JSON"), "{}", json.text());
    let xml = server.request(
        "POST",
        "/",
        &[("Content-Type", "text/xml")],
        b"<JSSEvent><webhook>",
    );
    assert_eq!(xml.status, 400);
    assert!(xml.text().contains("malformed XML"), "{}", xml.text());
    let dtd = b"<?xml version=\"1.0\"?><!DOCTYPE a [<!ENTITY e \"x\">]><JSSEvent>&e;</JSSEvent>";
    assert_eq!(
        server
            .request("POST", "/", &[("Content-Type", "text/xml")], dtd)
            .status,
        400
    );
}

#[test]
fn routing_globs_first_match_templates_filters_and_case() {
    let env = Env::new();
    for name in ["charly.sh", "added.sh", "mobile.sh"] {
        env.script(name, &format!("echo {name}"));
    }
    env.script("PatchSoftwareTitleUpdated", "exit 0");
    env.routes(
        "ComputerAdded  charly.sh  /event/deviceName=\"Charly's iMac\"\n\
         computeradded  added.sh   timeout=60s\n\
         MobileDevice*  mobile.sh\n\
         *              {event}\n",
    );
    let server = env.serve();
    let charly =
        br#"{"webhook":{"webhookEvent":"ComputerAdded"},"event":{"deviceName":"Charly's iMac"}}"#;
    assert_eq!(server.post("/", charly).json()["script"], "charly.sh");
    let other =
        br#"{"webhook":{"webhookEvent":"ComputerAdded"},"event":{"deviceName":"wanderer"}}"#;
    assert_eq!(server.post("/", other).json()["script"], "added.sh");
    let xml = b"<JSSEvent><webhook><webhookEvent>ComputerAdded</webhookEvent></webhook><event><deviceName>Charly's iMac</deviceName></event></JSSEvent>";
    let response = server.request("POST", "/", &[("Content-Type", "text/xml")], xml);
    assert_eq!(
        response.json()["script"],
        "charly.sh",
        "filters read XML with the same path"
    );
    let enrolled = payload("jamf-json-MobileDeviceEnrolled.chook.json");
    assert_eq!(server.post("/", &enrolled).json()["script"], "mobile.sh");
    let patch = payload("jamf-json-PatchSoftwareTitleUpdated.chook.json");
    assert_eq!(
        server.post("/", &patch).json()["script"],
        "PatchSoftwareTitleUpdated"
    );
    assert_eq!(
        server.post("/hooks/patchsoftwaretitleupdated", b"").json()["script"],
        "PatchSoftwareTitleUpdated"
    );
    assert_eq!(
        server.post("/hooks/NoSuchScript", b"").status,
        404,
        "a template without its file does not match"
    );
}

#[test]
fn unsafe_template_script_is_refused_with_500() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let ran = env.path().join("ran");
    let chmod = |name: &str, mode: u32| {
        let script = env.script(name, &format!("echo {name} >> {ran:?}"));
        fs::set_permissions(&script, fs::Permissions::from_mode(mode)).expect("chmod");
    };
    chmod("GroupWritable", 0o775);
    chmod("WorldWritable", 0o757);
    chmod("NotExecutable", 0o644);
    fs::create_dir(env.scripts().join("ADirectory")).expect("mkdir");
    let fifo = env.scripts().join("AFifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo {}", fifo.display());
    // A fixed script is checked when the routes load, and its mode again per request; so is every
    // directory between it and scripts_dir.
    env.script("fixed.sh", &format!("echo fixed.sh >> {ran:?}"));
    fs::create_dir(env.scripts().join("sub")).expect("mkdir sub");
    env.script("sub/in-sub.sh", &format!("echo in-sub >> {ran:?}"));
    env.routes("Fixed fixed.sh\nInSub sub/in-sub.sh\n* {event}\n");
    // Owned by somebody else, who could change what runs as the daemon (root only can give it away).
    let root = rustix::process::geteuid().is_root();
    if root {
        let foreign = env.script("Foreign", &format!("echo Foreign >> {ran:?}"));
        let chowned = std::process::Command::new("chown")
            .arg("65534")
            .arg(&foreign)
            .status()
            .expect("run chown");
        assert!(chowned.success());
    }
    let server = env.serve();
    fs::set_permissions(
        env.scripts().join("fixed.sh"),
        fs::Permissions::from_mode(0o777),
    )
    .expect("chmod fixed.sh");
    fs::set_permissions(env.scripts().join("sub"), fs::Permissions::from_mode(0o777))
        .expect("chmod sub");
    let mut cases = vec![
        ("GroupWritable", "is writable by group or others (mode 775)"),
        ("WorldWritable", "is writable by group or others (mode 757)"),
        ("NotExecutable", "is not executable"),
        ("ADirectory", "is not a regular file"),
        ("AFifo", "is not a regular file"),
        ("Fixed", "is writable by group or others (mode 777)"),
        // The sender reads "its directory is writable ...", the log names the directory.
        ("InSub", "is writable by group or others (mode 777)"),
    ];
    if root {
        cases.push(("Foreign", "is owned by another user (uid 65534)"));
    }
    for (event, why) in cases {
        let response = server.post(&format!("/hooks/{event}"), b"");
        assert_eq!(response.status, 500, "{event}: {}", response.text());
        let error = response.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            error.starts_with("refusing to run script") && error.contains(why),
            "{event}: {error}"
        );
        // The sender learns what is wrong, not where this machine keeps its scripts; the log says both.
        let dir = env.path().display().to_string();
        assert!(!error.contains(&dir), "{event}: {error}");
        let id = response.json()["request_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let logged = server
            .wait_log(
                &format!("{id} refusing to run"),
                std::time::Duration::from_secs(5),
            )
            .unwrap_or_else(|| panic!("{event}: no refusal logged\n{}", server.log()));
        assert!(
            logged.contains(&format!("{dir}/scripts/")) && logged.contains(why),
            "{event}: {logged}"
        );
    }
    assert!(!ran.exists(), "no unsafe script ran");
    fs::set_permissions(
        env.scripts().join("fixed.sh"),
        fs::Permissions::from_mode(0o755),
    )
    .expect("chmod fixed.sh back");
    assert_eq!(
        server.post("/hooks/Fixed", b"").status,
        200,
        "the same script, made safe again, runs"
    );
}

#[test]
fn github_names_the_event_in_its_header() {
    let env = Env::new();
    recorder(&env, "ping");
    let server = env.serve();
    let body = payload("github-json-ping.json");
    let response = server.request(
        "POST",
        "/",
        &[
            ("X-GitHub-Event", "ping"),
            ("Content-Type", "application/json"),
        ],
        &body,
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["event"], "ping");
    assert_eq!(response.json()["script"], "ping");
    assert_eq!(fs::read(env.path().join("out/body")).expect("body"), body);
    assert!(recorded(&env, "env").contains("HOOKRUNNER_EVENT=ping\n"));
}

/// GitLab's sample push with its `object_kind` replaced (`Some`) or removed (`None`). Its `event_name` stays
/// `push`, which the JSON sources would pick if the GitLab source did not decide first.
fn gitlab_push_with_object_kind(kind: Option<&str>) -> Vec<u8> {
    let mut json: serde_json::Value =
        serde_json::from_slice(&payload("gitlab-json-push.docs.json")).expect("sample is JSON");
    let fields = json.as_object_mut().expect("sample is an object");
    assert_eq!(fields["event_name"], "push");
    match kind {
        Some(kind) => fields.insert("object_kind".into(), kind.into()),
        None => fields.remove("object_kind"),
    };
    serde_json::to_vec(&json).expect("serialize")
}

#[test]
fn gitlab_object_kind_wins_over_the_header_which_names_the_rest() {
    let env = Env::new();
    for script in ["push", "tag_push", "merge_request"] {
        env.script(script, "exit 0");
    }
    let server = env.serve();
    let gitlab = |header: &str, body: &[u8]| {
        server.request(
            "POST",
            "/",
            &[
                ("X-Gitlab-Event", header),
                ("Content-Type", "application/json"),
            ],
            body,
        )
    };
    let tagged = gitlab("Push Hook", &gitlab_push_with_object_kind(Some("tag_push")));
    assert_eq!(tagged.status, 200, "{}", tagged.text());
    assert_eq!(tagged.json()["event"], "tag_push", "object_kind wins");
    assert_eq!(tagged.json()["script"], "tag_push");
    let unkinded = gitlab("Merge Request Hook", &gitlab_push_with_object_kind(None));
    assert_eq!(unkinded.status, 200, "{}", unkinded.text());
    assert_eq!(
        unkinded.json()["event"],
        "merge_request",
        "without object_kind the header names the event"
    );
    assert_eq!(unkinded.json()["script"], "merge_request");
    let sample = gitlab("Push Hook", &payload("gitlab-json-push.docs.json"));
    assert_eq!(sample.status, 200, "{}", sample.text());
    assert_eq!(sample.json()["script"], "push");
}

#[test]
fn kazoo_names_the_event_in_the_query_or_a_form_field() {
    let env = Env::new();
    env.script(
        "channel_answer",
        "test \"$(cat \"$1\")\" = 'hook_event=channel_answer&call_id=7'",
    );
    env.script(
        "voicemail_new",
        "test \"$(cat \"$1\")\" = 'event_name=voicemail_new&account_id=1'",
    );
    let server = env.serve();
    let get = server.get("/kazoo?hook_event=channel_answer&call_id=7");
    assert_eq!(
        get.status,
        200,
        "the script saw the raw query string as its payload: {}",
        get.text()
    );
    assert_eq!(get.json()["event"], "channel_answer");
    let form = server.request(
        "PUT",
        "/",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        b"event_name=voicemail_new&account_id=1",
    );
    assert_eq!(
        form.status,
        200,
        "the script saw the form as its payload: {}",
        form.text()
    );
    assert_eq!(form.json()["event"], "voicemail_new");
}

/// Kazoo's object hooks (its own sample bodies) are all named by `/type`; the README's route lines tell
/// the actions apart with a field filter.
#[test]
fn kazoo_object_hooks_are_told_apart_by_their_action() {
    let env = Env::new();
    let out = env.path().join("ran");
    for script in ["user-created", "user-changed"] {
        env.script(script, &format!("echo {script} >> {out:?}"));
    }
    env.routes("user  user-created  /action=doc_created\nuser  user-changed  /action=doc_edited\n");
    let server = env.serve();
    let samples: serde_json::Value =
        serde_json::from_slice(&payload("kazoo-json-object.samples.json")).expect("JSON samples");
    let statuses: Vec<(String, u16)> = samples
        .as_array()
        .expect("an array of bodies")
        .iter()
        .map(|body| {
            let answer = server.post("/kazoo", body.to_string().as_bytes());
            (
                body["action"].as_str().unwrap_or_default().to_string(),
                answer.status,
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [
            ("doc_created".to_string(), 200),
            ("doc_deleted".to_string(), 404),
            ("doc_edited".to_string(), 200)
        ]
    );
    assert_eq!(
        fs::read_to_string(&out).expect("ran"),
        "user-created\nuser-changed\n"
    );
}

#[test]
fn healthz_answers_200() {
    let env = Env::new();
    let server = env.serve();
    let response = server.get("/healthz");
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["status"], "ok");
    assert!(
        response
            .header("X-Request-Id")
            .is_some_and(|id| !id.is_empty())
    );
    assert!(response.header("Date").is_some_and(|d| d.ends_with(" GMT")));
}

#[test]
fn configured_event_sources_replace_the_defaults() {
    let env = Env::new().config(r#"event = ["header:X-Foo", "json:/meta/kind"]"#);
    env.script("from-header", "exit 0");
    env.script("from-json", "exit 0");
    let server = env.serve();
    let response = server.request("POST", "/hooks/ignored", &[("X-Foo", "from-header")], b"");
    assert_eq!(response.json()["event"], "from-header");
    assert_eq!(
        server
            .post("/hooks/ignored", br#"{"meta":{"kind":"from-json"}}"#)
            .json()["event"],
        "from-json"
    );
    // Neither configured source yields: the defaults (the path, Jamf's field) must not step in.
    let jamf = br#"{"webhook":{"webhookEvent":"from-json"}}"#;
    let unnamed = server.post("/hooks/from-header", jamf);
    assert_eq!(unnamed.status, 400, "{}", unnamed.text());
}

/// `check` run as root (to read the credentials of `LoadCredential=`) is not the user the daemon runs as:
/// it checks scripts for the owner of `state_dir`, which is that user (the package's `hookrunner`). Root
/// itself may run a 750 script of root's; that user may not.
#[test]
fn check_run_as_root_checks_scripts_for_the_user_that_owns_state_dir() {
    use std::os::unix::fs::PermissionsExt;
    if !rustix::process::geteuid().is_root() {
        println!("skipped: checking as root needs root");
        return;
    }
    let env = Env::new();
    let script = env.script("private.sh", "exit 0");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o750)).expect("chmod");
    env.routes("A private.sh\n");
    fs::create_dir(env.state()).expect("mkdir state");
    fs::set_permissions(env.state(), fs::Permissions::from_mode(0o700)).expect("chmod state");
    std::os::unix::fs::chown(env.state(), Some(65534), Some(65534)).expect("chown state");
    let out = env.check();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{said}");
    assert!(
        said.contains(
            "is not executable by the daemon's user (uid 65534, neither its owner nor in its group"
        ),
        "{said}"
    );
    // The unit's Group= is state_dir's group, whatever the user's passwd entry says (a user made by
    // hand has nogroup there): root's script, 750, of that group, the daemon may run.
    std::os::unix::fs::chown(env.state(), Some(65534), Some(54321)).expect("chgrp state");
    std::os::unix::fs::chown(&script, Some(0), Some(54321)).expect("chgrp script");
    let out = env.check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // That user's own script, 700: owned by "another user" to root, and fine for the daemon.
    std::os::unix::fs::chown(&script, Some(65534), Some(65534)).expect("chown script");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o700)).expect("chmod");
    let out = env.check();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("(uid 65534), the owner of state_dir")
            && listed.contains("# configuration OK"),
        "{listed}"
    );
}

/// A scripts directory holds files that are not scripts: the package's README, dpkg's copies beside a
/// changed file. An event named after one finds no route; it is not a script that failed.
#[test]
fn an_event_never_runs_a_readme_or_a_package_managers_copy() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let ran = env.path().join("ran");
    fs::write(env.scripts().join("README"), "Scripts for hookrunner\n").expect("write README");
    fs::set_permissions(
        env.scripts().join("README"),
        fs::Permissions::from_mode(0o644),
    )
    .expect("chmod README");
    env.script("ComputerAdded.dpkg-dist", &format!("echo ran >> {ran:?}"));
    env.script("ComputerAdded", &format!("echo ComputerAdded >> {ran:?}"));
    env.routes("* {event}\n");
    let server = env.serve();
    for event in ["README", "readme", "ComputerAdded.dpkg-dist"] {
        let answer = server.post(&format!("/hooks/{event}"), b"{}");
        assert_eq!(answer.status, 404, "{event}: {}", answer.text());
    }
    assert_eq!(server.post("/hooks/ComputerAdded", b"{}").status, 200);
    assert_eq!(fs::read_to_string(&ran).expect("ran"), "ComputerAdded\n");
    assert!(!server.log().contains("chmod 755"), "{}", server.log());
}

#[test]
fn check_prints_the_table_or_file_and_line_errors() {
    let env = Env::new();
    env.script("a.sh", "exit 0");
    env.routes("# comment\nComputer* a.sh timeout=5s\n* {event}\n");
    let ok = env.check();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        out.contains("line 2") && out.contains("Computer*") && out.contains("a.sh"),
        "{out}"
    );
    env.routes("Computer* a.sh\nbroken a.sh frobnicate=1\n");
    let bad = env.check();
    assert_eq!(bad.status.code(), Some(78));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("routes:2:") && err.contains("unknown option"),
        "{err}"
    );
    let env = Env::new().config("max_body = \"lots\"");
    let bad = env.check();
    assert_eq!(bad.status.code(), Some(78));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("hookrunner.toml:3:") && err.contains("invalid size"),
        "{err}"
    );
}

#[test]
fn the_shipped_etc_config_passes_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(crate::util::BIN)
        .args(["check", "--config"])
        .arg(root.join("etc/hookrunner.toml"))
        .arg("--scripts-dir")
        .arg(root.join("scripts"))
        .output()
        .expect("run check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn large_bodies_reach_the_script_but_are_not_parsed() {
    let env = Env::new();
    recorder(&env, "Big");
    let server = env.serve();
    // 1 MiB of JSON: past the 256 KiB parse limit, streamed to the payload file as it arrives.
    let mut body = br#"{"webhook":{"webhookEvent":"Big"},"pad":""#.to_vec();
    body.extend(std::iter::repeat_n(b'x', 1 << 20));
    body.extend_from_slice(b"\"}");
    let named = server.post("/hooks/Big", &body);
    assert_eq!(named.status, 200, "{}", named.text());
    assert_eq!(
        fs::read(env.path().join("out/body")).expect("body"),
        body,
        "exact bytes"
    );
    let unnamed = server.post("/", &body);
    assert_eq!(unnamed.status, 400);
    assert!(unnamed.text().contains("not parsed"), "{}", unnamed.text());
}

#[test]
fn deeply_nested_json_is_refused_without_harm() {
    let env = Env::new();
    env.script("x", "exit 0");
    let server = env.serve();
    // Just inside serde_json's recursion limit: parsed (on a worker's small stack), no event in it.
    let within = format!("{}{}", "[".repeat(127), "]".repeat(127));
    let response = server.post("/", within.as_bytes());
    assert_eq!(response.status, 400);
    assert!(
        response.text().contains("no event name"),
        "{}",
        response.text()
    );
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let response = server.post("/", deep.as_bytes());
    assert_eq!(response.status, 400);
    assert!(
        response.text().contains("malformed JSON"),
        "{}",
        response.text()
    );
    assert_eq!(server.get("/healthz").status, 200, "the daemon survived");
}

#[test]
fn a_hostile_event_value_cannot_forge_a_log_line() {
    let env = Env::new();
    let server = env.serve();
    let response = server.post("/", br#"{"webhook":{"webhookEvent":"x\n<0>forged"}}"#);
    assert_eq!(response.status, 400);
    let line = server
        .wait_log("status=400", std::time::Duration::from_secs(5))
        .expect("request logged");
    assert!(line.contains(r#"event="x\x0a<0>forged""#), "{line}");
    assert!(
        !server.log().lines().any(|l| l.starts_with("<0>")),
        "{}",
        server.log()
    );
}
