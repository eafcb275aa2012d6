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
//! assert_eq!(evolve_code::fault_injection::trap_table().1, false);
//! reset();
//! ```

pub use crate::sys::inject::{calls, fail_nth, reset, Failure, Syscall};

/// The trap table as the `SIGTRAP` handler sees it: every site ever written through the int3
/// protocol with the instruction it is armed with (none outside a write), and whether a write
/// is in flight.
pub fn trap_table() -> (Vec<(usize, Option<[u8; crate::SITE_LEN]>)>, bool) {
    crate::write::trap_table()
}
