//! Generated, typed patch sites: an entry point whose target is a function pointer of one type.
//!
//! A [`FnSite<F>`] is a few bytes of near memory holding a `jmp rel32` (the patch site) to a
//! function of type `F`. Calling [`FnSite::entry`] runs the current target with the caller's
//! registers and stack untouched, so any signature and ABI works. Because every target has the
//! type `F`, retargeting is safe: callers of the entry always reach a function of the type they
//! called. This is the building block for redirecting calls at run time without preparing the
//! code at compile time, and what the demo and benchmarks patch.
//!
//! # Safety
//!
//! [`FnPtr`] converts addresses back into function pointers; its implementations are limited to
//! plain function pointer types, and a [`FnSite`] only ever holds targets of its own type.
#![allow(unsafe_code)]

use crate::error::Result;
use crate::near::NearBlock;
use crate::site::{PatchSite, SiteInsn, SiteView};
use crate::write::{Batch, BatchReport};
use std::marker::PhantomData;

/// A function pointer type.
///
/// # Safety
///
/// Implementors must be plain function pointers (`fn` or `extern "C" fn` types, or
/// `#[repr(transparent)]` newtypes of one, see [`crate::fn_ptr_type!`]) whose bits are the
/// address [`FnPtr::address`] returns, so that such an address is callable as the type.
pub unsafe trait FnPtr: Copy + Send + Sync + 'static {
    /// The function's address.
    fn address(self) -> usize;
    /// The function pointer at `address`.
    ///
    /// # Safety
    ///
    /// `address` must be the entry of code callable with this type's signature.
    unsafe fn from_address(address: usize) -> Self;
}

macro_rules! impl_fn_ptr {
    ($($arg:ident),*) => {
        // SAFETY: these are plain function pointer types.
        unsafe impl<R: 'static, $($arg: 'static),*> FnPtr for fn($($arg),*) -> R {
            fn address(self) -> usize { self as usize }
            unsafe fn from_address(address: usize) -> Self {
                // SAFETY: the caller promises `address` is callable with this signature.
                unsafe { std::mem::transmute::<usize, Self>(address) }
            }
        }
        // SAFETY: these are plain function pointer types.
        unsafe impl<R: 'static, $($arg: 'static),*> FnPtr for extern "C" fn($($arg),*) -> R {
            fn address(self) -> usize { self as usize }
            unsafe fn from_address(address: usize) -> Self {
                // SAFETY: the caller promises `address` is callable with this signature.
                unsafe { std::mem::transmute::<usize, Self>(address) }
            }
        }
    };
}

impl_fn_ptr!();
impl_fn_ptr!(A);
impl_fn_ptr!(A, B);
impl_fn_ptr!(A, B, C);
impl_fn_ptr!(A, B, C, D);
impl_fn_ptr!(A, B, C, D, E);
impl_fn_ptr!(A, B, C, D, E, G);

/// Where a generated site lies relative to 8-byte words, which decides its write path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Inside one aligned 8-byte word: retargeted by one atomic store.
    Aligned,
    /// Across an 8-byte boundary: retargeted by the int3 protocol.
    CrossWord,
}

/// A generated jump site whose targets are functions of type `F`.
///
/// # Example
///
/// ```
/// use evolve_code::FnSite;
///
/// fn double(x: u64) -> u64 { x * 2 }
/// fn square(x: u64) -> u64 { x * x }
///
/// let site = FnSite::new(double as fn(u64) -> u64).unwrap();
/// assert_eq!((site.entry())(5), 10);
/// site.retarget(double, square).unwrap();
/// assert_eq!((site.entry())(5), 25);
/// ```
pub struct FnSite<F: FnPtr> {
    site: PatchSite,
    /// The generated code, if the engine made it (None for a stub compiled into the program).
    _block: Option<NearBlock>,
    _type: PhantomData<F>,
}

impl<F: FnPtr> FnSite<F> {
    /// A new site, aligned, jumping to `initial`.
    pub fn new(initial: F) -> Result<FnSite<F>> {
        FnSite::with_placement(initial, Placement::Aligned)
    }

