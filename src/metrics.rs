//! The daemon's metrics, for Prometheus: what the gateway answered, what ran and how, and who failed
//! authentication and why. Served in the OpenMetrics text format (which Prometheus scrapes and `promtool
//! check metrics` accepts) on a listener of its own, `metrics_listen`, so the webhook port never exposes
//! them and a scrape never waits behind webhook traffic.
//!
//! Label values are only ever what the configuration names (sender names, route lines, scripts) or fixed
//! words, never text from a request, so no client can grow the number of series.
//!
//! The counts of async entries (queued, retrying, running, dead) are not kept here: they are read from the
//! store at each scrape, so they stay true when `hookrunner deliveries retry` or `drop` changes the
//! database from another process.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::auth::Failure;
use crate::runner::Exit;
use crate::store;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    status: String,
    /// The sender profile's name; `-` without one.
    sender: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    /// The routes file's line.
    line: String,
    script: String,
    /// `ok`, `failed` (non-zero exit), `signal` or `timeout`.
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthLabels {
    sender: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    /// `queued`, `retrying`, `running` or `dead`.
    state: &'static str,
}

/// The store's async entries by state, read at each scrape through [`store::Store::backlog`] (one query
/// on an index of the entries not done). When the read fails, this scrape leaves the gauges out rather
/// than show figures that may be stale, counts the failure in `store_read_errors`, and logs it; the
/// other figures are served as always.
struct Backlog {
    store: store::Shared,
    errors: Counter,
}

impl fmt::Debug for Backlog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backlog").finish_non_exhaustive()
    }
}

impl Collector for Backlog {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        match self.store.backlog() {
            Ok(backlog) => {
                let mut family = encoder.encode_descriptor(
                    "async_deliveries",
                    "Async deliveries in the store not done, by state (queued: waiting for their first \
                     attempt or a retry asked for; retrying: failed, waiting to retry)",
                    None,
                    MetricType::Gauge,
                )?;
                for (state, n) in [
                    ("queued", backlog.queued),
                    ("retrying", backlog.retrying),
                    ("running", backlog.running),
                    ("dead", backlog.dead),
                ] {
                    let gauge = ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX));
                    gauge.encode(family.encode_family(&StateLabels { state })?)?;
                }
            }
            Err(e) => {
                self.errors.inc();
                log::warn!("metrics: the async delivery counts are left out of this scrape: {e}");
            }
        }
        let errors = encoder.encode_descriptor(
            "store_read_errors",
            "Scrapes whose read of the store failed, so that they carry no async_deliveries",
            None,
            self.errors.metric_type(),
        )?;
        self.errors.encode(errors)
    }
}

/// When the TLS certificate being served stops being valid (seconds since the epoch), for an alert well
/// before senders refuse it: a renewal that stopped working sends no SIGHUP, so no reload's warning tells.
/// Set at start and at each reload; left out without `[tls]` ([`NO_CERTIFICATE`]).
struct TlsExpiry(Arc<AtomicI64>);

const NO_CERTIFICATE: i64 = i64::MIN;

impl fmt::Debug for TlsExpiry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsExpiry").finish_non_exhaustive()
    }
}

impl Collector for TlsExpiry {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let end = self.0.load(Ordering::Relaxed);
        if end == NO_CERTIFICATE {
            return Ok(());
        }
        let gauge = encoder.encode_descriptor(
            "tls_certificate_expiry_timestamp",
            "When the TLS certificate served stops being valid, in seconds since the epoch",
            Some(&prometheus_client::registry::Unit::Seconds),
            MetricType::Gauge,
        )?;
        ConstGauge::new(end).encode(gauge)
    }
}

/// How a script ended, for `hookrunner_runs_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    Ok,
    Failed,
    Signal,
    Timeout,
}

impl RunOutcome {
    pub fn of(exit: Exit) -> RunOutcome {
        match exit {
            Exit::Code(0) => RunOutcome::Ok,
            Exit::Code(_) => RunOutcome::Failed,
            Exit::Signal(_) => RunOutcome::Signal,
            Exit::TimedOut => RunOutcome::Timeout,
        }
    }

    fn label(self) -> &'static str {
        match self {
            RunOutcome::Ok => "ok",
            RunOutcome::Failed => "failed",
            RunOutcome::Signal => "signal",
            RunOutcome::Timeout => "timeout",
        }
    }
}

pub struct Metrics {
    /// False when no `metrics_listen` serves them: then nothing is counted, and a request pays nothing.
    enabled: bool,
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    runs: Family<RunLabels, Counter>,
    duration: Histogram,
    running: Gauge,
    auth_failures: Family<AuthLabels, Counter>,
    tls_expiry: Arc<AtomicI64>,
}

