//! The C scenarios' common steps: install the C library into a private prefix with its
//! installer, build a C program against it with `cc $(pkg-config --cflags --libs evolve)`,
//! run it, and read the numbers it prints (one line per run).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A private directory holding the prefix and the programs, removed when dropped.
pub struct Workspace {
    dir: PathBuf,
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Workspace {
    /// Installs libevolve (the one cargo built with this benchmark) into a new private prefix.
    pub fn new(scenario: &str) -> Result<Workspace, String> {
        let dir =
            std::env::temp_dir().join(format!("evolve-bench-{scenario}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let workspace = Workspace { dir };
        let library = evolve_c::install::built_library().map_err(|e| e.to_string())?;
        evolve_c::install::install(&workspace.prefix(), &library).map_err(|e| e.to_string())?;
        Ok(workspace)
    }

    fn prefix(&self) -> PathBuf {
        self.dir.join("prefix")
    }

    /// Writes `source` as `name.c` and builds it with `cc -O2 $(pkg-config ...) flags`.
    pub fn build(&self, name: &str, source: &str, flags: &str) -> Result<PathBuf, String> {
        let file = self.dir.join(format!("{name}.c"));
        std::fs::write(&file, source).map_err(|e| format!("{}: {e}", file.display()))?;
        let exe = self.dir.join(name);
        let command = format!(
            "cc -O2 $(pkg-config --cflags --libs evolve) {flags} {} -o {} -pthread",
            file.display(),
            exe.display()
        );
        let output = Command::new("sh")
            .args(["-c", &command])
            .env("PKG_CONFIG_PATH", self.prefix().join("lib/pkgconfig"))
            .output()
            .map_err(|e| format!("sh: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "{command}: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(exe)
    }

    /// Runs `exe` with `args`; its standard output.
    pub fn run(&self, exe: &Path, args: &[String]) -> Result<String, String> {
        let output = Command::new(exe)
            .args(args)
            .env("EVOLVE_SOCKET_DIR", self.dir.join("sockets"))
            .output()
            .map_err(|e| format!("{}: {e}", exe.display()))?;
        if !output.status.success() {
            return Err(format!(
                "{} failed ({}): {}",
                exe.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// The rows of numbers a program printed (lines made only of numbers), as columns.
pub fn columns(stdout: &str, width: usize) -> Result<Vec<Vec<f64>>, String> {
    let mut columns = vec![Vec::new(); width];
    for line in stdout.lines() {
        let row: Vec<f64> = match line.split_whitespace().map(str::parse).collect() {
            Ok(row) => row,
            Err(_) => continue,
        };
        if row.len() != width {
            return Err(format!(
                "a row of {} numbers, expected {width}: {line}",
                row.len()
            ));
        }
        for (column, value) in columns.iter_mut().zip(row) {
            column.push(value);
        }
    }
    if columns[0].is_empty() {
        return Err(format!("no measurements in the output: {stdout}"));
    }
    Ok(columns)
}

/// The value of `key=` in the output, if any.
pub fn flag(stdout: &str, key: &str) -> Option<bool> {
    stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .map(|v| v == "1")
}

/// The standard options of a C scenario: `--iters`, `--runs`, `--only`.
pub fn options(args: &[String], iters: u64, runs: usize) -> (u64, usize, Option<String>) {
    let opt = |name: &str| crate::stats::option_value(args, name);
    (
        opt("--iters").and_then(|v| v.parse().ok()).unwrap_or(iters),
        opt("--runs").and_then(|v| v.parse().ok()).unwrap_or(runs),
        opt("--only"),
    )
}
