//! Evolve's patch builder (control layer): from the edited source of a running program, a patch
//! that carries exactly what changed.
//!
//! kpatch-build's method (build twice, diff per function), against the code the process really
//! runs:
//!
//! 1. **Discover** how the program was built ([`discover`]): the cargo unit whose binary is the
//!    running one gives the profile, the features of the binary and of the workspace crates it
//!    links; a program built by another toolchain is refused.
//! 2. **Rebuild** the edited source in place with that configuration ([`cargo`]) — the user's
//!    own incremental build — keeping the objects of the workspace crates and of the binary
//!    crate; the rebuilt unit must be the program's (else the refusal names what differs:
//!    features, profile, flags, toolchain); LTO is refused.
//! 3. **Compare** every rebuilt function with its current version — the program's code, or
//!    the newest applied patch's — relocation by relocation ([`compare`], [`diff`]), and keep
//!    the changed ones, the new ones they need, and why; a changed unprepared `async fn` body is
//!    refused, and so is a rebuild whose differences no edit explains.
//! 4. **Write** the patch object (format 2, [`emit`]): the carried functions as
//!    `__evolve_new__<symbol>`, the data only they need, undefined references to everything the
//!    program has, their unwind information, and the manifest with its SHA-256.
//!
//! C programs take the same steps 3 and 4 after their own discovery and rebuild ([`c`]): the
//! flags each unit was compiled with are in the program's DWARF.
//!
//! Format 1 (`.so` patches of `#[evolve::hot]` functions, applied today by
//! `evolve_hot::patch::apply`) is built by [`so`] until the apply of format 2 lands.
//!
//! # Example
//!
//! ```no_run
//! use evolve_builder::{build_patch, Base, BuildOptions};
//!
//! let report = build_patch(&BuildOptions {
//!     dry_run: true,
//!     ..BuildOptions::new("Cargo.toml", Base::Pid(4242), "fix.o")
//! })?;
//! for function in &report.carried {
//!     println!("{}: {}", function.name, function.reason);
//! }
//! # Ok::<(), evolve_builder::Error>(())
//! ```

pub mod c;
pub mod cargo;
pub mod compare;
pub mod diff;
pub mod discover;
pub mod dwarf;
pub mod emit;
mod error;
pub mod objfile;
pub mod program;
pub mod so;

pub use discover::Overrides;
pub use error::{Error, ErrorKind, Result};

use evolve_hot::manifest::{Added, Expected, ObjectManifest, Replaced, NEW_PREFIX, OBJECT_FORMAT};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Which binary the patch is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// A binary file.
    Path(PathBuf),
    /// A running process (its binary through `/proc/PID/exe`).
    Pid(u32),
}

impl Base {
    /// The file to read the binary from.
    pub fn file(&self) -> PathBuf {
        match self {
            Base::Path(p) => p.clone(),
            Base::Pid(pid) => PathBuf::from(format!("/proc/{pid}/exe")),
        }
    }
}

/// What to build (format 2).
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The `Cargo.toml` of the program's workspace (the one it was built from).
    pub manifest_path: PathBuf,
    /// The program.
    pub base: Base,
    /// Where to write the patch.
    pub output: PathBuf,
    /// The patches applied to the process, oldest first (their functions are the current
    /// versions to compare with; the CLI takes them from the agent's history).
    pub applied: Vec<PathBuf>,
    /// What to impose instead of discovering.
    pub overrides: Overrides,
    /// Only compare these crates (empty: every workspace crate the program links, and its
    /// binary crate).
    pub crates: Vec<String>,
    /// Extra environment for cargo (e.g. `CARGO_TARGET_DIR`), as the program's build had it.
    pub env: Vec<(String, String)>,
    /// Compare and report, write nothing.
    pub dry_run: bool,
}

impl BuildOptions {
    /// Options with everything discovered.
    pub fn new(
        manifest_path: impl Into<PathBuf>,
        base: Base,
        output: impl Into<PathBuf>,
    ) -> BuildOptions {
        BuildOptions {
            manifest_path: manifest_path.into(),
            base,
            output: output.into(),
            applied: Vec::new(),
            overrides: Overrides::default(),
            crates: Vec::new(),
            env: Vec::new(),
            dry_run: false,
        }
    }
}

