//! Against a real Mosquitto as the upstream broker, over MQTT 3.1.1 and 5:
//! forwarding, an outage, and a reconnect to a broker that kept the session
//! (`session_present`) or lost it, with no event lost either way; MQTT 5
//! event ids, message expiry, Receive Maximum and PUBACK reason codes.
//! And local clients of another implementation (mosquitto_pub/_sub) through
//! the embedded broker.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::util::*;

/// A gateway forwarding to `upstream_port` (a proxy in front of Mosquitto)
/// with `cloud_keys` in `[upstream.cloud]`.
async fn gateway(dir: &Path, upstream_port: u16, cloud_keys: &str) -> Gateway {
    Gateway::start_with(dir, &config_text(dir, upstream_port, cloud_keys)).await
}

async fn publish_readings(gw: &Gateway, device: &str, seqs: std::ops::Range<usize>) {
    let sensor = Sensor::connect(gw.addr).await;
    let n = seqs.len();
    for seq in seqs {
        sensor
            .publish(
                &format!("sensors/yard/{device}/temperature"),
                reading(device, seq),
            )
            .await;
    }
    sensor.wait_acked(n).await;
}

/// Forward, cut the uplink, queue more, restart Mosquitto (with its
/// persistence file if `keep_session`, else fresh), reconnect: every event
/// arrives, and the gateway saw the session as the broker reports it.
async fn outage_and_restart(protocol: &str, keep_session: bool) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mosq_dir = d.join("mosquitto");
    let mosq = Mosquitto::start(&mosq_dir, &[""]).await;
    let ports = mosq.ports.clone();
    let sub_id = format!("sub-{}", uuid::Uuid::new_v4().simple());
    let sub = Subscriber::start_with(mosq.addr(0), "plant/#", Some(&sub_id)).await;
    let proxy = Proxy::start(mosq.addr(0), true).await;
    let gw = gateway(d, proxy.port, &format!("protocol = \"{protocol}\"")).await;
    let up = gw.running.metrics.uplinks["cloud"].clone();

    const N1: usize = 100;
    const N2: usize = 300;
    publish_readings(&gw, "d1", 0..N1).await;
    wait_until("first events upstream", || sub.distinct_seqs().len() == N1).await;
    assert!(
        !up.session_present.load(Relaxed),
        "a fresh broker has no session"
    );

    // Outage: the uplink is cut, events queue on disk.
    proxy.set_up(false);
    publish_readings(&gw, "d1", N1..N1 + N2).await;
    wait_until("queued during the outage", || {
        gw.queued("cloud") >= N2 as u64
    })
    .await;

    // The broker restarts, with or without the sessions it had.
    mosq.stop();
    let mosq_dir = if keep_session {
        mosq_dir
    } else {
        d.join("mosquitto-fresh")
    };
    let mosq = Mosquitto::start_on(&mosq_dir, &[""], ports).await;
    // The subscriber is back (and subscribed again if its session was lost)
    // before the uplink is let in.
    let expected_subs = if keep_session { 1 } else { 2 };
    wait_until("subscriber back", || sub.subscriptions() >= expected_subs).await;
    let connects = up.connects.load(Relaxed);
    proxy.set_up(true);
    wait_until("every event upstream", || {
        sub.distinct_seqs().len() == N1 + N2
    })
    .await;
    assert_eq!(
        sub.distinct_seqs(),
        (0..(N1 + N2) as u64).collect::<BTreeSet<_>>()
    );
    wait_until("queue drained", || gw.queued("cloud") == 0).await;
    assert!(up.connects.load(Relaxed) > connects);
    assert_eq!(
        up.session_present.load(Relaxed),
        keep_session,
        "session_present as the broker reported it"
    );
    gw.stop().await;
    drop(mosq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_session_kept_across_a_broker_restart_loses_nothing() {
    outage_and_restart("3.1.1", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_session_lost_by_the_broker_loses_nothing() {
    outage_and_restart("3.1.1", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_session_kept_across_a_broker_restart_loses_nothing() {
    outage_and_restart("5", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_session_lost_by_the_broker_loses_nothing() {
    outage_and_restart("5", false).await;
}

/// A publish as an MQTT 5 subscriber sees it.
#[derive(Debug, Clone)]
struct V5Message {
    topic: String,
    payload: Vec<u8>,
    user_properties: Vec<(String, String)>,
    expiry: Option<u32>,
    content_type: Option<String>,
}

/// An MQTT 5 subscriber (rumqttc v5) on `addr`, collecting what arrives.
async fn v5_subscriber(
    addr: std::net::SocketAddr,
    filter: &str,
) -> std::sync::Arc<std::sync::Mutex<Vec<V5Message>>> {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let mut opts = MqttOptions::new(
        format!("v5sub-{}", uuid::Uuid::new_v4().simple()),
        "127.0.0.1",
        addr.port(),
    );
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(opts, 100);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let got: std::sync::Arc<std::sync::Mutex<Vec<V5Message>>> = Default::default();
    let sink = got.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _client = client;
        let mut tx = Some(tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let props = p.properties.unwrap_or_default();
                    sink.lock().unwrap().push(V5Message {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.to_vec(),
                        user_properties: props.user_properties,
                        expiry: props.message_expiry_interval,
                        content_type: props.content_type,
                    });
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    tokio::time::timeout(DEADLINE, rx).await.unwrap().unwrap();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_upstream_sends_ids_and_expiry_honours_receive_maximum_and_counts_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Receive Maximum 5; anonymous clients may write under plant/ only, so
    // the diagnostics route (fleet/...) is refused with "not authorized".
    let acl = d.join("acl");
    std::fs::write(&acl, "topic readwrite plant/#\n").unwrap();
    let mosq = Mosquitto::start(
        &d.join("mosquitto"),
        &[&format!(
            "max_inflight_messages 5\nacl_file {}",
            acl.display()
        )],
    )
    .await;
    // Mosquitto applies max_inflight_messages and the ACL globally.
    let got = v5_subscriber(mosq.addr(0), "plant/#").await;
    let gw = gateway(
        d,
        mosq.ports[0],
        "protocol = \"5\"\nreplay_marker = \"replayed\"",
    )
    .await;
    let up = gw.running.metrics.uplinks["cloud"].clone();
    wait_until("connected", || up.connected.load(Relaxed)).await;
    assert_eq!(up.window.load(Relaxed), 5, "the server's Receive Maximum");

    let sensor = Sensor::connect(gw.addr).await;
    const N: usize = 200;
    for seq in 0..N {
        sensor
            .publish("sensors/yard/d1/temperature", reading("d1", seq))
            .await;
    }
    sensor.publish("alarms/yard/door", reading("door", 0)).await;
    for seq in 0..3 {
        sensor.publish("diag/pump", reading("pump", seq)).await;
    }
    sensor.wait_acked(N + 4).await;
    let g = got.clone();
    wait_until("every plant event", || g.lock().unwrap().len() == N + 1).await;
    wait_until("refused diagnostics dead-lettered", || {
        up.dead_lettered.load(Relaxed) == 3
    })
    .await;
    wait_until("queue empty", || gw.queued("cloud") == 0).await;
    assert_eq!(
        up.refusals.lock().unwrap().get("not_authorized").copied(),
        Some(3)
    );

    let got = got.lock().unwrap().clone();
    let temps: Vec<u64> = got
        .iter()
        .filter(|m| m.topic == "plant/yard/d1/temp")
        .map(|m| seq_of(&m.payload))
        .collect();
    assert_eq!(temps, (0..N as u64).collect::<Vec<_>>(), "in order, once");
    let mut ids = BTreeSet::new();
    for m in &got {
        let id = m
            .user_properties
            .iter()
            .find(|(k, _)| k == "event_id")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no event_id on {m:?}"));
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
        ids.insert(id);
        // Live events: no replay marker.
        assert!(!m.user_properties.iter().any(|(k, _)| k == "replayed"));
    }
    assert_eq!(ids.len(), N + 1, "one id per event");
    // The alarm route's ttl (24h) is the message expiry; readings have none.
    let alarm = got.iter().find(|m| m.topic.ends_with("/alarm")).unwrap();
    let expiry = alarm.expiry.expect("expiry on the alarm");
    assert!((86_000..=86_400).contains(&expiry), "{expiry}");
    assert!(
        got.iter()
            .filter(|m| m.topic.ends_with("/temp"))
            .all(|m| m.expiry.is_none())
    );
    gw.stop().await;
}

/// A `mosquitto_sub` child that exits after one message.
pub struct MosquittoSub {
    child: tokio::process::Child,
    /// What it printed after subscribing, once it has exited.
    rest: tokio::sync::oneshot::Receiver<Vec<String>>,
}

impl MosquittoSub {
    /// Subscribe on `port` with `version` ("mqttv311" or "mqttv5"); returns
    /// once the subscription is acknowledged.
    pub async fn start(port: u16, version: &str, filter: &str) -> MosquittoSub {
        use tokio::io::AsyncBufReadExt;
        // Line-buffered, or its debug lines wait in stdio's buffer.
        let mut child = tokio::process::Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args(["-d", "-v", "-V", version, "-q", "1", "-C", "1", "-W", "60"])
            .args(["-p", &port.to_string(), "-t", filter])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto_sub (apt install mosquitto-clients)");
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        tokio::time::timeout(DEADLINE, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains("SUBACK") {
                    break;
                }
            }
        })
        .await
        .expect("mosquitto_sub subscribed");
        let (tx, rest) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut out = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                out.push(line);
            }
            let _ = tx.send(out);
        });
        MosquittoSub { child, rest }
    }

    /// Wait for it to exit (after its one message); its output lines.
    pub async fn output(mut self) -> Vec<String> {
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("mosquitto_sub exits after one message")
            .unwrap();
        assert!(status.success(), "mosquitto_sub: {status}");
        self.rest.await.unwrap()
    }
}

pub fn mosquitto_pub(port: u16, version: &str, topic: &str, payload: &str) {
    let status = std::process::Command::new("mosquitto_pub")
        .args(["-V", version, "-q", "1", "-p", &port.to_string()])
        .args(["-t", topic, "-m", payload])
        .status()
        .expect("mosquitto_pub (apt install mosquitto-clients)");
    assert!(status.success(), "mosquitto_pub {version}: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_publish_and_subscribe_through_the_embedded_broker_v311_and_v5() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream_broker();
    let sub = Subscriber::start(upstream, "plant/#").await;
    let text = config_text(dir.path(), upstream.port(), "").replacen(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\nlisten_v5 = \"127.0.0.1:0\"",
        1,
    );
    let gw = Gateway::start_with(dir.path(), &text).await;
    let v3 = gw.addr.port();
    let v5 = gw.running.broker_addr_v5.unwrap().port();

    // Subscribers of both versions on a local alert topic.
    let sub_v3 = MosquittoSub::start(v3, "mqttv311", "alerts/#").await;
    let sub_v5 = MosquittoSub::start(v5, "mqttv5", "alerts/#").await;
    // A hot reading published with MQTT 3.1.1 raises the local alert
    // (republished to both) and goes upstream.
    mosquitto_pub(
        v3,
        "mqttv311",
        "sensors/yard/t9/temperature",
        r#"{"value": 35.0, "unit": "C"}"#,
    );
    for out in [sub_v3.output().await, sub_v5.output().await] {
        let line = out
            .iter()
            .find(|l| l.starts_with("alerts/yard/t9 "))
            .cloned();
        let line = line.unwrap_or_else(|| panic!("no alert in {out:?}"));
        assert!(line.contains("high-temperature"), "{line}");
    }
    // One published with MQTT 5 goes upstream too.
    mosquitto_pub(
        v5,
        "mqttv5",
        "sensors/yard/t8/temperature",
        r#"{"value": 21.0, "unit": "C"}"#,
    );
    let got = sub.wait_for(2).await;
    let topics: BTreeSet<String> = got.iter().map(|m| m.topic.clone()).collect();
    assert_eq!(
        topics,
        BTreeSet::from([
            "plant/yard/t9/temp".to_string(),
            "plant/yard/t8/temp".to_string()
        ])
    );
    gw.stop().await;
}

/// Two named upstreams, each with its own session, queue partition and
/// state: an outage of one does not hold up the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_upstream_has_its_own_session_and_queue() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rules = d.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("fan-out.toml"),
        r#"
[[rule]]
name = "to both"
match = "sensors/{site}/{device}/temperature"
to = [
  { upstream = "cloud", topic = "plant/{site}/{device}/temp" },
  { upstream = "archive", topic = "archive/{site}/{device}", priority = "low" },
]
"#,
    )
    .unwrap();
    let cloud = upstream_broker();
    let cloud_sub = Subscriber::start(cloud, "plant/#").await;
    let proxy = Proxy::start(cloud, false).await;
    let mosq = Mosquitto::start(&d.join("mosquitto"), &[""]).await;
    let archive_sub = Subscriber::start(mosq.addr(0), "archive/#").await;
    let text = rules_at(&config_text(d, proxy.port, ""), &rules, "")
        + &format!(
            "\n[upstream.archive]\nurl = \"mqtt://127.0.0.1:{}\"\nprotocol = \"5\"\ninflight = 8\n",
            mosq.ports[0]
        );
    let gw = Gateway::start_with(d, &text).await;
    let m = gw.running.metrics.clone();

    const N: usize = 200;
    publish_readings(&gw, "d1", 0..N).await;
    // The archive gets everything while the cloud is down...
    let got = archive_sub.wait_for(N).await;
    let seqs: Vec<u64> = got.iter().map(|m| seq_of(&m.payload)).collect();
    assert_eq!(seqs, (0..N as u64).collect::<Vec<_>>());
    // ...and the cloud's events wait in its own partition of the queue.
    wait_until("cloud's events queued", || gw.queued("cloud") == N as u64).await;
    wait_until("archive's queue empty", || gw.queued("archive") == 0).await;
    assert!(!m.uplinks["cloud"].connected.load(Relaxed));
    assert!(m.uplinks["archive"].connected.load(Relaxed));
    assert_eq!(m.uplinks["archive"].window.load(Relaxed), 8);
    assert_eq!(cloud_sub.count(), 0);

    proxy.set_up(true);
    let got = cloud_sub.wait_for(N).await;
    let seqs: Vec<u64> = got.iter().map(|m| seq_of(&m.payload)).collect();
    assert_eq!(seqs, (0..N as u64).collect::<Vec<_>>());
    assert_eq!(m.uplinks["archive"].acked.load(Relaxed), N as u64);
    gw.stop().await;
}

/// CloudEvents over MQTT 5 with Mosquitto upstream: in binary mode the
/// payload arrives unchanged with every attribute as a user property
/// (named as the attribute, as the MQTT binding says) and the content
/// type as MQTT's Content Type; in structured mode the Content Type says
/// it is a CloudEvent. The properties are stored with the queued row, so
/// an event that waited out an outage (and a restart) still has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_in_binary_mode_arrive_as_mqtt5_properties_even_after_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rules = d.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::copy(
        repo_rules().join("temperature.schema.json"),
        rules.join("temperature.schema.json"),
    )
    .unwrap();
    std::fs::write(
        rules.join("r.toml"),
        r#"
[[schema]]
name = "temperature"
match = "sensors/+/+/temperature"
file = "temperature.schema.json"
enforce = true

[[rule]]
name = "binary"
match = "sensors/{site}/{device}/temperature"
to = [
  { upstream = "cloud", topic = "plant/{site}/{device}/temp", envelope = "cloudevents-binary" },
  { upstream = "cloud", topic = "plant/{site}/{device}/ce", envelope = "cloudevents" },
]
"#,
    )
    .unwrap();
    let mosq = Mosquitto::start(&d.join("mosquitto"), &[""]).await;
    let got = v5_subscriber(mosq.addr(0), "plant/#").await;
    // The uplink goes through a proxy that starts down: the first event
    // waits in the queue (and the gateway restarts) before it is sent.
    let proxy = Proxy::start(mosq.addr(0), false).await;
    let text = rules_at(&config_text(d, proxy.port, "protocol = \"5\""), &rules, "");
    let gw = Gateway::start_with(d, &text).await;
    let sensor = Sensor::connect(gw.addr).await;
    let reading = serde_json::json!({"value": 21.5, "unit": "C", "seq": 1}).to_string();
    sensor
        .publish("sensors/yard/t1/temperature", reading.clone())
        .await;
    sensor.wait_acked(1).await;
    wait_until("queued", || gw.queued("cloud") == 2).await;
    drop(sensor);
    gw.stop().await;
    let gw = Gateway::start_with(d, &text).await;
    proxy.set_up(true);
    let g = got.clone();
    wait_until("both arrived", || g.lock().unwrap().len() == 2).await;

    let got = got.lock().unwrap().clone();
    let binary = got
        .iter()
        .find(|m| m.topic == "plant/yard/t1/temp")
        .unwrap();
    assert_eq!(binary.payload, reading.as_bytes(), "the payload unchanged");
    assert_eq!(binary.content_type.as_deref(), Some("application/json"));
    let attr = |name: &str| {
        binary
            .user_properties
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {name} in {:?}", binary.user_properties))
    };
    assert_eq!(attr("specversion"), "1.0");
    assert_eq!(attr("id"), attr("event_id"), "the event id");
    assert!(uuid::Uuid::parse_str(&attr("id")).is_ok());
    assert_eq!(
        attr("source"),
        "edgeferry://test/sensors/yard/t1/temperature"
    );
    assert_eq!(attr("type"), "temperature");
    assert_eq!(
        attr("dataschema"),
        "https://example.com/edgeferry/schemas/temperature.json"
    );
    humantime::parse_rfc3339(&attr("time")).unwrap();
    assert!(
        !binary
            .user_properties
            .iter()
            .any(|(k, _)| k.starts_with("ce_") || k == "datacontenttype"),
        "{:?}",
        binary.user_properties
    );

    let structured = got.iter().find(|m| m.topic == "plant/yard/t1/ce").unwrap();
    assert_eq!(
        structured.content_type.as_deref(),
        Some("application/cloudevents+json")
    );
    let ce: serde_json::Value = serde_json::from_slice(&structured.payload).unwrap();
    assert_eq!(ce["id"], attr("id").as_str(), "one event, one id");
    assert_eq!(ce["time"], attr("time").as_str());
    assert_eq!(ce["data"]["value"], 21.5);
    gw.stop().await;
}

