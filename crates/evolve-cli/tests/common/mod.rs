//! The CLI tests' harness: the fixture workspace built once, host processes with a private
//! socket directory each, and the `evolve` binary run against them.
#![allow(dead_code)]

use evolve_testkit::{Lines, Workspace};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// The fixture workspace (copied once per test binary) and its target directory.
pub struct Fixture {
    pub dir: PathBuf,
    pub target: PathBuf,
    workspace: Workspace,
}

/// Copies the fixture to `<scratch>/<name>` and builds its host.
pub fn fixture(name: &str) -> Fixture {
    let source = evolve_testkit::repository().join("crates/evolve-cli/tests/fixture");
    let workspace = Workspace::build(&source, &format!("ctl-{name}"));
    Fixture {
        dir: workspace.dir.clone(),
        target: workspace.target.clone(),
        workspace,
    }
}

/// One fixture shared by the tests that do not edit it.
pub fn shared() -> &'static Fixture {
    static SHARED: OnceLock<Fixture> = OnceLock::new();
    SHARED.get_or_init(|| fixture("shared"))
}

/// A private socket directory for one test.
pub fn socket_dir(name: &str) -> PathBuf {
    let dir = evolve_testkit::scratch().join("ctl-sockets").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A running host.
pub struct Host {
    pub child: Child,
    stdin: ChildStdin,
    lines: Lines,
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
        let lines = Lines::read(child.stdout.take().unwrap());
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

    /// Holds the shared target directory while this copy is built by `evolve build-patch`
    /// ([`Workspace::claim_target`]: another copy's build would otherwise be taken for this one's).
    pub fn claim_target(&self) -> std::sync::MutexGuard<'static, ()> {
        self.workspace.claim_target()
    }

    /// Rewrites the hot crate's source (pairs of old, new text).
    pub fn edit(&self, edits: &[(&str, &str)]) {
        self.workspace.edit("ctlhot/src/lib.rs", edits);
    }
}

impl Host {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn answer(&mut self) -> Value {
        let line = self
            .lines
            .next(Duration::from_secs(60))
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
    evolve_testkit::wait_exit(child, Duration::from_secs(20)).expect("host did not exit")
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
