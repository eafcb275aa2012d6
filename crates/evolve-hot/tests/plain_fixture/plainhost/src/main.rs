//! The host of the format-2 tests: `EVOLVE_STRESS_THREADS` threads (default 4) call every
//! target continuously and check every result (`base << 4 | version`: the base must be right,
//! the version is counted); commands on stdin apply and revert patches; one JSON line answers
//! each. With `--agent` it also starts the control agent (one line in `main`, no build step),
//! so the `evolve` CLI reaches it; `epoch` then marks a change made through the CLI. Calls are counted by the epoch they started in: the epoch moves on after every apply
//! or revert, so a call counted in the current epoch started after the change returned.
use plainlib::Shape;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::io::BufRead;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A function of the binary crate.
#[inline(never)]
fn local(x: u64) -> u64 {
    (x ^ 0x55) << 4 | 1 // local v1
}

type Target = (&'static str, fn(u64) -> u64, fn(u64) -> u64);

/// (name, call, expected base).
const TARGETS: &[Target] = &[
    ("free", |x| plainlib::free(x), |x| x * 3),
    ("area_dyn", |x| plainlib::area_dyn(black_box(&plainlib::Square(x) as &dyn Shape)), |x| x * x),
    ("area_generic", |x| plainlib::area_generic(&plainlib::Square(x)), |x| x * x),
    ("twice", |x| plainlib::twice(black_box(x as u32)), |x| (x as u32 as u64) * 2),
    ("closure", |x| plainlib::with_closure(x), |x| x + 10),
    ("local", |x| local(x), |x| x ^ 0x55),
    ("scaled", |x| plainlib::scaled(x), |x| x.wrapping_mul(7) & (u64::MAX >> 4)),
    ("scaled_xor", |x| plainlib::scaled_xor(x), |x| (x.wrapping_mul(7) ^ (x << 4)) & (u64::MAX >> 4)),
    ("other", |x| plainlib::other(x), |x| x + 5),
    // The stress test's 100 functions: through their table, and through direct calls.
    ("many", |x| plainlib::MANY[(x % 100) as usize](x), |x| x + x % 100 + 1000),
    ("many_direct", |x| plainlib::call_many(x), |x| x + x % 100 + 1000),
];

/// Per epoch, per target: [errors, v1, v2, v3, v4].
type Counts = BTreeMap<u64, Vec<[u64; 5]>>;

static EPOCH: AtomicU64 = AtomicU64::new(0);
static COUNTS: Mutex<Counts> = Mutex::new(BTreeMap::new());
static FIRST_ERROR: Mutex<Option<String>> = Mutex::new(None);

fn flush(epoch: u64, local: &mut [[u64; 5]]) {
    let mut counts = COUNTS.lock().unwrap();
    let entry = counts
        .entry(epoch)
        .or_insert_with(|| vec![[0; 5]; TARGETS.len()]);
    for (sum, add) in entry.iter_mut().zip(local.iter_mut()) {
        for (s, a) in sum.iter_mut().zip(add.iter_mut()) {
            *s += *a;
            *a = 0;
        }
    }
}

fn worker(seed: u64, stop: Arc<AtomicBool>) {
    let mut local = vec![[0u64; 5]; TARGETS.len()];
    let mut epoch = EPOCH.load(Ordering::Acquire);
    let mut x = seed;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for (i, (name, call, base)) in TARGETS.iter().enumerate() {
            let now = EPOCH.load(Ordering::Acquire);
            if now != epoch {
                flush(epoch, &mut local);
                epoch = now;
            }
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) >> 40;
            let r = call(x);
            let version = (r & 0xf) as usize;
            if r >> 4 != base(x) || !(1..=4).contains(&version) {
                local[i][0] += 1;
                FIRST_ERROR.lock().unwrap().get_or_insert_with(|| {
                    format!("{name}({x}) returned {r:#x}, base {:#x} expected", base(x))
                });
            } else {
                local[i][version] += 1;
            }
        }
        n += 1;
        if n % 256 == 0 {
            flush(epoch, &mut local);
        }
    }
    flush(epoch, &mut local);
}

fn stats() -> Value {
    let counts = COUNTS.lock().unwrap();
    let epoch = EPOCH.load(Ordering::Acquire);
    let errors: u64 = counts.values().flatten().map(|c| c[0]).sum();
    let now: Value = counts.get(&epoch).map_or(json!({}), |per| {
        TARGETS
            .iter()
            .zip(per)
            .map(|((name, _, _), c)| (name.to_string(), json!(c[1..].to_vec())))
            .collect::<serde_json::Map<_, _>>()
            .into()
    });
    json!({
        "epoch": epoch,
        "errors": errors,
        "first_error": *FIRST_ERROR.lock().unwrap(),
        "versions": now,
    })
}

fn answer(result: Result<Value, String>) {
    let line = match result {
        Ok(v) => v,
        Err(e) => json!({ "error": e }),
    };
    println!("{line}");
}

