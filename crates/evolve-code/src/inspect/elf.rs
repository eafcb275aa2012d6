//! Reading an image's ELF file: its function and data symbols and its build id.
//!
//! Symbols come from both `.symtab` (everything the linker kept, absent from stripped files) and
//! `.dynsym` (exported symbols, always present in shared libraries). Addresses here are link-time
//! values; the caller adds the load bias.

use std::path::Path;

use object::elf::{
    FileHeader64, ET_DYN, ET_EXEC, SHN_ABS, SHN_UNDEF, STB_GLOBAL, STB_LOCAL, STB_WEAK, STT_FUNC,
    STT_GNU_IFUNC, STT_OBJECT,
};
use object::read::elf::{ElfFile64, FileHeader, Sym, SymbolTable};
use object::{Endianness, Object, ObjectSection, SymbolIndex};

use super::symbols::SymbolKind;
use crate::error::{Error, ErrorKind, Result};

/// A symbol as found in the file, before demangling and relocation.
#[derive(Debug)]
pub(super) struct RawSymbol {
    pub name: String,
    /// Link-time address (`st_value`).
    pub value: u64,
    pub size: u64,
    pub kind: SymbolKind,
    /// Which of several same-named symbols a name lookup should prefer: lower is better.
    pub preference: u8,
}

/// What [`read`] extracts from an ELF file.
#[derive(Debug)]
pub(super) struct ElfInfo {
    pub symbols: Vec<RawSymbol>,
    /// The `NT_GNU_BUILD_ID` descriptor of the file, if it has one.
    pub build_id: Option<Vec<u8>>,
    /// Whether the file has a `.symtab` (it does unless stripped).
    pub has_symtab: bool,
    /// The link-time address range of the `.got` section, if there is one.
    pub got: Option<std::ops::Range<u64>>,
}

/// Reads and parses the ELF file at `open_path`; errors name `shown_path`.
///
/// `open_path` differs from `shown_path` for the main executable, which is opened through
/// `/proc/self/exe` so that the file actually mapped is read even if it was replaced or deleted.
pub(super) fn read(open_path: &Path, shown_path: &Path) -> Result<ElfInfo> {
    let image_error = |reason: String| {
        Error::new(ErrorKind::Image {
            path: shown_path.display().to_string(),
            reason,
        })
    };
    let data = std::fs::read(open_path)
        .map_err(|e| image_error(format!("cannot read {}: {e}", open_path.display())))?;
    let file = ElfFile64::<Endianness>::parse(&*data)
        .map_err(|e| image_error(format!("not a 64-bit ELF file: {e}")))?;
    let endian = file.endian();
    let e_type = file.elf_header().e_type(endian);
    if e_type != ET_EXEC && e_type != ET_DYN {
        return Err(image_error(format!(
            "ELF type {e_type} is neither an executable nor a shared object"
        )));
    }
    let build_id = file
        .build_id()
        .map_err(|e| image_error(format!("malformed notes: {e}")))?
        .map(<[u8]>::to_vec);

    let mut symbols = Vec::new();
    let symtab = file.elf_symbol_table();
    collect(symtab, endian, |_| false, &mut symbols);
    // Several versions of one name may be exported (memcpy@GLIBC_2.2.5, memcpy@@GLIBC_2.14);
    // the hidden ones are not what the dynamic linker resolves the bare name to.
    let versions = file
        .elf_section_table()
        .versions(endian, &*data)
        .ok()
        .flatten();
    let hidden = |index: SymbolIndex| {
        versions
            .as_ref()
            .is_some_and(|v| v.version_index(endian, index).is_hidden())
    };
    collect(
        file.elf_dynamic_symbol_table(),
        endian,
        hidden,
        &mut symbols,
    );

    let got = file
        .section_by_name(".got")
        .map(|got| got.address()..got.address() + got.size());
    Ok(ElfInfo {
        symbols,
        build_id,
        has_symtab: !symtab.is_empty(),
        got,
    })
}

/// Appends the defined function and data symbols of `table` to `out`.
fn collect(
    table: &SymbolTable<'_, FileHeader64<Endianness>>,
    endian: Endianness,
    hidden: impl Fn(SymbolIndex) -> bool,
    out: &mut Vec<RawSymbol>,
) {
    for (index, sym) in table.enumerate() {
        let kind = match sym.st_type() {
            // An IFUNC's value is its resolver, which is also the code found at that address.
            STT_FUNC | STT_GNU_IFUNC => SymbolKind::Function,
            STT_OBJECT => SymbolKind::Object,
            // STT_TLS values are offsets into the TLS block, not addresses; the other types are
            // not functions or data objects.
            _ => continue,
        };
        let shndx = sym.st_shndx(endian);
        if shndx == SHN_UNDEF || shndx == SHN_ABS {
            continue;
        }
        let Ok(name) = table.symbol_name(endian, sym) else {
            continue;
        };
        if name.is_empty() {
            continue;
        }
        let binding = match sym.st_bind() {
            STB_GLOBAL => 0,
            STB_WEAK => 1,
            STB_LOCAL => 2,
            _ => 3,
        };
        out.push(RawSymbol {
            name: String::from_utf8_lossy(name).into_owned(),
            value: sym.st_value(endian),
            size: sym.st_size(endian),
            kind,
            preference: binding + if hidden(index) { 4 } else { 0 },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, contents: &[u8]) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("evolve-inspect-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn image_error(result: Result<ElfInfo>) -> (String, String) {
        let err = result.expect_err("parsing must fail");
        let message = err.to_string();
        match err.kind() {
            ErrorKind::Image { path, reason } => {
                assert!(!reason.is_empty());
                (path.clone(), message)
            }
            other => panic!("expected ErrorKind::Image, got {other:?}"),
        }
    }

    #[test]
    fn non_elf_file_is_an_image_error_naming_the_path() {
        let path = temp_file("not-elf", b"#!/bin/sh\necho hello\n");
        let (err_path, message) = image_error(read(&path, &path));
        assert_eq!(err_path, path.display().to_string());
        assert!(message.contains(&*path.to_string_lossy()), "{message}");
        assert!(message.contains("ELF"), "{message}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn missing_and_truncated_files_are_image_errors() {
        let missing = std::env::temp_dir().join("evolve-inspect-does-not-exist");
        let (_, message) = image_error(read(&missing, &missing));
        assert!(
            message.contains("evolve-inspect-does-not-exist"),
            "{message}"
        );

        let exe = std::fs::read("/proc/self/exe").unwrap();
        for len in [0, 4, 64, 200] {
            let path = temp_file(&format!("truncated-{len}"), &exe[..len]);
            image_error(read(&path, &path));
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn own_executable_has_symtab_functions_and_a_build_id() {
        let exe = Path::new("/proc/self/exe");
        let info = read(exe, exe).unwrap();
        assert!(info.has_symtab);
        assert!(info.build_id.is_some());
        assert!(info.symbols.iter().any(|s| s.kind == SymbolKind::Function));
    }

    #[test]
    fn stripped_copy_parses_without_symtab() {
        let Ok(exe) = std::fs::read("/proc/self/exe") else {
            return;
        };
        let path = temp_file("stripped", &exe);
        let stripped = std::process::Command::new("strip").arg(&path).status();
        if !stripped.is_ok_and(|s| s.success()) {
            eprintln!("`strip` not available; skipping");
            std::fs::remove_file(path).unwrap();
            return;
        }
        let info = read(&path, &path).unwrap();
        assert!(!info.has_symtab);
        assert!(info.build_id.is_some(), "strip keeps the build id note");
        std::fs::remove_file(path).unwrap();
    }
}
