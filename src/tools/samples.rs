//! The sample events `hookrunner send` posts: data files in `samples/`, compiled in, made fresh on each
//! send (the current `eventTimestamp`, new ids and serial numbers in the same shapes), and for Jamf also in
//! its XML shape.

use std::fmt::Write as _;
use std::io::Read as _;

use serde_json::{Map, Value};

/// Who sends a sample, which decides the headers that come with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Jamf,
    Scalefusion,
    Github,
    Gitlab,
    Kazoo,
}

impl Origin {
    pub fn name(self) -> &'static str {
        match self {
            Origin::Jamf => "Jamf Pro",
            Origin::Scalefusion => "Scalefusion",
            Origin::Github => "GitHub",
            Origin::Gitlab => "GitLab",
            Origin::Kazoo => "Kazoo",
        }
    }
}

pub struct Sample {
    /// The event name, as `send` takes it and hookrunner resolves it.
    pub event: &'static str,
    pub origin: Origin,
    pub json: &'static str,
}

macro_rules! samples {
    ($($origin:ident $event:literal $file:literal,)*) => {
        pub const SAMPLES: &[Sample] = &[
            $(Sample { event: $event, origin: Origin::$origin, json: include_str!(concat!("samples/", $file)) },)*
        ];
    };
}

samples! {
    Jamf "ComputerAdded" "jamf-ComputerAdded.json",
    Jamf "ComputerCheckIn" "jamf-ComputerCheckIn.json",
    Jamf "ComputerInventoryCompleted" "jamf-ComputerInventoryCompleted.json",
    Jamf "ComputerPatchPolicyCompleted" "jamf-ComputerPatchPolicyCompleted.json",
    Jamf "ComputerPolicyFinished" "jamf-ComputerPolicyFinished.json",
    Jamf "ComputerPushCapabilityChanged" "jamf-ComputerPushCapabilityChanged.json",
    Jamf "DeviceAddedToDEP" "jamf-DeviceAddedToDEP.json",
    Jamf "DeviceRateLimited" "jamf-DeviceRateLimited.json",
    Jamf "JSSShutdown" "jamf-JSSShutdown.json",
    Jamf "JSSStartup" "jamf-JSSStartup.json",
    Jamf "MobileDeviceCheckIn" "jamf-MobileDeviceCheckIn.json",
    Jamf "MobileDeviceCommandCompleted" "jamf-MobileDeviceCommandCompleted.json",
    Jamf "MobileDeviceEnrolled" "jamf-MobileDeviceEnrolled.json",
    Jamf "MobileDeviceInventoryCompleted" "jamf-MobileDeviceInventoryCompleted.json",
    Jamf "MobileDevicePushSent" "jamf-MobileDevicePushSent.json",
    Jamf "MobileDeviceUnEnrolled" "jamf-MobileDeviceUnEnrolled.json",
    Jamf "PatchSoftwareTitleUpdated" "jamf-PatchSoftwareTitleUpdated.json",
    Jamf "PushSent" "jamf-PushSent.json",
    Jamf "RestAPIOperation" "jamf-RestAPIOperation.json",
    Jamf "SCEPChallenge" "jamf-SCEPChallenge.json",
    Jamf "SmartGroupComputerMembershipChange" "jamf-SmartGroupComputerMembershipChange.json",
    Jamf "SmartGroupMobileDeviceMembershipChange" "jamf-SmartGroupMobileDeviceMembershipChange.json",
    Jamf "SmartGroupUserMembershipChange" "jamf-SmartGroupUserMembershipChange.json",
    Scalefusion "device.enrolled" "scalefusion-device.enrolled.json",
    Github "push" "github-push.json",
    Gitlab "push" "gitlab-push.json",
    Kazoo "channel_create" "kazoo-channel_create.json",
}

/// The sample for `event` (ignoring ASCII case); `github:push` and `gitlab:push` tell the two pushes apart,
/// and a bare `push` is GitHub's.
pub fn find(event: &str) -> Option<&'static Sample> {
    let (origin, name) = match event.split_once(':') {
        Some(("github", name)) => (Some(Origin::Github), name),
        Some(("gitlab", name)) => (Some(Origin::Gitlab), name),
        _ => (None, event),
    };
    SAMPLES
        .iter()
        .find(|s| s.event.eq_ignore_ascii_case(name) && origin.is_none_or(|o| o == s.origin))
}

