//! Function-pointer switches: semantics before commit, after commit, after a set without
//! commit and after revert; call sites become direct calls (or NOPs for an empty function);
//! every byte restored; commit_refs / commit_fn scope; the switch seen as an `AnySwitch`.
//!
//! Tests share the global registry, so they are serialised by one lock.
use evolve::code::callsite::DirectCalls;
use evolve::code::{FnPtr, PatchSite, SiteInsn};
use evolve::multiverse as mv;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

static GLOBAL: Mutex<()> = Mutex::new(());

#[inline(never)]
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[inline(never)]
fn length(data: &[u8]) -> u64 {
    std::hint::black_box(data.len() as u64)
}

#[inline(never)]
fn first_byte(data: &[u8]) -> u64 {
    std::hint::black_box(data.first().copied().unwrap_or(0) as u64)
}

#[evolve::switch(in [fnv, length])]
static HASH: fn(&[u8]) -> u64 = fnv;

/// Two direct call sites of the switch.
#[inline(never)]
fn hash_pair(data: &[u8]) -> (u64, u64) {
    (HASH.call(data), HASH.call(&data[1..]))
}

fn expected(f: fn(&[u8]) -> u64, data: &[u8]) -> (u64, u64) {
    (f(data), f(&data[1..]))
}

fn address(f: fn(&[u8]) -> u64) -> usize {
    f as usize
}

#[test]
fn commit_binds_until_the_next_commit_and_revert_restores_every_byte() {
    let _g = GLOBAL.lock().unwrap_or_else(|p| p.into_inner());
    let data = b"switch";
    let through_entry = HASH.entry().0;

    // Before any commit: calls follow the value at once.
    assert!(!HASH.is_committed() && HASH.committed().is_none());
    assert_eq!(hash_pair(data), expected(fnv, data));
    HASH.set(length);
    assert_eq!(hash_pair(data), expected(length, data));
    assert_eq!(through_entry(data), 6);

    // Registering the branches to the dispatcher records their bytes and changes nothing.
    let sites = DirectCalls::find(HASH.dispatcher()).unwrap().sites();
    assert!(
        sites.len() >= 3,
        "two calls in hash_pair and the stub: {sites:?}"
    );
    assert!(sites.iter().any(|s| s.address() == HASH.entry().address()));
    let before: Vec<[u8; 5]> = sites
        .iter()
        .map(|&s| evolve::code::write::site_bytes(s))
        .collect();

    // Commit: every call site calls `length` directly, the stub jumps to it.
    let report = mv::commit().unwrap();
    assert!(report.changed.contains(&"HASH"), "{report:?}");
    assert!(HASH.is_committed());
    assert_eq!(HASH.committed().map(address), Some(address(length)));
    assert!(mv::is_committed(HASH.entry()));
    let length_address = address(length);
    for site in &sites {
        match site.original() {
            SiteInsn::Call(_) => assert_eq!(site.current(), SiteInsn::Call(length_address)),
            SiteInsn::Jmp(_) => assert_eq!(site.current(), SiteInsn::Jmp(length_address)),
            SiteInsn::Nop => unreachable!("branch sites"),
        }
    }
    assert_eq!(HASH.call_sites(), Some(sites.len()));
    assert_eq!(hash_pair(data), expected(length, data));

    // A set without commit: committed calls keep `length`; the value and plain indirect calls
    // through it see `fnv`.
    HASH.set(fnv);
    assert_eq!(hash_pair(data), expected(length, data));
    assert_eq!(through_entry(data), 6, "the stub follows the binding");
    assert_eq!(
        (HASH.dispatcher().0)(data),
        6,
        "so does the dispatcher (calls commit could not rewrite)"
    );
    assert_eq!(address(HASH.get()), address(fnv));
    assert_eq!((HASH.get())(data), fnv(data));

    // The next commit moves the binding; a commit with nothing new changes nothing.
    let report = mv::commit_refs(&HASH).unwrap();
    assert_eq!(report.changed, vec!["HASH"]);
    assert_eq!(hash_pair(data), expected(fnv, data));
    assert!(mv::commit_refs(&HASH).unwrap().changed.is_empty());

    // Revert: every byte as compiled, calls follow the value again.
    let report = mv::revert().unwrap();
    assert!(report.changed.contains(&"HASH"));
    assert!(!HASH.is_committed() && !mv::is_committed(HASH.entry()));
    let after: Vec<[u8; 5]> = sites
        .iter()
        .map(|&s| evolve::code::write::site_bytes(s))
        .collect();
    assert_eq!(after, before, "call sites and stub restored exactly");
    assert!(sites.iter().all(|s| s.current() == s.original()));
    HASH.set(first_byte);
    assert_eq!(hash_pair(data), expected(first_byte, data));
    assert_eq!(through_entry(data), b's' as u64);
    HASH.set(fnv);
}

#[evolve::switch]
static OTHER: fn(&[u8]) -> u64 = length;

#[evolve::switch]
static PLAIN: bool = false;

#[evolve::multiverse(PLAIN)]
fn plain() -> u32 {
    if PLAIN.get() {
        1
    } else {
        0
    }
}

