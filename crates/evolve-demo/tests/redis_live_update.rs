//! The kv server updated live under the real `redis-benchmark` (50 parallel clients): a bug-fix
//! patch applied, a multiverse switch committed and reverted while it runs. Zero failed requests,
//! no dropped connection, keys written before still there, the fix visible after.
//!
//! Needs `redis-benchmark` and `redis-cli` (Debian package `redis-tools`; `.ci/run` installs it).
//! Without them the test says so and passes, except under CI (`CI` set), where it fails.

use evolve_demo::client::{Client, Value};
use evolve_demo::server::Server;
use evolve_demo::workspace::{Flavor, KvWorkspace};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn redis_cli(server: &Server, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &server.addr.port().to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    assert!(output.status.success(), "redis-cli {args:?} failed");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn counter(client: &mut Client, name: &str) -> u64 {
    client.info().unwrap()[name].parse().unwrap()
}

#[test]
fn redis_benchmark_sees_no_failure_across_a_live_update() {
    if !have("redis-benchmark") || !have("redis-cli") {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install redis-tools (redis-benchmark, redis-cli)"
        );
        eprintln!(
            "SKIPPED: redis-benchmark / redis-cli not installed (apt-get install redis-tools)"
        );
        return;
    }
    let workspace = KvWorkspace::prepare("redis-test").unwrap();
    let binary = workspace.build(Flavor::Evolve).unwrap();
    let sockets = workspace.dir.join("sockets");
    let server = Server::start(&binary, Some(&sockets)).unwrap();
    let mut client = Client::connect(server.addr).unwrap();

    // Keys written before the update, by redis-cli and by our client.
    assert_eq!(redis_cli(&server, &["SET", "greeting", "hello"]), "OK");
    assert_eq!(redis_cli(&server, &["SET", "visitor", "alice"]), "OK");
    for i in 0..500 {
        client.command(&format!("SET before:{i} {i}")).unwrap();
    }
    // The bug, as redis-cli sees it (on a scratch key: INCR overwrites it).
    assert_eq!(redis_cli(&server, &["SET", "scratch", "bob"]), "OK");
    assert_eq!(redis_cli(&server, &["INCR", "scratch"]), "1");

    workspace.apply_source_patch("01-incr-type-check").unwrap();
    let fix = workspace.build_patch(server.pid, "incr-fix").unwrap();
    let errors_before = counter(&mut client, "total_error_replies");

    let started = Instant::now();
    let mut benchmark = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &server.addr.port().to_string()])
        .args([
            "-c",
            "50",
            "-n",
            "300000",
            "-r",
            "100000",
            "-t",
            "set,get,incr",
        ])
        .arg("--csv")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redis-benchmark starts");
    // Let all 50 clients connect and run, then change the code under them.
    std::thread::sleep(Duration::from_millis(1500));
    let mut control = server.control().unwrap();
    control.apply(&fix).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let committed = control.set_and_commit("COMMAND_STATS", "false").unwrap();
    assert_eq!(
        committed["changed"].as_array().map(Vec::len),
        Some(1),
        "{committed}"
    );
    std::thread::sleep(Duration::from_millis(500));
    control.revert_switches().unwrap();
    assert!(
        benchmark.try_wait().unwrap().is_none(),
        "redis-benchmark ended before the update was over ({:?}): make it longer",
        started.elapsed()
    );
    let output = benchmark.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "redis-benchmark failed: {stderr}");
    assert!(
        !stdout.contains("Error") && !stderr.contains("Error"),
        "redis-benchmark saw errors: {stdout}{stderr}"
    );
    // One CSV line per test, each with a positive rate.
    for test in ["SET", "GET", "INCR"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("\"{test}\"")))
            .unwrap_or_else(|| panic!("no {test} result in {stdout}"));
        let rps: f64 = line
            .split(',')
            .nth(1)
            .unwrap()
            .trim_matches('"')
            .parse()
            .unwrap();
        assert!(rps > 0.0, "{line}");
    }

    // The server's side: no error replies, no dropped connection, no protocol error.
    assert_eq!(counter(&mut client, "total_error_replies"), errors_before);
    assert_eq!(counter(&mut client, "dropped_connections"), 0);
    assert_eq!(counter(&mut client, "protocol_errors"), 0);
    // The keys written before are there.
    assert_eq!(redis_cli(&server, &["GET", "greeting"]), "hello");
    for i in 0..500 {
        assert_eq!(
            client.command(&format!("GET before:{i}")).unwrap(),
            Value::Bulk(Some(i.to_string().into_bytes()))
        );
    }
    // The new behaviour: INCR on a string is refused and leaves it alone.
    let refused = redis_cli(&server, &["INCR", "visitor"]);
    assert!(refused.contains("not an integer"), "{refused}");
    assert_eq!(redis_cli(&server, &["GET", "visitor"]), "alice");
    let info = redis_cli(&server, &["INFO"]);
    assert!(info.contains("kv_version:1.0.1"), "{info}");

    // Reverting the patch brings 1.0.0's behaviour back.
    control.revert(None).unwrap();
    assert_eq!(redis_cli(&server, &["INCR", "visitor"]), "1");
}
