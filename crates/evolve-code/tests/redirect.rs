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
use evolve_code::{Batch, Counter, Detour, DetourHooks, Error, ErrorKind, SiteInsn};
use iced_x86::{Code, Decoder, DecoderOptions};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
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

/// Keeps `evolve-plain`'s own direct callers (a `call rel32` of every function) linked in.
#[used]
static KEEP: fn(u64) -> u64 = evolve_plain::sum_direct;

/// A function redirected under a probe, and its versions (in this binary: a typed redirect).
#[inline(never)]
fn probe_target(x: u64) -> u64 {
    black_box(x).wrapping_mul(11).wrapping_add(1)
}

#[inline(never)]
fn probe_target_v2(x: u64) -> u64 {
    black_box(x).wrapping_mul(11).wrapping_add(2)
}

#[inline(never)]
fn probe_target_v3(x: u64) -> u64 {
    black_box(x).wrapping_mul(11).wrapping_add(3)
}

/// Probed before any redirect.
#[inline(never)]
fn probed_first(x: u64) -> u64 {
    black_box(x).wrapping_mul(13).wrapping_add(1)
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
    // Two names for one function (as the compiler's function merging makes).
    ".p2align 4, 0xcc",
    ".globl evolve_redirect_alias_a",
    ".type evolve_redirect_alias_a,@function",
    ".globl evolve_redirect_alias_b",
    ".type evolve_redirect_alias_b,@function",
    "evolve_redirect_alias_a:",
    "evolve_redirect_alias_b:",
    "lea rax, [rdi + rsi]",
    "ret",
    ".size evolve_redirect_alias_a, .-evolve_redirect_alias_a",
    ".size evolve_redirect_alias_b, .-evolve_redirect_alias_b",
    ".p2align 4, 0xcc",
    ".popsection",
);

unsafe extern "C" {
    fn evolve_redirect_blocking_read(fd: i32, buf: *mut u8, len: usize) -> isize;
    safe fn evolve_redirect_tiny();
    safe fn evolve_redirect_padded(x: u64) -> u64;
    safe fn evolve_redirect_loop_entry(n: u64, r: u64) -> u64;
    safe fn evolve_redirect_branch_inside(n: u64, r: u64) -> u64;
    safe fn evolve_redirect_alias_a(n: u64, r: u64) -> u64;
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
            call: Box::new(pointer),
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
        Path {
            name: "tail call in another crate",
            call: Box::new(|x| evolve_plain::call_direct(2, x)),
            expected: |v, x| evolve_plain::expected(2, v, x),
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
    type Caller = (fn(u64) -> u64, u64);
    let patch_callers: Vec<Caller> = patches
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
            direct.code_sites().len() > 2 * patches.len(),
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

type Unary = fn(u64) -> u64;

/// `result` is a `NotRedirectable` refusal of `function` whose reason contains `reason`.
fn assert_refused<T: std::fmt::Debug>(result: Result<T, Error>, function: &str, reason: &str) {
    let e = result.expect_err("refused");
    match e.kind() {
        ErrorKind::NotRedirectable {
            function: f,
            reason: r,
            ..
        } => {
            assert!(f.contains(function), "{e}");
            assert!(r.contains(reason), "{e}");
            assert!(e.to_string().contains("nothing was changed"), "{e}");
        }
        other => panic!("expected NotRedirectable, got {other:?}: {e}"),
    }
}

fn hooks() -> DetourHooks {
    DetourHooks {
        counter: Arc::new(Counter::new()),
        slow: Arc::new(AtomicBool::new(false)),
        on_entry: Arc::new(|_| {}),
    }
}

#[test]
fn refusals_name_the_function_and_change_nothing() {
    let _serial = serial();
    let fixture = |name: &str| Function::in_executable(name).unwrap();
    let tiny = fixture("evolve_redirect_tiny");
    let loop_entry = fixture("evolve_redirect_loop_entry");
    let inside = fixture("evolve_redirect_branch_inside");
    let alias = fixture("evolve_redirect_alias_a");
    let unary = Function::from_fn(pointer_target as Unary).unwrap();
    let unary_v2 = Function::from_fn(probe_target_v2 as Unary).unwrap();
    // SAFETY: the stand-ins have the fixtures' signatures and are never called by them here
    // (every redirect below is refused).
    let (to_tiny, to_loop, to_inside, to_alias) = unsafe {
        (
            Function::from_fn(nothing as extern "C" fn())
                .unwrap()
                .vouched_version_of(&tiny),
            Function::from_fn(second as extern "C" fn(u64, u64) -> u64)
                .unwrap()
                .vouched_version_of(&loop_entry),
            Function::from_fn(second as extern "C" fn(u64, u64) -> u64)
                .unwrap()
                .vouched_version_of(&inside),
            Function::from_fn(second as extern "C" fn(u64, u64) -> u64)
                .unwrap()
                .vouched_version_of(&alias),
        )
    };
    let all = [&tiny, &loop_entry, &inside, &alias, &unary];
    let before = snapshot(&all.map(Function::clone), &[]);

    assert_refused(
        redirect::install(&[(&tiny, &to_tiny)]),
        "evolve_redirect_tiny",
        "shorter than the 5-byte jmp (1 bytes) and the next symbol starts 1 bytes after",
    );
    assert_refused(
        redirect::install(&[(&loop_entry, &to_loop)]),
        "evolve_redirect_loop_entry",
        "branches to the entry: the entry is a loop target",
    );
    assert_refused(
        redirect::install(&[(&inside, &to_inside)]),
        "evolve_redirect_branch_inside",
        "branches to offset 1, inside the",
    );
    assert_refused(
        redirect::install(&[(&alias, &to_alias)]),
        "evolve_redirect_alias_a",
        "shares its address with `evolve_redirect_alias_b`",
    );
    // One good pair does not carry a bad one: nothing of the batch is written.
    assert_refused(
        redirect::install(&[(&unary, &unary_v2), (&loop_entry, &to_loop)]),
        "evolve_redirect_loop_entry",
        "loop target",
    );
    assert!(Redirect::of(&unary).is_none());
    // Versions of other functions, and a function to itself.
    let e = redirect::install(&[(&loop_entry, &unary_v2)]).unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::InvalidArgument { reason } if reason.contains("not a version")),
        "{e}"
    );
    let e = redirect::install(&[(&unary, &unary)]).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::InvalidArgument { .. }), "{e}");
    assert_unchanged(&before);

    // Already redirected: retarget that redirect instead; a cycle is refused.
    let installed = redirect::install(&[(&unary, &unary_v2)]).unwrap();
    assert_refused(
        redirect::install(&[(&unary, &unary_v2)]),
        "pointer_target",
        "already redirected",
    );
    let e = redirect::install(&[(&unary_v2, &unary)]).unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::InvalidArgument { reason } if reason.contains("leads back")),
        "{e}"
    );
    let mut batch = Batch::new();
    let e = installed.redirects[0]
        .retarget_in(&mut batch, &unary_v2, &unary)
        .unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::InvalidArgument { .. }), "{e}");
    assert!(batch.is_empty());
    redirect::remove(&installed.redirects).unwrap();
    let e = redirect::remove(&installed.redirects).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::InvalidArgument { .. }), "{e}");
    assert_unchanged(&before);
    // The hand-written functions still run as written.
    evolve_redirect_tiny();
    assert_eq!(evolve_redirect_loop_entry(3, 42), 42);
    assert_eq!(evolve_redirect_branch_inside(3, 43), 43);
    assert_eq!(evolve_redirect_alias_a(40, 2), 42);
}

