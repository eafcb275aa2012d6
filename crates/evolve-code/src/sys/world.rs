//! Stopping the world: every other thread of the process parked in a signal handler, with all
//! its registers and every context it can resume at, while the caller looks or writes.
//!
//! Every user of the engine that must know where all threads are calls [`stop_the_world`]:
//! entry detours (a `jmp` written over several instructions of a prologue), the release of
//! trampolines, reclamation (a patch is unloaded only if no thread can reach it), and later the
//! patching of any function's entry. There is one implementation, one signal and one set of
//! rules, documented here.
//!
//! # The invariant
//!
//! While the closure runs, every thread of the process other than the caller (the
//! *coordinator*) is parked in [`on_stop`], waiting on a futex, with its registers and extended
//! state copied into its slot — including threads created while the stop was being set up. No
//! parked thread executes a single instruction outside the handler until the closure has
//! returned or unwound. The closure gets a [`World`]: for each stopped thread its registers, its
//! frames as the unwind tables describe them (the PC it was stopped at, every return address,
//! and the PC saved in every signal frame on its stack: [`crate::sys::walk`]), and the live
//! parts of its stacks.
//!
//! # Protocol
//!
//! Under one global lock (`WORLD`), allocated state first — slots, frame buffers, the text
//! buffer of `/proc/self/maps`, the unwind tables ([`Tables::refresh`] asks the loader, whose
//! lock a stopped thread may hold, as it may hold the allocator's).
//!
//! 1. **Signal.** The coordinator opens a new *generation* `g` and lists `/proc/self/task`
//!    (`getdents64` into a preallocated buffer). For each thread not yet in the slot table it
//!    claims a slot, sets the slot's state to `(g, SIGNALLED)`, stores the thread id
//!    (`Release`) and the table's new length (`Release`), and only then queues the stop signal
//!    with `rt_tgsigqueueinfo`, carrying `g` in `si_value`, `si_code = SI_QUEUE` and our pid.
//! 2. **Park.** The handler recognises a signal of ours by `si_code`, `si_pid` and the magic in
//!    `si_value`; anything else — the program's own use of the signal — is forwarded to the
//!    program's handler ([`crate::sys::signal::Chain`]). It finds its slot by thread id and
//!    claims it with a compare-and-swap `(g, SIGNALLED) → (g, WRITING)`: a signal of an earlier,
//!    abandoned round (a real-time signal may be delivered long after it was sent) fails the
//!    swap and returns at once, so it never writes into a slot that now belongs to another
//!    round. It copies the general registers and the extended state (the XSAVE area:
//!    [`crate::sys::regs`]) from its signal frame, publishes `(g, PARKED)`, bumps `ARRIVALS`
//!    and wakes the coordinator, then sleeps on the `RESUMED` futex until it reaches `g`.
//! 3. **Wait.** The coordinator sleeps on the `ARRIVALS` futex — never spins: on a small machine
//!    the threads still to stop need the CPU it would burn (with four busy threads on two cores,
//!    an earlier yielding loop took 16 ms per stop, sleeping takes well under one) — until every
//!    slot is `PARKED`, or `GONE`: a thread that exited (`tgkill(tid, 0)` fails with `ESRCH`,
//!    checked at each 1 ms timeout). Two cases resume everyone and start a new round instead of
//!    waiting. A thread that blocks the stop signal *and sleeps* (its `SigBlk` and `State`,
//!    checked every 16 ms): glibc blocks all signals in a thread it is starting and in a thread
//!    that is exiting, which then takes the stack cache's lock — possibly held by a thread
//!    parked in `pthread_create`, so waiting would never end; the next round starts once that
//!    thread no longer sleeps with the signal blocked (or has exited), or the same lock holder
//!    and waiter could be caught again and again. (A *runnable* thread that blocks the signal
//!    is waited for: it parks or exits by itself.) And a full queue of real-time signals
//!    (`EAGAIN`). Past the deadline ([`DEFAULT_TIMEOUT`]) the round is abandoned and the error
//!    names the threads that did not stop, and whether they block the signal.
//! 4. **Stable.** It lists `/proc/self/task` again. A thread created since the last listing (by
//!    a thread that had not parked yet) is signalled and waited for as in 1-3; the round goes
//!    on only when a listing finds no thread it has not stopped. A parked thread cannot create
//!    threads, so the listings converge (a child exists in the list before `clone` returns in
//!    its parent, and the parent takes the signal only on that return); a thread id reused by a
//!    new thread after its old owner exited is recognised (its slot was `GONE`) and stopped
//!    afresh.
//! 5. **Look.** It reads `/proc/self/maps`, walks each thread's stack with the unwind tables
//!    (nothing allocated), and runs the closure.
//! 6. **Resume.** A guard, dropped when the closure returns *or panics* (and on every early
//!    exit) — or, for a panic, a panic hook before the panic is even reported (reporting
//!    allocates, and a parked thread may hold the allocator's lock) — abandons slots still `SIGNALLED` (`→ ABANDONED`), waits for slots being `WRITING`
//!    (a handler that claimed its slot finishes within microseconds, and must not write into a
//!    slot the next round reuses), then stores `RESUMED = g` and wakes every sleeper. It does
//!    not wait for the handlers to leave: a parked handler touches no shared state after
//!    parking but `INSIDE` (below), and a stop signal of the next round that reaches a thread
//!    still in its handler stays pending (the signal is blocked in its own handler) until
//!    `sigreturn`, when the thread takes it with its real registers.
//!
//! # Orderings
//!
//! - The slot's state, thread id and the table length are stored before the signal is queued;
//!   the handler reads them after it is delivered. The queueing system call and the delivery
//!   both take the target's signal lock, which orders them; the `Release` stores and the
//!   handler's `Acquire` loads (`SLOTS`, `SLOTS_LEN`, the thread id, the claim's `AcqRel`) say
//!   the same in the language's model, so the argument does not rest on the kernel alone.
//! - `(g, PARKED)` is stored with `Release` after the register copies (`Relaxed` stores into the
//!   slot); the coordinator reads the copies only after an `Acquire` load returns `PARKED`.
//! - `RESUMED = g` is stored with `Release` after the closure; a handler leaves only after an
//!   `Acquire` load sees it, so everything the closure wrote (code bytes, tables) happens before
//!   the thread runs again. (For code bytes the callers also make every core serialise,
//!   [`crate::sys::membarrier`]: ordering memory is not enough for instruction fetch.)
//! - `ARRIVALS` carries no data: it is the futex the coordinator sleeps on, bumped after each
//!   park so that a wake-up between its load and the sleep is not lost.
//! - `INSIDE` counts handlers between parking and returning (`AcqRel`); while it exceeds the
//!   number of threads parked in the current round, some thread is still leaving an earlier
//!   round's handler (with the signal blocked until it returns), so step 3 does not yet take a
//!   thread blocking the signal for one that must be let go.
//!
//! # Resumable contexts
//!
//! A thread whose innermost frame is a signal handler resumes, when the handler returns, at the
//! PC saved in the signal frame — possibly inside bytes being replaced even though the thread's
//! own RIP is in the handler. The walk finds signal frames by their restorer (CFI `S`
//! augmentation or the `rt_sigreturn` byte sequence) and records the saved PC as
//! [`FrameKind::Interrupted`]; the engine's own handlers need nothing more (the `SIGTRAP`
//! handler of the int3 protocol resumes a thread at the site, at the new target, or after the
//! site, all of which its saved PC `site + 1` conservatively covers for a range that holds the
//! site). Where the walk ends early (code without unwind information), [`World::resumable_in`]
//! is conservative: every word of the rest of that stack counts as a PC the thread may resume
//! at, and each word equal to the signal restorer leads to the signal frame above it, whose
//! saved PC and stack are covered in turn.
//!
//! # Signal choice
//!
//! `SIGRTMIN + 6`, a real-time signal: queued, never merged with a pending one, so each round's
//! signal is delivered. Installed with `SA_ONSTACK` (a thread near the end of its stack parks
//! on its alternate stack instead of overflowing) and `SA_RESTART` (system calls interrupted by
//! a stop resume transparently). The engine's handler is put back in front of a handler the
//! program installs on the same signal at every stop, and passes the program's signals on.
//!
//! # Safety
//!
//! The handler is async-signal-safe: raw system calls (`gettid`, `futex`), atomics of slots
//! that are leaked rather than freed (a late handler may still read an old table), `errno`
//! saved and restored. It reads the `siginfo_t` and `ucontext_t` the kernel passes. The closure
//! runs with every other thread parked: it must not allocate or take a lock another thread may
//! hold (documented on [`stop_the_world`]); breaking that deadlocks, it is not undefined
//! behaviour. A closure that panics resumes everyone from the engine's panic hook, before the
//! report allocates; if the program replaced that hook, from the guard as the panic unwinds.
#![allow(unsafe_code)]

