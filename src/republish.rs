//! Local republish: events that rules send to a `local` topic, and dead
//! letters, published into the embedded broker (for local subscribers)
//! through its in-process link.
//!
//! rumqttd's link publishes at QoS 0 only (its `Publish` keeps the QoS
//! private). A destination with `qos = 1` or `2` (a command a device must
//! get) goes instead through an MQTT client of edgeferry's own on the
//! internal listener, opened on first use, so rumqttd delivers it at that
//! QoS and queues it for a persistent session that is away. Retain works
//! on both paths.
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

use crate::broker::{Internal, RESERVED_ID_PREFIX};
use crate::event::Origin;
use crate::metrics::Metrics;

/// One publish into the embedded broker.
#[derive(Debug)]
pub struct Local {
    pub topic: String,
    pub payload: Bytes,
    /// Towards local subscribers: 0 through the link, 1 or 2 through the
    /// internal client.
    pub qos: u8,
    pub retain: bool,
    /// A command's receipt (downlink events only): settled once the
    /// publish is handed to the embedded broker, failed if it is dropped,
    /// so the cloud is not told a dropped command was delivered.
    pub receipt: Option<crate::receipt::Receipt>,
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
    internal: Internal,
    metrics: Arc<Metrics>,
) -> std::io::Result<(Republisher, std::thread::JoinHandle<()>)> {
    let (tx, mut rx) = mpsc::channel::<Local>(BUFFER);
    let m = metrics.clone();
    let thread = std::thread::Builder::new()
        .name("edgeferry-republish".into())
        .spawn(move || {
            // `send` is an async fn that never awaits; a small runtime
            // drives it (and the channel) on this thread.
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!(error = %e, "cannot start the local republish thread");
                    return;
                }
            };
            // Held so the link stays registered; nothing arrives on it.
            let _link_rx = link_rx;
            rt.block_on(async {
                let mut client: Option<QosClient> = None;
                while let Some(mut local) = rx.recv().await {
                    let receipt = local.receipt.take();
                    let failed = match local.qos {
                        // QoS 0, like every local-link publish.
                        0 => {
                            let topic = Bytes::from(local.topic.into_bytes());
                            let publish = Publish::new(topic, local.payload, local.retain);
                            link.send(Packet::Publish(publish, None)).await.is_err()
                        }
                        _ => {
                            let c = client.get_or_insert_with(|| QosClient::open(&internal));
                            c.publish(local).is_err()
                        }
                    };
                    if failed {
                        m.republish_failed.fetch_add(1, Relaxed);
                    } else if let Some(r) = receipt {
                        r.settle();
                    }
                }
                if let Some(c) = client {
                    c.close().await;
                }
            });
        })?;
    Ok((Republisher { tx, metrics }, thread))
}

/// edgeferry's own MQTT 3.1.1 client on the embedded broker's internal
/// listener, for local publishes at QoS 1 and 2. Its event loop is polled
/// by a task on the republish thread's runtime; rumqttc reconnects on the
/// next poll after an error.
struct QosClient {
    client: rumqttc::AsyncClient,
    poller: tokio::task::JoinHandle<()>,
}

/// Local publishes waiting for the internal client's event loop.
const CLIENT_BUFFER: usize = 256;

impl QosClient {
    fn open(internal: &Internal) -> QosClient {
        let id = format!("{RESERVED_ID_PREFIX}qos-{}", uuid::Uuid::new_v4().simple());
        let mut opts =
            rumqttc::MqttOptions::new(id, internal.v4.ip().to_string(), internal.v4.port());
        opts.set_credentials(&internal.user, &internal.secret)
            .set_clean_session(true)
            .set_keep_alive(std::time::Duration::from_secs(30))
            .set_max_packet_size(usize::MAX >> 1, usize::MAX >> 1);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, CLIENT_BUFFER);
        let poller = tokio::spawn(async move {
            let mut warned = false;
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => warned = false,
                    Err(e) => {
                        if !warned {
                            warn!(error = %e, "local QoS 1/2 publishing: the embedded broker dropped edgeferry's client; reconnecting");
                            warned = true;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                }
            }
        });
        QosClient { client, poller }
    }

    /// Never waits: with the embedded broker unreachable the buffer fills
    /// and publishes fail (counted) instead of holding the thread.
    fn publish(&self, local: Local) -> Result<(), rumqttc::ClientError> {
        let qos = match local.qos {
            1 => rumqttc::QoS::AtLeastOnce,
            _ => rumqttc::QoS::ExactlyOnce,
        };
        self.client
            .try_publish(local.topic, qos, local.retain, local.payload)
    }

    /// A DISCONNECT once what is queued is written, waiting at most 2 s in
    /// all (the event loop ends after writing it).
    async fn close(self) {
        let close = async {
            let _ = self.client.disconnect().await;
            let _ = self.poller.await;
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), close).await;
    }
}
