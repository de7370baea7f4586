//! Per-event cost of the rule engine (`RuleSet::route`), with no I/O: the
//! event is already decoded, as the router gets it from ingest.
//!
//!   cargo bench --bench rules
//!
//! Two rule sets of realistic shape:
//! - 10 rules: the kind of set one gateway runs (topic templates, two CEL
//!   predicates, one `set` transform, a throttle, a drop rule);
//! - 1,000 rules: one such group of five per site for 199 sites plus five
//!   shared rules; an event matches only its own site's few rules.
//!
//! The indexed topic trie is what keeps 1,000 rules close to 10: matching
//! costs in proportion to the rules that match, not to the rules loaded.
//!
//! Contracts: the cost of one JSON Schema check for each of the example
//! rules' schemas (`rules/*.schema.json`), valid and invalid, and the
//! 10-rule set again with the temperature and humidity contracts enforced,
//! then with its cloud destinations wrapped in CloudEvents.

use std::collections::BTreeSet;
use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use edgeferry::event::Event;
use edgeferry::rules::RuleSet;

/// One site's rules; `{site}` is replaced by a literal site name, or kept as
/// a capture for the single-site set.
fn group(site: &str) -> String {
    format!(
        r#"
[[rule]]
name = "drop-debug-{site}"
match = "sensors/{site}/+/debug/#"
drop = true

[[rule]]
name = "temperature-{site}"
match = "sensors/{site}/{{device}}/temperature"
to = [{{ upstream = "cloud", topic = "plant/{site}/{{device}}/temp" }}]

[[rule]]
name = "temperature-alarm-{site}"
match = "sensors/{site}/{{device}}/temperature"
when = "unit == 'C' && value > 30.0"
throttle = {{ every = "1m" }}                       # per topic
set = {{ alert = "'high'", device = "device" }}
to = [{{ local = "alerts/{site}/{{device}}" }}]

[[rule]]
name = "humidity-{site}"
match = "sensors/{site}/{{device}}/humidity"
when = "value >= 0.0 && value <= 100.0"
to = [{{ upstream = "cloud", topic = "plant/{site}/{{device}}/humidity" }}]

[[rule]]
name = "alarms-{site}"
match = "alarms/{site}/{{device}}"
to = [{{ upstream = "cloud", topic = "plant/{site}/{{device}}/alarm", priority = "high", ttl = "24h" }}]
"#
    )
}

/// Five rules that are not per site.
const SHARED: &str = r#"
[[rule]]
name = "telemetry"
match = "devices/{device}/telemetry"
to = [{ upstream = "cloud", topic = "fleet/{device}/telemetry" }]

[[rule]]
name = "diag"
match = "diag/{device}"
to = [{ upstream = "cloud", topic = "fleet/{device}/diag", priority = "low" }]

[[rule]]
name = "power"
match = "power/{meter}"
to = [{ upstream = "cloud" }]

[[rule]]
name = "status"
match = "status/+"
to = [{ upstream = "cloud", qos = 0 }]

[[rule]]
name = "firmware"
match = "firmware/#"
drop = true
"#;

fn upstreams() -> BTreeSet<String> {
    ["cloud".to_string()].into()
}

