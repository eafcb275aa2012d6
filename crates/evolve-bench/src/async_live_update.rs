//! `async-live-update`: the http example (Tokio + axum, `examples/http`) under `wrk` on the
//! loopback, without updates (the baseline) and while a patch of its hot async handlers and
//! middleware is applied and reverted every `--update-every-ms` (100 ms), in the same run.
//!
//! Each round runs both (which goes first alternates between rounds), each against a fresh
//! server; `throughput_ratio` is the median of the rounds' updated/steady request rates,
//! `update_p99_ratio` the median p99 latency under updates over the median steady p99. `errors`
//! counts wrk's socket errors and non-2xx responses in every run, and failed applies or reverts.

use crate::stats::{median, round3};
use evolve_demo::server::Server;
use evolve_demo::workspace::{ExampleWorkspace, Flavor, HTTP};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Arguments of the scenario.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Rounds (each: one run without updates, one with).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// wrk's connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// wrk's threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Milliseconds between an apply and the following revert (and back).
    #[arg(long, default_value_t = 100)]
    pub update_every_ms: u64,
    /// Accepted for uniformity: the output is always JSON.
    #[arg(long)]
    pub json: bool,
}

/// What one wrk run measured.
#[derive(Debug, PartialEq)]
struct Run {
    rps: f64,
    p99_ms: f64,
    errors: u64,
}

/// A wrk duration (`812.00us`, `1.25ms`, `2.00s`) in milliseconds.
fn duration_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => number / 1e3,
        "ms" => number,
        "s" => number * 1e3,
        "m" => number * 60e3,
        _ => return None,
    })
}

/// Reads wrk's report (`--latency`).
fn parse_wrk(stdout: &str) -> Result<Run, String> {
    let mut rps = None;
    let mut p99_ms = None;
    let mut errors = 0;
    for line in stdout.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            rps = rest.trim().parse().ok();
        } else if let Some(rest) = line.strip_prefix("99%") {
            p99_ms = duration_ms(rest.trim());
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(1);
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            errors += rest
                .split(',')
                .map(|field| {
                    field
                        .split_whitespace()
                        .nth(1)
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(1)
                })
                .sum::<u64>();
        }
    }
    match (rps, p99_ms) {
        (Some(rps), Some(p99_ms)) => Ok(Run {
            rps,
            p99_ms,
            errors,
        }),
        _ => Err(format!("unexpected wrk output: {stdout}")),
    }
}

