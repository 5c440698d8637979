//! The request path, in one function ([`Gateway::serve`]): authenticate the sender from the head → receive
//! the body, checking its signature as it streams in → resolve the event name → check the sender may send it
//! → select the route → write the private payload file → run the script → answer with the truth (an async
//! route's delivery is committed to the store and answered instead; the dispatcher runs it). Every
//! refusal is a [`Refusal`], and [`Refusal::status`] is the one place that maps it to an HTTP status.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::auth::replay::{Claim, First, Guard, Replays};
use crate::auth::{self, Admitted, BodyCheck, Failure, Scheme, Sender};
use crate::config::Config;
use crate::dispatch::Bell;
use crate::document::{Document, Format, MalformedBody};
use crate::event::{self, EventError, Inputs, Source};
use crate::http::{self, BodyError, Method, Request, Response};
use crate::logging::{Escaped, RateLimit};
use crate::metrics::{Metrics, RunOutcome};
use crate::payload::{Payload, PayloadDir};
use crate::routes::{SelectError, Selected, UnsafeScript};
use crate::runner::{Exit, Job, Limiter, Outcome, Runner};
use crate::store::{self, Accepted, Bounds, NewDelivery, Policy, StoreError, SyncRecord};

/// Bodies up to this size are kept in memory and may be parsed for the event name and route filters; larger
/// ones go straight to their payload file and are never parsed, which bounds what one request can make the
/// parsers allocate. Webhook payloads that carry their event in the body are a few KiB.
pub const INLINE_BODY: usize = 256 << 10;
/// Bytes of large bodies held in memory across all connections at most (or `max_body`, when that is
/// more): the part past [`INLINE_BODY`] of bodies whose signature is still being checked (such a body
/// touches the disk only once it verified, so this is all that senders who cannot sign can make the daemon
/// hold), and the spilled bodies of async requests, read back from their payload files for the store's
/// commit.
pub const HELD_BODIES_MAX: u64 = 64 << 20;

/// Attempts in all when a route does not say (`retries=4`).
pub const DEFAULT_ATTEMPTS: u32 = 5;
/// The longest pause between attempts when a route does not say.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(3600);

pub struct Gateway {
    config: RwLock<Arc<Config>>,
    payloads: Arc<PayloadDir>,
    runner: Runner,
    limiter: Arc<Limiter>,
    /// Async deliveries and the history; `None` when no route is async and `history = false`.
    store: Option<store::Shared>,
    /// Rung when an async delivery is committed, so the dispatcher looks at once.
    bell: Arc<Bell>,
    replays: Replays,
    /// Authentication failures at warn level, at most one a second: a flood of bad requests must not
    /// flood the log (each request's own line still says why it was refused).
    auth_log: Mutex<RateLimit>,
    metrics: Arc<Metrics>,
    /// What [`HELD_BODIES_MAX`] bounds.
    held_bodies: HeldBodies,
    /// This binary, for scripts as `HOOKRUNNER_BIN`: `"$HOOKRUNNER_BIN" get "$1" /event/deviceName` works
    /// whether or not hookrunner is on the scripts' PATH (a checkout, a test).
    bin: String,
}

/// Why a request was not run, or not run to success.
#[derive(Debug)]
enum Refusal {
    /// The sender could not prove who it is (401), or may not do this (403).
    Auth(Failure),
    /// A Standard Webhooks delivery already accepted: answered as the first was, not run again.
    Duplicate(String, First),
    /// The same delivery is running now: the sender should retry.
    InProgress,
    Event(EventError),
    /// A delivery id header longer than [`auth::MAX_DELIVERY_ID_BYTES`]; names the header.
    DeliveryId(&'static str),
    Malformed(MalformedBody),
    NoRoute(String),
    Unsafe(UnsafeScript),
    Busy,
    /// The body failed while it was read (framing, size, pace, the client gone).
    Body(BodyError),
    /// Large bodies held in memory (being checked, or on their way to the store) already hold
    /// [`HELD_BODIES_MAX`]: the sender should retry.
    BodiesHeld,
    /// The payload file could not be created or written.
    Payload(io::Error),
    /// The script could not be started.
    Spawn(io::Error),
    /// An async delivery could not be committed (full, disk full, an I/O error): nothing of it was kept.
    Store(StoreError),
    /// One of the above after the route was chosen, with the sender, event and script for the log line.
    Routed(Box<Refusal>, String),
}

impl Refusal {
    fn status(&self) -> u16 {
        match self {
            Refusal::Auth(failure) => failure.status(),
            Refusal::Duplicate(_, first) => first.status,
            Refusal::InProgress => 503,
            Refusal::Event(_) | Refusal::DeliveryId(_) | Refusal::Malformed(_) => 400,
            Refusal::NoRoute(_) => 404,
            Refusal::Body(e) => e.status(),
            Refusal::Busy | Refusal::Store(_) | Refusal::BodiesHeld => 503,
            Refusal::Payload(e) | Refusal::Spawn(e) if is_resource_shortage(e) => 503,
            Refusal::Unsafe(_) | Refusal::Payload(_) | Refusal::Spawn(_) => 500,
            Refusal::Routed(inner, _) => inner.status(),
        }
    }

