//! [`Image`]: one loaded ELF object, joining what the loader reports (where it is mapped, its
//! in-memory build id) with what its file says (symbols).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::elf;
use super::loaded::{LoadedObject, Segment};
use super::symbols::{Symbol, SymbolKind, SymbolTable};
use crate::error::Result;

/// One loaded ELF object of this process (the executable or a shared library).
///
/// An `Image` is a snapshot taken when it was listed; cloning it is cheap (the data is shared).
/// Addresses are runtime addresses of this process.
#[derive(Debug, Clone)]
pub struct Image {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    load_bias: usize,
    is_main_executable: bool,
    exec_ranges: Vec<Range<usize>>,
    segments: Vec<Segment>,
    build_id: Option<Vec<u8>>,
    table: SymbolTable,
    symbol_error: Option<String>,
    got: Option<Range<usize>>,
}

impl Image {
    /// Builds the image of a loaded object, recording (rather than returning) any failure to
    /// read its symbols: the image is then reported with no symbols and [`Image::symbol_error`]
    /// says why.
    pub(super) fn from_loaded(object: &LoadedObject) -> Image {
        let (path, open_path) = paths(object);
        let (table, symbol_error, got) = match open_path {
            None => (
                SymbolTable::default(),
                Some("no file: the vdso or an object not loaded from a file".to_owned()),
                None,
            ),
            Some(open) => match symbols(object, &open, &path) {
                Ok((table, note, got)) => (table, note, got),
                Err(e) => (SymbolTable::default(), Some(e.to_string()), None),
            },
        };
        Image::assemble(object, path, table, symbol_error, got)
    }

    /// Like [`Image::from_loaded`], but a file that cannot be read or parsed is an error.
    pub(super) fn from_loaded_strict(object: &LoadedObject) -> Result<Image> {
        let (path, open_path) = paths(object);
        let open = open_path.unwrap_or_else(|| path.clone());
        let (table, note, got) = symbols(object, &open, &path)?;
        Ok(Image::assemble(object, path, table, note, got))
    }

    fn assemble(
        object: &LoadedObject,
        path: PathBuf,
        table: SymbolTable,
        symbol_error: Option<String>,
        got: Option<Range<usize>>,
    ) -> Image {
        Image {
            inner: Arc::new(Inner {
                path,
                load_bias: object.bias,
                is_main_executable: object.is_main,
                exec_ranges: object
                    .segments
                    .iter()
                    .filter(|s| s.is_exec())
                    .map(|s| s.range.clone())
                    .collect(),
                segments: object.segments.clone(),
                build_id: object.build_id.clone(),
                table,
                symbol_error,
                got,
            }),
        }
    }

    /// The file this image was loaded from (for the main executable, where `/proc/self/exe`
    /// points, which ends in ` (deleted)` if the file was removed).
    ///
    /// # Example
    /// ```
    /// let exe = evolve_code::inspect::executable()?;
    /// assert!(exe.path().is_absolute());
    /// # Ok::<(), evolve_code::error::Error>(())
    /// ```
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runtime address minus link-time address (0 for a non-PIE executable).
    ///
    /// # Example
    /// ```
    /// let exe = evolve_code::inspect::executable()?;
    /// let first = &exe.exec_ranges()[0];
    /// assert!(first.start >= exe.load_bias());
    /// # Ok::<(), evolve_code::error::Error>(())
    /// ```
    pub fn load_bias(&self) -> usize {
        self.inner.load_bias
    }

    /// Whether this is the program's executable rather than a shared library.
    ///
    /// # Example
    /// ```
    /// assert!(evolve_code::inspect::executable()?.is_main_executable());
    /// # Ok::<(), evolve_code::error::Error>(())
    /// ```
    pub fn is_main_executable(&self) -> bool {
        self.inner.is_main_executable
    }

    /// The GNU build id (`NT_GNU_BUILD_ID` note), read from the image's mapped `PT_NOTE`
    /// segment, so it describes the code actually loaded even if the file was replaced since.
    ///
    /// # Example
    /// ```
    /// if let Some(id) = evolve_code::inspect::executable()?.build_id() {
    ///     assert!(!id.is_empty());
    /// }
    /// # Ok::<(), evolve_code::error::Error>(())
    /// ```
    pub fn build_id(&self) -> Option<&[u8]> {
        self.inner.build_id.as_deref()
    }

    /// Runtime address ranges of the executable (`PF_X`) `PT_LOAD` segments.
    ///
    /// # Example
    /// ```
    /// let exe = evolve_code::inspect::executable()?;
    /// let here = evolve_code::inspect::executable as *const () as usize;
    /// assert!(exe.exec_ranges().iter().any(|r| r.contains(&here)));
    /// # Ok::<(), evolve_code::error::Error>(())
    /// ```
    pub fn exec_ranges(&self) -> &[Range<usize>] {
        &self.inner.exec_ranges
    }

    /// Functions and data objects from `.symtab` and `.dynsym`, deduplicated (the same name at
    /// the same address appears once; aliases with other names are kept), sorted by address.
    ///
    /// # Example
    /// ```
    /// let exe = evolve_code::inspect::executable()?;
    /// let syms = exe.symbols();
    /// assert!(syms.windows(2).all(|w| w[0].address <= w[1].address));
    /// # Ok::<(), evolve_code::error::Error>(())
    /// ```
    pub fn symbols(&self) -> &[Symbol] {
        self.inner.table.symbols()
    }

