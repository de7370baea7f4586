//! The queue's rows live in segment tables, not one table: each holds a
//! range of row ids, `queue_<first id>` up to the next one's first id. An
//! acknowledged (or evicted, or expired) row is not deleted from its
//! segment: its id goes into `gone`, a table of bare ids, and the segment
//! is dropped whole once every row in it is gone. A row-by-row delete
//! rewrites every page it touches (and with a rollback journal copies it
//! there first); a dropped table's pages go to the free list untouched,
//! and are reused for new rows without being journaled. `cargo bench
//! --bench storage` has the figures (ARCHITECTURE.md).
//!
//! `queue` is a view of the rows that are not gone, in every segment, so
//! `sqlite3 queue.db 'SELECT ... FROM queue'` still shows what is queued.
//! It is rebuilt when a segment is added or dropped.

use rusqlite::Connection;

/// The view over every segment's rows that are not gone.
pub const VIEW: &str = "queue";

/// The segment tables, by first id.
pub fn tables(conn: &Connection) -> rusqlite::Result<Vec<(i64, String)>> {
    let mut stmt = conn.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name GLOB 'queue_[0-9]*'",
    )?;
    let names = stmt.query_map([], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for name in names {
        let name = name?;
        if let Some(first) = first_of(&name) {
            out.push((first, name));
        }
    }
    out.sort();
    Ok(out)
}

/// Where a reader finds the queued rows of a file of schema `version`.
pub struct Readable {
    /// Since schema 4 the segments, in id order; before, the one `queue`
    /// table (a file read before the daemon migrated it), if there is one.
    pub tables: Vec<String>,
    /// The condition that leaves out gone rows (`1` before schema 4).
    pub not_gone: &'static str,
}

/// The tables to read rows from, one short read each: a reader holds a
/// shared lock while its statement runs, and a commit waits for it.
pub fn readable(conn: &Connection, version: i64) -> rusqlite::Result<Readable> {
    if version >= 4 {
        return Ok(Readable {
            tables: tables(conn)?.into_iter().map(|(_, name)| name).collect(),
            not_gone: "id NOT IN (SELECT id FROM gone)",
        });
    }
    let has_table: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'queue')",
        [],
        |r| r.get(0),
    )?;
    Ok(Readable {
        tables: has_table.then(|| VIEW.to_string()).into_iter().collect(),
        not_gone: "1",
    })
}

/// A segment table the daemon dropped after a reader listed it: every row
/// in it had gone, so there is nothing in it to read.
pub fn dropped(e: &rusqlite::Error) -> bool {
    e.to_string().contains("no such table")
}

/// The first id of segment table `name` (`queue_<first>`).
fn first_of(name: &str) -> Option<i64> {
    let digits = name.strip_prefix("queue_")?;
    digits
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| digits.parse().ok())
        .flatten()
}

/// The name of the segment starting at `first`.
pub fn name(first: i64) -> String {
    format!("queue_{first}")
}

/// SQL creating the segment starting at `first`: the queue's columns, the
/// send-order index (a fetch is per upstream and priority), and a partial
/// index for the expiry sweep that costs nothing for rows without a TTL.
pub fn create_sql(first: i64) -> String {
    let t = name(first);
    format!(
        "CREATE TABLE {t} (
            id          INTEGER PRIMARY KEY, -- send order; assigned by the writer
            upstream    TEXT    NOT NULL,
            event_id    TEXT    NOT NULL,    -- a UUID as 16 bytes, else text
            topic       TEXT    NOT NULL,
            qos         INTEGER NOT NULL,
            priority    INTEGER NOT NULL,    -- 0 low, 1 normal, 2 high
            received_ms INTEGER NOT NULL,
            expires_ms  INTEGER,             -- NULL: never
            size        INTEGER NOT NULL,    -- bytes counted against max_size
            payload     BLOB    NOT NULL,
            props       BLOB                 -- MQTT 5 properties, NULL for most rows
        );
        CREATE INDEX {t}_send_order ON {t} (upstream, priority, id);
        CREATE INDEX {t}_expiry ON {t} (expires_ms) WHERE expires_ms IS NOT NULL;"
    )
}

/// SQL replacing the `queue` view with one over `tables`.
pub fn view_sql<'a>(tables: impl IntoIterator<Item = &'a str>) -> String {
    let arms: Vec<String> = tables
        .into_iter()
        .map(|t| format!("SELECT * FROM {t} WHERE id NOT IN (SELECT id FROM gone)"))
        .collect();
    format!(
        "DROP VIEW IF EXISTS {VIEW}; CREATE VIEW {VIEW} AS {};",
        arms.join(" UNION ALL ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_segment_tables_are_segments_in_id_order() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(&format!(
            "{} {} CREATE TABLE gone (id INTEGER PRIMARY KEY); CREATE TABLE queue_x (a);",
            create_sql(1000),
            create_sql(7)
        ))
        .unwrap();
        let found = tables(&conn).unwrap();
        assert_eq!(
            found,
            vec![(7, "queue_7".to_string()), (1000, "queue_1000".to_string())]
        );
        conn.execute_batch(&view_sql(found.iter().map(|(_, n)| n.as_str())))
            .unwrap();
        conn.execute_batch(
            "INSERT INTO queue_7 (id, upstream, event_id, topic, qos, priority, received_ms, size, payload) VALUES (7, 'a', 'e', 't', 1, 1, 0, 1, x'00'), (8, 'a', 'e', 't', 1, 1, 0, 1, x'00');
             INSERT INTO queue_1000 (id, upstream, event_id, topic, qos, priority, received_ms, size, payload) VALUES (1000, 'a', 'e', 't', 1, 1, 0, 1, x'00');
             INSERT INTO gone VALUES (8);",
        )
        .unwrap();
        let ids: Vec<i64> = conn
            .prepare("SELECT id FROM queue ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(ids, vec![7, 1000], "a gone row is not in the view");
    }
}
