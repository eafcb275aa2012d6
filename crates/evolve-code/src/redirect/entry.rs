//! Entry redirects: installing the `jmp` over a function's entry with the world stopped,
//! retargeting it as a patch site, and writing the original bytes back (protocol in the parent
//! module's docs).

use super::function::{Function, Lineage};
use super::stopped::{with_world_stopped, Busy};
use crate::arch::{self, SITE_LEN};
use crate::error::{Error, ErrorKind, Result};
use crate::hidden::Hidden;
use crate::overwrite;
use crate::site::{PatchSite, SiteInsn};
use crate::sys::{membarrier, memory};
use crate::write::{self, Batch};
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Stops of the world an install makes at most while threads keep resuming inside entries.
pub const MAX_ATTEMPTS: usize = 200;

/// What the engine remembers of an installed redirect.
#[derive(Debug, Clone)]
struct Record {
    shown: String,
    lineage: Lineage,
    /// Bytes of the instructions the jump overlaps.
    covered: usize,
    /// The function's first 5 bytes.
    original: [u8; SITE_LEN],
}

/// Installed redirects by entry. Held for the whole of an install or removal: they are
/// serialised (lock order: this, then the engine's write lock).
static REDIRECTS: Mutex<Option<HashMap<Hidden, Record>>> = Mutex::new(None);

type Registry = MutexGuard<'static, Option<HashMap<Hidden, Record>>>;

/// The registry.
fn registry() -> Registry {
    let mut guard = REDIRECTS.lock().unwrap_or_else(|p| p.into_inner());
    guard.get_or_insert_with(HashMap::new);
    guard
}

/// The registry, without records whose entry the engine forgot (their patch was unloaded).
fn pruned_registry() -> Registry {
    let mut guard = registry();
    let w = write::lock();
    guard
        .as_mut()
        .expect("created by registry()")
        .retain(|entry, _| w.recorded_bytes(entry.get()).is_some());
    drop(w);
    guard
}

fn records(registry: &Registry) -> &HashMap<Hidden, Record> {
    registry.as_ref().expect("created by registry()")
}

/// The byte ranges `[entry, entry + covered)` of every installed redirect: code nothing calls
/// into any more, where references are not looked for.
pub(super) fn replaced_ranges() -> Vec<(Hidden, usize)> {
    records(&pruned_registry())
        .iter()
        .map(|(entry, r)| (*entry, r.covered))
        .collect()
}

/// An installed entry redirect: the function's entry holds a `jmp` to another version.
///
/// A handle (the entry's address); the engine keeps the state. The entry is a registered
/// [`PatchSite`]: retarget it to newer versions with [`Redirect::retarget_in`] (an ordinary live
/// write, no thread stopped) and take it out with [`remove`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Redirect {
    entry: Hidden,
}

impl Redirect {
    /// The redirect installed on `function`'s entry, if any.
    pub fn of(function: &Function) -> Option<Redirect> {
        let key = Hidden::new(function.address());
        records(&registry())
            .contains_key(&key)
            .then_some(Redirect { entry: key })
    }

    /// Every installed redirect.
    pub fn all() -> Vec<Redirect> {
        records(&pruned_registry())
            .keys()
            .map(|&entry| Redirect { entry })
            .collect()
    }

    /// The redirected function's entry.
    pub fn entry(self) -> usize {
        self.entry.get()
    }

    /// The function's name.
    pub fn name(self) -> String {
        records(&registry())
            .get(&self.entry)
            .map_or_else(|| format!("{:#x}", self.entry()), |r| r.shown.clone())
    }

    /// The patch site at the entry.
    ///
    /// # Errors
    /// [`ErrorKind::UnknownSite`] if the redirect was removed (or its code unloaded).
    pub fn site(self) -> Result<PatchSite> {
        PatchSite::lookup(self.entry())
    }

