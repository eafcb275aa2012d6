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
//!    which carries an interrupted system call) and the whole XSAVE area
//!    (`PTRACE_GETREGSET NT_X86_XSTATE`: x87, SSE, AVX, AVX-512, PKRU).
//! 4. **Remote calls**: the stack pointer moves below the 128-byte red zone and is aligned to
//!    16 bytes, a return address that cannot be mapped (`0x320`, below `mmap_min_addr`) is
//!    pushed, arguments go in `rdi`…`r9`, `orig_rax` becomes -1 (so the kernel does not apply
//!    the interrupted call's restart to our registers), and the thread runs until it faults on
//!    that return address; `rax` is the result. A signal that arrives meanwhile is held back
//!    (suppressed and recorded) and delivered when the thread is released.
//! 5. **Restore every register exactly** (general and XSAVE), then `PTRACE_DETACH`. The thread
//!    resumes from its stop with its own registers: if it was interrupted in a system call,
//!    `orig_rax` and the `-ERESTART*` value in `rax` are back, and the kernel restarts the call
//!    (rewinding `rip` over the `syscall` instruction, or through `restart_syscall` for
//!    sleeps) exactly as after any signal without a handler. The first held-back signal is
//!    re-injected with its original `siginfo` by the detach, later ones with `tgkill`.
//! 6. The threads that were only seized are released when the tracing thread exits (the kernel
//!    detaches a dead tracer's tracees): `PTRACE_DETACH` would need each of them stopped first.
//!    So every session runs on a thread of its own ([`with_borrowed_thread`]).
//!
//! The interval from `PTRACE_INTERRUPT` to `PTRACE_DETACH` of each thread stopped is recorded
//! ([`Stops`]): it is the only time any thread of the target is not running.

use crate::error::{errno, Error, ErrorKind, Refusal, Result};
use crate::memory::Memory;
use crate::process::{self, Activity, Mapping};
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
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
}

