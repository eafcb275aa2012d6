//! A trampoline's code, assembled with iced-x86's `code_asm`, and its call-frame rules.
//!
//! ```text
//! cmp qword fs:[guard], 0 ; jne tail              -- probes off for this thread: straight on
//! mov r11, fs:[block] ; test r11, r11 ; jz adopt  -- the counting fast path: a plain `inc` in
//! inc qword [r11 + slot]                             the thread's counter block (crate::counter);
//! counted: if a latency sink is set (see below):      r11 is free at entry in the SysV ABI
//!   push rax, rcx, rdx ; push a shadow frame ; rdtsc ; return address = exit stub ; pop
//! check: movabs r11, &slow ; cmp byte [r11], 0
//! je tail
//! hook: active += 1 (per thread) ; push the 6 argument registers and rax ; save xmm0-7
//!   guard := 1 ; mov rdi, rsp ; movabs rsi, hook ; call entry_thunk ; guard := 0
//!   restore ; active -= 1 ; jmp tail
//! adopt: lock inc [counter.shared] ; (saved, guarded) call adopt ; jmp counted
//! tail: <relocated prologue> ; jmp function + len     -- or, through a stub: jmp [slot]
//! ```
//!
//! Everything before `tail` is the **prefix**; its layout (length and call-frame rules) is the
//! same for every trampoline of the process, so a released block's registered unwind info is
//! reused as is. Labels replace hand-patched branch offsets: the assembler (iced's block
//! encoder) picks short or near forms and relocates the prologue's RIP-relative operands and
//! branches where they land.
//!
//! **Latency in machine code.** With a sink set ([`super::Detour::set_latency`]), the
//! trampoline times the call itself: it reads the thread's shadow-stack state at a fixed offset
//! from the thread pointer ([`crate::shadow`]), writes the frame (return address, its slot,
//! `rdtsc`, sink), bumps the depth and replaces the return address with the thread's exit stub
//! for that depth, saving only rax, rcx and rdx. A thread without a shadow block yet, 128 timed
//! frames deep, or with dead frames below (unwound by a foreign unwinder) takes the hook
//! instead, whose Rust side handles those cases and does not time a call twice.
//!
//! The hook path saves exactly what the ABI needs to preserve the call's arguments (the hook is
//! an ordinary `extern "C"` function that preserves callee-saved registers itself), with the
//! thread's re-entrancy guard set around the call ([`crate::thread_state`]), so a probed
//! function the hook calls (even the thunk's own callees) runs unprobed.

use super::prologue::Prologue;
use crate::counter::Counter;
use crate::error::{Error, ErrorKind, Result};
use crate::thread_state;
use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

/// What the prefix references: addresses that live as long as the trampoline.
pub(super) struct Parts<'a> {
    pub counter: &'a Counter,
    /// The `slow` flag (a byte: nonzero while calls must go through the hook).
    pub slow: usize,
    /// Threads inside the hook call.
    pub active: &'a Counter,
    /// The `*const Arc<EntryHook>` passed to the entry thunk.
    pub hook: usize,
    /// The word holding the latency sink's address (0: none).
    pub latency: usize,
    pub entry_thunk: usize,
    pub adopt_thunk: usize,
}

/// How the trampoline continues after the prefix.
pub(super) enum Tail<'a> {
    /// The relocated prologue and a jump back into the function.
    Relocated(&'a Prologue),
    /// `jmp [slot]`: a routed stub's current target.
    ThroughSlot(usize),
}

/// Assembled code: the bytes, where the tail starts, and the prefix's call-frame rules (CFA
/// offset from `rsp` from each code offset on; 8 at entry).
pub(super) struct Code {
    pub bytes: Vec<u8>,
    pub tail: usize,
    pub rules: Vec<(u32, i32)>,
}

fn asm_error(function: usize) -> impl Fn(iced_x86::IcedError) -> Error {
    move |e| {
        Error::new(ErrorKind::Unrelocatable {
            function,
            reason: format!("assembling the trampoline failed: {e}"),
        })
    }
}

/// The assembler and the prefix's stack depth, with a label after each instruction that moves
/// the stack pointer (where a new call-frame rule starts).
struct Asm {
    a: CodeAssembler,
    cfa: i32,
    rules: Vec<(CodeLabel, i32)>,
}

type R = std::result::Result<(), iced_x86::IcedError>;

impl Asm {
    /// The last instruction moved the stack pointer down by `n` bytes (`n < 0`: up).
    fn stack(&mut self, n: i32) -> R {
        self.cfa += n;
        let mut here = self.a.create_label();
        self.a.set_label(&mut here)?;
        self.rules.push((here, self.cfa));
        Ok(())
    }

    /// The CFA rule is `cfa` from the instruction at `label` on (a branch target reached with
    /// another stack depth than the instruction before it).
    fn rule_at(&mut self, label: CodeLabel, cfa: i32) {
        self.cfa = cfa;
        self.rules.push((label, cfa));
    }

    fn push(&mut self, r: AsmRegister64) -> R {
        self.a.push(r)?;
        self.stack(8)
    }

