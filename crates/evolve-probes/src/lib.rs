//! Probes: see inside a running process without rebuilding or restarting it.
//!
//! [`add`] attaches a probe to every function whose name matches a pattern (demangled Rust
//! paths or C names, `*` and `?` globs), in the executable and in loaded shared libraries. Each
//! function becomes a *point*: an entry detour from the engine ([`evolve_code::Detour`]) whose
//! trampoline counts every call with one `lock inc` and, only while a point carries a probe that
//! needs more, calls an entry hook with the arguments. Several probes share a point; removing
//! the last one restores the function's bytes exactly.
//!
//! | kind | what it records |
//! |---|---|
//! | [`ProbeKind::Count`] | calls since the probe was added (exact, any number of threads) |
//! | [`ProbeKind::Latency`] | entry-to-exit time; exits caught through the engine's shadow stack, correct under recursion and unwinding panics |
//! | [`ProbeKind::Histogram`] | log2 histogram of an integer argument |
//! | [`ProbeKind::Predicate`] | calls where `argN <op> value` holds, with the first backtraces |
//! | [`ProbeKind::Coverage`] | whether the function ran; removes itself after the first hit |
//!
//! # Example
//!
//! ```
//! use evolve_probes::{add, read, remove, ProbeKind};
//!
//! #[inline(never)]
//! fn doc_example_square(x: u64) -> u64 { std::hint::black_box(x).wrapping_mul(x) + 1 }
//!
//! // A glob over demangled Rust paths (the doctest's crate name is generated).
//! let ids = add("*::doc_example_square", ProbeKind::Count).unwrap();
//! for i in 0..10 { std::hint::black_box(doc_example_square as fn(u64) -> u64)(i); }
//! assert_eq!(read(ids[0]).unwrap().calls, 10);
//! remove(ids[0]).unwrap();
//! ```
#![forbid(unsafe_code)]

mod glob;
mod kind;
mod point;

pub use glob::matches as glob_matches;
pub use kind::{Cmp, ProbeKind};
pub use point::{
    add, list, read, remove, remove_all, Error, LatencyReading, ProbeId, ProbeInfo, ProbeReading,
    Result,
};
