//! C multiverse (`EVOLVE_SWITCH`, `EVOLVE_MULTIVERSE`): every call of the paper's Table 1 with
//! its semantics, 10 000 commits and reverts while threads call, and every refusal by cause.

mod common;

use common::{build, number, run, scratch, values};

#[test]
fn ten_thousand_commits_and_reverts_while_threads_call_give_no_wrong_result() {
    let scratch = scratch("mv-stress");
    let exe = build("multiverse_stress", &scratch.dir, "");
    let v = values(&run(&exe, &["10000"]));
    assert_eq!(number(&v, "threads"), common::stress_threads() as u64);
    assert_eq!(number(&v, "rounds"), 10_000, "{v:?}");
    assert!(number(&v, "calls") > 0, "{v:?}");
    assert_eq!(number(&v, "wrong"), 0, "{v:?}");
    assert_eq!(number(&v, "function_bytes_identical"), 1, "{v:?}");
    assert_eq!(number(&v, "after"), 4, "{v:?}");
}

#[test]
fn every_table_1_call_and_every_refusal() {
    let scratch = scratch("mv-table1");
    let exe = build("table1", &scratch.dir, "");
    let output = run(&exe, &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("table1=ok"), "{stdout}");
    assert!(stdout.contains("nop_call_site=1"), "{stdout}");
    // Each refusal was checked by the program; their messages name the function.
    assert!(
        stdout.contains("refused commit_fn(plain): `plain`"),
        "{stdout}"
    );
}

#[test]
fn every_table_1_call_with_cet_and_unoptimised() {
    // endbr64 before the gate; and -O0, where nothing is inlined or aligned by the optimiser.
    for (name, flags) in [("cet", "-fcf-protection"), ("o0", "-O0")] {
        let scratch = scratch(&format!("mv-table1-{name}"));
        let exe = build("table1", &scratch.dir, flags);
        let output = run(&exe, &[]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("table1=ok"), "{flags}: {stdout}");
    }
}

#[test]
fn a_value_outside_the_domain_is_refused_naming_function_switch_and_value() {
    let scratch = scratch("mv-domain");
    let exe = build("bad_domain", &scratch.dir, "");
    let output = run(&exe, &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("generic=ok"), "{stdout}");
    for needle in [
        "`scaled`",
        "value 7 of switch `level`",
        "[0, 1, 2, 3]",
        "bad_domain.c:",
    ] {
        assert!(
            stdout.contains(needle),
            "the error names {needle}: {stdout}"
        );
    }
}
