//! Stopping the world and looking at every thread: the public face of [`crate::sys::world`]
//! (protocol and invariants documented there) and of the stack walk it relies on.
//!
//! ```
//! // A detour or a reclamation asks one question of a stopped world: can any thread resume
//! // inside these bytes?
//! let here = evolve_code::inspect::executable().unwrap().load_bias();
//! let busy = evolve_code::stop_the_world(|world| world.resumable_in(here..here + 1)).unwrap();
//! assert!(busy.is_none());
//! ```

pub use crate::sys::regs::{Registers, VectorRegister, GENERAL};
pub use crate::sys::walk::{Frame, FrameKind, WalkEnd};
pub use crate::sys::world::{
    stop_signal, stop_the_world, stop_the_world_within, Resumable, ResumeKind, StoppedThread,
    World, DEFAULT_TIMEOUT,
};
