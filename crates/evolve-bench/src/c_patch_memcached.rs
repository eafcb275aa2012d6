//! `c-patch-memcached`: a one-function change of memcached, built from Debian's source package
//! (see `evolve_testkit::memcached`), made into a patch and applied to the running server under
//! a small load.
//!
//! - **`build_s`** (goal ≤ 5): `evolve_builder::c::build_patch` of a one-line change of
//!   `server_stats` (memcached.c: the `stats` command's `version` line) against the running
//!   process — the unit's flags read from DWARF, the original and the edited memcached.c compiled
//!   (side by side), compared with the running code, the patch written. Baseline in the same
//!   run, alternating with it: gcc compiling that translation unit once with the same flags,
//!   `gcc_s`; `build_ratio = build_s / gcc_s`.
//! - **`apply_ms`** (goal ≤ 50): the agent's time to apply that patch (verify, load, switch:
//!   the `total_ms` it reports), each apply followed by a revert; `apply_first_ms` is the
//!   first apply alone (its code loaded for the first time); `apply_cli_ms` is an apply seen
//!   from the `evolve apply` command (process start and socket round trip included). Baseline:
//!   `noop_ms`, the `evolve status` command (a no-op round trip to the agent);
//!   `apply_ratio = apply_cli_ms / noop_ms`. `attach_ms` is the one attach, for scale.
//!
//! Clients on long-lived connections `set` and `get` for the whole run; a wrong or missing
//! reply counts as an error, and the `stats` version line is checked after each apply (patched)
//! and revert (original).

use crate::attach::load_average;
use crate::stats::{median, round3};
use anyhow::{bail, Context, Result};
use evolve_testkit::memcached::MemcachedSource;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of the scenario.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Rounds of each measurement (build and gcc alternate; apply and revert alternate).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Client connections loading the server throughout.
    #[arg(long, default_value_t = 2)]
    pub clients: usize,
    /// Accepted for uniformity: the output is always JSON.
    #[arg(long)]
    pub json: bool,
}

const FILE: &str = "memcached.c";
const LINE: &str = "APPEND_STAT(\"version\", \"%s\", VERSION);";
const EDITED: &str = "APPEND_STAT(\"version\", \"%s\", VERSION \"-evolve\");";

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `stats`' `version` value on a fresh connection.
fn stats_version(port: u16) -> Result<String> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    (&stream).write_all(b"stats\r\nquit\r\n")?;
    for line in BufReader::new(&stream).lines() {
        let line = line?;
        if let Some(v) = line.strip_prefix("STAT version ") {
            return Ok(v.trim().to_string());
        }
    }
    bail!("no version line in stats")
}

/// `set` then `get` in a loop on each connection; counts requests and wrong replies.
fn load(
    port: u16,
    clients: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<Result<u64>>> {
    (0..clients)
        .map(|c| {
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || -> Result<u64> {
                let stream = TcpStream::connect(("127.0.0.1", port))?;
                stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                stream.set_nodelay(true)?;
                let mut writer = stream.try_clone()?;
                let mut reader = BufReader::new(stream);
                let (mut wrong, mut line, mut i) = (0u64, String::new(), 0u64);
                while !stop.load(Relaxed) {
                    i += 1;
                    let value = format!("{c}-{i}");
                    // One write per round: `write!` would send each piece in its own segment, held by
                    // Nagle's algorithm for the server's delayed acknowledgement.
                    let request =
                        format!("set b{c} 0 0 {}\r\n{value}\r\nget b{c}\r\n", value.len());
                    writer.write_all(request.as_bytes())?;
                    let mut replies = Vec::new();
                    for _ in 0..4 {
                        line.clear();
                        if reader.read_line(&mut line)? == 0 {
                            bail!("connection dropped");
                        }
                        replies.push(line.trim_end().to_string());
                    }
                    let expected = [
                        "STORED".to_string(),
                        format!("VALUE b{c} 0 {}", value.len()),
                        value,
                        "END".to_string(),
                    ];
                    if replies != expected {
                        wrong += 1;
                    }
                    done.fetch_add(2, Relaxed);
                }
                Ok(wrong)
            })
        })
        .collect()
}

/// Runs the scenario.
pub fn run(args: &Args) -> Result<Value, String> {
    run_inner(args).map_err(|e| format!("{e:#}"))
}

