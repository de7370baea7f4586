//! One connected session's state, as a state machine: one method per event
//! (`connected`, `send` for rows read from the queue, `written`, `acked`,
//! the timers, `failed`) and `end`, the one place that decides what the
//! session's end means for the next one. It does no I/O of its own: the
//! driver in `mod.rs` reads the queue and the link and hands the session
//! what happened, so its transitions are unit-tested without a broker.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use rumqttc::QoS;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::downlink::Echoes;
use super::failure::FailureKind;
use super::link::{AckHandle, LinkError, Refusal};
use super::packet::{Packets, Publish};
use super::poison::Strike;
use crate::config::{DrainOrder, UpstreamConfig};
use crate::metrics::UplinkMetrics;
use crate::pacing::Pacer;
use crate::queue::{Cursor, Row};

/// How long acknowledged ids may wait before their delete is handed to the
/// queue writer (which then commits them with its next group commit), while
/// the link keeps reporting more. Once it has nothing more ready they go at
/// once: with ack = "stored" a sensor's PUBACK for an event acknowledged
/// from RAM waits for this hand-over, and waiting for the clock even when
/// idle made it 3.6 ms at the p50 at 5,000 events/s (and the end-to-end
/// p99 4 ms, the publishers' windows filling behind it). At high rates the
/// count (a window of acks) hands them over sooner anyway.
pub(super) const ACK_FLUSH: Duration = Duration::from_millis(2);

/// Where publishes go: the link's sending half (a fake in the tests).
pub(super) trait Wire {
    /// Hand a publish over without waiting; an error means the connection
    /// is gone.
    fn publish(&self, p: Publish<'_>) -> Result<(), String>;
    /// Acknowledge a downlink publish; false if there is no room now.
    fn ack(&self, a: &AckHandle) -> bool;
}

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Ended {
    Shutdown,
    /// The connection failed or dropped.
    Lost {
        kind: FailureKind,
        /// Why, for the log.
        reason: String,
    },
    /// The queue writer is gone: the daemon is stopping.
    QueueClosed,
}

impl Ended {
    pub(super) fn lost(kind: FailureKind, reason: impl Into<String>) -> Ended {
        Ended::Lost {
            kind,
            reason: reason.into(),
        }
    }
}

/// How a session ended, and what that says about the next one.
#[derive(Debug)]
pub(super) struct Outcome {
    pub ended: Ended,
    pub strike: Strike,
    /// Whether the session did useful work: acknowledged something, or
    /// stayed up longer than the longest backoff. Only then is the backoff
    /// reset, so a broker that accepts and then drops us is not hammered.
    pub healthy: bool,
    /// Acknowledged ids not yet handed to the queue.
    pub acks: Vec<i64>,
}

impl Outcome {
    /// A session that never got connected.
    pub(super) fn before_connecting(ended: Ended) -> Outcome {
        Outcome {
            ended,
            strike: Strike::Unchanged,
            healthy: false,
            acks: Vec::new(),
        }
    }
}

/// What the window and the pace allow right now.
#[derive(Debug, Clone, Copy)]
pub(super) struct Room {
    /// Rows that may be sent now.
    pub allowed: usize,
    /// Whether to read them now (see `read_now`).
    pub due: bool,
    /// Waiting on the pace, not on the window or the queue.
    pub paced: bool,
}

/// What the driver does after a batch was sent.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Sent {
    /// Carry on: wait for the link, the queue or a timer.
    Wait,
    /// Every row was dead-lettered: read the next ones now rather than
    /// wait for network traffic to wake the loop.
    ReadAgain,
}

/// Where the session is in its upstream's queue.
#[derive(Debug, Clone, Copy)]
pub(super) struct Position {
    /// The last row sent from the start of the queue (the backlog, with
    /// `live_first`).
    pub after: Cursor,
    /// With `drain_order = "live_first"`: rows above `boundary` are live
    /// and read from `live_after` first.
    pub live_after: Cursor,
    pub boundary: i64,
    pub live_first: bool,
}

impl Position {
    /// The cursor a wait for new rows starts from: after a backlog every
    /// new row is a live one.
    pub fn waiting_cursor(&self) -> Cursor {
        if self.live_first {
            self.live_after
        } else {
            self.after
        }
    }

