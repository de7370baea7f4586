//! MQTT on the wire for the front door: which protocol a connection speaks
//! (read from its CONNECT), and the few packet views and rewrites the
//! session needs, over rumqttc's two codecs (`mqttbytes::v4` for 3.1.1,
//! `v5::mqttbytes::v5` for 5). rumqttd's own `protocol` types cannot be
//! used: a `Publish`'s QoS and packet id are private to that crate.
//!
//! Everything else passes through as the codec decoded it, so the session
//! has one code path for both protocols.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

/// The protocol of one connection, from the protocol level of its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V4,
    V5,
}

/// Why a connection's bytes cannot be MQTT we serve; the connection closes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("first packet is not CONNECT")]
    NotConnect,
    #[error("protocol name is not MQTT")]
    NotMqtt,
    #[error("unsupported protocol level {0} (3.1.1 and 5 are served)")]
    Level(u8),
    #[error("CONNECT has its reserved flag set")]
    ReservedFlag,
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("packet of {size} bytes is over the limit of {max}")]
    TooLarge { size: usize, max: usize },
}

/// Which protocol the CONNECT at the start of `buf` asks for; `Ok(None)`
/// until enough bytes are there. Nothing is consumed.
pub fn sniff(buf: &[u8]) -> Result<Option<Version>, WireError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first != 0x10 {
        return Err(WireError::NotConnect);
    }
    // Remaining length: up to four bytes of 7 bits.
    let mut at = 1;
    loop {
        let Some(&b) = buf.get(at) else {
            return Ok(None);
        };
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        if at > 4 {
            return Err(WireError::Malformed("remaining length".into()));
        }
    }
    // Protocol name (2-byte length, "MQTT"), level, connect flags.
    let Some(head) = buf.get(at..at + 8) else {
        return Ok(None);
    };
    if head[..6] != [0, 4, b'M', b'Q', b'T', b'T'] {
        return Err(WireError::NotMqtt);
    }
    // MQTT-3.1.2-3: the reserved flag must be 0, else close.
    if head[7] & 0x01 != 0 {
        return Err(WireError::ReservedFlag);
    }
    match head[6] {
        4 => Ok(Some(Version::V4)),
        5 => Ok(Some(Version::V5)),
        level => Err(WireError::Level(level)),
    }
}

/// A decoded packet of either protocol. Not boxed: a session holds one
/// packet at a time, on its stack, and a box would be an allocation per
/// MQTT 5 packet.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Packet {
    V4(v4::Packet),
    V5(v5::Packet),
}

/// What the session needs to know of a packet.
#[derive(Debug)]
pub enum View<'a> {
    Connect,
    /// Whether the connection was accepted.
    ConnAck(bool),
    Publish(PublishView<'a>),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<&'a str>,
    },
    SubAck(u16),
    Unsubscribe,
    UnsubAck,
    PingReq,
    PingResp,
    Disconnect,
    Auth,
}

/// A PUBLISH as the session sees it.
#[derive(Debug)]
pub struct PublishView<'a> {
    /// Raw topic bytes: not yet checked to be UTF-8 on MQTT 5.
    pub topic: &'a [u8],
    pub qos: u8,
    pub pkid: u16,
    pub payload: &'a Bytes,
    pub retain: bool,
    /// MQTT 5: the publish names a topic alias (edgeferry offers none).
    pub alias: bool,
}

/// The login and identity of a CONNECT.
#[derive(Debug, Clone)]
pub struct ConnectInfo {
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive: u16,
    /// Clean session (3.1.1) or clean start (5): the broker discards an
    /// earlier session of this client id. Without it rumqttd keeps the
    /// session when the connection ends: it goes by this flag alone (MQTT
    /// 5's session expiry only delays the will there).
    pub clean_start: bool,
    /// The will's topic and message, routed when the client goes away
    /// without a DISCONNECT (as the embedded broker publishes it locally).
    pub will: Option<(Vec<u8>, Bytes)>,
}

