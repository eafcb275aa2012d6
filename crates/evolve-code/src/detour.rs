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
//! - any branch of the function (decoded over its whole symbol size) targets a byte strictly
//!   inside the overwritten instructions: it would land in the middle of the new `jmp`.
//!
//! Branches from *other* functions into the prologue and computed jumps (jump tables) cannot
//! be checked; compilers do not emit them into a prologue. The relocated instructions are
//! re-encoded with `BlockEncoder` at the trampoline's address, which fixes RIP-relative memory
//! operands and near branches (growing short branches where needed).
//!
//! # The trampoline
//!
//! ```text
//! movabs r11, &counter ; lock inc qword [r11]       -- the counting fast path (r11 is free
//! movabs r11, &slow    ; cmp byte [r11], 0 ; je tail    at entry in the SysV ABI)
//! lock inc [active] ; push the 6 argument registers and rax ; save xmm0-7
//! mov rdi, rsp ; movabs rsi, ctx ; call entry_thunk  -- hook gets the saved registers
//! restore ; lock dec [active]
//! tail: <relocated prologue> ; jmp function + len
//! ```
//!
//! The slow path saves exactly what the ABI needs to preserve the call's arguments (the hook is
//! an ordinary `extern "C"` function that preserves callee-saved registers itself).
//!
//! # Installing and removing
//!
//! Writing the `jmp` replaces several instructions, so it happens with the world stopped
//! ([`crate::stop_the_world`]), under the engine's write lock, only when no thread's RIP lies
//! strictly inside the replaced bytes (otherwise it resumes them and tries again). Removing
//! writes the original 5 bytes back the same way; the trampoline is freed only once no thread's
//! RIP lies in it and no thread is inside its hook (`active` is zero); until then it is
//! quarantined and reclaimed by a later removal.
//!
//! # Safety
//!
//! The unsafe blocks read the function's code (inside an executable mapping checked first),
//! write a trampoline before anything can reach it, dereference the register frame the
//! trampoline passes to the hook thunk, and free trampolines only under the check above.
#![allow(unsafe_code)]

use crate::error::{Error, ErrorKind, Result};
use crate::near::NearBlock;
use crate::sys::{membarrier, memory};
use crate::world::stop_the_world;
use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, FlowControl, Instruction,
    InstructionBlock,
};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes the entry `jmp` occupies.
const JMP_LEN: usize = 5;
/// Size of a trampoline block.
const TRAMPOLINE_LEN: usize = 512;

/// The relocatable first instructions of a function.
#[derive(Debug, Clone)]
pub struct Prologue {
    function: usize,
    original: Vec<u8>,
    instructions: Vec<Instruction>,
}

fn read_code(address: usize, len: usize) -> Result<Vec<u8>> {
    let maps = memory::mappings()?;
    for byte in [address, address + len - 1] {
        match memory::mapping_containing(&maps, byte) {
            Some(m) if m.protection.exec && m.protection.read => {}
            _ => return Err(Error::new(ErrorKind::NotExecutable { address: byte })),
        }
    }
    Ok((0..len)
        // SAFETY: both ends lie in one readable executable mapping (checked above; a function
        // does not span mappings), so every byte between is readable.
        .map(|i| unsafe { std::ptr::read_volatile((address + i) as *const u8) })
        .collect())
}

fn show(insn: &Instruction) -> String {
    format!("{:?}", insn.mnemonic()).to_lowercase()
}

