//! `probe-overhead`: the cost a probe adds to each call of an unprepared function.
//!
//! The same trivial `#[inline(never)]` function is called through an opaque function pointer,
//! unprobed (`baseline_ns`) and probed (`probed_ns`), in the same run: each repetition measures
//! one unprobed sample, attaches the probe, measures one probed sample and removes the probe,
//! so slow drifts of a noisy machine hit both sides alike. Each side reports the median of its
//! samples (ns per call); `probe_cost_ns` is their difference. The probe's own count of calls
//! is checked against the calls made (`errors` counts mismatches).
//!
//! `--threads N` makes N threads call the function at once (each `calls` times; ns per call
//! is each sample's wall time over `calls`): the cost of counting under contention. With more
//! threads than cores both sides include the time sharing of the cores.
//!
//! Goals: a counting probe ≤ 15 ns per call, a latency probe ≤ 40 ns (none set for `hist`:
//! `goal_ns` and `meets_goal` are null).

use crate::stats::{median, round3};
use evolve_probes::ProbeKind;
use serde_json::{json, Value};
use std::hint::black_box;
use std::time::Instant;

/// Arguments of the scenario.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The probe: `count`, `hist` (histogram of the first argument) or `latency`.
    #[arg(long, default_value = "count")]
    pub kind: String,
    /// Calls per sample.
    #[arg(long, default_value_t = 1_000_000)]
    pub calls: u64,
    /// Samples per side (the median is reported).
    #[arg(long, default_value_t = 11)]
    pub runs: usize,
    /// Threads calling the function at once.
    #[arg(long, default_value_t = 1)]
    pub threads: u64,
    /// Measure in a C process that never linked Evolve, through `evolve attach` (count or
    /// latency; see `attach.rs`).
    #[arg(long)]
    pub attached: bool,
    /// Accepted for uniformity: the output is always JSON.
    #[arg(long)]
    pub json: bool,
}

/// The probed function: a few instructions, never inlined.
#[inline(never)]
pub fn probe_overhead_target(x: u64) -> u64 {
    black_box(x).wrapping_mul(0x9e37_79b9) ^ (x >> 7)
}

const PATTERN: &str = "*::probe_overhead::probe_overhead_target";

/// Nanoseconds per call over `calls` calls on each of `threads` threads (wall time).
fn sample(calls: u64, threads: u64) -> f64 {
    let run = || {
        let f = black_box(probe_overhead_target as fn(u64) -> u64);
        let mut acc = 0u64;
        for i in 0..calls {
            acc = acc.wrapping_add(f(i));
        }
        black_box(acc);
    };
    let start = Instant::now();
    if threads <= 1 {
        run();
    } else {
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(run);
            }
        });
    }
    start.elapsed().as_nanos() as f64 / calls.max(1) as f64
}

/// Runs the scenario.
pub fn run(args: &Args) -> Result<Value, String> {
    if args.attached {
        return crate::attach::probe_overhead_attached(&args.kind, args.calls, args.runs.max(1))
            .map_err(|e| format!("{e:#}"));
    }
    let (kind, goal_ns) = match args.kind.as_str() {
        "count" => (ProbeKind::Count, Some(15.0)),
        "hist" => (ProbeKind::Histogram { arg: 0 }, None),
        "latency" => (ProbeKind::Latency, Some(40.0)),
        other => return Err(format!("unknown --kind {other:?} (count, hist, latency)")),
    };
    let runs = args.runs.max(1);
    let threads = args.threads.max(1);
    sample(args.calls.min(100_000), threads); // warm up
    let (mut baseline, mut probed) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    let mut errors = 0u64;
    for _ in 0..runs {
        baseline.push(sample(args.calls, threads));
        let ids = evolve_probes::add(PATTERN, kind).map_err(|e| e.to_string())?;
        if ids.len() != 1 {
            return Err(format!("{PATTERN} matched {} functions", ids.len()));
        }
        probed.push(sample(args.calls, threads));
        let reading = evolve_probes::read(ids[0]).map_err(|e| e.to_string())?;
        evolve_probes::remove(ids[0]).map_err(|e| e.to_string())?;
        let seen = match &reading.latency {
            Some(l) => l.count,
            None if matches!(kind, ProbeKind::Histogram { .. }) => {
                reading.histogram.iter().map(|b| b.1).sum()
            }
            None => reading.calls,
        };
        let made = args.calls * threads;
        if reading.calls != made || seen != made {
            errors += 1;
        }
    }
    let (baseline_ns, probed_ns) = (median(&mut baseline), median(&mut probed));
    let cost = probed_ns - baseline_ns;
    Ok(json!({
        "scenario": "probe-overhead",
        "kind": args.kind,
        "calls_per_sample": args.calls,
        "threads": threads,
        "runs": runs,
        "baseline_ns": round3(baseline_ns),
        "probed_ns": round3(probed_ns),
        "probe_cost_ns": round3(cost),
        "goal_ns": goal_ns,
        "meets_goal": goal_ns.map(|g| cost <= g),
        "errors": errors,
    }))
}
