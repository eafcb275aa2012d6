//! `apply-latency --unprepared`: the engine's part of applying a patch of 1000 unprepared
//! functions — entry redirects written with the world stopped, then every reference retargeted
//! (direct call sites and GOT slots) — and of reverting it, while threads call the functions.
//!
//! The functions are `evolve-plain`'s 1000 plain `v1::fK` (no Evolve mark; odd ones have a
//! multi-instruction entry a thread can be stopped inside), their replacements its `v2::fK`,
//! linked into this binary: the engine-level scenario. The hot-update layer will make the same
//! steps go through a real patch object (loading and verifying it come on top).
//!
//! `max_pause_ms` is the longest stop of the world of an apply, measured around the whole stop
//! (signalling every thread, waiting for each to park, the writes, waking them): an upper
//! bound of the pause any calling thread saw. `total_ms` is the whole apply: looking up the
//! 1000 functions and their versions, checking and redirecting every entry, finding every
//! reference (the branch index of the executable is built once per process, before the
//! rounds, and reported as `index_build_ms`) and retargeting them. Goals (issue 11):
//! `max_pause_ms` ≤ 2, `total_ms` ≤ 50. Medians over rounds; the maximum pause is the largest
//! of all rounds.

use crate::stats::{median, round3};
use evolve::code::redirect::{self, Function, References, Retarget};
use evolve_plain::{expected, v1, v2, COUNT};
use serde_json::{json, Value};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

type Unary = fn(u64) -> u64;

