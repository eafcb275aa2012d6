//! Evolve's own loader for patch objects: ELF relocatable objects (`ET_REL`) placed within
//! ±2 GiB of the executable, bound to the program's own symbols.
//!
//! A patch built from a changed crate carries only what changed; everything else it uses —
//! the program's functions and statics, local ones included, std, the libraries — is an
//! undefined symbol. The dynamic linker could bind only what the executable exports, and would
//! map the patch far away, where a `call rel32` from the program cannot reach it. This loader
//! (the user-space cousin of the Linux module loader and of libcare's) does what a static link
//! would have done, at run time:
//!
//! 1. **Open once** ([`file`]): a regular file or nothing (FIFOs, devices, directories refused
//!    before a byte is read); the manifest's SHA-256 ([`patch_digest`]) verified.
//! 2. **Check** the object: x86-64 `ET_REL`; no initializers (`.init_array`, `.ctors`,
//!    `.preinit_array`, `.fini_array`, `.dtors`: no patch code runs before apply switches to
//!    it); no thread-local definitions (a patch uses the program's thread-locals); no common
//!    symbols; no section both writable and executable.
//! 3. **Bind** every undefined symbol a relocation uses through a [`Resolve`]r (the standard
//!    one is [`ProgramResolver`]: the executable's full symbol table with its load bias, then the
//!    libraries). A symbol that cannot be bound refuses the patch, naming it.
//! 4. **Lay out** ([`layout`]) text, rodata (with a small GOT) and data near the executable.
//! 5. **Relocate** ([`relocate`]) every reference as directly as its distance allows.
//! 6. **Protect** text `r-x`, rodata `r--`, data `rw-` (never writable and executable), and
//!    **register** `.eh_frame` with the unwinder ([`unwind`]).
//!
//! Any refusal or failure leaves nothing behind: the reservation is unmapped and nothing was
//! registered. A loaded patch is unloaded only by [`LoadedPatch::unload`], which proves first
//! that nothing can reach it (the reclamation scan, as for [`crate::dylib::PatchObject`]) and
//! then leaves its range reserved `PROT_NONE`, so a stale pointer faults with a diagnostic
//! naming the patch.
//!
//! # Example
//!
//! ```no_run
//! use evolve_code::loader::{LoadedPatch, ProgramResolver};
//! let resolver = ProgramResolver::new()?;
//! // SAFETY: the file is a patch built by Evolve's builder against this very program.
//! let patch = unsafe { LoadedPatch::load("fix.evolve.o".as_ref(), &resolver)? };
//! let new_version = patch.symbol("__evolve_new__my_function").expect("carried");
//! # let _ = new_version;
//! # Ok::<(), evolve_code::Error>(())
//! ```
//!
//! # Safety
//!
//! Loading maps and writes only fresh memory that nothing else knows of. What the loaded code
//! does when called is the caller's responsibility ([`LoadedPatch::load`]'s contract): the
//! loader binds it to the program's definitions but cannot check the types it assumes.
#![allow(unsafe_code)]

mod file;
mod layout;
mod relocate;
mod resolve;
mod tls;
mod unwind;

pub use file::{hex, manifest_range, patch_digest, MANIFEST_SECTION};
pub use resolve::{ProgramResolver, Resolution, Resolve, Wanted};

use crate::dylib::Unload;
use crate::error::{Error, ErrorKind, Result};
use crate::hidden::Hidden;
use crate::scan::{scan_for_references, ScanReport, Scope};
use crate::sys::memory::Protection;
use layout::Region;
use object::elf;
use object::read::elf::{FileHeader, Rela as _, SectionHeader, Sym};
use relocate::{Rela, Value};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

type Header = elf::FileHeader64<object::LittleEndian>;

/// The error for a refused patch.
pub(crate) fn refused(path: &Path, reason: impl Into<String>) -> Error {
    Error::new(ErrorKind::PatchRefused {
        path: path.display().to_string(),
        reason: reason.into(),
    })
}

