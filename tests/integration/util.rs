//! The test world: edgeferry started in-process on ephemeral ports with a
//! temp queue file and the repo's example rules, a real upstream broker
//! (a second, in-process rumqttd), a TCP proxy in front of it that can cut the
//! uplink, and real MQTT clients (rumqttc) on both sides.
//!
//! Waits are on conditions with generous deadlines, never fixed sleeps.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgeferry::{Config, Running};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Generous: CI is a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub fn repo_rules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("rules")
}

/// Poll `cond` until it holds or `DEADLINE` passes (then panic with `what`).
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !cond() {
        if start.elapsed() > DEADLINE {
            panic!("timed out after {DEADLINE:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A free loopback port (bound then released), below the range the kernel
/// hands out for port 0 (32768-60999 on Linux): a port taken from that
/// range could be handed out again, to a listener on port 0 or to the next
/// caller, before its test bound it, and a test then talked to another
/// test's broker (seen in CI: an uplink "up" on a port meant to be dead).
/// Ports from here are handed out once per run, so they cannot collide
/// with each other or with port-0 listeners.
pub fn free_port() -> u16 {
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    // Another test binary (a bench) running at the same time starts elsewhere.
    let offset = std::process::id() % COUNT;
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (offset + n) % COUNT) as u16;
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + COUNT);
}

/// Config text for a gateway in `dir` forwarding to `upstream_port`, with the
/// repo's example rules. `extra` is appended (more tables or keys).
pub fn config_text(dir: &Path, upstream_port: u16, extra: &str) -> String {
    format!(
        r#"
[gateway]
id = "test"

[broker]
listen = "127.0.0.1:0"

[rules]
dir = "{rules}"

[queue]
path = "{db}"
commit_interval = "10ms"

[metrics]
listen = "127.0.0.1:0"

[upstream.cloud]
url = "mqtt://127.0.0.1:{upstream_port}"
client_id = "edgeferry-test-{unique}"
keep_alive = "5s"
reconnect_min = "50ms"
reconnect_max = "500ms"
{extra}
"#,
        rules = repo_rules().display(),
        db = dir.join("queue.db").display(),
        unique = uuid::Uuid::new_v4().simple(),
    )
}

/// `text` (from [`config_text`]) with the MQTT 3.1.1 listener on `port`
/// instead of an ephemeral one, for tests that must know it up front.
pub fn listen_on(text: &str, port: u16) -> String {
    // The first `listen` is the broker's ([metrics] has one too).
    text.replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
        1,
    )
}

