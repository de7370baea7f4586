//! The writer thread: owns the SQLite connection; applies appends, acks,
//! evictions and expiry in group commits; serves the uplinks' reads.
//!
//! Row ids are assigned here, when a row is appended, in arrival order: a
//! row keeps its id whether it is read from RAM or from SQLite, so the uplinks' cursors and acks work the same for both.
//! Rows are written oldest first, so for each upstream every row in SQLite
//! has a lower id than every row still only in RAM.

//!
//! One file per concern, each an `impl Writer` block: `ledger` (what is
//! queued, counted in memory), `admission` (caps, eviction, acks, expiry),
//! `disk` (the free-space watermark, the reserve file, the file's integrity),
//! `commit` (when and what to write), `read` (fetch and waiting uplinks),
//! `tables` (the segment tables rows are written into).

mod admission;
mod commit;
mod disk;
mod ledger;
mod read;
mod tables;

use commit::Schedule;
use disk::reserve_path;
use ledger::Count;
use tables::Tables;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::{Cmd, Cursor, NewRow, Overflow, Priority, Properties, QueueError, QueueSettings, Row};
use crate::event::now_ms;
use crate::metrics::{Metrics, UplinkMetrics};

/// The highest id SQLite's AUTOINCREMENT ever handed out (files from
/// before segments; ids are the writer's since): new ids start above it.
const SEQUENCE: &str = "SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence";
const COUNTS: &str = "SELECT upstream, priority, COUNT(*), SUM(size), MAX(id) FROM queue GROUP BY upstream, priority";

pub(super) struct Writer {
    conn: Connection,
    /// The database file, for free-space checks on its filesystem.
    path: PathBuf,
    settings: QueueSettings,
    metrics: Arc<Metrics>,
    /// Per upstream, an uplink's request for rows that were not there yet
    /// (`QueueHandle::wait`), answered when some become readable.
    waiting: HashMap<Arc<str>, Waiter>,
    /// Appended, not yet written, by id: read from here, and written only
    /// if they must wait (see `plan`).
    rows: BTreeMap<i64, Held>,
    /// Payload and topic bytes of `rows`.
    ram_bytes: u64,
    /// The id the next appended row gets.
    next_id: i64,
    /// Acknowledged, deleted at the next commit.
    acks: Vec<i64>,
    /// Evicted by a full queue, deleted at the next commit (their bytes are
    /// already subtracted).
    evictions: Vec<i64>,
    /// `acks` and `evictions`: hidden from fetches and from further eviction.
    scheduled: HashSet<i64>,
    /// Per upstream, by priority: events and bytes of committed rows plus
    /// pending appends, minus evictions. The one ledger (see `ledger`).
    counts: HashMap<String, [Count; 3]>,
    /// Per upstream and priority, at least the highest id in the file: a
    /// fetch after it need not ask SQLite (ids only grow). That is most
    /// fetches of a live uplink, and the queries cost a
    /// third of its CPU per event. Raised before a commit, so a rolled-back
    /// one leaves it too high (a wasted query), never too low.
    written_max: HashMap<Arc<str>, [i64; 3]>,
    last_sweep: Instant,
    /// Free-space check: when last done, and whether space was below the watermark.
    disk_checked: Option<Instant>,
    disk_low: bool,
    /// Bytes admitted since the last free-space check.
    admitted_since_check: u64,
    /// Per upstream, the bytes it held when free space fell below the
    /// watermark: its cap until space returns.
    frozen_cap: HashMap<String, u64>,
    /// A file of RESERVE_BYTES kept beside the database and deleted when the
    /// disk is full, so the deletes that free space can still be committed.
    reserve: PathBuf,
    /// When the reserve was last found missing and not yet recreated.
    reserve_missing_since: Option<Instant>,
    /// The database's length after our last write (see `file_intact`).
    db_len: u64,
    /// The database's device and inode at open: a file moved over it
    /// (a restored backup) leaves the connection writing an unlinked one.
    db_inode: Option<(u64, u64)>,
    /// The file was damaged by another program: nothing is written any more.
    damaged: bool,
    /// The segment tables rows are written into.
    tables: Tables,
    /// Upstreams whose uplink said it is connected (`Cmd::Online`).
    online: HashSet<Arc<str>>,
    schedule: Schedule,
    /// Rows of traced events (`edgeferry tail`) not yet acknowledged: their
    /// upstream, for the line that says so. Bounded by `TRACED_ROWS`.
    traced: HashMap<i64, Arc<str>>,
}

/// Traced rows remembered at once; past it a row's ack is not traced (a
/// tail that watches a stalled upstream would otherwise grow this).
const TRACED_ROWS: usize = 10_000;

