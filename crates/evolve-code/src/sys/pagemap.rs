//! Which pages of a range hold data the program wrote: `/proc/self/pagemap` (one 64-bit entry
//! per page, readable without privilege; see `Documentation/admin-guide/mm/pagemap.rst`).
//!
//! - bit 63: present in memory; bit 62: swapped out. A page that is neither was never touched
//!   (or was discarded) and reads as zeros or as its file's bytes: it holds no pointer.
//! - bit 61: a file page or shared anonymous memory. In a *private* mapping such a page still
//!   holds its file's bytes — the program never wrote it (a write makes a private anonymous
//!   copy) — so no pointer the program stored can be there.
//!
//! Most of a process's address space is such pages — each thread's stack reserves megabytes
//! and uses kilobytes; libraries map their files — so reference scans read only the rest.
//!
//! # Safety
//!
//! Nothing here touches raw memory: `pread` on the pagemap file into a buffer owned here (the
//! test writes into a mapping of its own).

#![allow(unsafe_code)]

use std::os::unix::fs::FileExt;

/// Which pages a scan needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Present or swapped (shared mappings: another process may have written them too).
    Touched,
    /// Present or swapped, and not a page of the backing file (private mappings).
    Written,
}

/// Reads `/proc/self/pagemap` in chunks into a buffer allocated once.
pub struct PageMap {
    file: Option<std::fs::File>,
    entries: Vec<u8>,
}

impl Default for PageMap {
    fn default() -> PageMap {
        PageMap::new()
    }
}

impl PageMap {
    /// Pages per `pagemap` read.
    const CHUNK: usize = 8192;

    /// Opens the pagemap (allocates; call it before stopping the world).
    pub fn new() -> PageMap {
        PageMap {
            file: std::fs::File::open("/proc/self/pagemap").ok(),
            entries: vec![0; Self::CHUNK * 8],
        }
    }

    /// Calls `f(from, to)` for each run of `wanted` pages within `start..end` (clamped to it).
    /// Where the pagemap cannot be read, every page counts. Allocation-free.
    pub fn runs(
        &mut self,
        start: usize,
        end: usize,
        wanted: Wanted,
        f: &mut dyn FnMut(usize, usize),
    ) {
        let Some(file) = &self.file else {
            f(start, end);
            return;
        };
        let page = super::memory::page_size();
        let mut page_at = start & !(page - 1);
        while page_at < end {
            let pages = (end - page_at).div_ceil(page).min(Self::CHUNK);
            let chunk_end = (page_at + pages * page).min(end);
            let bytes = &mut self.entries[..pages * 8];
            match file.read_at(bytes, (page_at / page * 8) as u64) {
                Ok(n) if n == pages * 8 => {
                    let mut run: Option<usize> = None;
                    for (i, entry) in bytes.chunks_exact(8).enumerate() {
                        let entry = u64::from_ne_bytes(entry.try_into().expect("8 bytes"));
                        let touched = entry >> 62 != 0;
                        let keep = match wanted {
                            Wanted::Touched => touched,
                            Wanted::Written => touched && entry >> 61 & 1 == 0,
                        };
                        let at = page_at + i * page;
                        match (keep, run) {
                            (true, None) => run = Some(at),
                            (false, Some(from)) => {
                                f(from.max(start), at);
                                run = None;
                            }
                            _ => {}
                        }
                    }
                    if let Some(from) = run {
                        f(from.max(start), chunk_end);
                    }
                }
                _ => f(page_at.max(start), chunk_end),
            }
            page_at += pages * page;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_pages_are_found_and_untouched_ones_skipped() {
        let page = crate::sys::memory::page_size();
        let rw = crate::sys::memory::Protection {
            read: true,
            write: true,
            exec: false,
        };
        let base = crate::sys::memory::map_anywhere(4 * page, rw).unwrap();
        // SAFETY: our own fresh mapping; pages 1 and 2 are written.
        unsafe { std::ptr::write_bytes((base + page) as *mut u8, 1, 2 * page) };
        let mut runs = Vec::new();
        PageMap::new().runs(base, base + 4 * page, Wanted::Written, &mut |a, b| {
            runs.push((a - base) / page..(b - base) / page)
        });
        assert_eq!(runs, vec![1..3]);
    }
}
