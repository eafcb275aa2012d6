//! Probes free what they allocated when they go: 10 000 add/remove cycles of latency and
//! histogram probes on a function that keeps another probe (so its point, and its list of
//! probes, stay) while threads call it, and the process's memory stays within a stated bound.
//!
//! Before: every latency probe leaked its sink, and every version of a point's probe list (and
//! every probe it held) was kept until the point went — about 1.7 KB per cycle, 17 MB here.
//!
//! Calling threads: `EVOLVE_STRESS_THREADS` (default 4).

use evolve_probes::{add, read, remove, ProbeKind};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};

/// The probed function: never inlined, so every call goes through its patched entry.
#[inline(never)]
pub fn reclamation_target(x: u64, y: u64) -> u64 {
    black_box(x).wrapping_mul(y | 1).rotate_left(11) ^ y
}

fn threads() -> usize {
    std::env::var("EVOLVE_STRESS_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(4)
}

/// Resident memory in bytes (`/proc/self/statm`).
fn resident() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// RSS may grow by at most this over 10 000 cycles after the warm-up.
const BOUND: u64 = 4 << 20;

#[test]
fn ten_thousand_add_remove_cycles_free_probe_lists_and_latency_sinks() {
    let keeper = add("*::reclamation_target", ProbeKind::Count).unwrap()[0];
    let stop = AtomicBool::new(false);
    let f = black_box(reclamation_target as fn(u64, u64) -> u64);
    let cycle = |i: u64| {
        let kind = if i.is_multiple_of(2) {
            ProbeKind::Latency
        } else {
            ProbeKind::Histogram { arg: 1 }
        };
        let id = add("*::reclamation_target", kind).unwrap()[0];
        f(i, i);
        remove(id).unwrap();
    };
    let (before, after) = std::thread::scope(|s| {
        for t in 0..threads() as u64 {
            let stop = &stop;
            s.spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    black_box(f(i, t));
                    i += 1;
                    if i.is_multiple_of(256) {
                        // More threads than cores: let the cycling thread run too.
                        std::thread::yield_now();
                    }
                }
            });
        }
        // Warm-up: pools, caches and allocator arenas reach their working size.
        for i in 0..1_000 {
            cycle(i);
        }
        evolve_code::reclaim_trampolines();
        let before = resident();
        for i in 0..10_000 {
            cycle(i);
        }
        evolve_code::reclaim_trampolines();
        let after = resident();
        stop.store(true, Ordering::Relaxed);
        (before, after)
    });
    assert!(read(keeper).unwrap().calls > 11_000);
    remove(keeper).unwrap();
    evolve_code::reclaim_trampolines();
    // Every retired latency sink is freed once no thread is inside a timed call.
    assert_eq!(evolve_code::shadow::retired_sinks(), 0);
    let growth = after.saturating_sub(before);
    assert!(
        growth <= BOUND,
        "resident memory grew by {growth} bytes over 10 000 cycles (bound {BOUND})"
    );
}
