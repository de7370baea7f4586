//! Which topics a local subscriber may want: the filters sessions have
//! subscribed to through the front door, the only way into the embedded
//! broker for a subscriber (edgeferry's own link subscribes to nothing).
//!
//! A client's publish that no filter matches, and that is not retained,
//! is not relayed to the broker: the broker would only have dropped it,
//! after a socket write, a decode and a routing step on its own thread,
//! and an acknowledgement back (a third of the CPU an event cost at full
//! speed, benches/compare).
//!
//! The filters are a superset of the broker's, never a subset: relaying a
//! publish nobody wants costs a little, dropping one somebody wants loses
//! it. So a filter is known before its SUBSCRIBE reaches the broker (a
//! publish after the SUBACK finds it), an UNSUBSCRIBE removes nothing, and
//! a persistent session's filters stay after it disconnects (the broker
//! keeps its subscriptions and queues for it), until a clean start of the
//! same client id discards that session.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::topic::filters_overlap;

#[derive(Debug, Default)]
pub struct Subscribers {
    /// Filters held, so the common case (nobody subscribed) takes no lock.
    filters: AtomicUsize,
    sessions: RwLock<Sessions>,
}

#[derive(Debug, Default)]
struct Sessions {
    next: u64,
    by_key: HashMap<u64, Entry>,
}

#[derive(Debug)]
struct Entry {
    client_id: String,
    filters: Vec<String>,
    /// The broker keeps this session when its connection ends.
    persists: bool,
    connected: bool,
}

/// One connection's place in the registry; `closed` when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key(u64);

impl Subscribers {
    /// A connection the broker accepted. `clean_start`: the broker
    /// discards an earlier session of this client id (and with it, that
    /// session's subscriptions). `persists`: the broker keeps this one
    /// after the connection ends.
    pub fn open(&self, client_id: &str, clean_start: bool, persists: bool) -> Key {
        let mut s = self.write();
        // The broker moves (or, on a clean start, discards) this id's
        // earlier session: its filters move into this entry, or go. One
        // entry per id and session, however often a persistent client
        // reconnects.
        let earlier: Vec<u64> = s
            .by_key
            .iter()
            .filter(|(_, e)| !e.connected && e.client_id == client_id)
            .map(|(k, _)| *k)
            .collect();
        let mut filters = Vec::new();
        for k in earlier {
            if let Some(e) = s.by_key.remove(&k) {
                match clean_start {
                    true => self.forget(e.filters.len()),
                    false => filters.extend(e.filters),
                }
            }
        }
        if clean_start {
            // A connection of this id still open is about to be closed by
            // the broker, its session discarded: its filters go when it
            // ends.
            for e in s.by_key.values_mut() {
                if e.client_id == client_id {
                    e.persists = false;
                }
            }
        }
        filters.sort_unstable();
        let before = filters.len();
        filters.dedup();
        self.forget(before - filters.len());
        s.next += 1;
        let key = s.next;
        s.by_key.insert(
            key,
            Entry {
                client_id: client_id.to_string(),
                filters,
                persists,
                connected: true,
            },
        );
        Key(key)
    }

