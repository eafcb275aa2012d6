//! Typed call sites: every direct call of a function, retargetable only to functions of its type.
//!
//! A capability that redirects a function (multiverse, hot update) changes two kinds of patch
//! site: the function's **entry stub** (a `jmp rel32` compiled into the program, which catches
//! calls through pointers) and the **direct call sites** of the stub found in the executable
//! (`call rel32` / `jmp rel32`), which are rewritten to call the new target without the extra
//! jump. This module gives both a typed, safe face:
//!
//! - [`jump_stub`] turns a stub, given as a function pointer of type `F`, into a [`FnSite<F>`],
//!   after checking that it is a `jmp rel32` to the `F` it is said to jump to;
//! - [`DirectCalls<F>`] registers every direct branch to a function `f: F` and retargets them,
//!   in a caller's [`Batch`], only to other functions of type `F`; a call site may become a
//!   5-byte NOP only when the new target's code is a bare `ret` ([`is_bare_return`]);
//! - [`same_code`] tells whether two functions' machine code is identical (so that a caller can
//!   share one body between variants).
//!
//! # Why this is sound
//!
//! A direct call site of `f` passes arguments as `F`'s signature requires and expects `F`'s
//! result, so any other function of type `F` may take `f`'s place. The exception is a function
//! whose code is shared with a function of another type (LLVM merges identical functions into
//! aliases): then some of the branches to that address are calls of the other type. [`DirectCalls::find`]
//! refuses a target that any other symbol of the executable names. Replacing a `call` by a NOP is
//! equivalent to calling a bare `ret` (which changes no register the caller may rely on), so
//! it is only offered for such targets.
//!
//! # Safety
//!
//! The unsafe operations here are registering sites whose soundness is argued above, reading
//! the code bytes of functions (mapped and readable for the life of the executable) and
//! implementing [`FnPtr`] for `extern "C-unwind"` function pointers (plain function pointers).
#![allow(unsafe_code)]

use crate::error::{Error, ErrorKind, Result};
use crate::fnsite::{FnPtr, FnSite};
use crate::inspect::{self, BranchKind};
use crate::site::{PatchSite, SiteInsn};
use crate::write::Batch;
use iced_x86::{Decoder, DecoderOptions, Instruction};
use std::marker::PhantomData;

macro_rules! impl_fn_ptr_c_unwind {
    ($($arg:ident),*) => {
        // SAFETY: these are plain function pointer types.
        unsafe impl<R: 'static, $($arg: 'static),*> FnPtr for extern "C-unwind" fn($($arg),*) -> R {
            fn address(self) -> usize { self as usize }
            unsafe fn from_address(address: usize) -> Self {
                // SAFETY: the caller promises `address` is callable with this signature.
                unsafe { std::mem::transmute::<usize, Self>(address) }
            }
        }
    };
}

impl_fn_ptr_c_unwind!();
impl_fn_ptr_c_unwind!(A);
impl_fn_ptr_c_unwind!(A, B);
impl_fn_ptr_c_unwind!(A, B, C);
impl_fn_ptr_c_unwind!(A, B, C, D);
impl_fn_ptr_c_unwind!(A, B, C, D, E);
impl_fn_ptr_c_unwind!(A, B, C, D, E, G);

/// The typed site of an entry stub compiled into the program: `stub` is a `jmp rel32` to
/// `target` (for instance a naked function emitted by a macro).
///
/// Idempotent: a stub already registered returns its handle, whatever it jumps to now, as long as
/// it was registered as a jump to `target`.
///
/// # Errors
/// [`ErrorKind::InvalidArgument`] if `stub` did not originally hold `jmp target`; the errors of
/// [`PatchSite::register`] if it is not a site at all.
///
/// # Example
/// ```
/// use evolve_code::{callsite::jump_stub, FnSite};
///
/// fn one() -> u32 { 1 }
/// fn two() -> u32 { 2 }
/// type F = fn() -> u32;
/// // A generated site stands in for a stub compiled into the program.
/// let generated = FnSite::new(one as F).unwrap();
/// let stub = jump_stub(generated.entry(), one as F).unwrap();
/// stub.retarget(one, two).unwrap();
/// assert_eq!((generated.entry())(), 2);
/// # generated.retarget(two, one).unwrap();
/// ```
pub fn jump_stub<F: FnPtr>(stub: F, target: F) -> Result<FnSite<F>> {
    let address = stub.address();
    // SAFETY: `stub` is a value of type F, so its callers call it as F; the check below makes
    // sure it was a jump to `target`, an F; later targets are Fs by `FnSite::retarget`.
    let site = unsafe { FnSite::<F>::at(address)? };
    let original = site.site().original();
    if original != SiteInsn::Jmp(target.address()) {
        return Err(Error::new(ErrorKind::InvalidArgument {
            reason: format!(
                "stub {address:#x} held `{original}` when registered, not `jmp {:#x}`",
                target.address()
            ),
        }));
    }
    Ok(site)
}

