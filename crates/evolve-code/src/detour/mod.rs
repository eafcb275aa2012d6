//! Entry detours: a 5-byte `jmp` over the prologue of any function, to a generated trampoline
//! that counts the call, optionally calls a hook with the arguments, runs the relocated prologue
//! and jumps back.
//!
//! # Relocation
//!
//! [`Prologue::of`] decodes the function's first instructions with `iced-x86` until they cover
//! 5 bytes, and refuses (with [`ErrorKind::Unrelocatable`], naming the instruction) when:
//! - the function is shorter than 5 bytes, or control leaves it (`ret`, `jmp`, `ud2`, …) before
//!   5 bytes are covered;
//! - a covered instruction is a `call` (its return address would point into the trampoline,
//!   which could then never be freed) or cannot be decoded;
//! - a covered instruction enters the kernel (`syscall`, `sysenter`, `int n`, `int3`): a thread
//!   blocked in the kernel there resumes, or restarts the system call, at an address inside the
//!   bytes being replaced, which the stop-the-world check cannot see as busy;
//! - any branch of the function (decoded over its whole symbol size, however large) targets a
//!   byte strictly inside the overwritten instructions: it would land in the middle of the new
//!   `jmp`.
//!
//! Branches from *other* functions into the prologue and computed jumps (jump tables) cannot
//! be checked; compilers do not emit them into a prologue. The relocated instructions are
//! re-encoded by iced's block encoder at the trampoline's address, which fixes RIP-relative
//! memory operands and near branches (growing short branches where needed).
//!
//! # The trampoline
//!
//! Generated with iced-x86's `code_asm` ([`trampoline`] has the layout): a re-entrancy check
//! (probes off for the thread: straight to the relocated prologue), the count (a plain `inc` in
//! the thread's counter block), the latency fast path (a shadow frame pushed in machine code),
//! and, while the point's `slow` flag is set, a call of the entry hook with the argument
//! registers saved and the thread's re-entrancy guard set. The prefix (everything before the
//! relocated prologue) has unwind info ([`crate::unwind`], registered with the process's
//! unwinder), so a backtrace or a panic in a hook passes through the trampoline to the probed
//! call's caller.
//!
//! # Prepared functions: routing the stub
//!
//! A function whose first instruction is a `jmp rel32` (the entry stub of a hot or multiverse
//! function) is not relocated: its stub is *routed* through the trampoline
//! ([`crate::write`]'s interposition). The stub's bytes jump to the trampoline, whose tail is
//! `jmp [slot]`; the slot holds the stub's current target. While routed, every batch that
//! retargets the stub — hot apply and revert, multiverse commit and revert — stores the new
//! target in the slot instead of rewriting the bytes, and direct calls of the stub that a
//! multiverse commit would send to the variant keep calling the stub. The stub's meaning
//! ([`crate::PatchSite::current`]) never changes, so those layers need not know about probes.
//! Removing writes the stub's bytes for its current target: its original bytes if the target
//! did not change. The stub is one instruction, so neither step stops the world.
//!
//! # Installing and removing
//!
//! Writing the `jmp` over a prologue replaces several instructions, so it happens with the
//! world stopped ([`crate::stop_the_world`]), under the engine's write lock, only when no
//! thread can resume strictly inside the replaced bytes — its RIP, a PC saved by a signal frame
//! on its stack, a return address ([`crate::world::World::resumable_in`]) — otherwise it
//! resumes them and tries again. Removing writes the original 5 bytes back over the `jmp` — one instruction, so no
//! stop: the int3 protocol, a thread that reaches the function meanwhile continues in the
//! trampoline's relocated prologue. Prologues are decoded once per function (cached; a stale
//! entry is caught by the byte comparison made with the world stopped).
//!
//! A removed trampoline is quarantined; every 16 removals (or [`reclaim_trampolines`]) one stop
//! of the world releases those no thread is in: no thread can resume in it and no thread is
//! inside its hook (the per-thread `active` counts sum to zero). Released blocks keep their
//! unwind info and are reused by later trampolines in reach. The same stop frees the retired
//! latency sinks no shadow frame names, if no thread can resume in any trampoline (a thread
//! there may hold a sink in a register between reading it and pushing its frame: see
//! [`crate::shadow`]).
//!
//! # Safety
//!
//! The unsafe blocks read the function's code (inside an executable mapping checked first),
//! write a trampoline before anything can reach it, dereference the register frame the
//! trampoline passes to the hook thunk, register unwind info that lives forever, and reuse
//! trampolines only under the check above.
#![allow(unsafe_code)]