#[test]
fn a_short_function_followed_by_padding_is_redirected_and_restored() {
    let _serial = serial();
    let padded = Function::in_executable("evolve_redirect_padded").unwrap();
    assert_eq!(padded.size(), 4);
    // SAFETY: `padded_v2` has the signature of `evolve_redirect_padded`.
    let v2 = unsafe {
        Function::from_fn(padded_v2 as extern "C" fn(u64) -> u64)
            .unwrap()
            .vouched_version_of(&padded)
    };
    let before = read(padded.address(), 16);
    assert_eq!(before[4..], [0xcc; 12]);
    let call: extern "C" fn(u64) -> u64 = black_box(evolve_redirect_padded);
    assert_eq!(call(5), 5);
    let installed = redirect::install(&[(&padded, &v2)]).unwrap();
    assert_eq!(call(5), 105);
    let now = read(padded.address(), 16);
    assert_eq!(now[0], 0xe9);
    assert_eq!(now[5..], before[5..], "only the 5 bytes of the jmp changed");
    redirect::remove(&installed.redirects).unwrap();
    assert_eq!(read(padded.address(), 16), before);
    assert_eq!(call(5), 5);
}

/// Reads `/proc/self/task/<tid>/syscall`: the system call a thread is blocked in and its PC.
fn blocked_in(tid: i32) -> Option<(i64, usize)> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).ok()?;
    let fields: Vec<&str> = text.split_whitespace().collect();
    let number = fields.first()?.parse().ok()?;
    let pc = usize::from_str_radix(fields.last()?.trim_start_matches("0x"), 16).ok()?;
    Some((number, pc))
}

