//! Catching function exits: a per-thread shadow stack of return addresses, with unwind info so
//! that panics (and backtraces) pass through probed frames.
//!
//! # Protocol
//!
//! An entry hook calls [`Entry::on_return`] (or a trampoline does the same in machine code, see
//! [`crate::Detour::set_latency`]): the real return address, the slot's address, a timestamp
//! and a [`Sink`] are pushed on the calling thread's shadow stack at depth `d`, and the
//! return-address slot is overwritten with the address of *exit stub `d`* of this thread. Each
//! thread owns a block of [`DEPTH`] exit stubs (16 bytes each):
//!
//! ```text
//! stub d:  int3 (padding)  ; mov r11d, d ; jmp [rip + common]
//! common:  save rax, rdx, xmm0, xmm1 ; probes off for the thread (the guard)
//!          call exit_hook(d) -> real return address ; guard back ; restore ; jmp r11
//! ```
//!
//! `exit_hook` reports depth `d` to its sink (entries above it belong to frames that were
//! unwound: they are reported as such), pops it, and returns the real return address. Recursion
//! works because each frame has its own depth; a call deeper than [`DEPTH`] probed frames is
//! simply not timed. The exit path runs with the thread's re-entrancy guard set
//! ([`crate::thread_state`]): a sink that calls a probed function does not push frames onto the
//! stack it is popping.
//!
//! # Unwinding
//!
//! The unwinder, stepping out of a probed frame, finds exit stub `d` as the return address. The
//! stub block has an FDE ([`crate::unwind`]): at stub `d` the CFA is `rsp - 8` (not `rsp`: a
//! frame of size zero would share its caller's identity and libgcc aborts the unwind when the
//! handler is in the caller), the caller's `rsp` is `CFA + 8`, and the return address is
//! `DW_CFA_val_expression: deref(&shadow[d].ret)` — an absolute address, which is why stub
//! blocks are per thread. So unwinding and backtraces see the real caller. The CIE names a
//! personality routine: in the cleanup phase of an unwind it pops the frames from depth `d` up
//! and reports them to their sinks as unwound; the search phase passes on. The return address
//! the unwinder looks up is `stub + 1` (after the padding byte), so the lookup of `ra - 1` falls
//! into stub `d` itself.
//!
//! Blocks of exited threads return to a pool and are reused with their FDE.
//!
//! The thread's state (frames, exit stubs, depth) is part of the thread state generated code
//! reads at one offset from the thread pointer ([`crate::thread_state`]), so detour trampolines
//! push frames in machine code with the same layout; [`Entry::on_return`] is the Rust path for
//! the cases the trampoline leaves to the hook.
//!
//! # Sinks and their reclamation
//!
//! A [`Sink`] is a shared handle. Frames and trampolines hold its address only; the last handle
//! dropped *retires* it, and [`reclaim_sinks`] frees a retired sink once no frame of any thread
//! names it. Reports happen before the frame is popped (and a popped frame's sink is cleared),
//! so a frame names its sink until the sink's last use by that frame. The caller of
//! [`reclaim_sinks`] holds the world stopped and guarantees no thread is between reading a sink
//! from a trampoline and writing it into a frame (no thread's PC in a trampoline), and that no
//! hook can still push it (the sink's handle is gone, so no probe list holds it).
//!
//! # Safety
//!
//! Stub blocks are mapped, written and made executable before any return address points at
//! them, and are never unmapped; the FDE bytes are leaked so the unwinder may read them forever.
//! The entry hook writes the return-address slot the trampoline passed, which is the caller's
//! slot for this very call. The exit hook and the personality run on the thread that owns the
//! shadow stack. Retired sinks are freed only as argued above.
#![allow(unsafe_code)]

use crate::detour::Entry;
use crate::sys::memory::{self, Protection};
use crate::thread_state::{self, Locked, ShadowState, Unprobed};
use crate::unwind::{self, RA, RSP};
use gimli::write::CallFrameInstruction;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Probed frames a thread can have at once with their exit caught.
pub const DEPTH: usize = 128;
const STUB: usize = 16;

