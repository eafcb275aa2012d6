//! Evolve's agent as a shared object (`libevolve_attach_agent.so`), for processes that never
//! linked Evolve.
//!
//! `evolve attach PID` makes the process load this object on a thread of its own and call
//! [`evolve_code::attached::evolve_attach_entry`] (exported from here), which runs the starter
//! below: it starts the same agent a linked program starts with `evolve::agent::start()`, on the
//! socket directory the CLI chose, so every command (`status`, `functions`, `probe`, `top`,
//! `history`, `apply`, `revert`, `gc`) works on the process. A second attach finds the agent
//! running and reuses it; after `evolve detach` the object stays loaded and the next attach
//! restarts its agent without loading it again.
//!
//! The object is built with the workspace (`cargo build --release -p evolve-agent-so`) and found
//! next to the `evolve` binary.
//!
//! # Example
//!
//! ```sh
//! cargo build --release -p evolve-cli -p evolve-agent-so
//! target/release/evolve attach $(pgrep -n memcached)
//! target/release/evolve probe $(pgrep -n memcached) add sendmsg --count
//! ```

use evolve_code::attached::{AttachRequest, Starter, ATTACH_STARTERS};

#[linkme::distributed_slice(ATTACH_STARTERS)]
static START_AGENT: Starter = start_agent;

/// Starts the agent (or keeps the one running) and names its socket.
fn start_agent(request: &AttachRequest) -> Result<String, String> {
    evolve_agent::attached::start(&request.socket_dir)
        .map(|socket| socket.display().to_string())
        .map_err(|e| {
            format!(
                "the agent could not start its socket in {}: {e}",
                request.socket_dir.display()
            )
        })
}
