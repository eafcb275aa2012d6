//! The agent of a process that loaded it through `evolve attach` rather than linking it: one per
//! process, started from outside by the attach entry and stopped by `evolve detach`.
//!
//! A linked program owns its [`Agent`] guard; an attached one cannot (nobody in the program
//! knows about it), so the guard lives here. [`start`] is idempotent: attaching twice reuses
//! the running agent. [`detach`] serves the `detach` request: it removes every probe, refuses
//! while patches are applied (naming them) unless asked to revert them, and stops the agent's
//! threads and socket. The shared object stays mapped (its code may still be referenced by
//! quarantined trampolines, and thread-local destructors pin it), so the next attach restarts
//! the agent without loading it again.

use crate::dispatch::Context;
use crate::journal::Client;
use crate::protocol::{Detached, ErrorKind};
use crate::server::Agent;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

static AGENT: Mutex<Option<Agent>> = Mutex::new(None);

/// Starts the agent on `dir` unless it already runs; returns its socket.
///
/// # Errors
/// As [`crate::start_in`].
///
/// # Example
/// ```no_run
/// let socket = evolve_agent::attached::start(std::path::Path::new("/tmp/evolve-0"))?;
/// assert_eq!(socket, evolve_agent::attached::start(std::path::Path::new("/tmp/evolve-0"))?);
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn start(dir: &Path) -> io::Result<PathBuf> {
    let mut agent = AGENT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(running) = agent.as_ref() {
        return Ok(running.socket().to_path_buf());
    }
    let started = crate::start_in(dir)?;
    let socket = started.socket().to_path_buf();
    *agent = Some(started);
    Ok(socket)
}

/// Whether this process's agent was brought in by `evolve attach` (and still runs).
pub fn is_attached() -> bool {
    AGENT.lock().unwrap_or_else(|p| p.into_inner()).is_some()
}

type Outcome = Result<Detached, (ErrorKind, String)>;

/// Serves `detach`: every probe removed, patches refused (or reverted with `revert`), the agent
/// stopped (its socket removed) once the reply is sent.
pub fn detach(context: &Context, client: Client, revert: bool) -> Outcome {
    if !is_attached() {
        return Err((
            ErrorKind::Failed,
            "this process linked its agent (evolve::agent::start()): it stops with the program, \
             not with `evolve detach`"
                .into(),
        ));
    }
    let applied: Vec<String> = evolve_hot::patch::history()
        .into_iter()
        .filter(|p| p.reverted_at.is_none())
        .map(|p| p.name)
        .collect();
    if !applied.is_empty() && !revert {
        return Err((
            ErrorKind::Failed,
            format!(
                "patches are applied: {}; revert them first or detach with --revert",
                applied.join(", ")
            ),
        ));
    }
    let mut reverted = Vec::new();
    for patch in applied.iter().rev() {
        evolve_hot::patch::revert(evolve_hot::patch::Revert::Patch(patch.clone()))
            .map_err(|e| (ErrorKind::Failed, format!("reverting {patch}: {e}")))?;
        reverted.push(patch.clone());
    }
    let probes = context.probes.list().probes.len();
    evolve_probes::remove_all().map_err(|e| (ErrorKind::Failed, e.to_string()))?;
    context.probes.remove(None, None, true).ok();
    context.journal.record(
        client,
        "detach",
        String::new(),
        Ok(format!(
            "removed {probes} probes, reverted [{}]",
            reverted.join(", ")
        )),
    );
    // Stop after this reply: the connection serving it holds no guard, so dropping the agent
    // here (which joins only the accepting thread) is safe; the socket file goes with it.
    let agent = AGENT.lock().unwrap_or_else(|p| p.into_inner()).take();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(agent);
    });
    Ok(Detached {
        probes_removed: probes,
        reverted,
    })
}
