//! The rule set: loaded from a directory of TOML files, compiled once, and
//! applied to every event by the router.
//!
//! Order and semantics (documented in the README): files are read in file-name
//! order and rules in the order they appear; every rule whose pattern matches
//! the event applies (fan-out), in that order, until one says `stop = true` or
//! `drop = true`. A `drop` rule ends evaluation; destinations of earlier rules
//! still apply. An event no rule matches follows the `unmatched` policy.

mod spec;
mod template;
pub mod topic;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::config::UpstreamConfig;
use crate::diagnostic::{Diagnostic, Diagnostics};
use crate::event::Event;
use crate::queue::{Overflow, Priority};
pub use spec::{DestinationSpec, RuleSpec};
use template::Template;
use topic::{Pattern, PatternIndex};

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub pattern: Pattern,
    destinations: Vec<Destination>,
    drop: bool,
    stop: bool,
}

#[derive(Debug, Clone)]
struct Destination {
    upstream: Arc<str>,
    /// `None`: keep the event's topic.
    topic: Option<Template>,
    qos: u8,
    priority: Priority,
    ttl: Option<std::time::Duration>,
    overflow: Overflow,
    id_field: Option<Arc<str>>,
}

/// Where one event goes, as decided by the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub upstream: Arc<str>,
    pub topic: String,
    pub qos: u8,
    pub priority: Priority,
    pub ttl: Option<std::time::Duration>,
    pub overflow: Overflow,
    /// Field of a JSON object payload that receives the event id.
    pub id_field: Option<Arc<str>>,
}

/// The rules' verdict on one event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdict {
    pub routes: Vec<Route>,
    /// How many rules matched.
    pub matched: usize,
    /// The rule that dropped the event, if one did.
    pub dropped_by: Option<String>,
}

/// All rules, in evaluation order, with an index over their patterns.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    index: PatternIndex,
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

    /// Load every `*.toml` in `dir` (in file-name order), checking upstream
    /// names against `upstreams`. Returns every problem in every file.
    pub fn load_dir(
        dir: &Path,
        upstreams: &BTreeMap<String, UpstreamConfig>,
    ) -> Result<RuleSet, Diagnostics> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            Diagnostics(vec![Diagnostic::whole_file(
                dir,
                format!("cannot read rules directory: {e}"),
            )])
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
            .collect();
        files.sort();
        let mut errors = Vec::new();
        let mut set = RuleSet::default();
        let mut seen: HashMap<String, String> = HashMap::new();
        for file in &files {
            let text = match std::fs::read_to_string(file) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(Diagnostic::whole_file(
                        file,
                        format!("cannot read rule file: {e}"),
                    ));
                    continue;
                }
            };
            for (rule, at) in parse_file(file, &text, upstreams, &mut errors) {
                if let Some(prev) = seen.insert(rule.name.clone(), at.clone()) {
                    errors.push(Diagnostic::at(
                        file,
                        &text,
                        None,
                        format!(
                            "rule name {:?} is used twice (first at {prev}); names must be unique",
                            rule.name
                        ),
                    ));
                    continue;
                }
                set.push(rule);
            }
        }
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
        upstreams: &BTreeMap<String, UpstreamConfig>,
    ) -> Result<RuleSet, Diagnostics> {
        let mut errors = Vec::new();
        let mut set = RuleSet::default();
        for (rule, _) in parse_file(name, text, upstreams, &mut errors) {
            set.push(rule);
        }
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(Diagnostics(errors))
        }
    }

    fn push(&mut self, rule: Rule) {
        self.index.insert(&rule.pattern, self.rules.len());
        self.rules.push(rule);
    }

    /// Apply the rules to one event.
    pub fn route(&self, event: &Event) -> Verdict {
        let mut verdict = Verdict::default();
        for id in self.index.matches(&event.topic) {
            let rule = &self.rules[id];
            // The index only returns patterns that match, so captures exist.
            let Some(captures) = rule.pattern.captures(&event.topic) else {
                continue;
            };
            verdict.matched += 1;
            if rule.drop {
                verdict.dropped_by = Some(rule.name.clone());
                break;
            }
            for d in &rule.destinations {
                verdict.routes.push(Route {
                    upstream: d.upstream.clone(),
                    topic: match &d.topic {
                        Some(t) => t.render(&captures),
                        None => event.topic.clone(),
                    },
                    qos: d.qos,
                    priority: d.priority,
                    ttl: d.ttl,
                    overflow: d.overflow,
                    id_field: d.id_field.clone(),
                });
            }
            if rule.stop {
                break;
            }
        }
        verdict
    }
}

