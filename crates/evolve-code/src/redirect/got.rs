//! Writing the executable's GOT slots: the 8-byte words its `call *f@GOTPCREL(%rip)`
//! instructions load a function's address from.
//!
//! # Why a store is atomic for callers
//!
//! A slot is a naturally aligned 8-byte word, and a caller reads it with one 8-byte load (the
//! memory operand of `call`, `jmp` or `mov`). On x86-64 an aligned quadword access is atomic
//! (Intel SDM vol. 3A, "Guaranteed Atomic Operations"): a caller sees the old address or the
//! new one, never a mix. The store is a `lock cmpxchg` (compare-and-swap against the value the
//! batch expects), under the engine's write lock, so only one writer ever stores to a slot.
//! Data needs no core sync: the next load of the slot sees the new value, and a call already
//! made through the old one runs the old version, which is correct.
//!
//! # Permissions
//!
//! The GOT is read-only after relocation (RELRO). The pages holding the slots of a batch are
//! made `rw-` (never executable) for the stores, one `mprotect` per run of contiguous pages, and
//! given their protection back at once. Nothing else writes there, and readers are unaffected.
//! Where the kernel refuses (a policy forbidding it), the engine writes through
//! `/proc/self/mem` instead — whose writes are not guaranteed atomic — so it does so with the
//! world stopped: no thread can read a slot while it changes.
//!
//! # Safety
//!
//! The slots written are words of the executable's `.got` found by
//! [`crate::inspect::got_slots_holding`]: mapped for the life of the process, 8-byte aligned
//! (checked), and written only while their page is writable.
#![allow(unsafe_code)]

use super::stopped::with_world_stopped;
use crate::error::{Error, ErrorKind, Result};
use crate::sys::memory::{self, Protection};
use crate::write;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// One slot to change.
#[derive(Debug, Clone, Copy)]
pub(super) struct SlotEdit {
    pub slot: usize,
    /// What it must hold (`None`: whatever it holds).
    pub expected: Option<usize>,
    pub new: usize,
}

fn slot_word(slot: usize) -> &'static AtomicU64 {
    // SAFETY: `slot` is an aligned word of the executable's `.got` (module docs; alignment is
    // checked by `store`), mapped for the life of the process; AtomicU64 has u64's layout.
    unsafe { &*(slot as *const AtomicU64) }
}

fn mismatch(edit: &SlotEdit, found: usize) -> Error {
    Error::new(ErrorKind::UnexpectedSlot {
        slot: edit.slot,
        expected: edit.expected.unwrap_or(found),
        found,
    })
}

/// Checks that every slot holds what it must, without writing.
pub(super) fn validate(edits: &[SlotEdit]) -> Result<()> {
    for edit in edits {
        check_aligned(edit)?;
        let found = slot_word(edit.slot).load(Ordering::Acquire) as usize;
        if edit.expected.is_some_and(|e| e != found) {
            return Err(mismatch(edit, found));
        }
    }
    Ok(())
}

fn check_aligned(edit: &SlotEdit) -> Result<()> {
    if !edit.slot.is_multiple_of(8) {
        return Err(Error::new(ErrorKind::InvalidArgument {
            reason: format!("slot {:#x} is not 8-byte aligned", edit.slot),
        }));
    }
    Ok(())
}

/// Stores every edit, all or nothing: a slot that does not hold what it must refuses the batch
/// and the slots already stored get their values back. Returns the values the slots held.
pub(super) fn store(edits: &[SlotEdit]) -> Result<Vec<usize>> {
    if edits.is_empty() {
        return Ok(Vec::new());
    }
    validate(edits)?;
    let writer = write::lock();
    if writer.via_proc_mem() {
        return store_stopped(edits);
    }
    let runs = writable_runs(edits)?;
    let mut opened: Vec<(Range<usize>, Protection)> = Vec::with_capacity(runs.len());
    for (range, protection) in &runs {
        let writable = Protection {
            write: true,
            ..*protection
        };
        // SAFETY: the range holds GOT slots only (validated above), data no code executes; it
        // stays readable, and its protection is given back by `close` on every path.
        if let Err(e) = unsafe { memory::mprotect(range.clone(), writable) } {
            let _ = close(&opened);
            if matches!(e.kind(), ErrorKind::Os { errno, .. } if *errno == libc::EACCES) {
                return store_stopped(edits);
            }
            return Err(e);
        }
        opened.push((range.clone(), *protection));
    }
    let mut before = Vec::with_capacity(edits.len());
    let mut refused = None;
    for edit in edits {
        let word = slot_word(edit.slot);
        let current = word.load(Ordering::Acquire);
        let expected = edit.expected.map_or(current, |e| e as u64);
        match word.compare_exchange(
            expected,
            edit.new as u64,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            Ok(old) => before.push(old as usize),
            Err(found) => {
                refused = Some(mismatch(edit, found as usize));
                break;
            }
        }
    }
    if refused.is_some() {
        // Undo in reverse: the slots stored get their values back.
        for (edit, &old) in edits.iter().zip(&before).rev() {
            slot_word(edit.slot).store(old as u64, Ordering::SeqCst);
        }
    }
    let closed = close(&opened);
    drop(writer);
    match refused {
        Some(e) => Err(e),
        None => closed.map(|()| before),
    }
}

