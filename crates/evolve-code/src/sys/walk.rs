//! Walking a stopped thread's stack with the unwind tables: which code each frame executes, and
//! every context a thread can resume at.
//!
//! With the world stopped ([`crate::sys::world`]) the engine needs to know exactly where each
//! thread's code is in execution: the PC it was interrupted at, the return address of every live
//! frame, and — when the thread is inside a signal handler — the PC the interrupted code resumes
//! at when the handler returns (saved in the signal frame's `ucontext_t`, possibly changed by the
//! handler). A detour must not be written over bytes a thread can resume inside; a patch whose
//! code a frame returns into must not be unloaded.
//!
//! # Tables
//!
//! [`Tables`] holds, for every loaded object ([`crate::sys::loader`]), a copy of its
//! `.eh_frame_hdr` lookup table and `.eh_frame` section — the program, its libraries, the vdso,
//! every loaded patch — and the `.eh_frame` bytes the engine registered for code it generated
//! (detour trampolines, shadow-stack exit stubs, loaded patches), which [`crate::unwind`] — the
//! one place that registers tables with the process's unwinder — reports here. Copies, read through
//! [`crate::sys::peek`], because an object may be unmapped between the refresh and the walk
//! (another thread `dlclose`s it) and its file may have been truncated (a plain load would
//! fault). [`Tables::refresh`] runs before the world stops (it asks the loader, which takes a
//! lock a stopped thread may hold); objects loaded after it are simply unknown to the walk.
//!
//! # Walking
//!
//! [`Walker::walk`] starts from the registers the stop signal saved and applies each frame's
//! CFI row (`gimli`, with an unwind context and an expression evaluator of fixed size: nothing is
//! allocated with the world stopped). A frame whose FDE is a signal trampoline (`S`
//! augmentation: glibc's `__restore_rt`), or whose bytes are `mov rax, 15; syscall` (a restorer
//! without CFI), is a signal frame: the stack pointer there points at the `ucontext_t` the kernel
//! saved, and the walk continues from its registers, on whatever stack they name. Each frame
//! found is recorded with how the thread gets there ([`FrameKind`]).
//!
//! The walk stops at the outermost frame (return address undefined or zero: `_start`,
//! `clone`'s child), or early — at code without unwind information (generated code, a
//! trampoline's tail), at a frame that does not move up the stack, at an unreadable word, or
//! after [`Walker::MAX_FRAMES`]. Callers treat an early end conservatively: every word of the
//! rest of that stack may be a return address (see [`crate::sys::world`]).
//!
//! # Safety
//!
//! Memory of other objects is read only through [`crate::sys::peek`] (a copy that fails on a bad
//! page instead of faulting); registered sections are copied when they are registered.
#![allow(unsafe_code)]

use super::peek;
use super::regs::GENERAL;
use crate::hidden::Hidden;
use gimli::{
    BaseAddresses, CfaRule, EhFrame, EhFrameHdr, EndianSlice, Evaluation, EvaluationResult,
    EvaluationStorage, LittleEndian, Piece, Reader, Register, RegisterRule, UnwindContext,
    UnwindSection, Value,
};
use std::ops::Range;
use std::sync::{Arc, Mutex};

type Slice<'a> = EndianSlice<'a, LittleEndian>;

/// DWARF register numbers of x86-64 (System V ABI): 0-15 general, 16 the return address.
const RSP: usize = 7;
const RA: usize = 16;
const DWARF_REGISTERS: usize = 17;
/// `ucontext_t` slot of each DWARF register.
const FROM_GREGS: [libc::c_int; DWARF_REGISTERS] = [
    libc::REG_RAX,
    libc::REG_RDX,
    libc::REG_RCX,
    libc::REG_RBX,
    libc::REG_RSI,
    libc::REG_RDI,
    libc::REG_RBP,
    libc::REG_RSP,
    libc::REG_R8,
    libc::REG_R9,
    libc::REG_R10,
    libc::REG_R11,
    libc::REG_R12,
    libc::REG_R13,
    libc::REG_R14,
    libc::REG_R15,
    libc::REG_RIP,
];
/// `mov rax, 15 (rt_sigreturn); syscall`: the body of a signal restorer.
const SIGRETURN: [u8; 9] = [0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05];

