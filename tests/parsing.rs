//! Bodies as documents, end to end: the costliest shapes at the parse limit, comments and processing
//! instructions that are no text, globs on characters, where a GitLab name came from, and a byte-order mark.

use std::thread;

use crate::util::{Env, Response, Server};

/// The largest body hookrunner parses (gateway.rs's INLINE_BODY).
const LIMIT: usize = 256 << 10;

fn xml(server: &Server, body: &[u8]) -> Response {
    server.request("POST", "/", &[("Content-Type", "text/xml")], body)
}

/// A Jamf XML event `name` whose `<event>` is `filler(i)` nested as deep as fits in LIMIT bytes.
fn jamf_xml_at_the_limit(
    name: &str,
    open: impl Fn(usize) -> String,
    close: impl Fn(usize) -> String,
) -> Vec<u8> {
    let head = format!("<JSSEvent><webhook><webhookEvent>{name}</webhookEvent></webhook><event>");
    let tail = "</event></JSSEvent>";
    let (mut opens, mut closes, mut size) = (String::new(), Vec::new(), head.len() + tail.len());
    for i in 0.. {
        let (o, c) = (open(i), close(i));
        if size + o.len() + c.len() > LIMIT {
            break;
        }
        size += o.len() + c.len();
        opens.push_str(&o);
        closes.push(c);
    }
    closes.reverse();
    let mut body = format!("{head}{opens}{}{tail}", closes.concat()).into_bytes();
    body.resize(LIMIT, b' ');
    body
}

#[test]
fn the_costliest_xml_shapes_at_the_limit_are_parsed_and_routed() {
    let env = Env::new();
    env.script("Deep", "echo ran");
    env.routes("Deep Deep\n");
    let server = env.serve();
    let shapes = [
        // Each element declares a new namespace prefix and uses it: roxmltree took minutes on this one.
        jamf_xml_at_the_limit(
            "Deep",
            |i| format!("<p{i:x}:a xmlns:p{i:x}=\"urn:{i}\">"),
            |i| format!("</p{i:x}:a>"),
        ),
        jamf_xml_at_the_limit(
            "Deep",
            |i| format!("<a{i:x} b=\"\" c=\"\" d=\"\" e=\"\">"),
            |i| format!("</a{i:x}>"),
        ),
        jamf_xml_at_the_limit(
            "Deep",
            |_| "<a><!--c--><?p?>&amp;".into(),
            |_| "<![CDATA[x]]></a>".into(),
        ),
    ];
    for body in &shapes {
        assert_eq!(body.len(), LIMIT);
        let response = xml(&server, body);
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.json()["script"], "Deep");
    }
    // Sixteen at once, past the parse slots: every one waits its turn and is answered.
    let answers: Vec<u16> = thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let (server, body) = (&server, &shapes[i % shapes.len()]);
                s.spawn(move || xml(server, body).status)
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    assert_eq!(answers, vec![200; 16]);
}

