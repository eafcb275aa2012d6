//! Safe live writes: changing patch sites while other threads execute them.
//!
//! # The problem
//!
//! A thread may be fetching a site's 5 bytes at any moment. If it sees some old bytes and some
//! new ones it executes a torn instruction and the process dies, or worse, jumps somewhere
//! plausible. Cores may also run stale bytes they fetched before the write (cross-modifying code).
//!
//! # The invariant
//!
//! *At every instant, every thread that fetches a registered site executes either the whole
//! old instruction, the whole new instruction, or an `int3` whose trap slot makes the handler
//! run one of them.* The writer establishes it, one batch at a time, under the write lock
//! ([`WRITER`]); the `SIGTRAP` handler ([`crate::sys::trap`]) relies on it. A batch is validated
//! completely (registered sites, expected instructions, reachable targets, bytes as the engine
//! left them) before its first byte changes.
//!
//! # The protocol, and why each step is there
//!
//! 1. **Springboards** the batch needs are written first, in a window of their own, and synced
//!    to every core ([`crate::springboard`]): fresh code must be visible before a site branches
//!    to it.
//! 2. **Window.** Every page holding a site becomes `rwx` — never writable without exec: a thread
//!    executing there must not fault — with one `mprotect` per run of pages of one mapping
//!    ([`window`]). Where the kernel forbids writable code, writes go through `/proc/self/mem`
//!    instead and every site takes the int3 path (those writes are not single stores).
//! 3. **Int3 sites** (not inside one aligned 8-byte word), the kernel's `text_poke_bp`: insert
//!    their keys in the trap table, begin a write epoch, arm every slot with the new instruction
//!    (so that a trap finds it), store `int3` on every first byte with `Release` (so that a
//!    handler that reads the `int3` sees the armed slot), **sync cores** (no core still runs the
//!    old first byte with a new tail), write every tail, **sync cores** (no core runs the new
//!    first byte with an old tail), store every new first byte with `Release`.
//! 4. **Aligned sites**: one atomic 8-byte store of the whole word (read-modify-write; only the
//!    writer stores to code, under the lock). A fetch sees the old or the new instruction.
//! 5. **Sync cores** once more: every thread now executes the new bytes. Only then are the slots
//!    disarmed (`Release`: a handler that reads "disarmed" sees the new first byte) and the
//!    epoch ended (`Release`: a handler that reads the even epoch sees every byte as left). The
//!    handler's side of these orderings, and a loom model of them, are in
//!    [`crate::sys::trap::slots`].
//! 6. The engine records the new bytes, then closes the window (protections back).
//!
//! "Sync cores" is `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`
//! ([`crate::sys::membarrier`]): every core running a thread of the process executes a
//! serializing instruction, and threads not running do so before they next run. Code bytes are
//! only ever accessed as atomics ([`crate::sys::memory`]).
//!
//! A batch therefore costs one core sync if all its sites are aligned, three otherwise, plus two
//! `mprotect` calls per run of contiguous pages: cheap enough to retarget thousands of sites at
//! once (XRay measured that per-site `mprotect` dominates; we batch).
//!
//! Each site switches at one instant, but the sites of a batch do not switch together; callers
//! that need a group to switch atomically use safe points (a higher layer).
//!
//! # Failure
//!
//! A batch either completes or leaves the process exactly as it was: bytes, page protections,
//! trap table. A failure before step 3 (validation, springboards, opening the window) changes
//! no site. A failure or panic during steps 3-5 (an `mprotect`, a `/proc/self/mem` write or a
//! `membarrier` that fails) is undone by the batch's [`transaction`], in the protocol's reverse
//! order and inside the same write epoch; the window, a guard, puts every protection back on
//! every exit path. A failing `mprotect` that *restores* a protection is retried, and the batch
//! stands (its bytes were written and recorded before the window closes). The fault-injection
//! tests (`tests/failed_writes*.rs`) fail each of these calls in turn, for every call a batch
//! makes, under calling threads.
//!
//! # The safe boundary
//!
//! Retargeting a [`PatchSite`] or adding a raw edit to a [`Batch`] is `unsafe`: the caller
//! vouches that the new instruction suits every thread that executes the site. The typed sites
//! check it instead and are safe: [`crate::FnSite`] (targets of its type `F`),
//! [`crate::stub::Stub`] (code with its fingerprint), [`crate::callsite::DirectCalls`] (functions
//! of its type). Restoring a site's original bytes is always safe.
//!
//! # Knobs
//!
//! `EVOLVE_WRITE_PATH=int3` makes every batch use the int3 protocol (see [`WritePath`]);
//! `EVOLVE_WRITE_VIA_PROC_MEM=1` writes through `/proc/self/mem` from the start, as on a
//! system that forbids writable executable pages. Both exist so that tests cover every path.
//!
//! # Safety
//!
//! The unsafe blocks here read site bytes and trampoline slots. Sites are mapped while
//! registered (the contract of [`PatchSite::register`]); writes happen only inside a
//! [`window`] that made the pages writable, under the write lock, in the order above.
#![allow(unsafe_code)]

