//! The Prometheus exposition of edgeferry's counters, rendered per scrape
//! with `prometheus-client`'s text encoder from a snapshot: the pipeline's
//! atomics, the queue's depth per upstream and priority (a read-only query
//! of the queue file, like `edgeferry queue stats`), the build, and the
//! standard `process_*` series (not prefixed, as every exporter writes them).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::process::Process;
use crate::event::now_ms;
use crate::metrics::{Metrics, UplinkMetrics};
use crate::queue::{Priority, Stats};
use crate::uplink::FailureKind;

/// What one scrape shows besides the counters.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Per upstream and priority; `None` when the queue could not be read.
    pub queue: Option<Vec<Stats>>,
    /// This process's resources (`process_*`, unprefixed as is standard).
    pub process: Option<Process>,
}

/// Render the text exposition format.
pub fn render(metrics: &std::sync::Arc<Metrics>, snapshot: Snapshot) -> String {
    let mut registry = Registry::default();
    let process = snapshot.process;
    registry
        .sub_registry_with_prefix("edgeferry")
        .register_collector(Box::new(Scrape {
            metrics: metrics.clone(),
            snapshot,
        }));
    if let Some(p) = process {
        registry.register_collector(Box::new(ProcessMetrics(p)));
    }
    let mut out = String::with_capacity(8192);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// The standard `process_*` series.
#[derive(Debug)]
struct ProcessMetrics(Process);

impl Collector for ProcessMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let p = &self.0;
        let counter = ConstCounter::new(p.cpu_seconds);
        counter.encode(enc.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?)?;
        let gauges: [(&str, &str, f64); 6] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                p.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                p.virtual_bytes as f64,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                p.open_fds as f64,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                p.max_fds as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                p.start_time_seconds,
            ),
            (
                "process_threads",
                "Number of OS threads in the process",
                p.threads as f64,
            ),
        ];
        for (name, help, v) in gauges {
            ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, Gauge)?)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Scrape {
    metrics: std::sync::Arc<Metrics>,
    snapshot: Snapshot,
}

const PRIORITIES: [Priority; 3] = [Priority::Low, Priority::Normal, Priority::High];

/// One unlabelled metric: name, help, type, and where its value is.
type Plain = (&'static str, &'static str, MetricType, fn(&Metrics) -> u64);

use MetricType::{Counter, Gauge};

const FRONT_DOOR: &[Plain] = &[
    (
        "events_received",
        "Publishes the front door took into the pipeline (ingested topics; wills included)",
        Counter,
        |m| m.received.load(Relaxed),
    ),
    (
        "local_connections",
        "Local MQTT client connections open now",
        Gauge,
        |m| m.door_connections.load(Relaxed),
    ),
    (
        "local_connections_refused_busy",
        "Local connections closed at once because max_connections were open",
        Counter,
        |m| m.door_refused_busy.load(Relaxed),
    ),
    (
        "local_publishes",
        "PUBLISH packets accepted from local clients (every topic)",
        Counter,
        |m| m.door_publishes.load(Relaxed),
    ),
    (
        "local_publishes_relayed",
        "Local PUBLISH packets relayed to the embedded broker: a local subscription matched, or retained (others go only to the rules)",
        Counter,
        |m| m.door_relayed.load(Relaxed),
    ),
    (
        "local_publishers_held_seconds",
        "Time publishers were held: not read because the pipeline was full or, with ack = received, acknowledged later because max_inflight acknowledged events were not yet safe (summed over connections)",
        Counter,
        |m| m.door_held_ms.load(Relaxed) / 1000,
    ),
    (
        "local_protocol_errors",
        "Local connections closed for malformed packets or protocol violations",
        Counter,
        |m| m.door_protocol_errors.load(Relaxed),
    ),
];

const MATCHED: &[Plain] = &[(
    "events_matched",
    "Events at least one rule applied to",
    Counter,
    |m| m.matched.load(Relaxed),
)];

