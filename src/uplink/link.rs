//! One MQTT connection to an upstream, over MQTT 3.1.1 or 5 (rumqttc's two
//! clients), reduced to what a session needs: connected, publish written
//! (its packet id), publish acknowledged (with MQTT 5's reason), failed.
//!
//! `EventLoop::poll` is not cancel-safe: dropped mid-write (as a `select!`
//! branch would), it loses the packet it was writing after assigning its
//! pkid. So it runs in its own task, never cancelled, and events reach the
//! session over a channel. The task ends after forwarding an error, or when
//! the session drops the receiver. So a link is two halves: `Link` sends
//! (the session owns it, behind the `Wire` trait) and `Events` receives
//! (the driver selects on it).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use rumqttc::QoS;
use tokio::sync::mpsc;

use super::UplinkSettings;
use super::failure::FailureKind;
use super::packet::Publish;
use super::session::Wire;
use crate::config::Protocol;

/// The poller task for either rumqttc event loop (same code, different
/// types, no shared trait): stamp each packet from the broker as it is
/// read, forward the mapped event, end after forwarding an error or when
/// the session drops the receiver.
macro_rules! spawn_poller {
    ($eventloop:expr, $incoming:expr, $map:expr, $map_err:expr, $tx:expr, $stamp:expr) => {{
        let (mut eventloop, tx, stamp) = ($eventloop, $tx, $stamp);
        tokio::spawn(async move {
            loop {
                let polled = eventloop.poll().await;
                if polled.as_ref().is_ok_and($incoming) {
                    stamp();
                }
                let polled = polled.map($map).map_err($map_err);
                let failed = polled.is_err();
                if tx.send(polled).await.is_err() || failed {
                    return;
                }
            }
        });
    }};
}

/// Commands an MQTT 5 broker may send before the first is acknowledged.
const DOWNLINK_WINDOW: u16 = 64;

/// How long an MQTT 5 session is kept by the broker after a disconnect:
/// its downlink subscriptions and the QoS 1 commands that came while the
/// gateway was away (dropped after this long), and `session_present`.
const SESSION_EXPIRY_SECS: u32 = 24 * 3600;

/// What happened on the connection.
#[derive(Debug)]
pub enum LinkEvent {
    /// CONNACK accepted; `receive_max` is the MQTT 5 server's limit on
    /// unacknowledged QoS 1 publishes, if it set one.
    Connected {
        session_present: bool,
        receive_max: Option<u16>,
    },
    /// A publish went out with this packet id (0 for QoS 0).
    Written(u16),
    /// A PUBACK. `refused`: an MQTT 5 reason code other than success.
    Acked { pkid: u16, refused: Option<Refusal> },
    /// A publish on one of the downlink subscriptions; `ack` is what
    /// acknowledging it takes (QoS 1 and 2: acknowledged by edgeferry,
    /// once the event is routed, not by rumqttc when it is read).
    Received {
        topic: String,
        payload: bytes::Bytes,
        retain: bool,
        ack: Option<Box<AckHandle>>,
    },
    /// The SUBACK of the downlink subscriptions: how many filters the
    /// broker granted, and refused (not authorised, invalid, no wildcards).
    Subscribed { granted: usize, refused: usize },
    /// Our DISCONNECT went out.
    Disconnected,
    /// Anything else (pings, ...); liveness is stamped by the poller.
    Other,
}

/// A received QoS 1 or 2 publish, kept until it may be acknowledged.
#[derive(Debug, Clone)]
pub enum AckHandle {
    V4(rumqttc::Publish),
    V5(rumqttc::v5::mqttbytes::v5::Publish),
}

/// An MQTT 5 PUBACK reason code that is not a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    /// The broker will never take this event (not authorised, bad topic or
    /// payload): dead-letter it. Otherwise (quota, unspecified) try again
    /// later.
    pub permanent: bool,
}

/// Why the connection failed: a kind when the error itself says (TLS, a
/// refused CONNECT); else the session decides from whether it had connected.
#[derive(Debug)]
pub struct LinkError {
    pub kind: Option<FailureKind>,
    pub reason: String,
}

enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// The sending half of a connection attempt in progress or a live
/// connection.
pub struct Link {
    client: Client,
}

