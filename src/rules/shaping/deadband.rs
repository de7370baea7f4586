//! Deadband: report by exception; an event passes when its field moved by
//! more than the threshold since the last sent value, or the heartbeat is
//! due.

use std::collections::HashMap;

use serde_json::Value;

use super::{DropReason, FieldPath, Offer, make_room, period_elapsed};

#[derive(Debug)]
pub(super) struct Deadband {
    pub field: FieldPath,
    pub threshold: Threshold,
    pub heartbeat_ms: Option<u64>,
    pub keys: HashMap<String, DeadbandEntry>,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Threshold {
    Delta(f64),
    Percent(f64),
}

#[derive(Debug)]
pub(super) struct DeadbandEntry {
    /// The value of the key's last passed event.
    sent: f64,
    /// When the key last passed.
    sent_ms: u64,
    /// `Shaper::seq` of the key's last (numeric) offer.
    seen: u64,
}

impl Deadband {
    /// One event of `key`; and how many keys were evicted to make room.
    pub(super) fn offer<C>(
        &mut self,
        key: &str,
        now_ms: u64,
        payload: &Value,
        seq: u64,
        max_keys: usize,
    ) -> (Offer<C>, u64) {
        let Some(value) = self.field.lookup(payload).and_then(Value::as_f64) else {
            return (Offer::NotNumeric, 0);
        };
        if let Some(e) = self.keys.get_mut(key) {
            e.seen = seq;
            let moved = (value - e.sent).abs();
            let outside = match self.threshold {
                Threshold::Delta(delta) => moved > delta,
                Threshold::Percent(p) => moved > e.sent.abs() * p / 100.0,
            };
            let heartbeat = self
                .heartbeat_ms
                .is_some_and(|h| period_elapsed(now_ms, e.sent_ms, h));
            if outside || heartbeat {
                e.sent = value;
                e.sent_ms = now_ms;
                return (Offer::Pass, 0);
            }
            return (Offer::Drop(DropReason::InsideDeadband), 0);
        }
        let heartbeat = self.heartbeat_ms;
        let evicted = make_room(
            &mut self.keys,
            max_keys,
            |e| heartbeat.is_some_and(|h| period_elapsed(now_ms, e.sent_ms, h)),
            |e| e.seen,
        );
        self.keys.insert(
            key.to_owned(),
            DeadbandEntry {
                sent: value,
                sent_ms: now_ms,
                seen: seq,
            },
        );
        (Offer::Pass, evicted)
    }
}
