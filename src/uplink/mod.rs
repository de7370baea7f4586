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

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

mod backoff;
mod control;
mod downlink;
pub mod failure;
pub mod fleet;
mod link;
mod packet;
mod poison;
mod session;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::config::{DrainOrder, Protocol, UpstreamConfig};
use crate::credentials::{self, CredentialError, Secret};
use crate::metrics::{Metrics, UplinkMetrics};
use crate::queue::{QueueError, QueueHandle, Row, Waiting};
use crate::reload::{RemoteRules, Request};
use crate::router::Inbound;
use crate::tls;
use backoff::Backoff;
use bytes::Bytes;
pub use failure::FailureKind;
use link::{Events, Link, LinkEvent};
use poison::{POISON_AFTER, Suspect};
use session::{Connected, Ended, Outcome, Position, Room, Sent, Session, Wire};
use tokio::sync::mpsc;

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
    /// Downlink filters with `{gateway}` replaced, and their QoS.
    pub subscriptions: Vec<(String, u8)>,
    /// The gateway's health topic, if configured.
    pub status: Option<fleet::StatusTopic>,
    /// The control topic (remote operations), if configured; it is among
    /// the subscriptions.
    pub control: Option<String>,
    /// This gateway's id and when it started (status messages).
    pub gateway: String,
    pub started_ms: u64,
}

/// What an uplink shares with the rest of the daemon beyond its queue:
/// the router, for what comes down the subscriptions, and the counters,
/// for the heartbeat.
#[derive(Clone)]
pub struct Shared {
    pub metrics: Arc<Metrics>,
    /// `None` when no upstream subscribes to anything.
    pub router: Option<mpsc::Sender<Inbound>>,
    /// The rule reloader, for remote operations.
    pub reload: mpsc::Sender<crate::reload::Request>,
}

/// What an upstream's files hold, read once when the config is loaded
/// (`setup`).
#[derive(Debug, Clone, Default)]
pub struct UpstreamFiles {
    /// Inline or from `password_file`.
    pub password: Option<Secret>,
    /// For `mqtts://` upstreams.
    pub tls: Option<Arc<tls::ClientConfig>>,
}

/// Why an upstream cannot be set up; the message names the variable to fix.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Credentials(#[from] CredentialError),
}

impl UplinkSettings {
    /// The upstream's settings from the files read when the config was
    /// loaded, and its `password_env`, read now, so an unset variable fails
    /// the start with a message instead of every connection attempt.
    /// `gateway` replaces `{gateway}` in the subscriptions and status
    /// topic; `started_ms` is when this daemon started.
    pub fn new(
        name: &str,
        client_id: String,
        upstream: &UpstreamConfig,
        files: &UpstreamFiles,
        gateway: &str,
        started_ms: u64,
    ) -> Result<UplinkSettings, SetupError> {
        let password = match credentials::from_env(upstream)? {
            Some(p) => Some(p),
            None => files.password.clone(),
        };
        let status = upstream.status_topic.as_ref().map(|t| fleet::StatusTopic {
            topic: crate::config::expand_gateway(t, gateway),
            interval: upstream.status_interval.0,
            gateway: gateway.to_string(),
            started_ms,
        });
        let control = upstream
            .control_topic
            .as_ref()
            .map(|t| crate::config::expand_gateway(t, gateway));
        let mut subscriptions: Vec<(String, u8)> = upstream
            .subscribe
            .iter()
            .map(|s| (s.expand(gateway), s.qos))
            .collect();
        subscriptions.extend(control.iter().map(|t| (t.clone(), 1)));
        Ok(UplinkSettings {
            name: name.to_string(),
            client_id,
            upstream: upstream.clone(),
            password,
            tls: files.tls.clone(),
            subscriptions,
            status,
            control,
            gateway: gateway.to_string(),
            started_ms,
        })
    }
}

