//! Entry redirects and reference retargeting on real code: functions of this test binary
//! (called directly, through function pointers and `dyn` vtables) and of another crate
//! (`evolve-plain`, called through the GOT), switched to replacements compiled by `rustc` into
//! patch objects and loaded by Evolve's loader, while `EVOLVE_STRESS_THREADS` threads call them;
//! and every refusal, each leaving every byte as it was.
#![allow(unsafe_code)]

mod common;

use common::patch::{mangled, remove_scratch, rust_object, threads, with_manifest};
use evolve_code::loader::{LoadedPatch, ProgramResolver};
use evolve_code::redirect::{self, Function, Redirect, References, Retarget};
use evolve_code::{Batch, ErrorKind, PatchSite, SiteInsn};
use iced_x86::{Code, Decoder, DecoderOptions};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

// ---- The program's side. ------------------------------------------------------------------

/// Called directly by `call_direct_target`.
#[inline(never)]
fn direct_target(x: u64) -> u64 {
    black_box(x).wrapping_mul(3).wrapping_add(1)
}

#[inline(never)]
fn call_direct_target(x: u64) -> u64 {
    direct_target(black_box(x)).wrapping_add(1000)
}

/// Called through a function pointer only.
#[inline(never)]
fn pointer_target(x: u64) -> u64 {
    black_box(x).wrapping_mul(5).wrapping_add(1)
}

/// Reached through a `dyn Op` vtable.
trait Op: Send + Sync {
    fn apply(&self, x: u64) -> u64;
}

#[repr(C)]
struct Scale {
    k: u64,
}

impl Op for Scale {
    #[inline(never)]
    fn apply(&self, x: u64) -> u64 {
        black_box(x).wrapping_mul(self.k).wrapping_add(1)
    }
}

/// Calls into another crate: through the GOT (`call *f@GOTPCREL(%rip)`).
#[inline(never)]
fn call_plain_f2(x: u64) -> u64 {
    evolve_plain::v1::f2(black_box(x))
}

#[inline(never)]
fn call_plain_f3(x: u64) -> u64 {
    evolve_plain::v1::f3(black_box(x)).wrapping_add(7)
}

/// A function redirected under a probe.
#[inline(never)]
fn probe_target(x: u64) -> u64 {
    black_box(x).wrapping_mul(11).wrapping_add(1)
}

#[inline(never)]
fn call_probe_target(x: u64) -> u64 {
    probe_target(black_box(x)).wrapping_add(1)
}

// Hand-written functions for the refusals (Intel syntax).
std::arch::global_asm!(
    ".pushsection .text.evolve_redirect_fixtures,\"ax\",@progbits",
    // read(fd, buf, len): its `syscall` ends inside the first 5 bytes.
    ".p2align 4, 0xcc",
    ".globl evolve_redirect_blocking_read",
    ".type evolve_redirect_blocking_read,@function",
    "evolve_redirect_blocking_read:",
    "xor eax, eax",
    "syscall",
    "ret",
    ".size evolve_redirect_blocking_read, .-evolve_redirect_blocking_read",
    // One byte, and the next function right after it.
    ".p2align 4, 0xcc",
    ".globl evolve_redirect_tiny",
    ".type evolve_redirect_tiny,@function",
    "evolve_redirect_tiny:",
    "ret",
    ".size evolve_redirect_tiny, 1",
    ".globl evolve_redirect_after_tiny",
    ".type evolve_redirect_after_tiny,@function",
    "evolve_redirect_after_tiny:",
    "mov rax, rdi",
    "ret",
    ".size evolve_redirect_after_tiny, .-evolve_redirect_after_tiny",
    // Four bytes (the identity), then int3 padding up to the next function.
    ".p2align 4, 0xcc",
    ".globl evolve_redirect_padded",
    ".type evolve_redirect_padded,@function",
    "evolve_redirect_padded:",
    "mov rax, rdi",
    "ret",
    ".size evolve_redirect_padded, .-evolve_redirect_padded",
    ".fill 12, 1, 0xcc",
    // The entry is a loop head: counts rdi down, returns rsi.
    ".p2align 4, 0xcc",
    ".globl evolve_redirect_loop_entry",
    ".type evolve_redirect_loop_entry,@function",
    "evolve_redirect_loop_entry:",
    "test rdi, rdi",
    "jz 2f",
    "dec rdi",
    "jmp evolve_redirect_loop_entry",
    "2:",
    "mov rax, rsi",
    "ret",
    ".size evolve_redirect_loop_entry, .-evolve_redirect_loop_entry",
    // A loop head at offset 1, inside the first 5 bytes.
    ".p2align 4, 0xcc",
    ".globl evolve_redirect_branch_inside",
    ".type evolve_redirect_branch_inside,@function",
    "evolve_redirect_branch_inside:",
    "nop",
    "3:",
    "test rdi, rdi",
    "jz 4f",
    "dec rdi",
    "jmp 3b",
    "4:",
    "mov rax, rsi",
    "ret",
    ".size evolve_redirect_branch_inside, .-evolve_redirect_branch_inside",
    ".p2align 4, 0xcc",
    ".popsection",
);

