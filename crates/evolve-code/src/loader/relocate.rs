//! x86-64 relocations of a patch object, each resolved to the most direct reference possible.
//!
//! The patch lies within ±2 GiB of the executable, so references to the program are direct:
//! `PC32`/`PLT32` become plain `rel32` displacements to the program's function or static, and a
//! `GOTPCREL` load or call is **relaxed** the way `ld` relaxes `GOTPCRELX`: `call *f@GOTPCREL`
//! (`ff 15`) becomes `addr32 call f` (`67 e8 rel32`), `jmp *f@GOTPCREL` (`ff 25`) becomes
//! `jmp f; nop` (`e9 rel32 90`), `mov f@GOTPCREL(%rip), %reg` (`REX.W 8b`) becomes
//! `lea f(%rip), %reg` (`REX.W 8d`). rustc emits plain `R_X86_64_GOTPCREL` (not the `X`
//! variants that promise a relaxable instruction), so the instruction is decoded (iced-x86) and
//! relaxed only if it is one of those three forms with the displacement as its last field.
//!
//! What stays indirect: a reference to something beyond ±2 GiB (a library function such as an
//! IFUNC's selected `memmove`, `__tls_get_addr`, `_Unwind_Resume`) gets a GOT slot (read-only
//! once loaded), and a `PLT32` call to it a PLT stub (`jmp *slot(%rip)`) in the patch's text;
//! so does a `GOTPCREL` whose instruction cannot be relaxed.
//!
//! Thread-locals are the executable's (see `super::tls`): `TLSGD`/`TLSLD` get a GOT pair
//! `{module, offset}` for `__tls_get_addr`, `GOTTPOFF` a GOT slot holding the thread-pointer
//! offset, `TPOFF32`/`TPOFF64`/`DTPOFF32`/`DTPOFF64`/`DTPMOD64` are computed in place.
//!
//! Every value is checked to fit its field; a relocation that cannot be honoured is an error
//! naming its type and symbol.

use super::layout::{GOT_SLOT, PLT_STUB};
use super::tls::ExecutableTls;
use iced_x86::{Code, Decoder, DecoderOptions, Register};
use object::elf;
use std::collections::HashMap;

/// The value of a symbol of the patch once bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Value {
    /// An address in the process (the patch's own sections, the program, a library), or 0 for
    /// an unresolved weak reference.
    Address(usize),
    /// An offset in the executable's TLS block.
    Tls(usize),
}

/// One `Elf64_Rela`, decoded.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rela {
    pub kind: u32,
    pub offset: usize,
    pub symbol: usize,
    pub addend: i64,
}

/// The relocation types the loader honours.
pub(super) const SUPPORTED: &[u32] = &[
    elf::R_X86_64_NONE,
    elf::R_X86_64_64,
    elf::R_X86_64_PC32,
    elf::R_X86_64_PLT32,
    elf::R_X86_64_32,
    elf::R_X86_64_32S,
    elf::R_X86_64_PC64,
    elf::R_X86_64_GOTPCREL,
    elf::R_X86_64_GOTPCRELX,
    elf::R_X86_64_REX_GOTPCRELX,
    elf::R_X86_64_TLSGD,
    elf::R_X86_64_TLSLD,
    elf::R_X86_64_DTPOFF32,
    elf::R_X86_64_DTPOFF64,
    elf::R_X86_64_DTPMOD64,
    elf::R_X86_64_GOTTPOFF,
    elf::R_X86_64_TPOFF32,
    elf::R_X86_64_TPOFF64,
];

