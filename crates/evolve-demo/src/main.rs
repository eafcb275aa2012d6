//! `cargo run --release -p evolve-demo`: the kv example server updated live while clients load
//! it. Builds the server, starts it, drives load, builds a bug-fix patch from a source change
//! and applies it, adds a command with a second patch, turns a multiverse switch off and commits
//! it, reverts everything, and prints what the clients saw in each phase.

use anyhow::{ensure, Result};
use evolve_demo::client::{Client, Load, Value};
use evolve_demo::server::Server;
use evolve_demo::workspace::{Flavor, KvWorkspace};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Client threads of the load.
const CLIENTS: usize = 8;

fn main() {
    let phase_seconds = std::env::args()
        .skip_while(|a| a != "--phase-seconds")
        .nth(1)
        .map_or(Ok(2.0), |v| v.parse::<f64>())
        .unwrap_or_else(|_| {
            eprintln!("usage: evolve-demo [--phase-seconds SECONDS]");
            std::process::exit(2)
        });
    if let Err(e) = demo(Duration::from_secs_f64(phase_seconds)) {
        eprintln!("evolve-demo: {e:#}");
        std::process::exit(1);
    }
}

/// One row of the table.
struct Phase {
    name: String,
    versions: BTreeSet<String>,
    requests: u64,
    seconds: f64,
    wrong: u64,
    dropped: u64,
}

