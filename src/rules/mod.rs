//! The rule set: loaded from a directory of TOML files, compiled once, and
//! applied to every event by the router.
//!
//! Order and semantics (documented in docs/rules.md): files are read in file-name
//! order and rules in the order they appear; every rule whose pattern matches
//! and whose `when` holds applies (fan-out), in that order, until one says
//! `stop = true` or `drop = true`. Within a rule: match, `when`, shaping
//! (throttle, dedupe, deadband or window), transforms (`set`, `drop_fields`,
//! `rename`), then each destination. An event no rule matches follows the
//! `unmatched` policy. A malformed payload, or a rule that errors on an
//! event, is counted and, if configured, published on the dead-letter topic.
//!
//! A `RuleSet` is immutable and shared; what changes per event (the state of
//! throttles, dedupes, deadbands and windows) lives in a [`State`] owned by
//! the router, carried over to a reloaded set for every rule whose text did
//! not change.

mod compile;
pub mod envelope;
pub mod expr;
mod pattern;
pub mod sample;
pub mod schema;
mod schema_bounds;
pub mod shaping;
mod spec;
mod template;
pub mod testing;
mod transform;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use crate::codec::Payload;
use crate::diagnostic::{Diagnostic, Diagnostics};
use crate::event::{Event, Origin};
use crate::queue::{Overflow, Priority, Properties};
use crate::topic::{Pattern, PatternIndex};
use expr::{Env, EventVars, Expr, RuleVars};
use shaping::{DropReason, Offer, ShapeSpec, Shaper};
pub use spec::{DestinationSpec, Encoding, RuleSpec};
use template::Template;
pub use testing::TestSpec;
use transform::Transform;

/// A republished event goes through the rules again (minus the rule that
/// republished it); past this many hops its local destinations are dropped
/// and counted, which bounds a loop between rules.
pub const MAX_HOPS: u8 = 4;

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: Arc<str>,
    pub pattern: Pattern,
    /// The `meta.source` values it serves: `"local"`, upstream names.
    sources: Vec<Arc<str>>,
    /// The schema it names, and where (for an unknown name).
    schema: Option<(Arc<str>, Diagnostic)>,
    /// That contract in the set's `contracts`, once resolved.
    schema_index: Option<usize>,
    /// As written, to tell changed rules from unchanged ones on reload.
    spec: RuleSpec,
    when: Option<Expr>,
    transform: Transform,
    shape: Option<Shape>,
    destinations: Vec<Destination>,
    /// The upstreams it sends binary CloudEvents to, and where each is
    /// written: only an MQTT 5 upstream can carry them, which the config
    /// checks (the rules know upstreams by name only).
    binary_envelopes: Vec<(Arc<str>, Diagnostic)>,
    drop: bool,
    stop: bool,
}

/// A rule's shaping operator and the expression of its key (default: topic).
#[derive(Debug, Clone)]
struct Shape {
    spec: ShapeSpec,
    key: Option<Expr>,
}

#[derive(Debug, Clone)]
pub struct Destination {
    target: Target,
    /// `None`: keep the event's topic.
    topic: Option<Template>,
    encode: Option<Encoding>,
    id_field: Option<Arc<str>>,
    envelope: Option<envelope::Envelope>,
}

#[derive(Debug, Clone)]
enum Target {
    Upstream(UpstreamTarget),
    /// QoS and retain of the publish towards local subscribers.
    Local {
        qos: u8,
        retain: bool,
    },
}

#[derive(Debug, Clone)]
struct UpstreamTarget {
    upstream: Arc<str>,
    qos: u8,
    priority: Priority,
    ttl: Option<std::time::Duration>,
    overflow: Overflow,
}

/// One event bound for an upstream's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub upstream: Arc<str>,
    pub topic: String,
    pub qos: u8,
    pub priority: Priority,
    pub ttl: Option<std::time::Duration>,
    pub overflow: Overflow,
    pub payload: Bytes,
    /// The id it is queued under (the event's, or a window's own).
    pub event_id: String,
    /// When it was received (a window: when it closed), ms since the epoch.
    pub received_ms: u64,
    /// MQTT 5 properties to send it with (a CloudEvent's).
    pub properties: Option<Arc<Properties>>,
}

/// One event to publish into the embedded broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Republish {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// The source of the event it was made from (a republished command is
    /// still a command).
    pub source: Option<Arc<str>>,
    /// Stamped on it so the rules can tell it came from here.
    pub origin: Origin,
}