/// The ELF name of relocation type `kind`.
pub(super) fn type_name(kind: u32) -> String {
    let name = match kind {
        elf::R_X86_64_NONE => "R_X86_64_NONE",
        elf::R_X86_64_64 => "R_X86_64_64",
        elf::R_X86_64_PC32 => "R_X86_64_PC32",
        elf::R_X86_64_GOT32 => "R_X86_64_GOT32",
        elf::R_X86_64_PLT32 => "R_X86_64_PLT32",
        elf::R_X86_64_COPY => "R_X86_64_COPY",
        elf::R_X86_64_GLOB_DAT => "R_X86_64_GLOB_DAT",
        elf::R_X86_64_JUMP_SLOT => "R_X86_64_JUMP_SLOT",
        elf::R_X86_64_RELATIVE => "R_X86_64_RELATIVE",
        elf::R_X86_64_GOTPCREL => "R_X86_64_GOTPCREL",
        elf::R_X86_64_32 => "R_X86_64_32",
        elf::R_X86_64_32S => "R_X86_64_32S",
        elf::R_X86_64_16 => "R_X86_64_16",
        elf::R_X86_64_PC16 => "R_X86_64_PC16",
        elf::R_X86_64_8 => "R_X86_64_8",
        elf::R_X86_64_PC8 => "R_X86_64_PC8",
        elf::R_X86_64_DTPMOD64 => "R_X86_64_DTPMOD64",
        elf::R_X86_64_DTPOFF64 => "R_X86_64_DTPOFF64",
        elf::R_X86_64_TPOFF64 => "R_X86_64_TPOFF64",
        elf::R_X86_64_TLSGD => "R_X86_64_TLSGD",
        elf::R_X86_64_TLSLD => "R_X86_64_TLSLD",
        elf::R_X86_64_DTPOFF32 => "R_X86_64_DTPOFF32",
        elf::R_X86_64_GOTTPOFF => "R_X86_64_GOTTPOFF",
        elf::R_X86_64_TPOFF32 => "R_X86_64_TPOFF32",
        elf::R_X86_64_PC64 => "R_X86_64_PC64",
        elf::R_X86_64_GOTOFF64 => "R_X86_64_GOTOFF64",
        elf::R_X86_64_GOTPC32 => "R_X86_64_GOTPC32",
        elf::R_X86_64_GOT64 => "R_X86_64_GOT64",
        elf::R_X86_64_GOTPCREL64 => "R_X86_64_GOTPCREL64",
        elf::R_X86_64_GOTPC64 => "R_X86_64_GOTPC64",
        elf::R_X86_64_GOTPLT64 => "R_X86_64_GOTPLT64",
        elf::R_X86_64_PLTOFF64 => "R_X86_64_PLTOFF64",
        elf::R_X86_64_SIZE32 => "R_X86_64_SIZE32",
        elf::R_X86_64_SIZE64 => "R_X86_64_SIZE64",
        elf::R_X86_64_GOTPC32_TLSDESC => "R_X86_64_GOTPC32_TLSDESC",
        elf::R_X86_64_TLSDESC_CALL => "R_X86_64_TLSDESC_CALL",
        elf::R_X86_64_TLSDESC => "R_X86_64_TLSDESC",
        elf::R_X86_64_IRELATIVE => "R_X86_64_IRELATIVE",
        elf::R_X86_64_GOTPCRELX => "R_X86_64_GOTPCRELX",
        elf::R_X86_64_REX_GOTPCRELX => "R_X86_64_REX_GOTPCRELX",
        _ => return format!("relocation type {kind}"),
    };
    name.to_owned()
}

/// Whether relocation `kind` reads its symbol as a thread-local.
pub(super) fn is_tls(kind: u32) -> bool {
    matches!(
        kind,
        elf::R_X86_64_TLSGD
            | elf::R_X86_64_TLSLD
            | elf::R_X86_64_DTPOFF32
            | elf::R_X86_64_DTPOFF64
            | elf::R_X86_64_DTPMOD64
            | elf::R_X86_64_GOTTPOFF
            | elf::R_X86_64_TPOFF32
            | elf::R_X86_64_TPOFF64
    )
}

/// The bytes relocation `kind` writes.
pub(super) fn field_size(kind: u32) -> usize {
    match kind {
        elf::R_X86_64_NONE => 0,
        elf::R_X86_64_64
        | elf::R_X86_64_PC64
        | elf::R_X86_64_DTPOFF64
        | elf::R_X86_64_TPOFF64
        | elf::R_X86_64_DTPMOD64 => 8,
        _ => 4,
    }
}

/// How many GOT slots (`got`) and PLT stubs (`plt`) relocation `kind` may need, at most.
pub(super) fn table_needs(kind: u32) -> (usize, usize) {
    match kind {
        elf::R_X86_64_TLSGD | elf::R_X86_64_TLSLD => (2, 0),
        elf::R_X86_64_GOTPCREL
        | elf::R_X86_64_GOTPCRELX
        | elf::R_X86_64_REX_GOTPCRELX
        | elf::R_X86_64_GOTTPOFF => (1, 0),
        elf::R_X86_64_PLT32 => (1, 1),
        _ => (0, 0),
    }
}