/// `.eh_frame` bytes the engine registered for code it generated or loaded (a copy: the
/// original may be unmapped once deregistered), with the code ranges their FDEs cover.
struct Registered {
    address: usize,
    eh: Arc<[u8]>,
    /// Hidden from reference scans: a patch's code ranges are engine bookkeeping.
    fdes: Vec<(Hidden, Hidden, usize)>,
}

static REGISTERED: Mutex<Vec<Registered>> = Mutex::new(Vec::new());

fn fdes_of(address: usize, eh: &[u8]) -> Vec<(Hidden, Hidden, usize)> {
    let section = EhFrame::new(eh, LittleEndian);
    let bases = BaseAddresses::default().set_eh_frame(address as u64);
    let mut entries = section.entries(&bases);
    let mut fdes = Vec::new();
    while let Ok(Some(entry)) = entries.next() {
        if let gimli::CieOrFde::Fde(partial) = entry {
            if let Ok(fde) = partial.parse(EhFrame::cie_from_offset) {
                let start = fde.initial_address() as usize;
                let end = start + fde.len() as usize;
                fdes.push((Hidden::new(start), Hidden::new(end), fde.offset()));
            }
        }
    }
    fdes
}

/// Tells the walker about an `.eh_frame` section that [`crate::unwind`] registered with the
/// process's unwinder, at `section.as_ptr()` (the one registration path: the walker learns of
/// generated code — trampolines, shadow-stack stubs, loaded patches — from it).
pub(crate) fn registered(section: &[u8]) {
    let address = section.as_ptr() as usize;
    let fdes = fdes_of(address, section);
    REGISTERED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Registered {
            address,
            eh: section.into(),
            fdes,
        });
}

/// Undoes [`registered`] for the section at `address`.
pub(crate) fn deregistered(address: usize) {
    REGISTERED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|r| r.address != address);
}

/// One loaded object's unwind tables, copied. Addresses are [`Hidden`] here and in
/// [`Tables::code`]: the tables are rebuilt for every stop of the world and freed after it, and
/// plain copies of a patch's addresses left in freed memory would keep reclamation from ever
/// unloading it.
struct ImageTables {
    bias: Hidden,
    hdr_address: Hidden,
    hdr: Box<[u8]>,
    eh_address: Hidden,
    eh: Box<[u8]>,
}

/// Where the FDE covering some code lies.
#[derive(Clone, Copy)]
enum Source {
    Image(usize),
    /// Index into [`Tables::registered`], offset of the FDE.
    Registered {
        table: usize,
        offset: usize,
    },
}

/// The unwind tables of every loaded object and of the engine's generated code, as of the last
/// [`Tables::refresh`].
#[derive(Default)]
pub struct Tables {
    images: Vec<ImageTables>,
    /// Sections registered for generated code: their address and bytes.
    registered: Vec<(usize, Arc<[u8]>)>,
    /// Executable ranges (start, end), sorted, with where their FDEs are.
    code: Vec<(Hidden, Hidden, Source)>,
}

/// Copies `len` bytes at `address`, if all of them can be read.
fn copy(address: usize, len: usize) -> Option<Box<[u8]>> {
    let mut bytes = vec![0u8; len].into_boxed_slice();
    (peek::read(address, &mut bytes) == len).then_some(bytes)
}