impl Writer {
    pub(super) fn new(
        conn: Connection,
        path: &Path,
        settings: QueueSettings,
        metrics: Arc<Metrics>,
    ) -> rusqlite::Result<Writer> {
        let mut counts: HashMap<String, [Count; 3]> = HashMap::new();
        let mut written_max: HashMap<Arc<str>, [i64; 3]> = HashMap::new();
        {
            let mut stmt = conn.prepare(COUNTS)?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })?;
            let mut unknown: HashMap<String, i64> = HashMap::new();
            for row in rows {
                let (upstream, priority, count, size, max_id) = row?;
                let size = size.unwrap_or(0) as u64;
                let priority = Priority::from_i64(priority);
                written_max.entry(upstream.as_str().into()).or_default()[priority.index()] = max_id;
                if !settings.max_size.contains_key(&upstream) {
                    *unknown.entry(upstream.clone()).or_default() += count;
                }
                counts.entry(upstream).or_default()[priority.index()] = Count {
                    events: count as u64,
                    bytes: size,
                };
            }
            for (upstream, queued) in unknown {
                warn!(%upstream, queued, "queue holds events for an upstream that is not configured; they wait until it is configured again");
            }
        }
        let tables = Tables::load(&conn)?;
        // sqlite_sequence exists once a row was inserted with AUTOINCREMENT.
        let sequence: i64 = conn.query_row(SEQUENCE, [], |r| r.get(0)).unwrap_or(0);
        let next_id = tables.above().max(sequence + 1);
        let schedule = Schedule::new(settings.commit_interval);
        Ok(Writer {
            conn,
            path: path.to_path_buf(),
            settings,
            metrics,
            waiting: HashMap::new(),
            rows: BTreeMap::new(),
            traced: HashMap::new(),
            ram_bytes: 0,
            next_id,
            acks: Vec::new(),
            evictions: Vec::new(),
            scheduled: HashSet::new(),
            counts,
            written_max,
            last_sweep: Instant::now(),
            disk_checked: None,
            disk_low: false,
            admitted_since_check: 0,
            frozen_cap: HashMap::new(),
            reserve: reserve_path(path),
            reserve_missing_since: Some(Instant::now() - Duration::from_secs(3600)),
            db_len: std::fs::metadata(path).map_or(0, |m| m.len()),
            db_inode: disk::inode(path),
            damaged: false,
            tables,
            online: HashSet::new(),
            schedule,
        })
    }

    pub(super) fn rows_total(&self) -> i64 {
        self.conn
            .query_row("SELECT COUNT(*) FROM queue", [], |r| r.get(0))
            .unwrap_or(0)
    }

    /// Whether anything waits to be written or deleted.
    fn has_work(&self) -> bool {
        !self.rows.is_empty() || !self.acks.is_empty() || !self.evictions.is_empty()
    }

    /// Serve until every handle is gone, then write what is held. Returns
    /// how many events could not be stored at that final commit.
    pub(super) fn run(mut self, rx: flume::Receiver<Cmd>) -> u64 {
        loop {
            self.sweep_if_due();
            let round = self.next_round();
            if round.is_none_or(|r| Instant::now() < r) {
                let next_sweep = self.last_sweep + self.settings.sweep_interval;
                match rx.recv_deadline(round.map_or(next_sweep, |r| r.min(next_sweep))) {
                    Ok(cmd) => {
                        self.handle(cmd);
                        continue;
                    }
                    Err(flume::RecvTimeoutError::Timeout) => {}
                    Err(flume::RecvTimeoutError::Disconnected) => break,
                }
            }
            if self.next_round().is_some_and(|r| Instant::now() >= r) {
                self.commit_round();
            } // else: woke for the sweep
        }
        self.close()
    }

    /// Expired rows go every `sweep_interval`, but not while commits fail.
    fn sweep_if_due(&mut self) {
        let now = Instant::now();
        if now < self.last_sweep + self.settings.sweep_interval {
            return;
        }
        if self.schedule.retry_at.is_none() {
            self.sweep();
        } else {
            // Never a deadline in the past.
            self.last_sweep = now;
        }
    }

    /// One command from a handle.
    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Append(rows) => self.append(rows),
            Cmd::Ack(ids) => {
                for id in ids {
                    self.ack(id);
                }
            }
            Cmd::Online { upstream, online } => {
                match online {
                    true => self.online.insert(upstream.into()),
                    false => self.online.remove(upstream.as_str()),
                };
            }
            Cmd::Fetch {
                upstream,
                after,
                until,
                limit,
                reply,
            } => {
                let _ = reply.send(self.fetch(&upstream, after, until, limit));
            }
            Cmd::Wait {
                upstream,
                after,
                limit,
                reply,
            } => {
                let upstream: Arc<str> = upstream.into();
                self.waiting.insert(
                    upstream.clone(),
                    Waiter {
                        after,
                        limit,
                        reply,
                    },
                );
                // Rows may have come since the uplink last read.
                self.answer(&upstream);
            }
            Cmd::LastId { upstream, reply } => {
                let _ = reply.send(self.last_id(&upstream));
            }
            Cmd::Depth { reply } => {
                let _ = reply.send(self.depth());
            }
            Cmd::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            Cmd::Sync { reply } => {
                let _ = reply.send(self.sync().map_err(|e| e.to_string()));
            }
        }
    }

    /// New rows: admitted (or refused while commits fail and memory is
    /// used up), and readable at once.
    fn append(&mut self, rows: Vec<NewRow>) {
        if self.holding_full() {
            self.metrics
                .dropped_queue_unavailable
                .fetch_add(rows.len() as u64, Relaxed);
            return;
        }
        let mut added: Vec<Arc<str>> = Vec::new();
        for row in rows {
            let upstream = row.upstream.clone();
            if self.admit(row) && !added.contains(&upstream) {
                added.push(upstream);
            }
        }
        for upstream in added {
            self.answer(&upstream);
        }
    }

    /// Every handle is gone: write everything, retried a few times.
    fn close(mut self) -> u64 {
        for _ in 0..5 {
            if !self.has_work() {
                break;
            }
            let all = self.plan(true);
            if self.commit_parts(&all).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let lost = self.rows.len() as u64;
        if lost > 0 {
            // Counted with the other refusals, so the final counters say so.
            self.metrics
                .dropped_queue_unavailable
                .fetch_add(lost, Relaxed);
            error!(
                lost,
                "queue: final commit failed; these events were not stored"
            );
        }
        info!("queue closed");
        lost
    }
}

/// An uplink's request for rows after `after`, at most `limit`.
struct Waiter {
    after: Cursor,
    limit: usize,
    reply: oneshot::Sender<Result<Vec<Row>, QueueError>>,
}

/// A row appended and not yet written, and when it arrived.
struct Held {
    row: NewRow,
    at: Instant,
}
