//! The daemon's configuration: TOML on disk, serde structs with
//! `deny_unknown_fields`, documented defaults (in `default.toml`, which is
//! also what `edgeferry print-default-config` prints), and loading that
//! collects every error (config and rules) with file:line:column.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::diagnostic::{Diagnostic, Diagnostics};
use crate::rules::RuleSet;
use crate::units::{ByteSize, HumanDuration, Secret};

pub mod every_error;

/// The embedded default configuration. It loads as it is.
pub const DEFAULT_CONFIG: &str = include_str!("../default.toml");

/// The configuration file as written, after defaults are applied.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub broker: BrokerConfig,
    #[serde(default)]
    pub rules: RulesConfig,
    #[serde(default)]
    pub queue: QueueConfig,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// Named upstream brokers; rules refer to them by name.
    #[serde(default)]
    pub upstream: BTreeMap<String, UpstreamConfig>,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Identifies this gateway in client ids and logs; the hostname if unset.
    pub id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// The front door's listener (MQTT 3.1.1 and 5, told apart by CONNECT).
    #[serde(deserialize_with = "crate::units::socket_addr")]
    pub listen: SocketAddr,
    /// A second plain listener, serving both protocols like `listen` (kept
    /// for configs from when MQTT 5 needed a port of its own).
    #[serde(deserialize_with = "crate::units::opt_socket_addr")]
    pub listen_v5: Option<SocketAddr>,
    /// When a sensor's QoS 1/2 publish is acknowledged: once its event is
    /// safe (committed, or acknowledged by every upstream it goes to), or
    /// as soon as it is read.
    pub ack: AckMode,
    /// Publishes one connection may have unacknowledged before the front
    /// door stops reading it (MQTT 5 clients get it as Receive Maximum).
    pub max_inflight: u16,
    /// Mosquitto-format ACL file: who may publish and subscribe where.
    pub acl_file: Option<PathBuf>,
    /// Largest publish a client may send.
    pub max_payload: ByteSize,
    pub max_connections: usize,
    /// rumqttd keeps at most segment_size * segment_count of recent messages
    /// per filter in RAM for slow readers, edgeferry's ingest included.
    pub segment_size: ByteSize,
    pub segment_count: usize,
    /// Filters the embedded link subscribes to before the broker starts.
    pub ingest: Vec<String>,
    /// MQTT 3.1.1 over TLS, with `tls_cert` and `tls_key`; off unless set.
    #[serde(deserialize_with = "crate::units::opt_socket_addr")]
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain and private key of the TLS listener.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) whose client certificates the TLS listener requires; a
    /// verified certificate is the client's login, its common name the
    /// user name (as Mosquitto's `use_identity_as_username`).
    pub tls_client_ca: Option<PathBuf>,
    /// Mosquitto-format password file (`edgeferry passwd` or
    /// `mosquitto_passwd` write it). When set, every client on every
    /// listener must log in; anonymous clients are refused.
    pub password_file: Option<PathBuf>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            listen_v5: None,
            ack: AckMode::Stored,
            max_inflight: 100,
            acl_file: None,
            max_payload: ByteSize(256 << 10),
            max_connections: 1000,
            segment_size: ByteSize(256 << 10),
            segment_count: 4,
            ingest: vec!["#".to_string()],
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            password_file: None,
        }
    }
}

/// `broker.ack`: when the front door acknowledges a QoS 1/2 publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// Once the event is committed to the queue or acknowledged upstream:
    /// nothing a sensor was told was received can be lost.
    Stored,
    /// At once: the lowest latency; a crash loses what waits in RAM.
    Received,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// Directory of `*.toml` rule files.
    pub dir: PathBuf,
    pub unmatched: UnmatchedPolicy,
    /// The same for events that came down from an upstream (a downlink
    /// subscription) and match no rule with `from` naming it.
    pub unmatched_downlink: UnmatchedPolicy,
    /// Local topic that receives a JSON report for each event with a
    /// malformed payload or a failing rule; unset: counted and logged only.
    pub dead_letter: Option<String>,
    /// Reload the rules when a file in `dir` changes (SIGHUP always does).
    pub watch: bool,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            dir: PathBuf::from("rules"),
            unmatched: UnmatchedPolicy::Keyword(Keyword::Drop),
            unmatched_downlink: UnmatchedPolicy::Keyword(Keyword::Drop),
            dead_letter: None,
            watch: true,
        }
    }
}

/// What happens to an event that no rule matches: `"drop"` (counted as
/// `dropped_unmatched`), or a destination like a rule's `to` entry.
#[derive(Debug, Clone, PartialEq)]
pub enum UnmatchedPolicy {
    Keyword(Keyword),
    Route(crate::rules::DestinationSpec),
}