unsafe extern "C" {
    fn evolve_redirect_blocking_read(fd: i32, buf: *mut u8, len: usize) -> isize;
    safe fn evolve_redirect_tiny();
    safe fn evolve_redirect_padded(x: u64) -> u64;
    safe fn evolve_redirect_loop_entry(n: u64, r: u64) -> u64;
    safe fn evolve_redirect_branch_inside(n: u64, r: u64) -> u64;
}

/// Stand-ins with the hand-written functions' signatures.
extern "C" fn never_read(_fd: i32, _buf: *mut u8, _len: usize) -> isize {
    -1
}
#[inline(never)]
extern "C" fn padded_v2(x: u64) -> u64 {
    black_box(x).wrapping_add(100)
}
extern "C" fn nothing() {}
extern "C" fn second(_n: u64, r: u64) -> u64 {
    black_box(r)
}

/// Redirect tests change shared code (the engine's registry, the GOT): one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

struct Serial(#[allow(dead_code)] MutexGuard<'static, ()>);

impl Drop for Serial {
    fn drop(&mut self) {
        remove_scratch();
    }
}

fn serial() -> Serial {
    Serial(SERIAL.lock().unwrap_or_else(|p| p.into_inner()))
}

// ---- Helpers. ------------------------------------------------------------------------------

fn load(path: &std::path::Path) -> LoadedPatch {
    let resolver = ProgramResolver::new().unwrap();
    // SAFETY: the patches of these tests are built against this binary from sources whose
    // declarations match the definitions above.
    unsafe { LoadedPatch::load(path, &resolver).unwrap() }
}

fn read(address: usize, len: usize) -> Vec<u8> {
    (0..len)
        // SAFETY: the callers read code of this binary or of a loaded patch, or GOT words.
        .map(|i| unsafe { std::ptr::read_volatile((address + i) as *const u8) })
        .collect()
}

fn word(address: usize) -> usize {
    // SAFETY: an aligned GOT slot of this binary.
    unsafe { std::ptr::read_volatile(address as *const usize) }
}

/// The branch target of the code reference `site`, decoded with iced-x86 from the whole
/// instruction (`67 e8` starts one byte before the site).
fn branch_target(site: usize) -> (Code, usize) {
    let from = if read(site - 1, 1)[0] == 0x67 {
        site - 1
    } else {
        site
    };
    let bytes = read(from, site + 5 - from);
    let insn = Decoder::with_ip(64, &bytes, from as u64, DecoderOptions::NONE).decode();
    assert_eq!(insn.len(), bytes.len(), "one instruction at {site:#x}");
    (insn.code(), insn.near_branch_target() as usize)
}

/// The `call [rip + disp]` instructions of the function at `f`, as the GOT slots they load.
fn got_calls_in(f: usize) -> Vec<usize> {
    let exe = evolve_code::inspect::executable().unwrap();
    let symbol = exe.function_containing(f).unwrap();
    let code = read(symbol.address, symbol.size);
    Decoder::with_ip(64, &code, symbol.address as u64, DecoderOptions::NONE)
        .into_iter()
        .filter(|i| i.code() == Code::Call_rm64 && i.is_ip_rel_memory_operand())
        .map(|i| i.ip_rel_memory_address() as usize)
        .collect()
}

/// One way into a function: its name, a call, and what version `v` returns for `x`.
struct Path {
    name: &'static str,
    call: Box<dyn Fn(u64) -> u64 + Send + Sync>,
    expected: fn(u64, u64) -> u64,
}

fn plain(k: usize) -> fn(u64, u64) -> u64 {
    match k {
        2 => |v, x| evolve_plain::expected(2, v, x),
        3 => |v, x| evolve_plain::expected(3, v, x).wrapping_add(7),
        _ => unreachable!(),
    }
}

fn paths() -> Vec<Path> {
    let pointer: fn(u64) -> u64 = black_box(pointer_target);
    let op: &'static dyn Op = black_box(&Scale { k: 9 });
    vec![
        Path {
            name: "direct call",
            call: Box::new(call_direct_target),
            expected: |v, x| x.wrapping_mul(3).wrapping_add(v).wrapping_add(1000),
        },
        Path {
            name: "function pointer",
            call: Box::new(move |x| pointer(x)),
            expected: |v, x| x.wrapping_mul(5).wrapping_add(v),
        },
        Path {
            name: "dyn vtable",
            call: Box::new(move |x| op.apply(x)),
            expected: |v, x| x.wrapping_mul(9).wrapping_add(v),
        },
        Path {
            name: "GOT (leaf)",
            call: Box::new(call_plain_f2),
            expected: plain(2),
        },
        Path {
            name: "GOT (calls another)",
            call: Box::new(call_plain_f3),
            expected: plain(3),
        },
    ]
}

/// The program functions the patches replace, by demangled path.
const REPLACED: [&str; 5] = [
    "redirect::direct_target",
    "redirect::pointer_target",
    "<redirect::Scale as redirect::Op>::apply",
    "evolve_plain::v1::f2",
    "evolve_plain::v1::f3",
];

/// A patch carrying version `v` of every function of [`REPLACED`], and functions of its own
/// that call the program's `direct_target` (a call and a tail call: references inside a patch).
fn patch_source(v: u64) -> String {
    let m: Vec<String> = REPLACED.iter().map(|p| mangled(p)).collect();
    format!(
        r#"
#[repr(C)]
pub struct Scale {{ k: u64 }}
unsafe extern "Rust" {{
    #[link_name = "{mix}"] fn mix(x: u64, c: u64) -> u64;
    #[link_name = "{m0}"] fn direct_target(x: u64) -> u64;
}}
#[export_name = "__evolve_new__{m0}"]
pub fn direct_target_new(x: u64) -> u64 {{ std::hint::black_box(x).wrapping_mul(3).wrapping_add({v}) }}
#[export_name = "__evolve_new__{m1}"]
pub fn pointer_target_new(x: u64) -> u64 {{ std::hint::black_box(x).wrapping_mul(5).wrapping_add({v}) }}
#[export_name = "__evolve_new__{m2}"]
pub fn apply_new(this: &Scale, x: u64) -> u64 {{ std::hint::black_box(x).wrapping_mul(this.k).wrapping_add({v}) }}
#[export_name = "__evolve_new__{m3}"]
pub fn f2_new(x: u64) -> u64 {{ x.wrapping_mul(5).wrapping_add(2 * 10 + {v}) }}
#[export_name = "__evolve_new__{m4}"]
pub fn f3_new(x: u64) -> u64 {{ unsafe {{ mix(x, 3 * 10 + {v}) }}.wrapping_add(3) }}
#[no_mangle]
pub fn patch_calls_direct_target_{v}(x: u64) -> u64 {{ unsafe {{ direct_target(x) }}.wrapping_add(1) }}
#[no_mangle]
pub fn patch_tail_calls_direct_target_{v}(x: u64) -> u64 {{ unsafe {{ direct_target(x) }} }}
"#,
        mix = mangled("evolve_plain::mix"),
        m0 = m[0],
        m1 = m[1],
        m2 = m[2],
        m3 = m[3],
        m4 = m[4],
    )
}

/// Calls every path from `threads()` threads until `body` returns; every result must be one
/// of the versions `1..=max_version`. Returns the calls made.
fn while_called(paths: &[Path], max_version: u64, body: impl FnOnce()) -> u64 {
    let stop = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    let wrong: Mutex<Vec<String>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..threads() {
            let (stop, calls, wrong) = (&stop, &calls, &wrong);
            s.spawn(move || {
                let mut n = 0u64;
                let mut x = t as u64;
                while !stop.load(Ordering::Relaxed) {
                    for p in paths {
                        let r = (p.call)(x);
                        if !(1..=max_version).any(|v| (p.expected)(v, x) == r) {
                            wrong
                                .lock()
                                .unwrap()
                                .push(format!("{}({x}) returned {r}", p.name));
                        }
                        n += 1;
                    }
                    x = x.wrapping_add(7919);
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
        body();
    });
    let wrong = wrong.into_inner().unwrap();
    assert!(
        wrong.is_empty(),
        "wrong results: {:?}",
        &wrong[..wrong.len().min(10)]
    );
    calls.load(Ordering::Relaxed)
}

/// Checks that every path returns version `v` (from this thread).
fn all_return(paths: &[Path], v: u64) {
    for p in paths {
        for x in [0, 1, 99, 123_456_789] {
            assert_eq!(
                (p.call)(x),
                (p.expected)(v, x),
                "{} should run version {v}",
                p.name
            );
        }
    }
}

/// Bytes of everything a redirect may change: the entries, every code reference, GOT slots.
fn snapshot(functions: &[Function], refs: &[References]) -> Vec<(usize, Vec<u8>)> {
    let mut out: Vec<(usize, Vec<u8>)> = functions
        .iter()
        .map(|f| (f.address(), read(f.address(), f.size().max(5))))
        .collect();
    for r in refs {
        out.extend(
            r.code_sites()
                .iter()
                .map(|s| (s.address(), read(s.address(), 5))),
        );
        out.extend(r.got_slots().iter().map(|&s| (s, read(s, 8))));
    }
    out
}

fn assert_unchanged(before: &[(usize, Vec<u8>)]) {
    for (address, bytes) in before {
        assert_eq!(
            read(*address, bytes.len()),
            *bytes,
            "bytes at {address:#x} changed"
        );
    }
}

/// Every code reference calls or jumps to `to` directly, and every GOT slot holds it.
fn assert_references_reach(refs: &References, to: &Function) {
    for site in refs.code_sites() {
        let (code, target) = branch_target(site.address());
        assert!(
            matches!(code, Code::Call_rel32_64 | Code::Jmp_rel32_64),
            "{code:?} at {:#x}",
            site.address()
        );
        assert_eq!(
            target,
            to.address(),
            "reference {:#x} of {}",
            site.address(),
            refs.name()
        );
    }
    for slot in refs.got_slots() {
        assert_eq!(
            word(slot),
            to.address(),
            "GOT slot {slot:#x} of {}",
            refs.name()
        );
    }
}

// ---- Tests. --------------------------------------------------------------------------------

#[test]
fn every_path_runs_each_version_in_turn_and_the_bytes_come_back_exactly() {
    let _serial = serial();
    let paths = paths();
    all_return(&paths, 1);
    let patches: Vec<LoadedPatch> = (2..=4)
        .map(|v| load(&with_manifest(&rust_object(&patch_source(v)))))
        .collect();
    let program: Vec<Function> = REPLACED
        .iter()
        .map(|p| Function::in_executable(p).unwrap())
        .collect();
    // versions[v - 2][i]: version v of function i.
    let versions: Vec<Vec<Function>> = patches
        .iter()
        .map(|patch| {
            program
                .iter()
                .map(|f| Function::replacement(patch, f.symbol()).unwrap())
                .collect()
        })
        .collect();
    // Each patch's own calls of `direct_target`: (function, what it adds to its result).
    let patch_callers: Vec<(fn(u64) -> u64, u64)> = patches
        .iter()
        .enumerate()
        .flat_map(|(i, patch)| {
            let v = i + 2;
            [
                (format!("patch_calls_direct_target_{v}"), 1),
                (format!("patch_tail_calls_direct_target_{v}"), 0),
            ]
            .map(|(name, add)| {
                let address = patch.symbol(&name).unwrap();
                // SAFETY: these patch functions are `fn(u64) -> u64`.
                let f = unsafe { std::mem::transmute::<usize, fn(u64) -> u64>(address) };
                (f, add)
            })
        })
        .collect();
    let callers_run = |v: u64| {
        for (f, add) in &patch_callers {
            assert_eq!(f(5), direct_target_version(v, 5) + add);
        }
    };
    callers_run(1);
    let original_bytes = snapshot(&program, &[]);
    let got_before: Vec<usize> = got_calls_in(call_plain_f2 as fn(u64) -> u64 as usize);

    let calls = while_called(&paths, 4, || {
        // Version 2: entries first, then every reference.
        let pairs: Vec<(&Function, &Function)> = program.iter().zip(&versions[0]).collect();
        let installed = redirect::install(&pairs).unwrap();
        assert!(installed.stops.stops >= 1);
        let refs: Vec<References> = program
            .iter()
            .map(|f| References::find(f, &patches.iter().collect::<Vec<_>>()).unwrap())
            .collect();
        let direct = &refs[0];
        assert!(
            direct.code_sites().len() >= 1 + 2 * patches.len(),
            "call_direct_target's call and each patch's call and tail call of direct_target: \
             {} sites",
            direct.code_sites().len()
        );
        assert!(
            !refs[3].got_slots().is_empty() && !refs[4].got_slots().is_empty(),
            "calls into evolve-plain go through the GOT"
        );
        assert!(refs[3].got_slots().iter().all(|s| got_before.contains(s)));
        let mut batch = Retarget::new();
        for (i, r) in refs.iter().enumerate() {
            batch.retarget(r, &program[i], &versions[0][i]).unwrap();
        }
        let report = batch.apply().unwrap();
        assert!(report.slots >= 2 && report.code.changed >= 7, "{report:?}");
        for (i, r) in refs.iter().enumerate() {
            assert_references_reach(r, &versions[0][i]);
        }
        all_return(&paths, 2);
        callers_run(2);

        // Version 3, then 4: the program's entries retargeted (no stop), the older version's
        // entries redirected to the newest, the references moved on.
        for step in 1..=2 {
            let (older, newer) = (&versions[step - 1], &versions[step]);
            let mut entries = Batch::new();
            for (i, f) in program.iter().enumerate() {
                Redirect::of(f)
                    .unwrap()
                    .retarget_in(&mut entries, &older[i], &newer[i])
                    .unwrap();
            }
            for prior in &versions[..step - 1] {
                for (i, f) in prior.iter().enumerate() {
                    Redirect::of(f)
                        .unwrap()
                        .retarget_in(&mut entries, &older[i], &newer[i])
                        .unwrap();
                }
            }
            entries.apply().unwrap();
            let pairs: Vec<(&Function, &Function)> = older.iter().zip(newer).collect();
            redirect::install(&pairs).unwrap();
            let mut batch = Retarget::new();
            for (i, r) in refs.iter().enumerate() {
                batch.retarget(r, &older[i], &newer[i]).unwrap();
            }
            batch.apply().unwrap();
            for (i, r) in refs.iter().enumerate() {
                assert_references_reach(r, &newer[i]);
            }
            all_return(&paths, step as u64 + 2);
            callers_run(step as u64 + 2);
            // An older version reached through its own entry runs the newest too.
            for (i, older_f) in versions[0].iter().enumerate() {
                assert_eq!(
                    Redirect::of(older_f).unwrap().target().unwrap(),
                    newer[i].address()
                );
            }
        }

        // Back to the program's code: references first, then every redirect.
        let mut batch = Retarget::new();
        for r in &refs {
            batch.restore(r);
        }
        batch.apply().unwrap();
        let mut all: Vec<Redirect> = Vec::new();
        for f in program.iter().chain(&versions[0]).chain(&versions[1]) {
            all.push(Redirect::of(f).unwrap());
        }
        redirect::remove(&all).unwrap();
        assert!(program.iter().all(|f| Redirect::of(f).is_none()));
        all_return(&paths, 1);
        callers_run(1);
        assert_unchanged(&original_bytes);
        for r in &refs {
            for site in r.code_sites() {
                assert_eq!(site.current(), site.original());
            }
            for slot in r.got_slots() {
                assert_eq!(word(slot), r.function());
            }
        }
    });
    assert!(calls > 0);
    assert_eq!(
        got_calls_in(call_plain_f2 as fn(u64) -> u64 as usize),
        got_before
    );
}

/// What `direct_target`'s version `v` returns.
fn direct_target_version(v: u64, x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(v)
}