    fn advance(&mut self, row: &Row) {
        if row.id > self.boundary {
            self.live_after.advance(row);
        } else {
            self.after.advance(row);
        }
    }
}

pub(super) struct Session<'a, W: Wire> {
    wire: W,
    name: &'a str,
    up: &'a UpstreamConfig,
    metrics: &'a UplinkMetrics,
    /// Rows sent but not acknowledged when an earlier session ended:
    /// sending one of them again is a re-send.
    unacked: &'a mut HashSet<i64>,
    packets: Packets<'a>,
    pacer: Pacer,
    window: usize,
    /// A read is worth its round trip to the queue thread once this much
    /// of the window is free.
    refill: usize,
    pub position: Position,
    /// Published but pkid not yet assigned, in publish order: (row id, or
    /// `None` for the gateway's own status message, qos).
    awaiting: VecDeque<(Option<i64>, QoS)>,
    /// pkid -> row id (or `None`), for QoS 1 publishes on the wire.
    inflight: HashMap<u16, Option<i64>>,
    /// What went up that a 3.1.1 broker could echo down again.
    echoes: &'a mut Echoes,
    /// Acknowledged (or dead-lettered) ids not yet handed to the queue.
    acks: Vec<i64>,
    ack_deadline: Option<Instant>,
    /// True when the last read found no more rows: wait for the queue to
    /// send some.
    pub drained: bool,
    acked_any: bool,
    /// The session was ended by edgeferry itself (`end_blameless`).
    blameless: bool,
    connected_at: Instant,
    /// The last PUBACK, or when the first publish went out unanswered.
    last_progress: Instant,
    /// An upstream can answer pings and never acknowledge a publish
    /// (PUBREC for QoS 1, or nothing): the window stays full for good. No
    /// PUBACK for three keep-alives while publishes are outstanding ends
    /// the session; the rows are sent again on the next one.
    ack_limit: Duration,
    /// A half-open link (a NAT or a cellular modem that dropped the path
    /// without a reset) sends nothing back. rumqttc pings only after a
    /// quiet keep-alive and gives up one keep-alive later; a live broker
    /// answers every ping, so silence for 1.5 keep-alives is a dead link.
    silence_limit: Duration,
}

/// What the driver knows once the CONNACK is in.
pub(super) struct Connected<'a> {
    pub name: &'a str,
    pub up: &'a UpstreamConfig,
    pub metrics: &'a UplinkMetrics,
    pub unacked: &'a mut HashSet<i64>,
    pub echoes: &'a mut Echoes,
    pub session_present: bool,
    /// An MQTT 5 server's Receive Maximum.
    pub receive_max: Option<u16>,
    /// When the CONNACK arrived, and the same as ms since the epoch (rows
    /// received before it are the backlog).
    pub connected_at: Instant,
    pub connected_ms: u64,
    /// With `live_first`: the last row id queued before this connection
    /// (else `i64::MAX`: every row is read from the start).
    pub boundary: i64,
}

impl<'a, W: Wire> Session<'a, W> {
    /// The CONNACK arrived: the session starts, resending everything not
    /// yet acknowledged from the start of the queue.
    pub fn connected(wire: W, c: Connected<'a>) -> Session<'a, W> {
        let Connected {
            name,
            up,
            metrics,
            unacked,
            echoes,
            session_present,
            receive_max,
            boundary,
            connected_at,
            connected_ms,
        } = c;
        let mut window = usize::from(up.inflight);
        // An MQTT 5 server's Receive Maximum caps the window (rumqttc holds
        // back publishes beyond it; counting them as in flight would be wrong).
        if let Some(max) = receive_max {
            window = window.min(usize::from(max).max(1));
        }
        metrics.connected.store(true, Relaxed);
        metrics.connects.fetch_add(1, Relaxed);
        metrics.session_present.store(session_present, Relaxed);
        metrics.down_because.store(0, Relaxed);
        metrics.window.store(window as u64, Relaxed);
        *metrics.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        info!(upstream = %name, url = %up.url, protocol = %up.protocol, session_present, window, "uplink connected");
        let live_first = up.drain_order == DrainOrder::LiveFirst;
        Session {
            wire,
            name,
            up,
            metrics,
            unacked,
            packets: Packets::new(up, connected_ms),
            pacer: Pacer::new(up.send_rate, up.send_bytes_rate.0),
            window,
            refill: (window / 4).max(1),
            position: Position {
                after: Cursor::default(),
                live_after: Cursor([boundary; 3]),
                boundary,
                live_first,
            },
            awaiting: VecDeque::with_capacity(window),
            inflight: HashMap::with_capacity(window),
            echoes,
            acks: Vec::with_capacity(window),
            ack_deadline: None,
            drained: false,
            acked_any: false,
            blameless: false,
            connected_at,
            last_progress: connected_at,
            ack_limit: up.keep_alive.0 * 3,
            silence_limit: up.keep_alive.0.mul_f64(1.5),
        }
    }

    pub fn name_of(&self) -> &'a str {
        self.name
    }

