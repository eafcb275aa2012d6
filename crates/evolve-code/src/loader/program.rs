//! Loading a patch built for *this* program, safely: the manifest's build id is checked against
//! the running executable's before anything is mapped, and the patch binds only to the program,
//! the patches applied before it and the loaded libraries (see [`LoadedPatch::load_for_program`]).

use super::file;
use super::{load, refused, LoadedPatch, ProgramResolver, Resolution, Resolve, Wanted};
use crate::error::{Error, Result};
use std::cell::RefCell;
use std::path::Path;
use std::sync::OnceLock;

/// The program's resolver, read once per process (the executable does not change).
fn program_resolver() -> Result<&'static ProgramResolver> {
    static RESOLVER: OnceLock<ProgramResolver> = OnceLock::new();
    if let Some(r) = RESOLVER.get() {
        return Ok(r);
    }
    let made = ProgramResolver::new()?;
    Ok(RESOLVER.get_or_init(|| made))
}

/// The program, then the earlier patches (newest first), then the libraries; remembers which
/// earlier patches it bound to.
struct Chain<'a> {
    program: &'a ProgramResolver,
    earlier: &'a [&'a LoadedPatch],
    used: RefCell<Vec<usize>>,
}

impl Resolve for Chain<'_> {
    fn resolve(&self, wanted: &Wanted<'_>) -> std::result::Result<Resolution, String> {
        if let Some(found) = self.program.in_executable(wanted)? {
            return Ok(found);
        }
        if !wanted.thread_local {
            for (i, patch) in self.earlier.iter().enumerate().rev() {
                if let Some(address) = patch.symbol(wanted.name) {
                    let mut used = self.used.borrow_mut();
                    if !used.contains(&i) {
                        used.push(i);
                    }
                    return Ok(Resolution::Address(address));
                }
            }
        }
        self.program.resolve(wanted)
    }
}

impl LoadedPatch {
    /// Loads the patch object at `path`, built by Evolve's builder for this very program:
    /// like [`LoadedPatch::load`], but the manifest must name the running executable's GNU build
    /// id (`base_build_id`), and `accept` sees the verified manifest text before anything is
    /// mapped (the caller's own checks: versions, names); its error refuses the patch. The
    /// patch's undefined symbols bind to the program's definitions (locals included), then to
    /// the definitions of the `earlier` patches (newest last in the slice, searched first: a
    /// function or static an earlier patch added), then to the loaded libraries.
    ///
    /// Returns the patch and the indices in `earlier` of the patches it bound to (it may call
    /// their code: keep them loaded as long as it is).
    ///
    /// Why this is safe where [`LoadedPatch::load`] is not: the file is exactly what the builder
    /// wrote (its SHA-256 is verified), and the builder wrote it by compiling this program's
    /// source with this program's configuration, checked function by function against this
    /// executable (whose build id it records): its code assumes the program's types. Loading
    /// runs none of it.
    ///
    /// # Errors
    /// [`crate::ErrorKind::PatchRefused`] if the manifest names another build id (or none, or
    /// the executable has none), and every error of [`LoadedPatch::load`]; `accept`'s error.
    /// Nothing is mapped after an error.
    ///
    /// # Example
    /// ```
    /// use evolve_code::loader::LoadedPatch;
    /// let err = LoadedPatch::load_for_program(
    ///     "/etc/hostname".as_ref(),
    ///     &[],
    ///     |_| Ok::<(), evolve_code::Error>(()),
    /// )
    /// .unwrap_err();
    /// assert!(err.to_string().contains("refused"), "{err}");
    /// ```
    pub fn load_for_program<E: From<Error>>(
        path: &Path,
        earlier: &[&LoadedPatch],
        accept: impl FnOnce(&str) -> std::result::Result<(), E>,
    ) -> std::result::Result<(LoadedPatch, Vec<usize>), E> {
        let data = file::read_regular(path)?;
        let manifest = file::verify(path, &data)?;
        let json: serde_json::Value =
            serde_json::from_str(&manifest).map_err(|e| refused(path, e.to_string()))?;
        let claimed = json
            .get("base_build_id")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let running = crate::inspect::build_id()?
            .map(|id| file::hex(&id))
            .unwrap_or_default();
        if running.is_empty() || !claimed.eq_ignore_ascii_case(&running) {
            return Err(refused(
                path,
                format!(
                    "it was built for the program with build id {claimed:?}, this one has \
                     {running:?}"
                ),
            )
            .into());
        }
        accept(&manifest)?;
        let chain = Chain {
            program: program_resolver()?,
            earlier,
            used: RefCell::new(Vec::new()),
        };
        let loading = load::Loading::new(path, &data)?;
        // The build id check above, with the verified digest: the patch was built against this
        // program, which is what binding it to the program's symbols assumes.
        let patch = loading.finish(&chain, manifest)?;
        Ok((patch, chain.used.into_inner()))
    }
}