    /// Where the entry jumps now.
    ///
    /// # Errors
    /// As [`Redirect::site`].
    pub fn target(self) -> Result<usize> {
        Ok(self
            .site()?
            .current()
            .target()
            .expect("a redirect holds a jmp"))
    }

    /// The function's first 5 bytes, which the jump replaced (what [`remove`] writes back).
    pub fn original_bytes(self) -> Option<[u8; SITE_LEN]> {
        records(&registry()).get(&self.entry).map(|r| r.original)
    }

    /// Adds to `batch`: the entry jumps to `new` instead of `expected` (compare-and-swap, like
    /// every batch edit). One instruction changes, so no thread is stopped.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`], adding nothing, if `expected` or `new` is not a version
    /// of the redirected function, if `new` is the function itself (take the redirect out with
    /// [`remove`] instead: a jump to itself would loop), or if `new`'s entry leads back to the
    /// function through other redirects (a cycle); [`ErrorKind::UnknownSite`] if the redirect
    /// was removed.
    pub fn retarget_in(self, batch: &mut Batch, expected: &Function, new: &Function) -> Result<()> {
        let registry = registry();
        let record = records(&registry)
            .get(&self.entry)
            .ok_or(ErrorKind::UnknownSite {
                address: self.entry(),
            })?;
        for f in [expected, new] {
            if *f.lineage() != record.lineage {
                return Err(Error::new(ErrorKind::InvalidArgument {
                    reason: format!(
                        "{f} is {}, not {}: the redirect of `{}` cannot jump there",
                        f.lineage(),
                        record.lineage,
                        record.shown
                    ),
                }));
            }
        }
        check_no_cycle(&registry, self.entry(), new.address(), &[])?;
        let site = self.site()?;
        // SAFETY: `new` is a version of this redirect's function (same lineage, checked above:
        // a lineage is only shared by functions vouched for with `vouched_version_of`), so the
        // entry jumps to code that takes the same arguments; no cycle was checked above.
        unsafe {
            batch.retarget(
                site,
                SiteInsn::Jmp(expected.address()),
                SiteInsn::Jmp(new.address()),
            )
        };
        Ok(())
    }
}

/// Refuses a jump from `entry` to `target` when `target` leads back to `entry` through
/// installed redirects (or the `(entry, target)` pairs, sorted, of the batch being installed).
fn check_no_cycle(
    registry: &Registry,
    entry: usize,
    target: usize,
    batch: &[(usize, usize)],
) -> Result<()> {
    let mut at = target;
    for _ in 0..=records(registry).len() + batch.len() {
        if at == entry {
            return Err(Error::new(ErrorKind::InvalidArgument {
                reason: format!(
                    "{entry:#x} would jump to {target:#x}, which leads back to {entry:#x} \
                     through other redirects: calls would never end"
                ),
            }));
        }
        let next = if records(registry).contains_key(&Hidden::new(at)) {
            PatchSite::lookup(at)
                .ok()
                .and_then(|s| s.current().target())
        } else {
            batch
                .binary_search_by_key(&at, |(e, _)| *e)
                .ok()
                .map(|i| batch[i].1)
        };
        match next {
            Some(n) => at = n,
            None => return Ok(()),
        }
    }
    Ok(())
}

/// How an operation stopped the world.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StopStats {
    /// Times the world was stopped.
    pub stops: usize,
    /// The longest stop, measured around the whole of it (signalling every thread, waiting for
    /// each to park, the writes, waking them): an upper bound of any thread's pause.
    pub longest: Duration,
    /// The whole operation, checks included.
    pub total: Duration,
}

impl StopStats {
    fn add(&mut self, pause: Duration) {
        self.stops += 1;
        self.longest = self.longest.max(pause);
    }
}

/// What [`install`] did.
#[derive(Debug, Clone)]
pub struct Installed {
    /// The redirects, in the order of the pairs given.
    pub redirects: Vec<Redirect>,
    /// Its stops of the world.
    pub stops: StopStats,
}

