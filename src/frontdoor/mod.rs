//! The front door: edgeferry owns every local MQTT listener.
//!
//! Sensors and local apps connect here, not to rumqttd. Each connection is
//! a [`session`] that speaks the client's protocol (3.1.1 or 5, read from
//! its CONNECT, on any listener, TLS included), checks its login and ACL,
//! hands every PUBLISH to the pipeline itself and acknowledges it only once
//! the event is safe, and relays everything else to the embedded broker
//! (rumqttd, on internal loopback listeners) which stays the local pub/sub
//! engine: subscriptions, retained messages, wills, sessions, QoS towards
//! local subscribers. See ARCHITECTURE.md, "The front door".

pub mod auth;
pub mod session;
pub mod subscribers;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{debug, info, warn};

use crate::broker::{BrokerError, Internal};
use crate::config::BrokerConfig;
use crate::metrics::Metrics;
use crate::router::Inbound;
use crate::topic::Pattern;
use auth::{AclFile, LocalAuth};
use subscribers::Subscribers;

/// What every session shares.
pub struct Door {
    /// Acknowledge QoS 1/2 publishes only once their event is safe.
    pub ack_after_store: bool,
    /// Topics that enter the pipeline (`broker.ingest`); others are only
    /// relayed to local subscribers.
    pub ingest: Vec<Pattern>,
    pub auth: Option<Arc<LocalAuth>>,
    pub acl: Option<Arc<AclFile>>,
    /// The embedded broker's internal listeners and the login they take.
    pub broker: Internal,
    /// Largest packet a client may send (`broker.max_payload` plus headers):
    /// a larger one cannot be read and closes the connection.
    pub max_packet: usize,
    /// Largest payload of a publish (`broker.max_payload`): a larger one is
    /// refused, the connection stays.
    pub max_payload: usize,
    /// Publishes a connection may have unacknowledged or waiting for the
    /// pipeline before the front door stops reading it; MQTT 5 clients are
    /// told it as their Receive Maximum.
    pub window: u16,
    /// What local subscribers have subscribed to: publishes nobody wants
    /// are not relayed to the broker.
    pub subscribers: Subscribers,
    pub metrics: Arc<Metrics>,
    /// Rate limit of the warning about refused publishes.
    last_refusal_warning: Mutex<Option<Instant>>,
}

impl Door {
    pub fn new(
        cfg: &BrokerConfig,
        broker: Internal,
        auth: Option<Arc<LocalAuth>>,
        acl: Option<Arc<AclFile>>,
        metrics: Arc<Metrics>,
    ) -> Door {
        Door {
            ack_after_store: cfg.ack == crate::config::AckMode::Stored,
            ingest: cfg
                .ingest
                .iter()
                .filter_map(|f| Pattern::parse(f).ok())
                .collect(),
            auth,
            acl,
            broker,
            max_packet: max_packet(cfg),
            max_payload: cfg.max_payload.as_usize(),
            window: cfg.max_inflight,
            subscribers: Subscribers::default(),
            metrics,
            last_refusal_warning: Mutex::new(None),
        }
    }

    /// Whether a topic enters the pipeline.
    pub fn ingests(&self, topic: &str) -> bool {
        self.ingest.iter().any(|f| f.captures(topic).is_some())
    }

    /// A publish refused for its topic or its size: logged at most every
    /// 10 s (the counters have every one).
    pub fn warn_refused(&self, client_id: &str, topic: &[u8], why: &str) {
        let mut last = self
            .last_refusal_warning
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            *last = Some(Instant::now());
            warn!(%client_id, topic = %String::from_utf8_lossy(topic).escape_debug(), "publish refused: {why} (logged at most every 10 s; see local_refused_total)");
        }
    }
}

pub use crate::broker::max_packet;

/// The bound local listeners.
pub struct Listeners {
    /// Plain TCP: `listen` and, if set, `listen_v5` (both serve 3.1.1 and 5).
    plain: Vec<TcpListener>,
    #[cfg(feature = "tls")]
    tls: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
    /// Addresses as bound (port 0 resolved): listen, listen_v5, tls_listen.
    pub listen: SocketAddr,
    pub listen_v5: Option<SocketAddr>,
    pub tls_listen: Option<SocketAddr>,
}

/// Bind every configured listener, so a port in use fails the start;
/// `tls` is the TLS listener's configuration, from its files.
pub async fn bind(
    cfg: &BrokerConfig,
    tls: Option<Arc<crate::tls::ServerConfig>>,
) -> Result<Listeners, BrokerError> {
    let listen = bind_one(cfg.listen, "listen").await?;
    let listen_v5 = match cfg.listen_v5 {
        Some(a) => Some(bind_one(a, "listen_v5").await?),
        None => None,
    };
    let tls_listener = match cfg.tls_listen {
        Some(a) => Some(bind_one(a, "tls_listen").await?),
        None => None,
    };
    let addr = |l: &TcpListener| l.local_addr().ok();
    let (listen_addr, v5_addr, tls_addr) = (
        addr(&listen).unwrap_or(cfg.listen),
        listen_v5.as_ref().and_then(addr),
        tls_listener.as_ref().and_then(addr),
    );
    let mut plain = vec![listen];
    plain.extend(listen_v5);
    #[cfg(feature = "tls")]
    let tls = match (tls_listener, tls) {
        (Some(l), Some(config)) => Some((l, tokio_rustls::TlsAcceptor::from(config))),
        (Some(_), None) => {
            return Err(BrokerError::Tls(
                "tls_listen needs tls_cert and tls_key".into(),
            ));
        }
        (None, _) => None,
    };
    #[cfg(not(feature = "tls"))]
    drop((tls_listener, tls));
    Ok(Listeners {
        plain,
        #[cfg(feature = "tls")]
        tls,
        listen: listen_addr,
        listen_v5: v5_addr,
        tls_listen: tls_addr,
    })
}

