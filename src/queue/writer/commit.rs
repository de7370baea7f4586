//! When to commit and what: group commits of appends, acks and evictions,
//! and the small steps taken while commits fail.

use super::*;

/// Rows per transaction while recovering from failed commits.
const STEP: usize = 250;

impl Writer {
    /// When to consider the next commit, if there is work: at most one per
    /// commit interval (or retry delay), sooner when RAM holds too much.
    pub(super) fn next_round(&self) -> Option<Instant> {
        if !self.has_work() {
            return None;
        }
        if let Some(retry) = self.schedule.retry_at {
            return Some(retry);
        }
        Some(
            if self.ram_bytes > self.settings.memory_max || self.many_due() {
                Instant::now()
            } else {
                self.schedule.last_round + self.settings.commit_interval
            },
        )
    }

    /// `commit_max_events` rows wait and the oldest of them must be
    /// written (its upstream is down, or it waited `spill_after`): commit
    /// now rather than at the interval. Rows that may still be acknowledged
    /// from RAM are no reason to commit early.
    fn many_due(&self) -> bool {
        if self.rows.len() < self.settings.commit_max_events {
            return false;
        }
        let now = Instant::now();
        self.rows
            .values()
            .next()
            .is_some_and(|h| self.must_write(h, now))
    }

    /// Whether a held row is due to be written, whatever the memory: its
    /// upstream is not connected, or it waited `spill_after` (below the
    /// watermark, waiting is no reason to grow the file). The one rule
    /// `plan` and `many_due` share: if they disagreed, a round would find
    /// nothing to write and the next would be due at once again.
    fn must_write(&self, h: &Held, now: Instant) -> bool {
        !self.online.contains(&*h.row.upstream)
            || (!self.disk_low && now >= h.at + self.settings.spill_after)
    }

    /// Whether new rows must be refused (and counted): commits are
    /// failing and the in-memory allowance is used up. Fetches and acks are
    /// still served meanwhile, so the uplinks keep draining and shutdown
    /// never hangs on a full disk.
    pub(super) fn holding_full(&self) -> bool {
        // While commits work, rows are committed as fast as they come and
        // the bounded command channel is the backpressure; dropping here
        // would blame the queue for a burst it can take.
        self.schedule.retry_at.is_some() && self.ram_bytes >= self.settings.memory_max
    }

    /// `Cmd::Sync`: write everything held now.
    pub(super) fn sync(&mut self) -> rusqlite::Result<()> {
        if self.has_work() {
            let all = self.plan(true);
            self.commit_parts(&all)?;
        }
        self.schedule.last_round = Instant::now();
        self.schedule.retry_at = None;
        Ok(())
    }

    /// A round is due: commit what `plan` says (in small steps while
    /// commits fail), or schedule the retry.
    pub(super) fn commit_round(&mut self) {
        let interval = self.settings.commit_interval;
        let spill = self.plan(false);
        if spill.is_empty() && self.acks.is_empty() && self.evictions.is_empty() {
            // Rows that may still be acknowledged from RAM. A retry that
            // finds nothing to write waits like one that failed, or its
            // deadline, past, would be due again at once.
            let now = Instant::now();
            self.schedule.last_round = now;
            if let Some(retry) = &mut self.schedule.retry_at {
                *retry = now + interval.max(Duration::from_millis(500));
            }
            return;
        }
        // Commits are spaced start to start, so an event waits at most one
        // interval plus one commit, not an interval plus two (unless
        // commits take most of the interval, see below).
        let started = Instant::now();
        // After a failure, small steps: one big transaction may need more
        // WAL than the disk has left.
        let committed = match self.schedule.retry_at {
            Some(_) => self.commit_in_steps(&spill),
            None => self.commit_parts(&spill),
        };
        match committed {
            Ok(()) => {
                if self.schedule.retry_at.take().is_some() {
                    info!("queue commits work again");
                    // A failure right after is news, not a repeat to hold
                    // back for 30 s (a full disk can take one small commit
                    // and refuse the next).
                    self.schedule.last_warning = None;
                }
                // A commit as long as the interval (a slow SD card, a retry
                // in steps) would leave no time to gather the next batch:
                // commits of a few rows each, back to back. Keep at least a
                // quarter interval of gathering after each.
                let gather_from = Instant::now().checked_sub(interval - interval / 4);
                self.schedule.last_round = gather_from.map_or(started, |g| started.max(g));
                self.restore_reserve();
                self.compact_if_due();
            }
            Err(e) => self.commit_failed(e),
        }
    }