use super::maps::MapsBuffer;
use super::regs::{self, Registers, GENERAL};
use super::signal::Chain;
use super::walk::{within_vec, Frame, FrameKind, Tables, WalkEnd, Walker};
use crate::error::{Error, ErrorKind, Result};
use std::ops::Range;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long [`stop_the_world`] waits for every thread to park.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The real-time signal that parks threads: `SIGRTMIN + 6`.
pub fn stop_signal() -> libc::c_int {
    libc::SIGRTMIN() + 6
}

/// `si_value` of our signals: this magic in the high half, the generation in the low half.
const MAGIC: u64 = 0x4556_4f4c << 32;

// Slot states (low byte of `Slot::state`; the generation is above it).
const IDLE: u64 = 0;
const SIGNALLED: u64 = 1;
const WRITING: u64 = 2;
const PARKED: u64 = 3;
const GONE: u64 = 4;
const ABANDONED: u64 = 5;

fn state(generation: u32, what: u64) -> u64 {
    (generation as u64) << 8 | what
}

/// A thread's slot: written by its handler, read by the coordinator.
struct Slot {
    tid: AtomicI32,
    state: AtomicU64,
    general: [AtomicU64; GENERAL],
    extended: Box<[AtomicU64]>,
    extended_len: AtomicUsize,
}

impl Slot {
    fn new(extended_words: usize) -> Slot {
        Slot {
            tid: AtomicI32::new(0),
            state: AtomicU64::new(IDLE),
            general: [const { AtomicU64::new(0) }; GENERAL],
            extended: (0..extended_words).map(|_| AtomicU64::new(0)).collect(),
            extended_len: AtomicUsize::new(0),
        }
    }
}

/// The slot table the handlers search (leaked: a late handler may read an old one).
static SLOTS: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());
static SLOTS_LEN: AtomicUsize = AtomicUsize::new(0);
/// Bumped by every handler that parks; the coordinator sleeps on it.
static ARRIVALS: AtomicU32 = AtomicU32::new(0);
/// Handlers between parking and returning: they block the stop signal until they return.
static INSIDE: AtomicU32 = AtomicU32::new(0);
/// The last generation resumed; parked handlers sleep on it.
static RESUMED: AtomicU32 = AtomicU32::new(0);
static GENERATION: AtomicU32 = AtomicU32::new(0);

static CHAIN: Chain = Chain::new(stop_signal, on_stop, libc::SA_ONSTACK | libc::SA_RESTART);

extern "C" fn on_stop(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: errno is thread-local; restored before returning.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler; a queued signal's
    // value and sender are set (SI_QUEUE).
    let (code, pid, value) = unsafe {
        let info = &*info;
        (
            info.si_code,
            info.si_pid(),
            info.si_value().sival_ptr as u64,
        )
    };
    // SAFETY: getpid has no preconditions.
    let ours =
        code == libc::SI_QUEUE && pid == unsafe { libc::getpid() } && value >> 32 == MAGIC >> 32;
    if !ours {
        // SAFETY: forwarded with the kernel's arguments.
        unsafe { CHAIN.forward(signal, info, context) };
    } else {
        // SAFETY: the kernel's ucontext for this handler.
        unsafe { park(value as u32, context as *const libc::ucontext_t) };
    }
    // SAFETY: see above.
    unsafe { *libc::__errno_location() = errno };
}

