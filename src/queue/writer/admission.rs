//! What may stay: a new row against its upstream's cap and the disk's
//! watermark (with the overflow policy), eviction, acks, and expiry.

use super::*;

/// Eviction candidates of one upstream and priority in a segment, oldest first.
fn select_eviction_order(table: &str) -> String {
    format!(
        "SELECT id, size FROM {table} WHERE upstream = ?1 AND priority = ?2 AND id > ?3 \
         AND id NOT IN (SELECT id FROM gone) ORDER BY id LIMIT 256"
    )
}

/// Expired rows of a segment that are not gone yet.
fn select_expired(table: &str) -> String {
    format!(
        "SELECT id, upstream, priority, size FROM {table} WHERE expires_ms IS NOT NULL \
         AND expires_ms <= ?1 AND id NOT IN (SELECT id FROM gone)"
    )
}

impl Writer {
    /// An upstream acknowledged row `id`: forget it if it is still only in
    /// RAM, else delete it at the next commit.
    pub(super) fn ack(&mut self, id: i64) {
        if !self.traced.is_empty()
            && let Some(upstream) = self.traced.remove(&id)
        {
            self.metrics.trace.row_acked(id, &upstream);
        }
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

    /// Accept a new row if it fits its upstream's cap (and the disk's
    /// watermark), applying the route's overflow policy if not. Returns
    /// whether it was accepted.
    pub(super) fn admit(&mut self, mut row: NewRow) -> bool {
        let size = row.size();
        let used = self.used(&row.upstream);
        let max = self
            .settings
            .max_size
            .get(&*row.upstream)
            .copied()
            .unwrap_or(u64::MAX);
        // Below the free-space watermark the queue does not grow past what
        // it held when the disk went low (SQLite reuses the pages of dropped
        // and compacted segments);
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
        self.count(&row.upstream, row.priority, 1, size as i64);
        self.admitted_since_check += size;
        self.ram_bytes += size;
        let id = self.next_id;
        self.next_id += 1;
        if row.traced && self.traced.len() < super::TRACED_ROWS {
            self.metrics
                .trace
                .row_queued(id, &row.upstream, &row.event_id);
            self.traced.insert(id, row.upstream.clone());
        }
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
    pub(super) fn evict(
        &mut self,
        upstream: &str,
        max: Priority,
        need: u64,
        headroom: u64,
    ) -> bool {
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
            'committed: for seg in self.tables.iter() {
                while freed < target(freed) {
                    let batch: Vec<(i64, i64)> = match self
                        .conn
                        .prepare_cached(&select_eviction_order(&seg.name))
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
                        // On to the next segment.
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
                if freed >= target(freed) {
                    break;
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

    pub(super) fn count_evicted(&mut self, upstream: &str, priority: Priority, size: u64) {
        self.release(upstream, priority, size);
        if let Some(u) = self.uplink(upstream) {
            u.evicted[priority.index()].fetch_add(1, Relaxed);
        }
    }

    /// Expired rows go (into `gone`, and their segments with them once
    /// empty), counted per upstream and priority.
    pub(super) fn sweep(&mut self) {
        self.last_sweep = Instant::now();
        if self.file_intact().is_err() {
            return;
        }
        let expired = match self.sweep_file(now_ms() as i64) {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "queue: expiry sweep failed; will retry");
                return;
            }
        };
        // Here too, so a daemon that writes nothing (its upstreams keep
        // up) still gives a sparse segment's space back.
        self.compact_if_due();
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

    /// The written rows that expired by `now`, recorded as gone in one
    /// transaction.
    fn sweep_file(&mut self, now: i64) -> rusqlite::Result<Vec<(i64, String, i64, i64)>> {
        let mut expired = Vec::new();
        for seg in self.tables.iter() {
            let mut stmt = self.conn.prepare_cached(&select_expired(&seg.name))?;
            let rows =
                stmt.query_map([now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            for row in rows {
                expired.push(row?);
            }
        }
        if expired.is_empty() {
            return Ok(expired);
        }
        let (rows, segment_bytes) = (&self.rows, self.settings.segment_bytes);
        self.tables.transact(&mut self.conn, |tx, tables| {
            for (id, ..) in &expired {
                tables.gone(tx, *id)?;
            }
            tables.reshape(tx, rows, segment_bytes)
        })?;
        self.note_db_len();
        Ok(expired)
    }
}

impl Writer {
    /// Compact one idle sparse segment, in a transaction of its own (see
    /// `Tables::compact_one`); not while commits fail. A compaction that
    /// fails is tried again a `COMPACT_IDLE` later.
    pub(super) fn compact_if_due(&mut self) {
        let now = Instant::now();
        if self.schedule.retry_at.is_some() || self.damaged || self.tables.sparse(now).is_none() {
            return;
        }
        let done = self
            .tables
            .transact(&mut self.conn, |tx, tables| tables.compact_one(tx, now));
        match done {
            Ok(_) => self.note_db_len(),
            Err(e) => {
                self.tables.postpone(now);
                warn!(error = %e, "queue: compacting a segment failed (disk full?); its rows are as they were, and it is tried again in a minute");
            }
        }
    }
}
