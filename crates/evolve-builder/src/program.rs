//! The running program as the builder sees it: its executable file, read once.
//!
//! Addresses are the file's link-time virtual addresses (the process adds its load bias; the
//! comparison never needs it). What the comparison asks of the program:
//! - its symbols by name, **local ones included** (`.symtab`): rustc internalises most functions
//!   and statics, and a patch binds to them as to any other;
//! - the bytes at an address (segments as mapped, `.bss` reading as zeros);
//! - the pointer stored at an address as the dynamic linker will have made it: a `RELATIVE`
//!   relocation's addend, or a symbol for `GLOB_DAT`/`64`/`JUMP_SLOT` (libraries' functions,
//!   IFUNCs), else the stored bytes (a non-PIE program);
//! - the thread-pointer offset of a thread-local (x86-64 TLS variant II: the executable's block
//!   sits right below the thread pointer);
//! - which symbol a PLT entry calls.

use crate::error::{Error, Result};
use object::elf;
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader, Sym};
use object::{Endianness, Object, ObjectSection, RelocationTarget};
use std::collections::HashMap;
use std::path::Path;

/// What a symbol of the program is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymbolKind {
    /// A function (`STT_FUNC`) or an IFUNC resolver.
    Function,
    /// A static (`STT_OBJECT`).
    Data,
    /// A thread-local (`STT_TLS`): its value is its offset in the TLS block.
    ThreadLocal,
    /// Anything else (`STT_NOTYPE`).
    Other,
}

/// One definition of a symbol in the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Definition {
    /// Link-time address (for a thread-local: offset in the TLS block).
    pub address: u64,
    /// Size in bytes (0 when unknown).
    pub size: u64,
    /// What it is.
    pub kind: SymbolKind,
    /// Whether it is local (`STB_LOCAL`): several may share a name.
    pub local: bool,
}

/// The value a pointer-sized slot of the program holds once loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pointer {
    /// An address of the program (link-time).
    Address(u64),
    /// A symbol bound by the dynamic linker, plus an addend.
    Symbol(String, i64),
    /// The thread-pointer offset of a symbol (`TPOFF64` in a GOT slot).
    ThreadOffset(String, i64),
}

/// A loadable segment.
#[derive(Debug, Clone)]
struct Segment {
    address: u64,
    file_offset: usize,
    file_size: u64,
    memory_size: u64,
}

/// The program's executable file.
#[derive(Debug)]
pub struct Program {
    /// GNU build id, hex.
    pub build_id: String,
    /// `rustc version …` from `.comment`, if present.
    pub rustc_comment: Option<String>,
    /// Whether the program is position-independent (`ET_DYN`).
    pub pie: bool,
    data: Vec<u8>,
    segments: Vec<Segment>,
    symbols: HashMap<String, Vec<Definition>>,
    /// The source file (`STT_FILE`) of each local definition, by address: a C program may
    /// define one `static` name in several files.
    local_files: HashMap<u64, String>,
    /// Promoted names (`X.llvm.N`) by `X`.
    promoted: HashMap<String, Vec<String>>,
    /// Every promoted name by `X`, never restricted (see [`Program::has_copy_at`]).
    copies: HashMap<String, Vec<String>>,
    imports: std::collections::HashSet<String>,
    pointers: HashMap<u64, Pointer>,
    plt: Vec<(u64, u64)>,
    tls_block: Option<(u64, u64)>,
}

impl Program {
    /// Reads the executable at `path` (for a process: `/proc/PID/exe`, which still reaches the
    /// file it was started from after that file is replaced on disk).
    pub fn read(path: &Path) -> Result<Program> {
        let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Program::parse(data, &path.display().to_string())
    }

