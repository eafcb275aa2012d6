//! Switching an unprepared function to another version and back: a 5-byte `jmp` over its
//! entry, and every direct reference to it retargeted, so that a patched call is again one
//! direct call.
//!
//! A function compiled with no preparation has no patch site. To send its calls to a new
//! version (a replacement in a loaded patch, [`Function::replacement`]) the engine
//!
//! 1. **redirects its entry** ([`install`]): a `jmp rel32` to the version is written over its
//!    first 5 bytes, with every other thread stopped. Every path into the function — direct
//!    calls, function pointers, `dyn` vtables, GOT slots — now reaches the version, one jump
//!    later. The entry then *is* a registered [`PatchSite`](crate::PatchSite) holding one
//!    instruction, so moving it to a newer version is an ordinary live write
//!    ([`Redirect::retarget_in`] in a [`Batch`](crate::Batch)), with no thread stopped;
//! 2. **retargets its references** ([`References`], [`Retarget`]): each `call rel32` / `jmp
//!    rel32` to it in the executable and in loaded patches, and each GOT slot of the executable
//!    holding its address, now names the version itself: the jump at the entry is no longer on
//!    the path, and calling a patched function is one direct call again;
//! 3. **goes back** the same way in reverse: references restored, then the entry's original
//!    bytes written back ([`remove`]) — exactly, byte for byte.
//!
//! A function that was never redirected is untouched: no stub, no cost.
//!
//! # The invariant
//!
//! *No thread ever executes an instruction that is partly old bytes and partly new, nor
//! resumes in the middle of the new `jmp`.* A thread that enters the function after the switch
//! runs the version; a thread already inside it finishes on the old code (the bytes after the
//! jump are never changed).
//!
//! Who establishes it, for the entry (several instructions replaced by one):
//!
//! - **The entry check** ([`crate::overwrite`], before anything is written): the whole function
//!   is decoded; no branch of it may land in the replaced instructions (not even on the entry: a
//!   loop head there would send a running thread into the jump with the old body's registers),
//!   no `call` among them may return inside them, and a function shorter than 5 bytes must be
//!   followed by padding. So the only way a thread gets to a byte strictly inside the replaced
//!   instructions is by executing the instructions before it, starting at the entry.
//! - **The stop-the-world check** (`write_round` in `entry.rs`): every other thread is parked
//!   in a signal handler; the entry is written only if no thread can resume strictly inside
//!   `(entry, entry + covered)`. By the entry check, a parked thread outside that range can
//!   only reach it again through the entry, which by then holds the complete jump (the writer
//!   syncs every core before the threads resume). That is why the check is enough: it is a
//!   check of the only way in. An entry a thread is inside is tried again at the next stop
//!   (other entries of the batch are written meanwhile); after [`MAX_ATTEMPTS`] stops the
//!   batch is refused, naming the thread, and every entry already written gets its bytes back.
//! - **The byte comparison**, with the world stopped: the entry still holds the bytes the check
//!   decoded; otherwise (a probe or another writer got there first) the batch is refused.
//!
//! Taking a redirect out replaces one instruction (the `jmp`) by the original ones: no thread
//! can be inside a single instruction, so it needs no busy check, but it is still written with
//! the world stopped, so that no thread fetches a mix of the jump and the original bytes.
//! Retargeting the jump is one 5-byte instruction changing to another: the live-write protocol
//! ([`crate::write`]) covers it without stopping anyone.
//!
//! For the references, each is one instruction or one data word:
//!
//! - a `call rel32` / `jmp rel32` changes through the live-write protocol; an `addr32 call
//!   rel32` (`67 e8`, what the loader makes of a patch's GOT call) is the 5-byte site one byte
//!   in — a thread is never between a prefix and its instruction, and the int3 protocol's trap
//!   at the site's first byte is recognised as usual;
//! - a **GOT slot** is an aligned 8-byte word a caller loads with one 8-byte load (`call
//!   *slot(%rip)`), which x86-64 performs atomically: a caller gets the old address or the new
//!   one. The store is a compare-and-swap under the engine's write lock, through the page made
//!   briefly writable (it is read-only after relocation, and never executable) — details in
//!   `got.rs`.
//!
//! **Order.** The entry is redirected before any reference is retargeted, and references are
//! restored before the redirect is removed: at every instant every path reaches a version of
//! the function (a reference still naming the old function passes through its entry's jump).
//! The references of a batch switch one by one, each atomically; a group of functions that
//! must switch together needs safe points (the hot-update layer's).
//!
//! **Which versions.** A [`Function`] knows which function it is a version of: the program's
//! symbol `F` (patches carry `__evolve_new__F`, built by Evolve's builder from `F`'s source
//! with its signature; [`LoadedPatch::load`](crate::loader::LoadedPatch::load)'s caller vouched
//! the patch was built for this program), or a Rust function-pointer type. The safe operations
//! here only send calls of a function to another version of it (or back), so they never let a
//! caller run code with the wrong signature; [`Function::vouched_version_of`] is the unsafe
//! door for anything else.
//!
//! # Versions over time
//!
//! Stacked patches: the program's `F0` redirected to `F1`, then to `F2`: retarget `F0`'s entry
//! (`Redirect::retarget_in`), install a redirect on `F1`'s entry (a function of a loaded patch
//! is redirected like the program's), and retarget `F0`'s references `F1 → F2`
//! ([`Retarget::retarget`]); the references inside the new patch are found with
//! [`References::find`]`(&f0, &[&patch2])` and merged ([`References::merge`]). Reverting
//! walks back: references to the newest remaining version (or restored), entries retargeted or
//! removed.
//!
//! # Probes
//!
//! Probes and redirects compose in one order: **redirect first, probe after**. A redirect
//! refuses an entry that holds a probe's detour (its bytes are the probe's jump, not the
//! function's); a probe placed on a redirected entry sees a patch site holding a `jmp` — like a
//! prepared function's stub — and routes it through its trampoline ([`crate::Detour`]), so the
//! probe then *follows* the redirect: retargeting the redirect stores the new version in the
//! trampoline's slot, and the code references found by [`References::find`] keep calling the
//! entry while the probe is there (they are recorded as followers of it), so it sees their
//! calls. Calls through GOT slots retargeted to a version bypass it: probe the version itself to
//! see those. A redirect under a probe is not removed ([`remove`] refuses): remove the probe
//! first.
//!
//! # Limits
//!
//! - Branches from *other* functions into the middle of an entry, and computed jumps (jump
//!   tables), cannot be checked; compilers emit neither into a function's first instructions.
//! - Today's stop-the-world sees each thread's interrupted PC: a thread inside a signal handler
//!   whose interrupted context lies inside an entry is not seen, and a thread created while the
//!   world is being stopped is not stopped (it can only reach an entry through a call, and
//!   finds it old or new; a concurrent fetch of a half-written entry is not excluded). The
//!   stop-the-world being rewritten with every resumable context and a stable thread list
//!   closes both; `stopped.rs` is the one place to switch.
//! - The GOT is the executable's `.got`; `.got.plt` (lazy binding of library functions) is
//!   never written. Function pointers loaded from a retargeted GOT slot are the version's
//!   address (pointer comparisons between versions differ; reclamation sees stored ones).
//!
//! # Safety
//!
//! The unsafe code reads function bytes inside executable mappings checked first, writes
//! entries only through the engine's code window with the world stopped (the protocol above),
//! registers reference sites whose soundness is the lineage argument above, and stores GOT
//! slots as `got.rs` explains.
#![allow(unsafe_code)]

mod entry;
mod function;
mod got;
mod references;
mod stopped;

pub use entry::{install, remove, Installed, Redirect, StopStats, MAX_ATTEMPTS};
pub use function::{Function, REPLACEMENT_PREFIX};
pub use references::{References, Retarget, RetargetReport};
