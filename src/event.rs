//! Finding a request's event name: an ordered list of [`Source`]s, the first that yields a name wins.

use std::borrow::Cow;
use std::fmt;

use crate::document::{Document, MalformedBody, percent_decode};

/// Where GitLab puts the event's kind in its JSON bodies.
const GITLAB_KIND: &str = "/object_kind";

/// Where an event name may be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The URL path `/hooks/<name>`, or a path ending in it (`/jamf/hooks/<name>`).
    Path,
    /// A request header's value.
    Header(String),
    /// GitLab: the body's `/object_kind` when the request carries `X-Gitlab-Event`, else that header's
    /// value made a name (`Push Hook` → `push`).
    Gitlab,
    /// A string at a JSON pointer in a JSON body.
    Json(String),
    /// An element's text in an XML body.
    Xml(String),
    /// A field of an `application/x-www-form-urlencoded` body.
    Form(String),
    /// A query-string parameter.
    Query(String),
}

/// The sources tried when the configuration does not set `event`.
pub fn default_sources() -> Vec<Source> {
    let mut sources = vec![
        Source::Path,
        Source::Header("X-GitHub-Event".into()),
        Source::Gitlab,
        Source::Json("/webhook/webhookEvent".into()),
        Source::Json("/event".into()),
        Source::Json("/type".into()),
        Source::Json("/hook_event".into()),
        Source::Json("/event_name".into()),
        Source::Json("/object_kind".into()),
        Source::Xml("/JSSEvent/webhook/webhookEvent".into()),
    ];
    for field in ["hook_event", "event_name", "event", "type"] {
        sources.push(Source::Form(field.into()));
        sources.push(Source::Query(field.into()));
    }
    sources
}

impl Source {
    pub fn parse(text: &str) -> Result<Source, String> {
        let source = match text.split_once(':') {
            None if text == "path" => Source::Path,
            None if text == "gitlab" => Source::Gitlab,
            Some(("header", name)) if is_token(name) => Source::Header(name.into()),
            Some(("json", path)) if path.starts_with('/') => Source::Json(path.into()),
            Some(("xml", path)) if path.starts_with('/') && path.len() > 1 => {
                Source::Xml(path.into())
            }
            Some(("form", field)) if !field.is_empty() => Source::Form(field.into()),
            Some(("query", field)) if !field.is_empty() => Source::Query(field.into()),
            _ => {
                return Err(format!(
                    "invalid event source {text:?}: use path, gitlab, header:NAME, json:/pointer, \
                     xml:/path, form:FIELD or query:FIELD"
                ));
            }
        };
        Ok(source)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Path => f.write_str("path /hooks/<name>"),
            Source::Header(h) => write!(f, "header {h}"),
            Source::Gitlab => f.write_str("header X-Gitlab-Event"),
            Source::Json(p) => write!(f, "JSON {p}"),
            Source::Xml(p) => write!(f, "XML {p}"),
            Source::Form(k) => write!(f, "form field {k}"),
            Source::Query(k) => write!(f, "query parameter {k}"),
        }
    }
}

fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// `^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`: safe as a file name and in a log line.
pub fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=128).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// What event resolution reads from a request.
pub trait Inputs {
    fn path(&self) -> &str;
    fn query(&self) -> &str;
    fn header(&self, name: &str) -> Option<&str>;
    /// The parsed body; parsing happens at most once, and only if a source needs it.
    fn document(&mut self) -> Result<&Document, MalformedBody>;
}

/// Why no event name could be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventError {
    /// No source yielded a name; holds the list of what was looked for.
    NotFound(String),
    /// A source yielded a value that is not a valid name.
    Invalid {
        source: String,
        value: String,
    },
    Malformed(MalformedBody),
}

impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventError::NotFound(looked) => write!(f, "no event name found; looked for: {looked}"),
            EventError::Invalid { source, value } => write!(
                f,
                "invalid event name {value:?} from {source}: names are 1-128 of A-Z a-z 0-9 _ . - \
                 and start with a letter or digit"
            ),
            EventError::Malformed(m) => f.write_str(&m.0),
        }
    }
}

pub fn resolve(sources: &[Source], inputs: &mut impl Inputs) -> Result<String, EventError> {
    resolve_from(sources, inputs).map(|(name, _)| name)
}

