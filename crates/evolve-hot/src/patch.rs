//! Applying and reverting patches, and the versions of every hot function.
//!
//! # Apply
//!
//! 1. **Read** the file once, a regular file only (a FIFO, device or directory is refused before
//!    anything is read), and its manifest without loading it ([`Manifest`]); a file without one
//!    is not a patch, one whose manifest does not parse, or whose bytes do not match the
//!    manifest's SHA-256 ([`crate::manifest::content_digest`]), is corrupt.
//! 2. **Verify** it against the running program: its build id, its toolchain, and for every hot
//!    function it implements, the signature fingerprint — a changed signature needs an adaptor
//!    with the old one.
//! 3. **Load** exactly the bytes read and verified ([`evolve_code::dylib::PatchObject::load`]:
//!    from a sealed copy, never the path again; `RTLD_NOW`: every undefined symbol binds to the
//!    program now, or the load fails naming the symbol). The engine first checks, the way the
//!    dynamic loader reads the object, that loading runs none of its code: no initializers, no
//!    IFUNC resolvers, no library the program has not loaded.
//! 4. **Bind** in one engine batch: every changed function's stub in the program jumps to the
//!    patch's implementation (or adaptor). The patch's own stubs already jump to its (newest)
//!    implementations; older patches' stubs of the same functions now jump to the program's
//!    stubs. So every call, from old code or new, reaches the newest version; a patch's stubs
//!    are redirected to the program's only once a later change supersedes them (lazily, which
//!    halves the writes of an apply). No thread is paused:
//!    a call already running finishes on the code it started with.
//!
//! Any failure before step 4 leaves the process as it was; step 4 is validated whole before the
//! first byte changes ([`evolve_code::Batch`]). The patch stays loaded after a refusal at step 4
//! (nothing points into it; reclamation may unload it).
//!
//! # Versions
//!
//! Every hot function has a stack of versions: the program's own, then one per patch that
//! changed it. Reverting a patch removes its versions (the stubs whose top version it was go back
//! to the version below); reverting a function to version `k` drops the versions above `k`.

use crate::error::{Error, ErrorKind, Result};
use crate::manifest::{content_digest, hex, Manifest, FORMAT, MANIFEST_SYMBOL};
use evolve_code::dylib::{PatchFile, PatchObject};
use evolve_code::loader::LoadedPatch;
use evolve_code::stub::{Code, Stub, StubEntry, STUBS};
use evolve_code::Batch;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The toolchain the running program was built with.
pub const HOST_TOOLCHAIN: &str = env!("EVOLVE_HOST_TOOLCHAIN");

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct ApplyReport {
    /// The patch's name in the history.
    pub patch: String,
    /// Hot functions of the program now running the patch's code.
    pub updated: Vec<String>,
    /// Hot functions the patch adds (the program had none of that name).
    pub added: Vec<String>,
    /// Functions reached through an adaptor (their signature changed).
    pub adapted: Vec<String>,
    /// Reading and verifying the manifest, in milliseconds.
    pub verify_ms: f64,
    /// Loading and binding the object.
    pub load_ms: f64,
    /// Retargeting the stubs (the only part that touches running code).
    pub apply_ms: f64,
    /// All of it.
    pub total_ms: f64,
}

/// One applied patch, as the history shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchRecord {
    /// Its name (the file name without extension, made unique).
    pub name: String,
    /// The file it was loaded from.
    pub path: PathBuf,
    /// When it was applied (seconds since the Unix epoch).
    pub applied_at: u64,
    /// When it was reverted, if it was.
    pub reverted_at: Option<u64>,
    /// When reclamation unloaded it, if it did.
    pub unloaded_at: Option<u64>,
    /// The hot functions it changed.
    pub functions: Vec<String>,
}

/// A hot function and its versions, for status displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionStatus {
    /// Its path.
    pub name: String,
    /// Its symbol in the executable, for an unprepared function a format-2 patch replaced
    /// (`None` for a `#[evolve::hot]` function: its stub has no symbol of the program's).
    pub symbol: Option<String>,
    /// Version 0 is the program's own; each patch that changed it adds one.
    pub versions: Vec<String>,
    /// Index in `versions` of the version callers reach now.
    pub current: usize,
}

#[derive(Clone, Copy)]
struct Version {
    patch: Option<usize>,
    code: Code,
}