impl Version {
    /// Decode one packet from the front of `buf`; `Ok(None)` until it is
    /// all there.
    pub fn read(self, buf: &mut BytesMut, max: usize) -> Result<Option<Packet>, WireError> {
        match self {
            Version::V4 => match v4::Packet::read(buf, max) {
                Ok(p) => Ok(Some(Packet::V4(p))),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size)) => {
                    Err(WireError::TooLarge { size, max })
                }
                Err(e) => Err(WireError::Malformed(e.to_string())),
            },
            Version::V5 => match v5::Packet::read(buf, Some(max as u32)) {
                Ok(p) => Ok(Some(Packet::V5(p))),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(rumqttc::v5::mqttbytes::Error::PayloadSizeLimitExceeded {
                    pkt_size, ..
                }) => Err(WireError::TooLarge {
                    size: pkt_size,
                    max,
                }),
                Err(e) => Err(WireError::Malformed(e.to_string())),
            },
        }
    }

    pub fn puback(self, pkid: u16, refused: Option<Refusal>) -> Packet {
        match self {
            Version::V4 => Packet::V4(v4::Packet::PubAck(v4::PubAck::new(pkid))),
            Version::V5 => {
                let mut ack = v5::PubAck::new(pkid, None);
                ack.reason = match refused {
                    None => v5::PubAckReason::Success,
                    Some(Refusal::NotAuthorized) => v5::PubAckReason::NotAuthorized,
                    Some(Refusal::TopicInvalid) => v5::PubAckReason::TopicNameInvalid,
                    Some(Refusal::TooLarge) => v5::PubAckReason::QuotaExceeded,
                };
                Packet::V5(v5::Packet::PubAck(ack))
            }
        }
    }

    pub fn pubrec(self, pkid: u16, refused: Option<Refusal>) -> Packet {
        match self {
            Version::V4 => Packet::V4(v4::Packet::PubRec(v4::PubRec::new(pkid))),
            Version::V5 => {
                let mut rec = v5::PubRec::new(pkid, None);
                rec.reason = match refused {
                    None => v5::PubRecReason::Success,
                    Some(Refusal::NotAuthorized) => v5::PubRecReason::NotAuthorized,
                    Some(Refusal::TopicInvalid) => v5::PubRecReason::TopicNameInvalid,
                    Some(Refusal::TooLarge) => v5::PubRecReason::QuotaExceeded,
                };
                Packet::V5(v5::Packet::PubRec(rec))
            }
        }
    }

    pub fn pubrel(self, pkid: u16) -> Packet {
        match self {
            Version::V4 => Packet::V4(v4::Packet::PubRel(v4::PubRel::new(pkid))),
            Version::V5 => Packet::V5(v5::Packet::PubRel(v5::PubRel::new(pkid, None))),
        }
    }

    pub fn pubcomp(self, pkid: u16) -> Packet {
        match self {
            Version::V4 => Packet::V4(v4::Packet::PubComp(v4::PubComp::new(pkid))),
            Version::V5 => Packet::V5(v5::Packet::PubComp(v5::PubComp::new(pkid, None))),
        }
    }

    pub fn pingreq(self) -> Packet {
        match self {
            Version::V4 => Packet::V4(v4::Packet::PingReq),
            Version::V5 => Packet::V5(v5::Packet::PingReq(v5::PingReq)),
        }
    }

    pub fn pingresp(self) -> Packet {
        match self {
            Version::V4 => Packet::V4(v4::Packet::PingResp),
            Version::V5 => Packet::V5(v5::Packet::PingResp(v5::PingResp)),
        }
    }

    /// A SUBACK refusing all `n` filters (none was allowed).
    pub fn suback_refused(self, pkid: u16, n: usize) -> Packet {
        match self {
            Version::V4 => Packet::V4(v4::Packet::SubAck(v4::SubAck::new(
                pkid,
                vec![v4::SubscribeReasonCode::Failure; n],
            ))),
            Version::V5 => Packet::V5(v5::Packet::SubAck(v5::SubAck {
                pkid,
                return_codes: vec![v5::SubscribeReasonCode::NotAuthorized; n],
                properties: None,
            })),
        }
    }

    /// A CONNACK refusing the connection.
    pub fn connack_refused(self, why: ConnectRefusal) -> Packet {
        use ConnectRefusal::*;
        match self {
            Version::V4 => Packet::V4(v4::Packet::ConnAck(v4::ConnAck {
                session_present: false,
                code: match why {
                    Login => v4::ConnectReturnCode::BadUserNamePassword,
                    ClientId => v4::ConnectReturnCode::BadClientId,
                    Unavailable => v4::ConnectReturnCode::ServiceUnavailable,
                },
            })),
            Version::V5 => Packet::V5(v5::Packet::ConnAck(v5::ConnAck {
                session_present: false,
                code: match why {
                    Login => v5::ConnectReturnCode::BadUserNamePassword,
                    ClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
                    Unavailable => v5::ConnectReturnCode::ServerUnavailable,
                },
                properties: None,
            })),
        }
    }
}

