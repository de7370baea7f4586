//! Local republish: events that rules send to a `local` topic, and dead
//! letters, published into the embedded broker through the ingest link.
//!
//! rumqttd's `LinkTx::send` blocks when the broker's router is busy, so it
//! runs on a thread of its own, fed by a bounded channel the router never
//! waits on (a full channel drops the publish and counts it).
//!
//! Loop safety: what edgeferry publishes comes back to ingest like any
//! other publish, and the rules must know it is theirs (to skip the rule
//! that produced it, and to bound loops between rules, see
//! `rules::MAX_HOPS`). MQTT 5 user properties would say so, but rumqttd 0.20
//! panics when it forwards a publish that has properties to an MQTT 3.1.1
//! subscriber, so nothing is stamped on the message. Instead a [`Tracker`]
//! remembers each publish (topic and a hash of the payload) until ingest
//! sees it come back, or for a few seconds if it never does (its topic is
//! outside the ingest filters).
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use rumqttd::local::LinkTx;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rumqttd::protocol::{Packet, Publish};
use tokio::sync::mpsc;
use tracing::warn;

use crate::event::Origin;
use crate::metrics::Metrics;

/// One publish into the embedded broker.
#[derive(Debug)]
pub struct Local {
    pub topic: String,
    pub payload: Bytes,
    /// `Some` for a rule's republish, `None` for a dead letter.
    pub origin: Option<Origin>,
}

/// Publishes held between the router and the broker.
const BUFFER: usize = 1024;

/// The router's end: never waits.
#[derive(Clone)]
pub struct Republisher {
    tx: mpsc::Sender<Local>,
    metrics: Arc<Metrics>,
}

impl Republisher {
    /// Queue a publish; counts it as republished or failed.
    pub fn send(&self, local: Local) {
        let rule = local.origin.is_some();
        match self.tx.try_send(local) {
            Ok(()) if rule => {
                self.metrics.republished.fetch_add(1, Relaxed);
            }
            Ok(()) => {}
            Err(_) => {
                self.metrics.republish_failed.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Start the publishing thread; it ends when every `Republisher` is dropped.
pub fn spawn(
    mut link: LinkTx,
    tracker: Arc<Tracker>,
    metrics: Arc<Metrics>,
) -> std::io::Result<(Republisher, std::thread::JoinHandle<()>)> {
    let (tx, mut rx) = mpsc::channel::<Local>(BUFFER);
    let m = metrics.clone();
    let thread = std::thread::Builder::new()
        .name("edgeferry-republish".into())
        .spawn(move || {
            // `send` is an async fn that never awaits; a small runtime
            // drives it (and the channel) on this thread.
            let rt = match tokio::runtime::Builder::new_current_thread().build() {
                Ok(rt) => rt,
                Err(e) => {
                    warn!(error = %e, "cannot start the local republish thread");
                    return;
                }
            };
            rt.block_on(async {
                while let Some(local) = rx.recv().await {
                    tracker.expect(&local.topic, &local.payload, local.origin);
                    // QoS 0, like every local-link publish.
                    let publish =
                        Publish::new(Bytes::from(local.topic.into_bytes()), local.payload, false);
                    if link.send(Packet::Publish(publish, None)).await.is_err() {
                        m.republish_failed.fetch_add(1, Relaxed);
                    }
                }
            });
        })?;
    Ok((Republisher { tx, metrics }, thread))
}

/// Where an ingested publish came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A sensor or local app.
    Client,
    /// A rule's `local` destination.
    Rule(Origin),
    /// Our own dead letter: for local subscribers, not routed.
    DeadLetter,
}

/// Publishes edgeferry made, waiting to be recognised when they come back.
#[derive(Debug, Default)]
pub struct Tracker {
    /// The ingest filters: a publish outside them never comes back, so it
    /// is not remembered (it would only slow every lookup down).
    ingest: Vec<crate::rules::topic::Pattern>,
    pending: Mutex<VecDeque<Pending>>,
}

#[derive(Debug)]
struct Pending {
    topic: String,
    hash: u64,
    origin: Option<Origin>,
    at: Instant,
}

/// How long a publish is remembered if it never comes back.
const FORGET_AFTER: Duration = Duration::from_secs(10);
/// At most this many remembered at once (memory stays bounded whatever the rules do).
const MAX_PENDING: usize = 10_000;

fn hash_of(payload: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    payload.hash(&mut h);
    h.finish()
}

impl Tracker {
    /// A tracker for publishes that come back through `ingest` filters.
    pub fn new(ingest: &[String]) -> Tracker {
        Tracker {
            ingest: ingest
                .iter()
                .filter_map(|f| crate::rules::topic::Pattern::parse(f).ok())
                .collect(),
            pending: Mutex::default(),
        }
    }

    /// Remember a publish about to be made (`origin: None`: a dead letter).
    pub fn expect(&self, topic: &str, payload: &[u8], origin: Option<Origin>) {
        if !self.ingest.iter().any(|f| f.captures(topic).is_some()) {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() >= MAX_PENDING {
            pending.pop_front();
        }
        pending.push_back(Pending {
            topic: topic.to_string(),
            hash: hash_of(payload),
            origin,
            at: Instant::now(),
        });
    }

    /// Whether an ingested publish is one of ours. The broker returns our
    /// publishes in the order they were made, so a match is nearly always at
    /// the front; entries that never came back are forgotten.
    pub fn source_of(&self, topic: &str, payload: &[u8]) -> Source {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.is_empty() {
            return Source::Client;
        }
        let now = Instant::now();
        while pending
            .front()
            .is_some_and(|p| now.duration_since(p.at) > FORGET_AFTER)
        {
            pending.pop_front();
        }
        let hash = hash_of(payload);
        match pending
            .iter()
            .position(|p| p.hash == hash && p.topic == topic)
        {
            Some(i) => match pending.remove(i).and_then(|p| p.origin) {
                Some(origin) => Source::Rule(origin),
                None => Source::DeadLetter,
            },
            None => Source::Client,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_publishes_are_recognised_once_and_others_are_clients() {
        let t = Tracker::new(&["alerts/#".into(), "dead".into()]);
        t.expect("elsewhere", b"z", None);
        assert_eq!(t.pending.lock().unwrap().len(), 0, "never comes back");
        let o = Origin {
            rule: "r".into(),
            hops: 1,
        };
        t.expect("alerts/a", b"x", Some(o.clone()));
        t.expect("dead", b"y", None);
        assert_eq!(t.source_of("alerts/a", b"other"), Source::Client);
        assert_eq!(t.source_of("dead", b"y"), Source::DeadLetter);
        assert_eq!(t.source_of("alerts/a", b"x"), Source::Rule(o));
        assert_eq!(t.source_of("alerts/a", b"x"), Source::Client, "only once");
    }
}
