//! The `SIGTRAP` side of the int3 write protocol: the handler, its table of sites, and chaining
//! to the program's own handler.
//!
//! # What the handler does
//!
//! A site that cannot be replaced by one atomic store is patched like the kernel's
//! `text_poke_bp`: its first byte becomes `int3`, then its tail changes, then its first byte
//! ([`crate::write`] has the writer's half and the core syncs between the steps). A thread that
//! executes the site meanwhile traps, and this handler moves it on as if it had executed the
//! *pending* instruction: `jmp` sets RIP to the target, `call` pushes the return address and
//! sets RIP to the target, NOP sets RIP past the site. If the write completed before the handler
//! ran (a signal may be delivered long after the trap), the thread is rewound onto the site to
//! execute the whole new instruction. An `int3` that is not the engine's — at an address that
//! was never a site, or at a site with no write in flight (a debugger's breakpoint) — is passed
//! to the program's handler.
//!
//! # The invariant, and who establishes it
//!
//! *Every `int3` the engine writes at a site is covered by an armed slot from before it is
//! written until after the site holds a whole instruction again, inside an odd write epoch.*
//! The writer establishes it, under the engine's write lock, through [`TrapSites`]: keys are
//! inserted before the epoch begins, slots armed before the `int3` is written, disarmed after the
//! last byte is written and synced, and the epoch ends after every disarm — on success and on
//! every failure path, since a failed write is rolled back inside the same epoch
//! (`crate::write`'s transaction). The memory orderings that make the handler's reading of this
//! state sound are argued in [`slots`], which is model-checked with loom.
//!
//! # The table
//!
//! The table is read by the handler with loads only (no locks, no allocation:
//! async-signal-safe). It grows by copying into a new, larger table and publishing its pointer;
//! the old table is leaked on purpose, because a handler on another thread may still be reading
//! it. Growth happens only outside write epochs (keys are inserted before [`TrapSites::begin`]),
//! so no slot is ever armed in a table that is no longer published; a handler still reading an
//! older table finds its slot unarmed and waits for the write to end, then rewinds. The total
//! leaked memory is bounded by the size of the final table (geometric growth). Keys are never
//! removed: a trap at a site may be delivered long after the site's write.
//!
//! # Chaining
//!
//! Traps that are not ours (other addresses, not from `int3`, or foreign `int3`s at sites) are
//! passed to the handler that was installed before ours, exactly as the kernel would have called
//! it, or to the default action. If a program installs its own `SIGTRAP` handler after ours,
//! [`install`] (called before every int3 write) puts ours back in front and chains to it; if
//! that handler in turn chains back to us, the default action ends the loop. All of it is
//! [`Chain`]'s, shared with the engine's other signals (no thread-local: in an engine loaded
//! with `dlopen` its first use in a handler would allocate).
//!
//! # Safety
//!
//! The handler dereferences the `siginfo_t` and `ucontext_t` the kernel passes, reads the first
//! byte of a site (sites stay mapped while registered: unmapping code that holds a registered
//! site is forbidden by the engine, and the thread just executed that byte), and, to emulate a
//! `call`, writes the return address just below the interrupted stack pointer, which is what the
//! `call` itself would have done (no live data may lie there: the compiler knows a call
//! clobbers it).
#![allow(unsafe_code)]

pub(crate) mod slots;

use super::signal::Chain;
use crate::arch::{self, SITE_LEN};
use crate::error::Result;
use crate::site::SiteInsn;
use slots::{Resolution, Slot, Table, WriteEpoch};
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

static TABLE: AtomicPtr<Table> = AtomicPtr::new(std::ptr::null_mut());

/// The process's write epoch (see [`slots`]).
#[cfg(not(feature = "loom"))]
fn epoch() -> &'static WriteEpoch {
    static EPOCH: WriteEpoch = WriteEpoch::new();
    &EPOCH
}

#[cfg(feature = "loom")]
fn epoch() -> &'static WriteEpoch {
    unreachable!("loom models the protocol in `slots`, not the process's handler")
}