/// [`resolve`], also saying which source yielded the name (`hookrunner check --payload`).
pub fn resolve_from(
    sources: &[Source],
    inputs: &mut impl Inputs,
) -> Result<(String, String), EventError> {
    for source in sources {
        if let Some((value, from)) = lookup(source, inputs)? {
            if is_valid_name(&value) {
                return Ok((value, from.unwrap_or_else(|| source.to_string())));
            }
            let mut shown: String = value.chars().take(64).collect();
            if shown.len() < value.len() {
                shown.push('…');
            }
            return Err(EventError::Invalid {
                source: from.unwrap_or_else(|| source.to_string()),
                value: shown,
            });
        }
    }
    let looked: Vec<String> = sources.iter().map(Source::to_string).collect();
    Err(EventError::NotFound(looked.join(", ")))
}

/// What `source` yields as it is, not held to the rules of a name (a route's `dedupe_key`: an id may hold
/// any character).
pub fn value(source: &Source, inputs: &mut impl Inputs) -> Result<Option<String>, EventError> {
    lookup(source, inputs).map(|found| found.map(|(value, _)| value))
}

/// What `source` yields, and where it came from when that is not the source itself (GitLab's name comes
/// from the body or from the header).
fn lookup(
    source: &Source,
    inputs: &mut impl Inputs,
) -> Result<Option<(String, Option<String>)>, EventError> {
    let found = match source {
        // `/hooks/NAME`, also below a sender's path (`/jamf/hooks/NAME`).
        Source::Path => inputs
            .path()
            .rsplit_once("/hooks/")
            .map(|(_, name)| percent_decode(name.as_bytes(), false)),
        Source::Header(name) => inputs.header(name).map(str::to_string),
        Source::Gitlab => {
            let Some(header) = inputs.header("X-Gitlab-Event").map(str::to_string) else {
                return Ok(None);
            };
            // The header alone names the event; a body that cannot be read only loses the finer name.
            let kind = inputs
                .document()
                .ok()
                .and_then(|d| d.json_string(GITLAB_KIND))
                .map(Cow::into_owned);
            return Ok(Some(match kind {
                Some(kind) => (kind, Some(format!("JSON {GITLAB_KIND} (GitLab)"))),
                None => (gitlab_name(&header), None),
            }));
        }
        Source::Json(pointer) => document(inputs)?.json_string(pointer).map(Cow::into_owned),
        Source::Xml(path) => document(inputs)?.xml(path).map(str::to_string),
        Source::Form(field) => document(inputs)?.form(field).map(str::to_string),
        Source::Query(field) => {
            let query = crate::document::parse_form(inputs.query().as_bytes());
            query.into_iter().find(|(k, _)| k == field).map(|(_, v)| v)
        }
    };
    Ok(found.map(|value| (value, None)))
}

fn document<I: Inputs>(inputs: &mut I) -> Result<&Document, EventError> {
    inputs.document().map_err(EventError::Malformed)
}

