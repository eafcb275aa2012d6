//! Relocation-aware comparison of a rebuilt function with the code the process runs.
//!
//! A function of a relocatable object is bytes plus relocations: holes the linker fills with the
//! addresses of what the code references. The running code is the linked program (every hole
//! filled) or a patch already applied (a relocatable object again). Two versions are the same
//! when (kpatch's `rela_equal`, made to work against a linked program):
//!
//! - their bytes are equal outside the holes;
//! - each hole references the same thing: the same symbol — found in the program by its exact
//!   name, local symbols included — at the same offset; or, for anonymous data (string literals,
//!   constants, vtables), data of the same content whose own references are the same, compared
//!   recursively;
//! - the linker's rewrites are recognised, not taken for changes: a `GOTPCRELX` load relaxed to
//!   a `lea` or a direct `call`/`jmp`, an initial-exec TLS load relaxed to an immediate, a call
//!   through a PLT entry, a GOT slot filled by a dynamic relocation.
//!
//! Against the program the hole's value is decoded back into the address it designates (the
//! relocation's own type and addend say how) and that address is matched with the object's
//! target. The first difference is reported with its offset, so that DWARF can say which inlined
//! function it belongs to.

use crate::objfile::{ObjectFile, Reloc};
use crate::program::{Pointer, Program, SymbolKind};
use evolve_hot::manifest::NEW_PREFIX;
use object::elf;
use std::cell::RefCell;
use std::collections::HashMap;

/// How two versions of a function compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Identical (modulo where the linker put things).
    Same,
    /// They differ; the first difference.
    Differs(Difference),
}

/// The first difference between two versions of a function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Offset from the function's start (in the rebuilt version).
    pub offset: u64,
    /// What differs there.
    pub what: String,
}

/// The width in bytes of the hole a relocation type fills, if it is one the comparison knows.
pub fn width(r_type: u32) -> Option<u64> {
    match r_type {
        elf::R_X86_64_64 | elf::R_X86_64_PC64 | elf::R_X86_64_DTPOFF64 | elf::R_X86_64_TPOFF64 => {
            Some(8)
        }
        elf::R_X86_64_PC32
        | elf::R_X86_64_PLT32
        | elf::R_X86_64_32
        | elf::R_X86_64_32S
        | elf::R_X86_64_GOTPCREL
        | elf::R_X86_64_GOTPCRELX
        | elf::R_X86_64_REX_GOTPCRELX
        | elf::R_X86_64_TPOFF32
        | elf::R_X86_64_GOTTPOFF
        | elf::R_X86_64_TLSGD
        | elf::R_X86_64_TLSLD
        | elf::R_X86_64_DTPOFF32 => Some(4),
        _ => None,
    }
}

/// The bytes a relocation may legitimately change: its hole, and — in the linked program — the
/// instruction bytes around it that linker relaxations rewrite.
fn masked(r: &Reloc, linked: bool) -> (u64, u64) {
    let end = r.offset + width(r.r_type).unwrap_or(4);
    if !linked {
        return (r.offset, end);
    }
    match r.r_type {
        // General dynamic: `data16 lea x@tlsgd(%rip),%rdi; data16 data16 rex64 call
        // __tls_get_addr` (16 bytes) becomes an exec or initial-exec sequence.
        elf::R_X86_64_TLSGD => (r.offset.saturating_sub(4), r.offset + 12),
        // Local dynamic: `lea x@tlsld(%rip),%rdi; call __tls_get_addr` (12 or 13 bytes)
        // becomes `mov %fs:0,%rax` padded with prefixes.
        elf::R_X86_64_TLSLD => (r.offset.saturating_sub(3), r.offset + 9),
        // mov→lea, call/jmp *GOT → direct (the jmp's displacement moves one byte back and a nop
        // follows it).
        elf::R_X86_64_GOTPCRELX | elf::R_X86_64_REX_GOTPCRELX => {
            (r.offset.saturating_sub(2), end.max(r.offset + 4))
        }
        // IE→LE: REX, opcode and ModRM change.
        elf::R_X86_64_GOTTPOFF => (r.offset.saturating_sub(3), end),
        _ => (r.offset, end),
    }
}

fn read_i32(bytes: &[u8], at: usize) -> Option<i64> {
    Some(i64::from(i32::from_le_bytes(
        bytes.get(at..at + 4)?.try_into().ok()?,
    )))
}

fn read_i64(bytes: &[u8], at: usize) -> Option<i64> {
    Some(i64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// A demangled name for messages.
pub fn readable(symbol: &str) -> String {
    format!("{:#}", rustc_demangle::demangle(symbol))
}

/// Compares rebuilt functions with the program (and with applied patches), remembering the
/// anonymous data already matched.
pub struct Comparator<'p> {
    program: &'p Program,
    /// Anonymous data the rebuilt objects define for each other (promoted `anon.…` symbols):
    /// name → (object, symbol).
    anonymous: HashMap<&'p str, (&'p ObjectFile, usize)>,
    /// (object, section, program address) → equal; in progress counts as equal (cycles).
    data_memo: RefCell<HashMap<(usize, usize, u64), bool>>,
    /// (object, section, other object, other section) → equal.
    object_memo: RefCell<HashMap<(usize, usize, usize, usize), bool>>,
}

impl<'p> Comparator<'p> {
    /// A comparator against `program`.
    pub fn new(program: &'p Program) -> Comparator<'p> {
        Comparator {
            program,
            anonymous: HashMap::new(),
            data_memo: RefCell::new(HashMap::new()),
            object_memo: RefCell::new(HashMap::new()),
        }
    }

    /// A comparator that also knows the anonymous data the rebuilt `objects` define for each
    /// other: a reference to one is compared by content, wherever it is defined.
    pub fn with_rebuilt(program: &'p Program, objects: &'p [ObjectFile]) -> Comparator<'p> {
        let mut comparator = Comparator::new(program);
        for object in objects {
            for (index, symbol) in object.symbols.iter().enumerate() {
                if symbol.section.is_some()
                    && !symbol.is_local()
                    && crate::objfile::is_anonymous(&symbol.name)
                {
                    comparator
                        .anonymous
                        .insert(symbol.name.as_str(), (object, index));
                }
            }
        }
        comparator
    }

