//! Counters shared by the stages. Plain atomics for now: the Prometheus
//! endpoint (operations issue) will export these same values.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// Pipeline-wide counters. Each is monotonic unless noted.
#[derive(Debug, Default)]
pub struct Metrics {
    /// The live trace `edgeferry tail` reads (here because the router and
    /// the metrics endpoint both hold the metrics).
    pub trace: crate::ops::trace::Tracer,
    /// Publishes the front door took into the pipeline (on an ingested
    /// topic; wills included).
    pub received: AtomicU64,
    /// By decoded format.
    pub decoded_json: AtomicU64,
    pub decoded_cbor: AtomicU64,
    pub decoded_raw: AtomicU64,
    /// Payloads that start like JSON but do not parse (dead-lettered).
    pub decoded_malformed: AtomicU64,
    /// Events the front door handed to the router, and events the router finished:
    /// the difference is what waits in the pipeline buffer (the health
    /// probe's "is the router moving" check).
    pub handed: AtomicU64,
    pub routed: AtomicU64,
    /// Events no rule matched (unmatched policy "drop").
    pub dropped_unmatched: AtomicU64,
    /// Downlink events no `from` rule matched (`rules.unmatched_downlink`
    /// = "drop").
    pub dropped_unmatched_downlink: AtomicU64,
    /// Events a `drop = true` rule dropped.
    pub dropped_rule: AtomicU64,
    /// Events that matched at least one rule.
    pub matched: AtomicU64,
    /// Rule evaluations that failed on an event (a `when`, `set`, key or
    /// topic field that errored, a non-numeric deadband field); the rule did
    /// not apply.
    pub rule_errors: AtomicU64,
    /// Events held back by shaping, by reason.
    pub dropped_throttled: AtomicU64,
    pub dropped_duplicate: AtomicU64,
    pub dropped_deadband: AtomicU64,
    /// Events folded into a window, and windows sent on.
    pub window_absorbed: AtomicU64,
    pub window_emitted: AtomicU64,
    /// Events published into the embedded broker by `local` destinations.
    pub republished: AtomicU64,
    /// Local republishes dropped: the republish buffer was full or the broker gone.
    pub republish_failed: AtomicU64,
    /// Local destinations skipped because an event looped between rules.
    pub dropped_loop: AtomicU64,
    /// Events sent by the `unmatched` policy to a destination.
    pub unmatched_routed: AtomicU64,
    /// Events that went to the dead-letter counter (malformed payload or a
    /// rule error); published on the dead-letter topic when one is set.
    pub dead_letters: AtomicU64,
    /// Rule reloads that were applied, and those refused (old rules kept).
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// When the last reload was tried (ms since the epoch; 0: never), and
    /// whether it was applied.
    pub last_reload_ms: AtomicU64,
    pub last_reload_ok: AtomicBool,
    /// Events that broke a schema's contract, by schema name.
    pub schema_failures: std::sync::Mutex<BTreeMap<String, u64>>,
    /// Rules in the set the router is using (a gauge), and its digest
    /// (`RuleSet::digest`: which rule files a gateway runs).
    pub rules: AtomicU64,
    pub rules_digest: std::sync::Mutex<String>,
    /// Duration of the queue writer's successful SQLite commits.
    pub commit_seconds: Histogram,
    /// Commits that failed (disk full, I/O error, a lock held too long);
    /// the writer keeps the events and retries.
    pub commit_failures: AtomicU64,
    /// When the health probe last got an answer from the queue writer (ms
    /// of [`Metrics::uptime_ms`]: monotonic, as a Pi without a real-time
    /// clock has its wall clock set late), and how often it probes:
    /// `/health` is unhealthy when the last answer is more than three
    /// probes old. 0: no answer yet.
    pub healthy_ms: AtomicU64,
    pub health_every_ms: AtomicU64,
    /// When this pipeline started (ms since the epoch).
    pub started_ms: AtomicU64,
    /// The monotonic clock `uptime_ms` counts from.
    pub started: std::sync::OnceLock<std::time::Instant>,
    /// Rows committed to the queue (one per event and upstream destination).
    pub queued: AtomicU64,
    /// SQLite commits of the queue writer.
    pub commits: AtomicU64,
    /// Events acknowledged upstream while still only in RAM: never
    /// written to disk.
    pub acked_in_memory: AtomicU64,
    /// Events dropped because queue commits kept failing (disk full, I/O
    /// error) and the in-memory allowance was used up.
    pub dropped_queue_unavailable: AtomicU64,
    /// Damaged queue databases moved aside at start.
    pub queue_recovered: AtomicU64,
    /// Checkpoints that found the queue's WAL cut short while running
    /// (another program truncated it): committed events were lost.
    pub queue_damaged: AtomicU64,
    /// Local CONNECTs refused by the password file (or a reserved client id).
    pub broker_auth_failures: AtomicU64,
    /// Local client connections open now (a gauge).
    pub door_connections: AtomicU64,
    /// Connections closed at once because `max_connections` were open.
    pub door_refused_busy: AtomicU64,
    /// PUBLISH packets the front door accepted from clients (any topic).
    pub door_publishes: AtomicU64,
    /// Of those, relayed to the embedded broker: a local subscriber's
    /// filter matched, or the publish was retained.
    pub door_relayed: AtomicU64,
    /// Milliseconds publishers were held because the pipeline was full
    /// (summed over connections).
    pub door_held_ms: AtomicU64,
    /// Publishes refused for their topic (control characters,
    /// non-characters, wildcards).
    pub door_rejected_topic: AtomicU64,
    /// Publishes refused for a payload over `broker.max_payload`.
    pub door_rejected_payload: AtomicU64,
    /// Publishes and subscriptions the ACL (or a malformed filter)
    /// refused, and deliveries the ACL kept from a subscriber.
    pub door_denied_publish: AtomicU64,
    pub door_denied_subscribe: AtomicU64,
    pub door_denied_delivery: AtomicU64,
    /// Connections closed for malformed packets or protocol violations.
    pub door_protocol_errors: AtomicU64,
    /// Per upstream, keyed by name.
    pub uplinks: BTreeMap<String, Arc<UplinkMetrics>>,
}

