//! What an attach must not leave behind when it fails because the process exited meanwhile.
//!
//! The agent, once loaded, creates files of its own in the socket directory (the directory
//! itself, `<pid>.sock`, `<pid>.journal`); a process that exits in the moments between their
//! creation and the greeting dies without removing them. Everything in the process itself (the
//! loader region, the loader thread, a memfd) goes with it.

use crate::process;
use evolve_agent::paths;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The agent's files of one process as they were before an attach.
pub(crate) struct Traces {
    pid: u32,
    dir: PathBuf,
    dir_existed: bool,
    journal_existed: bool,
}

impl Traces {
    /// Notes which of `pid`'s files exist in `dir` before the attach.
    pub(crate) fn before(pid: u32, dir: &Path) -> Traces {
        Traces {
            pid,
            dir: dir.to_path_buf(),
            dir_existed: dir.exists(),
            journal_existed: paths::journal_path(dir, pid).exists(),
        }
    }

    /// After a failed attach: if the process has exited, removes what its agent created (the
    /// socket, which nobody accepts on any more; the journal and the directory if they are
    /// new). A live process keeps its files, as does a socket someone accepts on (the pid was
    /// reused by a process with an agent of its own).
    pub(crate) fn remove_if_exited(&self) {
        if !process::dying(self.pid) {
            return;
        }
        // Its descriptors (the agent's listening socket) are closed once its last thread is
        // gone: a moment after the memory, on a loaded machine.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !process::exited(self.pid) {
            if Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let socket = paths::socket_path(&self.dir, self.pid);
        if socket.exists() {
            match UnixStream::connect(&socket) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    let _ = std::fs::remove_file(&socket);
                }
                _ => return,
            }
        }
        if !self.journal_existed {
            let _ = std::fs::remove_file(paths::journal_path(&self.dir, self.pid));
        }
        if !self.dir_existed {
            // Only if empty: other processes' sockets may have appeared in it meanwhile.
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}
