//! `hookrunner get FILE PATH...`: the values at paths of a payload file, with the path syntax routes use
//! (`/event/deviceName` in Jamf's JSON and XML alike, `/field` in a form), so a script needs no jq, xmllint or
//! python. Array elements are addressed by index (`/event/groupAddedDevicesIds/0`); in XML a repeated
//! element is an array (`/event/computers/computer/1/name`).

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::document::{Document, Format, Xml};

/// What a lookup found.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    /// A string (or, from XML or a form, any value), as text: what a route filter compares.
    Scalar(String),
    /// A JSON number or boolean: its JSON text, what a route filter compares, and its type for `--json`.
    Typed(Value),
    /// An object or array (or, in XML, an element with children), for `--json`.
    Tree(Value),
}

impl Found {
    /// The value as JSON: a JSON number or boolean keeps its type, a scalar from XML or a form is a string.
    pub fn to_json(&self) -> Value {
        match self {
            Found::Scalar(text) => Value::String(text.clone()),
            Found::Typed(value) | Found::Tree(value) => value.clone(),
        }
    }
}

/// A payload file's body read as a document.
pub struct Payload {
    document: Document,
    /// The same body as JSON values, built on the first lookup that needs more than one scalar.
    tree: Option<Value>,
    body: Vec<u8>,
}

/// Why a body cannot be read at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unparseable(pub String);

impl Payload {
    /// Reads `body` as `format`, else as its Content-Type says (scripts have it in
    /// `HOOKRUNNER_CONTENT_TYPE`), else by its first character; a text body that is neither JSON nor XML
    /// and holds a `=` is a form.
    pub fn parse(
        body: Vec<u8>,
        format: Option<Format>,
        content_type: Option<&str>,
    ) -> Result<Payload, Unparseable> {
        let format = format.unwrap_or_else(|| match Format::detect(content_type, &body) {
            Format::Other if std::str::from_utf8(&body).is_ok_and(|t| t.contains('=')) => {
                Format::Form
            }
            other => other,
        });
        if format == Format::Other {
            return Err(Unparseable(
                "not JSON, XML or a form (give --format if it is one)".into(),
            ));
        }
        let document = Document::parse(format, &body).map_err(|e| Unparseable(e.0))?;
        Ok(Payload {
            document,
            tree: None,
            body,
        })
    }

    /// The value at `path`: first as a route filter reads it, then, for what a filter cannot address
    /// (objects, arrays, XML elements by index), from the body as a tree.
    pub fn get(&mut self, path: &str) -> Option<Found> {
        // An XML element with children has its own text too, mostly empty: the children are what is meant.
        let xml = matches!(self.document, Document::Xml(_));
        if let Some(value) = self.document.field(path).filter(|v| !(xml && v.is_empty())) {
            let value = value.into_owned();
            if matches!(self.document, Document::Json(_)) {
                if let Some(typed @ (Value::Number(_) | Value::Bool(_))) = self.tree().pointer(path)
                {
                    return Some(Found::Typed(typed.clone()));
                }
            }
            return Some(Found::Scalar(value));
        }
        let format = match self.document {
            Document::Json(_) => Format::Json,
            Document::Xml(_) => Format::Xml,
            _ => Format::Form,
        };
        let tree = self.tree();
        let found = match format {
            Format::Json => tree.pointer(path),
            // As a filter reads XML: the root's own name may be given or left out.
            Format::Xml => walk(tree, path, true).or_else(|| {
                let root = tree.as_object()?.values().next()?;
                walk(root, path, true)
            }),
            _ => walk(tree, path, false),
        }?;
        Some(match found {
            Value::String(text) => Found::Scalar(text.clone()),
            typed @ (Value::Number(_) | Value::Bool(_)) => Found::Typed(typed.clone()),
            Value::Null => return None,
            tree => Found::Tree(tree.clone()),
        })
    }

    fn tree(&mut self) -> &Value {
        let (document, body) = (&self.document, &self.body);
        self.tree.get_or_insert_with(|| match document {
            // Checked JSON already, so this parse succeeds.
            Document::Json(_) => serde_json::from_slice(strip_bom(body)).unwrap_or(Value::Null),
            Document::Xml(xml) => xml_tree(xml),
            Document::Form(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect(),
            ),
            Document::Other => Value::Null,
        })
    }
}

fn strip_bom(body: &[u8]) -> &[u8] {
    body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body)
}