#[test]
fn commit_refs_and_commit_fn_touch_only_their_switch() {
    let _g = GLOBAL.lock().unwrap_or_else(|p| p.into_inner());
    assert_eq!(OTHER.call(b"ab"), 2);
    let report = mv::commit_refs(&OTHER).unwrap();
    assert_eq!(report.changed, vec!["OTHER"]);
    assert!(OTHER.is_committed() && !HASH.is_committed() && !mv::is_committed(plain));
    assert_eq!(mv::revert_refs(&HASH).unwrap().changed, Vec::<&str>::new());
    assert_eq!(mv::revert_fn(OTHER.entry()).unwrap().changed, vec!["OTHER"]);
    assert_eq!(mv::commit_fn(HASH.entry()).unwrap().changed, vec!["HASH"]);
    assert!(HASH.is_committed() && !OTHER.is_committed());
    assert_eq!(mv::revert_refs(&HASH).unwrap().changed, vec!["HASH"]);
    let names = mv::functions();
    assert!(["HASH", "OTHER", "plain"].iter().all(|n| names.contains(n)));
}

static HOOKED: AtomicU32 = AtomicU32::new(0);

#[inline(never)]
fn no_hook() {}

#[inline(never)]
fn count_hook() {
    HOOKED.fetch_add(1, Ordering::Relaxed);
}

#[evolve::switch(in [no_hook, count_hook])]
static HOOK: fn() = no_hook;

#[inline(never)]
fn run_hooks() {
    HOOK.call();
    HOOK.call();
}

#[test]
fn an_empty_function_makes_the_call_sites_nops() {
    let _g = GLOBAL.lock().unwrap_or_else(|p| p.into_inner());
    HOOK.set(no_hook);
    mv::commit_refs(&HOOK).unwrap();
    let calls = DirectCalls::find(HOOK.entry()).unwrap();
    assert!(
        calls.is_empty(),
        "`call` calls the dispatcher, not the stub"
    );
    let stub = PatchSite::lookup(HOOK.entry().address()).unwrap();
    assert_eq!(stub.current(), SiteInsn::Jmp(no_hook as fn() as usize));
    run_hooks();
    (HOOK.entry().0)();
    assert_eq!(HOOKED.load(Ordering::Relaxed), 0);
    HOOK.set(count_hook);
    run_hooks();
    assert_eq!(
        HOOKED.load(Ordering::Relaxed),
        0,
        "committed: NOPs until the next commit"
    );
    mv::commit_refs(&HOOK).unwrap();
    run_hooks();
    (HOOK.entry().0)();
    assert_eq!(HOOKED.load(Ordering::Relaxed), 3);
    mv::revert_refs(&HOOK).unwrap();
    assert_eq!(stub.current(), stub.original());
    run_hooks();
    assert_eq!(HOOKED.load(Ordering::Relaxed), 5);
    HOOK.set(no_hook);
}

#[test]
fn a_function_switch_is_a_switch_for_control_tools() {
    let _g = GLOBAL.lock().unwrap_or_else(|p| p.into_inner());
    let switch = mv::switch_named("HOOK").expect("registered");
    assert_eq!(switch.domain(), &[0, 1]);
    let declared: Vec<&str> = HOOK.declared().map(|(name, _)| name).collect();
    assert_eq!(declared, ["no_hook", "count_hook"]);
    HOOK.set(no_hook);
    assert_eq!(switch.raw(), 0);
    switch.set_raw(1);
    assert_eq!(HOOK.get() as usize, count_hook as fn() as usize);
    assert_eq!(switch.raw(), 1);
    switch.set_raw(7); // not a declared function: ignored
    assert_eq!(switch.raw(), 1);
    assert_eq!(mv::commit_refs_dyn(switch).unwrap().changed, vec!["HOOK"]);
    assert_eq!(
        HOOK.committed().map(|f| f as usize),
        Some(count_hook as fn() as usize)
    );
    mv::revert_refs_dyn(switch).unwrap();
    // A function outside the declared ones is allowed; its raw value is its address.
    fn other_hook() {}
    HOOK.set(other_hook);
    assert_eq!(switch.raw(), other_hook as fn() as usize as u64);
    HOOK.set(no_hook);
    assert!(mv::switches().iter().any(|s| s.name() == "HASH"));
}

#[test]
#[should_panic(expected = "cannot hold its own entry")]
fn a_switch_cannot_hold_its_own_entry() {
    OTHER.set(OTHER.entry().0);
}

extern "C" fn add(a: u64, b: u64, c: &u64) -> u64 {
    a + b + *c
}
extern "C" fn mul(a: u64, b: u64, c: &u64) -> u64 {
    a * b * *c
}

#[evolve::switch]
static COMBINE: extern "C" fn(u64, u64, &u64) -> u64 = add;

#[test]
fn other_abis_and_several_arguments() {
    let _g = GLOBAL.lock().unwrap_or_else(|p| p.into_inner());
    assert_eq!(COMBINE.call(2, 3, &4), 9);
    COMBINE.set(mul);
    mv::commit_refs(&COMBINE).unwrap();
    assert_eq!(COMBINE.call(2, 3, &4), 24);
    assert_eq!((COMBINE.entry().0)(2, 3, &4), 24);
    mv::revert_refs(&COMBINE).unwrap();
    COMBINE.set(add);
    assert_eq!(COMBINE.call(2, 3, &4), 9);
}
