//! Shared fixtures of the engine's integration tests: generated call sites, text sites, and a
//! hammer that calls through sites from many threads while another retargets them; patch
//! objects built as the builder does ([`patch`]).
#![allow(dead_code, unsafe_code)]

pub mod patch;

use evolve_code::{NearBlock, PatchSite, Placement, SiteInsn};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub type F = extern "C" fn() -> u64;

// `inline(never)`: otherwise release builds may copy these small functions into every codegen
// unit, and `one as F` would not always give the same address.
#[inline(never)]
pub extern "C" fn one() -> u64 {
    std::hint::black_box(1)
}
#[inline(never)]
pub extern "C" fn two() -> u64 {
    std::hint::black_box(2)
}

/// A generated function `sub rsp,8; call <target>; add rsp,8; ret` whose `call` is a patch site
/// placed as asked. Returns the function and its site.
pub fn call_thunk(target: F, placement: Placement) -> (F, PatchSite) {
    let block = NearBlock::alloc(target as usize, 32).unwrap();
    // The call is at entry + 4. Aligned: entry at 4, call at 8..13. CrossWord: entry 0, call 4..9.
    let entry_offset = match placement {
        Placement::Aligned => 4,
        Placement::CrossWord => 0,
    };
    let entry = block.address() + entry_offset;
    let call = entry + 4;
    let rel = (target as usize as i64 - (call as i64 + 5)) as i32;
    let mut code = vec![0xcc; 32];
    let body: Vec<u8> = [0x48, 0x83, 0xec, 0x08, 0xe8]
        .into_iter()
        .chain(rel.to_le_bytes())
        .chain([0x48, 0x83, 0xc4, 0x08, 0xc3])
        .collect();
    code[entry_offset..entry_offset + body.len()].copy_from_slice(&body);
    // SAFETY: the block is fresh and not yet executed.
    unsafe { block.write(0, &code).unwrap() };
    // SAFETY: the call site is ours; its targets are always functions of type F, which take no
    // arguments, so the extra stack slot of the thunk does not matter.
    let site = unsafe { PatchSite::register(call).unwrap() };
    // The block is never freed: the thunk lives as long as the test process.
    let _ = block;
    // SAFETY: the thunk is a complete function of type F.
    let f: F = unsafe { std::mem::transmute::<usize, F>(entry) };
    (f, site)
}

/// Calls every function of `entries` from `threads` threads in tight loops while `retarget` runs
/// on this thread `rounds` times (bounded by `limit`). Every call must return 1 or 2. Returns
/// (calls made while retargeting, rounds done).
pub fn hammer(
    entries: &[F],
    threads: usize,
    rounds: usize,
    limit: Duration,
    mut retarget: impl FnMut(usize),
) -> (u64, usize) {
    let stop = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    let bad = AtomicU64::new(0);
    let started = AtomicU64::new(0);
    let mut done = 0;
    // Stops the callers even if `retarget` panics, so the scope can join them.
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        let _stop_guard = StopOnDrop(&stop);
        for t in 0..threads {
            let (stop, calls, bad, started) = (&stop, &calls, &bad, &started);
            s.spawn(move || {
                started.fetch_add(1, Ordering::SeqCst);
                let mut n = 0u64;
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let r = entries[i % entries.len()]();
                    if r != 1 && r != 2 {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                    i = i.wrapping_add(1);
                    n += 1;
                }
                calls.fetch_add(n, Ordering::Relaxed);
            });
        }
        while started.load(Ordering::SeqCst) < threads as u64 {
            std::thread::yield_now();
        }
        let deadline = Instant::now() + limit;
        while done < rounds && Instant::now() < deadline {
            retarget(done);
            done += 1;
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "calls returned neither 1 nor 2"
    );
    (calls.load(Ordering::Relaxed), done)
}

/// The instruction that flips a jump site between `one` and `two` on round `i`.
pub fn flip(i: usize, call: bool) -> (SiteInsn, SiteInsn) {
    let (from, to) = if i.is_multiple_of(2) {
        (one as F as usize, two as F as usize)
    } else {
        (two as F as usize, one as F as usize)
    };
    if call {
        (SiteInsn::Call(from), SiteInsn::Call(to))
    } else {
        (SiteInsn::Jmp(from), SiteInsn::Jmp(to))
    }
}