    fn pop(&mut self, r: AsmRegister64) -> R {
        self.a.pop(r)?;
        self.stack(-8)
    }

    /// Adds `delta` (±1) to a counter: in the thread's block if it has one, else shared.
    fn count(&mut self, c: &Counter, delta: i8, tls: Option<i32>) -> R {
        let a = &mut self.a;
        if let (Some(offset), Some(slot)) = (tls, c.slot_offset()) {
            let mut shared = a.create_label();
            let mut done = a.create_label();
            a.mov(r11, qword_ptr(offset + thread_state::COUNTERS).fs())?;
            a.test(r11, r11)?;
            a.jz(shared)?;
            if delta > 0 {
                a.inc(qword_ptr(r11 + slot))?;
            } else {
                a.dec(qword_ptr(r11 + slot))?;
            }
            a.jmp(done)?;
            a.set_label(&mut shared)?;
            a.mov(r11, c.shared_address() as u64)?;
            if delta > 0 {
                a.lock().inc(qword_ptr(r11))?;
            } else {
                a.lock().dec(qword_ptr(r11))?;
            }
            // `done` labels the next instruction (there is always one: the trampoline goes on).
            a.set_label(&mut done)?;
        } else {
            a.mov(r11, c.shared_address() as u64)?;
            if delta > 0 {
                a.lock().inc(qword_ptr(r11))?;
            } else {
                a.lock().dec(qword_ptr(r11))?;
            }
        }
        Ok(())
    }

    /// Saves the argument registers, calls `thunk(saved registers, rsi)` with probes off for the
    /// thread, restores them.
    fn call_saved(&mut self, thunk: usize, rsi_value: usize, tls: Option<i32>) -> R {
        for r in [rdi, rsi, rdx, rcx, r8, r9, rax] {
            self.push(r)?;
        }
        self.a.sub(rsp, 128)?;
        self.stack(128)?;
        for (i, x) in [xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7]
            .into_iter()
            .enumerate()
        {
            self.a.movdqu(xmmword_ptr(rsp + 16 * i as i32), x)?;
        }
        if let Some(offset) = tls {
            self.a
                .mov(qword_ptr(offset + thread_state::GUARD).fs(), 1)?;
        }
        self.a.mov(rdi, rsp)?;
        self.a.mov(rsi, rsi_value as u64)?;
        self.a.mov(rax, thunk as u64)?;
        self.a.call(rax)?;
        if let Some(offset) = tls {
            self.a
                .mov(qword_ptr(offset + thread_state::GUARD).fs(), 0)?;
        }
        for (i, x) in [xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7]
            .into_iter()
            .enumerate()
        {
            self.a.movdqu(x, xmmword_ptr(rsp + 16 * i as i32))?;
        }
        self.a.add(rsp, 128)?;
        self.stack(-128)?;
        for r in [rax, r9, r8, rcx, rdx, rsi, rdi] {
            self.pop(r)?;
        }
        Ok(())
    }
}

/// Assembles the trampoline of `function` to run at `at` (see the module docs).
pub(super) fn assemble(
    function: usize,
    at: usize,
    parts: &Parts<'_>,
    tail: Tail<'_>,
) -> Result<Code> {
    build(at, parts, tail).map_err(|e| match e {
        Built::Asm(e) => asm_error(function)(e),
        Built::Engine(e) => e,
    })
}

enum Built {
    Asm(iced_x86::IcedError),
    Engine(Error),
}

impl From<iced_x86::IcedError> for Built {
    fn from(e: iced_x86::IcedError) -> Built {
        Built::Asm(e)
    }
}

