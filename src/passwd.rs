//! The local broker's password file, in Mosquitto's format, so files from
//! `mosquitto_passwd` and from `edgeferry passwd` work in both:
//!
//! ```text
//! username:$7$<iterations>$<salt, base64>$<PBKDF2-HMAC-SHA512, base64>
//! username:$6$<salt, base64>$<SHA-512(password || salt), base64>
//! ```
//!
//! `edgeferry passwd` writes `$7$` with [`ITERATIONS`] rounds; both forms are
//! read. Lines starting with `#` and blank lines are ignored.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::pbkdf2;

/// PBKDF2 rounds for new entries. Mosquitto writes 101; more makes a stolen
/// file harder to crack, and checking one costs about 10 ms on a Pi 4,
/// once per connect.
pub const ITERATIONS: u32 = 10_000;
const SALT_LEN: usize = 12;
const HASH_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum PasswdError {
    /// Missing or unreadable: fix the path or permissions.
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A line that is not `user:$7$...` or `user:$6$...`: fix or rewrite it
    /// with `edgeferry passwd`.
    #[error("{path}:{line}: {what}")]
    Bad {
        path: PathBuf,
        line: usize,
        what: String,
    },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Usernames cannot contain ':' or be empty; passwords cannot be empty.
    #[error("{0}")]
    Invalid(String),
}

/// One stored password.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hash {
    Pbkdf2 {
        iterations: NonZeroU32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

impl Hash {
    fn parse(s: &str) -> Result<Hash, String> {
        let b64 = |what: &str, v: &str| {
            B64.decode(v)
                .map_err(|e| format!("the {what} is not base64 ({e})"))
        };
        let parts: Vec<&str> = s.split('$').collect();
        match parts.as_slice() {
            ["", "7", iterations, salt, hash] => {
                let iterations = iterations
                    .parse::<u32>()
                    .ok()
                    .and_then(NonZeroU32::new)
                    .ok_or_else(|| format!("iteration count {iterations:?} is not a positive number"))?;
                Ok(Hash::Pbkdf2 {
                    iterations,
                    salt: b64("salt", salt)?,
                    hash: b64("hash", hash)?,
                })
            }
            ["", "6", salt, hash] => Ok(Hash::Sha512 {
                salt: b64("salt", salt)?,
                hash: b64("hash", hash)?,
            }),
            _ => Err("expected user:$7$<iterations>$<salt>$<hash> (mosquitto_passwd or edgeferry passwd)".into()),
        }
    }

    fn new(password: &str) -> Hash {
        let mut salt = vec![0u8; SALT_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
            .expect("the system random generator works");
        let iterations = NonZeroU32::new(ITERATIONS).expect("non-zero");
        let mut hash = vec![0u8; HASH_LEN];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA512,
            iterations,
            &salt,
            password.as_bytes(),
            &mut hash,
        );
        Hash::Pbkdf2 {
            iterations,
            salt,
            hash,
        }
    }

    /// Constant-time check of `password` against this hash.
    fn verify(&self, password: &str) -> bool {
        match self {
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => pbkdf2::verify(
                pbkdf2::PBKDF2_HMAC_SHA512,
                *iterations,
                salt,
                password.as_bytes(),
                hash,
            )
            .is_ok(),
            Hash::Sha512 { salt, hash } => {
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA512);
                ctx.update(password.as_bytes());
                ctx.update(salt);
                let digest = ctx.finish();
                ct_eq(digest.as_ref(), hash)
            }
        }
    }
}

impl std::fmt::Display for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => write!(
                f,
                "$7${iterations}${}${}",
                B64.encode(salt),
                B64.encode(hash)
            ),
            Hash::Sha512 { salt, hash } => {
                write!(f, "$6${}${}", B64.encode(salt), B64.encode(hash))
            }
        }
    }
}

/// Equal, in time that depends only on the lengths (no early exit on the
/// first differing byte).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The users of a password file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Passwords {
    users: BTreeMap<String, Hash>,
}

impl Passwords {
    pub fn load(path: &Path) -> Result<Passwords, PasswdError> {
        let text = std::fs::read_to_string(path).map_err(|source| PasswdError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// A missing file is an empty one (for `edgeferry passwd` creating it).
    pub fn load_or_empty(path: &Path) -> Result<Passwords, PasswdError> {
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Passwords::default()),
            _ => Self::load(path),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Passwords, PasswdError> {
        let mut users = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |what: String| PasswdError::Bad {
                path: path.to_path_buf(),
                line: i + 1,
                what,
            };
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| bad("expected user:hash".into()))?;
            if user.is_empty() {
                return Err(bad("the username is empty".into()));
            }
            let hash = Hash::parse(hash).map_err(|e| bad(format!("user {user:?}: {e}")))?;
            users.insert(user.to_string(), hash);
        }
        Ok(Passwords { users })
    }

