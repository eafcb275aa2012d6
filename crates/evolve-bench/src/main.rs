//! Evolve's benchmark scenarios and demos.
//!
//! Each scenario prints one JSON object per run and compares Evolve with the baseline it must
//! beat, measured in the same run, as a ratio of medians of repeated runs. `demo` shows the
//! engine at work.

mod apply_latency;
mod apply_unprepared;
mod async_call;
mod async_live_update;
mod attach;
mod build_patch_time;
mod c_call_overhead;
mod c_lock_elision;
mod c_multiverse_spinlock;
mod c_patch_memcached;
mod c_programs;
mod call_overhead;
mod demo;
mod fleet;
mod kv_live_update;
mod multiverse_commit;
mod multiverse_fnptr;
mod multiverse_lock_elision;
mod multiverse_spinlock;
mod patch_sites;
mod probe_overhead;
mod reclaim;
mod stats;
mod thread_create;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Evolve's benchmark scenarios and demos (each prints JSON)")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Threads call through live patch sites while they are retargeted thousands of times.
    Demo(demo::Args),
    /// Retarget N sites as one batch (and back), against one batch per site.
    PatchSites {
        #[command(flatten)]
        args: patch_sites::Args,
        /// Accepted for uniformity: the output is always JSON.
        #[arg(long)]
        json: bool,
    },
    /// Multiverse, the paper's Figure 1: a spinlock elided in single-CPU mode, against the
    /// build without the check and the run-time branch (`--iters`, `--runs`, `--only`).
    MultiverseSpinlock(Raw),
    /// Multiverse lock elision while one thread runs (fputc- and malloc-like paths), against
    /// the always-locked build (`--iters`, `--runs`, `--only`).
    MultiverseLockElision(Raw),
    /// Multiverse commit and revert of N direct call sites (`--call-sites`, `--runs`).
    MultiverseCommit(Raw),
    /// Multiverse function-pointer switch: calls through it before and after commit, against
    /// a direct call of the function (`--iters`, `--runs`).
    MultiverseFnptr(Raw),
    /// Hot update: a call through a hot function's stub, against a direct call and a PSU-style
    /// trampoline; an unprepared function never patched, and one patched with its call site
    /// retargeted (`--threads`, `--iters`, `--runs`; `--only direct|hot|psu|unpatched|patched`
    /// for callgrind).
    CallOverhead(call_overhead::Args),
    /// Hot update: a `#[evolve::hot] async fn` awaited to its end, against the same plain
    /// `async fn` (`--iters`, `--runs`).
    AsyncCallOverhead(async_call::Args),
    /// Hot update: thread create+join with Evolve active, against a process without it.
    ThreadCreate(thread_create::Args),
    /// Hot update: build a patch of 1000 hot functions against this process, apply and revert;
    /// with `--unprepared`, redirect 1000 unprepared functions (entry jumps and references).
    ApplyLatency(apply_latency::Args),
    /// Hot update: build a patch of a one-line change (format 2), against an incremental
    /// `cargo build --release` of the same change (`--runs`).
    BuildPatchTime(build_patch_time::Args),
    /// N successive patches of one function under continuous calls, with reclamation.
    Reclaim(reclaim::Args),
    /// The kv example server under redis-benchmark: built without Evolve, with it, and with a
    /// patch applied and reverted continuously while the benchmark runs.
    KvLiveUpdate(kv_live_update::Args),
    /// The http example (Tokio + axum) under wrk, with a patch of its hot async handlers
    /// applied and reverted every 100 ms, against the same service without updates.
    AsyncLiveUpdate(async_live_update::Args),
    /// Attach: stop time and end-to-end time of `evolve attach` to a C process with N threads,
    /// against stopping every thread (`--threads`, `--runs`).
    Attach(attach::Args),
    /// Fleet: a rollout (canary, 10 %, 50 %, 100 %, no bake) to N simulated nodes against a real
    /// etcd started for the run: time until every node applied, etcd requests per node step.
    Fleet(fleet::Args),
    /// C: a prepared hot function (`EVOLVE_HOT`) unpatched against a plain C function, and
    /// redirected against a direct call (`--iters`, `--runs`, `--only`).
    CCallOverhead(Raw),
    /// C multiverse, the paper's Figure 1: a committed `EVOLVE_MULTIVERSE` spinlock against
    /// the statically specialised build (`--iters`, `--runs`, `--only`).
    CMultiverseSpinlock(Raw),
    /// C multiverse: musl-style single-threaded lock elision (fputc, malloc) against always
    /// locking (`--iters`, `--runs`, `--only`).
    CLockElision(Raw),
    /// C: a one-function change of memcached built from Debian's source: `evolve build-patch`
    /// against gcc compiling that unit, apply against a no-op agent round trip (`--runs`).
    CPatchMemcached(c_patch_memcached::Args),
    /// Probes: the cost per call of a probe (`--kind count|hist|latency`) on an unprepared
    /// function, against the same function unprobed.
    ProbeOverhead(probe_overhead::Args),
}

/// The arguments a scenario parses itself (`--json` is accepted and implied).
#[derive(clap::Args)]
struct Raw {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.scenario {
        Scenario::Demo(args) => demo::run(args).map(|record| {
            if args.json {
                println!("{record}");
            } else {
                demo::print_table(&record);
            }
            record
        }),
        Scenario::PatchSites { args, .. } => patch_sites::run(args).inspect(|r| println!("{r}")),
        Scenario::MultiverseSpinlock(raw) => Ok(multiverse_spinlock::run(&raw.args)),
        Scenario::MultiverseLockElision(raw) => Ok(multiverse_lock_elision::run(&raw.args)),
        Scenario::MultiverseCommit(raw) => Ok(multiverse_commit::run(&raw.args)),
        Scenario::MultiverseFnptr(raw) => multiverse_fnptr::run(&raw.args),
        Scenario::CallOverhead(args) => call_overhead::run(args),
        Scenario::AsyncCallOverhead(args) => async_call::run(args),
        Scenario::ThreadCreate(args) => thread_create::run(args),
        Scenario::ApplyLatency(args) => apply_latency::run(args),
        Scenario::BuildPatchTime(args) => build_patch_time::run(args),
        Scenario::Reclaim(args) => reclaim::run(args),
        Scenario::ProbeOverhead(args) => probe_overhead::run(args),
        Scenario::Attach(args) => attach::run(args).map_err(|e| format!("{e:#}")),
        Scenario::KvLiveUpdate(args) => kv_live_update::run(args),
        Scenario::AsyncLiveUpdate(args) => async_live_update::run(args),
        Scenario::Fleet(args) => fleet::run(args),
        Scenario::CCallOverhead(raw) => c_call_overhead::run(&raw.args),
        Scenario::CMultiverseSpinlock(raw) => c_multiverse_spinlock::run(&raw.args),
        Scenario::CLockElision(raw) => c_lock_elision::run(&raw.args),
        Scenario::CPatchMemcached(args) => c_patch_memcached::run(args),
    };
    if let Ok(record) = &result {
        if !matches!(
            cli.scenario,
            Scenario::Demo(_) | Scenario::PatchSites { .. }
        ) {
            println!("{record}");
        }
    }
    match result {
        Ok(record) if record.get("errors").and_then(|e| e.as_u64()).unwrap_or(0) > 0 => {
            eprintln!("evolve-bench: errors observed");
            std::process::exit(1);
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("evolve-bench: {e}");
            std::process::exit(2);
        }
    }
}