mod transaction;
mod window;

use crate::arch::{self, SITE_LEN};
use crate::error::{Error, ErrorKind, Result};
use crate::hidden::{hide_insn, reveal_insn, Hidden};
use crate::site::{PatchSite, SiteInsn};
use crate::springboard::Springboards;
use crate::sys::memory::{self, Protection};
use crate::sys::{membarrier, trap::TrapSites};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use transaction::{take_undo_failure, SiteWrite, Transaction};

/// How a batch writes its sites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WritePath {
    /// Atomic 8-byte store where the site sits in one aligned word, int3 protocol elsewhere.
    #[default]
    Auto,
    /// The int3 protocol for every site (tests use it to cover that path on any layout).
    Int3,
}

/// The engine's state, all of it behind the write lock.
///
/// Its maps are keyed by addresses and hashed with FxHash (a multiply): a batch of 80 sites
/// makes hundreds of lookups, and SipHash's resistance to chosen keys buys nothing for code
/// addresses the engine itself registered.
pub(crate) struct Writer {
    /// Keyed by hidden address (see [`crate::hidden`]): reclamation scans must not see them.
    sites: HashMap<Hidden, SiteState>,
    traps: TrapSites,
    /// Original protection of every code page the engine has written, with the mapping that
    /// holds it, from `/proc/self/maps`.
    protections: HashMap<Hidden, (Protection, Hidden, Hidden)>,
    pub(crate) springboards: Springboards,
    /// Set once `mprotect` to `rwx` was refused: write through `/proc/self/mem` from then on.
    via_proc_mem: bool,
    /// Executable mappings as last read from `/proc/self/maps`, sorted (re-read on a miss).
    executable: Vec<(Hidden, Hidden)>,
    /// Jump sites routed through a trampoline (see [`interpose`]), by site.
    interposed: HashMap<Hidden, Interposed>,
    /// Direct branches registered as calls of a stub ([`follow`]): site -> stub.
    follows: HashMap<Hidden, Hidden>,
}

/// A jump site routed through a trampoline: its bytes jump to `trampoline`, which ends with an
/// indirect jump through `slot`; the slot holds the site's logical target.
#[derive(Debug, Clone, Copy)]
struct Interposed {
    trampoline: Hidden,
    /// Address of the trampoline's `AtomicUsize` slot (owned by the caller of [`interpose`],
    /// alive until [`uninterpose`] returns and no thread can be in the trampoline).
    slot: Hidden,
}

#[derive(Debug, Clone, Copy)]
struct SiteState {
    original: [u8; SITE_LEN],
    /// What the site means (far targets as themselves, not as their springboard), with its
    /// target hidden.
    current: SiteInsn,
    /// What the site holds in memory.
    bytes: [u8; SITE_LEN],
}

/// The write lock. `parking_lot`'s mutex, for its eventual fairness: with more threads than
/// cores, `std`'s mutex let a writer that releases and retakes the lock in a loop win every
/// time, while a waiter woken on the futex was still waiting for a CPU — one writer made 1
/// batch in 20 s while others made thousands (`EVOLVE_STRESS_THREADS=32`, `live_writes`).
/// `parking_lot` hands the lock to the longest waiter whenever it has waited over 0.5 ms.
static WRITER: parking_lot::Mutex<Option<Writer>> = parking_lot::const_mutex(None);
static DEFAULT_PATH: AtomicU8 = AtomicU8::new(0);

/// The write lock, with the engine state created on first use.
pub(crate) fn lock() -> WriterGuard {
    let mut guard = WRITER.lock();
    if guard.is_none() {
        *guard = Some(Writer {
            sites: HashMap::default(),
            traps: TrapSites::new(),
            protections: HashMap::default(),
            springboards: Springboards::default(),
            via_proc_mem: std::env::var_os("EVOLVE_WRITE_VIA_PROC_MEM").is_some(),
            executable: Vec::new(),
            interposed: HashMap::default(),
            follows: HashMap::default(),
        });
    }
    WriterGuard(guard)
}

