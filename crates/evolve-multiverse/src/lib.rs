//! Multiverse: run-time configuration at the speed of compile-time configuration.
//!
//! A configuration value that changes rarely — "only one thread runs", a log level, a feature
//! flag — still costs a branch on every call that reads it. Multiverse (after the EuroSys'19
//! paper of the same name) compiles each annotated function once per value of the switches it
//! reads, and [`commit`] rewires the live code to the variants matching the current values,
//! safely while other threads run.
//!
//! - `#[evolve::switch]` declares a switch ([`Switch`]): a `bool`, an integer with a declared
//!   domain (`#[evolve::switch(in 0..=3)]`, `#[evolve::switch(in [1, 4, 16])]`), or an enum
//!   deriving `evolve::SwitchValue`.
//! - `#[evolve::multiverse(A, B = [v1, v2])]` on a function generates its generic body and one
//!   variant per assignment of the listed switches (`B` only for the listed values: partial
//!   specialisation); at most [`MAX_VARIANTS`].
//! - `#[evolve::switch] static HASH: fn(&[u8]) -> u64 = fnv;` declares a function-pointer
//!   switch ([`FnSwitch`]): `HASH.call(data)` calls its function, indirectly until a commit turns
//!   every such call into a direct call of the current function (the paper's PV-ops case).
//! - [`commit`], [`revert`], [`commit_refs`], [`revert_refs`], [`commit_fn`], [`revert_fn`],
//!   [`is_committed`]: the API of the paper's Table 1. See [`commit`](mod@crate::commit) for
//!   the semantics.
//!
//! # Example
//!
//! ```
//! #[evolve::switch]
//! static SINGLE_CPU: bool = false;
//!
//! static LOCKED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
//!
//! #[evolve::multiverse(SINGLE_CPU)]
//! fn lock() {
//!     if !SINGLE_CPU.get() {
//!         LOCKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
//!     }
//! }
//!
//! lock();
//! SINGLE_CPU.set(true);
//! evolve::multiverse::commit().unwrap();
//! assert!(evolve::multiverse::is_committed(lock));
//! lock(); // the empty variant: its call sites are NOPs now
//! assert_eq!(LOCKED.load(std::sync::atomic::Ordering::Relaxed), 1);
//! evolve::multiverse::revert().unwrap();
//! ```
//!
//! # Limits
//!
//! Multiversed functions are free functions without generics or `self`; their ABI is
//! `extern "C-unwind"` (panics unwind as usual), and their name denotes a function pointer
//! constant. Direct call sites are found in the main executable only. Switches are used by
//! functions of the crate that declares them.
#![forbid(unsafe_code)]

mod commit;
mod fnswitch;
mod registry;
mod switch;

pub use commit::{
    commit, commit_fn, commit_refs, commit_refs_dyn, function_states, functions, is_committed,
    revert, revert_fn, revert_refs, revert_refs_dyn, CommitReport, FunctionState, Unmatched,
};
pub use fnswitch::FnSwitch;
pub use registry::Multiversed;
pub use switch::{switch_named, switches, AnySwitch, Switch, SwitchValue};

/// The most variants (slots of the cross product) a function may have.
pub const MAX_VARIANTS: usize = 64;

/// An error of multiverse.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The function is not a `#[evolve::multiverse]` function.
    NotMultiversed {
        /// The address given.
        address: usize,
    },
    /// The engine refused to install a function.
    Code {
        /// The function (or operation) concerned.
        function: &'static str,
        /// The engine's error.
        source: evolve_code::Error,
    },
}

impl Error {
    fn code(function: &'static str, source: evolve_code::Error) -> Error {
        Error::Code { function, source }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::NotMultiversed { address } => {
                write!(f, "{address:#x} is not a #[evolve::multiverse] function")
            }
            Error::Code { function, source } => write!(f, "multiverse `{function}`: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Code { source, .. } => Some(source),
            Error::NotMultiversed { .. } => None,
        }
    }
}

/// Used by the macros; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::registry::{Function, FUNCTIONS};
    pub use crate::switch::SWITCHES;
    pub use evolve_code::fn_ptr_type;
    pub use linkme;

    use crate::switch::{Switch, SwitchValue};

    /// The option "not bound: read the switch at run time".
    pub const UNBOUND: u128 = u128::MAX;

    /// A switch read in a variant: the constant `V`, or the switch itself if unbound.
    #[inline(always)]
    pub fn read<T: SwitchValue, const V: u128>(switch: &Switch<T>) -> T {
        if V == UNBOUND {
            switch.get()
        } else {
            T::from_raw(V as u64)
        }
    }

    /// The option of switch `j` in slot `slot` (mixed radix, switch 0 most significant); slots
    /// beyond the cross product repeat slot 0.
    pub const fn slot_value(options: &[&[u128]], slot: usize, j: usize) -> u128 {
        let mut product = 1;
        let mut i = 0;
        while i < options.len() {
            product *= options[i].len();
            i += 1;
        }
        let slot = if slot < product { slot } else { 0 };
        let mut stride = 1;
        let mut i = j + 1;
        while i < options.len() {
            stride *= options[i].len();
            i += 1;
        }
        options[j][(slot / stride) % options[j].len()]
    }

    /// The number of slots, checked against [`crate::MAX_VARIANTS`].
    pub const fn slots(options: &[&[u128]]) -> usize {
        let mut product = 1;
        let mut i = 0;
        while i < options.len() {
            product *= options[i].len();
            i += 1;
        }
        product
    }

    /// The options of a switch bound for its whole domain.
    pub const fn domain_options<const N: usize>(domain: &[u64]) -> [u128; N] {
        let mut out = [0u128; N];
        let mut i = 0;
        while i < N {
            out[i] = domain[i] as u128;
            i += 1;
        }
        out
    }

    /// Whether every value of `values` lies in `domain`.
    pub const fn within(values: &[u64], domain: &[u64]) -> bool {
        let mut i = 0;
        while i < values.len() {
            let mut found = false;
            let mut k = 0;
            while k < domain.len() {
                if domain[k] == values[i] {
                    found = true;
                }
                k += 1;
            }
            if !found {
                return false;
            }
            i += 1;
        }
        true
    }
}
