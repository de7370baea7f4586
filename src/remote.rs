//! A rule file set sent from the cloud (the `rules` command on an
//! upstream's `control_topic`): checked exactly like `edgeferry check`,
//! its `[[test]]` cases run, and only if everything passes written into
//! `rules.dir`, replacing the files there, which are kept in
//! `rules.dir/.previous/` for `rollback`.
//!
//! The files are staged in `rules.dir/.incoming/` (the same filesystem, so
//! each lands with a rename; the directory loader skips dot-directories)
//! and synced. Writing `.incoming/MANIFEST` (the new set's names) is the
//! commit point: before it nothing in `rules.dir` has changed; after it
//! the swap is finished, by this install or, after a crash, by the next
//! start (`recover`), never left half done. A swap that fails midway (a
//! file that cannot be renamed) is undone, the previous files put back.
//! The router gets the compiled set in one step (the reloader hands it
//! over, and runs one request at a time, so the file watcher's reload
//! comes after the swap and finds no change).

use std::path::{Path, PathBuf};

use crate::rules::{RuleSet, testing};
use crate::setup::Config;

/// At most this many files in one set.
pub const MAX_FILES: usize = 64;

const INCOMING: &str = ".incoming";
const PREVIOUS: &str = ".previous";
const MANIFEST: &str = "MANIFEST";

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
    let swapped = swap(dir);
    let _ = std::fs::remove_dir_all(&incoming);
    swapped.map_err(|e| writable(dir, e))?;
    Ok(set)
}

/// At start, before the rules are loaded: finish an install a crash
/// interrupted after its commit point, or throw away one interrupted
/// before it. What was done, for the log.
pub fn recover(dir: &Path) -> Option<String> {
    let incoming = dir.join(INCOMING);
    if !incoming.exists() {
        return None;
    }
    let done = match incoming.join(MANIFEST).exists() {
        true => match roll_forward(dir) {
            Ok(()) => "finished a remote rule install that was interrupted (the new set is in place; the previous one is in .previous)".to_string(),
            Err(e) => {
                undo(dir);
                format!("could not finish an interrupted remote rule install ({e}); the previous rules were put back")
            }
        },
        false => "removed a remote rule upload that was interrupted before it was applied".to_string(),
    };
    let _ = std::fs::remove_dir_all(&incoming);
    sync_dir(dir);
    Some(done)
}

