//! Rule files to compiled rules: parse each file's TOML, deserialize each
//! `[[rule]]` into a [`RuleSpec`], then check and compile it. Every problem
//! becomes a [`Diagnostic`] at file:line:column naming the rule, and loading
//! goes on, so `edgeferry check` shows every error of every file at once.

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::envelope::{self, Envelope, EnvelopeMode};
use super::expr::{self, Expr};
use super::schema::{Schema, SchemaSpec};
use super::shaping::ShapeSpec;
use super::spec::{DestinationSpec, Encoding, RuleSpec};
use super::template::Template;
use super::transform::Transform;
use super::{Destination, Rule, Shape, Target, UpstreamTarget};
use crate::diagnostic::Diagnostic;
use crate::event::LOCAL_SOURCE;
use crate::rules::TestSpec;
use crate::topic::Pattern;

/// What one rule file holds once parsed: compiled rules (each with its
/// `file:line`) and the `[[test]]` cases, still as written.
#[derive(Default)]
pub struct FileContents {
    pub rules: Vec<Rule>,
    /// The name and `file:line` of every rule table that has one, compiled
    /// or not (duplicate names are reported even among broken rules).
    pub names: Vec<(String, String)>,
    pub tests: Vec<(TestSpec, usize)>,
    pub schemas: Vec<Schema>,
    /// Names of `[[schema]]` tables that did not compile (their own error
    /// is reported; a rule naming one is not "undeclared" too).
    pub broken_schemas: Vec<String>,
}

/// Parse one rule file, pushing every problem into `errors`.
pub fn parse_file(
    file: &Path,
    text: &str,
    upstreams: &BTreeSet<String>,
    errors: &mut Vec<Diagnostic>,
) -> FileContents {
    let mut out = FileContents::default();
    let (root, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        errors.extend(syntax.iter().map(|e| Diagnostic::from_toml(file, text, e)));
        return out;
    }
    let lines = crate::diagnostic::LineIndex::new(text);
    for (key, value) in root.get_ref().iter() {
        let kind = key.get_ref().as_ref();
        if kind != "rule" && kind != "test" && kind != "schema" {
            errors.push(Diagnostic::at(
                file,
                text,
                Some(key.span()),
                format!("unknown key {kind:?} in rule file; expected [[rule]], [[schema]] and [[test]] tables"),
            ));
            continue;
        }
        let DeValue::Array(items) = value.get_ref() else {
            errors.push(Diagnostic::at(
                file,
                text,
                Some(value.span()),
                format!("`{kind}` must be written as [[{kind}]] tables"),
            ));
            continue;
        };
        for item in items.iter() {
            let line = lines.line(item.span().start);
            if kind == "test" {
                match TestSpec::deserialize(ValueDeserializer::from(item.clone())) {
                    Ok(t) => out.tests.push((t, line)),
                    Err(e) => errors.push(located(file, text, item, &e)),
                }
                continue;
            }
            if kind == "schema" {
                match compile_schema(file, text, item, errors) {
                    Some(s) => out.schemas.push(s),
                    None => out.broken_schemas.extend(name_of(item).map(str::to_string)),
                }
                continue;
            }
            if let Some(name) = name_of(item) {
                out.names
                    .push((name.to_string(), format!("{}:{line}", file.display())));
            }
            if let Some(rule) = compile_rule(file, text, item, upstreams, errors) {
                out.rules.push(rule);
            }
        }
    }
    out
}

/// One `[[schema]]` table: its pattern and its file, compiled.
fn compile_schema(
    file: &Path,
    text: &str,
    item: &Spanned<DeValue<'_>>,
    errors: &mut Vec<Diagnostic>,
) -> Option<Schema> {
    let spec = match SchemaSpec::deserialize(ValueDeserializer::from(item.clone())) {
        Ok(s) => s,
        Err(e) => {
            errors.push(located(file, text, item, &e));
            return None;
        }
    };
    let at =
        |path: &[&str], msg: String| Diagnostic::at(file, text, Some(span_in(item, path)), msg);
    let pattern = match Pattern::parse(&spec.pattern) {
        Ok(p) => p,
        Err(e) => {
            errors.push(at(&["match"], format!("schema {:?}: {e}", spec.name)));
            return None;
        }
    };
    let dir = file.parent().unwrap_or(Path::new("."));
    match Schema::compile(&spec, pattern, dir, at(&["name"], String::new())) {
        Ok(s) => Some(s),
        Err(e) => {
            let mut d = at(&["file"], e.message);
            d.unreadable = e.unreadable;
            errors.push(d);
            None
        }
    }
}

