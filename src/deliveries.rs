//! `hookrunner deliveries`: the operator's view of the store, against the same database the daemon uses,
//! while it runs (SQLite's locking serialises the writes; a retried entry is seen by the dispatcher at its
//! next look, within a quarter of a second).

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use clap::{Args, Subcommand};
use serde_json::json;

use crate::config::Config;
use crate::store::{self, Attempt, Query, Row, State, Target};
use crate::units::parse_duration;

/// `hookrunner deliveries`: without a command, `list`.
#[derive(Args, Debug)]
pub struct DeliveriesArgs {
    /// Configuration file, to find the store as `serve` does: it must parse, but only its store keys are
    /// used (default /etc/hookrunner/hookrunner.toml if it exists, else built-in defaults)
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<DeliveriesCommand>,
    /// `list`'s options, for `deliveries` without a command
    #[command(flatten)]
    list: ListArgs,
}

#[derive(Subcommand, Debug)]
enum DeliveriesCommand {
    /// List deliveries, newest first (by the time each came), and a summary line (the default command)
    List(ListArgs),
    /// Show one delivery: its metadata and every attempt with its exit, duration and output tail
    Show {
        /// The delivery's number (ID in `list`) or its request id
        id: String,
        /// Print the payload (the body as received) instead
        #[arg(long)]
        payload: bool,
    },
    /// Queue an async delivery to run now (a dead or done one gets one more attempt)
    Retry {
        /// The delivery's number or request id
        #[arg(required_unless_present = "dead")]
        id: Option<String>,
        /// Every dead delivery instead
        #[arg(long, conflicts_with = "id")]
        dead: bool,
        /// With --dead: only those of events matching this glob
        #[arg(long, value_name = "GLOB", conflicts_with = "id")]
        event: Option<String>,
    },
    /// Remove a delivery that is not running (with no daemon on the store, also one a crash left running)
    Drop {
        /// The delivery's number or request id
        id: String,
    },
}

#[derive(Args, Debug, Default)]
struct ListArgs {
    /// Only events matching this glob (`*`, `?`; ignoring case)
    #[arg(long, value_name = "GLOB")]
    event: Option<String>,
    /// queued, running, done, failed, dead, or an exit code
    #[arg(long, value_name = "STATUS", value_parser = parse_status)]
    status: Option<Status>,
    /// Only those from this sender
    #[arg(long, value_name = "NAME")]
    sender: Option<String>,
    /// Only those received within this long (30s, 5m, 1h)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    since: Option<Duration>,
    /// At most this many rows (default 50)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    limit: Option<u32>,
    /// Print the rows as a JSON array
    #[arg(long)]
    json: bool,
}

const DEFAULT_LIMIT: u32 = 50;

impl ListArgs {
    /// Whether any option was given (`--limit 50` too, though it is the default).
    fn any(&self) -> bool {
        self.event.is_some()
            || self.status.is_some()
            || self.sender.is_some()
            || self.since.is_some()
            || self.limit.is_some()
            || self.json
    }
}

/// What `--status` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    State(State),
    ExitCode(i32),
}

fn parse_status(text: &str) -> Result<Status, String> {
    match (
        State::parse(&text.to_ascii_lowercase()),
        text.parse::<i32>(),
    ) {
        (Some(state), _) => Ok(Status::State(state)),
        (None, Ok(code)) => Ok(Status::ExitCode(code)),
        _ => Err("use queued, running, done, failed, dead or an exit code".into()),
    }
}

/// What was asked.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    List { query: Query, json: bool },
    Show { id: String, payload: bool },
    Retry(Target),
    Drop(String),
}

impl DeliveriesArgs {
    /// The configuration file and the action; `now` (ms since the epoch) turns `--since 1h` into a time.
    /// `list`'s options written before a command are refused: clap takes them as `deliveries`' own and
    /// would drop them, so `deliveries --event 'A*' retry --dead` would retry every dead entry.
    pub fn resolve(self, now: i64) -> Result<(Option<PathBuf>, Action), String> {
        if let (Some(command), true) = (&self.command, self.list.any()) {
            return Err(format!(
                "--event, --status, --sender, --since, --limit and --json go after the command \
                 (`deliveries {} ...`) or without one; written before `{0}` they would be ignored",
                command.name()
            ));
        }
        let list = |l: ListArgs| Action::List {
            query: Query {
                event: l.event,
                state: match l.status {
                    Some(Status::State(state)) => Some(state),
                    _ => None,
                },
                exit_code: match l.status {
                    Some(Status::ExitCode(code)) => Some(code),
                    _ => None,
                },
                sender: l.sender,
                // A span longer than the epoch is "since ever", not a wrap into the future.
                since: l
                    .since
                    .map(|d| now.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))),
                limit: l.limit.unwrap_or(DEFAULT_LIMIT) as usize,
            },
            json: l.json,
        };
        let action = match self.command {
            None => list(self.list),
            Some(DeliveriesCommand::List(l)) => list(l),
            Some(DeliveriesCommand::Show { id, payload }) => Action::Show { id, payload },
            Some(DeliveriesCommand::Retry { id: Some(id), .. }) => Action::Retry(Target::One(id)),
            Some(DeliveriesCommand::Retry {
                id: None, event, ..
            }) => Action::Retry(Target::Dead(event)),
            Some(DeliveriesCommand::Drop { id }) => Action::Drop(id),
        };
        Ok((self.config, action))
    }
}

