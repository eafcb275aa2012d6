//! A function-pointer switch committed, changed and reverted up to 10 000 times (bounded by
//! 60 s) while `EVOLVE_STRESS_THREADS` threads call
//! through it (direct call sites, the entry stub and the plain indirect call): every result must
//! come from one of the functions it may be bound to.
use evolve::multiverse as mv;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

#[inline(never)]
fn plus_one(x: u64) -> u64 {
    std::hint::black_box(x) + 1
}
#[inline(never)]
fn times_three(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_mul(3)
}
#[inline(never)]
fn invert(x: u64) -> u64 {
    !std::hint::black_box(x)
}

const FUNCTIONS: [fn(u64) -> u64; 3] = [plus_one, times_three, invert];

#[evolve::switch(in [plus_one, times_three, invert])]
static STEP: fn(u64) -> u64 = plus_one;

#[inline(never)]
fn step_direct(x: u64) -> u64 {
    STEP.call(x)
}

fn valid(x: u64, r: u64) -> bool {
    FUNCTIONS.iter().any(|f| f(x) == r)
}

#[test]
fn ten_thousand_commits_while_threads_call() {
    let stop = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    let entry = STEP.entry().0;
    let start = Instant::now();
    let threads = evolve_testkit::stress_threads() as u64;
    let mut cycles = 0usize;
    std::thread::scope(|s| {
        for t in 0..threads {
            let (stop, calls) = (&stop, &calls);
            s.spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let x = (n << 3) ^ t;
                    let r = match n % 3 {
                        0 => step_direct(x),
                        1 => entry(x),
                        _ => (STEP.get())(x),
                    };
                    assert!(valid(x, r), "STEP({x}) = {r}: no binding gives that");
                    n += 1;
                }
                calls.fetch_add(n, Ordering::Relaxed);
            });
        }
        let deadline = start + std::time::Duration::from_secs(60);
        while cycles < 10_000 && Instant::now() < deadline {
            let i = cycles;
            cycles += 1;
            STEP.set(FUNCTIONS[i % 3]);
            mv::commit_refs(&STEP).unwrap();
            assert!(STEP.is_committed());
            STEP.set(FUNCTIONS[(i + 1) % 3]);
            if i.is_multiple_of(2) {
                mv::commit_refs(&STEP).unwrap();
            }
            mv::revert_refs(&STEP).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    let calls = calls.load(Ordering::Relaxed);
    eprintln!(
        "{cycles} cycles (2.5 batches each) in {:.1?} with {threads} threads and {calls} calls \
         meanwhile",
        start.elapsed()
    );
    assert!(cycles >= 100, "only {cycles} cycles");
    assert!(calls > 0);
    let sites = STEP.call_sites().expect("committed at least once");
    assert!(sites >= 2, "step_direct's call and the stub: {sites}");
    assert!(!STEP.is_committed());
    STEP.set(times_three);
    assert_eq!(step_direct(5), 15);
}
