//! `/proc/self/maps`, the one parser of the process's mappings, without allocating.
//!
//! Three kinds of callers read the mappings: the write path (which pages of a batch are
//! executable), the detour and loader code (is an address mapped, and how), and the reference
//! scan, which reads them **while every other thread is stopped**. A stopped thread may hold the
//! allocator's lock, so the scan must not allocate: [`MapsBuffer::read`] reads the file with raw
//! `open`/`read` into a buffer allocated beforehand, and [`MapsBuffer::regions`] parses lines in
//! place. The allocating conveniences of [`crate::sys::memory`] are built on the same parser.
//!
//! A list of mappings holds plain addresses of loaded patches, which the reference scan must not
//! mistake for the program's references: [`crate::sys::memory::Mappings`] is sized exactly once
//! (a vector that grows leaves stale copies in the blocks it frees, and before this parser was
//! shared those copies kept most old patches of `evolve-bench reclaim` resident) and scrubbed on
//! drop. The text buffer here holds addresses only as hexadecimal text, which no scan matches.
//!
//! # Safety
//!
//! [`MapsBuffer::read`] writes into the spare capacity of its own vector with `read(2)` and
//! extends the length by exactly the bytes the kernel reported.
#![allow(unsafe_code)]

use crate::error::{Error, ErrorKind, Result};
use std::ops::Range;

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region<'a> {
    /// The addresses covered.
    pub range: Range<usize>,
    /// `r`.
    pub read: bool,
    /// `w`.
    pub write: bool,
    /// `x`.
    pub exec: bool,
    /// `s` (shared) rather than `p` (private, copy-on-write).
    pub shared: bool,
    /// Offset in the backing file.
    pub offset: u64,
    /// Inode of the backing file (0: anonymous).
    pub inode: u64,
    /// The backing file or pseudo-name (`[stack]`, `[vvar]`, …), empty for anonymous memory.
    pub path: &'a [u8],
}

impl Region<'_> {
    /// Kernel-provided special mappings whose pages are not ordinary memory (`[vvar]`,
    /// `[vvar_vclock]`, `[vsyscall]`): reading them tells nothing about the program's pointers.
    pub fn is_special(&self) -> bool {
        self.path.starts_with(b"[vvar") || self.path == b"[vsyscall]"
    }
}

fn parse_hex(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() || bytes.len() > 16 {
        return None;
    }
    let mut value = 0u64;
    for &b in bytes {
        value = value << 4 | (b as char).to_digit(16)? as u64;
    }
    Some(value)
}

fn parse_dec(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return None;
    }
    let mut value = 0u64;
    for &b in bytes {
        value = value
            .checked_mul(10)?
            .checked_add((b as char).to_digit(10)? as u64)?;
    }
    Some(value)
}

/// Parses one line (`start-end perms offset dev inode   path`); `None` if it is malformed.
pub fn parse_line(line: &[u8]) -> Option<Region<'_>> {
    let mut rest = line;
    let mut field = || {
        let start = rest.iter().position(|b| *b != b' ')?;
        rest = &rest[start..];
        let end = rest.iter().position(|b| *b == b' ').unwrap_or(rest.len());
        let (field, tail) = rest.split_at(end);
        rest = tail;
        Some(field)
    };
    let range = field()?;
    let perms = field()?;
    let offset = field()?;
    let _device = field()?;
    let inode = field()?;
    let dash = range.iter().position(|b| *b == b'-')?;
    let start = parse_hex(&range[..dash])? as usize;
    let end = parse_hex(&range[dash + 1..])? as usize;
    if perms.len() < 4 || start > end {
        return None;
    }
    let path_start = rest.iter().position(|b| *b != b' ').unwrap_or(rest.len());
    Some(Region {
        range: start..end,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset: parse_hex(offset)?,
        inode: parse_dec(inode)?,
        path: &rest[path_start..],
    })
}

/// A buffer that holds the text of `/proc/self/maps`, allocated once.
pub struct MapsBuffer {
    text: Vec<u8>,
}

