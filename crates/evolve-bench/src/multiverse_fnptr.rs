//! `multiverse-fnptr`: a function-pointer switch (the multiverse paper's PV-ops case), timed in
//! the same run three ways around one small function (a 64-bit mixer, so the call is a visible
//! part of the cost):
//!
//! - `indirect`: `MIX.call(x)` before commit: a direct call of the switch's dispatcher, which
//!   loads the current function and jumps to it;
//! - `committed`: the same call sites after `commit_refs(&MIX)`: a direct `call` of the mixer;
//! - `direct`: the source calling the mixer by name (the baseline);
//! - `plain_pointer`: what one writes without Evolve, `(MIX.get())(x)` (an atomic load and an
//!   indirect call per call), for reference.
//!
//! Reports medians of repeated runs in ns per call and `committed_ratio` = committed / direct.

use crate::stats::{median, option_value, round3};
use serde_json::{json, Value};
use std::hint::black_box;
use std::time::Instant;

/// A 64-bit finaliser (MurmurHash3's): a few cycles, no memory access.
#[inline(never)]
fn mix_murmur(x: u64) -> u64 {
    let x = (x ^ (x >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 33)
}

/// Another mixer of the same cost, the switch's initial value (so the commit changes the
/// binding to `mix_murmur`).
#[inline(never)]
fn mix_fibonacci(x: u64) -> u64 {
    x.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29)
}

#[evolve::switch(in [mix_fibonacci, mix_murmur])]
static MIX: fn(u64) -> u64 = mix_fibonacci;

/// The switch's call site: indirect before commit, a direct call of the bound mixer after.
#[inline(never)]
fn run_switch(n: u64) -> u64 {
    let mut acc: u64 = 0;
    for i in 0..n {
        acc = acc.wrapping_add(MIX.call(i));
    }
    acc
}

#[inline(never)]
fn run_direct(n: u64) -> u64 {
    let mut acc: u64 = 0;
    for i in 0..n {
        acc = acc.wrapping_add(mix_murmur(i));
    }
    acc
}

#[inline(never)]
fn run_plain_pointer(n: u64) -> u64 {
    let mut acc: u64 = 0;
    for i in 0..n {
        acc = acc.wrapping_add((MIX.get())(i));
    }
    acc
}

fn ns_per_call(n: u64, f: fn(u64) -> u64, expected: u64) -> Result<f64, String> {
    let start = Instant::now();
    let result = f(black_box(n));
    let ns = start.elapsed().as_secs_f64() * 1e9 / n as f64;
    if result != expected {
        return Err(format!(
            "a run computed {result:#x}, the direct run {expected:#x}"
        ));
    }
    Ok(ns)
}

/// `multiverse-fnptr [--iters N] [--runs R] [--only indirect|committed|direct|plain-pointer]`.
///
/// `--only` runs one configuration for `--iters` calls and nothing else, for
/// `valgrind --tool=callgrind` (instructions per call = difference of two runs / difference of
/// their iterations).
pub fn run(args: &[String]) -> Result<Value, String> {
    let opt = |name: &str| option_value(args, name);
    let iters: u64 = opt("--iters")
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000_000);
    let runs: usize = opt("--runs").and_then(|v| v.parse().ok()).unwrap_or(11);
    MIX.set(mix_murmur);
    if let Some(only) = opt("--only") {
        let result = match only.as_str() {
            "indirect" => run_switch(iters),
            "direct" => run_direct(iters),
            "plain-pointer" => run_plain_pointer(iters),
            "committed" => {
                evolve::multiverse::commit_refs(&MIX).map_err(|e| e.to_string())?;
                let result = run_switch(iters);
                evolve::multiverse::revert_refs(&MIX).map_err(|e| e.to_string())?;
                result
            }
            other => {
                return Err(format!(
                    "--only {other}: expected indirect, committed, direct or plain-pointer"
                ))
            }
        };
        return Ok(json!({
            "scenario": "multiverse-fnptr",
            "only": only,
            "iters": iters,
            "result": result,
        }));
    }
    let expected = run_direct(iters);
    let (mut indirect, mut committed, mut direct, mut pointer) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut report = evolve::multiverse::CommitReport::default();
    for _ in 0..runs {
        direct.push(ns_per_call(iters, run_direct, expected)?);
        indirect.push(ns_per_call(iters, run_switch, expected)?);
        pointer.push(ns_per_call(iters, run_plain_pointer, expected)?);
        report = evolve::multiverse::commit_refs(&MIX).map_err(|e| e.to_string())?;
        committed.push(ns_per_call(iters, run_switch, expected)?);
        evolve::multiverse::revert_refs(&MIX).map_err(|e| e.to_string())?;
    }
    MIX.set(mix_fibonacci);
    let (i, c, d, p) = (
        median(&mut indirect),
        median(&mut committed),
        median(&mut direct),
        median(&mut pointer),
    );
    Ok(json!({
        "scenario": "multiverse-fnptr",
        "iters": iters,
        "runs": runs,
        "indirect_ns": round3(i),
        "committed_ns": round3(c),
        "direct_ns": round3(d),
        "plain_pointer_ns": round3(p),
        "committed_ratio": round3(c / d),
        "indirect_ratio": round3(i / d),
        "switches_changed": report.changed,
        "sites_written": report.batch.changed,
        "call_sites": MIX.call_sites(),
    }))
}
