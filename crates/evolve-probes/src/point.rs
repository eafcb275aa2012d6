//! Points (detoured functions) and the probes on them: the library API the `evolve probe`
//! commands call.
//!
//! # Data path
//!
//! Every call through a point increments the point's counter in the trampoline; a count probe
//! reads `counter - counter_when_added`, so it costs nothing beyond that increment. While any
//! probe of the point needs the entry hook, the point's `slow` flag is set and the hook reads
//! the point's probe list (a [`Published`] version: no lock) and lets each probe record. Hooks
//! run with probes off for their thread (the engine's re-entrancy guard), so a hook that
//! allocates, locks, writes or unwinds through probed functions neither recurses nor
//! deadlocks.
//!
//! # Lifecycle
//!
//! The first probe on a function installs the detour; removing the last removes it (the bytes
//! are restored exactly, see [`evolve_code::Detour::remove`]). A coverage probe's first hit
//! asks a reaper thread to detach it (the hook itself cannot stop the world); its reading stays
//! available until [`remove`].
//!
//! Nothing a probe leaves behind grows without bound: a replaced probe list is freed once no
//! hook reads it, and a removed latency probe's sink is retired to the engine, which frees it
//! once no thread's shadow stack names it ([`evolve_code::shadow`]).

use crate::glob;
use crate::kind::ProbeKind;
use evolve_code::shadow::{ns_per_tick, ReturnSink, Sink};
use evolve_code::{inspect, Counter, Detour, DetourHooks, Entry, Published};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Identifies a probe (unique for the life of the process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProbeId(pub u64);

impl fmt::Display for ProbeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a probe operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// No function of the process matches the pattern.
    NoMatch {
        /// The pattern given.
        pattern: String,
    },
    /// Every matching function was refused; the first refusal is given.
    Refused {
        /// The function's name.
        function: String,
        /// The engine's reason (e.g. a prologue that cannot be relocated).
        reason: String,
    },
    /// No probe has this id.
    UnknownProbe(ProbeId),
    /// The engine failed (reading the process's images, writing code).
    Engine(evolve_code::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoMatch { pattern } => write!(f, "no function matches `{pattern}`"),
            Error::Refused { function, reason } => {
                write!(f, "cannot probe `{function}`: {reason}")
            }
            Error::UnknownProbe(id) => write!(f, "no probe has id {id}"),
            Error::Engine(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<evolve_code::Error> for Error {
    fn from(e: evolve_code::Error) -> Error {
        Error::Engine(e)
    }
}

/// Result of a probe operation.
pub type Result<T> = std::result::Result<T, Error>;

/// Latency figures of a latency probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyReading {
    /// Calls timed (returned or unwound).
    pub count: u64,
    /// Of those, calls that a panic or exception unwound instead of a return.
    pub unwound: u64,
    /// Mean entry-to-exit time.
    pub mean_ns: f64,
    /// Longest entry-to-exit time.
    pub max_ns: f64,
    /// Log2 histogram of nanoseconds: `(lower bound, count)` for every non-empty bucket.
    pub histogram_ns: Vec<(u64, u64)>,
}

/// What a probe has recorded so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReading {
    /// The probe.
    pub id: ProbeId,
    /// The function's (demangled) name.
    pub function: String,
    /// The function's address.
    pub address: usize,
    /// The probe's kind, in its textual form (`count`, `hist:arg0`, …).
    pub kind: String,
    /// Calls of the function since the probe was added (until it was detached).
    pub calls: u64,
    /// For latency probes.
    pub latency: Option<LatencyReading>,
    /// For histogram probes: `(lower bound, count)` per non-empty log2 bucket (0, 1, 2, 4, …).
    pub histogram: Vec<(u64, u64)>,
    /// For predicate probes: calls where the predicate held.
    pub hits: u64,
    /// For predicate probes: the first backtraces captured (at most 4).
    pub backtraces: Vec<String>,
    /// For coverage probes: whether the function ran.
    pub covered: bool,
    /// Whether the probe is still attached (a coverage probe detaches after its first hit).
    pub attached: bool,
}

/// A probe as [`list`] shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeInfo {
    /// The probe.
    pub id: ProbeId,
    /// The function's name.
    pub function: String,
    /// The function's address.
    pub address: usize,
    /// The probe's kind.
    pub kind: String,
    /// Whether it is attached.
    pub attached: bool,
}

