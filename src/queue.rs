//! The store-and-forward queue: SQLite (WAL) owned by one writer thread.
//!
//! Every event bound upstream is a row until that upstream acknowledged it.
//! Appends and acks are applied in group commits: at most one commit per
//! `commit_interval` (so an SD card sees a bounded number of syncs per second),
//! or sooner once `commit_max_events` rows wait. Uplinks read only committed
//! rows, so nothing is sent that a power cut could still take back.
//! All SQLite work happens on this thread; async callers talk to it over a
//! bounded channel, which is also the pipeline's backpressure.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{Notify, oneshot};
use tracing::{error, info};

use crate::metrics::Metrics;

/// Schema version in `PRAGMA user_version`; migrations go in `migrate`.
const SCHEMA_VERSION: i64 = 1;

const CREATE_V1: &str = "
CREATE TABLE IF NOT EXISTS queue (
    id          INTEGER PRIMARY KEY AUTOINCREMENT, -- send order; never reused
    upstream    TEXT    NOT NULL,
    event_id    TEXT    NOT NULL,                  -- stable id for upstream dedupe
    topic       TEXT    NOT NULL,
    qos         INTEGER NOT NULL,
    priority    INTEGER NOT NULL DEFAULT 0,
    received_ms INTEGER NOT NULL,
    payload     BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_by_upstream ON queue (upstream, id);
";
const INSERT_ROW: &str = "INSERT INTO queue (upstream, event_id, topic, qos, received_ms, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
const DELETE_ROW: &str = "DELETE FROM queue WHERE id = ?1";
const SELECT_AFTER: &str = "SELECT id, event_id, topic, qos, received_ms, payload FROM queue \
     WHERE upstream = ?1 AND id > ?2 ORDER BY id LIMIT ?3";
const DEPTH: &str = "SELECT upstream, COUNT(*) FROM queue GROUP BY upstream";

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The database cannot be opened or prepared: check the path and its
    /// permissions; nothing has been lost.
    #[error("queue database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// A file operation around the database failed (creating its
    /// directory, moving a damaged file aside, starting the writer thread):
    /// check the directory's permissions and free space.
    #[error("queue database {path}: cannot {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error(
        "queue database {path} has schema version {found}, newer than this edgeferry ({SCHEMA_VERSION}); upgrade edgeferry or move the file aside"
    )]
    TooNew { path: PathBuf, found: i64 },
    /// The writer thread is gone (daemon shutting down); the caller stops.
    #[error("queue writer has stopped")]
    Closed,
    /// A read failed; the caller retries later.
    #[error("queue read failed: {0}")]
    Read(String),
}

/// A row to append.
#[derive(Debug, Clone)]
pub struct NewRow {
    pub upstream: Arc<str>,
    pub event_id: String,
    pub topic: String,
    pub qos: u8,
    pub received_ms: u64,
    pub payload: Bytes,
}

/// A committed row, as read for sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub id: i64,
    pub event_id: String,
    pub topic: String,
    pub qos: u8,
    pub received_ms: u64,
    pub payload: Vec<u8>,
}

enum Cmd {
    Append(Vec<NewRow>),
    Ack(Vec<i64>),
    Fetch {
        upstream: String,
        after: i64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<Row>, QueueError>>,
    },
    Depth {
        reply: oneshot::Sender<BTreeMap<String, u64>>,
    },
}

/// Cheap to clone; every clone keeps the writer alive. The writer commits
/// what it holds and exits when the last one is dropped.
#[derive(Clone)]
pub struct QueueHandle {
    tx: flume::Sender<Cmd>,
    notify: Arc<HashMap<String, Arc<Notify>>>,
}

/// Group-commit settings.
#[derive(Debug, Clone, Copy)]
pub struct CommitPolicy {
    pub interval: Duration,
    pub max_events: usize,
}

impl QueueHandle {
    /// Append rows; they become visible to uplinks at the next commit.
    pub async fn append(&self, rows: Vec<NewRow>) -> Result<(), QueueError> {
        self.tx
            .send_async(Cmd::Append(rows))
            .await
            .map_err(|_| QueueError::Closed)
    }

    /// Mark rows acknowledged; they are deleted at the next commit.
    pub async fn ack(&self, ids: Vec<i64>) -> Result<(), QueueError> {
        self.tx
            .send_async(Cmd::Ack(ids))
            .await
            .map_err(|_| QueueError::Closed)
    }

