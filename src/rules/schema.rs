//! Event contracts: `[[schema]]` tables in rule files, each a JSON Schema
//! file (draft 2020-12 unless the file says otherwise) compiled once at
//! load with the `jsonschema` crate, matched by topic like a rule.
//!
//! A schema applies where a rule names it (`schema = "<name>"`: the event
//! must validate before the rule's `when`) or, with `enforce = true`, to
//! every event on its topics. JSON and CBOR payloads are validated as the
//! same value the rules see. An event that fails is dead-lettered with the
//! schema, the JSON pointer of the first failing field and the validator's
//! message, and counted per schema; it is not forwarded.
//!
//! Several tables of one name are the versions of one event type (a
//! [`Contract`]): each says its `version` and where an event carries it
//! (`version_field` in the payload or `version_capture` in the topic), and
//! an event is checked against the version it claims. An event claiming a
//! version nobody declared is dead-lettered as such (`schema_version`):
//! old firmware and broken firmware want different fixes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::schema_bounds as bounds;
use crate::diagnostic::Diagnostic;
use crate::topic::Pattern;

/// One `[[schema]]` table.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SchemaSpec {
    /// What rules name in `schema`; unique unless the tables are versions.
    pub name: String,
    /// Topic pattern (the rules' syntax) of the events it describes.
    #[serde(rename = "match")]
    pub pattern: String,
    /// The JSON Schema file, relative to the rule file's directory.
    pub file: PathBuf,
    /// Validate every event on these topics, not only those of rules
    /// that name it.
    #[serde(default)]
    pub enforce: bool,
    /// This table's version of the event type (an integer or a string).
    pub version: Option<VersionSpec>,
    /// The payload field that carries the version (`a.b` for a nested one).
    pub version_field: Option<String>,
    /// The capture of `match` that carries the version.
    pub version_capture: Option<String>,
}

/// A version as written: `2` or `"2024-06"`.
#[derive(Debug, Clone, PartialEq)]
pub enum VersionSpec {
    Number(i64),
    Text(String),
}