/// Receives the calls whose exit was caught.
pub trait ReturnSink: Send + Sync {
    /// A call entered at tick `entered` left at tick `left` ([`ticks`]); `unwound` if a panic
    /// or exception unwound through the frame instead of a return.
    fn returned(&self, entered: u64, left: u64, unwound: bool);
}

/// What frames and trampolines point at: never moved, freed by [`reclaim_sinks`].
struct SinkBox {
    target: Arc<dyn ReturnSink>,
}

/// Retires its sink when the last handle goes.
struct Holder(NonNull<SinkBox>);

// SAFETY: the box holds an `Arc<dyn ReturnSink>` (Send + Sync); the pointer is owned.
unsafe impl Send for Holder {}
// SAFETY: as above.
unsafe impl Sync for Holder {}

impl Drop for Holder {
    fn drop(&mut self) {
        let _unprobed = Unprobed::enter();
        retired().push(self.0.as_ptr() as usize);
    }
}

/// Where timed calls of a probe are reported: a shared handle (see the module docs).
///
/// # Example
///
/// ```
/// use evolve_code::shadow::{ReturnSink, Sink};
/// use std::sync::{atomic::{AtomicU64, Ordering}, Arc};
///
/// struct Calls(AtomicU64);
/// impl ReturnSink for Calls {
///     fn returned(&self, _entered: u64, _left: u64, _unwound: bool) {
///         self.0.fetch_add(1, Ordering::Relaxed);
///     }
/// }
/// let calls = Arc::new(Calls(AtomicU64::new(0)));
/// let sink = Sink::new(calls.clone());
/// drop(sink); // retired: freed once no shadow frame names it
/// ```
#[derive(Clone)]
pub struct Sink(Arc<Holder>);

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sink({:#x})", self.address())
    }
}

impl Sink {
    /// A sink reporting to `target`.
    pub fn new(target: Arc<dyn ReturnSink>) -> Sink {
        let boxed = Box::new(SinkBox { target });
        Sink(Arc::new(Holder(NonNull::from(Box::leak(boxed)))))
    }

    /// The address frames and trampolines store.
    pub(crate) fn address(&self) -> usize {
        self.0 .0.as_ptr() as usize
    }
}

fn retired() -> Locked<'static, Vec<usize>> {
    static RETIRED: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    Locked::new(&RETIRED)
}

/// Sinks retired and not freed yet.
pub fn retired_sinks() -> usize {
    retired().len()
}

/// A shadow-stack entry. Layout fixed: trampolines write it (see [`crate::detour`]).
#[repr(C)]
#[derive(Clone, Copy)]
struct Frame {
    ret: usize,
    slot: usize,
    entered: u64,
    /// A `SinkBox` address, 0: none.
    sink: usize,
}

const EMPTY: Frame = Frame {
    ret: 0,
    slot: 0,
    entered: 0,
    sink: 0,
};

struct Block {
    stubs: usize,
    frames: *mut [Frame; DEPTH],
}

// SAFETY: a block is used by one thread at a time (its owner, or the pool while unowned).
unsafe impl Send for Block {}

struct Pool {
    /// Every block ever made (their frames are scanned by `reclaim_sinks`).
    all: Vec<usize>,
    free: Vec<Block>,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    all: Vec::new(),
    free: Vec::new(),
});

fn pool() -> Locked<'static, Pool> {
    Locked::new(&POOL)
}

/// Owns the thread's block; returns it to the pool when the thread exits.
struct ThreadShadow {
    block: Option<Block>,
}