/// `text` (from [`config_text`]) with the queue file at `path` and `extra`
/// keys added to `[queue]`.
pub fn queue_at(text: &str, path: &Path, extra: &str) -> String {
    text.lines()
        .map(|l| {
            if l.starts_with("path = ") {
                format!("path = \"{}\"\n{extra}", path.display())
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn load_config(dir: &Path, text: &str) -> Config {
    Config::from_toml(text, &dir.join("edgeferry.toml"), dir)
        .unwrap_or_else(|e| panic!("config: {e}"))
}

/// edgeferry running in-process.
pub struct Gateway {
    pub running: Running,
    pub addr: SocketAddr,
    pub db: PathBuf,
    /// The temp dir holding config and queue, when the gateway owns it
    /// (see [`World`]): it lives exactly as long as the gateway.
    owned_dir: Option<tempfile::TempDir>,
}

impl Gateway {
    pub async fn start(dir: &Path, upstream_port: u16) -> Gateway {
        Self::start_with(dir, &config_text(dir, upstream_port, "")).await
    }

    pub async fn start_with(dir: &Path, text: &str) -> Gateway {
        init_logs();
        let config = load_config(dir, text);
        let db = config.file.queue.path.clone();
        let running = edgeferry::start(config).await.expect("edgeferry starts");
        Gateway {
            addr: running.broker_addr,
            running,
            db,
            owned_dir: None,
        }
    }

    pub async fn stop(self) {
        tokio::time::timeout(DEADLINE, self.running.stop())
            .await
            .expect("stops in time")
            .expect("stops cleanly");
    }

    /// Rows waiting in the queue file for `upstream`, read from SQLite directly.
    pub fn queued(&self, upstream: &str) -> u64 {
        queued_in(&self.db, upstream)
    }

    pub fn count(
        &self,
        f: impl Fn(&edgeferry::metrics::Metrics) -> &std::sync::atomic::AtomicU64,
    ) -> u64 {
        f(&self.running.metrics).load(Ordering::Relaxed)
    }
}

pub fn queued_in(db: &Path, upstream: &str) -> u64 {
    edgeferry::queue::depth_of_file(db)
        .expect("queue readable")
        .get(upstream)
        .copied()
        .unwrap_or(0)
}

/// A real MQTT broker playing the cloud: rumqttd in-process on a free port.
/// (rumqttd cannot be stopped in-process; outages are made with [`Proxy`].)
pub fn upstream_broker() -> SocketAddr {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let conn = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: 1 << 20,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let cfg = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 200,
            max_segment_size: 16 << 20,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([(
            "up".to_string(),
            rumqttd::ServerSettings {
                name: "upstream".into(),
                listen: addr,
                tls: None,
                next_connection_delay_ms: 1,
                connections: conn,
            },
        )])),
        ..Default::default()
    };
    std::thread::spawn(move || {
        let _ = rumqttd::Broker::new(cfg).start();
    });
    // Wait until it accepts connections.
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(start.elapsed() < DEADLINE, "upstream broker did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    addr
}

/// A received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
    pub retain: bool,
    /// When the subscriber received it.
    pub at: std::time::Instant,
}

/// An MQTT subscriber recording everything it receives.
pub struct Subscriber {
    pub messages: Arc<Mutex<Vec<Message>>>,
    subacks: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl Subscriber {
    /// Connect to `addr`, subscribe to `filter` at QoS 1, and return once SUBACKed.
    pub async fn start(addr: SocketAddr, filter: &str) -> Subscriber {
        Self::start_with(addr, filter, None).await
    }

    /// The session is one the broker keeps (clean session off): messages
    /// wait for the subscriber across its reconnects. `persistent` fixes the
    /// client id (else a random one). Whenever the broker has no session for
    /// it, it subscribes again.
    pub async fn start_with(
        addr: SocketAddr,
        filter: &str,
        persistent: Option<&str>,
    ) -> Subscriber {
        let id = persistent.map_or_else(
            || format!("sub-{}", uuid::Uuid::new_v4().simple()),
            str::to_string,
        );
        let mut opts = MqttOptions::new(id, "127.0.0.1", addr.port());
        // A session the broker keeps, and a keep-alive a loaded CI machine
        // cannot miss: a subscriber that reconnects must not lose messages.
        opts.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(false)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(opts, 100);
        let filter = filter.to_string();
        let subacks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let acked = subacks.clone();
        let messages: Arc<Mutex<Vec<Message>>> = Arc::default();
        let (subacked_tx, subacked) = tokio::sync::oneshot::channel();
        let sink = messages.clone();
        let task = tokio::spawn(async move {
            let mut subacked_tx = Some(subacked_tx);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                        if !ack.session_present {
                            let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                        } else if let Some(tx) = subacked_tx.take() {
                            // The broker kept the subscription.
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        acked.fetch_add(1, Ordering::SeqCst);
                        if let Some(tx) = subacked_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        sink.lock().unwrap().push(Message {
                            topic: p.topic,
                            payload: p.payload.to_vec(),
                            qos: p.qos,
                            retain: p.retain,
                            at: std::time::Instant::now(),
                        })
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(DEADLINE, subacked)
            .await
            .expect("subscribed")
            .unwrap();
        Subscriber {
            messages,
            subacks,
            task,
        }
    }

    /// The sequence numbers received so far, each once.
    pub fn distinct_seqs(&self) -> std::collections::BTreeSet<u64> {
        self.take().iter().map(|m| seq_of(&m.payload)).collect()
    }

    /// SUBACKs received so far (one per (re)subscription).
    pub fn subscriptions(&self) -> usize {
        self.subacks.load(Ordering::SeqCst)
    }

    pub fn count(&self) -> usize {
        self.messages.lock().unwrap().len()
    }

    pub fn take(&self) -> Vec<Message> {
        self.messages.lock().unwrap().clone()
    }

    pub async fn wait_for(&self, n: usize) -> Vec<Message> {
        let m = self.messages.clone();
        wait_until(&format!("{n} messages upstream"), || {
            m.lock().unwrap().len() >= n
        })
        .await;
        self.take()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A sensor: an MQTT client publishing to the gateway.
pub struct Sensor {
    pub client: AsyncClient,
    acked: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl Sensor {
    pub async fn connect(addr: SocketAddr) -> Sensor {
        Self::connect_as(addr, &format!("sensor-{}", uuid::Uuid::new_v4().simple())).await
    }

    pub async fn connect_as(addr: SocketAddr, id: &str) -> Sensor {
        let mut opts = MqttOptions::new(id, "127.0.0.1", addr.port());
        opts.set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(1 << 20, 1 << 20)
            .set_inflight(100);
        let (client, mut el) = AsyncClient::new(opts, 1000);
        let acked: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let (connected_tx, connected) = tokio::sync::oneshot::channel();
        let a = acked.clone();
        let task = tokio::spawn(async move {
            let mut connected_tx = Some(connected_tx);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        if let Some(tx) = connected_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Incoming::PubAck(_))) => {
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(DEADLINE, connected)
            .await
            .expect("sensor connected")
            .unwrap();
        Sensor {
            client,
            acked,
            task,
        }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .unwrap();
    }

    /// QoS 1 publishes acknowledged by the gateway so far.
    pub fn acked(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    /// Wait until `n` QoS 1 publishes have been acknowledged by the gateway.
    pub async fn wait_acked(&self, n: usize) {
        let a = self.acked.clone();
        wait_until(&format!("{n} PUBACKs from the gateway"), || {
            a.load(Ordering::Relaxed) >= n
        })
        .await;
    }
}

impl Drop for Sensor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP proxy in front of the upstream broker: `set_up(false)` cuts every
/// connection and refuses new ones, like an uplink outage; `set_stalled(true)`
/// keeps connections open but forwards nothing (a half-open link) until it
/// is undone, when what was held back goes through.
pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    stalled: tokio::sync::watch::Sender<bool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr, up: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(AtomicBool::new(up));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (s, c) = (state.clone(), conns.clone());
        let stalled = tokio::sync::watch::Sender::new(false);
        let stall = stalled.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !s.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let stall = stall.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        // No Nagle: a proxy must not add its own delays.
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let (ri, wi) = inbound.into_split();
                        let (ro, wo) = outbound.into_split();
                        tokio::select! {
                            _ = pipe(ri, wo, stall.subscribe()) => {}
                            _ = pipe(ro, wi, stall.subscribe()) => {}
                        }
                    }
                });
                c.lock().unwrap().push(conn);
            }
        });
        Proxy {
            port,
            up: state,
            stalled,
            conns,
            task,
        }
    }

    pub fn set_stalled(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            for c in self.conns.lock().unwrap().drain(..) {
                c.abort();
            }
        }
    }
}

/// Copy `from` to `to`, holding each chunk while the link is stalled.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                // A dead path delivers no close either: while stalled, hold
                // it (the far end may time the silent client out first).
                let _ = stalled.wait_for(|s| !*s).await;
                return;
            }
            Ok(n) => n,
        };
        if stalled.wait_for(|s| !*s).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.set_up(false);
    }
}

