//! Mappings, page protection and raw access to code bytes.
//!
//! # Code bytes are atomics
//!
//! Code bytes change while other threads run them, and the `SIGTRAP` handler reads the first
//! byte of a site while the writer changes it. Every access the engine makes to live code bytes
//! is therefore an atomic access of one byte ([`read`], [`write`], [`load_code_byte`],
//! [`store_code_byte`]) or of the aligned word that holds a site ([`store_in_word`]), so that the
//! orderings the protocol relies on ([`crate::sys::trap::slots`]) are those of the memory model,
//! not of a compiler's reading of volatile accesses. Loads use `Relaxed` (plus an `Acquire`
//! fence where the protocol needs one): the only atomic loads Rust allows on read-only memory,
//! which code pages are outside a write window.
//!
//! # Safety
//!
//! The unsafe functions here read or write raw addresses, or change what may be done with them
//! (`mprotect`); their callers guarantee that the addresses lie in mappings with the needed
//! permission at the time of the access, and that no thread is harmed by the change. The safe
//! wrappers (`map_*`) only create new mappings.
#![allow(unsafe_code)]

use crate::error::{Error, ErrorKind, Result};
use std::ops::Range;
use std::sync::atomic::{fence, AtomicU64, AtomicU8, Ordering};

/// The page size of this machine.
pub fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf only reads a configuration value.
    *PAGE.get_or_init(|| unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize)
}

/// The first byte of the page holding `addr`.
pub fn page_of(addr: usize) -> usize {
    addr & !(page_size() - 1)
}

/// Access rights of a mapping, as `mprotect(2)` understands them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Protection {
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
}

impl Protection {
    /// `r-x`: the protection of live code.
    pub const READ_EXEC: Protection = Protection {
        read: true,
        write: false,
        exec: true,
    };

    fn to_prot(self) -> libc::c_int {
        let mut prot = libc::PROT_NONE;
        if self.read {
            prot |= libc::PROT_READ;
        }
        if self.write {
            prot |= libc::PROT_WRITE;
        }
        if self.exec {
            prot |= libc::PROT_EXEC;
        }
        prot
    }
}

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// The addresses covered.
    pub range: Range<usize>,
    /// Its current protection.
    pub protection: Protection,
}

/// The mappings of the process, scrubbed when dropped (see [`crate::scrub`]): the list holds
/// plain addresses of patches that reclamation must be able to prove unreferenced.
pub struct Mappings(Vec<Mapping>);

impl std::ops::Deref for Mappings {
    type Target = [Mapping];
    fn deref(&self) -> &[Mapping] {
        &self.0
    }
}

impl IntoIterator for Mappings {
    type Item = Mapping;
    type IntoIter = std::vec::IntoIter<Mapping>;
    /// (The elements moved out are the caller's to scrub.)
    fn into_iter(mut self) -> Self::IntoIter {
        std::mem::take(&mut self.0).into_iter()
    }
}

impl Drop for Mappings {
    fn drop(&mut self) {
        crate::hidden::scrub_plain(std::mem::take(&mut self.0));
    }
}

/// Every mapping of this process, in address order (parsed by [`crate::sys::maps`]).
pub fn mappings() -> Result<Mappings> {
    let mut text = super::maps::MapsBuffer::with_capacity(64 << 10);
    text.read_growing()?;
    // Sized once: a vector that grows would free blocks holding plain patch addresses.
    let mut list = Vec::with_capacity(text.regions().count());
    list.extend(text.regions().map(|r| Mapping {
        range: r.range,
        protection: Protection {
            read: r.read,
            write: r.write,
            exec: r.exec,
        },
    }));
    Ok(Mappings(list))
}

/// The mapping containing `addr`, from a list sorted by address.
pub fn mapping_containing(maps: &[Mapping], addr: usize) -> Option<&Mapping> {
    let i = maps.partition_point(|m| m.range.end <= addr);
    maps.get(i).filter(|m| m.range.contains(&addr))
}

/// `int mprotect(void *addr, size_t len, int prot)`; see mprotect(2). `range` must be
/// page-aligned.
///
/// # Safety
///
/// No thread of the process may be harmed by the new protection: code that threads may execute
/// keeps `exec` (and `read`), and memory that Rust code reads or writes keeps those rights.
/// The engine only adds `write` to executable pages for the length of a write window, and puts
/// back the protection it found.
pub unsafe fn mprotect(range: Range<usize>, protection: Protection) -> Result<()> {
    #[cfg(feature = "fault-injection")]
    crate::sys::inject::check(crate::sys::inject::Syscall::Mprotect, "mprotect")?;
    // SAFETY: mprotect validates the range itself and fails with ENOMEM on unmapped pages; the
    // caller vouches for the new protection.
    let rc = unsafe {
        libc::mprotect(
            range.start as *mut libc::c_void,
            range.end - range.start,
            protection.to_prot(),
        )
    };
    if rc != 0 {
        return Err(Error::last_os("mprotect"));
    }
    Ok(())
}

/// Maps `len` bytes of fresh anonymous memory exactly at `addr` if that range is free
/// (`MAP_FIXED_NOREPLACE`); `Ok(None)` if something is already there.
pub fn map_fixed_noreplace(
    addr: usize,
    len: usize,
    protection: Protection,
) -> Result<Option<usize>> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping, so no memory of the process
    // is affected; the new mapping is anonymous and owned by the caller.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            protection.to_prot(),
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        let err = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        if err == libc::EEXIST || err == libc::EPERM {
            return Ok(None);
        }
        return Err(Error::new(ErrorKind::Os {
            operation: "mmap near",
            errno: err,
        }));
    }
    if p as usize != addr {
        // Kernels older than 4.17 ignore MAP_FIXED_NOREPLACE and treat it as a hint.
        // SAFETY: p is the mapping just created by us, of length len, used by nobody.
        unsafe { libc::munmap(p, len) };
        return Ok(None);
    }
    Ok(Some(addr))
}

