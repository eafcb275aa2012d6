//! The in-process half of `evolve attach`: the entry point the injected loader thread calls in a
//! process that never linked Evolve, and the block of memory it shares with the injector.
//!
//! # Protocol
//!
//! The injector (crate `evolve-attach`, running in the `evolve` CLI) maps a *loader region* of
//! two pages in the target: a code page holding the loader routine and a data page holding the
//! [`layout`] block (paths, the addresses of `dlopen` and friends, a status word, an error
//! buffer). It makes the target start one thread on the routine, which:
//!
//! 1. installs the signal mask of the thread that created it ([`layout::SIGMASK`]: the creator
//!    was borrowed with its asynchronous signals blocked, and a new thread inherits the mask
//!    of its creator), detaches itself (`pthread_detach(pthread_self())`) and stores its tid in
//!    the block;
//! 2. when the injector asked for a memfd ([`layout::LOAD_FROM`] is [`layout::FROM_MEMFD`]:
//!    the agent's path is not the same file in the target's mount namespace), creates one,
//!    stores its descriptor in [`layout::MEMFD`], reports [`layout::WAITING`] and naps until
//!    the injector has written the agent into it (through `/proc/PID/fd/N`) and set
//!    [`layout::LOAD_FROM`] to [`layout::MEMFD_FILLED`], then `dlopen`s `/proc/self/fd/N`
//!    ([`layout::FD_PATH`]) and closes the descriptor;
//! 3. otherwise `dlopen`s the agent's path (or, when the agent is already loaded, skips to 4
//!    with the entry's address); then `dlsym`s [`ENTRY_SYMBOL`];
//! 4. calls [`evolve_attach_entry`] with the block's address, which runs every
//!    [`ATTACH_STARTERS`] entry (the agent registers one: it starts the control socket) and
//!    records the outcome in the block;
//! 5. returns; the thread exits.
//!
//! The status word is written last at each step ([`layout::STATUS`]): the injector polls it
//! through `/proc/PID/mem`. After a successful start the agent owns the region: a thread started
//! here waits until the loader thread has exited (its tid leaves `/proc/self/task`), after which
//! no thread can be executing the region's code, and unmaps it. After a failure the injector
//! unmaps it itself.
//!
//! # Safety
//!
//! [`evolve_attach_entry`] is called only by the loader routine, with the address of a block the
//! injector laid out per [`layout`] in a readable and writable page that stays mapped until the
//! loader thread has exited. The entry reads NUL-terminated strings and words at the documented
//! offsets and writes the error buffer and status word; it never reads or writes past the block.
//! The region is unmapped only after the loader thread, the only one executing its code, has
//! exited.
#![allow(unsafe_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The symbol the loader looks up in the agent shared object.
pub const ENTRY_SYMBOL: &str = "evolve_attach_entry";

/// Offsets in the loader's data page (the block), shared by the injector and the entry.
pub mod layout {
    /// `i32`: 0 not started, [`LOADING`], [`WAITING`], [`READY`], or a negative failure code.
    pub const STATUS: usize = 0;
    /// `i32`: the loader thread's kernel tid.
    pub const TID: usize = 4;
    /// `i32`: the memfd the loader created, `-errno` if `memfd_create` failed, `i32::MIN` before.
    pub const MEMFD: usize = 8;
    /// `i32`: where to load the agent from: [`FROM_PATH`], [`FROM_MEMFD`], then
    /// [`MEMFD_FILLED`] (set by the injector), or [`MEMFD_ABANDONED`].
    pub const LOAD_FROM: usize = 12;
    /// `u64`: the `dlopen` handle.
    pub const HANDLE: usize = 16;
    /// `u64`s: addresses of `pthread_self`, `pthread_detach`, `dlopen`, `dlsym`, `dlerror`,
    /// `dlclose` in the target.
    pub const FUNCTIONS: usize = 24;
    /// `u64`: start of the loader region (code page first).
    pub const REGION: usize = 72;
    /// `u64`: length of the loader region.
    pub const REGION_LEN: usize = 80;
    /// `u64`: when non-zero, the entry's address in an agent already loaded: no `dlopen`.
    pub const ENTRY: usize = 88;
    /// `u64`: the address of `mprotect` (the loader makes this page writable with it).
    pub const MPROTECT: usize = 96;
    /// `u64`: the kernel signal set the loader thread installs first.
    pub const SIGMASK: usize = 104;
    /// `struct timespec`: the loader's nap while it waits for the memfd to be filled.
    pub const NAP: usize = 112;
    /// NUL-terminated: [`super::ENTRY_SYMBOL`].
    pub const ENTRY_NAME: usize = 128;
    /// NUL-terminated: where the agent puts its socket.
    pub const SOCKET_DIR: usize = 192;
    /// NUL-terminated: the agent shared object to `dlopen`.
    pub const PATH: usize = 704;
    /// NUL-terminated: why the load failed (`dlerror()`, or the agent's own message).
    pub const ERROR: usize = 1728;
    /// Size of the error buffer.
    pub const ERROR_LEN: usize = 1024;
    /// NUL-terminated: `/proc/self/fd/N` of the memfd (written by the injector).
    pub const FD_PATH: usize = ERROR + ERROR_LEN;
    /// NUL-terminated: the memfd's name (it shows in `/proc/PID/maps` as `/memfd:NAME`).
    pub const MEMFD_NAME: usize = FD_PATH + 64;
    /// Size of the block.
    pub const LEN: usize = MEMFD_NAME + 64;
    /// Longest socket directory, with its NUL.
    pub const SOCKET_DIR_LEN: usize = PATH - SOCKET_DIR;
    /// Longest agent path, with its NUL.
    pub const PATH_LEN: usize = ERROR - PATH;
    /// How many naps the loader waits for the memfd to be filled before it gives up.
    pub const MAX_NAPS: u32 = 100_000;

