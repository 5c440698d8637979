//! A request body read as a document, so event names and route filters can look fields up with one path
//! syntax (`/a/b`) whatever the body's format: JSON (a JSON pointer), XML (element names from the root, with
//! or without the root's own name) or a form (`/field`). Real parsers only, never text matching.

use std::borrow::Cow;

use serde_json::Value;

/// The most XML nodes parsed from one body: bounds the memory a hostile document can claim.
const XML_NODES_LIMIT: u32 = 200_000;
/// XML elements deeper than this, with a longer path, or past this many, are parsed but cannot be addressed
/// by a path.
const XML_MAX_DEPTH: usize = 32;
const XML_MAX_PATH: usize = 512;
const XML_MAX_ELEMENTS: usize = 10_000;

/// What a body holds, from its Content-Type, or by its first byte when the type says nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Xml,
    Form,
    Other,
}

impl Format {
    pub fn detect(content_type: Option<&str>, body: &[u8]) -> Format {
        let mime = content_type
            .and_then(|ct| ct.split(';').next())
            .map(|m| m.trim().to_ascii_lowercase())
            .unwrap_or_default();
        match mime.as_str() {
            "application/json" | "text/json" => return Format::Json,
            "application/xml" | "text/xml" => return Format::Xml,
            // Tools like curl label any body a form; a body that opens like JSON or XML is not one.
            "application/x-www-form-urlencoded"
                if !matches!(first_byte(body), Some(b'{' | b'[' | b'<')) =>
            {
                return Format::Form;
            }
            m if m.ends_with("+json") => return Format::Json,
            m if m.ends_with("+xml") => return Format::Xml,
            ""
            | "text/plain"
            | "application/octet-stream"
            | "application/x-www-form-urlencoded" => {}
            _ => return Format::Other,
        }
        match first_byte(body) {
            Some(b'{' | b'[') => Format::Json,
            Some(b'<') => Format::Xml,
            _ => Format::Other,
        }
    }
}

fn first_byte(body: &[u8]) -> Option<u8> {
    body.iter().copied().find(|b| !b.is_ascii_whitespace())
}

/// A parsed body.
#[derive(Debug)]
pub enum Document {
    Json(Value),
    /// Every addressable element as (`/JSSEvent/webhook/webhookEvent`-style path, trimmed text), in document
    /// order.
    Xml(Vec<(String, String)>),
    Form(Vec<(String, String)>),
    Other,
}

/// A body that does not parse as what it claims to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedBody(pub String);

impl Document {
    pub fn parse(format: Format, body: &[u8]) -> Result<Document, MalformedBody> {
        match format {
            Format::Json => serde_json::from_slice(body)
                .map(Document::Json)
                .map_err(|e| MalformedBody(format!("malformed JSON body: {e}"))),
            Format::Xml => parse_xml(body).map(Document::Xml),
            Format::Form => Ok(Document::Form(parse_form(body))),
            Format::Other => Ok(Document::Other),
        }
    }

    /// The value at a JSON pointer, if the body is JSON and the value is a string, number or boolean.
    pub fn json(&self, pointer: &str) -> Option<Cow<'_, str>> {
        let Document::Json(value) = self else {
            return None;
        };
        match value.pointer(pointer)? {
            Value::String(s) => Some(Cow::Borrowed(s)),
            Value::Number(n) => Some(Cow::Owned(n.to_string())),
            Value::Bool(b) => Some(Cow::Owned(b.to_string())),
            _ => None,
        }
    }

    /// Only string values: `/event` is an object for Jamf and the event name for Scalefusion.
    pub fn json_string(&self, pointer: &str) -> Option<&str> {
        match self {
            Document::Json(value) => value.pointer(pointer)?.as_str(),
            _ => None,
        }
    }

    /// The text of the first element at `path`, which may start with the root element's name or skip it.
    pub fn xml(&self, path: &str) -> Option<&str> {
        let Document::Xml(elements) = self else {
            return None;
        };
        let exact = elements.iter().find(|(p, _)| p == path);
        let under_root = || {
            let root = elements.first().map(|(p, _)| p.as_str())?;
            elements
                .iter()
                .find(|(p, _)| p.strip_prefix(root) == Some(path))
        };
        exact.or_else(under_root).map(|(_, text)| text.as_str())
    }

    pub fn form(&self, field: &str) -> Option<&str> {
        match self {
            Document::Form(fields) => fields
                .iter()
                .find(|(k, _)| k == field)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }

    /// A route filter's lookup: the same `/a/b` path in whatever format the body has.
    pub fn field(&self, path: &str) -> Option<Cow<'_, str>> {
        match self {
            Document::Json(_) => self.json(path),
            Document::Xml(_) => self.xml(path).map(Cow::Borrowed),
            Document::Form(_) => self.form(path.strip_prefix('/')?).map(Cow::Borrowed),
            Document::Other => None,
        }
    }
}