/// Follows `/a/b/0` down a tree. With `lenient_index` (XML), where an element has no child of that name,
/// an index may mean two things, tried in turn: an item of the one array it wraps (Jamf's XML writes JSON's
/// `"ids": [4, 5]` as `<ids><id>4</id><id>5</id></ids>`, so the same path reads both), or, for index 0, the
/// element itself (one element is written no differently from the first of several).
fn walk<'v>(at: &'v Value, path: &str, lenient_index: bool) -> Option<&'v Value> {
    // As in a JSON pointer, the empty path is the whole document.
    if path.is_empty() {
        return Some(at);
    }
    let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    walk_from(at, &segments, lenient_index)
}

fn walk_from<'v>(at: &'v Value, segments: &[&str], lenient: bool) -> Option<&'v Value> {
    let Some((segment, rest)) = segments.split_first() else {
        return Some(at);
    };
    let index = segment.parse::<usize>().ok();
    match at {
        Value::Object(map) => {
            if let Some(value) = map.get(*segment) {
                return walk_from(value, rest, lenient);
            }
            let index = index.filter(|_| lenient)?;
            let wrapped = match map.values().next() {
                Some(Value::Array(items)) if map.len() == 1 => items.get(index),
                Some(single) if map.len() == 1 && index == 0 => Some(single),
                _ => None,
            };
            wrapped
                .and_then(|item| walk_from(item, rest, lenient))
                .or_else(|| (index == 0).then(|| walk_from(at, rest, lenient)).flatten())
        }
        Value::Array(items) => match index {
            Some(i) => walk_from(items.get(i)?, rest, lenient),
            // A name below a repeated element: the first one's, as a route filter reads it.
            None => walk_from(items.first()?, segments, lenient),
        },
        other if lenient && index == Some(0) => walk_from(other, rest, lenient),
        _ => None,
    }
}

/// An XML document as JSON: `{root: ...}`, an element with children an object of them (a name that repeats
/// an array), any other element its text.
fn xml_tree(xml: &Xml) -> Value {
    let elements: Vec<(Option<usize>, &str, &str)> = xml.elements().collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); elements.len()];
    for (index, (parent, _, _)) in elements.iter().enumerate() {
        if let Some(parent) = parent {
            children[*parent].push(index);
        }
    }
    fn build(
        index: usize,
        elements: &[(Option<usize>, &str, &str)],
        children: &[Vec<usize>],
    ) -> Value {
        if children[index].is_empty() {
            return Value::String(elements[index].2.to_string());
        }
        let mut map = Map::new();
        for &child in &children[index] {
            let value = build(child, elements, children);
            match map.get_mut(elements[child].1) {
                // Children are strings or objects, so an array is a name already repeated.
                Some(Value::Array(items)) => items.push(value),
                Some(single) => {
                    let first = single.take();
                    *single = Value::Array(vec![first, value]);
                }
                None => {
                    map.insert(elements[child].1.to_string(), value);
                }
            }
        }
        Value::Object(map)
    }
    let mut root = Map::new();
    if !elements.is_empty() {
        root.insert(elements[0].1.to_string(), build(0, &elements, &children));
    }
    Value::Object(root)
}

