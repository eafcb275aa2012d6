//! The memory protocol between the patcher and the `SIGTRAP` handler: trap slots and the write
//! epoch. Pure memory ordering, no system calls: model-checked with loom (`tests` below, run
//! with `--features loom`, see [`crate::sync`]).
//!
//! # The shared state
//!
//! - A [`Table`] of [`Slot`]s, one per site ever written through the int3 protocol. A slot's
//!   `key` is the site's address (0: empty), `pending` the instruction a thread that traps there
//!   must run instead (`ARMED` set), or nothing (`ARMED` clear).
//! - The [`WriteEpoch`], a counter that is odd while an int3 write is in flight.
//! - The first byte of each site, which the writer sets to `int3` and back. In the real engine
//!   it is a code byte accessed as an `AtomicU8` ([`crate::sys::memory`]); here it is whatever
//!   the caller's `first_byte` closure reads.
//!
//! Only the writer (one at a time: the engine's write lock) stores to any of them.
//!
//! # The writer, per site (see [`crate::write`] for the core syncs between the steps)
//!
//! 1. `Table::insert(site)`: `key` stored with `Release`, before the site ever holds `int3`, so
//!    a handler that observes the `int3` (an `Acquire` load, step 3) finds the key.
//! 2. `WriteEpoch::begin` (odd), then `Slot::arm(new)`: `pending` stored with `Release`.
//! 3. Store `int3` on the first byte with `Release`: every earlier store (key, epoch, arm)
//!    happens-before any handler that reads this `int3` with `Acquire`.
//! 4. Store the tail, then the new first byte (`Release`).
//! 5. `Slot::disarm()` with `Release`, after the new first byte: a handler that reads
//!    the disarmed value with `Acquire` then reads the new first byte (or a later one).
//! 6. `WriteEpoch::end` (even) with `Release`, after every disarm: a handler that reads the even
//!    value with `Acquire` then sees every first byte as this write left it.
//!
//! A rollback (a write that fails part-way) is the same sequence with the old bytes, inside the
//! same epoch, with the slot re-armed with the old instruction.
//!
//! # The handler ([`resolve`])
//!
//! A thread trapped on an `int3` at `site`; its signal may be delivered long after. The handler
//! loads the epoch (`e1`), then the first byte, then `pending`, all `Acquire`:
//!
//! - **Not `int3`**: the write completed after the trap. The thread re-executes the site, which
//!   now holds a whole instruction ([`Resolution::Rewind`]).
//! - **`int3`, armed**: a write is in flight; run the pending instruction
//!   ([`Resolution::Emulate`]). Arming precedes the `int3` (step 2 before 3), and whichever
//!   pending value is read (the new or, during a rollback, the old instruction) is one the site
//!   holds before or after the write: both are correct for a thread arriving now.
//! - **`int3`, not armed**: load the epoch again (`e2`). If `e1 == e2` and even, the `int3` is
//!   not the engine's (a debugger's breakpoint, the program's own) ([`Resolution::NotOurs`]):
//!   had a writer stored it, the `Acquire` read of that `int3` would make the writer's `begin`
//!   visible to `e2` (so `e2` would be odd or larger than `e1`); and had that writer already
//!   ended at `e1`, its final first byte would be visible instead of the `int3`. Otherwise a
//!   write is in flight (or just finished): wait and look again. The writer never waits for a
//!   handler, so the wait ends when its write does.
//!
//! The handler therefore never spins on an `int3` nobody will remove, and never takes a trap of
//! the engine's for a foreign one.

use crate::sync::{AtomicU64, AtomicUsize, Ordering};

/// The `int3` opcode.
pub(crate) const INT3: u8 = 0xcc;
/// Length of a site's instruction.
const SITE_LEN: usize = 5;
/// Set in `pending` while the slot is armed.
const ARMED: u64 = 1 << 63;