    fn message(&self) -> String {
        match self {
            // The client learns only that it failed; the log says which check.
            Refusal::Auth(f) if f.status() == 401 => "authentication required".to_string(),
            Refusal::Auth(_) => "forbidden".to_string(),
            Refusal::Duplicate(id, _) => format!("delivery {id} was already accepted"),
            Refusal::InProgress => "this delivery is being run now; retry later".to_string(),
            Refusal::Event(e) => e.to_string(),
            Refusal::DeliveryId(name) => format!(
                "{name} is longer than {} bytes",
                auth::MAX_DELIVERY_ID_BYTES
            ),
            Refusal::Malformed(m) => m.0.clone(),
            Refusal::NoRoute(event) => format!("no route for event {event:?}"),
            Refusal::Unsafe(u) => format!("refusing to run {}", u.0),
            Refusal::Busy => "too many scripts running; retry later".to_string(),
            Refusal::Routed(inner, _) => inner.message(),
            Refusal::Body(e) => e.to_string(),
            Refusal::BodiesHeld => {
                "too many large bodies are held in memory now; retry later".to_string()
            }
            Refusal::Payload(e) => format!("cannot store the payload: {e}"),
            Refusal::Spawn(e) => {
                format!("cannot run the script: {e}{}", crate::runner::spawn_hint(e))
            }
            Refusal::Store(e) => format!("cannot queue the delivery: {e}; retry later"),
        }
    }
}

/// A route's `dedupe_key` value as kept in the store's dedupe table: as it is up to the length of a
/// delivery id, else its SHA-256 (a body field may be as long as the body, and is kept for a whole window).
fn bounded_key(id: &str) -> Cow<'_, str> {
    if id.len() <= auth::MAX_DELIVERY_ID_BYTES {
        return Cow::Borrowed(id);
    }
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(id.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Cow::Owned(format!("sha256:{hex}"))
}

/// Out of descriptors, processes, memory, disk space or quota: the request may succeed later, so 503, not
/// 500.
pub fn is_resource_shortage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE | libc::ENFILE | libc::EAGAIN | libc::ENOMEM | libc::ENOSPC | libc::EDQUOT
        )
    )
}

/// A script that ran, and how.
struct Ran {
    /// The routes line that chose the script.
    line: usize,
    event: String,
    script: String,
    sender: Option<String>,
    outcome: Outcome,
}

/// What became of a request that was routed.
enum Served {
    Ran(Ran),
    /// An async delivery, committed (or a duplicate of one that was).
    Queued {
        event: String,
        script: String,
        sender: Option<String>,
        accepted: Accepted,
        ack_status: u16,
    },
}

/// Who the request came from, once its head passed the sender's checks.
struct Authenticated<'c> {
    sender: Option<&'c Sender>,
    admitted: Option<Admitted>,
}

impl Gateway {
    pub fn new(
        config: Config,
        payloads: Arc<PayloadDir>,
        runner: Runner,
        limiter: Arc<Limiter>,
        store: Option<store::Shared>,
        bell: Arc<Bell>,
    ) -> Gateway {
        let metrics = Metrics::new(config.metrics_listen.is_some(), store.clone());
        metrics.tls_expiry(
            config
                .tls
                .as_ref()
                .and_then(|t| t.valid)
                .map(|(_, end)| end),
        );
        Gateway {
            limiter,
            metrics: Arc::new(metrics),
            config: RwLock::new(Arc::new(config)),
            payloads,
            runner,
            store,
            bell,
            replays: Replays::default(),
            auth_log: Mutex::new(RateLimit::new(log::Level::Warn)),
            held_bodies: HeldBodies::default(),

            bin: std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        }
    }

    /// What `metrics_listen` serves.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.config.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether the store was opened at start (a reload cannot open it).
    pub fn has_store(&self) -> bool {
        self.store.is_some()
    }

    /// Swaps in a new configuration; requests already running keep the one they started with.
    pub fn replace(&self, config: Config) {
        self.metrics.tls_expiry(
            config
                .tls
                .as_ref()
                .and_then(|t| t.valid)
                .map(|(_, end)| end),
        );
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    }

