//! The fault-injection matrix: a batch of mixed sites whose n-th system call of one kind fails
//! (or panics), for every n, while threads call through every site. Shared by the test binaries
//! that write with `mprotect` windows and through `/proc/self/mem`.

use super::{
    call_thunk, far_from_executable, forty_two_near, hammer_checked, nop_thunk, one, retarget_in,
    threads, two, F,
};
use evolve_code::fault_injection::{self, Failure, Syscall};
use evolve_code::{Batch, FnSite, PatchSite, Placement, SiteInsn, SITE_LEN};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

/// Every kind of site the engine writes: aligned jumps (atomic store), cross-word jumps (int3),
/// calls of both placements, a call that becomes a NOP, and a jump to a target beyond rel32
/// reach (through a springboard, a new one for every batch).
pub struct Mixed {
    jumps: Vec<FnSite<F>>,
    calls: Vec<PatchSite>,
    nops: Vec<PatchSite>,
    far_site: FnSite<F>,
    far_base: usize,
    entries: Vec<F>,
}

/// What a failed batch must leave exactly as it found.
#[derive(Debug, PartialEq, Eq)]
pub struct Observed {
    bytes: Vec<[u8; SITE_LEN]>,
    insns: Vec<SiteInsn>,
    results: Vec<u64>,
    protections: Vec<String>,
    traps: fault_injection::TrapTable,
}

impl Mixed {
    pub fn new() -> Mixed {
        let placements = [Placement::Aligned, Placement::CrossWord];
        let jumps: Vec<FnSite<F>> = placements
            .iter()
            .flat_map(|&p| [p, p])
            .map(|p| FnSite::with_placement(one as F, p).unwrap())
            .collect();
        let (call_entries, calls): (Vec<F>, Vec<PatchSite>) =
            placements.iter().map(|&p| call_thunk(one, p)).unzip();
        let (nop_entries, nops): (Vec<F>, Vec<PatchSite>) =
            placements.iter().map(|&p| nop_thunk(two, p)).unzip();
        let far_site = FnSite::with_placement(one as F, Placement::CrossWord).unwrap();
        let entries = jumps
            .iter()
            .map(|s| s.entry())
            .chain(call_entries)
            .chain(nop_entries)
            .chain([far_site.entry()])
            .collect();
        Mixed {
            jumps,
            calls,
            nops,
            far_site,
            far_base: far_from_executable(),
            entries,
        }
    }

    /// A fresh function beyond rel32 reach of every site (so the batch publishes a springboard).
    pub fn fresh_far(&self) -> F {
        forty_two_near(self.far_base)
    }

    /// Everything from its original instruction to the new one.
    pub fn forward(&self, far: F) -> Batch {
        let mut batch = Batch::new();
        for s in &self.jumps {
            s.retarget_in(&mut batch, one, two);
        }
        for &s in &self.calls {
            let (from, to) = (
                SiteInsn::Call(one as F as usize),
                SiteInsn::Call(two as F as usize),
            );
            retarget_in(&mut batch, s, from, to);
        }
        for &s in &self.nops {
            retarget_in(
                &mut batch,
                s,
                SiteInsn::Call(two as F as usize),
                SiteInsn::Nop,
            );
        }
        self.far_site.retarget_in(&mut batch, one, far);
        batch
    }

    /// Everything back to its original bytes.
    pub fn backward(&self) -> Batch {
        let mut batch = Batch::new();
        for s in &self.jumps {
            s.restore_in(&mut batch);
        }
        for &s in self.calls.iter().chain(&self.nops) {
            batch.restore(s);
        }
        self.far_site.restore_in(&mut batch);
        batch
    }

    fn views(&self) -> Vec<evolve_code::SiteView> {
        self.jumps
            .iter()
            .map(|s| s.site())
            .chain(self.calls.iter().chain(&self.nops).map(|s| s.view()))
            .chain([self.far_site.site()])
            .collect()
    }

