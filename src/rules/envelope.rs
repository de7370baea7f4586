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

use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use percent_encoding::AsciiSet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::template::Template;
use crate::percent;
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

/// The structured-mode event, as JSON bytes: written straight from the
/// attributes and the data (no copy of the payload into a map first).
pub fn structured(a: &Attributes<'_>, data: Data<'_>) -> Result<Bytes, String> {
    #[derive(Serialize)]
    struct Event<'a> {
        specversion: &'static str,
        id: &'a str,
        source: &'a str,
        #[serde(rename = "type")]
        event_type: &'a str,
        time: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        dataschema: Option<&'a str>,
        datacontenttype: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<&'a Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        data_base64: Option<String>,
    }
    let (datacontenttype, data, data_base64) = match data {
        Data::Value(v) => ("application/json", Some(v), None),
        Data::Bytes(b) => (
            "application/octet-stream",
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(b)),
        ),
    };
    let event = Event {
        specversion: "1.0",
        id: a.id,
        source: &a.source,
        event_type: &a.event_type,
        time: rfc3339(a.received_ms),
        dataschema: a.dataschema,
        datacontenttype,
        data,
        data_base64,
    };
    serde_json::to_vec(&event)
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
    out.push_str(&percent::encode(gateway, AUTHORITY));
    out.push('/');
    out.push_str(&percent::encode(topic, PATH));
    out
}

/// A host keeps unreserved characters and sub-delims (not `:`, which
/// starts a port).
const AUTHORITY: &AsciiSet = &percent::UNRESERVED
    .remove(b'!')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b';')
    .remove(b'=');
/// One value inside a path segment: those, `:` and `@`.
pub const SEGMENT: &AsciiSet = &AUTHORITY.remove(b':').remove(b'@');
/// A path: a segment's characters and `/`.
const PATH: &AsciiSet = &SEGMENT.remove(b'/');

/// Whether `text` may stand in a URI reference as written (RFC 3986's
/// characters, `%` for escapes): a `source` template's literal text.
pub fn uri_text(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~:/?#[]@!$&'()*+,;=%".contains(&b))
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
