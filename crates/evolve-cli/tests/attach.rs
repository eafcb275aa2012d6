//! `evolve attach` against real, unmodified programs: a C server and a Rust server built with
//! plain `cargo build --release` (neither knows Evolve), and memcached from Debian under
//! `memcslap`. Each: attach under load, count/latency/histogram probes on request handlers,
//! read them, remove them, detach — with zero failed requests, no dropped connection, the code
//! bytes identical afterwards and the resident memory back within a stated bound. Then every
//! refusal, each followed by a check that the target is exactly as it was.

use serde_json::Value as Json;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// After detach, the target's resident memory may exceed its level before attach by at most
/// this much: the agent object stays mapped (its code pages that ran), plus its threads' stacks
/// and allocator arenas touched while serving.
const RSS_BOUND_KIB: u64 = 48 * 1024;

fn scratch(name: &str) -> PathBuf {
    let dir = evolve_testkit::scratch().join("attach").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The agent shared object next to the `evolve` binary (built once per test run).
fn agent_built() {
    evolve_testkit::attach_agent(Path::new(env!("CARGO_BIN_EXE_evolve")));
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixture/attach")
        .join(name)
}

/// Compiles a C fixture with `cc` (extra flags: `-static`, …) or `musl-gcc`.
fn cc(compiler: &str, source: &str, out: &Path, flags: &[&str]) -> Option<PathBuf> {
    let status = Command::new(compiler)
        .args(["-O2", "-o"])
        .arg(out)
        .arg(fixture(source))
        .args(flags)
        .args(["-lpthread"])
        .status()
        .ok()?;
    status.success().then(|| out.to_path_buf())
}

struct Target {
    child: Child,
    dir: PathBuf,
}

impl Target {
    fn start(program: &Path, args: &[&str], dir: &Path) -> Target {
        Target::start_with_env(program, args, dir, &[])
    }

    fn start_with_env(program: &Path, args: &[&str], dir: &Path, env: &[(&str, &Path)]) -> Target {
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(dir)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Target {
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a server's port file.
    fn port(&self) -> u16 {
        let file = self.dir.join("port");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(p) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return p;
            }
            assert!(Instant::now() < deadline, "no port file");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What must be unchanged after a refusal: mappings, threads, tracer, and no agent socket.
#[derive(Debug, PartialEq)]
struct Snapshot {
    maps: Vec<String>,
    threads: usize,
    state: String,
}

fn snapshot(pid: u32) -> Snapshot {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            format!("{} {} {}", f[0], f[1], f.get(5).unwrap_or(&""))
        })
        .collect();
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    // Running, runnable or asleep are one state here (an idle target wakes now and then);
    // stopped, traced, zombie are not.
    let state = status
        .lines()
        .filter(|l| l.starts_with("State") || l.starts_with("TracerPid"))
        .map(|l| match l.split_whitespace().nth(1) {
            Some("R" | "S" | "D") if l.starts_with("State") => "State:\trunning",
            _ => l,
        })
        .collect::<Vec<_>>()
        .join(" ");
    Snapshot {
        maps,
        threads,
        state,
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

/// Runs `evolve ARGS --json` with the test's socket directory.
fn evolve(sockets: &Path, args: &[&str]) -> Result<Json, String> {
    agent_built();
    let output = Command::new(env!("CARGO_BIN_EXE_evolve"))
        .args(args)
        .arg("--json")
        .env("EVOLVE_SOCKET_DIR", sockets)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "{}{}",
            stdout,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    serde_json::from_str(stdout.trim()).map_err(|e| format!("{e}: {stdout}"))
}

fn ok(sockets: &Path, args: &[&str]) -> Json {
    evolve(sockets, args).unwrap_or_else(|e| panic!("evolve {args:?}: {e}"))
}

/// Client load over long-lived connections: every reply checked, every failure counted.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Result<(), String>>>,
}

impl Load {
    fn start(port: u16, connections: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let threads = (0..connections)
            .map(|c| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || -> Result<(), String> {
                    let stream =
                        TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
                    stream
                        .set_read_timeout(Some(Duration::from_secs(30)))
                        .unwrap();
                    let mut writer = stream.try_clone().unwrap();
                    let mut reader = BufReader::new(stream);
                    let mut line = String::new();
                    let mut i = 0u64;
                    while !stop.load(Relaxed) {
                        i += 1;
                        let (request, expect) = match i % 50 {
                            0 => ("STATS\n".to_string(), "STATS "),
                            n if n % 2 == 0 => (format!("SET k{c} {i}\n"), "OK"),
                            _ => (format!("GET k{c}\n"), "VALUE "),
                        };
                        writer
                            .write_all(request.as_bytes())
                            .map_err(|e| format!("write: {e}"))?;
                        line.clear();
                        let n = reader
                            .read_line(&mut line)
                            .map_err(|e| format!("read: {e}"))?;
                        if n == 0 {
                            return Err("connection dropped".into());
                        }
                        if line.starts_with(expect) {
                            ok.fetch_add(1, Relaxed);
                        } else {
                            failed.fetch_add(1, Relaxed);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            threads,
        }
    }

    fn wait_for(&self, requests: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let start = self.ok.load(Relaxed);
        while self.ok.load(Relaxed) < start + requests {
            assert!(Instant::now() < deadline, "the load stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops; returns (ok, failed) and every connection's outcome.
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Relaxed);
        for t in self.threads {
            t.join().unwrap().expect("a connection failed or dropped");
        }
        (self.ok.load(Relaxed), self.failed.load(Relaxed))
    }
}

/// The first `len` bytes of each named function, read through /proc/PID/mem at the addresses
/// the probes reported.
fn code_bytes(pid: u32, addresses: &[(String, u64)]) -> Vec<(String, Vec<u8>)> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    addresses
        .iter()
        .map(|(name, a)| {
            let mut b = vec![0u8; 32];
            mem.read_exact_at(&mut b, *a).unwrap();
            (name.clone(), b)
        })
        .collect()
}

/// The runtime addresses of `names` in `exe` mapped by `pid` (nm + the load bias from maps).
fn addresses(pid: u32, exe: &Path, names: &[&str]) -> Vec<(String, u64)> {
    addresses_from(pid, exe, exe, names)
}

/// As [`addresses`], with the symbols read from `symbols` (e.g. `exe`'s separate debug file).
fn addresses_from(pid: u32, exe: &Path, symbols: &Path, names: &[&str]) -> Vec<(String, u64)> {
    let nm = Command::new("nm")
        .arg("--defined-only")
        .arg(symbols)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&nm.stdout);
    let exe_path = std::fs::canonicalize(exe).unwrap().display().to_string();
    let bias = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .find(|l| l.ends_with(&exe_path))
        .and_then(|l| u64::from_str_radix(l.split('-').next()?, 16).ok())
        .unwrap();
    names
        .iter()
        .map(|n| {
            let value = text
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    let symbol = f.get(2)?;
                    (symbol == n || rustc_name_matches(symbol, n))
                        .then(|| u64::from_str_radix(f[0], 16).ok())?
                })
                .unwrap_or_else(|| panic!("no symbol {n} in {}", exe.display()));
            (n.to_string(), bias + value)
        })
        .collect()
}

/// Whether mangled `symbol` is the Rust path `path` (legacy mangling: `_ZN<len><seg>...17h...E`).
fn rustc_name_matches(symbol: &str, path: &str) -> bool {
    let mut mangled = String::from("_ZN");
    for seg in path.split("::") {
        mangled.push_str(&format!("{}{seg}", seg.len()));
    }
    symbol.starts_with(&mangled) && symbol[mangled.len()..].starts_with("17h")
}

/// The scenario of the issue on one server: attach under load; count, latency and histogram
/// probes on its handlers; read; remove; detach; check everything.
fn probe_a_live_server(name: &str, program: &Path, handlers: [&str; 3], dir: &Path) {
    let sockets = dir.join("sockets");
    let target = Target::start(program, &[dir.join("port").to_str().unwrap()], dir);
    let pid = target.pid();
    let port = target.port();
    let load = Load::start(port, 4);
    load.wait_for(500);
    let rss_before = rss_kib(pid);
    let before = code_bytes(pid, &addresses(pid, program, &handlers));
    let threads_before = snapshot(pid).threads;

    let attached = ok(&sockets, &["attach", &pid.to_string()]);
    assert_eq!(attached["reused"], false, "{attached}");
    assert!(attached["threads_seized"].as_u64().unwrap() as usize >= threads_before);
    let again = ok(&sockets, &["attach", &pid.to_string()]);
    assert_eq!(
        again["reused"], true,
        "a second attach reuses the agent: {again}"
    );
    let ps = ok(&sockets, &["ps"]);
    let listed = ps["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap();
    assert_eq!(listed["attached"], true, "{ps}");
    let status = ok(&sockets, &["status", &pid.to_string()]);
    assert_eq!(status["hello"]["attached"], true);
    // The agent's thread state went to glibc's static-TLS surplus: the probes' fast paths
    // address it at one offset from the thread pointer.
    assert!(
        status["hello"]["static_tls_offset"]
            .as_i64()
            .is_some_and(|o| o < 0),
        "{status}"
    );

    let p = pid.to_string();
    let [get, set, stats] = handlers;
    ok(&sockets, &["probe", &p, "add", get, "--count"]);
    ok(&sockets, &["probe", &p, "add", stats, "--latency"]);
    ok(&sockets, &["probe", &p, "add", set, "--hist", "arg1"]);
    load.wait_for(2000);
    let readings = ok(&sockets, &["probe", &p, "read"]);
    let reading = |f: &str| -> Json {
        readings["readings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| {
                r["function"]
                    .as_str()
                    .unwrap()
                    .ends_with(f.rsplit("::").next().unwrap())
            })
            .unwrap_or_else(|| panic!("no reading of {f}: {readings}"))
            .clone()
    };
    assert!(reading(get)["calls"].as_u64().unwrap() > 100, "{readings}");
    let latency = reading(stats)["latency"].clone();
    assert!(latency["count"].as_u64().unwrap() > 0, "{readings}");
    assert!(latency["mean_ns"].as_f64().unwrap() > 0.0);
    let hist = reading(set)["histogram"].as_array().unwrap().clone();
    assert!(!hist.is_empty(), "{readings}");
    let top = ok(&sockets, &["top", &p, "--once"]);
    assert!(
        top["probes"]["readings"]
            .as_array()
            .is_some_and(|a| a.len() == 3),
        "{top}"
    );

    ok(&sockets, &["probe", &p, "rm", "--all"]);
    let after_rm = code_bytes(pid, &addresses(pid, program, &handlers));
    assert_eq!(
        before, after_rm,
        "{name}: code bytes identical after removing every probe"
    );
    ok(&sockets, &["probe", &p, "add", get, "--count"]);
    let history = ok(&sockets, &["history", &p]);
    assert!(
        history["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["op"] == "probe_rm"),
        "{history}"
    );
    let detached = ok(&sockets, &["detach", &p]);
    assert_eq!(detached["probes_removed"], 1, "{detached}");
    let history_gone = evolve(&sockets, &["history", &p]);
    assert!(
        history_gone.is_err(),
        "the agent stopped: its socket is gone"
    );
    let after = code_bytes(pid, &addresses(pid, program, &handlers));
    assert_eq!(before, after, "{name}: code bytes identical after detach");
    load.wait_for(500);
    // Attach after detach restarts the agent already loaded, with the history so far.
    let back = ok(&sockets, &["attach", &p]);
    assert_eq!(back["reused"], false);
    ok(&sockets, &["status", &p]);
    let history_back = ok(&sockets, &["history", &p]);
    let ops: Vec<&str> = history_back["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["op"].as_str().unwrap())
        .collect();
    assert!(
        ops.starts_with(&[
            "probe_add",
            "probe_add",
            "probe_add",
            "probe_rm",
            "probe_add",
            "detach"
        ]),
        "{name}: the journal goes on across detach and attach: {history_back}"
    );
    let file = history_back["file"].as_str().unwrap();
    let lines = std::fs::read_to_string(file).unwrap();
    assert_eq!(
        lines.lines().count(),
        ops.len(),
        "{name}: the journal file {file} keeps every entry: {lines}"
    );
    ok(&sockets, &["detach", &p]);

    // The agent's threads are gone (the cleanup thread too, once the loader exited).
    let deadline = Instant::now() + Duration::from_secs(10);
    while snapshot(pid).threads != threads_before {
        assert!(
            Instant::now() < deadline,
            "{name}: agent threads left behind"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let rss_after = rss_kib(pid);
    let (done, failed) = load.finish();
    assert_eq!(failed, 0, "{name}: failed requests");
    assert!(done > 3000);
    assert!(
        rss_after <= rss_before + RSS_BOUND_KIB,
        "{name}: RSS {rss_before} KiB before attach, {rss_after} KiB after detach"
    );
    eprintln!("{name}: {done} requests, 0 failed; RSS {rss_before} -> {rss_after} KiB; {attached}");
}

#[test]
fn a_c_server_is_probed_live_and_left_as_it_was() {
    let dir = scratch("c-server");
    let server =
        cc("cc", "server.c", &dir.join("server"), &["-g"]).expect("cc builds the C fixture");
    probe_a_live_server(
        "C server",
        &server,
        ["handle_get", "handle_set", "handle_stats"],
        &dir,
    );
}

#[test]
fn a_plain_rust_server_is_probed_live_and_left_as_it_was() {
    let dir = scratch("rust-server");
    let target = dir.join("target");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-q", "--manifest-path"])
        .arg(fixture("plainserver/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .env_remove("RUSTFLAGS")
        .status()
        .unwrap();
    assert!(status.success());
    let server = target.join("release/plainserver");
    probe_a_live_server(
        "Rust server",
        &server,
        [
            "plainserver::handle_get",
            "plainserver::handle_set",
            "plainserver::handle_stats",
        ],
        &dir,
    );
}

fn expect_refusal(sockets: &Path, pid: u32, needle: &str) -> String {
    let before = snapshot(pid);
    let error = evolve(sockets, &["attach", &pid.to_string()]).expect_err("attach must be refused");
    assert!(error.contains(needle), "expected {needle:?} in: {error}");
    if Path::new(&format!("/proc/{pid}")).exists() {
        assert_eq!(
            before,
            snapshot(pid),
            "the target changed after a refusal: {error}"
        );
    }
    assert!(
        !sockets.join(format!("{pid}.sock")).exists(),
        "a socket was left behind"
    );
    error
}

#[test]
fn refusals_name_their_cause_and_leave_the_target_as_it_was() {
    let dir = scratch("refusals");
    let sockets = dir.join("sockets");
    expect_refusal(&sockets, 1, "PID 1 is init");
    expect_refusal(&sockets, 2, "kernel thread");
    expect_refusal(&sockets, 999_999_999, "no process");

    // A zombie: `true` exits; its parent (exec'd into sleep) never reaps it.
    let parent = Target::start(Path::new("/bin/sh"), &["-c", "true & exec sleep 30"], &dir);
    let deadline = Instant::now() + Duration::from_secs(10);
    let zombie = loop {
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", parent.pid()))
                .unwrap_or_default();
        if let Some(z) = children
            .split_whitespace()
            .next()
            .and_then(|c| c.parse::<u32>().ok())
        {
            if snapshot(z).state.contains("Z (zombie)") {
                break z;
            }
        }
        assert!(Instant::now() < deadline, "no zombie appeared");
        std::thread::sleep(Duration::from_millis(10));
    };
    expect_refusal(&sockets, zombie, "zombie");

    // Static and musl binaries.
    let idle = cc("cc", "idle.c", &dir.join("idle"), &[]).unwrap();
    if let Some(static_idle) = cc("cc", "idle.c", &dir.join("idle-static"), &["-static"]) {
        let t = Target::start(&static_idle, &[], &dir);
        std::thread::sleep(Duration::from_millis(50));
        expect_refusal(&sockets, t.pid(), "statically linked");
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI builds a static binary (libc6-dev)"
        );
        eprintln!("no static libc: skipping the static case");
    }
    match cc("musl-gcc", "idle.c", &dir.join("idle-musl"), &[]) {
        Some(musl) => {
            let t = Target::start(&musl, &[], &dir);
            std::thread::sleep(Duration::from_millis(50));
            expect_refusal(&sockets, t.pid(), "musl");
        }
        None => {
            assert!(std::env::var_os("CI").is_none(), "CI installs musl-tools");
            eprintln!("musl-gcc not installed: skipping the musl case");
        }
    }

    // Seccomp: the filter makes socket(2), which the agent's control socket needs, fail.
    let filtered = Target::start(&idle, &["seccomp"], &dir);
    std::thread::sleep(Duration::from_millis(50));
    let e = expect_refusal(&sockets, filtered.pid(), "seccomp");
    assert!(e.contains("socket"), "{e}");

    // Another evolve command: `evolve status` waits for the reply of an "agent" (a socket of
    // this test's that accepts and never answers) while we try to attach to it.
    let quiet = dir.join("quiet-sockets");
    std::fs::create_dir_all(&quiet).unwrap();
    let listener =
        std::os::unix::net::UnixListener::bind(quiet.join(format!("{}.sock", std::process::id())))
            .unwrap();
    let waiting = Command::new(env!("CARGO_BIN_EXE_evolve"))
        .args(["status", &std::process::id().to_string()])
        .env("EVOLVE_SOCKET_DIR", &quiet)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let waiting = Target {
        child: waiting,
        dir: dir.clone(),
    };
    let (_held, _) = listener.accept().unwrap();
    expect_refusal(&sockets, waiting.pid(), "evolve process itself");
    drop(waiting);

    // Already traced: this test seizes it first.
    let traced = Target::start(&idle, &[], &dir);
    std::thread::sleep(Duration::from_millis(50));
    let tpid = nix::unistd::Pid::from_raw(traced.pid() as i32);
    nix::sys::ptrace::seize(tpid, nix::sys::ptrace::Options::empty()).unwrap();
    expect_refusal(&sockets, traced.pid(), "already traced");
    // Release it by a thread of ours exiting? The seize belongs to this thread: detach needs a
    // stop, so interrupt first.
    nix::sys::ptrace::interrupt(tpid).unwrap();
    let _ = nix::sys::wait::waitpid(tpid, Some(nix::sys::wait::WaitPidFlag::__WALL));
    nix::sys::ptrace::detach(tpid, None).unwrap();

    // Another user, without CAP_SYS_PTRACE: run the target as nobody and evolve as another
    // unprivileged uid; then evolve as root with CAP_SYS_PTRACE dropped.
    if nix::unistd::geteuid().is_root() {
        use std::os::unix::process::CommandExt;
        let nobody = Command::new(&idle).uid(65534).gid(65534).spawn().unwrap();
        let nobody = Target {
            child: nobody,
            dir: dir.clone(),
        };
        std::thread::sleep(Duration::from_millis(50));
        let before = snapshot(nobody.pid());
        agent_built();
        let other = Command::new(env!("CARGO_BIN_EXE_evolve"))
            .args(["attach", &nobody.pid().to_string()])
            .env("EVOLVE_SOCKET_DIR", dir.join("other-sockets"))
            .uid(65533)
            .gid(65533)
            .output()
            .unwrap();
        let message = String::from_utf8_lossy(&other.stderr);
        assert!(!other.status.success());
        assert!(
            message.contains("not permitted") && message.contains("uid 65534"),
            "{message}"
        );
        assert_eq!(before, snapshot(nobody.pid()));
        if Path::new("/usr/bin/setpriv").exists() {
            let dropped = Command::new("/usr/bin/setpriv")
                .args(["--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace"])
                .arg(env!("CARGO_BIN_EXE_evolve"))
                .args(["attach", &nobody.pid().to_string()])
                .env("EVOLVE_SOCKET_DIR", &sockets)
                .output()
                .unwrap();
            let message = String::from_utf8_lossy(&dropped.stderr);
            assert!(!dropped.status.success(), "{message}");
            assert!(message.contains("CAP_SYS_PTRACE"), "{message}");
            assert_eq!(before, snapshot(nobody.pid()));
        }
    } else {
        eprintln!("not root: the other-user cases need root to set them up; skipped");
    }
    // Yama: only where the kernel has it (the explanation itself is unit-tested).
    if let Ok(scope) = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope") {
        eprintln!("yama ptrace_scope {}", scope.trim());
    }

    // A process that exits during the attach, once the agent has created its socket (and its
    // socket directory, new here): the attach fails, and neither is left behind.
    let exits = cc("cc", "exits.c", &dir.join("exits"), &["-rdynamic"]).unwrap();
    let fresh = dir.join("fresh-sockets");
    for _ in 0..3 {
        let t = Target::start(&exits, &[], &dir);
        std::thread::sleep(Duration::from_millis(50));
        let pid = t.pid();
        let e = evolve(&fresh, &["attach", &pid.to_string()]).expect_err("the target exits");
        assert!(e.contains("exited"), "{e}");
        assert!(
            snapshot(pid).state.contains("Z (zombie)"),
            "it exited (not yet reaped)"
        );
        assert!(
            !fresh.exists(),
            "the agent's socket directory was left behind"
        );
        // It exited in its listen() (status 0), so the agent had bound its socket.
        let mut t = t;
        let status = t.child.try_wait().unwrap().expect("reaped now");
        assert_eq!(status.code(), Some(0), "{status}");
    }
}

#[test]
fn memcached_from_debian_is_probed_under_memcslap() {
    let (Ok(memcached), Ok(memcslap)) = (which("memcached"), which("memcslap")) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI installs memcached and libmemcached-tools"
        );
        eprintln!("memcached or memcslap not installed: skipped");
        return;
    };
    let dir = scratch("memcached");
    let sockets = dir.join("sockets");
    let port = 22000 + (std::process::id() % 20000) as u16;
    let mut args = vec![
        "-p".to_string(),
        port.to_string(),
        "-l".into(),
        "127.0.0.1".into(),
        "-t".into(),
        "4".into(),
    ];
    if nix::unistd::geteuid().is_root() {
        args.extend(["-u".to_string(), "root".into()]);
    }
    let server = Command::new(&memcached).args(&args).spawn().unwrap();
    let server = Target {
        child: server,
        dir: dir.clone(),
    };
    let pid = server.pid();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "memcached did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rss_before = rss_kib(pid);
    let malloced_before = memcached_malloced_kib(port);
    let threads_before = snapshot(pid).threads;
    // memcslap: 8 concurrent clients for the whole test; it reports failures.
    let slap = Command::new(&memcslap)
        .arg(format!("--servers=127.0.0.1:{port}"))
        .args(["--concurrency=8", "--execute-number=10000", "--binary"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let p = pid.to_string();
    let attached = ok(&sockets, &["attach", &p]);
    assert_eq!(attached["reused"], false);
    // memcached's own symbols are stripped; its request path runs through libc's socket calls
    // (the Debian build answers with sendmsg and reads with read).
    let libc = maps_path(pid, "libc.so.6");
    let before = code_bytes(
        pid,
        &libc_addresses(pid, &libc, &["sendmsg", "read", "epoll_wait"]),
    );
    ok(&sockets, &["probe", &p, "add", "sendmsg", "--count"]);
    ok(&sockets, &["probe", &p, "add", "read", "--latency"]);
    ok(
        &sockets,
        &["probe", &p, "add", "epoll_wait", "--hist", "arg2"],
    );
    std::thread::sleep(Duration::from_millis(500));
    let readings = ok(&sockets, &["probe", &p, "read"]);
    let calls: u64 = readings["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["calls"].as_u64().unwrap_or(0))
        .sum();
    assert!(calls > 100, "{readings}");
    ok(&sockets, &["probe", &p, "rm", "--all"]);
    assert_eq!(
        before,
        code_bytes(
            pid,
            &libc_addresses(pid, &libc, &["sendmsg", "read", "epoll_wait"])
        )
    );
    ok(&sockets, &["detach", &p]);
    let out = slap.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "memcslap failed: {report}");
    assert!(!report.to_lowercase().contains("failure"), "{report}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while snapshot(pid).threads != threads_before {
        assert!(Instant::now() < deadline, "agent threads left behind");
        std::thread::sleep(Duration::from_millis(20));
    }
    // memcached grows by the items memcslap stored: count only what it did not allocate.
    let grown = memcached_malloced_kib(port) - malloced_before;
    let rss_after = rss_kib(pid);
    assert!(
        rss_after <= rss_before + grown + RSS_BOUND_KIB,
        "RSS {rss_before} -> {rss_after} KiB, of which memcached's slabs {grown} KiB"
    );
    eprintln!(
        "memcached: {report}\nRSS {rss_before} -> {rss_after} KiB (slabs +{grown} KiB); {attached}"
    );
}

/// memcached's own slab allocations (`stats slabs`: `total_malloced`), in KiB.
fn memcached_malloced_kib(port: u16) -> u64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"stats slabs\r\n").unwrap();
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if let Some(v) = line.strip_prefix("STAT total_malloced ") {
            return v.trim().parse::<u64>().unwrap() / 1024;
        }
        assert!(
            !line.starts_with("END") && !line.is_empty(),
            "no total_malloced"
        );
    }
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

fn maps_path(pid: u32, file: &str) -> PathBuf {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .find_map(|l| {
            let path = l.split_whitespace().nth(5)?;
            path.ends_with(file).then(|| PathBuf::from(path))
        })
        .unwrap()
}

fn libc_addresses(pid: u32, libc: &Path, names: &[&str]) -> Vec<(String, u64)> {
    let nm = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(libc)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&nm.stdout);
    let bias = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .find(|l| l.ends_with(libc.to_str().unwrap()))
        .and_then(|l| u64::from_str_radix(l.split('-').next()?, 16).ok())
        .unwrap();
    names
        .iter()
        .map(|n| {
            let v = text
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    let sym = f.get(2)?.split('@').next()?;
                    (sym == *n).then(|| u64::from_str_radix(f[0], 16).ok())?
                })
                .unwrap();
            (n.to_string(), bias + v)
        })
        .collect()
}

/// Runs `program args` and panics with its output unless it succeeds.
fn run(program: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?}: {text}");
    text
}

/// The GNU build id of `file`, in hex (from `readelf -n`).
fn build_id_hex(file: &Path) -> String {
    let notes = run("readelf", &["-n".as_ref(), file.as_os_str()]);
    notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .unwrap_or_else(|| panic!("no build id in {}: {notes}", file.display()))
        .trim()
        .to_string()
}

/// The symbols of a stripped program come from its separate debug file, found by build id
/// under the debug root (`EVOLVE_DEBUG_ROOT` in the target's environment stands for
/// `/usr/lib/debug`): `functions --symbols` lists them, and probes on its static functions
/// work, with the bytes identical after.
#[test]
fn a_stripped_c_server_gets_its_symbols_from_its_debug_file_by_build_id() {
    let dir = scratch("debug-file");
    let sockets = dir.join("sockets");
    let full = cc("cc", "server.c", &dir.join("server-full"), &["-g"]).unwrap();
    let debug = dir.join("server.debug");
    let server = dir.join("server");
    run(
        "objcopy",
        &[
            "--only-keep-debug".as_ref(),
            full.as_os_str(),
            debug.as_os_str(),
        ],
    );
    let link = format!("--add-gnu-debuglink={}", debug.display());
    run(
        "objcopy",
        &[
            "--strip-all".as_ref(),
            link.as_ref(),
            full.as_os_str(),
            server.as_os_str(),
        ],
    );
    let own = Command::new("nm").arg(&server).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&own.stdout).contains("handle_get"),
        "the stripped server keeps no symbol of its own"
    );
    // Found by build id only: nothing is left where the debug link points.
    let id = build_id_hex(&server);
    assert_eq!(id, build_id_hex(&debug));
    let root = dir.join("debug-root");
    let by_id = root
        .join(".build-id")
        .join(&id[..2])
        .join(format!("{}.debug", &id[2..]));
    std::fs::create_dir_all(by_id.parent().unwrap()).unwrap();
    std::fs::rename(&debug, &by_id).unwrap();

    let handlers = ["handle_get", "handle_request", "handle_set", "handle_stats"];
    let target = Target::start_with_env(
        &server,
        &[dir.join("port").to_str().unwrap()],
        &dir,
        &[("EVOLVE_DEBUG_ROOT", &root)],
    );
    let pid = target.pid();
    let p = pid.to_string();
    let load = Load::start(target.port(), 3);
    load.wait_for(300);
    let before = code_bytes(pid, &addresses_from(pid, &server, &by_id, &handlers));
    ok(&sockets, &["attach", &p]);
    let functions = ok(&sockets, &["functions", &p, "--symbols", "handle_*"]);
    let symbols = functions["symbols"].as_array().unwrap();
    let mut names: Vec<&str> = symbols
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, handlers, "{functions}");
    for symbol in symbols {
        assert_eq!(
            symbol["debug_file"].as_str(),
            Some(by_id.to_str().unwrap()),
            "{functions}"
        );
    }
    ok(&sockets, &["probe", &p, "add", "handle_get", "--count"]);
    ok(&sockets, &["probe", &p, "add", "handle_stats", "--latency"]);
    load.wait_for(1000);
    let readings = ok(&sockets, &["probe", &p, "read"]);
    let calls = |f: &str| {
        readings["readings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["function"] == f)
            .map(|r| r["calls"].as_u64().unwrap())
            .unwrap_or_else(|| panic!("no reading of {f}: {readings}"))
    };
    assert!(calls("handle_get") > 100, "{readings}");
    assert!(calls("handle_stats") > 0, "{readings}");
    ok(&sockets, &["probe", &p, "rm", "--all"]);
    assert_eq!(
        before,
        code_bytes(pid, &addresses_from(pid, &server, &by_id, &handlers)),
        "code bytes identical after removing the probes"
    );
    ok(&sockets, &["detach", &p]);
    let (done, failed) = load.finish();
    assert_eq!(failed, 0);
    assert!(done > 1000);

    // The same stripped program without the debug root has no such symbol.
    let bare_dir = scratch("debug-file-absent");
    let bare = Target::start(
        &server,
        &[bare_dir.join("port").to_str().unwrap()],
        &bare_dir,
    );
    bare.port();
    let b = bare.pid().to_string();
    ok(&sockets, &["attach", &b]);
    let functions = ok(&sockets, &["functions", &b, "--symbols", "handle_*"]);
    // The libraries' own debug files may be installed under /usr/lib/debug (libc6-dbg): only
    // the server's symbols must be absent.
    let of_server = functions["symbols"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["image"].as_str() == server.to_str())
        .count();
    assert_eq!(of_server, 0, "{functions}");
    let refused = evolve(&sockets, &["probe", &b, "add", "handle_get", "--count"]);
    assert!(refused.is_err(), "{refused:?}");
    ok(&sockets, &["detach", &b]);
}

