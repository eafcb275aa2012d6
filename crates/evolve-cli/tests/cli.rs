//! The `evolve` CLI against running example processes: every command, `--json` parsed, a patch
//! built, applied and reverted, switches set and committed, the journal, refusals.

mod common;

use common::{evolve, evolve_with, fixture, shared, socket_dir};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| {
            v["name"]
                .as_str()
                .unwrap_or_else(|| v.as_str().unwrap())
                .to_string()
        })
        .collect()
}

#[test]
fn every_command_against_a_running_process() {
    let fixture = fixture("every");
    let dir = socket_dir("every");
    let mut host = fixture.start(&dir);
    let pid = host.pid().to_string();
    let pid = pid.as_str();
    assert_eq!(host.probe()["price"], 30);

    // ps
    let ps = evolve(&dir, &["ps", "--json"]).expect_json();
    let listed = ps["processes"].as_array().unwrap();
    assert!(
        listed
            .iter()
            .any(|p| p["pid"] == host.pid() && p["program"] == "ctlhost"),
        "{ps}"
    );
    assert!(evolve(&dir, &["ps"]).stdout().contains("ctlhost"));

    // status, functions
    let status = evolve(&dir, &["status", pid, "--json"]).expect_json();
    assert_eq!(status["hello"]["pid"], host.pid());
    assert_eq!(status["reclamation"]["available"], false);
    assert_eq!(
        names(&status["switches"]),
        ["FAST", "LEVEL"].map(String::from).to_vec()
    );
    let human = evolve(&dir, &["status", pid]);
    assert!(
        human.ok() && human.stdout().contains("reclamation not available"),
        "{}",
        human.stdout()
    );
    let functions = evolve(&dir, &["functions", pid, "--json"]).expect_json();
    let hot = &functions["hot"][0];
    assert!(
        hot["name"].as_str().unwrap().ends_with("price"),
        "{functions}"
    );
    assert_eq!(hot["current"], 0);
    assert_eq!(functions["multiverse"][0]["name"], "checksum");
    assert_eq!(functions["multiverse"][0]["committed"], false);

    // switch set, commit, revert-switches
    let set = evolve(&dir, &["switch", pid, "set", "FAST", "true", "--json"]).expect_json();
    assert_eq!(set["value"], 1);
    let out_of_domain = evolve(&dir, &["switch", pid, "set", "LEVEL", "9"]);
    assert!(!out_of_domain.ok());
    assert!(
        out_of_domain.stderr().contains("not in the domain"),
        "{}",
        out_of_domain.stderr()
    );
    assert_eq!(
        host.probe()["checksum"],
        5,
        "the generic code reads the switch"
    );
    let committed = evolve(&dir, &["commit", pid, "FAST", "--json"]).expect_json();
    assert_eq!(committed["changed"], serde_json::json!(["checksum"]));
    let functions = evolve(&dir, &["functions", pid, "--json"]).expect_json();
    assert_eq!(functions["multiverse"][0]["committed"], true);
    evolve(&dir, &["switch", pid, "set", "FAST", "false", "--json"]).expect_json();
    assert_eq!(
        host.probe()["checksum"],
        5,
        "committed code keeps its binding"
    );
    let reverted = evolve(&dir, &["revert-switches", pid, "--json"]).expect_json();
    assert_eq!(reverted["changed"], serde_json::json!(["checksum"]));
    assert_eq!(host.probe()["checksum"], 155);
    evolve(&dir, &["commit", pid, "--json"]).expect_json();
    assert!(!evolve(&dir, &["commit", pid, "NO_SUCH_SWITCH"]).ok());

    // build-patch against the running process
    fixture.edit(&[("quantity * 10 // v1", "quantity * 20 // v2")]);
    let output = fixture.dir.join("v2.so");
    let built = evolve_with(
        &dir,
        &[
            "build-patch",
            "--manifest-path",
            fixture.dir.join("Cargo.toml").to_str().unwrap(),
            "--package",
            "ctlhot",
            "--pid",
            pid,
            "--output",
            output.to_str().unwrap(),
            "--json",
        ],
        |c| {
            c.env("CARGO_TARGET_DIR", &fixture.target);
        },
    )
    .expect_json();
    assert_eq!(built["functions"].as_array().unwrap().len(), 1, "{built}");
    assert!(output.exists());

    // apply, revert (last), apply --atomic --trial, revert FUNCTION
    let applied = evolve(&dir, &["apply", pid, output.to_str().unwrap(), "--json"]).expect_json();
    assert_eq!(applied["patch"], "v2");
    assert!(names(&applied["updated"])[0].ends_with("price"));
    assert_eq!(host.probe()["price"], 60);
    let functions = evolve(&dir, &["functions", pid, "--json"]).expect_json();
    assert_eq!(functions["hot"][0]["current"], 1);
    assert_eq!(
        functions["hot"][0]["versions"],
        serde_json::json!(["program", "v2"])
    );
    let reverted = evolve(&dir, &["revert", pid, "--json"]).expect_json();
    assert_eq!(reverted["what"], "last patch");
    assert_eq!(host.probe()["price"], 30);
    let again = evolve(
        &dir,
        &[
            "apply",
            pid,
            output.to_str().unwrap(),
            "--atomic",
            "--trial",
            "30s",
            "--json",
        ],
    )
    .expect_json();
    assert_eq!(again["patch"], "v2#2");
    assert_eq!(again["atomic"], true);
    assert_eq!(again["trial_ms"], 30_000);
    assert_eq!(host.probe()["price"], 60);
    let by_function = evolve(&dir, &["revert", pid, "price", "--json"]).expect_json();
    assert!(
        by_function["what"]
            .as_str()
            .unwrap()
            .contains("to version 0"),
        "{by_function}"
    );
    assert_eq!(host.probe()["price"], 30);
    let refused = evolve(&dir, &["apply", pid, "/etc/hostname"]);
    assert!(!refused.ok());
    assert!(
        refused.stderr().contains("not an Evolve patch"),
        "{}",
        refused.stderr()
    );

    // gc answers honestly
    let gc = evolve(&dir, &["gc", pid]);
    assert!(!gc.ok());
    assert!(
        gc.stderr().contains("reclamation not available"),
        "{}",
        gc.stderr()
    );

    // history: the journal, with uid and outcome
    let history = evolve(&dir, &["history", pid, "--json"]).expect_json();
    let entries = history["entries"].as_array().unwrap();
    let ops: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e["op"].as_str().unwrap(), e["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        ops,
        [
            ("switch_set", "ok"),
            ("switch_set", "failed"),
            ("commit", "ok"),
            ("switch_set", "ok"),
            ("revert_switches", "ok"),
            ("commit", "ok"),
            ("commit", "failed"),
            ("apply", "ok"),
            ("revert", "ok"),
            ("apply", "ok"),
            ("revert", "ok"),
            ("apply", "failed"),
            ("gc", "failed"),
        ]
    );
    let me = rustix::process::geteuid().as_raw();
    assert!(entries
        .iter()
        .all(|e| e["uid"] == me && e["at_ms"].as_u64().unwrap() > 0));
    let file = std::fs::read_to_string(history["file"].as_str().unwrap()).unwrap();
    assert_eq!(
        file.lines().count(),
        entries.len(),
        "the journal file has every entry"
    );
    assert!(evolve(&dir, &["history", pid]).stdout().contains("apply"));

    // status after all that
    let status = evolve(&dir, &["status", pid, "--json"]).expect_json();
    assert_eq!(status["patches"].as_array().unwrap().len(), 2);
    assert_eq!(status["journal_entries"], entries.len());

    // top, one frame
    let top = evolve(&dir, &["top", pid, "--once"]);
    assert!(top.ok(), "{}", top.stderr());
    let frame = top.stdout();
    assert!(
        frame.contains("HOT FUNCTION") && frame.contains("price"),
        "{frame}"
    );
    assert!(
        frame.contains("switch FAST") && frame.contains("checksum"),
        "{frame}"
    );
    assert!(frame.contains("call counts: not available"), "{frame}");
    let top = evolve(&dir, &["top", pid, "--once", "--json"]).expect_json();
    assert_eq!(top["hello"]["pid"], host.pid());

    // A malformed request on the same socket gets an error reply; the agent goes on.
    let mut raw = UnixStream::connect(&host.socket).unwrap();
    raw.write_all(b"{\"v\":1,\"op\":\n").unwrap();
    let mut line = String::new();
    BufReader::new(&raw).read_line(&mut line).unwrap();
    assert!(line.contains("\"malformed\""), "{line}");
    assert!(evolve(&dir, &["status", pid, "--json"]).ok());

    // Clean exit removes the socket.
    let socket = host.socket.clone();
    assert!(host.quit().success());
    assert!(!socket.exists());
}

