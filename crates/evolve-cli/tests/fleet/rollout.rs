//! A signed patch rolled out to 20 nodes (each a kv server under checked load, managed by its
//! own `evolve node`) through a real etcd: canary, then 10 %, 50 %, 100 %; every node ends
//! patched with zero failed requests; no node applied before the state admitted it (checked
//! from etcd's revision history); the operators' page in headless Chromium; a server restarted
//! afterwards is patched again by its node.

use crate::harness::*;
use evolve_fleet::model::{position, NodeReport, ProcessState, RolloutState};
use evolve_fleet::store::WatchEvent;
use std::collections::BTreeMap;
use std::time::Duration;

const NODES: usize = 20;

/// The page as Chromium renders it (`--dump-dom`).
fn chromium_dom(url: &str, profile: &std::path::Path) -> String {
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", url])
        .output()
        .expect("chromium is installed (Debian package chromium; .ci/run installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_signed_patch_reaches_twenty_nodes_in_waves_and_survives_a_server_restart() {
    let _serial = serial();
    let scratch = Scratch::new("rollout");
    let etcd = Etcd::start(&scratch.0);
    let runtime = runtime();
    let store = etcd.store(&runtime);
    let example = Example::build("fleet-rollout");
    let key = keygen("ops", &scratch.0.join("keys"));
    let trusted = scratch.0.join("keys/ops.pub");
    example
        .workspace
        .apply_source_patch("01-incr-type-check")
        .unwrap();
    let patch = example.build_patch("incr-fix", Some(&key));
    assert!(patch.with_extension("so.sig").exists());

    let options = MachineOptions {
        trusted: Some(trusted.clone()),
        agent_trusted: Some(trusted),
        health: Some("test -n \"$EVOLVE_PID\"".into()),
    };
    let mut fleet = machines(
        NODES,
        &scratch.0.join("machines"),
        &etcd,
        &example.binary,
        &options,
    );
    wait_registered(&runtime, &store, NODES);
    std::thread::sleep(Duration::from_millis(500));

    let url = etcd.url();
    let store_dir = scratch.0.join("artifacts");
    let out = evolve(&[
        "fleet",
        "--etcd",
        &url,
        "rollout",
        patch.to_str().unwrap(),
        "--canary",
        "1",
        "--waves",
        "10%,50%,100%",
        "--bake",
        "0",
        "--check",
        "1s",
        "--probe-max",
        "kv_core::stats::count_error<=0",
        "--health",
        "test \"$EVOLVE_ROLLOUT\" != \"\"",
        "--step-deadline",
        "90s",
        "--store",
        store_dir.to_str().unwrap(),
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rollout failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    let id = first["rollout"].as_str().unwrap().to_string();

    // Every node patched, healthy, signed by the trusted key.
    let status = runtime
        .block_on(evolve_fleet::controller::status(&store, Some(&id)))
        .unwrap();
    assert_eq!(status.tally.healthy, NODES, "{:?}", status.tally);
    assert_eq!(
        status.spec.artifact.signature.as_ref().unwrap().key_name,
        "ops"
    );
    for machine in &fleet {
        assert_eq!(machine.version(), "1.0.1", "{}", machine.name);
    }

    // From etcd's history: each step written once, in order; no node applied before the
    // state admitted it.
    let events = history(&runtime, &store, &format!("{}/", store.keys().prefix()));
    let mut states: Vec<(i64, RolloutState)> = Vec::new();
    let mut first_report: BTreeMap<String, i64> = BTreeMap::new();
    for event in &events {
        if let WatchEvent::Put(entry) = event {
            if entry.key == store.keys().state(&id) {
                states.push((entry.mod_revision, entry.json().unwrap()));
            } else if let Some((rollout, node)) = store.keys().parse_report(&entry.key) {
                let report: NodeReport = entry.json().unwrap();
                if rollout == id && report.state != ProcessState::Staged {
                    first_report
                        .entry(node.to_string())
                        .or_insert(entry.mod_revision);
                }
            }
        }
    }
    let steps: Vec<usize> = states.iter().map(|(_, s)| s.step).collect();
    assert_eq!(steps, [0, 1, 2, 3, 3], "each step once: {steps:?}");
    assert_eq!(first_report.len(), NODES);
    for (node, revision) in &first_report {
        let admitted_at = states
            .iter()
            .find(|(_, s)| s.admits(position(&id, node)))
            .map(|(r, _)| *r)
            .unwrap();
        assert!(
            *revision > admitted_at,
            "{node} reported at revision {revision}, before the state admitted it ({admitted_at})"
        );
    }
    // The canary alone in step 0, two nodes by step 1.
    let admitted = |s: &RolloutState| {
        fleet
            .iter()
            .filter(|m| s.admits(position(&id, &m.name)))
            .count()
    };
    assert_eq!(admitted(&states[0].1), 1);
    assert_eq!(admitted(&states[1].1), 2);
    assert_eq!(admitted(&states[2].1), 10);

    // The terminal views.
    let shown = evolve(&["fleet", "--etcd", &etcd.url(), "status", &id]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("completed") && text.contains("20 selected: 20 healthy"),
        "{text}"
    );
    let watched = evolve(&[
        "fleet",
        "--etcd",
        &etcd.url(),
        "status",
        "--watch",
        "--json",
    ]);
    let last: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&watched.stdout)
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        last["state"]["phase"], "completed",
        "--watch ends with the rollout"
    );
    let history = evolve(&["fleet", "--etcd", &etcd.url(), "history", "--json"]);
    let history: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
    assert_eq!(history["rollouts"][0]["spec"]["id"], id.as_str());

    // The operators' page, served by a controller, in headless Chromium.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let serve = format!("127.0.0.1:{port}");
    let mut controller = evolve_spawn(&[
        "fleet",
        "--etcd",
        &url,
        "controller",
        "--serve",
        &serve,
        "--store",
        store_dir.to_str().unwrap(),
    ]);
    let page_url = format!("http://{serve}/");
    wait_for("the page", Duration::from_secs(30), || {
        std::net::TcpStream::connect(&serve).is_ok()
    });
    let dom = chromium_dom(&page_url, &scratch.0.join("chromium"));
    let _ = controller.kill();
    let _ = controller.wait();
    assert!(dom.contains(&format!("rollout {id}")), "{dom}");
    assert!(dom.contains(">completed<"), "{dom}");
    assert!(dom.contains("signed by ops"), "{dom}");
    assert!(
        dom.contains(&format!("{NODES} selected; healthy {NODES}")),
        "{dom}"
    );
    for machine in &fleet {
        assert!(dom.contains(&format!("<td>{}</td>", machine.name)), "{dom}");
    }

    // A server restarted after the rollout: the same binary (build id), a new pid; its node
    // applies the patch again.
    let machine = &mut fleet[7];
    let old_pid = machine.pid();
    machine.stop_server();
    machine.start_server();
    assert_ne!(machine.pid(), old_pid);
    wait_for(
        "the restarted server to be patched again",
        Duration::from_secs(60),
        || machine.version() == "1.0.1",
    );
    let name = machine.name.clone();
    wait_for(
        "the node's report of the second apply",
        Duration::from_secs(30),
        || {
            runtime
                .block_on(evolve_fleet::controller::reports(&store, &id))
                .unwrap()
                .get(&name)
                .is_some_and(|r| {
                    r.processes
                        .iter()
                        .any(|p| p.applies >= 2 && p.state == ProcessState::Healthy)
                })
        },
    );

    // Zero failed requests, no dropped connection, anywhere.
    for machine in &mut fleet {
        let (requests, wrong, dropped) = machine.finish_load();
        assert!(requests > 0, "{}: no load", machine.name);
        assert_eq!((wrong, dropped), (0, 0), "{}", machine.name);
    }
}
