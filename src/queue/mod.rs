//! The store-and-forward queue: SQLite (WAL) owned by one writer thread.
//!
//! Every event bound upstream is a row until that upstream acknowledged it,
//! it expired, or a full queue evicted it. Appends, acks and evictions are
//! applied in group commits: at most one commit per `commit_interval` (so an
//! SD card sees a bounded number of syncs per second), or sooner once the
//! rows held in RAM pass `memory_max`. One durability model: every row is
//! readable from RAM as soon as it is appended, and is written only if it
//! must wait: its upstream is not connected, it was not acknowledged
//! within `spill_after` (by default `commit_interval`), or RAM is full.
//! A row its upstream acknowledged first never touches the disk. All SQLite work happens on the writer thread; async callers
//! talk to it over a bounded channel, which is also the pipeline's
//! backpressure.

mod lock;
mod policy;
mod schema;
pub mod segments;
pub mod space;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tracing::info;

use crate::metrics::Metrics;
pub use policy::{Durability, Overflow, Priority};
pub use schema::{SCHEMA_VERSION, event_id_from, open_db};

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
    /// Written by a newer edgeferry: refuse rather than misread it.
    #[error(
        "queue database {path} has schema version {found}, newer than this edgeferry ({SCHEMA_VERSION}); upgrade edgeferry or move the file aside"
    )]
    TooNew { path: PathBuf, found: i64 },
    /// Another edgeferry holds this queue: stop it, or give this one its
    /// own `queue.path`. Nothing was opened or changed.
    #[error("queue {} is in use by {}; one daemon per queue file (stop that one, or set another queue.path)", path.display(), match pid { Some(pid) => format!("pid {pid}"), None => "another process".to_string() })]
    InUse { path: PathBuf, pid: Option<u32> },
    /// The writer thread is gone (daemon shutting down); the caller stops.
    #[error("queue writer has stopped")]
    Closed,
    /// A read failed; the caller retries later.
    #[error("queue read failed: {0}")]
    Read(String),
}

/// MQTT 5 properties a row is sent with (a CloudEvent's attributes, its
/// content type): stored with the row, so they survive a restart; an
/// MQTT 3.1.1 upstream has no place for them (rules refuse that pairing).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Properties {
    #[serde(rename = "ct", default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(rename = "up", default, skip_serializing_if = "Vec::is_empty")]
    pub user: Vec<(String, String)>,
}

