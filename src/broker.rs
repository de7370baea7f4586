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
//!   is intact) rather than run on deaf. With a password file, ids starting
//!   with `edgeferry-ingest-` or `edgeferry-probe-` are refused outright.
//! - Its only authentication hook is one call per CONNECT (client id, user,
//!   password): there is no per-publish or per-subscribe hook, so per-user
//!   topic permissions cannot be enforced (README, "Local broker security").
//! - With an auth hook set, a CONNECT without credentials is refused, so the
//!   start-up probe logs in with a one-time secret of its own.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rumqttd::local::{LinkRx, LinkTx};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::config::BrokerConfig;
use crate::metrics::Metrics;
use crate::passwd::Passwords;

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
    /// The password file is unusable: fix it (the message names file and line).
    #[error("broker.password_file: {0}")]
    Passwords(#[from] crate::passwd::PasswdError),
}

/// A running embedded broker and the link ingest reads from.
pub struct EmbeddedBroker {
    /// Where MQTT 3.1.1 clients connect (port 0 resolved).
    pub v4: SocketAddr,
    /// Where MQTT 5 clients connect, if enabled.
    pub v5: Option<SocketAddr>,
    /// Where MQTT 3.1.1 clients connect over TLS, if enabled.
    pub tls: Option<SocketAddr>,
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
pub async fn start(
    cfg: &BrokerConfig,
    metrics: Arc<Metrics>,
) -> Result<EmbeddedBroker, BrokerError> {
    let v4 = reserve(cfg.listen, "listen")?;
    let v5 = cfg.listen_v5.map(|a| reserve(a, "listen_v5")).transpose()?;
    let tls = cfg
        .tls_listen
        .map(|a| reserve(a, "tls_listen"))
        .transpose()?;
    let probe_login = Login {
        id: format!("{PROBE_PREFIX}{}", uuid::Uuid::new_v4().simple()),
        secret: uuid::Uuid::new_v4().simple().to_string(),
    };
    let auth = match &cfg.password_file {
        Some(path) => Some(Arc::new(LocalAuth::load(
            path.clone(),
            probe_login.clone(),
            metrics,
        )?)),
        None => None,
    };

    let mut broker = rumqttd::Broker::new(rumqttd_config(cfg, v4, v5, tls, auth.clone()));
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
    let login = auth.as_ref().map(|_| &probe_login);
    let probes = async {
        probe(v4, false, login, waited).await?;
        if let Some(v5) = v5 {
            probe(v5, true, login, waited).await?;
        }
        if let Some(tls) = tls {
            // A TLS handshake needs a client that trusts the certificate;
            // that the port accepts is enough here.
            tcp_probe(tls, waited).await?;
        }
        Ok::<(), BrokerError>(())
    };
    tokio::select! {
        r = probes => r?,
        // rumqttd's start() returns only when every listener has failed.
        _ = &mut exited => return Err(BrokerError::ExitedWhileStarting { addr: v4 }),
    }
    info!(listen = %v4, listen_v5 = ?v5, tls_listen = ?tls, auth = auth.is_some(), "embedded broker listening");
    Ok(EmbeddedBroker {
        v4,
        v5,
        tls,
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

fn rumqttd_config(
    cfg: &BrokerConfig,
    v4: SocketAddr,
    v5: Option<SocketAddr>,
    tls: Option<SocketAddr>,
    auth: Option<Arc<LocalAuth>>,
) -> rumqttd::Config {
    let mut connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: cfg.max_payload.as_usize(),
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    if let Some(auth) = auth {
        connections.set_auth_handler(move |client_id, user, password| {
            let auth = auth.clone();
            async move { auth.check(client_id, user, password).await }
        });
    }
    let server = |name: &str, listen, tls| rumqttd::ServerSettings {
        name: name.to_string(),
        listen,
        tls,
        next_connection_delay_ms: 1,
        connections: connections.clone(),
    };
    let path = |p: &Option<PathBuf>| {
        p.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    #[cfg_attr(not(feature = "tls"), allow(unused_mut))]
    let mut v4_servers = HashMap::from([("v4".to_string(), server("edgeferry-v4", v4, None))]);
    // Without the `tls` feature `check` refuses tls_listen before this.
    #[cfg(not(feature = "tls"))]
    let _ = (tls, path);
    #[cfg(feature = "tls")]
    if let Some(addr) = tls {
        let tls = rumqttd::TlsConfig::Rustls {
            capath: None,
            certpath: path(&cfg.tls_cert),
            keypath: path(&cfg.tls_key),
        };
        v4_servers.insert(
            "v4-tls".to_string(),
            server("edgeferry-tls", addr, Some(tls)),
        );
    }
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
        v4: Some(v4_servers),
        v5: v5.map(|a| HashMap::from([("v5".to_string(), server("edgeferry-v5", a, None))])),
        ..Default::default()
    }
}

/// One MQTT connect attempt with rumqttc's v4 or v5 client (the same code,
/// different types): true once CONNACK arrives, then a polite DISCONNECT.
macro_rules! connect_once {
    ($mqtt:path, $id:expr, $host:expr, $port:expr, $login:expr) => {{
        use $mqtt as mqtt;
        let mut o = mqtt::MqttOptions::new($id, $host, $port);
        o.set_keep_alive(Duration::from_secs(5));
        if let Some(login) = $login {
            o.set_credentials("edgeferry-probe", login.secret.clone());
        }
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
async fn probe(
    addr: SocketAddr,
    v5: bool,
    login: Option<&Login>,
    waited: Duration,
) -> Result<(), BrokerError> {
    let id = login.map_or_else(
        || format!("{PROBE_PREFIX}{}", uuid::Uuid::new_v4().simple()),
        |l| l.id.clone(),
    );
    let host = addr.ip().to_string();
    let attempt = async {
        loop {
            let ok = if v5 {
                connect_once!(rumqttc::v5, &id, &host, addr.port(), login)
            } else {
                connect_once!(rumqttc, &id, &host, addr.port(), login)
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

/// Wait until `addr` accepts TCP connections.
async fn tcp_probe(addr: SocketAddr, waited: Duration) -> Result<(), BrokerError> {
    let attempt = async {
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(waited, attempt)
        .await
        .map_err(|_| BrokerError::NotListening { addr, waited })
}

/// Client ids of our own connections; refused to sensors when auth is on.
const INGEST_PREFIX: &str = "edgeferry-ingest-";
const PROBE_PREFIX: &str = "edgeferry-probe-";

/// The start-up probe's one-time login.
#[derive(Clone)]
struct Login {
    id: String,
    secret: String,
}

/// Checks each CONNECT against the password file, re-read when it changes
/// (so `edgeferry passwd` takes effect without a restart).
struct LocalAuth {
    path: PathBuf,
    /// The file's identity when loaded, and its users.
    loaded: Mutex<(Option<FileStamp>, Arc<Passwords>)>,
    probe: Login,
    metrics: Arc<Metrics>,
    last_warning: Mutex<Option<std::time::Instant>>,
}

impl LocalAuth {
    fn load(path: PathBuf, probe: Login, metrics: Arc<Metrics>) -> Result<LocalAuth, BrokerError> {
        let mtime = FileStamp::of(&path);
        let users = Passwords::load(&path)?;
        info!(path = %path.display(), users = users.len(), "local clients must log in");
        Ok(LocalAuth {
            path,
            loaded: Mutex::new((mtime, Arc::new(users))),
            probe,
            metrics,
            last_warning: Mutex::new(None),
        })
    }

    /// The current users: re-read if the file changed; a broken edit keeps
    /// the previous users (and says so).
    fn users(&self) -> Arc<Passwords> {
        let mtime = FileStamp::of(&self.path);
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if mtime.is_some() && mtime != loaded.0 {
            loaded.0 = mtime;
            match Passwords::load(&self.path) {
                Ok(users) => {
                    info!(path = %self.path.display(), users = users.len(), "password file reloaded");
                    loaded.1 = Arc::new(users);
                }
                Err(e) => {
                    warn!(error = %e, "password file not reloaded; the previous users stay valid")
                }
            }
        }
        loaded.1.clone()
    }

    async fn check(&self, client_id: String, user: String, password: String) -> bool {
        if client_id == self.probe.id {
            return crate::passwd::ct_eq(password.as_bytes(), self.probe.secret.as_bytes());
        }
        let ok = if client_id.starts_with(INGEST_PREFIX) || client_id.starts_with(PROBE_PREFIX) {
            false
        } else {
            let users = self.users();
            // PBKDF2 takes milliseconds: off rumqttd's network threads.
            tokio::task::spawn_blocking(move || users.verify(&user, &password))
                .await
                .unwrap_or(false)
        };
        if !ok {
            self.metrics.broker_auth_failures.fetch_add(1, Relaxed);
            let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                *last = Some(std::time::Instant::now());
                warn!(%client_id, "local client refused: unknown user, wrong password or reserved client id (logged at most every 10 s; see broker_auth_failures)");
            }
        }
        ok
    }
}

/// What tells that a file changed: modification time, size and inode (an
/// atomic rewrite is a new inode, even within one timestamp tick).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp(SystemTime, u64, u64);

impl FileStamp {
    fn of(path: &std::path::Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp(m.modified().ok()?, m.len(), m.ino()))
    }
}