async fn bind_one(addr: SocketAddr, key: &'static str) -> Result<TcpListener, BrokerError> {
    TcpListener::bind(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => BrokerError::PortInUse { addr, key },
        _ => BrokerError::Bind {
            addr,
            key,
            source: e,
        },
    })
}

/// Accept connections until shutdown; each gets a session. At most
/// `max_connections` at once: one more is closed at once (and counted).
/// Returns when shutdown was asked for; sessions then stop by themselves,
/// handing what they read to the pipeline before they let go of it.
pub async fn run(
    listeners: Listeners,
    door: Arc<Door>,
    events: mpsc::Sender<Inbound>,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(max_connections));
    let mut busy_warned: Option<Instant> = None;
    let (accepted_tx, mut accepted) = mpsc::channel::<Accepted>(64);
    let mut acceptors = tokio::task::JoinSet::new();
    for listener in listeners.plain {
        let tx = accepted_tx.clone();
        acceptors.spawn(accept_loop(listener, tx, Transport::Plain));
    }
    #[cfg(feature = "tls")]
    if let Some((listener, acceptor)) = listeners.tls {
        acceptors.spawn(accept_loop(
            listener,
            accepted_tx.clone(),
            Transport::Tls(acceptor),
        ));
    }
    drop(accepted_tx);
    info!(
        listen = %listeners.listen,
        listen_v5 = %listeners.listen_v5.map_or("off".into(), |a| a.to_string()),
        tls_listen = %listeners.tls_listen.map_or("off".into(), |a| a.to_string()),
        ack = if door.ack_after_store { "stored" } else { "received" },
        auth = door.auth.is_some(),
        acl = door.acl.is_some(),
        "front door listening (MQTT 3.1.1 and 5)"
    );
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            a = accepted.recv() => match a {
                Some(a) => a,
                None => break,
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            door.metrics.door_refused_busy.fetch_add(1, Relaxed);
            if busy_warned.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(30)) {
                busy_warned = Some(Instant::now());
                warn!(peer = %accepted.peer, max_connections, "a local connection was closed at once: max_connections are open (idle clients hold slots too, about 57 KiB each); raise broker.max_connections or find the clients (logged at most every 30 s; see local_connections_refused_busy_total)");
            }
            continue; // dropping the socket closes it
        };
        let (door, events, shutdown) = (door.clone(), events.clone(), shutdown.clone());
        tokio::spawn(async move {
            connection(accepted, door, events, shutdown).await;
            drop(permit);
        });
    }
    acceptors.abort_all();
    info!("front door closed");
}

/// One accepted connection: the TLS handshake if it is on the TLS listener,
/// then its session, until it closes.
async fn connection(
    accepted: Accepted,
    door: Arc<Door>,
    events: mpsc::Sender<Inbound>,
    shutdown: watch::Receiver<bool>,
) {
    let peer = accepted.peer;
    let result = match accepted.transport {
        Transport::Plain => {
            session::serve(door.clone(), accepted.stream, events, shutdown, None).await
        }
        #[cfg(feature = "tls")]
        Transport::Tls(acceptor) => {
            match tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(accepted.stream)).await {
                Ok(Ok(tls)) => {
                    // Only a verified certificate is presented here
                    // (tls_client_ca); its CN is the user name.
                    let identity = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| crate::tls::common_name(c));
                    session::serve(door.clone(), tls, events, shutdown, identity).await
                }
                Ok(Err(e)) => Err(session::SessionError::Io(e)),
                Err(_) => Err(session::SessionError::ConnectTimeout(TLS_HANDSHAKE)),
            }
        }
    };
    if let Err(e) = result {
        if matches!(
            e,
            session::SessionError::Wire(_) | session::SessionError::Protocol(_)
        ) {
            door.metrics.door_protocol_errors.fetch_add(1, Relaxed);
        }
        debug!(%peer, error = %e, "local connection closed");
    }
}

/// Whether a front-door listener answers an MQTT CONNECT with a CONNACK
/// (the probe's client id is reserved, so it is refused at the door and
/// opens no session in the embedded broker).
pub async fn answers(addr: SocketAddr, within: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let id = auth::HEALTH_PROBE_ID;
        let mut connect = vec![0x10, (10 + 2 + id.len()) as u8, 0, 4];
        connect.extend_from_slice(b"MQTT");
        connect.extend_from_slice(&[4, 0x02, 0, 30, 0, id.len() as u8]);
        connect.extend_from_slice(id.as_bytes());
        s.write_all(&connect).await.ok()?;
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).await.ok()?;
        (ack[0] == 0x20).then_some(())
    };
    matches!(tokio::time::timeout(within, attempt).await, Ok(Some(())))
}

/// A TLS handshake must finish this soon.
#[cfg(feature = "tls")]
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

enum Transport {
    Plain,
    #[cfg(feature = "tls")]
    Tls(tokio_rustls::TlsAcceptor),
}

struct Accepted {
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    transport: Transport,
}

async fn accept_loop(listener: TcpListener, tx: mpsc::Sender<Accepted>, transport: Transport) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let transport = match &transport {
                    Transport::Plain => Transport::Plain,
                    #[cfg(feature = "tls")]
                    Transport::Tls(a) => Transport::Tls(a.clone()),
                };
                if tx
                    .send(Accepted {
                        stream,
                        peer,
                        transport,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            // Out of file descriptors and the like: pause instead of spinning.
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