impl Properties {
    /// As stored in the `props` column.
    pub fn to_sql(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// From the `props` column; a value this version cannot read is an
    /// error (the row is read, sent without them, and the WARN says so).
    pub fn from_sql(raw: &[u8]) -> Result<Properties, String> {
        serde_json::from_slice(raw).map_err(|e| format!("unreadable row properties: {e}"))
    }

    /// Bytes counted against `max_size`.
    pub fn size(&self) -> usize {
        self.content_type.as_ref().map_or(0, String::len)
            + self
                .user
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// A row to append, with the policy of the route that produced it.
#[derive(Debug, Clone)]
pub struct NewRow {
    pub upstream: Arc<str>,
    pub event_id: String,
    pub topic: String,
    pub qos: u8,
    pub priority: Priority,
    /// Not sent after this time (ms since the Unix epoch); removed by the sweep.
    pub expires_ms: Option<u64>,
    pub overflow: Overflow,
    pub received_ms: u64,
    pub payload: Bytes,
    /// Sent with it over MQTT 5.
    pub properties: Option<Arc<Properties>>,
    /// The front door waits on this to acknowledge the sensor: settled when
    /// the row is committed, acknowledged from RAM, or disposed of by a
    /// policy (overflow, TTL); dropped unsettled if the row is lost.
    pub receipt: Option<crate::receipt::Receipt>,
    /// Its event is being traced (`edgeferry tail`): the writer says which
    /// row id it got, and when it is acknowledged.
    pub traced: bool,
}

impl NewRow {
    /// The row is safe or was disposed of by policy: tell the front door.
    pub fn settle(&mut self) {
        if let Some(r) = self.receipt.take() {
            r.settle();
        }
    }

    /// A row for the queue's tests: upstream `upstream`, event `e<n>`,
    /// topic `t`, one payload byte `n` (2 bytes against `max_size`).
    #[cfg(test)]
    pub(crate) fn for_test(upstream: &str, n: u8) -> NewRow {
        NewRow {
            upstream: upstream.into(),
            event_id: format!("e{n}"),
            topic: "t".into(),
            qos: 1,
            priority: Priority::Normal,
            expires_ms: None,
            overflow: Overflow::DropOldest,
            received_ms: 0,
            payload: Bytes::from(vec![n]),
            properties: None,
            receipt: None,
            traced: false,
        }
    }

    /// Bytes counted against the upstream's `max_size`: payload, topic
    /// and properties.
    pub fn size(&self) -> u64 {
        let props = self.properties.as_ref().map_or(0, |p| p.size());
        (self.payload.len() + self.topic.len() + props) as u64
    }
}

/// A queued row (written or held in RAM), as read for sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub id: i64,
    pub event_id: String,
    pub topic: String,
    pub qos: u8,
    pub priority: Priority,
    pub received_ms: u64,
    /// Not to be sent after this (ms since the Unix epoch).
    pub expires_ms: Option<u64>,
    /// The bytes the front door read, shared (not copied) while the row is
    /// in RAM; read from SQLite into one buffer otherwise.
    pub payload: Bytes,
    /// MQTT 5 properties to send it with.
    pub properties: Option<Arc<Properties>>,
}

/// Where an uplink is in its queue: the last row id sent, per priority.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor(pub [i64; 3]);

impl Cursor {
    pub fn advance(&mut self, row: &Row) {
        self.0[row.priority.index()] = row.id;
    }
}

enum Cmd {
    Append(Vec<NewRow>),
    Ack(Vec<i64>),
    /// An upstream's uplink is connected (or not): what is held for an
    /// upstream that is not is written at the next commit.
    Online {
        upstream: String,
        online: bool,
    },
    Fetch {
        upstream: String,
        after: Cursor,
        until: i64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<Row>, QueueError>>,
    },
    Wait {
        upstream: String,
        after: Cursor,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<Row>, QueueError>>,
    },
    Depth {
        reply: oneshot::Sender<BTreeMap<String, u64>>,
    },
    Stats {
        reply: oneshot::Sender<Vec<Stats>>,
    },
    Sync {
        reply: oneshot::Sender<Result<(), String>>,
    },
    LastId {
        upstream: String,
        reply: oneshot::Sender<i64>,
    },
}

/// Cheap to clone; every clone keeps the writer alive. The writer commits
/// what it holds and exits when the last one is dropped.
#[derive(Clone)]
pub struct QueueHandle {
    tx: flume::Sender<Cmd>,
}

/// The answer to [`QueueHandle::wait`]: the rows, once there are any.
pub type Waiting = oneshot::Receiver<Result<Vec<Row>, QueueError>>;

/// How the writer commits and bounds the queue.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// At most one commit per interval.
    pub commit_interval: Duration,
    /// Commit sooner once this many rows wait and the oldest is due to be written.
    pub commit_max_events: usize,
    /// Byte cap (payload + topic) per upstream.
    pub max_size: BTreeMap<String, u64>,
    /// Below this much free space on the database's filesystem the queue
    /// stops growing and the overflow policies apply.
    pub min_free_disk: u64,
    /// How often expired rows are deleted (never sent in between).
    pub sweep_interval: Duration,
    /// Bytes (payload + topic) held in RAM before the oldest are written.
    pub memory_max: u64,
    /// A row not acknowledged within this is written to SQLite (0: at the
    /// next commit).
    pub spill_after: Duration,
    /// Bytes written into a segment table before the next one starts
    /// ([`SEGMENT_BYTES`]; smaller in tests, to exercise segments).
    pub segment_bytes: u64,
}

/// A segment table holds this many bytes of rows (or 1/64 of the file's, if
/// more) before the next starts: the unit in which acknowledged rows give
/// their space back.
pub const SEGMENT_BYTES: u64 = 4 << 20;

impl QueueHandle {
    /// Hand a command to the writer.
    async fn send(&self, cmd: Cmd) -> Result<(), QueueError> {
        self.tx
            .send_async(cmd)
            .await
            .map_err(|_| QueueError::Closed)
    }