/// The headers that say what the body is and, for GitHub and GitLab, which event it is.
pub fn headers(sample: &Sample, xml: bool) -> Vec<(String, String)> {
    let content_type = if xml {
        "text/xml; charset=UTF-8"
    } else {
        "application/json; charset=UTF-8"
    };
    let mut headers = vec![("Content-Type".to_string(), content_type.to_string())];
    match sample.origin {
        Origin::Github => {
            headers.push(("X-GitHub-Event".into(), sample.event.into()));
            headers.push(("X-GitHub-Delivery".into(), uuid(&mut Random::new())));
        }
        Origin::Gitlab => {
            headers.push(("X-Gitlab-Event".into(), "Push Hook".into()));
            headers.push(("X-Gitlab-Event-UUID".into(), uuid(&mut Random::new())));
            // GitLab 17.4 and later: the same on each retry of a delivery, and its delivery id here.
            headers.push(("Idempotency-Key".into(), uuid(&mut Random::new())));
        }
        _ => {}
    }
    headers
}

/// Fresh bytes for ids: from the kernel, so two senders started at once never share them.
pub struct Random {
    pool: Vec<u8>,
}

impl Random {
    pub fn new() -> Random {
        Random { pool: Vec::new() }
    }

    fn byte(&mut self) -> u8 {
        if self.pool.is_empty() {
            let mut bytes = vec![0; 256];
            let read =
                std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
            if read.is_err() {
                // Test data, not a secret: the clock's nanoseconds will do where /dev/urandom is missing.
                let seed = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                for (i, b) in bytes.iter_mut().enumerate() {
                    *b = (seed
                        .wrapping_mul(2_654_435_761)
                        .wrapping_add(i as u32 * 40_503)
                        >> 13) as u8;
                }
            }
            self.pool = bytes;
        }
        self.pool.pop().unwrap_or(0)
    }

    /// A number in `1..=max`.
    pub fn below(&mut self, max: u64) -> u64 {
        let n = u64::from_le_bytes(std::array::from_fn(|_| self.byte()));
        1 + n % max.max(1)
    }
}

/// A random UUID (version 4) in upper case, as Jamf writes them.
pub fn uuid(random: &mut Random) -> String {
    let mut text = String::new();
    for i in 0..16 {
        let mut b = random.byte();
        if i == 6 {
            b = (b & 0x0f) | 0x40;
        }
        if i == 8 {
            b = (b & 0x3f) | 0x80;
        }
        if matches!(i, 4 | 6 | 8 | 10) {
            text.push('-');
        }
        let _ = write!(text, "{b:02X}");
    }
    text
}

/// Keys whose values are identifiers: each character is replaced by a random one of its kind, so the
/// shape (length, dashes, colons, case) stays what the sender writes.
const IDENTIFIERS: &[&str] = &[
    "udid",
    "serialNumber",
    "macAddress",
    "alternateMacAddress",
    "wifiMacAddress",
    "bluetoothMacAddress",
    "managementId",
    "imei",
    "icciID",
    "serial_no",
    "imei_no",
    "call_id",
    "after",
];
/// Keys whose values are numeric record ids.
const RECORD_IDS: &[&str] = &["jssID", "objectID", "device_id", "id"];

/// The sample's body made fresh: the current time where it carries one, new identifiers. Not Jamf's
/// `/webhook/id`: it numbers the webhook's definition in Jamf Pro and is the same on every event it
/// sends, as a route's `dedupe_key` would then find (README, "Dedupe").
pub fn fresh(sample: &Sample, now_ms: u64, random: &mut Random) -> Value {
    let mut value: Value = serde_json::from_str(sample.json).unwrap_or(Value::Null);
    freshen(&mut value, now_ms, random, None);
    value
}

fn freshen(value: &mut Value, now_ms: u64, random: &mut Random, parent: Option<&str>) {
    match value {
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                match (key.as_str(), &*item) {
                    ("id", Value::Number(_)) if parent == Some("webhook") => {}
                    ("eventTimestamp", _) => *item = now_ms.into(),
                    // Scalefusion's and Kazoo's are in seconds.
                    ("timestamp", Value::Number(_)) => *item = (now_ms / 1000).into(),
                    (key, Value::String(text)) if IDENTIFIERS.contains(&key) => {
                        *item = Value::String(scramble(text, random));
                    }
                    (key, Value::Number(_)) if RECORD_IDS.contains(&key) => {
                        *item = random.below(9999).into();
                    }
                    (key, _) => freshen(item, now_ms, random, Some(key)),
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|i| freshen(i, now_ms, random, parent)),
        _ => {}
    }
}

