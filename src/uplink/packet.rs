//! A queued row made ready for the wire: its QoS, the MQTT 5 properties
//! (event id, expiry, replay marker), the 3.1.1 replay marker in the
//! payload, and the check that the upstream can take it at all.

use rumqttc::QoS;

use crate::codec;
use crate::config::{Protocol, UpstreamConfig};
use crate::queue::{Properties, Row};

/// One publish, ready to hand to the link.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Publish<'a> {
    pub topic: String,
    pub qos: QoS,
    pub payload: bytes::Bytes,
    /// MQTT 5: sent as the `event_id` user property.
    pub event_id: String,
    /// MQTT 5: message expiry, from the route's TTL.
    pub expiry_secs: Option<u32>,
    /// MQTT 5: a user property `<name>` = "true" marking a replayed event.
    pub replay_marker: Option<&'a str>,
    /// Only the gateway's status messages are retained; events never are.
    pub retain: bool,
    /// MQTT 5: the row's own properties (a CloudEvent's attributes and
    /// content type).
    pub properties: Option<std::sync::Arc<Properties>>,
}

impl Publish<'_> {
    /// The gateway's own message (status, a control result): QoS 1, no
    /// event id.
    pub fn own(topic: &str, payload: bytes::Bytes, retain: bool) -> Publish<'static> {
        Publish {
            topic: topic.to_string(),
            qos: QoS::AtLeastOnce,
            payload,
            event_id: String::new(),
            expiry_secs: None,
            replay_marker: None,
            retain,
            properties: None,
        }
    }

    /// Payload and topic bytes: what the pace counts.
    pub fn size(&self) -> usize {
        self.payload.len() + self.topic.len()
    }
}

/// A row the upstream can never take, and why.
#[derive(Debug)]
pub(super) struct Unsendable {
    pub why: String,
    pub topic: String,
    pub event_id: String,
}

/// What building a publish needs to know about the upstream.
#[derive(Debug, Clone)]
pub(super) struct Packets<'a> {
    v5: bool,
    max_packet: usize,
    replay_marker: Option<&'a str>,
    /// Rows received before this (ms since the epoch) are the backlog.
    connected_ms: u64,
}

impl<'a> Packets<'a> {
    pub fn new(up: &'a UpstreamConfig, connected_ms: u64) -> Packets<'a> {
        Packets {
            v5: up.protocol == Protocol::V5,
            max_packet: up.max_packet_size.as_usize(),
            replay_marker: up.replay_marker.as_deref(),
            connected_ms,
        }
    }

    /// The publish for `row`, or why the upstream can never take it.
    pub fn build(&self, row: Row, now_ms: u64) -> Result<Publish<'a>, Unsendable> {
        let qos = if row.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let replayed = row.received_ms < self.connected_ms;
        let marker = self.replay_marker.filter(|_| replayed);
        // MQTT 5 marks with a user property, 3.1.1 in the payload.
        let payload = match marker {
            Some(field) if !self.v5 => {
                with_replay_marker(row.payload, field, &row.topic, qos, self.max_packet)
            }
            _ => row.payload,
        };
        let publish = Publish {
            topic: row.topic,
            qos,
            payload,
            event_id: row.event_id,
            // MQTT 5 message expiry: what is left of the TTL, at least a
            // second (an expired row is never fetched).
            expiry_secs: row
                .expires_ms
                .map(|e| e.saturating_sub(now_ms).div_ceil(1000).max(1) as u32),
            replay_marker: marker.filter(|_| self.v5),
            retain: false,
            properties: match (row.properties, self.v5) {
                (Some(p), true) => Some(p),
                (Some(p), false) if p.user.is_empty() => None,
                (Some(_), false) => {
                    // Queued for MQTT 5 (a binary CloudEvent), sent after
                    // the upstream was set to 3.1.1: the payload is the
                    // event, so it goes, without its attributes.
                    static SAID: std::sync::atomic::AtomicBool =
                        std::sync::atomic::AtomicBool::new(false);
                    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!(
                            row = row.id,
                            "queued events carry MQTT 5 properties (CloudEvents attributes) that this MQTT 3.1.1 session cannot send; they are sent without them (said once)"
                        );
                    }
                    None
                }
                (None, _) => None,
            },
        };
        // MQTT writes a property's strings with two length bytes: a longer
        // one (a CloudEvent's `source` from a huge topic) would be cut on
        // the wire and the broker would drop the session, every time.
        if let Some(p) = &publish.properties
            && let Some(long) = p
                .content_type
                .iter()
                .chain(p.user.iter().flat_map(|(k, v)| [k, v]))
                .find(|s| s.len() > u16::MAX as usize)
        {
            return Err(Unsendable {
                why: format!(
                    "an MQTT 5 property is {} bytes; MQTT allows {}",
                    long.len(),
                    u16::MAX
                ),
                topic: publish.topic,
                event_id: publish.event_id,
            });
        }
        let extra = if self.v5 { properties_len(&publish) } else { 0 };
        match sendable(
            &publish.topic,
            publish.payload.len() + extra,
            qos,
            self.max_packet,
        ) {
            Ok(()) => Ok(publish),
            Err(why) => Err(Unsendable {
                why,
                topic: publish.topic,
                event_id: publish.event_id,
            }),
        }
    }
}