    /// Load from: `dlopen` the path.
    pub const FROM_PATH: i32 = 0;
    /// Load from: a memfd the loader creates and the injector fills.
    pub const FROM_MEMFD: i32 = 1;
    /// Load from: the memfd, now filled.
    pub const MEMFD_FILLED: i32 = 2;
    /// Load from: nothing; the injector could not fill the memfd (the loader reports
    /// [`MEMFD_FAILED`]).
    pub const MEMFD_ABANDONED: i32 = 3;

    /// Status: the loader thread runs.
    pub const LOADING: i32 = 1;
    /// Status: the agent serves its socket.
    pub const READY: i32 = 2;
    /// Status: the loader waits for the injector to fill its memfd.
    pub const WAITING: i32 = 3;
    /// Status: `dlopen` failed (the error buffer holds `dlerror()`).
    pub const DLOPEN_FAILED: i32 = -1;
    /// Status: the shared object has no [`super::ENTRY_SYMBOL`].
    pub const NO_ENTRY: i32 = -2;
    /// Status: the agent did not start (the error buffer says why).
    pub const START_FAILED: i32 = -3;
    /// Status: `memfd_create` failed ([`MEMFD`] holds `-errno`), the injector abandoned the
    /// memfd, or it was not filled in time.
    pub const MEMFD_FAILED: i32 = -4;
}

/// What a starter is given: where to serve, and the loader that brought the agent in.
#[derive(Debug, Clone)]
pub struct AttachRequest {
    /// The directory for the control socket (chosen by the CLI so that it finds it again).
    pub socket_dir: PathBuf,
    /// The loader thread's tid.
    pub loader_tid: i32,
}

/// Starts what an attached process needs; returns a line for the injector (e.g. the socket).
pub type Starter = fn(&AttachRequest) -> Result<String, String>;

/// Run by [`evolve_attach_entry`], in link order. The agent shared object registers the agent.
#[linkme::distributed_slice]
pub static ATTACH_STARTERS: [Starter];

/// Reads the NUL-terminated string of at most `max` bytes at `block + offset`.
///
/// # Safety
/// `block` points to a readable block of at least `offset + max` bytes.
unsafe fn read_str(block: *const u8, offset: usize, max: usize) -> String {
    // SAFETY: the caller guarantees `offset + max` bytes are readable.
    let bytes = unsafe { std::slice::from_raw_parts(block.add(offset), max) };
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(max);
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Reads the `u64` at `block + offset`.
///
/// # Safety
/// `block + offset` is readable for 8 bytes.
unsafe fn read_u64(block: *const u8, offset: usize) -> u64 {
    // SAFETY: the caller guarantees 8 readable bytes; the block is only 8-aligned at its
    // documented word offsets, so read unaligned to be independent of that.
    unsafe { block.add(offset).cast::<u64>().read_unaligned() }
}

/// Writes `message` (truncated, NUL-terminated) into the block's error buffer.
///
/// # Safety
/// `block` points to a writable block of [`layout::LEN`] bytes.
unsafe fn write_error(block: *mut u8, message: &str) {
    let bytes = message.as_bytes();
    let n = bytes.len().min(layout::ERROR_LEN - 1);
    // SAFETY: `n + 1 <= ERROR_LEN` bytes from `ERROR` lie inside the block.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), block.add(layout::ERROR), n);
        block.add(layout::ERROR + n).write(0);
    }
}