/// Holds the write lock.
pub(crate) struct WriterGuard(parking_lot::MutexGuard<'static, Option<Writer>>);

impl std::ops::Deref for WriterGuard {
    type Target = Writer;
    fn deref(&self) -> &Writer {
        self.0.as_ref().expect("initialised in lock()")
    }
}

impl std::ops::DerefMut for WriterGuard {
    fn deref_mut(&mut self) -> &mut Writer {
        self.0.as_mut().expect("initialised in lock()")
    }
}

/// Sets the write path used by batches that do not choose one. `EVOLVE_WRITE_PATH=int3` in the
/// environment sets it to [`WritePath::Int3`] at start-up.
pub fn set_default_write_path(path: WritePath) {
    DEFAULT_PATH.store(path as u8 + 1, Ordering::Relaxed);
}

fn default_write_path() -> WritePath {
    match DEFAULT_PATH.load(Ordering::Relaxed) {
        0 => {
            let int3 = std::env::var("EVOLVE_WRITE_PATH").is_ok_and(|v| v == "int3");
            let path = if int3 {
                WritePath::Int3
            } else {
                WritePath::Auto
            };
            set_default_write_path(path);
            path
        }
        1 => WritePath::Auto,
        _ => WritePath::Int3,
    }
}

fn executable_mapping_readable(w: &mut Writer, address: usize) -> Result<()> {
    // Executable pages cached with their protection are known readable; others are checked.
    let page = memory::page_of(address);
    if w.protections
        .get(&Hidden::new(page))
        .is_some_and(|p| p.0.read)
    {
        return Ok(());
    }
    let maps = memory::mappings()?;
    for byte in [address, address + SITE_LEN - 1] {
        match memory::mapping_containing(&maps, byte) {
            Some(m) if m.protection.exec && m.protection.read => {
                w.protections.insert(
                    Hidden::new(memory::page_of(byte)),
                    (
                        m.protection,
                        Hidden::new(m.range.start),
                        Hidden::new(m.range.end),
                    ),
                );
            }
            _ => return Err(Error::new(ErrorKind::NotExecutable { address })),
        }
    }
    Ok(())
}

/// Reads a registered site's bytes.
fn read_site(address: usize) -> [u8; SITE_LEN] {
    // SAFETY: only called for registered sites, which are mapped readable while registered
    // (contract of `PatchSite::register`), or after `executable_mapping_readable`.
    unsafe { memory::read::<SITE_LEN>(address) }
}

pub(crate) fn register(address: usize) -> Result<()> {
    let mut w = lock();
    if w.sites.contains_key(&Hidden::new(address)) {
        return Ok(());
    }
    // Cached executable ranges (re-read on a miss): registering many stubs reads the maps once.
    if !w.is_executable(address)? || !w.is_executable(address + SITE_LEN - 1)? {
        return Err(Error::new(ErrorKind::NotExecutable { address }));
    }
    // The mapping must also be readable (execute-only memory cannot be inspected).
    executable_mapping_readable(&mut w, address)?;
    let bytes = read_site(address);
    let current = arch::decode(bytes, address).ok_or(ErrorKind::NotASiteInstruction {
        address,
        found: bytes,
    })?;
    let current = hide_insn(w.springboards.resolve(current));
    w.sites.insert(
        Hidden::new(address),
        SiteState {
            original: bytes,
            current,
            bytes,
        },
    );
    Ok(())
}

pub(crate) fn is_registered(address: usize) -> bool {
    lock().sites.contains_key(&Hidden::new(address))
}

pub(crate) fn current(address: usize) -> Option<SiteInsn> {
    lock()
        .sites
        .get(&Hidden::new(address))
        .map(|s| reveal_insn(s.current))
}

pub(crate) fn original(address: usize) -> Option<SiteInsn> {
    let w = lock();
    let s = w.sites.get(&Hidden::new(address))?;
    arch::decode(s.original, address)
}

pub(crate) fn unregister(address: usize) -> Result<()> {
    let mut w = lock();
    if w.interposed.contains_key(&Hidden::new(address)) {
        return Err(Error::new(ErrorKind::InvalidArgument {
            reason: format!("site {address:#x} is routed through a probe trampoline"),
        }));
    }
    w.follows.remove(&Hidden::new(address));
    w.sites
        .remove(&Hidden::new(address))
        .map(|_| ())
        .ok_or(Error::new(ErrorKind::UnknownSite { address }))
}

/// Records that the registered site `site` is a direct branch to the stub `stub` (found by
/// [`crate::callsite::DirectCalls`]): while `stub` is interposed, `site` keeps its original
/// bytes (a branch to the stub), whatever it means, so calls it makes pass the trampoline.
pub(crate) fn follow(site: usize, stub: usize) {
    lock().follows.insert(Hidden::new(site), Hidden::new(stub));
}

/// Routes the registered jump site `site` through `trampoline`: `slot` gets the site's current
/// target, then the site's bytes jump to the trampoline, which must end by jumping through
/// `slot`. From now on retargeting the site (a batch, by any layer) changes `slot` instead of
/// the bytes, and direct branches recorded by [`follow`] keep branching to the site. The site's
/// meaning ([`PatchSite::current`]) never changes.
///
/// The caller keeps `slot` and the trampoline alive until [`uninterpose`] has returned and no
/// thread can be in the trampoline.
pub(crate) fn interpose(site: usize, trampoline: usize, slot: &AtomicUsize) -> Result<()> {
    let mut w = lock();
    let key = Hidden::new(site);
    let state = *w
        .sites
        .get(&key)
        .ok_or(Error::new(ErrorKind::UnknownSite { address: site }))?;
    let SiteInsn::Jmp(target) = reveal_insn(state.current) else {
        return Err(Error::new(ErrorKind::InvalidArgument {
            reason: format!("site {site:#x} does not hold a jump"),
        }));
    };
    if w.interposed.contains_key(&key) {
        return Err(Error::new(ErrorKind::InvalidArgument {
            reason: format!("site {site:#x} is already routed through a trampoline"),
        }));
    }
    if arch::encode(SiteInsn::Jmp(trampoline), site).is_none() {
        return Err(Error::new(ErrorKind::InvalidArgument {
            reason: format!("trampoline {trampoline:#x} is out of reach of site {site:#x}"),
        }));
    }
    slot.store(target, Ordering::Release);
    w.interposed.insert(
        key,
        Interposed {
            trampoline: Hidden::new(trampoline),
            slot: Hidden::new(slot as *const AtomicUsize as usize),
        },
    );
    let result = w.reroute(key);
    if result.is_err() {
        w.interposed.remove(&key);
    }
    result
}

/// Ends [`interpose`]: the site's bytes encode its meaning again, directly (its followers too).
pub(crate) fn uninterpose(site: usize) -> Result<()> {
    let mut w = lock();
    let key = Hidden::new(site);
    if !w.sites.contains_key(&key) {
        // Its code was unmapped (a patch unloaded) and the engine forgot it: nothing to write.
        return Ok(());
    }
    let Some(ip) = w.interposed.remove(&key) else {
        return Err(Error::new(ErrorKind::InvalidArgument {
            reason: format!("site {site:#x} is not routed through a trampoline"),
        }));
    };
    let result = w.reroute(key);
    if result.is_err() {
        w.interposed.insert(key, ip);
    }
    result
}

/// Replaces the 5 bytes `expected` at `address` (code the engine does not track as a site: the
/// jump of an entry detour) with `new`, without stopping any thread, through the int3
/// protocol: a thread that reaches `address` meanwhile traps and continues as if it had
/// executed `emulate`. Sound when no thread can be at `address + 1 .. address + 5` (the bytes
/// replaced are one instruction) and `emulate` has the effect of `new` for a thread arriving at
/// `address` (e.g. a jump to a relocated copy of `new`'s instructions).
pub(crate) fn replace_instruction(
    address: usize,
    expected: [u8; SITE_LEN],
    new: [u8; SITE_LEN],
    emulate: SiteInsn,
) -> Result<()> {
    let mut w = lock();
    let found = read_site(address);
    if found != expected {
        return Err(Error::new(ErrorKind::UnexpectedBytes {
            address,
            expected,
            found,
        }));
    }
    let armed = arch::encode(emulate, address).ok_or(ErrorKind::InvalidArgument {
        reason: format!("`{emulate}` is out of reach of {address:#x}"),
    })?;
    membarrier::ensure_registered()?;
    crate::sys::trap::install()?;
    let window = w.open_code_window(address, SITE_LEN)?;
    w.traps.insert(address);
    let write = [SiteWrite {
        site: address,
        old: expected,
        new,
        emulate: armed,
    }];
    Transaction::new(&window.0, &mut w.traps, &write, &[])
        .run()
        .map_err(with_undo_failure)?;
    window.close()
}

#[derive(Debug, Clone, Copy)]
enum NewInsn {
    Insn(SiteInsn),
    Original,
    /// The site keeps its meaning; only its routing changes (interposition).
    Same,
}

#[derive(Debug, Clone, Copy)]
struct Edit {
    site: Hidden,
    expected: Option<SiteInsn>,
    new: NewInsn,
}

/// Several site changes applied together: validated all first, written with shared core syncs.
///
/// # Example
///
/// ```
/// use evolve_code::{Batch, FnSite};
///
/// extern "C" fn a() -> u64 { 1 }
/// extern "C" fn b() -> u64 { 2 }
/// type F = extern "C" fn() -> u64;
///
/// let sites: Vec<FnSite<F>> = (0..3).map(|_| FnSite::new(a as F).unwrap()).collect();
/// let mut batch = Batch::new();
/// for s in &sites {
///     s.retarget_in(&mut batch, a, b);
/// }
/// let report = batch.apply().unwrap();
/// assert_eq!(report.changed, 3);
/// assert!(sites.iter().all(|s| (s.entry())() == 2));
/// ```
#[derive(Debug, Default)]
pub struct Batch {
    edits: Vec<Edit>,
    path: Option<WritePath>,
}

/// What a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchReport {
    /// Sites whose bytes changed.
    pub changed: usize,
    /// Sites that already held the new instruction.
    pub unchanged: usize,
    /// Sites written with one atomic store.
    pub stored: usize,
    /// Sites written with the int3 protocol.
    pub via_int3: usize,
    /// Sites that reach their target through a springboard.
    pub via_springboard: usize,
    /// Core syncs issued.
    pub core_syncs: usize,
    /// `mprotect` calls issued (both directions).
    pub mprotects: usize,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Batch {
        Batch::default()
    }

    /// Chooses the write path for this batch (default: [`set_default_write_path`]).
    pub fn path(&mut self, path: WritePath) -> &mut Batch {
        self.path = Some(path);
        self
    }

    /// Adds: change `site` from `expected` to `new`.
    ///
    /// # Safety
    ///
    /// `new` must be sound for every thread that executes the site (see
    /// [`PatchSite::retarget`]). The typed sites add their edits through safe methods that
    /// check it: [`crate::FnSite::retarget_in`], [`crate::stub::Stub::retarget_in`],
    /// [`crate::callsite::DirectCalls::retarget_in`].
    pub unsafe fn retarget(
        &mut self,
        site: PatchSite,
        expected: SiteInsn,
        new: SiteInsn,
    ) -> &mut Batch {
        // Hidden: a batch may outlive its use in freed memory (see `crate::hidden`).
        self.edits.push(Edit {
            site: Hidden::new(site.address()),
            expected: Some(hide_insn(expected)),
            new: NewInsn::Insn(hide_insn(new)),
        });
        self
    }

    /// Adds: put `site`'s original bytes back, whatever it holds now.
    pub fn restore(&mut self, site: PatchSite) -> &mut Batch {
        self.edits.push(Edit {
            site: Hidden::new(site.address()),
            expected: None,
            new: NewInsn::Original,
        });
        self
    }

    /// Number of edits.
    pub fn len(&self) -> usize {
        self.edits.len()
    }

    /// True if the batch has no edits.
    pub fn is_empty(&self) -> bool {
        self.edits.is_empty()
    }

    /// Validates every edit, then writes them all (see the module docs for the protocol).
    ///
    /// On error nothing was written, except where the error says a system call failed after
    /// writing began (restoring page protection), which does not happen on a sane kernel.
    pub fn apply(&self) -> Result<BatchReport> {
        let path = self.path.unwrap_or_else(default_write_path);
        let mut w = lock();
        let plan = match w.plan(&self.edits) {
            Ok(plan) => plan,
            Err(e) => {
                w.abandon_springboards();
                return Err(e);
            }
        };
        let result = w.write(&plan, path);
        if result.is_err() {
            w.abandon_springboards();
        }
        // The plan holds plain addresses: leave no stale copies (see `crate::scrub`).
        crate::hidden::scrub_plain(plan.0);
        result
    }
}

