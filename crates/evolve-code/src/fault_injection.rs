//! Test-only fault injection (cargo feature `fault-injection`, which only the engine's own tests
//! enable): make the n-th `mprotect`, `/proc/self/mem` write or `membarrier` core sync of the
//! calling thread fail or panic, and observe the trap table, to check that a write that fails
//! part-way leaves the process exactly as it was.
//!
//! # Example
//!
//! ```
//! use evolve_code::fault_injection::{calls, fail_nth, reset, Failure, Syscall};
//! use evolve_code::{Batch, FnSite, Placement};
//!
//! extern "C" fn one() -> u64 { 1 }
//! extern "C" fn two() -> u64 { 2 }
//! type F = extern "C" fn() -> u64;
//!
//! let site = FnSite::with_placement(one as F, Placement::CrossWord).unwrap();
//! // The second core sync of the int3 protocol fails: the site keeps its old target.
//! fail_nth(Syscall::Membarrier, 2, Failure::Error);
//! let mut batch = Batch::new();
//! site.retarget_in(&mut batch, one, two);
//! assert!(batch.apply().is_err());
//! assert_eq!((site.entry())(), 1);
//! assert!(!evolve_code::fault_injection::trap_table().write_in_flight);
//! reset();
//! ```

pub use crate::sys::inject::{calls, delay_parking, fail_nth, reset, Failure, Syscall};
pub use crate::sys::trap::TrapTable;

/// The trap table as the `SIGTRAP` handler sees it.
pub fn trap_table() -> TrapTable {
    crate::write::trap_table()
}
