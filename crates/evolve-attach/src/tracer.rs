//! Borrowing one thread of the target for remote calls, through ptrace.
//!
//! # Protocol
//!
//! 1. **Seize every thread** (`PTRACE_SEIZE`, which does not stop them), re-reading
//!    `/proc/PID/task` until a listing adds no thread: from then on no other tracer can take a
//!    thread of the process while we work, and every thread is one we may stop. A thread that
//!    exits meanwhile is skipped; `EPERM` is a refusal with its cause.
//! 2. **Choose one thread and stop only it** (`PTRACE_INTERRUPT`). The others keep running:
//!    stopping them would only lengthen the pause, and a stopped thread holding a lock that the
//!    remote call needs (the allocator's, the loader's) would deadlock it. The chosen thread
//!    must hold no C-library lock, so it is one that `/proc/PID/task/TID/syscall` shows blocked
//!    in a restartable waiting call (`read`, `accept`, `nanosleep`, `poll`, …; best), running
//!    user code outside libc and the dynamic loader (checked once stopped), waiting in `futex`,
//!    or, last, in `epoll_wait` (which Linux ends with `EINTR` on any stop, as it does for
//!    `SIGSTOP`; event loops retry). A candidate found elsewhere once stopped is resumed at once.
//! 3. **Save every register**: the general registers (`PTRACE_GETREGS`, including `orig_rax`,
//!    which carries an interrupted system call), the whole XSAVE area
//!    (`PTRACE_GETREGSET NT_X86_XSTATE`: x87, SSE, AVX, AVX-512, PKRU) and the signal mask
//!    (`PTRACE_GETSIGMASK`, which reports the thread's own mask even while `ppoll` or
//!    `sigsuspend` has a temporary one installed). Then **block every asynchronous signal**
//!    (`PTRACE_SETSIGMASK`; the synchronous `SIGSEGV`, `SIGBUS`, `SIGILL`, `SIGFPE`, `SIGTRAP`
//!    and `SIGSYS` stay open): a signal sent to the process meanwhile goes to another thread,
//!    or stays pending in the kernel, `siginfo` and all, until step 5.
//! 4. **Remote calls**: the stack pointer moves below the 128-byte red zone and is aligned to
//!    16 bytes, a return address that cannot be mapped (`0x320`, below `mmap_min_addr`) is
//!    pushed, arguments go in `rdi`…`r9`, `orig_rax` becomes -1 (so the kernel does not apply
//!    the interrupted call's restart to our registers), and the thread runs until it faults on
//!    that return address; `rax` is the result. An unblockable `SIGSTOP` that arrives meanwhile
//!    is held back and re-sent at step 5.
//! 5. **Restore every register exactly** (general, XSAVE, signal mask), then `PTRACE_DETACH`.
//!    The thread resumes from its stop with its own registers: if it was interrupted in a
//!    system call, `orig_rax` and the `-ERESTART*` value in `rax` are back, and the kernel
//!    restarts the call (rewinding `rip` over the `syscall` instruction, or through
//!    `restart_syscall` for sleeps; `ppoll`/`sigsuspend` install their temporary mask again)
//!    exactly as after any signal without a handler. Signals left pending at step 3 are
//!    delivered now by the kernel itself. A signal that was already on its way when the thread
//!    stopped (its first stop is then a signal-delivery stop) is re-injected by the detach with
//!    its original `siginfo`; any other held back is queued again (`rt_tgsigqueueinfo`).
//! 6. The threads that were only seized are released when the tracing thread exits (the kernel
//!    detaches a dead tracer's tracees): `PTRACE_DETACH` would need each of them stopped first.
//!    So every session runs on a thread of its own ([`with_borrowed_thread`]).
//!
//! # Measuring the stops
//!
//! The interval from `PTRACE_INTERRUPT` to `PTRACE_DETACH` of each thread we stop is recorded
//! ([`Stops`]). A thread only seized is not stopped by us, but a signal sent to it while it is
//! our tracee makes it stop (a signal-delivery stop) until its tracer lets it go on: the session
//! polls the seized threads every [`BYSTANDER_POLL`] while it waits, passes such a signal on at
//! once (`PTRACE_CONT` with it, which keeps its `siginfo`), and records that stop as lasting
//! since the previous poll (an upper bound). A group stop (`SIGSTOP` to the process) is someone
//! else's stop and is left in place. So [`Stops::max`] bounds from above every interval in which
//! a thread of the target did not run because of us, except a signal arriving in the last
//! microseconds between the final poll and the tracing thread's exit.

