//! What a queued-then-acknowledged event costs the disk under candidate
//! SQLite layouts, with the SQLite edgeferry ships (rusqlite's bundled
//! build): the figures behind the queue's storage design.
//!
//!   cargo bench --bench storage
//!
//! Each layout stores EVENTS rows (200-byte payload, the queue's columns)
//! in transactions of 2,000 (`commit_max_events`), then deletes them
//! oldest first in transactions of ACKS (a drain's acknowledgements per
//! commit interval), with `synchronous=FULL`. It reports `write_bytes`
//! of this process (`/proc/self/io`: what reached the block device,
//! WAL, journal, database and checkpoint writes together) per event, for
//! storing and for deleting, after a `sync`. The temp dir is under
//! target/, on the disk the queue bench uses (not a tmpfs).
//!
//! Layouts:
//! - `v1`: today's schema (AUTOINCREMENT, text event id, send-order and
//!   expiry indexes), WAL.
//! - `v1-blob-id`: the event id as 16 bytes, no AUTOINCREMENT, WAL.
//! - `v1-journal`: `v1-blob-id` with a rollback journal (TRUNCATE)
//!   instead of WAL: pages appended at the end of the file are not
//!   journaled, so a new row is written once, not twice (WAL, then the
//!   checkpoint).
//! - `segments-wal` / `segments-journal`: rows in one table per
//!   SEGMENT ids (no secondary index: a segment holds one upstream and
//!   priority, in send order), an acknowledgement recorded as a tiny row,
//!   and a segment dropped whole once every row in it is acknowledged: a
//!   dropped table's pages go to the free list without being rewritten,
//!   where a row-by-row delete rewrites (and rebalances) every page.

use std::path::Path;
use std::time::Instant;

use rusqlite::{Connection, params};

const EVENTS: i64 = 200_000;
const INSERTS: i64 = 2_000;
const ACKS: i64 = 6_000;
const SEGMENT: i64 = 10_000;
const PAYLOAD: usize = 200;

fn write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| {
                    l.strip_prefix("write_bytes:")
                        .map(|v| v.trim().parse().ok())
                })
                .flatten()
        })
        .unwrap_or(0)
}

fn sync_disk() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn open(path: &Path, journal: &str) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", journal).unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.pragma_update(None, "cache_size", -1024).unwrap();
    conn
}

const V1: &str = "
CREATE TABLE queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT, upstream TEXT NOT NULL, event_id TEXT NOT NULL,
    topic TEXT NOT NULL, qos INTEGER NOT NULL, priority INTEGER NOT NULL,
    received_ms INTEGER NOT NULL, expires_ms INTEGER, size INTEGER NOT NULL, payload BLOB NOT NULL);
CREATE INDEX queue_send_order ON queue (upstream, priority, id);
CREATE INDEX queue_expiry ON queue (expires_ms) WHERE expires_ms IS NOT NULL;";

const V1_BLOB_ID: &str = "
CREATE TABLE queue (
    id INTEGER PRIMARY KEY, upstream TEXT NOT NULL, event_id BLOB NOT NULL,
    topic TEXT NOT NULL, qos INTEGER NOT NULL, priority INTEGER NOT NULL,
    received_ms INTEGER NOT NULL, expires_ms INTEGER, size INTEGER NOT NULL, payload BLOB NOT NULL);
CREATE INDEX queue_send_order ON queue (upstream, priority, id);
CREATE INDEX queue_expiry ON queue (expires_ms) WHERE expires_ms IS NOT NULL;";

fn event_id(n: i64, text: bool) -> rusqlite::types::Value {
    let bytes: [u8; 16] =
        (u128::from(n as u64) * 0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835).to_be_bytes();
    match text {
        true => rusqlite::types::Value::Text(uuid_text(&bytes)),
        false => rusqlite::types::Value::Blob(bytes.to_vec()),
    }
}

