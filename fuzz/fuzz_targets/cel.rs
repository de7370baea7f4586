//! Arbitrary expressions through compile and evaluate, as a rule's `when`
//! would be: anything `Expr::compile` accepts must evaluate without a panic
//! or a stack overflow (the size limits), whatever the payload.
#![no_main]

use bytes::Bytes;
use edgeferry::event::Event;
use edgeferry::rules::expr::{Env, EventVars, Expr, RuleVars};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (source, payload) = text.split_once('\n').unwrap_or((text, r#"{"value": 1.5, "unit": "C", "l": [1, 2]}"#));
    let Ok(expr) = Expr::compile(source) else {
        return;
    };
    let env = Env::default();
    let event = Event::from_publish("sensors/a/b".into(), Bytes::copy_from_slice(payload.as_bytes()));
    let vars = EventVars::new(&event, "id", "gw");
    let rule = RuleVars {
        event: &vars,
        captures: &[("site", "a")],
    };
    let _ = expr.eval(&env, &rule);
});
