//! Fault injection on the uplink: a half-open link (the path drops without
//! a reset) and an upstream that flaps under load. Nothing is lost.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_uplink_is_detected_within_one_and_a_half_keep_alives() {
    let World {
        sub,
        proxy,
        gw,
        sensor,
    } = World::offline_with("", |t| {
        t.replace("keep_alive = \"5s\"", "keep_alive = \"2s\"")
    })
    .await;
    proxy.set_up(true);
    let up = gw.running.metrics.uplinks["cloud"].clone();
    const N: usize = 300;
    for seq in 0..100 {
        sensor
            .publish("sensors/yard/d1/temperature", reading("d1", seq))
            .await;
    }
    wait_until("first events upstream", || sub.distinct_seqs().len() == 100).await;

    // The path goes silent: the TCP connection stays open, nothing passes.
    proxy.set_stalled(true);
    let stalled = Instant::now();
    for seq in 100..N {
        sensor
            .publish("sensors/yard/d1/temperature", reading("d1", seq))
            .await;
    }
    wait_until("the dead link noticed", || !up.connected.load(Relaxed)).await;
    let detected = stalled.elapsed();
    eprintln!("half-open link detected after {detected:?} (keep_alive 2s)");
    let error = up.last_error.lock().unwrap().clone().unwrap_or_default();
    assert!(error.contains("half-open"), "{error}");
    // 1.5 keep-alives after the last packet heard (at most the stall), plus
    // room for a loaded machine; a missed detection would take minutes.
    assert!(detected < Duration::from_secs(6), "{detected:?}");

    proxy.set_stalled(false);
    wait_until("every event upstream", || sub.distinct_seqs().len() == N).await;
    assert_eq!(sub.distinct_seqs(), (0..N as u64).collect::<BTreeSet<_>>());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_flapping_under_load_loses_nothing() {
    let World {
        sub,
        proxy,
        gw,
        sensor,
    } = World::offline("").await;
    proxy.set_up(true);
    let up = gw.running.metrics.uplinks["cloud"].clone();
    // Down and up every 500 ms while about 2,000 events/s arrive.
    const N: usize = 8_000;
    let start = Instant::now();
    let mut next_flip = start + Duration::from_millis(500);
    let mut is_up = true;
    let mut flips = 0;
    for seq in 0..N {
        sensor
            .publish("sensors/yard/d1/temperature", reading("d1", seq))
            .await;
        if seq % 20 == 19 {
            // Pace the sensor at about 2,000 events/s.
            tokio::time::sleep_until((start + Duration::from_micros(500 * seq as u64)).into())
                .await;
        }
        if Instant::now() >= next_flip {
            is_up = !is_up;
            proxy.set_up(is_up);
            flips += 1;
            next_flip += Duration::from_millis(500);
        }
    }
    proxy.set_up(true);
    sensor.wait_acked(N).await;
    assert!(flips >= 4, "the link flapped {flips} times");
    wait_until("every event upstream", || sub.distinct_seqs().len() == N).await;
    assert_eq!(sub.distinct_seqs(), (0..N as u64).collect::<BTreeSet<_>>());
    wait_until("queue drained", || gw.queued("cloud") == 0).await;
    assert!(
        up.connects.load(Relaxed) >= 3,
        "reconnected after each outage"
    );
    gw.stop().await;
}

/// A stalled daemon: its async runtime is starved (both workers blocked,
/// as on an overloaded board) while a sensor keeps publishing. The front
/// door cannot read, so nothing is acknowledged and the sensor is held (its
/// in-flight window fills and its own buffer waits); once the runtime runs
/// again every event arrives upstream exactly once, in order, and nothing
/// was dropped. (Before the front door, rumqttd acknowledged everything and
/// dropped what its segments could not hold.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_daemon_holds_the_sensor_and_loses_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    let World {
        sub,
        proxy,
        gw,
        sensor: _,
    } = World::offline_with("", |t| {
        t.replace(
            "[broker]\n",
            "[broker]\nsegment_size = \"4KiB\"\nsegment_count = 2\nmax_payload = \"1KiB\"\n",
        )
    })
    .await;
    proxy.set_up(true);
    const N: usize = 3_000;
    const WHILE_STALLED: usize = 500;

    let (connected, blocked, release) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    /// Releases the workers however the test ends (a failed assertion too).
    struct Release(Arc<AtomicBool>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.store(true, Relaxed);
        }
    }
    let _release = Release(release.clone());
    let addr = gw.addr;
    let (c, b, r) = (connected.clone(), blocked.clone(), release.clone());
    let publisher = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let sensor = Sensor::connect(addr).await;
            c.store(true, Relaxed);
            wait_until("both workers blocked", || b.load(Relaxed) == 2).await;
            let mut acked_while_stalled = None;
            for seq in 0..N {
                if seq == WHILE_STALLED {
                    acked_while_stalled = Some(sensor.acked());
                    r.store(true, Relaxed);
                }
                sensor
                    .publish("sensors/yard/d2/temperature", reading("d2", seq))
                    .await;
            }
            sensor.wait_acked(N).await;
            acked_while_stalled
        })
    });
    wait_until("sensor connected", || connected.load(Relaxed)).await;
    for _ in 0..2 {
        let (blocked, release) = (blocked.clone(), release.clone());
        tokio::spawn(async move {
            blocked.fetch_add(1, Relaxed);
            let start = Instant::now();
            while !release.load(Relaxed) && start.elapsed() < DEADLINE {
                std::thread::sleep(Duration::from_millis(1));
            }
        });
    }
    let acked_while_stalled = tokio::task::spawn_blocking(move || publisher.join())
        .await
        .unwrap()
        .expect("the sensor published");
    assert_eq!(
        acked_while_stalled,
        Some(0),
        "nothing is acknowledged while the daemon cannot take it"
    );
    let got = sub.wait_for(N).await;
    let seqs: Vec<u64> = got.iter().map(|m| seq_of(&m.payload)).collect();
    // All, in order, once.
    assert_sequence(&seqs, 0..N as u64);
    let m = gw.running.metrics.clone();
    assert_eq!(m.received.load(Relaxed), N as u64);
    gw.stop().await;
}