/// One site's entry: its address and the instruction a trapping thread must run.
pub(crate) struct Slot {
    key: AtomicUsize,
    pending: AtomicU64,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            key: AtomicUsize::new(0),
            pending: AtomicU64::new(0),
        }
    }

    /// Tells a thread that traps at this site to run `insn` (writer step 2).
    pub(crate) fn arm(&self, insn: [u8; SITE_LEN]) {
        let mut word = [0u8; 8];
        word[..SITE_LEN].copy_from_slice(&insn);
        // Release: ordered before the `int3` store that makes the arm matter (step 3), and
        // carries the epoch's `begin` with it.
        self.pending
            .store(u64::from_le_bytes(word) | ARMED, Ordering::Release);
    }

    /// Ends the write at this site (writer step 5).
    pub(crate) fn disarm(&self) {
        // Release: the site's new first byte happens-before a handler that reads "disarmed".
        self.pending.store(0, Ordering::Release);
    }

    /// The instruction a trapping thread would run now, if armed.
    pub(crate) fn armed(&self) -> Option<[u8; SITE_LEN]> {
        decode_pending(self.pending.load(Ordering::Acquire))
    }

    /// The site's address (0 for an empty slot).
    pub(crate) fn key(&self) -> usize {
        self.key.load(Ordering::Acquire)
    }
}

fn decode_pending(pending: u64) -> Option<[u8; SITE_LEN]> {
    if pending & ARMED == 0 {
        return None;
    }
    let b = pending.to_le_bytes();
    Some([b[0], b[1], b[2], b[3], b[4]])
}

/// An open-addressing hash table of slots; the handler only reads it (async-signal-safe).
pub(crate) struct Table {
    mask: usize,
    slots: Box<[Slot]>,
}

impl Table {
    /// A table of `capacity` (a power of two) empty slots.
    pub(crate) fn with_capacity(capacity: usize) -> Table {
        assert!(capacity.is_power_of_two());
        Table {
            mask: capacity - 1,
            slots: (0..capacity).map(|_| Slot::new()).collect(),
        }
    }

    /// Number of slots.
    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn index(&self, key: usize) -> usize {
        // Fibonacci hashing spreads nearby code addresses over the table.
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 17) & self.mask
    }

    /// The slot of `key`, if present. Async-signal-safe: loads only.
    pub(crate) fn find(&self, key: usize) -> Option<&Slot> {
        let mut i = self.index(key);
        for _ in 0..self.slots.len() {
            let slot = &self.slots[i];
            // Acquire: pairs with the Release in `insert` (step 1).
            match slot.key.load(Ordering::Acquire) {
                0 => return None,
                k if k == key => return Some(slot),
                _ => i = (i + 1) & self.mask,
            }
        }
        None
    }

    /// Inserts `key` (absent; the table has a free slot). Writer only.
    pub(crate) fn insert(&self, key: usize) -> &Slot {
        let mut i = self.index(key);
        while self.slots[i].key.load(Ordering::Relaxed) != 0 {
            i = (i + 1) & self.mask;
        }
        // Release: a handler that finds the key (Acquire) sees an initialised slot.
        self.slots[i].key.store(key, Ordering::Release);
        &self.slots[i]
    }

    /// Every occupied slot.
    pub(crate) fn occupied(&self) -> impl Iterator<Item = &Slot> {
        self.slots
            .iter()
            .filter(|s| s.key.load(Ordering::Acquire) != 0)
    }
}

/// Odd while an int3 write (or its rollback) is in flight; only the writer changes it.
pub(crate) struct WriteEpoch(AtomicU64);

impl WriteEpoch {
    /// Epoch 0: no write in flight.
    #[cfg(not(feature = "loom"))]
    pub(crate) const fn new() -> WriteEpoch {
        WriteEpoch(AtomicU64::new(0))
    }

    /// Epoch 0: no write in flight (loom's atomics are not `const`; only the model makes one).
    #[cfg(feature = "loom")]
    #[allow(dead_code)]
    pub(crate) fn new() -> WriteEpoch {
        WriteEpoch(AtomicU64::new(0))
    }

