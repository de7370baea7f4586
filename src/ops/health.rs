//! Liveness and status: the health stage (the probes behind the systemd
//! watchdog and `/health`), the systemd STATUS= line, and the periodic
//! summary line of the counters.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::metrics::Metrics;
use crate::{broker, event, frontdoor, ops, queue};

/// Liveness: every few seconds (half the systemd watchdog interval when
/// one is set) the queue writer must answer a request, and the router must
/// have moved if events wait for it; only then is WATCHDOG=1 sent (and
/// `/health` kept at 200), so a stuck writer or router gets the daemon
/// restarted. STATUS= is refreshed at the same pace.
pub async fn run(
    queue: queue::QueueHandle,
    listeners: Listening,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let watchdog = ops::systemd::watchdog_interval();
    // Often enough for /health and STATUS= to be current, and at least
    // twice per watchdog interval.
    let every = watchdog
        .map(|w| w / 2)
        .unwrap_or(HEALTH_EVERY)
        .min(HEALTH_EVERY);
    metrics
        .health_every_ms
        .store(every.as_millis() as u64, Relaxed);
    let mut tick = tokio::time::interval(every);
    let mut router = RouterWatch::default();
    let mut held = HeldWatch::default();
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        // Every listener must answer a real MQTT CONNECT: a broker that
        // refuses one protocol's clients is not healthy (rumqttd once did,
        // for good, after a panic), whatever the queue says.
        if let Err(which) = listeners.answer(every).await {
            error!(listener = %which, "a listener does not answer MQTT; withholding the watchdog ping");
            continue;
        }
        if metrics.queue_damaged.load(Relaxed) > 0 {
            error!(
                "the queue file was damaged while running (see queue_damaged_total); withholding the watchdog ping so the daemon is restarted"
            );
            continue;
        }
        if let Some(ms) = held.check(
            metrics.door_held_ms.load(Relaxed),
            every,
            std::time::Instant::now(),
        ) {
            warn!(
                held_ms = ms,
                period_ms = every.as_millis() as u64,
                "local publishers are being held back: the pipeline is full, the rules or the queue are slower than they publish; their publishes wait unread (nothing is dropped), see local_publishers_held_seconds (logged at most every 60 s)"
            );
        }
        let answer = tokio::time::timeout(every, queue.stats()).await;
        let router_stuck = router.stuck(metrics.handed.load(Relaxed), metrics.routed.load(Relaxed));
        if router_stuck {
            error!(
                probes = router.still,
                "the router has not taken an event for several probes while events wait; withholding the watchdog ping"
            );
            continue;
        }
        match answer {
            Ok(Ok(stats)) => {
                metrics.healthy_ms.store(metrics.uptime_ms(), Relaxed);
                ops::systemd::status(&status_line(&metrics, Some(&stats)));
                if watchdog.is_some() {
                    ops::systemd::watchdog();
                }
            }
            Ok(Err(_)) => return, // the writer is gone: shutting down
            Err(_) => {
                error!(waited = %crate::units::HumanDuration::shown(every), "queue writer did not answer; withholding the watchdog ping");
            }
        }
    }
}

/// What the health probe connects to.
pub struct Listening {
    /// The front door's plain listeners (the TLS one would need a client
    /// that trusts its certificate; it shares the sessions' code).
    pub front: Vec<SocketAddr>,
    /// The embedded broker's internal listeners.
    pub internal: broker::Internal,
}

impl Listening {
    /// `Err(which)` for the first listener that does not answer in time.
    async fn answer(&self, within: std::time::Duration) -> Result<(), String> {
        for addr in &self.front {
            if !frontdoor::answers(*addr, within).await {
                return Err(format!("front door {addr}"));
            }
        }
        broker::answers(&self.internal, within).await
    }
}

/// Whether the router moves: stuck when events wait for it and it has
/// finished none for `STUCK_AFTER` probes in a row.
#[derive(Debug, Default)]
struct RouterWatch {
    last_routed: u64,
    /// Probes in a row with events waiting and none routed.
    still: u32,
}

/// Probes (5 s each by default) before a router that does not move counts
/// as stuck: long enough for any batch, short enough for the watchdog.
const STUCK_AFTER: u32 = 3;

