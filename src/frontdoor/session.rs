//! One client connection through the front door.
//!
//! The session reads the client's CONNECT, checks its login, opens a
//! connection of the same protocol to the embedded broker's internal
//! listener and then relays in both directions, stepping in where
//! edgeferry's promises need it:
//!
//! - a PUBLISH from the client goes to the pipeline (with the client's id
//!   and user) and, if a local subscriber may want it (`subscribers`) or
//!   it is retained, stripped of MQTT 5 properties and renumbered, to the
//!   broker. Its PUBACK (PUBREC for QoS 2) comes from
//!   here, in the order the publishes came, once the event's receipt says
//!   it is safe (`ack = "stored"`) or at once (`"received"`); the broker's
//!   own acknowledgements of what we forward are swallowed. With
//!   `"received"`, once `window` acknowledged events are not yet safe the
//!   next PUBACKs wait for safety too, so a sensor is paced and a crash
//!   loses at most a window of what it was told was received;
//! - flow control: at most `window` publishes are unacknowledged or
//!   waiting for the pipeline; a publish beyond that waits in the read
//!   buffer and the client's socket is not read (TCP pushes back). A client
//!   within its window keeps being read, so its pings are answered while
//!   its publishes wait;
//! - the ACL: denied publishes are answered (MQTT 5: "not authorized") and
//!   dropped, denied subscriptions refused in the SUBACK, and deliveries a
//!   client may not read are acknowledged to the broker and dropped;
//! - keep-alive: the session answers the client's PINGREQ itself and pings
//!   the broker on its own schedule, so a held publisher is never timed
//!   out by the broker.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tracing::debug;

use super::Door;
use super::subscribers;
use super::wire::{self, ConnectRefusal, Packet, Refusal, Version, View, WireError};
use crate::codec::Payload;
use crate::event::Event;
use crate::receipt::{Outcome, Receipt};
use crate::router::Inbound;

/// Why a session ended other than by the client's DISCONNECT.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("no CONNECT within {0:?}")]
    ConnectTimeout(Duration),
    #[error("login refused")]
    Refused,
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("the embedded broker closed the connection or refused it")]
    BrokerGone,
    /// An event could not be stored; the client gets no acknowledgement
    /// and its session sends the event again when it reconnects.
    #[error("an event could not be stored; closing so the client sends it again")]
    NotStored,
    #[error("no packet from the client for 1.5 keep-alive periods")]
    KeepAlive,
}

/// A client must send its CONNECT this soon after connecting.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The keep-alive the session asks of the broker, and how often it pings.
const BROKER_KEEP_ALIVE: u16 = 60;
const BROKER_PING_EVERY: Duration = Duration::from_secs(20);
/// A connection's read buffers start this small (they grow for a large
/// packet) and go back to it once empty when they grew past `TRIM_ABOVE`:
/// thousands of idle sensors should not each keep a burst's worth of RAM.
const READ_BUF: usize = 1024;
const TRIM_ABOVE: usize = 16 * 1024;
/// At shutdown, how long a session waits for the outcomes of what it sent
/// into the pipeline, to acknowledge them before closing.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Serve one client until it disconnects, the daemon stops or something
/// fails. `identity`: the common name of the client's verified TLS
/// certificate, which is then its login and user name.
pub async fn serve<S>(
    door: Arc<Door>,
    mut client: S,
    events: mpsc::Sender<Inbound>,
    shutdown: watch::Receiver<bool>,
    identity: Option<String>,
) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut cbuf = BytesMut::with_capacity(READ_BUF);
    let (version, connect) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        read_connect(&mut client, &mut cbuf, door.max_packet),
    )
    .await
    .map_err(|_| SessionError::ConnectTimeout(CONNECT_TIMEOUT))??;
    let Some(mut info) = connect.connect_info() else {
        return Err(SessionError::Protocol("first packet is not CONNECT"));
    };
    let certified = identity.is_some();
    if certified {
        info.username = identity;
    }
    if !admit(&door, &mut client, version, &info, certified).await? {
        return Ok(());
    }
    let (mut broker, bbuf) = open_broker(&door, &mut client, version, connect).await?;

    let (outcomes_tx, outcomes) = mpsc::unbounded_channel();
    let client_id: Arc<str> = info.client_id.as_str().into();
    let mut session = Session {
        version,
        username: info.username.as_deref().map(Into::into),
        client_id,
        keep_alive: Duration::from_millis(u64::from(info.keep_alive) * 1500),
        will: info.will,
        events: Some(events),
        outcomes_tx,
        pending: VecDeque::new(),
        next_seq: 0,
        unsettled: 0,
        outbox: VecDeque::new(),
        pipeline_full: false,
        held_since: None,
        held_carry: Duration::ZERO,
        broker_pkids: HashSet::new(),
        next_pkid: 0,
        refused_subs: HashMap::new(),
        denied_qos2: HashSet::new(),
        subscribed: door
            .subscribers
            .open(&info.client_id, info.clean_start, !info.clean_start),
        cout: BytesMut::new(),
        bout: BytesMut::new(),
        door,
    };
    session.door.metrics.door_connections.fetch_add(1, Relaxed);
    let result = session
        .run(&mut client, cbuf, &mut broker, bbuf, outcomes, shutdown)
        .await;
    session.end_hold();
    if result.is_err() {
        session.route_will();
        // What it sent goes on, then the will (with "received" what it sent
        // was acknowledged); draining lets go of the pipeline, so a stop
        // does not wait for the broker's hang-up below.
        session.drain().await;
        // The connection counts until the broker has let go of it too.
        crate::broker::hang_up(&mut broker, false).await;
    }
    session.door.metrics.door_connections.fetch_sub(1, Relaxed);
    session.door.subscribers.closed(session.subscribed);
    result
}