    /// The function symbols, in address order.
    ///
    /// # Example
    /// ```
    /// let exe = evolve_code::inspect::executable()?;
    /// assert!(exe.functions().any(|f| f.size > 0));
    /// # Ok::<(), evolve_code::error::Error>(())
    /// ```
    pub fn functions(&self) -> impl Iterator<Item = &Symbol> {
        self.symbols()
            .iter()
            .filter(|s| s.kind == SymbolKind::Function)
    }

    /// The symbol with exactly this raw (possibly mangled) name, or else with exactly this
    /// demangled name (a Rust path without hash, e.g. `my_crate::module::function`). If several
    /// symbols match, global beats weak beats local, then the lowest address wins.
    ///
    /// # Example
    /// ```
    /// let exe = evolve_code::inspect::executable()?;
    /// if let Some(main) = exe.symbol_by_name("main") {
    ///     assert_eq!(main.name, "main");
    /// }
    /// # Ok::<(), evolve_code::error::Error>(())
    /// ```
    pub fn symbol_by_name(&self, name: &str) -> Option<&Symbol> {
        self.inner.table.by_name(name)
    }

    /// The function symbol whose `[address, address + size)` contains `addr` (zero-sized symbols
    /// never match). Found by binary search.
    ///
    /// # Example
    /// ```
    /// let exe = evolve_code::inspect::executable()?;
    /// let f = evolve_code::inspect::executable as *const () as usize;
    /// if let Some(sym) = exe.function_containing(f + 1) {
    ///     assert!(sym.address <= f + 1 && f + 1 < sym.address + sym.size);
    /// }
    /// # Ok::<(), evolve_code::error::Error>(())
    /// ```
    pub fn function_containing(&self, addr: usize) -> Option<&Symbol> {
        self.inner.table.function_containing(addr)
    }

    /// Why [`Image::symbols`] is empty, if it is: the image has no file (the vdso), its file
    /// could not be read or parsed, the file on disk is no longer the one loaded (build ids
    /// differ), or it is stripped. `None` when symbols were found.
    ///
    /// # Example
    /// ```
    /// for image in evolve_code::inspect::images()? {
    ///     if let Some(why) = image.symbol_error() {
    ///         assert!(image.symbols().is_empty(), "{why}");
    ///     }
    /// }
    /// # Ok::<(), evolve_code::error::Error>(())
    /// ```
    pub fn symbol_error(&self) -> Option<&str> {
        self.inner.symbol_error.as_deref()
    }

    /// Runtime address range of the `.got` section: the slots through which the image's code
    /// calls and loads the address of functions it does not reach directly (`call
    /// *f@GOTPCREL(%rip)`, which rustc emits for calls into other crates and `ld` keeps). `None`
    /// if the file has no `.got` or could not be read.
    ///
    /// # Example
    /// ```
    /// let exe = evolve_code::inspect::executable()?;
    /// if let Some(got) = exe.got() {
    ///     assert!(got.start % 8 == 0 && got.len() % 8 == 0);
    /// }
    /// # Ok::<(), evolve_code::error::Error>(())
    /// ```
    pub fn got(&self) -> Option<Range<usize>> {
        self.inner.got.clone()
    }

    /// The function or data symbol containing `addr`.
    pub(super) fn symbol_containing(&self, addr: usize) -> Option<&Symbol> {
        self.function_containing(addr)
            .or_else(|| self.inner.table.object_containing(addr))
    }

    /// Whether `addr` lies in one of the image's `PT_LOAD` segments.
    pub(super) fn contains(&self, addr: usize) -> bool {
        self.inner.segments.iter().any(|s| s.range.contains(&addr))
    }

    /// The `PT_LOAD` segments, for re-identifying this image among the loaded objects.
    pub(super) fn segments(&self) -> &[Segment] {
        &self.inner.segments
    }
}

/// The path to show for `object`, and the path to open to read its file (`None` if it has none).
fn paths(object: &LoadedObject) -> (PathBuf, Option<PathBuf>) {
    use std::os::unix::ffi::OsStrExt;
    if object.is_main {
        let exe = PathBuf::from("/proc/self/exe");
        // /proc/self/exe opens the mapped file even if it was deleted or replaced since exec.
        let shown = std::fs::read_link(&exe).unwrap_or_else(|_| exe.clone());
        return (shown, Some(exe));
    }
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(&object.name));
    // The vdso is reported by bare name; every file-backed object by a path containing '/'.
    let has_file = object.name.contains(&b'/');
    let open = has_file.then(|| path.clone());
    (path, open)
}

/// Reads the symbols (and the `.got` range, biased) of `object` from `open`, refusing a file
/// whose build id shows it is not the file that was loaded. The note is set when no symbols
/// were found.
fn symbols(
    object: &LoadedObject,
    open: &Path,
    shown: &Path,
) -> Result<(SymbolTable, Option<String>, Option<Range<usize>>)> {
    let info = elf::read(open, shown)?;
    if let (Some(loaded), Some(file)) = (&object.build_id, &info.build_id) {
        if loaded != file {
            let note = format!(
                "{} is not the file that was loaded (its build id differs): it was replaced \
                 after loading, so its symbols would be wrong",
                shown.display()
            );
            return Ok((SymbolTable::default(), Some(note), None));
        }
    }
    let has_symtab = info.has_symtab;
    let table = SymbolTable::new(info.symbols, object.bias);
    let note = table.symbols().is_empty().then(|| {
        if has_symtab {
            "the file defines no function or data symbols".to_owned()
        } else {
            "stripped: no .symtab, and .dynsym defines no function or data symbols".to_owned()
        }
    });
    let got = info.got.and_then(|r| {
        let start = usize::try_from(r.start).ok()?.checked_add(object.bias)?;
        let end = usize::try_from(r.end).ok()?.checked_add(object.bias)?;
        Some(start..end)
    });
    Ok((table, note, got))
}
