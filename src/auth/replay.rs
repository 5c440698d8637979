//! Memory of the delivery ids a Standard Webhooks sender has had accepted, so that a replayed or retried
//! delivery is answered but not run twice, and of the event each id was first tried as. The signature
//! covers the id, the timestamp and the body, but the event may come from what it does not cover (the
//! path, an `X-GitHub-Event` header): a delivery whose first try was not answered 2xx may be sent again by
//! its sender, and must run then, but whoever captured it must not send it again as another event. So an
//! id keeps its first event, and a later request with the id and another event is refused. Bounded: an id is kept only while its signed timestamp could
//! still pass the window check, and at most `MAX_IDS` at once. A full memory forgets the accepted id
//! closest to its end first (and says so in the log) rather than refuse new deliveries: one busy sender
//! must not make every Standard Webhooks sender's deliveries fail until it ends. On an async route the
//! store's dedupe, which has no such bound, still catches a replay of a forgotten id.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Ids kept at most. An entry holds its key (the sender's name, at most 128 bytes, and the id, at most
/// [`MAX_DELIVERY_ID_BYTES`](super::MAX_DELIVERY_ID_BYTES)) twice, once in each map, and its first answer.
/// Counted allocations of a full memory: about 300 bytes an entry for Svix's ~30-byte ids (30 MB), and
/// 1.1 KB with a name and ids at their caps (110 MB). A sender filling it within its window (two of them,
/// see [`Replays::claim`]) sends more than 160 deliveries a second with the default 300 s window, or more
/// than 1.1 a second with a 24 h one.
const MAX_IDS: usize = 100_000;
/// The log says that accepted ids are forgotten early at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

pub struct Replays {
    memory: Mutex<Memory>,
    /// Tells one claim of an id from a later one.
    claims: AtomicU64,
    capacity: usize,
}

impl Default for Replays {
    fn default() -> Replays {
        Replays::with_capacity(MAX_IDS)
    }
}

#[derive(Default)]
struct Memory {
    seen: HashMap<String, Entry>,
    /// The accepted ids by when they are forgotten (and their claim, which makes each key unique); a
    /// running claim is not here: it is never forgotten while its request runs.
    ends: BTreeMap<(Instant, u64), String>,
    warned_at: Option<Instant>,
}

struct Entry {
    state: State,
    claim: u64,
}

enum State {
    /// Running now (the claim's [`Guard`] holds the event an earlier try was).
    Running,
    /// Tried as `event` and not answered 2xx: the sender may retry it (it runs again), as that event only.
    Tried { event: String, until: Instant },
    /// Accepted, and kept until then.
    Accepted(First, Instant),
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
    /// The same delivery is running right now (or, never in practice, the whole memory is): the sender
    /// should retry later.
    Busy,
}

/// A claim on a delivery id while its request runs.
pub struct Guard<'a> {
    replays: &'a Replays,
    key: String,
    claim: u64,
    keep: Duration,
    accepted: Option<First>,
    /// The event an earlier try of the id was, or this request's once resolved.
    event: Option<String>,
}

/// A request whose id was first tried as another event: `first` is that event.
#[derive(Debug, PartialEq, Eq)]
pub struct OtherEvent {
    pub first: String,
}

impl Replays {
    fn with_capacity(capacity: usize) -> Replays {
        Replays {
            memory: Mutex::default(),
            claims: AtomicU64::new(0),
            capacity,
        }
    }

    /// Claims `id` of `sender`; `window` is the sender's timestamp window.
    pub fn claim(&self, sender: &str, id: &str, window: Duration) -> Claim<'_> {
        let key = format!("{sender}\0{id}");
        let now = Instant::now();
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        let event = match memory.seen.get(&key).map(|e| &e.state) {
            Some(State::Accepted(first, until)) if *until > now => {
                return Claim::Duplicate(first.clone());
            }
            Some(State::Running) => return Claim::Busy,
            Some(State::Tried { event, until }) if *until > now => Some(event.clone()),
            _ => None,
        };
        memory.forget_ended(now);
        if memory.seen.len() >= self.capacity {
            if !memory.forget_first() {
                return Claim::Busy;
            }
            if memory
                .warned_at
                .is_none_or(|at| now.duration_since(at) >= WARN_EVERY)
            {
                memory.warned_at = Some(now);
                log::warn!(
                    "the memory of accepted Standard Webhooks ids is full ({} ids): the oldest are \
                     forgotten before their window ends, and a replay of one would run on a sync route",
                    self.capacity
                );
            }
        }
        let claim = self.claims.fetch_add(1, Ordering::Relaxed);
        memory.seen.insert(
            key.clone(),
            Entry {
                state: State::Running,
                claim,
            },
        );
        // A timestamp may be up to one window in the future, and then passes for two windows from now.
        Claim::New(Guard {
            replays: self,
            key,
            claim,
            keep: window.saturating_mul(2),
            accepted: None,
            event,
        })
    }
}

impl Memory {
    /// Forgets the accepted and tried ids whose time is over.
    fn forget_ended(&mut self, now: Instant) {
        while let Some(entry) = self.ends.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, claim), key) = entry.remove_entry();
            self.forget(&key, claim);
        }
    }

    /// Forgets the accepted or tried id closest to its end; false when there is none (every one runs).
    fn forget_first(&mut self) -> bool {
        let Some(((_, claim), key)) = self.ends.pop_first() else {
            return false;
        };
        self.forget(&key, claim);
        true
    }

    /// Removes `key` if it is still the entry of `claim` (not a later claim of the same id).
    fn forget(&mut self, key: &str, claim: u64) {
        if self.seen.get(key).is_some_and(|e| e.claim == claim) {
            self.seen.remove(key);
        }
    }
}

