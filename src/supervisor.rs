//! The stages of a running daemon, and how they stop.
//!
//! Every stage is a named task. One that ends before shutdown was asked
//! for (an error, a panic, or simply returning) is fatal: the supervisor
//! asks every other stage to stop and the process exits non-zero, so
//! systemd restarts it instead of running on half-dead. The stop order
//! follows ownership (see `wait`).

use std::future::Future;
use std::thread::JoinHandle;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tracing::{error, info};

use crate::metrics::Metrics;
use crate::queue::QueueError;

/// Why a stage ended before it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum StageEnd {
    /// Its queue went away or failed: see the queue's error.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// It returned without an error: a bug.
    #[error("ended early")]
    EndedEarly,
    #[error("panicked: {0}")]
    Panicked(String),
}

/// A stage's outcome: its name and how it ended.
type Outcome = (&'static str, Result<(), StageEnd>);

/// The stages, and the shutdown signal they all watch.
pub struct Supervisor {
    stages: JoinSet<Outcome>,
    shutdown: watch::Sender<bool>,
}

impl Supervisor {
    pub fn new() -> Supervisor {
        Supervisor {
            stages: JoinSet::new(),
            shutdown: watch::channel(false).0,
        }
    }

    /// What a stage watches to know it should stop.
    pub fn shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// The sender, for the daemon's handle (`Running::shutdown`).
    pub fn shutdown_sender(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }

    /// Run a stage that only ends when asked to.
    pub fn spawn(&mut self, name: &'static str, stage: impl Future<Output = ()> + Send + 'static) {
        self.stages.spawn(async move {
            stage.await;
            (name, Ok(()))
        });
    }

    /// Run a stage that may fail.
    pub fn spawn_fallible<E>(
        &mut self,
        name: &'static str,
        stage: impl Future<Output = Result<(), E>> + Send + 'static,
    ) where
        E: Into<StageEnd>,
    {
        self.stages
            .spawn(async move { (name, stage.await.map_err(Into::into)) });
    }

    /// Watch the stages until one ends early, `broker_exited` fires, or a
    /// shutdown is asked for; then stop every stage and join the threads
    /// (`threads`, in order: the republisher, then the queue writer, whose
    /// join gives the events it could not store). Returns the first
    /// failure, or how many events were lost at the final commit.
    pub async fn wait(
        mut self,
        mut broker_exited: oneshot::Receiver<()>,
        republish_thread: JoinHandle<()>,
        queue_thread: JoinHandle<u64>,
        metrics: std::sync::Arc<Metrics>,
    ) -> Result<(), crate::RunError> {
        let mut failure = None;
        let mut stopping = self.shutdown.subscribe();
        tokio::select! {
            Some(done) = self.stages.join_next() => {
                // Stages end by themselves once shutdown was asked for.
                if !*self.shutdown.borrow() {
                    failure = Some(failed(done));
                }
            }
            _ = &mut broker_exited => failure = Some(crate::RunError::BrokerStopped),
            _ = stopping.wait_for(|s| *s) => {}
        }
        if let Some(e) = &failure {
            error!(error = %e, "stopping");
        }
        crate::ops::systemd::stopping();
        let _ = self.shutdown.send(true);
        // Stop order follows ownership: the front door's sessions hand what
        // they read to the pipeline and drop their senders, uplinks close
        // (dropping theirs: the router's input ends with the last sender,
        // front door and uplinks alike), the router drains into the queue
        // and drops its handle; the queue thread commits once the last
        // handle is gone.
        while let Some(done) = self.stages.join_next().await {
            match done {
                Ok((stage, Err(e))) => error!(stage, error = %e, "stage failed while stopping"),
                Err(e) => error!(error = %e, "stage panicked while stopping"),
                Ok(_) => {}
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
        info!(summary = %metrics.summary(), "edgeferry stopped");
        if lost > 0 && failure.is_none() {
            failure = Some(crate::RunError::NotStored { lost });
        }
        failure.map_or(Ok(()), Err)
    }
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

/// What it means that a stage ended before shutdown was asked for.
fn failed(done: Result<Outcome, tokio::task::JoinError>) -> crate::RunError {
    let (stage, end) = match done {
        Ok((stage, Err(end))) => (stage, end),
        Ok((stage, Ok(()))) => (stage, StageEnd::EndedEarly),
        Err(e) => ("a stage", StageEnd::Panicked(e.to_string())),
    };
    crate::RunError::StageFailed { stage, end }
}