/// A JSON payload carrying a device and sequence number.
/// A temperature reading; values stay between 20.0 and 29.9 °C, below the
/// example rules' alarm threshold, so only tests that want alerts get them.
pub fn reading(device: &str, seq: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"device": device, "seq": seq, "value": 20.0 + (seq % 100) as f64 / 10.0, "unit": "C"}))
        .unwrap()
}

/// The `seq` field of a JSON or CBOR reading.
pub fn seq_of(payload: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(payload)
        .or_else(|_| ciborium::from_reader::<serde_json::Value, _>(payload).map_err(|_| ()))
        .unwrap_or_else(|_| panic!("payload is neither JSON nor CBOR: {payload:?}"));
    v["seq"].as_u64().expect("seq")
}

/// Publish with a hand-written MQTT 3.1.1 client, for what well-behaved
/// client libraries refuse to send (e.g. wildcards in a topic name, which
/// rumqttd accepts). Returns once the PUBACK arrives.
pub async fn raw_publish(addr: SocketAddr, topic: &str, payload: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let id = format!("raw-{}", uuid::Uuid::new_v4().simple());
    let mut s = raw_connect(addr, &id).await.expect("CONNACK");
    let mut publish = (topic.len() as u16).to_be_bytes().to_vec();
    publish.extend_from_slice(topic.as_bytes());
    publish.extend_from_slice(&[0, 1]);
    publish.extend_from_slice(payload);
    s.write_all(&raw_packet(0x32, &publish)).await.unwrap();
    let mut puback = [0u8; 4];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut puback))
        .await
        .expect("PUBACK")
        .unwrap();
    assert_eq!(puback[0], 0x40, "PUBACK");
    s.write_all(&[0xe0, 0]).await.unwrap();
}