struct Function {
    entry: &'static StubEntry,
    stub: Stub,
    versions: Vec<Version>,
    /// The stubs of this function inside loaded patches, with the implementation each patch
    /// carries. A patch's stub jumps to its own implementation while that is the current
    /// version, and to the program's stub otherwise (see [`Function::route_patch_stubs`]).
    patch_stubs: Vec<(Stub, Code)>,
}

impl Function {
    /// After the current version changed: every patch stub whose own implementation is no longer
    /// current is sent to the program's stub, so code of older patches reaches the newest
    /// version. (Doing this lazily, not at apply, halves the writes of an apply.)
    fn route_patch_stubs(&self, batch: &mut Batch) -> Result<()> {
        let current = self.versions.last().expect("base version").code.address();
        for (stub, own) in &self.patch_stubs {
            let own = own.address();
            if own != current && stub.target() == own {
                stub.retarget_in(batch, own, self.stub.as_code())?;
            }
        }
        Ok(())
    }
}

/// A loaded patch: a format-1 shared object or a format-2 relocatable object.
pub(crate) enum Object {
    Shared(PatchObject),
    Relocatable(LoadedPatch),
}

impl Object {
    pub(crate) fn relocatable(&self) -> Option<&LoadedPatch> {
        match self {
            Object::Relocatable(o) => Some(o),
            Object::Shared(_) => None,
        }
    }

    fn contains(&self, address: usize) -> bool {
        match self {
            Object::Shared(o) => o.contains(address),
            Object::Relocatable(o) => o.contains(address),
        }
    }

    fn is_unloaded(&self) -> bool {
        match self {
            Object::Shared(o) => o.is_unloaded(),
            Object::Relocatable(o) => o.is_unloaded(),
        }
    }

    pub(crate) fn unload(
        &mut self,
        scope: evolve_code::scan::Scope,
        timeout: Duration,
        name: &str,
    ) -> evolve_code::Result<evolve_code::dylib::Unload> {
        match self {
            Object::Shared(o) => o.unload(scope, timeout, name),
            Object::Relocatable(o) => o.unload(scope, timeout, name),
        }
    }
}

pub(crate) struct Applied {
    pub(crate) record: PatchRecord,
    /// Kept loaded while threads may run its code; unloaded by reclamation.
    pub(crate) object: Object,
    /// The manifest's SHA-256: the name of its versions in later patches' `expected`.
    pub(crate) sha256: String,
    /// Earlier patches whose definitions it bound to: kept loaded while it is.
    depends_on: Vec<usize>,
}

#[derive(Default)]
pub(crate) struct State {
    functions: HashMap<&'static str, Function>,
    pub(crate) patches: Vec<Applied>,
    /// Functions of the program replaced by format-2 patches, by symbol.
    pub(crate) replaced: HashMap<String, crate::unprepared::Replaced>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

pub(crate) fn with_state<T>(f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
    let mut guard = STATE.lock().unwrap_or_else(|p| p.into_inner());
    let state = guard.get_or_insert_with(State::default);
    f(state)
}

/// Overwrites a vector's unused capacity, where removed entries leave stale copies of patch
/// addresses that a reference scan would otherwise find.
fn scrub<T>(v: &mut Vec<T>) {
    evolve_code::scrub_spare(v);
}

impl State {
    pub(crate) fn resident_report(&self) -> crate::reclaim::ReclaimReport {
        crate::reclaim::ReclaimReport {
            resident: self
                .patches
                .iter()
                .filter(|p| !p.object.is_unloaded())
                .count(),
            ..Default::default()
        }
    }