const PIPELINE: &[Plain] = &[
    (
        "dead_letters",
        "Events with a malformed payload or a failing rule",
        Counter,
        |m| m.dead_letters.load(Relaxed),
    ),
    (
        "rule_errors",
        "Rule evaluations that failed on an event",
        Counter,
        |m| m.rule_errors.load(Relaxed),
    ),
    (
        "events_unmatched_routed",
        "Events sent to the unmatched destination",
        Counter,
        |m| m.unmatched_routed.load(Relaxed),
    ),
    (
        "window_events_absorbed",
        "Events folded into a window",
        Counter,
        |m| m.window_absorbed.load(Relaxed),
    ),
    (
        "window_events_emitted",
        "Window aggregates sent on",
        Counter,
        |m| m.window_emitted.load(Relaxed),
    ),
    (
        "republished",
        "Events published into the embedded broker by local destinations",
        Counter,
        |m| m.republished.load(Relaxed),
    ),
    (
        "republish_failed",
        "Local publishes dropped (buffer full or broker gone)",
        Counter,
        |m| m.republish_failed.load(Relaxed),
    ),
    (
        "queue_appended",
        "Rows committed to the queue (one per event and upstream)",
        Counter,
        |m| m.queued.load(Relaxed),
    ),
    (
        "queue_commits",
        "SQLite commits of the queue writer",
        Counter,
        |m| m.commits.load(Relaxed),
    ),
    (
        "queue_acked_in_memory",
        "Events acknowledged upstream before they were written to disk (they never touched it)",
        Counter,
        |m| m.acked_in_memory.load(Relaxed),
    ),
    (
        "queue_commit_failures",
        "Queue commits that failed and are being retried (disk full, I/O error)",
        Counter,
        |m| m.commit_failures.load(Relaxed),
    ),
    (
        "broker_auth_failures",
        "Local clients refused at CONNECT (unknown user, wrong password, reserved client id)",
        Counter,
        |m| m.broker_auth_failures.load(Relaxed),
    ),
    (
        "queue_recovered",
        "Damaged queue files moved aside at start",
        Counter,
        |m| m.queue_recovered.load(Relaxed),
    ),
    (
        "queue_damaged",
        "Checkpoints that found the queue's WAL file cut short by another program while running",
        Counter,
        |m| m.queue_damaged.load(Relaxed),
    ),
];

const RULE_STATE: &[Plain] = &[
    (
        "rule_last_reload_timestamp_seconds",
        "When a reload was last tried (0: never)",
        Gauge,
        |m| m.last_reload_ms.load(Relaxed) / 1000,
    ),
    (
        "rule_last_reload_ok",
        "1 if the last reload was applied",
        Gauge,
        |m| m.last_reload_ok.load(Relaxed) as u64,
    ),
    ("rules", "Rules in use", Gauge, |m| m.rules.load(Relaxed)),
    (
        "start_timestamp_seconds",
        "When this edgeferry started",
        Gauge,
        |m| m.started_ms.load(Relaxed) / 1000,
    ),
];

/// One per-upstream metric.
type PerUplink = (
    &'static str,
    &'static str,
    MetricType,
    fn(&UplinkMetrics) -> u64,
);

const PER_UPLINK: &[PerUplink] = &[
    (
        "uplink_connected",
        "1 while the upstream session is up",
        Gauge,
        |u| u.connected.load(Relaxed) as u64,
    ),
    (
        "uplink_connects",
        "Upstream sessions established",
        Counter,
        |u| u.connects.load(Relaxed),
    ),
    (
        "uplink_session_present",
        "1 if the broker resumed the session at the last connect",
        Gauge,
        |u| u.session_present.load(Relaxed) as u64,
    ),
    (
        "uplink_window",
        "QoS 1 publishes allowed in flight (inflight, or the server's smaller Receive Maximum)",
        Gauge,
        |u| u.window.load(Relaxed),
    ),
    (
        "uplink_inflight",
        "Publishes sent and not yet acknowledged",
        Gauge,
        |u| u.inflight.load(Relaxed),
    ),
    (
        "uplink_sent",
        "Publishes handed to the network (re-sends included)",
        Counter,
        |u| u.sent.load(Relaxed),
    ),
    (
        "uplink_acked",
        "Events acknowledged by the upstream and deleted",
        Counter,
        |u| u.acked.load(Relaxed),
    ),
    (
        "uplink_resent",
        "Events sent again after a reconnect",
        Counter,
        |u| u.resent.load(Relaxed),
    ),
    (
        "uplink_dead_lettered",
        "Events the upstream can never take (deleted, counted)",
        Counter,
        |u| u.dead_lettered.load(Relaxed),
    ),
    (
        "downlink_received",
        "Publishes that arrived on the upstream's downlink subscriptions and went to the rules",
        Counter,
        |u| u.downlink_received.load(Relaxed),
    ),
    (
        "downlink_echoes_dropped",
        "Downlink publishes that were edgeferry's own, echoed back by a 3.1.1 broker (dropped: no loop)",
        Counter,
        |u| u.downlink_echoes.load(Relaxed),
    ),
    (
        "downlink_subscribed",
        "Downlink filters the upstream granted on this session (0 while down)",
        Gauge,
        |u| u.downlink_subscribed.load(Relaxed),
    ),
    (
        "downlink_refused",
        "Downlink filters the upstream refused in its SUBACK",
        Counter,
        |u| u.downlink_refused.load(Relaxed),
    ),
    (
        "status_sent",
        "Messages on the upstream's status_topic (birth, heartbeats, offline)",
        Counter,
        |u| u.status_sent.load(Relaxed),
    ),
    (
        "control_commands",
        "Commands that arrived on the upstream's control_topic (each answered on <control_topic>/result)",
        Counter,
        |u| u.control_commands.load(Relaxed),
    ),
    (
        "control_dropped",
        "Control commands dropped for arriving faster than 10 a second",
        Counter,
        |u| u.control_dropped.load(Relaxed),
    ),
    (
        "own_messages_dropped",
        "Status messages and control results not sent: the link had no room for them then",
        Counter,
        |u| u.own_dropped.load(Relaxed),
    ),
    (
        "downlink_oversized",
        "Commands larger than max_packet_size: the session holding them was replaced by a fresh one",
        Counter,
        |u| u.downlink_oversized.load(Relaxed),
    ),
];

