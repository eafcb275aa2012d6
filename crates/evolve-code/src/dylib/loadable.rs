//! What loading a shared object would do, read the way the dynamic loader reads it.
//!
//! The loader ignores section headers: it maps the `PT_LOAD` segments, reads the dynamic array
//! *from the mapped memory* at `PT_DYNAMIC`'s address, and follows its addresses (`DT_STRTAB`,
//! `DT_RELA`, …) into the mapped segments. So this module does the same on the file's bytes:
//! every address is translated through the `PT_LOAD` segments to the file bytes the loader would
//! map there (zero past a segment's file size), and nothing comes from section headers, which a
//! file may omit or contradict.
//!
//! An object is loadable without running any of its code only if:
//! - it is an x86-64 ELF64 little-endian shared object (not a position-independent
//!   executable, which is `ET_DYN` too but marked `DF_1_PIE`) whose `PT_LOAD` segments are in
//!   ascending order and map one file byte to each page they share (so "the bytes at an
//!   address" means one thing);
//! - its dynamic array has no initializer or finalizer (`DT_INIT`, `DT_INIT_ARRAY`,
//!   `DT_PREINIT_ARRAY`, `DT_FINI`, `DT_FINI_ARRAY` with entries): the loader runs those at
//!   `dlopen` and `dlclose`;
//! - no filter, auxiliary or audit library (`DT_FILTER`, `DT_AUXILIARY`, `DT_AUDIT`,
//!   `DT_DEPAUDIT`): the loader would load, and initialise, another object;
//! - every `DT_NEEDED` library is one the program already has loaded (else loading it runs its
//!   initializers);
//! - no IFUNC: no `R_X86_64_IRELATIVE` relocation and no symbol of its own of type
//!   `STT_GNU_IFUNC` (the loader calls an IFUNC's resolver to bind a relocation against it, and
//!   `dlsym` calls it too). References to other objects' IFUNCs (the C library's `memmove`)
//!   are fine: their resolvers are the C library's, already run for the program;
//! - its stack is not executable (`PT_GNU_STACK` with `PF_X` would make the loader turn every
//!   thread's stack executable).

use object::elf;
use object::pod::{from_bytes, slice_from_bytes};
use object::LittleEndian as LE;

type Header = elf::FileHeader64<LE>;
type Phdr = elf::ProgramHeader64<LE>;
type Dyn = elf::Dyn64<LE>;
type Rela = elf::Rela64<LE>;
type Rel = elf::Rel64<LE>;
type Sym = elf::Sym64<LE>;

/// Why an object is not loaded.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// It is not a well-formed x86-64 shared object.
    Malformed(String),
    /// Loading (or unloading) it would run code: what.
    RunsCode(String),
}

impl From<&str> for Refusal {
    fn from(reason: &str) -> Refusal {
        Refusal::Malformed(reason.to_string())
    }
}

impl From<String> for Refusal {
    fn from(reason: String) -> Refusal {
        Refusal::Malformed(reason)
    }
}

fn runs_code(reason: String) -> Refusal {
    Refusal::RunsCode(reason)
}

/// The `PT_LOAD` segments of a file: how the loader will map it.
struct Image<'a> {
    data: &'a [u8],
    loads: Vec<&'a Phdr>,
}

impl<'a> Image<'a> {
    /// The `len` bytes the loader maps at link-time address `vaddr`, if they lie inside one
    /// segment's file bytes. (Bytes past a segment's file size are zeros in memory; the
    /// tables read here never lie there in a loader-produced file, so they are refused.)
    fn at(&self, vaddr: u64, len: u64) -> Option<&'a [u8]> {
        let end = vaddr.checked_add(len)?;
        self.loads.iter().find_map(|p| {
            let start = p.p_vaddr.get(LE);
            let file_end = start.checked_add(p.p_filesz.get(LE))?;
            if vaddr < start || end > file_end {
                return None;
            }
            let offset = p.p_offset.get(LE).checked_add(vaddr - start)?;
            self.data
                .get(usize::try_from(offset).ok()?..usize::try_from(offset + len).ok()?)
        })
    }

    /// Bytes from `vaddr` to the end of its segment's file bytes.
    fn from(&self, vaddr: u64) -> Option<&'a [u8]> {
        self.loads.iter().find_map(|p| {
            let start = p.p_vaddr.get(LE);
            let file_end = start.checked_add(p.p_filesz.get(LE))?;
            if vaddr < start || vaddr >= file_end {
                return None;
            }
            let offset = usize::try_from(p.p_offset.get(LE).checked_add(vaddr - start)?).ok()?;
            let end = usize::try_from(p.p_offset.get(LE) + p.p_filesz.get(LE)).ok()?;
            self.data.get(offset..end)
        })
    }

    fn c_string(&self, vaddr: u64) -> Option<&'a str> {
        let bytes = self.from(vaddr)?;
        let len = bytes.iter().position(|b| *b == 0)?;
        std::str::from_utf8(&bytes[..len]).ok()
    }
}