    /// The in-flight gauge, refreshed once per turn of the loop.
    pub fn report_inflight(&self) {
        self.metrics
            .inflight
            .store(self.outstanding() as u64, Relaxed);
    }

    /// Publishes on the wire or about to be.
    pub fn outstanding(&self) -> usize {
        self.awaiting.len() + self.inflight.len()
    }

    pub fn room(&mut self) -> Room {
        let free = self.window.saturating_sub(self.outstanding());
        let allowed = self.pacer.allowance(free);
        Room {
            allowed,
            due: read_now(free, allowed, self.window, self.refill),
            paced: free > 0 && allowed == 0,
        }
    }

    /// Rows read from the queue (`asked` were asked for): publish them.
    pub fn send(&mut self, rows: Vec<Row>, asked: usize) -> Result<Sent, Ended> {
        self.drained = rows.len() < asked;
        let (mut handled, mut published) = (0usize, 0usize);
        let now_ms = crate::event::now_ms();
        for (i, row) in rows.into_iter().enumerate() {
            // A byte-rate limit is checked per event: stop at the first
            // that must wait (it is fetched again, the cursor stays).
            if i > 0 && self.pacer.allowance(1) == 0 {
                self.drained = false;
                break;
            }
            self.position.advance(&row);
            handled += 1;
            let id = row.id;
            let publish = match self.packets.build(row, now_ms) {
                Ok(p) => p,
                Err(u) => {
                    // A row the upstream can never take must not block the
                    // ones behind it: dead-letter it (counted, logged, deleted).
                    warn!(upstream = %self.name, row = id, event_id = %u.event_id, topic = %u.topic, why = %u.why, "dead-lettered: cannot be sent upstream");
                    self.metrics.dead_lettered.fetch_add(1, Relaxed);
                    self.acks.push(id);
                    continue;
                }
            };
            let (qos, size) = (publish.qos, publish.size());
            self.echoes
                .sent(&publish.topic, &publish.payload, Instant::now());
            // Capacity is window + 16 and at most `window` are outstanding,
            // so this only fails if the event loop is gone.
            if let Err(reason) = self.wire.publish(publish) {
                return Err(Ended::lost(FailureKind::Lost, reason));
            }
            self.pacer.spend(size);
            published += 1;
            self.awaiting.push_back((Some(id), qos));
            self.metrics.sent.fetch_add(1, Relaxed);
            if self.unacked.remove(&id) {
                self.metrics.resent.fetch_add(1, Relaxed);
            }
        }
        if handled > 0 && published == 0 && !self.drained {
            return Ok(Sent::ReadAgain);
        }
        Ok(Sent::Wait)
    }

    /// The gateway's own message (a status message, retained; a control
    /// result), QoS 1, straight onto the wire: no queue, no window, no
    /// backlog in front of it. Not sent (counted) when the link has no room
    /// for it now: a flood of commands must not end the session, and a
    /// link that is gone ends it through the rows.
    pub fn publish_own(&mut self, topic: &str, payload: bytes::Bytes, retain: bool) -> bool {
        self.echoes.sent(topic, &payload, Instant::now());
        if self
            .wire
            .publish(Publish::own(topic, payload, retain))
            .is_err()
        {
            self.metrics.own_dropped.fetch_add(1, Relaxed);
            return false;
        }
        self.awaiting.push_back((None, QoS::AtLeastOnce));
        true
    }