/// Samples the version the server reports while a phase runs.
struct Watcher {
    versions: Arc<Mutex<BTreeSet<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn start(server: &Server) -> Result<Watcher> {
        let mut client = Client::connect(server.addr)?;
        let versions = Arc::new(Mutex::new(BTreeSet::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (versions, stop) = (versions.clone(), stop.clone());
            std::thread::spawn(move || loop {
                if let Ok(info) = client.info() {
                    if let Some(v) = info.get("kv_version") {
                        versions.lock().unwrap().insert(v.clone());
                    }
                }
                if stop.load(Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            })
        };
        Ok(Watcher {
            versions,
            stop,
            thread: Some(thread),
        })
    }

    fn take(&self) -> BTreeSet<String> {
        std::mem::take(&mut self.versions.lock().unwrap())
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Recorder<'a> {
    load: &'a Load,
    watcher: &'a Watcher,
    phases: Vec<Phase>,
    mark: (Instant, u64, u64, u64),
}

impl Recorder<'_> {
    fn snapshot(&self) -> (Instant, u64, u64, u64) {
        let c = &self.load.counters;
        (
            Instant::now(),
            c.requests.load(Relaxed),
            c.wrong.load(Relaxed),
            c.dropped.load(Relaxed),
        )
    }

    /// Closes the current phase under `name`.
    fn close(&mut self, name: impl Into<String>) {
        let now = self.snapshot();
        self.phases.push(Phase {
            name: name.into(),
            versions: self.watcher.take(),
            requests: now.1 - self.mark.1,
            seconds: (now.0 - self.mark.0).as_secs_f64(),
            wrong: now.2 - self.mark.2,
            dropped: now.3 - self.mark.3,
        });
        self.mark = now;
    }
}

fn step(text: &str) {
    println!("• {text}");
}

fn demo(phase: Duration) -> Result<()> {
    step("copying examples/kv to target-copies/evolve-demo/demo and building the server (the first run compiles its dependencies: a minute or two)");
    let mut workspace = KvWorkspace::prepare("demo")?;
    workspace.verbose = true;
    let binary = workspace.build(Flavor::Evolve)?;
    workspace.verbose = false;
    let server = Server::start(&binary, None)?;
    println!(
        "  kv-server pid {} listening on {} (try: redis-cli -p {} or evolve status {})",
        server.pid,
        server.addr,
        server.addr.port(),
        server.pid
    );

    let mut client = Client::connect(server.addr)?;
    for i in 0..1000 {
        client.command(&format!("SET user:{i} name-{i}"))?;
    }
    client.command("SET visitor alice")?;
    let buggy = client.command("INCR visitor")?;
    let after = client.command("GET visitor")?;
    println!(
        "  1000 keys written. The bug: INCR on the string \"alice\" answers {buggy:?} and leaves {:?}",
        after.text().unwrap_or_default()
    );
    client.command("SET visitor alice")?;

    step(&format!(
        "{CLIENTS} clients start: SET, GET and INCR in a loop, every reply checked"
    ));
    let load = Load::start(server.addr, CLIENTS);
    let watcher = Watcher::start(&server)?;
    let mut recorder = Recorder {
        load: &load,
        watcher: &watcher,
        phases: Vec::new(),
        mark: (Instant::now(), 0, 0, 0),
    };
    recorder.mark = recorder.snapshot();
    std::thread::sleep(phase);
    recorder.close("before");

    step("patch 1 (examples/kv/patches/01-incr-type-check.diff): editing the source and building a patch against the running server");
    workspace.apply_source_patch("01-incr-type-check")?;
    let built = Instant::now();
    let fix = workspace.build_patch(server.pid, "01-incr-type-check")?;
    let build_seconds = built.elapsed().as_secs_f64();
    recorder.close("building patch 1");
    let mut control = server.control()?;
    let applied = Instant::now();
    let report = control.apply(&fix)?;
    let apply_ms = applied.elapsed().as_secs_f64() * 1e3;
    let apply_report = report;
    println!(
        "  applied in {apply_ms:.1} ms: {} hot functions switched in {:.2} ms (verifying the patch {:.1} ms, loading it {:.1} ms)",
        apply_report["updated"].as_array().map_or(0, Vec::len),
        apply_report["switch_ms"].as_f64().unwrap_or(f64::NAN),
        apply_report["verify_ms"].as_f64().unwrap_or(f64::NAN),
        apply_report["load_ms"].as_f64().unwrap_or(f64::NAN),
    );
    let fixed = client.command("INCR visitor")?;
    ensure!(
        matches!(fixed, Value::Error(_)),
        "after the fix INCR on a string answers {fixed:?}"
    );
    println!(
        "  now: INCR visitor → {fixed:?}; GET visitor → {:?}",
        client.command("GET visitor")?.text().unwrap_or_default()
    );
    std::thread::sleep(phase);
    recorder.close("patch 1 applied");

    step("patch 2 (02-append-command.diff): a new command, APPEND");
    let before = client.command("APPEND visitor -smith")?;
    workspace.apply_source_patch("02-append-command")?;
    let append = workspace.build_patch(server.pid, "02-append-command")?;
    recorder.close("building patch 2");
    control.apply(&append)?;
    let now = client.command("APPEND visitor -smith")?;
    ensure!(now == Value::Integer(11), "APPEND after patch 2: {now:?}");
    println!("  APPEND before: {before:?}; after: {now:?}");
    std::thread::sleep(phase);
    recorder.close("patch 2 applied");

    step("multiverse: COMMAND_STATS set to false and committed (the counting call becomes a NOP)");
    let counted =
        |c: &mut Client| -> Result<u64> { Ok(c.info()?["total_commands_processed"].parse()?) };
    let committed = Instant::now();
    control.set_and_commit("COMMAND_STATS", "false")?;
    let commit_ms = committed.elapsed().as_secs_f64() * 1e3;
    let first = counted(&mut client)?;
    std::thread::sleep(phase);
    let second = counted(&mut client)?;
    ensure!(first == second, "commands still counted after the commit");
    println!("  committed in {commit_ms:.1} ms; total_commands_processed stays at {first}");
    recorder.close("statistics committed off");

    step("reverting: the switch, then both patches");
    let reverted = Instant::now();
    control.revert_switches()?;
    control.revert(None)?;
    control.revert(None)?;
    let revert_ms = reverted.elapsed().as_secs_f64() * 1e3;
    let back = client.command("APPEND visitor x")?;
    ensure!(
        matches!(back, Value::Error(_)),
        "APPEND after revert: {back:?}"
    );
    std::thread::sleep(phase);
    recorder.close("reverted");

    let phases = recorder.phases;
    drop(watcher);
    let totals = load.stop();
    let mut missing = 0;
    for i in 0..1000 {
        if client.command(&format!("GET user:{i}"))?
            != Value::Bulk(Some(format!("name-{i}").into_bytes()))
        {
            missing += 1;
        }
    }

    println!();
    println!(
        "{:<26} {:>13} {:>10} {:>9} {:>7} {:>8}",
        "phase", "version", "requests", "req/s", "errors", "dropped"
    );
    for phase in &phases {
        let versions: Vec<&str> = phase.versions.iter().map(String::as_str).collect();
        println!(
            "{:<26} {:>13} {:>10} {:>9.0} {:>7} {:>8}",
            phase.name,
            versions.join("→"),
            phase.requests,
            phase.requests as f64 / phase.seconds,
            phase.wrong,
            phase.dropped
        );
    }
    println!();
    println!(
        "patch 1: built in {build_seconds:.1} s, applied in {apply_ms:.1} ms; commit {commit_ms:.1} ms; revert (switch + 2 patches) {revert_ms:.1} ms"
    );
    println!(
        "keys written before the updates still there: {}/1000; wrong replies: {}; connections lost: {}",
        1000 - missing,
        totals.wrong.load(Relaxed),
        totals.dropped.load(Relaxed)
    );
    ensure!(
        missing == 0 && totals.wrong.load(Relaxed) == 0 && totals.dropped.load(Relaxed) == 0,
        "the clients saw errors"
    );
    drop(server);
    Ok(())
}
