use super::*;
use crate::event::Event;
use serde_json::json;

fn upstreams() -> std::collections::BTreeSet<String> {
    ["cloud".to_string()].into()
}

fn load(text: &str) -> Result<RuleSet, Diagnostics> {
    RuleSet::from_str(Path::new("r.toml"), text, &upstreams())
}

fn route(set: &RuleSet, topic: &str, payload: &'static [u8]) -> Verdict {
    set.route(&Event::for_test(topic, payload), &mut set.new_state())
}

fn json_of(b: &Bytes) -> Value {
    serde_json::from_slice(b).unwrap()
}

#[test]
fn fans_out_in_order_until_stop() {
    let set = load(
        r##"
[[rule]]
name = "a"
match = "sensors/{site}/{device}/temperature"
to = [{ upstream = "cloud", topic = "plant/{site}/{device}/temp" }]

[[rule]]
name = "b"
match = "sensors/#"
to = [{ upstream = "cloud", qos = 0 }]
stop = true

[[rule]]
name = "c"
match = "sensors/+/+/temperature"
to = [{ upstream = "cloud", topic = "never" }]
"##,
    )
    .unwrap();
    let v = route(&set, "sensors/s1/t1/temperature", b"{}");
    assert_eq!(v.matched, 2);
    let topics: Vec<&str> = v.routes.iter().map(|r| r.topic.as_str()).collect();
    assert_eq!(topics, ["plant/s1/t1/temp", "sensors/s1/t1/temperature"]);
    assert_eq!(v.routes[1].qos, 0);
    assert_eq!(route(&set, "other", b""), Verdict::default());
}

#[test]
fn drop_rule_ends_evaluation() {
    let set = load(
        r##"
[[rule]]
name = "quiet"
match = "debug/#"
drop = true

[[rule]]
name = "all"
match = "#"
to = [{ upstream = "cloud" }]
"##,
    )
    .unwrap();
    let v = route(&set, "debug/x", b"");
    assert_eq!(v.dropped_by.as_deref(), Some("quiet"));
    assert!(v.routes.is_empty());
    assert_eq!(route(&set, "a", b"").routes.len(), 1);
}

