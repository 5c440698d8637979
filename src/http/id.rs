//! Request ids: ours (a random per-process prefix and a counter, so unique within a run and unlikely to
//! repeat across runs), and the client's, sanitised.

use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub(super) struct Ids {
    prefix: u32,
    next: AtomicU64,
}

impl Ids {
    pub(super) fn new() -> Ids {
        let mut seed = [0u8; 4];
        let random = File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .is_ok();
        let prefix = if random {
            u32::from_ne_bytes(seed)
        } else {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        };
        Ids {
            prefix,
            next: AtomicU64::new(1),
        }
    }

    pub(super) fn next(&self) -> String {
        format!(
            "{:08x}-{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// The client's `X-Request-Id` if anything usable is left of it: `[A-Za-z0-9._:-]`, at most 64 characters.
pub(super) fn client_id(given: Option<&str>) -> Option<String> {
    let clean: String = given?
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
        .take(64)
        .collect();
    (!clean.is_empty()).then_some(clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ours_are_unique_and_the_clients_are_sanitised() {
        let ids = Ids::new();
        assert_ne!(ids.next(), ids.next());
        assert_eq!(client_id(Some("abc-123")).as_deref(), Some("abc-123"));
        assert_eq!(client_id(Some("a b\r\n<c>")).as_deref(), Some("abc"));
        assert_eq!(client_id(Some(&"x".repeat(500))).map(|s| s.len()), Some(64));
        assert_eq!(client_id(Some("\u{1F600}\u{2028}")), None);
        assert_eq!(client_id(None), None);
    }
}
