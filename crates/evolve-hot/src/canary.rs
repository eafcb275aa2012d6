//! The in-process canary (DynAMOS's adaptation handler): a new version serves a fraction of the
//! calls, threads or connections first; errors are counted per version; then the new version
//! takes everything ([`finish`] promotes it, exactly as [`crate::patch::apply`] would have) or
//! is rolled back, and the other side never noticed.
//!
//! # Routing
//!
//! `#[evolve::hot]` emits, beside each function's stub, a **router** with the same signature
//! and two more stubs, *old* and *new* (see `evolve-hot-macros`'s `canary` module). [`start`]:
//!
//! 1. loads and verifies the patch as an apply does (nothing changes if it is refused);
//! 2. points each changed function's *old* stub at the version running now and its *new* stub
//!    at the patch's implementation — nothing reaches these stubs yet;
//! 3. installs an entry detour on each error function, whose hook counts the call for the
//!    side the calling thread is on;
//! 4. retargets each function's own stub to its router, in one batch.
//!
//! From then on every call runs the router, which picks a side ([`__enter`]) and calls that
//! side's stub: plain typed Rust calls, nothing generated at run time. A call already running
//! finishes on the code it started with, as with any retarget. [`finish`] retargets the stubs
//! away from the routers: to the new version (then records the patch as applied) or back to the
//! old one (then records it as reverted, so reclamation unloads it once no thread is in it).
//!
//! # Sides
//!
//! - [`Split::Calls`]: each call is drawn (a scrambled per-thread counter, so every thread sends
//!   the fraction); errors count for the side of the call they happen in (an error noticed
//!   after the call returned is not attributed: use the thread or connection split when the
//!   program checks results outside the changed functions).
//! - [`Split::Threads`]: each thread is drawn once per canary and stays on its side; errors
//!   count for the thread's side, inside routed calls or not (a server that counts errors after
//!   the handler returns is measured too).
//! - [`Split::Connections`]: the program names the current connection with
//!   [`set_connection`] (e.g. when a worker thread picks one up); each connection is drawn once.
//!
//! While a canary runs, `apply` and `revert` are refused (one change of code at a time).

use crate::error::{Error, ErrorKind, Result};
use crate::patch::{self, ApplyOptions, ApplyReport};
use evolve_code::stub::{Code, Stub, StubEntry};
use evolve_code::{Batch, Counter, Detour, DetourHooks};
use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// A hot function's canary routing, as `#[evolve::hot]` registers it.
#[derive(Debug)]
pub struct CanaryRoute {
    id: &'static str,
    old: StubEntry,
    new: StubEntry,
    router: StubEntry,
}

impl CanaryRoute {
    /// An entry for the link-time table: `old` and `new` are the entries of the two side stubs
    /// of function `id`, `router` the entry of its router. Safe: each [`StubEntry`] was vouched
    /// for when it was made, and every retarget checks fingerprints; a route paired with the
    /// wrong function is refused by [`start`] (ids must agree).
    pub const fn new(
        id: &'static str,
        old: StubEntry,
        new: StubEntry,
        router: StubEntry,
    ) -> CanaryRoute {
        CanaryRoute {
            id,
            old,
            new,
            router,
        }
    }
}

/// Every hot function's canary routing, filled at link time by `#[evolve::hot]`.
#[linkme::distributed_slice]
pub static CANARY_ROUTES: [CanaryRoute];

/// What the canary splits between the versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// A fraction of calls.
    Calls,
    /// A fraction of threads.
    Threads,
    /// A fraction of connections ([`set_connection`]).
    Connections,
}

impl Split {
    /// Its name: `calls`, `threads`, `connections`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Calls => "calls",
            Split::Threads => "threads",
            Split::Connections => "connections",
        }
    }

    /// Parses a name.
    pub fn parse(text: &str) -> Option<Split> {
        [Split::Calls, Split::Threads, Split::Connections]
            .into_iter()
            .find(|s| s.name() == text)
    }
}

/// How to run a canary.
#[derive(Debug, Clone, PartialEq)]
pub struct CanaryOptions {
    /// What is split.
    pub split: Split,
    /// The fraction the new version serves, 0 < f < 1.
    pub fraction: f64,
    /// Functions (exact names, demangled or raw) whose calls count as errors.
    pub errors: Vec<String>,
}

/// What a canary has seen.
#[derive(Debug, Clone, PartialEq)]
pub struct CanaryReading {
    /// The patch on canary.
    pub patch: String,
    /// What is split.
    pub split: Split,
    /// The new version's fraction.
    pub fraction: f64,
    /// Calls routed to the new version.
    pub new_calls: u64,
    /// Calls routed to the old version.
    pub old_calls: u64,
    /// Errors on the new version's side.
    pub new_errors: u64,
    /// Errors on the old version's side.
    pub old_errors: u64,
}

