//! Format-2 patches: any function of the program replaced, with no preparation.
//!
//! A format-2 patch is a relocatable object ([`crate::manifest::ObjectManifest`]) that defines
//! `__evolve_new__F` for each function `F` of the program it replaces. Applying it:
//!
//! 1. **Verify and load** ([`LoadedPatch::load_for_program`]): the file's SHA-256 and the
//!    program's build id are checked by the engine; before anything is mapped, the manifest is
//!    checked here: each replaced function exists in the executable, and the version the patch
//!    was built against (`expected`) is the one running (`program`, or the SHA-256 of the patch
//!    whose version is current) — otherwise the patch is refused, naming the function and both
//!    versions. The patch binds to the program, then to the patches applied before it.
//! 2. **Redirect entries** ([`redirect::install`], one stop of the world for every function of
//!    the patch, each entry written only when no thread can resume inside it): the first time a
//!    function is replaced, its own entry jumps to the new version; when it is replaced again,
//!    the entry of the version that was current jumps to the new one, and every older entry's
//!    jump (the program's, older patches', reverted ones still loaded) is retargeted to it.
//! 3. **Retarget references** ([`References`], [`Retarget`]): every direct call or jump to the
//!    function in the executable and in loaded patches, and every GOT slot of the executable
//!    holding it, names the new version: a call of a patched function is one direct call.
//!
//! A failure at any step undoes the steps before it and unloads the patch: the process is as
//! it was.
//!
//! # Versions and revert
//!
//! Each replaced function has a stack of versions: the program's, then one per active patch
//! that replaced it. The top one is current: every other version's entry jumps to it, and every
//! reference names it. Reverting a patch removes its versions from the stacks: where one was on
//! top, the version below becomes current (its own entry jump removed — for the program's,
//! exactly its original bytes — and every reference sent to it); where a later patch replaced
//! the function again, nothing in the code changes (the later version stays current). A
//! reverted version's entry keeps jumping to the current version (code that still holds its
//! address reaches the current one) until reclamation unloads its patch, which it does only
//! when no thread runs in it and nothing refers to it ([`crate::reclaim`]).

use crate::error::{Error, ErrorKind, Result};
use crate::manifest::{ObjectManifest, OBJECT_FORMAT};
use crate::patch::{now, ApplyOptions, ApplyReport, PatchRecord, State};
use evolve_code::loader::LoadedPatch;
use evolve_code::redirect::{self, Function, Redirect, References, Retarget};
use evolve_code::scan::Scope;
use evolve_code::Batch;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// The version name of the program's own code (as manifests say it).
pub const PROGRAM: &str = "program";

/// One version of a replaced function.
#[derive(Debug, Clone)]
pub(crate) struct Version {
    /// The patch (index in the history) that carries it; `None` for the program's.
    pub patch: Option<usize>,
    pub function: Function,
}

/// A function of the program that a format-2 patch replaced.
#[derive(Debug)]
pub(crate) struct Replaced {
    /// Version 0 is the program's; the last one is current.
    pub versions: Vec<Version>,
    /// Versions of reverted patches still loaded: their entries jump to the current version.
    pub retired: Vec<Version>,
    /// Every direct reference to the function, all naming the current version.
    pub references: References,
}

impl Replaced {
    fn current(&self) -> &Function {
        &self
            .versions
            .last()
            .expect("the program's version")
            .function
    }

    fn program(&self) -> &Function {
        &self.versions[0].function
    }

    /// Every version but `except`: the entries that must jump to the current version.
    fn other_versions(&self, except: &Function) -> impl Iterator<Item = &Function> {
        let except = except.address();
        self.versions
            .iter()
            .chain(&self.retired)
            .map(|v| &v.function)
            .filter(move |f| f.address() != except)
    }
}

/// References found in a new patch, by the symbol of the tracked function they call.
type TrackedReferences = Vec<(String, References)>;

/// The ms elapsed since `since`.
fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Whether the file at `path` is a format-2 patch (an ELF relocatable object). Only its header
/// is read; a file that cannot be read is left to the format-1 path, which names the cause.
pub(crate) fn is_object_patch(path: &Path) -> bool {
    use std::io::Read;
    let Ok(metadata) = std::fs::metadata(path) else {
        return false;
    };
    if !metadata.is_file() {
        return false;
    }
    let mut header = [0u8; 18];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut header));
    // ELF magic, and e_type (little-endian, offset 16) ET_REL.
    read.is_ok() && header[..4] == *b"\x7fELF" && header[16] == 1 && header[17] == 0
}

