//! One uplink per named upstream: an MQTT session (rumqttc) that sends the
//! upstream's queued rows in order, keeps a window of QoS 1 publishes in
//! flight, and deletes a row only when its PUBACK arrives.
//!
//! The connection itself (MQTT 3.1.1 or 5, TLS) is in `link`.
//!
//! rumqttc 0.25 behaviours handled here:
//! - pkids are assigned in the event loop, in `publish()` order, and reported
//!   as `Outgoing::Publish(pkid)`: a FIFO of row ids maps rows to pkids.
//! - On reconnect rumqttc resends its pending publishes only if the broker
//!   says `session_present`, and drops them otherwise. So every connection
//!   starts a fresh event loop and resends every unacknowledged row itself.
//! - A PUBACK for a pkid rumqttc never assigned on this connection makes
//!   rumqttc itself drop the connection (`Unsolicited`); the session ends
//!   and the next one resends every unacknowledged row. One rumqttc did
//!   accept but that maps to no row is ignored.
//! - `EventLoop::poll` is not cancel-safe, so it runs in its own task (`link`).
//! - It has no reconnect backoff: capped exponential backoff with jitter here.
//! - Its default max packet size is 10 KiB: set from config.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

pub mod failure;
mod link;

use rumqttc::QoS;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::codec;
use crate::config::{DrainOrder, Protocol, UpstreamConfig};
use crate::credentials::{self, CredentialError, Secret};
use crate::metrics::UplinkMetrics;
use crate::pacing::Pacer;
use crate::queue::{Cursor, QueueError, QueueHandle, Row, Waiting};
use crate::tls::{self, TlsError};
pub use failure::FailureKind;
use link::{Extras, Link, LinkEvent};

/// How long acknowledged ids may wait before their delete is handed to the
/// queue writer (which then commits them with its next group commit). With
/// ack = "stored", a sensor's PUBACK for an event acknowledged from RAM
/// waits for this too: 20 ms made it the p50 at 5,000 events/s. At high
/// rates the count (a window of acks) hands them over sooner anyway.
const ACK_FLUSH: Duration = Duration::from_millis(2);

/// Connection failures are logged at WARN at most this often.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Everything one uplink needs to know about its upstream.
#[derive(Debug, Clone)]
pub struct UplinkSettings {
    pub name: String,
    pub client_id: String,
    pub upstream: UpstreamConfig,
    /// Resolved from the config, `password_file` or `password_env`.
    pub password: Option<Secret>,
    /// For `mqtts://` upstreams.
    pub tls: Option<Arc<tls::ClientConfig>>,
}

/// Why an upstream cannot be set up; the message names the file or
/// variable to fix.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl UplinkSettings {
    /// Read the upstream's password and TLS files now, so a bad one fails
    /// the start with a message instead of every connection attempt.
    pub fn new(
        name: &str,
        client_id: String,
        upstream: &UpstreamConfig,
    ) -> Result<UplinkSettings, SetupError> {
        let tls = if upstream.url.tls {
            Some(tls::client_config(upstream)?)
        } else {
            None
        };
        Ok(UplinkSettings {
            name: name.to_string(),
            client_id,
            upstream: upstream.clone(),
            password: credentials::password(upstream)?,
            tls,
        })
    }
}

/// How a session ended.
enum Ended {
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

/// Sessions in a row that may end with the same row first in flight and
/// nothing acknowledged before that row is dead-lettered.
const POISON_AFTER: u32 = 3;

/// One row the upstream cannot take would otherwise block its queue for
/// good: an upstream that drops the connection on it (Mosquitto on a topic
/// it calls malformed, a cloud broker's policy) gets it first again after
/// every reconnect. A session that ends with rows on the wire and nothing
/// acknowledged strikes the oldest of them; `POISON_AFTER` strikes in a row
/// on the same row, and it goes. Any acknowledgement clears the count.
#[derive(Debug, Default)]
struct Suspect {
    row: Option<i64>,
    strikes: u32,
}

/// What a session's end says about its oldest unacknowledged row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strike {
    /// It acknowledged something: the upstream takes our events.
    Cleared,
    /// Lost with rows on the wire and nothing acknowledged: the oldest.
    Against(i64),
    /// No session, or nothing was on the wire: says nothing.
    Unchanged,
}

