//! C programs: a format-2 patch from edited C translation units, without the program's build
//! system (what libcare's and kpatch's build wrappers exist for).
//!
//! 1. **Discover** each edited unit's compiler and flags in the program's own DWARF: gcc records
//!    its version and its code-generation switches in the unit's `DW_AT_producer`
//!    (`GNU C17 12.2.0 -mtune=generic -march=x86-64 -g -O2`, `-grecord-gcc-switches`, gcc's
//!    default), and the directory it compiled in (`DW_AT_comp_dir`). gcc leaves out `-D`, `-I`
//!    and `-U`: the user adds them (`cflags`), and the reproduction check says when they are
//!    missing. A unit compiled by another gcc version than the builder's is refused.
//! 2. **Compile** the edited unit (and, when given, its original) with those flags plus
//!    `-ffunction-sections -fdata-sections`, so that each function and static is a section of
//!    its own, in the unit's directory (relative includes resolve as in the program's build).
//! 3. **Reproduce.** The original unit, compiled so, must match the running code function by
//!    function; else the flags are not the program's and the build is refused with the
//!    functions that differ.
//! 4. **Compare and write** as for Rust ([`crate::diff`], [`crate::emit`]): changed functions,
//!    their callers that inlined them, new functions they need. The objects carry the unit's
//!    file name (`STT_FILE`), so that the patch's references to `static` functions and
//!    variables bind to that file's definitions when several files define one name; a changed
//!    `static` function whose name several files define is refused (the entry to redirect
//!    would be a guess).

use crate::error::{Error, ErrorKind, Result};
use crate::objfile::ObjectFile;
use crate::program::{Program, SymbolKind};
use crate::{read_applied, BuildReport, Discovered, Rebuilt};
use gimli::{EndianSlice, LittleEndian, SectionId};
use object::{Object, ObjectSection};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// One edited translation unit.
#[derive(Debug, Clone)]
pub struct CSource {
    /// The edited file.
    pub edited: PathBuf,
    /// The file as the program was built from it: compiled to check that the flags reproduce
    /// the running code (without it, the check is skipped and a warning says so).
    pub original: Option<PathBuf>,
    /// The unit's name as the program's DWARF records it (default: the one whose file name is
    /// the original's, else the edited file's).
    pub unit: Option<String>,
}

/// What to build from C sources.
#[derive(Debug, Clone)]
pub struct CBuildOptions {
    /// The program.
    pub base: crate::Base,
    /// The edited units.
    pub sources: Vec<CSource>,
    /// The compiler (default: `gcc`).
    pub compiler: Option<String>,
    /// Flags gcc does not record (`-DHAVE_CONFIG_H`, `-I.`), added to the recorded ones.
    pub cflags: Vec<String>,
    /// Where to write the patch.
    pub output: PathBuf,
    /// Patches applied to the process, oldest first.
    pub applied: Vec<PathBuf>,
    /// Compare and report, write nothing.
    pub dry_run: bool,
}

/// A compilation unit of the program, as its DWARF describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// `DW_AT_name`: the source file as given to the compiler.
    pub name: String,
    /// `DW_AT_comp_dir`: where the compiler ran.
    pub comp_dir: Option<String>,
    /// `DW_AT_producer`.
    pub producer: String,
}

impl Unit {
    /// The source file's path (the name, under the compilation directory when relative).
    pub fn path(&self) -> PathBuf {
        match &self.comp_dir {
            Some(dir) => Path::new(dir).join(&self.name),
            None => PathBuf::from(&self.name),
        }
    }

    fn file_name(&self) -> Option<&str> {
        Path::new(&self.name).file_name()?.to_str()
    }
}

/// What a gcc `DW_AT_producer` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Producer {
    /// The language (`C17`).
    pub language: String,
    /// gcc's version (`12.2.0`).
    pub version: String,
    /// The recorded switches.
    pub switches: Vec<String>,
}

/// Parses `GNU C17 12.2.0 -mtune=generic -O2 …`; `None` for another producer (clang, rustc).
pub fn parse_producer(producer: &str) -> Option<Producer> {
    let mut words = producer.split_whitespace();
    if words.next()? != "GNU" {
        return None;
    }
    let language = words.next()?.to_string();
    if !language.starts_with('C') || language.starts_with("C++") {
        return None;
    }
    let version = words.next()?.to_string();
    Some(Producer {
        language,
        version,
        switches: words.map(str::to_string).collect(),
    })
}

