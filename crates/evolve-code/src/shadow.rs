//! Catching function exits: a per-thread shadow stack of return addresses, with unwind info so
//! that panics (and backtraces) pass through probed frames.
//!
//! # Protocol
//!
//! An entry hook calls [`Entry::on_return`]: the real return address, the slot's address, a
//! timestamp and a [`ReturnSink`] are pushed on the calling thread's shadow stack at depth `d`,
//! and the return-address slot is overwritten with the address of *exit stub `d`* of this
//! thread. Each thread owns a block of [`DEPTH`] exit stubs (16 bytes each):
//!
//! ```text
//! stub d:  int3 (padding)  ; mov r11d, d ; jmp [rip + common]
//! common:  save rax, rdx, xmm0, xmm1 ; call exit_hook(d) -> real return address
//!          restore ; jmp r11
//! ```
//!
//! `exit_hook` pops depth `d` (entries above it belong to frames that were unwound: they are
//! reported as such), reports the call to its sink, and returns the real return address.
//! Recursion works because each frame has its own depth; a call deeper than [`DEPTH`] probed
//! frames is simply not timed (the hook reports `false`).
//!
//! # Unwinding
//!
//! The unwinder, stepping out of a probed frame, finds exit stub `d` as the return address. The
//! stub block has an FDE registered with `__register_frame`: at stub `d` the CFA is `rsp - 8`
//! (not `rsp`: a frame of size zero would share its caller's identity and libgcc aborts the
//! unwind when the handler is in the caller), the caller's `rsp` is `CFA + 8`, and
//! the return address is `DW_CFA_val_expression: deref(&shadow[d].ret)` — an absolute address,
//! which is why stub blocks are per thread. So unwinding and backtraces see the real caller.
//! The CIE names a personality routine: in the cleanup phase of an unwind it pops the frames
//! from depth `d` up and reports them to their sinks as unwound; the search phase passes on.
//! The return address the unwinder looks up is `stub + 1` (after the padding byte), so the
//! lookup of `ra - 1` falls into stub `d` itself.
//!
//! Blocks of exited threads return to a pool and are reused with their FDE.
//!
//! The thread's state (frames, exit stubs, depth) is a `#[repr(C)]` thread-local at one offset
//! from the thread pointer in every thread ([`trampolines_time_calls`] checks), so detour
//! trampolines push frames in machine code with the same layout ([`crate::Detour::set_latency`]);
//! [`Entry::on_return`] is the Rust path for the cases the trampoline leaves to the hook.
//!
//! # Safety
//!
//! Stub blocks are mapped, written and made executable before any return address points at
//! them, and are never unmapped; the FDE bytes are leaked so the unwinder may read them forever.
//! The entry hook writes the return-address slot the trampoline passed, which is the caller's
//! slot for this very call. The exit hook and the personality run on the thread that owns the
//! shadow stack.
#![allow(unsafe_code)]

use crate::detour::Entry;
use crate::sys::memory::{self, Protection};
use std::cell::UnsafeCell;
use std::sync::{Mutex, OnceLock};

/// Probed frames a thread can have at once with their exit caught.
pub const DEPTH: usize = 128;
const STUB: usize = 16;

/// Receives the calls whose exit was caught.
pub trait ReturnSink: Sync {
    /// A call entered at tick `entered` left at tick `left` ([`ticks`]); `unwound` if a panic
    /// or exception unwound through the frame instead of a return.
    fn returned(&self, entered: u64, left: u64, unwound: bool);
}

