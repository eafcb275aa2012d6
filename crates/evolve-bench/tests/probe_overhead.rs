//! Smoke test of `evolve-bench probe-overhead`: the JSON has its fields, for every kind, and
//! the probe counted every call. Times are never asserted.

use std::process::Command;

#[test]
fn probe_overhead_prints_its_record_for_every_kind() {
    for kind in ["count", "hist", "latency"] {
        let out = Command::new(env!("CARGO_BIN_EXE_evolve-bench"))
            .args([
                "probe-overhead",
                "--kind",
                kind,
                "--calls",
                "20000",
                "--runs",
                "3",
            ])
            .arg("--json")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{kind}: {stderr}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(v["scenario"], "probe-overhead");
        assert_eq!(v["kind"], kind);
        assert_eq!(v["runs"], 3);
        assert_eq!(v["calls_per_sample"], 20000);
        assert_eq!(v["errors"], 0, "{v}");
        for field in ["baseline_ns", "probed_ns", "probe_cost_ns"] {
            assert!(v[field].is_f64(), "{field} in {v}");
        }
        if kind == "hist" {
            assert!(v["goal_ns"].is_null() && v["meets_goal"].is_null(), "{v}");
        } else {
            assert!(v["goal_ns"].is_f64() && v["meets_goal"].is_boolean(), "{v}");
        }
    }
}

#[test]
fn probe_overhead_refuses_an_unknown_kind() {
    let out = Command::new(env!("CARGO_BIN_EXE_evolve-bench"))
        .args(["probe-overhead", "--kind", "nope", "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown --kind"));
}
