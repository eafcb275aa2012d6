//! Safe live writes: changing patch sites while other threads execute them.
//!
//! # The problem
//!
//! A thread may be fetching a site's 5 bytes at any moment. If it sees some old bytes and some
//! new ones it executes a torn instruction and the process dies, or worse, jumps somewhere
//! plausible. Cores may also run stale bytes they fetched before the write (cross-modifying code).
//!
//! # The protocol
//!
//! All writes happen under one global lock ([`WRITER`]), in batches ([`Batch`]). A batch is
//! validated completely before the first byte changes; then:
//!
//! 1. **Permissions.** Every page holding a site of the batch is made `rwx` (never writable
//!    without exec: a thread executing there must not fault), contiguous pages in one `mprotect`,
//!    and restored to its original protection after the batch. If the kernel forbids writable
//!    executable pages (W^X policies), the engine writes through `/proc/self/mem` instead, as a
//!    debugger does, and uses only the int3 path (those writes are not guaranteed atomic).
//! 2. **Aligned sites** — the 5 bytes lie in one naturally aligned 8-byte word — change with one
//!    atomic 8-byte store of the whole word (read-modify-write; only the writer stores to code,
//!    under the lock). A fetch sees the old or the new instruction, never a mix.
//! 3. **Other sites** follow the kernel's `text_poke_bp`: arm the trap table with the new bytes
//!    (see [`crate::sys::trap`]), write `int3` on the first byte of every such site, sync cores;
//!    write bytes 1..4, sync cores; write the first byte, (sync cores: step 4). A thread that
//!    reaches a site meanwhile traps and the handler emulates the new instruction.
//! 4. **Sync cores** once more ([`crate::sys::membarrier`]): every thread now executes the new
//!    bytes. Only then are the trap slots disarmed and springboards no longer in use considered.
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
//! Nothing is written until every edit is validated (registered site, expected instruction
//! present, target reachable, bytes in memory as the engine left them) and every page is
//! writable. A failure before that point leaves the process exactly as it was.
//!
//! # Knobs
//!
//! `EVOLVE_WRITE_PATH=int3` makes every batch use the int3 protocol (see [`WritePath`]);
//! `EVOLVE_WRITE_VIA_PROC_MEM=1` writes through `/proc/self/mem` from the start, as on a
//! system that forbids writable executable pages. Both exist so that tests cover every path.
//!
//! # Safety
//!
//! The unsafe blocks here read and write site bytes. Sites are mapped while registered
//! (the contract of [`PatchSite::register`]); writes happen only inside a [`Window`] that made
//! the pages writable, under the write lock, in the order the protocol above requires.
#![allow(unsafe_code)]

use crate::arch::{self, INT3, SITE_LEN};
use crate::error::{Error, ErrorKind, Result};
use crate::hidden::{hide_insn, reveal_insn, Hidden};
use crate::site::{PatchSite, SiteInsn};
use crate::springboard::Springboards;
use crate::sys::memory::{self, Protection};
use crate::sys::{membarrier, trap::TrapSites};
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

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

static WRITER: Mutex<Option<Writer>> = Mutex::new(None);
static DEFAULT_PATH: AtomicU8 = AtomicU8::new(0);

/// The write lock, with the engine state created on first use.
pub(crate) fn lock() -> WriterGuard {
    let mut guard = WRITER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if guard.is_none() {
        *guard = Some(Writer {
            sites: HashMap::new(),
            traps: TrapSites::new(),
            protections: HashMap::new(),
            springboards: Springboards::default(),
            via_proc_mem: std::env::var_os("EVOLVE_WRITE_VIA_PROC_MEM").is_some(),
            executable: Vec::new(),
            interposed: HashMap::new(),
            follows: HashMap::new(),
        });
    }
    WriterGuard(guard)
}