    /// The head's half of authentication: which sender, and whether its address and headers pass.
    fn authenticate<'c>(
        &self,
        config: &'c Config,
        request: &Request<'_>,
    ) -> Result<Authenticated<'c>, Refusal> {
        if config.senders.is_empty() {
            return Ok(Authenticated {
                sender: None,
                admitted: None,
            });
        }
        let sender = config
            .senders
            .select(&request.path)
            .ok_or(Refusal::Auth(Failure::NoSender))?;
        let header = |name: &str| request.header(name);
        let head = auth::Head {
            header: &header,
            forwarded_for: request.headers("X-Forwarded-For").collect(),
            peer: request.remote.parse::<SocketAddr>().ok().map(|a| a.ip()),
            client_names: &request.client_names,
            now: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        };
        let admitted = sender
            .admit(&head, &config.trusted_proxies)
            .map_err(Refusal::Auth)?;
        Ok(Authenticated {
            sender: Some(sender),
            admitted: Some(admitted),
        })
    }

    /// A Standard Webhooks delivery id, claimed for this request: a replay is answered, not run.
    fn claim_delivery<'g>(
        &'g self,
        sender: Option<&Sender>,
        delivery_id: Option<&str>,
    ) -> Result<Option<Guard<'g>>, Refusal> {
        let (Some(sender), Some(id)) = (sender, delivery_id) else {
            return Ok(None);
        };
        let Scheme::StandardWebhooks { window, .. } = &sender.scheme else {
            return Ok(None);
        };
        match self.replays.claim(&sender.name, id, *window) {
            Claim::New(guard) => Ok(Some(guard)),
            Claim::Duplicate(first) => Err(Refusal::Duplicate(id.to_string(), first)),
            Claim::Busy => Err(Refusal::InProgress),
        }
    }

    fn serve(&self, config: &Config, request: &mut Request<'_>) -> Result<Served, Refusal> {
        let received_at = store::now_ms();
        let Authenticated { sender, admitted } = self.authenticate(config, request)?;
        let check = admitted.and_then(|a| a.body);
        let delivery =
            auth::delivery_id(&|name: &str| request.header(name)).map_err(Refusal::DeliveryId)?;
        let names_one_delivery = delivery.as_ref().is_some_and(|d| d.names_one_delivery());
        let delivery_id = delivery.map(|d| d.id);
        let held_max = HELD_BODIES_MAX.max(config.max_body);
        let unverified = Hold {
            budget: &self.held_bodies,
            max: held_max,
            client: check
                .as_ref()
                .map(|_| client_addr(config, request).map(network_of)),
            client_max: (held_max / CLIENT_SHARE).max(config.max_body),
            bytes: 0,
        };
        let received = receive(request, &self.payloads, check, unverified)?;
        // An async request's spilled body, in memory from its read-back until the commit that holds it.
        let mut held = Hold {
            budget: &self.held_bodies,
            max: held_max,
            client: None,
            client_max: held_max,
            bytes: 0,
        };
        let mut claim = self.claim_delivery(sender, delivery_id.as_deref())?;
        let (event, selected, body_key) = {
            let mut inputs = RequestInputs {
                request,
                body: received.inline(),
                document: None,
            };
            let event = match event::resolve(&config.event, &mut inputs) {
                Ok(event) => event,
                Err(e) => {
                    if let Some(claim) = &mut claim {
                        claim.unresolved();
                    }
                    return Err(Refusal::Event(e));
                }
            };
            if let Some(claim) = &mut claim {
                claim
                    .resolved(&event)
                    .map_err(|other| Refusal::Auth(Failure::OtherEvent(other.first)))?;
            }
            if let Some(sender) = sender {
                sender.may_send(&event).map_err(Refusal::Auth)?;
            }
            let field = |path: &str| {
                inputs
                    .document()
                    .map(|d| d.field(path).map(Cow::into_owned))
            };
            let selected =
                match config
                    .routes
                    .select(&event, sender.map(|s| s.name.as_str()), field)
                {
                    Ok(Some(selected)) => selected,
                    Ok(None) => return Err(Refusal::NoRoute(event)),
                    Err(SelectError::Body(e)) => return Err(Refusal::Malformed(e)),
                    Err(SelectError::Unsafe(e)) => return Err(Refusal::Unsafe(e)),
                };
            // A delivery id in the body, for a route that names where (`dedupe_key=`).
            // Body sources read like route filters, so a numeric id counts too, but only one that prints
            // one way per value. An empty value is no id: every empty-id delivery would be one.
            let body_key = selected
                .queueing
                .dedupe_key
                .as_ref()
                .and_then(|source| match source {
                    Source::Json(path) | Source::Xml(path) => {
                        inputs.document().ok()?.id(path).map(Cow::into_owned)
                    }
                    Source::Form(field) => inputs
                        .document()
                        .ok()?
                        .id(&format!("/{field}"))
                        .map(Cow::into_owned),
                    other => event::value(other, &mut inputs).ok().flatten(),
                })
                .filter(|id| !id.trim().is_empty());
            (event, selected, body_key)
        };
        let client = client_addr(config, request).map(|ip| ip.to_string());
        let env = script_env(
            request,
            &event,
            sender,
            delivery_id.as_deref(),
            client.as_deref(),
            &self.bin,
        );
        let sender_name = sender.map(|s| s.name.clone());
        let script = selected
            .script
            .strip_prefix(&config.scripts_dir)
            .unwrap_or(&selected.script)
            .display()
            .to_string();
        // What a refusal from here on names in its log line, as a run's line does (made only for one).
        let routed = |r: Refusal| {
            let sender = sender
                .map(|s| format!(" sender={}", s.name))
                .unwrap_or_default();
            Refusal::Routed(
                Box::new(r),
                format!("{sender} event={event} script={script}"),
            )
        };
        let store = self.store.as_ref();
        let run_async = selected
            .queueing
            .run_async
            .unwrap_or(config.store.run_async);
        if let (true, Some(store)) = (run_async, store) {
            // A sender's delivery id is unique among its deliveries (where it names one: GitLab's event
            // UUID is left out, see `names_one_delivery`). An id read from the body by a route's
            // `dedupe_key` is often only a counter of one kind of event (order 42, invoice 42): it is
            // unique within its event, so the event is part of its key.
            let sender_part = sender_name.as_deref().unwrap_or("");
            let key = match body_key {
                Some(id) => Some(format!("{sender_part}\n{event}\n{}", bounded_key(&id))),
                None => delivery_id
                    .as_ref()
                    .filter(|_| names_one_delivery)
                    .map(|id| format!("{sender_part}\n{id}")),
            };
            let q = &selected.queueing;
            let delivery = NewDelivery {
                request_id: request.id.clone(),
                received_at,
                sender: sender_name,
                event: event.clone(),
                route_line: selected.line,
                script: selected.script.display().to_string(),
                delivery_id: delivery_id.clone(),
                dedupe_key: key.filter(|_| !config.store.dedupe_window.is_zero()),
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                body: received
                    .into_bytes(&self.payloads, &mut held)
                    .map_err(routed)?,
                ack_status: q
                    .ack_status
                    .or(sender.and_then(|s| s.ack_status))
                    .unwrap_or(202),
                policy: Policy {
                    max_attempts: q.retries.map_or(DEFAULT_ATTEMPTS, |n| n + 1),
                    retry_max: q.retry_max.unwrap_or(DEFAULT_RETRY_MAX),
                    timeout: selected.timeout.unwrap_or(config.timeout),
                    serial: q.serial,
                },
            };
            let ack_status = delivery.ack_status;
            let sender = delivery.sender.clone();
            let bounds = Bounds {
                max_queued: config.store.max_queued,
                max_queued_bytes: config.store.max_queued_bytes,
                dedupe_window: config.store.dedupe_window,
            };
            let accepted = store
                .accept(delivery, bounds)
                .map_err(|e| routed(Refusal::Store(e)))?;
            if let Some(claim) = claim {
                claim.accept(match &accepted {
                    Accepted::Queued { .. } => First {
                        request_id: request.id.clone(),
                        status: ack_status,
                        queued: true,
                    },
                    Accepted::Duplicate {
                        request_id, status, ..
                    } => First {
                        request_id: request_id.clone(),
                        status: *status,
                        queued: true,
                    },
                });
            }
            self.bell.accepted();
            return Ok(Served::Queued {
                event,
                script,
                sender,
                accepted,
                ack_status,
            });
        }
        let history = store.filter(|_| config.store.history);
        let body = history.and(received.inline().map(<[u8]>::to_vec));
        let body_bytes = received.len();
        let result = self
            .run(config, request, received, &selected, &env, claim)
            .map_err(routed);
        if let Some(store) = history {
            // The row is written later by the store's thread: its times are taken now.
            let finished_at = store::now_ms();
            store.record(SyncRecord {
                request_id: request.id.clone(),
                received_at,
                finished_at,
                sender: sender_name.clone(),
                event: event.clone(),
                route_line: selected.line,
                script: script.clone(),
                delivery_id: delivery_id.clone(),
                status: result
                    .as_ref()
                    .map_or_else(Refusal::status, |o| status_of(o.exit)),
                attempt: result.as_ref().ok().map(|o| attempt_of(o, finished_at)),
                body,
                body_bytes,
            });
        }
        Ok(Served::Ran(Ran {
            line: selected.line,
            script,
            event,
            sender: sender_name,
            outcome: result?,
        }))
    }

    /// The sync half: the payload file, a script slot, the run.
    fn run(
        &self,
        config: &Config,
        request: &Request<'_>,
        received: Received,
        selected: &Selected,
        env: &[(&str, &str)],
        claim: Option<Guard<'_>>,
    ) -> Result<Outcome, Refusal> {
        let payload = received.into_payload(&self.payloads)?;
        let _slot = self
            .limiter
            .acquire(config.queue_wait)
            .ok_or(Refusal::Busy)?;
        let job = Job {
            script: &selected.script,
            payload: payload.path(),
            env,
            timeout: selected.timeout.unwrap_or(config.timeout),
            kill_grace: config.kill_grace,
            request_id: &request.id,
        };
        let outcome = {
            let _running = self.metrics.running();
            self.runner.run(&job).map_err(Refusal::Spawn)?
        };
        if let Some(claim) = claim {
            if outcome.exit == Exit::Code(0) {
                claim.accept(First {
                    request_id: request.id.clone(),
                    status: 200,
                    queued: false,
                });
            }
        }
        Ok(outcome)
    }
}

