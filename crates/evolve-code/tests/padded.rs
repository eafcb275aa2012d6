//! Padded entries (`patchable_function_entry(7, 5)`, as GCC lays it out): redirected and
//! restored while threads call them directly and through pointers, byte for byte; every layout
//! (plain, after `endbr64`, a gate across an 8-byte word) and every refusal.
#![allow(unsafe_code)]

use evolve_code::{EntryBatch, ErrorKind, ForeignCode, PaddedFunction, WritePath, NOP5, SITE_LEN};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

// Each function returns x + 1. The bytes are spelled out so the assembler cannot change them.
std::arch::global_asm!(
    ".pushsection .text.evolve_test_padded,\"ax\",@progbits",
    // Plain: the slot at 16k, the entry at 16k+5, the gate at 16k+5 (in one 8-byte word).
    ".p2align 4",
    ".byte 0x90, 0x90, 0x90, 0x90, 0x90",
    ".globl evolve_padded_plain",
    "evolve_padded_plain:",
    ".byte 0x90, 0x90",
    "lea eax, [rdi + 1]",
    "ret",
    // -fcf-protection: endbr64 first, the gate at 16k+9.
    ".p2align 4",
    ".byte 0x90, 0x90, 0x90, 0x90, 0x90",
    ".globl evolve_padded_endbr",
    "evolve_padded_endbr:",
    ".byte 0xf3, 0x0f, 0x1e, 0xfa",
    ".byte 0x90, 0x90",
    "lea eax, [rdi + 1]",
    "ret",
    // Unaligned: the slot at 16k+2, the gate at 16k+7..16k+9, across a word (int3 protocol).
    ".p2align 4",
    ".byte 0xcc, 0xcc",
    ".byte 0x90, 0x90, 0x90, 0x90, 0x90",
    ".globl evolve_padded_straddle",
    "evolve_padded_straddle:",
    ".byte 0x90, 0x90",
    "lea eax, [rdi + 1]",
    "ret",
    // Direct callers: one `call rel32` and one tail `jmp rel32` (Rust calls extern functions
    // through the GOT; C compilers emit these), sized so the branch index decodes them.
    ".p2align 4",
    ".globl evolve_padded_call_plain",
    ".type evolve_padded_call_plain, @function",
    "evolve_padded_call_plain:",
    "sub rsp, 8",
    "call evolve_padded_plain",
    "add rsp, 8",
    "ret",
    ".size evolve_padded_call_plain, . - evolve_padded_call_plain",
    ".p2align 4",
    ".globl evolve_padded_tail_endbr",
    ".type evolve_padded_tail_endbr, @function",
    "evolve_padded_tail_endbr:",
    "jmp evolve_padded_endbr",
    ".size evolve_padded_tail_endbr, . - evolve_padded_tail_endbr",
    // Refused: no gate (a function built without the padding).
    ".p2align 4",
    ".byte 0x90, 0x90, 0x90, 0x90, 0x90",
    ".globl evolve_padded_missing_gate",
    "evolve_padded_missing_gate:",
    "lea eax, [rdi + 1]",
    "ret",
    // Refused: a gate, but no slot before it.
    ".p2align 4",
    ".byte 0xcc, 0xcc, 0xcc, 0xcc, 0xcc",
    ".globl evolve_padded_missing_slot",
    "evolve_padded_missing_slot:",
    ".byte 0x90, 0x90",
    "lea eax, [rdi + 1]",
    "ret",
    ".popsection",
);

// SAFETY: complete functions (above) of type `extern "C" fn(u32) -> u32`.
unsafe extern "C" {
    safe fn evolve_padded_plain(x: u32) -> u32;
    safe fn evolve_padded_endbr(x: u32) -> u32;
    safe fn evolve_padded_straddle(x: u32) -> u32;
    safe fn evolve_padded_missing_gate(x: u32) -> u32;
    safe fn evolve_padded_missing_slot(x: u32) -> u32;
    safe fn evolve_padded_call_plain(x: u32) -> u32;
    safe fn evolve_padded_tail_endbr(x: u32) -> u32;
}

type F = extern "C" fn(u32) -> u32;

#[inline(never)]
extern "C" fn plus_ten(x: u32) -> u32 {
    black_box(x) + 10
}

#[inline(never)]
extern "C" fn plus_hundred(x: u32) -> u32 {
    black_box(x) + 100
}

/// The tests share functions and the default write path: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The identity of `extern "C" fn(u32) -> u32` in these tests.
const IDENTITY: u64 = 0x7533_3232;

fn code(f: F) -> ForeignCode {
    // SAFETY: every function of this test of type F is called as F.
    unsafe { ForeignCode::new(f as usize, IDENTITY) }
}

fn read(address: usize, len: usize) -> Vec<u8> {
    (0..len)
        // SAFETY: the test reads its own mapped code.
        .map(|i| unsafe { std::ptr::read_volatile((address + i) as *const u8) })
        .collect()
}

