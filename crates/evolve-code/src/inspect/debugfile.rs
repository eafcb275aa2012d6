//! Separate debug information: where a stripped image's symbols are.
//!
//! Distributions strip their binaries and ship the `.symtab` (and DWARF) in a separate file,
//! found as GDB finds it:
//!
//! 1. by build id: `<root>/.build-id/<first two hex digits>/<the rest>.debug`;
//! 2. by the image's `.gnu_debuglink` name: next to the image, in its `.debug/` directory, or
//!    under `<root>` followed by the image's directory.
//!
//! `<root>` is `/usr/lib/debug`, or the directory named by `EVOLVE_DEBUG_ROOT` in the process's
//! environment (for tests, and for debug files installed elsewhere). A candidate is used only
//! if its build id is the loaded image's, so a debug file of another build is never believed.

use std::path::{Path, PathBuf};

/// The environment variable that replaces `/usr/lib/debug`.
pub const DEBUG_ROOT_VAR: &str = "EVOLVE_DEBUG_ROOT";

/// The directory of separate debug files.
pub(super) fn debug_root() -> PathBuf {
    std::env::var_os(DEBUG_ROOT_VAR)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("/usr/lib/debug"), PathBuf::from)
}

/// Where separate debug files of the image at `image_path` may be, best first.
pub(super) fn candidates(
    root: &Path,
    build_id: Option<&[u8]>,
    image_path: &Path,
    debuglink: Option<&[u8]>,
) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(id) = build_id.filter(|id| id.len() >= 2) {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        out.push(
            root.join(".build-id")
                .join(&hex[..2])
                .join(format!("{}.debug", &hex[2..])),
        );
    }
    if let (Some(name), Some(dir)) = (debuglink, image_path.parent()) {
        use std::os::unix::ffi::OsStrExt;
        let name = std::ffi::OsStr::from_bytes(name);
        out.push(dir.join(name));
        out.push(dir.join(".debug").join(name));
        let relative = dir.strip_prefix("/").unwrap_or(dir);
        out.push(root.join(relative).join(name));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_id_path_then_debuglink_places() {
        let c = candidates(
            Path::new("/usr/lib/debug"),
            Some(&[0xab, 0xcd, 0xef, 0x01]),
            Path::new("/usr/sbin/memcached"),
            Some(b"memcached.debug"),
        );
        let c: Vec<String> = c.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            c,
            [
                "/usr/lib/debug/.build-id/ab/cdef01.debug",
                "/usr/sbin/memcached.debug",
                "/usr/sbin/.debug/memcached.debug",
                "/usr/lib/debug/usr/sbin/memcached.debug",
            ]
        );
        assert!(candidates(Path::new("/d"), None, Path::new("/x"), None).is_empty());
    }
}
