//! Evolve's agent: the in-process control thread the `evolve` CLI talks to.
//!
//! One line in the program starts it; it serves a Unix socket at
//! `$XDG_RUNTIME_DIR/evolve/<pid>.sock` (or `/tmp/evolve-<uid>/<pid>.sock`), mode 0600, to
//! clients of the same uid or root ([`server`]), speaking line-delimited, versioned JSON
//! ([`protocol`]), and journals every change it makes ([`journal`]). Requests go to the
//! capabilities: hot update ([`evolve_hot`]), multiverse ([`evolve_multiverse`]) and probes
//! ([`evolve_probes`]).
//!
//! # Example
//!
//! ```no_run
//! fn main() -> std::io::Result<()> {
//!     // Keep the guard: dropping it (at the end of `main`) removes the socket.
//!     let _agent = evolve_agent::start()?;
//!     // ... the program ...
//!     Ok(())
//! }
//! ```
//!
//! Then, from a shell: `evolve ps`, `evolve status <pid>`, `evolve apply <pid> fix.so`,
//! `evolve probe <pid> add 'my_crate::handle_*' --latency`.
#![forbid(unsafe_code)]

pub mod attached;
pub mod client;
mod dispatch;
pub mod journal;
pub mod paths;
mod probes;
pub mod protocol;
pub mod server;

pub use server::Agent;

/// Starts the agent on this user's socket directory ([`paths::socket_dir`]).
///
/// # Errors
/// The directory cannot be created or is not private to this user, or the socket cannot be
/// bound.
pub fn start() -> std::io::Result<Agent> {
    server::start_in(&paths::socket_dir())
}

/// Starts the agent with its socket in `dir` (created mode 0700 if missing).
pub fn start_in(dir: impl AsRef<std::path::Path>) -> std::io::Result<Agent> {
    server::start_in(dir.as_ref())
}
