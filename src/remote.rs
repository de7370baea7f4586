//! A rule file set sent from the cloud (the `rules` command on an
//! upstream's `control_topic`): checked exactly like `edgeferry check`,
//! its `[[test]]` cases run, and only if everything passes written into
//! `rules.dir`, replacing the files there, which are kept in
//! `rules.dir/.previous/` for `rollback`.
//!
//! The files are staged in `rules.dir/.incoming/` (the same filesystem, so
//! each lands with a rename); the directory loader skips dot-directories.
//! The router gets the compiled set in one step (the reloader hands it
//! over), so it never runs a half-written set; the file watcher's reload
//! that follows finds no change.

use std::path::{Path, PathBuf};

use crate::rules::{RuleSet, testing};
use crate::setup::Config;

/// At most this many files in one set.
pub const MAX_FILES: usize = 64;

const INCOMING: &str = ".incoming";
const PREVIOUS: &str = ".previous";

/// Why a set was refused: every problem, each a line (`file:line: ...`
/// for rule errors, named by the file name as sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub Vec<String>);

/// Check, test and (only if all passes) install `files` (name, text) as
/// the new contents of `rules.dir`; the compiled set to run.
pub fn install(config: &Config, files: &[(String, String)]) -> Result<RuleSet, Refused> {
    check_names(files)?;
    let dir = &config.file.rules.dir;
    let incoming = dir.join(INCOMING);
    let staged = stage(&incoming, files).map_err(|e| writable(dir, e))?;
    let checked = check(config, &incoming, &staged);
    let set = match checked {
        Ok(set) => set,
        Err(refused) => {
            let _ = std::fs::remove_dir_all(&incoming);
            return Err(refused);
        }
    };
    let swapped = swap(dir, &incoming, files);
    let _ = std::fs::remove_dir_all(&incoming);
    swapped.map_err(|e| writable(dir, e))?;
    Ok(set)
}

/// The set kept by the last install, for `rollback`.
pub fn previous(config: &Config) -> Result<Vec<(String, String)>, Refused> {
    let dir = config.file.rules.dir.join(PREVIOUS);
    let files = crate::rules::toml_files(&dir).map_err(|e| {
        Refused(vec![format!(
            "no previous rule set in {}: {e}",
            dir.display()
        )])
    })?;
    files
        .iter()
        .map(|p| {
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            std::fs::read_to_string(p)
                .map(|t| (name, t))
                .map_err(|e| Refused(vec![format!("{}: {e}", p.display())]))
        })
        .collect()
}

/// File names are plain `*.toml` names: nothing that could leave the
/// directory or hide (no `/`, no leading dot), at least one, no repeats.
fn check_names(files: &[(String, String)]) -> Result<(), Refused> {
    let mut errors = Vec::new();
    if files.is_empty() {
        errors.push(
            "the set has no files; send at least one *.toml (an empty set would drop every rule)"
                .to_string(),
        );
    }
    if files.len() > MAX_FILES {
        errors.push(format!(
            "{} files: at most {MAX_FILES} in one set",
            files.len()
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (name, _) in files {
        let plain = name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !plain || name.starts_with('.') || !name.ends_with(".toml") || name.len() > 128 {
            errors.push(format!(
                "file name {name:?}: use a plain name like \"10-sensors.toml\" (letters, digits, . - _; ending in .toml)"
            ));
        }
        if !seen.insert(name) {
            errors.push(format!("file name {name:?} is in the set twice"));
        }
    }
    match errors.is_empty() {
        true => Ok(()),
        false => Err(Refused(errors)),
    }
}

/// Write the files into a fresh staging directory; their paths, in name
/// order (the order rules load in).
fn stage(incoming: &Path, files: &[(String, String)]) -> std::io::Result<Vec<PathBuf>> {
    if incoming.exists() {
        std::fs::remove_dir_all(incoming)?;
    }
    std::fs::create_dir_all(incoming)?;
    let mut paths = Vec::new();
    for (name, text) in files {
        let path = incoming.join(name);
        std::fs::write(&path, text)?;
        paths.push(path);
    }
    paths.sort();
    Ok(paths)
}

/// What `edgeferry check` and `edgeferry test` would say of the staged
/// files, with the staging directory taken out of every message.
fn check(config: &Config, incoming: &Path, staged: &[PathBuf]) -> Result<RuleSet, Refused> {
    let prefix = format!("{}/", incoming.display());
    let plain = |s: String| s.replace(&prefix, "");
    let set = config
        .file
        .load_rules(Some(staged))
        .map_err(|d| Refused(d.0.into_iter().map(|d| plain(d.to_string())).collect()))?;
    let failed: Vec<String> = testing::run_all(&set)
        .into_iter()
        .filter_map(|o| {
            let why = o.failure?;
            Some(plain(format!("test failed: {}\n{why}", o.label)))
        })
        .collect();
    match failed.is_empty() {
        true => Ok(set),
        false => Err(Refused(failed)),
    }
}

/// Move the current files to `.previous/` and the staged ones in, each by
/// a rename; on a failure midway, the previous files are put back.
fn swap(dir: &Path, incoming: &Path, files: &[(String, String)]) -> std::io::Result<()> {
    let previous = dir.join(PREVIOUS);
    if previous.exists() {
        std::fs::remove_dir_all(&previous)?;
    }
    std::fs::create_dir_all(&previous)?;
    let current = crate::rules::toml_files(dir)?;
    for p in &current {
        std::fs::rename(p, previous.join(p.file_name().unwrap_or_default()))?;
    }
    let moved = files
        .iter()
        .try_for_each(|(name, _)| std::fs::rename(incoming.join(name), dir.join(name)));
    if let Err(e) = moved {
        for (name, _) in files {
            let _ = std::fs::remove_file(dir.join(name));
        }
        for p in &current {
            let _ = std::fs::rename(previous.join(p.file_name().unwrap_or_default()), p);
        }
        return Err(e);
    }
    // The renames are durable once the directory is.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// An I/O failure, with what to do when the directory is read-only (the
/// packaged systemd unit's ProtectSystem=strict).
fn writable(dir: &Path, e: std::io::Error) -> Refused {
    let hint = match e.raw_os_error() {
        Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM) => format!(
            " (under systemd add ReadWritePaths={} to the unit, or leave control_topic off)",
            dir.display()
        ),
        _ => String::new(),
    };
    Refused(vec![format!(
        "cannot write the rules into {}: {e}{hint}; the previous rules keep running",
        dir.display()
    )])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(names: &[&str]) -> Vec<(String, String)> {
        names
            .iter()
            .map(|n| (n.to_string(), String::new()))
            .collect()
    }

    #[test]
    fn only_plain_toml_names_pass() {
        assert!(check_names(&files(&["10-a.toml", "b_c.toml"])).is_ok());
        for bad in ["../x.toml", "a/b.toml", ".hidden.toml", "x.txt", "x y.toml"] {
            assert!(check_names(&files(&[bad])).is_err(), "{bad}");
        }
        let Refused(e) = check_names(&files(&["a.toml", "a.toml"])).unwrap_err();
        assert!(e[0].contains("twice"), "{e:?}");
        assert!(check_names(&[]).is_err());
    }
}
