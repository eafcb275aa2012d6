//! Reclamation's reference scan: can anything in the process still reach a range of addresses?
//!
//! A patch is unloaded only when nothing can reach it (DESIGN.md, "versions and reclamation").
//! The proof needs a moment when no thread moves — [`crate::world`] stops them — and then looks
//! at every place the program can hold an address, each with the rule that suits it.
//!
//! # What counts as a reference
//!
//! 1. **Code in execution, exactly.** Each stopped thread's stack is walked with the unwind
//!    tables (the program's, its libraries', every loaded patch's, and those the engine
//!    registered for its trampolines): the PC it is stopped at, every return address, and the
//!    PC saved in every signal frame. A thread resumes only at these, so if one of them lies in
//!    a target, the target is in execution. Where a walk ends early (code without unwind
//!    information), the rest of that stack is treated conservatively as below.
//! 2. **Registers, conservatively.** Every general register and every word of every vector
//!    register (XMM, YMM, ZMM, MMX: [`crate::world::Registers::vector_words`]) of every stopped
//!    thread: `memcpy` and optimisers keep pointers there.
//! 3. **Stack data, conservatively, within the live stack.** For each context of each thread
//!    (the innermost, and each interrupted by a signal), the words from its stack pointer minus
//!    the 128-byte red zone to the end of the stack's mapping (which includes, for threads other
//!    than the main one, the thread's TLS block). Words below are dead: the ABI lets a signal
//!    handler overwrite anything below the red zone at any moment, so no program can rely on
//!    what is there. One refinement, on stacks walked to their outermost frame: a word there
//!    that points into executable code, is not one of the return-address slots the walk found,
//!    and is not the first address of a function (an FDE's start) is a stale return address
//!    left by a call that has returned — not a reference. Sound because interior code addresses
//!    are only ever executed by returning through a live frame (all known, rule 1), or by
//!    resuming a context saved by `setjmp`/`getcontext` — and such a context can only be
//!    resumed while the function that saved it is live, which rule 1 already sees (glibc
//!    mangles the PC in a `jmp_buf` anyway, so no scan could see it). Function pointers (a
//!    function's first address) still count. Stacks of coroutines, which may be suspended at
//!    interior addresses, are not thread stacks: rule 4 scans them without the refinement.
//! 4. **Memory, conservatively** (the `Memory` scope). Every readable, non-executable mapping,
//!    only the pages the program wrote ([`crate::sys::pagemap`]): in a private mapping, a page
//!    never written holds its file's bytes, not a pointer the program stored; read-only pages
//!    that were written before being protected (RELRO) are included. Executable mappings are
//!    not read: the engine's own code memory (springboards, trampolines) refers to patches only
//!    through patch sites, which unloading checks separately; a program that generates code
//!    with embedded addresses is not covered.
//!
//! Memory is read through [`crate::sys::peek`]: a page that cannot be read (a private mapping
//! of a truncated file, memory of an exotic driver) is counted in
//! [`ScanReport::unreadable_pages`] and skipped, never a `SIGBUS` in the scan. Skipping it is
//! sound: the program cannot read such a page either, and the only way it becomes readable
//! again is by the file growing back, which brings the file's bytes, not a stored pointer.
//!
//! Not references: the words the caller excludes (the targets' own memory, the loader's
//! bookkeeping recorded at load), the dynamic loader's and libgcc's writable data (their caches
//! of loaded ranges; libc's data is scanned: it holds `atexit` handlers), and the engine's own
//! state: the scan runs on a thread of its own, whose stack is skipped, and the frames of the
//! requesting thread below its [`engine_frames`] mark hold only the engine's work (the targets
//! themselves are kept [`Hidden`] everywhere else).
//!
//! # Cost
//!
//! Everything the scan needs is allocated before the world stops (a stopped thread may hold the
//! allocator's lock). The pause is the stop plus reading the written pages: the report gives it.
#![allow(unsafe_code)]