/// The set kept by the last install, for `rollback`.
pub fn previous(config: &Config) -> Result<Vec<(String, String)>, Refused> {
    let dir = config.file.rules.dir.join(PREVIOUS);
    let files = set_files(&dir).map_err(|e| {
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

/// File names are plain `*.toml` (rules) and `*.json` (the schemas they
/// name) names: nothing that could leave the directory or hide (no `/`,
/// no leading dot), at least one rule file, no repeats.
fn check_names(files: &[(String, String)]) -> Result<(), Refused> {
    let mut errors = Vec::new();
    if !files.iter().any(|(n, _)| n.ends_with(".toml")) {
        errors.push(
            "the set has no rule files; send at least one *.toml (an empty set would drop every rule)"
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
        let kind = name.ends_with(".toml") || name.ends_with(".json");
        if !plain || name.starts_with('.') || !kind || name.len() > 128 {
            errors.push(format!(
                "file name {name:?}: use a plain name like \"10-sensors.toml\" or \"door.schema.json\" (letters, digits, . - _; ending in .toml or .json)"
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

/// Write the files into a fresh staging directory; the rule files' paths,
/// in name order (the order rules load in; the schemas are found from them).
fn stage(incoming: &Path, files: &[(String, String)]) -> std::io::Result<Vec<PathBuf>> {
    if incoming.exists() {
        std::fs::remove_dir_all(incoming)?;
    }
    std::fs::create_dir_all(incoming)?;
    let mut paths = Vec::new();
    for (name, text) in files {
        let path = incoming.join(name);
        write_synced(&path, text.as_bytes())?;
        if name.ends_with(".toml") {
            paths.push(path);
        }
    }
    sync_dir(incoming);
    paths.sort();
    Ok(paths)
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
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

/// The staged set (verified) replaces the current one: `.previous` is
/// emptied, the manifest written (the commit point), then `roll_forward`;
/// a failure in that is undone.
fn swap(dir: &Path) -> std::io::Result<()> {
    let incoming = dir.join(INCOMING);
    let previous = dir.join(PREVIOUS);
    if previous.exists() {
        std::fs::remove_dir_all(&previous)?;
    }
    std::fs::create_dir_all(&previous)?;
    let mut names: Vec<String> = set_files(&incoming)?
        .iter()
        .filter_map(|p| Some(p.file_name()?.to_str()?.to_string()))
        .collect();
    names.sort();
    let tmp = incoming.join(".MANIFEST.tmp");
    write_synced(&tmp, names.join("\n").as_bytes())?;
    std::fs::rename(&tmp, incoming.join(MANIFEST))?;
    sync_dir(&incoming);
    roll_forward(dir).inspect_err(|_| undo(dir))
}

/// The names of the committed set.
fn manifest(dir: &Path) -> std::io::Result<Vec<String>> {
    let text = std::fs::read_to_string(dir.join(INCOMING).join(MANIFEST))?;
    Ok(text
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// Make `rules.dir` hold exactly the manifest's files: every current file
/// that is not in it, or is replaced, to `.previous`, then the staged ones
/// in. Each step is a rename, and a step already done is skipped, so it can
/// be run again after a crash at any point.
fn roll_forward(dir: &Path) -> std::io::Result<()> {
    let (incoming, previous) = (dir.join(INCOMING), dir.join(PREVIOUS));
    let names = manifest(dir)?;
    std::fs::create_dir_all(&previous)?;
    for p in set_files(dir)? {
        let name = p.file_name().unwrap_or_default();
        let replaced = incoming.join(name).exists();
        if replaced || !names.iter().any(|n| std::ffi::OsStr::new(n) == name) {
            std::fs::rename(&p, previous.join(name))?;
        }
    }
    for name in &names {
        let staged = incoming.join(name);
        if staged.exists() {
            std::fs::rename(&staged, dir.join(name))?;
        }
    }
    sync_dir(&previous);
    sync_dir(dir);
    Ok(())
}

/// Put the previous files back after a swap failed midway: the new ones
/// moved in go back to staging, the previous ones return, and the
/// manifest goes (the install did not happen). Best effort: each step is
/// tried whatever the others did.
fn undo(dir: &Path) {
    let (incoming, previous) = (dir.join(INCOMING), dir.join(PREVIOUS));
    for name in manifest(dir).unwrap_or_default() {
        let (now, staged) = (dir.join(&name), incoming.join(&name));
        if now.exists() && !staged.exists() {
            let _ = std::fs::rename(&now, &staged);
        }
    }
    for p in set_files(&previous).unwrap_or_default() {
        let back = dir.join(p.file_name().unwrap_or_default());
        if !back.exists() {
            let _ = std::fs::rename(&p, back);
        }
    }
    let _ = std::fs::remove_file(incoming.join(MANIFEST));
    sync_dir(dir);
}

/// The files a set is made of, in `dir`: rule files and schema files, in
/// name order (not directories, not dot-files).
fn set_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = crate::rules::files_with(dir, &["toml", "json"])?;
    files.retain(|p| {
        !p.file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .starts_with('.')
    });
    Ok(files)
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

    /// `rules.dir` after `recover`: its *.toml names and texts.
    fn contents(dir: &Path) -> Vec<(String, String)> {
        set_files(dir)
            .unwrap()
            .iter()
            .map(|p| {
                let name = p.file_name().unwrap().to_str().unwrap().to_string();
                (name, std::fs::read_to_string(p).unwrap())
            })
            .collect()
    }

    fn rules_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (n, t) in files {
            std::fs::write(d.path().join(n), t).unwrap();
        }
        d
    }

    fn staged(dir: &Path, files: &[(&str, &str)], committed: bool) {
        let incoming = dir.join(INCOMING);
        std::fs::create_dir_all(&incoming).unwrap();
        for (n, t) in files {
            std::fs::write(incoming.join(n), t).unwrap();
        }
        if committed {
            let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
            std::fs::write(incoming.join(MANIFEST), names.join("\n")).unwrap();
        }
    }

    fn owned(files: &[(&str, &str)]) -> Vec<(String, String)> {
        files
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect()
    }

    #[test]
    fn a_crash_after_the_commit_point_is_finished_at_start_at_any_step() {
        let old = [("10-a.toml", "old a"), ("20-b.toml", "old b")];
        let new = [("10-a.toml", "new a"), ("30-c.toml", "new c")];
        // Every point of the roll-forward: k of its renames done.
        for k in 0..=4 {
            let d = rules_dir(&old);
            staged(d.path(), &new, true);
            let steps: [(&str, &str, &str); 4] = [
                ("10-a.toml", "", PREVIOUS),
                ("20-b.toml", "", PREVIOUS),
                ("10-a.toml", INCOMING, ""),
                ("30-c.toml", INCOMING, ""),
            ];
            std::fs::create_dir_all(d.path().join(PREVIOUS)).unwrap();
            for (name, from, to) in &steps[..k] {
                std::fs::rename(d.path().join(from).join(name), d.path().join(to).join(name))
                    .unwrap();
            }
            assert!(recover(d.path()).unwrap().starts_with("finished"));
            assert_eq!(contents(d.path()), owned(&new), "after {k} steps");
            assert_eq!(
                contents(&d.path().join(PREVIOUS)),
                owned(&old),
                "after {k} steps"
            );
            assert!(!d.path().join(INCOMING).exists());
        }
    }

    #[test]
    fn a_crash_before_the_commit_point_changes_nothing() {
        let old = [("10-a.toml", "old a")];
        let d = rules_dir(&old);
        staged(
            d.path(),
            &[("10-a.toml", "new a"), ("30-c.toml", "new c")],
            false,
        );
        assert!(recover(d.path()).unwrap().starts_with("removed"));
        assert_eq!(contents(d.path()), owned(&old));
        assert!(recover(d.path()).is_none(), "nothing left to do");
    }

    #[test]
    fn a_swap_that_fails_midway_puts_the_previous_files_back() {
        let old = [("10-a.toml", "old a"), ("20-b.toml", "old b")];
        let d = rules_dir(&old);
        staged(
            d.path(),
            &[("10-a.toml", "new a"), ("30-c.toml", "new c")],
            false,
        );
        // A directory where a staged file should land: its rename fails.
        std::fs::create_dir_all(d.path().join("30-c.toml/x")).unwrap();
        assert!(swap(d.path()).is_err());
        std::fs::remove_dir_all(d.path().join("30-c.toml")).unwrap();
        assert_eq!(contents(d.path()), owned(&old));
        assert!(!d.path().join(INCOMING).join(MANIFEST).exists());
    }

    #[test]
    fn only_plain_toml_and_json_names_pass() {
        assert!(check_names(&files(&["10-a.toml", "b_c.toml", "door.v1.schema.json"])).is_ok());
        for bad in [
            "../x.toml",
            "a/b.toml",
            ".hidden.toml",
            "x.txt",
            "x y.toml",
            "s/x.json",
        ] {
            assert!(check_names(&files(&["a.toml", bad])).is_err(), "{bad}");
        }
        let Refused(e) = check_names(&files(&["a.toml", "a.toml"])).unwrap_err();
        assert!(e[0].contains("twice"), "{e:?}");
        assert!(check_names(&[]).is_err());
        let Refused(e) = check_names(&files(&["only.json"])).unwrap_err();
        assert!(e[0].contains("no rule files"), "{e:?}");
    }

    /// Schemas are part of a set: staged beside its rule files (so the
    /// check finds them), swapped in with them, and kept for rollback.
    #[test]
    fn a_set_with_schema_files_replaces_the_directory_and_keeps_the_old_ones() {
        let old = [("10-a.toml", "old a"), ("t.json", "old schema")];
        let new = [("10-a.toml", "new a"), ("door.json", "new schema")];
        let d = rules_dir(&old);
        let paths = stage(&d.path().join(INCOMING), &owned(&new)).unwrap();
        let names: Vec<_> = paths.iter().map(|p| p.file_name().unwrap()).collect();
        assert_eq!(names, ["10-a.toml"], "the rule files are what loads");
        assert!(d.path().join(INCOMING).join("door.json").is_file());
        swap(d.path()).unwrap();
        assert_eq!(contents(d.path()), owned(&new));
        assert_eq!(contents(&d.path().join(PREVIOUS)), owned(&old));
    }
}
