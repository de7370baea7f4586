//! The segment tables as the writer knows them (see `queue::segments`):
//! which segment holds which ids, how many of its rows are not gone, and
//! when to start a new one or drop an old one. Changed inside the
//! caller's transaction; the caller keeps a copy to restore if the
//! transaction fails.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::{Held, NewRow, Priority};
use crate::queue::segments;

/// Segments at most: the view is a UNION ALL of them, and SQLite allows
/// 500 arms. With a new segment at 1/64 of what is written, a few
/// gigabytes of backlog need about 250; past this the last one grows.
const MAX_SEGMENTS: usize = 400;

/// One segment table: ids from its first (its key in `Tables`) up to the
/// next segment's first.
#[derive(Debug, Clone)]
pub(super) struct Segment {
    pub(super) name: String,
    /// Rows written into it, gone or not.
    rows: u64,
    /// Rows in it that are not gone: it is dropped when this is 0.
    live: u64,
    /// Bytes (`size`) written into it: a new segment starts past `segment_bytes`.
    bytes: u64,
    /// Bytes of the rows that are not gone.
    live_bytes: u64,
    /// When a row in it last went (or it was loaded, or compacted).
    changed: Instant,
    /// The highest id written into it (0 if none).
    pub(super) max_id: i64,
}

/// A segment less than half of which is live, and where nothing went for
/// this long, is compacted: a few rows of a stalled upstream (or of a low
/// priority kept behind a normal one) would otherwise keep a whole segment
/// of gone rows on the disk, while caps and the free-disk watermark count
/// only what is queued. Not while rows keep going from it (a drain in
/// progress empties it for free).
pub(super) const COMPACT_IDLE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default)]
pub(super) struct Tables {
    by_first: BTreeMap<i64, Segment>,
    /// The highest id in `gone` at start: new ids start above it too, or a
    /// gone id left in a range whose table was removed by hand would hide
    /// a new row.
    gone_max: i64,
}

