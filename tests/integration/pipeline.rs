//! End to end: sensors publish JSON and CBOR to the embedded broker, the
//! example rules route them, and the upstream broker receives every event on
//! the templated topic, in order per device: JSON byte for byte, CBOR
//! re-encoded as JSON with the fields the rule adds.

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_cbor_events_arrive_upstream_on_templated_topics_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream_broker();
    let sub = Subscriber::start(upstream, "#").await;
    let gw = Gateway::start(dir.path(), upstream.port()).await;
    let sensor = Sensor::connect(gw.addr).await;

    const N: usize = 100;
    let mut sent = 0;
    for seq in 0..N {
        for dev in ["t1", "t2"] {
            sensor
                .publish(
                    &format!("sensors/hall/{dev}/temperature"),
                    reading(dev, seq),
                )
                .await;
            sent += 1;
        }
        let mut cbor = Vec::new();
        ciborium::into_writer(&serde_json::json!({"seq": seq, "rpm": 1200}), &mut cbor).unwrap();
        sensor.publish("devices/pump7/telemetry", cbor).await;
        sent += 1;
    }
    // Neither of these is forwarded: one matches no rule, one a drop rule.
    sensor.publish("lab/unrouted", "x").await;
    sensor.publish("sensors/hall/t1/debug/trace", "y").await;
    sensor.wait_acked(sent + 2).await;

    let got = sub.wait_for(sent).await;
    for (topic, prefix) in [
        ("plant/hall/t1/temp", "t1"),
        ("plant/hall/t2/temp", "t2"),
        ("fleet/pump7/telemetry", "cbor"),
    ] {
        let seqs: Vec<u64> = got
            .iter()
            .filter(|m| m.topic == topic)
            .map(|m| seq_of(&m.payload))
            .collect();
        assert_eq!(
            seqs,
            (0..N as u64).collect::<Vec<_>>(),
            "{prefix}: every event, in order, once"
        );
    }
    assert_eq!(
        got.len(),
        sent,
        "nothing else arrived: {:?}",
        got.iter().map(|m| &m.topic).collect::<Vec<_>>()
    );
    // Payloads arrive byte for byte as published.
    let first_t1 = got
        .iter()
        .find(|m| m.topic == "plant/hall/t1/temp")
        .unwrap();
    assert_eq!(first_t1.payload, reading("t1", 0));
    let first_cbor = got
        .iter()
        .find(|m| m.topic == "fleet/pump7/telemetry")
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&first_cbor.payload).unwrap();
    let received_ms = json["received_ms"].as_u64().expect("received_ms added");
    assert_eq!(
        json,
        serde_json::json!({"seq": 0, "rpm": 1200, "device": "pump7", "received_ms": received_ms})
    );

    wait_until("queue emptied after acks", || gw.queued("cloud") == 0).await;
    let m = &gw.running.metrics;
    use std::sync::atomic::Ordering::Relaxed;
    wait_until("the two dropped events counted", || {
        m.dropped_unmatched.load(Relaxed) + m.dropped_rule.load(Relaxed) == 2
    })
    .await;
    assert_eq!(m.received.load(Relaxed), sent as u64 + 2);
    assert_eq!(m.decoded_json.load(Relaxed), 2 * N as u64);
    assert_eq!(m.decoded_cbor.load(Relaxed), N as u64);
    assert_eq!(m.dropped_unmatched.load(Relaxed), 1);
    assert_eq!(m.dropped_rule.load(Relaxed), 1);
    assert_eq!(m.uplinks["cloud"].acked.load(Relaxed), sent as u64);
    gw.stop().await;
    assert_eq!(queued_in(&dir.path().join("queue.db"), "cloud"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_sensors_publish_through_the_v5_listener() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream_broker();
    let sub = Subscriber::start(upstream, "#").await;
    let text = config_text(dir.path(), upstream.port(), "").replacen(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\nlisten_v5 = \"127.0.0.1:0\"",
        1,
    );
    let gw = Gateway::start_with(dir.path(), &text).await;
    let v5 = gw.running.broker_addr_v5.expect("v5 listener");
    let humidity = br#"{"value": 55.5, "seq": 7}"#.to_vec();

    let mut opts = rumqttc::v5::MqttOptions::new("sensor-v5", "127.0.0.1", v5.port());
    opts.set_keep_alive(std::time::Duration::from_secs(5));
    let (client, mut el) = rumqttc::v5::AsyncClient::new(opts, 10);
    let (acked_tx, acked) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut acked_tx = Some(acked_tx);
        while let Ok(ev) = el.poll().await {
            if let rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::PubAck(_)) = ev
                && let Some(tx) = acked_tx.take()
            {
                let _ = tx.send(());
            }
        }
    });
    client
        .publish(
            "sensors/roof/r1/humidity",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            humidity.clone(),
        )
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, acked)
        .await
        .expect("v5 PUBACK")
        .unwrap();
    let got = sub.wait_for(1).await;
    assert_eq!(got[0].topic, "plant/roof/r1/humidity");
    assert_eq!(got[0].payload, humidity);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_can_never_be_sent_are_dead_lettered_and_do_not_block_the_queue() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream_broker();
    let sub = Subscriber::start(upstream, "#").await;
    let text = config_text(dir.path(), upstream.port(), "max_packet_size = \"1KiB\"\n");
    let gw = Gateway::start_with(dir.path(), &text).await;
    let sensor = Sensor::connect(gw.addr).await;
    // A wildcard in a topic name is refused at the front door (counted),
    // so it never reaches a row.
    raw_publish(gw.addr, "sensors/a/+/temperature", &reading("w", 0)).await;
    // Fits the local broker (256KiB) but not this upstream (1KiB).
    let big = serde_json::json!({"value": 20.0, "device": "x".repeat(4096)});
    sensor
        .publish("sensors/a/big/temperature", big.to_string())
        .await;
    for seq in 1..=20 {
        sensor
            .publish("sensors/a/ok/temperature", reading("ok", seq))
            .await;
    }
    let got = sub.wait_for(20).await;
    let seqs: Vec<u64> = got.iter().map(|m| seq_of(&m.payload)).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<u64>>());
    let up = &gw.running.metrics.uplinks["cloud"];
    wait_until("queue empty", || gw.queued("cloud") == 0).await;
    assert_eq!(up.dead_lettered.load(Relaxed), 1);
    assert_eq!(gw.count(|m| &m.door_rejected_topic), 1);
    assert_eq!(up.acked.load(Relaxed), 20);
    assert_eq!(up.connects.load(Relaxed), 1, "no reconnect loop");
    gw.stop().await;
}
