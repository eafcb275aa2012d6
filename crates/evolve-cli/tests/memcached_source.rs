//! memcached built from Debian's source package by its own build system (`./configure && make`,
//! gcc `-g -O2`: unmodified, unstripped, a program the project did not write), under a load of
//! `EVOLVE_STRESS_THREADS` text-protocol clients that check and count every request for the
//! whole test:
//! - a one-function change of its request handling (`server_stats`, the `stats` command's
//!   `version` line), built by `evolve build-patch --c-source` with the flags its Makefile gives
//!   gcc (`-DHAVE_CONFIG_H -I. -DNDEBUG -pthread`: gcc records none of them), applied, seen
//!   through the protocol, reverted, the original replies and code bytes back (twice);
//! - count and latency probes on its own handlers, by name (`process_command_ascii`,
//!   `process_update_command`), counts moving, removed, code bytes back.
//!
//! Zero failed requests and no dropped connection throughout.

use evolve_testkit::memcached::MemcachedSource;
use serde_json::Value as Json;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The built memcached, or `None` (skipped) outside CI when its source cannot be fetched.
fn memcached() -> Option<MemcachedSource> {
    match MemcachedSource::get() {
        Ok(source) => Some(source),
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI fetches memcached's source (a deb-src entry, libevent-dev, dpkg-dev): {e}"
            );
            eprintln!("memcached's source is not available: skipped ({e})");
            None
        }
    }
}

/// Runs `evolve ARGS --json` with the test's socket directory.
fn evolve(sockets: &Path, args: &[&str]) -> Result<Json, String> {
    evolve_testkit::attach_agent(Path::new(env!("CARGO_BIN_EXE_evolve")));
    let output = Command::new(env!("CARGO_BIN_EXE_evolve"))
        .args(args)
        .arg("--json")
        .env("EVOLVE_SOCKET_DIR", sockets)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    serde_json::from_str(stdout.trim()).map_err(|e| format!("{e}: {stdout}"))
}

fn ok(sockets: &Path, args: &[&str]) -> Json {
    evolve(sockets, args).unwrap_or_else(|e| panic!("evolve {args:?}: {e}"))
}

/// A memcached of the source build on a free loopback port.
struct Server {
    child: Child,
    port: u16,
    binary: PathBuf,
    dir: PathBuf,
    sockets: PathBuf,
}

impl Server {
    fn start(source: &MemcachedSource, name: &str) -> Server {
        let dir = evolve_testkit::scratch().join("memcached-tests").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        let sockets = dir.join("sockets");
        std::fs::create_dir_all(&sockets).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = Command::new(&source.binary);
        command.args(["-l", "127.0.0.1", "-t", "4", "-p", &port.to_string()]);
        if nix::unistd::geteuid().is_root() {
            command.args(["-u", "root"]);
        }
        let child = command.stdin(Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "memcached did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server {
            child,
            port,
            binary: source.binary.clone(),
            dir,
            sockets,
        }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// The first bytes of the executable's functions `names`, read from the live process.
    fn code(&self, names: &[&str]) -> Vec<Vec<u8>> {
        let pid = self.child.id();
        let exe = std::fs::canonicalize(&self.binary).unwrap();
        let bias = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .unwrap()
            .lines()
            .find(|l| l.ends_with(exe.to_str().unwrap()))
            .and_then(|l| u64::from_str_radix(l.split('-').next()?, 16).ok())
            .unwrap();
        let nm = Command::new("nm").arg(&exe).output().unwrap();
        let symbols = String::from_utf8(nm.stdout).unwrap();
        let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
        names
            .iter()
            .map(|name| {
                let address = symbols
                    .lines()
                    .find_map(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        (f.len() == 3 && f[2] == *name)
                            .then(|| u64::from_str_radix(f[0], 16).unwrap())
                    })
                    .unwrap_or_else(|| panic!("no symbol {name}"));
                let mut bytes = vec![0; 16];
                std::os::unix::fs::FileExt::read_exact_at(&mem, &mut bytes, bias + address)
                    .unwrap();
                bytes
            })
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One text-protocol connection.
struct Client {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect(port: u16) -> std::io::Result<Client> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// One request in one write: `write!` on the socket would send each formatted piece in a
    /// segment of its own, and Nagle's algorithm holds the next for the server's delayed
    /// acknowledgement (tens of milliseconds per request).
    fn send(&mut self, request: String) -> std::io::Result<()> {
        self.writer.write_all(request.as_bytes())
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("connection dropped"));
        }
        Ok(line.trim_end().to_string())
    }

    fn set(&mut self, key: &str, value: &str) -> std::io::Result<String> {
        self.send(format!("set {key} 0 0 {}\r\n{value}\r\n", value.len()))?;
        self.line()
    }