/// One entry to overwrite, checked.
struct Planned {
    /// Hidden: the entry may be a patch's function (a version superseded by a newer one), and
    /// the plans are freed after the install (see `crate::hidden`).
    entry: Hidden,
    covered: usize,
    original: [u8; SITE_LEN],
    jmp: [u8; SITE_LEN],
    function: Function,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    Pending,
    Busy(Busy),
    Written,
}

/// Redirects each `(function, version)` of `pairs`: the function's entry gets a 5-byte `jmp` to
/// the version, so every call that reaches the entry — direct calls not yet retargeted, calls
/// through pointers, vtables and the GOT — runs the version. Calls already inside the function
/// finish on its old code.
///
/// The entries are written with the world stopped (one stop for the whole batch while no
/// thread is in the way), each only when no thread can resume inside the bytes its jump
/// replaces; an entry a thread is inside is tried again at the next stop, up to
/// [`MAX_ATTEMPTS`] stops. All or nothing: a refusal or failure leaves every entry of the batch
/// as it was.
///
/// # Errors
/// - [`ErrorKind::InvalidArgument`]: a version of another function, a function given twice, a
///   pair whose version is the function itself or leads back to it (a cycle);
/// - [`ErrorKind::NotRedirectable`], naming the function and the reason: shorter than 5 bytes
///   and not followed by padding; an instruction of its first 5 bytes is a branch target in
///   the function (e.g. the entry is a loop head) or a `call` returns inside them; a probe's
///   detour is installed on it; it is already redirected (retarget that redirect) or its entry
///   is already a patch site; a registered patch site lies in its first bytes; it shares its
///   address with another function;
/// - [`ErrorKind::ThreadInside`], naming the thread: a thread stayed inside the replaced bytes
///   through every attempt;
/// - [`ErrorKind::UnexpectedBytes`]: the entry changed behind the engine's back between the
///   check and the write;
/// - [`ErrorKind::Unreachable`] (the version lies beyond ±2 GiB: patches are loaded near the
///   executable), [`ErrorKind::TargetNotExecutable`], and system errors.
///
/// # Example
/// ```
/// use evolve_code::redirect::{self, Function};
/// #[inline(never)]
/// fn old(x: u64) -> u64 { std::hint::black_box(x).wrapping_mul(3) + 1 }
/// #[inline(never)]
/// fn new(x: u64) -> u64 { std::hint::black_box(x).wrapping_mul(3) + 2 }
/// type F = fn(u64) -> u64;
/// let (f, g) = (Function::from_fn(old as F)?, Function::from_fn(new as F)?);
/// let installed = redirect::install(&[(&f, &g)])?;
/// let call: F = std::hint::black_box(old);
/// assert_eq!(call(1), 5);
/// redirect::remove(&installed.redirects)?;
/// assert_eq!(call(1), 4);
/// # Ok::<(), evolve_code::Error>(())
/// ```
pub fn install(pairs: &[(&Function, &Function)]) -> Result<Installed> {
    let started = Instant::now();
    let mut registry = pruned_registry();
    let plans = plan_install(&registry, pairs)?;
    let mut stops = StopStats::default();
    if plans.is_empty() {
        return Ok(Installed {
            redirects: Vec::new(),
            stops,
        });
    }
    let mut progress = vec![Progress::Pending; plans.len()];
    let mut attempt = 0;
    loop {
        attempt += 1;
        if let Err(e) = write_round(&plans, &mut progress, &mut stops) {
            rollback(&plans, &progress, &mut stops);
            return Err(e);
        }
        if progress.iter().all(|p| *p == Progress::Written) {
            break;
        }
        if attempt >= MAX_ATTEMPTS {
            let (i, busy) = progress
                .iter()
                .enumerate()
                .find_map(|(i, p)| match p {
                    Progress::Busy(b) => Some((i, *b)),
                    _ => None,
                })
                .expect("an entry is not written, so a thread was inside it");
            rollback(&plans, &progress, &mut stops);
            let f = &plans[i].function;
            return Err(Error::new(ErrorKind::ThreadInside {
                function: f.name().to_owned(),
                address: f.address(),
                tid: busy.tid,
                pc: busy.pc,
                attempts: attempt,
            }));
        }
        // Let the threads in the way move on: short waits first, then longer ones.
        std::thread::sleep(Duration::from_micros(100 * attempt.min(20) as u64));
    }
    // The jumps are in place: the entries become patch sites (registered reading the jumps).
    let mut registered = Vec::with_capacity(plans.len());
    for p in &plans {
        if let Err(e) = write::register(p.entry.get()) {
            for &entry in &registered {
                let _ = write::unregister(entry);
            }
            rollback(&plans, &progress, &mut stops);
            return Err(e);
        }
        registered.push(p.entry.get());
    }
    let map = registry.as_mut().expect("created by registry()");
    let mut redirects = Vec::with_capacity(plans.len());
    for p in plans {
        crate::detour::entry_changed(p.entry.get());
        map.insert(
            p.entry,
            Record {
                shown: p.function.name().to_owned(),
                lineage: p.function.lineage().clone(),
                covered: p.covered,
                original: p.original,
            },
        );
        redirects.push(Redirect { entry: p.entry });
    }
    crate::hidden::scrub_plain(registered);
    stops.total = started.elapsed();
    Ok(Installed { redirects, stops })
}

