//! Fault injection on systems that forbid writable code: every write goes through
//! `/proc/self/mem` (and the int3 protocol). A batch of mixed sites whose n-th `/proc/self/mem`
//! write or `membarrier` fails or panics, for every n, under `EVOLVE_STRESS_THREADS` calling
//! threads, must leave the process exactly as it was. Its own binary: the write path is chosen
//! once per process.

mod common;

use common::faults::matrix;
use evolve_code::fault_injection::{Failure, Syscall};
use std::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    // Before the engine's first use in this process.
    std::env::set_var("EVOLVE_WRITE_VIA_PROC_MEM", "1");
    guard
}

#[test]
fn a_batch_whose_nth_proc_mem_write_fails_leaves_the_process_as_it_was() {
    let _serial = serial();
    let (failed, completed) = matrix(Syscall::ProcMemWrite, Failure::Error);
    assert!(evolve_code::write::writes_via_proc_mem());
    assert_eq!(completed, 0);
    assert!(failed > 0);
}

#[test]
fn a_batch_whose_nth_core_sync_fails_through_proc_mem_is_undone() {
    let _serial = serial();
    let (failed, completed) = matrix(Syscall::Membarrier, Failure::Error);
    assert_eq!(completed, 0);
    assert!(failed > 0);
}

#[test]
fn a_panic_in_a_proc_mem_write_leaves_no_site_half_written() {
    let _serial = serial();
    let (failed, _) = matrix(Syscall::ProcMemWrite, Failure::Panic);
    assert!(failed > 0);
}