    /// Up to `limit` committed, unacknowledged rows of `upstream` with id > `after`, in order.
    pub async fn fetch(
        &self,
        upstream: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Row>, QueueError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Cmd::Fetch {
                upstream: upstream.to_string(),
                after,
                limit,
                reply,
            })
            .await
            .map_err(|_| QueueError::Closed)?;
        rx.await.map_err(|_| QueueError::Closed)?
    }

    /// Rows waiting per upstream (committed, not yet deleted).
    pub async fn depth(&self) -> Result<BTreeMap<String, u64>, QueueError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Cmd::Depth { reply })
            .await
            .map_err(|_| QueueError::Closed)?;
        rx.await.map_err(|_| QueueError::Closed)
    }

    /// Signalled after each commit that added rows for `upstream`.
    pub fn notified(&self, upstream: &str) -> Arc<Notify> {
        self.notify.get(upstream).cloned().unwrap_or_default()
    }
}

/// Open (creating or migrating) the database at `path` and start the writer
/// thread. Returns the handle and the thread, which ends after the last
/// handle is dropped and the final commit is done.
pub fn open(
    path: &Path,
    policy: CommitPolicy,
    upstreams: &[String],
    metrics: Arc<Metrics>,
) -> Result<(QueueHandle, std::thread::JoinHandle<()>), QueueError> {
    let conn = open_or_recover(path, &metrics)?;
    let depth: i64 = conn
        .query_row("SELECT COUNT(*) FROM queue", [], |r| r.get(0))
        .unwrap_or(0);
    info!(path = %path.display(), queued = depth, "queue opened");
    // Room for a few batches: the router blocks (backpressure) beyond that.
    let (tx, rx) = flume::bounded(64);
    let notify: HashMap<String, Arc<Notify>> = upstreams
        .iter()
        .map(|u| (u.clone(), Arc::default()))
        .collect();
    let notify = Arc::new(notify);
    let writer = Writer {
        conn,
        policy,
        metrics,
        notify: notify.clone(),
        rows: Vec::new(),
        acks: Vec::new(),
    };
    let thread = std::thread::Builder::new()
        .name("queue".into())
        .spawn(move || writer.run(rx))
        .map_err(|source| QueueError::Io {
            path: path.to_path_buf(),
            action: "start the writer thread",
            source,
        })?;
    Ok((QueueHandle { tx, notify }, thread))
}

/// Open the queue; a damaged file (not a database, or failing
/// `PRAGMA quick_check`) is renamed aside with a timestamp and a fresh one is
/// created, so the gateway keeps collecting. Other failures (permissions, a
/// newer schema) are errors: moving those aside would hide good data.
fn open_or_recover(path: &Path, metrics: &Metrics) -> Result<Connection, QueueError> {
    let damage = match open_db(path) {
        Ok(conn) => match quick_check(&conn) {
            Ok(()) => return Ok(conn),
            Err(detail) => detail,
        },
        Err(QueueError::Open { source, .. }) if is_damage(&source) => source.to_string(),
        Err(e) => return Err(e),
    };
    let aside = move_aside(path)?;
    metrics
        .queue_recovered
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    error!(
        path = %path.display(),
        moved_to = %aside.display(),
        %damage,
        "queue database is damaged; moved it aside and started a fresh queue (events in it are not forwarded; keep the file for support)"
    );
    open_db(path)
}

fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

/// `Ok` if SQLite's quick check passes; else what it found.
fn quick_check(conn: &Connection) -> Result<(), String> {
    let mut stmt = conn
        .prepare("PRAGMA quick_check")
        .map_err(|e| e.to_string())?;
    let found: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect())
        .map_err(|e| e.to_string())?;
    if found.len() == 1 && found[0] == "ok" {
        Ok(())
    } else {
        Err(found.join("; "))
    }
}

/// Rename `path` (and its WAL) to `<path>.damaged-<UTC time>`; drop its shared-memory file.
fn move_aside(path: &Path) -> Result<PathBuf, QueueError> {
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".damaged-{stamp}"));
    let aside = PathBuf::from(aside);
    let io = |source| QueueError::Io {
        path: path.to_path_buf(),
        action: "move the damaged file aside",
        source,
    };
    std::fs::rename(path, &aside).map_err(io)?;
    for (suffix, keep) in [("-wal", true), ("-shm", false)] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let side = PathBuf::from(side);
        if side.exists() {
            if keep {
                let mut to = aside.as_os_str().to_owned();
                to.push(suffix);
                std::fs::rename(&side, PathBuf::from(to)).map_err(io)?;
            } else {
                std::fs::remove_file(&side).map_err(io)?;
            }
        }
    }
    Ok(aside)
}

