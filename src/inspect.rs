//! `edgeferry queue stats` and `edgeferry queue export`: read the queue file
//! directly, read-only, safe while the daemon runs (readers see only
//! committed rows; each read is short, so the daemon's commits wait at
//! most that long).

use std::io::Write;
use std::path::Path;

use rusqlite::OptionalExtension;
use serde_json::json;

use crate::event::now_ms;
use crate::queue::{self, Priority, QueueError};
use crate::units::ByteSize;

/// What `edgeferry queue` shows.
pub enum Show<'a> {
    Stats,
    /// Every event (of one upstream), as JSON lines.
    Export {
        upstream: Option<&'a str>,
    },
}

/// `edgeferry queue stats|export` on the queue file at `db`. A reader that
/// closes the pipe early (`| head`) is not an error.
pub fn command(db: &Path, show: Show<'_>, out: &mut impl Write) -> Result<(), InspectError> {
    if !db.exists() {
        return Err(InspectError::NoQueue(db.to_path_buf()));
    }
    let result = match show {
        Show::Stats => stats(db, out),
        Show::Export { upstream } => export(db, upstream, out)
            .map(|n| eprintln!("{n} events exported from {}", db.display())),
    };
    match result {
        Err(InspectError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// One line per upstream and priority: events, bytes, age of the oldest.
pub fn stats(db: &Path, out: &mut impl Write) -> Result<(), InspectError> {
    let stats = queue::stats_of_file(db)?;
    writeln!(
        out,
        "{:<16} {:<8} {:>10} {:>12} {:>14}",
        "UPSTREAM", "PRIORITY", "EVENTS", "BYTES", "OLDEST"
    )?;
    if stats.is_empty() {
        writeln!(out, "(queue empty: {})", db.display())?;
        return Ok(());
    }
    let now = now_ms();
    for s in &stats {
        let age = std::time::Duration::from_secs(now.saturating_sub(s.oldest_ms) / 1000);
        writeln!(
            out,
            "{:<16} {:<8} {:>10} {:>12} {:>14}",
            s.upstream,
            s.priority.name(),
            s.events,
            ByteSize(s.bytes).to_string(),
            format!("{} ago", humantime::format_duration(age)),
        )?;
    }
    Ok(())
}

/// Every queued event as one JSON object per line, in send order per
/// upstream (priority, then id). Payloads that are UTF-8 go as `payload`,
/// others as `payload_hex`. Returns the number of events written.
pub fn export(
    db: &Path,
    upstream: Option<&str>,
    out: &mut impl Write,
) -> Result<u64, InspectError> {
    let conn = queue::open_read_only(db)?;
    let sql_err = |e: rusqlite::Error| InspectError::Read(e.to_string());
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap_or(0);
    // Since schema 4 the rows are in segment tables (the `queue` view
    // would sort the whole backlog in one long read): one segment at a
    // time, each read into memory before it is written out, so a slow
    // pipe never holds the file. An older file, read before the daemon
    // migrated it, has its one table (and before schema 3 no props).
    let readable = queue::segments::readable(&conn, version).map_err(sql_err)?;
    let props = if version >= 3 { "props" } else { "NULL" };
    // The upstreams, one index seek each (not a scan of the segment).
    let mut upstreams = std::collections::BTreeSet::new();
    for table in &readable.tables {
        let sql = format!(
            "SELECT upstream FROM {table} WHERE upstream > ?1 AND (?2 IS NULL OR upstream = ?2) \
             ORDER BY upstream LIMIT 1"
        );
        let mut after = String::new();
        loop {
            let next = conn
                .query_row(&sql, rusqlite::params![after, upstream], |r| {
                    r.get::<_, String>(0)
                })
                .optional();
            match next {
                Ok(Some(name)) => {
                    after.clone_from(&name);
                    upstreams.insert(name);
                }
                Ok(None) => break,
                // The daemon dropped it meanwhile: all its rows had gone.
                Err(e) if queue::segments::dropped(&e) => break,
                Err(e) => return Err(sql_err(e)),
            }
        }
    }
    let mut n = 0;
    for up in &upstreams {
        for priority in Priority::SEND_ORDER {
            for table in &readable.tables {
                let sql = format!(
                    "SELECT id, upstream, event_id, topic, qos, priority, received_ms, expires_ms, payload, {props} \
                     FROM {table} WHERE upstream = ?1 AND priority = ?2 AND id > ?3 AND {} \
                     ORDER BY id LIMIT {PAGE}",
                    readable.not_gone
                );
                let mut after = i64::MIN;
                loop {
                    let page = conn.prepare_cached(&sql).and_then(|mut stmt| {
                        stmt.query_map(rusqlite::params![up, priority.as_i64(), after], |r| {
                            Ok((r.get(0)?, line(r)?))
                        })?
                        .collect::<rusqlite::Result<Vec<(i64, serde_json::Value)>>>()
                    });
                    let lines = match page {
                        Ok(lines) => lines,
                        // Dropped by the daemon meanwhile: every row in it
                        // had gone (and is not to be exported).
                        Err(e) if queue::segments::dropped(&e) => break,
                        Err(e) => return Err(sql_err(e)),
                    };
                    let Some(&(last, _)) = lines.last() else {
                        break;
                    };
                    after = last;
                    for (_, line) in &lines {
                        writeln!(out, "{line}")?;
                        n += 1;
                    }
                }
            }
        }
    }
    Ok(n)
}

/// Events read at a time: a short read, and little memory.
const PAGE: usize = 1000;

/// One exported event.
fn line(r: &rusqlite::Row<'_>) -> rusqlite::Result<serde_json::Value> {
    let payload: Vec<u8> = r.get(8)?;
    let mut line = json!({
        "id": r.get::<_, i64>(0)?,
        "upstream": r.get::<_, String>(1)?,
        "event_id": queue::event_id_from(r.get_ref(2)?)?,
        "topic": r.get::<_, String>(3)?,
        "qos": r.get::<_, i64>(4)?,
        "priority": Priority::from_i64(r.get(5)?).name(),
        "received_ms": r.get::<_, i64>(6)?,
        "expires_ms": r.get::<_, Option<i64>>(7)?,
    });
    // MQTT 5 properties it is sent with (a binary CloudEvent's).
    if let Some(raw) = r.get::<_, Option<Vec<u8>>>(9)? {
        line["properties"] = match queue::Properties::from_sql(&raw) {
            Ok(p) => json!({"content_type": p.content_type, "user_properties": p.user}),
            Err(e) => json!({ "unreadable": e }),
        };
    }
    match String::from_utf8(payload) {
        Ok(text) => line["payload"] = json!(text),
        Err(e) => {
            let hex: String = e.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
            line["payload_hex"] = json!(hex);
        }
    }
    Ok(line)
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("no queue at {}", .0.display())]
    NoQueue(std::path::PathBuf),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("reading the queue: {0}")]
    Read(String),
    /// Writing to stdout failed (a closed pipe, say): nothing to do.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{NewRow, QueueSettings};
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    /// A sink that, at the first line written, has the "daemon" drop the
    /// last segment table with a row (as a drain empties it).
    struct DropsASegment {
        db: std::path::PathBuf,
        lines: Vec<u8>,
        dropped: bool,
    }

    impl Write for DropsASegment {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if !self.dropped {
                self.dropped = true;
                let conn = rusqlite::Connection::open(&self.db).unwrap();
                let tables = queue::segments::tables(&conn).unwrap();
                // The last one is the empty one new rows go into.
                let (_, last) = &tables[tables.len() - 2];
                conn.execute_batch(&format!("DROP TABLE {last};")).unwrap();
            }
            self.lines.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The daemon drops a segment once every row in it has gone; an export
    /// running meanwhile goes on without it (before: "no such table").
    #[tokio::test]
    async fn an_export_goes_on_when_the_daemon_drops_a_segment_under_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("q.db");
        let settings = QueueSettings {
            commit_interval: Duration::from_millis(5),
            commit_max_events: 100,
            max_size: BTreeMap::from([("a".into(), u64::MAX)]),
            min_free_disk: 0,
            sweep_interval: Duration::from_secs(60),
            memory_max: 1 << 20,
            spill_after: Duration::ZERO,
            segment_bytes: 1,
        };
        let metrics = Arc::new(crate::metrics::Metrics::new(&["a".to_string()]));
        let (q, thread) = queue::open(&db, settings, metrics).unwrap();
        for n in 0..3u8 {
            let row = NewRow::for_test("a", n);
            q.append(vec![row]).await.unwrap();
            q.sync().await.unwrap();
        }
        drop(q);
        thread.join().unwrap();
        let mut out = DropsASegment {
            db: db.clone(),
            lines: Vec::new(),
            dropped: false,
        };
        let n = export(&db, None, &mut out).expect("the export goes on");
        assert_eq!(n, 2, "the rows of the segments that are still there");
    }
}