impl UnmatchedPolicy {
    /// The destination, or `None` for "drop".
    pub fn destination(&self) -> Option<crate::rules::DestinationSpec> {
        match self {
            UnmatchedPolicy::Keyword(Keyword::Drop) => None,
            UnmatchedPolicy::Route(d) => Some(d.clone()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Keyword {
    Drop,
}

/// A string is the keyword, a table a destination. Hand-written rather than
/// `#[serde(untagged)]`, which would replace a destination's own error (an
/// unknown key, a bad priority) with "matched no variant".
impl<'de> Deserialize<'de> for UnmatchedPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UnmatchedPolicy;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "\"drop\" or a destination like { upstream = \"cloud\", topic = \"unrouted\" }",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Keyword::deserialize(serde::de::value::StrDeserializer::<E>::new(v))
                    .map(UnmatchedPolicy::Keyword)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                crate::rules::DestinationSpec::deserialize(
                    serde::de::value::MapAccessDeserializer::new(map),
                )
                .map(UnmatchedPolicy::Route)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// SQLite file of the store-and-forward queue.
    pub path: PathBuf,
    /// At most one commit per interval (SD-card friendly); the power-cut loss window.
    pub commit_interval: HumanDuration,
    /// Commit sooner once this many events wait.
    pub commit_max_events: usize,
    /// Below this much free space on the queue's filesystem the queue stops
    /// growing and the routes' overflow policies apply. 0 turns it off.
    pub min_free_disk: ByteSize,
    /// How often events past their TTL are deleted (never sent meanwhile).
    pub sweep_interval: HumanDuration,
    /// Deprecated: one durability model now. "always" maps to
    /// `spill_after = 0`, "offline" to its old default of 1 s; `check` warns.
    pub durability: Option<crate::queue::Durability>,
    /// RAM held by events not yet written; beyond it the oldest are
    /// written to SQLite.
    pub memory_max: ByteSize,
    /// An event its upstream has not acknowledged within this is written
    /// to SQLite (default: `commit_interval`; 0: at the next commit).
    pub spill_after: Option<HumanDuration>,
}

impl QueueConfig {
    /// How long an unacknowledged event waits in RAM before it is written.
    /// The deprecated `durability = "always"` ignored `spill_after` (the
    /// old shipped configs set both), so it still means 0; otherwise
    /// `spill_after`, else 1 s for "offline" (its old default), else one
    /// commit interval.
    pub fn spill_after(&self) -> Duration {
        use crate::queue::Durability;
        match (self.durability, self.spill_after) {
            (Some(Durability::Always), _) => Duration::ZERO,
            (_, Some(s)) => s.0,
            (Some(Durability::Offline), None) => Duration::from_secs(1),
            (None, None) => self.commit_interval.0,
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            path: PathBuf::from("data/queue.db"),
            commit_interval: HumanDuration(Duration::from_millis(100)),
            commit_max_events: 2000,
            min_free_disk: ByteSize(64 << 20),
            sweep_interval: HumanDuration(Duration::from_secs(10)),
            durability: None,
            memory_max: ByteSize(8 << 20),
            spill_after: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Capacity, in events, of the in-memory hand-off from ingest to the queue writer.
    pub buffer: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig { buffer: 10_000 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `mqtt://host[:1883]` or `mqtts://host[:8883]` (TLS).
    pub url: UpstreamUrl,
    pub client_id: Option<String>,
    pub username: Option<String>,
    /// The password in the config itself: prefer `password_file` or
    /// `password_env`, which keep it out of a file operators share.
    pub password: Option<Secret>,
    /// A file holding the password (one line; a trailing newline is ignored).
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password (systemd `Environment=`
    /// or `LoadCredential=`-style setups).
    pub password_env: Option<String>,
    /// TLS: PEM file of the CA certificates that may sign the server's
    /// certificate; the system roots when unset.
    pub ca_file: Option<PathBuf>,
    /// TLS client certificate (PEM chain) and its private key, for mutual
    /// TLS (AWS IoT Core, EMQX with client certificates).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// TLS ALPN protocols to offer, e.g. ["x-amzn-mqtt-ca"] for AWS IoT on port 443.
    #[serde(default)]
    pub alpn: Vec<String>,
    /// MQTT version spoken to the upstream: "3.1.1" (default) or "5".
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default = "defaults::keep_alive")]
    pub keep_alive: HumanDuration,
    /// QoS 1 publishes in flight (sent, not yet acknowledged).
    #[serde(default = "defaults::inflight")]
    pub inflight: u16,
    /// At most this many events per second to this upstream (0: no limit).
    #[serde(default)]
    pub send_rate: u64,
    /// At most this many bytes (payload + topic) per second (0: no limit).
    #[serde(default = "defaults::unlimited")]
    pub send_bytes_rate: ByteSize,
    /// Order of the backlog and live events after a reconnect.
    #[serde(default)]
    pub drain_order: DrainOrder,
    /// Mark events sent from the backlog (queued before this connection
    /// came up) with `"<field>": true` in JSON object payloads.
    pub replay_marker: Option<String>,
    /// Byte cap of this upstream's queue (payload + topic of each event).
    #[serde(default = "defaults::max_size")]
    pub max_size: ByteSize,
    #[serde(default = "defaults::max_packet_size")]
    pub max_packet_size: ByteSize,
    #[serde(default = "defaults::reconnect_min")]
    pub reconnect_min: HumanDuration,
    #[serde(default = "defaults::reconnect_max")]
    pub reconnect_max: HumanDuration,
    /// Downlink: filters subscribed on this upstream's session (again
    /// after every reconnect); what arrives goes through the rules with
    /// `meta.source` = this upstream's name. `{gateway}` is the gateway id.
    #[serde(default)]
    pub subscribe: Vec<Subscription>,
    /// Gateway health: a retained birth on every connect, a retained will
    /// (`offline`) the broker publishes if the gateway disappears, a
    /// retained `offline` on a clean stop, and heartbeats. `{gateway}` is
    /// the gateway id. Off unless set.
    pub status_topic: Option<String>,
    /// Period of the heartbeat on `status_topic`.
    #[serde(default = "defaults::status_interval")]
    pub status_interval: HumanDuration,
    /// Remote operations (off unless set): commands (`reload`, `status`,
    /// `rules`, `rollback`) on this topic, results on `<topic>/result`.
    /// Whoever may publish here may change the gateway's rules.
    pub control_topic: Option<String>,
}

/// One downlink filter: `"gw/{gateway}/cmd/#"` (QoS 1), or
/// `{ filter = "...", qos = 0 }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub filter: String,
    pub qos: u8,
}

impl Subscription {
    /// The filter with `{gateway}` replaced.
    pub fn expand(&self, gateway: &str) -> String {
        expand_gateway(&self.filter, gateway)
    }
}

/// `{gateway}` in a topic or filter, replaced by the gateway id.
pub fn expand_gateway(template: &str, gateway: &str) -> String {
    template.replace("{gateway}", gateway)
}

/// A string is a QoS 1 filter; a table names filter and qos. Hand-written
/// so a table's own error (an unknown key) is not "matched no variant".
impl<'de> Deserialize<'de> for Subscription {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            filter: String,
            #[serde(default = "one")]
            qos: u8,
        }
        fn one() -> u8 {
            1
        }
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Subscription;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a topic filter, or { filter = \"gw/{gateway}/cmd/#\", qos = 1 }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Subscription {
                    filter: v.to_string(),
                    qos: 1,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                let t = Table::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(Subscription {
                    filter: t.filter,
                    qos: t.qos,
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

mod defaults {
    use super::*;
    pub fn keep_alive() -> HumanDuration {
        HumanDuration(Duration::from_secs(15))
    }
    pub fn inflight() -> u16 {
        64
    }
    pub fn unlimited() -> ByteSize {
        ByteSize(0)
    }
    pub fn max_size() -> ByteSize {
        ByteSize(512 << 20)
    }
    pub fn max_packet_size() -> ByteSize {
        ByteSize(256 << 10)
    }
    pub fn reconnect_min() -> HumanDuration {
        HumanDuration(Duration::from_millis(500))
    }
    pub fn reconnect_max() -> HumanDuration {
        HumanDuration(Duration::from_secs(30))
    }
    pub fn status_interval() -> HumanDuration {
        HumanDuration(Duration::from_secs(60))
    }
}

/// How an uplink orders the backlog and new events after a reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainOrder {
    /// Queue order: new events wait behind the backlog of their priority.
    #[default]
    Fifo,
    /// Events queued after the connection came up go first; the backlog
    /// drains in the remaining capacity (and pace).
    LiveFirst,
}

/// The MQTT version of an upstream session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Protocol {
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    /// Event ids as user properties, message expiry from the route's TTL,
    /// the server's Receive Maximum, PUBACK reason codes.
    #[serde(rename = "5")]
    V5,
}

/// As the config writes it: `3.1.1`, `5`.
impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::V311 => "3.1.1",
            Protocol::V5 => "5",
        })
    }
}

/// `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (TLS,
/// default port 8883).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl FromStr for UpstreamUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (rest, tls) = if let Some(rest) = s.strip_prefix("mqtt://") {
            (rest, false)
        } else if let Some(rest) = s.strip_prefix("mqtts://") {
            (rest, true)
        } else {
            return Err(format!(
                "unsupported upstream url {s:?}: write mqtt://host:port, or mqtts://host:port for TLS"
            ));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port = p
                    .parse()
                    .map_err(|_| format!("invalid port {p:?} in upstream url {s:?}"))?;
                (h, port)
            }
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("upstream url {s:?} has no host"));
        }
        Ok(UpstreamUrl {
            host: host.to_string(),
            port,
            tls,
        })
    }
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` (Prometheus) and `/health` over HTTP.
    pub enabled: bool,
    /// Where; loopback by default (the numbers are nobody else's business).
    #[serde(deserialize_with = "crate::units::socket_addr")]
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9184)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Default filter when RUST_LOG is not set.
    pub level: String,
    /// Period of the one-line counter summary.
    pub summary_interval: HumanDuration,
    /// Level for rumqttd's own log lines. Off by default: rumqttd 0.20 logs
    /// every ordinary client disconnect at ERROR. Set "warn" or "info" when
    /// debugging a sensor's connection.
    pub broker: String,
    /// `text` for people, `json` (one object per line) for log shippers.
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields` (the
    /// message and the event's fields), `target`.
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            summary_interval: HumanDuration(Duration::from_secs(60)),
            broker: "off".into(),
            format: LogFormat::Text,
        }
    }
}

