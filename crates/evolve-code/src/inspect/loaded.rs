//! The dynamic loader's view of this process: which ELF objects are mapped, where, and checked
//! read access to their mapped bytes.
//!
//! Everything here comes from `dl_iterate_phdr`, which reports each loaded object's load bias and
//! program headers. Bytes of a loaded object are only ever read through [`Memory`], which refuses
//! any range that does not lie inside one of the object's readable `PT_LOAD` segments.
//!
//! # Safety
//!
//! This is the only place in the module that touches raw memory. The rules it relies on:
//!
//! - While a [`crate::sys::loader::for_each`] callback runs the loader holds its lock, so no
//!   object can be unloaded: the object's `PT_LOAD` segments stay mapped.
//! - The main executable is never unmapped while the process lives (it cannot be `dlclose`d), so
//!   its segments may be read at any time.
//! - A `PT_LOAD` segment with `PF_R` is mapped readable over `[bias + p_vaddr, bias + p_vaddr +
//!   p_memsz)` by the loader. Nothing in the process is assumed to make its own image unreadable.
//! - [`Memory`] values are only created under one of the two guarantees above, and the slices they
//!   hand out cannot outlive them (they borrow the `Memory`'s lifetime, which is bound to the
//!   callback or to the caller's borrow of the image).
#![allow(unsafe_code)]

use std::marker::PhantomData;
use std::ops::Range;

use crate::sys::loader::{for_each, Object as Info};
use object::elf::{FileHeader64, NT_GNU_BUILD_ID};
use object::read::elf::NoteIterator;
use object::LittleEndian;

/// One `PT_LOAD` segment at its runtime address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Segment {
    /// Runtime addresses covered (`p_memsz` bytes from `bias + p_vaddr`).
    pub range: Range<usize>,
    /// `p_flags` (`PF_R`, `PF_W`, `PF_X`).
    pub flags: u32,
}

impl Segment {
    pub fn is_exec(&self) -> bool {
        self.flags & libc::PF_X != 0
    }

    fn is_readable(&self) -> bool {
        self.flags & libc::PF_R != 0
    }
}

/// What the loader reports about one object, copied out of the callback.
#[derive(Debug, Clone)]
pub(super) struct LoadedObject {
    /// `dlpi_name` as bytes: empty for the main executable, a path or a bare name (the vdso).
    pub name: Vec<u8>,
    /// `dlpi_addr`: runtime address minus link-time address.
    pub bias: usize,
    /// Whether these are the program headers the kernel passed as `AT_PHDR`.
    pub is_main: bool,
    /// The `PT_LOAD` segments.
    pub segments: Vec<Segment>,
    /// The `NT_GNU_BUILD_ID` note's descriptor, read from the mapped `PT_NOTE` segments.
    pub build_id: Option<Vec<u8>>,
}

/// Read access to the mapped segments of one loaded object, valid for `'a`.
pub(super) struct Memory<'a> {
    segments: &'a [Segment],
    _mapped: PhantomData<&'a [u8]>,
}

impl<'a> Memory<'a> {
    /// The bytes at `range`, if it lies entirely inside one readable `PT_LOAD` segment.
    pub fn bytes(&self, range: Range<usize>) -> Option<&'a [u8]> {
        if range.start > range.end {
            return None;
        }
        let inside = self
            .segments
            .iter()
            .any(|s| s.is_readable() && s.range.start <= range.start && range.end <= s.range.end);
        if !inside {
            return None;
        }
        if range.is_empty() {
            return Some(&[]);
        }
        // SAFETY: `range` is non-empty and lies inside a readable PT_LOAD segment of an object
        // that, by the construction of `Memory` (see the module's Safety section), stays mapped
        // for `'a`. u8 has no alignment or validity requirements. The engine may rewrite 5-byte
        // sites in text concurrently; a reader then sees old or new instruction bytes, which the
        // callers treat as a snapshot.
        Some(unsafe { std::slice::from_raw_parts(range.start as *const u8, range.len()) })
    }
}