/// By hand, for the message: serde's untagged enum says only "did not
/// match any variant" of `version = 1.5`.
impl<'de> Deserialize<'de> for VersionSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = VersionSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an integer (`version = 2`) or a string (`version = \"2024-06\"`)")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<VersionSpec, E> {
                Ok(VersionSpec::Number(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<VersionSpec, E> {
                i64::try_from(v)
                    .map(VersionSpec::Number)
                    .map_err(|_| E::custom("version is too large"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<VersionSpec, E> {
                Ok(VersionSpec::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl VersionSpec {
    fn text(&self) -> String {
        match self {
            VersionSpec::Number(n) => n.to_string(),
            VersionSpec::Text(s) => s.clone(),
        }
    }
}

/// Where an event carries its version.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Locator {
    /// A payload field, by path from the top.
    Field(Vec<String>),
    /// A capture of the schema's topic pattern.
    Capture(String),
}

impl Locator {
    /// The version `event` claims, as text (a number as written in JSON);
    /// `None` if it carries none.
    fn find(&self, pattern: &Pattern, topic: &str, payload: Option<&Value>) -> Option<String> {
        match self {
            Locator::Field(path) => {
                let mut v = payload?;
                for key in path {
                    v = v.get(key)?;
                }
                match v {
                    // 2.0 (or CBOR's half-float 2) is version 2, as
                    // JSON Schema's `const: 2` says.
                    Value::Number(n) => Some(match n.as_f64() {
                        Some(f) if n.as_i64().is_none() && f.fract() == 0.0 && f.abs() < 9e15 => {
                            (f as i64).to_string()
                        }
                        _ => n.to_string(),
                    }),
                    Value::String(s) => Some(s.clone()),
                    _ => None,
                }
            }
            Locator::Capture(name) => pattern
                .captures(topic)?
                .into_iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.to_string()),
        }
    }

    /// A JSON pointer to it, for a failure.
    fn pointer(&self) -> String {
        match self {
            Locator::Field(path) => path.iter().map(|k| format!("/{k}")).collect(),
            Locator::Capture(_) => String::new(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Locator::Field(path) => format!("field {:?}", path.join(".")),
            Locator::Capture(name) => format!("topic capture {{{name}}}"),
        }
    }
}

/// Why a `[[schema]]` table cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError {
    pub message: String,
    /// The file could not be read at all (exit 3, not 2: the fix is a path
    /// or permissions, not an edit).
    pub unreadable: bool,
}

impl From<String> for CompileError {
    fn from(message: String) -> CompileError {
        CompileError {
            message,
            unreadable: false,
        }
    }
}

/// A compiled schema: one version of one event type.
#[derive(Clone)]
pub struct Schema {
    pub name: Arc<str>,
    pub pattern: Pattern,
    pub enforce: bool,
    /// Its version, if the event type is versioned.
    pub version: Option<Arc<str>>,
    locator: Option<Locator>,
    /// The schema's `$id`, if it has one (a CloudEvent's `dataschema`).
    pub id: Option<Arc<str>>,
    /// The schema file, as resolved against the rule file's directory.
    pub file: PathBuf,
    /// SHA-256 of the file's name and text (part of the set's digest: two
    /// gateways with one digest enforce the same contracts).
    pub digest: [u8; 32],
    /// Where it is declared, for errors about it.
    pub at: Diagnostic,
    validator: Arc<jsonschema::Validator>,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.version {
            Some(v) => write!(f, "Schema({} v{v})", self.name),
            None => write!(f, "Schema({})", self.name),
        }
    }
}

/// What kind of broken contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The event does not validate against its schema.
    Invalid,
    /// The event claims no version, or one nobody declared.
    UnknownVersion,
}

/// Why an event breaks its contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub schema: Arc<str>,
    pub kind: FailureKind,
    /// JSON pointer of the first failing field ("" for the whole payload).
    pub path: String,
    pub message: String,
}

impl Failure {
    /// The dead letter's `reason`.
    pub fn reason(&self) -> &'static str {
        match self.kind {
            FailureKind::Invalid => "schema",
            FailureKind::UnknownVersion => "schema_version",
        }
    }
}

impl Schema {
    /// Read and compile the schema file `spec.file` (relative to `dir`);
    /// the problem, for `file:line`, if it cannot be used. `at` is where
    /// the table is.
    pub fn compile(
        spec: &SchemaSpec,
        pattern: Pattern,
        dir: &Path,
        at: Diagnostic,
    ) -> Result<Schema, CompileError> {
        // A name and a version become metric labels and CloudEvents types.
        let plain = |s: &str| {
            !s.is_empty()
                && s.len() <= 128
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        };
        if !plain(&spec.name) {
            return Err(format!(
                "schema name {:?}: use letters, digits, . - _ (at most 128; it becomes a metric label and a CloudEvents type)",
                spec.name
            )
            .into());
        }
        if let Some(v) = spec.version.as_ref().map(VersionSpec::text)
            && !plain(&v)
        {
            return Err(format!(
                "schema {:?}: version {v:?}: use an integer, or letters, digits, . - _",
                spec.name
            )
            .into());
        }
        let locator = match (&spec.version_field, &spec.version_capture) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "schema {:?}: give `version_field` or `version_capture`, not both",
                    spec.name
                )
                .into());
            }
            (Some(f), None) if f.is_empty() || f.split('.').any(str::is_empty) => {
                return Err(format!(
                    "schema {:?}: version_field {f:?} is not a field path (`v` or `meta.v`)",
                    spec.name
                )
                .into());
            }
            (Some(f), None) => Some(Locator::Field(f.split('.').map(str::to_string).collect())),
            (None, Some(c)) if !pattern.capture_names().any(|n| n == c) => {
                return Err(format!(
                    "schema {:?}: version_capture {c:?} is not a capture of match {:?}",
                    spec.name, spec.pattern
                )
                .into());
            }
            (None, Some(c)) => Some(Locator::Capture(c.clone())),
            (None, None) => None,
        };
        match (&spec.version, &locator) {
            (Some(_), None) => {
                return Err(format!(
                    "schema {:?}: a version needs `version_field` or `version_capture` (where events carry it)",
                    spec.name
                ).into());
            }
            (None, Some(_)) => {
                return Err(format!(
                    "schema {:?}: `version_field`/`version_capture` without a `version`",
                    spec.name
                )
                .into());
            }
            _ => {}
        }
        let path = dir.join(&spec.file);
        let text = bounds::read(&path, dir).map_err(|(message, unreadable)| CompileError {
            message: format!("schema {:?}: {message}", spec.name),
            unreadable,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            format!(
                "schema {:?}: {} is not JSON: {e}",
                spec.name,
                path.display()
            )
        })?;
        // $refs to other files resolve next to this one.
        let base = std::fs::canonicalize(&path).unwrap_or(path.clone());
        let referenced = bounds::expansion(&value, &base, dir).map_err(|e| match e {
            bounds::Refusal::Cost(e) => format!(
                "schema {:?}: {} is too costly to check events against: {e}",
                spec.name,
                path.display()
            ),
            bounds::Refusal::Ref(e) => format!(
                "schema {:?}: {} is not a usable JSON Schema: {e}",
                spec.name,
                path.display()
            ),
        })?;
        // The draft is the file's `$schema`, 2020-12 if it has none.
        let validator = jsonschema::options()
            .with_base_uri(file_uri(&base))
            .with_retriever(bounds::Retriever {
                root: dir.to_path_buf(),
            })
            .with_pattern_options(
                jsonschema::PatternOptions::regex().size_limit(bounds::MAX_PATTERN),
            )
            .build(&value)
            .map_err(|e| {
                format!(
                    "schema {:?}: {} is not a usable JSON Schema: {e}",
                    spec.name,
                    path.display()
                )
            })?;
        Ok(Schema {
            name: Arc::from(spec.name.as_str()),
            pattern,
            enforce: spec.enforce,
            version: spec.version.as_ref().map(|v| Arc::from(v.text())),
            locator,
            id: value.get("$id").and_then(Value::as_str).map(Arc::from),
            digest: super::sha256(
                [
                    spec.file.as_os_str().as_encoded_bytes(),
                    &[0],
                    text.as_bytes(),
                ]
                .into_iter()
                .chain(referenced.iter().map(|r| &r[..])),
            ),
            file: path,
            at,
            validator: Arc::new(validator),
        })
    }

    /// Whether `payload` (JSON or CBOR, as decoded; `None` for anything
    /// else) keeps the contract.
    pub fn check(&self, payload: Option<&Value>) -> Result<(), Failure> {
        let fail = |path: String, message: String| Failure {
            schema: self.name.clone(),
            kind: FailureKind::Invalid,
            path,
            message,
        };
        let Some(value) = payload else {
            return Err(fail(
                String::new(),
                "the payload is neither JSON nor CBOR".into(),
            ));
        };
        match self.validator.validate(value) {
            Ok(()) => Ok(()),
            Err(e) => Err(fail(e.instance_path().to_string(), e.to_string())),
        }
    }

    /// Every way `payload` breaks this schema, in the validator's order
    /// (empty when it keeps it): for a person checking a sample, where
    /// the router stops at the first.
    pub fn failures(&self, payload: Option<&Value>) -> Vec<Failure> {
        let Some(value) = payload else {
            return self.check(payload).err().into_iter().collect();
        };
        self.validator
            .iter_errors(value)
            .map(|e| Failure {
                schema: self.name.clone(),
                kind: FailureKind::Invalid,
                path: e.instance_path().to_string(),
                message: e.to_string(),
            })
            .collect()
    }

    /// The version `payload` on `topic` claims by this schema's locator.
    fn claimed(&self, topic: &str, payload: Option<&Value>) -> Option<String> {
        self.locator.as_ref()?.find(&self.pattern, topic, payload)
    }
}

