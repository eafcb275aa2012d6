//! Unwind information for generated code: `.eh_frame` written with `gimli::write`, registered
//! with whichever unwinder the process uses.
//!
//! Trampolines and shadow-stack exit stubs are code the compiler never saw, so without unwind
//! information a backtrace taken in a hook, or a panic unwinding through a timed call, would stop
//! (or abort) there. Each generated block gets a CIE and one FDE, built here from call-frame
//! instructions and registered at run time.
//!
//! # Two unwinders, two conventions
//!
//! - libgcc (`libgcc_s`, the usual unwinder of Rust and C programs on Linux):
//!   `__register_frame(p)` takes a whole `.eh_frame` section — CIEs and FDEs up to a zero
//!   terminator.
//! - LLVM's libunwind: `__register_frame(p)` takes **one FDE**.
//!
//! Every registration is also reported to the engine's own stack walker
//! ([`crate::sys::walk`]), which reads generated code's frames with the world stopped.
//!
//! [`Unwinder::of_process`] tells them apart by a symbol only LLVM's libunwind exports
//! (`__unw_add_dynamic_fde`), and [`register`] passes the section or each FDE accordingly.
//!
//! # Safety
//!
//! Registered bytes are leaked (the unwinder reads them until they are deregistered, and a
//! block's registration lives as long as the block, which is never unmapped).
#![allow(unsafe_code)]

use gimli::write::{
    Address, CallFrameInstruction, CommonInformationEntry, EhFrame, EndianVec, Expression,
    FrameDescriptionEntry, FrameTable,
};
use gimli::{Encoding, Format, LittleEndian, Register};
use std::sync::OnceLock;

/// `rsp` in DWARF's x86-64 numbering.
pub(crate) const RSP: Register = gimli::X86_64::RSP;
/// The return-address column (`rip`, 16).
pub(crate) const RA: Register = gimli::X86_64::RA;

const ENCODING: Encoding = Encoding {
    format: Format::Dwarf32,
    version: 1,
    address_size: 8,
};

/// A CIE for x86-64 code: code alignment 1, data alignment -8, return address in column 16,
/// with `initial` as its initial instructions.
pub(crate) fn cie(initial: &[CallFrameInstruction]) -> CommonInformationEntry {
    let mut cie = CommonInformationEntry::new(ENCODING, 1, -8, RA);
    for i in initial {
        cie.add_instruction(i.clone());
    }
    cie
}

/// The standard CIE of a function's entry: CFA = `rsp + 8`, return address at `CFA - 8`.
pub(crate) fn call_cie() -> CommonInformationEntry {
    cie(&[
        CallFrameInstruction::Cfa(RSP, 8),
        CallFrameInstruction::Offset(RA, -8),
    ])
}

/// `DW_OP_addr address; DW_OP_deref`: the word stored at `address`.
pub(crate) fn word_at(address: usize) -> Expression {
    let mut e = Expression::new();
    e.op_addr(Address::Constant(address as u64));
    e.op_deref();
    e
}

/// An `.eh_frame` section (one CIE, one FDE for `len` bytes at `start` with `rules` at code
/// offsets, zero terminator).
pub(crate) fn eh_frame(
    cie: CommonInformationEntry,
    start: usize,
    len: usize,
    rules: impl IntoIterator<Item = (u32, CallFrameInstruction)>,
) -> Vec<u8> {
    let mut table = FrameTable::default();
    let cie = table.add_cie(cie);
    let mut fde = FrameDescriptionEntry::new(Address::Constant(start as u64), len as u32);
    for (offset, rule) in rules {
        fde.add_instruction(offset, rule);
    }
    table.add_fde(cie, fde);
    let mut section = EhFrame(EndianVec::new(LittleEndian));
    table
        .write_eh_frame(&mut section)
        .expect("call-frame rules of generated code are encodable");
    let mut bytes = section.0.into_vec();
    bytes.extend([0, 0, 0, 0]);
    bytes
}

/// Which unwinder the process uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unwinder {
    /// libgcc's: `__register_frame` takes a whole `.eh_frame` section.
    Libgcc,
    /// LLVM's libunwind: `__register_frame` takes one FDE.
    LlvmLibunwind,
}

