//! The embedded MQTT broker (rumqttd) on its own threads, configured in code
//! from our config, and the in-process link that ingest reads.
//!
//! rumqttd 0.20 behaviours handled here (see ARCHITECTURE.md):
//! - `RouterConfig::default()` has segment size 0 and panics the router: every
//!   router field is set explicitly.
//! - A listener that cannot bind is only logged and `start()` returns: each
//!   listen address is bound here first (which also resolves port 0), and the
//!   broker is probed with a real MQTT CONNECT before we report it ready.
//! - Publishes matching no subscription are acked and discarded: the link
//!   subscribes to the ingest filters before `start()`.
//! - A client connecting with the link's client id kicks the link off. The
//!   link's id is random per start, so no sensor can guess it; if it happens
//!   anyway, ingest reports it and the daemon stops with an error (the queue
//!   is intact) rather than run on deaf.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use rumqttd::local::{LinkRx, LinkTx};
use tokio::sync::oneshot;
use tracing::{debug, info};

use crate::config::BrokerConfig;

/// How many forwards rumqttd queues to one connection (the link included)
/// before it unschedules it until it drains.
const MAX_OUTGOING_PACKETS: u64 = 200;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Another process holds the port: stop it or choose another `listen`.
    #[error(
        "cannot listen on {addr}: address already in use (is another MQTT broker running? change broker.{key} in the config)"
    )]
    PortInUse { addr: SocketAddr, key: &'static str },
    /// Any other bind failure (permission for ports below 1024, no such address).
    #[error("cannot listen on {addr} (broker.{key}): {source}")]
    Bind {
        addr: SocketAddr,
        key: &'static str,
        source: std::io::Error,
    },
    #[error("embedded broker: cannot create the ingest link: {0}")]
    Link(String),
    /// Every listener failed right after the port check: something took
    /// the port in between. Starting again usually works.
    #[error(
        "embedded broker stopped while starting: its listener on {addr} failed (port taken since it was checked?)"
    )]
    ExitedWhileStarting { addr: SocketAddr },
    #[error("embedded broker does not answer MQTT on {addr} after {waited:?}")]
    NotListening { addr: SocketAddr, waited: Duration },
}

/// A running embedded broker and the link ingest reads from.
pub struct EmbeddedBroker {
    /// Where MQTT 3.1.1 clients connect (port 0 resolved).
    pub v4: SocketAddr,
    /// Where MQTT 5 clients connect, if enabled.
    pub v5: Option<SocketAddr>,
    /// The link's random client id (see module docs).
    pub link_id: String,
    /// Ingest's end of the link.
    pub link_rx: LinkRx,
    /// Kept so the link stays registered; ingest never publishes through it yet.
    pub link_tx: LinkTx,
    /// Fires if rumqttd's `start()` returns, i.e. every listener died.
    pub exited: oneshot::Receiver<()>,
}

/// Start rumqttd with a link subscribed to `cfg.ingest`, and wait until each
/// listener answers MQTT.
pub async fn start(cfg: &BrokerConfig) -> Result<EmbeddedBroker, BrokerError> {
    let v4 = reserve(cfg.listen, "listen")?;
    let v5 = cfg.listen_v5.map(|a| reserve(a, "listen_v5")).transpose()?;

    let mut broker = rumqttd::Broker::new(rumqttd_config(cfg, v4, v5));
    let link_id = format!("edgeferry-ingest-{}", uuid::Uuid::new_v4().simple());
    let (mut link_tx, link_rx) = broker
        .link(&link_id)
        .map_err(|e| BrokerError::Link(e.to_string()))?;
    for filter in &cfg.ingest {
        link_tx
            .subscribe(filter.clone())
            .map_err(|e| BrokerError::Link(e.to_string()))?;
    }

    let (exited_tx, exited) = oneshot::channel();
    std::thread::Builder::new()
        .name("broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
            let _ = exited_tx.send(());
        })
        .map_err(|e| BrokerError::Link(format!("cannot spawn broker thread: {e}")))?;

    let waited = Duration::from_secs(10);
    let mut exited = exited;
    let probes = async {
        probe(v4, false, waited).await?;
        if let Some(v5) = v5 {
            probe(v5, true, waited).await?;
        }
        Ok::<(), BrokerError>(())
    };
    tokio::select! {
        r = probes => r?,
        // rumqttd's start() returns only when every listener has failed.
        _ = &mut exited => return Err(BrokerError::ExitedWhileStarting { addr: v4 }),
    }
    info!(listen = %v4, listen_v5 = ?v5, "embedded broker listening");
    Ok(EmbeddedBroker {
        v4,
        v5,
        link_id,
        link_rx,
        link_tx,
        exited,
    })
}

/// Bind `addr` to check it is free and resolve port 0, then release it for
/// rumqttd. rumqttd (tokio) binds with SO_REUSEADDR, and a listener that
/// never accepted leaves no TIME_WAIT, so the port is free again at once.
fn reserve(addr: SocketAddr, key: &'static str) -> Result<SocketAddr, BrokerError> {
    match TcpListener::bind(addr) {
        Ok(l) => l
            .local_addr()
            .map_err(|source| BrokerError::Bind { addr, key, source }),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            Err(BrokerError::PortInUse { addr, key })
        }
        Err(source) => Err(BrokerError::Bind { addr, key, source }),
    }
}

fn rumqttd_config(cfg: &BrokerConfig, v4: SocketAddr, v5: Option<SocketAddr>) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: cfg.max_payload.as_usize(),
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = |name: &str, listen| rumqttd::ServerSettings {
        name: name.to_string(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: connections.clone(),
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: cfg.max_connections + 1, // + the ingest link
            max_outgoing_packet_count: MAX_OUTGOING_PACKETS,
            max_segment_size: cfg.segment_size.as_usize(),
            max_segment_count: cfg.segment_count,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([(
            "v4".to_string(),
            server("edgeferry-v4", v4),
        )])),
        v5: v5.map(|a| HashMap::from([("v5".to_string(), server("edgeferry-v5", a))])),
        ..Default::default()
    }
}

/// One MQTT connect attempt with rumqttc's v4 or v5 client (the same code,
/// different types): true once CONNACK arrives, then a polite DISCONNECT.
macro_rules! connect_once {
    ($mqtt:path, $id:expr, $host:expr, $port:expr) => {{
        use $mqtt as mqtt;
        let mut o = mqtt::MqttOptions::new($id, $host, $port);
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut el) = mqtt::AsyncClient::new(o, 2);
        let ok = loop {
            match el.poll().await {
                Ok(mqtt::Event::Incoming(mqtt::Incoming::ConnAck(_))) => break true,
                Ok(_) => {}
                Err(_) => break false,
            }
        };
        if ok {
            let _ = client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
        }
        ok
    }};
}

/// Connect as an MQTT client and wait for CONNACK: proves the listener is
/// rumqttd's and not someone else's that grabbed the port since `reserve`.
async fn probe(addr: SocketAddr, v5: bool, waited: Duration) -> Result<(), BrokerError> {
    let id = format!("edgeferry-probe-{}", uuid::Uuid::new_v4().simple());
    let host = addr.ip().to_string();
    let attempt = async {
        loop {
            let ok = if v5 {
                connect_once!(rumqttc::v5, &id, &host, addr.port())
            } else {
                connect_once!(rumqttc, &id, &host, addr.port())
            };
            if ok {
                return;
            }
            debug!(%addr, "broker not answering yet");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(waited, attempt)
        .await
        .map_err(|_| BrokerError::NotListening { addr, waited })
}
