//! Near memory: small blocks of executable memory within ±2 GiB of a given address.
//!
//! A `rel32` branch reaches ±2 GiB. Stubs, springboards and trampolines must therefore live near
//! the code that branches to them: near the executable for its sites, near each shared library
//! for sites in that library. The allocator reserves 1 MiB regions in free address space close
//! to the address asked for (found in `/proc/self/maps`, placed with `MAP_FIXED_NOREPLACE`) and
//! hands out 16-byte-aligned blocks from them, reusing freed blocks of the same size.
//!
//! Regions are mapped `r-x` from the start: they never become writable-only, and blocks are
//! filled through the engine's write window like any other code.
//!
//! # Safety
//!
//! Writing into a block and freeing it are `unsafe`: the caller vouches that no thread executes
//! the bytes being written or freed.
#![allow(unsafe_code)]

use crate::error::{Error, ErrorKind, Result};
use crate::sys::memory::{self, Protection};
use std::collections::HashMap;
use std::sync::Mutex;

/// Size of one reserved region.
const REGION_SIZE: usize = 1 << 20;
/// Blocks are aligned (and sized) to this.
const BLOCK_ALIGN: usize = 16;
/// Every byte of a block handed out for `near` lies within this distance of `near`, leaving room
/// for the 5-byte instruction at `near` itself and for offsets inside the block.
pub const REACH: usize = (1 << 31) - (1 << 24);

struct Region {
    start: usize,
    end: usize,
    next: usize,
    free: HashMap<usize, Vec<usize>>,
}

impl Region {
    fn reaches(&self, near: usize) -> bool {
        self.start.abs_diff(near) < REACH && self.end.abs_diff(near) < REACH
    }

    fn take(&mut self, len: usize) -> Option<usize> {
        if let Some(address) = self.free.get_mut(&len).and_then(Vec::pop) {
            return Some(address);
        }
        if self.end - self.next >= len {
            self.next += len;
            return Some(self.next - len);
        }
        None
    }
}

static REGIONS: Mutex<Vec<Region>> = Mutex::new(Vec::new());

/// A block of near executable memory.
///
/// Dropping a block does not free it: code may still run there. Freeing is [`NearBlock::free`],
/// whose caller vouches that no thread can.
///
/// # Example
///
/// ```
/// let here = evolve_code::NearBlock::alloc as *const () as usize;
/// let block = evolve_code::NearBlock::alloc(here, 64).unwrap();
/// assert!(block.address().abs_diff(here) < 1 << 31);
/// assert_eq!(block.address() % 16, 0);
/// ```
#[derive(Debug)]
pub struct NearBlock {
    address: usize,
    len: usize,
}

impl NearBlock {
    /// Allocates `len` bytes of executable memory, every byte within ±2 GiB of `near`.
    ///
    /// The block's contents are unspecified until written with [`NearBlock::write`].
    pub fn alloc(near: usize, len: usize) -> Result<NearBlock> {
        if len == 0 || len > REGION_SIZE {
            return Err(Error::new(ErrorKind::InvalidArgument {
                reason: format!("near block of {len} bytes (1..={REGION_SIZE})"),
            }));
        }
        let len = len.next_multiple_of(BLOCK_ALIGN);
        let mut regions = REGIONS.lock().unwrap_or_else(|p| p.into_inner());
        for region in regions.iter_mut().filter(|r| r.reaches(near)) {
            if let Some(address) = region.take(len) {
                return Ok(NearBlock { address, len });
            }
        }
        let start = reserve(near, REGION_SIZE, Protection::READ_EXEC)?;
        let mut region = Region {
            start,
            end: start + REGION_SIZE,
            next: start,
            free: HashMap::new(),
        };
        let address = region.take(len).expect("fresh region");
        regions.push(region);
        Ok(NearBlock { address, len })
    }

    /// The first byte of the block.
    pub fn address(&self) -> usize {
        self.address
    }

