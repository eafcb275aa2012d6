//! Live patches of unprepared C functions from a C source change: a real, unmodified C server
//! (two files, with `static` functions and variables of the same names in both), built by gcc
//! with plain `-O2 -g`, reached by `evolve attach`; `evolve build-patch --c-source` compiles
//! the edited file with the flags recorded in the program's DWARF, `evolve apply` patches it
//! under client threads that check every reply, `evolve revert` undoes it. Then each refusal,
//! with the process checked untouched.

use serde_json::Value as Json;
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn stress_threads() -> usize {
    std::env::var("EVOLVE_STRESS_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

/// The agent shared object next to the `evolve` binary (built once per test run).
fn agent_built() {
    evolve_testkit::attach_agent(Path::new(env!("CARGO_BIN_EXE_evolve")));
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
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    serde_json::from_str(stdout.trim()).map_err(|e| format!("{e}: {stdout}"))
}

fn ok(sockets: &Path, args: &[&str]) -> Json {
    evolve(sockets, args).unwrap_or_else(|e| panic!("evolve {args:?}: {e}"))
}

/// The fixture built in `dir`: sources under `dir/src` (older than the binary), the binary
/// `dir/server`, compiled as any C project is — no Evolve flag.
fn build_server(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    for file in ["server.c", "stats.c"] {
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixture/cpatch")
                .join(file),
            src.join(file),
        )
        .unwrap();
    }
    let server = dir.join("server");
    let status = Command::new("gcc")
        .current_dir(&src)
        .args(["-O2", "-g", "-o"])
        .arg(&server)
        .args(["server.c", "stats.c", "-lpthread"])
        .status()
        .unwrap();
    assert!(status.success(), "gcc");
    server
}

/// An edited copy of the fixture's server.c (each replacement must apply).
fn edited(dir: &Path, name: &str, edits: &[(&str, &str)]) -> PathBuf {
    let mut text = std::fs::read_to_string(dir.join("src/server.c")).unwrap();
    for (from, to) in edits {
        assert!(text.contains(from), "edit {from:?}");
        text = text.replacen(from, to, 1);
    }
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    let file = out.join("server.c");
    std::fs::write(&file, text).unwrap();
    file
}

struct Target {
    child: Child,
    dir: PathBuf,
    sockets: PathBuf,
}

impl Target {
    fn start(name: &str) -> Target {
        let dir = evolve_testkit::scratch().join("cpatch").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let server = build_server(&dir);
        let sockets = dir.join("sockets");
        std::fs::create_dir_all(&sockets).unwrap();
        let child = Command::new(&server)
            .arg(dir.join("port"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Target {
            child,
            dir,
            sockets,
        }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn port(&self) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(p) = std::fs::read_to_string(self.dir.join("port"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return p;
            }
            assert!(Instant::now() < deadline, "no port file");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `evolve build-patch` of an edited server.c against this process.
    fn build_patch(&self, edited: &Path, out: &str) -> Result<Json, String> {
        let sources = format!(
            "{}={}",
            self.dir.join("src/server.c").display(),
            edited.display()
        );
        let output = self.dir.join(out);
        evolve(
            &self.sockets,
            &[
                "build-patch",
                "--pid",
                &self.pid(),
                "--c-source",
                &sources,
                "-o",
                output.to_str().unwrap(),
            ],
        )
    }

    /// The first bytes of the executable's functions `names`, read from the live process.
    fn code(&self, names: &[&str]) -> Vec<Vec<u8>> {
        let pid = self.child.id();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let bias = maps
            .lines()
            .find(|l| l.ends_with(exe.to_str().unwrap()))
            .and_then(|l| u64::from_str_radix(l.split('-').next()?, 16).ok())
            .unwrap();
        let nm = Command::new("nm").arg(&exe).output().unwrap();
        let symbols = String::from_utf8(nm.stdout).unwrap();
        let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
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
                mem.seek(std::io::SeekFrom::Start(bias + address)).unwrap();
                mem.read_exact(&mut bytes).unwrap();
                bytes
            })
            .collect()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request and its reply on a fresh connection.
fn ask(port: u16, request: &str) -> String {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    (&stream).write_all(request.as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    line.trim_end().to_string()
}

/// Client threads over long-lived connections, every reply checked: a value is the one the
/// connection set last, a double is exact, and a version reply names version 1 or 2 and this
/// file's request counter (positive: stats.c's `count` of the same name is -1000000).
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    versions: Arc<[AtomicU64; 3]>,
    wrong: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<Result<(), String>>>,
}

impl Load {
    fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let versions: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
        let wrong = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..stress_threads())
            .map(|c| {
                let (stop, ok, versions, wrong) =
                    (stop.clone(), ok.clone(), versions.clone(), wrong.clone());
                std::thread::spawn(move || -> Result<(), String> {
                    let stream =
                        TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
                    stream
                        .set_read_timeout(Some(Duration::from_secs(30)))
                        .unwrap();
                    let mut writer = stream.try_clone().unwrap();
                    let mut reader = BufReader::new(stream);
                    let mut line = String::new();
                    let mut set = 0u64;
                    let mut i = 0u64;
                    while !stop.load(Relaxed) {
                        i += 1;
                        let request = match i % 4 {
                            0 => format!("SET k{c} {i}\n"),
                            1 => format!("GET k{c}\n"),
                            2 => "VERSION\n".to_string(),
                            _ => format!("DOUBLE {i}\n"),
                        };
                        writer
                            .write_all(request.as_bytes())
                            .map_err(|e| format!("write: {e}"))?;
                        line.clear();
                        if reader
                            .read_line(&mut line)
                            .map_err(|e| format!("read: {e}"))?
                            == 0
                        {
                            return Err("connection dropped".into());
                        }
                        let reply = line.trim_end();
                        let right = match i % 4 {
                            0 => {
                                set = i;
                                reply == "OK"
                            }
                            1 => reply == format!("VALUE {set}"),
                            2 => {
                                let f: Vec<&str> = reply.split(' ').collect();
                                let served = f.get(2).and_then(|n| n.parse::<i64>().ok());
                                match (f.as_slice(), served) {
                                    (["VERSION", v @ ("1" | "2"), _], Some(n)) if n > 0 => {
                                        versions[v.parse::<usize>().unwrap()].fetch_add(1, Relaxed);
                                        true
                                    }
                                    _ => false,
                                }
                            }
                            _ => reply == format!("DOUBLE {}", 2 * i),
                        };
                        if right {
                            ok.fetch_add(1, Relaxed);
                        } else {
                            wrong
                                .lock()
                                .unwrap()
                                .push(format!("{} -> {reply}", request.trim_end()));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        Load {
            stop,
            ok,
            versions,
            wrong,
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

    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Relaxed);
        for t in self.threads {
            t.join().unwrap().expect("a connection failed or dropped");
        }
        let wrong = self.wrong.lock().unwrap().clone();
        (self.ok.load(Relaxed), wrong)
    }
}

#[test]
fn a_static_c_function_is_patched_live_under_load_and_reverted() {
    let target = Target::start("patch");
    let port = target.port();
    assert_eq!(&ask(port, "VERSION\n")[..9], "VERSION 1");
    let load = Load::start(port);
    load.wait_for(&load.ok, 2000);
    ok(&target.sockets, &["attach", &target.pid()]);

    // version() is inlined into the static reply_version, which reads the static `count`.
    let fix = edited(
        &target.dir,
        "edited",
        &[("return \"1\"; }", "return \"2\"; }")],
    );
    let report = target
        .build_patch(&fix, "version.o")
        .unwrap_or_else(|e| panic!("build-patch: {e}"));
    let carried = report["carried"].as_array().unwrap();
    let names: Vec<&str> = carried
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["reply_version"], "{report:#}");
    assert!(
        // version() has no out-of-line copy: its caller is what changes.
        carried[0]["replaces"] == true,
        "{report:#}"
    );
    assert_eq!(report["configuration"]["found_by"], "DW_AT_producer");
    let patch = target.dir.join("version.o");

    ok(
        &target.sockets,
        &["apply", &target.pid(), patch.to_str().unwrap()],
    );
    load.wait_for(&load.versions[2], 500);
    let reply = ask(port, "VERSION\n");
    assert!(reply.starts_with("VERSION 2 "), "{reply}");

    ok(&target.sockets, &["revert", &target.pid()]);
    let reply = ask(port, "VERSION\n");
    assert!(reply.starts_with("VERSION 1 "), "{reply}");
    let v1 = load.versions[1].load(Relaxed);
    load.wait_for(&load.versions[1], 500);
    assert!(load.versions[1].load(Relaxed) > v1);
    let (served, wrong) = load.finish();
    assert!(
        wrong.is_empty(),
        "{} wrong replies: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert!(served > 3000, "{served}");
    // stats.c's `count` was not touched by the patch (it binds server.c's).
    assert!(ask(port, "STATS\n").starts_with("STATS -1000000 2"));
}

#[test]
fn refused_c_patches_name_their_cause_and_change_nothing() {
    let target = Target::start("refusals");
    let port = target.port();
    ok(&target.sockets, &["attach", &target.pid()]);
    let watched = ["handle_get", "wait_ready", "reply_version"];
    let before = target.code(&watched);

    // A file-local struct variable's layout changed: apply refuses it.
    let layout = edited(
        &target.dir,
        "layout",
        &[(
            "    long misses;\n} tally;",
            "    long misses;\n    long total;\n} tally;",
        )],
    );
    let report = target
        .build_patch(&layout, "layout.o")
        .unwrap_or_else(|e| panic!("build-patch: {e}"));
    assert!(
        report["carried"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "handle_get" && c["reason"].as_str().unwrap().contains("tally")),
        "{report:#}"
    );
    let refused = evolve(
        &target.sockets,
        &[
            "apply",
            &target.pid(),
            target.dir.join("layout.o").to_str().unwrap(),
        ],
    )
    .expect_err("a changed layout must be refused");
    assert!(refused.contains("tally"), "{refused}");

    // The running entry is a loop head: no jump can be placed over it.
    let looped = edited(
        &target.dir,
        "loop",
        &[(
            "    while (!*flag)\n        ;",
            "    while (!*flag)\n        __builtin_ia32_pause();",
        )],
    );
    target
        .build_patch(&looped, "loop.o")
        .unwrap_or_else(|e| panic!("build-patch: {e}"));
    let refused = evolve(
        &target.sockets,
        &[
            "apply",
            &target.pid(),
            target.dir.join("loop.o").to_str().unwrap(),
        ],
    )
    .expect_err("a loop-head entry must be refused");
    assert!(refused.contains("wait_ready"), "{refused}");
    assert!(
        refused.contains("branch target") || refused.contains("loop"),
        "{refused}"
    );

    // `twice` is a static of server.c and of stats.c: which one a patch replaces cannot be
    // told by its symbol.
    let ambiguous = edited(
        &target.dir,
        "ambiguous",
        &[(
            "static long twice(long v) { return v + v; }",
            "static long twice(long v) { return v + v + 1; }",
        )],
    );
    let refused = target
        .build_patch(&ambiguous, "ambiguous.o")
        .expect_err("an ambiguous static function must be refused");
    assert!(
        refused.contains("twice") && refused.contains("server.c") && refused.contains("stats.c"),
        "{refused}"
    );
    assert!(!target.dir.join("ambiguous.o").exists());

    // Flags that do not reproduce the running code: refused before anything is compared.
    let output = target.dir.join("flags.o");
    let sources = format!(
        "{}={}",
        target.dir.join("src/server.c").display(),
        target.dir.join("edited-never/server.c").display()
    );
    let refused = evolve(
        &target.sockets,
        &[
            "build-patch",
            "--pid",
            &target.pid(),
            "--c-source",
            &sources,
            "--cflags=-O0",
            "-o",
            output.to_str().unwrap(),
        ],
    )
    .expect_err("other flags must be refused");
    assert!(refused.contains("does not reproduce"), "{refused}");

    // Nothing changed: the code, the history, the replies.
    assert_eq!(target.code(&watched), before);
    let status = ok(&target.sockets, &["status", &target.pid()]);
    let active = status["patches"].as_array().map_or(0, |p| {
        p.iter().filter(|p| p["reverted_at"].is_null()).count()
    });
    assert_eq!(active, 0, "{status:#}");
    assert!(ask(port, "VERSION\n").starts_with("VERSION 1 "));
    assert_eq!(ask(port, "SET a 7\n"), "OK");
    assert_eq!(ask(port, "GET a\n"), "VALUE 7");
}