impl CanaryReading {
    /// Whether the new version did at most `max_ratio` times worse than the old, by error rate,
    /// having served at least one call.
    pub fn passes(&self, max_ratio: f64) -> bool {
        let rate = |errors: u64, calls: u64| errors as f64 / calls.max(1) as f64;
        self.new_calls > 0
            && rate(self.new_errors, self.new_calls)
                <= rate(self.old_errors, self.old_calls) * max_ratio
    }
}

const NONE: u8 = 0;
static SPLIT: AtomicU8 = AtomicU8::new(NONE);
static PERMILLE: AtomicU32 = AtomicU32::new(0);
static GENERATION: AtomicU64 = AtomicU64::new(1);
static NEW_CALLS: AtomicU64 = AtomicU64::new(0);
static OLD_CALLS: AtomicU64 = AtomicU64::new(0);
static NEW_ERRORS: AtomicU64 = AtomicU64::new(0);
static OLD_ERRORS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The side of the routed call this thread is in: 0 none, 1 old, 2 new.
    static IN_CALL: Cell<u8> = const { Cell::new(0) };
    static TICKS: Cell<u64> = const { Cell::new(0) };
    /// (generation, new?) of this thread's draw.
    static THREAD_SIDE: Cell<(u64, bool)> = const { Cell::new((0, false)) };
    static CONNECTION: Cell<Option<u64>> = const { Cell::new(None) };
    /// This thread's number (0: not given yet). Addresses would not do: a new thread often
    /// gets the stack and thread-locals of one that ended.
    static THREAD_NUMBER: Cell<u64> = const { Cell::new(0) };
}

static THREADS: AtomicU64 = AtomicU64::new(0);

fn thread_number() -> u64 {
    THREAD_NUMBER.with(|n| {
        if n.get() == 0 {
            n.set(THREADS.fetch_add(1, Relaxed) + 1);
        }
        n.get()
    })
}

fn split_code(split: Split) -> u8 {
    match split {
        Split::Calls => 1,
        Split::Threads => 2,
        Split::Connections => 3,
    }
}

/// A 64-bit mix (splitmix64's finaliser): spreads counters and keys over the draw.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn drawn(value: u64) -> bool {
    mix(value ^ GENERATION.load(Relaxed)) % 1000 < u64::from(PERMILLE.load(Relaxed))
}

fn thread_is_new() -> bool {
    let generation = GENERATION.load(Relaxed);
    THREAD_SIDE.with(|side| {
        let (seen, new) = side.get();
        if seen == generation {
            return new;
        }
        let new = drawn(thread_number());
        side.set((generation, new));
        new
    })
}

/// Names the connection the calling thread serves from now on (`None`: none); under
/// [`Split::Connections`] each connection is drawn once and keeps its side.
pub fn set_connection(key: Option<u64>) {
    CONNECTION.with(|c| c.set(key));
}

/// The side of a routed call; restores the thread's previous side when dropped.
#[derive(Debug)]
#[must_use]
pub struct Side {
    new: bool,
    previous: u8,
}

impl Side {
    /// Whether this call runs the new version.
    #[inline]
    pub fn is_new(&self) -> bool {
        self.new
    }
}

impl Drop for Side {
    #[inline]
    fn drop(&mut self) {
        __leave(self.previous);
    }
}

// The routers of a patch are compiled into the patch: they must call these functions in the
// program, never inline them (the thread-locals they touch are the program's, and private).

/// Called when a routed call returns: the thread's side goes back to what it was.
#[doc(hidden)]
#[inline(never)]
pub fn __leave(previous: u8) {
    IN_CALL.with(|c| c.set(previous));
}

/// Called by every router: picks this call's side and counts it.
#[doc(hidden)]
#[inline(never)]
pub fn __enter(_route: &'static CanaryRoute) -> Side {
    let new = match SPLIT.load(Relaxed) {
        1 => TICKS.with(|t| {
            let n = t.get().wrapping_add(1);
            t.set(n);
            drawn(n.wrapping_add(thread_number() << 32))
        }),
        2 => thread_is_new(),
        3 => CONNECTION.with(|c| c.get()).is_some_and(drawn),
        _ => false,
    };
    if new {
        NEW_CALLS.fetch_add(1, Relaxed);
    } else {
        OLD_CALLS.fetch_add(1, Relaxed);
    }
    let previous = IN_CALL.with(|c| c.replace(if new { 2 } else { 1 }));
    Side { new, previous }
}

/// The error hook: counts the call for the calling thread's side.
fn count_error() {
    let new = match SPLIT.load(Relaxed) {
        1 => match IN_CALL.with(|c| c.get()) {
            0 => return,
            side => side == 2,
        },
        2 => thread_is_new(),
        3 => match CONNECTION.with(|c| c.get()) {
            Some(key) => drawn(key),
            None => return,
        },
        _ => return,
    };
    if new {
        NEW_ERRORS.fetch_add(1, Relaxed);
    } else {
        OLD_ERRORS.fetch_add(1, Relaxed);
    }
}