/// Why the front door refused a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRefusal {
    /// Unknown user or wrong password.
    Login,
    /// A client id the embedded broker cannot take (`+ # / $`) or one of
    /// edgeferry's own.
    ClientId,
    /// The embedded broker did not answer.
    Unavailable,
}

/// Why the front door refused a publish (MQTT 5 says so in the PUBACK).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotAuthorized,
    TopicInvalid,
    /// The payload is over `broker.max_payload` (0x97 "quota exceeded":
    /// Mosquitto answers 0x95, which MQTT 5 does not allow in a PUBACK).
    TooLarge,
}

impl Packet {
    pub fn view(&self) -> View<'_> {
        match self {
            Packet::V4(p) => match p {
                v4::Packet::Connect(_) => View::Connect,
                v4::Packet::ConnAck(c) => View::ConnAck(c.code == v4::ConnectReturnCode::Success),
                v4::Packet::Publish(p) => View::Publish(PublishView {
                    topic: p.topic.as_bytes(),
                    qos: p.qos as u8,
                    pkid: p.pkid,
                    payload: &p.payload,
                    retain: p.retain,
                    alias: false,
                }),
                v4::Packet::PubAck(a) => View::PubAck(a.pkid),
                v4::Packet::PubRec(a) => View::PubRec(a.pkid),
                v4::Packet::PubRel(a) => View::PubRel(a.pkid),
                v4::Packet::PubComp(a) => View::PubComp(a.pkid),
                v4::Packet::Subscribe(s) => View::Subscribe {
                    pkid: s.pkid,
                    filters: s.filters.iter().map(|f| f.path.as_str()).collect(),
                },
                v4::Packet::SubAck(a) => View::SubAck(a.pkid),
                v4::Packet::Unsubscribe(_) => View::Unsubscribe,
                v4::Packet::UnsubAck(_) => View::UnsubAck,
                v4::Packet::PingReq => View::PingReq,
                v4::Packet::PingResp => View::PingResp,
                v4::Packet::Disconnect => View::Disconnect,
            },
            Packet::V5(p) => match p {
                v5::Packet::Connect(..) => View::Connect,
                v5::Packet::ConnAck(c) => View::ConnAck(c.code == v5::ConnectReturnCode::Success),
                v5::Packet::Publish(p) => View::Publish(PublishView {
                    topic: &p.topic,
                    qos: p.qos as u8,
                    pkid: p.pkid,
                    payload: &p.payload,
                    retain: p.retain,
                    alias: p
                        .properties
                        .as_ref()
                        .is_some_and(|p| p.topic_alias.is_some()),
                }),
                v5::Packet::PubAck(a) => View::PubAck(a.pkid),
                v5::Packet::PubRec(a) => View::PubRec(a.pkid),
                v5::Packet::PubRel(a) => View::PubRel(a.pkid),
                v5::Packet::PubComp(a) => View::PubComp(a.pkid),
                v5::Packet::Subscribe(s) => View::Subscribe {
                    pkid: s.pkid,
                    filters: s.filters.iter().map(|f| f.path.as_str()).collect(),
                },
                v5::Packet::SubAck(a) => View::SubAck(a.pkid),
                v5::Packet::Unsubscribe(_) => View::Unsubscribe,
                v5::Packet::UnsubAck(_) => View::UnsubAck,
                v5::Packet::PingReq(_) => View::PingReq,
                v5::Packet::PingResp(_) => View::PingResp,
                v5::Packet::Disconnect(_) => View::Disconnect,
                v5::Packet::Auth(_) => View::Auth,
            },
        }
    }

    /// The identity and login of a CONNECT.
    pub fn connect_info(&self) -> Option<ConnectInfo> {
        match self {
            Packet::V4(v4::Packet::Connect(c)) => Some(ConnectInfo {
                client_id: c.client_id.clone(),
                username: c.login.as_ref().map(|l| l.username.clone()),
                password: c.login.as_ref().map(|l| l.password.clone()),
                keep_alive: c.keep_alive,
                clean_start: c.clean_session,
                will: c
                    .last_will
                    .as_ref()
                    .map(|w| (w.topic.as_bytes().to_vec(), w.message.clone())),
            }),
            Packet::V5(v5::Packet::Connect(c, will, login)) => Some(ConnectInfo {
                client_id: c.client_id.clone(),
                username: login.as_ref().map(|l| l.username.clone()),
                password: login.as_ref().map(|l| l.password.clone()),
                keep_alive: c.keep_alive,
                clean_start: c.clean_start,
                will: will.as_ref().map(|w| (w.topic.to_vec(), w.message.clone())),
            }),
            _ => None,
        }
    }

    /// The CONNECT as the embedded broker gets it: the front door's own
    /// login (the internal listener admits nobody else) and a keep-alive
    /// of the front door's (it answers the client's pings itself). The
    /// client id, clean session and will stay the client's.
    pub fn connect_for_broker(&mut self, user: &str, secret: &str, keep_alive: u16) {
        match self {
            Packet::V4(v4::Packet::Connect(c)) => {
                c.login = Some(v4::Login::new(user, secret));
                c.keep_alive = keep_alive;
            }
            Packet::V5(v5::Packet::Connect(c, _, login)) => {
                *login = Some(v5::Login::new(user, secret));
                c.keep_alive = keep_alive;
            }
            _ => {}
        }
    }

    /// MQTT 5: drop a publish's properties before it enters the embedded
    /// broker. rumqttd 0.20 panics (`unreachable!` in its 3.1.1 encoder)
    /// when it forwards a publish with properties to a 3.1.1 subscriber,
    /// and then refuses every 3.1.1 client until restart; without
    /// properties in the broker that cannot happen.
    pub fn strip_properties(&mut self) {
        if let Packet::V5(v5::Packet::Publish(p)) = self {
            p.properties = None;
        }
        if let Packet::V5(v5::Packet::Connect(_, Some(will), _)) = self {
            will.properties = None;
        }
    }

    /// MQTT 5: the CONNACK tells the client how many publishes it may have
    /// in flight (the front door's window) and that it offers no topic
    /// aliases.
    pub fn limit_connack(&mut self, receive_max: u16) {
        if let Packet::V5(v5::Packet::ConnAck(c)) = self {
            let props = c.properties.get_or_insert_with(|| v5::ConnAckProperties {
                session_expiry_interval: None,
                receive_max: None,
                max_qos: None,
                retain_available: None,
                max_packet_size: None,
                assigned_client_identifier: None,
                topic_alias_max: None,
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: None,
                subscription_identifiers_available: None,
                shared_subscription_available: None,
                server_keep_alive: None,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            });
            props.receive_max = Some(receive_max);
            props.topic_alias_max = None;
        }
    }

    /// Give a PUBLISH another packet id (the front door numbers what it
    /// forwards to the embedded broker itself).
    pub fn set_pkid(&mut self, pkid: u16) {
        match self {
            Packet::V4(v4::Packet::Publish(p)) => p.pkid = pkid,
            Packet::V5(v5::Packet::Publish(p)) => p.pkid = pkid,
            _ => {}
        }
    }

    /// Keep only the filters of a SUBSCRIBE where `keep` is true.
    pub fn retain_filters(&mut self, keep: &[bool]) {
        let mut i = 0;
        match self {
            Packet::V4(v4::Packet::Subscribe(s)) => s.filters.retain(|_| {
                i += 1;
                keep.get(i - 1).copied().unwrap_or(false)
            }),
            Packet::V5(v5::Packet::Subscribe(s)) => s.filters.retain(|_| {
                i += 1;
                keep.get(i - 1).copied().unwrap_or(false)
            }),
            _ => {}
        }
    }

    /// Put refusals back into a SUBACK for the filters the front door took
    /// out of its SUBSCRIBE (`kept[i]` false), in the client's order.
    pub fn refuse_in_suback(&mut self, kept: &[bool]) {
        fn merge<C: Clone>(codes: &mut Vec<C>, kept: &[bool], refused: C) {
            let mut granted = std::mem::take(codes).into_iter();
            *codes = kept
                .iter()
                .map(|&k| match k {
                    true => granted.next().unwrap_or_else(|| refused.clone()),
                    false => refused.clone(),
                })
                .collect();
        }
        match self {
            Packet::V4(v4::Packet::SubAck(a)) => {
                merge(&mut a.return_codes, kept, v4::SubscribeReasonCode::Failure)
            }
            Packet::V5(v5::Packet::SubAck(a)) => merge(
                &mut a.return_codes,
                kept,
                v5::SubscribeReasonCode::NotAuthorized,
            ),
            _ => {}
        }
    }

    /// Encode onto `buf`.
    pub fn write(&self, buf: &mut BytesMut) -> Result<(), WireError> {
        let r = match self {
            Packet::V4(p) => p
                .write(buf, usize::MAX)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Packet::V5(p) => p.write(buf, None).map(|_| ()).map_err(|e| e.to_string()),
        };
        r.map_err(WireError::Malformed)
    }
}

