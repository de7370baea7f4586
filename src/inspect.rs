//! `edgeferry queue stats` and `edgeferry queue export`: read the queue file
//! directly, read-only, safe while the daemon runs (readers see only
//! committed rows; each read is short, so the daemon's commits wait at
//! most that long).

use std::io::Write;
use std::path::Path;

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
    let (tables, gone) = match version {
        4.. => (
            queue::segments::tables(&conn)
                .map_err(sql_err)?
                .into_iter()
                .map(|(_, name)| name)
                .collect(),
            "AND id NOT IN (SELECT id FROM gone)",
        ),
        _ => (vec!["queue".to_string()], ""),
    };
    let props = if version >= 3 { "props" } else { "NULL" };
    let mut upstreams = std::collections::BTreeSet::new();
    for table in &tables {
        let sql =
            format!("SELECT DISTINCT upstream FROM {table} WHERE ?1 IS NULL OR upstream = ?1");
        let mut stmt = conn.prepare(&sql).map_err(sql_err)?;
        for name in stmt
            .query_map([upstream], |r| r.get::<_, String>(0))
            .map_err(sql_err)?
        {
            upstreams.insert(name.map_err(sql_err)?);
        }
    }
    let mut n = 0;
    for up in &upstreams {
        for priority in Priority::SEND_ORDER {
            for table in &tables {
                let sql = format!(
                    "SELECT id, upstream, event_id, topic, qos, priority, received_ms, expires_ms, payload, {props} \
                     FROM {table} WHERE upstream = ?1 AND priority = ?2 AND id > ?3 {gone} ORDER BY id LIMIT {PAGE}"
                );
                let mut stmt = conn.prepare(&sql).map_err(sql_err)?;
                let mut after = i64::MIN;
                loop {
                    let lines: Vec<(i64, serde_json::Value)> = stmt
                        .query_map(rusqlite::params![up, priority.as_i64(), after], |r| {
                            Ok((r.get(0)?, line(r)?))
                        })
                        .and_then(|rows| rows.collect())
                        .map_err(sql_err)?;
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