    /// Parses an executable's bytes (`what` names it in errors).
    pub fn parse(data: Vec<u8>, what: &str) -> Result<Program> {
        let file = ElfFile64::<Endianness>::parse(&*data).map_err(|e| Error::object(what, e))?;
        if file.architecture() != object::Architecture::X86_64 {
            return Err(Error::object(what, "not an x86-64 program"));
        }
        let endian = file.endian();
        let header = file.elf_header();
        let pie = header.e_type(endian) == elf::ET_DYN;
        let build_id = file
            .build_id()
            .ok()
            .flatten()
            .map(evolve_hot::manifest::hex)
            .ok_or_else(|| Error::object(what, "it has no GNU build id"))?;
        let rustc_comment = file.section_by_name(".comment").and_then(|s| {
            let bytes = s.data().ok()?;
            bytes
                .split(|b| *b == 0)
                .filter_map(|s| std::str::from_utf8(s).ok())
                .find(|s| s.starts_with("rustc version "))
                .map(str::to_string)
        });
        let mut segments = Vec::new();
        let mut tls_block = None;
        for ph in file.elf_program_headers() {
            match ph.p_type(endian) {
                elf::PT_LOAD => segments.push(Segment {
                    address: ph.p_vaddr(endian),
                    file_offset: ph.p_offset(endian) as usize,
                    file_size: ph.p_filesz(endian),
                    memory_size: ph.p_memsz(endian),
                }),
                elf::PT_TLS => {
                    let align = ph.p_align(endian).max(1);
                    tls_block = Some((ph.p_memsz(endian).next_multiple_of(align), align));
                }
                _ => {}
            }
        }
        let table = file.elf_symbol_table();
        if table.is_empty() {
            return Err(Error::object(
                what,
                "it has no symbol table (stripped): a patch binds to the program's own \
                 symbols, local ones included; build it without `strip`",
            ));
        }
        let mut symbols: HashMap<String, Vec<Definition>> = HashMap::new();
        let mut imports = std::collections::HashSet::new();
        let mut local_files = HashMap::new();
        let mut source_file: Option<String> = None;
        for symbol in table.iter() {
            if symbol.st_type() == elf::STT_FILE {
                source_file = table
                    .symbol_name(endian, symbol)
                    .ok()
                    .map(|n| String::from_utf8_lossy(n).into_owned());
                continue;
            }
            if symbol.st_shndx(endian) == elf::SHN_UNDEF {
                if let Ok(name) = table.symbol_name(endian, symbol) {
                    let name = String::from_utf8_lossy(name);
                    let name = name.split('@').next().unwrap_or_default();
                    if !name.is_empty() {
                        imports.insert(name.to_string());
                    }
                }
                continue;
            }
            let kind = match symbol.st_type() {
                elf::STT_FUNC | elf::STT_GNU_IFUNC => SymbolKind::Function,
                elf::STT_OBJECT => SymbolKind::Data,
                elf::STT_TLS => SymbolKind::ThreadLocal,
                elf::STT_NOTYPE => SymbolKind::Other,
                _ => continue,
            };
            let Ok(name) = table.symbol_name(endian, symbol) else {
                continue;
            };
            if name.is_empty() {
                continue;
            }
            let local = symbol.st_bind() == elf::STB_LOCAL;
            if let (true, Some(file)) = (local, &source_file) {
                local_files.insert(symbol.st_value(endian), file.clone());
            }
            // A library's variable copied into the executable (`stderr`, `optarg`: a copy
            // relocation) is named with its version in `.symtab` (`stderr@GLIBC_2.2.5`); a
            // patch's reference names it without, and binds to this copy as the library does.
            let name = String::from_utf8_lossy(name);
            let name = name.split('@').next().unwrap_or_default();
            if name.is_empty() {
                continue;
            }
            symbols
                .entry(name.to_string())
                .or_default()
                .push(Definition {
                    address: symbol.st_value(endian),
                    size: symbol.st_size(endian),
                    kind,
                    local,
                });
        }
        let promoted = promoted_names(symbols.keys());
        let copies = promoted.clone();
        let mut pointers = HashMap::new();
        let dynamic = file.elf_dynamic_symbol_table();
        if let Some(relocations) = file.dynamic_relocations() {
            for (address, relocation) in relocations {
                let object::RelocationFlags::Elf { r_type } = relocation.flags() else {
                    continue;
                };
                let symbol = match relocation.target() {
                    RelocationTarget::Symbol(index) => dynamic
                        .symbol(index)
                        .ok()
                        .and_then(|s| dynamic.symbol_name(endian, s).ok())
                        .map(|n| String::from_utf8_lossy(n).into_owned()),
                    _ => None,
                };
                let addend = relocation.addend();
                let pointer = match (r_type, symbol) {
                    (elf::R_X86_64_RELATIVE, _) => Pointer::Address(addend as u64),
                    (elf::R_X86_64_TPOFF64, Some(name)) => Pointer::ThreadOffset(name, addend),
                    (elf::R_X86_64_GLOB_DAT | elf::R_X86_64_JUMP_SLOT, Some(name)) => {
                        Pointer::Symbol(name, 0)
                    }
                    (elf::R_X86_64_64, Some(name)) => Pointer::Symbol(name, addend),
                    _ => continue,
                };
                pointers.insert(address, pointer);
            }
        }
        let plt = file
            .sections()
            .filter(|s| matches!(s.name(), Ok(".plt" | ".plt.sec" | ".plt.got")))
            .map(|s| (s.address(), s.address() + s.size()))
            .collect();
        Ok(Program {
            build_id,
            rustc_comment,
            pie,
            data,
            segments,
            symbols,
            local_files,
            promoted,
            copies,
            imports,
            pointers,
            plt,
            tls_block,
        })
    }

