//! The rule file schema as operators write it (see README "Rules").
//! Parsed with serde; turned into the runtime form by `compile`.

use serde::Deserialize;

use crate::queue::{Overflow, Priority};
use crate::units::HumanDuration;

/// One `[[rule]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique across all rule files; used in logs and counters.
    pub name: String,
    /// MQTT topic pattern with `+`, `#` and `{name}` captures.
    #[serde(rename = "match")]
    pub pattern: String,
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

/// One entry of `to = [...]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationSpec {
    /// Name of an `[upstream.<name>]` in the config.
    pub upstream: String,
    /// Topic template; `{name}` is replaced by the capture of that name.
    /// Defaults to the event's own topic.
    pub topic: Option<String>,
    /// 0 or 1 (default 1).
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Send order in the queue: "low", "normal" (default) or "high".
    #[serde(default)]
    pub priority: Priority,
    /// Not sent after this long in the queue (e.g. "24h"); unset: never expires.
    pub ttl: Option<HumanDuration>,
    /// When the upstream's queue is full: "drop_oldest" (default) or "drop_newest".
    #[serde(default)]
    pub overflow: Overflow,
    /// Add the event's id under this field of a JSON object payload, so the
    /// cloud can drop duplicates of an at-least-once delivery (MQTT 3.1.1
    /// has no message properties to carry it).
    pub id_field: Option<String>,
}

fn default_qos() -> u8 {
    1
}