    /// Keep what is held and retry; deletes alone may still fit on a full
    /// disk, and they free pages for the appends.
    fn commit_failed(&mut self, e: rusqlite::Error) {
        let interval = self.settings.commit_interval;
        self.metrics.commit_failures.fetch_add(1, Relaxed);
        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
            self.release_reserve();
        }
        let freed = (!self.acks.is_empty() || !self.evictions.is_empty())
            && self.delete_in_chunks().is_ok();
        if self
            .schedule
            .last_warning
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(30))
        {
            let busy = matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            );
            match busy {
                true => {
                    error!(error = %e, pending = self.rows.len(), "queue commit waited 5 s for another program reading the file (an sqlite3 shell or script?) and gave up; holding events in memory and retrying (logged at most every 30 s)")
                }
                false => {
                    error!(error = %e, pending = self.rows.len(), "queue commit failed (disk full or I/O error?); holding events in memory and retrying (logged at most every 30 s)")
                }
            }
            self.schedule.last_warning = Some(Instant::now());
        }
        let wait = match freed {
            true => interval,
            false => interval.max(Duration::from_millis(500)),
        };
        self.schedule.retry_at = Some(Instant::now() + wait);
    }

    /// The ids of the rows to write now: all of them with `all`; else
    /// those that waited `spill_after` (unless free space is below the
    /// watermark), those of an upstream that is not connected, and the
    /// oldest beyond `memory_max`. A row acknowledged before that is never
    /// written. Oldest first, so per upstream the written rows are always a
    /// prefix of the held ones.
    pub(super) fn plan(&self, all: bool) -> Vec<i64> {
        if all {
            return self.rows.keys().copied().collect();
        }
        let any_down = self
            .rows
            .values()
            .any(|h| !self.online.contains(&*h.row.upstream));
        let now = Instant::now();
        let mut over = self.ram_bytes.saturating_sub(self.settings.memory_max);
        let mut ids = Vec::new();
        for (&id, held) in &self.rows {
            if over > 0 || self.must_write(held, now) {
                over = over.saturating_sub(held.row.size());
                ids.push(id);
            } else if !any_down {
                // Younger rows follow; none of them is due.
                break;
            }
        }
        ids
    }

    /// Write the held rows `spill` and apply pending evictions and acks,
    /// in one transaction. On failure nothing is lost: the work stays
    /// pending.
    pub(super) fn commit_parts(&mut self, spill: &[i64]) -> rusqlite::Result<()> {
        self.file_intact()?;
        let started = std::time::Instant::now();
        let (rows, written_max) = (&self.rows, &mut self.written_max);
        let (evictions, acks) = (&self.evictions, &self.acks);
        let segment_bytes = self.settings.segment_bytes;
        let released = self.tables.transact(&mut self.conn, |tx, tables| {
            for (&id, r) in spill.iter().filter_map(|id| Some((id, &rows.get(id)?.row))) {
                let max =
                    &mut written_max.entry(r.upstream.clone()).or_default()[r.priority.index()];
                *max = (*max).max(id);
                tables.insert(tx, id, r)?;
            }
            let released = mark_gone(tx, tables, evictions, acks)?;
            tables.reshape(tx, rows, segment_bytes)?;
            Ok(released)
        })?;
        self.metrics.commit_seconds.observe(started.elapsed());
        for (upstream, size, priority) in released {
            self.release(&upstream, priority, size);
        }
        self.metrics.commits.fetch_add(1, Relaxed);
        let mut written = 0;
        for id in spill {
            let Some(mut h) = self.rows.remove(id) else {
                continue;
            };
            h.row.settle();
            written += 1;
            self.ram_bytes -= h.row.size();
        }
        self.metrics.queued.fetch_add(written, Relaxed);
        self.note_db_len();
        self.acks.clear();
        self.evictions.clear();
        self.scheduled.clear();
        Ok(())
    }

    /// While commits fail (a full disk): the deletes first, then `spill`, in
    /// small transactions, so every step needs little space and the pages
    /// the deletes free are reused.
    pub(super) fn commit_in_steps(&mut self, spill: &[i64]) -> rusqlite::Result<()> {
        self.delete_in_chunks()?;
        for chunk in spill.chunks(STEP) {
            self.commit_parts(chunk)?;
        }
        Ok(())
    }

    /// On a full disk: commit the pending acks and evictions a chunk at a
    /// time, dropping the segments they empty. One transaction with all of
    /// them may need more journal than the disk has left, and would then
    /// never commit; chunks make progress, and the pages they free are
    /// reused by the appends.
    pub(super) fn delete_in_chunks(&mut self) -> rusqlite::Result<()> {
        const CHUNK: usize = STEP;
        while !self.acks.is_empty() || !self.evictions.is_empty() {
            self.file_intact()?;
            let ev = self.evictions.len().min(CHUNK);
            let ack = self.acks.len().min(CHUNK - ev);
            let started = std::time::Instant::now();
            let (rows, segment_bytes) = (&self.rows, self.settings.segment_bytes);
            let (evictions, acks) = (&self.evictions[..ev], &self.acks[..ack]);
            let released = self.tables.transact(&mut self.conn, |tx, tables| {
                let released = mark_gone(tx, tables, evictions, acks)?;
                tables.reshape(tx, rows, segment_bytes)?;
                Ok(released)
            })?;
            self.metrics.commit_seconds.observe(started.elapsed());
            self.metrics.commits.fetch_add(1, Relaxed);
            for (upstream, size, priority) in released {
                self.release(&upstream, priority, size);
            }
            for id in self.evictions.drain(..ev).chain(self.acks.drain(..ack)) {
                self.scheduled.remove(&id);
            }
            self.note_db_len();
        }
        Ok(())
    }
}