mod checked;
mod prologue;
mod trampoline;

pub use prologue::Prologue;

use crate::counter::Counter;
use crate::error::{Error, ErrorKind, Result};
use crate::near::NearBlock;
use crate::shadow::Sink;
use crate::sys::membarrier;
use crate::sys::world::{stop_the_world, World};
use crate::thread_state::{self, Unprobed};
use crate::unwind::{self, Registration};
use gimli::write::CallFrameInstruction;
use prologue::read_code;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};

/// Bytes the entry `jmp` occupies.
const JMP_LEN: usize = 5;
/// Size of a trampoline block.
const TRAMPOLINE_LEN: usize = 1024;

/// The registers a hook sees, as the trampoline saved them at the function's entry.
#[repr(C)]
#[derive(Debug)]
pub struct SavedRegs {
    xmm: [[u64; 2]; 8],
    rax: u64,
    r9: u64,
    r8: u64,
    rcx: u64,
    rdx: u64,
    rsi: u64,
    rdi: u64,
    /// The return address slot of the call (the top of the stack at entry).
    pub(crate) ret: usize,
}

/// A call entering a detoured function, as passed to its entry hook.
#[derive(Debug)]
pub struct Entry<'a> {
    pub(crate) regs: &'a mut SavedRegs,
}

impl Entry<'_> {
    /// The `i`-th integer argument (`rdi`, `rsi`, `rdx`, `rcx`, `r8`, `r9`), 0 beyond 6.
    pub fn arg(&self, i: usize) -> u64 {
        let r = &self.regs;
        [r.rdi, r.rsi, r.rdx, r.rcx, r.r8, r.r9]
            .get(i)
            .copied()
            .unwrap_or(0)
    }

    /// The address the call returns to (as it stands now).
    pub fn return_address(&self) -> usize {
        self.regs.ret
    }

    /// The address of the return-address slot (the stack pointer at entry).
    pub fn stack_pointer(&self) -> usize {
        &self.regs.ret as *const usize as usize
    }

    /// The return addresses of this call, its caller's first, at most `max`: a backtrace taken
    /// without any lock of the Rust runtime (the interrupted code may hold std's backtrace
    /// lock). `None` when the call comes from the unwinder itself, which may hold its own lock
    /// (unwinding from here would wait for it forever). Symbolize later, outside the hook
    /// ([`crate::inspect::symbolize`]).
    pub fn backtrace(&self, max: usize) -> Option<Vec<usize>> {
        let caller = self.caller();
        if crate::unwind::is_unwinder_code(caller) {
            return None;
        }
        // The walk starts in the hook; the probed call's frame begins at its caller.
        let all = crate::unwind::return_addresses(max + 16);
        let from = all.iter().position(|&a| a == caller).unwrap_or(0);
        Some(all[from..].iter().copied().take(max).collect())
    }

    /// The real return address of this call (the caller's code), also when the return address
    /// was already replaced by a shadow-stack exit stub.
    fn caller(&self) -> usize {
        crate::shadow::real_return_address(self.regs.ret)
    }
}