impl Prologue {
    /// Decodes the prologue of the function at `function`, `size` bytes long (its symbol size),
    /// and checks that it can be relocated (see the module docs).
    ///
    /// # Example
    /// ```
    /// #[inline(never)]
    /// extern "C" fn f(x: u64) -> u64 { std::hint::black_box(x).wrapping_mul(3) ^ 7 }
    /// let exe = evolve_code::inspect::executable().unwrap();
    /// let sym = exe.function_containing(f as usize).unwrap();
    /// match evolve_code::Prologue::of(sym.address, sym.size) {
    ///     Ok(p) => assert!(p.len() >= 5),
    ///     Err(e) => println!("{e}"), // a tiny function may be too short
    /// }
    /// ```
    pub fn of(function: usize, size: usize) -> Result<Prologue> {
        let refuse = |reason: String| Error::new(ErrorKind::Unrelocatable { function, reason });
        if size < JMP_LEN {
            return Err(refuse(format!(
                "the function is {size} bytes long, shorter than the 5-byte jmp"
            )));
        }
        let code = read_code(function, size.min(1 << 16))?;
        let mut decoder = Decoder::with_ip(64, &code, function as u64, DecoderOptions::NONE);
        let mut instructions = Vec::new();
        let mut covered = 0;
        while covered < JMP_LEN {
            let insn = decoder.decode();
            if insn.is_invalid() {
                return Err(refuse(format!(
                    "undecodable instruction at offset {covered} ({:#x})",
                    function + covered
                )));
            }
            covered += insn.len();
            match insn.flow_control() {
                FlowControl::Call | FlowControl::IndirectCall => {
                    return Err(refuse(format!(
                        "`{}` at offset {} is a call in the overwritten bytes (its return \
                         address would point into the trampoline)",
                        show(&insn),
                        covered - insn.len()
                    )))
                }
                FlowControl::Next | FlowControl::ConditionalBranch => {}
                _ if covered >= JMP_LEN => {}
                _ => {
                    return Err(refuse(format!(
                        "the function is too short: control leaves it with `{}` after {covered} \
                         bytes, before the 5 bytes a jmp needs",
                        show(&insn)
                    )))
                }
            }
            if matches!(insn.code(), Code::Xbegin_rel32 | Code::Xbegin_rel16) {
                return Err(refuse(format!(
                    "unsupported instruction `{}` in the prologue",
                    show(&insn)
                )));
            }
            instructions.push(insn);
        }
        // No branch of the function may land strictly inside the overwritten bytes.
        let inside = (function + 1) as u64..(function + covered) as u64;
        let mut all = Decoder::with_ip(64, &code, function as u64, DecoderOptions::NONE);
        for insn in &mut all {
            let target = insn.near_branch_target();
            if !insn.is_invalid() && inside.contains(&target) {
                return Err(refuse(format!(
                    "`{}` at offset {} branches into the overwritten bytes (to offset {})",
                    show(&insn),
                    insn.ip() - function as u64,
                    target - function as u64
                )));
            }
        }
        Ok(Prologue {
            function,
            original: code[..covered].to_vec(),
            instructions,
        })
    }

    /// Bytes the relocated instructions occupy in the function (at least 5).
    pub fn len(&self) -> usize {
        self.original.len()
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The function's original bytes that the detour overwrites.
    pub fn original(&self) -> &[u8] {
        &self.original
    }

    /// The relocated instructions followed by a jump back, encoded to run at `at`.
    fn relocate(&self, at: usize) -> Result<Vec<u8>> {
        let mut insns = self.instructions.clone();
        let back =
            Instruction::with_branch(Code::Jmp_rel32_64, (self.function + self.len()) as u64)
                .map_err(|e| self.refuse(format!("{e}")))?;
        insns.push(back);
        let block = InstructionBlock::new(&insns, at as u64);
        BlockEncoder::encode(64, block, BlockEncoderOptions::NONE)
            .map(|r| r.code_buffer)
            .map_err(|e| self.refuse(format!("relocating the prologue failed: {e}")))
    }

    fn refuse(&self, reason: String) -> Error {
        Error::new(ErrorKind::Unrelocatable {
            function: self.function,
            reason,
        })
    }
}

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
}

/// A hook called on entry to a detoured function, on the calling thread, before its prologue.
pub type EntryHook = dyn Fn(&mut Entry<'_>) + Send + Sync;

/// What a detour's trampoline does.
#[derive(Clone)]
pub struct DetourHooks {
    /// Incremented (`lock inc`) by every call.
    pub counter: Arc<AtomicU64>,
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
    // SAFETY: the trampoline passes its stack frame of saved registers (layout `SavedRegs`,
    // alive for this call) and the hook box owned by its `Detour` (or its quarantine entry),
    // which outlives every thread in the trampoline.
    let (regs, hook) = unsafe { (&mut *regs, &*hook) };
    hook(&mut Entry { regs });
}

/// Everything a trampoline references; dropped only after the block is freed.
struct Trampoline {
    block: NearBlock,
    active: Box<AtomicU64>,
    _hooks: DetourHooks,
    _hook_box: Box<Arc<EntryHook>>,
}

static DETOURED: Mutex<Option<HashSet<usize>>> = Mutex::new(None);
static QUARANTINE: Mutex<Vec<Trampoline>> = Mutex::new(Vec::new());

/// An installed entry detour. Dropping it leaves it installed; [`Detour::remove`] removes it.
pub struct Detour {
    function: usize,
    prologue: Prologue,
    jmp: [u8; JMP_LEN],
    trampoline: Option<Trampoline>,
}

impl std::fmt::Debug for Detour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detour")
            .field("function", &format_args!("{:#x}", self.function))
            .field("len", &self.prologue.len())
            .finish_non_exhaustive()
    }
}

struct Emitter(Vec<u8>);