/// A validated edit: the bytes to write and the state to record.
struct Planned {
    site: usize,
    /// Whether `bytes` differ from what the site holds (else only its slot or meaning change).
    write_bytes: bool,
    bytes: [u8; SITE_LEN],
    insn: SiteInsn,
    via_springboard: bool,
    /// For an interposed site: its slot and the target to store there.
    slot: Option<(usize, usize)>,
}

impl Writer {
    /// Whether `site` is a recorded direct branch to an interposed stub.
    fn follows_interposed(&self, site: usize) -> bool {
        self.follows
            .get(&Hidden::new(site))
            .is_some_and(|stub| self.interposed.contains_key(stub))
    }

    /// Rewrites `stub` and its followers so their bytes match their routing, meanings unchanged.
    fn reroute(&mut self, stub: Hidden) -> Result<()> {
        let mut edits = vec![Edit {
            site: stub,
            expected: None,
            new: NewInsn::Same,
        }];
        edits.extend(
            self.follows
                .iter()
                .filter(|(site, s)| **s == stub && self.sites.contains_key(site))
                .map(|(site, _)| Edit {
                    site: *site,
                    expected: None,
                    new: NewInsn::Same,
                }),
        );
        let plan = match self.plan(&edits) {
            Ok(plan) => plan,
            Err(e) => {
                self.abandon_springboards();
                return Err(e);
            }
        };
        let result = self.write(&plan, default_write_path());
        if result.is_err() {
            self.abandon_springboards();
        }
        crate::hidden::scrub_plain(plan.0);
        result.map(|_| ())
    }