/// The handler's half of the protocol (module docs, step 2).
///
/// # Safety
///
/// `context` is the ucontext the kernel passed to the running handler.
unsafe fn park(generation: u32, context: *const libc::ucontext_t) {
    let tid = rustix::thread::gettid().as_raw_nonzero().get();
    let table = SLOTS.load(Ordering::Acquire);
    let len = SLOTS_LEN.load(Ordering::Acquire);
    if table.is_null() {
        return;
    }
    // SAFETY: SLOTS points to `len` leaked, never-freed slots (published in that order).
    let slots = unsafe { std::slice::from_raw_parts(table, len) };
    let Some(slot) = slots.iter().find(|s| s.tid.load(Ordering::Acquire) == tid) else {
        return;
    };
    if slot
        .state
        .compare_exchange(
            state(generation, SIGNALLED),
            state(generation, WRITING),
            Ordering::AcqRel,
            Ordering::Relaxed,
        )
        .is_err()
    {
        return; // a signal of an abandoned round
    }
    // SAFETY: the kernel's ucontext (caller).
    let mcontext = unsafe { &(*context).uc_mcontext };
    for (saved, value) in slot.general.iter().zip(mcontext.gregs.iter()) {
        saved.store(*value as u64, Ordering::Relaxed);
    }
    // SAFETY: `fpregs` belongs to this signal frame.
    let words = unsafe { regs::capture_extended(mcontext.fpregs as *const u8, &slot.extended) };
    slot.extended_len.store(words, Ordering::Relaxed);
    #[cfg(feature = "fault-injection")]
    super::inject::park_delay();
    INSIDE.fetch_add(1, Ordering::AcqRel);
    slot.state
        .store(state(generation, PARKED), Ordering::Release);
    ARRIVALS.fetch_add(1, Ordering::Release);
    let _ = rustix::thread::futex::wake(&ARRIVALS, rustix::thread::futex::Flags::PRIVATE, 1);
    loop {
        let now = RESUMED.load(Ordering::Acquire);
        if now.wrapping_sub(generation) as i32 >= 0 {
            break;
        }
        let _ =
            rustix::thread::futex::wait(&RESUMED, rustix::thread::futex::Flags::PRIVATE, now, None);
    }
    INSIDE.fetch_sub(1, Ordering::AcqRel);
}

/// Queues our stop signal for generation `g` on thread `tid`: `Ok(true)` if queued, `Ok(false)`
/// if the thread is gone, `Err` if the kernel's queue of real-time signals is full (`EAGAIN`,
/// `RLIMIT_SIGPENDING`): the round must be retried, the thread is not stopped.
fn send(tid: i32, generation: u32) -> std::result::Result<bool, Abort> {
    #[repr(C)]
    struct QueuedInfo {
        signo: i32,
        errno: i32,
        code: i32,
        _pad: i32,
        pid: i32,
        uid: u32,
        value: u64,
        _rest: [u64; 12],
    }
    // SAFETY: getpid/getuid have no preconditions.
    let (pid, uid) = unsafe { (libc::getpid(), libc::getuid()) };
    let info = QueuedInfo {
        signo: stop_signal(),
        errno: 0,
        code: libc::SI_QUEUE,
        _pad: 0,
        pid,
        uid,
        value: MAGIC | generation as u64,
        _rest: [0; 12],
    };
    const _: () = assert!(std::mem::size_of::<QueuedInfo>() == 128);
    // SAFETY: rt_tgsigqueueinfo reads a 128-byte siginfo laid out as the kernel's for SI_QUEUE;
    // a thread of our own process (a stale id fails with ESRCH).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rt_tgsigqueueinfo,
            pid,
            tid,
            stop_signal(),
            &info as *const QueuedInfo,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ESRCH) => Ok(false),
        Some(libc::EAGAIN) => Err(Abort::QueueFull(tid)),
        errno => Err(Abort::Os(Error::new(ErrorKind::Os {
            operation: "rt_tgsigqueueinfo (the stop signal)",
            errno: errno.unwrap_or(0),
        }))),
    }
}

/// What `/proc/self/task/<tid>/status` says of a thread, read without allocating.
#[derive(Clone, Copy)]
struct TaskStatus {
    /// It blocks the stop signal (`SigBlk`).
    blocks: bool,
    /// It sleeps in the kernel, interruptibly (`State: S`): possibly on a lock a parked thread
    /// holds.
    sleeping: bool,
}

/// Reads thread `tid`'s status. glibc blocks every signal in a thread it is starting, until the
/// thread runs its start routine, and in a thread that is exiting, which may then wait for a
/// lock held by a parked thread (the stack cache's): such a thread parks only after the others
/// resume.
fn task_status(tid: i32) -> Option<TaskStatus> {
    let mut path = [0u8; 64];
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        path[len..len + bytes.len()].copy_from_slice(bytes);
        len += bytes.len();
    };
    push(b"/proc/self/task/");
    let mut digits = [0u8; 12];
    let mut n = tid as u32;
    let mut d = digits.len();
    loop {
        d -= 1;
        digits[d] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    push(&digits[d..]);
    push(b"/status\0");
    let mut text = [0u8; 4096];
    // SAFETY: a NUL-terminated path in a local buffer; read into a local buffer of its length;
    // the descriptor is closed.
    let read = unsafe {
        let fd = libc::open(
            path.as_ptr() as *const libc::c_char,
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return None;
        }
        let n = libc::read(fd, text.as_mut_ptr() as *mut libc::c_void, text.len());
        libc::close(fd);
        n
    };
    let text = &text[..usize::try_from(read).ok()?];
    let field = |name: &[u8]| {
        let at = text.windows(name.len()).position(|w| w == name)? + name.len();
        Some(text[at..].iter().skip_while(|b| b.is_ascii_whitespace()))
    };
    let mask = field(b"SigBlk:")?
        .take_while(|b| b.is_ascii_hexdigit())
        .try_fold(0u64, |m, b| {
            Some(m << 4 | (*b as char).to_digit(16)? as u64)
        })?;
    let state = *field(b"State:")?.next()?;
    Some(TaskStatus {
        blocks: mask >> (stop_signal() - 1) & 1 != 0,
        sleeping: state == b'S',
    })
}

