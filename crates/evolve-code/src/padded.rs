//! Padded entries: prepared C functions redirected through padding their compiler reserved.
//!
//! `evolve.h` compiles every hot and every multiversed C function with
//! `__attribute__((patchable_function_entry(7, 5), aligned(8)))`. Until it is redirected such a
//! function costs two one-byte NOPs per call: no stub, no extra branch. Redirecting it sends
//! every call — direct calls and calls through pointers — to other code of the same C
//! signature, while other threads keep calling it; restoring puts every byte of the function
//! back.
//!
//! # Layout
//!
//! GCC emits seven one-byte NOPs: five *before* the function's symbol and two after it (after
//! its `endbr64` when built with `-fcf-protection`); `aligned(8)` puts the first at an 8-byte
//! boundary:
//!
//! ```text
//! 8k+0  90 90 90 90 90   the slot: before the entry, where no code branches
//! 8k+5  [f3 0f 1e fa]    the entry (the symbol callers call); endbr64 with -fcf-protection
//!       90 90            the gate: what every call executes first
//!       ...              the function's body
//! ```
//!
//! Redirected to `t`, the slot holds `jmp t` (5 bytes) and the gate `jmp slot` (`eb f9`, or `eb
//! f5` after `endbr64`); the direct calls of the function found in the executable call `t`, so
//! a redirected direct call costs what a direct call of `t` costs, and a call through a pointer
//! two extra jumps.
//!
//! # Why not a 5-byte jump after the entry
//!
//! GCC pads with one-byte NOPs (clang emits one multi-byte NOP). Five one-byte NOPs after the
//! entry are five instructions: a thread preempted after the first resumes in the middle of them,
//! and a `jmp rel32` written there meanwhile would have it execute the jump's displacement.
//! Only stopping the world and looking at every thread's PC could rule that out — and C servers
//! often block every signal in some threads. So the 5-byte jump goes where no thread can be, the
//! slot before the entry, and the entry gets a 2-byte jump to it.
//!
//! # Protocol
//!
//! All edits of one [`EntryBatch`] are written under one lock, in this order:
//!
//! 1. **Slots.** The slot of each function to redirect becomes `jmp t`. The slot is a patch site
//!    of the engine (registered when the function is prepared), so this is the live-write
//!    protocol of [`crate::write`]: one atomic store, or the int3 protocol; a thread that took
//!    the gate earlier and was preempted before the slot's jump executes a whole jump, to the
//!    old target or the new one. The cores are synced before step 2, so no core can take a new
//!    gate and then run stale slot bytes.
//! 2. **Gates.** Each gate that changes is written as one instruction: one atomic store when
//!    its 2 bytes lie in one aligned 8-byte word (always, with the alignment `evolve.h` asks
//!    for: the gate is at offset 5 or 9 of its 8-byte word), else the int3 protocol with a trap
//!    emulating the new jump. Then the cores are synced.
//! 3. **Call sites**: the direct calls (and tail jumps) of each function in the executable are
//!    retargeted to `t` (5-byte NOPs if `t` is a bare `ret`), or restored, in one engine batch.
//!    Any call of the function may call any code of its signature (the argument of
//!    [`crate::callsite`]), so the order of steps 2 and 3 does not matter to callers.
//! 4. **Closed slots.** The slot of each restored function goes back to a 5-byte NOP.
//!
//! A failure at step 1 or 3 changes nothing of that step (batches validate before writing); the
//! steps already done are undone in reverse, so the process is left as it was.
//!
//! # Why a thread never executes a torn instruction
//!
//! - The gate is one instruction, written in one store: a fetch sees `90 90` or `eb xx`.
//! - A thread preempted *between* the gate's two one-byte NOPs resumes at the gate's second
//!   byte: `90`, or, if the gate was opened meanwhile, the displacement `f9` (`stc`) or `f5`
//!   (`cmc`) — one-byte instructions that change only the carry flag, which is undefined at a
//!   function's entry (the SysV ABI preserves no status flag across calls, and compiled code
//!   never reads a flag it has not set). It then runs the old body: a call that started before
//!   the redirect finishes on the old code.
//! - The slot is reached only through the open gate. The first write to it (five one-byte NOPs
//!   become one 5-byte NOP) happens when a function is first prepared, while its gate holds the
//!   compiler's `90 90` and so has never been opened: no thread can be in the slot, and it is
//!   written as fresh code (plain stores, then a core sync). After that it is one instruction,
//!   always written with the live-write protocol, and never made five one-byte NOPs again: a
//!   thread parked at the slot could walk such NOPs and be preempted inside them when a later
//!   redirect writes the jump.
//!
//! # Signature identity
//!
//! Rust cannot check a C function's type, so a padded function accepts only [`ForeignCode`]
//! made with its own signature identity (`evolve.h` checks the C types at compile time and its
//! library makes the handles): safe code cannot send a function's callers into code of another
//! signature.
//!
//! # Safety
//!
//! [`PaddedFunction::declare`] is `unsafe`: its caller vouches that the function was compiled
//! with the padding above. Everything after that is checked: the bytes are verified before the
//! first write, the slot is written through the engine's patch-site protocol, and gates through
//! [`crate::write`]'s single-instruction replacement. The unsafe code of this module reads the
//! padding bytes (inside an executable, readable mapping checked first), registers the slot as a
//! patch site, and implements [`FnPtr`] for a private address type that is never called.
#![allow(unsafe_code)]

