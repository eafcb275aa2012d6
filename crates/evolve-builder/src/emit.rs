//! The patch object (format 2): an x86-64 `ET_REL` holding only what the patch carries.
//!
//! - The carried functions' sections; a replacement of the program's `F` is defined as
//!   `__evolve_new__F`, a new function under its own name.
//! - The data they need that the program does not have: anonymous constants (string literals,
//!   vtables, jump tables), new statics (under their names, listed in the manifest), copies of
//!   read-only statics whose contents changed. Their own references are resolved the same way.
//! - Everything else is an undefined symbol bound to the program by name — its functions
//!   (local ones included), its statics (one of every static), a replaced function `F` itself
//!   (references to `F` reach its newest version through `F`'s entry).
//! - `.eh_frame` with the FDEs of the carried functions only (and their CIEs and LSDAs), closed
//!   by a zero terminator, so the loader can register it as is.
//! - `.evolve.manifest`: the manifest JSON, its `sha256` covering the whole file with the
//!   section's contents taken as zeros.

use crate::compare::readable;
use crate::diff::{Carried, Diff};
use crate::error::{Error, ErrorKind, Result};
use crate::objfile::{ObjectFile, Reloc, Section};
use crate::program::Program;
use evolve_hot::manifest::{NewStatic, ObjectManifest, NEW_PREFIX, OBJECT_MANIFEST_SECTION};
use object::elf;
use object::write::{self, SectionId, SymbolId};
use std::collections::{HashMap, HashSet};

/// The relocation types the loader applies (see `docs/hot-update.md`).
pub const SUPPORTED_RELOCATIONS: [u32; 15] = [
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
    elf::R_X86_64_GOTTPOFF,
    elf::R_X86_64_TPOFF32,
];

/// A patch object being assembled.
pub struct PatchObject {
    out: write::Object<'static>,
    /// The statics the patch defines.
    pub new_statics: Vec<NewStatic>,
    /// Every named static the patch references or defines, with its size in the rebuild.
    pub statics: Vec<(String, u64)>,
}

struct Builder<'a> {
    objects: &'a [ObjectFile],
    program: &'a Program,
    diff: &'a Diff,
    out: write::Object<'static>,
    /// (object, section) → copy.
    sections: HashMap<(usize, usize), SectionId>,
    /// Copies whose relocations are still to resolve.
    pending: Vec<(usize, usize)>,
    undefined: HashMap<String, SymbolId>,
    defined: HashMap<String, SymbolId>,
    /// Carried functions: (object, symbol) → replaced (true) or added.
    carried: HashMap<(usize, usize), bool>,
    /// Names of carried added functions → where.
    added: HashMap<String, (usize, usize)>,
    new_statics: Vec<NewStatic>,
    new_tls: Vec<String>,
    statics: HashMap<String, u64>,
    /// Anonymous data the objects define for each other: name → (object, symbol).
    anonymous: HashMap<String, (usize, usize)>,
}