impl Tables {
    /// Brings the tables up to date with the loaded objects and the registered frames. Not
    /// with the world stopped: it asks the loader, which takes its lock.
    pub fn refresh(&mut self) {
        peek::prepare();
        struct Seen {
            bias: Hidden,
            hdr: (Hidden, Hidden),
            loads: Vec<(Hidden, Hidden, bool)>,
        }
        let mut seen = Vec::new();
        super::loader::for_each(|object| {
            if let Some(hdr) = object.segment(libc::PT_GNU_EH_FRAME) {
                let loads = object
                    .phdrs
                    .iter()
                    .filter(|p| p.p_type == libc::PT_LOAD)
                    .map(|p| {
                        let start = object.bias.wrapping_add(p.p_vaddr as usize);
                        (
                            Hidden::new(start),
                            Hidden::new(start + p.p_memsz as usize),
                            p.p_flags & libc::PF_X != 0,
                        )
                    })
                    .collect();
                seen.push(Seen {
                    bias: Hidden::new(object.bias),
                    hdr: (Hidden::new(hdr.start), Hidden::new(hdr.end)),
                    loads,
                });
            }
            true
        });
        let mut old = std::mem::take(&mut self.images);
        self.code.clear();
        for object in seen {
            let kept = old
                .iter()
                .position(|i| i.bias == object.bias && i.hdr_address == object.hdr.0)
                .map(|i| old.swap_remove(i));
            let hdr = object.hdr.0.get()..object.hdr.1.get();
            let Some(image) = kept.or_else(|| Self::load(object.bias, &hdr, &object.loads)) else {
                continue;
            };
            let index = self.images.len();
            self.images.push(image);
            for (start, end, exec) in object.loads {
                if exec {
                    self.code.push((start, end, Source::Image(index)));
                }
            }
        }
        self.registered.clear();
        for registered in REGISTERED.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let table = self.registered.len();
            self.registered
                .push((registered.address, registered.eh.clone()));
            for (start, end, offset) in &registered.fdes {
                self.code.push((
                    *start,
                    *end,
                    Source::Registered {
                        table,
                        offset: *offset,
                    },
                ));
            }
        }
        // Hidden values order as the addresses (user addresses have their top 16 bits clear).
        self.code.sort_by_key(|(start, _, _)| *start);
    }

    /// Copies an object's `.eh_frame_hdr` and `.eh_frame` (up to the end of the segment that
    /// holds it: the section's length is not recorded anywhere else in memory).
    fn load(
        bias: Hidden,
        hdr: &Range<usize>,
        loads: &[(Hidden, Hidden, bool)],
    ) -> Option<ImageTables> {
        let hdr_bytes = copy(hdr.start, hdr.len())?;
        let bases = BaseAddresses::default().set_eh_frame_hdr(hdr.start as u64);
        let parsed = EhFrameHdr::new(&hdr_bytes, LittleEndian)
            .parse(&bases, 8)
            .ok()?;
        let gimli::Pointer::Direct(eh_address) = parsed.eh_frame_ptr() else {
            return None;
        };
        let eh_address = eh_address as usize;
        let segment = loads
            .iter()
            .find(|(start, end, _)| (start.get()..end.get()).contains(&eh_address))?;
        let len = (segment.1.get() - eh_address).min(256 << 20);
        let mut eh = vec![0u8; len];
        let read = peek::read(eh_address, &mut eh);
        eh.truncate(read);
        Some(ImageTables {
            bias,
            hdr_address: Hidden::new(hdr.start),
            hdr: hdr_bytes,
            eh_address: Hidden::new(eh_address),
            eh: eh.into_boxed_slice(),
        })
    }

    /// Whether `address` lies in memory these tables own (their copies of other objects'
    /// tables, their code ranges): engine state, not the program's references. Allocation-free.
    pub fn owns(&self, address: usize) -> bool {
        let bytes = |b: &[u8]| within(address, b.as_ptr() as usize, b.len());
        within_vec(address, &self.images)
            || within_vec(address, &self.code)
            || within_vec(address, &self.registered)
            || self.images.iter().any(|i| bytes(&i.hdr) || bytes(&i.eh))
            || self.registered.iter().any(|(_, eh)| bytes(eh))
    }

    fn source(&self, pc: usize) -> Option<Source> {
        let i = self.code.partition_point(|(start, _, _)| start.get() <= pc);
        let (start, end, source) = self.code.get(i.checked_sub(1)?)?;
        (start.get()..end.get()).contains(&pc).then_some(*source)
    }

    /// The first address of the function (the FDE) whose unwind information covers `pc`.
    /// Allocation-free.
    pub fn function_start(&self, pc: usize) -> Option<usize> {
        match self.source(pc)? {
            Source::Image(i) => {
                let image = &self.images[i];
                let bases = BaseAddresses::default()
                    .set_eh_frame_hdr(image.hdr_address.get() as u64)
                    .set_eh_frame(image.eh_address.get() as u64);
                let section = EhFrame::new(&image.eh, LittleEndian);
                let hdr = EhFrameHdr::new(&image.hdr, LittleEndian)
                    .parse(&bases, 8)
                    .ok()?;
                let fde = hdr
                    .table()?
                    .fde_for_address(&section, &bases, pc as u64, EhFrame::cie_from_offset)
                    .ok()?;
                Some(fde.initial_address() as usize)
            }
            Source::Registered { .. } => {
                let i = self.code.partition_point(|(start, _, _)| start.get() <= pc);
                Some(self.code[i - 1].0.get())
            }
        }
    }
}

