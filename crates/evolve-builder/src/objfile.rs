//! Relocatable objects (`ET_REL`) read into owned form: the rebuilt crates' `.rcgu.o` files and
//! the format-2 patches already applied.
//!
//! rustc compiles every function and every static into a section of its own
//! (`-ffunction-sections`/`-fdata-sections` equivalents), so a function is its symbol's range in
//! its section, and the relocations of that range are its references: the unit kpatch's
//! create-diff-object correlates and compares.

use crate::error::{Error, Result};
use object::elf;
use object::read::elf::{ElfFile64, SectionHeader, Sym};
use object::{Endianness, Object, ObjectSection, RelocationTarget};
use std::collections::HashMap;

/// A relocation of a section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloc {
    /// Offset in the section.
    pub offset: u64,
    /// `R_X86_64_*`.
    pub r_type: u32,
    /// Index of the target in [`ObjectFile::symbols`].
    pub symbol: usize,
    /// The explicit addend.
    pub addend: i64,
}

/// A section.
#[derive(Debug, Clone)]
pub struct Section {
    /// ELF index.
    pub index: usize,
    /// Name (`.text._ZN…`, `.rodata..Lanon.…`).
    pub name: String,
    /// `sh_type`.
    pub sh_type: u32,
    /// `sh_flags`.
    pub flags: u64,
    /// `sh_addralign`.
    pub align: u64,
    /// `sh_entsize` (merge sections).
    pub entsize: u64,
    /// Size (also of `.bss`-like sections, whose `data` is empty).
    pub size: u64,
    /// Contents (empty for `SHT_NOBITS`).
    pub data: Vec<u8>,
    /// Relocations, by offset.
    pub relocations: Vec<Reloc>,
}

impl Section {
    /// Whether it holds code.
    pub fn is_text(&self) -> bool {
        self.flags & u64::from(elf::SHF_EXECINSTR) != 0
    }

    /// Whether it is loaded (code or data).
    pub fn is_alloc(&self) -> bool {
        self.flags & u64::from(elf::SHF_ALLOC) != 0
    }

    /// Whether it is writable data.
    pub fn is_writable(&self) -> bool {
        self.flags & u64::from(elf::SHF_WRITE) != 0
    }

    /// Whether it holds thread-locals' initial images.
    pub fn is_tls(&self) -> bool {
        self.flags & u64::from(elf::SHF_TLS) != 0
    }

    /// Whether it is a merge section (deduplicated strings or constants by the linker).
    pub fn is_merge(&self) -> bool {
        self.flags & u64::from(elf::SHF_MERGE) != 0
    }

    /// Whether it holds NUL-terminated strings (with [`Section::is_merge`]).
    pub fn is_strings(&self) -> bool {
        self.flags & u64::from(elf::SHF_STRINGS) != 0
    }

    /// `len` bytes at `offset` (zeros for `.bss`).
    pub fn bytes(&self, offset: u64, len: u64) -> Option<std::borrow::Cow<'_, [u8]>> {
        if offset.checked_add(len)? > self.size {
            return None;
        }
        if self.sh_type == elf::SHT_NOBITS {
            return Some(std::borrow::Cow::Owned(vec![0; len as usize]));
        }
        self.data
            .get(offset as usize..(offset + len) as usize)
            .map(std::borrow::Cow::Borrowed)
    }

    /// The relocations in `[start, end)`.
    pub fn relocations_in(&self, start: u64, end: u64) -> &[Reloc] {
        let from = self.relocations.partition_point(|r| r.offset < start);
        let to = self.relocations.partition_point(|r| r.offset < end);
        &self.relocations[from..to]
    }
}

/// Whether `name` is one the compiler gave anonymous data: an assembler label (`.L…`) or an
/// allocation rustc named when LLVM promoted it out of its unit (`anon.<hash>.<n>`,
/// `alloc_<hash>`, with a `.llvm.<n>` suffix).
pub fn is_anonymous(name: &str) -> bool {
    name.starts_with('.') || name.starts_with("anon.") || name.starts_with("alloc_")
}

/// A symbol.
#[derive(Debug, Clone)]
pub struct Symbol {
    /// Name (empty for section symbols).
    pub name: String,
    /// `STT_*`.
    pub st_type: u8,
    /// `STB_*`.
    pub bind: u8,
    /// Section index, `None` when undefined (or absolute).
    pub section: Option<usize>,
    /// Offset in its section.
    pub value: u64,
    /// Size.
    pub size: u64,
}

impl Symbol {
    /// Whether it is a section symbol.
    pub fn is_section(&self) -> bool {
        self.st_type == elf::STT_SECTION
    }

    /// Whether it is a function.
    pub fn is_function(&self) -> bool {
        matches!(self.st_type, elf::STT_FUNC | elf::STT_GNU_IFUNC)
    }

    /// Whether it is a named static or thread-local (a `static` of the source, whose identity
    /// matters: one of every static), as opposed to anonymous data the compiler named for the
    /// assembler (`.L…` labels; most anonymous constants have no symbol at all).
    pub fn is_static(&self) -> bool {
        // rustc names anonymous allocations `anon.<hash>.<n>` / `alloc_<hash>` when LLVM
        // promotes them out of their unit (`….llvm.<n>`).
        matches!(self.st_type, elf::STT_OBJECT | elf::STT_TLS)
            && !self.name.is_empty()
            && !is_anonymous(&self.name)
    }

    /// Whether it is local (`STB_LOCAL`).
    pub fn is_local(&self) -> bool {
        self.bind == elf::STB_LOCAL
    }
}

