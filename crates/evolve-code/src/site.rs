//! Patch sites: the 5-byte instructions the engine may change while threads execute them.
//!
//! # Safety
//!
//! Registration is the point where a caller vouches that a site's instruction is theirs to
//! change and that every target they give is sound ([`PatchSite::register`]); after that the
//! engine's operations are safe.
#![allow(unsafe_code)]

use crate::error::{Error, ErrorKind, Result};
use crate::hidden::Hidden;
use crate::write::{self, Batch, BatchReport};
use std::fmt;

/// The instruction a patch site holds, with absolute targets.
///
/// A site that reaches a far target through a springboard still reads as `Jmp(far)` or
/// `Call(far)`: the springboard is the engine's business, not the caller's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SiteInsn {
    /// `jmp rel32` to the target.
    Jmp(usize),
    /// `call rel32` to the target.
    Call(usize),
    /// A 5-byte NOP.
    Nop,
}

impl SiteInsn {
    /// The branch target, if the instruction is a branch.
    pub fn target(self) -> Option<usize> {
        match self {
            SiteInsn::Jmp(t) | SiteInsn::Call(t) => Some(t),
            SiteInsn::Nop => None,
        }
    }
}

impl fmt::Display for SiteInsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SiteInsn::Jmp(t) => write!(f, "jmp {t:#x}"),
            SiteInsn::Call(t) => write!(f, "call {t:#x}"),
            SiteInsn::Nop => write!(f, "nop5"),
        }
    }
}

/// A registered patch site: a handle on a 5-byte instruction the engine may retarget.
///
/// Registration records the site's original bytes; [`PatchSite::restore`] puts them back
/// exactly. Handles are cheap copies of the address; the engine keeps the state.
///
/// # Example
///
/// ```
/// use evolve_code::{FnSite, PatchSite, SiteInsn};
///
/// extern "C" fn one() -> u64 { 1 }
/// extern "C" fn two() -> u64 { 2 }
///
/// // A generated jump site: calling `entry()` runs whatever the site points at.
/// let site = FnSite::new(one as extern "C" fn() -> u64).unwrap();
/// // A typed site hands out a read-only view; the engine's own handle is looked up by address.
/// let patch_site = PatchSite::lookup(site.site().address()).unwrap();
/// assert_eq!(patch_site.current(), SiteInsn::Jmp(one as usize));
/// site.retarget(one, two).unwrap();
/// assert_eq!((site.entry())(), 2);
/// // Any instruction: `unsafe`, the caller vouches for the target (typed sites do it for you).
/// // SAFETY: `one` has the type callers of the site expect.
/// unsafe { patch_site.retarget(SiteInsn::Jmp(two as usize), SiteInsn::Jmp(one as usize)) }
///     .unwrap();
/// assert_eq!((site.entry())(), 1);
/// patch_site.restore().unwrap();
/// assert_eq!((site.entry())(), 1);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PatchSite {
    /// Hidden: handles are kept in bookkeeping (and copied through temporaries) that a
    /// reclamation scan must not take for references to the code holding the site.
    address: Hidden,
}

impl PatchSite {
    /// Registers the instruction at `address` as a patch site (idempotent) and returns its handle.
    ///
    /// Fails with [`ErrorKind::NotExecutable`] if the address is not in executable memory, and
    /// with [`ErrorKind::NotASiteInstruction`] if the bytes there are not a `jmp rel32`,
    /// `call rel32` or 5-byte NOP.
    ///
    /// # Safety
    ///
    /// The caller owns the instruction at `address`: replacing it with any instruction later
    /// given for this site (through a [`Batch`], [`PatchSite::retarget`] or a restore) must be
    /// sound for every thread that executes it. In particular, every target must be code that
    /// the site's callers may reach with their registers and stack as they are, and the code
    /// holding the site must stay mapped until [`PatchSite::unregister`].
    pub unsafe fn register(address: usize) -> Result<PatchSite> {
        write::register(address)?;
        Ok(PatchSite {
            address: Hidden::new(address),
        })
    }

    /// The handle of an already registered site; [`ErrorKind::UnknownSite`] if it is not one.
    pub fn lookup(address: usize) -> Result<PatchSite> {
        if write::is_registered(address) {
            Ok(PatchSite {
                address: Hidden::new(address),
            })
        } else {
            Err(Error::new(ErrorKind::UnknownSite { address }))
        }
    }

    /// The site's address.
    pub fn address(self) -> usize {
        self.address.get()
    }

    /// The instruction the site holds now.
    pub fn current(self) -> SiteInsn {
        write::current(self.address.get()).expect("registered site")
    }

    /// The instruction the site held when it was registered.
    pub fn original(self) -> SiteInsn {
        write::original(self.address.get()).expect("registered site")
    }

    /// Changes the site from `expected` to `new` (a batch of one).
    ///
    /// Fails, changing nothing, if the site does not hold `expected` or `new` cannot be reached.
    ///
    /// # Safety
    ///
    /// `new` must be sound for every thread that executes the site, as
    /// [`PatchSite::register`] requires of every instruction given for it: its target is code
    /// that the site's callers may reach with their registers and stack as they are. Typed
    /// sites ([`crate::FnSite`], [`crate::stub::Stub`], [`crate::callsite::DirectCalls`]) check
    /// this for their callers.
    pub unsafe fn retarget(self, expected: SiteInsn, new: SiteInsn) -> Result<BatchReport> {
        let mut batch = Batch::new();
        // SAFETY: forwarded from the caller.
        unsafe { batch.retarget(self, expected, new) };
        batch.apply()
    }

    /// Puts the original bytes back, exactly.
    pub fn restore(self) -> Result<BatchReport> {
        let mut batch = Batch::new();
        batch.restore(self);
        batch.apply()
    }

    /// Forgets the site. It must hold its original bytes (restore it first), or its code must be
    /// about to be unmapped with no thread inside.
    pub fn unregister(self) -> Result<()> {
        write::unregister(self.address.get())
    }

    /// A read-only view of the site.
    pub fn view(self) -> SiteView {
        SiteView {
            address: self.address.get(),
        }
    }
}

/// A read-only view of a registered site: what it holds, never a way to change it.
///
/// Typed sites hand these out ([`crate::FnSite::site`]), so that code holding one can inspect
/// the site but change it only through the typed API, which checks every new target's type.
///
/// # Example
///
/// ```
/// use evolve_code::{FnSite, SiteInsn};
///
/// extern "C" fn one() -> u64 { 1 }
/// let site = FnSite::new(one as extern "C" fn() -> u64).unwrap();
/// let view = site.site();
/// assert_eq!(view.current(), SiteInsn::Jmp(one as usize));
/// assert_eq!(view.current(), view.original());
/// assert_eq!(view.bytes()[0], 0xe9);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteView {
    address: usize,
}

impl SiteView {
    /// The site's address.
    pub fn address(self) -> usize {
        self.address
    }

    /// The instruction the site holds now.
    pub fn current(self) -> SiteInsn {
        write::current(self.address).expect("registered site")
    }

    /// The instruction the site held when it was registered.
    pub fn original(self) -> SiteInsn {
        write::original(self.address).expect("registered site")
    }

    /// The bytes at the site now.
    pub fn bytes(self) -> [u8; crate::SITE_LEN] {
        write::read_registered(self.address)
    }
}
