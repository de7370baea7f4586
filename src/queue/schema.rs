//! The queue's SQLite file: schema and migrations (`PRAGMA user_version`),
//! pragmas, and recovery from a damaged file at start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;
use tracing::error;

use super::QueueError;
use crate::metrics::Metrics;

/// Schema version in `PRAGMA user_version`; `migrate` brings older files
/// up, one step per version, from the first release on.
///
/// 2: an event id that is a UUID is stored as its 16 bytes (a BLOB in the
/// TEXT column: SQLite keeps a value's own type), 20 bytes fewer per row
/// than its text: the queue bench measured 318 -> 300 bytes per event in
/// the file and 1,326 -> 1,258 bytes written per queued-then-acknowledged
/// event (most of that cost is WAL pages, see ARCHITECTURE.md). Rows of version 1 keep their text
/// ids; `event_id_from` reads both. No row is rewritten, so the step is
/// instant on any backlog; the version says an older edgeferry must not
/// read the file (it would fail on the first BLOB id).
///
/// 3: a `props` column (NULL for most rows) with the MQTT 5 properties a
/// row is sent with (CloudEvents in binary mode). Adding a NULL column
/// rewrites nothing.
///
/// 4: rows live in segment tables (`segments`): the table of versions 1-3
/// becomes the first segment, `queue_0`, with its rows and indexes as they
/// are (a rename); `gone` records the rows that left; `queue` is the view of
/// what is queued. The file switches from WAL to a rollback journal, which
/// writes a new row once instead of twice (ARCHITECTURE.md).
pub const SCHEMA_VERSION: i64 = 4;

const CREATE_V1: &str = "
CREATE TABLE queue (
    id          INTEGER PRIMARY KEY AUTOINCREMENT, -- send order; never reused
    upstream    TEXT    NOT NULL,
    event_id    TEXT    NOT NULL,                  -- stable id for upstream dedupe
    topic       TEXT    NOT NULL,
    qos         INTEGER NOT NULL,
    priority    INTEGER NOT NULL,                  -- 0 low, 1 normal, 2 high
    received_ms INTEGER NOT NULL,
    expires_ms  INTEGER,                           -- NULL: never
    size        INTEGER NOT NULL,                  -- bytes counted against max_size
    payload     BLOB    NOT NULL
);
CREATE INDEX queue_send_order ON queue (upstream, priority, id);
CREATE INDEX queue_expiry ON queue (expires_ms) WHERE expires_ms IS NOT NULL;
";

/// Open the queue; a damaged file (not a database, or failing
/// `PRAGMA quick_check`) is renamed aside with a timestamp and a fresh one is
/// created, so the gateway keeps collecting. Other failures (permissions, a
/// newer schema) are errors: moving those aside would hide good data.
pub(super) fn open_or_recover(path: &Path, metrics: &Metrics) -> Result<Connection, QueueError> {
    let damage = match open_db(path) {
        Ok(conn) => match quick_check(&conn) {
            Ok(()) => return Ok(conn),
            Err(detail) => detail,
        },
        Err(QueueError::Open { source, .. }) if is_damage(&source) => source.to_string(),
        Err(e) => return Err(e),
    };
    let aside = move_aside(path)?;
    metrics
        .queue_recovered
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    error!(
        path = %path.display(),
        moved_to = %aside.display(),
        %damage,
        "queue database is damaged; moved it aside and started a fresh queue (events in it are not forwarded; keep the file for support)"
    );
    open_db(path)
}

fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

/// `Ok` if SQLite's quick check passes; else what it found.
fn quick_check(conn: &Connection) -> Result<(), String> {
    let mut stmt = conn
        .prepare("PRAGMA quick_check")
        .map_err(|e| e.to_string())?;
    let found: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect())
        .map_err(|e| e.to_string())?;
    if found.len() == 1 && found[0] == "ok" {
        Ok(())
    } else {
        Err(found.join("; "))
    }
}

/// Rename `path` (and its journal or WAL) to `<path>.damaged-<UTC time>`;
/// drop its shared-memory file.
fn move_aside(path: &Path) -> Result<PathBuf, QueueError> {
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".damaged-{stamp}"));
    let aside = PathBuf::from(aside);
    let io = |source| QueueError::Io {
        path: path.to_path_buf(),
        action: "move the damaged file aside",
        source,
    };
    // Its journal first: beside a missing database a hot journal would be
    // deleted by the next open, and the kept copy lose its rollback data.
    for (suffix, keep) in [("-journal", true), ("-wal", true), ("-shm", false)] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let side = PathBuf::from(side);
        // An empty journal is what TRUNCATE leaves after every commit.
        let empty = std::fs::metadata(&side).is_ok_and(|m| m.len() == 0);
        if side.exists() {
            if keep && !empty {
                let mut to = aside.as_os_str().to_owned();
                to.push(suffix);
                std::fs::rename(&side, PathBuf::from(to)).map_err(io)?;
            } else {
                std::fs::remove_file(&side).map_err(io)?;
            }
        }
    }
    std::fs::rename(path, &aside).map_err(io)?;
    Ok(aside)
}

