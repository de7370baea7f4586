//! edgeferry: an MQTT edge router with store-and-forward.
//!
//! `start` wires the stages (see ARCHITECTURE.md) and returns a handle;
//! `run` is `start` plus waiting for a shutdown signal, which is what the
//! binary does. Tests drive the same `start`.

pub mod acl;
pub mod broker;
pub mod codec;
pub mod config;
pub mod credentials;
pub mod diagnostic;
pub mod event;
pub mod frontdoor;
pub mod inspect;
pub mod metrics;
pub mod ops;
pub mod pacing;
pub mod passwd;
pub mod queue;
pub mod receipt;
pub mod reload;
pub mod republish;
pub mod router;
pub mod rules;
pub mod status;
pub mod tls;
pub mod units;
pub mod uplink;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{error, info, warn};

pub use config::Config;
use metrics::Metrics;

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error(transparent)]
    Queue(#[from] queue::QueueError),
    #[error(transparent)]
    Metrics(#[from] ops::http::HttpError),
    /// An upstream's credentials or TLS files are unusable: fix the file
    /// named in the message; nothing was started.
    #[error("upstream {name}: {source}")]
    Upstream {
        name: String,
        source: uplink::SetupError,
    },
    #[error("embedded broker stopped unexpectedly (all its listeners failed); see the log above")]
    BrokerStopped,
    /// A stage ended before shutdown: a bug or an unrecoverable condition
    /// (see the stage's error); the queue is intact and a restart resumes.
    #[error("{stage} stopped unexpectedly: {reason}")]
    StageFailed { stage: &'static str, reason: String },
    /// The final commit at shutdown failed (disk full, I/O error): these
    /// events are gone. Free space before the next stop.
    #[error("{lost} events could not be stored at shutdown (disk full or I/O error; see the log)")]
    NotStored { lost: u64 },
}

/// A running pipeline.
pub struct Running {
    /// The front door's listener, MQTT 3.1.1 and 5 (port 0 resolved).
    pub broker_addr: SocketAddr,
    /// The second plain listener (`listen_v5`), if enabled.
    pub broker_addr_v5: Option<SocketAddr>,
    /// The TLS listener, if enabled.
    pub broker_addr_tls: Option<SocketAddr>,
    /// The embedded broker's link client id (random per start).
    pub link_id: String,
    /// The metrics endpoint (port 0 resolved), if enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// Live counters.
    pub metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    reload: mpsc::Sender<reload::Trigger>,
    supervisor: JoinHandle<Result<(), RunError>>,
}

impl Running {
    /// Reload the rules (what SIGHUP does); the outcome shows in the log and
    /// in `metrics.reloads_ok` / `reloads_failed`.
    pub fn reload(&self) {
        let _ = self.reload.try_send(reload::Trigger::Signal);
    }

    /// Ask every stage to stop; `wait` returns when they have.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Wait until the pipeline has stopped: front door drained, queue committed.
    pub async fn wait(self) -> Result<(), RunError> {
        match self.supervisor.await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Stop and wait.
    pub async fn stop(self) -> Result<(), RunError> {
        self.shutdown();
        self.wait().await
    }
}

/// Run until `shutdown` completes, then stop cleanly.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    // Before start: a SIGHUP while starting must not kill the process.
    let mut hangup = hangup_signal();
    let running = start(config).await?;
    let stop = running.shutdown.clone();
    let mut stopped = running.shutdown.subscribe();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                info!("shutting down");
                let _ = stop.send(true);
                break;
            }
            // The pipeline stopped on its own (an error): nothing to signal.
            _ = stopped.wait_for(|s| *s) => break,
            Some(()) = recv_hangup(&mut hangup) => {
                info!("SIGHUP: reloading rules");
                running.reload();
            }
        }
    }
    running.wait().await
}

/// SIGHUP asks for a rule reload (`systemctl reload`). `None` if the
/// handler cannot be installed (then only file watching reloads).
fn hangup_signal() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP; rules reload on file changes only");
            None
        }
    }
}

