//! A request body read as a document, so event names and route filters can look fields up with one path
//! syntax (`/a/b`) whatever the body's format: JSON (a JSON pointer), XML (element names from the root, with
//! or without the root's own name) or a form (`/field`). Real parsers only, never text matching.

use std::borrow::Cow;
use std::fmt;
use std::sync::{Condvar, Mutex, PoisonError};

use quick_xml::events::Event;
use quick_xml::events::attributes::Attribute;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Number;

/// XML elements deeper than this, or past this many, are parsed (checked for well-formedness) but cannot be
/// addressed by a path: they bound what a parsed document keeps.
const XML_MAX_DEPTH: usize = 32;
const XML_MAX_ELEMENTS: usize = 10_000;

/// Parses running at once, at most. A parse is CPU-bound, takes milliseconds at the parse limit and holds at
/// most 4 × that limit, 1 MiB, while it runs (the tests bound both), so more parses at once than a small
/// machine has cores would only add memory: with 4, parsing holds at most 4 MiB however many of
/// `max_connections` requests send a body to parse at once. The others wait their turn, holding only their
/// body.
const PARSE_SLOTS: usize = 4;
static PARSING: Slots = Slots::new(PARSE_SLOTS);

/// A UTF-8 byte-order mark, which RFC 8259 §8.1 lets a JSON parser ignore and XML 1.0 §4.3.3 allows.
const BOM: &[u8] = b"\xEF\xBB\xBF";

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
    without_bom(body)
        .iter()
        .copied()
        .find(|b| !b.is_ascii_whitespace())
}

fn without_bom(body: &[u8]) -> &[u8] {
    body.strip_prefix(BOM).unwrap_or(body)
}

/// A parsed body.
#[derive(Debug)]
pub enum Document {
    /// The body's text, checked to be JSON (nesting at most 128 deep), without its byte-order mark. Lookups
    /// walk the text again: a parsed tree would cost up to 16 times the body (a 32-byte value for each `0,`),
    /// a walk costs nothing but one pass.
    Json(Box<[u8]>),
    Xml(Xml),
    Form(Vec<(String, String)>),
    Other,
}

/// A body that does not parse as what it claims to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedBody(pub String);

impl Document {
    /// Parses `body`, waiting for one of the [`PARSE_SLOTS`] first.
    pub fn parse(format: Format, body: &[u8]) -> Result<Document, MalformedBody> {
        PARSING.run(|| match format {
            Format::Json => parse_json(without_bom(body)),
            Format::Xml => parse_xml(without_bom(body)).map(Document::Xml),
            Format::Form => Ok(Document::Form(parse_form(body))),
            Format::Other => Ok(Document::Other),
        })
    }

    /// The value at a JSON pointer, if the body is JSON and the value is a string, number or boolean.
    pub fn json(&self, pointer: &str) -> Option<Cow<'_, str>> {
        match self {
            Document::Json(text) => json_lookup(text, pointer, Scalars::All),
            _ => None,
        }
    }

    /// Only string values: `/event` is an object for Jamf and the event name for Scalefusion.
    pub fn json_string(&self, pointer: &str) -> Option<Cow<'_, str>> {
        match self {
            Document::Json(text) => json_lookup(text, pointer, Scalars::Strings),
            _ => None,
        }
    }

    /// The text of the first element at `path`, which may start with the root element's name or skip it.
    pub fn xml(&self, path: &str) -> Option<&str> {
        match self {
            Document::Xml(xml) => xml.find(path),
            _ => None,
        }
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

    /// A field read as a delivery id (a route's `dedupe_key`): as [`Document::field`], but a JSON number
    /// only when it is an integer that fits 64 bits. Larger ones are parsed as floating point, and distinct
    /// ids would then print the same (18446744073709551616 and ...617 are one `f64`).
    pub fn id(&self, path: &str) -> Option<Cow<'_, str>> {
        match self {
            Document::Json(text) => json_lookup(text, path, Scalars::Exact),
            _ => self.field(path),
        }
    }
}

/// A counting semaphore: at most `max` closures run inside [`Slots::run`] at once.
struct Slots {
    busy: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

impl Slots {
    const fn new(max: usize) -> Slots {
        Slots {
            busy: Mutex::new(0),
            freed: Condvar::new(),
            max,
        }
    }

    fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        // The count stays right even if a holder panicked, so a poisoned lock is still good to use.
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        while *busy >= self.max {
            busy = self
                .freed
                .wait(busy)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *busy += 1;
        drop(busy);
        /// Gives the slot back however `f` ends.
        struct Release<'a>(&'a Slots);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                *self.0.busy.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
                self.0.freed.notify_one();
            }
        }
        let _release = Release(self);
        f()
    }
}

// Counts what a parse visits (XML events and attributes, JSON values), so tests can bound its work by
// something other than the clock.
#[cfg(test)]
thread_local!(static TOKENS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) });

fn tally() {
    #[cfg(test)]
    TOKENS.with(|t| t.set(t.get() + 1));
}

fn parse_json(text: &[u8]) -> Result<Document, MalformedBody> {
    let mut de = serde_json::Deserializer::from_slice(text);
    Check
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| MalformedBody(format!("malformed JSON body: {e}")))?;
    Ok(Document::Json(text.into()))
}

/// Reads a whole JSON value and keeps nothing. Unlike `IgnoredAny`, it descends through `deserialize_any`, so
/// serde_json's nesting limit (128) holds.
struct Check;

