//! `demo`: threads call a function through live patch sites while the main thread retargets
//! them between two implementations, thousands of times; every result is checked.

use evolve::code::{write::trap_counts, FnSite, Placement};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// Arguments of the demo.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Threads calling through the sites.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Retargets of each site.
    #[arg(long, default_value_t = 20_000)]
    pub retargets: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[inline(never)]
fn price_v1(quantity: u64) -> u64 {
    quantity * 10
}

#[inline(never)]
fn price_v2(quantity: u64) -> u64 {
    quantity * 10 - quantity / 10 // a 10 % discount for bulk orders
}

type Price = fn(u64) -> u64;

/// Runs the demo and returns its record.
pub fn run(args: &Args) -> Result<Value, String> {
    let (v1, v2) = (price_v1 as Price, price_v2 as Price);
    // One site inside an aligned word (atomic store), one across a word boundary (int3).
    let sites = [
        FnSite::with_placement(v1, Placement::Aligned).map_err(|e| e.to_string())?,
        FnSite::with_placement(v1, Placement::CrossWord).map_err(|e| e.to_string())?,
    ];
    let entries: Vec<Price> = sites.iter().map(FnSite::entry).collect();
    let stop = AtomicBool::new(false);
    let (calls, errors, v2_seen) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let traps_before = trap_counts();
    let started = Instant::now();
    let (mut retargets, mut stored, mut via_int3) = (0usize, 0usize, 0usize);
    std::thread::scope(|s| {
        for t in 0..args.threads {
            let (stop, calls, errors, v2_seen, entries) =
                (&stop, &calls, &errors, &v2_seen, &entries);
            s.spawn(move || {
                let (mut n, mut bad, mut new) = (0u64, 0u64, 0u64);
                let mut quantity = 100 + t as u64;
                while !stop.load(Ordering::Relaxed) {
                    let price = entries[(n % 2) as usize](quantity);
                    if price == price_v2(quantity) {
                        new += 1;
                    } else if price != price_v1(quantity) {
                        bad += 1;
                    }
                    quantity = quantity % 1000 + 100;
                    n += 1;
                }
                calls.fetch_add(n, Ordering::Relaxed);
                errors.fetch_add(bad, Ordering::Relaxed);
                v2_seen.fetch_add(new, Ordering::Relaxed);
            });
        }
        for i in 0..args.retargets {
            let (from, to) = if i.is_multiple_of(2) {
                (v1, v2)
            } else {
                (v2, v1)
            };
            for site in &sites {
                let report = site.retarget(from, to).expect("retarget");
                retargets += report.changed;
                stored += report.stored;
                via_int3 += report.via_int3;
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    let seconds = started.elapsed().as_secs_f64();
    let traps = trap_counts();
    Ok(json!({
        "scenario": "demo",
        "threads": args.threads,
        "calls": calls.load(Ordering::Relaxed),
        "calls_on_v2": v2_seen.load(Ordering::Relaxed),
        "retargets": retargets,
        "retargets_by_atomic_store": stored,
        "retargets_by_int3": via_int3,
        "traps_emulated": traps.emulated - traps_before.emulated,
        "traps_rewound": traps.rewound - traps_before.rewound,
        "errors": errors.load(Ordering::Relaxed),
        "seconds": crate::stats::round3(seconds),
    }))
}

/// Prints the demo's record as a short table.
pub fn print_table(record: &Value) {
    let row = |name: &str, key: &str| println!("  {name:<34} {}", record[key]);
    println!(
        "Evolve engine demo: {} threads call a function through two live patch sites",
        record["threads"]
    );
    println!("while the main thread switches both between price_v1 and price_v2.\n");
    row("calls made", "calls");
    row("calls answered by v2", "calls_on_v2");
    row("retargets done", "retargets");
    row("  by one atomic 8-byte store", "retargets_by_atomic_store");
    row("  by the int3 protocol", "retargets_by_int3");
    row("threads caught mid-write (int3)", "traps_emulated");
    row("  ... resumed after the write", "traps_rewound");
    row("wrong results (errors)", "errors");
    row("seconds", "seconds");
}

#[cfg(test)]
mod tests {
    #[test]
    fn demo_makes_calls_on_both_versions_and_no_errors() {
        let record = super::run(&super::Args {
            threads: 4,
            retargets: 2_000,
            json: true,
        })
        .unwrap();
        assert_eq!(record["errors"], 0);
        assert_eq!(record["retargets"], 4_000);
        assert_eq!(record["retargets_by_int3"], 2_000);
        assert!(record["calls"].as_u64().unwrap() > record["calls_on_v2"].as_u64().unwrap());
        assert!(record["calls_on_v2"].as_u64().unwrap() > 0);
    }
}
