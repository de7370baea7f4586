//! The Prometheus exposition of edgeferry's counters, rendered per scrape
//! with `prometheus-client`'s text encoder from a snapshot: the pipeline's
//! atomics, the queue's depth per upstream and priority (a read-only query
//! of the queue file, like `edgeferry queue stats`), and the process RSS.

use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::event::now_ms;
use crate::metrics::Metrics;
use crate::queue::{Priority, Stats};

/// What one scrape shows besides the counters.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Per upstream and priority; `None` when the queue could not be read.
    pub queue: Option<Vec<Stats>>,
    /// Resident set size of this process, bytes.
    pub rss_bytes: Option<u64>,
}

/// Render the text exposition format.
pub fn render(metrics: &std::sync::Arc<Metrics>, snapshot: Snapshot) -> String {
    let mut registry = Registry::with_prefix("edgeferry");
    registry.register_collector(Box::new(Scrape {
        metrics: metrics.clone(),
        snapshot,
    }));
    let mut out = String::with_capacity(8192);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// Resident set size from /proc (Linux), in bytes.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

#[derive(Debug)]
struct Scrape {
    metrics: std::sync::Arc<Metrics>,
    snapshot: Snapshot,
}

const PRIORITIES: [Priority; 3] = [Priority::Low, Priority::Normal, Priority::High];

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.metrics;
        let counter = |enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64| {
            let c = ConstCounter::new(v);
            c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
        };
        let gauge = |enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64| {
            let g = ConstGauge::new(v);
            g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
        };
        counter(
            &mut enc,
            "events_received",
            "Publishes the front door took into the pipeline (ingested topics; wills included)",
            m.received.load(Relaxed),
        )?;
        gauge(
            &mut enc,
            "local_connections",
            "Local MQTT client connections open now",
            m.door_connections.load(Relaxed) as i64,
        )?;
        counter(
            &mut enc,
            "local_connections_refused_busy",
            "Local connections closed at once because max_connections were open",
            m.door_refused_busy.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "local_publishes",
            "PUBLISH packets accepted from local clients (every topic)",
            m.door_publishes.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "local_publishers_held_seconds",
            "Time publishers were not read because the pipeline was full (summed over connections)",
            m.door_held_ms.load(Relaxed) / 1000,
        )?;
        counter(
            &mut enc,
            "local_protocol_errors",
            "Local connections closed for malformed packets or protocol violations",
            m.door_protocol_errors.load(Relaxed),
        )?;
        {
            let mut e = enc.encode_descriptor(
                "local_refused",
                "Local publishes, subscriptions and deliveries refused, by reason",
                None,
                MetricType::Counter,
            )?;
            for (reason, c) in [
                ("publish_denied", &m.door_denied_publish),
                ("subscribe_denied", &m.door_denied_subscribe),
                ("delivery_denied", &m.door_denied_delivery),
                ("topic_invalid", &m.door_rejected_topic),
                ("payload_too_large", &m.door_rejected_payload),
            ] {
                ConstCounter::new(c.load(Relaxed))
                    .encode(e.encode_family(&[("reason", reason)])?)?;
            }
        }
        {
            let mut e = enc.encode_descriptor(
                "events_decoded",
                "Received events by payload format",
                None,
                MetricType::Counter,
            )?;
            for (format, c) in [
                ("json", &m.decoded_json),
                ("cbor", &m.decoded_cbor),
                ("raw", &m.decoded_raw),
                ("malformed", &m.decoded_malformed),
            ] {
                ConstCounter::new(c.load(Relaxed))
                    .encode(e.encode_family(&[("format", format)])?)?;
            }
        }
        counter(
            &mut enc,
            "events_matched",
            "Events at least one rule applied to",
            m.matched.load(Relaxed),
        )?;
        {
            let mut e = enc.encode_descriptor(
                "events_dropped",
                "Events dropped inside edgeferry, by reason",
                None,
                MetricType::Counter,
            )?;
            for (reason, c) in [
                ("unmatched", &m.dropped_unmatched),
                ("rule", &m.dropped_rule),
                ("throttled", &m.dropped_throttled),
                ("duplicate", &m.dropped_duplicate),
                ("deadband", &m.dropped_deadband),
                ("queue_unavailable", &m.dropped_queue_unavailable),
                ("loop", &m.dropped_loop),
            ] {
                ConstCounter::new(c.load(Relaxed))
                    .encode(e.encode_family(&[("reason", reason)])?)?;
            }
        }
        counter(
            &mut enc,
            "dead_letters",
            "Events with a malformed payload or a failing rule",
            m.dead_letters.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "rule_errors",
            "Rule evaluations that failed on an event",
            m.rule_errors.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "events_unmatched_routed",
            "Events sent to the unmatched destination",
            m.unmatched_routed.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "window_events_absorbed",
            "Events folded into a window",
            m.window_absorbed.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "window_events_emitted",
            "Window aggregates sent on",
            m.window_emitted.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "republished",
            "Events published into the embedded broker by local destinations",
            m.republished.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "republish_failed",
            "Local publishes dropped (buffer full or broker gone)",
            m.republish_failed.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "queue_appended",
            "Rows committed to the queue (one per event and upstream)",
            m.queued.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "queue_commits",
            "SQLite commits of the queue writer",
            m.commits.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "queue_acked_in_memory",
            "Events acknowledged upstream before they were written to disk (durability = offline)",
            m.acked_in_memory.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "queue_commit_failures",
            "Queue commits that failed and are being retried (disk full, I/O error)",
            m.commit_failures.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "broker_auth_failures",
            "Local clients refused at CONNECT (unknown user, wrong password, reserved client id)",
            m.broker_auth_failures.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "queue_recovered",
            "Damaged queue files moved aside at start",
            m.queue_recovered.load(Relaxed),
        )?;
        counter(
            &mut enc,
            "queue_damaged",
            "Checkpoints that found the queue's WAL file cut short by another program while running",
            m.queue_damaged.load(Relaxed),
        )?;
        {
            let (sum, count, buckets) = m.commit_seconds.snapshot();
            let mut e = enc.encode_descriptor(
                "queue_commit_seconds",
                "Duration of queue commits",
                None,
                MetricType::Histogram,
            )?;
            e.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                sum, count, &buckets, None,
            )?;
        }
        if let Some(stats) = &self.snapshot.queue {
            let now = now_ms();
            type Field = fn(&Stats) -> u64;
            let per_priority: [(&str, &str, Field); 2] = [
                ("queue_events", "Events waiting in the queue", |s| s.events),
                (
                    "queue_bytes",
                    "Bytes (payload and topic) waiting in the queue",
                    |s| s.bytes,
                ),
            ];
            for (name, help, field) in per_priority {
                let mut e = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
                for upstream in self.metrics.uplinks.keys() {
                    for p in PRIORITIES {
                        let v = find(stats, upstream, p).map_or(0, field);
                        ConstGauge::new(v as i64).encode(e.encode_family(&[
                            ("upstream", upstream.as_str()),
                            ("priority", p.name()),
                        ])?)?;
                    }
                }
            }
            let mut e = enc.encode_descriptor(
                "queue_oldest_age_seconds",
                "Age of the oldest queued event (0 when empty)",
                None,
                MetricType::Gauge,
            )?;
            for upstream in self.metrics.uplinks.keys() {
                let oldest = stats
                    .iter()
                    .filter(|s| &s.upstream == upstream)
                    .map(|s| s.oldest_ms)
                    .min();
                let age = oldest.map_or(0.0, |o| now.saturating_sub(o) as f64 / 1e3);
                ConstGauge::new(age)
                    .encode(e.encode_family(&[("upstream", upstream.as_str())])?)?;
            }
        }
        type Get = fn(&crate::metrics::UplinkMetrics) -> u64;
        let per_uplink: [(&str, &str, MetricType, Get); 9] = [
            (
                "uplink_connected",
                "1 while the upstream session is up",
                MetricType::Gauge,
                |u| u.connected.load(Relaxed) as u64,
            ),
            (
                "uplink_connects",
                "Upstream sessions established",
                MetricType::Counter,
                |u| u.connects.load(Relaxed),
            ),
            (
                "uplink_session_present",
                "1 if the broker resumed the session at the last connect",
                MetricType::Gauge,
                |u| u.session_present.load(Relaxed) as u64,
            ),
            (
                "uplink_window",
                "QoS 1 publishes allowed in flight (inflight, or the server's smaller Receive Maximum)",
                MetricType::Gauge,
                |u| u.window.load(Relaxed),
            ),
            (
                "uplink_inflight",
                "Publishes sent and not yet acknowledged",
                MetricType::Gauge,
                |u| u.inflight.load(Relaxed),
            ),
            (
                "uplink_sent",
                "Publishes handed to the network (re-sends included)",
                MetricType::Counter,
                |u| u.sent.load(Relaxed),
            ),
            (
                "uplink_acked",
                "Events acknowledged by the upstream and deleted",
                MetricType::Counter,
                |u| u.acked.load(Relaxed),
            ),
            (
                "uplink_resent",
                "Events sent again after a reconnect",
                MetricType::Counter,
                |u| u.resent.load(Relaxed),
            ),
            (
                "uplink_dead_lettered",
                "Events the upstream can never take (deleted, counted)",
                MetricType::Counter,
                |u| u.dead_lettered.load(Relaxed),
            ),
        ];
        for (name, help, kind, get) in per_uplink {
            let mut e = enc.encode_descriptor(name, help, None, kind)?;
            for (upstream, u) in &self.metrics.uplinks {
                let labels = [("upstream", upstream.as_str())];
                match kind {
                    MetricType::Gauge => {
                        ConstGauge::new(get(u) as i64).encode(e.encode_family(&labels)?)?
                    }
                    _ => ConstCounter::new(get(u)).encode(e.encode_family(&labels)?)?,
                }
            }
        }
        type PerKind = fn(&crate::metrics::UplinkMetrics, usize) -> u64;
        let per_kind: [(&str, &str, MetricType, PerKind); 2] = [
            (
                "uplink_failures",
                "Failed connection attempts and lost sessions, by kind (tls, refused, unreachable, lost)",
                MetricType::Counter,
                |u, i| u.failures[i].load(Relaxed),
            ),
            (
                "uplink_down_because",
                "1 for the kind of failure that ended the last attempt while the uplink is down",
                MetricType::Gauge,
                |u, i| (u.down_because.load(Relaxed) == i as u64 + 1) as u64,
            ),
        ];
        for (name, help, kind_of_metric, get) in per_kind {
            let mut e = enc.encode_descriptor(name, help, None, kind_of_metric)?;
            for (upstream, u) in &self.metrics.uplinks {
                for (i, kind) in crate::uplink::FailureKind::ALL.iter().enumerate() {
                    let labels = [("upstream", upstream.as_str()), ("kind", kind.name())];
                    match kind_of_metric {
                        MetricType::Gauge => {
                            ConstGauge::new(get(u, i) as i64).encode(e.encode_family(&labels)?)?
                        }
                        _ => ConstCounter::new(get(u, i)).encode(e.encode_family(&labels)?)?,
                    }
                }
            }
        }
        let mut e = enc.encode_descriptor(
            "uplink_refused",
            "Events the upstream refused with an MQTT 5 PUBACK reason code, by reason",
            None,
            MetricType::Counter,
        )?;
        for (upstream, u) in &self.metrics.uplinks {
            let refusals = u.refusals.lock().unwrap_or_else(|p| p.into_inner()).clone();
            for (reason, n) in refusals {
                ConstCounter::new(n).encode(
                    e.encode_family(&[("upstream", upstream.as_str()), ("reason", reason)])?,
                )?;
            }
        }
        type PerPriority = fn(&crate::metrics::UplinkMetrics) -> &[std::sync::atomic::AtomicU64; 3];
        let by_priority: [(&str, &str, PerPriority); 3] = [
            (
                "queue_evicted",
                "Queued events deleted to make room (overflow = drop_oldest)",
                |u| &u.evicted,
            ),
            (
                "queue_rejected",
                "New events refused by a full queue",
                |u| &u.rejected,
            ),
            (
                "queue_expired",
                "Queued events deleted unsent past their TTL",
                |u| &u.expired,
            ),
        ];
        for (name, help, get) in by_priority {
            let mut e = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (upstream, u) in &self.metrics.uplinks {
                for p in PRIORITIES {
                    let v = get(u)[p.index()].load(Relaxed);
                    ConstCounter::new(v).encode(e.encode_family(&[
                        ("upstream", upstream.as_str()),
                        ("priority", p.name()),
                    ])?)?;
                }
            }
        }
        {
            let mut e = enc.encode_descriptor(
                "rule_reloads",
                "Rule reloads, applied or refused",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(m.reloads_ok.load(Relaxed))
                .encode(e.encode_family(&[("result", "ok")])?)?;
            ConstCounter::new(m.reloads_failed.load(Relaxed))
                .encode(e.encode_family(&[("result", "failed")])?)?;
        }
        gauge(
            &mut enc,
            "rule_last_reload_timestamp_seconds",
            "When a reload was last tried (0: never)",
            (m.last_reload_ms.load(Relaxed) / 1000) as i64,
        )?;
        gauge(
            &mut enc,
            "rule_last_reload_ok",
            "1 if the last reload was applied",
            m.last_reload_ok.load(Relaxed) as i64,
        )?;
        gauge(
            &mut enc,
            "rules",
            "Rules in use",
            m.rules.load(Relaxed) as i64,
        )?;
        gauge(
            &mut enc,
            "start_timestamp_seconds",
            "When this edgeferry started",
            (m.started_ms.load(Relaxed) / 1000) as i64,
        )?;
        if let Some(rss) = self.snapshot.rss_bytes {
            gauge(
                &mut enc,
                "process_resident_memory_bytes",
                "Resident set size of the edgeferry process",
                rss as i64,
            )?;
        }
        Ok(())
    }
}

fn find<'a>(stats: &'a [Stats], upstream: &str, p: Priority) -> Option<&'a Stats> {
    stats
        .iter()
        .find(|s| s.upstream == upstream && s.priority == p)
}
