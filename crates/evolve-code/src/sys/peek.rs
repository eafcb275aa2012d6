//! Reading the process's own memory so that a page that cannot be read is an error, not a
//! signal.
//!
//! A plain load from a page that is mapped but has nothing behind it kills the thread: a
//! private mapping of a file that was truncated (`SIGBUS`), memory unmapped by another thread
//! since the mappings were listed (`SIGSEGV`). The stack walker and the reference scan read
//! arbitrary words of other threads' stacks and of every writable mapping, so they read through
//! the kernel instead: `process_vm_readv(2)` on the own process (always allowed: the caller is
//! in the same thread group), or `pread(2)` on `/proc/self/mem` where a seccomp policy forbids
//! the former. Both copy page by page and stop at the first page they cannot read.
//!
//! Neither allocates nor takes a lock, so both work while the world is stopped; call
//! [`prepare`] once before (it opens `/proc/self/mem` for the fallback).
//!
//! # Safety
//!
//! The system calls write only into the caller's buffer, whose length bounds them.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// `/proc/self/mem`, opened by [`prepare`] (-1: not open).
static PROC_MEM: AtomicI32 = AtomicI32::new(-1);
/// `process_vm_readv` failed with `ENOSYS` or `EPERM`: use `/proc/self/mem` only.
static NO_VM_READV: AtomicBool = AtomicBool::new(false);

/// Opens `/proc/self/mem` for the fallback path, once. Call it where allocation is allowed.
pub fn prepare() {
    if PROC_MEM.load(Ordering::Acquire) >= 0 {
        return;
    }
    // SAFETY: a NUL-terminated path; the descriptor is kept for the life of the process.
    let fd = unsafe { libc::open(c"/proc/self/mem".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd >= 0
        && PROC_MEM
            .compare_exchange(-1, fd, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
    {
        // SAFETY: our own descriptor, opened above and not published.
        unsafe { libc::close(fd) };
    }
}

/// One attempt to copy `buf.len()` bytes at `address`; the bytes copied, or `None` on failure.
fn copy_once(address: usize, buf: &mut [u8]) -> Option<usize> {
    if !NO_VM_READV.load(Ordering::Relaxed) {
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: address as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: the local iovec is the caller's buffer with its length; the remote one is
        // only read by the kernel, which checks it.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        if n >= 0 {
            return Some(n as usize);
        }
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        if errno != libc::ENOSYS && errno != libc::EPERM {
            return None;
        }
        NO_VM_READV.store(true, Ordering::Relaxed);
    }
    let fd = PROC_MEM.load(Ordering::Acquire);
    if fd < 0 {
        return None;
    }
    // SAFETY: pread writes at most `buf.len()` bytes into the caller's buffer.
    let n = unsafe {
        libc::pread(
            fd,
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            address as libc::off_t,
        )
    };
    (n >= 0).then_some(n as usize)
}

/// Copies the bytes at `address..address + buf.len()` into `buf`, up to the first page that
/// cannot be read; returns how many leading bytes were copied (all of them, unless a page is
/// bad). Async-signal-safe and allocation-free.
pub fn read(address: usize, buf: &mut [u8]) -> usize {
    let mut done = copy_once(address, buf).unwrap_or(0);
    // A short copy may stop before the bad page (an implementation is allowed not to split an
    // iovec): go on page by page to find exactly where readable memory ends.
    let page = super::memory::page_size();
    while done < buf.len() {
        let at = address + done;
        let chunk = (page - at % page).min(buf.len() - done);
        match copy_once(at, &mut buf[done..done + chunk]) {
            Some(n) if n > 0 => done += n,
            _ => break,
        }
    }
    done
}

/// The 8 bytes at `address`, if they can be read.
pub fn read_u64(address: usize) -> Option<u64> {
    let mut word = [0u8; 8];
    (read(address, &mut word) == 8).then(|| u64::from_ne_bytes(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_bytes_are_copied_and_a_bad_page_ends_the_copy() {
        let page = crate::sys::memory::page_size();
        // Two pages: the first readable, the second inaccessible.
        let base = crate::sys::memory::map_anywhere(
            2 * page,
            crate::sys::memory::Protection {
                read: true,
                write: true,
                exec: false,
            },
        )
        .unwrap();
        // SAFETY: our own fresh mapping.
        unsafe { std::ptr::write_bytes(base as *mut u8, 0xab, page) };
        // SAFETY: our own fresh data mapping; nothing else uses its second page.
        unsafe {
            crate::sys::memory::mprotect(
                base + page..base + 2 * page,
                crate::sys::memory::Protection {
                    read: false,
                    write: false,
                    exec: false,
                },
            )
        }
        .unwrap();
        let mut buf = vec![0u8; 2 * page];
        assert_eq!(read(base + page - 16, &mut buf[..32]), 16);
        assert_eq!(read(base, &mut buf), page);
        assert!(buf[..page].iter().all(|b| *b == 0xab));
        assert_eq!(read_u64(base), Some(0xabab_abab_abab_abab));
        assert_eq!(read_u64(base + page), None);
    }
}