/// The rules' verdict on one event (or on the windows closed by a tick).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdict {
    pub routes: Vec<Route>,
    pub republish: Vec<Republish>,
    /// How many rules matched (pattern and `when`).
    pub matched: usize,
    /// The rule that dropped the event, if one did.
    pub dropped_by: Option<Arc<str>>,
    /// Events a throttle, dedupe or deadband held back, by reason.
    pub shaped: Vec<DropReason>,
    /// Events folded into a window.
    pub absorbed: usize,
    /// Windows that closed and were sent on.
    pub windows: usize,
    /// Rules that failed on this event: (rule, why).
    pub errors: Vec<(Arc<str>, String)>,
    /// The contract the event broke (an enforced schema, or a rule's).
    pub schema_failure: Option<schema::Failure>,
    /// Local destinations skipped because the event looped too many times.
    pub loop_dropped: usize,
    /// Why the event should go to the dead-letter topic, if it should.
    pub dead_letter: Option<String>,
    /// Routed by the `unmatched` policy.
    pub unmatched_routed: bool,
    /// What each rule whose pattern matched did with the event, in
    /// evaluation order; only from [`RuleSet::route_traced`] (for `tail`),
    /// so routing without a watcher records nothing.
    pub trace: Option<Vec<(Arc<str>, Step)>>,
}

/// What one rule whose pattern matched did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The event is this rule's own republish: not offered to it again.
    OwnRepublish,
    /// Its `when` was false.
    WhenFalse,
    /// It failed on the event (`when`, a shaping key, a transform; the
    /// reason is in [`Verdict::errors`]).
    Failed,
    /// `drop = true`: evaluation ended here.
    Dropped,
    /// Its throttle, dedupe or deadband held the event back.
    Held(DropReason),
    /// Folded into its window.
    Absorbed,
    /// It sent the event to `outputs` destinations; `stop`: no rule after
    /// it was tried.
    Applied { outputs: usize, stop: bool },
}

/// All rules, in evaluation order, with an index over their patterns.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    index: PatternIndex,
    env: Arc<Env>,
    gateway: Arc<str>,
    unmatched: Option<Destination>,
    /// The same for downlink events (`rules.unmatched_downlink`).
    unmatched_downlink: Option<Destination>,
    dead_letter: Option<Arc<str>>,
    /// `[[test]]` cases found next to the rules, with their file and line.
    tests: Vec<(TestSpec, PathBuf, usize)>,
    /// The configured upstreams (a test's `from` may name one).
    upstreams: BTreeSet<String>,
    /// SHA-256 chained over each file's name and text, in load order.
    digest: [u8; 32],
    /// Every `[[schema]]` of every file, until `resolve_schemas` groups
    /// them into `contracts` (by name, versions together).
    schemas: Vec<schema::Schema>,
    /// Names of schemas that did not compile, until `resolve_schemas`.
    broken_schemas: Vec<String>,
    contracts: Vec<schema::Contract>,
}

/// What the config says about the rules beyond the rule files.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Gateway id (for `meta.gateway`).
    pub gateway: String,
    /// Destination of events no rule matched; `None` drops them.
    pub unmatched: Option<DestinationSpec>,
    /// Destination of downlink events no rule matched; `None` drops them.
    pub unmatched_downlink: Option<DestinationSpec>,
    /// Local topic for dead letters; `None`: counted only.
    pub dead_letter: Option<String>,
}

