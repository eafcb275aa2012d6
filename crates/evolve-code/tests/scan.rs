//! The reference scan: what it must see (pointers in any register of a stopped thread, vector
//! registers included) and what it must survive (memory that cannot be read).
#![allow(unsafe_code)]

use evolve_code::scan::{scan_for_references, Scope};
use evolve_code::Hidden;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A range no memory of the process points into: its addresses exist only as `TARGET ^ MASK`
/// until a thread computes one in a register.
const TARGET: usize = 0x7e5a_1234_0000;
const MASK: usize = 0x5a5a_0000_0000_0000;
const TIMEOUT: Duration = Duration::from_secs(5);

/// The 8 bytes at `TARGET + offset` (each test its own, as tests run in parallel).
fn referenced(offset: usize) -> Vec<String> {
    let targets = [(
        Hidden::new(TARGET + offset),
        Hidden::new(TARGET + offset + 8),
    )];
    scan_for_references(&targets, Scope::Stacks, TIMEOUT, &|_, _| false)
        .expect("the scan runs")
        .references
}

/// Holds `TARGET + 0x10` only in xmm7 (low lane) until `release` is set.
fn hold_in_xmm(release: &AtomicBool, ready: &AtomicBool) {
    // SAFETY: only registers declared as clobbered are written; the flags are live atomics.
    unsafe {
        std::arch::asm!(
            "xor {v}, {m}",
            "movq xmm7, {v}",
            "xor {v}, {v}",
            "mov byte ptr [{ready}], 1",
            "2:",
            "pause",
            "cmp byte ptr [{release}], 0",
            "je 2b",
            "pxor xmm7, xmm7",
            v = inout(reg) (TARGET + 0x10) ^ MASK => _,
            m = in(reg) MASK,
            ready = in(reg) ready.as_ptr(),
            release = in(reg) release.as_ptr(),
            out("xmm7") _,
        );
    }
}

/// Holds `TARGET + 0x20` only in the upper half of ymm7 until `release` is set.
#[target_feature(enable = "avx")]
unsafe fn hold_in_ymm_upper_half(release: &AtomicBool, ready: &AtomicBool) {
    // SAFETY: only registers declared as clobbered are written; the flags are live atomics.
    unsafe {
        std::arch::asm!(
            "xor {v}, {m}",
            "vmovq xmm6, {v}",
            "xor {v}, {v}",
            "vpxor xmm7, xmm7, xmm7",
            "vinsertf128 ymm7, ymm7, xmm6, 1",
            "vpxor xmm6, xmm6, xmm6",
            "mov byte ptr [{ready}], 1",
            "2:",
            "pause",
            "cmp byte ptr [{release}], 0",
            "je 2b",
            "vpxor xmm7, xmm7, xmm7",
            v = inout(reg) (TARGET + 0x20) ^ MASK => _,
            m = in(reg) MASK,
            ready = in(reg) ready.as_ptr(),
            release = in(reg) release.as_ptr(),
            out("xmm6") _,
            out("xmm7") _,
        );
    }
}

/// The references found while a thread holds the pointer at `offset`, and after it let go.
fn held_while_scanning(
    offset: usize,
    hold: fn(&AtomicBool, &AtomicBool),
) -> (Vec<String>, Vec<String>) {
    let (release, ready) = (AtomicBool::new(false), AtomicBool::new(false));
    let during = std::thread::scope(|s| {
        s.spawn(|| hold(&release, &ready));
        while !ready.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        let during = referenced(offset);
        release.store(true, Ordering::SeqCst);
        during
    });
    (during, referenced(offset))
}

#[test]
fn a_pointer_held_only_in_an_xmm_register_keeps_the_range_referenced() {
    let (during, after) = held_while_scanning(0x10, hold_in_xmm);
    assert!(!during.is_empty(), "the pointer in xmm7 was not seen");
    assert!(during.iter().any(|r| r.contains("xmm")), "{during:?}");
    assert!(after.is_empty(), "{after:?}");
}

#[test]
fn a_pointer_held_only_in_a_ymm_upper_half_keeps_the_range_referenced() {
    if !std::arch::is_x86_feature_detected!("avx") {
        eprintln!("skipped: no AVX on this machine");
        return;
    }
    fn hold(release: &AtomicBool, ready: &AtomicBool) {
        // SAFETY: AVX was detected above.
        unsafe { hold_in_ymm_upper_half(release, ready) }
    }
    let (during, after) = held_while_scanning(0x20, hold);
    assert!(
        !during.is_empty(),
        "the pointer in ymm7's upper half was not seen"
    );
    assert!(during.iter().any(|r| r.contains("ymm")), "{during:?}");
    assert!(after.is_empty(), "{after:?}");
}