/// Whether a topic name may enter the pipeline: UTF-8, not empty, no
/// wildcards, and none of what MQTT forbids (U+0000) or says to avoid
/// (control characters U+0001..U+001F and U+007F..U+009F, non-characters
/// such as U+FFFF and U+FDD0..U+FDEF). An upstream broker may drop the
/// connection on any of them, and one such row would then block its queue.
pub fn valid_topic(topic: &[u8]) -> Option<&str> {
    let topic = std::str::from_utf8(topic).ok()?;
    let bad = |c: char| {
        c.is_control()
            || c == '+'
            || c == '#'
            || ('\u{FDD0}'..='\u{FDEF}').contains(&c)
            || (c as u32 & 0xFFFE) == 0xFFFE
    };
    (!topic.is_empty() && !topic.chars().any(bad)).then_some(topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(level: u8, flags: u8) -> Vec<u8> {
        vec![0x10, 10, 0, 4, b'M', b'Q', b'T', b'T', level, flags, 0, 60]
    }

    #[test]
    fn the_protocol_is_read_from_the_connect() {
        assert_eq!(sniff(&connect(4, 2)), Ok(Some(Version::V4)));
        assert_eq!(sniff(&connect(5, 2)), Ok(Some(Version::V5)));
        assert_eq!(sniff(&connect(3, 2)), Err(WireError::Level(3)));
        assert_eq!(sniff(&connect(6, 2)), Err(WireError::Level(6)));
        assert_eq!(sniff(&connect(4, 3)), Err(WireError::ReservedFlag));
        assert_eq!(sniff(&[0x30, 1, 0]), Err(WireError::NotConnect));
        for n in 0..8 {
            assert_eq!(sniff(&connect(4, 2)[..n]), Ok(None), "{n} bytes");
        }
        assert!(sniff(&[0x10, 0x80, 0x80, 0x80, 0x80, 0x01]).is_err());
    }

    #[test]
    fn topics_the_spec_forbids_or_discourages_are_refused() {
        assert_eq!(valid_topic(b"sensors/a/t"), Some("sensors/a/t"));
        assert_eq!(
            valid_topic("caf\u{e9}/\u{4e2d}".as_bytes()),
            Some("caf\u{e9}/\u{4e2d}")
        );
        for bad in [
            "",
            "a\u{0}b",
            "a\u{1}",
            "a\u{1f}",
            "a\u{7f}",
            "a\u{80}",
            "a\u{9f}",
            "a\u{fdd0}",
            "a\u{fdef}",
            "a\u{fffe}",
            "a\u{ffff}",
            "a\u{1fffe}",
            "a\u{10ffff}",
            "a/+",
            "a/#",
        ] {
            assert_eq!(valid_topic(bad.as_bytes()), None, "{bad:?}");
        }
        assert_eq!(valid_topic(&[b'a', 0xff]), None, "not UTF-8");
    }

    #[test]
    fn refused_filters_are_put_back_in_client_order() {
        let mut p = Packet::V4(v4::Packet::SubAck(v4::SubAck::new(
            1,
            vec![
                v4::SubscribeReasonCode::Success(rumqttc::mqttbytes::QoS::AtLeastOnce),
                v4::SubscribeReasonCode::Success(rumqttc::mqttbytes::QoS::AtMostOnce),
            ],
        )));
        p.refuse_in_suback(&[false, true, false, true]);
        let Packet::V4(v4::Packet::SubAck(a)) = p else {
            unreachable!()
        };
        use v4::SubscribeReasonCode::*;
        assert_eq!(
            a.return_codes,
            vec![
                Failure,
                Success(rumqttc::mqttbytes::QoS::AtLeastOnce),
                Failure,
                Success(rumqttc::mqttbytes::QoS::AtMostOnce)
            ]
        );
    }
}
