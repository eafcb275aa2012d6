//! What the patch carries, and why (kpatch's create-diff-object, against the running code).
//!
//! 1. **Correlate.** Every function of the rebuilt objects is matched by its exact symbol with
//!    its current version: the newest applied patch that carries it, else the program's (all its
//!    copies, for a local symbol instantiated in several codegen units). No match: it is new.
//! 2. **Compare** each pair relocation-aware ([`crate::compare`]). A function that only reads a
//!    read-only static whose contents changed is changed too (its code is the same, what it
//!    reads is not).
//! 3. **Include.** The changed functions are carried; so is every new function their code
//!    needs, transitively. Everything else they reference stays a reference to the program.
//! 4. **Explain.** DWARF names why each changed function is carried — "inlines X" when its first
//!    difference lies in X's inlined code — and whether the change comes from an edit at all: a
//!    changed function whose code comes only from source files untouched since the program was
//!    built, and which calls nothing that changed, is not explained by the edit. A few are
//!    reported; many mean the rebuild does not reproduce the program, and the build is refused.
//! 5. **Refuse** changed bodies of unprepared `async fn`s (and functions that inline them).

use crate::compare::{readable, Comparator, Difference, Verdict};
use crate::dwarf::{self, FunctionDebug};
use crate::error::{Error, ErrorKind, Result};
use crate::objfile::ObjectFile;
use crate::program::{Program, SymbolKind};
use evolve_hot::manifest::{ObjectManifest, NEW_PREFIX};
use object::elf;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// An applied patch: its object and manifest.
#[derive(Debug)]
pub struct Applied {
    /// The patch file's object.
    pub object: ObjectFile,
    /// Its manifest.
    pub manifest: ObjectManifest,
}

/// A function of a rebuilt object.
pub type FunctionRef = (usize, usize);

/// Where the current version of a function runs when an applied patch carries it: (patch,
/// symbol).
type Current = (usize, usize);

/// A function the patch carries.
#[derive(Debug, Clone)]
pub struct Carried {
    /// The rebuilt function (object, symbol).
    pub function: FunctionRef,
    /// Its symbol.
    pub symbol: String,
    /// Demangled, without hash.
    pub name: String,
    /// Why: `changed`, `inlines X`, `needed by X`, `uses the changed constant X`, `uses the
    /// static X, whose layout changed`.
    pub reason: String,
    /// The first difference (offset and what), for a changed function.
    pub detail: Option<String>,
    /// The version it replaces: `None` when new; `Some(("program" | patch sha256, code
    /// sha256))`.
    pub replaces: Option<(String, String)>,
}

/// The outcome of the comparison.
#[derive(Debug, Default)]
pub struct Diff {
    /// The carried functions: changed first, then those they need.
    pub carried: Vec<Carried>,
    /// How many rebuilt functions were compared with a current version.
    pub compared: usize,
    /// Changed functions no edit explains (with DWARF to tell).
    pub unexplained: Vec<String>,
    /// Changed unprepared async bodies (paths).
    pub async_changed: Vec<String>,
    /// Read-only statics of the program whose contents changed: the patch carries its own copy.
    pub changed_constants: HashSet<String>,
    /// Things the operator should know.
    pub warnings: Vec<String>,
}

/// Inputs of [`diff`].
pub struct Inputs<'a> {
    /// The running program.
    pub program: &'a Program,
    /// The rebuilt objects.
    pub objects: &'a [ObjectFile],
    /// The patches applied to the process, oldest first.
    pub applied: &'a [Applied],
    /// Crates to compare (empty: all).
    pub crates: &'a [String],
    /// When the program was built: sources modified later are edits.
    pub built_at: std::time::SystemTime,
}

