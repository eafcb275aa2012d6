//! Evolve's patch builder (control layer): a server links no code that runs cargo.
//!
//! Format 1 (`.so` patches of `#[evolve::hot]` functions, applied by
//! `evolve_hot::patch::apply`) is built by [`so`].

pub mod so;

use std::path::PathBuf;

/// Which binary the patch is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// A binary file.
    Path(PathBuf),
    /// A running process (its binary through `/proc/PID/exe`).
    Pid(u32),
}

impl Base {
    /// The file to read the binary from.
    pub fn file(&self) -> PathBuf {
        match self {
            Base::Path(p) => p.clone(),
            Base::Pid(pid) => PathBuf::from(format!("/proc/{pid}/exe")),
        }
    }
}