/// The `name` of a rule table, read before (and whatever) serde says.
fn name_of<'a>(item: &'a Spanned<DeValue<'_>>) -> Option<&'a str> {
    match item.get_ref().get("name").map(|v| v.get_ref()) {
        Some(DeValue::String(s)) => Some(s.as_ref()),
        _ => None,
    }
}

/// A serde error inside `item`, located at its span or else at the item.
fn located(
    file: &Path,
    text: &str,
    item: &Spanned<DeValue<'_>>,
    e: &toml::de::Error,
) -> Diagnostic {
    let d = Diagnostic::from_toml(file, text, e);
    if d.line != 0 {
        return d;
    }
    Diagnostic::at(
        file,
        text,
        Some(item.span()),
        e.message().trim().to_string(),
    )
}

/// The span of the value at `path` inside `item` (or of the nearest parent).
fn span_in(item: &Spanned<DeValue<'_>>, path: &[&str]) -> Range<usize> {
    let mut cur = item;
    for key in path {
        let next = match cur.get_ref() {
            DeValue::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get(i)),
            v => v.get(*key),
        };
        match next {
            Some(v) => cur = v,
            None => break,
        }
    }
    cur.span()
}

/// Where inside a string value an expression's `offset` is: past the quote.
fn inside_string(text: &str, span: Range<usize>, offset: Option<usize>) -> Range<usize> {
    let quote = if text[span.start..].starts_with("\"\"\"") || text[span.start..].starts_with("'''")
    {
        3
    } else {
        1
    };
    match offset {
        Some(o) => {
            let at = (span.start + quote + o).min(span.end);
            at..at
        }
        None => span,
    }
}

fn compile_rule(
    file: &Path,
    text: &str,
    item: &Spanned<DeValue<'_>>,
    upstreams: &BTreeSet<String>,
    errors: &mut Vec<Diagnostic>,
) -> Option<Rule> {
    let spec = match RuleSpec::deserialize(ValueDeserializer::from(item.clone())) {
        Ok(s) => s,
        Err(e) => {
            let mut d = located(file, text, item, &e);
            if let Some(name) = name_of(item) {
                d.message = format!("rule {name:?}: {}", d.message);
            }
            errors.push(d);
            return None;
        }
    };
    let before = errors.len();
    let mut c = RuleCheck {
        file,
        text,
        item,
        name: &spec.name,
        errors,
    };
    if spec.name.trim().is_empty() {
        c.err(&["name"], "name must not be empty".into());
    }
    let pattern = c.pattern(&spec.pattern);
    let sources = c.sources(spec.from.as_deref(), upstreams);
    // Resolved once every file is read (a schema may be in another file).
    let schema = spec.schema.as_ref().map(|name| {
        let at = Diagnostic::at(file, text, Some(span_in(item, &["schema"])), String::new());
        (Arc::from(name.as_str()), at)
    });
    let when = spec.when.as_deref().and_then(|w| c.expr(&["when"], w));
    let transform = c.transform(&spec);
    let shape = c.shape(&spec);
    c.drop_or_destinations(&spec, !transform.is_empty(), shape.is_some());
    let windowed = matches!(
        shape,
        Some(Shape {
            spec: ShapeSpec::Window(_),
            ..
        })
    );
    let mut destinations = Vec::new();
    let mut binary_envelopes = Vec::new();
    for (i, d) in spec.to.iter().enumerate() {
        if let (Some(EnvelopeMode::CloudeventsBinary), Some(u)) = (d.envelope, &d.upstream) {
            let span = span_in(item, &["to", &i.to_string(), "envelope"]);
            let at = Diagnostic::at(file, text, Some(span), String::new());
            binary_envelopes.push((Arc::from(u.as_str()), at));
        }
        match compile_destination(d, pattern.as_ref(), upstreams, windowed) {
            Ok(dest) => destinations.push(dest),
            Err(problems) => {
                for (key, msg) in problems {
                    c.err(&["to", &i.to_string(), key], msg);
                }
            }
        }
    }
    if errors.len() > before {
        return None;
    }
    Some(Rule {
        name: Arc::from(spec.name.as_str()),
        pattern: pattern?,
        sources,
        schema,
        schema_index: None,
        when,
        transform,
        shape,
        destinations,
        binary_envelopes,
        drop: spec.drop,
        stop: spec.stop,
        spec,
    })
}

