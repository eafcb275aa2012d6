//! `thread-create`: the cost of creating and joining a thread with Evolve active, against the
//! same measurement in a process that never touched Evolve.
//!
//! Both sides run in fresh child processes of the bench itself (the same binary, started with
//! the hidden `--child plain|evolve`), alternated: `plain` measures before anything of Evolve
//! runs; `evolve` first activates it — the hot-update state initialised (`functions()`), every
//! hot stub of the program registered with the engine, and one int3-protocol retarget done (which
//! installs the engine's SIGTRAP handler) — then measures the same way. Evolve adds no per-thread
//! work, so the ratio should be about 1 (PSU's per-thread counters cost it 24×).

use crate::stats::{median, round3};
use evolve::code::{FnSite, Placement};
use serde_json::{json, Value};
use std::hint::black_box;
use std::process::Command;
use std::time::Instant;

/// Arguments of the scenario.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Threads created and joined (one after another) per sample.
    #[arg(long, default_value_t = 500)]
    pub threads: usize,
    /// Samples per child (the median is reported).
    #[arg(long, default_value_t = 11)]
    pub runs: usize,
    /// Child processes per side, alternated (the median of their medians is reported).
    #[arg(long, default_value_t = 3)]
    pub children: usize,
    /// Internal: measure in this process, `plain` or `evolve`.
    #[arg(long, hide = true)]
    pub child: Option<String>,
    /// Accepted for uniformity: the output is always JSON.
    #[arg(long)]
    pub json: bool,
}

#[inline(never)]
extern "C" fn first() -> u64 {
    black_box(1)
}

#[inline(never)]
extern "C" fn second() -> u64 {
    black_box(2)
}

type F = extern "C" fn() -> u64;

/// Activates Evolve in this process; returns how many hot stubs were registered.
pub fn activate() -> Result<usize, String> {
    let functions = evolve::hot::patch::functions().len();
    let mut stubs = 0;
    for entry in evolve::code::stub::STUBS.iter() {
        evolve::code::stub::Stub::of(entry).map_err(|e| e.to_string())?;
        stubs += 1;
    }
    // One retarget by the int3 protocol (a site across an 8-byte boundary) and back: the engine
    // installs its SIGTRAP handler.
    let site =
        FnSite::with_placement(first as F, Placement::CrossWord).map_err(|e| e.to_string())?;
    site.retarget(first, second).map_err(|e| e.to_string())?;
    if (site.entry())() != 2 {
        return Err("the int3 retarget did not take".into());
    }
    site.retarget(second, first).map_err(|e| e.to_string())?;
    if functions != stubs {
        return Err(format!("{functions} hot functions but {stubs} stubs"));
    }
    // The site stays alive (and registered) for the rest of the process.
    std::mem::forget(site);
    Ok(stubs)
}

/// Median microseconds to create and join one thread.
fn measure(threads: usize, runs: usize) -> f64 {
    let once = || {
        std::thread::spawn(|| black_box(crate::call_overhead::hot(black_box(1))))
            .join()
            .unwrap();
    };
    for _ in 0..threads.min(50) {
        once();
    }
    let mut samples: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let start = Instant::now();
            for _ in 0..threads.max(1) {
                once();
            }
            start.elapsed().as_secs_f64() * 1e6 / threads.max(1) as f64
        })
        .collect();
    median(&mut samples)
}

fn child(mode: &str, args: &Args) -> Result<Value, String> {
    let stubs = match mode {
        "plain" => 0,
        "evolve" => activate()?,
        other => return Err(format!("unknown child mode {other:?}")),
    };
    Ok(json!({
        "mode": mode,
        "stubs_registered": stubs,
        "us": measure(args.threads, args.runs),
    }))
}

fn spawn_child(mode: &str, args: &Args) -> Result<Value, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let output = Command::new(exe)
        .args(["thread-create", "--child", mode])
        .args(["--threads", &args.threads.to_string()])
        .args(["--runs", &args.runs.to_string()])
        .output()
        .map_err(|e| format!("cannot start the {mode} child: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "the {mode} child failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|e| format!("the {mode} child printed {line:?}: {e}"))
}

/// Runs the scenario (or, with `--child`, one side of it) and returns its JSON record.
pub fn run(args: &Args) -> Result<Value, String> {
    if let Some(mode) = &args.child {
        return child(mode, args);
    }
    let mut plain = Vec::new();
    let mut evolve = Vec::new();
    let mut stubs = 0;
    for _ in 0..args.children.max(1) {
        plain.push(
            spawn_child("plain", args)?["us"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
        let e = spawn_child("evolve", args)?;
        stubs = e["stubs_registered"].as_u64().unwrap_or(0);
        evolve.push(e["us"].as_f64().unwrap_or(f64::NAN));
    }
    let (plain_us, evolve_us) = (median(&mut plain.clone()), median(&mut evolve.clone()));
    let ratio = evolve_us / plain_us;
    Ok(json!({
        "scenario": "thread-create",
        "threads_per_sample": args.threads,
        "runs": args.runs.max(1),
        "children_per_side": args.children.max(1),
        "stubs_registered": stubs,
        "plain_us": round3(plain_us),
        "evolve_us": round3(evolve_us),
        "ratio": round3(ratio),
        "plain_child_us": plain.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
        "evolve_child_us": evolve.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
        "goal_ratio_max": 1.05,
        "meets_goal": ratio <= 1.05,
        "psu_published_ratio": "24 (PSU paper; published, not measured here)",
        "evolve_active": "hot-update state initialised, every hot stub registered with the engine, SIGTRAP handler installed by one int3 retarget",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_measure_and_evolve_registers_every_stub() {
        let args = Args {
            threads: 5,
            runs: 3,
            children: 1,
            child: Some("plain".into()),
            json: true,
        };
        let plain = run(&args).unwrap();
        assert_eq!(plain["stubs_registered"], 0);
        assert!(plain["us"].as_f64().unwrap() > 0.0);
        let evolve = run(&Args {
            child: Some("evolve".into()),
            ..args
        })
        .unwrap();
        // call-overhead's `hot` and apply-latency's 1000.
        assert!(
            evolve["stubs_registered"].as_u64().unwrap() >= 1001,
            "{evolve}"
        );
        assert!(evolve["us"].as_f64().unwrap() > 0.0);
    }
}
