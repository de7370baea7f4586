//! Contracts: any payload bytes, on the topic of every example schema, must
//! validate or fail (dead letter with a path), never panic. Uses the example
//! rules in `rules/` as shipped, so the fuzzed schemas are the real ones.
#![no_main]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::OnceLock;

use edgeferry::event::Event;
use edgeferry::rules::RuleSet;
use libfuzzer_sys::fuzz_target;

const TOPICS: [&str; 4] = [
    "sensors/yard/t1/temperature",
    "sensors/barn/h1/humidity",
    "power/m1",
    "doors/yard/gate",
];

fn rules() -> &'static RuleSet {
    static SET: OnceLock<RuleSet> = OnceLock::new();
    SET.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
        let upstreams: BTreeSet<String> = ["cloud".to_string()].into();
        RuleSet::load_dir(&dir, &upstreams).expect("the example rules compile")
    })
}

fuzz_target!(|data: &[u8]| {
    let set = rules();
    let payload = bytes::Bytes::copy_from_slice(data);
    let decoded = edgeferry::codec::decode(data);
    for topic in TOPICS {
        // Every version of every contract, directly (what `schema validate`
        // does), then the whole route (what the daemon does).
        for contract in set.contracts() {
            let _ = contract.check(topic, decoded.value());
            for version in contract.versions() {
                let _ = version.check(decoded.value());
            }
        }
        let ev = Event::from_publish(topic.to_string(), payload.clone());
        let mut state = set.new_state();
        let v = set.route(&ev, &mut state);
        if let Some(f) = &v.schema_failure {
            assert!(f.path.is_empty() || f.path.starts_with('/'), "{f:?}");
        }
    }
});