/// A function being routed.
struct Routed {
    stub: Stub,
    route: &'static CanaryRoute,
    old: Code,
    new: Code,
}

struct Running {
    loaded: patch::Loaded,
    name: String,
    split: Split,
    fraction: f64,
    routed: Vec<Routed>,
    detours: Vec<Detour>,
}

static RUNNING: Mutex<Option<Running>> = Mutex::new(None);
static ACTIVE: AtomicBool = AtomicBool::new(false);

fn refused(reason: String) -> Error {
    Error::new(ErrorKind::Canary { reason })
}

/// Refuses `apply` and `revert` while a canary runs.
pub(crate) fn refuse_while_running() -> Result<()> {
    if ACTIVE.load(Relaxed) {
        return Err(refused(
            "a canary is running: finish it first (promote or roll back)".into(),
        ));
    }
    Ok(())
}

fn reading(running: &Running) -> CanaryReading {
    CanaryReading {
        patch: running.name.clone(),
        split: running.split,
        fraction: running.fraction,
        new_calls: NEW_CALLS.load(Relaxed),
        old_calls: OLD_CALLS.load(Relaxed),
        new_errors: NEW_ERRORS.load(Relaxed),
        old_errors: OLD_ERRORS.load(Relaxed),
    }
}

/// Starts a canary of the patch at `path` (see the module docs). A refused patch, a function
/// whose signature changed (old and new callers cannot share a router) or an error function
/// that cannot be found leaves the process as it was.
///
/// # Example
///
/// ```
/// use evolve_hot::canary::{start, CanaryOptions, Split};
///
/// // Not a patch: refused, nothing changes.
/// let options = CanaryOptions { split: Split::Calls, fraction: 0.1, errors: vec![] };
/// let err = start("/etc/hostname", &options).unwrap_err();
/// assert!(err.to_string().contains("is not an Evolve patch"));
/// ```
pub fn start(path: impl AsRef<Path>, options: &CanaryOptions) -> Result<CanaryReading> {
    if !(options.fraction > 0.0 && options.fraction < 1.0) {
        return Err(refused(format!(
            "fraction {} is not between 0 and 1",
            options.fraction
        )));
    }
    let mut slot = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(running) = slot.as_ref() {
        return Err(refused(format!("a canary of {} is running", running.name)));
    }
    let loaded = patch::load(path.as_ref())?;
    let name = loaded
        .path
        .file_stem()
        .map_or_else(|| "patch".into(), |s| s.to_string_lossy().into_owned());
    let mut error_functions = Vec::new();
    for function in &options.errors {
        let symbol = evolve_code::inspect::executable()?
            .symbol_by_name(function)
            .ok_or_else(|| refused(format!("no function {function} to count errors with")))?;
        error_functions.push((symbol.address, symbol.size));
    }
    let routed = patch::with_state(|state| {
        let mut routed = Vec::new();
        for &(entry, fingerprint, adapted) in loaded.changes() {
            if adapted {
                return Err(refused(format!(
                    "{} changed its signature: old and new callers cannot share a canary",
                    entry.name()
                )));
            }
            let route = CANARY_ROUTES
                .iter()
                .find(|r| {
                    r.id == entry.id()
                        && [&r.old, &r.new, &r.router]
                            .iter()
                            .all(|e| e.id() == entry.id())
                })
                .ok_or_else(|| {
                    refused(format!(
                        "{} has no canary routing (the program was built before it existed)",
                        entry.name()
                    ))
                })?;
            let (stub, old) = patch::current_code(state, entry)?;
            let new = loaded.object.implementation(entry.id(), fingerprint)?;
            routed.push(Routed {
                stub,
                route,
                old,
                new,
            });
        }
        Ok(routed)
    })?;
    // Both sides' stubs first: nothing reaches them yet.
    let mut sides = Batch::new();
    for r in &routed {
        let old_stub = Stub::of(&r.route.old)?;
        let new_stub = Stub::of(&r.route.new)?;
        old_stub.retarget_in(&mut sides, old_stub.target(), r.old)?;
        new_stub.retarget_in(&mut sides, new_stub.target(), r.new)?;
    }
    sides.apply()?;
    let mut detours = Vec::new();
    for (address, size) in error_functions {
        let hooks = DetourHooks {
            counter: Arc::new(Counter::new()),
            slow: Arc::new(AtomicBool::new(true)),
            on_entry: Arc::new(|_| count_error()),
        };
        match Detour::install_at_function(address, size, hooks) {
            Ok(d) => detours.push(d),
            Err(e) => {
                for d in detours {
                    let _ = d.remove();
                }
                return Err(e.into());
            }
        }
    }
    for counter in [&NEW_CALLS, &OLD_CALLS, &NEW_ERRORS, &OLD_ERRORS] {
        counter.store(0, Relaxed);
    }
    PERMILLE.store((options.fraction * 1000.0).round() as u32, Relaxed);
    GENERATION.fetch_add(1, Relaxed);
    SPLIT.store(split_code(options.split), Relaxed);
    // Then every function's stub to its router, in one batch.
    let mut to_routers = Batch::new();
    for r in &routed {
        r.stub.retarget_in(
            &mut to_routers,
            r.old.address(),
            r.route.router.implementation(),
        )?;
    }
    if let Err(e) = to_routers.apply() {
        SPLIT.store(NONE, Relaxed);
        for d in detours {
            let _ = d.remove();
        }
        return Err(e.into());
    }
    ACTIVE.store(true, Relaxed);
    let running = Running {
        loaded,
        name,
        split: options.split,
        fraction: options.fraction,
        routed,
        detours,
    };
    let first = reading(&running);
    *slot = Some(running);
    Ok(first)
}