fn threads() -> usize {
    std::env::var("EVOLVE_STRESS_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

/// Threads call `f` directly (call sites the engine retargets) and through a pointer (the
/// gate) while the main thread redirects it to two targets and restores it, `rounds` times;
/// every call must return x+1, x+10 or x+100. Afterwards the function's bytes are the
/// original ones and its slot a 5-byte NOP.
fn hammer(f: F, direct: fn(u32) -> u32, rounds: usize) {
    let entry = f as usize;
    let before = read(entry, 16);
    // SAFETY: `f` has the padding of patchable_function_entry(7, 5) (global_asm above).
    let padded = unsafe { PaddedFunction::declare(code(f)) };
    padded.prepare().unwrap();
    assert_eq!(
        read(entry - SITE_LEN, SITE_LEN),
        NOP5,
        "the slot is one 5-byte NOP"
    );
    let stop = AtomicBool::new(false);
    let wrong = AtomicU64::new(0);
    let calls = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    std::thread::scope(|s| {
        for t in 0..threads() {
            let (stop, wrong, calls) = (&stop, &wrong, &calls);
            s.spawn(move || {
                let through_pointer: F = black_box(f);
                let mut x = t as u32;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = x.wrapping_add(1) & 0xffff;
                    for r in [direct(x), through_pointer(x)] {
                        if ![x + 1, x + 10, x + 100].contains(&r) {
                            wrong.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    n += 2;
                }
                calls.fetch_add(n, Ordering::Relaxed);
            });
        }
        for i in 0..rounds {
            if Instant::now() > deadline {
                break;
            }
            let to = if i % 2 == 0 { plus_ten } else { plus_hundred };
            padded.redirect(code(to)).unwrap();
            assert_eq!(padded.target(), Some(to as usize));
            if i % 3 == 0 {
                // Retarget while redirected (the slot changes, the gate stays open).
                padded.redirect(code(plus_hundred)).unwrap();
            }
            padded.restore().unwrap();
            assert_eq!(padded.target(), None);
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(wrong.load(Ordering::Relaxed), 0, "wrong results");
    assert!(calls.load(Ordering::Relaxed) > 0);
    assert_eq!(read(entry, 16), before, "the function's bytes are back");
    assert_eq!(read(entry - SITE_LEN, SITE_LEN), NOP5);
}

fn call_plain(x: u32) -> u32 {
    evolve_padded_call_plain(x)
}
fn call_endbr(x: u32) -> u32 {
    evolve_padded_tail_endbr(x)
}
#[inline(never)]
fn call_straddle(x: u32) -> u32 {
    evolve_padded_straddle(black_box(x))
}

#[test]
fn plain_layout_redirects_under_threads_and_restores_byte_for_byte() {
    let _serial = serial();
    hammer(evolve_padded_plain, call_plain, 2000);
    // SAFETY: as in `hammer`.
    let padded = unsafe { PaddedFunction::declare(code(evolve_padded_plain)) };
    assert_eq!(
        padded.call_sites(),
        Some(1),
        "the call in evolve_padded_call_plain"
    );
}

#[test]
fn endbr64_layout_redirects_under_threads() {
    let _serial = serial();
    hammer(evolve_padded_endbr, call_endbr, 2000);
    // SAFETY: as in `hammer`.
    let padded = unsafe { PaddedFunction::declare(code(evolve_padded_endbr)) };
    assert_eq!(
        padded.call_sites(),
        Some(1),
        "the tail jump in evolve_padded_tail_endbr"
    );
}

#[test]
fn a_gate_across_a_word_is_written_through_the_int3_protocol() {
    let _serial = serial();
    // SAFETY: as in `hammer`.
    let padded = unsafe { PaddedFunction::declare(code(evolve_padded_straddle)) };
    let report = padded.redirect(code(plus_ten)).unwrap();
    assert!(report.via_int3 >= 1, "{report:?}");
    padded.restore().unwrap();
    hammer(evolve_padded_straddle, call_straddle, 1000);
}

#[test]
fn the_int3_path_for_every_gate_and_slot() {
    let _serial = serial();
    evolve_code::write::set_default_write_path(WritePath::Int3);
    hammer(evolve_padded_endbr, call_endbr, 500);
    evolve_code::write::set_default_write_path(WritePath::Auto);
}

#[test]
fn refusals_name_the_cause_and_change_nothing() {
    let _serial = serial();
    for (f, why) in [
        (evolve_padded_missing_gate as F, "two one-byte NOPs"),
        (
            evolve_padded_missing_slot as F,
            "five bytes before its entry",
        ),
    ] {
        let before = read(f as usize - SITE_LEN, 16);
        // SAFETY: these are code; preparing them must be refused without a write.
        let e = unsafe { PaddedFunction::declare(code(f)) }
            .prepare()
            .unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::NotPadded { .. }), "{e}");
        assert!(e.to_string().contains(why), "{e}");
        assert_eq!(read(f as usize - SITE_LEN, 16), before);
        assert_eq!(f(1), 2);
    }

    // SAFETY: as in `hammer`.
    let padded = unsafe { PaddedFunction::declare(code(evolve_padded_plain)) };
    padded.prepare().unwrap();
    // Another signature identity: for the target, and for the function prepared again.
    // SAFETY: only the identity differs, which is what is tested.
    let other = unsafe { ForeignCode::new(plus_ten as *const () as usize, IDENTITY + 1) };
    let e = padded.redirect(other).unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::SignatureMismatch { .. }),
        "{e}"
    );
    // SAFETY: as above.
    let again = unsafe {
        PaddedFunction::declare(ForeignCode::new(
            evolve_padded_plain as *const () as usize,
            9,
        ))
    };
    assert!(matches!(
        again.prepare().unwrap_err().kind(),
        ErrorKind::SignatureMismatch { .. }
    ));
    // A target that is not code.
    static DATA: [u8; 16] = [0; 16];
    // SAFETY: never called: the engine must refuse it first.
    let data = unsafe { ForeignCode::new(DATA.as_ptr() as usize, IDENTITY) };
    let e = padded.redirect(data).unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::TargetNotExecutable { .. }),
        "{e}"
    );
    // The same function twice in one batch.
    let mut edits = EntryBatch::new();
    padded.redirect_in(&mut edits, code(plus_ten)).unwrap();
    padded.restore_in(&mut edits);
    let e = edits.apply().unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::DuplicateSite { .. }), "{e}");
    assert_eq!(padded.target(), None);
    assert_eq!(evolve_padded_plain(1), 2);
}
