//! Probes on unprepared Rust functions and on a libc function, with threads running.

use evolve_probes::{add, list, read, remove, ProbeKind};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Tests share the process's probe registry and functions: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Probed by the tests: a little arithmetic, never inlined.
#[inline(never)]
pub fn probe_target_mix(x: u64, y: u64) -> u64 {
    let mut h = black_box(x) ^ 0x9e37_79b9_7f4a_7c15;
    for _ in 0..3 {
        h = h.rotate_left(13).wrapping_mul(black_box(y) | 1);
    }
    h
}

/// Probed by the tests: recursion.
#[inline(never)]
pub fn probe_target_fib(n: u64) -> u64 {
    if black_box(n) < 2 {
        return n;
    }
    probe_target_fib(n - 1) + probe_target_fib(n - 2)
}

/// Probed by the tests: panics for 0.
#[inline(never)]
pub fn probe_target_panicky(n: u64) -> u64 {
    let v = black_box(n).wrapping_mul(7) + 3;
    if v == 3 {
        panic!("probe_target_panicky(0)");
    }
    probe_target_mix(v, n)
}

fn mix(x: u64, y: u64) -> u64 {
    black_box(probe_target_mix as fn(u64, u64) -> u64)(x, y)
}

fn code_bytes(f: usize, n: usize) -> Vec<u8> {
    let sym = evolve_code::inspect::executable()
        .unwrap()
        .function_containing(f)
        .unwrap()
        .clone();
    let mut out = vec![0u8; n.min(sym.size)];
    // Read through /proc/self/mem: tests deny unsafe code.
    use std::os::unix::fs::FileExt;
    std::fs::File::open("/proc/self/mem")
        .unwrap()
        .read_exact_at(&mut out, sym.address as u64)
        .unwrap();
    out
}

#[test]
fn counts_are_exact_under_threads_and_bytes_return() {
    let _s = serial();
    let before = code_bytes(probe_target_mix as *const () as usize, 64);
    let ids = add("*::probe_target_mix", ProbeKind::Count).unwrap();
    assert_eq!(ids.len(), 1);
    assert_ne!(
        code_bytes(probe_target_mix as *const () as usize, 64),
        before
    );
    let threads = evolve_testkit::stress_threads() as u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for i in 0..100_000u64 {
                    assert_eq!(mix(i, t), {
                        let mut h = i ^ 0x9e37_79b9_7f4a_7c15;
                        for _ in 0..3 {
                            h = h.rotate_left(13).wrapping_mul(t | 1);
                        }
                        h
                    });
                }
            });
        }
    });
    let reading = read(ids[0]).unwrap();
    assert_eq!(reading.calls, threads * 100_000);
    assert!(list().iter().any(|p| p.id == ids[0]));
    remove(ids[0]).unwrap();
    assert_eq!(
        code_bytes(probe_target_mix as *const () as usize, 64),
        before
    );
}

#[test]
fn histogram_and_predicate_see_arguments() {
    let _s = serial();
    let hist = add("*::probe_target_mix", ProbeKind::Histogram { arg: 0 }).unwrap()[0];
    let pred = add("*::probe_target_mix", "pred:arg1==0".parse().unwrap()).unwrap()[0];
    for i in 0..1000u64 {
        mix(i, i % 10);
    }
    let h = read(hist).unwrap();
    assert_eq!(h.calls, 1000);
    assert_eq!(h.histogram.iter().map(|b| b.1).sum::<u64>(), 1000);
    assert_eq!(h.histogram[0], (0, 1)); // the single 0
    assert!(h.histogram.contains(&(512, 1000 - 512)));
    let p = read(pred).unwrap();
    assert_eq!(p.hits, 100);
    assert!(!p.backtraces.is_empty());
    let json = serde_json::to_string(&p).unwrap();
    assert!(json.contains("\"hits\":100"));
    remove(hist).unwrap();
    remove(pred).unwrap();
}

