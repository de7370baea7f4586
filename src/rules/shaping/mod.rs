//! Stream shaping operators for rules: throttle, dedupe, deadband and
//! tumbling windows. Pure logic: no I/O, no clock. Time comes in as `now_ms`
//! (the event's receive time, ms since the Unix epoch), so the daemon and the
//! rule test harness (simulated time) run the same code.
//!
//! The caller evaluates the rule's `key` expression (or takes the topic when
//! there is none) and offers each matching event to the rule's [`Shaper`]:
//!
//! - **throttle** `every`: a key passes, then is dropped until `every` has
//!   passed since its last *passed* event. Dropped events do not extend it.
//! - **dedupe** `within`: dropped if the same key *passed* less than `within`
//!   ago; duplicates do not refresh the window, so a key repeated forever
//!   still passes once per `within`. (The mechanics are throttle's; the intent
//!   and the drop reason differ: the key is usually a message id.)
//! - **deadband** `field`, `delta` | `percent`, `heartbeat`: report by
//!   exception. The first event of a key passes; later ones pass when the
//!   field moved by *more than* `delta`, or more than `percent` % of the last
//!   *sent* value (from a last sent value of 0, any change passes), or when
//!   the last sent event is at least `heartbeat` old. Only JSON numbers count:
//!   a missing field, a string or a non-object payload gives
//!   [`Offer::NotNumeric`] and leaves the key's state alone.
//! - **window** `every`, `fields`, `aggregates`: tumbling windows aligned to
//!   multiples of `every` since the epoch. Events are absorbed; a key's window
//!   is emitted by [`Shaper::due`] once `now_ms >= window_end`, or returned
//!   from [`Shaper::offer`] when that key's next event falls in another
//!   window. `aggregates` defaults to `["count"]`.
//!
//! Field paths are dotted (`"reading.temp"`); a segment that is a number
//! indexes an array (`"values.0"`).
//!
//! Clock steps: a receive time earlier than the stored one counts as no time
//! elapsed, unless it is earlier by more than the period (the clock was set
//! back), which counts as the period having elapsed. A key is thus never
//! silenced for more than about two periods by a clock step.
//!
//! Memory: at most `max_keys` keys (default 10 000) per shaper. When a new key
//! arrives and the shaper is full, state that no longer matters goes first
//! (throttle/dedupe entries whose period has elapsed, deadband entries whose
//! heartbeat has elapsed); if that frees less than an eighth of `max_keys`,
//! the least recently offered keys are evicted down to 7/8 of `max_keys`
//! (counted in [`Shaper::evicted`]), so the sweep runs once per many new
//! keys. For windows, the new key's event makes room by closing windows,
//! returned in `Offer::Absorbed { closed }`: those that have already ended
//! (on time, not counted), then, if needed, the least recently offered keys'
//! windows, emitted early with what they have (counted).
//!
//! Files: `spec.rs` (what a rule says, and its checks), `gate.rs`
//! (throttle and dedupe), `deadband.rs`, `window.rs`; this one holds the
//! `Shaper` that dispatches to them and the key bookkeeping they share.
//!
//! Changes from the first sketch of this API: [`Emit::skipped`] (the
//! non-numeric values a window skipped, for the caller's counters),
//! [`DropReason::as_str`] (metric labels), [`Shaper::spec`] (so a reload can
//! keep a shaper whose spec did not change) and `ShapeSpec: Deserialize`
//! (externally tagged: `{ throttle = { every = "10s" } }`).

mod deadband;
mod gate;
mod spec;
mod window;

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use crate::units::HumanDuration;
use deadband::{Deadband, Threshold};
use gate::Gate;
pub use spec::{
    Aggregate, DEFAULT_MAX_KEYS, DeadbandSpec, DedupeSpec, ShapeSpec, ThrottleSpec, WindowSpec,
};
use window::{WindowPlan, Windows};

/// Why an event was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The key passed less than `every` ago.
    Throttled,
    /// The key passed less than `within` ago.
    Duplicate,
    /// The value moved no more than the deadband since the last sent one.
    InsideDeadband,
}

impl DropReason {
    /// Label for counters: `"throttled"`, `"duplicate"`, `"deadband"`.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Throttled => "throttled",
            DropReason::Duplicate => "duplicate",
            DropReason::InsideDeadband => "deadband",
        }
    }
}

