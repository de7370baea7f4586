//! Per-route delivery policy recorded on each queued event: its priority and
//! what happens when the queue is full. Recorded when the event is queued, so
//! a later rule reload does not change events already waiting.

use serde::Deserialize;

/// Send order: higher first; FIFO within a priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    /// Highest first: the order the uplink reads the queue in.
    pub const SEND_ORDER: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// Stored in SQLite as 0, 1, 2.
    pub fn as_i64(self) -> i64 {
        self as i64
    }

    pub fn from_i64(v: i64) -> Priority {
        match v {
            i64::MIN..=0 => Priority::Low,
            1 => Priority::Normal,
            _ => Priority::High,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }
}

/// What a full queue does with a new event of this route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Make room by deleting the oldest events of the lowest priority (never
    /// of a higher priority than the new event); if that cannot make room,
    /// the new event is dropped.
    #[default]
    DropOldest,
    /// Keep what is queued; drop the new event.
    DropNewest,
}

/// `[queue] durability`, a deprecated setting: there is one durability
/// model now (see `queue`), and these name the `spill_after` they map to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Every event was committed before it was sent: now `spill_after = 0`,
    /// written at the next commit unless its upstream acknowledged it first.
    #[default]
    Always,
    /// Events were sent from RAM and written if they waited: the model now,
    /// with its old default `spill_after` of 1 s.
    Offline,
}
