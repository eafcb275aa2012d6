//! Addresses of functions in the target: the exported symbols of a mapped shared object, read
//! from its file and relocated by where the target mapped it.
//!
//! The file is opened through `/proc/PID/root` (the target's view of the file system, which may
//! be a container's) and must carry the build id found in the target's memory: a library
//! upgraded on disk since the process started has other addresses, and calling into them would
//! crash it.

use crate::error::{Error, Result};
use crate::memory::Memory;
use crate::process::Mapping;
use object::elf::{FileHeader64, PT_LOAD, PT_NOTE, STT_FUNC, STT_GNU_IFUNC};
use object::read::elf::{ElfFile64, ProgramHeader, Sym};
use object::{Endianness, Object};
use std::collections::HashMap;

/// The exported functions of one mapped object, at their addresses in the target.
#[derive(Debug, Clone)]
pub struct Exports {
    /// The object's path in the target.
    pub path: String,
    functions: HashMap<String, u64>,
}

impl Exports {
    /// The address of exported function `name` (its default version, if versioned).
    pub fn function(&self, name: &str) -> Option<u64> {
        self.functions.get(name).copied()
    }
}

/// Reads the exports of the object mapped from `path` in process `pid`.
///
/// # Errors
/// The file cannot be read, is not ELF, or is not the file the process mapped (build ids
/// differ).
pub fn exports(pid: u32, maps: &[Mapping], path: &str, memory: &Memory) -> Result<Exports> {
    let base = maps
        .iter()
        .filter(|m| m.path == path)
        .map(|m| m.start - m.offset)
        .min()
        .ok_or_else(|| {
            Error::system(
                format!("{path} is not mapped in process {pid}"),
                libc::ENOENT,
            )
        })?;
    let rooted = format!("/proc/{pid}/root{path}");
    let data = std::fs::read(&rooted)
        .or_else(|_| std::fs::read(path))
        .map_err(|e| {
            Error::system(
                format!("reading {path}"),
                e.raw_os_error().unwrap_or(libc::EIO),
            )
        })?;
    let file = ElfFile64::<Endianness>::parse(&*data).map_err(|e| {
        Error::system(
            format!("{path} is not a 64-bit ELF file ({e})"),
            libc::ENOEXEC,
        )
    })?;
    let endian = file.endian();
    // The load bias: where the first PT_LOAD (file offset 0) landed minus its link address.
    let first_vaddr = file
        .elf_program_headers()
        .iter()
        .filter(|p| p.p_type(endian) == PT_LOAD)
        .map(|p| p.p_vaddr(endian) - p.p_offset(endian))
        .min()
        .unwrap_or(0);
    let bias = base.wrapping_sub(first_vaddr);
    check_build_id(&file, bias, memory, path)?;

    let versions = file
        .elf_section_table()
        .versions(endian, &*data)
        .ok()
        .flatten();
    let mut functions = HashMap::new();
    let table = file.elf_dynamic_symbol_table();
    for (index, sym) in table.enumerate() {
        if !matches!(sym.st_type(), STT_FUNC | STT_GNU_IFUNC) || sym.st_shndx(endian) == 0 {
            continue;
        }
        let Ok(name) = table.symbol_name(endian, sym) else {
            continue;
        };
        let hidden = versions
            .as_ref()
            .is_some_and(|v| v.version_index(endian, index).is_hidden());
        let name = String::from_utf8_lossy(name).into_owned();
        let address = bias.wrapping_add(sym.st_value(endian));
        // A default version wins over a hidden (compat) one of the same name.
        if !hidden || !functions.contains_key(&name) {
            functions.insert(name, address);
        }
    }
    Ok(Exports {
        path: path.to_string(),
        functions,
    })
}

/// Refuses a file whose build id differs from the one mapped in the target.
fn check_build_id(
    file: &ElfFile64<'_, Endianness>,
    bias: u64,
    memory: &Memory,
    path: &str,
) -> Result<()> {
    let Ok(Some(on_disk)) = file.build_id() else {
        return Ok(());
    };
    let endian = file.endian();
    for ph in file.elf_program_headers() {
        if ph.p_type(endian) != PT_NOTE {
            continue;
        }
        let len = ph.p_memsz(endian) as usize;
        let Ok(bytes) = memory.read(bias.wrapping_add(ph.p_vaddr(endian)), len.min(4096)) else {
            continue;
        };
        let Ok(Some(mut notes)) = object::read::elf::NoteIterator::<FileHeader64<Endianness>>::new(
            endian,
            ph.p_align(endian),
            &bytes,
        )
        .map(Some) else {
            continue;
        };
        while let Ok(Some(note)) = notes.next() {
            if note.name() == b"GNU" && note.n_type(endian) == object::elf::NT_GNU_BUILD_ID {
                if note.desc() != on_disk {
                    return Err(Error::system(
                        format!(
                            "{path} on disk is not the file the process mapped (its build id \
                             differs: upgraded since the process started?); its addresses \
                             cannot be trusted"
                        ),
                        libc::ESTALE,
                    ));
                }
                return Ok(());
            }
        }
    }
    Ok(())
}
