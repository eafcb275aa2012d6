//! The harness around the example servers — the kv server (`examples/kv`) and the async http
//! service (`examples/http`) — shared by the one-command demo
//! (`cargo run --release -p evolve-demo`), the live-update test with `redis-benchmark`, and the
//! `kv-live-update` benchmark:
//!
//! - [`workspace`]: a private copy of the example as its own cargo workspace (so its source can
//!   be edited and patches built against it without touching the repository), built with or
//!   without Evolve, with the ready source patches of `examples/kv/patches/` applied to it;
//! - [`server`]: a running server process and its agent;
//! - [`client`]: a small RESP2 client and a load generator that checks every reply;
//! - [`http`]: a minimal HTTP/1.1 client for the http service.
//!
//! ```no_run
//! use evolve_demo::{server::Server, workspace::{Flavor, KvWorkspace}};
//!
//! let workspace = KvWorkspace::prepare("example")?;
//! let binary = workspace.build(Flavor::Evolve)?;
//! let server = Server::start(&binary, None)?;
//! workspace.apply_source_patch("01-incr-type-check")?;
//! let patch = workspace.build_patch(server.pid, "fix")?;
//! server.control()?.apply(&patch)?;
//! # Ok::<(), anyhow::Error>(())
//! ```

pub mod client;
pub mod http;
pub mod server;
pub mod workspace;
