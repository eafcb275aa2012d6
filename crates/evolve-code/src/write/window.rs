//! Write windows: code pages made writable (kept executable) for one batch, and put back.
//!
//! # Invariant
//!
//! *A code page is writable only while a [`Window`] that made it so is alive, and the window
//! puts back the protection it found when it is dropped* — after a successful batch, an error
//! or a panic alike. A restoring `mprotect` that fails is retried (the kernel fails it only for
//! want of memory to split a mapping, which may pass); one that keeps failing is reported with
//! the range it left writable.
//!
//! Pages are never made writable without exec (a thread executing there would fault), contiguous
//! pages of one mapping share one `mprotect`, and only the writer, under the write lock, opens
//! windows. Where the kernel refuses writable code (`EACCES`: a W^X policy), the window writes
//! through `/proc/self/mem` instead and changes no protection.
//!
//! # Safety
//!
//! The window's writes are the unsafe part: [`Window::write`] and [`Window::store_first_byte`]
//! store into pages it made writable (or through `/proc/self/mem`), at addresses its opener
//! covered, in the order the protocol of [`crate::write`] prescribes.

use super::Writer;
use crate::arch::SITE_LEN;
use crate::error::{ErrorKind, Result};
use crate::hidden::Hidden;
use crate::sys::membarrier;
use crate::sys::memory::{self, Protection};
use std::ops::Range;

/// How often a failing `mprotect` that restores a protection is tried.
const RESTORE_ATTEMPTS: usize = 3;

/// Pages made writable for one batch; their protection is restored when it is dropped.
pub(crate) struct Window {
    runs: Vec<(Range<usize>, Protection)>,
    via_proc_mem: bool,
}

impl Window {
    /// Whether writes go through `/proc/self/mem` (not atomic: the int3 protocol only).
    pub(crate) fn via_proc_mem(&self) -> bool {
        self.via_proc_mem
    }

    /// Number of `mprotect` runs the window opened.
    pub(crate) fn runs(&self) -> usize {
        self.runs.len()
    }

    /// Writes `bytes` at `address` (inside the window) with relaxed atomic byte stores.
    pub(crate) fn write(&self, address: usize, bytes: &[u8]) -> Result<()> {
        if self.via_proc_mem {
            // SAFETY: the opener covered these bytes; the protocol guarantees no thread executes
            // a partially written instruction.
            return unsafe { memory::write_via_proc_mem(address, bytes) };
        }
        // SAFETY: the window made every page of the batch writable (and kept them executable);
        // the protocol guarantees no thread executes a partially written instruction.
        unsafe { memory::write(address, bytes) };
        Ok(())
    }

    /// Stores a site's first byte with `Release` (the byte the `SIGTRAP` handler reads).
    pub(crate) fn store_first_byte(&self, site: usize, byte: u8) -> Result<()> {
        if self.via_proc_mem {
            // SAFETY: as in `write`; the fences inside order it as a Release store.
            return unsafe { memory::write_via_proc_mem(site, &[byte]) };
        }
        // SAFETY: as in `write`.
        unsafe { memory::store_code_byte(site, byte, true) };
        Ok(())
    }

    /// Replaces a site that lies in one aligned 8-byte word with one atomic store.
    pub(crate) fn store_word(&self, site: usize, bytes: &[u8; SITE_LEN]) {
        debug_assert!(!self.via_proc_mem && site % 8 + SITE_LEN <= 8);
        // SAFETY: the window made the page writable; the site lies in one aligned word (the
        // caller partitioned on it); we hold the write lock, so no other store races.
        unsafe { memory::store_in_word(site, bytes) };
    }

    /// Restores the original protections; returns the number of `mprotect` calls that did.
    pub(crate) fn close(mut self) -> Result<usize> {
        self.restore()
    }

