//! The embedded MQTT broker (rumqttd) on its own threads, configured in
//! code: the local pub/sub engine behind the front door (subscriptions,
//! retained messages, wills, sessions, QoS towards local subscribers).
//!
//! It listens only on two internal loopback ports, one per protocol
//! version, and admits only the front door: every CONNECT must carry the
//! random secret of this start (its one authentication hook is per
//! CONNECT, which is all this needs). Sensors never reach it directly.
//!
//! rumqttd 0.20 behaviours handled here (see ARCHITECTURE.md):
//! - `RouterConfig::default()` has segment size 0 and panics the router: every
//!   router field is set explicitly.
//! - A listener that cannot bind is only logged and `start()` returns: each
//!   internal port is bound here first (which resolves port 0), and the
//!   broker is probed with a real MQTT CONNECT before we report it ready.
//! - A client connecting with the link's client id kicks the link off: the
//!   front door refuses client ids with edgeferry's prefix.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use rumqttd::local::{LinkRx, LinkTx};
use tokio::sync::oneshot;
use tracing::{debug, info};

use crate::config::BrokerConfig;

/// Client ids edgeferry uses inside the embedded broker: a sensor taking
/// one would kick edgeferry's own link off (the front door refuses them).
pub const RESERVED_ID_PREFIX: &str = "edgeferry-link-";

/// The largest packet a client may send: `max_payload` is on the payload,
/// so there is room for the topic and headers. The front door reads up to
/// this; rumqttd's own limit only has to be as large.
pub fn max_packet(cfg: &BrokerConfig) -> usize {
    cfg.max_payload.as_usize() + 64 * 1024
}

/// How many forwards rumqttd queues to one connection (the link included)
/// before it unschedules it until it drains.
const MAX_OUTGOING_PACKETS: u64 = 200;

/// The user name the front door logs in with (the secret is what counts).
const INTERNAL_USER: &str = "edgeferry-frontdoor";

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
    #[error("embedded broker: cannot create its link: {0}")]
    Link(String),
    /// Every listener failed right after the port check: something took
    /// the port in between. Starting again usually works.
    #[error(
        "embedded broker stopped while starting: its listener on {addr} failed (port taken since it was checked?)"
    )]
    ExitedWhileStarting { addr: SocketAddr },
    /// Something else took the internal port before rumqttd could: it
    /// admits a login that is not this start's secret. Starting again
    /// picks other ports.
    #[error(
        "embedded broker: another MQTT server took its internal port {addr} while starting (it admits any login); start again"
    )]
    NotOurs { addr: SocketAddr },
    #[error("embedded broker does not answer MQTT on {addr} after {waited:?}")]
    NotListening { addr: SocketAddr, waited: Duration },
    /// The password file is unusable: fix it (the message names file and line).
    #[error("broker.password_file: {0}")]
    Passwords(#[from] crate::passwd::PasswdError),
    /// The ACL file is unusable: fix it (each line names file and line).
    #[error("broker.acl_file:\n{0}")]
    Acl(String),
    /// The TLS listener's certificate or key is unusable.
    #[error("broker.tls_listen: {0}")]
    Tls(String),
}

/// Where the front door reaches the embedded broker, and how it logs in.
#[derive(Debug, Clone)]
pub struct Internal {
    pub v4: SocketAddr,
    pub v5: SocketAddr,
    pub user: String,
    /// Random per start; the internal listeners refuse any other login.
    pub secret: String,
}

/// A running embedded broker.
pub struct EmbeddedBroker {
    pub internal: Internal,
    /// The link's random client id (prefixed so no sensor may take it).
    pub link_id: String,
    /// The republisher's end of the link (publishes of `local` routes).
    pub link_tx: LinkTx,
    /// Held so the link stays registered; nothing is subscribed on it.
    pub link_rx: LinkRx,
    /// Fires if rumqttd's `start()` returns, i.e. every listener died.
    pub exited: oneshot::Receiver<()>,
}

/// Start rumqttd on two internal loopback ports and wait until both answer.
pub async fn start(cfg: &BrokerConfig) -> Result<EmbeddedBroker, BrokerError> {
    let host = internal_host();
    let v4 = reserve(SocketAddr::new(host, 0), "listen")?;
    let v5 = reserve(SocketAddr::new(host, 0), "listen_v5")?;
    let internal = Internal {
        v4,
        v5,
        user: INTERNAL_USER.to_string(),
        secret: uuid::Uuid::new_v4().simple().to_string(),
    };
    let mut broker = rumqttd::Broker::new(rumqttd_config(cfg, &internal));
    let link_id = format!("{RESERVED_ID_PREFIX}{}", uuid::Uuid::new_v4().simple());
    let (link_tx, link_rx) = broker
        .link(&link_id)
        .map_err(|e| BrokerError::Link(e.to_string()))?;

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
        probe(v4, false, &internal, waited).await?;
        probe(v5, true, &internal, waited).await?;
        Ok::<(), BrokerError>(())
    };
    tokio::select! {
        r = probes => r?,
        // rumqttd's start() returns only when every listener has failed.
        _ = &mut exited => return Err(BrokerError::ExitedWhileStarting { addr: v4 }),
    }
    info!(internal_v4 = %v4, internal_v5 = %v5, "embedded broker ready");
    Ok(EmbeddedBroker {
        internal,
        link_id,
        link_tx,
        link_rx,
        exited,
    })
}