#[test]
fn the_costliest_json_shapes_at_the_limit_are_parsed_and_routed() {
    let env = Env::new();
    env.script("Deep", "echo ran");
    env.routes("Deep Deep /webhook/webhookEvent=Deep\n");
    let server = env.serve();
    let at_the_limit = |unit: &str| {
        let (head, tail) = (r#"{"x":["#, r#"0],"webhook":{"webhookEvent":"Deep"}}"#);
        let count = (LIMIT - head.len() - tail.len()) / unit.len();
        let mut body = format!("{head}{}{tail}", unit.repeat(count)).into_bytes();
        body.resize(LIMIT, b' ');
        body
    };
    // Nested as deep as the cap allows, over and over; the smallest values; many keys.
    let deep = format!("{}{},", "[".repeat(120), "]".repeat(120));
    let keys: String = (0..20).map(|i| format!(r#""k{i}":0,"#)).collect();
    for unit in [deep, "0,".to_string(), format!("{{{keys}\"z\":0}},")] {
        let body = at_the_limit(&unit);
        let response = server.post("/", &body);
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.json()["script"], "Deep");
    }
    let too_deep = format!(
        r#"{{"webhook":{{"webhookEvent":"Deep"}},"x":{}{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let response = server.post("/", too_deep.as_bytes());
    assert_eq!(response.status, 400);
    assert!(
        response
            .text()
            .contains("malformed JSON body: recursion limit exceeded"),
        "{}",
        response.text()
    );
}

#[test]
fn malformed_xml_is_400_saying_what_is_wrong() {
    let env = Env::new();
    env.script("A", "exit 0");
    let server = env.serve();
    let cases: [(&[u8], &str); 6] = [
        (
            b"<JSSEvent><webhook></JSSEvent>",
            "malformed XML body: at byte",
        ),
        (b"<JSSEvent/><JSSEvent/>", "a second root element"),
        (b"<JSSEvent>&nbsp;</JSSEvent>", "unknown entity &nbsp;"),
        (b"<JSSEvent a=\"1\" a=\"2\"/>", "duplicate attribute a"),
        (
            b"<!DOCTYPE JSSEvent><JSSEvent/>",
            "DTDs (<!DOCTYPE>) are not accepted",
        ),
        (b"<JSSEvent>", "the body ends inside an element"),
    ];
    for (body, says) in cases {
        let response = xml(&server, body);
        assert_eq!(response.status, 400, "{}", String::from_utf8_lossy(body));
        assert!(
            response.text().contains("malformed XML body: "),
            "{}",
            response.text()
        );
        assert!(response.text().contains(says), "{}", response.text());
    }
}

#[test]
fn comments_and_processing_instructions_are_not_text() {
    let env = Env::new();
    env.script("Env", "exit 0");
    env.script("mac.sh", "exit 0");
    env.script("other.sh", "exit 0");
    env.routes(
        "Env Env\n\
         ComputerAdded mac.sh /event/deviceName=Mac*\n\
         ComputerAdded other.sh\n",
    );
    let server = env.serve();
    for event in ["<!--Env-->", "<?Env?>", "<?x Env?>"] {
        let body =
            format!("<JSSEvent><webhook><webhookEvent>{event}</webhookEvent></webhook></JSSEvent>");
        let response = xml(&server, body.as_bytes());
        assert_eq!(response.status, 400, "{event}: {}", response.text());
        let error = response.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            error.starts_with("invalid event name \"\" from XML"),
            "{error}"
        );
    }
    let with_device = |device: &str| {
        let body = format!(
            "<JSSEvent><webhook><webhookEvent>Computer<!--x-->Added</webhookEvent></webhook>\
             <event><deviceName>{device}</deviceName></event></JSSEvent>"
        );
        let response = xml(&server, body.as_bytes());
        assert_eq!(response.status, 200, "{device}: {}", response.text());
        response.json()["script"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        with_device("<!--Mac-->"),
        "other.sh",
        "a comment satisfies no filter"
    );
    assert_eq!(
        with_device("<?Mac?>Book"),
        "other.sh",
        "nor does a processing instruction"
    );
    assert_eq!(with_device("<x>Mac</x>"), "other.sh", "nor a child's text");
    assert_eq!(
        with_device("<![CDATA[Mac]]> mini"),
        "mac.sh",
        "CDATA is text"
    );
    assert_eq!(
        with_device("M<!--x-->ac"),
        "mac.sh",
        "text around a comment is one value"
    );
}

#[test]
fn route_globs_match_characters_not_bytes() {
    let env = Env::new();
    env.script("one.sh", "exit 0");
    env.script("other.sh", "exit 0");
    env.routes(
        "ComputerAdded one.sh /event/deviceName=\"Charly?s ?Mac\"\n\
         ComputerAdded other.sh\n",
    );
    let server = env.serve();
    let script = |device: &str| {
        let body = serde_json::json!({"webhook": {"webhookEvent": "ComputerAdded"}, "event": {"deviceName": device}});
        let response = server.post("/", body.to_string().as_bytes());
        assert_eq!(response.status, 200, "{}", response.text());
        response.json()["script"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        script("Charly’s iMac"),
        "one.sh",
        "’ is one character of three bytes"
    );
    assert_eq!(script("Charly's éMac"), "one.sh");
    assert_eq!(script("Charly's 😀Mac"), "one.sh");
    assert_eq!(
        script("Charly's Mac"),
        "other.sh",
        "? is exactly one character"
    );
    assert_eq!(script("Charly’’s iMac"), "other.sh");
}

#[test]
fn a_gitlab_name_says_whether_it_came_from_the_body_or_the_header() {
    let env = Env::new();
    env.script("tag_push", "exit 0");
    env.script("push", "exit 0");
    let server = env.serve();
    let gitlab = |body: &str, header: &str| {
        server.request(
            "POST",
            "/",
            &[
                ("Content-Type", "application/json"),
                ("X-Gitlab-Event", header),
            ],
            body.as_bytes(),
        )
    };
    let from_body = gitlab(r#"{"object_kind":"tag push!"}"#, "Push Hook");
    assert_eq!(from_body.status, 400);
    let error = from_body.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("\"tag push!\" from JSON /object_kind (GitLab)"),
        "{error}"
    );
    let from_header = gitlab("{}", "Push/Hook");
    assert_eq!(from_header.status, 400);
    assert!(
        from_header.text().contains("from header X-Gitlab-Event"),
        "{}",
        from_header.text()
    );
    // object_kind wins over the header's name.
    let both = gitlab(r#"{"object_kind":"tag_push"}"#, "Push Hook");
    assert_eq!(both.status, 200, "{}", both.text());
    assert_eq!(both.json()["script"], "tag_push");
    assert_eq!(gitlab("{}", "Push Hook").json()["script"], "push");
}

#[test]
fn a_json_body_with_a_byte_order_mark_is_accepted() {
    let env = Env::new();
    env.script("bom.sh", "cat \"$1\" > \"$(dirname \"$0\")/../seen\"");
    env.script("other.sh", "exit 0");
    env.routes(
        "ComputerAdded bom.sh /event/deviceName=Mac\n\
         ComputerAdded other.sh\n",
    );
    let server = env.serve();
    let mut body = b"\xEF\xBB\xBF".to_vec();
    body.extend_from_slice(
        br#"{"webhook":{"webhookEvent":"ComputerAdded"},"event":{"deviceName":"Mac"}}"#,
    );
    for content_type in [Some("application/json"), None] {
        let headers: Vec<(&str, &str)> = content_type
            .map(|t| ("Content-Type", t))
            .into_iter()
            .collect();
        let response = server.request("POST", "/", &headers, &body);
        assert_eq!(
            response.status,
            200,
            "{content_type:?}: {}",
            response.text()
        );
        assert_eq!(
            response.json()["script"],
            "bom.sh",
            "the filter read the body too"
        );
    }
    assert_eq!(
        std::fs::read(env.path().join("seen")).expect("the script saw the body"),
        body,
        "the script gets the body as sent, mark included"
    );
}