/// Compares the rebuilt objects with the running code (see the module docs).
pub fn diff(inputs: &Inputs<'_>) -> Result<Diff> {
    let program = inputs.program;
    let objects = inputs.objects;
    let comparator = Comparator::with_rebuilt(program, objects);
    let mut current: HashMap<&str, Current> = HashMap::new();
    for (p, applied) in inputs.applied.iter().enumerate() {
        for r in &applied.manifest.replaced {
            if let Some(s) = applied.object.defined(&r.patch_symbol) {
                current.insert(r.symbol.as_str(), (p, s));
            }
        }
        for a in &applied.manifest.added {
            if let Some(s) = applied.object.defined(&a.patch_symbol) {
                current.insert(a.patch_symbol.as_str(), (p, s));
            }
        }
    }
    let wanted = |krate: &str| inputs.crates.is_empty() || inputs.crates.iter().any(|c| c == krate);

    // Statics: read-only ones whose contents changed, and those whose layout did.
    let mut static_paths: HashMap<String, Vec<String>> = HashMap::new();
    for name in program.names() {
        if program
            .definitions(name)
            .iter()
            .any(|d| d.kind == SymbolKind::Data)
        {
            static_paths
                .entry(readable(name))
                .or_default()
                .push(name.to_string());
        }
    }
    let rebuilt_statics: HashSet<&str> = objects
        .iter()
        .flat_map(|o| o.symbols.iter())
        .filter(|s| s.is_static() && s.section.is_some())
        .map(|s| s.name.as_str())
        .collect();
    let mut changed_constants = HashSet::new();
    let mut resized: HashSet<String> = HashSet::new();
    let mut warnings = Vec::new();
    for object in objects.iter().filter(|o| wanted(&o.krate)) {
        for symbol in &object.symbols {
            let Some(section) = symbol.section else {
                continue;
            };
            let sec = &object.sections[section];
            if symbol.st_type != elf::STT_OBJECT
                || symbol.name.is_empty()
                || !sec.is_alloc()
                || sec.is_text()
                || sec.is_tls()
            {
                continue;
            }
            let Some(def) = program
                .definitions_in(&symbol.name, object.source_file.as_deref())
                .into_iter()
                .find(|d| d.kind == SymbolKind::Data)
            else {
                // A static the legacy mangling renamed because its type changed: the one
                // static of the program with its path that the rebuild does not define.
                if symbol.is_static() {
                    let path = readable(&symbol.name);
                    if let [old] = static_paths.get(&path).map_or(&[][..], Vec::as_slice) {
                        if !rebuilt_statics.contains(old.as_str()) {
                            resized.insert(symbol.name.clone());
                        }
                    }
                }
                continue;
            };
            if def.size != symbol.size {
                // Its users changed even if their code did not (an index moved into new room).
                resized.insert(symbol.name.clone());
                continue;
            }
            if sec.is_writable() {
                // State: the program's value stays; say so when the initial value changed.
                let initial = sec.bytes(symbol.value, symbol.size);
                let running = program.bytes(def.address, def.size);
                if def.size == symbol.size
                    && sec
                        .relocations_in(symbol.value, symbol.value + symbol.size)
                        .is_empty()
                    && initial.is_some()
                    && running.is_some()
                    && initial != running
                {
                    warnings.push(format!(
                        "the initial value of static {} changed: the running program keeps its \
                         current value",
                        readable(&symbol.name)
                    ));
                }
                continue;
            }
            if comparator
                .data_at(object, section, symbol.value, def.address)
                .is_err()
            {
                changed_constants.insert(symbol.name.clone());
            }
        }
    }

    // 1-2: correlate and compare.
    let mut status: HashMap<FunctionRef, Status> = HashMap::new();
    let (mut compared, mut matched, mut rehashed) = (0usize, 0usize, 0usize);
    let program_paths: HashSet<String> = program.names().map(readable).collect();
    for (o, object) in objects.iter().enumerate() {
        if !wanted(&object.krate) {
            continue;
        }
        for f in object.functions() {
            let name = object.symbols[f].name.as_str();
            let verdict = match current.get(program.canonical(name).unwrap_or(name)) {
                Some((p, s)) => {
                    let patch = &inputs.applied[*p];
                    let verdict = comparator.with_object(object, f, &patch.object, *s);
                    let code = patch_code(&patch.object, *s);
                    Some((verdict, (patch.manifest.sha256.clone(), sha256_hex(&code))))
                }
                None => {
                    // A C `static` of this name in several files: the one of this file.
                    let mut copies: Vec<_> = program
                        .definitions_in(name, object.source_file.as_deref())
                        .into_iter()
                        .filter(|d| d.kind == SymbolKind::Function)
                        .collect();
                    copies.sort_by_key(|d| d.address);
                    if copies.is_empty() {
                        None
                    } else {
                        let code = program
                            .bytes(copies[0].address, copies[0].size)
                            .map(|b| sha256_hex(&b))
                            .unwrap_or_default();
                        let mut verdict = Verdict::Same;
                        for (i, copy) in copies.iter().enumerate() {
                            let v = comparator.with_program(object, f, copy.address, copy.size);
                            if v == Verdict::Same {
                                verdict = v;
                                break;
                            }
                            if i == 0 {
                                verdict = v;
                            }
                        }
                        Some((verdict, ("program".to_string(), code)))
                    }
                }
            };
            let entry = match verdict {
                None => {
                    if program_paths.contains(&readable(name)) {
                        rehashed += 1;
                    }
                    Status::New
                }
                Some((Verdict::Same, expected)) => {
                    compared += 1;
                    matched += 1;
                    Status::Same(expected)
                }
                Some((Verdict::Differs(d), expected)) => {
                    compared += 1;
                    matched += 1;
                    Status::Changed(d, expected)
                }
            };
            status.insert((o, f), entry);
        }
    }
    if matched == 0 && rehashed > 0 || rehashed > matched.max(8) {
        return Err(Error::configuration(
            "symbol hashes",
            format!(
                "{rehashed} functions of the rebuild exist in the program under other symbol \
                 hashes, {matched} under the same: the crates were compiled with another \
                 configuration (features, profile or toolchain) than the program's"
            ),
        ));
    }

    // A function reading a changed constant changed.
    let keys: Vec<FunctionRef> = status.keys().copied().collect();
    for key in keys {
        let expected = match status.get(&key) {
            Some(Status::Same(expected)) => expected,
            // The comparison saw a static the program does not have: say which (renamed).
            Some(Status::Changed(d, expected)) if d.what.starts_with("uses the static") => expected,
            _ => continue,
        };
        let (o, f) = key;
        let object = &objects[o];
        let symbol = &object.symbols[f];
        let Some(section) = symbol.section else {
            continue;
        };
        let hit = object.sections[section]
            .relocations_in(symbol.value, symbol.value + symbol.size)
            .iter()
            .find_map(|r| {
                let name = target_name(object, r.symbol)?;
                let what = if changed_constants.contains(name) {
                    format!("uses the changed constant {}", readable(name))
                } else if resized.contains(name) {
                    format!("uses the static {}, whose layout changed", readable(name))
                } else {
                    return None;
                };
                Some((r.offset - symbol.value, what))
            });
        if let Some((offset, what)) = hit {
            let expected = expected.clone();
            status.insert(key, Status::Changed(Difference { offset, what }, expected));
        }
    }

    // 3: include the changed functions and what they need.
    let mut diff = Diff {
        compared,
        changed_constants,
        warnings,
        ..Diff::default()
    };
    let mut debug: HashMap<usize, HashMap<usize, FunctionDebug>> = HashMap::new();
    let mut modified = Modified::new(inputs.built_at);
    let mut changed: Vec<FunctionRef> = status
        .iter()
        .filter(|(_, s)| matches!(s, Status::Changed(..)))
        .map(|(k, _)| *k)
        .collect();
    changed.sort();
    let changed_names: HashSet<&str> = changed
        .iter()
        .map(|(o, f)| objects[*o].symbols[*f].name.as_str())
        .collect();
    let new_names: HashSet<&str> = status
        .iter()
        .filter(|(_, s)| matches!(s, Status::New))
        .map(|((o, f), _)| objects[*o].symbols[*f].name.as_str())
        .collect();
    let paths = Paths::new(
        program.names().chain(
            objects
                .iter()
                .flat_map(|o| o.functions().map(move |f| o.symbols[f].name.as_str())),
        ),
    );
    let mut carried_names: HashSet<String> = HashSet::new();
    for &(o, f) in &changed {
        let Some(Status::Changed(difference, expected)) = status.get(&(o, f)) else {
            continue;
        };
        // One replacement per symbol (a local symbol's copies in several units).
        if !carried_names.insert(objects[o].symbols[f].name.clone()) {
            continue;
        }
        let object = &objects[o];
        let symbol = &object.symbols[f];
        let info = debug
            .entry(o)
            .or_insert_with(|| dwarf::read(object))
            .get(&symbol.section.unwrap_or(0))
            .cloned()
            .unwrap_or_default();
        let name = readable(&symbol.name);
        if !symbol.name.contains("__evolve_impl_") {
            match info.async_body() {
                Some(body) if body == info.path => diff.async_changed.push(name.clone()),
                Some(body) => diff.async_changed.push(paths.qualify(body, "", &name)),
                None if references(object, f, |n| n.contains("panic_const_async_fn_resumed")) => {
                    diff.async_changed.push(name.clone())
                }
                None => {}
            }
        }
        let offset = difference.offset + symbol.value;
        // The first difference lies in an inlined function's code from an edited file: that
        // function changed, and this one carries it.
        let edited_at = info
            .file_at(offset)
            .is_some_and(|f| modified.is_modified(f));
        let mut reason = match info.inlined_owning(offset) {
            Some(inlined) if edited_at && !inlined.path.is_empty() => format!(
                "inlines {}",
                paths.qualify(&inlined.path, &inlined.parent, &name)
            ),
            _ => "changed".to_string(),
        };
        if difference.what.starts_with("uses the ") {
            reason = difference.what.clone();
        }
        // Explained by the edit: its code comes from an edited file, or it references
        // something that changed or is new.
        let explained = info.files.is_empty()
            || info.files.iter().any(|f| modified.is_modified(f))
            || references(object, f, |n| {
                changed_names.contains(n)
                    || new_names.contains(n)
                    || diff.changed_constants.contains(n)
            });
        if !explained {
            diff.unexplained.push(name.clone());
            reason = "differs from the running code (no edited source explains it)".into();
        }
        diff.carried.push(Carried {
            function: (o, f),
            // The program's name for it (the rebuild may have promoted it under another hash).
            symbol: program
                .canonical(&symbol.name)
                .unwrap_or(&symbol.name)
                .to_string(),
            name,
            reason,
            detail: Some(format!("at +{:#x}: {}", difference.offset, difference.what)),
            replaces: Some(expected.clone()),
        });
    }
    diff.async_changed.sort();
    diff.async_changed.dedup();

    // New functions the carried code needs, transitively.
    let definitions: HashMap<&str, FunctionRef> = status
        .iter()
        .filter(|(_, s)| matches!(s, Status::New))
        .map(|((o, f), _)| (objects[*o].symbols[*f].name.as_str(), (*o, *f)))
        .collect();
    let mut included: HashSet<FunctionRef> = changed.iter().copied().collect();
    let mut work: Vec<FunctionRef> = changed.clone();
    while let Some((o, f)) = work.pop() {
        let object = &objects[o];
        let symbol = &object.symbols[f];
        let Some(section) = symbol.section else {
            continue;
        };
        for reloc in
            object.sections[section].relocations_in(symbol.value, symbol.value + symbol.size)
        {
            let Some(name) = target_name(object, reloc.symbol) else {
                continue;
            };
            let needed = match definitions.get(name) {
                Some(def) => *def,
                None => {
                    let target = &object.symbols[reloc.symbol];
                    let defined_here = target.section.is_some() || target.is_section();
                    if !defined_here
                        && !program.provides(name)
                        && !current.contains_key(name)
                        && !name.is_empty()
                    {
                        return Err(Error::new(ErrorKind::Unsupported {
                            function: readable(&symbol.name),
                            what: format!(
                                "it needs {}, which neither the program nor the rebuild defines",
                                readable(name)
                            ),
                        }));
                    }
                    continue;
                }
            };
            if included.insert(needed) {
                work.push(needed);
                let needed_symbol = &objects[needed.0].symbols[needed.1];
                diff.carried.push(Carried {
                    function: needed,
                    symbol: needed_symbol.name.clone(),
                    name: readable(&needed_symbol.name),
                    reason: format!("needed by {}", readable(&symbol.name)),
                    detail: None,
                    replaces: None,
                });
            }
        }
    }

    // 4: a rebuild that does not reproduce the program.
    let threshold = (compared / 5).max(10);
    if diff.unexplained.len() > threshold {
        let mut some = diff.unexplained.clone();
        some.truncate(5);
        return Err(Error::new(ErrorKind::NotReproducible {
            detail: format!(
                "{} of the {compared} functions compared differ although none of their source \
                 files was edited since the program was built (e.g. {}): the program was built \
                 with another configuration, toolchain or flags",
                diff.unexplained.len(),
                some.join(", ")
            ),
        }));
    }
    for name in &diff.unexplained {
        diff.warnings.push(format!(
            "{name} differs from the running code although none of its source files was edited: \
             it is carried"
        ));
    }
    Ok(diff)
}

