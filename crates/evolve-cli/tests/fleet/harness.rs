//! The fleet's end-to-end harness: a real etcd (Debian's `etcd-server`) on loopback ports of its
//! own with its data in a scratch directory, and nodes as separate processes — each a kv example
//! server under a light checked load, with its own agent socket directory, managed by its own
//! `evolve node` daemon — driven by the real `evolve fleet` commands.

use evolve_demo::client::{Client, Load, LoadCounters};
use evolve_demo::server::Server;
use evolve_demo::workspace::{Flavor, KvWorkspace};
use evolve_fleet::store::Store;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One heavy fleet test at a time per test binary (each starts dozens of processes).
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A scratch directory, removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = evolve_testkit::scratch().join(format!("fleet-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test keeps its logs (each machine's node.log) for the post-mortem.
            eprintln!("kept for the post-mortem: {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A single-member etcd on loopback (its data in the test's scratch directory).
pub struct Etcd(evolve_fleet::local_etcd::LocalEtcd);

impl Etcd {
    pub fn start(dir: &Path) -> Etcd {
        Etcd(
            evolve_fleet::local_etcd::LocalEtcd::start(dir)
                .expect("etcd starts (.ci/run installs etcd-server)"),
        )
    }

    pub fn url(&self) -> String {
        self.0.url()
    }

    /// Stops etcd (SIGKILL) and starts it again on the same ports and data.
    pub fn restart(&mut self, down_for: Duration) {
        self.0.restart(down_for).unwrap();
    }

    /// A client store on the fleet's prefix.
    pub fn store(&self, runtime: &tokio::runtime::Runtime) -> Store {
        runtime
            .block_on(Store::connect(
                &[self.url()],
                evolve_fleet::keys::DEFAULT_PREFIX,
            ))
            .unwrap()
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The kv example built once per test binary, and a patch of it.
pub struct Example {
    pub workspace: KvWorkspace,
    pub binary: PathBuf,
}

impl Example {
    pub fn build(name: &str) -> Example {
        let workspace = KvWorkspace::prepare(name).unwrap();
        let binary = workspace.build(Flavor::Evolve).unwrap();
        Example { workspace, binary }
    }

    /// Builds `NAME.so` from the copy's source as edited now with `evolve build-patch`
    /// (signed with `key` if given), against a server started for the purpose: every node
    /// runs the same binary, so one build fits all.
    pub fn build_patch(&self, name: &str, key: Option<&Path>) -> PathBuf {
        let dir = self.workspace.dir.join("patch-base");
        let server = Server::start(&self.binary, Some(&dir)).unwrap();
        let output = self.workspace.dir.join(format!("{name}.so"));
        build_patch_cli(self, server.pid, &output, key);
        output
    }

    /// Replaces `old` with `new` in a file of the copy (relative to its root).
    pub fn edit(&self, file: &str, old: &str, new: &str) {
        let path = self.workspace.dir.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(old), "{file} has no {old:?}");
        std::fs::write(&path, text.replace(old, new)).unwrap();
    }
}

/// Runs `evolve ARGS` and returns its output.
pub fn evolve(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_evolve"))
        .args(args)
        .output()
        .unwrap()
}

/// Starts `evolve ARGS` in the background.
pub fn evolve_spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_evolve"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// One machine of the fleet: a kv server under load and its node daemon.
pub struct Machine {
    pub name: String,
    pub dir: PathBuf,
    pub server: Option<Server>,
    pub node: Option<Child>,
    pub load: Option<Load>,
    pub seen: Vec<Arc<LoadCounters>>,
    etcd_url: String,
    binary: PathBuf,
    trusted: Option<PathBuf>,
    agent_trusted: Option<PathBuf>,
    health: Option<String>,
}

/// How the machines run.
#[derive(Clone, Default)]
pub struct MachineOptions {
    /// The node's --trusted-keys.
    pub trusted: Option<PathBuf>,
    /// The servers' EVOLVE_TRUSTED_KEYS (their agents check signatures too).
    pub agent_trusted: Option<PathBuf>,
    /// The node's --health-cmd.
    pub health: Option<String>,
}

/// The pause between rounds of each machine's load client: light, 20 servers on 2 cores.
const PACE: Duration = Duration::from_millis(20);

impl Machine {
    pub fn start(
        name: &str,
        root: &Path,
        etcd: &Etcd,
        binary: &Path,
        options: &MachineOptions,
    ) -> Machine {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut machine = Machine {
            name: name.to_string(),
            dir,
            server: None,
            node: None,
            load: None,
            seen: Vec::new(),
            etcd_url: etcd.url(),
            binary: binary.to_path_buf(),
            trusted: options.trusted.clone(),
            agent_trusted: options.agent_trusted.clone(),
            health: options.health.clone(),
        };
        machine.start_server();
        machine.start_node();
        machine
    }

    pub fn sockets(&self) -> PathBuf {
        self.dir.join("sockets")
    }

    pub fn start_server(&mut self) {
        let env: Vec<(&str, &Path)> = self
            .agent_trusted
            .as_deref()
            .map(|p| ("EVOLVE_TRUSTED_KEYS", p))
            .into_iter()
            .collect();
        let server = Server::start_with(&self.binary, Some(&self.sockets()), &env).unwrap();
        self.load = Some(Load::start_paced(server.addr, 1, PACE));
        self.server = Some(server);
    }

    /// Stops the load and the server (SHUTDOWN), keeping what the load saw.
    pub fn stop_server(&mut self) {
        if let Some(load) = self.load.take() {
            self.seen.push(load.stop());
        }
        self.server = None;
    }

    pub fn start_node(&mut self) {
        let mut args = vec![
            "node".to_string(),
            "--etcd".into(),
            self.etcd_url.clone(),
            "--name".into(),
            self.name.clone(),
            "--socket-dir".into(),
            self.sockets().display().to_string(),
            "--cache".into(),
            self.dir.join("cache").display().to_string(),
            "--lease-ttl".into(),
            "2s".into(),
            "--scan-interval".into(),
            "300ms".into(),
            "--label".into(),
            "role=kv".into(),
        ];
        if let Some(t) = &self.trusted {
            args.extend(["--trusted-keys".into(), t.display().to_string()]);
        }
        if let Some(h) = &self.health {
            args.extend(["--health-cmd".into(), h.clone()]);
        }
        // The daemon's log, kept beside the machine for a failing test's post-mortem.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("node.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_evolve"))
            .args(&args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.node = Some(child);
    }

    /// Kills the node daemon (SIGKILL): its lease expires by itself.
    pub fn kill_node(&mut self) {
        if let Some(mut node) = self.node.take() {
            let _ = node.kill();
            let _ = node.wait();
        }
    }

    /// The server's `kv_version`.
    pub fn version(&self) -> String {
        let server = self.server.as_ref().expect("a server");
        Client::connect(server.addr).unwrap().info().unwrap()["kv_version"].clone()
    }

    pub fn pid(&self) -> u32 {
        self.server.as_ref().expect("a server").pid
    }

    /// What the load saw, in all (stops the current load).
    pub fn finish_load(&mut self) -> (u64, u64, u64) {
        if let Some(load) = self.load.take() {
            self.seen.push(load.stop());
        }
        self.seen.iter().fold((0, 0, 0), |(r, w, d), c| {
            (
                r + c.requests.load(Relaxed),
                w + c.wrong.load(Relaxed),
                d + c.dropped.load(Relaxed),
            )
        })
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.kill_node();
        if let Some(load) = self.load.take() {
            load.stop();
        }
    }
}

/// Starts `n` machines `n00`… in parallel threads.
pub fn machines(
    n: usize,
    root: &Path,
    etcd: &Etcd,
    binary: &Path,
    options: &MachineOptions,
) -> Vec<Machine> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                s.spawn(move || Machine::start(&format!("n{i:02}"), root, etcd, binary, options))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Waits (bounded) until `condition` holds; panics with `what` otherwise.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

/// Waits until `n` nodes are registered.
pub fn wait_registered(runtime: &tokio::runtime::Runtime, store: &Store, n: usize) {
    wait_for(
        &format!("{n} nodes registered with a process"),
        Duration::from_secs(60),
        || {
            runtime
                .block_on(evolve_fleet::controller::nodes(store))
                .map(|nodes| nodes.values().filter(|n| !n.processes.is_empty()).count() >= n)
                .unwrap_or(false)
        },
    );
}

/// Every change of every key under `prefix` in etcd's history, oldest first: one watch from
/// revision 1, read until it has been quiet for a second.
pub fn history(
    runtime: &tokio::runtime::Runtime,
    store: &Store,
    prefix: &str,
) -> Vec<evolve_fleet::store::WatchEvent> {
    runtime.block_on(async {
        let mut events = store.watch(prefix, 1).await.unwrap();
        let mut all = Vec::new();
        while let Ok(Some(batch)) =
            tokio::time::timeout(Duration::from_secs(1), events.recv()).await
        {
            for event in batch {
                if let evolve_fleet::store::WatchEvent::Compacted(_) = event {
                    panic!("the history was compacted");
                }
                if !matches!(event, evolve_fleet::store::WatchEvent::Progress(_)) {
                    all.push(event);
                }
            }
        }
        all
    })
}

/// Builds a patch with `evolve build-patch` against `pid`, signed with `key` if given.
pub fn build_patch_cli(example: &Example, pid: u32, output: &Path, key: Option<&Path>) {
    let manifest = example.workspace.dir.join("Cargo.toml");
    let pid = pid.to_string();
    let mut args = vec![
        "build-patch",
        "--manifest-path",
        manifest.to_str().unwrap(),
        "-p",
        "kv-commands",
        "--no-default-features",
        "--features",
        "evolve",
        "--pid",
        &pid,
        "-o",
        output.to_str().unwrap(),
    ];
    if let Some(key) = key {
        args.extend(["--sign", key.to_str().unwrap()]);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_evolve"))
        .args(&args)
        .env("CARGO_TARGET_DIR", &example.workspace.target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build-patch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `evolve keygen NAME --dir DIR`: the secret key's path.
pub fn keygen(name: &str, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let out = evolve(&["keygen", name, "--dir", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join(format!("{name}.key"))
}
