//! Stopping the world: every other thread of the process parked in a signal handler, with the
//! program counter it was interrupted at, while the caller changes several instructions at once.
//!
//! # Why
//!
//! A 5-byte `jmp` written over the prologue of an unprepared function replaces *several*
//! instructions. A thread whose program counter lies strictly inside those bytes (it was
//! preempted between two prologue instructions) would resume in the middle of the new `jmp`.
//! The write protocol of [`crate::write`] cannot help: it makes one instruction change
//! atomically, not several. So the writer stops every other thread, looks at where each one is,
//! and writes only when none is inside the bytes being replaced (DESIGN.md, "multi-instruction
//! overwrites"). Freeing a trampoline uses the same check with the trampoline's range.
//!
//! # Protocol
//!
//! 1. Under one global lock, the coordinator lists `/proc/self/task` and fills a static slot
//!    table with the thread ids (all allocation happens here, before anybody is stopped).
//! 2. It sends [`stop_signal`] to every other thread with `tgkill`. The handler (SA_SIGINFO)
//!    finds its slot by thread id, stores the interrupted RIP, then `Release`-stores `parked`,
//!    and waits on a futex until the round's generation is published.
//! 3. The coordinator waits (yielding) until every slot is parked or its thread has exited
//!    (`tgkill(tid, 0)` fails with `ESRCH`), with a deadline of two seconds.
//! 4. It runs the caller's closure with the RIPs. The closure must not allocate or take a lock
//!    a stopped thread may hold (malloc's, stdio's): it only writes bytes and syncs cores.
//! 5. It publishes the next generation (`Release`), wakes the futex, and waits until every
//!    handler has left, so the table may be reused by the next round.
//!
//! Threads created after step 1 are not stopped; they can only be inside the bytes being
//! replaced if they got there after step 1, which the callers exclude: those bytes are reachable
//! only through code that was already published (the old prologue entry) and a new thread starts
//! at its own entry point. A thread that exits while stopped cannot: it is parked.
//!
//! # Safety
//!
//! The handler is async-signal-safe: it makes only raw system calls (`gettid`, `futex`), reads
//! and writes atomics of a static table, and saves and restores `errno`. It dereferences the
//! `ucontext_t` the kernel passes to read RIP.
#![allow(unsafe_code)]

use crate::error::{Error, ErrorKind, Result};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// Most threads a stop can handle.
const MAX_THREADS: usize = 4096;

struct Slot {
    tid: AtomicI32,
    rip: AtomicUsize,
    parked: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    tid: AtomicI32::new(0),
    rip: AtomicUsize::new(0),
    parked: AtomicBool::new(false),
};
static SLOTS: [Slot; MAX_THREADS] = [EMPTY; MAX_THREADS];
static USED: AtomicUsize = AtomicUsize::new(0);
/// Odd while a round is stopping threads; handlers wait until it changes.
static GENERATION: AtomicU32 = AtomicU32::new(0);
static IN_HANDLER: AtomicUsize = AtomicUsize::new(0);
static LOCK: Mutex<()> = Mutex::new(());
static INSTALL: Once = Once::new();

/// The real-time signal used to park threads: `SIGRTMIN + 6`.
pub fn stop_signal() -> libc::c_int {
    libc::SIGRTMIN() + 6
}

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

extern "C" fn on_stop(
    _signal: libc::c_int,
    _info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    IN_HANDLER.fetch_add(1, Ordering::AcqRel);
    // SAFETY: errno is thread-local; we restore it before returning.
    let errno = unsafe { *libc::__errno_location() };
    let generation = GENERATION.load(Ordering::Acquire);
    let tid = gettid();
    // SAFETY: the kernel passes a valid ucontext to an SA_SIGINFO handler.
    let rip = unsafe {
        (*(context as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RIP as usize]
    };
    let used = USED.load(Ordering::Acquire);
    let slot = SLOTS[..used]
        .iter()
        .find(|s| s.tid.load(Ordering::Relaxed) == tid);
    if let (Some(slot), true) = (slot, generation % 2 == 1) {
        slot.rip.store(rip as usize, Ordering::Relaxed);
        slot.parked.store(true, Ordering::Release);
        while GENERATION.load(Ordering::Acquire) == generation {
            // SAFETY: futex wait on a static u32; returns at once if the value changed.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    GENERATION.as_ptr(),
                    libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                    generation,
                    std::ptr::null::<libc::timespec>(),
                );
            }
        }
    }
    // SAFETY: see above.
    unsafe { *libc::__errno_location() = errno };
    IN_HANDLER.fetch_sub(1, Ordering::AcqRel);
}

