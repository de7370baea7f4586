//! `matches()`: regular expressions compiled once, when a rule loads.
//!
//! cel's own `matches` compiles its pattern on every call: 8,231 events/s
//! with `temp$`, 122/s with a nested repetition, and `matches('(')` passed
//! `check` to fail on every event. Here a pattern must be a string literal
//! (a pattern taken from the payload would let a sensor choose what the
//! gateway compiles); every literal is compiled at load with a bounded size,
//! so an invalid or oversized one is a load error pointing at it. cel's
//! overloads are plain `fn` pointers that cannot capture state, so the
//! `matches` function looks patterns up in a process-wide table; the
//! expressions own their compiled patterns and the table only refers to
//! them, so a pattern is freed with the last rule using it (a reload, a
//! fuzzer compiling millions of expressions).

use cel::common::ast::{EntryExpr, Expr as Node, IdedExpr, LiteralValue};

use super::expr::CompileError;

/// The largest compiled program (and lazy DFA cache) of one pattern: what
/// one pattern may cost in RAM is about twice this. The regex crate's
/// default program limit (10 MiB) is sized for a desktop. A typical rule's
/// pattern compiles to a few KiB; Unicode classes are the large part
/// (`\w{20}` is about 1 MiB, `\w{50}` over 2 MiB; ASCII `[a-z0-9_]` is small).
#[cfg(feature = "regex")]
pub const MAX_COMPILED: usize = 2 * 1024 * 1024;

/// Every `matches` call in `program` must have a literal pattern that
/// compiles within [`MAX_COMPILED`]; each is compiled now. `source` is for
/// the error's offset.
pub fn prepare(program: &cel::Program, source: &str) -> Result<Patterns, CompileError> {
    let mut calls = Vec::new();
    collect(program.expression(), &mut calls);
    let mut patterns = Patterns::default();
    for (call, pattern) in calls {
        let at = program
            .source_info()
            .offset_for(pattern.map_or(call, |p| p.id))
            .map(|(start, _)| char_to_byte(source, start as usize));
        let Some(pattern) = pattern.and_then(literal) else {
            return Err(CompileError {
                message: "matches() takes a literal pattern ('...'), not a value computed per event (use startsWith, endsWith, contains or a topic capture for those)".into(),
                offset: at,
            });
        };
        let compiled = compiled::prepare(pattern).map_err(|why| CompileError {
            message: format!("matches() pattern {pattern:?}: {why}"),
            offset: at,
        })?;
        patterns.0.push(compiled);
    }
    Ok(patterns)
}

/// An expression's compiled patterns: holding them keeps them in the table.
#[derive(Debug, Clone, Default)]
pub struct Patterns(Vec<compiled::Compiled>);

/// Register `matches` (both `s.matches(re)` and `matches(s, re)`).
pub fn register(env: &mut cel::Env) {
    compiled::register(env);
}

/// The `matches` calls under `node`: (the call's id, its pattern argument).
fn collect<'a>(node: &'a IdedExpr, out: &mut Vec<(u64, Option<&'a IdedExpr>)>) {
    match &node.expr {
        Node::Call(call) => {
            if call.func_name == "matches" {
                let pattern = match &call.target {
                    Some(_) => call.args.first(),
                    None => call.args.get(1),
                };
                out.push((node.id, pattern));
            }
            if let Some(t) = &call.target {
                collect(t, out);
            }
            for a in &call.args {
                collect(a, out);
            }
        }
        Node::Comprehension(c) => {
            for e in [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ] {
                collect(e, out);
            }
        }
        Node::List(l) => l.elements.iter().for_each(|e| collect(e, out)),
        Node::Map(m) => m.entries.iter().for_each(|e| match &e.expr {
            EntryExpr::MapEntry(m) => {
                collect(&m.key, out);
                collect(&m.value, out);
            }
            EntryExpr::StructField(f) => collect(&f.value, out),
        }),
        Node::Select(s) => collect(&s.operand, out),
        Node::Struct(s) => s.entries.iter().for_each(|e| match &e.expr {
            EntryExpr::MapEntry(m) => {
                collect(&m.key, out);
                collect(&m.value, out);
            }
            EntryExpr::StructField(f) => collect(&f.value, out),
        }),
        Node::Ident(_) | Node::Literal(_) | Node::Unspecified => {}
    }
}

