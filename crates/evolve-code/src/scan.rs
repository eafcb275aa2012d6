//! Stopping the world and scanning it for references to a range of addresses.
//!
//! Reclamation must prove that no thread can still reach an old patch: no thread's PC, registers
//! or stack, and (for the `scan` policy) no word of writable memory holds an address inside it.
//! That proof needs a moment when no thread moves.
//!
//! # Protocol
//!
//! 1. Everything the scan needs is allocated first: a thread stopped at an arbitrary point may
//!    hold the allocator's lock, so the coordinator must not allocate while others are stopped.
//! 2. The coordinator sends [`stop_signal`] to every other thread of the process
//!    (`tgkill` over `/proc/self/task`). Each handler stores its thread id and its interrupted
//!    registers in its slot, counts itself arrived, and waits until released. A thread that
//!    does not arrive in time (it blocks the signal, or is stuck in the kernel) makes the round
//!    fail: everyone is released and nothing is concluded.
//! 3. With everyone stopped, the coordinator reads `/proc/self/maps` (raw `read` into the
//!    preallocated buffer) and scans: registers, each stopped thread's stack from its stack
//!    pointer (minus the red zone) to the end of its mapping, and, when asked, every other
//!    private readable and writable mapping, word by word. It skips its own stack: it runs on
//!    a thread of Evolve's whose frames hold only Evolve's state, and the targets it compares
//!    against are revealed from their [`Hidden`] form only in registers and on that stack.
//! 4. The coordinator releases the threads.
//!
//! A word is a reference if it lies in a target range, unless the caller excluded the place
//! where it is (the targets' own mappings, the loader's bookkeeping recorded at load time).
//!
//! # Safety
//!
//! The handler touches only atomics and its own slot (async-signal-safe). The coordinator reads
//! memory only inside mappings that `/proc/self/maps` lists as readable at a moment when every
//! other thread is stopped, so they cannot be unmapped under the scan; it skips shared mappings
//! (whose backing file could shrink) and its own stack above the scan's frame.
#![allow(unsafe_code)]

use crate::error::{Error, ErrorKind, Result};
use crate::hidden::Hidden;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most threads a round can stop.
const MAX_THREADS: usize = 1024;
/// General-purpose registers saved per thread (`gregs` of `ucontext_t`).
const REGISTERS: usize = 23;

/// The signal that stops threads for a scan: a real-time signal, so it is queued and never
/// merged (`SIGRTMIN + 7`; probes' stop-the-world uses `SIGRTMIN + 6`).
pub fn stop_signal() -> libc::c_int {
    libc::SIGRTMIN() + 7
}

struct Slot {
    tid: AtomicI32,
    registers: [AtomicU64; REGISTERS],
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: Slot = Slot {
    tid: AtomicI32::new(0),
    registers: [const { AtomicU64::new(0) }; REGISTERS],
};

static SLOTS: [Slot; MAX_THREADS] = [EMPTY_SLOT; MAX_THREADS];
static ARRIVED: AtomicUsize = AtomicUsize::new(0);
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// The current round, and the last round released. A handler waits for *its* round's release:
/// with a boolean flag, a thread released from one round that has not run yet when the next
/// round starts would stay in the old handler (with the new signal blocked) and never arrive.
static ROUND_ID: AtomicU64 = AtomicU64::new(0);
static RELEASED: AtomicU64 = AtomicU64::new(0);
static ROUND: Mutex<()> = Mutex::new(());

extern "C" fn on_stop(_: libc::c_int, _: *mut libc::siginfo_t, context: *mut libc::c_void) {
    if !ACTIVE.load(Ordering::Acquire) {
        return; // a late signal of a round that already ended
    }
    let round = ROUND_ID.load(Ordering::Acquire);
    let index = ARRIVED.fetch_add(1, Ordering::AcqRel);
    if index < MAX_THREADS {
        // SAFETY: the kernel passes a valid ucontext to an SA_SIGINFO handler.
        let gregs = unsafe { &(*(context as *const libc::ucontext_t)).uc_mcontext.gregs };
        let slot = &SLOTS[index];
        for (saved, value) in slot.registers.iter().zip(gregs.iter()) {
            saved.store(*value as u64, Ordering::Relaxed);
        }
        // SAFETY: gettid takes no arguments.
        slot.tid.store(unsafe { libc::gettid() }, Ordering::Release);
    }
    while RELEASED.load(Ordering::Acquire) < round {
        // SAFETY: sched_yield is async-signal-safe.
        unsafe { libc::sched_yield() };
    }
}

fn install_handler() -> Result<()> {
    static INSTALLED: std::sync::OnceLock<std::result::Result<(), ErrorKind>> =
        std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            // SAFETY: a zeroed sigaction filled with a handler of the SA_SIGINFO signature.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_stop as *const () as libc::sighandler_t;
                action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK;
                libc::sigemptyset(&mut action.sa_mask);
                if libc::sigaction(stop_signal(), &action, std::ptr::null_mut()) != 0 {
                    return Err(Error::last_os("sigaction(stop signal)").kind().clone());
                }
            }
            Ok(())
        })
        .clone()
        .map_err(Error::new)
}

