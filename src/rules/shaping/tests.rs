//! The shapers' behaviour, one operator at a time, and their specs' checks.
use serde_json::json;

use super::*;

fn throttle(toml: &str) -> Shaper<u32> {
    Shaper::new(ShapeSpec::Throttle(toml::from_str(toml).unwrap()))
}

fn dedupe(toml: &str) -> Shaper<u32> {
    Shaper::new(ShapeSpec::Dedupe(toml::from_str(toml).unwrap()))
}

fn deadband(toml: &str) -> Shaper<u32> {
    Shaper::new(ShapeSpec::Deadband(toml::from_str(toml).unwrap()))
}

fn window(toml: &str) -> Shaper<u32> {
    Shaper::new(ShapeSpec::Window(toml::from_str(toml).unwrap()))
}

fn v(x: f64) -> Value {
    json!({ "value": x })
}

/// Offers `events` (key, time) with an empty payload; returns the verdicts.
fn gate_run(s: &mut Shaper<u32>, events: &[(&str, u64)]) -> Vec<Offer<u32>> {
    events
        .iter()
        .map(|(k, t)| s.offer(k, *t, &json!({}), 0))
        .collect()
}

/// Offers `values` at the given times to key "k"; returns the verdicts.
fn band_run(s: &mut Shaper<u32>, events: &[(u64, f64)]) -> Vec<Offer<u32>> {
    events
        .iter()
        .map(|(t, x)| s.offer("k", *t, &v(*x), 0))
        .collect()
}

const PASS: Offer<u32> = Offer::Pass;
const THROTTLED: Offer<u32> = Offer::Drop(DropReason::Throttled);
const DUP: Offer<u32> = Offer::Drop(DropReason::Duplicate);
const BAND: Offer<u32> = Offer::Drop(DropReason::InsideDeadband);
const ABSORBED: Offer<u32> = Offer::Absorbed { closed: Vec::new() };

fn closed(o: Offer<u32>) -> Emit<u32> {
    match o {
        Offer::Absorbed { mut closed } if closed.len() == 1 => closed.remove(0),
        other => panic!("expected a closed window, got {other:?}"),
    }
}