/// The version name of what runs now for `symbol` (see [`crate::manifest::Expected`]).
fn running_version(state: &State, symbol: &str) -> String {
    match state.replaced.get(symbol).and_then(|r| r.versions.last()) {
        Some(Version { patch: Some(p), .. }) => state.patches[*p].sha256.clone(),
        _ => PROGRAM.to_string(),
    }
}

/// Parses and checks the manifest against the running versions (nothing loaded yet).
fn check_manifest(state: &State, path: &Path, text: &str) -> Result<ObjectManifest> {
    let shown = path.display().to_string();
    let manifest: ObjectManifest = serde_json::from_str(text).map_err(|e| {
        Error::new(ErrorKind::Corrupt {
            path: shown.clone(),
            reason: format!("manifest: {e}"),
        })
    })?;
    if manifest.format != OBJECT_FORMAT {
        return Err(Error::new(ErrorKind::Corrupt {
            path: shown,
            reason: format!(
                "manifest format {} in a relocatable object (this Evolve reads {OBJECT_FORMAT})",
                manifest.format
            ),
        }));
    }
    let unsupported = |what: String| {
        Err(Error::new(ErrorKind::Unsupported {
            path: shown.clone(),
            what,
        }))
    };
    if !manifest.functions.is_empty() || !manifest.adaptors.is_empty() {
        return unsupported(
            "it carries #[evolve::hot] functions or adaptors, which this Evolve applies only \
             from format-1 patches (`evolve build-patch --format 1`)"
                .into(),
        );
    }
    if let Some(changed) = manifest.changed_statics.first() {
        return Err(Error::new(ErrorKind::StaticLayoutChanged {
            symbol: changed.symbol.clone(),
            running: changed.running,
            patch: changed.patch,
        }));
    }
    if !manifest.transfers.is_empty() {
        return unsupported("transfer functions in format-2 patches are not applied yet".into());
    }
    if let Some(name) = manifest.async_refused.first() {
        return unsupported(format!(
            "the body of the unprepared async fn {name} changed; mark it #[evolve::hot] async fn"
        ));
    }
    for (i, r) in manifest.replaced.iter().enumerate() {
        if manifest.replaced[..i].iter().any(|o| o.symbol == r.symbol) {
            return Err(Error::new(ErrorKind::Corrupt {
                path: shown,
                reason: format!("it replaces {} twice", r.name),
            }));
        }
        let running = running_version(state, &r.symbol);
        if r.expected.version != running {
            let name_of = |version: &str| {
                if version == PROGRAM {
                    PROGRAM.to_string()
                } else {
                    state
                        .patches
                        .iter()
                        .find(|p| p.sha256 == version)
                        .map_or_else(
                            || format!("of a patch not applied here (sha256 {version})"),
                            |p| format!("of patch {} (sha256 {version})", p.record.name),
                        )
                }
            };
            return Err(Error::new(ErrorKind::StaleVersion {
                function: r.name.clone(),
                expected: name_of(&r.expected.version),
                running: name_of(&running),
            }));
        }
        if !state.replaced.contains_key(&r.symbol) {
            // Refused here, before loading: the program has no such function.
            Function::in_executable(&r.symbol)?;
        }
    }
    Ok(manifest)
}

