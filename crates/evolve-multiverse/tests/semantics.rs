//! Semantics of commit and revert: before, after, switch changed without commit, after revert;
//! commit_refs / commit_fn scope; bytes restored exactly; NOP call sites; enums; partial
//! specialisation; values without a variant.
//!
//! Tests share the global registry, so each one uses its own switches and functions, and the
//! operations that touch every function (`commit`, `revert`) run in one test.
use evolve::code::callsite::DirectCalls;
use evolve::multiverse::{self as mv};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// Serialises the tests that commit everything with the others.
static GLOBAL: Mutex<()> = Mutex::new(());

#[evolve::switch]
static FLAG: bool = false;

#[evolve::switch(in 0..=3)]
static LEVEL: u8 = 0;

#[inline(never)]
fn caller(x: u32) -> u32 {
    combined(std::hint::black_box(x)) + 1
}

#[evolve::multiverse(FLAG, LEVEL)]
fn combined(x: u32) -> u32 {
    let base = if FLAG.get() { 1000 } else { 0 };
    base + LEVEL.get() as u32 * 10 + x
}

#[test]
fn commit_binds_until_the_next_commit_and_revert_restores() {
    let _g = GLOBAL.lock().unwrap_or_else(|p| p.into_inner());
    let pointer: extern "C-unwind" fn(u32) -> u32 = std::hint::black_box(combined);
    assert_eq!(caller(1), 2);
    FLAG.set(true);
    LEVEL.set(2);
    assert_eq!(
        caller(1),
        1022,
        "before commit: the generic code reads the switches"
    );
    let report = mv::commit_fn(combined).unwrap();
    assert_eq!(report.changed, vec!["combined"]);
    assert!(report.unmatched.is_empty());
    assert!(mv::is_committed(combined));
    assert_eq!((caller(1), pointer(1)), (1022, 1021));
    FLAG.set(false);
    LEVEL.set(3);
    assert_eq!(
        (caller(1), pointer(1)),
        (1022, 1021),
        "a committed binding stays when a switch changes (direct calls and pointers)"
    );
    let report = mv::commit_fn(combined).unwrap();
    assert_eq!(report.changed, vec!["combined"]);
    assert_eq!((caller(1), pointer(1)), (32, 31));
    assert!(
        mv::commit_fn(combined).unwrap().changed.is_empty(),
        "nothing to do"
    );
    mv::revert_fn(combined).unwrap();
    assert!(!mv::is_committed(combined));
    LEVEL.set(1);
    assert_eq!(caller(1), 12, "after revert: generic again");
    FLAG.set(false);
    LEVEL.set(0);
}

#[evolve::switch]
static REFS_A: bool = false;
#[evolve::switch]
static REFS_B: bool = false;

#[inline(never)]
fn call_a() -> u32 {
    reads_a()
}
#[inline(never)]
fn call_b() -> u32 {
    reads_b()
}

#[evolve::multiverse(REFS_A)]
fn reads_a() -> u32 {
    if REFS_A.get() {
        1
    } else {
        0
    }
}

#[evolve::multiverse(REFS_B)]
fn reads_b() -> u32 {
    if REFS_B.get() {
        1
    } else {
        0
    }
}

#[test]
fn commit_refs_and_commit_fn_touch_only_their_functions() {
    let _g = GLOBAL.lock().unwrap_or_else(|p| p.into_inner());
    REFS_A.set(true);
    REFS_B.set(true);
    let report = mv::commit_refs(&REFS_A).unwrap();
    assert_eq!(report.changed, vec!["reads_a"]);
    assert!(mv::is_committed(reads_a) && !mv::is_committed(reads_b));
    REFS_A.set(false);
    REFS_B.set(false);
    assert_eq!((call_a(), call_b()), (1, 0));
    let report = mv::commit_fn(reads_b).unwrap();
    assert_eq!(report.changed, vec!["reads_b"]);
    REFS_B.set(true);
    assert_eq!((call_a(), call_b()), (1, 0));
    assert_eq!(mv::revert_refs(&REFS_B).unwrap().changed, vec!["reads_b"]);
    assert!(mv::is_committed(reads_a));
    assert_eq!((call_a(), call_b()), (1, 1));
    assert_eq!(mv::revert_fn(reads_a).unwrap().changed, vec!["reads_a"]);
    assert_eq!(call_a(), 0);
    REFS_B.set(false);
}

#[evolve::switch]
static QUIET: bool = false;
static LOGGED: AtomicU32 = AtomicU32::new(0);

#[inline(never)]
fn log_twice() {
    log();
    log();
}

