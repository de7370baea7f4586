//! What a rule's shaping table says (`throttle`, `dedupe`, `deadband`,
//! `window`), and the checks `edgeferry check` runs on it.

use serde::Deserialize;

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
    pub(super) fn is_numeric(self) -> bool {
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

    pub(super) fn max_keys_setting(&self) -> Option<usize> {
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
