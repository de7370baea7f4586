//! The writer thread: owns the SQLite connection; applies appends, acks,
//! evictions and expiry in group commits; serves the uplinks' reads.
//!
//! Row ids are assigned here, when a row is appended, in arrival order: a
//! row keeps its id whether it is read from RAM (durability "offline") or
//! from SQLite, so the uplinks' cursors and acks work the same for both.
//! Rows are written oldest first, so for each upstream every row in SQLite
//! has a lower id than every row still only in RAM.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::{Cmd, Cursor, Durability, NewRow, Overflow, Priority, QueueError, QueueSettings, Row};
use crate::event::now_ms;
use crate::metrics::{Metrics, UplinkMetrics};

const INSERT_ROW: &str = "INSERT INTO queue (id, upstream, event_id, topic, qos, priority, received_ms, expires_ms, size, payload) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";
/// The next id: above every id SQLite ever handed out (AUTOINCREMENT keeps
/// that in sqlite_sequence) and every id in the table.
const NEXT_ID: &str = "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'queue'), 0), \
     COALESCE((SELECT MAX(id) FROM queue), 0)) + 1";
const DELETE_ROW: &str = "DELETE FROM queue WHERE id = ?1 RETURNING upstream, size, priority";
const SELECT_SEND_ORDER: &str = "SELECT id, event_id, topic, qos, priority, received_ms, payload, expires_ms FROM queue \
     WHERE upstream = ?1 AND priority = ?2 AND id > ?3 AND id <= ?6 AND (expires_ms IS NULL OR expires_ms > ?4) \
     ORDER BY id LIMIT ?5";
const LAST_ID: &str = "SELECT MAX(id) FROM queue WHERE upstream = ?1";
const SELECT_EVICTION_ORDER: &str = "SELECT id, size FROM queue \
     WHERE upstream = ?1 AND priority = ?2 AND id > ?3 ORDER BY id LIMIT 256";
const SWEEP_EXPIRED: &str = "DELETE FROM queue WHERE expires_ms IS NOT NULL AND expires_ms <= ?1 \
     RETURNING id, upstream, priority, size";
const COUNTS: &str = "SELECT upstream, priority, COUNT(*), SUM(size), MAX(id) FROM queue GROUP BY upstream, priority";
/// The oldest committed row of one upstream and priority: an index seek.
const OLDEST: &str =
    "SELECT received_ms FROM queue WHERE upstream = ?1 AND priority = ?2 ORDER BY id LIMIT 1";

/// Rows per transaction while recovering from failed commits.
const STEP: usize = 250;

/// Size of the reserve file (see `Writer::reserve`).
const RESERVE_BYTES: u64 = 2 << 20;

/// Free disk space is checked at least this often, and after this many bytes
/// were admitted (a burst can fill a small card within a second).
const DISK_CHECK_BYTES: u64 = 256 << 10;
/// How often free disk space is checked.
const DISK_CHECK_EVERY: Duration = Duration::from_secs(1);

pub(super) struct Writer {
    conn: Connection,
    /// The database file, for free-space checks on its filesystem.
    path: PathBuf,
    settings: QueueSettings,
    metrics: Arc<Metrics>,
    /// Per upstream, an uplink's request for rows that were not there yet
    /// (`QueueHandle::wait`), answered when some become readable.
    waiting: HashMap<Arc<str>, Waiter>,
    /// Appended, not yet written, by id. With durability "always" they
    /// are written at the next commit and read only after it; with
    /// "offline" they are read from here and written only if they wait.
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
    /// Per upstream: bytes of committed rows plus pending appends, minus evictions.
    bytes: HashMap<String, u64>,
    /// The same per upstream and priority, with the number of events: kept
    /// in memory (counted once at start) so depth and stats cost no scan.
    counts: HashMap<(String, Priority), Count>,
    /// Per upstream and priority, at least the highest id in the file: a
    /// fetch after it need not ask SQLite (ids only grow). That is most
    /// fetches of a live uplink with "offline", and the queries cost a
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
    /// `<db>-wal`, and its length after our last write (see `wal_intact`).
    wal: PathBuf,
    wal_len: u64,
    /// The WAL was damaged by another program: nothing is written any more.
    damaged: bool,
    /// Upstreams whose uplink said it is connected (`Cmd::Online`).
    online: HashSet<Arc<str>>,
}