fn main() {
    let agent = std::env::args()
        .any(|a| a == "--agent")
        .then(|| evolve_agent::start().expect("the agent starts"));
    let threads: usize = std::env::var("EVOLVE_STRESS_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(4);
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..threads as u64)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || worker(t + 1, stop))
        })
        .collect();
    // Each target once on this thread too: every result of the program's version.
    let direct: Vec<u64> = TARGETS.iter().map(|(_, call, _)| call(3) & 0xf).collect();
    let socket = agent.as_ref().map(|a| a.socket().display().to_string());
    answer(Ok(json!({ "ready": true, "versions": direct, "socket": socket })));
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        let result = match words.as_slice() {
            ["apply", path, rest @ ..] => {
                let options = evolve_hot::patch::ApplyOptions {
                    trial: rest
                        .first()
                        .map(|ms| std::time::Duration::from_millis(ms.parse().unwrap())),
                    ..Default::default()
                };
                let r = evolve_hot::patch::apply_with(path, &options);
                EPOCH.fetch_add(1, Ordering::AcqRel);
                r.map(|r| json!({ "ok": true, "patch": r.patch, "updated": r.updated, "verify_ms": r.verify_ms, "load_ms": r.load_ms, "apply_ms": r.apply_ms, "total_ms": r.total_ms }))
                    .map_err(|e| e.to_string())
            }
            ["revert", rest @ ..] => {
                let what = match rest {
                    [] => evolve_hot::patch::Revert::Last,
                    [name] => evolve_hot::patch::Revert::Patch(name.to_string()),
                    [name, version] => evolve_hot::patch::Revert::Function {
                        name: name.to_string(),
                        version: version.parse().unwrap(),
                    },
                    _ => panic!("revert [patch | function version]"),
                };
                let r = evolve_hot::patch::revert(what);
                EPOCH.fetch_add(1, Ordering::AcqRel);
                r.map(|changed| json!({ "ok": true, "changed": changed }))
                    .map_err(|e| e.to_string())
            }
            ["stats"] => Ok(stats()),
            ["serve", n] => Ok(serve(n.parse().unwrap())),
            ["epoch"] => Ok(json!({ "epoch": EPOCH.fetch_add(1, Ordering::AcqRel) + 1 })),
            ["call", name, x] => TARGETS
                .iter()
                .find(|t| t.0 == *name)
                .map(|t| json!({ "result": t.1(x.parse().unwrap()) }))
                .ok_or_else(|| format!("no target {name}")),
            ["loop", n] => Ok(json!({ "result": plainlib::plainlib_loop_entry(n.parse().unwrap(), 40) })),
            ["functions"] => Ok(json!(evolve_hot::patch::functions()
                .into_iter()
                .map(|f| json!({ "name": f.name, "versions": f.versions, "current": f.current }))
                .collect::<Vec<_>>())),
            ["history"] => Ok(json!(evolve_hot::patch::history()
                .into_iter()
                .map(|p| json!({ "name": p.name, "reverted": p.reverted_at.is_some(), "unloaded": p.unloaded_at.is_some() }))
                .collect::<Vec<_>>())),
            ["gc", policy] => evolve_hot::reclaim::collect(policy.parse().unwrap())
                .map(|r| json!({ "unloaded": r.unloaded, "kept": r.kept, "resident": r.resident }))
                .map_err(|e| e.to_string()),
            ["peek", address] => Ok(peek(usize::from_str_radix(address.trim_start_matches("0x"), 16).unwrap())),
            ["code", name] => Ok(json!({ "bytes": code_of(name) })),
            ["quit"] => break,
            _ => Err(format!("unknown command {line:?}")),
        };
        answer(result);
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
}

/// A Tokio service: `n` requests, each a task calling `plainlib::handle` on the runtime's
/// workers (which catch a panicking task: its `JoinHandle` reports it). Answers the versions
/// the requests saw, the panics and the wrong results.
fn serve(n: u64) -> Value {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap()
    });
    runtime.block_on(async {
        let tasks: Vec<_> = (0..n)
            .map(|x| tokio::spawn(async move { (x, plainlib::handle(black_box(x))) }))
            .collect();
        let (mut versions, mut panics, mut errors) = ([0u64; 4], 0u64, 0u64);
        for task in tasks {
            match task.await {
                Ok((x, r)) if r >> 4 == x + 1 && (1..=4).contains(&(r & 0xf)) => {
                    versions[(r & 0xf) as usize - 1] += 1
                }
                Ok(_) => errors += 1,
                Err(e) if e.is_panic() => panics += 1,
                Err(_) => errors += 1,
            }
        }
        json!({ "versions": versions, "panics": panics, "errors": errors })
    })
}

/// The first 16 bytes of a target's function (to check that revert restores them exactly).
fn code_of(name: &str) -> Vec<u8> {
    let address = match name {
        "free" => plainlib::free as fn(u64) -> u64 as usize,
        "local" => local as fn(u64) -> u64 as usize,
        "other" => plainlib::other as fn(u64) -> u64 as usize,
        _ => return Vec::new(),
    };
    // The process's own text, read through /proc: no unsafe needed.
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open("/proc/self/mem").unwrap();
    file.seek(SeekFrom::Start(address as u64)).unwrap();
    let mut bytes = vec![0u8; 16];
    file.read_exact(&mut bytes).unwrap();
    bytes
}

fn peek(address: usize) -> Value {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let region = maps.lines().find(|l| {
        let range = l.split_whitespace().next().unwrap();
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (usize::from_str_radix(a, 16).unwrap(), usize::from_str_radix(b, 16).unwrap());
        (a..b).contains(&address)
    });
    let mut file = std::fs::File::open("/proc/self/mem").unwrap();
    file.seek(SeekFrom::Start((address - 64) as u64)).unwrap();
    let mut bytes = vec![0u8; 192];
    file.read_exact(&mut bytes).unwrap();
    let words: Vec<String> = bytes.chunks(8).map(|c| format!("{:#x}", c.iter().rev().fold(0u64, |w, &b| w << 8 | b as u64))).collect();
    let text: String = bytes.iter().map(|&b| if b.is_ascii_graphic() { b as char } else { '.' }).collect();
    json!({ "region": region, "words": words, "text": text })
}
