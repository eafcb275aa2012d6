//! Code and data of the program that Rust knows only by address: C functions and C variables
//! declared through `evolve.h`.
//!
//! Rust cannot check the type of a C function it is handed as an address, so the C side vouches
//! for it once, when the handle is made ([`ForeignCode::new`], [`ForeignVariable::new`], both
//! `unsafe`), and the typed engine operations check everything after that: a padded C function
//! (see [`crate::padded`]) accepts only [`ForeignCode`] of its own *signature identity*, the way
//! a [`crate::FnSite`] accepts only functions of its Rust type and a hot stub only code of its
//! fingerprint. Neither handle can be called or dereferenced from Rust.
//!
//! # Safety
//!
//! [`ForeignVariable`] reads and writes its variable with atomic accesses of the variable's own
//! width, at an address its maker promised is a live, aligned integer of that width for the life
//! of the process; that is all the unsafe code here does.
#![allow(unsafe_code)]

use crate::error::{Error, ErrorKind, Result};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};

/// The entry of machine code with a known signature identity: a valid redirection target for
/// padded functions of that identity.
///
/// The identity is an opaque number chosen by whoever makes the handle; `evolve.h`'s library
/// uses the address of the C function the code stands in for (a variant of a multiversed
/// function, a new implementation of a hot function), whose type the C compiler checked.
///
/// # Example
///
/// ```
/// use evolve_code::ForeignCode;
///
/// extern "C" fn old(x: u32) -> u32 { x }
/// extern "C" fn new(x: u32) -> u32 { x + 1 }
/// let identity = old as usize as u64;
/// // SAFETY: both functions have the type `extern "C" fn(u32) -> u32`, which `identity` stands for.
/// let (a, b) = unsafe {
///     (ForeignCode::new(old as usize, identity), ForeignCode::new(new as usize, identity))
/// };
/// assert_eq!(a.signature(), b.signature());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ForeignCode {
    address: usize,
    signature: u64,
}

impl ForeignCode {
    /// The code at `address`, callable as every other `ForeignCode` of `signature`.
    ///
    /// # Safety
    ///
    /// `address` is the entry of machine code that callers of any function of this `signature`
    /// may reach instead of it, with their registers and stack as they are (the same C
    /// prototype and calling convention), and the code stays mapped while a patch site may
    /// branch to it.
    pub const unsafe fn new(address: usize, signature: u64) -> ForeignCode {
        ForeignCode { address, signature }
    }

    /// Where the code starts.
    pub fn address(self) -> usize {
        self.address
    }

    /// Its signature identity.
    pub fn signature(self) -> u64 {
        self.signature
    }
}

/// An integer variable of the program (a C `bool`, integer or enum of 1, 2, 4 or 8 bytes), read
/// and written atomically in raw form: the value as a `u64`, sign-extended for signed types (the
/// form multiverse switches use).
///
/// # Example
///
/// ```
/// use evolve_code::ForeignVariable;
///
/// static LEVEL: std::sync::atomic::AtomicI16 = std::sync::atomic::AtomicI16::new(-2);
/// // SAFETY: a static 2-byte signed integer, accessed atomically by everyone.
/// let v = unsafe { ForeignVariable::new(LEVEL.as_ptr() as usize, 2, true) }.unwrap();
/// assert_eq!(v.load(), -2i64 as u64);
/// v.store(3);
/// assert_eq!(LEVEL.load(std::sync::atomic::Ordering::Relaxed), 3);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ForeignVariable {
    address: usize,
    width: u8,
    signed: bool,
}

impl ForeignVariable {
    /// The variable of `width` bytes at `address`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] if `width` is not 1, 2, 4 or 8, or `address` is null or not
    /// aligned to it.
    ///
    /// # Safety
    ///
    /// `address` is a live integer variable of `width` bytes, valid for reads and writes for the
    /// life of the process, and other code accesses it only with single loads and stores of its
    /// width (C's `__atomic` builtins, or plain accesses of an aligned integer).
    pub unsafe fn new(address: usize, width: usize, signed: bool) -> Result<ForeignVariable> {
        if !matches!(width, 1 | 2 | 4 | 8) || address == 0 || !address.is_multiple_of(width) {
            return Err(Error::new(ErrorKind::InvalidArgument {
                reason: format!(
                    "a switch variable must be an aligned integer of 1, 2, 4 or 8 bytes \
                     ({width} bytes at {address:#x})"
                ),
            }));
        }
        Ok(ForeignVariable {
            address,
            width: width as u8,
            signed,
        })
    }

    /// The variable's address.
    pub fn address(self) -> usize {
        self.address
    }

    /// Its width in bytes.
    pub fn width(self) -> usize {
        self.width as usize
    }

    /// Whether it is signed (its raw form is sign-extended).
    pub fn is_signed(self) -> bool {
        self.signed
    }

    /// The current value in raw form (relaxed).
    pub fn load(self) -> u64 {
        let p = self.address;
        let unsigned = match self.width {
            // SAFETY: the maker promised a live, aligned `u8`-sized variable that others access
            // atomically (`new`); `AtomicU8` has the layout of `u8`.
            1 => unsafe { AtomicU8::from_ptr(p as *mut u8) }.load(Ordering::Relaxed) as u64,
            // SAFETY: as above, 2 bytes.
            2 => unsafe { AtomicU16::from_ptr(p as *mut u16) }.load(Ordering::Relaxed) as u64,
            // SAFETY: as above, 4 bytes.
            4 => unsafe { AtomicU32::from_ptr(p as *mut u32) }.load(Ordering::Relaxed) as u64,
            // SAFETY: as above, 8 bytes.
            _ => unsafe { AtomicU64::from_ptr(p as *mut u64) }.load(Ordering::Relaxed),
        };
        self.normalise(unsigned)
    }

    /// Stores `raw` (truncated to the variable's width; relaxed).
    pub fn store(self, raw: u64) {
        let p = self.address;
        match self.width {
            // SAFETY: as in `load`.
            1 => unsafe { AtomicU8::from_ptr(p as *mut u8) }.store(raw as u8, Ordering::Relaxed),
            // SAFETY: as in `load`.
            2 => unsafe { AtomicU16::from_ptr(p as *mut u16) }.store(raw as u16, Ordering::Relaxed),
            // SAFETY: as in `load`.
            4 => unsafe { AtomicU32::from_ptr(p as *mut u32) }.store(raw as u32, Ordering::Relaxed),
            // SAFETY: as in `load`.
            _ => unsafe { AtomicU64::from_ptr(p as *mut u64) }.store(raw, Ordering::Relaxed),
        }
    }

    /// The raw form of `raw` as this variable would hold it: truncated to its width and
    /// sign-extended if signed (so that a domain value written as `-1` compares equal).
    pub fn normalise(self, raw: u64) -> u64 {
        let bits = self.width as u32 * 8;
        if bits == 64 {
            return raw;
        }
        let truncated = raw & ((1u64 << bits) - 1);
        if self.signed && truncated >> (bits - 1) == 1 {
            truncated | !((1u64 << bits) - 1)
        } else {
            truncated
        }
    }
}
