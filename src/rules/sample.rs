//! `edgeferry schema`: a person checking a payload against the declared
//! contracts by hand (a firmware engineer with a captured message, an
//! operator with a dead letter), and the list of what is declared.
//!
//! The same contracts and the same decoding as the router, so "ok here"
//! means "ok on the gateway"; unlike the router, every problem is listed,
//! not only the first.

use std::fmt::Write as _;
use std::path::Path;

use super::RuleSet;
use super::schema::{Contract, FailureKind};
use crate::codec::{self, Payload};

/// Why a sample could not be checked at all (rather than failing).
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// Fix the name: the declared ones are listed.
    #[error("schema {name:?} is not declared (declared: {declared})")]
    UnknownSchema { name: String, declared: String },
    /// Fix the path or its permissions.
    #[error("cannot read {path}: {source}")]
    Unreadable {
        path: String,
        source: std::io::Error,
    },
    /// Give `--topic`: the version is in the topic.
    #[error(
        "schema {name:?} takes the version from the topic (match {pattern:?}); give --topic with the topic the event came on"
    )]
    NeedsTopic { name: String, pattern: String },
    /// Give a topic the schema applies to.
    #[error("topic {topic:?} is not one schema {name:?} applies to (match {pattern:?})")]
    OtherTopic {
        name: String,
        topic: String,
        pattern: String,
    },
}

/// The outcome of checking one sample.
#[derive(Debug)]
pub struct Report {
    /// It keeps the contract.
    pub ok: bool,
    /// What to print, one finding per line.
    pub text: String,
}

/// Check the payload in `file` (`-`: standard input) against the contract
/// `name`, as if it had been published on `topic`.
pub fn validate(
    set: &RuleSet,
    name: &str,
    file: &Path,
    topic: Option<&str>,
) -> Result<Report, SampleError> {
    let contract = set
        .contract(name)
        .ok_or_else(|| SampleError::UnknownSchema {
            name: name.to_string(),
            declared: declared(set),
        })?;
    if contract.versioned_by_topic() && topic.is_none() {
        return Err(SampleError::NeedsTopic {
            name: name.to_string(),
            pattern: contract.current().pattern.to_string(),
        });
    }
    if let Some(t) = topic
        && contract.current().pattern.captures(t).is_none()
    {
        return Err(SampleError::OtherTopic {
            name: name.to_string(),
            topic: t.to_string(),
            pattern: contract.current().pattern.to_string(),
        });
    }
    let label = file.display().to_string();
    let raw = read(file).map_err(|source| SampleError::Unreadable {
        path: label.clone(),
        source,
    })?;
    let label = if label == "-" {
        "standard input".to_string()
    } else {
        label
    };
    Ok(check(contract, &label, &raw, topic.unwrap_or("")))
}

fn read(file: &Path) -> std::io::Result<Vec<u8>> {
    if file == Path::new("-") {
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut raw)?;
        Ok(raw)
    } else {
        std::fs::read(file)
    }
}

fn check(contract: &Contract, label: &str, raw: &[u8], topic: &str) -> Report {
    let payload = codec::decode(raw);
    let format = match &payload {
        Payload::Json(_) => "JSON",
        Payload::Cbor(_) => "CBOR",
        Payload::Malformed(why) => {
            return Report {
                ok: false,
                text: format!("{label}: {why}\n"),
            };
        }
        Payload::Raw => {
            return Report {
                ok: false,
                text: format!(
                    "{label}: neither JSON nor CBOR ({} bytes); a contract needs a structured payload\n",
                    raw.len()
                ),
            };
        }
    };
    let schema = match contract.version_of(topic, payload.value()) {
        Ok(s) => s,
        Err(f) => {
            debug_assert_eq!(f.kind, FailureKind::UnknownVersion);
            return Report {
                ok: false,
                text: format!(
                    "{label}: at {:?}: {}\non the gateway it would be dead-lettered (reason \"{}\")\n",
                    f.path,
                    f.message,
                    f.reason()
                ),
            };
        }
    };
    let what = match &schema.version {
        Some(v) => format!(
            "schema {:?} version {v} ({})",
            schema.name,
            schema.file.display()
        ),
        None => format!("schema {:?} ({})", schema.name, schema.file.display()),
    };
    let failures = schema.failures(payload.value());
    if failures.is_empty() {
        return Report {
            ok: true,
            text: format!("{label}: ok: the {format} payload keeps {what}\n"),
        };
    }
    let mut text = format!("{label}: the {format} payload breaks {what}:\n");
    for f in &failures {
        let _ = writeln!(text, "  at {:?}: {}", f.path, f.message);
    }
    let _ = writeln!(
        text,
        "{} problem(s); on the gateway it would be dead-lettered (reason \"schema\", path {:?})",
        failures.len(),
        failures[0].path
    );
    Report { ok: false, text }
}