/// One per-upstream metric by failure kind.
type PerKind = (
    &'static str,
    &'static str,
    MetricType,
    fn(&UplinkMetrics, usize) -> u64,
);

const PER_KIND: &[PerKind] = &[
    (
        "uplink_failures",
        "Failed connection attempts and lost sessions, by kind (tls, refused, unreachable, lost, stalled)",
        Counter,
        |u, i| u.failures[i].load(Relaxed),
    ),
    (
        "uplink_down_because",
        "1 for the kind of failure that ended the last attempt while the uplink is down",
        Gauge,
        |u, i| (u.down_because.load(Relaxed) == i as u64 + 1) as u64,
    ),
];

/// One per-upstream counter by priority.
type PerPriority = (
    &'static str,
    &'static str,
    fn(&UplinkMetrics) -> &[AtomicU64; 3],
);

const PER_PRIORITY: &[PerPriority] = &[
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

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let m = &*self.metrics;
        plain(&mut enc, m, FRONT_DOOR)?;
        labelled(
            &mut enc,
            "local_refused",
            "Local publishes, subscriptions and deliveries refused, by reason",
            "reason",
            &[
                ("publish_denied", &m.door_denied_publish),
                ("subscribe_denied", &m.door_denied_subscribe),
                ("delivery_denied", &m.door_denied_delivery),
                ("topic_invalid", &m.door_rejected_topic),
                ("payload_too_large", &m.door_rejected_payload),
            ],
        )?;
        labelled(
            &mut enc,
            "events_decoded",
            "Received events by payload format",
            "format",
            &[
                ("json", &m.decoded_json),
                ("cbor", &m.decoded_cbor),
                ("raw", &m.decoded_raw),
                ("malformed", &m.decoded_malformed),
            ],
        )?;
        plain(&mut enc, m, MATCHED)?;
        labelled(
            &mut enc,
            "events_dropped",
            "Events dropped inside edgeferry, by reason",
            "reason",
            &m.dropped(),
        )?;
        {
            let failures = m
                .schema_failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let mut e = enc.encode_descriptor(
                "events_schema_failed",
                "Events that broke a schema's contract (dead-lettered, not forwarded), by schema",
                None,
                Counter,
            )?;
            for (schema, n) in &failures {
                value(&mut e, Counter, *n, &[("schema", schema.as_str())])?;
            }
        }
        plain(&mut enc, m, PIPELINE)?;
        let (sum, count, buckets) = m.commit_seconds.snapshot();
        enc.encode_descriptor(
            "queue_commit_seconds",
            "Duration of queue commits",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        if let Some(stats) = &self.snapshot.queue {
            self.queue_depth(&mut enc, stats)?;
        }
        self.uplinks(&mut enc)?;
        labelled(
            &mut enc,
            "rule_reloads",
            "Rule reloads, applied or refused",
            "result",
            &[("ok", &m.reloads_ok), ("failed", &m.reloads_failed)],
        )?;
        plain(&mut enc, m, RULE_STATE)?;
        let features = [
            cfg!(feature = "regex").then_some("regex"),
            cfg!(feature = "tls").then_some("tls"),
        ];
        let features = features.into_iter().flatten().collect::<Vec<_>>().join(",");
        ConstGauge::new(1).encode(
            enc.encode_descriptor(
                "build_info",
                "This build: version and features (always 1)",
                None,
                Gauge,
            )?
            .encode_family(&[
                ("version", env!("CARGO_PKG_VERSION")),
                ("features", features.as_str()),
            ])?,
        )?;
        Ok(())
    }
}

