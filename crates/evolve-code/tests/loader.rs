//! Evolve's loader on real relocatable objects: Rust (`rustc --emit=obj -C relocation-model=pic
//! -C opt-level=2`) and C (`cc -c -fPIC -O2`) compiled from small sources inside each test,
//! referencing this test binary's own functions, statics (global and local ones), a
//! thread-local, libc IFUNCs, vtables and string constants.
#![allow(unsafe_code)]

mod common;

use common::patch::{
    c_object, mangled, remove_scratch, rust_object, scratch, threads, with_manifest, SCRATCH_BASE,
};
use evolve_code::loader::{manifest_range, patch_digest, LoadedPatch, ProgramResolver};
use evolve_code::scan::Scope;
use object::read::elf::FileHeader;
use std::cell::Cell;
use std::hint::black_box;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

// ---- The program's side: what patches bind to. --------------------------------------------

#[inline(never)]
fn program_add(a: u64, b: u64) -> u64 {
    black_box(a).wrapping_mul(31).wrapping_add(b)
}

#[inline(never)]
extern "C" fn program_mix(a: u64, b: u64) -> u64 {
    black_box(a).wrapping_mul(7) ^ b
}

#[inline(never)]
fn program_text_len(s: &str) -> usize {
    black_box(s).len()
}

#[inline(never)]
fn program_backtrace() -> String {
    std::backtrace::Backtrace::force_capture().to_string()
}

/// A local (internal) static.
static LOCAL_COUNTER: AtomicU64 = AtomicU64::new(0);
/// Counts drops of a patch value during unwinding.
static DROPS: AtomicU64 = AtomicU64::new(0);
/// A global (exported) static.
#[no_mangle]
pub static EVOLVE_LOADER_TEST_GLOBAL: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static TLS_COUNTER: Cell<u64> = const { Cell::new(0) };
}

/// Keeps the program functions in the binary although only patches call them.
#[used]
static KEEP: [fn(); 4] = [
    || {
        black_box(program_add as fn(u64, u64) -> u64);
    },
    || {
        black_box(program_mix as extern "C" fn(u64, u64) -> u64);
    },
    || {
        black_box(program_text_len as fn(&str) -> usize);
    },
    || {
        black_box(program_backtrace as fn() -> String);
    },
];

fn tls_counter() -> u64 {
    TLS_COUNTER.with(|c| black_box(c).get())
}

/// Loads and mapping checks must not overlap between tests of this file.
static SERIAL: Mutex<()> = Mutex::new(());
/// Holds the file's lock for one test and removes its scratch directories when it ends.
struct Serial(#[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

impl Drop for Serial {
    fn drop(&mut self) {
        remove_scratch();
    }
}

fn serial() -> Serial {
    Serial(SERIAL.lock().unwrap_or_else(|p| p.into_inner()))
}

// ---- Building patch objects. --------------------------------------------------------------

/// The mangled name of the thread-local behind `TLS_COUNTER`.
fn tls_symbol() -> String {
    let data = std::fs::read("/proc/self/exe").unwrap();
    let header = object::elf::FileHeader64::<object::LittleEndian>::parse(&*data).unwrap();
    let sections = header.sections(object::LittleEndian, &*data).unwrap();
    let symbols = sections
        .symbols(object::LittleEndian, &*data, object::elf::SHT_SYMTAB)
        .unwrap();
    let found: Vec<String> = symbols
        .iter()
        .filter(|s| s.st_type() == object::elf::STT_TLS)
        .filter_map(|s| symbols.symbol_name(object::LittleEndian, s).ok())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .filter(|n| {
            rustc_demangle::demangle(n)
                .to_string()
                .contains("loader::TLS_COUNTER")
        })
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0].clone()
}

