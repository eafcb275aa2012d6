//! Unwind information of a loaded patch: its `.eh_frame`, registered with the process's
//! unwinder so that a panic unwinds through patch code into the program's `catch_unwind`, and
//! backtraces walk through patch frames.
//!
//! The object's `.eh_frame` is loaded (and relocated: FDE addresses, LSDA and personality
//! pointers) into the patch's unwind region, followed by a table made with the engine's
//! `gimli::write` generator (`crate::unwind`): one CIE and one FDE covering the 16-byte guard at
//! the start of the text region, then the zero terminator. The whole is registered with the
//! process's unwinder the way the detour trampolines' tables are (`crate::unwind::register_at`:
//! the section for libgcc, each FDE for LLVM's libunwind).
//!
//! Why the guard: the unwinder remembers the lowest address a registered table covers (libgcc's
//! `object.pc_begin`, set lazily at the first lookup) in memory reclamation scans. With the guard
//! that address is the guard's, where no function starts, so reclamation can ignore exactly that
//! value and still see every real pointer to the patch's first function.
#![allow(unsafe_code)]

use crate::hidden::Hidden;

/// The guard table for a guard of `len` bytes at `at`.
pub(super) fn guard_table(at: usize, len: usize) -> Vec<u8> {
    crate::unwind::eh_frame(crate::unwind::call_cie(), at, len, [])
}

/// A registered `.eh_frame` table, deregistered by [`Registration::deregister`].
#[derive(Debug)]
pub(super) struct Registration {
    begin: Hidden,
}

impl Registration {
    /// Registers the table at `begin`.
    ///
    /// # Safety
    ///
    /// `begin` must hold a complete `.eh_frame` table ending in a zero terminator whose FDEs
    /// describe code that is mapped, and must stay mapped and unchanged until deregistered.
    pub unsafe fn register(begin: usize) -> Registration {
        // SAFETY: the caller vouches for the table; the unwinder keeps the pointer until
        // deregistered.
        unsafe { crate::unwind::register_at(begin) };
        Registration {
            begin: Hidden::new(begin),
        }
    }

    /// Removes the table from the unwinder.
    ///
    /// # Safety
    ///
    /// No thread may be unwinding through, or about to run, the code the table describes.
    pub unsafe fn deregister(self) {
        // SAFETY: `begin` was registered by `register` and not deregistered since (this consumes
        // the only handle).
        unsafe { crate::unwind::deregister_at(self.begin.get()) };
    }
}