/// Assembles the patch object of `diff` (see the module docs).
pub fn assemble(objects: &[ObjectFile], program: &Program, diff: &Diff) -> Result<PatchObject> {
    let mut builder = Builder {
        objects,
        program,
        diff,
        out: write::Object::new(
            object::BinaryFormat::Elf,
            object::Architecture::X86_64,
            object::Endianness::Little,
        ),
        sections: HashMap::new(),
        pending: Vec::new(),
        undefined: HashMap::new(),
        defined: HashMap::new(),
        carried: diff
            .carried
            .iter()
            .map(|c| (c.function, c.replaces.is_some()))
            .collect(),
        added: diff
            .carried
            .iter()
            .filter(|c| c.replaces.is_none())
            .map(|c| (c.symbol.clone(), c.function))
            .collect(),
        new_statics: Vec::new(),
        new_tls: Vec::new(),
        statics: HashMap::new(),
        anonymous: objects
            .iter()
            .enumerate()
            .flat_map(|(o, object)| {
                object
                    .symbols
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| {
                        s.section.is_some()
                            && !s.is_local()
                            && crate::objfile::is_anonymous(&s.name)
                    })
                    .map(move |(i, s)| (s.name.clone(), (o, i)))
            })
            .collect(),
    };
    // The source file of C code (its `STT_FILE`): the loader binds the patch's references to
    // the `static`s of that file when the program has several of one name.
    let files: std::collections::BTreeSet<&str> = diff
        .carried
        .iter()
        .filter_map(|c| objects[c.function.0].source_file.as_deref())
        .collect();
    if let Some(file) = files.first().filter(|_| files.len() == 1) {
        builder.out.add_file_symbol(file.as_bytes().to_vec());
    }
    for carried in &diff.carried {
        builder.function(carried)?;
    }
    while let Some((o, s)) = builder.pending.pop() {
        builder.relocate(o, s)?;
    }
    builder.eh_frame()?;
    if !builder.new_tls.is_empty() {
        builder.new_tls.sort();
        builder.new_tls.dedup();
        return Err(Error::new(ErrorKind::NewThreadLocal {
            symbols: builder.new_tls.iter().map(|s| readable(s)).collect(),
        }));
    }
    let mut statics: Vec<(String, u64)> = builder.statics.into_iter().collect();
    statics.sort();
    Ok(PatchObject {
        out: builder.out,
        new_statics: builder.new_statics,
        statics,
    })
}

impl PatchObject {
    /// Adds the manifest and returns the file's bytes, its digest written in.
    pub fn finish(mut self, manifest: &mut ObjectManifest) -> Result<Vec<u8>> {
        manifest.sha256 = "0".repeat(64);
        let json = serde_json::to_vec(manifest).expect("a manifest serializes");
        let section = self.out.add_section(
            Vec::new(),
            OBJECT_MANIFEST_SECTION.as_bytes().to_vec(),
            write::SectionKind::Other,
        );
        self.out.set_section_data(section, json, 1);
        self.out.section_mut(section).flags = write::SectionFlags::Elf { sh_flags: 0 };
        let mut bytes = self
            .out
            .write()
            .map_err(|e| Error::object("the patch object", e))?;
        let range = manifest_range(&bytes)?;
        let mut zeroed = bytes.clone();
        zeroed[range.clone()].fill(0);
        let digest = crate::diff::sha256_hex(&zeroed);
        let placeholder = format!("\"sha256\":\"{}\"", "0".repeat(64));
        let text = &bytes[range.clone()];
        let at = text
            .windows(placeholder.len())
            .position(|w| w == placeholder.as_bytes())
            .ok_or_else(|| Error::object("the patch object", "no digest placeholder"))?;
        let digits = range.start + at + "\"sha256\":\"".len();
        bytes[digits..digits + 64].copy_from_slice(digest.as_bytes());
        manifest.sha256 = digest;
        Ok(bytes)
    }
}

/// The file range of the manifest section's contents.
pub fn manifest_range(bytes: &[u8]) -> Result<std::ops::Range<usize>> {
    use object::{Object, ObjectSection};
    let file = object::File::parse(bytes).map_err(|e| Error::object("the patch object", e))?;
    let section = file
        .section_by_name(OBJECT_MANIFEST_SECTION)
        .ok_or_else(|| Error::object("the patch object", "no manifest section"))?;
    let (start, len) = section
        .file_range()
        .ok_or_else(|| Error::object("the patch object", "an empty manifest section"))?;
    Ok(start as usize..(start + len) as usize)
}

fn symbol_kind(st_type: u8) -> object::SymbolKind {
    match st_type {
        elf::STT_FUNC | elf::STT_GNU_IFUNC => object::SymbolKind::Text,
        elf::STT_OBJECT => object::SymbolKind::Data,
        elf::STT_TLS => object::SymbolKind::Tls,
        _ => object::SymbolKind::Unknown,
    }
}

