//! Stacked patches: a second patch on top of the first, revert of the last, revert of one
//! function to the program's own version, and refusals of unknown names.

mod common;

use common::{Fixture, V2};

#[test]
fn patches_stack_and_revert_by_patch_and_by_function() {
    let fixture = Fixture::new("versions");
    let mut host = fixture.start();
    host.stats_after(100);
    fixture.edit(V2);
    let v2 = fixture.build_patch(&host, "v2").unwrap().output;
    fixture.edit(&[
        ("helper(x) * 3 // v2", "helper(x) * 4 // v3"),
        ("2 // v2", "3 // v3"),
    ]);
    let v3 = fixture.build_patch(&host, "v3").unwrap().output;

    assert_eq!(host.send(&format!("apply {}", v2.display()))["ok"], true);
    assert_eq!(host.send(&format!("apply {}", v3.display()))["ok"], true);
    assert_eq!(host.send("probe")["compute"], 40);
    assert_eq!(host.stats_after(150)["version"], 3);

    // Revert the last patch: back to v2 everywhere.
    assert_eq!(host.send("revert")["ok"], true);
    assert_eq!(host.send("probe")["compute"], 30);
    assert_eq!(host.stats_after(150)["version"], 2);

    // One function back to the program's own version; the others stay on v2.
    assert_eq!(host.send("revert-fn compute 0")["ok"], true);
    assert_eq!(host.send("probe")["compute"], 20);
    let stats = host.stats_after(150);
    assert_eq!(stats["version"], 2);
    assert_eq!(stats["errors"], 0, "{stats}");

    // Names that do not exist are refused by name; nothing changes.
    let answer = host.send("revert-fn no_such_function 0");
    assert!(answer["error"]
        .as_str()
        .unwrap()
        .contains("no hot function named no_such_function"));
    let answer = host.send("revert-fn compute 7");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("has no version 7"),
        "{answer}"
    );
    assert_eq!(host.send("probe")["compute"], 20);
    let history = host.send("history");
    assert_eq!(
        (history["patches"].as_u64(), history["reverted"].as_u64()),
        (Some(2), Some(1))
    );
}