    /// The definitions of `name` (several for a local symbol instantiated in several units).
    ///
    /// A name LLVM promoted out of its codegen unit (`X.llvm.<module hash>`, ThinLTO within a
    /// crate) carries a hash of the unit's contents, which an edit elsewhere in the unit
    /// changes: such a name matches the program's one promoted name of the same `X` (kpatch
    /// ignores gcc's `.NNN` suffixes the same way).
    pub fn definitions(&self, name: &str) -> &[Definition] {
        self.canonical(name)
            .and_then(|n| self.symbols.get(n))
            .map_or(&[], Vec::as_slice)
    }

    /// The source file a local definition came from (its `STT_FILE`: `server.c`); `None` for
    /// a global one.
    pub fn file_of(&self, definition: &Definition) -> Option<&str> {
        definition
            .local
            .then(|| self.local_files.get(&definition.address))
            .flatten()
            .map(String::as_str)
    }

    /// The definitions of `name` that code of source file `file` sees: its own local ones and
    /// the global ones, when `file` defines or sees any (a C `static` of one name in several
    /// files); else all of them.
    pub fn definitions_in(&self, name: &str, file: Option<&str>) -> Vec<Definition> {
        let all = self.definitions(name);
        let Some(file) = file else {
            return all.to_vec();
        };
        let seen: Vec<Definition> = all
            .iter()
            .filter(|d| !d.local || self.file_of(d) == Some(file))
            .copied()
            .collect();
        if seen.is_empty() {
            all.to_vec()
        } else {
            seen
        }
    }

    /// Every source file (`STT_FILE`) the program's local symbols name.
    pub fn files(&self) -> std::collections::BTreeSet<&str> {
        self.local_files.values().map(String::as_str).collect()
    }

    /// Whether the program defines `name` (see [`Program::definitions`]).
    pub fn defines(&self, name: &str) -> bool {
        self.canonical(name).is_some()
    }

