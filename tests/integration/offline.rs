//! Store and forward: with the uplink down, events wait as rows in the
//! SQLite file, across a restart; when it returns, all arrive, in order, and
//! the rows are deleted.

use std::sync::atomic::Ordering::Relaxed;

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_in_sqlite_while_upstream_is_down_then_all_arrive_in_order() {
    let World {
        sub,
        proxy,
        gw,
        sensor,
    } = World::offline("").await;

    const N: usize = 300;
    for seq in 0..N {
        sensor
            .publish("sensors/yard/d1/temperature", reading("d1", seq))
            .await;
    }
    sensor.wait_acked(N).await;
    wait_until("all events stored as rows", || {
        gw.queued("cloud") == N as u64
    })
    .await;
    assert_eq!(
        sub.count(),
        0,
        "nothing reached the cloud while it was down"
    );

    proxy.set_up(true);
    let got = sub.wait_for(N).await;
    let seqs: Vec<u64> = got.iter().map(|m| seq_of(&m.payload)).collect();
    assert_eq!(seqs, (0..N as u64).collect::<Vec<_>>());
    wait_until("rows deleted after PUBACK", || gw.queued("cloud") == 0).await;
    assert_eq!(
        gw.running.metrics.uplinks["cloud"].acked.load(Relaxed),
        N as u64
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_before_a_restart_arrive_when_the_upstream_returns() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream_broker();
    let sub = Subscriber::start(upstream, "plant/#").await;
    let proxy = Proxy::start(upstream, false).await;

    let gw = Gateway::start(dir.path(), proxy.port).await;
    let sensor = Sensor::connect(gw.addr).await;
    const N: usize = 150;
    for seq in 0..N {
        sensor
            .publish("sensors/yard/d2/temperature", reading("d2", seq))
            .await;
    }
    sensor.wait_acked(N).await;
    // Stop as SIGTERM would: what was received is drained into the queue.
    gw.stop().await;
    assert_eq!(queued_in(&dir.path().join("queue.db"), "cloud"), N as u64);

    // A new run on the same file; the upstream comes back.
    let gw = Gateway::start(dir.path(), proxy.port).await;
    proxy.set_up(true);
    let got = sub.wait_for(N).await;
    let seqs: Vec<u64> = got.iter().map(|m| seq_of(&m.payload)).collect();
    assert_eq!(seqs, (0..N as u64).collect::<Vec<_>>());
    wait_until("rows deleted", || gw.queued("cloud") == 0).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_events_are_resent_after_the_uplink_drops() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream_broker();
    let sub = Subscriber::start(upstream, "plant/#").await;
    let proxy = Proxy::start(upstream, true).await;
    let gw = Gateway::start(dir.path(), proxy.port).await;
    let sensor = Sensor::connect(gw.addr).await;
    let up = gw.running.metrics.uplinks["cloud"].clone();
    wait_until("uplink connected", || up.connected.load(Relaxed)).await;

    // Cut the uplink in the middle of a stream, then restore it.
    const N: usize = 2000;
    for seq in 0..N {
        sensor
            .publish("sensors/yard/d3/temperature", reading("d3", seq))
            .await;
        if seq == N / 2 {
            proxy.set_up(false);
        }
    }
    sensor.wait_acked(N).await;
    wait_until("uplink noticed the cut", || !up.connected.load(Relaxed)).await;
    proxy.set_up(true);

    // At least once: every event arrives; duplicates are possible only for
    // what was in flight when the link was cut.
    let m = sub.messages.clone();
    wait_until("every sequence number upstream", || {
        let got = m.lock().unwrap();
        let mut seen = vec![false; N];
        for msg in got.iter() {
            seen[seq_of(&msg.payload) as usize] = true;
        }
        seen.iter().all(|s| *s)
    })
    .await;
    wait_until("rows deleted", || gw.queued("cloud") == 0).await;
    let got = sub.take();
    let dups = got.len() - N;
    let resent = up.resent.load(Relaxed);
    assert!(
        dups as u64 <= resent,
        "{dups} duplicates but only {resent} resent"
    );
    // Each reconnect resends at most the in-flight window (64).
    let reconnects = up.connects.load(Relaxed) - 1;
    assert!(reconnects >= 1);
    assert!(
        resent <= 64 * reconnects,
        "{resent} resent over {reconnects} reconnects"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_under_steady_traffic_finishes_and_keeps_what_was_acked() {
    // Sensors that never pause must not hold the stop past systemd's timeout;
    // whatever the gateway took in before stopping is in the queue.
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(upstream_broker(), false).await;
    let gw = Gateway::start(dir.path(), proxy.port).await;
    let sensor = Sensor::connect(gw.addr).await;
    let client = sensor.client.clone();
    let publisher = tokio::spawn(async move {
        for seq in 0.. {
            let payload = reading("steady", seq);
            if client
                .publish(
                    "sensors/s/steady/temperature",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
    wait_until("traffic flowing into the queue", || {
        gw.queued("cloud") >= 20
    })
    .await;
    let metrics = gw.running.metrics.clone();
    let started = std::time::Instant::now();
    gw.stop().await;
    let took = started.elapsed();
    publisher.abort();
    assert!(
        took < std::time::Duration::from_secs(15),
        "stop took {took:?}"
    );
    // Every event the router handed on is in the file.
    let queued = queued_in(&dir.path().join("queue.db"), "cloud");
    assert_eq!(queued, metrics.queued.load(Relaxed));
    assert_eq!(queued, metrics.received.load(Relaxed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_higher_priorities_are_sent_first_fifo_within_each() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream_broker();
    let sub = Subscriber::start(upstream, "#").await;
    let proxy = Proxy::start(upstream, false).await;
    let gw = Gateway::start(dir.path(), proxy.port).await;
    let sensor = Sensor::connect(gw.addr).await;
    // Interleaved: diagnostics (low), temperatures (normal), alarms (high).
    for seq in 0..30 {
        match seq % 3 {
            0 => sensor.publish("diag/pump1", reading("d", seq)).await,
            1 => {
                sensor
                    .publish("sensors/a/t/temperature", reading("t", seq))
                    .await
            }
            _ => sensor.publish("alarms/a/door", reading("a", seq)).await,
        }
    }
    sensor.wait_acked(30).await;
    wait_until("all queued", || gw.queued("cloud") == 30).await;
    proxy.set_up(true);
    let got = sub.wait_for(30).await;
    let order: Vec<(String, u64)> = got
        .iter()
        .map(|m| (m.topic.clone(), seq_of(&m.payload)))
        .collect();
    let expected: Vec<(String, u64)> = (0..30)
        .filter(|s| s % 3 == 2)
        .map(|s| ("plant/a/door/alarm".to_string(), s))
        .chain(
            (0..30)
                .filter(|s| s % 3 == 1)
                .map(|s| ("plant/a/t/temp".to_string(), s)),
        )
        .chain(
            (0..30)
                .filter(|s| s % 3 == 0)
                .map(|s| ("fleet/pump1/diag".to_string(), s)),
        )
        .collect();
    assert_eq!(order, expected);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drains_at_the_configured_send_rate() {
    assert_paced_drain("send_rate = 400\n", 400.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drains_at_the_configured_send_bytes_rate() {
    // Each event counts payload + topic bytes.
    let size = (reading("q", 1000).len() + "plant/p/q/temp".len()) as f64;
    let bytes_rate = (400.0 * size) as u64;
    assert_paced_drain(
        &format!("send_bytes_rate = {bytes_rate}\n"),
        bytes_rate as f64 / size,
    )
    .await;
}

/// A caught-up uplink that owes its byte bucket after an event larger than
/// the bucket still sends the next live event once the pace allows (half a
/// second here), not when the next network traffic wakes it (a keep-alive
/// ping, a minute here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caught_up_uplink_in_debt_to_its_byte_pace_sends_the_next_event_when_the_pace_allows() {
    let size = (reading("q", 1).len() + "plant/p/q/temp".len()) as u64;
    let World {
        sub,
        proxy,
        gw,
        sensor,
    } = World::offline_with(&format!("send_bytes_rate = {}\n", size * 2), |t| {
        t.replace("keep_alive = \"5s\"", "keep_alive = \"60s\"")
    })
    .await;
    proxy.set_up(true);
    let uplink = &gw.running.metrics.uplinks["cloud"];
    wait_until("uplink connected", || uplink.connected.load(Relaxed)).await;
    sensor
        .publish("sensors/p/q/temperature", reading("q", 1))
        .await;
    sub.wait_for(1).await;
    let sent = std::time::Instant::now();
    sensor
        .publish("sensors/p/q/temperature", reading("q", 2))
        .await;
    sub.wait_for(2).await;
    let took = sent.elapsed();
    println!("second event after {took:?} (the pace allows it after 0.5 s)");
    assert!(
        took < std::time::Duration::from_secs(20),
        "the second event took {took:?}: the uplink waited for network traffic, not the pace"
    );
    gw.stop().await;
}

/// Store a backlog with the uplink down, let it drain, and check the rate
/// measured over the drain is within 20% of `rate` events/s.
async fn assert_paced_drain(upstream_settings: &str, rate: f64) {
    let World {
        sub,
        proxy,
        gw,
        sensor,
    } = World::offline(upstream_settings).await;
    const N: usize = 1200;
    for seq in 1000..1000 + N {
        sensor
            .publish("sensors/p/q/temperature", reading("q", seq))
            .await;
    }
    wait_until("backlog stored", || gw.queued("cloud") == N as u64).await;
    proxy.set_up(true);
    let got = sub.wait_for(N).await;
    // Measured after the initial burst (a tenth of a second's worth).
    let burst = (rate / 10.0) as usize;
    let span = got[N - 1].at - got[burst].at;
    let measured = (N - 1 - burst) as f64 / span.as_secs_f64();
    println!("drained at {measured:.0} events/s, configured {rate:.0}");
    assert!(
        (rate * 0.8..=rate * 1.2).contains(&measured),
        "drained at {measured:.0} events/s, configured {rate:.0}"
    );
    let seqs: Vec<u64> = got.iter().map(|m| seq_of(&m.payload)).collect();
    assert_sequence(&seqs, 1000..1000 + N as u64);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_carry_their_id_and_replayed_ones_are_marked() {
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(
        rules.path().join("ids.toml"),
        r#"
[[rule]]
name = "with-ids"
match = "sensors/{site}/{device}/temperature"
to = [{ upstream = "cloud", topic = "plant/{site}/{device}/temp", id_field = "event_id" }]
"#,
    )
    .unwrap();
    let World {
        sub,
        proxy,
        gw,
        sensor,
    } = World::offline_with("replay_marker = \"_replayed\"\n", |text| {
        rules_at(&text, rules.path(), "")
    })
    .await;
    for seq in 0..3 {
        sensor
            .publish("sensors/a/b/temperature", reading("b", seq))
            .await;
    }
    wait_until("backlog stored", || gw.queued("cloud") == 3).await;
    proxy.set_up(true);
    sub.wait_for(3).await;
    for seq in 3..5 {
        sensor
            .publish("sensors/a/b/temperature", reading("b", seq))
            .await;
    }
    let got = sub.wait_for(5).await;
    let bodies: Vec<serde_json::Value> = got
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    let ids: std::collections::BTreeSet<String> = bodies
        .iter()
        .map(|b| b["event_id"].as_str().expect("id present").to_string())
        .collect();
    assert_eq!(ids.len(), 5, "distinct ids");
    assert!(ids.iter().all(|id| uuid::Uuid::parse_str(id).is_ok()));
    let replayed: Vec<bool> = bodies
        .iter()
        .map(|b| b["_replayed"] == serde_json::json!(true))
        .collect();
    assert_eq!(replayed, [true, true, true, false, false]);
    assert_eq!(bodies[4]["seq"], 4, "the rest of the payload is intact");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_marker_never_makes_an_event_too_large_to_send() {
    let World {
        sub,
        proxy,
        gw,
        sensor,
    } = World::offline("replay_marker = \"_replayed\"\nmax_packet_size = \"1KiB\"\n").await;
    // Packet: 1 + 2 + 2 + 14 (topic) + 2 + 995 = 1016 bytes; the marker's 17 would make 1033.
    let head = r#"{"seq":0,"value":1,"device":""#;
    let payload = format!("{head}{}\"}}", "x".repeat(995 - head.len() - 2));
    assert_eq!(payload.len(), 995);
    sensor
        .publish("sensors/a/b/temperature", payload.clone())
        .await;
    wait_until("stored", || gw.queued("cloud") == 1).await;
    proxy.set_up(true);
    let got = sub.wait_for(1).await;
    assert_eq!(
        got[0].payload,
        payload.as_bytes(),
        "sent unmarked rather than dead-lettered"
    );
    assert_eq!(
        gw.running.metrics.uplinks["cloud"]
            .dead_lettered
            .load(Relaxed),
        0
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_live_first_new_events_overtake_a_paced_backlog() {
    let World {
        sub,
        proxy,
        gw,
        sensor,
    } = World::offline("drain_order = \"live_first\"\nsend_rate = 100\n").await;
    const BACKLOG: usize = 300; // three seconds at 100 events/s
    for seq in 0..BACKLOG {
        sensor
            .publish("sensors/a/old/temperature", reading("old", seq))
            .await;
    }
    wait_until("backlog stored", || gw.queued("cloud") == BACKLOG as u64).await;
    proxy.set_up(true);
    sub.wait_for(20).await; // the drain is under way
    for seq in 0..5 {
        sensor
            .publish("sensors/a/new/temperature", reading("new", seq))
            .await;
    }
    let got = sub.wait_for(BACKLOG + 5).await;
    let live_at: Vec<usize> = got
        .iter()
        .enumerate()
        .filter(|(_, m)| m.topic == "plant/a/new/temp")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(live_at.len(), 5);
    // Live events went out within the next pace-worth of the drain, not after all 300.
    assert!(
        *live_at.last().unwrap() < 150,
        "live events at positions {live_at:?}"
    );
    // Each stream stays in order.
    let old: Vec<u64> = got
        .iter()
        .filter(|m| m.topic == "plant/a/old/temp")
        .map(|m| seq_of(&m.payload))
        .collect();
    assert_sequence(&old, 0..BACKLOG as u64);
    gw.stop().await;
}