/// What a scan found and what it cost.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScanReport {
    /// Threads stopped.
    pub threads: usize,
    /// Where references were found (`thread 123 rip`, `stack of thread 123 at 0x…`,
    /// `memory at 0x…`), at most 16.
    pub references: Vec<String>,
    /// Bytes of memory scanned.
    pub bytes_scanned: usize,
    /// How long the other threads were stopped, in microseconds.
    pub pause_us: u64,
}

/// What to look for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// PCs, registers and stacks of every thread (PSU's check).
    Stacks,
    /// Those, and every private writable mapping.
    Memory,
}

/// Preallocated buffers, so nothing is allocated while threads are stopped.
struct Buffers {
    maps: Vec<u8>,
    mappings: Vec<(usize, usize, bool, bool)>, // start, end, readable+writable private, shared
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // The list holds the targets' plain addresses: leave no stale copy (`crate::scrub`).
        crate::hidden::scrub_plain(std::mem::take(&mut self.mappings));
    }
}

fn parse_hex(bytes: &[u8]) -> Option<usize> {
    let mut value = 0usize;
    for &b in bytes {
        let digit = (b as char).to_digit(16)? as usize;
        value = value.checked_mul(16)?.checked_add(digit)?;
    }
    Some(value)
}

impl Buffers {
    /// Reads `/proc/self/maps` into the preallocated buffer without allocating.
    fn read_maps(&mut self) -> bool {
        self.maps.clear();
        // SAFETY: open/read/close with a NUL-terminated path and a buffer we own; the buffer's
        // spare capacity is written by read and then included with set_len.
        unsafe {
            let fd = libc::open(
                c"/proc/self/maps".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return false;
            }
            loop {
                let spare = self.maps.capacity() - self.maps.len();
                if spare == 0 {
                    libc::close(fd);
                    return false; // more mappings than the buffer holds
                }
                let at = self.maps.as_mut_ptr().add(self.maps.len());
                let n = libc::read(fd, at as *mut libc::c_void, spare);
                if n < 0 {
                    libc::close(fd);
                    return false;
                }
                if n == 0 {
                    break;
                }
                self.maps.set_len(self.maps.len() + n as usize);
            }
            libc::close(fd);
        }
        self.mappings.clear();
        for line in self.maps.split(|b| *b == b'\n') {
            let mut fields = line.split(|b| *b == b' ');
            let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
                continue;
            };
            let Some(dash) = range.iter().position(|b| *b == b'-') else {
                continue;
            };
            let (Some(start), Some(end)) =
                (parse_hex(&range[..dash]), parse_hex(&range[dash + 1..]))
            else {
                continue;
            };
            if self.mappings.len() == self.mappings.capacity() {
                return false;
            }
            let rw_private =
                perms.len() >= 4 && perms[0] == b'r' && perms[1] == b'w' && perms[3] == b'p';
            let shared = perms.len() >= 4 && perms[3] == b's';
            self.mappings.push((start, end, rw_private, shared));
        }
        true
    }

    fn mapping_of(&self, address: usize) -> Option<(usize, usize, bool, bool)> {
        self.mappings
            .iter()
            .copied()
            .find(|(s, e, _, _)| (*s..*e).contains(&address))
    }
}

/// Which pages of a range hold data: present in memory or swapped out, as
/// `/proc/self/pagemap` tells (bits 63 and 62 of each page's entry; readable without privilege).
/// A page never touched holds zeros, so no pointer, and most of a process's writable address
/// space is such pages — each thread's stack reserves megabytes and uses kilobytes (the kv server
/// with 50 clients: 118 MB of writable mappings, 19 MB resident) — so scans skip them.
struct TouchedPages {
    pagemap: Option<std::fs::File>,
    /// Preallocated entries of one chunk (nothing is allocated while threads are stopped).
    entries: Vec<u8>,
}

