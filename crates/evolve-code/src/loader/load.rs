//! The steps of one load: parse and check the object, bind its undefined symbols, lay it out,
//! copy and relocate its sections, protect the regions and register its unwind table (see the
//! module docs of [`super`]). Everything is owned by a [`Loading`] until the patch is handed
//! over as a [`LoadedPatch`]; an error on the way drops the reservation, unmapping it.

use super::layout::{self, Region};
use super::relocate::{self, Rela, Value};
use super::{
    refused, tls, unwind, LoadStats, LoadedPatch, PatchSymbol, Resolution, Resolve, Wanted,
};
use crate::error::{Error, ErrorKind, Result};
use crate::hidden::Hidden;
use crate::sys::memory::Protection;
use object::elf;
use object::read::elf::{FileHeader, Rela as _, SectionHeader, Sym};
use std::collections::{HashMap, HashSet};
use std::path::Path;

type Header = elf::FileHeader64<object::LittleEndian>;

/// A section of the object as the loader sees it.
struct Section<'d> {
    name: String,
    region: Option<Region>,
    nobits: bool,
    data: &'d [u8],
    size: usize,
    align: usize,
}

/// The state of one load, from parsing to the mapped patch.
pub(super) struct Loading<'d> {
    path: &'d Path,
    endian: object::LittleEndian,
    sections: Vec<Section<'d>>,
    symbols: object::read::elf::SymbolTable<'d, Header>,
    /// Relocation sections: (index of the section they apply to, their entries).
    relocations: Vec<(usize, &'d [elf::Rela64<object::LittleEndian>])>,
    /// The object's only `STT_FILE` name, if it has exactly one.
    file: Option<String>,
}