fn declared(set: &RuleSet) -> String {
    let names: Vec<&str> = set.contracts().iter().map(|c| &*c.name).collect();
    match names.is_empty() {
        true => "none".into(),
        false => names.join(", "),
    }
}

/// One line per declared schema version: name, version, topics, whether
/// enforced, the file, and where it is declared.
pub fn list(set: &RuleSet) -> String {
    let mut out = String::new();
    for c in set.contracts() {
        for s in c.versions() {
            let version = s
                .version
                .as_deref()
                .map_or(String::new(), |v| format!(" v{v}"));
            let current = match c.versions().len() > 1 && std::ptr::eq(s, c.current()) {
                true => " (current)",
                false => "",
            };
            let _ = writeln!(
                out,
                "{}{version}{current}  match {:?}  {}  {}  declared at {}:{}",
                s.name,
                s.pattern.to_string(),
                if s.enforce {
                    "enforced"
                } else {
                    "for rules that name it"
                },
                s.file.display(),
                s.at.file.display(),
                s.at.line,
            );
        }
    }
    if out.is_empty() {
        out.push_str("no [[schema]] tables in the rule files\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn set(dir: &Path) -> RuleSet {
        std::fs::write(
            dir.join("t.json"),
            r#"{"type": "object", "required": ["value", "unit"],
                "properties": {"value": {"type": "number"}}}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("r.toml"),
            "[[schema]]\nname = \"t\"\nmatch = \"s/+\"\nfile = \"t.json\"\n",
        )
        .unwrap();
        RuleSet::load_dir(dir, &BTreeSet::new()).unwrap()
    }

    #[test]
    fn a_sample_lists_every_problem_with_its_pointer() {
        let dir = tempfile::tempdir().unwrap();
        let set = set(dir.path());
        let c = set.contract("t").unwrap();
        let r = check(c, "x.json", br#"{"value": "hot"}"#, "");
        assert!(!r.ok);
        assert!(r.text.contains("at \"/value\""), "{}", r.text);
        assert!(
            r.text.contains("\"unit\" is a required property"),
            "{}",
            r.text
        );
        assert!(r.text.contains("2 problem(s)"), "{}", r.text);
        let r = check(c, "x.json", br#"{"value": 1, "unit": "C"}"#, "");
        assert!(r.ok, "{}", r.text);
    }

    #[test]
    fn cbor_and_broken_json_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let set = set(dir.path());
        let c = set.contract("t").unwrap();
        let mut cbor = Vec::new();
        ciborium::into_writer(&serde_json::json!({"value": 1, "unit": "C"}), &mut cbor).unwrap();
        let r = check(c, "x.cbor", &cbor, "");
        assert!(r.ok && r.text.contains("CBOR"), "{}", r.text);
        let r = check(c, "x.json", b"{\"value\": ", "");
        assert!(!r.ok && r.text.contains("malformed JSON"), "{}", r.text);
        let r = check(c, "x.bin", b"\x00\x01", "");
        assert!(
            !r.ok && r.text.contains("neither JSON nor CBOR"),
            "{}",
            r.text
        );
    }

    #[test]
    fn an_unknown_name_lists_the_declared_ones() {
        let dir = tempfile::tempdir().unwrap();
        let set = set(dir.path());
        let e = validate(&set, "nope", Path::new("x"), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "schema \"nope\" is not declared (declared: t)"
        );
    }
}
