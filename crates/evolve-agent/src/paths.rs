//! Where agents' sockets live, and recognising stale ones.
//!
//! The directory is, in order: `$EVOLVE_SOCKET_DIR` (tests, unusual setups),
//! `$XDG_RUNTIME_DIR/evolve`, or `/tmp/evolve-<uid>`. The agent creates it with mode 0700 and
//! refuses one that is not a directory owned by its uid with no group or other access (a
//! directory under `/tmp` could have been planted by another user). Each process's socket is
//! `<dir>/<pid>.sock` and its journal `<dir>/<pid>.journal`.
//!
//! A socket is **stale** when its process is gone (no `/proc/<pid>`) or nobody accepts on it
//! (the process died and its pid was reused by a process without an agent).

use rustix::fs::{Mode, OFlags};
use std::io;
use std::path::{Path, PathBuf};

/// The socket directory for the current user.
pub fn socket_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EVOLVE_SOCKET_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR") {
        if !runtime.is_empty() {
            return PathBuf::from(runtime).join("evolve");
        }
    }
    fallback_dir(rustix::process::geteuid().as_raw())
}

/// The fallback directory of user `uid`.
pub fn fallback_dir(uid: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/evolve-{uid}"))
}

/// The directories in which the CLI looks for a process's socket: the current user's, and
/// those of `owner` (the process's uid) if it is another user.
pub fn candidate_dirs(owner: Option<u32>) -> Vec<PathBuf> {
    let mut dirs = vec![socket_dir()];
    if std::env::var_os("EVOLVE_SOCKET_DIR").is_none() {
        if let Some(owner) = owner {
            for dir in [
                PathBuf::from(format!("/run/user/{owner}/evolve")),
                fallback_dir(owner),
            ] {
                if !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
        }
    }
    dirs
}

/// The socket of process `pid` in `dir`.
pub fn socket_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.sock"))
}

/// The journal of process `pid` in `dir`.
pub fn journal_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.journal"))
}

/// Creates `dir` (mode 0700) if needed and checks it is private to this user.
pub fn prepare_dir(dir: &Path) -> io::Result<()> {
    match rustix::fs::mkdir(dir, Mode::RWXU) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => {
            // The parent may be missing (e.g. an EVOLVE_SOCKET_DIR of several levels).
            if e == rustix::io::Errno::NOENT {
                std::fs::create_dir_all(dir)?;
                rustix::fs::chmod(dir, Mode::RWXU)?;
            } else {
                return Err(e.into());
            }
        }
    }
    let fd = rustix::fs::open(
        dir,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        io::Error::other(format!(
            "{}: not a directory we can use ({e})",
            dir.display()
        ))
    })?;
    let stat = rustix::fs::fstat(&fd)?;
    let me = rustix::process::geteuid().as_raw();
    if stat.st_uid != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {}, not to this process's uid {me}: refusing to put a control socket there",
                dir.display(),
                stat.st_uid
            ),
        ));
    }
    if stat.st_mode & 0o077 != 0 {
        rustix::fs::fchmod(&fd, Mode::RWXU)?;
    }
    Ok(())
}

/// A socket found in a socket directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The process id in its name.
    pub pid: u32,
    /// The socket.
    pub path: PathBuf,
    /// Whether its process no longer exists.
    pub process_gone: bool,
}

/// The `<pid>.sock` files in `dir`, by pid.
pub fn list_sockets(dir: &Path) -> Vec<Found> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<Found> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let pid: u32 = name.strip_suffix(".sock")?.parse().ok()?;
            Some(Found {
                pid,
                path: e.path(),
                process_gone: !Path::new(&format!("/proc/{pid}")).exists(),
            })
        })
        .collect();
    found.sort_by_key(|f| f.pid);
    found
}

/// The uid owning process `pid`, from `/proc/<pid>/status`.
pub fn process_owner(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    // Real, effective, saved, filesystem: the effective uid owns the socket.
    line.split_whitespace().nth(2)?.parse().ok()
}