/// The status of a rebuilt function.
#[derive(Debug, Clone)]
enum Status {
    /// Identical to its current version: (version, code sha256).
    Same((String, String)),
    /// Changed: the first difference, and the version it replaces.
    Changed(Difference, (String, String)),
    /// No current version.
    New,
}

/// The name a relocation's target stands for: the symbol's, or for a section symbol the
/// function or static at the section's start.
pub fn target_name(object: &ObjectFile, symbol: usize) -> Option<&str> {
    let s = &object.symbols[symbol];
    if s.is_section() {
        let start = object.symbol_at_start(s.section?)?;
        return Some(object.symbols[start].name.as_str());
    }
    (!s.name.is_empty()).then_some(s.name.as_str())
}

fn references(object: &ObjectFile, function: usize, test: impl Fn(&str) -> bool) -> bool {
    let symbol = &object.symbols[function];
    let Some(section) = symbol.section else {
        return false;
    };
    object.sections[section]
        .relocations_in(symbol.value, symbol.value + symbol.size)
        .iter()
        .filter_map(|r| target_name(object, r.symbol))
        .any(|n| test(n.strip_prefix(NEW_PREFIX).unwrap_or(n)))
}

fn patch_code(object: &ObjectFile, symbol: usize) -> Vec<u8> {
    let s = &object.symbols[symbol];
    s.section
        .and_then(|sec| object.sections[sec].bytes(s.value, s.size))
        .map(|b| b.into_owned())
        .unwrap_or_default()
}