/// A relocatable object.
#[derive(Debug, Clone)]
pub struct ObjectFile {
    /// Where it came from (`libfoo-….rlib(foo-….rcgu.o)`).
    pub origin: String,
    /// The crate it belongs to.
    pub krate: String,
    /// Sections by ELF index (index 0 is the null section).
    pub sections: Vec<Section>,
    /// Symbols by ELF index.
    pub symbols: Vec<Symbol>,
    /// The program's source file this object was compiled from, as its `STT_FILE` symbol names
    /// it (`server.c`), when the builder knows it (C translation units): its local references
    /// bind to that file's definitions, and the patch carries the name for the loader.
    pub source_file: Option<String>,
    by_name: HashMap<String, usize>,
}

impl ObjectFile {
    /// Parses an `ET_REL` x86-64 object.
    pub fn parse(data: &[u8], origin: &str, krate: &str) -> Result<ObjectFile> {
        let file = ElfFile64::<Endianness>::parse(data).map_err(|e| Error::object(origin, e))?;
        if file.kind() != object::ObjectKind::Relocatable
            || file.architecture() != object::Architecture::X86_64
        {
            return Err(Error::object(origin, "not an x86-64 relocatable object"));
        }
        let endian = file.endian();
        let mut sections = vec![Section {
            index: 0,
            name: String::new(),
            sh_type: elf::SHT_NULL,
            flags: 0,
            align: 0,
            entsize: 0,
            size: 0,
            data: Vec::new(),
            relocations: Vec::new(),
        }];
        for section in file.sections() {
            let header = section.elf_section_header();
            let sh_type = header.sh_type(endian);
            let data = if sh_type == elf::SHT_NOBITS {
                Vec::new()
            } else {
                section
                    .data()
                    .map_err(|e| Error::object(origin, e))?
                    .to_vec()
            };
            let mut relocations = Vec::new();
            for (offset, relocation) in section.relocations() {
                let object::RelocationFlags::Elf { r_type } = relocation.flags() else {
                    continue;
                };
                let RelocationTarget::Symbol(symbol) = relocation.target() else {
                    continue;
                };
                relocations.push(Reloc {
                    offset,
                    r_type,
                    symbol: symbol.0,
                    addend: relocation.addend(),
                });
            }
            relocations.sort_by_key(|r| r.offset);
            let index = section.index().0;
            while sections.len() < index {
                let filler = sections.len();
                sections.push(Section {
                    index: filler,
                    ..sections[0].clone()
                });
            }
            sections.push(Section {
                index,
                name: section.name().unwrap_or_default().to_string(),
                sh_type,
                flags: header.sh_flags(endian),
                align: header.sh_addralign(endian),
                entsize: header.sh_entsize(endian),
                size: header.sh_size(endian),
                data,
                relocations,
            });
        }
        let table = file.elf_symbol_table();
        let mut symbols = Vec::with_capacity(table.len());
        let mut by_name = HashMap::new();
        for (index, symbol) in table.enumerate() {
            let name = table
                .symbol_name(endian, symbol)
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .unwrap_or_default();
            let shndx = symbol.st_shndx(endian);
            let section = (shndx != elf::SHN_UNDEF && shndx < elf::SHN_LORESERVE)
                .then_some(usize::from(shndx));
            if !name.is_empty() && section.is_some() {
                by_name.entry(name.clone()).or_insert(index.0);
            }
            symbols.push(Symbol {
                name,
                st_type: symbol.st_type(),
                bind: symbol.st_bind(),
                section,
                value: symbol.st_value(endian),
                size: symbol.st_size(endian),
            });
        }
        Ok(ObjectFile {
            origin: origin.to_string(),
            krate: krate.to_string(),
            sections,
            symbols,
            source_file: None,
            by_name,
        })
    }

    /// The defined symbol named `name`, if any.
    pub fn defined(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The functions this object defines: symbol indices of sized `STT_FUNC`s in code sections.
    pub fn functions(&self) -> impl Iterator<Item = usize> + '_ {
        self.symbols.iter().enumerate().filter_map(|(i, s)| {
            let section = &self.sections[s.section?];
            (s.is_function() && s.size > 0 && section.is_text() && !s.name.is_empty()).then_some(i)
        })
    }

    /// The named symbol at offset 0 of `section` (what a section symbol of it stands for), if
    /// the section holds one function or static.
    pub fn symbol_at_start(&self, section: usize) -> Option<usize> {
        self.symbols.iter().position(|s| {
            s.section == Some(section)
                && s.value == 0
                && !s.name.is_empty()
                && !s.is_section()
                && matches!(
                    s.st_type,
                    elf::STT_FUNC | elf::STT_GNU_IFUNC | elf::STT_OBJECT | elf::STT_TLS
                )
        })
    }

    /// The section named `name`.
    pub fn section_named(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }
}

/// The `.rcgu.o` members of an rlib (other members: the crate's metadata).
pub fn rlib_members(data: &[u8], origin: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let archive =
        object::read::archive::ArchiveFile::parse(data).map_err(|e| Error::object(origin, e))?;
    let mut members = Vec::new();
    for member in archive.members() {
        let member = member.map_err(|e| Error::object(origin, e))?;
        let name = String::from_utf8_lossy(member.name()).into_owned();
        if !name.ends_with(".o") {
            continue;
        }
        let bytes = member.data(data).map_err(|e| Error::object(origin, e))?;
        members.push((name, bytes.to_vec()));
    }
    Ok(members)
}

/// Whether `data` is LLVM bitcode (an rlib of a link-time-optimised build holds bitcode, not
/// machine code).
pub fn is_bitcode(data: &[u8]) -> bool {
    data.starts_with(b"BC\xc0\xde") || data.starts_with(&[0xde, 0xc0, 0x17, 0x0b])
}