/// The compilation units of the executable `data` (its DWARF; `what` names it in errors).
pub fn units(data: &[u8], what: &str) -> Result<Vec<Unit>> {
    let file = object::File::parse(data).map_err(|e| Error::object(what, e))?;
    let mut sections = std::collections::HashMap::new();
    for section in file.sections() {
        let Ok(name) = section.name() else { continue };
        if name.starts_with(".debug_") {
            let bytes = section
                .uncompressed_data()
                .map_err(|e| Error::object(what, e))?;
            sections.insert(name.to_string(), bytes.into_owned());
        }
    }
    if !sections.contains_key(".debug_info") {
        return Err(Error::object(
            what,
            "it has no debug information: the builder reads each C unit's compiler, flags and \
             directory there (build the program with -g)",
        ));
    }
    let empty: &[u8] = &[];
    let load = |id: SectionId| -> std::result::Result<EndianSlice<'_, LittleEndian>, gimli::Error> {
        Ok(EndianSlice::new(
            sections.get(id.name()).map_or(empty, Vec::as_slice),
            LittleEndian,
        ))
    };
    let dwarf = gimli::Dwarf::load(load).map_err(|e| Error::object(what, e))?;
    let mut out = Vec::new();
    let mut headers = dwarf.units();
    while let Some(header) = headers.next().map_err(|e| Error::object(what, e))? {
        let Ok(unit) = dwarf.unit(header) else {
            continue;
        };
        let mut entries = unit.entries();
        let Ok(Some(root)) = entries.next_dfs() else {
            continue;
        };
        let text = |name| {
            root.attr_value(name)
                .and_then(|v| dwarf.attr_string(&unit, v).ok())
                .map(|s| s.to_string_lossy().into_owned())
        };
        let (Some(name), Some(producer)) = (text(gimli::DW_AT_name), text(gimli::DW_AT_producer))
        else {
            continue;
        };
        out.push(Unit {
            name,
            comp_dir: text(gimli::DW_AT_comp_dir),
            producer,
        });
    }
    Ok(out)
}

