//! The router stage: applies the rule set to each event, appends one queue
//! row per upstream destination, hands local republishes and dead letters
//! to the republisher, and closes due windows. Events are taken in batches
//! so the queue writer receives few, large appends.
//!
//! An event's receipt (the front door waits on it to acknowledge the
//! sensor) is copied onto each of its queue rows, and the router's own
//! copy is settled once the rows are handed to the queue writer: an event
//! no rule sends upstream is safe once routed.
//!
//! A rule's `local` republish on a topic edgeferry ingests is routed again
//! here, marked with its origin so the rules skip the rule that made it and
//! stop loops (`rules::MAX_HOPS`); the front door never sees it.
//!
//! A reloaded rule set arrives on a watch channel and is swapped in between
//! batches; the shaping state of every unchanged rule is carried over.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::event::{Event, now_ms};
use crate::metrics::Metrics;
use crate::queue::{NewRow, QueueError, QueueHandle};
use crate::receipt::Receipt;
use crate::republish::{Local, Republisher};
use crate::rules::shaping::DropReason;
use crate::rules::{RuleSet, State, Verdict};

/// Largest batch handed to the queue writer at once.
const BATCH: usize = 512;

/// Republished events waiting to be routed again, at most: a rule set
/// that fans out at every hop is cut here (counted as `dropped_loop`).
const LOOPBACK_MAX: usize = 10_000;

/// An event as the front door hands it over.
#[derive(Debug)]
pub struct Inbound {
    pub event: Event,
    /// `None` for QoS 0 and wills (`ack = "received"` has one too: it
    /// paces the connection).
    pub receipt: Option<Receipt>,
}

/// Rule errors are logged at most this often (they are always counted).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Run until ingest closes its end of `events`; then every event received
/// has been handed to the queue (open windows are closed and sent), and
/// dropping `queue` lets it commit and close.
pub async fn run(
    mut events: mpsc::Receiver<Inbound>,
    mut rules: watch::Receiver<Arc<RuleSet>>,
    queue: QueueHandle,
    local: Republisher,
    ingest: Vec<crate::topic::Pattern>,
    metrics: Arc<Metrics>,
) -> Result<(), QueueError> {
    let mut set = rules.borrow_and_update().clone();
    metrics.rules.store(set.len() as u64, Relaxed);
    set_digest(&metrics, &set);
    let mut router = Router {
        state: set.new_state(),
        local,
        metrics,
        dead_letter_topic: set.dead_letter_topic().map(str::to_string),
        warns: WarnLimit::default(),
        ingest,
        loopback: VecDeque::new(),
        trace_budget: Default::default(),
    };
    let mut batch = Vec::with_capacity(BATCH);
    let mut rules_open = true;
    loop {
        let wake = set.next_deadline(&router.state).map(|at| {
            let wait = at.saturating_add(WINDOW_GRACE_MS).saturating_sub(now_ms());
            tokio::time::Instant::now() + Duration::from_millis(wait)
        });
        // Biased: a reloaded set is taken before more events; the window
        // timer before events so a steady stream cannot starve it (its
        // branch routes what has already arrived first).
        tokio::select! {
            biased;
            changed = rules.changed(), if rules_open => {
                if changed.is_err() {
                    rules_open = false;
                    continue;
                }
                let new = rules.borrow_and_update().clone();
                let old = std::mem::take(&mut router.state);
                let (state, flushed) = new.carry_state(&set, old);
                router.state = state;
                router.dead_letter_topic = new.dead_letter_topic().map(str::to_string);
                router.metrics.rules.store(new.len() as u64, Relaxed);
                set_digest(&router.metrics, &new);
                set = new;
                router.send(&set, flushed, &queue).await?;
            }
            _ = sleep_until(wake), if wake.is_some() => {
                // An event received before a window's end belongs in it.
                while let Ok(event) = events.try_recv() {
                    batch.push(event);
                    if batch.len() == BATCH {
                        router.route(&set, &mut batch, &queue).await?;
                    }
                }
                router.route(&set, &mut batch, &queue).await?;
                let verdict = set.tick(now_ms().saturating_sub(WINDOW_GRACE_MS), &mut router.state);
                router.send(&set, verdict, &queue).await?;
            }
            n = events.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    // Shutting down: open windows are sent as they are.
                    let verdict = set.tick(u64::MAX, &mut router.state);
                    router.send(&set, verdict, &queue).await?;
                    info!("router drained");
                    return Ok(());
                }
                router.route(&set, &mut batch, &queue).await?;
            }
        }
    }
}

/// The digest of the rules in use, for the status topic's heartbeat.
fn set_digest(metrics: &Metrics, set: &RuleSet) {
    *metrics
        .rules_digest
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = set.digest();
}

