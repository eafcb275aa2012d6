//! The `evolve` CLI against running example processes: every command, `--json` parsed, a patch
//! built, applied and reverted, switches set and committed, probes added, read and removed, the
//! journal, refusals.

mod common;

use common::{evolve, evolve_with, fixture, shared, socket_dir, Host, Run};
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
    assert_eq!(status["reclamation"]["available"], true);
    assert_eq!(
        names(&status["switches"]),
        ["FAST", "LEVEL"].map(String::from).to_vec()
    );
    let human = evolve(&dir, &["status", pid]);
    assert!(
        human.ok() && human.stdout().contains("reclamation: pending []"),
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

    // build-patch against the running process; the shared target directory is held until the
    // dry run below has read what cargo built.
    let claim = fixture.claim_target();
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

    // build-patch --dry-run: the same edit compared function by function (format 2), the
    // configuration discovered, nothing written.
    let dry = evolve_with(
        &dir,
        &[
            "build-patch",
            "--manifest-path",
            fixture.dir.join("Cargo.toml").to_str().unwrap(),
            "--pid",
            pid,
            "--output",
            fixture.dir.join("dry.o").to_str().unwrap(),
            "--dry-run",
            "--json",
        ],
        |c| {
            c.env("CARGO_TARGET_DIR", &fixture.target);
        },
    )
    .expect_json();
    assert_eq!(dry["dry_run"], true, "{dry}");
    assert!(dry["output"].is_null(), "{dry}");
    assert!(!fixture.dir.join("dry.o").exists());
    let carried = dry["carried"].as_array().unwrap();
    assert_eq!(carried.len(), 1, "{dry}");
    assert!(
        carried[0]["name"].as_str().unwrap().contains("price"),
        "{dry}"
    );
    assert_eq!(carried[0]["reason"], "changed", "{dry}");
    assert_eq!(dry["configuration"]["bin"], "ctlhost", "{dry}");
    drop(claim);

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

    // gc: reclamation runs (the reverted first patch is a candidate; a conservative scan may
    // keep it a while), and reports what it did.
    let gc = evolve(&dir, &["gc", pid, "--json"]).expect_json();
    assert!(gc["resident"].as_u64().is_some(), "{gc}");
    let done = gc["unloaded"].as_array().unwrap().len() + gc["kept"].as_array().unwrap().len();
    assert_eq!(done, 1, "one candidate, unloaded or kept: {gc}");
    // Without --json, gc speaks to people (it printed its JSON reply).
    let human = evolve(&dir, &["gc", pid]);
    assert!(human.ok(), "{}", human.stderr());
    assert!(
        human.stdout().starts_with("unloaded: ")
            && serde_json::from_str::<Value>(&human.stdout()).is_err(),
        "{}",
        human.stdout()
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
            ("gc", "ok"),
            ("gc", "ok"),
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
    // Output into a pipe whose reader is gone (`evolve history PID | head -0`): the command ends
    // quietly with success, as `cat` does (it panicked on the closed pipe).
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let closed = evolve_with(&dir, &["history", pid], |command| {
        command.stdout(writer);
    });
    assert!(
        closed.ok() && !closed.stderr().contains("panicked"),
        "{:?}: {}",
        closed.output.status,
        closed.stderr()
    );

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
        "probe",
    ] {
        let run = evolve(&dir, &[command, "--help"]);
        assert!(run.ok(), "{command} --help: {}", run.stderr());
        assert!(run.stdout().contains("Usage: evolve"), "{command}");
    }
    assert!(evolve(&dir, &["switch", "1", "set", "--help"]).ok());
    for action in ["add", "list", "rm", "read"] {
        let run = evolve(&dir, &["probe", "1", action, "--help"]);
        assert!(run.ok(), "probe {action} --help: {}", run.stderr());
        assert!(run.stdout().contains("--json"), "probe {action}");
    }
    let add = evolve(&dir, &["probe", "1", "add", "--help"]).stdout();
    for flag in [
        "--count",
        "--latency",
        "--hist <ARG>",
        "--when <EXPR>",
        "--coverage",
    ] {
        assert!(add.contains(flag), "{flag}: {add}");
    }
    assert!(add.contains("argN OP VALUE"), "{add}");
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
fn applying_a_fifo_fails_at_once_naming_it_instead_of_timing_out() {
    let fixture = shared();
    let dir = socket_dir("fifo");
    let host = fixture.start(&dir);
    let fifo = dir.join("patch.so");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        0,
    )
    .unwrap();
    // Before: the agent blocked reading the FIFO and the CLI gave up after its timeout with
    // "Resource temporarily unavailable".
    let run = evolve(
        &dir,
        &["apply", &host.pid().to_string(), fifo.to_str().unwrap()],
    );
    assert_eq!(run.output.status.code(), Some(1));
    assert!(
        run.stderr().contains("it is a FIFO, not a regular file"),
        "{}",
        run.stderr()
    );
    assert!(!run.stderr().contains("temporarily unavailable"));
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

/// Reads every probe (`probe read --json`) until `done` holds for the reading of `id`, or 20 s.
fn read_until(dir: &std::path::Path, pid: &str, id: u64, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let read = evolve(dir, &["probe", pid, "read", &id.to_string(), "--json"]).expect_json();
        let reading = read["readings"][0].clone();
        assert_eq!(reading["id"], id, "{read}");
        if done(&reading) {
            return reading;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "probe {id} never got there: {reading}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Adds one probe with `evolve probe PID add PATTERN FLAGS --json`; returns its entry.
fn add_probe(dir: &std::path::Path, pid: &str, pattern: &str, flags: &[&str]) -> Value {
    let mut args = vec!["probe", pid, "add", pattern];
    args.extend_from_slice(flags);
    args.push("--json");
    let added = evolve(dir, &args).expect_json();
    let probes = added["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 1, "{added}");
    assert_eq!(probes[0]["pattern"], pattern);
    assert_eq!(probes[0]["attached"], true);
    probes[0].clone()
}

fn fails_with(run: &Run, code: i32, needles: &[&str]) {
    assert_eq!(
        run.output.status.code(),
        Some(code),
        "stdout {} stderr {}",
        run.stdout(),
        run.stderr()
    );
    for n in needles {
        assert!(run.stderr().contains(n), "{n:?} not in {}", run.stderr());
    }
}

#[test]
fn probes_from_the_command_line_against_a_running_process() {
    let fixture = shared();
    let dir = socket_dir("probes");
    let mut host: Host = fixture.start(&dir);
    let pid = host.pid().to_string();
    let pid = pid.as_str();
    let list = |dir: &std::path::Path| evolve(dir, &["probe", pid, "list", "--json"]).expect_json();
    assert_eq!(list(&dir)["probes"], serde_json::json!([]));

    // One probe of each kind on `tally` (the worker calls it with 700), coverage on `rare`.
    let count = add_probe(&dir, pid, "ctlhost::tally", &["--count"]);
    assert_eq!(count["function"], "ctlhost::tally");
    assert_eq!(count["kind"], "count");
    let latency = add_probe(&dir, pid, "ctlhost::tally", &["--latency"]);
    let hist = add_probe(&dir, pid, "ctlhost::tally", &["--hist", "arg0"]);
    assert_eq!(hist["kind"], "hist arg0");
    let equal = add_probe(&dir, pid, "ctlhost::tally", &["--when", "arg0 == 700"]);
    assert_eq!(equal["kind"], "when arg0 == 700");
    let above = add_probe(&dir, pid, "ctlhost::tally", &["--when", "arg0>=701"]);
    assert_eq!(above["kind"], "when arg0 >= 701");
    let coverage = add_probe(&dir, pid, "ctlhost::rare", &["--coverage"]);
    let id = |p: &Value| p["id"].as_u64().unwrap();
    let listed = list(&dir);
    let ids: Vec<u64> = listed["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        [&count, &latency, &hist, &equal, &above, &coverage].map(id),
        "{listed}"
    );
    let human = evolve(&dir, &["probe", pid, "list"]);
    assert!(
        human.ok()
            && human.stdout().contains("when arg0 == 700")
            && human.stdout().contains("ctlhost::rare"),
        "{}",
        human.stdout()
    );

    // Counts increase.
    let first = read_until(&dir, pid, id(&count), |r| {
        r["calls"].as_u64().unwrap() >= 20
    });
    let first_calls = first["calls"].as_u64().unwrap();
    let later = read_until(&dir, pid, id(&count), |r| {
        r["calls"].as_u64().unwrap() > first_calls
    });
    assert!(later["calls"].as_u64().unwrap() > first_calls);

    // Latency: timed calls with a positive mean, ordered percentiles.
    let l = read_until(&dir, pid, id(&latency), |r| {
        r["latency"]["count"].as_u64().unwrap() >= 20
    });
    let l = &l["latency"];
    let (mean, p50, p99, max) = (
        l["mean_ns"].as_f64().unwrap(),
        l["p50_ns"].as_f64().unwrap(),
        l["p99_ns"].as_f64().unwrap(),
        l["max_ns"].as_f64().unwrap(),
    );
    assert!(mean > 0.0 && p50 > 0.0, "{l}");
    assert!(p50 <= p99 && p99 <= max && mean <= max, "{l}");

    // The histogram holds exactly the argument passed: one bucket, containing 700.
    let h = read_until(&dir, pid, id(&hist), |r| r["calls"].as_u64().unwrap() >= 10);
    let buckets = h["histogram"].as_array().unwrap();
    assert_eq!(buckets.len(), 1, "{h}");
    let (low, n) = (
        buckets[0][0].as_u64().unwrap(),
        buckets[0][1].as_u64().unwrap(),
    );
    assert!(
        low <= 700 && 700 < low * 2,
        "bucket [{low}, {}) holds 700: {h}",
        low * 2
    );
    assert!(n >= 10 && n <= h["calls"].as_u64().unwrap(), "{h}");

    // Predicates: `== 700` holds for every call (the first backtraces kept), `>= 701` for none.
    let eq = read_until(&dir, pid, id(&equal), |r| r["hits"].as_u64().unwrap() >= 5);
    assert!(
        eq["hits"].as_u64().unwrap() <= eq["calls"].as_u64().unwrap(),
        "{eq}"
    );
    assert!(!eq["backtraces"][0].as_str().unwrap().is_empty(), "{eq}");
    let ab = read_until(&dir, pid, id(&above), |r| r["calls"].as_u64().unwrap() >= 5);
    assert_eq!(ab["hits"], 0, "{ab}");

    // Coverage: not hit until the host runs `rare`; then hit, and the probe detaches itself.
    let c = read_until(&dir, pid, id(&coverage), |_| true);
    assert_eq!(
        (c["covered"].clone(), c["calls"].clone()),
        (false.into(), 0.into()),
        "{c}"
    );
    assert!(host.rare()["rare"].as_u64().is_some());
    let c = read_until(&dir, pid, id(&coverage), |r| r["attached"] == false);
    assert_eq!(c["covered"], true, "{c}");
    assert_eq!(c["calls"], 1, "{c}");

    // Human output: what each kind recorded.
    let read = evolve(&dir, &["probe", pid, "read"]);
    assert!(read.ok(), "{}", read.stderr());
    let text = read.stdout();
    for needle in [
        "ctlhost::tally",
        "calls",
        "latency   mean",
        "p50",
        "p99",
        "[512, 1024)",
        "arg0 values:",
        "hits      0 of",
        "where arg0 >= 701",
        "first backtrace",
        "covered   yes",
    ] {
        assert!(text.contains(needle), "{needle:?} in\n{text}");
    }
    // Latency figures carry their unit.
    assert!(text.contains(" ns") || text.contains(" µs"), "{text}");

    // top shows the probes next to the functions, in a frame and as JSON.
    let top = evolve(&dir, &["top", pid, "--once"]);
    assert!(top.ok(), "{}", top.stderr());
    let frame = top.stdout();
    for needle in [
        "HOT FUNCTION",
        "PROBED FUNCTION",
        "CALLS/S",
        "ctlhost::tally",
        "hist arg0",
        "when arg0 == 700",
        "mostly [512, 1024)",
        "ctlhost::rare",
        "hit (detached)",
    ] {
        assert!(frame.contains(needle), "{needle:?} in\n{frame}");
    }
    let top = evolve(&dir, &["top", pid, "--once", "--json"]).expect_json();
    assert_eq!(top["hello"]["pid"], host.pid());
    assert_eq!(
        top["probes"]["readings"].as_array().unwrap().len(),
        6,
        "{top}"
    );
    let counted = top["functions"]["call_counts"].as_array().unwrap();
    assert!(
        counted
            .iter()
            .any(|c| c[0] == "ctlhost::tally" && c[1].as_u64().unwrap() > 0),
        "{top}"
    );

    // Refusals: exit 1 with the cause, or 2 for a usage error.
    fails_with(
        &evolve(&dir, &["probe", pid, "add", "nosuch::function", "--count"]),
        1,
        &["no function matches", "nosuch::function"],
    );
    fails_with(
        &evolve(&dir, &["probe", pid, "add", "ctlhost::tiny", "--latency"]),
        1,
        &["cannot probe `ctlhost::tiny`"],
    );
    let json_error = evolve(
        &dir,
        &["probe", pid, "add", "nosuch::function", "--count", "--json"],
    );
    assert_eq!(json_error.json()["ok"], false);
    for bad in [
        "arg0 = 1",
        "arg6 == 1",
        "x > 1",
        "arg0 == banana",
        "arg1 >= 0",
        "arg0 < -3",
    ] {
        fails_with(
            &evolve(
                &dir,
                &["probe", pid, "add", "ctlhost::tally", "--when", bad],
            ),
            2,
            &["bad expression", "argN OP VALUE"],
        );
    }
    fails_with(
        &evolve(
            &dir,
            &["probe", pid, "add", "ctlhost::tally", "--hist", "9"],
        ),
        2,
        &["0-5"],
    );
    fails_with(
        &evolve(&dir, &["probe", pid, "add", "ctlhost::tally"]),
        2,
        &["--count"],
    );
    fails_with(
        &evolve(
            &dir,
            &[
                "probe",
                pid,
                "add",
                "ctlhost::tally",
                "--count",
                "--latency",
            ],
        ),
        2,
        &["cannot be used with"],
    );
    fails_with(&evolve(&dir, &["probe", pid, "rm"]), 2, &[]);
    fails_with(
        &evolve(&dir, &["probe", pid, "rm", "99999"]),
        1,
        &["no probe has id 99999"],
    );
    fails_with(
        &evolve(&dir, &["probe", pid, "rm", "nosuch::*"]),
        1,
        &["no probe matches `nosuch::*`"],
    );
    fails_with(
        &evolve(&dir, &["probe", pid, "read", "99999"]),
        1,
        &["no probe has id 99999"],
    );
    assert_eq!(
        list(&dir)["probes"].as_array().unwrap().len(),
        6,
        "refusals change nothing"
    );

    // rm by id, by pattern, all: the list empties.
    let removed = evolve(
        &dir,
        &["probe", pid, "rm", &id(&count).to_string(), "--json"],
    )
    .expect_json();
    assert_eq!(removed["probes"][0]["id"], id(&count));
    let human = evolve(&dir, &["probe", pid, "rm", "*::tally"]);
    assert!(human.ok(), "{}", human.stderr());
    assert_eq!(
        human.stdout().matches("removed probe").count(),
        4,
        "{}",
        human.stdout()
    );
    let left = list(&dir);
    assert_eq!(left["probes"][0]["id"], id(&coverage), "{left}");
    assert_eq!(left["probes"][0]["attached"], false, "{left}");
    let all = evolve(&dir, &["probe", pid, "rm", "--all", "--json"]).expect_json();
    assert_eq!(all["probes"].as_array().unwrap().len(), 1, "{all}");
    assert_eq!(list(&dir)["probes"], serde_json::json!([]));
    let none = evolve(&dir, &["probe", pid, "read"]);
    assert!(
        none.ok() && none.stdout().contains("no probes"),
        "{}",
        none.stdout()
    );

    // The function runs unprobed, and takes a probe again.
    assert_eq!(host.probe()["price"], 30);
    let again = add_probe(&dir, pid, "ctlhost::tally", &["--count"]);
    read_until(&dir, pid, id(&again), |r| r["calls"].as_u64().unwrap() > 0);
    evolve(&dir, &["probe", pid, "rm", "--all", "--json"]).expect_json();

    // The journal has every add and rm, refusals included, with who and when.
    let history = evolve(&dir, &["history", pid, "--json"]).expect_json();
    let entries = history["entries"].as_array().unwrap();
    let ops: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e["op"].as_str().unwrap(), e["outcome"].as_str().unwrap()))
        .collect();
    let ok_add = ("probe_add", "ok");
    let failed_add = ("probe_add", "failed");
    let (ok_rm, failed_rm) = (("probe_rm", "ok"), ("probe_rm", "failed"));
    assert_eq!(
        ops,
        [
            ok_add, ok_add, ok_add, ok_add, ok_add, ok_add, failed_add, failed_add, failed_add,
            failed_rm, failed_rm, ok_rm, ok_rm, ok_rm, ok_add, ok_rm,
        ],
        "{history}"
    );
    let me = rustix::process::geteuid().as_raw();
    assert!(entries
        .iter()
        .all(|e| e["uid"] == me && e["at_ms"].as_u64().unwrap() > 0));
    assert!(entries[0]["target"]
        .as_str()
        .unwrap()
        .contains("ctlhost::tally"));
    assert!(entries[6]["detail"]
        .as_str()
        .unwrap()
        .contains("no function matches"));
    assert!(host.quit().success());
}