/// What became of an offered event.
#[derive(Debug, Clone, PartialEq)]
pub enum Offer<C> {
    /// The event goes on to the rule's destinations.
    Pass,
    /// The event stops here.
    Drop(DropReason),
    /// Deadband only: the field is missing or not a JSON number. The caller
    /// counts it and treats the rule as not matching.
    NotNumeric,
    /// Window only: the event was folded into its key's window. `closed` are
    /// windows this offer closed (the key's previous one, or ones that made
    /// room for a new key), to be sent like the ones from [`Shaper::due`].
    Absorbed {
        /// Windows closed by this offer.
        closed: Vec<Emit<C>>,
    },
}

/// A closed window, to be sent as one event.
#[derive(Debug, Clone, PartialEq)]
pub struct Emit<C> {
    /// The window's key.
    pub key: String,
    /// `{"key", "window_start", "window_end", "count", "<field>": {..}}`.
    pub payload: Value,
    /// The caller's context of the last event absorbed in the window.
    pub ctx: C,
    /// Where the window ends (exclusive), ms since the epoch.
    pub window_end_ms: u64,
    /// Field values left out of min/max/avg/sum because they were missing or
    /// not numbers (0 when no such aggregate is asked for).
    pub skipped: u64,
}

/// The runtime state of one rule's shaping operator. Keep it across rule
/// reloads to keep its state.
#[derive(Debug)]
pub struct Shaper<C> {
    /// The spec it was built from, for reload comparison.
    spec: ShapeSpec,
    /// Keys held at most (at least 1).
    max_keys: usize,
    /// Keys evicted because `max_keys` was reached.
    evicted: u64,
    /// Offer counter: the recency order for least-recently-offered eviction
    /// (independent of the clock, so clock steps do not disturb it).
    seq: u64,
    /// The operator and its per-key state.
    op: Op<C>,
}

#[derive(Debug)]
enum Op<C> {
    /// Throttle and dedupe: same mechanics, different drop reason.
    Gate(Gate),
    Deadband(Deadband),
    Window(Windows<C>),
}

/// A dotted field path, split once.
#[derive(Debug)]
pub(super) struct FieldPath {
    pub name: String,
    segments: Vec<String>,
}

impl FieldPath {
    pub(super) fn new(name: &str) -> Self {
        FieldPath {
            name: name.to_owned(),
            segments: name.split('.').map(str::to_owned).collect(),
        }
    }

    /// The value at this path; a numeric segment indexes an array.
    pub(super) fn lookup<'a>(&self, payload: &'a Value) -> Option<&'a Value> {
        self.segments.iter().try_fold(payload, |v, seg| match v {
            Value::Object(m) => m.get(seg),
            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        })
    }
}

pub(super) fn millis(d: &HumanDuration) -> u64 {
    u64::try_from(d.0.as_millis()).unwrap_or(u64::MAX)
}

/// Whether `period_ms` has elapsed from `then_ms` to `now_ms`; see the module
/// doc for a clock set back.
pub(super) fn period_elapsed(now_ms: u64, then_ms: u64, period_ms: u64) -> bool {
    if now_ms >= then_ms {
        now_ms - then_ms >= period_ms
    } else {
        then_ms - now_ms > period_ms
    }
}

/// How far below `max_keys` a full shaper is brought when it must evict:
/// an eighth, so the O(n) sweep runs once per that many new keys, not once
/// per new key (which would cost tens of microseconds per event at 10,000
/// keys).
pub(super) fn headroom(max_keys: usize) -> usize {
    (max_keys / 8).max(1)
}

/// Makes room for a new key in a full map: drops stale entries; if that does
/// not free `headroom`, evicts the least recently offered keys down to
/// `max_keys - headroom`. Returns how many were evicted (stale entries are
/// not counted).
pub(super) fn make_room<E>(
    keys: &mut HashMap<String, E>,
    max_keys: usize,
    stale: impl Fn(&E) -> bool,
    seen: impl Fn(&E) -> u64,
) -> u64 {
    if keys.len() < max_keys {
        return 0;
    }
    keys.retain(|_, e| !stale(e));
    let target = max_keys - headroom(max_keys);
    if keys.len() <= target {
        return 0;
    }
    let excess = keys.len() - target;
    let cutoff = nth_oldest(keys.values().map(&seen), excess);
    // `seen` values are distinct (one offer counter), so exactly `excess` go.
    keys.retain(|_, e| seen(e) > cutoff);
    excess as u64
}

