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

/// A local-link stall: the daemon's async runtime is starved (both of its
/// workers blocked, as on an overloaded board) while a sensor keeps
/// publishing. rumqttd, on its own threads, acknowledges every publish but
/// keeps only `segment_size × segment_count` of them for the ingest link;
/// when ingest runs again it finds the gap and counts it as `broker_lost`,
/// in the metrics. Every event is accounted for, and ingest goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_local_link_makes_rumqttd_drop_and_every_drop_is_counted() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    let metrics_port = free_port();
    let World {
        sub,
        proxy,
        gw,
        sensor,
    } = World::offline_with("", |t| {
        let t = t.replace(
            "[broker]\n",
            "[broker]\nsegment_size = \"4KiB\"\nsegment_count = 2\nmax_payload = \"1KiB\"\n",
        );
        metrics_on(&t, metrics_port)
    })
    .await;
    proxy.set_up(true);
    const N: usize = 3_000;

    // Block both runtime workers until a sensor on its own thread has had
    // every publish acknowledged by the broker.
    let (blocked, release) = (
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
    let addr = gw.addr;
    let b = blocked.clone();
    let publisher = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            wait_until("both workers blocked", || b.load(Relaxed) == 2).await;
            let sensor = Sensor::connect(addr).await;
            for seq in 0..N {
                sensor
                    .publish("sensors/yard/d2/temperature", reading("d2", seq))
                    .await;
            }
            sensor.wait_acked(N).await;
        });
    });
    tokio::task::spawn_blocking(move || publisher.join())
        .await
        .unwrap()
        .expect("the stalled sensor published");
    release.store(true, Relaxed);

    // Every acknowledged event was either read by ingest or counted lost.
    let m = gw.running.metrics.clone();
    wait_until("every event read or counted lost", || {
        m.received.load(Relaxed) + m.broker_lost.load(Relaxed) >= N as u64
    })
    .await;
    let (received, lost) = (m.received.load(Relaxed), m.broker_lost.load(Relaxed));
    eprintln!("stalled link: {received} read by ingest, {lost} skipped by rumqttd");
    assert_eq!(received + lost, N as u64);
    assert!(lost > 0, "4 KiB segments held {N} events?");
    let (_, scrape) = http_get(([127, 0, 0, 1], metrics_port).into(), "/metrics").await;
    assert_eq!(
        sample(
            &scrape,
            "edgeferry_events_dropped_total{reason=\"broker_lost\"}"
        ),
        lost as f64
    );
    // What ingest read goes upstream: the newest events, in order.
    let overflow = m.dropped_overflow.load(Relaxed);
    let forwarded = (received - overflow) as usize;
    wait_until("what was read is upstream", || {
        sub.distinct_seqs().len() == forwarded
    })
    .await;

    // Ingest goes on, and loses nothing at a pace it keeps up with.
    for seq in N..N + 100 {
        sensor
            .publish("sensors/yard/d2/temperature", reading("d2", seq))
            .await;
        wait_until("ingest read it", || {
            m.received.load(Relaxed) > received + (seq - N) as u64
        })
        .await;
    }
    assert_eq!(m.broker_lost.load(Relaxed), lost, "nothing more skipped");
    wait_until("later events upstream", || {
        sub.distinct_seqs().len() == forwarded + 100
    })
    .await;
    gw.stop().await;
}