/// The dynamic array's values by tag (the last value of a tag wins, as in the loader), and
/// every `DT_NEEDED` string offset.
struct Dynamic {
    entries: Vec<(i64, u64)>,
}

impl Dynamic {
    fn get(&self, tag: u32) -> Option<u64> {
        self.entries
            .iter()
            .rev()
            .find(|(t, _)| *t == i64::from(tag))
            .map(|e| e.1)
    }

    fn all(&self, tag: u32) -> impl Iterator<Item = u64> + '_ {
        self.entries
            .iter()
            .filter(move |(t, _)| *t == i64::from(tag))
            .map(|e| e.1)
    }
}

fn page_of(a: u64) -> u64 {
    a & !0xfff
}

/// Checks that loading `data` runs none of its code (see the module docs). `loaded` says
/// whether a `DT_NEEDED` name is a library the program already has.
pub(crate) fn check(data: &[u8], loaded: &dyn Fn(&str) -> bool) -> Result<(), Refusal> {
    let (header, _) = from_bytes::<Header>(data).map_err(|_| "not an ELF64 object")?;
    let ident = &header.e_ident;
    if ident.magic != elf::ELFMAG
        || ident.class != elf::ELFCLASS64
        || ident.data != elf::ELFDATA2LSB
    {
        return Err("not an ELF64 little-endian object".into());
    }
    if header.e_type.get(LE) != elf::ET_DYN || header.e_machine.get(LE) != elf::EM_X86_64 {
        return Err("not an x86-64 shared object".into());
    }
    let phoff = usize::try_from(header.e_phoff.get(LE)).map_err(|_| "bad e_phoff")?;
    let phnum = usize::from(header.e_phnum.get(LE));
    if usize::from(header.e_phentsize.get(LE)) != std::mem::size_of::<Phdr>() {
        return Err("unexpected program header size".into());
    }
    let (phdrs, _) = data
        .get(phoff..)
        .and_then(|d| slice_from_bytes::<Phdr>(d, phnum).ok())
        .ok_or("its program headers lie outside the file (truncated?)")?;
    let loads: Vec<&Phdr> = phdrs
        .iter()
        .filter(|p| p.p_type.get(LE) == elf::PT_LOAD)
        .collect();
    if loads.is_empty() {
        return Err("it has no PT_LOAD segment".into());
    }
    for pair in loads.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let a_end = a.p_vaddr.get(LE).saturating_add(a.p_memsz.get(LE));
        if b.p_vaddr.get(LE) < a_end {
            return Err("its PT_LOAD segments overlap or are out of order".into());
        }
        // A page both segments touch: the loader maps it from both, which is only unambiguous
        // if both map the same file bytes there.
        let shares_page = page_of(a_end.saturating_sub(1)) >= page_of(b.p_vaddr.get(LE));
        let a_delta = a.p_vaddr.get(LE).wrapping_sub(a.p_offset.get(LE));
        let b_delta = b.p_vaddr.get(LE).wrapping_sub(b.p_offset.get(LE));
        if shares_page && a_delta != b_delta {
            return Err("two PT_LOAD segments map different file bytes to one page".into());
        }
    }
    for p in &loads {
        let end = p.p_offset.get(LE).checked_add(p.p_filesz.get(LE));
        if end.is_none_or(|e| e > data.len() as u64) {
            return Err("a PT_LOAD segment lies outside the file (truncated?)".into());
        }
    }
    if phdrs
        .iter()
        .any(|p| p.p_type.get(LE) == elf::PT_GNU_STACK && p.p_flags.get(LE) & elf::PF_X != 0)
    {
        return Err(runs_code(
            "it asks for an executable stack (PT_GNU_STACK with PF_X): loading it would make \
             every thread's stack executable"
                .into(),
        ));
    }
    let image = Image { data, loads };
    let dynamic = phdrs
        .iter()
        .find(|p| p.p_type.get(LE) == elf::PT_DYNAMIC)
        .ok_or("it has no PT_DYNAMIC segment")?;
    let raw = image
        .at(dynamic.p_vaddr.get(LE), dynamic.p_memsz.get(LE))
        .ok_or("its PT_DYNAMIC segment is not inside a PT_LOAD segment's file bytes")?;
    let count = raw.len() / std::mem::size_of::<Dyn>();
    let (dyns, _) = slice_from_bytes::<Dyn>(raw, count).map_err(|_| "misaligned PT_DYNAMIC")?;
    let mut entries = Vec::new();
    for d in dyns {
        let tag = d.d_tag.get(LE) as i64;
        if tag == i64::from(elf::DT_NULL) {
            break;
        }
        entries.push((tag, d.d_val.get(LE)));
    }
    let dynamic = Dynamic { entries };
    // A position-independent executable is ET_DYN too, and has initializers: the loader refuses
    // to `dlopen` one, so say what it is before anything else.
    if dynamic
        .get(elf::DT_FLAGS_1)
        .is_some_and(|flags| flags & u64::from(elf::DF_1_PIE) != 0)
    {
        return Err(
            "not an x86-64 shared object: it is a position-independent executable \
                    (DF_1_PIE)"
                .into(),
        );
    }
    check_initializers(&dynamic)?;
    check_needed(&image, &dynamic, loaded)?;
    check_ifunc(&image, &dynamic)
}

