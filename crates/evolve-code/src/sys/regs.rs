//! A stopped thread's registers, as the kernel saved them in its signal frame: the general
//! registers (`uc_mcontext.gregs`) and the extended state (`uc_mcontext.fpregs`: the x87/MMX,
//! SSE, AVX and AVX-512 registers, in the XSAVE layout).
//!
//! Pointers live in vector registers too: `memcpy` moves them through XMM/YMM registers, and an
//! optimiser keeps values in them across calls. A reference scan that reads only the general
//! registers misses them, so [`Registers::vector_words`] names every 8-byte word of every
//! vector register in the saved state.
//!
//! # The saved extended state
//!
//! The signal frame holds the 512-byte FXSAVE area, whose software-reserved bytes (464..512)
//! carry the kernel's `_fpx_sw_bytes`: `magic1 == FP_XSTATE_MAGIC1` says an XSAVE header and
//! extended components follow, `xstate_size` how many bytes in all. The header's `XSTATE_BV`
//! (bytes 512..520) says which components hold a value; a component whose bit is clear is in its
//! initial state (zero) whatever its bytes say. Signal frames use the standard (non-compacted)
//! format, where component `i ≥ 2` lies at the offset CPUID leaf `0xD`, sub-leaf `i`, reports.
//!
//! x86-64 Linux only: another architecture would be a sibling module with the same types.
#![allow(unsafe_code)]

use std::sync::OnceLock;

/// General registers in a signal frame (`NGREG`), in `REG_R8 … REG_CR2` order.
pub const GENERAL: usize = 23;

const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
const LEGACY: usize = 512;

/// Where the extended-state components lie in the XSAVE area of this machine.
struct Layout {
    /// Bytes a signal frame's extended state can take (at least the legacy area).
    max_size: usize,
    /// `(offset, size)` of component `i` in the standard format (0: not supported).
    components: [(u32, u32); 64],
}

fn layout() -> &'static Layout {
    static LAYOUT: OnceLock<Layout> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        let mut layout = Layout {
            max_size: LEGACY,
            components: [(0, 0); 64],
        };
        if !std::arch::is_x86_feature_detected!("xsave") {
            return layout;
        }
        // CPUID leaf 0xD exists when XSAVE is supported (checked above).
        let leaf = std::arch::x86_64::__cpuid_count(0xd, 0);
        layout.max_size = (leaf.ebx.max(leaf.ecx) as usize).max(LEGACY + 64);
        let supported = leaf.eax as u64 | (leaf.edx as u64) << 32;
        for (i, component) in layout.components.iter_mut().enumerate().skip(2) {
            if supported & 1 << i != 0 {
                // Sub-leaves of supported components are defined.
                let sub = std::arch::x86_64::__cpuid_count(0xd, i as u32);
                // ECX bit 0: a supervisor component, never in a user signal frame.
                if sub.ecx & 1 == 0 {
                    *component = (sub.ebx, sub.eax);
                }
            }
        }
        layout
    })
}

/// 8-byte words a saved extended state can take on this machine: the size of the buffer a
/// capture needs. Computed once (CPUID); call it before stopping anyone.
pub fn extended_words() -> usize {
    layout().max_size.div_ceil(8)
}

/// Copies a signal frame's extended state into `out` (as 8-byte words); returns the number of
/// words copied. Async-signal-safe: reads only the frame and the layout computed beforehand.
///
/// # Safety
///
/// `fpregs` is null or the `uc_mcontext.fpregs` pointer of a signal frame the kernel built for
/// the running handler.
pub unsafe fn capture_extended(fpregs: *const u8, out: &[std::sync::atomic::AtomicU64]) -> usize {
    if fpregs.is_null() {
        return 0;
    }
    // SAFETY: the legacy area is always present; the software bytes lie within it.
    let (magic, size) = unsafe {
        (
            std::ptr::read_unaligned(fpregs.add(464) as *const u32),
            std::ptr::read_unaligned(fpregs.add(480) as *const u32),
        )
    };
    let bytes = if magic == FP_XSTATE_MAGIC1 {
        (size as usize).max(LEGACY)
    } else {
        LEGACY
    };
    let words = (bytes / 8).min(out.len());
    for (i, slot) in out.iter().take(words).enumerate() {
        // SAFETY: within the `bytes` the kernel wrote for this frame.
        let word = unsafe { std::ptr::read_unaligned((fpregs as *const u64).add(i)) };
        slot.store(word, std::sync::atomic::Ordering::Relaxed);
    }
    words
}

/// Which register a word of the extended state belongs to (for reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VectorRegister {
    /// `mm0`–`mm7` (the low 64 bits of the x87 registers).
    Mmx(u8),
    /// `xmm0`–`xmm15`.
    Xmm(u8),
    /// Bits 128..256 of `ymm0`–`ymm15`.
    YmmUpper(u8),
    /// Bits 256..512 of `zmm0`–`zmm15`.
    ZmmUpper(u8),
    /// `zmm16`–`zmm31`.
    Zmm(u8),
    /// Another component of the XSAVE area (its number), e.g. AVX-512 mask registers.
    Component(u8),
}

