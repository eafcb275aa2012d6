//! [`Published<T>`]: a value that hooks read without a lock while a writer replaces it; old
//! versions are freed as soon as no reader can still hold them.
//!
//! Code running in a probe hook must not take a lock the probe's writer holds, and should not
//! pay for a read lock on every call (two atomic read-modify-writes on a shared cache line).
//! Readers here write only a word of their own thread; writers pay for the synchronisation.
//!
//! # Readers
//!
//! Every thread that reads has a **record** (a word `seq`, from a global registry; returned to
//! it when the thread exits and reused by a later thread). A read section is:
//!
//! ```text
//! seq := s + 1   (odd: reading)     Release
//! light fence                       (compiler fence; see below)
//! p := current                      Acquire: the version's contents happen-before its use
//! ... use *p ...
//! seq := s + 2   (even: idle)       Release: the uses happen-before a writer seeing s + 2
//! ```
//!
//! A read nested in another read section of the same thread (a hook that reads a second cell)
//! only loads `current`: the outer section already holds every writer off.
//!
//! # Writers
//!
//! Under the cell's lock: swap `current` to the new version; **heavy fence**; then snapshot every
//! record whose `seq` is odd, `(record, seq)`, and retire the old version with that snapshot.
//!
//! Why it suffices: the heavy fence (`membarrier`) and the reader's light fence together order
//! the reader's `seq := s + 1` against the writer's swap as two full fences would (the
//! store-buffer pattern): either the reader's store is visible to the writer's snapshot, or the
//! reader's load of `current` comes after the swap and returns the new version. So a reader
//! that can hold the old version is in the snapshot with its odd `seq`.
//!
//! # Reclamation
//!
//! A retired version is freed once every record of its snapshot shows a `seq` other than the one
//! snapshotted: that reader left the section (`s + 2`, or a later value, which its Release store
//! orders after the section's uses), so none of its uses of the version is still to come and all
//! of them happen-before the free. Writers try at every replacement; [`Published::collect`]
//! tries on demand. A version retired while the heavy fence failed has no snapshot yet; it gets
//! one at a later attempt whose heavy fence succeeds (any fence after the swap will do).
//!
//! The protocol is model-checked with loom (`loom_tests` below: readers on the hot path, writers
//! replacing the value, old versions freed); the atomics come from [`crate::sync`].
//!
//! # Safety
//!
//! A version is reachable from `current` or the retired list only, and freed only as argued
//! above (or when the cell is dropped, which needs it by value: no read section of it is open).
//! A read hands the closure `&T` for the section's duration only.
#![allow(unsafe_code)]

use crate::sync::{heavy_fence, light_fence, lock, Arc, AtomicPtr, AtomicUsize, Mutex, Ordering};

/// A reader's word: even when idle, odd inside a read section.
#[derive(Debug)]
pub(crate) struct Record {
    seq: AtomicUsize,
}

/// Every record, and the unowned ones.
#[derive(Debug)]
pub(crate) struct Registry {
    all: Mutex<Vec<Arc<Record>>>,
    free: Mutex<Vec<Arc<Record>>>,
}

impl Registry {
    pub(crate) fn new() -> Registry {
        Registry {
            all: Mutex::new(Vec::new()),
            free: Mutex::new(Vec::new()),
        }
    }

    /// A record for a thread: an unowned one, or a new one.
    pub(crate) fn acquire(&self) -> Arc<Record> {
        if let Some(r) = lock(&self.free).pop() {
            return r;
        }
        let r = Arc::new(Record {
            seq: AtomicUsize::new(0),
        });
        lock(&self.all).push(r.clone());
        r
    }

    /// Returns a record whose thread is done with it (its `seq` is even).
    pub(crate) fn release(&self, record: Arc<Record>) {
        lock(&self.free).push(record);
    }

    /// The records inside a read section now.
    fn reading(&self) -> Vec<(Arc<Record>, usize)> {
        lock(&self.all)
            .iter()
            .filter_map(|r| {
                let seq = r.seq.load(Ordering::Acquire);
                (seq % 2 == 1).then(|| (r.clone(), seq))
            })
            .collect()
    }
}

struct Retired<T> {
    version: *mut T,
    /// Readers that may hold it; `None`: not known yet (the heavy fence failed).
    readers: Option<Vec<(Arc<Record>, usize)>>,
}

/// The protocol: versions of a value, read through records of a registry.
pub(crate) struct Versions<T> {
    current: AtomicPtr<T>,
    retired: Mutex<Vec<Retired<T>>>,
}

// SAFETY: `&Versions<T>` hands `&T` to readers on any thread (needs `T: Sync`) and moves `T`s in
// from any thread and drops them on another (needs `T: Send`); the raw pointers are owned boxes.
unsafe impl<T: Send + Sync> Sync for Versions<T> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync> Send for Versions<T> {}

