//! The in-process canary under threads: the host's worker threads (`EVOLVE_STRESS_THREADS`,
//! default 4) call hot functions and check every result while a patch serves a fraction of
//! the calls; a good patch is promoted, a bad one (wrong results, counted by an error probe on
//! the side that produced them) is rolled back; start/finish cycles under load lose no call.

mod common;

use common::{Fixture, V2};
use std::time::{Duration, Instant};

fn wait_for_calls(host: &mut common::Host, new_at_least: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reading = host.send("canary-read");
        if reading["new_calls"].as_u64().unwrap_or(0) >= new_at_least
            && reading["old_calls"].as_u64().unwrap_or(0) >= new_at_least
        {
            return reading;
        }
        assert!(
            Instant::now() < deadline,
            "no calls reached both sides: {reading}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_canary_splits_calls_then_promotes_a_good_patch_and_rolls_back_a_bad_one() {
    let fixture = Fixture::new("canary");
    let mut host = fixture.start();
    host.stats_after(100);

    // A bad patch first: compute quintuples, a result no version gives.
    fixture.edit(&[("helper(x) * 2 // v1", "helper(x) * 5 // v1")]);
    let bad = fixture.build_patch(&host, "bad").unwrap();
    fixture.edit(&[("helper(x) * 5 // v1", "helper(x) * 2 // v1")]);
    fixture.edit(V2);
    let good = fixture.build_patch(&host, "good").unwrap();

    // Start/finish cycles under load: every call lands on one version or the other.
    for _ in 0..10 {
        let started = host.send(&format!("canary-start calls 0.5 {}", good.output.display()));
        assert_eq!(started["ok"], true, "{started}");
        wait_for_calls(&mut host, 50);
        let ended = host.send("canary-finish rollback 1");
        assert_eq!(ended["promoted"], false, "{ended}");
    }
    let stats = host.stats_after(100);
    assert_eq!(stats["errors"], 0, "{stats}");
    assert_eq!(stats["version"], 1);

    // While a canary runs, apply and revert are refused.
    let started = host.send(&format!("canary-start calls 0.25 {}", bad.output.display()));
    assert_eq!(started["ok"], true, "{started}");
    let refused = host.send(&format!("apply {}", good.output.display()));
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("canary is running"),
        "{refused}"
    );
    let reading = wait_for_calls(&mut host, 200);
    let new = reading["new_calls"].as_u64().unwrap() as f64;
    let old = reading["old_calls"].as_u64().unwrap() as f64;
    let share = new / (new + old);
    assert!(
        (0.1..0.4).contains(&share),
        "a quarter of the calls: {reading}"
    );
    assert_eq!(host.send("canary-finish rollback 1")["promoted"], false);

    // The bad patch under the thread split: the workers check results after the call returns,
    // so errors are attributed by thread. Its wrong results count on the new side only, and it
    // is rolled back (also when no worker was drawn for it: then nothing was learned).
    let started = host.send(&format!(
        "canary-start threads 0.5 {}",
        bad.output.display()
    ));
    assert_eq!(started["ok"], true, "{started}");
    std::thread::sleep(Duration::from_millis(500));
    let ended = host.send("canary-finish promote 2");
    assert_eq!(ended["ok"], true, "{ended}");
    assert_eq!(
        ended["promoted"], false,
        "a bad patch is rolled back: {ended}"
    );
    if ended["new_calls"].as_u64().unwrap() > 0 {
        assert!(ended["new_errors"].as_u64().unwrap() > 0, "{ended}");
    }
    assert_eq!(ended["old_errors"], 0, "{ended}");
    // Rolled back: no wrong result any more.
    let before = host.stats_after(50)["errors"].as_u64().unwrap();
    let after = host.stats_after(300);
    assert_eq!(after["errors"].as_u64().unwrap(), before, "{after}");
    assert_eq!(after["version"], 1);

    // The good patch: promoted, then it serves every call, as after an apply.
    let started = host.send(&format!(
        "canary-start threads 0.5 {}",
        good.output.display()
    ));
    assert_eq!(started["ok"], true, "{started}");
    std::thread::sleep(Duration::from_millis(300));
    let ended = host.send("canary-finish promote 2");
    assert_eq!(ended["ok"], true, "{ended}");
    // Under the thread split all workers may fall on one side: then nothing was learned about
    // the new version and it is rolled back; a calls split always reaches both.
    if ended["promoted"] == false {
        assert_eq!(ended["new_calls"], 0, "{ended}");
        let started = host.send(&format!("canary-start calls 0.5 {}", good.output.display()));
        assert_eq!(started["ok"], true, "{started}");
        wait_for_calls(&mut host, 100);
        let ended = host.send("canary-finish promote 2");
        assert_eq!(ended["promoted"], true, "{ended}");
    }
    let stats = host.stats_after(300);
    assert_eq!(stats["version"], 2, "{stats}");
    assert_eq!(host.send("probe")["compute"], 30);
    // And it reverts like any applied patch.
    assert_eq!(host.send("revert")["ok"], true);
    assert_eq!(host.stats_after(100)["version"], 1);
}