fn wrk(server: &Server, args: &Args) -> Result<Run, String> {
    let output = Command::new("wrk")
        .args(["-t", &args.threads.to_string()])
        .args(["-c", &args.connections.to_string()])
        .args(["-d", &format!("{}s", args.seconds), "--latency"])
        .arg(format!("http://{}/hello", server.addr))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("wrk: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut run = parse_wrk(&stdout)?;
    if !output.status.success() {
        run.errors += 1;
    }
    Ok(run)
}

/// One wrk run against a fresh server; with `patch`, applied and reverted meanwhile. Also the
/// number of updates and of failed updates.
fn measure(binary: &Path, args: &Args, patch: Option<&Path>) -> Result<(Run, u64, u64), String> {
    let server = Server::start_example(&HTTP, binary, None, &[]).map_err(|e| format!("{e:#}"))?;
    let stop = AtomicBool::new(false);
    let (updates, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let run = std::thread::scope(|scope| {
        if let Some(patch) = patch {
            scope.spawn(|| {
                let Ok(mut control) = server.control() else {
                    failed.fetch_add(1, Relaxed);
                    return;
                };
                let pause = Duration::from_millis(args.update_every_ms);
                // Let wrk connect first.
                std::thread::sleep(pause);
                while !stop.load(Relaxed) {
                    for step in [control.apply(patch), control.revert(None)] {
                        match step {
                            Ok(_) => updates.fetch_add(1, Relaxed),
                            Err(e) => {
                                eprintln!("async-live-update: {e:#}");
                                failed.fetch_add(1, Relaxed)
                            }
                        };
                        std::thread::sleep(pause);
                    }
                }
            });
        }
        let run = wrk(&server, args);
        stop.store(true, Relaxed);
        run
    })?;
    Ok((run, updates.load(Relaxed), failed.load(Relaxed)))
}

/// Runs the scenario.
pub fn run(args: &Args) -> Result<Value, String> {
    if !Command::new("wrk")
        .arg("--version")
        .output()
        .is_ok_and(|o| !o.stdout.is_empty() || !o.stderr.is_empty())
    {
        eprintln!("async-live-update: skipped: wrk is not installed (Debian: apt-get install wrk)");
        return Ok(json!({"scenario": "async-live-update", "skipped": "wrk not installed"}));
    }
    let fail = |e: anyhow::Error| format!("{e:#}");
    eprintln!("async-live-update: building the http example and its patch…");
    let workspace = ExampleWorkspace::prepare_example(&HTTP, "async-bench").map_err(fail)?;
    let binary = workspace.build(Flavor::Evolve).map_err(fail)?;
    let patch = {
        let server =
            Server::start_example(&HTTP, &binary, None, &[]).map_err(|e| format!("{e:#}"))?;
        let file = "http-handlers/src/lib.rs";
        workspace
            .edit(file, "\"hello v1\\n\"", "\"hello v2\\n\"")
            .map_err(fail)?;
        workspace
            .edit(file, "\"track v1\"", "\"track v2\"")
            .map_err(fail)?;
        workspace.build_patch(server.pid, "fix").map_err(fail)?
    };

    let (mut ratios, mut rps_steady, mut rps_updated) = (vec![], vec![], vec![]);
    let (mut p99_steady, mut p99_updated) = (vec![], vec![]);
    let (mut errors, mut updates) = (0, 0);
    for round in 0..args.runs.max(1) {
        eprintln!("async-live-update: round {}/{}", round + 1, args.runs);
        let mut pair = [None, None];
        // Which run goes first alternates, so a drift of the machine favours neither.
        for which in [round % 2, 1 - round % 2] {
            let (run, done, failed) = measure(&binary, args, (which == 1).then_some(&*patch))?;
            errors += run.errors + failed;
            updates += done;
            pair[which] = Some(run);
        }
        let [Some(steady), Some(updated)] = pair else {
            unreachable!("both runs ran")
        };
        ratios.push(updated.rps / steady.rps);
        rps_steady.push(steady.rps);
        rps_updated.push(updated.rps);
        p99_steady.push(steady.p99_ms);
        p99_updated.push(updated.p99_ms);
    }
    let p99_steady = median(&mut p99_steady);
    let p99_updated = median(&mut p99_updated);
    Ok(json!({
        "scenario": "async-live-update",
        "program": "examples/http (Tokio + axum), GET /hello under wrk on the loopback",
        "runs": args.runs,
        "connections": args.connections,
        "wrk_threads": args.threads,
        "seconds_per_run": args.seconds,
        "update_every_ms": args.update_every_ms,
        "rps_steady": round3(median(&mut rps_steady)),
        "rps_during_updates": round3(median(&mut rps_updated)),
        "throughput_ratio": round3(median(&mut ratios)),
        "goal_throughput_ratio": 0.97,
        "p99_steady_ms": round3(p99_steady),
        "p99_during_updates_ms": round3(p99_updated),
        "update_p99_ratio": round3(p99_updated / p99_steady),
        "goal_update_p99_ratio": 2.0,
        "updates": updates,
        "errors": errors,
        "goal_errors": 0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_reports_parse_into_rate_p99_and_errors() {
        let report = "Running 5s test @ http://127.0.0.1:1/hello
  Latency Distribution
     50%  312.00us
     99%    1.50ms
  100 requests in 5.00s, 10.00KB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  20000.50
Transfer/sec:      2.00MB
";
        assert_eq!(
            parse_wrk(report).unwrap(),
            Run {
                rps: 20000.5,
                p99_ms: 1.5,
                errors: 7
            }
        );
        assert_eq!(duration_ms("812.00us"), Some(0.812));
        assert_eq!(duration_ms("2.00s"), Some(2000.0));
        assert!(parse_wrk("wrk: connection refused").is_err());
    }
}