impl Emitter {
    fn bytes(&mut self, b: &[u8]) -> &mut Emitter {
        self.0.extend_from_slice(b);
        self
    }
    fn movabs_r11(&mut self, v: usize) -> &mut Emitter {
        self.bytes(&[0x49, 0xbb]).bytes(&(v as u64).to_le_bytes())
    }
}

fn trampoline_prefix(
    hooks: &DetourHooks,
    active: &AtomicU64,
    hook_box: &Arc<EntryHook>,
) -> Vec<u8> {
    let mut e = Emitter(Vec::with_capacity(256));
    e.movabs_r11(Arc::as_ptr(&hooks.counter) as usize)
        .bytes(&[0xf0, 0x49, 0xff, 0x03]) // lock inc qword [r11]
        .movabs_r11(Arc::as_ptr(&hooks.slow) as usize)
        .bytes(&[0x41, 0x80, 0x3b, 0x00]) // cmp byte [r11], 0
        .bytes(&[0x0f, 0x84, 0, 0, 0, 0]); // je tail (patched below)
    let je_end = e.0.len();
    e.movabs_r11(active as *const AtomicU64 as usize)
        .bytes(&[0xf0, 0x49, 0xff, 0x03]) // lock inc qword [r11]
        .bytes(&[0x57, 0x56, 0x52, 0x51, 0x41, 0x50, 0x41, 0x51, 0x50]) // push rdi..r9, rax
        .bytes(&[0x48, 0x81, 0xec, 0x80, 0, 0, 0]); // sub rsp, 128
    for i in 0..8u8 {
        e.bytes(&[0xf3, 0x0f, 0x7f, 0x44 | (i << 3), 0x24, i * 16]); // movdqu [rsp+16i], xmm_i
    }
    e.bytes(&[0x48, 0x89, 0xe7]) // mov rdi, rsp
        .bytes(&[0x48, 0xbe])
        .bytes(&(hook_box as *const Arc<EntryHook> as u64).to_le_bytes()) // movabs rsi, hook
        .bytes(&[0x48, 0xb8])
        .bytes(&(entry_thunk as *const () as u64).to_le_bytes()) // movabs rax, thunk
        .bytes(&[0xff, 0xd0]); // call rax
    for i in 0..8u8 {
        e.bytes(&[0xf3, 0x0f, 0x6f, 0x44 | (i << 3), 0x24, i * 16]); // movdqu xmm_i, [rsp+16i]
    }
    e.bytes(&[0x48, 0x81, 0xc4, 0x80, 0, 0, 0]) // add rsp, 128
        .bytes(&[0x58, 0x41, 0x59, 0x41, 0x58, 0x59, 0x5a, 0x5e, 0x5f]) // pop rax, r9..rdi
        .movabs_r11(active as *const AtomicU64 as usize)
        .bytes(&[0xf0, 0x49, 0xff, 0x0b]); // lock dec qword [r11]
    let rel = (e.0.len() - je_end) as u32;
    e.0[je_end - 4..je_end].copy_from_slice(&rel.to_le_bytes());
    e.0
}