/// Run sessions until shutdown, reconnecting with capped exponential backoff.
pub async fn run(
    settings: UplinkSettings,
    queue: QueueHandle,
    shared: Shared,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(metrics) = shared.metrics.uplinks.get(&settings.name).cloned() else {
        return;
    };
    let up = &settings.upstream;
    let mut fleet = Fleet {
        shared,
        echoes: downlink::Echoes::new(&settings.subscriptions, up.protocol == Protocol::V311),
        rates: fleet::Rates::default(),
        results: mpsc::channel(RESULTS),
        fresh_session: false,
        subscribed: false,
        control_pace: crate::pacing::Bucket::with_burst(
            CONTROL_RATE,
            CONTROL_BURST,
            Instant::now(),
        ),
        control_busy: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    };
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
            ..
        } = session(
            &settings,
            &queue,
            &metrics,
            &mut fleet,
            &mut shutdown,
            &mut unacked,
        )
        .await;
        // Down only once it says why: whoever sees it down reads the reason.
        let lost = match ended {
            Ended::Lost { kind, reason } => {
                fleet.fresh_session = downlink::too_large(&reason);
                if fleet.fresh_session {
                    metrics.downlink_oversized.fetch_add(1, Relaxed);
                    error!(upstream = %settings.name, %reason, max_packet_size = %up.max_packet_size, "the upstream sent a command larger than max_packet_size; it would send it again on every reconnect, so the next connection starts a fresh session: commands queued for this gateway while it was away are dropped with it");
                }
                Some(record_failure(&metrics, kind, &reason))
            }
            Ended::Shutdown | Ended::QueueClosed => None,
        };
        metrics.connected.store(false, Relaxed);
        if let Some(row) = suspect.strike(strike) {
            warn!(upstream = %settings.name, row, strikes = POISON_AFTER, "dead-lettered: the upstream dropped the connection this many times in a row with this event first in flight and acknowledged nothing (an event it cannot take; the events behind it go on)");
            metrics.dead_lettered.fetch_add(1, Relaxed);
            unacked.remove(&row);
            if queue.ack(vec![row]).await.is_err() {
                return;
            }
        }
        let Some(reason) = lost else {
            return;
        };
        if healthy {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        // WARN on a new reason, at most every 30 s; DEBUG otherwise.
        if reason != last_reason && last_warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            warn!(upstream = %settings.name, url = %up.url, %reason, retry_in = %crate::units::HumanDuration::shown(delay), "uplink down");
            last_reason = reason;
            last_warned = Some(Instant::now());
        } else {
            debug!(upstream = %settings.name, %reason, retry_in = %crate::units::HumanDuration::shown(delay), "uplink still down");
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Count a failed attempt or a lost session by kind, and keep its reason
/// (explained, for TLS) for `/metrics` and `status`; the reason, for the log.
fn record_failure(metrics: &UplinkMetrics, kind: FailureKind, reason: &str) -> String {
    let reason = tls::explain(reason);
    let kind = kind.index();
    metrics.failures[kind].fetch_add(1, Relaxed);
    metrics.down_because.store(kind as u64 + 1, Relaxed);
    *metrics.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
    reason
}

/// Connect, then run one session until it ends: the I/O around the
/// `Session` state machine (the queue, the link, the timers).
async fn session(
    settings: &UplinkSettings,
    queue: &QueueHandle,
    metrics: &UplinkMetrics,
    fleet: &mut Fleet,
    shutdown: &mut watch::Receiver<bool>,
    unacked: &mut HashSet<i64>,
) -> Outcome {
    let up = &settings.upstream;
    let name = settings.name.as_str();
    // Room for the window, the gateway's own messages and, with downlink
    // subscriptions, the acknowledgements of commands (a broker keeps a
    // few dozen unacknowledged at most).
    let acks = if settings.subscriptions.is_empty() {
        0
    } else {
        256
    };
    let fresh = std::mem::take(&mut fleet.fresh_session);
    let (link, mut events) = Link::open(settings, usize::from(up.inflight) + 16 + acks, fresh);
    let (session_present, receive_max) = match connect(&mut events, shutdown).await {
        Ok(connack) => connack,
        Err(ended) => return Outcome::before_connecting(ended),
    };
    // The will the broker published if the last connection died comes
    // down a filter that covers the status topic: it is ours, no command.
    if let Some(st) = &settings.status {
        fleet.echoes.sent(&st.topic, &st.will(), Instant::now());
    }
    // When the broker has no session (it lost it, or never kept it), and
    // on this process's first connect (the filters may have changed since
    // the session was made). Not on every connect: a 3.1.1 broker sends
    // the retained messages of a filter again at each SUBSCRIBE, so every
    // reconnect would repeat a retained command (MQTT 5 subscribes with
    // Retain Handling 1 as well: retained only for a new subscription).
    if !session_present || !fleet.subscribed {
        if let Err(reason) = link.subscribe(&settings.subscriptions) {
            return Outcome::before_connecting(Ended::lost(FailureKind::Lost, reason));
        }
        fleet.subscribed = true;
    } else if !settings.subscriptions.is_empty() {
        metrics
            .downlink_subscribed
            .store(settings.subscriptions.len() as u64, Relaxed);
    }
    // The session starts at the CONNACK, not after the queue round trips
    // below: rows received before this are the backlog (replay marker).
    let (connected_at, connected_ms) = (Instant::now(), crate::event::now_ms());
    // The queue, not the metric, is what keeps this upstream's events in
    // RAM while it is connected.
    let _ = queue.online(name, true).await;
    // With drain_order = "live_first", rows up to this are the backlog.
    let boundary = if up.drain_order == DrainOrder::LiveFirst {
        match queue.last_id(name).await {
            Ok(id) => id,
            Err(_) => return Outcome::before_connecting(Ended::QueueClosed),
        }
    } else {
        i64::MAX
    };
    let connected = Connected {
        name,
        up,
        metrics,
        unacked,
        echoes: &mut fleet.echoes,
        session_present,
        receive_max,
        boundary,
        connected_at,
        connected_ms,
    };
    let mut s = Session::connected(link, connected);
    let status = settings.status.as_ref();
    if let Some(st) = status {
        s.publish_status(&st.topic, st.birth());
    }
    let ended = {
        let mut around = Around {
            status,
            next_beat: status.map(|st| Instant::now() + st.interval),
            rates: &mut fleet.rates,
            shared: &fleet.shared,
            control: settings.control.as_deref(),
            settings,
            results_tx: fleet.results.0.clone(),
            results: &mut fleet.results.1,
            deliveries: downlink::Deliveries::new(),
            pace: &mut fleet.control_pace,
            busy: fleet.control_busy.clone(),
        };
        let ended = drive(&mut s, queue, &mut events, &mut around, shutdown).await;
        // Commands routed by now are acknowledged before the DISCONNECT (the
        // others come again on the next session).
        while let Ok(outcome) = around.deliveries.rx.try_recv() {
            let _ = around.deliveries.outcome(outcome);
        }
        around.deliveries.flush(|a| s.ack_downlink(a));
        ended
    };
    let (mut outcome, link) = s.end(ended);
    let _ = queue.online(name, false).await;
    if !outcome.acks.is_empty() {
        let _ = queue.ack(std::mem::take(&mut outcome.acks)).await;
    }
    if matches!(outcome.ended, Ended::Shutdown) {
        // Retained `offline` first (a DISCONNECT discards the will), then a
        // polite DISCONNECT; unacknowledged rows stay queued for next time.
        if let Some(st) = status {
            let _ = link.publish(packet::Publish::own(&st.topic, st.stopped(), true));
        }
        link.try_disconnect();
        events.closed(Duration::from_secs(1)).await;
        info!(upstream = %name, "uplink closed");
    }
    outcome
}

/// Wait for the CONNACK: (session_present, receive_max).
async fn connect(
    events: &mut Events,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(bool, Option<u16>), Ended> {
    loop {
        let polled = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return Err(Ended::Shutdown),
            p = events.rx.recv() => p,
        };
        match polled {
            Some(Ok(LinkEvent::Connected {
                session_present,
                receive_max,
            })) => return Ok((session_present, receive_max)),
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                let kind = e.kind.unwrap_or(FailureKind::Unreachable);
                return Err(Ended::lost(kind, e.reason));
            }
            None => return Err(Ended::lost(FailureKind::Unreachable, "event loop ended")),
        }
    }
}