impl MapsBuffer {
    /// A buffer of `bytes` bytes (about 100 bytes per mapping).
    pub fn with_capacity(bytes: usize) -> MapsBuffer {
        MapsBuffer {
            text: Vec::with_capacity(bytes),
        }
    }

    /// Reads `/proc/self/maps` into the buffer without allocating (async-signal-safe system
    /// calls only). Fails with [`ErrorKind::Unsupported`] if the text does not fit: grow the
    /// buffer with [`MapsBuffer::read_growing`] where allocating is allowed.
    pub fn read(&mut self) -> Result<()> {
        self.text.clear();
        // SAFETY: a NUL-terminated path; the descriptor is closed on every path below.
        let fd = unsafe {
            libc::open(
                c"/proc/self/maps".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(Error::last_os("open /proc/self/maps"));
        }
        let result = loop {
            let spare = self.text.capacity() - self.text.len();
            if spare == 0 {
                break Err(Error::new(ErrorKind::Unsupported {
                    what:
                        "reading /proc/self/maps into its preallocated buffer (too many mappings)",
                }));
            }
            // SAFETY: writes at most `spare` bytes into the vector's spare capacity.
            let n = unsafe {
                libc::read(
                    fd,
                    self.text.as_mut_ptr().add(self.text.len()) as *mut libc::c_void,
                    spare,
                )
            };
            if n < 0 {
                break Err(Error::last_os("read /proc/self/maps"));
            }
            if n == 0 {
                break Ok(());
            }
            // SAFETY: the kernel initialised exactly `n` more bytes.
            unsafe { self.text.set_len(self.text.len() + n as usize) };
        };
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(fd) };
        result
    }

    /// [`MapsBuffer::read`], doubling the buffer until the text fits (allocates).
    pub fn read_growing(&mut self) -> Result<()> {
        loop {
            match self.read() {
                Err(e) if matches!(e.kind(), ErrorKind::Unsupported { .. }) => {
                    self.text.reserve(self.text.capacity().max(4096) * 2);
                }
                other => return other,
            }
        }
    }

    /// How many bytes of text the buffer holds without growing.
    pub fn capacity(&self) -> usize {
        self.text.capacity()
    }

    /// The regions of the last read, in address order.
    pub fn regions(&self) -> impl Iterator<Item = Region<'_>> + '_ {
        self.text.split(|b| *b == b'\n').filter_map(parse_line)
    }

    /// The region containing `address`, from the last read.
    pub fn region_containing(&self, address: usize) -> Option<Region<'_>> {
        self.regions()
            .take_while(|r| r.range.start <= address)
            .find(|r| r.range.contains(&address))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_with_and_without_a_path() {
        let r =
            parse_line(b"55d0c0a00000-55d0c0a21000 r-xp 00001000 fd:01 123   /usr/bin/some thing")
                .unwrap();
        assert_eq!(r.range, 0x55d0c0a00000..0x55d0c0a21000);
        assert!(r.read && !r.write && r.exec && !r.shared);
        assert_eq!((r.offset, r.inode), (0x1000, 123));
        assert_eq!(r.path, b"/usr/bin/some thing");
        let anon = parse_line(b"7f0000000000-7f0000001000 rw-s 00000000 00:00 0 ").unwrap();
        assert!(anon.write && anon.shared && anon.path.is_empty());
        assert!(parse_line(b"garbage").is_none());
        assert!(parse_line(b"").is_none());
    }

    #[test]
    fn own_stack_is_found_without_allocating_more() {
        let mut maps = MapsBuffer::with_capacity(1 << 20);
        maps.read().unwrap();
        let here = &maps as *const MapsBuffer as usize;
        let region = maps.region_containing(here).unwrap();
        assert!(region.read && region.write, "{region:?}");
        assert_eq!(maps.capacity(), 1 << 20);
    }

    #[test]
    fn a_buffer_too_small_is_an_error_then_grows() {
        let mut maps = MapsBuffer::with_capacity(16);
        assert!(maps.read().is_err());
        maps.read_growing().unwrap();
        assert!(maps.regions().count() > 3);
    }
}
