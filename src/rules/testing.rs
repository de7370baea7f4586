//! `[[test]]` cases inside rule files, and the runner behind `edgeferry test`.
//!
//! A test feeds events to the compiled rule set with a simulated clock and
//! compares what comes out (upstream routes and local republishes, in
//! order) with what it expects:
//!
//! ```toml
//! [[test]]
//! name = "hot reading goes to the cloud"
//! input = { topic = "sensors/a/t1/temperature", payload = { value = 31.5 } }
//! expect = [{ upstream = "cloud", topic = "plant/a/t1/temp", payload = { value = 31.5 } }]
//! ```
//!
//! Sequences use `steps`, each at a time offset from the start (`at`); a step
//! without a topic only advances the clock, which closes due windows.
//! `expect = []` means the event goes nowhere. Expected payloads match as a
//! subset: every field given must be equal, other fields may exist. A rule
//! that fails on an input fails the test unless the test (or step) says
//! `errors = true`.

use std::fmt::Write as _;
use std::path::PathBuf;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use super::spec::Encoding;
use super::{RuleSet, Verdict};
use crate::codec::{self, Payload};
use crate::event::{Event, LOCAL_SOURCE};
use crate::units::HumanDuration;

/// Test time starts at a UTC midnight, so windows of any period that divides
/// a day start at `at = "0s"`.
pub const T0_MS: u64 = 1_700_006_400_000;

/// One `[[test]]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestSpec {
    pub name: Option<String>,
    /// A single event (with `expect`), or use `steps`.
    pub input: Option<InputSpec>,
    pub expect: Option<Vec<ExpectSpec>>,
    /// The input is expected to make a rule fail (bad data on purpose).
    #[serde(default)]
    pub errors: bool,
    #[serde(default)]
    pub steps: Vec<StepSpec>,
}

/// An event to feed in.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub topic: String,
    /// Structured payload, sent as JSON (or CBOR with `cbor = true`).
    pub payload: Option<Value>,
    #[serde(default)]
    pub cbor: bool,
    /// A payload sent as these exact bytes (text).
    pub raw: Option<String>,
    /// Who published it (`meta.client_id`, `meta.username`).
    pub client_id: Option<String>,
    pub username: Option<String>,
    /// Where it comes from: `"local"` (default) or an upstream's name, for
    /// a command arriving on that upstream's downlink (`meta.source`).
    pub from: Option<String>,
}

/// One step of a sequence.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Time since the test started (default: the previous step's).
    pub at: Option<HumanDuration>,
    pub topic: Option<String>,
    pub payload: Option<Value>,
    #[serde(default)]
    pub cbor: bool,
    pub raw: Option<String>,
    /// Who published it (`meta.client_id`, `meta.username`).
    pub client_id: Option<String>,
    pub username: Option<String>,
    /// `"local"` (default) or the upstream a downlink event came from.
    pub from: Option<String>,
    #[serde(default)]
    pub expect: Vec<ExpectSpec>,
    /// This step's input is expected to make a rule fail; otherwise a rule
    /// error fails the test even when the outputs match.
    #[serde(default)]
    pub errors: bool,
}

/// One expected output.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectSpec {
    pub upstream: Option<String>,
    pub local: Option<String>,
    pub topic: Option<String>,
    /// Fields the payload must have (a subset match).
    pub payload: Option<Value>,
    pub qos: Option<u8>,
    /// `"schema"`: the event breaks a contract and is dead-lettered;
    /// `"schema_version"`: its version is not declared.
    pub dead_letter: Option<String>,
    /// A dead letter's JSON pointer to the first failing field.
    pub path: Option<String>,
    /// The output keeps this contract's current version (an upcast did
    /// its job).
    pub schema: Option<String>,
    /// A local output's retain flag.
    pub retain: Option<bool>,
    pub priority: Option<crate::queue::Priority>,
    /// The output's encoding: "json", "cbor" or "raw" (neither).
    pub encode: Option<Encoding>,
}

