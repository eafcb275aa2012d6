//! Stress: 100 plain functions of another crate (`evolve-plain`) redirected to replacements
//! loaded from patch objects, their references retargeted, and everything restored, 1000
//! times, while `EVOLVE_STRESS_THREADS` threads call them through the GOT, function pointers
//! and the other crate's own calls. Every result must be the old or a new version's.
#![allow(unsafe_code)]

mod common;

use common::patch::{mangled, remove_scratch, rust_object, threads, with_manifest};
use evolve_code::loader::{LoadedPatch, ProgramResolver};
use evolve_code::redirect::{self, Function, Redirect, References, Retarget};
use evolve_code::{Batch, ErrorKind};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Functions redirected.
const N: usize = 100;
/// Rounds of redirect, retarget, restore.
const ROUNDS: usize = 1000;
/// Every this many rounds the functions go on to a third version before coming back.
const THIRD_EVERY: usize = 10;

/// Calls `evolve_plain::v1::f<k>` through this binary's GOT.
#[inline(never)]
fn through_got(k: usize, x: u64) -> u64 {
    match k {
        0 => evolve_plain::v1::f0(x),
        1 => evolve_plain::v1::f1(x),
        2 => evolve_plain::v1::f2(x),
        3 => evolve_plain::v1::f3(x),
        4 => evolve_plain::v1::f4(x),
        5 => evolve_plain::v1::f5(x),
        6 => evolve_plain::v1::f6(x),
        7 => evolve_plain::v1::f7(x),
        8 => evolve_plain::v1::f8(x),
        9 => evolve_plain::v1::f9(x),
        10 => evolve_plain::v1::f10(x),
        11 => evolve_plain::v1::f11(x),
        12 => evolve_plain::v1::f12(x),
        13 => evolve_plain::v1::f13(x),
        14 => evolve_plain::v1::f14(x),
        15 => evolve_plain::v1::f15(x),
        16 => evolve_plain::v1::f16(x),
        17 => evolve_plain::v1::f17(x),
        18 => evolve_plain::v1::f18(x),
        19 => evolve_plain::v1::f19(x),
        20 => evolve_plain::v1::f20(x),
        21 => evolve_plain::v1::f21(x),
        22 => evolve_plain::v1::f22(x),
        23 => evolve_plain::v1::f23(x),
        24 => evolve_plain::v1::f24(x),
        25 => evolve_plain::v1::f25(x),
        26 => evolve_plain::v1::f26(x),
        27 => evolve_plain::v1::f27(x),
        28 => evolve_plain::v1::f28(x),
        29 => evolve_plain::v1::f29(x),
        30 => evolve_plain::v1::f30(x),
        31 => evolve_plain::v1::f31(x),
        32 => evolve_plain::v1::f32(x),
        33 => evolve_plain::v1::f33(x),
        34 => evolve_plain::v1::f34(x),
        35 => evolve_plain::v1::f35(x),
        36 => evolve_plain::v1::f36(x),
        37 => evolve_plain::v1::f37(x),
        38 => evolve_plain::v1::f38(x),
        39 => evolve_plain::v1::f39(x),
        40 => evolve_plain::v1::f40(x),
        41 => evolve_plain::v1::f41(x),
        42 => evolve_plain::v1::f42(x),
        43 => evolve_plain::v1::f43(x),
        44 => evolve_plain::v1::f44(x),
        45 => evolve_plain::v1::f45(x),
        46 => evolve_plain::v1::f46(x),
        47 => evolve_plain::v1::f47(x),
        48 => evolve_plain::v1::f48(x),
        49 => evolve_plain::v1::f49(x),
        50 => evolve_plain::v1::f50(x),
        51 => evolve_plain::v1::f51(x),
        52 => evolve_plain::v1::f52(x),
        53 => evolve_plain::v1::f53(x),
        54 => evolve_plain::v1::f54(x),
        55 => evolve_plain::v1::f55(x),
        56 => evolve_plain::v1::f56(x),
        57 => evolve_plain::v1::f57(x),
        58 => evolve_plain::v1::f58(x),
        59 => evolve_plain::v1::f59(x),
        60 => evolve_plain::v1::f60(x),
        61 => evolve_plain::v1::f61(x),
        62 => evolve_plain::v1::f62(x),
        63 => evolve_plain::v1::f63(x),
        64 => evolve_plain::v1::f64(x),
        65 => evolve_plain::v1::f65(x),
        66 => evolve_plain::v1::f66(x),
        67 => evolve_plain::v1::f67(x),
        68 => evolve_plain::v1::f68(x),
        69 => evolve_plain::v1::f69(x),
        70 => evolve_plain::v1::f70(x),
        71 => evolve_plain::v1::f71(x),
        72 => evolve_plain::v1::f72(x),
        73 => evolve_plain::v1::f73(x),
        74 => evolve_plain::v1::f74(x),
        75 => evolve_plain::v1::f75(x),
        76 => evolve_plain::v1::f76(x),
        77 => evolve_plain::v1::f77(x),
        78 => evolve_plain::v1::f78(x),
        79 => evolve_plain::v1::f79(x),
        80 => evolve_plain::v1::f80(x),
        81 => evolve_plain::v1::f81(x),
        82 => evolve_plain::v1::f82(x),
        83 => evolve_plain::v1::f83(x),
        84 => evolve_plain::v1::f84(x),
        85 => evolve_plain::v1::f85(x),
        86 => evolve_plain::v1::f86(x),
        87 => evolve_plain::v1::f87(x),
        88 => evolve_plain::v1::f88(x),
        89 => evolve_plain::v1::f89(x),
        90 => evolve_plain::v1::f90(x),
        91 => evolve_plain::v1::f91(x),
        92 => evolve_plain::v1::f92(x),
        93 => evolve_plain::v1::f93(x),
        94 => evolve_plain::v1::f94(x),
        95 => evolve_plain::v1::f95(x),
        96 => evolve_plain::v1::f96(x),
        97 => evolve_plain::v1::f97(x),
        98 => evolve_plain::v1::f98(x),
        99 => evolve_plain::v1::f99(x),
        _ => unreachable!(),
    }
}