fn alive(tid: i32) -> bool {
    // SAFETY: signal 0 only checks that the thread exists.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, 0) == 0 }
}

/// Per-thread results, copied out of the slots after everyone parked.
struct Record {
    tid: i32,
    general: [u64; GENERAL],
    extended: Range<usize>,
    frames: Range<usize>,
    end: WalkEnd,
    stacks: Range<usize>,
}

/// Everything a round needs, allocated before anyone is stopped.
struct Scratch {
    slots: &'static [Slot],
    extended_words: usize,
    task_buffer: Vec<std::mem::MaybeUninit<u8>>,
    maps: MapsBuffer,
    tables: Tables,
    walker: Walker,
    records: Vec<Record>,
    extended: Vec<u64>,
    frames: Vec<Frame>,
    stacks: Vec<Range<usize>>,
}

/// Frames recorded per thread.
const FRAMES_PER_THREAD: usize = 256;
/// Live stack ranges recorded per thread (one per context: the innermost, each signal frame).
const STACKS_PER_THREAD: usize = 8;

impl Scratch {
    fn new(threads: usize) -> Scratch {
        let extended_words = regs::extended_words();
        let capacity = threads.max(16);
        let slots: &'static [Slot] = Box::leak(
            (0..capacity)
                .map(|_| Slot::new(extended_words))
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
        Scratch {
            slots,
            extended_words,
            task_buffer: vec![std::mem::MaybeUninit::uninit(); 64 << 10],
            maps: MapsBuffer::with_capacity(256 << 10),
            tables: Tables::default(),
            walker: Walker::default(),
            records: Vec::with_capacity(capacity),
            extended: Vec::with_capacity(capacity * extended_words),
            frames: Vec::with_capacity(capacity * FRAMES_PER_THREAD),
            stacks: Vec::with_capacity(capacity * STACKS_PER_THREAD),
        }
    }
}

static WORLD: Mutex<Option<Scratch>> = Mutex::new(None);

/// Why a round could not complete.
enum Abort {
    /// More threads than slots: grow and retry.
    Grow(usize),
    /// `/proc/self/maps` did not fit: grow and retry.
    GrowMaps,
    /// Threads that did not park in time.
    Stuck(Vec<i32>),
    /// A thread blocks the stop signal for now (it is being created, or is exiting and waits
    /// for a lock a parked thread holds): resume everyone and try again.
    Blocked(i32),
    /// The kernel's queue of pending real-time signals is full: retry when it drains.
    QueueFull(i32),
    Os(Error),
}

/// The round in progress: `(coordinator's thread id << 32) | generation`, 0 when none. Whoever
/// swaps it to 0 resumes the round: the guard below, or the panic hook when the closure panics.
static ACTIVE: AtomicU64 = AtomicU64::new(0);

/// Resumes every thread of the round when dropped (module docs, step 6), unless the panic hook
/// did already.
struct Resume {
    active: u64,
}

impl Drop for Resume {
    fn drop(&mut self) {
        if ACTIVE
            .compare_exchange(self.active, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            resume(self.active as u32);
        }
    }
}

/// Step 6 for generation `g`, on the slots the handlers can see.
fn resume(g: u32) {
    let table = SLOTS.load(Ordering::Acquire);
    let slots: &[Slot] = if table.is_null() {
        &[]
    } else {
        // SAFETY: SLOTS points to SLOTS_LEN leaked, never-freed slots.
        unsafe { std::slice::from_raw_parts(table, SLOTS_LEN.load(Ordering::Acquire)) }
    };
    for slot in slots {
        let _ = slot.state.compare_exchange(
            state(g, SIGNALLED),
            state(g, ABANDONED),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
    // A handler between its claim and its park is running: wait for it to finish writing.
    while let Some(slot) = slots
        .iter()
        .find(|s| s.state.load(Ordering::Acquire) == state(g, WRITING))
    {
        let seen = ARRIVALS.load(Ordering::Acquire);
        if slot.state.load(Ordering::Acquire) == state(g, WRITING) {
            futex_wait_for(&ARRIVALS, seen, Duration::from_millis(1));
        }
    }
    RESUMED.store(g, Ordering::Release);
    // Every sleeper: the kernel reads the count as an `int`, so `u32::MAX` would be -1, which
    // wakes one.
    let _ = rustix::thread::futex::wake(
        &RESUMED,
        rustix::thread::futex::Flags::PRIVATE,
        i32::MAX as u32,
    );
}

/// Chains a panic hook in front of the program's, once: a closure that panics with the world
/// stopped resumes everyone *before* the panic is reported — reporting allocates (the message,
/// a backtrace), and a parked thread may hold the allocator's lock. (A hook the program sets
/// later replaces this one: the guard then still resumes everyone when the panic unwinds, if
/// the report does not deadlock first.)
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    if std::thread::panicking() {
        return; // set_hook must not be called while panicking; the next stop installs it
    }
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let active = ACTIVE.load(Ordering::Acquire);
            let me = rustix::thread::gettid().as_raw_nonzero().get();
            if active != 0
                && (active >> 32) as i32 == me
                && ACTIVE
                    .compare_exchange(active, 0, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                resume(active as u32);
            }
            previous(info)
        }));
    });
}

fn futex_wait_for(word: &AtomicU32, seen: u32, timeout: Duration) {
    let timeout = rustix::thread::futex::Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: timeout.subsec_nanos() as i64,
    };
    let _ = rustix::thread::futex::wait(
        word,
        rustix::thread::futex::Flags::PRIVATE,
        seen,
        Some(&timeout),
    );
}

