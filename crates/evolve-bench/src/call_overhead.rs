//! `call-overhead`: the steady-state cost of calling a hot function through its stub, against
//! the same function called directly and a PSU-style trampoline (an indirect call through a
//! per-function pointer slot plus a per-thread call counter increment, as PSU's per-thread
//! counters do). Medians of repeated samples of ≥ 10^7 calls each, per thread; the variants
//! are interleaved within every round so drift hits them alike.
//!
//! Two more variants measure unprepared functions (issue 11), each against `direct`:
//!
//! - `unpatched`: a plain function (no mark) never redirected, in this binary that links
//!   Evolve. An unprepared function's code is exactly what the compiler emitted — no stub, no
//!   cost — so "a build without Evolve" is the same loop calling the same code: the baseline
//!   `direct` is that loop in this same binary, and `unpatched_ratio` shows that nothing sits
//!   between the caller and the function (goal ≤ 1.01);
//! - `patched`: a plain function redirected to a new version by the engine (a `jmp` over its
//!   entry) with its call site retargeted, so the loop calls the new version with one direct
//!   `call rel32` (goal ≤ 1.02); the new version's code is `direct`'s.
//!
//! `--only direct|hot|psu|unpatched|patched --iters N` runs one loop once, for instruction
//! counts under `valgrind --tool=callgrind` (two runs with different `N`; the difference of the
//! totals divided by the difference of `N` is the cost per loop iteration).

use crate::stats::{median, round3};
use evolve::code::redirect::{self, Function, References, Retarget};
use serde_json::{json, Value};
use std::cell::Cell;
use std::hint::black_box;
use std::time::Instant;

/// Arguments of the scenario.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Threads, each measuring all three variants (medians across threads are reported).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Calls per sample.
    #[arg(long, default_value_t = 10_000_000)]
    pub iters: u64,
    /// Samples per variant and thread (the median is reported).
    #[arg(long, default_value_t = 9)]
    pub runs: usize,
    /// Run only this variant's loop once (`direct`, `hot` or `psu`), for callgrind.
    #[arg(long)]
    pub only: Option<String>,
    /// Accepted for uniformity: the output is always JSON.
    #[arg(long)]
    pub json: bool,
}

/// The trivial function, called directly.
#[inline(never)]
pub fn direct(x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(1)
}

/// The same function, hot: callers reach it through its stub (one `jmp`).
#[evolve::hot]
pub fn hot(x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(1)
}

/// A plain function (no mark) that is never redirected: the same code as `direct` but for its
/// constant (identical functions would be merged into one).
#[inline(never)]
pub fn unpatched(x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(2)
}

/// A plain function the scenario redirects to [`patched_new`], retargeting its call site in
/// `loop_patched`.
#[inline(never)]
pub fn patched(x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(5)
}

/// The new version of [`patched`]: `direct`'s code.
#[inline(never)]
pub fn patched_new(x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(1)
}

/// [`patched`] redirected to [`patched_new`] with its references retargeted, while it lives
/// (one at a time in a process).
pub struct Patched {
    installed: Vec<redirect::Redirect>,
    references: References,
    _one: std::sync::MutexGuard<'static, ()>,
}

impl Patched {
    /// Redirects `patched`'s entry and retargets its direct calls and GOT slots.
    pub fn new() -> Result<Patched, String> {
        type F = fn(u64) -> u64;
        static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let one = ONE.lock().unwrap_or_else(|p| p.into_inner());
        let err = |e: evolve::code::Error| e.to_string();
        let old = Function::from_fn(patched as F).map_err(err)?;
        let new = Function::from_fn(patched_new as F).map_err(err)?;
        let installed = redirect::install(&[(&old, &new)]).map_err(err)?;
        let references = References::find(&old, &[]).map_err(err)?;
        if references.code_sites().is_empty() {
            let _ = redirect::remove(&installed.redirects);
            return Err("no direct call of `patched` found in the loop".into());
        }
        Retarget::new()
            .retarget(&references, &old, &new)
            .and_then(|batch| batch.apply())
            .map_err(err)?;
        Ok(Patched {
            installed: installed.redirects,
            references,
            _one: one,
        })
    }
}

impl Drop for Patched {
    fn drop(&mut self) {
        let _ = Retarget::new().restore(&self.references).apply();
        let _ = redirect::remove(&self.installed);
    }
}

