//! Failures during a rollout, with a real etcd and kv servers under load:
//! - a node killed mid-wave: its lease expires, the rollout goes on within its failure budget,
//!   and the node converges when it returns;
//! - the leading controller killed mid-step while a second one races it: the second takes
//!   over, and etcd's history shows every step written exactly once;
//! - etcd restarted and compacted while the nodes are away, with an abort issued meanwhile:
//!   every node re-lists, obeys the abort and reverts.

use crate::harness::*;
use evolve_fleet::model::{position, Phase, ProcessState, RolloutState};
use evolve_fleet::store::WatchEvent;
use std::time::Duration;

fn spawn_rollout(
    url: &str,
    patch: &std::path::Path,
    store_dir: &std::path::Path,
    extra: &[&str],
) -> std::process::Child {
    let mut args = vec![
        "fleet",
        "--etcd",
        url,
        "rollout",
        patch.to_str().unwrap(),
        "--canary",
        "1",
        "--check",
        "500ms",
        "--step-deadline",
        "90s",
        "--store",
        store_dir.to_str().unwrap(),
        "--controller-ttl",
        "2s",
        "--json",
    ];
    args.extend_from_slice(extra);
    evolve_spawn(&args)
}

fn first_line(child: &mut std::process::Child) -> serde_json::Value {
    use std::io::BufRead;
    let stdout = child.stdout.as_mut().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

fn state(
    runtime: &tokio::runtime::Runtime,
    store: &evolve_fleet::store::Store,
    id: &str,
) -> RolloutState {
    runtime
        .block_on(evolve_fleet::controller::rollout(store, Some(id)))
        .unwrap()
        .state
}

fn wait_exit(child: &mut std::process::Child, what: &str) -> bool {
    evolve_testkit::wait_exit(child, Duration::from_secs(180))
        .unwrap_or_else(|| panic!("{what} did not finish"))
        .success()
}

#[test]
fn a_fleet_rides_out_dead_nodes_dead_controllers_and_a_compacted_etcd() {
    let _serial = serial();
    let scratch = Scratch::new("failures");
    let mut etcd = Etcd::start(&scratch.0);
    let runtime = runtime();
    let store = etcd.store(&runtime);
    let example = Example::build("fleet-failures");
    example
        .workspace
        .apply_source_patch("01-incr-type-check")
        .unwrap();
    let fix = example.build_patch("incr-fix", None);
    example
        .workspace
        .apply_source_patch("02-append-command")
        .unwrap();
    let append = example.build_patch("append", None);
    let mut fleet = machines(
        8,
        &scratch.0.join("machines"),
        &etcd,
        &example.binary,
        &MachineOptions::default(),
    );
    wait_registered(&runtime, &store, 8);
    let url = etcd.url();
    let store_dir = scratch.0.join("artifacts");

    // 1. A node killed mid-wave, within a budget of one per wave.
    let mut controller = spawn_rollout(
        &url,
        &fix,
        &store_dir,
        &[
            "--waves",
            "50%,100%",
            "--failure-budget",
            "1",
            "--bake",
            "0",
        ],
    );
    let id = first_line(&mut controller)["rollout"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for("wave 1", Duration::from_secs(60), || {
        state(&runtime, &store, &id).step >= 1
    });
    // The last node wave 1 admits: killed before or after it applied, either way lost.
    let admit = state(&runtime, &store, &id).admit;
    let victim = fleet
        .iter()
        .filter(|m| position(&id, &m.name) <= admit)
        .max_by_key(|m| position(&id, &m.name))
        .unwrap()
        .name
        .clone();
    let index = fleet.iter().position(|m| m.name == victim).unwrap();
    fleet[index].kill_node();
    assert!(
        wait_exit(&mut controller, "the rollout"),
        "lost within the budget: it completes"
    );
    wait_for(
        "the dead node's lease to expire",
        Duration::from_secs(30),
        || {
            !runtime
                .block_on(evolve_fleet::controller::nodes(&store))
                .unwrap()
                .contains_key(&victim)
        },
    );
    let status = runtime
        .block_on(evolve_fleet::controller::status(&store, Some(&id)))
        .unwrap();
    assert_eq!(status.state.phase, Phase::Completed);
    assert_eq!(status.tally.lost, 1, "{:?}", status.tally);
    // It returns and converges.
    fleet[index].start_node();
    wait_for(
        "the returning node to converge",
        Duration::from_secs(60),
        || {
            runtime
                .block_on(evolve_fleet::controller::reports(&store, &id))
                .unwrap()
                .get(&victim)
                .is_some_and(|r| r.state == ProcessState::Healthy)
        },
    );
    for machine in &fleet {
        assert_eq!(machine.version(), "1.0.1", "{}", machine.name);
    }

    // 2. Two controllers race; the leader dies mid-step; the other finishes.
    let ports: Vec<String> = (0..2)
        .map(|_| {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            format!("127.0.0.1:{port}")
        })
        .collect();
    let mut controllers: Vec<std::process::Child> = ports
        .iter()
        .enumerate()
        .map(|(i, serve)| {
            evolve_spawn(&[
                "fleet",
                "--etcd",
                &url,
                "controller",
                "--serve",
                serve,
                "--store",
                store_dir.to_str().unwrap(),
                "--controller-ttl",
                "2s",
                "--controller-name",
                &format!("c{i}"),
            ])
        })
        .collect();
    for serve in &ports {
        wait_for("a controller", Duration::from_secs(30), || {
            std::net::TcpStream::connect(serve).is_ok()
        });
    }
    let bases: Vec<String> = ports.iter().map(|p| format!("http://{p}")).collect();
    let out = evolve(&[
        "fleet",
        "--etcd",
        &url,
        "rollout",
        append.to_str().unwrap(),
        "--detach",
        "--canary",
        "1",
        "--waves",
        "25%,50%,100%",
        "--bake",
        "1500ms",
        "--check",
        "300ms",
        "--step-deadline",
        "90s",
        "--store",
        store_dir.to_str().unwrap(),
        "--artifact-url",
        &bases[0],
        "--artifact-url",
        &bases[1],
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id2 = serde_json::from_slice::<serde_json::Value>(
        out.stdout.split(|b| *b == b'\n').next().unwrap(),
    )
    .unwrap()["rollout"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for("the first step", Duration::from_secs(60), || {
        state(&runtime, &store, &id2).step >= 1
    });
    let leader = runtime.block_on(store.leader()).unwrap().expect("a leader");
    let dead = if leader == "c0" { 0 } else { 1 };
    let _ = controllers[dead].kill();
    let _ = controllers[dead].wait();
    wait_for(
        "the other controller to finish",
        Duration::from_secs(120),
        || state(&runtime, &store, &id2).phase == Phase::Completed,
    );
    let survivor = format!("c{}", 1 - dead);
    let events = history(&runtime, &store, &store.keys().state(&id2));
    let states: Vec<RolloutState> = events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Put(entry) => Some(entry.json().unwrap()),
            _ => None,
        })
        .collect();
    let transitions = &states.last().unwrap().transitions;
    let steps: Vec<usize> = transitions.iter().map(|t| t.step).collect();
    assert_eq!(steps, [0, 1, 2, 3, 3], "every step once: {transitions:?}");
    // Each written state extends the one before it: no step taken twice, none lost.
    for pair in states.windows(2) {
        assert!(
            pair[1].transitions.starts_with(&pair[0].transitions),
            "{pair:?}"
        );
    }
    let by: Vec<&str> = transitions.iter().map(|t| t.by.as_str()).collect();
    assert!(
        by.contains(&leader.as_str()) && by.contains(&survivor.as_str()),
        "{by:?}"
    );
    for machine in &fleet {
        assert_eq!(machine.version(), "1.1.0", "{}", machine.name);
    }
    for mut c in controllers {
        let _ = c.kill();
        let _ = c.wait();
    }

    // 3. A third rollout (the fix again, on top: versions stack) stops after its canary for a
    //    long bake. The nodes are then away (stopped) while etcd restarts, the rollout is
    //    aborted and the history compacted: they re-list and obey the abort.
    let mut third = spawn_rollout(
        &url,
        &fix,
        &store_dir,
        &["--waves", "50%,100%", "--bake", "120s"],
    );
    let id3 = first_line(&mut third)["rollout"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for("the third canary", Duration::from_secs(60), || {
        runtime
            .block_on(evolve_fleet::controller::reports(&store, &id3))
            .unwrap()
            .values()
            .any(|r| r.state == ProcessState::Healthy)
    });
    let canary: Vec<String> = fleet
        .iter()
        .filter(|m| m.version() == "1.0.1")
        .map(|m| m.name.clone())
        .collect();
    assert_eq!(canary.len(), 1, "only the canary runs the third patch");
    let pids: Vec<i32> = fleet
        .iter()
        .map(|m| m.node.as_ref().unwrap().id() as i32)
        .collect();
    let signal = |sig: &str| {
        for pid in &pids {
            let _ = std::process::Command::new("kill")
                .args([sig, &pid.to_string()])
                .status();
        }
    };
    signal("-STOP");
    etcd.restart(Duration::from_millis(300));
    let store = etcd.store(&runtime);
    let aborted = evolve(&[
        "fleet",
        "--etcd",
        &url,
        "abort",
        &id3,
        "--reason",
        "test abort while away",
    ]);
    assert!(
        aborted.status.success(),
        "{}",
        String::from_utf8_lossy(&aborted.stderr)
    );
    // Compact everything the nodes have not seen.
    let (_, revision) = runtime
        .block_on(store.list(&store.keys().desired()))
        .unwrap();
    runtime.block_on(store.compact(revision)).unwrap();
    signal("-CONT");
    wait_for("the canary to revert", Duration::from_secs(60), || {
        fleet.iter().all(|m| m.version() == "1.1.0")
    });
    wait_for(
        "the canary's report to say reverted",
        Duration::from_secs(60),
        || {
            runtime
                .block_on(evolve_fleet::controller::reports(&store, &id3))
                .unwrap()
                .get(&canary[0])
                .is_some_and(|r| r.state == ProcessState::Reverted)
        },
    );
    let _ = third.kill();
    let _ = third.wait();

    for machine in &mut fleet {
        let (requests, wrong, dropped) = machine.finish_load();
        assert!(requests > 0);
        assert_eq!((wrong, dropped), (0, 0), "{}", machine.name);
    }
}