/// Thread ids of the process other than `me`, listed without allocating into `buffer`; calls
/// `f` for each.
fn list_threads(
    buffer: &mut [std::mem::MaybeUninit<u8>],
    me: i32,
    mut f: impl FnMut(i32) -> std::result::Result<(), Abort>,
) -> std::result::Result<(), Abort> {
    let dir = rustix::fs::open(
        c"/proc/self/task",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| {
        Abort::Os(Error::new(ErrorKind::Os {
            operation: "open /proc/self/task",
            errno: e.raw_os_error(),
        }))
    })?;
    let mut entries = rustix::fs::RawDir::new(&dir, buffer);
    while let Some(entry) = entries.next() {
        let entry = entry.map_err(|e| {
            Abort::Os(Error::new(ErrorKind::Os {
                operation: "read /proc/self/task",
                errno: e.raw_os_error(),
            }))
        })?;
        let mut tid = 0i32;
        let name = entry.file_name().to_bytes();
        if name.is_empty() || !name.iter().all(u8::is_ascii_digit) {
            continue;
        }
        for digit in name {
            tid = tid * 10 + (digit - b'0') as i32;
        }
        if tid != me {
            f(tid)?;
        }
    }
    Ok(())
}

/// Stops every other thread (module docs), calls `f` with what they are doing, and resumes them.
///
/// `f` runs while every other thread is parked. It must not allocate, print, or take any lock
/// another thread could hold (the allocator's, stdio's, the loader's): it would wait forever.
/// Every thread resumes when `f` returns or panics. Waits up to [`DEFAULT_TIMEOUT`] for the
/// threads to stop.
///
/// # Errors
///
/// [`ErrorKind::ThreadsDidNotStop`] if a thread does not park in time (it blocks the stop
/// signal, or is stuck in the kernel): then `f` is not called and every thread runs on;
/// [`ErrorKind::Os`] if the handler cannot be installed or the threads cannot be listed.
///
/// # Example
///
/// ```
/// use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
/// let (count, stop) = (AtomicU64::new(0), AtomicBool::new(false));
/// std::thread::scope(|s| {
///     s.spawn(|| while !stop.load(Ordering::Relaxed) { count.fetch_add(1, Ordering::Relaxed); });
///     while count.load(Ordering::Relaxed) == 0 {}
///     let frozen = evolve_code::stop_the_world(|world| {
///         assert!(world.threads().all(|t| t.registers().rip() != 0));
///         let before = count.load(Ordering::Relaxed);
///         std::hint::black_box((0..10_000).sum::<u64>());
///         before == count.load(Ordering::Relaxed)
///     })
///     .unwrap();
///     assert!(frozen); // the worker was parked the whole time
///     stop.store(true, Ordering::Relaxed);
/// });
/// ```
pub fn stop_the_world<R>(f: impl FnOnce(&World<'_>) -> R) -> Result<R> {
    stop_the_world_within(DEFAULT_TIMEOUT, f)
}

/// [`stop_the_world`] waiting up to `timeout` for the threads to park.
pub fn stop_the_world_within<R>(timeout: Duration, f: impl FnOnce(&World<'_>) -> R) -> Result<R> {
    prepare()?;
    let mut world = WORLD.lock().unwrap_or_else(|p| p.into_inner());
    let scratch = world.get_or_insert_with(|| Scratch::new(64));
    scratch.tables.refresh();
    let me = rustix::thread::gettid().as_raw_nonzero().get();
    let mut f = Some(f);
    let deadline = Instant::now() + timeout;
    let mut grown = 0;
    while grown < 8 {
        match round(scratch, me, deadline, &mut f) {
            Ok(result) => return Ok(result),
            Err(Abort::Grow(threads)) => {
                let mut grown_scratch = Scratch::new(threads * 2);
                grown_scratch.tables = std::mem::take(&mut scratch.tables);
                *scratch = grown_scratch;
                grown += 1;
            }
            Err(Abort::GrowMaps) => {
                scratch.maps.read_growing()?;
                scratch.maps = MapsBuffer::with_capacity(scratch.maps.capacity() * 2);
                grown += 1;
            }
            Err(Abort::Blocked(tid)) => {
                // Everyone runs again: let the thread finish what it blocks signals for (start
                // or exit) before stopping anyone again, or the next round may catch the same
                // lock holder and the same waiter.
                while alive(tid) && task_status(tid).is_some_and(|t| t.blocks && t.sleeping) {
                    if Instant::now() >= deadline {
                        return Err(stuck_error(&[tid], timeout));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Err(Abort::QueueFull(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(Abort::QueueFull(tid)) => return Err(stuck_error(&[tid], timeout)),
            Err(Abort::Stuck(tids)) => return Err(stuck_error(&tids, timeout)),
            Err(Abort::Os(e)) => return Err(e),
        }
    }
    Err(Error::new(ErrorKind::Unsupported {
        what: "stopping the world: the threads kept outgrowing the buffers set up for them",
    }))
}

fn stuck_error(tids: &[i32], timeout: Duration) -> Error {
    let blocked = |tid: &i32| {
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
        let mask = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))?
            .trim()
            .to_string();
        let mask = u64::from_str_radix(&mask, 16).ok()?;
        Some(mask >> (stop_signal() - 1) & 1 != 0)
    };
    let describe = |tid: &i32| {
        let file = |name: &str| std::fs::read_to_string(format!("/proc/self/task/{tid}/{name}"));
        let name = file("comm")
            .map(|c| c.trim().to_string())
            .unwrap_or_default();
        let wchan = file("wchan").unwrap_or_default();
        let blocks = if blocked(tid) == Some(true) {
            ", blocks the stop signal"
        } else {
            ""
        };
        format!("{tid} `{name}` (waiting in `{wchan}`{blocks})")
    };
    let threads = tids.iter().map(describe).collect();
    Error::new(ErrorKind::ThreadsDidNotStop {
        threads,
        waited_ms: timeout.as_millis() as u64,
    })
}

/// One attempt (module docs, steps 1-6).
fn round<R, F: FnOnce(&World<'_>) -> R>(
    scratch: &mut Scratch,
    me: i32,
    deadline: Instant,
    f: &mut Option<F>,
) -> std::result::Result<R, Abort> {
    let slots = scratch.slots;
    for slot in slots {
        slot.tid.store(0, Ordering::Relaxed);
    }
    SLOTS_LEN.store(0, Ordering::Release);
    SLOTS.store(slots.as_ptr() as *mut Slot, Ordering::Release);
    let g = GENERATION.fetch_add(1, Ordering::AcqRel).wrapping_add(1);
    let active = (me as u32 as u64) << 32 | g as u64;
    ACTIVE.store(active, Ordering::Release);
    let _guard = Resume { active };
    let mut used = 0;
    let stopped_at = Instant::now();
    // Steps 1-4: signal, wait, until a listing finds nobody new.
    loop {
        let mut new = 0;
        list_threads(&mut scratch.task_buffer, me, |tid| {
            match slots[..used]
                .iter()
                .find(|s| s.tid.load(Ordering::Relaxed) == tid)
            {
                Some(slot) if slot.state.load(Ordering::Acquire) == state(g, GONE) => {
                    // A reused thread id: a new thread.
                    slot.state.store(state(g, SIGNALLED), Ordering::Release);
                    if !send(tid, g)? {
                        slot.state.store(state(g, GONE), Ordering::Release);
                    }
                    new += 1;
                }
                Some(_) => {}
                None => {
                    if used == slots.len() {
                        return Err(Abort::Grow(used + 1));
                    }
                    let slot = &slots[used];
                    slot.state.store(state(g, SIGNALLED), Ordering::Relaxed);
                    slot.tid.store(tid, Ordering::Release);
                    used += 1;
                    SLOTS_LEN.store(used, Ordering::Release);
                    if !send(tid, g)? {
                        slot.state.store(state(g, GONE), Ordering::Release);
                    }
                    new += 1;
                }
            }
            Ok(())
        })?;
        if new == 0 {
            break;
        }
        wait_for_parking(&slots[..used], g, deadline)?;
    }
    // Step 5.
    match scratch.maps.read() {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::Unsupported { .. }) => return Err(Abort::GrowMaps),
        Err(e) => return Err(Abort::Os(e)),
    }
    collect(scratch, &slots[..used], g);
    let world = World {
        scratch: &*scratch,
        coordinator: me,
        stopped_at,
    };
    let result = (f.take().expect("called once"))(&world);
    drop(_guard);
    Ok(result)
}

fn wait_for_parking(slots: &[Slot], g: u32, deadline: Instant) -> std::result::Result<(), Abort> {
    let mut ticks = 0u32;
    loop {
        let seen = ARRIVALS.load(Ordering::Acquire);
        // A slot being `WRITING` is a handler still copying its registers: not parked yet. It
        // must be waited for like a signalled one — counted as parked, it was left out of the
        // world (`collect` takes `PARKED` slots only) and its PC was never checked: an entry
        // was then written over the instruction it was about to resume at.
        let not_parked = |s: &Slot| {
            let now = s.state.load(Ordering::Acquire);
            now == state(g, SIGNALLED) || now == state(g, WRITING)
        };
        if !slots.iter().any(not_parked) {
            return Ok(());
        }
        if Instant::now() > deadline {
            let stuck = slots
                .iter()
                .filter(|s| not_parked(s))
                .map(|s| s.tid.load(Ordering::Relaxed))
                .collect();
            return Err(Abort::Stuck(stuck));
        }
        futex_wait_for(&ARRIVALS, seen, Duration::from_millis(1));
        if ARRIVALS.load(Ordering::Acquire) == seen {
            // Timed out (or spurious): threads that exited meanwhile will never park. Every
            // 16 ms, also look for a thread that blocks the signal (reading its status costs
            // tens of microseconds) — unless some thread is still leaving the handler of an
            // earlier round: those block the signal too, and take it as they leave.
            //
            // `INSIDE` also counts the threads parked in this round (bumped just before they
            // publish `PARKED`): only handlers beyond those are still leaving an earlier round.
            // (Comparing with zero instead suppressed the check as soon as one thread had
            // parked, and a thread exiting with every signal blocked while it waited for the
            // stack cache's lock, held by a parked thread, was waited for until the deadline.)
            ticks += 1;
            let look_for_blocked = ticks.is_multiple_of(16) && {
                let inside = INSIDE.load(Ordering::Acquire) as usize;
                let parked = slots
                    .iter()
                    .filter(|s| s.state.load(Ordering::Acquire) == state(g, PARKED))
                    .count();
                inside <= parked
            };
            for slot in slots {
                if slot.state.load(Ordering::Acquire) != state(g, SIGNALLED) {
                    continue;
                }
                let tid = slot.tid.load(Ordering::Relaxed);
                if !alive(tid) {
                    let _ = slot.state.compare_exchange(
                        state(g, SIGNALLED),
                        state(g, GONE),
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    );
                } else if look_for_blocked
                    && task_status(tid).is_some_and(|t| t.blocks && t.sleeping)
                {
                    // A runnable thread that blocks the signal (starting, exiting) parks or
                    // exits by itself; a sleeping one may wait for a parked thread.
                    return Err(Abort::Blocked(tid));
                }
            }
        }
    }
}

/// Copies the parked threads' registers and walks their stacks (no allocation: the vectors
/// were sized for the slot table).
fn collect(scratch: &mut Scratch, slots: &[Slot], g: u32) {
    scratch.records.clear();
    scratch.extended.clear();
    scratch.frames.clear();
    scratch.stacks.clear();
    for slot in slots {
        let now = slot.state.load(Ordering::Acquire);
        if now != state(g, PARKED) {
            // Only a thread that exited is left out (`wait_for_parking`).
            debug_assert_eq!(now, state(g, GONE), "a thread neither parked nor gone");
            continue;
        }
        let general: [u64; GENERAL] =
            std::array::from_fn(|i| slot.general[i].load(Ordering::Relaxed));
        let words = slot
            .extended_len
            .load(Ordering::Relaxed)
            .min(scratch.extended_words);
        let extended_start = scratch.extended.len();
        for word in &slot.extended[..words] {
            scratch.extended.push(word.load(Ordering::Relaxed));
        }
        let frames_start = scratch.frames.len();
        let end = scratch.walker.walk(
            &scratch.tables,
            &general,
            &mut scratch.frames,
            FRAMES_PER_THREAD,
        );
        let frames = frames_start..scratch.frames.len();
        let stacks_start = scratch.stacks.len();
        for frame in &scratch.frames[frames.clone()] {
            if frame.kind == FrameKind::Return {
                continue;
            }
            // The red zone below the stack pointer is live data of the innermost function.
            let low = frame.sp.saturating_sub(128);
            let Some(region) = scratch.maps.region_containing(frame.sp) else {
                continue;
            };
            let stacks = &mut scratch.stacks[stacks_start..];
            if let Some(existing) = stacks.iter_mut().find(|s| s.end == region.range.end) {
                existing.start = existing.start.min(low);
            } else if scratch.stacks.len() < stacks_start + STACKS_PER_THREAD {
                scratch
                    .stacks
                    .push(low.max(region.range.start)..region.range.end);
            }
        }
        scratch.records.push(Record {
            tid: slot.tid.load(Ordering::Relaxed),
            general,
            extended: extended_start..scratch.extended.len(),
            frames,
            end,
            stacks: stacks_start..scratch.stacks.len(),
        });
    }
}

impl Scratch {
    /// Whether `address` lies in memory of this scratch: copies of the stopped threads'
    /// registers and frames, the unwind tables, the walker's buffers. Engine state — what it
    /// holds of the current round is checked where it came from (registers, frames), and the
    /// rest is stale — so reference scans skip it. Allocation-free.
    fn owns(&self, address: usize) -> bool {
        let slots = self.slots.as_ptr() as usize;
        within_vec(address, &self.records)
            || within_vec(address, &self.extended)
            || within_vec(address, &self.frames)
            || within_vec(address, &self.stacks)
            || within_vec(address, &self.task_buffer)
            || (slots..slots + std::mem::size_of_val(self.slots)).contains(&address)
            || self.slots.iter().any(|slot| {
                let start = slot.extended.as_ptr() as usize;
                (start..start + std::mem::size_of_val(&*slot.extended)).contains(&address)
            })
            || self.tables.owns(address)
            || self.walker.owns(address)
    }
}

impl Drop for Scratch {
    /// The slots are leaked (a late handler may read them); their copies of registers would
    /// outlive the scratch as plain words that reference scans cannot tell from the program's.
    fn drop(&mut self) {
        for slot in self.slots {
            for word in slot.general.iter().chain(slot.extended.iter()) {
                word.store(0, Ordering::Relaxed);
            }
        }
        crate::hidden::scrub_plain(std::mem::take(&mut self.records));
        crate::hidden::scrub_plain(std::mem::take(&mut self.extended));
        crate::hidden::scrub_plain(std::mem::take(&mut self.frames));
        crate::hidden::scrub_plain(std::mem::take(&mut self.stacks));
    }
}

/// The stopped world, as the closure of [`stop_the_world`] sees it.
pub struct World<'a> {
    scratch: &'a Scratch,
    coordinator: i32,
    stopped_at: Instant,
}

impl std::fmt::Debug for World<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("coordinator", &self.coordinator)
            .field("stopped", &self.len())
            .finish()
    }
}

/// A place a thread can resume at inside a range (see [`World::resumable_in`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumable {
    /// The thread.
    pub tid: i32,
    /// The code address.
    pub pc: usize,
    /// How the thread gets there.
    pub how: ResumeKind,
}