/// The PSU-style trampoline's target.
#[inline(never)]
fn psu_target(x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(1)
}

/// The per-function pointer slot a PSU-style update rewrites.
static PSU_SLOT: fn(u64) -> u64 = psu_target;

thread_local! {
    /// PSU's per-thread call counter.
    static PSU_CALLS: Cell<u64> = const { Cell::new(0) };
}

/// A PSU-style call, inlined at the call site (the cheapest form of the trampoline): bump the
/// thread's counter, load the function's slot, call through it.
#[inline(always)]
pub fn psu(x: u64) -> u64 {
    PSU_CALLS.with(|c| c.set(c.get().wrapping_add(1)));
    // black_box: the slot is a memory load on every call, as a mutable slot would be.
    let f = *black_box(&PSU_SLOT);
    f(x)
}

/// The calls the PSU-style trampoline counted on this thread.
pub fn psu_calls() -> u64 {
    PSU_CALLS.with(Cell::get)
}

macro_rules! call_loop {
    ($name:ident, $f:path) => {
        #[inline(never)]
        fn $name(n: u64) -> u64 {
            let mut acc = 0u64;
            for i in 0..n {
                acc = acc.wrapping_add($f(black_box(i)));
            }
            black_box(acc)
        }
    };
}
call_loop!(loop_direct, direct);
call_loop!(loop_hot, hot);
call_loop!(loop_psu, psu);
call_loop!(loop_unpatched, unpatched);
call_loop!(loop_patched, patched);

/// The variants, in the order of the record.
const VARIANTS: [&str; 5] = ["direct", "hot", "psu", "unpatched", "patched"];

/// The loop of a variant by name.
pub fn variant(name: &str) -> Result<fn(u64) -> u64, String> {
    match name {
        "direct" => Ok(loop_direct),
        "hot" => Ok(loop_hot),
        "psu" => Ok(loop_psu),
        "unpatched" => Ok(loop_unpatched),
        "patched" => Ok(loop_patched),
        other => Err(format!(
            "unknown variant {other:?}: direct, hot, psu, unpatched or patched"
        )),
    }
}

fn ns_per_call(f: fn(u64) -> u64, iters: u64) -> f64 {
    let start = Instant::now();
    black_box(f(iters));
    start.elapsed().as_secs_f64() * 1e9 / iters as f64
}

/// One thread's medians: nanoseconds per call of each of [`VARIANTS`].
fn measure(iters: u64, runs: usize) -> [f64; 5] {
    let loops = VARIANTS.map(|v| variant(v).expect("known"));
    // Warm up: page in, train predictors.
    for f in loops {
        black_box(f(iters / 10 + 1));
    }
    let mut samples: [Vec<f64>; 5] = Default::default();
    for round in 0..runs.max(1) {
        // Rotate the order every round.
        for k in 0..loops.len() {
            let v = (round + k) % loops.len();
            samples[v].push(ns_per_call(loops[v], iters));
        }
    }
    samples.map(|mut s| median(&mut s))
}

