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
pub mod percent;
pub mod queue;
pub mod receipt;
pub mod reload;
pub mod remote;
pub mod republish;
pub mod router;
pub mod rules;
pub mod setup;
pub mod status;
pub mod supervisor;
pub mod tls;
pub mod topic;
pub mod units;
pub mod uplink;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use metrics::Metrics;
pub use setup::Config;

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
    #[error("{stage} stopped unexpectedly: {end}")]
    StageFailed {
        stage: &'static str,
        end: supervisor::StageEnd,
    },
    /// The config's files were not read when it was loaded (it was not
    /// made by `Config::load`): load configs with `Config::load`.
    #[error("the config's {0} was not read when it was loaded")]
    NotResolved(String),
    /// A thread could not be started (the system's thread limit?).
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        what: &'static str,
        source: std::io::Error,
    },
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
    reload: mpsc::Sender<reload::Request>,
    supervisor: JoinHandle<Result<(), RunError>>,
}

impl Running {
    /// Reload the rules (what SIGHUP does); the outcome shows in the log and
    /// in `metrics.reloads_ok` / `reloads_failed`.
    pub fn reload(&self) {
        let _ = self
            .reload
            .try_send(reload::Request::Reload(reload::Trigger::Signal));
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
/// upstream, and the operations stages. Anything that can fail does so
/// before anything listens, or stops what already started.
pub async fn start(config: Config) -> Result<Running, RunError> {
    let file = &config.file;
    let metrics = Arc::new(Metrics::new(
        &file.upstream.keys().cloned().collect::<Vec<_>>(),
    ));
    metrics
        .started_ms
        .store(event::now_ms(), std::sync::atomic::Ordering::Relaxed);
    // Starts the monotonic clock of /health.
    metrics.uptime_ms();
    for w in &config.warnings {
        warn!("{w}");
    }
    // An unset password_env stops the start before anything listens.
    let started_ms = metrics
        .started_ms
        .load(std::sync::atomic::Ordering::Relaxed);
    let uplinks = uplink_settings(&config, started_ms)?;
    // The queue first: if the database is unusable there is no point
    // accepting sensor data.
    let (queue, queue_thread) = queue::open(&file.queue.path, file.into(), metrics.clone())?;
    // Bound before anything listens, so a port in use fails the start.
    let metrics_listener = match file.metrics.enabled {
        true => Some(ops::http::bind(file.metrics.listen).await?),
        false => None,
    };
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    let listeners = frontdoor::bind(&file.broker, config.resolved.server_tls.clone()).await?;
    let (listen, listen_v5, tls_listen) =
        (listeners.listen, listeners.listen_v5, listeners.tls_listen);
    let broker = broker::start(&file.broker).await?;
    let internal = broker.internal.clone();

    let mut stages = supervisor::Supervisor::new();
    let shutdown = stages.shutdown();
    let link = (broker.link_tx, broker.link_rx);
    let door = Arc::new(front_door(&config, &internal, &metrics)?);
    let (reload_tx, republish_thread, downlink) = spawn_pipeline(
        &mut stages,
        &config,
        listeners,
        door,
        link,
        &queue,
        &metrics,
    )?;
    let shared = uplink::Shared {
        metrics: metrics.clone(),
        router: uplinks
            .iter()
            .any(|u| !u.subscriptions.is_empty())
            .then_some(downlink),
        reload: reload_tx.clone(),
    };
    for settings in uplinks {
        let uplink = uplink::run(settings, queue.clone(), shared.clone(), shutdown.clone());
        stages.spawn("uplink", uplink);
    }
    drop(shared);
    let listening = ops::health::Listening {
        front: [Some(listen), listen_v5].into_iter().flatten().collect(),
        internal,
    };
    spawn_ops(
        &mut stages,
        &config,
        metrics_listener,
        queue,
        listening,
        &metrics,
    );
    info!(
        rules = config.rules.len(),
        upstreams = file.upstream.len(),
        queue = %file.queue.path.display(),
        "edgeferry started"
    );
    ops::systemd::ready(&ops::health::status_line(&metrics, None));

    let shutdown_tx = stages.shutdown_sender();
    let supervisor = tokio::spawn(stages.wait(
        broker.exited,
        republish_thread,
        queue_thread,
        metrics.clone(),
    ));
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

/// The local side: the front door, the republisher (a thread on the
/// embedded broker's link), the router and the rule reloader. Returns the
/// reload trigger and the republisher's thread.
fn spawn_pipeline(
    stages: &mut supervisor::Supervisor,
    config: &Config,
    listeners: frontdoor::Listeners,
    door: Arc<frontdoor::Door>,
    (link_tx, link_rx): (rumqttd::local::LinkTx, rumqttd::local::LinkRx),
    queue: &queue::QueueHandle,
    metrics: &Arc<Metrics>,
) -> Result<Pipeline, RunError> {
    let file = &config.file;
    let shutdown = stages.shutdown();
    let (events_tx, events_rx) = mpsc::channel(file.pipeline.buffer);
    let downlink = events_tx.clone();
    let front = frontdoor::run(
        listeners,
        door.clone(),
        events_tx,
        file.broker.max_connections,
        shutdown.clone(),
    );
    stages.spawn("front door", front);
    let (republisher, republish_thread) =
        republish::spawn(link_tx, link_rx, door.broker.clone(), metrics.clone()).map_err(
            |source| RunError::Thread {
                what: "republish",
                source,
            },
        )?;
    let (rules_tx, rules_rx) = watch::channel(Arc::new(config.rules.clone()));
    let router = router::run(
        events_rx,
        rules_rx,
        queue.clone(),
        republisher,
        door.ingest.clone(),
        metrics.clone(),
    );
    stages.spawn_fallible("router", router);
    let (reload_tx, reload_rx) = mpsc::channel(1);
    let reloader = reload::run(
        config.clone(),
        rules_tx,
        reload_rx,
        metrics.clone(),
        shutdown,
    );
    stages.spawn("reload", reloader);
    Ok((reload_tx, republish_thread, downlink))
}

/// What `spawn_pipeline` hands back: the reload trigger, the republisher's
/// thread, and the router's input for what comes down the uplinks.
type Pipeline = (
    mpsc::Sender<reload::Request>,
    std::thread::JoinHandle<()>,
    mpsc::Sender<router::Inbound>,
);

/// Each upstream's settings, from the files read when the config was loaded.
fn uplink_settings(
    config: &Config,
    started_ms: u64,
) -> Result<Vec<uplink::UplinkSettings>, RunError> {
    let resolved = &config.resolved.upstreams;
    let mut out = Vec::new();
    for (name, up) in &config.file.upstream {
        let files = resolved
            .get(name)
            .ok_or_else(|| RunError::NotResolved(format!("upstream.{name}")))?;
        let gateway = config.file.gateway_id();
        let settings = uplink::UplinkSettings::new(
            name,
            config.client_id(name),
            up,
            files,
            &gateway,
            started_ms,
        )
        .map_err(|source| RunError::Upstream {
            name: name.clone(),
            source,
        })?;
        out.push(settings);
    }
    Ok(out)
}

/// The front door's logins and ACL, from the files read when the config
/// was loaded (re-read when they change).
fn front_door(
    config: &Config,
    internal: &broker::Internal,
    metrics: &Arc<Metrics>,
) -> Result<frontdoor::Door, RunError> {
    use frontdoor::auth::{AclFile, LocalAuth};
    let b = &config.file.broker;
    let resolved = &config.resolved;
    let missing = |what: &str| RunError::NotResolved(format!("broker.{what}"));
    let auth = match (&b.password_file, &resolved.passwords) {
        (None, _) => None,
        (Some(path), Some(users)) => Some(Arc::new(LocalAuth::new(
            path.clone(),
            users.clone(),
            metrics.clone(),
        ))),
        (Some(_), None) => return Err(missing("password_file")),
    };
    let acl = match (&b.acl_file, &resolved.acl) {
        (None, _) => None,
        (Some(path), Some(acl)) => Some(Arc::new(AclFile::new(path.clone(), acl.clone()))),
        (Some(_), None) => return Err(missing("acl_file")),
    };
    Ok(frontdoor::Door::new(
        b,
        internal.clone(),
        auth,
        acl,
        metrics.clone(),
    ))
}

/// The operations stages: metrics endpoint, summary, heap trim, health.
/// The health stage holds the last queue handle: when every stage has
/// ended, the writer commits and exits.
fn spawn_ops(
    stages: &mut supervisor::Supervisor,
    config: &Config,
    metrics_listener: Option<tokio::net::TcpListener>,
    queue: queue::QueueHandle,
    listening: ops::health::Listening,
    metrics: &Arc<Metrics>,
) {
    let shutdown = stages.shutdown();
    if let Some(listener) = metrics_listener {
        let server = ops::http::serve(listener, metrics.clone(), queue.clone(), shutdown.clone());
        stages.spawn("metrics", server);
    }
    let interval = config.file.log.summary_interval.0;
    let summary = ops::health::summarize(metrics.clone(), interval, shutdown.clone());
    stages.spawn("summary", summary);
    stages.spawn("memory", ops::memory::trim_periodically(shutdown.clone()));
    let health = ops::health::run(queue, listening, metrics.clone(), shutdown);
    stages.spawn("health", health);
}