impl<'de> DeserializeSeed<'de> for Check {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Check {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        tally();
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        tally();
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        tally();
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        tally();
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        tally();
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        tally();
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        tally();
        while seq.next_element_seed(Check)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        tally();
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(Check)?;
        }
        Ok(())
    }
}

/// The scalar at a JSON pointer (RFC 6901) in checked JSON text, as `serde_json::Value::pointer` would find it.
fn json_lookup<'a>(text: &'a [u8], pointer: &str, scalars: Scalars) -> Option<Cow<'a, str>> {
    if !pointer.is_empty() && !pointer.starts_with('/') {
        return None;
    }
    let tokens: Vec<String> = pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect();
    let walk = Walk {
        path: &tokens,
        scalars,
        in_object: false,
    };
    walk.deserialize(&mut serde_json::Deserializer::from_slice(text))
        .ok()
        .flatten()
}

/// Which JSON scalars a lookup takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scalars {
    All,
    Strings,
    /// Strings, booleans and the numbers that are integers of 64 bits: what prints one way per value.
    Exact,
}

/// Follows `path` down a JSON value, skipping everything beside it, to the scalar at its end.
#[derive(Clone, Copy)]
struct Walk<'p> {
    path: &'p [String],
    scalars: Scalars,
    /// Whether an object encloses this value: then a later duplicate key may replace it.
    in_object: bool,
}

impl Walk<'_> {
    fn leaf<'de>(self, value: impl FnOnce() -> Option<Cow<'de, str>>) -> Option<Cow<'de, str>> {
        if self.path.is_empty() { value() } else { None }
    }

    fn number<'de>(self, n: Option<Number>) -> Option<Cow<'de, str>> {
        self.leaf(|| {
            n.filter(|_| self.scalars != Scalars::Strings)
                .map(|n| n.to_string().into())
        })
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = Option<Cow<'de, str>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = Option<Cow<'de, str>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        let text = if v { "true" } else { "false" };
        Ok(self.leaf(|| (self.scalars != Scalars::Strings).then_some(text.into())))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(self.number(Some(v.into())))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(self.number(Some(v.into())))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        if self.scalars == Scalars::Exact {
            return Ok(None);
        }
        Ok(self.number(Number::from_f64(v)))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(self.leaf(|| Some(Cow::Borrowed(v))))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self.leaf(|| Some(Cow::Owned(v.to_string()))))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // As `Value::pointer`: an index is digits without a leading zero or sign.
        let index = self
            .path
            .first()
            .filter(|t| !t.starts_with('+') && (t.len() == 1 || !t.starts_with('0')))
            .and_then(|t| t.parse::<usize>().ok());
        if index.is_none() && !self.path.is_empty() && !self.in_object {
            // Nothing in this array has that name, and with no object around it there is no duplicate key
            // further on that could hold the value instead: stop reading (the error is taken as "not found").
            return Err(serde::de::Error::custom("no such element"));
        }
        let mut found = None;
        for i in 0.. {
            if Some(i) == index {
                match seq.next_element_seed(self.rest(self.in_object))? {
                    Some(value) => found = value,
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
        }
        Ok(found)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(matches) = map.next_key_seed(KeyIs(self.path.first()))? {
            if matches {
                // The last of duplicate keys wins, as in a parsed object.
                found = map.next_value_seed(self.rest(true))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

impl Walk<'_> {
    fn rest(self, in_object: bool) -> Self {
        Walk {
            path: self.path.get(1..).unwrap_or_default(),
            in_object,
            ..self
        }
    }
}

/// Whether an object key is the one wanted, without keeping it.
struct KeyIs<'k>(Option<&'k String>);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E>(self, v: &str) -> Result<bool, E> {
        Ok(self.0.is_some_and(|k| k == v))
    }
}

/// An XML body's addressable elements in document order. Each knows its parent rather than its whole path,
/// and names and texts share one string, so a document holds a fixed 24 bytes per element plus at most the
/// body's size in a few allocations (a path per element would let one long name above many children cost
/// name × children bytes, and a string per name and text left the allocator many small pieces to keep).
#[derive(Debug, Default)]
pub struct Xml {
    /// Every element's name and text, one after another; never longer than the body (entities and line
    /// ends only shrink when resolved).
    strings: String,
    elements: Vec<Element>,
}

#[derive(Debug)]
struct Element {
    /// The parent's index in `elements`; `None` for the root.
    parent: Option<u32>,
    /// The local name, as a span of `strings`: a namespace prefix is the document's choice, so paths leave
    /// it out.
    name: (u32, u32),
    /// The element's own text and CDATA sections, trimmed, as a span of `strings`: never a child's, a
    /// comment's or a processing instruction's.
    text: (u32, u32),
}

impl Xml {
    /// Every addressable element in document order: its parent's index in this order (`None` for the
    /// root), its local name and its own text. For tools that need more than one value (`hookrunner get`).
    pub fn elements(&self) -> impl Iterator<Item = (Option<usize>, &str, &str)> + '_ {
        self.elements.iter().map(|e| {
            (
                e.parent.map(|p| p as usize),
                self.span(e.name),
                self.span(e.text),
            )
        })
    }

    fn find(&self, path: &str) -> Option<&str> {
        let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
        // `Some(None)`: the path named every element up from this one, root included. `Some(Some(0))`: all
        // but the root (always element 0), which a path may leave out.
        let ends = |want: Option<u32>| {
            (0..self.elements.len()).find(|&i| self.walk_up(i, &segments) == Some(want))
        };
        let found = ends(None).or_else(|| ends(Some(0)))?;
        Some(self.span(self.elements[found].text))
    }

    /// Matches `segments` from the last one against element `index` and its ancestors; where the walk
    /// stopped, if every segment matched.
    fn walk_up(&self, index: usize, segments: &[&str]) -> Option<Option<u32>> {
        let mut at = Some(index);
        for segment in segments.iter().rev() {
            let element = &self.elements[at?];
            if self.span(element.name) != *segment {
                return None;
            }
            at = element.parent.map(|p| p as usize);
        }
        Some(at.map(|i| i as u32))
    }

    fn span(&self, (start, end): (u32, u32)) -> &str {
        &self.strings[start as usize..end as usize]
    }

    /// Appends `text` to `strings`, returning its span.
    fn keep(&mut self, text: &str) -> (u32, u32) {
        let start = self.strings.len() as u32;
        self.strings.push_str(text);
        (start, self.strings.len() as u32)
    }
}

