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
//! # Static TLS for an attached agent
//!
//! The agent `evolve attach` loads is such a `dlopen`ed library: its thread-locals are dynamic
//! TLS (allocated per thread on first use, reached through `__tls_get_addr`), and stable Rust
//! cannot ask for the initial-exec model that would put them in static TLS. So the attach entry
//! calls [`use_static_tls`] first: it loads a small object built with this crate
//! (`static_tls.s`, embedded, loaded from a memfd) whose one thread-local is initial-exec, so
//! glibc places it in the static-TLS surplus it reserves for such objects, at one offset from
//! the thread pointer in every thread, present ones included. From then on the thread state is
//! that block, not [`STATE`]. When glibc refuses (the surplus is used up), the agent keeps
//! [`STATE`] and its probes the fallback path (`EVOLVE_STATIC_TLS=0` in the target's
//! environment does the same, for comparisons).
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
use std::sync::atomic::{AtomicIsize, Ordering};
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

/// Room for [`ThreadState`] in the static-TLS block of `static_tls.s`.
const STATIC_BLOCK_LEN: usize = 64;
const _: () = assert!(std::mem::size_of::<ThreadState>() <= STATIC_BLOCK_LEN);

/// The offset of the static-TLS block from the thread pointer once [`use_static_tls`] loaded
/// it (always negative on x86-64); 0 while [`STATE`] is the thread state.
static STATIC_BLOCK: AtomicIsize = AtomicIsize::new(0);

/// The calling thread's state.
fn current() -> *const ThreadState {
    match STATIC_BLOCK.load(Ordering::Relaxed) {
        0 => STATE.with(|s| s as *const ThreadState),
        offset => thread_pointer().wrapping_add_signed(offset) as *const ThreadState,
    }
}

/// The calling thread's state (valid for the thread's whole life: no destructor).
pub(crate) fn with<R>(f: impl FnOnce(&ThreadState) -> R) -> R {
    // SAFETY: `current` is this thread's state: `STATE` (const-initialised, no destructor) or
    // its block in static TLS (zeroed by glibc in every thread, present and future, before
    // `STATIC_BLOCK` is set, and never freed while the thread lives). Both are all-zero valid
    // `ThreadState`s; only this thread uses its state (Cells), and the reference does not
    // leave `f`.
    f(unsafe { &*current() })
}

/// The calling thread's shadow-stack state. Callers hold no other reference to it.
pub(crate) fn shadow() -> *mut ShadowState {
    with(|s| s.shadow.get())
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
    current() as isize - thread_pointer() as isize
}

static OFFSET: OnceLock<Option<i32>> = OnceLock::new();

/// The offset of the thread state from the thread pointer, if it is the same in every thread
/// (checked on this thread and a new one), fits a 32-bit displacement, and generated code may
/// use it (not disabled by `EVOLVE_SHARED_COUNTERS`).
pub(crate) fn offset() -> Option<i32> {
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

/// The static-TLS object (`static_tls.s`, built by `build.rs`; empty if it could not be).
static STATIC_TLS_OBJECT: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/libevolve_static_tls.so"));

/// Moves this copy of the crate's thread state into static TLS (see the module docs): once,
/// before anything used the thread state's offset. Returns the block's offset from the thread
/// pointer, or why the crate keeps its dynamic thread-locals (the probes' fallback path).
pub(crate) fn use_static_tls() -> Result<isize, String> {
    STATIC_TLS_OUTCOME
        .get_or_init(|| {
            if OFFSET.get().is_some() {
                return Err("the thread state was already in use".into());
            }
            if std::env::var_os("EVOLVE_STATIC_TLS").is_some_and(|v| v == "0") {
                return Err("disabled by EVOLVE_STATIC_TLS=0".into());
            }
            let offset = load_static_block()?;
            if i32::try_from(offset).is_err() || i32::try_from(offset + 64).is_err() {
                return Err(format!("offset {offset} does not fit a displacement"));
            }
            STATIC_BLOCK.store(offset, Ordering::Relaxed);
            Ok(offset)
        })
        .clone()
}

static STATIC_TLS_OUTCOME: OnceLock<Result<isize, String>> = OnceLock::new();

/// What [`use_static_tls`] did, if it was called.
pub(crate) fn static_tls_outcome() -> Option<Result<isize, String>> {
    STATIC_TLS_OUTCOME.get().cloned()
}

/// Loads the static-TLS object from a memfd and returns its block's offset.
fn load_static_block() -> Result<isize, String> {
    if STATIC_TLS_OBJECT.is_empty() {
        return Err("this build has no static-TLS object (no C compiler driver at build)".into());
    }
    let fd = rustix::fs::memfd_create("evolve-static-tls", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| format!("memfd_create: {e}"))?;
    let file = std::fs::File::from(fd);
    std::io::Write::write_all(&mut &file, STATIC_TLS_OBJECT).map_err(|e| format!("memfd: {e}"))?;
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
    // SAFETY: the object is this crate's own `static_tls.s`: no initialisers, no dependencies,
    // one function that reads its GOT word. Loading it runs no code.
    let library = unsafe {
        libloading::os::unix::Library::open(
            Some(&path),
            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL,
        )
    }
    .map_err(|e| format!("glibc refused the static-TLS object: {e}"))?;
    drop(file);
    // SAFETY: `evolve_thread_state_offset` is `static_tls.s`'s function, of this signature.
    let offset = unsafe {
        library
            .get::<extern "C" fn() -> isize>(b"evolve_thread_state_offset\0")
            .map(|f| f())
    }
    .map_err(|e| format!("the static-TLS object has no offset function: {e}"))?;
    // Never unloaded: threads keep addressing the block.
    std::mem::forget(library);
    Ok(offset)
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
        with(|s| s.guard.set(s.guard.get() + 1));
        Unprobed {
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Drop for Unprobed {
    fn drop(&mut self) {
        with(|s| s.guard.set(s.guard.get() - 1));
    }
}

/// Whether probes are off for the calling thread.
pub(crate) fn unprobed() -> bool {
    with(|s| s.guard.get() != 0)
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
