//! What the uplinks read: rows in send order (written ones, then those
//! still only in RAM), and requests that wait for rows.

use bytes::Bytes;

use super::*;

/// Rows of one upstream and priority in one segment, in send order.
fn select_send_order(table: &str) -> String {
    format!(
        "SELECT id, event_id, topic, qos, priority, received_ms, payload, expires_ms, props FROM {table} \
         WHERE upstream = ?1 AND priority = ?2 AND id > ?3 AND id <= ?6 AND (expires_ms IS NULL OR expires_ms > ?4) \
         AND id NOT IN (SELECT id FROM gone) ORDER BY id LIMIT ?5"
    )
}

/// A row's `props`: NULL for most rows. One this version cannot read is
/// sent without them (the payload is the event; losing it over metadata
/// would be worse), with a WARN.
fn props(v: rusqlite::types::ValueRef<'_>) -> Option<Arc<Properties>> {
    use rusqlite::types::ValueRef;
    let parsed = match v {
        ValueRef::Null => return None,
        ValueRef::Blob(b) => Properties::from_sql(b),
        _ => Err("row properties are not a BLOB".into()),
    };
    match parsed {
        Ok(p) => Some(Arc::new(p)),
        Err(e) => {
            warn!("{e}; the row is sent without them");
            None
        }
    }
}

impl Writer {
    /// The highest id of `upstream` an uplink can read now (0 if none).
    pub(super) fn last_id(&self, upstream: &str) -> i64 {
        // The last segment with a row of it has the highest.
        let committed = self
            .tables
            .iter()
            .rev()
            .find_map(|seg| {
                let sql = format!(
                    "SELECT MAX(id) FROM {} WHERE upstream = ?1 AND id NOT IN (SELECT id FROM gone)",
                    seg.name
                );
                self.conn
                    .query_row(&sql, [upstream], |r| r.get::<_, Option<i64>>(0))
                    .ok()
                    .flatten()
            })
            .unwrap_or(0);
        let held = self
            .rows
            .iter()
            .rev()
            .find(|(_, h)| &*h.row.upstream == upstream)
            .map_or(0, |(&id, _)| id);
        committed.max(held)
    }

    pub(super) fn fetch(
        &mut self,
        upstream: &str,
        after: Cursor,
        until: i64,
        limit: usize,
    ) -> Result<Vec<Row>, QueueError> {
        let now = now_ms() as i64;
        let mut out = Vec::with_capacity(limit);
        let read = |e: rusqlite::Error| QueueError::Read(e.to_string());
        for priority in Priority::SEND_ORDER {
            let mut cursor = after.0[priority.index()];
            let on_disk = self
                .written_max
                .get(upstream)
                .is_some_and(|m| m[priority.index()] > cursor);
            let segments = self.tables.after(cursor).filter(|_| on_disk);
            'segments: for seg in segments {
                let mut stmt = self
                    .conn
                    .prepare_cached(&select_send_order(&seg.name))
                    .map_err(read)?;
                while out.len() < limit {
                    let want = limit - out.len();
                    let batch: Vec<Row> = stmt
                        .query_map(
                            params![upstream, priority.as_i64(), cursor, now, want as i64, until],
                            |r| {
                                Ok(Row {
                                    id: r.get(0)?,
                                    event_id: crate::queue::schema::event_id_from(r.get_ref(1)?)?,
                                    topic: r.get(2)?,
                                    qos: r.get(3)?,
                                    priority: Priority::from_i64(r.get(4)?),
                                    received_ms: r.get::<_, i64>(5)? as u64,
                                    payload: Bytes::from(r.get::<_, Vec<u8>>(6)?),
                                    expires_ms: r.get::<_, Option<i64>>(7)?.map(|e| e as u64),
                                    properties: props(r.get_ref(8)?),
                                })
                            },
                        )
                        .and_then(|rows| rows.collect())
                        .map_err(read)?;
                    let exhausted = batch.len() < want;
                    if let Some(last) = batch.last() {
                        cursor = last.id;
                    }
                    // Rows acked or evicted but not yet gone are hidden.
                    out.extend(
                        batch
                            .into_iter()
                            .filter(|r| !self.scheduled.contains(&r.id)),
                    );
                    if exhausted {
                        // On to the next segment.
                        break;
                    }
                }
                if out.len() >= limit || seg.max_id >= until {
                    break 'segments;
                }
            }
            // Then the rows still only in RAM, all younger (rows are
            // written oldest first).
            if out.len() < limit {
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
                            payload: h.row.payload.clone(),
                            properties: h.row.properties.clone(),
                        });
                    out.extend(held);
                }
            }
        }
        Ok(out)
    }

    /// Answer `upstream`'s waiting uplink if it has rows to read now. Its
    /// request stays if not, and goes if the uplink has gone.
    pub(super) fn answer(&mut self, upstream: &str) {
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
}
