//! Signal handlers that share their signal with the program: install in front, pass on the rest.
//!
//! The engine takes signals the program may use too: `SIGTRAP` (the int3 protocol), `SIGSEGV`
//! (faults in unloaded patches), the stop signal of [`crate::sys::world`]. Its handler must see
//! the signals that are its own and hand every other one to the action the program installed,
//! exactly as the kernel would have delivered it — whether the program installed it before the
//! engine's (it is kept when the engine's replaces it) or after (the engine's is put back in
//! front at its next use, keeping the program's). [`Chain`] is that bookkeeping, for one signal.
//!
//! # Protocol
//!
//! - [`Chain::install`] (never in signal context) reads the current action; if it is not the
//!   engine's handler, it installs the engine's and publishes the replaced action (`Release`) as
//!   the one to forward to. Replaced actions are leaked, never freed: a handler on another thread
//!   may be reading the previous one.
//! - [`Chain::forward`] (in the handler) loads the published action (`Acquire`, pairing with the
//!   install) and calls it as the kernel would: with its three arguments if it declared
//!   `SA_SIGINFO`, with its mask blocked during the call (plus the signal itself unless
//!   `SA_NODEFER`), resetting the disposition first for `SA_RESETHAND`. `SIG_IGN` does nothing;
//!   `SIG_DFL` restores the default action and re-raises the signal, so the default happens as
//!   the handler returns (for the signals whose default is to be ignored, nothing).
//! - A program handler that itself chains to the action it replaced — the engine's — would loop
//!   back into `forward`; a small table of the threads currently forwarding breaks the loop by
//!   applying the default action instead (a thread-local would need the TLS allocator in a
//!   `dlopen`ed engine, which a signal handler must not call).
//!
//! # Safety
//!
//! `forward` calls a foreign function pointer taken from `sigaction(2)`, with the signature its
//! flags declare; it runs only async-signal-safe calls (`pthread_sigmask`, `sigaction`, `raise`).
#![allow(unsafe_code)]

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicI32, AtomicPtr, Ordering};

/// A handler with the `SA_SIGINFO` signature.
pub type Handler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// The engine's handler for one signal and the program's action it forwards to.
pub struct Chain {
    signal: fn() -> libc::c_int,
    handler: Handler,
    flags: libc::c_int,
    previous: AtomicPtr<libc::sigaction>,
}

/// Threads inside [`Chain::forward`] (0: free entry): a program handler that chains back to
/// the engine's must not start another round.
static FORWARDING: [AtomicI32; 64] = [const { AtomicI32::new(0) }; 64];

impl Chain {
    /// The chain for `signal()` (a function: real-time signal numbers are only known at run
    /// time), with `handler` installed with `flags | SA_SIGINFO` and an empty mask.
    pub const fn new(signal: fn() -> libc::c_int, handler: Handler, flags: libc::c_int) -> Chain {
        Chain {
            signal,
            handler,
            flags,
            previous: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// Whether the engine's handler is the signal's current action.
    #[cfg(test)]
    pub fn is_installed(&self) -> Result<bool> {
        Ok(current(self.signal())?.sa_sigaction == self.handler as libc::sighandler_t)
    }

    /// The signal.
    pub fn signal(&self) -> libc::c_int {
        (self.signal)()
    }

    /// Puts the engine's handler in front unless it is already the current action, keeping the
    /// action it replaces to forward to. Call it before every use that needs the handler (it is
    /// one `sigaction` query when nothing changed). Not async-signal-safe (allocates).
    pub fn install(&self) -> Result<()> {
        let signal = self.signal();
        let ours = self.handler as libc::sighandler_t;
        if current(signal)?.sa_sigaction == ours {
            return Ok(());
        }
        // SAFETY: a zeroed sigaction filled completely (handler, flags, empty mask); valid
        // pointers; the handler has the SA_SIGINFO signature.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ours;
            action.sa_flags = self.flags | libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            let mut replaced: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, &action, &mut replaced) != 0 {
                return Err(Error::last_os("sigaction (install the engine's handler)"));
            }
            if replaced.sa_sigaction != ours {
                // Leaked: a handler on another thread may still read the one it replaces.
                self.previous
                    .store(Box::into_raw(Box::new(replaced)), Ordering::Release);
            }
        }
        Ok(())
    }