/// Every declared version of one event type (one version, or none, for an
/// unversioned schema).
#[derive(Debug, Clone)]
pub struct Contract {
    pub name: Arc<str>,
    /// Oldest first; the last is the current version.
    versions: Vec<Schema>,
}

impl Contract {
    /// Group `schemas` by name, in the order first declared. Two tables of
    /// one name without versions, or of one name and version, are errors
    /// at the second's `file:line`.
    pub fn group(schemas: Vec<Schema>, errors: &mut Vec<Diagnostic>) -> Vec<Contract> {
        let mut out: Vec<Contract> = Vec::new();
        for s in schemas {
            let Some(c) = out.iter_mut().find(|c| c.name == s.name) else {
                out.push(Contract {
                    name: s.name.clone(),
                    versions: vec![s],
                });
                continue;
            };
            let head = &c.versions[0];
            let first = &head.at;
            let also = format!("{}:{}", first.file.display(), first.line);
            // One event type, one place: the router picks the version with
            // the first table's topics and locator.
            let disagrees = head.pattern.as_str() != s.pattern.as_str()
                || head.enforce != s.enforce
                || head.locator != s.locator;
            let clash = c.versions.iter().find(|o| o.version == s.version);
            let unversioned = s.version.is_none() || c.versions[0].version.is_none();
            let problem = match (&s.version, clash) {
                _ if unversioned => Some(format!(
                    "schema name {:?} is declared twice (also at {also}); names are unique unless each table gives a `version`",
                    s.name
                )),
                (Some(v), Some(_)) => Some(format!(
                    "schema {:?} version {v} is declared twice (also at {also})",
                    s.name
                )),
                (Some(v), None) if disagrees => Some(format!(
                    "schema {:?} version {v}: the versions of one name must give the same `match`, `enforce` and `version_field`/`version_capture` (as at {also})",
                    s.name
                )),
                _ => None,
            };
            match problem {
                Some(message) => {
                    let mut d = s.at.clone();
                    d.message = message;
                    errors.push(d);
                }
                None => c.versions.push(s),
            }
        }
        for c in &mut out {
            c.versions
                .sort_by(|a, b| version_order(&a.version, &b.version));
        }
        out
    }

