//! The rule file schema as operators write it (see docs/rules.md).
//! Parsed with serde; turned into the runtime form by `compile`.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::shaping::{DeadbandSpec, DedupeSpec, ThrottleSpec, WindowSpec};
use crate::queue::{Overflow, Priority};
use crate::units::HumanDuration;

/// One `[[rule]]` table.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique across all rule files; used in logs and counters.
    pub name: String,
    /// MQTT topic pattern with `+`, `#` and `{name}` captures.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Which events the rule serves: `"local"` (what local clients publish,
    /// the default), an upstream's name (what arrives on its downlink
    /// subscriptions), or a list of these.
    #[serde(default, deserialize_with = "one_or_many")]
    pub from: Option<Vec<String>>,
    /// A `[[schema]]` the event must keep before `when` runs.
    pub schema: Option<String>,
    /// CEL predicate; the rule applies only where it is true.
    pub when: Option<String>,
    /// Fields added or replaced: field name -> CEL expression.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Fields removed (after `set`).
    #[serde(default)]
    pub drop_fields: Vec<String>,
    /// Fields renamed: old name -> new name (after `drop_fields`).
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// At most one event per key per period.
    pub throttle: Option<ThrottleSpec>,
    /// Drop an event whose key passed within a window.
    pub dedupe: Option<DedupeSpec>,
    /// Report by exception.
    pub deadband: Option<DeadbandSpec>,
    /// Tumbling aggregation per key.
    pub window: Option<WindowSpec>,
    /// Where matching events go. Empty with `drop = true`.
    #[serde(default)]
    pub to: Vec<DestinationSpec>,
    /// Drop matching events (counted as `dropped{reason="rule"}`).
    #[serde(default)]
    pub drop: bool,
    /// Later rules are not evaluated for an event this rule matched.
    #[serde(default)]
    pub stop: bool,
}

/// One entry of `to = [...]`: an upstream or a local topic.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DestinationSpec {
    /// Name of an `[upstream.<name>]` in the config.
    pub upstream: Option<String>,
    /// Topic template to republish on in the embedded broker.
    pub local: Option<String>,
    /// Topic template; `{name}` is replaced by the capture of that name and
    /// `{payload.field}` by a payload field. Defaults to the event's own topic.
    pub topic: Option<String>,
    /// Upstream: 0 or 1 (default 1). Local: 0, 1 or 2 towards local
    /// subscribers (default 0).
    pub qos: Option<u8>,
    /// Local only: publish retained, so a device that subscribes later
    /// still gets the last one (setpoints, desired state).
    pub retain: Option<bool>,
    /// Send order in the queue: "low", "normal" (default) or "high".
    pub priority: Option<Priority>,
    /// Not sent after this long in the queue (e.g. "24h"); unset: never expires.
    pub ttl: Option<HumanDuration>,
    /// When the upstream's queue is full: "drop_oldest" (default) or "drop_newest".
    pub overflow: Option<Overflow>,
    /// Add the event's id under this field of an object payload, so the
    /// cloud can drop duplicates of an at-least-once delivery (MQTT 3.1.1
    /// has no message properties to carry it).
    pub id_field: Option<String>,
    /// Output encoding: "json", "cbor" or "raw" (the bytes as received,
    /// untouched by transforms). Default: the input's own format.
    pub encode: Option<Encoding>,
    /// "cloudevents": wrap the payload in a CloudEvents 1.0 structured
    /// event (JSON).
    pub envelope: Option<super::envelope::EnvelopeMode>,
    /// The CloudEvent's `type` (a template); default: the contract's name
    /// and version (`door.v2`), else the rule's name.
    pub event_type: Option<String>,
    /// The CloudEvent's `source` (a template); default
    /// `edgeferry://<gateway>/<topic>`.
    pub event_source: Option<String>,
}

/// A string or a list of strings, as a list.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("\"local\", an upstream name, or a list of them")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(vec![v.to_string()])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(s) = seq.next_element::<String>()? {
                out.push(s);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V).map(Some)
}

/// How a destination's payload is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    Json,
    Cbor,
    Raw,
}
