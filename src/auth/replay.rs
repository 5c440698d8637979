//! Memory of the delivery ids a Standard Webhooks sender has had accepted, so that a replayed or retried
//! delivery is answered but not run twice. Bounded: an id is kept only while its signed timestamp could
//! still pass the window check, and at most `MAX_IDS` at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// More ids than a sender has within one window at a sustained few hundred deliveries a second.
const MAX_IDS: usize = 100_000;

#[derive(Default)]
pub struct Replays {
    seen: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    accepted: bool,
    until: Instant,
}

/// What a delivery id says about a request.
pub enum Claim<'a> {
    /// Not seen: run it. The id is remembered as accepted only if [`Guard::accept`] is called.
    New(Guard<'a>),
    /// Accepted before, within the window.
    Duplicate,
    /// The same delivery is running right now, or the memory is full: the sender should retry later.
    Busy,
}

/// A claim on a delivery id while its request runs.
pub struct Guard<'a> {
    replays: &'a Replays,
    key: String,
    keep: Duration,
    accepted: bool,
}

impl Replays {
    /// Claims `id` of `sender`; `window` is the sender's timestamp window.
    pub fn claim(&self, sender: &str, id: &str, window: Duration) -> Claim<'_> {
        let key = format!("{sender}\0{id}");
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match seen.get(&key) {
            Some(entry) if entry.until > now && entry.accepted => return Claim::Duplicate,
            Some(entry) if entry.until > now => return Claim::Busy,
            _ => {}
        }
        if seen.len() >= MAX_IDS {
            seen.retain(|_, entry| entry.until > now);
            if seen.len() >= MAX_IDS {
                return Claim::Busy;
            }
        }
        // A timestamp may be up to one window in the future, and then passes for two windows from now.
        let keep = window.saturating_mul(2);
        seen.insert(
            key.clone(),
            Entry {
                accepted: false,
                until: now + keep,
            },
        );
        Claim::New(Guard {
            replays: self,
            key,
            keep,
            accepted: false,
        })
    }
}

impl Guard<'_> {
    /// The request was answered 2xx: a later delivery with this id is a duplicate.
    pub fn accept(mut self) {
        self.accepted = true;
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let mut seen = self.replays.seen.lock().unwrap_or_else(|e| e.into_inner());
        if self.accepted {
            seen.insert(
                std::mem::take(&mut self.key),
                Entry {
                    accepted: true,
                    until: Instant::now() + self.keep,
                },
            );
        } else {
            // Not accepted: the sender will retry, and the retry must run.
            seen.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(300);

    #[test]
    fn an_accepted_id_is_a_duplicate_a_failed_one_runs_again() {
        let replays = Replays::default();
        let Claim::New(first) = replays.claim("sw", "msg_1", WINDOW) else {
            panic!("a new id is new");
        };
        assert!(
            matches!(replays.claim("sw", "msg_1", WINDOW), Claim::Busy),
            "while it runs"
        );
        assert!(
            matches!(replays.claim("other", "msg_1", WINDOW), Claim::New(_)),
            "ids are per sender"
        );
        first.accept();
        assert!(matches!(
            replays.claim("sw", "msg_1", WINDOW),
            Claim::Duplicate
        ));
        let Claim::New(failed) = replays.claim("sw", "msg_2", WINDOW) else {
            panic!("a new id is new");
        };
        drop(failed);
        assert!(
            matches!(replays.claim("sw", "msg_2", WINDOW), Claim::New(_)),
            "a failure is retried"
        );
    }

    #[test]
    fn ids_are_forgotten_after_the_window() {
        let replays = Replays::default();
        let Claim::New(guard) = replays.claim("sw", "msg_1", Duration::ZERO) else {
            panic!("new");
        };
        guard.accept();
        assert!(matches!(
            replays.claim("sw", "msg_1", Duration::ZERO),
            Claim::New(_)
        ));
    }
}
