//! The end-to-end tests' harness: a scratch copy of the fixture workspace, its host process
//! driven over stdin, and patches built from edited copies of its source.
#![allow(dead_code)]

use evolve_hot::builder::{build_patch, Base, BuildOptions, BuildReport};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The fixture workspace copied to `target/evolve-e2e/<name>`, built.
pub struct Fixture {
    pub dir: PathBuf,
    target: PathBuf,
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            let crates = repo().join("crates");
            std::fs::write(&dest, text.replace("@EVOLVE@", crates.to_str().unwrap())).unwrap();
        }
    }
}

impl Fixture {
    /// Copies and builds the fixture (the host binary).
    pub fn new(name: &str) -> Fixture {
        let root = repo().join("target/evolve-e2e");
        let dir = root.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        copy_dir(&repo().join("crates/evolve-hot/tests/fixture"), &dir);
        std::fs::rename(dir.join("Cargo.toml.in"), dir.join("Cargo.toml")).unwrap();
        // The same dependency versions as the workspace: shared, already-built artifacts.
        std::fs::copy(repo().join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
        let fixture = Fixture {
            dir,
            target: root.join("target"),
        };
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "--quiet", "--manifest-path"])
            .arg(fixture.dir.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &fixture.target)
            .status()
            .unwrap();
        assert!(status.success(), "building the fixture host failed");
        fixture
    }

    /// Rewrites the hot crate's source with `edits` (pairs of old, new text).
    pub fn edit(&self, edits: &[(&str, &str)]) {
        let path = self.dir.join("hotfix/src/lib.rs");
        let mut text = std::fs::read_to_string(&path).unwrap();
        for (old, new) in edits {
            assert!(text.contains(old), "fixture has no {old:?}");
            text = text.replace(old, new);
        }
        std::fs::write(path, text).unwrap();
    }

    /// Builds a patch of the hot crate against the running `host`.
    pub fn build_patch(&self, host: &Host, name: &str) -> evolve_hot::Result<BuildReport> {
        build_patch(&BuildOptions {
            manifest_path: self.dir.join("Cargo.toml"),
            package: "hotfix".into(),
            base: Base::Pid(host.pid()),
            output: self.dir.join(format!("{name}.so")),
            profile: "release".into(),
            env: vec![(
                "CARGO_TARGET_DIR".into(),
                self.target.to_str().unwrap().into(),
            )],
            features: Vec::new(),
            no_default_features: false,
        })
    }

    /// Starts the host.
    pub fn start(&self) -> Host {
        let mut child = Command::new(self.target.join("release/hothost"))
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
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
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
    lines: Receiver<String>,
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
                .recv_timeout(Duration::from_secs(60))
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
            let line = self.lines.recv_timeout(left).expect("event arrives");
            self.events.push(line);
        }
    }

    /// Sends a command the host is expected not to survive; returns how it ended.
    pub fn send_fatal(&mut self, command: &str) -> std::process::ExitStatus {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100)); // let stderr drain
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the host survived {command}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
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
