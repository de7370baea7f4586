//! Ingest: read publishes from the broker link, decode them into events and
//! hand them to the router without ever waiting on it.
//!
//! rumqttd keeps only `segment_size * segment_count` of recent messages per
//! filter; a reader that falls further behind silently skips ahead (a WARN
//! "Read cursor start jumped"), after the sensor already got its PUBACK. So
//! this loop does nothing slow: when the hand-off buffer is full the event is
//! dropped and counted, and gaps in the link's log offsets are counted as
//! `broker_lost`, so no loss is silent.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use rumqttd::Notification;
use rumqttd::local::LinkRx;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::codec::Payload;
use crate::event::Event;
use crate::metrics::Metrics;
use crate::republish;
use crate::rules::topic::Pattern;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The broker dropped the link: another client took its client id, or
    /// the broker's router died. Ingest cannot continue; restart the daemon.
    #[error(
        "embedded broker disconnected the ingest link ({0}); stopping so the service manager can restart edgeferry"
    )]
    LinkLost(String),
}

/// Detects rumqttd skipping messages: per ingest filter, log offsets of
/// consecutive forwards must be consecutive.
struct GapDetector {
    filters: Vec<Pattern>,
    /// Next expected absolute offset per filter index.
    next: HashMap<usize, u64>,
}

impl GapDetector {
    fn new(filters: &[String]) -> GapDetector {
        let filters: Vec<Pattern> = filters
            .iter()
            .filter_map(|f| Pattern::parse(f).ok())
            .collect();
        GapDetector {
            // The link subscribes before the broker starts, so each filter's
            // log begins at offset 0 with us: messages skipped before the
            // first one ingest sees are lost too (a slow start under load).
            next: (0..filters.len()).map(|i| (i, 0)).collect(),
            filters,
        }
    }

    /// Messages lost before this one, by its offset in its filter's log.
    fn lost_before(&mut self, topic: &str, cursor: Option<(u64, u64)>) -> u64 {
        // Retained messages come without a cursor.
        let Some((_, offset)) = cursor else { return 0 };
        let Some(filter) = self
            .filters
            .iter()
            .position(|f| f.captures(topic).is_some())
        else {
            return 0;
        };
        let lost = match self.next.get(&filter) {
            Some(&expected) if offset > expected => offset - expected,
            _ => 0,
        };
        self.next.insert(filter, offset + 1);
        lost
    }
}

/// Run until `shutdown` turns true or the link fails. Dropping `out` on
/// return tells the router that no more events come.
pub async fn run(
    mut link: LinkRx,
    filters: Vec<String>,
    out: mpsc::Sender<Event>,
    ours: Arc<republish::Tracker>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), IngestError> {
    let mut ingest = Ingest {
        gaps: GapDetector::new(&filters),
        ours,
        out,
        metrics,
    };
    loop {
        let notification = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => break,
            n = link.next() => n,
        };
        if !ingest.handle(&mut link, notification).await? {
            return Ok(());
        }
    }
    // Sensors already got their PUBACK for what the broker holds for us:
    // take in what is already there before stopping, but do not wait on
    // sensors that keep publishing (systemd's stop timeout is running).
    let give_up = tokio::time::Instant::now() + DRAIN_MAX;
    while let Ok(Ok(n)) =
        tokio::time::timeout_at(give_up, tokio::time::timeout(DRAIN_IDLE, link.next())).await
    {
        if !ingest.handle(&mut link, n).await? {
            break;
        }
    }
    info!("ingest stopped");
    Ok(())
}

/// At shutdown, ingest stops once the link has been quiet this long.
const DRAIN_IDLE: std::time::Duration = std::time::Duration::from_millis(100);
/// ... or after this long, whatever sensors are still sending.
const DRAIN_MAX: std::time::Duration = std::time::Duration::from_secs(2);

struct Ingest {
    gaps: GapDetector,
    /// Recognises edgeferry's own local publishes coming back.
    ours: Arc<republish::Tracker>,
    out: mpsc::Sender<Event>,
    metrics: Arc<Metrics>,
}

impl Ingest {
    /// Handle one link notification. `Ok(false)`: the router is gone, stop.
    async fn handle(
        &mut self,
        link: &mut LinkRx,
        notification: Result<Option<Notification>, rumqttd::local::LinkError>,
    ) -> Result<bool, IngestError> {
        let metrics = &self.metrics;
        match notification {
            Ok(Some(Notification::Forward(forward))) => {
                let publish = forward.publish;
                metrics.received.fetch_add(1, Relaxed);
                let Ok(topic) = std::str::from_utf8(&publish.topic) else {
                    // rumqttd validates UTF-8 topics; count, never panic.
                    metrics.decoded_raw.fetch_add(1, Relaxed);
                    return Ok(true);
                };
                let lost = self.gaps.lost_before(topic, forward.cursor);
                if lost > 0 {
                    metrics.broker_lost.fetch_add(lost, Relaxed);
                    warn!(
                        lost,
                        "embedded broker skipped messages because ingest fell behind its segments"
                    );
                }
                // Our own dead letters are for local subscribers only.
                let origin = match self.ours.source_of(topic, &publish.payload) {
                    republish::Source::Client => None,
                    republish::Source::Rule(origin) => Some(origin),
                    republish::Source::DeadLetter => return Ok(true),
                };
                let mut event = Event::from_publish(topic.to_string(), publish.payload);
                event.origin = origin;
                match event.payload {
                    Payload::Json(_) => &metrics.decoded_json,
                    Payload::Cbor(_) => &metrics.decoded_cbor,
                    Payload::Raw => &metrics.decoded_raw,
                    Payload::Malformed(_) => &metrics.decoded_malformed,
                }
                .fetch_add(1, Relaxed);
                match self.out.try_send(event) {
                    Ok(()) => {
                        metrics.handed.fetch_add(1, Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        metrics.dropped_overflow.fetch_add(1, Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return Ok(false),
                }
            }
            // rumqttd stops scheduling a link whose outgoing buffer filled up
            // and never reschedules it by itself: say we are ready again.
            Ok(Some(Notification::Unschedule)) => {
                link.wake()
                    .await
                    .map_err(|e| IngestError::LinkLost(e.to_string()))?;
            }
            Ok(Some(Notification::Disconnect(d, _))) => {
                error!(reason = ?d.reason_code, "ingest link disconnected by the broker");
                return Err(IngestError::LinkLost(format!("{:?}", d.reason_code)));
            }
            Ok(Some(_)) | Ok(None) => {}
            Err(e) => return Err(IngestError::LinkLost(e.to_string())),
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_counted_per_filter() {
        let mut g = GapDetector::new(&["a/#".into(), "b/#".into()]);
        assert_eq!(
            g.lost_before("a/x", Some((0, 10))),
            10,
            "skipped from the start"
        );
        assert_eq!(g.lost_before("a/x", Some((0, 11))), 0);
        assert_eq!(g.lost_before("b/x", Some((0, 0))), 0);
        assert_eq!(g.lost_before("b/x", Some((0, 3))), 2);
        assert_eq!(g.lost_before("a/x", Some((1, 15))), 3);
        assert_eq!(g.lost_before("a/x", None), 0);
        assert_eq!(g.lost_before("b/x", Some((0, 4))), 0);
    }
}