impl Drop for ThreadShadow {
    fn drop(&mut self) {
        if let Some(b) = self.block.take() {
            // Calls made by later destructors of this thread are not timed; the pool's vector
            // may allocate, with probes off (a probed `free` must not come back here).
            let _unprobed = Unprobed::enter();
            // SAFETY: this thread's own state; no reference to it is alive here.
            let f = unsafe { &mut *thread_state::shadow() };
            (f.frames, f.stubs, f.top) = (0, 0, 0);
            // SAFETY: the block's frames belong to this thread until it is pooled.
            unsafe { (*b.frames).fill(EMPTY) };
            pool().free.push(b);
        }
    }
}

thread_local! {
    static SHADOW: std::cell::UnsafeCell<ThreadShadow> =
        const { std::cell::UnsafeCell::new(ThreadShadow { block: None }) };
}

/// Whether trampolines time calls in machine code ([`crate::Detour::set_latency`]) in this
/// process (its thread-local storage is at a fixed offset from the thread pointer).
pub fn trampolines_time_calls() -> bool {
    fast_offset().is_some()
}

/// The offset of the thread's shadow-stack state (frames, stubs, depth, 8 bytes each) from the
/// thread pointer, if generated code may use it.
pub(crate) fn fast_offset() -> Option<i32> {
    thread_state::offset().map(|o| o + thread_state::SHADOW)
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

/// The guard's offset from the thread pointer for the exit path (0: unknown, then `exit_hook`
/// sets the guard itself, after its own entry).
static EXIT_GUARD_OFFSET: AtomicIsize = AtomicIsize::new(0);

core::arch::global_asm!(
    ".globl evolve_shadow_exit_common",
    "evolve_shadow_exit_common:",
    "push rax",
    "push rdx",
    "sub rsp, 40",
    "movdqu [rsp], xmm0",
    "movdqu [rsp+16], xmm1",
    // Probes off for this thread while the exit is reported (the previous guard at [rsp+32]).
    "mov r10, qword ptr [rip + {guard}]",
    "test r10, r10",
    "jz 2f",
    "mov rax, qword ptr fs:[r10]",
    "mov [rsp+32], rax",
    "mov qword ptr fs:[r10], 1",
    "2:",
    "mov rdi, r11",
    "call {hook}",
    "mov r11, rax",
    "mov r10, qword ptr [rip + {guard}]",
    "test r10, r10",
    "jz 3f",
    "mov rdx, [rsp+32]",
    "mov qword ptr fs:[r10], rdx",
    "3:",
    "movdqu xmm0, [rsp]",
    "movdqu xmm1, [rsp+16]",
    "add rsp, 40",
    "pop rdx",
    "pop rax",
    "jmp r11",
    hook = sym exit_hook,
    guard = sym EXIT_GUARD_OFFSET,
);

unsafe extern "C" {
    fn evolve_shadow_exit_common();
    fn _Unwind_GetIP(context: *mut core::ffi::c_void) -> usize;
}

/// Reports `frame` to its sink.
fn report(frame: &Frame, left: u64, unwound: bool) {
    if frame.sink != 0 {
        // SAFETY: a sink named by a frame is not freed (module docs: Sinks).
        let sink = unsafe { &*(frame.sink as *const SinkBox) };
        sink.target.returned(frame.entered, left, unwound);
    }
}

/// Pops `frames[from..top]` (reported already): clears their sinks, then lowers the depth.
fn pop(state: &mut ShadowState, frames: &mut [Frame; DEPTH], from: usize) {
    for f in &mut frames[from..state.top] {
        f.sink = 0;
    }
    // The sinks are cleared before the frames leave the stack (a stop of the world sees the
    // thread's own order).
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
    state.top = from;
}

extern "C" fn exit_hook(depth: usize) -> usize {
    let _unprobed = Unprobed::enter();
    let left = ticks();
    // SAFETY: only this thread touches its state; no other reference to it is alive.
    let f = unsafe { &mut *thread_state::shadow() };
    // SAFETY: an exit stub runs only on a thread with a block; its frames are this thread's.
    let frames = unsafe { &mut *(f.frames as *mut [Frame; DEPTH]) };
    if f.top > depth + 1 {
        unwound_above(&frames[depth + 1..f.top], left);
    }
    let frame = frames[depth];
    report(&frame, left, false);
    pop(f, frames, depth);
    frame.ret
}

/// Frames above a returning one were unwound without our personality seeing them.
#[cold]
#[inline(never)]
fn unwound_above(frames: &[Frame], left: u64) {
    for f in frames.iter().rev() {
        report(f, left, true);
    }
}

/// Pops frames from `depth` up as unwound (the personality's cleanup phase).
fn unwound_from(depth: usize) {
    let _unprobed = Unprobed::enter();
    let left = ticks();
    // SAFETY: as in `exit_hook`.
    let f = unsafe { &mut *thread_state::shadow() };
    if f.frames == 0 || depth >= f.top {
        return;
    }
    // SAFETY: the block's frames belong to this thread.
    let frames = unsafe { &mut *(f.frames as *mut [Frame; DEPTH]) };
    for frame in frames[depth..f.top].iter().rev() {
        report(frame, left, true);
    }
    pop(f, frames, depth);
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
        let stubs = unsafe { &*thread_state::shadow() }.stubs;
        if stubs != 0 && (stubs..stubs + DEPTH * STUB).contains(&ip) {
            unwound_from((ip - stubs) / STUB);
        }
    }
    URC_CONTINUE_UNWIND
}