const BUCKETS: usize = 65;
const MAX_BACKTRACES: usize = 4;
/// Frames kept per backtrace.
const MAX_FRAMES: usize = 32;

/// A backtrace as text, one frame a line (`   N: function (address)`, as std prints them),
/// starting at the probed call's caller.
fn symbolized(addresses: &[usize]) -> String {
    let mut out = String::new();
    for (i, &a) in addresses.iter().enumerate() {
        // A return address points after the call: look up the call itself.
        let name = inspect::symbolize(a.saturating_sub(1))
            .map_or_else(|| "<unknown>".to_string(), |(_, s)| s.demangled);
        out.push_str(&format!("{i:4}: {name} ({a:#x})\n"));
    }
    out
}

fn bucket(v: u64) -> usize {
    64 - v.leading_zeros() as usize
}

fn buckets_reading(b: &[AtomicU64]) -> Vec<(u64, u64)> {
    b.iter()
        .enumerate()
        .map(|(i, c)| {
            (
                if i == 0 { 0 } else { 1u64 << (i - 1) },
                c.load(Ordering::Relaxed),
            )
        })
        .filter(|&(_, c)| c > 0)
        .collect()
}

fn new_buckets() -> Box<[AtomicU64]> {
    (0..BUCKETS).map(|_| AtomicU64::new(0)).collect()
}

/// Where a latency probe's exits go. Shared with the engine's [`Sink`]: a frame entered before
/// the probe's removal may report to it long after, and the engine frees its handle only once
/// no frame can.
struct LatencySink {
    unwound: AtomicU64,
    total: AtomicU64,
    max: AtomicU64,
    buckets: Box<[AtomicU64]>,
}

impl ReturnSink for LatencySink {
    fn returned(&self, entered: u64, left: u64, unwound: bool) {
        let ticks = left.saturating_sub(entered);
        if unwound {
            self.unwound.fetch_add(1, Ordering::Relaxed);
        }
        self.total.fetch_add(ticks, Ordering::Relaxed);
        // Two read-modify-writes per return (total, bucket): the count is the buckets' sum,
        // and the maximum is written only when it grows.
        if ticks > self.max.load(Ordering::Relaxed) {
            self.max.fetch_max(ticks, Ordering::Relaxed);
        }
        self.buckets[bucket(ticks)].fetch_add(1, Ordering::Relaxed);
    }
}

struct Probe {
    id: ProbeId,
    kind: ProbeKind,
    function: String,
    address: usize,
    counter: Arc<Counter>,
    /// Counter value when attached (set after the probe is visible to the hook, see `attach`).
    base: AtomicU64,
    /// Counter value when detached.
    end: Mutex<Option<u64>>,
    buckets: Box<[AtomicU64]>,
    hits: AtomicU64,
    /// Return addresses of the first hits, from the caller (symbolized when read).
    backtraces: Mutex<Vec<Vec<usize>>>,
    /// How many `backtraces` holds (read by the hook without the lock).
    captured: std::sync::atomic::AtomicUsize,
    covered: AtomicBool,
    latency: Option<Arc<LatencySink>>,
    /// The same sink as the shadow stack stores it.
    sink: Option<Sink>,
}

