//! `attach` and `probe-overhead --attached`: Evolve in a C process that never linked it.
//!
//! **`attach --threads N`** starts a C program with N worker threads (compute `--work`
//! iterations, about 1 µs by default, then sleep 1 ms, in a loop) and attaches to it, `--runs` times (a fresh process each time). Per run it takes
//! `max_stop_ms`, the longest time any thread of the target was stopped (from
//! `PTRACE_INTERRUPT` to `PTRACE_DETACH`), and `attach_ms`, from the call to the agent's first
//! answer; the JSON reports medians (goals: ≤ 5 ms, ≤ 100 ms). The baseline in the same run,
//! `stop_all_ms`, is what an injector that stops the whole process pays before it can even
//! start (libpulp's and gdb's way): every thread interrupted, until the last one has stopped,
//! then released; `stop_ratio` is `max_stop_ms / stop_all_ms`.
//!
//! **`probe-overhead --attached --kind count|latency`** runs a C program that calls a small
//! function through a volatile pointer and prints each window's ns per call; the unprobed
//! windows before the probe are the baseline, the windows with the attached agent's probe the
//! measurement, alternating `--runs` times; `probe_cost_ns` is the difference of the medians
//! (goals: count ≤ 15, latency ≤ 40).

use crate::stats::{median, round3};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Arguments of `attach`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Worker threads in the target.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Attaches (each to a fresh process); medians are reported.
    #[arg(long, default_value_t = 9)]
    pub runs: usize,
    /// Loop iterations each worker computes between its 1 ms sleeps (500: about 1 µs; the
    /// first version used 20 000, with which 128 workers want more CPU than two cores have).
    #[arg(long, default_value_t = 500)]
    pub work: u32,
    /// Accepted for uniformity: the output is always JSON.
    #[arg(long)]
    pub json: bool,
}

