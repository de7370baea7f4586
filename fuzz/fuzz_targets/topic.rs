//! Topic patterns from rule files and MQTT topics from sensors: parsing,
//! captures, the index and filter overlap must never panic, and the index
//! must agree with the pattern.
#![no_main]

use edgeferry::topic::{Pattern, PatternIndex, filters_overlap};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (pattern, topic) = text.split_once('\n').unwrap_or((text, "a/b"));
    let _ = filters_overlap(pattern, topic);
    let Ok(p) = Pattern::parse(pattern) else {
        return;
    };
    let captured = p.captures(topic);
    let mut index = PatternIndex::default();
    index.insert(&p, 0);
    let indexed = index.matches(topic);
    assert_eq!(
        captured.is_some(),
        indexed == [0],
        "pattern {pattern:?} and its index disagree on {topic:?}"
    );
});
