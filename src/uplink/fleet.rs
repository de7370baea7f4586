//! The gateway's health on an upstream's `status_topic`, for a fleet whose
//! gateways sit behind NAT where nobody can scrape `/metrics`.
//!
//! Every message is retained JSON on the one topic, so the broker always
//! holds the gateway's latest state: a birth (`online`) on every connect,
//! a heartbeat (`online`, with what `edgeferry status` shows) every
//! `status_interval`, the Last Will (`offline`, `"reason": "lost"`) that
//! the broker publishes when the connection dies without a DISCONNECT, and
//! `offline` with `"reason": "stopped"` on a clean stop. They go straight
//! to the link, never through the queue, so a backlog does not delay them.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::event::now_ms;
use crate::metrics::Metrics;
use crate::queue::QueueHandle;

/// An upstream's status topic, resolved from the config.
#[derive(Debug, Clone)]
pub struct StatusTopic {
    /// With `{gateway}` replaced.
    pub topic: String,
    pub interval: Duration,
    pub gateway: String,
    /// When this daemon started (ms since the epoch).
    pub started_ms: u64,
}

impl StatusTopic {
    fn base(&self, state: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("gateway".into(), json!(self.gateway));
        m.insert("state".into(), json!(state));
        m.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
        m.insert("started_ms".into(), json!(self.started_ms));
        m
    }

    /// The Last Will, fixed at connect: the broker sends it as it is.
    pub fn will(&self) -> Vec<u8> {
        let mut m = self.base("offline");
        m.insert("reason".into(), json!("lost"));
        Value::Object(m).to_string().into_bytes()
    }

    /// On every connect.
    pub fn birth(&self) -> Bytes {
        let mut m = self.base("online");
        m.insert("time_ms".into(), json!(now_ms()));
        Bytes::from(Value::Object(m).to_string())
    }

    /// Published before the DISCONNECT of a clean stop.
    pub fn stopped(&self) -> Bytes {
        let mut m = self.base("offline");
        m.insert("reason".into(), json!("stopped"));
        m.insert("time_ms".into(), json!(now_ms()));
        Bytes::from(Value::Object(m).to_string())
    }

    /// What `edgeferry status` shows: per upstream its link and queue
    /// (events, bytes, oldest age), drops by reason, rates since the last
    /// heartbeat (or the start), RSS, the rule set. Counters are totals since start.
    pub async fn heartbeat(
        &self,
        metrics: &Arc<Metrics>,
        queue: &QueueHandle,
        rates: &mut Rates,
    ) -> Bytes {
        let mut m = self.base("online");
        let now = now_ms();
        m.insert("time_ms".into(), json!(now));
        m.insert(
            "uptime_s".into(),
            json!(metrics.uptime_ms() as f64 / 1000.0),
        );
        let stats = queue.stats().await.ok();
        let mut upstreams = Map::new();
        for (name, u) in &metrics.uplinks {
            let mine = stats.iter().flatten().filter(|s| &s.upstream == name);
            let (mut events, mut bytes, mut oldest) = (0u64, 0u64, None::<u64>);
            for s in mine {
                events += s.events;
                bytes += s.bytes;
                oldest = Some(oldest.map_or(s.oldest_ms, |o| o.min(s.oldest_ms)));
            }
            let age = oldest.map_or(0.0, |o| now.saturating_sub(o) as f64 / 1000.0);
            upstreams.insert(
                name.clone(),
                json!({
                    "connected": u.connected.load(Relaxed),
                    "queued": stats.as_ref().map(|_| events),
                    "queued_bytes": stats.as_ref().map(|_| bytes),
                    "oldest_age_s": stats.as_ref().map(|_| age),
                    "sent": u.sent.load(Relaxed),
                    "acked": u.acked.load(Relaxed),
                    "resent": u.resent.load(Relaxed),
                    "dead_lettered": u.dead_lettered.load(Relaxed),
                    "downlink_received": u.downlink_received.load(Relaxed),
                }),
            );
        }
        m.insert("upstreams".into(), Value::Object(upstreams));
        let received = metrics.received.load(Relaxed);
        let acked: u64 = metrics
            .uplinks
            .values()
            .map(|u| u.acked.load(Relaxed))
            .sum();
        m.insert(
            "events".into(),
            json!({
                "received": received,
                "matched": metrics.matched.load(Relaxed),
                "dead_letters": metrics.dead_letters.load(Relaxed),
                "rule_errors": metrics.rule_errors.load(Relaxed),
            }),
        );
        let dropped: Map<String, Value> = metrics
            .dropped()
            .iter()
            .map(|(reason, c)| (reason.to_string(), json!(c.load(Relaxed))))
            .collect();
        m.insert("dropped".into(), Value::Object(dropped));
        m.insert(
            "rates".into(),
            rates.since(now, received, acked, self.started_ms),
        );
        let rss = crate::ops::process::Process::read().map(|p| p.resident_bytes);
        m.insert("rss_bytes".into(), json!(rss));
        let digest = metrics
            .rules_digest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        m.insert(
            "rules".into(),
            json!({ "count": metrics.rules.load(Relaxed), "digest": digest }),
        );
        Bytes::from(Value::Object(m).to_string())
    }
}

/// The counters at the last heartbeat, for the rates of the next.
#[derive(Debug, Default)]
pub struct Rates {
    last: Option<(u64, u64, u64)>,
}

impl Rates {
    /// Events received and acknowledged upstream per second since the last
    /// call, or since `started_ms` on the first.
    fn since(&mut self, now_ms: u64, received: u64, acked: u64, started_ms: u64) -> Value {
        let (t, r, a) = self
            .last
            .replace((now_ms, received, acked))
            .unwrap_or((started_ms, 0, 0));
        let secs = (now_ms.saturating_sub(t) as f64 / 1000.0).max(0.001);
        let per_s =
            |now: u64, then: u64| (now.saturating_sub(then) as f64 / secs * 10.0).round() / 10.0;
        json!({ "received_per_s": per_s(received, r), "acked_per_s": per_s(acked, a) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_since_the_last_heartbeat() {
        let mut r = Rates::default();
        let first = r.since(1_000, 10, 5, 500);
        assert_eq!(first["received_per_s"], json!(20.0), "since the start");
        let v = r.since(3_000, 110, 45, 500);
        assert_eq!(v["received_per_s"], json!(50.0));
        assert_eq!(v["acked_per_s"], json!(20.0));
    }

    #[test]
    fn every_message_names_the_gateway_and_its_state() {
        let s = StatusTopic {
            topic: "gw/g1/status".into(),
            interval: Duration::from_secs(60),
            gateway: "g1".into(),
            started_ms: 1,
        };
        let will: Value = serde_json::from_slice(&s.will()).unwrap();
        assert_eq!(will["state"], "offline");
        assert_eq!(will["reason"], "lost");
        assert_eq!(will["gateway"], "g1");
        let birth: Value = serde_json::from_slice(&s.birth()).unwrap();
        assert_eq!(birth["state"], "online");
        let stopped: Value = serde_json::from_slice(&s.stopped()).unwrap();
        assert_eq!(
            (stopped["state"].as_str(), stopped["reason"].as_str()),
            (Some("offline"), Some("stopped"))
        );
    }
}
