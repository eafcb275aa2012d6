//! The agent of a C program: started by `evolve_start()`, stopped by `evolve_stop()` or at exit.

use evolve_agent::Agent;
use std::sync::Mutex;

static AGENT: Mutex<Option<Agent>> = Mutex::new(None);
static STOP_AT_EXIT: std::sync::Once = std::sync::Once::new();

/// Starts the agent unless it runs. Returns whether the caller should arrange for
/// [`stop`] at exit (the first start only).
pub(crate) fn start() -> Result<bool, String> {
    let mut agent = AGENT.lock().unwrap_or_else(|p| p.into_inner());
    if agent.is_none() {
        *agent =
            Some(evolve_agent::start().map_err(|e| format!("the agent could not start: {e}"))?);
    }
    let mut first = false;
    STOP_AT_EXIT.call_once(|| first = true);
    Ok(first)
}

/// Stops the agent (its socket is removed); nothing if it does not run.
pub(crate) fn stop() {
    let agent = AGENT.lock().unwrap_or_else(|p| p.into_inner()).take();
    drop(agent);
}