/// Open the database with our pragmas and schema. Also used by tests and
/// tools that read the queue file directly.
pub fn open_db(path: &Path) -> Result<Connection, QueueError> {
    let err = |source| QueueError::Open {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| QueueError::Io {
            path: path.to_path_buf(),
            action: "create its directory",
            source,
        })?;
    }
    check_writable(path)?;
    let conn = Connection::open(path).map_err(err)?;
    // A rollback journal, not WAL: rows are appended (and segments
    // dropped), so most pages a commit writes are new or free-list pages,
    // which are not journaled; WAL would write every page twice (the log,
    // then the checkpoint). synchronous=FULL syncs at every commit, so a
    // committed row survives a power cut; group commit keeps that to at
    // most one commit per commit_interval. A file of an older version is
    // switched here (its WAL is checkpointed into it).
    // A file from a newer edgeferry is refused before anything changes.
    check_version(&conn, path)?;
    match conn.pragma_update_and_check(None, "journal_mode", "TRUNCATE", |r| r.get::<_, String>(0))
    {
        Ok(mode) if mode.eq_ignore_ascii_case("truncate") => {}
        // Leaving WAL needs the file to itself (an open `sqlite3` shell or
        // script holds it): run in WAL this time, switch at a later start.
        Ok(mode) => warn_mode(path, &mode),
        Err(e) if is_busy(&e) => warn_mode(path, "wal"),
        Err(e) => return Err(err(e)),
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(err)?;
    // 1 MiB of page cache instead of SQLite's 2: the queue appends and
    // deletes at the ends of its index, and the OS caches the file anyway.
    conn.pragma_update(None, "cache_size", -1024).map_err(err)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
    // Statements are per segment table: room for a few kinds on a few
    // hundred of them.
    conn.set_prepared_statement_cache_capacity(256);
    migrate(&conn, path)?;
    Ok(conn)
}

fn warn_mode(path: &Path, mode: &str) {
    tracing::warn!(path = %path.display(), %mode, "queue: another process has the file open, so it stays in its old journal mode this time (it works, and writes more per event); it switches at a start when nothing else holds it");
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// The queue writes the database and its `-journal` beside it: a
/// directory it cannot write (a filesystem remounted read-only after SD
/// card errors, wrong ownership) is named as such, rather than as SQLite's
/// "unable to open database file".
pub(super) fn check_writable(path: &Path) -> Result<(), QueueError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return Ok(());
    };
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0 {
        return Ok(());
    }
    let source = std::io::Error::last_os_error();
    Err(QueueError::Io {
        path: path.to_path_buf(),
        action: match source.raw_os_error() {
            Some(libc::EROFS) => {
                "write its directory: the filesystem is read-only (remounted after disk errors?)"
            }
            _ => "write its directory (it holds the database and its -journal file)",
        },
        source,
    })
}

/// The file's schema version; an error if it is newer than this edgeferry.
pub(super) fn check_version(conn: &Connection, path: &Path) -> Result<i64, QueueError> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|source| QueueError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    if version > SCHEMA_VERSION {
        return Err(QueueError::TooNew {
            path: path.to_path_buf(),
            found: version,
        });
    }
    Ok(version)
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), QueueError> {
    let err = |source| QueueError::Open {
        path: path.to_path_buf(),
        source,
    };
    let version = check_version(conn, path)?;
    // Each step in one transaction with its version bump: a crash mid-way
    // leaves the file at the previous version, and the step runs again.
    let step = |sql: &str, to: i64| -> rusqlite::Result<()> {
        conn.execute_batch(&format!("BEGIN; {sql} PRAGMA user_version = {to}; COMMIT;"))
    };
    if version < 1 {
        step(CREATE_V1, 1).map_err(err)?;
    }
    if version < 2 {
        // New rows store UUID ids as bytes; nothing to rewrite.
        step("", 2).map_err(err)?;
    }
    if version < 3 {
        step("ALTER TABLE queue ADD COLUMN props BLOB;", 3).map_err(err)?;
    }
    if version < 4 {
        let sql = format!(
            "ALTER TABLE queue RENAME TO queue_0; CREATE TABLE gone (id INTEGER PRIMARY KEY); {}",
            super::segments::view_sql(["queue_0"])
        );
        step(&sql, 4).map_err(err)?;
    }
    // Keep each step cheap on a large backlog (no full-table rewrite).
    Ok(())
}