/// A hook called on entry to a detoured function, on the calling thread, before its prologue.
pub type EntryHook = dyn Fn(&mut Entry<'_>) + Send + Sync;

/// What a detour's trampoline does.
#[derive(Clone)]
pub struct DetourHooks {
    /// Incremented by every call (per thread, see [`Counter`]).
    pub counter: Arc<Counter>,
    /// While true, every call also calls `on_entry`.
    pub slow: Arc<AtomicBool>,
    /// The entry hook.
    pub on_entry: Arc<EntryHook>,
}

impl std::fmt::Debug for DetourHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DetourHooks")
            .field("counter", &self.counter)
            .field("slow", &self.slow)
            .finish_non_exhaustive()
    }
}

extern "C" fn entry_thunk(regs: *mut SavedRegs, hook: *const Arc<EntryHook>) {
    // Where the trampoline cannot test the guard itself (no fixed TLS offset), a hook that
    // calls a probed function reaches here again: that call runs unprobed.
    if thread_state::offset().is_none() && thread_state::unprobed() {
        return;
    }
    let _unprobed = Unprobed::enter();
    // SAFETY: the trampoline passes its stack frame of saved registers (layout `SavedRegs`,
    // alive for this call) and the hook box owned by its `Detour` (or its quarantine entry),
    // which outlives every thread in the trampoline.
    let (regs, hook) = unsafe { (&mut *regs, &*hook) };
    hook(&mut Entry { regs });
}

extern "C" fn adopt_thunk(_regs: *mut SavedRegs, _unused: usize) {
    crate::counter::adopt();
}

/// Everything a trampoline references; dropped only after no thread can be inside it.
struct Trampoline {
    block: NearBlock,
    /// The unwind info registered for the block.
    unwind: Unwind,
    /// Offset of the tail (relocated prologue, or jump through the slot).
    tail: usize,
    /// Threads inside the hook call (incremented before, decremented after, per thread);
    /// boxed: the trampoline's code holds its address.
    active: Box<Counter>,
    /// For a routed jump site: the slot the trampoline's tail jumps through.
    slot: Option<Box<AtomicUsize>>,
    /// The latency sink the trampoline times calls for (its address, 0: none).
    latency: Box<AtomicUsize>,
    /// The sink whose address `latency` holds, kept alive while it does.
    latency_sink: Mutex<Option<Sink>>,
    _hooks: DetourHooks,
    _hook_box: Box<Arc<EntryHook>>,
}

static DETOURED: Mutex<Option<HashSet<usize>>> = Mutex::new(None);
static QUARANTINE: Mutex<Vec<Trampoline>> = Mutex::new(Vec::new());
/// Trampoline blocks no thread can be in, with their unwind info registered: reused first.
/// (A block whose first trampoline could not be assembled has no unwind info yet.)
static FREE_BLOCKS: Mutex<Vec<(NearBlock, Option<Unwind>)>> = Mutex::new(Vec::new());
/// Every trampoline block ever made, `(start, end)` (blocks are never unmapped).
static ALL_BLOCKS: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

/// The unwind info registered for a trampoline block, and the prefix layout it describes.
struct Unwind {
    registration: Registration,
    len: usize,
    rules: Vec<(u32, i32)>,
}

/// Unwind info for a prefix of `len` bytes at `at` with `rules` (CFA offsets from `rsp`).
fn register_unwind(at: usize, len: usize, rules: &[(u32, i32)]) -> Unwind {
    let section = unwind::eh_frame(
        unwind::call_cie(),
        at,
        len,
        rules
            .iter()
            .map(|&(offset, cfa)| (offset, CallFrameInstruction::CfaOffset(cfa))),
    );
    Unwind {
        registration: unwind::register(section),
        len,
        rules: rules.to_vec(),
    }
}

