//! Log output: `RUST_LOG` sets the level (default info). Under systemd (`JOURNAL_STREAM` set) lines carry a
//! syslog priority prefix and no timestamp, since the journal adds its own. With `log_file` set, lines go
//! to that file instead (with timestamps), reopened by [`use_file`] on every SIGHUP so that a rotated file
//! is let go.
//!
//! Anything a client or a script controls (a path, a header, an event value, a line of script output) goes
//! into a log line through [`Escaped`], so it can neither end the line, start a forged one, nor repaint a
//! terminal.

use std::fmt::{self, Write as _};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use log::Level;

/// The `log_file` in use; `None`: stderr (the journal, under systemd).
static FILE: Mutex<Option<File>> = Mutex::new(None);

/// Where every formatted line goes: the current `log_file`, else stderr. One `write` per line, and the file
/// is opened with `O_APPEND`, so lines are never interleaved or lost across a rename.
struct Sink;

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut file = FILE.lock().unwrap_or_else(|e| e.into_inner());
        match file.as_mut() {
            Some(file) => file.write(buf),
            None => io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sends the log to `path` (opened anew, so a file logrotate renamed is let go) or, with `None`, back to
/// stderr. On error the log stays where it was.
pub fn use_file(path: Option<&Path>) -> io::Result<()> {
    let file = match path {
        Some(path) => Some(
            OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o640)
                .open(path)?,
        ),
        None => None,
    };
    *FILE.lock().unwrap_or_else(|e| e.into_inner()) = file;
    Ok(())
}

fn to_file() -> bool {
    FILE.lock().unwrap_or_else(|e| e.into_inner()).is_some()
}

pub fn init() {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Pipe(Box::new(Sink)))
        .format(move |out, record| {
            // A file has no journal to add the time, so it gets the terminal format.
            if journal && !to_file() {
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
                    humantime::format_rfc3339_millis(SystemTime::now()),
                    record.level(),
                    record.args()
                )
            }
        })
        .init();
}

/// Untrusted text for a log line. Printable characters pass through; a backslash becomes `\\`, a double
/// quote `\x22` (so a quoted field cannot be closed early), and every character that could break or disguise
/// the line becomes `\xNN` or `\u{NNNN}`: C0 and C1 controls (CR, LF,
/// ESC, NUL, NEL U+0085, ...), DEL, the line and paragraph separators U+2028/U+2029, and the bidirectional
/// controls (U+061C, U+200E/F, U+202A-U+202E, U+2066-U+2069) that reorder what a terminal shows.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(needs_escape) {
            f.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            match c {
                '\\' => f.write_str("\\\\")?,
                c if (c as u32) < 0x80 => write!(f, "\\x{:02x}", c as u32)?,
                c => write!(f, "\\u{{{:04x}}}", c as u32)?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

fn needs_escape(c: char) -> bool {
    matches!(c,
        '\\'
        | '"'
        | '\u{0}'..='\u{1f}'
        | '\u{7f}'..='\u{9f}'
        | '\u{061c}'
        | '\u{200e}' | '\u{200f}'
        | '\u{2028}' | '\u{2029}'
        | '\u{202a}'..='\u{202e}'
        | '\u{2066}'..='\u{2069}')
}

/// [`Escaped`] for bytes that may not be UTF-8 (script output): invalid sequences become U+FFFD first.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let _ = write!(out, "{}", Escaped(&String::from_utf8_lossy(bytes)));
    out
}

/// Logs at most one message a second, counting the ones it holds back in the next it lets through.
pub struct RateLimit {
    level: log::Level,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(level: log::Level) -> RateLimit {
        RateLimit {
            level,
            last: None,
            suppressed: 0,
        }
    }

    pub fn log(&mut self, message: &str) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        if self.suppressed > 0 {
            log::log!(
                self.level,
                "{message} ({} similar messages suppressed)",
                self.suppressed
            );
        } else {
            log::log!(self.level, "{message}");
        }
        self.last = Some(now);
        self.suppressed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(text: &str) -> String {
        Escaped(text).to_string()
    }

    #[test]
    fn printable_text_passes_unchanged() {
        for text in [
            "",
            "ComputerAdded",
            "/hooks/a?b=c",
            "John Doe's Mac",
            "aéb €",
            "日本",
        ] {
            assert_eq!(escaped(text), text);
        }
    }

    #[test]
    fn every_kind_of_line_breaker_and_disguise_is_escaped() {
        for (raw, shown) in [
            ("a\nb", "a\\x0ab"),
            ("a\r\nb", "a\\x0d\\x0ab"),
            ("\u{1b}[31mred", "\\x1b[31mred"),
            ("nul\0", "nul\\x00"),
            ("del\u{7f}", "del\\x7f"),
            ("nel\u{85}x", "nel\\u{0085}x"),
            ("csi\u{9b}", "csi\\u{009b}"),
            ("ls\u{2028}ps\u{2029}", "ls\\u{2028}ps\\u{2029}"),
            ("\u{202e}txt.exe", "\\u{202e}txt.exe"),
            ("\u{2066}iso\u{2069}", "\\u{2066}iso\\u{2069}"),
            ("lrm\u{200e}alm\u{61c}", "lrm\\u{200e}alm\\u{061c}"),
            ("back\\slash", "back\\\\slash"),
            ("say \"hi\"", "say \\x22hi\\x22"),
        ] {
            assert_eq!(escaped(raw), shown, "{raw:?}");
        }
    }

    #[test]
    fn an_escaped_text_cannot_pose_as_an_escaped_one() {
        // The literal text `\x0a` and a real LF must not log the same.
        assert_ne!(escaped("\\x0a"), escaped("\n"));
    }

    #[test]
    fn bytes_that_are_not_utf8_are_replaced_then_escaped() {
        assert_eq!(escape_bytes(b"ok\xff\x1b"), "ok\u{fffd}\\x1b");
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn no_escaped_text_holds_a_character_that_needs_escaping(text in any::<String>()) {
            let out = escaped(&text);
            prop_assert!(!out.chars().any(|c| needs_escape(c) && c != '\\'), "{:?}", out);
            prop_assert!(!out.contains('"'));
            prop_assert!(!out.contains('\n') && !out.contains('\r'));
        }
    }
}
