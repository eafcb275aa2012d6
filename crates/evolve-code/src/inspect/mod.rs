//! Self-inspection: the process reading its own ELF images.
//!
//! To patch live code the engine must know what is loaded where: which images the process has
//! ([`images`]), which functions they define and at which runtime addresses ([`Image::symbols`],
//! [`Image::symbol_by_name`], [`Image::function_containing`]), which build of the program is
//! running ([`build_id`]), and which instructions call or jump to a given function
//! ([`branch_sites_to`]), since those 5-byte `call rel32` / `jmp rel32` sites are what a patch
//! rewrites.
//!
//! Where things come from, and why:
//! - Placement (load bias, segments) and build ids come from the dynamic loader
//!   (`dl_iterate_phdr`) and the mapped memory, so they describe what is actually running.
//! - Symbols come from the image's file on disk (mapped memory does not contain `.symtab`). The
//!   main executable is read through `/proc/self/exe`, which is the mapped file even if it was
//!   replaced or deleted; a library whose file's build id no longer matches the loaded one is
//!   reported without symbols rather than with wrong ones.
//! - Branch sites are decoded from the live code, not the file.
//!
//! The main executable's image and branch index are built once and cached for the life of the
//! process; libraries are re-listed on each [`images`] call (they can be loaded and unloaded),
//! with their parsed symbols cached by path, load address and build id.

mod branches;
mod elf;
mod image;
mod loaded;
mod symbols;

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

pub(crate) use branches::direct_branches;
pub use branches::{BranchIndex, BranchKind, BranchSite};
pub use image::Image;
pub use symbols::{Symbol, SymbolKind};

use crate::error::{Error, ErrorKind, Result};
use loaded::LoadedObject;

static EXECUTABLE: OnceLock<Image> = OnceLock::new();
static EXECUTABLE_BRANCHES: OnceLock<BranchIndex> = OnceLock::new();
/// Parsed libraries that have a build id, from the last [`images`] call.
static LIBRARIES: Mutex<Vec<Image>> = Mutex::new(Vec::new());

/// A loaded object's loader name and writable segments, hidden (for the reference scan).
pub(crate) type WritableSegments = (Vec<u8>, Vec<(crate::Hidden, crate::Hidden)>);

/// Each loaded object's loader name and writable segments, hidden (for the reference scan).
pub(crate) fn loaded_snapshot_for_scan() -> Vec<WritableSegments> {
    loaded::snapshot()
        .into_iter()
        .map(|mut object| {
            let writable = object
                .segments
                .iter()
                .filter(|s| s.flags & libc::PF_W != 0)
                .map(|s| {
                    (
                        crate::Hidden::new(s.range.start),
                        crate::Hidden::new(s.range.end),
                    )
                })
                .collect();
            crate::hidden::scrub_plain(std::mem::take(&mut object.segments));
            (std::mem::take(&mut object.name), writable)
        })
        .collect()
}