impl<T> Versions<T> {
    pub(crate) fn new(value: T) -> Versions<T> {
        Versions {
            current: AtomicPtr::new(Box::into_raw(Box::new(value))),
            retired: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` on the current version inside a read section of `record` (the calling thread's).
    pub(crate) fn read<R>(&self, record: &Record, f: impl FnOnce(&T) -> R) -> R {
        let seq = record.seq.load(Ordering::Relaxed);
        if seq % 2 == 1 {
            // Nested in a section of this thread: writers already wait for it.
            // SAFETY: the version cannot be freed before the outer section ends (module docs).
            return f(unsafe { &*self.current.load(Ordering::Acquire) });
        }
        record.seq.store(seq + 1, Ordering::Release);
        light_fence();
        let version = self.current.load(Ordering::Acquire);
        // SAFETY: this record's odd `seq` keeps the version from being freed until the store
        // below (module docs: Writers, Reclamation).
        let result = f(unsafe { &*version });
        record.seq.store(seq + 2, Ordering::Release);
        result
    }

    /// Publishes `value` and frees the retired versions no reader can hold any more.
    pub(crate) fn replace(&self, value: T, registry: &Registry) {
        let mut retired = lock(&self.retired);
        let old = self
            .current
            .swap(Box::into_raw(Box::new(value)), Ordering::AcqRel);
        retired.push(Retired {
            version: old,
            readers: None,
        });
        collect(&mut retired, registry);
    }

    /// Frees the retired versions no reader can hold any more; returns how many remain.
    pub(crate) fn collect(&self, registry: &Registry) -> usize {
        let mut retired = lock(&self.retired);
        collect(&mut retired, registry);
        retired.len()
    }

    /// Versions held: the current one and the retired ones not freed yet.
    #[cfg_attr(feature = "loom", allow(dead_code))]
    pub(crate) fn held(&self) -> usize {
        1 + lock(&self.retired).len()
    }
}

fn collect<T>(retired: &mut Vec<Retired<T>>, registry: &Registry) {
    if retired.iter().any(|r| r.readers.is_none()) && heavy_fence() {
        let reading = registry.reading();
        for r in retired.iter_mut().filter(|r| r.readers.is_none()) {
            r.readers = Some(reading.clone());
        }
    }
    retired.retain(|r| {
        let Some(readers) = &r.readers else {
            return true;
        };
        let held = readers
            .iter()
            .any(|(record, seq)| record.seq.load(Ordering::Acquire) == *seq);
        if !held {
            // SAFETY: every reader that could hold the version has left that section since
            // (module docs: Reclamation); it was boxed by `new`/`replace` and is freed once.
            drop(unsafe { Box::from_raw(r.version) });
        }
        held
    });
}

impl<T> Drop for Versions<T> {
    fn drop(&mut self) {
        // No read section of this cell is open (`&mut self`).
        // SAFETY: `current` and every retired version are distinct boxes owned by the cell.
        unsafe {
            drop(Box::from_raw(self.current.load(Ordering::Relaxed)));
            for r in lock(&self.retired).drain(..) {
                drop(Box::from_raw(r.version));
            }
        }
    }
}

#[cfg(not(feature = "loom"))]
mod process {
    //! The process-wide registry and each thread's record.
    use super::{Record, Registry};
    use std::cell::Cell;
    use std::sync::{Arc, OnceLock};

    pub(super) fn registry() -> &'static Registry {
        static REGISTRY: OnceLock<Registry> = OnceLock::new();
        REGISTRY.get_or_init(Registry::new)
    }

    /// Owns the thread's record; returns it to the registry when the thread exits.
    struct Owner(Option<Arc<Record>>);

    impl Drop for Owner {
        fn drop(&mut self) {
            let _unprobed = crate::thread_state::Unprobed::enter();
            let _ = RECORD.try_with(|r| r.set(std::ptr::null()));
            if let Some(record) = self.0.take() {
                registry().release(record);
            }
        }
    }

    thread_local! {
        /// The thread's record (null: none yet, or its owner is gone).
        static RECORD: Cell<*const Record> = const { Cell::new(std::ptr::null()) };
        static OWNER: std::cell::RefCell<Owner> = const { std::cell::RefCell::new(Owner(None)) };
    }

    /// Runs `f` with the calling thread's record.
    pub(super) fn with_record<R>(f: impl FnOnce(&Record) -> R) -> R {
        let record = RECORD.with(Cell::get);
        if !record.is_null() {
            // SAFETY: the owner keeps the record alive until it nulls this pointer.
            return f(unsafe { &*record });
        }
        with_new_record(f)
    }

    #[cold]
    #[inline(never)]
    fn with_new_record<R>(f: impl FnOnce(&Record) -> R) -> R {
        let _unprobed = crate::thread_state::Unprobed::enter();
        let record = registry().acquire();
        let owned = OWNER.try_with(|o| {
            let mut owner = o.borrow_mut();
            if owner.0.is_none() {
                owner.0 = Some(record.clone());
                RECORD.with(|r| r.set(Arc::as_ptr(&record)));
                true
            } else {
                false
            }
        });
        let result = f(&record);
        if owned != Ok(true) {
            // The thread is exiting (its owner is gone): the record was borrowed for one read.
            registry().release(record);
        }
        result
    }
}

/// A value replaced by whole versions, read without a lock (see the module docs).
pub struct Published<T> {
    #[cfg_attr(feature = "loom", allow(dead_code))]
    versions: Versions<T>,
}

#[cfg(not(feature = "loom"))]
impl<T: std::fmt::Debug> std::fmt::Debug for Published<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.read(|v| f.debug_struct("Published").field("current", v).finish())
    }
}

#[cfg(not(feature = "loom"))]
impl<T> Published<T> {
    /// A cell holding `value`.
    ///
    /// # Example
    ///
    /// ```
    /// let list = evolve_code::Published::new(vec![1]);
    /// list.set(vec![1, 2]);
    /// assert_eq!(list.read(|v| v.len()), 2);
    /// // No reader holds the first version: it was freed by `set`.
    /// assert_eq!(list.versions(), 1);
    /// ```
    pub fn new(value: T) -> Published<T> {
        Published {
            versions: Versions::new(value),
        }
    }

    /// Runs `f` on the current version. `f` must not block on the cell's writer (it is called
    /// from probe hooks): it holds old versions from being freed while it runs.
    pub fn read<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        process::with_record(|record| self.versions.read(record, f))
    }

    /// Publishes `value` (readers see it from their next [`Published::read`]) and frees the old
    /// versions no reader holds.
    pub fn set(&self, value: T) {
        self.versions.replace(value, process::registry());
    }

    /// Frees the old versions no reader holds any more; returns how many remain retired.
    pub fn collect(&self) -> usize {
        self.versions.collect(process::registry())
    }

    /// How many versions the cell holds now: the current one and those not freed yet.
    pub fn versions(&self) -> usize {
        self.versions.held()
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;

    #[test]
    fn a_version_held_by_a_reader_outlives_a_replacement_and_is_freed_after() {
        let p = Published::new(vec![1]);
        p.read(|old| {
            p.set(vec![1, 2]);
            // This thread is inside a read section: the first version is kept.
            assert_eq!(old, &vec![1]);
            assert_eq!(p.versions(), 2);
            // A nested read sees the new version.
            assert_eq!(p.read(|v| v.len()), 2);
        });
        assert_eq!(p.collect(), 0);
        assert_eq!(p.versions(), 1);
    }

    #[test]
    fn readers_on_many_threads_see_whole_versions_while_a_writer_replaces_them() {
        let threads: usize = std::env::var("EVOLVE_STRESS_THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(4);
        let p = Published::new(vec![0u64; 16]);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        p.read(|v| {
                            let first = v[0];
                            assert!(v.iter().all(|x| *x == first), "a torn version");
                        });
                    }
                });
            }
            for i in 1..=20_000u64 {
                p.set(vec![i; 16]);
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        p.collect();
        assert_eq!(p.versions(), 1);
    }
}