/// One MQTT packet: fixed header byte, remaining length, body.
pub fn raw_packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// A hand-written MQTT 3.1.1 clean-session CONNECT with this client id;
/// the stream once an accepting CONNACK came, or what went wrong.
pub async fn raw_connect(addr: SocketAddr, id: &str) -> Result<TcpStream, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut connect = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    connect.extend_from_slice(&(id.len() as u16).to_be_bytes());
    connect.extend_from_slice(id.as_bytes());
    s.write_all(&raw_packet(0x10, &connect))
        .await
        .map_err(|e| e.to_string())?;
    let mut connack = [0u8; 4];
    match tokio::time::timeout(DEADLINE, s.read_exact(&mut connack)).await {
        Err(_) => return Err("no CONNACK".into()),
        Ok(Err(e)) => return Err(format!("closed before CONNACK: {e}")),
        Ok(Ok(_)) => {}
    }
    if connack[0] != 0x20 || connack[3] != 0 {
        return Err(format!("not an accepting CONNACK: {connack:?}"));
    }
    Ok(s)
}

/// Assert `got` is exactly `expected`, in order, reporting the first
/// difference rather than two huge lists.
pub fn assert_sequence(got: &[u64], expected: std::ops::Range<u64>) {
    let want: Vec<u64> = expected.collect();
    if let Some(i) = got.iter().zip(&want).position(|(g, w)| g != w) {
        panic!(
            "sequence differs at index {i}: got {:?}, expected {:?} (lengths {} and {})",
            &got[i..(i + 5).min(got.len())],
            &want[i..(i + 5).min(want.len())],
            got.len(),
            want.len()
        );
    }
    assert_eq!(got.len(), want.len(), "same prefix, different lengths");
}

/// With RUST_LOG set, the daemon's logs go to the test output (for debugging).
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// The usual world of a store-and-forward test: a gateway in a temp dir (it
/// owns) whose upstream sits behind a [`Proxy`] that starts down, a subscriber on
/// the upstream (all of `plant/#`), and one connected sensor.
pub struct World {
    pub sub: Subscriber,
    pub proxy: Proxy,
    pub gw: Gateway,
    pub sensor: Sensor,
}

impl World {
    /// `upstream_settings` are extra keys for `[upstream.cloud]`.
    pub async fn offline(upstream_settings: &str) -> World {
        Self::offline_with(upstream_settings, |text| text).await
    }

    /// Like [`offline`](Self::offline), with a last edit of the config text.
    pub async fn offline_with(
        upstream_settings: &str,
        edit: impl FnOnce(String) -> String,
    ) -> World {
        let dir = tempfile::tempdir().unwrap();
        let upstream = upstream_broker();
        let sub = Subscriber::start(upstream, "plant/#").await;
        let proxy = Proxy::start(upstream, false).await;
        let text = edit(config_text(dir.path(), proxy.port, upstream_settings));
        let mut gw = Gateway::start_with(dir.path(), &text).await;
        gw.owned_dir = Some(dir);
        let sensor = Sensor::connect(gw.addr).await;
        World {
            sub,
            proxy,
            gw,
            sensor,
        }
    }
}

/// `text` (from [`config_text`]) with the rules read from `dir` instead of
/// the repo's examples, and `extra` keys added to `[rules]`.
pub fn rules_at(text: &str, dir: &Path, extra: &str) -> String {
    text.replace(
        &format!("dir = \"{}\"", repo_rules().display()),
        &format!("dir = \"{}\"\n{extra}", dir.display()),
    )
}