/// Record evicted and acknowledged rows as gone in `tx`. Returns what the
/// acks released (upstream, bytes, priority); evicted rows were subtracted
/// when they were chosen.
fn mark_gone(
    tx: &rusqlite::Transaction<'_>,
    tables: &mut Tables,
    evictions: &[i64],
    acks: &[i64],
) -> rusqlite::Result<Vec<(String, u64, Priority)>> {
    for &id in evictions {
        tables.gone(tx, id)?;
    }
    let mut released = Vec::new();
    for &id in acks {
        released.extend(tables.gone(tx, id)?);
    }
    Ok(released)
}

/// When the writer last committed and when it tries again.
pub(super) struct Schedule {
    /// The last commit, or the last look that found nothing to write.
    pub(super) last_round: Instant,
    /// Set while commits fail (disk full, I/O error): when to try again.
    pub(super) retry_at: Option<Instant>,
    /// The last "commit failed" ERROR (at most one per 30 s).
    pub(super) last_warning: Option<Instant>,
}

impl Schedule {
    /// A first round is due at once.
    pub(super) fn new(interval: Duration) -> Schedule {
        Schedule {
            last_round: Instant::now() - interval,
            retry_at: None,
            last_warning: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While commits fail, a retry that finds nothing left to write (its
    /// rows were acknowledged from RAM meanwhile) waits for the next one:
    /// a deadline left in the past made every turn of the loop a round, and
    /// the writer answered no command.
    fn writer(path: &Path, segment_bytes: u64) -> Writer {
        let metrics = Arc::new(Metrics::new(&["a".to_string()]));
        let conn = crate::queue::schema::open_or_recover(path, &metrics).unwrap();
        let settings = QueueSettings {
            commit_interval: Duration::from_millis(5),
            commit_max_events: 100,
            max_size: BTreeMap::from([("a".into(), u64::MAX)]),
            min_free_disk: 0,
            sweep_interval: Duration::from_secs(10),
            memory_max: 1 << 20,
            spill_after: Duration::from_secs(3600),
            segment_bytes,
        };
        Writer::new(conn, path, settings, metrics).unwrap()
    }

    /// Twelve 2-byte rows committed into the first segment (a new one
    /// starts after them), and the first eight acknowledged.
    fn first_segment_two_thirds_gone(w: &mut Writer) {
        for n in 0..12 {
            w.admit(NewRow::for_test("a", n));
        }
        let all = w.plan(true);
        w.commit_parts(&all).unwrap();
        for id in all.iter().take(8) {
            w.ack(*id);
        }
    }

    #[test]
    fn a_retry_with_nothing_left_to_write_is_rescheduled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let mut w = writer(&path, crate::queue::SEGMENT_BYTES);
        // A row that may still be acknowledged from RAM (its upstream is
        // connected, it has not waited spill_after): nothing to write.
        w.online.insert("a".into());
        w.admit(NewRow::for_test("a", 0));
        // A commit failed a while ago; the retry is due.
        w.schedule.retry_at = Some(Instant::now() - Duration::from_secs(1));
        assert!(w.plan(false).is_empty());
        w.commit_round();
        let next = w.next_round().expect("a round, for the held row");
        assert!(next > Instant::now(), "the next round is not due at once");
    }

    /// A daemon that writes nothing more (its upstreams keep up) still
    /// compacts a sparse segment: at the sweep, not only at a commit
    /// (found by a hostile run: an idle segment stayed as it was).
    #[test]
    fn the_sweep_compacts_a_sparse_idle_segment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        // Twelve 2-byte rows in one commit fill the first segment.
        let mut w = writer(&path, 20);
        first_segment_two_thirds_gone(&mut w);
        w.commit_parts(&[]).unwrap();
        let rows = |w: &Writer| -> i64 {
            let (_, first) = crate::queue::segments::tables(&w.conn).unwrap()[0].clone();
            w.conn
                .query_row(&format!("SELECT COUNT(*) FROM {first}"), [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(rows(&w), 12, "gone rows stay until compacted");
        w.tables.age(tables::COMPACT_IDLE);
        w.sweep();
        assert_eq!(rows(&w), 4, "the sweep compacted it to its live rows");
    }

    /// After "commits work again", the next failure is logged at once: a
    /// full disk that takes one small commit and refuses the next had the
    /// 30 s rate limit hide that (found by a hostile run: the INFO stood
    /// for 30 s while every commit failed).
    #[test]
    fn a_failure_after_commits_work_again_is_not_held_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let mut w = writer(&path, crate::queue::SEGMENT_BYTES);
        w.admit(NewRow::for_test("a", 1));
        // A commit failed and was logged a moment ago; the retry is due.
        w.schedule.retry_at = Some(Instant::now() - Duration::from_secs(1));
        w.schedule.last_warning = Some(Instant::now());
        w.commit_round();
        assert!(w.schedule.retry_at.is_none(), "the retry committed");
        assert!(
            w.schedule.last_warning.is_none(),
            "the next failure is news"
        );
    }

    /// A compaction that cannot be done (on a full disk, the copy may not
    /// fit) takes no commit of acks or rows down with it: it has its own
    /// transaction. Inside the commit's, a failing compaction made every
    /// commit fail, and the deletes that would free the disk never landed.
    #[test]
    fn a_compaction_that_fails_does_not_fail_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let mut w = writer(&path, 20);
        first_segment_two_thirds_gone(&mut w);
        // One more row, in the next segment.
        w.admit(NewRow::for_test("a", 12));
        let next = w.plan(true);
        w.commit_parts(&next).unwrap();
        w.tables.age(tables::COMPACT_IDLE);
        assert!(
            w.tables.sparse(Instant::now()).is_some(),
            "a compaction is due"
        );
        // The compaction's staging table cannot be created.
        w.conn
            .execute_batch("CREATE TEMP TABLE compacting (x);")
            .unwrap();
        // An ack in the other segment: the sparse one stays idle.
        w.ack(next[0]);
        w.commit_parts(&[]).expect("the ack commits");
        w.compact_if_due();
        assert!(
            w.tables.sparse(Instant::now()).is_none(),
            "postponed after failing"
        );
        let left: i64 = w
            .conn
            .query_row("SELECT COUNT(*) FROM queue", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 4, "the ack landed; nothing else changed");
    }
}