    /// Compares function `function` (a symbol of `object`) with the program's code at
    /// `address` (`size` bytes).
    pub fn with_program(
        &self,
        object: &ObjectFile,
        function: usize,
        address: u64,
        size: u64,
    ) -> Verdict {
        let symbol = &object.symbols[function];
        let Some(section) = symbol.section.map(|s| &object.sections[s]) else {
            return differs(0, "the rebuilt function has no section");
        };
        let (Some(code), Some(running)) = (
            section.bytes(symbol.value, symbol.size),
            self.program.bytes(address, size),
        ) else {
            return differs(0, "its bytes cannot be read");
        };
        let relocations = section.relocations_in(symbol.value, symbol.value + symbol.size);
        if symbol.size != size {
            // Where the code starts to differ (for DWARF to say in what), not only that.
            let offset =
                first_unmasked_difference(&code, &running, relocations, symbol.value, true)
                    .unwrap_or(symbol.size.min(size));
            return differs(
                offset,
                format!("its size changed ({size} -> {} bytes)", symbol.size),
            );
        }
        let mut first: Option<Difference> = None;
        let mut note = |offset: u64, what: String| {
            if first.as_ref().is_none_or(|d| offset < d.offset) {
                first = Some(Difference { offset, what });
            }
        };
        if let Some(offset) =
            first_unmasked_difference(&code, &running, relocations, symbol.value, true)
        {
            note(offset, "its instructions differ".into());
        }
        let mut sequence_end = 0;
        for reloc in relocations {
            let offset = reloc.offset - symbol.value;
            // The call of a TLS access sequence the linker rewrote as a whole.
            if offset < sequence_end {
                continue;
            }
            if matches!(reloc.r_type, elf::R_X86_64_TLSGD | elf::R_X86_64_TLSLD) {
                sequence_end = masked(reloc, true).1 - symbol.value;
            }
            if let Err(what) = self.hole(object, reloc, offset, &code, &running, address) {
                note(offset, what);
            }
        }
        first.map_or(Verdict::Same, Verdict::Differs)
    }