/// The connected session's loop: read rows when there is room, hand acks
/// to the queue, and dispatch what the link and the timers say to the
/// session, until it ends.
async fn drive(
    s: &mut Session<'_, Link>,
    queue: &QueueHandle,
    events: &mut Events,
    around: &mut Around<'_>,
    shutdown: &mut watch::Receiver<bool>,
) -> Ended {
    let name = s.name_of();
    let mut reads = Reads::default();
    loop {
        s.report_inflight();
        around.deliveries.flush(|a| s.ack_downlink(a));
        let room = s.room();
        match reads.read(s, room, queue, name).await {
            Err(ended) => return ended,
            Ok(Read::Nothing) => {}
            // After a failed read (logged, and a pause): try again.
            Ok(Read::Again) => continue,
            Ok(Read::Rows(rows, asked)) => match s.send(rows, asked) {
                Ok(Sent::ReadAgain) => continue,
                Ok(Sent::Wait) => {}
                Err(ended) => return ended,
            },
        }
        if let Some(ids) = s.due_acks(Instant::now(), events.rx.is_empty())
            && queue.ack(ids).await.is_err()
        {
            return Ended::QueueClosed;
        }
        let paced = match reads.wait_if_drained(s, room, queue, name).await {
            Ok(paced) => paced,
            Err(ended) => return ended,
        };
        let waiting = &mut reads.waiting;
        let polled = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return Ended::Shutdown,
            answer = recv_opt(waiting) => {
                *waiting = None;
                match answer {
                    Ok(Ok(rows)) => reads.pushed = Some(rows),
                    // Read again the usual way (which retries and warns, or
                    // ends the session if the queue has stopped).
                    Ok(Err(_)) | Err(_) => s.drained = false,
                }
                continue;
            }
            _ = sleep_until_opt(s.ack_deadline()) => continue,
            // Paced: more may be sent once the bucket has refilled.
            _ = sleep_until_opt(s.pace_ready()), if paced => continue,
            _ = sleep_until_opt(s.stall_deadline()) => match s.stalled(Instant::now()) {
                Some(ended) => return ended,
                None => continue,
            },
            _ = sleep_until_opt(around.next_beat) => None,
            Some(outcome) = around.deliveries.rx.recv() => {
                if around.deliveries.outcome(outcome).is_err() {
                    // Unacknowledged, so the broker sends it again on the
                    // next session.
                    return s.end_blameless("a command could not be routed safely; reconnecting so the upstream sends it again");
                }
                continue;
            }
            Some(result) = around.results.recv() => {
                if let Some(topic) = around.control {
                    s.publish_own(&format!("{topic}/result"), result, false);
                }
                continue;
            }
            _ = tokio::time::sleep_until(s.silence_deadline(events.last_heard())) => {
                match s.silent(events.last_heard(), Instant::now()) {
                    Some(ended) => return ended,
                    None => continue, // heard meanwhile
                }
            }
            p = events.rx.recv() => Some(p),
        };
        // (Awaited here, not in its branch: the select's output holds the
        // shutdown watch's guard, which is not Send.)
        let Some(polled) = polled else {
            around.heartbeat(s, queue).await;
            continue;
        };
        match polled {
            Some(Ok(LinkEvent::Written(pkid))) => s.written(pkid),
            Some(Ok(LinkEvent::Acked { pkid, refused })) => {
                if let Err(ended) = s.acked(pkid, refused) {
                    return ended;
                }
            }
            Some(Ok(LinkEvent::Received {
                topic,
                payload,
                retain,
                ack,
            })) if around.control == Some(topic.as_str()) => {
                // Taken as soon as it is read: the result says what came of it.
                around.deliveries.now_opt(ack.map(|a| *a));
                if retain {
                    // A retained command would run again at every new
                    // subscription (a rollback flipping the rules back
                    // and forth): commands are sent, not kept.
                    warn!(upstream = %s.name_of(), "ignored a retained message on the control topic: publish commands without retain");
                    continue;
                }
                around.command(s, queue, &payload).await;
            }
            Some(Ok(LinkEvent::Received {
                topic,
                payload,
                ack,
                ..
            })) => {
                let (Some(event), Some(router)) =
                    (s.received(topic, payload), &around.shared.router)
                else {
                    // An echo of an own publish: nothing to deliver.
                    around.deliveries.now_opt(ack.map(|a| *a));
                    continue;
                };
                let receipt = ack.map(|a| around.deliveries.receipt(*a));
                // Waits while the router is full: the poller stops reading
                // and the broker holds the rest (backpressure).
                let inbound = Inbound { event, receipt };
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return Ended::Shutdown,
                    sent = router.send(inbound) => if sent.is_err() {
                        return Ended::Shutdown;
                    }
                }
            }
            Some(Ok(LinkEvent::Subscribed { granted, refused })) => s.subscribed(granted, refused),
            Some(Ok(_)) => {}
            Some(Err(e)) => return s.failed(e),
            None => return Ended::lost(FailureKind::Lost, "event loop ended"),
        }
    }
}