/// The receiving half: what happened on the connection, and when the
/// broker was last heard.
pub struct Events {
    pub rx: mpsc::Receiver<Result<LinkEvent, LinkError>>,
    /// When the link was opened, and ms after that when the poller last
    /// read a packet from the broker: stamped as it arrives, not when the
    /// session gets round to the event, so a busy session does not mistake
    /// a live link for a dead one.
    opened: tokio::time::Instant,
    heard_ms: Arc<AtomicU64>,
}

impl Link {
    /// Start connecting; the first event is `Connected` or an error.
    /// `fresh`: a clean session this once (the broker drops what it
    /// queued for the gateway).
    pub fn open(settings: &UplinkSettings, capacity: usize, fresh: bool) -> (Link, Events) {
        let up = &settings.upstream;
        let max_packet = up.max_packet_size.as_usize();
        let password = settings.password.as_ref().map_or("", |p| p.expose());
        let transport = settings.tls.as_ref().map(transport);
        let (tx, rx) = mpsc::channel(capacity);
        let opened = tokio::time::Instant::now();
        let heard_ms = Arc::new(AtomicU64::new(0));
        let heard = heard_ms.clone();
        let stamp = move || heard.store(opened.elapsed().as_millis() as u64, Relaxed);
        let client = match up.protocol {
            Protocol::V311 => {
                let mut opts =
                    rumqttc::MqttOptions::new(&settings.client_id, &up.url.host, up.url.port);
                opts.set_manual_acks(!settings.subscriptions.is_empty())
                    .set_clean_session(fresh)
                    .set_keep_alive(up.keep_alive.0)
                    .set_inflight(up.inflight)
                    .set_max_packet_size(max_packet, max_packet)
                    .set_request_channel_capacity(capacity);
                if let Some(user) = &up.username {
                    opts.set_credentials(user, password);
                }
                if let Some(t) = transport {
                    opts.set_transport(t);
                }
                if let Some(s) = &settings.status {
                    let will = s.will();
                    opts.set_last_will(rumqttc::LastWill::new(
                        &s.topic,
                        will,
                        QoS::AtLeastOnce,
                        true,
                    ));
                }
                let (client, eventloop) = rumqttc::AsyncClient::new(opts, capacity);
                let incoming = |e: &rumqttc::Event| matches!(e, rumqttc::Event::Incoming(_));
                spawn_poller!(eventloop, incoming, v4_event, v4_error, tx, stamp);
                Client::V4(client)
            }
            Protocol::V5 => {
                use rumqttc::v5;
                let mut opts = v5::MqttOptions::new(&settings.client_id, &up.url.host, up.url.port);
                opts.set_manual_acks(!settings.subscriptions.is_empty())
                    // Commands unacknowledged at once, at most: the broker
                    // holds the rest (bounded memory while routing waits).
                    .set_receive_maximum(Some(DOWNLINK_WINDOW))
                    .set_clean_start(fresh)
                    .set_keep_alive(up.keep_alive.0)
                    .set_session_expiry_interval(Some(SESSION_EXPIRY_SECS))
                    .set_outgoing_inflight_upper_limit(up.inflight)
                    .set_max_packet_size(Some(max_packet as u32))
                    .set_request_channel_capacity(capacity);
                if let Some(user) = &up.username {
                    opts.set_credentials(user, password);
                }
                if let Some(t) = transport {
                    opts.set_transport(t);
                }
                if let Some(s) = &settings.status {
                    opts.set_last_will(v5::mqttbytes::v5::LastWill::new(
                        &s.topic,
                        s.will(),
                        v5::mqttbytes::QoS::AtLeastOnce,
                        true,
                        None,
                    ));
                }
                let (client, eventloop) = v5::AsyncClient::new(opts, capacity);
                let incoming = |e: &v5::Event| matches!(e, v5::Event::Incoming(_));
                spawn_poller!(eventloop, incoming, v5_event, v5_error, tx, stamp);
                Client::V5(client)
            }
        };
        let events = Events {
            rx,
            opened,
            heard_ms,
        };
        (Link { client }, events)
    }