/// Parses an XML document in one pass over its events (quick-xml), keeping only the addressable elements.
/// Linear in the body: no namespace resolution (paths use local names), no tree, each event handled in time
/// proportional to its own length (an element's attributes are checked for duplicates by sorting their
/// names). DTDs are refused, so only the predefined entities and character references exist.
fn parse_xml(body: &[u8]) -> Result<Xml, MalformedBody> {
    let text = std::str::from_utf8(body)
        .map_err(|e| MalformedBody(format!("malformed XML body: not UTF-8: {e}")))?;
    // XML 1.0 allows no control character but tab and line ends anywhere; quick-xml does not check.
    if let Some(at) = body
        .iter()
        .position(|&b| b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r'))
    {
        return Err(MalformedBody(format!(
            "malformed XML body: at byte {at}: control character 0x{:02x}",
            body[at]
        )));
    }
    let mut reader = quick_xml::Reader::from_str(text);
    reader.config_mut().enable_all_checks(true);
    let mut xml = Xml::default();
    // Spans of `strings` are u32: a body parsed here is far smaller, and `strings` is never longer than it.
    if u32::try_from(body.len()).is_err() {
        return Err(MalformedBody(
            "malformed XML body: larger than 4 GiB".into(),
        ));
    }
    // The open elements down to XML_MAX_DEPTH, each with its index in `xml.elements` if it is addressable;
    // deeper ones are only counted, as they hold nothing addressable. `texts[depth]` gathers the text of the
    // element open at that depth, its allocation reused by the next element there.
    let mut open: Vec<Option<u32>> = Vec::new();
    let mut texts: Vec<String> = Vec::new();
    let mut deeper = 0usize;
    let mut root_seen = false;
    let mut first = true;
    loop {
        let at = reader.buffer_position();
        let malformed = |what: &dyn fmt::Display| {
            MalformedBody(format!("malformed XML body: at byte {at}: {what}"))
        };
        let event = reader.read_event().map_err(|e| {
            MalformedBody(format!(
                "malformed XML body: at byte {}: {e}",
                reader.error_position()
            ))
        })?;
        tally();
        let outside = open.is_empty() && deeper == 0;
        // Text, CDATA and references only count inside the root; `None` for anything else.
        let content: Option<Cow<'_, str>> = match &event {
            Event::Start(start) | Event::Empty(start) => {
                if outside && root_seen {
                    return Err(malformed(&"a second root element"));
                }
                root_seen = true;
                let qualified = start.name().into_inner();
                if qualified.is_empty() || qualified.starts_with(b":") || qualified.ends_with(b":")
                {
                    return Err(malformed(&"an element name with an empty part"));
                }
                check_attributes(start.attributes().with_checks(false))
                    .map_err(|e| malformed(&format!("in this tag: {e}")))?;
                let name = std::str::from_utf8(start.local_name().into_inner())
                    .map_err(|e| malformed(&e))?;
                let parent = match open.last() {
                    None if deeper == 0 => Some(None),
                    Some(Some(index)) if deeper == 0 => Some(Some(*index)),
                    _ => None,
                };
                let index = match parent {
                    Some(parent)
                        if open.len() < XML_MAX_DEPTH && xml.elements.len() < XML_MAX_ELEMENTS =>
                    {
                        let name = xml.keep(name);
                        xml.elements.push(Element {
                            parent,
                            name,
                            text: (0, 0),
                        });
                        Some((xml.elements.len() - 1) as u32)
                    }
                    _ => None,
                };
                if open.len() < XML_MAX_DEPTH {
                    open.push(index);
                    match texts.get_mut(open.len() - 1) {
                        Some(text) => text.clear(),
                        None => texts.push(String::new()),
                    }
                } else {
                    deeper += 1;
                }
                if matches!(event, Event::Empty(_)) {
                    close(&mut xml, &mut open, &texts, &mut deeper);
                }
                None
            }
            Event::End(_) => {
                close(&mut xml, &mut open, &texts, &mut deeper);
                None
            }
            Event::Text(t) if outside => {
                if !t.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n')) {
                    return Err(malformed(&"text outside the root element"));
                }
                None
            }
            Event::Text(t) => Some(t.xml10_content().map_err(|e| malformed(&e))?),
            Event::CData(c) if !outside => Some(c.xml10_content().map_err(|e| malformed(&e))?),
            Event::GeneralRef(r) if !outside => {
                let resolved = match r.resolve_char_ref().map_err(|e| malformed(&e))? {
                    Some(c) if c < ' ' && !matches!(c, '\t' | '\n' | '\r') => {
                        return Err(malformed(&format!("&#{};: a control character", c as u32)));
                    }
                    Some(c) => Cow::Owned(c.to_string()),
                    None => {
                        let name = r.decode().map_err(|e| malformed(&e))?;
                        let value = quick_xml::escape::resolve_predefined_entity(&name)
                            .ok_or_else(|| malformed(&format!("unknown entity &{name};")))?;
                        Cow::Borrowed(value)
                    }
                };
                Some(resolved)
            }
            Event::CData(_) | Event::GeneralRef(_) => {
                return Err(malformed(&"text outside the root element"));
            }
            Event::Decl(_) if !first => {
                return Err(malformed(&"an XML declaration after the start"));
            }
            Event::DocType(_) => return Err(malformed(&"DTDs (<!DOCTYPE>) are not accepted")),
            Event::Decl(_) | Event::Comment(_) | Event::PI(_) => None,
            Event::Eof if !outside => return Err(malformed(&"the body ends inside an element")),
            Event::Eof if !root_seen => return Err(malformed(&"no root element")),
            Event::Eof => {
                xml.strings.shrink_to_fit();
                xml.elements.shrink_to_fit();
                return Ok(xml);
            }
        };
        first = false;
        if let (Some(content), Some(Some(_)), 0) = (content, open.last(), deeper) {
            texts[open.len() - 1].push_str(&content);
        }
    }
}

