//! Format 1: from the edited source of a running program's crate, a thin patch of its
//! `#[evolve::hot]` functions as a shared object (`.so`), applied by `evolve_hot::patch::apply`.
//! It stays until the apply of format-2 objects ([`crate::build_patch`]) lands.
//!
//! 1. **Base.** Read the running binary — by path, or by pid through `/proc/PID/exe`, which
//!    still reaches the file a process was started from after it is replaced on disk — for its
//!    build id, the symbols it exports, its statics' sizes and the libraries it needs.
//! 2. **Compile** the changed crate with the same toolchain, lockfile and profile, through
//!    `cargo rustc -p PACKAGE --lib`: the same unit as the program's build, so the same symbol
//!    hashes and the same codegen units. The objects are the `.rcgu.o` members of the rlib it
//!    produces (a single `--emit=obj=…` object would force one codegen unit, which inlines
//!    differently, and unchanged code would no longer compare equal).
//! 3. **Check** before writing anything: each hot implementation is compared with the
//!    program's code, relocation-aware ([`crate::compare`]), and only those that differ — or
//!    reach a function of the crate that differs or that the program lacks — become manifest
//!    entries (a patch carries and reports only what changed; when nothing did, a warning says so);
//!    every symbol the objects need must be exported by the base or defined by a library it
//!    needs (those that are not — e.g. inlined away by LTO — are listed); statics whose size
//!    changed are reported.
//! 4. **Link** `cc -shared -nostartfiles -Wl,-Bsymbolic-functions`: no initializers (loading runs
//!    no code), and calls inside the patch bind to the patch's own new functions while its data
//!    references still bind to the program's statics (one of every static). The manifest is
//!    linked in as the exported symbol `evolve_patch_manifest`, with a placeholder digest.
//! 5. **Seal**: the linked object is checked the way apply will check it (loading it must run
//!    none of its code: [`evolve_code::dylib::PatchFile::check_loadable`]), its SHA-256 computed
//!    with the manifest zeroed ([`evolve_hot::manifest::content_digest`]) and written into the
//!    manifest in place (same length), and only then is the output written.

use evolve_code::dylib::{read_regular_file, PatchFile};
use evolve_hot::manifest::{
    content_digest, hex, ChangedStatic, FunctionEntry, Manifest, FORMAT, MANIFEST_SYMBOL,
};
use evolve_hot::{Error, ErrorKind, Result};
use object::{Object, ObjectSymbol, SymbolKind};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub use crate::Base;

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The `Cargo.toml` of the program's workspace (the same path it was built from).
    pub manifest_path: PathBuf,
    /// The package whose library carries the changed code.
    pub package: String,
    /// The binary the patch is for.
    pub base: Base,
    /// Where to write the patch.
    pub output: PathBuf,
    /// The cargo profile the program was built with.
    pub profile: String,
    /// Extra environment for cargo (e.g. `CARGO_TARGET_DIR`), as the program's build had it.
    pub env: Vec<(String, String)>,
    /// The package's features as the program's build resolved them (cargo's `--features`):
    /// features are part of every symbol's hash, so they must match. Empty: the defaults.
    pub features: Vec<String>,
    /// Build the package without its default features (cargo's `--no-default-features`).
    pub no_default_features: bool,
    /// Packages the program's build built together with `package` — the binary's package
    /// (e.g. `evolve-bench` for its `evolve-bench-reclaim` library): the rebuild selects them
    /// too (`cargo build -p PACKAGE -p OTHER… --lib`), so that cargo unifies the features of
    /// the dependencies as the program's build did; they are part of every symbol's hash.
    /// Empty: `package` alone (`cargo rustc`).
    pub built_with: Vec<String>,
}

/// What [`build_patch`] produced.
#[derive(Debug, Clone)]
pub struct BuildReport {
    /// The patch file.
    pub output: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Things the operator should know (e.g. statics whose size changed).
    pub warnings: Vec<String>,
    /// Seconds spent compiling.
    pub compile_seconds: f64,
}

fn build_error(step: &str, detail: impl Into<String>) -> Error {
    Error::new(ErrorKind::Build {
        step: step.to_string(),
        detail: detail.into(),
    })
}