impl RouterWatch {
    fn stuck(&mut self, handed: u64, routed: u64) -> bool {
        if handed > routed && routed == self.last_routed {
            self.still += 1;
        } else {
            self.still = 0;
        }
        self.last_routed = routed;
        self.still >= STUCK_AFTER
    }
}

/// Whether local publishers are held back for a sizeable part of the time:
/// sessions waiting for room in the pipeline (summed over sessions) for a
/// tenth of a probe period or more. Nothing is dropped then (a held session
/// is not read), but an operator should know the gateway is at its limit.
#[derive(Debug, Default)]
struct HeldWatch {
    last_ms: u64,
    warned: Option<std::time::Instant>,
}

/// At most one WARN about held publishers this often.
const HELD_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl HeldWatch {
    /// `Some(ms held in this period)` when a WARN is due.
    fn check(
        &mut self,
        held_ms: u64,
        period: std::time::Duration,
        now: std::time::Instant,
    ) -> Option<u64> {
        let delta = held_ms.saturating_sub(self.last_ms);
        self.last_ms = held_ms;
        if delta.saturating_mul(10) < period.as_millis() as u64 {
            return None;
        }
        if self
            .warned
            .is_some_and(|t| now.duration_since(t) < HELD_WARN_EVERY)
        {
            return None;
        }
        self.warned = Some(now);
        Some(delta)
    }
}

/// How often the health stage probes the queue writer (at most).
const HEALTH_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// `systemctl status` line: each upstream up/down with its backlog.
pub fn status_line(metrics: &Metrics, queue: Option<&[queue::Stats]>) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let now = event::now_ms();
    let ups: Vec<String> = metrics
        .uplinks
        .iter()
        .map(|(name, u)| {
            let state = if u.connected.load(Relaxed) {
                "up"
            } else {
                "down"
            };
            let Some(stats) = queue else {
                return format!("{name} {state}");
            };
            let mine = stats.iter().filter(|s| &s.upstream == name);
            let queued: u64 = mine.clone().map(|s| s.events).sum();
            match mine.map(|s| s.oldest_ms).min() {
                Some(oldest) => format!(
                    "{name} {state}, {queued} queued, oldest {}s",
                    now.saturating_sub(oldest) / 1000
                ),
                None => format!("{name} {state}, 0 queued"),
            }
        })
        .collect();
    format!(
        "received {}; {}",
        metrics.received.load(Relaxed),
        ups.join("; ")
    )
}

/// One log line with the counters every `every`, instead of a line per event.
pub async fn summarize(
    metrics: Arc<Metrics>,
    every: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            _ = tick.tick() => info!(summary = %metrics.summary(), "status"),
        }
    }
    info!(summary = %metrics.summary(), "final counters");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_publishers_warn_when_sustained_and_at_most_once_a_minute() {
        use std::time::{Duration, Instant};
        let period = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut w = HeldWatch::default();
        // A short hold in a burst: under a tenth of the period.
        assert_eq!(w.check(400, period, t0), None);
        // Held 2 s of the next 5 s: warned, with the figure.
        assert_eq!(w.check(2_400, period, t0 + period), Some(2_000));
        // Still held: quiet for a minute, then again.
        assert_eq!(w.check(5_000, period, t0 + period * 2), None);
        assert_eq!(w.check(7_000, period, t0 + Duration::from_secs(64)), None);
        assert_eq!(
            w.check(9_000, period, t0 + Duration::from_secs(66)),
            Some(2_000)
        );
        // Not held any more: nothing.
        assert_eq!(w.check(9_000, period, t0 + Duration::from_secs(200)), None);
    }

    #[test]
    fn a_router_is_stuck_only_when_events_wait_and_none_moves_for_three_probes() {
        let mut w = RouterWatch::default();
        // Idle: nothing handed, nothing routed, forever fine.
        assert!(!(0..10).any(|_| w.stuck(0, 0)));
        // Busy and moving.
        assert!(!w.stuck(100, 50));
        assert!(!w.stuck(200, 150));
        // Events wait, nothing moves: the third probe says stuck.
        assert!(!w.stuck(300, 150));
        assert!(!w.stuck(300, 150));
        assert!(w.stuck(300, 150));
        // It moves again: fine at once.
        assert!(!w.stuck(300, 160));
        // Caught up: fine even though the count stays.
        assert!(!w.stuck(300, 300));
        assert!(!w.stuck(300, 300));
        assert!(!w.stuck(300, 300));
    }
}