#[test]
fn when_filters_and_errors_do_not_match() {
    let set = load(
        r##"
[[rule]]
name = "hot"
match = "sensors/{site}/{device}/temperature"
when = "value > 30.0 && unit == 'C' && site != 'lab'"
to = [{ upstream = "cloud" }]
"##,
    )
    .unwrap();
    let t = "sensors/a/t1/temperature";
    assert_eq!(
        route(&set, t, br#"{"value": 31.5, "unit": "C"}"#)
            .routes
            .len(),
        1
    );
    assert_eq!(
        route(&set, t, br#"{"value": 31, "unit": "C"}"#)
            .routes
            .len(),
        1,
        "ints compare with doubles"
    );
    assert_eq!(
        route(&set, t, br#"{"value": 20.0, "unit": "C"}"#).matched,
        0
    );
    let lab = route(
        &set,
        "sensors/lab/t1/temperature",
        br#"{"value": 40.0, "unit": "C"}"#,
    );
    assert_eq!(lab.matched, 0);
    for bad in [
        &br#"{"unit": "C"}"#[..],
        br#"{"value": "hot", "unit": "C"}"#,
        b"",
        b"\xff\xfe",
        b"[1,2]",
    ] {
        let v = set.route(
            &Event::from_publish(t.into(), Bytes::copy_from_slice(bad)),
            &mut set.new_state(),
        );
        assert_eq!(v.matched, 0, "{bad:?}");
        assert_eq!(v.errors.len(), 1, "{bad:?}");
        assert!(
            v.dead_letter.as_deref().unwrap().contains("rule \"hot\""),
            "{v:?}"
        );
    }
}

#[test]
fn malformed_payloads_are_dead_lettered_not_routed() {
    let set =
        load("[[rule]]\nname = \"all\"\nmatch = \"#\"\nto = [{ upstream = \"cloud\" }]\n").unwrap();
    let v = route(&set, "a", b"{\"value\": 1");
    assert!(v.routes.is_empty());
    assert!(v.dead_letter.unwrap().contains("malformed JSON"));
    let deep: &'static [u8] = Box::leak(vec![b'['; 100_000].into_boxed_slice());
    assert!(route(&set, "a", deep).dead_letter.is_some());
}

#[test]
fn transforms_and_encodings_apply_per_destination() {
    let set = load(
        r##"
[[rule]]
name = "shape"
match = "devices/{device}/telemetry"
set = { device = "device", gw = "meta.gateway", f = "temp * 9.0 / 5.0 + 32.0" }
drop_fields = ["debug"]
rename = { temp = "celsius" }
to = [
  { upstream = "cloud", topic = "fleet/{device}/{payload.kind}", encode = "json", id_field = "_id" },
  { upstream = "cloud", topic = "raw/{device}", encode = "raw" },
  { local = "local/{device}" },
]
"##,
    )
    .unwrap();
    let mut cbor = Vec::new();
    ciborium::into_writer(
        &json!({"temp": 20.0, "debug": [1], "kind": "env"}),
        &mut cbor,
    )
    .unwrap();
    let cbor: &'static [u8] = Box::leak(cbor.into_boxed_slice());
    let event = Event::for_test("devices/d7/telemetry", cbor);
    let v = set.route(&event, &mut set.new_state());
    assert!(v.errors.is_empty(), "{:?}", v.errors);
    assert_eq!(v.routes.len(), 2);
    assert_eq!(v.routes[0].topic, "fleet/d7/env");
    assert_eq!(
        json_of(&v.routes[0].payload),
        json!({"celsius": 20.0, "kind": "env", "device": "d7", "gw": "", "f": 68.0, "_id": event.id.to_string()})
    );
    assert_eq!(
        &v.routes[1].payload[..],
        cbor,
        "raw is the bytes as received"
    );
    assert_eq!(v.republish.len(), 1);
    assert_eq!(v.republish[0].topic, "local/d7");
    assert_eq!(
        crate::codec::decode(&v.republish[0].payload)
            .value()
            .unwrap()["celsius"],
        json!(20.0),
        "no encode: the input's own format (CBOR)"
    );
    assert!(matches!(
        crate::codec::decode(&v.republish[0].payload),
        Payload::Cbor(_)
    ));
    assert_eq!(
        v.republish[0].origin,
        Origin {
            rule: "shape".into(),
            hops: 1
        }
    );
}

#[test]
fn untouched_payloads_keep_their_bytes() {
    let set =
        load("[[rule]]\nname = \"all\"\nmatch = \"#\"\nto = [{ upstream = \"cloud\" }]\n").unwrap();
    let raw: &'static [u8] = b"{ \"v\" :  1 }";
    assert_eq!(&route(&set, "a", raw).routes[0].payload[..], raw);
    assert_eq!(
        &route(&set, "a", b"\x00\x01").routes[0].payload[..],
        b"\x00\x01"
    );
}

#[test]
fn republished_events_skip_their_rule_and_loops_are_bounded() {
    let set = load(
        r##"
[[rule]]
name = "a"
match = "ping/#"
to = [{ local = "pong/x" }]

[[rule]]
name = "b"
match = "pong/#"
to = [{ local = "ping/x" }]
"##,
    )
    .unwrap();
    let mut event = Event::for_test("ping/x", b"1");
    let mut hops = 0;
    loop {
        let v = set.route(&event, &mut set.new_state());
        if v.republish.is_empty() {
            assert_eq!(v.loop_dropped, 1);
            break;
        }
        assert_eq!(v.republish.len(), 1, "the producing rule is skipped");
        let r = &v.republish[0];
        event = Event::for_test(
            if r.topic == "ping/x" {
                "ping/x"
            } else {
                "pong/x"
            },
            b"1",
        );
        event.origin = Some(r.origin.clone());
        hops += 1;
    }
    assert_eq!(hops, MAX_HOPS as usize);
}

#[test]
fn throttle_state_survives_an_unchanged_reload() {
    let text = r##"
[[rule]]
name = "t"
match = "s/{device}"
throttle = { key = "device", every = "10s" }
to = [{ upstream = "cloud" }]
"##;
    let old = load(text).unwrap();
    let mut state = old.new_state();
    let at = |set: &RuleSet, state: &mut State, ms: u64, topic: &str| {
        let mut e = Event::for_test("x", b"{}");
        e.topic = topic.into();
        e.received_ms = ms;
        set.route(&e, state).routes.len()
    };
    assert_eq!(at(&old, &mut state, 1_000, "s/a"), 1);
    assert_eq!(at(&old, &mut state, 2_000, "s/a"), 0);
    assert_eq!(at(&old, &mut state, 2_000, "s/b"), 1);
    let same = load(text).unwrap();
    assert!(same.changes_from(&old).is_empty());
    let (mut state, _) = same.carry_state(&old, state);
    assert_eq!(at(&same, &mut state, 3_000, "s/a"), 0, "state kept");
    let changed = load(&text.replace("10s", "20s")).unwrap();
    assert_eq!(changed.changes_from(&same).changed, ["t"]);
    let (mut state, flushed) = changed.carry_state(&same, state);
    assert_eq!(flushed, Verdict::default());
    assert_eq!(at(&changed, &mut state, 4_000, "s/a"), 1, "state reset");
}

#[test]
fn windows_emit_aggregates_through_transforms_and_ticks() {
    let set = load(
        r##"
[[rule]]
name = "w"
match = "s/{device}/t"
window = { key = "device", every = "1m", fields = ["v"], aggregates = ["count", "min", "max", "avg"] }
set = { device = "device" }
to = [{ upstream = "cloud", topic = "agg/{device}" }]
"##,
    )
    .unwrap();
    let mut state = set.new_state();
    let t0 = testing::T0_MS;
    for (i, v) in [1.0, 2.0, 6.0].iter().enumerate() {
        let mut e = Event::from_publish("s/d1/t".into(), Bytes::from(json!({"v": v}).to_string()));
        e.received_ms = t0 + i as u64 * 1000;
        let verdict = set.route(&e, &mut state);
        assert_eq!(verdict.absorbed, 1);
        assert!(verdict.routes.is_empty());
    }
    assert_eq!(set.next_deadline(&state), Some(t0 + 60_000));
    assert!(set.tick(t0 + 59_999, &mut state).routes.is_empty());
    let v = set.tick(t0 + 60_000, &mut state);
    assert_eq!(v.windows, 1);
    assert_eq!(v.routes[0].topic, "agg/d1");
    let p = json_of(&v.routes[0].payload);
    assert_eq!(p["count"], json!(3));
    assert_eq!(p["device"], json!("d1"));
    assert_eq!(p["v"]["min"], json!(1.0));
    assert_eq!(p["v"]["max"], json!(6.0));
    assert_eq!(p["v"]["avg"], json!(3.0));
    assert_eq!(v.routes[0].received_ms, t0 + 60_000);
}

/// `text`'s rules, with unmatched events sent to the cloud on "unrouted".
fn with_unmatched_to_unrouted(text: &str) -> RuleSet {
    let mut set = load(text).unwrap();
    let spec: DestinationSpec =
        toml::from_str("upstream = \"cloud\"\ntopic = \"unrouted\"\n").unwrap();
    set.configure(
        &Settings {
            unmatched: Some(spec),
            ..Default::default()
        },
        &upstreams(),
    )
    .unwrap();
    set
}

#[test]
fn unmatched_policy_routes_what_no_rule_takes() {
    let set = with_unmatched_to_unrouted(
        "[[rule]]\nname = \"a\"\nmatch = \"a\"\nto = [{ upstream = \"cloud\" }]\n",
    );
    let v = route(&set, "b/c", b"1");
    assert!(v.unmatched_routed);
    assert_eq!(v.routes[0].topic, "unrouted");
    assert!(!route(&set, "a", b"1").unmatched_routed);
    // Our own republishes are not unmatched sensor data.
    let mut ours = Event::for_test("b/c", b"1");
    ours.origin = Some(Origin {
        rule: "x".into(),
        hops: 1,
    });
    assert!(!set.route(&ours, &mut set.new_state()).unmatched_routed);
}

#[test]
fn an_event_whose_only_rule_failed_is_unmatched_and_dead_lettered() {
    let set = with_unmatched_to_unrouted(
        "[[rule]]\nname = \"a\"\nmatch = \"a\"\nwhen = \"v > 1\"\nto = [{ upstream = \"cloud\" }]\n",
    );
    let v = route(&set, "a", b"{}");
    assert_eq!(v.matched, 0);
    assert!(v.unmatched_routed);
    assert!(v.dead_letter.is_some());
}

#[test]
fn a_changed_window_rule_sends_its_open_windows_on_reload() {
    let text = "[[rule]]\nname = \"w\"\nmatch = \"p/{m}\"\nwindow = { key = \"m\", every = \"1m\" }\nto = [{ upstream = \"cloud\" }]\n";
    let old = load(text).unwrap();
    let mut state = old.new_state();
    for i in 0..5 {
        let mut e = Event::for_test("p/m1", b"{}");
        e.received_ms = testing::T0_MS + i * 1000;
        assert_eq!(old.route(&e, &mut state).absorbed, 1);
    }
    let new = load(&text.replace("1m", "2m")).unwrap();
    let (state, flushed) = new.carry_state(&old, state);
    assert_eq!(flushed.windows, 1);
    assert_eq!(json_of(&flushed.routes[0].payload)["count"], json!(5));
    assert_eq!(state.keys(), 0);
}

#[test]
fn every_error_in_a_file_is_reported_with_its_line() {
    let text = r##"[[rule]]
name = "bad-pattern"
match = "a/#/b"
to = [{ upstream = "cloud" }]

[[rule]]
name = "bad-upstream"
match = "a/{x}"
to = [{ upstream = "nowhere", topic = "b/{y}" }]

[[rule]]
name = "typo"
mtch = "a"

[[rule]]
name = "bad-cel"
match = "a"
when = "value > > 3"
to = [{ local = "x", qos = 3 }]

[[rule]]
name = "bad-shape"
match = "a/{topic}"
deadband = { field = "v" }
throttle = { every = "1s" }
to = [{ upstream = "cloud", encode = "raw", id_field = "_id" }]
"##;
    let Diagnostics(errs) = load(text).unwrap_err();
    let lines: Vec<usize> = errs.iter().map(|d| d.line).collect();
    assert_eq!(lines, [3, 9, 9, 13, 18, 19, 23, 24, 24, 26], "{errs:#?}");
    let text_of = |i: usize| errs[i].to_string();
    assert!(
        text_of(1).contains("\"nowhere\" is not configured"),
        "{}",
        text_of(1)
    );
    assert!(text_of(2).contains("{y}"), "{}", text_of(2));
    assert!(text_of(3).contains("mtch"), "{}", text_of(3));
    assert!(
        text_of(4).contains("rule \"bad-cel\": CEL syntax error"),
        "{}",
        text_of(4)
    );
    assert!(
        errs[4].column > 8,
        "points into the expression: {:?}",
        errs[4]
    );
    assert!(text_of(5).contains("qos"), "{}", text_of(5));
    assert!(text_of(6).contains("{topic}"), "{}", text_of(6));
}

#[test]
fn duplicate_rule_names_are_refused() {
    let Diagnostics(errs) = load(
        "[[rule]]\nname = \"a\"\nmatch = \"a\"\ndrop = true\n\n[[rule]]\nname = \"a\"\nmatch = \"b\"\ndrop = true\n",
    )
    .unwrap_err();
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].line, 6);
    assert!(
        errs[0].message.contains("used twice (first at r.toml:1)"),
        "{}",
        errs[0]
    );
}

#[test]
fn syntax_errors_are_located() {
    let Diagnostics(errs) = load("[[rule]]\nname = \"x\nmatch = 1\n").unwrap_err();
    assert_eq!(errs[0].line, 2, "{errs:#?}");
}

#[test]
fn schema_errors_name_the_rule_and_broken_rules_still_count_for_duplicates() {
    let Diagnostics(errs) = load(
        "[[rule]]\nname = \"a\"\nmatch = \"a\"\nthottle = { every = \"1s\" }\ndrop = true\n\n[[rule]]\nname = \"a\"\nmatch = \"b\"\ndrop = true\n",
    )
    .unwrap_err();
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0]
            .message
            .starts_with("rule \"a\": unknown field `thottle`"),
        "{}",
        errs[0]
    );
    assert_eq!(errs[0].line, 4);
    assert!(
        errs[1].message.contains("used twice (first at r.toml:1)"),
        "{}",
        errs[1]
    );
}

