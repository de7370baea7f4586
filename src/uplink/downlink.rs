//! What comes down an upstream's subscriptions: each publish becomes an
//! event for the rules, with `meta.source` = the upstream's name, so only
//! rules whose `from` names it see it (see `rules`).
//!
//! No loops: a rule may route a downlink event back up to the upstream it
//! came from only by naming that upstream in `from`, and then a broker
//! that sends a client its own publishes (every MQTT 3.1.1 broker, where
//! they match one of its subscriptions) would hand it straight back. On
//! MQTT 5 the subscriptions carry No Local and the broker does not. On
//! 3.1.1 edgeferry remembers what it published on topics its own filters
//! match, and drops a publish that comes back with the same topic and
//! payload (counted as an echo).
//!
//! A QoS 1 or 2 command is acknowledged to the broker only once the
//! router has routed it (its receipt settled, as for a sensor's publish at
//! the front door), in the order the commands came (MQTT requires it):
//! until then the broker holds it for the session and sends it again
//! after a reconnect.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::link::AckHandle;
use crate::receipt::{Outcome, Receipt};
use crate::topic::Pattern;

/// Publishes remembered at most (a window's worth many times over) and for
/// at most this long: an echo comes back within a round trip.
const REMEMBERED: usize = 10_000;
const REMEMBER_FOR: Duration = Duration::from_secs(120);

/// edgeferry's recent publishes that its own subscriptions would echo
/// back (3.1.1 only; empty and free otherwise). Kept across sessions: an
/// echo of a publish sent just before a reconnect may arrive after it.
#[derive(Debug, Default)]
pub(super) struct Echoes {
    /// The downlink filters; none: nothing can echo.
    filters: Vec<Pattern>,
    sent: VecDeque<(u64, Instant)>,
    /// Fingerprint -> publishes with it not yet echoed.
    pending: HashMap<u64, u32>,
    hasher: std::collections::hash_map::RandomState,
}

impl Echoes {
    /// For an upstream that subscribes to `filters` and would echo (3.1.1).
    pub fn new(filters: &[(String, u8)], echoes_own: bool) -> Echoes {
        let filters = match echoes_own {
            true => filters
                .iter()
                .filter_map(|(f, _)| Pattern::parse(f).ok())
                .collect(),
            false => Vec::new(),
        };
        Echoes {
            filters,
            ..Echoes::default()
        }
    }

    fn fingerprint(&self, topic: &str, payload: &[u8]) -> u64 {
        self.hasher.hash_one((topic, payload))
    }

    /// A publish went to the upstream.
    pub fn sent(&mut self, topic: &str, payload: &[u8], now: Instant) {
        if self.filters.is_empty() || !self.filters.iter().any(|f| f.captures(topic).is_some()) {
            return;
        }
        self.expire(now);
        if self.sent.len() >= REMEMBERED {
            self.forget_oldest();
        }
        let fp = self.fingerprint(topic, payload);
        self.sent.push_back((fp, now));
        *self.pending.entry(fp).or_default() += 1;
    }

    /// Whether a publish that came down is one of ours coming back (it
    /// is then forgotten: the same bytes a second time are the cloud's).
    pub fn is_echo(&mut self, topic: &str, payload: &[u8], now: Instant) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        self.expire(now);
        let fp = self.fingerprint(topic, payload);
        match self.pending.get_mut(&fp) {
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    self.pending.remove(&fp);
                }
                true
            }
            None => false,
        }
    }

    fn expire(&mut self, now: Instant) {
        while self
            .sent
            .front()
            .is_some_and(|(_, at)| now.duration_since(*at) > REMEMBER_FOR)
        {
            self.forget_oldest();
        }
    }

    /// Drop the oldest entry. If its echo already came, this takes one
    /// from a later identical publish instead: identical bytes on the same
    /// topic within two minutes are then one echo short (a rule that
    /// loops would go round once more), never a command dropped.
    fn forget_oldest(&mut self) {
        let Some((fp, _)) = self.sent.pop_front() else {
            return;
        };
        if let Some(n) = self.pending.get_mut(&fp) {
            *n -= 1;
            if *n == 0 {
                self.pending.remove(&fp);
            }
        }
    }
}

/// Whether a connection ended on a packet larger than `max_packet_size`
/// (rumqttc cannot read it and drops the connection; the broker keeps it
/// for the session and would send it again on every reconnect).
pub(super) fn too_large(reason: &str) -> bool {
    reason
        .to_ascii_lowercase()
        .contains("payload size limit exceeded")
}

/// The commands of one connection waiting to be acknowledged, oldest
/// first.
pub(super) struct Deliveries {
    next: u64,
    /// (receipt number, what acknowledging takes, safe once known).
    pending: VecDeque<(u64, AckHandle, Option<bool>)>,
    /// Safe, in order, and not yet taken by the link (its channel was full).
    ready: VecDeque<AckHandle>,
    tx: mpsc::UnboundedSender<Outcome>,
    pub rx: mpsc::UnboundedReceiver<Outcome>,
}

/// A command the router could not take safely (a receipt dropped unsettled).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct NotSafe;

impl Deliveries {
    pub fn new() -> Deliveries {
        let (tx, rx) = mpsc::unbounded_channel();
        Deliveries {
            next: 0,
            pending: VecDeque::new(),
            ready: VecDeque::new(),
            tx,
            rx,
        }
    }

