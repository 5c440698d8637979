//! The request path, in one function ([`Gateway::serve`]): authenticate → receive the body into a private
//! payload file → resolve the event name → select the route → run the script → answer with the truth. Every
//! refusal is a [`Refusal`], and [`Refusal::status`] is the one place that maps it to an HTTP status.

use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::json;

use crate::config::Config;
use crate::document::{Document, Format, MalformedBody};
use crate::event::{self, EventError, Inputs};
use crate::http::{self, BodyError, Method, Request, Response};
use crate::logging::Escaped;
use crate::payload::{Payload, PayloadDir};
use crate::routes::{SelectError, UnsafeScript};
use crate::runner::{Exit, Job, Limiter, Outcome, Runner};

/// Bodies up to this size are kept in memory and may be parsed for the event name and route filters; larger
/// ones go straight to their payload file and are never parsed, which bounds what one request can make the
/// parsers allocate. Webhook payloads that carry their event in the body are a few KiB.
const INLINE_BODY: usize = 256 << 10;

pub struct Gateway {
    config: RwLock<Arc<Config>>,
    payloads: PayloadDir,
    runner: Runner,
    limiter: Limiter,
}

/// Why a request was not run, or not run to success.
#[derive(Debug)]
enum Refusal {
    Event(EventError),
    Malformed(MalformedBody),
    NoRoute(String),
    Unsafe(UnsafeScript),
    Busy,
    /// The body failed while it was read (framing, size, pace, the client gone).
    Body(BodyError),
    /// The payload file could not be created or written.
    Payload(io::Error),
    /// The script could not be started.
    Spawn(io::Error),
}

impl Refusal {
    fn status(&self) -> u16 {
        match self {
            Refusal::Event(_) | Refusal::Malformed(_) => 400,
            Refusal::NoRoute(_) => 404,
            Refusal::Body(e) => e.status(),
            Refusal::Busy => 503,
            Refusal::Payload(e) | Refusal::Spawn(e) if is_resource_shortage(e) => 503,
            Refusal::Unsafe(_) | Refusal::Payload(_) | Refusal::Spawn(_) => 500,
        }
    }

    fn message(&self) -> String {
        match self {
            Refusal::Event(e) => e.to_string(),
            Refusal::Malformed(m) => m.0.clone(),
            Refusal::NoRoute(event) => format!("no route for event {event:?}"),
            Refusal::Unsafe(u) => format!("refusing to run {}", u.0),
            Refusal::Busy => "too many scripts running; retry later".to_string(),
            Refusal::Body(e) => e.to_string(),
            Refusal::Payload(e) => format!("cannot store the payload: {e}"),
            Refusal::Spawn(e) => format!("cannot run the script: {e}"),
        }
    }
}

/// Out of descriptors, processes, memory, disk space or quota: the request may succeed later, so 503, not
/// 500.
fn is_resource_shortage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE | libc::ENFILE | libc::EAGAIN | libc::ENOMEM | libc::ENOSPC | libc::EDQUOT
        )
    )
}

/// A script that ran, and how.
struct Ran {
    event: String,
    script: String,
    outcome: Outcome,
}

impl Gateway {
    pub fn new(config: Config, payloads: PayloadDir, runner: Runner) -> Gateway {
        Gateway {
            limiter: Limiter::new(config.max_running),
            config: RwLock::new(Arc::new(config)),
            payloads,
            runner,
        }
    }

    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.config.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Swaps in a new configuration; requests already running keep the one they started with.
    pub fn replace(&self, config: Config) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    }

    fn serve(&self, config: &Config, request: &mut Request<'_>) -> Result<Ran, Refusal> {
        // Sender authentication plugs in here (its own issue); until then every sender is accepted.
        let received = receive(request, &self.payloads)?;
        let (event, selected) = {
            let mut inputs = RequestInputs {
                request,
                body: received.inline(),
                document: None,
            };
            let event = event::resolve(&config.event, &mut inputs).map_err(Refusal::Event)?;
            let field = |path: &str| {
                inputs
                    .document()
                    .map(|d| d.field(path).map(Cow::into_owned))
            };
            match config.routes.select(&event, field) {
                Ok(Some(selected)) => (event, selected),
                Ok(None) => return Err(Refusal::NoRoute(event)),
                Err(SelectError::Body(e)) => return Err(Refusal::Malformed(e)),
                Err(SelectError::Unsafe(e)) => return Err(Refusal::Unsafe(e)),
            }
        };
        let payload = received.into_payload(&self.payloads)?;
        let _slot = self
            .limiter
            .acquire(config.queue_wait)
            .ok_or(Refusal::Busy)?;
        let remote = request.remote.clone();
        let env = [
            ("HOOKRUNNER_EVENT", event.as_str()),
            ("HOOKRUNNER_REQUEST_ID", request.id.as_str()),
            (
                "HOOKRUNNER_CONTENT_TYPE",
                request.header("Content-Type").unwrap_or(""),
            ),
            ("HOOKRUNNER_METHOD", request.method.as_str()),
            ("HOOKRUNNER_PATH", request.path.as_str()),
            ("HOOKRUNNER_QUERY", request.query.as_str()),
            ("HOOKRUNNER_REMOTE_ADDR", remote.as_str()),
        ];
        let job = Job {
            script: &selected.script,
            payload: payload.path(),
            env: &env,
            timeout: selected.timeout.unwrap_or(config.timeout),
            kill_grace: config.kill_grace,
            request_id: &request.id,
        };
        let outcome = self.runner.run(&job).map_err(Refusal::Spawn)?;
        let script = selected
            .script
            .strip_prefix(&config.scripts_dir)
            .unwrap_or(&selected.script);
        Ok(Ran {
            script: script.display().to_string(),
            event,
            outcome,
        })
    }
}