/// Bind `addr` to check it is free and resolve port 0, then release it for
/// rumqttd. rumqttd (tokio) binds with SO_REUSEADDR, and a listener that
/// never accepted leaves no TIME_WAIT, so the port is free again at once.
/// The internal listeners' address. A loopback address of their own
/// (Linux routes all of 127/8 to `lo`), so that nothing bound to 127.0.0.1
/// can sit on their port: a port another program picked as "free" and binds
/// a moment later (a test's upstream broker once took rumqttd's port that
/// way, and every session was relayed to it). 127.0.0.1 where the system
/// has only that one.
fn internal_host() -> std::net::IpAddr {
    let own = std::net::IpAddr::from([127, 0, 0, 2]);
    match TcpListener::bind(SocketAddr::new(own, 0)) {
        Ok(_) => own,
        Err(_) => std::net::IpAddr::from([127, 0, 0, 1]),
    }
}

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

fn rumqttd_config(cfg: &BrokerConfig, internal: &Internal) -> rumqttd::Config {
    let mut connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        // The front door enforces the limit; this only has to be larger.
        max_payload_size: max_packet(cfg),
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let secret = internal.secret.clone();
    connections.set_auth_handler(move |_client_id, _user, password| {
        let ok = crate::passwd::ct_eq(password.as_bytes(), secret.as_bytes());
        async move { ok }
    });
    let server = |name: &str, listen| rumqttd::ServerSettings {
        name: name.to_string(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: connections.clone(),
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            // The front door's connections, the link, the probes and the
            // republisher's client for local QoS 1 and 2.
            max_connections: cfg.max_connections + 5,
            max_outgoing_packet_count: MAX_OUTGOING_PACKETS,
            max_segment_size: cfg.segment_size.as_usize(),
            max_segment_count: cfg.segment_count,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([(
            "v4".to_string(),
            server("edgeferry-internal-v4", internal.v4),
        )])),
        v5: Some(HashMap::from([(
            "v5".to_string(),
            server("edgeferry-internal-v5", internal.v5),
        )])),
        ..Default::default()
    }
}

/// Whether both internal listeners accept an MQTT CONNECT now (the health
/// probe); `Err` names the first that does not.
pub async fn answers(internal: &Internal, within: Duration) -> Result<(), String> {
    for (addr, v5) in [(internal.v4, false), (internal.v5, true)] {
        let code = connack(addr, v5, &internal.user, &internal.secret);
        let ok = tokio::time::timeout(within, code).await == Ok(Some(0));
        if !ok {
            let version = if v5 { "MQTT 5" } else { "MQTT 3.1.1" };
            return Err(format!("embedded broker {addr} ({version})"));
        }
    }
    Ok(())
}

/// One CONNECT with this login: the CONNACK's return code (0: accepted),
/// or `None` when nothing answers with a CONNACK. Then a DISCONNECT, so
/// the broker has nothing to clean up after.
async fn connack(addr: SocketAddr, v5: bool, user: &str, password: &str) -> Option<u8> {
    use rumqttc::mqttbytes::v4;
    use rumqttc::v5::mqttbytes::v5 as m5;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let id = format!(
        "{RESERVED_ID_PREFIX}probe-{}",
        uuid::Uuid::new_v4().simple()
    );
    let mut out = bytes::BytesMut::new();
    if v5 {
        let connect = m5::Connect {
            keep_alive: 30,
            client_id: id,
            clean_start: true,
            properties: None,
        };
        let login = m5::Login::new(user, password);
        m5::Packet::Connect(connect, None, Some(login))
            .write(&mut out, None)
            .ok()?;
    } else {
        let mut connect = v4::Connect::new(id);
        connect.keep_alive = 30;
        connect.set_login(user, password);
        v4::Packet::Connect(connect)
            .write(&mut out, usize::MAX)
            .ok()?;
    }
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(&out).await.ok()?;
    // CONNACK: type, length, flags, return code, in both versions.
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.ok()?;
    if s.write_all(&[0xE0, 0x00]).await.is_ok() {
        // The answer is in; the close may take its time (not the probe's).
        tokio::spawn(async move { hang_up(&mut s, true).await });
    }
    (ack[0] == 0x20).then_some(ack[3])
}

