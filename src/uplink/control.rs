//! Remote operations on an upstream's `control_topic` (off unless set).
//!
//! A command is a JSON object, `{"request_id": "42", "command": "..."}`:
//! - `reload`: the rules from disk (what SIGHUP does);
//! - `status`: the heartbeat now (also on `status_topic`, if set);
//! - `rules`: `"files": {"10-sensors.toml": "<text>", ...}` replaces the
//!   rule files, checked like `edgeferry check` and tested with their
//!   `[[test]]` cases first, applied only if all passes (`remote`);
//! - `rollback`: the set the last `rules` replaced.
//!
//! Each gets one result on `<control_topic>/result` (QoS 1, not retained),
//! with the same `request_id`, `"ok"`, and `errors` (every problem, rule
//! errors as `file:line:column: message`) or what changed. Whoever may
//! publish on the control topic may change the gateway's rules: give it an
//! ACL on the cloud broker (docs/security.md).

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::reload::Applied;

/// A parsed command.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub request_id: Value,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Reload,
    Status,
    Rules(Vec<(String, String)>),
    Rollback,
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Reload => "reload",
            Op::Status => "status",
            Op::Rules(_) => "rules",
            Op::Rollback => "rollback",
        }
    }
}

/// The command in `payload`, or the result that refuses it.
pub fn parse(payload: &[u8]) -> Result<Command, Bytes> {
    let refuse = |id: &Value, command: &str, why: String| result(id, command, Err(vec![why]), None);
    let v: Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => {
            return Err(refuse(
                &Value::Null,
                "",
                format!(
                    "not a JSON command ({e}); send {{\"request_id\": \"1\", \"command\": \"status\"}}"
                ),
            ));
        }
    };
    let id = v.get("request_id").cloned().unwrap_or(Value::Null);
    let command = v.get("command").and_then(Value::as_str).unwrap_or("");
    let op = match command {
        "reload" => Op::Reload,
        "status" => Op::Status,
        "rollback" => Op::Rollback,
        "rules" => match v.get("files").and_then(Value::as_object) {
            Some(files) => {
                let mut out = Vec::new();
                for (name, text) in files {
                    let Some(text) = text.as_str() else {
                        return Err(refuse(
                            &id,
                            command,
                            format!("files.{name}: the file's text must be a string"),
                        ));
                    };
                    out.push((name.clone(), text.to_string()));
                }
                Op::Rules(out)
            }
            None => {
                return Err(refuse(
                    &id,
                    command,
                    "\"rules\" needs \"files\": {\"<name>.toml\": \"<text>\", ...} (the whole new set)".into(),
                ));
            }
        },
        other => {
            return Err(refuse(
                &id,
                other,
                format!("unknown command {other:?}; one of reload, status, rules, rollback"),
            ));
        }
    };
    Ok(Command { request_id: id, op })
}

/// A result: `ok` and what changed, or every error. `extra` fields (the
/// status for `status`) are added.
pub fn result(
    request_id: &Value,
    command: &str,
    outcome: Result<Map<String, Value>, Vec<String>>,
    extra: Option<(&str, Value)>,
) -> Bytes {
    let mut m = Map::new();
    m.insert("request_id".into(), request_id.clone());
    m.insert("command".into(), json!(command));
    match outcome {
        Ok(fields) => {
            m.insert("ok".into(), json!(true));
            m.extend(fields);
        }
        Err(errors) => {
            m.insert("ok".into(), json!(false));
            m.insert("errors".into(), json!(errors));
        }
    }
    if let Some((k, v)) = extra {
        m.insert(k.into(), v);
    }
    Bytes::from(Value::Object(m).to_string())
}

/// The result of a reload, `rules` or `rollback`.
pub fn applied(request_id: &Value, command: &str, a: Applied) -> Bytes {
    let running = json!({ "count": a.rules, "digest": a.digest });
    let outcome = a.result.map(|c| {
        let mut m = Map::new();
        m.insert("added".into(), json!(c.added));
        m.insert("removed".into(), json!(c.removed));
        m.insert("changed".into(), json!(c.changed));
        m
    });
    result(request_id, command, outcome, Some(("rules", running)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(payload: &[u8]) -> Value {
        serde_json::from_slice(&parse(payload).unwrap_err()).unwrap()
    }

    #[test]
    fn commands_parse_and_bad_ones_get_a_result_saying_why() {
        let c = parse(br#"{"request_id":"7","command":"rules","files":{"a.toml":"x"}}"#).unwrap();
        assert_eq!(c.request_id, json!("7"));
        assert_eq!(c.op, Op::Rules(vec![("a.toml".into(), "x".into())]));
        assert_eq!(parse(br#"{"command":"status"}"#).unwrap().op, Op::Status);
        let r = refused(br#"{"request_id":3,"command":"reboot"}"#);
        assert_eq!(
            (r["request_id"].clone(), r["ok"].clone()),
            (json!(3), json!(false))
        );
        assert!(
            r["errors"][0]
                .as_str()
                .unwrap()
                .contains("unknown command \"reboot\"")
        );
        assert!(
            refused(b"nope")["errors"][0]
                .as_str()
                .unwrap()
                .contains("not a JSON command")
        );
        assert!(
            refused(br#"{"command":"rules"}"#)["errors"][0]
                .as_str()
                .unwrap()
                .contains("needs \"files\"")
        );
        assert!(
            refused(br#"{"command":"rules","files":{"a.toml":1}}"#)["errors"][0]
                .as_str()
                .unwrap()
                .contains("must be a string")
        );
    }
}