    /// Puts back every run's protection, retrying failures; the first lasting failure is
    /// returned after every run was tried.
    fn restore(&mut self) -> Result<usize> {
        let mut first_error = None;
        let mut restored = 0;
        // A run leaves `runs` only once it was tried: if a panic unwinds from here, dropping the
        // window restores the rest.
        while let Some((range, protection)) = self.runs.last().cloned() {
            let mut attempt = 0;
            loop {
                attempt += 1;
                // SAFETY: puts back the protection this window found (read from the maps when
                // the page was first written), which every thread ran under before.
                match unsafe { memory::mprotect(range.clone(), protection) } {
                    Ok(()) => break,
                    Err(_) if attempt < RESTORE_ATTEMPTS => continue,
                    Err(e) => {
                        first_error.get_or_insert(ErrorKind::Incomplete {
                            reason: format!(
                                "could not restore the protection of {:#x}..{:#x} after a \
                                 write ({e}): left writable",
                                range.start, range.end
                            ),
                        });
                        break;
                    }
                }
            }
            self.runs.pop();
            restored += 1;
        }
        crate::hidden::scrub_plain(std::mem::take(&mut self.runs));
        match first_error {
            Some(kind) => Err(kind.into()),
            None => Ok(restored),
        }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // An error or a panic left the window open: put the protections back. A failure here
        // has nowhere to go; `restore` already retried it.
        let _ = self.restore();
    }
}

impl Writer {
    /// Makes the pages of `addresses` (each the start of `SITE_LEN` bytes) writable.
    pub(crate) fn open_window(&mut self, addresses: impl Iterator<Item = usize>) -> Result<Window> {
        // Page lists hold plain addresses: scrubbed below (see `crate::scrub`).
        let mut pages: Vec<usize> = addresses
            .flat_map(|a| [memory::page_of(a), memory::page_of(a + SITE_LEN - 1)])
            .collect();
        pages.sort_unstable();
        pages.dedup();
        let missing: Vec<usize> = pages
            .iter()
            .copied()
            .filter(|p| !self.protections.contains_key(&Hidden::new(*p)))
            .collect();
        if !missing.is_empty() {
            let maps = memory::mappings()?;
            for &page in &missing {
                let m = memory::mapping_containing(&maps, page)
                    .filter(|m| m.protection.exec)
                    .ok_or(ErrorKind::NotExecutable { address: page })?;
                self.protections.insert(
                    Hidden::new(page),
                    (
                        m.protection,
                        Hidden::new(m.range.start),
                        Hidden::new(m.range.end),
                    ),
                );
            }
        }
        // One mprotect per mapping, from its first to its last page of the batch: the pages in
        // between are made writable too (they keep exec, and nothing writes them), which is far
        // cheaper than one call per scattered page.
        let page_size = memory::page_size();
        let mut runs: Vec<(Range<usize>, Protection)> = Vec::new();
        let mut run_mapping: Option<(Hidden, Hidden)> = None;
        crate::hidden::scrub_plain(missing);
        for &page in &pages {
            let (protection, start, end) = self.protections[&Hidden::new(page)];
            let mapping = (start, end);
            match runs.last_mut() {
                Some((range, p)) if *p == protection && run_mapping.as_ref() == Some(&mapping) => {
                    range.end = page + page_size
                }
                _ => {
                    runs.push((page..page + page_size, protection));
                    run_mapping = Some(mapping);
                }
            }
        }
        crate::hidden::scrub_plain(pages);
        let mut window = Window {
            runs: Vec::with_capacity(runs.len()),
            via_proc_mem: self.via_proc_mem,
        };
        if window.via_proc_mem {
            crate::hidden::scrub_plain(runs);
            return Ok(window);
        }
        for (range, protection) in runs.iter().cloned() {
            let writable = Protection {
                write: true,
                ..protection
            };
            // SAFETY: adds write to executable pages, keeping read and exec (module docs); the
            // window puts the protection back when it is dropped.
            if let Err(e) = unsafe { memory::mprotect(range.clone(), writable) } {
                // Dropping the window restores the runs opened so far.
                drop(window);
                crate::hidden::scrub_plain(runs);
                if matches!(e.kind(), ErrorKind::Os { errno, .. } if *errno == libc::EACCES) {
                    // W^X policy: fall back to /proc/self/mem for good (see module docs).
                    self.via_proc_mem = true;
                    return Ok(Window {
                        runs: Vec::new(),
                        via_proc_mem: true,
                    });
                }
                if matches!(e.kind(), ErrorKind::Os { errno, .. } if *errno == libc::ENOMEM) {
                    // Unmapped since we cached it: forget, so the next attempt re-reads maps.
                    self.protections.retain(|p, _| !range.contains(&p.get()));
                }
                return Err(e);
            }
            window.runs.push((range, protection));
        }
        crate::hidden::scrub_plain(runs);
        Ok(window)
    }