/// `text` (from [`config_text`]) with the metrics endpoint on `port`.
pub fn metrics_on(text: &str, port: u16) -> String {
    text.replace(
        "[metrics]\nlisten = \"127.0.0.1:0\"",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\""),
    )
}

/// `GET path` from an HTTP endpoint: (status code, body), with the client
/// `edgeferry status` uses.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || edgeferry::status::fetch(addr, &path))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("GET {addr}: {e}"))
}

/// The value of one sample (`name{labels}` exactly as exposed) in a scrape.
pub fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{scrape}"))
}

/// A real Mosquitto broker (Debian's `mosquitto`) as a child process on
/// free loopback ports: the upstream in interop and TLS tests. Each entry of
/// `listeners` is a listener's extra config lines ("" for plain MQTT).
pub struct Mosquitto {
    pub ports: Vec<u16>,
    pub dir: PathBuf,
    child: std::process::Child,
}

impl Mosquitto {
    pub async fn start(dir: &Path, listeners: &[&str]) -> Mosquitto {
        let ports: Vec<u16> = listeners.iter().map(|_| free_port()).collect();
        Self::start_on(dir, listeners, ports).await
    }

    /// Like [`start`](Self::start), on known ports (a restart keeps them),
    /// with persistence in `dir` (sessions survive a clean restart).
    pub async fn start_on(dir: &Path, listeners: &[&str], ports: Vec<u16>) -> Mosquitto {
        std::fs::create_dir_all(dir).unwrap();
        let mut conf = format!(
            "allow_anonymous true\npersistence true\npersistence_location {}/\nlog_dest file {}\nlog_type all\n",
            dir.display(),
            dir.join("mosquitto.log").display()
        );
        // As root, mosquitto would switch to the `mosquitto` user, which
        // cannot read the test's temp dir.
        if unsafe { libc::geteuid() } == 0 {
            conf.push_str("user root\n");
        }
        for (port, extra) in ports.iter().zip(listeners) {
            conf.push_str(&format!("listener {port} 127.0.0.1\n{extra}\n"));
        }
        let path = dir.join("mosquitto.conf");
        std::fs::write(&path, conf).unwrap();
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start mosquitto ({e}): install it (apt install mosquitto); .ci/run does"
                )
            });
        let mut m = Mosquitto {
            ports,
            dir: dir.to_path_buf(),
            child,
        };
        for port in m.ports.clone() {
            let start = std::time::Instant::now();
            while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                if let Some(status) = m.child.try_wait().unwrap() {
                    panic!("mosquitto exited: {status}: {}", m.log());
                }
                assert!(start.elapsed() < DEADLINE, "mosquitto did not listen");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        m
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        ([127, 0, 0, 1], self.ports[i]).into()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// SIGTERM (mosquitto saves its persistence file) and wait.
    pub fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An MQTT 3.1.1 client over a bare socket, for tests that need to control
/// exactly which bytes go out in one write and to see the connection close.
pub struct RawClient {
    s: tokio::net::TcpStream,
    buf: bytes::BytesMut,
}

impl RawClient {
    /// Connect as `id` with `keep_alive` seconds and read the CONNACK.
    pub async fn connect(addr: SocketAddr, id: &str, keep_alive: u16) -> RawClient {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut c = RawClient {
            s,
            buf: bytes::BytesMut::new(),
        };
        let mut out = bytes::BytesMut::new();
        let mut connect = rumqttc::mqttbytes::v4::Connect::new(id);
        connect.keep_alive = keep_alive;
        connect.write(&mut out).unwrap();
        c.send(&out).await;
        let connack = c.next().await;
        assert!(
            matches!(connack, Some(rumqttc::mqttbytes::v4::Packet::ConnAck(_))),
            "{connack:?}"
        );
        c
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.s.write_all(bytes).await.unwrap();
    }

    /// The next packet, or `None` once the server closed the connection.
    pub async fn next(&mut self) -> Option<rumqttc::mqttbytes::v4::Packet> {
        use tokio::io::AsyncReadExt;
        loop {
            match rumqttc::mqttbytes::v4::Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Some(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    match self.s.read_buf(&mut self.buf).await {
                        Ok(0) | Err(_) => return None,
                        Ok(_) => {}
                    }
                }
                Err(e) => panic!("{e:?}"),
            }
        }
    }
}
