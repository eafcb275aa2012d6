//! Building patch objects as the builder does, for the tests of the loader and of redirects:
//! sources compiled by `rustc` (or `cc`) into relocatable objects in scratch directories, a
//! manifest section with its digest, and the names of this test binary's symbols to bind to.

use evolve_code::loader::{hex, manifest_range, patch_digest, MANIFEST_SECTION};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Scratch directories made by this process, removed by [`remove_scratch`].
static SCRATCH: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Where a child process of these tests makes its scratch directories.
pub const SCRATCH_BASE: &str = "EVOLVE_LOADER_SCRATCH_BASE";

/// Calling threads of a stress test: `EVOLVE_STRESS_THREADS`, 4 by default.
pub fn threads() -> usize {
    std::env::var("EVOLVE_STRESS_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

/// The mangled name of this binary's symbol whose demangled path is `path`.
pub fn mangled(path: &str) -> String {
    let exe = evolve_code::inspect::executable().unwrap();
    exe.symbol_by_name(path)
        .unwrap_or_else(|| panic!("{path} is not in the test binary"))
        .name
        .clone()
}

/// A fresh scratch directory (under `$EVOLVE_LOADER_SCRATCH_BASE` or the temporary directory).
pub fn scratch() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let base = std::env::var_os(SCRATCH_BASE).map_or_else(std::env::temp_dir, PathBuf::from);
    let dir = base.join(format!(
        "evolve-loader-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    SCRATCH
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(dir.clone());
    dir
}

/// Removes the scratch directories made so far.
pub fn remove_scratch() {
    for dir in SCRATCH.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Runs `command`, which must succeed.
pub fn run(command: &mut Command) {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Compiles Rust `source` to a relocatable object as the builder does.
pub fn rust_object(source: &str) -> PathBuf {
    let dir = scratch();
    let src = dir.join("patch.rs");
    std::fs::write(&src, source).unwrap();
    let object = dir.join("patch.o");
    run(Command::new("rustc")
        .args(["--crate-type=lib", "--emit=obj", "--edition=2021"])
        .args(["-C", "relocation-model=pic", "-C", "opt-level=2"])
        .args(["--crate-name", "evolve_patch"])
        .arg(&src)
        .arg("-o")
        .arg(&object));
    object
}

/// Compiles C `source` with `flags`.
pub fn c_object(source: &str, flags: &[&str]) -> PathBuf {
    let dir = scratch();
    let src = dir.join("patch.c");
    std::fs::write(&src, source).unwrap();
    let object = dir.join("patch.o");
    run(Command::new("cc")
        .args(["-c", "-O2"])
        .args(flags)
        .arg(&src)
        .arg("-o")
        .arg(&object));
    object
}

/// Adds a manifest to `object` and writes its digest into it, as the builder does: a 64-zero
/// placeholder, the digest of the file with the section zeroed, written in place.
pub fn with_manifest(object: &Path) -> PathBuf {
    let placeholder = "0".repeat(64);
    let manifest = format!(r#"{{"format":2,"sha256":"{placeholder}","replaced":[]}}"#);
    let json = object.with_extension("json");
    std::fs::write(&json, manifest).unwrap();
    let patch = object.with_extension("evolve.o");
    run(Command::new("objcopy")
        .arg(format!(
            "--add-section={MANIFEST_SECTION}={}",
            json.display()
        ))
        .arg(format!("--set-section-flags={MANIFEST_SECTION}=readonly"))
        .arg(object)
        .arg(&patch));
    let mut data = std::fs::read(&patch).unwrap();
    let digest = hex(&patch_digest(&data).unwrap());
    let range = manifest_range(&data).unwrap();
    let at = range.start
        + data[range.clone()]
            .windows(64)
            .position(|w| w == placeholder.as_bytes())
            .unwrap();
    data[at..at + 64].copy_from_slice(digest.as_bytes());
    std::fs::write(&patch, data).unwrap();
    patch
}
