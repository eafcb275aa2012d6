//! Patch-site behaviour: exact restore, springboards, sites in the executable's own text, and
//! refusals that change nothing.
#![allow(unsafe_code)]

mod common;

use common::{
    call_thunk, far_from_executable, flip, forty_two_near, hammer, one, retarget, retarget_in,
    threads, two, F,
};
use evolve_code::{
    write::site_bytes, Batch, ErrorKind, FnSite, NearBlock, PatchSite, Placement, SiteInsn,
};
use std::time::Duration;

// Two jump sites in the test binary's own `.text` (a file-backed page), one inside an aligned
// word and one across a word boundary (behind a 5-byte NOP), each a function returning `one()`.
// The jumps are spelled as bytes so the assembler cannot shorten them.
std::arch::global_asm!(
    ".pushsection .text.evolve_test_text_sites,\"ax\",@progbits",
    ".p2align 4",
    ".globl evolve_test_text_site_aligned",
    "evolve_test_text_site_aligned:",
    ".byte 0xe9",
    ".long {one} - . - 4",
    ".byte 0xcc, 0xcc, 0xcc",
    ".p2align 4",
    ".globl evolve_test_text_site_cross",
    "evolve_test_text_site_cross:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    ".byte 0xe9",
    ".long {one} - . - 4",
    ".byte 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc",
    ".popsection",
    one = sym one,
);

// SAFETY: both are complete functions (defined above) returning what `one` returns.
unsafe extern "C" {
    safe fn evolve_test_text_site_aligned() -> u64;
    safe fn evolve_test_text_site_cross() -> u64;
}

fn read16(address: usize) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: the test reads its own mapped code.
        *b = unsafe { std::ptr::read_volatile((address + i) as *const u8) };
    }
    out
}

#[test]
fn text_sites_in_the_executable_switch_under_threads_and_restore_byte_for_byte() {
    let aligned = evolve_test_text_site_aligned as *const () as usize;
    let cross = evolve_test_text_site_cross as *const () as usize;
    let (before_aligned, before_cross) = (read16(aligned), read16(cross));
    // SAFETY: these jump sites are the test's own, and every target is a function of type F.
    let sites = unsafe {
        [
            PatchSite::register(aligned).unwrap(),
            PatchSite::register(cross + 5).unwrap(),
        ]
    };
    let entries: [F; 2] = [evolve_test_text_site_aligned, evolve_test_text_site_cross];
    let (calls, rounds) = hammer(&entries, threads(), 20_000, Duration::from_secs(20), |i| {
        let mut batch = Batch::new();
        for s in sites {
            let (from, to) = flip(i, false);
            retarget_in(&mut batch, s, from, to);
        }
        let report = batch.apply().unwrap();
        assert_eq!((report.stored, report.via_int3), (1, 1));
    });
    assert!(
        rounds >= 1000 && calls > rounds as u64,
        "{rounds} rounds, {calls} calls"
    );
    if !rounds.is_multiple_of(2) {
        assert!(entries.iter().all(|f| f() == 2));
    }
    for s in sites {
        s.restore().unwrap();
    }
    assert_eq!(read16(aligned), before_aligned);
    assert_eq!(read16(cross), before_cross);
    assert!(entries.iter().all(|f| f() == 1));
}

#[test]
fn retarget_then_restore_gives_back_the_original_bytes_exactly() {
    for placement in [Placement::Aligned, Placement::CrossWord] {
        let (thunk, site) = call_thunk(one, placement);
        let original = site_bytes(site);
        retarget(
            site,
            SiteInsn::Call(one as F as usize),
            SiteInsn::Call(two as F as usize),
        )
        .unwrap();
        assert_ne!(site_bytes(site), original);
        assert_eq!(thunk(), 2);
        retarget(site, SiteInsn::Call(two as F as usize), SiteInsn::Nop).unwrap();
        assert_eq!(site_bytes(site), evolve_code::NOP5);
        site.restore().unwrap();
        assert_eq!(site_bytes(site), original);
        assert_eq!(site.current(), site.original());
        assert_eq!(thunk(), 1);
    }
}

#[test]
fn a_target_beyond_rel32_range_is_reached_through_a_springboard() {
    let far = forty_two_near(far_from_executable());
    let site = FnSite::new(one as F).unwrap();
    assert!(evolve_code::inspect::executable().is_ok());
    let boards_before = evolve_code::springboard_count();
    let report = site.retarget(one, far).unwrap();
    assert_eq!(report.via_springboard, 1);
    assert_eq!((site.entry())(), 42);
    // The caller sees the real target, not the springboard.
    assert_eq!(site.site().current(), SiteInsn::Jmp(far as usize));
    assert_eq!(site.target() as usize, far as usize);
    assert!(evolve_code::springboard_count() > boards_before);

    // A call site reaches the same far function through a springboard and returns to its caller.
    let (thunk, call_site) = call_thunk(one, Placement::CrossWord);
    let report = retarget(
        call_site,
        SiteInsn::Call(one as F as usize),
        SiteInsn::Call(far as usize),
    )
    .unwrap();
    assert_eq!(report.via_springboard, 1);
    assert_eq!(thunk(), 42);

    site.retarget(far, one).unwrap();
    assert_eq!((site.entry())(), 1);
    call_site.restore().unwrap();
    assert_eq!(thunk(), 1);
}