impl<'d> Loading<'d> {
    /// Parses the object and checks what can be checked before binding anything.
    pub(super) fn new(path: &'d Path, data: &'d [u8]) -> Result<Loading<'d>> {
        let header = Header::parse(data)
            .map_err(|e| refused(path, format!("not an ELF64 little-endian object: {e}")))?;
        let endian = object::LittleEndian;
        if header.e_type(endian) != elf::ET_REL || header.e_machine(endian) != elf::EM_X86_64 {
            return Err(refused(path, "not an x86-64 relocatable object (ET_REL)"));
        }
        let table = header
            .sections(endian, data)
            .map_err(|e| refused(path, format!("bad section table: {e}")))?;
        let symbols = table
            .symbols(endian, data, elf::SHT_SYMTAB)
            .map_err(|e| refused(path, format!("bad symbol table: {e}")))?;
        let mut files = Vec::new();
        for symbol in symbols.iter() {
            let name = String::from_utf8_lossy(symbols.symbol_name(endian, symbol).unwrap_or(b""));
            let shndx = symbol.st_shndx(endian);
            if symbol.st_type() == elf::STT_FILE {
                files.push(name.into_owned());
            } else if symbol.st_type() == elf::STT_TLS && shndx != elf::SHN_UNDEF {
                return Err(refused(
                    path,
                    format!(
                        "defines the thread-local `{name}`: a patch uses the program's \
                         thread-locals and cannot add new ones"
                    ),
                ));
            } else if shndx == elf::SHN_COMMON {
                return Err(refused(
                    path,
                    format!("common symbol `{name}` (compile with -fno-common)"),
                ));
            }
        }
        let mut sections = Vec::new();
        let mut relocations = Vec::new();
        for section in table.iter() {
            let name = String::from_utf8_lossy(table.section_name(endian, section).unwrap_or(b""))
                .into_owned();
            let (kind, flags) = (section.sh_type(endian), section.sh_flags(endian) as u32);
            let size = section.sh_size(endian) as usize;
            let initializer = matches!(
                kind,
                elf::SHT_INIT_ARRAY | elf::SHT_PREINIT_ARRAY | elf::SHT_FINI_ARRAY
            ) || [
                ".init_array",
                ".preinit_array",
                ".fini_array",
                ".ctors",
                ".dtors",
            ]
            .iter()
            .any(|p| name == *p || name.starts_with(&format!("{p}.")))
                || name == ".init"
                || name == ".fini";
            if initializer {
                return Err(refused(
                    path,
                    format!(
                        "section {name} holds initializers or finalizers: a patch runs no code \
                         before apply switches to it (move the work into the patched functions)"
                    ),
                ));
            }
            if kind == elf::SHT_REL {
                return Err(refused(
                    path,
                    format!("section {name}: SHT_REL relocations (x86-64 uses SHT_RELA)"),
                ));
            }
            if kind == elf::SHT_RELA {
                let (entries, _) = section
                    .rela(endian, data)
                    .map_err(|e| refused(path, format!("bad relocations in {name}: {e}")))?
                    .unwrap_or((&[], object::SectionIndex(0)));
                relocations.push((section.sh_info(endian) as usize, entries));
            }
            let region =
                if flags & elf::SHF_ALLOC == 0 || kind == elf::SHT_NOTE || kind == elf::SHT_GROUP {
                    None
                } else if flags & elf::SHF_TLS != 0 {
                    if size > 0 {
                        return Err(refused(
                            path,
                            format!(
                                "section {name} defines thread-locals: a patch uses the program's \
                             thread-locals and cannot add new ones"
                            ),
                        ));
                    }
                    None
                } else if kind == elf::SHT_X86_64_UNWIND || name == ".eh_frame" {
                    Some(Region::Unwind)
                } else if flags & elf::SHF_EXECINSTR != 0 {
                    if flags & elf::SHF_WRITE != 0 {
                        return Err(refused(
                            path,
                            format!("section {name} is writable and executable"),
                        ));
                    }
                    Some(Region::Text)
                } else if flags & elf::SHF_WRITE != 0 && !name.starts_with(".data.rel.ro") {
                    Some(Region::Data)
                } else {
                    Some(Region::ReadOnly)
                };
            let nobits = kind == elf::SHT_NOBITS;
            let contents = if nobits || region.is_none() {
                &[][..]
            } else {
                section.data(endian, data).map_err(|e| {
                    refused(path, format!("section {name} lies outside the file: {e}"))
                })?
            };
            // The object's .eh_frame may end in a zero terminator: the guard table goes before it.
            let size = if region == Some(Region::Unwind) {
                eh_frame_len(contents)
            } else {
                size
            };
            let align = section.sh_addralign(endian) as usize;
            if region.is_some() && align > crate::sys::memory::page_size() {
                return Err(refused(
                    path,
                    format!("section {name} wants {align}-byte alignment"),
                ));
            }
            sections.push(Section {
                name,
                region,
                nobits,
                data: contents,
                size,
                align: align.max(1),
            });
        }
        Ok(Loading {
            path,
            endian,
            sections,
            symbols,
            relocations,
            file: (files.len() == 1).then(|| files.remove(0)),
        })
    }

    fn placed(&self, index: usize) -> bool {
        self.sections.get(index).is_some_and(|s| s.region.is_some())
    }

    fn symbol_name(&self, index: usize) -> String {
        self.symbols
            .symbol(object::SymbolIndex(index))
            .ok()
            .and_then(|s| self.symbols.symbol_name(self.endian, s).ok())
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .filter(|n| !n.is_empty())
            .or_else(|| {
                // A section symbol: name the section.
                let s = self.symbols.symbol(object::SymbolIndex(index)).ok()?;
                let section = self
                    .symbols
                    .symbol_section(self.endian, s, object::SymbolIndex(index))
                    .ok()??;
                Some(self.sections.get(section.0)?.name.clone())
            })
            .unwrap_or_else(|| format!("symbol #{index}"))
    }

    fn decode(&self, rela: &elf::Rela64<object::LittleEndian>) -> Rela {
        Rela {
            kind: rela.r_type(self.endian, false),
            offset: rela.r_offset(self.endian) as usize,
            symbol: rela.r_sym(self.endian, false) as usize,
            addend: rela.r_addend(self.endian),
        }
    }

    /// "R_X86_64_PC32 against `foo` at .text.bar+0x12"
    fn describe(&self, target: usize, rela: &Rela) -> String {
        format!(
            "{} against `{}` at {}+{:#x}",
            relocate::type_name(rela.kind),
            self.symbol_name(rela.symbol),
            self.sections[target].name,
            rela.offset
        )
    }

    /// Binds every undefined symbol a relocation uses, and counts the GOT slots and PLT stubs
    /// the relocations may need.
    fn bind(&self, resolver: &dyn Resolve) -> Result<(HashMap<usize, Value>, usize, usize)> {
        let mut bound = HashMap::new();
        let mut distinct = HashSet::new();
        let (mut got, mut plt) = (0, 0);
        for &(target, entries) in &self.relocations {
            if !self.placed(target) {
                continue;
            }
            for entry in entries {
                let rela = self.decode(entry);
                if !relocate::SUPPORTED.contains(&rela.kind) {
                    return Err(refused(
                        self.path,
                        format!(
                            "{}: the loader does not support this relocation type",
                            self.describe(target, &rela)
                        ),
                    ));
                }
                if distinct.insert((rela.symbol, rela.kind)) {
                    let (g, p) = relocate::table_needs(rela.kind);
                    got += g;
                    plt += p;
                }
                let symbol = self
                    .symbols
                    .symbol(object::SymbolIndex(rela.symbol))
                    .map_err(|e| refused(self.path, e.to_string()))?;
                if rela.symbol == 0
                    || symbol.st_shndx(self.endian) != elf::SHN_UNDEF
                    || bound.contains_key(&rela.symbol)
                {
                    continue;
                }
                let name = self.symbol_name(rela.symbol);
                let wanted = Wanted {
                    name: &name,
                    thread_local: relocate::is_tls(rela.kind) || symbol.st_type() == elf::STT_TLS,
                    file: self.file.as_deref(),
                };
                let value = match resolver.resolve(&wanted) {
                    Ok(Resolution::Address(a)) => Value::Address(a),
                    Ok(Resolution::ExecutableTls(o)) => Value::Tls(o),
                    // An unresolved weak reference is null, as a static link makes it.
                    Err(_) if symbol.st_bind() == elf::STB_WEAK => Value::Address(0),
                    Err(reason) => {
                        return Err(refused(
                            self.path,
                            format!(
                                "cannot bind `{name}` ({}): {reason}",
                                self.describe(target, &rela)
                            ),
                        ))
                    }
                };
                bound.insert(rela.symbol, value);
            }
        }
        Ok((bound, got, plt))
    }

    /// Lays out, relocates, protects and registers: the rest of [`LoadedPatch::load`].
    pub(super) fn finish(self, resolver: &dyn Resolve, manifest: String) -> Result<LoadedPatch> {
        let (bound, got_slots, plt_stubs) = self.bind(resolver)?;
        let wanted: Vec<layout::Wanted> = self
            .sections
            .iter()
            .enumerate()
            .filter_map(|(index, s)| {
                Some(layout::Wanted {
                    index,
                    region: s.region?,
                    size: s.size,
                    align: s.align,
                })
            })
            .collect();
        let has_eh_frame = self
            .sections
            .iter()
            .any(|s| s.region == Some(Region::Unwind) && s.size > 0);
        let guard_table_len = if has_eh_frame {
            unwind::guard_table(0, layout::GUARD).len()
        } else {
            0
        };
        let plan = layout::plan(&wanted, plt_stubs, got_slots, guard_table_len);
        let mut memory = layout::Reservation::near(anchor()?, plan.len)?;
        let base = memory.start;
        // Text padding is int3; everything else starts zeroed (fresh anonymous memory).
        memory.bytes_mut(plan.text.clone()).fill(0xcc);
        let mut offset_of = HashMap::new();
        for &(index, offset) in &plan.sections {
            let section = &self.sections[index];
            offset_of.insert(index, offset);
            if !section.nobits {
                memory
                    .bytes_mut(offset..offset + section.size)
                    .copy_from_slice(&section.data[..section.size]);
            }
        }
        // The value of every symbol a relocation may use.
        let value_of = |index: usize| -> Option<Value> {
            if index == 0 {
                return None;
            }
            if let Some(v) = bound.get(&index) {
                return Some(*v);
            }
            let symbol = self.symbols.symbol(object::SymbolIndex(index)).ok()?;
            if symbol.st_shndx(self.endian) == elf::SHN_ABS {
                return Some(Value::Address(symbol.st_value(self.endian) as usize));
            }
            let section = self
                .symbols
                .symbol_section(self.endian, symbol, object::SymbolIndex(index))
                .ok()??;
            let offset = offset_of.get(&section.0)?;
            Some(Value::Address(
                base + offset + symbol.st_value(self.endian) as usize,
            ))
        };
        let tls = tls::executable_tls();
        let total = memory.len;
        let mut relocator = relocate::Relocator::new(
            memory.bytes_mut(0..total),
            base,
            (plan.got, got_slots),
            (plan.plt, plt_stubs),
            tls,
        );
        for &(target, entries) in &self.relocations {
            let Some(&offset) = offset_of.get(&target) else {
                continue;
            };
            let section = &self.sections[target];
            let executable = section.region == Some(Region::Text);
            let mut place = relocate::Target {
                offset,
                code: if executable { section.data } else { &[] },
                executable,
                starts: None,
            };
            for entry in entries {
                let rela = self.decode(entry);
                if rela.offset + relocate::field_size(rela.kind) > section.size {
                    return Err(refused(
                        self.path,
                        format!("{}: outside its section", self.describe(target, &rela)),
                    ));
                }
                let value = value_of(rela.symbol);
                if value.is_none() && rela.symbol != 0 {
                    return Err(refused(
                        self.path,
                        format!(
                            "{}: the symbol is in a section that is not loaded",
                            self.describe(target, &rela)
                        ),
                    ));
                }
                relocator
                    .apply(&mut place, &rela, value)
                    .map_err(|reason| {
                        refused(
                            self.path,
                            format!("{}: {reason}", self.describe(target, &rela)),
                        )
                    })?;
            }
        }
        let stats = LoadStats {
            relaxed: relocator.relaxed,
            got_slots: relocator.slots_used(),
            plt_stubs: relocator.stubs_used(),
        };
        drop(relocator);
        if has_eh_frame {
            let table = unwind::guard_table(base + plan.text.start, layout::GUARD);
            memory
                .bytes_mut(plan.guard_table..plan.guard_table + table.len())
                .copy_from_slice(&table);
        }
        let read_exec = Protection::READ_EXEC;
        let read = Protection {
            read: true,
            write: false,
            exec: false,
        };
        let read_write = Protection {
            read: true,
            write: true,
            exec: false,
        };
        memory.protect(plan.text.start..plan.rodata.start, read_exec)?;
        memory.protect(plan.rodata.start..plan.data.start, read)?;
        memory.protect(plan.data.start..plan.unwind.start, read_write)?;
        memory.protect(plan.unwind.start..plan.len, read)?;
        let hidden =
            |r: std::ops::Range<usize>| (Hidden::new(base + r.start), Hidden::new(base + r.end));
        let exec = vec![hidden(plan.text.clone())];
        let targets: Vec<(Hidden, Hidden)> =
            [plan.text.clone(), plan.rodata.clone(), plan.data.clone()]
                .into_iter()
                .filter(|r| !r.is_empty())
                .map(hidden)
                .collect();
        let symbols = self.defined_symbols(&offset_of);
        // No code of the patch has run: every word pointing into it now is bookkeeping (of this
        // loader, freed or not).
        let loader_words = crate::scan::words_pointing_into(&targets, &[hidden(0..plan.len)])?;
        let (base, len) = memory.keep();
        let unwind = has_eh_frame.then(|| {
            // SAFETY: the unwind region holds the object's relocated .eh_frame followed by the
            // guard table and its terminator; it stays mapped and unchanged until `unload`
            // deregisters it, and the code it describes is mapped.
            unsafe { unwind::Registration::register(base + plan.unwind.start) }
        });
        Ok(LoadedPatch {
            path: self.path.to_path_buf(),
            manifest,
            base: Hidden::new(base),
            len,
            exec,
            targets,
            symbols,
            unwind,
            guard: Hidden::new(base + plan.text.start),
            loader_words,
            stats,
            unloaded: false,
        })
    }

    /// The named function and data symbols defined in loaded sections, as offsets.
    fn defined_symbols(&self, offset_of: &HashMap<usize, usize>) -> Vec<PatchSymbol> {
        let mut out = Vec::new();
        for (index, symbol) in self.symbols.iter().enumerate() {
            if !matches!(
                symbol.st_type(),
                elf::STT_FUNC | elf::STT_OBJECT | elf::STT_NOTYPE
            ) {
                continue;
            }
            let Ok(name) = self.symbols.symbol_name(self.endian, symbol) else {
                continue;
            };
            let Ok(Some(section)) =
                self.symbols
                    .symbol_section(self.endian, symbol, object::SymbolIndex(index))
            else {
                continue;
            };
            let Some(offset) = offset_of.get(&section.0) else {
                continue;
            };
            if name.is_empty() {
                continue;
            }
            out.push(PatchSymbol {
                name: String::from_utf8_lossy(name).into_owned(),
                offset: offset + symbol.st_value(self.endian) as usize,
                size: symbol.st_size(self.endian) as usize,
                function: symbol.st_type() == elf::STT_FUNC,
                global: symbol.st_bind() != elf::STB_LOCAL,
            });
        }
        out
    }
}

/// The length of an `.eh_frame` section's entries, up to its zero terminator if it has one.
fn eh_frame_len(data: &[u8]) -> usize {
    let mut at = 0;
    while at + 4 <= data.len() {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes")) as usize;
        if len == 0 || len == 0xffff_ffff {
            // A terminator (or a 64-bit entry, which object files never have): stop here.
            return at;
        }
        at += 4 + len;
    }
    data.len()
}

/// The address the patch must be near: the middle of the executable's code, so that its text
/// and its statics are within reach.
fn anchor() -> Result<usize> {
    let exe = crate::inspect::executable()?;
    let ranges = exe.exec_ranges();
    let start = ranges.iter().map(|r| r.start).min();
    let end = ranges.iter().map(|r| r.end).max();
    match (start, end) {
        (Some(s), Some(e)) => Ok(s + (e - s) / 2),
        _ => Err(Error::new(ErrorKind::Image {
            path: exe.path().display().to_string(),
            reason: "the executable has no executable segment".into(),
        })),
    }
}
