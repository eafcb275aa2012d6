//! The bytes of one batch, written in the protocol's order and undone in its reverse order.
//!
//! # Invariant
//!
//! *Whatever happens part-way — a system call fails, something panics — every site ends up
//! holding a whole instruction: the new one if the batch completed, the old one otherwise, with
//! every core synced to it and its trap slot disarmed.* [`Transaction::run`] writes; dropping a
//! transaction that did not complete undoes what it wrote.
//!
//! # Writing (see [`crate::write`] for why each step is safe for running threads)
//!
//! 1. Begin a write epoch and arm every int3 site's slot with its new instruction.
//! 2. `int3` on every int3 site's first byte (`Release`); sync cores.
//! 3. Every int3 site's tail; sync cores.
//! 4. Every int3 site's new first byte (`Release`).
//! 5. Every aligned site's word, with one atomic store each.
//! 6. Sync cores; disarm every slot; end the epoch.
//!
//! # Undoing
//!
//! The same protocol with the old bytes, from wherever writing stopped, inside the same epoch:
//! aligned words get their old value back (one atomic store each); every int3 site that was
//! touched is re-armed with its *old* instruction, gets `int3` back on its first byte if it
//! already held the new one, then (after a sync) its old tail, then (after a sync) its old first
//! byte; a last sync, then every slot is disarmed and the epoch ends. A site whose write failed
//! half-way is treated as touched (rewriting bytes that did not change is harmless). A thread
//! that meets a site while it is undone runs the old or the new instruction, both whole.
//!
//! Each undo step is retried if its system call fails. If one keeps failing, undoing stops
//! there and the touched sites stay armed with their old instruction — every thread that meets
//! one runs the old instruction through the handler — and the error says so.

use super::window::Window;
use crate::arch::{INT3, SITE_LEN};
use crate::error::{Error, ErrorKind, Result};
use crate::sys::membarrier;
use crate::sys::trap::TrapSites;

/// How often an undo step whose system call fails is tried.
const UNDO_ATTEMPTS: usize = 3;

/// The bytes one site changes from and to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SiteWrite {
    pub(crate) site: usize,
    pub(crate) old: [u8; SITE_LEN],
    pub(crate) new: [u8; SITE_LEN],
    /// What a thread that traps at the site while it is written runs (int3 sites): usually
    /// `new`; for a detour's entry jump, a jump to the relocated copy of `new`.
    pub(crate) emulate: [u8; SITE_LEN],
}

/// A batch's writes in progress (see the module docs).
pub(crate) struct Transaction<'a> {
    window: &'a Window,
    traps: &'a mut TrapSites,
    trapped: &'a [SiteWrite],
    stored: &'a [SiteWrite],
    /// Whether the epoch began (and the slots were armed).
    in_epoch: bool,
    /// Int3 sites whose first byte may hold `int3` (a prefix of `trapped`).
    int3_touched: usize,
    /// Int3 sites whose tail may have changed.
    tails_touched: usize,
    /// Int3 sites whose first byte may hold the new byte.
    firsts_touched: usize,
    /// Aligned sites whose word was stored.
    words_stored: usize,
    /// Core syncs issued.
    pub(crate) core_syncs: usize,
    done: bool,
}

impl<'a> Transaction<'a> {
    /// A transaction writing `trapped` through the int3 protocol and `stored` with atomic
    /// stores, in `window`. Every int3 site's key is already in `traps`.
    pub(crate) fn new(
        window: &'a Window,
        traps: &'a mut TrapSites,
        trapped: &'a [SiteWrite],
        stored: &'a [SiteWrite],
    ) -> Transaction<'a> {
        Transaction {
            window,
            traps,
            trapped,
            stored,
            in_epoch: false,
            int3_touched: 0,
            tails_touched: 0,
            firsts_touched: 0,
            words_stored: 0,
            core_syncs: 0,
            done: false,
        }
    }

    fn sync(&mut self) -> Result<()> {
        self.core_syncs += 1;
        membarrier::sync_cores()
    }

    /// Writes everything (steps 1-6 of the module docs). On error the transaction is left
    /// incomplete, and dropping it undoes it.
    pub(crate) fn run(mut self) -> Result<usize> {
        let (window, trapped) = (self.window, self.trapped);
        if !trapped.is_empty() {
            self.traps.begin();
            self.in_epoch = true;
            for w in trapped {
                self.traps.arm(w.site, w.emulate);
            }
            for w in trapped {
                self.int3_touched += 1;
                window.store_first_byte(w.site, INT3)?;
            }
            self.sync()?;
            for w in trapped {
                self.tails_touched += 1;
                window.write(w.site + 1, &w.new[1..])?;
            }
            self.sync()?;
            for w in trapped {
                self.firsts_touched += 1;
                window.store_first_byte(w.site, w.new[0])?;
            }
        }
        for w in self.stored {
            self.words_stored += 1;
            window.store_word(w.site, &w.new);
        }
        self.sync()?;
        if self.in_epoch {
            for w in trapped {
                self.traps.disarm(w.site);
            }
            self.traps.end();
            self.in_epoch = false;
        }
        self.done = true;
        Ok(self.core_syncs)
    }

    /// Undoes an incomplete transaction (see the module docs); the first lasting failure.
    fn undo(&mut self) -> Result<()> {
        let window = self.window;
        for w in &self.stored[..self.words_stored] {
            window.store_word(w.site, &w.old);
        }
        let touched = &self.trapped[..self.int3_touched];
        if self.in_epoch {
            for w in touched {
                self.traps.arm(w.site, w.old);
            }
            for w in &self.trapped[..self.firsts_touched] {
                retry(|| window.store_first_byte(w.site, INT3))?;
            }
            retry(membarrier::sync_cores)?;
            if self.tails_touched > 0 {
                for w in &self.trapped[..self.tails_touched] {
                    retry(|| window.write(w.site + 1, &w.old[1..]))?;
                }
                retry(membarrier::sync_cores)?;
            }
            for w in touched {
                retry(|| window.store_first_byte(w.site, w.old[0]))?;
            }
        }
        retry(membarrier::sync_cores)?;
        if self.in_epoch {
            for w in touched {
                self.traps.disarm(w.site);
            }
            for w in &self.trapped[self.int3_touched..] {
                // Armed but never written: nothing to undo.
                self.traps.disarm(w.site);
            }
            self.traps.end();
            self.in_epoch = false;
        }
        Ok(())
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Err(e) = self.undo() {
            // The touched sites stay armed with their old instruction (module docs); end the
            // epoch so that foreign traps elsewhere are passed on.
            if self.in_epoch {
                self.traps.end();
            }
            UNDO_FAILED.with(|f| f.set(Some(e.kind().clone())));
        }
    }
}

thread_local! {
    /// Set by a transaction whose undo failed, for [`take_undo_failure`].
    static UNDO_FAILED: std::cell::Cell<Option<ErrorKind>> = const { std::cell::Cell::new(None) };
}

/// The error of the last undo that failed on this thread, if any (reported with the batch's
/// own error).
pub(crate) fn take_undo_failure() -> Option<ErrorKind> {
    UNDO_FAILED.with(|f| f.take())
}

fn retry(mut step: impl FnMut() -> Result<()>) -> Result<()> {
    let mut last: Option<Error> = None;
    for _ in 0..UNDO_ATTEMPTS {
        match step() {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("attempted"))
}