/// Traps at our sites handled by emulating the pending instruction.
static EMULATED: AtomicU64 = AtomicU64::new(0);
/// Traps at our sites whose write had completed when the handler ran (rewound).
static REWOUND: AtomicU64 = AtomicU64::new(0);
/// `int3`s at our sites with no write in flight, passed on to the program's handler.
static FOREIGN: AtomicU64 = AtomicU64::new(0);

/// How many traps at patch sites the handler has resolved: `(emulated, rewound, foreign)`.
pub fn counts() -> (u64, u64, u64) {
    (
        EMULATED.load(Ordering::Relaxed),
        REWOUND.load(Ordering::Relaxed),
        FOREIGN.load(Ordering::Relaxed),
    )
}

/// The writer's handle on the handler's table of int3 sites.
///
/// Exactly one exists, inside the engine's write lock, so every mutation is exclusive. Call
/// order for one write: [`insert`](TrapSites::insert) every site, [`begin`](TrapSites::begin),
/// [`arm`](TrapSites::arm) every site, write, [`disarm`](TrapSites::disarm) every site,
/// [`end`](TrapSites::end).
pub struct TrapSites {
    len: usize,
    in_flight: bool,
}

impl TrapSites {
    /// Creates the handle. The engine creates one, inside its write lock.
    pub(crate) fn new() -> TrapSites {
        TrapSites {
            len: 0,
            in_flight: false,
        }
    }

    fn table(&self) -> Option<&'static Table> {
        // SAFETY: TABLE is null or points to a leaked Table that is never freed.
        unsafe { TABLE.load(Ordering::Acquire).as_ref() }
    }

    /// Makes traps at `site + 1` recognisable as ours. Not during a write (may grow the table).
    pub fn insert(&mut self, site: usize) {
        assert!(!self.in_flight, "trap table grown during a write");
        if self.table().and_then(|t| t.find(site)).is_some() {
            return;
        }
        let capacity = self.table().map_or(0, Table::capacity);
        if (self.len + 1) * 2 > capacity {
            let bigger = Table::with_capacity((capacity * 2).max(64));
            if let Some(old) = self.table() {
                for slot in old.occupied() {
                    assert_eq!(slot.armed(), None, "grew while armed");
                    bigger.insert(slot.key());
                }
            }
            // The old table is leaked: a handler may still be reading it (see module docs).
            TABLE.store(Box::into_raw(Box::new(bigger)), Ordering::Release);
        }
        self.table().expect("table exists").insert(site);
        self.len += 1;
    }

    fn slot(&self, site: usize) -> &'static Slot {
        self.table()
            .and_then(|t| t.find(site))
            .expect("site inserted before it is armed")
    }

    /// A write starts: from now until [`end`](TrapSites::end), an `int3` at a site is the
    /// engine's.
    pub fn begin(&mut self) {
        assert!(!self.in_flight, "nested int3 writes");
        self.in_flight = true;
        epoch().begin();
    }

    /// Tells the handler which instruction a trap at `site` must emulate.
    pub fn arm(&mut self, site: usize, insn: [u8; SITE_LEN]) {
        debug_assert!(self.in_flight, "armed outside a write");
        self.slot(site).arm(insn);
    }

    /// Ends the write at `site`: it holds a whole instruction, synced to every core.
    pub fn disarm(&mut self, site: usize) {
        self.slot(site).disarm();
    }

    /// The write ends: every site it armed is disarmed.
    pub fn end(&mut self) {
        debug_assert!(self.in_flight, "end without begin");
        self.in_flight = false;
        epoch().end();
    }

    /// The table as the handler sees it (for the fault-injection tests: a failed batch must
    /// leave this exactly as it was).
    #[cfg(feature = "fault-injection")]
    pub(crate) fn snapshot(&self) -> TrapTable {
        let mut sites: Vec<_> = self
            .table()
            .map(|t| t.occupied().map(|s| (s.key(), s.armed())).collect())
            .unwrap_or_default();
        sites.sort_unstable();
        TrapTable {
            sites,
            write_in_flight: !epoch().load().is_multiple_of(2),
        }
    }
}

