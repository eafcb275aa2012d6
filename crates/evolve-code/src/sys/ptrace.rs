//! The two `ptrace(2)` requests that no safe wrapper offers: the extended register state of a
//! stopped thread of *another* process (`PTRACE_GETREGSET`/`PTRACE_SETREGSET` with
//! `NT_X86_XSTATE`) and its seccomp filters (`PTRACE_SECCOMP_GET_FILTER`).
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
//! or a `Vec<libc::sock_filter>`), sized before the call; the kernel writes at most that many
//! bytes and reports how many. Nothing of this process other than those buffers is touched.
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
