//! The `SIGTRAP` side of the int3 write protocol.
//!
//! # Protocol (the handler's half; the writer's half is in [`crate::write`])
//!
//! A site that cannot be replaced by one atomic store is patched like the kernel's
//! `text_poke_bp`: its first byte becomes `int3`, then its tail changes, then its first byte. A
//! thread that executes the site meanwhile traps, and this handler moves it on as if it had
//! executed the *new* instruction: `jmp` sets RIP to the target, `call` pushes the return address
//! and sets RIP to the target, NOP sets RIP past the site.
//!
//! The writer and the handler share [`TrapSites`], a lock-free hash table that the handler only
//! reads (no locks, no allocation: async-signal-safe). Each slot holds a site address that was
//! ever patched through int3 (`key`), and, while a write is in progress, the new bytes (`pending`,
//! armed). The writer publishes in this order, each step `Release`, the handler reads `Acquire`:
//!
//! 1. insert the key (before the site ever holds `int3`): so any trap at `key + 1` is ours;
//! 2. arm `pending` (before writing `int3`);
//! 3. write `int3`, the tail, the first byte, with core syncs between (see `write`);
//! 4. disarm `pending` (after the final first byte is written and synced).
//!
//! The handler, on a trap whose RIP − 1 is a key, loops: if the byte at the site is no longer
//! `int3`, the write completed after this thread trapped but before its signal was delivered
//! (a signal may be delivered long after the trap), so it rewinds RIP to the site and lets the
//! thread execute the now-complete instruction. If it is `int3` and `pending` is armed, it
//! emulates the pending instruction. If it is `int3` and nothing is armed, a writer is between
//! steps 3 and 4 (or about to start the next write at step 2); the handler yields and looks again.
//! The writer never waits for a handler, so the loop ends when the writer's step finishes.
//!
//! The table grows by copying into a new, larger table and publishing its pointer; the old table
//! is leaked on purpose, because a handler on another thread may still be reading it. Growth
//! happens only while no slot is armed (keys of a batch are inserted before any is armed), and the
//! total leaked memory is bounded by the size of the final table (geometric growth).
//!
//! Traps that are not ours (other addresses, or not from `int3`) are passed to the handler that
//! was installed before ours, exactly as the kernel would have called it, or to the default
//! action. If a program installs its own `SIGTRAP` handler after ours, [`install`] (called before
//! every int3 write) puts ours back in front and chains to it; a thread-local guard breaks the
//! loop if that handler in turn chains back to us.
//!
//! # Safety
//!
//! The handler dereferences the `siginfo_t` and `ucontext_t` the kernel passes, reads the code
//! byte at a site address (sites stay mapped while registered: unmapping code that holds a
//! registered site is forbidden by the engine), and, to emulate a `call`, writes the return
//! address just below the interrupted stack pointer, which is what the `call` itself would have
//! done (no live data may lie there: the compiler knows a call clobbers it).
#![allow(unsafe_code)]

use crate::arch::{self, INT3, SITE_LEN};
use crate::error::{Error, Result};
use crate::site::SiteInsn;
use std::cell::Cell;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

const ARMED: u64 = 1 << 63;

struct Slot {
    key: AtomicUsize,
    pending: AtomicU64,
}

struct Table {
    mask: usize,
    slots: Box<[Slot]>,
}

impl Table {
    fn with_capacity(capacity: usize) -> Table {
        let slots = (0..capacity)
            .map(|_| Slot {
                key: AtomicUsize::new(0),
                pending: AtomicU64::new(0),
            })
            .collect();
        Table {
            mask: capacity - 1,
            slots,
        }
    }

    fn index(&self, key: usize) -> usize {
        // Fibonacci hashing spreads nearby code addresses over the table.
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 17) & self.mask
    }

    /// The slot of `key`, if present. Async-signal-safe.
    fn find(&self, key: usize) -> Option<&Slot> {
        let mut i = self.index(key);
        loop {
            let slot = &self.slots[i];
            match slot.key.load(Ordering::Acquire) {
                0 => return None,
                k if k == key => return Some(slot),
                _ => i = (i + 1) & self.mask,
            }
        }
    }

    /// Inserts `key` (absent, table not full).
    fn insert(&self, key: usize) -> &Slot {
        let mut i = self.index(key);
        while self.slots[i].key.load(Ordering::Relaxed) != 0 {
            i = (i + 1) & self.mask;
        }
        self.slots[i].key.store(key, Ordering::Release);
        &self.slots[i]
    }
}

static TABLE: AtomicPtr<Table> = AtomicPtr::new(std::ptr::null_mut());

/// Traps at our sites handled by emulating the pending instruction.
static EMULATED: AtomicU64 = AtomicU64::new(0);
/// Traps at our sites whose write had completed when the handler ran (rewound).
static REWOUND: AtomicU64 = AtomicU64::new(0);

/// How many traps at patch sites the handler has resolved: `(emulated, rewound)`.
pub fn counts() -> (u64, u64) {
    (
        EMULATED.load(Ordering::Relaxed),
        REWOUND.load(Ordering::Relaxed),
    )
}

/// The writer's handle on the handler's table of int3 sites.
///
/// Exactly one exists, inside the engine's write lock, so every mutation is exclusive.
pub struct TrapSites {
    len: usize,
}

impl TrapSites {
    /// Creates the handle. The engine creates one, inside its write lock.
    pub(crate) fn new() -> TrapSites {
        TrapSites { len: 0 }
    }