/// Ends the innermost open element, keeping its text if it is addressable.
fn close(xml: &mut Xml, open: &mut Vec<Option<u32>>, texts: &[String], deeper: &mut usize) {
    if *deeper > 0 {
        *deeper -= 1;
    } else if let Some(Some(index)) = open.pop() {
        let text = xml.keep(texts[open.len()].trim());
        xml.elements[index as usize].text = text;
    }
}

/// Attributes must be well-formed, unique, and refer only to entities that exist.
fn check_attributes<'a>(
    attributes: &mut quick_xml::events::attributes::Attributes<'a>,
) -> Result<(), String> {
    let mut names: Vec<&[u8]> = Vec::new();
    for attribute in attributes {
        tally();
        let attribute: Attribute<'a> = attribute.map_err(|e| e.to_string())?;
        attribute
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map_err(|e| e.to_string())?;
        names.push(attribute.key.into_inner());
    }
    names.sort_unstable();
    match names.windows(2).find(|pair| pair[0] == pair[1]) {
        Some(pair) => Err(format!(
            "duplicate attribute {}",
            String::from_utf8_lossy(pair[0])
        )),
        None => Ok(()),
    }
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
    fn an_id_is_a_value_that_prints_one_way() {
        let doc = Document::parse(
            Format::Json,
            br#"{"s":"abc","i":-42,"u":18446744073709551615,"big":18446744073709551616,"f":1.5,"b":true}"#,
        )
        .expect("valid JSON");
        assert_eq!(doc.id("/s").as_deref(), Some("abc"));
        assert_eq!(doc.id("/i").as_deref(), Some("-42"));
        assert_eq!(doc.id("/u").as_deref(), Some("18446744073709551615"));
        assert_eq!(doc.id("/big"), None, "past 64 bits: parsed as f64");
        assert_eq!(doc.id("/f"), None);
        assert_eq!(doc.id("/b").as_deref(), Some("true"));
        // Filters and event names still read every number.
        assert_eq!(doc.field("/f").as_deref(), Some("1.5"));
        assert!(doc.field("/big").is_some());
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
    fn json_lookups_follow_json_pointers() {
        let body = br#"{"a~b":{"c/d":"esc"},"list":[10,"x",true],"n":-7,"f":1.50,
            "u":"caf\u00e9 \"q\"","dup":"first","dup":"last","nul":null,"o":{}}"#;
        let doc = Document::parse(Format::Json, body).expect("valid JSON");
        assert_eq!(doc.json("/a~0b/c~1d").as_deref(), Some("esc"));
        assert_eq!(doc.json("/list/0").as_deref(), Some("10"));
        assert_eq!(doc.json("/list/1").as_deref(), Some("x"));
        assert_eq!(doc.json("/list/2").as_deref(), Some("true"));
        assert_eq!(doc.json_string("/list/2"), None, "not a string");
        for missing in [
            "/list/3", "/list/01", "/list/+1", "/list/-1", "/list/x", "/nul", "/o", "/list",
        ] {
            assert_eq!(doc.json(missing), None, "{missing}");
        }
        assert_eq!(doc.json("/n").as_deref(), Some("-7"));
        assert_eq!(doc.json("/f").as_deref(), Some("1.5"));
        assert_eq!(doc.json("/u").as_deref(), Some("café \"q\""));
        assert_eq!(
            doc.json("/dup").as_deref(),
            Some("last"),
            "as in a parsed object"
        );
        let later = br#"{"a":[1],"a":{"b":"x"},"c":[[{"d":[2]},{"d":{"e":"y"}}]]}"#;
        let later = Document::parse(Format::Json, later).expect("valid JSON");
        assert_eq!(
            later.json("/a/b").as_deref(),
            Some("x"),
            "a later duplicate key still counts"
        );
        assert_eq!(later.json("/c/0/1/d/e").as_deref(), Some("y"));
        assert_eq!(later.json("/c/x"), None);
        assert_eq!(later.json("/c/0/x"), None);
        assert_eq!(doc.json("no-slash"), None);
        assert_eq!(doc.json("/n/deeper"), None);
        let scalar = Document::parse(Format::Json, b" \"top\" ").expect("a JSON scalar");
        assert_eq!(scalar.json("").as_deref(), Some("top"));
    }

    #[test]
    fn a_utf8_byte_order_mark_is_ignored() {
        let json = b"\xEF\xBB\xBF{\"webhook\":{\"webhookEvent\":\"Bom\"}}";
        assert_eq!(Format::detect(None, json), Format::Json);
        let doc = Document::parse(Format::Json, json).expect("RFC 8259 8.1: a BOM may be ignored");
        assert_eq!(doc.json("/webhook/webhookEvent").as_deref(), Some("Bom"));
        let xml = b"\xEF\xBB\xBF<?xml version=\"1.0\"?><a><b>Bom</b></a>";
        assert_eq!(Format::detect(None, xml), Format::Xml);
        let doc = Document::parse(Format::Xml, xml).expect("XML allows a BOM");
        assert_eq!(doc.xml("/b"), Some("Bom"));
        // Only one, and only at the start.
        assert!(Document::parse(Format::Json, b"\xEF\xBB\xBF\xEF\xBB\xBF{}").is_err());
        assert!(Document::parse(Format::Json, b" \xEF\xBB\xBF{}").is_err());
    }

    #[test]
    fn only_text_and_cdata_make_an_element_value() {
        let doc = |xml: &str| Document::parse(Format::Xml, xml.as_bytes()).expect(xml);
        let cases = [
            ("<webhookEvent><!--Env--></webhookEvent>", ""),
            ("<webhookEvent><?Env?></webhookEvent>", ""),
            ("<webhookEvent><?pi Env?></webhookEvent>", ""),
            ("<webhookEvent>A<!--Env-->B</webhookEvent>", "AB"),
            ("<webhookEvent> <![CDATA[Env]]> </webhookEvent>", "Env"),
            ("<webhookEvent>x<![CDATA[<&>]]>y</webhookEvent>", "x<&>y"),
            (
                "<webhookEvent>&amp;&lt;&#x41;&#66;&quot;</webhookEvent>",
                "&<AB\"",
            ),
            ("<webhookEvent><child>Env</child></webhookEvent>", ""),
            ("<webhookEvent>a<child>Env</child>b</webhookEvent>", "ab"),
        ];
        for (xml, want) in cases {
            assert_eq!(doc(xml).xml("/webhookEvent"), Some(want), "{xml}");
        }
        let nested = doc("<r><!--c--><a><?p x?><!--Leak-->v<b>w</b></a></r>");
        assert_eq!(nested.xml("/a"), Some("v"));
        assert_eq!(nested.xml("/r/a/b"), Some("w"));
        assert_eq!(nested.xml("/r"), Some(""));
    }

    #[test]
    fn xml_paths_use_local_names_and_the_first_match() {
        let doc = Document::parse(
            Format::Xml,
            br#"<p:r xmlns:p="urn:x"><p:a>1</p:a><a>2</a><b><a>3</a></b><r><a>4</a></r></p:r>"#,
        )
        .expect("valid XML");
        assert_eq!(doc.xml("/r/a"), Some("1"));
        assert_eq!(doc.xml("/a"), Some("1"));
        assert_eq!(doc.xml("/b/a"), Some("3"));
        assert_eq!(doc.xml("/r/b/a"), Some("3"));
        // The whole path from the root wins over one under the root: `/r/a` is the root's `a`, not the
        // `a` in the inner `r`, and `/r/r/a` reaches that one.
        assert_eq!(doc.xml("/r/r/a"), Some("4"));
        for missing in ["/", "", "a", "/r/", "//a", "/c", "/r/b/a/x"] {
            assert_eq!(doc.xml(missing), None, "{missing:?}");
        }
    }

    #[test]
    fn malformed_and_hostile_bodies_are_errors_not_crashes() {
        assert!(Document::parse(Format::Json, b"{\"a\":").is_err());
        assert!(Document::parse(Format::Json, b"{} {}").is_err());
        let deep = |n| format!("{}{}", "[".repeat(n), "]".repeat(n));
        for n in 120..135 {
            assert_eq!(
                Document::parse(Format::Json, deep(n).as_bytes()).is_ok(),
                serde_json::from_slice::<serde_json::Value>(deep(n).as_bytes()).is_ok(),
                "nesting is capped where serde_json caps it: {n}"
            );
        }
        assert!(Document::parse(Format::Json, deep(129).as_bytes()).is_err());
        assert!(Document::parse(Format::Json, "[".repeat(100_000).as_bytes()).is_err());
        let malformed = [
            &b"<a><b></a>"[..],
            b"<a>",
            b"",
            b"  ",
            b"text",
            b"<a/><b/>",
            b"<a/>text",
            b"text<a/>",
            b"<a/><![CDATA[x]]>",
            b"&amp;<a/>",
            b"<a>&bogus;</a>",
            b"<a>&amp</a>",
            b"<a>&#0;</a>",
            b"<a b=\"1\" b=\"2\"/>",
            b"<a b=1/>",
            b"<a b=\"&bogus;\"/>",
            b"<a><!-- a -- b --></a>",
            b"<a/><?xml version=\"1.0\"?>",
            b"<?xml version=\"1.0\"?><!DOCTYPE a><a/>",
            b"<?xml version=\"1.0\"?><!DOCTYPE a [<!ENTITY x \"y\">]><a>&x;</a>",
            b"\xff\xfe<a/>",
            b"<a>\xff</a>",
            b"<a\x01/>",
            b"<a>\0</a>",
            b"<a>\x1b[2J</a>",
            b"<a>&#27;[2J</a>",
            b"<a>&#x1;</a>",
            b"<:a/>",
            b"<a:/>",
            b"<>",
        ];
        for body in malformed {
            match Document::parse(Format::Xml, body) {
                Err(MalformedBody(message)) => {
                    assert!(message.starts_with("malformed XML body: "), "{message}")
                }
                Ok(doc) => panic!("{:?} parsed: {doc:?}", String::from_utf8_lossy(body)),
            }
        }
        let deep = format!("{}{}", "<a>".repeat(50_000), "</a>".repeat(50_000));
        match Document::parse(Format::Xml, deep.as_bytes()) {
            Ok(Document::Xml(xml)) => assert_eq!(xml.elements.len(), XML_MAX_DEPTH),
            other => panic!("expected a parsed document, got {other:?}"),
        }
        let long_name = "A".repeat(100_000);
        let wide_under_long = format!("<{long_name}>{}</{long_name}>", "<b/>".repeat(100_000));
        match Document::parse(Format::Xml, wide_under_long.as_bytes()) {
            Ok(Document::Xml(xml)) => assert_eq!(xml.elements.len(), XML_MAX_ELEMENTS),
            other => panic!("expected a parsed document, got {other:?}"),
        }
        let many = format!("<a>{}</a>", "<b>x</b>".repeat(50_000));
        match Document::parse(Format::Xml, many.as_bytes()) {
            Ok(Document::Xml(xml)) => assert_eq!(xml.elements.len(), XML_MAX_ELEMENTS),
            other => panic!("expected a parsed document, got {other:?}"),
        }
    }

    /// The parse limit (gateway.rs's INLINE_BODY): no larger body is parsed.
    const LIMIT: usize = 256 << 10;

    /// `head`, as many `unit`s as fit, `tail`, padded with spaces to exactly LIMIT bytes.
    fn fill(head: &str, unit: &str, tail: &str) -> Vec<u8> {
        let count = (LIMIT - head.len() - tail.len()) / unit.len();
        let mut body = format!("{head}{}{tail}", unit.repeat(count)).into_bytes();
        body.resize(LIMIT, b' ');
        body
    }

    /// `open(i)`…`close(i)` nested as deep as LIMIT allows, padded to LIMIT.
    fn nest(open: impl Fn(usize) -> String, close: impl Fn(usize) -> String) -> Vec<u8> {
        let (mut opens, mut closes) = (String::new(), Vec::new());
        for i in 0.. {
            let (o, c) = (open(i), close(i));
            if opens.len() + closes.iter().map(String::len).sum::<usize>() + o.len() + c.len()
                > LIMIT
            {
                break;
            }
            opens.push_str(&o);
            closes.push(c);
        }
        closes.reverse();
        let mut body = (opens + &closes.concat()).into_bytes();
        body.resize(LIMIT, b' ');
        body
    }

    /// The costliest bodies at the parse limit we could construct, by what drives each parser's cost.
    fn worst_bodies() -> Vec<(&'static str, Format, Vec<u8>)> {
        let attrs: String = (0..)
            .map(|i| format!(" a{i:x}=\"\""))
            .take_while({
                let mut total = 0;
                move |a: &String| {
                    total += a.len();
                    total < LIMIT - 8
                }
            })
            .collect();
        let keys: String = (0..)
            .map(|i| format!("\"{i:x}\":0,"))
            .take_while({
                let mut total = 0;
                move |k: &String| {
                    total += k.len();
                    total < LIMIT - 8
                }
            })
            .collect();
        let long = "N".repeat(500);
        vec![
            (
                "ns-nesting",
                Format::Xml,
                nest(
                    |i| format!("<p{i:x}:a xmlns:p{i:x}=\"u\">"),
                    |i| format!("</p{i:x}:a>"),
                ),
            ),
            (
                "attributes-one-element",
                Format::Xml,
                fill(&format!("<a{attrs}"), " ", "/>"),
            ),
            (
                "attributes-many-elements",
                Format::Xml,
                fill("<r>", "<a b=\"\" c=\"\" d=\"\" e=\"\" f=\"\"/>", "</r>"),
            ),
            (
                "deep",
                Format::Xml,
                nest(|_| "<a>".into(), |_| "</a>".into()),
            ),
            (
                "deep-addressable",
                Format::Xml,
                fill(&"<a>".repeat(31), "<b>x</b>", &"</a>".repeat(31)),
            ),
            ("tiny-elements", Format::Xml, fill("<r>", "<a/>", "</r>")),
            (
                "text-elements",
                Format::Xml,
                fill("<r>", "<a>x</a>", "</r>"),
            ),
            (
                "long-names",
                Format::Xml,
                fill(&format!("<{long}>"), "<b/>", &format!("</{long}>")),
            ),
            ("one-long-name", Format::Xml, fill("<", "N", "/>")),
            ("entities", Format::Xml, fill("<r>", "&amp;", "</r>")),
            ("char-refs", Format::Xml, fill("<r>", "&#x10FFFF;", "</r>")),
            ("comments", Format::Xml, fill("<r>", "x<!---->", "</r>")),
            ("cdata", Format::Xml, fill("<r><![CDATA[", "x", "]]></r>")),
            (
                "json-deep-arrays",
                Format::Json,
                fill(
                    "[",
                    &format!("{}{},", "[".repeat(126), "]".repeat(126)),
                    "0]",
                ),
            ),
            (
                "json-deep-objects",
                Format::Json,
                fill(
                    "[",
                    &format!("{}0{},", "{\"a\":".repeat(126), "}".repeat(126)),
                    "0]",
                ),
            ),
            (
                "json-many-keys",
                Format::Json,
                fill(&format!("{{{keys}"), " ", "\"z\":0}"),
            ),
            ("json-tiny-values", Format::Json, fill("[", "0,", "0]")),
            ("json-empty-arrays", Format::Json, fill("[", "[],", "0]")),
            ("json-escapes", Format::Json, fill("[\"", "\\u00e9", "\"]")),
        ]
    }

    #[test]
    fn the_costliest_bodies_parse_in_bounded_work_and_memory() {
        // Every lookup event resolution may make by default, plus a filter, after the parse.
        let sources = crate::event::default_sources();
        for (shape, format, body) in worst_bodies() {
            assert_eq!(body.len(), LIMIT, "{shape}");
            TOKENS.with(|t| t.set(0));
            let (doc, peak, allocated) = counting::usage(|| Document::parse(format, &body));
            let tokens = TOKENS.with(|t| t.get());
            let doc = doc.unwrap_or_else(|e| panic!("{shape}: {}", e.0));
            // Work: each token is at least one byte of the body and costs time in proportion to its own
            // length, so a parse is linear; roxmltree's namespace resolution did work per element for every
            // prefix in scope.
            assert!(tokens <= LIMIT, "{shape}: {tokens} tokens");
            // Memory: what a parse holds at its peak, the kept document included...
            assert!(
                peak <= 4 * LIMIT,
                "{shape}: {peak} bytes at the peak, {}× the body",
                peak / LIMIT
            );
            // ...and all it asks the allocator for, freed or not, where work that grows faster than the
            // body would show (roxmltree copied every namespace in scope into each element).
            assert!(
                allocated <= 16 * LIMIT,
                "{shape}: {allocated} bytes allocated in all"
            );
            let (_, _, lookups) = counting::usage(|| {
                for source in &sources {
                    if let crate::event::Source::Json(p) | crate::event::Source::Xml(p) = source {
                        let _ = doc.field(p);
                    }
                }
                doc.field("/a/b").map(Cow::into_owned)
            });
            assert!(
                lookups <= 4096,
                "{shape}: lookups allocated {lookups} bytes"
            );
        }
    }

    #[test]
    fn parse_slots_bound_how_many_run_at_once_and_wake_waiters() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Arc, mpsc};
        let slots = Arc::new(Slots::new(2));
        let (inside, entered) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut releases = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..3 {
            let (release, wait) = mpsc::channel::<()>();
            releases.push(release);
            let (slots, inside, entered) = (slots.clone(), inside.clone(), entered.clone());
            threads.push(std::thread::spawn(move || {
                slots.run(|| {
                    entered.fetch_add(1, Ordering::SeqCst);
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    let _ = wait.recv();
                    inside.fetch_sub(1, Ordering::SeqCst);
                    now
                })
            }));
        }
        let settle = |want: usize| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while entered.load(Ordering::SeqCst) < want && std::time::Instant::now() < deadline {
                std::thread::yield_now();
            }
            entered.load(Ordering::SeqCst)
        };
        assert_eq!(settle(2), 2);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            entered.load(Ordering::SeqCst),
            2,
            "a third entered while two held the slots"
        );
        // Releasing every holder lets the waiter in: whichever two went first, the third must follow.
        for release in &releases {
            let _ = release.send(());
        }
        let most = threads
            .into_iter()
            .map(|t| t.join().expect("no panic"))
            .max();
        assert_eq!(entered.load(Ordering::SeqCst), 3, "the waiter was woken");
        assert!(most <= Some(2), "at most two ran at once");
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

    /// Counts the bytes this thread holds, so a test can bound what a parse allocates.
    mod counting {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        pub struct Counting;

        thread_local! {
            static LIVE: Cell<isize> = const { Cell::new(0) };
            static PEAK: Cell<isize> = const { Cell::new(0) };
            static TOTAL: Cell<usize> = const { Cell::new(0) };
        }

        fn add(bytes: isize) {
            if bytes > 0 {
                let _ = TOTAL.try_with(|total| total.set(total.get() + bytes as usize));
            }
            let _ = LIVE.try_with(|live| {
                let now = live.get() + bytes;
                live.set(now);
                let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
            });
        }

        // SAFETY: every call goes to the system allocator with the caller's arguments unchanged.
        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                add(layout.size() as isize);
                unsafe { System.alloc(layout) }
            }
            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                add(-(layout.size() as isize));
                unsafe { System.dealloc(ptr, layout) }
            }
            unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
                // Old and new may both be held for a moment.
                add(new_size as isize);
                let moved = unsafe { System.realloc(ptr, layout, new_size) };
                add(-(layout.size() as isize));
                moved
            }
        }

        #[global_allocator]
        static COUNTING: Counting = Counting;

        /// `f`'s result, the most bytes this thread held at once while it ran (its result included), and
        /// all the bytes it asked for.
        pub fn usage<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
            LIVE.with(|l| l.set(0));
            PEAK.with(|p| p.set(0));
            TOTAL.with(|t| t.set(0));
            let out = f();
            let peak = PEAK.with(Cell::get).max(0) as usize;
            (out, peak, TOTAL.with(Cell::get))
        }
    }

    use proptest::prelude::*;

    /// An element: its name and what it holds, in order.
    #[derive(Debug, Clone)]
    enum Node {
        Text(String),
        CData(String),
        Comment,
        Pi,
        Element(String, Vec<Node>),
    }

    fn tree() -> impl Strategy<Value = Node> {
        let leaf = prop_oneof![
            "[ -~]{0,8}".prop_map(Node::Text),
            "[a-z ]{0,8}".prop_map(Node::CData),
            Just(Node::Comment),
            Just(Node::Pi),
            "[a-c]{1,2}".prop_map(|n| Node::Element(n, Vec::new())),
        ];
        leaf.prop_recursive(6, 64, 6, |inner| {
            ("[a-c]{1,2}", proptest::collection::vec(inner, 0..6))
                .prop_map(|(name, children)| Node::Element(name, children))
        })
        .prop_map(|node| match node {
            Node::Element(..) => node,
            other => Node::Element("root".into(), vec![other]),
        })
    }

    fn write(node: &Node, out: &mut String) {
        match node {
            Node::Text(t) => out.push_str(
                &t.replace('&', "&amp;")
                    .replace('<', "&lt;")
                    .replace('>', "&gt;"),
            ),
            Node::CData(t) => out.push_str(&format!("<![CDATA[{t}]]>")),
            Node::Comment => out.push_str("<!--LEAK-->"),
            Node::Pi => out.push_str("<?LEAK LEAK?>"),
            Node::Element(name, children) => {
                out.push_str(&format!("<{name}>"));
                for child in children {
                    write(child, out);
                }
                out.push_str(&format!("</{name}>"));
            }
        }
    }

    /// Every element as (path, own text), in document order: what a lookup must find.
    fn expected(node: &Node, parent: &str, out: &mut Vec<(String, String)>) {
        if let Node::Element(name, children) = node {
            let path = format!("{parent}/{name}");
            let own: String = children
                .iter()
                .filter_map(|c| match c {
                    Node::Text(t) | Node::CData(t) => Some(t.as_str()),
                    _ => None,
                })
                .collect();
            out.push((path.clone(), own.trim().to_string()));
            for child in children {
                expected(child, &path, out);
            }
        }
    }

    proptest! {
        #[test]
        fn xml_lookups_find_what_was_put_there(root in tree()) {
            let mut xml = String::new();
            write(&root, &mut xml);
            let doc = Document::parse(Format::Xml, xml.as_bytes())
                .map_err(|e| TestCaseError::fail(format!("{xml}: {}", e.0)))?;
            let mut elements = Vec::new();
            expected(&root, "", &mut elements);
            for (path, _) in &elements {
                let want = &elements.iter().find(|(p, _)| p == path).expect("listed").1;
                prop_assert_eq!(doc.xml(path), Some(want.as_str()), "{} in {}", path, xml);
            }
            let Document::Xml(parsed) = &doc else { unreachable!("parsed as XML") };
            prop_assert!(parsed.elements.iter().all(|e| !parsed.span(e.text).contains("LEAK")));
        }

        #[test]
        fn json_lookups_agree_with_a_parsed_value(
            value in any_json(),
            pointer in proptest::collection::vec(prop_oneof!["[a-c~/]{0,2}", "[0-3]", Just("01".to_string())], 0..4),
        ) {
            let text = serde_json::to_vec(&value).expect("serialises");
            let doc = Document::parse(Format::Json, &text).expect("valid JSON");
            let pointer: String = pointer.iter().map(|t| format!("/{}", t.replace('~', "~0").replace('/', "~1"))).collect();
            // What the old parsed tree held: the value as read back from the same text.
            let parsed: serde_json::Value = serde_json::from_slice(&text).expect("reads back");
            let want = match parsed.pointer(&pointer) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                Some(serde_json::Value::Bool(b)) => Some(b.to_string()),
                _ => None,
            };
            prop_assert_eq!(doc.json(&pointer).map(Cow::into_owned), want, "{}", pointer);
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(
                prop_oneof![any::<u8>(), proptest::sample::select(b"<>/=\"&;#!?-[]ax ".to_vec())], 0..256),
        ) {
            for format in [Format::Xml, Format::Json, Format::Form] {
                if let Ok(doc) = Document::parse(format, &bytes) {
                    let _ = (doc.field("/a"), doc.field("/a/x"), doc.field(""));
                }
            }
        }
    }

    fn any_json() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[ -~é\"\\\\]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                proptest::collection::btree_map("[a-c~/]{0,2}", inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