/// A function the patch carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarriedFunction {
    /// Demangled, without hash.
    pub name: String,
    /// Its symbol.
    pub symbol: String,
    /// Its crate.
    pub krate: String,
    /// Why it is carried.
    pub reason: String,
    /// Whether it replaces a function of the program (or of an applied patch); else it is new.
    pub replaces: bool,
    /// Where it first differs, and how.
    pub detail: Option<String>,
}

/// The configuration the builder found and rebuilt.
#[derive(Debug, Clone)]
pub struct Discovered {
    /// Cargo profile.
    pub profile: String,
    /// The binary's package and target.
    pub package: String,
    /// The binary target.
    pub bin: String,
    /// The cargo unit of the program's build.
    pub unit: String,
    /// How it was found (`build id`, `symbols`).
    pub found_by: String,
    /// The binary's features.
    pub features: Vec<String>,
    /// The cargo command the rebuild ran.
    pub command: String,
}

/// What [`build_patch`] produced.
#[derive(Debug, Clone)]
pub struct BuildReport {
    /// The patch file (`None` for a dry run).
    pub output: Option<PathBuf>,
    /// Its manifest (for a dry run: as it would be, without digest).
    pub manifest: ObjectManifest,
    /// The carried functions, each with why.
    pub carried: Vec<CarriedFunction>,
    /// How many rebuilt functions were compared with the running code.
    pub compared: usize,
    /// The build configuration.
    pub configuration: Discovered,
    /// Things the operator should know.
    pub warnings: Vec<String>,
    /// Seconds cargo took.
    pub compile_seconds: f64,
    /// Seconds the comparison and writing took.
    pub compare_seconds: f64,
}

/// Builds a format-2 patch (see the crate docs). Nothing is written unless every check passed
/// (and nothing at all for a dry run).
pub fn build_patch(options: &BuildOptions) -> Result<BuildReport> {
    let base_file = options.base.file();
    // The program first: the rebuild may replace its file on disk.
    let built_at = std::fs::metadata(&base_file)
        .and_then(|m| m.modified())
        .map_err(|e| Error::io(&base_file, e))?;
    let program = program::Program::read(&base_file)?;
    let applied = options
        .applied
        .iter()
        .map(|p| read_applied(p))
        .collect::<Result<Vec<_>>>()?;
    let toolchain = discover::toolchain(&options.manifest_path, &options.env)?;
    discover::check_toolchain(&program, &toolchain)?;
    let config = discover::discover(
        &program,
        &options.manifest_path,
        &options.env,
        &options.overrides,
    )?;
    let scratch = scratch_dir()?;
    let rebuilt = cargo::rebuild(&config, &options.overrides, &options.env, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    let rebuilt = rebuilt?;
    if let Some(error) =
        discover::configuration_difference(&config, &rebuilt.fingerprint, &rebuilt.unit)
    {
        return Err(error);
    }
    let configuration = Discovered {
        profile: config.profile.clone(),
        package: config.package.clone(),
        bin: config.bin.clone(),
        unit: config.unit.clone(),
        found_by: config.found_by.to_string(),
        features: config.features.clone(),
        command: format!(
            "cargo {}",
            cargo::command(&config, &options.overrides).join(" ")
        ),
    };
    compare_and_write(Rebuilt {
        program,
        objects: rebuilt.objects,
        applied,
        crates: &options.crates,
        built_at,
        toolchain,
        configuration,
        compile_seconds: rebuilt.seconds,
        output: &options.output,
        dry_run: options.dry_run,
    })
}

/// What the rebuild produced, for [`compare_and_write`] (Rust through cargo, C through the
/// program's compiler).
pub(crate) struct Rebuilt<'a> {
    pub program: program::Program,
    pub objects: Vec<objfile::ObjectFile>,
    pub applied: Vec<diff::Applied>,
    pub crates: &'a [String],
    pub built_at: std::time::SystemTime,
    pub toolchain: String,
    pub configuration: Discovered,
    pub compile_seconds: f64,
    pub output: &'a Path,
    pub dry_run: bool,
}