use crate::error::{Error, ErrorKind, Result};
use crate::hidden::Hidden;
use crate::sys::maps::Region;
use crate::sys::pagemap::{PageMap, Wanted};
use crate::sys::peek;
use crate::sys::regs::VectorRegister;
use crate::sys::walk::WalkEnd;
use crate::sys::world::{stop_the_world_within, ResumeKind, StoppedThread, World};
use std::cell::Cell;
use std::ops::Range;
use std::time::Duration;

/// What a scan found and what it cost.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScanReport {
    /// Threads stopped.
    pub threads: usize,
    /// Where references were found (`thread 123 returns to 0x…`, `xmm7 of thread 123`, `stack
    /// word at 0x… of thread 123`, `memory word at 0x…`), at most 16 of each kind.
    pub references: Vec<String>,
    /// Bytes of memory scanned.
    pub bytes_scanned: usize,
    /// Pages that could not be read (and hold nothing the program can read either).
    pub unreadable_pages: usize,
    /// How long the other threads were stopped, in microseconds.
    pub pause_us: u64,
}

/// What to look for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Code in execution, registers and stacks of every thread (PSU's check).
    Stacks,
    /// Those, and every page of memory the program wrote.
    Memory,
}

thread_local! {
    /// The stack address below which this thread's frames are the engine's (0: none marked).
    static ENGINE_ENTRY: Cell<usize> = const { Cell::new(0) };
}

/// Marks the frames this thread pushes from here on, until the guard is dropped, as the
/// engine's own: a scan requested from inside them does not read their data words (they hold
/// the engine's work on the very patches being scanned for), while return addresses and
/// registers are still checked. Call it at the top of a public entry point that scans.
///
/// # Example
///
/// ```
/// let _engine = evolve_code::scan::engine_frames();
/// // ... calls that end in `scan_for_references`
/// ```
#[inline(always)]
pub fn engine_frames() -> EngineFrames {
    let probe = 0u8;
    let here = std::hint::black_box(&probe) as *const u8 as usize;
    let previous = ENGINE_ENTRY.with(|e| e.replace(if e.get() == 0 { here } else { e.get() }));
    EngineFrames { previous }
}

/// The guard of [`engine_frames`].
#[derive(Debug)]
pub struct EngineFrames {
    previous: usize,
}

impl Drop for EngineFrames {
    fn drop(&mut self) {
        ENGINE_ENTRY.with(|e| e.set(self.previous));
    }
}

/// One place a reference was found (kept small and `Copy`: noted with the world stopped).
#[derive(Clone, Copy)]
enum Found {
    Frame {
        tid: i32,
        pc: usize,
        how: ResumeKind,
    },
    Register {
        tid: i32,
        index: usize,
    },
    Vector {
        tid: i32,
        register: VectorRegister,
    },
    Stack {
        tid: i32,
        at: usize,
    },
    Memory {
        at: usize,
    },
}

const GREG_NAMES: [&str; crate::sys::regs::GENERAL] = [
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi", "rsi", "rbp", "rbx", "rdx", "rax",
    "rcx", "rsp", "rip", "eflags", "csgsfs", "err", "trapno", "oldmask", "cr2",
];

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Found::Frame { tid, pc, how } => match how {
                ResumeKind::Executing => write!(f, "thread {tid} is executing at {pc:#x}"),
                ResumeKind::Interrupted => {
                    write!(f, "thread {tid} resumes at {pc:#x} after a signal handler")
                }
                ResumeKind::Return => write!(f, "thread {tid} returns to {pc:#x}"),
                ResumeKind::StackWord { at } => write!(f, "stack word at {at:#x} of thread {tid}"),
            },
            Found::Register { tid, index } => {
                write!(f, "register {} of thread {tid}", GREG_NAMES[index])
            }
            Found::Vector { tid, register } => write!(f, "{register} of thread {tid}"),
            Found::Stack { tid, at } => write!(f, "stack word at {at:#x} of thread {tid}"),
            Found::Memory { at } => write!(f, "memory word at {at:#x}"),
        }
    }
}

