//! CEL expressions in rules: `when` predicates, `set` values and shaping keys.
//!
//! Compiled once at load ([`Expr::compile`]); evaluated per event against
//! [`EventVars`], which are built once per event and shared by every rule
//! the event reaches, so the payload is converted into CEL's value model
//! once, not once per rule. Each rule evaluates in a child scope of one root
//! context built at load (building a root registers every built-in function
//! and costs tens of microseconds; a child scope costs next to nothing).
//!
//! What an expression sees, innermost first:
//! - `topic` (string), `payload` (the whole decoded payload: a map, list or
//!   scalar for JSON and CBOR; a string or bytes for anything else) and
//!   `meta` (`meta.id`, `meta.received_ms`, `meta.gateway`, `meta.format`,
//!   `meta.size`, `meta.client_id`, `meta.username`, `meta.source`: `"local"`
//!   or the upstream a downlink event came from);
//! - the rule's topic captures by name (`site` for `sensors/{site}/#`);
//! - the top-level fields of an object payload by name (`value`, `unit`).
//!
//! A missing field or a type mismatch at run time is an [`EvalError`], never a
//! panic; the caller decides what it means (a `when` that errors does not
//! match, and is counted).

use std::sync::Arc;

use cel::common::types::{
    CelBool, CelBytes, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString, CelUInt,
};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::{Context, Program, Value as CelValue};
use serde_json::{Map, Number, Value};

use crate::codec::Payload;
use crate::event::Event;

/// Names an expression can always use; a capture may not take them.
pub const RESERVED: [&str; 3] = ["topic", "payload", "meta"];

/// A compiled expression with its source (for messages).
#[derive(Debug, Clone)]
pub struct Expr {
    source: Arc<str>,
    program: Arc<Program>,
    /// Its `matches()` patterns, compiled at load (see `pattern`).
    _patterns: super::pattern::Patterns,
}

/// Why an expression does not compile; `offset` is the byte offset of the
/// problem inside the expression, when the parser knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError {
    pub message: String,
    pub offset: Option<usize>,
}

/// Why an expression failed on one event (a missing field, a type mismatch).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EvalError(pub String);

/// An expression's size limits. CEL parses and evaluates recursively, one
/// stack frame per level of the expression tree, and a binary operator
/// chain (`1+1+…+1`) nests one level per operator; the parser's own
/// recursion limit counts parentheses, not operators. 2,000 terms
/// overflowed a tokio worker's stack at the first event, 30,000 the parser
/// at start. Checked before parsing, so the same limits hold in `check`,
/// reload and start, and whatever passes evaluates within a 2 MiB stack.
pub const MAX_EXPR_BYTES: usize = 8 * 1024;
/// Operators (arithmetic, comparison, logic, `!`, `?`, member access `.`).
pub const MAX_OPERATORS: usize = 256;
/// Parentheses, brackets and braces inside one another.
pub const MAX_NESTING: usize = 32;

/// Refuse an expression whose tree would be too deep (see the limits).
fn check_size(source: &str) -> Result<(), CompileError> {
    let too = |what: String, offset: Option<usize>| {
        Err(CompileError {
            message: format!(
                "expression too large: {what} (split it over several rules, or use `x in [..]` for long alternatives)"
            ),
            offset,
        })
    };
    if source.len() > MAX_EXPR_BYTES {
        return too(
            format!("{} bytes, the limit is {MAX_EXPR_BYTES}", source.len()),
            None,
        );
    }
    let bytes = source.as_bytes();
    let (mut operators, mut depth) = (0usize, 0usize);
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if let Some(q) = quote {
            match b {
                b'\\' => i += 1,
                _ if b == q => quote = None,
                _ => {}
            }
            i += 1;
            continue;
        }
        let next = bytes.get(i + 1).copied();
        let operator = match b {
            b'\'' | b'"' => {
                quote = Some(b);
                false
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return too(format!("nested deeper than {MAX_NESTING}"), Some(i));
                }
                false
            }
            b')' | b']' | b'}' => {
                depth = depth.saturating_sub(1);
                false
            }
            // Two-character operators count once.
            b'&' | b'|' | b'=' if next == Some(b) => {
                i += 1;
                true
            }
            b'!' | b'<' | b'>' if next == Some(b'=') => {
                i += 1;
                true
            }
            b'+' | b'-' | b'*' | b'/' | b'%' | b'!' | b'<' | b'>' | b'?' => true,
            // Member access, not a decimal point.
            b'.' => next.is_some_and(|c| c.is_ascii_alphabetic() || c == b'_'),
            _ => false,
        };
        if operator {
            operators += 1;
            if operators > MAX_OPERATORS {
                return too(format!("more than {MAX_OPERATORS} operators"), Some(i));
            }
        }
        i += 1;
    }
    Ok(())
}