/// Maps `len` bytes of fresh anonymous memory wherever the kernel likes.
pub fn map_anywhere(len: usize, protection: Protection) -> Result<usize> {
    // SAFETY: a new anonymous mapping at an address of the kernel's choice affects no existing
    // memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            protection.to_prot(),
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::last_os("mmap"));
    }
    Ok(p as usize)
}

/// Reads `N` code bytes at `addr`, each with a `Relaxed` atomic load (code may change under us).
///
/// # Safety
///
/// `addr..addr + N` must be mapped readable for the duration of the call, and accessed by
/// others only through the atomic byte accesses of this module (or as instructions).
pub unsafe fn read<const N: usize>(addr: usize) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        // SAFETY: within the readable range promised by the caller; a one-byte Relaxed load is
        // allowed on read-only memory.
        *byte = unsafe { AtomicU8::from_ptr((addr + i) as *mut u8) }.load(Ordering::Relaxed);
    }
    out
}

/// Loads the code byte at `addr` with `Acquire` semantics (a `Relaxed` load, which read-only
/// memory allows, then an `Acquire` fence): the handler's read of a site's first byte.
/// Async-signal-safe.
///
/// # Safety
///
/// As for [`read`].
#[inline]
pub unsafe fn load_code_byte(addr: usize) -> u8 {
    // SAFETY: as for `read` (caller).
    let byte = unsafe { AtomicU8::from_ptr(addr as *mut u8) }.load(Ordering::Relaxed);
    fence(Ordering::Acquire);
    byte
}

/// Stores one code byte at `addr`, `Release` if `publish` (the first byte of a site under the
/// int3 protocol, which the handler reads), `Relaxed` otherwise.
///
/// # Safety
///
/// `addr` must be mapped writable, and no thread may execute it in a way the new byte harms
/// (the write protocol guarantees that).
#[inline]
pub unsafe fn store_code_byte(addr: usize, byte: u8, publish: bool) {
    let order = if publish {
        Ordering::Release
    } else {
        Ordering::Relaxed
    };
    // SAFETY: writable (caller); every other access to code bytes is atomic too.
    unsafe { AtomicU8::from_ptr(addr as *mut u8) }.store(byte, order);
}

/// Writes `bytes` at `addr` with `Relaxed` atomic byte stores.
///
/// # Safety
///
/// `addr..addr + bytes.len()` must be mapped writable, and no thread may execute those bytes in a
/// way that a partial write could harm (the write protocol guarantees that).
pub unsafe fn write(addr: usize, bytes: &[u8]) {
    for (i, byte) in bytes.iter().enumerate() {
        // SAFETY: within the writable range promised by the caller.
        unsafe { store_code_byte(addr + i, *byte, false) };
    }
}

/// Replaces `len` bytes at `addr` inside the naturally aligned 8-byte word that holds them with
/// one atomic 8-byte store, keeping the word's other bytes as they are.
///
/// # Safety
///
/// The word must be mapped readable and writable, `addr % 8 + len <= 8`, and no other thread may
/// store to the word concurrently (the engine's write lock guarantees that).
pub unsafe fn store_in_word(addr: usize, bytes: &[u8]) {
    let word_addr = addr & !7;
    let offset = addr - word_addr;
    debug_assert!(offset + bytes.len() <= 8);
    // SAFETY: word_addr is 8-aligned and mapped read-write (caller). AtomicU64 has the layout
    // of u64; code pages are ordinary memory.
    let word = unsafe { &*(word_addr as *const AtomicU64) };
    let mut value = word.load(Ordering::Relaxed).to_le_bytes();
    value[offset..offset + bytes.len()].copy_from_slice(bytes);
    word.store(u64::from_le_bytes(value), Ordering::SeqCst);
}

/// Writes `bytes` at `addr` through `/proc/self/mem`, which the kernel allows even on pages
/// that are not writable (as a debugger does). The fallback when `mprotect` to RWX is forbidden.
///
/// The kernel makes the store; `SeqCst` fences on both sides order it, for this thread's atomics,
/// as a `Release` store followed by an `Acquire` fence would be (the int3 protocol's orderings).
///
/// # Safety
///
/// As for [`write`], except that the pages need not be writable.
pub unsafe fn write_via_proc_mem(addr: usize, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    #[cfg(feature = "fault-injection")]
    crate::sys::inject::check(
        crate::sys::inject::Syscall::ProcMemWrite,
        "write /proc/self/mem",
    )?;
    static FILE: std::sync::OnceLock<std::io::Result<std::fs::File>> = std::sync::OnceLock::new();
    let file = FILE
        .get_or_init(|| {
            std::fs::OpenOptions::new()
                .write(true)
                .open("/proc/self/mem")
        })
        .as_ref()
        .map_err(|e| {
            Error::new(ErrorKind::Os {
                operation: "open /proc/self/mem",
                errno: e.raw_os_error().unwrap_or(0),
            })
        })?;
    fence(Ordering::SeqCst);
    let written = file.write_all_at(bytes, addr as u64).map_err(|e| {
        Error::new(ErrorKind::Os {
            operation: "write /proc/self/mem",
            errno: e.raw_os_error().unwrap_or(0),
        })
    });
    fence(Ordering::SeqCst);
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_code_is_in_an_executable_mapping() {
        let maps = mappings().unwrap();
        let here = own_code_is_in_an_executable_mapping as *const () as usize;
        let m = mapping_containing(&maps, here).unwrap();
        assert!(m.protection.exec && !m.protection.write, "{m:?}");
    }
}