    fn table(&self) -> Option<&'static Table> {
        // SAFETY: TABLE is null or points to a leaked Table that is never freed.
        unsafe { TABLE.load(Ordering::Acquire).as_ref() }
    }

    /// Makes traps at `site + 1` recognisable as ours. Must not be called while a slot is armed.
    pub fn insert(&mut self, site: usize) {
        if self.table().and_then(|t| t.find(site)).is_some() {
            return;
        }
        let capacity = self.table().map_or(0, |t| t.slots.len());
        if (self.len + 1) * 2 > capacity {
            let bigger = Table::with_capacity((capacity * 2).max(64));
            if let Some(old) = self.table() {
                for slot in old.slots.iter() {
                    let key = slot.key.load(Ordering::Relaxed);
                    if key != 0 {
                        assert_eq!(slot.pending.load(Ordering::Relaxed), 0, "grew while armed");
                        bigger.insert(key);
                    }
                }
            }
            // The old table is leaked: a handler may still be reading it (see module docs).
            TABLE.store(Box::into_raw(Box::new(bigger)), Ordering::Release);
        }
        self.table().expect("table exists").insert(site);
        self.len += 1;
    }

    fn slot(&self, site: usize) -> &Slot {
        self.table()
            .and_then(|t| t.find(site))
            .expect("site inserted before it is armed")
    }

    /// Tells the handler which instruction a trap at `site` must emulate.
    pub fn arm(&mut self, site: usize, new: [u8; SITE_LEN]) {
        let mut word = [0u8; 8];
        word[..SITE_LEN].copy_from_slice(&new);
        let value = u64::from_le_bytes(word) | ARMED;
        self.slot(site).pending.store(value, Ordering::Release);
    }

    /// Ends the write at `site`: traps that are still in flight will see a complete instruction.
    pub fn disarm(&mut self, site: usize) {
        self.slot(site).pending.store(0, Ordering::Release);
    }
}

/// The action that was installed before ours, to chain to (leaked `Box`, or null: default).
static PREVIOUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());

thread_local! {
    static CHAINING: Cell<bool> = const { Cell::new(false) };
}

fn current_action() -> Result<libc::sigaction> {
    // SAFETY: sigaction with a null new action only reads the current one into `old`, which is a
    // valid, writable sigaction.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGTRAP, std::ptr::null(), &mut old) != 0 {
            return Err(Error::last_os("sigaction(SIGTRAP) query"));
        }
        Ok(old)
    }
}

/// Installs the handler unless it is already the active `SIGTRAP` action, keeping whatever was
/// there to chain to. Called by the writer (under its lock) before every int3 write.
pub fn install() -> Result<()> {
    let ours = on_sigtrap as *const () as libc::sighandler_t;
    let current = current_action()?;
    if current.sa_sigaction == ours {
        return Ok(());
    }
    // SAFETY: we fill a zeroed sigaction completely (handler, flags, empty mask) and pass valid
    // pointers; `on_sigtrap` has the SA_SIGINFO signature.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ours;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        let mut previous: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGTRAP, &action, &mut previous) != 0 {
            return Err(Error::last_os("sigaction(SIGTRAP) install"));
        }
        // Publish the previous action for chaining; the old one is leaked (a handler may read it).
        PREVIOUS.store(Box::into_raw(Box::new(previous)), Ordering::Release);
    }
    Ok(())
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
    // SAFETY: same pointers, passed on unchanged.
    unsafe { chain(signal, info, context) }
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
    loop {
        // SAFETY: TABLE is null or a leaked, never-freed table.
        let Some(table) = (unsafe { TABLE.load(Ordering::Acquire).as_ref() }) else {
            return false;
        };
        let Some(slot) = table.find(site) else {
            return false;
        };
        // SAFETY: `site` is a registered site, mapped while registered (module docs).
        if unsafe { std::ptr::read_volatile(site as *const u8) } != INT3 {
            gregs[libc::REG_RIP as usize] = site as i64;
            REWOUND.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        let pending = slot.pending.load(Ordering::Acquire);
        if pending & ARMED != 0 {
            let bytes = pending.to_le_bytes();
            let new = [bytes[0], bytes[1], bytes[2], bytes[3], bytes[4]];
            match arch::decode(new, site) {
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
            return true;
        }
        // SAFETY: sched_yield is async-signal-safe and takes no arguments.
        unsafe { libc::sched_yield() };
    }
}

/// Passes a trap that is not ours to the previously installed action.
///
/// # Safety
///
/// The arguments are those the kernel passed to our handler.
unsafe fn chain(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: PREVIOUS is null or a leaked, never-freed sigaction.
    let previous = unsafe { PREVIOUS.load(Ordering::Acquire).as_ref() };
    let looped = CHAINING.with(|c| c.replace(true));
    let handler = match previous {
        Some(p) if !looped => p.sa_sigaction,
        _ => libc::SIG_DFL,
    };
    if handler == libc::SIG_DFL {
        // What would have happened without us: the default action (terminate with a core dump),
        // delivered as soon as this handler returns.
        // SAFETY: signal and raise are async-signal-safe; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(libc::SIGTRAP, libc::SIG_DFL);
            libc::raise(libc::SIGTRAP);
        }
    } else if handler != libc::SIG_IGN {
        let flags = previous.map_or(0, |p| p.sa_flags);
        if flags & libc::SA_SIGINFO != 0 {
            // SAFETY: the previous action declared SA_SIGINFO, so its handler has this signature.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(handler) };
            f(signal, info, context);
        } else {
            // SAFETY: without SA_SIGINFO the handler has the one-argument signature.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
            f(signal);
        }
    }
    CHAINING.with(|c| c.set(false));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_finds_every_inserted_key_across_growth() {
        let table = Table::with_capacity(8);
        for k in 1..=4usize {
            table.insert(k * 0x1000 + 3);
        }
        for k in 1..=4usize {
            assert!(table.find(k * 0x1000 + 3).is_some());
        }
        assert!(table.find(0x5003).is_none());
    }
}