fn run(step: &str, command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .map_err(|e| build_error(step, format!("cannot run {command:?}: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
        return Err(build_error(
            step,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// What the builder needs to know about the base binary.
struct BaseInfo {
    build_id: String,
    exported: HashSet<String>,
    object_sizes: HashMap<String, u64>,
    needed: Vec<String>,
}

/// Binaries and objects read by the builder are at most this long.
const MAX_INPUT_BYTES: u64 = 4 << 30;

fn read_base(path: &Path) -> Result<BaseInfo> {
    let data = read_regular_file(path, MAX_INPUT_BYTES)
        .map_err(|e| build_error("reading the base binary", e.to_string()))?;
    let file = object::File::parse(&*data).map_err(|e| {
        build_error(
            "reading the base binary",
            format!("{}: {e}", path.display()),
        )
    })?;
    let build_id = file
        .build_id()
        .ok()
        .flatten()
        .map(hex)
        .ok_or_else(|| build_error("reading the base binary", "it has no GNU build id"))?;
    let exported = file
        .dynamic_symbols()
        .filter(defines)
        .filter_map(|s| s.name().ok().map(str::to_string))
        .collect();
    let object_sizes = file
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Data && s.is_definition())
        .filter_map(|s| Some((s.name().ok()?.to_string(), s.size())))
        .collect();
    let needed = object::read::elf::ElfFile64::<object::Endianness>::parse(&*data)
        .ok()
        .map(|elf| needed_libraries(&elf))
        .unwrap_or_default();
    Ok(BaseInfo {
        build_id,
        exported,
        object_sizes,
        needed,
    })
}

fn needed_libraries(elf: &object::read::elf::ElfFile64<object::Endianness>) -> Vec<String> {
    use object::read::elf::{Dyn, FileHeader, SectionHeader};
    let (endian, data) = (elf.endian(), elf.data());
    let Ok(sections) = elf.elf_header().sections(endian, data) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    for section in sections.iter() {
        let Ok(Some((entries, _))) = section.dynamic(endian, data) else {
            continue;
        };
        let Ok(strings) = sections.strings(
            endian,
            data,
            object::SectionIndex(section.sh_link(endian) as usize),
        ) else {
            continue;
        };
        for entry in entries {
            if entry.d_tag(endian) as u32 == object::elf::DT_NEEDED {
                if let Ok(name) = strings.get(entry.d_val(endian) as u32) {
                    names.push(String::from_utf8_lossy(name).into_owned());
                }
            }
        }
    }
    names
}

/// Whether `symbol` is a definition the dynamic linker can bind a patch's reference to: functions
/// and data, and also what `object`'s `is_definition` leaves out — IFUNCs (`STT_GNU_IFUNC`:
/// glibc's `memmove`, `memset`, `bcmp`, whose resolver picks the implementation) and
/// thread-locals (`STT_TLS`: every `thread_local!`), which a patch references as any other
/// symbol.
fn defines<'data>(symbol: &impl ObjectSymbol<'data>) -> bool {
    !symbol.is_undefined()
        && matches!(
            symbol.kind(),
            SymbolKind::Text | SymbolKind::Data | SymbolKind::Tls | SymbolKind::Unknown
        )
}

/// Symbols defined by the libraries the base needs (found in the usual library directories).
fn library_symbols(needed: &[String]) -> HashSet<String> {
    let dirs = [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib64",
        "/usr/lib64",
        "/lib",
        "/usr/lib",
    ];
    let mut symbols = HashSet::new();
    for name in needed {
        let Some(data) = dirs
            .iter()
            .map(|d| Path::new(d).join(name))
            .find_map(|p| read_regular_file(&p, MAX_INPUT_BYTES).ok())
        else {
            continue;
        };
        if let Ok(file) = object::File::parse(&*data) {
            symbols.extend(file.dynamic_symbols().filter(defines).filter_map(|s| {
                s.name()
                    .ok()
                    .map(|n| n.split('@').next().unwrap_or(n).to_string())
            }));
        }
    }
    symbols
}

/// The hot functions, adaptors, undefined symbols and statics of the compiled object.
struct ObjectInfo {
    functions: Vec<FunctionEntry>,
    adaptors: Vec<FunctionEntry>,
    transfers: Vec<String>,
    undefined: Vec<String>,
    statics: Vec<(String, u64)>,
}

fn split_fingerprint(rest: &str) -> Option<FunctionEntry> {
    let (id, fingerprint) = rest.rsplit_once('_')?;
    (fingerprint.len() == 16 && u64::from_str_radix(fingerprint, 16).is_ok()).then(|| {
        FunctionEntry {
            id: id.to_string(),
            fingerprint: fingerprint.to_string(),
        }
    })
}

/// The objects of the crate's library as cargo just built it: the `.rcgu.o` members of its
/// rlib, written to `scratch`. These are the program's codegen units, compiled the same way
/// (one object from `--emit=obj=…` would force a single codegen unit, which inlines
/// differently, so unchanged functions would not compare equal to the program's).
fn crate_objects(messages: &str, package: &str, scratch: &Path) -> Result<Vec<PathBuf>> {
    let step = "finding the compiled library";
    let krate = package.replace('-', "_");
    let rlib = messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter(|m| {
            m["target"]["name"].as_str().map(|n| n.replace('-', "_")) == Some(krate.clone())
        })
        .flat_map(|m| m["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .find(|f| f.extension().is_some_and(|e| e == "rlib"))
        .ok_or_else(|| build_error(step, format!("cargo reported no rlib of package {package}")))?;
    let data =
        read_regular_file(&rlib, MAX_INPUT_BYTES).map_err(|e| build_error(step, e.to_string()))?;
    let members = crate::objfile::rlib_members(&data, &rlib.display().to_string())
        .map_err(|e| build_error(step, e.to_string()))?;
    if members
        .iter()
        .any(|(_, bytes)| crate::objfile::is_bitcode(bytes))
    {
        return Err(build_error(
            step,
            format!(
                "{} holds LLVM bitcode (LTO): a thin patch needs machine code",
                rlib.display()
            ),
        ));
    }
    let mut paths = Vec::new();
    for (i, (_, bytes)) in members.iter().enumerate() {
        let path = scratch.join(format!("unit-{i}.o"));
        std::fs::write(&path, bytes).map_err(|e| build_error(step, e.to_string()))?;
        paths.push(path);
    }
    if paths.is_empty() {
        return Err(build_error(
            step,
            format!("{} holds no object", rlib.display()),
        ));
    }
    Ok(paths)
}

fn read_object(paths: &[PathBuf]) -> Result<ObjectInfo> {
    let mut info = ObjectInfo {
        functions: Vec::new(),
        adaptors: Vec::new(),
        transfers: Vec::new(),
        undefined: Vec::new(),
        statics: Vec::new(),
    };
    let mut defined = HashSet::new();
    for path in paths {
        read_one_object(path, &mut info, &mut defined)?;
    }
    info.undefined.retain(|u| !defined.contains(u));
    info.undefined.sort();
    info.undefined.dedup();
    info.functions.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(info)
}

fn read_one_object(
    path: &Path,
    info: &mut ObjectInfo,
    defined: &mut HashSet<String>,
) -> Result<()> {
    let data = read_regular_file(path, MAX_INPUT_BYTES)
        .map_err(|e| build_error("reading the object", e.to_string()))?;
    let file = object::File::parse(&*data)
        .map_err(|e| build_error("reading the object", e.to_string()))?;
    for symbol in file.symbols() {
        let Ok(name) = symbol.name() else { continue };
        if symbol.is_undefined() {
            if !name.is_empty() {
                info.undefined.push(name.to_string());
            }
            continue;
        }
        defined.insert(name.to_string());
        if let Some(rest) = name.strip_prefix("__evolve_impl_") {
            info.functions.extend(split_fingerprint(rest));
        } else if let Some(rest) = name.strip_prefix("__evolve_adaptor_") {
            info.adaptors.extend(split_fingerprint(rest));
        } else if name.starts_with("__evolve_transfer_") {
            info.transfers.push(name.to_string());
        } else if symbol.kind() == SymbolKind::Data
            && symbol.is_global()
            && !crate::objfile::is_anonymous(name)
        {
            // Anonymous constants (`anon.<hash>.<n>`, shared between a crate's units) have no
            // identity or state: the patch uses its own copy, whatever the program's holds.
            info.statics.push((name.to_string(), symbol.size()));
        }
    }
    Ok(())
}

/// The ids of the hot functions of the compiled objects (at `object_paths`) whose code differs
/// from the program's, or reaches (through the crate's own functions) code that does: an
/// unchanged hot function that calls a changed helper must be carried, since the patch's
/// calls bind to the patch's own functions. A function the program lacks counts as changed.
fn changed_hot_functions(
    program: &Path,
    object_paths: &[PathBuf],
    krate: &str,
) -> Result<HashSet<String>> {
    use crate::compare::{Comparator, Verdict};
    use crate::objfile::ObjectFile;
    use crate::program::{Program, SymbolKind};
    let step = "comparing with the program";
    let program = Program::read(program).map_err(|e| build_error(step, e.to_string()))?;
    let mut objects = Vec::new();
    for path in object_paths {
        let data = read_regular_file(path, MAX_INPUT_BYTES)
            .map_err(|e| build_error(step, e.to_string()))?;
        objects.push(
            ObjectFile::parse(&data, &path.display().to_string(), krate)
                .map_err(|e| build_error(step, e.to_string()))?,
        );
    }
    let comparator = Comparator::with_rebuilt(&program, &objects);
    // A function is (object, symbol); a global one is found in any object by name.
    let global = |name: &str| {
        objects
            .iter()
            .enumerate()
            .find_map(|(o, object)| object.defined(name).map(|s| (o, s)))
    };
    let differs = |(o, f): (usize, usize)| {
        let object = &objects[o];
        let name = object.symbols[f].name.as_str();
        let copies: Vec<_> = program
            .definitions(name)
            .iter()
            .filter(|d| d.kind == SymbolKind::Function)
            .collect();
        // Several copies (a local symbol in several units): equal to any one is unchanged.
        !copies
            .iter()
            .any(|d| comparator.with_program(object, f, d.address, d.size) == Verdict::Same)
    };
    // What a piece of code or data refers to, within the crate: functions (compared) and data
    // (followed: an async function's future reaches its poll function through a vtable).
    // A node is (object, section, start, end, function symbol if it is one).
    type Node = (usize, usize, u64, u64, Option<usize>);
    let node_of = |o: usize, t: usize| -> Option<Node> {
        let symbol = &objects[o].symbols[t];
        let section = symbol.section?;
        let is_function = symbol.is_function() && symbol.size > 0;
        Some((
            o,
            section,
            symbol.value,
            symbol.value + symbol.size,
            is_function.then_some(t),
        ))
    };
    let references = |(o, section, start, end, _): Node| -> Vec<Node> {
        let object = &objects[o];
        object.sections[section]
            .relocations_in(start, end)
            .iter()
            .filter_map(|r| {
                let target = &object.symbols[r.symbol];
                match (target.is_section(), target.section) {
                    (true, Some(s)) => match object.symbol_at_start(s) {
                        Some(t) => node_of(o, t),
                        // Anonymous data (a vtable, a constant): the whole section.
                        None => Some((o, s, 0, object.sections[s].size, None)),
                    },
                    (false, Some(_)) => node_of(o, r.symbol),
                    _ => global(&target.name).and_then(|(o, t)| node_of(o, t)),
                }
            })
            .collect()
    };
    let mut changed = HashSet::new();
    let mut verdicts: HashMap<(usize, usize), bool> = HashMap::new();
    for (o, object) in objects.iter().enumerate() {
        for f in object.functions() {
            let Some(entry) = object.symbols[f]
                .name
                .strip_prefix("__evolve_impl_")
                .and_then(split_fingerprint)
            else {
                continue;
            };
            // Through everything it reaches, each function compared once.
            let Some(first) = node_of(o, f) else { continue };
            let (mut queue, mut seen) = (vec![first], HashSet::from([first]));
            while let Some(node) = queue.pop() {
                if let Some(g) = node.4 {
                    if *verdicts
                        .entry((node.0, g))
                        .or_insert_with(|| differs((node.0, g)))
                    {
                        changed.insert(entry.id.clone());
                        break;
                    }
                }
                queue.extend(references(node).into_iter().filter(|c| seen.insert(*c)));
            }
        }
    }
    Ok(changed)
}

/// A symbol's demangled path without the hash (`hotfix::CALLS`), or the symbol itself.
fn path_without_hash(symbol: &str) -> String {
    format!("{:#}", rustc_demangle::demangle(symbol))
}

/// The patch's statics whose layout differs from the program's.
///
/// Statics are matched by exact symbol: one path may name several statics (every expansion of
/// a macro that declares one, such as `tracing`'s `CALLSITE`s, in one function), and each binds
/// to the program's definition of its own symbol. A static whose symbol the program has changed
/// if its size did (v0 mangling keeps the symbol when the type changes). A static whose symbol
/// the program lacks is new, unless the type changed: the legacy mangling hashes an item's
/// type, so such a static gets a new name and would silently start from a fresh copy instead
/// of the program's value. It is recognised by its path when that names exactly one of the
/// program's statics that no static of the patch matches by symbol; several such candidates
/// cannot be told apart, and the patch's statics of that path are taken as new.
pub(crate) fn changed_statics(
    running: &HashMap<String, u64>,
    patch: &[(String, u64)],
) -> Vec<ChangedStatic> {
    let in_patch: HashSet<&str> = patch.iter().map(|(name, _)| name.as_str()).collect();
    let mut renamed: HashMap<String, Vec<(&String, u64)>> = HashMap::new();
    for (name, size) in running {
        if !in_patch.contains(name.as_str()) {
            renamed
                .entry(path_without_hash(name))
                .or_default()
                .push((name, *size));
        }
    }
    patch
        .iter()
        .filter_map(|(name, size)| {
            let (running_symbol, running) = match running.get(name) {
                Some(running) => (name, *running),
                None => match renamed.get(&path_without_hash(name))?.as_slice() {
                    [only] => *only,
                    _ => return None,
                },
            };
            (running_symbol != name || running != *size).then(|| ChangedStatic {
                symbol: path_without_hash(name),
                running_symbol: running_symbol.clone(),
                running,
                patch: *size,
            })
        })
        .collect()
}

fn toolchain(workdir: &Path) -> Result<String> {
    Ok(run(
        "rustc -V",
        Command::new("rustc").arg("-V").current_dir(workdir),
    )?
    .trim()
    .to_string())
}

/// A C file holding the manifest as the exported, NUL-terminated `evolve_patch_manifest`.
fn manifest_source(json: &str) -> String {
    let bytes: Vec<String> = json.bytes().chain([0]).map(|b| b.to_string()).collect();
    format!(
        "__attribute__((visibility(\"default\"), used)) const unsigned char {MANIFEST_SYMBOL}[] = {{{}}};\n",
        bytes.join(",")
    )
}

/// Checks the linked patch as apply will, and writes its content digest into its manifest
/// (whose JSON is `json_len` bytes, placeholder digest included): the patch's final bytes.
fn seal(linked: &Path, manifest: &mut Manifest, json_len: usize) -> Result<Vec<u8>> {
    let step = "sealing the patch";
    let file = PatchFile::read(linked).map_err(|e| build_error(step, e.to_string()))?;
    file.check_loadable()
        .map_err(|e| build_error("checking the linked patch", e.to_string()))?;
    let range = file
        .symbol(MANIFEST_SYMBOL)
        .map_err(|e| build_error(step, e.to_string()))?;
    if range.len() != json_len + 1 {
        return Err(build_error(
            step,
            format!(
                "the linked manifest is {} bytes, not {}",
                range.len(),
                json_len + 1
            ),
        ));
    }
    manifest.sha256 = hex(&content_digest(file.bytes(), range.clone()));
    let json = serde_json::to_string(&*manifest).expect("manifest serializes");
    // Only the digest's digits changed: the same length, so the file's layout stays.
    assert_eq!(json.len(), json_len, "a digest has a fixed length");
    let mut bytes = file.bytes().to_vec();
    bytes[range.start..range.start + json.len()].copy_from_slice(json.as_bytes());
    Ok(bytes)
}

/// Builds a thin patch (see the module docs). Nothing is written to `output` unless every check
/// passed.
pub fn build_patch(options: &BuildOptions) -> Result<BuildReport> {
    let base_file = options.base.file();
    let base = read_base(&base_file)?;
    // `Cargo.toml` alone has the empty path as parent: the current directory.
    let workdir = options
        .manifest_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let toolchain = toolchain(&workdir)?;
    let scratch = std::env::temp_dir().join(format!(
        "evolve-patch-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&scratch)
        .map_err(|e| build_error("scratch directory", e.to_string()))?;
    let result = build_in(options, &base, toolchain, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn build_in(
    options: &BuildOptions,
    base: &BaseInfo,
    toolchain: String,
    scratch: &Path,
) -> Result<BuildReport> {
    let compile_start = Instant::now();
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo
        .arg(if options.built_with.is_empty() {
            "rustc"
        } else {
            "build"
        })
        .arg("--manifest-path")
        .arg(&options.manifest_path)
        .args([
            "--profile",
            &options.profile,
            "-p",
            &options.package,
            "--lib",
            "--quiet",
            "--message-format=json-render-diagnostics",
        ]);
    for other in &options.built_with {
        cargo.args(["-p", other]);
    }
    if options.no_default_features {
        cargo.arg("--no-default-features");
    }
    if !options.features.is_empty() {
        cargo.arg("--features").arg(options.features.join(","));
    }
    cargo.envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let messages = run("cargo rustc", &mut cargo)?;
    let compile_seconds = compile_start.elapsed().as_secs_f64();
    let object_paths = crate_objects(&messages, &options.package, scratch)?;

    let mut object = read_object(&object_paths)?;
    if object.functions.is_empty() {
        return Err(build_error(
            "reading the object",
            format!(
                "package {} has no #[evolve::hot] functions",
                options.package
            ),
        ));
    }
    // Only what changed is carried (and reported, and replaced at apply).
    let changed = changed_hot_functions(&options.base.file(), &object_paths, &options.package)?;
    object.functions.retain(|f| changed.contains(&f.id));
    object.adaptors.retain(|a| changed.contains(&a.id));
    let mut available = base.exported.clone();
    available.extend(library_symbols(&base.needed));
    let missing: Vec<String> = object
        .undefined
        .iter()
        .filter(|u| !available.contains(*u) && !u.starts_with("_GLOBAL_OFFSET_TABLE_"))
        .cloned()
        .collect();
    if !missing.is_empty() {
        // The same items under other hashes: the crate graph was compiled differently (features
        // are part of every hash), not a missing dependency. Say so, with what to do.
        let paths: HashSet<String> = available.iter().map(|s| path_without_hash(s)).collect();
        let rehashed: Vec<String> = missing
            .iter()
            .map(|s| path_without_hash(s))
            .filter(|p| paths.contains(p))
            .collect();
        if !rehashed.is_empty() {
            return Err(build_error(
                "matching the program's symbols",
                format!(
                    "{} of the {} symbols the patch needs exist in the program under other \
                     hashes (e.g. {}): the crates were compiled with other features than \
                     the program's build. Build the program's package alone (`cargo build \
                     -p BINARY`, not together with other packages, whose features cargo \
                     unifies) and give the builder the features it enabled for {} \
                     (--features, --no-default-features)",
                    rehashed.len(),
                    missing.len(),
                    rehashed[0],
                    options.package
                ),
            ));
        }
        return Err(Error::new(ErrorKind::Unresolved {
            path: options.output.display().to_string(),
            symbols: missing,
        }));
    }
    let changed_statics = changed_statics(&base.object_sizes, &object.statics);
    // The patch still builds (the operator sees why it will be refused, and a later Evolve
    // with a transfer function for it can apply it); apply refuses it.
    let krate = options.package.replace('-', "_");
    let mut warnings: Vec<String> = changed_statics
        .iter()
        .filter(|c| !object.transfers.contains(&c.transfer_symbol(&krate)))
        .map(|c| {
            Error::new(ErrorKind::StaticLayoutChanged {
                symbol: c.symbol.clone(),
                running: c.running,
                patch: c.patch,
            })
            .to_string()
        })
        .collect();
    if object.functions.is_empty() {
        warnings.push(format!(
            "no #[evolve::hot] function of package {} changed: the patch replaces nothing",
            options.package
        ));
    }

    let mut manifest = Manifest {
        format: FORMAT,
        sha256: "0".repeat(64),
        base_build_id: base.build_id.clone(),
        toolchain,
        crates: vec![options.package.clone()],
        functions: object.functions,
        adaptors: object.adaptors,
        changed_statics,
        transfers: object.transfers,
    };
    let json = serde_json::to_string(&manifest).expect("manifest serializes");
    let manifest_c = scratch.join("manifest.c");
    std::fs::write(&manifest_c, manifest_source(&json))
        .map_err(|e| build_error("writing the manifest", e.to_string()))?;
    let linked = scratch.join("patch.so");
    run(
        "cc -shared",
        Command::new("cc")
            .args([
                "-shared",
                "-nostartfiles",
                "-fPIC",
                "-Wl,-Bsymbolic-functions",
                "-o",
            ])
            .arg(&linked)
            .args(&object_paths)
            .arg(&manifest_c),
    )?;
    let sealed = seal(&linked, &mut manifest, json.len())?;
    if let Some(dir) = options.output.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| build_error("writing the patch", e.to_string()))?;
    }
    std::fs::write(&options.output, sealed)
        .map_err(|e| build_error("writing the patch", e.to_string()))?;
    Ok(BuildReport {
        output: options.output.clone(),
        manifest,
        warnings,
        compile_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implementation_symbols_split_into_id_and_fingerprint() {
        let e = split_fingerprint("kv_get_1234abcd_00112233aabbccdd").unwrap();
        assert_eq!(e.id, "kv_get_1234abcd");
        assert_eq!(e.fingerprint, "00112233aabbccdd");
        assert!(split_fingerprint("kv_get_nothex").is_none());
    }

    /// Legacy symbols of `krate::NAME` with the hash `h`.
    fn legacy(path: &str, hash: &str) -> String {
        let parts: String = path
            .split("::")
            .map(|p| format!("{}{p}", p.len()))
            .collect();
        format!("_ZN{parts}17h{hash}E")
    }

    #[test]
    fn statics_are_matched_by_exact_symbol_before_path() {
        let (one, two) = (
            legacy("app::f::HITS", "00000000000000a1"),
            legacy("app::f::HITS", "00000000000000b2"),
        );
        let running = HashMap::from([(one.clone(), 24), (two.clone(), 24)]);
        // The same two statics: nothing changed, whatever order they come in.
        let patch = vec![(two.clone(), 24), (one.clone(), 24)];
        assert_eq!(changed_statics(&running, &patch), Vec::new());
        // One grew: that one, against its own symbol.
        let changed = changed_statics(&running, &[(one.clone(), 32), (two.clone(), 24)]);
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].running_symbol, one);
        assert_eq!((changed[0].running, changed[0].patch), (24, 32));
    }

    #[test]
    fn a_renamed_static_is_changed_only_when_its_path_is_unambiguous() {
        let old = legacy("app::COUNT", "00000000000000a1");
        let new = legacy("app::COUNT", "00000000000000c3");
        let running = HashMap::from([(old.clone(), 8)]);
        // The type changed (legacy mangling hashes it): the patch's symbol is new, its path not.
        let changed = changed_statics(&running, &[(new.clone(), 8)]);
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].symbol, "app::COUNT");
        assert_eq!(changed[0].running_symbol, old);
        // A static with a new path is new, not changed.
        let fresh = legacy("app::OTHER", "00000000000000d4");
        assert_eq!(changed_statics(&running, &[(fresh, 8)]), Vec::new());
        // Two candidates of that path in the program: they cannot be told apart.
        let running = HashMap::from([(old, 8), (legacy("app::COUNT", "00000000000000e5"), 8)]);
        assert_eq!(changed_statics(&running, &[(new, 8)]), Vec::new());
    }

    #[test]
    fn manifest_source_is_a_nul_terminated_byte_array() {
        let c = manifest_source("{}");
        assert!(c.contains("evolve_patch_manifest[] = {123,125,0};"), "{c}");
    }
}
