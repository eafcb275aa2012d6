//! Per-thread counters that generated code increments without a lock or a call.
//!
//! Each thread that runs a detour trampoline owns a **block** of [`SLOTS`] 64-bit words; a
//! [`Counter`] is one slot index, the same in every block. The trampoline finds the calling
//! thread's block through a thread-local pointer at a fixed offset from the thread pointer
//! (`mov r11, fs:[offset]`) and increments its slot with a plain `inc` — no `lock`, no shared
//! cache line, so four threads counting calls of one function do not slow each other down.
//!
//! A thread without a block (its first probed call) counts in the counter's shared word with
//! `lock inc` and *adopts* a block ([`adopt`], called by the trampoline with the argument
//! registers saved). When the thread exits, its block returns to a pool and the next new thread
//! adopts it, continuing its sums; blocks are never freed. [`Counter::get`] sums the shared word
//! and the slot of every block ever made, so a reading is exact (a sum over threads, including
//! exited ones) once the increments it should include have happened-before it (e.g. their
//! threads were joined, or the world was stopped).
//!
//! A slot index is reused only after the counter is dropped, which the trampoline's owner does
//! once no thread can run the trampoline; the slot is zeroed in every block then.
//!
//! The block pointer is a field of the thread state generated code reads ([`crate::thread_state`]).
//! If that is not at one fixed offset from the thread pointer in every thread (the crate linked
//! into a library loaded with `dlopen`), or more than [`SLOTS`] counters are alive, counters fall
//! back to the shared word ([`Counter::per_thread`] is false).
//!
//! # Safety
//!
//! Blocks are leaked (`'static`). A slot in use is written only by the thread that owns the
//! block (generated code, a plain `inc`: an aligned 8-byte store, which readers on other threads
//! load atomically); a free slot, which no code increments, is zeroed in every block under the
//! pool lock. The thread-local offset is checked on two threads before any code uses it
//! ([`crate::thread_state::offset`]).
#![allow(unsafe_code)]

use crate::thread_state::{self, Locked, Unprobed};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Counter slots per thread block.
pub const SLOTS: usize = 2048;

type Block = [AtomicU64; SLOTS];

struct Pool {
    all: Vec<&'static Block>,
    free: Vec<&'static Block>,
    free_slots: Vec<usize>,
    next_slot: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    all: Vec::new(),
    free: Vec::new(),
    free_slots: Vec::new(),
    next_slot: 0,
});

fn pool() -> Locked<'static, Pool> {
    Locked::new(&POOL)
}

thread_local! {
    /// Returns the block to the pool when the thread exits.
    static OWNER: Owner = const { Owner(Cell::new(0)) };
}

struct Owner(Cell<usize>);

impl Drop for Owner {
    fn drop(&mut self) {
        let block = self.0.replace(0);
        if block != 0 {
            // Generated code run by a later destructor of this thread adopts no block again
            // (OWNER is gone) and counts in shared words. The pool's vector may allocate:
            // probes are off meanwhile (a probed `malloc` must not come back here).
            let _unprobed = Unprobed::enter();
            thread_state::with(|s| s.counters.set(0));
            // SAFETY: `block` came from the pool's leaked blocks (see `adopt`).
            pool().free.push(unsafe { &*(block as *const Block) });
        }
    }
}

/// The offset of the thread's block pointer from the thread pointer, if generated code may use
/// it (see [`crate::thread_state::offset`]).
pub(crate) fn tls_offset() -> Option<i32> {
    thread_state::offset().map(|o| o + thread_state::COUNTERS)
}

/// Gives the calling thread a block (called by trampolines, with the arguments saved and probes
/// off for the thread, when it has none). Does nothing while the thread is exiting.
pub(crate) extern "C" fn adopt() {
    if !thread_state::at_offset() {
        return;
    }
    let _unprobed = Unprobed::enter();
    let _ = OWNER.try_with(|owner| {
        if owner.0.get() != 0 {
            return;
        }
        let block = {
            let mut p = pool();
            match p.free.pop() {
                Some(b) => b,
                None => {
                    let b: &'static Block =
                        Box::leak(Box::new([const { AtomicU64::new(0) }; SLOTS]));
                    p.all.push(b);
                    b
                }
            }
        };
        let address = block as *const Block as usize;
        owner.0.set(address);
        thread_state::with(|s| s.counters.set(address));
    });
}

/// Every thread block, locked: take it *before* stopping the world to sum counters inside the
/// stop ([`Counter::get_in`]), which then takes no lock.
pub(crate) struct Blocks<'a>(Locked<'a, Pool>);

pub(crate) fn blocks() -> Blocks<'static> {
    Blocks(pool())
}

/// A count that generated code increments per thread (see the module docs).
#[derive(Debug)]
pub struct Counter {
    shared: AtomicU64,
    slot: Option<usize>,
}

impl Counter {
    /// A new counter at zero (per thread if a slot is free and thread-local storage allows).
    pub fn new() -> Counter {
        let slot = tls_offset().and_then(|_| {
            let mut p = pool();
            p.free_slots.pop().or_else(|| {
                (p.next_slot < SLOTS).then(|| {
                    p.next_slot += 1;
                    p.next_slot - 1
                })
            })
        });
        Counter {
            shared: AtomicU64::new(0),
            slot,
        }
    }

    /// Whether generated code counts in per-thread slots (else in the shared word).
    pub fn per_thread(&self) -> bool {
        self.slot.is_some()
    }

    /// The count: the shared word plus this counter's slot in every thread block.
    pub fn get(&self) -> u64 {
        let mut sum = self.shared.load(Ordering::SeqCst);
        if let Some(slot) = self.slot {
            for block in &pool().all {
                sum = sum.wrapping_add(block[slot].load(Ordering::Relaxed));
            }
        }
        sum
    }

    /// [`Counter::get`] with the blocks already locked (allocates nothing, takes no lock).
    pub(crate) fn get_in(&self, blocks: &Blocks<'_>) -> u64 {
        let mut sum = self.shared.load(Ordering::SeqCst);
        if let Some(slot) = self.slot {
            for block in &blocks.0.all {
                sum = sum.wrapping_add(block[slot].load(Ordering::Relaxed));
            }
        }
        sum
    }

    /// Adds one from Rust (the shared word).
    pub fn increment(&self) {
        self.shared.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn shared_address(&self) -> usize {
        &self.shared as *const AtomicU64 as usize
    }

    /// Byte offset of the slot in a block.
    pub(crate) fn slot_offset(&self) -> Option<i32> {
        self.slot.map(|s| (s * 8) as i32)
    }
}

impl Default for Counter {
    fn default() -> Counter {
        Counter::new()
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            let mut p = pool();
            for block in &p.all {
                block[slot].store(0, Ordering::Relaxed);
            }
            p.free_slots.push(slot);
        }
    }
}