/// How a stopped thread can reach a [`Resumable`] PC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeKind {
    /// It is stopped there.
    Executing,
    /// A signal interrupted it there; it resumes there when the handler returns.
    Interrupted,
    /// A frame returns there.
    Return,
    /// A word of a stack the unwind tables could not walk holds it: conservatively, a return
    /// address or a saved PC.
    StackWord {
        /// Where the word is.
        at: usize,
    },
}

impl std::fmt::Display for Resumable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match self.how {
            ResumeKind::Executing => "is executing".to_string(),
            ResumeKind::Interrupted => "was interrupted by a signal at".to_string(),
            ResumeKind::Return => "returns to".to_string(),
            ResumeKind::StackWord { at } => format!("may resume (stack word at {at:#x}) at"),
        };
        write!(f, "thread {} {how} {:#x}", self.tid, self.pc)
    }
}

impl<'a> World<'a> {
    /// Threads stopped.
    pub fn len(&self) -> usize {
        self.scratch.records.len()
    }

    /// Whether no other thread exists.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How long the other threads have been stopped (since the first was signalled).
    pub fn stopped_for(&self) -> Duration {
        self.stopped_at.elapsed()
    }

    /// The thread that stopped the others (it is not among [`World::threads`]).
    pub fn coordinator(&self) -> i32 {
        self.coordinator
    }

