//! The disk under the queue: the free-space watermark, the reserve file
//! that lets deletes commit on a full disk, and the file's integrity.

use super::*;

/// Size of the reserve file (see `Writer::reserve`).
const RESERVE_BYTES: u64 = 2 << 20;
/// Free disk space is checked at least this often, and after this many bytes
/// were admitted (a burst can fill a small card within a second).
const DISK_CHECK_BYTES: u64 = 256 << 10;
/// How often free disk space is checked.
const DISK_CHECK_EVERY: Duration = Duration::from_secs(1);

impl Writer {
    /// Delete the reserve file: the disk is full and the deletes that would
    /// free space need room to be committed.
    pub(super) fn release_reserve(&mut self) {
        if std::fs::remove_file(&self.reserve).is_ok() {
            warn!(reserve = %self.reserve.display(), "disk full: released the reserve file so acknowledged events can be deleted");
            self.reserve_missing_since = Some(Instant::now());
        }
    }

    /// (Re)create the reserve file once there is clearly room for it again.
    pub(super) fn restore_reserve(&mut self) {
        let Some(since) = self.reserve_missing_since else {
            return;
        };
        if since.elapsed() < Duration::from_secs(10) {
            return;
        }
        self.reserve_missing_since = Some(Instant::now());
        if crate::queue::space::space(&self.path).is_some_and(|s| s.free < 2 * RESERVE_BYTES) {
            return;
        }
        let made = std::fs::File::create(&self.reserve).and_then(|f| {
            use std::io::Write;
            let mut f = std::io::BufWriter::new(f);
            // Real blocks (not a sparse file), or deleting it frees nothing.
            f.write_all(&vec![0u8; RESERVE_BYTES as usize])?;
            f.into_inner().map_err(|e| e.into_error())?.sync_all()
        });
        match made {
            Ok(()) => self.reserve_missing_since = None,
            Err(e) => {
                let _ = std::fs::remove_file(&self.reserve);
                warn!(reserve = %self.reserve.display(), error = %e, "cannot create the disk-full reserve file; will retry");
            }
        }
    }

    /// Whether free space on the database's filesystem is below the
    /// watermark (checked at most once a second).
    pub(super) fn disk_low(&mut self) -> bool {
        if self.settings.min_free_disk == 0 {
            return false;
        }
        if self
            .disk_checked
            .is_some_and(|t| t.elapsed() < DISK_CHECK_EVERY)
            && self.admitted_since_check < DISK_CHECK_BYTES
        {
            return self.disk_low;
        }
        self.disk_checked = Some(Instant::now());
        self.admitted_since_check = 0;
        let low = match crate::queue::space::space(&self.path) {
            Some(space) => space.free < self.settings.min_free_disk,
            None => false,
        };
        if low != self.disk_low {
            if low {
                warn!(path = %self.path.display(), min_free_disk = self.settings.min_free_disk, "free disk space below the watermark: the queue stops growing; events are forwarded from memory while their upstream is connected, and overflow policies apply while it is not");
            } else {
                info!(path = %self.path.display(), "free disk space above the watermark again");
                self.frozen_cap.clear();
            }
        }
        self.disk_low = low;
        low
    }

    /// The database file must still hold everything SQLite wrote to it:
    /// with a rollback journal and no auto-vacuum SQLite never shrinks it,
    /// so a shorter or missing file was cut or removed by another program,
    /// and one with another inode was moved over it (the connection would
    /// go on writing the unlinked file, lost at the next start).
    /// The events in the lost part are gone, and every later commit would
    /// build on pages that are not there. So the queue stops writing:
    /// commits fail from here on (events are held, so sensors are not
    /// acknowledged), it is said at ERROR and counted, and the health probe
    /// withholds the watchdog so systemd restarts edgeferry, whose start
    /// finds the damage and moves the file aside. Checked before every
    /// commit and at every sweep: one `stat`.
    pub(super) fn file_intact(&mut self) -> rusqlite::Result<()> {
        if !self.damaged {
            let len = std::fs::metadata(&self.path).map(|m| m.len());
            let cut = match &len {
                Ok(len) => *len < self.db_len || inode(&self.path) != self.db_inode,
                Err(e) => e.kind() == std::io::ErrorKind::NotFound,
            };
            if cut {
                self.damaged = true;
                self.metrics.queue_damaged.fetch_add(1, Relaxed);
                error!(
                    path = %self.path.display(),
                    bytes = len.as_ref().ok(),
                    expected_at_least = self.db_len,
                    "queue file damaged while running: it was cut short, removed or replaced by another program, and the events in the lost part are gone; the queue stops writing (new events are held, not acknowledged) and the health probe fails so edgeferry is restarted"
                );
            }
        }
        match self.damaged {
            false => Ok(()),
            true => Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR_SHORT_READ),
                Some("the queue file was damaged by another program; restart edgeferry".into()),
            )),
        }
    }

    /// After our own writes: the file's length as SQLite left it.
    pub(super) fn note_db_len(&mut self) {
        self.db_len = std::fs::metadata(&self.path).map_or(0, |m| m.len());
    }
}

/// The file's device and inode (`None` if it cannot be read).
pub(super) fn inode(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// `<db>.reserve`, beside the database.
pub(super) fn reserve_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".reserve");
    PathBuf::from(p)
}