/// A trampoline block near `function`: a free one in reach (with the unwind info it had), or a
/// new one.
fn trampoline_block(function: usize) -> Result<(NearBlock, Option<Unwind>)> {
    let reused = {
        let mut free = FREE_BLOCKS.lock().unwrap_or_else(|p| p.into_inner());
        let reach = |b: &NearBlock| {
            b.address().abs_diff(function) < crate::near::REACH
                && (b.address() + b.len()).abs_diff(function) < crate::near::REACH
        };
        free.iter()
            .position(|(b, _)| reach(b))
            .map(|i| free.swap_remove(i))
    };
    if let Some(reused) = reused {
        return Ok(reused);
    }
    let block = NearBlock::alloc(function, TRAMPOLINE_LEN)?;
    ALL_BLOCKS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((block.address(), block.address() + block.len()));
    Ok((block, None))
}
/// Removed trampolines of routed jump sites wait for this many before a stop reclaims them.
const RECLAIM_BATCH: usize = 16;
/// Retired latency sinks (about 600 bytes each with a probe's buckets) wait for this many.
const SINK_BATCH: usize = 64;

/// What a new trampoline continues with.
enum Tail<'a> {
    /// The function's relocated prologue.
    Relocated(&'a Prologue),
    /// A jump through this slot (a routed stub); the trampoline keeps it.
    ThroughSlot(Box<AtomicUsize>),
}

/// How a detour enters its trampoline.
enum Route {
    /// A `jmp` over the relocated prologue, written with the world stopped.
    Prologue {
        prologue: Prologue,
        jmp: [u8; JMP_LEN],
    },
    /// The function's first instruction is a `jmp rel32` (a prepared function's stub): the
    /// site is routed through the trampoline ([`crate::write`]'s interposition); the tail jumps
    /// through a slot that follows the site's target.
    Jump,
}

/// An installed entry detour. Dropping it leaves it installed; [`Detour::remove`] removes it.
pub struct Detour {
    function: usize,
    route: Route,
    trampoline: Option<Trampoline>,
}

impl std::fmt::Debug for Detour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detour")
            .field("function", &format_args!("{:#x}", self.function))
            .field("through_stub", &matches!(self.route, Route::Jump))
            .finish_non_exhaustive()
    }
}

/// Writes `bytes` at `function` with the world stopped, once no thread can resume in `busy`.
fn write_stopped(
    function: usize,
    expected: &[u8],
    bytes: &[u8; JMP_LEN],
    busy: std::ops::Range<usize>,
) -> Result<()> {
    let mut current = [0u8; 32];
    for _attempt in 0..1000 {
        let mut w = crate::write::lock();
        let window = w.open_code_window(function, JMP_LEN)?;
        let outcome = stop_the_world(|world| {
            if world.resumable_in(busy.clone()).is_some() {
                return Ok(false);
            }
            for (i, b) in current[..expected.len()].iter_mut().enumerate() {
                // SAFETY: the function's bytes are mapped (the window covers them).
                *b = unsafe { std::ptr::read_volatile((function + i) as *const u8) };
            }
            if current[..expected.len()] != *expected {
                return Err(());
            }
            window.write(function, bytes).map_err(|_| ())?;
            membarrier::sync_cores().map_err(|_| ())?;
            Ok(true)
        });
        window.close()?;
        drop(w);
        match outcome? {
            Ok(true) => return Ok(()),
            Ok(false) => std::thread::sleep(std::time::Duration::from_micros(200)),
            Err(()) => {
                return Err(Error::new(ErrorKind::UnexpectedBytes {
                    address: function,
                    expected: expected[..JMP_LEN].try_into().expect("5 bytes"),
                    found: current[..JMP_LEN].try_into().expect("5 bytes"),
                }))
            }
        }
    }
    Err(Error::new(ErrorKind::Unsupported {
        what: "a thread stayed inside the bytes being replaced for 1000 attempts",
    }))
}

fn read_byte(address: usize) -> Result<u8> {
    Ok(read_code(address, 1)?[0])
}