#[test]
fn a_thread_parked_inside_the_replaced_bytes_refuses_the_redirect_naming_it() {
    let _serial = serial();
    let f = Function::in_executable("evolve_redirect_blocking_read").unwrap();
    // SAFETY: `never_read` has the signature of `evolve_redirect_blocking_read`.
    let stand_in = unsafe {
        Function::from_fn(never_read as extern "C" fn(i32, *mut u8, usize) -> isize)
            .unwrap()
            .vouched_version_of(&f)
    };
    let before = read(f.address(), 16);
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) fills the two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        // SAFETY: gettid has no arguments.
        tx.send(unsafe { libc::syscall(libc::SYS_gettid) } as i32)
            .unwrap();
        let mut byte = 0u8;
        // SAFETY: reads one byte into `byte`.
        unsafe { evolve_redirect_blocking_read(fds[0], &mut byte, 1) }
    });
    let tid = rx.recv().unwrap();
    // Wait until it is blocked in read(2), whose `syscall` instruction is at entry + 2.
    let mut waited = 0;
    while blocked_in(tid) != Some((0, f.address() + 4)) {
        assert!(
            waited < 10_000,
            "the reader never blocked: {:?}",
            blocked_in(tid)
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
        waited += 1;
    }
    let e = redirect::install(&[(&f, &stand_in)]).unwrap_err();
    match e.kind() {
        ErrorKind::ThreadInside {
            function,
            tid: t,
            pc,
            attempts,
            ..
        } => {
            assert_eq!(function, "evolve_redirect_blocking_read");
            assert_eq!(*t, tid, "{e}");
            // Interrupted and restarted: it resumes at the `syscall` itself.
            assert_eq!(*pc, f.address() + 2, "{e}");
            assert_eq!(*attempts, redirect::MAX_ATTEMPTS);
            assert!(e.to_string().contains(&format!("thread {tid}")), "{e}");
        }
        other => panic!("expected ThreadInside, got {other:?}: {e}"),
    }
    assert_eq!(read(f.address(), 16), before);
    assert!(Redirect::of(&f).is_none());
    // Let it go: it read its byte through the original code.
    // SAFETY: writes one byte from a valid buffer.
    assert_eq!(unsafe { libc::write(fds[1], b"x".as_ptr().cast(), 1) }, 1);
    assert_eq!(reader.join().unwrap(), 1);
    // With nobody inside, the same redirect goes through, and comes out exactly.
    let installed = redirect::install(&[(&f, &stand_in)]).unwrap();
    assert_eq!(installed.stops.stops, 1);
    redirect::remove(&installed.redirects).unwrap();
    assert_eq!(read(f.address(), 16), before);
    // SAFETY: closing our own descriptors.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}

/// Writes `value` into the GOT slot `slot` behind the engine's back.
fn write_slot_behind_the_back(slot: usize, value: usize) {
    let page = slot & !4095;
    // SAFETY: the slot's page is this binary's RELRO (read-only) data, made writable only for
    // this aligned store and read-only again; the value written is a function of the slot's
    // type, or its original value.
    unsafe {
        assert_eq!(
            libc::mprotect(page as *mut _, 4096, libc::PROT_READ | libc::PROT_WRITE),
            0
        );
        std::ptr::write_volatile(slot as *mut usize, value);
        assert_eq!(libc::mprotect(page as *mut _, 4096, libc::PROT_READ), 0);
    }
}

#[test]
fn a_reference_changed_behind_the_batch_refuses_it_whole_and_changes_nothing() {
    let _serial = serial();
    let v2_patch = load(&with_manifest(&rust_object(&patch_source(2))));
    let v3_patch = load(&with_manifest(&rust_object(&patch_source(3))));
    // One batch for two functions: `direct_target` (direct calls here and in the patches) and
    // `evolve_plain::v1::f2` (calls through this binary's GOT).
    let program = [REPLACED[0], REPLACED[3]].map(|p| Function::in_executable(p).unwrap());
    let v2 = program
        .each_ref()
        .map(|f| Function::replacement(&v2_patch, f.symbol()).unwrap());
    let v3 = program
        .each_ref()
        .map(|f| Function::replacement(&v3_patch, f.symbol()).unwrap());
    let pairs: Vec<(&Function, &Function)> = program.iter().zip(&v2).collect();
    let installed = redirect::install(&pairs).unwrap();
    let refs = program
        .each_ref()
        .map(|f| References::find(f, &[&v2_patch, &v3_patch]).unwrap());
    assert!(
        refs[0].code_sites().len() >= 5,
        "{}",
        refs[0].code_sites().len()
    );
    assert!(!refs[1].got_slots().is_empty());
    let before = snapshot(&[], &refs);
    let batch = || {
        let mut batch = Retarget::new();
        for i in 0..2 {
            batch.retarget(&refs[i], &program[i], &v2[i]).unwrap();
        }
        batch
    };
    let paths = paths();

    while_called(&paths, 3, || {
        // A code reference retargeted by someone else (the last one: the earlier ones of the
        // batch are planned first, and must not be written either).
        let site = *refs[0].code_sites().last().unwrap();
        let other = match site.current() {
            SiteInsn::Call(_) => SiteInsn::Call(v3[0].address()),
            SiteInsn::Jmp(_) => SiteInsn::Jmp(v3[0].address()),
            SiteInsn::Nop => unreachable!(),
        };
        // SAFETY: v3 is a version of the function the site calls (same signature).
        unsafe { site.retarget(site.current(), other) }.unwrap();
        let e = batch().apply().unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::UnexpectedInstruction { address, .. } if *address == site.address()),
            "{e}"
        );
        let rest: Vec<(usize, Vec<u8>)> = before
            .iter()
            .filter(|(a, _)| *a != site.address())
            .cloned()
            .collect();
        assert_unchanged(&rest);
        site.restore().unwrap();
        assert_unchanged(&before);

        // A GOT slot written behind the engine's back.
        let slot = refs[1].got_slots()[0];
        write_slot_behind_the_back(slot, v3[1].address());
        let e = batch().apply().unwrap_err();
        match e.kind() {
            ErrorKind::UnexpectedSlot {
                slot: s,
                expected,
                found,
            } => {
                assert_eq!(
                    (*s, *expected, *found),
                    (slot, program[1].address(), v3[1].address())
                );
            }
            other => panic!("expected UnexpectedSlot, got {other:?}: {e}"),
        }
        assert_eq!(word(slot), v3[1].address());
        write_slot_behind_the_back(slot, program[1].address());
        assert_unchanged(&before);

        // With the view right again, the same batch goes through, and back.
        batch().apply().unwrap();
        assert_references_reach(&refs[0], &v2[0]);
        assert_references_reach(&refs[1], &v2[1]);
        let mut back = Retarget::new();
        back.restore(&refs[0]).restore(&refs[1]);
        back.apply().unwrap();
        assert_unchanged(&before);
    });
    redirect::remove(&installed.redirects).unwrap();
    all_return(&paths, 1);
}

