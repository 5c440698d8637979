//! `hookrunner check --payload`: what the daemon would do with a request, step by step, without doing it.
//! The same functions decide as in `Gateway::serve` (sender selection and checks, `event::resolve_from`,
//! `Routes::select_explained`); only the running is left out.

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::auth::{self, Head, Scheme, Sender};
use crate::config::Config;
use crate::document::{Document, Format, MalformedBody};
use crate::event::{self, Inputs};
use crate::routes::SelectError;
use crate::tools::samples::Random;
use crate::tools::send;

/// Bodies up to this size are parsed by the daemon; a larger one reaches its script unparsed, so its event
/// must come from the path or a header.
const PARSED_BODY: usize = crate::gateway::INLINE_BODY;

/// A request as `check --payload` describes it.
pub struct DryRequest {
    /// Path and query, as in the request line.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Seconds since the epoch, for signed timestamps.
    pub now: i64,
}

/// What would happen: the report, and whether a script would run.
pub struct Explanation {
    pub text: String,
    pub runs: bool,
}

struct DryInputs<'r> {
    request: &'r DryRequest,
    path: &'r str,
    query: &'r str,
    document: Option<Result<Document, MalformedBody>>,
}

impl DryRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Inputs for DryInputs<'_> {
    fn path(&self) -> &str {
        self.path
    }
    fn query(&self) -> &str {
        self.query
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.request.header(name)
    }
    fn document(&mut self) -> Result<&Document, MalformedBody> {
        let request = self.request;
        let parsed = self.document.get_or_insert_with(|| {
            if request.body.len() > PARSED_BODY {
                return Ok(Document::Other);
            }
            let format = Format::detect(request.header("Content-Type"), &request.body);
            Document::parse(format, &request.body)
        });
        parsed.as_ref().map_err(Clone::clone)
    }
}

/// Explains `request` under `config`.
pub fn explain(config: &Config, request: &DryRequest) -> Explanation {
    let mut text = String::new();
    let runs = steps(config, request, &mut text);
    Explanation { text, runs }
}

