//! Stress tests of the live-write protocol: threads call through sites in tight loops while
//! another thread retargets them, on both write paths. The number of calling threads is
//! `EVOLVE_STRESS_THREADS` (default 4).

mod common;

use common::{call_thunk, flip, flip_fns, hammer, one, retarget, retarget_in, threads, two, F};
use evolve_code::{Batch, FnSite, Placement, SiteInsn, WritePath};
use std::time::{Duration, Instant};

const ROUNDS: usize = 100_000;
/// Bound on each stress test's retarget loop, so a slow machine still finishes.
const LIMIT: Duration = Duration::from_secs(20);

fn stress_jump_site(placement: Placement, path: WritePath) {
    let site = FnSite::with_placement(one as F, placement).unwrap();
    let mut via_int3 = 0;
    let traps_before = evolve_code::write::trap_counts();
    let (calls, rounds) = hammer(&[site.entry()], threads(), ROUNDS, LIMIT, |i| {
        let (from, to) = flip_fns(i);
        let mut batch = Batch::new();
        site.retarget_in(batch.path(path), from, to);
        via_int3 += batch.apply().unwrap().via_int3;
    });
    let traps = evolve_code::write::trap_counts();
    let emulated = traps.emulated - traps_before.emulated;
    eprintln!(
        "{placement:?}/{path:?}: {rounds} retargets, {calls} calls, {via_int3} via int3, \
         {emulated} traps emulated, {} rewound",
        traps.rewound - traps_before.rewound
    );
    assert!(rounds >= 1_000, "only {rounds} retargets within {LIMIT:?}");
    assert!(calls > rounds as u64, "threads barely ran: {calls} calls");
    let expect_int3 = placement == Placement::CrossWord || path == WritePath::Int3;
    assert_eq!(via_int3, if expect_int3 { rounds } else { 0 });
    if expect_int3 {
        // The callers really ran into sites mid-write, and the handler carried them on.
        assert!(
            emulated > 0,
            "no thread ever met an int3: the handler path is untested"
        );
    }
}

#[test]
fn aligned_jump_site_retargeted_100k_times_by_atomic_store_under_threads() {
    stress_jump_site(Placement::Aligned, WritePath::Auto);
}

#[test]
fn cross_word_jump_site_retargeted_100k_times_by_int3_under_threads() {
    stress_jump_site(Placement::CrossWord, WritePath::Auto);
}

#[test]
fn aligned_jump_site_retargeted_100k_times_by_forced_int3_under_threads() {
    stress_jump_site(Placement::Aligned, WritePath::Int3);
}

fn stress_call_site(placement: Placement) {
    let (thunk, site) = call_thunk(one, placement);
    let (calls, rounds) = hammer(&[thunk], threads(), ROUNDS, LIMIT, |i| {
        let (from, to) = flip(i, true);
        retarget(site, from, to).unwrap();
    });
    eprintln!("call {placement:?}: {rounds} retargets, {calls} calls");
    assert!(rounds >= 1_000, "only {rounds} retargets within {LIMIT:?}");
    assert!(calls > rounds as u64);
    site.restore().unwrap();
    assert_eq!(thunk(), 1);
}

#[test]
fn aligned_call_site_retargeted_under_threads() {
    stress_call_site(Placement::Aligned);
}

#[test]
fn cross_word_call_site_retargeted_by_int3_under_threads() {
    stress_call_site(Placement::CrossWord);
}

#[test]
fn batches_of_mixed_sites_switch_together_under_threads() {
    let sites: Vec<FnSite<F>> = (0..64usize)
        .map(|i| {
            let placement = if i.is_multiple_of(2) {
                Placement::Aligned
            } else {
                Placement::CrossWord
            };
            FnSite::with_placement(one as F, placement).unwrap()
        })
        .collect();
    let (thunks, call_sites): (Vec<F>, Vec<_>) = (0..16usize)
        .map(|i| {
            let placement = if i.is_multiple_of(2) {
                Placement::Aligned
            } else {
                Placement::CrossWord
            };
            call_thunk(one, placement)
        })
        .unzip();
    let entries: Vec<F> = sites.iter().map(|s| s.entry()).chain(thunks).collect();
    let start = Instant::now();
    let cpu_start = common::thread_cpu_seconds();
    let (calls, rounds) = hammer(&entries, threads(), 5_000, LIMIT, |i| {
        let mut batch = Batch::new();
        for s in &sites {
            let (from, to) = flip_fns(i);
            s.retarget_in(&mut batch, from, to);
        }
        for &s in &call_sites {
            let (from, to) = flip(i, true);
            retarget_in(&mut batch, s, from, to);
        }
        let report = batch.apply().unwrap();
        assert_eq!(report.changed, 80);
        assert_eq!(report.via_int3, 40);
        assert_eq!(report.core_syncs, 3);
    });
    let (wall, cpu) = (
        start.elapsed().as_secs_f64(),
        common::thread_cpu_seconds() - cpu_start,
    );
    eprintln!(
        "mixed batches: {rounds} batches of 80 sites in {wall:.1} s ({:.0}/s) with {} calling \
         threads, {calls} calls; writer CPU {:.1} us per batch",
        rounds as f64 / wall,
        threads(),
        cpu * 1e6 / rounds as f64
    );
    assert!(rounds >= 1_000);
    // An even number of rounds leaves every site on `one`.
    let expected = if rounds.is_multiple_of(2) { 1 } else { 2 };
    assert!(entries.iter().all(|f| f() == expected));
}

#[test]
fn retargeting_one_site_does_not_disturb_its_neighbour_in_the_same_word() {
    // Two generated call thunks share no word, but a jump site's block has int3 padding around
    // it: check that the padding and the next block are byte-identical after many retargets.
    let site = FnSite::with_placement(one as F, Placement::CrossWord).unwrap();
    let start = site.site().address() - 5;
    let before = site.site().bytes();
    let around: Vec<u8> = (0..16).map(|i| unsafe_read(start + i)).collect();
    for i in 0..1000 {
        let (from, to) = flip_fns(i);
        site.retarget(from, to).unwrap();
    }
    let after: Vec<u8> = (0..16).map(|i| unsafe_read(start + i)).collect();
    assert_eq!(around, after);
    assert_eq!(before, site.site().bytes());
    assert_eq!(site.site().current(), SiteInsn::Jmp(one as F as usize));
    assert_eq!((site.entry())(), 1);
    let _ = two;
}

#[allow(unsafe_code)]
fn unsafe_read(address: usize) -> u8 {
    // SAFETY: the address lies in a live 16-byte near block owned by the test.
    unsafe { std::ptr::read_volatile(address as *const u8) }
}