use crate::error::{errno, Error, ErrorKind, Refusal, Result};
use crate::memory::Memory;
use crate::process::{self, Activity, Mapping};
use nix::sys::ptrace;

use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// The return address of remote calls: never mapped (below `vm.mmap_min_addr`).
pub const RETURN_TRAP: u64 = 0x320;
/// The System V red zone below the stack pointer, which leaf code may use.
const RED_ZONE: u64 = 128;
/// Bytes kept below the red zone for remote calls' results ([`Borrowed::scratch`]).
const SCRATCH: u64 = 64;
/// How long a remote call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to look for a thread at a safe point.
const CHOOSE_TIMEOUT: Duration = Duration::from_millis(500);
/// How often the seized threads are checked for signal-delivery stops while the session waits.
pub const BYSTANDER_POLL: Duration = Duration::from_micros(500);
/// The signals a borrowed thread keeps open: the synchronous ones (a fault in a remote call,
/// and the return trap itself, must be reported, and the kernel would force a blocked one
/// through by resetting its handler). Every other signal is blocked during the borrow.
const SYNCHRONOUS: [i32; 6] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGTRAP,
    libc::SIGSYS,
];

/// The mask that blocks every signal but the synchronous ones.
fn hold_mask() -> u64 {
    SYNCHRONOUS
        .iter()
        .fold(u64::MAX, |mask, sig| mask & !(1u64 << (sig - 1)))
}

/// System calls whose interruption the kernel undoes by restarting them, and in which a thread
/// holds no C-library lock: the best threads to borrow.
const RESTARTABLE_WAITS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_readv,
    libc::SYS_poll,
    libc::SYS_select,
    libc::SYS_pause,
    libc::SYS_nanosleep,
    libc::SYS_accept,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_clock_nanosleep,
    libc::SYS_pselect6,
    libc::SYS_ppoll,
    libc::SYS_accept4,
    libc::SYS_rt_sigsuspend,
];
/// Waits that Linux ends with `EINTR` when the thread is stopped (see signal(7)).
const EINTR_WAITS: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    441, // epoll_pwait2
];

/// How long each thread of the target was stopped.
#[derive(Debug, Clone, Default)]
pub struct Stops {
    /// `(tid, stopped for)` for every thread that was stopped, in order.
    pub periods: Vec<(i32, Duration)>,
    /// How many threads were seized.
    pub seized: usize,
    /// The thread that made the remote calls.
    pub borrowed: Option<i32>,
    /// What that thread was doing when borrowed (a system call's name, or "user code").
    pub borrowed_in: String,
    /// Signal-delivery stops of only-seized threads that the session passed on (their periods,
    /// upper bounds, are in [`Stops::periods`] too).
    pub signal_stops: usize,
    /// How long each step of the session took, in order: `seize`, `choose` (until the borrowed
    /// thread is stopped at a safe point, its registers saved), `calls`, `release`.
    pub phases: Vec<(&'static str, Duration)>,
}

impl Stops {
    /// The longest stop of any thread.
    pub fn max(&self) -> Duration {
        self.periods.iter().map(|p| p.1).max().unwrap_or_default()
    }
}

/// A thread of the target, stopped and lent to us, with the registers it must get back.
pub struct Borrowed {
    pid: u32,
    tid: Pid,
    saved: libc::user_regs_struct,
    xstate: Vec<u8>,
    held: Vec<libc::siginfo_t>,
    stopped_at: Instant,
    /// Whether the thread's last stop is the fault of a remote call's return (a
    /// signal-delivery stop, where the detach can inject a held-back signal).
    at_signal_stop: bool,
    /// The thread's own signal mask, while it is replaced by [`hold_mask`].
    mask: Option<u64>,
    /// The other seized threads.
    bystanders: Bystanders,
}

/// The seized threads that keep running (every one but the borrowed thread), watched for
/// signal-delivery stops (see the module docs).
struct Bystanders {
    pid: u32,
    tids: Vec<Pid>,
    last_poll: Instant,
    /// `(tid, stopped for at most)` of each stop passed on.
    periods: Vec<(i32, Duration)>,
}

impl Bystanders {
    fn new(pid: u32, tids: Vec<Pid>, seized_at: Instant) -> Bystanders {
        Bystanders {
            pid,
            tids,
            last_poll: seized_at,
            periods: Vec::new(),
        }
    }