impl Suspect {
    /// A session ended. `Some(row)` when that row is to be dead-lettered.
    fn strike(&mut self, strike: Strike) -> Option<i64> {
        let head = match strike {
            Strike::Cleared => {
                *self = Suspect::default();
                return None;
            }
            Strike::Unchanged => return None,
            Strike::Against(row) => row,
        };
        if self.row == Some(head) {
            self.strikes += 1;
        } else {
            *self = Suspect {
                row: Some(head),
                strikes: 1,
            };
        }
        if self.strikes >= POISON_AFTER {
            *self = Suspect::default();
            return Some(head);
        }
        None
    }
}

/// Run sessions until shutdown, reconnecting with capped exponential backoff.
pub async fn run(
    settings: UplinkSettings,
    queue: QueueHandle,
    metrics: Arc<UplinkMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let up = &settings.upstream;
    let mut backoff = Backoff::new(up.reconnect_min.0, up.reconnect_max.0);
    // Rows sent but not acknowledged when the last session ended: sending
    // one of them again is a re-send.
    let mut unacked: HashSet<i64> = HashSet::new();
    // The last failure logged at WARN; repeats of it go to DEBUG.
    let mut last_reason = String::new();
    let mut last_warned: Option<Instant> = None;
    let mut suspect = Suspect::default();
    loop {
        let Outcome {
            ended,
            strike,
            healthy,
        } = session(&settings, &queue, &metrics, &mut shutdown, &mut unacked).await;
        if let Some(row) = suspect.strike(strike) {
            warn!(upstream = %settings.name, row, strikes = POISON_AFTER, "dead-lettered: the upstream dropped the connection this many times in a row with this event first in flight and acknowledged nothing (an event it cannot take; the events behind it go on)");
            metrics.dead_lettered.fetch_add(1, Relaxed);
            unacked.remove(&row);
            if queue.ack(vec![row]).await.is_err() {
                return;
            }
        }
        match ended {
            Ended::Shutdown | Ended::QueueClosed => return,
            Ended::Lost { kind, reason } => {
                if healthy {
                    backoff.reset();
                }
                let reason = tls::explain(&reason);
                let kind = kind.index();
                metrics.failures[kind].fetch_add(1, Relaxed);
                metrics.down_because.store(kind as u64 + 1, Relaxed);
                *metrics.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(reason.clone());
                let delay = backoff.next_delay();
                // WARN on a new reason, at most every 30 s; DEBUG otherwise.
                if reason != last_reason && last_warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    warn!(upstream = %settings.name, url = %up.url, %reason, retry_in = ?delay, "uplink down");
                    last_reason = reason;
                    last_warned = Some(Instant::now());
                } else {
                    debug!(upstream = %settings.name, %reason, retry_in = ?delay, "uplink still down");
                }
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

async fn session(
    settings: &UplinkSettings,
    queue: &QueueHandle,
    metrics: &UplinkMetrics,
    shutdown: &mut watch::Receiver<bool>,
    unacked: &mut HashSet<i64>,
) -> Outcome {
    let up = &settings.upstream;
    let name = settings.name.as_str();
    let mut window = usize::from(up.inflight);
    let mut pacer = Pacer::new(up.send_rate, up.send_bytes_rate.0);
    let max_packet = up.max_packet_size.as_usize();
    let mut link = Link::open(settings, window + 16);

    // Connect.
    let (session_present, receive_max) = loop {
        let polled = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return Outcome::before_connecting(Ended::Shutdown),
            p = link.events.recv() => p,
        };
        match polled {
            Some(Ok(LinkEvent::Connected {
                session_present,
                receive_max,
            })) => break (session_present, receive_max),
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                let lost = Ended::Lost {
                    kind: e.kind.unwrap_or(FailureKind::Unreachable),
                    reason: e.reason,
                };
                return Outcome::before_connecting(lost);
            }
            None => {
                let lost = Ended::Lost {
                    kind: FailureKind::Unreachable,
                    reason: "event loop ended".into(),
                };
                return Outcome::before_connecting(lost);
            }
        }
    };
    // An MQTT 5 server's Receive Maximum caps the window (rumqttc holds
    // back publishes beyond it; counting them as in flight would be wrong).
    if let Some(max) = receive_max {
        window = window.min(usize::from(max).max(1));
    }
    let refill = (window / 4).max(1);
    let connected_at = Instant::now();
    // Rows received before this moment are the backlog (for the replay marker).
    let connected_ms = crate::event::now_ms();
    metrics.connected.store(true, Relaxed);
    // The queue, not the metric, is what keeps this upstream's events in
    // RAM while it is connected.
    let _ = queue.online(name, true).await;
    metrics.connects.fetch_add(1, Relaxed);
    metrics.session_present.store(session_present, Relaxed);
    metrics.down_because.store(0, Relaxed);
    metrics.window.store(window as u64, Relaxed);
    *metrics.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    info!(upstream = %name, url = %up.url, protocol = ?up.protocol, session_present, window, "uplink connected");

    // Resend everything not yet acknowledged: start from the beginning.
    let mut after = Cursor::default();
    // With drain_order = "live_first", rows up to `boundary` are the backlog
    // (sent after the live rows, which are read with `live_after`).
    let live_first = up.drain_order == DrainOrder::LiveFirst;
    let boundary = if live_first {
        match queue.last_id(name).await {
            Ok(id) => id,
            Err(_) => return Outcome::before_connecting(Ended::QueueClosed),
        }
    } else {
        i64::MAX
    };
    let mut live_after = Cursor([boundary; 3]);
    // Published but pkid not yet assigned, in publish order: (row id, qos).
    let mut awaiting: VecDeque<(i64, QoS)> = VecDeque::with_capacity(window);
    // pkid -> row id, for QoS 1 publishes on the wire.
    let mut inflight: HashMap<u16, i64> = HashMap::with_capacity(window);
    let mut acks: Vec<i64> = Vec::with_capacity(window);
    let mut ack_deadline: Option<Instant> = None;
    // True when the last read found no more rows: wait for the queue to
    // send some (`waiting`, a request for up to `wait_limit` rows).
    let mut drained = false;
    let mut waiting: Option<Waiting> = None;
    let mut wait_limit = 0;
    // Rows the queue sent in answer to `waiting`.
    let mut pushed: Option<Vec<Row>> = None;
    let mut acked_any = false;
    let v5 = up.protocol == Protocol::V5;
    // A half-open link (a NAT or a cellular modem that dropped the path
    // without a reset) sends nothing back. rumqttc pings only after a quiet
    // keep-alive and gives up one keep-alive later; a live broker answers
    // every ping, so silence for 1.5 keep-alives is a dead link.
    let silence_limit = up.keep_alive.0.mul_f64(1.5);
    // An upstream can answer pings and never acknowledge a publish (PUBREC
    // for QoS 1, or nothing): the window stays full for good. No PUBACK
    // for three keep-alives while publishes are outstanding ends the
    // session; the rows are sent again on the next one.
    let ack_limit = up.keep_alive.0 * 3;
    let mut last_progress = Instant::now();

    let ended = loop {
        let outstanding = awaiting.len() + inflight.len();
        metrics.inflight.store(outstanding as u64, Relaxed);
        let free = window.saturating_sub(outstanding);
        let allowed = pacer.allowance(free);
        // Waiting on the pace, not on the window or the queue.
        let paced = free > 0 && allowed == 0;
        let read = if let Some(rows) = pushed.take() {
            Some((rows, wait_limit))
        } else if !drained && read_now(free, allowed, window, refill) {
            let fetched = async {
                // Live rows (queued after this connection) first when asked.
                let mut rows = Vec::new();
                if live_first {
                    rows = queue.fetch(name, live_after, i64::MAX, allowed).await?;
                }
                if rows.len() < allowed {
                    let more = queue
                        .fetch(name, after, boundary, allowed - rows.len())
                        .await?;
                    rows.extend(more);
                }
                Ok::<_, QueueError>(rows)
            };
            match fetched.await {
                Ok(rows) => Some((rows, allowed)),
                Err(QueueError::Closed) => break Ended::QueueClosed,
                Err(e) => {
                    warn!(upstream = %name, error = %e, "cannot read queue; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        } else {
            None
        };
        if let Some((rows, asked)) = read {
            drained = rows.len() < asked;
            let mut refused = None;
            let (mut handled, mut published) = (0usize, 0usize);
            let now_ms = crate::event::now_ms();
            for (i, row) in rows.into_iter().enumerate() {
                // A byte-rate limit is checked per event: stop at the first
                // that must wait (it is fetched again, the cursor stays).
                if i > 0 && pacer.allowance(1) == 0 {
                    drained = false;
                    break;
                }
                if row.id > boundary {
                    live_after.advance(&row);
                } else {
                    after.advance(&row);
                }
                handled += 1;
                let qos = if row.qos == 0 {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                };
                let replayed = row.received_ms < connected_ms;
                let marker = up.replay_marker.as_deref().filter(|_| replayed);
                let extras = Extras {
                    event_id: &row.event_id,
                    // MQTT 5 message expiry: what is left of the TTL, at
                    // least a second (an expired row is never fetched).
                    expiry_secs: row
                        .expires_ms
                        .map(|e| e.saturating_sub(now_ms).div_ceil(1000).max(1) as u32),
                    // MQTT 5 marks with a user property, 3.1.1 in the payload.
                    replay_marker: marker.filter(|_| v5),
                };
                let payload = match marker {
                    Some(field) if !v5 => {
                        with_replay_marker(row.payload, field, &row.topic, qos, max_packet)
                    }
                    _ => row.payload,
                };
                // A row the upstream can never take must not block the ones
                // behind it: dead-letter it (counted, logged, deleted).
                let extra = link.extras_len(&extras);
                if let Err(why) = sendable(&row.topic, payload.len() + extra, qos, max_packet) {
                    warn!(upstream = %name, row = row.id, event_id = %row.event_id, topic = %row.topic, %why, "dead-lettered: cannot be sent upstream");
                    metrics.dead_lettered.fetch_add(1, Relaxed);
                    acks.push(row.id);
                    continue;
                }
                // Capacity is window + 16 and at most `window` are outstanding,
                // so this only fails if the event loop is gone.
                let size = payload.len() + row.topic.len();
                if let Err(e) = link.try_publish(row.topic, qos, payload, &extras) {
                    refused = Some(e);
                    break;
                }
                pacer.spend(size);
                published += 1;
                awaiting.push_back((row.id, qos));
                metrics.sent.fetch_add(1, Relaxed);
                if unacked.remove(&row.id) {
                    metrics.resent.fetch_add(1, Relaxed);
                }
            }
            if refused.is_none() && handled > 0 && published == 0 && !drained {
                // Every row was dead-lettered: fetch the next ones now rather
                // than wait for network traffic to wake the loop.
                continue;
            }
            if let Some(reason) = refused {
                break Ended::Lost {
                    kind: FailureKind::Lost,
                    reason,
                };
            }
        }
        if acks.len() >= window.max(32) || ack_deadline.is_some_and(|d| d <= Instant::now()) {
            if flush_acks(queue, &mut acks).await.is_err() {
                break Ended::QueueClosed;
            }
            ack_deadline = None;
        }
        // Acks (and dead letters) wait at most ACK_FLUSH for their delete.
        if ack_deadline.is_none() && !acks.is_empty() {
            ack_deadline = Some(Instant::now() + ACK_FLUSH);
        }
        // Caught up: ask the queue for the next rows as soon as there is
        // room for a batch, and have it send them when they come. After a
        // backlog (`live_first`) every new row is a live one. Until the pace
        // allows a row, wait on the pace instead.
        let mut paced = !drained && paced;
        if drained && waiting.is_none() {
            let free = window.saturating_sub(awaiting.len() + inflight.len());
            let allowed = pacer.allowance(free);
            paced = free > 0 && allowed == 0;
            if read_now(free, allowed, window, refill) {
                let cursor = if live_first { live_after } else { after };
                match queue.wait(name, cursor, allowed).await {
                    Ok(w) => {
                        waiting = Some(w);
                        wait_limit = allowed;
                    }
                    Err(_) => break Ended::QueueClosed,
                }
            }
        }

        let polled = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break Ended::Shutdown,
            answer = recv_opt(&mut waiting) => {
                waiting = None;
                match answer {
                    Ok(Ok(rows)) => pushed = Some(rows),
                    // Read again the usual way (which retries and warns, or
                    // ends the session if the queue has stopped).
                    Ok(Err(_)) | Err(_) => drained = false,
                }
                continue;
            }
            _ = sleep_until_opt(ack_deadline) => continue,
            // Paced: more may be sent once the bucket has refilled.
            _ = sleep_until_opt(pacer.ready_at()), if paced => continue,
            _ = sleep_until_opt((!inflight.is_empty()).then(|| last_progress + ack_limit)) => {
                if inflight.is_empty() || last_progress + ack_limit > Instant::now() {
                    continue;
                }
                let reason = format!(
                    "{} publishes outstanding and no PUBACK for {:?} (3 x keep_alive), though the upstream answers pings",
                    inflight.len(),
                    ack_limit
                );
                warn!(upstream = %name, url = %up.url, %reason, "uplink stalled; reconnecting, unacknowledged events will be resent");
                break Ended::Lost {
                    kind: FailureKind::Stalled,
                    reason,
                };
            }
            _ = tokio::time::sleep_until(link.last_heard() + silence_limit) => {
                if link.last_heard() + silence_limit > Instant::now() {
                    continue; // heard meanwhile
                }
                let reason = format!(
                    "nothing heard from the upstream for {:?} (1.5 x keep_alive): the link is dead or half-open",
                    silence_limit
                );
                warn!(upstream = %name, url = %up.url, %reason, unacked = awaiting.len() + inflight.len(), "uplink lost; unacknowledged events will be resent");
                break Ended::Lost {
                    kind: FailureKind::Lost,
                    reason,
                };
            }
            p = link.events.recv() => p,
        };
        match polled {
            Some(Ok(LinkEvent::Written(pkid))) => {
                let Some((id, qos)) = awaiting.pop_front() else {
                    continue;
                };
                if qos == QoS::AtMostOnce {
                    // QoS 0: done once written; nothing will acknowledge it.
                    acks.push(id);
                    metrics.acked.fetch_add(1, Relaxed);
                } else {
                    if inflight.is_empty() {
                        // The ack clock starts with the first outstanding one.
                        last_progress = Instant::now();
                    }
                    inflight.insert(pkid, id);
                }
            }
            Some(Ok(LinkEvent::Acked { pkid, refused })) => {
                let Some(id) = inflight.remove(&pkid) else {
                    debug!(upstream = %name, pkid, "ignoring PUBACK for unknown packet id");
                    continue;
                };
                last_progress = Instant::now();
                match refused {
                    None => {
                        acks.push(id);
                        metrics.acked.fetch_add(1, Relaxed);
                        acked_any = true;
                    }
                    Some(r) => {
                        metrics.count_refusal(r.reason);
                        if r.permanent {
                            // The broker will never take it: do not block
                            // the queue behind it.
                            warn!(upstream = %name, row = id, reason = r.reason, "dead-lettered: the upstream refused the event");
                            metrics.dead_lettered.fetch_add(1, Relaxed);
                            acks.push(id);
                        } else {
                            // Kept; end the session so it is sent again after
                            // the backoff (a broker over quota gets a pause).
                            unacked.insert(id);
                            break Ended::Lost {
                                kind: FailureKind::Refused,
                                reason: format!(
                                    "the upstream refused an event ({}); sending again after a pause",
                                    r.reason
                                ),
                            };
                        }
                    }
                }
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                warn!(upstream = %name, url = %up.url, reason = %e.reason, unacked = awaiting.len() + inflight.len(), "uplink lost; unacknowledged events will be resent");
                break Ended::Lost {
                    kind: e.kind.unwrap_or(FailureKind::Lost),
                    reason: e.reason,
                };
            }
            None => {
                break Ended::Lost {
                    kind: FailureKind::Lost,
                    reason: "event loop ended".into(),
                };
            }
        }
    };

    metrics.connected.store(false, Relaxed);
    let _ = queue.online(name, false).await;
    metrics.inflight.store(0, Relaxed);
    // What was on the wire without an acknowledgement is sent again next time.
    unacked.extend(awaiting.iter().map(|(id, _)| *id));
    unacked.extend(inflight.values().copied());
    let _ = flush_acks(queue, &mut acks).await;
    // The upstream dropped us without acknowledging anything, though rows
    // were on the wire: the oldest of them is a suspect (see `Suspect`).
    let head = awaiting
        .iter()
        .map(|(id, _)| *id)
        .chain(inflight.values().copied())
        .min();
    let suspect = match (&ended, head) {
        _ if acked_any => Strike::Cleared,
        // Only a connection the upstream dropped (not our stall timeout,
        // not a refusal with a reason) speaks against the row.
        (
            Ended::Lost {
                kind: FailureKind::Lost,
                ..
            },
            Some(row),
        ) => Strike::Against(row),
        _ => Strike::Unchanged,
    };
    if matches!(ended, Ended::Shutdown) {
        // Polite DISCONNECT; unacknowledged rows stay queued for next time.
        link.try_disconnect();
        link.closed(Duration::from_secs(1)).await;
        info!(upstream = %name, "uplink closed");
    }
    Outcome {
        ended,
        strike: suspect,
        // The one place that says whether the session did useful work.
        healthy: acked_any || connected_at.elapsed() >= up.reconnect_max.0,
    }
}

/// How a session ended, and what that says about the next one.
struct Outcome {
    ended: Ended,
    strike: Strike,
    /// Whether the session did useful work: acknowledged something, or
    /// stayed up longer than the longest backoff. Only then is the backoff
    /// reset, so a broker that accepts and then drops us is not hammered.
    healthy: bool,
}

impl Outcome {
    /// A session that never got connected.
    fn before_connecting(ended: Ended) -> Outcome {
        Outcome {
            ended,
            strike: Strike::Unchanged,
            healthy: false,
        }
    }
}

/// `payload` with `"<field>": true` if it is a JSON object, unless that would
/// make an otherwise sendable event too large (then unchanged).
fn with_replay_marker(
    payload: Vec<u8>,
    field: &str,
    topic: &str,
    qos: QoS,
    max_packet: usize,
) -> Vec<u8> {
    let raw = bytes::Bytes::from(payload);
    let marked = codec::with_json_field(
        &codec::decode(&raw),
        &raw,
        field,
        serde_json::Value::Bool(true),
    );
    if sendable(topic, marked.len(), qos, max_packet).is_ok() {
        marked.to_vec()
    } else {
        raw.to_vec()
    }
}

/// Whether a row can be published at all: MQTT forbids wildcards and NUL in
/// topic names and empty topics, and the packet must fit `max_packet`.
fn sendable(topic: &str, payload: usize, qos: QoS, max_packet: usize) -> Result<(), String> {
    if topic.is_empty() || topic.contains(['+', '#', '\0']) {
        return Err("topic is empty or contains '+', '#' or NUL".into());
    }
    if topic.len() > usize::from(u16::MAX) {
        return Err(format!("topic is {} bytes, MQTT allows 65535", topic.len()));
    }
    let remaining = 2 + topic.len() + if qos == QoS::AtMostOnce { 0 } else { 2 } + payload;
    let header = 1 + match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    if header + remaining > max_packet {
        return Err(format!(
            "packet is {} bytes, over upstream max_packet_size ({max_packet})",
            header + remaining
        ));
    }
    Ok(())
}

/// Hand acknowledged (or dead-lettered) row ids to the queue for deletion.
async fn flush_acks(queue: &QueueHandle, acks: &mut Vec<i64>) -> Result<(), QueueError> {
    if acks.is_empty() {
        return Ok(());
    }
    queue.ack(std::mem::take(acks)).await
}

/// Whether to read rows now: the pace allows some, and there is room for a
/// batch (a quarter window), or nothing is out, or the pace is what limits.
/// Not a row per PUBACK: each read is a round trip to the queue thread.
fn read_now(free: usize, allowed: usize, window: usize, refill: usize) -> bool {
    allowed > 0 && (free >= refill || free == window || allowed < free)
}

/// The answer to a waiting request, if there is one (else never).
async fn recv_opt(
    waiting: &mut Option<Waiting>,
) -> Result<Result<Vec<Row>, QueueError>, tokio::sync::oneshot::error::RecvError> {
    match waiting {
        Some(rx) => rx.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Capped exponential backoff with "equal jitter": each delay is drawn from
/// the upper half of the current step, so a fleet that lost the same cloud
/// does not reconnect in lockstep.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            step: min,
        }
    }

    fn reset(&mut self) {
        self.step = self.min;
    }

    fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let half = step / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsendable_rows_are_recognised() {
        assert!(sendable("a/b", 10, QoS::AtLeastOnce, 1024).is_ok());
        assert!(sendable("a/+/b", 10, QoS::AtLeastOnce, 1024).is_err());
        assert!(sendable("a/#", 10, QoS::AtLeastOnce, 1024).is_err());
        assert!(sendable("", 10, QoS::AtLeastOnce, 1024).is_err());
        // 1 + 2 (remaining length 200) + 2 + 3 + 2 + 193 = 203 bytes.
        assert!(sendable("a/b", 193, QoS::AtLeastOnce, 203).is_ok());
        assert!(sendable("a/b", 194, QoS::AtLeastOnce, 203).is_err());
    }

    #[test]
    fn a_row_first_in_flight_at_three_fruitless_sessions_in_a_row_is_dead_lettered() {
        let mut s = Suspect::default();
        assert_eq!(s.strike(Strike::Against(7)), None);
        assert_eq!(
            s.strike(Strike::Unchanged),
            None,
            "a failed connect says nothing"
        );
        assert_eq!(s.strike(Strike::Against(7)), None);
        assert_eq!(s.strike(Strike::Against(7)), Some(7));
        // Counting starts again; another row, or an ack, resets it.
        assert_eq!(s.strike(Strike::Against(8)), None);
        assert_eq!(s.strike(Strike::Against(9)), None);
        assert_eq!(s.strike(Strike::Against(9)), None);
        assert_eq!(s.strike(Strike::Cleared), None);
        assert_eq!(s.strike(Strike::Against(9)), None);
        assert_eq!(s.strike(Strike::Against(9)), None);
        assert_eq!(s.strike(Strike::Against(9)), Some(9));
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let steps = [100u64, 200, 400, 800, 1000, 1000];
        for ms in steps {
            let d = b.next_delay();
            let step = Duration::from_millis(ms);
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} not within [{:?}, {step:?}]",
                step / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