/// `.eh_frame` describing a stub block (see the module docs: Unwinding).
fn eh_frame(stubs: usize, frames: *mut [Frame; DEPTH]) -> Vec<u8> {
    // The stub's "frame" has no size: with CFA = rsp it would have the same identity (the
    // CFA libgcc compares) as its caller's frame, and an unwind whose handler is in the caller
    // aborts in phase 2 (`gcc_assert (!match_handler)` when it reaches the stub). So the CFA
    // is `rsp - 8` and the caller's rsp is given explicitly as CFA + 8 (= rsp at the stub).
    let mut cie = unwind::cie(&[
        CallFrameInstruction::Cfa(RSP, -8),
        CallFrameInstruction::ValOffset(RSP, 8),
    ]);
    cie.personality = Some((
        gimli::constants::DW_EH_PE_absptr,
        gimli::write::Address::Constant(personality as *const () as u64),
    ));
    let rules = (0..DEPTH).map(|d| {
        // SAFETY: only the address is taken, not a reference.
        let ret = unsafe { std::ptr::addr_of!((*frames)[d].ret) } as usize;
        (
            (d * STUB) as u32,
            CallFrameInstruction::ValExpression(RA, unwind::word_at(ret)),
        )
    });
    unwind::eh_frame(cie, stubs, DEPTH * STUB, rules)
}

fn new_block() -> Option<Block> {
    if let Some(offset) = thread_state::offset() {
        EXIT_GUARD_OFFSET.store((offset + thread_state::GUARD) as isize, Ordering::Relaxed);
    }
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
    // SAFETY: the fresh mapping becomes executable code, which nobody has used yet.
    unsafe { memory::mprotect(stubs..stubs + len, Protection::READ_EXEC) }.ok()?;
    let frames = Box::into_raw(Box::new([EMPTY; DEPTH]));
    // Registered for the life of the process: blocks are pooled, never unmapped.
    std::mem::forget(unwind::register(eh_frame(stubs, frames)));
    pool().all.push(frames as usize);
    Some(Block { stubs, frames })
}

impl Entry<'_> {
    /// Catches this call's exit: `sink` is told when it returns or is unwound. Returns false
    /// (and changes nothing) if the thread already has [`DEPTH`] caught frames or no stub
    /// block could be mapped.
    pub fn on_return(&mut self, sink: &Sink) -> bool {
        let slot = self.stack_pointer();
        // SAFETY: only this thread touches its state; no other reference to it is alive.
        let mut f = unsafe { &mut *thread_state::shadow() };
        if f.frames == 0 {
            first_block();
            // SAFETY: as above (the previous reference is not used again).
            f = unsafe { &mut *thread_state::shadow() };
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
            dead_frames(f, frames, slot, entered);
        }
        if f.top == DEPTH {
            return false;
        }
        let d = f.top;
        frames[d] = Frame {
            ret: self.regs.ret,
            slot,
            entered,
            sink: sink.address(),
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
    let _unprobed = Unprobed::enter();
    let pooled = pool().free.pop();
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
        let f = unsafe { &mut *thread_state::shadow() };
        (f.frames, f.stubs, f.top) = (frames, stubs, 0);
    }
}