    /// Hand a command that carries a reply channel, and wait for the reply.
    async fn ask<T>(&self, cmd: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, QueueError> {
        let (reply, rx) = oneshot::channel();
        self.send(cmd(reply)).await?;
        rx.await.map_err(|_| QueueError::Closed)
    }

    /// Append rows; uplinks can read them at once (from RAM).
    pub async fn append(&self, rows: Vec<NewRow>) -> Result<(), QueueError> {
        self.send(Cmd::Append(rows)).await
    }

    /// Tell the queue whether `upstream`'s uplink is connected.
    pub async fn online(&self, upstream: &str, online: bool) -> Result<(), QueueError> {
        let upstream = upstream.to_string();
        self.send(Cmd::Online { upstream, online }).await
    }

    /// Mark rows acknowledged; they are deleted at the next commit.
    pub async fn ack(&self, ids: Vec<i64>) -> Result<(), QueueError> {
        self.send(Cmd::Ack(ids)).await
    }

    /// Up to `limit` unacknowledged, unexpired rows of `upstream`
    /// after `after` and with ids up to `until`: higher priorities first,
    /// FIFO within each.
    pub async fn fetch(
        &self,
        upstream: &str,
        after: Cursor,
        until: i64,
        limit: usize,
    ) -> Result<Vec<Row>, QueueError> {
        let upstream = upstream.to_string();
        self.ask(|reply| Cmd::Fetch {
            upstream,
            after,
            until,
            limit,
            reply,
        })
        .await?
    }

    /// Like `fetch` (with no upper id), but if nothing is readable yet the
    /// writer keeps the request and answers it as soon as rows of
    /// `upstream` are appended. The rows go straight from the writer to the uplink, so a
    /// live event costs no wake-up and round trip in between. One request
    /// waits per upstream; a newer one replaces it, and a dropped receiver
    /// only cancels it (nothing is taken from the queue by answering).
    pub async fn wait(
        &self,
        upstream: &str,
        after: Cursor,
        limit: usize,
    ) -> Result<Waiting, QueueError> {
        let (reply, rx) = oneshot::channel();
        let upstream = upstream.to_string();
        self.send(Cmd::Wait {
            upstream,
            after,
            limit,
            reply,
        })
        .await?;
        Ok(rx)
    }

    /// Per upstream and priority: events, bytes, oldest receive time; from
    /// the writer's memory (no table scan), pending appends included.
    pub async fn stats(&self) -> Result<Vec<Stats>, QueueError> {
        self.ask(|reply| Cmd::Stats { reply }).await
    }

    /// Events waiting per upstream (pending appends included), from the
    /// writer's memory: cheap enough for every health probe.
    pub async fn depth(&self) -> Result<BTreeMap<String, u64>, QueueError> {
        self.ask(|reply| Cmd::Depth { reply }).await
    }

    /// Commit everything received so far now, and report how that went.
    pub async fn sync(&self) -> Result<(), QueueError> {
        self.ask(|reply| Cmd::Sync { reply })
            .await?
            .map_err(QueueError::Read)
    }

    /// The highest row id of `upstream`, written or held (0 if none): rows up to it
    /// are the backlog at this moment.
    pub async fn last_id(&self, upstream: &str) -> Result<i64, QueueError> {
        let upstream = upstream.to_string();
        self.ask(|reply| Cmd::LastId { upstream, reply }).await
    }
}

/// Open (creating, migrating or recovering) the database at `path` and start
/// the writer thread. Returns the handle and the thread, which ends after
/// the last handle is dropped and the final commit is done.
pub fn open(
    path: &Path,
    settings: QueueSettings,
    metrics: Arc<Metrics>,
) -> Result<(QueueHandle, std::thread::JoinHandle<u64>), QueueError> {
    let lock = lock::QueueLock::take(path)?;
    let conn = schema::open_or_recover(path, &metrics)?;
    let writer =
        writer::Writer::new(conn, path, settings, metrics).map_err(|source| QueueError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    info!(path = %path.display(), queued = writer.rows_total(), "queue opened");
    // Room for a few batches: the router blocks (backpressure) beyond that.
    let (tx, rx) = flume::bounded(64);
    let thread = std::thread::Builder::new()
        .name("queue".into())
        .spawn(move || {
            let committed = writer.run(rx);
            // Released only after the final commit.
            drop(lock);
            committed
        })
        .map_err(|source| QueueError::Io {
            path: path.to_path_buf(),
            action: "start the writer thread",
            source,
        })?;
    Ok((QueueHandle { tx }, thread))
}

/// Per upstream and priority: events, bytes, and the oldest receive time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub upstream: String,
    pub priority: Priority,
    pub events: u64,
    pub bytes: u64,
    pub oldest_ms: u64,
}

/// Open the queue file for reading only (safe while the daemon writes).
/// Where the file may be written, it is opened read-write with
/// `query_only`: a daemon killed mid-commit leaves a hot journal, which
/// only a connection that may write can roll back (as the daemon's next
/// start does; SQLite never treats the journal of a live writer as hot).
pub fn open_read_only(path: &Path) -> Result<rusqlite::Connection, QueueError> {
    let err = |source| QueueError::Open {
        path: path.to_path_buf(),
        source,
    };
    use rusqlite::OpenFlags;
    let first_read = |c: rusqlite::Connection| {
        c.busy_timeout(Duration::from_secs(5))?;
        // Opening is lazy: this read is what finds a hot journal (or
        // needs an old file's WAL -shm).
        c.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))?;
        Ok(c)
    };
    let writable = rusqlite::Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .and_then(|c| {
            c.pragma_update(None, "query_only", true)?;
            first_read(c)
        });
    let conn = match writable.or_else(|_| {
        rusqlite::Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(first_read)
    }) {
        Ok(c) => c,
        // A read-only filesystem (or directory): with no journal or WAL
        // the database file is complete and nobody can be writing it, so
        // read it as immutable.
        Err(e)
            if cannot_open(&e)
                && path.exists()
                && !side_file(path, "-wal")
                && !side_file(path, "-journal") =>
        {
            let uri = format!("file:{}?immutable=1", path.display());
            rusqlite::Connection::open_with_flags(
                uri,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
            )
            .map_err(|_| err(e))?
        }
        Err(e) => return Err(err(e)),
    };
    schema::check_version(&conn, path)?;
    Ok(conn)
}