/// SHA-256, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    evolve_hot::manifest::hex(&sha2::Sha256::digest(bytes))
}

/// Function paths by their last segment, to qualify DWARF's short names (with
/// `debug = "line-tables-only"` DWARF names a function `scale`, not `shapes::scale`).
struct Paths {
    by_last: HashMap<String, Vec<String>>,
}

impl Paths {
    fn new<'a>(symbols: impl Iterator<Item = &'a str>) -> Paths {
        let mut by_last: HashMap<String, Vec<String>> = HashMap::new();
        for symbol in symbols {
            let path = readable(symbol);
            let last = path.rsplit("::").next().unwrap_or(&path).to_string();
            let paths = by_last.entry(last).or_default();
            if !paths.contains(&path) {
                paths.push(path);
            }
        }
        Paths { by_last }
    }

    /// The full path of `short` (a DWARF name: `scale`, `{closure#0}`, `fmt<T>`) inlined into
    /// `parent` (the DWARF name of what encloses it) in the function `caller`: a closure is
    /// named by its environment's type in `parent` (`…<shapes::f::{closure_env#0}>`); else a
    /// function of that name in the caller's scope or module, else the only one of that name,
    /// else the name in the caller's module.
    fn qualify(&self, short: &str, parent: &str, caller: &str) -> String {
        if let Some(n) = short
            .strip_prefix("{closure#")
            .and_then(|rest| rest.strip_suffix('}'))
        {
            let env = format!("::{{closure_env#{n}}}");
            if let Some(at) = parent.find(&env) {
                let start = parent[..at]
                    .rfind(['<', ' ', ',', '('])
                    .map_or(0, |i| i + 1);
                return format!("{}::{{{{closure}}}}", &parent[start..at]);
            }
        }
        let last = match short.split('<').next().unwrap_or(short) {
            s if s.starts_with("{closure#")
                || s.starts_with("{async_fn#")
                || s.starts_with("{async_block#") =>
            {
                "{{closure}}".to_string()
            }
            "" => short.to_string(),
            s => s.to_string(),
        };
        let module = caller.rsplit_once("::").map_or("", |(m, _)| m);
        let candidates = self.by_last.get(&last).map_or(&[][..], Vec::as_slice);
        for scope in [caller, module] {
            let path = format!("{scope}::{last}");
            if candidates.contains(&path) {
                return path;
            }
        }
        match candidates {
            [only] => only.clone(),
            _ if module.is_empty() => last,
            _ => format!("{module}::{last}"),
        }
    }
}