/// An upstream that drops the connection whenever it gets a publish whose
/// payload contains "poison" (as Mosquitto does on a topic it calls
/// malformed), acknowledges everything else, and records what it took.
async fn picky_upstream() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    fake_upstream(false).await
}

/// The same fake upstream; with `stall_first`, its first connection answers
/// CONNECT and pings but never acknowledges a publish.
async fn fake_upstream(stall_first: bool) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    use bytes::BytesMut;
    use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet, PubAck};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let took: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>> = Default::default();
    let t = took.clone();
    tokio::spawn(async move {
        let mut first = stall_first;
        while let Ok((mut s, _)) = listener.accept().await {
            let took = t.clone();
            let stall = std::mem::take(&mut first);
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                loop {
                    let packet = match Packet::read(&mut buf, 1 << 20) {
                        Ok(p) => p,
                        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                            if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                                return;
                            }
                            continue;
                        }
                        Err(_) => return,
                    };
                    let mut out = BytesMut::new();
                    match packet {
                        Packet::Connect(_) => {
                            Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))
                                .write(&mut out, 1 << 20)
                                .map(|_| ())
                                .unwrap()
                        }
                        Packet::PingReq => {
                            Packet::PingResp.write(&mut out, 16).map(|_| ()).unwrap()
                        }
                        Packet::Publish(p) => {
                            if p.payload.windows(6).any(|w| w == b"poison") {
                                return; // drop the connection
                            }
                            if stall {
                                continue; // take it, never acknowledge it
                            }
                            took.lock().unwrap().push(p.payload.to_vec());
                            Packet::PubAck(PubAck::new(p.pkid))
                                .write(&mut out, 16)
                                .map(|_| ())
                                .unwrap()
                        }
                        Packet::Disconnect => return,
                        _ => {}
                    }
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, took)
}

/// Hostile-run finding 3: one event the upstream drops the connection on
/// was sent first after every reconnect, forever (0 of the events behind it
/// delivered, /health 200). After three fruitless sessions in a row with it
/// first in flight it is dead-lettered, and the rest are delivered in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_upstream_drops_the_connection_on_does_not_block_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (port, took) = picky_upstream().await;
    let gw = Gateway::start(dir.path(), port).await;
    let sensor = Sensor::connect(gw.addr).await;
    sensor
        .publish("sensors/yard/poison/temperature", reading("poison", 0))
        .await;
    for seq in 1..=20 {
        sensor
            .publish("sensors/yard/good/temperature", reading("good", seq))
            .await;
    }
    let up = gw.running.metrics.uplinks["cloud"].clone();
    wait_until("the rest delivered", || took.lock().unwrap().len() == 20).await;
    let seqs: Vec<u64> = took.lock().unwrap().iter().map(|p| seq_of(p)).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<u64>>());
    assert_eq!(up.dead_lettered.load(Relaxed), 1);
    wait_until("queue empty", || gw.queued("cloud") == 0).await;
    gw.stop().await;
}

/// Hostile-run finding 6: an upstream that answers pings but acknowledges
/// no publish kept the session "connected" with its window full for as long
/// as it liked. Three keep-alives without a PUBACK while publishes are
/// outstanding end the session (failure kind "stalled"); the next session
/// sends them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_pings_but_never_acknowledges_is_left_and_the_events_resent() {
    let dir = tempfile::tempdir().unwrap();
    let (port, took) = fake_upstream(true).await;
    let text =
        config_text(dir.path(), port, "").replace("keep_alive = \"5s\"", "keep_alive = \"1s\"");
    let gw = Gateway::start_with(dir.path(), &text).await;
    let sensor = Sensor::connect(gw.addr).await;
    for seq in 0..10 {
        sensor
            .publish("sensors/yard/s/temperature", reading("s", seq))
            .await;
    }
    let up = gw.running.metrics.uplinks["cloud"].clone();
    wait_until("all acknowledged by the second session", || {
        took.lock().unwrap().len() == 10
    })
    .await;
    let seqs: Vec<u64> = took.lock().unwrap().iter().map(|p| seq_of(p)).collect();
    assert_eq!(seqs, (0..10).collect::<Vec<u64>>());
    let stalled = edgeferry::uplink::FailureKind::Stalled.index();
    assert_eq!(up.failures[stalled].load(Relaxed), 1);
    assert_eq!(up.resent.load(Relaxed), 10);
    gw.stop().await;
}
