//! `kv-live-update`: the kv example server under `redis-benchmark`, built without Evolve
//! (`rps_plain`) and with it (`rps_evolve`), and with the bug-fix patch applied and reverted over
//! and over while the benchmark runs (`p99_during_update_ms`).
//!
//! Each round runs plain and evolve (which goes first alternates between rounds), then
//! evolve-under-updates, each against a fresh server; every figure is the median over `--runs`
//! rounds, and `throughput_ratio` the median of the rounds' evolve/plain ratios. A run's rate and p99 are the mean over its tests (`SET`,
//! `GET` by default) of what `redis-benchmark --csv` reports.

use crate::stats::{median, round3};
use evolve_demo::client::Client;
use evolve_demo::server::Server;
use evolve_demo::workspace::{Flavor, KvWorkspace};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Arguments of the scenario.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Rounds (each: one plain run, one evolve run, one run under updates).
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
    /// Parallel redis-benchmark clients.
    #[arg(long, default_value_t = 50)]
    pub clients: usize,
    /// Requests per test per run.
    #[arg(long, default_value_t = 200_000)]
    pub requests: usize,
    /// redis-benchmark tests (its `-t`).
    #[arg(long, default_value = "set,get")]
    pub tests: String,
    /// During updates: milliseconds between an apply and the following revert (and back).
    #[arg(long, default_value_t = 100)]
    pub update_every_ms: u64,
    /// Accepted for uniformity: the output is always JSON.
    #[arg(long)]
    pub json: bool,
}

/// What one redis-benchmark run measured.
struct Run {
    rps: f64,
    p99_ms: f64,
    errors: u64,
}

