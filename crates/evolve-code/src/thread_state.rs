//! The per-thread state that generated code reads at a fixed offset from the thread pointer,
//! and the re-entrancy guard.
//!
//! # One block, one offset
//!
//! Trampolines find the calling thread's counter block, its shadow stack and its guard with
//! `fs:[offset + field]`: no call, no lookup. That needs this crate's thread-local storage at
//! one offset from the thread pointer in every thread, which holds for an executable (static
//! TLS) but not for a copy of the crate in a `dlopen`ed library. [`offset`] measures it once, on
//! this thread and on a fresh one, and every user of generated-code TLS (counters, shadow
//! stacks, the guard) takes it from there; `None` (or `EVOLVE_SHARED_COUNTERS=1`, for
//! comparisons) makes them fall back to shared words and Rust calls.
//!
//! The block is a `const`-initialised thread-local without a destructor, so it exists for the
//! whole life of every thread, during TLS destruction too, and reading it never registers
//! anything or allocates.
//!
//! # The re-entrancy guard
//!
//! While a thread runs code that a trampoline called — an entry hook, the exit hook of a timed
//! call, a thread's first adoption of a counter block — or engine code that holds an engine
//! lock and may allocate (returning blocks to pools at thread exit), its `guard` word is
//! nonzero. Trampolines test it first and, if set, go straight to the relocated prologue: a
//! probed function called from a hook runs unprobed (not counted, not timed, no hook). That is
//! what makes `malloc`, `free`, `pthread_mutex_lock`, `write`, the unwinder and the engine's own
//! functions probeable: a hook that allocates, takes a lock, writes or unwinds cannot recurse
//! into itself or deadlock on a lock its own thread holds. The generated code sets and clears the
//! guard around the calls it makes (so even the called function's own entry runs guarded); Rust
//! code uses [`Unprobed`].
//!
//! The guard also keeps hooks from deadlocking on the engine's own locks: every engine lock a
//! hook may take (counter and shadow pools, published-list records) is held only through
//! [`Locked`], with probes off for the holding thread, so a probed `malloc` called while the
//! lock is held cannot reach a hook that waits for it.
#![allow(unsafe_code)]

use std::cell::{Cell, UnsafeCell};
use std::sync::OnceLock;

/// The shadow stack's state as generated code reads it (see [`crate::shadow`]).
#[repr(C)]
pub(crate) struct ShadowState {
    /// The thread's frames (0: no block yet).
    pub frames: usize,
    /// The thread's exit stubs.
    pub stubs: usize,
    /// Frames in use.
    pub top: usize,
}

/// A thread's state for generated code. Layout fixed: trampolines address its fields.
#[repr(C)]
pub(crate) struct ThreadState {
    /// The thread's counter block (0: none yet), see [`crate::counter`].
    pub counters: Cell<usize>,
    /// Nonzero while probes are off for this thread (see the module docs).
    pub guard: Cell<usize>,
    /// The shadow stack, see [`crate::shadow`]. Only this thread touches it.
    pub shadow: UnsafeCell<ShadowState>,
}

/// Byte offset of [`ThreadState::counters`].
pub(crate) const COUNTERS: i32 = 0;
/// Byte offset of [`ThreadState::guard`].
pub(crate) const GUARD: i32 = 8;
/// Byte offset of [`ThreadState::shadow`].
pub(crate) const SHADOW: i32 = 16;

thread_local! {
    static STATE: ThreadState = const {
        ThreadState {
            counters: Cell::new(0),
            guard: Cell::new(0),
            shadow: UnsafeCell::new(ShadowState { frames: 0, stubs: 0, top: 0 }),
        }
    };
}

/// The calling thread's state (valid for the thread's whole life: no destructor).
pub(crate) fn with<R>(f: impl FnOnce(&ThreadState) -> R) -> R {
    STATE.with(f)
}

/// The calling thread's shadow-stack state. Callers hold no other reference to it.
pub(crate) fn shadow() -> *mut ShadowState {
    STATE.with(|s| s.shadow.get())
}