    /// The block's length (a multiple of 16).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: blocks are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes `code` at `offset` in the block and makes every core see it.
    ///
    /// # Safety
    ///
    /// No thread may be executing, or about to execute, the bytes being written: write code
    /// before publishing it (e.g. before a site points at it).
    pub unsafe fn write(&self, offset: usize, code: &[u8]) -> Result<()> {
        if offset + code.len() > self.len {
            return Err(Error::new(ErrorKind::InvalidArgument {
                reason: format!(
                    "{} bytes at offset {offset} overflow a near block of {}",
                    code.len(),
                    self.len
                ),
            }));
        }
        crate::write::lock().write_fresh_code(self.address + offset, code)
    }

    /// Returns the block to the allocator.
    ///
    /// # Safety
    ///
    /// No thread may be executing in the block or hold a return address into it, and no site
    /// may branch to it.
    pub unsafe fn free(self) {
        let mut regions = REGIONS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = regions
            .iter_mut()
            .find(|r| (r.start..r.end).contains(&self.address))
        {
            r.free.entry(self.len).or_default().push(self.address);
        }
    }
}

/// Maps `len` bytes (a multiple of the page size) of fresh anonymous memory
/// with `protection`, every byte within [`REACH`] of `near`, as close to it as the free address
/// space allows: the regions of this allocator, and whole patch objects (see `crate::loader`).
pub(crate) fn reserve(near: usize, len: usize, protection: Protection) -> Result<usize> {
    let maps = memory::mappings()?;
    let lowest = near.saturating_sub(REACH).max(1 << 16);
    let highest = near.saturating_add(REACH).min(0x7fff_ffff_f000);
    // Candidate gaps between mappings, clipped to the window around `near`.
    let mut gaps = Vec::new();
    let mut previous_end = lowest;
    for m in maps
        .iter()
        .map(|m| m.range.clone())
        .chain(std::iter::once(highest..highest))
    {
        let (gap_start, gap_end) = (previous_end.max(lowest), m.start.min(highest));
        if gap_end > gap_start && gap_end - gap_start >= len + (1 << 16) {
            gaps.push((gap_start, gap_end));
        }
        previous_end = previous_end.max(m.end);
    }
    // Try the spot in each gap nearest to `near`, nearest gaps first, 64 KiB aligned.
    let align = |a: usize| a.next_multiple_of(1 << 16);
    let mut candidates: Vec<usize> = gaps
        .iter()
        .map(|&(s, e)| {
            let latest = (e - len) & !((1 << 16) - 1);
            align(near.clamp(s, e - len)).min(latest).max(align(s))
        })
        .collect();
    candidates.sort_by_key(|c| c.abs_diff(near));
    for candidate in candidates.into_iter().take(16) {
        let region_reaches =
            candidate.abs_diff(near) < REACH && (candidate + len).abs_diff(near) < REACH;
        if !region_reaches {
            continue;
        }
        if let Some(start) = memory::map_fixed_noreplace(candidate, len, protection)? {
            return Ok(start);
        }
    }
    Err(Error::new(ErrorKind::NoNearMemory { near, size: len }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_near_the_executable_and_near_a_far_mapping_are_in_reach() {
        let exe =
            blocks_near_the_executable_and_near_a_far_mapping_are_in_reach as *const () as usize;
        let far = memory::map_anywhere(4096, Protection::READ_EXEC).unwrap();
        for near in [exe, far] {
            let a = NearBlock::alloc(near, 100).unwrap();
            let b = NearBlock::alloc(near, 100).unwrap();
            assert_ne!(a.address(), b.address());
            for block in [&a, &b] {
                assert!(block.address().abs_diff(near) < REACH);
                assert!((block.address() + block.len()).abs_diff(near) < REACH);
                assert_eq!(block.len(), 112);
            }
        }
    }

    #[test]
    fn a_freed_block_is_reused() {
        let near = a_freed_block_is_reused as *const () as usize;
        let a = NearBlock::alloc(near, 4000).unwrap();
        let address = a.address();
        // SAFETY: nothing ever executed or pointed at this block.
        unsafe { a.free() };
        let b = NearBlock::alloc(near, 4000).unwrap();
        assert_eq!(b.address(), address);
    }

    #[test]
    fn zero_and_oversized_requests_are_refused() {
        assert!(NearBlock::alloc(0x1000_0000, 0).is_err());
        assert!(NearBlock::alloc(0x1000_0000, REGION_SIZE + 1).is_err());
    }
}
