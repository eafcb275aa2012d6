//! Loading patch objects: shared objects whose code the engine may point stubs at.
//!
//! A patch is a shared object built by Evolve's patch builder. Loading one runs none of its
//! code, and what is loaded is exactly what was checked:
//!
//! 1. [`PatchFile::read`] reads the file once, from a regular file only (a FIFO, a device or a
//!    directory is refused before anything is read: see [`file`]).
//! 2. The caller verifies the bytes (the hot-update layer checks the manifest's SHA-256 and what
//!    the patch was built for).
//! 3. [`PatchObject::load`] checks what the dynamic loader would do with those bytes, read the
//!    way the loader reads them (program headers and `PT_DYNAMIC`, never section headers: see
//!    [`loadable`]): no initializers or finalizers, no IFUNC resolvers of its own, no library
//!    the program has not loaded already. Then it copies the bytes into a sealed `memfd` and
//!    loads that (`/proc/self/fd/N`) with `RTLD_NOW | RTLD_LOCAL`: every undefined symbol is
//!    bound at once against the program (which exports its symbols), so a missing symbol fails
//!    the load with the loader's message naming it, before anything changed.
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
//! # What the safe API assumes
//!
//! Opening runs none of the object's code (no initializers; the loader checks are this
//! module's job). Its code runs later, through [`Code`] and [`Stub`] values whose fingerprints
//! come from its symbol names, and through [`PatchObject::transfer_static`], which finds the
//! program's static itself: nothing here takes a raw address to run code on. What remains
//! assumed is the file's provenance — that a file whose manifest the hot layer verified
//! against this program (build id, toolchain, fingerprints) was made by Evolve's builder from
//! Rust source, so its `__evolve_*` symbols are what the macros emitted. Whoever can name the
//! file to the agent (the process's own user, peer credentials checked) can already replace
//! the executable; signatures (the fleet's ed25519) authenticate files from elsewhere.
//!
//! # Safety
//!
//! `dlopen` of an object with no initializers, no IFUNC of its own and only libraries that are
//! loaded already runs no code of the object (nor of any new object); `dlsym` of a symbol that
//! is not an IFUNC only looks up an address. The memfd is sealed before `dlopen`, so the bytes
//! mapped are the bytes checked. Stubs found in a patch are registered as patch sites under the
//! same contract as stubs of the program (they were emitted by the same macro).
//! [`PatchObject::run_transfer`] is `unsafe`: its caller vouches for the static's address.
#![allow(unsafe_code)]

pub mod file;
mod loadable;

pub use file::{read_regular_file, PatchFile, MAX_PATCH_BYTES};

use crate::error::{Error, ErrorKind, Result};
use crate::hidden::Hidden;
use crate::scan::{scan_for_references, ScanReport, Scope};
use crate::site::PatchSite;
use crate::stub::{Code, Stub};
use object::elf;
use object::read::elf::ElfFile64;
use object::{Object, ObjectSection, ObjectSymbol};
use std::mem::ManuallyDrop;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn image_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::new(ErrorKind::Image {
        path: path.display().to_string(),
        reason: reason.into(),
    })
}

impl PatchFile {
    /// Checks that loading the file into this process would run none of its code (see
    /// [`loadable`]), without loading it.
    ///
    /// # Errors
    /// [`ErrorKind::UnsafeObject`] naming what loading would run; [`ErrorKind::Image`] if the
    /// bytes are not a well-formed x86-64 shared object.
    pub fn check_loadable(&self) -> Result<()> {
        let loaded = crate::inspect::loaded_names();
        loadable::check(self.bytes(), &|needed| is_loaded(needed, &loaded)).map_err(|refusal| {
            match refusal {
                loadable::Refusal::Malformed(reason) => image_error(self.path(), reason),
                loadable::Refusal::RunsCode(reason) => Error::new(ErrorKind::UnsafeObject {
                    path: self.path().display().to_string(),
                    reason,
                }),
            }
        })
    }