impl Builder<'_> {
    /// Copies a carried function's section and defines its symbol.
    fn function(&mut self, carried: &Carried) -> Result<()> {
        let (o, f) = carried.function;
        let symbol = &self.objects[o].symbols[f];
        let section = symbol.section.expect("carried functions are defined");
        let copy = self.copy(o, section);
        let name = match carried.replaces {
            Some(_) => format!("{NEW_PREFIX}{}", carried.symbol),
            None => symbol.name.clone(),
        };
        if self.defined.contains_key(&name) {
            return Ok(());
        }
        let id = self.out.add_symbol(write::Symbol {
            name: name.clone().into_bytes(),
            value: symbol.value,
            size: symbol.size,
            kind: object::SymbolKind::Text,
            scope: write::SymbolScope::Dynamic,
            weak: false,
            section: write::SymbolSection::Section(copy),
            flags: object::SymbolFlags::None,
        });
        self.defined.insert(name, id);
        Ok(())
    }

    /// The copy of `(o, section)`, made on first use.
    fn copy(&mut self, o: usize, section: usize) -> SectionId {
        if let Some(id) = self.sections.get(&(o, section)) {
            return *id;
        }
        let sec: &Section = &self.objects[o].sections[section];
        let kind = if sec.is_text() {
            write::SectionKind::Text
        } else if sec.is_tls() {
            write::SectionKind::Tls
        } else if sec.sh_type == elf::SHT_NOBITS {
            write::SectionKind::UninitializedData
        } else if sec.is_writable() {
            write::SectionKind::Data
        } else {
            write::SectionKind::ReadOnlyData
        };
        // Sections of different objects may share a name (`.rodata..Lanon…`): the copy's name
        // says where it came from.
        let name = format!("{}.o{o}", sec.name);
        let id = self.out.add_section(Vec::new(), name.into_bytes(), kind);
        if sec.sh_type == elf::SHT_NOBITS {
            self.out.append_section_bss(id, sec.size, sec.align.max(1));
        } else {
            self.out
                .set_section_data(id, sec.data.clone(), sec.align.max(1));
        }
        // Merge sections lose SHF_MERGE: the loader places them as they are.
        let mut flags = u64::from(elf::SHF_ALLOC);
        if sec.is_text() {
            flags |= u64::from(elf::SHF_EXECINSTR);
        }
        if sec.is_writable() {
            flags |= u64::from(elf::SHF_WRITE);
        }
        if sec.is_tls() {
            flags |= u64::from(elf::SHF_TLS);
        }
        self.out.section_mut(id).flags = write::SectionFlags::Elf { sh_flags: flags };
        self.sections.insert((o, section), id);
        self.pending.push((o, section));
        id
    }

    /// Resolves the relocations of a copied section.
    fn relocate(&mut self, o: usize, section: usize) -> Result<()> {
        let copy = self.sections[&(o, section)];
        let from_text = self.objects[o].sections[section].is_text();
        let relocations = self.objects[o].sections[section].relocations.clone();
        for reloc in relocations {
            if !SUPPORTED_RELOCATIONS.contains(&reloc.r_type) {
                return Err(Error::new(ErrorKind::Unsupported {
                    function: self.objects[o].sections[section].name.clone(),
                    what: format!(
                        "relocation type {} at +{:#x}, which the loader does not apply",
                        reloc.r_type, reloc.offset
                    ),
                }));
            }
            let (symbol, addend) = self.resolve(o, &reloc, from_text)?;
            self.out
                .add_relocation(
                    copy,
                    write::Relocation {
                        offset: reloc.offset,
                        symbol,
                        addend,
                        flags: object::RelocationFlags::Elf {
                            r_type: reloc.r_type,
                        },
                    },
                )
                .map_err(|e| Error::object("the patch object", e))?;
        }
        Ok(())
    }

    /// What a relocation of object `o` targets in the patch: (symbol, addend).
    fn resolve(&mut self, o: usize, reloc: &Reloc, from_text: bool) -> Result<(SymbolId, i64)> {
        let object = &self.objects[o];
        let target = &object.symbols[reloc.symbol];
        let addend = reloc.addend;
        if target.is_section() {
            let section = target.section.expect("section symbols have sections");
            let start = object.symbol_at_start(section);
            if object.sections[section].is_text() {
                let Some(start) = start else {
                    let copy = self.copy(o, section);
                    return Ok((self.out.section_symbol(copy), addend));
                };
                // A call to a replaced function's entry reaches its newest version through the
                // program's symbol; any other reference into its code (a jump table) is to
                // this copy.
                let entry_call = from_text
                    && matches!(reloc.r_type, elf::R_X86_64_PC32 | elf::R_X86_64_PLT32)
                    && addend == -4;
                return match self.carried.get(&(o, start)) {
                    Some(true) if entry_call => Ok((self.program_symbol(o, start), addend)),
                    Some(_) => {
                        let copy = self.copy(o, section);
                        Ok((self.out.section_symbol(copy), addend))
                    }
                    None => Ok((self.program_symbol(o, start), addend)),
                };
            }
            return match start {
                Some(start) if self.bound_to_program(o, start) => {
                    Ok((self.program_symbol(o, start), addend))
                }
                Some(start) if object.symbols[start].is_static() => {
                    self.new_data(o, start);
                    let copy = self.copy(o, section);
                    Ok((self.out.section_symbol(copy), addend))
                }
                Some(_) => {
                    let copy = self.copy(o, section);
                    Ok((self.out.section_symbol(copy), addend))
                }
                None => {
                    let copy = self.copy(o, section);
                    Ok((self.out.section_symbol(copy), addend))
                }
            };
        }
        let name = target.name.clone();
        match target.section {
            Some(section) if object.sections[section].is_text() => {
                match self.carried.get(&(o, reloc.symbol)) {
                    Some(false) => {
                        self.function_symbol(o, reloc.symbol)?;
                        Ok((self.defined[&name], addend))
                    }
                    _ => Ok((self.program_symbol(o, reloc.symbol), addend)),
                }
            }
            Some(section) => {
                if self.bound_to_program(o, reloc.symbol) {
                    return Ok((self.program_symbol(o, reloc.symbol), addend));
                }
                if target.is_static() {
                    self.new_data(o, reloc.symbol);
                }
                let copy = self.copy(o, section);
                Ok((self.out.section_symbol(copy), addend + target.value as i64))
            }
            None => {
                // Anonymous data another unit of the rebuild defines: copied from there.
                if crate::objfile::is_anonymous(&name) {
                    if let Some(&(d, index)) = self.anonymous.get(&name) {
                        let defined = &self.objects[d].symbols[index];
                        let value = defined.value as i64;
                        let section = defined.section.expect("defined");
                        let copy = self.copy(d, section);
                        return Ok((self.out.section_symbol(copy), addend + value));
                    }
                }
                if let Some(&(ao, af)) = self.added.get(&name) {
                    if !self.program.defines(&name) {
                        self.function_symbol(ao, af)?;
                        return Ok((self.defined[&name], addend));
                    }
                }
                Ok((self.program_symbol(o, reloc.symbol), addend))
            }
        }
    }

    /// Makes sure an added function is defined (it may live in another object).
    fn function_symbol(&mut self, o: usize, f: usize) -> Result<()> {
        let name = self.objects[o].symbols[f].name.clone();
        if self.defined.contains_key(&name) {
            return Ok(());
        }
        let carried = self
            .diff
            .carried
            .iter()
            .find(|c| c.function == (o, f))
            .cloned()
            .ok_or_else(|| {
                Error::new(ErrorKind::Unsupported {
                    function: readable(&name),
                    what: "a new function the comparison did not include".into(),
                })
            })?;
        self.function(&carried)
    }

    /// Whether a static (or constant) of the object binds to the program's: the program has it
    /// and it is not a read-only static whose contents changed.
    fn bound_to_program(&self, o: usize, symbol: usize) -> bool {
        let s = &self.objects[o].symbols[symbol];
        // Only statics have an identity to share; anonymous constants are copied (the
        // program's of the same name may hold what the edit changed).
        s.is_static()
            && self.program.defines(&s.name)
            && !self.diff.changed_constants.contains(&s.name)
    }

    /// Records a static the patch defines (a new one, or a changed constant's copy).
    fn new_data(&mut self, o: usize, symbol: usize) {
        let s = &self.objects[o].symbols[symbol];
        if s.name.is_empty() || self.defined.contains_key(&s.name) {
            return;
        }
        if s.st_type == elf::STT_OBJECT {
            self.statics.insert(s.name.clone(), s.size);
        }
        if s.st_type == elf::STT_TLS {
            self.new_tls.push(s.name.clone());
            return;
        }
        let section = s.section.expect("data symbols have sections");
        let copy = self.copy(o, section);
        let changed_constant = self.diff.changed_constants.contains(&s.name);
        // A changed constant's copy stays local: the program's symbol keeps its name.
        let scope = if changed_constant {
            write::SymbolScope::Compilation
        } else {
            write::SymbolScope::Dynamic
        };
        let id = self.out.add_symbol(write::Symbol {
            name: s.name.clone().into_bytes(),
            value: s.value,
            size: s.size,
            kind: symbol_kind(s.st_type),
            scope,
            weak: false,
            section: write::SymbolSection::Section(copy),
            flags: object::SymbolFlags::None,
        });
        self.defined.insert(s.name.clone(), id);
        if !changed_constant {
            self.new_statics.push(NewStatic {
                symbol: s.name.clone(),
                name: readable(&s.name),
            });
        }
    }

    /// The undefined symbol standing for the program's definition of `(o, symbol)`'s name.
    fn program_symbol(&mut self, o: usize, symbol: usize) -> SymbolId {
        let s = &self.objects[o].symbols[symbol];
        if s.st_type == elf::STT_OBJECT {
            self.statics.insert(s.name.clone(), s.size);
        }
        // The program's own name (a promoted `X.llvm.N` may carry another N in the rebuild).
        let name = self
            .program
            .canonical(&s.name)
            .unwrap_or(&s.name)
            .to_string();
        if let Some(id) = self.undefined.get(&name) {
            return *id;
        }
        let id = self.out.add_symbol(write::Symbol {
            name: name.clone().into_bytes(),
            value: 0,
            size: 0,
            kind: symbol_kind(s.st_type),
            scope: write::SymbolScope::Dynamic,
            weak: false,
            section: write::SymbolSection::Undefined,
            flags: object::SymbolFlags::None,
        });
        self.undefined.insert(name, id);
        id
    }

    /// `.eh_frame` restricted to the carried functions' FDEs (and the CIEs they use).
    fn eh_frame(&mut self) -> Result<()> {
        let mut data = Vec::new();
        let mut relocations: Vec<(usize, Reloc)> = Vec::new();
        for o in 0..self.objects.len() {
            let object = &self.objects[o];
            let Some(eh) = object.sections.iter().find(|s| s.name == ".eh_frame") else {
                continue;
            };
            let included: HashSet<usize> = self
                .sections
                .keys()
                .filter(|(so, s)| *so == o && object.sections[*s].is_text())
                .map(|(_, s)| *s)
                .collect();
            if included.is_empty() {
                continue;
            }
            let mut cies: HashMap<usize, usize> = HashMap::new();
            for record in records(&eh.data)? {
                let Some(cie) = record.cie else { continue };
                // The FDE's first relocation is its pc_begin: the function it describes.
                let pc_begin = eh.relocations_in(record.start as u64 + 8, record.start as u64 + 12);
                let Some(pc) = pc_begin.first() else { continue };
                let target = &object.symbols[pc.symbol];
                if !target.section.is_some_and(|s| included.contains(&s)) {
                    continue;
                }
                let new_cie = match cies.get(&cie) {
                    Some(at) => *at,
                    None => {
                        let Some(cie_record) =
                            records(&eh.data)?.into_iter().find(|r| r.start == cie)
                        else {
                            continue;
                        };
                        let at = data.len();
                        append(&mut data, &mut relocations, eh, o, &cie_record, at);
                        cies.insert(cie, at);
                        at
                    }
                };
                let at = data.len();
                append(&mut data, &mut relocations, eh, o, &record, at);
                let pointer = (at + 4 - new_cie) as u32;
                data[at + 4..at + 8].copy_from_slice(&pointer.to_le_bytes());
            }
        }
        if data.is_empty() {
            return Ok(());
        }
        data.extend_from_slice(&[0; 4]); // terminator
        let id = self.out.add_section(
            Vec::new(),
            b".eh_frame".to_vec(),
            write::SectionKind::Elf(elf::SHT_X86_64_UNWIND),
        );
        self.out.set_section_data(id, data, 8);
        self.out.section_mut(id).flags = write::SectionFlags::Elf {
            sh_flags: u64::from(elf::SHF_ALLOC),
        };
        for (o, reloc) in relocations {
            // FDEs describe the copies: a function's own section, never the program's.
            let target = &self.objects[o].symbols[reloc.symbol];
            let (symbol, addend) = match target.section {
                Some(s) if self.objects[o].sections[s].is_text() => {
                    let copy = self.copy(o, s);
                    (
                        self.out.section_symbol(copy),
                        reloc.addend
                            + if target.is_section() {
                                0
                            } else {
                                target.value as i64
                            },
                    )
                }
                _ => self.resolve(o, &reloc, false)?,
            };
            self.out
                .add_relocation(
                    id,
                    write::Relocation {
                        offset: reloc.offset,
                        symbol,
                        addend,
                        flags: object::RelocationFlags::Elf {
                            r_type: reloc.r_type,
                        },
                    },
                )
                .map_err(|e| Error::object("the patch object", e))?;
        }
        // LSDAs (and anything else FDEs reference) were copied while resolving.
        while let Some((o, s)) = self.pending.pop() {
            self.relocate(o, s)?;
        }
        Ok(())
    }
}