/// What an uplink carries across its sessions besides its rows: the
/// daemon's shared parts, the echo bookkeeping, the heartbeat's rates.
struct Fleet {
    shared: Shared,
    echoes: downlink::Echoes,
    rates: fleet::Rates,
    /// Control results waiting to be published (a result that is ready
    /// while the uplink is down goes out on the next session).
    results: (mpsc::Sender<Bytes>, mpsc::Receiver<Bytes>),
    /// The next connection starts a clean session (the last one ended on a
    /// command too large to read, which the broker would send again).
    fresh_session: bool,
    /// The downlink filters were subscribed by this process.
    subscribed: bool,
    /// Control commands are taken at most this fast; more are dropped
    /// (counted): a flood must not take the uplink down.
    control_pace: crate::pacing::Bucket,
    /// `reload`, `rules` and `rollback` commands being worked on.
    control_busy: Arc<std::sync::atomic::AtomicUsize>,
}

/// Control commands a second, and the burst allowed.
const CONTROL_RATE: f64 = 10.0;
const CONTROL_BURST: f64 = 20.0;

/// Commands that go to the reloader, at most, waiting at once.
const CONTROL_BUSY: usize = 4;

/// Control results held at most (one per command being worked on).
const RESULTS: usize = 16;

/// What a connected session does besides sending rows: heartbeats and
/// control commands.
struct Around<'a> {
    status: Option<&'a fleet::StatusTopic>,
    next_beat: Option<Instant>,
    rates: &'a mut fleet::Rates,
    shared: &'a Shared,
    control: Option<&'a str>,
    settings: &'a UplinkSettings,
    results_tx: mpsc::Sender<Bytes>,
    results: &'a mut mpsc::Receiver<Bytes>,
    /// This connection's commands waiting to be acknowledged.
    deliveries: downlink::Deliveries,
    pace: &'a mut crate::pacing::Bucket,
    busy: Arc<std::sync::atomic::AtomicUsize>,
}