    /// End the session for a reason of edgeferry's own (a command that was
    /// not routed safely, so the upstream must send it again): counted as
    /// lost, but no strike against the rows on the wire.
    pub fn end_blameless(&mut self, reason: &str) -> Ended {
        self.blameless = true;
        Ended::lost(FailureKind::Lost, reason)
    }

    /// Acknowledge a command now routed (see `downlink::Deliveries`).
    pub fn ack_downlink(&self, a: &AckHandle) -> bool {
        self.wire.ack(a)
    }

    /// A command arrived on the control topic.
    pub fn count_command(&self) {
        self.metrics.control_commands.fetch_add(1, Relaxed);
    }

    /// One arrived faster than commands are taken, and was dropped.
    pub fn count_command_dropped(&self) {
        self.metrics.control_dropped.fetch_add(1, Relaxed);
    }

    /// A status message: retained, and counted.
    pub fn publish_status(&mut self, topic: &str, payload: bytes::Bytes) {
        if self.publish_own(topic, payload, true) {
            self.metrics.status_sent.fetch_add(1, Relaxed);
        }
    }

    /// A publish came down a subscription: the event for the rules, or
    /// `None` for an echo of edgeferry's own publish (counted).
    pub fn received(
        &mut self,
        topic: String,
        payload: bytes::Bytes,
    ) -> Option<crate::event::Event> {
        if self.echoes.is_echo(&topic, &payload, Instant::now()) {
            self.metrics.downlink_echoes.fetch_add(1, Relaxed);
            debug!(upstream = %self.name, %topic, "dropped the echo of an own publish");
            return None;
        }
        self.metrics.downlink_received.fetch_add(1, Relaxed);
        let mut event = crate::event::Event::from_publish(topic, payload);
        event.source = Some(self.name.into());
        Some(event)
    }

    /// The SUBACK of the downlink filters; a refusal is the upstream's
    /// ACL, most likely.
    pub fn subscribed(&self, granted: usize, refused: usize) {
        self.metrics
            .downlink_subscribed
            .store(granted as u64, Relaxed);
        if refused > 0 {
            self.metrics
                .downlink_refused
                .fetch_add(refused as u64, Relaxed);
            warn!(upstream = %self.name, granted, refused, "the upstream refused downlink subscriptions (is the gateway allowed to subscribe to them?); commands on those filters will not arrive");
        }
    }

    /// A publish went out with this packet id.
    pub fn written(&mut self, pkid: u16) {
        let Some((id, qos)) = self.awaiting.pop_front() else {
            return;
        };
        if qos == QoS::AtMostOnce {
            // QoS 0: done once written; nothing will acknowledge it.
            if let Some(id) = id {
                self.acks.push(id);
                self.metrics.acked.fetch_add(1, Relaxed);
            }
        } else {
            if self.inflight.is_empty() {
                // The ack clock starts with the first outstanding one.
                self.last_progress = Instant::now();
            }
            self.inflight.insert(pkid, id);
        }
    }

    /// A PUBACK: the row is done, dead-lettered (a permanent refusal) or,
    /// refused for now, ends the session to be sent again after a pause.
    pub fn acked(&mut self, pkid: u16, refused: Option<Refusal>) -> Result<(), Ended> {
        let Some(entry) = self.inflight.remove(&pkid) else {
            debug!(upstream = %self.name, pkid, "ignoring PUBACK for unknown packet id");
            return Ok(());
        };
        let Some(id) = entry else {
            // The gateway's own message: nothing queued waits on it (and it
            // says nothing about whether rows are being acknowledged).
            if let Some(r) = refused {
                warn!(upstream = %self.name, reason = r.reason, "the upstream refused a message of the gateway's own (may it publish on status_topic and <control_topic>/result?)");
            }
            return Ok(());
        };
        self.last_progress = Instant::now();
        let Some(r) = refused else {
            self.acks.push(id);
            self.metrics.acked.fetch_add(1, Relaxed);
            self.acked_any = true;
            return Ok(());
        };
        self.metrics.count_refusal(r.reason);
        if r.permanent {
            // The broker will never take it: do not block the queue behind it.
            warn!(upstream = %self.name, row = id, reason = r.reason, "dead-lettered: the upstream refused the event");
            self.metrics.dead_lettered.fetch_add(1, Relaxed);
            self.acks.push(id);
            return Ok(());
        }
        // Kept; end the session so it is sent again after the backoff (a
        // broker over quota gets a pause).
        self.unacked.insert(id);
        Err(Ended::lost(
            FailureKind::Refused,
            format!(
                "the upstream refused an event ({}); sending again after a pause",
                r.reason
            ),
        ))
    }

