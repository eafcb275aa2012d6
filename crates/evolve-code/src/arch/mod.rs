//! Instruction encodings of the target architecture.
//!
//! Everything that knows an opcode lives here, so that a second architecture is a sibling file
//! offering the same items.

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::*;

#[cfg(not(target_arch = "x86_64"))]
compile_error!("evolve-code supports x86-64 only for now");