    /// Checks one hole of a function against the program: `code` and `running` are the
    /// function's bytes (rebuilt and running), `at` the hole's offset in them, `base` the
    /// function's address in the program.
    fn hole(
        &self,
        object: &ObjectFile,
        reloc: &Reloc,
        at: u64,
        code: &[u8],
        running: &[u8],
        base: u64,
    ) -> Result<(), String> {
        let place = base + at;
        let i = at as usize;
        let a = reloc.addend;
        let same_prefix = |from: usize| code.get(from..i) == running.get(from..i);
        match reloc.r_type {
            elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 => {
                let v = read_i32(running, i).ok_or("truncated")?;
                // The reference is to the hole's instruction end + displacement: the addend
                // includes that distance, which the piece of a merge section must not.
                let bias = instruction_end(code, at).map_or(4, |end| (end - at) as i64);
                self.target(
                    object,
                    reloc.symbol,
                    place.wrapping_add_signed(v - a),
                    a + bias,
                )
            }
            elf::R_X86_64_PC64 => {
                let v = read_i64(running, i).ok_or("truncated")?;
                self.target(
                    object,
                    reloc.symbol,
                    place.wrapping_add_signed(v - a),
                    a + 8,
                )
            }
            elf::R_X86_64_32 | elf::R_X86_64_32S => {
                let v = read_i32(running, i).ok_or("truncated")?;
                let v = if reloc.r_type == elf::R_X86_64_32 {
                    v as u32 as i64
                } else {
                    v
                };
                self.target(object, reloc.symbol, (v - a) as u64, a)
            }
            elf::R_X86_64_64 => match self.program.pointer(place) {
                Some(Pointer::Address(value)) => {
                    self.target(object, reloc.symbol, value.wrapping_add_signed(-a), a)
                }
                Some(Pointer::Symbol(name, addend)) => {
                    self.named(object, reloc.symbol, &name, addend - a)
                }
                _ => Err("an absolute address the program does not hold".into()),
            },
            elf::R_X86_64_GOTPCREL => {
                let v = read_i32(running, i).ok_or("truncated")?;
                self.slot(object, reloc.symbol, place.wrapping_add_signed(v - a))
            }
            elf::R_X86_64_GOTPCRELX | elf::R_X86_64_REX_GOTPCRELX => {
                let from = i.checked_sub(2).ok_or("truncated")?;
                if same_prefix(from) && code.get(i + 4..i + 4) == running.get(i + 4..i + 4) {
                    let v = read_i32(running, i).ok_or("truncated")?;
                    return self.slot(object, reloc.symbol, place.wrapping_add_signed(v - a));
                }
                let (op, modrm) = (code[from], code[from + 1]);
                let (rop, rmodrm) = (running[from], running[from + 1]);
                let target = match (op, modrm, rop, rmodrm) {
                    // mov foo@GOTPCREL(%rip), %reg → lea foo(%rip), %reg
                    (0x8b, m, 0x8d, rm) if m == rm => {
                        place.wrapping_add_signed(read_i32(running, i).ok_or("truncated")? - a)
                    }
                    // call *foo@GOTPCREL(%rip) → addr32 call foo
                    (0xff, 0x15, 0x67, 0xe8) => {
                        place.wrapping_add_signed(read_i32(running, i).ok_or("truncated")? - a)
                    }
                    // jmp *foo@GOTPCREL(%rip) → jmp foo; nop
                    (0xff, 0x25, 0xe9, _) if running.get(i + 3) == Some(&0x90) => {
                        let disp = read_i32(running, i - 1).ok_or("truncated")?;
                        (place + 3).wrapping_add_signed(disp)
                    }
                    _ => return Err("a GOT load the linker rewrote unrecognisably".into()),
                };
                self.target(object, reloc.symbol, target, 0)
            }
            elf::R_X86_64_TPOFF32 => {
                let v = read_i32(running, i).ok_or("truncated")?;
                self.thread_local(object, reloc.symbol, v - a)
            }
            elf::R_X86_64_GOTTPOFF => {
                let from = i.checked_sub(3).ok_or("truncated")?;
                let v = read_i32(running, i).ok_or("truncated")?;
                if same_prefix(from) {
                    return match self.program.pointer(place.wrapping_add_signed(v - a)) {
                        Some(Pointer::ThreadOffset(name, 0)) => {
                            self.named(object, reloc.symbol, &name, 0)
                        }
                        Some(Pointer::Address(offset)) => {
                            self.thread_local(object, reloc.symbol, offset as i64)
                        }
                        _ => Err("a TLS GOT slot the program does not fill".into()),
                    };
                }
                // mov foo@gottpoff(%rip), %reg → mov $tpoff, %reg; add → add $tpoff.
                let relaxed = matches!(
                    (code[from + 1], running[from + 1]),
                    (0x8b, 0xc7) | (0x03, 0x81) | (0x03, 0x8d)
                );
                if !relaxed {
                    return Err("a TLS access the linker rewrote unrecognisably".into());
                }
                self.thread_local(object, reloc.symbol, v - a - 4)
            }
            elf::R_X86_64_TLSGD => {
                let from = i.checked_sub(4).ok_or("truncated")?;
                let sequence = running.get(from..i + 12).ok_or("truncated")?;
                const EXEC: [u8; 9] = [0x64, 0x48, 0x8b, 0x04, 0x25, 0, 0, 0, 0];
                match sequence.split_at(9) {
                    // → mov %fs:0,%rax; lea x@tpoff(%rax),%rax
                    (fs, [0x48, 0x8d, 0x80, ..]) if fs == EXEC => {
                        let tpoff = read_i32(running, i + 8).ok_or("truncated")?;
                        self.thread_local(object, reloc.symbol, tpoff)
                    }
                    // → mov %fs:0,%rax; add x@gottpoff(%rip),%rax
                    (fs, [0x48, 0x03, 0x05, ..]) if fs == EXEC => {
                        let disp = read_i32(running, i + 8).ok_or("truncated")?;
                        let slot = (place + 12).wrapping_add_signed(disp);
                        match self.program.pointer(slot) {
                            Some(Pointer::ThreadOffset(name, 0)) => {
                                self.named(object, reloc.symbol, &name, 0)
                            }
                            Some(Pointer::Address(offset)) => {
                                self.thread_local(object, reloc.symbol, offset as i64)
                            }
                            _ => Err("a TLS GOT slot the program does not fill".into()),
                        }
                    }
                    _ => Err("a TLS access the linker rewrote unrecognisably".into()),
                }
            }
            elf::R_X86_64_TLSLD => {
                // → `mov %fs:0,%rax` behind `data16` prefixes (or nops): the module's block.
                let from = i.checked_sub(3).ok_or("truncated")?;
                // `call rel32` (e8): 12 bytes; `call *GOT(%rip)` (ff 15): 13.
                let len = if code.get(i + 4) == Some(&0xe8) {
                    12
                } else {
                    13
                };
                let sequence = running.get(from..from + len).ok_or("truncated")?;
                let start = sequence
                    .iter()
                    .position(|b| *b != 0x66 && *b != 0x90)
                    .ok_or("a TLS access the linker rewrote unrecognisably")?;
                let mov = [0x64, 0x48, 0x8b, 0x04, 0x25, 0, 0, 0, 0];
                if sequence[start..].starts_with(&mov)
                    && sequence[start + mov.len()..]
                        .iter()
                        .all(|b| *b == 0x66 || *b == 0x90)
                {
                    Ok(())
                } else {
                    Err("a TLS access the linker rewrote unrecognisably".into())
                }
            }
            // A local-dynamic offset, relaxed with its sequence: the thread-pointer offset.
            elf::R_X86_64_DTPOFF32 => {
                let v = read_i32(running, i).ok_or("truncated")?;
                self.thread_local(object, reloc.symbol, v - a)
            }
            elf::R_X86_64_DTPOFF64 => {
                let v = read_i64(running, i).ok_or("truncated")?;
                self.thread_local(object, reloc.symbol, v - a)
            }
            other => Err(format!("relocation type {other} is not handled")),
        }
    }

    /// Matches the GOT slot at `slot` with the object's target.
    fn slot(&self, object: &ObjectFile, symbol: usize, slot: u64) -> Result<(), String> {
        match self.program.pointer(slot) {
            Some(Pointer::Address(value)) => self.target(object, symbol, value, 0),
            Some(Pointer::Symbol(name, addend)) => self.named(object, symbol, &name, addend),
            _ => Err(format!(
                "a GOT slot for {} the program does not fill",
                self.describe(object, symbol)
            )),
        }
    }

    /// Matches a symbol the dynamic linker binds (`name` + `addend`) with the object's target.
    fn named(
        &self,
        object: &ObjectFile,
        symbol: usize,
        name: &str,
        addend: i64,
    ) -> Result<(), String> {
        let target = &object.symbols[symbol];
        let wanted = if target.is_section() {
            target
                .section
                .and_then(|s| object.symbol_at_start(s))
                .map(|s| object.symbols[s].name.as_str())
        } else {
            Some(target.name.as_str())
        };
        if wanted == Some(name) && addend == 0 {
            Ok(())
        } else {
            Err(format!(
                "references {} where the program references {}",
                self.describe(object, symbol),
                readable(name)
            ))
        }
    }

    /// Matches the thread-local at thread-pointer offset `tpoff` with the object's target.
    fn thread_local(&self, object: &ObjectFile, symbol: usize, tpoff: i64) -> Result<(), String> {
        let target = &object.symbols[symbol];
        let (name, extra) = match target.is_section() {
            true => match target.section.and_then(|s| object.symbol_at_start(s)) {
                Some(s) => (object.symbols[s].name.as_str(), 0),
                None => return Err("an anonymous thread-local".into()),
            },
            false => (target.name.as_str(), 0i64),
        };
        let found = self
            .program
            .definitions(name)
            .iter()
            .filter(|d| d.kind == SymbolKind::ThreadLocal)
            .any(|d| self.program.thread_offset(d.address) == Some(tpoff - extra));
        if found {
            Ok(())
        } else if self.program.defines(name) {
            Err(format!(
                "reaches thread-local {} elsewhere than the program",
                readable(name)
            ))
        } else {
            Err(format!(
                "uses thread-local {}, which the program does not have",
                readable(name)
            ))
        }
    }