use crate::arch::{NOP5, SITE_LEN};
use crate::callsite::{is_bare_return, DirectCalls};
use crate::error::{Error, ErrorKind, Result};
use crate::fnsite::FnPtr;
use crate::foreign::ForeignCode;
use crate::hidden::Hidden;
use crate::site::{PatchSite, SiteInsn};
use crate::sys::memory;
use crate::write::{self, Batch, BatchReport};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex};

const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
const NOP1: u8 = 0x90;
const CLOSED: [u8; 2] = [NOP1, NOP1];
const JMP_REL8: u8 = 0xeb;
/// Bytes read to recognise the layout: the slot, `endbr64` and the gate.
const LAYOUT_LEN: usize = SITE_LEN + ENDBR64.len() + CLOSED.len();

/// A C function's address as the call-site finder needs it: never called (only its address is
/// compared and encoded), so it needs no signature.
#[derive(Debug, Clone, Copy)]
struct Unnamed(usize);

// SAFETY: `Unnamed` values are only compared and encoded as branch targets by
// `DirectCalls<Unnamed>`, which this module owns and never hands out; no code calls them.
unsafe impl FnPtr for Unnamed {
    fn address(self) -> usize {
        self.0
    }
    unsafe fn from_address(address: usize) -> Self {
        Unnamed(address)
    }
}

struct Padded {
    entry: usize,
    gate: usize,
    slot: PatchSite,
    signature: u64,
    calls: DirectCalls<Unnamed>,
}

impl Padded {
    /// The gate's open form: a short jump to the slot.
    fn open_gate(&self) -> [u8; 2] {
        let displacement = self.slot.address() as isize - (self.gate + 2) as isize;
        [JMP_REL8, displacement as i8 as u8]
    }

    /// Writes the gate open or closed; returns whether it was one atomic store.
    fn write_gate(&self, open: bool) -> Result<bool> {
        let (from, to, emulate) = if open {
            (CLOSED, self.open_gate(), SiteInsn::Jmp(self.slot.address()))
        } else {
            (self.open_gate(), CLOSED, SiteInsn::Jmp(self.gate + 2))
        };
        write::replace_bytes(self.gate, &from, &to, emulate, write::default_write_path())
    }
}

struct State {
    padded: Arc<Padded>,
    /// Where the function is redirected to, if it is.
    target: Option<Hidden>,
}

/// Every prepared function by entry; its lock also serialises [`EntryBatch::apply`].
static PREPARED: LazyLock<Mutex<HashMap<usize, State>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn prepared() -> std::sync::MutexGuard<'static, HashMap<usize, State>> {
    PREPARED.lock().unwrap_or_else(|p| p.into_inner())
}