fn parse_xml(body: &[u8]) -> Result<Vec<(String, String)>, MalformedBody> {
    let text = std::str::from_utf8(body)
        .map_err(|e| MalformedBody(format!("malformed XML body: not UTF-8: {e}")))?;
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: XML_NODES_LIMIT,
        ..roxmltree::ParsingOptions::default()
    };
    let doc = roxmltree::Document::parse_with_options(text, options)
        .map_err(|e| MalformedBody(format!("malformed XML body: {e}")))?;
    // Walk iteratively (a hostile document may nest deeply). `seen[node id]` holds an addressable
    // element's index in `elements` and its depth, so a child's path is its parent's plus its own name.
    let mut seen: Vec<Option<(usize, usize)>> = vec![None; doc.descendants().count()];
    let mut elements: Vec<(String, String)> = Vec::new();
    for node in doc.root_element().descendants().filter(|n| n.is_element()) {
        let (prefix, depth) = if node == doc.root_element() {
            ("", 1)
        } else {
            match node.parent_element().and_then(|p| seen[p.id().get_usize()]) {
                Some((index, depth)) if depth < XML_MAX_DEPTH => {
                    (elements[index].0.as_str(), depth + 1)
                }
                _ => continue,
            }
        };
        let name = node.tag_name().name();
        // Paths are copied per element, so bound them: a hostile document of many children under one huge
        // element name would otherwise cost (children × name length) bytes.
        if prefix.len() + 1 + name.len() > XML_MAX_PATH || elements.len() == XML_MAX_ELEMENTS {
            continue;
        }
        let path = format!("{prefix}/{name}");
        let text: String = node.children().filter_map(|c| c.text()).collect();
        seen[node.id().get_usize()] = Some((elements.len(), depth));
        elements.push((path, text.trim().to_string()));
    }
    Ok(elements)
}

/// Parses `application/x-www-form-urlencoded` (also a query string): `+` is a space, `%XX` a byte.
pub fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    body.split(|&b| b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = match pair.iter().position(|&b| b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &b""[..]),
            };
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