    /// The value stored under `key`, or what the server said instead.
    fn get(&mut self, key: &str) -> std::io::Result<Result<String, String>> {
        self.send(format!("get {key}\r\n"))?;
        let header = self.line()?;
        let Some(len) = header
            .strip_prefix(&format!("VALUE {key} 0 "))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            return Ok(Err(header));
        };
        let mut data = vec![0; len + 2];
        self.reader.read_exact(&mut data)?;
        let end = self.line()?;
        data.truncate(len);
        let value = String::from_utf8_lossy(&data).into_owned();
        Ok(if end == "END" {
            Ok(value)
        } else {
            Err(format!("{header} {value} then {end}"))
        })
    }

    /// The value of `stats`' line `STAT name VALUE`.
    fn stat(&mut self, name: &str) -> std::io::Result<Option<String>> {
        self.writer.write_all(b"stats\r\n")?;
        let mut found = None;
        loop {
            let line = self.line()?;
            if line == "END" {
                return Ok(found);
            }
            if let Some(value) = line.strip_prefix(&format!("STAT {name} ")) {
                found = Some(value.to_string());
            } else if !line.starts_with("STAT ") {
                return Ok(Some(format!("unexpected {line:?}")));
            }
        }
    }
}

/// Client threads, each on a long-lived connection: `set` then `get` (the value checked), and
/// every tenth round `stats`, whose `version` line must be the original or the patched one
/// (counted apart). Every request and every failure is counted.
struct Load {
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    /// `stats` replies naming the original version, the patched one.
    versions: Arc<[AtomicU64; 2]>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Load {
    fn start(port: u16, versions_seen: [String; 2]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let versions: Arc<[AtomicU64; 2]> = Arc::new(Default::default());
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..evolve_testkit::stress_threads())
            .map(|c| {
                let (stop, requests, versions, failures, names) = (
                    stop.clone(),
                    requests.clone(),
                    versions.clone(),
                    failures.clone(),
                    versions_seen.clone(),
                );
                std::thread::spawn(move || -> std::io::Result<()> {
                    let mut client = Client::connect(port)?;
                    let fail = |what: String| failures.lock().unwrap().push(what);
                    let mut round = 0u64;
                    while !stop.load(Relaxed) {
                        round += 1;
                        let key = format!("k{c}-{}", round % 64);
                        let value = format!("v{c}-{round}");
                        match client.set(&key, &value)? {
                            stored if stored == "STORED" => {}
                            other => fail(format!("set {key}: {other}")),
                        }
                        match client.get(&key)? {
                            Ok(got) if got == value => {}
                            other => fail(format!("get {key}: {other:?}, expected {value}")),
                        }
                        requests.fetch_add(2, Relaxed);
                        if round.is_multiple_of(10) {
                            let version = client.stat("version")?;
                            requests.fetch_add(1, Relaxed);
                            match names.iter().position(|n| Some(n) == version.as_ref()) {
                                Some(i) => _ = versions[i].fetch_add(1, Relaxed),
                                None => fail(format!("stats version: {version:?}")),
                            }
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        Load {
            stop,
            requests,
            versions,
            failures,
            threads,
        }
    }

    fn wait_for(&self, counter: &AtomicU64, more: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let start = counter.load(Relaxed);
        while counter.load(Relaxed) < start + more {
            assert!(Instant::now() < deadline, "the load stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops; returns the requests made and every failure, and checks no connection dropped.
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Relaxed);
        for t in self.threads {
            t.join()
                .unwrap()
                .expect("a connection failed or was dropped");
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.requests.load(Relaxed), failures)
    }
}

fn assert_no_failures(requests: u64, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} failed of {requests} requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(requests > 1000, "{requests}");
}

#[test]
fn memcached_from_source_is_patched_live_under_load_and_reverted() {
    let Some(source) = memcached() else {
        return;
    };
    let server = Server::start(&source, "patch");
    let mut probe = Client::connect(server.port).unwrap();
    let original = probe.stat("version").unwrap().expect("a version line");
    let patched = format!("{original}-evolve");
    let load = Load::start(server.port, [original.clone(), patched.clone()]);
    load.wait_for(&load.requests, 2000);
    let pid = server.pid();
    ok(&server.sockets, &["attach", &pid]);

    // One line of server_stats, the `stats` command's handler, changed.
    let edited_dir = server.dir.join("edited");
    std::fs::create_dir_all(&edited_dir).unwrap();
    let text = std::fs::read_to_string(source.tree.join("memcached.c")).unwrap();
    let line = "APPEND_STAT(\"version\", \"%s\", VERSION);";
    assert!(text.contains(line), "memcached.c has no {line}");
    let edited = edited_dir.join("memcached.c");
    std::fs::write(
        &edited,
        text.replacen(
            line,
            "APPEND_STAT(\"version\", \"%s\", VERSION \"-evolve\");",
            1,
        ),
    )
    .unwrap();
    let flags = source.unrecorded_flags("memcached.c").unwrap();
    assert!(flags.iter().any(|f| f == "-DHAVE_CONFIG_H"), "{flags:?}");
    let patch = server.dir.join("stats.o");
    let sources = format!(
        "{}={}",
        source.tree.join("memcached.c").display(),
        edited.display()
    );
    let report = ok(
        &server.sockets,
        &[
            "build-patch",
            "--pid",
            &pid,
            "--c-source",
            &sources,
            &format!("--cflags={}", flags.join(" ")),
            "-o",
            patch.to_str().unwrap(),
        ],
    );
    let carried: Vec<(&str, bool)> = report["carried"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["replaces"] == true))
        .collect();
    assert_eq!(carried, [("server_stats", true)], "{report:#}");
    assert_eq!(report["configuration"]["found_by"], "DW_AT_producer");

    let before = server.code(&["server_stats"]);
    // Twice: the first patch's writes split the text mapping where server_stats crosses a
    // page boundary, which the second apply must cope with.
    for round in 0..2 {
        ok(&server.sockets, &["apply", &pid, patch.to_str().unwrap()]);
        assert_ne!(server.code(&["server_stats"]), before, "an entry jump");
        assert_eq!(probe.stat("version").unwrap(), Some(patched.clone()));
        load.wait_for(&load.versions[1], 200);

        ok(&server.sockets, &["revert", &pid]);
        assert_eq!(probe.stat("version").unwrap(), Some(original.clone()));
        assert_eq!(
            server.code(&["server_stats"]),
            before,
            "round {round}: the original code bytes after revert"
        );
        load.wait_for(&load.versions[0], 200);
    }
    ok(&server.sockets, &["detach", &pid]);
    load.wait_for(&load.requests, 1000);
    let (requests, failures) = load.finish();
    assert_no_failures(requests, &failures);
    eprintln!(
        "memcached {}: {requests} requests, 0 failed",
        source.version
    );
}

#[test]
fn memcached_from_source_is_probed_by_its_own_handler_names() {
    let Some(source) = memcached() else {
        return;
    };
    let server = Server::start(&source, "probes");
    let mut probe = Client::connect(server.port).unwrap();
    let original = probe.stat("version").unwrap().expect("a version line");
    let load = Load::start(server.port, [original.clone(), original]);
    load.wait_for(&load.requests, 2000);
    let pid = server.pid();
    ok(&server.sockets, &["attach", &pid]);
    // Static (`process_update_command`) and global (`process_command_ascii`) functions of
    // proto_text.c, found in the symbol table the Debian package strips.
    let handlers = ["process_command_ascii", "process_update_command"];
    let before = server.code(&handlers);
    ok(
        &server.sockets,
        &["probe", &pid, "add", handlers[0], "--count"],
    );
    ok(
        &server.sockets,
        &["probe", &pid, "add", handlers[1], "--latency"],
    );
    let calls = |readings: &Json, function: &str| -> (u64, u64) {
        let reading = readings["readings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| {
                r["function"]
                    .as_str()
                    .is_some_and(|f| f.ends_with(function))
            })
            .unwrap_or_else(|| panic!("no reading of {function}: {readings}"));
        (
            reading["calls"].as_u64().unwrap_or(0),
            reading["latency"]["count"].as_u64().unwrap_or(0),
        )
    };
    load.wait_for(&load.requests, 1000);
    let first = ok(&server.sockets, &["probe", &pid, "read"]);
    load.wait_for(&load.requests, 1000);
    let second = ok(&server.sockets, &["probe", &pid, "read"]);
    let (commands_1, _) = calls(&first, handlers[0]);
    let (commands_2, _) = calls(&second, handlers[0]);
    let (_, updates_1) = calls(&first, handlers[1]);
    let (_, updates_2) = calls(&second, handlers[1]);
    // Every request is one command (a `set`'s data block is not one).
    assert!(
        commands_1 > 0 && commands_2 >= commands_1 + 1000,
        "{first}\n{second}"
    );
    assert!(updates_1 > 0 && updates_2 > updates_1, "{first}\n{second}");
    let mean = second["readings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| {
            r["function"]
                .as_str()
                .is_some_and(|f| f.ends_with(handlers[1]))
        })
        .and_then(|r| r["latency"]["mean_ns"].as_f64())
        .unwrap();
    assert!(mean > 0.0, "{second}");

    ok(&server.sockets, &["probe", &pid, "rm", "--all"]);
    assert_eq!(server.code(&handlers), before, "code bytes after removal");
    ok(&server.sockets, &["detach", &pid]);
    load.wait_for(&load.requests, 1000);
    let (requests, failures) = load.finish();
    assert_no_failures(requests, &failures);
    eprintln!(
        "memcached {}: {requests} requests, 0 failed; {commands_2} commands counted, \
         set mean {mean:.0} ns",
        source.version
    );
}