/// The `HOOKRUNNER_*` variables a script gets from its request, in the order [`script_env`] gives them.
pub const REQUEST_VARIABLES: [&str; 11] = [
    "HOOKRUNNER_EVENT",
    "HOOKRUNNER_REQUEST_ID",
    "HOOKRUNNER_CONTENT_TYPE",
    "HOOKRUNNER_METHOD",
    "HOOKRUNNER_PATH",
    "HOOKRUNNER_QUERY",
    "HOOKRUNNER_REMOTE_ADDR",
    "HOOKRUNNER_CLIENT_ADDR",
    "HOOKRUNNER_SENDER",
    "HOOKRUNNER_BIN",
    "HOOKRUNNER_DELIVERY_ID",
];

/// The `HOOKRUNNER_*` variables a script gets from its request: every one, empty when the request has no
/// such value (no query, no sender), so that a `set -u` script may read any of them; a script tests
/// `[ -n "$HOOKRUNNER_SENDER" ]`.
fn script_env<'r>(
    request: &'r Request<'_>,
    event: &'r str,
    sender: Option<&'r Sender>,
    delivery_id: Option<&'r str>,
    client: Option<&'r str>,
    bin: &'r str,
) -> Vec<(&'static str, &'r str)> {
    let values = [
        event,
        request.id.as_str(),
        request.header("Content-Type").unwrap_or(""),
        request.method.as_str(),
        request.path.as_str(),
        request.query.as_str(),
        request.remote.as_str(),
        client.unwrap_or(""),
        sender.map_or("", |s| s.name.as_str()),
        bin,
        delivery_id.unwrap_or(""),
    ];
    REQUEST_VARIABLES.into_iter().zip(values).collect()
}

