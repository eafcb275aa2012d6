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
//! mov r11, fs:[block] ; test r11, r11 ; jz adopt  -- the counting fast path: a plain `inc` in
//! inc qword [r11 + slot]                            the thread's counter block (crate::counter);
//! counted: if a latency sink is set (see below):      r11 is free at entry in the SysV ABI
//!   push rax, rcx, rdx ; push a shadow frame ; rdtsc ; return address = exit stub ; pop
//! check: movabs r11, &slow ; cmp byte [r11], 0
//! je tail
//! active += 1 (per thread) ; push the 6 argument registers and rax ; save xmm0-7
//! mov rdi, rsp ; movabs rsi, hook ; call entry_thunk  -- hook gets the saved registers
//! restore ; active -= 1 ; jmp tail
//! adopt: lock inc [counter.shared] ; (saved) call adopt ; jmp check  -- a thread's first call
//! tail: <relocated prologue> ; jmp function + len     -- or, through a stub: jmp [slot]
//! ```
//!
//! **Latency in machine code.** With a sink set ([`Detour::set_latency`]), the trampoline times
//! the call itself: it reads the thread's shadow-stack state at a fixed offset from the thread
//! pointer ([`crate::shadow`]), writes the frame (return address, its slot, `rdtsc`, sink),
//! bumps the depth and replaces the return address with the thread's exit stub for that depth,
//! saving only rax, rcx and rdx. A thread without a shadow block yet, 128 timed frames deep, or
//! with dead frames below (unwound by a foreign unwinder) takes the hook instead, whose Rust
//! side handles those cases and does not time a call twice.
//!
//! The slow path saves exactly what the ABI needs to preserve the call's arguments (the hook is
//! an ordinary `extern "C"` function that preserves callee-saved registers itself). The prefix
//! (everything before the tail) has unwind info registered with `__register_frame`, so a
//! backtrace or a panic in a hook passes through the trampoline to the probed call's caller.
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
//! unwind info and are reused by later trampolines in reach.
//!
//! # Safety
//!
//! The unsafe blocks read the function's code (inside an executable mapping checked first),
//! write a trampoline before anything can reach it, dereference the register frame the
//! trampoline passes to the hook thunk, register unwind info that lives forever, and reuse
//! trampolines only under the check above.
#![allow(unsafe_code)]

use crate::counter::Counter;
use crate::error::{Error, ErrorKind, Result};
use crate::near::NearBlock;
use crate::sys::world::stop_the_world;
use crate::sys::{membarrier, memory};
use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, FlowControl, Instruction,
    InstructionBlock,
};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};

/// Bytes the entry `jmp` occupies.
const JMP_LEN: usize = 5;
/// Size of a trampoline block.
const TRAMPOLINE_LEN: usize = 1024;

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
    /// The latency sink the trampoline times calls for (a `&'static Sink`, 0: none).
    latency: Box<AtomicUsize>,
    _hooks: DetourHooks,
    _hook_box: Box<Arc<EntryHook>>,
}

static DETOURED: Mutex<Option<HashSet<usize>>> = Mutex::new(None);
static QUARANTINE: Mutex<Vec<Trampoline>> = Mutex::new(Vec::new());
/// Trampoline blocks no thread can be in, with their unwind info registered: reused first.
static FREE_BLOCKS: Mutex<Vec<(NearBlock, Unwind)>> = Mutex::new(Vec::new());

/// The `.eh_frame` registered for a trampoline block, and the prefix layout it describes.
struct Unwind {
    eh: &'static [u8],
    len: usize,
    rules: Vec<(usize, u32)>,
}
/// Removed trampolines of routed jump sites wait for this many before a stop reclaims them.
const RECLAIM_BATCH: usize = 16;

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

/// Machine code with its call-frame rule (CFA offset from `rsp`) after every instruction that
/// changes it.
struct Emitter {
    code: Vec<u8>,
    cfa: u32,
    rules: Vec<(usize, u32)>,
}