    /// Writes fresh code (not yet reachable by any thread) and syncs cores, so that a later
    /// site write publishing it is seen after the code.
    pub(crate) fn write_fresh_code(&mut self, address: usize, code: &[u8]) -> Result<()> {
        self.write_fresh_code_many(&[(address, code)])
    }

    /// Writes several pieces of fresh code in one window, then syncs cores once.
    pub(crate) fn write_fresh_code_many<C: AsRef<[u8]>>(
        &mut self,
        pieces: &[(usize, C)],
    ) -> Result<()> {
        membarrier::ensure_registered()?;
        let spans = pieces.iter().flat_map(|(address, code)| {
            let (address, len) = (*address, code.as_ref().len());
            (address..address + len)
                .step_by(memory::page_size())
                .chain([address + len.saturating_sub(SITE_LEN)])
        });
        let window = self.open_window(spans)?;
        for (address, code) in pieces {
            window.write(*address, code.as_ref())?;
        }
        window.close()?;
        membarrier::sync_cores()
    }

    /// Makes `address..address + len` (`len >= SITE_LEN`) writable, keeping it executable.
    pub(crate) fn open_code_window(&mut self, address: usize, len: usize) -> Result<CodeWindow> {
        self.open_code_window_over(&[(address, len)])
    }

    /// Makes every range `(address, len)` of `ranges` (`len >= SITE_LEN`, non-empty) writable,
    /// keeping them executable: one `mprotect` per run of pages of one mapping, as a batch.
    pub(crate) fn open_code_window_over(
        &mut self,
        ranges: &[(usize, usize)],
    ) -> Result<CodeWindow> {
        membarrier::ensure_registered()?;
        let page = memory::page_size();
        let window = self.open_window(ranges.iter().flat_map(|&(address, len)| {
            let len = len.max(SITE_LEN);
            (address..address + len)
                .step_by(page)
                .chain([address + len - SITE_LEN])
        }))?;
        if window.via_proc_mem {
            // Open the file now: the write must not allocate while the world is stopped.
            let address = ranges.first().expect("a range").0;
            window.write(address, &super::read_site(address))?;
        }
        Ok(CodeWindow(window))
    }

    /// The bytes the engine recorded at the registered site `address` (what it last wrote, or
    /// found when registering); `None` if it is not a site.
    pub(crate) fn recorded_bytes(&self, address: usize) -> Option<[u8; SITE_LEN]> {
        self.sites.get(&Hidden::new(address)).map(|s| s.bytes)
    }

    /// Whether writes go through `/proc/self/mem` (see the module docs).
    pub(crate) fn via_proc_mem(&self) -> bool {
        self.via_proc_mem
    }
}

/// A write window over arbitrary code bytes, for multi-instruction overwrites made while the
/// world is stopped ([`crate::detour`]). Opened and closed under the write lock; writing through
/// it allocates nothing (unless the engine writes via `/proc/self/mem`, whose file is opened
/// when the window opens). Dropped without [`CodeWindow::close`], it restores the protection
/// all the same.
pub(crate) struct CodeWindow(pub(super) Window);

impl CodeWindow {
    /// Writes `bytes` at `address` (inside the window) with plain stores.
    pub(crate) fn write(&self, address: usize, bytes: &[u8]) -> Result<()> {
        self.0.write(address, bytes)
    }

    /// Restores the pages' protection.
    pub(crate) fn close(self) -> Result<()> {
        self.0.close().map(|_| ())
    }
}