    /// Matches the program address `address` with what the object's relocation targets
    /// (`symbol`'s address). `piece`: for a section symbol of a merge section, the offset of
    /// the piece referenced (the addend, plus 4 for a PC-relative hole at an instruction's end
    /// — LLVM references merge sections with section symbols only from data, where it is 0).
    fn target(
        &self,
        object: &ObjectFile,
        symbol: usize,
        address: u64,
        piece: i64,
    ) -> Result<(), String> {
        let target = &object.symbols[symbol];
        // A merge section's pieces are deduplicated and moved by the linker, their labels
        // dropped: whatever names them, they are compared by content.
        if let Some(section) = target.section {
            if object.sections[section].is_merge() {
                let offset = (target.value as i64 + piece) as u64;
                return self.data(object, section, offset, address.wrapping_add_signed(piece));
            }
        }
        let name = if target.is_section() {
            let section = target.section.ok_or("a section symbol without section")?;
            match object.symbol_at_start(section) {
                Some(s) if self.program.has_copy_at(&object.symbols[s].name, address) => {
                    return Ok(())
                }
                Some(s) if self.program.defines(&object.symbols[s].name) => {
                    object.symbols[s].name.as_str()
                }
                Some(s) if object.sections[section].is_text() => {
                    return Err(format!(
                        "calls {}, which the program does not have",
                        readable(&object.symbols[s].name)
                    ))
                }
                Some(s) if object.symbols[s].is_static() => {
                    return Err(format!(
                        "uses the static {}, which the program does not have",
                        readable(&object.symbols[s].name)
                    ))
                }
                _ => return self.data(object, section, 0, address),
            }
        } else {
            target.name.as_str()
        };
        if target.section.is_none() {
            if let Some((other, index)) = self.anonymous.get(name) {
                let defined = &other.symbols[*index];
                let section = defined.section.expect("defined");
                let offset = (defined.value as i64 + piece) as u64;
                return self.data(other, section, offset, address.wrapping_add_signed(piece));
            }
        }
        if self.program.has_copy_at(name, address) {
            return Ok(());
        }
        if self.program.defines(name) {
            if self
                .program
                .definitions(name)
                .iter()
                .any(|d| d.address == address)
            {
                return Ok(());
            }
            if let Some(Pointer::Symbol(called, _)) = self.program.plt_target(address) {
                if self.program.canonical(name) == Some(called.as_str()) || called == name {
                    return Ok(());
                }
            }
            let there = self.program.names_at(address);
            return Err(format!(
                "references {} where the program references {}",
                readable(name),
                there
                    .first()
                    .map_or_else(|| format!("{address:#x}"), |n| readable(n))
            ));
        }
        match target.section {
            None => match self.program.plt_target(address) {
                Some(Pointer::Symbol(called, _)) if called == name => Ok(()),
                _ => Err(format!(
                    "references {}, which the program does not define",
                    readable(name)
                )),
            },
            Some(section) if object.sections[section].is_text() => Err(format!(
                "calls {}, which the program does not have",
                readable(name)
            )),
            Some(_) if target.is_static() => Err(format!(
                "uses the static {}, which the program does not have",
                readable(name)
            )),
            Some(section) => self.data(object, section, target.value, address),
        }
    }

    /// Compares data: `object`'s `section` from `offset` (its start at `address - offset`; a
    /// merge section's one piece) with the program's bytes at `address`, holes recursively.
    pub fn data_at(
        &self,
        object: &ObjectFile,
        section: usize,
        offset: u64,
        address: u64,
    ) -> Result<(), String> {
        self.data(object, section, offset, address)
    }

    fn data(
        &self,
        object: &ObjectFile,
        section: usize,
        offset: u64,
        address: u64,
    ) -> Result<(), String> {
        let sec = &object.sections[section];
        if sec.is_merge() {
            // The piece holding `offset` (a string to its NUL, or one entry), compared whole;
            // the reference may point inside it.
            let (piece, len) = if sec.is_strings() {
                let before = sec
                    .data
                    .get(..offset as usize)
                    .ok_or("outside its section")?;
                let start = before.iter().rposition(|b| *b == 0).map_or(0, |n| n + 1);
                let rest = &sec.data[start..];
                let len = rest
                    .iter()
                    .position(|b| *b == 0)
                    .map_or(rest.len(), |n| n + 1);
                (start as u64, len as u64)
            } else {
                let entry = sec.entsize.max(1);
                (offset / entry * entry, entry)
            };
            let ours = sec.bytes(piece, len).ok_or("outside its section")?;
            let theirs = self
                .program
                .bytes(address.wrapping_sub(offset - piece), len);
            return if theirs.as_deref() == Some(&ours[..]) {
                Ok(())
            } else {
                Err(format!("a constant of {} differs", sec.name))
            };
        }
        let start = address.wrapping_sub(offset);
        let key = (object as *const ObjectFile as usize, section, start);
        if let Some(known) = self.data_memo.borrow().get(&key) {
            return if *known {
                Ok(())
            } else {
                Err(format!("a constant of {} differs", sec.name))
            };
        }
        self.data_memo.borrow_mut().insert(key, true);
        let result = self.data_uncached(object, section, start);
        self.data_memo.borrow_mut().insert(key, result.is_ok());
        result
    }