fn literal(node: &IdedExpr) -> Option<&str> {
    match &node.expr {
        Node::Literal(LiteralValue::String(s)) => Some(s.inner()),
        _ => None,
    }
}

/// The parser counts characters; diagnostics want bytes.
fn char_to_byte(source: &str, chars: usize) -> usize {
    source
        .char_indices()
        .nth(chars)
        .map_or(source.len(), |(i, _)| i)
}

#[cfg(feature = "regex")]
mod compiled {
    use std::collections::HashMap;
    use std::sync::{Arc, LazyLock, RwLock, Weak};

    use cel::ExecutionError;
    use cel::common::types::{CelBool, CelString};
    use regex::Regex;

    use super::MAX_COMPILED;

    pub type Compiled = Arc<Regex>;

    /// Every pattern some live expression holds, by its text.
    static TABLE: LazyLock<RwLock<HashMap<Box<str>, Weak<Regex>>>> =
        LazyLock::new(Default::default);

    /// The compiled `pattern` (compiled now unless a live expression has
    /// it), or why it cannot be.
    pub fn prepare(pattern: &str) -> Result<Compiled, String> {
        if let Some(re) = lookup(pattern) {
            return Ok(re);
        }
        let re = regex::RegexBuilder::new(pattern)
            .size_limit(MAX_COMPILED)
            .dfa_size_limit(MAX_COMPILED)
            .build()
            .map_err(|e| match e {
                regex::Error::CompiledTooBig(limit) => format!(
                    "compiles to more than {limit} bytes (a large or nested repetition, or Unicode classes such as \\w and \\p{{L}} repeated: ASCII classes like [a-z0-9_] are far smaller)"
                ),
                // "regex parse error:\n    (\n    ^\nerror: unclosed group"
                other => other
                    .to_string()
                    .lines()
                    .last()
                    .unwrap_or("not a valid regex")
                    .trim_start_matches("error: ")
                    .to_string(),
            })?;
        let re = Arc::new(re);
        let mut table = TABLE.write().unwrap_or_else(|p| p.into_inner());
        // Forget the patterns no expression holds any more, each time the
        // table doubles: amortised constant work per pattern.
        if table.len() >= 64 && table.len().is_power_of_two() {
            table.retain(|_, re| re.strong_count() > 0);
        }
        table.insert(pattern.into(), Arc::downgrade(&re));
        Ok(re)
    }

    fn lookup(pattern: &str) -> Option<Arc<Regex>> {
        TABLE
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(pattern)
            .and_then(Weak::upgrade)
    }

    /// Patterns in the table, live or not yet forgotten (for tests).
    #[cfg(test)]
    pub fn table_len() -> usize {
        TABLE.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn matches(this: &CelString<'_>, re: &CelString<'_>) -> Result<CelBool, ExecutionError> {
        match lookup(re.inner()) {
            Some(compiled) => Ok(CelBool::from(compiled.is_match(this.inner()))),
            // Only a program that skipped `prepare` gets here.
            None => Err(ExecutionError::function_error(
                "matches",
                format!("pattern {:?} was not compiled at load", re.inner()),
            )),
        }
    }

    pub fn register(env: &mut cel::Env) {
        cel::add_member_overload!(env, fn matches: (CelString, CelString) -> Result<CelBool>)
            .expect("cel is built without its own matches()");
        cel::add_overload!(env, fn matches: (CelString, CelString) -> Result<CelBool>,
            id = "matches")
        .expect("cel is built without its own matches()");
    }
}

/// The `small` build: no regex crate; `Expr::compile` refuses `matches`.
#[cfg(not(feature = "regex"))]
mod compiled {
    /// Never made: every pattern is refused.
    #[derive(Debug, Clone)]
    pub enum Compiled {}

