//! The `evolve` CLI against the kv example server while checked client load runs: every command
//! an operator would use on it, with `--json` parsed, and the server's behaviour checked through
//! its own protocol after each change.

use evolve_demo::client::{Client, Load, Value};
use evolve_demo::server::Server;
use evolve_demo::workspace::{Flavor, KvWorkspace};
use serde_json::Value as Json;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;

fn evolve(sockets: &Path, args: &[&str]) -> Json {
    evolve_in(sockets, args, None)
}

/// Runs `evolve ARGS --json`; `target`: the cargo target directory for `build-patch` (the one
/// the server was built in, so dependencies are not compiled again).
fn evolve_in(sockets: &Path, args: &[&str], target: Option<&Path>) -> Json {
    let mut command = Command::new(env!("CARGO_BIN_EXE_evolve"));
    command
        .args(args)
        .arg("--json")
        .env("EVOLVE_SOCKET_DIR", sockets);
    if let Some(target) = target {
        command.env("CARGO_TARGET_DIR", target);
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "evolve {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn names(list: &Json) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_cli_drives_the_kv_server_under_load() {
    let workspace = KvWorkspace::prepare("cli-test").unwrap();
    let binary = workspace.build(Flavor::Evolve).unwrap();
    let sockets = workspace.dir.join("sockets");
    let server = Server::start(&binary, Some(&sockets)).unwrap();
    let pid = server.pid.to_string();
    let pid = pid.as_str();
    let mut client = Client::connect(server.addr).unwrap();
    client.command("SET visitor alice").unwrap();
    let load = Load::start(server.addr, 4);

    let ps = evolve(&sockets, &["ps"]);
    assert!(
        ps["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["pid"] == server.pid && p["program"] == "kv-server"),
        "{ps}"
    );
    let functions = evolve(&sockets, &["functions", pid]);
    let hot = names(&functions["hot"]);
    for handler in ["kv_commands::execute", "kv_commands::strings::incr_by"] {
        assert!(hot.iter().any(|h| h == handler), "{hot:?}");
    }
    assert_eq!(names(&functions["multiverse"]), ["count_command"]);
    let status = evolve(&sockets, &["status", pid]);
    assert_eq!(names(&status["switches"]), ["COMMAND_STATS"]);

    // A patch from the ready source change, built by the CLI against the running server.
    workspace.apply_source_patch("01-incr-type-check").unwrap();
    let patch = workspace.dir.join("incr-fix.so");
    let built = evolve_in(
        &sockets,
        &[
            "build-patch",
            "--manifest-path",
            workspace.dir.join("Cargo.toml").to_str().unwrap(),
            "-p",
            "kv-commands",
            "--pid",
            pid,
            "-o",
            patch.to_str().unwrap(),
        ],
        Some(&workspace.target),
    );
    assert_eq!(built["output"], patch.to_str().unwrap());
    let applied = evolve(&sockets, &["apply", pid, patch.to_str().unwrap()]);
    assert!(applied["switch_ms"].as_f64().unwrap() <= applied["total_ms"].as_f64().unwrap());
    assert!(matches!(
        client.command("INCR visitor").unwrap(),
        Value::Error(_)
    ));
    assert_eq!(client.info().unwrap()["kv_version"], "1.0.1");

    // Statistics off, committed: the counter stops.
    evolve(&sockets, &["switch", pid, "set", "COMMAND_STATS", "false"]);
    let committed = evolve(&sockets, &["commit", pid, "COMMAND_STATS"]);
    assert_eq!(committed["changed"], serde_json::json!(["count_command"]));
    let counted = |c: &mut Client| c.info().unwrap()["total_commands_processed"].clone();
    let before = counted(&mut client);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(counted(&mut client), before, "commands still counted");

    // A probe on an unprepared function of the server, read while the load runs, removed.
    let added = evolve(
        &sockets,
        &["probe", pid, "add", "kv_core::store::Store::get", "--count"],
    );
    let id = added["probes"][0]["id"].as_u64().unwrap().to_string();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let read = evolve(&sockets, &["probe", pid, "read", &id]);
    assert!(read["readings"][0]["calls"].as_u64().unwrap() > 0, "{read}");
    let top = evolve(&sockets, &["top", pid, "--once"]);
    assert_eq!(top["hello"]["pid"], server.pid);
    evolve(&sockets, &["probe", pid, "rm", "--all"]);
    assert_eq!(
        evolve(&sockets, &["probe", pid, "list"])["probes"],
        serde_json::json!([])
    );

    // Back to where it started.
    evolve(&sockets, &["revert-switches", pid]);
    let reverted = evolve(&sockets, &["revert", pid]);
    assert!(!reverted["changed"].as_array().unwrap().is_empty());
    client.command("SET visitor alice").unwrap();
    assert_eq!(client.command("INCR visitor").unwrap(), Value::Integer(1));
    evolve(&sockets, &["gc", pid]);
    let history = evolve(&sockets, &["history", pid]);
    let entries = history["entries"].as_array().unwrap();
    assert!(entries.len() >= 6, "{history}");

    let totals = load.stop();
    assert!(totals.requests.load(Relaxed) > 0);
    assert_eq!(totals.wrong.load(Relaxed), 0, "wrong replies under load");
    assert_eq!(totals.dropped.load(Relaxed), 0, "connections lost");
}
