//! Test support shared by the workspace's tests: the number of calling threads of every stress
//! test ([`stress_threads`]); for the end-to-end tests of the hot-update layer and of the CLI, a
//! fixture workspace copied to a scratch directory and built there (so tests can edit its source
//! and build patches against its running host without touching the repository), and a host
//! process's output read line by line with timeouts.
//!
//! ```no_run
//! use evolve_testkit::{Lines, Workspace};
//! use std::process::{Command, Stdio};
//!
//! let fixture = evolve_testkit::repository().join("crates/evolve-hot/tests/fixture");
//! let workspace = Workspace::build(&fixture, "example");
//! let mut host = Command::new(workspace.target.join("release/hothost"))
//!     .stdin(Stdio::piped())
//!     .stdout(Stdio::piped())
//!     .spawn()?;
//! let lines = Lines::read(host.stdout.take().unwrap());
//! let ready = lines.next(std::time::Duration::from_secs(60));
//! # Ok::<(), std::io::Error>(())
//! ```
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

pub mod memcached;

/// The number of threads a stress test runs calls on: `EVOLVE_STRESS_THREADS` (default 4).
///
/// Every stress test of the workspace reads it here, so one variable oversubscribes them all
/// (`EVOLVE_STRESS_THREADS=32 cargo test --release`): more threads than cores is where
/// preemption lands in the middle of a write. A value that is not a positive number is refused
/// loudly rather than silently replaced.
///
/// ```
/// assert!(evolve_testkit::stress_threads() >= 1);
/// ```
pub fn stress_threads() -> usize {
    const DEFAULT: usize = 4;
    match std::env::var("EVOLVE_STRESS_THREADS") {
        Err(_) => DEFAULT,
        Ok(text) => match text.trim().parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => panic!("EVOLVE_STRESS_THREADS={text:?}: expected a number of threads (>= 1)"),
        },
    }
}

/// The repository's root.
pub fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository exists")
}

/// The repository's cargo target directory (`CARGO_TARGET_DIR`, or `<repository>/target`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repository().join("target"))
}

/// Builds the agent shared object `evolve attach` loads (`libevolve_attach_agent.so`, next to
/// the `evolve` binary `evolve_binary`) once per test process, and returns its path.
///
/// It builds the workspace's libraries, binaries, tests and examples — the units `cargo test
/// --workspace` builds — in the profile of `evolve_binary`'s directory: under the README's test
/// command everything else is already fresh and only the agent is linked. Building `-p
/// evolve-agent-so` alone resolved the dependencies' features for that package only and
/// compiled much of the dependency graph a second time (~9 minutes of a 2-core CI run); and
/// `--all-targets` would add `--benches`, which builds every library and binary as a benchmark
/// harness, even those with `test = false` (3 minutes).
///
/// ```no_run
/// let evolve = std::path::Path::new("target/release/evolve");
/// let agent = evolve_testkit::attach_agent(evolve);
/// assert!(agent.ends_with("release/libevolve_attach_agent.so"));
/// ```
pub fn attach_agent(evolve_binary: &Path) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let profile_dir = evolve_binary
                .parent()
                .expect("the binary is in a directory");
            let agent = profile_dir.join("libevolve_attach_agent.so");
            let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()));
            cargo
                .current_dir(repository())
                .args(["build", "-q", "--workspace", "--lib", "--bins", "--tests"])
                .arg("--examples");
            if profile_dir.ends_with("release") {
                cargo.arg("--release");
            }
            let status = cargo.status().expect("cargo runs");
            assert!(
                status.success() && agent.exists(),
                "building {}: {status}",
                agent.display()
            );
            agent
        })
        .clone()
}

/// Where scratch workspaces go: `<cargo target dir>-copies/evolve-e2e`, beside the target
/// directory and never inside it.
///
/// Cargo records a source file under the target directory relative to the target directory,
/// before it considers the package's root: a copy inside it would have its freshness checked
/// against the files of whichever copy built that crate last (the edit of a copy was not seen,
/// a fresh copy got another copy's edited crate).
pub fn scratch() -> PathBuf {
    let target = target_dir();
    let mut copies = target.clone().into_os_string();
    copies.push("-copies");
    PathBuf::from(copies).join("evolve-e2e")
}

/// A fixture workspace copied to `scratch()/<name>` and built (release profile).
#[derive(Debug, Clone)]
pub struct Workspace {
    /// The copy.
    pub dir: PathBuf,
    /// Its cargo target directory: the repository's own, shared by every copy, so the
    /// dependencies the repository's build compiled are not compiled again (cargo hashes a
    /// registry crate's artifacts by its version, features and profile, the same here; the
    /// repository's crates are compiled again, their hashes include their path relative to
    /// the workspace). `cargo test` does not hold the directory's lock while tests run.
    pub target: PathBuf,
}

impl Workspace {
    /// Copies `fixture` — a directory holding a workspace manifest `Cargo.toml.in` and its
    /// crates, with `@EVOLVE@` standing for the repository's `crates` directory — afresh to
    /// `scratch()/<name>` with the repository's lockfile, and builds it.
    pub fn build(fixture: &Path, name: &str) -> Workspace {
        Workspace::build_with(fixture, name, &[])
    }