/// What a GOT slot holds, to share one slot among all references to the same thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Slot {
    Address(usize),
    TlsIndex { module: usize, offset: usize },
    TpOffset(i64),
}

/// The GOT and PLT being filled, and the memory being relocated.
pub(super) struct Relocator<'a> {
    /// The reservation's bytes, and its run-time start address.
    memory: &'a mut [u8],
    base: usize,
    /// Offsets of the GOT and PLT areas, and how many entries each has room for.
    got: usize,
    got_room: usize,
    plt: usize,
    plt_room: usize,
    slots: HashMap<Slot, usize>,
    stubs: HashMap<usize, usize>,
    tls: Option<ExecutableTls>,
    /// Instructions relaxed, GOT slots and PLT stubs used: for the caller's report.
    pub relaxed: usize,
}

/// The section being relocated.
pub(super) struct Target<'a> {
    /// Its offset in the reservation.
    pub offset: usize,
    /// Its original bytes (for decoding instructions), empty for data.
    pub code: &'a [u8],
    pub executable: bool,
    /// Instruction starts in `code`, decoded on first need.
    pub starts: Option<Vec<usize>>,
}

impl<'a> Relocator<'a> {
    pub fn new(
        memory: &'a mut [u8],
        base: usize,
        (got, got_room): (usize, usize),
        (plt, plt_room): (usize, usize),
        tls: Option<ExecutableTls>,
    ) -> Relocator<'a> {
        Relocator {
            memory,
            base,
            got,
            got_room,
            plt,
            plt_room,
            slots: HashMap::new(),
            stubs: HashMap::new(),
            tls,
            relaxed: 0,
        }
    }

    /// GOT slots in use.
    pub fn slots_used(&self) -> usize {
        self.slots
            .keys()
            .map(|s| match s {
                Slot::TlsIndex { .. } => 2,
                _ => 1,
            })
            .sum()
    }

    /// PLT stubs in use.
    pub fn stubs_used(&self) -> usize {
        self.stubs.len()
    }

    fn write(&mut self, at: usize, bytes: &[u8]) -> Result<(), String> {
        let field = self
            .memory
            .get_mut(at..at + bytes.len())
            .ok_or_else(|| format!("field at {at:#x} lies outside the patch"))?;
        field.copy_from_slice(bytes);
        Ok(())
    }

    /// The run-time address of the GOT slot holding `slot`, filling a new one if needed.
    fn slot(&mut self, slot: Slot) -> Result<usize, String> {
        if let Some(&offset) = self.slots.get(&slot) {
            return Ok(self.base + offset);
        }
        let used = self.slots_used();
        let (words, need): (Vec<u64>, usize) = match slot {
            Slot::Address(a) => (vec![a as u64], 1),
            Slot::TlsIndex { module, offset } => (vec![module as u64, offset as u64], 2),
            Slot::TpOffset(t) => (vec![t as u64], 1),
        };
        if used + need > self.got_room {
            return Err("internal: the GOT is full".into());
        }
        let offset = self.got + used * GOT_SLOT;
        for (i, word) in words.iter().enumerate() {
            self.write(offset + i * GOT_SLOT, &word.to_le_bytes())?;
        }
        self.slots.insert(slot, offset);
        Ok(self.base + offset)
    }

    /// The run-time address of a PLT stub jumping to `target`.
    fn stub(&mut self, target: usize) -> Result<usize, String> {
        if let Some(&offset) = self.stubs.get(&target) {
            return Ok(self.base + offset);
        }
        if self.stubs.len() >= self.plt_room {
            return Err("internal: the PLT is full".into());
        }
        let slot = self.slot(Slot::Address(target))?;
        let offset = self.plt + self.stubs.len() * PLT_STUB;
        let rel = rel32(slot, self.base + offset + 6).ok_or("GOT slot out of reach of the PLT")?;
        let mut stub = [0xcc; PLT_STUB];
        stub[..2].copy_from_slice(&[0xff, 0x25]); // jmp qword ptr [rip + rel32]
        stub[2..6].copy_from_slice(&rel.to_le_bytes());
        self.write(offset, &stub)?;
        self.stubs.insert(target, offset);
        Ok(self.base + offset)
    }

    fn tls(&self) -> Result<ExecutableTls, String> {
        self.tls
            .ok_or_else(|| "the executable has no TLS segment".to_owned())
    }

    /// Applies `rela` to `target`, with `value` the bound symbol (`None` for symbol 0).
    pub fn apply(
        &mut self,
        target: &mut Target<'_>,
        rela: &Rela,
        value: Option<Value>,
    ) -> Result<(), String> {
        let at = target.offset + rela.offset;
        let place = self.base + at;
        let a = rela.addend;
        let address = || match value {
            Some(Value::Tls(_)) => Err("a thread-local used as an address".to_owned()),
            other => Ok(value_address(other)),
        };
        let tls_offset = || match value {
            Some(Value::Tls(offset)) => Ok(offset),
            _ => Err("not a thread-local of the executable".to_owned()),
        };
        let too_far = |what: &str| format!("{what} does not fit the relocation's field");
        match rela.kind {
            elf::R_X86_64_NONE => Ok(()),
            elf::R_X86_64_64 => self.write(at, &address()?.wrapping_add(a as usize).to_le_bytes()),
            elf::R_X86_64_32 => {
                let v = u32::try_from(address()? as i64 + a)
                    .map_err(|_| too_far("the absolute address"))?;
                self.write(at, &v.to_le_bytes())
            }
            elf::R_X86_64_32S => {
                let v = i32::try_from(address()? as i64 + a)
                    .map_err(|_| too_far("the absolute address"))?;
                self.write(at, &v.to_le_bytes())
            }
            elf::R_X86_64_PC64 => {
                let v = (address()? as i64)
                    .wrapping_add(a)
                    .wrapping_sub(place as i64);
                self.write(at, &v.to_le_bytes())
            }
            elf::R_X86_64_PC32 => {
                let s = address()?;
                let v = pc32(s, a, place).ok_or_else(|| out_of_reach(s, place))?;
                self.write(at, &v.to_le_bytes())
            }
            elf::R_X86_64_PLT32 => {
                let s = address()?;
                if let Some(v) = pc32(s, a, place) {
                    return self.write(at, &v.to_le_bytes());
                }
                // A call to a far function (a library's): through a PLT stub. The stub stands
                // for the function's entry, so only the usual addend (-4) makes sense.
                if a != -4 {
                    return Err(out_of_reach(s, place));
                }
                let stub = self.stub(s)?;
                let v = pc32(stub, a, place).ok_or_else(|| out_of_reach(stub, place))?;
                self.write(at, &v.to_le_bytes())
            }
            elf::R_X86_64_GOTPCREL | elf::R_X86_64_GOTPCRELX | elf::R_X86_64_REX_GOTPCRELX => {
                let s = address()?;
                if s != 0 && target.executable && self.relax(target, rela, s)? {
                    self.relaxed += 1;
                    return Ok(());
                }
                let slot = self.slot(Slot::Address(s))?;
                let v = pc32(slot, a, place).ok_or_else(|| out_of_reach(slot, place))?;
                self.write(at, &v.to_le_bytes())
            }
            elf::R_X86_64_TLSGD | elf::R_X86_64_TLSLD => {
                let module = self.tls()?.module;
                let offset = if rela.kind == elf::R_X86_64_TLSGD {
                    tls_offset()?
                } else {
                    0
                };
                let pair = self.slot(Slot::TlsIndex { module, offset })?;
                let v = pc32(pair, a, place).ok_or_else(|| out_of_reach(pair, place))?;
                self.write(at, &v.to_le_bytes())
            }
            elf::R_X86_64_DTPOFF32 => {
                let v = i32::try_from(tls_offset()? as i64 + a)
                    .map_err(|_| too_far("the TLS offset"))?;
                self.write(at, &v.to_le_bytes())
            }
            elf::R_X86_64_DTPOFF64 => self.write(at, &(tls_offset()? as i64 + a).to_le_bytes()),
            elf::R_X86_64_DTPMOD64 => self.write(at, &(self.tls()?.module as u64).to_le_bytes()),
            elf::R_X86_64_GOTTPOFF => {
                let tp = self.tls()?.block_from_tp + tls_offset()? as i64;
                let slot = self.slot(Slot::TpOffset(tp))?;
                let v = pc32(slot, a, place).ok_or_else(|| out_of_reach(slot, place))?;
                self.write(at, &v.to_le_bytes())
            }
            elf::R_X86_64_TPOFF32 => {
                let tp = self.tls()?.block_from_tp + tls_offset()? as i64 + a;
                let v = i32::try_from(tp).map_err(|_| too_far("the thread-pointer offset"))?;
                self.write(at, &v.to_le_bytes())
            }
            elf::R_X86_64_TPOFF64 => {
                let tp = self.tls()?.block_from_tp + tls_offset()? as i64 + a;
                self.write(at, &tp.to_le_bytes())
            }
            _ => Err("the loader does not support this relocation type".into()),
        }
    }

    /// Rewrites the instruction holding a `GOTPCREL` displacement into its direct form, if it
    /// is one of the relaxable forms and `s` is in reach. Returns whether it did.
    fn relax(&mut self, target: &mut Target<'_>, rela: &Rela, s: usize) -> Result<bool, String> {
        let Some((start, len, code)) = instruction_at(target, rela.offset) else {
            return Ok(false);
        };
        // The displacement must be the instruction's last field, so that `addend == -4` makes
        // `S + A - P` the displacement from the end of the instruction.
        if rela.offset + 4 != start + len || rela.addend != -4 {
            return Ok(false);
        }
        let at = target.offset + start;
        let end = self.base + at + len;
        let bytes = &target.code[start..start + len];
        match code {
            Code::Call_rm64 if len == 6 && bytes[..2] == [0xff, 0x15] => {
                let Some(rel) = rel32(s, end) else {
                    return Ok(false);
                };
                let mut direct = vec![0x67, 0xe8]; // addr32 call rel32
                direct.extend(rel.to_le_bytes());
                self.write(at, &direct)?;
                Ok(true)
            }
            Code::Jmp_rm64 if len == 6 && bytes[..2] == [0xff, 0x25] => {
                let Some(rel) = rel32(s, end - 1) else {
                    return Ok(false);
                };
                let mut direct = vec![0xe9]; // jmp rel32; nop
                direct.extend(rel.to_le_bytes());
                direct.push(0x90);
                self.write(at, &direct)?;
                Ok(true)
            }
            Code::Mov_r64_rm64 if bytes[len - 6] == 0x8b => {
                let Some(rel) = rel32(s, end) else {
                    return Ok(false);
                };
                // mov reg, [rip + slot] -> lea reg, [rip + s]: same prefixes and ModRM.
                self.write(at + len - 6, &[0x8d])?;
                self.write(at + len - 4, &rel.to_le_bytes())?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

fn value_address(value: Option<Value>) -> usize {
    match value {
        Some(Value::Address(a)) => a,
        _ => 0,
    }
}

/// `S + A - P` as a 32-bit displacement, if it fits.
fn pc32(s: usize, a: i64, place: usize) -> Option<i32> {
    i32::try_from((s as i64).wrapping_add(a).wrapping_sub(place as i64)).ok()
}

/// The `rel32` that reaches `to` from the end of an instruction at `end`.
fn rel32(to: usize, end: usize) -> Option<i32> {
    i32::try_from((to as i64).wrapping_sub(end as i64)).ok()
}

fn out_of_reach(s: usize, place: usize) -> String {
    format!("the target {s:#x} is out of rel32 reach of {place:#x}")
}

/// The instruction of `target` that contains byte `offset`, decoded from the section's start
/// (a function section holds only instructions): its start, length, and code, if its only
/// memory operand is RIP-relative with the displacement at `offset`.
fn instruction_at(target: &mut Target<'_>, offset: usize) -> Option<(usize, usize, Code)> {
    let code = target.code;
    let starts = target.starts.get_or_insert_with(|| {
        let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
        let mut starts = Vec::new();
        while decoder.can_decode() {
            starts.push(decoder.position());
            let _ = decoder.decode();
        }
        starts
    });
    let i = starts.partition_point(|&s| s <= offset).checked_sub(1)?;
    let start = starts[i];
    let mut decoder = Decoder::with_ip(64, &code[start..], 0, DecoderOptions::NONE);
    let instruction = decoder.decode();
    if instruction.is_invalid() || instruction.memory_base() != Register::RIP {
        return None;
    }
    let offsets = decoder.get_constant_offsets(&instruction);
    if !offsets.has_displacement()
        || offsets.displacement_size() != 4
        || start + offsets.displacement_offset() != offset
    {
        return None;
    }
    Some((start, instruction.len(), instruction.code()))
}