#[test]
fn coverage_removes_itself_after_the_first_hit() {
    let _s = serial();
    let before = code_bytes(probe_target_mix as *const () as usize, 64);
    let id = add("*::probe_target_mix", ProbeKind::Coverage).unwrap()[0];
    assert!(!read(id).unwrap().covered);
    mix(1, 2);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while read(id).unwrap().attached {
        assert!(
            std::time::Instant::now() < deadline,
            "coverage probe never detached"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let r = read(id).unwrap();
    assert!(r.covered);
    assert_eq!(
        code_bytes(probe_target_mix as *const () as usize, 64),
        before
    );
    remove(id).unwrap();
}

#[test]
fn latency_under_recursion() {
    let _s = serial();
    let id = add("*::probe_target_fib", ProbeKind::Latency).unwrap()[0];
    let fib = black_box(probe_target_fib as fn(u64) -> u64);
    assert_eq!(fib(15), 610);
    let r = read(id).unwrap();
    // fib(15) makes 1973 calls.
    assert_eq!(r.calls, 1973);
    let l = r.latency.unwrap();
    assert_eq!(l.count, 1973);
    assert_eq!(l.unwound, 0);
    assert!(l.max_ns >= l.mean_ns);
    remove(id).unwrap();
    assert_eq!(evolve_code::shadow::depth(), 0);
}

#[test]
fn latency_across_a_panic_that_unwinds_through_the_probed_frame() {
    let _s = serial();
    let id = add("*::probe_target_panicky", ProbeKind::Latency).unwrap()[0];
    let f = black_box(probe_target_panicky as fn(u64) -> u64);
    let _ = f(3);
    let caught = std::panic::catch_unwind(|| f(0));
    assert!(
        caught.is_err(),
        "the panic must reach catch_unwind through the probed frame"
    );
    let _ = f(4);
    let l = read(id).unwrap().latency.unwrap();
    assert_eq!(l.count, 3);
    assert_eq!(l.unwound, 1);
    assert_eq!(evolve_code::shadow::depth(), 0);
    remove(id).unwrap();
}

#[test]
fn probes_on_a_libc_function() {
    let _s = serial();
    let ids = add("getppid", ProbeKind::Count).unwrap();
    let hist = add("getppid", ProbeKind::Latency).unwrap()[0];
    for _ in 0..1000 {
        // SAFETY-free: libc::getppid is safe to call but declared unsafe by the crate.
        black_box(std::os::unix::process::parent_id());
    }
    let r = read(ids[0]).unwrap();
    assert!(r.calls >= 1000, "{}", r.calls);
    assert!(read(hist).unwrap().latency.unwrap().count >= 1000);
    remove(ids[0]).unwrap();
    remove(hist).unwrap();
}

/// A recursive function with a drop guard that panics at the bottom.
#[inline(never)]
pub fn probe_target_deep(n: u64, drops: &AtomicU64) -> u64 {
    struct Guard<'a>(&'a AtomicU64);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    let _g = Guard(drops);
    if black_box(n) == 0 {
        panic!("bottom of probe_target_deep");
    }
    black_box(probe_target_deep as fn(u64, &AtomicU64) -> u64)(n - 1, drops) + 1
}

#[test]
fn a_panic_unwinds_through_many_probed_frames_on_several_threads() {
    let _s = serial();
    let id = add("*::probe_target_deep", ProbeKind::Latency).unwrap()[0];
    let deep = black_box(probe_target_deep as fn(u64, &AtomicU64) -> u64);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(move || {
                for _ in 0..10 {
                    let drops = AtomicU64::new(0);
                    let caught = std::panic::catch_unwind(|| deep(20, &drops));
                    assert!(caught.is_err());
                    // Every frame's cleanup ran: the unwinder went through all 21 stubs.
                    assert_eq!(drops.load(Ordering::Relaxed), 21);
                    assert_eq!(evolve_code::shadow::depth(), 0);
                }
            });
        }
    });
    let l = read(id).unwrap().latency.unwrap();
    assert_eq!(l.count, 3 * 10 * 21);
    assert_eq!(l.unwound, 3 * 10 * 21);
    remove(id).unwrap();
}

/// Cycles of add/remove are bounded by this cap and by [`STRESS_SECONDS`].
const STRESS_CYCLES: usize = 10_000;
const STRESS_SECONDS: u64 = 30;

