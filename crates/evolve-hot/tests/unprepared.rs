//! Format-2 patches of unprepared functions applied to a live process built with plain
//! `cargo build --release` (no `#[evolve::hot]`, no build script), while
//! `EVOLVE_STRESS_THREADS` threads call every function and check every result: a trait-impl
//! method through `dyn Trait` and through a generic, a closure, a generic instance, a function
//! of the binary crate, a function inlined into its callers; stacks reverted from the middle;
//! refusals that name their cause and change nothing.

mod common;

use common::plain::{PlainFixture, PlainHost};

/// Patch builds share the fixtures' target directory: one test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const LIB: &str = "plainlib/src/lib.rs";
const MAIN: &str = "plainhost/src/main.rs";

/// The names a listing shows, and the versions of each.
fn replaced(host: &mut PlainHost) -> Vec<(String, Vec<String>)> {
    let listing = host.send("functions");
    common::plain::names_and_versions(&listing)
}

#[test]
fn every_kind_of_function_is_patched_live_and_reverted_exactly() {
    let _serial = serial();
    let fixture = PlainFixture::new("plain-kinds");
    let mut host = fixture.start();
    host.assert_versions(|_| 1);
    let code_before: Vec<_> = ["free", "local"]
        .iter()
        .map(|f| host.send(&format!("code {f}"))["bytes"].clone())
        .collect();

    fixture.edit(
        LIB,
        &[
            ("1 // free v1", "2 // free v2"),
            ("1 // area v1", "2 // area v2"),
            ("1 // twice v1", "2 // twice v2"),
            ("<< 4 | 1, x) // closure v1", "<< 4 | 2, x) // closure v2"),
            ("1 // scale v1", "2 // scale v2"),
        ],
    );
    fixture.edit(MAIN, &[("1 // local v1", "2 // local v2")]);
    let report = fixture.build(&host, "kinds", &[]).unwrap();
    let reasons: Vec<(String, String)> = report
        .carried
        .iter()
        .map(|c| (c.name.clone(), c.reason.clone()))
        .collect();
    for inliner in ["plainlib::scaled", "plainlib::scaled_xor"] {
        assert!(
            reasons
                .iter()
                .any(|(n, r)| n == inliner && r.contains("plainlib::scale")),
            "{inliner} inlines scale and is carried: {reasons:?}"
        );
    }
    let patch = report.output.unwrap();

    let applied = host.apply(&patch);
    let updated: Vec<&str> = applied["updated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for f in ["plainlib::free", "plainhost::local", "plainlib::scaled"] {
        assert!(updated.contains(&f), "{f} in {updated:?}");
    }
    host.assert_versions(|t| if t == "other" { 1 } else { 2 });
    let listing = replaced(&mut host);
    assert!(
        listing
            .iter()
            .any(|(n, v)| n == "plainlib::free" && v == &["program", "kinds"]),
        "{listing:?}"
    );

    let reverted = host.send("revert");
    assert_eq!(reverted["ok"], true, "{reverted}");
    host.assert_versions(|_| 1);
    let code_after: Vec<_> = ["free", "local"]
        .iter()
        .map(|f| host.send(&format!("code {f}"))["bytes"].clone())
        .collect();
    assert_eq!(
        code_before, code_after,
        "revert writes the original bytes back"
    );

    // Applied again after the revert: the same file, a second time.
    host.apply(&patch);
    host.assert_versions(|t| if t == "other" { 1 } else { 2 });
    assert_eq!(host.send("revert")["ok"], true);
    host.assert_versions(|_| 1);
    // Nothing runs in the reverted patches any more: reclamation unloads them.
    // With the `stacks` policy (no thread runs in them, no patch site branches into them):
    // the `scan` policy also finds stale copies of patch addresses that the engine's live-write
    // path leaves in its trap slots and freed page lists (see docs/hot-update.md).
    let gc = host.send("gc stacks");
    assert_eq!(gc["resident"], 0, "{gc}");
    host.assert_versions(|_| 1);
}

#[test]
fn a_patch_in_the_middle_of_a_stack_is_reverted_and_stale_patches_are_refused() {
    let _serial = serial();
    let fixture = PlainFixture::new("plain-stack");
    let mut host = fixture.start();
    fixture.edit(
        LIB,
        &[
            ("1 // free v1", "2 // free v2"),
            ("1 // other v1", "2 // other v2"),
        ],
    );
    let a = fixture.build(&host, "a", &[]).unwrap().output.unwrap();
    fixture.edit(LIB, &[("2 // other v2", "3 // other v3")]);
    let b = fixture.build(&host, "b", &[&a]).unwrap().output.unwrap();
    fixture.edit(LIB, &[("2 // free v2", "3 // free v3")]);
    // Built on top of a and b: it expects a's version of `free`.
    let c = fixture
        .build(&host, "c", &[&a, &b])
        .unwrap()
        .output
        .unwrap();

    host.apply(&a);
    host.assert_versions(|t| if t == "free" || t == "other" { 2 } else { 1 });
    host.apply(&b);
    host.assert_versions(|t| match t {
        "free" => 2,
        "other" => 3,
        _ => 1,
    });

    // a, in the middle: free goes back to the program's, other stays on b's.
    let reverted = host.send("revert a");
    assert_eq!(reverted["ok"], true, "{reverted}");
    let changed = reverted["changed"].to_string();
    assert!(
        changed.contains("\"plainlib::free\"") && !changed.contains("plainlib::other"),
        "{reverted}"
    );
    host.assert_versions(|t| if t == "other" { 3 } else { 1 });
    let listing = replaced(&mut host);
    assert!(
        listing
            .iter()
            .any(|(n, v)| n == "plainlib::other" && v == &["program", "b"]),
        "{listing:?}"
    );

    // c was built against a's `free`, which no longer runs: refused, naming both versions.
    let refused = host.send(&format!("apply {}", c.display()));
    let message = refused["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("plainlib::free")
            && message.contains("patch a")
            && message.contains("version program runs"),
        "{refused}"
    );
    host.assert_versions(|t| if t == "other" { 3 } else { 1 });
    assert_eq!(replaced(&mut host), listing, "the refusal changed nothing");

    // b: other goes back to the program's (a's version is gone).
    assert_eq!(host.send("revert b")["ok"], true);
    host.assert_versions(|_| 1);
}