    /// No longer ours to watch (the borrowed thread, or a candidate detached again).
    fn forget(&mut self, tid: Pid) {
        self.tids.retain(|t| *t != tid);
    }

    /// Polls now if the last poll is older than [`BYSTANDER_POLL`].
    fn poll_if_due(&mut self) -> Result<()> {
        if self.last_poll.elapsed() >= BYSTANDER_POLL {
            self.poll()?;
        }
        Ok(())
    }

    /// Passes on the signal of every seized thread found in a signal-delivery stop.
    fn poll(&mut self) -> Result<()> {
        let since = self.last_poll;
        let mut gone = Vec::new();
        for &tid in &self.tids {
            match wait_thread(tid) {
                Ok(Waited::SignalStop(sig)) => {
                    // The kernel keeps the signal's siginfo for the restart with it.
                    match evolve_code::ptrace::cont(tid.as_raw(), sig) {
                        Ok(()) => self.periods.push((tid.as_raw(), since.elapsed())),
                        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => gone.push(tid),
                        Err(e) => return Err(io_error(self.pid, e, "PTRACE_CONT")),
                    }
                }
                // A group stop: the process was stopped by someone; it stays stopped.
                Ok(Waited::EventStop) | Ok(Waited::Running) => {}
                Ok(Waited::Gone) | Err(_) => gone.push(tid),
            }
        }
        for tid in gone {
            self.forget(tid);
        }
        self.last_poll = Instant::now();
        Ok(())
    }
}

impl Borrowed {
    /// The thread's id.
    pub fn tid(&self) -> i32 {
        self.tid.as_raw()
    }

    /// The thread's own signal mask (bit `n - 1`: signal `n` blocked), as it will be given
    /// back; threads the target creates meanwhile inherit the blocking mask instead, and
    /// should install this one.
    pub fn own_sigmask(&self) -> u64 {
        self.mask.unwrap_or(0)
    }

    /// 64 bytes of the borrowed thread's stack, below its red zone, that remote calls may use
    /// for results (e.g. the `pthread_t` that `pthread_create` stores).
    pub fn scratch(&self) -> u64 {
        ((self.saved.rsp - RED_ZONE - SCRATCH) & !0xf) + 16
    }

