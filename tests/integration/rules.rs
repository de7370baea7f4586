//! The rule language through the real broker: local republish, shaping,
//! transforms and dead letters, outputs checked at a real upstream broker
//! and on local topics; reload on file change.

use std::sync::atomic::Ordering::Relaxed;

use serde_json::{Value, json};

use crate::util::*;

/// A gateway on the rule files in `rules`, an upstream subscriber on
/// `filter`, and a sensor.
async fn gateway_with_rules(
    dir: &std::path::Path,
    rules: &std::path::Path,
    filter: &str,
) -> (Subscriber, Gateway, Sensor) {
    let upstream = upstream_broker();
    let cloud = Subscriber::start(upstream, filter).await;
    let text = rules_at(&config_text(dir, upstream.port(), ""), rules, "");
    let gw = Gateway::start_with(dir, &text).await;
    let sensor = Sensor::connect(gw.addr).await;
    (cloud, gw, sensor)
}

fn json_of(payload: &[u8]) -> Value {
    serde_json::from_slice(payload).unwrap_or_else(|e| panic!("{e}: {payload:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_reading_reaches_the_cloud_and_raises_one_throttled_local_alert() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream_broker();
    let cloud = Subscriber::start(upstream, "plant/#").await;
    let gw = Gateway::start(dir.path(), upstream.port()).await;
    let alerts = Subscriber::start(gw.addr, "alerts/#").await;
    let sensor = Sensor::connect(gw.addr).await;

    let hot = serde_json::to_vec(&json!({"value": 31.5, "unit": "C", "seq": 1})).unwrap();
    sensor
        .publish("sensors/yard/t1/temperature", hot.clone())
        .await;
    sensor
        .publish("sensors/yard/t1/temperature", reading("t1", 2))
        .await;
    let hotter = serde_json::to_vec(&json!({"value": 35.0, "unit": "C", "seq": 3})).unwrap();
    sensor.publish("sensors/yard/t1/temperature", hotter).await;
    sensor.wait_acked(3).await;

    let got = cloud.wait_for(3).await;
    assert_eq!(got[0].topic, "plant/yard/t1/temp");
    assert_eq!(got[0].payload, hot, "forwarded byte for byte");
    let alert = alerts.wait_for(1).await;
    assert_eq!(alert[0].topic, "alerts/yard/t1");
    let a = json_of(&alert[0].payload);
    let at_ms = a["at_ms"].as_u64().expect("receive time injected");
    assert_eq!(
        a,
        json!({"value": 31.5, "unit": "C", "alert": "high-temperature", "site": "yard", "device": "t1", "at_ms": at_ms})
    );
    let m = &gw.running.metrics;
    // The second hot reading came within the minute: throttled.
    wait_until("throttled", || m.dropped_throttled.load(Relaxed) == 1).await;
    // The alert went through the rules again (its topic is ingested) and
    // matched none: it was delivered locally all the same, not a drop.
    assert_eq!(m.dropped_unmatched.load(Relaxed), 0);
    assert_eq!(m.republished.load(Relaxed), 1);
    assert_eq!(alerts.count(), 1);
    assert_eq!(cloud.count(), 3);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_are_counted_and_dead_lettered_and_the_pipeline_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream_broker();
    let cloud = Subscriber::start(upstream, "#").await;
    let text = config_text(dir.path(), upstream.port(), "").replace(
        "[rules]\n",
        "[rules]\ndead_letter = \"edgeferry/dead-letter\"\n",
    );
    let gw = Gateway::start_with(dir.path(), &text).await;
    let dead = Subscriber::start(gw.addr, "edgeferry/dead-letter").await;
    let sensor = Sensor::connect(gw.addr).await;

    let t = "sensors/yard/t1/temperature";
    let deep = "[".repeat(10_000);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (t, b"{\"value\": 31".to_vec()),                    // malformed JSON
        (t, br#"{"value": "hot", "unit": "C"}"#.to_vec()),  // wrong type for the alarm
        (t, deep.into_bytes()),                             // nesting past any limit
        (t, vec![0xff, 0xfe, 0x00]),                        // not UTF-8, not CBOR
        (t, Vec::new()),                                    // empty
        ("devices/pump/telemetry", vec![0xa2, 0x61, 0x61]), // truncated CBOR map
    ];
    for (topic, payload) in &cases {
        sensor.publish(topic, payload.clone()).await;
    }
    sensor.publish(t, reading("t1", 7)).await;
    sensor.wait_acked(cases.len() + 1).await;

    // Forwarded: the opaque telemetry and the good reading. The wrong-type,
    // binary and empty readings break the temperature contract of the
    // example rules; the malformed and deep ones do not parse.
    let got = cloud.wait_for(2).await;
    let summary: Vec<(&str, usize)> = got
        .iter()
        .map(|m| (m.topic.as_str(), m.payload.len()))
        .collect();
    assert_eq!(
        summary,
        [
            ("fleet/pump/telemetry", 3),
            ("plant/yard/t1/temp", reading("t1", 7).len()),
        ]
    );
    // Dead letters: every one of the five, each saying why.
    let letters = dead.wait_for(5).await;
    let reasons: Vec<String> = letters
        .iter()
        .map(|m| json_of(&m.payload)["reason"].as_str().unwrap().to_string())
        .collect();
    assert!(reasons[0].starts_with("malformed JSON"), "{reasons:?}");
    assert_eq!(reasons[1], "schema", "{reasons:?}");
    assert_eq!(json_of(&letters[1].payload)["path"], "/value");
    assert!(reasons[2].starts_with("malformed JSON"), "{reasons:?}");
    assert_eq!(reasons[3], "schema", "{reasons:?}");
    assert_eq!(reasons[4], "schema", "{reasons:?}");
    let binary = json_of(&letters[3].payload);
    assert_eq!(binary["payload_hex"], "fffe00");
    assert_eq!(binary["topic"], t);
    assert!(
        binary["message"]
            .as_str()
            .unwrap()
            .contains("neither JSON nor CBOR"),
        "{binary}"
    );
    let m = &gw.running.metrics;
    assert_eq!(m.dead_letters.load(Relaxed), 5);
    assert_eq!(
        m.rule_errors.load(Relaxed),
        0,
        "the contract caught them first"
    );
    assert_eq!(m.decoded_malformed.load(Relaxed), 2);
    wait_until("all acked", || gw.queued("cloud") == 0).await;
    assert_eq!(cloud.count(), 2, "dead letters stay local");
    gw.stop().await;
}

/// A rule that cannot evaluate its `when` on an event (no contract on the
/// topic to catch it first): counted, dead-lettered with the rule's name,
/// and the rules that can still apply do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_that_fails_on_an_event_dead_letters_it_and_the_others_still_apply() {
    let dir = tempfile::tempdir().unwrap();
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(
        rules.path().join("r.toml"),
        r#"
[[rule]]
name = "forward"
match = "x/{device}"
to = [{ upstream = "cloud", topic = "up/{device}" }]

[[rule]]
name = "alarm"
match = "x/{device}"
when = "value > 30.0"
to = [{ local = "alerts/{device}" }]
"#,
    )
    .unwrap();
    let upstream = upstream_broker();
    let cloud = Subscriber::start(upstream, "up/#").await;
    let text = rules_at(
        &config_text(dir.path(), upstream.port(), ""),
        rules.path(),
        "dead_letter = \"edgeferry/dead-letter\"",
    );
    let gw = Gateway::start_with(dir.path(), &text).await;
    let dead = Subscriber::start(gw.addr, "edgeferry/dead-letter").await;
    let sensor = Sensor::connect(gw.addr).await;
    sensor.publish("x/t1", r#"{"value": "hot"}"#).await;
    sensor.wait_acked(1).await;
    let got = cloud.wait_for(1).await;
    assert_eq!(got[0].topic, "up/t1");
    let letters = dead.wait_for(1).await;
    let reason = json_of(&letters[0].payload)["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.starts_with("rule \"alarm\": when"), "{reason}");
    assert_eq!(gw.running.metrics.rule_errors.load(Relaxed), 1);
    assert_eq!(gw.running.metrics.dead_letters.load(Relaxed), 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_sends_one_aggregate_per_key_per_period() {
    let dir = tempfile::tempdir().unwrap();
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(
        rules.path().join("w.toml"),
        r#"
[[rule]]
name = "per-second"
match = "power/{meter}"
window = { key = "meter", every = "1s", fields = ["watts"], aggregates = ["count", "sum"] }
to = [{ upstream = "cloud", topic = "agg/{meter}" }]
"#,
    )
    .unwrap();
    let (cloud, gw, sensor) = gateway_with_rules(dir.path(), rules.path(), "agg/#").await;
    const N: usize = 50;
    for i in 0..N {
        let meter = if i % 2 == 0 { "m1" } else { "m2" };
        sensor
            .publish(&format!("power/{meter}"), format!("{{\"watts\": {i}}}"))
            .await;
    }
    sensor.wait_acked(N).await;
    let m = &gw.running.metrics;
    wait_until("all absorbed", || {
        m.window_absorbed.load(Relaxed) == N as u64
    })
    .await;
    // The burst may straddle a second boundary: every event is in exactly
    // one window, the counts and sums add up, and each window is sent once.
    let counted = |msgs: &[Message]| -> u64 {
        msgs.iter()
            .map(|m| json_of(&m.payload)["count"].as_u64().unwrap())
            .sum()
    };
    wait_until("every event in a window sent upstream", || {
        counted(&cloud.take()) == N as u64
    })
    .await;
    let got = cloud.take();
    assert_eq!(got.len() as u64, m.window_emitted.load(Relaxed));
    let mut seen = std::collections::HashSet::new();
    let mut sum = 0.0;
    for msg in &got {
        let v = json_of(&msg.payload);
        let key = v["key"].as_str().unwrap();
        assert_eq!(msg.topic, format!("agg/{key}"));
        assert!(
            seen.insert((key.to_string(), v["window_start"].as_u64().unwrap())),
            "window sent twice: {v}"
        );
        sum += v["watts"]["sum"].as_f64().unwrap();
    }
    assert!((2..=4).contains(&got.len()), "{} windows", got.len());
    assert_eq!(sum, (0..N).sum::<usize>() as f64);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_rule_file_is_reloaded_and_a_bad_edit_keeps_the_old_rules() {
    let dir = tempfile::tempdir().unwrap();
    let rules = tempfile::tempdir().unwrap();
    let file = rules.path().join("r.toml");
    let rule = |topic: &str| {
        format!(
            "[[rule]]\nname = \"r\"\nmatch = \"s/{{d}}\"\nto = [{{ upstream = \"cloud\", topic = \"{topic}/{{d}}\" }}]\n"
        )
    };
    std::fs::write(&file, rule("v1")).unwrap();
    let (cloud, gw, sensor) = gateway_with_rules(dir.path(), rules.path(), "#").await;
    let m = gw.running.metrics.clone();

    sensor.publish("s/x", "1").await;
    cloud.wait_for(1).await;

    std::fs::write(&file, rule("v2")).unwrap();
    wait_until("reloaded", || m.reloads_ok.load(Relaxed) >= 1).await;
    sensor.publish("s/x", "2").await;
    cloud.wait_for(2).await;

    std::fs::write(
        &file,
        "[[rule]]\nname = \"r\"\nmatch = \"s/{d}\"\nwhen = \"(\"\n",
    )
    .unwrap();
    wait_until("reload refused", || m.reloads_failed.load(Relaxed) >= 1).await;
    sensor.publish("s/x", "3").await;
    let got = cloud.wait_for(3).await;
    let topics: Vec<&str> = got.iter().map(|m| m.topic.as_str()).collect();
    assert_eq!(topics, ["v1/x", "v2/x", "v2/x"]);

    // An explicit reload (what SIGHUP does) also works.
    std::fs::write(&file, rule("v3")).unwrap();
    gw.running.reload();
    wait_until("reloaded again", || m.reloads_ok.load(Relaxed) >= 2).await;
    sensor.publish("s/x", "4").await;
    let got = cloud.wait_for(4).await;
    assert_eq!(got[3].topic, "v3/x");
    gw.stop().await;
}
