//! The engine's SIGTRAP handler coexists with the program's own: traps that are not at patch
//! sites reach the program's handler, whether it was installed before or after the engine's.
//! One test in its own binary: signal dispositions are process-wide.
#![allow(unsafe_code)]

mod common;

use common::{flip_fns, hammer, one, threads, F};
use evolve_code::{Batch, FnSite, Placement, WritePath};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static FIRST_HANDLER_HITS: AtomicU64 = AtomicU64::new(0);
static SECOND_HANDLER_HITS: AtomicU64 = AtomicU64::new(0);

extern "C" fn first_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    FIRST_HANDLER_HITS.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn second_handler(_: libc::c_int) {
    SECOND_HANDLER_HITS.fetch_add(1, Ordering::SeqCst);
}

fn install(handler: libc::sighandler_t, siginfo: bool) {
    // SAFETY: a zeroed sigaction filled with a valid handler of the declared signature.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler;
        action.sa_flags = if siginfo { libc::SA_SIGINFO } else { 0 };
        libc::sigemptyset(&mut action.sa_mask);
        assert_eq!(
            libc::sigaction(libc::SIGTRAP, &action, std::ptr::null_mut()),
            0
        );
    }
}

/// A breakpoint that is not at any patch site (a program's own `int3`, e.g. an assertion hook).
fn foreign_breakpoint() {
    // SAFETY: int3 raises SIGTRAP; the installed handler returns and execution continues after it.
    unsafe { std::arch::asm!("int3") };
}

fn int3_stress(site: &FnSite<F>) {
    let (_, rounds) = hammer(
        &[site.entry()],
        threads(),
        20_000,
        Duration::from_secs(10),
        |i| {
            let (from, to) = flip_fns(i);
            let mut batch = Batch::new();
            site.retarget_in(batch.path(WritePath::Int3), from, to);
            batch.apply().unwrap();
        },
    );
    assert!(rounds >= 1000);
}

#[test]
fn foreign_traps_reach_the_programs_handler_installed_before_or_after_the_engines() {
    let site = FnSite::with_placement(one as F, Placement::CrossWord).unwrap();

    // The program's handler is installed first; the engine installs its own in front of it.
    install(first_handler as *const () as libc::sighandler_t, true);
    int3_stress(&site);
    assert!(evolve_code::write::trap_counts().emulated > 0);
    foreign_breakpoint();
    assert_eq!(FIRST_HANDLER_HITS.load(Ordering::SeqCst), 1);

    // The program replaces the engine's handler; the engine's next int3 write puts its handler
    // back in front, chaining to the new one, and the patch still works under threads.
    install(second_handler as *const () as libc::sighandler_t, false);
    int3_stress(&site);
    foreign_breakpoint();
    assert_eq!(SECOND_HANDLER_HITS.load(Ordering::SeqCst), 1);
    assert_eq!(FIRST_HANDLER_HITS.load(Ordering::SeqCst), 1);
}
