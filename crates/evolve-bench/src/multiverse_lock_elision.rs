//! `multiverse-lock-elision`: lock elision in single-threaded mode, as the multiverse paper did
//! for musl's `malloc` and `fputc`. A stdio-like buffer and a bump allocator each take a lock; the
//! lock functions are multiversed on `THREADED`, so while one thread runs the committed variant
//! removes them (NOPs at the call sites), and [`spawn`] restores them before a second thread
//! starts. Compared in the same run with the always-locked build.

use serde_json::{json, Value};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::time::Instant;

#[evolve::switch]
static THREADED: bool = true;

/// The lock of one "FILE" or heap.
pub struct Lock(AtomicBool);

static FILE_LOCK: Lock = Lock(AtomicBool::new(false));
static HEAP_LOCK: Lock = Lock(AtomicBool::new(false));

#[evolve::multiverse(THREADED)]
fn lock(l: &'static Lock) {
    if THREADED.get() {
        while l.0.swap(true, Ordering::Acquire) {
            std::hint::spin_loop();
        }
    }
}

#[evolve::multiverse(THREADED)]
fn unlock(l: &'static Lock) {
    if THREADED.get() {
        l.0.store(false, Ordering::Release);
    }
}

/// The always-locked build.
#[inline(never)]
fn lock_always(l: &Lock) {
    while l.0.swap(true, Ordering::Acquire) {
        std::hint::spin_loop();
    }
}

#[inline(never)]
fn unlock_always(l: &Lock) {
    l.0.store(false, Ordering::Release);
}

const BUF: usize = 4096;
static BUFFER: [AtomicU8; BUF] = [const { AtomicU8::new(0) }; BUF];
static POS: AtomicUsize = AtomicUsize::new(0);
static FLUSHED: AtomicU64 = AtomicU64::new(0);

/// The body of `fputc`: append to the buffer, "write" it out when full. Callers hold the lock
/// (relaxed loads and stores: the lock orders them).
#[inline(always)]
fn putc_unlocked(c: u8) {
    let pos = POS.load(Ordering::Relaxed);
    BUFFER[pos].store(c, Ordering::Relaxed);
    if pos + 1 == BUF {
        FLUSHED.store(FLUSHED.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        POS.store(0, Ordering::Relaxed);
    } else {
        POS.store(pos + 1, Ordering::Relaxed);
    }
}

static HEAP_TOP: AtomicUsize = AtomicUsize::new(0);

/// The body of a bump `malloc`: round up, take, wrap around a 1 MiB arena.
#[inline(always)]
fn malloc_unlocked(size: usize) -> usize {
    let size = (size + 15) & !15;
    let top = HEAP_TOP.load(Ordering::Relaxed);
    let next = if top + size > 1 << 20 {
        size
    } else {
        top + size
    };
    HEAP_TOP.store(next, Ordering::Relaxed);
    next - size
}

#[inline(never)]
fn fputc(c: u8) {
    lock(&FILE_LOCK);
    putc_unlocked(c);
    unlock(&FILE_LOCK);
}

#[inline(never)]
fn fputc_locked(c: u8) {
    lock_always(&FILE_LOCK);
    putc_unlocked(c);
    unlock_always(&FILE_LOCK);
}

#[inline(never)]
fn malloc(size: usize) -> usize {
    lock(&HEAP_LOCK);
    let p = malloc_unlocked(size);
    unlock(&HEAP_LOCK);
    p
}

#[inline(never)]
fn malloc_locked(size: usize) -> usize {
    lock_always(&HEAP_LOCK);
    let p = malloc_unlocked(size);
    unlock_always(&HEAP_LOCK);
    p
}

/// Starts a thread, restoring the locks first if the program was single-threaded (musl sets
/// its `threads_minus_1` the same way). The commit completes before the thread exists.
pub fn spawn<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    if !THREADED.get() {
        THREADED.set(true);
        evolve::multiverse::commit_refs(&THREADED).expect("restore the locks");
    }
    std::thread::spawn(f)
}