/// How a thread gets to a frame's PC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// The PC the thread was stopped at.
    Innermost,
    /// The PC a signal interrupted, saved in a signal frame: the thread resumes there when the
    /// handler returns (the handler may have changed it; this is its value now).
    Interrupted,
    /// A return address: the thread resumes there when the frame above returns.
    Return,
}

/// One frame of a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The code address the thread executes or resumes at.
    pub pc: usize,
    /// The stack pointer in this frame.
    pub sp: usize,
    /// Where `pc` is stored on the stack (a return-address slot, or the RIP slot of a signal
    /// frame), 0 for the innermost frame (it is in a register).
    pub slot: usize,
    /// How the thread gets there.
    pub kind: FrameKind,
}

/// Why a walk ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkEnd {
    /// At the outermost frame: every frame is known.
    Complete,
    /// At code with no unwind information (generated code without registered frames).
    NoUnwindInfo {
        /// The code address.
        pc: usize,
    },
    /// A frame's rules could not be applied (unreadable memory, an unsupported rule, a frame
    /// that does not move up the stack).
    BadFrame {
        /// The frame's code address.
        pc: usize,
    },
    /// More frames than the walker records.
    TooDeep,
}

/// Fixed-size storage for DWARF expression evaluation (no allocation with the world stopped).
struct FixedEvaluation;

impl<R: Reader> EvaluationStorage<R> for FixedEvaluation {
    type Stack = [Value; 64];
    type ExpressionStack = [(R, R); 4];
    type Result = [Piece<R>; 1];
}

/// Reads stack words through [`peek`], one page cached.
struct StackReader {
    page: usize,
    valid: usize,
    bytes: Box<[u8; 4096]>,
}

impl StackReader {
    fn read_u64(&mut self, address: usize) -> Option<u64> {
        let page = address & !4095;
        if page != self.page || self.valid == 0 {
            self.page = page;
            self.valid = peek::read(page, &mut self.bytes[..]);
        }
        let offset = address - page;
        if offset + 8 <= self.valid {
            Some(u64::from_ne_bytes(
                self.bytes[offset..offset + 8].try_into().expect("8 bytes"),
            ))
        } else if offset + 8 > 4096 {
            peek::read_u64(address)
        } else {
            None
        }
    }

    fn invalidate(&mut self) {
        self.valid = 0;
    }
}

fn within(address: usize, start: usize, len: usize) -> bool {
    (start..start + len).contains(&address)
}