impl Around<'_> {
    /// A heartbeat on the status topic, and the next one due.
    async fn heartbeat(&mut self, s: &mut Session<'_, Link>, queue: &QueueHandle) {
        let Some(st) = self.status else {
            self.next_beat = None;
            return;
        };
        self.next_beat = Some(Instant::now() + st.interval);
        let beat = st.heartbeat(&self.shared.metrics, queue, self.rates).await;
        s.publish_status(&st.topic, beat);
    }

    /// The `status` command: the heartbeat now (also on the status topic,
    /// if there is one), as the result's `status`.
    async fn status_now(
        &mut self,
        s: &mut Session<'_, Link>,
        queue: &QueueHandle,
        request_id: &serde_json::Value,
    ) -> Bytes {
        let st = self.status.cloned().unwrap_or_else(|| fleet::StatusTopic {
            topic: String::new(),
            interval: Duration::ZERO,
            gateway: self.settings.gateway.clone(),
            started_ms: self.settings.started_ms,
        });
        let beat = st.heartbeat(&self.shared.metrics, queue, self.rates).await;
        if self.status.is_some() {
            s.publish_status(&st.topic, beat.clone());
        }
        let status: serde_json::Value = serde_json::from_slice(&beat).unwrap_or_default();
        control::result(
            request_id,
            "status",
            Ok(Default::default()),
            Some(("status", status)),
        )
    }

    /// A command on the control topic. `status` is answered here; the
    /// others go to the reloader, whose answer is published when it comes
    /// (checking and testing a rule set may take a while: the session
    /// goes on meanwhile).
    async fn command(&mut self, s: &mut Session<'_, Link>, queue: &QueueHandle, payload: &[u8]) {
        let Some(topic) = self.control else {
            return;
        };
        s.count_command();
        if !self.pace.try_take(Instant::now()) {
            // More than CONTROL_RATE a second: dropped, no result (answering
            // a flood would be a flood).
            s.count_command_dropped();
            return;
        }
        let result_topic = format!("{topic}/result");
        let c = match control::parse(payload) {
            Ok(c) => c,
            Err(refusal) => {
                warn!(upstream = %s.name_of(), "control command refused: not a command this gateway knows");
                s.publish_own(&result_topic, refusal, false);
                return;
            }
        };
        let name = c.op.name();
        info!(upstream = %s.name_of(), command = name, request_id = %c.request_id, "control command");
        let rules = match c.op {
            control::Op::Status => {
                let result = self.status_now(s, queue, &c.request_id).await;
                s.publish_own(&result_topic, result, false);
                return;
            }
            control::Op::Reload => RemoteRules::Disk,
            control::Op::Rules(files) => RemoteRules::Files(files),
            control::Op::Rollback => RemoteRules::Previous,
        };
        if self.busy.load(Relaxed) >= CONTROL_BUSY {
            let why = format!(
                "busy: {CONTROL_BUSY} commands are being worked on; send it again once their results are in"
            );
            s.publish_own(
                &result_topic,
                control::result(&c.request_id, name, Err(vec![why]), None),
                false,
            );
            return;
        }
        self.busy.fetch_add(1, Relaxed);
        let busy = self.busy.clone();
        let reload = self.shared.reload.clone();
        let results = self.results_tx.clone();
        tokio::spawn(async move {
            let (reply, answer) = tokio::sync::oneshot::channel();
            if reload.send(Request::Remote { rules, reply }).await.is_err() {
                busy.fetch_sub(1, Relaxed);
                return; // shutting down
            }
            if let Ok(applied) = answer.await {
                let _ = results
                    .send(control::applied(&c.request_id, name, applied))
                    .await;
            }
            busy.fetch_sub(1, Relaxed);
        });
    }
}