    /// A new site with the given placement, jumping to `initial`.
    pub fn with_placement(initial: F, placement: Placement) -> Result<FnSite<F>> {
        let target = initial.address();
        let block = NearBlock::alloc(target, 16)?;
        // Blocks are 16-aligned: offset 0 is aligned, offset 5 spans bytes 5..10.
        let offset = match placement {
            Placement::Aligned => 0,
            Placement::CrossWord => 5,
        };
        let address = block.address() + offset;
        let mut code = [crate::arch::INT3; 16];
        let jmp = crate::arch::encode(SiteInsn::Jmp(target), address)
            .expect("near block within rel32 reach of its target");
        code[offset..offset + 5].copy_from_slice(&jmp);
        // SAFETY: the block is fresh; nothing executes it until `entry` is handed out.
        unsafe { block.write(0, &code)? };
        // SAFETY: the site is ours (generated above) and every target it will ever hold has
        // type `F` (enforced by `retarget`'s signature), which is what callers of `entry` call.
        let site = unsafe { PatchSite::register(address)? };
        Ok(FnSite {
            site,
            _block: Some(block),
            _type: PhantomData,
        })
    }

    /// The typed handle of a jump stub compiled into the program (e.g. by a macro with
    /// `global_asm!`): a `jmp rel32` at `address`, which callers call as `F`.
    ///
    /// Fails if `address` is not executable or does not hold a `jmp rel32`.
    ///
    /// # Safety
    ///
    /// Callers call `address` as a function of type `F`, the jump's current target has type
    /// `F`, and the code stays mapped while the handle exists.
    pub unsafe fn at(address: usize) -> Result<FnSite<F>> {
        // SAFETY: forwarded from the caller: the stub is called as F and jumps to an F; every
        // later target has type F by `retarget`'s signature.
        let site = unsafe { PatchSite::register(address)? };
        if !matches!(site.current(), SiteInsn::Jmp(_)) {
            return Err(crate::error::Error::new(
                crate::error::ErrorKind::InvalidArgument {
                    reason: format!("{address:#x} is a patch site but not a jump stub"),
                },
            ));
        }
        Ok(FnSite {
            site,
            _block: None,
            _type: PhantomData,
        })
    }

    /// The entry point: calling it calls the current target.
    pub fn entry(&self) -> F {
        // SAFETY: the site jumps to a function of type F, so its address is callable as F.
        unsafe { F::from_address(self.site.address()) }
    }

    /// The function the site jumps to now.
    pub fn target(&self) -> F {
        let target = self.site.current().target().expect("FnSites hold jumps");
        // SAFETY: every target of this site has type F (see `retarget`).
        unsafe { F::from_address(target) }
    }

    /// Changes the target from `expected` to `new`; fails, changing nothing, if the site does not
    /// jump to `expected`.
    pub fn retarget(&self, expected: F, new: F) -> Result<BatchReport> {
        let mut batch = Batch::new();
        self.retarget_in(&mut batch, expected, new);
        batch.apply()
    }

    /// Adds "jump to `new` instead of `expected`" to `batch`: several typed sites change in one
    /// batch, with shared core syncs.
    ///
    /// # Example
    ///
    /// ```
    /// use evolve_code::{Batch, FnSite};
    ///
    /// fn double(x: u64) -> u64 { x * 2 }
    /// fn square(x: u64) -> u64 { x * x }
    /// type F = fn(u64) -> u64;
    ///
    /// let sites = [FnSite::new(double as F).unwrap(), FnSite::new(double as F).unwrap()];
    /// let mut batch = Batch::new();
    /// for site in &sites {
    ///     site.retarget_in(&mut batch, double, square);
    /// }
    /// assert_eq!(batch.apply().unwrap().changed, 2);
    /// assert_eq!((sites[1].entry())(5), 25);
    /// ```
    pub fn retarget_in(&self, batch: &mut Batch, expected: F, new: F) {
        // SAFETY: `new` has type F, which is what callers of the entry call (module docs).
        unsafe {
            batch.retarget(
                self.site,
                SiteInsn::Jmp(expected.address()),
                SiteInsn::Jmp(new.address()),
            )
        };
    }

    /// Adds "jump to the initial target again" to `batch`.
    pub fn restore_in(&self, batch: &mut Batch) {
        batch.restore(self.site);
    }

    /// A read-only view of the underlying patch site: retargeting goes through the typed
    /// methods, which check that every target has type `F`.
    pub fn site(&self) -> SiteView {
        self.site.view()
    }
}

impl<F: FnPtr> Drop for FnSite<F> {
    fn drop(&mut self) {
        // A generated site's registration ends; its block is not freed (dropping a `NearBlock`
        // keeps its memory reserved): a thread may still be about to execute the entry it was
        // handed. A compiled-in stub stays registered, keeping its original bytes on record.
        if self._block.is_some() {
            let _ = self.site.unregister();
        }
    }
}