impl TouchedPages {
    /// Pages per `pagemap` read.
    const CHUNK: usize = 8192;

    fn new() -> TouchedPages {
        TouchedPages {
            pagemap: std::fs::File::open("/proc/self/pagemap").ok(),
            entries: vec![0; Self::CHUNK * 8],
        }
    }

    /// Calls `f(from, to)` for each run of touched pages within `start..end` (clamped to it).
    /// Where `pagemap` cannot be read, every page counts as touched.
    fn runs(&mut self, start: usize, end: usize, f: &mut dyn FnMut(usize, usize)) {
        let Some(pagemap) = &self.pagemap else {
            f(start, end);
            return;
        };
        let page = crate::sys::memory::page_size();
        let mut page_at = start & !(page - 1);
        while page_at < end {
            let pages = (end - page_at).div_ceil(page).min(Self::CHUNK);
            let chunk_end = (page_at + pages * page).min(end);
            let bytes = &mut self.entries[..pages * 8];
            let offset = (page_at / page * 8) as u64;
            match std::os::unix::fs::FileExt::read_at(pagemap, bytes, offset) {
                Ok(n) if n == pages * 8 => {
                    let mut run: Option<usize> = None;
                    for (i, entry) in bytes.chunks_exact(8).enumerate() {
                        let entry = u64::from_ne_bytes(entry.try_into().expect("8 bytes"));
                        let touched = entry >> 62 != 0;
                        let at = page_at + i * page;
                        match (touched, run) {
                            (true, None) => run = Some(at),
                            (false, Some(from)) => {
                                f(from.max(start), at);
                                run = None;
                            }
                            _ => {}
                        }
                    }
                    if let Some(from) = run {
                        f(from.max(start), chunk_end);
                    }
                }
                _ => f(page_at.max(start), chunk_end),
            }
            page_at += pages * page;
        }
    }
}

fn hit(targets: &[(Hidden, Hidden)], value: usize) -> bool {
    targets
        .iter()
        .any(|t| (t.0.get()..t.1.get()).contains(&value))
}

/// Scans `words` (`start..end`, 8-aligned) for targets, skipping excluded places.
///
/// # Safety
///
/// `start..end` must be readable for the duration of the call.
unsafe fn scan_words(
    start: usize,
    end: usize,
    targets: &[(Hidden, Hidden)],
    excluded: &dyn Fn(usize, usize) -> bool,
    found: &mut dyn FnMut(usize),
) {
    let mut at = start.next_multiple_of(8);
    while at + 8 <= end {
        // SAFETY: within the readable range promised by the caller; aligned.
        let value = unsafe { std::ptr::read_volatile(at as *const usize) };
        if hit(targets, value) && !excluded(at, value) {
            found(at);
        }
        at += 8;
    }
}