    /// A command to acknowledge once its receipt says it is safe.
    pub fn receipt(&mut self, ack: AckHandle) -> Receipt {
        self.next += 1;
        self.pending.push_back((self.next, ack, None));
        Receipt::new(self.next, self.tx.clone())
    }

    /// One to acknowledge as soon as those before it are (an echo, a
    /// control command: nothing more to wait for).
    pub fn now(&mut self, ack: AckHandle) {
        self.next += 1;
        self.pending.push_back((self.next, ack, Some(true)));
        self.advance();
    }

    /// `now`, for a QoS 1 or 2 publish (a QoS 0 one has nothing to ack).
    pub fn now_opt(&mut self, ack: Option<AckHandle>) {
        if let Some(a) = ack {
            self.now(a);
        }
    }

    /// A receipt's outcome: the commands now acknowledgeable in order are
    /// ready; one that is not safe stops the line.
    pub fn outcome(&mut self, (seq, safe): Outcome) -> Result<(), NotSafe> {
        if let Some(p) = self.pending.iter_mut().find(|p| p.0 == seq) {
            p.2 = Some(safe);
        }
        self.advance();
        match self.pending.front() {
            Some((_, _, Some(false))) => Err(NotSafe),
            _ => Ok(()),
        }
    }

    fn advance(&mut self) {
        while let Some((_, _, Some(true))) = self.pending.front() {
            if let Some((_, ack, _)) = self.pending.pop_front() {
                self.ready.push_back(ack);
            }
        }
    }

    /// Hand the ready acknowledgements to `ack` in order, until it has no
    /// room (the rest go next time).
    pub fn flush(&mut self, mut ack: impl FnMut(&AckHandle) -> bool) {
        while let Some(h) = self.ready.front() {
            if !ack(h) {
                return;
            }
            self.ready.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(pkid: u16) -> AckHandle {
        let mut p = rumqttc::Publish::new("c", rumqttc::QoS::AtLeastOnce, "x");
        p.pkid = pkid;
        AckHandle::V4(p)
    }

    fn pkids(d: &mut Deliveries) -> Vec<u16> {
        let mut out = Vec::new();
        d.flush(|h| {
            if let AckHandle::V4(p) = h {
                out.push(p.pkid);
            }
            true
        });
        out
    }

    #[test]
    fn commands_are_acknowledged_in_order_once_routed() {
        let mut d = Deliveries::new();
        let a = d.receipt(handle(1));
        let b = d.receipt(handle(2));
        d.now(handle(3));
        b.settle();
        let o = d.rx.try_recv().unwrap();
        assert_eq!(d.outcome(o), Ok(()));
        assert!(pkids(&mut d).is_empty(), "the first is not routed yet");
        a.settle();
        let o = d.rx.try_recv().unwrap();
        assert_eq!(d.outcome(o), Ok(()));
        assert_eq!(pkids(&mut d), [1, 2, 3]);
    }

    #[test]
    fn a_link_without_room_gets_the_rest_later_and_an_unsafe_command_stops_the_line() {
        let mut d = Deliveries::new();
        d.now(handle(1));
        d.now(handle(2));
        let mut first = true;
        d.flush(|_| std::mem::take(&mut first));
        assert_eq!(pkids(&mut d), [2]);
        let lost = d.receipt(handle(3));
        drop(lost);
        let o = d.rx.try_recv().unwrap();
        assert_eq!(d.outcome(o), Err(NotSafe));
        assert!(pkids(&mut d).is_empty());
    }

    fn filters() -> Vec<(String, u8)> {
        vec![("gw/g1/cmd/#".to_string(), 1)]
    }

    #[test]
    fn an_own_publish_on_a_subscribed_topic_comes_back_as_an_echo_once() {
        let mut e = Echoes::new(&filters(), true);
        let now = Instant::now();
        e.sent("gw/g1/cmd/relay", b"on", now);
        assert!(e.is_echo("gw/g1/cmd/relay", b"on", now));
        assert!(
            !e.is_echo("gw/g1/cmd/relay", b"on", now),
            "the same bytes again are the cloud's"
        );
        assert!(!e.is_echo("gw/g1/cmd/relay", b"off", now));
    }

    #[test]
    fn publishes_no_filter_matches_and_mqtt5_upstreams_are_not_remembered() {
        let now = Instant::now();
        let mut e = Echoes::new(&filters(), true);
        e.sent("plant/a/temp", b"1", now);
        assert!(e.sent.is_empty());
        let mut v5 = Echoes::new(&filters(), false);
        v5.sent("gw/g1/cmd/relay", b"on", now);
        assert!(!v5.is_echo("gw/g1/cmd/relay", b"on", now));
    }

    #[test]
    fn memory_is_bounded_by_count_and_age() {
        let now = Instant::now();
        let mut e = Echoes::new(&filters(), true);
        for i in 0..REMEMBERED + 50 {
            e.sent("gw/g1/cmd/x", i.to_string().as_bytes(), now);
        }
        assert_eq!(e.sent.len(), REMEMBERED);
        assert!(
            !e.is_echo("gw/g1/cmd/x", b"0", now),
            "the oldest was forgotten"
        );
        let later = now + REMEMBER_FOR + Duration::from_secs(1);
        assert!(!e.is_echo("gw/g1/cmd/x", b"100", later));
        assert!(e.sent.is_empty() && e.pending.is_empty());
    }
}
