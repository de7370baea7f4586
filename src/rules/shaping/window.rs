//! Tumbling windows aligned to multiples of `every` since the epoch: events
//! are absorbed per key, and a key's window is emitted with its aggregates
//! once it has ended.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Number, Value};

use super::spec::Aggregate;
use super::{Emit, FieldPath, headroom, nth_oldest};

#[derive(Debug)]
pub(super) struct Windows<C> {
    pub plan: WindowPlan,
    pub keys: HashMap<String, OpenWindow<C>>,
    /// Multiset of the open windows' ends, for `next_deadline` in O(log n).
    pub ends: BTreeMap<u64, usize>,
}

/// What a window computes, compiled from the spec once.
#[derive(Debug)]
pub(super) struct WindowPlan {
    pub every_ms: u64,
    pub fields: Vec<FieldPath>,
    pub aggregates: Vec<Aggregate>,
    /// Any of min/max/avg/sum asked for (else nothing counts as skipped).
    pub numeric: bool,
    pub first: bool,
    pub last: bool,
}

#[derive(Debug)]
pub(super) struct OpenWindow<C> {
    start_ms: u64,
    end_ms: u64,
    count: u64,
    skipped: u64,
    fields: Vec<FieldAgg>,
    ctx: C,
    /// `Shaper::seq` of the key's last offer.
    seen: u64,
}

#[derive(Debug, Default)]
pub(super) struct FieldAgg {
    /// As f64 for comparing, and the number as it came (an integer stays one).
    min: Option<(f64, Number)>,
    max: Option<(f64, Number)>,
    sum: f64,
    numeric: u64,
    first: Option<Value>,
    last: Option<Value>,
}

impl<C: Clone> Windows<C> {
    /// Absorbs the event; returns the window it closed, if any, and how many
    /// keys were evicted (0 or 1).
    pub(super) fn offer(
        &mut self,
        key: &str,
        now_ms: u64,
        payload: &Value,
        ctx: C,
        seq: u64,
        max_keys: usize,
    ) -> (Vec<Emit<C>>, u64) {
        let start_ms = now_ms - now_ms % self.plan.every_ms;
        if let Some(open) = self.keys.get_mut(key) {
            let closed = if open.start_ms == start_ms {
                open.ctx = ctx;
                Vec::new()
            } else {
                // Another window (later, or earlier after a clock step):
                // the open one is over.
                let fresh = self.plan.open(start_ms, ctx);
                let old = std::mem::replace(open, fresh);
                remove_end(&mut self.ends, old.end_ms);
                add_end(&mut self.ends, open.end_ms);
                vec![self.plan.emit(key.to_owned(), old)]
            };
            open.seen = seq;
            self.plan.absorb(open, payload);
            return (closed, 0);
        }
        let (closed, evicted) = if self.keys.len() >= max_keys {
            self.make_room(now_ms, max_keys)
        } else {
            (Vec::new(), 0)
        };
        let mut open = self.plan.open(start_ms, ctx);
        open.seen = seq;
        self.plan.absorb(&mut open, payload);
        add_end(&mut self.ends, open.end_ms);
        self.keys.insert(key.to_owned(), open);
        (closed, evicted)
    }

    /// Closes windows to make room for a new key: every window that has
    /// already ended (on time, not an eviction); if that does not free
    /// `headroom`, the least recently offered keys' windows down to
    /// `max_keys - headroom`, emitted early with what they have (evictions).
    fn make_room(&mut self, now_ms: u64, max_keys: usize) -> (Vec<Emit<C>>, u64) {
        let mut closed = self.due(now_ms);
        let target = max_keys - headroom(max_keys);
        if self.keys.len() <= target {
            return (closed, 0);
        }
        let excess = self.keys.len() - target;
        let cutoff = nth_oldest(self.keys.values().map(|w| w.seen), excess);
        let mut victims: Vec<(u64, String)> = self
            .keys
            .iter()
            .filter(|(_, w)| w.seen <= cutoff)
            .map(|(k, w)| (w.seen, k.clone()))
            .collect();
        victims.sort();
        for (_, key) in victims {
            if let Some(open) = self.keys.remove(&key) {
                remove_end(&mut self.ends, open.end_ms);
                closed.push(self.plan.emit(key, open));
            }
        }
        (closed, excess as u64)
    }