fn steps(config: &Config, request: &DryRequest, out: &mut String) -> bool {
    let (path, query) = request
        .target
        .split_once('?')
        .unwrap_or((request.target.as_str(), ""));
    // The headers the dry run signed with, when the request brought none: the delivery id is among them.
    let mut signed = Vec::new();
    let sender = match sender(config, request, path, &mut signed, out) {
        Ok(sender) => sender,
        Err(()) => return false,
    };
    let mut inputs = DryInputs {
        request,
        path,
        query,
        document: None,
    };
    if request.body.len() > PARSED_BODY {
        let _ = writeln!(
            out,
            "body: {} bytes, over 256 KiB: not parsed, so the event must come from the path or a header",
            request.body.len()
        );
    }
    let event = match event::resolve_from(&config.event, &mut inputs) {
        Ok((event, source)) => {
            let _ = writeln!(out, "event: {event} (from {source})");
            event
        }
        Err(e) => {
            let _ = writeln!(out, "event: refused: {e}");
            return false;
        }
    };
    if let Some(sender) = sender {
        if let Err(failure) = sender.may_send(&event) {
            let _ = writeln!(
                out,
                "sender {}: refused with {}: {failure}",
                sender.name,
                failure.status()
            );
            return false;
        }
    }
    let file = config.routes.source.as_ref().map_or_else(
        || "(embedded routes)".to_string(),
        |p| p.display().to_string(),
    );
    let field = |path: &str| {
        inputs
            .document()
            .map(|d| d.field(path).map(Cow::into_owned))
    };
    let mut skipped = Vec::new();
    let sender_name = sender.map(|s| s.name.as_str());
    let selected = config
        .routes
        .select_explained(&event, sender_name, field, |line, why| {
            skipped.push((line, why.to_string()))
        });
    for (line, why) in skipped {
        let _ = writeln!(out, "{file}:{line}: no match: {why}");
    }
    let selected = match selected {
        Ok(Some(selected)) => selected,
        Ok(None) => {
            let _ = writeln!(
                out,
                "route: none matched: the request would be refused as unrouted"
            );
            return false;
        }
        Err(SelectError::Body(e)) => {
            let _ = writeln!(out, "route: refused: {}", e.0);
            return false;
        }
        Err(SelectError::Unsafe(e)) => {
            let _ = writeln!(out, "route: would refuse to run {}", e.0);
            return false;
        }
    };
    let timeout = selected.timeout.unwrap_or(config.timeout);
    let _ = writeln!(
        out,
        "{file}:{}: matches: runs {} PAYLOAD_FILE (timeout {})",
        selected.line,
        selected.script.display(),
        humantime::format_duration(timeout)
    );
    let q = &selected.queueing;
    if q.run_async.unwrap_or(config.store.run_async) {
        // What the daemon would do instead of running it while the sender waits.
        let retries = q.retries.unwrap_or(crate::gateway::DEFAULT_ATTEMPTS - 1);
        let retry_max = q.retry_max.unwrap_or(crate::gateway::DEFAULT_RETRY_MAX);
        let _ = writeln!(
            out,
            "async: answered {} once queued; run later, retried up to {retries} time(s), pauses up to {}{}{}",
            q.ack_status
                .or(sender.and_then(|s| s.ack_status))
                .unwrap_or(202),
            humantime::format_duration(retry_max),
            if q.serial {
                ", one at a time (serial)"
            } else {
                ""
            },
            q.dedupe_key
                .as_ref()
                .map_or_else(String::new, |k| format!(", deduplicated by {k}"))
        );
    }
    let header = |name: &str| {
        signed
            .iter()
            .find(|(n, _): &&(String, String)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .or_else(|| request.header(name))
    };
    let delivery = match auth::delivery_id(&header) {
        Ok(id) => id.map(|d| d.id),
        Err(name) => {
            let _ = writeln!(
                out,
                "refused: {name} is longer than {} bytes",
                auth::MAX_DELIVERY_ID_BYTES
            );
            return false;
        }
    };
    // In the order of `gateway::REQUEST_VARIABLES`.
    let values = [
        Some(event.as_str()),
        Some("(the request's id)"),
        request.header("Content-Type"),
        Some("POST"),
        Some(path),
        Some(query),
        Some("(the peer's address)"),
        Some("(the client's address)"),
        sender.map(|s| s.name.as_str()),
        Some("(the hookrunner binary)"),
        delivery.as_deref(),
    ];
    let env = crate::gateway::REQUEST_VARIABLES.into_iter().zip(values);
    let queued = [
        ("HOOKRUNNER_ATTEMPT", "(the attempt, from 1)"),
        ("HOOKRUNNER_QUEUED_AT", "(when it was accepted)"),
    ];
    let queued = if q.run_async.unwrap_or(config.store.run_async) {
        &queued[..]
    } else {
        &[]
    };
    let _ = writeln!(out, "environment (besides PATH and LANG):");
    // Every one is set, empty when the request has none, as the daemon sets them.
    for (name, value) in env {
        let _ = writeln!(out, "  {name}={}", value.unwrap_or(""));
    }
    for (name, value) in queued {
        let _ = writeln!(out, "  {name}={value}");
    }
    true
}

/// The sender step: which profile applies and whether the request passes it. `Err` when it would not.
/// The headers it signed the request with, when the request had none of its own, go to `used`.
fn sender<'c>(
    config: &'c Config,
    request: &DryRequest,
    path: &str,
    used: &mut Vec<(String, String)>,
    out: &mut String,
) -> Result<Option<&'c Sender>, ()> {
    if config.senders.is_empty() {
        let _ = writeln!(
            out,
            "sender: no [[sender]] profiles: every request is accepted"
        );
        return Ok(None);
    }
    let Some(sender) = config.senders.select(path) else {
        let _ = writeln!(
            out,
            "sender: none has a path covering {path}: refused with 401"
        );
        return Err(());
    };
    let _ = writeln!(
        out,
        "sender: {} ({} on {})",
        sender.name,
        sender.scheme.name(),
        sender.path
    );
    if !sender.allow_ips.is_empty() {
        let _ = writeln!(
            out,
            "  allow_ips: not checked, a dry run has no client address"
        );
    }
    // Nor has it a TLS client: an mtls profile's certificate is checked in the daemon's handshake, and the
    // dry run goes on to the event and the route as if it came.
    if let Scheme::Mtls { subjects } = &sender.scheme {
        let names: Vec<String> = subjects.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "  credentials: not checked, a dry run has no TLS client (the daemon admits a certificate \
             from client_ca_file naming {})",
            names.join(", ")
        );
        return Ok(Some(sender));
    }
    // The address is the one thing a dry run cannot know; everything else is checked as the daemon would.
    let without_address = Sender {
        allow_ips: Vec::new(),
        ..sender.clone()
    };
    // Without any of the headers its sender would add, the request is signed with the profile's own
    // secrets, as `hookrunner send` does: the operator never has to put a secret on the command line,
    // where other users see it in the process list.
    let signed = send::sign(
        &sender.scheme,
        &request.body,
        request.now,
        &mut Random::new(),
    );
    let unsigned = !signed.is_empty()
        && !signed
            .iter()
            .any(|(name, _)| request.header(name).is_some());
    let header = |name: &str| {
        let own = signed
            .iter()
            .find(|(n, _)| unsigned && n.eq_ignore_ascii_case(name));
        own.map(|(_, v)| v.as_str())
            .or_else(|| request.header(name))
    };
    let head = Head {
        header: &header,
        forwarded_for: Vec::new(),
        peer: None,
        client_names: &[],
        now: request.now,
    };
    let checked = without_address
        .admit(&head, &config.trusted_proxies)
        .and_then(|admitted| match admitted.body {
            Some(mut check) => {
                check.update(&request.body);
                check.finish()
            }
            None => Ok(()),
        });
    match checked {
        Ok(()) if unsigned => {
            *used = signed;
            let _ = writeln!(
                out,
                "  credentials: none given; signed with the profile's own secrets, as hookrunner send \
                 does: pass"
            );
            Ok(Some(sender))
        }
        Ok(()) => {
            let _ = writeln!(out, "  credentials: pass");
            Ok(Some(sender))
        }
        Err(failure) => {
            let _ = writeln!(
                out,
                "  credentials: refused with {}: {failure}",
                failure.status()
            );
            Err(())
        }
    }
}
