//! Throttle and dedupe: a key passes, then is dropped until the period
//! has passed since it last passed (the two differ in intent and in the
//! drop reason, not in mechanics).

use std::collections::HashMap;

use super::{DropReason, Offer, make_room, period_elapsed};

#[derive(Debug)]
pub(super) struct Gate {
    pub period_ms: u64,
    pub reason: DropReason,
    pub keys: HashMap<String, GateEntry>,
}

#[derive(Debug)]
pub(super) struct GateEntry {
    /// When the key last passed.
    passed_ms: u64,
    /// `Shaper::seq` of the key's last offer.
    seen: u64,
}

impl Gate {
    /// One event of `key`; and how many keys were evicted to make room.
    pub(super) fn offer<C>(
        &mut self,
        key: &str,
        now_ms: u64,
        seq: u64,
        max_keys: usize,
    ) -> (Offer<C>, u64) {
        if let Some(e) = self.keys.get_mut(key) {
            e.seen = seq;
            if period_elapsed(now_ms, e.passed_ms, self.period_ms) {
                e.passed_ms = now_ms;
                return (Offer::Pass, 0);
            }
            return (Offer::Drop(self.reason), 0);
        }
        let period = self.period_ms;
        let evicted = make_room(
            &mut self.keys,
            max_keys,
            |e| period_elapsed(now_ms, e.passed_ms, period),
            |e| e.seen,
        );
        self.keys.insert(
            key.to_owned(),
            GateEntry {
                passed_ms: now_ms,
                seen: seq,
            },
        );
        (Offer::Pass, evicted)
    }
}