/// Checks every pair (see [`install`]'s errors) and says what each jump replaces.
fn plan_install(registry: &Registry, pairs: &[(&Function, &Function)]) -> Result<Vec<Planned>> {
    let maps = memory::mappings()?;
    let mut seen = HashSet::with_capacity(pairs.len());
    // Sorted by entry, for the cycle check.
    let mut batch: Vec<(usize, usize)> = pairs
        .iter()
        .map(|(f, v)| (f.address(), v.address()))
        .collect();
    batch.sort_unstable();
    let mut plans = Vec::with_capacity(pairs.len());
    for &(function, version) in pairs {
        let entry = function.address();
        function.check_version(version)?;
        if version.address() == entry {
            return Err(Error::new(ErrorKind::InvalidArgument {
                reason: format!("{function} cannot be redirected to itself"),
            }));
        }
        if !seen.insert(Hidden::new(entry)) {
            return Err(Error::new(ErrorKind::InvalidArgument {
                reason: format!("{function} appears twice in one batch"),
            }));
        }
        function.check_not_aliased()?;
        if records(registry).contains_key(&Hidden::new(entry)) {
            let target = PatchSite::lookup(entry)
                .ok()
                .and_then(|s| s.current().target())
                .unwrap_or(0);
            return Err(function.refuse(format!(
                "it is already redirected (to {target:#x}): retarget that redirect \
                 (Redirect::retarget_in)"
            )));
        }
        if crate::detour::is_detoured(entry) {
            return Err(function.refuse(
                "a probe's detour is installed on its entry: remove the probe, redirect, and \
                 probe again (a probe placed on a redirected entry follows the redirect)",
            ));
        }
        if write::is_registered(entry) {
            return Err(function.refuse(format!(
                "its entry is already a patch site (`{}`: a prepared function's stub): \
                 retarget that site instead",
                write::current(entry).expect("registered")
            )));
        }
        // Its own bytes; a shorter function's padding too (up to 16 bytes: NOP fill comes in
        // instructions of up to 15).
        let len = if function.size() >= SITE_LEN {
            function.size()
        } else {
            (function.size() + 15)
                .min(function.room())
                .max(function.size())
        };
        let code = overwrite::read_code(&maps, entry, len)?;
        let bytes = overwrite::entry_bytes(&code, entry, function.size())
            .map_err(|reason| function.refuse(reason))?;
        if let Some(site) = (entry + 1..entry + bytes.covered).find(|&a| write::is_registered(a)) {
            return Err(function.refuse(format!(
                "the registered patch site {site:#x} lies in the bytes the jmp replaces (a \
                 reference of another function, found before this redirect: install redirects \
                 first, then find references)"
            )));
        }
        let target = version.address();
        memory::mapping_containing(&maps, target)
            .filter(|m| m.protection.exec)
            .ok_or(ErrorKind::TargetNotExecutable {
                site: entry,
                target,
            })?;
        let jmp = arch::encode(SiteInsn::Jmp(target), entry).ok_or(ErrorKind::Unreachable {
            site: entry,
            target,
        })?;
        check_no_cycle(registry, entry, target, &batch)?;
        plans.push(Planned {
            entry: Hidden::new(entry),
            covered: bytes.covered,
            original: bytes.original,
            jmp,
            function: function.clone(),
        });
    }
    crate::hidden::scrub_plain(batch);
    Ok(plans)
}

