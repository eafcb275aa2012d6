//! `apply-latency`: apply a patch that changes 1000 hot functions to this very process, and
//! revert it, several rounds; medians of the phases `ApplyReport` measures.
//!
//! The functions live in `evolve-bench-hot`, linked into the bench. The patch is built once, by
//! `evolve_builder::so::build_patch`, from the same source against this running process
//! (`Base::Pid(std::process::id())`, the workspace this bench was built from, its profile and
//! target directory, found from `std::env::current_exe()`), compiled with
//! `EVOLVE_BENCH_VARIANT=2`: every function of the patch returns a different constant (symbol
//! hashes depend on the package's path, so the source must not move). Each round applies a fresh
//! copy of the file (a cold `dlopen`, names `r0`, `r1`, …), checks that every function returns its
//! new constant, reverts (`Revert::Last`) and checks the old ones.
//!
//! There is no PSU or Ginseng to run here: their published figures are quoted in the record as
//! reference constants, labelled as such.
//!
//! `--unprepared` measures unprepared functions instead: see [`crate::apply_unprepared`].

use crate::stats::{median, round3};
use evolve::hot::patch::{apply, revert, Revert};
use evolve_bench_hot::{expected, FUNCTIONS, VARIANT};
use evolve_builder::so::{build_patch, Base, BuildOptions};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Arguments of the scenario.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hot functions the patch changes (the bench links exactly 1000).
    #[arg(long, default_value_t = 1000)]
    pub functions: usize,
    /// Apply/revert rounds (medians are reported).
    #[arg(long, default_value_t = 7)]
    pub rounds: usize,
    /// Where to write the patch (default: a scratch directory, removed afterwards).
    #[arg(long)]
    pub patch_dir: Option<PathBuf>,
    /// Unprepared functions instead (the engine level): `evolve-plain`'s 1000 plain functions
    /// redirected through entry jumps and reference retargeting (see `apply_unprepared`).
    #[arg(long)]
    pub unprepared: bool,
    /// With `--unprepared`: threads calling the functions during every apply and revert.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Accepted for uniformity: the output is always JSON.
    #[arg(long)]
    pub json: bool,
}

/// How this binary was built: (workspace `Cargo.toml`, cargo profile, target directory).
pub fn build_context() -> Result<(PathBuf, String, PathBuf), String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let manifest = manifest
        .canonicalize()
        .map_err(|e| format!("{}: {e}", manifest.display()))?;
    let exe = std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .map_err(|e| format!("current_exe: {e}"))?;
    // <target>/<profile>/evolve-bench, or <target>/<profile>/deps/evolve_bench-… for tests.
    let mut dir = exe.parent().ok_or("the executable has no directory")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().ok_or("deps has no parent")?;
    }
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_string(),
        Some(name) => name.to_string(),
        None => return Err(format!("no profile directory above {}", exe.display())),
    };
    let target = dir.parent().ok_or("no target directory")?.to_path_buf();
    Ok((manifest, profile, target))
}

/// Checks that every function returns its constant of `variant`.
fn check(variant: u64) -> Result<(), String> {
    let wrong: Vec<usize> = FUNCTIONS
        .iter()
        .enumerate()
        .filter(|(i, f)| f() != expected(*i, variant))
        .map(|(i, _)| i)
        .collect();
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} functions do not return their variant-{variant} constant (first: f{} returns {})",
            wrong.len(),
            wrong[0],
            FUNCTIONS[wrong[0]]()
        ))
    }
}

/// Runs the scenario and returns its JSON record.
pub fn run(args: &Args) -> Result<Value, String> {
    if args.unprepared {
        return crate::apply_unprepared::run(args.functions, args.rounds, args.threads);
    }
    if args.functions != FUNCTIONS.len() {
        return Err(format!(
            "the bench links {} hot functions (evolve-bench-hot); --functions {} is not available",
            FUNCTIONS.len(),
            args.functions
        ));
    }
    if VARIANT != 1 {
        return Err("the bench was built with EVOLVE_BENCH_VARIANT set: rebuild it without".into());
    }
    check(1)?;
    let (manifest_path, profile, target) = build_context()?;
    let scratch = args.patch_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("evolve-apply-latency-{}", std::process::id()))
    });
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let result = measure(args, &manifest_path, &profile, &target, &scratch);
    if args.patch_dir.is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    result
}