/// Which rules differ between two sets, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl Changes {
    /// One list for a log line: the count and at most `max` names, so a
    /// reload of 40,000 rules is not a 400 KB line.
    pub fn summary(names: &[String], max: usize) -> String {
        let shown: Vec<&str> = names.iter().take(max).map(String::as_str).collect();
        match names.len() {
            0 => "none".into(),
            n if n <= max => format!("{n}: {}", shown.join(", ")),
            n => format!("{n}: {}, and {} more", shown.join(", "), n - max),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl RuleSet {
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Which rule files these are: the first 16 hex digits of a SHA-256
    /// over each file's name and contents, in load order. Two gateways
    /// with the same digest run the same rules.
    pub fn digest(&self) -> String {
        self.digest[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Local topic for dead letters, if configured.
    pub fn dead_letter_topic(&self) -> Option<&str> {
        self.dead_letter.as_deref()
    }

    /// The `[[test]]` cases of the loaded files.
    pub fn tests(&self) -> &[(TestSpec, PathBuf, usize)] {
        &self.tests
    }

    /// Load every `*.toml` in `dir` (in file-name order), checking upstream
    /// names against `upstreams`. Returns every problem in every file.
    pub fn load_dir(dir: &Path, upstreams: &BTreeSet<String>) -> Result<RuleSet, Diagnostics> {
        let files = toml_files(dir).map_err(|e| {
            Diagnostics(vec![Diagnostic::unreadable(
                dir,
                format!("cannot read rules directory: {e}"),
            )])
        })?;
        Self::load_files(&files, upstreams)
    }

    /// Load the given rule files, in the order given.
    pub fn load_files(
        files: &[PathBuf],
        upstreams: &BTreeSet<String>,
    ) -> Result<RuleSet, Diagnostics> {
        let mut errors = Vec::new();
        let mut set = RuleSet::default();
        let mut seen: HashMap<Arc<str>, String> = HashMap::new();
        for file in files {
            let text = match std::fs::read_to_string(file) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(Diagnostic::unreadable(
                        file,
                        format!("cannot read rule file: {e}"),
                    ));
                    continue;
                }
            };
            set.add_file(file, &text, upstreams, &mut seen, &mut errors);
        }
        set.resolve_schemas(&mut errors);
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(Diagnostics(errors))
        }
    }

    /// Parse and compile rules from one file's text (used by tests and `load_dir`).
    pub fn from_str(
        name: &Path,
        text: &str,
        upstreams: &BTreeSet<String>,
    ) -> Result<RuleSet, Diagnostics> {
        let mut errors = Vec::new();
        let mut set = RuleSet::default();
        set.add_file(name, text, upstreams, &mut HashMap::new(), &mut errors);
        set.resolve_schemas(&mut errors);
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(Diagnostics(errors))
        }
    }

    fn add_file(
        &mut self,
        file: &Path,
        text: &str,
        upstreams: &BTreeSet<String>,
        seen: &mut HashMap<Arc<str>, String>,
        errors: &mut Vec<Diagnostic>,
    ) {
        self.upstreams.clone_from(upstreams);
        self.digest = sha256([
            &self.digest[..],
            file.file_name().unwrap_or_default().as_encoded_bytes(),
            &[0],
            text.as_bytes(),
        ]);
        let contents = compile::parse_file(file, text, upstreams, errors);
        let mut duplicates = Vec::new();
        for (name, at) in contents.names {
            let first = seen
                .entry(Arc::from(name.as_str()))
                .or_insert_with(|| at.clone());
            if *first != at {
                let prev = first.clone();
                let line = at
                    .rsplit(':')
                    .next()
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0);
                errors.push(Diagnostic {
                    unreadable: false,
                    file: file.to_path_buf(),
                    line,
                    column: 1,
                    message: format!(
                        "rule name {name:?} is used twice (first at {prev}); names must be unique"
                    ),
                });
                duplicates.push(name);
            }
        }
        for rule in contents.rules {
            if duplicates.iter().any(|d| **d == *rule.name) {
                continue;
            }
            self.index.insert(&rule.pattern, self.rules.len());
            self.rules.push(rule);
        }
        self.schemas.extend(contents.schemas);
        self.broken_schemas.extend(contents.broken_schemas);
        self.tests.extend(
            contents
                .tests
                .into_iter()
                .map(|(t, line)| (t, file.to_path_buf(), line)),
        );
    }

    /// Group the schemas into contracts and point each rule's `schema`
    /// name at its contract; unknown names and clashing tables are errors.
    fn resolve_schemas(&mut self, errors: &mut Vec<Diagnostic>) {
        // The schema files are part of what the set runs.
        for s in &self.schemas {
            self.digest = sha256([&self.digest[..], &s.digest]);
        }
        self.contracts = schema::Contract::group(std::mem::take(&mut self.schemas), errors);
        let names: Vec<&str> = self.contracts.iter().map(|c| &*c.name).collect();
        for rule in &mut self.rules {
            let Some((name, at)) = &rule.schema else {
                continue;
            };
            match names.iter().position(|n| **n == **name) {
                Some(i) => rule.schema_index = Some(i),
                // Its own error says why; the set does not load either way.
                None if self.broken_schemas.iter().any(|b| **b == **name) => {}
                None => {
                    let mut d = at.clone();
                    d.message = format!(
                        "rule {:?}: schema {name:?} is not declared (declared: {}); add a [[schema]] table or fix the name",
                        rule.name,
                        if names.is_empty() {
                            "none".to_string()
                        } else {
                            names.join(", ")
                        },
                    );
                    errors.push(d);
                }
            }
        }
    }

    /// Apply the config's settings: gateway id, unmatched policies, dead
    /// letters. A problem with a policy's destination comes back as
    /// (`"unmatched.<key>"` or `"unmatched_downlink.<key>"`, message).
    pub fn configure(
        &mut self,
        settings: &Settings,
        upstreams: &BTreeSet<String>,
    ) -> Result<(), Vec<(String, String)>> {
        self.gateway = Arc::from(settings.gateway.as_str());
        self.dead_letter = settings.dead_letter.as_deref().map(Arc::from);
        let mut problems = Vec::new();
        let mut policy = |setting: &str, d: &Option<DestinationSpec>| {
            let d = d.as_ref()?;
            compile::compile_destination(d, None, upstreams, false)
                .map_err(|p| {
                    problems.extend(p.into_iter().map(|(k, m)| (format!("{setting}.{k}"), m)))
                })
                .ok()
        };
        self.unmatched = policy("unmatched", &settings.unmatched);
        self.unmatched_downlink = policy("unmatched_downlink", &settings.unmatched_downlink);
        match problems.is_empty() {
            true => Ok(()),
            false => Err(problems),
        }
    }

    /// Which rules were added, removed or changed from `old` to `self`.
    pub fn changes_from(&self, old: &RuleSet) -> Changes {
        let before: HashMap<&str, &RuleSpec> =
            old.rules.iter().map(|r| (&*r.name, &r.spec)).collect();
        let after: HashMap<&str, &RuleSpec> =
            self.rules.iter().map(|r| (&*r.name, &r.spec)).collect();
        let mut c = Changes::default();
        for r in &self.rules {
            match before.get(&*r.name) {
                None => c.added.push(r.name.to_string()),
                Some(spec) if **spec != r.spec => c.changed.push(r.name.to_string()),
                Some(_) => {}
            }
        }
        for r in &old.rules {
            if !after.contains_key(&*r.name) {
                c.removed.push(r.name.to_string());
            }
        }
        c
    }

    /// Fresh shaping state for this set.
    pub fn new_state(&self) -> State {
        State {
            shapers: self
                .rules
                .iter()
                .map(|r| r.shape.as_ref().map(|s| Shaper::new(s.spec.clone())))
                .collect(),
        }
    }

    /// Shaping state for this set, keeping `old`'s state (of set `old_set`)
    /// for every rule whose text did not change. The open windows of rules
    /// that changed or went away are closed and sent as they are (by the old
    /// rule), in the returned verdict, so a reload loses nothing.
    pub fn carry_state(&self, old_set: &RuleSet, mut old: State) -> (State, Verdict) {
        let mut by_name: HashMap<&str, usize> = HashMap::new();
        for (i, r) in old_set.rules.iter().enumerate() {
            by_name.insert(&r.name, i);
        }
        let mut state = self.new_state();
        for (i, rule) in self.rules.iter().enumerate() {
            if let Some(&j) = by_name.get(&*rule.name)
                && old_set.rules[j].spec == rule.spec
                && let Some(shaper) = old.shapers.get_mut(j).and_then(Option::take)
            {
                state.shapers[i] = Some(shaper);
            }
        }
        let flushed = old_set.tick(u64::MAX, &mut old);
        (state, flushed)
    }

    /// The declared contract of that name.
    pub fn contract(&self, name: &str) -> Option<&schema::Contract> {
        self.contracts.iter().find(|c| &*c.name == name)
    }

    /// Every destination that sends binary CloudEvents: its rule, upstream,
    /// and where it is written.
    pub fn binary_envelopes(&self) -> impl Iterator<Item = (&str, &str, &Diagnostic)> {
        self.rules.iter().flat_map(|r| {
            r.binary_envelopes
                .iter()
                .map(|(u, at)| (&*r.name, &**u, at))
        })
    }

    /// Every declared contract, in declaration order.
    pub fn contracts(&self) -> &[schema::Contract] {
        &self.contracts
    }

    /// Apply the rules to one event.
    pub fn route(&self, event: &Event, state: &mut State) -> Verdict {
        self.route_into(event, state, Verdict::default())
    }

    /// `route`, also recording what each rule whose pattern matched did
    /// ([`Verdict::trace`]).
    pub fn route_traced(&self, event: &Event, state: &mut State) -> Verdict {
        let verdict = Verdict {
            trace: Some(Vec::new()),
            ..Verdict::default()
        };
        self.route_into(event, state, verdict)
    }

    fn route_into(&self, event: &Event, state: &mut State, mut verdict: Verdict) -> Verdict {
        if let Payload::Malformed(why) = &event.payload {
            verdict.dead_letter = Some(why.clone());
            return verdict;
        }
        // A broken contract on an enforced topic stops the event here. The
        // first one it keeps describes it (a CloudEvent's type and schema).
        let mut kept = None;
        for c in &self.contracts {
            if !c.enforced_on(&event.topic) {
                continue;
            }
            match c.check(&event.topic, event.payload.value()) {
                Ok(_) => kept = kept.or(Some(c)),
                Err(f) => {
                    verdict.dead_letter = Some(schema_reason(&f));
                    verdict.schema_failure = Some(f);
                    return verdict;
                }
            }
        }
        let candidates = self.index.matches(&event.topic);
        let unmatched = match event.source {
            None => self.unmatched.as_ref(),
            Some(_) => self.unmatched_downlink.as_ref(),
        };
        if candidates.is_empty() && unmatched.is_none() {
            return verdict;
        }
        let source = event.source_name();
        let id = event.id.to_string();
        // Built on first use, then shared by every rule this event reaches.
        let mut vars: Option<EventVars<'_>> = None;
        for i in candidates {
            let rule = &self.rules[i];
            // A rule serves local events or named downlinks, never both by
            // accident: a downlink event reaches only the rules that name
            // its upstream in `from`.
            if !rule.serves(source) {
                continue;
            }
            if event.origin.as_ref().is_some_and(|o| *o.rule == *rule.name) {
                verdict.step(&rule.name, Step::OwnRepublish);
                continue;
            }
            // The index only returns patterns that match, so captures exist.
            let Some(captures) = rule.pattern.captures(&event.topic) else {
                continue;
            };
            // Only rules with expressions pay for the event's CEL view.
            let rv = rule.needs_vars().then(|| RuleVars {
                event: vars.get_or_insert_with(|| EventVars::new(event, &id, &self.gateway)),
                captures: &captures,
            });
            let contract = rule.schema_index.and_then(|i| self.contracts.get(i));
            if let Some(c) = contract
                && let Err(f) = c.check(&event.topic, event.payload.value())
            {
                // The rule does not apply; the event is dead-lettered.
                verdict.step(&rule.name, Step::Failed);
                verdict.schema_failure.get_or_insert(f);
                continue;
            }
            if let (Some(when), Some(rv)) = (&rule.when, &rv) {
                match when.eval_bool(&self.env, rv) {
                    Ok(true) => {}
                    Ok(false) => {
                        verdict.step(&rule.name, Step::WhenFalse);
                        continue;
                    }
                    Err(e) => {
                        verdict.fail(&rule.name, format!("when {:?}: {e}", when.source()));
                        verdict.step(&rule.name, Step::Failed);
                        continue;
                    }
                }
            }
            verdict.matched += 1;
            if rule.drop {
                verdict.dropped_by = Some(rule.name.clone());
                verdict.step(&rule.name, Step::Dropped);
                break;
            }
            let mut pass = true;
            if let (Some(shape), Some(Some(shaper))) = (&rule.shape, state.shapers.get_mut(i)) {
                let offered = Offered {
                    event,
                    captures: &captures,
                    vars: rv.as_ref(),
                };
                let absorbed = verdict.absorbed;
                match self.shape(rule, shape, shaper, offered, &mut verdict) {
                    Shaped::Pass => {}
                    Shaped::Held => {
                        pass = false;
                        let step = match verdict.shaped.last() {
                            _ if verdict.absorbed > absorbed => Step::Absorbed,
                            Some(reason) => Step::Held(*reason),
                            None => Step::Absorbed,
                        };
                        verdict.step(&rule.name, step);
                    }
                    Shaped::Failed => {
                        // Like a failing `when`: the rule does not apply.
                        verdict.matched -= 1;
                        verdict.step(&rule.name, Step::Failed);
                        continue;
                    }
                }
            }
            if pass {
                let (before, errors) = (verdict.outputs(), verdict.errors.len());
                let contract = contract.or(kept);
                let out = Out {
                    event,
                    id: &id,
                    captures: &captures,
                    contract,
                };
                self.outputs(rule, &out, rv.as_ref(), &mut verdict);
                let step = match verdict.errors.len() > errors {
                    true => Step::Failed,
                    false => Step::Applied {
                        outputs: verdict.outputs() - before,
                        stop: rule.stop,
                    },
                };
                verdict.step(&rule.name, step);
            }
            if rule.stop {
                break;
            }
        }
        // edgeferry's own republishes are not "unmatched" sensor data: they
        // would otherwise go to the unmatched destination (or loop on it).
        if verdict.matched == 0
            && event.origin.is_none()
            && verdict.schema_failure.is_none()
            && let Some(d) = unmatched
        {
            let name: Arc<str> = Arc::from("unmatched");
            let before = verdict.routes.len() + verdict.republish.len();
            let out = Out {
                event,
                id: &id,
                captures: &[],
                contract: kept,
            };
            self.destination(&name, d, &out, None, &mut verdict);
            verdict.unmatched_routed = verdict.routes.len() + verdict.republish.len() > before;
        }
        if verdict.dead_letter.is_none()
            && let Some((rule, why)) = verdict.errors.first()
        {
            verdict.dead_letter = Some(format!("rule {rule:?}: {why}"));
        }
        // A rule whose schema the event broke did not apply; if another
        // rule routed it, it is not a dead letter (a replay of the dead
        // letters would send it twice). It is counted either way.
        if verdict.dead_letter.is_none()
            && verdict.outputs() == 0
            && let Some(f) = &verdict.schema_failure
        {
            verdict.dead_letter = Some(schema_reason(f));
        }
        verdict
    }

    /// Offer the event to a rule's shaper (throttle, dedupe, deadband,
    /// window): what it lets through, holds or drops, or why it cannot.
    fn shape(
        &self,
        rule: &Rule,
        shape: &Shape,
        shaper: &mut Shaper<WindowCtx>,
        offered: Offered<'_, '_>,
        verdict: &mut Verdict,
    ) -> Shaped {
        let Offered {
            event,
            captures,
            vars,
        } = offered;
        let key = match (&shape.key, vars) {
            (Some(k), Some(rv)) => k.eval_key(&self.env, rv),
            _ => Ok(event.topic.clone()),
        };
        let key = match key {
            Ok(k) => k,
            Err(e) => {
                verdict.fail(&rule.name, format!("{} key: {e}", shape.spec.kind()));
                return Shaped::Failed;
            }
        };
        // Only a window keeps its last event's topic and captures.
        let ctx = match shape.spec {
            ShapeSpec::Window(_) => WindowCtx {
                topic: event.topic.clone(),
                captures: captures
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect(),
            },
            _ => WindowCtx::default(),
        };
        let payload = event.payload.value().unwrap_or(&Value::Null);
        match shaper.offer(&key, event.received_ms, payload, ctx) {
            Offer::Pass => Shaped::Pass,
            Offer::Drop(reason) => {
                verdict.shaped.push(reason);
                Shaped::Held
            }
            Offer::NotNumeric => {
                verdict.fail(
                    &rule.name,
                    "deadband field is missing or not a number".to_string(),
                );
                Shaped::Failed
            }
            Offer::Absorbed { closed } => {
                verdict.absorbed += 1;
                for emit in closed {
                    self.emit_window(rule, emit, verdict);
                }
                Shaped::Held
            }
        }
    }

    /// Send on the windows that closed by `now_ms`.
    pub fn tick(&self, now_ms: u64, state: &mut State) -> Verdict {
        let mut verdict = Verdict::default();
        for (i, shaper) in state.shapers.iter_mut().enumerate() {
            let Some(shaper) = shaper else { continue };
            for emit in shaper.due(now_ms) {
                self.emit_window(&self.rules[i], emit, &mut verdict);
            }
        }
        verdict
    }

    /// When `tick` next has something to do, if ever.
    pub fn next_deadline(&self, state: &State) -> Option<u64> {
        state
            .shapers
            .iter()
            .flatten()
            .filter_map(|s| s.next_deadline())
            .min()
    }

    /// A closed window becomes an event of its own (a new id, the aggregate
    /// as a JSON payload, the topic and captures of the window's last
    /// event) and goes through the rule's transforms and destinations.
    fn emit_window(&self, rule: &Rule, emit: shaping::Emit<WindowCtx>, verdict: &mut Verdict) {
        verdict.windows += 1;
        let raw = Bytes::from(serde_json::to_vec(&emit.payload).unwrap_or_default());
        let mut event = Event::from_publish(emit.ctx.topic, raw);
        event.received_ms = emit.window_end_ms;
        event.payload = Payload::Json(emit.payload);
        // A window of a rule that serves one downlink is that downlink's.
        if let [only] = &rule.sources[..]
            && **only != *crate::event::LOCAL_SOURCE
        {
            event.source = Some(only.clone());
        }
        let id = event.id.to_string();
        let captures: Vec<(&str, &str)> = emit
            .ctx
            .captures
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let ev = EventVars::new(&event, &id, &self.gateway);
        let rv = RuleVars {
            event: &ev,
            captures: &captures,
        };
        let out = Out {
            event: &event,
            id: &id,
            captures: &captures,
            contract: None,
        };
        self.outputs(rule, &out, Some(&rv), verdict);
    }

    /// Transform once, then write each destination.
    fn outputs(
        &self,
        rule: &Rule,
        out: &Out<'_, '_>,
        vars: Option<&RuleVars<'_, '_>>,
        verdict: &mut Verdict,
    ) {
        let transformed = if rule.transform.is_empty() {
            None
        } else {
            match rule
                .transform
                .apply(&self.env, vars, out.event.payload.value())
            {
                Ok(v) => Some(v),
                Err(e) => {
                    verdict.fail(&rule.name, e.0);
                    return;
                }
            }
        };
        for d in &rule.destinations {
            self.destination(&rule.name, d, out, transformed.as_ref(), verdict);
        }
    }

    fn destination(
        &self,
        rule: &Arc<str>,
        d: &Destination,
        out: &Out<'_, '_>,
        transformed: Option<&Value>,
        verdict: &mut Verdict,
    ) {
        let Out {
            event,
            id,
            captures,
            ..
        } = *out;
        let value = transformed.or(event.payload.value());
        let topic = match &d.topic {
            Some(t) => match t.render(captures, value) {
                Ok(t) => t,
                Err(e) => {
                    verdict.fail(rule, e);
                    return;
                }
            },
            None => event.topic.clone(),
        };
        let payload = match &d.envelope {
            None => payload_for(d, event, id, transformed).map(|p| (p, None)),
            Some(env) => self.enveloped(env, rule, d, out, transformed),
        };
        let (payload, properties) = match payload {
            Ok(p) => p,
            Err(e) => {
                verdict.fail(rule, e);
                return;
            }
        };
        match &d.target {
            Target::Upstream(u) => verdict.routes.push(Route {
                upstream: u.upstream.clone(),
                topic,
                qos: u.qos,
                priority: u.priority,
                ttl: u.ttl,
                overflow: u.overflow,
                payload,
                properties,
                event_id: id.to_string(),
                received_ms: event.received_ms,
            }),
            Target::Local { qos, retain } => {
                let hops = event.origin.as_ref().map_or(0, |o| o.hops) + 1;
                if hops > MAX_HOPS {
                    verdict.loop_dropped += 1;
                    return;
                }
                verdict.republish.push(Republish {
                    topic,
                    payload,
                    qos: *qos,
                    retain: *retain,
                    source: event.source.clone(),
                    origin: Origin {
                        rule: rule.to_string(),
                        hops,
                    },
                });
            }
        }
    }
}