async fn recv_hangup(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Start every stage: queue, front door, broker (+ link), router, one uplink per
/// upstream, and the periodic summary.
pub async fn start(config: Config) -> Result<Running, RunError> {
    let file = &config.file;
    let upstream_names: Vec<String> = file.upstream.keys().cloned().collect();
    let metrics = Arc::new(Metrics::new(&upstream_names));
    metrics
        .started_ms
        .store(event::now_ms(), std::sync::atomic::Ordering::Relaxed);
    // Starts the monotonic clock of /health.
    metrics.uptime_ms();
    for w in &config.warnings {
        warn!("{w}");
    }
    // Credentials and TLS files first: a bad one stops the start before
    // anything listens.
    let mut uplinks = Vec::new();
    for name in &upstream_names {
        let settings =
            uplink::UplinkSettings::new(name, config.client_id(name), &file.upstream[name])
                .map_err(|source| RunError::Upstream {
                    name: name.clone(),
                    source,
                })?;
        uplinks.push(settings);
    }
    let settings = queue::QueueSettings {
        commit_interval: file.queue.commit_interval.0,
        commit_max_events: file.queue.commit_max_events,
        max_size: file
            .upstream
            .iter()
            .map(|(name, u)| (name.clone(), u.max_size.0))
            .collect(),
        min_free_disk: file.queue.min_free_disk.0,
        sweep_interval: file.queue.sweep_interval.0,
        durability: file.queue.durability,
        memory_max: file.queue.memory_max.0,
        spill_after: file.queue.spill_after.0,
    };
    // The queue first: if the database is unusable there is no point
    // accepting sensor data.
    let (queue, queue_thread) = queue::open(&file.queue.path, settings, metrics.clone())?;
    // Bound before anything listens, so a port in use fails the start.
    let metrics_listener = match file.metrics.enabled {
        true => Some(ops::http::bind(file.metrics.listen).await?),
        false => None,
    };
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    let auth = match &file.broker.password_file {
        Some(path) => Some(Arc::new(
            frontdoor::auth::LocalAuth::load(path.clone(), metrics.clone())
                .map_err(broker::BrokerError::from)?,
        )),
        None => None,
    };
    let acl = match &file.broker.acl_file {
        Some(path) => Some(Arc::new(
            frontdoor::auth::AclFile::load(path.clone()).map_err(broker::BrokerError::Acl)?,
        )),
        None => None,
    };
    let listeners = frontdoor::bind(&file.broker).await?;
    let broker = broker::start(&file.broker).await?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let (events_tx, events_rx) = mpsc::channel(file.pipeline.buffer);
    // Every stage runs in this set; the supervisor treats any stage ending
    // before shutdown (error or panic) as fatal, so the process exits
    // non-zero and systemd restarts it instead of running on half-dead.
    let mut stages: JoinSet<(&'static str, Result<(), String>)> = JoinSet::new();
    let door = Arc::new(frontdoor::Door::new(
        &file.broker,
        broker.internal.clone(),
        auth,
        acl,
        metrics.clone(),
    ));
    let (listen, listen_v5, tls_listen) =
        (listeners.listen, listeners.listen_v5, listeners.tls_listen);
    let front = frontdoor::run(
        listeners,
        door.clone(),
        events_tx,
        file.broker.max_connections,
        shutdown_rx.clone(),
    );
    stages.spawn(async move {
        front.await;
        ("front door", Ok(()))
    });
    let (republisher, republish_thread) =
        republish::spawn(broker.link_tx, broker.link_rx, metrics.clone()).map_err(|e| {
            RunError::StageFailed {
                stage: "republish",
                reason: e.to_string(),
            }
        })?;
    let (rules_tx, rules_rx) = watch::channel(Arc::new(config.rules.clone()));
    let router = router::run(
        events_rx,
        rules_rx,
        queue.clone(),
        republisher,
        door.ingest.clone(),
        metrics.clone(),
    );
    stages.spawn(async move { ("router", router.await.map_err(|e| e.to_string())) });
    let (reload_tx, reload_rx) = mpsc::channel(1);
    let reloader = reload::run(
        config.clone(),
        rules_tx,
        reload_rx,
        metrics.clone(),
        shutdown_rx.clone(),
    );
    stages.spawn(async move {
        reloader.await;
        ("reload", Ok(()))
    });
    for settings in uplinks {
        let uplink_metrics = metrics.uplinks[&settings.name].clone();
        let uplink = uplink::run(settings, queue.clone(), uplink_metrics, shutdown_rx.clone());
        stages.spawn(async move {
            uplink.await;
            ("uplink", Ok(()))
        });
    }
    if let Some(listener) = metrics_listener {
        let server = ops::http::serve(
            listener,
            metrics.clone(),
            queue.clone(),
            shutdown_rx.clone(),
        );
        stages.spawn(async move {
            server.await;
            ("metrics", Ok(()))
        });
    }
    let summary = summarize(
        metrics.clone(),
        file.log.summary_interval.0,
        shutdown_rx.clone(),
    );
    stages.spawn(async move {
        summary.await;
        ("summary", Ok(()))
    });
    let trim = ops::memory::trim_periodically(shutdown_rx.clone());
    stages.spawn(async move {
        trim.await;
        ("memory", Ok(()))
    });
    // The health stage holds the last queue handle here: when every stage
    // has ended, the writer commits and exits.
    let listeners = Listening {
        front: [Some(listen), listen_v5].into_iter().flatten().collect(),
        internal: broker.internal.clone(),
    };
    let health = health(queue, listeners, metrics.clone(), shutdown_rx.clone());
    stages.spawn(async move {
        health.await;
        ("health", Ok(()))
    });
    info!(
        rules = config.rules.len(),
        upstreams = upstream_names.len(),
        queue = %file.queue.path.display(),
        "edgeferry started"
    );
    ops::systemd::ready(&status_line(&metrics, None));

    let stop = shutdown_tx.clone();
    let mut broker_exited = broker.exited;
    let metrics_at_stop = metrics.clone();
    let supervisor = tokio::spawn(async move {
        let mut failure = None;
        let mut stopping = stop.subscribe();
        tokio::select! {
            Some(done) = stages.join_next() => {
                // Stages end by themselves once shutdown was asked for.
                if !*stop.borrow() {
                    failure = Some(stage_failure(done));
                }
            }
            _ = &mut broker_exited => failure = Some(RunError::BrokerStopped),
            _ = stopping.wait_for(|s| *s) => {}
        }
        if let Some(e) = &failure {
            error!(error = %e, "stopping");
        }
        ops::systemd::stopping();
        let _ = stop.send(true);
        // Stop order follows ownership: the front door's sessions hand what
        // they read to the pipeline and drop their senders, the router
        // drains into the queue and drops its handle,
        // uplinks close; the queue thread commits once the last handle is gone.
        while let Some(done) = stages.join_next().await {
            if let Ok((stage, Err(e))) = &done {
                error!(stage, error = %e, "stage failed while stopping");
            } else if let Err(e) = &done {
                error!(error = %e, "stage panicked while stopping");
            }
        }
        let lost = tokio::task::spawn_blocking(move || {
            let _ = republish_thread.join();
            queue_thread.join()
        })
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(0);
        info!(summary = %metrics_at_stop.summary(), "edgeferry stopped");
        if lost > 0 && failure.is_none() {
            failure = Some(RunError::NotStored { lost });
        }
        failure.map_or(Ok(()), Err)
    });

    Ok(Running {
        broker_addr: listen,
        broker_addr_v5: listen_v5,
        broker_addr_tls: tls_listen,
        link_id: broker.link_id,
        metrics_addr,
        metrics,
        shutdown: shutdown_tx,
        reload: reload_tx,
        supervisor,
    })
}

/// What it means that a stage ended before shutdown was asked for.
fn stage_failure(
    done: Result<(&'static str, Result<(), String>), tokio::task::JoinError>,
) -> RunError {
    match done {
        Ok((stage, Err(reason))) => RunError::StageFailed { stage, reason },
        Ok((stage, Ok(()))) => RunError::StageFailed {
            stage,
            reason: "ended early".into(),
        },
        Err(e) => RunError::StageFailed {
            stage: "a stage",
            reason: format!("panicked: {e}"),
        },
    }
}

/// Liveness: every few seconds (half the systemd watchdog interval when
/// one is set) the queue writer must answer a request, and the router must
/// have moved if events wait for it; only then is WATCHDOG=1 sent (and
/// `/health` kept at 200), so a stuck writer or router gets the daemon
/// restarted. STATUS= is refreshed at the same pace.
async fn health(
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
                error!(waited = ?every, "queue writer did not answer; withholding the watchdog ping");
            }
        }
    }
}

/// What the health probe connects to.
struct Listening {
    /// The front door's plain listeners (the TLS one would need a client
    /// that trusts its certificate; it shares the sessions' code).
    front: Vec<SocketAddr>,
    /// The embedded broker's internal listeners.
    internal: broker::Internal,
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
fn status_line(metrics: &Metrics, queue: Option<&[queue::Stats]>) -> String {
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
async fn summarize(
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
