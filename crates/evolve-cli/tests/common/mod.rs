//! The CLI tests' harness: the fixture workspace built once, host processes with a private
//! socket directory each, and the `evolve` binary run against them.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::OnceLock;
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The scratch root: under the cargo target directory.
fn scratch() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    target.join("evolve-ctl-e2e")
}

/// The fixture workspace (copied once per test binary) and its target directory.
pub struct Fixture {
    pub dir: PathBuf,
    pub target: PathBuf,
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

/// Copies the fixture to `<scratch>/<name>` and builds its host.
pub fn fixture(name: &str) -> Fixture {
    let dir = scratch().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&repo().join("crates/evolve-cli/tests/fixture"), &dir);
    std::fs::rename(dir.join("Cargo.toml.in"), dir.join("Cargo.toml")).unwrap();
    std::fs::copy(repo().join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    let fixture = Fixture {
        dir,
        target: scratch().join("target"),
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

/// One fixture shared by the tests that do not edit it.
pub fn shared() -> &'static Fixture {
    static SHARED: OnceLock<Fixture> = OnceLock::new();
    SHARED.get_or_init(|| fixture("shared"))
}

/// A private socket directory for one test.
pub fn socket_dir(name: &str) -> PathBuf {
    let dir = scratch().join("sockets").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A running host.
pub struct Host {
    pub child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    pub socket: PathBuf,
    pub dir: PathBuf,
}

impl Fixture {
    /// Starts the host with its socket in `dir`.
    pub fn start(&self, dir: &Path) -> Host {
        let mut child = Command::new(self.target.join("release/ctlhost"))
            .env("EVOLVE_SOCKET_DIR", dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
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
            socket: PathBuf::new(),
            dir: dir.to_path_buf(),
        };
        let ready = host.answer();
        assert_eq!(ready["ready"], true);
        host.socket = PathBuf::from(ready["socket"].as_str().unwrap());
        host
    }

    /// Rewrites the hot crate's source (pairs of old, new text).
    pub fn edit(&self, edits: &[(&str, &str)]) {
        let path = self.dir.join("ctlhot/src/lib.rs");
        let mut text = std::fs::read_to_string(&path).unwrap();
        for (old, new) in edits {
            assert!(text.contains(old), "fixture has no {old:?}");
            text = text.replace(old, new);
        }
        std::fs::write(path, text).unwrap();
    }
}

impl Host {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn answer(&mut self) -> Value {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the host answers within 60 s (did it crash?)");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    /// The host's own view: `{"price": price(3), "checksum": checksum(5), "level": LEVEL}`.
    pub fn probe(&mut self) -> Value {
        writeln!(self.stdin, "price").unwrap();
        self.stdin.flush().unwrap();
        self.answer()
    }

    /// Asks the host to run `rare(3)` once (a function nothing else calls): `{"rare": ...}`.
    pub fn rare(&mut self) -> Value {
        writeln!(self.stdin, "rare").unwrap();
        self.stdin.flush().unwrap();
        self.answer()
    }

    /// Asks the host to exit and waits for it.
    pub fn quit(mut self) -> std::process::ExitStatus {
        writeln!(self.stdin, "quit").unwrap();
        self.stdin.flush().unwrap();
        wait(&mut self.child)
    }
}

fn wait(child: &mut Child) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "host did not exit");
        std::thread::sleep(Duration::from_millis(20));
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

/// The result of running `evolve`.
pub struct Run {
    pub output: Output,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.output.status.success()
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    /// Stdout parsed as one JSON value.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout().trim()).unwrap_or_else(|e| {
            panic!("{e}: stdout {:?} stderr {:?}", self.stdout(), self.stderr())
        })
    }
    /// Asserts success and parses stdout.
    pub fn expect_json(&self) -> Value {
        assert!(self.ok(), "evolve failed: {}", self.stderr());
        self.json()
    }
}

/// Runs `evolve ARGS` with the socket directory `dir`, configured by `f`.
pub fn evolve_with(dir: &Path, args: &[&str], f: impl FnOnce(&mut Command)) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_evolve"));
    command.args(args).env("EVOLVE_SOCKET_DIR", dir);
    f(&mut command);
    let output = command.output().unwrap();
    Run { output }
}

/// Runs `evolve ARGS` with the socket directory `dir`.
pub fn evolve(dir: &Path, args: &[&str]) -> Run {
    evolve_with(dir, args, |_| {})
}