impl DeliveriesCommand {
    fn name(&self) -> &'static str {
        match self {
            DeliveriesCommand::List(_) => "list",
            DeliveriesCommand::Show { .. } => "show",
            DeliveriesCommand::Retry { .. } => "retry",
            DeliveriesCommand::Drop { .. } => "drop",
        }
    }
}

/// Runs it; `Err` is a message and an exit code.
pub fn run(config: Option<PathBuf>, action: Action) -> Result<(), (String, u8)> {
    let settings = Config::load_store(config.as_deref()).map_err(|e| (e.to_string(), 78))?;
    let dir = &settings.state_dir;
    match std::fs::metadata(dir.join(store::DATABASE)) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err((
                format!("no store in {}: the daemon has not run yet", dir.display()),
                1,
            ));
        }
        // The package's state directory is the daemon's alone (0700): not a missing store.
        Err(e) => {
            return Err((
                format!(
                    "cannot read the store in {}: {e} (run as root or as the daemon's user)",
                    dir.display()
                ),
                1,
            ));
        }
    }
    let store = store::open(dir).map_err(|e| (e.to_string(), 1))?;
    let failed = |e: store::StoreError| (e.to_string(), 1);
    let mut out = std::io::stdout().lock();
    match action {
        Action::List { query, json } => {
            let rows = store.list(&query).map_err(failed)?;
            if json {
                let rows: Vec<_> = rows.iter().map(row_json).collect();
                let _ = writeln!(out, "{}", serde_json::Value::Array(rows));
                return Ok(());
            }
            // Counted over every row kept (the summary line's figures are the whole history's), so only
            // for the human listing that prints it.
            let summary = store.summary().map_err(failed)?;
            let _ = writeln!(
                out,
                "{:>6}  {:<24} {:<5} {:<7} {:>6} {:>8} {:>4}  {:<12} {:<20} SCRIPT",
                "ID", "RECEIVED", "MODE", "STATE", "STATUS", "ATTEMPTS", "EXIT", "SENDER", "EVENT"
            );
            for r in &rows {
                let _ = writeln!(
                    out,
                    "{:>6}  {:<24} {:<5} {:<7} {:>6} {:>8} {:>4}  {:<12} {:<20} {}",
                    r.id,
                    time(r.received_at),
                    r.mode,
                    r.state.as_str(),
                    r.status,
                    r.attempts,
                    r.last_exit.map_or("-".into(), |c| c.to_string()),
                    r.sender.as_deref().unwrap_or("-"),
                    r.event,
                    r.script
                );
            }
            let s = summary;
            let _ = writeln!(
                out,
                "total {}, done {}, failed {}, dead {}, queued {}, running {}; store {:.1} MiB",
                s.total,
                s.done,
                s.failed,
                s.dead,
                s.queued,
                s.running,
                s.store_bytes as f64 / (1 << 20) as f64
            );
        }
        Action::Show { id, payload } => {
            let Some((row, attempts)) = store.show(&id).map_err(failed)? else {
                return Err((format!("no delivery {id:?}"), 1));
            };
            if payload {
                let body = store.payload(row.id).map_err(failed)?;
                let Some(body) = body else {
                    // A sync delivery's body is kept only if it was held in memory (at most 256 KiB).
                    let why = if row.mode == "sync"
                        && row.payload_bytes > crate::gateway::INLINE_BODY as u64
                    {
                        "was not kept: a sync delivery's body over 256 KiB is not stored"
                    } else {
                        "is no longer kept (keep_payloads)"
                    };
                    return Err((format!("the payload of {} {why}", row.id), 1));
                };
                let _ = out.write_all(&body);
                return Ok(());
            }
            let mut shown = row_json(&row);
            shown["attempts_made"] = attempts.iter().map(attempt_json).collect();
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&shown).unwrap_or_default()
            );
        }
        Action::Retry(target) => {
            let bounds = store::Bounds {
                max_queued: settings.max_queued,
                max_queued_bytes: settings.max_queued_bytes,
                dedupe_window: settings.dedupe_window,
            };
            let retried = store.retry(&target, bounds).map_err(failed)?;
            let n = retried.queued;
            if n > 0 {
                let _ = writeln!(
                    out,
                    "{n} entr{} queued to run now",
                    if n == 1 { "y" } else { "ies" }
                );
                if store.claimed() == Some(false) {
                    // Queued all the same: the next daemon on this store runs it at its start.
                    eprintln!(
                        "hookrunner: no daemon has this store open now (none runs, or it needs no store: no \
                         async route and history = false), so {} at the next start of one that does",
                        if n == 1 { "it runs" } else { "they run" }
                    );
                }
            }
            if retried.no_room > 0 {
                let m = retried.no_room;
                return Err((
                    format!(
                        "{m} entr{} left as {}: the queue is full (max_queued = {}, max_queued_bytes = \
                         {}); retry once it has drained",
                        if m == 1 { "y" } else { "ies" },
                        if m == 1 { "it was" } else { "they were" },
                        settings.max_queued,
                        settings.max_queued_bytes
                    ),
                    1,
                ));
            }
            if n == 0 {
                return Err((
                    "nothing to retry: no such async entry, it is queued or running, or its payload is \
                     no longer kept"
                        .into(),
                    1,
                ));
            }
        }
        Action::Drop(id) => {
            if !store.drop_entry(&id).map_err(failed)? {
                return Err((format!("no delivery {id:?} (or it is running now)"), 1));
            }
            let _ = writeln!(out, "dropped {id}");
        }
    }
    Ok(())
}

