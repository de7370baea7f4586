//! Payload decoding: JSON, CBOR or raw bytes, into one value model.
//!
//! Sensors rarely say what they send, so the format is sniffed: a payload
//! that parses completely as JSON is JSON; else one that parses completely as
//! a CBOR map or array is CBOR; anything else is raw bytes. Both structured
//! formats become the same `serde_json::Value`, so rules see one model.

use bytes::Bytes;
use serde_json::{Map, Number, Value};

/// A decoded payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Json(Value),
    Cbor(Value),
    /// Not structured (or not valid as either format): kept as bytes only.
    Raw,
    /// Looks like a JSON object or array (starts with `{` or `[`) but does
    /// not parse: a broken sensor, not a binary format. Rules do not route
    /// it; it is counted and dead-lettered.
    Malformed(String),
}

impl Payload {
    pub fn format(&self) -> &'static str {
        match self {
            Payload::Json(_) => "json",
            Payload::Cbor(_) => "cbor",
            Payload::Raw => "raw",
            Payload::Malformed(_) => "malformed",
        }
    }

    pub fn value(&self) -> Option<&Value> {
        match self {
            Payload::Json(v) | Payload::Cbor(v) => Some(v),
            Payload::Raw | Payload::Malformed(_) => None,
        }
    }
}

/// `raw` with `field` set to `value` if it is a JSON object (`payload` is
/// its decoded form); any other payload (CBOR, raw, a JSON array or scalar)
/// is returned unchanged.
pub fn with_json_field(payload: &Payload, raw: &Bytes, field: &str, value: Value) -> Bytes {
    match payload {
        Payload::Json(Value::Object(map)) => {
            let mut map = map.clone();
            map.insert(field.to_string(), value);
            serde_json::to_vec(&map)
                .map(Bytes::from)
                .unwrap_or_else(|_| raw.clone())
        }
        _ => raw.clone(),
    }
}

/// Decode `raw`, sniffing the format.
pub fn decode(raw: &[u8]) -> Payload {
    let first = raw.iter().find(|b| !b.is_ascii_whitespace());
    if matches!(
        first,
        Some(b'{' | b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n')
    ) {
        match serde_json::from_slice::<Value>(raw) {
            Ok(v) => return Payload::Json(v),
            Err(e) if matches!(first, Some(b'{' | b'[')) => {
                return Payload::Malformed(format!("malformed JSON: {e}"));
            }
            Err(_) => {}
        }
    }
    // CBOR major types 4 (array) and 5 (map) only: other CBOR items are too
    // easily confused with arbitrary bytes.
    if matches!(raw.first(), Some(b) if (0x80..=0xbf).contains(b))
        && let Some(v) = decode_cbor(raw)
    {
        return Payload::Cbor(v);
    }
    Payload::Raw
}

fn decode_cbor(raw: &[u8]) -> Option<Value> {
    let mut reader = raw;
    let v: ciborium::Value = ciborium::from_reader(&mut reader).ok()?;
    // Trailing bytes mean this was not one CBOR item.
    if !reader.is_empty() {
        return None;
    }
    cbor_to_json(v)
}

/// CBOR's model is wider than JSON's: byte strings become arrays of numbers,
/// non-string map keys are written as text, tags are looked through.
fn cbor_to_json(v: ciborium::Value) -> Option<Value> {
    use ciborium::Value as C;
    Some(match v {
        C::Null => Value::Null,
        C::Bool(b) => Value::Bool(b),
        C::Integer(i) => {
            let i: i128 = i.into();
            if let Ok(u) = u64::try_from(i) {
                Value::Number(u.into())
            } else if let Ok(s) = i64::try_from(i) {
                Value::Number(s.into())
            } else {
                Value::Number(Number::from_f64(i as f64)?)
            }
        }
        C::Float(f) => Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        C::Text(s) => Value::String(s),
        C::Bytes(b) => Value::Array(b.into_iter().map(|x| Value::Number(x.into())).collect()),
        C::Array(a) => Value::Array(a.into_iter().map(cbor_to_json).collect::<Option<_>>()?),
        C::Map(m) => {
            let mut out = Map::with_capacity(m.len());
            for (k, v) in m {
                let key = match k {
                    C::Text(s) => s,
                    C::Integer(i) => i128::from(i).to_string(),
                    C::Bool(b) => b.to_string(),
                    _ => return None,
                };
                out.insert(key, cbor_to_json(v)?);
            }
            Value::Object(out)
        }
        C::Tag(_, inner) => cbor_to_json(*inner)?,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_cbor_and_raw_are_told_apart() {
        assert_eq!(
            decode(br#"{"value": 21.5, "unit": "C"}"#),
            Payload::Json(json!({"value": 21.5, "unit": "C"}))
        );
        let mut cbor = Vec::new();
        ciborium::into_writer(&json!({"value": 21.5, "unit": "C", "n": -3}), &mut cbor).unwrap();
        assert_eq!(
            decode(&cbor),
            Payload::Cbor(json!({"value": 21.5, "unit": "C", "n": -3}))
        );
        assert_eq!(decode(b"hello"), Payload::Raw);
        assert!(matches!(decode(b"{not json"), Payload::Malformed(_)));
        assert!(
            matches!(decode(&[b'['; 1000]), Payload::Malformed(_)),
            "deep nesting"
        );
        assert_eq!(decode(b"12 apples"), Payload::Raw);
        assert_eq!(decode(&[0xff, 0xfe, 0x00]), Payload::Raw);
        assert_eq!(decode(&[0xa1, 0x01]), Payload::Raw, "truncated CBOR map");
        assert_eq!(decode(b""), Payload::Raw);
    }

    #[test]
    fn fields_are_added_to_json_objects_only() {
        let raw = Bytes::from_static(br#"{"v": 1}"#);
        let out = with_json_field(&decode(&raw), &raw, "_id", json!("abc"));
        assert_eq!(
            serde_json::from_slice::<Value>(&out).unwrap(),
            json!({"v": 1, "_id": "abc"})
        );
        for raw in [&b"[1, 2]"[..], b"plain", &[0xa1, 0x01, 0x02]] {
            let raw = Bytes::copy_from_slice(raw);
            assert_eq!(
                with_json_field(&decode(&raw), &raw, "_id", json!("abc")),
                raw
            );
        }
    }

    #[test]
    fn cbor_with_trailing_bytes_is_raw() {
        let mut cbor = Vec::new();
        ciborium::into_writer(&json!([1, 2]), &mut cbor).unwrap();
        cbor.push(0x00);
        assert_eq!(decode(&cbor), Payload::Raw);
    }
}
