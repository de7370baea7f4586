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

const DOOR_RULES: &str = r#"
[[schema]]
name = "door"
version = 1
match = "doors/+/+"
file = "door.v1.schema.json"
version_field = "v"
enforce = true

[[schema]]
name = "door"
version = 2
match = "doors/+/+"
file = "door.v2.schema.json"
version_field = "v"
enforce = true

[[rule]]
name = "door-v1-upcast"
match = "doors/{site}/{door}"
when = "payload.v == 1"
set = { v = "2", open = "payload.state == 'open'" }
drop_fields = ["state"]
rename = { battery = "battery_pct" }
to = [{ upstream = "cloud", topic = "plant/{site}/{door}/door", envelope = "cloudevents" }]
stop = true

[[rule]]
name = "door-to-cloud"
match = "doors/{site}/{door}"
to = [{ upstream = "cloud", topic = "plant/{site}/{door}/door", envelope = "cloudevents", event_source = "urn:site:{site}:door:{door}", event_type = "com.example.door.v{payload.v}" }]
"#;

/// A CloudEvents structured event as the cloud subscriber receives it:
/// every required attribute, the time the gateway received it, the schema
/// the data keeps (an upcast's output claims the current version), the
/// data itself, and the templates for `source` and `type`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_wraps_the_event_in_a_cloudevent_the_cloud_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rules = d.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    for f in ["door.v1.schema.json", "door.v2.schema.json"] {
        std::fs::copy(repo_rules().join(f), rules.join(f)).unwrap();
    }
    std::fs::write(rules.join("10-doors.toml"), DOOR_RULES).unwrap();
    let upstream = upstream_broker();
    let cloud = Subscriber::start(upstream, "plant/#").await;
    let text = rules_at(&config_text(d, upstream.port(), ""), &rules, "");
    let gw = Gateway::start_with(d, &text).await;
    let sensor = Sensor::connect(gw.addr).await;
    let before = std::time::SystemTime::now() - std::time::Duration::from_secs(1);
    sensor
        .publish(
            "doors/yard/gate",
            json!({"v": 1, "state": "open", "battery": 80}).to_string(),
        )
        .await;
    sensor
        .publish(
            "doors/yard/gate",
            json!({"v": 2, "open": false}).to_string(),
        )
        .await;
    sensor.wait_acked(2).await;
    let got = cloud.wait_for(2).await;
    let after = std::time::SystemTime::now() + std::time::Duration::from_secs(1);

    let events: Vec<Value> = got
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    for (m, ce) in got.iter().zip(&events) {
        assert_eq!(m.topic, "plant/yard/gate/door");
        assert_eq!(ce["specversion"], "1.0", "{ce}");
        let id = ce["id"].as_str().expect("id");
        uuid::Uuid::parse_str(id).unwrap_or_else(|e| panic!("id {id:?}: {e}"));
        let time = humantime::parse_rfc3339(ce["time"].as_str().expect("time")).unwrap();
        assert!(before <= time && time <= after, "{ce}");
        assert_eq!(ce["datacontenttype"], "application/json");
        assert_eq!(
            ce["dataschema"], "https://example.com/edgeferry/schemas/door-v2.json",
            "{ce}"
        );
    }
    assert_ne!(events[0]["id"], events[1]["id"]);
    assert_eq!(events[0]["source"], "edgeferry://test/doors/yard/gate");
    assert_eq!(events[0]["type"], "door.v2", "the upcast's output is v2");
    assert_eq!(
        events[0]["data"],
        json!({"v": 2, "open": true, "battery_pct": 80})
    );
    assert_eq!(events[1]["source"], "urn:site:yard:door:gate");
    assert_eq!(events[1]["type"], "com.example.door.v2");
    assert_eq!(events[1]["data"], json!({"v": 2, "open": false}));
    gw.stop().await;
}

/// A schema file is part of the rules: an edit to it reloads them (the
/// watcher sees `*.json` as it sees `*.toml`), and an edit that breaks it
/// keeps the old contract running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_schema_file_is_reloaded_and_a_broken_one_keeps_the_old_contract() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rules = d.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    let schema = rules.join("temperature.json");
    let value_is = |types: &str| {
        format!(
            r#"{{"type": "object", "required": ["value"], "properties": {{"value": {{"type": {types}}}}}}}"#
        )
    };
    std::fs::write(&schema, value_is(r#""number""#)).unwrap();
    std::fs::write(rules.join("10-rules.toml"), RULES).unwrap();
    let upstream = upstream_broker();
    let cloud = Subscriber::start(upstream, "plant/#").await;
    let text = rules_at(&config_text(d, upstream.port(), ""), &rules, "");
    let gw = Gateway::start_with(d, &text).await;
    let m = gw.running.metrics.clone();
    let sensor = Sensor::connect(gw.addr).await;
    let t = "sensors/t1/temperature";

    sensor.publish(t, r#"{"value": "21.5"}"#).await;
    sensor.publish(t, r#"{"value": 21.5}"#).await;
    cloud.wait_for(1).await;
    wait_until("the string dead-lettered", || {
        m.dead_letters.load(Relaxed) == 1
    })
    .await;

    // Firmware 2 sends strings; the contract is widened by editing the file.
    std::fs::write(&schema, value_is(r#"["number", "string"]"#)).unwrap();
    wait_until("reloaded", || m.reloads_ok.load(Relaxed) >= 1).await;
    sensor.publish(t, r#"{"value": "22.0"}"#).await;
    let got = cloud.wait_for(2).await;
    assert_eq!(&got[1].payload[..], br#"{"value": "22.0"}"#);

    // A broken edit: not JSON. The reload fails; the widened contract stays.
    std::fs::write(&schema, r#"{"type": "object", "#).unwrap();
    wait_until("reload refused", || m.reloads_failed.load(Relaxed) >= 1).await;
    sensor.publish(t, r#"{"value": "23.0"}"#).await;
    sensor.publish(t, r#"{"value": true}"#).await;
    cloud.wait_for(3).await;
    wait_until("the bool dead-lettered", || {
        m.dead_letters.load(Relaxed) == 2
    })
    .await;
    sensor.wait_acked(5).await;
    assert_eq!(cloud.count(), 3);
    gw.stop().await;
}
