//! End-to-end throughput of the whole pipeline on loopback, with real parts:
//! MQTT sensors (rumqttc, QoS 1) -> edgeferry (embedded rumqttd, rules,
//! SQLite queue) -> upstream rumqttd -> a subscriber.
//!
//!   cargo bench --bench throughput            # 50,000 events
//!   EVENTS=200000 cargo bench --bench throughput
//!
//! Two figures:
//! - live: publish N events with the uplink up; time until the last one
//!   arrives upstream (every event goes through a SQLite group commit);
//! - backlog drain: publish N with the uplink down, wait until all are rows
//!   in SQLite, bring the uplink up, time until the last one arrives.

#[path = "../tests/integration/util.rs"]
mod util;

use std::time::Instant;

use util::*;

const DEVICES: usize = 10;
const PAYLOAD: usize = 200;

fn payload(device: usize, seq: usize) -> Vec<u8> {
    // A JSON reading padded to PAYLOAD bytes, keeping the example rules'
    // temperature contract (the pad is in its one free-text field).
    let head = format!(r#"{{"seq":{seq},"value":21.5,"device":"d{device}-"#);
    let mut s = head.clone();
    s.push_str(&"x".repeat(PAYLOAD.saturating_sub(head.len() + 2)));
    s.push_str("\"}");
    s.into_bytes()
}

/// Distinct events received (by device topic and sequence number) and duplicates.
fn distinct(sub: &Subscriber) -> (usize, usize) {
    let got = sub.take();
    let mut seen = std::collections::HashSet::new();
    for m in &got {
        seen.insert((m.topic.clone(), seq_of(&m.payload)));
    }
    (seen.len(), got.len() - seen.len())
}

async fn publish_all(gw_addr: std::net::SocketAddr, n: usize) -> f64 {
    // One client per device, publishing concurrently.
    let start = Instant::now();
    let mut tasks = Vec::new();
    for d in 0..DEVICES {
        tasks.push(tokio::spawn(async move {
            let sensor = Sensor::connect(gw_addr).await;
            let per = n / DEVICES;
            for seq in 0..per {
                sensor
                    .publish(&format!("sensors/bench/d{d}/temperature"), payload(d, seq))
                    .await;
            }
            sensor.wait_acked(per).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50_000);
    let n = n / DEVICES * DEVICES;
    println!(
        "edgeferry throughput: {n} events, {DEVICES} devices, {PAYLOAD}-byte JSON payloads, QoS 1 in and out"
    );

    // Live.
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream_broker();
    let sub = Subscriber::start(upstream, "plant/#").await;
    let gw = Gateway::start(dir.path(), upstream.port()).await;
    let start = Instant::now();
    let publish_secs = publish_all(gw.addr, n).await;
    sub.wait_for(n).await;
    let total = start.elapsed().as_secs_f64();
    println!(
        "live:          published in {publish_secs:.2}s ({:.0} ev/s in), all {n} upstream after {total:.2}s ({:.0} ev/s end to end)",
        n as f64 / publish_secs,
        n as f64 / total
    );
    let (live_distinct, live_dups) = distinct(&sub);
    assert_eq!(live_distinct, n, "every event arrived");
    let lost = gw.count(|m| &m.dropped_queue_unavailable);
    gw.stop().await;
    drop(sub);

    // Backlog drain.
    let dir = tempfile::tempdir().unwrap();
    let sub = Subscriber::start(upstream, "plant/#").await;
    let proxy = Proxy::start(upstream, false).await;
    let gw = Gateway::start(dir.path(), proxy.port).await;
    let publish_secs = publish_all(gw.addr, n).await;
    wait_until("backlog stored", || gw.queued("cloud") == n as u64).await;
    let up = gw.running.metrics.uplinks["cloud"].clone();
    let outage_end = Instant::now();
    proxy.set_up(true);
    wait_until("uplink reconnected", || {
        up.connected.load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
    let start = Instant::now();
    sub.wait_for(n).await;
    let drain = start.elapsed().as_secs_f64();
    println!(
        "backlog drain: {n} events stored offline (published at {:.0} ev/s); reconnected {:.2}s after the outage ended (backoff); drained in {drain:.2}s ({:.0} ev/s)",
        n as f64 / publish_secs,
        (start - outage_end).as_secs_f64(),
        n as f64 / drain
    );
    let (drain_distinct, drain_dups) = distinct(&sub);
    assert_eq!(drain_distinct, n, "every event arrived");
    let lost = lost + gw.count(|m| &m.dropped_queue_unavailable);
    gw.stop().await;
    println!(
        "every event arrived upstream (checked by device and sequence number); duplicates: live {live_dups}, drain {drain_dups}; lost or dropped in edgeferry: {lost}"
    );
}