/// Runs the scenario: `functions` (all 1000), `rounds` apply/revert rounds, `threads` calling
/// threads.
pub fn run(functions: usize, rounds: usize, threads: usize) -> Result<Value, String> {
    if functions != COUNT {
        return Err(format!(
            "the bench links {COUNT} plain functions (evolve-plain); --functions {functions} is \
             not available"
        ));
    }
    check(1)?;
    let index_start = Instant::now();
    evolve::code::inspect::branch_index().map_err(|e| e.to_string())?;
    let index_build_ms = index_start.elapsed().as_secs_f64() * 1e3;

    let stop = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    let errors = AtomicU64::new(0);
    let measured = std::thread::scope(|s| {
        for t in 0..threads {
            let (stop, calls, errors) = (&stop, &calls, &errors);
            s.spawn(move || {
                let (mut n, mut k, mut x) = (0u64, t * 7 % COUNT, t as u64);
                while !stop.load(Ordering::Relaxed) {
                    let through_got = evolve_plain::call_direct(k, x);
                    let through_pointer = (black_box(&v1::ALL)[k])(x);
                    for r in [through_got, through_pointer] {
                        if r != expected(k, 1, x) && r != expected(k, 2, x) {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    n += 2;
                    k = (k + 1) % COUNT;
                    x = x.wrapping_add(0x9e37);
                }
                calls.fetch_add(n, Ordering::Relaxed);
            });
        }
        let result = rounds_of(rounds.max(1));
        stop.store(true, Ordering::Relaxed);
        result
    })?;
    let Measured {
        mut total,
        mut install,
        mut find,
        mut retarget,
        mut revert,
        max_pause,
        max_revert_pause,
        stops,
        code_sites,
        got_slots,
    } = measured;
    let total_ms = median(&mut total);
    let max_pause_ms = max_pause.as_secs_f64() * 1e3;
    Ok(json!({
        "scenario": "apply-latency",
        "unprepared": true,
        "functions": functions,
        "rounds": rounds.max(1),
        "threads": threads,
        "calls_checked": calls.load(Ordering::Relaxed),
        "errors": errors.load(Ordering::Relaxed),
        "max_pause_ms": round3(max_pause_ms),
        "total_ms": round3(total_ms),
        "install_ms": round3(median(&mut install)),
        "find_references_ms": round3(median(&mut find)),
        "retarget_ms": round3(median(&mut retarget)),
        "revert_ms": round3(median(&mut revert)),
        "revert_max_pause_ms": round3(max_revert_pause.as_secs_f64() * 1e3),
        "stops_per_apply": stops,
        "index_build_ms": round3(index_build_ms),
        "code_sites": code_sites,
        "got_slots": got_slots,
        "goal_max_pause_ms": 2.0,
        "goal_total_ms": 50.0,
        "meets_goals": max_pause_ms <= 2.0 && total_ms <= 50.0,
        "what": "engine level: entry redirects of evolve-plain's 1000 functions to their v2 (in this binary), then their direct call sites and GOT slots retargeted; revert restores references then entries",
    }))
}

struct Measured {
    total: Vec<f64>,
    install: Vec<f64>,
    find: Vec<f64>,
    retarget: Vec<f64>,
    revert: Vec<f64>,
    max_pause: Duration,
    max_revert_pause: Duration,
    stops: Vec<usize>,
    code_sites: usize,
    got_slots: usize,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

fn rounds_of(rounds: usize) -> Result<Measured, String> {
    let mut m = Measured {
        total: Vec::new(),
        install: Vec::new(),
        find: Vec::new(),
        retarget: Vec::new(),
        revert: Vec::new(),
        max_pause: Duration::ZERO,
        max_revert_pause: Duration::ZERO,
        stops: Vec::new(),
        code_sites: 0,
        got_slots: 0,
    };
    let err = |e: evolve::code::Error| e.to_string();
    for round in 0..rounds {
        let start = Instant::now();
        let program: Vec<Function> = v1::ALL
            .iter()
            .map(|&f| Function::from_fn(f as Unary))
            .collect::<Result<_, _>>()
            .map_err(err)?;
        let versions: Vec<Function> = v2::ALL
            .iter()
            .map(|&f| Function::from_fn(f as Unary))
            .collect::<Result<_, _>>()
            .map_err(err)?;
        let pairs: Vec<(&Function, &Function)> = program.iter().zip(&versions).collect();
        let phase = Instant::now();
        let installed = redirect::install(&pairs).map_err(err)?;
        m.install.push(ms(phase));
        let phase = Instant::now();
        // All at once, as the hot layer finds them: the GOT and the installed redirects are
        // read once for the 1000 functions, not once per function.
        let program_refs: Vec<&Function> = program.iter().collect();
        let refs = References::find_many(&program_refs, &[]).map_err(err)?;
        m.find.push(ms(phase));
        let phase = Instant::now();
        let mut batch = Retarget::new();
        for (r, (f, v)) in refs.iter().zip(&pairs) {
            batch.retarget(r, f, v).map_err(err)?;
        }
        batch.apply().map_err(err)?;
        m.retarget.push(ms(phase));
        m.total.push(ms(start));
        m.max_pause = m.max_pause.max(installed.stops.longest);
        m.stops.push(installed.stops.stops);
        m.code_sites = refs.iter().map(|r| r.code_sites().len()).sum();
        m.got_slots = refs.iter().map(|r| r.got_slots().len()).sum();
        check(2).map_err(|e| format!("round {round}, after apply: {e}"))?;

        let phase = Instant::now();
        let mut back = Retarget::new();
        for r in &refs {
            back.restore(r);
        }
        back.apply().map_err(err)?;
        let removed = redirect::remove(&installed.redirects).map_err(err)?;
        m.revert.push(ms(phase));
        m.max_revert_pause = m.max_revert_pause.max(removed.longest);
        check(1).map_err(|e| format!("round {round}, after revert: {e}"))?;
    }
    Ok(m)
}

/// Checks that every function returns version `v`, called through the GOT (`call_direct`)
/// and through its pointer.
fn check(v: u64) -> Result<(), String> {
    for k in 0..COUNT {
        for x in [3u64, 0xdead_beef] {
            let got = evolve_plain::call_direct(k, x);
            let pointer = (black_box(&v1::ALL)[k])(x);
            if got != expected(k, v, x) || pointer != expected(k, v, x) {
                return Err(format!(
                    "f{k}({x}) returns {got} (GOT) and {pointer} (pointer), expected version \
                     {v}: {}",
                    expected(k, v, x)
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_redirects_every_function_and_reverts_exactly() {
        let r = run(COUNT, 1, 2).unwrap();
        assert_eq!(r["functions"], 1000);
        assert_eq!(r["errors"], 0);
        assert!(r["got_slots"].as_u64().unwrap() >= 1000, "{r}");
        assert!(r["max_pause_ms"].as_f64().unwrap() > 0.0);
        check(1).unwrap();
        assert!(run(3, 1, 0).is_err());
    }
}