/// Reads the 5 bytes at `address` (code the caller checked is mapped).
fn read5(address: usize) -> [u8; SITE_LEN] {
    // SAFETY: `address` is the entry of a function checked to lie in a readable executable
    // mapping (or a registered site), which stays mapped while the caller holds it.
    unsafe { memory::read::<SITE_LEN>(address) }
}

/// One stop of the world: every pending entry no thread can resume inside gets its jump.
/// An entry that changed since it was checked refuses the whole install.
fn write_round(plans: &[Planned], progress: &mut [Progress], stops: &mut StopStats) -> Result<()> {
    let mut w = write::lock();
    let ranges: Vec<(usize, usize)> = plans
        .iter()
        .zip(progress.iter())
        .filter(|(_, p)| **p != Progress::Written)
        .map(|(plan, _)| (plan.entry.get(), SITE_LEN))
        .collect();
    let window = w.open_code_window_over(&ranges)?;
    crate::hidden::scrub_plain(ranges);
    let outcome = with_world_stopped(|world| -> Result<()> {
        for (plan, p) in plans.iter().zip(progress.iter()) {
            if *p == Progress::Written {
                continue;
            }
            let found = read5(plan.entry.get());
            if found != plan.original {
                return Err(Error::new(ErrorKind::UnexpectedBytes {
                    address: plan.entry.get(),
                    expected: plan.original,
                    found,
                }));
            }
        }
        let mut wrote = false;
        for (plan, p) in plans.iter().zip(progress.iter_mut()) {
            if *p == Progress::Written {
                continue;
            }
            match world.resumable_in(plan.entry.get() + 1..plan.entry.get() + plan.covered) {
                Some(busy) => *p = Progress::Busy(busy),
                None => {
                    window.write(plan.entry.get(), &plan.jmp)?;
                    *p = Progress::Written;
                    wrote = true;
                }
            }
        }
        if wrote {
            membarrier::sync_cores()?;
        }
        Ok(())
    });
    let closed = window.close();
    let (written, pause) = outcome?;
    stops.add(pause);
    written?;
    closed
}

/// Writes the original bytes back over every entry already written (with the world stopped:
/// the jump is one instruction, so no thread can be inside it). Best effort: it runs after a
/// refusal or failure, whose error the caller returns.
fn rollback(plans: &[Planned], progress: &[Progress], stops: &mut StopStats) {
    let written: Vec<&Planned> = plans
        .iter()
        .zip(progress)
        .filter(|(_, p)| **p == Progress::Written)
        .map(|(plan, _)| plan)
        .collect();
    if written.is_empty() {
        return;
    }
    let mut w = write::lock();
    let ranges: Vec<(usize, usize)> = written.iter().map(|p| (p.entry.get(), SITE_LEN)).collect();
    let Ok(window) = w.open_code_window_over(&ranges) else {
        return;
    };
    crate::hidden::scrub_plain(ranges);
    let outcome = with_world_stopped(|_| {
        for plan in &written {
            // Only our own jump is taken back.
            if read5(plan.entry.get()) == plan.jmp {
                let _ = window.write(plan.entry.get(), &plan.original);
            }
        }
        let _ = membarrier::sync_cores();
    });
    let _ = window.close();
    if let Ok(((), pause)) = outcome {
        stops.add(pause);
    }
}