impl Expr {
    pub fn compile(source: &str) -> Result<Expr, CompileError> {
        if source.trim().is_empty() {
            return Err(CompileError {
                message: "expression is empty".into(),
                offset: None,
            });
        }
        check_size(source)?;
        match Program::compile(source) {
            Ok(program)
                if !cfg!(feature = "regex") && program.references().has_function("matches") =>
            {
                Err(CompileError {
                    message: format!(
                        "{source:?} uses matches(), but this edgeferry was built without regex support (the `small` build); use startsWith, endsWith or contains, or the standard build"
                    ),
                    offset: source.find("matches"),
                })
            }
            Ok(program) => {
                let patterns = super::pattern::prepare(&program, source)?;
                Ok(Expr {
                    source: Arc::from(source),
                    program: Arc::new(program),
                    _patterns: patterns,
                })
            }
            Err(errors) => {
                let first = errors.errors.first();
                // The parser reports (line, column) within the expression,
                // both from 1 for a one-line expression's first character.
                let offset = first.and_then(|e| {
                    let (line, col) = e.pos;
                    (line >= 1 && col >= 0).then(|| offset_of(source, line as usize, col as usize))
                });
                let message = errors
                    .errors
                    .iter()
                    .map(|e| e.msg.clone())
                    .collect::<Vec<_>>()
                    .join("; ");
                Err(CompileError {
                    message: format!("CEL syntax error in {source:?}: {message}"),
                    offset,
                })
            }
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the expression names `variable` (to check captures at load).
    pub fn references(&self, variable: &str) -> bool {
        self.program.references().has_variable(variable)
    }

    /// Every variable the expression names.
    pub fn variables(&self) -> Vec<String> {
        self.program
            .references()
            .variables()
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    /// Evaluate to a JSON value.
    pub fn eval(&self, env: &Env, vars: &RuleVars<'_, '_>) -> Result<Value, EvalError> {
        let value = self.eval_cel(env, vars)?;
        to_json(&value).map_err(EvalError)
    }

    /// Evaluate a predicate: anything but a bool is an error.
    pub fn eval_bool(&self, env: &Env, vars: &RuleVars<'_, '_>) -> Result<bool, EvalError> {
        match self.eval_cel(env, vars)? {
            CelValue::Bool(b) => Ok(b),
            other => Err(EvalError(format!(
                "must be true or false, but gave {}",
                other.type_of()
            ))),
        }
    }

    /// Evaluate to a string key (for throttle, dedupe, deadband, window):
    /// strings as they are, anything else as its JSON text.
    pub fn eval_key(&self, env: &Env, vars: &RuleVars<'_, '_>) -> Result<String, EvalError> {
        Ok(match self.eval(env, vars)? {
            Value::String(s) => s,
            other => other.to_string(),
        })
    }

    fn eval_cel(&self, env: &Env, vars: &RuleVars<'_, '_>) -> Result<CelValue, EvalError> {
        let mut scope = child(&env.root);
        scope.set_variable_resolver(vars);
        self.program
            .execute(&scope)
            .map_err(|e| EvalError(e.to_string()))
    }
}

/// A child scope of `root` that may borrow event data for `'e`.
fn child<'a, 'e>(root: &'a Context<'a, 'e>) -> Context<'a, 'e> {
    root.new_inner_scope()
}

fn offset_of(source: &str, line: usize, col: usize) -> usize {
    let start: usize = source
        .split_inclusive('\n')
        .take(line.saturating_sub(1))
        .map(str::len)
        .sum();
    (start + col).min(source.len())
}

/// The root context with CEL's standard functions, built once per rule set.
pub struct Env {
    root: Context<'static, 'static>,
}

/// cel's standard library, with edgeferry's `matches` (see `pattern`).
static CEL_ENV: std::sync::LazyLock<Arc<cel::Env>> = std::sync::LazyLock::new(|| {
    let mut env = cel::Env::stdlib();
    super::pattern::register(&mut env);
    Arc::new(env)
});

impl Default for Env {
    fn default() -> Self {
        Env {
            root: Context::with_env(CEL_ENV.clone()),
        }
    }
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Env")
    }
}

/// An event as expressions see it; built once per event.
pub struct EventVars<'e> {
    topic: CelString<'e>,
    payload: Box<dyn Val + 'e>,
    meta: CelMap<'e>,
}

impl<'e> EventVars<'e> {
    pub fn new(event: &'e Event, id: &'e str, gateway: &'e str) -> EventVars<'e> {
        let payload = match &event.payload {
            Payload::Json(v) | Payload::Cbor(v) => to_cel(v),
            Payload::Raw | Payload::Malformed(_) => match std::str::from_utf8(&event.raw) {
                Ok(s) => Box::new(CelString::from(s)) as Box<dyn Val>,
                Err(_) => Box::new(CelBytes::from(event.raw.to_vec())),
            },
        };
        let mut meta = std::collections::HashMap::new();
        let mut put = |k: &'static str, v: Box<dyn Val + 'e>| {
            meta.insert(CelMapKey::String(CelString::from(k)), v);
        };
        put("id", Box::new(CelString::from(id)));
        put(
            "received_ms",
            Box::new(CelInt::from(event.received_ms as i64)),
        );
        put("gateway", Box::new(CelString::from(gateway)));
        put("source", Box::new(CelString::from(event.source_name())));
        put("format", Box::new(CelString::from(event.payload.format())));
        put("size", Box::new(CelInt::from(event.raw.len() as i64)));
        put("client_id", Box::new(CelString::from(&*event.client_id)));
        put(
            "username",
            Box::new(CelString::from(event.username.as_deref().unwrap_or(""))),
        );
        EventVars {
            topic: CelString::from(event.topic.as_str()),
            payload,
            meta: CelMap::from(meta),
        }
    }
}

/// What one rule's expressions see: the event plus the rule's captures.
pub struct RuleVars<'a, 'e> {
    pub event: &'a EventVars<'e>,
    pub captures: &'a [(&'a str, &'a str)],
}

impl VariableResolver for RuleVars<'_, '_> {
    fn resolve<'b>(&'b self, name: &str) -> Option<CowVal<'b, 'b>> {
        match name {
            "topic" => return Some(CowVal::Borrowed(&self.event.topic)),
            "payload" => return Some(CowVal::Borrowed(self.event.payload.as_ref())),
            "meta" => return Some(CowVal::Borrowed(&self.event.meta)),
            _ => {}
        }
        if let Some((_, v)) = self.captures.iter().find(|(n, _)| *n == name) {
            return Some(CowVal::Owned(Box::new(CelString::from(*v))));
        }
        // Top-level fields of an object payload (indexing anything else by a
        // string fails, which reads as "no such variable").
        let map = self.event.payload.as_indexer()?;
        map.get(&CelString::from(name)).ok()
    }
}

/// A JSON value as a CEL value, borrowing strings. Integers stay integers
/// (`int`, or `uint` above i64), other numbers are `double`.
fn to_cel(v: &Value) -> Box<dyn Val + '_> {
    match v {
        Value::Null => Box::new(CelNull),
        Value::Bool(b) => Box::new(CelBool::from(*b)),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Box::new(CelInt::from(i))
            } else if let Some(u) = n.as_u64() {
                Box::new(CelUInt::from(u))
            } else {
                Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN)))
            }
        }
        Value::String(s) => Box::new(CelString::from(s.as_str())),
        Value::Array(a) => Box::new(CelList::from(a.iter().map(to_cel).collect::<Vec<_>>())),
        Value::Object(m) => Box::new(CelMap::from(
            m.iter()
                .map(|(k, v)| (CelMapKey::String(CelString::from(k.as_str())), to_cel(v)))
                .collect::<std::collections::HashMap<_, _>>(),
        )),
    }
}

