//! Integration tests of `evolve_code::inspect` against this very test binary and its libc.

use std::ffi::CString;
use std::hint::black_box;
use std::time::Instant;

use evolve_code::inspect::{
    self, branch_sites_to, build_id, executable, images, symbolize, BranchIndex, BranchKind,
    SymbolKind,
};
use object::Object;

/// A C-ABI function with an unmangled name, to be found by name.
// `#[no_mangle]` counts as `unsafe_code`, which the engine's workspace lints deny.
#[allow(unsafe_code)]
#[no_mangle]
#[inline(never)]
pub extern "C" fn evolve_inspect_probe_fn() -> u64 {
    black_box(0x5eed)
}

#[inline(never)]
fn probe_rust_fn(x: u64) -> u64 {
    black_box(x).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The target of exactly three direct calls, from the three callers below.
#[inline(never)]
fn called_thrice(x: u64) -> u64 {
    black_box(x).rotate_left(7) ^ 0xa5a5
}

// The callers differ so that LLVM's function merging cannot fold them into one, and each uses
// the result after the call so that the call is not turned into a tail jump.
#[inline(never)]
fn caller_one(x: u64) -> u64 {
    black_box(called_thrice(black_box(x)).wrapping_add(1))
}

#[inline(never)]
fn caller_two(x: u64) -> u64 {
    black_box(called_thrice(black_box(x ^ 0xff)).wrapping_mul(3))
}

#[inline(never)]
fn caller_three(x: u64) -> u64 {
    black_box(called_thrice(black_box(x.wrapping_sub(17))).rotate_right(5) ^ 0x77)
}

/// Referenced only through a function pointer, never called directly.
#[inline(never)]
fn never_called_directly(x: u64) -> u64 {
    black_box(x) ^ 0x1234_5678
}

fn read5(addr: usize) -> [u8; 5] {
    // Safe way to read our own text: /proc/self/mem, so the test does not need `unsafe`.
    use std::io::{Read, Seek, SeekFrom};
    let mut mem = std::fs::File::open("/proc/self/mem").unwrap();
    mem.seek(SeekFrom::Start(addr as u64)).unwrap();
    let mut bytes = [0; 5];
    mem.read_exact(&mut bytes).unwrap();
    bytes
}

#[test]
fn executable_finds_c_and_rust_functions() {
    let started = Instant::now();
    let exe = executable().unwrap();
    let parse = started.elapsed();
    let functions = exe.functions().count();
    println!(
        "executable(): {parse:?} for {} ({} symbols, {functions} functions, {} bytes on disk)",
        exe.path().display(),
        exe.symbols().len(),
        std::fs::metadata("/proc/self/exe").unwrap().len(),
    );
    let again = Instant::now();
    assert!(std::ptr::eq(exe, executable().unwrap()));
    println!("executable() again: {:?}", again.elapsed());

    assert!(exe.is_main_executable());
    assert_eq!(exe.path(), std::env::current_exe().unwrap());
    let probe = evolve_inspect_probe_fn as *const () as usize;
    assert_eq!(black_box(evolve_inspect_probe_fn()), 0x5eed);
    let sym = exe.symbol_by_name("evolve_inspect_probe_fn").unwrap();
    assert_eq!(sym.address, probe);
    assert_eq!(sym.kind, SymbolKind::Function);
    assert_eq!(sym.demangled, sym.name);
    assert!(sym.size > 0);
    assert_eq!(exe.function_containing(probe + 1), Some(sym));
    assert!(exe.exec_ranges().iter().any(|r| r.contains(&probe)));

    let rust = exe.symbol_by_name("inspect::probe_rust_fn").unwrap();
    assert_eq!(rust.address, probe_rust_fn as *const () as usize);
    assert_ne!(rust.name, rust.demangled, "Rust symbols are mangled");
    assert_eq!(exe.symbol_by_name(&rust.name), Some(rust));
    assert_eq!(probe_rust_fn(1), 0x9e37_79b9_7f4a_7c15);

    assert!(exe
        .symbols()
        .windows(2)
        .all(|w| w[0].address <= w[1].address));
    assert!(exe.symbol_error().is_none());
}

#[test]
fn build_id_matches_the_file() {
    let id = build_id()
        .unwrap()
        .expect("the test binary has a GNU build id");
    let data = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let from_file = file
        .build_id()
        .unwrap()
        .expect("file has .note.gnu.build-id");
    assert_eq!(id, from_file);
    assert_eq!(executable().unwrap().build_id(), Some(from_file));
    println!(
        "build id: {}",
        id.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
}

#[test]
fn branch_sites_find_exactly_the_three_callers() {
    assert_ne!(
        caller_one(1) ^ caller_two(2) ^ caller_three(3),
        black_box(never_called_directly as fn(u64) -> u64)(4)
    );
    let started = Instant::now();
    let index = inspect::branch_index().unwrap();
    println!(
        "branch index: {:?} for {} functions, {} bytes decoded, {} sites",
        started.elapsed(),
        index.functions_decoded(),
        index.bytes_decoded(),
        index.len(),
    );

    let exe = executable().unwrap();
    let target = called_thrice as *const () as usize;
    let sites = branch_sites_to(target).unwrap();
    assert_eq!(sites.len(), 3, "{sites:#x?}");
    let mut callers: Vec<usize> = sites.iter().map(|s| s.function).collect();
    callers.sort_unstable();
    let mut expected = vec![
        caller_one as *const () as usize,
        caller_two as *const () as usize,
        caller_three as *const () as usize,
    ];
    expected.sort_unstable();
    assert_eq!(callers, expected);
    for site in &sites {
        assert_eq!(site.kind, BranchKind::Call);
        assert_eq!(site.target, target);
        let bytes = read5(site.address);
        assert_eq!(bytes[0], 0xE8);
        let rel = i32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        assert_eq!((site.address as i64 + 5 + i64::from(rel)) as usize, target);
        assert_eq!(
            exe.function_containing(site.address).unwrap().address,
            site.function
        );
    }
    assert!(branch_sites_to(never_called_directly as *const () as usize)
        .unwrap()
        .is_empty());
    assert_eq!(index.sites_to(target).len(), 3);
}

#[test]
fn branch_index_of_libc_builds() {
    let libc = images()
        .unwrap()
        .into_iter()
        .find(|i| i.path().ends_with("libc.so.6"))
        .unwrap();
    let started = Instant::now();
    let index = BranchIndex::build(&libc);
    println!(
        "libc branch index: {:?}, {} functions, {} sites",
        started.elapsed(),
        index.functions_decoded(),
        index.len()
    );
    assert!(index.functions_decoded() > 0);
    assert!(index
        .sites()
        .iter()
        .all(|s| libc.function_containing(s.address).is_some()));
}

fn dlsym(name: &str) -> usize {
    let name = CString::new(name).unwrap();
    // The only `unsafe` in the tests: dlsym itself.
    #[allow(unsafe_code)]
    // SAFETY: `name` is a valid NUL-terminated string; RTLD_DEFAULT searches the global scope.
    let addr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    addr as usize
}

#[test]
fn images_include_executable_and_libc() {
    let started = Instant::now();
    let all = images().unwrap();
    println!("images(): {:?}", started.elapsed());
    for image in &all {
        println!(
            "  {} bias {:#x} main {} symbols {} build id {} {}",
            image.path().display(),
            image.load_bias(),
            image.is_main_executable(),
            image.symbols().len(),
            image.build_id().is_some(),
            image.symbol_error().unwrap_or(""),
        );
    }
    assert!(all[0].is_main_executable());
    assert_eq!(all.iter().filter(|i| i.is_main_executable()).count(), 1);
    let libc = all
        .iter()
        .find(|i| i.path().file_name().is_some_and(|n| n == "libc.so.6"))
        .expect("libc.so.6 is loaded");
    let malloc = libc.symbol_by_name("malloc").unwrap();
    assert_eq!(malloc.address, dlsym("malloc"));
    assert_eq!(malloc.kind, SymbolKind::Function);
    assert!(libc.build_id().is_some());

    let again = Instant::now();
    let second = images().unwrap();
    println!("images() again (cached libraries): {:?}", again.elapsed());
    assert_eq!(second.len(), all.len());
}

#[test]
fn symbolize_names_libc_and_the_executable() {
    let malloc = dlsym("malloc");
    let (path, symbol) = symbolize(malloc + 1).unwrap();
    assert!(path.to_string_lossy().contains("libc.so.6"), "{path:?}");
    assert!(symbol.contains(malloc + 1), "{symbol:?}");
    assert_eq!(symbol.address, malloc);

    let probe = evolve_inspect_probe_fn as *const () as usize;
    let (path, symbol) = symbolize(probe).unwrap();
    assert_eq!(path, std::env::current_exe().unwrap());
    assert_eq!(symbol.name, "evolve_inspect_probe_fn");
    assert_eq!(symbolize(0), None);
}

/// Runs this test binary from a copy that it deletes before inspecting itself: the symbols must
/// still come from the (now deleted) mapped file, read through /proc/self/exe.
#[test]
fn deleted_executable_still_parses() {
    const CHILD: &str = "EVOLVE_INSPECT_DELETED_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let me = std::env::current_exe().unwrap();
        std::fs::remove_file(&me).unwrap();
        let exe = executable().unwrap();
        assert!(
            exe.path().to_string_lossy().ends_with(" (deleted)"),
            "{:?}",
            exe.path()
        );
        let probe = exe.symbol_by_name("evolve_inspect_probe_fn").unwrap();
        assert_eq!(probe.address, evolve_inspect_probe_fn as *const () as usize);
        assert!(build_id().unwrap().is_some());
        return;
    }
    let copy = std::env::temp_dir().join(format!("evolve-inspect-copy-{}", std::process::id()));
    std::fs::copy(std::env::current_exe().unwrap(), &copy).unwrap();
    let output = std::process::Command::new(&copy)
        .args([
            "--exact",
            "deleted_executable_still_parses",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&copy);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "child failed: {stdout}");
    assert!(
        stdout.contains("1 passed"),
        "the child ran no test: {stdout}"
    );
}