/// A C function compiled with entry padding, to be redirected (see the module docs).
///
/// A handle is a copy of the function's address and signature identity, made by the unsafe
/// [`PaddedFunction::declare`]; the engine keeps the function's state. Nothing is read or
/// written until the function is prepared, by [`PaddedFunction::prepare`] or its first
/// redirection.
///
/// # Example
///
/// A function laid out as GCC lays out `patchable_function_entry(7, 5)`:
///
/// ```
/// use evolve_code::{ForeignCode, PaddedFunction};
///
/// std::arch::global_asm!(
///     ".text", ".p2align 4",
///     ".rept 5", "nop", ".endr",
///     ".globl padded_example", "padded_example:", "nop", "nop", "mov eax, 1", "ret",
/// );
/// extern "C" fn two() -> u32 { 2 }
/// extern "C" {
///     fn padded_example() -> u32;
/// }
/// # fn main() {
/// let identity = 1; // stands for the C type `unsigned (void)`
/// // SAFETY: `padded_example` has the padding above; both functions return a u32.
/// let (padded, new) = unsafe {
///     (
///         PaddedFunction::declare(ForeignCode::new(padded_example as usize, identity)),
///         ForeignCode::new(two as usize, identity),
///     )
/// };
/// padded.redirect(new).unwrap();
/// assert_eq!(unsafe { padded_example() }, 2);
/// padded.restore().unwrap();
/// assert_eq!(unsafe { padded_example() }, 1);
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PaddedFunction {
    code: ForeignCode,
}

/// Reads the `N` bytes at `address`, after checking they lie in one readable, executable mapping.
fn read_code<const N: usize>(address: usize) -> Result<[u8; N]> {
    let maps = memory::mappings()?;
    match memory::mapping_containing(&maps, address) {
        Some(m) if m.protection.exec && m.protection.read && address + N <= m.range.end => {}
        _ => return Err(Error::new(ErrorKind::NotExecutable { address })),
    }
    // SAFETY: the N bytes lie in a readable mapping (checked above) of the program's code,
    // which is not unmapped while the program runs.
    Ok(unsafe { memory::read::<N>(address) })
}

impl PaddedFunction {
    /// The padded function `function`. Reads and writes nothing (see [`PaddedFunction::prepare`]).
    ///
    /// # Safety
    ///
    /// `function` is the entry of a function compiled with
    /// `__attribute__((patchable_function_entry(7, 5)))`, callable as every [`ForeignCode`] of
    /// `function`'s signature identity, in code that stays mapped for the life of the process;
    /// the five bytes before it are its padding, which no code branches to.
    pub const unsafe fn declare(function: ForeignCode) -> PaddedFunction {
        PaddedFunction { code: function }
    }

    /// Prepares the function for redirection, once: checks its padding, turns the slot's five
    /// one-byte NOPs into one 5-byte NOP, and finds its direct call sites in the executable
    /// (the first preparation in the process decodes the executable's code once).
    ///
    /// # Errors
    /// [`ErrorKind::NotPadded`] if the bytes around the entry are not the padding of
    /// `patchable_function_entry(7, 5)` in a state the engine left it in (naming what was
    /// found); [`ErrorKind::SignatureMismatch`] if the function was prepared before with another
    /// identity; [`ErrorKind::NotExecutable`] if it is not code; the errors of
    /// [`DirectCalls::find`]. Nothing is written when an error is returned.
    pub fn prepare(&self) -> Result<()> {
        self.padded().map(|_| ())
    }

