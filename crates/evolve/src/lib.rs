//! Evolve changes running programs without restarting them.
//!
//! This facade re-exports the layers a user depends on. Today that is the machine-code engine
//! ([`code`]): patch sites retargeted safely while threads run, near memory, springboards and
//! self-inspection. On it: [`multiverse`], run-time configuration switches specialised into the
//! live code (`#[evolve::switch]`, `#[evolve::multiverse(...)]`, [`multiverse::commit`]). Hot
//! update and probes build on it too.
//!
//! # Example
//!
//! ```
//! use evolve::code::FnSite;
//!
//! fn v1(x: u32) -> u32 { x + 1 }
//! fn v2(x: u32) -> u32 { x + 2 }
//!
//! let site = FnSite::new(v1 as fn(u32) -> u32).unwrap();
//! site.retarget(v1, v2).unwrap();
//! assert_eq!((site.entry())(40), 42);
//! ```
#![forbid(unsafe_code)]

/// Hot update: `#[evolve::hot]` functions take thin patches while the program runs.
///
/// Hot functions are module-level items (the stub is emitted with `global_asm!`).
///
/// ```no_run
/// // The program's build.rs calls `evolve_build::host()`.
/// #[evolve::hot]
/// fn price(quantity: u64) -> u64 {
///     quantity * 10
/// }
///
/// fn main() -> Result<(), evolve::hot::Error> {
///     assert_eq!(price(3), 30);
///     // Later, with the source edited and a patch built (`evolve build-patch`):
///     let report = evolve::hot::patch::apply("target/evolve/price-fix.so")?;
///     println!("updated {:?} in {:.2} ms", report.updated, report.total_ms);
///     Ok(())
/// }
/// ```
pub mod hot_update_example {}

/// The in-process control agent the `evolve` CLI talks to: `let _agent = evolve::agent::start()?;`
/// in `main` (see [`evolve_agent`]).
pub use evolve_agent as agent;
pub use evolve_code as code;
pub use evolve_hot as hot;
pub use evolve_hot::{adaptor, hot, safe_point, transfer};
pub use evolve_macros::{multiverse, switch, SwitchValue};
pub use evolve_multiverse as multiverse;