/// A target in a mount namespace of its own, where the agent's directory is hidden under an
/// empty tmpfs, cannot open the agent by path: it gets it from a memfd, and everything works.
#[test]
fn a_process_in_another_mount_namespace_gets_the_agent_from_a_memfd() {
    if !nix::unistd::geteuid().is_root() || which("unshare").is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root with util-linux"
        );
        eprintln!("a mount namespace needs root and unshare: skipped");
        return;
    }
    agent_built();
    let dir = scratch("mount-namespace");
    let sockets = dir.join("sockets");
    let server = cc("cc", "server.c", &dir.join("server"), &["-g"]).unwrap();
    let agent_dir = Path::new(env!("CARGO_BIN_EXE_evolve")).parent().unwrap();
    let agent = agent_dir.join("libevolve_attach_agent.so");
    let script = format!(
        "mount -t tmpfs evolve-hides-the-agent '{}' && exec '{}' '{}'",
        agent_dir.display(),
        server.display(),
        dir.join("port").display()
    );
    let target = Target::start(
        Path::new("unshare"),
        &["--mount", "--propagation", "private", "sh", "-c", &script],
        &dir,
    );
    let pid = target.pid();
    let p = pid.to_string();
    let load = Load::start(target.port(), 3);
    load.wait_for(300);
    assert!(agent.exists());
    assert!(
        !Path::new(&format!("/proc/{pid}/root{}", agent.display())).exists(),
        "the agent is hidden in the target's namespace"
    );
    let attached = ok(&sockets, &["attach", &p]);
    assert_eq!(attached["from_memfd"], true, "{attached}");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        maps.contains("/memfd:libevolve_attach_agent.so"),
        "the agent is mapped from its memfd"
    );
    let open_memfds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().contains("memfd:"))
        .count();
    assert_eq!(open_memfds, 0, "the loader closed its memfd");
    ok(&sockets, &["probe", &p, "add", "handle_get", "--count"]);
    load.wait_for(500);
    let readings = ok(&sockets, &["probe", &p, "read"]);
    assert!(
        readings["readings"][0]["calls"].as_u64().unwrap() > 0,
        "{readings}"
    );
    ok(&sockets, &["detach", &p]);
    // The agent loaded from the memfd is found again and restarted.
    let again = ok(&sockets, &["attach", &p]);
    assert_eq!(again["reused"], false, "{again}");
    assert_eq!(
        again["from_memfd"], false,
        "its entry is called directly: {again}"
    );
    ok(&sockets, &["status", &p]);
    ok(&sockets, &["detach", &p]);
    let (_, failed) = load.finish();
    assert_eq!(failed, 0);
}