/// Stops every other thread, looks for references to `targets`, and resumes them.
///
/// `excluded(address, value)` tells the scan to ignore a word at `address` holding `value` (the
/// targets' own memory, bookkeeping known to be harmless). Fails, changing nothing, if some
/// thread does not stop within `timeout` or the process has too many threads or mappings.
pub fn scan_for_references(
    targets: &[(Hidden, Hidden)],
    scope: Scope,
    timeout: Duration,
    excluded: &dyn Fn(usize, usize) -> bool,
) -> Result<ScanReport> {
    install_handler()?;
    let _one_round = ROUND.lock().unwrap_or_else(|p| p.into_inner());
    // 1. Allocate everything first.
    // SAFETY: getpid/gettid take no arguments.
    let (pid, me) = unsafe { (libc::getpid(), libc::gettid()) };
    let tids: Vec<i32> = std::fs::read_dir("/proc/self/task")
        .map_err(|e| {
            Error::new(ErrorKind::Os {
                operation: "read /proc/self/task",
                errno: e.raw_os_error().unwrap_or(0),
            })
        })?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&tid| tid != me)
        .collect();
    if tids.len() > MAX_THREADS {
        return Err(Error::new(ErrorKind::Unsupported {
            what: "stopping more than 1024 threads",
        }));
    }
    let mut buffers = Buffers {
        maps: Vec::with_capacity(4 << 20),
        mappings: Vec::with_capacity(65_536),
    };
    let mut touched = TouchedPages::new();
    // The scanner's own list of mappings holds the targets' plain addresses while it scans.
    let own_list = {
        let start = buffers.mappings.as_ptr() as usize;
        start
            ..start
                + buffers.mappings.capacity() * std::mem::size_of::<(usize, usize, bool, bool)>()
    };
    // The loader's and the unwinder's own caches of loaded ranges are not the program's
    // references (libc's data is still scanned: it holds atexit handlers and the like).
    let runtime_data = loader_and_unwinder_data();
    let excluded = &|at: usize, value: usize| {
        own_list.contains(&at)
            || runtime_data
                .iter()
                .any(|r| (r.0.get()..r.1.get()).contains(&at))
            || excluded(at, value)
    };
    let mut references: Vec<String> = Vec::with_capacity(16);
    // Up to 16 places of each kind (registers and stacks; memory), so that one kind cannot
    // hide the other from the report.
    let mut found_at: Vec<usize> = Vec::with_capacity(32);
    let mut found_kind: Vec<u8> = Vec::with_capacity(32);

    // 2. Stop.
    ARRIVED.store(0, Ordering::SeqCst);
    let round = ROUND_ID.fetch_add(1, Ordering::SeqCst) + 1;
    ACTIVE.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let mut expected = 0;
    for &tid in &tids {
        // SAFETY: tgkill with our own pid and a thread id of ours; a thread that exited
        // meanwhile gives ESRCH and is not waited for.
        if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, stop_signal()) } == 0 {
            expected += 1;
        }
    }
    let release = || {
        ACTIVE.store(false, Ordering::SeqCst);
        RELEASED.store(round, Ordering::SeqCst);
    };
    while ARRIVED.load(Ordering::Acquire) < expected {
        if started.elapsed() > timeout {
            release();
            return Err(Error::new(ErrorKind::Unsupported {
                what: "stopping every thread in time (a thread blocks the stop signal or is stuck)",
            }));
        }
        std::hint::spin_loop();
    }
    // Every slot of an arrived thread is written before ARRIVED counts it, but the tid store is
    // the last: wait for it so registers are complete.
    for slot in SLOTS.iter().take(expected) {
        while slot.tid.load(Ordering::Acquire) == 0 {
            std::hint::spin_loop();
        }
    }

    // 3. Scan, without allocating.
    let mut bytes_scanned = 0usize;
    let complete = buffers.read_maps();
    if complete {
        let (mut stack_notes, mut memory_notes) = (0, 0);
        let mut note = |at: usize, kind: u8| {
            let count = if kind == 2 {
                &mut memory_notes
            } else {
                &mut stack_notes
            };
            if *count < 16 && found_at.len() < found_at.capacity() {
                *count += 1;
                found_at.push(at);
                found_kind.push(kind);
            }
        };
        for slot in SLOTS.iter().take(expected) {
            let registers: [usize; REGISTERS] =
                std::array::from_fn(|i| slot.registers[i].load(Ordering::Relaxed) as usize);
            for (i, value) in registers.iter().enumerate() {
                if hit(targets, *value) {
                    note(i, 0);
                }
            }
            let sp = registers[libc::REG_RSP as usize].saturating_sub(128);
            if let Some((_, end, rw, _)) = buffers.mapping_of(sp) {
                if rw {
                    touched.runs(sp, end, &mut |from, to| {
                        // SAFETY: within the thread's stack mapping, readable and writable, and
                        // its thread is stopped.
                        unsafe { scan_words(from, to, targets, excluded, &mut |at| note(at, 1)) };
                        bytes_scanned += to - from;
                    });
                }
            }
        }
        if scope == Scope::Memory {
            let own_stack = &bytes_scanned as *const usize as usize;
            for &(start, end, rw_private, shared) in &buffers.mappings {
                if !rw_private || shared || (start..end).contains(&own_stack) {
                    continue;
                }
                // Stacks of stopped threads were scanned from their stack pointers above.
                let is_stack = SLOTS.iter().take(expected).any(|slot| {
                    let sp =
                        slot.registers[libc::REG_RSP as usize].load(Ordering::Relaxed) as usize;
                    (start..end).contains(&sp)
                });
                if is_stack {
                    continue;
                }
                touched.runs(start, end, &mut |from, to| {
                    // SAFETY: within a private readable and writable mapping, listed while every
                    // other thread is stopped, so nobody can unmap it during the scan.
                    unsafe { scan_words(from, to, targets, excluded, &mut |at| note(at, 2)) };
                    bytes_scanned += to - from;
                });
            }
        }
    }
    // 4. Resume.
    release();
    let pause_us = started.elapsed().as_micros() as u64;
    for slot in SLOTS.iter().take(expected) {
        slot.tid.store(0, Ordering::Relaxed);
    }
    if !complete {
        return Err(Error::new(ErrorKind::Unsupported {
            what: "reading /proc/self/maps into the preallocated buffer (too many mappings)",
        }));
    }
    for (at, kind) in found_at.iter().zip(&found_kind) {
        references.push(match kind {
            0 => format!("register {at} of a stopped thread"),
            1 => format!("stack word at {at:#x}"),
            _ => format!("memory word at {at:#x}"),
        });
    }
    Ok(ScanReport {
        threads: expected,
        references,
        bytes_scanned,
        pause_us,
    })
}