    fn plan(&mut self, edits: &[Edit]) -> Result<(Vec<Planned>, usize)> {
        // Hidden: the set is freed after planning (see `crate::hidden`).
        let mut seen = HashSet::with_capacity_and_hasher(edits.len(), Default::default());
        let mut planned = Vec::with_capacity(edits.len());
        let mut unchanged = 0;
        for edit in edits {
            let address = edit.site.get();
            if !seen.insert(edit.site) {
                return Err(Error::new(ErrorKind::DuplicateSite { address }));
            }
            let state = *self
                .sites
                .get(&Hidden::new(address))
                .ok_or(Error::new(ErrorKind::UnknownSite { address }))?;
            let found = read_site(address);
            if found != state.bytes {
                // Somebody else wrote the site behind the engine's back.
                return Err(Error::new(ErrorKind::UnexpectedBytes {
                    address,
                    expected: state.bytes,
                    found,
                }));
            }
            let expected = edit.expected.map(reveal_insn);
            if let Some(expected) = expected {
                if expected != reveal_insn(state.current) {
                    return Err(Error::new(ErrorKind::UnexpectedInstruction {
                        address,
                        expected,
                        found: reveal_insn(state.current),
                    }));
                }
            }
            let new = match edit.new {
                NewInsn::Insn(insn) => NewInsn::Insn(reveal_insn(insn)),
                other => other,
            };
            if let NewInsn::Insn(insn) = new {
                if let Some(target) = insn.target() {
                    if !self.is_executable(target)? {
                        return Err(Error::new(ErrorKind::TargetNotExecutable {
                            site: address,
                            target,
                        }));
                    }
                }
            }
            // The logical instruction: what callers of the site get.
            let logical = match new {
                NewInsn::Original => self
                    .springboards
                    .resolve(arch::decode(state.original, address).expect("validated at register")),
                NewInsn::Same => reveal_insn(state.current),
                NewInsn::Insn(insn) => insn,
            };
            // The physical bytes: an interposed site jumps to its trampoline (which jumps
            // through its slot to the logical target); a direct call of an interposed stub
            // keeps calling the stub (its original bytes), so the trampoline sees the call.
            let mut slot = None;
            let (bytes, via_springboard) =
                if let Some(ip) = self.interposed.get(&Hidden::new(address)) {
                    let SiteInsn::Jmp(target) = logical else {
                        return Err(Error::new(ErrorKind::InvalidArgument {
                            reason: format!(
                            "site {address:#x} is routed through a probe trampoline: it can only \
                             hold a jump (not `{logical}`) until the probe is removed"
                        ),
                        }));
                    };
                    slot = Some((ip.slot.get(), target));
                    let bytes = arch::encode(SiteInsn::Jmp(ip.trampoline.get()), address)
                        .expect("trampolines are allocated within reach of their site");
                    (bytes, false)
                } else if self.follows_interposed(address) {
                    (state.original, false)
                } else {
                    match new {
                        NewInsn::Original => (state.original, false),
                        _ => match arch::encode(logical, address) {
                            Some(bytes) => (bytes, false),
                            None => {
                                let target =
                                    logical.target().expect("only branches can be out of range");
                                let board = self.springboard_near(address, target)?;
                                let bytes = match logical {
                                    SiteInsn::Jmp(_) => arch::encode(SiteInsn::Jmp(board), address),
                                    _ => arch::encode(SiteInsn::Call(board), address),
                                }
                                .expect("springboard within rel32 range");
                                (bytes, true)
                            }
                        },
                    }
                };
            let slot_changes = slot.is_some_and(|(slot, target)| {
                // SAFETY: an interposed site's slot lives until it is uninterposed (contract
                // of `interpose`), which needs this lock.
                unsafe { &*(slot as *const AtomicUsize) }.load(Ordering::Relaxed) != target
            });
            if bytes == state.bytes && !slot_changes && logical == reveal_insn(state.current) {
                unchanged += 1;
                continue;
            }
            planned.push(Planned {
                site: address,
                write_bytes: bytes != state.bytes,
                bytes,
                insn: logical,
                via_springboard,
                slot,
            });
        }
        Ok((planned, unchanged))
    }

