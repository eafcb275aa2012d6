//! `multiverse-spinlock`: the multiverse paper's Figure 1. A spinlock whose acquisition is
//! elided when the system runs on a single CPU, compiled three ways and timed in the same run:
//!
//! - `static`: compiled for one CPU (the lock functions have no check and do nothing);
//! - `dynamic`: the generic multiverse code, branching on the switch at every call;
//! - `committed`: the same call sites after `commit()` (the empty variant: 5-byte NOPs).
//!
//! Reports medians of repeated runs in ns per lock/unlock pair, and `committed_ratio` =
//! committed / static (the paper: 7.48 vs 6.64 cycles, 1.13×).

use serde_json::{json, Value};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

#[evolve::switch]
static SINGLE_CPU: bool = false;

/// A test-and-set spinlock.
pub struct SpinLock(AtomicBool);

static LOCK: SpinLock = SpinLock(AtomicBool::new(false));
static COUNTER: AtomicU64 = AtomicU64::new(0);

#[evolve::multiverse(SINGLE_CPU)]
fn spin_lock(lock: &'static SpinLock) {
    if !SINGLE_CPU.get() {
        while lock.0.swap(true, Ordering::Acquire) {
            std::hint::spin_loop();
        }
    }
}

#[evolve::multiverse(SINGLE_CPU)]
fn spin_unlock(lock: &'static SpinLock) {
    if !SINGLE_CPU.get() {
        lock.0.store(false, Ordering::Release);
    }
}

/// The single-CPU build: no check, nothing to do.
#[inline(never)]
fn spin_lock_static(lock: &SpinLock) {
    black_box(lock);
}

#[inline(never)]
fn spin_unlock_static(lock: &SpinLock) {
    black_box(lock);
}

fn bump() {
    COUNTER.store(COUNTER.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

/// The multiverse call sites: dynamic before commit, committed after.
#[inline(never)]
fn run_multiverse(n: u64) {
    for _ in 0..n {
        spin_lock(&LOCK);
        bump();
        spin_unlock(&LOCK);
    }
}

#[inline(never)]
fn run_static(n: u64) {
    for _ in 0..n {
        spin_lock_static(&LOCK);
        bump();
        spin_unlock_static(&LOCK);
    }
}

fn ns_per_iter(n: u64, f: fn(u64)) -> f64 {
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

/// `multiverse-spinlock [--iters N] [--runs R] [--only static|dynamic|committed]`.
///
/// `--only` runs one configuration for `--iters` iterations and nothing else, for
/// `valgrind --tool=callgrind` (instructions per call = difference of two runs / difference of
/// their iterations).
pub fn run(args: &[String]) -> Value {
    let opt = |name: &str| crate::stats::option_value(args, name);
    let iters: u64 = opt("--iters")
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000_000);
    let runs: usize = opt("--runs").and_then(|v| v.parse().ok()).unwrap_or(11);
    SINGLE_CPU.set(true);
    if let Some(only) = opt("--only") {
        match only.as_str() {
            "static" => run_static(iters),
            "dynamic" => run_multiverse(iters),
            _ => {
                evolve::multiverse::commit_refs(&SINGLE_CPU).expect("commit");
                run_multiverse(iters);
                evolve::multiverse::revert_refs(&SINGLE_CPU).expect("revert");
            }
        }
        return json!({ "scenario": "multiverse-spinlock", "only": only, "iters": iters });
    }
    let (mut st, mut dy, mut co) = (Vec::new(), Vec::new(), Vec::new());
    let mut commit = evolve::multiverse::CommitReport::default();
    for _ in 0..runs {
        st.push(ns_per_iter(iters, run_static));
        dy.push(ns_per_iter(iters, run_multiverse));
        commit = evolve::multiverse::commit_refs(&SINGLE_CPU).expect("commit");
        co.push(ns_per_iter(iters, run_multiverse));
        evolve::multiverse::revert_refs(&SINGLE_CPU).expect("revert");
    }
    let (s, d, c) = (median(st), median(dy), median(co));
    json!({
        "scenario": "multiverse-spinlock",
        "iters": iters,
        "runs": runs,
        "static_ns": round3(s),
        "dynamic_ns": round3(d),
        "committed_ns": round3(c),
        "committed_ratio": round3(c / s),
        "dynamic_ratio": round3(d / s),
        "goal_ratio": 1.03,
        "functions_changed": commit.changed,
        "sites_written": commit.batch.changed,
    })
}