#[cfg(all(test, feature = "loom"))]
mod loom_tests {
    //! The protocol under loom: two readers and a writer replacing the value twice, every
    //! interleaving (up to two preemptions) and every permitted reordering. Each version is a `loom::cell::UnsafeCell`
    //! written by its destructor: freeing a version that a reader may still read is reported as
    //! a causality violation.
    use super::{Registry, Versions};
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;
    use loom::thread;

    struct Version(UnsafeCell<usize>);

    impl Drop for Version {
        fn drop(&mut self) {
            // SAFETY: loom checks that no read of the cell is concurrent with this write.
            self.0.with_mut(|v| unsafe { *v = 0 });
        }
    }

    #[test]
    fn loom_old_versions_are_freed_only_after_their_readers_leave() {
        let mut model = loom::model::Builder::new();
        // Bounded so that CI runs it in seconds; every interleaving within the bound is checked.
        model.preemption_bound = Some(2);
        model.check(|| {
            let registry = Arc::new(Registry::new());
            let cell = Arc::new(Versions::new(Version(UnsafeCell::new(1))));
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let (registry, cell) = (registry.clone(), cell.clone());
                    thread::spawn(move || {
                        let record = registry.acquire();
                        // SAFETY: loom checks that the version is not freed meanwhile.
                        let seen = cell.read(&record, |v| v.0.with(|p| unsafe { *p }));
                        assert!(seen >= 1, "read a freed version");
                        registry.release(record);
                    })
                })
                .collect();
            cell.replace(Version(UnsafeCell::new(2)), &registry);
            cell.replace(Version(UnsafeCell::new(3)), &registry);
            for r in readers {
                r.join().unwrap();
            }
            assert_eq!(cell.collect(&registry), 0, "a version outlived its readers");
        });
    }
}