#[test]
fn every_command_has_help_and_usage_errors_exit_non_zero() {
    let dir = socket_dir("help");
    for command in [
        "ps",
        "status",
        "functions",
        "build-patch",
        "apply",
        "revert",
        "history",
        "switch",
        "commit",
        "revert-switches",
        "gc",
        "top",
    ] {
        let run = evolve(&dir, &[command, "--help"]);
        assert!(run.ok(), "{command} --help: {}", run.stderr());
        assert!(run.stdout().contains("Usage: evolve"), "{command}");
    }
    assert!(evolve(&dir, &["switch", "1", "set", "--help"]).ok());
    let bad = evolve(&dir, &["apply", "1", "x.so", "--trial", "soon"]);
    assert_eq!(bad.output.status.code(), Some(2));
    assert!(bad.stderr().contains("not a duration"));
    let bad = evolve(&dir, &["status", "not-a-pid"]);
    assert_eq!(bad.output.status.code(), Some(2));
}

#[test]
fn a_process_without_an_agent_is_an_error_with_its_cause() {
    let dir = socket_dir("noagent");
    let me = std::process::id().to_string();
    let run = evolve(&dir, &["status", &me]);
    assert_eq!(run.output.status.code(), Some(1));
    assert!(
        run.stderr().contains("has no evolve agent"),
        "{}",
        run.stderr()
    );
    let run = evolve(&dir, &["status", &me, "--json"]);
    assert_eq!(run.json()["ok"], false);
    let run = evolve(&dir, &["status", "4000000000"]);
    assert!(run.stderr().contains("no process"), "{}", run.stderr());
}

