//! Shared by the C tests: the library installed into a private prefix (once per test binary),
//! C programs built against it with the documented command
//! (`cc $(pkg-config --cflags --libs evolve) prog.c`) and run as real processes.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// A scratch directory for this test binary, removed by [`Scratch`]'s owner at the end.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The prefix the library is installed into (for this test binary).
pub fn prefix() -> &'static Path {
    static PREFIX: OnceLock<PathBuf> = OnceLock::new();
    PREFIX.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!(
            "evolve-c-test-{}-{}",
            std::process::id(),
            std::thread::current()
                .name()
                .unwrap_or("t")
                .replace("::", "-")
        ));
        let library = evolve_c::install::built_library().expect("libevolve_c.so built by cargo");
        evolve_c::install::install(&dir, &library).expect("install into the prefix");
        dir
    })
}

/// The directory of the C sources of the tests.
pub fn sources() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c")
}

/// Builds `tests/c/<name>.c` with `cc -O2 $(pkg-config --cflags --libs evolve) ... -pthread`
/// (plus `extra` flags) into `out`; panics with the compiler's output if it fails.
pub fn build(name: &str, out: &Path, extra: &str) -> PathBuf {
    let source = sources().join(format!("{name}.c"));
    let exe = out.join(name);
    let command = format!(
        "cc -O2 -Wall -Werror $(pkg-config --cflags --libs evolve) {extra} {} -o {} -pthread -ldl",
        source.display(),
        exe.display()
    );
    let output = Command::new("sh")
        .arg("-c")
        .arg(&command)
        .env(
            "PKG_CONFIG_PATH",
            prefix().join("lib/pkgconfig").as_os_str(),
        )
        .output()
        .expect("sh");
    assert!(
        output.status.success(),
        "{command}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    exe
}

/// Builds `tests/c/<name>.c` as a shared object (a patch holding new implementations).
pub fn build_shared(name: &str, out: &Path) -> PathBuf {
    let source = sources().join(format!("{name}.c"));
    let so = out.join(format!("{name}.so"));
    let output = Command::new("cc")
        .args(["-O2", "-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(&source)
        .output()
        .expect("cc");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    so
}

/// A fresh scratch directory.
pub fn scratch(test: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("evolve-c-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch { dir }
}

/// The number of calling threads for stress tests.
pub fn stress_threads() -> usize {
    std::env::var("EVOLVE_STRESS_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

/// Runs a program to its end; panics with its output if it fails.
pub fn run(exe: &Path, args: &[&str]) -> Output {
    let output = Command::new(exe)
        .args(args)
        .env("EVOLVE_STRESS_THREADS", stress_threads().to_string())
        .env("EVOLVE_SOCKET_DIR", exe.parent().unwrap().join("sockets"))
        .output()
        .expect("run the C program");
    assert!(
        output.status.success(),
        "{} {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        exe.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The `key=value` words of a program's output (later ones win).
pub fn values(output: &Output) -> HashMap<String, String> {
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The number after `key=`.
pub fn number(values: &HashMap<String, String>, key: &str) -> u64 {
    values
        .get(key)
        .unwrap_or_else(|| panic!("no {key}= in {values:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("{key}= is not a number in {values:?}"))
}
