//! Loading patch objects: shared objects whose code the engine may point stubs at.
//!
//! A patch is a shared object built by Evolve's patch builder. [`PatchObject::open`] checks the
//! file before the dynamic loader touches it — an ELF shared object for this machine, with **no
//! initializers** (`DT_INIT`, `DT_INIT_ARRAY`, `DT_PREINIT_ARRAY`), so loading it runs none of its
//! code — then loads it with `RTLD_NOW | RTLD_LOCAL`: every undefined symbol is bound at once,
//! against the program (which exports its symbols), so a missing symbol fails the load with the
//! loader's message naming it, before anything changed.
//!
//! Code inside a loaded patch is reached only through [`Code`] and [`Stub`] values named by the
//! symbol convention of `#[evolve::hot]`: `__evolve_impl_{id}_{fingerprint:016x}` for an
//! implementation, `__evolve_adaptor_{id}_{fingerprint:016x}` for an adaptor with the old
//! signature, `__evolve_stub_{id}` for a stub. The fingerprint in the name is the macro's, so the
//! [`Code`] made from it carries the right one.
//!
//! A loaded object is never unloaded implicitly (dropping a [`PatchObject`] keeps it mapped):
//! threads may still run its code. Unloading belongs to reclamation, which proves no thread can.
//!
//! # Safety
//!
//! `dlopen` of an object without initializers runs no code of the object; `dlsym` only looks
//! up addresses. Stubs found in a patch are registered as patch sites under the same contract
//! as stubs of the program (they were emitted by the same macro).
#![allow(unsafe_code)]

use crate::error::{Error, ErrorKind, Result};
use crate::site::PatchSite;
use crate::stub::{Code, Stub};
use object::elf;
use object::read::elf::{Dyn, ElfFile64, FileHeader, SectionHeader};
use object::{Object, ObjectSymbol};
use std::mem::ManuallyDrop;
use std::ops::Range;
use std::path::{Path, PathBuf};

fn image_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::new(ErrorKind::Image {
        path: path.display().to_string(),
        reason: reason.into(),
    })
}

/// Reads the bytes of the data symbol `name` (up to its size, or to the first NUL if it has
/// none) from an ELF file without loading it: how a patch's manifest is read before anything is
/// trusted.
pub fn read_symbol_bytes(path: &Path, name: &str) -> Result<Vec<u8>> {
    let data = std::fs::read(path).map_err(|e| image_error(path, e.to_string()))?;
    let file = ElfFile64::<object::Endianness>::parse(&*data)
        .map_err(|e| image_error(path, format!("not an ELF64 object: {e}")))?;
    let symbol = file
        .dynamic_symbols()
        .chain(file.symbols())
        .find(|s| s.name() == Ok(name) && s.is_definition())
        .ok_or_else(|| image_error(path, format!("no symbol {name}")))?;
    let section = symbol
        .section_index()
        .and_then(|i| file.section_by_index(i).ok())
        .ok_or_else(|| image_error(path, format!("symbol {name} has no section")))?;
    let bytes = object::ObjectSection::data(&section)
        .map_err(|e| image_error(path, format!("unreadable section of {name}: {e}")))?;
    let start = (symbol.address() - object::ObjectSection::address(&section)) as usize;
    let mut end = start + symbol.size() as usize;
    if symbol.size() == 0 {
        end = bytes[start.min(bytes.len())..]
            .iter()
            .position(|b| *b == 0)
            .map_or(bytes.len(), |p| start + p);
    }
    bytes
        .get(start..end)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| image_error(path, format!("symbol {name} lies outside its section")))
}