    /// The connection failed.
    pub fn failed(&self, e: LinkError) -> Ended {
        warn!(upstream = %self.name, url = %self.up.url, reason = %e.reason, unacked = self.outstanding(), "uplink lost; unacknowledged events will be resent");
        Ended::lost(e.kind.unwrap_or(FailureKind::Lost), e.reason)
    }

    /// Acknowledged ids to hand to the queue now: all of them when the link
    /// has nothing more ready (`link_idle`), a window of them, or once the
    /// oldest has waited `ACK_FLUSH`. Starts that clock for the next ones.
    pub fn due_acks(&mut self, now: Instant, link_idle: bool) -> Option<Vec<i64>> {
        let mut due = None;
        if link_idle
            || self.acks.len() >= self.window.max(32)
            || self.ack_deadline.is_some_and(|d| d <= now)
        {
            self.ack_deadline = None;
            if !self.acks.is_empty() {
                due = Some(std::mem::take(&mut self.acks));
            }
        }
        if self.ack_deadline.is_none() && !self.acks.is_empty() {
            self.ack_deadline = Some(now + ACK_FLUSH);
        }
        due
    }

    pub fn ack_deadline(&self) -> Option<Instant> {
        self.ack_deadline
    }

    /// When the pace allows the next row.
    pub fn pace_ready(&self) -> Option<Instant> {
        self.pacer.ready_at()
    }

    /// When the session counts as stalled if no PUBACK comes.
    pub fn stall_deadline(&self) -> Option<Instant> {
        (!self.inflight.is_empty()).then(|| self.last_progress + self.ack_limit)
    }

    /// Publishes outstanding and no PUBACK for three keep-alives.
    pub fn stalled(&self, now: Instant) -> Option<Ended> {
        let deadline = self.stall_deadline()?;
        if deadline > now {
            return None;
        }
        let reason = format!(
            "{} publishes outstanding and no PUBACK for {:?} (3 x keep_alive), though the upstream answers pings",
            self.inflight.len(),
            self.ack_limit
        );
        warn!(upstream = %self.name, url = %self.up.url, %reason, "uplink stalled; reconnecting, unacknowledged events will be resent");
        Some(Ended::lost(FailureKind::Stalled, reason))
    }

    /// When the link counts as dead if nothing more is heard.
    pub fn silence_deadline(&self, last_heard: Instant) -> Instant {
        last_heard + self.silence_limit
    }

    /// Nothing heard from the upstream for 1.5 keep-alives.
    pub fn silent(&self, last_heard: Instant, now: Instant) -> Option<Ended> {
        if self.silence_deadline(last_heard) > now {
            return None;
        }
        let reason = format!(
            "nothing heard from the upstream for {:?} (1.5 x keep_alive): the link is dead or half-open",
            self.silence_limit
        );
        warn!(upstream = %self.name, url = %self.up.url, %reason, unacked = self.outstanding(), "uplink lost; unacknowledged events will be resent");
        Some(Ended::lost(FailureKind::Lost, reason))
    }

