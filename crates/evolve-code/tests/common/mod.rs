//! Shared fixtures of the engine's integration tests: generated call sites, text sites, and a
//! hammer that calls through sites from many threads while another retargets them; patch
//! objects built as the builder does ([`patch`]).
#![allow(dead_code, unsafe_code)]

pub mod faults;
pub mod patch;
pub mod signals;

use evolve_code::{Batch, NearBlock, PatchSite, Placement, SiteInsn};
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

/// The number of calling threads of the stress tests (`EVOLVE_STRESS_THREADS`, default 4).
pub fn threads() -> usize {
    evolve_testkit::stress_threads()
}

/// A generated function `sub rsp,8; call <target>; add rsp,8; ret` whose `call` is a patch site
/// placed as asked. Returns the function and its site.
pub fn call_thunk(target: F, placement: Placement) -> (F, PatchSite) {
    thunk(target, placement, &[])
}

/// A generated function `sub rsp,8; mov eax,1; call <target>; add rsp,8; ret`: it returns 1
/// when its call site is a NOP, and the target's result otherwise.
pub fn nop_thunk(target: F, placement: Placement) -> (F, PatchSite) {
    thunk(target, placement, &[0xb8, 1, 0, 0, 0])
}

fn thunk(target: F, placement: Placement, before_call: &[u8]) -> (F, PatchSite) {
    let block = NearBlock::alloc(target as usize, 32).unwrap();
    // The call is at entry + 4 + before_call.len(); entry_offset places it across a word
    // boundary (call at 4..9 of a word pair) or inside one word (call at 8..13).
    let call_offset = 4 + before_call.len();
    let in_word = call_offset % 8;
    let entry_offset = match placement {
        Placement::Aligned if in_word <= 3 => 0,
        Placement::Aligned => 8 - in_word,
        Placement::CrossWord if in_word >= 4 => 0,
        Placement::CrossWord => 4 - in_word,
    };
    let entry = block.address() + entry_offset;
    let call = entry + call_offset;
    let aligned = call % 8 + 5 <= 8;
    assert_eq!(aligned, placement == Placement::Aligned, "thunk layout");
    let rel = (target as usize as i64 - (call as i64 + 5)) as i32;
    let mut code = vec![0xcc; 32];
    let body: Vec<u8> = [0x48, 0x83, 0xec, 0x08]
        .into_iter()
        .chain(before_call.iter().copied())
        .chain([0xe8])
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
    retarget: impl FnMut(usize),
) -> (u64, usize) {
    hammer_checked(
        entries,
        threads,
        rounds,
        limit,
        |r| r == 1 || r == 2,
        retarget,
    )
}

/// [`hammer`], with the results a call may return decided by `valid`.
pub fn hammer_checked(
    entries: &[F],
    threads: usize,
    rounds: usize,
    limit: Duration,
    valid: impl Fn(u64) -> bool + Sync,
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
            let (stop, calls, bad, started, valid) = (&stop, &calls, &bad, &started, &valid);
            s.spawn(move || {
                started.fetch_add(1, Ordering::SeqCst);
                let mut n = 0u64;
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let r = entries[i % entries.len()]();
                    if !valid(r) {
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
        "calls returned a wrong result"
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

/// The functions a jump site flips between on round `i`: `(from, to)`.
pub fn flip_fns(i: usize) -> (F, F) {
    if i.is_multiple_of(2) {
        (one, two)
    } else {
        (two, one)
    }
}

/// Adds "change `site` from `from` to `to`" to `batch`, for the tests' own sites.
pub fn retarget_in(batch: &mut Batch, site: PatchSite, from: SiteInsn, to: SiteInsn) {
    // SAFETY: the tests' sites are jumps to, or calls of, functions of type F, and every target
    // they are given is a function of type F (`one`, `two`, a generated F), or a NOP in a thunk
    // that returns a defined value without its call (`nop_thunk`).
    unsafe { batch.retarget(site, from, to) };
}

/// `retarget_in` as a batch of its own.
pub fn retarget(
    site: PatchSite,
    from: SiteInsn,
    to: SiteInsn,
) -> evolve_code::Result<evolve_code::BatchReport> {
    let mut batch = Batch::new();
    retarget_in(&mut batch, site, from, to);
    batch.apply()
}

/// A function `mov eax, 42; ret` placed near `near`.
pub fn forty_two_near(near: usize) -> F {
    let block = NearBlock::alloc(near, 16).unwrap();
    // SAFETY: the block is fresh; nothing executes it yet.
    unsafe { block.write(0, &[0xb8, 42, 0, 0, 0, 0xc3]).unwrap() };
    // SAFETY: the bytes written are a complete function of type F.
    unsafe { std::mem::transmute::<usize, F>(block.address()) }
}

/// An address more than 4 GiB from the executable's code (a large heap block is mmapped).
pub fn far_from_executable() -> usize {
    let far = Box::leak(vec![0u8; 4 << 20].into_boxed_slice()).as_ptr() as usize;
    let exe = one as F as usize;
    assert!(
        far.abs_diff(exe) > 1 << 32,
        "heap {far:#x} is near the executable {exe:#x}"
    );
    far
}

/// CPU time this thread has used, in seconds.
pub fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