/// Run durations from 5 ms to about 31 min (×2.5 each): most scripts take milliseconds, a packaging job
/// minutes. Multiplied out rather than `exponential_buckets`, whose `powf` was the daemon's one use of
/// libm: loading libm (its start-up resolvers touch pages all over it) cost 0.5 MiB of idle RSS.
fn duration_buckets() -> impl Iterator<Item = f64> {
    std::iter::successors(Some(0.005), |b| Some(b * 2.5)).take(15)
}

impl Metrics {
    /// The figures, counted only when `enabled`; the store's counts are read at each scrape, when there is
    /// a store.
    pub fn new(enabled: bool, store: Option<store::Shared>) -> Metrics {
        let mut registry = Registry::with_prefix("hookrunner");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests the gateway answered, by status and sender profile",
            requests.clone(),
        );
        let runs = Family::<RunLabels, Counter>::default();
        registry.register(
            "runs",
            "Scripts run, by routes line, script and outcome",
            runs.clone(),
        );
        let duration = Histogram::new(duration_buckets());
        registry.register_with_unit(
            "run_duration",
            "How long scripts ran",
            prometheus_client::registry::Unit::Seconds,
            duration.clone(),
        );
        let running = Gauge::default();
        registry.register("running_scripts", "Scripts running now", running.clone());
        let auth_failures = Family::<AuthLabels, Counter>::default();
        registry.register(
            "auth_failures",
            "Requests refused by sender authentication, by sender profile and reason",
            auth_failures.clone(),
        );
        if let (true, Some(store)) = (enabled, store) {
            registry.register_collector(Box::new(Backlog {
                store,
                errors: Counter::default(),
            }));
        }
        let tls_expiry = Arc::new(AtomicI64::new(NO_CERTIFICATE));
        registry.register_collector(Box::new(TlsExpiry(Arc::clone(&tls_expiry))));
        Metrics {
            enabled,
            registry,
            requests,
            runs,
            duration,
            running,
            auth_failures,
            tls_expiry,
        }
    }

    /// The end of validity of the certificate now served (`None`: no `[tls]`, or one that cannot be read).
    pub fn tls_expiry(&self, end: Option<i64>) {
        self.tls_expiry
            .store(end.unwrap_or(NO_CERTIFICATE), Ordering::Relaxed);
    }

    pub fn request(&self, status: u16, sender: Option<&str>) {
        if !self.enabled {
            return;
        }
        self.requests
            .get_or_create(&RequestLabels {
                status: status.to_string(),
                sender: sender.unwrap_or("-").to_string(),
            })
            .inc();
    }

    pub fn auth_failure(&self, sender: Option<&str>, failure: &Failure) {
        if !self.enabled {
            return;
        }
        self.auth_failures
            .get_or_create(&AuthLabels {
                sender: sender.unwrap_or("-").to_string(),
                reason: reason(failure).to_string(),
            })
            .inc();
    }

    /// A script starts; the guard counts it as running until dropped, however the run ends.
    pub fn running(&self) -> Running<'_> {
        self.running.inc();
        Running(self)
    }

    pub fn ran(&self, line: usize, script: &str, outcome: RunOutcome, duration: Duration) {
        if !self.enabled {
            return;
        }
        self.runs
            .get_or_create(&RunLabels {
                line: line.to_string(),
                script: script.to_string(),
                outcome: outcome.label().to_string(),
            })
            .inc();
        self.duration.observe(duration.as_secs_f64());
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// The Prometheus text format (0.0.4), for scrapers that do not ask for OpenMetrics and for `promtool
    /// check metrics`.
    pub fn encode_prometheus(&self) -> String {
        prometheus_text(&self.encode())
    }
}

pub struct Running<'m>(&'m Metrics);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.dec();
    }
}

/// OpenMetrics text as the Prometheus text format: the two differ, for what we emit, only in that
/// OpenMetrics names a counter family without its `_total` (its samples have it) and ends with `# EOF`;
/// `# UNIT` is a comment to Prometheus and is dropped too.
fn prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// A fixed word for each kind of failure: the log line carries the details.
fn reason(failure: &Failure) -> &'static str {
    match failure {
        Failure::NoSender => "no_sender",
        Failure::Missing(_) => "missing_header",
        Failure::Malformed(_) | Failure::Form { .. } => "malformed_header",
        Failure::WrongCredentials => "wrong_credentials",
        Failure::WrongToken(_) => "wrong_token",
        Failure::Mismatch | Failure::Length { .. } => "signature_mismatch",
        Failure::NoCertificate => "no_client_certificate",
        Failure::Subject(_) => "certificate_subject",
        Failure::OutOfWindow { .. } => "timestamp_out_of_window",
        Failure::Address(_) | Failure::UnknownClient(_) => "address_not_allowed",
        Failure::Event(_) => "event_not_allowed",
        Failure::OtherEvent(_) => "replayed_as_other_event",
    }
}