#[test]
fn a_traced_route_says_what_each_matching_rule_did_and_an_untraced_one_records_nothing() {
    let set = load(
        r##"
[[rule]]
name = "cold-only"
match = "sensors/{site}/{device}/temperature"
when = "value < 0.0"
to = [{ upstream = "cloud" }]

[[rule]]
name = "alarm"
match = "sensors/{site}/{device}/temperature"
throttle = { key = "device", every = "1m" }
to = [{ local = "alerts/{device}" }]

[[rule]]
name = "broken"
match = "sensors/#"
when = "payload.missing.deeper > 1"
to = [{ upstream = "cloud" }]

[[rule]]
name = "forward"
match = "sensors/#"
to = [{ upstream = "cloud" }, { upstream = "cloud", topic = "copy" }]
stop = true

[[rule]]
name = "never-tried"
match = "sensors/#"
drop = true
"##,
    )
    .unwrap();
    let mut state = set.new_state();
    let event = Event::for_test("sensors/yard/t1/temperature", br#"{"value": 21.5}"#);
    let first = set.route_traced(&event, &mut state);
    let second = set.route_traced(&event, &mut state);
    let steps = |v: &Verdict| -> Vec<(String, Step)> {
        let trace = v.trace.as_ref().expect("traced");
        trace.iter().map(|(r, s)| (r.to_string(), *s)).collect()
    };
    let applied = |outputs, stop| Step::Applied { outputs, stop };
    assert_eq!(
        steps(&first),
        [
            ("cold-only".to_string(), Step::WhenFalse),
            ("alarm".to_string(), applied(1, false)),
            ("broken".to_string(), Step::Failed),
            ("forward".to_string(), applied(2, true)),
        ]
    );
    assert_eq!(
        steps(&second)[1],
        ("alarm".to_string(), Step::Held(DropReason::Throttled))
    );
    // The trace changes nothing else, and costs nothing when not asked for.
    let plain = set.route(&event, &mut set.new_state());
    assert!(plain.trace.is_none());
    assert_eq!(
        Verdict {
            trace: None,
            ..first
        },
        plain
    );
    let other = set.route_traced(&Event::for_test("sensors/x", b"{}"), &mut state);
    assert_eq!(
        steps(&other),
        [
            ("broken".to_string(), Step::Failed),
            ("forward".to_string(), applied(2, true)),
        ]
    );
}

#[test]
fn a_traced_route_shows_drops_and_windows() {
    let set = load(
        r##"
[[rule]]
name = "quiet"
match = "debug/#"
drop = true

[[rule]]
name = "per-minute"
match = "power/{meter}"
window = { key = "meter", every = "1m", fields = ["value"], aggregates = ["sum"] }
to = [{ upstream = "cloud" }]
"##,
    )
    .unwrap();
    let mut state = set.new_state();
    let v = set.route_traced(&Event::for_test("debug/x", b"{}"), &mut state);
    assert_eq!(v.trace.unwrap(), [(Arc::from("quiet"), Step::Dropped)]);
    let v = set.route_traced(
        &Event::for_test("power/m1", br#"{"value": 2.0}"#),
        &mut state,
    );
    assert_eq!(
        v.trace.unwrap(),
        [(Arc::from("per-minute"), Step::Absorbed)]
    );
}

/// A downlink event: what came down `upstream`'s subscriptions.
fn from_upstream(topic: &str, payload: &'static [u8], upstream: &str) -> Event {
    let mut e = Event::for_test(topic, payload);
    e.source = Some(upstream.into());
    e
}

#[test]
fn a_rule_serves_local_events_unless_its_from_names_an_upstream() {
    let set = load(
        r##"
[[rule]]
name = "sensors"
match = "#"
to = [{ upstream = "cloud" }]

[[rule]]
name = "commands"
from = "cloud"
match = "gw/+/cmd/{device}"
set = { device = "device", via = "meta.source" }
to = [{ local = "devices/{device}/set", qos = 1, retain = true }]

[[rule]]
name = "both"
from = ["local", "cloud"]
match = "gw/+/cmd/#"
to = [{ local = "audit" }]
"##,
    )
    .unwrap();
    let cmd = from_upstream("gw/g1/cmd/relay", b"{\"on\":true}", "cloud");
    let v = set.route(&cmd, &mut set.new_state());
    assert!(
        v.routes.is_empty(),
        "a rule without `from` never sees a command: {v:?}"
    );
    assert_eq!(v.republish.len(), 2);
    let r = &v.republish[0];
    assert_eq!(
        (r.topic.as_str(), r.qos, r.retain),
        ("devices/relay/set", 1, true)
    );
    assert_eq!(
        json_of(&r.payload),
        json!({"on": true, "device": "relay", "via": "cloud"})
    );
    assert_eq!((v.republish[1].qos, v.republish[1].retain), (0, false));

    let local = route(&set, "gw/g1/cmd/relay", b"{}");
    assert_eq!(
        local.routes.len(),
        1,
        "local events still reach the rule without `from`"
    );
    assert_eq!(
        local.republish.len(),
        1,
        "and the rule that names local, not the downlink one"
    );
}

#[test]
fn from_and_local_delivery_are_checked_with_their_line() {
    let Diagnostics(errs) = load(
        r##"[[rule]]
name = "a"
from = "clod"
match = "x"
to = [{ local = "y", qos = 3 }]

[[rule]]
name = "b"
from = ["local", "nowhere"]
match = "x"
to = [{ upstream = "cloud", retain = true }]

[[rule]]
name = "c"
from = []
match = "x"
drop = true
"##,
    )
    .unwrap_err();
    let got: Vec<(usize, &str)> = errs.iter().map(|d| (d.line, d.message.as_str())).collect();
    assert_eq!(got.len(), 5, "{got:#?}");
    assert_eq!(got[0].0, 3);
    assert!(
        got[0].1.contains(
            "from \"clod\" is neither \"local\" nor a configured upstream (configured: cloud)"
        ),
        "{}",
        got[0].1
    );
    assert_eq!(got[1].0, 5);
    assert!(got[1].1.contains("qos 3 does not exist"), "{}", got[1].1);
    assert_eq!(got[2].0, 9);
    assert!(got[2].1.contains("\"nowhere\""), "{}", got[2].1);
    assert_eq!(got[3].0, 11);
    assert!(
        got[3].1.contains("`retain` applies to a local destination"),
        "{}",
        got[3].1
    );
    assert_eq!(got[4].0, 15);
    assert!(
        got[4].1.contains("from = [] matches nothing"),
        "{}",
        got[4].1
    );
}

#[test]
fn a_downlink_event_no_rule_takes_follows_its_own_unmatched_policy() {
    let text = "[[rule]]\nname = \"a\"\nmatch = \"a\"\nto = [{ upstream = \"cloud\" }]\n";
    let mut set = load(text).unwrap();
    let keep: DestinationSpec = toml::from_str("local = \"unhandled/commands\"\n").unwrap();
    set.configure(
        &Settings {
            unmatched_downlink: Some(keep),
            ..Default::default()
        },
        &upstreams(),
    )
    .unwrap();
    let v = set.route(&from_upstream("gw/x", b"1", "cloud"), &mut set.new_state());
    assert!(v.unmatched_routed);
    assert_eq!(v.republish[0].topic, "unhandled/commands");
    let v = set.route(&from_upstream("a", b"1", "cloud"), &mut set.new_state());
    assert!(
        v.routes.is_empty(),
        "a local rule does not take a command on its topic"
    );
    let v = route(&set, "nothing", b"1");
    assert!(
        !v.unmatched_routed && v.republish.is_empty(),
        "local events keep `unmatched` (drop)"
    );
}

#[test]
fn the_digest_names_the_files_and_their_text() {
    let a = load("[[rule]]\nname = \"a\"\nmatch = \"a\"\ndrop = true\n").unwrap();
    let same = load("[[rule]]\nname = \"a\"\nmatch = \"a\"\ndrop = true\n").unwrap();
    let other = load("[[rule]]\nname = \"b\"\nmatch = \"a\"\ndrop = true\n").unwrap();
    assert_eq!(a.digest(), same.digest());
    assert_ne!(a.digest(), other.digest());
    assert_eq!(a.digest().len(), 16);
}

#[test]
fn a_window_of_a_downlink_rule_stays_a_downlink_event() {
    let text = "[[rule]]\nname = \"w\"\nfrom = \"cloud\"\nmatch = \"c/{m}\"\nwindow = { key = \"m\", every = \"1m\" }\nto = [{ local = \"agg/{m}\" }]\n";
    let set = load(text).unwrap();
    let mut state = set.new_state();
    let mut e = from_upstream("c/x", b"{}", "cloud");
    e.received_ms = testing::T0_MS;
    assert_eq!(set.route(&e, &mut state).absorbed, 1);
    let v = set.tick(testing::T0_MS + 120_000, &mut state);
    assert_eq!(v.republish.len(), 1);
    assert_eq!(v.republish[0].source.as_deref(), Some("cloud"));
    // A command's republish keeps its source too.
    let cmd =
        load("[[rule]]\nname = \"c\"\nfrom = \"cloud\"\nmatch = \"c\"\nto = [{ local = \"d\" }]\n")
            .unwrap();
    let v = cmd.route(&from_upstream("c", b"1", "cloud"), &mut cmd.new_state());
    assert_eq!(v.republish[0].source.as_deref(), Some("cloud"));
}

const TEMPERATURE_SCHEMA: &str = r#"{
  "type": "object",
  "required": ["value", "unit"],
  "properties": { "value": { "type": "number" }, "unit": { "enum": ["C", "F"] } },
  "additionalProperties": false
}"#;

/// A rule file in a temp dir next to `temperature.json`.
fn with_schema(rules: &str) -> (tempfile::TempDir, Result<RuleSet, Diagnostics>) {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("temperature.json"), TEMPERATURE_SCHEMA).unwrap();
    let file = d.path().join("r.toml");
    std::fs::write(&file, rules).unwrap();
    let set = RuleSet::load_files(&[file], &upstreams());
    (d, set)
}