/// Whether `address` lies in the allocation of `v` (its whole capacity).
pub(crate) fn within_vec<T>(address: usize, v: &Vec<T>) -> bool {
    within(
        address,
        v.as_ptr() as usize,
        v.capacity() * std::mem::size_of::<T>(),
    )
}

/// A stack walker whose buffers are allocated once, so that walks allocate nothing.
pub struct Walker {
    context: Box<UnwindContext<usize>>,
    stack: StackReader,
}

impl Default for Walker {
    fn default() -> Walker {
        Walker {
            context: Box::new(UnwindContext::new()),
            stack: StackReader {
                page: 0,
                valid: 0,
                bytes: Box::new([0; 4096]),
            },
        }
    }
}

type Registers = [Option<u64>; DWARF_REGISTERS];

fn from_gregs(gregs: &[u64; GENERAL]) -> Registers {
    std::array::from_fn(|i| Some(gregs[FROM_GREGS[i] as usize]))
}

impl Walker {
    /// Whether `address` lies in the walker's buffers (its copy of a stack page, its unwind
    /// context). Allocation-free.
    pub fn owns(&self, address: usize) -> bool {
        within(
            address,
            &*self.context as *const UnwindContext<usize> as usize,
            std::mem::size_of::<UnwindContext<usize>>(),
        ) || within(address, self.stack.bytes.as_ptr() as usize, 4096)
    }

    /// Walks the stack of a thread stopped with `gregs`, pushing at most `max` frames into
    /// `frames`, never beyond its capacity (nothing is allocated). Returns why it ended.
    pub fn walk(
        &mut self,
        tables: &Tables,
        gregs: &[u64; GENERAL],
        frames: &mut Vec<Frame>,
        max: usize,
    ) -> WalkEnd {
        self.stack.invalidate();
        let limit = frames.len() + (frames.capacity() - frames.len()).min(max);
        let mut regs = from_gregs(gregs);
        let (mut kind, mut slot) = (FrameKind::Innermost, 0usize);
        loop {
            let (Some(pc), Some(sp)) = (regs[RA], regs[RSP]) else {
                return WalkEnd::BadFrame { pc: 0 };
            };
            let (pc, sp) = (pc as usize, sp as usize);
            if pc == 0 {
                return WalkEnd::Complete;
            }
            if frames.len() == limit {
                return WalkEnd::TooDeep;
            }
            frames.push(Frame { pc, sp, slot, kind });
            // A return address may point past a call that never returns: look up the call.
            let lookup = if kind == FrameKind::Return {
                pc - 1
            } else {
                pc
            };
            let mut caller: Registers = [None; DWARF_REGISTERS];
            let step = match tables.source(lookup) {
                Some(source) => self.step(tables, source, lookup, &regs, &mut caller),
                None if self.is_sigreturn(pc) => Step::Signal,
                None => return WalkEnd::NoUnwindInfo { pc },
            };
            match step {
                Step::Caller(ra_slot) => {
                    match caller[RA] {
                        None | Some(0) => return WalkEnd::Complete,
                        Some(_) => {}
                    }
                    if caller[RSP].is_none_or(|s| s as usize <= sp) {
                        return WalkEnd::BadFrame { pc };
                    }
                    regs = caller;
                    (kind, slot) = (FrameKind::Return, ra_slot);
                }
                Step::Signal => {
                    // The restorer runs with the stack pointer at the saved `ucontext_t`.
                    let gregs_at = sp + std::mem::offset_of!(libc::ucontext_t, uc_mcontext);
                    let mut saved = [0u64; GENERAL];
                    for (i, word) in saved.iter_mut().enumerate() {
                        match self.stack.read_u64(gregs_at + 8 * i) {
                            Some(w) => *word = w,
                            None => return WalkEnd::BadFrame { pc },
                        }
                    }
                    regs = from_gregs(&saved);
                    kind = FrameKind::Interrupted;
                    slot = gregs_at + 8 * libc::REG_RIP as usize;
                }
                Step::Failed => return WalkEnd::BadFrame { pc },
            }
        }
    }

