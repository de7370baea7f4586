//! Rule reload: on request (SIGHUP, `Running::reload`) and, when
//! `rules.watch` is on, on a change to a `*.toml` (or `*.json` schema) file in the rules
//! directory (inotify via `notify`, debounced so an editor's save burst
//! gives one reload).
//!
//! The new set is compiled on a blocking thread, off the hot path, and
//! handed to the router in one step through a watch channel; the router
//! keeps the shaping state of unchanged rules. An invalid edit keeps the old
//! rules running: every error is logged and the reload counted as failed.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::metrics::Metrics;
use crate::rules::{Changes, RuleSet};
use crate::setup::Config;

/// Rule names a reload logs per list (added, removed, changed); the rest are counted.
const LOGGED_NAMES: usize = 20;

/// Quiet time after the last file change before reloading.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// Why a reload was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    FileChange,
    /// A command on an upstream's control topic.
    Remote,
}

/// What the reloader is asked to do.
#[derive(Debug)]
pub enum Request {
    /// Reload from `rules.dir` (SIGHUP).
    Reload(Trigger),
    /// From the control topic: reload or install rules, and say how it went.
    Remote {
        rules: RemoteRules,
        reply: oneshot::Sender<Applied>,
    },
}

/// Which rules a remote request asks for.
#[derive(Debug)]
pub enum RemoteRules {
    /// `rules.dir` as it is (the `reload` command).
    Disk,
    /// A new file set (the `rules` command).
    Files(Vec<(String, String)>),
    /// The set the last `rules` command replaced (`rollback`).
    Previous,
}

/// How a remote request went: the set now running, or why not (and the
/// previous set keeps running).
#[derive(Debug, Clone)]
pub struct Applied {
    pub result: Result<Changes, Vec<String>>,
    /// Rules and digest of the set running afterwards.
    pub rules: usize,
    pub digest: String,
}

/// In a log line: `SIGHUP`, `file change`.
impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Trigger::Signal => "SIGHUP",
            Trigger::FileChange => "file change",
            Trigger::Remote => "control topic",
        })
    }
}

/// Run until shutdown: reload the rules whenever `requests` or the file
/// watcher asks, publishing each good set on `rules`.
pub async fn run(
    config: Config,
    rules: watch::Sender<Arc<RuleSet>>,
    mut requests: mpsc::Receiver<Request>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (file_tx, mut file_rx) = mpsc::channel::<()>(1);
    // Kept alive for as long as this stage runs.
    let _watcher = if config.file.rules.watch {
        watch_dir(&config, file_tx)
    } else {
        None
    };
    loop {
        let request = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            r = requests.recv() => match r {
                Some(r) => r,
                None => return,
            },
            Some(()) = file_rx.recv() => Request::Reload(Trigger::FileChange),
        };
        let (trigger, wanted, reply) = match request {
            Request::Reload(t) => (t, RemoteRules::Disk, None),
            Request::Remote { rules, reply } => (Trigger::Remote, rules, Some(reply)),
        };
        if trigger == Trigger::FileChange {
            // Wait for the burst of changes to settle.
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, file_rx.recv()).await {}
        }
        let cfg = config.clone();
        let loaded = tokio::task::spawn_blocking(move || match wanted {
            RemoteRules::Disk => cfg
                .reload_rules()
                .map_err(|d| d.0.iter().map(|d| d.to_string()).collect()),
            RemoteRules::Files(files) => crate::remote::install(&cfg, &files).map_err(|r| r.0),
            RemoteRules::Previous => crate::remote::previous(&cfg)
                .and_then(|files| crate::remote::install(&cfg, &files))
                .map_err(|r| r.0),
        })
        .await;
        metrics
            .last_reload_ok
            .store(matches!(loaded, Ok(Ok(_))), Relaxed);
        metrics
            .last_reload_ms
            .store(crate::event::now_ms(), Relaxed);
        let current = rules.borrow().clone();
        let result = match loaded {
            Ok(Ok(new)) => {
                let changes = new.changes_from(&current);
                if changes.is_empty() && new.digest() != current.digest() {
                    // The rules are the same; a schema file, a test or a
                    // comment is not.
                    info!(%trigger, rules = new.len(), digest = %new.digest(), "rules reloaded: the rules are unchanged, their files (schemas, tests, comments) are not");
                } else if changes.is_empty() {
                    info!(%trigger, rules = new.len(), "rules reloaded: no change");
                } else {
                    info!(
                        %trigger,
                        rules = new.len(),
                        added = %Changes::summary(&changes.added, LOGGED_NAMES),
                        removed = %Changes::summary(&changes.removed, LOGGED_NAMES),
                        changed = %Changes::summary(&changes.changed, LOGGED_NAMES),
                        "rules reloaded"
                    );
                    // Even an unchanged set is handed over: the unmatched
                    // destination or a test case may differ.
                }
                rules.send_replace(Arc::new(new));
                // Counted once the router can see the new set.
                metrics.reloads_ok.fetch_add(1, Relaxed);
                Ok(changes)
            }
            Ok(Err(errors)) => {
                metrics.reloads_failed.fetch_add(1, Relaxed);
                for e in &errors {
                    error!("{e}");
                }
                error!(
                    %trigger,
                    errors = errors.len(),
                    rules = current.len(),
                    "rules NOT reloaded: the new rules have errors; the previous rules keep running"
                );
                Err(errors)
            }
            Err(e) => {
                metrics.reloads_failed.fetch_add(1, Relaxed);
                error!(error = %e, "rule reload failed");
                Err(vec![format!("rule reload failed: {e}")])
            }
        };
        if let Some(reply) = reply {
            let running = rules.borrow().clone();
            let _ = reply.send(Applied {
                result,
                rules: running.len(),
                digest: running.digest(),
            });
        }
    }
}

/// Watch the rules directory; each relevant change sends on `tx` (a full
/// channel means a reload is already pending, which is enough).
fn watch_dir(config: &Config, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let dir = config.file.rules.dir.clone();
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let relevant = matches!(
            event.kind,
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
        ) && event
            .paths
            .iter()
            .any(|p| p.extension().is_some_and(|x| x == "toml" || x == "json"));
        if relevant {
            let _ = tx.try_send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot watch the rules directory; reload with SIGHUP");
            return None;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        warn!(dir = %dir.display(), error = %e, "cannot watch the rules directory; reload with SIGHUP");
        return None;
    }
    info!(dir = %dir.display(), "watching rule files for changes");
    Some(watcher)
}