    /// The session is over: what was on the wire unacknowledged is sent
    /// again next time, and the one decision about what the end means.
    /// (`connected` stays set until the driver has recorded why.)
    pub fn end(self, ended: Ended) -> (Outcome, W) {
        self.metrics.inflight.store(0, Relaxed);
        self.metrics.downlink_subscribed.store(0, Relaxed);
        let on_wire: Vec<i64> = self
            .awaiting
            .iter()
            .map(|(id, _)| *id)
            .chain(self.inflight.values().copied())
            .flatten()
            .collect();
        self.unacked.extend(on_wire.iter().copied());
        // The upstream dropped us without acknowledging anything, though
        // rows were on the wire: the oldest of them is a suspect. Only a
        // connection the upstream dropped (not our stall timeout, not a
        // refusal with a reason) speaks against the row.
        let head = on_wire.iter().copied().min();
        let strike = match (&ended, head) {
            _ if self.acked_any => Strike::Cleared,
            // edgeferry ended it itself: nothing against the rows.
            _ if self.blameless => Strike::Unchanged,
            (
                Ended::Lost {
                    kind: FailureKind::Lost,
                    ..
                },
                Some(row),
            ) => Strike::Against(row),
            _ => Strike::Unchanged,
        };
        let outcome = Outcome {
            ended,
            strike,
            healthy: self.acked_any || self.connected_at.elapsed() >= self.up.reconnect_max.0,
            acks: self.acks,
        };
        (outcome, self.wire)
    }
}