/// Up to 16 places of each kind (threads; memory), so that one kind cannot hide the other.
struct Findings {
    found: Vec<Found>,
    threads: usize,
    memory: usize,
}

impl Findings {
    fn note(&mut self, found: Found) {
        let count = match found {
            Found::Memory { .. } => &mut self.memory,
            _ => &mut self.threads,
        };
        if *count < 16 && self.found.len() < self.found.capacity() {
            *count += 1;
            self.found.push(found);
        }
    }
}

/// A scan's inputs and its buffers, allocated before the world stops.
struct Scan<'a> {
    targets: &'a [(Hidden, Hidden)],
    scope: Scope,
    excluded: &'a (dyn Fn(usize, usize) -> bool + Sync),
    /// The requesting thread, and the stack address below which its frames are the engine's.
    requester: (i32, usize),
    runtime_data: Vec<(Hidden, Hidden)>,
    pagemap: PageMap,
    buffer: Vec<u8>,
    findings: Findings,
    bytes_scanned: usize,
    unreadable_pages: usize,
}

fn hit(targets: &[(Hidden, Hidden)], value: usize) -> bool {
    targets
        .iter()
        .any(|t| (t.0.get()..t.1.get()).contains(&value))
}

/// Stops every other thread, looks for references to `targets` (module docs), and resumes them.
///
/// Runs on a thread of the engine's own (the caller's stack is scanned like any other thread's,
/// except its frames below [`engine_frames`]). `excluded(address, value)` tells the scan to
/// ignore a word at `address` holding `value` (the targets' own memory, bookkeeping known to be
/// harmless). Fails, changing nothing, if some thread does not stop within `timeout`.
///
/// # Example
///
/// ```
/// use evolve_code::{scan::{scan_for_references, Scope}, Hidden};
/// // Nothing points at an address range nobody ever computed.
/// let nowhere = [(Hidden::new(0x7e00_dead_0000), Hidden::new(0x7e00_dead_1000))];
/// let report = scan_for_references(&nowhere, Scope::Memory, std::time::Duration::from_secs(2),
///     &|_, _| false).unwrap();
/// assert!(report.references.is_empty(), "{:?}", report.references);
/// ```
pub fn scan_for_references(
    targets: &[(Hidden, Hidden)],
    scope: Scope,
    timeout: Duration,
    excluded: &(dyn Fn(usize, usize) -> bool + Sync),
) -> Result<ScanReport> {
    let tid = rustix::thread::gettid().as_raw_nonzero().get();
    let marker = ENGINE_ENTRY.with(Cell::get);
    let probe = 0u8;
    let here = std::hint::black_box(&probe) as *const u8 as usize;
    let requester = (tid, if marker == 0 { here } else { marker });
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("evolve-scan".into())
            .spawn_scoped(s, || {
                let mut scan = Scan {
                    targets,
                    scope,
                    excluded,
                    requester,
                    runtime_data: loader_and_unwinder_data(),
                    pagemap: PageMap::new(),
                    buffer: vec![0; 256 << 10],
                    findings: Findings {
                        found: Vec::with_capacity(32),
                        threads: 0,
                        memory: 0,
                    },
                    bytes_scanned: 0,
                    unreadable_pages: 0,
                };
                let (threads, pause) = stop_the_world_within(timeout, |world| {
                    scan.world(world);
                    (world.len(), world.stopped_for())
                })?;
                let references = scan.findings.found.iter().map(|f| f.to_string()).collect();
                Ok(ScanReport {
                    threads,
                    references,
                    bytes_scanned: scan.bytes_scanned,
                    unreadable_pages: scan.unreadable_pages,
                    pause_us: pause.as_micros() as u64,
                })
            })
            .map_err(|e| {
                Error::new(ErrorKind::Os {
                    operation: "start the scan thread",
                    errno: e.raw_os_error().unwrap_or(0),
                })
            })?
            .join()
            .unwrap_or_else(|_| {
                Err(Error::new(ErrorKind::Unsupported {
                    what: "the scan thread panicked",
                }))
            })
    })
}

