//! The event: one publish received by the front door, decoded once.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use uuid::Uuid;

use crate::codec::{self, Payload};

/// `meta.source` of an event a local client published.
pub const LOCAL_SOURCE: &str = "local";

/// One message as it travels through the pipeline.
#[derive(Debug, Clone)]
pub struct Event {
    /// Unique across restarts and gateways (UUIDv7: time-ordered, random
    /// tail), so the cloud can drop duplicates of an at-least-once delivery.
    pub id: Uuid,
    /// Topic it was published on.
    pub topic: String,
    /// When edgeferry received it, in milliseconds since the Unix epoch.
    pub received_ms: u64,
    /// The original bytes, forwarded unchanged unless a rule re-encodes.
    pub raw: Bytes,
    /// The decoded payload, for rules that look inside.
    pub payload: Payload,
    /// Set when edgeferry itself republished this event into the embedded
    /// broker (a rule's `local` destination), so rules do not loop on it.
    pub origin: Option<Origin>,
    /// Who published it (`meta.client_id`, `meta.username`): empty for
    /// edgeferry's own events; shared by every event of one connection.
    pub client_id: Arc<str>,
    pub username: Option<Arc<str>>,
    /// The upstream a downlink event came down from (`meta.source`);
    /// `None` for local events. A local republish of a downlink event keeps
    /// it, so only rules that name the upstream (`from`) ever see it.
    pub source: Option<Arc<str>>,
}

/// Which rule republished an event locally, and how many republishes deep it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub rule: String,
    pub hops: u8,
}

impl Event {
    /// Build an event from a received publish; decoding never fails (what
    /// is neither JSON nor CBOR is kept as raw bytes).
    pub fn from_publish(topic: String, raw: Bytes) -> Event {
        let payload = codec::decode(&raw);
        Event {
            id: Uuid::now_v7(),
            topic,
            received_ms: now_ms(),
            raw,
            payload,
            origin: None,
            client_id: Arc::from(""),
            username: None,
            source: None,
        }
    }

    /// What `meta.source` reads: the upstream's name, or `"local"`.
    pub fn source_name(&self) -> &str {
        self.source.as_deref().unwrap_or(LOCAL_SOURCE)
    }

    /// A convenience for tests.
    pub fn for_test(topic: &str, raw: &'static [u8]) -> Event {
        Event::from_publish(topic.to_string(), Bytes::from_static(raw))
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_time_ordered() {
        let a = Event::for_test("t", b"1");
        let b = Event::for_test("t", b"2");
        assert_ne!(a.id, b.id);
        assert!(a.id < b.id);
    }
}
