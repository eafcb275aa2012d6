//! Probes on prepared functions: `#[evolve::hot]` and `#[evolve::multiverse]` functions are
//! probed through their entry stub, and keep working while the stub is retargeted (a hot
//! version applied or reverted, a multiverse commit or revert) under the probe.

use evolve::code::stub::{Stub, STUBS};
use evolve::code::Batch;
use evolve::multiverse as mv;
use evolve_probes::{add, read, remove, ProbeKind};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The hot function under probe.
#[evolve::hot]
pub fn hot_square(x: u64) -> u64 {
    black_box(x).wrapping_mul(x).wrapping_add(1)
}

/// Same signature: stands in for a new version of `hot_square` (its implementation is a valid
/// target of `hot_square`'s stub, exactly as a patch's would be).
#[evolve::hot]
pub fn hot_cube(x: u64) -> u64 {
    black_box(x).wrapping_mul(x).wrapping_mul(x).wrapping_add(2)
}

fn square(x: u64) -> u64 {
    x.wrapping_mul(x).wrapping_add(1)
}

fn cube(x: u64) -> u64 {
    x.wrapping_mul(x).wrapping_mul(x).wrapping_add(2)
}

/// Calls the hot function (a direct call of its stub); named in predicate backtraces.
#[inline(never)]
pub fn caller_of_hot_square(x: u64) -> u64 {
    hot_square(black_box(x)) + black_box(0)
}

#[evolve::switch]
static TRIPLE: bool = false;

#[evolve::multiverse(TRIPLE)]
fn mv_scale(x: u64) -> u64 {
    if TRIPLE.get() {
        x * 3
    } else {
        x * 2
    }
}

/// A direct call of the multiverse stub: a commit rewrites it to call the variant.
#[inline(never)]
pub fn caller_of_mv_scale(x: u64) -> u64 {
    mv_scale(black_box(x)) + black_box(0)
}

fn bytes_at(address: usize, n: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut out = vec![0u8; n];
    std::fs::File::open("/proc/self/mem")
        .unwrap()
        .read_exact_at(&mut out, address as u64)
        .unwrap();
    out
}

fn entry(name: &str) -> &'static evolve::code::stub::StubEntry {
    STUBS
        .iter()
        .find(|e| e.name().ends_with(name))
        .expect("a hot function")
}

const KINDS: [&str; 5] = ["count", "latency", "hist:arg0", "pred:arg0==7", "coverage"];