    /// The stopped threads.
    pub fn threads(&self) -> impl Iterator<Item = StoppedThread<'a>> + 'a {
        let scratch = self.scratch;
        scratch
            .records
            .iter()
            .map(move |record| StoppedThread { scratch, record })
    }

    /// The first address of the function whose unwind information covers `pc` (its FDE's
    /// start), if any: a code address that is not a function's first is not a function
    /// pointer.
    pub fn function_start(&self, pc: usize) -> Option<usize> {
        self.scratch.tables.function_start(pc)
    }

    /// `/proc/self/maps` as read with the world stopped.
    /// Whether `address` lies in the stop-the-world machinery's own memory (see `Scratch::owns`):
    /// reference scans skip it. Allocation-free.
    pub(crate) fn owns(&self, address: usize) -> bool {
        self.scratch.owns(address)
    }

    pub(crate) fn maps(&self) -> &'a MapsBuffer {
        &self.scratch.maps
    }

    /// Some place where a stopped thread can resume inside `range`: the PC it is stopped at, a
    /// PC saved by a signal frame, a return address, or — where its stack could not be walked to
    /// the end — any word of the rest of that stack (module docs). `None`: no thread can
    /// execute code in `range` before it executes something else first. Allocation-free.
    pub fn resumable_in(&self, range: Range<usize>) -> Option<Resumable> {
        self.threads().find_map(|t| t.resumable_in(range.clone()))
    }
}