/// The client's address: the peer's, or behind a proxy of `trusted_proxies` the one its
/// `X-Forwarded-For` names (as `allow_ips` sees it); `None` when it cannot be told.
fn client_addr(config: &Config, request: &Request<'_>) -> Option<IpAddr> {
    let peer = request.remote.parse::<SocketAddr>().ok().map(|a| a.ip());
    if peer.is_some() && config.trusted_proxies.is_empty() {
        return peer;
    }
    let forwarded: Vec<&str> = request.headers("X-Forwarded-For").collect();
    auth::net::client(peer, &forwarded, &config.trusted_proxies).ok()
}

/// The client a held body is counted to: an IPv4 address, or an IPv6 address's /64 (one client is given
/// a whole /64, and could take four addresses of it).
fn network_of(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !(u128::MAX >> 64)).into()),
        },
        v4 => v4,
    }
}

/// The status a sync run is answered with.
fn status_of(exit: Exit) -> u16 {
    match exit {
        Exit::Code(0) => 200,
        Exit::Code(_) | Exit::Signal(_) => 500,
        Exit::TimedOut => 504,
    }
}

/// A sync run as the history keeps it: it started its duration before it ended (not when the request
/// came, which may have waited for a script slot).
fn attempt_of(outcome: &Outcome, finished_at: i64) -> store::Attempt {
    let (exit_code, signal) = match outcome.exit {
        Exit::Code(code) => (Some(code), None),
        Exit::Signal(signal) => (None, Some(signal)),
        Exit::TimedOut => (None, None),
    };
    store::Attempt {
        n: 1,
        started_at: finished_at - i64::try_from(outcome.duration.as_millis()).unwrap_or(i64::MAX),
        duration_ms: duration_ms(outcome.duration),
        exit_code,
        signal,
        timed_out: outcome.exit == Exit::TimedOut,
        output: String::from_utf8_lossy(&outcome.output).into_owned(),
    }
}

impl http::Handler for Gateway {
    fn max_body(&self) -> u64 {
        self.config().max_body
    }