/// Takes redirects out: each entry gets its original bytes back, exactly, with the world
/// stopped (one stop for the whole batch), and stops being a patch site. Calls made from then
/// on run the function's own code again; calls already in a version finish there.
///
/// All or nothing: if any entry does not hold what the engine last wrote there, nothing is
/// written.
///
/// # Errors
/// [`ErrorKind::InvalidArgument`] for a redirect that is not installed (removed already, or its
/// code unloaded) or given twice; [`ErrorKind::NotRedirectable`] if a probe is routed through
/// the entry (remove the probe first); [`ErrorKind::UnexpectedBytes`] if an entry was modified
/// behind the engine's back; system errors.
///
/// # Example
/// See [`install`].
pub fn remove(redirects: &[Redirect]) -> Result<StopStats> {
    let started = Instant::now();
    let mut registry = pruned_registry();
    let mut seen = HashSet::with_capacity(redirects.len());
    let mut entries: Vec<(Hidden, Record)> = Vec::with_capacity(redirects.len());
    for r in redirects {
        let record = records(&registry).get(&r.entry).ok_or_else(|| {
            Error::new(ErrorKind::InvalidArgument {
                reason: format!("no redirect is installed at {:#x}", r.entry()),
            })
        })?;
        if !seen.insert(r.entry) {
            return Err(Error::new(ErrorKind::InvalidArgument {
                reason: format!("the redirect of `{}` appears twice", record.shown),
            }));
        }
        if crate::detour::is_detoured(r.entry()) {
            return Err(Error::new(ErrorKind::NotRedirectable {
                function: record.shown.clone(),
                address: r.entry(),
                reason: "a probe is routed through its redirected entry: remove the probe \
                         before the redirect"
                    .into(),
            }));
        }
        entries.push((r.entry, record.clone()));
    }
    let mut stops = StopStats::default();
    if entries.is_empty() {
        return Ok(stops);
    }
    let mut w = write::lock();
    let mut expected = Vec::with_capacity(entries.len());
    for (entry, record) in &entries {
        expected.push(w.recorded_bytes(entry.get()).ok_or_else(|| {
            Error::new(ErrorKind::InvalidArgument {
                reason: format!("the entry of `{}` is no longer a patch site", record.shown),
            })
        })?);
    }
    let ranges: Vec<(usize, usize)> = entries.iter().map(|(e, _)| (e.get(), SITE_LEN)).collect();
    let window = w.open_code_window_over(&ranges)?;
    crate::hidden::scrub_plain(ranges);
    let outcome = with_world_stopped(|_| -> Result<()> {
        for ((entry, _), expected) in entries.iter().zip(&expected) {
            let found = read5(entry.get());
            if found != *expected {
                return Err(Error::new(ErrorKind::UnexpectedBytes {
                    address: entry.get(),
                    expected: *expected,
                    found,
                }));
            }
        }
        for (entry, record) in &entries {
            window.write(entry.get(), &record.original)?;
        }
        membarrier::sync_cores()
    });
    let closed = window.close();
    let (written, pause) = outcome?;
    stops.add(pause);
    written?;
    closed?;
    w.forget_sites_in(&|a| seen.contains(&Hidden::new(a)));
    drop(w);
    let map = registry.as_mut().expect("created by registry()");
    for (entry, _) in &entries {
        map.remove(entry);
        crate::detour::entry_changed(entry.get());
    }
    stops.total = started.elapsed();
    Ok(stops)
}