fn measure(
    args: &Args,
    manifest_path: &Path,
    profile: &str,
    target: &Path,
    scratch: &Path,
) -> Result<Value, String> {
    let patch = scratch.join("apply-latency.so");
    let build_start = Instant::now();
    let built = build_patch(&BuildOptions {
        manifest_path: manifest_path.to_path_buf(),
        package: "evolve-bench-hot".into(),
        base: Base::Pid(std::process::id()),
        output: patch.clone(),
        profile: profile.to_string(),
        env: vec![
            ("CARGO_TARGET_DIR".into(), target.display().to_string()),
            ("EVOLVE_BENCH_VARIANT".into(), "2".into()),
        ],
        features: Vec::new(),
        no_default_features: false,
        built_with: Vec::new(),
    })
    .map_err(|e| format!("building the patch: {e}"))?;
    let build_s = build_start.elapsed().as_secs_f64();
    if built.manifest.functions.len() != args.functions {
        return Err(format!(
            "the patch implements {} functions, expected {}",
            built.manifest.functions.len(),
            args.functions
        ));
    }

    let rounds = args.rounds.max(1);
    let (mut verify, mut load, mut apply_ms, mut total, mut revert_ms) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut names = Vec::new();
    for round in 0..rounds {
        // A fresh file per round: a cold dlopen each time, not a reference count bump.
        let copy = scratch.join(format!("r{round}.so"));
        std::fs::copy(&patch, &copy).map_err(|e| format!("{}: {e}", copy.display()))?;
        let report = apply(&copy).map_err(|e| format!("round {round}: apply: {e}"))?;
        if report.updated.len() != args.functions {
            return Err(format!(
                "round {round}: {} functions updated, expected {}",
                report.updated.len(),
                args.functions
            ));
        }
        check(2).map_err(|e| format!("round {round}, after apply: {e}"))?;
        verify.push(report.verify_ms);
        load.push(report.load_ms);
        apply_ms.push(report.apply_ms);
        total.push(report.total_ms);
        names.push(report.patch);
        let start = Instant::now();
        let changed = revert(Revert::Last).map_err(|e| format!("round {round}: revert: {e}"))?;
        revert_ms.push(start.elapsed().as_secs_f64() * 1e3);
        if changed.len() != args.functions {
            return Err(format!("round {round}: revert changed {}", changed.len()));
        }
        check(1).map_err(|e| format!("round {round}, after revert: {e}"))?;
    }
    let first_total_ms = total[0];
    let med = |v: &mut Vec<f64>| median(v);
    let (verify_ms, load_ms, apply_med, total_ms, revert_med) = (
        med(&mut verify),
        med(&mut load),
        med(&mut apply_ms),
        med(&mut total),
        med(&mut revert_ms),
    );
    let n = args.functions as f64;
    // Published figures (not measured here).
    let psu_us_per_function = 5.0;
    let ginseng_ms = 5.0;
    let psu_equivalent_ms = psu_us_per_function * n / 1e3;
    Ok(json!({
        "scenario": "apply-latency",
        "functions": args.functions,
        "rounds": rounds,
        "patches": names,
        "profile": profile,
        "build_s": round3(build_s),
        "compile_s": round3(built.compile_seconds),
        "verify_ms": round3(verify_ms),
        "load_ms": round3(load_ms),
        "apply_ms": round3(apply_med),
        "total_ms": round3(total_ms),
        "revert_ms": round3(revert_med),
        "first_total_ms": round3(first_total_ms),
        "total_us_per_function": round3(total_ms * 1e3 / n),
        "apply_us_per_function": round3(apply_med * 1e3 / n),
        "goal_apply_ms_max": 1.0,
        "goal_total_ms_max": 20.0,
        "meets_goals": apply_med <= 1.0 && total_ms <= 20.0,
        "published_reference": {
            "note": "published figures, not measured here",
            "psu_us_per_function": psu_us_per_function,
            "psu_ms_for_this_many_functions": psu_equivalent_ms,
            "ginseng_ms_upper_bound": ginseng_ms,
        },
        "total_vs_psu_published": round3(total_ms / psu_equivalent_ms),
        "verified": "every function returned its new constant after each apply and its old one after each revert",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_links_1000_hot_functions_returning_variant_1() {
        assert_eq!(FUNCTIONS.len(), 1000);
        assert_eq!(VARIANT, 1);
        check(1).unwrap();
        assert!(check(2).is_err());
        let names: Vec<String> = evolve::hot::patch::functions()
            .into_iter()
            .map(|f| f.name)
            .filter(|n| n.starts_with("evolve_bench_hot::"))
            .collect();
        assert_eq!(names.len(), 1000);
    }

    #[test]
    fn the_build_context_is_found_from_the_executable() {
        let (manifest, profile, target) = build_context().unwrap();
        assert!(manifest.ends_with("Cargo.toml") && manifest.exists());
        assert!(!profile.is_empty());
        assert!(target.is_dir());
        assert!(run(&Args {
            functions: 3,
            rounds: 1,
            patch_dir: None,
            unprepared: false,
            threads: 0,
            json: true
        })
        .is_err());
    }

    /// The whole scenario (builds a patch of the bench's crate against the test binary: slow).
    #[test]
    #[ignore = "compiles a patch; run with --ignored"]
    fn apply_and_revert_rounds_report_medians() {
        let r = run(&Args {
            functions: 1000,
            rounds: 2,
            patch_dir: None,
            unprepared: false,
            threads: 0,
            json: true,
        })
        .unwrap();
        assert_eq!(r["functions"], 1000);
        assert_eq!(r["patches"].as_array().unwrap().len(), 2);
        for key in [
            "verify_ms",
            "load_ms",
            "apply_ms",
            "total_ms",
            "revert_ms",
            "build_s",
        ] {
            assert!(r[key].as_f64().unwrap() >= 0.0, "{key}");
        }
    }
}