/// Open the database with our pragmas and schema. Also used by tests and
/// tools that read the queue file directly.
pub fn open_db(path: &Path) -> Result<Connection, QueueError> {
    let err = |source| QueueError::Open {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| QueueError::Io {
            path: path.to_path_buf(),
            action: "create its directory",
            source,
        })?;
    }
    let conn = Connection::open(path).map_err(err)?;
    // WAL: readers never block the writer; synchronous=FULL syncs the WAL at
    // every commit, so a committed row survives a power cut. Group commit
    // keeps those syncs to at most one per commit_interval.
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(err)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(err)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
    migrate(&conn, path)?;
    Ok(conn)
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), QueueError> {
    let err = |source| QueueError::Open {
        path: path.to_path_buf(),
        source,
    };
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(err)?;
    if version > SCHEMA_VERSION {
        return Err(QueueError::TooNew {
            path: path.to_path_buf(),
            found: version,
        });
    }
    if version < 1 {
        conn.execute_batch(CREATE_V1).map_err(err)?;
    }
    // Later versions: `if version < 2 { ... }`, each in order.
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(err)?;
    Ok(())
}

struct Writer {
    conn: Connection,
    policy: CommitPolicy,
    metrics: Arc<Metrics>,
    notify: Arc<HashMap<String, Arc<Notify>>>,
    /// Appended, not yet committed.
    rows: Vec<NewRow>,
    /// Acknowledged, not yet deleted.
    acks: Vec<i64>,
}

impl Writer {
    fn run(mut self, rx: flume::Receiver<Cmd>) {
        let mut last_commit = Instant::now() - self.policy.interval;
        // Set while commits fail (disk full, I/O error): when to try again.
        let mut retry_at: Option<Instant> = None;
        let mut last_warning: Option<Instant> = None;
        // While commits fail, at most this many rows wait in memory; more
        // are dropped and counted. Fetches and acks are still served, so the
        // uplinks keep draining and shutdown never hangs on a full disk.
        let cap = self.policy.max_events.max(1000) * 4;
        loop {
            let pending = !self.rows.is_empty() || !self.acks.is_empty();
            let due = retry_at.unwrap_or(last_commit + self.policy.interval);
            let now = Instant::now();
            let commit_now = pending
                && (now >= due
                    || (retry_at.is_none() && self.rows.len() >= self.policy.max_events));
            let cmd = if commit_now {
                None
            } else if !pending {
                match rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => break,
                }
            } else {
                match rx.recv_deadline(due) {
                    Ok(c) => Some(c),
                    Err(flume::RecvTimeoutError::Timeout) => None,
                    Err(flume::RecvTimeoutError::Disconnected) => break,
                }
            };
            match cmd {
                Some(Cmd::Append(rows)) => {
                    if self.rows.len() >= cap {
                        self.metrics
                            .dropped_queue_unavailable
                            .fetch_add(rows.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    } else {
                        // A quiet queue commits at once; a busy one at most once per interval.
                        self.rows.extend(rows);
                    }
                    continue;
                }
                Some(Cmd::Ack(ids)) => {
                    self.acks.extend(ids);
                    continue;
                }
                Some(Cmd::Fetch {
                    upstream,
                    after,
                    limit,
                    reply,
                }) => {
                    let _ = reply.send(self.fetch(&upstream, after, limit));
                    continue;
                }
                Some(Cmd::Depth { reply }) => {
                    let _ = reply.send(self.depth());
                    continue;
                }
                None => {}
            }
            match self.commit() {
                Ok(()) => {
                    if retry_at.take().is_some() {
                        info!("queue commits work again");
                    }
                    last_commit = Instant::now();
                }
                Err(e) => {
                    // Keep what we hold and retry; warn at most every 30 s.
                    if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                        error!(error = %e, pending = self.rows.len(), "queue commit failed (disk full or I/O error?); holding events in memory and retrying");
                        last_warning = Some(Instant::now());
                    }
                    retry_at =
                        Some(Instant::now() + self.policy.interval.max(Duration::from_millis(500)));
                }
            }
        }
        // Every handle is gone: final commit, retried a few times.
        for _ in 0..5 {
            if self.rows.is_empty() && self.acks.is_empty() || self.commit().is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if !self.rows.is_empty() {
            error!(
                lost = self.rows.len(),
                "queue: final commit failed; these events were not stored"
            );
        }
        info!("queue closed");
    }

    /// Apply pending appends and acks in one transaction. On failure nothing
    /// is lost: the work stays pending.
    fn commit(&mut self) -> rusqlite::Result<()> {
        let result = (|| -> rusqlite::Result<()> {
            let tx = self.conn.transaction()?;
            {
                let mut insert = tx.prepare_cached(INSERT_ROW)?;
                for r in &self.rows {
                    insert.execute(params![
                        &*r.upstream,
                        r.event_id,
                        r.topic,
                        r.qos,
                        r.received_ms as i64,
                        &r.payload[..]
                    ])?;
                }
                let mut delete = tx.prepare_cached(DELETE_ROW)?;
                for id in &self.acks {
                    delete.execute([id])?;
                }
            }
            tx.commit()
        })();
        result?;
        use std::sync::atomic::Ordering::Relaxed;
        self.metrics.commits.fetch_add(1, Relaxed);
        self.metrics
            .queued
            .fetch_add(self.rows.len() as u64, Relaxed);
        let mut woke: HashSet<&str> = HashSet::new();
        for r in &self.rows {
            if woke.insert(&r.upstream)
                && let Some(n) = self.notify.get(&*r.upstream)
            {
                n.notify_one();
            }
        }
        self.rows.clear();
        self.acks.clear();
        Ok(())
    }