    fn handle(&self, request: &mut Request<'_>) -> Response {
        if matches!(request.method, Method::Get | Method::Head) && request.path == "/healthz" {
            return Response::json(200, &json!({ "status": "ok" }));
        }
        // HEAD asks for no content, and a webhook is all content: only /healthz takes it.
        if request.method == Method::Head {
            return Response::error(
                405,
                &request.id,
                "HEAD is answered for /healthz only; webhooks are POST (or GET, PUT)",
            );
        }
        let config = self.config();
        let mut response = self.answer(&config, request);
        // Behind a trusted proxy the peer is the proxy: the log names the client it forwarded.
        if !config.trusted_proxies.is_empty() {
            let peer = request.remote.parse::<SocketAddr>().ok().map(|a| a.ip());
            if let Some(client) = client_addr(&config, request).filter(|c| Some(*c) != peer) {
                response.note.push_str(&format!(" client={client}"));
            }
        }
        let sender = config
            .senders
            .select(&request.path)
            .map(|s| s.name.as_str());
        self.metrics.request(response.status, sender);
        response
    }
}

impl Gateway {
    fn answer(&self, config: &Config, request: &mut Request<'_>) -> Response {
        match self.serve(config, request) {
            Ok(Served::Ran(ran)) => {
                self.metrics.ran(
                    ran.line,
                    &ran.script,
                    RunOutcome::of(ran.outcome.exit),
                    ran.outcome.duration,
                );
                ran.response(&request.id)
            }
            Ok(Served::Queued {
                event,
                script,
                sender,
                accepted,
                ack_status,
            }) => queued_response(
                &request.id,
                &event,
                &script,
                sender.as_deref(),
                &accepted,
                ack_status,
            ),
            Err(Refusal::Duplicate(id, first)) => {
                // As the first was answered, as the store answers a duplicate it finds: 200 after a sync
                // run, the route's ack status (202, or 200 for Kazoo) with `queued` after an async accept.
                let mut body = json!({
                    "request_id": first.request_id, "delivery_id": id, "duplicate": true
                });
                if first.queued {
                    body["queued"] = json!(true);
                }
                let mut response = Response::json(first.status, &body);
                response.note = format!(
                    " delivery_id=\"{}\" duplicate=true duplicate_of={}",
                    Escaped(&id),
                    first.request_id
                );
                response
            }
            Err(Refusal::Auth(failure)) => {
                let sender = config
                    .senders
                    .select(&request.path)
                    .map(|s| s.name.as_str());
                self.metrics.auth_failure(sender, &failure);
                self.refuse_sender(config, request, &failure)
            }
            Err(refusal) => {
                let (refusal, routed) = match refusal {
                    Refusal::Routed(inner, note) => (*inner, note),
                    other => (other, String::new()),
                };
                let status = refusal.status();
                let message = refusal.message();
                if status >= 500 {
                    log::error!("{} {message}", request.id);
                }
                // An unsafe script's paths are this machine's, for the log; the sender gets the rest.
                let message = match &refusal {
                    Refusal::Unsafe(u) => format!("refusing to run {}", u.public()),
                    _ => message,
                };
                let mut response = Response::error(status, &request.id, &message);
                response.note = routed;
                // The body was given up part-way, on purpose: answer now and close, rather than wait for
                // the rest of it from a client that may be stalling.
                response.close = matches!(refusal, Refusal::BodiesHeld);
                // Why a body failed (cut short, too slow, too large) is the operator's to see too: a client
                // that gave up will never read the answer that says it.
                if let Refusal::Body(e) = &refusal {
                    response
                        .note
                        .push_str(&format!(" body=\"{}\"", Escaped(&e.to_string())));
                }
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

impl Gateway {
    /// A generic answer for the client; for the operator, which check failed, never a secret or what the
    /// client sent in place of one.
    fn refuse_sender(&self, config: &Config, request: &Request<'_>, failure: &Failure) -> Response {
        let refusal = Refusal::Auth(failure.clone());
        let mut response = Response::error(refusal.status(), &request.id, &refusal.message());
        let sender = config.senders.select(&request.path);
        let name = sender.map_or("-", |s| s.name.as_str());
        response.note = format!(" sender={name} auth=\"{}\"", Escaped(&failure.to_string()));
        if sender.is_some_and(|s| matches!(s.scheme, Scheme::Basic { .. }))
            && failure.status() == 401
        {
            response
                .headers
                .push(("WWW-Authenticate", "Basic realm=\"hookrunner\"".to_string()));
        }
        self.auth_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .log(&format!(
                "{} authentication failed for sender {name} from {}: {}",
                request.id,
                request.remote,
                Escaped(&failure.to_string())
            ));
        if log::log_enabled!(log::Level::Debug) {
            let names: Vec<String> = request
                .header_names()
                .map(|n| Escaped(n).to_string())
                .collect();
            log::debug!("{} header names: {}", request.id, names.join(", "));
        }
        response
    }
}

/// `{"request_id", "event", "queued": true}`; a duplicate is answered as its first delivery was, with
/// that one's request id.
fn queued_response(
    request_id: &str,
    event: &str,
    script: &str,
    sender: Option<&str>,
    accepted: &Accepted,
    ack_status: u16,
) -> Response {
    let (mut response, note) = match accepted {
        Accepted::Queued { id } => (
            Response::json(
                ack_status,
                &json!({ "request_id": request_id, "event": event, "queued": true }),
            ),
            format!("queued={id}"),
        ),
        Accepted::Duplicate {
            id,
            request_id: first,
            status,
        } => (
            Response::json(
                *status,
                &json!({ "request_id": first, "event": event, "queued": true, "duplicate": true }),
            ),
            // The same words as a replay's line (`duplicate_of=` the first's request id), and the row
            // that answered it.
            format!("duplicate=true duplicate_of={first} row={id}"),
        ),
    };
    let sender = sender.map(|s| format!(" sender={s}")).unwrap_or_default();
    response.note = format!("{sender} event={event} script={script} {note}");
    response
}

impl Ran {
    fn response(&self, request_id: &str) -> Response {
        let status = status_of(self.outcome.exit);
        let (exit_code, signal) = match self.outcome.exit {
            Exit::Code(code) => (Some(code), None),
            Exit::Signal(signal) => (None, Some(signal)),
            Exit::TimedOut => (None, None),
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
        let sender = self
            .sender
            .as_ref()
            .map(|s| format!(" sender={s}"))
            .unwrap_or_default();
        response.note = format!(
            "{sender} event={} script={} exit={exit}",
            self.event, self.script
        );
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
    /// The payload file, and how many bytes it holds.
    Spilled(Payload, u64),
}

impl Received {
    /// The body, if it is small enough to be parsed.
    fn inline(&self) -> Option<&[u8]> {
        match self {
            Received::Inline(bytes) => Some(bytes),
            Received::Spilled(..) => None,
        }
    }

    /// The body's length.
    fn len(&self) -> u64 {
        match self {
            Received::Inline(bytes) => bytes.len() as u64,
            Received::Spilled(_, len) => *len,
        }
    }

    /// The body's bytes, for the store. A spilled one is read back into memory only within `held`'s
    /// budget: otherwise many large async bodies at once could hold `max_connections` × `max_body`.
    fn into_bytes(self, payloads: &PayloadDir, held: &mut Hold<'_>) -> Result<Vec<u8>, Refusal> {
        match self {
            Received::Inline(bytes) => Ok(bytes),
            spilled => {
                let payload = spilled.into_payload(payloads)?;
                let len = std::fs::metadata(payload.path())
                    .map_err(Refusal::Payload)?
                    .len();
                if !held.grow(len) {
                    return Err(Refusal::BodiesHeld);
                }
                std::fs::read(payload.path()).map_err(Refusal::Payload)
            }
        }
    }

    /// The body in its payload file, ready for the script.
    fn into_payload(self, payloads: &PayloadDir) -> Result<Payload, Refusal> {
        let mut payload = match self {
            Received::Spilled(payload, _) => payload,
            Received::Inline(bytes) => {
                let mut payload = payloads.create_unnamed().map_err(Refusal::Payload)?;
                payload.write_all(&bytes).map_err(Refusal::Payload)?;
                payload
            }
        };
        payload.finish().map_err(Refusal::Payload)?;
        Ok(payload)
    }
}

/// Bytes held in memory by large bodies across connections: those whose signature is being checked, and
/// async ones on their way to the store; and of the first, how many each client holds.
#[derive(Default)]
struct HeldBodies {
    total: AtomicU64,
    unverified: Mutex<HashMap<Option<IpAddr>, u64>>,
}

/// The part of [`HELD_BODIES_MAX`] the unverified bodies of one client address may hold: clients that
/// send large bodies they cannot sign, and stall, must not take it all from the senders that can.
const CLIENT_SHARE: u64 = 4;

/// One request's share of [`HeldBodies`], given back when it is dropped.
struct Hold<'g> {
    budget: &'g HeldBodies,
    max: u64,
    /// For a body not verified yet: its client's address (`None`: one that cannot be told; an IPv6
    /// address by its /64, which one client has whole), held to `client_max` with the other unverified
    /// bodies of that address.
    client: Option<Option<IpAddr>>,
    /// `max / CLIENT_SHARE`, or `max_body` if larger: one body of any allowed size always fits.
    client_max: u64,
    bytes: u64,
}

impl Hold<'_> {
    /// Takes `n` more bytes; false (taking none) when that would pass `max`, or the client's share.
    fn grow(&mut self, n: u64) -> bool {
        let mut clients = self.client.map(|_| {
            self.budget
                .unverified
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        });
        if let (Some(clients), Some(client)) = (&clients, self.client) {
            let held = clients.get(&client).copied().unwrap_or(0);
            if held + n > self.client_max {
                return false;
            }
        }
        let taken = self
            .budget
            .total
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(n).filter(|&after| after <= self.max)
            })
            .is_ok();
        if taken {
            self.bytes += n;
            if let (Some(clients), Some(client)) = (&mut clients, self.client) {
                *clients.entry(client).or_default() += n;
            }
        }
        taken
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        // Most bodies take nothing: no shared write for them.
        if self.bytes == 0 {
            return;
        }
        self.budget.total.fetch_sub(self.bytes, Ordering::Relaxed);
        if let Some(client) = self.client {
            let mut clients = self
                .budget
                .unverified
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(held) = clients.get_mut(&client) {
                *held = held.saturating_sub(self.bytes);
                if *held == 0 {
                    clients.remove(&client);
                }
            }
        }
    }
}

/// Reads the body, keeping it in memory up to `INLINE_BODY` and streaming the rest to a payload file that
/// has no name until the request is routed. Every byte goes through the sender's signature check, if it has
/// one, which must pass before anything else happens: until then a larger body stays in memory, against
/// `unverified`, and it is written to its file only once it verified, so a request that fails its check
/// writes nothing. A bodiless GET stands for its raw query string (Kazoo sends its payload that way); a
/// signature covers the body, so for it too the empty body.
fn receive(
    request: &mut Request<'_>,
    payloads: &PayloadDir,
    mut check: Option<BodyCheck>,
    mut unverified: Hold<'_>,
) -> Result<Received, Refusal> {
    let mut received = Received::Inline(Vec::new());
    // A signature covers the body alone: the query string must not stand in for it as the payload.
    let signed = check.is_some();
    let mut chunk = [0u8; 16 << 10];
    loop {
        // The buffer is filled before anything is done with it: a read returns what one chunk of a chunked
        // body holds, and a body of one-byte chunks was one write(2) per byte to its payload file.
        let mut n = 0;
        while n < chunk.len() {
            match request.body.read(&mut chunk[n..]) {
                Ok(0) => break,
                Ok(read) => n += read,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Refusal::Body(BodyError::of(&e))),
            }
        }
        if n == 0 {
            break;
        }
        if let Some(check) = &mut check {
            check.update(&chunk[..n]);
        }
        match &mut received {
            Received::Inline(bytes) if bytes.len() + n <= INLINE_BODY => {
                bytes.extend_from_slice(&chunk[..n]);
            }
            Received::Inline(bytes) if signed => {
                // Only what has arrived is taken, never a declared length ahead of it: a client that
                // cannot sign must send every byte it holds the bound with, not a header saying it will.
                // Bodies that stream in together past the bound may all be refused part-way, each told
                // to retry later.
                let past_inline = (bytes.len() + n - INLINE_BODY.max(bytes.len())) as u64;
                if !unverified.grow(past_inline) {
                    return Err(Refusal::BodiesHeld);
                }
                bytes.extend_from_slice(&chunk[..n]);
            }
            Received::Inline(bytes) => {
                let mut payload = payloads.create_unnamed().map_err(Refusal::Payload)?;
                payload.write_all(bytes).map_err(Refusal::Payload)?;
                payload.write_all(&chunk[..n]).map_err(Refusal::Payload)?;
                received = Received::Spilled(payload, (bytes.len() + n) as u64);
            }
            Received::Spilled(payload, len) => {
                payload.write_all(&chunk[..n]).map_err(Refusal::Payload)?;
                *len += n as u64;
            }
        }
    }
    if let Some(check) = check {
        check.finish().map_err(Refusal::Auth)?;
    }
    if let Received::Inline(bytes) = &received {
        if bytes.len() > INLINE_BODY {
            // Verified: now it may go to its file, as an unsigned body that large went at once.
            let mut payload = payloads.create_unnamed().map_err(Refusal::Payload)?;
            payload.write_all(bytes).map_err(Refusal::Payload)?;
            received = Received::Spilled(payload, bytes.len() as u64);
        }
    }
    drop(unverified);
    if let Received::Inline(bytes) = &mut received {
        if bytes.is_empty() && request.method == Method::Get && !signed {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_body_is_counted_to_an_ipv4_address_or_an_ipv6_64() {
        let of = |a: &str| network_of(a.parse().expect("address")).to_string();
        assert_eq!(of("203.0.113.7"), "203.0.113.7");
        assert_eq!(of("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(of("::ffff:198.51.100.9"), "198.51.100.9");
    }
}