fn time(ms: i64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
        .to_string()
}

fn row_json(r: &Row) -> serde_json::Value {
    json!({
        "id": r.id,
        "request_id": r.request_id,
        "received": time(r.received_at),
        "mode": r.mode,
        "sender": r.sender,
        "event": r.event,
        "route_line": r.route_line,
        "script": r.script,
        "delivery_id": r.delivery_id,
        "state": r.state.as_str(),
        "status": r.status,
        "attempts": r.attempts,
        "exit_code": r.last_exit,
        "next_attempt": r.due_at.filter(|_| r.state == State::Failed).map(time),
        "finished": r.finished_at.map(time),
        "payload_bytes": r.payload_bytes,
        "payload_kept": r.payload_kept,
    })
}

fn attempt_json(a: &Attempt) -> serde_json::Value {
    json!({
        "attempt": a.n,
        "started": time(a.started_at),
        "duration_ms": a.duration_ms,
        "exit_code": a.exit_code,
        "signal": a.signal,
        "timed_out": a.timed_out,
        "output_tail": a.output,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        deliveries: DeliveriesArgs,
    }

    fn args(list: &[&str]) -> Result<(Option<PathBuf>, Action), String> {
        Cli::try_parse_from(std::iter::once("deliveries").chain(list.iter().copied()))
            .map_err(|e| e.to_string())
            .and_then(|cli| cli.deliveries.resolve(10_000_000))
    }

    #[test]
    fn parses_each_command() {
        let (_, action) = args(&[
            "--status",
            "dead",
            "--event",
            "Computer*",
            "--since",
            "1h",
            "--json",
        ])
        .expect("list");
        let Action::List { query, json } = action else {
            panic!("not a list");
        };
        assert!(json);
        assert_eq!(query.state, Some(State::Dead));
        assert_eq!(query.event.as_deref(), Some("Computer*"));
        assert_eq!(query.since, Some(10_000_000 - 3_600_000));
        assert_eq!(query.limit, 50);
        let (_, action) = args(&["list", "--limit", "7"]).expect("limit");
        assert!(matches!(action, Action::List { query, .. } if query.limit == 7));
        let (_, action) = args(&["list", "--status", "75"]).expect("code");
        assert!(matches!(action, Action::List { query, .. } if query.exit_code == Some(75)));
        let (_, action) = args(&["list", "--status", "DEAD"]).expect("any case");
        assert!(matches!(action, Action::List { query, .. } if query.state == Some(State::Dead)));
        // Longer ago than the epoch: since ever, not a time that wrapped.
        let (_, action) = args(&["list", "--since", "18446744073709551615ms"]).expect("huge");
        assert!(matches!(action, Action::List { query, .. } if query.since.is_some_and(|t| t < 0)));
        assert_eq!(
            args(&["show", "12", "--payload"]).map(|a| a.1).ok(),
            Some(Action::Show {
                id: "12".into(),
                payload: true
            })
        );
        assert_eq!(
            args(&["retry", "--dead", "--event", "A*"])
                .map(|a| a.1)
                .ok(),
            Some(Action::Retry(Target::Dead(Some("A*".into()))))
        );
        assert_eq!(
            args(&["--config", "h.toml", "drop", "abc-1"]).ok(),
            Some((Some("h.toml".into()), Action::Drop("abc-1".into())))
        );
    }

    #[test]
    fn refuses_bad_usage() {
        for bad in [
            &["show"][..],
            &["retry"],
            &["retry", "1", "--dead"],
            &["retry", "1", "--event", "A"],
            &["list", "--status", "lost"],
            &["list", "--since", "soon"],
            &["list", "--limit", "0"],
            &["frobnicate"],
            &["show", "1", "2"],
            &["list", "--bogus"],
            // list's options before a command: ignored by clap, so refused here.
            &["--event", "A*", "retry", "--dead"],
            &["--status", "dead", "list"],
            &["--limit", "3", "list"],
            &["--limit", "50", "list"],
            &["--json", "show", "1"],
            &["--sender", "jamf", "drop", "1"],
        ] {
            assert!(args(bad).is_err(), "{bad:?}");
        }
        let refused = args(&["--event", "A*", "retry", "--dead"]).expect_err("before retry");
        assert!(refused.contains("`deliveries retry ...`"), "{refused}");
    }
}