    fn fetch(&mut self, upstream: &str, after: i64, limit: usize) -> Result<Vec<Row>, QueueError> {
        // Acked rows are deleted at the next commit; until then hide them.
        // Only those above `after` can be in range (all of them after a reconnect).
        let acked: HashSet<i64> = self.acks.iter().copied().filter(|&id| id > after).collect();
        let mut stmt = self
            .conn
            .prepare_cached(SELECT_AFTER)
            .map_err(|e| QueueError::Read(e.to_string()))?;
        let rows = stmt
            .query_map(
                params![upstream, after, (limit + acked.len()) as i64],
                |r| {
                    Ok(Row {
                        id: r.get(0)?,
                        event_id: r.get(1)?,
                        topic: r.get(2)?,
                        qos: r.get(3)?,
                        received_ms: r.get::<_, i64>(4)? as u64,
                        payload: r.get(5)?,
                    })
                },
            )
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| QueueError::Read(e.to_string()))?;
        Ok(rows
            .into_iter()
            .filter(|r| !acked.contains(&r.id))
            .take(limit)
            .collect())
    }

    fn depth(&mut self) -> BTreeMap<String, u64> {
        let mut out: BTreeMap<String, u64> = self.notify.keys().map(|k| (k.clone(), 0)).collect();
        let Ok(mut stmt) = self.conn.prepare_cached(DEPTH) else {
            return out;
        };
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)));
        if let Ok(rows) = rows {
            for (u, n) in rows.flatten() {
                out.insert(u, n as u64);
            }
        }
        out
    }
}

/// Rows per upstream in the database file at `path`, read directly (for
/// `status` when the daemon is down, and for tests).
pub fn depth_of_file(path: &Path) -> Result<BTreeMap<String, u64>, QueueError> {
    let err = |source| QueueError::Open {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(err)?;
    let has_table: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE name = 'queue'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(err)?;
    if has_table.is_none() {
        return Ok(BTreeMap::new());
    }
    let mut stmt = conn.prepare(DEPTH).map_err(err)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })
        .map_err(err)?;
    rows.collect::<Result<_, _>>().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(up: &str, n: u8) -> NewRow {
        NewRow {
            upstream: Arc::from(up),
            event_id: format!("e{n}"),
            topic: format!("t/{n}"),
            qos: 1,
            received_ms: 0,
            payload: Bytes::from(vec![n]),
        }
    }

    #[tokio::test]
    async fn rows_are_read_in_order_deleted_on_ack_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let policy = CommitPolicy {
            interval: Duration::from_millis(10),
            max_events: 100,
        };
        let ups = vec!["a".to_string(), "b".to_string()];
        let (q, thread) = open(&path, policy, &ups, Arc::default()).unwrap();
        q.append((0..5).map(|n| row("a", n)).chain([row("b", 9)]).collect())
            .await
            .unwrap();
        let waited =
            tokio::time::timeout(Duration::from_secs(30), q.notified("a").notified()).await;
        assert!(waited.is_ok(), "commit never signalled");
        let rows = q.fetch("a", 0, 10).await.unwrap();
        assert_eq!(
            rows.iter().map(|r| r.payload[0]).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        q.ack(vec![rows[0].id, rows[1].id]).await.unwrap();
        // Acked rows are hidden at once, before their delete is committed.
        let after = q.fetch("a", 0, 10).await.unwrap();
        assert_eq!(after.len(), 3);
        assert_eq!(q.fetch("a", rows[3].id, 10).await.unwrap().len(), 1);
        drop(q);
        thread.join().unwrap();

        assert_eq!(
            depth_of_file(&path).unwrap(),
            BTreeMap::from([("a".into(), 3), ("b".into(), 1)])
        );
        let (q, _t) = open(&path, policy, &ups, Arc::default()).unwrap();
        let rows = q.fetch("a", 0, 10).await.unwrap();
        assert_eq!(
            rows.iter().map(|r| r.payload[0]).collect::<Vec<_>>(),
            [2, 3, 4]
        );
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        assert!(matches!(
            open_db(&path),
            Err(QueueError::TooNew { found: 99, .. })
        ));
    }
}