    /// Registered sites (other than those `inside` itself) whose instruction branches to an
    /// address that `inside` accepts: references the reclamation of that range must respect.
    pub(crate) fn sites_branching_into(&self, inside: &dyn Fn(usize) -> bool) -> Vec<usize> {
        self.sites
            .iter()
            .filter(|(site, state)| {
                !inside(site.get())
                    && reveal_insn(state.current)
                        .target()
                        .is_some_and(|t| inside(t) || inside(self.springboard_target(t)))
            })
            .map(|(site, _)| site.get())
            .collect()
    }

    fn springboard_target(&self, target: usize) -> usize {
        match self.springboards.resolve(SiteInsn::Jmp(target)) {
            SiteInsn::Jmp(t) => t,
            _ => target,
        }
    }

    /// Forgets every site inside a range about to be unmapped.
    pub(crate) fn forget_sites_in(&mut self, inside: &dyn Fn(usize) -> bool) {
        self.sites.retain(|site, _| !inside(site.get()));
        self.follows.retain(|site, _| !inside(site.get()));
        self.interposed.retain(|site, _| !inside(site.get()));
        self.protections.retain(|page, _| !inside(page.get()));
        self.executable.retain(|r| !inside(r.0.get()));
    }

    /// Whether `address` lies in executable memory (cached; the maps are re-read on a miss).
    fn is_executable(&mut self, address: usize) -> Result<bool> {
        let cached = |ranges: &[(Hidden, Hidden)]| {
            let i = ranges.partition_point(|r| r.1.get() <= address);
            ranges
                .get(i)
                .is_some_and(|r| (r.0.get()..r.1.get()).contains(&address))
        };
        if cached(&self.executable) {
            return Ok(true);
        }
        self.executable = memory::mappings()?
            .iter()
            .filter(|m| m.protection.exec)
            .map(|m| (Hidden::new(m.range.start), Hidden::new(m.range.end)))
            .collect();
        Ok(cached(&self.executable))
    }