/// The trap table as the `SIGTRAP` handler sees it.
#[cfg(feature = "fault-injection")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrapTable {
    /// Every site ever written through the int3 protocol, in address order, with the
    /// instruction its slot is armed with (none outside a write).
    pub sites: Vec<(usize, Option<[u8; SITE_LEN]>)>,
    /// Whether a write epoch is open.
    pub write_in_flight: bool,
}

/// The engine's `SIGTRAP` handler in front of the program's action, which traps that are not
/// ours are passed to (the one chaining helper of every engine signal: [`Chain`]).
static CHAIN: Chain = Chain::new(
    || libc::SIGTRAP,
    on_sigtrap,
    libc::SA_ONSTACK | libc::SA_RESTART,
);

/// Installs the handler unless it is already the active `SIGTRAP` action, keeping whatever was
/// there to chain to. Called by the writer (under its lock) before every int3 write.
pub fn install() -> Result<()> {
    CHAIN.install()
}

extern "C" fn on_sigtrap(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes valid siginfo and ucontext pointers to an SA_SIGINFO handler.
    if unsafe { handle_site_trap(info, context) } {
        return;
    }
    // SAFETY: the kernel's arguments, passed on unchanged from the engine's handler.
    unsafe { CHAIN.forward(signal, info, context) }
}

/// Handles a trap at one of our sites; `false` if the trap is not ours.
///
/// # Safety
///
/// `info` and `context` are the pointers the kernel passed to the signal handler.
unsafe fn handle_site_trap(info: *mut libc::siginfo_t, context: *mut libc::c_void) -> bool {
    // SAFETY: valid siginfo from the kernel (caller).
    if unsafe { (*info).si_code } != libc::SI_KERNEL {
        return false;
    }
    // SAFETY: valid ucontext from the kernel (caller); we are its only user during the handler.
    let gregs = unsafe { &mut (*(context as *mut libc::ucontext_t)).uc_mcontext.gregs };
    let site = (gregs[libc::REG_RIP as usize] as usize).wrapping_sub(1);
    // SAFETY: TABLE is null or a leaked, never-freed table.
    let Some(table) = (unsafe { TABLE.load(Ordering::Acquire).as_ref() }) else {
        return false;
    };
    let Some(slot) = table.find(site) else {
        return false;
    };
    // SAFETY: `site` is a registered site, mapped while registered (module docs); this thread
    // just executed its first byte.
    let first_byte = || unsafe { crate::sys::memory::load_code_byte(site) };
    // SAFETY: sched_yield is async-signal-safe and takes no arguments.
    let wait = || unsafe {
        libc::sched_yield();
    };
    match slots::resolve(slot, epoch(), first_byte, wait) {
        Resolution::Rewind => {
            gregs[libc::REG_RIP as usize] = site as i64;
            REWOUND.fetch_add(1, Ordering::Relaxed);
        }
        Resolution::Emulate(insn) => {
            match arch::decode(insn, site) {
                Some(SiteInsn::Jmp(target)) => gregs[libc::REG_RIP as usize] = target as i64,
                Some(SiteInsn::Call(target)) => {
                    let sp = gregs[libc::REG_RSP as usize] as usize - 8;
                    // SAFETY: emulating `call`: it stores the return address just below the
                    // stack pointer, on the interrupted thread's own stack (module docs).
                    unsafe { std::ptr::write(sp as *mut u64, (site + SITE_LEN) as u64) };
                    gregs[libc::REG_RSP as usize] = sp as i64;
                    gregs[libc::REG_RIP as usize] = target as i64;
                }
                // The writer only arms encodable site instructions; a NOP moves on.
                _ => gregs[libc::REG_RIP as usize] = (site + SITE_LEN) as i64,
            }
            EMULATED.fetch_add(1, Ordering::Relaxed);
        }
        Resolution::NotOurs => {
            FOREIGN.fetch_add(1, Ordering::Relaxed);
            return false;
        }
    }
    true
}