/// Parse one rule file, pushing every problem into `errors`. Returns the
/// rules that compiled, each with its `file:line` for duplicate-name messages.
fn parse_file(
    file: &Path,
    text: &str,
    upstreams: &BTreeMap<String, UpstreamConfig>,
    errors: &mut Vec<Diagnostic>,
) -> Vec<(Rule, String)> {
    let (root, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        errors.extend(syntax.iter().map(|e| Diagnostic::from_toml(file, text, e)));
        return Vec::new();
    }
    let mut out = Vec::new();
    for (key, value) in root.get_ref().iter() {
        match key.get_ref().as_ref() {
            "rule" => {}
            other => {
                errors.push(Diagnostic::at(
                    file,
                    text,
                    Some(key.span()),
                    format!("unknown key {other:?} in rule file; expected [[rule]] tables"),
                ));
                continue;
            }
        }
        let DeValue::Array(items) = value.get_ref() else {
            errors.push(Diagnostic::at(
                file,
                text,
                Some(value.span()),
                "`rule` must be written as [[rule]] tables",
            ));
            continue;
        };
        for item in items.iter() {
            let d = Diagnostic::at(file, text, Some(item.span()), "");
            let at = format!("{}:{}", file.display(), d.line);
            if let Some(rule) = compile_rule(file, text, item, upstreams, errors) {
                out.push((rule, at));
            }
        }
    }
    out
}