    /// A write starts (writer step 2). Relaxed: the `Release` stores of the write that follow
    /// (arm, `int3`) carry it to any handler that reads them.
    pub(crate) fn begin(&self) {
        let was = self.0.fetch_add(1, Ordering::Relaxed);
        debug_assert!(was.is_multiple_of(2), "nested write");
    }

    /// The write ended: every site it touched holds a whole instruction and is disarmed (writer
    /// step 6). Release: a handler that reads the new value sees those bytes.
    pub(crate) fn end(&self) {
        let was = self.0.fetch_add(1, Ordering::Release);
        debug_assert!(!was.is_multiple_of(2), "end without begin");
    }

    /// The current value (Acquire).
    pub(crate) fn load(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// What the handler does with a thread that trapped at a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resolution {
    /// The write completed: re-execute the site.
    Rewind,
    /// Run this instruction instead of the site's.
    Emulate([u8; SITE_LEN]),
    /// The `int3` is not the engine's: pass the trap on.
    NotOurs,
}

/// Resolves a trap at the site of `slot` (see the module docs). `first_byte` loads the site's
/// first byte with `Acquire`; `wait` is called between attempts while a write is in flight.
pub(crate) fn resolve(
    slot: &Slot,
    epoch: &WriteEpoch,
    first_byte: impl Fn() -> u8,
    mut wait: impl FnMut(),
) -> Resolution {
    loop {
        let before = epoch.load();
        if first_byte() != INT3 {
            return Resolution::Rewind;
        }
        if let Some(insn) = slot.armed() {
            return Resolution::Emulate(insn);
        }
        let after = epoch.load();
        if before == after && before.is_multiple_of(2) {
            return Resolution::NotOurs;
        }
        wait();
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU8;

    #[test]
    fn table_finds_every_inserted_key() {
        let table = Table::with_capacity(8);
        for k in 1..=4usize {
            table.insert(k * 0x1000 + 3);
        }
        for k in 1..=4usize {
            assert!(table.find(k * 0x1000 + 3).is_some());
        }
        assert!(table.find(0x5003).is_none());
    }

    #[test]
    fn a_foreign_int3_with_no_write_in_flight_is_not_ours() {
        let table = Table::with_capacity(8);
        let slot = table.insert(0x1000);
        let epoch = WriteEpoch::new();
        let byte = AtomicU8::new(INT3);
        let resolution = resolve(slot, &epoch, || byte.load(Ordering::Acquire), || {});
        assert_eq!(resolution, Resolution::NotOurs);
    }

    #[test]
    fn an_armed_slot_is_emulated_and_a_finished_write_rewinds() {
        let table = Table::with_capacity(8);
        let slot = table.insert(0x1000);
        let epoch = WriteEpoch::new();
        let byte = AtomicU8::new(INT3);
        epoch.begin();
        slot.arm([0xe9, 1, 2, 3, 4]);
        let read = || byte.load(Ordering::Acquire);
        assert_eq!(
            resolve(slot, &epoch, read, || {}),
            Resolution::Emulate([0xe9, 1, 2, 3, 4])
        );
        byte.store(0xe9, Ordering::Release);
        slot.disarm();
        epoch.end();
        assert_eq!(resolve(slot, &epoch, read, || {}), Resolution::Rewind);
    }
}

/// The loom model: every interleaving of a writer and a handler, under the C++ memory model.
#[cfg(all(test, feature = "loom"))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicU8;
    use loom::sync::Arc;

    const OLD: [u8; SITE_LEN] = [0xe9, 0x10, 0, 0, 0];
    const NEW: [u8; SITE_LEN] = [0xe8, 0x20, 0, 0, 0];

    struct Shared {
        table: Table,
        epoch: WriteEpoch,
        /// The site's first byte (the tail is irrelevant to the handler).
        first: AtomicU8,
    }

    const SITE: usize = 0x4000;

    fn shared(first: u8) -> Arc<Shared> {
        Arc::new(Shared {
            table: Table::with_capacity(4),
            epoch: WriteEpoch::new(),
            first: AtomicU8::new(first),
        })
    }

    /// Writer steps 1-6 for one site, from `from` to `to`.
    fn write(s: &Shared, from: [u8; SITE_LEN], to: [u8; SITE_LEN]) {
        let slot = s.table.find(SITE).unwrap_or_else(|| s.table.insert(SITE));
        s.epoch.begin();
        slot.arm(to);
        s.first.store(INT3, Ordering::Release);
        let _ = from;
        s.first.store(to[0], Ordering::Release);
        slot.disarm();
        s.epoch.end();
    }

    /// A handler for a thread that executed the site and saw `int3`: the resolution must be a
    /// rewind (onto a whole instruction) or the emulation of a pending instruction; never "not
    /// ours".
    fn trap(s: &Shared) -> Resolution {
        let slot = s
            .table
            .find(SITE)
            .expect("a trapped site's key is published first");
        resolve(
            slot,
            &s.epoch,
            || s.first.load(Ordering::Acquire),
            loom::thread::yield_now,
        )
    }

    #[test]
    fn a_trap_on_the_writers_int3_is_never_taken_for_a_foreign_one() {
        loom::model(|| {
            let s = shared(OLD[0]);
            s.table.insert(SITE);
            let writer = {
                let s = s.clone();
                loom::thread::spawn(move || {
                    write(&s, OLD, NEW);
                    write(&s, NEW, OLD);
                })
            };
            // The caller executes the site: if it fetches `int3`, it traps.
            if s.first.load(Ordering::Acquire) == INT3 {
                match trap(&s) {
                    Resolution::Rewind => {}
                    Resolution::Emulate(insn) => assert!(insn == NEW || insn == OLD),
                    Resolution::NotOurs => panic!("the engine's int3 passed on as foreign"),
                }
            }
            writer.join().unwrap();
        });
    }

    #[test]
    fn a_foreign_int3_is_passed_on_while_another_site_is_written() {
        loom::model(|| {
            let s = shared(INT3);
            s.table.insert(SITE);
            s.table.insert(SITE + 64);
            let writer = {
                let s = s.clone();
                loom::thread::spawn(move || {
                    // A write at another site: the epoch goes odd and even again.
                    let other = s.table.find(SITE + 64).unwrap();
                    s.epoch.begin();
                    other.arm(NEW);
                    other.disarm();
                    s.epoch.end();
                })
            };
            // Never armed, never rewritten: the handler must end, passing the trap on.
            assert_eq!(trap(&s), Resolution::NotOurs);
            writer.join().unwrap();
        });
    }

    #[test]
    fn a_rollback_leaves_the_handler_emulating_a_whole_instruction() {
        loom::model(|| {
            let s = shared(OLD[0]);
            let slot = s.table.insert(SITE);
            let writer = {
                let s = s.clone();
                loom::thread::spawn(move || {
                    let slot = s.table.find(SITE).unwrap();
                    s.epoch.begin();
                    slot.arm(NEW);
                    s.first.store(INT3, Ordering::Release);
                    // The write fails here: roll back with the old instruction armed.
                    slot.arm(OLD);
                    s.first.store(OLD[0], Ordering::Release);
                    slot.disarm();
                    s.epoch.end();
                })
            };
            if s.first.load(Ordering::Acquire) == INT3 {
                match trap(&s) {
                    Resolution::Rewind => {}
                    Resolution::Emulate(insn) => assert!(insn == NEW || insn == OLD),
                    Resolution::NotOurs => panic!("rollback's int3 passed on as foreign"),
                }
            }
            writer.join().unwrap();
            assert_eq!(slot.armed(), None);
            assert_eq!(s.first.load(Ordering::Relaxed), OLD[0]);
        });
    }
}