fn uuid_text(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Store then delete every row of one table, row by row.
fn one_table(conn: Connection, schema: &str, text_id: bool) -> (u64, u64) {
    conn.execute_batch(schema).unwrap();
    let payload = vec![7u8; PAYLOAD];
    let w0 = write_bytes();
    for start in (1..=EVENTS).step_by(INSERTS as usize) {
        let tx = conn.unchecked_transaction().unwrap();
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT INTO queue (id, upstream, event_id, topic, qos, priority, received_ms, expires_ms, size, payload) \
                     VALUES (?1, 'cloud', ?2, ?3, 1, 1, ?4, NULL, ?5, ?6)",
                )
                .unwrap();
            for id in start..(start + INSERTS).min(EVENTS + 1) {
                let topic = format!("sensors/dev{}/temperature", id % 10);
                ins.execute(params![
                    id,
                    event_id(id, text_id),
                    topic,
                    1_764_000_000_000i64 + id,
                    (PAYLOAD + topic.len()) as i64,
                    &payload
                ])
                .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    sync_disk();
    let w1 = write_bytes();
    for start in (1..=EVENTS).step_by(ACKS as usize) {
        let tx = conn.unchecked_transaction().unwrap();
        {
            let mut del = tx
                .prepare_cached("DELETE FROM queue WHERE id = ?1")
                .unwrap();
            for id in start..(start + ACKS).min(EVENTS + 1) {
                del.execute([id]).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    // Closing checkpoints what is left in a WAL: part of the cost.
    drop(conn);
    sync_disk();
    (w1 - w0, write_bytes() - w1)
}

/// Store in segment tables, acknowledge into a small table, drop a
/// segment (and its acknowledgements) once all of it is acknowledged.
fn segments(conn: Connection) -> (u64, u64) {
    conn.execute_batch("CREATE TABLE acked (id INTEGER PRIMARY KEY);")
        .unwrap();
    segments_round(&conn, 0)
}

/// `segments`, twice: the second outage's rows go into the pages the
/// first one's dropped segments left on the free list (measured: the
/// second round).
fn segments_reused(conn: Connection) -> (u64, u64) {
    conn.execute_batch("CREATE TABLE acked (id INTEGER PRIMARY KEY);")
        .unwrap();
    segments_round(&conn, 0);
    segments_round(&conn, 10 * EVENTS)
}

fn segments_round(conn: &Connection, base: i64) -> (u64, u64) {
    let payload = vec![7u8; PAYLOAD];
    let mut made = std::collections::BTreeSet::new();
    let w0 = write_bytes();
    for start in (base + 1..=base + EVENTS).step_by(INSERTS as usize) {
        let tx = conn.unchecked_transaction().unwrap();
        for id in start..(start + INSERTS).min(base + EVENTS + 1) {
            let seg = id / SEGMENT;
            if made.insert(seg) {
                tx.execute_batch(&format!(
                    "CREATE TABLE seg{seg} (id INTEGER PRIMARY KEY, event_id BLOB NOT NULL, topic TEXT NOT NULL, \
                     qos INTEGER NOT NULL, received_ms INTEGER NOT NULL, expires_ms INTEGER, payload BLOB NOT NULL);"
                ))
                .unwrap();
            }
            let topic = format!("sensors/dev{}/temperature", id % 10);
            tx.prepare_cached(&format!(
                "INSERT INTO seg{seg} VALUES (?1, ?2, ?3, 1, ?4, NULL, ?5)"
            ))
            .unwrap()
            .execute(params![
                id,
                event_id(id, false),
                topic,
                1_764_000_000_000i64 + id,
                &payload
            ])
            .unwrap();
        }
        tx.commit().unwrap();
    }
    sync_disk();
    let w1 = write_bytes();
    for start in (base + 1..=base + EVENTS).step_by(ACKS as usize) {
        let hi = (start + ACKS - 1).min(base + EVENTS);
        let tx = conn.unchecked_transaction().unwrap();
        {
            let mut ack = tx.prepare_cached("INSERT INTO acked VALUES (?1)").unwrap();
            for id in start..=hi {
                ack.execute([id]).unwrap();
            }
        }
        let done: Vec<i64> = made
            .iter()
            .copied()
            .filter(|s| (s + 1) * SEGMENT - 1 <= hi)
            .collect();
        for seg in done {
            tx.execute_batch(&format!("DROP TABLE seg{seg};")).unwrap();
            tx.execute("DELETE FROM acked WHERE id < ?1", [(seg + 1) * SEGMENT])
                .unwrap();
            made.remove(&seg);
        }
        tx.commit().unwrap();
    }
    // A WAL's checkpoint is part of the cost.
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .ok();
    sync_disk();
    (w1 - w0, write_bytes() - w1)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&base).unwrap();
    println!(
        "edgeferry storage bench: {EVENTS} events of {PAYLOAD} bytes, stored {INSERTS} per transaction, \
         deleted {ACKS} per transaction, synchronous=FULL, SQLite {}",
        rusqlite::version()
    );
    type Run = fn(Connection) -> (u64, u64);
    let layouts: [(&str, &str, Run); 6] = [
        ("v1", "WAL", |c| one_table(c, V1, true)),
        ("v1-blob-id", "WAL", |c| one_table(c, V1_BLOB_ID, false)),
        ("v1-journal", "TRUNCATE", |c| {
            one_table(c, V1_BLOB_ID, false)
        }),
        ("segments-wal", "WAL", segments),
        ("segments-journal", "TRUNCATE", segments),
        ("segments-reused", "TRUNCATE", segments_reused),
    ];
    for (name, journal, run) in layouts {
        let dir = tempfile::tempdir_in(&base).unwrap();
        let path = dir.path().join("q.db");
        let conn = open(&path, journal);
        let started = Instant::now();
        let (store, delete) = run(conn);
        let per = |b: u64| b as f64 / EVENTS as f64;
        println!(
            "{name:17} ({journal:8}): {:4.0} bytes written per event ({:.1}x the payload): {:4.0} to store it, {:4.0} to delete it; {:.1}s",
            per(store + delete),
            per(store + delete) / PAYLOAD as f64,
            per(store),
            per(delete),
            started.elapsed().as_secs_f64()
        );
    }
}