impl std::fmt::Display for VectorRegister {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VectorRegister::Mmx(i) => write!(f, "mm{i}"),
            VectorRegister::Xmm(i) => write!(f, "xmm{i}"),
            VectorRegister::YmmUpper(i) => write!(f, "ymm{i} (upper half)"),
            VectorRegister::ZmmUpper(i) => write!(f, "zmm{i} (upper half)"),
            VectorRegister::Zmm(i) => write!(f, "zmm{i}"),
            VectorRegister::Component(i) => write!(f, "XSAVE component {i}"),
        }
    }
}

/// The registers of one stopped thread.
#[derive(Clone, Copy)]
pub struct Registers<'a> {
    general: &'a [u64; GENERAL],
    extended: &'a [u64],
}

impl std::fmt::Debug for Registers<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registers")
            .field("rip", &format_args!("{:#x}", self.rip()))
            .field("rsp", &format_args!("{:#x}", self.rsp()))
            .field("extended_words", &self.extended.len())
            .finish_non_exhaustive()
    }
}

impl<'a> Registers<'a> {
    /// Registers from a copy of `gregs` and of the extended state's words.
    pub fn new(general: &'a [u64; GENERAL], extended: &'a [u64]) -> Registers<'a> {
        Registers { general, extended }
    }

    /// The general registers in `ucontext_t` order (`libc::REG_R8` … `libc::REG_CR2`).
    pub fn general(&self) -> &'a [u64; GENERAL] {
        self.general
    }

    /// The instruction pointer the thread resumes at.
    pub fn rip(&self) -> usize {
        self.general[libc::REG_RIP as usize] as usize
    }

    /// The stack pointer.
    pub fn rsp(&self) -> usize {
        self.general[libc::REG_RSP as usize] as usize
    }

    fn word(&self, byte: usize) -> u64 {
        self.extended.get(byte / 8).copied().unwrap_or(0)
    }

    /// `XSTATE_BV`: the components that hold a value (without an XSAVE header: x87 and SSE).
    fn present(&self) -> u64 {
        if self.extended.len() * 8 > LEGACY && self.word(464) as u32 == FP_XSTATE_MAGIC1 {
            self.word(LEGACY)
        } else if self.extended.len() * 8 >= LEGACY {
            0b11
        } else {
            0
        }
    }

    /// `xmm{i}` (`i < 16`).
    pub fn xmm(&self, i: usize) -> u128 {
        if self.present() & 0b10 == 0 || i >= 16 {
            return 0;
        }
        let at = 160 + 16 * i;
        self.word(at) as u128 | (self.word(at + 8) as u128) << 64
    }

    /// Bits 128..256 of `ymm{i}` (`i < 16`; 0 without AVX).
    pub fn ymm_upper(&self, i: usize) -> u128 {
        let (offset, _) = layout().components[2];
        if self.present() & 0b100 == 0 || offset == 0 || i >= 16 {
            return 0;
        }
        let at = offset as usize + 16 * i;
        self.word(at) as u128 | (self.word(at + 8) as u128) << 64
    }

    /// Every 8-byte word of every vector register that holds a value, with its register.
    pub fn vector_words(&self) -> impl Iterator<Item = (VectorRegister, u64)> + 'a {
        let this = *self;
        let present = this.present();
        let mmx = (0..8u8)
            .filter(move |_| present & 1 != 0)
            .map(move |i| (VectorRegister::Mmx(i), this.word(32 + 16 * i as usize)));
        let xmm = (0..32usize)
            .filter(move |_| present & 2 != 0)
            .map(move |w| (VectorRegister::Xmm((w / 2) as u8), this.word(160 + 8 * w)));
        let extended = (2..64usize)
            .filter(move |bit| present & 1 << bit != 0)
            .flat_map(move |bit| {
                let (offset, size) = layout().components[bit];
                (0..size as usize / 8).map(move |w| {
                    let register = match bit {
                        2 => VectorRegister::YmmUpper((w / 2) as u8),
                        6 => VectorRegister::ZmmUpper((w / 4) as u8),
                        7 => VectorRegister::Zmm(16 + (w / 8) as u8),
                        _ => VectorRegister::Component(bit as u8),
                    };
                    (register, this.word(offset as usize + 8 * w))
                })
            })
            .filter(move |_| this.extended.len() * 8 > LEGACY);
        mmx.chain(xmm).chain(extended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_has_room_for_the_legacy_area_and_avx_when_present() {
        assert!(extended_words() * 8 >= LEGACY);
        if std::arch::is_x86_feature_detected!("avx") {
            let (offset, size) = layout().components[2];
            assert_eq!(size, 256);
            assert!(offset as usize >= LEGACY + 64);
        }
    }

    #[test]
    fn words_are_named_by_register() {
        let mut extended = vec![0u64; extended_words()];
        extended[(160 + 16 * 7) / 8] = 0x1234;
        let general = [0u64; GENERAL];
        let regs = Registers::new(&general, &extended);
        // Without an XSAVE header only x87 and SSE are read.
        assert_eq!(regs.xmm(7), 0x1234);
        assert!(regs
            .vector_words()
            .any(|(r, w)| r == VectorRegister::Xmm(7) && w == 0x1234));
        assert_eq!(regs.ymm_upper(7), 0);
    }
}
