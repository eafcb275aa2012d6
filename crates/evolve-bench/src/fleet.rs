//! `fleet --nodes N`: a rollout to N simulated nodes against a real etcd.
//!
//! N node state machines (`evolve_fleet::node::Node`, the daemon's own code) run in this
//! process, each with its own lease, registration, watch and reports, acting on a simulated
//! machine (`SimHost`: one process per node that accepts every patch, no health command), all
//! against an etcd started on loopback for the run. Each node fetches the artifact from the
//! controller's HTTP server and verifies its digest and signature before "applying" it. The
//! controller (`evolve_fleet::controller::run`, in-process, elected) takes the rollout through
//! a canary of 1 and waves of 10 %, 50 %, 100 % with no bake and no check window.
//!
//! Reported, as medians of `--runs`:
//! - `all_applied_s`: from the rollout's creation to every node applied (goal ≤ 10);
//! - `etcd_requests_per_node_step`: requests the nodes sent to etcd in that time (reports,
//!   lease keep-alives, watches re-created, lists), per node and per step a node took (one:
//!   not applied → applied); `report_writes_per_node_step`: of which report writes;
//! - the baseline in the same run, `baseline_one_put_per_node_s`: every node writing one
//!   report, concurrently, through the same connections — the least any rollout needs — and
//!   the ratio `all_applied_s / baseline`.

use crate::stats::{median, round3};
use evolve_fleet::artifact::ArtifactStore;
use evolve_fleet::controller::{self, ControllerOptions};
use evolve_fleet::host::SimHost;
use evolve_fleet::local_etcd::LocalEtcd;
use evolve_fleet::model::*;
use evolve_fleet::node::{Node, NodeOptions, NodeStats};
use evolve_fleet::store::Store;
use evolve_fleet::trust::{Digest, SecretKey, TrustedKeys};
use serde_json::{json, Value};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of the scenario.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Simulated nodes.
    #[arg(long, default_value_t = 1000)]
    pub nodes: usize,
    /// Rollouts measured (each on a fresh etcd).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Nodes per etcd connection.
    #[arg(long, default_value_t = 100)]
    pub nodes_per_connection: usize,
    /// Accepted for uniformity: the output is always JSON.
    #[arg(long)]
    pub json: bool,
}

struct Sample {
    all_applied_s: f64,
    completed_s: f64,
    requests_per_node_step: f64,
    reports_per_node_step: f64,
    baseline_s: f64,
    controller_requests: u64,
}

