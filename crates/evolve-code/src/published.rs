//! [`Published<T>`]: a value that hooks read with one load while a writer replaces it.
//!
//! Code running in a probe hook must not take a lock the probe's writer holds, and should not
//! pay for a read lock on every call (two atomic read-modify-writes on a shared cache line).
//! A `Published<T>` keeps every version it was given: [`Published::get`] is one acquire load
//! and returns a reference valid as long as the cell; [`Published::set`] publishes a new
//! version. Old versions are freed only when the cell is dropped, so a cell suits values
//! replaced a bounded number of times (a probe point's list of probes, replaced when a probe
//! is added or removed, and dropped with the point's trampoline).
//!
//! # Safety
//!
//! Versions are boxed, never moved or freed before the cell is dropped (dropping needs the
//! cell by value or `&mut`, so no `&T` from `get` is alive then).
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Mutex;

/// A value replaced by whole versions, read with one load (see the module docs).
#[derive(Debug)]
pub struct Published<T> {
    current: AtomicPtr<T>,
    versions: Mutex<Vec<Box<T>>>,
}

impl<T> Published<T> {
    /// A cell holding `value`.
    pub fn new(value: T) -> Published<T> {
        let mut first = Box::new(value);
        let current = AtomicPtr::new(&mut *first);
        Published {
            current,
            versions: Mutex::new(vec![first]),
        }
    }

    /// The current version.
    pub fn get(&self) -> &T {
        // SAFETY: the pointer is to a box in `versions`, which is neither freed nor moved
        // while `self` is borrowed (see the module docs).
        unsafe { &*self.current.load(Ordering::Acquire) }
    }

    /// Publishes `value`; readers see it from their next [`Published::get`].
    pub fn set(&self, value: T) {
        let mut versions = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        let mut boxed = Box::new(value);
        self.current.store(&mut *boxed, Ordering::Release);
        versions.push(boxed);
    }

    /// How many versions the cell keeps.
    pub fn versions(&self) -> usize {
        self.versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

// SAFETY: the cell hands out `&T` to any thread (needs `T: Sync`) and moves `T`s in from any
// thread and drops them on the dropping thread (needs `T: Send`).
unsafe impl<T: Send + Sync> Sync for Published<T> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync> Send for Published<T> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_see_the_latest_version_and_old_references_stay_valid() {
        let p = Published::new(vec![1]);
        let old = p.get();
        p.set(vec![1, 2]);
        assert_eq!(old, &vec![1]);
        assert_eq!(p.get(), &vec![1, 2]);
        assert_eq!(p.versions(), 2);
    }
}