    fn padded(&self) -> Result<Arc<Padded>> {
        let function = self.code;
        let entry = function.address();
        let mut prepared = prepared();
        if let Some(state) = prepared.get(&entry) {
            if state.padded.signature != function.signature() {
                return Err(Error::new(ErrorKind::SignatureMismatch {
                    function: entry,
                    expected: state.padded.signature,
                    found: function.signature(),
                }));
            }
            return Ok(state.padded.clone());
        }
        let slot = entry
            .checked_sub(SITE_LEN)
            .ok_or(ErrorKind::NotExecutable { address: entry })?;
        let bytes: [u8; LAYOUT_LEN] = read_code(slot)?;
        let endbr = bytes[SITE_LEN..SITE_LEN + 4] == ENDBR64;
        let gate_offset = SITE_LEN + if endbr { ENDBR64.len() } else { 0 };
        let shown = bytes[..gate_offset + 2].to_vec();
        let refuse = |reason: &str| {
            Error::new(ErrorKind::NotPadded {
                function: entry,
                found: shown.clone(),
                reason: reason.into(),
            })
        };
        let gate = [bytes[gate_offset], bytes[gate_offset + 1]];
        if gate != CLOSED {
            let to_slot = gate[0] == JMP_REL8
                && (slot + gate_offset + 2) as isize + gate[1] as i8 as isize == slot as isize;
            return Err(refuse(if to_slot {
                "its gate is already open, redirected by code Evolve does not know of (another \
                 copy of the library?)"
            } else {
                "it does not start with the two one-byte NOPs of patchable_function_entry(7, 5) \
                 (built without evolve.h's EVOLVE_HOT or EVOLVE_MULTIVERSE, or changed by a \
                 probe or a debugger)"
            }));
        }
        let slot_bytes: [u8; SITE_LEN] = bytes[..SITE_LEN].try_into().expect("5 bytes");
        match slot_bytes {
            // The compiler's padding; the gate was never opened, so no thread can be here.
            [NOP1, NOP1, NOP1, NOP1, NOP1] => {
                write::lock().write_fresh_code(slot, &NOP5)?;
            }
            // Closed by this engine before (a 5-byte NOP, or a jump left behind a closed gate).
            _ if slot_bytes == NOP5 || slot_bytes[0] == 0xe9 => {}
            _ => {
                return Err(refuse(
                    "the five bytes before its entry are not the NOP padding of \
                     patchable_function_entry(7, 5)",
                ))
            }
        }
        // SAFETY: the slot is reached only through the function's gate, by callers of the
        // function (module docs); every instruction written there later is a jump to code of
        // the function's signature identity (checked by `redirect_in`) or a 5-byte NOP that falls
        // through to the entry. The code stays mapped (the contract of `declare`).
        let slot_site = unsafe { PatchSite::register(slot)? };
        let calls = DirectCalls::find(Unnamed(entry))?;
        let padded = Arc::new(Padded {
            entry,
            gate: slot + gate_offset,
            slot: slot_site,
            signature: function.signature(),
            calls,
        });
        prepared.insert(
            entry,
            State {
                padded: padded.clone(),
                target: None,
            },
        );
        Ok(padded)
    }

    /// The function's entry (the address its callers call).
    pub fn entry(&self) -> usize {
        self.code.address()
    }

    /// The function's signature identity.
    pub fn signature(&self) -> u64 {
        self.code.signature()
    }

    /// Where the function is redirected to, if it is.
    pub fn target(&self) -> Option<usize> {
        prepared()
            .get(&self.entry())
            .and_then(|s| s.target)
            .map(Hidden::get)
    }

    /// The number of direct call sites of the function found in the executable, once prepared.
    pub fn call_sites(&self) -> Option<usize> {
        prepared().get(&self.entry()).map(|s| s.padded.calls.len())
    }

    /// Adds to `edits`: redirect the function to `to` (restore it if `to` is the function
    /// itself). Prepares the function first if it is not.
    ///
    /// # Errors
    /// [`ErrorKind::SignatureMismatch`] if `to` has another signature identity,
    /// [`ErrorKind::TargetNotExecutable`] if it is not code, the errors of
    /// [`PaddedFunction::prepare`]; nothing is added.
    pub fn redirect_in(&self, edits: &mut EntryBatch, to: ForeignCode) -> Result<()> {
        if to.signature() != self.signature() {
            return Err(Error::new(ErrorKind::SignatureMismatch {
                function: self.entry(),
                expected: self.signature(),
                found: to.signature(),
            }));
        }
        if to.address() == self.entry() {
            self.restore_in(edits);
            return Ok(());
        }
        if read_code::<1>(to.address()).is_err() {
            return Err(Error::new(ErrorKind::TargetNotExecutable {
                site: self.entry(),
                target: to.address(),
            }));
        }
        let padded = self.padded()?;
        let target = Unnamed(to.address());
        if is_bare_return(target) {
            padded.calls.nop_in(&mut edits.sites, target)?;
        } else {
            padded.calls.retarget_in(&mut edits.sites, target);
        }
        edits
            .entries
            .push((padded, Some(Hidden::new(to.address()))));
        Ok(())
    }

