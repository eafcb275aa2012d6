//! The fallback for systems that forbid writable executable pages: writes go through
//! `/proc/self/mem` and every site uses the int3 protocol. Its own binary: the choice is made
//! once per process, from `EVOLVE_WRITE_VIA_PROC_MEM`.

mod common;

use common::{flip_fns, hammer, one, threads, F};
use evolve_code::{FnSite, PatchSite, Placement};
use std::time::Duration;

#[test]
fn writes_through_proc_self_mem_are_safe_under_threads() {
    // Before the engine's first use in this process (the only test here).
    std::env::set_var("EVOLVE_WRITE_VIA_PROC_MEM", "1");
    let site = FnSite::with_placement(one as F, Placement::Aligned).unwrap();
    assert!(evolve_code::write::writes_via_proc_mem());
    let mut via_int3 = 0;
    let (calls, rounds) = hammer(
        &[site.entry()],
        threads(),
        20_000,
        Duration::from_secs(15),
        |i| {
            let (from, to) = flip_fns(i);
            via_int3 += site.retarget(from, to).unwrap().via_int3;
        },
    );
    assert!(rounds >= 1000 && calls > rounds as u64);
    // Even an aligned site avoids the plain store: /proc/self/mem writes are not atomic.
    assert_eq!(via_int3, rounds);
    PatchSite::lookup(site.site().address())
        .unwrap()
        .restore()
        .unwrap();
    assert_eq!((site.entry())(), 1);
}