/// How long a scraper has to send its request head, and how much of it is read.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_HEAD_LINES: usize = 100;

/// Serves `GET /metrics` on `listener`, one connection at a time (a scrape takes microseconds; each
/// connection has [`SCRAPE_TIMEOUT`] in all to ask). Runs for the life of the process.
pub fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                if let Err(e) = answer(stream, &metrics) {
                    log::debug!("metrics: {e}");
                }
            }
            // Out of descriptors, or a client gone before it was accepted: this connection is lost, and a
            // pause keeps a lasting shortage from spinning the thread.
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A socket whose reads all end by one deadline. A read timeout alone bounds each read, and a client
/// sending a byte every second kept the one connection this listener serves for hours, so no scrape got
/// through meanwhile.
struct ByDeadline {
    stream: TcpStream,
    deadline: Instant,
}

impl Read for ByDeadline {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

fn answer(stream: TcpStream, metrics: &Metrics) -> io::Result<()> {
    stream.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
    let head = ByDeadline {
        stream: stream.try_clone()?,
        deadline: Instant::now() + SCRAPE_TIMEOUT,
    };
    let mut reader = BufReader::new(head).take(16 << 10);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // The rest of the head, up to its blank line, so the client sees its answer rather than a reset.
    let mut openmetrics = false;
    for _ in 0..MAX_HEAD_LINES {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            openmetrics |= name.trim().eq_ignore_ascii_case("accept")
                && value.contains("application/openmetrics-text");
        }
    }
    let (status, content_type, body) = route(&request_line, openmetrics, metrics);
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// The answer to a request line.
fn route(
    request_line: &str,
    openmetrics: bool,
    metrics: &Metrics,
) -> (&'static str, &'static str, String) {
    let mut words = request_line.split_whitespace();
    match (
        words.next(),
        words.next().map(|t| t.split('?').next().unwrap_or(t)),
    ) {
        (Some("GET"), Some("/metrics")) if openmetrics => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        (Some("GET"), Some("/metrics")) => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.encode_prometheus(),
        ),
        (Some("GET"), Some(_)) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only /metrics is served here\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "use GET /metrics\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_duration_buckets_are_the_exponential_ones_multiplied_out() {
        let ours: Vec<f64> = duration_buckets().collect();
        let theirs: Vec<f64> =
            prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.5, 15).collect();
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() <= b * 1e-12, "{ours:?} against {theirs:?}");
        }
        let text = Metrics::new(true, None).encode();
        assert!(text.contains("le=\"0.005\""), "{text}");
        assert!(text.contains("le=\"0.0125\""), "{text}");
    }

    #[test]
    fn counts_what_happened() {
        let metrics = Metrics::new(true, None);
        metrics.request(200, Some("jamf"));
        metrics.request(200, Some("jamf"));
        metrics.request(404, None);
        metrics.auth_failure(Some("gh"), &Failure::Mismatch);
        {
            let _running = metrics.running();
            assert!(metrics.encode().contains("hookrunner_running_scripts 1\n"));
        }
        metrics.ran(
            4,
            "ComputerAdded",
            RunOutcome::Ok,
            Duration::from_millis(30),
        );
        metrics.ran(
            4,
            "ComputerAdded",
            RunOutcome::Timeout,
            Duration::from_secs(31),
        );
        let text = metrics.encode();
        for expected in [
            "hookrunner_requests_total{status=\"200\",sender=\"jamf\"} 2\n",
            "hookrunner_requests_total{status=\"404\",sender=\"-\"} 1\n",
            "hookrunner_auth_failures_total{sender=\"gh\",reason=\"signature_mismatch\"} 1\n",
            "hookrunner_runs_total{line=\"4\",script=\"ComputerAdded\",outcome=\"ok\"} 1\n",
            "hookrunner_runs_total{line=\"4\",script=\"ComputerAdded\",outcome=\"timeout\"} 1\n",
            "hookrunner_run_duration_seconds_count 2\n",
            "hookrunner_running_scripts 0\n",
            "# EOF\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
    }

    /// A row as the daemon or `hookrunner deliveries` in another process would leave it.
    fn insert(db: &rusqlite::Connection, mode: &str, state: &str) {
        db.execute(
            "INSERT INTO deliveries (request_id, received_at, mode, event, route_line, script, state, status)
             VALUES ('r', 0, ?1, 'E', 1, 's', ?2, 202)",
            [mode, state],
        )
        .expect("insert");
    }

    /// A scrape's read costs what waits and what is dead, never the history: SQLite answers it from the
    /// covering index of the async entries not done.
    #[test]
    fn the_store_is_read_through_its_index_of_the_entries_not_done() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _store = store::open(dir.path()).expect("store");
        let db = rusqlite::Connection::open(dir.path().join(store::DATABASE)).expect("open");
        let mut stmt = db
            .prepare(&format!("EXPLAIN QUERY PLAN {}", store::sqlite::BACKLOG))
            .expect("explain");
        let plan: Vec<String> = stmt
            .query_map([], |r| r.get::<_, String>(3))
            .and_then(|rows| rows.collect())
            .expect("plan");
        assert!(
            plan.iter().any(|p| p.contains("COVERING INDEX")
                && p.split_whitespace().any(|w| w == "deliveries_async_open")),
            "{plan:?}"
        );
    }

    #[test]
    fn the_store_is_read_at_each_scrape_and_a_failed_read_spares_the_other_figures() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = Metrics::new(true, Some(store::open(dir.path()).expect("store")));
        metrics.request(200, None);
        let text = metrics.encode();
        for expected in [
            "# TYPE hookrunner_async_deliveries gauge\n",
            "hookrunner_async_deliveries{state=\"queued\"} 0\n",
            "hookrunner_async_deliveries{state=\"dead\"} 0\n",
            "hookrunner_store_read_errors_total 0\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        let other = rusqlite::Connection::open(dir.path().join(store::DATABASE)).expect("open");
        for state in ["queued", "queued", "failed", "running", "dead", "done"] {
            insert(&other, "async", state);
        }
        // A sync run that failed is history, not waiting to retry.
        insert(&other, "sync", "failed");
        let text = metrics.encode();
        for expected in [
            "hookrunner_async_deliveries{state=\"queued\"} 2\n",
            "hookrunner_async_deliveries{state=\"retrying\"} 1\n",
            "hookrunner_async_deliveries{state=\"running\"} 1\n",
            "hookrunner_async_deliveries{state=\"dead\"} 1\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        // A store that cannot be read: its gauges are left out, the failure counted, the rest served.
        other
            .execute_batch("DROP TABLE attempts; DROP TABLE deliveries;")
            .expect("drop");
        let text = metrics.encode();
        assert!(!text.contains("hookrunner_async_deliveries"), "{text}");
        for expected in [
            "hookrunner_store_read_errors_total 1\n",
            "hookrunner_requests_total{status=\"200\",sender=\"-\"} 1\n",
            "# EOF\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        assert!(
            metrics
                .encode_prometheus()
                .contains("# TYPE hookrunner_store_read_errors_total counter\n")
        );
    }

    #[test]
    fn the_store_is_not_read_when_no_listener_serves_the_figures() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = Metrics::new(false, Some(store::open(dir.path()).expect("store")));
        let text = metrics.encode();
        assert!(
            !text.contains("async_deliveries") && !text.contains("store_read_errors"),
            "{text}"
        );
    }

    #[test]
    fn only_get_metrics_is_served() {
        let metrics = Metrics::new(true, None);
        let status = |line: &str| route(line, false, &metrics).0;
        assert_eq!(status("GET /metrics HTTP/1.1\r\n"), "200 OK");
        assert_eq!(status("GET /metrics?x HTTP/1.1\r\n"), "200 OK");
        assert_eq!(status("GET / HTTP/1.1\r\n"), "404 Not Found");
        assert_eq!(
            status("POST /metrics HTTP/1.1\r\n"),
            "405 Method Not Allowed"
        );
        assert_eq!(status(""), "405 Method Not Allowed");
        let (_, open, body) = route("GET /metrics HTTP/1.1", true, &metrics);
        assert!(open.starts_with("application/openmetrics-text") && body.ends_with("# EOF\n"));
    }

    #[test]
    fn prometheus_text_names_counter_families_with_their_total() {
        let metrics = Metrics::new(true, None);
        metrics.request(200, None);
        let text = metrics.encode_prometheus();
        assert!(
            text.contains("# HELP hookrunner_requests_total Requests"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE hookrunner_requests_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE hookrunner_running_scripts gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE hookrunner_run_duration_seconds histogram\n"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
    }

    #[test]
    fn nothing_is_counted_when_no_listener_serves_the_figures() {
        let metrics = Metrics::new(false, None);
        metrics.request(200, Some("jamf"));
        metrics.ran(3, "x.sh", RunOutcome::Ok, Duration::from_millis(5));
        metrics.auth_failure(Some("jamf"), &Failure::Mismatch);
        let text = metrics.encode();
        assert!(!text.contains("status=\"200\""), "{text}");
        assert!(!text.contains("x.sh"), "{text}");
    }
}