    /// Unloads the patches no function needs and nothing refers to (see `crate::reclaim`).
    pub(crate) fn collect(
        &mut self,
        scope: evolve_code::scan::Scope,
    ) -> Result<crate::reclaim::ReclaimReport> {
        let mut needed = std::collections::HashSet::new();
        for function in self.functions.values() {
            let n = function.versions.len();
            for v in &function.versions[n.saturating_sub(2)..] {
                needed.extend(v.patch);
            }
        }
        for (index, applied) in self.patches.iter().enumerate() {
            if crate::unprepared::needed(self, index) {
                needed.insert(index);
            }
            // A loaded patch may call what an earlier one defines.
            if !applied.object.is_unloaded() {
                needed.extend(applied.depends_on.iter().copied());
            }
        }
        let mut report = crate::reclaim::ReclaimReport::default();
        for index in 0..self.patches.len() {
            let applied = &self.patches[index];
            if applied.object.is_unloaded()
                || needed.contains(&index)
                || crate::trial::on_trial(&applied.record.name)
            {
                continue;
            }
            // Forget what this patch left in the version stacks and stub lists first.
            for function in self.functions.values_mut() {
                let object = &self.patches[index].object;
                function.versions.retain(|v| v.patch != Some(index));
                function
                    .patch_stubs
                    .retain(|(stub, _)| !object.contains(stub.address()));
                scrub(&mut function.versions);
                scrub(&mut function.patch_stubs);
            }
            let applied = &mut self.patches[index];
            let name = applied.record.name.clone();
            match crate::reclaim::unload(&mut applied.object, scope, &name)? {
                evolve_code::dylib::Unload::Unloaded(scan) => {
                    if let Object::Relocatable(patch) = &self.patches[index].object {
                        // Its versions and call sites are gone with it.
                        crate::unprepared::forget(&mut self.replaced, index, patch);
                    }
                    let applied = &mut self.patches[index];
                    report.max_pause_us = report.max_pause_us.max(scan.pause_us);
                    report.bytes_scanned += scan.bytes_scanned;
                    applied.record.unloaded_at = Some(now());
                    report.unloaded.push(name);
                }
                evolve_code::dylib::Unload::Referenced(scan) => {
                    report.max_pause_us = report.max_pause_us.max(scan.pause_us);
                    report.bytes_scanned += scan.bytes_scanned;
                    report.kept.push((name, scan.references));
                }
            }
        }
        report.resident = self
            .patches
            .iter()
            .filter(|p| !p.object.is_unloaded())
            .count();
        Ok(report)
    }
}

/// Whether no thread holds the hot-update state now (for the trial's panic hook).
pub(crate) fn state_is_free() -> bool {
    STATE.try_lock().is_ok()
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

impl State {
    pub(crate) fn push_applied(
        &mut self,
        record: PatchRecord,
        object: Object,
        sha256: String,
        depends_on: Vec<usize>,
    ) {
        self.patches.push(Applied {
            record,
            object,
            sha256,
            depends_on,
        });
    }

    fn function(&mut self, entry: &'static StubEntry) -> Result<&mut Function> {
        if !self.functions.contains_key(entry.id()) {
            let stub = Stub::of(entry)?;
            self.functions.insert(
                entry.id(),
                Function {
                    entry,
                    stub,
                    versions: vec![Version {
                        patch: None,
                        code: entry.implementation(),
                    }],
                    patch_stubs: Vec::new(),
                },
            );
        }
        Ok(self.functions.get_mut(entry.id()).expect("inserted"))
    }
}

/// Reads a patch's manifest and checks that the file is intact (its SHA-256, see
/// [`crate::manifest`]). What it was built for is checked at apply.
///
/// # Example
///
/// ```
/// let err = evolve_hot::patch::read_manifest("/dev/zero").unwrap_err();
/// assert!(err.to_string().contains("it is a character device, not a regular file"), "{err}");
/// ```
pub fn read_manifest(path: impl AsRef<Path>) -> Result<Manifest> {
    read_patch(path.as_ref()).map(|(_, manifest)| manifest)
}

/// The patch file, read once, and its manifest, checked against the file's bytes.
fn read_patch(path: &Path) -> Result<(PatchFile, Manifest)> {
    let shown = path.display().to_string();
    let not_a_patch = |e: evolve_code::Error| {
        let reason = match e.kind() {
            evolve_code::ErrorKind::Image { reason, .. } => reason.clone(),
            _ => e.to_string(),
        };
        let reason = if reason.starts_with("no symbol") {
            "it has no Evolve manifest".to_string()
        } else {
            reason
        };
        Error::new(ErrorKind::NotAPatch {
            path: shown.clone(),
            reason,
        })
    };
    let corrupt = |reason: String| {
        Error::new(ErrorKind::Corrupt {
            path: shown.clone(),
            reason,
        })
    };
    let file = PatchFile::read(path).map_err(not_a_patch)?;
    let range = file.symbol(MANIFEST_SYMBOL).map_err(not_a_patch)?;
    let bytes = &file.bytes()[range.clone()];
    // The symbol is a C string: its size counts the terminating NUL.
    let text = bytes.split(|b| *b == 0).next().unwrap_or_default();
    let manifest: Manifest = serde_json::from_slice(text).map_err(|e| {
        // An older manifest has no digest: say which format it is rather than "missing field".
        match serde_json::from_slice::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v["format"].as_u64())
        {
            Some(format) if format != u64::from(FORMAT) => corrupt(format!(
                "manifest format {format} (this Evolve reads {FORMAT}): rebuild the patch"
            )),
            _ => corrupt(format!("manifest: {e}")),
        }
    })?;
    if manifest.format != FORMAT {
        return Err(corrupt(format!(
            "manifest format {} (this Evolve reads {FORMAT}): rebuild the patch",
            manifest.format
        )));
    }
    let digest = hex(&content_digest(file.bytes(), range));
    if manifest.sha256 != digest {
        return Err(corrupt(format!(
            "its contents do not match its manifest's SHA-256 (the manifest says {}, the file \
             hashes to {digest}): it was damaged or changed after it was built",
            manifest.sha256
        )));
    }
    Ok((file, manifest))
}

/// What the manifest asks of each function, verified.
struct Plan {
    /// (entry, patch fingerprint, via adaptor)
    changes: Vec<(&'static StubEntry, u64, bool)>,
    added: Vec<String>,
    /// (transfer symbol, the program's old static's symbol)
    transfers: Vec<(String, String)>,
}

fn verify(manifest: &Manifest, path: &Path) -> Result<Plan> {
    let running = evolve_code::inspect::build_id()?
        .map(|id| hex(&id))
        .unwrap_or_default();
    if manifest.base_build_id != running {
        return Err(Error::new(ErrorKind::WrongBase {
            expected: manifest.base_build_id.clone(),
            running,
        }));
    }
    if manifest.toolchain != HOST_TOOLCHAIN {
        return Err(Error::new(ErrorKind::WrongToolchain {
            patch: manifest.toolchain.clone(),
            running: HOST_TOOLCHAIN.to_string(),
        }));
    }
    let krate = manifest
        .crates
        .first()
        .map(|c| c.replace('-', "_"))
        .unwrap_or_default();
    let mut transfers = Vec::new();
    for changed in &manifest.changed_statics {
        // Without a transfer function the program's value cannot be converted, and sharing it
        // with code that expects another layout would be unsound.
        let symbol = changed.transfer_symbol(&krate);
        if !manifest.transfers.contains(&symbol) {
            return Err(Error::new(ErrorKind::StaticLayoutChanged {
                symbol: changed.symbol.clone(),
                running: changed.running,
                patch: changed.patch,
            }));
        }
        if evolve_code::inspect::executable()?
            .symbol_by_name(&changed.running_symbol)
            .is_none()
        {
            return Err(Error::new(ErrorKind::Corrupt {
                path: path.display().to_string(),
                reason: format!("the program has no static {}", changed.running_symbol),
            }));
        }
        transfers.push((symbol, changed.running_symbol.clone()));
    }
    let corrupt = |reason: String| {
        Error::new(ErrorKind::Corrupt {
            path: path.display().to_string(),
            reason,
        })
    };
    let mut plan = Plan {
        changes: Vec::new(),
        added: Vec::new(),
        transfers,
    };
    for f in &manifest.functions {
        let fingerprint = f
            .fingerprint_value()
            .ok_or_else(|| corrupt(format!("bad fingerprint {:?} of {}", f.fingerprint, f.id)))?;
        let Some(entry) = STUBS.iter().find(|e| e.id() == f.id) else {
            plan.added.push(f.id.clone());
            continue;
        };
        if fingerprint == entry.fingerprint() {
            plan.changes.push((entry, fingerprint, false));
            continue;
        }
        let has_adaptor = manifest
            .adaptors
            .iter()
            .any(|a| a.id == f.id && a.fingerprint_value() == Some(entry.fingerprint()));
        if !has_adaptor {
            return Err(Error::new(ErrorKind::SignatureChanged {
                function: entry.name().to_string(),
                running: format!("{:016x}", entry.fingerprint()),
                patch: f.fingerprint.clone(),
            }));
        }
        plan.changes.push((entry, fingerprint, true));
    }
    Ok(plan)
}

fn unique_name(state: &State, path: &Path) -> String {
    let stem = path
        .file_stem()
        .map_or_else(|| "patch".to_string(), |s| s.to_string_lossy().into_owned());
    let taken = |n: &str| state.patches.iter().any(|p| p.record.name == n);
    if !taken(&stem) {
        return stem;
    }
    (2..)
        .map(|i| format!("{stem}#{i}"))
        .find(|n| !taken(n))
        .expect("some suffix is free")
}

/// How to apply a patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Switch all the patch's functions while every thread that uses safe points is held at
    /// one ([`crate::safepoint`]), so no such thread sees some functions switched and others not.
    pub atomic: bool,
    /// How long to wait for threads to reach a safe point.
    pub safe_point_timeout: Duration,
    /// Revert the patch automatically if code inside it panics within this window.
    pub trial: Option<Duration>,
}

impl Default for ApplyOptions {
    fn default() -> ApplyOptions {
        ApplyOptions {
            atomic: false,
            safe_point_timeout: Duration::from_secs(5),
            trial: None,
        }
    }
}

/// Applies the patch at `path` to this process (see the module docs).
///
/// # Example
///
/// ```
/// // A file that is not a patch is refused, naming the cause; nothing changes.
/// let err = evolve_hot::patch::apply("/etc/hostname").unwrap_err();
/// assert!(err.to_string().contains("is not an Evolve patch"));
/// ```
pub fn apply(path: impl AsRef<Path>) -> Result<ApplyReport> {
    apply_with(path, &ApplyOptions::default())
}

/// A patch read, verified and loaded, not bound yet (see [`apply_with`] and `crate::canary`).
pub(crate) struct Loaded {
    pub(crate) path: PathBuf,
    plan: Plan,
    pub(crate) object: PatchObject,
    /// The manifest's digest of the patch file.
    sha256: String,
    start: Instant,
    load_start: Instant,
    verify_ms: f64,
}

impl Loaded {
    /// The changed functions: (entry, the patch's fingerprint, through an adaptor).
    pub(crate) fn changes(&self) -> &[(&'static StubEntry, u64, bool)] {
        &self.plan.changes
    }
}

/// Steps 1-3 of an apply: read, verify, load (nothing in the process changes).
pub(crate) fn load(path: &Path) -> Result<Loaded> {
    crate::canary::refuse_while_running()?;
    let start = Instant::now();
    let (file, manifest) = read_patch(path)?;
    let plan = verify(&manifest, path)?;
    let verify_ms = ms(start);

    let load_start = Instant::now();
    let object = PatchObject::load(&file).map_err(|e| match e.kind() {
        evolve_code::ErrorKind::Image { reason, .. } if reason.contains("undefined symbol") => {
            Error::new(ErrorKind::Unresolved {
                path: path.display().to_string(),
                symbols: vec![reason.clone()],
            })
        }
        _ => Error::from(e),
    })?;
    Ok(Loaded {
        path: path.to_path_buf(),
        plan,
        object,
        sha256: manifest.sha256.clone(),
        start,
        load_start,
        verify_ms,
    })
}

/// The code callers of `entry` reach now (its newest version).
pub(crate) fn current_code(state: &mut State, entry: &'static StubEntry) -> Result<(Stub, Code)> {
    let function = state.function(entry)?;
    Ok((
        function.stub,
        function.versions.last().expect("base version").code,
    ))
}

/// Records a loaded patch that was never bound (a canary rolled back) as reverted, so that
/// reclamation unloads it once no thread can be in its code.
pub(crate) fn retire(state: &mut State, loaded: Loaded) {
    let name = unique_name(state, &loaded.path);
    let functions = loaded
        .plan
        .changes
        .iter()
        .map(|c| c.0.name().to_string())
        .collect();
    state.patches.push(Applied {
        record: PatchRecord {
            name,
            path: loaded.path,
            applied_at: now(),
            reverted_at: Some(now()),
            unloaded_at: None,
            functions,
        },
        object: Object::Shared(loaded.object),
        sha256: loaded.sha256,
        depends_on: Vec::new(),
    });
}

/// Applies the patch at `path` with `options` (atomically at a safe point, on trial).
pub fn apply_with(path: impl AsRef<Path>, options: &ApplyOptions) -> Result<ApplyReport> {
    let path = path.as_ref();
    if crate::unprepared::is_object_patch(path) {
        crate::canary::refuse_while_running()?;
        return with_state(|state| {
            let name = unique_name(state, path);
            crate::unprepared::apply(state, path, options, name)
        });
    }
    let loaded = load(path)?;
    with_state(|state| bind(state, loaded, options))
}

/// Step 4 of an apply: binds a loaded patch (see the module docs).
pub(crate) fn bind(
    state: &mut State,
    loaded: Loaded,
    options: &ApplyOptions,
) -> Result<ApplyReport> {
    let Loaded {
        path,
        plan,
        object,
        sha256,
        start,
        load_start,
        verify_ms,
    } = loaded;
    let path = path.as_path();
    {
        let mut batch = Batch::new();
        let mut new_versions = Vec::new();
        for &(entry, fingerprint, adapted) in &plan.changes {
            let code = if adapted {
                object.adaptor(entry.id(), entry.fingerprint())?
            } else {
                object.implementation(entry.id(), fingerprint)?
            };
            let function = state.function(entry)?;
            let current = function.versions.last().expect("base version").code;
            function
                .stub
                .retarget_in(&mut batch, current.address(), code)?;
            // Older patches' code reaches the new version through the program's stub. The
            // patch's own stub already jumps to the new version (its own implementation).
            for (stub, own) in &function.patch_stubs {
                if stub.target() == own.address() {
                    stub.retarget_in(&mut batch, own.address(), function.stub.as_code())?;
                }
            }
            let patch_stub = if adapted {
                None
            } else {
                Some((object.stub(entry.id(), fingerprint)?, code))
            };
            new_versions.push((entry, code, patch_stub));
        }
        let load_ms = ms(load_start);
        let apply_start = Instant::now();
        if options.atomic || !plan.transfers.is_empty() {
            // State transfer runs with every safe-point thread held, right before the switch.
            crate::safepoint::at_safe_point(options.safe_point_timeout, || {
                for (symbol, old) in &plan.transfers {
                    object.transfer_static(symbol, old)?;
                }
                batch.apply().map_err(Error::from)
            })??;
        } else {
            batch.apply()?;
        }
        let apply_ms = ms(apply_start);

        let name = unique_name(state, path);
        let index = state.patches.len();
        for &(entry, code, patch_stub) in &new_versions {
            let function = state.functions.get_mut(entry.id()).expect("registered");
            function.versions.push(Version {
                patch: Some(index),
                code,
            });
            function.patch_stubs.extend(patch_stub);
        }
        // Plain patch addresses must not linger in freed memory (see `evolve_code::scrub`).
        evolve_code::scrub(new_versions);
        let name_of = |e: &&StubEntry| e.name().to_string();
        let updated: Vec<String> = plan.changes.iter().map(|c| name_of(&c.0)).collect();
        let adapted = plan
            .changes
            .iter()
            .filter(|c| c.2)
            .map(|c| name_of(&c.0))
            .collect();
        if let Some(window) = options.trial {
            crate::trial::watch(&name, object.exec_ranges().to_vec(), window);
        }
        state.patches.push(Applied {
            record: PatchRecord {
                name: name.clone(),
                path: path.to_path_buf(),
                applied_at: now(),
                reverted_at: None,
                unloaded_at: None,
                functions: updated.clone(),
            },
            object: Object::Shared(object),
            sha256,
            depends_on: Vec::new(),
        });
        Ok(ApplyReport {
            patch: name,
            updated,
            added: plan.added.clone(),
            adapted,
            verify_ms,
            load_ms,
            apply_ms,
            total_ms: ms(start),
        })
    }
}

/// What to revert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revert {
    /// The most recently applied patch that is still active.
    Last,
    /// The patch with this name.
    Patch(String),
    /// One hot function, back to an earlier version (0 = the program's own).
    Function {
        /// The function's path (or a unique suffix of it, e.g. `handlers::get`).
        name: String,
        /// The version to return to.
        version: usize,
    },
}

/// Reverts a patch or a function; returns the functions whose code changed.
pub fn revert(what: Revert) -> Result<Vec<String>> {
    crate::canary::refuse_while_running()?;
    with_state(|state| {
        let mut batch = Batch::new();
        let mut changed = Vec::new();
        match what {
            Revert::Last | Revert::Patch(_) => {
                let index = match &what {
                    Revert::Patch(name) => state
                        .patches
                        .iter()
                        .position(|p| &p.record.name == name && p.record.reverted_at.is_none()),
                    _ => state
                        .patches
                        .iter()
                        .rposition(|p| p.record.reverted_at.is_none()),
                }
                .ok_or_else(|| {
                    Error::new(ErrorKind::NoSuchPatch {
                        name: match &what {
                            Revert::Patch(n) => n.clone(),
                            _ => "(last)".into(),
                        },
                    })
                })?;
                if state.patches[index].object.relocatable().is_some() {
                    changed = crate::unprepared::revert(state, index)?;
                    state.patches[index].record.reverted_at = Some(now());
                    return Ok(changed);
                }
                let mut touched = Vec::new();
                for function in state.functions.values_mut() {
                    let Some(at) = function
                        .versions
                        .iter()
                        .position(|v| v.patch == Some(index))
                    else {
                        continue;
                    };
                    let removed = function.versions.remove(at);
                    if at == function.versions.len() {
                        let to = function.versions[at - 1].code;
                        function
                            .stub
                            .retarget_in(&mut batch, removed.code.address(), to)?;
                        changed.push(function.entry.name().to_string());
                    }
                    function.route_patch_stubs(&mut batch)?;
                    touched.push((function.entry.id(), at, removed));
                }
                if let Err(e) = batch.apply() {
                    // Nothing was written: put the versions back as they were.
                    for &(id, at, removed) in &touched {
                        let function = state.functions.get_mut(id).expect("registered");
                        function.versions.insert(at, removed);
                    }
                    evolve_code::scrub(touched);
                    return Err(e.into());
                }
                // The removed versions hold plain patch addresses (see `evolve_code::scrub`).
                evolve_code::scrub(touched);
                state.patches[index].record.reverted_at = Some(now());
            }
            Revert::Function { name, version } => {
                let matches = |shown: &str| shown == name || shown.ends_with(&format!("::{name}"));
                let unprepared = state
                    .replaced
                    .keys()
                    .find(|symbol| matches(&crate::unprepared::display_name(symbol)))
                    .cloned();
                if let Some(symbol) = unprepared {
                    crate::unprepared::revert_function(state, &symbol, version)?;
                    changed.push(crate::unprepared::display_name(&symbol));
                    return Ok(changed);
                }
                let function = state
                    .functions
                    .values_mut()
                    .find(|f| {
                        f.entry.name() == name || f.entry.name().ends_with(&format!("::{name}"))
                    })
                    .ok_or_else(|| Error::new(ErrorKind::NoSuchFunction { name: name.clone() }))?;
                if version >= function.versions.len() {
                    return Err(Error::new(ErrorKind::NoSuchVersion {
                        function: name,
                        version,
                    }));
                }
                let from = function.versions.last().expect("base").code;
                let to = function.versions[version].code;
                function.stub.retarget_in(&mut batch, from.address(), to)?;
                let dropped = function.versions.split_off(version + 1);
                let applied = function
                    .route_patch_stubs(&mut batch)
                    .and_then(|()| batch.apply().map(|_| ()).map_err(Error::from));
                if let Err(e) = applied {
                    function.versions.extend(dropped);
                    return Err(e);
                }
                changed.push(function.entry.name().to_string());
            }
        }
        Ok(changed)
    })
}

/// Every patch applied to this process, in order.
pub fn history() -> Vec<PatchRecord> {
    with_state(|state| Ok(state.patches.iter().map(|p| p.record.clone()).collect()))
        .unwrap_or_default()
}

/// Every hot function of the program with its versions.
pub fn functions() -> Vec<FunctionStatus> {
    with_state(|state| {
        Ok(STUBS
            .iter()
            .map(|entry| {
                let versions = state.functions.get(entry.id()).map_or_else(
                    || vec!["program".to_string()],
                    |f| {
                        f.versions
                            .iter()
                            .map(|v| match v.patch {
                                None => "program".to_string(),
                                Some(i) => state.patches[i].record.name.clone(),
                            })
                            .collect()
                    },
                );
                FunctionStatus {
                    name: entry.name().to_string(),
                    symbol: None,
                    current: versions.len() - 1,
                    versions,
                }
            })
            .chain(state.replaced.iter().map(|(symbol, replaced)| {
                let versions: Vec<String> = replaced
                    .versions
                    .iter()
                    .map(|v| match v.patch {
                        None => crate::unprepared::PROGRAM.to_string(),
                        Some(i) => state.patches[i].record.name.clone(),
                    })
                    .collect();
                FunctionStatus {
                    name: crate::unprepared::display_name(symbol),
                    symbol: Some(symbol.clone()),
                    current: versions.len() - 1,
                    versions,
                }
            }))
            .collect())
    })
    .unwrap_or_default()
}