/// A defined symbol of a loaded patch.
#[derive(Debug, Clone)]
struct PatchSymbol {
    name: String,
    /// From the start of the patch's memory.
    offset: usize,
    size: usize,
    function: bool,
    global: bool,
}

/// What loading did, for diagnostics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// `GOTPCREL` loads and calls rewritten into direct `lea`/`call`/`jmp`.
    pub relaxed: usize,
    /// GOT slots filled (a TLS pair counts two).
    pub got_slots: usize,
    /// PLT stubs made, for calls to functions beyond ±2 GiB.
    pub plt_stubs: usize,
}

/// A patch object loaded by Evolve's loader (see the module docs).
///
/// Its addresses are kept hidden from reclamation scans (see [`crate::Hidden`]). Dropping it
/// leaves it loaded: threads may still run its code.
#[derive(Debug)]
pub struct LoadedPatch {
    path: PathBuf,
    manifest: String,
    base: Hidden,
    len: usize,
    /// The text region, and every region reclamation looks for references into.
    exec: Vec<(Hidden, Hidden)>,
    targets: Vec<(Hidden, Hidden)>,
    symbols: Vec<PatchSymbol>,
    unwind: Option<unwind::Registration>,
    /// The start of the text region, which only the unwinder's tables may hold.
    guard: Hidden,
    /// Words that pointed into the patch right after loading, before its code could run.
    loader_words: Vec<(usize, Hidden)>,
    stats: LoadStats,
    unloaded: bool,
}

/// A section of the object as the loader sees it.
struct Section<'d> {
    name: String,
    region: Option<Region>,
    nobits: bool,
    data: &'d [u8],
    size: usize,
    align: usize,
}

impl LoadedPatch {
    /// Opens, verifies, binds, relocates and maps the patch object at `path` (see the module
    /// docs), binding its undefined symbols through `resolver`.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::PatchRefused`] naming the cause (not a regular file, digest mismatch, not
    /// an x86-64 relocatable object, initializers, a thread-local definition, a symbol that
    /// cannot be bound, a relocation that cannot be honoured — with its type, symbol and
    /// place); [`ErrorKind::NoNearMemory`] if no room is left near the executable. Nothing is
    /// left mapped or registered after an error.
    ///
    /// # Safety
    ///
    /// The object must be a patch built for this program (the caller checks the manifest's
    /// build id and toolchain): its code will call the program's functions and use its statics
    /// with the types it was compiled with. Loading itself runs none of its code.
    pub unsafe fn load(path: &Path, resolver: &dyn Resolve) -> Result<LoadedPatch> {
        let data = file::read_regular(path)?;
        let manifest = file::verify(path, &data)?;
        Loading::new(path, &data)?.finish(resolver, manifest)
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The manifest JSON, as verified (the caller parses it).
    pub fn manifest(&self) -> &str {
        &self.manifest
    }

    /// What loading did (relaxations, GOT slots, PLT stubs).
    pub fn stats(&self) -> LoadStats {
        self.stats
    }

    /// The address of the patch's symbol `name` (a global definition first, else the only local
    /// one), `None` if it has none or was unloaded.
    pub fn symbol(&self, name: &str) -> Option<usize> {
        if self.unloaded {
            return None;
        }
        let all: Vec<&PatchSymbol> = self.symbols.iter().filter(|s| s.name == name).collect();
        let chosen = match all.iter().find(|s| s.global) {
            Some(global) => *global,
            None if all.len() == 1 => all[0],
            None => return None,
        };
        Some(self.base.get() + chosen.offset)
    }

    /// The address range of the patch's symbol `name` (as [`LoadedPatch::symbol`] chooses it,
    /// with the size its symbol table gives).
    pub fn symbol_range(&self, name: &str) -> Option<std::ops::Range<usize>> {
        let start = self.symbol(name)?;
        let offset = start - self.base.get();
        let symbol = self
            .symbols
            .iter()
            .find(|s| s.name == name && s.offset == offset)?;
        Some(start..start + symbol.size)
    }

    /// The names of the symbols the patch defines.
    pub fn symbol_names(&self) -> impl Iterator<Item = String> + '_ {
        self.symbols.iter().map(|s| s.name.clone())
    }