/// Chooses the unit an edited source belongs to.
fn unit_of<'u>(units: &'u [Unit], source: &CSource) -> Result<&'u Unit> {
    let wanted = match &source.unit {
        Some(unit) => unit.clone(),
        None => source
            .original
            .as_ref()
            .unwrap_or(&source.edited)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let found: Vec<&Unit> = units
        .iter()
        .filter(|u| {
            u.name == wanted
                || u.file_name() == Some(wanted.as_str())
                || u.path().ends_with(&wanted)
        })
        .filter(|u| parse_producer(&u.producer).is_some())
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(Error::new(ErrorKind::Discovery {
            detail: format!(
                "the program has no C unit `{wanted}` compiled by gcc in its debug information \
                 (its C units: {})",
                units
                    .iter()
                    .filter(|u| parse_producer(&u.producer).is_some())
                    .map(|u| u.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })),
        many => Err(Error::new(ErrorKind::Discovery {
            detail: format!(
                "several units of the program match `{wanted}` ({}): name one with UNIT",
                many.iter()
                    .map(|u| u.path().display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })),
    }
}

/// The compiler's version (`gcc -dumpfullversion`).
fn compiler_version(compiler: &str) -> Result<String> {
    let output = Command::new(compiler)
        .arg("-dumpfullversion")
        .output()
        .map_err(|e| Error::io(Path::new(compiler), e))?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// Compiles `source` as the program's unit was compiled, plus one section per function and
/// static; returns the command line.
fn compile(
    compiler: &str,
    flags: &[String],
    unit: &Unit,
    source: &Path,
    out: &Path,
) -> Result<(ObjectFile, String)> {
    let source = std::path::absolute(source).map_err(|e| Error::io(source, e))?;
    let mut command = Command::new(compiler);
    command
        .args(flags)
        .args(["-ffunction-sections", "-fdata-sections", "-c", "-o"])
        .arg(out)
        .arg(&source);
    // `#include "x.h"` resolves next to the original unit, wherever the edited copy lies.
    if let Some(dir) = unit.path().parent().filter(|d| d.is_dir()) {
        command.arg("-iquote").arg(dir);
    }
    if let Some(dir) = unit.comp_dir.as_ref().filter(|d| Path::new(d).is_dir()) {
        command.current_dir(dir);
    }
    let shown = format!(
        "{compiler} {} -ffunction-sections -fdata-sections -c {}",
        flags.join(" "),
        source.display()
    );
    let output = command
        .output()
        .map_err(|e| Error::io(Path::new(compiler), e))?;
    if !output.status.success() {
        let diagnostics = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = diagnostics.lines().collect();
        return Err(Error::new(ErrorKind::Cargo {
            command: shown,
            output: lines[lines.len().saturating_sub(30)..].join("\n"),
        }));
    }
    let bytes = std::fs::read(out).map_err(|e| Error::io(out, e))?;
    let mut object = ObjectFile::parse(&bytes, &source.display().to_string(), &unit.name)?;
    object.source_file = unit.file_name().map(str::to_string);
    Ok((object, shown))
}

/// Builds a format-2 patch from edited C units (see the module docs). Nothing is written
/// unless every check passed.
pub fn build_patch(options: &CBuildOptions) -> Result<BuildReport> {
    if options.sources.is_empty() {
        return Err(Error::new(ErrorKind::Discovery {
            detail: "no edited C source given".into(),
        }));
    }
    let base_file = options.base.file();
    let built_at = std::fs::metadata(&base_file)
        .and_then(|m| m.modified())
        .map_err(|e| Error::io(&base_file, e))?;
    let data = std::fs::read(&base_file).map_err(|e| Error::io(&base_file, e))?;
    let what = base_file.display().to_string();
    let all_units = units(&data, &what)?;
    let program = Program::parse(data, &what)?;
    let applied = options
        .applied
        .iter()
        .map(|p| read_applied(p))
        .collect::<Result<Vec<_>>>()?;
    let compiler = options.compiler.clone().unwrap_or_else(|| "gcc".into());
    let version = compiler_version(&compiler)?;
    let scratch = crate::scratch_dir()?;
    let result = compile_units(options, &all_units, &program, &compiler, &version, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    let (objects, commands, warnings, compile_seconds, names) = result?;
    let mut report = crate::compare_and_write(Rebuilt {
        program,
        objects,
        applied,
        crates: &[],
        built_at,
        toolchain: format!("gcc {version}"),
        configuration: Discovered {
            profile: String::new(),
            package: names.join(", "),
            bin: what,
            unit: names.join(", "),
            found_by: "DW_AT_producer".into(),
            features: Vec::new(),
            command: commands.join(" && "),
        },
        compile_seconds,
        output: &options.output,
        dry_run: options.dry_run,
    })?;
    report.warnings.splice(0..0, warnings);
    Ok(report)
}

type Compiled = (Vec<ObjectFile>, Vec<String>, Vec<String>, f64, Vec<String>);

fn compile_units(
    options: &CBuildOptions,
    all_units: &[Unit],
    program: &Program,
    compiler: &str,
    version: &str,
    scratch: &Path,
) -> Result<Compiled> {
    let started = Instant::now();
    let (mut objects, mut commands, mut warnings, mut names) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, source) in options.sources.iter().enumerate() {
        let unit = unit_of(all_units, source)?;
        let producer = parse_producer(&unit.producer).expect("unit_of keeps gcc units");
        if producer.version != version {
            return Err(Error::configuration(
                "compiler",
                format!(
                    "{} was compiled by gcc {}, the builder's `{compiler}` is gcc {version}: \
                     another compiler generates other code (give the program's with --cc)",
                    unit.name, producer.version
                ),
            ));
        }
        let mut flags = producer.switches.clone();
        flags.extend(options.cflags.iter().cloned());
        // The original and the edited unit are compiled side by side: a large unit (memcached.c)
        // takes seconds of gcc each, and nothing of one compile waits for the other.
        let (original, edited) = std::thread::scope(|scope| {
            let original = source.original.as_ref().map(|original| {
                let (flags, out) = (&flags, scratch.join(format!("{i}-original.o")));
                scope.spawn(move || compile(compiler, flags, unit, original, &out))
            });
            let edited = compile(
                compiler,
                &flags,
                unit,
                &source.edited,
                &scratch.join(format!("{i}-edited.o")),
            );
            let original = original.map(|h| h.join().expect("gcc's runner does not panic"));
            (original, edited)
        });
        match original {
            Some(original) => check_reproduced(program, &original?.0, unit, &flags)?,
            None => warnings.push(format!(
                "{}: no original source given, so the flags were not checked against the running \
                 code (a difference they cause would be carried as a change)",
                unit.name
            )),
        }
        let (object, command) = edited?;
        if let Some(file) = &object.source_file {
            if !program.files().contains(file.as_str()) {
                warnings.push(format!(
                    "the program's symbol table names no file {file}: its `static`s bind by \
                     name only"
                ));
            }
        }
        objects.push(object);
        commands.push(command);
        names.push(unit.name.clone());
    }
    Ok((
        objects,
        commands,
        warnings,
        started.elapsed().as_secs_f64(),
        names,
    ))
}

/// The original unit compiled with the discovered flags must be the running code.
fn check_reproduced(
    program: &Program,
    object: &ObjectFile,
    unit: &Unit,
    flags: &[String],
) -> Result<()> {
    let objects = std::slice::from_ref(object);
    let diff = crate::diff::diff(&crate::diff::Inputs {
        program,
        objects,
        applied: &[],
        crates: &[],
        // Nothing counts as edited: every difference is the flags'.
        built_at: std::time::SystemTime::now(),
    })
    .map_err(|e| {
        Error::new(ErrorKind::NotReproducible {
            detail: format!(
                "the original {} compiled with `{}` cannot be matched with the running code \
                 ({e}): the program was built with other flags (gcc does not record -D, -I and \
                 -U: give them with --cflags) or from another source",
                unit.name,
                flags.join(" ")
            ),
        })
    })?;
    let differing: Vec<String> = diff
        .carried
        .iter()
        .filter(|c| c.replaces.is_some())
        .map(|c| match &c.detail {
            Some(d) => format!("{} ({d})", c.name),
            None => c.name.clone(),
        })
        .collect();
    if differing.is_empty() {
        return Ok(());
    }
    Err(Error::new(ErrorKind::NotReproducible {
        detail: format!(
            "the original {} compiled with `{}` differs from the running code in {} functions \
             ({}): the program was built with other flags (gcc does not record -D, -I and -U: \
             give them with --cflags) or from another source",
            unit.name,
            flags.join(" "),
            differing.len(),
            differing
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }))
}

/// A replaced `static` function whose name several files of the program define cannot be
/// named to the engine, which redirects functions by symbol.
pub(crate) fn check_unambiguous(
    program: &Program,
    carried: &[crate::CarriedFunction],
) -> Result<()> {
    for c in carried.iter().filter(|c| c.replaces) {
        let functions: Vec<_> = program
            .definitions(&c.symbol)
            .iter()
            .filter(|d| d.kind == SymbolKind::Function)
            .collect();
        if functions.len() > 1 {
            let files: Vec<&str> = functions
                .iter()
                .map(|d| program.file_of(d).unwrap_or("a global"))
                .collect();
            return Err(Error::new(ErrorKind::Unsupported {
                function: c.name.clone(),
                what: format!(
                    "the program defines {} functions of this name (in {}): which one to \
                     replace cannot be told by its symbol; rename the static function",
                    functions.len(),
                    files.join(", ")
                ),
            }));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcc_producers_give_version_and_switches() {
        let p = parse_producer("GNU C17 12.2.0 -mtune=generic -march=x86-64 -g -O2").unwrap();
        assert_eq!(p.language, "C17");
        assert_eq!(p.version, "12.2.0");
        assert_eq!(p.switches, ["-mtune=generic", "-march=x86-64", "-g", "-O2"]);
        assert!(parse_producer("GNU C++17 12.2.0 -O2").is_none());
        assert!(parse_producer("Debian clang version 14.0.6").is_none());
        assert!(parse_producer("clang LLVM (rustc version 1.80.0)").is_none());
    }

    #[test]
    fn a_gcc_program_names_each_unit_with_its_flags_and_directory() {
        let dir = std::env::temp_dir().join(format!("evolve-c-units-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("one.c"),
            "static int n; int one(void) { return ++n; }\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("main.c"),
            "int one(void); int main(void) { return one(); }\n",
        )
        .unwrap();
        let status = Command::new("gcc")
            .current_dir(&dir)
            .args(["-O1", "-g", "-o", "prog", "one.c", "main.c"])
            .status()
            .unwrap();
        assert!(status.success());
        let data = std::fs::read(dir.join("prog")).unwrap();
        let found = units(&data, "prog").unwrap();
        let one = found.iter().find(|u| u.name == "one.c").expect("one.c");
        assert_eq!(one.path(), dir.join("one.c"));
        let producer = parse_producer(&one.producer).unwrap();
        assert!(producer.switches.iter().any(|s| s == "-O1"), "{producer:?}");
        let program = Program::parse(data, "prog").unwrap();
        let n = program.definitions("n")[0];
        assert_eq!(program.file_of(&n), Some("one.c"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