fn scramble(text: &str, random: &mut Random) -> String {
    const UPPER: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ0123456789";
    const LOWER_HEX: &[u8] = b"0123456789abcdef";
    const UPPER_HEX: &[u8] = b"0123456789ABCDEF";
    let hexlike = text
        .chars()
        .all(|c| c.is_ascii_hexdigit() || c == '-' || c == ':');
    text.chars()
        .map(|c| {
            let set = match c {
                '0'..='9' if hexlike && text.chars().any(|c| c.is_ascii_lowercase()) => LOWER_HEX,
                '0'..='9' if hexlike && text.chars().any(|c| c.is_ascii_uppercase()) => UPPER_HEX,
                '0'..='9' => b"0123456789".as_slice(),
                'a'..='f' if hexlike => LOWER_HEX,
                'A'..='F' if hexlike => UPPER_HEX,
                'A'..='Z' => UPPER,
                'a'..='z' => b"abcdefghijklmnopqrstuvwxyz".as_slice(),
                other => return other,
            };
            set[usize::from(random.byte()) % set.len()] as char
        })
        .collect()
}

/// `--set /path=value`: the value keeps the type of what it replaces when it parses as that type (a
/// number stays a number); a path that does not exist yet is created as objects.
pub fn set(value: &mut Value, path: &str, text: &str) -> Result<(), String> {
    let segments: Vec<String> = path
        .strip_prefix('/')
        .ok_or_else(|| format!("--set {path:?}: a path starts with '/'"))?
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect();
    let mut at = value;
    for segment in &segments {
        at = match at {
            Value::Array(items) => {
                let index: usize = segment.parse().map_err(|_| {
                    format!("--set {path:?}: {segment:?} is not an index into an array")
                })?;
                items
                    .get_mut(index)
                    .ok_or_else(|| format!("--set {path:?}: the array has no element {index}"))?
            }
            other => {
                if !other.is_object() {
                    *other = Value::Object(Map::new());
                }
                let Value::Object(map) = other else {
                    unreachable!("made an object above")
                };
                map.entry(segment.clone()).or_insert(Value::Null)
            }
        };
    }
    *at = match &*at {
        Value::Number(_) => text
            .parse::<serde_json::Number>()
            .map_or_else(|_| Value::String(text.into()), Value::Number),
        Value::Bool(_) => match text {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => Value::String(text.into()),
        },
        _ => Value::String(text.into()),
    };
    Ok(())
}

/// Jamf's XML shape of a JSON body: root `JSSEvent`, an element per key, the items of an array repeated as
/// elements named after the array less its final `s` (`groupAddedDevicesIds` → `groupAddedDevicesId`).
pub fn jamf_xml(value: &Value) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<JSSEvent>");
    if let Value::Object(map) = value {
        for (key, item) in map {
            element(&mut out, key, item);
        }
    }
    out.push_str("</JSSEvent>\n");
    out
}