impl ConfigFile {
    /// Parse config text (named `name` in messages) and resolve relative
    /// paths against `base`. No validation and no rules: for tools that only
    /// need paths, like `edgeferry queue stats`.
    pub fn parse(text: &str, name: &Path, base: &Path) -> Result<ConfigFile, Diagnostics> {
        let parsed = Self::parse_all(text, name, base);
        match parsed.value {
            Some(file) if parsed.errors.is_empty() => Ok(file),
            _ => Err(Diagnostics(parsed.errors)),
        }
    }

    /// `parse`, reporting every rejected key (in line order) and, when the
    /// rest of the file still loads, the config without them (their
    /// defaults apply), so the checks after it can report theirs too.
    pub fn parse_all(text: &str, name: &Path, base: &Path) -> every_error::Parsed<ConfigFile> {
        let shape = tables_that_are_not(text, name);
        if !shape.is_empty() {
            return every_error::Parsed {
                value: None,
                errors: shape,
                touched: Vec::new(),
            };
        }
        let mut parsed = every_error::deserialize::<ConfigFile>(text, name);
        parsed.value = parsed.value.map(|f| f.resolved_against(base));
        parsed
    }

    fn resolved_against(mut self, base: &Path) -> ConfigFile {
        let file = &mut self;
        file.rules.dir = base.join(&file.rules.dir);
        file.queue.path = base.join(&file.queue.path);
        for path in [
            &mut file.broker.tls_cert,
            &mut file.broker.tls_key,
            &mut file.broker.password_file,
            &mut file.broker.acl_file,
            &mut file.broker.tls_client_ca,
        ]
        .into_iter()
        .flatten()
        {
            *path = base.join(&*path);
        }
        for up in file.upstream.values_mut() {
            for path in [
                &mut up.password_file,
                &mut up.ca_file,
                &mut up.cert_file,
                &mut up.key_file,
            ]
            .into_iter()
            .flatten()
            {
                *path = base.join(&*path);
            }
        }
        self
    }

    /// This gateway's id: configured, else the hostname, else "edgeferry".
    pub fn gateway_id(&self) -> String {
        self.gateway
            .id
            .clone()
            .or_else(hostname)
            .unwrap_or_else(|| "edgeferry".into())
    }

    /// The configured upstreams' names (what rules may route to).
    pub fn upstream_names(&self) -> std::collections::BTreeSet<String> {
        self.upstream.keys().cloned().collect()
    }

    /// Compile the rules: the files of `rules.dir`, or the given files
    /// instead (`edgeferry test PATHS`), with this config's upstreams,
    /// gateway id, unmatched policy and dead-letter topic.
    pub fn load_rules(&self, files: Option<&[PathBuf]>) -> Result<RuleSet, Diagnostics> {
        let names = self.upstream_names();
        let loaded = match files {
            Some(files) => RuleSet::load_files(files, &names),
            None => RuleSet::load_dir(&self.rules.dir, &names),
        };
        // The unmatched destination is checked even when rule files failed.
        let (mut errors, mut rules) = match loaded {
            Ok(r) => (Vec::new(), Some(r)),
            Err(Diagnostics(e)) => (e, None),
        };
        let mut scratch = RuleSet::default();
        if let Err(problems) = rules
            .as_mut()
            .unwrap_or(&mut scratch)
            .configure(&rule_settings(self), &names)
        {
            errors.extend(problems.into_iter().map(|(key, msg)| {
                Diagnostic::whole_file(&self.rules.dir, format!("rules.{key}: {msg}"))
            }));
        }
        let settings = rule_settings(self);
        for (key, d) in [
            ("unmatched", &settings.unmatched),
            ("unmatched_downlink", &settings.unmatched_downlink),
        ] {
            if let Some(d) = d
                && d.envelope == Some(crate::rules::envelope::EnvelopeMode::CloudeventsBinary)
                && let Some(u) = &d.upstream
                && self
                    .upstream
                    .get(u)
                    .is_some_and(|u| u.protocol != Protocol::V5)
            {
                errors.push(Diagnostic::whole_file(
                    &self.rules.dir,
                    format!("rules.{key}: envelope = \"cloudevents-binary\" sends the attributes as MQTT 5 user properties, and upstream {u:?} speaks MQTT 3.1.1; set protocol = \"5\" in [upstream.{u}] or use envelope = \"cloudevents\""),
                ));
            }
        }
        for (rule, upstream, at) in rules.iter().flat_map(|r| r.binary_envelopes()) {
            if self
                .upstream
                .get(upstream)
                .is_some_and(|u| u.protocol != Protocol::V5)
            {
                let mut d = at.clone();
                d.message = format!(
                    "rule {rule:?}: envelope = \"cloudevents-binary\" sends the attributes as MQTT 5 user properties, and upstream {upstream:?} speaks MQTT 3.1.1; set protocol = \"5\" in [upstream.{upstream}] or use envelope = \"cloudevents\""
                );
                errors.push(d);
            }
        }
        match rules {
            Some(rules) if errors.is_empty() => Ok(rules),
            _ => Err(Diagnostics(errors)),
        }
    }

    /// Read the config file at `path`, or the embedded default.
    pub fn read(path: Option<&Path>) -> Result<ConfigFile, Diagnostics> {
        let source = Source::read(path)?;
        Self::parse(&source.text, &source.name, &source.base)
    }
}

