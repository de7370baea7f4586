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
//! Changes from the first sketch of this API: [`Emit::skipped`] (the
//! non-numeric values a window skipped, for the caller's counters),
//! [`DropReason::as_str`] (metric labels), [`Shaper::spec`] (so a reload can
//! keep a shaper whose spec did not change) and `ShapeSpec: Deserialize`
//! (externally tagged: `{ throttle = { every = "10s" } }`).

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use serde_json::{Map, Number, Value};

use crate::units::HumanDuration;

/// Keys held per shaper when `max_keys` is not set.
pub const DEFAULT_MAX_KEYS: usize = 10_000;

/// `throttle = { every = "10s" }`: at most one event per key per `every`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleSpec {
    /// CEL expression giving the key, evaluated by the caller; default: the topic.
    pub key: Option<String>,
    /// Minimum time between two passed events of a key.
    pub every: HumanDuration,
    /// Keys held at most (default 10 000).
    pub max_keys: Option<usize>,
}

/// `dedupe = { key = "payload.id", within = "5m" }`: drop an event whose key
/// passed less than `within` ago.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupeSpec {
    /// CEL expression giving the key, evaluated by the caller; default: the topic.
    pub key: Option<String>,
    /// How long after a key passed its repeats are dropped.
    pub within: HumanDuration,
    /// Keys held at most (default 10 000).
    pub max_keys: Option<usize>,
}

/// `deadband = { field = "value", delta = 0.5, heartbeat = "10m" }`: report
/// by exception.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadbandSpec {
    /// CEL expression giving the key, evaluated by the caller; default: the topic.
    pub key: Option<String>,
    /// Dotted path to the number in a JSON object payload.
    pub field: String,
    /// Pass when the value moved by more than this (absolute) since the last sent one.
    pub delta: Option<f64>,
    /// Pass when the value moved by more than this percentage of the last sent one.
    pub percent: Option<f64>,
    /// Pass anyway when the last sent event of the key is at least this old.
    pub heartbeat: Option<HumanDuration>,
    /// Keys held at most (default 10 000).
    pub max_keys: Option<usize>,
}

/// `window = { every = "1m", fields = ["temp"], aggregates = ["avg", "max"] }`:
/// one summary event per key per tumbling window.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    /// CEL expression giving the key, evaluated by the caller; default: the topic.
    pub key: Option<String>,
    /// Window length; windows start at multiples of it since the epoch.
    pub every: HumanDuration,
    /// Dotted paths of the payload values to aggregate.
    #[serde(default)]
    pub fields: Vec<String>,
    /// What to compute; `count` is top-level, the others are per field.
    #[serde(default = "default_aggregates")]
    pub aggregates: Vec<Aggregate>,
    /// Keys held at most (default 10 000).
    pub max_keys: Option<usize>,
}

fn default_aggregates() -> Vec<Aggregate> {
    vec![Aggregate::Count]
}

/// One aggregate of a window, written in lowercase in the rule file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregate {
    /// Events in the window (top-level `count`, always present).
    Count,
    /// Smallest numeric value of the field.
    Min,
    /// Largest numeric value of the field.
    Max,
    /// Mean of the numeric values of the field.
    Avg,
    /// Sum of the numeric values of the field.
    Sum,
    /// The field's value (any JSON) in the window's first event that has it.
    First,
    /// The field's value (any JSON) in the window's last event that has it.
    Last,
}

impl Aggregate {
    /// The name used in the rule file and in the emitted payload.
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregate::Count => "count",
            Aggregate::Min => "min",
            Aggregate::Max => "max",
            Aggregate::Avg => "avg",
            Aggregate::Sum => "sum",
            Aggregate::First => "first",
            Aggregate::Last => "last",
        }
    }

    /// Whether it is computed from numeric values only.
    fn is_numeric(self) -> bool {
        matches!(
            self,
            Aggregate::Min | Aggregate::Max | Aggregate::Avg | Aggregate::Sum
        )
    }
}

/// Top-level names of a window's payload, which a field may not take.
const WINDOW_RESERVED: [&str; 4] = ["key", "window_start", "window_end", "count"];

/// The shaping operator of one rule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShapeSpec {
    /// At most one event per key per period.
    Throttle(ThrottleSpec),
    /// Drop repeats of a key within a period.
    Dedupe(DedupeSpec),
    /// Report by exception.
    Deadband(DeadbandSpec),
    /// Tumbling-window aggregates.
    Window(WindowSpec),
}

impl ShapeSpec {
    /// The rule author's key expression; `None`: the caller keys by topic.
    pub fn key_expr(&self) -> Option<&str> {
        match self {
            ShapeSpec::Throttle(s) => s.key.as_deref(),
            ShapeSpec::Dedupe(s) => s.key.as_deref(),
            ShapeSpec::Deadband(s) => s.key.as_deref(),
            ShapeSpec::Window(s) => s.key.as_deref(),
        }
    }