/// Checks one probe of `kind` on a function that `call(i)` calls `per` times, for i in 0..n.
fn check_kind(
    pattern: &str,
    kind: &str,
    (n, per): (u64, u64),
    call: &dyn Fn(u64) -> u64,
    expect: &dyn Fn(u64) -> u64,
) {
    let kind: ProbeKind = kind.parse().unwrap();
    let ids = add(pattern, kind).unwrap();
    assert_eq!(ids.len(), 1, "{pattern}");
    for i in 0..n {
        assert_eq!(call(i), expect(i), "{pattern} {kind} with arg {i}");
    }
    if kind == ProbeKind::Coverage {
        // The coverage probe detaches itself (on the reaper thread) after the first hit.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while read(ids[0]).unwrap().attached && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    let r = read(ids[0]).unwrap();
    let calls = n * per;
    match kind {
        ProbeKind::Count => assert_eq!(r.calls, calls, "{r:?}"),
        ProbeKind::Latency => {
            assert_eq!(r.calls, calls, "{r:?}");
            assert_eq!(r.latency.as_ref().unwrap().count, calls, "{r:?}");
        }
        ProbeKind::Histogram { .. } => {
            assert_eq!(r.calls, calls, "{r:?}");
            assert_eq!(r.histogram.iter().map(|b| b.1).sum::<u64>(), calls, "{r:?}");
            // 0..n: bucket [4, 8) holds 4, 5, 6 and 7.
            assert!(r.histogram.contains(&(4, 4 * per)), "{r:?}");
        }
        ProbeKind::Predicate { .. } => assert_eq!(r.hits, per, "{r:?}"),
        ProbeKind::Coverage => {
            assert!(r.covered && !r.attached, "{r:?}");
        }
    }
    remove(ids[0]).unwrap();
}

#[test]
fn every_kind_on_a_hot_function_through_its_stub_and_the_stub_comes_back() {
    let _s = serial();
    let stub = entry("::hot_square").stub_address();
    let before = bytes_at(stub, 8);
    for kind in KINDS {
        check_kind(
            "*::hot_square",
            kind,
            (100, 1),
            &caller_of_hot_square,
            &square,
        );
        assert_eq!(bytes_at(stub, 8), before, "after {kind}");
    }
    // The exact prepared name works too, and names the function as written.
    let ids = add("prepared::hot_square", ProbeKind::Count).unwrap();
    assert_eq!(read(ids[0]).unwrap().function, "prepared::hot_square");
    assert_eq!(read(ids[0]).unwrap().address, stub);
    remove(ids[0]).unwrap();
    assert_eq!(bytes_at(stub, 8), before);
}

#[test]
fn every_kind_on_a_multiverse_function_before_and_after_a_commit() {
    let _s = serial();
    let pointer = black_box(mv_scale as extern "C-unwind" fn(u64) -> u64);
    let stub = pointer as usize;
    let before = bytes_at(stub, 5);
    let both = |x: u64| caller_of_mv_scale(x) + pointer(x);
    for kind in KINDS {
        check_kind("*::mv_scale", kind, (50, 2), &both, &|x| 4 * x);
        assert_eq!(bytes_at(stub, 5), before, "after {kind}");
    }
    // Committed: the direct call site now calls the variant; under a probe it calls the stub
    // again (its original bytes), so both calls are still seen.
    TRIPLE.set(true);
    mv::commit_fn(mv_scale).unwrap();
    let committed = bytes_at(stub, 5);
    assert_ne!(committed, before);
    for kind in KINDS {
        check_kind("*::mv_scale", kind, (50, 2), &both, &|x| 6 * x);
        assert_eq!(bytes_at(stub, 5), committed, "after {kind}");
    }
    mv::revert_fn(mv_scale).unwrap();
    TRIPLE.set(false);
    assert_eq!(bytes_at(stub, 5), before);
}

/// Removing probes reclaims their trampolines every 16 removals, on the removing thread, with
/// probes off for it while the engine holds its locks. Probes come back on for that thread:
/// probes added afterwards see its calls, of every kind, on a committed multiverse function
/// (this order of tests once left every later call of the thread unprobed) and after an
/// explicit reclaim.
#[test]
fn probes_see_the_calls_of_the_thread_that_reclaimed_trampolines() {
    let _s = serial();
    let pointer = black_box(mv_scale as extern "C-unwind" fn(u64) -> u64);
    let both = |x: u64| caller_of_mv_scale(x) + pointer(x);
    TRIPLE.set(true);
    mv::commit_fn(mv_scale).unwrap();
    // At least one removal finds 16 trampolines quarantined and reclaims them here.
    for _ in 0..17 {
        let id = add("*::mv_scale", ProbeKind::Count).unwrap()[0];
        assert_eq!(both(1), 6);
        remove(id).unwrap();
    }
    for kind in KINDS {
        check_kind("*::mv_scale", kind, (50, 2), &both, &|x| 6 * x);
    }
    mv::revert_fn(mv_scale).unwrap();
    TRIPLE.set(false);
    evolve::code::reclaim_trampolines();
    for kind in KINDS {
        check_kind(
            "*::hot_square",
            kind,
            (100, 1),
            &caller_of_hot_square,
            &square,
        );
    }
}

#[test]
fn multiverse_commit_and_revert_under_a_probe_keep_both_working() {
    let _s = serial();
    let pointer = black_box(mv_scale as extern "C-unwind" fn(u64) -> u64);
    let stub = pointer as usize;
    let before = bytes_at(stub, 5);
    let id = add("*::mv_scale", ProbeKind::Count).unwrap()[0];
    let probed = bytes_at(stub, 5);
    assert_ne!(probed, before);
    assert_eq!(caller_of_mv_scale(5) + pointer(5), 20);
    TRIPLE.set(true);
    mv::commit_fn(mv_scale).unwrap();
    // The commit changed where the probe's trampoline goes, not the stub's bytes.
    assert_eq!(bytes_at(stub, 5), probed);
    assert!(mv::is_committed(mv_scale));
    assert_eq!(caller_of_mv_scale(5) + pointer(5), 30);
    mv::revert_fn(mv_scale).unwrap();
    assert_eq!(
        caller_of_mv_scale(5) + pointer(5),
        30,
        "generic code reads TRIPLE"
    );
    TRIPLE.set(false);
    assert_eq!(caller_of_mv_scale(5) + pointer(5), 20);
    mv::commit_fn(mv_scale).unwrap();
    assert_eq!(read(id).unwrap().calls, 8);
    // Removed while committed: the stub jumps straight to the committed variant again, and
    // the call site calls the variant directly.
    remove(id).unwrap();
    assert_eq!(caller_of_mv_scale(5) + pointer(5), 20);
    mv::revert_fn(mv_scale).unwrap();
    assert_eq!(bytes_at(stub, 5), before);
}

#[test]
fn a_hot_version_applied_and_reverted_under_a_probe_keeps_both_working() {
    let _s = serial();
    let square_entry = entry("::hot_square");
    let cube_code = entry("::hot_cube").implementation();
    let original = square_entry.implementation();
    let stub = Stub::of(square_entry).unwrap();
    let before = bytes_at(stub.address(), 8);
    // The hot layer's retarget, as `evolve::hot` applies and reverts versions.
    let retarget = |from: usize, to| {
        let mut batch = Batch::new();
        stub.retarget_in(&mut batch, from, to).unwrap();
        batch.apply().unwrap();
    };
    let id = add("*::hot_square", ProbeKind::Latency).unwrap()[0];
    let counted = add("*::hot_square", ProbeKind::Count).unwrap()[0];
    assert_eq!(caller_of_hot_square(3), square(3));
    assert_eq!(
        stub.target(),
        original.address(),
        "the stub's meaning is unchanged"
    );
    retarget(original.address(), cube_code);
    assert_eq!(stub.target(), cube_code.address());
    assert_eq!(
        caller_of_hot_square(3),
        cube(3),
        "new calls run the new version"
    );
    retarget(cube_code.address(), original);
    assert_eq!(caller_of_hot_square(3), square(3), "reverted");
    retarget(original.address(), cube_code);
    assert_eq!(read(id).unwrap().latency.unwrap().count, 3);
    assert_eq!(read(counted).unwrap().calls, 3);
    // Removed while the new version is current: the stub jumps to it directly.
    remove(id).unwrap();
    remove(counted).unwrap();
    assert_eq!(caller_of_hot_square(3), cube(3));
    assert_ne!(bytes_at(stub.address(), 8), before);
    retarget(cube_code.address(), original);
    assert_eq!(
        bytes_at(stub.address(), 8),
        before,
        "bytes restored exactly"
    );
    assert_eq!(caller_of_hot_square(3), square(3));
}

#[test]
fn predicate_backtraces_reach_the_caller_of_a_probed_function() {
    let _s = serial();
    let id = add("*::hot_square", "pred:arg0==42".parse().unwrap()).unwrap()[0];
    assert_eq!(caller_of_hot_square(42), square(42));
    let r = read(id).unwrap();
    remove(id).unwrap();
    assert_eq!(r.hits, 1);
    assert!(
        r.backtraces[0].contains("caller_of_hot_square"),
        "{}",
        r.backtraces[0]
    );
}

/// Probes added and removed on a hot function while its stub is retargeted back and forth (as
/// hot apply/revert do) and `EVOLVE_STRESS_THREADS` threads call it: every call returns one
/// version's result,
/// and the stub ends byte-identical.
#[test]
fn probes_and_hot_retargets_race_while_threads_call() {
    let _s = serial();
    let square_entry = entry("::hot_square");
    let cube_code = entry("::hot_cube").implementation();
    let original = square_entry.implementation();
    let stub = Stub::of(square_entry).unwrap();
    let before = bytes_at(stub.address(), 8);
    let stop = AtomicBool::new(false);
    let made = AtomicU64::new(0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    std::thread::scope(|s| {
        for t in 0..evolve_testkit::stress_threads() as u64 {
            let (stop, made) = (&stop, &made);
            s.spawn(move || {
                let mut x = t;
                while !stop.load(Ordering::Relaxed) {
                    let got = caller_of_hot_square(x);
                    assert!(got == square(x) || got == cube(x), "{x}: {got}");
                    made.fetch_add(1, Ordering::Relaxed);
                    x = x.wrapping_add(1);
                }
            });
        }
        let retargeter = s.spawn(|| {
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (from, to) = if flips.is_multiple_of(2) {
                    (original.address(), cube_code)
                } else {
                    (cube_code.address(), original)
                };
                let mut batch = Batch::new();
                stub.retarget_in(&mut batch, from, to).unwrap();
                batch.apply().unwrap();
                flips += 1;
            }
            if flips % 2 == 1 {
                let mut batch = Batch::new();
                stub.retarget_in(&mut batch, cube_code.address(), original)
                    .unwrap();
                batch.apply().unwrap();
            }
            flips
        });
        /// Stops the other threads even if an assertion below fails (else the scope hangs).
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        let kinds = ["count", "latency", "hist:arg0"];
        let mut cycles = 0;
        while cycles < 2000 && std::time::Instant::now() < deadline {
            let id = add("*::hot_square", kinds[cycles % 3].parse().unwrap()).unwrap()[0];
            let r = read(id).unwrap();
            remove(id).unwrap();
            assert!(r.calls <= made.load(Ordering::Relaxed));
            cycles += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let flips = retargeter.join().unwrap();
        eprintln!("{cycles} probe cycles, {flips} retargets");
        assert!(cycles > 0 && flips > 0);
    });
    assert_eq!(stub.target(), original.address());
    assert_eq!(bytes_at(stub.address(), 8), before);
}

/// The add/remove stress of `probes.rs`, through a hot function's stub: 10 000 cycles (bounded
/// by 30 s) while `EVOLVE_STRESS_THREADS` threads call it; every call returns the right value,
/// every reading is bounded by the calls made, and the stub ends byte-identical.
#[test]
fn add_and_remove_through_a_stub_up_to_ten_thousand_times_while_threads_call() {
    let threads = evolve_testkit::stress_threads() as u64;
    let _s = serial();
    let stub = entry("::hot_square").stub_address();
    let before = bytes_at(stub, 8);
    let stop = AtomicBool::new(false);
    let made = AtomicU64::new(0);
    let started = std::time::Instant::now();
    let mut cycles = 0;
    std::thread::scope(|s| {
        for t in 0..threads {
            let (stop, made) = (&stop, &made);
            s.spawn(move || {
                let mut x = t;
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(caller_of_hot_square(x), square(x));
                    made.fetch_add(1, Ordering::Relaxed);
                    x = x.wrapping_add(1);
                }
            });
        }
        /// Stops the calling threads even if an assertion below fails.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        let kinds = ["count", "latency", "hist:arg0"];
        let deadline = started + std::time::Duration::from_secs(30);
        while cycles < 10_000 && std::time::Instant::now() < deadline {
            let made_before = made.load(Ordering::Relaxed);
            let id = add("*::hot_square", kinds[cycles % 3].parse().unwrap()).unwrap()[0];
            let r = read(id).unwrap();
            let made_after = made.load(Ordering::Relaxed);
            remove(id).unwrap();
            assert!(r.calls <= made_after - made_before + threads, "{r:?}");
            cycles += 1;
        }
    });
    eprintln!(
        "through a stub: {cycles} add/remove cycles in {:.1} s with {threads} threads calling",
        started.elapsed().as_secs_f64()
    );
    assert!(cycles > 0);
    assert_eq!(evolve::code::reclaim_trampolines(), 0);
    assert_eq!(bytes_at(stub, 8), before);
}