    /// The file bytes of the data symbol `name` (its size, or up to the first NUL if it has
    /// none), found through the file's symbol tables: how a patch's manifest is found before
    /// anything in the file is trusted.
    ///
    /// # Example
    ///
    /// ```
    /// let file = evolve_code::dylib::PatchFile::read("/proc/self/exe".as_ref()).unwrap();
    /// let err = file.symbol("no_such_symbol_anywhere").unwrap_err();
    /// assert!(err.to_string().contains("no symbol no_such_symbol_anywhere"), "{err}");
    /// ```
    pub fn symbol(&self, name: &str) -> Result<Range<usize>> {
        let path = self.path();
        let data = self.bytes();
        let file = ElfFile64::<object::Endianness>::parse(data)
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
        let outside = || image_error(path, format!("symbol {name} lies outside its section"));
        let (offset, size) = section
            .file_range()
            .ok_or_else(|| image_error(path, format!("symbol {name} is not in the file")))?;
        let start = symbol
            .address()
            .checked_sub(section.address())
            .filter(|s| *s < size)
            .ok_or_else(outside)?;
        let bytes = &data[(offset + start) as usize..(offset + size) as usize];
        let len = if symbol.size() == 0 {
            bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len()) as u64
        } else {
            symbol.size()
        };
        if start + len > size {
            return Err(outside());
        }
        let begin = (offset + start) as usize;
        Ok(begin..begin + len as usize)
    }
}

/// A list of hidden address ranges.
type HiddenRanges = Vec<(Hidden, Hidden)>;

/// The loaded object's `PT_LOAD` segments, hidden: (executable ones, all).
fn segments_of(
    library: &libloading::os::unix::Library,
    path: &Path,
    data: &[u8],
) -> Result<(HiddenRanges, HiddenRanges, Vec<Hidden>)> {
    use object::read::elf::ProgramHeader;
    let file = ElfFile64::<object::Endianness>::parse(data)
        .map_err(|e| image_error(path, format!("not an ELF64 object: {e}")))?;
    // The load bias: a defined dynamic symbol's run-time address minus its link-time value.
    let symbol = file
        .dynamic_symbols()
        .find(|s| s.is_definition() && s.address() != 0 && !s.name().unwrap_or("").is_empty())
        .ok_or_else(|| image_error(path, "no defined dynamic symbol to find its load address"))?;
    let name = symbol.name().unwrap_or_default();
    // SAFETY: looking up an address calls no code.
    let runtime = unsafe { library.get::<*const ()>(name.as_bytes()) }
        .map(|s| *s as usize)
        .map_err(|e| image_error(path, format!("missing symbol {name}: {e}")))?;
    let bias = runtime.wrapping_sub(symbol.address() as usize);
    let (mut exec, mut all) = (Vec::new(), Vec::new());
    let mut boundaries = vec![Hidden::new(bias)];
    let endian = file.endian();
    for header in file.elf_program_headers() {
        if header.p_type(endian) == elf::PT_GNU_EH_FRAME {
            boundaries.push(Hidden::new(
                bias.wrapping_add(header.p_vaddr(endian) as usize),
            ));
        }
        if header.p_type(endian) != elf::PT_LOAD {
            continue;
        }
        let start = bias.wrapping_add(header.p_vaddr(endian) as usize);
        let end = start + header.p_memsz(endian) as usize;
        boundaries.extend([Hidden::new(start), Hidden::new(end)]);
        let range = (Hidden::new(start), Hidden::new(end));
        all.push(range);
        if header.p_flags(endian) & elf::PF_X != 0 {
            exec.push(range);
        }
    }
    Ok((exec, all, boundaries))
}

/// Whether `needed` (a `DT_NEEDED` name) names a library the program has loaded: a name with
/// a slash is a path, which the loader opens as is; a bare name (`libc.so.6`) is matched against
/// the file names of the loaded objects.
fn is_loaded(needed: &str, loaded: &[String]) -> bool {
    if needed.contains('/') {
        loaded.iter().any(|l| l == needed)
    } else {
        loaded.iter().any(|l| l.rsplit('/').next() == Some(needed))
    }
}

/// A loaded patch object.
#[derive(Debug)]
pub struct PatchObject {
    library: ManuallyDrop<libloading::os::unix::Library>,
    path: PathBuf,
    /// The sealed memfd the object was loaded from. Kept open while the object is loaded: the
    /// loader knows the object by the name `/proc/self/fd/N`, which must not name another file
    /// (a later `dlopen` of the same name would get this object back).
    memfd: Option<OwnedFd>,
    /// Address ranges, hidden from reference scans (see [`crate::hidden`]).
    exec_ranges: Vec<(Hidden, Hidden)>,
    mapped: Vec<(Hidden, Hidden)>,
    /// Words that pointed into the object right after loading, before any of its code could
    /// run: the loader's bookkeeping, ignored by reference scans while they keep their value.
    loader_words: Vec<(usize, Hidden)>,
    /// Addresses no object of the program can have (segment boundaries, the base, the
    /// unwinder's `.eh_frame_hdr`) but the loader's lookup tables hold and rewrite after every
    /// `dlopen`/`dlclose`: words equal to them are not references.
    boundaries: Vec<Hidden>,
    unloaded: bool,
}