    /// Whether an event on `topic` must keep this contract whatever the
    /// rules say.
    pub fn enforced_on(&self, topic: &str) -> bool {
        self.versions
            .iter()
            .any(|s| s.enforce && s.pattern.captures(topic).is_some())
    }

    /// The version declared last in order: what upcasts aim at.
    pub fn current(&self) -> &Schema {
        self.versions.last().expect("a contract has a version")
    }

    /// The versions, oldest first.
    pub fn versions(&self) -> &[Schema] {
        &self.versions
    }

    /// Check an event against the version it claims; the schema it kept.
    pub fn check(&self, topic: &str, payload: Option<&Value>) -> Result<&Schema, Failure> {
        let s = self.version_of(topic, payload)?;
        s.check(payload).map(|()| s)
    }

    /// Whether the version is found in the topic rather than the payload.
    pub fn versioned_by_topic(&self) -> bool {
        matches!(self.versions[0].locator, Some(Locator::Capture(_)))
    }

    /// The version an event claims (the only one, unversioned), or why it
    /// claims none that is declared.
    pub fn version_of(&self, topic: &str, payload: Option<&Value>) -> Result<&Schema, Failure> {
        let first = &self.versions[0];
        if first.version.is_none() {
            return Ok(first);
        }
        let mut claimed = None;
        for s in &self.versions {
            let found = s.claimed(topic, payload);
            if found.is_some() && found.as_deref() == s.version.as_deref() {
                return Ok(s);
            }
            claimed = claimed.or(found);
        }
        let locator = first.locator.as_ref().expect("a version has a locator");
        let declared: Vec<&str> = self
            .versions
            .iter()
            .filter_map(|s| s.version.as_deref())
            .collect();
        let message = match claimed {
            Some(v) => format!(
                "version {v:?} of {:?} is not declared (declared: {})",
                self.name,
                declared.join(", ")
            ),
            None => format!(
                "the event carries no version of {:?} ({} missing or not a string or number)",
                self.name,
                locator.describe()
            ),
        };
        Err(Failure {
            schema: self.name.clone(),
            kind: FailureKind::UnknownVersion,
            path: locator.pointer(),
            message,
        })
    }
}

/// `file://` and the path, percent-encoded (a space or a non-ASCII name in
/// the rules directory made every schema "not usable").
fn file_uri(path: &Path) -> String {
    let path = path.to_string_lossy();
    format!(
        "file://{}",
        crate::percent::encode(&path, crate::percent::PATH)
    )
}