    fn data_uncached(&self, object: &ObjectFile, section: usize, start: u64) -> Result<(), String> {
        let sec = &object.sections[section];
        let differs = || format!("the constant {} differs", sec.name);
        let ours = sec.bytes(0, sec.size).ok_or_else(differs)?;
        let theirs = self.program.bytes(start, sec.size).ok_or_else(differs)?;
        if first_unmasked_difference(&ours, &theirs, &sec.relocations, 0, true).is_some() {
            return Err(differs());
        }
        for reloc in &sec.relocations {
            let place = start + reloc.offset;
            let i = reloc.offset as usize;
            let result = match reloc.r_type {
                elf::R_X86_64_64 => match self.program.pointer(place) {
                    Some(Pointer::Address(value)) => self.target(
                        object,
                        reloc.symbol,
                        value.wrapping_add_signed(-reloc.addend),
                        reloc.addend,
                    ),
                    Some(Pointer::Symbol(name, addend)) => {
                        self.named(object, reloc.symbol, &name, addend - reloc.addend)
                    }
                    _ => Err(differs()),
                },
                elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 => {
                    let v = read_i32(&theirs, i).ok_or_else(differs)?;
                    self.target(
                        object,
                        reloc.symbol,
                        place.wrapping_add_signed(v - reloc.addend),
                        reloc.addend,
                    )
                }
                elf::R_X86_64_PC64 => {
                    let v = read_i64(&theirs, i).ok_or_else(differs)?;
                    self.target(
                        object,
                        reloc.symbol,
                        place.wrapping_add_signed(v - reloc.addend),
                        reloc.addend,
                    )
                }
                _ => Err(format!(
                    "{} holds a relocation of type {}",
                    sec.name, reloc.r_type
                )),
            };
            result.map_err(|e| format!("{}: {e}", sec.name))?;
        }
        Ok(())
    }

    /// Compares function `function` of `object` with function `other_function` of `other` (a
    /// patch already applied: its replacements are named `__evolve_new__<symbol>`, and every
    /// reference it makes is by the program's names).
    pub fn with_object(
        &self,
        object: &ObjectFile,
        function: usize,
        other: &ObjectFile,
        other_function: usize,
    ) -> Verdict {
        let (a, b) = (&object.symbols[function], &other.symbols[other_function]);
        let (Some(sa), Some(sb)) = (a.section, b.section) else {
            return differs(0, "no section");
        };
        let (sa, sb) = (&object.sections[sa], &other.sections[sb]);
        let (Some(ca), Some(cb)) = (sa.bytes(a.value, a.size), sb.bytes(b.value, b.size)) else {
            return differs(0, "its bytes cannot be read");
        };
        let ra = sa.relocations_in(a.value, a.value + a.size);
        if a.size != b.size {
            let offset = first_unmasked_difference(&ca, &cb, ra, a.value, false)
                .unwrap_or(a.size.min(b.size));
            return differs(
                offset,
                format!("its size changed ({} -> {} bytes)", b.size, a.size),
            );
        }
        let rb = sb.relocations_in(b.value, b.value + b.size);
        let mut first: Option<Difference> = None;
        let mut note = |offset: u64, what: String| {
            if first.as_ref().is_none_or(|d| offset < d.offset) {
                first = Some(Difference { offset, what });
            }
        };
        if let Some(offset) = first_unmasked_difference(&ca, &cb, ra, a.value, false) {
            note(offset, "its instructions differ".into());
        }
        let mut rb_iter = rb.iter().peekable();
        for r in ra {
            let offset = r.offset - a.value;
            match rb_iter.next() {
                Some(q) if q.offset - b.value == offset && q.r_type == r.r_type => {
                    if !self.same_target(object, r, other, q) {
                        note(
                            offset,
                            format!(
                                "references {} where the running version references {}",
                                self.describe(object, r.symbol),
                                self.describe(other, q.symbol)
                            ),
                        );
                    }
                }
                _ => {
                    note(offset, "its references differ".into());
                    break;
                }
            }
        }
        if ra.len() != rb.len() {
            note(
                ra.last().map_or(0, |r| r.offset - a.value),
                "its references differ".into(),
            );
        }
        first.map_or(Verdict::Same, Verdict::Differs)
    }

    /// Whether two relocations (of two objects) reference the same thing.
    fn same_target(&self, a: &ObjectFile, ra: &Reloc, b: &ObjectFile, rb: &Reloc) -> bool {
        match (
            self.target_of(a, ra.symbol, ra.addend),
            self.target_of(b, rb.symbol, rb.addend),
        ) {
            (Target::Named(x, ox), Target::Named(y, oy)) => x == y && ox == oy,
            (Target::Data(sx, ox), Target::Data(sy, oy)) => {
                ox == oy && self.same_data(a, sx, b, sy)
            }
            _ => false,
        }
    }

    fn same_data(&self, a: &ObjectFile, sa: usize, b: &ObjectFile, sb: usize) -> bool {
        let key = (
            a as *const ObjectFile as usize,
            sa,
            b as *const ObjectFile as usize,
            sb,
        );
        if let Some(known) = self.object_memo.borrow().get(&key) {
            return *known;
        }
        self.object_memo.borrow_mut().insert(key, true);
        let (x, y) = (&a.sections[sa], &b.sections[sb]);
        let same = x.size == y.size
            && x.bytes(0, x.size).is_some_and(|bx| {
                y.bytes(0, y.size).is_some_and(|by| {
                    first_unmasked_difference(&bx, &by, &x.relocations, 0, false).is_none()
                })
            })
            && x.relocations.len() == y.relocations.len()
            && x.relocations.iter().zip(&y.relocations).all(|(p, q)| {
                p.offset == q.offset && p.r_type == q.r_type && self.same_target(a, p, b, q)
            });
        self.object_memo.borrow_mut().insert(key, same);
        same
    }

    /// What `symbol` + `addend` of `object` designates: a name when the symbol is a function,
    /// a global, or something the program defines; else anonymous data, by section and offset.
    fn target_of(&self, object: &ObjectFile, symbol: usize, addend: i64) -> Target {
        let program_name = |name: &str| name.strip_prefix(NEW_PREFIX).unwrap_or(name).to_string();
        let named = |index: usize| {
            let s = &object.symbols[index];
            let name = program_name(&s.name);
            (s.is_function() || s.is_static() || !s.is_local() || self.program.defines(&name))
                .then_some(name)
        };
        let s = &object.symbols[symbol];
        let Some(section) = s.section else {
            return Target::Named(program_name(&s.name), addend);
        };
        if s.is_section() {
            return match object.symbol_at_start(section).and_then(named) {
                Some(name) => Target::Named(name, addend),
                None => Target::Data(section, addend),
            };
        }
        match named(symbol) {
            Some(name) => Target::Named(name, addend),
            None => Target::Data(section, s.value as i64 + addend),
        }
    }