#[test]
fn a_probe_placed_on_a_redirected_entry_follows_it() {
    let _serial = serial();
    let f = Function::from_fn(probe_target as Unary).unwrap();
    let v2 = Function::from_fn(probe_target_v2 as Unary).unwrap();
    let v3 = Function::from_fn(probe_target_v3 as Unary).unwrap();
    let before = read(f.address(), f.size());
    let call: Unary = black_box(probe_target);

    // Probe first: the redirect refuses the probed entry.
    let first = Function::from_fn(probed_first as Unary).unwrap();
    let first_v2 = Function::from_fn(probe_target_v2 as Unary).unwrap();
    let probe = Detour::install_at_function(first.address(), first.size(), hooks()).unwrap();
    assert_refused(
        redirect::install(&[(&first, &first_v2)]),
        "probed_first",
        "a probe's detour is installed on its entry",
    );
    probe.remove().unwrap();

    // Redirect first, probe after: the probe follows the redirect.
    let installed = redirect::install(&[(&f, &v2)]).unwrap();
    let refs = References::find(&f, &[]).unwrap();
    assert!(
        !refs.code_sites().is_empty(),
        "call_probe_target calls it directly"
    );
    Retarget::new()
        .retarget(&refs, &f, &v2)
        .unwrap()
        .apply()
        .unwrap();
    let h = hooks();
    let probe = Detour::install_at_function(f.address(), f.size(), h.clone()).unwrap();
    assert!(probe.through_stub());
    assert_eq!(call(2), 24);
    assert_eq!(call_probe_target(2), 25);
    assert_eq!(
        h.counter.get(),
        2,
        "direct calls pass the probe while it is there"
    );
    // Newer versions under the probe: the entry's target moves, the references too.
    let mut batch = Batch::new();
    installed.redirects[0]
        .retarget_in(&mut batch, &v2, &v3)
        .unwrap();
    batch.apply().unwrap();
    Retarget::new()
        .retarget(&refs, &v2, &v3)
        .unwrap()
        .apply()
        .unwrap();
    assert_eq!(call(2), 25);
    assert_eq!(call_probe_target(2), 26);
    assert_eq!(h.counter.get(), 4);
    // A redirect under a probe stays until the probe goes.
    assert_refused(
        redirect::remove(&installed.redirects),
        "probe_target",
        "a probe is routed through its redirected entry",
    );
    probe.remove().unwrap();
    assert_eq!(call_probe_target(2), 26);
    assert_eq!(h.counter.get(), 4);
    assert_references_reach(&refs, &v3);
    Retarget::new().restore(&refs).apply().unwrap();
    redirect::remove(&installed.redirects).unwrap();
    assert_eq!(read(f.address(), f.size()), before);
    assert_eq!(call(2), 23);
    assert_eq!(call_probe_target(2), 24);
}