/// An event id as it is stored: a UUID as its 16 bytes, anything else
/// (ids of rows from before version 2, test ids) as text.
pub fn event_id_to_sql(id: &str) -> rusqlite::types::Value {
    match uuid::Uuid::try_parse(id) {
        Ok(u) if u.hyphenated().to_string() == id => {
            rusqlite::types::Value::Blob(u.as_bytes().to_vec())
        }
        _ => rusqlite::types::Value::Text(id.to_string()),
    }
}

/// An event id as stored (16 bytes or text) back as its text.
pub fn event_id_from(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<String> {
    use rusqlite::types::{FromSqlError, ValueRef};
    match v {
        ValueRef::Blob(b) => uuid::Uuid::from_slice(b)
            .map(|u| u.hyphenated().to_string())
            .map_err(|e| FromSqlError::Other(Box::new(e))),
        other => other.as_str().map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UUID id takes 16 bytes in the file, not 36, and reads back as the
    /// same text; other ids stay text.
    #[test]
    fn uuid_event_ids_are_stored_as_bytes_and_read_back_as_text() {
        let conn = Connection::open_in_memory().unwrap();
        let id = uuid::Uuid::now_v7().to_string();
        for (given, stored_len) in [(id.as_str(), 16), ("e1", 2), ("ABC", 3)] {
            let (len, back): (i64, String) = conn
                .query_row(
                    "SELECT length(CAST(?1 AS BLOB)), ?1",
                    [event_id_to_sql(given)],
                    |r| Ok((r.get(0)?, event_id_from(r.get_ref(1)?)?)),
                )
                .unwrap();
            assert_eq!((len, back.as_str()), (stored_len, given));
        }
    }

    /// A version 1 file opens: its rows keep their text ids, gain an empty
    /// `props`, and the file says the current version from then on.
    #[test]
    fn a_version_1_file_is_brought_to_the_current_version_without_touching_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        {
            // As the versions before 4 left it: WAL.
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "journal_mode", "WAL").unwrap();
            conn.execute_batch(&format!("{CREATE_V1} PRAGMA user_version = 1;"))
                .unwrap();
            conn.execute(
                "INSERT INTO queue (id, upstream, event_id, topic, qos, priority, received_ms, size, payload) \
                 VALUES (1, 'cloud', '0190a4b2-0000-7000-8000-000000000001', 't', 1, 1, 0, 1, x'00')",
                [],
            )
            .unwrap();
        }
        let conn = open_db(&path).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let (kind, id, props): (String, String, Option<Vec<u8>>) = conn
            .query_row(
                "SELECT typeof(event_id), event_id, props FROM queue",
                [],
                |r| Ok((r.get(0)?, event_id_from(r.get_ref(1)?)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(
            (kind.as_str(), id.as_str(), props),
            ("text", "0190a4b2-0000-7000-8000-000000000001", None)
        );
        // Its table is the first segment, and the file has left WAL.
        assert_eq!(
            super::super::segments::tables(&conn).unwrap(),
            vec![(0, "queue_0".to_string())]
        );
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "truncate");
        assert!(!dir.path().join("q.db-wal").exists());
    }

    /// Another process holding an old WAL file (a `sqlite3` shell left
    /// open) keeps it from leaving WAL: the queue opens anyway, in WAL
    /// this time, and switches at a start when nothing else holds it.
    /// Before, the open failed with "database is locked" and the daemon
    /// did not start.
    #[test]
    fn a_wal_file_held_by_another_process_opens_and_switches_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        let other = Connection::open(&path).unwrap();
        other.pragma_update(None, "journal_mode", "WAL").unwrap();
        other
            .execute_batch(&format!("{CREATE_V1} PRAGMA user_version = 3;"))
            .unwrap();
        let mode = |c: &Connection| -> String {
            c.pragma_query_value(None, "journal_mode", |r| r.get(0))
                .unwrap()
        };
        let conn = open_db(&path).expect("opens while another holds it");
        assert_eq!(mode(&conn), "wal");
        assert_eq!(check_version(&conn, &path).unwrap(), SCHEMA_VERSION);
        drop((conn, other));
        let conn = open_db(&path).unwrap();
        assert_eq!(mode(&conn), "truncate");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        assert!(matches!(
            open_db(&path),
            Err(QueueError::TooNew { found: 99, .. })
        ));
    }
}