/// Whether to read rows now: the pace allows some, and there is room for a
/// batch (a quarter window), or nothing is out, or the pace is what limits.
/// Not a row per PUBACK: each read is a round trip to the queue thread.
fn read_now(free: usize, allowed: usize, window: usize, refill: usize) -> bool {
    allowed > 0 && (free >= refill || free == window || allowed < free)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::queue::Priority;

    /// Records what was published; fails once `broken`.
    #[derive(Default)]
    struct FakeWire {
        sent: RefCell<Vec<(String, QoS, bytes::Bytes)>>,
        broken: bool,
    }

    impl Wire for &FakeWire {
        fn publish(&self, p: Publish<'_>) -> Result<(), String> {
            if self.broken {
                return Err("event loop gone".into());
            }
            self.sent.borrow_mut().push((p.topic, p.qos, p.payload));
            Ok(())
        }

        fn ack(&self, _: &AckHandle) -> bool {
            true
        }
    }

    fn upstream(extra: &str) -> UpstreamConfig {
        toml::from_str(&format!(
            "url = \"mqtt://127.0.0.1:1\"\ninflight = 8\n{extra}"
        ))
        .unwrap()
    }

    fn row(id: i64, topic: &str, qos: u8) -> Row {
        Row {
            id,
            event_id: format!("e{id}"),
            topic: topic.into(),
            qos,
            priority: Priority::Normal,
            received_ms: crate::event::now_ms(),
            expires_ms: None,
            payload: bytes::Bytes::from_static(b"{\"v\":1}"),
            properties: None,
        }
    }

    /// A session's borrowed context, kept alive by the test.
    struct Fixture {
        up: UpstreamConfig,
        metrics: UplinkMetrics,
        unacked: HashSet<i64>,
        echoes: Echoes,
        wire: FakeWire,
    }

    impl Fixture {
        fn new(extra: &str) -> Fixture {
            Fixture {
                up: upstream(extra),
                metrics: UplinkMetrics::default(),
                unacked: HashSet::new(),
                echoes: Echoes::default(),
                wire: FakeWire::default(),
            }
        }

        fn session(&mut self, receive_max: Option<u16>) -> Session<'_, &FakeWire> {
            self.session_at(receive_max, 0)
        }

        /// With `boundary`: the last row queued before the connection.
        fn session_at(
            &mut self,
            receive_max: Option<u16>,
            boundary: i64,
        ) -> Session<'_, &FakeWire> {
            let c = Connected {
                name: "cloud",
                up: &self.up,
                metrics: &self.metrics,
                unacked: &mut self.unacked,
                echoes: &mut self.echoes,
                session_present: false,
                receive_max,
                boundary,
                connected_at: Instant::now(),
                connected_ms: crate::event::now_ms(),
            };
            Session::connected(&self.wire, c)
        }
    }

    #[test]
    fn rows_go_out_in_order_and_their_acks_are_handed_over_after_the_flush_delay() {
        let mut f = Fixture::new("");
        let mut s = f.session(None);
        let room = s.room();
        assert!(room.due && !room.paced);
        assert_eq!(room.allowed, 8);
        let rows = vec![row(1, "a", 1), row(2, "b", 1)];
        assert_eq!(s.send(rows, room.allowed), Ok(Sent::Wait));
        assert!(s.drained, "fewer rows than asked: the queue is drained");
        assert_eq!(s.outstanding(), 2);
        s.written(11);
        s.written(12);
        assert!(s.stall_deadline().is_some(), "the ack clock runs");
        s.acked(12, None).unwrap();
        s.acked(11, None).unwrap();
        s.acked(99, None).unwrap(); // unknown pkid: ignored
        let now = Instant::now();
        assert_eq!(s.due_acks(now, false), None, "acks wait up to ACK_FLUSH");
        assert_eq!(s.due_acks(now + ACK_FLUSH, false), Some(vec![2, 1]));
        assert_eq!(s.stall_deadline(), None);
        let (out, wire) = s.end(Ended::Shutdown);
        assert!(out.healthy, "it acknowledged something");
        assert_eq!(out.strike, Strike::Cleared);
        let topics: Vec<_> = wire.sent.borrow().iter().map(|p| p.0.clone()).collect();
        assert_eq!(topics, ["a", "b"]);
        assert_eq!(f.metrics.acked.load(Relaxed), 2);
    }

    /// With ack = "stored" a sensor's PUBACK waits for this hand-over: the
    /// acks go as soon as the link has nothing more ready, not when the
    /// flush clock runs out (which made the PUBACK's p50 3.6 ms at 5,000
    /// events/s). While more are ready they wait, to go together.
    #[test]
    fn acks_are_handed_over_at_once_when_the_link_has_nothing_more_ready() {
        let mut f = Fixture::new("");
        let mut s = f.session(None);
        let room = s.room();
        let rows = vec![row(1, "a", 1), row(2, "b", 1)];
        assert_eq!(s.send(rows, room.allowed), Ok(Sent::Wait));
        s.written(11);
        s.written(12);
        s.acked(11, None).unwrap();
        let now = Instant::now();
        assert_eq!(s.due_acks(now, false), None, "more are ready: wait");
        assert_eq!(s.due_acks(now, true), Some(vec![1]), "idle: at once");
        s.acked(12, None).unwrap();
        assert_eq!(s.due_acks(now, true), Some(vec![2]));
        assert_eq!(s.due_acks(now, true), None, "nothing left");
    }

    #[test]
    fn a_session_dropped_with_rows_on_the_wire_strikes_the_oldest_and_resends_them() {
        let mut f = Fixture::new("");
        let mut s = f.session(None);
        s.send(vec![row(5, "a", 1), row(6, "a", 1), row(7, "a", 1)], 8)
            .unwrap();
        s.written(1);
        s.written(2); // row 7 is still awaiting its pkid
        let lost = s.failed(LinkError {
            kind: None,
            reason: "reset".into(),
        });
        let (out, _) = s.end(lost);
        assert_eq!(out.strike, Strike::Against(5));
        assert!(
            !out.healthy,
            "nothing acked and up for less than reconnect_max"
        );
        assert_eq!(f.unacked, HashSet::from([5, 6, 7]));

        // The next session sends them again: counted as re-sends.
        let mut s = f.session(None);
        s.send(vec![row(5, "a", 1), row(6, "a", 1)], 8).unwrap();
        drop(s);
        assert_eq!(f.metrics.resent.load(Relaxed), 2);
        assert_eq!(f.unacked, HashSet::from([7]));
    }

    #[test]
    fn refusals_dead_letter_or_end_the_session_by_their_kind() {
        let mut f = Fixture::new("");
        let mut s = f.session(None);
        s.send(vec![row(1, "a", 1), row(2, "a", 1)], 8).unwrap();
        s.written(1);
        s.written(2);
        let permanent = Refusal {
            reason: "not_authorized",
            permanent: true,
        };
        s.acked(1, Some(permanent)).unwrap();
        let quota = Refusal {
            reason: "quota_exceeded",
            permanent: false,
        };
        let ended = s.acked(2, Some(quota)).unwrap_err();
        assert!(matches!(
            ended,
            Ended::Lost {
                kind: FailureKind::Refused,
                ..
            }
        ));
        let (out, _) = s.end(ended);
        assert_eq!(out.acks, vec![1], "the permanent refusal is deleted");
        assert_eq!(
            out.strike,
            Strike::Unchanged,
            "a refusal with a reason is no strike"
        );
        assert!(
            f.unacked.contains(&2),
            "the other is kept for the next session"
        );
        assert_eq!(f.metrics.dead_lettered.load(Relaxed), 1);
    }

    #[test]
    fn an_unsendable_row_is_dead_lettered_without_blocking_the_next() {
        let mut f = Fixture::new("max_packet_size = \"1KiB\"");
        let mut s = f.session(None);
        let mut big = row(2, "a", 1);
        big.payload = bytes::Bytes::from(vec![b'x'; 2048]);
        let rows = vec![row(1, "a/+", 1), big];
        // Asked for 2, got 2, none published: read again at once.
        assert_eq!(s.send(rows, 2), Ok(Sent::ReadAgain));
        s.send(vec![row(3, "a", 0)], 2).unwrap();
        s.written(0);
        let now = Instant::now();
        assert_eq!(s.due_acks(now, false), None);
        assert_eq!(s.due_acks(now + ACK_FLUSH, false), Some(vec![1, 2, 3]));
        let (_, wire) = s.end(Ended::Shutdown);
        assert_eq!(wire.sent.borrow().len(), 1, "only the QoS 0 row went out");
        assert_eq!(f.metrics.dead_lettered.load(Relaxed), 2);
        assert_eq!(
            f.metrics.acked.load(Relaxed),
            1,
            "QoS 0 is done when written"
        );
    }

    #[test]
    fn a_receive_maximum_caps_the_window_and_a_full_window_reads_nothing() {
        let mut f = Fixture::new("");
        let mut s = f.session(Some(2));
        assert_eq!(s.room().allowed, 2);
        s.send(vec![row(1, "a", 1), row(2, "a", 1)], 2).unwrap();
        let room = s.room();
        assert!(!room.due && room.allowed == 0 && !room.paced);
        assert_eq!(f.metrics.window.load(Relaxed), 2);
    }

    #[test]
    fn no_puback_for_three_keep_alives_or_silence_for_one_and_a_half_ends_it() {
        let mut f = Fixture::new("keep_alive = \"10s\"");
        let mut s = f.session(None);
        let now = Instant::now();
        assert!(
            s.stalled(now + Duration::from_secs(3600)).is_none(),
            "nothing out"
        );
        s.send(vec![row(1, "a", 1)], 8).unwrap();
        s.written(1);
        assert!(s.stalled(now + Duration::from_secs(29)).is_none());
        let stalled = s.stalled(now + Duration::from_secs(31)).unwrap();
        assert!(matches!(
            stalled,
            Ended::Lost {
                kind: FailureKind::Stalled,
                ..
            }
        ));
        assert!(s.silent(now, now + Duration::from_secs(14)).is_none());
        assert!(s.silent(now, now + Duration::from_secs(16)).is_some());
        let (out, _) = s.end(stalled);
        assert_eq!(
            out.strike,
            Strike::Unchanged,
            "our own timeout is no strike"
        );
    }

    #[test]
    fn a_link_that_is_gone_ends_the_session_at_the_publish() {
        let mut f = Fixture::new("");
        f.wire.broken = true;
        let mut s = f.session(None);
        let ended = s.send(vec![row(1, "a", 1)], 8).unwrap_err();
        assert!(matches!(
            ended,
            Ended::Lost {
                kind: FailureKind::Lost,
                ..
            }
        ));
    }

    #[test]
    fn live_first_reads_new_rows_from_above_the_boundary() {
        let mut f = Fixture::new("drain_order = \"live_first\"");
        let mut s = f.session_at(None, 10);
        s.send(vec![row(12, "live", 1), row(3, "old", 1)], 8)
            .unwrap();
        let p = s.position;
        assert_eq!(p.live_after.0[Priority::Normal.index()], 12);
        assert_eq!(p.after.0[Priority::Normal.index()], 3);
        assert_eq!(p.waiting_cursor(), p.live_after);
    }
}