/// Every direct branch (`call rel32`, `jmp rel32`) in the main executable to a function of
/// type `F`, registered as patch sites.
///
/// # Example
/// ```
/// use evolve_code::{callsite::DirectCalls, Batch};
///
/// #[inline(never)]
/// fn target(x: u64) -> u64 { std::hint::black_box(x) + 1 }
/// #[inline(never)]
/// fn other(x: u64) -> u64 { std::hint::black_box(x) + 2 }
/// type F = fn(u64) -> u64;
///
/// let calls = DirectCalls::find(target as F).unwrap();
/// let mut batch = Batch::new();
/// calls.retarget_in(&mut batch, other as F);
/// batch.apply().unwrap();
/// let mut batch = Batch::new();
/// calls.restore_in(&mut batch);
/// batch.apply().unwrap();
/// assert!(calls.sites().iter().all(|s| s.current() == s.original()));
/// ```
#[derive(Debug)]
pub struct DirectCalls<F: FnPtr> {
    target: usize,
    sites: Vec<(PatchSite, BranchKind)>,
    _type: PhantomData<F>,
}

impl<F: FnPtr> DirectCalls<F> {
    /// Finds and registers every direct branch to `f` in the main executable.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] if another symbol of the executable starts at `f`'s address
    /// (an alias: some branches there may be calls of another type); the errors of
    /// [`inspect::branch_sites_to`] and [`PatchSite::register`].
    pub fn find(f: F) -> Result<DirectCalls<F>> {
        let target = f.address();
        let exe = inspect::executable()?;
        let names: Vec<&str> = exe
            .symbols()
            .iter()
            .filter(|s| s.address == target && s.kind == inspect::SymbolKind::Function)
            .map(|s| s.demangled.as_str())
            .collect();
        if names.len() > 1 {
            return Err(Error::new(ErrorKind::InvalidArgument {
                reason: format!(
                    "{target:#x} is aliased (symbols {}): its call sites may belong to other functions",
                    names.join(", ")
                ),
            }));
        }
        let mut sites = Vec::new();
        for branch in inspect::branch_sites_to(target)? {
            // SAFETY: the site branches to `f`, an F with no alias (checked above), so its
            // callers call an F; every instruction this type later writes there is a branch to
            // another F, a NOP in place of a call to a bare `ret`, or the original bytes (see
            // the module docs). The executable stays mapped for the life of the process.
            let site = unsafe { PatchSite::register(branch.address)? };
            // While the stub is routed through a probe, this call keeps calling it.
            crate::write::follow(branch.address, target);
            sites.push((site, branch.kind));
        }
        Ok(DirectCalls {
            target,
            sites,
            _type: PhantomData,
        })
    }

    /// The function whose branches these are.
    pub fn target(&self) -> usize {
        self.target
    }

    /// The sites, in address order.
    pub fn sites(&self) -> Vec<PatchSite> {
        self.sites.iter().map(|(s, _)| *s).collect()
    }

    /// The number of sites.
    pub fn len(&self) -> usize {
        self.sites.len()
    }

    /// True if no direct branch was found.
    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// Adds to `batch`: every site branches to `new` (the same kind of branch as before).
    /// Branching back to the original target restores the original bytes.
    pub fn retarget_in(&self, batch: &mut Batch, new: F) {
        for &(site, kind) in &self.sites {
            if new.address() == self.target {
                batch.restore(site);
                continue;
            }
            let insn = match kind {
                BranchKind::Call => SiteInsn::Call(new.address()),
                BranchKind::Jmp => SiteInsn::Jmp(new.address()),
            };
            // SAFETY: the site is a direct branch to an F with no alias (`find`); `new` is an
            // F too, so its callers pass and expect what it takes and returns (module docs).
            unsafe { batch.retarget(site, site.current(), insn) };
        }
    }