/// Binary mode needs MQTT 5: with a 3.1.1 upstream the rules do not load,
/// and the error says where and what to change.
#[test]
fn cloudevents_binary_mode_towards_an_mqtt_3_upstream_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rules = d.join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("r.toml"),
        "[[rule]]\nname = \"b\"\nmatch = \"a/+\"\nto = [{ upstream = \"cloud\", envelope = \"cloudevents-binary\" }]\n",
    )
    .unwrap();
    let text = rules_at(&config_text(d, 1, ""), &rules, "");
    let Err(e) = edgeferry::Config::from_toml(&text, &d.join("edgeferry.toml"), d) else {
        panic!("loaded");
    };
    let e = e.to_string();
    assert!(e.contains("r.toml:4:"), "{e}");
    assert!(
        e.contains("upstream \"cloud\" speaks MQTT 3.1.1; set protocol = \"5\""),
        "{e}"
    );
    // The unmatched destination too.
    std::fs::write(rules.join("r.toml"), "").unwrap();
    let text = text.replace(
        "[rules]\n",
        "[rules]\nunmatched = { upstream = \"cloud\", envelope = \"cloudevents-binary\" }\n",
    );
    let Err(unmatched) = edgeferry::Config::from_toml(&text, &d.join("edgeferry.toml"), d) else {
        panic!("loaded");
    };
    let unmatched = unmatched.to_string();
    assert!(
        unmatched.contains("rules.unmatched: envelope = \"cloudevents-binary\""),
        "{unmatched}"
    );
}
