//! Event contracts through the real broker: an event that breaks its
//! schema stops at the gateway (dead-lettered locally with the field and
//! why, counted per schema), one that keeps it is forwarded.

use serde_json::{Value, json};

use crate::util::*;

const SCHEMA: &str = r#"{
  "type": "object",
  "required": ["value", "unit"],
  "properties": { "value": { "type": "number" }, "unit": { "enum": ["C", "F"] } },
  "additionalProperties": false
}"#;

const RULES: &str = r#"
[[schema]]
name = "temperature"
match = "sensors/+/temperature"
file = "temperature.json"
enforce = true

[[rule]]
name = "to-cloud"
match = "sensors/{device}/temperature"
to = [{ upstream = "cloud", topic = "plant/{device}/temp" }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_breaks_its_schema_is_dead_lettered_with_the_field_and_never_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rules = d.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(rules.join("temperature.json"), SCHEMA).unwrap();
    std::fs::write(rules.join("10-rules.toml"), RULES).unwrap();
    let upstream = upstream_broker();
    let cloud = Subscriber::start(upstream, "plant/#").await;
    let text = rules_at(
        &config_text(d, upstream.port(), ""),
        &rules,
        "dead_letter = \"edgeferry/dead-letter\"",
    );
    let gw = Gateway::start_with(d, &text).await;
    let dead = Subscriber::start(gw.addr, "edgeferry/dead-letter").await;
    let sensor = Sensor::connect(gw.addr).await;

    let bad: [(Value, &str, &str); 3] = [
        (json!({"value": "hot", "unit": "C"}), "/value", "number"),
        (json!({"value": 20.0}), "", "unit"),
        (json!({"value": 20.0, "unit": "C", "debug": 1}), "", "debug"),
    ];
    for (payload, _, _) in &bad {
        sensor
            .publish("sensors/t1/temperature", payload.to_string())
            .await;
    }
    sensor
        .publish(
            "sensors/t1/temperature",
            json!({"value": 21.5, "unit": "C"}).to_string(),
        )
        .await;
    sensor.wait_acked(4).await;

    let got = cloud.wait_for(1).await;
    assert_eq!(got[0].topic, "plant/t1/temp");
    let letters = dead.wait_for(3).await;
    for (m, (payload, path, word)) in letters.iter().zip(&bad) {
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["reason"], "schema", "{v}");
        assert_eq!(v["schema"], "temperature");
        assert_eq!(v["path"], *path, "{v}");
        assert!(v["message"].as_str().unwrap().contains(word), "{v}");
        assert_eq!(v["payload"], payload.to_string());
    }
    let metrics = gw.running.metrics_addr.unwrap();
    let (_, scrape) = http_get(metrics, "/metrics").await;
    assert_eq!(
        sample(
            &scrape,
            "edgeferry_events_schema_failed_total{schema=\"temperature\"}"
        ),
        3.0
    );
    assert_eq!(sample(&scrape, "edgeferry_dead_letters_total"), 3.0);
    assert_eq!(cloud.count(), 1, "the broken ones never left");
    gw.stop().await;
}

/// The example rules as shipped: a door contact on firmware 1.x reaches
/// the cloud as the v2 event the cloud consumes, a v2 one as it came, and
/// one of a version the gateway does not know is dead-lettered as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_rules_upcast_a_v1_event_to_v2_and_dead_letter_an_unknown_version() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let upstream = upstream_broker();
    let cloud = Subscriber::start(upstream, "plant/+/+/door").await;
    let text = rules_at(
        &config_text(d, upstream.port(), ""),
        &repo_rules(),
        "dead_letter = \"edgeferry/dead-letter\"",
    );
    let gw = Gateway::start_with(d, &text).await;
    let dead = Subscriber::start(gw.addr, "edgeferry/dead-letter").await;
    let sensor = Sensor::connect(gw.addr).await;

    let events = [
        json!({"v": 1, "state": "open", "battery": 80}),
        json!({"v": 3, "open": true}),
        json!({"v": 2, "open": false, "battery_pct": 79}),
        json!({"v": 1, "open": true}),
    ];
    for e in &events {
        sensor.publish("doors/yard/gate", e.to_string()).await;
    }
    sensor.wait_acked(events.len()).await;

    let got = cloud.wait_for(2).await;
    let first: Value = serde_json::from_slice(&got[0].payload).unwrap();
    assert_eq!(got[0].topic, "plant/yard/gate/door");
    assert_eq!(first, json!({"v": 2, "open": true, "battery_pct": 80}));
    let second: Value = serde_json::from_slice(&got[1].payload).unwrap();
    assert_eq!(second, events[2]);

    let letters = dead.wait_for(2).await;
    let unknown: Value = serde_json::from_slice(&letters[0].payload).unwrap();
    assert_eq!(unknown["reason"], "schema_version", "{unknown}");
    assert_eq!(unknown["schema"], "door");
    assert_eq!(unknown["path"], "/v");
    assert!(
        unknown["message"].as_str().unwrap().contains("\"3\""),
        "{unknown}"
    );
    let broken: Value = serde_json::from_slice(&letters[1].payload).unwrap();
    assert_eq!(broken["reason"], "schema", "{broken}");

    let metrics = gw.running.metrics_addr.unwrap();
    let (_, scrape) = http_get(metrics, "/metrics").await;
    assert_eq!(
        sample(
            &scrape,
            "edgeferry_events_schema_failed_total{schema=\"door\"}"
        ),
        2.0
    );
    assert_eq!(
        cloud.count(),
        2,
        "neither the unknown nor the broken one left"
    );
    gw.stop().await;
}