    fn write(&mut self, plan: &(Vec<Planned>, usize), path: WritePath) -> Result<BatchReport> {
        let (planned, unchanged) = plan;
        let mut report = BatchReport {
            unchanged: *unchanged,
            ..BatchReport::default()
        };
        if planned.is_empty() {
            return Ok(report);
        }
        membarrier::ensure_registered()?;
        self.publish_springboards()?;
        // Slots first: a site newly routed to its trampoline must find the target there. Their
        // old values are put back if the bytes cannot be written (error or panic).
        let mut slots = SlotChanges(Vec::new());
        for p in planned {
            if let Some((slot, target)) = p.slot {
                // SAFETY: the slot is alive while its site is interposed (see `interpose`).
                let slot = unsafe { &*(slot as *const AtomicUsize) };
                slots.0.push((slot, slot.swap(target, Ordering::AcqRel)));
            }
        }
        let window = self.write_bytes(planned, path, &mut report)?;
        // The bytes are written: record them before anything else can fail (closing the window).
        slots.keep();
        for p in planned {
            let state = self.sites.get_mut(&Hidden::new(p.site)).expect("validated");
            state.bytes = p.bytes;
            state.current = hide_insn(p.insn);
        }
        report.changed = planned.len();
        report.via_springboard = planned.iter().filter(|p| p.via_springboard).count();
        if let Some(window) = window {
            report.mprotects += window.close()?;
        }
        Ok(report)
    }