/// A CEL result as JSON. Bytes become an array of numbers (as CBOR byte
/// strings do on the way in). (cel is built without its `chrono` feature,
/// whose time-zone database would double the binary; there are no
/// timestamp or duration values: times are `meta.received_ms` integers.)
fn to_json(v: &CelValue) -> Result<Value, String> {
    Ok(match v {
        CelValue::Null => Value::Null,
        CelValue::Bool(b) => Value::Bool(*b),
        CelValue::Int(i) => Value::Number((*i).into()),
        CelValue::UInt(u) => Value::Number((*u).into()),
        CelValue::Float(f) => match Number::from_f64(*f) {
            Some(n) => Value::Number(n),
            None => return Err(format!("gave {f}, which JSON cannot carry")),
        },
        CelValue::String(s) => Value::String(s.to_string()),
        CelValue::Bytes(b) => Value::Array(b.iter().map(|x| Value::Number((*x).into())).collect()),
        CelValue::List(l) => Value::Array(l.iter().map(to_json).collect::<Result<_, _>>()?),
        CelValue::Map(m) => {
            let mut out = Map::with_capacity(m.map.len());
            for (k, v) in m.map.iter() {
                let key = match k {
                    cel::objects::Key::String(s) => s.to_string(),
                    cel::objects::Key::Int(i) => i.to_string(),
                    cel::objects::Key::Uint(u) => u.to_string(),
                    cel::objects::Key::Bool(b) => b.to_string(),
                };
                out.insert(key, to_json(v)?);
            }
            Value::Object(out)
        }
        other => {
            return Err(format!(
                "gave a {}, which has no JSON form",
                other.type_of()
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::json;

    fn eval(
        expr: &str,
        topic: &str,
        payload: &[u8],
        captures: &[(&str, &str)],
    ) -> Result<Value, EvalError> {
        let env = Env::default();
        let event = Event::from_publish(topic.into(), Bytes::copy_from_slice(payload));
        let vars = EventVars::new(&event, "id-1", "gw-1");
        let rule = RuleVars {
            event: &vars,
            captures,
        };
        Expr::compile(expr).unwrap().eval(&env, &rule)
    }

    #[test]
    fn sees_fields_captures_topic_and_meta() {
        let p =
            br#"{"value": 31.5, "unit": "C", "n": 3, "tags": ["a", "b"], "loc": {"room": "k"}}"#;
        let c = [("site", "s1"), ("device", "t1")];
        let t = "sensors/s1/t1/temperature";
        assert_eq!(
            eval("value > 30.0 && unit == 'C'", t, p, &c),
            Ok(json!(true))
        );
        assert_eq!(eval("n > 2 && n < 3.5", t, p, &c), Ok(json!(true)));
        assert_eq!(eval("loc.room + '/' + device", t, p, &c), Ok(json!("k/t1")));
        assert_eq!(
            eval("'b' in tags && size(tags) == 2", t, p, &c),
            Ok(json!(true))
        );
        assert_eq!(
            eval("topic.startsWith('sensors/') && site == 's1'", t, p, &c),
            Ok(json!(true))
        );
        assert_eq!(eval("payload.value * 2.0", t, p, &c), Ok(json!(63.0)));
        assert_eq!(
            eval(
                "[meta.id, meta.gateway, meta.format, string(meta.size > 0)]",
                t,
                p,
                &c
            ),
            Ok(json!(["id-1", "gw-1", "json", "true"]))
        );
        assert_eq!(
            eval("has(payload.unit) && !has(payload.other)", t, p, &c),
            Ok(json!(true))
        );
    }

    #[test]
    fn cbor_payloads_look_like_json_ones() {
        let mut cbor = Vec::new();
        ciborium::into_writer(&json!({"value": 12, "ok": true}), &mut cbor).unwrap();
        assert_eq!(
            eval(
                "value + 1 == 13 && ok && meta.format == 'cbor'",
                "d/x",
                &cbor,
                &[]
            ),
            Ok(json!(true))
        );
    }

    #[test]
    fn runtime_errors_are_values_not_panics() {
        let p = br#"{"value": "warm"}"#;
        assert!(eval("missing > 1", "t", p, &[]).is_err());
        assert!(eval("value > 30.0", "t", p, &[]).is_err());
        assert!(eval("payload.a.b.c", "t", b"not json", &[]).is_err());
        assert!(eval("1 / 0", "t", b"", &[]).is_err());
        let env = Env::default();
        let event = Event::for_test("t", b"{}");
        let vars = EventVars::new(&event, "i", "g");
        let rule = RuleVars {
            event: &vars,
            captures: &[],
        };
        let e = Expr::compile("1 + 1")
            .unwrap()
            .eval_bool(&env, &rule)
            .unwrap_err();
        assert!(e.0.contains("true or false"), "{e}");
    }

    #[test]
    fn raw_payloads_are_strings_or_bytes() {
        assert_eq!(eval("payload == 'ON'", "t", b"ON", &[]), Ok(json!(true)));
        assert_eq!(eval("size(payload)", "t", &[0xff, 0x00], &[]), Ok(json!(2)));
    }

    #[test]
    fn syntax_errors_say_where() {
        let e = Expr::compile("value > ").unwrap_err();
        assert!(e.message.contains("syntax error"), "{e:?}");
        assert!(e.offset.is_some(), "{e:?}");
        assert!(Expr::compile("  ").is_err());
    }
}

#[cfg(test)]
mod edge_tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn arithmetic_and_conversion_edges_are_errors_not_panics() {
        let env = Env::default();
        let event = Event::from_publish(
            "t".into(),
            Bytes::from_static(br#"{"big": 9223372036854775807, "s": "abc", "l": [1]}"#),
        );
        let vars = EventVars::new(&event, "i", "g");
        let rule = RuleVars {
            event: &vars,
            captures: &[],
        };
        for src in [
            "big + 1",
            "-9223372036854775808 / -1",
            "big * big",
            "int('abc')",
            "s[5]",
            "l[3]",
            "double('x')",
            "timestamp('nope')",
            "duration('1x')",
            "1 % 0",
            "uint(-1)",
            "int(1e300)",
            "size(big)",
            "l.map(x, x / 0)",
            "'a' * 3",
        ] {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                Expr::compile(src).map(|e| e.eval(&env, &rule))
            }));
            assert!(r.is_ok(), "{src} panicked");
            assert!(
                matches!(r.unwrap(), Ok(Err(_))),
                "{src} should fail to evaluate"
            );
        }
    }
}

#[cfg(test)]
mod regex_tests {
    use super::*;

    #[test]
    fn matches_needs_the_regex_feature() {
        let compiled = Expr::compile("topic.matches('^sensors/[a-z]+$')");
        if cfg!(feature = "regex") {
            let env = Env::default();
            let event = Event::for_test("sensors/abc", b"{}");
            let vars = EventVars::new(&event, "i", "g");
            let rule = RuleVars {
                event: &vars,
                captures: &[],
            };
            assert_eq!(compiled.unwrap().eval_bool(&env, &rule), Ok(true));
        } else {
            let e = compiled.unwrap_err();
            assert!(e.message.contains("without regex support"), "{e:?}");
        }
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;
    use bytes::Bytes;

    /// `n` terms joined by `op`.
    fn chain(op: &str, n: usize) -> String {
        vec!["1"; n].join(op)
    }

    #[test]
    fn every_operator_chain_over_the_limit_is_refused_with_where() {
        for op in [
            "+", "-", "*", "/", "%", "==", "!=", "<", "<=", ">", ">=", " && ", " || ",
        ] {
            let over = chain(op, MAX_OPERATORS + 2);
            let e = Expr::compile(&over).unwrap_err();
            assert!(e.message.contains("256 operators"), "{op}: {}", e.message);
            assert!(e.offset.is_some(), "{op}: located");
        }
        // Member access chains and unary repetitions nest too.
        for over in [
            format!("payload{}", ".a".repeat(MAX_OPERATORS + 1)),
            format!("{}true", "!".repeat(MAX_OPERATORS + 1)),
            format!("{}1", "-".repeat(MAX_OPERATORS + 1)),
            format!("{}1", "true ? 1 : ".repeat(MAX_OPERATORS + 1)),
        ] {
            assert!(Expr::compile(&over).is_err(), "{over:.20}…");
        }
        for open in ["(", "[", "{1:"] {
            let close = match open {
                "(" => ")",
                "[" => "]",
                _ => "}",
            };
            let over = format!(
                "{}1{}",
                open.repeat(MAX_NESTING + 1),
                close.repeat(MAX_NESTING + 1)
            );
            let e = Expr::compile(&over).unwrap_err();
            assert!(e.message.contains("nested deeper"), "{open}: {}", e.message);
        }
        let long = format!("'{}' == topic", "x".repeat(MAX_EXPR_BYTES));
        assert!(Expr::compile(&long).unwrap_err().message.contains("bytes"));
    }

    #[test]
    fn operators_inside_strings_and_decimal_points_do_not_count() {
        let text = format!("topic == '{}' && value > 1.5", "+".repeat(1000));
        assert!(Expr::compile(&text).is_ok());
        let escaped = format!("topic == 'it\\'s {}'", "*".repeat(1000));
        assert!(Expr::compile(&escaped).is_ok());
    }

    #[test]
    fn whatever_passes_evaluates_within_a_small_stack() {
        // The deepest expressions the limits allow, parsed and evaluated on
        // a thread with half a tokio worker's 2 MiB stack. Measured in a
        // release build: a 192-operator `&&` chain needs more than 256 KiB,
        // 257 operators fit in 1 MiB. A debug build's frames are many times
        // larger (a 32-term sum overflows 1 MiB), so there it gets 64 MiB.
        let at_limit = [
            chain("+", MAX_OPERATORS + 1),
            chain(" && ", MAX_OPERATORS + 1).replace('1', "true"),
            format!("{}1{}", "(".repeat(MAX_NESTING), ")".repeat(MAX_NESTING)),
            format!(
                "{}1{} + {}",
                "[".repeat(MAX_NESTING),
                "]".repeat(MAX_NESTING),
                chain("+", MAX_OPERATORS - 1)
            ),
        ];
        let stack = if cfg!(debug_assertions) {
            64 << 20
        } else {
            1 << 20
        };
        std::thread::Builder::new()
            .stack_size(stack)
            .spawn(move || {
                let env = Env::default();
                let event = Event::from_publish("t".into(), Bytes::from_static(b"{}"));
                let vars = EventVars::new(&event, "i", "g");
                let rule = RuleVars {
                    event: &vars,
                    captures: &[],
                };
                for src in at_limit {
                    let expr = Expr::compile(&src).unwrap_or_else(|e| panic!("{}", e.message));
                    let _ = expr.eval(&env, &rule);
                }
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
    }
}