/// The session's requests to the queue: a read now, or a request for
/// rows that the queue answers when they come.
#[derive(Default)]
struct Reads {
    /// Asked for up to `wait_limit` rows, answered when they come.
    waiting: Option<Waiting>,
    wait_limit: usize,
    /// Rows the queue sent in answer to `waiting`.
    pushed: Option<Vec<Row>>,
}

/// What a read gave.
enum Read {
    /// Rows, and how many were asked for.
    Rows(Vec<Row>, usize),
    /// No read was due.
    Nothing,
    /// The read failed; try again.
    Again,
}

impl Reads {
    /// Rows to send now: pushed by the queue, or read if the window and
    /// pace make a read worth it.
    async fn read(
        &mut self,
        s: &Session<'_, Link>,
        room: Room,
        queue: &QueueHandle,
        name: &str,
    ) -> Result<Read, Ended> {
        if let Some(rows) = self.pushed.take() {
            return Ok(Read::Rows(rows, self.wait_limit));
        }
        if s.drained || !room.due {
            return Ok(Read::Nothing);
        }
        match fetch(queue, name, s.position, room.allowed).await {
            Ok(rows) => Ok(Read::Rows(rows, room.allowed)),
            Err(QueueError::Closed) => Err(Ended::QueueClosed),
            Err(e) => {
                warn!(upstream = %name, error = %e, "cannot read queue; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok(Read::Again)
            }
        }
    }

    /// Caught up: ask the queue for the next rows as soon as there is room
    /// for a batch, and have it send them when they come. Whether the
    /// session waits on the pace instead.
    async fn wait_if_drained(
        &mut self,
        s: &mut Session<'_, Link>,
        room: Room,
        queue: &QueueHandle,
        name: &str,
    ) -> Result<bool, Ended> {
        if !s.drained {
            return Ok(room.paced);
        }
        if self.waiting.is_some() {
            return Ok(false);
        }
        let room = s.room();
        if room.due {
            let cursor = s.position.waiting_cursor();
            match queue.wait(name, cursor, room.allowed).await {
                Ok(w) => {
                    self.waiting = Some(w);
                    self.wait_limit = room.allowed;
                }
                Err(_) => return Err(Ended::QueueClosed),
            }
        }
        Ok(room.paced)
    }
}

/// Up to `limit` rows after the session's position: with `live_first`,
/// the live rows (queued after this connection) first.
async fn fetch(
    queue: &QueueHandle,
    name: &str,
    at: Position,
    limit: usize,
) -> Result<Vec<Row>, QueueError> {
    let mut rows = Vec::new();
    if at.live_first {
        rows = queue.fetch(name, at.live_after, i64::MAX, limit).await?;
    }
    if rows.len() < limit {
        let more = queue
            .fetch(name, at.after, at.boundary, limit - rows.len())
            .await?;
        rows.extend(more);
    }
    Ok(rows)
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