    /// Subscribe to the downlink filters (filter, QoS). On MQTT 5 with
    /// No Local, so the broker never sends back what edgeferry published.
    pub fn subscribe(&self, filters: &[(String, u8)]) -> Result<(), String> {
        if filters.is_empty() {
            return Ok(());
        }
        match &self.client {
            Client::V4(c) => {
                let qos = |q: u8| match q {
                    0 => QoS::AtMostOnce,
                    1 => QoS::AtLeastOnce,
                    _ => QoS::ExactlyOnce,
                };
                c.try_subscribe_many(
                    filters
                        .iter()
                        .map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), qos(*q))),
                )
                .map_err(|e| e.to_string())
            }
            Client::V5(c) => {
                use rumqttc::v5::mqttbytes::{
                    self,
                    v5::{Filter, RetainForwardRule},
                };
                let qos = |q: u8| mqttbytes::qos(q.min(2)).unwrap_or(mqttbytes::QoS::AtLeastOnce);
                // (2 is the largest valid QoS, so `qos` never fails here.)
                c.try_subscribe_many(filters.iter().map(|(f, q)| {
                    let mut filter = Filter::new(f.clone(), qos(*q));
                    filter.nolocal = true;
                    // Retained messages only for a new subscription, so a
                    // resumed session does not repeat a retained command.
                    filter.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
                    filter
                }))
                .map_err(|e| e.to_string())
            }
        }
    }

    pub fn try_disconnect(&self) {
        // Fails only if the event loop is gone: nothing to close then.
        match &self.client {
            Client::V4(c) => drop(c.try_disconnect()),
            Client::V5(c) => drop(c.try_disconnect()),
        }
    }
}

impl Wire for Link {
    /// Acknowledge a downlink publish; false if the event loop has no
    /// room now (try again later) or is gone.
    fn ack(&self, h: &AckHandle) -> bool {
        match (&self.client, h) {
            (Client::V4(c), AckHandle::V4(p)) => c.try_ack(p).is_ok(),
            (Client::V5(c), AckHandle::V5(p)) => c.try_ack(p).is_ok(),
            // A handle of the other protocol cannot come from this link.
            _ => true,
        }
    }

    /// Hand a publish to the event loop (never waits: the channel has room
    /// for the whole window).
    fn publish(&self, p: Publish<'_>) -> Result<(), String> {
        match &self.client {
            Client::V4(c) => c
                .try_publish(p.topic, p.qos, p.retain, p.payload)
                .map_err(|e| e.to_string()),
            Client::V5(c) => {
                // The gateway's own status messages are no events: no id.
                let mut user_properties = Vec::new();
                if !p.event_id.is_empty() {
                    user_properties.push(("event_id".to_string(), p.event_id));
                }
                if let Some(name) = p.replay_marker {
                    user_properties.push((name.to_string(), "true".to_string()));
                }
                let mut content_type = None;
                if let Some(own) = &p.properties {
                    user_properties.extend(own.user.iter().cloned());
                    content_type = own.content_type.clone();
                }
                let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                    message_expiry_interval: p.expiry_secs,
                    user_properties,
                    content_type,
                    ..Default::default()
                };
                let qos = match p.qos {
                    QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                    _ => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                };
                c.try_publish_with_properties(p.topic, qos, p.retain, p.payload, props)
                    .map_err(|e| e.to_string())
            }
        }
    }
}

impl Events {
    /// When a packet from the broker last arrived (the open, before any).
    pub fn last_heard(&self) -> tokio::time::Instant {
        self.opened + Duration::from_millis(self.heard_ms.load(Relaxed))
    }

    /// Wait (at most `limit`) until the DISCONNECT is written.
    pub async fn closed(&mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            while let Some(Ok(ev)) = self.rx.recv().await {
                if matches!(ev, LinkEvent::Disconnected) {
                    return;
                }
            }
        })
        .await;
    }
}

fn v4_event(ev: rumqttc::Event) -> LinkEvent {
    use rumqttc::{Event, Incoming, Outgoing};
    match ev {
        Event::Incoming(Incoming::ConnAck(ack)) => LinkEvent::Connected {
            session_present: ack.session_present,
            receive_max: None,
        },
        Event::Outgoing(Outgoing::Publish(pkid)) => LinkEvent::Written(pkid),
        Event::Incoming(Incoming::PubAck(ack)) => LinkEvent::Acked {
            pkid: ack.pkid,
            refused: None,
        },
        Event::Incoming(Incoming::Publish(p)) => LinkEvent::Received {
            ack: (p.qos != QoS::AtMostOnce).then(|| {
                // Only the packet id and QoS are needed to acknowledge it.
                let mut a = rumqttc::Publish::new("", p.qos, Vec::new());
                a.pkid = p.pkid;
                Box::new(AckHandle::V4(a))
            }),
            retain: p.retain,
            topic: p.topic,
            payload: p.payload,
        },
        Event::Incoming(Incoming::SubAck(ack)) => {
            let codes = &ack.return_codes;
            let refused = codes
                .iter()
                .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                .count();
            LinkEvent::Subscribed {
                granted: codes.len() - refused,
                refused,
            }
        }
        Event::Outgoing(Outgoing::Disconnect) => LinkEvent::Disconnected,
        _ => LinkEvent::Other,
    }
}