    /// Adds to `edits`: restore the function (its gate, its call sites, its slot). Nothing for
    /// a function never prepared (it was never redirected).
    pub fn restore_in(&self, edits: &mut EntryBatch) {
        let Some(padded) = prepared().get(&self.entry()).map(|s| s.padded.clone()) else {
            return;
        };
        padded.calls.restore_in(&mut edits.sites);
        edits.entries.push((padded, None));
    }

    /// Redirects the function to `to` (an [`EntryBatch`] of one).
    pub fn redirect(&self, to: ForeignCode) -> Result<BatchReport> {
        let mut edits = EntryBatch::new();
        self.redirect_in(&mut edits, to)?;
        edits.apply()
    }

    /// Restores the function (an [`EntryBatch`] of one).
    pub fn restore(&self) -> Result<BatchReport> {
        let mut edits = EntryBatch::new();
        self.restore_in(&mut edits);
        edits.apply()
    }
}

/// Redirections and restorations of padded functions, and other patch-site edits, written
/// together (see the module docs for the order).
///
/// # Example
///
/// ```
/// use evolve_code::{EntryBatch, ForeignCode, PaddedFunction};
///
/// std::arch::global_asm!(
///     ".text", ".p2align 4",
///     ".rept 5", "nop", ".endr",
///     ".globl padded_batch_a", "padded_batch_a:", "nop", "nop", "mov eax, 1", "ret",
///     ".p2align 4",
///     ".rept 5", "nop", ".endr",
///     ".globl padded_batch_b", "padded_batch_b:", "nop", "nop", "mov eax, 2", "ret",
/// );
/// extern "C" fn ten() -> u32 { 10 }
/// extern "C" {
///     fn padded_batch_a() -> u32;
///     fn padded_batch_b() -> u32;
/// }
/// # fn main() {
/// // SAFETY: both have the padding above and return a u32, as `ten` does.
/// let (a, b, ten) = unsafe {
///     (
///         PaddedFunction::declare(ForeignCode::new(padded_batch_a as usize, 7)),
///         PaddedFunction::declare(ForeignCode::new(padded_batch_b as usize, 7)),
///         ForeignCode::new(ten as usize, 7),
///     )
/// };
/// let mut edits = EntryBatch::new();
/// a.redirect_in(&mut edits, ten).unwrap();
/// b.redirect_in(&mut edits, ten).unwrap();
/// edits.apply().unwrap();
/// assert_eq!(unsafe { (padded_batch_a(), padded_batch_b()) }, (10, 10));
/// let mut edits = EntryBatch::new();
/// a.restore_in(&mut edits);
/// b.restore_in(&mut edits);
/// edits.apply().unwrap();
/// assert_eq!(unsafe { (padded_batch_a(), padded_batch_b()) }, (1, 2));
/// # }
/// ```
#[derive(Default)]
pub struct EntryBatch {
    sites: Batch,
    /// Each function with its new target (`None`: restore).
    entries: Vec<(Arc<Padded>, Option<Hidden>)>,
}

impl std::fmt::Debug for EntryBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntryBatch")
            .field("sites", &self.sites)
            .field("entries", &self.entries.len())
            .finish()
    }
}

/// Adds `more` to `report`.
fn add(report: &mut BatchReport, more: BatchReport) {
    report.changed += more.changed;
    report.unchanged += more.unchanged;
    report.stored += more.stored;
    report.via_int3 += more.via_int3;
    report.via_springboard += more.via_springboard;
    report.core_syncs += more.core_syncs;
    report.mprotects += more.mprotects;
}

impl EntryBatch {
    /// An empty batch.
    pub fn new() -> EntryBatch {
        EntryBatch::default()
    }