impl Probe {
    fn on_entry(&self, e: &mut Entry<'_>) {
        match self.kind {
            ProbeKind::Count => {}
            ProbeKind::Latency => {
                if let Some(sink) = &self.sink {
                    e.on_return(sink);
                }
            }
            ProbeKind::Histogram { arg } => {
                self.buckets[bucket(e.arg(arg))].fetch_add(1, Ordering::Relaxed);
            }
            ProbeKind::Predicate { arg, cmp, value } => {
                if cmp.holds(e.arg(arg), value) {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    // Until a few are kept (a hit from the unwinder itself keeps none).
                    if self.captured.load(Ordering::Relaxed) < MAX_BACKTRACES {
                        // Raw addresses, no lock of the runtime (the probed code may hold
                        // std's backtrace lock); none if the call comes from the unwinder.
                        // A reader holding the list gets no backtrace from this hit rather
                        // than a hook waiting for it.
                        if let (Some(bt), Ok(mut b)) =
                            (e.backtrace(MAX_FRAMES), self.backtraces.try_lock())
                        {
                            if b.len() < MAX_BACKTRACES {
                                b.push(bt);
                                self.captured.store(b.len(), Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
            ProbeKind::Coverage => {
                if !self.covered.swap(true, Ordering::AcqRel) {
                    let _ = reaper()
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .send(self.id);
                }
            }
        }
    }

    fn reading(&self, attached: bool) -> ProbeReading {
        // What the hook recorded is read before the call counter (each call is counted
        // before its hook runs), so a reading taken while calls run never shows more
        // hooked calls than `calls`, except the few in flight when the probe was attached.
        let histogram = buckets_reading(&self.buckets);
        let latency = self.latency.as_ref().map(|s| {
            let count = s
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .sum::<u64>();
            let rate = ns_per_tick();
            LatencyReading {
                count,
                unwound: s.unwound.load(Ordering::Relaxed),
                mean_ns: s.total.load(Ordering::Relaxed) as f64 * rate / count.max(1) as f64,
                max_ns: s.max.load(Ordering::Relaxed) as f64 * rate,
                histogram_ns: buckets_reading(&s.buckets)
                    .into_iter()
                    .map(|(low, c)| ((low as f64 * rate) as u64, c))
                    .collect(),
            }
        });
        let now = self
            .end
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or_else(|| self.counter.get());
        ProbeReading {
            id: self.id,
            function: self.function.clone(),
            address: self.address,
            kind: self.kind.to_string(),
            calls: now - self.base.load(Ordering::Relaxed),
            latency,
            histogram,
            hits: self.hits.load(Ordering::Relaxed),
            backtraces: self
                .backtraces
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .iter()
                .map(|bt| symbolized(bt))
                .collect(),
            covered: self.covered.load(Ordering::Relaxed),
            attached,
        }
    }
}

/// A point's probes, as the hook reads them: no lock, and a replaced version is freed once no
/// hook reads it (see [`evolve_code::Published`]).
type ProbeList = Arc<Published<Hooked>>;

/// A version of a point's probe list, with what the hook needs precomputed.
struct Hooked {
    probes: Vec<Arc<Probe>>,
    /// The latency probe's sink (a point has at most one): timed without walking the list.
    latency: Option<Sink>,
    /// Whether a probe other than count and latency needs the hook.
    others: bool,
}

impl Hooked {
    fn new(probes: Vec<Arc<Probe>>) -> Hooked {
        Hooked {
            latency: probes.iter().find_map(|p| p.sink.clone()),
            others: probes
                .iter()
                .any(|p| !matches!(p.kind, ProbeKind::Count | ProbeKind::Latency)),
            probes,
        }
    }

    /// The hook: kept small, the latency probe inline and the other kinds out of line.
    fn on_entry(&self, e: &mut Entry<'_>) {
        if let Some(sink) = &self.latency {
            e.on_return(sink);
        }
        if self.others {
            self.others_on_entry(e);
        }
    }

    #[inline(never)]
    fn others_on_entry(&self, e: &mut Entry<'_>) {
        for p in &self.probes {
            if !matches!(p.kind, ProbeKind::Latency) {
                p.on_entry(e);
            }
        }
    }
}

struct Point {
    detour: Detour,
    counter: Arc<Counter>,
    slow: Arc<AtomicBool>,
    probes: ProbeList,
}

#[derive(Default)]
struct Registry {
    points: HashMap<usize, Point>,
    probes: HashMap<ProbeId, (Arc<Probe>, bool)>,
    next: u64,
}

fn registry() -> MutexGuard<'static, Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn reaper() -> &'static Mutex<Sender<ProbeId>> {
    static S: OnceLock<Mutex<Sender<ProbeId>>> = OnceLock::new();
    S.get_or_init(|| {
        let (tx, rx) = channel::<ProbeId>();
        std::thread::Builder::new()
            .name("evolve-probe-reaper".into())
            .spawn(move || {
                for id in rx {
                    let _ = detach(&mut registry(), id);
                }
            })
            .expect("spawn the probe reaper");
        Mutex::new(tx)
    })
}

/// Prepared functions of the program: `(name, entry stub)`. Hot functions come from the
/// engine's stub table (`crate::module::function`); multiverse functions from their stub
/// symbols (`path::__evolve_mv_stub_NAME` is the entry of `path::NAME`).
fn prepared() -> Result<&'static [(String, usize)]> {
    static PREPARED: OnceLock<Vec<(String, usize)>> = OnceLock::new();
    if let Some(p) = PREPARED.get() {
        return Ok(p);
    }
    let exe = inspect::executable()?;
    let mut out: Vec<(String, usize)> = evolve_code::stub::STUBS
        .iter()
        .map(|e| (e.name().to_string(), e.stub_address()))
        .collect();
    for f in exe.functions() {
        if let Some(at) = f.demangled.find(MV_STUB) {
            let name = format!(
                "{}{}",
                &f.demangled[..at],
                &f.demangled[at + MV_STUB.len()..]
            );
            out.push((name, f.address));
        }
    }
    Ok(PREPARED.get_or_init(|| out))
}

const MV_STUB: &str = "__evolve_mv_stub_";

/// Symbols a glob skips: the parts of prepared functions (stubs, implementations, variant
/// bodies), which are probed as one function through the prepared name.
fn is_prepared_part(name: &str) -> bool {
    [
        "__evolve_stub_",
        "__evolve_impl_",
        MV_STUB,
        "__evolve_mv_body_",
    ]
    .iter()
    .any(|p| name.contains(p))
}

type Resolved = Vec<(String, usize, usize)>;

/// Functions matching `pattern`: `(name, address, size)`, deduplicated by address. A prepared
/// function's address is its entry stub. Results are cached per pattern while the process's
/// loaded images stay the same (a probe added and removed in a loop resolves once).
fn resolve(pattern: &str) -> Result<Resolved> {
    type Cache = HashMap<String, (Vec<(std::path::PathBuf, usize)>, Resolved)>;
    static CACHE: Mutex<Option<Cache>> = Mutex::new(None);
    let images = inspect::images()?;
    let key: Vec<(std::path::PathBuf, usize)> = images
        .iter()
        .map(|i| (i.path().to_path_buf(), i.load_bias()))
        .collect();
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some((k, resolved)) = cache.get(pattern) {
        if *k == key {
            return Ok(resolved.clone());
        }
    }
    let resolved = resolve_in(pattern, &images)?;
    if cache.len() > 256 {
        cache.clear();
    }
    cache.insert(pattern.to_string(), (key, resolved.clone()));
    Ok(resolved)
}

fn resolve_in(pattern: &str, images: &[inspect::Image]) -> Result<Resolved> {
    let mut out: Resolved = Vec::new();
    let prepared = prepared()?;
    if glob::is_glob(pattern) {
        // Every match contains the pattern's longest literal run: a fast substring test
        // rejects almost every symbol before the glob runs.
        let literal = pattern
            .split(['*', '?'])
            .max_by_key(|l| l.len())
            .unwrap_or("");
        let candidate = |name: &str| name.contains(literal) && glob::matches(pattern, name);
        for (name, stub) in prepared {
            if candidate(name) {
                out.push((name.clone(), *stub, evolve_code::SITE_LEN));
            }
        }
        for image in images {
            for f in image.functions().filter(|f| f.size > 0) {
                if (candidate(&f.demangled) || candidate(&f.name))
                    && !is_prepared_part(&f.demangled)
                {
                    out.push((f.demangled.clone(), f.address, f.size));
                }
            }
        }
    } else if let Some((name, stub)) = prepared.iter().find(|(name, _)| name == pattern) {
        out.push((name.clone(), *stub, evolve_code::SITE_LEN));
    } else {
        for image in images {
            if let Some(f) = image.symbol_by_name(pattern).filter(|f| f.size > 0) {
                out.push((f.demangled.clone(), f.address, f.size));
                break;
            }
        }
    }
    out.sort_by_key(|f| f.1);
    out.dedup_by_key(|f| f.1);
    if out.is_empty() {
        return Err(Error::NoMatch {
            pattern: pattern.to_string(),
        });
    }
    Ok(out)
}

/// Attaches a probe of `kind` to every function matching `pattern` (an exact symbol name,
/// demangled or raw, or a glob such as `kv::commands::*`); returns one id per function.
///
/// Functions the engine refuses (a prologue that cannot be relocated, a prepared function) are
/// skipped when the pattern is a glob; if every match is refused, the first refusal is returned.
///
/// # Errors
/// [`Error::NoMatch`], [`Error::Refused`] (with the engine's reason), [`Error::Engine`].
pub fn add(pattern: &str, kind: ProbeKind) -> Result<Vec<ProbeId>> {
    let functions = resolve(pattern)?;
    let mut ids = Vec::new();
    let mut first_refusal = None;
    let mut r = registry();
    for (name, address, size) in functions {
        match attach(&mut r, &name, address, size, kind) {
            Ok(id) => ids.push(id),
            Err(Error::Engine(e)) if first_refusal.is_none() => {
                first_refusal = Some(Error::Refused {
                    function: name,
                    reason: e.to_string(),
                })
            }
            Err(Error::Refused { function, reason }) if first_refusal.is_none() => {
                first_refusal = Some(Error::Refused { function, reason })
            }
            Err(_) => {}
        }
    }
    match (ids.is_empty(), first_refusal) {
        (true, Some(e)) => Err(e),
        _ => Ok(ids),
    }
}

fn attach(
    r: &mut Registry,
    name: &str,
    address: usize,
    size: usize,
    kind: ProbeKind,
) -> Result<ProbeId> {
    if let std::collections::hash_map::Entry::Vacant(slot) = r.points.entry(address) {
        let counter = Arc::new(Counter::new());
        // A new point's first probe: the hook is on before any call can reach the detour.
        let slow = Arc::new(AtomicBool::new(kind.needs_hook()));
        let probes: ProbeList = Arc::new(Published::new(Hooked::new(Vec::new())));
        let list = probes.clone();
        let hooks = DetourHooks {
            counter: counter.clone(),
            slow: slow.clone(),
            on_entry: Arc::new(move |e: &mut Entry<'_>| list.read(|l| l.on_entry(e))),
        };
        let detour = Detour::install_at_function(address, size, hooks)?;
        slot.insert(Point {
            detour,
            counter,
            slow,
            probes,
        });
    }
    let point = &r.points[&address];
    let mut probes = point.probes.read(|l| l.probes.clone());
    if kind == ProbeKind::Latency && probes.iter().any(|p| p.kind == ProbeKind::Latency) {
        return Err(Error::Refused {
            function: name.to_string(),
            reason: "it already has a latency probe (read that one)".into(),
        });
    }
    r.next += 1;
    let id = ProbeId(r.next);
    let latency = (kind == ProbeKind::Latency).then(|| {
        Arc::new(LatencySink {
            unwound: AtomicU64::new(0),
            total: AtomicU64::new(0),
            max: AtomicU64::new(0),
            buckets: new_buckets(),
        })
    });
    let probe = Arc::new(Probe {
        id,
        kind,
        function: name.to_string(),
        address,
        counter: point.counter.clone(),
        base: AtomicU64::new(0),
        end: Mutex::new(None),
        buckets: new_buckets(),
        hits: AtomicU64::new(0),
        backtraces: Mutex::new(Vec::new()),
        captured: std::sync::atomic::AtomicUsize::new(0),
        covered: AtomicBool::new(false),
        sink: latency.clone().map(|l| Sink::new(l as Arc<dyn ReturnSink>)),
        latency,
    });
    // `base` is read before the probe is published: every call the hook sees is counted in
    // `calls`; calls that pass while the probe is being published are counted without reaching
    // its hook (a reading never shows more hooked calls than `calls`, except for the few calls
    // in flight: a thread's per-thread increment may become visible after `base` was read).
    probe.base.store(point.counter.get(), Ordering::SeqCst);
    probes.push(probe.clone());
    point.slow.store(hook_needed(&probes), Ordering::SeqCst);
    point.probes.set(Hooked::new(probes));
    if kind == ProbeKind::Latency {
        // Timed by the trampoline from now on (or by the hook, whose `slow` flag is then set).
        point.detour.set_latency(probe.sink.as_ref());
    }
    r.probes.insert(id, (probe, true));
    Ok(id)
}

/// Whether calls must go through the point's hook for these probes: every kind but counting,
/// and latency only where trampolines cannot time calls themselves.
fn hook_needed(probes: &[Arc<Probe>]) -> bool {
    let timed_by_trampoline = evolve_code::shadow::trampolines_time_calls();
    probes.iter().any(|p| match p.kind {
        ProbeKind::Count => false,
        ProbeKind::Latency => !timed_by_trampoline,
        _ => true,
    })
}

/// Takes a probe off its point (removing the detour with the last probe); keeps its reading.
fn detach(r: &mut Registry, id: ProbeId) -> Result<()> {
    let (probe, attached) = r.probes.get_mut(&id).ok_or(Error::UnknownProbe(id))?;
    if !*attached {
        return Ok(());
    }
    *attached = false;
    let probe = probe.clone();
    let address = probe.address;
    let point = r
        .points
        .get(&address)
        .expect("an attached probe has a point");
    let remaining = {
        let mut probes = point.probes.read(|l| l.probes.clone());
        probes.retain(|p| p.id != id);
        if probe.kind == ProbeKind::Latency {
            point.detour.set_latency(None);
        }
        point.slow.store(hook_needed(&probes), Ordering::SeqCst);
        let n = probes.len();
        point.probes.set(Hooked::new(probes));
        n
    };
    *probe.end.lock().unwrap_or_else(|p| p.into_inner()) = Some(point.counter.get());
    if remaining == 0 {
        let point = r.points.remove(&address).expect("present");
        point.detour.remove()?;
    }
    Ok(())
}

/// Every probe, attached or kept for its reading.
pub fn list() -> Vec<ProbeInfo> {
    let r = registry();
    let mut out: Vec<ProbeInfo> = r
        .probes
        .values()
        .map(|(p, attached)| ProbeInfo {
            id: p.id,
            function: p.function.clone(),
            address: p.address,
            kind: p.kind.to_string(),
            attached: *attached,
        })
        .collect();
    out.sort_by_key(|p| p.id);
    out
}

/// Removes a probe; with the last probe of a function, the function's bytes are restored.
///
/// # Errors
/// [`Error::UnknownProbe`]; [`Error::Engine`] if the bytes could not be restored.
pub fn remove(id: ProbeId) -> Result<()> {
    let mut r = registry();
    detach(&mut r, id)?;
    r.probes.remove(&id);
    drop(r);
    // Removed trampolines and retired latency sinks are freed in batches.
    evolve_code::reclaim_if_due();
    Ok(())
}

/// Removes every probe, restoring every probed function.
pub fn remove_all() -> Result<()> {
    let mut r = registry();
    let ids: Vec<ProbeId> = r.probes.keys().copied().collect();
    let mut first = Ok(());
    for id in ids {
        if let Err(e) = detach(&mut r, id) {
            if first.is_ok() {
                first = Err(e);
            }
        }
        r.probes.remove(&id);
    }
    drop(r);
    evolve_code::reclaim_if_due();
    first
}

/// What a probe has recorded so far.
pub fn read(id: ProbeId) -> Result<ProbeReading> {
    let r = registry();
    let (p, attached) = r.probes.get(&id).ok_or(Error::UnknownProbe(id))?;
    Ok(p.reading(*attached))
}