/// Checking one rule table: each problem is reported at the span of the
/// key it is about, prefixed with the rule's name.
struct RuleCheck<'a, 'v> {
    file: &'a Path,
    text: &'a str,
    item: &'a Spanned<DeValue<'v>>,
    name: &'a str,
    errors: &'a mut Vec<Diagnostic>,
}

impl RuleCheck<'_, '_> {
    /// A problem with the value at `path` inside the rule.
    fn err(&mut self, path: &[&str], msg: String) {
        self.err_at(span_in(self.item, path), msg);
    }

    fn err_at(&mut self, span: Range<usize>, msg: String) {
        let message = format!("rule {:?}: {msg}", self.name);
        let d = Diagnostic::at(self.file, self.text, Some(span), message);
        self.errors.push(d);
    }

    /// An expression at `path`, with a syntax error pointing into it.
    fn expr(&mut self, path: &[&str], source: &str) -> Option<Expr> {
        match Expr::compile(source) {
            Ok(e) => Some(e),
            Err(e) => {
                let span = inside_string(self.text, span_in(self.item, path), e.offset);
                self.err_at(span, e.message);
                None
            }
        }
    }

    /// The topic pattern; its captures must not hide a built-in variable.
    fn pattern(&mut self, source: &str) -> Option<Pattern> {
        let p = match Pattern::parse(source) {
            Ok(p) => p,
            Err(e) => {
                self.err(&["match"], e.to_string());
                return None;
            }
        };
        for name in p.capture_names() {
            if expr::RESERVED.contains(&name) {
                self.err(
                    &["match"],
                    format!(
                        "capture {{{name}}} would hide the built-in variable `{name}`; pick another name"
                    ),
                );
            }
        }
        Some(p)
    }

    /// `from`: which events the rule serves, `"local"` when unset.
    fn sources(&mut self, from: Option<&[String]>, upstreams: &BTreeSet<String>) -> Vec<Arc<str>> {
        let Some(from) = from else {
            return vec![Arc::from(LOCAL_SOURCE)];
        };
        if from.is_empty() {
            self.err(
                &["from"],
                "from = [] matches nothing; name \"local\" or an upstream (or leave it out for local events)".into(),
            );
        }
        for (i, name) in from.iter().enumerate() {
            if name != LOCAL_SOURCE && !upstreams.contains(name) {
                let known: Vec<&str> = upstreams.iter().map(String::as_str).collect();
                let path = i.to_string();
                let path: &[&str] = match from.len() {
                    1 => &["from"],
                    _ => &["from", &path],
                };
                self.err(
                    path,
                    format!(
                        "from {name:?} is neither \"local\" nor a configured upstream (configured: {}); a downlink rule names the [upstream.<name>] it subscribes on",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") },
                    ),
                );
            }
        }
        from.iter().map(|n| Arc::from(n.as_str())).collect()
    }

    /// `set`, `drop_fields` and `rename`.
    fn transform(&mut self, spec: &RuleSpec) -> Transform {
        let mut transform = Transform::default();
        for (field, source) in &spec.set {
            if field.is_empty() {
                self.err(&["set"], "set: field names must not be empty".into());
            }
            if let Some(e) = self.expr(&["set", field], source) {
                transform.set.push((field.clone(), e));
            }
        }
        for (i, field) in spec.drop_fields.iter().enumerate() {
            if field.is_empty() {
                self.err(
                    &["drop_fields", &i.to_string()],
                    "drop_fields: field names must not be empty".into(),
                );
            }
            transform.drop_fields.push(field.clone());
        }
        for (from, to) in &spec.rename {
            if from.is_empty() || to.is_empty() {
                self.err(&["rename"], "rename: field names must not be empty".into());
            }
            transform.rename.push((from.clone(), to.clone()));
        }
        transform
    }