/// The config's tables written as something else: serde reads a struct
/// from an array by position, so `queue = ["x.db"]` set the queue's path
/// and `broker = []` passed; and `[[broker]]` (an array of tables) gave
/// "invalid type: map, expected a string".
fn tables_that_are_not(text: &str, name: &Path) -> Vec<Diagnostic> {
    use toml::de::{DeTable, DeValue};
    const TABLES: [&str; 8] = [
        "gateway", "broker", "rules", "queue", "pipeline", "metrics", "log", "upstream",
    ];
    let Ok(root) = DeTable::parse(text) else {
        return Vec::new(); // a syntax error: reported by the parse itself
    };
    let mut out = Vec::new();
    let mut check = |key: &str, value: &toml::Spanned<DeValue>, what: String| {
        let written = match value.get_ref() {
            DeValue::Table(_) => return,
            DeValue::Array(a)
                if a.iter().all(|i| matches!(i.get_ref(), DeValue::Table(_))) && !a.is_empty() =>
            {
                format!("[[{key}]] (an array of tables)")
            }
            _ => format!("{key} = {}", value.get_ref().type_str()),
        };
        out.push(Diagnostic::at(
            name,
            text,
            Some(value.span()),
            format!("{written}: {what} must be a table, written [{key}]"),
        ));
    };
    for (key, value) in root.get_ref().iter() {
        let key = key.get_ref().as_ref();
        if !TABLES.contains(&key) {
            continue; // serde names unknown keys
        }
        check(key, value, key.to_string());
        if key == "upstream"
            && let DeValue::Table(ups) = value.get_ref()
        {
            for (up, v) in ups.iter() {
                let full = format!("upstream.{}", up.get_ref());
                check(&full, v, full.clone());
            }
        }
    }
    out.sort_by_key(|d| d.line);
    out
}

/// Config text with the name it is reported under and the directory its
/// relative paths are resolved against.
pub(crate) struct Source {
    pub(crate) text: String,
    pub(crate) name: PathBuf,
    pub(crate) base: PathBuf,
}

impl Source {
    /// The file at `path`, or the embedded default (relative to the current directory).
    pub(crate) fn read(path: Option<&Path>) -> Result<Source, Diagnostics> {
        let Some(path) = path else {
            return Ok(Source {
                text: DEFAULT_CONFIG.to_string(),
                name: PathBuf::from("<default config>"),
                base: PathBuf::from("."),
            });
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            Diagnostics(vec![Diagnostic::unreadable(
                path,
                format!("cannot read config: {e}"),
            )])
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Ok(Source {
            text,
            name: path.to_path_buf(),
            base: base.to_path_buf(),
        })
    }
}

/// The kernel's host name, by gethostname(2): unlike /proc/sys it is there
/// under systemd's `ProcSubset=pid` sandboxing, so the default client id
/// does not change with the sandbox.
fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the call.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    (!name.is_empty()).then_some(name)
}

/// What the rule set needs from the config beyond the rule files.
fn rule_settings(file: &ConfigFile) -> crate::rules::Settings {
    crate::rules::Settings {
        gateway: file.gateway_id(),
        unmatched: file.rules.unmatched.destination(),
        unmatched_downlink: file.rules.unmatched_downlink.destination(),
        dead_letter: file.rules.dead_letter.clone(),
    }
}

/// Where a setting is written, for a diagnostic about it: `key` inside
/// `[table]`, else that table's header, else the file as a whole (never
/// the same key in another table, such as another upstream's).
pub(crate) struct Locator<'a> {
    pub(crate) name: &'a Path,
    pub(crate) text: &'a str,
}

impl Locator<'_> {
    pub(crate) fn at(&self, table: &str, key: &str, message: impl Into<String>) -> Diagnostic {
        Diagnostic::at(
            self.name,
            self.text,
            find_key_in(self.text, table, key),
            message,
        )
    }
}

/// Every check of a parsed config that needs no I/O, each returning what
/// it found (the files it names are checked by `setup`).
pub(crate) fn check(file: &ConfigFile, loc: &Locator) -> Vec<Diagnostic> {
    let mut errors = check_gateway(&file.gateway, loc);
    // (A bad configured id is reported once, there.)
    let id_reported = !errors.is_empty();
    errors.extend(check_rules(file, loc));
    errors.extend(check_addresses(file, loc));
    errors.extend(check_broker(&file.broker, loc));
    errors.extend(check_pipeline(file, loc));
    errors.extend(check_queue(&file.queue, loc));
    errors.extend(check_log(&file.log, loc));
    let gateway = file.gateway_id();
    for (up_name, up) in &file.upstream {
        errors.extend(check_upstream(up_name, up, loc));
        errors.extend(check_downlink(up_name, up, &gateway, id_reported, loc));
    }
    errors
}

/// Two of edgeferry's own listeners on one port: the second would fail at
/// start with "address already in use (is another MQTT broker running?)",
/// which points away from the config. Same port and the same address, or
/// either on every address (0.0.0.0, ::), is a clash.
fn check_addresses(file: &ConfigFile, loc: &Locator) -> Vec<Diagnostic> {
    let b = &file.broker;
    let mut listeners: Vec<(&str, &str, SocketAddr)> = vec![("broker", "listen", b.listen)];
    listeners.extend(b.listen_v5.map(|a| ("broker", "listen_v5", a)));
    listeners.extend(b.tls_listen.map(|a| ("broker", "tls_listen", a)));
    if file.metrics.enabled {
        listeners.push(("metrics", "listen", file.metrics.listen));
    }
    let clash = |a: &SocketAddr, b: &SocketAddr| {
        a.port() == b.port()
            && a.port() != 0
            && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
    };
    let mut out = Vec::new();
    for (i, (table, key, addr)) in listeners.iter().enumerate() {
        if let Some((t0, k0, a0)) = listeners[..i].iter().find(|(_, _, a)| clash(a, addr)) {
            out.push(loc.at(
                table,
                key,
                format!("{table}.{key} ({addr}) and {t0}.{k0} ({a0}) would listen on the same port; give each its own"),
            ));
        }
    }
    out
}

/// `check` when `ok` is false: a diagnostic at `table.key`.
fn require(out: &mut Vec<Diagnostic>, loc: &Locator, table: &str, key: &str, ok: bool, what: &str) {
    if !ok {
        out.push(loc.at(table, key, what));
    }
}

/// The gateway id goes into client ids and, as `{gateway}`, into topics:
/// one printable topic level.
fn check_gateway(g: &GatewayConfig, loc: &Locator) -> Vec<Diagnostic> {
    let Some(id) = &g.id else {
        return Vec::new();
    };
    let bad = id.trim().is_empty()
        || id.trim() != id
        || id.contains(['+', '#', '/', '{', '}'])
        || id.chars().any(char::is_control);
    match bad {
        true => vec![loc.at(
            "gateway",
            "id",
            format!("gateway.id {id:?}: use one printable word such as \"gw-001\" (no spaces at the ends, no / + # {{ }} or control characters: it goes into client ids and topics)"),
        )],
        false => Vec::new(),
    }
}

fn check_rules(file: &ConfigFile, loc: &Locator) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    if let Some(t) = &file.rules.dead_letter
        && (t.is_empty() || t.contains(['+', '#']))
    {
        out.push(loc.at(
            "rules",
            "dead_letter",
            format!("rules.dead_letter {t:?} must be a topic without wildcards, e.g. \"edgeferry/dead-letter\""),
        ));
    }
    out
}

