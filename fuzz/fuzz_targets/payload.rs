//! Payload decoding (JSON, CBOR, raw) must never panic, whatever arrives:
//! and a decoded payload re-encodes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let raw = bytes::Bytes::copy_from_slice(data);
    let payload = edgeferry::codec::decode(&raw);
    // Adding a field (what replay markers and id fields do) must not panic either.
    let _ = edgeferry::codec::with_json_field(&payload, &raw, "_f", serde_json::Value::Bool(true));
});
