//! `c-lock-elision`: single-threaded lock elision as the multiverse paper did for musl, in C
//! (`c/lock_elision.c`): `fputc`- and `malloc`-like paths whose lock functions are multiversed
//! on `threaded`, committed while one thread runs (the locks' call sites become NOPs) and
//! restored before a second thread starts, timed in one run against the always-locked build.
//!
//! `reduction` = 1 − committed / always locked, over both paths (the paper: 0.43 to 0.54);
//! per path too. The second-thread check is reported as `errors` when it fails.
//! `--only locked|dynamic|committed --iters N` for callgrind.

use crate::c_programs::{columns, flag, options, Workspace};
use crate::stats::{median, round3};
use serde_json::{json, Value};

const SOURCE: &str = include_str!("../c/lock_elision.c");

/// `c-lock-elision [--iters N] [--runs R] [--only locked|dynamic|committed]`.
pub fn run(args: &[String]) -> Result<Value, String> {
    let (iters, runs, only) = options(args, 10_000_000, 11);
    let workspace = Workspace::new("c-lock-elision")?;
    let exe = workspace.build("lock_elision", SOURCE, "")?;
    let mut argv = vec![iters.to_string(), runs.to_string()];
    if let Some(only) = &only {
        argv.push(only.clone());
        workspace.run(&exe, &argv)?;
        return Ok(json!({ "scenario": "c-lock-elision", "only": only, "iters": iters }));
    }
    let stdout = workspace.run(&exe, &argv)?;
    let mut c = columns(&stdout, 6)?;
    let [pl, pd, pc, ml, md, mc] = [0, 1, 2, 3, 4, 5].map(|i| median(&mut c[i]));
    let checks = ["locks_restored", "all_writes_counted", "elided_again"]
        .map(|k| flag(&stdout, k).unwrap_or(false));
    Ok(json!({
        "scenario": "c-lock-elision",
        "iters": iters,
        "runs": runs,
        "fputc": {
            "locked_ns": round3(pl), "dynamic_ns": round3(pd), "committed_ns": round3(pc),
            "reduction": round3(1.0 - pc / pl),
        },
        "malloc": {
            "locked_ns": round3(ml), "dynamic_ns": round3(md), "committed_ns": round3(mc),
            "reduction": round3(1.0 - mc / ml),
        },
        "reduction": round3(1.0 - (pc + mc) / (pl + ml)),
        "paper_reduction": "0.43 to 0.54",
        "second_thread": {
            "locks_restored": checks[0],
            "all_writes_counted": checks[1],
            "elided_again_after_join": checks[2],
        },
        "errors": checks.iter().filter(|ok| !**ok).count(),
    }))
}