impl Guard<'_> {
    /// The request's event, once resolved: refused if an earlier try of the id was another event.
    pub fn resolved(&mut self, event: &str) -> Result<(), OtherEvent> {
        match &self.event {
            Some(first) if first != event => Err(OtherEvent {
                first: first.clone(),
            }),
            Some(_) => Ok(()),
            None => {
                self.event = Some(event.to_string());
                Ok(())
            }
        }
    }

    /// No event could be found in the request: a later try of the id may not name one either (an event the
    /// signature does not cover, added to a body that names none, would run where the first try could not).
    pub fn unresolved(&mut self) {
        if self.event.is_none() {
            self.event = Some(String::new());
        }
    }

    /// The request was answered 2xx, thus: a later delivery with this id is a duplicate of it.
    pub fn accept(mut self, first: First) {
        self.accepted = Some(first);
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let mut memory = self
            .replays
            .memory
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let ours = memory
            .seen
            .get(&self.key)
            .is_some_and(|e| e.claim == self.claim);
        if !ours {
            return;
        }
        match self.accepted.take() {
            Some(first) => {
                let until = Instant::now() + self.keep;
                memory.ends.insert((until, self.claim), self.key.clone());
                memory.seen.insert(
                    std::mem::take(&mut self.key),
                    Entry {
                        state: State::Accepted(first, until),
                        claim: self.claim,
                    },
                );
            }
            // Not accepted: the sender will retry, and the retry must run, as the same event.
            None => match self.event.take() {
                Some(event) => {
                    let until = Instant::now() + self.keep;
                    memory.ends.insert((until, self.claim), self.key.clone());
                    memory.seen.insert(
                        std::mem::take(&mut self.key),
                        Entry {
                            state: State::Tried { event, until },
                            claim: self.claim,
                        },
                    );
                }
                None => {
                    memory.seen.remove(&self.key);
                }
            },
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

    fn accepted(replays: &Replays, id: &str) {
        let Claim::New(guard) = replays.claim("sw", id, WINDOW) else {
            panic!("{id} is new");
        };
        guard.accept(First {
            request_id: id.into(),
            status: 200,
            queued: false,
        });
    }

    /// A full memory forgets its oldest accepted id to take a new one, rather than refuse every new
    /// delivery; it never forgets one that still runs.
    #[test]
    fn a_full_memory_forgets_the_oldest_accepted_id_never_a_running_one() {
        let replays = Replays::with_capacity(3);
        let Claim::New(running) = replays.claim("sw", "running", WINDOW) else {
            panic!("new");
        };
        accepted(&replays, "a");
        accepted(&replays, "b");
        accepted(&replays, "c");
        assert!(matches!(
            replays.claim("sw", "running", WINDOW),
            Claim::Busy
        ));
        for id in ["b", "c"] {
            assert!(
                matches!(replays.claim("sw", id, WINDOW), Claim::Duplicate(f) if f.request_id == id),
                "{id}"
            );
        }
        assert!(
            matches!(replays.claim("sw", "a", WINDOW), Claim::New(_)),
            "the oldest accepted id was forgotten to make room for c"
        );
        drop(running);
        // Nothing accepted to forget, every place taken by a running claim: come back later.
        let full = Replays::with_capacity(2);
        let _one = full.claim("sw", "1", WINDOW);
        let _two = full.claim("sw", "2", WINDOW);
        assert!(matches!(full.claim("sw", "3", WINDOW), Claim::Busy));
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

    #[test]
    fn an_id_tried_as_one_event_runs_again_as_that_event_only() {
        let replays = Replays::default();
        let Claim::New(mut first) = replays.claim("sw", "msg_1", WINDOW) else {
            panic!("new");
        };
        assert_eq!(first.resolved("invoice.paid"), Ok(()));
        drop(first);
        let Claim::New(mut other) = replays.claim("sw", "msg_1", WINDOW) else {
            panic!("a tried id may be tried again");
        };
        assert_eq!(
            other.resolved("invoice.voided"),
            Err(OtherEvent {
                first: "invoice.paid".into()
            })
        );
        drop(other);
        // A refused try leaves the first event, and so does a try that resolved none.
        let Claim::New(none) = replays.claim("sw", "msg_1", WINDOW) else {
            panic!("new");
        };
        drop(none);
        let Claim::New(mut retry) = replays.claim("sw", "msg_1", WINDOW) else {
            panic!("new");
        };
        assert_eq!(retry.resolved("invoice.paid"), Ok(()));
        retry.accept(First {
            request_id: "r".into(),
            status: 200,
            queued: false,
        });
        assert!(matches!(
            replays.claim("sw", "msg_1", WINDOW),
            Claim::Duplicate(_)
        ));
        // An id whose try never got as far as its event is not bound to one.
        let Claim::New(early) = replays.claim("sw", "msg_2", WINDOW) else {
            panic!("new");
        };
        drop(early);
        let Claim::New(mut later) = replays.claim("sw", "msg_2", WINDOW) else {
            panic!("new");
        };
        assert_eq!(later.resolved("anything"), Ok(()));
    }
}