    /// Calls `function(args...)` in the target on this thread and returns `rax`.
    ///
    /// # Errors
    /// The process exits, the call crashes (a fault anywhere but the return trap), or it does
    /// not return within [`CALL_TIMEOUT`] (the thread is then left stopped in the call: the
    /// session's end restores its registers, abandoning the call).
    pub fn call(&mut self, memory: &Memory, function: u64, args: &[u64]) -> Result<u64> {
        assert!(args.len() <= 6, "at most six register arguments");
        let mut regs = self.saved;
        // Below the red zone and the scratch area, 16-byte aligned, then the return address:
        // at the function's entry (rsp + 8) is a multiple of 16, as the ABI requires.
        let mut sp = (self.saved.rsp - RED_ZONE - SCRATCH) & !0xf;
        sp -= 8;
        memory.write(sp, &RETURN_TRAP.to_le_bytes())?;
        regs.rsp = sp;
        regs.rip = function;
        regs.orig_rax = u64::MAX;
        regs.rax = 0;
        let slots = [
            &mut regs.rdi,
            &mut regs.rsi,
            &mut regs.rdx,
            &mut regs.rcx,
            &mut regs.r8,
            &mut regs.r9,
        ];
        for (slot, value) in slots.into_iter().zip(args) {
            *slot = *value;
        }
        let pid = self.pid;
        ptrace::setregs(self.tid, regs)
            .map_err(|e| gone_or(pid, e, "PTRACE_SETREGS for a remote call"))?;
        ptrace::cont(self.tid, None).map_err(|e| gone_or(pid, e, "PTRACE_CONT"))?;
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            match wait_stop(pid, self.tid, deadline, &mut self.bystanders)? {
                Stop::Signal(libc::SIGSEGV) => {
                    let now =
                        ptrace::getregs(self.tid).map_err(|e| gone_or(pid, e, "PTRACE_GETREGS"))?;
                    if now.rip == RETURN_TRAP {
                        self.at_signal_stop = true;
                        return Ok(now.rax);
                    }
                    return Err(Error::system(
                        format!(
                            "the remote call to {function:#x} crashed (SIGSEGV at {:#x})",
                            now.rip
                        ),
                        libc::EFAULT,
                    ));
                }
                Stop::Signal(s @ (libc::SIGBUS | libc::SIGILL | libc::SIGFPE)) => {
                    return Err(Error::system(
                        format!("the remote call to {function:#x} crashed (signal {s})"),
                        libc::EFAULT,
                    ));
                }
                Stop::Signal(_) => {
                    // An unblockable one (SIGSTOP): hold it back until the thread is released.
                    if let Ok(info) = ptrace::getsiginfo(self.tid) {
                        self.held.push(info);
                    }
                    ptrace::cont(self.tid, None).map_err(|e| gone_or(pid, e, "PTRACE_CONT"))?;
                }
                Stop::Event => {
                    ptrace::cont(self.tid, None).map_err(|e| gone_or(pid, e, "PTRACE_CONT"))?;
                }
            }
        }
    }

    /// Gives the thread every register and its signal mask back and lets it go; returns how
    /// long it was stopped, and the bystanders to watch until the session ends.
    fn release(self) -> (Result<Duration>, Bystanders) {
        let pid = self.pid;
        let tid = self.tid;
        let restored = ptrace::setregs(tid, self.saved)
            .map_err(|e| gone_or(pid, e, "restoring the general registers"))
            .and_then(|()| {
                evolve_code::ptrace::set_xstate(tid.as_raw(), &self.xstate).map_err(|e| {
                    Error::system(
                        "restoring the FP/SSE/AVX registers",
                        e.raw_os_error().unwrap_or(libc::EIO),
                    )
                })
            })
            .and_then(|()| match self.mask {
                Some(mask) => evolve_code::ptrace::set_sigmask(tid.as_raw(), mask).map_err(|e| {
                    Error::system(
                        "restoring the signal mask (PTRACE_SETSIGMASK)",
                        e.raw_os_error().unwrap_or(libc::EIO),
                    )
                }),
                None => Ok(()),
            });
        let result = let_go(pid, tid, self.held, self.at_signal_stop, self.stopped_at)
            .and_then(|stopped_for| restored.map(|()| stopped_for));
        (result, self.bystanders)
    }
}