/// Whether this CONNECT may go on to the broker: its client id and login
/// (or verified certificate). A refusal is answered here; `Ok(false)` is
/// the health probe, refused without counting.
async fn admit<S: AsyncWrite + Unpin>(
    door: &Door,
    client: &mut S,
    version: Version,
    info: &wire::ConnectInfo,
    certified: bool,
) -> Result<bool, SessionError> {
    // rumqttd refuses these ids by closing, without a CONNACK; and a
    // wildcard or a level separator in an id must never reach an ACL
    // pattern's %c.
    if "+#/$".chars().any(|c| info.client_id.contains(c)) {
        refuse(client, version, ConnectRefusal::ClientId).await?;
        door.metrics.door_protocol_errors.fetch_add(1, Relaxed);
        return Err(SessionError::Refused);
    }
    if info.client_id == super::auth::HEALTH_PROBE_ID {
        refuse(client, version, ConnectRefusal::ClientId).await?;
        return Ok(false);
    }
    let reserved = info.client_id.starts_with(super::auth::RESERVED_ID_PREFIX);
    let allowed = match &door.auth {
        // A verified client certificate is the login.
        _ if certified => !reserved,
        Some(auth) if !reserved => {
            auth.check(
                &info.client_id,
                info.username.as_deref(),
                info.password.as_deref(),
            )
            .await
        }
        Some(auth) => {
            auth.refused(&info.client_id);
            false
        }
        None => !reserved,
    };
    if !allowed {
        let why = match reserved {
            true => ConnectRefusal::ClientId,
            false => ConnectRefusal::Login,
        };
        refuse(client, version, why).await?;
        return Err(SessionError::Refused);
    }
    Ok(true)
}

/// Relay the CONNECT to the embedded broker's internal listener for this
/// protocol version (with edgeferry's own login) and its CONNACK, capped
/// to the door's window, back to the client.
async fn open_broker<S: AsyncWrite + Unpin>(
    door: &Door,
    client: &mut S,
    version: Version,
    mut connect: Packet,
) -> Result<(TcpStream, BytesMut), SessionError> {
    let mut broker = TcpStream::connect(match version {
        Version::V4 => door.broker.v4,
        Version::V5 => door.broker.v5,
    })
    .await?;
    broker.set_nodelay(true)?;
    connect.strip_properties();
    connect.connect_for_broker(&door.broker.user, &door.broker.secret, BROKER_KEEP_ALIVE);
    let mut out = BytesMut::new();
    connect.write(&mut out)?;
    broker.write_all(&out).await?;
    let mut bbuf = BytesMut::with_capacity(READ_BUF);
    let Some(mut connack) = read_packet(&mut broker, &mut bbuf, version, usize::MAX).await? else {
        refuse(client, version, ConnectRefusal::Unavailable).await?;
        return Err(SessionError::BrokerGone);
    };
    let View::ConnAck(accepted) = connack.view() else {
        return Err(SessionError::BrokerGone);
    };
    connack.limit_connack(door.window);
    out.clear();
    connack.write(&mut out)?;
    client.write_all(&out).await?;
    if !accepted {
        return Err(SessionError::BrokerGone);
    }
    Ok((broker, bbuf))
}

