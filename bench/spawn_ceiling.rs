//! The spawn ceiling of the benchmark harness (see bench/README.md).
//!
//! Does, in a tight loop and without any HTTP, exactly the per-event work that a webhook ->
//! script gateway cannot avoid: write the payload to a fresh private temp file, run the handler
//! with the file's path as `$1`, wait for it, unlink the file. No gateway can run a handler
//! faster than this on the same machine, so the harness divides every system's runs/s by it.
//!
//! Usage: spawn-ceiling --concurrency N --duration SECS --script PATH --payload PATH
//!
//! Prints one JSON line on stdout (the harness appends it to its results file). Exits 1 if any
//! run of the handler failed, 2 on a usage or set-up error.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const USAGE: &str =
    "usage: spawn-ceiling --concurrency N --duration SECS --script PATH --payload PATH";

struct Args {
    concurrency: usize,
    duration: Duration,
    script: PathBuf,
    payload: PathBuf,
}

/// What one worker thread did.
#[derive(Default)]
struct WorkerResult {
    runs: u64,
    failures: u64,
    /// Wall time of each iteration (temp file to unlink), in nanoseconds.
    latencies_ns: Vec<u64>,
    /// Time this thread itself spent on a CPU during the loop (not the handlers'), in nanoseconds, if known.
    cpu_ns: Option<u64>,
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("spawn-ceiling: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(failures) => {
            eprintln!("spawn-ceiling: {failures} run(s) of the handler failed");
            ExitCode::from(1)
        }
        Err(message) => {
            eprintln!("spawn-ceiling: {message}");
            ExitCode::from(2)
        }
    }
}

fn parse_args(mut raw: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut concurrency = None;
    let mut duration = None;
    let mut script = None;
    let mut payload = None;
    while let Some(flag) = raw.next() {
        if flag == "--help" || flag == "-h" {
            return Err("help requested".to_owned());
        }
        let value = raw.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--concurrency" => {
                let n: usize = value
                    .parse()
                    .map_err(|_| format!("--concurrency: not a whole number: {value:?}"))?;
                if n == 0 {
                    return Err("--concurrency must be at least 1".to_owned());
                }
                concurrency = Some(n);
            }
            "--duration" => {
                let secs: f64 = value
                    .parse()
                    .map_err(|_| format!("--duration: not a number of seconds: {value:?}"))?;
                if !(secs.is_finite() && secs > 0.0 && secs <= 3600.0) {
                    return Err("--duration must be more than 0 and at most 3600 seconds".into());
                }
                duration = Some(Duration::from_secs_f64(secs));
            }
            "--script" => script = Some(PathBuf::from(value)),
            "--payload" => payload = Some(PathBuf::from(value)),
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    Ok(Args {
        concurrency: concurrency.ok_or("--concurrency is required")?,
        duration: duration.ok_or("--duration is required")?,
        script: script.ok_or("--script is required")?,
        payload: payload.ok_or("--payload is required")?,
    })
}

/// Removes the private directory however the run ends.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create() -> Result<Self, String> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("spawn-ceiling.{}.{nanos}", std::process::id()));
        // Not create_all: the directory must be new, so nobody else can have put files in it.
        DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| format!("cannot create private directory {}: {e}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        // Best effort: files are unlinked as the loop goes; this only matters after a failure.
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run(args: &Args) -> Result<u64, String> {
    let payload = fs::read(&args.payload)
        .map_err(|e| format!("cannot read payload {}: {e}", args.payload.display()))?;
    let dir = PrivateDir::create()?;

    // One run before the clock starts: a missing or broken handler is a set-up error, not a
    // stream of failures, and the handler's pages are warm for every system alike.
    let probe = dir.0.join("probe");
    if !run_once(&probe, &payload, &args.script)? {
        return Err(format!(
            "the handler {} exited non-zero on the first run",
            args.script.display()
        ));
    }

    let started = Instant::now();
    let deadline = started + args.duration;
    let results: Vec<Result<WorkerResult, String>> = thread::scope(|scope| {
        let workers: Vec<_> = (0..args.concurrency)
            .map(|worker| {
                let (dir, payload, script) = (&dir.0, &payload, &args.script);
                scope.spawn(move || work(worker, dir, payload, script, deadline))
            })
            .collect();
        workers
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| Err("a worker thread panicked".to_owned()))
            })
            .collect()
    });
    let elapsed = started.elapsed();

    let mut runs = 0;
    let mut failures = 0;
    let mut latencies = Vec::new();
    let mut cpu_ns = Some(0);
    for result in results {
        let result = result?;
        runs += result.runs;
        cpu_ns = cpu_ns.zip(result.cpu_ns).map(|(sum, ns)| sum + ns);
        failures += result.failures;
        latencies.extend(result.latencies_ns);
    }
    latencies.sort_unstable();

    let secs = elapsed.as_secs_f64();
    println!(
        "{{\"kind\":\"ceiling\",\"system\":\"ceiling\",\"concurrency\":{},\"duration_s\":{:.3},\
         \"runs\":{runs},\"failures\":{failures},\"runs_per_s\":{:.1},\"p50_us\":{:.1},\
         \"p99_us\":{:.1}{}}}",
        args.concurrency,
        secs,
        runs as f64 / secs,
        percentile_us(&latencies, 50.0),
        percentile_us(&latencies, 99.0),
        // Left out when unknown, so the report shows "—" rather than a zero.
        cpu_ns.map_or(String::new(), |ns| format!(
            ",\"gateway_cpu_ms\":{}",
            ns / 1_000_000
        )),
    );
    Ok(failures)
}

fn work(
    worker: usize,
    dir: &Path,
    payload: &[u8],
    script: &Path,
    deadline: Instant,
) -> Result<WorkerResult, String> {
    let mut result = WorkerResult::default();
    let mut sequence: u64 = 0;
    let cpu_start = thread_cpu_ns();
    while Instant::now() < deadline {
        sequence += 1;
        let path = dir.join(format!("{worker}-{sequence}"));
        let begun = Instant::now();
        let ok = run_once(&path, payload, script)?;
        let took = begun.elapsed();
        result.runs += 1;
        if !ok {
            result.failures += 1;
        }
        result
            .latencies_ns
            .push(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
    }
    result.cpu_ns = cpu_start
        .zip(thread_cpu_ns())
        .map(|(a, b)| b.saturating_sub(a));
    Ok(result)
}

/// On-CPU time of the calling thread so far (the first field of its schedstat).
fn thread_cpu_ns() -> Option<u64> {
    fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
}

/// One event: temp file, spawn, wait, unlink. Ok(false) when the handler exited non-zero.
fn run_once(path: &Path, payload: &[u8], script: &Path) -> Result<bool, String> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    file.write_all(payload)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    // Closed before the spawn: the handler opens the file by name, as it would behind a gateway.
    drop(file);
    let status = Command::new(script)
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let unlinked = fs::remove_file(path);
    let status = status.map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    unlinked.map_err(|e| format!("cannot unlink {}: {e}", path.display()))?;
    Ok(status.success())
}

/// Nearest-rank percentile of sorted nanosecond samples, in microseconds (0 when empty).
fn percentile_us(sorted_ns: &[u64], pct: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let rank = (pct / 100.0 * sorted_ns.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted_ns.len()) - 1;
    sorted_ns[index] as f64 / 1000.0
}
