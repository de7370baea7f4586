//! The rumqttd behaviours edgeferry must handle (see src/broker.rs and
//! src/ingest.rs), each triggered for real.

use edgeferry::metrics::Metrics;
use rumqttc::QoS;
use std::sync::atomic::Ordering::Relaxed;
use tokio::sync::{mpsc, watch};

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
async fn ingest_keeps_reading_after_the_broker_unschedules_the_link() {
    // rumqttd unschedules a link after 200 queued forwards; without a wake it
    // stalls for good. A burst of 3,000 crosses that many times.
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
    assert_eq!(gw.count(|m| &m.broker_lost), 0);
    assert_eq!(gw.count(|m| &m.dropped_overflow), 0);
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
async fn messages_the_broker_skips_when_ingest_lags_are_counted() {
    // Tiny segments and an ingest that starts late: rumqttd drops what its
    // segments no longer hold, after the sensor got its PUBACK. Ingest must
    // count exactly what it never saw.
    let cfg: edgeferry::config::ConfigFile = toml::from_str(
        "[broker]\nlisten = \"127.0.0.1:0\"\nmax_payload = 512\nsegment_size = \"2KiB\"\nsegment_count = 2\n",
    )
    .unwrap();
    let broker = edgeferry::broker::start(&cfg.broker, Default::default())
        .await
        .unwrap();
    let sensor = Sensor::connect(broker.v4).await;
    const N: usize = 500;
    for seq in 0..N {
        sensor
            .publish("sensors/lag/d/temperature", reading("d", seq))
            .await;
    }
    sensor.wait_acked(N).await;

    let metrics = std::sync::Arc::new(Metrics::default());
    let (tx, mut rx) = mpsc::channel(N);
    let (stop_tx, stop) = watch::channel(false);
    let ingest = tokio::spawn(edgeferry::ingest::run(
        broker.link_rx,
        cfg.broker.ingest.clone(),
        tx,
        std::sync::Arc::new(edgeferry::republish::Tracker::new(&cfg.broker.ingest)),
        metrics.clone(),
        stop,
    ));
    let m = metrics.clone();
    wait_until("every publish either ingested or counted lost", || {
        m.received.load(Relaxed) + m.broker_lost.load(Relaxed) == N as u64
    })
    .await;
    let lost = metrics.broker_lost.load(Relaxed);
    assert!(lost > 0, "tiny segments must have dropped something");
    let mut seqs = Vec::new();
    while let Ok(e) = rx.try_recv() {
        seqs.push(seq_of(&e.raw));
    }
    assert_eq!(seqs.len() as u64, N as u64 - lost);
    // What arrived is in order, each once; the gaps are exactly what was counted.
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(seqs.last(), Some(&(N as u64 - 1)), "the newest survive");
    stop_tx.send(true).unwrap();
    tokio::time::timeout(DEADLINE, ingest)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    drop(broker.link_tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_taking_the_link_client_id_stops_the_daemon_with_a_clear_error_and_keeps_the_queue()
 {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(upstream_broker(), false).await;
    let gw = Gateway::start(dir.path(), proxy.port).await;
    let sensor = Sensor::connect(gw.addr).await;
    for seq in 0..10 {
        sensor
            .publish("sensors/a/k/temperature", reading("k", seq))
            .await;
    }
    wait_until("stored", || gw.queued("cloud") == 10).await;
    assert!(
        gw.running.link_id.starts_with("edgeferry-ingest-") && gw.running.link_id.len() > 30,
        "unguessable id"
    );

    let _intruder = Sensor::connect_as(gw.addr, &gw.running.link_id.clone()).await;
    let result = tokio::time::timeout(DEADLINE, gw.running.wait())
        .await
        .expect("the daemon stops");
    let err = result.expect_err("stopping is an error").to_string();
    assert!(err.contains("ingest link"), "{err}");
    assert_eq!(queued_in(&dir.path().join("queue.db"), "cloud"), 10);
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
