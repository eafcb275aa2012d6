//! Fault injection for the engine's tests (cargo feature `fault-injection`, never in a user's
//! build): make the n-th `mprotect`, `/proc/self/mem` write or `membarrier` core sync of the
//! calling thread fail, or panic, to check that every failure leaves the process as it was; and
//! slow the stop handler down between claiming its slot and parking, to widen a window that
//! preemption opens only rarely.
//!
//! Counting is per thread: a batch makes its system calls on the thread that applies it, so
//! tests running in parallel in one process do not disturb each other's counts.

use crate::error::{Error, ErrorKind, Result};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// The system calls a write can fail in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Syscall {
    /// `mprotect(2)`: opening or closing a write window.
    Mprotect,
    /// `pwrite(2)` on `/proc/self/mem`: a code write on systems that forbid writable code.
    ProcMemWrite,
    /// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`: a core sync.
    Membarrier,
}

impl Syscall {
    fn index(self) -> usize {
        self as usize
    }
}

/// How an injected fault shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The call fails with `EIO` (`ENOMEM` for `mprotect`, as when the kernel cannot split a
    /// mapping), as the kernel would report it.
    Error,
    /// The call panics (a bug in the engine, or a panic in code it runs), unwinding through
    /// the write.
    Panic,
}

thread_local! {
    static CALLS: [Cell<u64>; 3] = const { [Cell::new(0), Cell::new(0), Cell::new(0)] };
    static ARMED: Cell<Option<(Syscall, u64, Failure)>> = const { Cell::new(None) };
}

/// From now on, on this thread: the `n`-th call (counting from 1, from now) of `syscall` fails
/// as `failure`; every other call succeeds. Resets this thread's counts.
pub fn fail_nth(syscall: Syscall, n: u64, failure: Failure) {
    reset();
    ARMED.with(|a| a.set(Some((syscall, n, failure))));
}

/// Clears this thread's counts and any pending fault.
pub fn reset() {
    CALLS.with(|c| c.iter().for_each(|c| c.set(0)));
    ARMED.with(|a| a.set(None));
}

/// How many calls of `syscall` this thread made since the last [`reset`] or [`fail_nth`].
pub fn calls(syscall: Syscall) -> u64 {
    CALLS.with(|c| c[syscall.index()].get())
}

/// Counts a call of `syscall`; fails it if it is the armed one.
pub(crate) fn check(syscall: Syscall, operation: &'static str) -> Result<()> {
    let n = CALLS.with(|c| {
        let cell = &c[syscall.index()];
        cell.set(cell.get() + 1);
        cell.get()
    });
    let Some((armed, nth, failure)) = ARMED.with(Cell::get) else {
        return Ok(());
    };
    if armed != syscall || nth != n {
        return Ok(());
    }
    ARMED.with(|a| a.set(None));
    match failure {
        Failure::Panic => panic!("injected panic in {operation} (call {n})"),
        Failure::Error => {
            let errno = if syscall == Syscall::Mprotect {
                libc::ENOMEM
            } else {
                libc::EIO
            };
            Err(Error::new(ErrorKind::Os { operation, errno }))
        }
    }
}

/// Microseconds the stop handler sleeps after claiming its slot, before it publishes `PARKED`.
static PARK_DELAY_US: AtomicU64 = AtomicU64::new(0);

/// From now on, in every thread: the handler of a stop of the world sleeps `delay` between
/// claiming its slot and publishing that it parked (its registers half copied), as a thread
/// preempted there would. `Duration::ZERO` turns it off. Process-wide: the handler runs on the
/// stopped threads, not on the caller.
pub fn delay_parking(delay: std::time::Duration) {
    PARK_DELAY_US.store(delay.as_micros() as u64, Ordering::Relaxed);
}

/// The injected delay of the stop handler (async-signal-safe: one `nanosleep` system call).
pub(crate) fn park_delay() {
    let us = PARK_DELAY_US.load(Ordering::Relaxed);
    if us == 0 {
        return;
    }
    let time = rustix::thread::Timespec {
        tv_sec: (us / 1_000_000) as _,
        tv_nsec: ((us % 1_000_000) * 1000) as _,
    };
    let _ = rustix::thread::nanosleep(&time);
}
