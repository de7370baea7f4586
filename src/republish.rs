//! Local republish: events that rules send to a `local` topic, and dead
//! letters, published into the embedded broker through the ingest link.
//!
//! rumqttd's `LinkTx::send` blocks when the broker's router is busy, so it
//! runs on a thread of its own, fed by a bounded channel the router never
//! waits on (a full channel drops the publish and counts it). Each publish
//! carries MQTT 5 user properties naming the rule that produced it and how
//! many republishes deep it is; ingest reads them back, so the rules can
//! skip the producing rule and bound loops (see `rules::MAX_HOPS`). MQTT 3.1.1
//! subscribers do not see properties; MQTT 5 subscribers do.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use rumqttd::local::LinkTx;
use rumqttd::protocol::{Packet, Publish, PublishProperties};
use tokio::sync::mpsc;
use tracing::warn;

use crate::event::Origin;
use crate::metrics::Metrics;

/// User property naming the rule that republished an event.
pub const PROP_RULE: &str = "edgeferry-rule";
/// User property with the republish depth.
pub const PROP_HOPS: &str = "edgeferry-hops";
/// User property marking a dead letter (ingest ignores these).
pub const PROP_DEAD_LETTER: &str = "edgeferry-dead-letter";

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
                    let props = match &local.origin {
                        Some(o) => vec![
                            (PROP_RULE.to_string(), o.rule.clone()),
                            (PROP_HOPS.to_string(), o.hops.to_string()),
                        ],
                        None => vec![(PROP_DEAD_LETTER.to_string(), "1".to_string())],
                    };
                    // QoS 0, like every local-link publish.
                    let publish =
                        Publish::new(Bytes::from(local.topic.into_bytes()), local.payload, false);
                    let properties = PublishProperties {
                        user_properties: props,
                        ..Default::default()
                    };
                    if link
                        .send(Packet::Publish(publish, Some(properties)))
                        .await
                        .is_err()
                    {
                        m.republish_failed.fetch_add(1, Relaxed);
                    }
                }
            });
        })?;
    Ok((Republisher { tx, metrics }, thread))
}

/// Where an ingested publish came from, read from its user properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A sensor or local app.
    Client,
    /// A rule's `local` destination.
    Rule(Origin),
    /// Our own dead letter: for local subscribers, not routed.
    DeadLetter,
}

pub fn source_of(properties: Option<&PublishProperties>) -> Source {
    let Some(props) = properties else {
        return Source::Client;
    };
    let mut rule = None;
    let mut hops = 0u8;
    for (k, v) in &props.user_properties {
        match k.as_str() {
            PROP_DEAD_LETTER => return Source::DeadLetter,
            PROP_RULE => rule = Some(v.clone()),
            PROP_HOPS => hops = v.parse().unwrap_or(u8::MAX),
            _ => {}
        }
    }
    match rule {
        Some(rule) => Source::Rule(Origin { rule, hops }),
        None => Source::Client,
    }
}