impl http::Handler for Gateway {
    fn max_body(&self) -> u64 {
        self.config().max_body
    }

    fn handle(&self, request: &mut Request<'_>) -> Response {
        if request.method == Method::Get && request.path == "/healthz" {
            return Response::json(200, &json!({ "status": "ok" }));
        }
        let config = self.config();
        match self.serve(&config, request) {
            Ok(ran) => ran.response(&request.id),
            Err(refusal) => {
                let status = refusal.status();
                let message = refusal.message();
                if status >= 500 {
                    log::error!("{} {message}", request.id);
                }
                let mut response = Response::error(status, &request.id, &message);
                if let Refusal::NoRoute(event) = &refusal {
                    response.note = format!(" event={event}");
                } else if let Refusal::Event(EventError::Invalid { value, .. }) = &refusal {
                    // The client's own bytes: quoted and escaped, so they cannot forge a log line.
                    response.note = format!(" event=\"{}\"", Escaped(value));
                }
                response
            }
        }
    }
}

impl Ran {
    fn response(&self, request_id: &str) -> Response {
        let (status, exit_code, signal) = match self.outcome.exit {
            Exit::Code(0) => (200, Some(0), None),
            Exit::Code(code) => (500, Some(code), None),
            Exit::Signal(signal) => (500, None, Some(signal)),
            Exit::TimedOut => (504, None, None),
        };
        let duration_ms = duration_ms(self.outcome.duration);
        let mut response = Response::json(
            status,
            &json!({
                "request_id": request_id,
                "event": self.event,
                "script": self.script,
                "exit_code": exit_code,
                "signal": signal,
                "timed_out": self.outcome.exit == Exit::TimedOut,
                "duration_ms": duration_ms,
            }),
        );
        let exit = match (exit_code, signal) {
            (Some(code), _) => code.to_string(),
            (None, Some(signal)) => format!("signal{signal}"),
            _ => "timeout".to_string(),
        };
        response.note = format!(" event={} script={} exit={exit}", self.event, self.script);
        response
    }
}

fn duration_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// A request body as received: in memory while it is at most `INLINE_BODY` (the common case: nothing touches
/// the disk for a request that is refused), else already streamed to its payload file.
enum Received {
    Inline(Vec<u8>),
    Spilled(Payload),
}

impl Received {
    /// The body, if it is small enough to be parsed.
    fn inline(&self) -> Option<&[u8]> {
        match self {
            Received::Inline(bytes) => Some(bytes),
            Received::Spilled(_) => None,
        }
    }

    /// The body in its payload file, ready for the script.
    fn into_payload(self, payloads: &PayloadDir) -> Result<Payload, Refusal> {
        let mut payload = match self {
            Received::Spilled(payload) => payload,
            Received::Inline(bytes) => {
                let mut payload = payloads.create().map_err(Refusal::Payload)?;
                payload.write_all(&bytes).map_err(Refusal::Payload)?;
                payload
            }
        };
        payload.finish().map_err(Refusal::Payload)?;
        Ok(payload)
    }
}

/// Reads the body, keeping it in memory up to `INLINE_BODY` and streaming the rest to a payload file. A
/// bodiless GET stands for its raw query string (Kazoo sends its payload that way).
fn receive(request: &mut Request<'_>, payloads: &PayloadDir) -> Result<Received, Refusal> {
    let mut received = Received::Inline(Vec::new());
    let mut chunk = [0u8; 16 << 10];
    loop {
        let n = match request.body.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Refusal::Body(BodyError::of(&e))),
        };
        match &mut received {
            Received::Inline(bytes) if bytes.len() + n <= INLINE_BODY => {
                bytes.extend_from_slice(&chunk[..n]);
            }
            Received::Inline(bytes) => {
                let mut payload = payloads.create().map_err(Refusal::Payload)?;
                payload.write_all(bytes).map_err(Refusal::Payload)?;
                payload.write_all(&chunk[..n]).map_err(Refusal::Payload)?;
                received = Received::Spilled(payload);
            }
            Received::Spilled(payload) => {
                payload.write_all(&chunk[..n]).map_err(Refusal::Payload)?
            }
        }
    }
    if let Received::Inline(bytes) = &mut received {
        if bytes.is_empty() && request.method == Method::Get {
            bytes.extend_from_slice(request.query.as_bytes());
        }
    }
    Ok(received)
}

/// The request as event resolution and route filters see it; the body is parsed once, on first use.
struct RequestInputs<'r, 'c> {
    request: &'r Request<'c>,
    /// `None` when the body is too large to parse.
    body: Option<&'r [u8]>,
    document: Option<Document>,
}

impl Inputs for RequestInputs<'_, '_> {
    fn path(&self) -> &str {
        &self.request.path
    }

    fn query(&self) -> &str {
        &self.request.query
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.request.header(name)
    }

    fn document(&mut self) -> Result<&Document, MalformedBody> {
        if self.document.is_none() {
            let Some(body) = self.body else {
                return Err(MalformedBody(format!(
                    "the body is larger than {} KiB, so it is not parsed for the event name or route \
                     filters: name the event in the path (/hooks/NAME) or a header",
                    INLINE_BODY >> 10
                )));
            };
            let format = Format::detect(self.request.header("Content-Type"), body);
            self.document = Some(Document::parse(format, body)?);
        }
        Ok(self.document.get_or_insert(Document::Other))
    }
}