impl Borrowed {
    /// The thread's id.
    pub fn tid(&self) -> i32 {
        self.tid.as_raw()
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
            match wait_stop(pid, self.tid, deadline)? {
                Stop::Signal(Signal::SIGSEGV) => {
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
                Stop::Signal(s @ (Signal::SIGBUS | Signal::SIGILL | Signal::SIGFPE)) => {
                    return Err(Error::system(
                        format!("the remote call to {function:#x} crashed ({s})"),
                        libc::EFAULT,
                    ));
                }
                Stop::Signal(_) => {
                    // Someone else's signal: hold it back until the thread is released.
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

    /// Gives the thread every register back and lets it go; returns how long it was stopped.
    fn release(self) -> Result<Duration> {
        let pid = self.pid;
        let restored = ptrace::setregs(self.tid, self.saved)
            .map_err(|e| gone_or(pid, e, "restoring the general registers"))
            .and_then(|()| {
                evolve_code::ptrace::set_xstate(self.tid.as_raw(), &self.xstate).map_err(|e| {
                    Error::system(
                        "restoring the FP/SSE/AVX registers",
                        e.raw_os_error().unwrap_or(libc::EIO),
                    )
                })
            });
        let mut held = self.held.into_iter();
        let first = if self.at_signal_stop {
            held.next()
        } else {
            None
        };
        let signal = first.as_ref().and_then(|info| {
            ptrace::setsiginfo(self.tid, info).ok()?;
            Signal::try_from(info.si_signo).ok()
        });
        let detached =
            ptrace::detach(self.tid, signal).map_err(|e| gone_or(pid, e, "PTRACE_DETACH"));
        let stopped_for = self.stopped_at.elapsed();
        resend(pid, held);
        restored?;
        detached?;
        Ok(stopped_for)
    }
}

/// Sends held-back signals that the detach could not inject (a second one during one borrow:
/// rare) to the process; their `siginfo` details are lost, the signal is not.
fn resend(pid: u32, held: impl Iterator<Item = libc::siginfo_t>) {
    for info in held {
        if let Ok(sig) = Signal::try_from(info.si_signo) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), sig);
        }
    }
}

/// What a stopped tracee reported.
enum Stop {
    /// A signal-delivery stop.
    Signal(Signal),
    /// A `PTRACE_EVENT_STOP` (our interrupt, or a group stop).
    Event,
}

/// Waits for `tid` to stop, until `deadline`.
fn wait_stop(pid: u32, tid: Pid, deadline: Instant) -> Result<Stop> {
    let mut nap = Duration::from_micros(2);
    loop {
        match waitpid(tid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {
                if Instant::now() > deadline {
                    return Err(Error::new(ErrorKind::Timeout(format!(
                        "thread {tid} of process {pid} did not stop"
                    ))));
                }
                // Sleep, never spin or yield: on a busy machine the tracee needs this CPU to
                // reach its stop (the tracing thread's timer slack is 1 µs, so naps are short).
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_micros(100));
            }
            Ok(WaitStatus::Stopped(_, sig)) => return Ok(Stop::Signal(sig)),
            Ok(WaitStatus::PtraceEvent(..)) => return Ok(Stop::Event),
            Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => {
                return Err(Error::new(ErrorKind::Exited(pid)))
            }
            Ok(_) => continue,
            Err(nix::errno::Errno::ECHILD) | Err(nix::errno::Errno::ESRCH) => {
                return Err(Error::new(ErrorKind::Exited(pid)))
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Error::system(format!("waiting for thread {tid}"), errno(e))),
        }
    }
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

/// Stops the best thread at a safe point (step 2) and saves its registers (step 3).
fn borrow(pid: u32, seized: &[Pid], maps: &[Mapping], stops: &mut Stops) -> Result<Borrowed> {
    let deadline = Instant::now() + CHOOSE_TIMEOUT;
    let mut last_reason = String::from("no thread was in a waiting system call or user code");
    loop {
        let mut ranked: Vec<(u8, Pid)> = seized
            .iter()
            .filter(|tid| {
                // A synchronous SIGSEGV that is blocked or ignored would be forced through by
                // the kernel, changing the thread's mask or the disposition: avoid such threads.
                process::status(&format!("{pid}/task/{tid}"))
                    .is_ok_and(|s| (s.blocked | s.ignored) & (1 << (libc::SIGSEGV - 1)) == 0)
            })
            .filter_map(|tid| Some((preference(process::activity(pid, tid.as_raw()))?, *tid)))
            .collect();
        ranked.sort_by_key(|(rank, tid)| (*rank, tid.as_raw()));
        for (_, tid) in ranked {
            let stopped_at = Instant::now();
            if let Err(e) = ptrace::interrupt(tid) {
                if e == nix::errno::Errno::ESRCH {
                    continue; // exited
                }
                return Err(gone_or(pid, e, "PTRACE_INTERRUPT"));
            }
            let mut held = Vec::new();
            let mut at_signal_stop = false;
            // The first stop may be a signal that was already on its way; hold it back and
            // wait for the interrupt's own stop.
            if let Stop::Signal(_) = wait_stop(pid, tid, Instant::now() + CALL_TIMEOUT)? {
                if let Ok(info) = ptrace::getsiginfo(tid) {
                    held.push(info);
                }
                at_signal_stop = true;
            }
            let regs = ptrace::getregs(tid).map_err(|e| gone_or(pid, e, "PTRACE_GETREGS"))?;
            match safe_point(&regs, maps) {
                Ok(what) => {
                    let xstate = evolve_code::ptrace::xstate(tid.as_raw()).map_err(|e| {
                        Error::system(
                            "reading the FP/SSE/AVX registers (PTRACE_GETREGSET NT_X86_XSTATE)",
                            e.raw_os_error().unwrap_or(libc::EIO),
                        )
                    })?;
                    stops.borrowed = Some(tid.as_raw());
                    stops.borrowed_in = what;
                    return Ok(Borrowed {
                        pid,
                        tid,
                        saved: regs,
                        xstate,
                        held,
                        stopped_at,
                        at_signal_stop,
                    });
                }
                Err(reason) => {
                    last_reason = format!("thread {tid}: {reason}");
                    let b = Borrowed {
                        pid,
                        tid,
                        saved: regs,
                        xstate: Vec::new(),
                        held,
                        stopped_at,
                        at_signal_stop,
                    };
                    stops.periods.push((tid.as_raw(), resume_untouched(b)?));
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
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Lets a stopped thread whose registers we never changed go again.
fn resume_untouched(b: Borrowed) -> Result<Duration> {
    let pid = b.pid;
    let mut held = b.held.into_iter();
    let first = if b.at_signal_stop { held.next() } else { None };
    let signal = first.and_then(|info| Signal::try_from(info.si_signo).ok());
    ptrace::detach(b.tid, signal).map_err(|e| gone_or(pid, e, "PTRACE_DETACH"))?;
    let stopped_for = b.stopped_at.elapsed();
    resend(pid, held);
    Ok(stopped_for)
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
                let seized = seize_all(pid)?;
                let mut stops = Stops {
                    seized: seized.len(),
                    ..Stops::default()
                };
                let mut borrowed = borrow(pid, &seized, maps, &mut stops)?;
                let outcome = check(&borrowed).and_then(|()| f(&mut borrowed));
                let tid = borrowed.tid();
                let released = borrowed.release();
                if let Ok(d) = &released {
                    stops.periods.push((tid, *d));
                }
                let value = outcome?;
                released?;
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
