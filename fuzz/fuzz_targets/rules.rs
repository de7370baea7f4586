//! Rule files: parsing and compiling any text must give rules or errors,
//! never a panic; compiled rules must route any event without panicking.
//! Input: rule file text, then a NUL, then `topic\npayload` for an event.
#![no_main]

use std::collections::BTreeSet;
use std::path::Path;

use edgeferry::event::Event;
use edgeferry::rules::RuleSet;
use libfuzzer_sys::fuzz_target;

fn upstreams() -> BTreeSet<String> {
    ["cloud".to_string()].into()
}

fuzz_target!(|data: &[u8]| {
    let (rules, event) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"sensors/a/b/temperature\n{\"value\": 31.5, \"unit\": \"C\"}"[..]),
    };
    let Ok(text) = std::str::from_utf8(rules) else {
        return;
    };
    let Ok(set) = RuleSet::from_str(Path::new("fuzz.toml"), text, &upstreams()) else {
        return;
    };
    let (topic, payload) = match event.iter().position(|b| *b == b'\n') {
        Some(i) => (&event[..i], &event[i + 1..]),
        None => (event, &b""[..]),
    };
    let topic = String::from_utf8_lossy(topic).into_owned();
    let ev = Event::from_publish(topic, bytes::Bytes::copy_from_slice(payload));
    let mut state = set.new_state();
    let _ = set.route(&ev, &mut state);
    let _ = set.route(&ev, &mut state);
    let _ = set.tick(u64::MAX, &mut state);
});
