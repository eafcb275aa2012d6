//! The atomics, locks and fences of the engine's pure-memory protocols (the published lists,
//! [`crate::published`], and the trap slots, [`crate::sys::trap::slots`]), behind one door so
//! that `loom` can swap them in and model-check the protocols unchanged (the way
//! crossbeam-epoch's `primitive` module works): `cargo test --release -p evolve-code --features
//! loom --lib loom`. Everything else of the engine uses `std` directly: signal handlers, statics
//! and code bytes are no business of a model checker.
//!
//! A feature rather than `--cfg loom`: only this crate is rebuilt for the model check, not every
//! dependency (which a changed `RUSTFLAGS` forces).

#[cfg(feature = "loom")]
pub(crate) use loom::sync::atomic::{fence, AtomicPtr, AtomicU64, AtomicUsize};
#[cfg(feature = "loom")]
pub(crate) use loom::sync::{Arc, Mutex};
#[cfg(not(feature = "loom"))]
pub(crate) use std::sync::atomic::{fence, AtomicPtr, AtomicU64, AtomicUsize};
#[cfg(not(feature = "loom"))]
pub(crate) use std::sync::{Arc, Mutex};

pub(crate) use std::sync::atomic::Ordering;

/// Locks `m`, ignoring poisoning (the protocols' invariants hold between statements), with
/// probes off for the holding thread ([`crate::thread_state::Locked`]): hooks take these locks.
pub(crate) fn lock<T>(m: &Mutex<T>) -> impl std::ops::DerefMut<Target = T> + '_ {
    #[cfg(feature = "loom")]
    return m.lock().unwrap();
    #[cfg(not(feature = "loom"))]
    return crate::thread_state::Locked::new(m);
}

/// The reader's half of an asymmetric fence: orders the reader's preceding store before its
/// following loads *given* that writers use [`heavy_fence`]. In the process it is only a
/// compiler fence: the writer's `membarrier` makes every running thread execute a full barrier
/// (and a thread not running does so when it is scheduled), which promotes it to one
/// (membarrier(2); liburcu's "memb" flavour). Under loom it is a full fence.
#[inline(always)]
pub(crate) fn light_fence() {
    #[cfg(feature = "loom")]
    fence(Ordering::SeqCst);
    #[cfg(not(feature = "loom"))]
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
}

/// The writer's half (see [`light_fence`]): a full fence here and on every thread of the
/// process. False if the system call failed: then nothing may be concluded from what readers'
/// words show.
pub(crate) fn heavy_fence() -> bool {
    fence(Ordering::SeqCst);
    #[cfg(not(feature = "loom"))]
    return crate::sys::membarrier::sync_cores().is_ok();
    #[cfg(feature = "loom")]
    return true;
}