/// Holds the write lock.
pub(crate) struct WriterGuard(MutexGuard<'static, Option<Writer>>);

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

pub(crate) fn default_write_path() -> WritePath {
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
    replace_bytes(address, &expected, &new, emulate, WritePath::Int3).map(|_| ())
}

/// Replaces the bytes `expected` at `address` (at most 8, code the engine does not track as a
/// site) with `new`, without stopping any thread. With [`WritePath::Auto`], bytes inside one
/// aligned 8-byte word change with one atomic store; otherwise through the int3 protocol, where
/// a thread that reaches `address` meanwhile traps and continues as if it had executed
/// `emulate`. Sound under the conditions of [`replace_instruction`], for `expected.len()` bytes.
/// Returns whether the bytes were stored atomically (else: through the int3 protocol).
pub(crate) fn replace_bytes(
    address: usize,
    expected: &[u8],
    new: &[u8],
    emulate: SiteInsn,
    path: WritePath,
) -> Result<bool> {
    let len = expected.len();
    assert!(len == new.len() && (1..=8).contains(&len), "1 to 8 bytes");
    let mut w = lock();
    let mut found = [0u8; 8];
    for (i, byte) in found[..len].iter_mut().enumerate() {
        // SAFETY: the caller's code at `address` is mapped and readable (executable pages are
        // readable on x86-64; callers check the mapping before they hand out the address).
        *byte = unsafe { std::ptr::read_volatile((address + i) as *const u8) };
    }
    if found[..len] != *expected {
        let shown = |bytes: &[u8]| {
            let mut out = [0u8; SITE_LEN];
            let n = bytes.len().min(SITE_LEN);
            out[..n].copy_from_slice(&bytes[..n]);
            out
        };
        return Err(Error::new(ErrorKind::UnexpectedBytes {
            address,
            expected: shown(expected),
            found: shown(&found[..len]),
        }));
    }
    membarrier::ensure_registered()?;
    let window = w.open_code_window(address, len)?;
    if path == WritePath::Auto && !window.0.via_proc_mem && address % 8 + len <= 8 {
        // SAFETY: the window made the page writable; the bytes lie in one aligned word; we hold
        // the write lock, so no other writer stores to this word.
        unsafe { memory::store_in_word(address, new) };
        let synced = membarrier::sync_cores();
        window.close()?;
        return synced.map(|()| true);
    }
    let armed = arch::encode(emulate, address).ok_or(ErrorKind::InvalidArgument {
        reason: format!("`{emulate}` is out of reach of {address:#x}"),
    })?;
    crate::sys::trap::install()?;
    w.traps.insert(address);
    w.traps.arm(address, armed);
    let written = (|| {
        window.write(address, &[INT3])?;
        membarrier::sync_cores()?;
        if len > 1 {
            window.write(address + 1, &new[1..])?;
            membarrier::sync_cores()?;
        }
        window.write(address, &new[..1])?;
        membarrier::sync_cores()
    })();
    w.traps.disarm(address);
    window.close()?;
    written.map(|()| false)
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
///     batch.retarget(s.patch_site(), s.patch_site().current(), evolve_code::SiteInsn::Jmp(b as usize));
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
    pub fn retarget(&mut self, site: PatchSite, expected: SiteInsn, new: SiteInsn) -> &mut Batch {
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
        crate::hidden::scrub_plain(plan.0);
        result.map(|_| ())
    }

    fn plan(&mut self, edits: &[Edit]) -> Result<(Vec<Planned>, usize)> {
        // Hidden: the set is freed after planning (see `crate::hidden`).
        let mut seen = HashSet::with_capacity(edits.len());
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
        // Slots first: a site newly routed to its trampoline must find the target there.
        for p in planned {
            if let Some((slot, target)) = p.slot {
                // SAFETY: the slot is alive while its site is interposed (see `interpose`).
                unsafe { &*(slot as *const AtomicUsize) }.store(target, Ordering::Release);
            }
        }
        let writes: Vec<&Planned> = planned.iter().filter(|p| p.write_bytes).collect();
        let mut window = self.open_window(writes.iter().map(|p| p.site))?;
        report.mprotects += window.runs.len();
        let store_atomically = |site: usize| {
            path == WritePath::Auto && !window.via_proc_mem && site % 8 + SITE_LEN <= 8
        };
        let (stored, trapped): (Vec<&Planned>, Vec<&Planned>) =
            writes.iter().partition(|p| store_atomically(p.site));

        if !trapped.is_empty() {
            crate::sys::trap::install()?;
            // Keys first (may grow the table), then arm: growth never happens while armed.
            for p in &trapped {
                self.traps.insert(p.site);
            }
            for p in &trapped {
                self.traps.arm(p.site, p.bytes);
            }
            for p in &trapped {
                window.write(p.site, &[INT3])?;
            }
            membarrier::sync_cores()?;
            for p in &trapped {
                window.write(p.site + 1, &p.bytes[1..])?;
            }
            membarrier::sync_cores()?;
            for p in &trapped {
                window.write(p.site, &p.bytes[..1])?;
            }
            report.core_syncs += 2;
        }
        for p in &stored {
            // SAFETY: the window made the page writable; the site lies in one aligned word
            // (checked by `store_atomically`); we hold the write lock.
            unsafe { memory::store_in_word(p.site, &p.bytes) };
        }
        membarrier::sync_cores()?;
        report.core_syncs += 1;
        for p in &trapped {
            self.traps.disarm(p.site);
        }
        for p in planned {
            let state = self.sites.get_mut(&Hidden::new(p.site)).expect("validated");
            state.bytes = p.bytes;
            state.current = hide_insn(p.insn);
        }
        report.changed = planned.len();
        report.stored = stored.len();
        report.via_int3 = trapped.len();
        report.via_springboard = planned.iter().filter(|p| p.via_springboard).count();
        report.mprotects += window.close()?;
        Ok(report)
    }

    /// Makes the pages of `addresses` (each the start of `SITE_LEN` bytes) writable.
    fn open_window(&mut self, addresses: impl Iterator<Item = usize>) -> Result<Window> {
        // Page lists hold plain addresses: scrubbed below (see `crate::scrub`).
        let mut pages: Vec<usize> = addresses
            .flat_map(|a| [memory::page_of(a), memory::page_of(a + SITE_LEN - 1)])
            .collect();
        pages.sort_unstable();
        pages.dedup();
        let missing: Vec<usize> = pages
            .iter()
            .copied()
            .filter(|p| !self.protections.contains_key(&Hidden::new(*p)))
            .collect();
        if !missing.is_empty() {
            let maps = memory::mappings()?;
            for &page in &missing {
                let m = memory::mapping_containing(&maps, page)
                    .filter(|m| m.protection.exec)
                    .ok_or(ErrorKind::NotExecutable { address: page })?;
                self.protections.insert(
                    Hidden::new(page),
                    (
                        m.protection,
                        Hidden::new(m.range.start),
                        Hidden::new(m.range.end),
                    ),
                );
            }
        }
        // One mprotect per mapping, from its first to its last page of the batch: the pages in
        // between are made writable too (they keep exec, and nothing writes them), which is far
        // cheaper than one call per scattered page.
        let page_size = memory::page_size();
        let mut runs: Vec<(Range<usize>, Protection)> = Vec::new();
        let mut run_mapping: Option<(Hidden, Hidden)> = None;
        crate::hidden::scrub_plain(missing);
        for &page in &pages {
            let (protection, start, end) = self.protections[&Hidden::new(page)];
            let mapping = (start, end);
            match runs.last_mut() {
                Some((range, p)) if *p == protection && run_mapping.as_ref() == Some(&mapping) => {
                    range.end = page + page_size
                }
                _ => {
                    runs.push((page..page + page_size, protection));
                    run_mapping = Some(mapping);
                }
            }
        }
        crate::hidden::scrub_plain(pages);
        let mut window = Window {
            runs: Vec::with_capacity(runs.len()),
            via_proc_mem: self.via_proc_mem,
        };
        if window.via_proc_mem {
            crate::hidden::scrub_plain(runs);
            return Ok(window);
        }
        for (range, protection) in runs.iter().cloned() {
            let writable = Protection {
                write: true,
                ..protection
            };
            if let Err(e) = memory::mprotect(range.clone(), writable) {
                window.close()?;
                if matches!(e.kind(), ErrorKind::Os { errno, .. } if *errno == libc::EACCES) {
                    // W^X policy: fall back to /proc/self/mem for good (see module docs).
                    self.via_proc_mem = true;
                    window.via_proc_mem = true;
                    return Ok(window);
                }
                if matches!(e.kind(), ErrorKind::Os { errno, .. } if *errno == libc::ENOMEM) {
                    // Unmapped since we cached it: forget, so the next attempt re-reads maps.
                    self.protections.retain(|p, _| !range.contains(&p.get()));
                }
                crate::hidden::scrub_plain(runs);
                return Err(e);
            }
            window.runs.push((range, protection));
        }
        crate::hidden::scrub_plain(runs);
        Ok(window)
    }

    /// Writes fresh code (not yet reachable by any thread) and syncs cores, so that a later
    /// site write publishing it is seen after the code.
    pub(crate) fn write_fresh_code(&mut self, address: usize, code: &[u8]) -> Result<()> {
        self.write_fresh_code_many(&[(address, code)])
    }

    /// Writes several pieces of fresh code in one window, then syncs cores once.
    pub(crate) fn write_fresh_code_many<C: AsRef<[u8]>>(
        &mut self,
        pieces: &[(usize, C)],
    ) -> Result<()> {
        membarrier::ensure_registered()?;
        let spans = pieces.iter().flat_map(|(address, code)| {
            let (address, len) = (*address, code.as_ref().len());
            (address..address + len)
                .step_by(memory::page_size())
                .chain([address + len.saturating_sub(SITE_LEN)])
        });
        let mut window = self.open_window(spans)?;
        for (address, code) in pieces {
            window.write(*address, code.as_ref())?;
        }
        window.close()?;
        membarrier::sync_cores()
    }
}

/// Pages made writable for one batch.
struct Window {
    runs: Vec<(Range<usize>, Protection)>,
    via_proc_mem: bool,
}

impl Window {
    fn write(&self, address: usize, bytes: &[u8]) -> Result<()> {
        if self.via_proc_mem {
            return memory::write_via_proc_mem(address, bytes);
        }
        // SAFETY: the window made every page of the batch writable (and kept them executable);
        // the protocol guarantees no thread executes a partially written instruction.
        unsafe { memory::write(address, bytes) };
        Ok(())
    }

    /// Restores the original protections; returns the number of `mprotect` calls.
    fn close(&mut self) -> Result<usize> {
        let n = self.runs.len();
        for (range, protection) in self.runs.iter().cloned() {
            memory::mprotect(range, protection)?;
        }
        crate::hidden::scrub_plain(std::mem::take(&mut self.runs));
        Ok(n)
    }
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
}

/// How often threads have met a site under the int3 protocol (see [`TrapCounts`]).
pub fn trap_counts() -> TrapCounts {
    let (emulated, rewound) = crate::sys::trap::counts();
    TrapCounts { emulated, rewound }
}

/// Reads the current bytes at a registered site (for tests and diagnostics).
pub fn site_bytes(site: PatchSite) -> [u8; SITE_LEN] {
    read_site(site.address())
}

/// A write window over arbitrary code bytes, for multi-instruction overwrites made while the
/// world is stopped ([`crate::detour`]). Opened and closed under the write lock; writing through
/// it allocates nothing (unless the engine writes via `/proc/self/mem`, whose file is opened
/// when the window opens).
pub(crate) struct CodeWindow(Window);

impl Writer {
    /// Makes `address..address + len` (`len >= SITE_LEN`) writable, keeping it executable.
    pub(crate) fn open_code_window(&mut self, address: usize, len: usize) -> Result<CodeWindow> {
        membarrier::ensure_registered()?;
        let len = len.max(SITE_LEN);
        let window = self.open_window(
            (address..address + len)
                .step_by(memory::page_size())
                .chain([address + len - SITE_LEN]),
        )?;
        if window.via_proc_mem {
            // Open the file now: the write must not allocate while the world is stopped.
            memory::write_via_proc_mem(address, &read_site(address))?;
        }
        Ok(CodeWindow(window))
    }
}

impl CodeWindow {
    /// Writes `bytes` at `address` (inside the window) with plain stores.
    pub(crate) fn write(&self, address: usize, bytes: &[u8]) -> Result<()> {
        self.0.write(address, bytes)
    }

    /// Restores the pages' protection.
    pub(crate) fn close(mut self) -> Result<()> {
        self.0.close().map(|_| ())
    }
}