    /// The operator's name as written in the rule file.
    pub fn kind(&self) -> &'static str {
        match self {
            ShapeSpec::Throttle(_) => "throttle",
            ShapeSpec::Dedupe(_) => "dedupe",
            ShapeSpec::Deadband(_) => "deadband",
            ShapeSpec::Window(_) => "window",
        }
    }

    fn max_keys_setting(&self) -> Option<usize> {
        match self {
            ShapeSpec::Throttle(s) => s.max_keys,
            ShapeSpec::Dedupe(s) => s.max_keys,
            ShapeSpec::Deadband(s) => s.max_keys,
            ShapeSpec::Window(s) => s.max_keys,
        }
    }

    /// Every problem with the spec, as (name of the offending setting in the
    /// TOML table, message with a hint). Empty when the spec is usable.
    pub fn validate(&self) -> Vec<(&'static str, String)> {
        let mut errs = Vec::new();
        if self.key_expr().is_some_and(|k| k.trim().is_empty()) {
            errs.push((
                "key",
                "is empty; write a CEL expression such as key = \"payload.id\", \
                 or omit it to key by topic"
                    .to_owned(),
            ));
        }
        if self.max_keys_setting() == Some(0) {
            errs.push((
                "max_keys",
                format!("must be at least 1 (omit it for {DEFAULT_MAX_KEYS})"),
            ));
        }
        match self {
            ShapeSpec::Throttle(s) => check_period(&mut errs, "every", &s.every, "\"10s\""),
            ShapeSpec::Dedupe(s) => check_period(&mut errs, "within", &s.within, "\"5m\""),
            ShapeSpec::Deadband(s) => {
                if let Err(e) = check_path(&s.field) {
                    errs.push(("field", e));
                }
                match (s.delta, s.percent) {
                    (None, None) => errs.push((
                        "delta",
                        "deadband needs a threshold: set delta (absolute change, e.g. \
                         delta = 0.5) or percent (change relative to the last sent value, \
                         e.g. percent = 2)"
                            .to_owned(),
                    )),
                    (Some(_), Some(_)) => errs.push((
                        "percent",
                        "delta and percent are both set; keep one".to_owned(),
                    )),
                    (Some(x), None) => check_threshold(&mut errs, "delta", x, "delta = 0.5"),
                    (None, Some(x)) => check_threshold(&mut errs, "percent", x, "percent = 2"),
                }
                if let Some(h) = &s.heartbeat {
                    check_period(&mut errs, "heartbeat", h, "\"10m\"");
                }
            }
            ShapeSpec::Window(s) => {
                check_period(&mut errs, "every", &s.every, "\"1m\"");
                validate_window(&mut errs, s);
            }
        }
        errs
    }
}

