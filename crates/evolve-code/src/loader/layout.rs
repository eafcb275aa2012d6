//! Where each section of a patch object goes, and the memory that holds them.
//!
//! One reservation within ±2 GiB of the executable (found by the engine's near-memory search)
//! holds four page-aligned regions, in this order:
//!
//! | region | contents | final protection |
//! |---|---|---|
//! | text | a 16-byte `int3` guard, the `SHF_EXECINSTR` sections, PLT stubs for far calls | `r-x` |
//! | rodata | read-only sections, `.data.rel.ro*`, the GOT | `r--` |
//! | data | writable sections, then `.bss` (`SHT_NOBITS`) | `rw-` |
//! | unwind | `.eh_frame`, then a one-FDE table covering the guard | `r--` |
//!
//! The whole reservation is mapped `rw-` (never executable) while sections are copied and
//! relocated; only then does each region get its final protection, so no page is ever writable
//! and executable. Nothing runs in it before the caller publishes it.
//!
//! The unwind region is kept apart because the unwinder's own tables point into it: those words
//! are not references to the patch's code or data, and reclamation's scan does not look for
//! them (see `super::unwind`).
#![allow(unsafe_code)]

use crate::error::Result;
use crate::sys::memory::{self, Protection};
use std::ops::Range;

/// Which region a loaded section goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Region {
    Text,
    ReadOnly,
    Data,
    Unwind,
}

/// Bytes at the start of the text region that belong to no function (see `super::unwind`).
pub(super) const GUARD: usize = 16;
/// Bytes per PLT stub: `jmp *slot(%rip)` and two `int3`.
pub(super) const PLT_STUB: usize = 8;
/// Bytes per GOT slot; TLS module/offset pairs take two.
pub(super) const GOT_SLOT: usize = 8;

/// A section to place: its index in the object, region, size and alignment.
#[derive(Debug, Clone, Copy)]
pub(super) struct Wanted {
    pub index: usize,
    pub region: Region,
    pub size: usize,
    pub align: usize,
}

/// The placement of every loaded section and of the loader's own tables, as offsets from the
/// reservation's start.
#[derive(Debug)]
pub(super) struct Layout {
    /// `(section index, offset)` for every placed section.
    pub sections: Vec<(usize, usize)>,
    pub text: Range<usize>,
    pub rodata: Range<usize>,
    pub data: Range<usize>,
    pub unwind: Range<usize>,
    /// PLT stubs (in text) and GOT slots (in rodata).
    pub plt: usize,
    pub got: usize,
    /// Where the guard table goes in the unwind region.
    pub guard_table: usize,
    pub len: usize,
}

/// Lays out `sections` plus `plt_stubs` PLT stubs, `got_slots` GOT slots and a guard unwind
/// table of `guard_table_len` bytes.
pub(super) fn plan(
    sections: &[Wanted],
    plt_stubs: usize,
    got_slots: usize,
    guard_table_len: usize,
) -> Layout {
    let page = memory::page_size();
    let mut placed = Vec::with_capacity(sections.len());
    let mut at = 0;
    let place = |region: Region, at: &mut usize, placed: &mut Vec<(usize, usize)>| {
        for s in sections.iter().filter(|s| s.region == region) {
            *at = at.next_multiple_of(s.align.max(1));
            placed.push((s.index, *at));
            *at += s.size;
        }
    };
    let text_start = at;
    at += GUARD;
    place(Region::Text, &mut at, &mut placed);
    let plt = at.next_multiple_of(PLT_STUB);
    at = plt + plt_stubs * PLT_STUB;
    let text = text_start..at;
    at = at.next_multiple_of(page);
    let rodata_start = at;
    place(Region::ReadOnly, &mut at, &mut placed);
    let got = at.next_multiple_of(16);
    at = got + got_slots * GOT_SLOT;
    let rodata = rodata_start..at;
    at = at.next_multiple_of(page);
    let data_start = at;
    place(Region::Data, &mut at, &mut placed);
    let data = data_start..at;
    at = at.next_multiple_of(page);
    let unwind_start = at;
    place(Region::Unwind, &mut at, &mut placed);
    // Entries of .eh_frame are 4-byte aligned and the table is read until a zero length: no
    // padding may separate the object's entries from the guard table.
    let guard_table = at.next_multiple_of(4);
    at = guard_table + guard_table_len;
    let unwind = unwind_start..at;
    let len = at.next_multiple_of(page).max(page);
    Layout {
        sections: placed,
        text,
        rodata,
        data,
        unwind,
        plt,
        got,
        guard_table,
        len,
    }
}

/// Anonymous memory near the executable, unmapped on drop unless [`Reservation::keep`] was
/// called: a refused load leaves no mapping behind.
#[derive(Debug)]
pub(super) struct Reservation {
    pub start: usize,
    pub len: usize,
    kept: bool,
}

impl Reservation {
    /// Maps `len` bytes `rw-` within reach of `near`.
    pub fn near(near: usize, len: usize) -> Result<Reservation> {
        let rw = Protection {
            read: true,
            write: true,
            exec: false,
        };
        let start = crate::near::reserve(near, len, rw)?;
        Ok(Reservation {
            start,
            len,
            kept: false,
        })
    }

    /// The bytes at `range` (offsets from the start), for writing while loading.
    pub fn bytes_mut(&mut self, range: Range<usize>) -> &mut [u8] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: the range lies inside our fresh `rw-` mapping (asserted above; protections
        // change only in `protect`, after the last write), which nothing else knows of yet; the
        // borrow of `self` keeps the slice from outliving it or aliasing another.
        unsafe {
            std::slice::from_raw_parts_mut((self.start + range.start) as *mut u8, range.len())
        }
    }

    /// Gives `range` (page-aligned offsets) its final protection.
    pub fn protect(&self, range: Range<usize>, protection: Protection) -> Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        // SAFETY: the range lies inside this patch's own mapping, which no thread executes or
        // accesses before the patch is applied (loading writes it first, then protects it).
        unsafe { memory::mprotect(self.start + range.start..self.start + range.end, protection) }
    }

    /// The memory now belongs to a loaded patch: not unmapped on drop.
    pub fn keep(mut self) -> (usize, usize) {
        self.kept = true;
        (self.start, self.len)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.kept {
            // SAFETY: the mapping is ours, fresh, and was never published: no thread executes
            // or refers to it.
            unsafe { libc::munmap(self.start as *mut libc::c_void, self.len) };
        }
    }
}

/// Replaces `start..start + len` (a loaded patch proven unreachable) by a `PROT_NONE`
/// reservation in one step, so no other mapping can take the range and a stale pointer faults.
///
/// # Safety
///
/// No thread may execute or access the range any more.
pub(super) unsafe fn retire(start: usize, len: usize) -> Result<()> {
    // SAFETY: MAP_FIXED replaces only our own mapping at exactly this range (the caller's
    // contract says nothing uses it); the new mapping is inaccessible.
    let p = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(crate::error::Error::last_os(
            "mmap PROT_NONE over an unloaded patch",
        ));
    }
    Ok(())
}
