//! Semantics of commit and revert.
use evolve::multiverse::{self as mv};

#[evolve::switch]
static FLAG: bool = false;

#[evolve::switch(in 0..=3)]
static LEVEL: u8 = 0;

#[inline(never)]
fn caller(x: u32) -> u32 {
    combined(x) + 1
}

#[evolve::multiverse(FLAG, LEVEL)]
fn combined(x: u32) -> u32 {
    let base = if FLAG.get() { 1000 } else { 0 };
    base + LEVEL.get() as u32 * 10 + x
}

#[test]
fn before_and_after_commit() {
    assert_eq!(caller(1), 2);
    FLAG.set(true);
    LEVEL.set(2);
    assert_eq!(caller(1), 1022);
    let report = mv::commit_fn(combined).unwrap();
    assert_eq!(report.changed, vec!["combined"]);
    assert!(mv::is_committed(combined));
    assert_eq!(caller(1), 1022);
    FLAG.set(false);
    assert_eq!(caller(1), 1022, "old binding stays until the next commit");
    mv::revert_fn(combined).unwrap();
    assert_eq!(caller(1), 22);
}