impl Unwinder {
    /// The unwinder this process uses (looked up once).
    ///
    /// # Example
    ///
    /// ```
    /// // Rust programs on Linux use libgcc's unwinder unless linked with LLVM's libunwind.
    /// let u = evolve_code::Unwinder::of_process();
    /// assert!(matches!(u, evolve_code::Unwinder::Libgcc | evolve_code::Unwinder::LlvmLibunwind));
    /// ```
    pub fn of_process() -> Unwinder {
        static UNWINDER: OnceLock<Unwinder> = OnceLock::new();
        *UNWINDER.get_or_init(|| {
            // SAFETY: looking a symbol up in the global scope calls no code of it.
            let llvm =
                unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"__unw_add_dynamic_fde".as_ptr()) };
            if llvm.is_null() {
                Unwinder::Libgcc
            } else {
                Unwinder::LlvmLibunwind
            }
        })
    }

    /// The offsets in `section` (an `.eh_frame` with zero terminator) to pass to
    /// `__register_frame`: the section's start for libgcc, each FDE for LLVM's libunwind.
    pub(crate) fn entry_points(self, section: &[u8]) -> Vec<usize> {
        if self == Unwinder::Libgcc {
            return vec![0];
        }
        let mut out = Vec::new();
        let mut at = 0;
        while at + 8 <= section.len() {
            let len = u32::from_le_bytes(section[at..at + 4].try_into().expect("4 bytes")) as usize;
            if len == 0 {
                break;
            }
            let id = u32::from_le_bytes(section[at + 4..at + 8].try_into().expect("4 bytes"));
            if id != 0 {
                out.push(at); // an FDE (a CIE has id 0)
            }
            at += 4 + len;
        }
        out
    }
}

unsafe extern "C" {
    fn __register_frame(begin: *const u8);
    fn __deregister_frame(begin: *const u8);
    fn _Unwind_Backtrace(
        trace: extern "C" fn(*mut core::ffi::c_void, *mut core::ffi::c_void) -> i32,
        state: *mut core::ffi::c_void,
    ) -> i32;
    fn _Unwind_GetIP(context: *mut core::ffi::c_void) -> usize;
}

const URC_NO_REASON: i32 = 0;
const URC_END_OF_STACK: i32 = 5;

struct Trace {
    addresses: Vec<usize>,
    max: usize,
}

extern "C" fn collect_frame(context: *mut core::ffi::c_void, state: *mut core::ffi::c_void) -> i32 {
    // SAFETY: `state` is the `Trace` passed to `_Unwind_Backtrace` by `return_addresses`, alive
    // and used by this thread only for the walk; `context` is the unwinder's for this frame.
    let (trace, ip) = unsafe { (&mut *(state as *mut Trace), _Unwind_GetIP(context)) };
    if ip == 0 || trace.addresses.len() >= trace.max {
        return URC_END_OF_STACK;
    }
    trace.addresses.push(ip);
    URC_NO_REASON
}

/// The calling thread's return addresses, innermost first, at most `max`: the unwinder's walk
/// with no lock of the Rust runtime taken (std's backtrace lock may be held by the very code a
/// hook interrupted).
pub(crate) fn return_addresses(max: usize) -> Vec<usize> {
    let mut trace = Trace {
        addresses: Vec::with_capacity(max),
        max,
    };
    // SAFETY: the callback only reads the frame's IP; `trace` outlives the walk.
    unsafe { _Unwind_Backtrace(collect_frame, &mut trace as *mut Trace as *mut _) };
    trace.addresses
}

/// Whether `address` is code of the unwinder's own library (libgcc_s or LLVM's libunwind):
/// code there may hold the unwinder's locks (libgcc's `object_mutex` while it sorts registered
/// FDEs, calling `malloc`), so a hook reached from it must not unwind.
pub(crate) fn is_unwinder_code(address: usize) -> bool {
    static RANGES: OnceLock<Vec<std::ops::Range<usize>>> = OnceLock::new();
    RANGES
        .get_or_init(|| {
            crate::inspect::exec_ranges_of_object_containing(
                _Unwind_Backtrace as *const () as usize,
            )
        })
        .iter()
        .any(|r| r.contains(&address))
}

/// Registered unwind information: the bytes (leaked) and what was passed to the unwinder.
#[derive(Debug)]
pub(crate) struct Registration {
    bytes: &'static [u8],
    entries: Vec<usize>,
}