impl Tables {
    /// What the file holds, at start.
    pub(super) fn load(conn: &Connection) -> rusqlite::Result<Tables> {
        let mut by_first = BTreeMap::new();
        for (first, name) in segments::tables(conn)? {
            let (rows, bytes, max_id): (i64, i64, i64) = conn.query_row(
                &format!(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(id), 0) FROM {name}"
                ),
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            let (live, live_bytes): (i64, i64) = conn.query_row(
                &format!(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM {name} WHERE id NOT IN (SELECT id FROM gone)"
                ),
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let seg = Segment {
                name,
                rows: rows as u64,
                live: live as u64,
                bytes: bytes as u64,
                live_bytes: live_bytes as u64,
                changed: Instant::now(),
                max_id,
            };
            by_first.insert(first, seg);
        }
        // Ids of no segment's range: left by segment tables removed by hand
        // (to clear a stuck queue). Kept, they would hide new rows given
        // the same ids.
        let first = by_first.keys().next().copied().unwrap_or(i64::MAX);
        conn.execute("DELETE FROM gone WHERE id < ?1", [first])?;
        let gone_max = conn.query_row("SELECT COALESCE(MAX(id), 0) FROM gone", [], |r| r.get(0))?;
        Ok(Tables { by_first, gone_max })
    }

    /// Run `f` in a transaction on `conn` and commit it. If anything fails
    /// the transaction rolls back, and the tables are put back as they were
    /// with it: what they say always matches the file.
    pub(super) fn transact<T>(
        &mut self,
        conn: &mut Connection,
        f: impl FnOnce(&Transaction<'_>, &mut Tables) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let before = self.clone();
        let done = conn.transaction().and_then(|tx| {
            let out = f(&tx, self)?;
            tx.commit()?;
            Ok(out)
        });
        if done.is_err() {
            *self = before;
        }
        done
    }

    /// Above every id in the file and every segment's first: where new ids start.
    pub(super) fn above(&self) -> i64 {
        self.by_first
            .iter()
            .map(|(&first, s)| first.max(s.max_id + 1))
            .max()
            .unwrap_or(1)
            .max(self.gone_max + 1)
    }

    /// The segments in id order.
    pub(super) fn iter(&self) -> impl DoubleEndedIterator<Item = &Segment> {
        self.by_first.values()
    }

    /// The segments that may hold ids above `after`, in id order.
    pub(super) fn after(&self, after: i64) -> impl Iterator<Item = &Segment> {
        let from = self
            .by_first
            .range(..=after.saturating_add(1))
            .next_back()
            .map_or(i64::MIN, |(&f, _)| f);
        self.by_first
            .range(from..)
            .map(|(_, s)| s)
            .filter(move |s| s.max_id > after)
    }

    /// The segment whose range holds `id`.
    fn holding(&mut self, id: i64) -> Option<&mut Segment> {
        self.by_first.range_mut(..=id).next_back().map(|(_, s)| s)
    }

    /// Write a held row into the segment its id belongs to (the last one
    /// for every new id; an older one for a row that waited in RAM while
    /// younger ones were written).
    pub(super) fn insert(
        &mut self,
        tx: &Transaction<'_>,
        id: i64,
        r: &NewRow,
    ) -> rusqlite::Result<()> {
        if self.by_first.is_empty() {
            // Only a file whose tables were removed by hand gets here.
            self.start(tx, 0)?;
        }
        let seg = self
            .holding(id)
            .expect("a segment's range holds every id at or above the first one's");
        let mut insert = tx.prepare_cached(&format!(
            "INSERT INTO {} (id, upstream, event_id, topic, qos, priority, received_ms, expires_ms, size, payload, props) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            seg.name
        ))?;
        insert.execute(params![
            id,
            &*r.upstream,
            crate::queue::schema::event_id_to_sql(&r.event_id),
            r.topic,
            r.qos,
            r.priority.as_i64(),
            r.received_ms as i64,
            r.expires_ms.map(|e| e as i64),
            r.size() as i64,
            &r.payload[..],
            r.properties.as_ref().map(|p| p.to_sql()),
        ])?;
        seg.rows += 1;
        seg.live += 1;
        seg.bytes += r.size();
        seg.live_bytes += r.size();
        seg.max_id = seg.max_id.max(id);
        Ok(())
    }

    /// Row `id` has left the queue (acknowledged, evicted, expired): record
    /// it in `gone`. Returns its upstream, size and priority if it was in
    /// the file and not gone already.
    pub(super) fn gone(
        &mut self,
        tx: &Transaction<'_>,
        id: i64,
    ) -> rusqlite::Result<Option<(String, u64, Priority)>> {
        let Some(seg) = self.holding(id) else {
            return Ok(None);
        };
        let found = tx
            .prepare_cached(&format!(
                "SELECT upstream, size, priority FROM {} WHERE id = ?1 AND id NOT IN (SELECT id FROM gone)",
                seg.name
            ))?
            .query_row([id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    Priority::from_i64(r.get(2)?),
                ))
            })
            .optional()?;
        if let Some((_, size, _)) = &found {
            tx.prepare_cached("INSERT INTO gone (id) VALUES (?1)")?
                .execute([id])?;
            seg.live -= 1;
            seg.live_bytes = seg.live_bytes.saturating_sub(*size);
            seg.changed = Instant::now();
        }
        Ok(found)
    }

    /// After a commit's writes and gone rows: start a new segment once the
    /// last holds `segment_bytes`, drop every other segment with no row
    /// left (and none still held in RAM that belongs to its range), and
    /// rebuild the view if anything changed. (Compaction has a transaction
    /// of its own: `compact_one`.)
    pub(super) fn reshape(
        &mut self,
        tx: &Transaction<'_>,
        held: &BTreeMap<i64, Held>,
        segment_bytes: u64,
    ) -> rusqlite::Result<()> {
        let mut changed = false;
        if let Some((_, last)) = self.by_first.last_key_value()
            && last.rows > 0
            && last.bytes >= segment_bytes.max(self.bytes_written() / 64)
            && self.by_first.len() < MAX_SEGMENTS
        {
            let first = last.max_id + 1;
            self.start(tx, first)?;
            changed = true;
        }
        let firsts: Vec<i64> = self.by_first.keys().copied().collect();
        for pair in firsts.windows(2) {
            let (first, next) = (pair[0], pair[1]);
            let seg = &self.by_first[&first];
            if seg.live > 0 || held.range(first..next).next().is_some() {
                continue;
            }
            tx.execute_batch(&format!("DROP TABLE {};", seg.name))?;
            tx.prepare_cached("DELETE FROM gone WHERE id >= ?1 AND id < ?2")?
                .execute([first, next])?;
            self.by_first.remove(&first);
            changed = true;
        }
        if changed {
            tx.execute_batch(&segments::view_sql(
                self.by_first.values().map(|s| s.name.as_str()),
            ))?;
        }
        Ok(())
    }

