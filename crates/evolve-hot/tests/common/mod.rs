//! The end-to-end tests' harness: a scratch copy of the fixture workspace, its host process
//! driven over stdin, and patches built from edited copies of its source.
#![allow(dead_code)]

use evolve_builder::so::{build_patch, Base, BuildOptions, BuildReport};
use evolve_testkit::{Lines, Workspace};
use serde_json::Value;
use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

/// The fixture workspace copied to `<target>/evolve-e2e/<name>`, built.
pub struct Fixture {
    pub dir: std::path::PathBuf,
    workspace: Workspace,
}

impl Fixture {
    /// Copies and builds the fixture (the host binary).
    pub fn new(name: &str) -> Fixture {
        let fixture = evolve_testkit::repository().join("crates/evolve-hot/tests/fixture");
        let workspace = Workspace::build(&fixture, name);
        Fixture {
            dir: workspace.dir.clone(),
            workspace,
        }
    }

    /// Rewrites the hot crate's source with `edits` (pairs of old, new text).
    pub fn edit(&self, edits: &[(&str, &str)]) {
        self.workspace.edit("hotfix/src/lib.rs", edits);
    }

    /// Builds a patch of the hot crate against the running `host`.
    pub fn build_patch(&self, host: &Host, name: &str) -> evolve_hot::Result<BuildReport> {
        let _claim = self.workspace.claim_target();
        build_patch(&BuildOptions {
            manifest_path: self.dir.join("Cargo.toml"),
            package: "hotfix".into(),
            base: Base::Pid(host.pid()),
            output: self.dir.join(format!("{name}.so")),
            profile: "release".into(),
            env: vec![(
                "CARGO_TARGET_DIR".into(),
                self.workspace.target.to_str().unwrap().into(),
            )],
            features: Vec::new(),
            no_default_features: false,
            built_with: Vec::new(),
        })
    }

    /// Starts the host.
    pub fn start(&self) -> Host {
        let mut child = Command::new(self.workspace.target.join("release/hothost"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut pipe, &mut buffer) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
                eprint!("{text}");
                sink.lock().unwrap().push_str(&text);
            }
        });
        let lines = Lines::read(child.stdout.take().unwrap());
        let stdin = child.stdin.take().unwrap();
        let mut host = Host {
            child,
            stdin,
            lines,
            events: Vec::new(),
            stderr,
        };
        let ready = host.answer();
        assert_eq!(ready["ready"], true);
        host
    }
}

/// A running host.
pub struct Host {
    child: Child,
    stdin: ChildStdin,
    lines: Lines,
    /// Lines that were not answers: log lines and completions of slow calls.
    pub events: Vec<String>,
    /// Everything the host wrote to stderr so far.
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Host {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn answer(&mut self) -> Value {
        loop {
            let line = self
                .lines
                .next(Duration::from_secs(60))
                .expect("the host answers within 60 s (did it crash?)");
            if line.starts_with("LOG ") || line.contains("slow_done") {
                self.events.push(line);
                continue;
            }
            return serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        }
    }

    /// Sends a command and returns its answer.
    pub fn send(&mut self, command: &str) -> Value {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        self.answer()
    }

    /// Waits for an event line containing `text`.
    pub fn wait_event(&mut self, text: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(i) = self.events.iter().position(|e| e.contains(text)) {
                return self.events.remove(i);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self.lines.next(left).expect("event arrives");
            self.events.push(line);
        }
    }

    /// Sends a command the host is expected not to survive; returns how it ended.
    pub fn send_fatal(&mut self, command: &str) -> std::process::ExitStatus {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        let status = evolve_testkit::wait_exit(&mut self.child, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("the host survived {command}"));
        std::thread::sleep(Duration::from_millis(100)); // let stderr drain
        status
    }

    /// Statistics, after letting the workers run for a moment.
    pub fn stats_after(&mut self, millis: u64) -> Value {
        std::thread::sleep(Duration::from_millis(millis));
        self.send("stats")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        if evolve_testkit::wait_exit(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
        }
    }
}

/// The edits that turn the fixture's v1 into v2 (the first also turns `scale_v1 // v1` into
/// `scale_v2 // v2`: v2's `scaler` hands out the patch's own `scale_v2`).
pub const V2: &[(&str, &str)] = &[
    ("1 // v1", "2 // v2"),
    ("helper(x) * 2 // v1", "helper(x) * 3 // v2"),
    (
        "format!(\"hello {name}\") // v1",
        "format!(\"hi {name}\") // v2",
    ),
    ("let started_as = 1; // v1", "let started_as = 2; // v2"),
];
pub mod plain;