/// One stopped thread.
#[derive(Clone, Copy)]
pub struct StoppedThread<'a> {
    scratch: &'a Scratch,
    record: &'a Record,
}

impl std::fmt::Debug for StoppedThread<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoppedThread")
            .field("tid", &self.tid())
            .field("registers", &self.registers())
            .field("frames", &self.frames().len())
            .field("walk", &self.walk_end())
            .finish()
    }
}

impl<'a> StoppedThread<'a> {
    /// Its thread id.
    pub fn tid(&self) -> i32 {
        self.record.tid
    }

    /// Its registers where it was stopped: general and vector.
    pub fn registers(&self) -> Registers<'a> {
        Registers::new(
            &self.record.general,
            &self.scratch.extended[self.record.extended.clone()],
        )
    }

    /// Its frames, innermost first: where it is stopped, every return address, every PC saved
    /// by a signal frame, as far as the unwind tables lead.
    pub fn frames(&self) -> &'a [Frame] {
        &self.scratch.frames[self.record.frames.clone()]
    }

    /// Why the walk of its stack ended ([`WalkEnd::Complete`]: every frame is known).
    pub fn walk_end(&self) -> WalkEnd {
        self.record.end
    }

    /// The live parts of its stacks, one per context (the innermost one, and each interrupted
    /// by a signal): from the stack pointer, less the 128-byte red zone, to the end of the
    /// stack's mapping.
    pub fn stacks(&self) -> &'a [Range<usize>] {
        &self.scratch.stacks[self.record.stacks.clone()]
    }

    /// The part of a stack the walk did not reach: from the last frame's stack pointer to the
    /// end of its mapping (`None` if the walk was complete).
    pub fn unwalked(&self) -> Option<Range<usize>> {
        if self.record.end == WalkEnd::Complete {
            return None;
        }
        let last = self.frames().last()?;
        let region = self.scratch.maps.region_containing(last.sp)?;
        Some(last.sp.saturating_sub(128).max(region.range.start)..region.range.end)
    }

    /// Every PC this thread can resume at that the walk found, innermost first.
    pub fn resumable_pcs(&self) -> impl Iterator<Item = (usize, ResumeKind)> + 'a {
        self.frames().iter().map(|f| {
            let how = match f.kind {
                FrameKind::Innermost => ResumeKind::Executing,
                FrameKind::Interrupted => ResumeKind::Interrupted,
                FrameKind::Return => ResumeKind::Return,
            };
            (f.pc, how)
        })
    }

    /// [`World::resumable_in`] for this thread.
    pub fn resumable_in(&self, range: Range<usize>) -> Option<Resumable> {
        let tid = self.tid();
        if let Some((pc, how)) = self.resumable_pcs().find(|(pc, _)| range.contains(pc)) {
            return Some(Resumable { tid, pc, how });
        }
        let mut pending: [Range<usize>; 8] = std::array::from_fn(|_| 0..0);
        let mut count = 0;
        if let Some(unwalked) = self.unwalked() {
            pending[0] = unwalked;
            count = 1;
        }
        let restorer = restorer();
        let mut done = 0;
        while done < count {
            let region = pending[done].clone();
            done += 1;
            let mut found = None;
            for_each_word(region, |at, word| {
                if range.contains(&word) {
                    found = Some(Resumable {
                        tid,
                        pc: word,
                        how: ResumeKind::StackWord { at },
                    });
                    return false;
                }
                if word == restorer && restorer != 0 && count < pending.len() {
                    // A signal frame above code the walk could not cross: its saved context
                    // resumes too.
                    let gregs = at + 8 + std::mem::offset_of!(libc::ucontext_t, uc_mcontext);
                    let pc = super::peek::read_u64(gregs + 8 * libc::REG_RIP as usize);
                    let sp = super::peek::read_u64(gregs + 8 * libc::REG_RSP as usize);
                    if let Some(pc) = pc.filter(|pc| range.contains(&(*pc as usize))) {
                        found = Some(Resumable {
                            tid,
                            pc: pc as usize,
                            how: ResumeKind::Interrupted,
                        });
                        return false;
                    }
                    if let Some(r) = sp.and_then(|sp| {
                        self.scratch.maps.region_containing(sp as usize).map(|r| {
                            (sp as usize).saturating_sub(128).max(r.range.start)..r.range.end
                        })
                    }) {
                        pending[count] = r;
                        count += 1;
                    }
                }
                true
            });
            if found.is_some() {
                return found;
            }
        }
        None
    }
}

/// Calls `f(address, word)` for each 8-byte word of `range` that can be read, until it
/// returns false. Allocation-free (reads through [`super::peek`] into a stack buffer).
pub(crate) fn for_each_word(range: Range<usize>, mut f: impl FnMut(usize, usize) -> bool) {
    let mut buffer = [0u8; 4096];
    let mut at = range.start.next_multiple_of(8);
    while at + 8 <= range.end {
        let want = (range.end - at).min(buffer.len()) & !7;
        let got = super::peek::read(at, &mut buffer[..want]) & !7;
        for (i, word) in buffer[..got].chunks_exact(8).enumerate() {
            let word = usize::from_ne_bytes(word.try_into().expect("8 bytes"));
            if !f(at + 8 * i, word) {
                return;
            }
        }
        at += if got == 0 { 4096 - at % 4096 } else { got };
    }
}

/// The signal restorer glibc installs with every handler (`__restore_rt`), from our own
/// handler's action: words equal to it on a stack mark signal frames.
fn restorer() -> usize {
    static RESTORER: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *RESTORER.get_or_init(|| {
        // SAFETY: querying an action into a zeroed, writable sigaction.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(stop_signal(), std::ptr::null(), &mut action) == 0 {
                action.sa_restorer.map_or(0, |r| r as usize)
            } else {
                0
            }
        }
    })
}

/// Makes sure the handler is installed and the restorer known (called before stopping).
pub(crate) fn prepare() -> Result<()> {
    CHAIN.install()?;
    install_panic_hook();
    restorer();
    Ok(())
}