fn element(out: &mut String, name: &str, value: &Value) {
    if let Value::Array(items) = value {
        let _ = write!(out, "<{name}>");
        let item_name = name
            .strip_suffix('s')
            .filter(|n| !n.is_empty())
            .unwrap_or("item");
        for item in items {
            element(out, item_name, item);
        }
        let _ = write!(out, "</{name}>");
        return;
    }
    let _ = write!(out, "<{name}>");
    match value {
        Value::Object(map) => map.iter().for_each(|(k, v)| element(out, k, v)),
        Value::String(text) => out.push_str(&escape(text)),
        Value::Null => {}
        other => out.push_str(&other.to_string()),
    }
    let _ = write!(out, "</{name}>");
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::Format;
    use crate::tools::get::{Found, Payload, render};

    /// The 23 events of ../shared/payloads/SOURCES.md.
    const JAMF_EVENTS: [&str; 23] = [
        "ComputerAdded",
        "ComputerCheckIn",
        "ComputerInventoryCompleted",
        "ComputerPatchPolicyCompleted",
        "ComputerPolicyFinished",
        "ComputerPushCapabilityChanged",
        "DeviceAddedToDEP",
        "DeviceRateLimited",
        "JSSShutdown",
        "JSSStartup",
        "MobileDeviceCheckIn",
        "MobileDeviceCommandCompleted",
        "MobileDeviceEnrolled",
        "MobileDeviceInventoryCompleted",
        "MobileDevicePushSent",
        "MobileDeviceUnEnrolled",
        "PatchSoftwareTitleUpdated",
        "PushSent",
        "RestAPIOperation",
        "SCEPChallenge",
        "SmartGroupComputerMembershipChange",
        "SmartGroupMobileDeviceMembershipChange",
        "SmartGroupUserMembershipChange",
    ];

    #[test]
    fn every_jamf_event_has_a_sample_that_names_itself_in_json_and_xml() {
        let mut random = Random::new();
        for event in JAMF_EVENTS {
            let sample = find(event).unwrap_or_else(|| panic!("no sample for {event}"));
            assert_eq!(sample.origin, Origin::Jamf);
            let body = fresh(sample, 1_765_000_000_123, &mut random);
            let json = body.to_string().into_bytes();
            let xml = jamf_xml(&body).into_bytes();
            for (format, bytes) in [(Format::Json, json), (Format::Xml, xml)] {
                let mut payload = Payload::parse(bytes, Some(format), None).expect("parses");
                let text = |found: Option<Found>| found.map(|f| render(&f, false).into_owned());
                assert_eq!(
                    text(payload.get("/webhook/webhookEvent")),
                    Some(event.to_string()),
                    "{event}"
                );
                assert_eq!(
                    text(payload.get("/webhook/eventTimestamp")),
                    Some("1765000000123".to_string()),
                    "{event} {format:?}"
                );
            }
        }
        assert_eq!(
            SAMPLES.iter().filter(|s| s.origin == Origin::Jamf).count(),
            23
        );
    }

    #[test]
    fn ids_are_fresh_and_keep_their_shape() {
        let mut random = Random::new();
        let sample = find("computeradded").expect("case does not matter");
        let a = fresh(sample, 0, &mut random);
        let b = fresh(sample, 0, &mut random);
        let template: Value = serde_json::from_str(sample.json).expect("valid JSON");
        for key in ["udid", "serialNumber", "macAddress"] {
            let (was, x, y) = (&template["event"][key], &a["event"][key], &b["event"][key]);
            assert_ne!(x, y, "{key} is fresh each time");
            assert_ne!(x, was);
            let shape = |v: &Value| {
                v.as_str()
                    .expect("string")
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { 'x' } else { c })
                    .collect::<String>()
            };
            assert_eq!(shape(x), shape(was), "{key} keeps its shape");
        }
        assert_eq!(a["event"]["deviceName"], template["event"]["deviceName"]);
        assert!(
            a["event"]["jssID"]
                .as_u64()
                .is_some_and(|n| (1..=9999).contains(&n))
        );
        // Jamf's /webhook/id numbers the webhook's definition: the same on every event, as Jamf sends it.
        assert_eq!(a["webhook"]["id"], template["webhook"]["id"]);
        assert_eq!(b["webhook"]["id"], template["webhook"]["id"]);
        let id = uuid(&mut random);
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
    }

    #[test]
    fn set_keeps_types_and_creates_paths() {
        let mut v =
            serde_json::json!({"event": {"jssID": 1, "name": "x", "ok": true, "ids": [1, 2]}});
        set(&mut v, "/event/jssID", "42").expect("set");
        set(&mut v, "/event/ok", "false").expect("set");
        set(&mut v, "/event/name", "12").expect("set");
        set(&mut v, "/event/ids/1", "7").expect("set");
        set(&mut v, "/event/new/deep", "y").expect("set");
        assert_eq!(
            v,
            serde_json::json!({"event": {"jssID": 42, "name": "12", "ok": false, "ids": [1, 7], "new": {"deep": "y"}}})
        );
        assert!(set(&mut v, "event", "x").is_err());
        assert!(set(&mut v, "/event/ids/9", "x").is_err());
        assert!(set(&mut v, "/event/ids/x", "x").is_err());
    }

    #[test]
    fn jamf_xml_escapes_and_repeats_arrays() {
        let v = serde_json::json!({"webhook": {"webhookEvent": "E"}, "event": {"name": "Ada's <Mac> & co", "ids": [1, 2], "none": null}});
        let xml = jamf_xml(&v);
        assert!(xml.contains("<ids><id>1</id><id>2</id></ids>"), "{xml}");
        assert!(xml.contains("<none></none>"), "{xml}");
        let mut p = Payload::parse(xml.into_bytes(), None, None).expect("well-formed");
        assert_eq!(
            p.get("/event/name"),
            Some(Found::Scalar("Ada's <Mac> & co".into()))
        );
        assert_eq!(p.get("/event/ids/id/1"), Some(Found::Scalar("2".into())));
    }

    #[test]
    fn other_senders_and_their_headers() {
        assert_eq!(find("push").map(|s| s.origin), Some(Origin::Github));
        assert_eq!(find("gitlab:push").map(|s| s.origin), Some(Origin::Gitlab));
        assert_eq!(
            find("device.enrolled").map(|s| s.origin),
            Some(Origin::Scalefusion)
        );
        assert_eq!(
            find("channel_create").map(|s| s.origin),
            Some(Origin::Kazoo)
        );
        assert!(find("NoSuchEvent").is_none());
        let gitlab = headers(find("gitlab:push").expect("sample"), false);
        assert!(
            gitlab
                .iter()
                .any(|(k, v)| k == "X-Gitlab-Event" && v == "Push Hook")
        );
        let github = headers(find("push").expect("sample"), false);
        assert!(
            github
                .iter()
                .any(|(k, v)| k == "X-GitHub-Event" && v == "push")
        );
    }
}
