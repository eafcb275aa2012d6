//! Fault injection: a batch of mixed sites (aligned and cross-word jumps, calls, a call that
//! becomes a NOP, a far target through a springboard) whose n-th `mprotect` or `membarrier`
//! fails or panics, for every n, while `EVOLVE_STRESS_THREADS` threads call through every site.
//! Each failed batch must leave the process exactly as it was: bytes, results, page protections
//! and the trap table. The tests run one at a time: the trap table and the code pages are
//! process-wide.

mod common;

use common::faults::matrix;
use evolve_code::fault_injection::{Failure, Syscall};
use std::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn a_batch_whose_nth_mprotect_fails_leaves_bytes_protections_and_traps_as_they_were() {
    let _serial = serial();
    let (failed, completed) = matrix(Syscall::Mprotect, Failure::Error);
    // Opening a window fails the batch; a failed restore is retried and the batch completes.
    assert!(
        failed > 0 && completed > 0,
        "{failed} failed, {completed} completed"
    );
}

#[test]
fn a_batch_whose_nth_core_sync_fails_is_undone_in_the_protocols_reverse_order() {
    let _serial = serial();
    let (failed, completed) = matrix(Syscall::Membarrier, Failure::Error);
    assert_eq!(completed, 0, "a core sync that failed was not reported");
    assert!(failed > 0);
}

#[test]
fn a_panic_mid_batch_restores_protection_and_disarms_every_trap() {
    let _serial = serial();
    for syscall in [Syscall::Mprotect, Syscall::Membarrier] {
        let (failed, _) = matrix(syscall, Failure::Panic);
        assert!(failed > 0, "{syscall:?}: no panic reached the batch");
    }
}