/// Steps 3 and 4 of the crate docs, common to every language: compare the rebuilt objects with
/// the running code and write the patch.
pub(crate) fn compare_and_write(rebuilt: Rebuilt<'_>) -> Result<BuildReport> {
    let Rebuilt {
        mut program,
        objects,
        applied,
        crates,
        built_at,
        toolchain,
        configuration,
        compile_seconds,
        output,
        dry_run,
    } = rebuilt;
    let started = Instant::now();
    program.restrict_promoted(
        objects
            .iter()
            .flat_map(|o| o.symbols.iter())
            .filter(|s| s.section.is_some())
            .map(|s| s.name.as_str()),
    );
    let diff = diff::diff(&diff::Inputs {
        program: &program,
        objects: &objects,
        applied: &applied,
        crates,
        built_at,
    })?;
    let async_changed: Vec<String> = diff
        .async_changed
        .iter()
        .map(|p| async_fn_name(p))
        .collect();
    let async_refusal = (!async_changed.is_empty()).then(|| {
        Error::new(ErrorKind::AsyncBodyChanged {
            functions: async_changed.clone(),
        })
    });
    // A dry run reports the refusal with everything else.
    if let (Some(refusal), false) = (&async_refusal, dry_run) {
        return Err(Error::new(refusal.kind().clone()));
    }
    let objects = &objects;
    let carried: Vec<CarriedFunction> = diff
        .carried
        .iter()
        .map(|c| CarriedFunction {
            name: c.name.clone(),
            symbol: c.symbol.clone(),
            krate: objects[c.function.0].krate.clone(),
            reason: c.reason.clone(),
            replaces: c.replaces.is_some(),
            detail: c.detail.clone(),
        })
        .collect();
    if objects.iter().any(|o| o.source_file.is_some()) {
        c::check_unambiguous(&program, &carried)?;
    }
    let mut manifest = ObjectManifest {
        format: OBJECT_FORMAT,
        base_build_id: program.build_id.clone(),
        toolchain,
        crates: diff::crates(objects, &diff.carried),
        sha256: String::new(),
        replaced: diff
            .carried
            .iter()
            .filter_map(|c| {
                let (version, code_sha256) = c.replaces.clone()?;
                Some(Replaced {
                    symbol: c.symbol.clone(),
                    name: c.name.clone(),
                    patch_symbol: format!("{NEW_PREFIX}{}", c.symbol),
                    expected: Expected {
                        version,
                        code_sha256,
                    },
                    reason: c.reason.clone(),
                })
            })
            .collect(),
        added: diff
            .carried
            .iter()
            .filter(|c| c.replaces.is_none())
            .map(|c| Added {
                patch_symbol: c.symbol.clone(),
                name: c.name.clone(),
            })
            .collect(),
        functions: Vec::new(),
        adaptors: Vec::new(),
        transfers: Vec::new(),
        changed_statics: Vec::new(),
        new_statics: Vec::new(),
        async_refused: async_changed,
    };
    let mut report = BuildReport {
        output: None,
        manifest,
        carried,
        compared: diff.compared,
        configuration,
        warnings: diff.warnings.clone(),
        compile_seconds,
        compare_seconds: 0.0,
    };
    if let Some(refusal) = async_refusal {
        report.warnings.push(refusal.to_string());
    }
    if report.carried.is_empty() {
        if dry_run {
            report.compare_seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        return Err(Error::new(ErrorKind::NothingChanged {
            compared: diff.compared,
        }));
    }
    // A dry run assembles the object too: what would refuse the patch is reported.
    let patch = emit::assemble(objects, &program, &diff)?;
    manifest = std::mem::replace(&mut report.manifest, empty_manifest());
    manifest.new_statics = patch.new_statics.clone();
    // Statics whose layout changed (as format 1 finds them: by exact symbol, or by path for a
    // static the legacy mangling renamed when its type changed): apply needs a transfer.
    // A C patch's statics are those its file sees (several files may define one name).
    let files: std::collections::BTreeSet<&str> = objects
        .iter()
        .filter_map(|o| o.source_file.as_deref())
        .collect();
    let file = files.first().copied().filter(|_| files.len() == 1);
    let running: std::collections::HashMap<String, u64> = patch
        .statics
        .iter()
        .flat_map(|(name, _)| {
            let path = compare::readable(name);
            program
                .names()
                .filter(move |n| *n == name || compare::readable(n) == path)
                .filter_map(|n| {
                    let d = program
                        .definitions_in(n, file)
                        .into_iter()
                        .find(|d| d.kind == program::SymbolKind::Data)?;
                    Some((n.to_string(), d.size))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    manifest.changed_statics = so::changed_statics(&running, &patch.statics);
    for changed in &manifest.changed_statics {
        report.warnings.push(format!(
            "static {} changed its type or layout ({} -> {} bytes): apply needs a transfer \
             function for it",
            changed.symbol, changed.running, changed.patch
        ));
    }
    hot_parts(&mut manifest);
    let bytes = patch.finish(&mut manifest)?;
    report.manifest = manifest;
    report.compare_seconds = started.elapsed().as_secs_f64();
    if dry_run {
        return Ok(report);
    }
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::write(output, bytes).map_err(|e| Error::io(output, e))?;
    report.output = Some(output.to_path_buf());
    Ok(report)
}

/// The prepared parts among the carried functions: `#[evolve::hot]` implementations, adaptors
/// and transfer functions, listed as format 1 lists them.
fn hot_parts(manifest: &mut ObjectManifest) {
    let symbols: Vec<String> = manifest
        .replaced
        .iter()
        .map(|r| r.symbol.clone())
        .chain(manifest.added.iter().map(|a| a.patch_symbol.clone()))
        .collect();
    for symbol in symbols {
        let entry = |rest: &str| {
            let (id, fingerprint) = rest.rsplit_once('_')?;
            (fingerprint.len() == 16 && u64::from_str_radix(fingerprint, 16).is_ok()).then(|| {
                evolve_hot::manifest::FunctionEntry {
                    id: id.to_string(),
                    fingerprint: fingerprint.to_string(),
                }
            })
        };
        if let Some(rest) = symbol.strip_prefix("__evolve_impl_") {
            manifest.functions.extend(entry(rest));
        } else if let Some(rest) = symbol.strip_prefix("__evolve_adaptor_") {
            manifest.adaptors.extend(entry(rest));
        } else if symbol.starts_with("__evolve_transfer_") {
            manifest.transfers.push(symbol);
        }
    }
}

fn empty_manifest() -> ObjectManifest {
    ObjectManifest {
        format: OBJECT_FORMAT,
        base_build_id: String::new(),
        toolchain: String::new(),
        crates: Vec::new(),
        sha256: String::new(),
        replaced: Vec::new(),
        added: Vec::new(),
        functions: Vec::new(),
        adaptors: Vec::new(),
        transfers: Vec::new(),
        changed_statics: Vec::new(),
        new_statics: Vec::new(),
        async_refused: Vec::new(),
    }
}

/// `shapes::fetch::{async_fn#0}` → `shapes::fetch`.
fn async_fn_name(path: &str) -> String {
    path.split("::{async_")
        .next()
        .unwrap_or(path)
        .trim_end_matches("::{{closure}}")
        .to_string()
}

/// The features the program's build enabled for workspace package `package` (discovered as
/// for [`build_patch`]): `(features without "default", no default features)`, for format 1's
/// `cargo rustc -p package`. `None` when the program does not link that package.
pub fn discover_package_features(
    manifest_path: &Path,
    base: &Base,
    env: &[(String, String)],
    package: &str,
) -> Result<Option<(Vec<String>, bool)>> {
    let program = program::Program::read(&base.file())?;
    let config = discover::discover(&program, manifest_path, env, &Overrides::default())?;
    let features = if config.package == package {
        config.features.clone()
    } else {
        match config.member_features.get(package) {
            Some(features) => features.clone(),
            None => return Ok(None),
        }
    };
    let no_default = !features.iter().any(|f| f == "default");
    Ok(Some((
        features.into_iter().filter(|f| f != "default").collect(),
        no_default,
    )))
}

/// Reads a format-2 patch applied to the process: its object and manifest, its digest checked.
pub fn read_applied(path: &Path) -> Result<diff::Applied> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let range = emit::manifest_range(&bytes)
        .map_err(|e| Error::object(path.display(), format!("not a format-2 patch: {e}")))?;
    let manifest: ObjectManifest = serde_json::from_slice(&bytes[range.clone()])
        .map_err(|e| Error::object(path.display(), format!("its manifest: {e}")))?;
    let mut zeroed = bytes.clone();
    zeroed[range].fill(0);
    if diff::sha256_hex(&zeroed) != manifest.sha256 {
        return Err(Error::object(
            path.display(),
            "its SHA-256 does not match its manifest (a damaged or altered patch)",
        ));
    }
    let object = objfile::ObjectFile::parse(&bytes, &path.display().to_string(), "patch")?;
    Ok(diff::Applied { object, manifest })
}

fn scratch_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "evolve-builder-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    #[test]
    fn async_bodies_are_named_by_their_fn() {
        assert_eq!(
            super::async_fn_name("shapes::fetch::{async_fn#0}"),
            "shapes::fetch"
        );
        assert_eq!(
            super::async_fn_name("shapes::fetch::{{closure}}"),
            "shapes::fetch"
        );
    }
}
