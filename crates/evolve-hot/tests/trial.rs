//! A patch applied on trial reverts itself when its code panics within the window.

mod common;

use common::Fixture;

#[test]
fn a_patch_on_trial_that_panics_reverts_itself() {
    let fixture = Fixture::new("trial");
    let mut host = fixture.start();
    host.stats_after(100);
    fixture.edit(&[
        (
            "helper(x) * 2 // v1",
            "if x == 999_999 {\n        panic!(\"v2 cannot handle {x}\");\n    }\n    helper(x) * 3",
        ),
        ("1 // v1", "2 // v2"),
    ]);
    let patch = fixture.build_patch(&host, "risky").unwrap();
    let answer = host.send(&format!("apply-trial {}", patch.output.display()));
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(host.send("call 10")["result"], 30);

    // The bug: code inside the patch panics. The panic hook finds the patch's code on the stack
    // and reverts it; the caller still sees its panic.
    assert_eq!(host.send("call 999999")["panicked"], true);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while host.send("history")["reverted"] != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the patch was not reverted"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(host.send("call 10")["result"], 20);
    let stats = host.stats_after(200);
    assert_eq!(stats["version"], 1);
    assert_eq!(stats["errors"], 0, "{stats}");
}
