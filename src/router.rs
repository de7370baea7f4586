//! The router stage: applies the rule set to each event and appends one
//! queue row per upstream destination. Events are taken in batches so the
//! queue writer receives few, large appends.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use serde_json::json;
use tokio::sync::mpsc;
use tracing::info;

use crate::codec;
use crate::event::Event;
use crate::metrics::Metrics;
use crate::queue::{NewRow, QueueError, QueueHandle};
use crate::rules::RuleSet;

/// Largest batch handed to the queue writer at once.
const BATCH: usize = 512;

/// Run until ingest closes its end of `events`; then every event received
/// has been handed to the queue, and dropping `queue` lets it commit and close.
pub async fn run(
    mut events: mpsc::Receiver<Event>,
    rules: Arc<RuleSet>,
    queue: QueueHandle,
    metrics: Arc<Metrics>,
) -> Result<(), QueueError> {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        if events.recv_many(&mut batch, BATCH).await == 0 {
            info!("router drained");
            return Ok(());
        }
        let mut rows = Vec::with_capacity(batch.len());
        for event in batch.drain(..) {
            let verdict = rules.route(&event);
            if verdict.matched == 0 {
                metrics.dropped_unmatched.fetch_add(1, Relaxed);
                continue;
            }
            metrics.matched.fetch_add(1, Relaxed);
            if verdict.dropped_by.is_some() && verdict.routes.is_empty() {
                metrics.dropped_rule.fetch_add(1, Relaxed);
                continue;
            }
            let event_id = event.id.to_string();
            for route in verdict.routes {
                rows.push(NewRow {
                    upstream: route.upstream,
                    event_id: event_id.clone(),
                    topic: route.topic,
                    qos: route.qos,
                    priority: route.priority,
                    expires_ms: route.ttl.map(|t| event.received_ms + t.as_millis() as u64),
                    overflow: route.overflow,
                    received_ms: event.received_ms,
                    payload: match &route.id_field {
                        Some(field) => codec::with_json_field(
                            &event.payload,
                            &event.raw,
                            field,
                            json!(event_id),
                        ),
                        None => event.raw.clone(),
                    },
                });
            }
        }
        if !rows.is_empty() {
            queue.append(rows).await?;
        }
    }
}