#[test]
fn a_function_whose_entry_is_a_loop_target_is_refused_by_name_and_nothing_changes() {
    let _serial = serial();
    let fixture = PlainFixture::new("plain-loop");
    let mut host = fixture.start();
    assert_eq!(host.send("loop 3")["result"], 41);
    fixture.edit(
        LIB,
        &[("[rsi + 1]\", // loop v1", "[rsi + 2]\", // loop v2")],
    );
    let report = fixture.build(&host, "loop", &[]).unwrap();
    assert!(
        report
            .carried
            .iter()
            .any(|c| c.name == "plainlib_loop_entry"),
        "{:?}",
        report.carried
    );
    let refused = host.send(&format!("apply {}", report.output.unwrap().display()));
    let message = refused["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("plainlib_loop_entry") && message.contains("branch"),
        "{refused}"
    );
    assert_eq!(host.send("loop 3")["result"], 41);
    assert!(replaced(&mut host).is_empty());
    let history = host.send("history");
    assert_eq!(
        history,
        serde_json::json!([]),
        "a refused patch is not recorded"
    );
    host.assert_versions(|_| 1);
}

/// The calls of `target` since the last change, by version (1..=4).
fn many_versions(host: &mut PlainHost, target: &str) -> [u64; 4] {
    let stats = host.send("stats");
    assert_eq!(stats["errors"], 0, "wrong results: {stats}");
    let mut out = [0u64; 4];
    // No call counted yet in this epoch: no entry (the caller waits for calls).
    let counted = stats["versions"][target]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for (slot, v) in out.iter_mut().zip(&counted) {
        *slot = v.as_u64().unwrap();
    }
    out
}

/// Waits until `target` was called at least 20 times since the last change; asserts every one
/// of those calls returned `version`.
fn assert_many(host: &mut PlainHost, version: usize) {
    for target in ["many", "many_direct"] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let counts = loop {
            let counts = many_versions(host, target);
            if counts.iter().sum::<u64>() >= 20 {
                break counts;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{target}: too few calls"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        for (i, n) in counts.iter().enumerate() {
            if i + 1 != version {
                assert_eq!(
                    *n,
                    0,
                    "{target}: version {} after the change: {counts:?}",
                    i + 1
                );
            }
        }
    }
}

/// `EVOLVE_STRESS_THREADS` threads call 100 patched functions (through a table and through
/// direct calls) while `EVOLVE_STRESS_PATCHES` (default 1 000) patches replacing all 100 are
/// applied and reverted, alternating between two builds; every result is checked: zero wrong.
#[test]
fn a_thousand_patches_of_a_hundred_functions_are_applied_and_reverted_under_calls() {
    let _serial = serial();
    let fixture = PlainFixture::new("plain-stress");
    let mut host = fixture.start();
    fixture.edit(LIB, &[("1; // many v1", "2; // many v2")]);
    let two = fixture.build(&host, "two", &[]).unwrap();
    assert!(two.carried.len() >= 100, "{:?}", two.carried.len());
    let two = two.output.unwrap();
    fixture.edit(LIB, &[("2; // many v2", "3; // many v3")]);
    let three = fixture.build(&host, "three", &[]).unwrap().output.unwrap();
    let patches: usize = std::env::var("EVOLVE_STRESS_PATCHES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    let started = std::time::Instant::now();
    for i in 0..patches {
        let (patch, version) = if i % 2 == 0 { (&two, 2) } else { (&three, 3) };
        let applied = host.apply(patch);
        assert!(
            applied["updated"].as_array().unwrap().len() >= 100,
            "{applied}"
        );
        // Check the switch on a sample (each check waits for fresh calls).
        if i % 50 == 0 {
            // Where an apply's time goes (printed, never asserted).
            eprintln!(
                "apply {i}: verify {} ms, references {} ms, switch {} ms, total {} ms",
                applied["verify_ms"], applied["load_ms"], applied["apply_ms"], applied["total_ms"]
            );
            assert_many(&mut host, version);
        }
        let reverted = host.send("revert");
        assert_eq!(reverted["ok"], true, "{reverted}");
        if i % 50 == 0 {
            assert_many(&mut host, 1);
        }
        // Unload the reverted patches nothing runs in any more, as a server would.
        if i % 50 == 49 {
            let gc = host.send("gc stacks");
            assert!(gc["resident"].is_u64(), "{gc}");
        }
    }
    eprintln!(
        "{patches} patches applied and reverted in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_many(&mut host, 1);
    host.assert_versions(|_| 1);
    let stats = host.send("stats");
    assert_eq!(stats["errors"], 0, "{stats}");
}