    /// The state a failed batch must leave unchanged.
    pub fn observe(&self) -> Observed {
        let views = self.views();
        let pages: Vec<usize> = views
            .iter()
            .flat_map(|v| [v.address(), v.address() + SITE_LEN - 1])
            .map(|a| a & !4095)
            .collect();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let protections = maps
            .lines()
            .filter(|line| {
                let range = line.split(' ').next().unwrap();
                let (start, end) = range.split_once('-').unwrap();
                let (start, end) = (
                    usize::from_str_radix(start, 16).unwrap(),
                    usize::from_str_radix(end, 16).unwrap(),
                );
                pages.iter().any(|p| (start..end).contains(p))
            })
            .map(|line| line.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .collect();
        Observed {
            bytes: views.iter().map(|v| v.bytes()).collect(),
            insns: views.iter().map(|v| v.current()).collect(),
            results: self.entries.iter().map(|f| f()).collect(),
            protections,
            traps: fault_injection::trap_table(),
        }
    }

    /// Calls of `syscall` that one forward batch makes (run, counted, and undone).
    pub fn calls_per_batch(&self, syscall: Syscall) -> u64 {
        let batch = self.forward(self.fresh_far());
        fault_injection::reset();
        batch.apply().unwrap();
        let n = fault_injection::calls(syscall);
        self.backward().apply().unwrap();
        n
    }
}

/// For every n up to the number of `syscall`s a batch of [`Mixed`] sites makes: the n-th fails
/// as `failure` while threads call through every site. A batch that fails must leave bytes,
/// instructions, results, page protections and the trap table exactly as before; one that
/// succeeds anyway (a failed `mprotect` that restores a protection is retried) must be
/// complete. Returns (failed batches, batches that completed).
pub fn matrix(syscall: Syscall, failure: Failure) -> (u64, u64) {
    let mixed = Mixed::new();
    // Warm up: the trap table learns the int3 sites (keys are never removed, by design: a late
    // trap must still find its site), the engine its pages.
    mixed.forward(mixed.fresh_far()).apply().unwrap();
    mixed.backward().apply().unwrap();
    let count = mixed.calls_per_batch(syscall);
    assert!(count > 0, "a batch makes no {syscall:?} call");
    let (mut failed, mut completed) = (0, 0);
    let valid = |r: u64| matches!(r, 1 | 2 | 42);
    let rounds = count as usize;
    hammer_checked(
        &mixed.entries,
        threads(),
        rounds,
        Duration::from_secs(120),
        valid,
        |i| {
            let n = i as u64 + 1;
            let far = mixed.fresh_far();
            let before = mixed.observe();
            let batch = mixed.forward(far);
            fault_injection::fail_nth(syscall, n, failure);
            let outcome = catch_unwind(AssertUnwindSafe(|| batch.apply()));
            fault_injection::reset();
            match outcome {
                Ok(Ok(report)) => {
                    completed += 1;
                    assert_eq!(report.changed, mixed.entries.len());
                    let after = mixed.observe();
                    assert_eq!(after.protections, before.protections, "n = {n}");
                    assert_eq!(after.traps, before.traps, "n = {n}");
                    assert!(after
                        .insns
                        .iter()
                        .all(|i| *i != SiteInsn::Jmp(one as F as usize)));
                    mixed.backward().apply().unwrap();
                }
                Ok(Err(e)) => {
                    failed += 1;
                    eprintln!("{syscall:?} #{n} of {count} failed: {e}");
                    assert_eq!(mixed.observe(), before, "{syscall:?} #{n}: {e}");
                }
                Err(_) => {
                    let after = mixed.observe();
                    assert_eq!(after.protections, before.protections, "n = {n}");
                    assert_eq!(after.traps, before.traps, "n = {n}");
                    if after.insns == before.insns {
                        failed += 1;
                        assert_eq!(after, before, "{syscall:?} #{n} panicked");
                    } else {
                        // The panic came after every byte was written (closing the window):
                        // the batch is complete and recorded.
                        completed += 1;
                        assert!(after
                            .insns
                            .iter()
                            .all(|i| *i != SiteInsn::Jmp(one as F as usize)));
                        mixed.backward().apply().unwrap();
                    }
                }
            }
        },
    );
    eprintln!("{syscall:?} ({failure:?}): {count} calls per batch, {failed} failed, {completed} completed");
    assert_eq!(failed + completed, count, "every n was tried");
    (failed, completed)
}