/// Decoded entries, by function and size: `None` for a function that starts with a `jmp rel32`
/// (detoured through it), else its prologue. Cached: adding and removing probes on one function
/// decodes it once (a stale entry is caught by the byte comparison when the detour is written,
/// and dropped).
static DECODED: Mutex<Option<Decoded>> = Mutex::new(None);

type Decoded = std::collections::HashMap<(usize, usize), Option<Prologue>>;

fn decoded(function: usize, size: usize) -> Result<Option<Prologue>> {
    let mut cache = DECODED.lock().unwrap_or_else(|p| p.into_inner());
    let cache = cache.get_or_insert_with(Default::default);
    if let Some(d) = cache.get(&(function, size)) {
        return Ok(d.clone());
    }
    let d = if size >= JMP_LEN && read_byte(function)? == 0xe9 {
        None
    } else {
        Some(Prologue::of(function, size)?)
    };
    cache.insert((function, size), d.clone());
    Ok(d)
}

fn forget_decoded(function: usize) {
    if let Some(cache) = DECODED.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        cache.retain(|k, _| k.0 != function);
    }
}

impl Detour {
    /// Detours the function at `function` (`size` bytes, from its symbol) to a trampoline that
    /// runs `hooks` (see the module docs).
    ///
    /// A function whose first instruction is a `jmp rel32` — the stub of a prepared (hot or
    /// multiverse) function — is detoured by routing that jump through the trampoline instead:
    /// no prologue is relocated, no thread is stopped, and the stub's target may keep changing
    /// (hot update, multiverse commit) while it is detoured.
    ///
    /// # Errors
    /// [`ErrorKind::Unrelocatable`] with the reason; [`ErrorKind::InvalidArgument`] if the
    /// function is already detoured or holds a registered patch site in its prologue.
    ///
    /// # Safety
    ///
    /// `function..function + size` must be one whole function of mapped code (its entry and
    /// its extent, as its symbol says), or a registered jump stub (`size` = 5): the prologue's
    /// relocation and the check that no branch lands inside it both rely on it. The safe
    /// [`Detour::install_at_function`] checks this against the symbol tables.
    pub unsafe fn install(function: usize, size: usize, hooks: DetourHooks) -> Result<Detour> {
        let prologue = if decoded(function, size)?.is_none() {
            None
        } else {
            let prologue = decoded(function, size)?.expect("not a jump");
            for a in function..function + prologue.len() {
                if crate::write::is_registered(a) {
                    return Err(Error::new(ErrorKind::InvalidArgument {
                        reason: format!(
                            "{function:#x} holds the registered patch site {a:#x} (`{}`) in \
                             its prologue",
                            crate::write::current(a).expect("registered")
                        ),
                    }));
                }
            }
            Some(prologue)
        };
        {
            let mut d = DETOURED.lock().unwrap_or_else(|p| p.into_inner());
            if !d.get_or_insert_with(HashSet::new).insert(function) {
                return Err(Error::new(ErrorKind::InvalidArgument {
                    reason: format!("{function:#x} is already detoured"),
                }));
            }
        }
        let result = match prologue {
            Some(prologue) => Detour::install_prologue(function, prologue, hooks),
            None => Detour::install_through_jump(function, hooks),
        };
        if result.is_err() {
            forget(function);
        }
        result
    }