/// Detaches stopped thread `tid`, injecting the first held-back signal if the thread is at a
/// signal-delivery stop (with its `siginfo`, restored first) and queueing the others again;
/// returns how long it was stopped since `stopped_at`.
fn let_go(
    pid: u32,
    tid: Pid,
    held: Vec<libc::siginfo_t>,
    at_signal_stop: bool,
    stopped_at: Instant,
) -> Result<Duration> {
    let mut held = held.into_iter();
    let first = if at_signal_stop { held.next() } else { None };
    let signal = first.as_ref().map_or(0, |info| {
        // A signal-delivery stop reports the siginfo set here with the signal injected.
        match ptrace::setsiginfo(tid, info) {
            Ok(()) => info.si_signo,
            Err(_) => 0,
        }
    });
    let detached = evolve_code::ptrace::detach(tid.as_raw(), signal)
        .map_err(|e| io_error(pid, e, "PTRACE_DETACH"));
    let stopped_for = stopped_at.elapsed();
    for info in held {
        // Rare (a second unblockable signal during one borrow); the thread is gone if it fails.
        let _ = evolve_code::ptrace::requeue_signal(pid as i32, tid.as_raw(), &info);
    }
    detached.map(|()| stopped_for)
}

/// What a stopped tracee reported.
enum Stop {
    /// A signal-delivery stop, with its signal number.
    Signal(i32),
    /// A `PTRACE_EVENT_STOP` (our interrupt, or a group stop).
    Event,
}

/// What `waitpid` says about one traced thread.
enum Waited {
    /// Nothing to report: it runs (or sleeps).
    Running,
    /// A signal-delivery stop, with the signal's number.
    SignalStop(i32),
    /// A `PTRACE_EVENT_STOP`.
    EventStop,
    /// It exited or was killed.
    Gone,
}

/// `waitpid(tid, __WALL | WNOHANG)`, decoded for any signal number (`nix`'s `waitpid` fails with
/// `EINVAL` on a real-time signal's stop, which its `Signal` cannot name).
fn wait_thread(tid: Pid) -> std::result::Result<Waited, nix::errno::Errno> {
    const PTRACE_EVENT_STOP: u32 = 128;
    let options = rustix::process::WaitOptions::NOHANG
        | rustix::process::WaitOptions::from_bits_retain(libc::__WALL as u32);
    let pid = rustix::process::Pid::from_raw(tid.as_raw()).ok_or(nix::errno::Errno::ESRCH)?;
    loop {
        match rustix::process::waitpid(Some(pid), options) {
            Ok(None) => return Ok(Waited::Running),
            Ok(Some((_, status))) => {
                let raw = status.as_raw() as u32;
                if raw & 0xff == 0x7f {
                    return Ok(if raw >> 16 == PTRACE_EVENT_STOP {
                        Waited::EventStop
                    } else if raw >> 16 == 0 {
                        Waited::SignalStop(((raw >> 8) & 0xff) as i32)
                    } else {
                        // Another event (none is asked for): treat as a stop to pass.
                        Waited::EventStop
                    });
                }
                if status.exited() || status.signaled() {
                    return Ok(Waited::Gone);
                }
                // A continued report: look again.
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(nix::errno::Errno::from_raw(e.raw_os_error())),
        }
    }
}

/// Waits for `tid` to stop, until `deadline`, passing on the bystanders' signals meanwhile.
fn wait_stop(pid: u32, tid: Pid, deadline: Instant, bystanders: &mut Bystanders) -> Result<Stop> {
    let mut nap = Duration::from_micros(2);
    loop {
        match wait_thread(tid) {
            Ok(Waited::Running) => {
                if Instant::now() > deadline {
                    return Err(Error::new(ErrorKind::Timeout(format!(
                        "thread {tid} of process {pid} did not stop"
                    ))));
                }
                bystanders.poll_if_due()?;
                // Sleep, never spin or yield: on a busy machine the tracee needs this CPU to
                // reach its stop (the tracing thread's timer slack is 1 µs, so naps are short).
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_micros(100));
            }
            Ok(Waited::SignalStop(sig)) => return Ok(Stop::Signal(sig)),
            Ok(Waited::EventStop) => return Ok(Stop::Event),
            Ok(Waited::Gone) => return Err(Error::new(ErrorKind::Exited(pid))),
            Err(nix::errno::Errno::ECHILD) | Err(nix::errno::Errno::ESRCH) => {
                return Err(Error::new(ErrorKind::Exited(pid)))
            }
            Err(e) => return Err(Error::system(format!("waiting for thread {tid}"), errno(e))),
        }
    }
}