    /// The patch's function containing `address` and the offset into it: symbolizes return
    /// addresses in patch code, which the program's own symbolizer does not know.
    pub fn symbolize(&self, address: usize) -> Option<(&str, usize)> {
        let offset = address.checked_sub(self.base.get())?;
        self.symbols
            .iter()
            .filter(|s| s.function && s.offset <= offset && offset < s.offset + s.size.max(1))
            .map(|s| (s.name.as_str(), offset - s.offset))
            .next()
    }

    /// The executable address range (the text region), hidden (see [`crate::Hidden`]).
    pub fn exec_ranges(&self) -> &[(Hidden, Hidden)] {
        &self.exec
    }

    /// Every range that belongs to the patch's code and data, hidden.
    pub fn ranges(&self) -> &[(Hidden, Hidden)] {
        &self.targets
    }

    /// Whether `address` lies in the patch's code.
    pub fn contains(&self, address: usize) -> bool {
        !self.unloaded
            && self
                .exec
                .iter()
                .any(|r| (r.0.get()..r.1.get()).contains(&address))
    }

    /// Whether it was unloaded.
    pub fn is_unloaded(&self) -> bool {
        self.unloaded
    }

    /// Unloads the patch if nothing can reach it any more, naming it `name` in diagnostics —
    /// the protocol of [`crate::dylib::PatchObject::unload`]: under the engine's write lock,
    /// refuses if a patch site branches into it; stops the other threads and scans `scope` for
    /// references into its code and data (ignoring its own memory, the unwinder's guard word
    /// and the words recorded at load); and only if none was found, deregisters its unwind
    /// table and replaces its memory with a `PROT_NONE` reservation, so a stale pointer faults
    /// with a diagnostic naming `name`.
    pub fn unload(&mut self, scope: Scope, timeout: Duration, name: &str) -> Result<Unload> {
        if self.unloaded {
            return Err(refused(&self.path, "already unloaded"));
        }
        let mut writer = crate::write::lock();
        let targets = &self.targets;
        let inside = |a: usize| targets.iter().any(|r| (r.0.get()..r.1.get()).contains(&a));
        let branching_in = writer.sites_branching_into(&inside);
        if !branching_in.is_empty() {
            return Ok(Unload::Referenced(ScanReport {
                references: branching_in
                    .iter()
                    .map(|s| format!("patch site {s:#x} branches into it"))
                    .collect(),
                ..ScanReport::default()
            }));
        }
        let (base, len, guard) = (self.base.get(), self.len, self.guard.get());
        let loader_words = &self.loader_words;
        let excluded = |at: usize, value: usize| {
            (base..base + len).contains(&at)
                || value == guard
                || loader_words
                    .iter()
                    .any(|(w, v)| *w == at && v.get() == value)
        };
        let report = scan_for_references(&self.targets, scope, timeout, &excluded)?;
        if !report.references.is_empty() {
            return Ok(Unload::Referenced(report));
        }
        writer.forget_sites_in(&inside);
        drop(writer);
        if let Some(registration) = self.unwind.take() {
            // SAFETY: the scan proved no thread runs or returns into the patch, so none unwinds
            // through it.
            unsafe { registration.deregister() };
        }
        // SAFETY: as above; nothing of the patch is used after this.
        unsafe { layout::retire(base, len)? };
        self.unloaded = true;
        crate::fault::record(base, base + len, name);
        Ok(Unload::Unloaded(report))
    }
}

/// The state of one load, from parsing to the mapped patch.
struct Loading<'d> {
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
    fn new(path: &'d Path, data: &'d [u8]) -> Result<Loading<'d>> {
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
    fn finish(self, resolver: &dyn Resolve, manifest: String) -> Result<LoadedPatch> {
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
                if rela.offset >= section.size.max(1) && rela.kind != elf::R_X86_64_NONE {
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