fn check_initializers(dynamic: &Dynamic) -> Result<(), Refusal> {
    let code_runners = [
        (elf::DT_INIT, None, "DT_INIT"),
        (
            elf::DT_INIT_ARRAY,
            Some(elf::DT_INIT_ARRAYSZ),
            "DT_INIT_ARRAY",
        ),
        (
            elf::DT_PREINIT_ARRAY,
            Some(elf::DT_PREINIT_ARRAYSZ),
            "DT_PREINIT_ARRAY",
        ),
        (elf::DT_FINI, None, "DT_FINI"),
        (
            elf::DT_FINI_ARRAY,
            Some(elf::DT_FINI_ARRAYSZ),
            "DT_FINI_ARRAY",
        ),
    ];
    for (tag, size, name) in code_runners {
        let present = match size {
            None => dynamic.get(tag).is_some(),
            Some(size) => dynamic.get(tag).is_some() && dynamic.get(size).unwrap_or(0) > 0,
        };
        if present {
            let when = if name.contains("FINI") {
                "unloading"
            } else {
                "loading"
            };
            return Err(runs_code(format!(
                "it has {name}: {when} it would run its code (patches are linked without start \
                 files and must have no initializers or finalizers)"
            )));
        }
    }
    for (tag, name) in [
        (elf::DT_FILTER, "DT_FILTER"),
        (elf::DT_AUXILIARY, "DT_AUXILIARY"),
        (elf::DT_AUDIT, "DT_AUDIT"),
        (elf::DT_DEPAUDIT, "DT_DEPAUDIT"),
    ] {
        if dynamic.get(tag).is_some() {
            return Err(runs_code(format!(
                "it has {name}: loading it would load (and initialise) another object"
            )));
        }
    }
    Ok(())
}

fn check_needed(
    image: &Image<'_>,
    dynamic: &Dynamic,
    loaded: &dyn Fn(&str) -> bool,
) -> Result<(), Refusal> {
    let needed: Vec<u64> = dynamic.all(elf::DT_NEEDED).collect();
    if needed.is_empty() {
        return Ok(());
    }
    let strtab = dynamic
        .get(elf::DT_STRTAB)
        .ok_or("it has DT_NEEDED entries but no DT_STRTAB")?;
    for offset in needed {
        let name = strtab
            .checked_add(offset)
            .and_then(|a| image.c_string(a))
            .ok_or("a DT_NEEDED name lies outside the string table")?;
        if !loaded(name) {
            return Err(runs_code(format!(
                "it needs {name}, which this program has not loaded: loading it would run \
                 {name}'s initializers"
            )));
        }
    }
    Ok(())
}

/// The relocation tables the loader processes, as `(r_info)` values.
fn relocation_infos(image: &Image<'_>, dynamic: &Dynamic) -> Result<Vec<u64>, Refusal> {
    let mut infos = Vec::new();
    let mut rela_table = |at: Option<u64>, size: Option<u64>, what: &str| -> Result<(), Refusal> {
        let (Some(at), Some(size)) = (at, size) else {
            return Ok(());
        };
        let bytes = image
            .at(at, size)
            .ok_or_else(|| format!("its {what} table lies outside its segments"))?;
        let n = bytes.len() / std::mem::size_of::<Rela>();
        let (relas, _) =
            slice_from_bytes::<Rela>(bytes, n).map_err(|_| format!("misaligned {what}"))?;
        infos.extend(relas.iter().map(|r| r.r_info.get(LE)));
        Ok(())
    };
    rela_table(
        dynamic.get(elf::DT_RELA),
        dynamic.get(elf::DT_RELASZ),
        "DT_RELA",
    )?;
    match dynamic.get(elf::DT_PLTREL) {
        Some(t) if t == u64::from(elf::DT_RELA) => rela_table(
            dynamic.get(elf::DT_JMPREL),
            dynamic.get(elf::DT_PLTRELSZ),
            "DT_JMPREL",
        )?,
        Some(t) if t == u64::from(elf::DT_REL) => rel_table(
            image,
            dynamic.get(elf::DT_JMPREL),
            dynamic.get(elf::DT_PLTRELSZ),
            &mut infos,
        )?,
        Some(_) => return Err("its DT_PLTREL is neither DT_RELA nor DT_REL".into()),
        None if dynamic.get(elf::DT_JMPREL).is_some() => {
            return Err("it has DT_JMPREL without DT_PLTREL".into())
        }
        None => {}
    }
    rel_table(
        image,
        dynamic.get(elf::DT_REL),
        dynamic.get(elf::DT_RELSZ),
        &mut infos,
    )?;
    Ok(infos)
}

