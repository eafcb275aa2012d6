//! The harness of the format-2 tests: a copy of the plain fixture (built with plain
//! `cargo build --release`, no Evolve mark, no build script), its host driven over stdin, and
//! format-2 patches built by the builder from edited copies of its source.

use evolve_builder::{build_patch, Base, BuildOptions, BuildReport};
use evolve_testkit::{Lines, Workspace};
use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

/// Every target of the host, in its order.
pub const TARGETS: &[&str] = &[
    "free",
    "area_dyn",
    "area_generic",
    "twice",
    "closure",
    "local",
    "scaled",
    "scaled_xor",
    "other",
];

/// The plain fixture, copied and built.
pub struct PlainFixture {
    pub workspace: Workspace,
}

impl PlainFixture {
    pub fn new(name: &str) -> PlainFixture {
        let fixture = evolve_testkit::repository().join("crates/evolve-hot/tests/plain_fixture");
        PlainFixture {
            workspace: Workspace::build(&fixture, name),
        }
    }

    /// Edits a file of the copy (`plainlib/src/lib.rs`, `plainhost/src/main.rs`).
    pub fn edit(&self, file: &str, edits: &[(&str, &str)]) {
        self.workspace.edit(file, edits);
    }

    /// Builds a format-2 patch against the running `host`, on top of `applied`.
    pub fn build(
        &self,
        host: &PlainHost,
        name: &str,
        applied: &[&PathBuf],
    ) -> evolve_builder::Result<BuildReport> {
        let mut options = BuildOptions::new(
            self.workspace.dir.join("Cargo.toml"),
            Base::Pid(host.pid()),
            self.workspace.dir.join(format!("{name}.o")),
        );
        options.env = vec![(
            "CARGO_TARGET_DIR".into(),
            self.workspace.target.display().to_string(),
        )];
        options.applied = applied.iter().map(|p| (*p).clone()).collect();
        let _claim = self.workspace.claim_target();
        build_patch(&options)
    }

    /// Starts the host with `EVOLVE_STRESS_THREADS` calling threads.
    pub fn start(&self) -> PlainHost {
        self.start_with(&[], &[])
    }

    /// Starts the host with arguments (`--agent`) and environment variables.
    pub fn start_with(&self, args: &[&str], env: &[(&str, &std::path::Path)]) -> PlainHost {
        // The binary as built now: later patch builds rebuild the workspace in place.
        let binary = self.workspace.dir.join("plainhost.running");
        let _ = std::fs::remove_file(&binary);
        std::fs::copy(self.workspace.target.join("release/plainhost"), &binary).unwrap();
        let mut child = Command::new(&binary)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env(
                "EVOLVE_STRESS_THREADS",
                evolve_testkit::stress_threads().to_string(),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let lines = Lines::read(child.stdout.take().unwrap());
        let stdin = child.stdin.take().unwrap();
        let mut host = PlainHost {
            child,
            stdin,
            lines,
            socket: None,
        };
        let ready = host.answer();
        host.socket = ready["socket"].as_str().map(PathBuf::from);
        assert_eq!(ready["ready"], true, "{ready}");
        assert!(
            ready["versions"].as_array().unwrap().iter().all(|v| v == 1),
            "{ready}"
        );
        host
    }
}

/// A running host.
pub struct PlainHost {
    child: Child,
    stdin: ChildStdin,
    lines: Lines,
    /// The agent's socket (started with `--agent`).
    pub socket: Option<PathBuf>,
}

impl PlainHost {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn answer(&mut self) -> Value {
        let line = self
            .lines
            .next(Duration::from_secs(120))
            .expect("the host answers within 120 s (did it crash?)");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    /// Sends a command and returns its answer.
    pub fn send(&mut self, command: &str) -> Value {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        self.answer()
    }

    /// Marks a change made from outside (the CLI): calls counted from now on started after it.
    pub fn epoch(&mut self) {
        let answer = self.send("epoch");
        assert!(answer["epoch"].is_u64(), "{answer}");
    }

    /// Applies a patch; panics with the host's message if it is refused.
    pub fn apply(&mut self, patch: &std::path::Path) -> Value {
        let answer = self.send(&format!("apply {}", patch.display()));
        assert_eq!(answer["ok"], true, "{answer}");
        answer
    }

    /// The versions each target returned in calls started since the last change, after the
    /// threads ran a while (at least `min_calls` calls of every target); no wrong result ever.
    pub fn versions(&mut self, min_calls: u64) -> std::collections::BTreeMap<String, [u64; 4]> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let stats = self.send("stats");
            assert_eq!(stats["errors"], 0, "wrong results: {stats}");
            let mut out = std::collections::BTreeMap::new();
            for target in TARGETS {
                let counts = &stats["versions"][target];
                let mut c = [0u64; 4];
                for (i, slot) in c.iter_mut().enumerate() {
                    *slot = counts[i].as_u64().unwrap_or(0);
                }
                out.insert(target.to_string(), c);
            }
            if out.values().all(|c| c.iter().sum::<u64>() >= min_calls) {
                return out;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the threads made too few calls: {stats}"
            );
        }
    }

    /// Asserts every call started since the last change returned `expected(target)`'s version.
    pub fn assert_versions(&mut self, expected: impl Fn(&str) -> u64) {
        for (target, counts) in self.versions(50) {
            let v = expected(&target) as usize;
            for (i, n) in counts.iter().enumerate() {
                if i + 1 != v {
                    assert_eq!(
                        *n,
                        0,
                        "{target}: {n} calls returned version {} after the change, only version \
                         {v} expected ({counts:?})",
                        i + 1
                    );
                }
            }
            assert!(counts[v - 1] > 0, "{target}: no call of version {v}");
        }
    }
}

impl Drop for PlainHost {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        if evolve_testkit::wait_exit(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
        }
    }
}

/// A listing of `{name, versions}` objects (the host's `functions` answer, `evolve functions
/// --json`'s symbols) as (name, versions) pairs.
pub fn names_and_versions(listing: &Value) -> Vec<(String, Vec<String>)> {
    listing
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_string(),
                f["versions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}