/// A [`ReturnSink`] behind a thin pointer, as shadow frames (and trampolines) store it.
pub struct Sink(pub &'static dyn ReturnSink);

/// A shadow-stack entry. Layout fixed: trampolines write it (see [`crate::detour`]).
#[repr(C)]
#[derive(Clone, Copy)]
struct Frame {
    ret: usize,
    slot: usize,
    entered: u64,
    sink: Option<&'static Sink>,
}

/// The thread's shadow stack as generated code reads it, at [`fast_offset`] from the thread
/// pointer: frames (0: no block yet), exit stubs, depth.
#[repr(C)]
struct Fast {
    frames: usize,
    stubs: usize,
    top: usize,
}

struct Block {
    stubs: usize,
    frames: *mut [Frame; DEPTH],
}

// SAFETY: a block is used by one thread at a time (its owner, or the pool while unowned).
unsafe impl Send for Block {}

static POOL: Mutex<Vec<Block>> = Mutex::new(Vec::new());

/// Owns the thread's block; returns it to the pool when the thread exits.
struct ThreadShadow {
    block: Option<Block>,
}

impl Drop for ThreadShadow {
    fn drop(&mut self) {
        if let Some(b) = self.block.take() {
            // Calls made by later destructors of this thread are not timed.
            let _ = FAST.try_with(|f| {
                // SAFETY: this thread's own state; no reference to it is alive here.
                let f = unsafe { &mut *f.get() };
                (f.frames, f.stubs, f.top) = (0, 0, 0);
            });
            POOL.lock().unwrap_or_else(|p| p.into_inner()).push(b);
        }
    }
}

thread_local! {
    static SHADOW: UnsafeCell<ThreadShadow> = const { UnsafeCell::new(ThreadShadow { block: None }) };
    static FAST: UnsafeCell<Fast> = const { UnsafeCell::new(Fast { frames: 0, stubs: 0, top: 0 }) };
}

/// This thread's [`Fast`] state. Callers hold no other reference to it.
fn fast() -> *mut Fast {
    FAST.with(|f| f.get())
}

fn fast_offset_here() -> isize {
    fast() as isize - crate::counter::thread_pointer() as isize
}

/// Whether trampolines time calls in machine code ([`crate::Detour::set_latency`]) in this
/// process (its thread-local storage is at a fixed offset from the thread pointer).
pub fn trampolines_time_calls() -> bool {
    fast_offset().is_some()
}

/// The offset of the thread's shadow-stack state ([`Fast`]: frames, stubs, depth, 8 bytes each)
/// from the thread pointer, if the same in every thread (checked on two) and a 32-bit value.
pub(crate) fn fast_offset() -> Option<i32> {
    static OFFSET: OnceLock<Option<i32>> = OnceLock::new();
    *OFFSET.get_or_init(|| {
        if std::env::var_os("EVOLVE_SHARED_COUNTERS").is_some() {
            return None;
        }
        let here = fast_offset_here();
        let there = std::thread::spawn(fast_offset_here).join().ok()?;
        (here == there).then(|| i32::try_from(here).ok()).flatten()
    })
}

/// The time-stamp counter (`rdtsc`): cheap, monotonic per core on modern x86-64.
pub fn ticks() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86-64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Nanoseconds per tick, measured once against the monotonic clock (20 ms).
pub fn ns_per_tick() -> f64 {
    static RATE: OnceLock<f64> = OnceLock::new();
    *RATE.get_or_init(|| {
        let (t0, c0) = (std::time::Instant::now(), ticks());
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (t1, c1) = (t0.elapsed(), ticks());
        t1.as_nanos() as f64 / (c1 - c0).max(1) as f64
    })
}

core::arch::global_asm!(
    ".globl evolve_shadow_exit_common",
    "evolve_shadow_exit_common:",
    "push rax",
    "push rdx",
    "sub rsp, 32",
    "movdqu [rsp], xmm0",
    "movdqu [rsp+16], xmm1",
    "mov rdi, r11",
    "call {hook}",
    "mov r11, rax",
    "movdqu xmm0, [rsp]",
    "movdqu xmm1, [rsp+16]",
    "add rsp, 32",
    "pop rdx",
    "pop rax",
    "jmp r11",
    hook = sym exit_hook,
);

unsafe extern "C" {
    fn evolve_shadow_exit_common();
    fn _Unwind_GetIP(context: *mut core::ffi::c_void) -> usize;
}

extern "C" fn exit_hook(depth: usize) -> usize {
    let left = ticks();
    // SAFETY: only this thread touches its state; no other reference to it is alive.
    let f = unsafe { &mut *fast() };
    // SAFETY: an exit stub runs only on a thread with a block; its frames are this thread's.
    let frames = unsafe { &mut *(f.frames as *mut [Frame; DEPTH]) };
    if f.top > depth + 1 {
        unwound_above(&frames[depth + 1..f.top], left);
    }
    f.top = depth;
    let frame = &frames[depth];
    if let Some(sink) = frame.sink {
        sink.0.returned(frame.entered, left, false);
    }
    frame.ret
}

/// Frames above a returning one were unwound without our personality seeing them.
#[cold]
#[inline(never)]
fn unwound_above(frames: &[Frame], left: u64) {
    for f in frames.iter().rev() {
        if let Some(sink) = f.sink {
            sink.0.returned(f.entered, left, true);
        }
    }
}

/// Pops frames from `depth` up as unwound (the personality's cleanup phase).
fn unwound_from(depth: usize) {
    let left = ticks();
    // SAFETY: as in `exit_hook`.
    let f = unsafe { &mut *fast() };
    if f.frames == 0 || depth >= f.top {
        return;
    }
    // SAFETY: the block's frames belong to this thread.
    let frames = unsafe { &*(f.frames as *const [Frame; DEPTH]) };
    for frame in frames[depth..f.top].iter().rev() {
        if let Some(sink) = frame.sink {
            sink.0.returned(frame.entered, left, true);
        }
    }
    f.top = depth;
}

const URC_CONTINUE_UNWIND: i32 = 8;
const UA_CLEANUP_PHASE: i32 = 2;

extern "C" fn personality(
    _version: i32,
    actions: i32,
    _class: u64,
    _exception: *mut core::ffi::c_void,
    context: *mut core::ffi::c_void,
) -> i32 {
    if actions & UA_CLEANUP_PHASE != 0 {
        // SAFETY: the unwinder passes its context for this frame.
        let ip = unsafe { _Unwind_GetIP(context) };
        // SAFETY: a read of this thread's own state.
        let stubs = unsafe { &*fast() }.stubs;
        if stubs != 0 && (stubs..stubs + DEPTH * STUB).contains(&ip) {
            unwound_from((ip - stubs) / STUB);
        }
    }
    URC_CONTINUE_UNWIND
}

/// Appends `v` as unsigned LEB128 (DWARF call-frame data; the detours' unwind info uses it too).
pub(crate) fn uleb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// `.eh_frame` bytes (CIE, one FDE, terminator) describing a stub block.
fn eh_frame(stubs: usize, frames: *mut [Frame; DEPTH]) -> Vec<u8> {
    let mut cie = vec![0, 0, 0, 0]; // CIE id
    cie.push(1); // version
    cie.extend(b"zPR\0");
    uleb(&mut cie, 1); // code alignment
    cie.push(0x78); // data alignment -8
    cie.push(16); // return address column
    uleb(&mut cie, 10); // augmentation data: P (1 + 8), R (1)
    cie.push(0x00); // personality: absptr
    cie.extend((personality as *const () as u64).to_le_bytes());
    cie.push(0x00); // FDE pointers: absptr

    // The stub's "frame" has no size: with CFA = rsp it would have the same identity (the
    // CFA libgcc compares) as its caller's frame, and an unwind whose handler is in the caller
    // aborts in phase 2 (`gcc_assert (!match_handler)` when it reaches the stub). So the CFA
    // is `rsp - 8` and the caller's rsp is given explicitly as CFA + 8 (= rsp at the stub).
    cie.extend([0x12, 7, 1]); // DW_CFA_def_cfa_sf rsp, 1 * -8
    cie.extend([0x15, 7, 0x7f]); // DW_CFA_val_offset_sf rsp, -1 * -8
    while (cie.len() + 4) % 8 != 0 {
        cie.push(0); // DW_CFA_nop
    }
    let mut out = Vec::new();
    out.extend((cie.len() as u32).to_le_bytes());
    out.extend(&cie);
    let fde_start = out.len();
    let mut fde = Vec::new();
    fde.extend(((fde_start + 4) as u32).to_le_bytes()); // CIE pointer (back to offset 0)
    fde.extend((stubs as u64).to_le_bytes());
    fde.extend(((DEPTH * STUB) as u64).to_le_bytes());
    uleb(&mut fde, 0); // augmentation data
    for d in 0..DEPTH {
        if d > 0 {
            fde.push(0x40 | STUB as u8); // DW_CFA_advance_loc 16
        }
        // SAFETY: only the address is taken, not a reference.
        let ret = unsafe { std::ptr::addr_of!((*frames)[d].ret) } as u64;
        fde.push(0x16); // DW_CFA_val_expression
        uleb(&mut fde, 16);
        uleb(&mut fde, 10);
        fde.push(0x03); // DW_OP_addr
        fde.extend(ret.to_le_bytes());
        fde.push(0x06); // DW_OP_deref
    }
    while (fde.len() + 4) % 8 != 0 {
        fde.push(0);
    }
    out.extend((fde.len() as u32).to_le_bytes());
    out.extend(fde);
    out.extend([0, 0, 0, 0]);
    out
}

fn new_block() -> Option<Block> {
    let len = (DEPTH * STUB + 8).next_multiple_of(memory::page_size());
    let stubs = memory::map_anywhere(
        len,
        Protection {
            read: true,
            write: true,
            exec: false,
        },
    )
    .ok()?;
    let mut code = Vec::with_capacity(len);
    let common_slot = stubs + DEPTH * STUB;
    for d in 0..DEPTH {
        let at = stubs + d * STUB;
        code.push(0xcc);
        code.extend([0x41, 0xbb]);
        code.extend((d as u32).to_le_bytes()); // mov r11d, d
        let rel = (common_slot as i64 - (at + 13) as i64) as i32;
        code.extend([0xff, 0x25]);
        code.extend(rel.to_le_bytes()); // jmp [rip + rel]
        code.extend([0xcc, 0xcc, 0xcc]);
    }
    code.extend((evolve_shadow_exit_common as *const () as u64).to_le_bytes());
    // SAFETY: a fresh private read-write mapping of `len` bytes; nobody executes it yet.
    unsafe { memory::write(stubs, &code) };
    memory::mprotect(stubs..stubs + len, Protection::READ_EXEC).ok()?;
    let frames = Box::into_raw(Box::new(
        [Frame {
            ret: 0,
            slot: 0,
            entered: 0,
            sink: None,
        }; DEPTH],
    ));
    let eh = eh_frame(stubs, frames).leak();
    // SAFETY: `eh` is a complete, zero-terminated .eh_frame section that lives forever.
    unsafe { crate::sys::unwind::register_frame(eh) };
    Some(Block { stubs, frames })
}

impl Entry<'_> {
    /// Catches this call's exit: `sink` is told when it returns or is unwound. Returns false
    /// (and changes nothing) if the thread already has [`DEPTH`] caught frames or no stub
    /// block could be mapped.
    pub fn on_return(&mut self, sink: &'static Sink) -> bool {
        let slot = self.stack_pointer();
        // SAFETY: only this thread touches its state; no other reference to it is alive.
        let mut f = unsafe { &mut *fast() };
        if f.frames == 0 {
            first_block();
            // SAFETY: as above (the previous reference is not used again).
            f = unsafe { &mut *fast() };
            if f.frames == 0 {
                return false;
            }
        }
        if (f.stubs..f.stubs + DEPTH * STUB).contains(&self.regs.ret) {
            // The trampoline already caught this call's exit.
            return true;
        }
        let entered = ticks();
        // SAFETY: this thread's frames.
        let frames = unsafe { &mut *(f.frames as *mut [Frame; DEPTH]) };
        // Frames at or below this slot are dead (a panic unwound them and was caught without
        // passing our personality, e.g. a foreign unwinder): report them.
        if f.top > 0 && frames[f.top - 1].slot <= slot {
            f.top = dead_frames(frames, f.top, slot, entered);
        }
        if f.top == DEPTH {
            return false;
        }
        let d = f.top;
        frames[d] = Frame {
            ret: self.regs.ret,
            slot,
            entered,
            sink: Some(sink),
        };
        f.top += 1;
        self.regs.ret = f.stubs + d * STUB + 1;
        true
    }
}

