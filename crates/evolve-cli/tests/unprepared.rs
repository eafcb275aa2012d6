//! The `evolve` CLI end to end on a program with no Evolve build step (the plain fixture of
//! evolve-hot: plain `cargo build --release`, no mark; it starts the agent in `main`), while its
//! `EVOLVE_STRESS_THREADS` threads call every function and check every result: `build-patch`
//! against its PID, `apply`, `functions 'glob'` with versions, `status` and the journal,
//! `revert`, and refusals that name their cause and change nothing.

mod common;

#[allow(dead_code)]
#[path = "../../evolve-hot/tests/common/plain.rs"]
mod plain;

use common::{evolve, evolve_with, socket_dir, Run};
use plain::{PlainFixture, PlainHost};
use serde_json::Value;
use std::path::{Path, PathBuf};

const LIB: &str = "plainlib/src/lib.rs";

/// The fixture copies share one target directory (its `release/plainhost` is the binary a
/// host starts from, and patch builds rebuild it): one test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// `evolve build-patch --format 2` against the running host, written to `<fixture>/<name>.o`.
fn build_patch(fixture: &PlainFixture, sockets: &Path, host: &PlainHost, name: &str) -> Run {
    let output = fixture.workspace.dir.join(format!("{name}.o"));
    evolve_with(
        sockets,
        &[
            "build-patch",
            "--format",
            "2",
            "--manifest-path",
            fixture.workspace.dir.join("Cargo.toml").to_str().unwrap(),
            "--pid",
            &host.pid().to_string(),
            "--output",
            output.to_str().unwrap(),
            "--json",
        ],
        |c| {
            c.env("CARGO_TARGET_DIR", &fixture.workspace.target);
        },
    )
}

fn built(run: &Run) -> PathBuf {
    let report = run.expect_json();
    PathBuf::from(report["output"].as_str().unwrap())
}

/// `evolve functions PID GLOB --json`: (name, versions) of every matching symbol.
fn symbols(sockets: &Path, pid: &str, glob: &str) -> Vec<(String, Vec<String>)> {
    let listing = evolve(sockets, &["functions", pid, glob, "--json"]).expect_json();
    plain::names_and_versions(&listing["symbols"])
}

fn versions_of(listing: &[(String, Vec<String>)], name: &str) -> Vec<String> {
    listing
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} listed: {listing:?}"))
        .1
        .clone()
}