/// End a connection to the broker: wait until the broker closes it,
/// discarding what it still sends, and give up after a while. After a
/// DISCONNECT (`said_disconnect`) the broker closes it by itself; without
/// one, our half-close tells it the client is gone.
///
/// Why wait: rumqttd 0.20 frees a connection's slot when its router reads
/// a DISCONNECT, and disconnects that slot again when the connection's
/// task then sees the socket close. A connection that took the slot in
/// between is dropped, during its CONNECT even, and that leaves a stale
/// entry in the listener's will table which panics at the next CONNECT of
/// that client id, poisoning the table: the listener refuses every
/// connection after it. Closing only once the broker has, the second
/// disconnect never happens. And a session counts against
/// `max_connections` until the broker has let go of it, so the broker's
/// own limit (a refusal there leaves the same stale entry) is never hit.
pub async fn hang_up(s: &mut tokio::net::TcpStream, said_disconnect: bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(HANG_UP_WAIT, async {
        if !said_disconnect {
            let _ = s.shutdown().await;
        }
        let mut sink = [0u8; 512];
        while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// How long [`hang_up`] waits: rumqttd closes within milliseconds; a
/// broker that does not is past caring about.
const HANG_UP_WAIT: Duration = Duration::from_secs(2);

/// Connect as an MQTT client and wait for CONNACK, then check that a
/// stranger's login is refused: proves the listener is rumqttd's and not
/// someone else's that grabbed the port since `reserve`.
async fn probe(
    addr: SocketAddr,
    v5: bool,
    internal: &Internal,
    waited: Duration,
) -> Result<(), BrokerError> {
    let attempt = async {
        while connack(addr, v5, &internal.user, &internal.secret).await != Some(0) {
            debug!(%addr, "broker not answering yet");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(waited, attempt)
        .await
        .map_err(|_| BrokerError::NotListening { addr, waited })?;
    // Ours checks the secret: a login without it must be refused.
    let stranger = uuid::Uuid::new_v4().simple().to_string();
    match connack(addr, v5, &internal.user, &stranger).await {
        Some(0) => Err(BrokerError::NotOurs { addr }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The health probe's view of a listener that accepts but does not
    /// speak MQTT (rumqttd's state after its 3.1.1 encoder panicked: new
    /// connections were accepted and then dropped) and of one that is gone.
    #[tokio::test]
    async fn a_listener_that_does_not_answer_connect_is_reported() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closing = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (silent_addr, closing_addr) =
            (silent.local_addr().unwrap(), closing.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        tokio::spawn(async move {
            while let Ok((s, _)) = closing.accept().await {
                drop(s);
            }
        });
        let internal = |v4, v5| Internal {
            v4,
            v5,
            user: INTERNAL_USER.into(),
            secret: "s".into(),
        };
        let within = Duration::from_millis(300);
        let err = answers(&internal(silent_addr, closing_addr), within).await;
        assert!(err.unwrap_err().contains(&silent_addr.to_string()));
        let err = answers(&internal(closing_addr, silent_addr), within).await;
        assert!(err.unwrap_err().contains("3.1.1"));
        assert!(!crate::frontdoor::answers(silent_addr, within).await);
        assert!(!crate::frontdoor::answers(closing_addr, within).await);
    }

    /// A port taken between the check and rumqttd's bind by an MQTT broker
    /// that lets anyone in (a test's upstream on a "free port" once did):
    /// the start-up probe must not take it for the embedded broker, or
    /// every session would be relayed to a stranger.
    #[tokio::test]
    async fn a_broker_that_admits_anyone_is_not_taken_for_ours() {
        let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = open.local_addr().unwrap();
        drop(open);
        let conn = rumqttd::ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: 1 << 20,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        };
        let mut cfg = rumqttd_config(
            &crate::config::BrokerConfig::default(),
            &Internal {
                v4: addr,
                v5: addr,
                user: INTERNAL_USER.into(),
                secret: "unused".into(),
            },
        );
        cfg.v5 = None;
        for server in cfg.v4.as_mut().unwrap().values_mut() {
            server.connections = conn.clone();
        }
        std::thread::spawn(move || {
            let _ = rumqttd::Broker::new(cfg).start();
        });
        let internal = Internal {
            v4: addr,
            v5: addr,
            user: INTERNAL_USER.into(),
            secret: "ours".into(),
        };
        // It does speak MQTT: an open CONNECT is accepted.
        let within = Duration::from_secs(30);
        let accepted = async {
            while connack(addr, false, &internal.user, "anything").await != Some(0) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(within, accepted)
            .await
            .expect("the open broker answers");
        let err = probe(addr, false, &internal, Duration::from_secs(2)).await;
        assert!(matches!(err, Err(BrokerError::NotOurs { .. })), "{err:?}");
    }
}
