//! `reclaim --updates N`: N successive patches of one function while threads keep calling it,
//! with reclamation (policy `scan`) running as it would in the background. Reports how many
//! patches stay resident, how much the process grew, and the longest stop-the-world pause.
//!
//! The patch is built once (`evolve-bench-reclaim` with `EVOLVE_BENCH_RECLAIM_VARIANT=2`, against
//! this running process) and applied N times from fresh copies of the file, each a new load that
//! supersedes the one before.

use crate::apply_latency::build_context;
use crate::stats::round3;
use evolve::hot::patch::apply;
use evolve::hot::reclaim::{collect, Policy};
use evolve_builder::so::{build_patch, Base, BuildOptions};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Arguments of the scenario.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Successive patches.
    #[arg(long, default_value_t = 1000)]
    pub updates: usize,
    /// Collect after every this many updates.
    #[arg(long, default_value_t = 10)]
    pub collect_every: usize,
    /// Threads calling the function meanwhile.
    #[arg(long, default_value_t = 2)]
    pub callers: usize,
    /// Accepted for uniformity: the output is always JSON.
    #[arg(long)]
    pub json: bool,
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Runs the scenario.
pub fn run(args: &Args) -> Result<Value, String> {
    if evolve_bench_reclaim::VARIANT != 1 {
        return Err("the bench was built with EVOLVE_BENCH_RECLAIM_VARIANT set: rebuild it".into());
    }
    let (manifest_path, profile, target) = build_context()?;
    let scratch = std::env::temp_dir().join(format!("evolve-reclaim-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    let result = measure(args, manifest_path, profile, target, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn measure(
    args: &Args,
    manifest_path: std::path::PathBuf,
    profile: String,
    target: std::path::PathBuf,
    scratch: &std::path::Path,
) -> Result<Value, String> {
    let built = build_patch(&BuildOptions {
        manifest_path,
        package: "evolve-bench-reclaim".into(),
        base: Base::Pid(std::process::id()),
        output: scratch.join("work.so"),
        profile,
        env: vec![
            ("CARGO_TARGET_DIR".into(), target.display().to_string()),
            ("EVOLVE_BENCH_RECLAIM_VARIANT".into(), "2".into()),
        ],
        features: Vec::new(),
        no_default_features: false,
        // The bench's own build: cargo resolves the dependencies' features for the whole
        // binary, and `evolve-bench-reclaim` alone would get other hashes.
        built_with: vec![env!("CARGO_PKG_NAME").to_string()],
    })
    .map_err(|e| e.to_string())?;

    let stop = AtomicBool::new(false);
    let (calls, wrong) = (AtomicU64::new(0), AtomicU64::new(0));
    let rss_start = rss_bytes();
    let mut max_pause_us = 0u64;
    let mut unloaded = 0usize;
    let mut max_resident = 0usize;
    let outcome = std::thread::scope(|s| -> Result<usize, String> {
        for t in 0..args.callers {
            let (stop, calls, wrong) = (&stop, &calls, &wrong);
            s.spawn(move || {
                let (mut n, mut bad) = (0u64, 0u64);
                let mut x = t as u64;
                while !stop.load(Ordering::Relaxed) {
                    x = x % 1000 + 1;
                    let r = evolve_bench_reclaim::work(x);
                    if r != x * 10 + 1 && r != x * 10 + 2 {
                        bad += 1;
                    }
                    n += 1;
                }
                calls.fetch_add(n, Ordering::Relaxed);
                wrong.fetch_add(bad, Ordering::Relaxed);
            });
        }
        let result = (|| {
            for i in 0..args.updates {
                let copy = scratch.join(format!("work-{i}.so"));
                std::fs::copy(&built.output, &copy).map_err(|e| e.to_string())?;
                apply(&copy).map_err(|e| format!("update {i}: {e}"))?;
                // The loaded object stays mapped; the file is not needed any more.
                let _ = std::fs::remove_file(&copy);
                if (i + 1) % args.collect_every.max(1) == 0 || i + 1 == args.updates {
                    let report = collect(Policy::Scan).map_err(|e| e.to_string())?;
                    max_pause_us = max_pause_us.max(report.max_pause_us);
                    unloaded += report.unloaded.len();
                    max_resident = max_resident.max(report.resident);
                }
            }
            // A few more collections, as a background collector would keep running.
            let mut resident = usize::MAX;
            for _ in 0..20 {
                let report = collect(Policy::Scan).map_err(|e| e.to_string())?;
                max_pause_us = max_pause_us.max(report.max_pause_us);
                unloaded += report.unloaded.len();
                resident = report.resident;
                if resident <= 2 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(resident)
        })();
        stop.store(true, Ordering::Relaxed);
        result
    });
    let resident_end = outcome?;
    let rss_growth_mb = (rss_bytes().saturating_sub(rss_start)) as f64 / (1 << 20) as f64;
    Ok(json!({
        "scenario": "reclaim",
        "updates": args.updates,
        "collect_every": args.collect_every,
        "unloaded": unloaded,
        "resident_patches_end": resident_end,
        "resident_patches_max": max_resident,
        "rss_growth_mb": round3(rss_growth_mb),
        "max_scan_pause_ms": round3(max_pause_us as f64 / 1e3),
        "calls_during": calls.load(Ordering::Relaxed),
        "errors": wrong.load(Ordering::Relaxed),
        "goal_resident_max": 10,
        "goal_rss_growth_mb_max": 20,
        "meets_goals": resident_end <= 10 && rss_growth_mb <= 20.0,
    }))
}