    /// Compact one idle sparse segment, if any (see `COMPACT_IDLE`), in
    /// `tx`, which should hold nothing else: on a full disk the copy may
    /// not fit, and must not take a commit of acks or rows down with it.
    /// Returns whether one was.
    pub(super) fn compact_one(
        &mut self,
        tx: &Transaction<'_>,
        now: Instant,
    ) -> rusqlite::Result<bool> {
        let Some(first) = self.sparse(now) else {
            return Ok(false);
        };
        self.compact(tx, first, now)?;
        tx.execute_batch(&segments::view_sql(
            self.by_first.values().map(|s| s.name.as_str()),
        ))?;
        Ok(true)
    }

    /// Try the segment `compact_one` would take again only after another
    /// `COMPACT_IDLE` (its compaction failed).
    pub(super) fn postpone(&mut self, now: Instant) {
        if let Some(first) = self.sparse(now)
            && let Some(s) = self.by_first.get_mut(&first)
        {
            s.changed = now;
        }
    }

    /// A segment to compact now (see `COMPACT_IDLE`): the newest such,
    /// never the last (rows are written into it).
    pub(super) fn sparse(&self, now: Instant) -> Option<i64> {
        self.by_first
            .iter()
            .rev()
            .skip(1)
            .find(|(_, s)| {
                s.live > 0
                    && s.live_bytes * 2 < s.bytes
                    && now.saturating_duration_since(s.changed) >= COMPACT_IDLE
            })
            .map(|(&first, _)| first)
    }

    /// As if nothing had gone from any segment for `by` longer.
    #[cfg(test)]
    pub(super) fn age(&mut self, by: Duration) {
        for s in self.by_first.values_mut() {
            s.changed -= by;
        }
    }

    /// Rewrite segment `first` with only its live rows (same name, same
    /// range), and forget its gone ids. The rows pass through a temporary
    /// table, so the segment is created again under its own names.
    fn compact(&mut self, tx: &Transaction<'_>, first: i64, now: Instant) -> rusqlite::Result<()> {
        let next = self
            .by_first
            .range(first + 1..)
            .next()
            .map_or(i64::MAX, |(&f, _)| f);
        let seg = self.by_first.get_mut(&first).expect("a listed segment");
        let t = &seg.name;
        tx.execute_batch(&format!(
            "CREATE TEMP TABLE compacting AS SELECT * FROM {t} WHERE id NOT IN (SELECT id FROM gone);
             DROP TABLE {t};
             {}
             INSERT INTO {t} SELECT * FROM temp.compacting;
             DROP TABLE temp.compacting;",
            segments::create_sql(first)
        ))?;
        tx.prepare_cached("DELETE FROM gone WHERE id >= ?1 AND id < ?2")?
            .execute([first, next])?;
        seg.rows = seg.live;
        seg.bytes = seg.live_bytes;
        seg.changed = now;
        Ok(())
    }

    /// Create an empty segment starting at `first` (the view is the caller's).
    fn start(&mut self, tx: &Transaction<'_>, first: i64) -> rusqlite::Result<()> {
        tx.execute_batch(&segments::create_sql(first))?;
        self.by_first.insert(
            first,
            Segment {
                name: segments::name(first),
                rows: 0,
                live: 0,
                bytes: 0,
                live_bytes: 0,
                changed: Instant::now(),
                max_id: 0,
            },
        );
        if self.by_first.len() == 1 {
            tx.execute_batch(&segments::view_sql([segments::name(first).as_str()]))?;
        }
        Ok(())
    }