impl RuleSet {
    /// A destination's payload as a CloudEvent: the same data it would
    /// send bare, with attributes from the event and the contract it keeps,
    /// and the MQTT 5 properties it goes with.
    fn enveloped(
        &self,
        env: &envelope::Envelope,
        rule: &Arc<str>,
        d: &Destination,
        out: &Out<'_, '_>,
        transformed: Option<&Value>,
    ) -> Result<(Bytes, Option<Arc<Properties>>), String> {
        let event = out.event;
        let value = transformed.or(event.payload.value());
        let with_id = value.map(|v| with_id_field(d, out.id, v));
        let data = match (&with_id, d.encode) {
            (None, _) | (_, Some(Encoding::Raw)) => envelope::Data::Bytes(&event.raw),
            (Some(v), _) => envelope::Data::Value(v),
        };
        // The version the data claims: an upcast's output claims the
        // current one, so its type and schema say so.
        let schema = out.contract.and_then(|c| match &data {
            envelope::Data::Value(v) => c.version_of(&event.topic, Some(v)).ok(),
            envelope::Data::Bytes(_) => None,
        });
        let event_type = match (&env.event_type, schema) {
            (Some(t), _) => t.render(out.captures, value)?,
            (None, Some(s)) => match &s.version {
                Some(v) => format!("{}.v{v}", s.name),
                None => s.name.to_string(),
            },
            (None, None) => rule.to_string(),
        };
        let source = match &env.source {
            Some(t) => t.render_with(out.captures, value, |s, v| {
                s.push_str(&crate::percent::encode(v, envelope::SEGMENT))
            })?,
            None => envelope::default_source(&self.gateway, &event.topic),
        };
        let attributes = envelope::Attributes {
            id: out.id,
            source,
            event_type,
            received_ms: event.received_ms,
            dataschema: schema.and_then(|s| s.id.as_deref()),
        };
        match env.mode {
            envelope::EnvelopeMode::Cloudevents => {
                let bytes = envelope::structured(&attributes, data)?;
                let props = Properties {
                    content_type: Some(envelope::STRUCTURED_CONTENT_TYPE.into()),
                    user: Vec::new(),
                };
                Ok((bytes, Some(Arc::new(props))))
            }
            envelope::EnvelopeMode::CloudeventsBinary => {
                let bytes = payload_for(d, event, out.id, transformed)?;
                let content_type = match (&data, d.encode) {
                    (envelope::Data::Bytes(_), _) => "application/octet-stream",
                    (_, Some(Encoding::Cbor)) => "application/cbor",
                    (_, Some(_)) => "application/json",
                    (_, None) => match transform::natural_encoding(&event.payload) {
                        Encoding::Cbor => "application/cbor",
                        _ => "application/json",
                    },
                };
                let props = envelope::binary(&attributes, content_type);
                Ok((bytes, Some(Arc::new(props))))
            }
        }
    }
}