    /// Whether `user` exists and `password` is theirs.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        self.users.get(user).is_some_and(|h| h.verify(password))
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Add or replace `user` with a new salt and hash of `password`.
    pub fn set(&mut self, user: &str, password: &str) -> Result<(), PasswdError> {
        if user.is_empty() || user.contains([':', '\n', '\r']) {
            return Err(PasswdError::Invalid(format!(
                "invalid username {user:?}: it must be non-empty and contain no ':' or newline"
            )));
        }
        if password.is_empty() {
            return Err(PasswdError::Invalid("the password is empty".into()));
        }
        self.users.insert(user.to_string(), Hash::new(password));
        Ok(())
    }

    /// Remove `user`; whether they were there.
    pub fn remove(&mut self, user: &str) -> bool {
        self.users.remove(user).is_some()
    }

    /// Write the file (mode 0600, replaced atomically).
    pub fn save(&self, path: &Path) -> Result<(), PasswdError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let err = |source| PasswdError::Write {
            path: path.to_path_buf(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        for (user, hash) in &self.users {
            writeln!(f, "{user}:{hash}").map_err(err)?;
        }
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}

/// `edgeferry passwd FILE USER [-D]`: set `user`'s password (read from
/// standard input) or remove the user; what was done, for the terminal.
pub fn command(file: &Path, user: &str, delete: bool) -> Result<String, PasswdError> {
    let mut users = Passwords::load_or_empty(file)?;
    if delete {
        if !users.remove(user) {
            return Err(PasswdError::Invalid(format!(
                "{}: no user {user:?}",
                file.display()
            )));
        }
    } else {
        users.set(user, &read_password()?)?;
    }
    users.save(file)?;
    let did = if delete { "removed" } else { "set" };
    Ok(format!("{}: {did} {user}", file.display()))
}

/// The new password: on a terminal asked twice without echo, else the
/// first line of standard input (for scripts: `echo "$PW" | edgeferry passwd ...`).
pub fn read_password() -> Result<String, PasswdError> {
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    let read_line = || -> Result<String, PasswdError> {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| PasswdError::Invalid(format!("cannot read the password: {e}")))?;
        Ok(line.trim_end_matches(['\n', '\r']).to_string())
    };
    if !stdin.is_terminal() {
        return read_line();
    }
    let ask = |prompt: &str| -> Result<String, PasswdError> {
        eprint!("{prompt}");
        let _ = std::io::stderr().flush();
        let echo = Echo::off();
        let line = read_line();
        drop(echo);
        eprintln!();
        line
    };
    let first = ask("Password: ")?;
    if ask("Again: ")? != first {
        return Err(PasswdError::Invalid("the passwords do not match".into()));
    }
    Ok(first)
}

/// Terminal echo off until dropped.
struct Echo(Option<libc::termios>);

impl Echo {
    fn off() -> Echo {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a zeroed, then filled,
        // termios; failures leave the terminal as it was.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return Echo(None);
            }
            let saved = t;
            t.c_lflag &= !libc::ECHO;
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return Echo(None);
            }
            Echo(Some(saved))
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restores the settings read in `off`.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, saved);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_entry_verifies_and_survives_a_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let mut p = Passwords::default();
        p.set("sensor-1", "s3cret").unwrap();
        p.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("sensor-1:$7$10000$"), "{text}");
        assert!(!text.contains("s3cret"));
        let p = Passwords::load(&path).unwrap();
        assert!(p.verify("sensor-1", "s3cret"));
        assert!(!p.verify("sensor-1", "s3cret "));
        assert!(!p.verify("sensor-2", "s3cret"));
    }

    #[test]
    fn mosquitto_passwd_entries_verify() {
        // Written by Debian's mosquitto_passwd 2.0.11:
        // `mosquitto_passwd -c -b passwd alice wonderland` ($7$, 101 rounds).
        let p = Passwords::parse(
            "# a comment\nalice:$7$101$cKSjjNjo0VljHsG5$Um1LqyLuL5MdDG/YLm8Cr55qAYYyNmo4oMXQFKbmVieRgth+pmssVtEumld1h6/coekE4p88wSS26wkb7D1anQ==\n",
            Path::new("passwd"),
        )
        .unwrap();
        assert_eq!(p.len(), 1);
        assert!(p.verify("alice", "wonderland"));
        assert!(!p.verify("alice", "Wonderland"));
    }

    #[test]
    fn bad_lines_name_the_file_and_line() {
        let e = Passwords::parse("ok:$7$1$AAAA$AAAA\nbroken\n", Path::new("/etc/p")).unwrap_err();
        assert_eq!(e.to_string(), "/etc/p:2: expected user:hash");
        let e = Passwords::parse("u:$7$x$AAAA$AAAA\n", Path::new("p")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("p:1: user \"u\": iteration count"),
            "{e}"
        );
    }
}
