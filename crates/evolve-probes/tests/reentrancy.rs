//! Probes on the functions probes themselves use — `malloc`, `free`, `pthread_mutex_lock`,
//! `write`, the unwinder, the engine's exit hook — with every kind, while threads allocate,
//! lock, write and take backtraces. A hook that calls a probed function runs it unprobed (the
//! engine's re-entrancy guard), so nothing recurses or deadlocks, and every probe records.
//!
//! Calling threads: `EVOLVE_STRESS_THREADS` (default 4).

use evolve_probes::{add, read, remove, ProbeKind, ProbeReading};
use std::hint::black_box;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn threads() -> usize {
    std::env::var("EVOLVE_STRESS_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(4)
}

/// Timed by a latency probe while the exit hook is probed (so the exit path runs).
#[inline(never)]
pub fn reentrancy_timed(x: u64) -> u64 {
    black_box(x)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .rotate_left(7)
}

/// What the calling threads do: allocate and free, write, unwind, lock through the loader,
/// and call a timed function.
fn work(stop: &AtomicBool, rounds: &AtomicU64) {
    let mut sink = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .unwrap();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let v: Vec<u8> = vec![i as u8; 16 + (i % 512) as usize];
        black_box(&v);
        drop(v);
        sink.write_all(b"x").unwrap();
        black_box(reentrancy_timed as fn(u64) -> u64)(i);
        if i.is_multiple_of(64) {
            black_box(std::backtrace::Backtrace::force_capture().to_string());
            // `dl_iterate_phdr` takes the loader's lock with `pthread_mutex_lock` (the unwinder
            // locks its own mutex too, but a hit from inside the unwinder takes no backtrace).
            black_box(evolve_code::inspect::images().unwrap().len());
        }
        i += 1;
        rounds.fetch_add(1, Ordering::Relaxed);
    }
}

/// Whether a reading shows what its kind records. A predicate's hits from inside the unwinder
/// take no backtrace (the unwinder may hold its own lock there): `_Unwind_Find_FDE` is only
/// ever called from the unwinder.
fn recorded(kind: &ProbeKind, r: &ProbeReading) -> bool {
    match kind {
        ProbeKind::Count => r.calls > 0,
        ProbeKind::Latency => r.latency.as_ref().is_some_and(|l| l.count > 0),
        ProbeKind::Histogram { .. } => r.histogram.iter().any(|b| b.1 > 0),
        ProbeKind::Predicate { .. } if r.function == "_Unwind_Find_FDE" => {
            r.hits > 0 && r.backtraces.is_empty()
        }
        ProbeKind::Predicate { .. } => r.hits > 0 && !r.backtraces.is_empty(),
        ProbeKind::Coverage => r.covered,
    }
}

/// Stops the workers when dropped, also when an assertion fails (else the scope would wait for
/// them forever).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What a probe on a function must show.
#[derive(Clone, Copy, PartialEq)]
enum Expect {
    /// What its kind records.
    Records,
    /// Nothing: the function only ever runs with probes off for its thread (the exit path of
    /// timed calls runs the engine's exit hook so), while the timed calls go on being timed.
    Unprobed,
}

/// Probes `pattern` with every kind in turn while the workers run; each probe must show what
/// `expect` says.
fn every_kind_on(pattern: &str, expect: Expect) {
    let kinds: Vec<ProbeKind> = ["count", "latency", "hist:arg0", "pred:arg0>0", "coverage"]
        .iter()
        .map(|k| k.parse().unwrap())
        .collect();
    let stop = AtomicBool::new(false);
    let rounds = AtomicU64::new(0);
    // The exit hook runs only for timed calls.
    let timed = add("*::reentrancy_timed", ProbeKind::Latency).unwrap()[0];
    std::thread::scope(|s| {
        for _ in 0..threads() {
            s.spawn(|| work(&stop, &rounds));
        }
        let _stop = StopOnDrop(&stop);
        for kind in &kinds {
            let ids = add(pattern, *kind)
                .unwrap_or_else(|e| panic!("cannot probe {pattern} with {kind}: {e}"));
            let id = ids[0];
            let start = rounds.load(Ordering::Relaxed);
            let deadline = Instant::now() + Duration::from_secs(60);
            let reading = loop {
                let r = read(id).unwrap();
                let done = match expect {
                    Expect::Records => recorded(kind, &r),
                    Expect::Unprobed => read(timed).unwrap().latency.unwrap().count > 1000,
                };
                // Some rounds of work with the probe in place, and what it must show.
                if rounds.load(Ordering::Relaxed) > start + 200 && done {
                    break r;
                }
                assert!(
                    Instant::now() < deadline,
                    "{kind} on {pattern} recorded nothing: {r:?}"
                );
                std::thread::sleep(Duration::from_millis(5));
            };
            match expect {
                Expect::Records => {
                    assert!(
                        reading.calls > 0 || *kind == ProbeKind::Coverage,
                        "{reading:?}"
                    )
                }
                Expect::Unprobed => assert!(
                    reading.calls == 0 && !reading.covered && reading.hits == 0,
                    "{reading:?}"
                ),
            }
            for id in ids {
                remove(id).unwrap();
            }
        }
    });
    let timed = read(timed).unwrap();
    assert!(timed.latency.unwrap().count > 0);
    remove(timed.id).unwrap();
    evolve_code::reclaim_trampolines();
}

#[test]
fn probes_on_malloc_free_locks_write_the_unwinder_and_the_exit_hook_neither_recurse_nor_deadlock() {
    for pattern in [
        "malloc",
        "free",
        "pthread_mutex_lock",
        "write",
        "_Unwind_Find_FDE",
        "*evolve_code::inspect::images",
    ] {
        every_kind_on(pattern, Expect::Records);
    }
    // The engine's exit hook: it runs for every timed return, always with probes off.
    every_kind_on("*evolve_code::shadow::exit_hook", Expect::Unprobed);
}