/// Reports the dead frames at or below `slot` as unwound and pops them.
#[cold]
#[inline(never)]
fn dead_frames(state: &mut ShadowState, frames: &mut [Frame; DEPTH], slot: usize, now: u64) {
    let mut top = state.top;
    while top > 0 && frames[top - 1].slot <= slot {
        top -= 1;
        report(&frames[top], now, true);
    }
    pop(state, frames, top);
}

/// `ret` itself, or, if it is one of this thread's exit stubs, the return address its frame
/// saved.
pub(crate) fn real_return_address(ret: usize) -> usize {
    // SAFETY: a read of this thread's own state.
    let f = unsafe { &*thread_state::shadow() };
    if f.stubs != 0 && (f.stubs..f.stubs + DEPTH * STUB).contains(&ret) {
        let d = (ret - f.stubs) / STUB;
        // SAFETY: this thread's frames.
        return unsafe { (*(f.frames as *const [Frame; DEPTH]))[d].ret };
    }
    ret
}

/// Probed frames of the calling thread whose exit is being caught now.
pub fn depth() -> usize {
    // SAFETY: a read of this thread's own state.
    unsafe { &*thread_state::shadow() }.top
}

/// The locks [`reclaim_sinks`] needs, taken before the world is stopped (a stopped thread may
/// hold them otherwise).
pub(crate) struct SinkLocks {
    pool: Locked<'static, Pool>,
    retired: Locked<'static, Vec<usize>>,
}

impl SinkLocks {
    /// Sinks retired and not freed yet.
    pub(crate) fn retired(&self) -> usize {
        self.retired.len()
    }
}

pub(crate) fn sink_locks() -> SinkLocks {
    SinkLocks {
        pool: pool(),
        retired: retired(),
    }
}

/// With the world stopped and no thread's PC in a trampoline (see the module docs): marks in
/// `free` the retired sinks no frame of any thread names. Takes no lock, allocates nothing.
pub(crate) fn idle_sinks(locks: &SinkLocks, free: &mut [bool]) {
    for (sink, free) in locks.retired.iter().zip(free.iter_mut()) {
        *free = !locks.pool.all.iter().any(|&frames| {
            // SAFETY: blocks are never freed; their owners are stopped, so nothing writes
            // them while they are read (volatile: written by other threads' plain stores,
            // ordered before this read by the stop).
            (0..DEPTH).any(|d| unsafe {
                std::ptr::read_volatile(std::ptr::addr_of!((*(frames as *const [Frame; DEPTH]))[d].sink))
            } == *sink)
        });
    }
}

/// After the world resumed: frees the sinks [`idle_sinks`] marked.
pub(crate) fn free_sinks(mut locks: SinkLocks, free: &[bool]) {
    let retired = std::mem::take(&mut *locks.retired);
    let mut kept = Vec::new();
    let mut freed = Vec::new();
    for (sink, &f) in retired
        .into_iter()
        .zip(free.iter().chain(std::iter::repeat(&false)))
    {
        if f {
            freed.push(sink);
        } else {
            kept.push(sink);
        }
    }
    *locks.retired = kept;
    drop(locks);
    for sink in freed {
        // SAFETY: retired (no handle), named by no frame, and no thread could be about to push
        // it (module docs: Sinks): nothing can reach it any more.
        drop(unsafe { Box::from_raw(sink as *mut SinkBox) });
    }
}
