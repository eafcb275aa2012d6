//! Addresses kept out of sight of reference scans.
//!
//! Reclamation proves that nothing can reach an old patch by scanning the process's memory for
//! words that point into it. Evolve's own bookkeeping (site registry, springboard maps, version
//! stacks) necessarily remembers such addresses, and so do stale copies of it in freed memory; if
//! those were stored as plain numbers every scan would find them and no patch would ever be
//! unloaded. Bookkeeping therefore stores them as [`Hidden`]: XOR-ed with a constant that sets the
//! top 16 bits, which makes the stored value a non-canonical address that no scan target can
//! contain.

//!
//! Temporaries that must hold plain addresses are [`scrub`]bed before they are freed.
//!
//! # Safety
//!
//! [`scrub`] writes zero bytes over the elements of a vector of `Copy` values after setting its
//! length to zero, so they are never read or dropped again.
#![allow(unsafe_code)]

use std::fmt;

const MASK: usize = 0xa5a5_0000_0000_0000;

/// An address stored so that Evolve's reference scans do not see it.
///
/// # Example
///
/// ```
/// use evolve_code::Hidden;
/// let h = Hidden::new(0x7f00_1234_5678);
/// assert_eq!(h.get(), 0x7f00_1234_5678);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hidden(usize);

impl Hidden {
    /// Hides `address`.
    pub const fn new(address: usize) -> Hidden {
        Hidden(address ^ MASK)
    }

    /// The address.
    pub const fn get(self) -> usize {
        self.0 ^ MASK
    }
}

impl fmt::Debug for Hidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.get())
    }
}

/// Drops `v` after overwriting all of its memory (its whole capacity) with zeros, with volatile
/// stores the compiler cannot remove: temporaries that held plain patch addresses must not leave
/// stale copies in freed memory, where a reference scan would find them.
///
/// # Example
///
/// ```
/// let ranges = vec![(0x7f00_0000_1000usize, 0x7f00_0000_2000usize)];
/// evolve_code::scrub(ranges);
/// ```
pub fn scrub<T: Copy>(v: Vec<T>) {
    scrub_plain(v);
}

/// [`scrub`] for any element type without drop glue.
pub(crate) fn scrub_plain<T>(mut v: Vec<T>) {
    assert!(
        !std::mem::needs_drop::<T>(),
        "scrub of a type with drop glue"
    );
    scrub_spare(&mut v);
    let len = v.len();
    // SAFETY: T has no drop glue (asserted): after zeroing, the elements are never read or
    // dropped (the length is set to zero first); the writes stay inside the allocation.
    unsafe {
        v.set_len(0);
        let base = v.as_mut_ptr() as *mut u8;
        for i in 0..len * std::mem::size_of::<T>() {
            std::ptr::write_volatile(base.add(i), 0);
        }
    }
}

/// Overwrites the unused capacity of `v` with zeros (volatile stores), where removed elements
/// leave stale copies; see [`scrub`].
pub fn scrub_spare<T>(v: &mut Vec<T>) {
    let spare = v.spare_capacity_mut();
    let bytes = std::mem::size_of_val(spare);
    let base = spare.as_mut_ptr() as *mut u8;
    for i in 0..bytes {
        // SAFETY: within the spare capacity, which holds no live element.
        unsafe { std::ptr::write_volatile(base.add(i), 0) };
    }
}

/// `insn` with its target hidden (for bookkeeping).
pub(crate) fn hide_insn(insn: crate::SiteInsn) -> crate::SiteInsn {
    map_target(insn, |t| Hidden::new(t).0)
}

/// The instruction whose target [`hide_insn`] hid.
pub(crate) fn reveal_insn(insn: crate::SiteInsn) -> crate::SiteInsn {
    map_target(insn, |t| Hidden(t).get())
}

fn map_target(insn: crate::SiteInsn, f: impl Fn(usize) -> usize) -> crate::SiteInsn {
    use crate::SiteInsn::*;
    match insn {
        Jmp(t) => Jmp(f(t)),
        Call(t) => Call(f(t)),
        Nop => Nop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_values_are_never_canonical_user_addresses() {
        for a in [0x1000usize, 0x5555_5555_0000, 0x7fff_ffff_f000] {
            let stored = Hidden::new(a).0;
            assert!(stored >> 47 != 0, "{stored:#x} looks like a user address");
            assert_eq!(Hidden::new(a).get(), a);
        }
    }
}