#[test]
fn stale_sockets_of_dead_processes_are_recognised_and_pruned() {
    let fixture = shared();
    let dir = socket_dir("stale");
    let mut host = fixture.start(&dir);
    let socket = host.socket.clone();
    host.child.kill().unwrap();
    host.child.wait().unwrap();
    assert!(socket.exists(), "a killed process leaves its socket");
    let ps = evolve(&dir, &["ps", "--json"]).expect_json();
    assert!(ps["processes"].as_array().unwrap().is_empty(), "{ps}");
    let stale = &ps["unreachable"][0];
    assert_eq!(stale["pid"], host.pid());
    assert_eq!(stale["stale"], true);
    let pruned = evolve(&dir, &["ps", "--prune", "--json"]).expect_json();
    assert_eq!(pruned["unreachable"][0]["removed"], true);
    assert!(!socket.exists());
}

#[test]
fn another_uid_is_refused() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("skipped: switching to another uid needs root");
        return;
    }
    const NOBODY: u32 = 65534;
    let fixture = shared();
    let dir = socket_dir("perm");
    let host = fixture.start(&dir);
    let pid = host.pid().to_string();
    let socket = host.socket.to_str().unwrap().to_string();
    let as_nobody = |c: &mut std::process::Command| {
        c.uid(NOBODY).gid(NOBODY);
    };
    // First line of defence: the directory (0700) and socket (0600) keep others out.
    let run = evolve_with(&dir, &["--socket", &socket, "status", &pid], as_nobody);
    assert!(!run.ok());
    assert!(
        run.stderr().contains("Permission denied"),
        "{}",
        run.stderr()
    );
    // Second: with the file permissions opened (only root can do that here), the agent still
    // refuses the peer by its credentials.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&host.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let run = evolve_with(&dir, &["--socket", &socket, "status", &pid], as_nobody);
    assert!(!run.ok());
    assert!(
        run.stderr().contains("uid 65534 may not control")
            && run.stderr().contains("permission_denied"),
        "{}",
        run.stderr()
    );
    // The owner is still served.
    assert!(evolve(&dir, &["status", &pid, "--json"]).ok());
}