/// One output as the test sees it.
#[derive(Debug, Clone)]
struct Output {
    upstream: Option<String>,
    local: Option<String>,
    topic: String,
    qos: Option<u8>,
    /// `Some("schema")` for a dead letter of a broken contract.
    dead_letter: Option<String>,
    /// Where in the payload the contract broke (dead letters).
    path: Option<String>,
    retain: bool,
    priority: Option<crate::queue::Priority>,
    payload: Payload,
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(reason) = &self.dead_letter {
            return write!(f, "dead letter {reason:?} ({})", self.topic);
        }
        match (&self.upstream, &self.local) {
            (Some(u), _) => write!(
                f,
                "upstream {u:?} topic {:?} qos {} priority {}",
                self.topic,
                self.qos.unwrap_or(1),
                format!("{:?}", self.priority.unwrap_or_default()).to_lowercase()
            )?,
            (None, _) => {
                write!(f, "local {:?}", self.topic)?;
                if let Some(q) = self.qos.filter(|q| *q > 0) {
                    write!(f, " qos {q}")?;
                }
                if self.retain {
                    write!(f, " retained")?;
                }
            }
        }
        match &self.payload {
            Payload::Json(v) => write!(f, " json {v}"),
            Payload::Cbor(v) => write!(f, " cbor {v}"),
            _ => write!(f, " raw"),
        }
    }
}

/// The result of one test case.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// `file:line name`.
    pub label: String,
    /// Empty when it passed; otherwise a readable explanation.
    pub failure: Option<String>,
}

/// Run every test case in `set`.
pub fn run_all(set: &RuleSet) -> Vec<Outcome> {
    set.tests()
        .iter()
        .map(|(spec, file, line)| {
            let label = format!(
                "{}:{line}: {}",
                file.display(),
                spec.name.as_deref().unwrap_or("(unnamed test)")
            );
            Outcome {
                label,
                failure: run_one(set, spec).err(),
            }
        })
        .collect()
}

fn run_one(set: &RuleSet, spec: &TestSpec) -> Result<(), String> {
    let steps: Vec<StepSpec> = match (&spec.input, &spec.expect, spec.steps.is_empty()) {
        (Some(i), Some(e), true) => vec![StepSpec {
            at: None,
            topic: Some(i.topic.clone()),
            payload: i.payload.clone(),
            cbor: i.cbor,
            raw: i.raw.clone(),
            client_id: i.client_id.clone(),
            username: i.username.clone(),
            from: i.from.clone(),
            expect: e.clone(),
            errors: spec.errors,
        }],
        (None, None, false) => spec.steps.clone(),
        (Some(_), None, _) => return Err("`input` needs `expect` (use [] for \"dropped\")".into()),
        _ => {
            return Err(
                "a test has either `input` and `expect`, or `steps = [...]`, not both".into(),
            );
        }
    };
    let mut state = set.new_state();
    let mut now = T0_MS;
    for (n, step) in steps.iter().enumerate() {
        let at = step.at.map_or(now, |a| T0_MS + a.0.as_millis() as u64);
        if at < now {
            return Err(format!("step {}: `at` goes back in time", n + 1));
        }
        now = at;
        let tick = set.tick(now, &mut state);
        let mut outputs = collect(&tick);
        let mut notes = explain(&tick);
        let mut what = format!("at {}s", (now - T0_MS) as f64 / 1e3);
        if let Some(topic) = &step.topic {
            let raw = payload_bytes(step)?;
            let mut event = Event::from_publish(topic.clone(), raw);
            event.received_ms = now;
            if let Some(id) = &step.client_id {
                event.client_id = id.as_str().into();
            }
            event.username = step.username.as_deref().map(Into::into);
            event.source = match step.from.as_deref() {
                None | Some(LOCAL_SOURCE) => None,
                Some(name) if set.upstreams.contains(name) => Some(name.into()),
                Some(name) => {
                    let msg =
                        format!("  from {name:?} is neither \"local\" nor a configured upstream");
                    return Err(in_step(steps.len(), n, topic, msg));
                }
            };
            let verdict = set.route(&event, &mut state);
            outputs.extend(collect(&verdict));
            let _ = write!(what, ", {topic}");
            notes = explain(&verdict);
            match (verdict.errors.is_empty(), step.errors) {
                (false, false) => {
                    let msg = format!(
                        "  a rule failed on this input (add `errors = true` if that is the point)\n  note: {}",
                        notes.join("\n  note: ")
                    );
                    return Err(in_step(steps.len(), n, &what, msg));
                }
                (true, true) => {
                    let msg = "  `errors = true`, but no rule failed on this input".to_string();
                    return Err(in_step(steps.len(), n, &what, msg));
                }
                _ => {}
            }
        }
        compare(set, &step.expect, &outputs).map_err(|mut diff| {
            // What the rules said about the event, which usually is the why.
            for note in notes.drain(..) {
                let _ = write!(diff, "\n  note: {note}");
            }
            in_step(steps.len(), n, &what, diff)
        })?;
    }
    Ok(())
}