/// Runs the scenario and returns its JSON record.
pub fn run(args: &Args) -> Result<Value, String> {
    // The patched variant's function is redirected for the whole run.
    let _patched = Patched::new()?;
    if loop_patched(1000) != loop_direct(1000) {
        return Err("the redirected function does not run its new version".into());
    }
    if let Some(name) = &args.only {
        let f = variant(name)?;
        let result = f(args.iters);
        return Ok(json!({
            "scenario": "call-overhead",
            "only": name,
            "iters": args.iters,
            "result": result,
            "psu_calls_counted": psu_calls(),
        }));
    }
    let threads = args.threads.max(1);
    let per_thread: Vec<[f64; 5]> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| measure(args.iters, args.runs)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let column = |v: usize| median(&mut per_thread.iter().map(|t| t[v]).collect::<Vec<_>>());
    let (direct_ns, hot_ns, psu_ns) = (column(0), column(1), column(2));
    let (unpatched_ns, patched_ns) = (column(3), column(4));
    let ratio = |x: f64| {
        if direct_ns > 0.0 {
            x / direct_ns
        } else {
            f64::NAN
        }
    };
    let hot_ratio = ratio(hot_ns);
    let (unpatched_ratio, patched_ratio) = (ratio(unpatched_ns), ratio(patched_ns));
    Ok(json!({
        "scenario": "call-overhead",
        "threads": threads,
        "iters_per_sample": args.iters,
        "runs": args.runs.max(1),
        "direct_ns": round3(direct_ns),
        "hot_ns": round3(hot_ns),
        "psu_style_ns": round3(psu_ns),
        "hot_ratio": round3(hot_ratio),
        "psu_ratio": round3(ratio(psu_ns)),
        "unpatched_ns": round3(unpatched_ns),
        "patched_ns": round3(patched_ns),
        "unpatched_ratio": round3(unpatched_ratio),
        "patched_ratio": round3(patched_ratio),
        "per_thread_ns": per_thread
            .iter()
            .map(|t| json!({
                "direct": round3(t[0]), "hot": round3(t[1]), "psu": round3(t[2]),
                "unpatched": round3(t[3]), "patched": round3(t[4]),
            }))
            .collect::<Vec<_>>(),
        "goal_hot_ratio_max": 1.05,
        "meets_goal": hot_ratio <= 1.05,
        "goal_unpatched_ratio_max": 1.01,
        "meets_unpatched_goal": unpatched_ratio <= 1.01,
        "goal_patched_ratio_max": 1.02,
        "meets_patched_goal": patched_ratio <= 1.02,
        "unpatched_baseline": "a build without Evolve runs an unprepared function's code exactly as compiled: the baseline is the same loop calling the same code (direct) in this binary",
        "patched": "engine level: an unprepared function redirected (jmp over its entry) to a new version in this binary, its call site in the loop retargeted: one direct call rel32",
        "psu_published_ratio": "2.97-4.24 (PSU paper; published, not measured here)",
        "psu_style": "inlined at the caller: per-thread counter increment + load of a per-function pointer slot + indirect call",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variants_compute_the_same() {
        assert_eq!(direct(41), hot(41));
        assert_eq!(direct(41), psu(41));
        assert_eq!(loop_direct(1000), loop_hot(1000));
        assert_eq!(loop_direct(1000), loop_psu(1000));
        assert_eq!(loop_unpatched(1000), loop_direct(1000).wrapping_add(1000));
        let before = loop_patched(1000);
        {
            let _patched = Patched::new().unwrap();
            assert_eq!(loop_patched(1000), loop_direct(1000));
        }
        assert_eq!(loop_patched(1000), before);
        let before = psu_calls();
        psu(1);
        assert_eq!(psu_calls(), before + 1);
        assert!(variant("nope").is_err());
    }

    #[test]
    fn record_has_every_field_and_consistent_ratios() {
        let args = Args {
            threads: 2,
            iters: 1000,
            runs: 3,
            only: None,
            json: true,
        };
        let r = run(&args).unwrap();
        assert_eq!(r["threads"], 2);
        assert_eq!(r["per_thread_ns"].as_array().unwrap().len(), 2);
        let direct = r["direct_ns"].as_f64().unwrap();
        let hot = r["hot_ns"].as_f64().unwrap();
        let psu = r["psu_style_ns"].as_f64().unwrap();
        assert!(direct > 0.0 && hot > 0.0 && psu > 0.0);
        let hot_ratio = r["hot_ratio"].as_f64().unwrap();
        assert!((hot_ratio - hot / direct).abs() < 0.01 * hot_ratio.max(1.0) + 0.002);
        assert!(r["psu_ratio"].as_f64().is_some());
        assert_eq!(r["meets_goal"], hot_ratio <= 1.05);
        for key in ["unpatched", "patched"] {
            let ns = r[format!("{key}_ns")].as_f64().unwrap();
            let ratio = r[format!("{key}_ratio")].as_f64().unwrap();
            assert!(ns > 0.0);
            assert!((ratio - ns / direct).abs() < 0.01 * ratio.max(1.0) + 0.002);
        }
    }

    #[test]
    fn only_mode_runs_one_loop() {
        let args = |v: &str| Args {
            threads: 1,
            iters: 500,
            runs: 1,
            only: Some(v.into()),
            json: true,
        };
        let d = run(&args("direct")).unwrap();
        assert_eq!(d["result"], run(&args("hot")).unwrap()["result"]);
        assert_eq!(d["result"], run(&args("psu")).unwrap()["result"]);
        assert_eq!(d["result"], run(&args("patched")).unwrap()["result"]);
        assert!(run(&args("x")).is_err());
    }
}
