//! `c-multiverse-spinlock`: the multiverse paper's Figure 1 in C (`c/spinlock.c`): a spinlock
//! elided on a single CPU, with `EVOLVE_MULTIVERSE` lock functions, timed in one run against
//! the statically specialised build of the same functions:
//!
//! - `static`: compiled for one CPU (the switch a constant: the functions do nothing), and
//!   called, as the paper's static build calls them (and as a caller in another translation
//!   unit does);
//! - `dynamic`: the generic code, branching on the switch at every call;
//! - `committed`: after `evolve_commit_refs(single_cpu)` (the empty variant: 5-byte NOPs at the
//!   call sites);
//! - `inlined`: the lock compiled out entirely (a macro on a constant), for reference.
//!
//! Medians of repeated runs in ns per lock/unlock pair; `committed_ratio` = committed / static
//! (goal ≤ 1.03; the paper: 1.13), `committed_vs_inlined` = committed / inlined.
//! `--only static|dynamic|committed|inlined --iters N` for callgrind.

use crate::c_programs::{columns, options, Workspace};
use crate::stats::{median, round3};
use serde_json::{json, Value};

const SOURCE: &str = include_str!("../c/spinlock.c");

/// `c-multiverse-spinlock [--iters N] [--runs R] [--only static|dynamic|committed|inlined]`.
pub fn run(args: &[String]) -> Result<Value, String> {
    let (iters, runs, only) = options(args, 20_000_000, 11);
    let workspace = Workspace::new("c-multiverse-spinlock")?;
    let exe = workspace.build("spinlock", SOURCE, "")?;
    let mut argv = vec![iters.to_string(), runs.to_string()];
    if let Some(only) = &only {
        argv.push(only.clone());
        workspace.run(&exe, &argv)?;
        return Ok(json!({ "scenario": "c-multiverse-spinlock", "only": only, "iters": iters }));
    }
    let mut c = columns(&workspace.run(&exe, &argv)?, 4)?;
    let [s, d, co, inl] = [0, 1, 2, 3].map(|i| median(&mut c[i]));
    Ok(json!({
        "scenario": "c-multiverse-spinlock",
        "iters": iters,
        "runs": runs,
        "static_ns": round3(s),
        "dynamic_ns": round3(d),
        "committed_ns": round3(co),
        "committed_ratio": round3(co / s),
        "dynamic_ratio": round3(d / s),
        "inlined_ns": round3(inl),
        "committed_vs_inlined": round3(co / inl),
        "goal_committed_ratio": 1.03,
        "paper_committed_ratio": 1.13,
    }))
}
