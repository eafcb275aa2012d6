//! Reclamation: an old patch is unloaded only when nothing refers to it; a pointer that escaped
//! into the heap keeps it loaded under the `scan` policy; under `stacks` it is not seen, and
//! using it after the unload faults with a diagnostic naming the patch.

mod common;

use common::{Fixture, V2};
use std::os::unix::process::ExitStatusExt;

#[test]
fn old_patches_are_unloaded_only_when_nothing_refers_to_them() {
    let fixture = Fixture::new("reclaim");
    let mut host = fixture.start();
    host.stats_after(100);
    fixture.edit(V2);
    let built = fixture.build_patch(&host, "v2").unwrap().output;
    let copy = |name: &str| {
        let path = fixture.dir.join(name);
        std::fs::copy(&built, &path).unwrap();
        path
    };
    let (first, second) = (copy("first.so"), copy("second.so"));

    // A pointer into the patch's code escapes into the host's memory, then the patch is reverted.
    assert_eq!(host.send(&format!("apply {}", first.display()))["ok"], true);
    assert_eq!(host.send("escape")["escaped"], 30);
    assert_eq!(host.send("revert")["ok"], true);
    assert_eq!(host.send("probe")["compute"], 20);

    // scan: the escaped pointer keeps it loaded, and the report says where it was found.
    let gc = host.send("gc scan");
    assert_eq!(gc["ok"], true, "{gc}");
    assert_eq!(gc["unloaded"].as_array().unwrap().len(), 0, "{gc}");
    assert!(
        gc["kept"][0].as_str().unwrap().contains("memory word"),
        "{gc}"
    );
    assert_eq!(host.send("mapped first.so")["mapped"], true);
    // The program forgets the pointer: now it goes, while the workers keep calling. The scan is
    // conservative: stale copies in registers, stacks or freed memory keep a patch a little
    // longer, until ordinary work overwrites them, so collection is retried a bounded number
    // of times, as a background collector would.
    host.send("unescape");
    let gc = collect_until_unloaded(&mut host, "scan", "first");
    assert_eq!(gc["resident"], 0, "{gc}");
    assert_eq!(host.send("mapped first.so")["mapped"], false);
    let stats = host.stats_after(200);
    assert_eq!(stats["errors"], 0, "{stats}");
    assert_eq!(host.send("probe")["compute"], 20);

    // A patch that is still the current version is never a candidate.
    assert_eq!(
        host.send(&format!("apply {}", second.display()))["ok"],
        true
    );
    let gc = host.send("gc scan");
    assert_eq!(gc["unloaded"].as_array().unwrap().len(), 0, "{gc}");
    assert_eq!(host.send("probe")["compute"], 30);

    // stacks: the escaped pointer in the heap is not seen; calling it after the unload faults
    // in the reserved range, and the diagnostic names the patch.
    assert_eq!(host.send("escape")["escaped"], 30);
    assert_eq!(host.send("revert")["ok"], true);
    collect_until_unloaded(&mut host, "stacks", "second");
    let status = host.send_fatal("call-escaped");
    assert_eq!(status.signal(), Some(libc_sigsegv()), "{status:?}");
    let stderr = host.stderr.lock().unwrap().clone();
    assert!(stderr.contains("unloaded patch `second`"), "{stderr}");
}

/// Collects with `policy` until `patch` is unloaded (at most 50 times, 100 ms apart).
fn collect_until_unloaded(host: &mut common::Host, policy: &str, patch: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    for _ in 0..50 {
        last = host.send(&format!("gc {policy}"));
        assert_eq!(last["ok"], true, "{last}");
        if last["unloaded"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == patch)
        {
            return last;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("{patch} was never unloaded: {last}");
}

fn libc_sigsegv() -> i32 {
    11
}
