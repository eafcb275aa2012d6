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

use crate::arch::{self, SPRINGBOARD_LEN};
use crate::error::{Error, ErrorKind, Result};
use crate::near::NearBlock;
use crate::site::SiteInsn;
use crate::write::Writer;
use std::collections::HashMap;

/// The springboards made so far.
#[derive(Debug, Default)]
pub(crate) struct Springboards {
    by_target: HashMap<usize, Vec<usize>>,
    target_of: HashMap<usize, usize>,
}

impl Springboards {
    /// The instruction as the caller sees it: a branch to a springboard reads as a branch to the
    /// springboard's target.
    pub(crate) fn resolve(&self, insn: SiteInsn) -> SiteInsn {
        match insn {
            SiteInsn::Jmp(t) => SiteInsn::Jmp(*self.target_of.get(&t).unwrap_or(&t)),
            SiteInsn::Call(t) => SiteInsn::Call(*self.target_of.get(&t).unwrap_or(&t)),
            SiteInsn::Nop => SiteInsn::Nop,
        }
    }

    /// Number of springboards made.
    pub(crate) fn len(&self) -> usize {
        self.target_of.len()
    }
}

impl Writer {
    /// A springboard to `target` that `site` can reach, made if there is none yet.
    pub(crate) fn springboard_near(&mut self, site: usize, target: usize) -> Result<usize> {
        let reachable = |board: &usize| arch::rel32(site, *board).is_some();
        if let Some(board) = self
            .springboards
            .by_target
            .get(&target)
            .and_then(|boards| boards.iter().copied().find(reachable))
        {
            return Ok(board);
        }
        let block = NearBlock::alloc(site, SPRINGBOARD_LEN)
            .map_err(|_| Error::new(ErrorKind::Unreachable { site, target }))?;
        // The block is never freed (see module docs): only its address is kept.
        let board = block.address();
        // The block is fresh: no thread can execute it before a site is written to reach it.
        self.write_fresh_code(board, &arch::springboard(target))?;
        self.springboards
            .by_target
            .entry(target)
            .or_default()
            .push(board);
        self.springboards.target_of.insert(board, target);
        Ok(board)
    }
}

/// Number of springboards the engine has made (for diagnostics and tests).
pub fn springboard_count() -> usize {
    crate::write::lock().springboards.len()
}