/// Back to one thread (after joining the others): elide the locks again.
pub fn single_threaded() {
    THREADED.set(false);
    evolve::multiverse::commit_refs(&THREADED).expect("elide the locks");
}

fn time(n: u64, f: impl Fn(u64)) -> f64 {
    let start = Instant::now();
    f(black_box(n));
    start.elapsed().as_secs_f64() * 1e9 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

fn putc_loop(n: u64) {
    for i in 0..n {
        fputc(i as u8);
    }
}
fn putc_locked_loop(n: u64) {
    for i in 0..n {
        fputc_locked(i as u8);
    }
}
fn malloc_loop(n: u64) {
    for i in 0..n {
        black_box(malloc((i & 255) as usize));
    }
}
fn malloc_locked_loop(n: u64) {
    for i in 0..n {
        black_box(malloc_locked((i & 255) as usize));
    }
}

/// `multiverse-lock-elision [--iters N] [--runs R] [--only locked|dynamic|committed]`.
pub fn run(args: &[String]) -> Value {
    let opt = |name: &str| crate::stats::option_value(args, name);
    let iters: u64 = opt("--iters")
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000_000);
    let runs: usize = opt("--runs").and_then(|v| v.parse().ok()).unwrap_or(11);
    if let Some(only) = opt("--only") {
        THREADED.set(false);
        match only.as_str() {
            "locked" => {
                putc_locked_loop(iters);
                malloc_locked_loop(iters);
            }
            "dynamic" => {
                putc_loop(iters);
                malloc_loop(iters);
            }
            _ => {
                single_threaded();
                putc_loop(iters);
                malloc_loop(iters);
            }
        }
        return json!({ "scenario": "multiverse-lock-elision", "only": only, "iters": iters });
    }
    let mut m: [Vec<f64>; 6] = Default::default();
    for _ in 0..runs {
        THREADED.set(false); // one thread, not committed: the generic code branches
        m[0].push(time(iters, putc_locked_loop));
        m[1].push(time(iters, putc_loop));
        m[2].push(time(iters, malloc_locked_loop));
        m[3].push(time(iters, malloc_loop));
        single_threaded();
        m[4].push(time(iters, putc_loop));
        m[5].push(time(iters, malloc_loop));
        evolve::multiverse::revert_refs(&THREADED).expect("revert");
    }
    let [pl, pd, ml, md, pc, mc] = m.map(median);

    // A second thread: the locks come back, and both threads' writes are all counted.
    single_threaded();
    let before = FLUSHED.load(Ordering::Relaxed) * BUF as u64 + POS.load(Ordering::Relaxed) as u64;
    let per_thread = 200_000u64;
    let other = spawn(move || putc_loop(per_thread));
    putc_loop(per_thread);
    other.join().expect("second thread");
    let after = FLUSHED.load(Ordering::Relaxed) * BUF as u64 + POS.load(Ordering::Relaxed) as u64;
    let locks_restored = evolve::multiverse::is_committed(lock) && THREADED.get();
    let exact = after - before == 2 * per_thread;
    single_threaded();
    let elided_again = evolve::multiverse::is_committed(lock);
    evolve::multiverse::revert_refs(&THREADED).expect("revert");
    THREADED.set(true);

    json!({
        "scenario": "multiverse-lock-elision",
        "iters": iters,
        "runs": runs,
        "fputc": {
            "locked_ns": round3(pl), "dynamic_ns": round3(pd), "committed_ns": round3(pc),
            "reduction_vs_locked": round3(1.0 - pc / pl),
        },
        "malloc": {
            "locked_ns": round3(ml), "dynamic_ns": round3(md), "committed_ns": round3(mc),
            "reduction_vs_locked": round3(1.0 - mc / ml),
        },
        "paper_reduction": "0.43 to 0.54",
        "second_thread": {
            "locks_restored": locks_restored,
            "all_writes_counted": exact,
            "elided_again_after_join": elided_again,
        },
    })
}