/// Numbers by value, then text, so version 10 comes after 9.
fn version_order(a: &Option<Arc<str>>, b: &Option<Arc<str>>) -> std::cmp::Ordering {
    let key = |v: &Option<Arc<str>>| {
        let text = v.as_deref().unwrap_or("");
        (
            text.parse::<i64>().ok().map_or(1, |_| 0),
            text.parse::<i64>().unwrap_or(0),
            text.to_string(),
        )
    };
    key(a).cmp(&key(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(name: &str, pattern: &str, file: &str) -> SchemaSpec {
        SchemaSpec {
            name: name.into(),
            pattern: pattern.into(),
            file: file.into(),
            enforce: false,
            version: None,
            version_field: None,
            version_capture: None,
        }
    }

    fn at(line: usize) -> Diagnostic {
        Diagnostic {
            file: "r.toml".into(),
            line,
            column: 1,
            message: String::new(),
            unreadable: false,
        }
    }

    fn compile(dir: &Path, spec: &SchemaSpec, line: usize) -> Result<Schema, String> {
        let pattern = Pattern::parse(&spec.pattern).unwrap();
        Schema::compile(spec, pattern, dir, at(line)).map_err(|e| e.message)
    }

    fn schema(dir: &Path, text: &str) -> Result<Schema, String> {
        std::fs::write(dir.join("t.json"), text).unwrap();
        compile(dir, &spec("t", "a", "t.json"), 1)
    }

    /// Versions 1 and 2 of "reading" (v1: `value`, v2: `celsius`), located
    /// by `v` in the payload.
    fn versioned(dir: &Path) -> Contract {
        std::fs::write(
            dir.join("v1.json"),
            r#"{"type":"object","required":["v","value"],"properties":{"v":{"const":1},"value":{"type":"number"}}}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("v2.json"),
            r#"{"type":"object","required":["v","celsius"],"properties":{"v":{"const":2},"celsius":{"type":"number"}}}"#,
        )
        .unwrap();
        let mut errors = Vec::new();
        // Declared newest first: the order of versions is by value.
        let schemas = [("v2.json", 2), ("v1.json", 1)]
            .into_iter()
            .enumerate()
            .map(|(i, (file, v))| {
                let mut s = spec("reading", "s/{device}", file);
                s.version = Some(VersionSpec::Number(v));
                s.version_field = Some("v".into());
                compile(dir, &s, i + 1).unwrap()
            })
            .collect();
        let mut contracts = Contract::group(schemas, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(contracts.len(), 1);
        contracts.remove(0)
    }

    #[test]
    fn a_failure_names_the_field_and_why() {
        let d = tempfile::tempdir().unwrap();
        let s = schema(
            d.path(),
            r#"{"type":"object","required":["value"],"properties":{"value":{"type":"number"}},"additionalProperties":false}"#,
        )
        .unwrap();
        assert!(s.check(Some(&json!({"value": 1.5}))).is_ok());
        let f = s.check(Some(&json!({"value": "x"}))).unwrap_err();
        assert_eq!(f.path, "/value");
        assert!(f.message.contains("number"), "{f:?}");
        let f = s.check(Some(&json!({}))).unwrap_err();
        assert!(f.message.contains("value"), "{f:?}");
        let f = s.check(Some(&json!({"value": 1, "extra": 2}))).unwrap_err();
        assert!(f.message.contains("extra"), "{f:?}");
        assert!(s.check(None).is_err());
    }

    #[test]
    fn unusable_files_say_why() {
        let d = tempfile::tempdir().unwrap();
        assert!(
            schema(d.path(), "{nope")
                .unwrap_err()
                .contains("is not JSON")
        );
        let e = schema(d.path(), r#"{"type": 12}"#).unwrap_err();
        assert!(e.contains("not a usable JSON Schema"), "{e}");
        let e = schema(d.path(), r#"{"$ref": "missing.json"}"#).unwrap_err();
        assert!(e.contains("not a usable JSON Schema"), "{e}");
    }

    #[test]
    fn an_event_is_checked_against_the_version_it_claims() {
        let d = tempfile::tempdir().unwrap();
        let c = versioned(d.path());
        assert_eq!(c.current().version.as_deref(), Some("2"));
        let kept = c.check("s/a", Some(&json!({"v": 1, "value": 3}))).unwrap();
        assert_eq!(kept.version.as_deref(), Some("1"));
        let kept = c
            .check("s/a", Some(&json!({"v": 2, "celsius": 3})))
            .unwrap();
        assert_eq!(kept.version.as_deref(), Some("2"));
        // v1's shape claiming v2 fails v2, not "unknown version".
        let f = c
            .check("s/a", Some(&json!({"v": 2, "value": 3})))
            .unwrap_err();
        assert_eq!((f.kind, f.reason()), (FailureKind::Invalid, "schema"));
    }

    #[test]
    fn unknown_and_missing_versions_are_their_own_reason() {
        let d = tempfile::tempdir().unwrap();
        let c = versioned(d.path());
        let f = c
            .check("s/a", Some(&json!({"v": 7, "value": 3})))
            .unwrap_err();
        assert_eq!(f.reason(), "schema_version");
        assert_eq!(f.path, "/v");
        assert!(
            f.message.contains("\"7\"") && f.message.contains("1, 2"),
            "{f:?}"
        );
        let f = c.check("s/a", Some(&json!({"value": 3}))).unwrap_err();
        assert_eq!(f.kind, FailureKind::UnknownVersion);
        assert!(f.message.contains("carries no version"), "{f:?}");
        let f = c.check("s/a", None).unwrap_err();
        assert_eq!(f.kind, FailureKind::UnknownVersion);
        // 2.0 is version 2 (the schema's `const: 2` agrees); 2.5 is not.
        let kept = c.check("s/a", Some(&json!({"v": 2.0, "celsius": 3})));
        assert_eq!(kept.unwrap().version.as_deref(), Some("2"));
        let f = c.check("s/a", Some(&json!({"v": 2.5}))).unwrap_err();
        assert!(f.message.contains("\"2.5\""), "{f:?}");
    }

    #[test]
    fn a_pattern_that_compiles_too_large_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let e = schema(
            d.path(),
            r#"{"properties": {"s": {"pattern": "(?:\\w{100}){1000}"}}}"#,
        )
        .unwrap_err();
        assert!(e.contains("not a usable JSON Schema"), "{e}");
        assert!(
            schema(
                d.path(),
                r#"{"properties": {"s": {"pattern": "^[a-z]{1,8}$"}}}"#
            )
            .is_ok()
        );
    }

    #[test]
    fn a_fifo_is_not_read() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("t.json");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|s| s.success()) {
            return; // no mkfifo here: the regular-file check is tested in schema_bounds
        }
        let e = compile(d.path(), &spec("t", "a", "t.json"), 1).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn names_and_versions_are_plain() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("any.json"), "{}").unwrap();
        for bad in ["", "a b", "x\ny", "we\"ird", "ü"] {
            let e = compile(d.path(), &spec(bad, "s/+", "any.json"), 1).unwrap_err();
            assert!(e.contains("use letters, digits"), "{bad:?}: {e}");
        }
        let mut s = spec("ok", "s/+", "any.json");
        s.version = Some(VersionSpec::Text(String::new()));
        s.version_field = Some("v".into());
        assert!(
            compile(d.path(), &s, 1)
                .unwrap_err()
                .contains("version \"\"")
        );
    }

    #[test]
    fn a_topic_capture_can_carry_the_version() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("any.json"), r#"{"type":"object"}"#).unwrap();
        let schemas = ["v1", "v2"]
            .iter()
            .map(|v| {
                let mut s = spec("door", "doors/{ver}/{id}", "any.json");
                s.version = Some(VersionSpec::Text(v.to_string()));
                s.version_capture = Some("ver".into());
                compile(d.path(), &s, 1).unwrap()
            })
            .collect();
        let mut errors = Vec::new();
        let c = Contract::group(schemas, &mut errors).remove(0);
        let kept = c.check("doors/v1/front", Some(&json!({}))).unwrap();
        assert_eq!(kept.version.as_deref(), Some("v1"));
        let f = c.check("doors/v3/front", Some(&json!({}))).unwrap_err();
        assert_eq!(f.reason(), "schema_version");
        assert_eq!(f.path, "");
    }

    #[test]
    fn versions_order_by_value() {
        let v = |s: &str| Some(Arc::from(s));
        let mut all = vec![v("10"), v("9"), v("2024-06"), v("1")];
        all.sort_by(version_order);
        assert_eq!(all, vec![v("1"), v("9"), v("10"), v("2024-06")]);
    }

    #[test]
    fn version_settings_must_agree() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("any.json"), "{}").unwrap();
        let mut s = spec("x", "s/{device}", "any.json");
        s.version = Some(VersionSpec::Number(1));
        let e = compile(d.path(), &s, 1).unwrap_err();
        assert!(
            e.contains("needs `version_field` or `version_capture`"),
            "{e}"
        );
        s.version_field = Some("v".into());
        s.version_capture = Some("device".into());
        assert!(compile(d.path(), &s, 1).unwrap_err().contains("not both"));
        s.version_field = None;
        s.version_capture = Some("site".into());
        let e = compile(d.path(), &s, 1).unwrap_err();
        assert!(e.contains("not a capture"), "{e}");
        s.version_capture = None;
        s.version_field = Some("a..b".into());
        assert!(
            compile(d.path(), &s, 1)
                .unwrap_err()
                .contains("not a field path")
        );
        s.version = None;
        s.version_field = Some("v".into());
        assert!(
            compile(d.path(), &s, 1)
                .unwrap_err()
                .contains("without a `version`")
        );
    }

    #[test]
    fn the_sets_digest_covers_its_schema_files() {
        let d = tempfile::tempdir().unwrap();
        let rules = "[[schema]]\nname = \"t\"\nmatch = \"s/+\"\nfile = \"t.json\"\n";
        std::fs::write(d.path().join("r.toml"), rules).unwrap();
        let digest = |schema: &str| {
            std::fs::write(d.path().join("t.json"), schema).unwrap();
            crate::rules::RuleSet::load_dir(d.path(), &Default::default())
                .unwrap()
                .digest()
        };
        let loose = digest("{}");
        assert_ne!(loose, digest(r#"{"type": "object"}"#));
        assert_eq!(loose, digest("{}"));
        // And the files its $refs read.
        let common = |text: &str| {
            std::fs::write(d.path().join("common.json"), text).unwrap();
            digest(r#"{"$ref": "common.json#/$defs/r"}"#)
        };
        let one = common(r#"{"$defs": {"r": {"type": "object"}}}"#);
        assert_ne!(one, common(r#"{"$defs": {"r": {"type": "array"}}}"#));
    }

    #[test]
    fn the_versions_of_one_name_must_agree_on_where_they_apply() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("any.json"), "{}").unwrap();
        let mut one = spec("x", "s/+", "any.json");
        one.version = Some(VersionSpec::Number(1));
        one.version_field = Some("v".into());
        let mut two = one.clone();
        two.version = Some(VersionSpec::Number(2));
        for change in [
            |s: &mut SchemaSpec| s.pattern = "t/+".into(),
            |s: &mut SchemaSpec| s.enforce = true,
            |s: &mut SchemaSpec| s.version_field = Some("version".into()),
        ] {
            let mut other = two.clone();
            change(&mut other);
            let mut errors = Vec::new();
            let group = Contract::group(
                vec![
                    compile(d.path(), &one, 1).unwrap(),
                    compile(d.path(), &other, 7).unwrap(),
                ],
                &mut errors,
            );
            assert_eq!(errors.len(), 1, "{other:?}");
            assert_eq!(errors[0].line, 7);
            assert!(
                errors[0].message.contains("must give the same"),
                "{}",
                errors[0].message
            );
            assert_eq!(group[0].versions().len(), 1);
        }
        let mut errors = Vec::new();
        Contract::group(
            vec![
                compile(d.path(), &one, 1).unwrap(),
                compile(d.path(), &two, 7).unwrap(),
            ],
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn a_name_and_version_declared_twice_points_at_both() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("any.json"), "{}").unwrap();
        let mk = |v: Option<i64>, line| {
            let mut s = spec("x", "s/{device}", "any.json");
            if let Some(v) = v {
                s.version = Some(VersionSpec::Number(v));
                s.version_field = Some("v".into());
            }
            compile(d.path(), &s, line).unwrap()
        };
        let mut errors = Vec::new();
        Contract::group(vec![mk(Some(1), 3), mk(Some(1), 9)], &mut errors);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, 9);
        assert!(
            errors[0]
                .message
                .contains("version 1 is declared twice (also at r.toml:3)")
        );
        let mut errors = Vec::new();
        Contract::group(vec![mk(None, 3), mk(None, 5)], &mut errors);
        assert!(
            errors[0]
                .message
                .contains("declared twice (also at r.toml:3)")
        );
        let mut errors = Vec::new();
        Contract::group(vec![mk(None, 3), mk(Some(2), 5)], &mut errors);
        assert_eq!(errors.len(), 1, "a version beside an unversioned table");
    }
}