fn events(sites: usize) -> Vec<Event> {
    let mut out = Vec::new();
    for i in 0..1000 {
        let site = format!("site{}", i % sites);
        let device = format!("d{}", i % 17);
        let (topic, payload) = match i % 4 {
            0 | 1 => (
                format!("sensors/{site}/{device}/temperature"),
                format!(
                    r#"{{"value": {}, "unit": "C", "seq": {i}}}"#,
                    20.0 + (i % 15) as f64
                ),
            ),
            2 => (
                format!("sensors/{site}/{device}/humidity"),
                format!(r#"{{"value": {}, "seq": {i}}}"#, 40 + i % 30),
            ),
            _ => (
                format!("devices/{device}/telemetry"),
                format!(r#"{{"rpm": {}, "seq": {i}}}"#, 1000 + i),
            ),
        };
        out.push(Event::from_publish(topic, Bytes::from(payload)));
    }
    out
}

/// Mean nanoseconds per `route` call over `rounds` passes of `events`.
fn measure(set: &RuleSet, events: &[Event], rounds: usize) -> (f64, usize) {
    let mut state = set.new_state();
    let mut outputs = 0;
    // Warm up caches and the throttle's key table.
    for e in events {
        black_box(set.route(e, &mut state));
    }
    let mut events = events.to_vec();
    let start = Instant::now();
    for round in 0..rounds {
        // A minute later each round, so the throttled alarm fires again
        // (its `set` and local republish are part of the cost).
        for e in &mut events {
            e.received_ms += 61_000;
        }
        for e in &events {
            let v = set.route(black_box(e), &mut state);
            outputs += v.routes.len() + v.republish.len();
        }
        black_box(round);
    }
    let n = rounds * events.len();
    (
        start.elapsed().as_nanos() as f64 / n as f64,
        outputs / rounds,
    )
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let ups = upstreams();
    // 10 rules: one site group with the site as a capture, plus the shared five.
    let ten = RuleSet::from_str(Path::new("ten.toml"), &ten_text(), &ups).expect("10 rules");
    let thousand: String = (0..199)
        .map(|s| group(&format!("site{s}")))
        .collect::<String>()
        + SHARED;
    let thousand =
        RuleSet::from_str(Path::new("thousand.toml"), &thousand, &ups).expect("1000 rules");
    assert_eq!(ten.len(), 10);
    assert_eq!(thousand.len(), 1000);
    let evs = events(100);
    let (ns10, out10) = measure(&ten, &evs, rounds);
    let (ns1000, out1000) = measure(&thousand, &evs, rounds);
    assert_eq!(
        out10, out1000,
        "both sets route the same events the same way"
    );
    let dedupe = dedupe_full_table(&ups);
    println!(
        "rules: 10 rules {:.2} µs/event, 1000 rules {:.2} µs/event ({:.2}x); {} events x {rounds} rounds, {} outputs per round (routes and local alerts)",
        ns10 / 1e3,
        ns1000 / 1e3,
        ns1000 / ns10,
        evs.len(),
        out10
    );
    println!(
        "rules: dedupe on a unique message id, 10,000-key table kept full: {:.2} µs/event",
        dedupe / 1e3
    );
    for pattern in ["temp$", r"^sensors/(\w{1,8}/){1,3}temp"] {
        let (at_load, per_call) = matches_cost(&ups, pattern);
        println!(
            "rules: matches('{pattern}'): {:.2} µs/event compiled at load; {:.2} µs/event compiling per call (what cel's own matches() did)",
            at_load / 1e3,
            per_call / 1e3
        );
    }
    contracts(&ups, &ten_text(), &evs, rounds, ns10);
    for n in [2_500, 10_000, 40_000] {
        let secs = load_time(&ups, n);
        println!("rules: loading {n} rules from one file: {secs:.2} s");
    }
}

/// 10 rules: one site group with the site as a capture, plus the shared five.
fn ten_text() -> String {
    format!("{}{SHARED}", group("{site}").replace("-{site}\"", "\""))
}

/// What contracts cost: one check per example schema, then whole routes.
fn contracts(ups: &BTreeSet<String>, ten: &str, evs: &[Event], rounds: usize, bare_ns: f64) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let examples = RuleSet::load_dir(&repo, ups).expect("the example rules load");
    let samples = [
        (
            "temperature",
            "sensors/yard/t1/temperature",
            r#"{"value": 21.5, "unit": "C", "seq": 7}"#,
        ),
        (
            "temperature",
            "sensors/yard/t1/temperature",
            r#"{"value": "hot", "unit": "C"}"#,
        ),
        (
            "humidity",
            "sensors/barn/h1/humidity",
            r#"{"value": 61.5, "seq": 7}"#,
        ),
        ("power", "power/m1", r#"{"watts": 1520.5, "volts": 229.8}"#),
        (
            "door",
            "doors/yard/gate",
            r#"{"v": 1, "state": "open", "battery": 80}"#,
        ),
        (
            "door",
            "doors/yard/gate",
            r#"{"v": 2, "open": true, "battery_pct": 80}"#,
        ),
        ("door", "doors/yard/gate", r#"{"v": 3, "open": true}"#),
    ];
    for (name, topic, payload) in samples {
        let c = examples.contract(name).expect("declared");
        let value: serde_json::Value = serde_json::from_str(payload).unwrap();
        let n = 200_000;
        let start = Instant::now();
        let mut kept = 0;
        for _ in 0..n {
            kept += usize::from(black_box(c.check(black_box(topic), Some(&value))).is_ok());
        }
        let ns = start.elapsed().as_nanos() as f64 / n as f64;
        let verdict = if kept == n { "valid" } else { "invalid" };
        println!(
            "rules: schema {name:<11} {verdict:<7} {:.2} µs/check  {payload}",
            ns / 1e3
        );
    }
    let table = |name: &str, file: &str| {
        format!(
            "[[schema]]\nname = \"{name}\"\nmatch = \"sensors/+/+/{name}\"\nfile = \"{}\"\nenforce = true\n\n",
            repo.join(file).display()
        )
    };
    let checked = format!(
        "{}{}{ten}",
        table("temperature", "temperature.schema.json"),
        table("humidity", "humidity.schema.json")
    );
    let set = RuleSet::from_str(Path::new("checked.toml"), &checked, ups).expect("with schemas");
    let (ns, _) = measure(&set, evs, rounds);
    println!(
        "rules: 10 rules with the temperature and humidity contracts enforced: {:.2} µs/event ({:+.2} µs over none; 3 of 4 events checked)",
        ns / 1e3,
        (ns - bare_ns) / 1e3
    );
    let wrapped = checked.replace(
        "upstream = \"cloud\", topic",
        "upstream = \"cloud\", envelope = \"cloudevents\", topic",
    );
    let set = RuleSet::from_str(Path::new("wrapped.toml"), &wrapped, ups).expect("with envelopes");
    let (ns_ce, _) = measure(&set, evs, rounds);
    println!(
        "rules: ... and every cloud destination in a CloudEvent: {:.2} µs/event ({:+.2} µs over bare)",
        ns_ce / 1e3,
        (ns_ce - ns) / 1e3
    );
}

/// Seconds to load `n` distinct rules from one file (as `check`, a reload
/// and the start do): near-linear since the per-rule line lookup stopped
/// scanning the file from the top.
fn load_time(ups: &BTreeSet<String>, n: usize) -> f64 {
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            "[[rule]]\nname = \"r{i}\"\nmatch = \"sensors/s{i}/{{device}}/temperature\"\nwhen = \"value > {i}.0\"\nto = [{{ upstream = \"cloud\", topic = \"plant/{i}/{{device}}\" }}]\n\n"
        ));
    }
    let start = Instant::now();
    let set = RuleSet::from_str(Path::new("many.toml"), &text, ups).expect("rules load");
    assert_eq!(set.len(), n);
    start.elapsed().as_secs_f64()
}