    /// Bytes in the file's segments, gone rows included, roughly: a new
    /// segment starts at 1/64 of it at least, so a large backlog is at most
    /// a few hundred tables.
    fn bytes_written(&self) -> u64 {
        self.by_first.values().map(|s| s.bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// However many rows come, the view stays within SQLite's limit of
    /// 500 UNION ALL arms: past MAX_SEGMENTS the last segment grows.
    #[test]
    fn segments_stop_at_max_segments_and_the_view_still_reads_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::queue::open_db(&dir.path().join("q.db")).unwrap();
        let mut tables = Tables::load(&conn).unwrap();
        let tx = conn.transaction().unwrap();
        // Segments of at least one row, and at least 1/64 of what is
        // written: 20,000 two-byte rows would make about 430.
        let rows = 20_000;
        for id in 1..=rows {
            tables
                .insert(&tx, id, &NewRow::for_test("a", id as u8))
                .unwrap();
            tables.reshape(&tx, &BTreeMap::new(), 1).unwrap();
        }
        assert_eq!(tables.by_first.len(), MAX_SEGMENTS);
        let in_view: i64 = tx
            .query_row("SELECT COUNT(*) FROM queue", [], |r| r.get(0))
            .unwrap();
        assert_eq!(in_view, rows);
        tx.commit().unwrap();
    }

    /// A segment is kept while a row held in RAM belongs to its range, and
    /// a held row is written into the segment its id belongs to, so ranges
    /// never overlap.
    #[test]
    fn a_held_row_keeps_its_segment_and_is_written_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::queue::open_db(&dir.path().join("q.db")).unwrap();
        let mut tables = Tables::load(&conn).unwrap();
        let tx = conn.transaction().unwrap();
        // Row 2 waits in RAM while 1 and 3 are written; 3 fills the segment.
        tables.insert(&tx, 1, &NewRow::for_test("a", 1)).unwrap();
        tables.insert(&tx, 3, &NewRow::for_test("a", 3)).unwrap();
        tables.reshape(&tx, &BTreeMap::new(), 2).unwrap();
        assert_eq!(tables.by_first.keys().copied().collect::<Vec<_>>(), [0, 4]);
        tables.gone(&tx, 1).unwrap().unwrap();
        tables.gone(&tx, 3).unwrap().unwrap();
        let held = BTreeMap::from([(
            2,
            Held {
                row: NewRow::for_test("a", 2),
                at: std::time::Instant::now(),
            },
        )]);
        tables.reshape(&tx, &held, 2).unwrap();
        assert!(tables.by_first.contains_key(&0), "kept for row 2");
        tables.insert(&tx, 2, &NewRow::for_test("a", 2)).unwrap();
        let in_first: i64 = tx
            .query_row("SELECT COUNT(*) FROM queue_0 WHERE id = 2", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(in_first, 1);
        tables.gone(&tx, 2).unwrap().unwrap();
        tables.reshape(&tx, &BTreeMap::new(), 2).unwrap();
        assert_eq!(tables.by_first.keys().copied().collect::<Vec<_>>(), [4]);
        assert_eq!(tables.gone(&tx, 2).unwrap(), None, "gone with its segment");
        tx.commit().unwrap();
    }

    /// A segment kept by one row of a stalled upstream among many gone
    /// ones is rewritten with only that row once nothing has gone from it
    /// for COMPACT_IDLE; not before (a drain in progress empties it for
    /// free), and the row reads back as before. Before, the segment's
    /// gone rows stayed on the disk as long as the one row did.
    #[test]
    fn an_idle_sparse_segment_is_compacted_to_its_live_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let mut conn = crate::queue::open_db(&path).unwrap();
        let mut tables = Tables::load(&conn).unwrap();
        let tx = conn.transaction().unwrap();
        for id in 1..=10 {
            tables
                .insert(&tx, id, &NewRow::for_test("a", id as u8))
                .unwrap();
        }
        // Segment [0, 11) is full; rows go on in the next one.
        tables.reshape(&tx, &BTreeMap::new(), 10).unwrap();
        tables.insert(&tx, 11, &NewRow::for_test("a", 11)).unwrap();
        for id in 1..=10 {
            if id != 4 {
                tables.gone(&tx, id).unwrap().unwrap();
            }
        }
        let rows_in = |tx: &Transaction<'_>| -> i64 {
            tx.query_row("SELECT COUNT(*) FROM queue_0", [], |r| r.get(0))
                .unwrap()
        };
        assert!(!tables.compact_one(&tx, Instant::now()).unwrap());
        assert_eq!(rows_in(&tx), 10, "not while rows are going from it");
        let later = Instant::now() + COMPACT_IDLE + Duration::from_secs(1);
        assert!(tables.compact_one(&tx, later).unwrap());
        assert_eq!(rows_in(&tx), 1, "only the live row is left");
        let gone: i64 = tx
            .query_row("SELECT COUNT(*) FROM gone WHERE id < 11", [], |r| r.get(0))
            .unwrap();
        assert_eq!(gone, 0, "its gone ids went with the rewrite");
        let ids: Vec<i64> = tx
            .prepare("SELECT id FROM queue ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(ids, [4, 11]);
        // The live row goes as any row does, and the segment with it.
        tables.gone(&tx, 4).unwrap().unwrap();
        tables.reshape(&tx, &BTreeMap::new(), 10).unwrap();
        assert_eq!(tables.by_first.keys().copied().collect::<Vec<_>>(), [11]);
        tx.commit().unwrap();
    }
}