/// Loads, verifies and applies the format-2 patch at `path` (see the module docs).
pub(crate) fn apply(
    state: &mut State,
    path: &Path,
    options: &ApplyOptions,
    name: String,
) -> Result<ApplyReport> {
    let start = Instant::now();
    if options.atomic {
        return Err(Error::new(ErrorKind::Unsupported {
            path: path.display().to_string(),
            what: "--atomic is not available for patches of unprepared functions yet (their \
                   entries switch in one stop of the world; references follow one by one)"
                .into(),
        }));
    }
    let earlier: Vec<(usize, &LoadedPatch)> = state
        .patches
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.object.relocatable().map(|o| (i, o)))
        .filter(|(_, o)| !o.is_unloaded())
        .collect();
    let earlier_objects: Vec<&LoadedPatch> = earlier.iter().map(|(_, o)| *o).collect();
    let mut manifest = None;
    let (patch, used) = LoadedPatch::load_for_program(path, &earlier_objects, |text| {
        manifest = Some(check_manifest(state, path, text)?);
        Ok::<(), Error>(())
    })?;
    let depends_on: Vec<usize> = used.iter().map(|&i| earlier[i].0).collect();
    drop(earlier_objects);
    drop(earlier);
    let manifest = manifest.expect("checked before loading");
    let verify_ms = ms(start);

    let index = state.patches.len();
    let switched = switch_in(state, &patch, &manifest, index);
    let (load_ms, apply_ms) = match switched {
        Ok(times) => times,
        Err(e) => {
            discard(patch, &name);
            return Err(e);
        }
    };
    let updated: Vec<String> = manifest.replaced.iter().map(|r| r.name.clone()).collect();
    if let Some(window) = options.trial {
        crate::trial::watch(&name, patch.exec_ranges().to_vec(), window);
    }
    state.push_applied(
        PatchRecord {
            name: name.clone(),
            path: path.to_path_buf(),
            applied_at: now(),
            reverted_at: None,
            unloaded_at: None,
            functions: updated.clone(),
        },
        crate::patch::Object::Relocatable(patch),
        manifest.sha256.clone(),
        depends_on,
    );
    Ok(ApplyReport {
        patch: name,
        updated,
        added: manifest.added.iter().map(|a| a.name.clone()).collect(),
        adapted: Vec::new(),
        verify_ms,
        load_ms,
        apply_ms,
        total_ms: ms(start),
    })
}

/// Unloads a patch nothing was switched to (after a refusal or a failure).
fn discard(mut patch: LoadedPatch, name: &str) {
    if let Err(e) = patch.unload(Scope::Stacks, crate::reclaim::STOP_TIMEOUT, name) {
        eprintln!("evolve: the refused patch {name} could not be unloaded: {e}");
    }
}