impl Scrape {
    /// Events and bytes per upstream and priority, and the oldest age.
    fn queue_depth(&self, enc: &mut DescriptorEncoder, stats: &[Stats]) -> fmt::Result {
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
            let mut e = enc.encode_descriptor(name, help, None, Gauge)?;
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
            Gauge,
        )?;
        let now = now_ms();
        for upstream in self.metrics.uplinks.keys() {
            let oldest = stats
                .iter()
                .filter(|s| &s.upstream == upstream)
                .map(|s| s.oldest_ms)
                .min();
            let age = oldest.map_or(0.0, |o| now.saturating_sub(o) as f64 / 1e3);
            ConstGauge::new(age).encode(e.encode_family(&[("upstream", upstream.as_str())])?)?;
        }
        Ok(())
    }

    /// Each upstream's session, failures, refusals and queue limits.
    fn uplinks(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let uplinks = &self.metrics.uplinks;
        for &(name, help, kind, get) in PER_UPLINK {
            let mut e = enc.encode_descriptor(name, help, None, kind)?;
            for (upstream, u) in uplinks {
                value(&mut e, kind, get(u), &[("upstream", upstream.as_str())])?;
            }
        }
        for &(name, help, kind, get) in PER_KIND {
            let mut e = enc.encode_descriptor(name, help, None, kind)?;
            for (upstream, u) in uplinks {
                for (i, failure) in FailureKind::ALL.iter().enumerate() {
                    let labels = [("upstream", upstream.as_str()), ("kind", failure.name())];
                    value(&mut e, kind, get(u, i), &labels)?;
                }
            }
        }
        let mut e = enc.encode_descriptor(
            "uplink_refused",
            "Events the upstream refused with an MQTT 5 PUBACK reason code, by reason",
            None,
            Counter,
        )?;
        for (upstream, u) in uplinks {
            let refusals = u.refusals.lock().unwrap_or_else(|p| p.into_inner()).clone();
            for (reason, n) in refusals {
                let labels = [("upstream", upstream.as_str()), ("reason", reason)];
                value(&mut e, Counter, n, &labels)?;
            }
        }
        for &(name, help, get) in PER_PRIORITY {
            let mut e = enc.encode_descriptor(name, help, None, Counter)?;
            for (upstream, u) in uplinks {
                for p in PRIORITIES {
                    let labels = [("upstream", upstream.as_str()), ("priority", p.name())];
                    value(&mut e, Counter, get(u)[p.index()].load(Relaxed), &labels)?;
                }
            }
        }
        Ok(())
    }
}

/// Unlabelled metrics from a table.
fn plain(enc: &mut DescriptorEncoder, m: &Metrics, table: &[Plain]) -> fmt::Result {
    for &(name, help, kind, get) in table {
        let e = enc.encode_descriptor(name, help, None, kind)?;
        match kind {
            Gauge => ConstGauge::new(get(m) as i64).encode(e)?,
            _ => ConstCounter::new(get(m)).encode(e)?,
        }
    }
    Ok(())
}

/// One counter family with one label.
fn labelled(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, &AtomicU64)],
) -> fmt::Result {
    let mut e = enc.encode_descriptor(name, help, None, Counter)?;
    for (v, c) in values {
        value(&mut e, Counter, c.load(Relaxed), &[(label, *v)])?;
    }
    Ok(())
}

/// One labelled sample of a gauge or a counter.
fn value(
    e: &mut prometheus_client::encoding::MetricEncoder,
    kind: MetricType,
    v: u64,
    labels: &[(&str, &str)],
) -> fmt::Result {
    match kind {
        Gauge => ConstGauge::new(v as i64).encode(e.encode_family(&labels)?),
        _ => ConstCounter::new(v).encode(e.encode_family(&labels)?),
    }
}

fn find<'a>(stats: &'a [Stats], upstream: &str, p: Priority) -> Option<&'a Stats> {
    stats
        .iter()
        .find(|s| s.upstream == upstream && s.priority == p)
}