/// Checks that `data` is an x86-64 ELF shared object with no initializers.
fn check_loadable(path: &Path, data: &[u8]) -> Result<()> {
    let file = ElfFile64::<object::Endianness>::parse(data)
        .map_err(|e| image_error(path, format!("not an ELF64 object: {e}")))?;
    let header = file.elf_header();
    let endian = file.endian();
    if header.e_type(endian) != elf::ET_DYN || header.e_machine(endian) != elf::EM_X86_64 {
        return Err(image_error(path, "not an x86-64 shared object"));
    }
    let sections = header
        .sections(endian, data)
        .map_err(|e| image_error(path, e.to_string()))?;
    for section in sections.iter() {
        if let Ok(Some((entries, _))) = section.dynamic(endian, data) {
            for entry in entries {
                let tag = entry.d_tag(endian) as u32;
                let value = entry.d_val(endian);
                let initializer = tag == elf::DT_INIT
                    || (tag == elf::DT_INIT_ARRAYSZ && value > 0)
                    || (tag == elf::DT_PREINIT_ARRAYSZ && value > 0);
                if initializer {
                    return Err(image_error(
                        path,
                        "has initializers (DT_INIT / DT_INIT_ARRAY): loading it would run its \
                         code; patches are linked without start files",
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A loaded patch object.
#[derive(Debug)]
pub struct PatchObject {
    library: ManuallyDrop<libloading::os::unix::Library>,
    path: PathBuf,
    exec_ranges: Vec<Range<usize>>,
}

impl PatchObject {
    /// Checks and loads the shared object at `path` (see the module docs).
    ///
    /// # Example
    ///
    /// ```
    /// let err = evolve_code::dylib::PatchObject::open("/etc/hostname".as_ref()).unwrap_err();
    /// assert!(err.to_string().contains("not an ELF64 object"));
    /// ```
    pub fn open(path: &Path) -> Result<PatchObject> {
        let data = std::fs::read(path).map_err(|e| image_error(path, e.to_string()))?;
        check_loadable(path, &data)?;
        // SAFETY: the object has no initializers (checked above), so loading it runs none of its
        // code; RTLD_NOW binds every symbol now or fails.
        let library = unsafe {
            libloading::os::unix::Library::open(
                Some(path),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL,
            )
        }
        .map_err(|e| image_error(path, format!("the dynamic loader refused it: {e}")))?;
        let exec_ranges = crate::inspect::loaded_exec_ranges(path).unwrap_or_default();
        Ok(PatchObject {
            library: ManuallyDrop::new(library),
            path: path.to_path_buf(),
            exec_ranges,
        })
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The executable address ranges of the loaded object.
    pub fn exec_ranges(&self) -> &[Range<usize>] {
        &self.exec_ranges
    }

    /// Whether `address` lies in the object's code.
    pub fn contains(&self, address: usize) -> bool {
        self.exec_ranges.iter().any(|r| r.contains(&address))
    }

    fn lookup(&self, symbol: &str) -> Result<usize> {
        // SAFETY: looking up a symbol's address calls no code; the address is used only as a
        // number until it is checked to lie in the object's code.
        let address = unsafe { self.library.get::<*const ()>(symbol.as_bytes()) }
            .map(|s| *s as usize)
            .map_err(|e| image_error(&self.path, format!("missing symbol {symbol}: {e}")))?;
        if !self.contains(address) {
            return Err(image_error(
                &self.path,
                format!("symbol {symbol} at {address:#x} is not in the patch's code"),
            ));
        }
        Ok(address)
    }

    /// The implementation of hot function `id` with signature `fingerprint` in this patch.
    pub fn implementation(&self, id: &str, fingerprint: u64) -> Result<Code> {
        let address = self.lookup(&format!("__evolve_impl_{id}_{fingerprint:016x}"))?;
        Ok(Code::new(address, fingerprint))
    }

    /// The adaptor of hot function `id` with the old signature `fingerprint`.
    pub fn adaptor(&self, id: &str, fingerprint: u64) -> Result<Code> {
        let address = self.lookup(&format!("__evolve_adaptor_{id}_{fingerprint:016x}"))?;
        Ok(Code::new(address, fingerprint))
    }

    /// Runs the patch's state-transfer function `symbol` (named `__evolve_transfer_…` by
    /// `#[evolve::transfer]`) on the program's static at `old`.
    ///
    /// `old` must be the address of a static of the running program, found by its symbol; the
    /// engine checks that it lies in writable memory of the program's image.
    pub fn run_transfer(&self, symbol: &str, old: usize) -> Result<()> {
        if !symbol.starts_with("__evolve_transfer_") {
            return Err(image_error(
                &self.path,
                format!("{symbol} is not a transfer function"),
            ));
        }
        // SAFETY: looking up an address calls no code.
        let function = unsafe {
            self.library
                .get::<extern "C" fn(*const u8)>(symbol.as_bytes())
        }
        .map_err(|e| image_error(&self.path, format!("missing symbol {symbol}: {e}")))?;
        let maps = crate::sys::memory::mappings()?;
        let writable = crate::sys::memory::mapping_containing(&maps, old)
            .is_some_and(|m| m.protection.read && m.protection.write);
        if !writable {
            return Err(image_error(
                &self.path,
                format!("the old static for {symbol} at {old:#x} is not in writable memory"),
            ));
        }
        // SAFETY: `#[evolve::transfer]` emits `__evolve_transfer_*` functions with exactly this
        // signature; `old` is the program's instance of the static (checked writable, so mapped).
        (*function)(old as *const u8);
        Ok(())
    }

    /// The patch's own stub of hot function `id`, whose callers use signature `fingerprint`.
    pub fn stub(&self, id: &str, fingerprint: u64) -> Result<Stub> {
        let address = self.lookup(&format!("__evolve_stub_{id}"))?;
        // SAFETY: the stub was emitted by `#[evolve::hot]` for function `id`; its callers in the
        // patch use the implementation's signature, whose fingerprint the caller passes from the
        // patch's own implementation symbol.
        let site = unsafe { PatchSite::register(address)? };
        Ok(Stub::from_parts(site, fingerprint))
    }
}