fn check_period(
    errs: &mut Vec<(&'static str, String)>,
    name: &'static str,
    d: &HumanDuration,
    example: &str,
) {
    if d.0.as_millis() == 0 {
        errs.push((
            name,
            format!("must be at least 1ms, e.g. {name} = {example}"),
        ));
    }
}

fn check_threshold(
    errs: &mut Vec<(&'static str, String)>,
    name: &'static str,
    x: f64,
    example: &str,
) {
    if !x.is_finite() || x < 0.0 {
        errs.push((
            name,
            format!("must be a finite number >= 0 (got {x}), e.g. {example}"),
        ));
    }
}

fn check_path(path: &str) -> Result<(), String> {
    if path.split('.').any(|seg| seg.trim().is_empty()) {
        Err(format!(
            "{path:?} is not a field path; write a dotted path into the payload, \
             e.g. \"value\" or \"reading.temp\""
        ))
    } else {
        Ok(())
    }
}

fn validate_window(errs: &mut Vec<(&'static str, String)>, s: &WindowSpec) {
    for (i, f) in s.fields.iter().enumerate() {
        if let Err(e) = check_path(f) {
            errs.push(("fields", e));
        } else if WINDOW_RESERVED.contains(&f.as_str()) {
            errs.push((
                "fields",
                format!(
                    "{f:?} would collide with the window's own {f:?} in the emitted \
                     payload; reach it through its parent or rename it upstream"
                ),
            ));
        }
        if s.fields[..i].contains(f) {
            errs.push(("fields", format!("{f:?} is listed twice; remove one")));
        }
    }
    if s.aggregates.is_empty() {
        errs.push((
            "aggregates",
            "is empty; omit it to count events only, or list e.g. \
             aggregates = [\"count\", \"avg\"]"
                .to_owned(),
        ));
    }
    for (i, a) in s.aggregates.iter().enumerate() {
        if s.aggregates[..i].contains(a) {
            errs.push((
                "aggregates",
                format!("{:?} is listed twice; remove one", a.as_str()),
            ));
        }
    }
    let per_field: Vec<&str> = s
        .aggregates
        .iter()
        .filter(|a| **a != Aggregate::Count)
        .map(|a| a.as_str())
        .collect();
    if s.fields.is_empty() && !per_field.is_empty() {
        errs.push((
            "fields",
            format!(
                "{} need fields to aggregate; add e.g. fields = [\"value\"]",
                per_field.join(", ")
            ),
        ));
    }
    if !s.fields.is_empty() && per_field.is_empty() && !s.aggregates.is_empty() {
        errs.push((
            "aggregates",
            "fields are listed but only count is computed; add a per-field \
             aggregate (min, max, avg, sum, first, last) or remove fields"
                .to_owned(),
        ));
    }
}

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

#[derive(Debug)]
struct Gate {
    period_ms: u64,
    reason: DropReason,
    keys: HashMap<String, GateEntry>,
}

#[derive(Debug)]
struct GateEntry {
    /// When the key last passed.
    passed_ms: u64,
    /// `Shaper::seq` of the key's last offer.
    seen: u64,
}

#[derive(Debug)]
struct Deadband {
    field: FieldPath,
    threshold: Threshold,
    heartbeat_ms: Option<u64>,
    keys: HashMap<String, DeadbandEntry>,
}

#[derive(Debug, Clone, Copy)]
enum Threshold {
    Delta(f64),
    Percent(f64),
}

#[derive(Debug)]
struct DeadbandEntry {
    /// The value of the key's last passed event.
    sent: f64,
    /// When the key last passed.
    sent_ms: u64,
    /// `Shaper::seq` of the key's last (numeric) offer.
    seen: u64,
}

#[derive(Debug)]
struct Windows<C> {
    plan: WindowPlan,
    keys: HashMap<String, OpenWindow<C>>,
    /// Multiset of the open windows' ends, for `next_deadline` in O(log n).
    ends: BTreeMap<u64, usize>,
}

/// What a window computes, compiled from the spec once.
#[derive(Debug)]
struct WindowPlan {
    every_ms: u64,
    fields: Vec<FieldPath>,
    aggregates: Vec<Aggregate>,
    /// Any of min/max/avg/sum asked for (else nothing counts as skipped).
    numeric: bool,
    first: bool,
    last: bool,
}

#[derive(Debug)]
struct OpenWindow<C> {
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
struct FieldAgg {
    /// As f64 for comparing, and the number as it came (an integer stays one).
    min: Option<(f64, Number)>,
    max: Option<(f64, Number)>,
    sum: f64,
    numeric: u64,
    first: Option<Value>,
    last: Option<Value>,
}

/// A dotted field path, split once.
#[derive(Debug)]
struct FieldPath {
    name: String,
    segments: Vec<String>,
}

impl FieldPath {
    fn new(name: &str) -> Self {
        FieldPath {
            name: name.to_owned(),
            segments: name.split('.').map(str::to_owned).collect(),
        }
    }

    /// The value at this path; a numeric segment indexes an array.
    fn lookup<'a>(&self, payload: &'a Value) -> Option<&'a Value> {
        self.segments.iter().try_fold(payload, |v, seg| match v {
            Value::Object(m) => m.get(seg),
            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        })
    }
}

fn millis(d: &HumanDuration) -> u64 {
    u64::try_from(d.0.as_millis()).unwrap_or(u64::MAX)
}

/// Whether `period_ms` has elapsed from `then_ms` to `now_ms`; see the module
/// doc for a clock set back.
fn period_elapsed(now_ms: u64, then_ms: u64, period_ms: u64) -> bool {
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
fn headroom(max_keys: usize) -> usize {
    (max_keys / 8).max(1)
}

/// Makes room for a new key in a full map: drops stale entries; if that does
/// not free `headroom`, evicts the least recently offered keys down to
/// `max_keys - headroom`. Returns how many were evicted (stale entries are
/// not counted).
fn make_room<E>(
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
fn nth_oldest(seen: impl Iterator<Item = u64>, n: usize) -> u64 {
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
                if let Some(e) = g.keys.get_mut(key) {
                    e.seen = seq;
                    if period_elapsed(now_ms, e.passed_ms, g.period_ms) {
                        e.passed_ms = now_ms;
                        return Offer::Pass;
                    }
                    return Offer::Drop(g.reason);
                }
                let period = g.period_ms;
                self.evicted += make_room(
                    &mut g.keys,
                    self.max_keys,
                    |e| period_elapsed(now_ms, e.passed_ms, period),
                    |e| e.seen,
                );
                g.keys.insert(
                    key.to_owned(),
                    GateEntry {
                        passed_ms: now_ms,
                        seen: seq,
                    },
                );
                Offer::Pass
            }
            Op::Deadband(d) => {
                let Some(value) = d.field.lookup(payload).and_then(Value::as_f64) else {
                    return Offer::NotNumeric;
                };
                if let Some(e) = d.keys.get_mut(key) {
                    e.seen = seq;
                    let moved = (value - e.sent).abs();
                    let outside = match d.threshold {
                        Threshold::Delta(delta) => moved > delta,
                        Threshold::Percent(p) => moved > e.sent.abs() * p / 100.0,
                    };
                    let heartbeat = d
                        .heartbeat_ms
                        .is_some_and(|h| period_elapsed(now_ms, e.sent_ms, h));
                    if outside || heartbeat {
                        e.sent = value;
                        e.sent_ms = now_ms;
                        return Offer::Pass;
                    }
                    return Offer::Drop(DropReason::InsideDeadband);
                }
                let heartbeat = d.heartbeat_ms;
                self.evicted += make_room(
                    &mut d.keys,
                    self.max_keys,
                    |e| heartbeat.is_some_and(|h| period_elapsed(now_ms, e.sent_ms, h)),
                    |e| e.seen,
                );
                d.keys.insert(
                    key.to_owned(),
                    DeadbandEntry {
                        sent: value,
                        sent_ms: now_ms,
                        seen: seq,
                    },
                );
                Offer::Pass
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

impl<C: Clone> Windows<C> {
    /// Absorbs the event; returns the window it closed, if any, and how many
    /// keys were evicted (0 or 1).
    fn offer(
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

    fn due(&mut self, now_ms: u64) -> Vec<Emit<C>> {
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn throttle(toml: &str) -> Shaper<u32> {
        Shaper::new(ShapeSpec::Throttle(toml::from_str(toml).unwrap()))
    }

    fn dedupe(toml: &str) -> Shaper<u32> {
        Shaper::new(ShapeSpec::Dedupe(toml::from_str(toml).unwrap()))
    }

    fn deadband(toml: &str) -> Shaper<u32> {
        Shaper::new(ShapeSpec::Deadband(toml::from_str(toml).unwrap()))
    }

    fn window(toml: &str) -> Shaper<u32> {
        Shaper::new(ShapeSpec::Window(toml::from_str(toml).unwrap()))
    }

    fn v(x: f64) -> Value {
        json!({ "value": x })
    }

    /// Offers `events` (key, time) with an empty payload; returns the verdicts.
    fn gate_run(s: &mut Shaper<u32>, events: &[(&str, u64)]) -> Vec<Offer<u32>> {
        events
            .iter()
            .map(|(k, t)| s.offer(k, *t, &json!({}), 0))
            .collect()
    }

    /// Offers `values` at the given times to key "k"; returns the verdicts.
    fn band_run(s: &mut Shaper<u32>, events: &[(u64, f64)]) -> Vec<Offer<u32>> {
        events
            .iter()
            .map(|(t, x)| s.offer("k", *t, &v(*x), 0))
            .collect()
    }

    const PASS: Offer<u32> = Offer::Pass;
    const THROTTLED: Offer<u32> = Offer::Drop(DropReason::Throttled);
    const DUP: Offer<u32> = Offer::Drop(DropReason::Duplicate);
    const BAND: Offer<u32> = Offer::Drop(DropReason::InsideDeadband);
    const ABSORBED: Offer<u32> = Offer::Absorbed { closed: Vec::new() };

    fn closed(o: Offer<u32>) -> Emit<u32> {
        match o {
            Offer::Absorbed { mut closed } if closed.len() == 1 => closed.remove(0),
            other => panic!("expected a closed window, got {other:?}"),
        }
    }

    #[test]
    fn throttle_passes_one_event_per_key_per_period() {
        let mut s = throttle(r#"every = "10s""#);
        let got = gate_run(
            &mut s,
            &[
                ("a", 1_000),
                ("a", 5_000),
                ("b", 5_000),
                ("a", 10_999),
                ("a", 11_000),
                ("b", 14_999),
                ("a", 20_999),
                ("b", 15_000),
            ],
        );
        assert_eq!(
            got,
            [
                PASS, THROTTLED, PASS, THROTTLED, PASS, THROTTLED, THROTTLED, PASS
            ]
        );
        assert_eq!(s.keys(), 2);
        assert_eq!(s.next_deadline(), None);
        assert!(s.due(u64::MAX).is_empty());
    }

    #[test]
    fn dedupe_drops_a_key_that_passed_within_the_window_and_repeats_do_not_extend_it() {
        let mut s = dedupe(
            r#"key = "payload.id"
within = "1m""#,
        );
        let got = gate_run(
            &mut s,
            &[
                ("id-1", 0),
                ("id-1", 30_000),
                ("id-2", 30_000),
                ("id-1", 59_999),
                ("id-1", 60_000),
                ("id-1", 60_001),
            ],
        );
        assert_eq!(got, [PASS, DUP, PASS, DUP, PASS, DUP]);
    }

    #[test]
    fn clock_set_back_by_more_than_a_period_does_not_silence_a_key() {
        let mut s = throttle(r#"every = "10s""#);
        let got = gate_run(
            &mut s,
            &[
                ("a", 100_000),
                ("a", 95_000),  // 5s back: no time elapsed
                ("a", 89_999),  // more than 10s back: the period counts as elapsed
                ("a", 90_000),  // 1ms after the new pass
                ("a", 100_000), // 10s after it
            ],
        );
        assert_eq!(got, [PASS, THROTTLED, PASS, THROTTLED, PASS]);
    }

    #[test]
    fn deadband_delta_passes_moves_larger_than_delta_from_the_last_sent_value() {
        let mut s = deadband(
            r#"field = "value"
delta = 0.5"#,
        );
        let got = band_run(
            &mut s,
            &[
                (0, 20.0),
                (1, 20.5),
                (2, 20.4),
                (3, 20.6),
                (4, 20.2),
                (5, 20.0),
            ],
        );
        // 20.5: exactly delta, not more. 20.6 is sent; 20.2 is 0.4 from it;
        // 20.0 is 0.6 from it (the drifting 20.5/20.4 never moved the base).
        assert_eq!(got, [PASS, BAND, BAND, PASS, BAND, PASS]);
    }

    #[test]
    fn deadband_first_event_of_each_key_passes() {
        let mut s = deadband(
            r#"field = "value"
delta = 100"#,
        );
        assert_eq!(s.offer("a", 0, &v(1.0), 0), PASS);
        assert_eq!(s.offer("b", 0, &v(1.0), 0), PASS);
        assert_eq!(s.offer("a", 1, &v(2.0), 0), BAND);
        assert_eq!(s.keys(), 2);
    }

    #[test]
    fn deadband_percent_is_relative_to_the_last_sent_value() {
        let mut s = deadband(
            r#"field = "value"
percent = 10"#,
        );
        let got = band_run(
            &mut s,
            &[(0, 200.0), (1, 219.0), (2, 221.0), (3, 200.0), (4, 198.0)],
        );
        // base 200: band 20; 221 sent, band 22.1: 200 is 21 away, 198 is 23.
        assert_eq!(got, [PASS, BAND, PASS, BAND, PASS]);

        let mut neg = deadband(
            r#"field = "value"
percent = 10"#,
        );
        let got = band_run(&mut neg, &[(0, -50.0), (1, -54.0), (2, -56.0)]);
        assert_eq!(got, [PASS, BAND, PASS]);
    }

    #[test]
    fn deadband_percent_from_zero_passes_any_change() {
        let mut s = deadband(
            r#"field = "value"
percent = 5"#,
        );
        let got = band_run(&mut s, &[(0, 0.0), (1, 0.0), (2, 0.001)]);
        assert_eq!(got, [PASS, BAND, PASS]);
    }

    #[test]
    fn deadband_heartbeat_passes_an_unchanged_value_once_the_last_sent_is_old_enough() {
        let mut s = deadband(
            r#"field = "value"
delta = 1
heartbeat = "10m""#,
        );
        let got = band_run(
            &mut s,
            &[
                (0, 5.0),
                (599_999, 5.0),
                (600_000, 5.0),
                (700_000, 7.0),
                (1_299_999, 7.0),
                (1_300_000, 7.0),
            ],
        );
        assert_eq!(got, [PASS, BAND, PASS, PASS, BAND, PASS]);
    }

    #[test]
    fn deadband_missing_or_non_numeric_field_is_not_numeric_and_leaves_state_alone() {
        let mut s = deadband(
            r#"field = "reading.temp"
delta = 1"#,
        );
        for payload in [
            json!({ "reading": { "temp": "21.5" } }),
            json!({ "reading": { "hum": 40 } }),
            json!({ "reading": 21.5 }),
            json!({ "reading": { "temp": null } }),
            json!([1, 2]),
            json!("21.5"),
        ] {
            assert_eq!(s.offer("k", 0, &payload, 0), Offer::NotNumeric, "{payload}");
        }
        assert_eq!(s.keys(), 0);
        let t = |x: f64| json!({ "reading": { "temp": x } });
        assert_eq!(s.offer("k", 1, &t(21.0), 0), PASS);
        assert_eq!(
            s.offer("k", 2, &json!({ "reading": {} }), 0),
            Offer::NotNumeric
        );
        assert_eq!(s.offer("k", 3, &t(21.5), 0), BAND);
        assert_eq!(s.offer("k", 4, &t(22.5), 0), PASS);
    }

    #[test]
    fn field_paths_index_arrays_with_numeric_segments() {
        let mut s = deadband(
            r#"field = "values.1"
delta = 1"#,
        );
        assert_eq!(s.offer("k", 0, &json!({ "values": [0, 10] }), 0), PASS);
        assert_eq!(s.offer("k", 1, &json!({ "values": [0, 12] }), 0), PASS);
        assert_eq!(
            s.offer("k", 2, &json!({ "values": [0] }), 0),
            Offer::NotNumeric
        );
    }

    #[test]
    fn window_emits_exact_aggregates_in_the_order_asked() {
        let mut s = window(
            r#"every = "10s"
fields = ["value", "meta.unit"]
aggregates = ["count", "min", "max", "avg", "sum", "first", "last"]"#,
        );
        let events = [
            json!({ "value": 2, "meta": { "unit": "C" } }),
            json!({ "value": 1 }),
            json!({ "value": "n/a", "meta": { "unit": "F" } }),
            json!({ "value": 4 }),
        ];
        for (i, e) in events.iter().enumerate() {
            assert_eq!(s.offer("dev-1", 20_000 + i as u64, e, i as u32), ABSORBED);
        }
        let out = s.due(30_000);
        assert_eq!(out.len(), 1);
        let e = &out[0];
        assert_eq!(
            (e.key.as_str(), e.ctx, e.window_end_ms),
            ("dev-1", 3, 30_000)
        );
        // value: 3 numeric of 4 (one skipped); meta.unit: missing twice, a string twice.
        assert_eq!(e.skipped, 1 + 4);
        let expected = json!({
            "key": "dev-1",
            "window_start": 20_000,
            "window_end": 30_000,
            "count": 4,
            "value": {
                "min": 1, "max": 4, "avg": 7.0 / 3.0, "sum": 7.0,
                "first": 2, "last": 4,
            },
            "meta.unit": {
                "min": null, "max": null, "avg": null, "sum": null,
                "first": "C", "last": "F",
            },
        });
        assert_eq!(
            serde_json::to_string(&e.payload).unwrap(),
            serde_json::to_string(&expected).unwrap()
        );
    }

    #[test]
    fn window_with_count_only_emits_count_and_skips_nothing() {
        let mut s = window(r#"every = "1s""#);
        s.offer("k", 100, &json!("raw"), 0);
        s.offer("k", 200, &json!(null), 0);
        let out = s.due(1_000);
        assert_eq!(
            out[0].payload,
            json!({ "key": "k", "window_start": 0, "window_end": 1_000, "count": 2 })
        );
        assert_eq!(out[0].skipped, 0);
    }

    #[test]
    fn window_closes_through_due_at_its_end_and_not_before() {
        let mut s = window(
            r#"every = "1m"
fields = ["value"]
aggregates = ["sum"]"#,
        );
        s.offer("b", 61_000, &v(1.0), 1);
        s.offer("a", 62_000, &v(2.0), 2);
        s.offer("a", 63_000, &v(3.0), 3);
        assert_eq!(s.next_deadline(), Some(120_000));
        assert!(s.due(119_999).is_empty());
        let out = s.due(120_000);
        let got: Vec<_> = out
            .iter()
            .map(|e| {
                (
                    e.key.as_str(),
                    e.payload["count"].clone(),
                    e.payload["value"]["sum"].clone(),
                    e.ctx,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("a", json!(2), json!(5.0), 3),
                ("b", json!(1), json!(1.0), 1)
            ]
        );
        assert_eq!(s.keys(), 0);
        assert_eq!(s.next_deadline(), None);
        assert!(s.due(1_000_000).is_empty());
    }

    #[test]
    fn window_closes_when_its_key_has_an_event_in_a_later_window() {
        let mut s = window(
            r#"every = "10s"
fields = ["value"]
aggregates = ["count", "last"]"#,
        );
        assert_eq!(s.offer("k", 1_000, &v(1.0), 1), ABSORBED);
        assert_eq!(s.offer("k", 9_999, &v(2.0), 2), ABSORBED);
        let e = closed(s.offer("k", 35_000, &v(3.0), 3));
        assert_eq!(
            e.payload,
            json!({
                "key": "k", "window_start": 0, "window_end": 10_000, "count": 2,
                "value": { "last": 2.0 },
            })
        );
        assert_eq!(e.ctx, 2);
        // The new window holds only the new event.
        assert_eq!(s.next_deadline(), Some(40_000));
        let out = s.due(40_000);
        assert_eq!(out[0].payload["window_start"], json!(30_000));
        assert_eq!(out[0].payload["count"], json!(1));
        assert_eq!(out[0].ctx, 3);
        assert_eq!(s.evicted(), 0);
    }

    #[test]
    fn windows_are_aligned_to_multiples_of_every_since_the_epoch() {
        let mut s = window(r#"every = "15m""#);
        let now = 1_700_000_123_456; // 2023-11-14T22:15:23.456Z
        s.offer("k", now, &json!({}), 0);
        let start = 1_700_000_100_000; // 22:15:00
        assert_eq!(now - start, 23_456);
        assert_eq!(start % 900_000, 0);
        assert_eq!(s.next_deadline(), Some(start + 900_000));
        let out = s.due(start + 900_000);
        assert_eq!(out[0].payload["window_start"], json!(start));
        assert_eq!(out[0].payload["window_end"], json!(start + 900_000));
    }

    #[test]
    fn next_deadline_is_the_earliest_open_window_end() {
        let mut s = window(r#"every = "10s""#);
        assert_eq!(s.next_deadline(), None);
        s.offer("a", 25_000, &json!({}), 0);
        assert_eq!(s.next_deadline(), Some(30_000));
        s.offer("b", 5_000, &json!({}), 0); // late receive time for a new key
        assert_eq!(s.next_deadline(), Some(10_000));
        assert_eq!(s.due(10_000).len(), 1);
        assert_eq!(s.next_deadline(), Some(30_000));
        closed(s.offer("a", 41_000, &json!({}), 0));
        assert_eq!(s.next_deadline(), Some(50_000));
    }

    #[test]
    fn throttle_full_of_keys_forgets_expired_keys_before_evicting_the_least_recent() {
        let mut s = throttle(
            r#"every = "10s"
max_keys = 2"#,
        );
        gate_run(&mut s, &[("a", 0), ("b", 5_000)]);
        // "a" passed 10s ago: its entry no longer matters, no eviction.
        assert_eq!(s.offer("c", 10_000, &json!({}), 0), PASS);
        assert_eq!((s.keys(), s.evicted()), (2, 0));
        // Neither b nor c has expired; b was offered least recently.
        assert_eq!(s.offer("b", 11_000, &json!({}), 0), THROTTLED);
        assert_eq!(s.offer("d", 12_000, &json!({}), 0), PASS);
        assert_eq!((s.keys(), s.evicted()), (2, 1));
        // c was evicted, so it passes again as a new key (evicting b).
        assert_eq!(s.offer("b", 12_500, &json!({}), 0), THROTTLED);
        assert_eq!(s.offer("c", 13_000, &json!({}), 0), PASS);
        assert_eq!((s.keys(), s.evicted()), (2, 2));
        assert_eq!(s.offer("d", 13_000, &json!({}), 0), PASS);
    }

    #[test]
    fn dedupe_full_of_keys_evicts_the_least_recently_offered_key() {
        let mut s = dedupe(
            r#"within = "1h"
max_keys = 3"#,
        );
        gate_run(&mut s, &[("a", 0), ("b", 1), ("c", 2), ("a", 3)]);
        assert_eq!(s.offer("d", 4, &json!({}), 0), PASS);
        assert_eq!((s.keys(), s.evicted()), (3, 1));
        assert_eq!(s.offer("a", 5, &json!({}), 0), DUP);
        assert_eq!(s.offer("c", 6, &json!({}), 0), DUP);
        assert_eq!(s.offer("b", 7, &json!({}), 0), PASS, "b was evicted");
    }

    #[test]
    fn deadband_full_of_keys_forgets_heartbeat_expired_keys_first() {
        let mut s = deadband(
            r#"field = "value"
delta = 1
heartbeat = "1m"
max_keys = 2"#,
        );
        s.offer("a", 0, &v(1.0), 0);
        s.offer("b", 30_000, &v(1.0), 0);
        s.offer("a", 40_000, &v(1.5), 0); // recent, but last sent at 0
        assert_eq!(s.offer("c", 60_000, &v(1.0), 0), PASS);
        assert_eq!((s.keys(), s.evicted()), (2, 0), "a's heartbeat was due");
        assert_eq!(s.offer("b", 61_000, &v(1.5), 0), BAND);

        let mut no_hb = deadband(
            r#"field = "value"
delta = 1
max_keys = 2"#,
        );
        no_hb.offer("a", 0, &v(1.0), 0);
        no_hb.offer("b", 0, &v(1.0), 0);
        no_hb.offer("a", 999_999_999, &v(1.0), 0);
        assert_eq!(no_hb.offer("c", 999_999_999, &v(1.0), 0), PASS);
        assert_eq!((no_hb.keys(), no_hb.evicted()), (2, 1));
        assert_eq!(
            no_hb.offer("a", 999_999_999, &v(1.5), 0),
            BAND,
            "b went, a stayed"
        );
        // NotNumeric for a new key takes no room.
        assert_eq!(no_hb.offer("z", 0, &json!({}), 0), Offer::NotNumeric);
        assert_eq!((no_hb.keys(), no_hb.evicted()), (2, 1));
    }

    #[test]
    fn window_full_of_keys_closes_an_ended_window_first_then_emits_the_least_recent_early() {
        let mut s = window(
            r#"every = "10s"
max_keys = 2"#,
        );
        s.offer("a", 1_000, &json!({}), 1);
        s.offer("b", 2_000, &json!({}), 2);
        s.offer("a", 3_000, &json!({}), 3);
        // Still in the first window: b is the least recently offered.
        let e = closed(s.offer("c", 4_000, &json!({}), 4));
        assert_eq!((e.key.as_str(), e.ctx, e.window_end_ms), ("b", 2, 10_000));
        assert_eq!(e.payload["count"], json!(1));
        assert_eq!((s.keys(), s.evicted()), (2, 1));
        // At 12s, a's and c's windows have ended: both close, on time.
        let Offer::Absorbed { closed } = s.offer("d", 12_000, &json!({}), 5) else {
            panic!("absorbed")
        };
        let got: Vec<_> = closed
            .iter()
            .map(|e| (e.key.as_str(), e.payload["count"].clone()))
            .collect();
        assert_eq!(got, [("a", json!(2)), ("c", json!(1))]);
        assert_eq!((s.keys(), s.evicted()), (1, 1));
        let rest: Vec<_> = s
            .due(20_000)
            .into_iter()
            .map(|e| (e.key, e.window_end_ms))
            .collect();
        assert_eq!(rest, [("d".to_owned(), 20_000)]);
    }

    #[test]
    fn a_full_shaper_evicts_in_batches_so_new_keys_stay_cheap() {
        let mut s = throttle(
            r#"every = "1h"
max_keys = 800"#,
        );
        for i in 0..800 {
            assert_eq!(s.offer(&format!("k{i}"), 1_000, &json!({}), 0), Offer::Pass);
        }
        // Full, nothing stale: the 100 least recently offered keys go at once.
        s.offer("k0", 1_000, &json!({}), 0);
        s.offer("new", 1_000, &json!({}), 0);
        assert_eq!((s.keys(), s.evicted()), (701, 100));
        assert_eq!(
            s.offer("k0", 2_000, &json!({}), 0),
            Offer::Drop(DropReason::Throttled),
            "recently seen: kept"
        );
        assert_eq!(
            s.offer("k1", 2_000, &json!({}), 0),
            Offer::Pass,
            "evicted: a new key again"
        );
        // The next 99 new keys need no sweep.
        for i in 0..98 {
            s.offer(&format!("n{i}"), 3_000, &json!({}), 0);
        }
        assert_eq!((s.keys(), s.evicted()), (800, 100));
    }

    #[test]
    fn an_invalid_spec_never_panics() {
        let mut w = window(r#"every = "0s""#);
        assert_eq!(w.offer("k", 12_345, &json!({}), 0), ABSORBED);
        assert_eq!(w.next_deadline(), Some(12_346));
        let mut d = Shaper::<u32>::new(ShapeSpec::Deadband(DeadbandSpec {
            key: None,
            field: String::new(),
            delta: Some(f64::NAN),
            percent: None,
            heartbeat: None,
            max_keys: Some(0),
        }));
        assert_eq!(d.offer("k", 0, &json!(1), 0), Offer::NotNumeric);
        assert_eq!(d.offer("k", 0, &json!({ "": 1 }), 0), PASS);
        assert_eq!(d.offer("k", 1, &json!({ "": 100 }), 0), BAND);
        assert_eq!(d.offer("j", 1, &json!({ "": 100 }), 0), PASS);
        assert_eq!((d.keys(), d.evicted()), (1, 1));
    }

    fn errors(spec: ShapeSpec) -> Vec<(&'static str, String)> {
        spec.validate()
    }

    fn parse(toml: &str) -> ShapeSpec {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn valid_specs_have_no_errors() {
        for t in [
            "throttle = { every = \"10s\" }",
            "dedupe = { key = \"payload.id\", within = \"5m\", max_keys = 1 }",
            "deadband = { field = \"reading.temp\", percent = 0, heartbeat = \"1h\" }",
            "window = { every = \"1m\" }",
            "window = { every = \"1m\", aggregates = [\"count\"] }",
            "window = { every = \"1m\", fields = [\"a\", \"b.c\"], aggregates = [\"last\"] }",
        ] {
            assert_eq!(errors(parse(t)), [], "{t}");
        }
    }

    #[test]
    fn validation_names_the_setting_and_gives_a_hint() {
        let keys = |t: &str| -> Vec<&'static str> {
            errors(parse(t)).into_iter().map(|(k, _)| k).collect()
        };
        assert_eq!(keys("throttle = { every = \"0s\" }"), ["every"]);
        assert_eq!(keys("throttle = { every = \"500us\" }"), ["every"]);
        assert_eq!(
            keys("dedupe = { within = \"0s\", max_keys = 0, key = \" \" }"),
            ["key", "max_keys", "within"]
        );
        assert_eq!(keys("deadband = { field = \"v\" }"), ["delta"]);
        assert_eq!(
            keys("deadband = { field = \"v\", delta = 1, percent = 2 }"),
            ["percent"]
        );
        assert_eq!(keys("deadband = { field = \"v\", delta = -1 }"), ["delta"]);
        assert_eq!(
            keys("deadband = { field = \"v\", percent = nan }"),
            ["percent"]
        );
        assert_eq!(keys("deadband = { field = \"v\", delta = inf }"), ["delta"]);
        assert_eq!(
            keys("deadband = { field = \"\", delta = 1, heartbeat = \"0s\" }"),
            ["field", "heartbeat"]
        );
        assert_eq!(
            keys("deadband = { field = \"a..b\", delta = 1 }"),
            ["field"]
        );
        assert_eq!(
            keys("window = { every = \"1m\", aggregates = [] }"),
            ["aggregates"]
        );
        assert_eq!(
            keys("window = { every = \"1m\", aggregates = [\"avg\", \"max\"] }"),
            ["fields"]
        );
        assert_eq!(
            keys("window = { every = \"1m\", fields = [\"v\"] }"),
            ["aggregates"]
        );
        assert_eq!(
            keys(
                "window = { every = \"1m\", fields = [\"v\", \"count\", \"v\", \".x\"], \
                 aggregates = [\"sum\", \"sum\"] }"
            ),
            ["fields", "fields", "fields", "aggregates"]
        );

        let msg = |t: &str| errors(parse(t)).remove(0).1;
        assert_eq!(
            msg("throttle = { every = \"0s\" }"),
            "must be at least 1ms, e.g. every = \"10s\""
        );
        assert_eq!(
            msg("deadband = { field = \"v\" }"),
            "deadband needs a threshold: set delta (absolute change, e.g. delta = 0.5) or \
             percent (change relative to the last sent value, e.g. percent = 2)"
        );
        assert_eq!(
            msg("deadband = { field = \"v\", delta = -1 }"),
            "must be a finite number >= 0 (got -1), e.g. delta = 0.5"
        );
        assert_eq!(
            msg("deadband = { field = \"\", delta = 1 }"),
            "\"\" is not a field path; write a dotted path into the payload, \
             e.g. \"value\" or \"reading.temp\""
        );
        assert_eq!(
            msg("window = { every = \"1m\", aggregates = [\"avg\", \"max\"] }"),
            "avg, max need fields to aggregate; add e.g. fields = [\"value\"]"
        );
        assert_eq!(
            msg("throttle = { every = \"1s\", max_keys = 0 }"),
            "must be at least 1 (omit it for 10000)"
        );
    }

    #[test]
    fn specs_parse_from_toml() {
        let t: ThrottleSpec =
            toml::from_str("key = \"topic\"\nevery = \"10s\"\nmax_keys = 50").unwrap();
        assert_eq!(
            t,
            ThrottleSpec {
                key: Some("topic".into()),
                every: HumanDuration(std::time::Duration::from_secs(10)),
                max_keys: Some(50),
            }
        );
        let d: DedupeSpec = toml::from_str("within = \"5m\"").unwrap();
        assert_eq!((d.key, d.within.0.as_secs(), d.max_keys), (None, 300, None));
        let b: DeadbandSpec =
            toml::from_str("field = \"reading.temp\"\npercent = 2.5\nheartbeat = \"1h\"").unwrap();
        assert_eq!(
            (
                b.field.as_str(),
                b.delta,
                b.percent,
                b.heartbeat.map(|h| h.0.as_secs())
            ),
            ("reading.temp", None, Some(2.5), Some(3600))
        );
        let w: WindowSpec = toml::from_str(
            r#"every = "1m"
fields = ["v"]
aggregates = ["count", "min", "max", "avg", "sum", "first", "last"]"#,
        )
        .unwrap();
        use Aggregate::*;
        assert_eq!(w.aggregates, [Count, Min, Max, Avg, Sum, First, Last]);
        let w: WindowSpec = toml::from_str("every = \"1m\"").unwrap();
        assert_eq!((w.fields.len(), w.aggregates), (0, vec![Count]));

        let s = parse("[deadband]\nkey = \"payload.id\"\nfield = \"v\"\ndelta = 1");
        assert_eq!((s.kind(), s.key_expr()), ("deadband", Some("payload.id")));
        let s = parse("window = { every = \"1s\" }");
        assert_eq!((s.kind(), s.key_expr()), ("window", None));
        assert_eq!(Shaper::<()>::new(s.clone()).spec(), &s);
    }

    #[test]
    fn specs_reject_unknown_settings_and_bad_values() {
        let unknown = toml::from_str::<ThrottleSpec>("every = \"10s\"\nburst = 3").unwrap_err();
        assert!(unknown.to_string().contains("burst"), "{unknown}");
        assert!(toml::from_str::<DedupeSpec>("within = \"5m\"\nwithin_ms = 1").is_err());
        assert!(
            toml::from_str::<DeadbandSpec>("field = \"v\"\ndelta = 1\nhysteresis = 2").is_err()
        );
        assert!(toml::from_str::<WindowSpec>("every = \"1m\"\nsize = \"1m\"").is_err());
        let agg =
            toml::from_str::<WindowSpec>("every = \"1m\"\naggregates = [\"median\"]").unwrap_err();
        assert!(agg.to_string().contains("median"), "{agg}");
        assert!(toml::from_str::<WindowSpec>("every = \"1m\"\naggregates = [\"AVG\"]").is_err());
        let dur = toml::from_str::<ThrottleSpec>("every = \"soon\"").unwrap_err();
        assert!(dur.to_string().contains("invalid duration"), "{dur}");
        assert!(toml::from_str::<ShapeSpec>("sample = { every = \"1s\" }").is_err());
    }

    #[test]
    fn drop_reasons_have_counter_labels() {
        let labels = [
            DropReason::Throttled,
            DropReason::Duplicate,
            DropReason::InsideDeadband,
        ]
        .map(DropReason::as_str);
        assert_eq!(labels, ["throttled", "duplicate", "deadband"]);
    }
}