/// `NAME=/path` names the shell variable; a bare `/path` is named after its last segment that is not an
/// index, made an identifier (`/event/deviceName` → `deviceName`, `/a-b/0` → `a_b`).
pub fn shell_spec(spec: &str) -> Result<(String, &str), String> {
    if let Some((name, path)) = spec.split_once('=') {
        if !is_identifier(name) {
            return Err(format!(
                "{name:?} is not a shell variable name: letters, digits and _, not starting with a digit"
            ));
        }
        return Ok((name.to_string(), path));
    }
    let segment = spec
        .rsplit('/')
        .find(|s| !s.is_empty() && !s.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or("value");
    let mut name: String = segment
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    Ok((name, spec))
}

fn is_identifier(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `NAME='value'`, safe to `eval` in any POSIX shell: inside single quotes nothing is special, and a quote
/// itself is closed, escaped and reopened. A NUL cannot be in a shell variable, so it is refused.
pub fn shell_line(name: &str, value: &str) -> Result<String, String> {
    if value.contains('\0') {
        return Err(format!(
            "the value for {name} holds a NUL character, which no shell variable can"
        ));
    }
    Ok(format!("{name}='{}'", value.replace('\'', "'\\''")))
}

/// How a script reads the answer: exit codes (documented in README, "hookrunner get").
pub mod exit {
    /// A path was not found (and no `--default` was given).
    pub const NOT_FOUND: u8 = 3;
    /// The file is not JSON, XML or a form, or is malformed (EX_DATAERR).
    pub const UNPARSEABLE: u8 = 65;
    /// The file cannot be read (EX_NOINPUT).
    pub const UNREADABLE: u8 = 66;
}

/// The text printed for one found value.
pub fn render(found: &Found, json: bool) -> Cow<'_, str> {
    match (found, json) {
        (Found::Scalar(text), false) => Cow::Borrowed(text),
        (found, _) => Cow::Owned(found.to_json().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn payload(body: &str) -> Payload {
        Payload::parse(body.as_bytes().to_vec(), None, None).expect("parses")
    }

    /// What `get` prints for a value found, without `--json`.
    fn text(found: Option<Found>) -> Option<String> {
        found.map(|f| render(&f, false).into_owned())
    }

    fn scalar(text: &str) -> Option<String> {
        Some(text.into())
    }

    const JAMF_JSON: &str = r#"{"webhook":{"webhookEvent":"SmartGroupComputerMembershipChange","id":7},
        "event":{"name":"All Macs","groupAddedDevicesIds":[11,12],"computer":{"deviceName":"Mac"},"ok":true}}"#;
    const JAMF_XML: &str = "<?xml version=\"1.0\"?><JSSEvent><webhook><webhookEvent>SmartGroupComputerMembershipChange</webhookEvent><id>7</id></webhook>\
        <event><name>All Macs</name><groupAddedDevicesIds><groupAddedDevicesId>11</groupAddedDevicesId><groupAddedDevicesId>12</groupAddedDevicesId></groupAddedDevicesIds>\
        <computer><deviceName>Mac</deviceName></computer><ok>true</ok></event></JSSEvent>";

    #[test]
    fn one_path_reads_jamf_json_and_xml_alike() {
        for body in [JAMF_JSON, JAMF_XML] {
            let mut p = payload(body);
            assert_eq!(
                text(p.get("/webhook/webhookEvent")),
                scalar("SmartGroupComputerMembershipChange"),
                "{body}"
            );
            assert_eq!(text(p.get("/webhook/id")), scalar("7"));
            assert_eq!(text(p.get("/event/computer/deviceName")), scalar("Mac"));
            assert_eq!(text(p.get("/event/ok")), scalar("true"));
            assert_eq!(text(p.get("/event/missing")), None);
            assert_eq!(text(p.get("/nope/webhookEvent")), None);
        }
        // With --json, a JSON number or boolean keeps its type; XML has none, so its values are strings.
        let json_of = |body: &str, path: &str| payload(body).get(path).map(|f| f.to_json());
        assert_eq!(
            json_of(JAMF_JSON, "/webhook/id"),
            Some(serde_json::json!(7))
        );
        assert_eq!(
            json_of(JAMF_JSON, "/event/ok"),
            Some(serde_json::json!(true))
        );
        assert_eq!(
            json_of(JAMF_JSON, "/event/name"),
            Some(serde_json::json!("All Macs"))
        );
        assert_eq!(
            json_of(JAMF_XML, "/webhook/id"),
            Some(serde_json::json!("7"))
        );
        let mut xml = payload(JAMF_XML);
        assert_eq!(
            text(xml.get("/JSSEvent/event/name")),
            scalar("All Macs"),
            "the root may be named"
        );
    }

    #[test]
    fn xml_wrapped_arrays_take_the_same_index_as_json() {
        let mut xml = payload(JAMF_XML);
        assert_eq!(text(xml.get("/event/groupAddedDevicesIds/1")), scalar("12"));
        assert_eq!(text(xml.get("/event/groupAddedDevicesIds/0")), scalar("11"));
        assert_eq!(text(xml.get("/event/groupAddedDevicesIds/2")), None);
    }

    #[test]
    fn array_elements_by_index() {
        let mut json = payload(JAMF_JSON);
        assert_eq!(
            text(json.get("/event/groupAddedDevicesIds/1")),
            scalar("12")
        );
        assert_eq!(text(json.get("/event/groupAddedDevicesIds/2")), None);
        let mut xml = payload(JAMF_XML);
        assert_eq!(
            text(xml.get("/event/groupAddedDevicesIds/groupAddedDevicesId/1")),
            scalar("12")
        );
        assert_eq!(
            text(xml.get("/event/groupAddedDevicesIds/groupAddedDevicesId/0")),
            scalar("11")
        );
        assert_eq!(
            text(xml.get("/event/computer/0/deviceName")),
            scalar("Mac"),
            "one element is index 0"
        );
        assert_eq!(text(xml.get("/event/computer/1/deviceName")), None);
    }

    #[test]
    fn subtrees_as_json() {
        let mut json = payload(JAMF_JSON);
        let tree = json.get("/event/computer").expect("found");
        assert_eq!(render(&tree, true), r#"{"deviceName":"Mac"}"#);
        assert_eq!(
            json.get("/event/groupAddedDevicesIds").map(|f| f.to_json()),
            Some(serde_json::json!([11, 12]))
        );
        let mut xml = payload(JAMF_XML);
        assert_eq!(
            xml.get("/event/groupAddedDevicesIds").map(|f| f.to_json()),
            Some(serde_json::json!({"groupAddedDevicesId": ["11", "12"]}))
        );
        assert_eq!(render(&Found::Scalar("a\"b".into()), true), r#""a\"b""#);
        assert_eq!(render(&Found::Scalar("a\"b".into()), false), "a\"b");
    }

    #[test]
    fn the_empty_path_is_the_whole_document() {
        let whole = |body: &str| payload(body).get("").map(|f| f.to_json());
        assert_eq!(whole(r#"{"a":[1]}"#), Some(serde_json::json!({"a": [1]})));
        assert_eq!(
            whole("<r><a>1</a></r>"),
            Some(serde_json::json!({"r": {"a": "1"}}))
        );
        assert_eq!(whole("a=1"), Some(serde_json::json!({"a": "1"})));
    }

    #[test]
    fn forms_and_unparseable_bodies() {
        let mut form = payload("event_name=voicemail_new&account_id=a%20b");
        assert_eq!(text(form.get("/account_id")), scalar("a b"));
        assert_eq!(text(form.get("/nope")), None);
        assert!(Payload::parse(b"{broken".to_vec(), None, None).is_err());
        assert!(Payload::parse(b"<a><b></a>".to_vec(), None, None).is_err());
        assert!(Payload::parse(b"\x00\x01binary".to_vec(), None, None).is_err());
        let as_xml = Payload::parse(b"<a/>".to_vec(), None, Some("application/json"));
        assert!(
            as_xml.is_err(),
            "the content type decides, as it does for a request"
        );
        assert!(
            Payload::parse(
                b"<a>x</a>".to_vec(),
                Some(Format::Xml),
                Some("application/json")
            )
            .is_ok()
        );
    }

    #[test]
    fn shell_names() {
        assert_eq!(
            shell_spec("/event/deviceName"),
            Ok(("deviceName".into(), "/event/deviceName"))
        );
        assert_eq!(shell_spec("/a-b/0"), Ok(("a_b".into(), "/a-b/0")));
        assert_eq!(shell_spec("/1x"), Ok(("_1x".into(), "/1x")));
        assert_eq!(
            shell_spec("DEV=/event/deviceName"),
            Ok(("DEV".into(), "/event/deviceName"))
        );
        assert!(shell_spec("1X=/a").is_err());
        assert!(shell_spec("A B=/a").is_err());
        assert!(shell_line("X", "a\0b").is_err());
    }

    /// Runs `sh -c 'eval "$1"; printf %s "$NAME"'` and returns what it printed.
    fn through_sh(line: &str, name: &str) -> Vec<u8> {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("eval \"$1\"; printf %s \"${name}\""))
            .arg("sh")
            .arg(line)
            .output()
            .expect("run sh");
        assert!(
            out.status.success(),
            "{line:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    #[test]
    fn shell_quoting_survives_the_classic_traps() {
        for value in [
            "it's", "'", "''", "$(id)", "`id`", "a\nb", "\\", "\"", "${X}", "!", "-n", "",
        ] {
            let line = shell_line("V", value).expect("quotable");
            assert_eq!(through_sh(&line, "V"), value.as_bytes(), "{line}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn shell_lines_give_back_any_value_byte_for_byte(value in "[^\\x00]{0,40}") {
            let line = shell_line("VALUE", &value).expect("no NUL");
            prop_assert_eq!(through_sh(&line, "VALUE"), value.as_bytes());
        }

        #[test]
        fn any_json_string_is_got_back_from_json_and_xml(value in "[^\\x00-\\x08\\x0B\\x0C\\x0E-\\x1F]{0,30}") {
            let json = serde_json::json!({"event": {"v": value}}).to_string();
            prop_assert_eq!(payload(&json).get("/event/v"), Some(Found::Scalar(value.clone())));
            let escaped = value.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\r', "&#13;");
            let xml = format!("<JSSEvent><event><v>{escaped}</v></event></JSSEvent>");
            // XML keeps an element's text trimmed, as route filters see it.
            prop_assert_eq!(payload(&xml).get("/event/v"), Some(Found::Scalar(value.trim().to_string())));
        }
    }
}
