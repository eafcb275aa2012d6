//! Operating-system primitives of the engine, one hazard per module.
//!
//! These are the only places that make system calls, touch code bytes, or run in signal
//! context. Each module documents its call order; the protocol that combines them lives in
//! [`crate::write`].
//!
//! Linux only for now; another OS would be a sibling directory offering the same modules.

#[cfg(feature = "fault-injection")]
pub mod inject;
pub mod loader;
pub mod maps;
pub mod membarrier;
pub mod memory;
pub mod pagemap;
pub mod peek;
pub mod ptrace;
pub mod regs;
pub mod signal;
pub mod trap;
pub mod walk;
pub mod world;