/// Real-time signals queued every 50 µs at two threads of the target (the one attach prefers
/// to borrow, and another) during several attaches and detaches: each arrives, in order, with
/// its own `siginfo` (none lost, none re-sent as a plain `kill`), whether it came while its
/// thread was borrowed (held pending by its mask) or only seized (passed on from its stop).
#[test]
fn signals_sent_during_attach_arrive_with_their_siginfo() {
    let dir = scratch("signals");
    let sockets = dir.join("sockets");
    let program = cc("cc", "signals.c", &dir.join("signals"), &[]).unwrap();
    let mut child = Command::new(&program)
        .arg("20000")
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let target = Target {
        child,
        dir: dir.clone(),
    };
    let ready = lines.next().unwrap().unwrap();
    let signalled: Vec<u64> = ready
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("{ready}"))
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    let p = target.pid().to_string();
    let (mut borrowed_signalled, mut passed_on) = (0, 0);
    for _ in 0..6 {
        let attached = ok(&sockets, &["attach", &p]);
        let tid = attached["borrowed_tid"].as_u64().unwrap();
        borrowed_signalled += usize::from(signalled.contains(&tid));
        passed_on += attached["signal_stops"].as_u64().unwrap();
        ok(&sockets, &["detach", &p]);
    }
    let report = lines.next().unwrap().unwrap();
    let fields: Vec<u64> = report
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [sent, received, bad] = fields[..] else {
        panic!("{report}")
    };
    assert_eq!(sent, 20000, "{report}");
    assert_eq!(received, sent, "every signal arrived: {report}");
    assert_eq!(bad, 0, "each with its siginfo, in order: {report}");
    assert!(
        borrowed_signalled > 0,
        "a signalled thread was borrowed at least once in six attaches"
    );
    eprintln!(
        "{borrowed_signalled} of 6 borrows took a signalled thread; {passed_on} signal stops of \
         seized threads passed on; {report}"
    );
}