/// Decodes `%XX` escapes (and `+` as a space when `plus_is_space`); invalid escapes stay as written.
pub fn percent_decode(input: &[u8], plus_is_space: bool) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'%' if i + 2 < input.len() => match (hex(input[i + 1]), hex(input[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const JAMF_XML: &str = "<?xml version=\"1.0\"?><JSSEvent><webhook><webhookEvent>ComputerAdded</webhookEvent></webhook><event><deviceName>John Doe&apos;s Mac</deviceName></event></JSSEvent>";

    #[test]
    fn detects_formats() {
        assert_eq!(
            Format::detect(Some("application/json; charset=utf-8"), b""),
            Format::Json
        );
        assert_eq!(Format::detect(Some("text/xml"), b"{"), Format::Xml);
        assert_eq!(
            Format::detect(Some("application/cloudevents+json"), b""),
            Format::Json
        );
        assert_eq!(
            Format::detect(Some("application/x-www-form-urlencoded"), b""),
            Format::Form
        );
        assert_eq!(Format::detect(None, b"  {\"a\":1}"), Format::Json);
        assert_eq!(
            Format::detect(Some("application/x-www-form-urlencoded"), b"{}"),
            Format::Json
        );
        assert_eq!(Format::detect(None, b"\n<a/>"), Format::Xml);
        assert_eq!(Format::detect(Some("text/plain"), b"hello"), Format::Other);
        assert_eq!(Format::detect(Some("image/png"), b"{"), Format::Other);
    }

    #[test]
    fn json_lookups() {
        let doc = Document::parse(
            Format::Json,
            br#"{"webhook":{"webhookEvent":"ComputerAdded","id":7},"event":{"ok":true}}"#,
        )
        .expect("valid JSON");
        assert_eq!(
            doc.json("/webhook/webhookEvent").as_deref(),
            Some("ComputerAdded")
        );
        assert_eq!(doc.json("/webhook/id").as_deref(), Some("7"));
        assert_eq!(doc.field("/event/ok").as_deref(), Some("true"));
        assert_eq!(doc.json("/event"), None);
        assert_eq!(doc.json_string("/event"), None);
        assert_eq!(doc.xml("/webhook/webhookEvent"), None);
    }

    #[test]
    fn xml_lookups_with_or_without_the_root() {
        let doc = Document::parse(Format::Xml, JAMF_XML.as_bytes()).expect("valid XML");
        assert_eq!(
            doc.xml("/JSSEvent/webhook/webhookEvent"),
            Some("ComputerAdded")
        );
        assert_eq!(doc.xml("/webhook/webhookEvent"), Some("ComputerAdded"));
        assert_eq!(
            doc.field("/event/deviceName").as_deref(),
            Some("John Doe's Mac")
        );
        assert_eq!(doc.xml("/JSSEvent/missing"), None);
    }

    #[test]
    fn malformed_and_hostile_bodies_are_errors_not_crashes() {
        assert!(Document::parse(Format::Json, b"{\"a\":").is_err());
        assert!(Document::parse(Format::Json, "[".repeat(100_000).as_bytes()).is_err());
        assert!(Document::parse(Format::Xml, b"<a><b></a>").is_err());
        assert!(Document::parse(Format::Xml, b"\xff\xfe<a/>").is_err());
        let dtd = b"<?xml version=\"1.0\"?><!DOCTYPE a [<!ENTITY x \"y\">]><a>&x;</a>";
        assert!(
            Document::parse(Format::Xml, dtd).is_err(),
            "DTDs are refused"
        );
        let deep = format!("{}{}", "<a>".repeat(50_000), "</a>".repeat(50_000));
        let doc = Document::parse(Format::Xml, deep.as_bytes());
        // Either refused or parsed with bounded addressable depth; it must not overflow the stack.
        if let Ok(Document::Xml(elements)) = doc {
            assert!(elements.len() <= XML_MAX_DEPTH);
        }
        let long_name = "A".repeat(100_000);
        let wide_under_long = format!("<{long_name}>{}</{long_name}>", "<b/>".repeat(100_000));
        match Document::parse(Format::Xml, wide_under_long.as_bytes()) {
            Ok(Document::Xml(elements)) => {
                assert!(elements.is_empty(), "unaddressable paths are not stored")
            }
            other => panic!("expected a parsed document, got {other:?}"),
        }
        let many = format!("<a>{}</a>", "<b>x</b>".repeat(50_000));
        match Document::parse(Format::Xml, many.as_bytes()) {
            Ok(Document::Xml(elements)) => assert_eq!(elements.len(), XML_MAX_ELEMENTS),
            other => panic!("expected a parsed document, got {other:?}"),
        }
        let wide = "<a>".to_string() + &"<b/>".repeat(300_000) + "</a>";
        assert!(
            Document::parse(Format::Xml, wide.as_bytes()).is_err(),
            "node limit holds"
        );
    }

    #[test]
    fn forms_decode() {
        let doc = Document::parse(
            Format::Form,
            b"hook_event=channel_create&call%5Bid%5D=a+b%2Fc&bad=%zz&empty",
        )
        .expect("forms always parse");
        assert_eq!(doc.form("hook_event"), Some("channel_create"));
        assert_eq!(doc.form("call[id]"), Some("a b/c"));
        assert_eq!(doc.field("/bad").as_deref(), Some("%zz"));
        assert_eq!(doc.form("empty"), Some(""));
        assert_eq!(percent_decode(b"100%", false), "100%");
        assert_eq!(percent_decode(b"%4", false), "%4");
        assert_eq!(percent_decode(b"a+b", false), "a+b");
    }
}