/// Windows close this long after their end, so that events received just
/// before the end and still on their way through ingest get in. An event
/// later than that opens a window of its own for the same period.
const WINDOW_GRACE_MS: u64 = 1000;

/// `set.route`, with a panic inside it (a bug in the rule engine or a
/// dependency, on some odd input) turned into a dead letter for that one
/// event instead of the end of the router: the daemon keeps running.
fn route_guarded(set: &RuleSet, event: &Event, state: &mut State, traced: bool) -> Verdict {
    let route = || match traced {
        true => set.route_traced(event, state),
        false => set.route(event, state),
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(route)) {
        Ok(v) => v,
        Err(_) => Verdict {
            dead_letter: Some(
                "internal error: the rule engine panicked on this event (a bug; please report it with this event)"
                    .into(),
            ),
            ..Verdict::default()
        },
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

struct Router {
    state: State,
    local: Republisher,
    metrics: Arc<Metrics>,
    dead_letter_topic: Option<String>,
    /// Rate limit of dead-letter and window warnings.
    warns: WarnLimit,
    /// Topics edgeferry ingests: a republish on one is routed again.
    ingest: Vec<crate::topic::Pattern>,
    /// Republished events to route again after the current ones.
    loopback: VecDeque<Event>,
    /// How many events a second `tail` may see.
    trace_budget: crate::ops::trace::Budget,
}

/// One WARN per `WARN_EVERY` at most, saying how many were held back.
#[derive(Default)]
struct WarnLimit {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl WarnLimit {
    /// `Some(held back since the last one)` when a WARN may be logged now.
    fn allow(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        if self.last.is_some_and(|t| now - t < WARN_EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

impl Router {
    /// Route a batch of events (emptying it) and queue the rows; then the
    /// events' receipts are settled (the rows carry their own copies).
    async fn route(
        &mut self,
        set: &RuleSet,
        batch: &mut Vec<Inbound>,
        queue: &QueueHandle,
    ) -> Result<(), QueueError> {
        let mut rows = Vec::with_capacity(batch.len());
        let mut receipts = Vec::new();
        let watched = self.metrics.trace.watched();
        for Inbound { event, receipt } in batch.drain(..) {
            let traced = watched && self.trace_budget.take();
            let verdict = route_guarded(set, &event, &mut self.state, traced);
            if traced {
                let skipped = std::mem::take(&mut self.trace_budget.skipped);
                self.metrics.trace.send(&event, &verdict, skipped);
            }
            self.apply(Some(&event), verdict, &mut rows, receipt.as_ref());
            self.metrics.routed.fetch_add(1, Relaxed);
            receipts.extend(receipt);
        }
        self.route_loopback(set, &mut rows);
        if !rows.is_empty() {
            queue.append(rows).await?;
        }
        receipts.into_iter().for_each(Receipt::settle);
        Ok(())
    }

    /// Route the republished events (and what they republish in turn).
    fn route_loopback(&mut self, set: &RuleSet, rows: &mut Vec<NewRow>) {
        while let Some(event) = self.loopback.pop_front() {
            let verdict = route_guarded(set, &event, &mut self.state, false);
            self.apply(Some(&event), verdict, rows, None);
        }
    }

    /// Apply a verdict of no event (windows closed by the clock or a
    /// reload) and queue its rows.
    async fn send(
        &mut self,
        set: &RuleSet,
        verdict: Verdict,
        queue: &QueueHandle,
    ) -> Result<(), QueueError> {
        let mut rows = Vec::new();
        self.apply(None, verdict, &mut rows, None);
        self.route_loopback(set, &mut rows);
        if !rows.is_empty() {
            queue.append(rows).await?;
        }
        Ok(())
    }

    /// Count a verdict, queue its routes and publish its local outputs.
    /// `event` is `None` for windows closed by the clock.
    fn apply(
        &mut self,
        event: Option<&Event>,
        verdict: Verdict,
        rows: &mut Vec<NewRow>,
        receipt: Option<&Receipt>,
    ) {
        self.count(event, &verdict);
        let traced = verdict.trace.is_some();
        if let Some(f) = &verdict.schema_failure {
            *self
                .metrics
                .schema_failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(f.schema.to_string())
                .or_default() += 1;
        }
        if let (Some(event), Some(reason)) = (event, &verdict.dead_letter) {
            self.dead_letter(event, reason, verdict.broken_contract());
        }
        if event.is_none()
            && let Some((rule, why)) = verdict.errors.first()
        {
            // A window closed by the clock that could not be sent.
            if let Some(suppressed) = self.warns.allow() {
                warn!(rule = %rule, suppressed, "window not sent: {why}");
            }
        }
        for r in verdict.republish {
            // A command is delivered only once the embedded broker has it.
            let receipt = r.source.as_ref().and(receipt).cloned();
            self.republish(r, receipt);
        }
        for route in verdict.routes {
            rows.push(NewRow {
                upstream: route.upstream,
                event_id: route.event_id,
                topic: route.topic,
                qos: route.qos,
                priority: route.priority,
                expires_ms: route.ttl.map(|t| route.received_ms + t.as_millis() as u64),
                overflow: route.overflow,
                received_ms: route.received_ms,
                payload: route.payload,
                properties: route.properties,
                receipt: receipt.cloned(),
                traced,
            });
        }
    }

    /// What the verdict counts: matched, unmatched, dropped and why,
    /// errors, windows.
    fn count(&self, event: Option<&Event>, verdict: &Verdict) {
        let m = &*self.metrics;
        if event.is_some() {
            if verdict.matched > 0 {
                m.matched.fetch_add(1, Relaxed);
            } else if verdict.unmatched_routed {
                m.unmatched_routed.fetch_add(1, Relaxed);
            } else if let Some(e) = event
                && e.origin.is_none()
                && verdict.errors.is_empty()
                && verdict.dead_letter.is_none()
            {
                // (A republish no rule takes again was still delivered
                // locally: not a drop.)
                match e.source.is_some() {
                    true => &m.dropped_unmatched_downlink,
                    false => &m.dropped_unmatched,
                }
                .fetch_add(1, Relaxed);
            }
            if verdict.dropped_by.is_some() && verdict.routes.is_empty() {
                m.dropped_rule.fetch_add(1, Relaxed);
            }
            if verdict.dead_letter.is_some() {
                m.dead_letters.fetch_add(1, Relaxed);
            }
        }
        m.rule_errors
            .fetch_add(verdict.errors.len() as u64, Relaxed);
        for reason in &verdict.shaped {
            match reason {
                DropReason::Throttled => &m.dropped_throttled,
                DropReason::Duplicate => &m.dropped_duplicate,
                DropReason::InsideDeadband => &m.dropped_deadband,
            }
            .fetch_add(1, Relaxed);
        }
        m.window_absorbed
            .fetch_add(verdict.absorbed as u64, Relaxed);
        m.window_emitted.fetch_add(verdict.windows as u64, Relaxed);
        m.dropped_loop
            .fetch_add(verdict.loop_dropped as u64, Relaxed);
    }

    /// Log (rate-limited) and publish an event that went to the dead letters.
    fn dead_letter(
        &mut self,
        event: &Event,
        reason: &str,
        broke: Option<&crate::rules::schema::Failure>,
    ) {
        if let Some(suppressed) = self.warns.allow() {
            warn!(
                topic = %event.topic,
                id = %event.id,
                suppressed,
                "event dead-lettered: {reason}"
            );
        }
        if let Some(topic) = &self.dead_letter_topic {
            self.local.send(Local {
                topic: topic.clone(),
                payload: dead_letter(event, reason, broke),
                qos: 0,
                retain: false,
                origin: None,
                receipt: None,
            });
        }
    }

    /// A `local` destination's publish: to the embedded broker, and back
    /// through the rules when an ingest filter takes its topic (keeping the
    /// event's source: a republished command is still a command).
    fn republish(&mut self, r: crate::rules::Republish, receipt: Option<Receipt>) {
        if self.ingest.iter().any(|f| f.captures(&r.topic).is_some()) {
            if self.loopback.len() < LOOPBACK_MAX {
                let mut again = Event::from_publish(r.topic.clone(), r.payload.clone());
                again.origin = Some(r.origin.clone());
                again.source = r.source.clone();
                self.loopback.push_back(again);
            } else {
                self.metrics.dropped_loop.fetch_add(1, Relaxed);
            }
        }
        self.local.send(Local {
            topic: r.topic,
            payload: r.payload,
            qos: r.qos,
            retain: r.retain,
            origin: Some(r.origin),
            receipt,
        });
    }
}

/// The dead-letter message: why, and the event as it came (its payload as
/// text when it is UTF-8, else as hex).
fn dead_letter(
    event: &Event,
    reason: &str,
    broke: Option<&crate::rules::schema::Failure>,
) -> bytes::Bytes {
    let mut v = json!({
        "reason": reason,
        "topic": event.topic,
        "id": event.id.to_string(),
        "received_ms": event.received_ms,
    });
    // A broken contract says which, where and why, for a machine to read.
    if let Some(f) = broke {
        v["reason"] = json!(f.reason());
        v["schema"] = json!(&*f.schema);
        v["path"] = json!(f.path);
        v["message"] = json!(f.message);
    }
    match std::str::from_utf8(&event.raw) {
        Ok(text) => v["payload"] = json!(text),
        Err(_) => {
            v["payload_hex"] = json!(
                event
                    .raw
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            )
        }
    }
    bytes::Bytes::from(v.to_string())
}
