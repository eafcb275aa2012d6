//! `patch-sites`: retarget N live sites as one batch, and back, against the same sites
//! retargeted one batch per site (what a tool without batching does: one permission change and
//! one core sync per site).

use crate::stats::{median_ms, round3};
use evolve::code::{Batch, FnSite, Placement};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Arguments of the scenario.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Number of sites.
    #[arg(long, default_value_t = 10_000)]
    pub sites: usize,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 11)]
    pub runs: usize,
    /// Where the sites lie: `aligned` (atomic store), `cross` (int3 protocol), or `mixed` (half
    /// each, as call sites at arbitrary offsets are).
    #[arg(long, default_value = "mixed")]
    pub layout: String,
    /// Threads calling through the sites while they are patched.
    #[arg(long, default_value_t = 0)]
    pub callers: usize,
}

#[inline(never)]
extern "C" fn first() -> u64 {
    std::hint::black_box(1)
}

#[inline(never)]
extern "C" fn second() -> u64 {
    std::hint::black_box(2)
}

type F = extern "C" fn() -> u64;

/// Runs the scenario and returns its JSON record.
pub fn run(args: &Args) -> Result<Value, String> {
    let placement = |i: usize| match args.layout.as_str() {
        "aligned" => Ok(Placement::Aligned),
        "cross" => Ok(Placement::CrossWord),
        "mixed" if i.is_multiple_of(2) => Ok(Placement::Aligned),
        "mixed" => Ok(Placement::CrossWord),
        other => Err(format!("unknown layout {other:?}: aligned, cross or mixed")),
    };
    let (one, two) = (first as F, second as F);
    let sites = (0..args.sites)
        .map(|i| FnSite::with_placement(one, placement(i)?).map_err(|e| e.to_string()))
        .collect::<Result<Vec<FnSite<F>>, String>>()?;
    let entries: Vec<F> = sites.iter().map(FnSite::entry).collect();
    let forward = batch(&sites, one, two);
    let backward = batch(&sites, two, one);

    let stop = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    let mut last = None;
    let running = std::sync::atomic::AtomicUsize::new(0);
    let record = std::thread::scope(|s| {
        for t in 0..args.callers {
            let (stop, calls, entries, running) = (&stop, &calls, &entries, &running);
            s.spawn(move || {
                let mut n = 0u64;
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    assert!(matches!(entries[i % entries.len()](), 1 | 2));
                    i = i.wrapping_add(7);
                    n += 1;
                    if n == 1 {
                        running.fetch_add(1, Ordering::Release);
                    }
                }
                calls.fetch_add(n, Ordering::Relaxed);
            });
        }
        // The callers really call while sites change (on a loaded machine a thread may not
        // have run at all yet).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while running.load(Ordering::Acquire) < args.callers && std::time::Instant::now() < deadline
        {
            std::thread::yield_now();
        }
        let mut retarget_samples = Vec::new();
        let mut restore_samples = Vec::new();
        for _ in 0..args.runs.max(1) {
            retarget_samples.push(median_ms(1, || last = Some(forward.apply().unwrap())));
            restore_samples.push(median_ms(1, || {
                backward.apply().unwrap();
            }));
        }
        // The baseline: the same change, one batch (one permission change, one sync) per site.
        let baseline_runs = args.runs.clamp(1, 3);
        let unbatched_ms = median_ms(baseline_runs, || {
            for site in &sites {
                site.retarget(one, two).unwrap();
            }
            backward.apply().unwrap();
        });
        stop.store(true, Ordering::Relaxed);
        (
            crate::stats::median(&mut retarget_samples),
            crate::stats::median(&mut restore_samples),
            unbatched_ms,
        )
    });
    let (retarget_ms, restore_ms, unbatched_ms) = record;
    let report = last.expect("at least one run");
    assert!(entries.iter().all(|f| f() == 1), "sites not restored");
    Ok(json!({
        "scenario": "patch-sites",
        "sites": args.sites,
        "layout": args.layout,
        "callers": args.callers,
        "runs": args.runs,
        "retarget_ms": round3(retarget_ms),
        "restore_ms": round3(restore_ms),
        "per_site_us": round3(retarget_ms * 1e3 / args.sites as f64),
        "stored": report.stored,
        "via_int3": report.via_int3,
        "core_syncs": report.core_syncs,
        "mprotects": report.mprotects,
        "baseline_unbatched_ms": round3(unbatched_ms),
        "batch_speedup": round3(unbatched_ms / retarget_ms),
        "goal_ms": 16.0,
        "meets_goal": retarget_ms <= 16.0,
        "calls_during": calls.load(Ordering::Relaxed),
    }))
}

fn batch(sites: &[FnSite<F>], from: F, to: F) -> Batch {
    let mut batch = Batch::new();
    for site in sites {
        site.retarget_in(&mut batch, from, to);
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_sites_record_counts_every_site_and_leaves_them_restored() {
        let args = Args {
            sites: 64,
            runs: 3,
            layout: "mixed".into(),
            callers: 2,
        };
        let record = run(&args).unwrap();
        assert_eq!(record["sites"], 64);
        assert_eq!(record["stored"], 32);
        assert_eq!(record["via_int3"], 32);
        assert_eq!(record["core_syncs"], 3);
        assert!(record["retarget_ms"].as_f64().unwrap() > 0.0);
        assert!(record["calls_during"].as_u64().unwrap() > 0);
    }

    #[test]
    fn an_unknown_layout_is_refused() {
        let args = Args {
            sites: 4,
            runs: 1,
            layout: "diagonal".into(),
            callers: 0,
        };
        assert!(run(&args)
            .unwrap_err()
            .contains("unknown layout \"diagonal\""));
    }
}
