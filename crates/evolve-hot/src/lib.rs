//! Evolve hot update: ship new code into a running multi-threaded Rust process.
//!
//! Functions marked `#[evolve::hot]` are called through a stub (one direct `jmp`). A **thin
//! patch** — a shared object built from the edited source of the crates that changed, carrying
//! only their code and binding to the running program for everything else — is applied with
//! [`patch::apply`]: verified against the running program, loaded, and bound by retargeting the
//! stubs of the functions it changes, while threads keep running. Calls already running finish on
//! the code they started with; new calls run the new code; statics of the program (and of every
//! dependency) are shared, so state, connections, loggers and runtimes carry over.
//!
//! Patches are built by the control layer's `evolve-builder` crate (the `evolve build-patch`
//! command calls it); a server links no code that runs cargo.
//!
//! C programs prepare hot functions with `evolve.h` (compiler-reserved entry padding instead of
//! a stub) and redirect them with [`padded`].
//!
//! # Example
//!
//! Through the `evolve` facade, whose paths the macro's expansion uses (this example is compiled
//! in the facade's documentation):
//!
//! ```ignore
//! // In the program (its build.rs calls `evolve_build::host()`):
//! #[evolve::hot]
//! fn price(quantity: u64) -> u64 {
//!     quantity * 10
//! }
//!
//! // Later, with the source edited and a patch built:
//! let report = evolve::hot::patch::apply("target/evolve/price-fix.so")?;
//! println!("updated {:?} in {:.2} ms", report.updated, report.total_ms);
//! # Ok::<(), evolve::hot::Error>(())
//! ```
#![forbid(unsafe_code)]

pub mod canary;
mod error;
pub mod manifest;
pub mod padded;
pub mod patch;
pub mod reclaim;
pub mod safepoint;
mod trial;
pub mod unprepared;

pub use error::{Error, ErrorKind, Result};
pub use evolve_hot_macros::{adaptor, hot, transfer};
pub use safepoint::safe_point;

#[doc(hidden)]
pub mod __private {
    pub use crate::canary::{CanaryRoute, CANARY_ROUTES};
    pub use evolve_code::stub::{StubEntry, STUBS};
    pub use evolve_code::InteriorMutable;
    pub use linkme;
}