    /// At most one of throttle, dedupe, deadband and window, checked.
    fn shape(&mut self, spec: &RuleSpec) -> Option<Shape> {
        let shapes: Vec<(&str, ShapeSpec)> = [
            spec.throttle
                .clone()
                .map(|s| ("throttle", ShapeSpec::Throttle(s))),
            spec.dedupe
                .clone()
                .map(|s| ("dedupe", ShapeSpec::Dedupe(s))),
            spec.deadband
                .clone()
                .map(|s| ("deadband", ShapeSpec::Deadband(s))),
            spec.window
                .clone()
                .map(|s| ("window", ShapeSpec::Window(s))),
        ]
        .into_iter()
        .flatten()
        .collect();
        if shapes.len() > 1 {
            self.err(
                &[shapes[1].0],
                format!(
                    "a rule shapes its stream one way; {} and {} are both set (split the rule in two, with different `when`s)",
                    shapes[0].0, shapes[1].0
                ),
            );
        }
        let mut shape = None;
        for (kind, s) in shapes {
            for (key, msg) in s.validate() {
                self.err(&[kind, key], format!("{kind}.{key}: {msg}"));
            }
            let key = s.key_expr().and_then(|k| self.expr(&[kind, "key"], k));
            shape.get_or_insert(Shape { spec: s, key });
        }
        shape
    }

    /// A rule either drops (and does nothing else) or has destinations.
    fn drop_or_destinations(&mut self, spec: &RuleSpec, transforms: bool, shapes: bool) {
        if !spec.drop {
            if spec.to.is_empty() {
                self.err(
                    &[],
                    "a rule needs destinations (to = [...]) or drop = true".into(),
                );
            }
            return;
        }
        let extra = [
            (!spec.to.is_empty(), "to"),
            (transforms, "set/drop_fields/rename"),
            (shapes, "shaping"),
        ];
        if let Some((_, what)) = extra.iter().find(|(on, _)| *on) {
            self.err(
                &["drop"],
                format!("a rule that drops (drop = true) cannot also have {what}"),
            );
        }
    }
}

/// Compile one destination; problems come back as (key, message).
pub fn compile_destination(
    d: &DestinationSpec,
    pattern: Option<&Pattern>,
    upstreams: &BTreeSet<String>,
    windowed: bool,
) -> Result<Destination, Vec<(&'static str, String)>> {
    let mut problems = Vec::new();
    let target = match (&d.upstream, &d.local) {
        (Some(_), Some(_)) | (None, None) => {
            problems.push((
                "upstream",
                "a destination is either { upstream = \"<name>\", ... } or { local = \"<topic>\" }"
                    .into(),
            ));
            None
        }
        (Some(name), None) => Some(upstream_target(d, name, upstreams, &mut problems)),
        (None, Some(_)) => Some(local_target(d, &mut problems)),
    };
    let template = |t: &str, key, problems: &mut Vec<_>| {
        let captures = pattern.into_iter().flat_map(|p| p.capture_names());
        let what = match key {
            "event_type" | "event_source" => key,
            _ => "topic",
        };
        Template::parse_for(what, t, captures)
            .map_err(|e| problems.push((key, e)))
            .ok()
    };
    let topic = match (&d.local, &d.topic) {
        (Some(t), _) => template(t, "local", &mut problems),
        (None, Some(t)) => template(t, "topic", &mut problems),
        (None, None) => None,
    };
    encoding(d, windowed, &mut problems);
    let envelope = match d.envelope {
        None => {
            for (set, key) in [
                (d.event_type.is_some(), "event_type"),
                (d.event_source.is_some(), "event_source"),
            ] {
                if set {
                    problems.push((
                        key,
                        format!(
                            "`{key}` is an attribute of an envelope; add envelope = \"cloudevents\""
                        ),
                    ));
                }
            }
            None
        }
        Some(mode) => {
            if mode == EnvelopeMode::Cloudevents && d.encode == Some(Encoding::Cbor) {
                problems.push((
                    "encode",
                    "a CloudEvents structured event is JSON; leave out encode (or use \"raw\" to carry the bytes as data_base64)".into(),
                ));
            }
            if mode == EnvelopeMode::CloudeventsBinary && d.local.is_some() {
                problems.push((
                    "envelope",
                    "\"cloudevents-binary\" sends the attributes as MQTT 5 properties to an upstream; a local destination has none (use \"cloudevents\")".into(),
                ));
            }
            if let Some(t) = &d.event_source
                && !envelope::uri_text(t.replace(['{', '}'], "").as_str())
            {
                problems.push((
                    "event_source",
                    format!("event_source {t:?} is not a URI reference (a space, a quote or a control character); percent-encode it, e.g. %20"),
                ));
            }
            if let Some(t) = &d.event_type
                && t.chars().any(char::is_control)
            {
                problems.push((
                    "event_type",
                    format!("event_type {t:?} has a control character"),
                ));
            }
            Some(Envelope {
                mode,
                event_type: d
                    .event_type
                    .as_deref()
                    .and_then(|t| template(t, "event_type", &mut problems)),
                source: d
                    .event_source
                    .as_deref()
                    .and_then(|t| template(t, "event_source", &mut problems)),
            })
        }
    };
    match (problems.is_empty(), target) {
        (true, Some(target)) => Ok(Destination {
            target,
            topic,
            encode: d.encode,
            id_field: d.id_field.as_deref().map(Arc::from),
            envelope,
        }),
        _ => Err(problems),
    }
}