fn install() -> Result<()> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction filled completely; `on_stop` has the SA_SIGINFO signature.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(stop_signal(), &action, std::ptr::null_mut()) != 0 {
                result = Err(Error::last_os("sigaction(stop signal)"));
            }
        }
    });
    result
}

fn tgkill(tid: i32, signal: libc::c_int) -> bool {
    // SAFETY: tgkill with our own pid; a stale tid fails with ESRCH, nothing else happens.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, signal) == 0 }
}

/// Stops every other thread, calls `f` with the RIP each was interrupted at, and resumes them.
///
/// `f` runs while the others are parked: it must not allocate, print, or take any lock another
/// thread could hold. Returns what `f` returns.
///
/// # Errors
/// [`ErrorKind::Os`] if the handler cannot be installed; [`ErrorKind::Unsupported`] if a thread
/// does not park within two seconds (it blocks the stop signal), in which case `f` is not called.
///
/// # Example
/// ```
/// let others = evolve_code::stop_the_world(|rips| rips.len()).unwrap();
/// assert_eq!(others, 0); // a doctest runs alone on its thread
/// ```
pub fn stop_the_world<R>(f: impl FnOnce(&[usize]) -> R) -> Result<R> {
    install()?;
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let me = gettid();
    let tids: Vec<i32> = std::fs::read_dir("/proc/self/task")
        .map_err(|_| Error::last_os("read_dir(/proc/self/task)"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&t| t != me)
        .collect();
    if tids.len() > MAX_THREADS {
        return Err(Error::new(ErrorKind::InvalidArgument {
            reason: format!(
                "{} threads (stop-the-world handles {MAX_THREADS})",
                tids.len()
            ),
        }));
    }
    let mut rips: Vec<usize> = Vec::with_capacity(tids.len());
    for (slot, &tid) in SLOTS.iter().zip(&tids) {
        slot.tid.store(tid, Ordering::Relaxed);
        slot.rip.store(0, Ordering::Relaxed);
        slot.parked.store(false, Ordering::Relaxed);
    }
    USED.store(tids.len(), Ordering::Release);
    // Odd: stopping.
    let generation = GENERATION.fetch_add(1, Ordering::AcqRel) + 1;
    debug_assert!(generation % 2 == 1);
    let mut alive = [false; MAX_THREADS];
    for (i, &tid) in tids.iter().enumerate() {
        alive[i] = tgkill(tid, stop_signal());
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut stuck = false;
    for (i, &tid) in tids.iter().enumerate() {
        while alive[i] && !SLOTS[i].parked.load(Ordering::Acquire) {
            if !tgkill(tid, 0) {
                alive[i] = false;
                break;
            }
            if Instant::now() > deadline {
                stuck = true;
                break;
            }
            std::thread::yield_now();
        }
    }
    let result = if stuck {
        None
    } else {
        for (i, slot) in SLOTS[..tids.len()].iter().enumerate() {
            if alive[i] {
                rips.push(slot.rip.load(Ordering::Relaxed));
            }
        }
        Some(f(&rips))
    };
    // Even: resume.
    GENERATION.fetch_add(1, Ordering::AcqRel);
    // SAFETY: futex wake on a static u32.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            GENERATION.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        );
    }
    while IN_HANDLER.load(Ordering::Acquire) != 0 {
        std::thread::yield_now();
    }
    USED.store(0, Ordering::Release);
    result.ok_or(Error::new(ErrorKind::Unsupported {
        what:
            "a thread did not park for stop-the-world within 2 s (does it block the stop signal?)",
    }))
}