    /// Passes a signal that is not the engine's to the program's action, as the kernel would
    /// have (see the module docs).
    ///
    /// # Safety
    ///
    /// Call it from the engine's handler with the arguments the kernel passed to it.
    pub unsafe fn forward(
        &self,
        signal: libc::c_int,
        info: *mut libc::siginfo_t,
        context: *mut libc::c_void,
    ) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        if FORWARDING.iter().any(|e| e.load(Ordering::Acquire) == tid) {
            // The program's handler chained back to the engine's: the end of the chain.
            default_action(signal);
            return;
        }
        // (With 64 threads forwarding at once the guard is skipped; only a looping program
        // handler, which then recurses, would notice.)
        let entry = FORWARDING.iter().find(|e| {
            e.compare_exchange(0, tid, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        });
        // SAFETY: `previous` is null or a leaked, never-freed sigaction.
        match unsafe { self.previous.load(Ordering::Acquire).as_ref() } {
            // SAFETY: forwarded from the handler with the kernel's arguments (caller).
            Some(p) => unsafe { call(signal, p, info, context) },
            None => default_action(signal),
        }
        if let Some(e) = entry {
            e.store(0, Ordering::Release);
        }
    }
}

fn current(signal: libc::c_int) -> Result<libc::sigaction> {
    // SAFETY: a null new action only reads the current one into `old`, valid and writable.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(signal, std::ptr::null(), &mut old) != 0 {
            return Err(Error::last_os("sigaction (query)"));
        }
        Ok(old)
    }
}

/// Calls `action`'s handler as the kernel would have.
///
/// # Safety
///
/// The arguments are those the kernel passed to the engine's handler.
unsafe fn call(
    signal: libc::c_int,
    action: &libc::sigaction,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    let handler = action.sa_sigaction;
    if handler == libc::SIG_IGN {
        return;
    }
    if handler == libc::SIG_DFL {
        default_action(signal);
        return;
    }
    // SAFETY: sigset operations on local sets; pthread_sigmask is async-signal-safe.
    let saved = unsafe {
        let mut mask = action.sa_mask;
        if action.sa_flags & libc::SA_NODEFER == 0 {
            libc::sigaddset(&mut mask, signal);
        }
        let mut saved: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &mask, &mut saved);
        saved
    };
    if action.sa_flags & libc::SA_RESETHAND != 0 {
        // SAFETY: SIG_DFL is a valid disposition; async-signal-safe.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
    if action.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the action declared SA_SIGINFO, so its handler has this signature.
        let f: Handler = unsafe { std::mem::transmute(handler) };
        f(signal, info, context);
    } else {
        // SAFETY: without SA_SIGINFO the handler has the one-argument signature.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(signal);
    }
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &saved, std::ptr::null_mut()) };
}

/// What would have happened without the engine's handler under `SIG_DFL`.
fn default_action(signal: libc::c_int) {
    let ignored = [libc::SIGCHLD, libc::SIGURG, libc::SIGWINCH, libc::SIGCONT];
    if ignored.contains(&signal) {
        return;
    }
    // The default action (terminate, or dump core) is delivered as soon as the handler returns:
    // the signal is blocked while its handler runs.
    // SAFETY: signal and raise are async-signal-safe; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    static OURS: AtomicU64 = AtomicU64::new(0);
    static PROGRAMS: AtomicU64 = AtomicU64::new(0);

    fn test_signal() -> libc::c_int {
        libc::SIGRTMAX() - 2
    }

    extern "C" fn engine(signal: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        OURS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: forwarded with the kernel's arguments.
        unsafe { CHAIN.forward(signal, info, ctx) };
    }

    extern "C" fn program(_: libc::c_int) {
        PROGRAMS.fetch_add(1, Ordering::SeqCst);
    }

    static CHAIN: Chain = Chain::new(test_signal, engine, libc::SA_RESTART);

    #[test]
    fn the_programs_handler_is_forwarded_to_before_and_after_the_engines() {
        // SAFETY: installing a valid one-argument handler.
        unsafe { libc::signal(test_signal(), program as *const () as libc::sighandler_t) };
        CHAIN.install().unwrap();
        assert!(CHAIN.is_installed().unwrap());
        // SAFETY: raising a signal that has a handler.
        unsafe { libc::raise(test_signal()) };
        assert_eq!(
            (OURS.load(Ordering::SeqCst), PROGRAMS.load(Ordering::SeqCst)),
            (1, 1)
        );
        // The program replaces the engine's handler; the next install puts it back in front.
        // SAFETY: as above.
        unsafe { libc::signal(test_signal(), program as *const () as libc::sighandler_t) };
        assert!(!CHAIN.is_installed().unwrap());
        CHAIN.install().unwrap();
        // SAFETY: as above.
        unsafe { libc::raise(test_signal()) };
        assert_eq!(
            (OURS.load(Ordering::SeqCst), PROGRAMS.load(Ordering::SeqCst)),
            (2, 2)
        );
    }
}