/// The thread pointer (`fs:[0]` holds the thread control block's own address: TLS ABI).
pub(crate) fn thread_pointer() -> usize {
    let tp: usize;
    // SAFETY: on x86-64 Linux, fs:[0] holds the thread control block's own address.
    unsafe {
        core::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) tp, options(nostack, readonly, preserves_flags))
    };
    tp
}

fn offset_here() -> isize {
    STATE.with(|s| s as *const ThreadState as isize) - thread_pointer() as isize
}

/// The offset of the thread state from the thread pointer, if it is the same in every thread
/// (checked on this thread and a new one), fits a 32-bit displacement, and generated code may
/// use it (not disabled by `EVOLVE_SHARED_COUNTERS`).
pub(crate) fn offset() -> Option<i32> {
    static OFFSET: OnceLock<Option<i32>> = OnceLock::new();
    *OFFSET.get_or_init(|| {
        if std::env::var_os("EVOLVE_SHARED_COUNTERS").is_some() {
            return None;
        }
        let here = offset_here();
        let there = std::thread::spawn(offset_here).join().ok()?;
        // The last field's displacement must fit too.
        (here == there)
            .then(|| i32::try_from(here + 64).ok().map(|_| here as i32))
            .flatten()
    })
}

/// Whether the calling thread is where generated code must not be used: the crate's TLS is not
/// at [`offset`] on this thread (a thread of a process whose layout differs).
pub(crate) fn at_offset() -> bool {
    offset().is_some_and(|o| offset_here() == o as isize)
}

/// Probes off for the calling thread while it lives (see the module docs); nests, in any
/// order.
///
/// The guard is a depth: each value adds one and takes it back when dropped. Restoring a saved
/// previous value instead would need values dropped in the reverse order of their creation,
/// which struct fields do not follow (they drop in declaration order): two `Locked` fields
/// built first-to-last and dropped first-to-last left the guard at 1, turning probes off for
/// the thread for good. Generated code sets the guard to 1 and back to 0 only around calls it
/// makes when the guard was 0, and the exit path restores the value it saved; Rust code in
/// between leaves the depth as it found it, so both agree.
pub(crate) struct Unprobed {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Unprobed {
    /// Turns probes off for this thread until the value is dropped.
    pub(crate) fn enter() -> Unprobed {
        STATE.with(|s| s.guard.set(s.guard.get() + 1));
        Unprobed {
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Drop for Unprobed {
    fn drop(&mut self) {
        STATE.with(|s| s.guard.set(s.guard.get() - 1));
    }
}

/// Whether probes are off for the calling thread.
pub(crate) fn unprobed() -> bool {
    STATE.with(|s| s.guard.get() != 0)
}

/// A mutex guard held with probes off for the holding thread (see the module docs).
pub(crate) struct Locked<'a, T> {
    // Dropped first: the lock is released before probes come back on.
    guard: std::sync::MutexGuard<'a, T>,
    _unprobed: Unprobed,
}

impl<'a, T> Locked<'a, T> {
    /// Locks `mutex` (ignoring poisoning) with probes off for this thread.
    pub(crate) fn new(mutex: &'a std::sync::Mutex<T>) -> Locked<'a, T> {
        let unprobed = Unprobed::enter();
        Locked {
            guard: mutex.lock().unwrap_or_else(|p| p.into_inner()),
            _unprobed: unprobed,
        }
    }
}

impl<T> std::ops::Deref for Locked<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> std::ops::DerefMut for Locked<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards dropped in the order they were made (as two fields of one struct are) turn
    /// probes back on once the last one goes.
    #[test]
    fn guards_dropped_in_any_order_leave_probes_on() {
        assert!(!unprobed());
        let first = Unprobed::enter();
        let second = Unprobed::enter();
        drop(first);
        assert!(unprobed(), "the second guard still holds");
        drop(second);
        assert!(!unprobed(), "probes stay off for the thread");
        struct Two {
            _a: Locked<'static, ()>,
            _b: Locked<'static, ()>,
        }
        static A: std::sync::Mutex<()> = std::sync::Mutex::new(());
        static B: std::sync::Mutex<()> = std::sync::Mutex::new(());
        drop(Two {
            _a: Locked::new(&A),
            _b: Locked::new(&B),
        });
        assert!(!unprobed());
    }
}