/// The thread's first caught call: a block from the pool, or a new one.
#[cold]
#[inline(never)]
fn first_block() {
    let pooled = POOL.lock().unwrap_or_else(|p| p.into_inner()).pop();
    let Some(block) = pooled.or_else(new_block) else {
        return;
    };
    let (frames, stubs) = (block.frames as usize, block.stubs);
    let owned = SHADOW.try_with(|s| {
        // SAFETY: this thread's own state; no other reference to it is alive.
        unsafe { &mut *s.get() }.block = Some(block);
    });
    if owned.is_ok() {
        // SAFETY: as above.
        let f = unsafe { &mut *fast() };
        (f.frames, f.stubs, f.top) = (frames, stubs, 0);
    }
}

/// Reports the dead frames at or below `slot` as unwound; returns the new top.
#[cold]
#[inline(never)]
fn dead_frames(frames: &[Frame; DEPTH], mut top: usize, slot: usize, now: u64) -> usize {
    while top > 0 && frames[top - 1].slot <= slot {
        top -= 1;
        if let Some(sink) = frames[top].sink {
            sink.0.returned(frames[top].entered, now, true);
        }
    }
    top
}

/// Probed frames of the calling thread whose exit is being caught now.
pub fn depth() -> usize {
    // SAFETY: a read of this thread's own state.
    unsafe { &*fast() }.top
}