    /// Filters about to be sent to the broker in a SUBSCRIBE.
    pub fn subscribe<'a>(&self, key: Key, filters: impl IntoIterator<Item = &'a str>) {
        let mut s = self.write();
        let Some(e) = s.by_key.get_mut(&key.0) else {
            debug_assert!(false, "subscribe on a closed registry entry");
            return;
        };
        for f in filters {
            // `$share/<group>/<filter>`: the group's members share `filter`.
            let f = match f.strip_prefix("$share/").and_then(|r| r.split_once('/')) {
                Some((_, rest)) => rest,
                None => f,
            };
            if !e.filters.iter().any(|have| have == f) {
                e.filters.push(f.to_string());
                self.filters.fetch_add(1, Ordering::Release);
            }
        }
    }

    /// The connection ended: its filters go, unless the broker keeps its
    /// session.
    pub fn closed(&self, key: Key) {
        let mut s = self.write();
        let persists = match s.by_key.get_mut(&key.0) {
            Some(e) if e.persists => {
                e.connected = false;
                true
            }
            Some(_) => false,
            None => return,
        };
        if !persists && let Some(e) = s.by_key.remove(&key.0) {
            self.forget(e.filters.len());
        }
    }

    fn forget(&self, filters: usize) {
        self.filters.fetch_sub(filters, Ordering::Release);
    }

    /// Whether the broker must get a publish on `topic`: a retained one
    /// always (it is kept for later subscribers, or clears what is kept),
    /// any other if some filter matches it.
    pub fn wanted(&self, topic: &str, retain: bool) -> bool {
        if retain {
            return true;
        }
        if self.filters.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.read()
            .by_key
            .values()
            .any(|e| e.filters.iter().any(|f| filters_overlap(f, topic)))
    }

    // A panic elsewhere while holding the lock leaves the filters as they
    // were: still a superset.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Sessions> {
        self.sessions.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Sessions> {
        self.sessions.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_is_wanted_once_a_filter_matches_it_or_it_is_retained() {
        let s = Subscribers::default();
        assert!(!s.wanted("a/b", false), "nobody subscribed");
        assert!(s.wanted("a/b", true), "retained: always");
        let k = s.open("dash", true, false);
        s.subscribe(k, ["a/+", "$share/g/x/#"]);
        assert!(s.wanted("a/b", false));
        assert!(s.wanted("x", false), "x/# matches x");
        assert!(s.wanted("x/y/z", false), "shared subscription");
        assert!(!s.wanted("b/c", false));
        s.closed(k);
        assert!(
            !s.wanted("a/b", false),
            "a clean session's filters go with it"
        );
        assert_eq!(s.filters.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_persistent_sessions_filters_stay_until_a_clean_start_discards_it() {
        let s = Subscribers::default();
        let k = s.open("dash", false, true);
        s.subscribe(k, ["a/#"]);
        s.closed(k);
        assert!(s.wanted("a/b", false), "the broker queues for it");
        // Resumed, then gone again: still kept.
        let k2 = s.open("dash", false, true);
        s.closed(k2);
        assert!(s.wanted("a/b", false));
        // Another client's clean start discards nothing of it.
        let other = s.open("other", true, false);
        assert!(s.wanted("a/b", false));
        s.closed(other);
        // Its own clean start does.
        let k3 = s.open("dash", true, false);
        assert!(!s.wanted("a/b", false));
        s.closed(k3);
        assert_eq!(s.filters.load(Ordering::Relaxed), 0);
    }

    /// A persistent client reconnecting (and subscribing again each time)
    /// keeps one entry with one copy of its filters, not one per visit.
    #[test]
    fn a_resumed_session_takes_over_its_filters_instead_of_adding_an_entry() {
        let s = Subscribers::default();
        for _ in 0..100 {
            let k = s.open("dash", false, true);
            s.subscribe(k, ["a/#", "b/+"]);
            s.closed(k);
        }
        assert_eq!(s.read().by_key.len(), 1);
        assert_eq!(s.filters.load(Ordering::Relaxed), 2);
        assert!(s.wanted("b/c", false));
    }

    /// A clean start takes over a persistent session still connected: the
    /// broker discards that session, so its filters go when it closes.
    #[test]
    fn a_clean_start_takeover_ends_the_old_sessions_persistence() {
        let s = Subscribers::default();
        let old = s.open("dash", false, true);
        s.subscribe(old, ["a/#"]);
        let new = s.open("dash", true, false);
        assert!(s.wanted("a/b", false), "still open");
        s.closed(old);
        assert!(!s.wanted("a/b", false));
        s.closed(new);
        assert_eq!(s.filters.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_clean_start_keeps_the_filters_of_a_connection_still_open() {
        // A client id taken over: the old connection is still open until
        // the broker closes it, and its own end removes its filters.
        let s = Subscribers::default();
        let old = s.open("dash", true, false);
        s.subscribe(old, ["a/#"]);
        let new = s.open("dash", true, false);
        assert!(s.wanted("a/b", false));
        s.subscribe(new, ["b/#"]);
        s.closed(old);
        assert!(!s.wanted("a/b", false));
        assert!(s.wanted("b/c", false), "the new connection's stay");
    }
}