    pub(super) fn due(&mut self, now_ms: u64) -> Vec<Emit<C>> {
        if self.ends.keys().next().is_none_or(|&end| end > now_ms) {
            return Vec::new();
        }
        let mut closing: Vec<(u64, String)> = self
            .keys
            .iter()
            .filter(|(_, w)| w.end_ms <= now_ms)
            .map(|(k, w)| (w.end_ms, k.clone()))
            .collect();
        closing.sort();
        let mut out = Vec::with_capacity(closing.len());
        for (end, key) in closing {
            if let Some(open) = self.keys.remove(&key) {
                remove_end(&mut self.ends, end);
                out.push(self.plan.emit(key, open));
            }
        }
        out
    }
}

impl WindowPlan {
    fn open<C>(&self, start_ms: u64, ctx: C) -> OpenWindow<C> {
        OpenWindow {
            start_ms,
            end_ms: start_ms.saturating_add(self.every_ms),
            count: 0,
            skipped: 0,
            fields: self.fields.iter().map(|_| FieldAgg::default()).collect(),
            ctx,
            seen: 0,
        }
    }

    fn absorb<C>(&self, open: &mut OpenWindow<C>, payload: &Value) {
        open.count += 1;
        for (path, agg) in self.fields.iter().zip(open.fields.iter_mut()) {
            let value = path.lookup(payload);
            match value {
                Some(Value::Number(n)) => {
                    let x = n.as_f64().unwrap_or(f64::NAN);
                    if agg.min.as_ref().is_none_or(|(m, _)| x < *m) {
                        agg.min = Some((x, n.clone()));
                    }
                    if agg.max.as_ref().is_none_or(|(m, _)| x > *m) {
                        agg.max = Some((x, n.clone()));
                    }
                    agg.sum += x;
                    agg.numeric += 1;
                }
                _ if self.numeric => open.skipped += 1,
                _ => {}
            }
            if let Some(v) = value {
                if self.first && agg.first.is_none() {
                    agg.first = Some(v.clone());
                }
                if self.last {
                    agg.last = Some(v.clone());
                }
            }
        }
    }

    fn emit<C>(&self, key: String, open: OpenWindow<C>) -> Emit<C> {
        let mut obj = Map::new();
        obj.insert("key".into(), Value::String(key.clone()));
        obj.insert("window_start".into(), open.start_ms.into());
        obj.insert("window_end".into(), open.end_ms.into());
        obj.insert("count".into(), open.count.into());
        for (path, agg) in self.fields.iter().zip(open.fields) {
            let mut f = Map::new();
            for a in &self.aggregates {
                let v = match a {
                    Aggregate::Count => continue,
                    Aggregate::Min => agg.min.as_ref().map(|(_, n)| Value::Number(n.clone())),
                    Aggregate::Max => agg.max.as_ref().map(|(_, n)| Value::Number(n.clone())),
                    Aggregate::Sum => (agg.numeric > 0).then_some(agg.sum).and_then(float),
                    Aggregate::Avg => (agg.numeric > 0)
                        .then(|| agg.sum / agg.numeric as f64)
                        .and_then(float),
                    Aggregate::First => agg.first.clone(),
                    Aggregate::Last => agg.last.clone(),
                };
                f.insert(a.as_str().into(), v.unwrap_or(Value::Null));
            }
            obj.insert(path.name.clone(), Value::Object(f));
        }
        Emit {
            key,
            payload: Value::Object(obj),
            ctx: open.ctx,
            window_end_ms: open.end_ms,
            skipped: open.skipped,
        }
    }
}

/// A JSON number, or `None` for an infinite sum.
fn float(x: f64) -> Option<Value> {
    Number::from_f64(x).map(Value::Number)
}

fn add_end(ends: &mut BTreeMap<u64, usize>, end: u64) {
    *ends.entry(end).or_default() += 1;
}

fn remove_end(ends: &mut BTreeMap<u64, usize>, end: u64) {
    if let Some(n) = ends.get_mut(&end) {
        *n -= 1;
        if *n == 0 {
            ends.remove(&end);
        }
    }
}