#[test]
fn throttle_passes_one_event_per_key_per_period() {
    let mut s = throttle(r#"every = "10s""#);
    let got = gate_run(
        &mut s,
        &[
            ("a", 1_000),
            ("a", 5_000),
            ("b", 5_000),
            ("a", 10_999),
            ("a", 11_000),
            ("b", 14_999),
            ("a", 20_999),
            ("b", 15_000),
        ],
    );
    assert_eq!(
        got,
        [
            PASS, THROTTLED, PASS, THROTTLED, PASS, THROTTLED, THROTTLED, PASS
        ]
    );
    assert_eq!(s.keys(), 2);
    assert_eq!(s.next_deadline(), None);
    assert!(s.due(u64::MAX).is_empty());
}

#[test]
fn dedupe_drops_a_key_that_passed_within_the_window_and_repeats_do_not_extend_it() {
    let mut s = dedupe(
        r#"key = "payload.id"
within = "1m""#,
    );
    let got = gate_run(
        &mut s,
        &[
            ("id-1", 0),
            ("id-1", 30_000),
            ("id-2", 30_000),
            ("id-1", 59_999),
            ("id-1", 60_000),
            ("id-1", 60_001),
        ],
    );
    assert_eq!(got, [PASS, DUP, PASS, DUP, PASS, DUP]);
}

#[test]
fn clock_set_back_by_more_than_a_period_does_not_silence_a_key() {
    let mut s = throttle(r#"every = "10s""#);
    let got = gate_run(
        &mut s,
        &[
            ("a", 100_000),
            ("a", 95_000),  // 5s back: no time elapsed
            ("a", 89_999),  // more than 10s back: the period counts as elapsed
            ("a", 90_000),  // 1ms after the new pass
            ("a", 100_000), // 10s after it
        ],
    );
    assert_eq!(got, [PASS, THROTTLED, PASS, THROTTLED, PASS]);
}

#[test]
fn deadband_delta_passes_moves_larger_than_delta_from_the_last_sent_value() {
    let mut s = deadband(
        r#"field = "value"
delta = 0.5"#,
    );
    let got = band_run(
        &mut s,
        &[
            (0, 20.0),
            (1, 20.5),
            (2, 20.4),
            (3, 20.6),
            (4, 20.2),
            (5, 20.0),
        ],
    );
    // 20.5: exactly delta, not more. 20.6 is sent; 20.2 is 0.4 from it;
    // 20.0 is 0.6 from it (the drifting 20.5/20.4 never moved the base).
    assert_eq!(got, [PASS, BAND, BAND, PASS, BAND, PASS]);
}

#[test]
fn deadband_first_event_of_each_key_passes() {
    let mut s = deadband(
        r#"field = "value"
delta = 100"#,
    );
    assert_eq!(s.offer("a", 0, &v(1.0), 0), PASS);
    assert_eq!(s.offer("b", 0, &v(1.0), 0), PASS);
    assert_eq!(s.offer("a", 1, &v(2.0), 0), BAND);
    assert_eq!(s.keys(), 2);
}

#[test]
fn deadband_percent_is_relative_to_the_last_sent_value() {
    let mut s = deadband(
        r#"field = "value"
percent = 10"#,
    );
    let got = band_run(
        &mut s,
        &[(0, 200.0), (1, 219.0), (2, 221.0), (3, 200.0), (4, 198.0)],
    );
    // base 200: band 20; 221 sent, band 22.1: 200 is 21 away, 198 is 23.
    assert_eq!(got, [PASS, BAND, PASS, BAND, PASS]);

    let mut neg = deadband(
        r#"field = "value"
percent = 10"#,
    );
    let got = band_run(&mut neg, &[(0, -50.0), (1, -54.0), (2, -56.0)]);
    assert_eq!(got, [PASS, BAND, PASS]);
}

#[test]
fn deadband_percent_from_zero_passes_any_change() {
    let mut s = deadband(
        r#"field = "value"
percent = 5"#,
    );
    let got = band_run(&mut s, &[(0, 0.0), (1, 0.0), (2, 0.001)]);
    assert_eq!(got, [PASS, BAND, PASS]);
}

#[test]
fn deadband_heartbeat_passes_an_unchanged_value_once_the_last_sent_is_old_enough() {
    let mut s = deadband(
        r#"field = "value"
delta = 1
heartbeat = "10m""#,
    );
    let got = band_run(
        &mut s,
        &[
            (0, 5.0),
            (599_999, 5.0),
            (600_000, 5.0),
            (700_000, 7.0),
            (1_299_999, 7.0),
            (1_300_000, 7.0),
        ],
    );
    assert_eq!(got, [PASS, BAND, PASS, PASS, BAND, PASS]);
}

#[test]
fn deadband_missing_or_non_numeric_field_is_not_numeric_and_leaves_state_alone() {
    let mut s = deadband(
        r#"field = "reading.temp"
delta = 1"#,
    );
    for payload in [
        json!({ "reading": { "temp": "21.5" } }),
        json!({ "reading": { "hum": 40 } }),
        json!({ "reading": 21.5 }),
        json!({ "reading": { "temp": null } }),
        json!([1, 2]),
        json!("21.5"),
    ] {
        assert_eq!(s.offer("k", 0, &payload, 0), Offer::NotNumeric, "{payload}");
    }
    assert_eq!(s.keys(), 0);
    let t = |x: f64| json!({ "reading": { "temp": x } });
    assert_eq!(s.offer("k", 1, &t(21.0), 0), PASS);
    assert_eq!(
        s.offer("k", 2, &json!({ "reading": {} }), 0),
        Offer::NotNumeric
    );
    assert_eq!(s.offer("k", 3, &t(21.5), 0), BAND);
    assert_eq!(s.offer("k", 4, &t(22.5), 0), PASS);
}

#[test]
fn field_paths_index_arrays_with_numeric_segments() {
    let mut s = deadband(
        r#"field = "values.1"
delta = 1"#,
    );
    assert_eq!(s.offer("k", 0, &json!({ "values": [0, 10] }), 0), PASS);
    assert_eq!(s.offer("k", 1, &json!({ "values": [0, 12] }), 0), PASS);
    assert_eq!(
        s.offer("k", 2, &json!({ "values": [0] }), 0),
        Offer::NotNumeric
    );
}

#[test]
fn window_emits_exact_aggregates_in_the_order_asked() {
    let mut s = window(
        r#"every = "10s"
fields = ["value", "meta.unit"]
aggregates = ["count", "min", "max", "avg", "sum", "first", "last"]"#,
    );
    let events = [
        json!({ "value": 2, "meta": { "unit": "C" } }),
        json!({ "value": 1 }),
        json!({ "value": "n/a", "meta": { "unit": "F" } }),
        json!({ "value": 4 }),
    ];
    for (i, e) in events.iter().enumerate() {
        assert_eq!(s.offer("dev-1", 20_000 + i as u64, e, i as u32), ABSORBED);
    }
    let out = s.due(30_000);
    assert_eq!(out.len(), 1);
    let e = &out[0];
    assert_eq!(
        (e.key.as_str(), e.ctx, e.window_end_ms),
        ("dev-1", 3, 30_000)
    );
    // value: 3 numeric of 4 (one skipped); meta.unit: missing twice, a string twice.
    assert_eq!(e.skipped, 1 + 4);
    let expected = json!({
        "key": "dev-1",
        "window_start": 20_000,
        "window_end": 30_000,
        "count": 4,
        "value": {
            "min": 1, "max": 4, "avg": 7.0 / 3.0, "sum": 7.0,
            "first": 2, "last": 4,
        },
        "meta.unit": {
            "min": null, "max": null, "avg": null, "sum": null,
            "first": "C", "last": "F",
        },
    });
    assert_eq!(
        serde_json::to_string(&e.payload).unwrap(),
        serde_json::to_string(&expected).unwrap()
    );
}

#[test]
fn window_with_count_only_emits_count_and_skips_nothing() {
    let mut s = window(r#"every = "1s""#);
    s.offer("k", 100, &json!("raw"), 0);
    s.offer("k", 200, &json!(null), 0);
    let out = s.due(1_000);
    assert_eq!(
        out[0].payload,
        json!({ "key": "k", "window_start": 0, "window_end": 1_000, "count": 2 })
    );
    assert_eq!(out[0].skipped, 0);
}

#[test]
fn window_closes_through_due_at_its_end_and_not_before() {
    let mut s = window(
        r#"every = "1m"
fields = ["value"]
aggregates = ["sum"]"#,
    );
    s.offer("b", 61_000, &v(1.0), 1);
    s.offer("a", 62_000, &v(2.0), 2);
    s.offer("a", 63_000, &v(3.0), 3);
    assert_eq!(s.next_deadline(), Some(120_000));
    assert!(s.due(119_999).is_empty());
    let out = s.due(120_000);
    let got: Vec<_> = out
        .iter()
        .map(|e| {
            (
                e.key.as_str(),
                e.payload["count"].clone(),
                e.payload["value"]["sum"].clone(),
                e.ctx,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("a", json!(2), json!(5.0), 3),
            ("b", json!(1), json!(1.0), 1)
        ]
    );
    assert_eq!(s.keys(), 0);
    assert_eq!(s.next_deadline(), None);
    assert!(s.due(1_000_000).is_empty());
}

#[test]
fn window_closes_when_its_key_has_an_event_in_a_later_window() {
    let mut s = window(
        r#"every = "10s"
fields = ["value"]
aggregates = ["count", "last"]"#,
    );
    assert_eq!(s.offer("k", 1_000, &v(1.0), 1), ABSORBED);
    assert_eq!(s.offer("k", 9_999, &v(2.0), 2), ABSORBED);
    let e = closed(s.offer("k", 35_000, &v(3.0), 3));
    assert_eq!(
        e.payload,
        json!({
            "key": "k", "window_start": 0, "window_end": 10_000, "count": 2,
            "value": { "last": 2.0 },
        })
    );
    assert_eq!(e.ctx, 2);
    // The new window holds only the new event.
    assert_eq!(s.next_deadline(), Some(40_000));
    let out = s.due(40_000);
    assert_eq!(out[0].payload["window_start"], json!(30_000));
    assert_eq!(out[0].payload["count"], json!(1));
    assert_eq!(out[0].ctx, 3);
    assert_eq!(s.evicted(), 0);
}

#[test]
fn windows_are_aligned_to_multiples_of_every_since_the_epoch() {
    let mut s = window(r#"every = "15m""#);
    let now = 1_700_000_123_456; // 2023-11-14T22:15:23.456Z
    s.offer("k", now, &json!({}), 0);
    let start = 1_700_000_100_000; // 22:15:00
    assert_eq!(now - start, 23_456);
    assert_eq!(start % 900_000, 0);
    assert_eq!(s.next_deadline(), Some(start + 900_000));
    let out = s.due(start + 900_000);
    assert_eq!(out[0].payload["window_start"], json!(start));
    assert_eq!(out[0].payload["window_end"], json!(start + 900_000));
}

#[test]
fn next_deadline_is_the_earliest_open_window_end() {
    let mut s = window(r#"every = "10s""#);
    assert_eq!(s.next_deadline(), None);
    s.offer("a", 25_000, &json!({}), 0);
    assert_eq!(s.next_deadline(), Some(30_000));
    s.offer("b", 5_000, &json!({}), 0); // late receive time for a new key
    assert_eq!(s.next_deadline(), Some(10_000));
    assert_eq!(s.due(10_000).len(), 1);
    assert_eq!(s.next_deadline(), Some(30_000));
    closed(s.offer("a", 41_000, &json!({}), 0));
    assert_eq!(s.next_deadline(), Some(50_000));
}

#[test]
fn throttle_full_of_keys_forgets_expired_keys_before_evicting_the_least_recent() {
    let mut s = throttle(
        r#"every = "10s"
max_keys = 2"#,
    );
    gate_run(&mut s, &[("a", 0), ("b", 5_000)]);
    // "a" passed 10s ago: its entry no longer matters, no eviction.
    assert_eq!(s.offer("c", 10_000, &json!({}), 0), PASS);
    assert_eq!((s.keys(), s.evicted()), (2, 0));
    // Neither b nor c has expired; b was offered least recently.
    assert_eq!(s.offer("b", 11_000, &json!({}), 0), THROTTLED);
    assert_eq!(s.offer("d", 12_000, &json!({}), 0), PASS);
    assert_eq!((s.keys(), s.evicted()), (2, 1));
    // c was evicted, so it passes again as a new key (evicting b).
    assert_eq!(s.offer("b", 12_500, &json!({}), 0), THROTTLED);
    assert_eq!(s.offer("c", 13_000, &json!({}), 0), PASS);
    assert_eq!((s.keys(), s.evicted()), (2, 2));
    assert_eq!(s.offer("d", 13_000, &json!({}), 0), PASS);
}

#[test]
fn dedupe_full_of_keys_evicts_the_least_recently_offered_key() {
    let mut s = dedupe(
        r#"within = "1h"
max_keys = 3"#,
    );
    gate_run(&mut s, &[("a", 0), ("b", 1), ("c", 2), ("a", 3)]);
    assert_eq!(s.offer("d", 4, &json!({}), 0), PASS);
    assert_eq!((s.keys(), s.evicted()), (3, 1));
    assert_eq!(s.offer("a", 5, &json!({}), 0), DUP);
    assert_eq!(s.offer("c", 6, &json!({}), 0), DUP);
    assert_eq!(s.offer("b", 7, &json!({}), 0), PASS, "b was evicted");
}

#[test]
fn deadband_full_of_keys_forgets_heartbeat_expired_keys_first() {
    let mut s = deadband(
        r#"field = "value"
delta = 1
heartbeat = "1m"
max_keys = 2"#,
    );
    s.offer("a", 0, &v(1.0), 0);
    s.offer("b", 30_000, &v(1.0), 0);
    s.offer("a", 40_000, &v(1.5), 0); // recent, but last sent at 0
    assert_eq!(s.offer("c", 60_000, &v(1.0), 0), PASS);
    assert_eq!((s.keys(), s.evicted()), (2, 0), "a's heartbeat was due");
    assert_eq!(s.offer("b", 61_000, &v(1.5), 0), BAND);

    let mut no_hb = deadband(
        r#"field = "value"
delta = 1
max_keys = 2"#,
    );
    no_hb.offer("a", 0, &v(1.0), 0);
    no_hb.offer("b", 0, &v(1.0), 0);
    no_hb.offer("a", 999_999_999, &v(1.0), 0);
    assert_eq!(no_hb.offer("c", 999_999_999, &v(1.0), 0), PASS);
    assert_eq!((no_hb.keys(), no_hb.evicted()), (2, 1));
    assert_eq!(
        no_hb.offer("a", 999_999_999, &v(1.5), 0),
        BAND,
        "b went, a stayed"
    );
    // NotNumeric for a new key takes no room.
    assert_eq!(no_hb.offer("z", 0, &json!({}), 0), Offer::NotNumeric);
    assert_eq!((no_hb.keys(), no_hb.evicted()), (2, 1));
}

#[test]
fn window_full_of_keys_closes_an_ended_window_first_then_emits_the_least_recent_early() {
    let mut s = window(
        r#"every = "10s"
max_keys = 2"#,
    );
    s.offer("a", 1_000, &json!({}), 1);
    s.offer("b", 2_000, &json!({}), 2);
    s.offer("a", 3_000, &json!({}), 3);
    // Still in the first window: b is the least recently offered.
    let e = closed(s.offer("c", 4_000, &json!({}), 4));
    assert_eq!((e.key.as_str(), e.ctx, e.window_end_ms), ("b", 2, 10_000));
    assert_eq!(e.payload["count"], json!(1));
    assert_eq!((s.keys(), s.evicted()), (2, 1));
    // At 12s, a's and c's windows have ended: both close, on time.
    let Offer::Absorbed { closed } = s.offer("d", 12_000, &json!({}), 5) else {
        panic!("absorbed")
    };
    let got: Vec<_> = closed
        .iter()
        .map(|e| (e.key.as_str(), e.payload["count"].clone()))
        .collect();
    assert_eq!(got, [("a", json!(2)), ("c", json!(1))]);
    assert_eq!((s.keys(), s.evicted()), (1, 1));
    let rest: Vec<_> = s
        .due(20_000)
        .into_iter()
        .map(|e| (e.key, e.window_end_ms))
        .collect();
    assert_eq!(rest, [("d".to_owned(), 20_000)]);
}

#[test]
fn a_full_shaper_evicts_in_batches_so_new_keys_stay_cheap() {
    let mut s = throttle(
        r#"every = "1h"
max_keys = 800"#,
    );
    for i in 0..800 {
        assert_eq!(s.offer(&format!("k{i}"), 1_000, &json!({}), 0), Offer::Pass);
    }
    // Full, nothing stale: the 100 least recently offered keys go at once.
    s.offer("k0", 1_000, &json!({}), 0);
    s.offer("new", 1_000, &json!({}), 0);
    assert_eq!((s.keys(), s.evicted()), (701, 100));
    assert_eq!(
        s.offer("k0", 2_000, &json!({}), 0),
        Offer::Drop(DropReason::Throttled),
        "recently seen: kept"
    );
    assert_eq!(
        s.offer("k1", 2_000, &json!({}), 0),
        Offer::Pass,
        "evicted: a new key again"
    );
    // The next 99 new keys need no sweep.
    for i in 0..98 {
        s.offer(&format!("n{i}"), 3_000, &json!({}), 0);
    }
    assert_eq!((s.keys(), s.evicted()), (800, 100));
}

#[test]
fn an_invalid_spec_never_panics() {
    let mut w = window(r#"every = "0s""#);
    assert_eq!(w.offer("k", 12_345, &json!({}), 0), ABSORBED);
    assert_eq!(w.next_deadline(), Some(12_346));
    let mut d = Shaper::<u32>::new(ShapeSpec::Deadband(DeadbandSpec {
        key: None,
        field: String::new(),
        delta: Some(f64::NAN),
        percent: None,
        heartbeat: None,
        max_keys: Some(0),
    }));
    assert_eq!(d.offer("k", 0, &json!(1), 0), Offer::NotNumeric);
    assert_eq!(d.offer("k", 0, &json!({ "": 1 }), 0), PASS);
    assert_eq!(d.offer("k", 1, &json!({ "": 100 }), 0), BAND);
    assert_eq!(d.offer("j", 1, &json!({ "": 100 }), 0), PASS);
    assert_eq!((d.keys(), d.evicted()), (1, 1));
}

fn errors(spec: ShapeSpec) -> Vec<(&'static str, String)> {
    spec.validate()
}

fn parse(toml: &str) -> ShapeSpec {
    toml::from_str(toml).unwrap()
}

#[test]
fn valid_specs_have_no_errors() {
    for t in [
        "throttle = { every = \"10s\" }",
        "dedupe = { key = \"payload.id\", within = \"5m\", max_keys = 1 }",
        "deadband = { field = \"reading.temp\", percent = 0, heartbeat = \"1h\" }",
        "window = { every = \"1m\" }",
        "window = { every = \"1m\", aggregates = [\"count\"] }",
        "window = { every = \"1m\", fields = [\"a\", \"b.c\"], aggregates = [\"last\"] }",
    ] {
        assert_eq!(errors(parse(t)), [], "{t}");
    }
}

#[test]
fn validation_names_the_setting_and_gives_a_hint() {
    let keys =
        |t: &str| -> Vec<&'static str> { errors(parse(t)).into_iter().map(|(k, _)| k).collect() };
    assert_eq!(keys("throttle = { every = \"0s\" }"), ["every"]);
    assert_eq!(keys("throttle = { every = \"500us\" }"), ["every"]);
    assert_eq!(
        keys("dedupe = { within = \"0s\", max_keys = 0, key = \" \" }"),
        ["key", "max_keys", "within"]
    );
    assert_eq!(keys("deadband = { field = \"v\" }"), ["delta"]);
    assert_eq!(
        keys("deadband = { field = \"v\", delta = 1, percent = 2 }"),
        ["percent"]
    );
    assert_eq!(keys("deadband = { field = \"v\", delta = -1 }"), ["delta"]);
    assert_eq!(
        keys("deadband = { field = \"v\", percent = nan }"),
        ["percent"]
    );
    assert_eq!(keys("deadband = { field = \"v\", delta = inf }"), ["delta"]);
    assert_eq!(
        keys("deadband = { field = \"\", delta = 1, heartbeat = \"0s\" }"),
        ["field", "heartbeat"]
    );
    assert_eq!(
        keys("deadband = { field = \"a..b\", delta = 1 }"),
        ["field"]
    );
    assert_eq!(
        keys("window = { every = \"1m\", aggregates = [] }"),
        ["aggregates"]
    );
    assert_eq!(
        keys("window = { every = \"1m\", aggregates = [\"avg\", \"max\"] }"),
        ["fields"]
    );
    assert_eq!(
        keys("window = { every = \"1m\", fields = [\"v\"] }"),
        ["aggregates"]
    );
    assert_eq!(
        keys(
            "window = { every = \"1m\", fields = [\"v\", \"count\", \"v\", \".x\"], \
             aggregates = [\"sum\", \"sum\"] }"
        ),
        ["fields", "fields", "fields", "aggregates"]
    );

    let msg = |t: &str| errors(parse(t)).remove(0).1;
    assert_eq!(
        msg("throttle = { every = \"0s\" }"),
        "must be at least 1ms, e.g. every = \"10s\""
    );
    assert_eq!(
        msg("deadband = { field = \"v\" }"),
        "deadband needs a threshold: set delta (absolute change, e.g. delta = 0.5) or \
         percent (change relative to the last sent value, e.g. percent = 2)"
    );
    assert_eq!(
        msg("deadband = { field = \"v\", delta = -1 }"),
        "must be a finite number >= 0 (got -1), e.g. delta = 0.5"
    );
    assert_eq!(
        msg("deadband = { field = \"\", delta = 1 }"),
        "\"\" is not a field path; write a dotted path into the payload, \
         e.g. \"value\" or \"reading.temp\""
    );
    assert_eq!(
        msg("window = { every = \"1m\", aggregates = [\"avg\", \"max\"] }"),
        "avg, max need fields to aggregate; add e.g. fields = [\"value\"]"
    );
    assert_eq!(
        msg("throttle = { every = \"1s\", max_keys = 0 }"),
        "must be at least 1 (omit it for 10000)"
    );
}

#[test]
fn specs_parse_from_toml() {
    let t: ThrottleSpec =
        toml::from_str("key = \"topic\"\nevery = \"10s\"\nmax_keys = 50").unwrap();
    assert_eq!(
        t,
        ThrottleSpec {
            key: Some("topic".into()),
            every: HumanDuration(std::time::Duration::from_secs(10)),
            max_keys: Some(50),
        }
    );
    let d: DedupeSpec = toml::from_str("within = \"5m\"").unwrap();
    assert_eq!((d.key, d.within.0.as_secs(), d.max_keys), (None, 300, None));
    let b: DeadbandSpec =
        toml::from_str("field = \"reading.temp\"\npercent = 2.5\nheartbeat = \"1h\"").unwrap();
    assert_eq!(
        (
            b.field.as_str(),
            b.delta,
            b.percent,
            b.heartbeat.map(|h| h.0.as_secs())
        ),
        ("reading.temp", None, Some(2.5), Some(3600))
    );
    let w: WindowSpec = toml::from_str(
        r#"every = "1m"
fields = ["v"]
aggregates = ["count", "min", "max", "avg", "sum", "first", "last"]"#,
    )
    .unwrap();
    use Aggregate::*;
    assert_eq!(w.aggregates, [Count, Min, Max, Avg, Sum, First, Last]);
    let w: WindowSpec = toml::from_str("every = \"1m\"").unwrap();
    assert_eq!((w.fields.len(), w.aggregates), (0, vec![Count]));

    let s = parse("[deadband]\nkey = \"payload.id\"\nfield = \"v\"\ndelta = 1");
    assert_eq!((s.kind(), s.key_expr()), ("deadband", Some("payload.id")));
    let s = parse("window = { every = \"1s\" }");
    assert_eq!((s.kind(), s.key_expr()), ("window", None));
    assert_eq!(Shaper::<()>::new(s.clone()).spec(), &s);
}

#[test]
fn specs_reject_unknown_settings_and_bad_values() {
    let unknown = toml::from_str::<ThrottleSpec>("every = \"10s\"\nburst = 3").unwrap_err();
    assert!(unknown.to_string().contains("burst"), "{unknown}");
    assert!(toml::from_str::<DedupeSpec>("within = \"5m\"\nwithin_ms = 1").is_err());
    assert!(toml::from_str::<DeadbandSpec>("field = \"v\"\ndelta = 1\nhysteresis = 2").is_err());
    assert!(toml::from_str::<WindowSpec>("every = \"1m\"\nsize = \"1m\"").is_err());
    let agg =
        toml::from_str::<WindowSpec>("every = \"1m\"\naggregates = [\"median\"]").unwrap_err();
    assert!(agg.to_string().contains("median"), "{agg}");
    assert!(toml::from_str::<WindowSpec>("every = \"1m\"\naggregates = [\"AVG\"]").is_err());
    let dur = toml::from_str::<ThrottleSpec>("every = \"soon\"").unwrap_err();
    assert!(dur.to_string().contains("invalid duration"), "{dur}");
    assert!(toml::from_str::<ShapeSpec>("sample = { every = \"1s\" }").is_err());
}

#[test]
fn drop_reasons_have_counter_labels() {
    let labels = [
        DropReason::Throttled,
        DropReason::Duplicate,
        DropReason::InsideDeadband,
    ]
    .map(DropReason::as_str);
    assert_eq!(labels, ["throttled", "duplicate", "deadband"]);
}