#[test]
fn an_unknown_site_is_refused_by_name() {
    let err = PatchSite::lookup(0x1234_5678).unwrap_err();
    assert_eq!(
        err.kind(),
        &ErrorKind::UnknownSite {
            address: 0x1234_5678
        }
    );
    assert!(
        err.to_string()
            .contains("0x12345678 is not a registered patch site"),
        "{err}"
    );
}

#[test]
fn non_code_and_non_site_bytes_cannot_be_registered() {
    let data = Box::leak(Box::new([0xe9u8; 16])).as_ptr() as usize;
    // SAFETY: registration fails before anything could be written.
    let err = unsafe { PatchSite::register(data) }.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::NotExecutable { address: data });

    let code = forty_two_near(one as F as usize) as usize;
    // SAFETY: registration fails: `mov eax, 42` is not a site instruction.
    let err = unsafe { PatchSite::register(code) }.unwrap_err();
    assert_eq!(
        err.kind(),
        &ErrorKind::NotASiteInstruction {
            address: code,
            found: [0xb8, 42, 0, 0, 0]
        }
    );
    assert!(err.to_string().contains("b8 2a 00 00 00"), "{err}");
}

#[test]
fn a_wrong_expectation_is_refused_and_nothing_changes() {
    let site = FnSite::new(one as F).unwrap();
    let bytes = site.site().bytes();
    let err = site.retarget(two, one).unwrap_err();
    assert_eq!(
        err.kind(),
        &ErrorKind::UnexpectedInstruction {
            address: site.site().address(),
            expected: SiteInsn::Jmp(two as F as usize),
            found: SiteInsn::Jmp(one as F as usize),
        }
    );
    assert!(err.to_string().contains("nothing was changed"), "{err}");
    assert_eq!(site.site().bytes(), bytes);
    assert_eq!((site.entry())(), 1);
}

#[test]
fn a_target_outside_executable_memory_is_refused() {
    let site = FnSite::new(one as F).unwrap();
    let data = Box::leak(Box::new(0u64)) as *mut u64 as usize;
    for target in [0, data] {
        let site_handle = PatchSite::lookup(site.site().address()).unwrap();
        let err = retarget(
            site_handle,
            SiteInsn::Jmp(one as F as usize),
            SiteInsn::Jmp(target),
        )
        .unwrap_err();
        assert_eq!(
            err.kind(),
            &ErrorKind::TargetNotExecutable {
                site: site.site().address(),
                target
            }
        );
    }
    assert_eq!((site.entry())(), 1);
}

#[test]
fn a_batch_with_one_bad_edit_changes_no_site() {
    let sites: Vec<FnSite<F>> = (0..4).map(|_| FnSite::new(one as F).unwrap()).collect();
    let before: Vec<_> = sites.iter().map(|s| s.site().bytes()).collect();
    let (good, bad) = (
        SiteInsn::Jmp(one as F as usize),
        SiteInsn::Jmp(two as F as usize),
    );
    let mut batch = Batch::new();
    for (i, s) in sites.iter().enumerate() {
        // The last edit expects `two`, but the site holds `one`.
        let expected = if i == 3 { bad } else { good };
        let handle = PatchSite::lookup(s.site().address()).unwrap();
        retarget_in(&mut batch, handle, expected, bad);
    }
    assert!(batch.apply().is_err());
    let mut duplicate = Batch::new();
    sites[0].retarget_in(&mut duplicate, one, two);
    sites[0].retarget_in(&mut duplicate, one, two);
    let err = duplicate.apply().unwrap_err();
    assert_eq!(
        err.kind(),
        &ErrorKind::DuplicateSite {
            address: sites[0].site().address()
        }
    );
    let after: Vec<_> = sites.iter().map(|s| s.site().bytes()).collect();
    assert_eq!(before, after);
    assert!(sites.iter().all(|s| (s.entry())() == 1));
}

#[test]
fn bytes_changed_behind_the_engines_back_are_detected_and_left_alone() {
    let block = NearBlock::alloc(one as F as usize, 16).unwrap();
    let jmp = |target: usize| {
        let rel = (target as i64 - (block.address() as i64 + 5)) as i32;
        let mut code = vec![0xe9];
        code.extend(rel.to_le_bytes());
        code
    };
    // SAFETY: fresh block; nothing executes it.
    unsafe { block.write(0, &jmp(one as F as usize)).unwrap() };
    // SAFETY: the site is the test's own; targets are functions of type F.
    let site = unsafe { PatchSite::register(block.address()).unwrap() };
    // Someone else rewrites the site without the engine.
    // SAFETY: nothing executes the block.
    unsafe { block.write(0, &jmp(two as F as usize)).unwrap() };
    let tampered = site_bytes(site);
    let err = retarget(site, SiteInsn::Jmp(one as F as usize), SiteInsn::Nop).unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::UnexpectedBytes { found, .. } if *found == tampered));
    assert!(
        err.to_string().contains("behind the engine's back"),
        "{err}"
    );
    assert_eq!(site_bytes(site), tampered);
}