impl Registration {
    /// Removes the registration. The bytes stay allocated (a concurrent unwinder may still be
    /// reading them).
    ///
    /// # Safety
    /// No thread may be running, or about to run, the code it describes (or it runs without
    /// unwind info).
    pub(crate) unsafe fn deregister(self) {
        crate::sys::walk::deregistered(self.bytes.as_ptr() as usize);
        for at in self.entries {
            // SAFETY: registered by `register` with this exact pointer.
            unsafe { __deregister_frame(self.bytes[at..].as_ptr()) };
        }
    }
}

/// The length of the `.eh_frame` section at `begin`, zero terminator included.
///
/// # Safety
/// `begin` must hold a complete `.eh_frame` section ending in a zero terminator.
unsafe fn section_len(begin: usize) -> usize {
    let mut at = 0;
    loop {
        // SAFETY: within the section (the caller's contract): each entry's length word.
        let len = unsafe { std::ptr::read_unaligned((begin + at) as *const u32) } as usize;
        at += 4;
        if len == 0 {
            return at;
        }
        at += len;
    }
}

/// Registers the `.eh_frame` section at `begin` (zero-terminated, for example one the patch
/// loader placed in memory) with the process's unwinder, as [`register`] does.
///
/// # Safety
/// `begin` must hold a complete `.eh_frame` section ending in a zero terminator whose FDEs
/// describe mapped code, and must stay mapped and unchanged until [`deregister_at`].
pub(crate) unsafe fn register_at(begin: usize) {
    // SAFETY: the caller's contract.
    let section = unsafe { std::slice::from_raw_parts(begin as *const u8, section_len(begin)) };
    for at in Unwinder::of_process().entry_points(section) {
        // SAFETY: the caller vouches for the section; the unwinder keeps the pointer.
        unsafe { __register_frame(section[at..].as_ptr()) };
    }
    crate::sys::walk::registered(section);
}

/// Removes a registration made by [`register_at`].
///
/// # Safety
/// `begin` was registered by [`register_at`] and not deregistered since; no thread may be
/// unwinding through, or about to run, the code it describes.
pub(crate) unsafe fn deregister_at(begin: usize) {
    crate::sys::walk::deregistered(begin);
    // SAFETY: the caller's contract (the section is still mapped and unchanged).
    let section = unsafe { std::slice::from_raw_parts(begin as *const u8, section_len(begin)) };
    for at in Unwinder::of_process().entry_points(section) {
        // SAFETY: registered by `register_at` with this exact pointer.
        unsafe { __deregister_frame(section[at..].as_ptr()) };
    }
}

/// Registers `section` (an `.eh_frame` with zero terminator) with the process's unwinder; the
/// bytes live forever.
pub(crate) fn register(section: Vec<u8>) -> Registration {
    let bytes: &'static [u8] = section.leak();
    let entries = Unwinder::of_process().entry_points(bytes);
    for &at in &entries {
        // SAFETY: a complete `.eh_frame` section (or an FDE in it, whose CIE pointer stays
        // valid) that lives forever, describing code the caller placed at the FDE's address.
        unsafe { __register_frame(bytes[at..].as_ptr()) };
    }
    crate::sys::walk::registered(bytes);
    Registration { bytes, entries }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_libunwind_gets_each_fde_and_libgcc_the_section() {
        let eh = eh_frame(
            call_cie(),
            0x1000,
            64,
            [(4, CallFrameInstruction::CfaOffset(16))],
        );
        assert_eq!(Unwinder::Libgcc.entry_points(&eh), [0]);
        let fdes = Unwinder::LlvmLibunwind.entry_points(&eh);
        assert_eq!(fdes.len(), 1);
        // The FDE's CIE pointer leads back to the CIE at offset 0.
        let at = fdes[0];
        let back = u32::from_le_bytes(eh[at + 4..at + 8].try_into().unwrap()) as usize;
        assert_eq!(at + 4 - back, 0);
        // The FDE covers 0x1000..0x1040 (absolute pointers).
        let start = u64::from_le_bytes(eh[at + 8..at + 16].try_into().unwrap());
        let len = u64::from_le_bytes(eh[at + 16..at + 24].try_into().unwrap());
        assert_eq!((start, len), (0x1000, 64));
    }
}
