//! Two counting handlers in the two shapes a program installs (`SA_SIGINFO` or plain), for the
//! tests that check the engine's handlers chain to the program's. Signal dispositions are
//! process-wide: each user is a test binary with one test.

use std::sync::atomic::{AtomicU64, Ordering};

/// Calls of [`first_handler`].
pub static FIRST_HANDLER_HITS: AtomicU64 = AtomicU64::new(0);
/// Calls of [`second_handler`].
pub static SECOND_HANDLER_HITS: AtomicU64 = AtomicU64::new(0);

/// An `SA_SIGINFO` handler that counts its calls.
pub extern "C" fn first_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    FIRST_HANDLER_HITS.fetch_add(1, Ordering::SeqCst);
}

/// A plain handler that counts its calls.
pub extern "C" fn second_handler(_: libc::c_int) {
    SECOND_HANDLER_HITS.fetch_add(1, Ordering::SeqCst);
}

/// Installs `handler` for `signal` as a program would (`siginfo`: with `SA_SIGINFO`).
pub fn install(signal: libc::c_int, handler: libc::sighandler_t, siginfo: bool) {
    // SAFETY: a zeroed sigaction filled with a valid handler of the declared signature.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler;
        action.sa_flags = if siginfo { libc::SA_SIGINFO } else { 0 };
        libc::sigemptyset(&mut action.sa_mask);
        assert_eq!(libc::sigaction(signal, &action, std::ptr::null_mut()), 0);
    }
}
