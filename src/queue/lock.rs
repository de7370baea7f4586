//! One daemon per queue file: an exclusive `flock` on `<queue>.lock`,
//! taken before the database opens and held until the writer's final
//! commit. SQLite alone lets two daemons open one file, and both would
//! send (and delete) the same rows: duplicates upstream, and a race on
//! every row.
//!
//! The kernel releases the lock when its holder exits, however it exits
//! (`kill -9` included), so a lock file left behind never blocks a start.
//! The file holds the holder's pid, for the message the second daemon
//! gives. Readers (`queue stats`, `queue export`, `status`) do not take it:
//! they open the database read-only beside the daemon.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::QueueError;

/// The held lock; dropping it (closing the file) releases it.
#[derive(Debug)]
pub struct QueueLock {
    _file: File,
}

/// The file a path names, through any symlinks (of its directories, and
/// of the database itself if it is one), so that two names for one queue
/// share one lock. A hard link is still a second name; nobody makes those
/// by accident.
fn real_path(db: &Path) -> PathBuf {
    if let Ok(real) = std::fs::canonicalize(db) {
        return real;
    }
    // Not there yet: its directory is (`take` created it).
    let dir = db
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match (std::fs::canonicalize(dir), db.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => db.to_path_buf(),
    }
}

/// `<db>.lock`, beside the database.
pub fn lock_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

impl QueueLock {
    /// Take the lock of the queue at `db`, or say who holds it. Creates the
    /// queue's directory if needed (as opening the database would).
    pub fn take(db: &Path) -> Result<QueueLock, QueueError> {
        if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| QueueError::Io {
                path: db.to_path_buf(),
                action: "create its directory",
                source,
            })?;
        }
        // A read-only or foreign directory is the database's problem, and
        // named as such, not as the lock file's.
        super::schema::check_writable(db)?;
        let path = lock_path(&real_path(db));
        let io = |action, source| QueueError::Io {
            path: path.clone(),
            action,
            source,
        };
        // Only the daemon's user may open it: anyone who can open a file
        // can flock it, and so keep the daemon from starting.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io("open the lock file", e))?;
        // SAFETY: flock on a descriptor this function owns; no memory involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(QueueError::InUse {
                    path: db.to_path_buf(),
                    pid: text.trim().parse().ok(),
                });
            }
            return Err(io("lock the lock file", e));
        }
        // Ours now: say who holds it. A failure here only loses the pid
        // from another daemon's message, never the lock.
        let _ = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        Ok(QueueLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("sub/queue.db");
        let first = QueueLock::take(&db).unwrap();
        // flock is per open file: a second open in this process conflicts
        // as a second daemon's would.
        match QueueLock::take(&db) {
            Err(QueueError::InUse { path, pid }) => {
                assert_eq!(path, db);
                assert_eq!(pid, Some(std::process::id()));
            }
            other => panic!("expected InUse, got {other:?}"),
        }
        drop(first);
        let again = QueueLock::take(&db).expect("free once the holder let go");
        drop(again);
        assert!(
            lock_path(&db).exists(),
            "the file stays; only the lock goes"
        );
    }

    #[test]
    fn a_second_name_for_the_same_queue_is_refused_too() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let _first = QueueLock::take(&real.join("queue.db")).unwrap();
        for other in [dir.path().join("link/queue.db"), real.join("./queue.db")] {
            assert!(
                matches!(QueueLock::take(&other), Err(QueueError::InUse { .. })),
                "{other:?}"
            );
        }
        // And a database that is itself a symlink to the queue.
        std::fs::write(real.join("queue.db"), b"").unwrap();
        std::os::unix::fs::symlink(real.join("queue.db"), dir.path().join("alias.db")).unwrap();
        assert!(matches!(
            QueueLock::take(&dir.path().join("alias.db")),
            Err(QueueError::InUse { .. })
        ));
    }

    #[test]
    fn a_stale_pid_in_a_free_lock_file_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("queue.db");
        std::fs::write(lock_path(&db), "999999999\n").unwrap();
        let _held = QueueLock::take(&db).unwrap();
        let text = std::fs::read_to_string(lock_path(&db)).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
    }
}
