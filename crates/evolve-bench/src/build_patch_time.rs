//! `build-patch-time`: building a format-2 patch of a one-line change, against the user's
//! incremental `cargo build --release` of the same kind of change (goal: `ratio` ≤ 2).
//!
//! The program is a private copy of the async http example (`examples/http`: Tokio, axum and
//! `evolve`, which brings serde, object, iced-x86, libloading, …), built once; its binary stands
//! for the running program. Each round makes two one-line changes to `http-handlers` (the
//! version string `version()` returns): one is built by
//! `cargo build --release -p http-server` (the baseline), the other by
//! `evolve_builder::build_patch` against the program (discovery, the rebuild, the comparison of
//! every function of the workspace crates with the running code, the patch written). Which goes
//! first alternates between rounds; the figures are medians over the rounds.

use crate::stats::{median, round3};
use evolve_demo::workspace::{ExampleWorkspace, Flavor, HTTP};
use serde_json::{json, Value};
use std::time::Instant;

/// Arguments of the scenario.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Rounds (each: one cargo build, one patch build).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Accepted for uniformity: the output is always JSON.
    #[arg(long)]
    pub json: bool,
}

const FILE: &str = "http-handlers/src/lib.rs";

/// Runs the scenario.
pub fn run(args: &Args) -> Result<Value, String> {
    let fail = |e: anyhow::Error| format!("{e:#}");
    let workspace = ExampleWorkspace::prepare_example(&HTTP, "build-patch-time").map_err(fail)?;
    let binary = workspace.build(Flavor::Evolve).map_err(fail)?;
    let mut version = 0u32;
    let mut next_edit = || -> Result<(), String> {
        let old = format!("\"1.0.{version}\"");
        version += 1;
        let new = format!("\"1.0.{version}\"");
        workspace
            .edit(FILE, &old, &new)
            .map_err(|e| format!("{e:#}"))
    };
    let (mut cargo_s, mut patch_s, mut compile_s, mut compare_s) = (vec![], vec![], vec![], vec![]);
    let mut carried = Vec::new();
    let mut compared = 0;
    for round in 0..args.runs.max(1) {
        for step in 0..2 {
            next_edit()?;
            if (round + step) % 2 == 0 {
                let started = Instant::now();
                workspace.rebuild().map_err(fail)?;
                cargo_s.push(started.elapsed().as_secs_f64());
            } else {
                let mut options = evolve_builder::BuildOptions::new(
                    workspace.dir.join("Cargo.toml"),
                    evolve_builder::Base::Path(binary.clone()),
                    workspace.dir.join(format!("patch-{round}.o")),
                );
                options.env = vec![(
                    "CARGO_TARGET_DIR".into(),
                    workspace.target.display().to_string(),
                )];
                let started = Instant::now();
                let report = evolve_builder::build_patch(&options).map_err(|e| e.to_string())?;
                patch_s.push(started.elapsed().as_secs_f64());
                compile_s.push(report.compile_seconds);
                compare_s.push(report.compare_seconds);
                compared = report.compared;
                carried = report
                    .carried
                    .iter()
                    .map(|c| format!("{} ({})", c.name, c.reason))
                    .collect();
            }
        }
    }
    let cargo = median(&mut cargo_s);
    let patch = median(&mut patch_s);
    Ok(json!({
        "scenario": "build-patch-time",
        "program": "examples/http (Tokio + axum), one-line change in http-handlers",
        "runs": args.runs,
        "cargo_build_s": round3(cargo),
        "build_patch_s": round3(patch),
        "build_patch_cargo_s": round3(median(&mut compile_s)),
        "build_patch_compare_s": round3(median(&mut compare_s)),
        "ratio": round3(patch / cargo),
        "goal_ratio": 2.0,
        "functions_compared": compared,
        "carried": carried,
    }))
}