fn benchmark(server: &Server, args: &Args) -> Result<Run, String> {
    let output = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &server.addr.port().to_string()])
        .args([
            "-c",
            &args.clients.to_string(),
            "-n",
            &args.requests.to_string(),
        ])
        .args(["-r", "100000", "-t", &args.tests, "--csv"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("redis-benchmark: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut errors =
        stdout.matches("Error").count() as u64 + stderr.matches("Error").count() as u64;
    if !output.status.success() {
        errors += 1;
    }
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let rows: Vec<Vec<f64>> = stdout
        .lines()
        .filter(|l| l.starts_with('"') && !l.starts_with("\"test\""))
        .map(|l| {
            l.split(',')
                .skip(1)
                .map(|f| f.trim_matches('"').parse().unwrap_or(f64::NAN))
                .collect()
        })
        .collect();
    if rows.is_empty() || rows.iter().any(|r| r.len() < 6) {
        return Err(format!(
            "unexpected redis-benchmark output: {stdout}{stderr}"
        ));
    }
    let mean = |column: usize| rows.iter().map(|r| r[column]).sum::<f64>() / rows.len() as f64;
    Ok(Run {
        rps: mean(0),
        p99_ms: mean(5),
        errors,
    })
}

/// Error replies and dropped connections the server counted.
fn server_errors(server: &Server) -> Result<u64, String> {
    let mut client = Client::connect(server.addr).map_err(|e| e.to_string())?;
    let info = client.info().map_err(|e| e.to_string())?;
    Ok([
        "total_error_replies",
        "dropped_connections",
        "protocol_errors",
    ]
    .iter()
    .map(|k| {
        info.get(*k)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(1)
    })
    .sum())
}

fn measure(binary: &Path, args: &Args, patch: Option<&Path>) -> Result<(Run, u64), String> {
    let server = Server::start(binary, None).map_err(|e| e.to_string())?;
    let stop = AtomicBool::new(false);
    let updates = AtomicU64::new(0);
    let (run, update_result) = std::thread::scope(|scope| {
        let updater = patch.map(|patch| {
            scope.spawn(|| -> Result<(), String> {
                let mut control = server.control().map_err(|e| e.to_string())?;
                // Let the clients connect first.
                std::thread::sleep(Duration::from_millis(300));
                while !stop.load(Relaxed) {
                    control.apply(patch).map_err(|e| e.to_string())?;
                    std::thread::sleep(Duration::from_millis(args.update_every_ms));
                    control.revert(None).map_err(|e| e.to_string())?;
                    updates.fetch_add(2, Relaxed);
                    std::thread::sleep(Duration::from_millis(args.update_every_ms));
                }
                Ok(())
            })
        });
        let run = benchmark(&server, args);
        stop.store(true, Relaxed);
        let update_result = updater.map_or(Ok(()), |u| u.join().expect("the updater ran"));
        (run, update_result)
    });
    update_result?;
    let mut run = run?;
    run.errors += server_errors(&server)?;
    Ok((run, updates.load(Relaxed)))
}

/// Runs the scenario.
pub fn run(args: &Args) -> Result<Value, String> {
    if !Command::new("redis-benchmark")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("kv-live-update: skipped: redis-benchmark is not installed (Debian: apt-get install redis-tools)");
        return Ok(
            json!({"scenario": "kv-live-update", "skipped": "redis-benchmark not installed"}),
        );
    }
    let fail = |e: anyhow::Error| format!("{e:#}");
    eprintln!("kv-live-update: building the kv server with and without Evolve, and the patch…");
    let workspace = KvWorkspace::prepare("bench").map_err(fail)?;
    let plain = workspace.build(Flavor::Plain).map_err(fail)?;
    let evolve = workspace.build(Flavor::Evolve).map_err(fail)?;
    let patch = {
        let server = Server::start(&evolve, None).map_err(fail)?;
        workspace
            .apply_source_patch("01-incr-type-check")
            .map_err(fail)?;
        workspace.build_patch(server.pid, "fix").map_err(fail)?
    };

    let (mut rps_plain, mut rps_evolve, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut p99_plain, mut p99_steady, mut p99_during) = (Vec::new(), Vec::new(), Vec::new());
    let (mut errors, mut updates) = (0, 0);
    for round in 0..args.runs {
        eprintln!("kv-live-update: round {}/{}", round + 1, args.runs);
        // Which server goes first alternates, so a drift of the machine favours neither.
        let mut pair = [None, None];
        for which in [round % 2, 1 - round % 2] {
            let binary = if which == 0 { &plain } else { &evolve };
            let (run, _) = measure(binary, args, None)?;
            errors += run.errors;
            pair[which] = Some(run);
        }
        let [Some(plain_run), Some(evolve_run)] = pair else {
            unreachable!("both servers ran")
        };
        rps_plain.push(plain_run.rps);
        p99_plain.push(plain_run.p99_ms);
        rps_evolve.push(evolve_run.rps);
        p99_steady.push(evolve_run.p99_ms);
        ratios.push(evolve_run.rps / plain_run.rps);
        let (run, done) = measure(&evolve, args, Some(&patch))?;
        p99_during.push(run.p99_ms);
        errors += run.errors;
        updates += done;
    }
    let throughput_ratio = median(&mut ratios);
    let rps_plain = median(&mut rps_plain);
    let rps_evolve = median(&mut rps_evolve);
    let p99_plain = median(&mut p99_plain);
    let p99_steady = median(&mut p99_steady);
    let p99_during = median(&mut p99_during);
    Ok(json!({
        "scenario": "kv-live-update",
        "runs": args.runs,
        "clients": args.clients,
        "requests_per_test": args.requests,
        "tests": args.tests,
        "rps_plain": round3(rps_plain),
        "rps_evolve": round3(rps_evolve),
        // The median of the rounds' ratios: each round's two runs saw the same machine.
        "throughput_ratio": round3(throughput_ratio),
        "errors": errors,
        "p99_plain_ms": round3(p99_plain),
        "p99_steady_ms": round3(p99_steady),
        "p99_during_update_ms": round3(p99_during),
        "update_p99_ratio": round3(p99_during / p99_steady),
        "updates_during_runs": updates,
    }))
}