/// Every object the loader currently has mapped, in the loader's order (main executable first).
pub(super) fn snapshot() -> Vec<LoadedObject> {
    let main_phdr = main_phdr();
    let mut out = Vec::new();
    for_each(|info| {
        let segments = info.segments();
        let memory = Memory {
            segments: &segments,
            _mapped: PhantomData,
        };
        let build_id = info.build_id(&memory);
        out.push(LoadedObject {
            name: info.name.to_vec(),
            bias: info.bias,
            is_main: main_phdr == Some(info.phdr_address),
            segments,
            build_id,
        });
        true
    });
    // Without AT_PHDR (never seen on Linux, but cheap to handle) glibc's first entry is the
    // executable.
    if !out.iter().any(|o| o.is_main) {
        if let Some(first) = out.first_mut() {
            first.is_main = first.name.is_empty();
        }
    }
    out
}

/// The main executable's TLS module id and the calling thread's instance of its TLS block, if
/// it has a `PT_TLS` segment.
pub(super) fn executable_tls() -> Option<(usize, usize)> {
    let main_phdr = main_phdr();
    let mut found = None;
    for_each(|info| {
        if main_phdr == Some(info.phdr_address) || (main_phdr.is_none() && info.name.is_empty()) {
            found = (info.tls_module != 0).then_some((info.tls_module, info.tls_data));
            return false;
        }
        true
    });
    found
}

/// Runs `f` with read access to the object loaded at `bias` with exactly these `segments`, if it
/// is (still) loaded. Returns `None` if it is not.
///
/// For a library the loader's lock is held while `f` runs, so `f` must not load or unload objects
/// and should be quick.
pub(super) fn with_memory<R>(
    bias: usize,
    is_main: bool,
    segments: &[Segment],
    f: impl FnOnce(&Memory<'_>) -> R,
) -> Option<R> {
    if is_main {
        // The main executable's mappings live as long as the process.
        return Some(f(&Memory {
            segments,
            _mapped: PhantomData,
        }));
    }
    let mut f = Some(f);
    let mut result = None;
    for_each(|info| {
        if info.bias != bias || info.segments() != segments {
            return true;
        }
        let memory = Memory {
            segments,
            _mapped: PhantomData,
        };
        if let Some(f) = f.take() {
            result = Some(f(&memory));
        }
        false
    });
    result
}

/// The address of the main executable's program headers, from the auxiliary vector.
fn main_phdr() -> Option<usize> {
    // SAFETY: getauxval has no preconditions; it reads the auxiliary vector saved at startup.
    let phdr = unsafe { libc::getauxval(libc::AT_PHDR) };
    (phdr != 0).then_some(phdr as usize)
}

impl Info<'_> {
    fn segments(&self) -> Vec<Segment> {
        self.phdrs
            .iter()
            .filter(|p| p.p_type == libc::PT_LOAD)
            .filter_map(|p| {
                let start = self.runtime(p.p_vaddr)?;
                let end = start.checked_add(usize::try_from(p.p_memsz).ok()?)?;
                Some(Segment {
                    range: start..end,
                    flags: p.p_flags,
                })
            })
            .collect()
    }

    fn runtime(&self, vaddr: u64) -> Option<usize> {
        usize::try_from(vaddr).ok()?.checked_add(self.bias)
    }

    /// The GNU build id from the object's mapped `PT_NOTE` segments (not from its file, which
    /// may have been replaced since it was loaded).
    fn build_id(&self, memory: &Memory<'_>) -> Option<Vec<u8>> {
        for p in self.phdrs.iter().filter(|p| p.p_type == libc::PT_NOTE) {
            let range = self.runtime(p.p_vaddr).and_then(|start| {
                Some(start..start.checked_add(usize::try_from(p.p_memsz).ok()?)?)
            });
            let Some(bytes) = range.and_then(|r| memory.bytes(r)) else {
                continue;
            };
            let Ok(mut notes) =
                NoteIterator::<FileHeader64<LittleEndian>>::new(LittleEndian, p.p_align, bytes)
            else {
                continue;
            };
            while let Ok(Some(note)) = notes.next() {
                if note.name() == b"GNU" && note.n_type(LittleEndian) == NT_GNU_BUILD_ID {
                    return Some(note.desc().to_vec());
                }
            }
        }
        None
    }
}