    /// Adds to `batch`: every call site becomes a 5-byte NOP, every jump site jumps to `new`,
    /// whose code must be a bare `ret`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] if `new`'s code is not a bare `ret`; nothing is added.
    pub fn nop_in(&self, batch: &mut Batch, new: F) -> Result<()> {
        if !is_bare_return(new) {
            return Err(Error::new(ErrorKind::InvalidArgument {
                reason: format!(
                    "{:#x} is not a bare `ret`: its calls cannot become NOPs",
                    new.address()
                ),
            }));
        }
        for &(site, kind) in &self.sites {
            let insn = match kind {
                BranchKind::Call => SiteInsn::Nop,
                BranchKind::Jmp => SiteInsn::Jmp(new.address()),
            };
            // SAFETY: `new` is an F whose code is a bare `ret` (checked above): a NOP in place
            // of a call to it changes nothing its caller relies on; a jump to it is a tail call
            // of an F (module docs).
            unsafe { batch.retarget(site, site.current(), insn) };
        }
        Ok(())
    }

    /// Adds to `batch`: every site gets its original bytes back.
    pub fn restore_in(&self, batch: &mut Batch) {
        for &(site, _) in &self.sites {
            batch.restore(site);
        }
    }
}

/// Whether `f`'s code is a bare return (`ret`, or `rep ret`): calling it does nothing.
///
/// # Example
/// ```
/// #[inline(never)]
/// fn nothing() {}
/// assert!(evolve_code::callsite::is_bare_return(nothing as fn()));
/// ```
pub fn is_bare_return<F: FnPtr>(f: F) -> bool {
    let bytes = code_prefix(f.address());
    bytes[0] == 0xC3 || (bytes[0] == 0xF3 && bytes[1] == 0xC3)
}

/// The first two bytes of the code at `address`, an executable function's entry.
fn code_prefix(address: usize) -> [u8; 2] {
    // The function may be the last bytes of its page-aligned section: read the second byte
    // only if the first does not end it.
    // SAFETY: `address` is the entry of a function (a value of an `FnPtr` type), mapped and
    // readable (x86-64 code pages are readable); a function is at least one byte long.
    let first = unsafe { std::ptr::read_volatile(address as *const u8) };
    if first != 0xF3 {
        return [first, 0];
    }
    // SAFETY: `rep` is a prefix: the function's instruction continues at the next byte.
    let second = unsafe { std::ptr::read_volatile((address + 1) as *const u8) };
    [first, second]
}

/// Whether the functions at `a` and `b` have the same machine code: the same instructions, with
/// the same absolute branch targets and RIP-relative addresses. `false` if either is not the
/// start of a sized function symbol of the main executable.
///
/// # Example
/// ```
/// fn one() -> u32 { std::hint::black_box(1) }
/// assert!(evolve_code::callsite::same_code(one as fn() -> u32, one as fn() -> u32));
/// ```
pub fn same_code<F: FnPtr>(a: F, b: F) -> bool {
    let (a, b) = (a.address(), b.address());
    if a == b {
        return true;
    }
    let Ok(exe) = inspect::executable() else {
        return false;
    };
    let sized = |addr: usize| {
        exe.function_containing(addr)
            .filter(|s| s.address == addr && s.size > 0)
            .map(|s| s.size)
    };
    let (Some(size_a), Some(size_b)) = (sized(a), sized(b)) else {
        return false;
    };
    if size_a != size_b {
        return false;
    }
    // SAFETY: both ranges are sized function symbols of the main executable, which stays mapped
    // and readable for the life of the process.
    let (code_a, code_b) = unsafe {
        (
            std::slice::from_raw_parts(a as *const u8, size_a),
            std::slice::from_raw_parts(b as *const u8, size_b),
        )
    };
    let decode = |code: &[u8], ip: usize| -> Vec<Instruction> {
        Decoder::with_ip(64, code, ip as u64, DecoderOptions::NONE)
            .into_iter()
            .collect()
    };
    let (ia, ib) = (decode(code_a, a), decode(code_b, b));
    let internal = |target: u64, start: usize| {
        (start as u64..(start + size_a) as u64)
            .contains(&target)
            .then(|| target - start as u64)
    };
    ia.len() == ib.len()
        && ia.iter().zip(&ib).all(|(x, y)| {
            let branch = (0..x.op_count()).any(|i| {
                matches!(
                    x.op_kind(i),
                    iced_x86::OpKind::NearBranch16
                        | iced_x86::OpKind::NearBranch32
                        | iced_x86::OpKind::NearBranch64
                )
            });
            if branch {
                // A branch inside the function must land at the same offset, one outside it
                // at the same address.
                return x.code() == y.code()
                    && match (
                        internal(x.near_branch_target(), a),
                        internal(y.near_branch_target(), b),
                    ) {
                        (Some(ox), Some(oy)) => ox == oy,
                        (None, None) => x.near_branch_target() == y.near_branch_target(),
                        _ => false,
                    };
            }
            // Instruction equality ignores the IP and compares RIP-relative operands by their
            // absolute address.
            x == y
        })
}