    /// Keeps the promoted-name matching of [`Program::definitions`] to names the rebuild
    /// promoted once: when it promoted several copies of `X` (one per codegen unit), which one
    /// the program kept is not known by name.
    pub fn restrict_promoted<'a>(&mut self, rebuilt: impl Iterator<Item = &'a str>) {
        let mut seen: HashMap<&str, std::collections::HashSet<&str>> = HashMap::new();
        for name in rebuilt {
            if let Some(base) = strip_llvm_suffix(name) {
                seen.entry(base).or_default().insert(name);
            }
        }
        for (base, names) in seen {
            if names.len() > 1 {
                self.promoted.remove(base);
            }
        }
    }

    /// Whether the program has, at `address`, a copy of the Rust instance `name` names: the
    /// same mangled symbol (its hash covers the instance's path and generic arguments), with or
    /// without an LLVM promotion suffix. A generic instance or drop glue is emitted in each
    /// codegen unit that uses it; ThinLTO promotes several of them (`X.llvm.<unit hash>`), the
    /// unit hashes change with any edit in the unit, and which copy a caller uses is the
    /// partitioner's choice: every copy is the same code, so a reference to any is the same
    /// reference. Names without a rustc hash (C statics, which may share a name across files)
    /// are never matched this way.
    pub fn has_copy_at(&self, name: &str, address: u64) -> bool {
        let base = strip_llvm_suffix(name).unwrap_or(name);
        if !has_rust_hash(base) {
            return false;
        }
        let at = |n: &str| {
            self.symbols
                .get(n)
                .is_some_and(|defs| defs.iter().any(|d| d.address == address))
        };
        at(base)
            || self
                .copies
                .get(base)
                .is_some_and(|c| c.iter().any(|n| at(n)))
    }

    /// The program's name for `name`: itself, or the program's promoted name of the same
    /// symbol (see [`Program::definitions`]).
    pub fn canonical<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        if self.symbols.contains_key(name) {
            return Some(name);
        }
        let base = strip_llvm_suffix(name)?;
        match self.promoted.get(base).map(Vec::as_slice) {
            Some([only]) => Some(only.as_str()),
            _ => None,
        }
    }

    /// Whether the program imports `name` from a library it needs (`memcpy`,
    /// `_Unwind_Resume`): the loader binds it as the dynamic linker did.
    pub fn imports(&self, name: &str) -> bool {
        self.imports.contains(name)
    }

    /// Whether a patch can bind to `name`: the program defines or imports it.
    pub fn provides(&self, name: &str) -> bool {
        self.defines(name) || self.imports(name)
    }

    /// Every symbol name the program defines.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.symbols.keys().map(String::as_str)
    }

    /// `len` bytes at `address`, as mapped (zeros past a segment's file size).
    pub fn bytes(&self, address: u64, len: u64) -> Option<std::borrow::Cow<'_, [u8]>> {
        let segment = self.segments.iter().find(|s| {
            address >= s.address
                && address
                    .checked_add(len)
                    .is_some_and(|end| end <= s.address + s.memory_size)
        })?;
        let start = address - segment.address;
        if start + len <= segment.file_size {
            let from = segment.file_offset + start as usize;
            return self
                .data
                .get(from..from + len as usize)
                .map(std::borrow::Cow::Borrowed);
        }
        let mut bytes = vec![0u8; len as usize];
        for (i, byte) in bytes.iter_mut().enumerate() {
            let at = start + i as u64;
            if at < segment.file_size {
                *byte = self.data[segment.file_offset + at as usize];
            }
        }
        Some(std::borrow::Cow::Owned(bytes))
    }

    /// The pointer the 8 bytes at `address` hold once the program is loaded.
    pub fn pointer(&self, address: u64) -> Option<Pointer> {
        if let Some(pointer) = self.pointers.get(&address) {
            return Some(pointer.clone());
        }
        // No dynamic relocation: the stored bytes are the value (a non-PIE program's address,
        // a null slot, a constant).
        let bytes = self.bytes(address, 8)?;
        Some(Pointer::Address(u64::from_le_bytes(
            bytes[..8].try_into().ok()?,
        )))
    }

    /// The thread-pointer offset of the thread-local at TLS-block offset `offset`.
    pub fn thread_offset(&self, offset: u64) -> Option<i64> {
        let (block, _) = self.tls_block?;
        Some(offset as i64 - block as i64)
    }

    /// The symbol a call to `address` reaches when `address` is a PLT entry: the entry's
    /// `jmp *slot(%rip)` names its GOT slot, and the slot its symbol.
    pub fn plt_target(&self, address: u64) -> Option<Pointer> {
        self.plt
            .iter()
            .find(|(start, end)| address >= *start && address < *end)?;
        let entry = self.bytes(address, 16)?;
        // `jmp *disp32(%rip)` (ff 25), possibly after `endbr64` and a `bnd` prefix.
        let at = entry.windows(2).position(|w| w == [0xff, 0x25])?;
        let disp = i32::from_le_bytes(entry.get(at + 2..at + 6)?.try_into().ok()?);
        let slot = (address + at as u64 + 6).wrapping_add_signed(i64::from(disp));
        self.pointer(slot)
    }

    /// The symbols defined at `address` (for messages).
    pub fn names_at(&self, address: u64) -> Vec<&str> {
        self.symbols
            .iter()
            .filter(|(_, defs)| {
                defs.iter()
                    .any(|d| d.address == address && d.kind != SymbolKind::ThreadLocal)
            })
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// A program assembled from parts, for the comparison's unit tests: one segment of `text`
    /// at `address`, `symbols` defined in it, `pointers` as dynamic relocations.
    #[cfg(test)]
    pub fn from_parts(
        address: u64,
        text: Vec<u8>,
        symbols: &[(&str, u64, u64, SymbolKind)],
        pointers: &[(u64, Pointer)],
    ) -> Program {
        let len = text.len() as u64;
        let mut map: HashMap<String, Vec<Definition>> = HashMap::new();
        for (name, address, size, kind) in symbols {
            map.entry(name.to_string()).or_default().push(Definition {
                address: *address,
                size: *size,
                kind: *kind,
                local: true,
            });
        }
        let promoted = promoted_names(map.keys());
        let copies = promoted.clone();
        Program {
            promoted,
            copies,
            build_id: "00".into(),
            rustc_comment: None,
            pie: true,
            data: text,
            segments: vec![Segment {
                address,
                file_offset: 0,
                file_size: len,
                memory_size: len,
            }],
            symbols: map,
            local_files: HashMap::new(),
            imports: Default::default(),
            pointers: pointers.iter().cloned().collect(),
            plt: Vec::new(),
            tls_block: Some((0x100, 16)),
        }
    }
}

/// Whether `name` is a legacy-mangled Rust symbol ending in its hash (`..17h<16 hex>E`).
fn has_rust_hash(name: &str) -> bool {
    name.starts_with("_ZN")
        && name.len() > 20
        && name.ends_with('E')
        && name[..name.len() - 1]
            .rsplit_once("17h")
            .is_some_and(|(_, h)| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `X` of a name LLVM promoted out of its unit (`X.llvm.<digits>`).
pub fn strip_llvm_suffix(name: &str) -> Option<&str> {
    let (base, hash) = name.rsplit_once(".llvm.")?;
    (!hash.is_empty() && hash.bytes().all(|b| b.is_ascii_digit())).then_some(base)
}

fn promoted_names<'a>(names: impl Iterator<Item = &'a String>) -> HashMap<String, Vec<String>> {
    let mut promoted: HashMap<String, Vec<String>> = HashMap::new();
    for name in names {
        if let Some(base) = strip_llvm_suffix(name) {
            promoted
                .entry(base.to_string())
                .or_default()
                .push(name.clone());
        }
    }
    promoted
}