impl Scan<'_> {
    /// Everything, with the world stopped (no allocation).
    fn world(&mut self, world: &World<'_>) {
        for thread in world.threads() {
            self.thread(world, &thread);
        }
        if self.scope == Scope::Memory {
            self.memory(world);
        }
    }

    fn thread(&mut self, world: &World<'_>, thread: &StoppedThread<'_>) {
        let tid = thread.tid();
        let targets = self.targets;
        // 1. Code in execution.
        for (pc, how) in thread.resumable_pcs() {
            if hit(targets, pc) {
                self.findings.note(Found::Frame { tid, pc, how });
            }
        }
        // 2. Registers.
        for (index, value) in thread.registers().general().iter().enumerate() {
            if hit(targets, *value as usize) {
                self.findings.note(Found::Register { tid, index });
            }
        }
        for (register, value) in thread.registers().vector_words() {
            if hit(targets, value as usize) {
                self.findings.note(Found::Vector { tid, register });
            }
        }
        // 3. Stack data.
        let complete = thread.walk_end() == WalkEnd::Complete;
        let engine_below =
            (tid == self.requester.0).then(|| engine_frames_end(thread, self.requester.1));
        for stack in thread.stacks() {
            let mut range = stack.clone();
            if let Some(end) = engine_below.filter(|end| range.contains(end)) {
                range.start = end;
            }
            self.words(range, Wanted::Touched, &mut |scan, at, value| {
                if thread.frames().iter().any(|f| f.slot == at) {
                    return; // a return-address slot: checked exactly above
                }
                if complete && is_stale_return_address(world, value) {
                    return;
                }
                scan.findings.note(Found::Stack { tid, at });
            });
        }
    }

    fn memory(&mut self, world: &World<'_>) {
        let probe = 0u8;
        let own_stack = std::hint::black_box(&probe) as *const u8 as usize;
        for region in world.maps().regions() {
            if !region.read
                || region.exec
                || region.is_special()
                || (region.shared && !region.write)
            {
                continue;
            }
            if region.range.contains(&own_stack) || is_thread_stack(world, &region) {
                continue;
            }
            let wanted = if region.shared {
                Wanted::Touched
            } else {
                Wanted::Written
            };
            self.words(region.range.clone(), wanted, &mut |scan, at, _| {
                if !world.owns(at) {
                    scan.findings.note(Found::Memory { at });
                }
            });
        }
    }

    /// Reads the `wanted` pages of `range` and calls `found(self, address, value)` for each word
    /// that points into a target and is not excluded.
    fn words(
        &mut self,
        range: Range<usize>,
        wanted: Wanted,
        found: &mut dyn FnMut(&mut Self, usize, usize),
    ) {
        let mut runs: [Range<usize>; 64] = std::array::from_fn(|_| 0..0);
        let mut pending = range.start;
        while pending < range.end {
            // Collect up to 64 runs of wanted pages, then read them (the pagemap borrow ends).
            let mut count = 0;
            let mut next = range.end;
            self.pagemap
                .runs(pending, range.end, wanted, &mut |from, to| {
                    if count < runs.len() {
                        runs[count] = from..to;
                        count += 1;
                    } else if next == range.end {
                        next = from;
                    }
                });
            for run in runs.iter().take(count).cloned() {
                self.read_run(run, found);
            }
            pending = next;
        }
    }

    fn read_run(&mut self, run: Range<usize>, found: &mut dyn FnMut(&mut Self, usize, usize)) {
        let buffer_range = {
            let start = self.buffer.as_ptr() as usize;
            start..start + self.buffer.len()
        };
        let mut at = run.start.next_multiple_of(8);
        while at + 8 <= run.end {
            let want = (run.end - at).min(self.buffer.len()) & !7;
            let got = peek::read(at, &mut self.buffer[..want]) & !7;
            if got == 0 {
                // A page that cannot be read: count it and go on after it.
                self.unreadable_pages += 1;
                at = (at | (crate::sys::memory::page_size() - 1)) + 1;
                continue;
            }
            self.bytes_scanned += got;
            for i in 0..got / 8 {
                let value = usize::from_ne_bytes(
                    self.buffer[8 * i..8 * i + 8].try_into().expect("8 bytes"),
                );
                let address = at + 8 * i;
                if !hit(self.targets, value)
                    || buffer_range.contains(&address)
                    || self
                        .runtime_data
                        .iter()
                        .any(|r| (r.0.get()..r.1.get()).contains(&address))
                    || (self.excluded)(address, value)
                {
                    continue;
                }
                found(self, address, value);
            }
            at += got;
        }
    }
}

