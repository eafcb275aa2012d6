//! What a state transfer may overwrite: statics whose contents are all interior-mutable.
//!
//! `#[evolve::transfer(STATIC)]` writes the converted value over the patch's instance of
//! `STATIC` in place, while other code may hold shared references to it. That is sound only if
//! the static's bytes may change behind a shared reference, i.e. lie inside an `UnsafeCell`
//! (atomics, locks, cells). The macro requires the static's type to implement
//! [`InteriorMutable`], so a transfer to, say, a `static LIMIT: u64` fails to compile instead of
//! rewriting memory the compiler assumes never changes (and may have placed in read-only
//! memory).
//!
//! # Safety
//!
//! The implementations below are for types whose data lies inside `UnsafeCell`s (the atomics
//! are `UnsafeCell`s of their integer, the locks and `OnceLock` keep their state in atomics and
//! their value in an `UnsafeCell`), and arrays of such types.
#![allow(unsafe_code)]

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{
    AtomicBool, AtomicI16, AtomicI32, AtomicI64, AtomicI8, AtomicIsize, AtomicPtr, AtomicU16,
    AtomicU32, AtomicU64, AtomicU8, AtomicUsize,
};
use std::sync::{Mutex, OnceLock, RwLock};

/// A type whose value may change while shared references to it exist: every byte of its data
/// lies inside an `UnsafeCell`.
///
/// # Safety
///
/// Implement it only for types whose data lies entirely inside `UnsafeCell`s (directly or
/// through atomics, locks, cells), so that writing a new value over one that others hold
/// shared references to invalidates none of them.
///
/// # Example
///
/// ```
/// use evolve_code::InteriorMutable;
/// use std::sync::{atomic::AtomicU64, Mutex};
///
/// fn writable_in_place<T: InteriorMutable + ?Sized>(_: &T) {}
/// static CALLS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
/// static NAMES: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// writable_in_place(&CALLS);
/// writable_in_place(&NAMES);
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` has no interior mutability: a state transfer cannot overwrite it in place",
    label = "the static's type must keep its data in atomics, a lock or a cell",
    note = "#[evolve::transfer] writes the new value over the static while other code may hold \
            references to it; wrap the value in a Mutex, RwLock or atomics"
)]
pub unsafe trait InteriorMutable {}

macro_rules! interior_mutable {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: an atomic is an `UnsafeCell` of its value (module docs).
            unsafe impl InteriorMutable for $t {}
        )*
    };
}

interior_mutable!(
    AtomicBool,
    AtomicI8,
    AtomicI16,
    AtomicI32,
    AtomicI64,
    AtomicIsize,
    AtomicU8,
    AtomicU16,
    AtomicU32,
    AtomicU64,
    AtomicUsize,
);

// SAFETY: an atomic pointer is an `UnsafeCell` of the pointer.
unsafe impl<T> InteriorMutable for AtomicPtr<T> {}
// SAFETY: its whole value is inside the cell.
unsafe impl<T: ?Sized> InteriorMutable for UnsafeCell<T> {}
// SAFETY: a `Cell` is an `UnsafeCell` of its value.
unsafe impl<T: ?Sized> InteriorMutable for Cell<T> {}
// SAFETY: the lock state is atomics, the value is in an `UnsafeCell`.
unsafe impl<T: ?Sized> InteriorMutable for Mutex<T> {}
// SAFETY: as for `Mutex`.
unsafe impl<T: ?Sized> InteriorMutable for RwLock<T> {}
// SAFETY: the state is a `Once` (atomics), the value is in an `UnsafeCell`.
unsafe impl<T> InteriorMutable for OnceLock<T> {}
// SAFETY: every element is interior-mutable, and arrays have no padding between elements.
unsafe impl<T: InteriorMutable, const N: usize> InteriorMutable for [T; N] {}