impl Emitter {
    fn bytes(&mut self, b: &[u8]) -> &mut Emitter {
        self.code.extend_from_slice(b);
        self
    }
    fn movabs_r11(&mut self, v: usize) -> &mut Emitter {
        self.bytes(&[0x49, 0xbb]).bytes(&(v as u64).to_le_bytes())
    }
    /// The stack pointer moved down by `n` bytes (`n < 0`: up) with the last instruction.
    fn stack(&mut self, n: i32) -> &mut Emitter {
        self.cfa = (self.cfa as i32 + n) as u32;
        self.rules.push((self.code.len(), self.cfa));
        self
    }
    fn here(&self) -> usize {
        self.code.len()
    }
    /// `push rax; push rcx; push rdx`: the scratch registers the latency fast path uses.
    fn save_scratch(&mut self) -> &mut Emitter {
        self.bytes(&[0x50])
            .stack(8)
            .bytes(&[0x51])
            .stack(8)
            .bytes(&[0x52])
            .stack(8)
    }
    /// `pop rdx; pop rcx; pop rax`: undoes [`Emitter::save_scratch`].
    fn restore_scratch(&mut self) -> &mut Emitter {
        self.bytes(&[0x5a])
            .stack(-8)
            .bytes(&[0x59])
            .stack(-8)
            .bytes(&[0x58])
            .stack(-8)
    }
    /// A `jcc`/`jmp rel32` whose 4-byte displacement ends here, patched to `to` later.
    fn fix(&mut self, at_end: usize, to: usize) {
        let rel = (to as i64 - at_end as i64) as i32;
        self.code[at_end - 4..at_end].copy_from_slice(&rel.to_le_bytes());
    }
    /// `mov r11, fs:[offset]`: the thread's counter block.
    fn thread_block(&mut self, offset: i32) -> &mut Emitter {
        self.bytes(&[0x64, 0x4c, 0x8b, 0x1c, 0x25])
            .bytes(&offset.to_le_bytes())
    }
    /// Adds `delta` (±1) to a counter: in the thread's block if it has one, else shared.
    fn count(&mut self, c: &Counter, delta: i8, tls: Option<i32>) -> &mut Emitter {
        let modrm_block = if delta > 0 { 0x83 } else { 0x8b }; // inc / dec qword [r11 + disp32]
        let modrm_shared = if delta > 0 { 0x03 } else { 0x0b }; // inc / dec qword [r11]
        if let (Some(offset), Some(slot)) = (tls, c.slot_offset()) {
            self.thread_block(offset)
                .bytes(&[0x4d, 0x85, 0xdb]) // test r11, r11
                .bytes(&[0x74, 0]); // jz shared
            let jz = self.here();
            self.bytes(&[0x49, 0xff, modrm_block])
                .bytes(&slot.to_le_bytes())
                .bytes(&[0xeb, 0]); // jmp done
            let jmp = self.here();
            self.code[jz - 1] = (jmp - jz) as u8;
            self.movabs_r11(c.shared_address())
                .bytes(&[0xf0, 0x49, 0xff, modrm_shared]);
            let done = self.here();
            self.code[jmp - 1] = (done - jmp) as u8;
            self
        } else {
            self.movabs_r11(c.shared_address())
                .bytes(&[0xf0, 0x49, 0xff, modrm_shared])
        }
    }
    /// Saves the argument registers, calls `thunk(saved registers, rsi)`, restores them.
    fn call_saved(&mut self, thunk: usize, rsi: usize) -> &mut Emitter {
        for r in [
            &[0x57][..],
            &[0x56],
            &[0x52],
            &[0x51],
            &[0x41, 0x50],
            &[0x41, 0x51],
            &[0x50],
        ] {
            self.bytes(r).stack(8); // push rdi, rsi, rdx, rcx, r8, r9, rax
        }
        self.bytes(&[0x48, 0x81, 0xec, 0x80, 0, 0, 0]).stack(128); // sub rsp, 128
        for i in 0..8u8 {
            self.bytes(&[0xf3, 0x0f, 0x7f, 0x44 | (i << 3), 0x24, i * 16]); // movdqu [rsp+16i], xmm_i
        }
        self.bytes(&[0x48, 0x89, 0xe7]) // mov rdi, rsp
            .bytes(&[0x48, 0xbe])
            .bytes(&(rsi as u64).to_le_bytes()) // movabs rsi, ...
            .bytes(&[0x48, 0xb8])
            .bytes(&(thunk as u64).to_le_bytes()) // movabs rax, thunk
            .bytes(&[0xff, 0xd0]); // call rax
        for i in 0..8u8 {
            self.bytes(&[0xf3, 0x0f, 0x6f, 0x44 | (i << 3), 0x24, i * 16]); // movdqu xmm_i, [rsp+16i]
        }
        self.bytes(&[0x48, 0x81, 0xc4, 0x80, 0, 0, 0]).stack(-128); // add rsp, 128
        for r in [
            &[0x58][..],
            &[0x41, 0x59],
            &[0x41, 0x58],
            &[0x59],
            &[0x5a],
            &[0x5e],
            &[0x5f],
        ] {
            self.bytes(r).stack(-8); // pop rax, r9, r8, rcx, rdx, rsi, rdi
        }
        self
    }
}

