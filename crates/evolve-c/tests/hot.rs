//! C hot functions (`EVOLVE_HOT`): redirected live under calling threads (to the program's own
//! code and to a shared object loaded later) and restored, byte for byte.

mod common;

use common::{build, build_shared, number, run, scratch, values};

#[test]
fn a_hot_function_is_redirected_live_under_threads_and_restored_byte_for_byte() {
    let scratch = scratch("hot");
    let exe = build("hot_stress", &scratch.dir, "");
    let patch = build_shared("hot_patch", &scratch.dir);
    let output = run(&exe, &["2000", patch.to_str().unwrap()]);
    let v = values(&output);
    assert_eq!(number(&v, "threads"), common::stress_threads() as u64);
    assert!(number(&v, "rounds") > 0, "{v:?}");
    assert!(number(&v, "far_rounds") > 0, "{v:?}");
    assert!(number(&v, "calls") > 0, "{v:?}");
    assert_eq!(
        number(&v, "wrong"),
        0,
        "wrong results under redirection: {v:?}"
    );
    // The direct call was retargeted to the new implementation, then restored.
    assert_eq!(number(&v, "site_retargeted"), 1, "{v:?}");
    assert_eq!(number(&v, "site_restored"), 1, "{v:?}");
    // Every byte of the function is back; the padding before it is one 5-byte NOP instead of
    // the compiler's five one-byte NOPs (see docs/c.md: never executed while closed).
    assert_eq!(number(&v, "function_bytes_identical"), 1, "{v:?}");
    assert_eq!(v["slot_before"], "9090909090");
    assert_eq!(v["slot_after"], "0f1f440000");
    assert_eq!(number(&v, "after"), 4);
}

#[test]
fn a_group_switches_at_safe_points_and_a_missing_thread_times_out_with_nothing_changed() {
    let scratch = scratch("safe-points");
    let exe = build("safe_points", &scratch.dir, "");
    let output = run(&exe, &["200"]);
    let v = values(&output);
    assert!(number(&v, "rounds") > 0, "{v:?}");
    assert!(number(&v, "loops") > 0, "{v:?}");
    assert_eq!(
        number(&v, "mismatches"),
        0,
        "a thread saw one function switched and not the other: {v:?}"
    );
    assert_eq!(number(&v, "timeout_refused"), 1, "{v:?}");
    assert_eq!(number(&v, "unchanged"), 1, "{v:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("did not reach a safe point"),
        "the error names the cause: {stdout}"
    );
}