fn rust_patch_source() -> String {
    format!(
        r#"
use std::sync::atomic::{{AtomicU64, Ordering}};
unsafe extern "Rust" {{
    #[link_name = "{add}"] fn program_add(a: u64, b: u64) -> u64;
    #[link_name = "{text_len}"] fn program_text_len(s: &str) -> usize;
    #[link_name = "{backtrace}"] fn program_backtrace() -> String;
    #[link_name = "{local}"] static LOCAL_COUNTER: AtomicU64;
    #[link_name = "{drops}"] static DROPS: AtomicU64;
    #[link_name = "EVOLVE_LOADER_TEST_GLOBAL"] static GLOBAL: AtomicU64;
}}
static GREETINGS: [&str; 3] = ["hello from the patch", "a second constant", "3"];
/// A new static of the patch (data).
pub static PATCH_CALLS: AtomicU64 = AtomicU64::new(0);

#[no_mangle]
pub fn patch_compute(x: u64) -> u64 {{
    let r = unsafe {{ program_add(x, 7) }};
    unsafe {{
        LOCAL_COUNTER.fetch_add(1, Ordering::SeqCst);
        GLOBAL.fetch_add(2, Ordering::SeqCst);
    }}
    PATCH_CALLS.fetch_add(1, Ordering::Relaxed);
    r ^ 5
}}
#[no_mangle]
pub fn patch_calls() -> u64 {{ PATCH_CALLS.load(Ordering::Relaxed) }}
#[no_mangle]
pub fn patch_greeting(i: usize) -> (&'static str, usize) {{
    let s = GREETINGS[i % 3];
    (s, unsafe {{ program_text_len(s) }})
}}
#[no_mangle]
pub fn patch_make_adder(k: u64) -> Box<dyn Fn(u64) -> u64 + Send + Sync> {{
    Box::new(move |x| x.wrapping_add(k))
}}
#[no_mangle]
pub fn patch_apply(f: &dyn Fn(u64) -> u64, x: u64) -> u64 {{ f(x).wrapping_add(1) }}
struct Bump;
impl Drop for Bump {{
    fn drop(&mut self) {{ unsafe {{ DROPS.fetch_add(1, Ordering::SeqCst); }} }}
}}
#[no_mangle]
pub fn patch_may_panic(x: u64) -> u64 {{
    let _bump = Bump;
    if std::hint::black_box(x) > 10 {{ panic!("patch panic {{x}}") }}
    x * 2
}}
#[no_mangle]
pub fn patch_backtrace() -> String {{
    let s = unsafe {{ program_backtrace() }};
    std::hint::black_box(s)
}}
"#,
        add = mangled("loader::program_add"),
        text_len = mangled("loader::program_text_len"),
        backtrace = mangled("loader::program_backtrace"),
        local = mangled("loader::LOCAL_COUNTER"),
        drops = mangled("loader::DROPS"),
    )
}

fn c_patch_source() -> String {
    let tls = tls_symbol();
    format!(
        r#"
#include <stdint.h>
#include <string.h>
extern __thread uint64_t tls_gd __asm__("{tls}");
extern __thread uint64_t tls_ie __asm__("{tls}") __attribute__((tls_model("initial-exec")));
extern __thread uint64_t tls_le __asm__("{tls}") __attribute__((tls_model("local-exec")));
extern __thread uint64_t tls_ld __asm__("{tls}")
    __attribute__((tls_model("local-dynamic"), visibility("hidden")));
extern uint64_t local_counter __asm__("{local}");
extern uint64_t program_mix(uint64_t, uint64_t) __asm__("{mix}");
uint64_t c_tls_gd(void) {{ return ++tls_gd; }}
uint64_t c_tls_ie(void) {{ return ++tls_ie; }}
uint64_t c_tls_le(void) {{ return ++tls_le; }}
uint64_t c_tls_ld(void) {{ return ++tls_ld; }}
uint64_t c_copy(uint8_t *dst, const uint8_t *src, size_t n, size_t fill) {{
    memmove(dst, src, n);
    memset(dst + n, 0xab, fill);
    __atomic_fetch_add(&local_counter, 1, __ATOMIC_SEQ_CST);
    return program_mix(n, fill);
}}
"#,
        local = mangled("loader::LOCAL_COUNTER"),
        mix = mangled("loader::program_mix"),
    )
}