/// The broker's values and their ranges (which keep allocations and timers
/// sane, and rumqttd and tokio from panicking).
fn check_broker(b: &BrokerConfig, loc: &Locator) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let o = &mut out;
    require(
        o,
        loc,
        "broker",
        "segment_size",
        b.segment_size.0 > 0 && b.segment_count > 0,
        "broker.segment_size and broker.segment_count must be greater than zero",
    );
    if b.max_payload.0 > b.segment_size.0 {
        o.push(loc.at(
            "broker",
            "max_payload",
            format!(
                "broker.max_payload ({}) must not exceed broker.segment_size ({})",
                b.max_payload, b.segment_size
            ),
        ));
    }
    require(
        o,
        loc,
        "broker",
        "max_connections",
        (1..=100_000).contains(&b.max_connections),
        "broker.max_connections must be between 1 and 100000",
    );
    require(
        o,
        loc,
        "broker",
        "segment_count",
        b.segment_count <= 1000,
        "broker.segment_count must be at most 1000",
    );
    require(
        o,
        loc,
        "broker",
        "segment_size",
        b.segment_size.0 <= 1 << 30,
        "broker.segment_size must be at most 1GiB",
    );
    require(
        o,
        loc,
        "broker",
        "max_inflight",
        b.max_inflight > 0,
        "broker.max_inflight must be at least 1 (100 is a good start)",
    );
    require(
        o,
        loc,
        "broker",
        "ingest",
        !b.ingest.is_empty(),
        "broker.ingest needs at least one topic filter",
    );
    out.extend(check_ingest(&b.ingest, loc));
    out.extend(check_broker_tls(b, loc));
    out
}

/// The ingest filters: valid MQTT filters, no captures, none overlapping.
fn check_ingest(ingest: &[String], loc: &Locator) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let o = &mut out;
    for (i, a) in ingest.iter().enumerate() {
        match crate::topic::Pattern::parse(a) {
            Err(e) => o.push(loc.at("broker", "ingest", format!("broker.ingest: {e}"))),
            Ok(_) if a.contains('{') => o.push(loc.at(
                "broker",
                "ingest",
                format!(
                    "broker.ingest: {a:?} is an MQTT filter; captures like {{name}} belong in rules"
                ),
            )),
            Ok(_) => {}
        }
        for other in &ingest[i + 1..] {
            if crate::topic::filters_overlap(a, other) {
                o.push(loc.at(
                    "broker",
                    "ingest",
                    format!(
                        "broker.ingest filters {a:?} and {other:?} overlap: the broker would deliver matching events twice; keep only the wider one"
                    ),
                ));
            }
        }
    }
    out
}

/// The TLS listener's settings go together.
fn check_broker_tls(b: &BrokerConfig, loc: &Locator) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let o = &mut out;
    match (&b.tls_listen, &b.tls_cert, &b.tls_key) {
        (Some(_), Some(_), Some(_)) => {}
        (Some(_), _, _) => o.push(loc.at(
            "broker",
            "tls_listen",
            "broker.tls_listen needs tls_cert and tls_key (PEM files)",
        )),
        (None, _, _) if b.tls_client_ca.is_some() => o.push(loc.at(
            "broker",
            "tls_client_ca",
            "broker.tls_client_ca is used only with tls_listen",
        )),
        (None, None, None) => {}
        (None, _, _) => o.push(loc.at(
            "broker",
            "tls_cert",
            "broker.tls_cert and tls_key are used only with tls_listen; set it, e.g. \"0.0.0.0:8883\"",
        )),
    }
    out
}

fn check_pipeline(file: &ConfigFile, loc: &Locator) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let buffer = file.pipeline.buffer;
    require(
        &mut out,
        loc,
        "pipeline",
        "buffer",
        buffer <= 10_000_000,
        "pipeline.buffer must be at most 10000000 events",
    );
    require(
        &mut out,
        loc,
        "pipeline",
        "buffer",
        buffer > 0,
        "pipeline.buffer must be greater than zero",
    );
    out
}

fn check_queue(q: &QueueConfig, loc: &Locator) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let o = &mut out;
    require(
        o,
        loc,
        "queue",
        "commit_max_events",
        q.commit_max_events <= 1_000_000,
        "queue.commit_max_events must be at most 1000000",
    );
    require(
        o,
        loc,
        "queue",
        "commit_interval",
        q.commit_interval.0 <= Duration::from_secs(60),
        "queue.commit_interval must be at most 60s (it is the power-cut loss window)",
    );
    require(
        o,
        loc,
        "queue",
        "spill_after",
        q.spill_after.is_none_or(|s| s.0 <= Duration::from_secs(60)),
        "queue.spill_after must be at most 60s (with ack = \"received\" it is part of the power-cut loss window)",
    );
    require(
        o,
        loc,
        "queue",
        "memory_max",
        q.memory_max.0 <= 1 << 30,
        "queue.memory_max must be at most 1GiB",
    );
    require(
        o,
        loc,
        "queue",
        "sweep_interval",
        q.sweep_interval.0 >= Duration::from_millis(10),
        "queue.sweep_interval must be at least 10ms",
    );
    require(
        o,
        loc,
        "queue",
        "commit_max_events",
        q.commit_max_events > 0,
        "queue.commit_max_events must be greater than zero",
    );
    out
}

fn check_log(log: &LogConfig, loc: &Locator) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    require(
        &mut out,
        loc,
        "log",
        "summary_interval",
        log.summary_interval.0 >= Duration::from_secs(1),
        "log.summary_interval must be at least 1s",
    );
    for (key, value) in [("level", &log.level), ("broker", &log.broker)] {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(value) {
            out.push(loc.at(
                "log",
                key,
                format!("log.{key} = {value:?} is not a log level or filter ({e}); use error, warn, info, debug, trace or off"),
            ));
        }
    }
    out
}

/// One upstream's values, located in its own table.
fn check_upstream(up_name: &str, up: &UpstreamConfig, loc: &Locator) -> Vec<Diagnostic> {
    let table = format!("upstream.{up_name}");
    let mut out = Vec::new();
    let mut fail = |key: &str, what: String| out.push(loc.at(&table, key, what));
    // The name goes into client ids, metric labels and the summary line.
    if up_name.is_empty() || up_name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        fail(
            "url",
            format!(
                "upstream name {up_name:?}: give the upstream a name without spaces, e.g. [upstream.cloud]"
            ),
        );
    }
    let sources = [
        up.password.is_some(),
        up.password_file.is_some(),
        up.password_env.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() > 1 {
        fail(
            "password",
            format!("upstream.{up_name}: set only one of password, password_file and password_env"),
        );
    } else if sources.iter().any(|s| *s) && up.username.is_none() {
        fail(
            "password",
            format!(
                "upstream.{up_name}: a password needs a username (MQTT sends none without one)"
            ),
        );
    }
    if up.cert_file.is_some() != up.key_file.is_some() {
        fail(
            if up.cert_file.is_some() {
                "cert_file"
            } else {
                "key_file"
            },
            format!("upstream.{up_name}: mutual TLS needs both cert_file and key_file"),
        );
    }
    if !up.url.tls {
        let tls_keys = [
            ("ca_file", up.ca_file.is_some()),
            ("cert_file", up.cert_file.is_some()),
            ("key_file", up.key_file.is_some()),
            ("alpn", !up.alpn.is_empty()),
        ];
        for (key, _) in tls_keys.iter().filter(|(_, set)| *set) {
            fail(
                key,
                format!(
                    "upstream.{up_name}.{key} needs TLS: write the url as mqtts://{}:{}",
                    up.url.host, up.url.port
                ),
            );
        }
    }
    let ranges = [
        ("inflight", up.inflight > 0, "inflight must be at least 1"),
        (
            "keep_alive",
            (Duration::from_secs(1)..=Duration::from_secs(65_535)).contains(&up.keep_alive.0),
            "keep_alive must be between 1s and 65535s",
        ),
        (
            "max_size",
            up.max_size.0 > 0,
            "max_size must be greater than 0",
        ),
        (
            "reconnect_min",
            up.reconnect_min.0 >= Duration::from_millis(10),
            "reconnect_min must be at least 10ms",
        ),
        (
            "max_packet_size",
            (128..=256 << 20).contains(&up.max_packet_size.0),
            "max_packet_size must be between 128 bytes and 256MiB (MQTT's limit)",
        ),
        (
            "reconnect_min",
            up.reconnect_min <= up.reconnect_max,
            "reconnect_min must not exceed reconnect_max",
        ),
    ];
    for (key, ok, what) in ranges {
        if !ok {
            fail(key, format!("upstream.{up_name}.{what}"));
        }
    }
    out
}