/// `{ upstream = "<name>", qos, priority, ttl, overflow }`.
fn upstream_target(
    d: &DestinationSpec,
    name: &str,
    upstreams: &BTreeSet<String>,
    problems: &mut Vec<(&'static str, String)>,
) -> Target {
    if !upstreams.contains(name) {
        let known: Vec<&str> = upstreams.iter().map(|k| k.as_str()).collect();
        problems.push((
            "upstream",
            format!(
                "upstream {name:?} is not configured (configured: {}); add [upstream.{name}] to the config or fix the name",
                if known.is_empty() { "none".to_string() } else { known.join(", ") },
            ),
        ));
    }
    if d.retain.is_some() {
        problems.push((
            "retain",
            "`retain` applies to a local destination (an upstream's queued events are not retained)".into(),
        ));
    }
    let qos = d.qos.unwrap_or(1);
    if qos > 1 {
        problems.push((
            "qos",
            format!("qos {qos} is not supported upstream; use 0 or 1"),
        ));
    }
    const TEN_YEARS: std::time::Duration = std::time::Duration::from_secs(10 * 365 * 86_400);
    if d.ttl.is_some_and(|t| t.0.is_zero() || t.0 > TEN_YEARS) {
        problems.push((
            "ttl",
            "ttl must be between 1ms and 10 years (leave it out to never expire)".into(),
        ));
    }
    Target::Upstream(UpstreamTarget {
        upstream: Arc::from(name),
        qos,
        priority: d.priority.unwrap_or_default(),
        ttl: d.ttl.map(|t| t.0),
        overflow: d.overflow.unwrap_or_default(),
    })
}

/// `{ local = "<topic>", qos, retain }`; keys that only an upstream
/// destination has are errors.
fn local_target(d: &DestinationSpec, problems: &mut Vec<(&'static str, String)>) -> Target {
    let qos = d.qos.unwrap_or(0);
    if qos > 2 {
        problems.push(("qos", format!("qos {qos} does not exist; use 0, 1 or 2")));
    }
    let upstream_only = [
        (
            d.topic.is_some(),
            "topic",
            "the local topic is the `local` value itself",
        ),
        (
            d.priority.is_some(),
            "priority",
            "priority orders the upstream queue",
        ),
        (d.ttl.is_some(), "ttl", "ttl applies to the upstream queue"),
        (
            d.overflow.is_some(),
            "overflow",
            "overflow applies to the upstream queue",
        ),
    ];
    for (set, key, why) in upstream_only {
        if set {
            problems.push((
                key,
                format!("`{key}` does not apply to a local destination ({why})"),
            ));
        }
    }
    Target::Local {
        qos,
        retain: d.retain.unwrap_or(false),
    }
}

/// `encode` and `id_field`.
fn encoding(d: &DestinationSpec, windowed: bool, problems: &mut Vec<(&'static str, String)>) {
    if d.id_field.as_deref().is_some_and(str::is_empty) {
        problems.push(("id_field", "id_field must not be empty".into()));
    }
    if d.encode == Some(Encoding::Raw) {
        if d.id_field.is_some() {
            problems.push((
                "id_field",
                "encode = \"raw\" sends the bytes as received, so it cannot carry id_field".into(),
            ));
        }
        if windowed {
            problems.push((
                "encode",
                "a window emits a new aggregate payload; it has no raw bytes (use json or cbor)"
                    .into(),
            ));
        }
    }
}
