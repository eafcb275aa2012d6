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

pub use evolve_code as code;
pub use evolve_macros::{multiverse, switch, SwitchValue};
pub use evolve_multiverse as multiverse;