/// A patch with version `v` of the first `N` functions (`evolve_plain::expected`), and a
/// function calling every one of them (references inside the patch).
fn patch_source(v: u64) -> String {
    let mut s = String::new();
    s.push_str("unsafe extern \"Rust\" {\n");
    s.push_str(&format!(
        "    #[link_name = \"{}\"] fn mix(x: u64, c: u64) -> u64;\n",
        mangled("evolve_plain::mix")
    ));
    for k in 0..N {
        s.push_str(&format!(
            "    #[link_name = \"{}\"] fn f{k}(x: u64) -> u64;\n",
            mangled(&format!("evolve_plain::v1::f{k}"))
        ));
    }
    s.push_str("}\n");
    for k in 0..N as u64 {
        let body = if k % 2 == 0 {
            format!("x.wrapping_mul({}).wrapping_add({})", 2 * k + 1, k * 10 + v)
        } else {
            format!("unsafe {{ mix(x, {}) }}.wrapping_add({k})", k * 10 + v)
        };
        s.push_str(&format!(
            "#[export_name = \"__evolve_new__{}\"]\npub fn f{k}_new(x: u64) -> u64 {{ {body} }}\n",
            mangled(&format!("evolve_plain::v1::f{k}"))
        ));
    }
    s.push_str(&format!(
        "#[no_mangle]\npub fn patch_sum_{v}(x: u64) -> u64 {{\n    let mut s = 0u64;\n"
    ));
    for k in 0..N {
        s.push_str(&format!("    s = s.wrapping_add(unsafe {{ f{k}(x) }});\n"));
    }
    s.push_str("    s\n}\n");
    s
}

fn load(path: &std::path::Path) -> LoadedPatch {
    let resolver = ProgramResolver::new().unwrap();
    // SAFETY: built against this binary from declarations matching `evolve-plain`.
    unsafe { LoadedPatch::load(path, &resolver).unwrap() }
}

fn sum(v: u64, x: u64) -> u64 {
    (0..N).fold(0u64, |s, k| s.wrapping_add(evolve_plain::expected(k, v, x)))
}

