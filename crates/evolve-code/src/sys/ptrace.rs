//! The `ptrace(2)` requests that no safe wrapper offers: the extended register state of a
//! stopped thread of *another* process (`PTRACE_GETREGSET`/`PTRACE_SETREGSET` with
//! `NT_X86_XSTATE`), its signal mask (`PTRACE_GETSIGMASK`/`PTRACE_SETSIGMASK`) and its seccomp
//! filters (`PTRACE_SECCOMP_GET_FILTER`), restarting or detaching a tracee with any signal
//! (`PTRACE_CONT`, `PTRACE_DETACH`: real-time ones too); and the re-queueing of a signal that a tracer held
//! back, with its `siginfo` (`rt_tgsigqueueinfo(2)`).
//!
//! They serve `evolve attach` (crate `evolve-attach`), which borrows a thread of a process that
//! never linked Evolve for one remote call and must give it back every register exactly as it
//! was: the general registers go through `nix`, the FP/SSE/AVX/AVX-512/PKRU state through here.
//!
//! # Call order
//!
//! The thread must be a ptrace-stopped tracee of the calling thread (`PTRACE_SEIZE` then
//! `PTRACE_INTERRUPT` and `waitpid`): the kernel refuses (`ESRCH`) otherwise. Read the state
//! with [`xstate`] before changing anything, give it back with [`set_xstate`] before detaching.
//!
//! # Safety
//!
//! Each call passes the kernel a pointer to a buffer we own (an `iovec` describing a `Vec<u8>`,
//! a `u64` signal set, a `siginfo_t`, or a `Vec<libc::sock_filter>`), sized before the call; the
//! kernel writes at most that many bytes and reports how many. Nothing of this process other
//! than those buffers is touched.
#![allow(unsafe_code)]

use std::io;

/// `NT_X86_XSTATE`: the XSAVE area (x87, SSE, AVX, AVX-512, PKRU, … as enabled in XCR0).
const NT_X86_XSTATE: libc::c_int = 0x202;
/// `PTRACE_SECCOMP_GET_FILTER` (Linux 4.4).
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
/// Larger than any XSAVE area of today's CPUs (AMX tiles make ~11 KiB); the kernel reports the
/// real size through the iovec.
const XSTATE_BUFFER: usize = 64 * 1024;

/// The extended register state (the raw XSAVE area) of stopped tracee `tid`.
///
/// `long ptrace(PTRACE_GETREGSET, pid_t tid, NT_X86_XSTATE, struct iovec *)`; see ptrace(2).
///
/// # Errors
/// The thread is not a stopped tracee of this thread (`ESRCH`), or the kernel does not offer
/// the XSTATE regset (`EINVAL`/`ENODEV`).
///
/// # Example
/// ```no_run
/// // `tid` is a ptrace-stopped tracee of this thread.
/// # let tid = 0;
/// let saved = evolve_code::ptrace::xstate(tid)?;
/// // ... borrow the thread ...
/// evolve_code::ptrace::set_xstate(tid, &saved)?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn xstate(tid: i32) -> io::Result<Vec<u8>> {
    let mut buffer = vec![0u8; XSTATE_BUFFER];
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // SAFETY: `iov` describes `buffer`, which we own and which outlives the call; the kernel
    // writes at most `iov_len` bytes into it and stores the count it wrote in `iov.iov_len`.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            tid,
            NT_X86_XSTATE as usize as *mut libc::c_void,
            &mut iov as *mut libc::iovec,
        )
    };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    buffer.truncate(iov.iov_len);
    Ok(buffer)
}

/// Gives stopped tracee `tid` back the extended register state `saved` read by [`xstate`].
///
/// `long ptrace(PTRACE_SETREGSET, pid_t tid, NT_X86_XSTATE, struct iovec *)`; see ptrace(2).
///
/// # Errors
/// As [`xstate`]; `EINVAL` for an area that is not a valid XSAVE image of this CPU.
pub fn set_xstate(tid: i32, saved: &[u8]) -> io::Result<()> {
    let mut copy = saved.to_vec();
    let mut iov = libc::iovec {
        iov_base: copy.as_mut_ptr().cast(),
        iov_len: copy.len(),
    };
    // SAFETY: `iov` describes `copy`, which we own for the duration of the call; the kernel
    // only reads `iov_len` bytes from it.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            tid,
            NT_X86_XSTATE as usize as *mut libc::c_void,
            &mut iov as *mut libc::iovec,
        )
    };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `PTRACE_GETSIGMASK` (Linux 3.11).
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
/// `PTRACE_SETSIGMASK` (Linux 3.11).
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
/// The kernel's signal set: one bit per signal, signal `n` at bit `n - 1`.
const KERNEL_SIGSET: usize = std::mem::size_of::<u64>();

