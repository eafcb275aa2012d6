//! Core serialization: make every thread of the process see freshly written code.
//!
//! # Why
//!
//! x86 cores may execute stale instruction bytes that they fetched before another core modified
//! them ("cross-modifying code", Intel SDM vol. 3 §8.1.3). The SDM's remedy is for each executing
//! core to run a serializing instruction after the write. Linux's
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)` (since 4.16) does exactly that for
//! every core currently running a thread of this process, and guarantees that threads not running
//! now will serialize before they run again. The process must register its intent once, before
//! the first use.
//!
//! # Call order
//!
//! [`sync_cores`] registers on first use (once, thread-safe) and then issues the barrier. Call it
//! after writing code and before relying on other threads seeing it.
//!
//! # Safety
//!
//! Only `syscall(2)` with integer arguments; no memory is passed to the kernel.
#![allow(unsafe_code)]

use crate::error::{Error, ErrorKind, Result};
use std::sync::OnceLock;

const MEMBARRIER_CMD_QUERY: libc::c_long = 0;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_long = 1 << 5;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_long = 1 << 6;

/// `int membarrier(int cmd, unsigned int flags, int cpu_id)`; see membarrier(2).
fn membarrier(cmd: libc::c_long) -> libc::c_long {
    // SAFETY: membarrier takes only integer arguments and touches no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            cmd,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    }
}

fn register() -> std::result::Result<(), ErrorKind> {
    let supported = membarrier(MEMBARRIER_CMD_QUERY);
    if supported < 0 || supported & MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE == 0 {
        return Err(ErrorKind::Unsupported {
            what: "membarrier(PRIVATE_EXPEDITED_SYNC_CORE) (Linux >= 4.16), needed to make \
                   other threads serialize after a code write",
        });
    }
    if membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE) != 0 {
        return Err(Error::last_os("membarrier register sync-core")
            .kind()
            .clone());
    }
    Ok(())
}

/// Registers for sync-core barriers (once). Cheap after the first call.
pub fn ensure_registered() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), ErrorKind>> = OnceLock::new();
    REGISTERED.get_or_init(register).clone().map_err(Error::new)
}

/// Makes every core running a thread of this process execute a serializing instruction, and
/// every other thread do so before it next runs.
pub fn sync_cores() -> Result<()> {
    ensure_registered()?;
    #[cfg(feature = "fault-injection")]
    crate::sys::inject::check(
        crate::sys::inject::Syscall::Membarrier,
        "membarrier sync-core",
    )?;
    if membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE) != 0 {
        return Err(Error::last_os("membarrier sync-core"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sync_cores_succeeds_repeatedly() {
        for _ in 0..100 {
            super::sync_cores().unwrap();
        }
    }
}