/// `subscribe`, `status_topic`, `status_interval` and `control_topic` of an
/// upstream.
fn check_downlink(
    up_name: &str,
    up: &UpstreamConfig,
    gateway: &str,
    id_reported: bool,
    loc: &Locator,
) -> Vec<Diagnostic> {
    let table = format!("upstream.{up_name}");
    let mut out = Vec::new();
    let mut fail = |key: &str, what: String| out.push(loc.at(&table, key, what));
    // Its downlink events would be indistinguishable from local ones.
    if up_name == crate::event::LOCAL_SOURCE && !up.subscribe.is_empty() {
        fail(
            "subscribe",
            format!(
                "an upstream named {up_name:?} cannot subscribe: rules call local events \"local\" (`from`, `meta.source`); give the upstream another name"
            ),
        );
    }
    let wild = gateway.contains(['+', '#', '{', '}']) || gateway.is_empty();
    let mut uses_gateway = false;
    for (i, sub) in up.subscribe.iter().enumerate() {
        let n = i + 1;
        uses_gateway |= sub.filter.contains("{gateway}");
        let filter = sub.expand(gateway);
        // An unusable gateway id is reported once, below.
        let id_at_fault = wild && sub.filter.contains("{gateway}");
        if sub.filter.is_empty() {
            fail(
                "subscribe",
                format!(
                    "upstream.{up_name}.subscribe entry {n} is empty; write a topic filter such as \"gw/{{gateway}}/cmd/#\""
                ),
            );
        } else if !id_at_fault && filter.contains(['{', '}']) {
            fail(
                "subscribe",
                format!(
                    "upstream.{up_name}.subscribe entry {n} ({:?}): only {{gateway}} may be written in braces (rules capture topic levels, subscriptions do not)",
                    sub.filter
                ),
            );
        } else if let (false, Err(e)) = (id_at_fault, crate::topic::Pattern::parse(&filter)) {
            fail(
                "subscribe",
                format!(
                    "upstream.{up_name}.subscribe entry {n} ({:?}): {e}",
                    sub.filter
                ),
            );
        }
        // QoS 2 across reconnects would need rumqttc's packet-id state,
        // which each new connection starts without (a resent PUBREL it does
        // not know ends the connection, again and again); commands are
        // at least once anyway (acknowledged once routed).
        if sub.qos > 1 {
            fail(
                "subscribe",
                format!(
                    "upstream.{up_name}.subscribe entry {n}: qos {} is not supported for commands; use 0 or 1 (a command is acknowledged once routed: at least once)",
                    sub.qos
                ),
            );
        }
    }
    if let Some(t) = &up.status_topic {
        uses_gateway |= t.contains("{gateway}");
        let topic = expand_gateway(t, gateway);
        if t.is_empty() {
            fail(
                "status_topic",
                format!(
                    "upstream.{up_name}.status_topic is empty; write a topic such as \"gw/{{gateway}}/status\", or leave it out"
                ),
            );
        } else if topic.contains(['+', '#', '{', '}']) && !(wild && t.contains("{gateway}")) {
            fail(
                "status_topic",
                format!(
                    "upstream.{up_name}.status_topic {t:?}: a topic to publish on has no wildcards, and only {{gateway}} may be written in braces"
                ),
            );
        }
    }
    if let Some(t) = &up.control_topic {
        uses_gateway |= t.contains("{gateway}");
        let topic = expand_gateway(t, gateway);
        if t.is_empty() {
            fail(
                "control_topic",
                format!(
                    "upstream.{up_name}.control_topic is empty; write a topic such as \"gw/{{gateway}}/control\", or leave it out"
                ),
            );
        } else if topic.contains(['+', '#', '{', '}']) && !(wild && t.contains("{gateway}")) {
            fail(
                "control_topic",
                format!(
                    "upstream.{up_name}.control_topic {t:?}: one topic, no wildcards, and only {{gateway}} may be written in braces"
                ),
            );
        } else if up.status_topic.as_ref() == Some(t)
            || up.status_topic.as_ref() == Some(&format!("{t}/result"))
        {
            fail(
                "control_topic",
                format!(
                    "upstream.{up_name}.control_topic: the status_topic is the control topic or its /result; give each its own topic"
                ),
            );
        } else if let Some(sub) = up.subscribe.iter().find(|s| {
            crate::topic::Pattern::parse(&s.expand(gateway))
                .is_ok_and(|p| p.captures(&topic).is_some())
        }) {
            fail(
                "control_topic",
                format!(
                    "upstream.{up_name}.control_topic {t:?} is also under subscribe filter {:?}: commands would be taken for events too; keep them apart",
                    sub.filter
                ),
            );
        }
    }
    if up.status_interval.0 < Duration::from_secs(1) {
        fail(
            "status_interval",
            format!("upstream.{up_name}.status_interval must be at least 1s"),
        );
    }
    if wild && uses_gateway && !id_reported {
        fail(
            "subscribe",
            format!(
                "the gateway id {gateway:?} cannot stand in for {{gateway}} in a topic: it is empty or holds + # {{ }}; set [gateway] id"
            ),
        );
    }
    out
}

/// Byte span where `key` is set inside the table `[table]`; else the
/// table's header; `None` if the table is not written at all.
fn find_key_in(text: &str, table: &str, key: &str) -> Option<std::ops::Range<usize>> {
    // From toml's own spans: `[ broker ]`, `[broker] # note`,
    // `[upstream."cloud"]` and `broker.max_connections = 0` are all found.
    if let Ok(root) = toml::de::DeTable::parse(text) {
        use toml::de::DeValue;
        let mut here = root.get_ref();
        let mut table_span = None;
        for part in table.split('.') {
            let (_, value) = here.get_key_value(part)?;
            let DeValue::Table(t) = value.get_ref() else {
                return None;
            };
            table_span = Some(value.span());
            here = t;
        }
        return match here.get_key_value(key) {
            Some((k, _)) => Some(k.span()),
            None => table_span,
        };
    }
    let header = format!("[{table}]");
    let mut offset = 0;
    let mut inside = false;
    let mut header_at = None;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            inside = trimmed == header;
            if inside && header_at.is_none() {
                let start = offset + (line.len() - line.trim_start().len());
                header_at = Some(start..start + header.len());
            }
        } else if inside && let Some(found) = find_key(line, key) {
            return Some(offset + found.start..offset + found.end);
        }
        offset += line.len();
    }
    header_at
}

