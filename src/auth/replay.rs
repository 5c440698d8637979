//! Memory of the delivery ids a Standard Webhooks sender has had accepted, so that a replayed or retried
//! delivery is answered but not run twice. Bounded: an id is kept only while its signed timestamp could
//! still pass the window check, and at most `MAX_IDS` at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// More ids than a sender has within one window at a sustained few hundred deliveries a second.
const MAX_IDS: usize = 100_000;

#[derive(Default)]
pub struct Replays {
    seen: Mutex<HashMap<String, Entry>>,
    /// Tells one claim of an id from a later one.
    claims: AtomicU64,
}

struct Entry {
    state: State,
    /// When an accepted id is forgotten; a claim whose request still runs is never forgotten (its guard
    /// ends it), however long its script runs.
    until: Instant,
}

enum State {
    Running(u64),
    Accepted(First),
}

/// How the first delivery of an id was answered, so that a duplicate is answered alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct First {
    pub request_id: String,
    pub status: u16,
    /// Queued (an async route), not run while the sender waited.
    pub queued: bool,
}

/// What a delivery id says about a request.
pub enum Claim<'a> {
    /// Not seen: run it. The id is remembered as accepted only if [`Guard::accept`] is called.
    New(Guard<'a>),
    /// Accepted before, within the window, and answered thus.
    Duplicate(First),
    /// The same delivery is running right now, or the memory is full: the sender should retry later.
    Busy,
}

/// A claim on a delivery id while its request runs.
pub struct Guard<'a> {
    replays: &'a Replays,
    key: String,
    claim: u64,
    keep: Duration,
    accepted: Option<First>,
}

impl Replays {
    /// Claims `id` of `sender`; `window` is the sender's timestamp window.
    pub fn claim(&self, sender: &str, id: &str, window: Duration) -> Claim<'_> {
        let key = format!("{sender}\0{id}");
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match seen.get(&key) {
            Some(Entry {
                state: State::Accepted(first),
                until,
            }) if *until > now => return Claim::Duplicate(first.clone()),
            Some(Entry {
                state: State::Running(_),
                ..
            }) => return Claim::Busy,
            _ => {}
        }
        if seen.len() >= MAX_IDS {
            seen.retain(|_, entry| matches!(entry.state, State::Running(_)) || entry.until > now);
            if seen.len() >= MAX_IDS {
                return Claim::Busy;
            }
        }
        // A timestamp may be up to one window in the future, and then passes for two windows from now.
        let keep = window.saturating_mul(2);
        let claim = self.claims.fetch_add(1, Ordering::Relaxed);
        seen.insert(
            key.clone(),
            Entry {
                state: State::Running(claim),
                until: now + keep,
            },
        );
        Claim::New(Guard {
            replays: self,
            key,
            claim,
            keep,
            accepted: None,
        })
    }
}

impl Guard<'_> {
    /// The request was answered 2xx, thus: a later delivery with this id is a duplicate of it.
    pub fn accept(mut self, first: First) {
        self.accepted = Some(first);
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let mut seen = self.replays.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(first) = self.accepted.take() {
            seen.insert(
                std::mem::take(&mut self.key),
                Entry {
                    state: State::Accepted(first),
                    until: Instant::now() + self.keep,
                },
            );
        } else if matches!(seen.get(&self.key), Some(Entry { state: State::Running(c), .. }) if *c == self.claim)
        {
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
        let answered = First {
            request_id: "r-1".into(),
            status: 202,
            queued: true,
        };
        first.accept(answered.clone());
        assert!(
            matches!(replays.claim("sw", "msg_1", WINDOW), Claim::Duplicate(f) if f == answered),
            "answered as the first was"
        );
        let Claim::New(failed) = replays.claim("sw", "msg_2", WINDOW) else {
            panic!("a new id is new");
        };
        drop(failed);
        assert!(
            matches!(replays.claim("sw", "msg_2", WINDOW), Claim::New(_)),
            "a failure is retried"
        );
    }

    /// A script that runs longer than the window keeps its claim: a retry meanwhile is told to come back,
    /// and does not run beside it.
    #[test]
    fn a_claim_lasts_while_its_request_runs_however_long() {
        let replays = Replays::default();
        let Claim::New(first) = replays.claim("sw", "msg_1", Duration::ZERO) else {
            panic!("new");
        };
        std::thread::sleep(Duration::from_millis(5));
        assert!(matches!(
            replays.claim("sw", "msg_1", Duration::ZERO),
            Claim::Busy
        ));
        drop(first);
        assert!(matches!(
            replays.claim("sw", "msg_1", Duration::ZERO),
            Claim::New(_)
        ));
    }

    #[test]
    fn ids_are_forgotten_after_the_window() {
        let replays = Replays::default();
        let Claim::New(guard) = replays.claim("sw", "msg_1", Duration::ZERO) else {
            panic!("new");
        };
        guard.accept(First {
            request_id: "r".into(),
            status: 200,
            queued: false,
        });
        assert!(matches!(
            replays.claim("sw", "msg_1", Duration::ZERO),
            Claim::New(_)
        ));
    }
}