/// A failure of one of `evolve_code::ptrace`'s requests, unless the process is gone.
fn io_error(pid: u32, e: std::io::Error, what: &str) -> Error {
    gone_or(
        pid,
        nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        what,
    )
}

/// A ptrace failure, unless the process is gone (then [`ErrorKind::Exited`]).
fn gone_or(pid: u32, e: nix::errno::Errno, what: &str) -> Error {
    if e == nix::errno::Errno::ESRCH && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return Error::new(ErrorKind::Exited(pid));
    }
    Error::system(format!("{what} (process {pid})"), errno(e))
}

/// Seizes every thread of `pid` (step 1).
fn seize_all(pid: u32) -> Result<Vec<Pid>> {
    let mut seized: Vec<i32> = Vec::new();
    for _round in 0..1000 {
        let listed = process::threads(pid)?;
        let mut added = false;
        for tid in &listed {
            if seized.contains(tid) {
                continue;
            }
            match ptrace::seize(Pid::from_raw(*tid), ptrace::Options::empty()) {
                Ok(()) => {
                    seized.push(*tid);
                    added = true;
                }
                // Exited since the listing.
                Err(nix::errno::Errno::ESRCH) => {}
                Err(nix::errno::Errno::EPERM) => {
                    process::check_not_traced(pid)?;
                    return Err(Error::refused(Refusal::NotPermitted(
                        process::why_not_permitted(pid),
                    )));
                }
                Err(e) => {
                    return Err(Error::system(
                        format!("PTRACE_SEIZE thread {tid}"),
                        errno(e),
                    ))
                }
            }
        }
        if !added {
            if seized.is_empty() {
                return Err(Error::new(ErrorKind::Exited(pid)));
            }
            return Ok(seized.into_iter().map(Pid::from_raw).collect());
        }
    }
    Err(Error::new(ErrorKind::Timeout(format!(
        "process {pid} keeps creating threads faster than they can be seized"
    ))))
}

/// How good a thread is to borrow, from what it does (lower is better); `None`: not at all.
fn preference(activity: Activity) -> Option<u8> {
    match activity {
        Activity::Syscall(nr) if RESTARTABLE_WAITS.contains(&nr) => Some(0),
        Activity::Running => Some(1),
        Activity::Syscall(nr) if nr == libc::SYS_futex => Some(2),
        Activity::Syscall(nr) if EINTR_WAITS.contains(&nr) => Some(3),
        _ => None,
    }
}