async fn one_run(args: &Args, run: usize) -> Result<Sample, String> {
    let scratch =
        std::env::temp_dir().join(format!("evolve-bench-fleet-{}-{run}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    let etcd = LocalEtcd::start(&scratch).map_err(|e| e.to_string())?;
    let prefix = "/evolve/fleet";
    let connections = args.nodes.div_ceil(args.nodes_per_connection.max(1));
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(
            Store::connect(&[etcd.url()], prefix)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let key = SecretKey::generate("bench").map_err(|e| e.to_string())?;
    let trusted = TrustedKeys::from_keys(vec![key.public()]);

    // The artifact, served by the controller's HTTP side.
    let artifacts = ArtifactStore::open(&scratch.join("artifacts")).map_err(|e| e.to_string())?;
    let bytes: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let sha256 = Digest::of(&bytes);
    artifacts
        .write(&sha256, &bytes)
        .map_err(|e| e.to_string())?;
    let controller_store = clients[0].with_own_counter();
    let addr = evolve_fleet::web::spawn(
        "127.0.0.1:0".parse().expect("an address"),
        controller_store.clone(),
        artifacts,
    )
    .await
    .map_err(|e| e.to_string())?;

    // The nodes.
    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    let mut stats: Vec<Arc<NodeStats>> = Vec::new();
    let mut stores: Vec<Store> = Vec::new();
    for i in 0..args.nodes {
        let store = clients[i % connections].with_own_counter();
        let options = NodeOptions {
            name: format!("sim{i:05}"),
            labels: Default::default(),
            lease_ttl_s: 10,
            cache: scratch.join("cache").join(format!("sim{i:05}")),
            trusted: Some(trusted.clone()),
            health_command: None,
            scan_interval: Duration::from_secs(5),
        };
        let node = Node::new(
            store.clone(),
            Arc::new(SimHost::new(1000 + i as u32, "sim-server")),
            options,
        )
        .map_err(|e| e.to_string())?;
        stats.push(node.stats.clone());
        stores.push(store);
        tokio::spawn(node.run(stop.clone()));
    }
    let registered = Instant::now();
    loop {
        let nodes = controller::nodes(&controller_store)
            .await
            .map_err(|e| e.to_string())?;
        if nodes.len() == args.nodes {
            break;
        }
        if registered.elapsed() > Duration::from_secs(120) {
            return Err(format!(
                "only {} of {} nodes registered",
                nodes.len(),
                args.nodes
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the registrations settle (first scans, first watches).
    tokio::time::sleep(Duration::from_millis(500)).await;

    let created_ms = now_ms();
    let spec = RolloutSpec {
        id: format!("r{created_ms}-bench"),
        created_ms,
        created_by: "evolve-bench".into(),
        artifact: Artifact {
            sha256,
            size: bytes.len() as u64,
            urls: vec![format!("http://{addr}/artifacts/{sha256}")],
            signature: Some(key.sign(&sha256)),
            name: "bench.so".into(),
        },
        selector: Selector {
            program: Some("sim-server".into()),
            ..Selector::default()
        },
        canary: 1,
        waves: vec![10.0, 50.0, 100.0],
        bake_ms: 0,
        gates: Gates {
            health_command: None,
            probe: None,
            trial_ms: None,
            check_ms: 0,
            failure_budget: 0,
            step_deadline_ms: 120_000,
            in_process_canary: None,
        },
    };
    let requests_before: u64 = stores.iter().map(Store::requests).sum();
    let reports_before: u64 = stats.iter().map(|s| s.reports.load(Relaxed)).sum();
    let start = Instant::now();
    controller::create(&controller_store, &spec, "evolve-bench")
        .await
        .map_err(|e| e.to_string())?;
    let options = ControllerOptions {
        name: "bench-controller".into(),
        lease_ttl_s: 5,
        until: Some(spec.id.clone()),
    };
    let (controller_stop_sender, controller_stop) = tokio::sync::watch::channel(false);
    let controller_task = {
        let store = controller_store.clone();
        tokio::spawn(
            async move { controller::run(&store, &options, |_| {}, controller_stop).await },
        )
    };
    let mut shown = Instant::now();
    let all_applied = loop {
        let applied = stats
            .iter()
            .filter(|s| s.applied.load(Relaxed) >= 1)
            .count();
        if applied == args.nodes {
            break start.elapsed();
        }
        let state = || async {
            controller::rollout(&controller_store, Some(&spec.id))
                .await
                .map(|l| format!("{} {}", l.state.phase, spec.step_name(l.state.step)))
                .unwrap_or_else(|e| e.to_string())
        };
        if shown.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "fleet: {applied} of {} nodes applied after {:.1} s; rollout {}",
                args.nodes,
                start.elapsed().as_secs_f64(),
                state().await
            );
            shown = Instant::now();
        }
        if start.elapsed() > Duration::from_secs(300) {
            return Err(format!(
                "{applied} of {} nodes applied within 300 s; rollout {}",
                args.nodes,
                state().await
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let requests: u64 = stores.iter().map(Store::requests).sum::<u64>() - requests_before;
    let reports: u64 = stats.iter().map(|s| s.reports.load(Relaxed)).sum::<u64>() - reports_before;
    let phase = controller_task
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let completed = start.elapsed();
    let _ = controller_stop_sender.send(true);
    if phase != Some(Phase::Completed) {
        return Err(format!("the rollout ended {phase:?}"));
    }

    // The baseline: every node writes one report, concurrently, through the same connections.
    let baseline_start = Instant::now();
    let puts: Vec<_> = stores
        .iter()
        .enumerate()
        .map(|(i, store)| {
            let store = store.clone();
            tokio::spawn(async move {
                let key = format!("/evolve/baseline/{i}");
                store.put(&key, vec![b'x'; 200], None).await
            })
        })
        .collect();
    for put in puts {
        put.await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    let baseline = baseline_start.elapsed();
    let _ = stop_sender.send(true);
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(etcd);
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(Sample {
        all_applied_s: all_applied.as_secs_f64(),
        completed_s: completed.as_secs_f64(),
        requests_per_node_step: requests as f64 / args.nodes as f64,
        reports_per_node_step: reports as f64 / args.nodes as f64,
        baseline_s: baseline.as_secs_f64(),
        controller_requests: controller_store.requests(),
    })
}

/// Runs the scenario.
pub fn run(args: &Args) -> Result<Value, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut samples = Vec::new();
    for run in 0..args.runs.max(1) {
        samples.push(runtime.block_on(one_run(args, run))?);
    }
    let mut applied: Vec<f64> = samples.iter().map(|s| s.all_applied_s).collect();
    let mut completed: Vec<f64> = samples.iter().map(|s| s.completed_s).collect();
    let mut requests: Vec<f64> = samples.iter().map(|s| s.requests_per_node_step).collect();
    let mut baseline: Vec<f64> = samples.iter().map(|s| s.baseline_s).collect();
    let mut reports: Vec<f64> = samples.iter().map(|s| s.reports_per_node_step).collect();
    let mut ratios: Vec<f64> = samples
        .iter()
        .map(|s| s.all_applied_s / s.baseline_s)
        .collect();
    let all_applied_s = median(&mut applied);
    Ok(json!({
        "scenario": "fleet",
        "nodes": args.nodes,
        "runs": samples.len(),
        "waves": "canary 1, 10%, 50%, 100%, no bake",
        "all_applied_s": round3(all_applied_s),
        "all_applied_s_runs": samples.iter().map(|s| round3(s.all_applied_s)).collect::<Vec<_>>(),
        "rollout_completed_s": round3(median(&mut completed)),
        "etcd_requests_per_node_step": round3(median(&mut requests)),
        "report_writes_per_node_step": round3(median(&mut reports)),
        "etcd_data": "tmpfs (/dev/shm) when present",
        "controller_requests": samples.iter().map(|s| s.controller_requests).collect::<Vec<_>>(),
        "baseline_one_put_per_node_s": round3(median(&mut baseline)),
        "ratio_to_baseline": round3(median(&mut ratios)),
        "goal_all_applied_s": 10.0,
        "goal_met": all_applied_s <= 10.0,
    }))
}