impl Writer {
    pub(super) fn new(
        conn: Connection,
        path: &Path,
        settings: QueueSettings,
        metrics: Arc<Metrics>,
    ) -> rusqlite::Result<Writer> {
        let mut bytes: HashMap<String, u64> = HashMap::new();
        let mut counts: HashMap<(String, Priority), Count> = HashMap::new();
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
                *bytes.entry(upstream.clone()).or_default() += size;
                counts.insert(
                    (upstream, priority),
                    Count {
                        events: count as u64,
                        bytes: size,
                    },
                );
            }
            for (upstream, queued) in unknown {
                warn!(%upstream, queued, "queue holds events for an upstream that is not configured; they wait until it is configured again");
            }
        }
        let next_id = conn.query_row(NEXT_ID, [], |r| r.get(0))?;
        let wal = {
            let mut p = path.as_os_str().to_owned();
            p.push("-wal");
            PathBuf::from(p)
        };
        Ok(Writer {
            conn,
            path: path.to_path_buf(),
            settings,
            metrics,
            waiting: HashMap::new(),
            rows: BTreeMap::new(),
            ram_bytes: 0,
            next_id,
            acks: Vec::new(),
            evictions: Vec::new(),
            scheduled: HashSet::new(),
            bytes,
            counts,
            written_max,
            last_sweep: Instant::now(),
            disk_checked: None,
            disk_low: false,
            admitted_since_check: 0,
            frozen_cap: HashMap::new(),
            reserve: reserve_path(path),
            reserve_missing_since: Some(Instant::now() - Duration::from_secs(3600)),
            wal_len: std::fs::metadata(&wal).map_or(0, |m| m.len()),
            wal,
            damaged: false,
            online: HashSet::new(),
        })
    }

    pub(super) fn rows_total(&self) -> i64 {
        self.conn
            .query_row("SELECT COUNT(*) FROM queue", [], |r| r.get(0))
            .unwrap_or(0)
    }

    /// Whether uplinks read rows not yet written, from RAM: always with
    /// durability "offline"; with "always" while free space is below the
    /// watermark (then rows are written only if they must wait). Held rows
    /// are always younger than every written one, so reading them after
    /// the written ones keeps each priority in order whenever this changes.
    fn ram_readable(&self) -> bool {
        self.settings.durability == Durability::Offline || self.disk_low
    }

    /// Whether anything waits to be written or deleted.
    fn has_work(&self) -> bool {
        !self.rows.is_empty() || !self.acks.is_empty() || !self.evictions.is_empty()
    }

    /// When to consider the next commit, if there is work: at most one per
    /// commit interval (or retry delay), sooner when too much waits.
    fn next_round(&self, last_round: Instant, retry_at: Option<Instant>) -> Option<Instant> {
        if !self.has_work() {
            return None;
        }
        if let Some(retry) = retry_at {
            return Some(retry);
        }
        let full = match self.ram_readable() {
            false => self.rows.len() >= self.settings.commit_max_events,
            true => self.ram_bytes > self.settings.memory_max,
        };
        Some(if full {
            Instant::now()
        } else {
            last_round + self.settings.commit_interval
        })
    }

    /// Whether new rows must be refused (and counted): commits are
    /// failing and the in-memory allowance is used up. Fetches and acks are
    /// still served meanwhile, so the uplinks keep draining and shutdown
    /// never hangs on a full disk.
    fn holding_full(&self, failing: bool) -> bool {
        // While commits work, rows are committed as fast as they come and
        // the bounded command channel is the backpressure; dropping here
        // would blame the queue for a burst it can take.
        failing
            && match self.settings.durability {
                Durability::Always => {
                    self.rows.len() >= self.settings.commit_max_events.max(1000) * 4
                }
                Durability::Offline => self.ram_bytes >= self.settings.memory_max,
            }
    }

    /// Serve until every handle is gone, then write what is held. Returns
    /// how many events could not be stored at that final commit.
    pub(super) fn run(mut self, rx: flume::Receiver<Cmd>) -> u64 {
        let interval = self.settings.commit_interval;
        // The last commit, or the last look that found nothing to write.
        let mut last_round = Instant::now() - interval;
        // Set while commits fail (disk full, I/O error): when to try again.
        let mut retry_at: Option<Instant> = None;
        let mut last_warning: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if now >= self.last_sweep + self.settings.sweep_interval {
                if retry_at.is_none() {
                    self.sweep();
                } else {
                    // Not while commits fail; and never a deadline in the past.
                    self.last_sweep = now;
                }
            }
            let next_sweep = self.last_sweep + self.settings.sweep_interval;
            let round = self.next_round(last_round, retry_at);
            let cmd = if round.is_some_and(|r| r <= now) {
                None
            } else {
                match rx.recv_deadline(round.unwrap_or(next_sweep).min(next_sweep)) {
                    Ok(c) => Some(c),
                    Err(flume::RecvTimeoutError::Timeout) => None,
                    Err(flume::RecvTimeoutError::Disconnected) => break,
                }
            };
            match cmd {
                Some(Cmd::Append(rows)) => {
                    if self.holding_full(retry_at.is_some()) {
                        self.metrics
                            .dropped_queue_unavailable
                            .fetch_add(rows.len() as u64, Relaxed);
                    } else {
                        let mut added: Vec<Arc<str>> = Vec::new();
                        for row in rows {
                            let upstream = row.upstream.clone();
                            if self.admit(row) && self.ram_readable() && !added.contains(&upstream)
                            {
                                added.push(upstream);
                            }
                        }
                        // Readable from RAM at once.
                        for upstream in added {
                            self.answer(&upstream);
                        }
                    }
                    continue;
                }
                Some(Cmd::Ack(ids)) => {
                    for id in ids {
                        self.ack(id);
                    }
                    continue;
                }
                Some(Cmd::Online { upstream, online }) => {
                    match online {
                        true => self.online.insert(upstream.into()),
                        false => self.online.remove(upstream.as_str()),
                    };
                    continue;
                }
                Some(Cmd::Fetch {
                    upstream,
                    after,
                    until,
                    limit,
                    reply,
                }) => {
                    let _ = reply.send(self.fetch(&upstream, after, until, limit));
                    continue;
                }
                Some(Cmd::Wait {
                    upstream,
                    after,
                    limit,
                    reply,
                }) => {
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
                    continue;
                }
                Some(Cmd::LastId { upstream, reply }) => {
                    let _ = reply.send(self.last_id(&upstream));
                    continue;
                }
                Some(Cmd::Depth { reply }) => {
                    let _ = reply.send(self.depth());
                    continue;
                }
                Some(Cmd::Stats { reply }) => {
                    let _ = reply.send(self.stats());
                    continue;
                }
                Some(Cmd::Sync { reply }) => {
                    let result = if self.has_work() {
                        let all = self.plan(true);
                        self.commit_parts(&all)
                    } else {
                        Ok(())
                    };
                    if result.is_ok() {
                        last_round = Instant::now();
                        retry_at = None;
                    }
                    let _ = reply.send(result.map_err(|e| e.to_string()));
                    continue;
                }
                None => {}
            }
            if self
                .next_round(last_round, retry_at)
                .is_none_or(|r| Instant::now() < r)
            {
                continue; // woke for the sweep
            }
            let spill = self.plan(false);
            if spill.is_empty() && self.acks.is_empty() && self.evictions.is_empty() {
                // Offline rows that may still be acknowledged from RAM.
                last_round = Instant::now();
                continue;
            }
            // Commits are spaced start to start, so an event waits at most
            // one interval plus one commit, not an interval plus two (unless
            // commits take most of the interval, see below).
            let started = Instant::now();
            // After a failure, small steps: one big transaction may need
            // more WAL than the disk has left.
            let committed = if retry_at.is_some() {
                self.commit_in_steps(&spill)
            } else {
                self.commit_parts(&spill)
            };
            match committed {
                Ok(()) => {
                    if retry_at.take().is_some() {
                        info!("queue commits work again");
                    }
                    // A commit as long as the interval (a slow SD card, a
                    // retry in steps) would leave no time to gather the next
                    // batch: commits of a few rows each, back to back. Keep
                    // at least a quarter interval of gathering after each.
                    let gather_from = Instant::now().checked_sub(interval - interval / 4);
                    last_round = gather_from.map_or(started, |g| started.max(g));
                    self.restore_reserve();
                }
                Err(e) => {
                    self.metrics.commit_failures.fetch_add(1, Relaxed);
                    // Deletes alone may still fit (a full disk): they free
                    // pages for the appends, which are retried below.
                    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
                        self.release_reserve();
                        // Fold the WAL into the database and truncate it, so
                        // the next transactions reuse its space.
                        self.truncate_wal();
                    }
                    let freed = (!self.acks.is_empty() || !self.evictions.is_empty())
                        && self.delete_in_chunks().is_ok();
                    // Keep what we hold and retry; warn at most every 30 s.
                    if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                        error!(error = %e, pending = self.rows.len(), "queue commit failed (disk full or I/O error?); holding events in memory and retrying");
                        last_warning = Some(Instant::now());
                    }
                    retry_at = Some(
                        Instant::now()
                            + if freed {
                                interval
                            } else {
                                interval.max(Duration::from_millis(500))
                            },
                    );
                }
            }
        }
        // Every handle is gone: write everything, retried a few times.
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

    /// The ids of the rows to write now: all of them with durability
    /// "always" (or `all`); with "offline", those that waited `spill_after`,
    /// those of an upstream that is not connected, and the oldest beyond
    /// `memory_max`. Oldest first, so per upstream the written rows are
    /// always a prefix of the held ones.
    fn plan(&self, all: bool) -> Vec<i64> {
        if all || !self.ram_readable() {
            return self.rows.keys().copied().collect();
        }
        let down: HashSet<&str> = self
            .rows
            .values()
            .map(|h| &*h.row.upstream)
            .filter(|u| !self.online.contains(*u))
            .collect();
        let now = Instant::now();
        let mut over = self.ram_bytes.saturating_sub(self.settings.memory_max);
        let mut ids = Vec::new();
        for (&id, held) in &self.rows {
            // Below the watermark, waiting is no reason to grow the file.
            let old = !self.disk_low && now >= held.at + self.settings.spill_after;
            if over > 0 || old || down.contains(&*held.row.upstream) {
                over = over.saturating_sub(held.row.size());
                ids.push(id);
            } else if down.is_empty() {
                // Younger rows follow; none of them is due.
                break;
            }
        }
        ids
    }

    /// An upstream acknowledged row `id`: forget it if it is still only in
    /// RAM, else delete it at the next commit.
    fn ack(&mut self, id: i64) {
        if let Some(mut held) = self.rows.remove(&id) {
            held.row.settle();
            let size = held.row.size();
            self.ram_bytes -= size;
            self.release(&held.row.upstream, held.row.priority, size);
            self.metrics.acked_in_memory.fetch_add(1, Relaxed);
        } else if self.scheduled.insert(id) {
            self.acks.push(id);
        }
    }

    /// Subtract a row that left the queue from the in-memory totals.
    fn release(&mut self, upstream: &str, priority: Priority, size: u64) {
        if let Some(b) = self.bytes.get_mut(upstream) {
            *b = b.saturating_sub(size);
        }
        self.count(upstream, priority, -1, -(size as i64));
    }

    /// The highest id of `upstream` an uplink can read now (0 if none).
    fn last_id(&self, upstream: &str) -> i64 {
        let committed = self
            .conn
            .query_row(LAST_ID, [upstream], |r| r.get::<_, Option<i64>>(0))
            .ok()
            .flatten()
            .unwrap_or(0);
        if !self.ram_readable() {
            return committed;
        }
        let held = self
            .rows
            .iter()
            .rev()
            .find(|(_, h)| &*h.row.upstream == upstream)
            .map_or(0, |(&id, _)| id);
        committed.max(held)
    }

    fn uplink(&self, upstream: &str) -> Option<&Arc<UplinkMetrics>> {
        self.metrics.uplinks.get(upstream)
    }

    /// Accept a new row if it fits its upstream's cap (and the disk's
    /// watermark), applying the route's overflow policy if not. Returns
    /// whether it was accepted.
    fn admit(&mut self, mut row: NewRow) -> bool {
        let size = row.size();
        let used = self.bytes.get(&*row.upstream).copied().unwrap_or(0);
        let max = self
            .settings
            .max_size
            .get(&*row.upstream)
            .copied()
            .unwrap_or(u64::MAX);
        // Below the free-space watermark the queue does not grow past what
        // it held when the disk went low (SQLite reuses the freed pages);
        // but while the upstream is connected an event may still go
        // through memory, up to `memory_max`: forwarded, and written only
        // if it must wait (the upstream goes, memory runs out).
        let disk_low = self.disk_low();
        let through_memory = self.online.contains(&*row.upstream)
            && self.ram_bytes + size <= self.settings.memory_max;
        let cap = if disk_low && !through_memory {
            let frozen = *self
                .frozen_cap
                .entry(row.upstream.to_string())
                .or_insert(used);
            max.min(frozen)
        } else {
            max
        };
        if used + size > cap {
            let fits = size <= cap
                && match row.overflow {
                    Overflow::DropNewest => false,
                    Overflow::DropOldest => {
                        // A little more than needed (1/256 of the cap, within
                        // the same priority) so a full queue does not look for
                        // victims on every event.
                        let headroom = (cap / 256).min(cap.saturating_sub(size));
                        self.evict(&row.upstream, row.priority, used + size - cap, headroom)
                    }
                };
            if !fits {
                if let Some(u) = self.uplink(&row.upstream) {
                    u.rejected[row.priority.index()].fetch_add(1, Relaxed);
                }
                // Refused by the route's overflow policy: counted, and the
                // sensor is not asked to send it again.
                row.settle();
                return false;
            }
        }
        *self.bytes.entry(row.upstream.to_string()).or_insert(0) += size;
        self.count(&row.upstream, row.priority, 1, size as i64);
        self.admitted_since_check += size;
        self.ram_bytes += size;
        let id = self.next_id;
        self.next_id += 1;
        self.rows.insert(
            id,
            Held {
                row,
                at: Instant::now(),
            },
        );
        true
    }

    /// Make room for `need` bytes in `upstream`'s queue by evicting its
    /// oldest rows of the lowest priority first, never above `max`; plus up
    /// to `headroom` more from the priority where `need` was met. Evicts
    /// nothing and returns false if `need` cannot be met.
    fn evict(&mut self, upstream: &str, max: Priority, need: u64, headroom: u64) -> bool {
        // Plan first: committed rows (id, size) and held rows (id).
        let mut committed: Vec<(i64, u64, Priority)> = Vec::new();
        let mut held: Vec<i64> = Vec::new();
        let mut freed = 0;
        let target = |freed: u64| if freed >= need { need + headroom } else { need };
        for priority in [Priority::Low, Priority::Normal, Priority::High] {
            if priority > max || freed >= need {
                break;
            }
            // Committed rows are older than pending ones.
            let mut after = 0i64;
            'committed: while freed < target(freed) {
                let batch: Vec<(i64, i64)> = match self
                    .conn
                    .prepare_cached(SELECT_EVICTION_ORDER)
                    .and_then(|mut s| {
                        s.query_map(params![upstream, priority.as_i64(), after], |r| {
                            Ok((r.get(0)?, r.get(1)?))
                        })?
                        .collect()
                    }) {
                    Ok(b) => b,
                    Err(e) => {
                        warn!(error = %e, "queue: cannot read eviction candidates");
                        return false;
                    }
                };
                let Some(&(last, _)) = batch.last() else {
                    break;
                };
                after = last;
                for (id, size) in batch {
                    if freed >= target(freed) {
                        break 'committed;
                    }
                    if !self.scheduled.contains(&id) {
                        committed.push((id, size as u64, priority));
                        freed += size as u64;
                    }
                }
            }
            for (&id, h) in &self.rows {
                if freed >= target(freed) {
                    break;
                }
                if &*h.row.upstream == upstream && h.row.priority == priority {
                    held.push(id);
                    freed += h.row.size();
                }
            }
        }
        if freed < need {
            return false;
        }
        for (id, size, priority) in committed {
            self.scheduled.insert(id);
            self.evictions.push(id);
            self.count_evicted(upstream, priority, size);
        }
        for id in held {
            if let Some(mut h) = self.rows.remove(&id) {
                h.row.settle();
                self.ram_bytes -= h.row.size();
                self.count_evicted(upstream, h.row.priority, h.row.size());
            }
        }
        true
    }

    fn count_evicted(&mut self, upstream: &str, priority: Priority, size: u64) {
        self.release(upstream, priority, size);
        if let Some(u) = self.uplink(upstream) {
            u.evicted[priority.index()].fetch_add(1, Relaxed);
        }
    }

    /// Delete the reserve file: the disk is full and the deletes that would
    /// free space need room to be committed.
    fn release_reserve(&mut self) {
        if std::fs::remove_file(&self.reserve).is_ok() {
            warn!(reserve = %self.reserve.display(), "disk full: released the reserve file so acknowledged events can be deleted");
            self.reserve_missing_since = Some(Instant::now());
        }
    }

    /// (Re)create the reserve file once there is clearly room for it again.
    fn restore_reserve(&mut self) {
        let Some(since) = self.reserve_missing_since else {
            return;
        };
        if since.elapsed() < Duration::from_secs(10) {
            return;
        }
        self.reserve_missing_since = Some(Instant::now());
        if crate::ops::disk::space(&self.path).is_some_and(|s| s.free < 2 * RESERVE_BYTES) {
            return;
        }
        let made = std::fs::File::create(&self.reserve).and_then(|f| {
            use std::io::Write;
            let mut f = std::io::BufWriter::new(f);
            // Real blocks (not a sparse file), or deleting it frees nothing.
            f.write_all(&vec![0u8; RESERVE_BYTES as usize])?;
            f.into_inner().map_err(|e| e.into_error())?.sync_all()
        });
        match made {
            Ok(()) => self.reserve_missing_since = None,
            Err(e) => {
                let _ = std::fs::remove_file(&self.reserve);
                warn!(reserve = %self.reserve.display(), error = %e, "cannot create the disk-full reserve file; will retry");
            }
        }
    }

    /// Whether free space on the database's filesystem is below the
    /// watermark (checked at most once a second).
    fn disk_low(&mut self) -> bool {
        if self.settings.min_free_disk == 0 {
            return false;
        }
        if self
            .disk_checked
            .is_some_and(|t| t.elapsed() < DISK_CHECK_EVERY)
            && self.admitted_since_check < DISK_CHECK_BYTES
        {
            return self.disk_low;
        }
        self.disk_checked = Some(Instant::now());
        self.admitted_since_check = 0;
        let low = match crate::ops::disk::space(&self.path) {
            Some(space) => space.free < self.settings.min_free_disk,
            None => false,
        };
        if low != self.disk_low {
            if low {
                warn!(path = %self.path.display(), min_free_disk = self.settings.min_free_disk, "free disk space below the watermark: the queue stops growing; events are forwarded from memory while their upstream is connected, and overflow policies apply while it is not");
            } else {
                info!(path = %self.path.display(), "free disk space above the watermark again");
                self.frozen_cap.clear();
            }
        }
        self.disk_low = low;
        low
    }

    /// Write the held rows `spill` and apply pending evictions and acks,
    /// in one transaction. On failure nothing is lost: the work stays
    /// pending.
    fn commit_parts(&mut self, spill: &[i64]) -> rusqlite::Result<()> {
        self.wal_intact()?;
        let started = std::time::Instant::now();
        let tx = self.conn.transaction()?;
        let released = {
            let mut insert = tx.prepare_cached(INSERT_ROW)?;
            for (id, r) in spill
                .iter()
                .filter_map(|id| Some((id, &self.rows.get(id)?.row)))
            {
                let max = &mut self.written_max.entry(r.upstream.clone()).or_default()
                    [r.priority.index()];
                *max = (*max).max(*id);
                insert.execute(params![
                    id,
                    &*r.upstream,
                    r.event_id,
                    r.topic,
                    r.qos,
                    r.priority.as_i64(),
                    r.received_ms as i64,
                    r.expires_ms.map(|e| e as i64),
                    r.size() as i64,
                    &r.payload[..]
                ])?;
            }
            delete_rows(&tx, &self.evictions, &self.acks)?
        };
        tx.commit()?;
        self.metrics.commit_seconds.observe(started.elapsed());
        for (upstream, size, priority) in released {
            self.release(&upstream, priority, size);
        }
        self.metrics.commits.fetch_add(1, Relaxed);
        let mut added: Vec<Arc<str>> = Vec::new();
        let mut written = 0;
        for id in spill {
            let Some(mut h) = self.rows.remove(id) else {
                continue;
            };
            h.row.settle();
            written += 1;
            self.ram_bytes -= h.row.size();
            if !added.contains(&h.row.upstream) {
                added.push(h.row.upstream);
            }
        }
        self.metrics.queued.fetch_add(written, Relaxed);
        self.note_wal_len();
        self.acks.clear();
        self.evictions.clear();
        self.scheduled.clear();
        // With "always", committed rows are what uplinks read.
        if self.settings.durability == Durability::Always {
            for upstream in added {
                self.answer(&upstream);
            }
        }
        Ok(())
    }

    /// While commits fail (a full disk): the deletes first, then `spill`, in
    /// small transactions with the WAL truncated after each, so every step
    /// needs little space and the pages the deletes free are reused.
    fn commit_in_steps(&mut self, spill: &[i64]) -> rusqlite::Result<()> {
        self.delete_in_chunks()?;
        for chunk in spill.chunks(STEP) {
            self.commit_parts(chunk)?;
            self.truncate_wal();
        }
        Ok(())
    }

    /// Fold the WAL into the database and truncate it to zero bytes, giving
    /// its space back to the filesystem (no-op while a reader holds it).
    /// The WAL must still hold everything SQLite wrote to it: SQLite never
    /// shrinks it here (no size limit is set; only `truncate_wal` does, and
    /// notes the new length), so a shorter or missing file was cut or
    /// removed by another program. The events committed into the lost part
    /// are gone, and every later commit would land behind a hole that the
    /// next start's recovery stops at (a checkpoint copies the hole's zeros
    /// into the database). So the queue stops writing: commits fail from
    /// here on (events are held, so sensors are not acknowledged), it is
    /// said at ERROR and counted, and the health probe withholds the
    /// watchdog so systemd restarts edgeferry into what is intact. Checked
    /// before every commit and at every sweep: one `stat`.
    fn wal_intact(&mut self) -> rusqlite::Result<()> {
        if !self.damaged {
            let len = std::fs::metadata(&self.wal).map(|m| m.len());
            let cut = match &len {
                Ok(len) => *len < self.wal_len,
                Err(e) => e.kind() == std::io::ErrorKind::NotFound && self.wal_len > 0,
            };
            if cut {
                self.damaged = true;
                self.metrics.queue_damaged.fetch_add(1, Relaxed);
                error!(
                    wal = %self.wal.display(),
                    bytes = len.as_ref().ok(),
                    expected_at_least = self.wal_len,
                    "queue file damaged while running: its WAL was cut short or removed by another program, and the events committed into the lost part are gone; the queue stops writing (new events are held, not acknowledged) and the health probe fails so edgeferry is restarted into what is intact"
                );
            }
        }
        match self.damaged {
            false => Ok(()),
            true => Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR_SHORT_READ),
                Some("the queue's WAL was damaged by another program; restart edgeferry".into()),
            )),
        }
    }

    /// After our own writes: the WAL's length as SQLite left it.
    fn note_wal_len(&mut self) {
        self.wal_len = std::fs::metadata(&self.wal).map_or(0, |m| m.len());
    }

    fn truncate_wal(&mut self) {
        if self.damaged {
            return;
        }
        let _ = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        self.note_wal_len();
    }

    /// On a full disk: commit the pending deletes a chunk at a time and
    /// truncate the WAL after each. One transaction with all of them may
    /// need more WAL than the disk has left, and would then never commit;
    /// chunks make progress, and the pages they free are reused by the
    /// appends.
    fn delete_in_chunks(&mut self) -> rusqlite::Result<()> {
        const CHUNK: usize = STEP;
        while !self.acks.is_empty() || !self.evictions.is_empty() {
            self.wal_intact()?;
            let ev = self.evictions.len().min(CHUNK);
            let ack = self.acks.len().min(CHUNK - ev);
            let started = std::time::Instant::now();
            let done = self.conn.transaction().and_then(|tx| {
                let released = delete_rows(&tx, &self.evictions[..ev], &self.acks[..ack])?;
                tx.commit()?;
                Ok(released)
            });
            let released = done?;
            self.metrics.commit_seconds.observe(started.elapsed());
            self.metrics.commits.fetch_add(1, Relaxed);
            for (upstream, size, priority) in released {
                self.release(&upstream, priority, size);
            }
            for id in self.evictions.drain(..ev).chain(self.acks.drain(..ack)) {
                self.scheduled.remove(&id);
            }
            self.note_wal_len();
            self.truncate_wal();
        }
        Ok(())
    }

    /// Delete expired rows, counting them per upstream and priority.
    fn sweep(&mut self) {
        self.last_sweep = Instant::now();
        if self.wal_intact().is_err() {
            return;
        }
        let result = self.conn.prepare_cached(SWEEP_EXPIRED).and_then(|mut s| {
            s.query_map([now_ms() as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        });
        let expired = match result {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "queue: expiry sweep failed; will retry");
                return;
            }
        };
        // Held rows expire too; they were never written.
        let now = now_ms();
        let held: Vec<i64> = self
            .rows
            .iter()
            .filter(|(_, h)| h.row.expires_ms.is_some_and(|e| e <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in held {
            if let Some(mut h) = self.rows.remove(&id) {
                h.row.settle();
                let (size, priority) = (h.row.size(), h.row.priority);
                self.ram_bytes -= size;
                self.release(&h.row.upstream, priority, size);
                if let Some(u) = self.uplink(&h.row.upstream) {
                    u.expired[priority.index()].fetch_add(1, Relaxed);
                }
            }
        }
        for (id, upstream, priority, size) in expired {
            if self.evictions.contains(&id) {
                continue; // already counted and subtracted as evicted
            }
            self.release(&upstream, Priority::from_i64(priority), size as u64);
            if !self.acks.contains(&id)
                && let Some(u) = self.uplink(&upstream)
            {
                u.expired[Priority::from_i64(priority).index()].fetch_add(1, Relaxed);
            }
        }
    }

    fn fetch(
        &mut self,
        upstream: &str,
        after: Cursor,
        until: i64,
        limit: usize,
    ) -> Result<Vec<Row>, QueueError> {
        let now = now_ms() as i64;
        let mut out = Vec::with_capacity(limit);
        let mut stmt = self
            .conn
            .prepare_cached(SELECT_SEND_ORDER)
            .map_err(|e| QueueError::Read(e.to_string()))?;
        for priority in Priority::SEND_ORDER {
            let mut cursor = after.0[priority.index()];
            let on_disk = self
                .written_max
                .get(upstream)
                .is_some_and(|m| m[priority.index()] > cursor);
            while on_disk && out.len() < limit {
                let want = limit - out.len();
                let batch: Vec<Row> = stmt
                    .query_map(
                        params![upstream, priority.as_i64(), cursor, now, want as i64, until],
                        |r| {
                            Ok(Row {
                                id: r.get(0)?,
                                event_id: r.get(1)?,
                                topic: r.get(2)?,
                                qos: r.get(3)?,
                                priority: Priority::from_i64(r.get(4)?),
                                received_ms: r.get::<_, i64>(5)? as u64,
                                payload: r.get(6)?,
                                expires_ms: r.get::<_, Option<i64>>(7)?.map(|e| e as u64),
                            })
                        },
                    )
                    .and_then(|rows| rows.collect())
                    .map_err(|e| QueueError::Read(e.to_string()))?;
                let Some(last) = batch.last() else { break };
                cursor = last.id;
                let exhausted = batch.len() < want;
                // Rows acked or evicted but not yet deleted are hidden.
                out.extend(
                    batch
                        .into_iter()
                        .filter(|r| !self.scheduled.contains(&r.id)),
                );
                if exhausted {
                    break;
                }
            }
            // Then the rows still only in RAM, all younger (see `ram_readable`).
            if self.ram_readable() && out.len() < limit {
                let from = cursor.saturating_add(1);
                if from <= until {
                    let held = self
                        .rows
                        .range(from..=until)
                        .filter(|(_, h)| {
                            &*h.row.upstream == upstream
                                && h.row.priority == priority
                                && h.row.expires_ms.is_none_or(|e| e as i64 > now)
                        })
                        .take(limit - out.len())
                        .map(|(&id, h)| Row {
                            id,
                            event_id: h.row.event_id.clone(),
                            topic: h.row.topic.clone(),
                            qos: h.row.qos,
                            priority,
                            received_ms: h.row.received_ms,
                            expires_ms: h.row.expires_ms,
                            payload: h.row.payload.to_vec(),
                        });
                    out.extend(held);
                }
            }
        }
        Ok(out)
    }

    /// Answer `upstream`'s waiting uplink if it has rows to read now. Its
    /// request stays if not, and goes if the uplink has gone.
    fn answer(&mut self, upstream: &str) {
        let Some(w) = self.waiting.get(upstream) else {
            return;
        };
        if w.reply.is_closed() {
            self.waiting.remove(upstream);
            return;
        }
        let (after, limit) = (w.after, w.limit);
        let rows = self.fetch(upstream, after, i64::MAX, limit);
        if rows.as_ref().is_ok_and(|r| r.is_empty()) {
            return;
        }
        if let Some(w) = self.waiting.remove(upstream) {
            // A session that ended meanwhile reads them again next time.
            let _ = w.reply.send(rows);
        }
    }

    /// Events per upstream (committed and pending), from memory.
    fn depth(&mut self) -> std::collections::BTreeMap<String, u64> {
        let mut out: std::collections::BTreeMap<String, u64> = self
            .settings
            .max_size
            .keys()
            .map(|k| (k.clone(), 0))
            .collect();
        for ((upstream, _), c) in &self.counts {
            *out.entry(upstream.clone()).or_default() += c.events;
        }
        out
    }

    /// Per upstream and priority: events and bytes from memory, the oldest
    /// receive time by an index seek (or from pending rows).
    fn stats(&mut self) -> Vec<super::Stats> {
        let mut out = Vec::new();
        for ((upstream, priority), c) in &self.counts {
            if c.events == 0 {
                continue;
            }
            let committed: Option<i64> = self
                .conn
                .prepare_cached(OLDEST)
                .and_then(|mut st| st.query_row(params![upstream, priority.as_i64()], |r| r.get(0)))
                .ok();
            let pending = self
                .rows
                .values()
                .filter(|h| *h.row.upstream == **upstream && h.row.priority == *priority)
                .map(|h| h.row.received_ms)
                .min();
            let oldest = match (committed, pending) {
                (Some(c), Some(p)) => (c as u64).min(p),
                (Some(c), None) => c as u64,
                (None, Some(p)) => p,
                (None, None) => crate::event::now_ms(),
            };
            out.push(super::Stats {
                upstream: upstream.clone(),
                priority: *priority,
                events: c.events,
                bytes: c.bytes,
                oldest_ms: oldest,
            });
        }
        out.sort_by(|a, b| (&a.upstream, b.priority).cmp(&(&b.upstream, a.priority)));
        out
    }

    /// Adjust the in-memory count of one upstream and priority.
    fn count(&mut self, upstream: &str, priority: Priority, events: i64, bytes: i64) {
        let c = self
            .counts
            .entry((upstream.to_string(), priority))
            .or_default();
        c.events = c.events.saturating_add_signed(events);
        c.bytes = c.bytes.saturating_add_signed(bytes);
    }
}

/// Delete evicted and acknowledged rows in `tx`. Returns what the acks
/// released (upstream, bytes, priority); evicted rows were subtracted when
/// they were chosen.
fn delete_rows(
    tx: &rusqlite::Transaction<'_>,
    evictions: &[i64],
    acks: &[i64],
) -> rusqlite::Result<Vec<(String, u64, Priority)>> {
    let mut delete = tx.prepare_cached(DELETE_ROW)?;
    for id in evictions {
        let _ = delete.query_map([id], |_| Ok(()))?.count();
    }
    let mut released = Vec::new();
    for id in acks {
        let rows = delete.query_map([id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (upstream, size, priority) = row?;
            released.push((upstream, size as u64, Priority::from_i64(priority)));
        }
    }
    Ok(released)
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

/// Events and bytes of one upstream and priority.
#[derive(Debug, Default, Clone, Copy)]
struct Count {
    events: u64,
    bytes: u64,
}

/// `<db>.reserve`, beside the database.
fn reserve_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".reserve");
    PathBuf::from(p)
}
