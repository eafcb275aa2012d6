//! Smoke test of `evolve-bench multiverse-fnptr`: the JSON has its fields, the commit bound the
//! switch and every run computed the direct run's result. Times are never asserted.

use std::process::Command;

#[test]
fn multiverse_fnptr_prints_its_record() {
    let out = Command::new(env!("CARGO_BIN_EXE_evolve-bench"))
        .args([
            "multiverse-fnptr",
            "--iters",
            "20000",
            "--runs",
            "3",
            "--json",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["scenario"], "multiverse-fnptr");
    assert_eq!(v["runs"], 3);
    for field in [
        "indirect_ns",
        "committed_ns",
        "direct_ns",
        "plain_pointer_ns",
        "committed_ratio",
    ] {
        assert!(v[field].is_f64(), "{field} in {v}");
    }
    assert_eq!(v["switches_changed"], serde_json::json!(["MIX"]), "{v}");
    assert!(v["call_sites"].as_u64().unwrap() >= 2, "{v}");
}