/// What [`PatchObject::unload`] concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unload {
    /// Nothing referred to the object: it is unmapped and its range reserved `PROT_NONE`.
    Unloaded(ScanReport),
    /// Something may still reach it: it stays loaded. The report says where.
    Referenced(ScanReport),
}

impl PatchObject {
    /// Reads the file at `path` and loads it: [`PatchFile::read`] then [`PatchObject::load`],
    /// for callers with nothing to verify in between.
    ///
    /// # Example
    ///
    /// ```
    /// let err = evolve_code::dylib::PatchObject::open("/etc/hostname".as_ref()).unwrap_err();
    /// assert!(err.to_string().contains("not an ELF64"), "{err}");
    /// ```
    pub fn open(path: &Path) -> Result<PatchObject> {
        PatchObject::load(&PatchFile::read(path)?)
    }

    /// Checks that loading `file` runs none of its code and loads exactly its bytes (see the
    /// module docs).
    ///
    /// # Errors
    /// [`ErrorKind::UnsafeObject`] naming what loading would run (an initializer, an IFUNC
    /// resolver, a library not loaded yet); [`ErrorKind::Image`] if it is not an x86-64 shared
    /// object or the loader refuses it (with the loader's message, e.g. an undefined symbol).
    ///
    /// # Example
    ///
    /// ```
    /// // The program's own file is an executable, not a shared object: refused before loading.
    /// let exe = evolve_code::dylib::PatchFile::read("/proc/self/exe".as_ref()).unwrap();
    /// let err = evolve_code::dylib::PatchObject::load(&exe).unwrap_err();
    /// assert!(err.to_string().contains("not an x86-64 shared object"), "{err}");
    /// ```
    pub fn load(file: &PatchFile) -> Result<PatchObject> {
        let path = file.path();
        let data = file.bytes();
        file.check_loadable()?;
        let memfd = file.sealed()?;
        let name = format!("/proc/self/fd/{}", memfd.as_raw_fd());
        // SAFETY: the memfd holds exactly the bytes checked above and is sealed against any
        // change; loading them runs no code of the object (no initializers, no IFUNC of its
        // own) nor of any new object (every DT_NEEDED library is loaded already); RTLD_NOW
        // binds every symbol now or fails.
        let library = unsafe {
            libloading::os::unix::Library::open(
                Some(&name),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL,
            )
        }
        .map_err(|e| image_error(path, format!("the dynamic loader refused it: {e}")))?;
        // The segments from the file's program headers and the load bias: no list of plain
        // run-time addresses is built (see `crate::hidden`).
        let (exec_ranges, mapped, boundaries) = segments_of(&library, path, data)?;
        // No code of the object has run yet (it has no initializers): every word that points
        // into it now is the loader's.
        let loader_words = crate::scan::words_pointing_into(&mapped, &mapped)?;
        Ok(PatchObject {
            library: ManuallyDrop::new(library),
            path: path.to_path_buf(),
            memfd: Some(memfd),
            exec_ranges,
            mapped,
            loader_words,
            boundaries,
            unloaded: false,
        })
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The executable address ranges of the loaded object, hidden (see [`crate::hidden`]).
    pub fn exec_ranges(&self) -> &[(Hidden, Hidden)] {
        &self.exec_ranges
    }

    /// Whether `address` lies in the object's code.
    pub fn contains(&self, address: usize) -> bool {
        !self.unloaded
            && self
                .exec_ranges
                .iter()
                .any(|r| (r.0.get()..r.1.get()).contains(&address))
    }

    /// Whether the object was unloaded.
    pub fn is_unloaded(&self) -> bool {
        self.unloaded
    }

    /// Unloads the object if nothing can reach it any more, naming it `name` in diagnostics.
    ///
    /// Under the engine's write lock (no site changes meanwhile): refuses if any registered
    /// patch site still branches into the object; forgets the sites inside it (its stubs);
    /// stops every other thread and scans their registers and stacks (`Scope::Stacks`), and
    /// every private writable word (`Scope::Memory`), for an address inside any of its
    /// segments, ignoring the loader's own bookkeeping recorded at load; resumes them; and only
    /// if nothing was found, unloads it (`dlclose`) and reserves its range `PROT_NONE`, so a
    /// stale pointer that escaped the scan faults with a diagnostic naming `name`.
    pub fn unload(&mut self, scope: Scope, timeout: Duration, name: &str) -> Result<Unload> {
        if self.unloaded {
            return Err(image_error(&self.path, "already unloaded"));
        }
        let mut writer = crate::write::lock();
        let inside = |a: usize| {
            self.mapped
                .iter()
                .any(|r| (r.0.get()..r.1.get()).contains(&a))
        };
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
        let loader_words = &self.loader_words;
        // The object's own memory, page-rounded: its `.bss` tail is an anonymous mapping past
        // the last file-backed page.
        let page = crate::sys::memory::page_size();
        let own = |a: usize| {
            self.mapped.iter().any(|r| {
                (crate::sys::memory::page_of(r.0.get())..r.1.get().next_multiple_of(page))
                    .contains(&a)
            })
        };
        let boundaries = &self.boundaries;
        let excluded = |at: usize, value: usize| {
            own(at)
                || boundaries.iter().any(|b| b.get() == value)
                || loader_words
                    .iter()
                    .any(|(w, v)| *w == at && v.get() == value)
        };
        let report = scan_for_references(&self.mapped, scope, timeout, &excluded)?;
        if !report.references.is_empty() {
            return Ok(Unload::Referenced(report));
        }
        writer.forget_sites_in(&inside);
        drop(writer);
        // SAFETY: the scan proved no thread can reach the object: no register, stack word (or
        // memory word, for Scope::Memory) points into it, no patch site branches into it, and
        // the engine holds its address only hidden. Nothing of it is used after this.
        let library = unsafe { ManuallyDrop::take(&mut self.library) };
        self.unloaded = true;
        library
            .close()
            .map_err(|e| image_error(&self.path, format!("dlclose: {e}")))?;
        // The loader forgot the name `/proc/self/fd/N` with the object: the number may be
        // reused now.
        self.memfd = None;
        let maps = crate::sys::memory::mappings()?;
        for (start, end) in &self.mapped {
            let (start, end) = (
                crate::sys::memory::page_of(start.get()),
                end.get().next_multiple_of(crate::sys::memory::page_size()),
            );
            if maps
                .iter()
                .any(|m| m.range.start < end && start < m.range.end)
            {
                return Err(image_error(
                    &self.path,
                    "still mapped after dlclose (the loader keeps it: NODELETE or another handle)",
                ));
            }
            let none = crate::sys::memory::Protection {
                read: false,
                write: false,
                exec: false,
            };
            // Best effort: if another mapping took the range meanwhile, there is nothing to
            // reserve (and nothing of ours to protect).
            if crate::sys::memory::map_fixed_noreplace(start, end - start, none)?.is_some() {
                crate::fault::record(start, end, name);
            }
        }
        Ok(Unload::Unloaded(report))
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

    /// Runs the patch's state-transfer function `symbol` (named `__evolve_transfer_…__NAME` by
    /// `#[evolve::transfer(NAME)]`) on the program's static `program_static` (its symbol in the
    /// executable, as the patch's manifest names it).
    ///
    /// The engine finds the static itself: a data symbol of the executable, in writable memory,
    /// whose name ends in the `NAME` the transfer was generated for.
    ///
    /// # Errors
    /// [`ErrorKind::Image`] if the static is missing, not a writable data object, or not the
    /// one the transfer names; if `symbol` is not a transfer function of the patch.
    pub fn transfer_static(&self, symbol: &str, program_static: &str) -> Result<()> {
        let exe = crate::inspect::executable()?;
        let Some(old) = exe
            .symbol_by_name(program_static)
            .filter(|s| s.kind == crate::inspect::SymbolKind::Object)
        else {
            return Err(image_error(
                &self.path,
                format!("the program has no static {program_static}"),
            ));
        };
        let name = old.demangled.rsplit("::").next().unwrap_or(&old.demangled);
        if !symbol.ends_with(&format!("__{name}")) {
            return Err(image_error(
                &self.path,
                format!(
                    "{symbol} does not convert the program's static {}",
                    old.demangled
                ),
            ));
        }
        // SAFETY: `old` is the program's instance of the static named by the transfer, found in
        // the executable's symbol table; the transfer was generated for that static by
        // `#[evolve::transfer]` in the patch (its manifest was verified against this program).
        unsafe { self.run_transfer(symbol, old.address) }
    }

    /// Runs the patch's state-transfer function `symbol` (named `__evolve_transfer_…` by
    /// `#[evolve::transfer]`) on the program's static at `old`.
    ///
    /// # Safety
    ///
    /// `old` must be the address of the running program's instance of the static the transfer
    /// was generated for (same old type); [`PatchObject::transfer_static`] finds it by name.
    /// The engine still checks that it lies in writable memory.
    pub unsafe fn run_transfer(&self, symbol: &str, old: usize) -> Result<()> {
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
        // signature; `old` is the program's instance of the static (caller; checked writable,
        // so mapped).
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