/// Gives the runs their protection back.
fn close(opened: &[(Range<usize>, Protection)]) -> Result<()> {
    let mut result = Ok(());
    for (range, protection) in opened {
        // SAFETY: gives GOT pages back the protection they had before `store` opened them.
        if let Err(e) = unsafe { memory::mprotect(range.clone(), *protection) } {
            result = Err(e);
        }
    }
    result
}

/// The runs of contiguous pages (one mapping, one protection) holding the slots, with the
/// protection each has now; only the non-writable ones.
fn writable_runs(edits: &[SlotEdit]) -> Result<Vec<(Range<usize>, Protection)>> {
    let page = memory::page_size();
    let maps = memory::mappings()?;
    let mut pages: Vec<usize> = edits.iter().map(|e| memory::page_of(e.slot)).collect();
    pages.sort_unstable();
    pages.dedup();
    let mut runs: Vec<(Range<usize>, Protection, usize)> = Vec::new();
    for p in pages {
        let mapping = memory::mapping_containing(&maps, p)
            .filter(|m| m.protection.read && !m.protection.exec)
            .ok_or_else(|| {
                Error::new(ErrorKind::InvalidArgument {
                    reason: format!("slot page {p:#x} is not a readable data mapping"),
                })
            })?;
        if mapping.protection.write {
            continue;
        }
        match runs.last_mut() {
            Some((range, protection, start))
                if range.end == p
                    && *protection == mapping.protection
                    && *start == mapping.range.start =>
            {
                range.end = p + page
            }
            _ => runs.push((p..p + page, mapping.protection, mapping.range.start)),
        }
    }
    Ok(runs.into_iter().map(|(r, p, _)| (r, p)).collect())
}

/// The fallback: through `/proc/self/mem`, with the world stopped.
fn store_stopped(edits: &[SlotEdit]) -> Result<Vec<usize>> {
    let mut before: Vec<usize> = edits
        .iter()
        .map(|e| slot_word(e.slot).load(Ordering::Acquire) as usize)
        .collect();
    // Open the file now (writing a slot its own value): nothing may allocate while stopped.
    // SAFETY: writes a validated GOT slot its own current value: no reader sees a change.
    unsafe { memory::write_via_proc_mem(edits[0].slot, &before[0].to_le_bytes()) }?;
    let (outcome, _) = with_world_stopped(|_| -> Result<()> {
        for (edit, old) in edits.iter().zip(before.iter_mut()) {
            *old = slot_word(edit.slot).load(Ordering::Acquire) as usize;
            if edit.expected.is_some_and(|e| e != *old) {
                return Err(mismatch(edit, *old));
            }
        }
        for (i, edit) in edits.iter().enumerate() {
            let new = edit.new.to_le_bytes();
            // SAFETY: a validated GOT slot, written whole with every other thread stopped, with
            // the address of a version of the function it held (the caller's typed edits).
            let written = unsafe { memory::write_via_proc_mem(edit.slot, &new) };
            if let Err(e) = written {
                for (edit, old) in edits[..i].iter().zip(&before).rev() {
                    // SAFETY: gives the slots already written their old values back.
                    let _ = unsafe { memory::write_via_proc_mem(edit.slot, &old.to_le_bytes()) };
                }
                return Err(e);
            }
        }
        Ok(())
    })?;
    outcome.map(|()| before)
}