/// Writes `bytes` at `function` with the world stopped, once no RIP lies in `busy`.
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
        let outcome = stop_the_world(|rips| {
            if rips.iter().any(|r| busy.contains(r)) {
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

impl Detour {
    /// Detours the function at `function` (`size` bytes, from its symbol) to a trampoline that
    /// runs `hooks` (see the module docs).
    ///
    /// # Errors
    /// [`ErrorKind::Unrelocatable`] with the reason; [`ErrorKind::InvalidArgument`] if the
    /// function is already detoured or holds a registered patch site (prepared functions keep
    /// their stub).
    ///
    /// # Example
    /// ```
    /// use std::sync::{Arc, atomic::{AtomicBool, AtomicU64, Ordering}};
    /// #[inline(never)]
    /// extern "C" fn f(x: u64) -> u64 { std::hint::black_box(x).wrapping_mul(0x9e37_79b9) ^ x >> 7 }
    /// let sym = evolve_code::inspect::executable().unwrap().function_containing(f as usize).unwrap().clone();
    /// let hooks = evolve_code::DetourHooks {
    ///     counter: Arc::new(AtomicU64::new(0)),
    ///     slow: Arc::new(AtomicBool::new(false)),
    ///     on_entry: Arc::new(|_| {}),
    /// };
    /// let d = evolve_code::Detour::install(sym.address, sym.size, hooks.clone()).unwrap();
    /// let g: extern "C" fn(u64) -> u64 = std::hint::black_box(f);
    /// assert_eq!(g(5), 5u64.wrapping_mul(0x9e37_79b9) ^ 0);
    /// assert_eq!(hooks.counter.load(Ordering::Relaxed), 1);
    /// d.remove().unwrap();
    /// ```
    pub fn install(function: usize, size: usize, hooks: DetourHooks) -> Result<Detour> {
        let prologue = Prologue::of(function, size)?;
        for a in function..function + prologue.len() {
            if crate::write::is_registered(a) {
                return Err(Error::new(ErrorKind::InvalidArgument {
                    reason: format!(
                        "{function:#x} holds the registered patch site {a:#x} (a prepared \
                         function: probe it through its stub)"
                    ),
                }));
            }
        }
        {
            let mut d = DETOURED.lock().unwrap_or_else(|p| p.into_inner());
            if !d.get_or_insert_with(HashSet::new).insert(function) {
                return Err(Error::new(ErrorKind::InvalidArgument {
                    reason: format!("{function:#x} is already detoured"),
                }));
            }
        }
        let result = Detour::install_unregistered(function, prologue, hooks);
        if result.is_err() {
            forget(function);
        }
        result
    }

    fn install_unregistered(
        function: usize,
        prologue: Prologue,
        hooks: DetourHooks,
    ) -> Result<Detour> {
        let block = NearBlock::alloc(function, TRAMPOLINE_LEN)?;
        let active = Box::new(AtomicU64::new(0));
        let hook_box = Box::new(hooks.on_entry.clone());
        let mut code = trampoline_prefix(&hooks, &active, &hook_box);
        code.extend(prologue.relocate(block.address() + code.len())?);
        if code.len() > block.len() {
            return Err(prologue.refuse(format!("trampoline of {} bytes too long", code.len())));
        }
        // SAFETY: the block is fresh; nothing branches to it until the jmp below is written.
        unsafe { block.write(0, &code)? };
        let rel = (block.address() as i64 - (function + JMP_LEN) as i64) as i32;
        let mut jmp = [0xe9, 0, 0, 0, 0];
        jmp[1..].copy_from_slice(&rel.to_le_bytes());
        let original = prologue.original().to_vec();
        write_stopped(
            function,
            &original,
            &jmp,
            function + 1..function + prologue.len(),
        )?;
        Ok(Detour {
            function,
            prologue,
            jmp,
            trampoline: Some(Trampoline {
                block,
                active,
                _hooks: hooks,
                _hook_box: hook_box,
            }),
        })
    }

    /// The detoured function's address.
    pub fn function(&self) -> usize {
        self.function
    }

    /// The trampoline's address range.
    pub fn trampoline(&self) -> std::ops::Range<usize> {
        let b = &self.trampoline.as_ref().expect("installed").block;
        b.address()..b.address() + b.len()
    }

    /// Removes the detour: the function's original bytes are back, byte for byte. The
    /// trampoline is freed as soon as no thread is inside it (possibly by a later removal).
    pub fn remove(mut self) -> Result<()> {
        let original: [u8; JMP_LEN] = self.prologue.original()[..JMP_LEN]
            .try_into()
            .expect("5 bytes");
        write_stopped(self.function, &self.jmp, &original, 0..0)?;
        forget(self.function);
        let t = self.trampoline.take().expect("installed");
        let mut q = QUARANTINE.lock().unwrap_or_else(|p| p.into_inner());
        q.push(t);
        reclaim(&mut q);
        Ok(())
    }
}

fn forget(function: usize) {
    if let Some(d) = DETOURED.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        d.remove(&function);
    }
}

/// Frees quarantined trampolines that no thread is in.
fn reclaim(q: &mut Vec<Trampoline>) {
    if q.is_empty() {
        return;
    }
    let ranges: Vec<(usize, usize)> = q
        .iter()
        .map(|t| (t.block.address(), t.block.address() + t.block.len()))
        .collect();
    let mut free = vec![false; q.len()];
    let stopped = stop_the_world(|rips| {
        for (i, &(start, end)) in ranges.iter().enumerate() {
            free[i] = q[i].active.load(Ordering::Acquire) == 0
                && !rips.iter().any(|r| (start..end).contains(r));
        }
    });
    if stopped.is_err() {
        return;
    }
    let all = std::mem::take(q);
    for (t, free) in all.into_iter().zip(free) {
        if free {
            // SAFETY: with the world stopped, no thread's RIP was in the block and none was in
            // its hook (`active` is zero, and only code in the block increments it); the jmp to
            // it was removed before, so no thread can enter it again.
            unsafe { t.block.free() };
        } else {
            q.push(t);
        }
    }
}

/// Trampolines removed but not yet freed because a thread was inside them.
pub fn quarantined_trampolines() -> usize {
    QUARANTINE.lock().unwrap_or_else(|p| p.into_inner()).len()
}