/// Loads a patch with the standard resolver.
fn load(path: &Path) -> evolve_code::Result<LoadedPatch> {
    let resolver = ProgramResolver::new()?;
    // SAFETY: the patches of these tests are built against this binary from sources whose
    // extern declarations match the definitions above.
    unsafe { LoadedPatch::load(path, &resolver) }
}

/// `patch`'s function `name` as a `F`.
///
/// # Safety
/// `F` must be the function's type.
unsafe fn function<F: Copy>(patch: &LoadedPatch, name: &str) -> F {
    let address = patch
        .symbol(name)
        .unwrap_or_else(|| panic!("no {name} in the patch"));
    assert!(patch.contains(address));
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<usize>());
    // SAFETY: the caller vouches for the type; the address is code of the loaded patch.
    unsafe { std::mem::transmute_copy(&address) }
}

struct RustPatch {
    compute: fn(u64) -> u64,
    calls: fn() -> u64,
    greeting: fn(usize) -> (&'static str, usize),
    make_adder: fn(u64) -> Box<dyn Fn(u64) -> u64 + Send + Sync>,
    apply: fn(&dyn Fn(u64) -> u64, u64) -> u64,
    may_panic: fn(u64) -> u64,
    backtrace: fn() -> String,
}

impl RustPatch {
    fn of(patch: &LoadedPatch) -> RustPatch {
        // SAFETY: the types are those of the patch source's functions.
        unsafe {
            RustPatch {
                compute: function(patch, "patch_compute"),
                calls: function(patch, "patch_calls"),
                greeting: function(patch, "patch_greeting"),
                make_adder: function(patch, "patch_make_adder"),
                apply: function(patch, "patch_apply"),
                may_panic: function(patch, "patch_may_panic"),
                backtrace: function(patch, "patch_backtrace"),
            }
        }
    }
}

type CTls = extern "C" fn() -> u64;
type CCopy = extern "C" fn(*mut u8, *const u8, usize, usize) -> u64;

/// Mappings within ±2 GiB of the executable (where the loader maps), except the heap.
fn mappings_near_executable() -> Vec<String> {
    let exe = evolve_code::inspect::executable().unwrap();
    let anchor = exe.exec_ranges()[0].start;
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| !l.ends_with("[heap]"))
        .filter(|l| {
            let (range, _) = l.split_once(' ').unwrap();
            let start = usize::from_str_radix(range.split_once('-').unwrap().0, 16).unwrap();
            start.abs_diff(anchor) < 1 << 31
        })
        .map(str::to_owned)
        .collect()
}

/// The protection (`r-xp`…) of the mapping holding `address`.
fn protection_at(address: usize) -> String {
    for line in std::fs::read_to_string("/proc/self/maps").unwrap().lines() {
        let mut fields = line.split_ascii_whitespace();
        let (start, end) = fields.next().unwrap().split_once('-').unwrap();
        let range =
            usize::from_str_radix(start, 16).unwrap()..usize::from_str_radix(end, 16).unwrap();
        if range.contains(&address) {
            return fields.next().unwrap().to_owned();
        }
    }
    panic!("{address:#x} is not mapped")
}

// ---- Tests. ---------------------------------------------------------------------------------