/// Counters and state of one upstream session.
#[derive(Debug, Default)]
pub struct UplinkMetrics {
    /// 1 while the MQTT session is up.
    pub connected: AtomicBool,
    pub connects: AtomicU64,
    /// Whether the broker resumed the session at the last CONNACK.
    pub session_present: AtomicBool,
    /// QoS 1 publishes allowed in flight on the current session: `inflight`,
    /// or an MQTT 5 server's smaller Receive Maximum.
    pub window: AtomicU64,
    /// Publishes sent and not yet acknowledged (a gauge).
    pub inflight: AtomicU64,
    /// Publishes handed to the network (re-sends included).
    pub sent: AtomicU64,
    /// Rows sent again after a reconnect (not acked before the link dropped).
    pub resent: AtomicU64,
    /// Rows acknowledged by the upstream (PUBACK, or written for QoS 0) and deleted.
    pub acked: AtomicU64,
    /// Rows that can never be sent (wildcard topic, packet over the upstream's
    /// max_packet_size): deleted so they do not block the queue, and counted.
    pub dead_lettered: AtomicU64,
    /// Per priority (low, normal, high): queued events deleted to make room
    /// (overflow = "drop_oldest").
    pub evicted: [AtomicU64; 3],
    /// Per priority: new events dropped because the queue was full
    /// (overflow = "drop_newest", or nothing evictable).
    pub rejected: [AtomicU64; 3],
    /// Per priority: events deleted unsent because their TTL passed.
    pub expired: [AtomicU64; 3],
    /// Failed connection attempts and dropped sessions, by
    /// `uplink::FailureKind` (index).
    pub failures: [AtomicU64; FAILURE_KINDS],
    /// While down: what ended the last attempt (1 + index in
    /// `uplink::FailureKind::ALL`); 0 while connected or before any attempt.
    pub down_because: AtomicU64,
    /// Why the last attempt failed or the last session ended, with a hint
    /// for TLS trouble; cleared when a session comes up. For `status` and
    /// tests; the log has the same line.
    pub last_error: std::sync::Mutex<Option<String>>,
    /// MQTT 5 PUBACKs with a failure reason code, by reason.
    pub refusals: std::sync::Mutex<BTreeMap<&'static str, u64>>,
    /// Publishes that arrived on the downlink subscriptions and went to
    /// the rules.
    pub downlink_received: AtomicU64,
    /// Publishes that arrived on the downlink and were edgeferry's own,
    /// echoed back by a 3.1.1 broker (MQTT 5 has No Local): dropped, so a
    /// rule set cannot loop through the cloud.
    pub downlink_echoes: AtomicU64,
    /// Downlink filters the upstream refused in its SUBACK.
    pub downlink_refused: AtomicU64,
    /// Downlink filters the upstream granted on this session (a gauge; 0
    /// while down).
    pub downlink_subscribed: AtomicU64,
    /// Status messages (birth, heartbeats, offline) handed to the link.
    pub status_sent: AtomicU64,
    /// Commands that arrived on the control topic (each taken one gets a
    /// result), and those dropped for arriving faster than 10 a second.
    pub control_commands: AtomicU64,
    pub control_dropped: AtomicU64,
    /// The gateway's own messages (status, control results) not sent
    /// because the link had no room for them then.
    pub own_dropped: AtomicU64,
    /// Commands too large for max_packet_size: the session they were
    /// queued in was dropped (a fresh one started).
    pub downlink_oversized: AtomicU64,
}

impl UplinkMetrics {
    pub fn count_refusal(&self, reason: &'static str) {
        *self
            .refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason)
            .or_default() += 1;
    }
}

/// How many kinds of uplink failure are counted (`uplink::FailureKind`,
/// which checks it): the counters only observe, so they name no uplink type.
pub const FAILURE_KINDS: usize = 5;