    fn new_trampoline(function: usize, hooks: DetourHooks, tail: Tail<'_>) -> Result<Trampoline> {
        let active = Box::new(Counter::new());
        let hook_box = Box::new(hooks.on_entry.clone());
        let latency = Box::new(AtomicUsize::new(0));
        let (block, unwind) = trampoline_block(function)?;
        let parts = trampoline::Parts {
            counter: &hooks.counter,
            slow: Arc::as_ptr(&hooks.slow) as usize,
            active: &active,
            hook: &*hook_box as *const Arc<EntryHook> as usize,
            latency: &*latency as *const AtomicUsize as usize,
            entry_thunk: entry_thunk as *const () as usize,
            adopt_thunk: adopt_thunk as *const () as usize,
        };
        let code_tail = match &tail {
            Tail::Relocated(p) => trampoline::Tail::Relocated(p),
            Tail::ThroughSlot(s) => {
                trampoline::Tail::ThroughSlot(&**s as *const AtomicUsize as usize)
            }
        };
        let give_back = |block, unwind: Option<Unwind>| {
            FREE_BLOCKS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((block, unwind))
        };
        let code = match trampoline::assemble(function, block.address(), &parts, code_tail) {
            Ok(code) if code.bytes.len() <= block.len() => code,
            Ok(code) => {
                give_back(block, unwind);
                return Err(Error::new(ErrorKind::Unrelocatable {
                    function,
                    reason: format!("trampoline of {} bytes too long", code.bytes.len()),
                }));
            }
            Err(e) => {
                give_back(block, unwind);
                return Err(e);
            }
        };
        // The prefix's unwind info: the block's own if it describes the same layout (every
        // trampoline of the process has the same prefix layout), else registered anew.
        let unwind = match unwind {
            Some(u) if u.len == code.tail && u.rules == code.rules => u,
            other => {
                if let Some(old) = other {
                    // SAFETY: no thread is in the block (it was free) and nothing branches to
                    // it until the caller publishes it.
                    unsafe { old.registration.deregister() };
                }
                register_unwind(block.address(), code.tail, &code.rules)
            }
        };
        // SAFETY: the block is fresh or free (no thread can be in it: see `reclaim`); nothing
        // branches to it until the caller publishes it.
        unsafe { block.write(0, &code.bytes)? };
        let slot = match tail {
            Tail::ThroughSlot(s) => Some(s),
            Tail::Relocated(_) => None,
        };
        Ok(Trampoline {
            block,
            unwind,
            tail: code.tail,
            active,
            latency,
            latency_sink: Mutex::new(None),
            slot,
            _hooks: hooks,
            _hook_box: hook_box,
        })
    }

    fn install_prologue(function: usize, prologue: Prologue, hooks: DetourHooks) -> Result<Detour> {
        let t = Detour::new_trampoline(function, hooks, Tail::Relocated(&prologue))?;
        let rel = (t.block.address() as i64 - (function + JMP_LEN) as i64) as i32;
        let mut jmp = [0xe9, 0, 0, 0, 0];
        jmp[1..].copy_from_slice(&rel.to_le_bytes());
        let original = prologue.original().to_vec();
        if let Err(e) = write_stopped(
            function,
            &original,
            &jmp,
            function + 1..function + prologue.len(),
        ) {
            release(t);
            if matches!(e.kind(), ErrorKind::UnexpectedBytes { .. }) {
                forget_decoded(function);
            }
            return Err(e);
        }
        Ok(Detour {
            function,
            route: Route::Prologue { prologue, jmp },
            trampoline: Some(t),
        })
    }

    fn install_through_jump(function: usize, hooks: DetourHooks) -> Result<Detour> {
        // The stub is registered (idempotently) so the engine knows its meaning; the only bytes
        // written there for the detour are a jump to a trampoline that ends by jumping to the
        // stub's own target, and the stub's own bytes again.
        crate::write::register(function)?;
        let slot = Box::new(AtomicUsize::new(0));
        let t = Detour::new_trampoline(function, hooks, Tail::ThroughSlot(slot))?;
        let slot = t.slot.as_deref().expect("a routed trampoline has a slot");
        if let Err(e) = crate::write::interpose(function, t.block.address(), slot) {
            release(t);
            return Err(e);
        }
        Ok(Detour {
            function,
            route: Route::Jump,
            trampoline: Some(t),
        })
    }