#[test]
fn add_and_remove_up_to_ten_thousand_times_while_threads_call() {
    let threads = evolve_testkit::stress_threads() as u64;
    let _s = serial();
    let before = code_bytes(probe_target_mix as *const () as usize, 64);
    let stop = AtomicBool::new(false);
    let made = AtomicU64::new(0);
    let started = std::time::Instant::now();
    let mut cycles = 0;
    let (mut adding, mut removing) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (stop, made) = (&stop, &made);
            s.spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let x = n;
                    let got = mix(x, t);
                    made.fetch_add(1, Ordering::Relaxed);
                    let mut h = x ^ 0x9e37_79b9_7f4a_7c15;
                    for _ in 0..3 {
                        h = h.rotate_left(13).wrapping_mul(t | 1);
                    }
                    assert_eq!(got, h, "a probed call returned a wrong value");
                    n = n.wrapping_add(got | 1);
                }
            });
        }
        let kinds = [
            ProbeKind::Count,
            ProbeKind::Latency,
            ProbeKind::Histogram { arg: 1 },
        ];
        /// Stops the calling threads even if an assertion below fails (else the scope hangs).
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);
        let deadline = started + std::time::Duration::from_secs(STRESS_SECONDS);
        while cycles < STRESS_CYCLES && std::time::Instant::now() < deadline {
            let kind = kinds[cycles % 3];
            let made_before = made.load(Ordering::Relaxed);
            let t0 = std::time::Instant::now();
            let id = add("*::probe_target_mix", kind).unwrap()[0];
            let t1 = std::time::Instant::now();
            let r = read(id).unwrap();
            let made_after = made.load(Ordering::Relaxed);
            let t2 = std::time::Instant::now();
            remove(id).unwrap();
            adding += t1 - t0;
            removing += t2.elapsed();
            // Calls in flight when the window opened may be counted without being `made`
            // before it closed: at most one per thread.
            assert!(
                r.calls <= made_after - made_before + threads,
                "cycle {cycles}: {} calls counted, {} made",
                r.calls,
                made_after - made_before
            );
            match kind {
                ProbeKind::Latency => {
                    let l = r.latency.clone().unwrap();
                    // Read while calls run: exits are read before `calls`, so at most the
                    // calls in flight at attach time can exceed it.
                    assert!(l.count <= r.calls + threads, "{r:?}");
                    assert_eq!(l.unwound, 0);
                }
                ProbeKind::Histogram { .. } => {
                    let sum: u64 = r.histogram.iter().map(|b| b.1).sum();
                    assert!(sum <= r.calls + threads, "{r:?}");
                }
                _ => {}
            }
            cycles += 1;
        }
    });
    // Printed for the record (`--nocapture`), never asserted.
    eprintln!(
        "add/remove: {cycles} cycles in {:.1} s with {threads} threads calling ({} calls); \
         mean add {:?}, mean remove {:?}",
        started.elapsed().as_secs_f64(),
        made.load(Ordering::Relaxed),
        adding / cycles.max(1) as u32,
        removing / cycles.max(1) as u32,
    );
    assert!(cycles > 0);
    // The calling threads are gone: no thread can be in any removed trampoline, so one
    // reclamation releases every one of them for reuse.
    assert_eq!(evolve_code::reclaim_trampolines(), 0);
    assert!(
        !list()
            .iter()
            .any(|p| p.function.contains("probe_target_mix")),
        "{:?}",
        list()
    );
    assert_eq!(
        code_bytes(probe_target_mix as *const () as usize, 64),
        before
    );
}

#[test]
fn refusals_name_the_reason() {
    let _s = serial();
    // A tiny function: `xor eax, eax; ret` is 3 bytes.
    let err = add("probe_target_nothing_*", ProbeKind::Count)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no function matches"), "{err}");
    let e = evolve_code::Prologue::of(probe_target_tiny as *const () as usize, 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("shorter than the 5-byte jmp"), "{e}");
    let sym = evolve_code::inspect::executable()
        .unwrap()
        .function_containing(probe_target_tiny as *const () as usize)
        .unwrap()
        .clone();
    if sym.size < 5 {
        let err = add("*::probe_target_tiny", ProbeKind::Count)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot probe `probes::probe_target_tiny`"),
            "{err}"
        );
    }
}

/// Probed by the tests: too short for a detour.
#[inline(never)]
pub fn probe_target_tiny() -> u64 {
    0
}
