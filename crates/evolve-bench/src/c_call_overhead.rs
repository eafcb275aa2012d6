//! `c-call-overhead`: what a prepared C hot function (`EVOLVE_HOT`) costs per call, in one run
//! of one C program (`c/call_overhead.c`), against its baselines:
//!
//! - unpatched: the hot function (two one-byte NOPs at its entry) against the same function
//!   without the padding (`unpatched_ratio`, goal ≤ 1.01);
//! - patched: the hot function redirected, its call site retargeted to the new implementation,
//!   against a direct call of that implementation (`patched_ratio`, goal ≤ 1.05);
//! - through a function pointer, redirected (the entry's gate and slot: two extra jumps)
//!   against a pointer to the implementation (`patched_pointer_ratio`, no goal).
//!
//! Medians of repeated runs in ns per call; the loops alternate within every run.
//! `--only plain|hot|patched|direct --iters N` runs one loop once, for callgrind.

use crate::c_programs::{columns, options, Workspace};
use crate::stats::{median, round3};
use serde_json::{json, Value};

const SOURCE: &str = include_str!("../c/call_overhead.c");

/// `c-call-overhead [--iters N] [--runs R] [--only plain|hot|patched|direct]`.
pub fn run(args: &[String]) -> Result<Value, String> {
    let (iters, runs, only) = options(args, 20_000_000, 11);
    let workspace = Workspace::new("c-call-overhead")?;
    let exe = workspace.build("call_overhead", SOURCE, "")?;
    let mut argv = vec![iters.to_string(), runs.to_string()];
    if let Some(only) = &only {
        argv.push(only.clone());
        workspace.run(&exe, &argv)?;
        return Ok(json!({ "scenario": "c-call-overhead", "only": only, "iters": iters }));
    }
    let mut c = columns(&workspace.run(&exe, &argv)?, 6)?;
    let [plain, hot, patched, direct, patched_pointer, direct_pointer] =
        [0, 1, 2, 3, 4, 5].map(|i| median(&mut c[i]));
    Ok(json!({
        "scenario": "c-call-overhead",
        "iters": iters,
        "runs": runs,
        "plain_ns": round3(plain),
        "hot_ns": round3(hot),
        "unpatched_ratio": round3(hot / plain),
        "goal_unpatched_ratio": 1.01,
        "patched_ns": round3(patched),
        "direct_ns": round3(direct),
        "patched_ratio": round3(patched / direct),
        "goal_patched_ratio": 1.05,
        "patched_pointer_ns": round3(patched_pointer),
        "direct_pointer_ns": round3(direct_pointer),
        "patched_pointer_ratio": round3(patched_pointer / direct_pointer),
    }))
}