/// Switches every function the patch replaces to its new version: entries, then references.
/// Returns (finding references ms, switching ms). On error nothing is changed.
fn switch_in(
    state: &mut State,
    patch: &LoadedPatch,
    manifest: &ObjectManifest,
    index: usize,
) -> Result<(f64, f64)> {
    let started = Instant::now();
    // The new version of each replaced function, and its program function when it is new.
    let mut first_time: Vec<(Function, Function)> = Vec::new();
    let mut stacked: Vec<(String, Function)> = Vec::new();
    for r in &manifest.replaced {
        let new = Function::replacement(patch, &r.symbol)?;
        match state.replaced.get(&r.symbol) {
            None => first_time.push((Function::in_executable(&r.symbol)?, new)),
            Some(_) => stacked.push((r.symbol.clone(), new)),
        }
    }
    // 1. Entries: one install (one stop of the world) for every new jump.
    let mut pairs: Vec<(&Function, &Function)> = Vec::new();
    for (program, new) in &first_time {
        pairs.push((program, new));
    }
    for (symbol, new) in &stacked {
        pairs.push((state.replaced[symbol].current(), new));
    }
    let installed = redirect::install(&pairs)?;
    let apply_started = Instant::now();
    // Older entries follow: they jumped to the version that was current.
    let mut entries = Batch::new();
    let mut undo_entries = Batch::new();
    for (symbol, new) in &stacked {
        let replaced = &state.replaced[symbol];
        let current = replaced.current();
        for older in replaced.other_versions(current) {
            let redirect = Redirect::of(older).ok_or_else(|| missing_redirect(older))?;
            redirect.retarget_in(&mut entries, current, new)?;
            redirect.retarget_in(&mut undo_entries, new, current)?;
        }
    }
    if let Err(e) = entries.apply() {
        let _ = redirect::remove(&installed.redirects);
        return Err(e.into());
    }
    let undo_switch = |undo_entries: &Batch| {
        let _ = undo_entries.apply();
        let _ = redirect::remove(&installed.redirects);
    };
    // 2. References. Functions replaced for the first time: in the executable and in every
    // loaded patch (theirs and the new one's call the program's function). Functions already
    // tracked: only the new patch's calls are new (they name the program's function too).
    let mut loaded: Vec<&LoadedPatch> = state
        .patches
        .iter()
        .filter_map(|p| p.object.relocatable())
        .filter(|o| !o.is_unloaded())
        .collect();
    loaded.push(patch);
    let found = (|| -> Result<(Vec<References>, TrackedReferences)> {
        let programs: Vec<&Function> = first_time.iter().map(|(p, _)| p).collect();
        let fresh = References::find_many(&programs, &loaded)?;
        let tracked: Vec<(&String, &Replaced)> = state.replaced.iter().collect();
        let tracked_programs: Vec<&Function> = tracked.iter().map(|(_, r)| r.program()).collect();
        let in_new = References::find_in_patches(&tracked_programs, &[patch])?;
        Ok((
            fresh,
            tracked
                .iter()
                .map(|(s, _)| (*s).clone())
                .zip(in_new)
                .collect(),
        ))
    })();
    let (fresh, in_new) = match found {
        Ok(found) => found,
        Err(e) => {
            undo_switch(&undo_entries);
            return Err(e);
        }
    };
    let load_ms = ms(started);
    let new_of = |symbol: &str| stacked.iter().find(|(s, _)| s == symbol).map(|(_, n)| n);
    // One batch, validated whole before anything changes: nothing to undo in it on error.
    let mut retarget = Retarget::new();
    let planned = (|| -> Result<()> {
        for (refs, (program, new)) in fresh.iter().zip(&first_time) {
            retarget.retarget(refs, program, new)?;
        }
        for (symbol, refs) in &in_new {
            let replaced = &state.replaced[symbol];
            let to = new_of(symbol).unwrap_or_else(|| replaced.current());
            retarget.retarget(refs, replaced.program(), to)?;
        }
        for (symbol, new) in &stacked {
            let replaced = &state.replaced[symbol];
            retarget.retarget(&replaced.references, replaced.current(), new)?;
        }
        Ok(())
    })();
    if let Err(e) = planned.and_then(|()| retarget.apply().map(|_| ()).map_err(Error::from)) {
        undo_switch(&undo_entries);
        return Err(e);
    }
    // 3. Record: the new versions on their stacks, the references merged.
    for ((program, new), references) in first_time.into_iter().zip(fresh) {
        state.replaced.insert(
            program.symbol().to_string(),
            Replaced {
                versions: vec![
                    Version {
                        patch: None,
                        function: program,
                    },
                    Version {
                        patch: Some(index),
                        function: new,
                    },
                ],
                retired: Vec::new(),
                references,
            },
        );
    }
    for (symbol, new) in stacked {
        let replaced = state.replaced.get_mut(&symbol).expect("tracked");
        replaced.versions.push(Version {
            patch: Some(index),
            function: new,
        });
    }
    for (symbol, refs) in in_new {
        let replaced = state.replaced.get_mut(&symbol).expect("tracked");
        replaced.references.merge(refs)?;
    }
    Ok((load_ms, ms(apply_started)))
}

fn missing_redirect(f: &Function) -> Error {
    Error::new(ErrorKind::Engine(evolve_code::Error::new(
        evolve_code::ErrorKind::InvalidArgument {
            reason: format!("{f} should jump to the current version and does not"),
        },
    )))
}

/// What reverting one function takes: (symbol, the version leaving the top, the one below).
struct Step {
    symbol: String,
    from: Function,
    to: Function,
}

/// Reverts the format-2 patch at `index`: its versions leave their stacks; where one was
/// current, the version below becomes current. Returns the functions whose code changed.
pub(crate) fn revert(state: &mut State, index: usize) -> Result<Vec<String>> {
    let mut steps: Vec<Step> = Vec::new();
    for (symbol, replaced) in &state.replaced {
        let Some(at) = replaced
            .versions
            .iter()
            .position(|v| v.patch == Some(index))
        else {
            continue;
        };
        if at + 1 == replaced.versions.len() {
            steps.push(Step {
                symbol: symbol.clone(),
                from: replaced.versions[at].function.clone(),
                to: replaced.versions[at - 1].function.clone(),
            });
        }
    }
    switch_back(state, &steps)?;
    let mut changed = Vec::new();
    for replaced in state.replaced.values_mut() {
        if let Some(at) = replaced
            .versions
            .iter()
            .position(|v| v.patch == Some(index))
        {
            let version = replaced.versions.remove(at);
            replaced.retired.push(version);
        }
    }
    for step in &steps {
        changed.push(display_name(&step.symbol));
    }
    changed.sort();
    Ok(changed)
}