fn v4_error(e: rumqttc::ConnectionError) -> LinkError {
    use rumqttc::ConnectionError as E;
    let reason = e.to_string();
    let kind = match &e {
        #[cfg(feature = "tls")]
        E::Tls(_) => Some(FailureKind::Tls),
        E::ConnectionRefused(_) => Some(FailureKind::Refused),
        _ => tls_alert(&reason),
    };
    LinkError { kind, reason }
}

fn v5_event(ev: rumqttc::v5::Event) -> LinkEvent {
    use rumqttc::Outgoing;
    use rumqttc::v5::Event;
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
    match ev {
        Event::Incoming(Packet::ConnAck(ack)) => LinkEvent::Connected {
            session_present: ack.session_present,
            receive_max: ack.properties.and_then(|p| p.receive_max),
        },
        Event::Outgoing(Outgoing::Publish(pkid)) => LinkEvent::Written(pkid),
        Event::Incoming(Packet::PubAck(ack)) => {
            let refused = match ack.reason {
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                PubAckReason::NotAuthorized => Some(("not_authorized", true)),
                PubAckReason::TopicNameInvalid => Some(("topic_name_invalid", true)),
                PubAckReason::PayloadFormatInvalid => Some(("payload_format_invalid", true)),
                PubAckReason::QuotaExceeded => Some(("quota_exceeded", false)),
                PubAckReason::PacketIdentifierInUse => Some(("packet_identifier_in_use", false)),
                PubAckReason::ImplementationSpecificError => {
                    Some(("implementation_specific_error", false))
                }
                PubAckReason::UnspecifiedError => Some(("unspecified_error", false)),
            };
            LinkEvent::Acked {
                pkid: ack.pkid,
                refused: refused.map(|(reason, permanent)| Refusal { reason, permanent }),
            }
        }
        Event::Incoming(Packet::Publish(p)) => LinkEvent::Received {
            ack: (p.qos != rumqttc::v5::mqttbytes::QoS::AtMostOnce).then(|| {
                let mut a = rumqttc::v5::mqttbytes::v5::Publish::new("", p.qos, Vec::new(), None);
                a.pkid = p.pkid;
                Box::new(AckHandle::V5(a))
            }),
            retain: p.retain,
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload,
        },
        Event::Incoming(Packet::SubAck(ack)) => {
            let codes = &ack.return_codes;
            let refused = codes
                .iter()
                .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                .count();
            LinkEvent::Subscribed {
                granted: codes.len() - refused,
                refused,
            }
        }
        Event::Outgoing(Outgoing::Disconnect) => LinkEvent::Disconnected,
        _ => LinkEvent::Other,
    }
}

fn v5_error(e: rumqttc::v5::ConnectionError) -> LinkError {
    use rumqttc::v5::ConnectionError as E;
    let reason = e.to_string();
    let kind = match &e {
        #[cfg(feature = "tls")]
        E::Tls(_) => Some(FailureKind::Tls),
        E::ConnectionRefused(_) => Some(FailureKind::Refused),
        _ => tls_alert(&reason),
    };
    LinkError { kind, reason }
}

/// A TLS alert that surfaces after the handshake (TLS 1.3 servers refuse a
/// missing client certificate on the first read), which rumqttc reports as
/// a read error.
fn tls_alert(reason: &str) -> Option<FailureKind> {
    reason
        .contains("received fatal alert")
        .then_some(FailureKind::Tls)
}

#[cfg(feature = "tls")]
fn transport(tls: &std::sync::Arc<crate::tls::ClientConfig>) -> rumqttc::Transport {
    rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone()))
}

#[cfg(not(feature = "tls"))]
fn transport(tls: &std::sync::Arc<crate::tls::ClientConfig>) -> rumqttc::Transport {
    match **tls {}
}
