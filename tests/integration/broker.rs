//! The rumqttd behaviours edgeferry must handle (see src/broker.rs and
//! src/ingest.rs), each triggered for real.

use rumqttc::QoS;
use std::sync::atomic::Ordering::Relaxed;

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_retained_publish_is_ingested_once_and_forwarded_at_the_route_qos() {
    // The link sees every publish as QoS 0, retain=false: the route decides.
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream_broker();
    let sub = Subscriber::start(upstream, "#").await;
    let gw = Gateway::start(dir.path(), upstream.port()).await;
    let sensor = Sensor::connect(gw.addr).await;
    sensor
        .client
        .publish(
            "sensors/a/t9/temperature",
            QoS::AtLeastOnce,
            true,
            reading("t9", 1),
        )
        .await
        .unwrap();
    sensor.wait_acked(1).await;
    let got = sub.wait_for(1).await;
    assert_eq!(got[0].topic, "plant/a/t9/temp");
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
    assert!(!got[0].retain);
    // A second sensor connecting does not get the retained message re-ingested.
    let _other = Sensor::connect(gw.addr).await;
    sensor
        .publish("sensors/a/t9/temperature", reading("t9", 2))
        .await;
    sub.wait_for(2).await;
    assert_eq!(gw.count(|m| &m.received), 2);
    assert_eq!(sub.count(), 2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_two_sensors_is_forwarded_exactly() {
    // 3,000 QoS 1 publishes as fast as the front door acknowledges them:
    // every one arrives upstream, none is lost on the way.
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream_broker();
    let sub = Subscriber::start(upstream, "#").await;
    let gw = Gateway::start(dir.path(), upstream.port()).await;
    let sensors = [
        Sensor::connect(gw.addr).await,
        Sensor::connect(gw.addr).await,
    ];
    const N: usize = 1500;
    for seq in 0..N {
        for (i, s) in sensors.iter().enumerate() {
            s.publish(
                &format!("sensors/burst/s{i}/temperature"),
                reading("b", seq),
            )
            .await;
        }
    }
    for s in &sensors {
        s.wait_acked(N).await;
    }
    sub.wait_for(2 * N).await;
    assert_eq!(gw.count(|m| &m.received), 2 * N as u64);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_outside_the_ingest_filters_are_acked_but_not_ingested() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream_broker();
    let text = config_text(dir.path(), upstream.port(), "").replacen(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\ningest = [\"sensors/#\"]",
        1,
    );
    let gw = Gateway::start_with(dir.path(), &text).await;
    let sensor = Sensor::connect(gw.addr).await;
    sensor.publish("elsewhere/x", "1").await;
    sensor
        .publish("sensors/a/b/temperature", reading("b", 0))
        .await;
    sensor.wait_acked(2).await;
    wait_until("the sensors/ publish ingested", || {
        gw.count(|m| &m.received) == 1
    })
    .await;
    wait_until("it is forwarded", || {
        gw.running.metrics.uplinks["cloud"].acked.load(Relaxed) == 1
    })
    .await;
    assert_eq!(gw.count(|m| &m.received), 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_taking_the_link_client_id_is_refused_and_the_daemon_runs_on() {
    // Before the front door, such a client kicked edgeferry's own link off
    // the embedded broker and the daemon had to stop.
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(upstream_broker(), false).await;
    let gw = Gateway::start(dir.path(), proxy.port).await;
    let sensor = Sensor::connect(gw.addr).await;
    assert!(
        gw.running.link_id.starts_with("edgeferry-link-") && gw.running.link_id.len() > 30,
        "unguessable id"
    );
    let mut opts =
        rumqttc::MqttOptions::new(gw.running.link_id.clone(), "127.0.0.1", gw.addr.port());
    opts.set_keep_alive(std::time::Duration::from_secs(5));
    let (_client, mut el) = rumqttc::AsyncClient::new(opts, 10);
    let refused = tokio::time::timeout(DEADLINE, async {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(a))) => break Ok(a),
                Ok(_) => {}
                Err(e) => break Err(e.to_string()),
            }
        }
    })
    .await
    .expect("an answer");
    assert!(refused.is_err(), "the reserved id got in: {refused:?}");
    for seq in 0..10 {
        sensor
            .publish("sensors/a/k/temperature", reading("k", seq))
            .await;
    }
    sensor.wait_acked(10).await;
    wait_until("stored", || gw.queued("cloud") == 10).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_already_in_use_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let text = listen_on(&config_text(dir.path(), free_port(), ""), port);
    let err = match edgeferry::start(load_config(dir.path(), &text)).await {
        Ok(_) => panic!("started on a taken port"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("already in use"),
        "{err}"
    );
}