    fn is_sigreturn(&mut self, pc: usize) -> bool {
        let mut bytes = [0u8; 9];
        [pc, pc.wrapping_sub(7)]
            .iter()
            .any(|&at| peek::read(at, &mut bytes) == 9 && bytes == SIGRETURN)
    }

    /// Applies the CFI row for `pc` to `regs`, computing the caller's registers.
    fn step(
        &mut self,
        tables: &Tables,
        source: Source,
        pc: usize,
        regs: &Registers,
        caller: &mut Registers,
    ) -> Step {
        match source {
            Source::Image(i) => {
                let image = &tables.images[i];
                let bases = BaseAddresses::default()
                    .set_eh_frame_hdr(image.hdr_address.get() as u64)
                    .set_eh_frame(image.eh_address.get() as u64);
                let section = EhFrame::new(&image.eh, LittleEndian);
                let Ok(hdr) = EhFrameHdr::new(&image.hdr, LittleEndian).parse(&bases, 8) else {
                    return Step::Failed;
                };
                let Some(table) = hdr.table() else {
                    return Step::Failed;
                };
                match table.fde_for_address(&section, &bases, pc as u64, EhFrame::cie_from_offset) {
                    Ok(fde) => self.apply(&section, &bases, &fde, pc, regs, caller),
                    Err(_) => Step::Failed,
                }
            }
            Source::Registered { table, offset } => {
                let (address, eh) = &tables.registered[table];
                let bases = BaseAddresses::default().set_eh_frame(*address as u64);
                let section = EhFrame::new(eh, LittleEndian);
                match section.fde_from_offset(
                    &bases,
                    gimli::EhFrameOffset(offset),
                    EhFrame::cie_from_offset,
                ) {
                    Ok(fde) => self.apply(&section, &bases, &fde, pc, regs, caller),
                    Err(_) => Step::Failed,
                }
            }
        }
    }

    fn apply(
        &mut self,
        section: &EhFrame<Slice<'_>>,
        bases: &BaseAddresses,
        fde: &gimli::FrameDescriptionEntry<Slice<'_>>,
        pc: usize,
        regs: &Registers,
        caller: &mut Registers,
    ) -> Step {
        if fde.is_signal_trampoline() {
            return Step::Signal;
        }
        let encoding = fde.cie().encoding();
        let Ok(row) = fde.unwind_info_for_address(section, bases, &mut self.context, pc as u64)
        else {
            return Step::Failed;
        };
        let cfa = match row.cfa() {
            CfaRule::RegisterAndOffset { register, offset } => regs
                .get(register.0 as usize)
                .copied()
                .flatten()
                .map(|v| v.wrapping_add(*offset as u64)),
            CfaRule::Expression(e) => e
                .get(section)
                .ok()
                .and_then(|e| evaluate(&mut self.stack, e.0, encoding, regs, None)),
        };
        let Some(cfa) = cfa else {
            return Step::Failed;
        };
        let mut ra_slot = 0usize;
        for (r, value) in caller.iter_mut().enumerate() {
            let rule = row.register(Register(r as u16));
            *value = match rule {
                // Unmentioned registers keep their value (callee-saved ones by the ABI; the
                // others are dead across the call and only read by nobody).
                None | Some(RegisterRule::SameValue) => regs[r],
                Some(RegisterRule::Undefined) => None,
                Some(RegisterRule::Offset(n)) => {
                    let at = cfa.wrapping_add(n as u64) as usize;
                    if r == RA {
                        ra_slot = at;
                    }
                    self.stack.read_u64(at)
                }
                Some(RegisterRule::ValOffset(n)) => Some(cfa.wrapping_add(n as u64)),
                Some(RegisterRule::Register(other)) => {
                    regs.get(other.0 as usize).copied().flatten()
                }
                Some(RegisterRule::Expression(e)) => e
                    .get(section)
                    .ok()
                    .and_then(|e| evaluate(&mut self.stack, e.0, encoding, regs, Some(cfa)))
                    .and_then(|at| {
                        if r == RA {
                            ra_slot = at as usize;
                        }
                        self.stack.read_u64(at as usize)
                    }),
                Some(RegisterRule::ValExpression(e)) => e
                    .get(section)
                    .ok()
                    .and_then(|e| evaluate(&mut self.stack, e.0, encoding, regs, Some(cfa))),
                Some(RegisterRule::Constant(c)) => Some(c),
                Some(_) => None,
            };
        }
        // The caller's stack pointer is the CFA (x86-64).
        caller[RSP] = Some(cfa);
        if row.register(Register(RA as u16)) == Some(RegisterRule::Undefined) {
            caller[RA] = None;
        }
        Step::Caller(ra_slot)
    }
}

