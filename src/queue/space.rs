//! Space on the filesystem holding a file (the queue's): what the free-space
//! watermark and the config check look at.

use std::ffi::CString;
use std::path::Path;

/// Space for unprivileged writers, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub free: u64,
    /// The filesystem's size as unprivileged writers see it (root's
    /// reserved blocks excluded, as from `free`).
    pub total: u64,
}

/// The space of the filesystem holding `file`, found from its nearest
/// existing directory (at `check` time the queue's directory may not exist
/// yet); `None` where the system cannot say.
pub fn space(file: &Path) -> Option<Space> {
    let mut dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    while !dir.exists() {
        dir = dir.parent().filter(|p| !p.as_os_str().is_empty())?;
    }
    let c = CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    let frsize = st.f_frsize as u64;
    // Blocks root may use and others may not: `bavail` excludes them.
    let reserved = (st.f_bfree as u64).saturating_sub(st.f_bavail as u64);
    (rc == 0).then(|| Space {
        free: st.f_bavail as u64 * frsize,
        total: (st.f_blocks as u64).saturating_sub(reserved) * frsize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_does_not_exist_yet_is_measured_from_its_nearest_directory() {
        let dir = tempfile::tempdir().unwrap();
        let here = space(&dir.path().join("q.db")).unwrap();
        let deeper = space(&dir.path().join("a/b/c/q.db")).unwrap();
        assert_eq!(here.total, deeper.total);
        assert!(here.free <= here.total && here.total > 0);
        assert!(
            space(Path::new("q.db")).is_some(),
            "relative: the current directory"
        );
    }
}
