//! Log output: `RUST_LOG` sets the level (default info). Under systemd (`JOURNAL_STREAM` set) lines carry a
//! syslog priority prefix and no timestamp, since the journal adds its own.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use log::Level;

pub fn init() {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(move |out, record| {
            if journal {
                let priority = match record.level() {
                    Level::Error => 3,
                    Level::Warn => 4,
                    Level::Info => 6,
                    Level::Debug | Level::Trace => 7,
                };
                writeln!(out, "<{priority}>{}", record.args())
            } else {
                writeln!(
                    out,
                    "{} {:<5} {}",
                    timestamp(),
                    record.level(),
                    record.args()
                )
            }
        })
        .init();
}

/// UTC, to the millisecond: `2026-11-23T16:30:51.123Z`.
fn timestamp() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (year, month, day) = crate::http::civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        now.subsec_millis()
    )
}