/// Answer a CONNECT with a refusal.
async fn refuse<S: AsyncWrite + Unpin>(
    client: &mut S,
    version: Version,
    why: ConnectRefusal,
) -> Result<(), SessionError> {
    let mut out = BytesMut::new();
    version.connack_refused(why).write(&mut out)?;
    client.write_all(&out).await?;
    Ok(())
}

/// Read until a whole CONNECT is there.
async fn read_connect<S: AsyncRead + Unpin>(
    client: &mut S,
    buf: &mut BytesMut,
    max: usize,
) -> Result<(Version, Packet), SessionError> {
    loop {
        if let Some(version) = wire::sniff(buf)?
            && let Some(p) = version.read(buf, max)?
        {
            return Ok((version, p));
        }
        if client.read_buf(buf).await? == 0 {
            return Err(SessionError::Protocol("closed before CONNECT"));
        }
    }
}

async fn read_packet<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    version: Version,
    max: usize,
) -> Result<Option<Packet>, SessionError> {
    loop {
        if let Some(p) = version.read(buf, max)? {
            return Ok(Some(p));
        }
        if s.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// A publish of the client's that waits for its acknowledgement.
struct Pending {
    seq: u64,
    pkid: u16,
    qos: u8,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Its receipt is out.
    Waiting,
    Safe,
    /// Refused by the front door: answered with this reason (MQTT 5).
    Refused(Refusal),
    /// The event could not be stored.
    Failed,
}

/// Where [`Session::take_packets`] stopped.
enum Taken {
    /// No whole packet is left.
    All,
    /// At a publish the window has no room for; it and the rest wait in
    /// the buffer.
    Window,
    /// The client said DISCONNECT.
    Close,
}

/// What the relay does after a packet.
enum Flow {
    Continue,
    /// The client said DISCONNECT.
    Close,
}

struct Session {
    door: Arc<Door>,
    version: Version,
    /// Who published, for the rules (`meta.client_id`, `meta.username`).
    client_id: Arc<str>,
    username: Option<Arc<str>>,
    /// 1.5 times the client's keep-alive (zero: none).
    keep_alive: Duration,
    will: Option<(Vec<u8>, Bytes)>,
    /// The pipeline; `None` once stopping (so the router can drain).
    events: Option<mpsc::Sender<Inbound>>,
    /// Receipts report here.
    outcomes_tx: mpsc::UnboundedSender<Outcome>,
    /// QoS 1/2 publishes not yet acknowledged, in the order they came.
    pending: VecDeque<Pending>,
    next_seq: u64,
    /// Receipts out and not yet reported: events of this connection's in
    /// the pipeline that are not yet safe. With `ack = "received"` a
    /// publish is acknowledged at once only while these are under the
    /// window (the loss bound).
    unsettled: usize,
    /// Events read and not yet taken by the pipeline.
    outbox: VecDeque<Inbound>,
    /// The pipeline was full when the outbox last tried it.
    pipeline_full: bool,
    /// Since when this connection has been held (not read for the
    /// pipeline's sake: see [`Session::note_held`]).
    held_since: Option<Instant>,
    /// Held time not yet counted (under a millisecond).
    held_carry: Duration,
    /// Packet ids of our publishes to the broker not yet acknowledged by it.
    broker_pkids: HashSet<u16>,
    next_pkid: u16,
    /// SUBSCRIBEs sent to the broker with some filters taken out: which.
    refused_subs: HashMap<u16, Vec<bool>>,
    /// QoS 2 deliveries the client may not read, acknowledged by us.
    denied_qos2: HashSet<u16>,
    /// This connection's filters in the door's registry.
    subscribed: subscribers::Key,
    /// Bytes to write to the client and to the broker after this round.
    cout: BytesMut,
    bout: BytesMut,
}

impl Session {
    async fn run<C>(
        &mut self,
        client: &mut C,
        mut cbuf: BytesMut,
        broker: &mut TcpStream,
        mut bbuf: BytesMut,
        mut outcomes: mpsc::UnboundedReceiver<Outcome>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), SessionError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let window = usize::from(self.door.window);
        let mut last_read = tokio::time::Instant::now();
        let mut ping = tokio::time::interval(BROKER_PING_EVERY);
        ping.tick().await;
        let mut was_held = false;
        loop {
            // What the client sent (first: what came with the CONNECT), up
            // to a publish the window has no room for, which waits in the
            // buffer. A hand-over or acknowledgements may make room.
            let blocked = loop {
                let taken = self.take_packets(&mut cbuf, window)?;
                if let Taken::Close = taken {
                    return self.close(client, broker).await;
                }
                if !self.outbox.is_empty() && !self.pipeline_full {
                    self.hand_over();
                }
                self.flush_acks()?;
                let blocked = matches!(taken, Taken::Window);
                if !(blocked && self.within(window)) {
                    break blocked;
                }
            };
            self.flush(client, broker).await?;
            for buf in [&mut cbuf, &mut bbuf, &mut self.cout, &mut self.bout] {
                trim(buf);
            }
            // A client that keeps to its window is read on while it waits
            // for its acknowledgements (its pings are answered); one past
            // it, only once the waiting publish is taken.
            let can_read = !blocked;
            if !can_read || was_held {
                // Not reading is our doing: the keep-alive starts again
                // (also as reading resumes, however long the hold was).
                last_read = tokio::time::Instant::now();
            }
            was_held = !can_read;
            self.note_held(window);
            let expires = last_read + self.keep_alive;
            // A clone, so the permit does not borrow the session.
            let events = self.events.clone();
            tokio::select! {
                biased;
                _ = stopped(&mut shutdown) => {
                    return self.stop(client, broker, &mut outcomes).await;
                }
                Some((seq, ok)) = outcomes.recv() => {
                    // All that came, so their PUBACKs go out in one write.
                    self.settled(seq, ok)?;
                    while let Ok((seq, ok)) = outcomes.try_recv() {
                        self.settled(seq, ok)?;
                    }
                }
                permit = reserve(&events), if !self.outbox.is_empty() => {
                    let Ok(permit) = permit else { return Err(SessionError::NotStored) };
                    if let Some(event) = self.outbox.pop_front() {
                        permit.send(event);
                        self.door.metrics.handed.fetch_add(1, Relaxed);
                    }
                    self.hand_over();
                }
                read = client.read_buf(&mut cbuf), if can_read => {
                    if read? == 0 {
                        return Err(SessionError::Protocol("closed without DISCONNECT"));
                    }
                    last_read = tokio::time::Instant::now();
                }
                read = broker.read_buf(&mut bbuf) => {
                    if read? == 0 {
                        self.flush(client, broker).await?;
                        return Err(SessionError::BrokerGone);
                    }
                    while let Some(p) = self.version.read(&mut bbuf, usize::MAX)? {
                        if let Flow::Close = self.on_broker_packet(p)? {
                            self.flush(client, broker).await?;
                            return Err(SessionError::BrokerGone);
                        }
                    }
                }
                _ = tokio::time::sleep_until(expires), if can_read && !self.keep_alive.is_zero() => {
                    return Err(SessionError::KeepAlive);
                }
                _ = ping.tick() => self.version.pingreq().write(&mut self.bout)?,
            }
        }
    }

    /// Whether another publish of the client's may be taken: its publishes
    /// unacknowledged, waiting for the pipeline and relayed to the broker
    /// unacknowledged are each under the window.
    fn within(&self, window: usize) -> bool {
        self.pending.len() < window
            && self.outbox.len() < window
            && self.broker_pkids.len() < window
    }

    /// Take the client's whole packets from `buf` while within the window.
    fn take_packets(&mut self, buf: &mut BytesMut, window: usize) -> Result<Taken, SessionError> {
        loop {
            // The packet type is the first byte's high nibble (3: PUBLISH);
            // other packets need no room.
            if buf.first().is_some_and(|b| b >> 4 == 3) && !self.within(window) {
                return Ok(Taken::Window);
            }
            let Some(p) = self.version.read(buf, self.door.max_packet)? else {
                return Ok(Taken::All);
            };
            if let Flow::Close = self.on_client_packet(p)? {
                return Ok(Taken::Close);
            }
        }
    }

    /// One packet from the client.
    fn on_client_packet(&mut self, mut p: Packet) -> Result<Flow, SessionError> {
        match p.view() {
            View::Publish(_) => self.publish(p)?,
            // QoS 2 from the client: we sent PUBREC, it releases, we complete.
            View::PubRel(pkid) => self.version.pubcomp(pkid).write(&mut self.cout)?,
            // Acknowledgements of the broker's deliveries, and unsubscribes.
            View::PubAck(_) | View::PubRec(_) | View::PubComp(_) | View::Unsubscribe => {
                p.write(&mut self.bout)?
            }
            View::Subscribe { pkid, filters } => {
                let keep = self.allowed_filters(&filters);
                // Known before the broker has them: a publish after the
                // SUBACK is relayed.
                self.door.subscribers.subscribe(
                    self.subscribed,
                    filters
                        .iter()
                        .zip(&keep)
                        .filter(|(_, k)| **k)
                        .map(|(f, _)| *f),
                );
                let n = keep.len();
                match keep.iter().filter(|k| **k).count() {
                    all if all == n => p.write(&mut self.bout)?,
                    0 => self.version.suback_refused(pkid, n).write(&mut self.cout)?,
                    _ => {
                        p.retain_filters(&keep);
                        self.refused_subs.insert(pkid, keep);
                        p.write(&mut self.bout)?;
                    }
                }
            }
            View::PingReq => self.version.pingresp().write(&mut self.cout)?,
            View::Disconnect => {
                p.write(&mut self.bout)?;
                self.will = None;
                return Ok(Flow::Close);
            }
            View::Connect => return Err(SessionError::Protocol("a second CONNECT")),
            View::Auth => return Err(SessionError::Protocol("AUTH is not supported")),
            View::ConnAck(_) | View::SubAck(_) | View::UnsubAck | View::PingResp => {
                return Err(SessionError::Protocol("a packet only a server sends"));
            }
        }
        Ok(Flow::Continue)
    }

    /// A PUBLISH from the client: checked, forwarded to the broker, put
    /// into the pipeline, and its acknowledgement arranged.
    fn publish(&mut self, mut p: Packet) -> Result<(), SessionError> {
        let View::Publish(v) = p.view() else {
            return Ok(());
        };
        if v.alias {
            return Err(SessionError::Protocol("topic alias (none was offered)"));
        }
        let (qos, pkid, retain, payload) = (v.qos, v.pkid, v.retain, v.payload.clone());
        let door = self.door.clone();
        let m = &door.metrics;
        let Some(topic) = wire::valid_topic(v.topic) else {
            m.door_rejected_topic.fetch_add(1, Relaxed);
            door.warn_refused(
                &self.client_id,
                v.topic,
                "its topic has a character MQTT forbids or discourages (control character, non-character) or a wildcard",
            );
            self.answer(qos, pkid, State::Refused(Refusal::TopicInvalid));
            return Ok(());
        };
        if payload.len() > door.max_payload {
            m.door_rejected_payload.fetch_add(1, Relaxed);
            door.warn_refused(
                &self.client_id,
                v.topic,
                &format!(
                    "its payload of {} bytes is over broker.max_payload ({} bytes)",
                    payload.len(),
                    door.max_payload
                ),
            );
            self.answer(qos, pkid, State::Refused(Refusal::TooLarge));
            return Ok(());
        }
        if let Some(acl) = &door.acl
            && !acl
                .current()
                .can_write(&self.client_id, self.username.as_deref(), topic)
        {
            m.door_denied_publish.fetch_add(1, Relaxed);
            self.answer(qos, pkid, State::Refused(Refusal::NotAuthorized));
            return Ok(());
        }
        let routed = door.ingests(topic);
        let relayed = door.subscribers.wanted(topic, retain);
        let topic = routed.then(|| topic.to_string());
        // To the broker, for local subscribers, under our own packet id.
        if relayed {
            p.strip_properties();
            if qos > 0 {
                let id = self.broker_pkid();
                p.set_pkid(id);
            }
            p.write(&mut self.bout)?;
            m.door_relayed.fetch_add(1, Relaxed);
        }
        m.door_publishes.fetch_add(1, Relaxed);
        let Some(topic) = topic else {
            self.answer(qos, pkid, State::Safe);
            return Ok(());
        };
        let mut event = Event::from_publish(topic, payload);
        event.client_id = self.client_id.clone();
        event.username = self.username.clone();
        count_decoded(m, &event);
        let receipt = match qos {
            0 => None,
            _ => {
                // With `ack = "received"` the PUBACK goes now, unless the
                // window's worth of acknowledged events are not yet safe:
                // then it waits for its own receipt, as with "stored". The
                // sensor is paced by its acknowledgements (and is read on,
                // so its pings are answered), and a crash loses at most a
                // window of what it was told was received.
                let seq = self.next_seq;
                let state = match door.ack_after_store {
                    false if self.unsettled < usize::from(door.window) => State::Safe,
                    _ => State::Waiting,
                };
                self.answer(qos, pkid, state);
                self.unsettled += 1;
                Some(Receipt::new(seq, self.outcomes_tx.clone()))
            }
        };
        self.outbox.push_back(Inbound { event, receipt });
        Ok(())
    }

    /// Queue the acknowledgement of a client publish (none for QoS 0).
    fn answer(&mut self, qos: u8, pkid: u16, state: State) {
        if qos == 0 {
            return;
        }
        self.pending.push_back(Pending {
            seq: self.next_seq,
            pkid,
            qos,
            state,
        });
        self.next_seq += 1;
    }

    /// A receipt's outcome came back.
    fn settled(&mut self, seq: u64, ok: bool) -> Result<(), SessionError> {
        self.unsettled = self.unsettled.saturating_sub(1);
        let first = self.pending.front().map_or(self.next_seq, |p| p.seq);
        match seq.checked_sub(first) {
            // Not yet acknowledged: now it is decided.
            Some(i) => {
                if let Some(p) = self.pending.get_mut(i as usize) {
                    p.state = if ok { State::Safe } else { State::Failed };
                }
                Ok(())
            }
            // Acknowledged when read (`ack = "received"`). One that could
            // not be stored (counted where it happened) closes the
            // connection as a waiting one does: its freed slot must not let
            // the sensor be told received of more that is then dropped.
            None if !ok => Err(SessionError::NotStored),
            None => Ok(()),
        }
    }

    /// Acknowledge, in order, every publish at the front that is decided.
    fn flush_acks(&mut self) -> Result<(), SessionError> {
        while let Some(p) = self.pending.front() {
            let refusal = match p.state {
                State::Waiting => break,
                State::Failed => return Err(SessionError::NotStored),
                State::Safe => None,
                State::Refused(r) => Some(r),
            };
            let ack = match p.qos {
                1 => self.version.puback(p.pkid, refusal),
                _ => self.version.pubrec(p.pkid, refusal),
            };
            ack.write(&mut self.cout)?;
            self.pending.pop_front();
        }
        Ok(())
    }

    /// Give the pipeline what it takes now.
    fn hand_over(&mut self) {
        let m = &self.door.metrics;
        while let Some(event) = self.outbox.pop_front() {
            let Some(events) = &self.events else { break };
            match events.try_send(event) {
                Ok(()) => {
                    m.handed.fetch_add(1, Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(event))
                | Err(mpsc::error::TrySendError::Closed(event)) => {
                    self.outbox.push_front(event);
                    self.pipeline_full = true;
                    return;
                }
            }
        }
        self.pipeline_full = false;
    }

    /// Count the time this connection is held for the pipeline's sake
    /// (`local_publishers_held_seconds`): events it sent wait for a full
    /// pipeline, or, with `ack = "received"`, `window` events are not yet
    /// safe, so its acknowledgements wait. (With `"stored"` waiting for
    /// them is the mode's promise, not a hold.)
    /// Counted as it goes, so a connection held for good shows.
    fn note_held(&mut self, window: usize) {
        let held = self.pipeline_full || (!self.door.ack_after_store && self.unsettled >= window);
        if held || self.held_since.is_some() {
            let now = Instant::now();
            if let Some(since) = self.held_since.replace(now) {
                self.add_held(now - since);
            }
            if !held {
                self.held_since = None;
            }
        }
    }

    /// The session ends: a hold still open counts up to now.
    fn end_hold(&mut self) {
        if let Some(since) = self.held_since.take() {
            self.add_held(since.elapsed());
        }
    }

    /// Add to the held time in whole milliseconds, carrying the rest (holds
    /// of a fraction of a millisecond, each ended by a batch of
    /// acknowledgements, add up).
    fn add_held(&mut self, d: Duration) {
        self.held_carry += d;
        let ms = self.held_carry.as_millis() as u64;
        if ms > 0 {
            self.held_carry -= Duration::from_millis(ms);
            self.door.metrics.door_held_ms.fetch_add(ms, Relaxed);
        }
    }

    /// One packet from the broker.
    fn on_broker_packet(&mut self, p: Packet) -> Result<Flow, SessionError> {
        match p.view() {
            View::Publish(v) => {
                let readable = match (&self.door.acl, std::str::from_utf8(v.topic)) {
                    (None, _) => true,
                    (Some(acl), Ok(topic)) => {
                        acl.current()
                            .can_read(&self.client_id, self.username.as_deref(), topic)
                    }
                    (Some(_), Err(_)) => false,
                };
                if readable {
                    p.write(&mut self.cout)?;
                } else {
                    self.door.metrics.door_denied_delivery.fetch_add(1, Relaxed);
                    match v.qos {
                        0 => {}
                        1 => self.version.puback(v.pkid, None).write(&mut self.bout)?,
                        _ => {
                            self.denied_qos2.insert(v.pkid);
                            self.version.pubrec(v.pkid, None).write(&mut self.bout)?
                        }
                    }
                }
            }
            // The broker's acknowledgements of what we forwarded.
            View::PubAck(pkid) | View::PubComp(pkid) => {
                self.broker_pkids.remove(&pkid);
            }
            View::PubRec(pkid) => self.version.pubrel(pkid).write(&mut self.bout)?,
            View::PubRel(pkid) if self.denied_qos2.remove(&pkid) => {
                self.version.pubcomp(pkid).write(&mut self.bout)?
            }
            View::PubRel(_) | View::UnsubAck => p.write(&mut self.cout)?,
            View::SubAck(pkid) => {
                let mut p = p;
                if let Some(kept) = self.refused_subs.remove(&pkid) {
                    p.refuse_in_suback(&kept);
                }
                p.write(&mut self.cout)?;
            }
            View::PingResp | View::ConnAck(_) => {}
            View::Disconnect => {
                // MQTT 5: the broker says why (a session taken over).
                p.write(&mut self.cout)?;
                return Ok(Flow::Close);
            }
            View::Connect
            | View::Subscribe { .. }
            | View::Unsubscribe
            | View::PingReq
            | View::Auth => {}
        }
        Ok(Flow::Continue)
    }

    /// Which of a SUBSCRIBE's filters may go to the broker: well-formed
    /// (rumqttd grants `a/#/b` and the empty filter) and allowed by the ACL.
    fn allowed_filters(&self, filters: &[&str]) -> Vec<bool> {
        let acl = self.door.acl.as_ref().map(|a| a.current());
        filters
            .iter()
            .map(|f| {
                let ok = rumqttd::protocol::valid_filter(f)
                    && acl.as_ref().is_none_or(|acl| {
                        acl.can_subscribe(&self.client_id, self.username.as_deref(), f)
                    });
                if !ok {
                    self.door
                        .metrics
                        .door_denied_subscribe
                        .fetch_add(1, Relaxed);
                }
                ok
            })
            .collect()
    }

    /// A packet id for a publish to the broker, not in use.
    fn broker_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if self.broker_pkids.insert(self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    async fn flush<C: AsyncWrite + Unpin>(
        &mut self,
        client: &mut C,
        broker: &mut TcpStream,
    ) -> Result<(), SessionError> {
        if !self.bout.is_empty() {
            broker.write_all(&self.bout).await?;
            self.bout.clear();
        }
        if !self.cout.is_empty() {
            client.write_all(&self.cout).await?;
            self.cout.clear();
        }
        Ok(())
    }

    /// The client said DISCONNECT: hand over what it sent, acknowledge what
    /// becomes safe in the grace period, and close both sides.
    async fn close<C: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        client: &mut C,
        broker: &mut TcpStream,
    ) -> Result<(), SessionError> {
        self.flush(client, broker).await?;
        self.drain().await;
        crate::broker::hang_up(broker, true).await;
        Ok(())
    }

    /// The daemon stops: stop reading, put what was read into the
    /// pipeline, let go of it so the router can drain, and acknowledge what
    /// is stored within the grace period.
    async fn stop<C: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        client: &mut C,
        broker: &mut TcpStream,
        outcomes: &mut mpsc::UnboundedReceiver<Outcome>,
    ) -> Result<(), SessionError> {
        self.drain().await;
        let give_up = tokio::time::Instant::now() + STOP_GRACE;
        while self.pending.iter().any(|p| p.state == State::Waiting) {
            match tokio::time::timeout_at(give_up, outcomes.recv()).await {
                Ok(Some((seq, ok))) if self.settled(seq, ok).is_ok() => {}
                _ => break,
            }
            if self.flush_acks().is_err() {
                break;
            }
        }
        let _ = self.flush_acks();
        let _ = self.flush(client, broker).await;
        Ok(())
    }

    /// Send the outbox into the pipeline, then drop our sender.
    async fn drain(&mut self) {
        if let Some(events) = self.events.take() {
            while let Some(event) = self.outbox.pop_front() {
                if events.send(event).await.is_err() {
                    break;
                }
                self.door.metrics.handed.fetch_add(1, Relaxed);
            }
        }
    }

    /// The client went away without DISCONNECT: its will goes through the
    /// rules like any publish, after what it sent (the caller drains the
    /// outbox; the broker publishes the will to local subscribers).
    fn route_will(&mut self) {
        let Some((topic, message)) = self.will.take() else {
            return;
        };
        let Some(topic) = wire::valid_topic(&topic) else {
            return;
        };
        let allowed = self.door.acl.as_ref().is_none_or(|a| {
            a.current()
                .can_write(&self.client_id, self.username.as_deref(), topic)
        });
        if !allowed || !self.door.ingests(topic) {
            return;
        }
        let mut event = Event::from_publish(topic.to_string(), message);
        event.client_id = self.client_id.clone();
        event.username = self.username.clone();
        count_decoded(&self.door.metrics, &event);
        self.outbox.push_back(Inbound {
            event,
            receipt: None,
        });
        debug!(client_id = %self.client_id, "will routed");
    }
}

/// Give back what a burst or a large packet made a buffer grow to.
fn trim(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > TRIM_ABOVE {
        *buf = BytesMut::with_capacity(READ_BUF);
    }
}

/// The daemon is stopping (the watch's guard is not held across awaits).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Wait for room in the pipeline (forever once it is gone: stopping).
async fn reserve(
    events: &Option<mpsc::Sender<Inbound>>,
) -> Result<mpsc::Permit<'_, Inbound>, mpsc::error::SendError<()>> {
    match events {
        Some(events) => events.reserve().await,
        None => std::future::pending().await,
    }
}

fn count_decoded(m: &crate::metrics::Metrics, event: &Event) {
    m.received.fetch_add(1, Relaxed);
    match event.payload {
        Payload::Json(_) => &m.decoded_json,
        Payload::Cbor(_) => &m.decoded_cbor,
        Payload::Raw => &m.decoded_raw,
        Payload::Malformed(_) => &m.decoded_malformed,
    }
    .fetch_add(1, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle connection keeps 1 KiB per read buffer, not what its
    /// largest packet needed; a buffer still holding data is left alone.
    #[test]
    fn buffers_grown_by_a_burst_are_given_back_once_empty() {
        let mut buf = BytesMut::with_capacity(READ_BUF);
        buf.extend_from_slice(&vec![0u8; 256 * 1024]);
        trim(&mut buf);
        assert!(buf.capacity() >= 256 * 1024, "not while it holds data");
        buf.clear();
        trim(&mut buf);
        assert_eq!(buf.capacity(), READ_BUF);
        let mut small = BytesMut::with_capacity(8 * 1024);
        trim(&mut small);
        assert_eq!(small.capacity(), 8 * 1024, "small ones are kept");
    }
}
