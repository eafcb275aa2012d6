//! Springboards: absolute jumps placed near a site, for targets beyond `rel32` range.
//!
//! KernInst's word. A site at A that must reach a target T more than ±2 GiB away branches to a
//! springboard S near A, which jumps to T through an absolute address (`jmp *0(%rip)`). A `call`
//! through a springboard works unchanged: the springboard jumps, so T returns to the caller.
//!
//! Springboards are interned by target: every site within reach of an existing springboard for T
//! shares it. They are never freed, because a thread may have executed a site's branch and not
//! yet the springboard's; their number is bounded by the number of distinct far targets (times
//! the number of 4 GiB neighbourhoods that use them), 16 bytes each.
//!
//! The springboards a batch needs are allocated while it is planned and written together, in
//! one write window with one core sync, before any of its sites; a batch refused before they
//! are written (validation, or a failure writing them) frees them. A batch that fails after
//! they were published keeps them, interned for the next batch: its sites were undone, but a
//! thread that ran a site's new branch may still be on its way through the springboard.
//!
//! # Safety
//!
//! Freeing a springboard that was allocated for a refused batch is sound: it was never written
//! and no site ever branched to it.
#![allow(unsafe_code)]

use crate::arch::{self, SPRINGBOARD_LEN};
use crate::error::{Error, ErrorKind, Result};
use crate::hidden::Hidden;
use crate::near::NearBlock;
use crate::site::SiteInsn;
use crate::write::Writer;
use rustc_hash::FxHashMap as HashMap;

/// The springboards made so far.
#[derive(Debug, Default)]
pub(crate) struct Springboards {
    /// Targets are hidden (see [`crate::hidden`]): they may lie in patches that reclamation
    /// must be able to prove unreferenced.
    by_target: HashMap<Hidden, Vec<usize>>,
    target_of: HashMap<usize, Hidden>,
    /// Allocated for the batch being planned, not yet written: written together, with one core
    /// sync, before the batch's sites (see [`Writer::publish_springboards`]).
    pending: Vec<(NearBlock, Hidden)>,
}

impl Springboards {
    /// The instruction as the caller sees it: a branch to a springboard reads as a branch to the
    /// springboard's target.
    pub(crate) fn resolve(&self, insn: SiteInsn) -> SiteInsn {
        match insn {
            SiteInsn::Jmp(t) => SiteInsn::Jmp(self.target_of.get(&t).map_or(t, |h| h.get())),
            SiteInsn::Call(t) => SiteInsn::Call(self.target_of.get(&t).map_or(t, |h| h.get())),
            SiteInsn::Nop => SiteInsn::Nop,
        }
    }

    /// Number of springboards made.
    pub(crate) fn len(&self) -> usize {
        self.target_of.len()
    }
}

impl Writer {
    /// A springboard to `target` that `site` can reach: an existing one, or a new one that is
    /// written by [`Writer::publish_springboards`] before any site of the batch.
    pub(crate) fn springboard_near(&mut self, site: usize, target: usize) -> Result<usize> {
        let reachable = |board: &usize| arch::rel32(site, *board).is_some();
        let boards = &self.springboards;
        if let Some(board) = boards
            .by_target
            .get(&Hidden::new(target))
            .and_then(|b| b.iter().copied().find(reachable))
            .or_else(|| {
                boards
                    .pending
                    .iter()
                    .map(|(block, t)| (block.address(), t.get()))
                    .find(|(board, t)| *t == target && reachable(board))
                    .map(|(board, _)| board)
            })
        {
            return Ok(board);
        }
        let block = NearBlock::alloc(site, SPRINGBOARD_LEN)
            .map_err(|_| Error::new(ErrorKind::Unreachable { site, target }))?;
        let board = block.address();
        self.springboards.pending.push((block, Hidden::new(target)));
        Ok(board)
    }

    /// Writes every pending springboard in one write window and makes every core see them,
    /// before any site of the batch can branch to them.
    pub(crate) fn publish_springboards(&mut self) -> Result<()> {
        if self.springboards.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.springboards.pending);
        let code: Vec<(usize, [u8; SPRINGBOARD_LEN])> = pending
            .iter()
            .map(|(block, target)| (block.address(), arch::springboard(target.get())))
            .collect();
        // The blocks are fresh: no thread can execute them before a site is written to reach
        // them, which happens after this returns.
        let written = self.write_fresh_code_many(&code);
        crate::hidden::scrub_plain(code);
        if let Err(e) = written {
            // Still unreachable: the refused batch frees them (`abandon_springboards`).
            self.springboards.pending = pending;
            return Err(e);
        }
        for (block, target) in pending {
            // Never freed (see module docs): only the address is kept.
            let board = block.address();
            self.springboards
                .by_target
                .entry(target)
                .or_default()
                .push(board);
            self.springboards.target_of.insert(board, target);
        }
        Ok(())
    }

    /// Returns the pending springboards of a refused batch to the allocator.
    pub(crate) fn abandon_springboards(&mut self) {
        for (block, _) in self.springboards.pending.drain(..) {
            // SAFETY: a pending springboard was never written and no site branches to it: the
            // batch that would have used it was refused before writing anything.
            unsafe { block.free() };
        }
    }
}

/// Number of springboards the engine has made (for diagnostics and tests).
pub fn springboard_count() -> usize {
    crate::write::lock().springboards.len()
}