/// A failure message, prefixed with its step when the test has several.
fn in_step(steps: usize, n: usize, what: &str, msg: String) -> String {
    if steps == 1 {
        msg
    } else {
        format!("step {} ({what}):\n{msg}", n + 1)
    }
}

/// Rule errors, drops and shaping of one verdict, for a failure message.
fn explain(v: &Verdict) -> Vec<String> {
    let mut out: Vec<String> = v
        .errors
        .iter()
        .map(|(rule, why)| format!("rule {rule:?} failed: {why}"))
        .collect();
    if let Some(rule) = &v.dropped_by {
        out.push(format!("dropped by rule {rule:?}"));
    }
    for reason in &v.shaped {
        out.push(format!("held back by shaping ({})", reason.as_str()));
    }
    if v.absorbed > 0 {
        out.push("absorbed into a window".into());
    }
    if v.errors.is_empty()
        && let Some(why) = &v.dead_letter
    {
        out.push(format!("dead-lettered: {why}"));
    }
    out
}

fn payload_bytes(step: &StepSpec) -> Result<Bytes, String> {
    match (&step.payload, &step.raw) {
        (Some(_), Some(_)) => Err("give `payload` or `raw`, not both".into()),
        (Some(v), None) if step.cbor => {
            let mut out = Vec::new();
            ciborium::into_writer(v, &mut out).map_err(|e| e.to_string())?;
            Ok(Bytes::from(out))
        }
        (Some(v), None) => Ok(Bytes::from(v.to_string())),
        (None, Some(r)) => Ok(Bytes::from(r.clone())),
        (None, None) => Ok(Bytes::new()),
    }
}

fn collect(v: &Verdict) -> Vec<Output> {
    let mut out: Vec<Output> = v
        .routes
        .iter()
        .map(|r| Output {
            upstream: Some(r.upstream.to_string()),
            local: None,
            topic: r.topic.clone(),
            qos: Some(r.qos),
            dead_letter: None,
            path: None,
            retain: false,
            priority: Some(r.priority),
            payload: codec::decode(&r.payload),
        })
        .collect();
    out.extend(v.broken_contract().map(|f| Output {
        upstream: None,
        local: None,
        topic: format!("schema {:?} at {:?}: {}", f.schema, f.path, f.message),
        qos: None,
        dead_letter: Some(f.reason().into()),
        path: Some(f.path.clone()),
        retain: false,
        priority: None,
        payload: Payload::Raw,
    }));
    out.extend(v.republish.iter().map(|r| Output {
        upstream: None,
        local: Some(r.topic.clone()),
        topic: r.topic.clone(),
        qos: Some(r.qos),
        dead_letter: None,
        path: None,
        retain: r.retain,
        priority: None,
        payload: codec::decode(&r.payload),
    }));
    out
}

/// Outputs must match expectations one to one. Routes to upstreams come
/// before local republishes, each in rule and destination order.
fn compare(set: &RuleSet, expect: &[ExpectSpec], got: &[Output]) -> Result<(), String> {
    let mut problems = Vec::new();
    for (i, e) in expect.iter().enumerate() {
        match got.get(i) {
            None => problems.push(format!("  missing output {}: {}", i + 1, describe(e))),
            Some(o) => {
                if let Some(why) = mismatch(set, e, o) {
                    problems.push(format!(
                        "  output {}: {why}\n    expected: {}\n    got:      {o}",
                        i + 1,
                        describe(e)
                    ));
                }
            }
        }
    }
    for (i, o) in got.iter().enumerate().skip(expect.len()) {
        problems.push(format!("  unexpected output {}: {o}", i + 1));
    }
    if problems.is_empty() {
        return Ok(());
    }
    let mut msg = problems.join("\n");
    if got.is_empty() {
        msg.push_str("\n  (the event went nowhere: dropped, filtered, shaped or unmatched)");
    }
    Err(msg)
}