/// The trampoline up to its tail (relocated prologue, or jump through the slot), with its
/// call-frame rules. Its length and rules are the same for every trampoline of the process.
fn trampoline_prefix(
    hooks: &DetourHooks,
    active: &Counter,
    hook_box: &Arc<EntryHook>,
    latency: &AtomicUsize,
) -> Emitter {
    let tls = crate::counter::tls_offset();
    let shadow = crate::shadow::fast_offset();
    let mut e = Emitter {
        code: Vec::with_capacity(400),
        cfa: 8,
        rules: Vec::new(),
    };
    let per_thread = tls.is_some() && hooks.counter.per_thread();
    let mut adopt_jz = None;
    if let (true, Some(offset), Some(slot)) = (per_thread, tls, hooks.counter.slot_offset()) {
        // The counting fast path: a plain increment in the thread's own block.
        e.thread_block(offset)
            .bytes(&[0x4d, 0x85, 0xdb]) // test r11, r11
            .bytes(&[0x0f, 0x84, 0, 0, 0, 0]); // jz adopt
        adopt_jz = Some(e.here());
        e.bytes(&[0x49, 0xff, 0x83]).bytes(&slot.to_le_bytes()); // inc qword [r11 + slot]
    } else {
        e.movabs_r11(hooks.counter.shared_address())
            .bytes(&[0xf0, 0x49, 0xff, 0x03]); // lock inc qword [r11]
    }
    // Timing: push a shadow frame and hijack the return address, in machine code (see
    // `crate::shadow`); anything unusual (no block yet, too deep, dead frames below) goes to
    // the hook, whose Rust side handles it.
    let mut to_check = Vec::new();
    let mut to_hook = Vec::new();
    let counted = e.here();
    if let Some(off) = shadow {
        let (frames, stubs, top) = (off, off + 8, off + 16);
        e.movabs_r11(latency as *const AtomicUsize as usize)
            .bytes(&[0x4d, 0x8b, 0x1b]) // mov r11, [r11]: the sink
            .bytes(&[0x4d, 0x85, 0xdb]) // test r11, r11
            .bytes(&[0x0f, 0x84, 0, 0, 0, 0]); // jz check
        to_check.push(e.here());
        e.save_scratch()
            .bytes(&[0x64, 0x48, 0x8b, 0x0c, 0x25]) // mov rcx, fs:[frames]
            .bytes(&frames.to_le_bytes())
            .bytes(&[0x48, 0x85, 0xc9]) // test rcx, rcx
            .bytes(&[0x0f, 0x84, 0, 0, 0, 0]); // jz fallback
        let mut to_fallback = vec![e.here()];
        e.bytes(&[0x64, 0x48, 0x8b, 0x04, 0x25]) // mov rax, fs:[top]
            .bytes(&top.to_le_bytes())
            .bytes(&[0x48, 0x3d])
            .bytes(&(crate::shadow::DEPTH as u32).to_le_bytes()) // cmp rax, DEPTH
            .bytes(&[0x0f, 0x83, 0, 0, 0, 0]); // jae fallback
        to_fallback.push(e.here());
        e.bytes(&[0x48, 0x8d, 0x54, 0x24, 0x18]) // lea rdx, [rsp + 24]: the return slot
            .bytes(&[0x48, 0xc1, 0xe0, 0x05]) // shl rax, 5: top * size_of::<Frame>()
            .bytes(&[0x74, 0]); // jz push (top == 0)
        let jz_push = e.here();
        e.bytes(&[0x48, 0x39, 0x54, 0x01, 0xe8]) // cmp [rcx + rax - 24], rdx: frames[top-1].slot
            .bytes(&[0x0f, 0x86, 0, 0, 0, 0]); // jbe fallback (a dead frame)
        to_fallback.push(e.here());
        let push = e.here();
        e.code[jz_push - 1] = (push - jz_push) as u8;
        e.bytes(&[0x48, 0x01, 0xc1]) // add rcx, rax: &frames[top]
            .bytes(&[0x48, 0x89, 0x51, 0x08]) // mov [rcx + 8], rdx: slot
            .bytes(&[0x4c, 0x89, 0x59, 0x18]) // mov [rcx + 24], r11: sink
            .bytes(&[0x48, 0x8b, 0x54, 0x24, 0x18]) // mov rdx, [rsp + 24]
            .bytes(&[0x48, 0x89, 0x11]) // mov [rcx], rdx: ret
            .bytes(&[0x0f, 0x31]) // rdtsc
            .bytes(&[0x48, 0xc1, 0xe2, 0x20]) // shl rdx, 32
            .bytes(&[0x48, 0x09, 0xd0]) // or rax, rdx
            .bytes(&[0x48, 0x89, 0x41, 0x10]) // mov [rcx + 16], rax: entered
            .bytes(&[0x64, 0x48, 0x8b, 0x04, 0x25]) // mov rax, fs:[top]
            .bytes(&top.to_le_bytes())
            .bytes(&[0x48, 0x8d, 0x50, 0x01]) // lea rdx, [rax + 1]
            .bytes(&[0x64, 0x48, 0x89, 0x14, 0x25]) // mov fs:[top], rdx
            .bytes(&top.to_le_bytes())
            .bytes(&[0x48, 0xc1, 0xe0, 0x04]) // shl rax, 4: top * STUB
            .bytes(&[0x64, 0x48, 0x03, 0x04, 0x25]) // add rax, fs:[stubs]
            .bytes(&stubs.to_le_bytes())
            .bytes(&[0x48, 0xff, 0xc0]) // inc rax: exit stub `top` (after its padding byte)
            .bytes(&[0x48, 0x89, 0x44, 0x24, 0x18]) // mov [rsp + 24], rax: the return address
            .restore_scratch()
            .bytes(&[0xe9, 0, 0, 0, 0]); // jmp check
        to_check.push(e.here());
        let fallback = e.here();
        for at in to_fallback {
            e.fix(at, fallback);
        }
        e.rules.push((fallback, 32));
        e.cfa = 32;
        e.restore_scratch().bytes(&[0xe9, 0, 0, 0, 0]); // jmp hook
        to_hook.push(e.here());
    }
    let check = e.here();
    for at in to_check {
        e.fix(at, check);
    }
    e.movabs_r11(Arc::as_ptr(&hooks.slow) as usize)
        .bytes(&[0x41, 0x80, 0x3b, 0x00]) // cmp byte [r11], 0
        .bytes(&[0x0f, 0x84, 0, 0, 0, 0]); // je tail
    let je_tail = e.here();
    let hook = e.here();
    for at in to_hook {
        e.fix(at, hook);
    }
    e.count(active, 1, tls)
        .call_saved(
            entry_thunk as *const () as usize,
            hook_box as *const Arc<EntryHook> as usize,
        )
        .count(active, -1, tls)
        .bytes(&[0xe9, 0, 0, 0, 0]); // jmp tail
    let jmp_tail = e.here();
    if let Some(jz) = adopt_jz {
        // First probed call of a thread without a block: count it shared, adopt a block.
        let adopt = e.here();
        e.fix(jz, adopt);
        e.movabs_r11(hooks.counter.shared_address())
            .bytes(&[0xf0, 0x49, 0xff, 0x03]) // lock inc qword [r11]
            .movabs_r11(active.shared_address())
            .bytes(&[0xf0, 0x49, 0xff, 0x03]) // lock inc qword [r11]
            .call_saved(adopt_thunk as *const () as usize, 0)
            .movabs_r11(active.shared_address())
            .bytes(&[0xf0, 0x49, 0xff, 0x0b]) // lock dec qword [r11]
            .bytes(&[0xe9, 0, 0, 0, 0]); // jmp counted
        let end = e.here();
        e.fix(end, counted);
    }
    let tail = e.here();
    e.fix(je_tail, tail);
    e.fix(jmp_tail, tail);
    e
}