#[test]
fn patches_bind_to_the_programs_functions_statics_thread_locals_and_libc_from_many_threads() {
    let _serial = serial();
    let rust = load(&with_manifest(&rust_object(&rust_patch_source()))).unwrap();
    let c = load(&with_manifest(&c_object(&c_patch_source(), &["-fPIC"]))).unwrap();
    let patch = RustPatch::of(&rust);
    // SAFETY: the types of the C source's functions.
    let (gd, ie, le, ld, copy): (CTls, CTls, CTls, CTls, CCopy) = unsafe {
        (
            function(&c, "c_tls_gd"),
            function(&c, "c_tls_ie"),
            function(&c, "c_tls_le"),
            function(&c, "c_tls_ld"),
            function(&c, "c_copy"),
        )
    };
    let local_before = black_box(&LOCAL_COUNTER).load(Ordering::SeqCst);
    let global_before = black_box(&EVOLVE_LOADER_TEST_GLOBAL).load(Ordering::SeqCst);
    let calls_before = (patch.calls)();
    let threads = threads();
    let deadline = Instant::now() + Duration::from_secs(2);
    let iterations: Vec<u64> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let patch = &patch;
                s.spawn(move || {
                    let mut done = 0u64;
                    let expected_greetings = ["hello from the patch", "a second constant", "3"];
                    let tls_start = tls_counter();
                    while done < 200 || (Instant::now() < deadline && done < 200_000) {
                        let x = done.wrapping_mul(0x9e37_79b9) ^ t as u64;
                        assert_eq!((patch.compute)(x), program_add(x, 7) ^ 5);
                        let (text, len) = (patch.greeting)(done as usize);
                        assert_eq!(text, expected_greetings[done as usize % 3]);
                        assert_eq!(len, text.len());
                        let adder = (patch.make_adder)(x);
                        assert_eq!(adder(done), done.wrapping_add(x));
                        drop(adder);
                        let triple = move |v: u64| v.wrapping_mul(3) ^ t as u64;
                        assert_eq!((patch.apply)(&triple, x), triple(x).wrapping_add(1));
                        // Each TLS access model reaches this thread's instance of TLS_COUNTER.
                        let base = tls_start + 4 * done;
                        assert_eq!(gd(), base + 1);
                        assert_eq!(ie(), base + 2);
                        assert_eq!(le(), base + 3);
                        assert_eq!(ld(), base + 4);
                        assert_eq!(tls_counter(), base + 4);
                        let src: Vec<u8> =
                            (0..(done % 61) as u8 + 3).map(|b| b ^ t as u8).collect();
                        let mut dst = vec![0u8; src.len() + 16];
                        let fill = (done % 9) as usize + 1;
                        let mixed = copy(dst.as_mut_ptr(), src.as_ptr(), src.len(), fill);
                        assert_eq!(mixed, program_mix(src.len() as u64, fill as u64));
                        assert_eq!(&dst[..src.len()], &src[..]);
                        assert!(dst[src.len()..src.len() + fill].iter().all(|b| *b == 0xab));
                        assert!(dst[src.len() + fill..].iter().all(|b| *b == 0));
                        done += 1;
                    }
                    done
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let total: u64 = iterations.iter().sum();
    // One of every static: the patches' writes landed in the program's statics.
    assert_eq!(
        black_box(&LOCAL_COUNTER).load(Ordering::SeqCst) - local_before,
        2 * total,
        "patch_compute and c_copy each add 1 per call"
    );
    assert_eq!(
        black_box(&EVOLVE_LOADER_TEST_GLOBAL).load(Ordering::SeqCst) - global_before,
        2 * total
    );
    // The patch's own static is its own.
    assert_eq!((patch.calls)() - calls_before, total);
    eprintln!(
        "{threads} threads, {total} iterations; stats {:?} {:?}",
        rust.stats(),
        c.stats()
    );
}

#[test]
fn calls_to_program_functions_are_direct_and_pages_are_never_writable_and_executable() {
    use iced_x86::{Decoder, DecoderOptions, FlowControl, OpKind};
    let _serial = serial();
    let rust = load(&with_manifest(&rust_object(&rust_patch_source()))).unwrap();
    let compute = rust.symbol("patch_compute").unwrap();
    let range = rust.symbol_range("patch_compute").unwrap();
    assert_eq!(range.start, compute);
    // SAFETY: the function's bytes are mapped r-x for as long as the patch is loaded.
    let code = unsafe { std::slice::from_raw_parts(compute as *const u8, range.len()) };
    let target = mangled("loader::program_add");
    let program_add_address = evolve_code::inspect::executable()
        .unwrap()
        .symbol_by_name(&target)
        .unwrap()
        .address;
    let mut decoder = Decoder::with_ip(64, code, compute as u64, DecoderOptions::NONE);
    let mut direct_calls = Vec::new();
    for instruction in &mut decoder {
        if instruction.flow_control() == FlowControl::IndirectCall {
            panic!(
                "indirect call left in patch_compute: {:?} at {:#x}",
                instruction.code(),
                instruction.ip()
            );
        }
        if instruction.flow_control() == FlowControl::Call {
            assert_eq!(instruction.op0_kind(), OpKind::NearBranch64);
            direct_calls.push(instruction.near_branch64() as usize);
        }
    }
    assert_eq!(
        direct_calls,
        vec![program_add_address],
        "one direct call rel32 to program_add"
    );
    assert!(rust.stats().relaxed > 0, "{:?}", rust.stats());
    // Statics are addressed directly too: no GOT slot for anything near.
    let c = load(&with_manifest(&c_object(&c_patch_source(), &["-fPIC"]))).unwrap();
    // memmove and memset live in libc, beyond ±2 GiB: through PLT stubs in the patch's text.
    assert!(c.stats().plt_stubs >= 2, "{:?}", c.stats());
    for patch in [&rust, &c] {
        let text = patch.exec_ranges()[0].0.get();
        assert_eq!(protection_at(text), "r-xp");
        for (start, end) in patch.ranges() {
            let mut at = start.get();
            while at < end.get() {
                let p = protection_at(at);
                assert!(!(p.contains('w') && p.contains('x')), "{p} at {at:#x}");
                at += 4096;
            }
        }
    }
    let data = rust.symbol("_ZN12evolve_patch11PATCH_CALLS").or_else(|| {
        rust.symbol_names()
            .find(|n| n.contains("PATCH_CALLS"))
            .and_then(|n| rust.symbol(&n))
    });
    assert_eq!(protection_at(data.unwrap()), "rw-p");
}

#[inline(never)]
fn call_patch_backtrace(f: fn() -> String) -> String {
    black_box(f())
}

#[test]
fn a_panic_in_patch_code_unwinds_into_the_programs_catch_unwind_and_backtraces_pass_through() {
    let _serial = serial();
    let rust = load(&with_manifest(&rust_object(&rust_patch_source()))).unwrap();
    let patch = RustPatch::of(&rust);
    let threads = threads();
    std::thread::scope(|s| {
        for t in 0..threads {
            let patch = &patch;
            s.spawn(move || {
                for i in 0..200u64 {
                    let x = i % 20 + t as u64;
                    let drops = DROPS.load(Ordering::SeqCst);
                    let result = std::panic::catch_unwind(|| (patch.may_panic)(x));
                    if x > 10 {
                        let payload = result.unwrap_err();
                        let message = payload.downcast_ref::<String>().unwrap();
                        assert_eq!(message, &format!("patch panic {x}"));
                    } else {
                        assert_eq!(result.unwrap(), x * 2);
                    }
                    // The patch's landing pad ran its drop on both paths.
                    assert!(DROPS.load(Ordering::SeqCst) > drops);
                }
            });
        }
    });
    let trace = call_patch_backtrace(patch.backtrace);
    assert!(
        trace.contains("call_patch_backtrace"),
        "the unwinder did not walk through the patch's frame:\n{trace}"
    );
    let backtrace = rust.symbol("patch_backtrace").unwrap();
    assert_eq!(rust.symbolize(backtrace + 3), Some(("patch_backtrace", 3)));
}

type Adder = Box<dyn Fn(u64) -> u64 + Send + Sync>;

/// A value made by patch code, held where reclamation's memory scan must see it.
static HELD: Mutex<Option<Adder>> = Mutex::new(None);

#[inline(never)]
fn use_once(patch: &LoadedPatch) -> (usize, usize) {
    let p = RustPatch::of(patch);
    assert_eq!((p.compute)(3), program_add(3, 7) ^ 5);
    // Unwinding through the patch makes the unwinder index its table (see `loader::unwind`).
    // Silently: a printed backtrace would leave the patch's return addresses in freed heap
    // memory, where the conservative memory scan finds them.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    assert!(std::panic::catch_unwind(|| (p.may_panic)(11)).is_err());
    std::panic::set_hook(hook);
    *HELD.lock().unwrap() = Some((p.make_adder)(1));
    let text = patch.exec_ranges()[0];
    (text.0.get(), text.1.get())
}

#[test]
fn unloading_waits_for_references_then_leaves_a_prot_none_reservation() {
    let _serial = serial();
    let mut rust = load(&with_manifest(&rust_object(&rust_patch_source()))).unwrap();
    let (start, end) = use_once(&rust);
    // The boxed closure's vtable lies in the patch: not unloaded while it is held.
    let held = rust
        .unload(Scope::Memory, Duration::from_secs(5), "loader-test-patch")
        .unwrap();
    assert!(
        matches!(&held, evolve_code::dylib::Unload::Referenced(r) if !r.references.is_empty()),
        "{held:?}"
    );
    assert!(!rust.is_unloaded());
    assert_eq!(HELD.lock().unwrap().as_ref().unwrap()(41), 42);
    {
        let mut held = HELD.lock().unwrap();
        drop(held.take());
        // `None` clears only the data pointer; the stale vtable word would still point into
        // the patch (a real, if dead, reference for a conservative scan).
        // SAFETY: all-zero bytes are a valid `None` of `Option<Box<_>>`.
        unsafe { std::ptr::write_bytes(&mut *held as *mut Option<Adder>, 0, 1) };
    }
    let outcome = rust
        .unload(Scope::Memory, Duration::from_secs(5), "loader-test-patch")
        .unwrap();
    assert!(
        matches!(outcome, evolve_code::dylib::Unload::Unloaded(_)),
        "{outcome:?}"
    );
    assert!(rust.is_unloaded());
    assert_eq!(rust.symbol("patch_compute"), None);
    assert!(!rust.contains(start));
    for at in (start..end).step_by(4096) {
        assert_eq!(protection_at(at), "---p", "{at:#x}");
    }
    assert!(rust
        .unload(Scope::Stacks, Duration::from_secs(1), "again")
        .is_err());
}

const STALE_CHILD: &str = "EVOLVE_LOADER_STALE_CALL_CHILD";

/// Run in a child process by the next test: calls a pointer into an unloaded patch.
#[test]
fn stale_call_child() {
    if std::env::var_os(STALE_CHILD).is_none() {
        return;
    }
    let mut rust = load(&with_manifest(&rust_object(&rust_patch_source()))).unwrap();
    let hidden = evolve_code::Hidden::new(rust.symbol("patch_compute").unwrap());
    let outcome = rust
        .unload(Scope::Stacks, Duration::from_secs(5), "stale-patch-7")
        .unwrap();
    assert!(matches!(outcome, evolve_code::dylib::Unload::Unloaded(_)));
    // SAFETY: deliberately not: this call must fault, which is what the parent checks.
    let stale: fn(u64) -> u64 = unsafe { std::mem::transmute(hidden.get()) };
    black_box(stale(1));
    unreachable!("the call into the unloaded patch returned");
}

#[test]
fn a_call_into_an_unloaded_patch_faults_naming_the_patch() {
    use std::os::unix::process::ExitStatusExt;
    let _serial = serial();
    let base = scratch();
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "stale_call_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(STALE_CHILD, "1")
        .env(SCRATCH_BASE, &base)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.signal(), Some(libc::SIGSEGV), "{stderr}");
    assert!(
        stderr.contains("evolve: the program reached unloaded patch `stale-patch-7`"),
        "{stderr}"
    );
}

/// Expects `path` to be refused with a message containing every one of `causes`, leaving no
/// mapping near the executable.
fn assert_refused(path: &Path, causes: &[&str]) {
    let resolver = ProgramResolver::new().unwrap();
    let before = mappings_near_executable();
    // SAFETY: as in `load`; these objects are refused before any code could run.
    let error = unsafe { LoadedPatch::load(path, &resolver) }.unwrap_err();
    let message = error.to_string();
    for cause in causes {
        assert!(
            message.contains(cause),
            "{message:?} does not say {cause:?}"
        );
    }
    assert_eq!(before, mappings_near_executable(), "{message}");
    eprintln!("refused as expected: {message}");
}

#[test]
fn every_refusal_names_its_cause_and_leaves_no_mapping() {
    let _serial = serial();
    let dir = scratch();
    // Not regular files: refused before anything is read (a FIFO would block the reader).
    let fifo = dir.join("fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    assert_refused(&fifo, &["FIFO", "not a regular file"]);
    assert_refused(&dir, &["directory"]);
    assert_refused(Path::new("/dev/zero"), &["device"]);

    // A byte changed after the digest was written.
    let good = with_manifest(&c_object("int f(int x) { return x * 3; }", &["-fPIC"]));
    let mut data = std::fs::read(&good).unwrap();
    let manifest = manifest_range(&data).unwrap();
    let flip = (0..data.len())
        .rev()
        .find(|i| !manifest.contains(i))
        .unwrap();
    data[flip] ^= 1;
    let bad = dir.join("bad-hash.o");
    std::fs::write(&bad, data).unwrap();
    assert_refused(&bad, &["SHA-256 mismatch"]);
    // No manifest at all.
    assert_refused(
        &c_object("int f(int x) { return x; }", &["-fPIC"]),
        &[".evolve.manifest"],
    );

    // A symbol neither the program nor a library defines.
    let unknown = with_manifest(&c_object(
        "extern int no_such_symbol_in_evolve_tests(int); int f(int x) { return no_such_symbol_in_evolve_tests(x) + 1; }",
        &["-fPIC"],
    ));
    assert_refused(
        &unknown,
        &[
            "no_such_symbol_in_evolve_tests",
            "R_X86_64_PLT32",
            "not defined",
        ],
    );

    // Relocations the loader cannot honour: an unsupported type (large code model), and an
    // absolute 32-bit address of a program static (non-PIC), which does not fit.
    let local = mangled("loader::LOCAL_COUNTER");
    let large = with_manifest(&c_object(
        &format!("extern long counter __asm__(\"{local}\"); long *f(void) {{ return &counter; }} long g(void) {{ return *f(); }}"),
        &["-fPIC", "-mcmodel=large"],
    ));
    assert_refused(&large, &["does not support", "R_X86_64_GOT"]);
    let absolute = with_manifest(&c_object(
        &format!("extern long counter __asm__(\"{local}\"); long *f(void) {{ return &counter; }}"),
        &["-fno-pic", "-mcmodel=small"],
    ));
    assert_refused(&absolute, &["R_X86_64_32", &local, "does not fit"]);

    // New thread-locals and initializers.
    let tls = with_manifest(&c_object(
        "__thread int patch_own_tls = 5; int f(void) { return ++patch_own_tls; }",
        &["-fPIC"],
    ));
    assert_refused(&tls, &["thread-local", "patch_own_tls"]);
    let init = with_manifest(&c_object(
        "int g; __attribute__((constructor)) static void init(void) { g = 1; } int f(void) { return g; }",
        &["-fPIC"],
    ));
    assert_refused(&init, &[".init_array", "initializers"]);

    // Not an object at all, and a shared object instead of a relocatable one.
    let text = dir.join("text");
    std::fs::write(&text, "hello").unwrap();
    assert_refused(&text, &["not an ELF64"]);
}

#[test]
fn the_manifest_digest_ignores_the_manifest_contents_only() {
    let _serial = serial();
    let patch = with_manifest(&c_object("int f(int x) { return x; }", &["-fPIC"]));
    let data = std::fs::read(&patch).unwrap();
    let digest = patch_digest(&data).unwrap();
    let range = manifest_range(&data).unwrap();
    let mut other_manifest = data.clone();
    other_manifest[range.start] ^= 0xff;
    assert_eq!(patch_digest(&other_manifest).unwrap(), digest);
    let mut other_code = data.clone();
    other_code[range.start - 1] ^= 0xff;
    assert_ne!(patch_digest(&other_code).unwrap(), digest);
}
