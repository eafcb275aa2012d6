//! `multiverse-commit`: the cost of committing and reverting one multiversed function called
//! from 10 000 direct call sites (the paper: 1 161 call sites in about 16 ms). Every commit is
//! one engine batch: the entry stub and all call sites, written with shared core syncs.

use serde_json::{json, Value};
use std::hint::black_box;
use std::time::Instant;

#[evolve::switch]
static PLUS: bool = false;

#[evolve::multiverse(PLUS)]
fn target(x: u64) -> u64 {
    if PLUS.get() {
        x.wrapping_add(1)
    } else {
        x ^ 3
    }
}

macro_rules! calls10 {
    ($x:ident) => {
        $x = target($x);
        $x = target($x);
        $x = target($x);
        $x = target($x);
        $x = target($x);
        $x = target($x);
        $x = target($x);
        $x = target($x);
        $x = target($x);
        $x = target($x);
    };
}
macro_rules! calls100 {
    ($x:ident) => {
        calls10!($x);
        calls10!($x);
        calls10!($x);
        calls10!($x);
        calls10!($x);
        calls10!($x);
        calls10!($x);
        calls10!($x);
        calls10!($x);
        calls10!($x);
    };
}
macro_rules! callers {
    ($($name:ident = $salt:literal)*) => {
        $(
            // Distinct bodies, or LLVM would merge the callers into one.
            #[inline(never)]
            fn $name(mut x: u64) -> u64 {
                x ^= black_box($salt);
                calls100!(x); calls100!(x); calls100!(x); calls100!(x); calls100!(x);
                calls100!(x); calls100!(x); calls100!(x); calls100!(x); calls100!(x);
                x ^ $salt
            }
        )*
        /// Every caller: 1 000 direct calls each.
        const CALLERS: &[fn(u64) -> u64] = &[$($name),*];
    };
}
callers!(c0 = 0 c1 = 1 c2 = 2 c3 = 3 c4 = 4 c5 = 5 c6 = 6 c7 = 7 c8 = 8 c9 = 9);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

/// `multiverse-commit [--call-sites 10000] [--runs R]`. The program has 10 000 call sites;
/// `--call-sites` is checked against what commit finds.
pub fn run(args: &[String]) -> Value {
    let opt = |name: &str| crate::stats::option_value(args, name);
    let wanted: usize = opt("--call-sites")
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let runs: usize = opt("--runs").and_then(|v| v.parse().ok()).unwrap_or(21);
    let check = |plus: bool| {
        // `plus`: the result of the `PLUS = true` binding.
        let x = CALLERS.iter().fold(1u64, |x, c| c(black_box(x)));
        let expect = if plus { 1 + 10_000 } else { 1 };
        // (The salts cancel out: each caller XORs its salt in and out.)
        assert_eq!(x, expect, "every call site runs the bound variant");
    };
    PLUS.set(true);
    let start = Instant::now();
    let first = evolve::multiverse::commit_refs(&PLUS).expect("commit");
    let first_ms = start.elapsed().as_secs_f64() * 1e3;
    PLUS.set(false);
    check(true); // the committed binding stays until the next commit
    PLUS.set(true);
    let sites = first.batch.changed + first.batch.unchanged;
    let (mut commits, mut reverts) = (Vec::new(), Vec::new());
    let mut last = first.clone();
    for _ in 0..runs {
        let start = Instant::now();
        let r = evolve::multiverse::revert_refs(&PLUS).expect("revert");
        reverts.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(r.batch.changed, sites);
        check(true);
        let start = Instant::now();
        last = evolve::multiverse::commit_refs(&PLUS).expect("commit");
        commits.push(start.elapsed().as_secs_f64() * 1e3);
    }
    evolve::multiverse::revert_refs(&PLUS).expect("revert");
    PLUS.set(false);
    json!({
        "scenario": "multiverse-commit",
        "call_sites": sites - 1,
        "call_sites_requested": wanted,
        "sites_per_commit": sites,
        "first_commit_ms": round3(first_ms),
        "commit_ms": round3(median(commits)),
        "revert_ms": round3(median(reverts)),
        "goal_ms": 16.0,
        "runs": runs,
        "core_syncs": last.batch.core_syncs,
        "via_int3": last.batch.via_int3,
        "stored": last.batch.stored,
        "mprotects": last.batch.mprotects,
    })
}