fn build(at: usize, parts: &Parts<'_>, tail: Tail<'_>) -> std::result::Result<Code, Built> {
    let state = thread_state::offset();
    let tls = state.map(|o| o + thread_state::COUNTERS);
    let shadow = crate::shadow::fast_offset();
    let mut s = Asm {
        a: CodeAssembler::new(64)?,
        cfa: 8,
        rules: Vec::new(),
    };
    let mut tail_label = s.a.create_label();
    let mut adopt = s.a.create_label();
    let mut counted = s.a.create_label();
    let mut check = s.a.create_label();
    let mut hook = s.a.create_label();

    if let Some(offset) = state {
        // Probes off for this thread (inside a hook, an exit report, engine code): straight on.
        s.a.cmp(qword_ptr(offset + thread_state::GUARD).fs(), 0)?;
        s.a.jne(tail_label)?;
    }
    let per_thread = tls.is_some() && parts.counter.per_thread();
    let adopting = per_thread && parts.counter.slot_offset().is_some();
    if let (true, Some(offset), Some(slot)) = (adopting, tls, parts.counter.slot_offset()) {
        // The counting fast path: a plain increment in the thread's own block.
        s.a.mov(r11, qword_ptr(offset).fs())?;
        s.a.test(r11, r11)?;
        s.a.jz(adopt)?;
        s.a.inc(qword_ptr(r11 + slot))?;
    } else {
        s.a.mov(r11, parts.counter.shared_address() as u64)?;
        s.a.lock().inc(qword_ptr(r11))?;
    }
    if shadow.is_none() {
        // Without timing in machine code, `counted` and `check` are the same instruction.
        counted = check;
    }
    if let Some(off) = shadow {
        s.a.set_label(&mut counted)?;
        // Timing: push a shadow frame and hijack the return address, in machine code (see
        // `crate::shadow`); anything unusual goes to the hook, whose Rust side handles it.
        let (frames, stubs, top) = (off, off + 8, off + 16);
        let mut fallback = s.a.create_label();
        let mut push = s.a.create_label();
        s.a.mov(r11, parts.latency as u64)?;
        s.a.mov(r11, qword_ptr(r11))?; // the sink
        s.a.test(r11, r11)?;
        s.a.jz(check)?;
        s.push(rax)?;
        s.push(rcx)?;
        s.push(rdx)?;
        s.a.mov(rcx, qword_ptr(frames).fs())?;
        s.a.test(rcx, rcx)?;
        s.a.jz(fallback)?; // no block yet
        s.a.mov(rax, qword_ptr(top).fs())?;
        s.a.cmp(rax, crate::shadow::DEPTH as i32)?;
        s.a.jae(fallback)?; // too deep
        s.a.lea(rdx, qword_ptr(rsp + 24))?; // the return slot
        s.a.shl(rax, 5)?; // top * size_of::<Frame>()
        s.a.jz(push)?; // top == 0
        s.a.cmp(qword_ptr(rcx + rax - 24), rdx)?; // frames[top - 1].slot
        s.a.jbe(fallback)?; // a dead frame below
        s.a.set_label(&mut push)?;
        s.a.add(rcx, rax)?; // &frames[top]
        s.a.mov(qword_ptr(rcx + 8), rdx)?; // slot
        s.a.mov(qword_ptr(rcx + 24), r11)?; // sink
        s.a.mov(rdx, qword_ptr(rsp + 24))?;
        s.a.mov(qword_ptr(rcx), rdx)?; // ret
        s.a.rdtsc()?;
        s.a.shl(rdx, 32)?;
        s.a.or(rax, rdx)?;
        s.a.mov(qword_ptr(rcx + 16), rax)?; // entered
        s.a.mov(rax, qword_ptr(top).fs())?;
        s.a.lea(rdx, qword_ptr(rax + 1))?;
        s.a.mov(qword_ptr(top).fs(), rdx)?; // depth + 1: the frame is on the stack
        s.a.shl(rax, 4)?; // top * STUB
        s.a.add(rax, qword_ptr(stubs).fs())?;
        s.a.inc(rax)?; // exit stub `top`, after its padding byte
        s.a.mov(qword_ptr(rsp + 24), rax)?; // the return address
        s.pop(rdx)?;
        s.pop(rcx)?;
        s.pop(rax)?;
        s.a.jmp(check)?;
        s.a.set_label(&mut fallback)?;
        s.rule_at(fallback, 32);
        s.pop(rdx)?;
        s.pop(rcx)?;
        s.pop(rax)?;
        s.a.jmp(hook)?;
    }
    s.a.set_label(&mut check)?;
    s.a.mov(r11, parts.slow as u64)?;
    s.a.cmp(byte_ptr(r11), 0)?;
    s.a.je(tail_label)?;
    s.a.set_label(&mut hook)?;
    s.count(parts.active, 1, tls)?;
    s.call_saved(parts.entry_thunk, parts.hook, state)?;
    s.count(parts.active, -1, tls)?;
    s.a.jmp(tail_label)?;
    if adopting {
        // First probed call of a thread without a block: count it shared, adopt a block.
        s.a.set_label(&mut adopt)?;
        s.a.mov(r11, parts.counter.shared_address() as u64)?;
        s.a.lock().inc(qword_ptr(r11))?;
        s.a.mov(r11, parts.active.shared_address() as u64)?;
        s.a.lock().inc(qword_ptr(r11))?;
        s.call_saved(parts.adopt_thunk, 0, state)?;
        s.a.mov(r11, parts.active.shared_address() as u64)?;
        s.a.lock().dec(qword_ptr(r11))?;
        s.a.jmp(counted)?;
    }
    s.a.set_label(&mut tail_label)?;
    match tail {
        Tail::Relocated(prologue) => {
            for insn in prologue.relocated().map_err(Built::Engine)? {
                s.a.add_instruction(insn)?;
            }
        }
        Tail::ThroughSlot(slot) => {
            s.a.mov(r11, slot as u64)?;
            s.a.jmp(qword_ptr(r11))?;
        }
    }
    let result = s.a.assemble_options(
        at as u64,
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let ip = |label: &CodeLabel| -> std::result::Result<u32, Built> {
        Ok((result.label_ip(label)? - at as u64) as u32)
    };
    let tail = ip(&tail_label)? as usize;
    let mut rules = Vec::with_capacity(s.rules.len());
    for (label, cfa) in &s.rules {
        rules.push((ip(label)?, *cfa));
    }
    Ok(Code {
        bytes: result.inner.code_buffer,
        tail,
        rules,
    })
}
