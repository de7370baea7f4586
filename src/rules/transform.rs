//! Payload transforms (`set`, `drop_fields`, `rename`) and output encoding.
//!
//! Transforms apply in that order to an object payload: `set` values are
//! all computed from the event as it arrived (so one `set` entry does not see
//! another's result), then fields are removed, then renamed.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::expr::{Env, EvalError, Expr, RuleVars};
use super::spec::Encoding;
use crate::codec::Payload;

/// A rule's compiled transform; empty when the rule has none.
#[derive(Debug, Clone, Default)]
pub struct Transform {
    pub set: Vec<(String, Expr)>,
    pub drop_fields: Vec<String>,
    pub rename: Vec<(String, String)>,
}

impl Transform {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.drop_fields.is_empty() && self.rename.is_empty()
    }

    /// The transformed payload. Only object payloads can be transformed.
    pub fn apply(
        &self,
        env: &Env,
        vars: Option<&RuleVars<'_, '_>>,
        payload: Option<&Value>,
    ) -> Result<Value, EvalError> {
        let Some(Value::Object(map)) = payload else {
            return Err(EvalError(
                "set, drop_fields and rename need a JSON or CBOR object payload".into(),
            ));
        };
        let mut computed = Vec::with_capacity(self.set.len());
        for (field, expr) in &self.set {
            // The rule builds `vars` whenever it has `set` entries.
            let Some(vars) = vars else {
                return Err(EvalError("internal: no variables for set".into()));
            };
            let v = expr
                .eval(env, vars)
                .map_err(|e| EvalError(format!("set.{field} = {:?}: {e}", expr.source())))?;
            computed.push((field, v));
        }
        let mut out: Map<String, Value> = map.clone();
        for (field, v) in computed {
            out.insert(field.clone(), v);
        }
        for field in &self.drop_fields {
            out.remove(field);
        }
        for (from, to) in &self.rename {
            if let Some(v) = out.remove(from) {
                out.insert(to.clone(), v);
            }
        }
        Ok(Value::Object(out))
    }
}

/// Write `value` in `encoding` (JSON or CBOR).
pub fn encode(value: &Value, encoding: Encoding) -> Result<Bytes, String> {
    match encoding {
        Encoding::Json | Encoding::Raw => serde_json::to_vec(value)
            .map(Bytes::from)
            .map_err(|e| format!("cannot encode JSON: {e}")),
        Encoding::Cbor => {
            let mut out = Vec::with_capacity(128);
            ciborium::into_writer(value, &mut out)
                .map(|()| Bytes::from(out))
                .map_err(|e| format!("cannot encode CBOR: {e}"))
        }
    }
}

/// The encoding a destination without `encode` uses for a changed payload:
/// the input's own structured format, JSON otherwise.
pub fn natural_encoding(payload: &Payload) -> Encoding {
    match payload {
        Payload::Cbor(_) => Encoding::Cbor,
        _ => Encoding::Json,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use crate::rules::expr::EventVars;
    use serde_json::json;

    #[test]
    fn set_drop_and_rename_apply_in_order() {
        let env = Env::default();
        let event = Event::for_test("s/a/t1", br#"{"value": 20.0, "debug": 1, "unit": "C"}"#);
        let vars = EventVars::new(&event, "id", "gw");
        let rule = RuleVars {
            event: &vars,
            captures: &[("device", "t1")],
        };
        let t = Transform {
            set: vec![
                ("device".into(), Expr::compile("device").unwrap()),
                (
                    "f".into(),
                    Expr::compile("value * 9.0 / 5.0 + 32.0").unwrap(),
                ),
                ("value".into(), Expr::compile("value + 1.0").unwrap()),
            ],
            drop_fields: vec!["debug".into(), "absent".into()],
            rename: vec![("unit".into(), "u".into())],
        };
        let out = t.apply(&env, Some(&rule), event.payload.value()).unwrap();
        assert_eq!(
            out,
            json!({"value": 21.0, "u": "C", "device": "t1", "f": 68.0})
        );
        let raw = Event::for_test("s", b"plain");
        let vars = EventVars::new(&raw, "id", "gw");
        let rule = RuleVars {
            event: &vars,
            captures: &[],
        };
        assert!(t.apply(&env, Some(&rule), raw.payload.value()).is_err());
    }

    #[test]
    fn cbor_round_trips() {
        let v = json!({"a": 1, "b": [true, "x", 2.5]});
        let bytes = encode(&v, Encoding::Cbor).unwrap();
        assert_eq!(crate::codec::decode(&bytes), Payload::Cbor(v.clone()));
        let bytes = encode(&v, Encoding::Json).unwrap();
        assert_eq!(crate::codec::decode(&bytes), Payload::Json(v));
    }
}