/// One event on its way to a rule's destinations.
#[derive(Clone, Copy)]
struct Out<'e, 'c> {
    event: &'e Event,
    id: &'e str,
    captures: &'c [(&'c str, &'c str)],
    /// The contract it keeps (the rule's, else an enforced one).
    contract: Option<&'e schema::Contract>,
}

/// A broken contract, as the dead-letter reason and the log say it.
fn schema_reason(f: &schema::Failure) -> String {
    format!("schema {:?}: at {:?}: {}", f.schema, f.path, f.message)
}

/// The bytes a destination sends: the original ones where nothing changes
/// them (fast, and exactly what the sensor sent), else the (transformed)
/// value in the destination's encoding, with the event id added if asked.
fn payload_for(
    d: &Destination,
    event: &Event,
    id: &str,
    transformed: Option<&Value>,
) -> Result<Bytes, String> {
    let input = match event.payload {
        Payload::Json(_) => Some(Encoding::Json),
        Payload::Cbor(_) => Some(Encoding::Cbor),
        _ => None,
    };
    if d.encode == Some(Encoding::Raw) {
        return Ok(event.raw.clone());
    }
    let Some(value) = transformed.or(event.payload.value()) else {
        // A raw payload with nothing to change goes as it came.
        return match d.encode {
            None => Ok(event.raw.clone()),
            Some(e) => Err(format!(
                "cannot encode a {} payload as {e:?}",
                event.payload.format()
            )),
        };
    };
    let with_id = d.id_field.is_some() && value.is_object();
    if transformed.is_none() && !with_id && (d.encode.is_none() || d.encode == input) {
        return Ok(event.raw.clone());
    }
    let encoding = d
        .encode
        .unwrap_or_else(|| transform::natural_encoding(&event.payload));
    transform::encode(&with_id_field(d, id, value), encoding)
}