    fn describe(&self, object: &ObjectFile, symbol: usize) -> String {
        match self.target_of(object, symbol, 0) {
            Target::Named(name, _) => readable(&name),
            Target::Data(section, _) => format!("a constant ({})", object.sections[section].name),
        }
    }
}

/// What a relocation designates, independent of where each object placed things.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// A named function or static (the program's name: a patch's `__evolve_new__` prefix is
    /// dropped), at an offset.
    Named(String, i64),
    /// Anonymous data: a section of the object, at an offset.
    Data(usize, i64),
}

/// The end of the instruction of `code` (a function's bytes) that covers `offset`.
fn instruction_end(code: &[u8], offset: u64) -> Option<u64> {
    let mut decoder = iced_x86::Decoder::new(64, code, iced_x86::DecoderOptions::NONE);
    let mut instruction = iced_x86::Instruction::default();
    while decoder.can_decode() {
        let start = decoder.position() as u64;
        decoder.decode_out(&mut instruction);
        let end = decoder.position() as u64;
        if start <= offset && offset < end {
            return Some(end);
        }
    }
    None
}

/// The first offset (relative to `start`) where `a` and `b` differ outside the bytes the
/// relocations may change (`linked`: `b` is the linked program's code).
fn first_unmasked_difference(
    a: &[u8],
    b: &[u8],
    relocations: &[Reloc],
    start: u64,
    linked: bool,
) -> Option<u64> {
    let mut masked_until = 0u64;
    let mut holes = relocations
        .iter()
        .map(|r| {
            let (from, to) = masked(r, linked);
            (from.saturating_sub(start), to.saturating_sub(start))
        })
        .peekable();
    for i in 0..a.len().min(b.len()) as u64 {
        while let Some(&(from, to)) = holes.peek() {
            if from <= i {
                masked_until = masked_until.max(to);
                holes.next();
            } else {
                break;
            }
        }
        if i < masked_until {
            continue;
        }
        if a[i as usize] != b[i as usize] {
            return Some(i);
        }
    }
    (a.len() != b.len()).then_some(a.len().min(b.len()) as u64)
}

