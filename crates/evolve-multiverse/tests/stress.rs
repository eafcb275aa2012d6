//! Commit and revert up to 10 000 times (bounded by 60 s) while `EVOLVE_STRESS_THREADS` threads
//! call the functions: every result must be consistent with either binding.
use evolve::multiverse as mv;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[evolve::switch(in 0..=3)]
static SHIFT: u8 = 0;

#[evolve::switch]
static NEGATE: bool = false;

#[evolve::multiverse(SHIFT, NEGATE)]
fn transform(x: u64) -> u64 {
    let y = x << SHIFT.get();
    if NEGATE.get() {
        !y
    } else {
        y
    }
}

#[inline(never)]
fn call_direct(x: u64) -> u64 {
    transform(x)
}

fn valid(x: u64, r: u64) -> bool {
    (0..4).any(|s| r == x << s || r == !(x << s))
}

#[test]
fn ten_thousand_commits_while_threads_call() {
    let stop = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    let pointer: extern "C-unwind" fn(u64) -> u64 = std::hint::black_box(transform);
    let threads = evolve_testkit::stress_threads() as u64;
    let start = std::time::Instant::now();
    let mut cycles = 0u32;
    std::thread::scope(|s| {
        for t in 0..threads {
            let (stop, calls) = (&stop, &calls);
            s.spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let x = (n ^ t) | 1;
                    let r = if n.is_multiple_of(2) {
                        call_direct(x)
                    } else {
                        pointer(x)
                    };
                    assert!(valid(x, r), "transform({x}) = {r}: no binding gives that");
                    n += 1;
                }
                calls.fetch_add(n, Ordering::Relaxed);
            });
        }
        let deadline = start + std::time::Duration::from_secs(60);
        while cycles < 10_000 && std::time::Instant::now() < deadline {
            SHIFT.set((cycles % 4) as u8);
            NEGATE.set(cycles.is_multiple_of(3));
            mv::commit_fn(transform).unwrap();
            assert!(mv::is_committed(transform));
            mv::revert_fn(transform).unwrap();
            cycles += 1;
        }
        stop.store(true, Ordering::Relaxed);
    });
    eprintln!(
        "{cycles} commit/revert cycles in {:.1?} with {threads} threads calling",
        start.elapsed()
    );
    assert!(cycles >= 100, "only {cycles} cycles");
    assert!(calls.load(Ordering::Relaxed) > 0);
    SHIFT.set(2);
    NEGATE.set(false);
    assert_eq!(call_direct(1), 4);
}