/// `Push Hook` → `push`, `Merge Request Hook` → `merge_request`.
fn gitlab_name(header: &str) -> String {
    let lower = header.trim().to_ascii_lowercase();
    let base = lower.strip_suffix(" hook").unwrap_or(&lower);
    base.split_whitespace().collect::<Vec<_>>().join("_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::Format;

    struct Fake {
        path: String,
        query: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        format: Format,
        parsed: Option<Document>,
        parses: usize,
    }

    fn fake(path: &str, headers: &[(&str, &str)], content_type: Option<&str>, body: &[u8]) -> Fake {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        Fake {
            path: path.into(),
            query: query.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.to_vec(),
            format: Format::detect(content_type, body),
            parsed: None,
            parses: 0,
        }
    }

    impl Inputs for Fake {
        fn path(&self) -> &str {
            &self.path
        }
        fn query(&self) -> &str {
            &self.query
        }
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
        fn document(&mut self) -> Result<&Document, MalformedBody> {
            if self.parsed.is_none() {
                self.parses += 1;
                self.parsed = Some(Document::parse(self.format, &self.body)?);
            }
            Ok(self.parsed.as_ref().expect("just parsed"))
        }
    }

    fn name(mut f: Fake) -> Result<String, EventError> {
        resolve(&default_sources(), &mut f)
    }

    fn payload(file: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/payloads/{file}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn real_sender_payloads() {
        let jamf = payload("jamf-json-ComputerAdded.chook.json");
        assert_eq!(
            name(fake("/", &[], Some("application/json"), &jamf)),
            Ok("ComputerAdded".into())
        );
        let jamf_xml = payload("jamf-xml-ComputerAdded.jook-simulator.xml");
        assert_eq!(
            name(fake("/", &[], Some("text/xml"), &jamf_xml)),
            Ok("ComputerAdded".into())
        );
        let checkin = payload("jamf-json-ComputerCheckIn.chook.json");
        assert!(
            name(fake("/", &[], None, &checkin))
                .is_ok_and(|n| n.eq_ignore_ascii_case("ComputerCheckIn"))
        );
        let github = payload("github-json-ping.json");
        let gh = fake(
            "/",
            &[("X-GitHub-Event", "ping")],
            Some("application/json"),
            &github,
        );
        assert_eq!(name(gh), Ok("ping".into()));
        let gitlab = payload("gitlab-json-push.docs.json");
        let gl = fake(
            "/",
            &[("X-Gitlab-Event", "Push Hook")],
            Some("application/json"),
            &gitlab,
        );
        assert_eq!(name(gl), Ok("push".into()));
        let sw = payload("standardwebhooks-json-example.event.json");
        assert_eq!(
            name(fake("/", &[], Some("application/json"), &sw)),
            Ok("example.event".into())
        );
        let kazoo = br#"{"hook_event":"channel_create","call_id":"x"}"#;
        assert_eq!(
            name(fake("/", &[], None, kazoo)),
            Ok("channel_create".into())
        );
    }

    #[test]
    fn resolve_from_names_the_source_that_decided() {
        let body = br#"{"webhook":{"webhookEvent":"FromBody"}}"#;
        let from = |f: Fake| resolve_from(&default_sources(), &mut { f }).expect("a name");
        assert_eq!(
            from(fake("/", &[], None, body)),
            ("FromBody".into(), "JSON /webhook/webhookEvent".into())
        );
        assert_eq!(
            from(fake("/x/hooks/P", &[], None, body)).1,
            "path /hooks/<name>"
        );
        let gitlab = fake(
            "/",
            &[("X-Gitlab-Event", "Push Hook")],
            None,
            br#"{"object_kind":"push"}"#,
        );
        assert_eq!(from(gitlab).1, "JSON /object_kind (GitLab)");
    }

    #[test]
    fn order_path_then_headers_then_body() {
        let body = br#"{"webhook":{"webhookEvent":"FromBody"}}"#;
        let f = fake("/hooks/FromPath", &[("X-GitHub-Event", "push")], None, body);
        assert_eq!(name(f), Ok("FromPath".into()));
        let f = fake("/", &[("x-github-event", "push")], None, body);
        assert_eq!(name(f), Ok("push".into()));
    }

    #[test]
    fn body_is_not_parsed_when_path_or_header_decides() {
        let mut f = fake("/hooks/Early", &[], Some("application/json"), b"{broken");
        assert_eq!(resolve(&default_sources(), &mut f), Ok("Early".into()));
        assert_eq!(f.parses, 0);
        let github = [("X-GitHub-Event", "push")];
        let mut f = fake("/", &github, Some("application/json"), b"{broken");
        assert_eq!(resolve(&default_sources(), &mut f), Ok("push".into()));
        assert_eq!(f.parses, 0, "the header decided; the body was not parsed");
    }

    #[test]
    fn scalefusion_event_string_but_not_jamf_event_object() {
        let sf = br#"{"event":"device.enrolled","data":{}}"#;
        assert_eq!(name(fake("/", &[], None, sf)), Ok("device.enrolled".into()));
        // Jamf's `/event` is the object describing the device: never a name, so Jamf's own field decides...
        let jamf = br#"{"event":{"deviceName":"Mac"},"webhook":{"webhookEvent":"ComputerAdded"}}"#;
        assert_eq!(name(fake("/", &[], None, jamf)), Ok("ComputerAdded".into()));
        // ...and without it, the object is not taken for one (not even as an invalid name).
        let object = br#"{"event":{"deviceName":"Mac"}}"#;
        assert!(
            matches!(
                name(fake("/", &[], None, object)),
                Err(EventError::NotFound(_))
            ),
            "{:?}",
            name(fake("/", &[], None, object))
        );
    }

    #[test]
    fn kazoo_query_and_form() {
        assert_eq!(
            name(fake(
                "/kazoo?hook_event=channel_answer&call_id=1",
                &[],
                None,
                b""
            )),
            Ok("channel_answer".into())
        );
        let form = b"event_name=voicemail_new&account_id=abc";
        let f = fake("/", &[], Some("application/x-www-form-urlencoded"), form);
        assert_eq!(name(f), Ok("voicemail_new".into()));
    }

    #[test]
    fn errors_say_what_was_looked_for() {
        match name(fake("/", &[], Some("application/json"), b"{\"a\":1}")) {
            Err(e @ EventError::NotFound(_)) => {
                let text = e.to_string();
                assert!(text.contains("JSON /webhook/webhookEvent"), "{text}");
                assert!(
                    text.contains("XML /JSSEvent/webhook/webhookEvent"),
                    "{text}"
                );
                assert!(text.contains("header X-GitHub-Event"), "{text}");
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
        assert!(matches!(
            name(fake("/hooks/..%2Fetc", &[], None, b"")),
            Err(EventError::Invalid { .. })
        ));
        assert!(matches!(
            name(fake("/", &[], Some("application/json"), b"{\"webhook\":")),
            Err(EventError::Malformed(_))
        ));
        assert!(matches!(
            name(fake("/", &[], Some("text/xml"), b"<JSSEvent><webhook>")),
            Err(EventError::Malformed(_))
        ));
    }

    #[test]
    fn an_invalid_name_says_where_it_came_from() {
        let invalid_from = |f: Fake| match name(f) {
            Err(EventError::Invalid { source, .. }) => source,
            other => panic!("expected Invalid, got {other:?}"),
        };
        let json = Some("application/json");
        let header = [("X-Gitlab-Event", "Push Hook")];
        // GitLab's name from the body's object_kind is reported as such, not as the header...
        let from_body = fake("/", &header, json, br#"{"object_kind":"bad kind"}"#);
        assert_eq!(invalid_from(from_body), "JSON /object_kind (GitLab)");
        let message = name(fake("/", &header, json, br#"{"object_kind":"a/b"}"#))
            .expect_err("invalid")
            .to_string();
        assert!(
            message.contains("\"a/b\" from JSON /object_kind (GitLab)"),
            "{message}"
        );
        // ...and one made from the header is the header's.
        let bad_header = [("X-Gitlab-Event", "Bad/Hook")];
        assert_eq!(
            invalid_from(fake("/", &bad_header, json, b"{}")),
            "header X-Gitlab-Event"
        );
        // object_kind wins over the header when both are there.
        let both = fake("/", &header, json, br#"{"object_kind":"tag_push"}"#);
        assert_eq!(name(both), Ok("tag_push".into()));
        // Other sources name themselves.
        assert_eq!(
            invalid_from(fake("/", &[("X-GitHub-Event", "a b")], None, b"")),
            "header X-GitHub-Event"
        );
        let jamf = br#"{"webhook":{"webhookEvent":"no spaces"}}"#;
        assert_eq!(
            invalid_from(fake("/", &[], json, jamf)),
            "JSON /webhook/webhookEvent"
        );
    }

    #[test]
    fn a_json_body_with_a_byte_order_mark_names_its_event() {
        let body = b"\xEF\xBB\xBF{\"webhook\":{\"webhookEvent\":\"ComputerAdded\"}}";
        assert_eq!(
            name(fake("/", &[], Some("application/json"), body)),
            Ok("ComputerAdded".into())
        );
        assert_eq!(
            name(fake("/", &[], None, body)),
            Ok("ComputerAdded".into()),
            "detected as JSON"
        );
        let gitlab = b"\xEF\xBB\xBF{\"object_kind\":\"push\"}";
        let f = fake("/", &[("X-Gitlab-Event", "Other Hook")], None, gitlab);
        assert_eq!(name(f), Ok("push".into()));
    }

    #[test]
    fn an_xml_comment_is_no_event_name() {
        let body =
            b"<JSSEvent><webhook><webhookEvent><!--Env--></webhookEvent></webhook></JSSEvent>";
        match name(fake("/", &[], Some("text/xml"), body)) {
            Err(EventError::Invalid { source, value }) => {
                assert_eq!(
                    (source.as_str(), value.as_str()),
                    ("XML /JSSEvent/webhook/webhookEvent", "")
                );
            }
            other => panic!("expected the empty name refused, got {other:?}"),
        }
        let pi = b"<JSSEvent><webhook><webhookEvent>A<?Env?>B</webhookEvent></webhook></JSSEvent>";
        assert_eq!(name(fake("/", &[], Some("text/xml"), pi)), Ok("AB".into()));
    }

    #[test]
    fn custom_sources() {
        let sources: Vec<Source> = ["header:X-Foo", "json:/a/b", "xml:/r/e", "query:f"]
            .iter()
            .map(|s| Source::parse(s).expect("valid source"))
            .collect();
        let f = fake("/?f=q", &[], None, br#"{"a":{"b":"fromjson"}}"#);
        assert_eq!(resolve(&sources, &mut { f }), Ok("fromjson".into()));
        let f = fake("/?f=q", &[("x-foo", "hdr")], None, b"");
        assert_eq!(resolve(&sources, &mut { f }), Ok("hdr".into()));
        let f = fake("/?f=q", &[], None, b"<r><e>x1</e></r>");
        assert_eq!(resolve(&sources, &mut { f }), Ok("x1".into()));
        for bad in ["", "header:", "json:a", "xml:/", "cookie:x", "form:"] {
            assert!(Source::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names() {
        assert!(is_valid_name("ComputerAdded"));
        assert!(is_valid_name("device.enrolled"));
        assert!(is_valid_name(&"a".repeat(128)));
        for bad in ["", ".hidden", "-x", "a/b", "a b", "é", &"a".repeat(129)] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
        assert_eq!(gitlab_name("Merge Request Hook"), "merge_request");
    }

    /// Inputs holding only a body of the given format.
    fn fake_format(format: Format, body: Vec<u8>) -> Fake {
        let mut f = fake("/", &[], None, &body);
        f.format = format;
        f
    }

    use proptest::prelude::*;

    fn valid_name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
    }

    fn xml_escape(s: &str) -> String {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    }

    proptest! {
        #[test]
        fn names_match_the_documented_pattern(name in valid_name()) {
            prop_assert!(is_valid_name(&name));
        }

        #[test]
        fn names_with_any_other_character_are_rejected(
            prefix in valid_name(),
            bad in "[^A-Za-z0-9_.-]",
        ) {
            let name = format!("{prefix}{bad}");
            prop_assert!(!is_valid_name(&name));
        }

        #[test]
        fn jamf_json_event_is_found_whatever_else_the_body_holds(
            name in valid_name(),
            extra in proptest::collection::btree_map("[a-z]{1,8}", "[ -~]{0,20}", 0..6),
        ) {
            let body = serde_json::json!({ "webhook": { "webhookEvent": name, "id": 1 }, "event": extra });
            let mut inputs = fake_format(Format::Json, serde_json::to_vec(&body).expect("serialises"));
            prop_assert_eq!(resolve(&default_sources(), &mut inputs), Ok(name));
        }

        #[test]
        fn jamf_xml_event_is_found_whatever_else_the_body_holds(
            name in valid_name(),
            device in "[ -~]{0,40}",
        ) {
            let body = format!(
                "<?xml version=\"1.0\"?><JSSEvent><event><deviceName>{}</deviceName></event>\
                 <webhook><webhookEvent>{name}</webhookEvent></webhook></JSSEvent>",
                xml_escape(&device)
            );
            let mut inputs = fake_format(Format::Xml, body.into_bytes());
            prop_assert_eq!(resolve(&default_sources(), &mut inputs), Ok(name));
        }

        #[test]
        fn any_body_gives_a_name_or_an_error_never_a_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            format in prop_oneof![Just(Format::Json), Just(Format::Xml), Just(Format::Form), Just(Format::Other)],
        ) {
            let mut inputs = fake_format(format, bytes);
            if let Ok(name) = resolve(&default_sources(), &mut inputs) {
                prop_assert!(is_valid_name(&name));
            }
        }

        #[test]
        fn header_values_are_validated(value in "[ -~]{0,40}") {
            let mut inputs = fake_format(Format::Other, Vec::new());
            inputs.headers.push(("X-GitHub-Event".into(), value.clone()));
            match resolve(&default_sources(), &mut inputs) {
                Ok(name) => prop_assert_eq!(name, value),
                Err(EventError::Invalid { .. }) => prop_assert!(!is_valid_name(&value)),
                Err(other) => prop_assert!(false, "unexpected {:?}", other),
            }
        }

        #[test]
        fn form_and_query_fields_round_trip_percent_encoding(value in valid_name(), noise in "[ -~]{0,30}") {
            let encode = |s: &str| s.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
            let query = format!("other={}&event_name={}", encode(&noise), encode(&value));
            let mut inputs = fake_format(Format::Other, Vec::new());
            inputs.query = query;
            prop_assert_eq!(resolve(&default_sources(), &mut inputs), Ok(value));
        }
    }
}
