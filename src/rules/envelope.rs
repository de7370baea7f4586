//! CloudEvents 1.0 envelopes for a destination (`envelope = "cloudevents"`):
//! the payload becomes the `data` of a structured-mode JSON event whose
//! attributes say what it is (`type`, `dataschema`), where it came from
//! (`source`), when (`time`) and which one (`id`, the event id, the same
//! across retries, so the cloud can drop duplicates).
//!
//! Structured mode puts the attributes in the payload, so they survive any
//! MQTT version; binary mode (`"cloudevents-binary"`, MQTT 5 upstreams)
//! sends the payload unchanged with the attributes as user properties,
//! named as the attributes are (the MQTT binding uses no `ce_` prefix),
//! and `datacontenttype` as the Content Type property. Either way they
//! are fixed when the event is queued and kept with its row.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::template::Template;
use crate::queue::Properties;

/// The `envelope` key of a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnvelopeMode {
    /// A structured-mode CloudEvent, JSON format.
    Cloudevents,
    /// A binary-mode CloudEvent: MQTT 5 properties and the bare payload.
    CloudeventsBinary,
}

/// A destination's compiled envelope.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub mode: EnvelopeMode,
    /// `event_type`; default: the contract's name and version, else the
    /// rule's name.
    pub event_type: Option<Template>,
    /// `event_source`; default `edgeferry://<gateway>/<topic>`.
    pub source: Option<Template>,
}

/// What one event's envelope says.
pub struct Attributes<'a> {
    pub id: &'a str,
    pub source: String,
    pub event_type: String,
    pub received_ms: u64,
    /// The `$id` of the schema the data keeps, if it has one.
    pub dataschema: Option<&'a str>,
}

/// What goes in `data`.
pub enum Data<'a> {
    /// A structured payload (JSON, or CBOR shown as JSON).
    Value(&'a Value),
    /// Bytes the envelope carries as `data_base64`.
    Bytes(&'a [u8]),
}

/// The structured-mode event, as JSON bytes.
pub fn structured(a: &Attributes<'_>, data: Data<'_>) -> Result<Bytes, String> {
    let mut ce = Map::with_capacity(9);
    ce.insert("specversion".into(), "1.0".into());
    ce.insert("id".into(), a.id.into());
    ce.insert("source".into(), a.source.clone().into());
    ce.insert("type".into(), a.event_type.clone().into());
    ce.insert("time".into(), rfc3339(a.received_ms).into());
    if let Some(s) = a.dataschema {
        ce.insert("dataschema".into(), s.into());
    }
    match data {
        Data::Value(v) => {
            ce.insert("datacontenttype".into(), "application/json".into());
            ce.insert("data".into(), v.clone());
        }
        Data::Bytes(b) => {
            ce.insert("datacontenttype".into(), "application/octet-stream".into());
            let text = base64::engine::general_purpose::STANDARD.encode(b);
            ce.insert("data_base64".into(), text.into());
        }
    }
    serde_json::to_vec(&Value::Object(ce))
        .map(Bytes::from)
        .map_err(|e| format!("cannot encode the CloudEvent: {e}"))
}

/// The media type of a structured event, as MQTT 5's Content Type.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// A binary-mode event's properties: every attribute but
/// `datacontenttype` as a user property, that one as the Content Type.
pub fn binary(a: &Attributes<'_>, content_type: &str) -> Properties {
    let mut user = vec![
        ("specversion".to_string(), "1.0".to_string()),
        ("id".to_string(), a.id.to_string()),
        ("source".to_string(), a.source.clone()),
        ("type".to_string(), a.event_type.clone()),
        ("time".to_string(), rfc3339(a.received_ms)),
    ];
    if let Some(s) = a.dataschema {
        user.push(("dataschema".to_string(), s.to_string()));
    }
    Properties {
        content_type: Some(content_type.to_string()),
        user,
    }
}

/// The default `source`: which gateway, and the topic the event came on
/// (a URI reference: characters outside RFC 3986's path set are
/// percent-encoded, `/` kept).
pub fn default_source(gateway: &str, topic: &str) -> String {
    let mut out = String::with_capacity(14 + gateway.len() + topic.len());
    out.push_str("edgeferry://");
    escape(&mut out, gateway, Part::Authority);
    out.push('/');
    escape(&mut out, topic, Part::Path);
    out
}

/// Where in a URI text goes, for percent-encoding (RFC 3986).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// A host: unreserved and sub-delims (no `:`, which starts a port).
    Authority,
    /// A path: those, `:` and `@`, and `/`.
    Path,
    /// One value inside a path segment: no `/` either.
    Segment,
}

/// Whether `text` may stand in a URI reference as written (RFC 3986's
/// characters, `%` for escapes): a `source` template's literal text.
pub fn uri_text(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~:/?#[]@!$&'()*+,;=%".contains(&b))
}

pub fn escape(out: &mut String, text: &str, part: Part) {
    for b in text.bytes() {
        let plain = b.is_ascii_alphanumeric()
            || b"-._~!$&'()*+,;=".contains(&b)
            || (part != Part::Authority && b"@:".contains(&b))
            || (part == Part::Path && b == b'/');
        if plain {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// `received_ms` in RFC 3339, UTC, with milliseconds.
fn rfc3339(ms: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_structured_event_has_every_required_attribute() {
        let a = Attributes {
            id: "0193",
            source: default_source("gw-1", "doors/yard/gate"),
            event_type: "door.v2".into(),
            received_ms: 1_764_806_400_123,
            dataschema: Some("https://example.com/door-v2.json"),
        };
        let v: Value =
            serde_json::from_slice(&structured(&a, Data::Value(&json!({"open": true}))).unwrap())
                .unwrap();
        assert_eq!(
            v,
            json!({
                "specversion": "1.0",
                "id": "0193",
                "source": "edgeferry://gw-1/doors/yard/gate",
                "type": "door.v2",
                "time": "2025-12-04T00:00:00.123Z",
                "dataschema": "https://example.com/door-v2.json",
                "datacontenttype": "application/json",
                "data": {"open": true},
            })
        );
    }

    #[test]
    fn bytes_go_as_base64_and_odd_topics_are_escaped() {
        let a = Attributes {
            id: "x",
            source: default_source("gw 1", "a b/ü/#"),
            event_type: "t".into(),
            received_ms: 0,
            dataschema: None,
        };
        let v: Value =
            serde_json::from_slice(&structured(&a, Data::Bytes(b"\x00\xff")).unwrap()).unwrap();
        assert_eq!(v["source"], "edgeferry://gw%201/a%20b/%C3%BC/%23");
        // A `:` in a gateway id would read as a port.
        assert_eq!(
            default_source("site:a[1]", "x"),
            "edgeferry://site%3Aa%5B1%5D/x"
        );
        assert_eq!(v["data_base64"], "AP8=");
        assert_eq!(v["datacontenttype"], "application/octet-stream");
        assert_eq!(v["time"], "1970-01-01T00:00:00.000Z");
        assert!(v.get("dataschema").is_none() && v.get("data").is_none());
    }
}