#[test]
fn an_enforced_schema_stops_a_broken_event_with_the_field_and_why() {
    let (_d, set) = with_schema(
        r#"[[schema]]
name = "temperature"
match = "sensors/+/temperature"
file = "temperature.json"
enforce = true

[[rule]]
name = "all"
match = "sensors/#"
to = [{ upstream = "cloud" }]

[[test]]
input = { topic = "sensors/a/temperature", payload = { value = "hot", unit = "C" } }
expect = [{ dead_letter = "schema" }]

[[test]]
input = { topic = "sensors/a/temperature", payload = { value = 21.5, unit = "C" } }
expect = [{ upstream = "cloud" }]
"#,
    );
    let set = set.unwrap();
    let v = route(
        &set,
        "sensors/a/temperature",
        br#"{"value": 21.5, "unit": "C"}"#,
    );
    assert_eq!(v.routes.len(), 1);
    let v = route(
        &set,
        "sensors/a/temperature",
        br#"{"value": "hot", "unit": "C"}"#,
    );
    assert!(v.routes.is_empty(), "not forwarded");
    let f = v.schema_failure.unwrap();
    assert_eq!((&*f.schema, f.path.as_str()), ("temperature", "/value"));
    assert!(v.dead_letter.unwrap().contains("schema \"temperature\""));
    let v = route(
        &set,
        "sensors/a/temperature",
        br#"{"value": 1, "unit": "C", "x": 1}"#,
    );
    assert!(v.schema_failure.unwrap().message.contains("x"));
    let v = route(&set, "sensors/a/humidity", br#"{"anything": true}"#);
    assert_eq!(v.routes.len(), 1, "other topics are not checked");
    let outcomes = testing::run_all(&set);
    assert!(outcomes.iter().all(|o| o.failure.is_none()), "{outcomes:?}");
}

#[test]
fn a_rule_that_names_a_schema_applies_only_to_events_that_keep_it() {
    let (_d, set) = with_schema(
        r#"[[schema]]
name = "temperature"
match = "sensors/+/temperature"
file = "temperature.json"

[[rule]]
name = "checked"
schema = "temperature"
match = "sensors/+/temperature"
to = [{ upstream = "cloud", topic = "checked" }]
"#,
    );
    let set = set.unwrap();
    assert_eq!(
        route(
            &set,
            "sensors/a/temperature",
            br#"{"value": 1, "unit": "F"}"#
        )
        .routes
        .len(),
        1
    );
    let v = route(&set, "sensors/a/temperature", br#"{"value": 1}"#);
    assert!(v.routes.is_empty());
    assert!(v.schema_failure.unwrap().message.contains("unit"));
}

#[test]
fn schema_problems_are_errors_at_their_line() {
    let (_d, set) = with_schema(
        r#"[[schema]]
name = "missing"
match = "a"
file = "nowhere.json"

[[schema]]
name = "temperature"
match = "a/#/b"
file = "temperature.json"

[[rule]]
name = "r"
schema = "tempreature"
match = "x"
drop = true
"#,
    );
    let Diagnostics(errs) = set.unwrap_err();
    let got: Vec<(usize, String)> = errs.iter().map(|d| (d.line, d.message.clone())).collect();
    assert_eq!(got.len(), 3, "{got:#?}");
    assert!(
        got[0].0 == 4 && got[0].1.contains("cannot read"),
        "{got:#?}"
    );
    assert!(
        got[1].0 == 8 && got[1].1.contains("'#' is only allowed"),
        "{got:#?}"
    );
    assert!(
        got[2].0 == 13 && got[2].1.contains("schema \"tempreature\" is not declared"),
        "{got:#?}"
    );
}

#[test]
fn an_envelope_wraps_what_the_destination_would_send() {
    let set = load(
        r#"
[[rule]]
name = "wrapped"
match = "s/{device}"
set = { device = "device" }
to = [
  { upstream = "cloud", envelope = "cloudevents", id_field = "eid" },
  { upstream = "cloud", envelope = "cloudevents", encode = "raw", event_type = "com.example.{device}" },
]
"#,
    )
    .unwrap();
    let v = route(&set, "s/t1", br#"{"value": 1}"#);
    let ce = json_of(&v.routes[0].payload);
    assert_eq!(ce["type"], "wrapped", "no contract: the rule's name");
    assert_eq!(
        ce["source"], "edgeferry:///s/t1",
        "no gateway id in a bare RuleSet"
    );
    assert_eq!(ce["id"], v.routes[0].event_id.as_str());
    assert_eq!(ce["data"]["device"], "t1");
    assert_eq!(ce["data"]["eid"], v.routes[0].event_id.as_str());
    assert!(ce.get("dataschema").is_none());
    let raw = json_of(&v.routes[1].payload);
    let set = load(
        r#"
[[rule]]
name = "sourced"
match = "s/{device}"
to = [{ upstream = "cloud", envelope = "cloudevents", event_source = "urn:site:{device}:{payload.src}" }]
"#,
    )
    .unwrap();
    let v = route(&set, "s/t1", br#"{"src": "a b<"}"#);
    assert!(v.errors.is_empty(), "{v:?}");
    assert_eq!(v.routes.len(), 1, "{v:?}");
    assert_eq!(
        json_of(&v.routes[0].payload)["source"],
        "urn:site:t1:a%20b%3C"
    );
    assert_eq!(raw["type"], "com.example.t1");
    assert_eq!(raw["data_base64"], "eyJ2YWx1ZSI6IDF9");
}

#[test]
fn envelope_settings_are_checked() {
    let e = load(
        r#"
[[rule]]
name = "a"
match = "s/{device}"
to = [{ upstream = "cloud", event_type = "t" }]

[[rule]]
name = "b"
match = "s/{device}"
to = [{ upstream = "cloud", envelope = "cloudevents", encode = "cbor", event_source = "x/{nope}" }]

[[rule]]
name = "c"
match = "s/{device}"
to = [{ upstream = "cloud", envelope = "cloudevent" }]

[[rule]]
name = "d"
match = "s/{device}"
to = [{ local = "x/{device}", envelope = "cloudevents-binary" }]

[[rule]]
name = "e"
match = "s/{device}"
to = [{ upstream = "cloud", envelope = "cloudevents", event_source = "has space" }]
"#,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("`event_type` is an attribute of an envelope"),
        "{e}"
    );
    assert!(e.contains("a CloudEvents structured event is JSON"), "{e}");
    assert!(e.contains("{nope}"), "{e}");
    assert!(e.contains("unknown variant `cloudevent`"), "{e}");
    assert!(e.contains("a local destination has none"), "{e}");
    assert!(e.contains("is not a URI reference"), "{e}");
}

/// Schema `s` (requires `x`) on `m/+`, not enforced, and a rule
/// "checked" on `m/{x}` that requires it, ending with `rest` (its `to`,
/// and more rules).
fn with_checked_rule(rest: &str) -> (tempfile::TempDir, RuleSet) {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("s.json"), r#"{"required": ["x"]}"#).unwrap();
    let text = format!(
        "[[schema]]\nname = \"s\"\nmatch = \"m/+\"\nfile = \"s.json\"\n\n[[rule]]\nname = \"checked\"\nmatch = \"m/{{x}}\"\nschema = \"s\"\n{rest}"
    );
    let set = RuleSet::from_str(&d.path().join("r.toml"), &text, &upstreams()).unwrap();
    (d, set)
}

#[test]
fn a_rules_schema_dead_letters_only_what_no_other_rule_routed() {
    let (_d, set) = with_checked_rule(
        r#"to = [{ upstream = "cloud", topic = "checked" }]

[[rule]]
name = "any"
match = "m/{x}"
when = "has(payload.y)"
to = [{ upstream = "cloud", topic = "any" }]
"#,
    );
    let v = route(&set, "m/1", br#"{"y": 1}"#);
    let topics: Vec<&str> = v.routes.iter().map(|r| r.topic.as_str()).collect();
    assert_eq!(topics, ["any"]);
    assert!(v.schema_failure.is_some(), "counted");
    assert!(v.dead_letter.is_none(), "forwarded by another rule");
    let v = route(&set, "m/1", br#"{"z": 1}"#);
    assert!(v.routes.is_empty());
    assert!(
        v.dead_letter
            .as_deref()
            .unwrap()
            .starts_with("schema \"s\"")
    );
}

#[test]
fn a_rule_error_is_the_dead_letters_reason_over_a_rules_schema() {
    let (_d, set) = with_checked_rule(
        r#"to = [{ upstream = "cloud" }]

[[rule]]
name = "broken"
match = "m/{x}"
when = "payload.y > 1"
to = [{ upstream = "cloud" }]
"#,
    );
    let v = route(&set, "m/1", br#"{"z": 1}"#);
    assert!(
        v.dead_letter
            .as_deref()
            .unwrap()
            .starts_with("rule \"broken\""),
        "{v:?}"
    );
    assert!(v.schema_failure.is_some(), "still counted");
    assert!(
        v.broken_contract().is_none(),
        "not what the dead letter says"
    );
}
