//! Phase two: from a pid to its agent's socket, and to a connection.

use anyhow::{bail, Context as _, Result};
use evolve_agent::client::Connection;
use evolve_agent::paths;
use std::path::{Path, PathBuf};

/// The socket of process `pid` (or the one given with `--socket`).
pub fn socket_of(pid: u32, explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    if !Path::new(&format!("/proc/{pid}")).exists() {
        bail!("no process {pid}");
    }
    let owner = paths::process_owner(pid);
    let dirs = paths::candidate_dirs(owner);
    for dir in &dirs {
        let socket = paths::socket_path(dir, pid);
        if socket.exists() {
            return Ok(socket);
        }
    }
    let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    bail!(
        "process {pid} has no evolve agent (no {pid}.sock in {}); the program must call \
         evolve::agent::start()",
        searched.join(", ")
    )
}

/// A connection to the agent of `pid`.
pub fn connect(pid: u32, explicit: Option<&Path>) -> Result<Connection> {
    let socket = socket_of(pid, explicit)?;
    Connection::connect(&socket).with_context(|| format!("process {pid}"))
}