/// Whether a stopped thread's registers show it at a point where it holds no C-library lock.
fn safe_point(
    regs: &libc::user_regs_struct,
    maps: &[Mapping],
) -> std::result::Result<String, String> {
    let orig = regs.orig_rax as i64;
    if orig >= 0 {
        return match preference(Activity::Syscall(orig)) {
            Some(_) => Ok(syscall_name(orig)),
            None => Err(format!("busy in system call {orig}")),
        };
    }
    let Some(mapping) = maps
        .iter()
        .find(|m| m.start <= regs.rip && regs.rip < m.end)
    else {
        return Err(format!("executing at {:#x}, outside any mapping", regs.rip));
    };
    let name = std::path::Path::new(&mapping.path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.starts_with("libc.so")
        || name.starts_with("libc-")
        || name.starts_with("ld-linux")
        || name.starts_with("libpthread")
        || name.starts_with("libdl")
    {
        return Err(format!(
            "executing inside {name} (it may hold one of its locks)"
        ));
    }
    Ok("user code".into())
}

fn syscall_name(nr: i64) -> String {
    let names: &[(i64, &str)] = &[
        (libc::SYS_read, "read"),
        (libc::SYS_pread64, "pread64"),
        (libc::SYS_readv, "readv"),
        (libc::SYS_poll, "poll"),
        (libc::SYS_select, "select"),
        (libc::SYS_pause, "pause"),
        (libc::SYS_nanosleep, "nanosleep"),
        (libc::SYS_accept, "accept"),
        (libc::SYS_recvfrom, "recvfrom"),
        (libc::SYS_recvmsg, "recvmsg"),
        (libc::SYS_wait4, "wait4"),
        (libc::SYS_waitid, "waitid"),
        (libc::SYS_clock_nanosleep, "clock_nanosleep"),
        (libc::SYS_pselect6, "pselect6"),
        (libc::SYS_ppoll, "ppoll"),
        (libc::SYS_accept4, "accept4"),
        (libc::SYS_rt_sigsuspend, "rt_sigsuspend"),
        (libc::SYS_futex, "futex"),
        (libc::SYS_epoll_wait, "epoll_wait"),
        (libc::SYS_epoll_pwait, "epoll_pwait"),
        (441, "epoll_pwait2"),
    ];
    names
        .iter()
        .find(|(n, _)| *n == nr)
        .map_or_else(|| format!("syscall {nr}"), |(_, name)| (*name).to_string())
}

/// Stops the best thread at a safe point (step 2), saves its registers and mask and blocks its
/// asynchronous signals (step 3).
fn borrow(
    pid: u32,
    seized: &[Pid],
    maps: &[Mapping],
    stops: &mut Stops,
    mut bystanders: Bystanders,
) -> Result<Borrowed> {
    let deadline = Instant::now() + CHOOSE_TIMEOUT;
    let mut last_reason = String::from("no thread was in a waiting system call or user code");
    loop {
        // Threads in tid order (the main thread first); the first in a restartable wait is
        // the best there is, so the others' /proc files need not be read (with hundreds of
        // threads on a busy machine, that reading was most of the attach).
        let mut ranked: Vec<(u8, Pid)> = Vec::new();
        for &tid in seized.iter().filter(|tid| bystanders.tids.contains(tid)) {
            let Some(rank) = preference(process::activity(pid, tid.as_raw())) else {
                continue;
            };
            // A synchronous SIGSEGV that is blocked or ignored would be forced through by the
            // kernel, changing the thread's mask or the disposition: avoid such threads.
            let segv_open = process::status(&format!("{pid}/task/{tid}"))
                .is_ok_and(|s| (s.blocked | s.ignored) & (1 << (libc::SIGSEGV - 1)) == 0);
            if !segv_open {
                continue;
            }
            ranked.push((rank, tid));
            if rank == 0 {
                break;
            }
        }
        ranked.sort_by_key(|(rank, tid)| (*rank, tid.as_raw()));
        bystanders.poll_if_due()?;
        for (_, tid) in ranked {
            let stopped_at = Instant::now();
            if let Err(e) = ptrace::interrupt(tid) {
                if e == nix::errno::Errno::ESRCH {
                    continue; // exited
                }
                return Err(gone_or(pid, e, "PTRACE_INTERRUPT"));
            }
            // From here on the thread is watched as the one stopped, not as a bystander.
            bystanders.forget(tid);
            let mut held = Vec::new();
            // The first stop may be a signal that was already on its way; hold it back (the
            // interrupt's own stop comes later, and the calls pass it).
            let at_signal_stop =
                match wait_stop(pid, tid, Instant::now() + CALL_TIMEOUT, &mut bystanders)? {
                    Stop::Event => false,
                    Stop::Signal(_) => {
                        if let Ok(info) = ptrace::getsiginfo(tid) {
                            held.push(info);
                        }
                        true
                    }
                };
            let regs = ptrace::getregs(tid).map_err(|e| gone_or(pid, e, "PTRACE_GETREGS"))?;
            match safe_point(&regs, maps) {
                Ok(what) => {
                    let xstate = evolve_code::ptrace::xstate(tid.as_raw()).map_err(|e| {
                        Error::system(
                            "reading the FP/SSE/AVX registers (PTRACE_GETREGSET NT_X86_XSTATE)",
                            e.raw_os_error().unwrap_or(libc::EIO),
                        )
                    })?;
                    let sys = |what: &str, e: std::io::Error| {
                        Error::system(what, e.raw_os_error().unwrap_or(libc::EIO))
                    };
                    let mask = evolve_code::ptrace::sigmask(tid.as_raw())
                        .map_err(|e| sys("reading the signal mask (PTRACE_GETSIGMASK)", e))?;
                    let mut borrowed = Borrowed {
                        pid,
                        tid,
                        saved: regs,
                        xstate,
                        held,
                        stopped_at,
                        at_signal_stop,
                        mask: None,
                        bystanders,
                    };
                    // Recorded before it is changed, so that the release restores it even if
                    // the change half-failed.
                    borrowed.mask = Some(mask);
                    evolve_code::ptrace::set_sigmask(tid.as_raw(), mask | hold_mask())
                        .map_err(|e| sys("blocking signals (PTRACE_SETSIGMASK)", e))?;
                    stops.borrowed = Some(tid.as_raw());
                    stops.borrowed_in = what;
                    return Ok(borrowed);
                }
                Err(reason) => {
                    last_reason = format!("thread {tid}: {reason}");
                    let stopped_for = let_go(pid, tid, held, at_signal_stop, stopped_at)?;
                    stops.periods.push((tid.as_raw(), stopped_for));
                }
            }
        }
        if Instant::now() > deadline {
            return Err(Error::refused(Refusal::NoSafeThread(format!(
                "no thread of process {pid} reached a point where it holds no C-library lock \
                 within {} ms ({last_reason})",
                CHOOSE_TIMEOUT.as_millis()
            ))));
        }
        // Nap in short steps, watching the bystanders.
        let until = Instant::now() + Duration::from_millis(2);
        while Instant::now() < until {
            bystanders.poll_if_due()?;
            std::thread::sleep(BYSTANDER_POLL);
        }
    }
}

/// Runs `f` with a borrowed thread of `pid` (the whole protocol of the module docs), on a
/// thread of our own; returns `f`'s result and the stops it caused.
///
/// `check` runs first, with the thread stopped, before anything is changed (seccomp).
pub fn with_borrowed_thread<R: Send>(
    pid: u32,
    maps: &[Mapping],
    check: impl FnOnce(&Borrowed) -> Result<()> + Send,
    f: impl FnOnce(&mut Borrowed) -> Result<R> + Send,
) -> Result<(R, Stops)> {
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<(R, Stops)> {
                // Short naps while waiting for stops (the default slack is 50 µs).
                let _ = nix::sys::prctl::set_timerslack(1_000);
                let mut clock = Instant::now();
                let mut lap = |stops: &mut Stops, phase: &'static str| {
                    stops.phases.push((phase, clock.elapsed()));
                    clock = Instant::now();
                };
                let mut stops = Stops::default();
                let seized = seize_all(pid)?;
                stops.seized = seized.len();
                lap(&mut stops, "seize");
                let bystanders = Bystanders::new(pid, seized.clone(), Instant::now());
                let mut borrowed = borrow(pid, &seized, maps, &mut stops, bystanders)?;
                lap(&mut stops, "choose");
                let outcome = check(&borrowed).and_then(|()| f(&mut borrowed));
                lap(&mut stops, "calls");
                let tid = borrowed.tid();
                let (released, mut bystanders) = borrowed.release();
                if let Ok(d) = &released {
                    stops.periods.push((tid, *d));
                }
                // The last look before this thread exits and the kernel lets them all go.
                let polled = bystanders.poll();
                lap(&mut stops, "release");
                stops.signal_stops = bystanders.periods.len();
                stops.periods.extend(bystanders.periods);
                let value = outcome?;
                released?;
                polled?;
                Ok((value, stops))
                // Returning ends this thread: the kernel detaches the threads only seized.
            })
            .join()
            .unwrap_or_else(|_| {
                Err(Error::system(
                    "the tracing thread panicked".to_string(),
                    libc::EIO,
                ))
            })
    })
}