    /// The patch-site edits written with the call sites (step 3 of the protocol).
    pub fn sites(&mut self) -> &mut Batch {
        &mut self.sites
    }

    /// True if nothing is to be written.
    pub fn is_empty(&self) -> bool {
        self.sites.is_empty() && self.entries.is_empty()
    }

    /// Writes everything, in the protocol's order; on error, undoes what was written.
    ///
    /// # Errors
    /// [`ErrorKind::DuplicateSite`] if a function appears twice; the errors of [`Batch::apply`]
    /// and of writing a gate. After an error the process is as it was (unless undoing failed
    /// too, which needs a failing `mprotect` and is reported with the first error).
    pub fn apply(&self) -> Result<BatchReport> {
        let mut prepared = prepared();
        let mut seen = HashSet::new();
        // (function, redirected before, target after)
        let mut steps = Vec::with_capacity(self.entries.len());
        for (padded, to) in &self.entries {
            if !seen.insert(padded.entry) {
                return Err(Error::new(ErrorKind::DuplicateSite {
                    address: padded.entry,
                }));
            }
            let from = prepared
                .get(&padded.entry)
                .ok_or(ErrorKind::UnknownSite {
                    address: padded.entry,
                })?
                .target;
            steps.push((padded.clone(), from.is_some(), to.map(Hidden::get)));
        }
        let mut report = BatchReport::default();

        // 1. Slots.
        let (mut slots, mut slots_back) = (Batch::new(), Batch::new());
        for (padded, _, to) in &steps {
            let Some(to) = to else { continue };
            let current = padded.slot.current();
            if current != SiteInsn::Jmp(*to) {
                // SAFETY: `to` is the address of a `ForeignCode` whose signature identity was
                // checked against the padded function's above (its creator vouched, in an
                // unsafe constructor, that it is code of that signature); the slot is only
                // reached through the gate, and the undo puts back what it held.
                unsafe {
                    slots.retarget(padded.slot, current, SiteInsn::Jmp(*to));
                    slots_back.retarget(padded.slot, SiteInsn::Jmp(*to), current);
                }
            }
        }
        if !slots.is_empty() {
            add(&mut report, slots.apply()?);
        }

        // 2. Gates.
        let mut gates_done: Vec<(&Arc<Padded>, bool)> = Vec::new();
        let undo = |gates_done: &[(&Arc<Padded>, bool)], first: Error| -> Error {
            for (padded, opened) in gates_done.iter().rev() {
                let _ = padded.write_gate(!opened);
            }
            if !slots_back.is_empty() {
                let _ = slots_back.apply();
            }
            first
        };
        for (padded, was_open, to) in &steps {
            let open = to.is_some();
            if open == *was_open {
                continue;
            }
            match padded.write_gate(open) {
                Ok(atomic) => {
                    report.changed += 1;
                    report.core_syncs += if atomic { 1 } else { 3 };
                    if atomic {
                        report.stored += 1;
                    } else {
                        report.via_int3 += 1;
                    }
                    gates_done.push((padded, open));
                }
                Err(e) => return Err(undo(&gates_done, e)),
            }
        }

        // 3. Call sites (and the caller's other edits).
        if !self.sites.is_empty() {
            match self.sites.apply() {
                Ok(more) => add(&mut report, more),
                Err(e) => return Err(undo(&gates_done, e)),
            }
        }
        for (padded, _, to) in &steps {
            if let Some(state) = prepared.get_mut(&padded.entry) {
                state.target = to.map(Hidden::new);
            }
        }

        // 4. Closed slots. Best effort: a jump behind a closed gate is never executed.
        let mut closed = Batch::new();
        for (padded, _, to) in &steps {
            let current = padded.slot.current();
            if to.is_none() && current != SiteInsn::Nop {
                // SAFETY: a slot behind a closed gate: no thread reaches it, and a `nop` in it
                // runs nothing.
                unsafe { closed.retarget(padded.slot, current, SiteInsn::Nop) };
            }
        }
        if !closed.is_empty() {
            if let Ok(more) = closed.apply() {
                add(&mut report, more);
            }
        }
        Ok(report)
    }
}