/// The `n`-th smallest (1-based) of `seen` values.
pub(super) fn nth_oldest(seen: impl Iterator<Item = u64>, n: usize) -> u64 {
    let mut all: Vec<u64> = seen.collect();
    let (_, nth, _) = all.select_nth_unstable(n - 1);
    *nth
}

impl<C: Clone> Shaper<C> {
    /// Builds the runtime form. Expects a spec whose [`ShapeSpec::validate`]
    /// came back empty; an invalid one still never panics (zero periods act
    /// as 1ms, a missing deadband threshold as `delta = 0`).
    pub fn new(spec: ShapeSpec) -> Self {
        let max_keys = spec.max_keys_setting().unwrap_or(DEFAULT_MAX_KEYS).max(1);
        let op = match &spec {
            ShapeSpec::Throttle(s) => Op::Gate(Gate {
                period_ms: millis(&s.every),
                reason: DropReason::Throttled,
                keys: HashMap::new(),
            }),
            ShapeSpec::Dedupe(s) => Op::Gate(Gate {
                period_ms: millis(&s.within),
                reason: DropReason::Duplicate,
                keys: HashMap::new(),
            }),
            ShapeSpec::Deadband(s) => Op::Deadband(Deadband {
                field: FieldPath::new(&s.field),
                threshold: match (s.delta, s.percent) {
                    (Some(d), _) => Threshold::Delta(d),
                    (None, Some(p)) => Threshold::Percent(p),
                    (None, None) => Threshold::Delta(0.0),
                },
                heartbeat_ms: s.heartbeat.as_ref().map(millis),
                keys: HashMap::new(),
            }),
            ShapeSpec::Window(s) => Op::Window(Windows {
                plan: WindowPlan {
                    every_ms: millis(&s.every).max(1),
                    fields: s.fields.iter().map(|f| FieldPath::new(f)).collect(),
                    aggregates: s.aggregates.clone(),
                    numeric: s.aggregates.iter().any(|a| a.is_numeric()),
                    first: s.aggregates.contains(&Aggregate::First),
                    last: s.aggregates.contains(&Aggregate::Last),
                },
                keys: HashMap::new(),
                ends: BTreeMap::new(),
            }),
        };
        Shaper {
            spec,
            max_keys,
            evicted: 0,
            seq: 0,
            op,
        }
    }

    /// The spec this shaper was built from.
    pub fn spec(&self) -> &ShapeSpec {
        &self.spec
    }

    /// Offers one event of `key` received at `now_ms`. `ctx` is kept only by
    /// windows (as the context of the window's last event).
    pub fn offer(&mut self, key: &str, now_ms: u64, payload: &Value, ctx: C) -> Offer<C> {
        self.seq += 1;
        let seq = self.seq;
        match &mut self.op {
            Op::Gate(g) => {
                let (offer, evicted) = g.offer(key, now_ms, seq, self.max_keys);
                self.evicted += evicted;
                offer
            }
            Op::Deadband(d) => {
                let (offer, evicted) = d.offer(key, now_ms, payload, seq, self.max_keys);
                self.evicted += evicted;
                offer
            }
            Op::Window(w) => {
                let (closed, evicted) = w.offer(key, now_ms, payload, ctx, seq, self.max_keys);
                self.evicted += evicted;
                Offer::Absorbed { closed }
            }
        }
    }

    /// Windows that have ended by `now_ms`, ordered by end then key (empty
    /// for the other operators).
    pub fn due(&mut self, now_ms: u64) -> Vec<Emit<C>> {
        match &mut self.op {
            Op::Window(w) => w.due(now_ms),
            _ => Vec::new(),
        }
    }

    /// The earliest `now_ms` at which [`Shaper::due`] would emit something;
    /// `None` when nothing is pending.
    pub fn next_deadline(&self) -> Option<u64> {
        match &self.op {
            Op::Window(w) => w.ends.keys().next().copied(),
            _ => None,
        }
    }

    /// Keys currently held.
    pub fn keys(&self) -> usize {
        match &self.op {
            Op::Gate(g) => g.keys.len(),
            Op::Deadband(d) => d.keys.len(),
            Op::Window(w) => w.keys.len(),
        }
    }

    /// Keys evicted because `max_keys` was reached (for windows: windows
    /// emitted before their end to make room).
    pub fn evicted(&self) -> u64 {
        self.evicted
    }
}

#[cfg(test)]
mod tests;