/// Count probes on the C library functions the agent itself uses, in an attached process: no
/// recursion, no deadlock, the server keeps serving, the bytes come back.
#[test]
fn count_probes_on_functions_the_agent_uses_work_in_an_attached_process() {
    probe_functions_the_agent_uses("agent-functions-count", "--count");
}

/// The same with latency probes: timed calls of `malloc` while the agent's own hooks allocate
/// and free (see `evolve_code::thread_state`, the re-entrancy guard).
#[test]
fn latency_probes_on_functions_the_agent_uses_work_in_an_attached_process() {
    probe_functions_the_agent_uses("agent-functions-latency", "--latency");
}

fn probe_functions_the_agent_uses(name: &str, kind: &str) {
    let dir = scratch(name);
    let sockets = dir.join("sockets");
    let server = cc("cc", "server.c", &dir.join("server"), &["-g"]).unwrap();
    let target = Target::start(&server, &[dir.join("port").to_str().unwrap()], &dir);
    let pid = target.pid();
    let p = pid.to_string();
    let load = Load::start(target.port(), 3);
    load.wait_for(300);
    let functions = ["malloc", "free", "pthread_mutex_lock", "write"];
    let libc = maps_path(pid, "libc.so.6");
    let before = code_bytes(pid, &libc_addresses(pid, &libc, &functions));
    ok(&sockets, &["attach", &p]);
    for f in functions {
        ok(&sockets, &["probe", &p, "add", f, kind]);
    }
    load.wait_for(1000);
    ok(&sockets, &["probe", &p, "read"]);
    let readings = ok(&sockets, &["probe", &p, "read"]);
    for f in functions {
        let calls = readings["readings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["function"].as_str().is_some_and(|n| n.starts_with(f)))
            .map(|r| r["calls"].as_u64().unwrap())
            .sum::<u64>();
        assert!(calls > 0, "{kind} {f}: {readings}");
    }
    ok(&sockets, &["probe", &p, "rm", "--all"]);
    assert_eq!(
        before,
        code_bytes(pid, &libc_addresses(pid, &libc, &functions)),
        "{kind}: code bytes identical after removing the probes"
    );
    ok(&sockets, &["detach", &p]);
    let (_, failed) = load.finish();
    assert_eq!(failed, 0);
}