/// `value` with the event id under the destination's `id_field`, if it has
/// one and `value` is an object; else `value` itself.
fn with_id_field<'v>(d: &Destination, id: &str, value: &'v Value) -> std::borrow::Cow<'v, Value> {
    match (&d.id_field, value) {
        (Some(field), Value::Object(map)) => {
            let mut map = map.clone();
            map.insert(field.to_string(), Value::String(id.to_string()));
            std::borrow::Cow::Owned(Value::Object(map))
        }
        _ => std::borrow::Cow::Borrowed(value),
    }
}

/// The `*.toml` files in `dir`, in file-name order (the rule order).
pub fn toml_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    files_with(dir, &["toml"])
}

/// SHA-256 of `parts`, one after another (the set's digest and what
/// goes into it).
pub(crate) fn sha256<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> [u8; 32] {
    let mut d = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        d.update(p);
    }
    let mut out = [0; 32];
    out.copy_from_slice(d.finish().as_ref());
    out
}

/// The regular files in `dir` with one of these extensions, in name order.
pub fn files_with(dir: &Path, extensions: &[&str]) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|x| extensions.iter().any(|e| x == *e))
                && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

impl Rule {
    /// Whether the rule serves events from `source` (`meta.source`).
    fn serves(&self, source: &str) -> bool {
        self.sources.iter().any(|s| **s == *source)
    }