fn run_inner(args: &Args) -> Result<Value> {
    let source = MemcachedSource::get().map_err(|e| anyhow::anyhow!("memcached's source: {e}"))?;
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
    let work = std::env::temp_dir().join(format!("evolve-bench-memcached-{}", std::process::id()));
    let sockets = work.join("sockets");
    std::fs::create_dir_all(&sockets)?;
    let original_file = source.tree.join(FILE);
    let text = std::fs::read_to_string(&original_file)?;
    if !text.contains(LINE) {
        bail!("{} has no {LINE}", original_file.display());
    }
    let edited = work.join(FILE);
    std::fs::write(&edited, text.replacen(LINE, EDITED, 1))?;
    let cflags = source
        .unrecorded_flags(FILE)
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut command = Command::new(&source.binary);
    command.args(["-l", "127.0.0.1", "-t", "4", "-p", &port.to_string()]);
    // memcached refuses to run as root unless told which user to be.
    if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?) == 0 {
        command.args(["-u", "root"]);
    }
    let server = Killed(command.stdin(Stdio::null()).spawn()?);
    let pid = server.0.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("memcached did not listen on {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let original = stats_version(port)?;
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let clients = load(port, args.clients, stop.clone(), requests.clone());

    let cli = |args: &[&str]| -> Result<(Value, f64)> {
        let started = Instant::now();
        let out = Command::new(&evolve)
            .args(args)
            .arg("--json")
            .env("EVOLVE_SOCKET_DIR", &sockets)
            .output()?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if !out.status.success() {
            bail!("evolve {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok((serde_json::from_slice(&out.stdout)?, ms))
    };
    let p = pid.to_string();
    let (attached, _) = cli(&["attach", &p])?;

    // build-patch against gcc of the same unit, alternating.
    let patch = work.join("stats.o");
    let options = evolve_builder::c::CBuildOptions {
        base: evolve_builder::Base::Pid(pid),
        sources: vec![evolve_builder::c::CSource {
            edited: edited.clone(),
            original: Some(original_file.clone()),
            unit: None,
        }],
        compiler: None,
        cflags: cflags.clone(),
        output: patch.clone(),
        applied: Vec::new(),
        dry_run: false,
    };
    let (mut build_s, mut compile_s, mut compare_s, mut gcc_s) = (vec![], vec![], vec![], vec![]);
    let mut carried = Vec::new();
    let mut gcc_command = String::new();
    for round in 0..args.runs.max(1) {
        for step in 0..2 {
            if (round + step) % 2 == 0 {
                let (seconds, command) = gcc_once(&source, &cflags, &work)?;
                gcc_s.push(seconds);
                gcc_command = command;
            } else {
                let started = Instant::now();
                let report = evolve_builder::c::build_patch(&options)?;
                build_s.push(started.elapsed().as_secs_f64());
                compile_s.push(report.compile_seconds);
                compare_s.push(report.compare_seconds);
                carried = report
                    .carried
                    .iter()
                    .map(|c| format!("{} ({})", c.name, c.reason))
                    .collect();
            }
        }
    }

    // apply / revert, against a no-op round trip.
    let (mut apply_ms, mut apply_cli_ms, mut revert_ms, mut noop_ms) =
        (vec![], vec![], vec![], vec![]);
    let mut errors = 0u64;
    for _ in 0..args.runs.max(1) {
        let (_, ms) = cli(&["status", &p])?;
        noop_ms.push(ms);
        let (applied, ms) = cli(&["apply", &p, patch.to_str().context("a UTF-8 path")?])?;
        apply_cli_ms.push(ms);
        apply_ms.push(
            applied["total_ms"]
                .as_f64()
                .context("total_ms in apply's answer")?,
        );
        errors += u64::from(stats_version(port)? != format!("{original}-evolve"));
        let (_, ms) = cli(&["revert", &p])?;
        revert_ms.push(ms);
        errors += u64::from(stats_version(port)? != original);
    }
    cli(&["detach", &p])?;
    stop.store(true, Relaxed);
    for client in clients {
        errors += client
            .join()
            .map_err(|_| anyhow::anyhow!("a client panicked"))?
            .unwrap_or(1);
    }
    let _ = std::fs::remove_dir_all(&work);
    // The first apply loads the patch's code for the first time (later ones reuse pages).
    let apply_first = apply_ms.first().copied().unwrap_or_default();
    let (build, gcc) = (median(&mut build_s), median(&mut gcc_s));
    let (apply, apply_cli, noop) = (
        median(&mut apply_ms),
        median(&mut apply_cli_ms),
        median(&mut noop_ms),
    );
    Ok(json!({
        "scenario": "c-patch-memcached",
        "program": format!("memcached {} from Debian's source, built -g -O2 by its Makefile", source.version),
        "change": format!("{FILE}: server_stats' version line"),
        "runs": args.runs,
        "build_s": round3(build),
        "build_compile_s": round3(median(&mut compile_s)),
        "build_compare_s": round3(median(&mut compare_s)),
        "gcc_s": round3(gcc),
        "gcc_command": gcc_command,
        "build_ratio": round3(build / gcc),
        "carried": carried,
        "apply_ms": round3(apply),
        "apply_first_ms": round3(apply_first),
        "apply_cli_ms": round3(apply_cli),
        "revert_cli_ms": round3(median(&mut revert_ms)),
        "noop_ms": round3(noop),
        "apply_ratio": round3(apply_cli / noop),
        "attach_ms": attached["attach_ms"],
        "requests": requests.load(Relaxed),
        "clients": args.clients,
        "load_average": load_average(),
        "goal_build_s": 5.0,
        "goal_apply_ms": 50.0,
        "meets_goal": build <= 5.0 && apply <= 50.0,
        "errors": errors,
    }))
}

/// gcc compiling memcached.c once as the patch builder does (the flags recorded in its DWARF
/// plus the unrecorded ones, in the build directory): the seconds and the command.
fn gcc_once(source: &MemcachedSource, cflags: &[String], work: &Path) -> Result<(f64, String)> {
    let producer = producer_switches(&source.binary)?;
    let out: PathBuf = work.join("gcc-baseline.o");
    let started = Instant::now();
    let status = Command::new("gcc")
        .current_dir(&source.tree)
        .args(&producer)
        .args(cflags)
        .args(["-c", "-o"])
        .arg(&out)
        .arg(FILE)
        .status()?;
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("gcc {FILE} failed");
    }
    let command = format!("gcc {} {} -c {FILE}", producer.join(" "), cflags.join(" "));
    Ok((seconds, command))
}

/// The switches memcached.c's unit records in `DW_AT_producer`.
fn producer_switches(binary: &Path) -> Result<Vec<String>> {
    let data = std::fs::read(binary)?;
    let units = evolve_builder::c::units(&data, &binary.display().to_string())?;
    let unit = units
        .iter()
        .find(|u| u.name.ends_with(FILE))
        .context("no memcached.c unit in the binary's DWARF")?;
    let producer = evolve_builder::c::parse_producer(&unit.producer)
        .context("memcached.c was not compiled by gcc")?;
    Ok(producer.switches)
}
