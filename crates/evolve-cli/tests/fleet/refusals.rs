//! Rollouts that must not go through, with a real etcd and kv servers under load:
//! - a canary that fails its probe gate: the rollout aborts, the canary is reverted, and etcd's
//!   revision history shows that no node outside the canary ever applied the patch;
//! - an unsigned patch and one signed by an untrusted key: refused by the nodes (and by the
//!   agents themselves), naming the key and the reason.

use crate::harness::*;
use evolve_fleet::model::{NodeReport, Phase, ProcessState, RolloutState};
use evolve_fleet::store::WatchEvent;
use std::collections::BTreeSet;

const NODES: usize = 6;

fn rollout(url: &str, patch: &std::path::Path, store_dir: &std::path::Path) -> (bool, String) {
    let out = evolve(&[
        "fleet",
        "--etcd",
        url,
        "rollout",
        patch.to_str().unwrap(),
        "--canary",
        "1",
        "--waves",
        "50%,100%",
        "--bake",
        "0",
        "--check",
        "1500ms",
        "--probe-max",
        "kv_core::stats::count_error<=0",
        "--step-deadline",
        "60s",
        "--store",
        store_dir.to_str().unwrap(),
        "--json",
    ]);
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn rollout_id(output: &str) -> String {
    let first: serde_json::Value = serde_json::from_str(output.lines().next().unwrap()).unwrap();
    first["rollout"].as_str().unwrap().to_string()
}

#[test]
fn bad_canaries_and_bad_signatures_never_spread() {
    let _serial = serial();
    let scratch = Scratch::new("refusals");
    let etcd = Etcd::start(&scratch.0);
    let runtime = runtime();
    let store = etcd.store(&runtime);
    let example = Example::build("fleet-refusals");
    let keys = scratch.0.join("keys");
    let ops = keygen("ops", &keys);
    let dev = keygen("dev", &scratch.0.join("untrusted"));
    let trusted = keys.join("ops.pub");

    // A bad patch: GET answers an error (a probe on the error counter sees it).
    example.edit(
        "kv-commands/src/lib.rs",
        "b\"GET\" => strings::get(store, args),",
        "b\"GET\" => Reply::error(\"broken GET\"),",
    );
    example.edit("kv-commands/src/lib.rs", "\"1.0.0\"", "\"1.0.1-broken\"");
    let bad = example.build_patch("broken-get", Some(&ops));
    example.edit(
        "kv-commands/src/lib.rs",
        "b\"GET\" => Reply::error(\"broken GET\"),",
        "b\"GET\" => strings::get(store, args),",
    );
    example.edit("kv-commands/src/lib.rs", "\"1.0.1-broken\"", "\"1.0.2\"");
    let unsigned = example.build_patch("unsigned", None);
    let foreign = example.build_patch("foreign", Some(&dev));

    let options = MachineOptions {
        trusted: Some(trusted.clone()),
        agent_trusted: Some(trusted.clone()),
        health: None,
    };
    let mut fleet = machines(
        NODES,
        &scratch.0.join("machines"),
        &etcd,
        &example.binary,
        &options,
    );
    wait_registered(&runtime, &store, NODES);
    let url = etcd.url();
    let store_dir = scratch.0.join("artifacts");

    // 1. The canary fails its probe gate: aborted, reverted, nobody else touched.
    let (ok, output) = rollout(&url, &bad, &store_dir);
    assert!(!ok, "a broken canary must abort: {output}");
    let id = rollout_id(&output);
    let status = runtime
        .block_on(evolve_fleet::controller::status(&store, Some(&id)))
        .unwrap();
    assert_eq!(status.state.phase, Phase::Aborted);
    let reason = status.state.reason.clone().unwrap();
    assert!(
        reason.contains("canary")
            && reason.contains("probe gate")
            && reason.contains("count_error"),
        "{reason}"
    );
    for machine in &fleet {
        assert_eq!(
            machine.version(),
            "1.0.0",
            "{} runs the broken patch",
            machine.name
        );
    }
    let events = history(&runtime, &store, &format!("{}/", store.keys().prefix()));
    let mut touched = BTreeSet::new();
    let mut steps = BTreeSet::new();
    for event in &events {
        if let WatchEvent::Put(entry) = event {
            if entry.key == store.keys().state(&id) {
                steps.insert(entry.json::<RolloutState>().unwrap().step);
            }
            if let Some((rollout, node)) = store.keys().parse_report(&entry.key) {
                let report: NodeReport = entry.json().unwrap();
                if rollout == id && report.state != ProcessState::Staged {
                    touched.insert(node.to_string());
                }
            }
        }
    }
    assert_eq!(
        steps,
        BTreeSet::from([0]),
        "the rollout never left the canary"
    );
    assert_eq!(
        touched.len(),
        1,
        "only the canary ever reported: {touched:?}"
    );

    // 2. Unsigned: the canary's node refuses it, naming why.
    let (ok, output) = rollout(&url, &unsigned, &store_dir);
    assert!(!ok, "{output}");
    let status = runtime
        .block_on(evolve_fleet::controller::status(
            &store,
            Some(&rollout_id(&output)),
        ))
        .unwrap();
    let reason = status.state.reason.unwrap();
    assert!(reason.contains("not signed"), "{reason}");

    // 3. Signed by a key the nodes do not trust: refused, naming the key.
    let (ok, output) = rollout(&url, &foreign, &store_dir);
    assert!(!ok, "{output}");
    let status = runtime
        .block_on(evolve_fleet::controller::status(
            &store,
            Some(&rollout_id(&output)),
        ))
        .unwrap();
    let reason = status.state.reason.unwrap();
    assert!(
        reason.contains("key dev") && reason.contains("not trusted"),
        "{reason}"
    );

    // The agents refuse on their own too (EVOLVE_TRUSTED_KEYS), naming the key and why.
    let pid = fleet[0].pid().to_string();
    let sockets = fleet[0].sockets();
    for (patch, why) in [(&unsigned, "not signed"), (&foreign, "key dev")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_evolve"))
            .args(["apply", &pid, patch.to_str().unwrap()])
            .env("EVOLVE_SOCKET_DIR", &sockets)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(why), "{stderr}");
    }
    // A tampered file: its signature no longer matches.
    let tampered = scratch.0.join("tampered.so");
    let mut bytes = std::fs::read(&unsigned).unwrap();
    std::fs::copy(
        foreign.with_extension("so.sig"),
        tampered.with_extension("so.sig"),
    )
    .unwrap();
    bytes.push(0);
    std::fs::write(&tampered, bytes).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_evolve"))
        .args(["apply", &pid, tampered.to_str().unwrap()])
        .env("EVOLVE_SOCKET_DIR", &sockets)
        .output()
        .unwrap();
    assert!(!out.status.success());

    for machine in &mut fleet {
        assert_eq!(machine.version(), "1.0.0");
        let (requests, _, dropped) = machine.finish_load();
        assert!(requests > 0);
        assert_eq!(dropped, 0, "{}", machine.name);
    }
}