/// `.eh_frame` bytes (CIE, one FDE, terminator) for a trampoline prefix at `at`, so that
/// unwinding and backtraces from a hook pass through the trampoline to the probed call's caller.
fn eh_frame(at: usize, len: usize, rules: &[(usize, u32)]) -> Vec<u8> {
    let mut cie = vec![0, 0, 0, 0]; // CIE id
    cie.push(1); // version
    cie.extend(b"zR\0");
    crate::shadow::uleb(&mut cie, 1); // code alignment
    cie.push(0x78); // data alignment -8
    cie.push(16); // return address column
    crate::shadow::uleb(&mut cie, 1); // augmentation data length
    cie.push(0x00); // FDE pointers: absptr
    cie.extend([0x0c, 7, 8]); // DW_CFA_def_cfa rsp, 8
    cie.extend([0x90, 1]); // DW_CFA_offset rip, cfa - 8
    while (cie.len() + 4) % 8 != 0 {
        cie.push(0);
    }
    let mut out = Vec::new();
    out.extend((cie.len() as u32).to_le_bytes());
    out.extend(&cie);
    let fde_start = out.len();
    let mut fde = Vec::new();
    fde.extend(((fde_start + 4) as u32).to_le_bytes()); // CIE pointer
    fde.extend((at as u64).to_le_bytes());
    fde.extend((len as u64).to_le_bytes());
    crate::shadow::uleb(&mut fde, 0);
    let mut last = 0;
    for &(offset, cfa) in rules {
        let delta = offset - last;
        if delta > 0 {
            if delta < 64 {
                fde.push(0x40 | delta as u8); // DW_CFA_advance_loc
            } else {
                fde.push(0x02); // DW_CFA_advance_loc1
                fde.push(delta as u8);
            }
        }
        fde.push(0x0e); // DW_CFA_def_cfa_offset
        crate::shadow::uleb(&mut fde, cfa as u64);
        last = offset;
    }
    while (fde.len() + 4) % 8 != 0 {
        fde.push(0);
    }
    out.extend((fde.len() as u32).to_le_bytes());
    out.extend(fde);
    out.extend([0, 0, 0, 0]);
    out
}