fn differs(offset: u64, what: impl Into<String>) -> Verdict {
    Verdict::Differs(Difference {
        offset,
        what: what.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::program::SymbolKind::{Data, Function};
    use object::write;

    const BASE: u64 = 0x1000;

    /// An object with one function `f` (`code`, relocations against the symbols named in
    /// `relocs`: `(offset, type, name, addend)`; names starting with `.rodata` are anonymous
    /// constants holding `constant`).
    fn object(code: &[u8], relocs: &[(u64, u32, &str, i64)], constant: &[u8]) -> ObjectFile {
        let mut obj = write::Object::new(
            object::BinaryFormat::Elf,
            object::Architecture::X86_64,
            object::Endianness::Little,
        );
        let text = obj.add_section(Vec::new(), b".text.f".to_vec(), write::SectionKind::Text);
        obj.set_section_data(text, code.to_vec(), 16);
        obj.add_symbol(write::Symbol {
            name: b"f".to_vec(),
            value: 0,
            size: code.len() as u64,
            kind: object::SymbolKind::Text,
            scope: write::SymbolScope::Linkage,
            weak: false,
            section: write::SymbolSection::Section(text),
            flags: object::SymbolFlags::None,
        });
        let rodata = obj.add_section(
            Vec::new(),
            b".rodata..Lanon.1".to_vec(),
            write::SectionKind::ReadOnlyData,
        );
        obj.set_section_data(rodata, constant.to_vec(), 1);
        for (offset, r_type, name, addend) in relocs {
            let symbol = if name.starts_with(".rodata") {
                obj.section_symbol(rodata)
            } else {
                obj.symbol_id(name.as_bytes()).unwrap_or_else(|| {
                    obj.add_symbol(write::Symbol {
                        name: name.as_bytes().to_vec(),
                        value: 0,
                        size: 0,
                        kind: object::SymbolKind::Text,
                        scope: write::SymbolScope::Linkage,
                        weak: false,
                        section: write::SymbolSection::Undefined,
                        flags: object::SymbolFlags::None,
                    })
                })
            };
            obj.add_relocation(
                text,
                write::Relocation {
                    offset: *offset,
                    symbol,
                    addend: *addend,
                    flags: object::RelocationFlags::Elf { r_type: *r_type },
                },
            )
            .unwrap();
        }
        let bytes = obj.write().unwrap();
        ObjectFile::parse(&bytes, "test.o", "test").unwrap()
    }

    fn function(object: &ObjectFile) -> usize {
        object.defined("f").unwrap()
    }

    /// `call g` (e8 + rel32) then `ret`.
    fn call_code() -> Vec<u8> {
        vec![0xe8, 0, 0, 0, 0, 0xc3]
    }

    /// The program: `f` at BASE (its `call` reaching `g_at`), `g` at 0x1800, `h` at 0x1900.
    fn program_calling(g_at: u64) -> Program {
        let mut text = vec![0xcc; 0x1000];
        text[..6].copy_from_slice(&call_code());
        let rel = g_at as i64 - (BASE as i64 + 5);
        text[1..5].copy_from_slice(&(rel as i32).to_le_bytes());
        Program::from_parts(
            BASE,
            text,
            &[
                ("f", BASE, 6, Function),
                ("g", 0x1800, 16, Function),
                ("h", 0x1900, 16, Function),
            ],
            &[],
        )
    }

    #[test]
    fn a_call_to_the_same_function_is_the_same() {
        let obj = object(&call_code(), &[(1, elf::R_X86_64_PLT32, "g", -4)], &[]);
        let program = program_calling(0x1800);
        let comparator = Comparator::new(&program);
        assert_eq!(
            comparator.with_program(&obj, function(&obj), BASE, 6),
            Verdict::Same
        );
    }

    /// Drop glue the program has in two promoted copies (two codegen units), the rebuild under a
    /// third unit hash: a call to either copy is the same call; a call to another instance
    /// (another rustc hash) is not.
    #[test]
    fn a_call_to_any_promoted_copy_of_the_same_instance_is_the_same() {
        const GLUE: &str = "_ZN4core3ptr13drop_in_place17h0123456789abcdefE";
        const OTHER: &str = "_ZN4core3ptr13drop_in_place17hfedcba9876543210E";
        let (copy1, copy2) = (format!("{GLUE}.llvm.111"), format!("{GLUE}.llvm.222"));
        let rebuilt = format!("{GLUE}.llvm.333");
        let program_calling_glue = |at: u64| {
            let mut text = vec![0xcc; 0x1000];
            text[..6].copy_from_slice(&call_code());
            let rel = at as i64 - (BASE as i64 + 5);
            text[1..5].copy_from_slice(&(rel as i32).to_le_bytes());
            Program::from_parts(
                BASE,
                text,
                &[
                    ("f", BASE, 6, Function),
                    (&copy1, 0x1800, 16, Function),
                    (&copy2, 0x1900, 16, Function),
                    (&format!("{OTHER}.llvm.111"), 0x1a00, 16, Function),
                ],
                &[],
            )
        };
        let obj = object(&call_code(), &[(1, elf::R_X86_64_PLT32, &rebuilt, -4)], &[]);
        for at in [0x1800, 0x1900] {
            let program = program_calling_glue(at);
            assert_eq!(
                Comparator::new(&program).with_program(&obj, function(&obj), BASE, 6),
                Verdict::Same,
                "copy at {at:#x}"
            );
        }
        let program = program_calling_glue(0x1a00);
        assert!(matches!(
            Comparator::new(&program).with_program(&obj, function(&obj), BASE, 6),
            Verdict::Differs(_)
        ));
    }

    #[test]
    fn a_call_to_another_function_differs_at_its_hole() {
        let obj = object(&call_code(), &[(1, elf::R_X86_64_PLT32, "g", -4)], &[]);
        let program = program_calling(0x1900);
        let comparator = Comparator::new(&program);
        let Verdict::Differs(d) = comparator.with_program(&obj, function(&obj), BASE, 6) else {
            panic!("a call to h taken for a call to g");
        };
        assert_eq!(d.offset, 1);
        assert!(
            d.what
                .contains("references g where the program references h"),
            "{d:?}"
        );
    }

    #[test]
    fn changed_instruction_bytes_differ_at_their_offset() {
        let mut code = call_code();
        code.push(0x90);
        code[5] = 0x90; // nop; ret instead of ret; int3
        code[6] = 0xc3;
        let obj = object(&code, &[(1, elf::R_X86_64_PLT32, "g", -4)], &[]);
        let program = program_calling(0x1800);
        let comparator = Comparator::new(&program);
        let Verdict::Differs(d) = comparator.with_program(&obj, function(&obj), BASE, 7) else {
            panic!("changed bytes taken for the same");
        };
        assert_eq!(d.offset, 5);
    }

    #[test]
    fn a_different_size_differs() {
        let obj = object(&call_code(), &[(1, elf::R_X86_64_PLT32, "g", -4)], &[]);
        let program = program_calling(0x1800);
        let comparator = Comparator::new(&program);
        assert!(matches!(
            comparator.with_program(&obj, function(&obj), BASE, 7),
            Verdict::Differs(_)
        ));
    }

    /// `mov g@GOTPCREL(%rip), %rax` relaxed by the linker into `lea g(%rip), %rax`.
    #[test]
    fn a_relaxed_got_load_is_the_same() {
        let code = [0x48, 0x8b, 0x05, 0, 0, 0, 0, 0xc3];
        let obj = object(&code, &[(3, elf::R_X86_64_REX_GOTPCRELX, "g", -4)], &[]);
        let mut text = vec![0xcc; 0x1000];
        text[..8].copy_from_slice(&[0x48, 0x8d, 0x05, 0, 0, 0, 0, 0xc3]);
        let rel = 0x1800 - (BASE as i64 + 7);
        text[3..7].copy_from_slice(&(rel as i32).to_le_bytes());
        let program = Program::from_parts(
            BASE,
            text.clone(),
            &[("f", BASE, 8, Function), ("g", 0x1800, 8, Function)],
            &[],
        );
        let comparator = Comparator::new(&program);
        assert_eq!(
            comparator.with_program(&obj, function(&obj), BASE, 8),
            Verdict::Same
        );
        // The same relaxation reaching another function differs.
        let program = Program::from_parts(
            BASE,
            text,
            &[("f", BASE, 8, Function), ("g", 0x1900, 8, Function)],
            &[],
        );
        assert!(matches!(
            Comparator::new(&program).with_program(&obj, function(&obj), BASE, 8),
            Verdict::Differs(_)
        ));
    }

    /// `call *g@GOTPCREL(%rip)` left as is: the slot holds g's address through a `RELATIVE`
    /// dynamic relocation.
    #[test]
    fn a_got_slot_filled_by_a_dynamic_relocation_is_followed() {
        let code = [0xff, 0x15, 0, 0, 0, 0, 0xc3];
        let obj = object(&code, &[(2, elf::R_X86_64_GOTPCREL, "g", -4)], &[]);
        let mut text = vec![0; 0x1000];
        text[..7].copy_from_slice(&code);
        let slot = BASE + 0x800;
        let rel = slot as i64 - (BASE as i64 + 6);
        text[2..6].copy_from_slice(&(rel as i32).to_le_bytes());
        let parts = |g: u64| {
            Program::from_parts(
                BASE,
                text.clone(),
                &[("f", BASE, 7, Function), ("g", g, 8, Function)],
                &[(slot, Pointer::Address(0x1900))],
            )
        };
        let program = parts(0x1900);
        assert_eq!(
            Comparator::new(&program).with_program(&obj, function(&obj), BASE, 7),
            Verdict::Same
        );
        let program = parts(0x1a00);
        assert!(matches!(
            Comparator::new(&program).with_program(&obj, function(&obj), BASE, 7),
            Verdict::Differs(_)
        ));
    }

    /// `lea .Lanon(%rip), %rdi`: anonymous constants are compared by content, wherever the
    /// linker put them.
    #[test]
    fn anonymous_constants_are_compared_by_content() {
        let code = [0x48, 0x8d, 0x3d, 0, 0, 0, 0, 0xc3];
        let obj = object(&code, &[(3, elf::R_X86_64_PC32, ".rodata", -4)], b"hello");
        let program_with = |constant: &[u8]| {
            let mut text = vec![0; 0x1000];
            text[..8].copy_from_slice(&code);
            let at = BASE + 0x700;
            let rel = at as i64 - (BASE as i64 + 7);
            text[3..7].copy_from_slice(&(rel as i32).to_le_bytes());
            text[0x700..0x700 + constant.len()].copy_from_slice(constant);
            Program::from_parts(BASE, text, &[("f", BASE, 8, Function)], &[])
        };
        let program = program_with(b"hello");
        assert_eq!(
            Comparator::new(&program).with_program(&obj, function(&obj), BASE, 8),
            Verdict::Same
        );
        let program = program_with(b"hellO");
        let Verdict::Differs(d) =
            Comparator::new(&program).with_program(&obj, function(&obj), BASE, 8)
        else {
            panic!("a changed string literal taken for the same");
        };
        assert!(d.what.contains("differs"), "{d:?}");
    }

    /// A patch's replacement is named `__evolve_new__f` and references the program's names: it
    /// is the same as the rebuilt `f` when code and references are.
    #[test]
    fn a_function_is_compared_with_an_applied_patch_by_names() {
        let rebuilt = object(&call_code(), &[(1, elf::R_X86_64_PLT32, "g", -4)], &[]);
        let patch_calling = |callee: &str| {
            let mut patch = write::Object::new(
                object::BinaryFormat::Elf,
                object::Architecture::X86_64,
                object::Endianness::Little,
            );
            let text = patch.add_section(Vec::new(), b".text.x".to_vec(), write::SectionKind::Text);
            patch.set_section_data(text, call_code(), 16);
            patch.add_symbol(write::Symbol {
                name: format!("{NEW_PREFIX}f").into_bytes(),
                value: 0,
                size: 6,
                kind: object::SymbolKind::Text,
                scope: write::SymbolScope::Linkage,
                weak: false,
                section: write::SymbolSection::Section(text),
                flags: object::SymbolFlags::None,
            });
            let g = patch.add_symbol(write::Symbol {
                name: callee.as_bytes().to_vec(),
                value: 0,
                size: 0,
                kind: object::SymbolKind::Text,
                scope: write::SymbolScope::Linkage,
                weak: false,
                section: write::SymbolSection::Undefined,
                flags: object::SymbolFlags::None,
            });
            patch
                .add_relocation(
                    text,
                    write::Relocation {
                        offset: 1,
                        symbol: g,
                        addend: -4,
                        flags: object::RelocationFlags::Elf {
                            r_type: elf::R_X86_64_PLT32,
                        },
                    },
                )
                .unwrap();
            ObjectFile::parse(&patch.write().unwrap(), "p.o", "p").unwrap()
        };
        let program = program_calling(0x1800);
        for callee in ["g", "h"] {
            let patch = patch_calling(callee);
            let verdict = Comparator::new(&program).with_object(
                &rebuilt,
                function(&rebuilt),
                &patch,
                patch.defined(&format!("{NEW_PREFIX}f")).unwrap(),
            );
            assert_eq!(
                verdict == Verdict::Same,
                callee == "g",
                "{callee}: {verdict:?}"
            );
        }
    }

    /// A local-dynamic TLS access (`lea x@tlsld(%rip),%rdi; call __tls_get_addr; mov
    /// x@dtpoff(%rax),%rax`) as the linker rewrites it in an executable: `mov %fs:0,%rax`
    /// behind `data16` prefixes, and the thread-pointer offset in the load.
    #[test]
    fn a_relaxed_local_dynamic_tls_access_is_the_same() {
        let mut code = vec![0x48, 0x8d, 0x3d, 0, 0, 0, 0, 0xe8, 0, 0, 0, 0];
        code.extend_from_slice(&[0x48, 0x8b, 0x80, 0, 0, 0, 0, 0xc3]);
        let obj = object(
            &code,
            &[
                (3, elf::R_X86_64_TLSLD, "x", -4),
                (8, elf::R_X86_64_PLT32, "__tls_get_addr", -4),
                (15, elf::R_X86_64_DTPOFF32, "x", 0),
            ],
            &[],
        );
        let linked = |tpoff: i32| {
            let mut text = vec![0x66, 0x66, 0x66, 0x64, 0x48, 0x8b, 0x04, 0x25, 0, 0, 0, 0];
            text.extend_from_slice(&[0x48, 0x8b, 0x80]);
            text.extend_from_slice(&tpoff.to_le_bytes());
            text.push(0xc3);
            text.resize(0x100, 0xcc);
            // The TLS block is 0x100 bytes: x at offset 0x10 is at -0xf0 from the thread pointer.
            Program::from_parts(
                BASE,
                text,
                &[
                    ("f", BASE, 20, Function),
                    ("x", 0x10, 8, crate::program::SymbolKind::ThreadLocal),
                ],
                &[],
            )
        };
        let program = linked(-0xf0);
        assert_eq!(
            Comparator::new(&program).with_program(&obj, function(&obj), BASE, 20),
            Verdict::Same
        );
        let program = linked(-0xe8);
        let Verdict::Differs(d) =
            Comparator::new(&program).with_program(&obj, function(&obj), BASE, 20)
        else {
            panic!("another thread-local taken for x");
        };
        assert_eq!(d.offset, 15);
    }

    #[test]
    fn holes_mask_only_their_bytes() {
        let r = Reloc {
            offset: 4,
            r_type: elf::R_X86_64_PC32,
            symbol: 0,
            addend: -4,
        };
        let a = [1, 2, 3, 4, 9, 9, 9, 9, 5];
        let mut b = [1, 2, 3, 4, 0, 0, 0, 0, 5];
        assert_eq!(first_unmasked_difference(&a, &b, &[r], 0, true), None);
        b[8] = 6;
        assert_eq!(first_unmasked_difference(&a, &b, &[r], 0, true), Some(8));
        b[3] = 0;
        assert_eq!(first_unmasked_difference(&a, &b, &[r], 0, true), Some(3));
        let _ = Data;
    }
}
