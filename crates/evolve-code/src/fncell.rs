//! Function-pointer values shared between threads, and function-pointer types for the engine.
//!
//! - [`FnCell<F>`] holds a function pointer of type `F` that threads read and write atomically:
//!   the value behind a function-pointer switch, read by its dispatcher on every indirect call.
//!   It is built in a `static` initializer (`const fn new`), so nothing runs at start-up.
//! - [`fn_ptr_type!`](crate::fn_ptr_type) declares a `#[repr(transparent)]` newtype over any
//!   `fn(..) -> R` type that implements [`FnPtr`]. The engine's generic implementations cover
//!   `fn(A, B) -> R` for type parameters only, which excludes higher-ranked types such as
//!   `fn(&[u8]) -> u64` (`for<'a> fn(&'a [u8]) -> u64`); a newtype of the exact type has none of
//!   that problem, and the trait's contract holds because the macro accepts only `fn` types.
//!
//! # Safety
//!
//! A [`FnCell<F>`] only ever stores values of type `F` (its constructor and [`FnCell::set`] take
//! an `F`), so the address it loads is callable as `F`, as [`FnPtr::from_address`] requires.
//! `F` is a plain function pointer (the [`FnPtr`] contract): one word, aligned as a `usize`, so
//! the cell can be accessed as an [`AtomicUsize`]; after construction every access is atomic.
#![allow(unsafe_code)]

use crate::fnsite::FnPtr;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A function pointer of type `F` that threads read and change atomically.
///
/// # Example
///
/// ```
/// use evolve_code::FnCell;
///
/// fn double(x: u64) -> u64 { x * 2 }
/// fn square(x: u64) -> u64 { x * x }
///
/// static OPERATION: FnCell<fn(u64) -> u64> = FnCell::new(double);
///
/// assert_eq!((OPERATION.get())(5), 10);
/// OPERATION.set(square);
/// assert_eq!((OPERATION.get())(5), 25);
/// ```
#[repr(transparent)]
pub struct FnCell<F: FnPtr> {
    value: UnsafeCell<F>,
}

// SAFETY: after construction the value is only accessed through atomic operations (`atomic`),
// and `F: Send + Sync` (a function pointer).
unsafe impl<F: FnPtr> Sync for FnCell<F> {}

impl<F: FnPtr> FnCell<F> {
    /// A cell holding `initial`.
    pub const fn new(initial: F) -> FnCell<F> {
        FnCell {
            value: UnsafeCell::new(initial),
        }
    }

    fn atomic(&self) -> &AtomicUsize {
        const {
            assert!(
                std::mem::size_of::<F>() == std::mem::size_of::<usize>()
                    && std::mem::align_of::<F>() >= std::mem::align_of::<usize>(),
                "FnPtr types are plain function pointers: one aligned word"
            )
        };
        // SAFETY: the value is one word, aligned for `AtomicUsize` (checked above), lives as long
        // as `self`, and after construction is accessed only through this atomic.
        unsafe { AtomicUsize::from_ptr(self.value.get().cast::<usize>()) }
    }

    /// The current function.
    #[inline(always)]
    pub fn get(&self) -> F {
        let address = self.atomic().load(Ordering::Acquire);
        // SAFETY: the cell only ever holds values of type `F`, whose bits are their address
        // (FnPtr contract), so `address` is the entry of a function callable as `F`.
        unsafe { F::from_address(address) }
    }

    /// Changes the function; threads that read the cell afterwards call `f`.
    #[inline]
    pub fn set(&self, f: F) {
        self.atomic().store(f.address(), Ordering::Release);
    }
}

impl<F: FnPtr> std::fmt::Debug for FnCell<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FnCell({:#x})", self.get().address())
    }
}

/// Declares a newtype over a function pointer type that implements [`FnPtr`], so that the
/// engine's typed APIs ([`crate::FnSite`], [`crate::callsite::DirectCalls`], [`FnCell`]) accept
/// types its generic implementations do not cover, such as `fn(&[u8]) -> u64`.
///
/// The newtype is `#[repr(transparent)]`, `Copy`, with the pointer as its public field. Only
/// `fn` types (optionally `extern "ABI"`) are accepted, which is what makes the implementation
/// sound.
///
/// # Example
///
/// ```
/// use evolve_code::{fn_ptr_type, FnCell, FnPtr};
///
/// fn_ptr_type! {
///     /// A hash function over bytes.
///     pub struct Hasher(fn(&[u8]) -> u64);
/// }
///
/// fn length(data: &[u8]) -> u64 { data.len() as u64 }
/// fn first(data: &[u8]) -> u64 { data.first().copied().unwrap_or(0) as u64 }
///
/// static HASHER: FnCell<Hasher> = FnCell::new(Hasher(length));
/// assert_eq!((HASHER.get().0)(b"abc"), 3);
/// HASHER.set(Hasher(first));
/// assert_eq!((HASHER.get().0)(b"abc"), 97);
/// assert_eq!(HASHER.get().address(), first as fn(&[u8]) -> u64 as usize);
/// ```
#[macro_export]
macro_rules! fn_ptr_type {
    (
        $(#[$attr:meta])*
        $vis:vis struct $name:ident($(extern $abi:literal)? fn($($arg:ty),* $(,)?) $(-> $ret:ty)?);
    ) => {
        $(#[$attr])*
        #[derive(Clone, Copy)]
        #[repr(transparent)]
        $vis struct $name(pub $(extern $abi)? fn($($arg),*) $(-> $ret)?);

        #[allow(unsafe_code)]
        // SAFETY: `$name` wraps a plain function pointer type (the macro accepts only `fn`
        // types), `#[repr(transparent)]`, so its bits are the function's address.
        unsafe impl $crate::FnPtr for $name {
            #[inline(always)]
            fn address(self) -> usize {
                self.0 as usize
            }
            #[inline(always)]
            unsafe fn from_address(address: usize) -> Self {
                // SAFETY: the caller promises that `address` is the entry of a function callable
                // with this signature; function pointers are one word.
                $name(unsafe {
                    ::core::mem::transmute::<usize, $(extern $abi)? fn($($arg),*) $(-> $ret)?>(address)
                })
            }
        }

        impl ::core::fmt::Debug for $name {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                ::core::write!(f, "{}({:#x})", ::core::stringify!($name), self.0 as usize)
            }
        }
    };
}