/// The executable segments of the loaded object whose code contains `addr` (empty if none).
pub(crate) fn exec_ranges_of_object_containing(addr: usize) -> Vec<std::ops::Range<usize>> {
    loaded::snapshot()
        .into_iter()
        .find(|o| {
            o.segments
                .iter()
                .any(|s| s.is_exec() && s.range.contains(&addr))
        })
        .map(|o| {
            o.segments
                .iter()
                .filter(|s| s.is_exec())
                .map(|s| s.range.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// The loader's name of every object it has loaded (a path, or a bare name for the vdso): what
/// a `DT_NEEDED` entry such as `libc.so.6` (or a path) is matched against.
pub(crate) fn loaded_names() -> Vec<String> {
    loaded::snapshot()
        .into_iter()
        .filter(|object| !object.name.is_empty())
        .map(|object| String::from_utf8_lossy(&object.name).into_owned())
        .collect()
}

/// The main executable's TLS module id (`dlpi_tls_modid`) and the address of the calling
/// thread's instance of its TLS block (`dlpi_tls_data`); `None` if it has no `PT_TLS` segment.
/// Used by the patch loader to bind thread-locals to the executable's static TLS.
pub(crate) fn executable_tls() -> Option<(usize, usize)> {
    loaded::executable_tls()
}

/// Every loaded image: the main executable first, then the shared libraries (and the vdso) in
/// the loader's order.
///
/// An image whose file cannot be read (the vdso, a deleted or replaced library, a non-ELF file)
/// is still listed, with no symbols and [`Image::symbol_error`] saying why.
///
/// # Errors
/// [`ErrorKind::Image`] if the loader reports no main executable.
///
/// # Example
/// ```
/// let images = evolve_code::inspect::images()?;
/// assert!(images[0].is_main_executable());
/// # Ok::<(), evolve_code::error::Error>(())
/// ```
pub fn images() -> Result<Vec<Image>> {
    let objects = loaded::snapshot();
    if !objects.iter().any(|o| o.is_main) {
        return Err(no_main_executable());
    }
    let cached = LIBRARIES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let mut out: Vec<Image> = objects
        .iter()
        .map(|object| {
            if object.is_main {
                return match executable() {
                    Ok(exe) if same(exe, object) => exe.clone(),
                    _ => Image::from_loaded(object),
                };
            }
            cached
                .iter()
                .find(|image| same(image, object) && object.build_id.is_some())
                .cloned()
                .unwrap_or_else(|| Image::from_loaded(object))
        })
        .collect();
    // Keep only what is loaded now, so unloaded libraries do not accumulate.
    *LIBRARIES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = out
        .iter()
        .filter(|image| !image.is_main_executable() && image.build_id().is_some())
        .cloned()
        .collect();
    // The loader lists the executable first; make that a guarantee.
    out.sort_by_key(|image| !image.is_main_executable());
    Ok(out)
}

/// The main executable, parsed on first use and cached for the life of the process.
///
/// # Errors
/// [`ErrorKind::Image`] if the executable's file (read through `/proc/self/exe`) cannot be read
/// or parsed. Errors are not cached: a later call tries again.
///
/// # Example
/// ```
/// let exe = evolve_code::inspect::executable()?;
/// assert!(exe.is_main_executable());
/// assert!(std::ptr::eq(exe, evolve_code::inspect::executable()?));
/// # Ok::<(), evolve_code::error::Error>(())
/// ```
pub fn executable() -> Result<&'static Image> {
    if let Some(exe) = EXECUTABLE.get() {
        return Ok(exe);
    }
    let objects = loaded::snapshot();
    let main = objects
        .iter()
        .find(|o| o.is_main)
        .ok_or_else(no_main_executable)?;
    let image = Image::from_loaded_strict(main)?;
    // If another thread won the race its (identical) image is kept.
    Ok(EXECUTABLE.get_or_init(|| image))
}

/// The GNU build id of the main executable, read from its mapped note segment; `None` if it was
/// linked without one.
///
/// # Errors
/// [`ErrorKind::Image`] if the loader reports no main executable.
///
/// # Example
/// ```
/// if let Some(id) = evolve_code::inspect::build_id()? {
///     let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
///     assert_eq!(hex.len(), 2 * id.len());
/// }
/// # Ok::<(), evolve_code::error::Error>(())
/// ```
pub fn build_id() -> Result<Option<Vec<u8>>> {
    if let Some(exe) = EXECUTABLE.get() {
        return Ok(exe.build_id().map(<[u8]>::to_vec));
    }
    // No need to parse the file for this.
    loaded::snapshot()
        .into_iter()
        .find(|o| o.is_main)
        .map(|o| o.build_id)
        .ok_or_else(no_main_executable)
}

/// The image (by path) and the function or data symbol containing `addr`, searching all loaded
/// images; `None` if no symbol covers it. Meant for diagnostics: it lists the images each call.
///
/// # Example
/// ```
/// let here = evolve_code::inspect::symbolize as *const () as usize;
/// if let Some((path, symbol)) = evolve_code::inspect::symbolize(here) {
///     assert!(symbol.demangled.ends_with("inspect::symbolize"), "{path:?} {symbol:?}");
/// }
/// ```
pub fn symbolize(addr: usize) -> Option<(PathBuf, Symbol)> {
    let images = images().ok()?;
    let image = images.iter().find(|image| image.contains(addr))?;
    let symbol = image.symbol_containing(addr)?;
    Some((image.path().to_owned(), symbol.clone()))
}

/// The main executable's branch index, built on first use and cached.
///
/// # Errors
/// As [`executable`].
///
/// # Example
/// ```
/// let index = evolve_code::inspect::branch_index()?;
/// assert!(!index.is_empty());
/// # Ok::<(), evolve_code::error::Error>(())
/// ```
pub fn branch_index() -> Result<&'static BranchIndex> {
    let exe = executable()?;
    Ok(EXECUTABLE_BRANCHES.get_or_init(|| BranchIndex::build(exe)))
}

/// All `call rel32` (`E8`) and `jmp rel32` (`E9`) instructions in the main executable's
/// functions that branch to `target`, in address order.
///
/// Found by decoding every function of the executable from live memory (once; see
/// [`branch_index`]). Each call re-reads the sites' bytes, so a site that no longer branches to
/// `target` (for instance because it was patched) is left out; a site that was made to branch
/// to `target` after the index was built is not found.
///
/// # Errors
/// As [`executable`].
///
/// # Example
/// ```
/// use evolve_code::inspect::{branch_sites_to, executable, BranchKind};
/// let target = executable as *const () as usize;
/// for site in branch_sites_to(target)? {
///     assert_eq!(site.target, target);
///     assert!(matches!(site.kind, BranchKind::Call | BranchKind::Jmp));
/// }
/// # Ok::<(), evolve_code::error::Error>(())
/// ```
pub fn branch_sites_to(target: usize) -> Result<Vec<BranchSite>> {
    let exe = executable()?;
    let sites = branch_index()?.sites_to(target);
    let live = loaded::with_memory(exe.load_bias(), true, exe.segments(), |memory| {
        sites
            .iter()
            .filter(|site| {
                let bytes = memory.bytes(site.address..site.address.saturating_add(5));
                bytes
                    .and_then(|b| <[u8; 5]>::try_from(b).ok())
                    .is_some_and(|b| site.matches(b))
            })
            .copied()
            .collect()
    });
    Ok(live.unwrap_or_default())
}

/// The slots of the main executable's `.got` that hold `value` now, in address order: where
/// its code loads the address of a function it calls through the GOT (`call
/// *f@GOTPCREL(%rip)`, which rustc emits for calls of other crates' and of public functions,
/// and `ld` does not relax).
///
/// # Errors
/// As [`executable`].
///
/// # Example
/// ```
/// use evolve_code::inspect::{executable, got_slots_holding};
/// let exe = executable()?;
/// for slot in got_slots_holding(0x1234)? {
///     assert!(exe.got().unwrap().contains(&slot));
/// }
/// # Ok::<(), evolve_code::error::Error>(())
/// ```
pub fn got_slots_holding(value: usize) -> Result<Vec<usize>> {
    Ok(got_entries()?
        .into_iter()
        .filter(|&(_, v)| v == value)
        .map(|(slot, _)| slot)
        .collect())
}

/// Every slot of the main executable's `.got` with the value it holds now, in address order
/// (empty if it has no `.got`).
///
/// # Errors
/// As [`executable`].
///
/// # Example
/// ```
/// let entries = evolve_code::inspect::got_entries()?;
/// assert!(entries.windows(2).all(|w| w[0].0 + 8 == w[1].0));
/// # Ok::<(), evolve_code::error::Error>(())
/// ```
pub fn got_entries() -> Result<Vec<(usize, usize)>> {
    let exe = executable()?;
    let Some(got) = exe.got() else {
        return Ok(Vec::new());
    };
    let found = loaded::with_memory(exe.load_bias(), true, exe.segments(), |memory| {
        let Some(bytes) = memory.bytes(got.clone()) else {
            return Vec::new();
        };
        bytes
            .chunks_exact(8)
            .enumerate()
            .map(|(i, word)| {
                let value = usize::from_le_bytes(word.try_into().expect("8 bytes"));
                (got.start + 8 * i, value)
            })
            .collect()
    });
    Ok(found.unwrap_or_default())
}

/// Whether `image` is the snapshot of `object` (same file name, placement and build id).
fn same(image: &Image, object: &LoadedObject) -> bool {
    image.load_bias() == object.bias
        && image.segments() == object.segments
        && image.build_id() == object.build_id.as_deref()
        && (object.is_main || image.path().as_os_str().as_encoded_bytes() == object.name)
}

fn no_main_executable() -> Error {
    Error::new(ErrorKind::Image {
        path: "/proc/self/exe".to_owned(),
        reason: "the dynamic loader reports no main executable".to_owned(),
    })
}
