//! The engine's SIGTRAP handler coexists with the program's own: traps that are not at patch
//! sites reach the program's handler, whether it was installed before or after the engine's.
//! One test in its own binary: signal dispositions are process-wide.
#![allow(unsafe_code)]

mod common;

use common::signals::{
    first_handler, install, second_handler, FIRST_HANDLER_HITS, SECOND_HANDLER_HITS,
};
use common::{flip_fns, hammer, one, threads, F};
use evolve_code::{Batch, FnSite, Placement, WritePath};
use std::sync::atomic::Ordering;
use std::time::Duration;

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
    install(
        libc::SIGTRAP,
        first_handler as *const () as libc::sighandler_t,
        true,
    );
    int3_stress(&site);
    assert!(evolve_code::write::trap_counts().emulated > 0);
    foreign_breakpoint();
    assert_eq!(FIRST_HANDLER_HITS.load(Ordering::SeqCst), 1);

    // The program replaces the engine's handler; the engine's next int3 write puts its handler
    // back in front, chaining to the new one, and the patch still works under threads.
    install(
        libc::SIGTRAP,
        second_handler as *const () as libc::sighandler_t,
        false,
    );
    int3_stress(&site);
    foreign_breakpoint();
    assert_eq!(SECOND_HANDLER_HITS.load(Ordering::SeqCst), 1);
    assert_eq!(FIRST_HANDLER_HITS.load(Ordering::SeqCst), 1);
}
