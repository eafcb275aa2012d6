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
//! 1. **Open once** (`file`): a regular file or nothing (FIFOs, devices, directories refused
//!    before a byte is read); the manifest's SHA-256 ([`patch_digest`]) verified.
//! 2. **Check** the object: x86-64 `ET_REL`; no initializers (`.init_array`, `.ctors`,
//!    `.preinit_array`, `.fini_array`, `.dtors`: no patch code runs before apply switches to
//!    it); no thread-local definitions (a patch uses the program's thread-locals); no common
//!    symbols; no section both writable and executable.
//! 3. **Bind** every undefined symbol a relocation uses through a [`Resolve`]r (the standard
//!    one is [`ProgramResolver`]: the executable's full symbol table with its load bias, then the
//!    libraries). A symbol that cannot be bound refuses the patch, naming it.
//! 4. **Lay out** (`layout`) text, rodata (with a small GOT) and data near the executable.
//! 5. **Relocate** (`relocate`) every reference as directly as its distance allows.
//! 6. **Protect** text `r-x`, rodata `r--`, data `rw-` (never writable and executable), and
//!    **register** `.eh_frame` with the unwinder (`unwind`).
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
mod load;
mod program;
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
use std::path::{Path, PathBuf};
use std::time::Duration;

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
        load::Loading::new(path, &data)?.finish(resolver, manifest)
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

    /// The patch's functions (`STT_FUNC` symbols) with their address ranges (start, end;
    /// hidden, see [`crate::Hidden`]), in address order; nothing once unloaded. Where the engine
    /// looks for the patch's direct calls ([`crate::redirect::References`]) and for what follows
    /// a function (padding, or the next one).
    pub fn functions(&self) -> Vec<(&str, (Hidden, Hidden))> {
        if self.unloaded {
            return Vec::new();
        }
        let mut out: Vec<(&str, (Hidden, Hidden))> = self
            .symbols
            .iter()
            .filter(|s| s.function)
            .map(|s| {
                let start = self.base.get() + s.offset;
                (
                    s.name.as_str(),
                    (Hidden::new(start), Hidden::new(start + s.size)),
                )
            })
            .collect();
        out.sort_by_key(|(name, range)| (range.0.get(), *name));
        out
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