/// Where the requesting thread's engine frames end: the stack pointer of the frame above the
/// one holding `marker` (so the marking function's own frame is the engine's too).
fn engine_frames_end(thread: &StoppedThread<'_>, marker: usize) -> usize {
    let frames = thread.frames();
    frames
        .windows(2)
        .find(|w| w[0].sp <= marker && marker < w[1].sp)
        .map_or(marker, |w| w[1].sp)
}

fn is_stale_return_address(world: &World<'_>, value: usize) -> bool {
    let executable = world
        .maps()
        .region_containing(value)
        .is_some_and(|r| r.exec);
    executable && world.function_start(value) != Some(value)
}

fn is_thread_stack(world: &World<'_>, region: &Region<'_>) -> bool {
    world.threads().any(|t| {
        t.stacks()
            .iter()
            .any(|s| s.end == region.range.end && region.range.contains(&s.start))
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

/// Reads every private word the program wrote (without stopping anyone) that points into
/// `targets`, as `(address, value)` pairs: used right after loading an object, when only the
/// loader can have stored such words, to learn its bookkeeping. Memory that other threads unmap
/// meanwhile is skipped: it is read through [`crate::sys::peek`].
pub fn words_pointing_into(
    targets: &[(Hidden, Hidden)],
    skip: &[(Hidden, Hidden)],
) -> Result<Vec<(usize, Hidden)>> {
    peek::prepare();
    let mut maps = crate::sys::maps::MapsBuffer::with_capacity(256 << 10);
    maps.read_growing()?;
    let mut pagemap = PageMap::new();
    let mut chunk = vec![0u8; 256 << 10];
    let own = chunk.as_ptr() as usize..chunk.as_ptr() as usize + chunk.len();
    let mut words = Vec::new();
    for region in maps.regions() {
        let (start, end) = (region.range.start, region.range.end);
        if !region.read
            || region.exec
            || region.shared
            || region.is_special()
            || skip.iter().any(|s| s.0.get() < end && start < s.1.get())
        {
            continue;
        }
        pagemap.runs(start, end, Wanted::Written, &mut |from, to| {
            let mut at = from.next_multiple_of(8);
            while at + 8 <= to {
                let want = (to - at).min(chunk.len()) & !7;
                let got = peek::read(at, &mut chunk[..want]) & !7;
                if got == 0 {
                    at = (at | 4095) + 1; // gone since the mappings were read
                    continue;
                }
                for (i, word) in chunk[..got].chunks_exact(8).enumerate() {
                    let address = at + i * 8;
                    let value = usize::from_ne_bytes(word.try_into().expect("8 bytes"));
                    if !own.contains(&address) && hit(targets, value) {
                        words.push((address, Hidden::new(value)));
                    }
                }
                at += got;
            }
        });
    }
    Ok(words)
}