/// Compiles a fixture C program into `target/evolve-bench/`.
fn compile(name: &str) -> Result<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(format!("{name}.c"));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/evolve-bench");
    std::fs::create_dir_all(&dir)?;
    let out = dir.join(name);
    let status = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&out)
        .arg(&source)
        .arg("-lpthread")
        .status()
        .context("running cc")?;
    if !status.success() {
        bail!("cc {} failed", source.display());
    }
    Ok(out)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_threads(pid: u32, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(format!("/proc/{pid}/task"))?.count() < n {
        if Instant::now() > deadline {
            bail!("the target did not start its threads");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The baseline: interrupt every thread, wait until all are stopped, release them; the time
/// the first thread stayed stopped.
fn stop_all(pid: u32) -> Result<f64> {
    use nix::sys::ptrace;
    use nix::sys::wait::{waitpid, WaitPidFlag};
    use nix::unistd::Pid;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<f64> {
            let tids: Vec<Pid> = std::fs::read_dir(format!("/proc/{pid}/task"))?
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .map(Pid::from_raw)
                .collect();
            for &t in &tids {
                ptrace::seize(t, ptrace::Options::empty())?;
            }
            let start = Instant::now();
            for &t in &tids {
                ptrace::interrupt(t)?;
            }
            for &t in &tids {
                waitpid(t, Some(WaitPidFlag::__WALL))?;
            }
            for &t in &tids {
                ptrace::detach(t, None)?;
            }
            Ok(start.elapsed().as_secs_f64() * 1e3)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the baseline's tracer panicked"))?
    })
}

/// `attach --threads N`.
pub fn run(args: &Args) -> Result<Value> {
    let program = compile("attach_threads")?;
    evolve_attach::find_agent()
        .context("the agent object (cargo build --release -p evolve-agent-so)")?;
    let sockets = std::env::temp_dir().join(format!("evolve-bench-attach-{}", std::process::id()));
    let options = evolve_attach::Options {
        socket_dir: Some(sockets.clone()),
        ..Default::default()
    };
    let (mut stops, mut totals, mut loads, mut baselines) = (vec![], vec![], vec![], vec![]);
    let mut borrowed_in = Vec::new();
    let mut phases: std::collections::BTreeMap<&'static str, Vec<f64>> = Default::default();
    let mut signal_stops = 0;
    for _ in 0..args.runs {
        let target = Killed(
            Command::new(&program)
                .arg(args.threads.to_string())
                .arg(args.work.to_string())
                .stdin(Stdio::null())
                .spawn()?,
        );
        let pid = target.0.id();
        wait_threads(pid, args.threads + 1)?;
        std::thread::sleep(Duration::from_millis(50));
        baselines.push(stop_all(pid)?);
        let a = evolve_attach::attach(pid, &options)?;
        stops.push(a.stops.max().as_secs_f64() * 1e3);
        totals.push(a.total.as_secs_f64() * 1e3);
        loads.push(a.load.as_secs_f64() * 1e3);
        borrowed_in.push(a.stops.borrowed_in.clone());
        signal_stops += a.stops.signal_stops;
        for (phase, d) in &a.phases {
            phases.entry(phase).or_default().push(d.as_secs_f64() * 1e3);
        }
    }
    let phases_ms: serde_json::Map<String, Value> = phases
        .into_iter()
        .map(|(phase, mut ms)| (phase.to_string(), json!(round3(median(&mut ms)))))
        .collect();
    let _ = std::fs::remove_dir_all(&sockets);
    let worst = stops.iter().cloned().fold(0.0, f64::max);
    let (stop, total, load, baseline) = (
        median(&mut stops),
        median(&mut totals),
        median(&mut loads),
        median(&mut baselines),
    );
    Ok(json!({
        "scenario": "attach",
        "threads": args.threads,
        "work": args.work,
        "runs": args.runs,
        "max_stop_ms": round3(stop),
        "max_stop_ms_worst": round3(worst),
        "attach_ms": round3(total),
        "load_ms": round3(load),
        "stop_all_ms": round3(baseline),
        "stop_ratio": round3(stop / baseline),
        "borrowed_in": borrowed_in,
        "phases_ms": phases_ms,
        "signal_stops": signal_stops,
        "load_average": load_average(),
        "goal_max_stop_ms": 5,
        "goal_attach_ms": 100,
        "meets_goal": stop <= 5.0 && total <= 100.0,
        "errors": 0,
    }))
}

/// `/proc/loadavg`'s one-minute figure: how busy the machine was.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Reads `n` window lines (ns per call) from the target.
fn windows(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    n: usize,
) -> Result<Vec<f64>> {
    windows_since(lines, n, 0)
}

/// The next `n` windows (ns per call) that started at or after `since` (CLOCK_MONOTONIC ns):
/// the lines printed before are skipped — while the CLI changed the probes the target kept
/// printing, and those lines wait in the pipe.
fn windows_since(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    n: usize,
    since: i64,
) -> Result<Vec<f64>> {
    let mut taken = Vec::with_capacity(n);
    while taken.len() < n {
        let line = lines.next().context("the target stopped printing")??;
        let mut fields = line.split_whitespace();
        let ns: f64 = fields
            .next()
            .and_then(|v| v.parse().ok())
            .context("a window line")?;
        let start: i64 = fields
            .next()
            .and_then(|v| v.parse().ok())
            .context("a window line's start")?;
        if start >= since {
            taken.push(ns);
        }
    }
    Ok(taken)
}

/// Now, on the clock the target's windows are stamped with.
fn monotonic_ns() -> Result<i64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(now.tv_sec() * 1_000_000_000 + now.tv_nsec())
}

/// `probe-overhead --attached --kind count|latency`.
pub fn probe_overhead_attached(kind: &str, calls: u64, runs: usize) -> Result<Value> {
    let flag = match kind {
        "count" => "--count",
        "latency" => "--latency",
        other => bail!("--attached measures count or latency probes, not {other}"),
    };
    let program = compile("probed_loop")?;
    let evolve = std::env::current_exe()?
        .parent()
        .context("the bench's directory")?
        .join("evolve");
    if !evolve.exists() {
        bail!(
            "{} is missing: cargo build --release -p evolve-cli",
            evolve.display()
        );
    }
    let sockets = std::env::temp_dir().join(format!("evolve-bench-probe-{}", std::process::id()));
    let mut target = Killed(
        Command::new(&program)
            .arg(calls.to_string())
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()?,
    );
    let pid = target.0.id().to_string();
    let mut lines = BufReader::new(target.0.stdout.take().context("stdout")?).lines();
    let cli = |args: &[&str]| -> Result<Value> {
        let out = Command::new(&evolve)
            .args(args)
            .arg("--json")
            .env("EVOLVE_SOCKET_DIR", &sockets)
            .output()?;
        if !out.status.success() {
            bail!("evolve {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    windows(&mut lines, 3)?; // warm up
    let attached = cli(&["attach", &pid])?;
    let (mut base, mut probed) = (vec![], vec![]);
    let mut counted = 0u64;
    for _ in 0..runs {
        // Two windows of each, each started after the change took effect (the removal or the
        // addition returned).
        base.extend(windows_since(&mut lines, 2, monotonic_ns()?)?);
        cli(&["probe", &pid, "add", "probed", flag])?;
        probed.extend(windows_since(&mut lines, 2, monotonic_ns()?)?);
        let read = cli(&["probe", &pid, "read"])?;
        counted += read["readings"][0]["calls"].as_u64().unwrap_or(0);
        cli(&["probe", &pid, "rm", "--all"])?;
    }
    cli(&["detach", &pid])?;
    let _ = std::fs::remove_dir_all(&sockets);
    let (b, p) = (median(&mut base), median(&mut probed));
    let cost = p - b;
    let goal = if kind == "count" { 15.0 } else { 40.0 };
    Ok(json!({
        "scenario": "probe-overhead",
        "attached": true,
        "kind": kind,
        "calls_per_window": calls,
        "runs": runs,
        "baseline_ns": round3(b),
        "probed_ns": round3(p),
        "probe_cost_ns": round3(cost),
        "ratio": round3(p / b),
        "goal_ns": goal,
        "meets_goal": cost <= goal,
        "borrowed_in": attached["borrowed_in"],
        "attach_ms": attached["attach_ms"],
        "load_average": load_average(),
        "errors": u64::from(counted == 0),
    }))
}