    /// Makes the trampoline time every call for `sink` in machine code (shadow frame pushed
    /// and return address replaced, no hook call), or stop (`None`). Returns false if this
    /// process's thread-local layout does not allow it: then time calls from the entry hook
    /// ([`Entry::on_return`]), which is always correct (a call the trampoline already timed is
    /// recognised and not timed twice). The trampoline keeps `sink` alive while it uses it.
    pub fn set_latency(&self, sink: Option<&Sink>) -> bool {
        if crate::shadow::fast_offset().is_none() {
            return false;
        }
        let t = self.trampoline.as_ref().expect("installed");
        let mut kept = t.latency_sink.lock().unwrap_or_else(|p| p.into_inner());
        let value = sink.map_or(0, Sink::address);
        t.latency.store(value, std::sync::atomic::Ordering::Release);
        // The previous sink's handle goes: a thread that read it just before may still push it,
        // which is why retired sinks are freed only when no thread is in a trampoline.
        *kept = sink.cloned();
        true
    }

    /// The detoured function's address.
    pub fn function(&self) -> usize {
        self.function
    }

    /// Whether the detour routes the function's entry stub (a prepared function) rather than
    /// overwriting its prologue.
    pub fn through_stub(&self) -> bool {
        matches!(self.route, Route::Jump)
    }

    /// The trampoline's address range.
    pub fn trampoline(&self) -> std::ops::Range<usize> {
        let b = &self.trampoline.as_ref().expect("installed").block;
        b.address()..b.address() + b.len()
    }

    /// Removes the detour: the function's bytes are back, byte for byte (for a stub: the jump
    /// to its current target). The trampoline is reused once no thread can be inside it.
    pub fn remove(mut self) -> Result<()> {
        let t = self.trampoline.take().expect("installed");
        match &self.route {
            Route::Prologue { prologue, jmp } => {
                // The jump is one instruction: no thread can be inside it, so the original
                // bytes go back through the int3 protocol without stopping anyone; a thread
                // arriving meanwhile continues in the trampoline's relocated prologue.
                let original: [u8; JMP_LEN] =
                    prologue.original()[..JMP_LEN].try_into().expect("5 bytes");
                let relocated = t.block.address() + t.tail;
                if let Err(e) = crate::write::replace_instruction(
                    self.function,
                    *jmp,
                    original,
                    crate::site::SiteInsn::Jmp(relocated),
                ) {
                    self.trampoline = Some(t);
                    return Err(e);
                }
                forget(self.function);
                let mut q = QUARANTINE.lock().unwrap_or_else(|p| p.into_inner());
                q.push(t);
                if q.len() >= RECLAIM_BATCH {
                    reclaim(&mut q);
                }
            }
            Route::Jump => {
                if let Err(e) = crate::write::uninterpose(self.function) {
                    self.trampoline = Some(t);
                    return Err(e);
                }
                forget(self.function);
                let mut q = QUARANTINE.lock().unwrap_or_else(|p| p.into_inner());
                q.push(t);
                if q.len() >= RECLAIM_BATCH {
                    reclaim(&mut q);
                }
            }
        }
        Ok(())
    }
}

impl Drop for Detour {
    fn drop(&mut self) {
        // Left installed: its trampoline must outlive every call that reaches it.
        if let Some(t) = self.trampoline.take() {
            std::mem::forget(t);
        }
    }
}

/// Whether a probe's detour is installed on `function` (its entry holds a jump to a
/// trampoline, or its stub is routed through one): [`crate::redirect`] refuses to redirect
/// such an entry, and to remove a redirect a probe is routed through.
pub(crate) fn is_detoured(function: usize) -> bool {
    DETOURED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .is_some_and(|d| d.contains(&function))
}

/// The bytes at `function`'s entry changed (a redirect was installed or removed): its decoded
/// entry is stale.
pub(crate) fn entry_changed(function: usize) {
    forget_decoded(function);
}

fn forget(function: usize) {
    if let Some(d) = DETOURED.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        d.remove(&function);
    }
}