pub(crate) fn find_key(text: &str, key: &str) -> Option<std::ops::Range<usize>> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix(key)
            && rest.trim_start().starts_with('=')
        {
            let start = offset + (line.len() - trimmed.len());
            return Some(start..start + key.len());
        }
        offset += line.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::setup::Config;

    #[test]
    fn the_documented_config_reference_shows_the_real_defaults() {
        let doc = include_str!("../../docs/configuration.md");
        let start = doc.find("```toml\n").unwrap() + "```toml\n".len();
        let block = &doc[start..start + doc[start..].find("```").unwrap()];
        let shown = ConfigFile::parse(block, Path::new("docs/configuration.md"), Path::new("."))
            .unwrap_or_else(|e| panic!("docs/configuration.md's config block: {e}"));
        let default = ConfigFile::parse(DEFAULT_CONFIG, Path::new("d"), Path::new(".")).unwrap();
        let all = |f: &ConfigFile| {
            format!(
                "{:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?}",
                f.gateway,
                f.broker,
                f.rules,
                f.queue.commit_interval,
                f.pipeline,
                f.upstream,
                f.log,
                f.metrics,
                (
                    f.queue.commit_max_events,
                    f.queue.min_free_disk,
                    f.queue.sweep_interval,
                    &f.queue.path
                )
            )
        };
        assert_eq!(all(&shown), all(&default));
    }

    #[test]
    fn the_packaged_config_is_the_default_with_service_paths() {
        let text = include_str!("../../systemd/edgeferry.toml");
        let packaged = ConfigFile::parse(
            text,
            Path::new("edgeferry.toml"),
            Path::new("/etc/edgeferry"),
        )
        .unwrap();
        let default = ConfigFile::parse(DEFAULT_CONFIG, Path::new("d"), Path::new(".")).unwrap();
        assert_eq!(
            packaged.queue.path,
            Path::new("/var/lib/edgeferry/queue.db")
        );
        assert_eq!(packaged.rules.dir, Path::new("/etc/edgeferry/rules"));
        let rest = |f: &ConfigFile| {
            format!(
                "{:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?}",
                f.gateway,
                f.broker,
                f.rules.unmatched,
                f.rules.dead_letter,
                f.rules.watch,
                f.pipeline,
                f.upstream,
                f.log,
                f.metrics
            )
        };
        assert_eq!(rest(&packaged), rest(&default));
        let q = |f: &ConfigFile| {
            format!(
                "{:?} {:?} {:?} {:?}",
                f.queue.commit_interval,
                f.queue.commit_max_events,
                f.queue.min_free_disk,
                f.queue.sweep_interval
            )
        };
        assert_eq!(q(&packaged), q(&default));
    }

    /// A setting wrong in one upstream is located in that upstream's table,
    /// not at the same key in another (`inflight` was found anywhere).
    #[test]
    fn an_upstream_error_points_at_its_own_table() {
        let text = "[upstream.a]\nurl = \"mqtt://a\"\ninflight = 5\nkeep_alive = \"5s\"\n\n[upstream.b]\nurl = \"mqtt://b\"\ninflight = 0\nkeep_alive = \"0s\"\n";
        let err = Config::from_toml(text, Path::new("e.toml"), Path::new(".")).unwrap_err();
        let lines: Vec<(usize, &str)> =
            err.0.iter().map(|d| (d.line, d.message.as_str())).collect();
        assert!(
            lines.contains(&(8, "upstream.b.inflight must be at least 1")),
            "{lines:?}"
        );
        assert!(
            lines.contains(&(9, "upstream.b.keep_alive must be between 1s and 65535s")),
            "{lines:?}"
        );
        // A key that is not written is located at its table's header.
        let text =
            "[gateway]\nid = \"g\"\n\n[upstream.c]\nurl = \"mqtt://c\"\nreconnect_max = \"20ms\"\n";
        let err = Config::from_toml(text, Path::new("e.toml"), Path::new(".")).unwrap_err();
        let d = err
            .0
            .iter()
            .find(|d| d.message.contains("must not exceed reconnect_max"))
            .unwrap_or_else(|| panic!("{err}"));
        assert_eq!(d.line, 4, "at [upstream.c]: {err}");
    }

    #[test]
    fn upstream_urls_parse_with_default_port() {
        let u: UpstreamUrl = "mqtt://example.com".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("example.com", 1883));
        let u: UpstreamUrl = "mqtt://127.0.0.1:1884".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 1884));
        assert!("http://x".parse::<UpstreamUrl>().is_err());
        assert!("mqtt://x:notaport".parse::<UpstreamUrl>().is_err());
    }

    #[test]
    fn values_that_would_panic_or_duplicate_are_config_errors() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[broker]\nmax_connections = 1000000000000\ningest = [\"#\", \"sensors/#\"]\n\
             [pipeline]\nbuffer = 4611686018427387904\n[log]\nsummary_interval = \"0s\"\n\
             [rules]\ndir = \"{}\"\n",
            dir.path().display()
        );
        let Diagnostics(errs) =
            Config::from_toml(&text, Path::new("gw.toml"), dir.path()).unwrap_err();
        let found: Vec<String> = errs.iter().map(|d| d.to_string()).collect();
        for (line, words) in [
            (2, "max_connections"),
            (3, "overlap"),
            (5, "pipeline.buffer"),
            (7, "summary_interval"),
        ] {
            assert!(
                found
                    .iter()
                    .any(|f| f.starts_with(&format!("gw.toml:{line}:")) && f.contains(words)),
                "no error about {words} at line {line}: {found:#?}"
            );
        }
    }

    #[test]
    fn a_table_written_as_an_array_or_a_value_is_a_config_error() {
        for (text, line, what) in [
            (
                "queue = [\"elsewhere.db\"]\n",
                1,
                "queue = array: queue must be a table",
            ),
            ("broker = []\n", 1, "broker = array"),
            (
                "[[broker]]\nlisten = \"127.0.0.1:1\"\n",
                1,
                "[[broker]] (an array of tables)",
            ),
            ("log = 5\n", 1, "log = integer"),
            (
                "[upstream]\ncloud = \"mqtt://h\"\n",
                2,
                "upstream.cloud = string",
            ),
        ] {
            let Err(Diagnostics(errs)) =
                ConfigFile::parse(text, Path::new("gw.toml"), Path::new("."))
            else {
                panic!("{text:?} parsed");
            };
            assert_eq!(errs.len(), 1, "{text:?}: {errs:#?}");
            let shown = errs[0].to_string();
            assert!(
                shown.starts_with(&format!("gw.toml:{line}:")) && shown.contains(what),
                "{text:?}: {shown}"
            );
        }
    }

    #[test]
    fn an_upstream_needs_a_name() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[rules]\ndir = \"{}\"\n[upstream.\"\"]\nurl = \"mqtt://h\"\n",
            dir.path().display()
        );
        let Diagnostics(errs) =
            Config::from_toml(&text, Path::new("gw.toml"), dir.path()).unwrap_err();
        assert!(
            errs.iter()
                .any(|d| d.message.contains("upstream name \"\"")),
            "{errs:#?}"
        );
    }

    #[test]
    fn a_value_error_is_located_however_its_table_is_written() {
        let dir = tempfile::tempdir().unwrap();
        for broker in [
            "[ broker ]\nmax_connections = 0\n",
            "[broker] # the front door\nmax_connections = 0\n",
            "broker.max_connections = 0\n\n",
        ] {
            let text = format!("{broker}[rules]\ndir = \"{}\"\n", dir.path().display());
            let Diagnostics(errs) =
                Config::from_toml(&text, Path::new("gw.toml"), dir.path()).unwrap_err();
            let shown: Vec<String> = errs.iter().map(|d| d.to_string()).collect();
            let want = if broker.starts_with("broker.") {
                "gw.toml:1:"
            } else {
                "gw.toml:2:"
            };
            assert!(
                shown
                    .iter()
                    .any(|d| d.starts_with(want) && d.contains("max_connections")),
                "{broker:?}: {shown:#?}"
            );
        }
        let text = "[upstream.\"cloud\"]\nurl = \"mqtt://h\"\ninflight = 0\n";
        let Diagnostics(errs) =
            Config::from_toml(text, Path::new("gw.toml"), dir.path()).unwrap_err();
        assert!(
            errs.iter()
                .any(|d| d.line == 3 && d.message.contains("inflight")),
            "{errs:#?}"
        );
    }

    #[test]
    fn downlink_keys_are_checked_at_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let check = |gateway: &str, upstream: &str| {
            let text = format!(
                "[gateway]\nid = \"{gateway}\"\n[rules]\ndir = \"{}\"\n[upstream.cloud]\nurl = \"mqtt://h\"\n{upstream}\n",
                dir.path().display()
            );
            match Config::from_toml(&text, Path::new("gw.toml"), dir.path()) {
                Ok(_) => Vec::new(),
                Err(Diagnostics(errs)) => errs.iter().map(|d| d.to_string()).collect(),
            }
        };
        let good = "subscribe = [\"gw/{gateway}/cmd/#\", { filter = \"fleet/+/all\", qos = 0 }]\nstatus_topic = \"gw/{gateway}/status\"\nstatus_interval = \"30s\"";
        assert_eq!(check("g1", good), Vec::<String>::new());
        let errs = check(
            "g1",
            "subscribe = [\"gw/{site}/cmd\", \"a/#/b\", { filter = \"x\", qos = 3 }, \"\"]\nstatus_topic = \"gw/+/status\"\nstatus_interval = \"10ms\"",
        );
        assert_eq!(errs.len(), 6, "{errs:#?}");
        for (e, (line, what)) in errs.iter().zip([
            (7, "only {gateway} may be written in braces"),
            (7, "'#' is only allowed as the last level"),
            (7, "qos 3 is not supported for commands"),
            (7, "entry 4 is empty"),
            (8, "a topic to publish on has no wildcards"),
            (9, "status_interval must be at least 1s"),
        ]) {
            assert!(
                e.starts_with(&format!("gw.toml:{line}:")) && e.contains(what),
                "{e}"
            );
        }
        let errs = check("a+b", "subscribe = [\"gw/{gateway}/cmd\"]");
        assert!(
            errs.len() == 1 && errs[0].contains("gateway.id \"a+b\": use one printable word"),
            "{errs:#?}"
        );
        let errs = check("g1", "control_topic = \"gw/#\"");
        assert!(
            errs.len() == 1
                && errs[0].starts_with("gw.toml:7:")
                && errs[0].contains("no wildcards"),
            "{errs:#?}"
        );
        let errs = check("g1", "status_topic = \"gw/s\"\ncontrol_topic = \"gw/s\"");
        assert!(
            errs.len() == 1
                && errs[0].starts_with("gw.toml:8:")
                && errs[0].contains("the status_topic is the control topic or its /result"),
            "{errs:#?}"
        );
        let errs = check(
            "g1",
            "status_topic = \"gw/c/result\"\ncontrol_topic = \"gw/c\"",
        );
        assert!(
            errs.len() == 1 && errs[0].starts_with("gw.toml:8:"),
            "{errs:#?}"
        );
        let errs = check(
            "g1",
            "subscribe = [\"gw/#\"]\ncontrol_topic = \"gw/{gateway}/control\"",
        );
        assert!(
            errs.len() == 1 && errs[0].contains("is also under subscribe filter \"gw/#\""),
            "{errs:#?}"
        );
        for id in ["a/b", " g", "g\\u0000x", ""] {
            let errs = check(id, "");
            assert!(
                errs.len() == 1
                    && errs[0].starts_with("gw.toml:2:")
                    && errs[0].contains("one printable word"),
                "{id:?}: {errs:#?}"
            );
        }
        let errs = check("g1", "subscribe = [{ filter = \"x\", qs = 1 }]");
        assert!(
            errs.len() == 1 && errs[0].starts_with("gw.toml:7:") && errs[0].contains("qs"),
            "{errs:#?}"
        );
    }

    #[test]
    fn two_listeners_on_one_port_are_a_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let check = |broker: &str, metrics: &str| {
            let text = format!(
                "[broker]\n{broker}\n[metrics]\n{metrics}\n[rules]\ndir = \"{}\"\n",
                dir.path().display()
            );
            match Config::from_toml(&text, Path::new("gw.toml"), dir.path()) {
                Ok(_) => Vec::new(),
                Err(Diagnostics(errs)) => errs.iter().map(|d| d.to_string()).collect(),
            }
        };
        let errs = check(
            "listen = \"127.0.0.1:1883\"\nlisten_v5 = \"0.0.0.0:1883\"",
            "listen = \"127.0.0.1:1883\"",
        );
        assert_eq!(errs.len(), 2, "{errs:#?}");
        assert!(
            errs[0].starts_with("gw.toml:3:")
                && errs[0].contains("broker.listen_v5 (0.0.0.0:1883) and broker.listen"),
            "{errs:#?}"
        );
        assert!(
            errs[1].starts_with("gw.toml:5:") && errs[1].contains("metrics.listen"),
            "{errs:#?}"
        );
        // Other addresses, other ports, or port 0 (any free one): fine.
        assert!(
            check(
                "listen = \"127.0.0.1:1883\"\nlisten_v5 = \"127.0.0.2:1883\"",
                "listen = \"127.0.0.1:9184\""
            )
            .is_empty()
        );
        assert!(check("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:0\"").is_empty());
        assert!(check("listen = \"127.0.0.1:9184\"", "enabled = false").is_empty());
    }

    #[test]
    fn unknown_key_is_reported_with_line_and_column() {
        let text = "[broker]\nlisten = \"127.0.0.1:1883\"\nlisen_v5 = 3\n";
        let err = toml::from_str::<ConfigFile>(text).unwrap_err();
        let d = Diagnostic::from_toml(Path::new("gw.toml"), text, &err);
        assert_eq!((d.line, d.column), (3, 1), "{d}");
        assert!(d.message.contains("lisen_v5"), "{d}");
    }
}