/// An open that failed for the filesystem's sake (read-only, no -shm),
/// not because a writer held the file (busy) or it is damaged.
fn cannot_open(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        e.sqlite_error_code(),
        Some(CannotOpen | ReadOnly | PermissionDenied | SystemIoFailure)
    )
}

/// Whether `<db><suffix>` (SQLite's `-journal` or an old file's `-wal`)
/// exists with something in it.
fn side_file(db: &Path, suffix: &str) -> bool {
    let mut p = db.as_os_str().to_owned();
    p.push(suffix);
    std::fs::metadata(PathBuf::from(p)).is_ok_and(|m| m.len() > 0)
}

/// Stats of the queue file at `path`, read directly (for `edgeferry queue
/// stats`, `status` when the daemon is down, and tests). One segment at a
/// time: each read is short, so the daemon's commits never wait long on it
/// (a reader holds a shared lock while its statement runs).
pub fn stats_of_file(path: &Path) -> Result<Vec<Stats>, QueueError> {
    let err = |source| QueueError::Open {
        path: path.to_path_buf(),
        source,
    };
    let conn = open_read_only(path)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(err)?;
    let readable = segments::readable(&conn, version).map_err(err)?;
    let mut merged: BTreeMap<(String, i64), Stats> = BTreeMap::new();
    for table in &readable.tables {
        let sql = format!(
            "SELECT upstream, priority, COUNT(*), SUM(size), MIN(received_ms) FROM {table} WHERE {} \
             GROUP BY upstream, priority",
            readable.not_gone
        );
        let rows = conn.prepare(&sql).and_then(|mut stmt| {
            stmt.query_map([], |r| {
                Ok(Stats {
                    upstream: r.get(0)?,
                    priority: Priority::from_i64(r.get(1)?),
                    events: r.get::<_, i64>(2)? as u64,
                    bytes: r.get::<_, Option<i64>>(3)?.unwrap_or(0) as u64,
                    oldest_ms: r.get::<_, Option<i64>>(4)?.unwrap_or(0) as u64,
                })
            })?
            .collect::<rusqlite::Result<Vec<Stats>>>()
        });
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) if segments::dropped(&e) => continue,
            Err(e) => return Err(err(e)),
        };
        for s in rows {
            let key = (s.upstream.clone(), -s.priority.as_i64());
            match merged.get_mut(&key) {
                Some(m) => {
                    m.events += s.events;
                    m.bytes += s.bytes;
                    m.oldest_ms = m.oldest_ms.min(s.oldest_ms);
                }
                None => {
                    merged.insert(key, s);
                }
            }
        }
    }
    // By upstream, highest priority first.
    Ok(merged.into_values().collect())
}

/// Rows per upstream in the queue file at `path`.
pub fn depth_of_file(path: &Path) -> Result<BTreeMap<String, u64>, QueueError> {
    let mut out = BTreeMap::new();
    for s in stats_of_file(path)? {
        *out.entry(s.upstream).or_insert(0) += s.events;
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