/// Returns a trampoline that was never published.
fn release(t: Trampoline) {
    FREE_BLOCKS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((t.block, Some(t.unwind)));
}

/// With the world stopped: which quarantined trampolines no thread is in (none can resume inside, no
/// thread inside the hook call).
fn idle(
    q: &[Trampoline],
    blocks: &crate::counter::Blocks<'_>,
    world: &World<'_>,
    free: &mut [bool],
) {
    for (t, free) in q.iter().zip(free.iter_mut()) {
        let range = t.block.address()..t.block.address() + t.block.len();
        *free = t.active.get_in(blocks) == 0 && world.resumable_in(range).is_none();
    }
}

/// Moves the trampolines marked free to the free blocks (their references are dropped).
fn release_idle(q: &mut Vec<Trampoline>, free: &[bool]) {
    let all = std::mem::take(q);
    let mut released = Vec::new();
    for (t, &free) in all.into_iter().zip(free) {
        if free {
            released.push(t);
        } else {
            q.push(t);
        }
    }
    let mut blocks = FREE_BLOCKS.lock().unwrap_or_else(|p| p.into_inner());
    for t in released {
        // No thread can be in the block (see `idle`): its jump was removed before the stop in
        // which it was found idle, so no thread can enter it again.
        blocks.push((t.block, Some(t.unwind)));
    }
}

/// Finds (stopping the world once) and releases quarantined trampolines no thread is in, and
/// frees the retired latency sinks nothing can reach (see the module docs).
fn reclaim(q: &mut Vec<Trampoline>) {
    // Every lock the stopped world's check needs is taken before the stop: a stopped thread
    // may hold any of them otherwise.
    let sinks = crate::shadow::sink_locks();
    if q.is_empty() && sinks.retired() == 0 {
        return;
    }
    let mut free = vec![false; q.len()];
    let mut free_sinks = vec![false; sinks.retired()];
    let all = ALL_BLOCKS.lock().unwrap_or_else(|p| p.into_inner());
    let blocks = crate::counter::blocks();
    let stopped = stop_the_world(|world| {
        idle(q, &blocks, world, &mut free);
        let in_trampoline = all
            .iter()
            .any(|(start, end)| world.resumable_in(*start..*end).is_some());
        if !in_trampoline {
            crate::shadow::idle_sinks(&sinks, &mut free_sinks);
        }
    });
    drop(blocks);
    drop(all);
    if stopped.is_err() {
        free_sinks.fill(false);
    }
    // Sinks first: releasing trampolines drops their hooks, which may retire more sinks (and
    // needs the lock `sinks` holds).
    crate::shadow::free_sinks(sinks, &free_sinks);
    if stopped.is_ok() {
        release_idle(q, &free);
    }
}

/// Trampolines removed but not yet released because a thread was, or may have been, inside.
pub fn quarantined_trampolines() -> usize {
    QUARANTINE.lock().unwrap_or_else(|p| p.into_inner()).len()
}

/// Stops the world once to release every removed trampoline no thread is in, and free the
/// retired latency sinks nothing can reach (removals otherwise do this every 16 removals or
/// retired sinks, see [`reclaim_if_due`]); returns how many trampolines remain quarantined.
pub fn reclaim_trampolines() -> usize {
    let mut q = QUARANTINE.lock().unwrap_or_else(|p| p.into_inner());
    reclaim(&mut q);
    q.len()
}

/// Reclaims (as [`reclaim_trampolines`]) if 16 or more trampolines, or 64 latency sinks, wait
/// for it; returns whether it did. Cheap otherwise.
pub fn reclaim_if_due() -> bool {
    let mut q = QUARANTINE.lock().unwrap_or_else(|p| p.into_inner());
    if q.len() < RECLAIM_BATCH && crate::shadow::retired_sinks() < SINK_BATCH {
        return false;
    }
    reclaim(&mut q);
    true
}
