//! `hookrunner deliveries`: the operator's view of the store, against the same database the daemon uses,
//! while it runs (SQLite's locking serialises the writes; a retried entry is seen by the dispatcher at its
//! next look, within a quarter of a second).

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::json;

use crate::config::{Config, Overrides};
use crate::store::{self, Attempt, Query, Row, State, Target};
use crate::units::parse_duration;

pub const USAGE: &str = "\
    hookrunner deliveries [--config FILE] [list] [--event GLOB] [--status STATUS|CODE]
                          [--sender NAME] [--since DURATION] [--limit N] [--json]
    hookrunner deliveries [--config FILE] show ID [--payload]
    hookrunner deliveries [--config FILE] retry ID | --dead [--event GLOB]
    hookrunner deliveries [--config FILE] drop ID";

/// What was asked.
#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    pub config: Option<PathBuf>,
    pub action: Action,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    List { query: Query, json: bool },
    Show { id: String, payload: bool },
    Retry(Target),
    Drop(String),
}

/// Parses what follows `deliveries`; `now` (ms since the epoch) turns `--since 1h` into a time.
pub fn parse(args: impl IntoIterator<Item = OsString>, now: i64) -> Result<Args, String> {
    let mut words = Vec::new();
    for arg in args {
        words.push(arg.into_string().map_err(|a| format!("not UTF-8: {a:?}"))?);
    }
    let mut config = None;
    let mut query = Query {
        limit: 50,
        ..Query::default()
    };
    let (mut json, mut payload, mut dead) = (false, false, false);
    let mut positional = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let mut value = |flag: &str| words.next().ok_or(format!("{flag} needs a value"));
        match word.as_str() {
            "--config" => config = Some(PathBuf::from(value("--config")?)),
            "--event" => query.event = Some(value("--event")?),
            "--sender" => query.sender = Some(value("--sender")?),
            "--status" => {
                let status = value("--status")?;
                match (State::parse(&status), status.parse::<i32>()) {
                    (Some(state), _) => query.state = Some(state),
                    (None, Ok(code)) => query.exit_code = Some(code),
                    _ => {
                        return Err(format!(
                            "--status {status:?}: use queued, running, done, failed, dead or an exit code"
                        ));
                    }
                }
            }
            "--since" => {
                let since = parse_duration(&value("--since")?)?;
                query.since = Some(now - since.as_millis() as i64);
            }
            "--limit" => {
                let limit = value("--limit")?;
                query.limit = limit
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or(format!("--limit {limit:?}: use a whole number above 0"))?;
            }
            "--json" => json = true,
            "--payload" => payload = true,
            "--dead" => dead = true,
            flag if flag.starts_with('-') => return Err(format!("unknown option {flag:?}")),
            _ => positional.push(word),
        }
    }
    let mut positional = positional.into_iter();
    let verb = positional.next();
    let id = positional.next();
    if let Some(extra) = positional.next() {
        return Err(format!("unexpected argument {extra:?}"));
    }
    let action = match (verb.as_deref(), id) {
        (None | Some("list"), None) => Action::List { query, json },
        (Some("show"), Some(id)) => Action::Show { id, payload },
        (Some("retry"), Some(id)) if !dead => Action::Retry(Target::One(id)),
        (Some("retry"), None) if dead => Action::Retry(Target::Dead(query.event)),
        (Some("drop"), Some(id)) => Action::Drop(id),
        (Some("retry"), _) => return Err("retry takes an ID or --dead".into()),
        (Some(verb @ ("show" | "drop")), None) => return Err(format!("{verb} needs an ID")),
        (Some(verb), _) => return Err(format!("unknown deliveries command {verb:?}")),
        (None, Some(_)) => return Err("unexpected argument".into()),
    };
    Ok(Args { config, action })
}

/// Runs it; `Err` is a message and an exit code.
pub fn run(args: Args) -> Result<(), (String, u8)> {
    let config = Config::load(args.config.as_deref(), &Overrides::default())
        .map_err(|e| (e.to_string(), 78))?;
    let dir = &config.store.state_dir;
    if !dir.join(store::DATABASE).exists() {
        return Err((
            format!("no store in {}: the daemon has not run yet", dir.display()),
            1,
        ));
    }
    let store = store::open(dir).map_err(|e| (e, 1))?;
    let failed = |e: store::StoreError| (e.to_string(), 1);
    let mut out = std::io::stdout().lock();
    match args.action {
        Action::List { query, json } => {
            let rows = store.list(&query).map_err(failed)?;
            let summary = store.summary().map_err(failed)?;
            if json {
                let rows: Vec<_> = rows.iter().map(row_json).collect();
                let _ = writeln!(out, "{}", serde_json::Value::Array(rows));
                return Ok(());
            }
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
                    return Err((format!("the payload of {} is no longer kept", row.id), 1));
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
            let n = store.retry(&target).map_err(failed)?;
            if n == 0 {
                return Err((
                    "nothing to retry: no such async entry, it is queued or running, or its payload is \
                     no longer kept"
                        .into(),
                    1,
                ));
            }
            let _ = writeln!(
                out,
                "{n} entr{} queued to run now",
                if n == 1 { "y" } else { "ies" }
            );
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

    fn args(list: &[&str]) -> Result<Args, String> {
        parse(list.iter().map(OsString::from), 10_000_000)
    }

    #[test]
    fn parses_each_command() {
        let got = args(&[
            "--status",
            "dead",
            "--event",
            "Computer*",
            "--since",
            "1h",
            "--json",
        ])
        .expect("list");
        let Action::List { query, json } = got.action else {
            panic!("not a list");
        };
        assert!(json);
        assert_eq!(query.state, Some(State::Dead));
        assert_eq!(query.event.as_deref(), Some("Computer*"));
        assert_eq!(query.since, Some(10_000_000 - 3_600_000));
        let got = args(&["list", "--status", "75"]).expect("code");
        assert!(matches!(got.action, Action::List { query, .. } if query.exit_code == Some(75)));
        assert_eq!(
            args(&["show", "12", "--payload"]).map(|a| a.action),
            Ok(Action::Show {
                id: "12".into(),
                payload: true
            })
        );
        assert_eq!(
            args(&["retry", "--dead", "--event", "A*"]).map(|a| a.action),
            Ok(Action::Retry(Target::Dead(Some("A*".into()))))
        );
        assert_eq!(
            args(&["--config", "h.toml", "drop", "abc-1"]),
            Ok(Args {
                config: Some("h.toml".into()),
                action: Action::Drop("abc-1".into())
            })
        );
    }

    #[test]
    fn refuses_bad_usage() {
        for bad in [
            &["show"][..],
            &["retry"],
            &["retry", "1", "--dead"],
            &["list", "--status", "lost"],
            &["list", "--since", "soon"],
            &["list", "--limit", "0"],
            &["frobnicate"],
            &["show", "1", "2"],
            &["list", "--bogus"],
        ] {
            assert!(args(bad).is_err(), "{bad:?}");
        }
    }
}