fn describe(e: &ExpectSpec) -> String {
    if let Some(d) = &e.dead_letter {
        return match &e.path {
            Some(p) => format!("dead letter {d:?} at {p:?}"),
            None => format!("dead letter {d:?}"),
        };
    }
    let mut s = match (&e.upstream, &e.local) {
        (Some(u), _) => format!("upstream {u:?}"),
        (None, Some(l)) => format!("local {l:?}"),
        (None, None) => "any destination".into(),
    };
    if let Some(t) = &e.topic {
        let _ = write!(s, " topic {t:?}");
    }
    if let Some(q) = e.qos {
        let _ = write!(s, " qos {q}");
    }
    if let Some(r) = e.retain {
        let _ = write!(s, "{}", if r { " retained" } else { " not retained" });
    }
    if let Some(p) = e.priority {
        let _ = write!(s, " priority {}", format!("{p:?}").to_lowercase());
    }
    if let Some(enc) = e.encode {
        let _ = write!(s, " {}", format!("{enc:?}").to_lowercase());
    }
    if let Some(p) = &e.payload {
        let _ = write!(s, " payload ⊇ {p}");
    }
    if let Some(name) = &e.schema {
        let _ = write!(s, " keeping schema {name:?}");
    }
    s
}

fn mismatch(set: &RuleSet, e: &ExpectSpec, o: &Output) -> Option<String> {
    if let Some(d) = e.dead_letter.as_deref()
        && !matches!(d, "schema" | "schema_version")
    {
        return Some(format!(
            "dead_letter = {d:?} is not a reason a test can expect (\"schema\" or \"schema_version\")"
        ));
    }
    if e.dead_letter != o.dead_letter {
        return Some("different destination".into());
    }
    if e.path.is_some() && e.path != o.path {
        return Some("different path".into());
    }
    if let Some(u) = &e.upstream
        && o.upstream.as_ref() != Some(u)
    {
        return Some("different destination".into());
    }
    if let Some(l) = &e.local
        && o.local.as_ref() != Some(l)
    {
        return Some("different destination".into());
    }
    if e.upstream.is_some() != o.upstream.is_some() && (e.upstream.is_some() || e.local.is_some()) {
        return Some("different destination".into());
    }
    if let Some(t) = &e.topic
        && *t != o.topic
    {
        return Some("different topic".into());
    }
    if e.qos.is_some() && e.qos != o.qos {
        return Some("different qos".into());
    }
    if e.retain.is_some_and(|r| r != o.retain) {
        return Some("different retain".into());
    }
    if e.priority.is_some() && e.priority != o.priority {
        return Some("different priority".into());
    }
    if let Some(enc) = e.encode {
        let actual = match o.payload {
            Payload::Json(_) => Encoding::Json,
            Payload::Cbor(_) => Encoding::Cbor,
            _ => Encoding::Raw,
        };
        if enc != actual {
            return Some("different encoding".into());
        }
    }
    if let Some(p) = &e.payload {
        match o.payload.value() {
            Some(v) if contains(v, p) => {}
            _ => return Some("different payload".into()),
        }
    }
    if let Some(name) = &e.schema {
        let Some(contract) = set.contract(name) else {
            return Some(format!("schema {name:?} is not declared"));
        };
        let current = contract.current();
        if let Err(f) = current.check(o.payload.value()) {
            let version = match &current.version {
                Some(v) => format!(" version {v}"),
                None => String::new(),
            };
            return Some(format!(
                "the payload breaks schema {name:?}{version} at {:?}: {}",
                f.path, f.message
            ));
        }
    }
    None
}

/// Whether `have` has everything `want` says (objects: a subset, numbers:
/// equal as numbers, anything else: equal).
pub fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| h.get(k).is_some_and(|hv| contains(hv, wv))),
        (Value::Array(h), Value::Array(w)) => {
            h.len() == w.len() && h.iter().zip(w).all(|(a, b)| contains(a, b))
        }
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (a, b) => a == b,
    }
}

/// Summary line and exit status input for a batch of outcomes.
pub fn summary(outcomes: &[Outcome]) -> (usize, usize) {
    let failed = outcomes.iter().filter(|o| o.failure.is_some()).count();
    (outcomes.len() - failed, failed)
}

/// Rule files under the given paths (files as given, directories' `*.toml`
/// in name order).
pub fn files_under(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let files = super::toml_files(p)
                .map_err(|e| format!("{}: cannot read directory: {e}", p.display()))?;
            out.extend(files);
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            return Err(format!("{}: no such file or directory", p.display()));
        }
    }
    Ok(out)
}
