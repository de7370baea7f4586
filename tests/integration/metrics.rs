//! The Prometheus endpoint after a known workload: exact counter values,
//! queue depth per priority while the uplink is down, and after it drained.

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_counts_a_known_workload_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream_broker();
    let sub = Subscriber::start(upstream, "plant/#").await;
    let proxy = Proxy::start(upstream, false).await;
    let gw = Gateway::start(dir.path(), proxy.port).await;
    let addr = gw.running.metrics_addr.expect("metrics on");
    let sensor = Sensor::connect(gw.addr).await;
    for seq in 0..5 {
        sensor
            .publish("sensors/hall/t1/temperature", reading("t1", seq))
            .await;
    }
    sensor
        .publish("alarms/hall/door", r#"{"open": true}"#)
        .await;
    sensor.publish("sensors/hall/t1/debug/heap", "x").await;
    sensor.publish("lab/unrouted", "x").await;
    sensor
        .publish("sensors/hall/t1/temperature", "{\"value\": 2")
        .await;
    sensor.wait_acked(9).await;
    wait_until("6 rows committed", || gw.queued("cloud") == 6).await;
    let m = &gw.running.metrics;
    use std::sync::atomic::Ordering::Relaxed;
    wait_until("the last events routed", || {
        m.dead_letters.load(Relaxed) == 1 && m.dropped_unmatched.load(Relaxed) == 1
    })
    .await;
    // Past the first health probe, so "/health" is not "starting" (on a
    // loaded machine the probe's CONNECTs can take longer than the workload).
    wait_until("the first health probe", || m.healthy_ms.load(Relaxed) > 0).await;

    let (status, m) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    for (series, want) in [
        ("edgeferry_events_received_total", 9.0),
        ("edgeferry_events_decoded_total{format=\"json\"}", 6.0),
        ("edgeferry_events_decoded_total{format=\"raw\"}", 2.0),
        ("edgeferry_events_decoded_total{format=\"malformed\"}", 1.0),
        // 5 readings, the alarm, the debug message (a drop rule applies).
        ("edgeferry_events_matched_total", 7.0),
        ("edgeferry_events_dropped_total{reason=\"unmatched\"}", 1.0),
        ("edgeferry_events_dropped_total{reason=\"rule\"}", 1.0),
        ("edgeferry_dead_letters_total", 1.0),
        ("edgeferry_queue_appended_total", 6.0),
        (
            "edgeferry_queue_events{upstream=\"cloud\",priority=\"normal\"}",
            5.0,
        ),
        (
            "edgeferry_queue_events{upstream=\"cloud\",priority=\"high\"}",
            1.0,
        ),
        (
            "edgeferry_queue_events{upstream=\"cloud\",priority=\"low\"}",
            0.0,
        ),
        ("edgeferry_uplink_connected{upstream=\"cloud\"}", 0.0),
        ("edgeferry_uplink_acked_total{upstream=\"cloud\"}", 0.0),
        ("edgeferry_rules", 13.0),
    ] {
        assert_eq!(sample(&m, series), want, "{series}");
    }
    let bytes = sample(
        &m,
        "edgeferry_queue_bytes{upstream=\"cloud\",priority=\"normal\"}",
    );
    let expected: usize = (0..5)
        .map(|s| reading("t1", s).len() + "plant/hall/t1/temp".len())
        .sum();
    assert_eq!(bytes, expected as f64);
    let age = sample(&m, "edgeferry_queue_oldest_age_seconds{upstream=\"cloud\"}");
    assert!((0.0..60.0).contains(&age), "{age}");
    assert_eq!(
        sample(&m, "edgeferry_queue_commit_seconds_count"),
        sample(&m, "edgeferry_queue_commits_total")
    );
    assert!(sample(&m, "process_resident_memory_bytes") > 1e6);
    // The standard process series, unprefixed, and the build.
    assert!(sample(&m, "process_cpu_seconds_total") > 0.0);
    assert!(sample(&m, "process_open_fds") >= 3.0);
    assert!(sample(&m, "process_max_fds") >= sample(&m, "process_open_fds"));
    assert!(sample(&m, "process_start_time_seconds") > 1.7e9);
    assert!(sample(&m, "process_threads") >= 2.0);
    let version = format!(
        "edgeferry_build_info{{version=\"{}\",",
        env!("CARGO_PKG_VERSION")
    );
    assert!(
        m.lines()
            .any(|l| l.starts_with(&version) && l.ends_with(" 1")),
        "{m}"
    );
    assert_eq!(http_get(addr, "/health").await, (200, "ok\n".to_string()));

    proxy.set_up(true);
    sub.wait_for(6).await;
    wait_until("acked and deleted", || gw.queued("cloud") == 0).await;
    let (_, m) = http_get(addr, "/metrics").await;
    for (series, want) in [
        ("edgeferry_uplink_connected{upstream=\"cloud\"}", 1.0),
        ("edgeferry_uplink_connects_total{upstream=\"cloud\"}", 1.0),
        ("edgeferry_uplink_acked_total{upstream=\"cloud\"}", 6.0),
        ("edgeferry_uplink_resent_total{upstream=\"cloud\"}", 0.0),
        ("edgeferry_uplink_inflight{upstream=\"cloud\"}", 0.0),
        (
            "edgeferry_queue_events{upstream=\"cloud\",priority=\"normal\"}",
            0.0,
        ),
        (
            "edgeferry_queue_oldest_age_seconds{upstream=\"cloud\"}",
            0.0,
        ),
    ] {
        assert_eq!(sample(&m, series), want, "{series}");
    }
    assert_eq!(http_get(addr, "/nowhere").await.0, 404);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_lock_the_endpoint_out_for_long() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), free_port()).await;
    let addr = gw.running.metrics_addr.expect("metrics on");
    // Past the first health probe, so "/health" is not "starting".
    let m = gw.running.metrics.clone();
    wait_until("the first health probe", || {
        m.healthy_ms.load(std::sync::atomic::Ordering::Relaxed) > 0
    })
    .await;
    // Sixteen clients that connect and never send a request fill every slot.
    let mut idle = Vec::new();
    for _ in 0..16 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Health is answered all the same (hostile-run finding 7: slow clients
    // kept it at 503 and a supervisor read that as down); a scrape is told
    // at once that the endpoint is busy, in words that are not "stuck".
    let (status, body) = http_get(addr, "/health").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 503);
    assert!(
        body.starts_with("busy:") && body.contains("not stuck"),
        "{body}"
    );
    // The idle ones are cut off after the request timeout; then it scrapes.
    let start = std::time::Instant::now();
    loop {
        if http_get(addr, "/metrics").await.0 == 200 {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "still locked out");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    drop(idle);
    gw.stop().await;
}