/// What the running canary has seen, if one runs.
pub fn read() -> Option<CanaryReading> {
    RUNNING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(reading)
}

/// How a canary ended.
#[derive(Debug, Clone, PartialEq)]
pub struct CanaryOutcome {
    /// The last reading.
    pub reading: CanaryReading,
    /// The apply, if the new version was promoted.
    pub applied: Option<ApplyReport>,
}

/// Ends the canary: if `promote` and the reading [`passes`](CanaryReading::passes) with
/// `max_ratio`, the new version serves everything (as after an apply); otherwise the old one
/// does again and the patch is recorded as reverted.
pub fn finish(promote: bool, max_ratio: f64) -> Result<CanaryOutcome> {
    let mut slot = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
    let Some(running) = slot.take() else {
        return Err(refused("no canary is running".into()));
    };
    let reading = reading(&running);
    // Every function back to the version it ran before: one batch, no call lost.
    let mut back = Batch::new();
    for r in &running.routed {
        r.stub
            .retarget_in(&mut back, r.route.router.implementation().address(), r.old)?;
    }
    if let Err(e) = back.apply() {
        *slot = Some(running);
        return Err(e.into());
    }
    SPLIT.store(NONE, Relaxed);
    ACTIVE.store(false, Relaxed);
    for d in running.detours {
        let _ = d.remove();
    }
    // The sides' stubs back to the implementations, so no code points into the patch.
    let mut sides = Batch::new();
    for r in &running.routed {
        for entry in [&r.route.old, &r.route.new] {
            let stub = Stub::of(entry)?;
            stub.retarget_in(&mut sides, stub.target(), entry.implementation())?;
        }
    }
    sides.apply()?;
    let promote = promote && reading.passes(max_ratio);
    let loaded = running.loaded;
    let applied = patch::with_state(|state| {
        if promote {
            patch::bind(state, loaded, &ApplyOptions::default()).map(Some)
        } else {
            patch::retire(state, loaded);
            Ok(None)
        }
    })?;
    Ok(CanaryOutcome { reading, applied })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The thread split under many threads: each thread keeps its side for the whole canary,
    /// and about the fraction of threads is on the new side; a new canary draws again.
    #[test]
    fn each_thread_keeps_its_side_and_the_fraction_holds() {
        let threads: usize = std::env::var("EVOLVE_STRESS_THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(4)
            .max(4)
            * 50;
        PERMILLE.store(300, Relaxed);
        GENERATION.fetch_add(1, Relaxed);
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                std::thread::spawn(|| {
                    let first = thread_is_new();
                    for _ in 0..1000 {
                        assert_eq!(thread_is_new(), first, "a thread changed sides");
                        std::hint::spin_loop();
                    }
                    first
                })
            })
            .collect();
        let sides: Vec<bool> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let share = sides.iter().filter(|&&s| s).count() as f64 / threads as f64;
        assert!(
            (0.15..0.45).contains(&share),
            "{share} of {threads} threads"
        );
    }

    #[test]
    fn a_reading_passes_only_with_calls_and_no_worse_errors() {
        let reading = |new_calls, new_errors, old_calls, old_errors| CanaryReading {
            patch: "p".into(),
            split: Split::Calls,
            fraction: 0.1,
            new_calls,
            old_calls,
            new_errors,
            old_errors,
        };
        assert!(reading(100, 0, 900, 0).passes(1.0));
        assert!(!reading(100, 1, 900, 0).passes(2.0));
        assert!(reading(100, 2, 900, 9).passes(2.0));
        assert!(!reading(0, 0, 900, 0).passes(2.0), "nothing learned");
    }
}