fn register_unwind(at: usize, prefix: &Emitter) -> Unwind {
    let eh = eh_frame(at, prefix.code.len(), &prefix.rules).leak();
    // SAFETY: `eh` is a complete, zero-terminated .eh_frame section that lives forever; it
    // describes the prefix written to the block at `at` (re-registered if a later prefix
    // differs, see `trampoline_block`); blocks are never given back to the near allocator.
    unsafe { crate::sys::unwind::register_frame(eh) };
    Unwind {
        eh,
        len: prefix.code.len(),
        rules: prefix.rules.clone(),
    }
}

/// A trampoline block near `function`: a free one in reach, or a new one, with unwind info for
/// `prefix`.
fn trampoline_block(function: usize, prefix: &Emitter) -> Result<(NearBlock, Unwind)> {
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
    if let Some((block, unwind)) = reused {
        if unwind.len == prefix.code.len() && unwind.rules == prefix.rules {
            return Ok((block, unwind));
        }
        // SAFETY: `eh` was registered by `register_unwind` and no thread is in the block.
        unsafe { crate::sys::unwind::deregister_frame(unwind.eh) };
        let unwind = register_unwind(block.address(), prefix);
        return Ok((block, unwind));
    }
    let block = NearBlock::alloc(function, TRAMPOLINE_LEN)?;
    let unwind = register_unwind(block.address(), prefix);
    Ok((block, unwind))
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
    /// # Example
    /// ```
    /// use std::sync::{Arc, atomic::AtomicBool};
    /// #[inline(never)]
    /// extern "C" fn f(x: u64) -> u64 { std::hint::black_box(x).wrapping_mul(0x9e37_79b9) ^ x >> 7 }
    /// let sym = evolve_code::inspect::executable().unwrap().function_containing(f as usize).unwrap().clone();
    /// let hooks = evolve_code::DetourHooks {
    ///     counter: Arc::new(evolve_code::Counter::new()),
    ///     slow: Arc::new(AtomicBool::new(false)),
    ///     on_entry: Arc::new(|_| {}),
    /// };
    /// let d = evolve_code::Detour::install(sym.address, sym.size, hooks.clone()).unwrap();
    /// let g: extern "C" fn(u64) -> u64 = std::hint::black_box(f);
    /// assert_eq!(g(5), 5u64.wrapping_mul(0x9e37_79b9) ^ 0);
    /// assert_eq!(hooks.counter.get(), 1);
    /// d.remove().unwrap();
    /// ```
    pub fn install(function: usize, size: usize, hooks: DetourHooks) -> Result<Detour> {
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

    fn new_trampoline(
        function: usize,
        hooks: DetourHooks,
        tail: impl FnOnce(usize) -> Result<Vec<u8>>,
        slot: Option<Box<AtomicUsize>>,
    ) -> Result<Trampoline> {
        let active = Box::new(Counter::new());
        let hook_box = Box::new(hooks.on_entry.clone());
        let latency = Box::new(AtomicUsize::new(0));
        let prefix = trampoline_prefix(&hooks, &active, &hook_box, &latency);
        let (block, unwind) = trampoline_block(function, &prefix)?;
        let tail_at = prefix.code.len();
        let mut code = prefix.code;
        let tail = tail(block.address() + code.len());
        let tail = match tail {
            Ok(t) => t,
            Err(e) => {
                FREE_BLOCKS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((block, unwind));
                return Err(e);
            }
        };
        code.extend(tail);
        if code.len() > block.len() {
            FREE_BLOCKS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((block, unwind));
            return Err(Error::new(ErrorKind::Unrelocatable {
                function,
                reason: format!("trampoline of {} bytes too long", code.len()),
            }));
        }
        // SAFETY: the block is fresh or free (no thread can be in it: see `reclaim`); nothing
        // branches to it until the caller publishes it.
        unsafe { block.write(0, &code)? };
        Ok(Trampoline {
            block,
            unwind,
            tail: tail_at,
            active,
            latency,
            slot,
            _hooks: hooks,
            _hook_box: hook_box,
        })
    }

    fn install_prologue(function: usize, prologue: Prologue, hooks: DetourHooks) -> Result<Detour> {
        let t = Detour::new_trampoline(function, hooks, |at| prologue.relocate(at), None)?;
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
        let slot_address = &*slot as *const AtomicUsize as usize;
        let t = Detour::new_trampoline(
            function,
            hooks,
            |_| {
                let mut e = Emitter {
                    code: Vec::new(),
                    cfa: 8,
                    rules: Vec::new(),
                };
                e.movabs_r11(slot_address).bytes(&[0x41, 0xff, 0x23]); // jmp qword [r11]
                Ok(e.code)
            },
            Some(slot),
        )?;
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
    /// recognised and not timed twice).
    pub fn set_latency(&self, sink: Option<&'static crate::shadow::Sink>) -> bool {
        if crate::shadow::fast_offset().is_none() {
            return false;
        }
        let t = self.trampoline.as_ref().expect("installed");
        let value = sink.map_or(0, |s| s as *const crate::shadow::Sink as usize);
        t.latency.store(value, std::sync::atomic::Ordering::Release);
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
        .push((t.block, t.unwind));
}

/// With the world stopped: which quarantined trampolines no thread is in (no thread can resume
/// inside, no thread inside the hook call).
fn idle(
    q: &[Trampoline],
    blocks: &crate::counter::Blocks<'_>,
    world: &crate::sys::world::World<'_>,
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
        blocks.push((t.block, t.unwind));
    }
}

/// Finds (stopping the world once) and releases quarantined trampolines no thread is in.
fn reclaim(q: &mut Vec<Trampoline>) {
    if q.is_empty() {
        return;
    }
    let mut free = vec![false; q.len()];
    let blocks = crate::counter::blocks();
    let stopped = stop_the_world(|world| idle(q, &blocks, world, &mut free));
    drop(blocks);
    if stopped.is_ok() {
        release_idle(q, &free);
    }
}

/// Trampolines removed but not yet released because a thread was, or may have been, inside.
pub fn quarantined_trampolines() -> usize {
    QUARANTINE.lock().unwrap_or_else(|p| p.into_inner()).len()
}

/// Stops the world once to release every removed trampoline no thread is in (removals of
/// stub detours otherwise do this every 16 removals); returns how many remain quarantined.
pub fn reclaim_trampolines() -> usize {
    let mut q = QUARANTINE.lock().unwrap_or_else(|p| p.into_inner());
    reclaim(&mut q);
    q.len()
}