    /// [`Workspace::build`] with extra environment for cargo (e.g. `CARGO_PROFILE_RELEASE_LTO`).
    pub fn build_with(fixture: &Path, name: &str, env: &[(&str, &str)]) -> Workspace {
        Workspace::build_in(fixture, name, env, target_dir())
    }

    /// [`Workspace::build_with`] into a target directory of its own (`<copy>/target`): for
    /// fixtures without dependencies whose tests run in parallel and need each copy's
    /// `target/release/<bin>` to stay theirs.
    pub fn build_isolated(fixture: &Path, name: &str, env: &[(&str, &str)]) -> Workspace {
        Workspace::build_in(fixture, name, env, scratch().join(name).join("target"))
    }

    fn build_in(fixture: &Path, name: &str, env: &[(&str, &str)], target: PathBuf) -> Workspace {
        let dir = scratch().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        copy_substituting(fixture, &dir);
        std::fs::rename(dir.join("Cargo.toml.in"), dir.join("Cargo.toml"))
            .expect("the fixture has a Cargo.toml.in");
        // The same dependency versions as the repository: shared, already-built artifacts.
        std::fs::copy(repository().join("Cargo.lock"), dir.join("Cargo.lock"))
            .expect("the repository has a Cargo.lock");
        let workspace = Workspace { dir, target };
        let _claim = workspace.claim_target();
        let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["build", "--release", "--quiet", "--manifest-path"])
            .arg(workspace.dir.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &workspace.target)
            .envs(env.iter().copied())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the fixture {name} failed");
        workspace
    }

    /// Holds the shared target directory for a build of this copy (cargo, or a patch builder
    /// that runs cargo and then reads what it built): the returned guard must live until the
    /// build's artifacts are read.
    ///
    /// Every copy of a fixture is the same workspace to cargo (unit hashes hash a package's
    /// path relative to its workspace root), so copies share their crates' artifacts and
    /// fingerprints in the shared target directory. Without this, a test's edited crate is
    /// taken as fresh when another copy built it later than the edit (cargo compares source
    /// mtimes with the last build's), or overwritten by another copy's build before the patch
    /// builder reads it, and the patch is built from another copy's source. So builds are
    /// serialised within the test process, and this copy's sources are marked as modified now,
    /// so that cargo rebuilds its own crates from them (dependencies stay shared).
    pub fn claim_target(&self) -> std::sync::MutexGuard<'static, ()> {
        static SHARED_TARGET: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let guard = SHARED_TARGET.lock().unwrap_or_else(|p| p.into_inner());
        touch_sources(&self.dir, std::time::SystemTime::now());
        guard
    }

    /// Rewrites `file` (relative to the copy) with `edits`, pairs of old and new text; each old
    /// text must be there.
    pub fn edit(&self, file: &str, edits: &[(&str, &str)]) {
        let path = self.dir.join(file);
        let mut text = std::fs::read_to_string(&path).expect("the file exists");
        for (old, new) in edits {
            assert!(text.contains(old), "{file} has no {old:?}");
            text = text.replace(old, new);
        }
        std::fs::write(path, text).expect("the copy is writable");
    }
}

/// Sets the modification time of every regular file under `dir` (but its `target`) to `now`.
fn touch_sources(dir: &Path, now: std::time::SystemTime) {
    for entry in std::fs::read_dir(dir).expect("the copy exists") {
        let entry = entry.expect("a directory entry");
        let path = entry.path();
        let kind = entry.file_type().expect("a file type");
        if kind.is_dir() {
            if entry.file_name() != "target" {
                touch_sources(&path, now);
            }
        } else if !kind.is_file() {
            // A FIFO a test made (opening it would wait for a writer), a socket: not source.
        } else if let Ok(file) = std::fs::File::options().write(true).open(&path) {
            file.set_modified(now).expect("the copy is writable");
        }
    }
}

fn copy_substituting(from: &Path, to: &Path) {
    let crates = repository().join("crates");
    std::fs::create_dir_all(to).expect("scratch is writable");
    for entry in std::fs::read_dir(from).expect("the fixture exists") {
        let entry = entry.expect("a directory entry");
        let dest = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            copy_substituting(&entry.path(), &dest);
        } else {
            let text = std::fs::read_to_string(entry.path()).expect("fixture files are text");
            let text = text.replace("@EVOLVE@", crates.to_str().expect("a UTF-8 path"));
            std::fs::write(&dest, text).expect("scratch is writable");
        }
    }
}

/// A child's output, read line by line on a thread of its own.
pub struct Lines {
    receiver: Receiver<String>,
}

impl Lines {
    /// Starts reading `output` (a child's stdout or stderr).
    pub fn read(output: impl Read + Send + 'static) -> Lines {
        let (sender, receiver) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(output).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Lines { receiver }
    }

    /// The next line, if one comes within `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<String> {
        self.receiver.recv_timeout(timeout).ok()
    }
}

/// Waits up to `timeout` for `child` to exit.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