#[evolve::multiverse(QUIET)]
fn log() {
    if !QUIET.get() {
        LOGGED.fetch_add(1, Ordering::Relaxed);
    }
}

/// The 5 bytes of every entry stub and call site of `f`, and the stub's.
fn code_bytes(calls: &DirectCalls<extern "C-unwind" fn()>) -> Vec<[u8; 5]> {
    calls
        .sites()
        .into_iter()
        .map(evolve::code::write::site_bytes)
        .collect()
}

#[test]
fn empty_variant_becomes_nops_and_revert_restores_every_byte() {
    let _g = GLOBAL.lock().unwrap_or_else(|p| p.into_inner());
    let entry = log as usize;
    let calls = DirectCalls::find(log).unwrap();
    assert!(!calls.is_empty(), "log_twice calls log directly");
    let before = code_bytes(&calls);
    QUIET.set(true);
    mv::commit_fn(log).unwrap();
    let sites = calls.sites();
    assert!(sites
        .iter()
        .filter(|s| s.original() == evolve::code::SiteInsn::Call(entry))
        .all(|s| s.current() == evolve::code::SiteInsn::Nop));
    log_twice();
    assert_eq!(LOGGED.load(Ordering::Relaxed), 0);
    // Through the entry (a pointer): the stub jumps to the empty variant.
    (std::hint::black_box(log))();
    assert_eq!(LOGGED.load(Ordering::Relaxed), 0);
    let stub = evolve::code::PatchSite::lookup(entry).unwrap();
    assert_ne!(stub.current(), stub.original());
    mv::revert_fn(log).unwrap();
    assert_eq!(code_bytes(&calls), before, "call sites restored exactly");
    assert_eq!(stub.current(), stub.original(), "stub restored");
    QUIET.set(false);
    log_twice();
    assert_eq!(LOGGED.load(Ordering::Relaxed), 2);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, evolve::SwitchValue)]
enum Mode {
    Off,
    Fast,
    Safe,
}

#[evolve::switch]
static MODE: Mode = Mode::Off;

#[evolve::switch(in [1, 2, 4, 8])]
static WIDTH: u32 = 1;

#[evolve::multiverse(MODE = [Mode::Fast], WIDTH)]
fn partial(x: u32) -> u32 {
    match MODE.get() {
        Mode::Off => x,
        Mode::Fast => x * WIDTH.get(),
        Mode::Safe => x + WIDTH.get(),
    }
}

#[test]
fn enums_partial_specialisation_and_values_without_variant() {
    let _g = GLOBAL.lock().unwrap_or_else(|p| p.into_inner());
    assert_eq!(MODE.domain().len(), 3);
    MODE.set(Mode::Fast);
    WIDTH.set(4);
    let report = mv::commit_fn(partial).unwrap();
    assert!(report.unmatched.is_empty() && mv::is_committed(partial));
    assert_eq!(partial(3), 12);
    // MODE = Safe has no variant of its own: the variant with MODE unbound reads it.
    MODE.set(Mode::Safe);
    mv::commit_fn(partial).unwrap();
    assert!(mv::is_committed(partial));
    assert_eq!(partial(3), 7);
    MODE.set(Mode::Off);
    assert_eq!(
        partial(3),
        3,
        "MODE is read at run time in this partial variant"
    );
    // WIDTH = 3 is outside its domain: the generic code is used, and reported.
    WIDTH.set(3);
    let report = mv::commit_fn(partial).unwrap();
    assert_eq!(report.unmatched.len(), 1);
    assert_eq!(
        (report.unmatched[0].switch, report.unmatched[0].value),
        ("WIDTH", 3)
    );
    assert!(!mv::is_committed(partial));
    assert_eq!(partial(3), 3);
    mv::revert_fn(partial).unwrap();
    WIDTH.set(1);
}

#[test]
fn commit_and_revert_everything() {
    let _g = GLOBAL.lock().unwrap_or_else(|p| p.into_inner());
    let names = mv::functions();
    for f in ["combined", "reads_a", "reads_b", "log", "partial"] {
        assert!(names.contains(&f), "{f} registered");
    }
    let report = mv::commit().unwrap();
    assert_eq!(report.changed.len(), names.len());
    assert!(mv::is_committed(combined) && mv::is_committed(log));
    let report = mv::revert().unwrap();
    assert_eq!(report.changed.len(), names.len());
    assert!(!mv::is_committed(combined));
    assert!(matches!(
        mv::commit_fn(caller as fn(u32) -> u32),
        Err(mv::Error::NotMultiversed { .. })
    ));
}