/// A record of `.eh_frame`.
#[derive(Debug, Clone)]
struct Record {
    start: usize,
    end: usize,
    /// For an FDE, the start of its CIE.
    cie: Option<usize>,
}

fn records(data: &[u8]) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let read = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
    };
    while pos + 4 <= data.len() {
        let length = read(pos).unwrap_or(0) as usize;
        if length == 0 {
            break;
        }
        if length == 0xffff_ffff {
            return Err(Error::object(
                ".eh_frame",
                "64-bit records are not supported",
            ));
        }
        let id = read(pos + 4).ok_or_else(|| Error::object(".eh_frame", "truncated"))? as usize;
        let end = pos + 4 + length;
        out.push(Record {
            start: pos,
            end,
            cie: (id != 0).then(|| pos + 4 - id),
        });
        pos = end;
    }
    Ok(out)
}

fn append(
    data: &mut Vec<u8>,
    relocations: &mut Vec<(usize, Reloc)>,
    eh: &Section,
    o: usize,
    record: &Record,
    at: usize,
) {
    data.extend_from_slice(&eh.data[record.start..record.end]);
    for r in eh.relocations_in(record.start as u64, record.end as u64) {
        relocations.push((
            o,
            Reloc {
                offset: r.offset - record.start as u64 + at as u64,
                ..*r
            },
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::records;

    /// A CIE, then two FDEs pointing back at it.
    #[test]
    fn eh_frame_records_find_their_cie() {
        let mut data = Vec::new();
        let record = |data: &mut Vec<u8>, id: u32, body: usize| {
            data.extend_from_slice(&(4 + body as u32).to_le_bytes());
            let at = data.len();
            data.extend_from_slice(&id.to_le_bytes());
            data.extend(std::iter::repeat_n(0u8, body));
            at
        };
        record(&mut data, 0, 12);
        let first = data.len();
        let id_at = first + 4;
        record(&mut data, id_at as u32, 16);
        let second = data.len();
        record(&mut data, (second + 4) as u32, 16);
        data.extend_from_slice(&[0; 4]);
        let parsed = records(&data).unwrap();
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[0].cie, None);
        assert_eq!(parsed[1].cie, Some(0));
        assert_eq!(parsed[2].cie, Some(0));
        assert_eq!(parsed[1].start, first);
        assert_eq!(parsed[2].end, data.len() - 4);
    }
}