/// The journal's (op, outcome) pairs.
fn journal(sockets: &Path, pid: &str) -> Vec<(String, String)> {
    let history = evolve(sockets, &["history", pid, "--json"]).expect_json();
    history["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["op"].as_str().unwrap_or_default().to_string(),
                e["outcome"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn an_unprepared_program_is_patched_listed_and_reverted_through_the_cli() {
    let _serial = serial();
    let fixture = PlainFixture::new("cli-plain");
    let sockets = socket_dir("unprepared");
    let mut host = fixture.start_with(&["--agent"], &[("EVOLVE_SOCKET_DIR", &sockets)]);
    let pid = host.pid().to_string();
    let pid = pid.as_str();

    // Any function of the executable is listed, not only hot ones: all at the program's code.
    let listing = symbols(&sockets, pid, "plainlib::*");
    for f in [
        "plainlib::free",
        "plainlib::other",
        "plainlib::with_closure",
    ] {
        assert_eq!(versions_of(&listing, f), ["program"], "{listing:?}");
    }

    fixture.edit(LIB, &[("1 // free v1", "2 // free v2")]);
    let a = built(&build_patch(&fixture, &sockets, &host, "a"));
    let applied = evolve(&sockets, &["apply", pid, a.to_str().unwrap(), "--json"]).expect_json();
    // (Generic std instances may be carried too: see the evolve-hot test of the same fixture.)
    let updated = applied["updated"].to_string();
    assert!(
        updated.contains("\"plainlib::free\"") && !updated.contains("plainlib::other"),
        "{applied}"
    );
    host.epoch();
    host.assert_versions(|t| if t == "free" { 2 } else { 1 });
    let listing = symbols(&sockets, pid, "plainlib::*");
    assert_eq!(versions_of(&listing, "plainlib::free"), ["program", "a"]);
    assert_eq!(versions_of(&listing, "plainlib::other"), ["program"]);
    let human = evolve(&sockets, &["functions", pid, "plainlib::free"]).stdout();
    assert!(human.contains("versions: program → a"), "{human}");

    // A second patch on top of the first (the CLI asks the agent which patches are applied).
    fixture.edit(
        LIB,
        &[
            ("2 // free v2", "3 // free v3"),
            ("1 // other v1", "3 // other v3"),
        ],
    );
    let b = built(&build_patch(&fixture, &sockets, &host, "b"));
    evolve(&sockets, &["apply", pid, b.to_str().unwrap(), "--json"]).expect_json();
    host.epoch();
    host.assert_versions(|t| match t {
        "free" | "other" => 3,
        _ => 1,
    });
    let status = evolve(&sockets, &["status", pid, "--json"]).expect_json();
    let patches: Vec<&str> = status["patches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(patches, ["a", "b"], "{status}");
    let listing = symbols(&sockets, pid, "plainlib::*");
    assert_eq!(
        versions_of(&listing, "plainlib::free"),
        ["program", "a", "b"]
    );
    assert_eq!(versions_of(&listing, "plainlib::other"), ["program", "b"]);

    // Revert the last (b): a's free runs again, other is the program's.
    let reverted = evolve(&sockets, &["revert", pid, "--json"]).expect_json();
    assert!(
        reverted.to_string().contains("plainlib::free"),
        "{reverted}"
    );
    host.epoch();
    host.assert_versions(|t| if t == "free" { 2 } else { 1 });

    // b expects a's free; it was built against a, which still runs, so it is not stale yet.
    // Revert a: the program's free runs; b's expectation no longer holds.
    evolve(&sockets, &["revert", pid, "a", "--json"]).expect_json();
    host.epoch();
    host.assert_versions(|_| 1);
    let before = symbols(&sockets, pid, "plainlib::*");
    let journal_before = journal(&sockets, pid);
    let refused = evolve(&sockets, &["apply", pid, b.to_str().unwrap()]);
    assert!(!refused.ok(), "{}", refused.stdout());
    let message = refused.stderr();
    assert!(
        message.contains("plainlib::free")
            && message.contains("patch a")
            && message.contains("version program runs"),
        "{message}"
    );
    host.epoch();
    host.assert_versions(|_| 1);
    assert_eq!(
        symbols(&sockets, pid, "plainlib::*"),
        before,
        "refusal changed nothing"
    );
    let journal_after = journal(&sockets, pid);
    assert_eq!(journal_after.len(), journal_before.len() + 1);
    assert_eq!(journal_after.last().unwrap().0, "apply");
    assert_ne!(journal_after.last().unwrap().1, "ok", "{journal_after:?}");

    // The journal shows every operation, in order.
    let ops: Vec<&str> = journal_after.iter().map(|(op, _)| op.as_str()).collect();
    assert_eq!(
        ops,
        ["apply", "apply", "revert", "revert", "apply"],
        "{journal_after:?}"
    );
    let human = evolve(&sockets, &["history", pid]).stdout();
    assert!(
        human.contains("apply") && human.contains("revert"),
        "{human}"
    );
    drop(host);
}

/// A patch built against another build of the program (another build id) is refused by the
/// CLI, naming the cause, and nothing changes.
#[test]
fn a_patch_of_another_build_is_refused_through_the_cli_and_nothing_changes() {
    let _serial = serial();
    let fixture = PlainFixture::new("cli-plain-other");
    let sockets = socket_dir("unprepared-other");
    let mut host = fixture.start_with(&["--agent"], &[("EVOLVE_SOCKET_DIR", &sockets)]);
    let pid = host.pid().to_string();
    let pid = pid.as_str();
    // Another build: the binary crate changed and was rebuilt; the patch is made against it.
    fixture.edit(
        "plainhost/src/main.rs",
        &[("1 // local v1", "2 // local v2")],
    );
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--release", "-q", "--manifest-path"])
        .arg(fixture.workspace.dir.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &fixture.workspace.target)
        .status()
        .unwrap();
    assert!(status.success());
    let other_base = fixture.workspace.target.join("release/plainhost");
    fixture.edit(LIB, &[("1 // free v1", "2 // free v2")]);
    let output = fixture.workspace.dir.join("other.o");
    let run = evolve_with(
        &sockets,
        &[
            "build-patch",
            "--format",
            "2",
            "--manifest-path",
            fixture.workspace.dir.join("Cargo.toml").to_str().unwrap(),
            "--base",
            other_base.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--json",
        ],
        |c| {
            c.env("CARGO_TARGET_DIR", &fixture.workspace.target);
        },
    );
    let patch = built(&run);
    let before = symbols(&sockets, pid, "plainlib::*");
    let refused = evolve(&sockets, &["apply", pid, patch.to_str().unwrap()]);
    assert!(!refused.ok());
    assert!(
        refused.stderr().contains("build id") || refused.stderr().contains("build-id"),
        "{}",
        refused.stderr()
    );
    host.epoch();
    host.assert_versions(|_| 1);
    assert_eq!(symbols(&sockets, pid, "plainlib::*"), before);
    let status = evolve(&sockets, &["status", pid, "--json"]).expect_json();
    assert_eq!(status["patches"], Value::Array(Vec::new()), "{status}");
}

/// `n` requests to the host's Tokio service: (versions seen, panics); no wrong result.
fn serve(host: &mut PlainHost, n: u64) -> ([u64; 4], u64) {
    let answer = host.send(&format!("serve {n}"));
    assert_eq!(answer["errors"], 0, "{answer}");
    let versions = answer["versions"].as_array().unwrap();
    let mut seen = [0u64; 4];
    for (slot, v) in seen.iter_mut().zip(versions) {
        *slot = v.as_u64().unwrap();
    }
    (seen, answer["panics"].as_u64().unwrap())
}

/// Defect of issue 11 item 7: `--trial` did not revert when the patched code panicked on a
/// Tokio worker (the runtime catches the panic). The trial's panic hook sees the panic before
/// anyone catches it, by the panicking frames' addresses in the patch's code.
#[test]
fn trial_reverts_a_patch_whose_handler_panics_on_a_tokio_worker() {
    let _serial = serial();
    let fixture = PlainFixture::new("cli-plain-trial");
    let sockets = socket_dir("unprepared-trial");
    let mut host = fixture.start_with(&["--agent"], &[("EVOLVE_SOCKET_DIR", &sockets)]);
    let pid = host.pid().to_string();
    let pid = pid.as_str();
    assert_eq!(serve(&mut host, 64), ([64, 0, 0, 0], 0));

    // Version 2 fails every request.
    fixture.edit(LIB, &[("assert!(x != u64::MAX", "assert!(x == u64::MAX")]);
    let patch = built(&build_patch(&fixture, &sockets, &host, "panics"));
    let applied = evolve(
        &sockets,
        &[
            "apply",
            pid,
            patch.to_str().unwrap(),
            "--trial",
            "10m",
            "--json",
        ],
    )
    .expect_json();
    assert!(
        applied["updated"].to_string().contains("plainlib::handle"),
        "{applied}"
    );
    // The first requests reach the new handler and panic on a worker; the runtime catches it.
    let (_, panics) = serve(&mut host, 64);
    assert!(panics > 0, "the patched handler ran and panicked");
    // The trial reverts the patch (on the panicking thread, or right after on another).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let status = evolve(&sockets, &["status", pid, "--json"]).expect_json();
        if status["patches"][0]["reverted_at"].is_u64() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the trial did not revert the patch: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The service goes on serving, on the program's version.
    assert_eq!(serve(&mut host, 256), ([256, 0, 0, 0], 0));
    let listing = symbols(&sockets, pid, "plainlib::handle");
    assert_eq!(versions_of(&listing, "plainlib::handle"), ["program"]);
    host.epoch();
    host.assert_versions(|_| 1);
}
