//! Who may connect (the password file) and what they may do (the ACL
//! file), each re-read when its file changes, so `edgeferry passwd` and an
//! edited ACL take effect without a restart. A broken edit keeps the
//! previous contents and says so.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use crate::acl::Acl;
use crate::metrics::Metrics;
use crate::passwd::Passwords;

pub use crate::broker::RESERVED_ID_PREFIX;

/// The health probe's client id: refused at the door like every reserved
/// id, but not counted as a failed login.
pub const HEALTH_PROBE_ID: &str = "edgeferry-link-health";

/// A file's contents as read when the config was loaded, with the file's
/// identity taken before the read: a change made after it, even before the
/// daemon starts watching, is picked up.
#[derive(Debug)]
pub struct Loaded<T> {
    pub value: Arc<T>,
    stamp: Option<FileStamp>,
}

impl<T> Clone for Loaded<T> {
    fn clone(&self) -> Self {
        Loaded {
            value: self.value.clone(),
            stamp: self.stamp,
        }
    }
}

impl<T> Loaded<T> {
    pub fn read<E>(path: &Path, parse: impl FnOnce(&Path) -> Result<T, E>) -> Result<Self, E> {
        let stamp = FileStamp::of(path);
        Ok(Loaded {
            value: Arc::new(parse(path)?),
            stamp,
        })
    }
}

/// A file's contents, parsed, and re-parsed when the file changes.
struct Watched<T> {
    path: PathBuf,
    /// The file's identity when loaded, and what it held.
    loaded: Mutex<(Option<FileStamp>, Arc<T>)>,
    /// Parses the file; its error is logged on a failed reload.
    parse: fn(&Path) -> Result<T, String>,
    what: &'static str,
}

impl<T> Watched<T> {
    /// Watch `path`, whose contents were parsed into `loaded`.
    fn new(
        path: PathBuf,
        loaded: Loaded<T>,
        what: &'static str,
        parse: fn(&Path) -> Result<T, String>,
    ) -> Self {
        Watched {
            loaded: Mutex::new((loaded.stamp, loaded.value)),
            path,
            parse,
            what,
        }
    }

    /// The current contents: re-read if the file changed.
    fn get(&self) -> Arc<T> {
        let stamp = FileStamp::of(&self.path);
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if stamp.is_some() && stamp != loaded.0 {
            loaded.0 = stamp;
            match (self.parse)(&self.path) {
                Ok(value) => {
                    info!(path = %self.path.display(), "{} reloaded", self.what);
                    loaded.1 = Arc::new(value);
                }
                Err(e) => {
                    warn!(error = %e, "{} not reloaded; the previous one stays in force", self.what)
                }
            }
        }
        loaded.1.clone()
    }
}

/// Checks each CONNECT's login against the password file.
pub struct LocalAuth {
    users: Watched<Passwords>,
    metrics: Arc<Metrics>,
    last_warning: Mutex<Option<Instant>>,
}

impl LocalAuth {
    /// Check logins against `users`, read from `path` when the config was
    /// loaded, and re-read when the file changes.
    pub fn new(path: PathBuf, users: Loaded<Passwords>, metrics: Arc<Metrics>) -> LocalAuth {
        info!(path = %path.display(), users = users.value.len(), "local clients must log in");
        let users = Watched::new(path, users, "password file", |p| {
            Passwords::load(p).map_err(|e| e.to_string())
        });
        LocalAuth {
            users,
            metrics,
            last_warning: Mutex::new(None),
        }
    }

    /// Whether this login may connect. PBKDF2 takes milliseconds, so the
    /// check runs on a blocking thread.
    pub async fn check(&self, client_id: &str, user: Option<&str>, password: Option<&str>) -> bool {
        let ok = match (user, password) {
            (Some(user), Some(password)) => {
                let users = self.users.get();
                let (user, password) = (user.to_string(), password.to_string());
                tokio::task::spawn_blocking(move || users.verify(&user, &password))
                    .await
                    .unwrap_or(false)
            }
            _ => false,
        };
        if !ok {
            self.refused(client_id);
        }
        ok
    }

    /// Count a refused login; warn at most every 10 s.
    pub fn refused(&self, client_id: &str) {
        self.metrics.broker_auth_failures.fetch_add(1, Relaxed);
        let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            *last = Some(Instant::now());
            warn!(%client_id, "local client refused: unknown user, wrong password or reserved client id (logged at most every 10 s; see broker_auth_failures)");
        }
    }
}

/// The ACL file, re-read when it changes.
pub struct AclFile(Watched<Acl>);

impl AclFile {
    /// Enforce `acl`, read from `path` when the config was loaded, and
    /// re-read when the file changes (its problems then come back one per
    /// line, `file:line:column`, and the previous rules stay).
    pub fn new(path: PathBuf, acl: Loaded<Acl>) -> AclFile {
        fn parse(p: &Path) -> Result<Acl, String> {
            Acl::load(p).map_err(|errors| {
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
        info!(path = %path.display(), users = acl.value.users(), patterns = acl.value.patterns(), "local topics restricted by the ACL file");
        AclFile(Watched::new(path, acl, "ACL file", parse))
    }

    pub fn current(&self) -> Arc<Acl> {
        self.0.get()
    }
}

/// What tells that a file changed: modification time, size and inode (an
/// atomic rewrite is a new inode, even within one timestamp tick).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp(SystemTime, u64, u64);

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp(m.modified().ok()?, m.len(), m.ino()))
    }
}