/// A dedupe on message ids that are all distinct: the key table fills up
/// (10,000 keys by default) and stays full, so every event is a new key
/// that needs room.
fn dedupe_full_table(ups: &BTreeSet<String>) -> f64 {
    let set = RuleSet::from_str(
        Path::new("dedupe.toml"),
        r#"
[[rule]]
name = "dedupe"
match = "msgs/{device}"
dedupe = { key = "msg_id", within = "5m" }
to = [{ upstream = "cloud" }]
"#,
        ups,
    )
    .expect("dedupe rule");
    let events: Vec<Event> = (0..100_000)
        .map(|i| {
            Event::from_publish(
                format!("msgs/d{}", i % 10),
                Bytes::from(format!(r#"{{"msg_id": "m{i}", "v": 1}}"#)),
            )
        })
        .collect();
    let mut state = set.new_state();
    for e in &events[..20_000] {
        black_box(set.route(e, &mut state));
    }
    let start = Instant::now();
    for e in &events[20_000..] {
        black_box(set.route(black_box(e), &mut state));
    }
    start.elapsed().as_nanos() as f64 / 80_000.0
}

/// Nanoseconds per event of a rule whose `when` is `topic.matches(pattern)`
/// (the pattern compiled once, at load), and of compiling the pattern for
/// each event as cel 0.15's `matches()` did (`Regex::new` + `is_match`).
fn matches_cost(ups: &BTreeSet<String>, pattern: &str) -> (f64, f64) {
    let text = format!(
        "[[rule]]\nname = \"re\"\nmatch = \"sensors/#\"\nwhen = \"topic.matches('{}')\"\nto = [{{ upstream = \"cloud\" }}]\n",
        pattern.replace('\\', "\\\\\\\\")
    );
    let set = RuleSet::from_str(Path::new("re.toml"), &text, ups).expect("matches rule");
    let events = events(100);
    let mut state = set.new_state();
    let rounds = 200;
    let start = Instant::now();
    for _ in 0..rounds {
        for e in &events {
            black_box(set.route(black_box(e), &mut state));
        }
    }
    let at_load = start.elapsed().as_nanos() as f64 / (rounds * events.len()) as f64;
    let start = Instant::now();
    let calls = 2_000;
    for e in events.iter().cycle().take(calls) {
        let re = regex::Regex::new(black_box(pattern)).expect("valid");
        black_box(re.is_match(&e.topic));
    }
    (at_load, start.elapsed().as_nanos() as f64 / calls as f64)
}