/// The entry point the injected loader calls after loading the agent (see the module docs).
/// Returns 0 when every starter succeeded; otherwise writes the error into the block and
/// returns [`layout::START_FAILED`].
///
/// # Safety
/// `block` is the address of a loader block laid out per [`layout`], readable and writable,
/// that stays mapped until the calling thread has exited; the caller is the loader thread.
#[no_mangle]
pub unsafe extern "C" fn evolve_attach_entry(block: *mut u8) -> i32 {
    // SAFETY: (all reads and writes below) the caller's contract is that `block` is a mapped,
    // writable block of `layout::LEN` bytes; every offset used is inside it.
    let (request, region, region_len) = unsafe {
        (
            AttachRequest {
                socket_dir: PathBuf::from(read_str(
                    block,
                    layout::SOCKET_DIR,
                    layout::SOCKET_DIR_LEN,
                )),
                loader_tid: block.add(layout::TID).cast::<i32>().read_unaligned(),
            },
            read_u64(block, layout::REGION) as usize,
            read_u64(block, layout::REGION_LEN) as usize,
        )
    };
    // First, before the agent uses its thread state: without static TLS the agent still works,
    // its probes on their slow path (see `static_tls`).
    let _ = crate::thread_state::use_static_tls();
    let outcome = std::panic::catch_unwind(|| -> Result<(), String> {
        if ATTACH_STARTERS.is_empty() {
            return Err("this shared object registers no attach starter (not an agent)".into());
        }
        for start in ATTACH_STARTERS.iter() {
            start(&request)?;
        }
        Ok(())
    });
    let failure = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(message)) => Some(message),
        Err(_) => Some("the agent panicked while starting (see the process's stderr)".into()),
    };
    if let Some(message) = failure {
        // SAFETY: `block` is the caller's writable block of `layout::LEN` bytes (see above).
        unsafe { write_error(block, &message) };
        // The injector unmaps the region after a failure.
        return layout::START_FAILED;
    }
    release_region_after(request.loader_tid, region, region_len);
    0
}

/// Where this copy of the engine keeps the per-thread state its generated code reads: `Ok` with
/// its offset from the thread pointer when an attached agent moved it into static TLS (the
/// probes' fast paths work), or why it did not (`dlopen` refused the static-TLS object: glibc's
/// surplus is used up; the probes take their slow path). The attach entry decides, once, before
/// the agent starts; in a program that linked Evolve this says it was not needed (its
/// thread-locals are static TLS already).
///
/// # Example
///
/// ```
/// // A test binary links the engine: its thread state is static TLS already.
/// assert!(evolve_code::attached::static_tls().is_err());
/// ```
pub fn static_tls() -> Result<isize, String> {
    crate::thread_state::static_tls_outcome().unwrap_or_else(|| {
        Err("not an attached agent: the engine's thread-locals are the program's own".into())
    })
}

/// Unmaps the loader region once thread `tid` (the only one executing its code) has exited.
fn release_region_after(tid: i32, region: usize, len: usize) {
    if region == 0 || len == 0 {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("evolve-attach-cleanup".into())
        .spawn(move || {
            let task = PathBuf::from(format!("/proc/self/task/{tid}"));
            let deadline = Instant::now() + Duration::from_secs(60);
            while task.exists() {
                if Instant::now() > deadline {
                    // The loader never left: keep its code mapped rather than pull it from
                    // under a thread (a page of memory is the lesser harm).
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            // SAFETY: the region was mapped by the injector for the loader alone; nothing but
            // the loader thread executed or referenced it, and that thread has exited (its task
            // is gone). The injector no longer touches it after seeing READY.
            unsafe {
                libc::munmap(region as *mut libc::c_void, len);
            }
        });
    // Without a thread the region stays mapped: two pages, harmless.
    drop(spawned);
}
