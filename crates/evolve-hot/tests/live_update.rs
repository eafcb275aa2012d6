//! End to end: a host runs 4 threads calling hot functions; its source is edited to v2 and a
//! patch built against the running process; the patch is applied while calls continue, then
//! reverted and applied again.

mod common;

use common::{Fixture, V2};

#[test]
fn a_live_process_takes_a_patch_while_calls_continue_and_keeps_its_state() {
    let fixture = Fixture::new("live");
    let mut host = fixture.start();
    let before = host.stats_after(200);
    assert!(before["calls"].as_u64().unwrap() > 0);
    assert_eq!(before["version"], 1);
    assert_eq!(before["v2"], 0);

    fixture.edit(V2);
    let report = fixture.build_patch(&host, "v2").expect("patch builds");
    // Only the five functions V2 edits are carried (issue 11): the other hot functions compile
    // to the program's code.
    let mut carried: Vec<&str> = report
        .manifest
        .functions
        .iter()
        .map(|f| {
            f.id.rsplit_once('_')
                .map_or(f.id.as_str(), |(name, _)| name)
        })
        .collect();
    carried.sort_unstable();
    assert_eq!(
        carried,
        [
            "hotfix_compute",
            "hotfix_greet",
            "hotfix_scaler",
            "hotfix_slow",
            "hotfix_version"
        ],
        "{:?}",
        report.manifest
    );
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);

    // A call that starts on v1 and is still running when the patch lands.
    assert_eq!(host.send("slow 600")["slow_started"], true);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let applied = host.send(&format!("apply {}", report.output.display()));
    assert_eq!(applied["ok"], true, "{applied}");
    assert_eq!(applied["updated"], 5);
    let slow = host.wait_event("slow_done");
    assert!(
        slow.contains("\"started_as\":1"),
        "in-flight call finished on v1: {slow}"
    );

    let after = host.stats_after(300);
    assert_eq!(after["version"], 2);
    assert!(
        after["v2"].as_u64().unwrap() > 0,
        "new calls run v2: {after}"
    );
    assert_eq!(after["errors"], 0, "{after}");
    // State carried over: the host's static counter and the dependency's global state kept
    // counting across the update instead of starting again.
    assert!(after["counter"].as_u64() > before["counter"].as_u64());
    assert!(after["remembered"].as_u64() > before["remembered"].as_u64());
    // Patch code logs through the host's logger.
    let probe = host.send("probe");
    assert_eq!(probe["compute"], 30);
    assert_eq!(probe["greet"], "hi probe");
    let log = host.wait_event("LOG greet");
    assert!(log.contains("greet v2 probe"), "{log}");

    // Revert: back to v1, calls never stop.
    assert_eq!(host.send("revert")["ok"], true);
    let reverted = host.stats_after(300);
    assert_eq!(reverted["version"], 1);
    assert_eq!(host.send("probe")["compute"], 20);
    assert_eq!(reverted["errors"], 0);

    // And again, this time atomically: every worker held at its safe point while all five
    // functions switch.
    let again = host.send(&format!("apply-atomic {}", report.output.display()));
    assert_eq!(again["ok"], true, "{again}");
    assert_eq!(again["patch"], "v2#2");
    let last = host.stats_after(300);
    assert_eq!(last["version"], 2);
    assert_eq!(last["errors"], 0);
    assert!(last["calls"].as_u64() > reverted["calls"].as_u64());
}