/// The signal mask of stopped tracee `tid` (bit `n - 1` set: signal `n` is blocked).
///
/// `long ptrace(PTRACE_GETSIGMASK, pid_t tid, size_t 8, uint64_t *)`; see ptrace(2).
///
/// # Errors
/// `ESRCH` if `tid` is not a stopped tracee of this thread.
///
/// # Example
/// ```no_run
/// # let tid = 0;
/// let mask = evolve_code::ptrace::sigmask(tid)?;
/// // Hold every asynchronous signal pending while the thread is borrowed.
/// evolve_code::ptrace::set_sigmask(tid, mask | 1 << (libc::SIGUSR1 - 1))?;
/// evolve_code::ptrace::set_sigmask(tid, mask)?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn sigmask(tid: i32) -> io::Result<u64> {
    let mut mask = 0u64;
    // SAFETY: the kernel writes exactly `KERNEL_SIGSET` bytes into `mask`, which we own.
    let r = unsafe {
        libc::ptrace(
            PTRACE_GETSIGMASK,
            tid,
            KERNEL_SIGSET as *mut libc::c_void,
            &mut mask as *mut u64,
        )
    };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(mask)
}

/// Sets the signal mask of stopped tracee `tid` (`SIGKILL` and `SIGSTOP` stay unblockable).
///
/// `long ptrace(PTRACE_SETSIGMASK, pid_t tid, size_t 8, uint64_t *)`; see ptrace(2).
///
/// # Errors
/// As [`sigmask`].
pub fn set_sigmask(tid: i32, mask: u64) -> io::Result<()> {
    let mut copy = mask;
    // SAFETY: the kernel reads exactly `KERNEL_SIGSET` bytes from `copy`, which we own.
    let r = unsafe {
        libc::ptrace(
            PTRACE_SETSIGMASK,
            tid,
            KERNEL_SIGSET as *mut libc::c_void,
            &mut copy as *mut u64,
        )
    };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How [`requeue_signal`] delivered a held-back signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeued {
    /// With its original `siginfo` (`rt_tgsigqueueinfo`).
    Exact,
    /// As a plain `tgkill` to the same thread: the kernel lets another process queue a
    /// `siginfo` only if its `si_code` says it came from user space (`SI_QUEUE`, timers, …),
    /// not the kernel or `kill`/`tgkill`; the signal is delivered, its `siginfo` details are not.
    SignalOnly,
}

/// Queues signal `info.si_signo` again to thread `tid` of process `tgid`, with `info`.
///
/// `int rt_tgsigqueueinfo(pid_t tgid, pid_t tid, int sig, siginfo_t *info)`; see
/// rt_tgsigqueueinfo(2). A tracer uses it for a signal it took from a tracee's
/// signal-delivery stop and could not hand back through `PTRACE_DETACH`.
///
/// # Errors
/// `ESRCH` if the thread is gone; `EPERM` if neither form may be sent.
///
/// # Example
/// ```no_run
/// use evolve_code::ptrace::{requeue_signal, Requeued};
/// // `info` was read with PTRACE_GETSIGINFO at a signal-delivery stop of `tid`.
/// fn pass_on(tgid: i32, tid: i32, info: &libc::siginfo_t) -> std::io::Result<bool> {
///     Ok(requeue_signal(tgid, tid, info)? == Requeued::Exact)
/// }
/// ```
pub fn requeue_signal(tgid: i32, tid: i32, info: &libc::siginfo_t) -> io::Result<Requeued> {
    /// `SI_TKILL`: the kernel refuses it from another process, as codes >= 0.
    const SI_TKILL: i32 = -6;
    if info.si_code < 0 && info.si_code != SI_TKILL {
        let mut copy = *info;
        // SAFETY: `copy` is a whole `siginfo_t` we own; the kernel reads it and nothing else.
        let r = unsafe {
            libc::syscall(
                libc::SYS_rt_tgsigqueueinfo,
                tgid,
                tid,
                info.si_signo,
                &mut copy as *mut libc::siginfo_t,
            )
        };
        if r == 0 {
            return Ok(Requeued::Exact);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EPERM) {
            return Err(e);
        }
    }
    // SAFETY: tgkill takes only integers.
    let r = unsafe { libc::syscall(libc::SYS_tgkill, tgid, tid, info.si_signo) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(Requeued::SignalOnly)
}

/// Restarts stopped tracee `tid`, delivering `signal` (0: none): any signal number, real-time
/// ones included, which `nix`'s `Signal` cannot name.
///
/// `long ptrace(PTRACE_CONT, pid_t tid, 0, int signal)`; see ptrace(2).
///
/// # Errors
/// `ESRCH` if `tid` is not a stopped tracee of this thread; `EIO` for a bad signal number.
///
/// # Example
/// ```no_run
/// # let tid = 0;
/// // Pass a tracee's real-time signal on at its signal-delivery stop.
/// evolve_code::ptrace::cont(tid, libc::SIGRTMIN() + 1)?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn cont(tid: i32, signal: i32) -> io::Result<()> {
    restart(libc::PTRACE_CONT, tid, signal)
}

/// Detaches stopped tracee `tid`, delivering `signal` (0: none), any signal number.
///
/// `long ptrace(PTRACE_DETACH, pid_t tid, 0, int signal)`; see ptrace(2).
///
/// # Errors
/// As [`cont`].
pub fn detach(tid: i32, signal: i32) -> io::Result<()> {
    restart(libc::PTRACE_DETACH, tid, signal)
}

fn restart(request: libc::c_uint, tid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: PTRACE_CONT and PTRACE_DETACH take no pointer: `addr` is ignored and `data` is
    // the signal number, passed as an integer.
    let r = unsafe {
        libc::ptrace(
            request,
            tid,
            std::ptr::null_mut::<libc::c_void>(),
            signal as libc::c_long as *mut libc::c_void,
        )
    };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One classic-BPF instruction of a seccomp filter (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterInsn {
    /// `code`: class, size, mode, operation.
    pub code: u16,
    /// `jt`: forward offset when a conditional jump is taken.
    pub jt: u8,
    /// `jf`: forward offset when it is not.
    pub jf: u8,
    /// `k`: the constant operand.
    pub k: u32,
}

/// The seccomp filters of stopped tracee `tid`, most recently installed first (the order the
/// kernel runs them in), or `Ok(vec![])` if it has none.
///
/// `long ptrace(PTRACE_SECCOMP_GET_FILTER, pid_t tid, unsigned long index, struct sock_filter *)`;
/// see ptrace(2). Needs `CAP_SYS_ADMIN`.
///
/// # Errors
/// `EACCES` without `CAP_SYS_ADMIN`; `ESRCH` if `tid` is not a stopped tracee; `EINVAL` if the
/// kernel was built without `CONFIG_CHECKPOINT_RESTORE`.
///
/// # Example
/// ```no_run
/// # let tid = 0;
/// for filter in evolve_code::ptrace::seccomp_filters(tid)? {
///     println!("{} instructions", filter.len());
/// }
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn seccomp_filters(tid: i32) -> io::Result<Vec<Vec<FilterInsn>>> {
    let mut filters = Vec::new();
    for index in 0usize.. {
        // SAFETY: a null `data` asks only for the filter's length; no memory is written.
        let len = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index as *mut libc::c_void,
                std::ptr::null_mut::<libc::c_void>(),
            )
        };
        if len == -1 {
            let e = io::Error::last_os_error();
            // ENOENT: no filter at this index (the chain ended, or none was ever installed).
            if e.raw_os_error() == Some(libc::ENOENT) {
                break;
            }
            return Err(e);
        }
        let mut raw = vec![
            libc::sock_filter {
                code: 0,
                jt: 0,
                jf: 0,
                k: 0
            };
            len as usize
        ];
        // SAFETY: `raw` holds exactly `len` sock_filter entries, the count the kernel just
        // reported for this index; it writes at most that many.
        let got = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index as *mut libc::c_void,
                raw.as_mut_ptr().cast::<libc::c_void>(),
            )
        };
        if got == -1 {
            return Err(io::Error::last_os_error());
        }
        raw.truncate(got as usize);
        filters.push(
            raw.iter()
                .map(|f| FilterInsn {
                    code: f.code,
                    jt: f.jt,
                    jf: f.jf,
                    k: f.k,
                })
                .collect(),
        );
    }
    Ok(filters)
}