enum Step {
    /// The caller's registers were computed; the return address was read from this slot.
    Caller(usize),
    Signal,
    Failed,
}

/// Evaluates a CFI expression (`initial` is pushed first, as DWARF says for register rules).
fn evaluate(
    stack: &mut StackReader,
    bytecode: Slice<'_>,
    encoding: gimli::Encoding,
    regs: &Registers,
    initial: Option<u64>,
) -> Option<u64> {
    let mut evaluation = Evaluation::<_, FixedEvaluation>::new_in(bytecode, encoding);
    if let Some(value) = initial {
        evaluation.set_initial_value(value);
    }
    let mut result = evaluation.evaluate().ok()?;
    loop {
        result = match result {
            EvaluationResult::Complete => break,
            EvaluationResult::RequiresRegister { register, .. } => {
                let value = regs.get(register.0 as usize).copied().flatten()?;
                evaluation
                    .resume_with_register(Value::Generic(value))
                    .ok()?
            }
            EvaluationResult::RequiresMemory {
                address, size: 8, ..
            } => {
                let value = stack.read_u64(address as usize)?;
                evaluation.resume_with_memory(Value::Generic(value)).ok()?
            }
            _ => return None,
        };
    }
    evaluation.value_result()?.to_u64(u64::MAX).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn walk_here(depth: usize, found: &mut Vec<Frame>) -> WalkEnd {
        if depth > 0 {
            let end = walk_here(depth - 1, found);
            std::hint::black_box(depth);
            return end;
        }
        // Registers of a point in this function, as a signal frame would hold them: take
        // them from `getcontext`.
        // SAFETY: getcontext fills the ucontext we own.
        let mut uc: libc::ucontext_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::getcontext(&mut uc) }, 0);
        let gregs: [u64; GENERAL] = std::array::from_fn(|i| uc.uc_mcontext.gregs[i] as u64);
        let mut tables = Tables::default();
        tables.refresh();
        let mut walker = Walker::default();
        found.reserve(512);
        walker.walk(&tables, &gregs, found, 512)
    }

    #[test]
    fn a_walk_reaches_the_threads_first_frame_through_every_caller() {
        let mut frames = Vec::new();
        let end = std::thread::spawn(move || {
            let end = walk_here(5, &mut frames);
            (end, frames)
        })
        .join()
        .unwrap();
        let (end, frames) = end;
        assert_eq!(end, WalkEnd::Complete, "{frames:x?}");
        // The recursion's frames are there, each a return address one level up the stack.
        let own = walk_here as *const () as usize;
        let sym = crate::inspect::executable()
            .unwrap()
            .function_containing(own)
            .cloned()
            .unwrap();
        let inside = frames
            .iter()
            .filter(|f| (sym.address..sym.address + sym.size).contains(&f.pc))
            .count();
        assert!(inside >= 6, "{inside} frames in walk_here: {frames:x?}");
        assert!(frames.windows(2).all(|w| w[0].sp < w[1].sp));
        assert!(frames[1..]
            .iter()
            .all(|f| f.slot != 0 && f.kind == FrameKind::Return));
    }
}