/// Source files modified after the program was built (cached `stat`s).
struct Modified {
    since: std::time::SystemTime,
    cache: HashMap<PathBuf, bool>,
}

impl Modified {
    fn new(since: std::time::SystemTime) -> Modified {
        Modified {
            since,
            cache: HashMap::new(),
        }
    }

    fn is_modified(&mut self, path: &Path) -> bool {
        if let Some(known) = self.cache.get(path) {
            return *known;
        }
        let modified = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .is_ok_and(|m| m > self.since);
        self.cache.insert(path.to_path_buf(), modified);
        modified
    }
}

/// The crates of carried functions, sorted.
pub fn crates(objects: &[ObjectFile], carried: &[Carried]) -> Vec<String> {
    carried
        .iter()
        .map(|c| objects[c.function.0].krate.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::Paths;

    fn legacy(path: &str, hash: &str) -> String {
        let parts: String = path
            .split("::")
            .map(|p| format!("{}{p}", p.len()))
            .collect();
        format!("_ZN{parts}17h{hash}E")
    }

    #[test]
    fn dwarf_short_names_are_qualified_by_scope_then_uniqueness() {
        let symbols = [
            legacy("shapes::free", "0000000000000001"),
            legacy("other::free", "0000000000000002"),
            legacy("shapes::unique", "0000000000000003"),
        ];
        let paths = Paths::new(symbols.iter().map(String::as_str));
        // In the caller's module first.
        assert_eq!(paths.qualify("free", "", "shapes::caller"), "shapes::free");
        assert_eq!(paths.qualify("free", "", "other::caller"), "other::free");
        // Anywhere when there is one of that name.
        assert_eq!(
            paths.qualify("unique", "", "elsewhere::caller"),
            "shapes::unique"
        );
        // No code of its own (fully inlined): named in the caller's module.
        assert_eq!(
            paths.qualify("scale<u64>", "", "shapes::caller"),
            "shapes::scale"
        );
        // A closure is named by its environment's type in what encloses it.
        assert_eq!(
            paths.qualify(
                "{closure#0}",
                "call_once<shapes::with_closure::{closure_env#0}, (u64)>",
                "core::ops::function::FnOnce::call_once{{vtable.shim}}"
            ),
            "shapes::with_closure::{{closure}}"
        );
    }
}