    /// Whether any expression of this rule reads the event.
    fn needs_vars(&self) -> bool {
        self.when.is_some()
            || self.shape.as_ref().is_some_and(|s| s.key.is_some())
            || !self.transform.set.is_empty()
    }
}

impl Verdict {
    /// The broken contract the dead letter is for: not when the event was
    /// routed anyway, and not when a rule error is the dead letter's reason
    /// (rule errors come first).
    pub fn broken_contract(&self) -> Option<&schema::Failure> {
        self.schema_failure
            .as_ref()
            .filter(|_| self.dead_letter.is_some() && self.errors.is_empty())
    }

    fn fail(&mut self, rule: &Arc<str>, why: String) {
        self.errors.push((rule.clone(), why));
    }

    /// Record what `rule` did, when tracing.
    fn step(&mut self, rule: &Arc<str>, step: Step) {
        if let Some(trace) = &mut self.trace {
            trace.push((rule.clone(), step));
        }
    }

    /// Destinations so far: routes upstream and local republishes.
    fn outputs(&self) -> usize {
        self.routes.len() + self.republish.len()
    }
}

/// What a window keeps of its last event, to address the event it emits.
#[derive(Debug, Clone, Default)]
pub struct WindowCtx {
    topic: String,
    captures: Vec<(String, String)>,
}

/// The router's per-rule shaping state, aligned with a [`RuleSet`]'s rules.
#[derive(Debug, Default)]
pub struct State {
    shapers: Vec<Option<Shaper<WindowCtx>>>,
}

/// An event as a rule's shaper sees it.
struct Offered<'a, 'e> {
    event: &'a Event,
    captures: &'a [(&'a str, &'a str)],
    vars: Option<&'a RuleVars<'a, 'e>>,
}

/// What a shaper made of an event.
enum Shaped {
    /// Sent on to the rule's destinations.
    Pass,
    /// Dropped (throttled, duplicate, inside the deadband) or absorbed
    /// into a window.
    Held,
    /// It could not be offered (its key failed, a deadband field is not a
    /// number): the rule does not apply.
    Failed,
}

impl State {
    /// Keys held across all shapers (memory is bounded by each `max_keys`).
    pub fn keys(&self) -> usize {
        self.shapers.iter().flatten().map(|s| s.keys()).sum()
    }
}

#[cfg(test)]
mod tests;
