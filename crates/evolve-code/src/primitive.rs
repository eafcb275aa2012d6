//! The atomics of the engine's pure-memory protocols, from one place that `loom` can swap.
//!
//! Under `RUSTFLAGS="--cfg loom"` these are loom's model-checked atomics, so the protocol code
//! that uses them ([`crate::sys::trap::slots`]) runs unchanged inside `loom::model` (the way
//! crossbeam-epoch's `primitive` module works). Everything else of the engine uses `std`
//! directly: signal handlers, statics and code bytes are no business of a model checker.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, AtomicUsize};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, AtomicUsize};

pub(crate) use std::sync::atomic::Ordering;