/// Bytes an MQTT 5 publish adds for its properties (for the size check):
/// properties length varint, user property (id, 2+8 + 2+len), expiry
/// (1+4), marker (1 + 2+len + 2+4).
fn properties_len(p: &Publish<'_>) -> usize {
    4 + 1
        + 2
        + "event_id".len()
        + 2
        + p.event_id.len()
        + p.expiry_secs.map_or(0, |_| 5)
        + p.replay_marker.map_or(0, |m| 1 + 2 + m.len() + 2 + 4)
        + p.properties.as_ref().map_or(0, |props| {
            // Content type 1+2+len; each user property 1+2+len+2+len.
            props.content_type.as_ref().map_or(0, |c| 3 + c.len())
                + props
                    .user
                    .iter()
                    .map(|(k, v)| 5 + k.len() + v.len())
                    .sum::<usize>()
        })
}

/// `payload` with `"<field>": true` if it is a JSON object, unless that would
/// make an otherwise sendable event too large (then unchanged).
fn with_replay_marker(
    raw: bytes::Bytes,
    field: &str,
    topic: &str,
    qos: QoS,
    max_packet: usize,
) -> bytes::Bytes {
    // Only a replayed event of a 3.1.1 upstream gets here: its payload is
    // decoded once more, since the marked one is a new payload anyway.
    let marked = codec::with_json_field(
        &codec::decode(&raw),
        &raw,
        field,
        serde_json::Value::Bool(true),
    );
    if sendable(topic, marked.len(), qos, max_packet).is_ok() {
        marked
    } else {
        raw
    }
}

/// Whether a row can be published at all: MQTT forbids wildcards and NUL in
/// topic names and empty topics, and the packet must fit `max_packet`.
fn sendable(topic: &str, payload: usize, qos: QoS, max_packet: usize) -> Result<(), String> {
    if topic.is_empty() || topic.contains(['+', '#', '\0']) {
        return Err("topic is empty or contains '+', '#' or NUL".into());
    }
    if topic.len() > usize::from(u16::MAX) {
        return Err(format!("topic is {} bytes, MQTT allows 65535", topic.len()));
    }
    let remaining = 2 + topic.len() + if qos == QoS::AtMostOnce { 0 } else { 2 } + payload;
    let header = 1 + match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    if header + remaining > max_packet {
        return Err(format!(
            "packet is {} bytes, over upstream max_packet_size ({max_packet})",
            header + remaining
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsendable_rows_are_recognised() {
        assert!(sendable("a/b", 10, QoS::AtLeastOnce, 1024).is_ok());
        assert!(sendable("a/+/b", 10, QoS::AtLeastOnce, 1024).is_err());
        assert!(sendable("a/#", 10, QoS::AtLeastOnce, 1024).is_err());
        assert!(sendable("", 10, QoS::AtLeastOnce, 1024).is_err());
        // 1 + 2 (remaining length 200) + 2 + 3 + 2 + 193 = 203 bytes.
        assert!(sendable("a/b", 193, QoS::AtLeastOnce, 203).is_ok());
        assert!(sendable("a/b", 194, QoS::AtLeastOnce, 203).is_err());
    }

    fn row(props: Properties) -> Row {
        Row {
            id: 1,
            event_id: "e".into(),
            topic: "a/b".into(),
            qos: 1,
            priority: crate::queue::Priority::Normal,
            received_ms: 0,
            expires_ms: None,
            payload: bytes::Bytes::from_static(b"{}"),
            properties: Some(std::sync::Arc::new(props)),
        }
    }

    #[test]
    fn a_property_longer_than_mqtt_allows_is_unsendable() {
        let packets = Packets {
            v5: true,
            max_packet: 1 << 20,
            replay_marker: None,
            connected_ms: 0,
        };
        let props = |source: String| Properties {
            content_type: Some("application/json".into()),
            user: vec![("source".into(), source)],
        };
        let ok = packets.build(row(props("x".repeat(65_535))), 0).unwrap();
        assert_eq!(ok.properties.unwrap().user[0].1.len(), 65_535);
        let e = packets
            .build(row(props("x".repeat(65_536))), 0)
            .unwrap_err();
        assert!(e.why.contains("65536 bytes"), "{}", e.why);
    }
}