#[test]
fn hundred_functions_redirected_and_restored_a_thousand_times_under_calls() {
    let patches: Vec<LoadedPatch> = (2..=3)
        .map(|v| load(&with_manifest(&rust_object(&patch_source(v)))))
        .collect();
    remove_scratch();
    let program: Vec<Function> = (0..N)
        .map(|k| Function::in_executable(&format!("evolve_plain::v1::f{k}")).unwrap())
        .collect();
    let versions: Vec<Vec<Function>> = patches
        .iter()
        .map(|p| {
            program
                .iter()
                .map(|f| Function::replacement(p, f.symbol()).unwrap())
                .collect()
        })
        .collect();
    let sums: Vec<fn(u64) -> u64> = patches
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let address = p.symbol(&format!("patch_sum_{}", i + 2)).unwrap();
            // SAFETY: `patch_sum_<v>` is `fn(u64) -> u64`.
            unsafe { std::mem::transmute::<usize, fn(u64) -> u64>(address) }
        })
        .collect();
    let entries: Vec<Vec<u8>> = program
        .iter()
        .map(|f| {
            (0..f.size())
                // SAFETY: code of this binary.
                .map(|i| unsafe { std::ptr::read_volatile((f.address() + i) as *const u8) })
                .collect()
        })
        .collect();
    let patch_refs: Vec<&LoadedPatch> = patches.iter().collect();

    let stop = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    let wrong: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let (mut rounds, mut stops, mut busy_refusals) = (0, 0, 0);
    let mut longest = Duration::ZERO;
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads() {
            let (stop, calls, wrong) = (&stop, &calls, &wrong);
            s.spawn(move || {
                // Callers run at a lower priority, so that on a small machine the thread that
                // redirects (and must stop them all, over and over) still gets a CPU.
                // SAFETY: setpriority(2) on this thread's own id changes only its nice value.
                unsafe {
                    let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                    libc::setpriority(libc::PRIO_PROCESS, tid, 10);
                }
                let (mut n, mut x, mut k) = (0u64, t as u64, t % N);
                while !stop.load(Ordering::Relaxed) {
                    let results = [
                        ("GOT", through_got(k, x)),
                        ("pointer", (black_box(&evolve_plain::v1::ALL)[k])(x)),
                        ("other crate", evolve_plain::call_direct(k, x)),
                    ];
                    for (path, r) in results {
                        if !(1..=3).any(|v| evolve_plain::expected(k, v, x) == r) {
                            wrong
                                .lock()
                                .unwrap()
                                .push(format!("f{k}({x}) via {path}: {r}"));
                        }
                    }
                    n += 3;
                    x = x.wrapping_add(0x9e37);
                    k = (k + 1) % N;
                }
                calls.fetch_add(n, Ordering::Relaxed);
            });
        }
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(&stop);

        let pairs: Vec<(&Function, &Function)> = program.iter().zip(&versions[0]).collect();
        let third: Vec<(&Function, &Function)> = versions[0].iter().zip(&versions[1]).collect();
        let mut refs: Option<Vec<References>> = None;
        while rounds < ROUNDS {
            let installed = match redirect::install(&pairs) {
                Ok(installed) => installed,
                Err(e) if matches!(e.kind(), ErrorKind::ThreadInside { .. }) => {
                    // A thread kept being preempted inside an entry: refused, nothing changed.
                    busy_refusals += 1;
                    continue;
                }
                Err(e) => panic!("round {rounds}: {e}"),
            };
            stops += installed.stops.stops;
            longest = longest.max(installed.stops.longest);
            // References are found once, on the first round, and reused.
            let refs = refs.get_or_insert_with(|| {
                program
                    .iter()
                    .map(|f| References::find(f, &patch_refs).unwrap())
                    .collect()
            });
            let mut batch = Retarget::new();
            for (i, r) in refs.iter().enumerate() {
                batch.retarget(r, &program[i], &versions[0][i]).unwrap();
            }
            batch.apply().unwrap();
            let mut newest = 2;
            if rounds % THIRD_EVERY == 0 {
                let mut entries = Batch::new();
                for (i, f) in program.iter().enumerate() {
                    Redirect::of(f)
                        .unwrap()
                        .retarget_in(&mut entries, &versions[0][i], &versions[1][i])
                        .unwrap();
                }
                entries.apply().unwrap();
                let older = loop {
                    match redirect::install(&third) {
                        Ok(installed) => break installed,
                        Err(e) if matches!(e.kind(), ErrorKind::ThreadInside { .. }) => {
                            busy_refusals += 1
                        }
                        Err(e) => panic!("round {rounds}: {e}"),
                    }
                };
                stops += older.stops.stops;
                let mut batch = Retarget::new();
                for (i, r) in refs.iter().enumerate() {
                    batch.retarget(r, &versions[0][i], &versions[1][i]).unwrap();
                }
                batch.apply().unwrap();
                newest = 3;
                redirect::remove(&older.redirects).unwrap_or_else(|e| panic!("{e}"));
            }
            for v in [1, 99] {
                assert_eq!(sums[0](v), sum(newest, v), "round {rounds}");
            }
            let mut back = Retarget::new();
            for r in refs.iter() {
                back.restore(r);
            }
            back.apply().unwrap();
            let removed = redirect::remove(&installed.redirects).unwrap();
            stops += removed.stops;
            longest = longest.max(removed.longest);
            assert_eq!(sums[1](7), sum(1, 7), "round {rounds}");
            rounds += 1;
            if rounds % 100 == 0 {
                eprintln!(
                    "{rounds} rounds, {:.1} s, {stops} stops",
                    started.elapsed().as_secs_f64()
                );
            }
        }
    });
    let wrong = wrong.into_inner().unwrap();
    assert!(
        wrong.is_empty(),
        "{} wrong results, first: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    for (f, bytes) in program.iter().zip(&entries) {
        let now: Vec<u8> = (0..f.size())
            // SAFETY: code of this binary.
            .map(|i| unsafe { std::ptr::read_volatile((f.address() + i) as *const u8) })
            .collect();
        assert_eq!(&now, bytes, "{f}");
    }
    let calls = calls.load(Ordering::Relaxed);
    assert!(calls > 0);
    eprintln!(
        "{rounds} rounds of {N} functions, {} threads, {calls} calls checked, {stops} stops \
         (longest {:.3} ms), {busy_refusals} refusals with a thread inside an entry, {:.1} s",
        threads(),
        longest.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64()
    );
}