/// The writable data segments of the dynamic loader and of libgcc's unwinder, hidden.
fn loader_and_unwinder_data() -> Vec<(Hidden, Hidden)> {
    let mut ranges = Vec::new();
    for mut object in crate::inspect::loaded_snapshot_for_scan() {
        let name = String::from_utf8_lossy(&object.0).into_owned();
        let file = name.rsplit('/').next().unwrap_or("");
        if file.starts_with("ld-linux") || file.starts_with("libgcc_s") {
            ranges.extend(object.1.iter().copied());
        }
        object.1.clear();
    }
    ranges
}

/// Reads every private writable word of the process now (without stopping anyone) that points
/// into `targets`, as `(address, value)` pairs: used right after loading an object, when only
/// the loader can have stored such words, to learn its bookkeeping.
pub fn words_pointing_into(
    targets: &[(Hidden, Hidden)],
    skip: &[(Hidden, Hidden)],
) -> Result<Vec<(usize, Hidden)>> {
    let mut buffers = Buffers {
        maps: Vec::with_capacity(4 << 20),
        mappings: Vec::with_capacity(65_536),
    };
    if !buffers.read_maps() {
        return Err(Error::new(ErrorKind::Unsupported {
            what: "reading /proc/self/maps (too many mappings)",
        }));
    }
    // Other threads keep running and may unmap memory meanwhile (a thread's stack when it exits,
    // a large allocation when it is freed), so the words are read through `/proc/self/mem`,
    // where an unmapped page is an error to skip, not a fault.
    let memory = std::fs::File::open("/proc/self/mem").map_err(|e| {
        Error::new(ErrorKind::Os {
            operation: "open /proc/self/mem",
            errno: e.raw_os_error().unwrap_or(0),
        })
    })?;
    let mut touched = TouchedPages::new();
    let mut chunk = vec![0u8; 256 << 10];
    let own = (
        chunk.as_ptr() as usize,
        chunk.as_ptr() as usize + chunk.len(),
    );
    let mut words = Vec::new();
    for &(start, end, rw_private, shared) in &buffers.mappings {
        if !rw_private || shared || skip.iter().any(|s| s.0.get() < end && start < s.1.get()) {
            continue;
        }
        touched.runs(start, end, &mut |from, to| {
            read_words(&memory, &mut chunk, own, targets, from, to, &mut words)
        });
    }
    Ok(words)
}

/// Reads `from..to` through `/proc/self/mem` into `chunk`, collecting the words that point into
/// `targets` (except in `own`, the chunk itself, which holds copies) and skipping pages that
/// are gone.
fn read_words(
    memory: &std::fs::File,
    chunk: &mut [u8],
    own: (usize, usize),
    targets: &[(Hidden, Hidden)],
    from: usize,
    to: usize,
    words: &mut Vec<(usize, Hidden)>,
) {
    let mut at = from.next_multiple_of(8);
    while at + 8 <= to {
        let want = (to - at).min(chunk.len()) & !7;
        let read = match std::os::unix::fs::FileExt::read_at(memory, &mut chunk[..want], at as u64)
        {
            Ok(n) if n >= 8 => n & !7,
            // Unmapped since /proc/self/maps was read: skip the page.
            _ => {
                at = (at | 4095) + 1;
                continue;
            }
        };
        for (i, word) in chunk[..read].chunks_exact(8).enumerate() {
            let address = at + i * 8;
            let value = usize::from_ne_bytes(word.try_into().expect("8 bytes"));
            if (own.0..own.1).contains(&address) || !hit(targets, value) {
                continue;
            }
            words.push((address, Hidden::new(value)));
        }
        at += read;
    }
}