impl Metrics {
    /// `events_dropped` by reason: the metric's label values and the
    /// status topic's heartbeat read the same table.
    pub fn dropped(&self) -> [(&'static str, &AtomicU64); 8] {
        [
            ("unmatched", &self.dropped_unmatched),
            ("unmatched_downlink", &self.dropped_unmatched_downlink),
            ("rule", &self.dropped_rule),
            ("throttled", &self.dropped_throttled),
            ("duplicate", &self.dropped_duplicate),
            ("deadband", &self.dropped_deadband),
            ("queue_unavailable", &self.dropped_queue_unavailable),
            ("loop", &self.dropped_loop),
        ]
    }

    pub fn new<'a>(upstreams: impl IntoIterator<Item = &'a String>) -> Metrics {
        Metrics {
            uplinks: upstreams
                .into_iter()
                .map(|n| (n.clone(), Arc::default()))
                .collect(),
            ..Default::default()
        }
    }

    /// Milliseconds since this pipeline started, on the monotonic clock
    /// (at least 1, so 0 can mean "never").
    pub fn uptime_ms(&self) -> u64 {
        let started = self.started.get_or_init(std::time::Instant::now);
        (started.elapsed().as_millis() as u64).max(1)
    }

    /// One line for the periodic summary log. Each key is the name of its
    /// metric without `edgeferry_` and `_total` (a label's value appended
    /// after `_`, or the sum over it), so a line and a dashboard read alike.
    pub fn summary(&self) -> String {
        let refused = [
            &self.door_denied_publish,
            &self.door_denied_subscribe,
            &self.door_denied_delivery,
            &self.door_rejected_topic,
            &self.door_rejected_payload,
        ];
        let mut s = format!(
            "events_received={} events_matched={} queue_appended={} queue_commits={} rule_errors={} dead_letters={} events_dropped_throttled={} events_dropped_duplicate={} events_dropped_deadband={} window_events_emitted={} republished={} events_dropped_unmatched={} events_dropped_rule={} events_dropped_queue_unavailable={} local_connections={} local_publishers_held_seconds={:.1} local_refused={}",
            self.received.load(Relaxed),
            self.matched.load(Relaxed),
            self.queued.load(Relaxed),
            self.commits.load(Relaxed),
            self.rule_errors.load(Relaxed),
            self.dead_letters.load(Relaxed),
            self.dropped_throttled.load(Relaxed),
            self.dropped_duplicate.load(Relaxed),
            self.dropped_deadband.load(Relaxed),
            self.window_emitted.load(Relaxed),
            self.republished.load(Relaxed),
            self.dropped_unmatched.load(Relaxed),
            self.dropped_rule.load(Relaxed),
            self.dropped_queue_unavailable.load(Relaxed),
            self.door_connections.load(Relaxed),
            self.door_held_ms.load(Relaxed) as f64 / 1000.0,
            refused.iter().map(|c| c.load(Relaxed)).sum::<u64>(),
        );
        for (name, u) in &self.uplinks {
            s.push_str(&format!(
                " {name}=[uplink_connected={} uplink_acked={} uplink_resent={} uplink_dead_lettered={} queue_evicted={} queue_rejected={} queue_expired={}]",
                u8::from(u.connected.load(Relaxed)),
                u.acked.load(Relaxed),
                u.resent.load(Relaxed),
                u.dead_lettered.load(Relaxed),
                sum(&u.evicted),
                sum(&u.rejected),
                sum(&u.expired)
            ));
        }
        s
    }
}

fn sum(per_priority: &[AtomicU64; 3]) -> u64 {
    per_priority.iter().map(|c| c.load(Relaxed)).sum()
}

/// A latency histogram with fixed buckets, in plain atomics (so `Metrics`
/// stays `Default` and lock-free); exported in Prometheus form.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations at or below each of `BUCKETS` (not cumulative).
    counts: [AtomicU64; BUCKETS.len()],
    /// Above the last bucket.
    over: AtomicU64,
    sum_micros: AtomicU64,
}

/// Upper bounds in seconds: 1 ms to 10 s, for commits on SD cards.
pub const BUCKETS: [f64; 10] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0,
];

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        match BUCKETS.iter().position(|b| secs <= *b) {
            Some(i) => self.counts[i].fetch_add(1, Relaxed),
            None => self.over.fetch_add(1, Relaxed),
        };
        self.sum_micros
            .fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// (sum in seconds, count, (upper bound, count in that bucket) pairs,
    /// the last one +Inf): the form `prometheus-client` accumulates.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .zip(&self.counts)
            .map(|(b, c)| (*b, c.load(Relaxed)))
            .collect();
        buckets.push((f64::INFINITY, self.over.load(Relaxed)));
        let count = buckets.iter().map(|(_, c)| c).sum();
        (self.sum_micros.load(Relaxed) as f64 / 1e6, count, buckets)
    }
}