    pub fn prepare(_pattern: &str) -> Result<Compiled, String> {
        Err("this edgeferry was built without regex support".into())
    }

    pub fn register(_env: &mut cel::Env) {}
}

#[cfg(all(test, feature = "regex"))]
mod tests {
    use super::super::expr::{Env, EventVars, Expr, RuleVars};
    use crate::event::Event;

    fn eval(src: &str, topic: &str) -> bool {
        let env = Env::default();
        let event = Event::for_test(topic, br#"{"name":"t1-temp"}"#);
        let vars = EventVars::new(&event, "i", "g");
        let rule = RuleVars {
            event: &vars,
            captures: &[],
        };
        Expr::compile(src).unwrap().eval_bool(&env, &rule).unwrap()
    }

    #[test]
    fn literal_patterns_match_in_every_position() {
        assert!(eval("topic.matches('temp$')", "a/temp"));
        assert!(!eval("topic.matches('^b/')", "a/temp"));
        assert!(eval("matches(topic, '^a/')", "a/temp"));
        assert!(eval("[topic].exists(t, t.matches('^a/t'))", "a/temp"));
        assert!(eval("name.matches('^t[0-9]+-')", "x"));
        assert!(eval("{'k': topic.matches('a')}.k", "a"));
    }

    /// The class, not one string: what the regex crate refuses to parse,
    /// and what parses but compiles too large, are load errors that point
    /// at the pattern.
    #[test]
    fn invalid_and_oversized_patterns_are_refused_at_load_with_where() {
        for (src, says) in [
            ("topic.matches('(')", "unclosed group"),
            ("topic.matches('[a-')", "unclosed character class"),
            ("topic.matches('a{2,1}')", "invalid repetition"),
            ("topic.matches('\\\\p{Nope}')", "Unicode property not found"),
            (
                "matches(topic, '*')",
                "repetition operator missing expression",
            ),
            ("topic.matches('a{100000}')", "repetition"),
            (
                "topic.matches('(\\\\w{1,100}){1,100}')",
                "compiles to more than",
            ),
            ("topic.matches('\\\\w{500}')", "compiles to more than"),
            ("[1].all(x, topic.matches('(('))", "unclosed group"),
        ] {
            let e = Expr::compile(src).unwrap_err();
            assert!(e.message.contains(says), "{src}: {}", e.message);
            let at = e.offset.expect("located");
            assert_eq!(&src[at..at + 1], "'", "{src}: points at the pattern");
        }
    }

    /// A fuzzer or a long life of reloads compiles many patterns: those no
    /// expression holds any more are forgotten, not kept forever.
    #[test]
    fn patterns_no_expression_holds_are_forgotten() {
        for i in 0..5_000 {
            let e = Expr::compile(&format!("topic.matches('^forgotten{i}$')")).unwrap();
            drop(e);
        }
        // The table also holds other tests' live patterns; never the 5,000.
        assert!(
            super::compiled::table_len() < 1_000,
            "{}",
            super::compiled::table_len()
        );
        // A pattern an expression still holds keeps working.
        let kept = Expr::compile("topic.matches('^kept$')").unwrap();
        for i in 0..500 {
            drop(Expr::compile(&format!("topic.matches('^again{i}$')")).unwrap());
        }
        let env = Env::default();
        let event = Event::for_test("kept", b"{}");
        let vars = EventVars::new(&event, "i", "g");
        let rule = RuleVars {
            event: &vars,
            captures: &[],
        };
        assert_eq!(kept.eval_bool(&env, &rule), Ok(true));
    }

    #[test]
    fn patterns_computed_per_event_are_refused() {
        for src in [
            "topic.matches(name)",
            "topic.matches('^' + name)",
            "matches(topic, payload.p)",
            "topic.matches()",
        ] {
            let e = Expr::compile(src).unwrap_err();
            assert!(
                e.message.contains("literal pattern"),
                "{src}: {}",
                e.message
            );
        }
    }
}