    /// Writes the bytes of `planned` in one window and one transaction: all of them, or none
    /// (see [`transaction`]). Returns the window, still open, for the caller to close once it
    /// recorded the new bytes.
    fn write_bytes(
        &mut self,
        planned: &[Planned],
        path: WritePath,
        report: &mut BatchReport,
    ) -> Result<Option<window::Window>> {
        let to_write = || planned.iter().filter(|p| p.write_bytes);
        if to_write().next().is_none() {
            return Ok(None);
        }
        let window = self.open_window(to_write().map(|p| p.site))?;
        report.mprotects += window.runs();
        let atomic = path == WritePath::Auto && !window.via_proc_mem();
        let stores = |site: usize| atomic && site % 8 + SITE_LEN <= 8;
        if to_write().any(|p| !stores(p.site)) {
            crate::sys::trap::install()?;
        }
        // Plain addresses: sized once (a growing vector would leave stale copies in freed
        // memory) and scrubbed below (see `crate::hidden`).
        let (mut stored, mut trapped) = (
            Vec::with_capacity(planned.len()),
            Vec::with_capacity(planned.len()),
        );
        for p in to_write() {
            let write = SiteWrite {
                site: p.site,
                old: self.sites[&Hidden::new(p.site)].bytes,
                new: p.bytes,
                emulate: p.bytes,
            };
            if stores(p.site) {
                stored.push(write);
            } else {
                trapped.push(write);
            }
        }
        // Keys before the write begins: the table may grow, which it must not while armed.
        for w in &trapped {
            self.traps.insert(w.site);
        }
        let result = Transaction::new(&window, &mut self.traps, &trapped, &stored).run();
        report.stored = stored.len();
        report.via_int3 = trapped.len();
        crate::hidden::scrub_plain(stored);
        crate::hidden::scrub_plain(trapped);
        match result {
            Ok(core_syncs) => report.core_syncs += core_syncs,
            Err(e) => return Err(with_undo_failure(e)),
        }
        Ok(Some(window))
    }
}

/// Trampoline slots a batch changed, with their old values: put back when dropped, unless the
/// batch's bytes were written ([`SlotChanges::keep`]).
struct SlotChanges<'a>(Vec<(&'a AtomicUsize, usize)>);

impl SlotChanges<'_> {
    fn keep(mut self) {
        crate::hidden::scrub_plain(std::mem::take(&mut self.0));
    }
}

impl Drop for SlotChanges<'_> {
    fn drop(&mut self) {
        for (slot, old) in &self.0 {
            slot.store(*old, Ordering::Release);
        }
        crate::hidden::scrub_plain(std::mem::take(&mut self.0));
    }
}

/// The batch's error, or the undo's if undoing it failed too (the graver news).
fn with_undo_failure(error: Error) -> Error {
    match take_undo_failure() {
        None => error,
        Some(undo) => Error::new(ErrorKind::Incomplete {
            reason: format!(
                "{error}; undoing it failed too ({}): the sites touched stay armed, running \
                 their old instruction through the trap handler",
                Error::new(undo)
            ),
        }),
    }
}

/// The trap table's state (for the fault-injection tests).
#[cfg(feature = "fault-injection")]
pub(crate) fn trap_table() -> crate::sys::trap::TrapTable {
    lock().traps.snapshot()
}

/// Whether the engine has fallen back to writing through `/proc/self/mem`.
pub fn writes_via_proc_mem() -> bool {
    lock().via_proc_mem
}

/// Threads that reached a site while the int3 protocol was rewriting it, as resolved by the
/// `SIGTRAP` handler since the process started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrapCounts {
    /// The handler emulated the new instruction.
    pub emulated: u64,
    /// The write had completed before the handler ran; the thread re-executed the site.
    pub rewound: u64,
    /// An `int3` at a site with no write in flight (a debugger's, the program's own) was passed
    /// to the program's handler.
    pub foreign: u64,
}

/// How often threads have met a site under the int3 protocol (see [`TrapCounts`]).
pub fn trap_counts() -> TrapCounts {
    let (emulated, rewound, foreign) = crate::sys::trap::counts();
    TrapCounts {
        emulated,
        rewound,
        foreign,
    }
}

/// Reads the current bytes at a registered site (for tests and diagnostics).
pub fn site_bytes(site: PatchSite) -> [u8; SITE_LEN] {
    read_registered(site.address())
}

/// The bytes at `address` if it is a registered site (read under the write lock, so they are
/// the bytes of a whole instruction).
pub(crate) fn read_registered(address: usize) -> [u8; SITE_LEN] {
    let w = lock();
    assert!(
        w.sites.contains_key(&Hidden::new(address)),
        "{address:#x} is not a registered site"
    );
    read_site(address)
}