fn compile_rule(
    file: &Path,
    text: &str,
    item: &Spanned<DeValue<'_>>,
    upstreams: &BTreeMap<String, UpstreamConfig>,
    errors: &mut Vec<Diagnostic>,
) -> Option<Rule> {
    let spec = match RuleSpec::deserialize(ValueDeserializer::from(item.clone())) {
        Ok(s) => s,
        Err(e) => {
            let mut d = Diagnostic::from_toml(file, text, &e);
            if d.line == 0 {
                d = Diagnostic::at(
                    file,
                    text,
                    Some(item.span()),
                    e.message().trim().to_string(),
                );
            }
            errors.push(d);
            return None;
        }
    };
    let before = errors.len();
    // Span of a key inside this rule (or the rule itself), to point at the value.
    let span_of = |path: &[&str]| -> std::ops::Range<usize> {
        let mut cur = item;
        for key in path {
            match cur.get_ref().get(*key) {
                Some(v) => cur = v,
                None => break,
            }
        }
        cur.span()
    };
    let mut err = |span: std::ops::Range<usize>, msg: String| {
        errors.push(Diagnostic::at(
            file,
            text,
            Some(span),
            format!("rule {:?}: {msg}", spec.name),
        ));
    };
    if spec.name.trim().is_empty() {
        err(span_of(&["name"]), "name must not be empty".into());
    }
    let pattern = match Pattern::parse(&spec.pattern) {
        Ok(p) => Some(p),
        Err(e) => {
            err(span_of(&["match"]), e.to_string());
            None
        }
    };
    if spec.drop && !spec.to.is_empty() {
        err(
            span_of(&["drop"]),
            "a rule either drops (drop = true) or routes (to = [...]), not both".into(),
        );
    }
    if !spec.drop && spec.to.is_empty() {
        err(
            span_of(&[]),
            "a rule needs destinations (to = [...]) or drop = true".into(),
        );
    }
    let mut destinations = Vec::new();
    for (i, d) in spec.to.iter().enumerate() {
        let span = |key: &str| {
            item.get_ref()
                .get("to")
                .and_then(|to| to.get_ref().get(i))
                .map(|t| t.get_ref().get(key).map(|v| v.span()).unwrap_or(t.span()))
                .unwrap_or(item.span())
        };
        if !upstreams.contains_key(&d.upstream) {
            let known: Vec<&str> = upstreams.keys().map(|k| k.as_str()).collect();
            err(
                span("upstream"),
                format!(
                    "upstream {:?} is not configured (configured: {}); add [upstream.{}] to the config or fix the name",
                    d.upstream,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    },
                    d.upstream
                ),
            );
        }
        if d.qos > 1 {
            err(
                span("qos"),
                format!("qos {} is not supported upstream; use 0 or 1", d.qos),
            );
        }
        let topic = match (&d.topic, &pattern) {
            (Some(t), Some(p)) => match Template::parse(t, p.capture_names()) {
                Ok(t) => Some(t),
                Err(e) => {
                    err(span("topic"), e);
                    None
                }
            },
            _ => None,
        };
        if d.id_field.as_deref().is_some_and(str::is_empty) {
            err(span("id_field"), "id_field must not be empty".into());
        }
        const TEN_YEARS: std::time::Duration = std::time::Duration::from_secs(10 * 365 * 86_400);
        if d.ttl.is_some_and(|t| t.0.is_zero() || t.0 > TEN_YEARS) {
            err(
                span("ttl"),
                "ttl must be between 1ms and 10 years (leave it out to never expire)".into(),
            );
        }
        destinations.push(Destination {
            upstream: Arc::from(d.upstream.as_str()),
            topic,
            qos: d.qos,
            priority: d.priority,
            ttl: d.ttl.map(|t| t.0),
            overflow: d.overflow,
            id_field: d.id_field.as_deref().map(Arc::from),
        });
    }
    if errors.len() > before {
        return None;
    }
    Some(Rule {
        name: spec.name,
        pattern: pattern?,
        destinations,
        drop: spec.drop,
        stop: spec.stop,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;

    fn upstreams() -> BTreeMap<String, UpstreamConfig> {
        let cfg: crate::config::ConfigFile =
            toml::from_str("[upstream.cloud]\nurl = \"mqtt://h\"\n").unwrap();
        cfg.upstream
    }

    fn load(text: &str) -> Result<RuleSet, Diagnostics> {
        RuleSet::from_str(Path::new("r.toml"), text, &upstreams())
    }

    #[test]
    fn fans_out_in_order_until_stop() {
        let set = load(
            r##"
[[rule]]
name = "a"
match = "sensors/{site}/{device}/temperature"
to = [{ upstream = "cloud", topic = "plant/{site}/{device}/temp" }]

[[rule]]
name = "b"
match = "sensors/#"
to = [{ upstream = "cloud", qos = 0 }]
stop = true

[[rule]]
name = "c"
match = "sensors/+/+/temperature"
to = [{ upstream = "cloud", topic = "never" }]
"##,
        )
        .unwrap();
        let v = set.route(&Event::for_test("sensors/s1/t1/temperature", b"{}"));
        assert_eq!(v.matched, 2);
        let topics: Vec<&str> = v.routes.iter().map(|r| r.topic.as_str()).collect();
        assert_eq!(topics, ["plant/s1/t1/temp", "sensors/s1/t1/temperature"]);
        assert_eq!(v.routes[1].qos, 0);
        assert_eq!(
            set.route(&Event::for_test("other", b"")),
            Verdict::default()
        );
    }

    #[test]
    fn drop_rule_ends_evaluation() {
        let set = load(
            r##"
[[rule]]
name = "quiet"
match = "debug/#"
drop = true

[[rule]]
name = "all"
match = "#"
to = [{ upstream = "cloud" }]
"##,
        )
        .unwrap();
        let v = set.route(&Event::for_test("debug/x", b""));
        assert_eq!(v.dropped_by.as_deref(), Some("quiet"));
        assert!(v.routes.is_empty());
        assert_eq!(set.route(&Event::for_test("a", b"")).routes.len(), 1);
    }

    #[test]
    fn every_error_in_a_file_is_reported_with_its_line() {
        let text = r##"[[rule]]
name = "bad-pattern"
match = "a/#/b"
to = [{ upstream = "cloud" }]

[[rule]]
name = "bad-upstream"
match = "a/{x}"
to = [{ upstream = "nowhere", topic = "b/{y}" }]

[[rule]]
name = "typo"
mtch = "a"
"##;
        let Diagnostics(errs) = load(text).unwrap_err();
        let lines: Vec<usize> = errs.iter().map(|d| d.line).collect();
        assert_eq!(lines, [3, 9, 9, 13], "{errs:#?}");
        assert!(
            errs[1].message.contains("\"nowhere\" is not configured"),
            "{}",
            errs[1]
        );
        assert!(errs[2].message.contains("{y}"), "{}", errs[2]);
        assert!(errs[3].message.contains("mtch"), "{}", errs[3]);
    }

    #[test]
    fn syntax_errors_are_located() {
        let Diagnostics(errs) = load("[[rule]]\nname = \"x\nmatch = 1\n").unwrap_err();
        assert_eq!(errs[0].line, 2, "{errs:#?}");
    }
}
