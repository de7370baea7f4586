//! Local republish: events that rules send to a `local` topic, and dead
//! letters, published into the embedded broker (for local subscribers)
//! through its in-process link.
//!
//! rumqttd's `LinkTx::send` blocks when the broker's router is busy, so it
//! runs on a thread of its own, fed by a bounded channel the router never
//! waits on (a full channel drops the publish and counts it).
//!
//! Republishes do not come back from the broker: the front door sees only
//! what clients publish. The router feeds a rule's republish back into the
//! rules itself, marked with its origin (see `router`), so loops stay
//! bounded without recognising anything by content.
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use rumqttd::local::{LinkRx, LinkTx};

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
    link_rx: LinkRx,
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
            // Held so the link stays registered; nothing arrives on it.
            let _link_rx = link_rx;
            rt.block_on(async {
                while let Some(local) = rx.recv().await {
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
