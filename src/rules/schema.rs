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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use crate::topic::Pattern;

/// One `[[schema]]` table.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SchemaSpec {
    /// Unique across all rule files; what rules name in `schema`.
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
}

/// A compiled schema.
#[derive(Clone)]
pub struct Schema {
    pub name: Arc<str>,
    pub pattern: Pattern,
    pub enforce: bool,
    validator: Arc<jsonschema::Validator>,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Schema({})", self.name)
    }
}

/// Why an event breaks its contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub schema: Arc<str>,
    /// JSON pointer of the first failing field ("" for the whole payload).
    pub path: String,
    pub message: String,
}

impl Schema {
    /// Read and compile the schema file `spec.file` (relative to `dir`);
    /// the problem, for `file:line`, if it cannot be used.
    pub fn compile(spec: &SchemaSpec, pattern: Pattern, dir: &Path) -> Result<Schema, String> {
        let path = dir.join(&spec.file);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "schema {:?}: cannot read {}: {e}",
                spec.name,
                path.display()
            )
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
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .with_base_uri(format!("file://{}", base.display()))
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
            validator: Arc::new(validator),
        })
    }

    /// Whether `payload` (JSON or CBOR, as decoded; `None` for anything
    /// else) keeps the contract.
    pub fn check(&self, payload: Option<&Value>) -> Result<(), Failure> {
        let fail = |path: String, message: String| Failure {
            schema: self.name.clone(),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(dir: &Path, text: &str) -> Result<Schema, String> {
        std::fs::write(dir.join("t.json"), text).unwrap();
        let spec = SchemaSpec {
            name: "t".into(),
            pattern: "a".into(),
            file: "t.json".into(),
            enforce: false,
        };
        Schema::compile(&spec, Pattern::parse("a").unwrap(), dir)
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
}
