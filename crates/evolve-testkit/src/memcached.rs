//! memcached built from Debian's source package: a real C server the project did not write,
//! compiled by its own build system with gcc's debug info, for the tests and the benchmark that
//! patch and probe it by its own function names.
//!
//! The source comes from `apt-get source memcached` (a `deb-src` entry is needed: `.ci/run`
//! adds one), is configured and built with `CFLAGS="-g -O2"` and `make -j2 memcached`, once per
//! source version: the tree and its binary are kept under [`crate::scratch`], keyed by that
//! version, so every later test and benchmark of the run reuses them.

use std::path::{Path, PathBuf};

use std::process::Command;

/// A memcached source tree and the binary its build system made from it.
#[derive(Debug, Clone)]
pub struct MemcachedSource {
    /// The Debian source version (`1.6.18-1+deb12u1`).
    pub version: String,
    /// The unpacked, configured and built source tree.
    pub tree: PathBuf,
    /// `tree/memcached`: unmodified, unstripped, with DWARF.
    pub binary: PathBuf,
}

/// Why memcached's source could not be had.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl MemcachedSource {
    /// The source tree of Debian's memcached, built (once per source version per scratch
    /// directory; later calls return the cached build).
    ///
    /// Fails with the cause when `apt-get source` cannot fetch it (no `deb-src` entry) or its
    /// build fails.
    ///
    /// ```no_run
    /// let memcached = evolve_testkit::memcached::MemcachedSource::get()?;
    /// assert!(memcached.binary.ends_with("memcached"));
    /// # Ok::<(), evolve_testkit::memcached::Unavailable>(())
    /// ```
    pub fn get() -> Result<MemcachedSource, Unavailable> {
        static BUILT: std::sync::Mutex<Option<MemcachedSource>> = std::sync::Mutex::new(None);
        let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(source) = &*built {
            return Ok(source.clone());
        }
        let version = source_version()?;
        let cache = crate::scratch().join("memcached-source").join(&version);
        let stamp = cache.join("built");
        // gcc records the directory it compiled in (`DW_AT_comp_dir`) and the patch builder
        // compiles there: the tree is built where it stays. Creating the directory is the lock
        // between test processes (and the benchmark); the stamp says the build is complete.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(900);
        while !stamp.is_file() {
            std::fs::create_dir_all(cache.parent().expect("a parent"))
                .map_err(|e| Unavailable(e.to_string()))?;
            match std::fs::create_dir(&cache) {
                Ok(()) => {
                    if let Err(e) = fetch_and_build(&cache) {
                        let _ = std::fs::remove_dir_all(&cache);
                        return Err(e);
                    }
                    std::fs::write(&stamp, &version).map_err(|e| Unavailable(e.to_string()))?;
                }
                Err(_) => {
                    // Another process builds it, or one was killed while building.
                    let age = std::fs::metadata(&cache)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .unwrap_or_default();
                    if age > std::time::Duration::from_secs(600) && !stamp.is_file() {
                        let _ = std::fs::remove_dir_all(&cache);
                    }
                    if std::time::Instant::now() > deadline {
                        return Err(Unavailable(format!(
                            "{} stays incomplete (another build hangs?)",
                            cache.display()
                        )));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
            }
        }
        let tree = std::fs::read_dir(&cache)
            .map_err(|e| Unavailable(e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.is_dir() && p.join("memcached").is_file())
            .ok_or_else(|| Unavailable(format!("no built memcached in {}", cache.display())))?;
        let source = MemcachedSource {
            version,
            binary: tree.join("memcached"),
            tree,
        };
        *built = Some(source.clone());
        Ok(source)
    }

    /// The flags `make` gives gcc for `file` (`proto_text.c`) that gcc does not record in
    /// `DW_AT_producer`: `-D`, `-U`, `-I` and `-pthread` (which defines `_REENTRANT`). Read from
    /// the Makefile's own command (`make -n`), as an operator would.
    pub fn unrecorded_flags(&self, file: &str) -> Result<Vec<String>, Unavailable> {
        let stem = file.trim_end_matches(".c");
        let out = run(
            Command::new("make").current_dir(&self.tree).args([
                "-n",
                "-W",
                file,
                &format!("memcached-{stem}.o"),
            ]),
            "make -n",
        )?;
        let line = out
            .lines()
            .find(|l| l.starts_with("gcc ") && l.contains(file))
            .ok_or_else(|| Unavailable(format!("make -n shows no compile of {file}: {out}")))?;
        let mut flags: Vec<String> = Vec::new();
        for word in line.split_whitespace() {
            let kept = ["-D", "-U", "-I"].iter().any(|p| word.starts_with(p)) || word == "-pthread";
            if kept && !flags.iter().any(|f| f == word) {
                flags.push(word.to_string());
            }
        }
        Ok(flags)
    }
}

/// The version `apt-get source memcached` would fetch (from its `.dsc` name; nothing is
/// downloaded).
fn source_version() -> Result<String, Unavailable> {
    let uris = run(
        Command::new("apt-get").args(["source", "--print-uris", "-qq", "memcached"]),
        "apt-get source --print-uris memcached (is there a deb-src entry?)",
    )?;
    uris.split_whitespace()
        .find_map(|w| w.strip_prefix("memcached_")?.strip_suffix(".dsc"))
        .map(str::to_string)
        .ok_or_else(|| {
            Unavailable(format!(
                "apt-get names no memcached source package (a deb-src entry is needed): {uris}"
            ))
        })
}

fn fetch_and_build(work: &Path) -> Result<(), Unavailable> {
    run(
        Command::new("apt-get")
            .current_dir(work)
            .args(["source", "-qq", "memcached"]),
        "apt-get source memcached",
    )?;
    let tree = std::fs::read_dir(work)
        .map_err(|e| Unavailable(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.is_dir())
        .ok_or_else(|| Unavailable("apt-get source unpacked no tree".into()))?;
    run(
        Command::new("./configure")
            .current_dir(&tree)
            .arg("-q")
            .env("CFLAGS", "-g -O2"),
        "memcached's ./configure (libevent-dev installed?)",
    )?;
    run(
        Command::new("make")
            .current_dir(&tree)
            .args(["-j2", "memcached"]),
        "make memcached",
    )?;
    Ok(())
}

fn run(command: &mut Command, what: &str) -> Result<String, Unavailable> {
    let out = command
        .output()
        .map_err(|e| Unavailable(format!("{what}: {e}")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        let lines: Vec<&str> = text.lines().collect();
        return Err(Unavailable(format!(
            "{what} failed ({}): {}",
            out.status,
            lines[lines.len().saturating_sub(20)..].join("\n")
        )));
    }
    Ok(text)
}
