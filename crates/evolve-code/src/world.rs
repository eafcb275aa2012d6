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
//! 3. The coordinator sleeps on a futex (`ARRIVALS`, bumped and woken by every handler) until
//!    every slot is parked for this round or its thread has exited (`tgkill(tid, 0)` fails
//!    with `ESRCH`), with a deadline of two seconds. It must *sleep*, not spin or
//!    `sched_yield`: on a small machine with busy threads the threads still to be stopped are
//!    waiting for a CPU, and a yielding coordinator keeps one (measured: 16 ms median per stop
//!    with 4 busy threads on 2 cores when yielding, well under a millisecond when sleeping).
//! 4. It runs the caller's closure with the RIPs. The closure must not allocate or take a lock
//!    a stopped thread may hold (malloc's, stdio's): it only writes bytes and syncs cores.
//! 5. It publishes the next generation (`Release`) and wakes the futex. It does not wait for
//!    the handlers to leave (that waits for each woken thread to get a CPU again): a handler
//!    does not touch the table after it parked, and a slot counts as parked only for the
//!    generation stored in it, so a late handler of an earlier round is never mistaken for a
//!    parked thread of the next one. A thread still in the handler of the previous round when
//!    the next round signals it takes the new signal on `sigreturn`, with its real RIP.
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
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// Most threads a stop can handle.
const MAX_THREADS: usize = 4096;

struct Slot {
    tid: AtomicI32,
    rip: AtomicUsize,
    /// The generation this thread parked for (0: not parked).
    parked: AtomicU32,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    tid: AtomicI32::new(0),
    rip: AtomicUsize::new(0),
    parked: AtomicU32::new(0),
};
static SLOTS: [Slot; MAX_THREADS] = [EMPTY; MAX_THREADS];
static USED: AtomicUsize = AtomicUsize::new(0);
/// Odd while a round is stopping threads; handlers wait until it changes.
static GENERATION: AtomicU32 = AtomicU32::new(0);
/// Bumped by every handler that parks; the coordinator sleeps on it.
static ARRIVALS: AtomicU32 = AtomicU32::new(0);
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
        slot.parked.store(generation, Ordering::Release);
        ARRIVALS.fetch_add(1, Ordering::Release);
        // SAFETY: futex wake on a static u32.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                ARRIVALS.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                1,
            );
        }
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
    stop_the_world_threads(|_, rips| f(rips))
}

/// [`stop_the_world`], with the thread id of each stopped thread: `f(tids, rips)`, where
/// `rips[i]` is where thread `tids[i]` was interrupted (so that a refusal can name the thread).
pub(crate) fn stop_the_world_threads<R>(f: impl FnOnce(&[i32], &[usize]) -> R) -> Result<R> {
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
    let mut parked: Vec<i32> = Vec::with_capacity(tids.len());
    for (slot, &tid) in SLOTS.iter().zip(&tids) {
        slot.tid.store(tid, Ordering::Relaxed);
        slot.rip.store(0, Ordering::Relaxed);
        slot.parked.store(0, Ordering::Relaxed);
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
    let mut first = 0;
    loop {
        let arrivals = ARRIVALS.load(Ordering::Acquire);
        while first < tids.len()
            && (!alive[first] || SLOTS[first].parked.load(Ordering::Acquire) == generation)
        {
            first += 1;
        }
        if first == tids.len() {
            break;
        }
        if Instant::now() > deadline {
            stuck = true;
            break;
        }
        let pause = libc::timespec {
            tv_sec: 0,
            tv_nsec: 1_000_000,
        };
        // SAFETY: futex wait on a static u32 with a relative timeout; returns at once if a
        // handler arrived since `arrivals` was read.
        let woken = unsafe {
            libc::syscall(
                libc::SYS_futex,
                ARRIVALS.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                arrivals,
                &pause as *const libc::timespec,
            )
        } == 0;
        if !woken {
            // Timed out (or spurious): threads that exited meanwhile will never park.
            for (i, &tid) in tids.iter().enumerate().skip(first) {
                if alive[i] && SLOTS[i].parked.load(Ordering::Acquire) != generation {
                    alive[i] = tgkill(tid, 0);
                }
            }
        }
    }
    let result = if stuck {
        None
    } else {
        for (i, slot) in SLOTS[..tids.len()].iter().enumerate() {
            if alive[i] {
                rips.push(slot.rip.load(Ordering::Relaxed));
                parked.push(tids[i]);
            }
        }
        Some(f(&parked, &rips))
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
    result.ok_or(Error::new(ErrorKind::Unsupported {
        what:
            "a thread did not park for stop-the-world within 2 s (does it block the stop signal?)",
    }))
}