fn rel_table(
    image: &Image<'_>,
    at: Option<u64>,
    size: Option<u64>,
    infos: &mut Vec<u64>,
) -> Result<(), Refusal> {
    let (Some(at), Some(size)) = (at, size) else {
        return Ok(());
    };
    let bytes = image
        .at(at, size)
        .ok_or("its DT_REL table lies outside its segments")?;
    let n = bytes.len() / std::mem::size_of::<Rel>();
    let (rels, _) = slice_from_bytes::<Rel>(bytes, n).map_err(|_| "misaligned DT_REL")?;
    infos.extend(rels.iter().map(|r| r.r_info.get(LE)));
    Ok(())
}

/// The object's dynamic symbols, as many as its hash table (which `dlsym` and the loader look
/// symbols up in) covers, or as relocations reference.
fn symbols<'a>(
    image: &Image<'a>,
    dynamic: &Dynamic,
    referenced: u32,
) -> Result<&'a [Sym], Refusal> {
    let Some(symtab) = dynamic.get(elf::DT_SYMTAB) else {
        return Ok(&[]);
    };
    let mut count = referenced;
    if let Some(bytes) = dynamic.get(elf::DT_HASH).and_then(|a| image.from(a)) {
        let table = object::read::elf::HashTable::<elf::FileHeader64<LE>>::parse(LE, bytes)
            .map_err(|_| "its DT_HASH table is malformed")?;
        count = count.max(table.symbol_table_length());
    }
    if let Some(bytes) = dynamic.get(elf::DT_GNU_HASH).and_then(|a| image.from(a)) {
        let table = object::read::elf::GnuHashTable::<elf::FileHeader64<LE>>::parse(LE, bytes)
            .map_err(|_| "its DT_GNU_HASH table is malformed")?;
        count = count.max(
            table
                .symbol_table_length(LE)
                .ok_or("its DT_GNU_HASH table is malformed")?,
        );
    }
    let size = u64::from(count) * std::mem::size_of::<Sym>() as u64;
    let bytes = image
        .at(symtab, size)
        .ok_or("its dynamic symbol table lies outside its segments")?;
    let (syms, _) =
        slice_from_bytes::<Sym>(bytes, count as usize).map_err(|_| "misaligned DT_SYMTAB")?;
    Ok(syms)
}

fn check_ifunc(image: &Image<'_>, dynamic: &Dynamic) -> Result<(), Refusal> {
    let infos = relocation_infos(image, dynamic)?;
    if infos
        .iter()
        .any(|i| (*i & 0xffff_ffff) as u32 == elf::R_X86_64_IRELATIVE)
    {
        return Err(runs_code(
            "it has an R_X86_64_IRELATIVE relocation: loading it would call its IFUNC resolver"
                .into(),
        ));
    }
    let referenced = infos
        .iter()
        .map(|i| (*i >> 32) as u32)
        .max()
        .map_or(0, |m| m + 1);
    let syms = symbols(image, dynamic, referenced)?;
    let strtab = dynamic.get(elf::DT_STRTAB);
    // Any IFUNC the object defines: relocations against it, and `dlsym` of it, call its
    // resolver (the relocations reference symbols by index, all within `syms`).
    let own_ifunc = syms.iter().position(|s| {
        s.st_info & 0xf == elf::STT_GNU_IFUNC && s.st_shndx.get(LE) != elf::SHN_UNDEF
    });
    if let Some(i) = own_ifunc {
        let name = strtab
            .and_then(|t| t.checked_add(u64::from(syms[i].st_name.get(LE))))
            .and_then(|a| image.c_string(a))
            .unwrap_or("?");
        return Err(runs_code(format!(
            "it defines the IFUNC symbol {name}: binding or looking it up would call its \
             resolver"
        )));
    }
    Ok(())
}
