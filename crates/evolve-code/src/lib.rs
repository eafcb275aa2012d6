//! Evolve's machine-code engine: change a few bytes of code while other threads run them.
//!
//! Everything Evolve does — hot updates, multiverse commits, probes — comes down to retargeting
//! **patch sites**: 5-byte `jmp rel32`, `call rel32` or NOP instructions at known addresses. This
//! crate makes that safe with threads running:
//!
//! - [`PatchSite`] and [`Batch`]: register sites, retarget or restore many at once, with
//!   compare-and-swap semantics (a site that does not hold what the caller expects is refused
//!   and nothing changes);
//! - [`write`] documents the live-write protocol: one atomic store for sites inside an aligned
//!   8-byte word, the kernel's `int3` protocol otherwise, core syncs with `membarrier`, page
//!   permissions batched under one lock;
//! - [`NearBlock`] allocates executable memory within ±2 GiB of an address, and springboards
//!   carry branches to targets beyond that;
//! - [`FnSite`] is a generated, typed site: safe to retarget between functions of one type;
//!   [`FnCell`] an atomically shared function pointer, and [`fn_ptr_type!`] makes any `fn` type
//!   (higher-ranked ones too) usable by the typed APIs;
//! - [`loader`] loads patch objects (ELF relocatable objects) within ±2 GiB of the executable
//!   and binds them to the program's own symbols, locals included;
//! - [`inspect`] reads the process's own ELF images: symbols, function ranges, build id, and
//!   every `call rel32` that targets a function;
//! - [`redirect`] switches an unprepared function to another version and back: a `jmp` over
//!   its entry written with the world stopped, and its direct calls and GOT slots retargeted.
//! - [`PaddedFunction`] redirects a C function prepared with compiler-reserved entry padding
//!   (`evolve.h`), through [`ForeignCode`] handles the C side vouches for ([`padded`]).
//!
//! All `unsafe` of Evolve lives in this crate, each block with the reason it holds.
//!
//! # Example
//!
//! Threads keep calling through a site while it is retargeted; each call returns the result of
//! the old or the new target, never anything else.
//!
//! ```
//! use evolve_code::{FnSite, Placement};
//! use std::sync::atomic::{AtomicBool, Ordering};
//!
//! extern "C" fn old() -> u64 { 1 }
//! extern "C" fn new() -> u64 { 2 }
//! type F = extern "C" fn() -> u64;
//!
//! // Across an 8-byte boundary: this site is rewritten through the int3 protocol.
//! let site = FnSite::with_placement(old as F, Placement::CrossWord).unwrap();
//! let entry = site.entry();
//! let stop = AtomicBool::new(false);
//! std::thread::scope(|s| {
//!     s.spawn(|| {
//!         while !stop.load(Ordering::Relaxed) {
//!             assert!(matches!(entry(), 1 | 2));
//!         }
//!     });
//!     for _ in 0..100 {
//!         site.retarget(old, new).unwrap();
//!         site.retarget(new, old).unwrap();
//!     }
//!     stop.store(true, Ordering::Relaxed);
//! });
//! ```
#![deny(unsafe_code)]

mod arch;
pub mod attached;
pub mod callsite;
mod counter;
mod detour;
pub mod dylib;
pub mod error;
mod fault;
#[cfg(feature = "fault-injection")]
pub mod fault_injection;
mod fncell;
mod fnsite;
mod foreign;
mod hidden;
pub mod inspect;
pub mod loader;
mod near;
mod overwrite;
pub mod padded;
mod published;
pub mod redirect;
pub mod scan;
pub mod shadow;
mod site;
mod springboard;
pub mod stub;
mod sync;
mod sys;
mod thread_state;
mod transfer;
mod unwind;
pub mod world;
pub mod write;

pub use arch::{NOP5, SITE_LEN};
pub use counter::Counter;
pub use detour::{
    quarantined_trampolines, reclaim_if_due, reclaim_trampolines, Detour, DetourHooks, Entry,
    EntryHook, Prologue, SavedRegs,
};
pub use error::{Error, ErrorKind, Result};
pub use fncell::FnCell;
pub use fnsite::{FnPtr, FnSite, Placement};
pub use foreign::{ForeignCode, ForeignVariable};
pub use hidden::{scrub, scrub_spare, Hidden};
pub use near::NearBlock;
pub use padded::{EntryBatch, PaddedFunction};
pub use published::Published;
pub use site::{PatchSite, SiteInsn, SiteView};
pub use springboard::springboard_count;
pub use sys::ptrace;
pub use transfer::InteriorMutable;
pub use unwind::Unwinder;
pub use world::{stop_signal, stop_the_world};
pub use write::{Batch, BatchReport, WritePath};