/// Demangled, without hash.
pub(crate) fn display_name(symbol: &str) -> String {
    match rustc_demangle::try_demangle(symbol) {
        Ok(d) => format!("{d:#}"),
        Err(_) => symbol.to_string(),
    }
}

/// Makes `to` current instead of `from` for every step: references first, then `to`'s own
/// jump removed, then every other entry sent to `to`. A failure undoes what was done.
fn switch_back(state: &State, steps: &[Step]) -> Result<()> {
    if steps.is_empty() {
        return Ok(());
    }
    let mut retarget = Retarget::new();
    let mut undo = Retarget::new();
    for step in steps {
        let refs = &state.replaced[&step.symbol].references;
        retarget.retarget(refs, &step.from, &step.to)?;
        undo.retarget(refs, &step.to, &step.from)?;
    }
    retarget.apply()?;
    let own: Vec<Redirect> = steps
        .iter()
        .map(|s| Redirect::of(&s.to).ok_or_else(|| missing_redirect(&s.to)))
        .collect::<Result<_>>()
        .inspect_err(|_| {
            let _ = undo.apply();
        })?;
    if let Err(e) = redirect::remove(&own) {
        let _ = undo.apply();
        return Err(e.into());
    }
    let pairs: Vec<(&Function, &Function)> = steps.iter().map(|s| (&s.from, &s.to)).collect();
    let reinstall = || {
        let back: Vec<(&Function, &Function)> = steps.iter().map(|s| (&s.to, &s.from)).collect();
        let _ = redirect::install(&back);
        let _ = undo.apply();
    };
    let installed = match redirect::install(&pairs) {
        Ok(installed) => installed,
        Err(e) => {
            reinstall();
            return Err(e.into());
        }
    };
    let mut entries = Batch::new();
    for step in steps {
        let replaced = &state.replaced[&step.symbol];
        for other in replaced.other_versions(&step.to) {
            if other.address() == step.from.address() {
                continue;
            }
            let redirect = Redirect::of(other).ok_or_else(|| missing_redirect(other))?;
            redirect.retarget_in(&mut entries, &step.from, &step.to)?;
        }
    }
    if let Err(e) = entries.apply() {
        let _ = redirect::remove(&installed.redirects);
        reinstall();
        return Err(e.into());
    }
    Ok(())
}

/// Reverts one replaced function to its version `version` (0 = the program's): the versions
/// above it leave the stack (their patches stay applied for their other functions).
pub(crate) fn revert_function(state: &mut State, symbol: &str, version: usize) -> Result<()> {
    let replaced = &state.replaced[symbol];
    if version + 1 >= replaced.versions.len() {
        return Err(Error::new(ErrorKind::NoSuchVersion {
            function: display_name(symbol),
            version,
        }));
    }
    let step = Step {
        symbol: symbol.to_string(),
        from: replaced.current().clone(),
        to: replaced.versions[version].function.clone(),
    };
    switch_back(state, std::slice::from_ref(&step))?;
    let replaced = state.replaced.get_mut(symbol).expect("tracked");
    let dropped = replaced.versions.split_off(version + 1);
    replaced.retired.extend(dropped);
    Ok(())
}

/// After `patch` (index `index`) was unloaded: forget its versions and its call sites.
pub(crate) fn forget(replaced: &mut HashMap<String, Replaced>, index: usize, patch: &LoadedPatch) {
    for replaced in replaced.values_mut() {
        replaced.retired.retain(|v| v.patch != Some(index));
        replaced.references.forget_patch(patch);
    }
}

/// Whether a patch still carries a version some function needs (an active one).
pub(crate) fn needed(state: &State, index: usize) -> bool {
    state
        .replaced
        .values()
        .any(|r| r.versions.iter().any(|v| v.patch == Some(index)))
}
