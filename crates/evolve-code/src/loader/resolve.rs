//! Binding a patch's undefined symbols: the [`Resolve`] trait and the standard resolver,
//! [`ProgramResolver`].
//!
//! The standard resolver looks in the executable's **full** symbol table first (`.symtab`,
//! local symbols included: functions and statics that rustc internalised, C `static`s), at their
//! run-time addresses (link-time value plus the load bias), then in the loaded libraries through
//! `dlsym(RTLD_DEFAULT)`, which returns an IFUNC's selected implementation (`memmove`,
//! `memset`). Thread-locals bind only to the executable's own TLS block (module of the
//! executable), as offsets.
//!
//! # Several definitions of one name
//!
//! A linked executable may hold several *local* symbols with one name (two C files each with a
//! `static int count`; Rust names carry a hash and rarely collide). The resolver never guesses:
//! 1. one definition: that one;
//! 2. several: the local ones defined in the object file the patch names (its `STT_FILE` symbol,
//!    which the builder keeps from the object it rebuilt, e.g. `counter.c` or
//!    `kv_commands.abc123-cgu.0`), if exactly one;
//! 3. otherwise the one global definition, if exactly one (as a static link would bind);
//! 4. otherwise, for a Rust-mangled function name, the lowest address: rustc copies
//!    `#[inline]` functions into every codegen unit that calls them as local symbols, and one
//!    mangled name (which hashes the instance) always denotes one function, so every copy
//!    behaves the same (a test binary holds seven local copies of `<String as Display>::fmt`);
//!    The same holds across ThinLTO's renaming of locals (`F.llvm.<n>`, a number that differs
//!    between two builds of one source): a name the program lacks binds to a copy of the same
//!    Rust function under its other name;
//! 5. otherwise the reference is refused, listing the candidates and their files (two C
//!    `static`s of one name are different objects: guessing would bind the wrong one).
//!
//! The executable's `STT_FILE` symbol that precedes a run of local symbols names the file they
//! came from; globals belong to no file.
#![allow(unsafe_code)]

use crate::error::{Error, ErrorKind, Result};
use object::elf;
use object::read::elf::{FileHeader, Sym};
use std::collections::HashMap;

/// A symbol a patch needs.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    /// The symbol's name as the patch spells it (mangled).
    pub name: &'a str,
    /// Whether the patch uses it as a thread-local (`STT_TLS`, or a TLS relocation).
    pub thread_local: bool,
    /// The patch's source object file (its only `STT_FILE` symbol), to choose among several
    /// local definitions of `name` in the program.
    pub file: Option<&'a str>,
}

/// Where a wanted symbol lives in the running process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Code or data at this address.
    Address(usize),
    /// A thread-local of the executable, at this offset in its TLS block (its `st_value`).
    ExecutableTls(usize),
}

/// Binds the undefined symbols of a patch. The hot layer chains the program, the applied
/// patches and the libraries; [`ProgramResolver`] is the program-and-libraries part.
pub trait Resolve {
    /// Where `wanted` lives, or why it cannot be bound (missing, ambiguous, not thread-local…).
    fn resolve(&self, wanted: &Wanted<'_>) -> std::result::Result<Resolution, String>;
}

impl<F> Resolve for F
where
    F: Fn(&Wanted<'_>) -> std::result::Result<Resolution, String>,
{
    fn resolve(&self, wanted: &Wanted<'_>) -> std::result::Result<Resolution, String> {
        self(wanted)
    }
}

/// One definition of a name in the executable.
#[derive(Debug, Clone)]
struct Definition {
    /// Run-time address, or the TLS offset for a thread-local.
    value: usize,
    thread_local: bool,
    function: bool,
    global: bool,
    /// Index into `files`, for locals.
    file: Option<u32>,
}

/// The standard resolver: the executable's full symbol table with its load bias, then
/// `dlsym(RTLD_DEFAULT)` (see the module docs).
///
/// # Example
///
/// ```
/// use evolve_code::loader::{ProgramResolver, Resolution, Resolve, Wanted};
/// let resolver = ProgramResolver::new()?;
/// let wanted = Wanted { name: "memmove", thread_local: false, file: None };
/// assert!(matches!(resolver.resolve(&wanted), Ok(Resolution::Address(a)) if a != 0));
/// let missing = Wanted { name: "no_such_symbol_anywhere", thread_local: false, file: None };
/// assert!(resolver.resolve(&missing).unwrap_err().contains("not defined"));
/// # Ok::<(), evolve_code::Error>(())
/// ```
#[derive(Debug)]
pub struct ProgramResolver {
    by_name: HashMap<String, Vec<Definition>>,
    /// Rust functions renamed by ThinLTO's promotion of locals (`F.llvm.<n>`), by `F`.
    promoted: HashMap<String, Vec<Definition>>,
    files: Vec<String>,
}

/// `F` of a name ThinLTO promoted (`F.llvm.<digits>`), if it is one.
fn unpromoted(name: &str) -> Option<&str> {
    let (base, suffix) = name.rsplit_once(".llvm.")?;
    suffix.bytes().all(|b| b.is_ascii_digit()).then_some(base)
}

impl ProgramResolver {
    /// Reads the executable's symbol table (through `/proc/self/exe`, the file actually mapped)
    /// and takes its load bias from the loader.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Image`] if the file cannot be read, or is not the file that was loaded.
    pub fn new() -> Result<ProgramResolver> {
        let exe = crate::inspect::executable()?;
        let path = "/proc/self/exe";
        let image_error = |reason: String| {
            Error::new(ErrorKind::Image {
                path: exe.path().display().to_string(),
                reason,
            })
        };
        let data = std::fs::read(path).map_err(|e| image_error(e.to_string()))?;
        let header = elf::FileHeader64::<object::Endianness>::parse(&*data)
            .map_err(|e| image_error(format!("not an ELF64 file: {e}")))?;
        let endian = header.endian().map_err(|e| image_error(e.to_string()))?;
        let sections = header
            .sections(endian, &*data)
            .map_err(|e| image_error(e.to_string()))?;
        let symbols = sections
            .symbols(endian, &*data, elf::SHT_SYMTAB)
            .map_err(|e| image_error(e.to_string()))?;
        if symbols.is_empty() {
            return Err(image_error(
                "stripped (no .symtab): patches cannot bind to its local symbols".to_owned(),
            ));
        }
        let bias = exe.load_bias();
        let mut by_name: HashMap<String, Vec<Definition>> = HashMap::new();
        let mut files = Vec::new();
        let mut file = None;
        for symbol in symbols.iter() {
            let Ok(name) = symbols.symbol_name(endian, symbol) else {
                continue;
            };
            let kind = symbol.st_type();
            if kind == elf::STT_FILE {
                files.push(String::from_utf8_lossy(name).into_owned());
                file = Some(files.len() as u32 - 1);
                continue;
            }
            let shndx = symbol.st_shndx(endian);
            let defined =
                shndx != elf::SHN_UNDEF && shndx != elf::SHN_ABS && shndx != elf::SHN_COMMON;
            // IFUNCs bind through dlsym, which runs their resolver as the dynamic linker does.
            let wanted_kind = matches!(
                kind,
                elf::STT_FUNC | elf::STT_OBJECT | elf::STT_NOTYPE | elf::STT_TLS
            );
            if !defined || !wanted_kind || name.is_empty() {
                continue;
            }
            let thread_local = kind == elf::STT_TLS;
            let value = symbol.st_value(endian) as usize;
            let global = symbol.st_bind() != elf::STB_LOCAL;
            by_name
                .entry(String::from_utf8_lossy(name).into_owned())
                .or_default()
                .push(Definition {
                    value: if thread_local {
                        value
                    } else {
                        value.wrapping_add(bias)
                    },
                    thread_local,
                    function: kind == elf::STT_FUNC,
                    global,
                    file: if global { None } else { file },
                });
        }
        let mut promoted: HashMap<String, Vec<Definition>> = HashMap::new();
        for (name, definitions) in &by_name {
            if let Some(base) = unpromoted(name).filter(|b| is_rust_mangled(b)) {
                let functions = definitions.iter().filter(|d| d.function).cloned();
                promoted
                    .entry(base.to_owned())
                    .or_default()
                    .extend(functions);
            }
        }
        Ok(ProgramResolver {
            by_name,
            promoted,
            files,
        })
    }

    /// Where the executable defines `wanted`: `Ok(None)` if it does not, an error if the
    /// definitions are ambiguous or of the wrong kind.
    pub fn in_executable(
        &self,
        wanted: &Wanted<'_>,
    ) -> std::result::Result<Option<Resolution>, String> {
        let Some(all) = self.by_name.get(wanted.name) else {
            return Ok(self.promoted_copy(wanted.name));
        };
        let file_of = |d: &Definition| d.file.map(|f| self.files[f as usize].as_str());
        let chosen: Vec<&Definition> = if all.len() == 1 {
            all.iter().collect()
        } else {
            let in_file: Vec<&Definition> = all
                .iter()
                .filter(|d| !d.global && wanted.file.is_some() && file_of(d) == wanted.file)
                .collect();
            let globals: Vec<&Definition> = all.iter().filter(|d| d.global).collect();
            let copies_of_one_rust_function =
                is_rust_mangled(wanted.name) && all.iter().all(|d| d.function);
            if in_file.len() == 1 {
                in_file
            } else if globals.len() == 1 {
                globals
            } else if copies_of_one_rust_function {
                let lowest = all.iter().min_by_key(|d| d.value).expect("several");
                vec![lowest]
            } else {
                let candidates: Vec<String> = all
                    .iter()
                    .map(|d| match file_of(d) {
                        Some(f) => format!("local in {f}"),
                        None if d.global => "global".to_owned(),
                        None => "local of no file".to_owned(),
                    })
                    .collect();
                return Err(format!(
                    "ambiguous: the program defines it {} times ({}), and the patch's file \
                     symbol ({}) does not single one out",
                    all.len(),
                    candidates.join(", "),
                    wanted.file.unwrap_or("none")
                ));
            }
        };
        let definition = chosen[0];
        match (definition.thread_local, wanted.thread_local) {
            (true, true) => Ok(Some(Resolution::ExecutableTls(definition.value))),
            (false, false) => Ok(Some(Resolution::Address(definition.value))),
            (true, false) => {
                Err("the program's symbol is thread-local, the patch's use is not".into())
            }
            (false, true) => Err("the patch uses it as thread-local, the program's is not".into()),
        }
    }

    /// A Rust function the program or the patch knows under a ThinLTO-promoted name
    /// (`F.llvm.<n>`, whose number differs between two builds of one source): a mangled Rust
    /// name with its hash denotes one function instance, so any copy of `F` — promoted or not —
    /// is it (rule 4 of the module docs); the lowest-addressed one is chosen.
    fn promoted_copy(&self, name: &str) -> Option<Resolution> {
        let base = unpromoted(name).unwrap_or(name);
        if !is_rust_mangled(base) {
            return None;
        }
        let plain = self
            .by_name
            .get(base)
            .into_iter()
            .flatten()
            .filter(|d| d.function);
        plain
            .chain(self.promoted.get(base).into_iter().flatten())
            .filter(|d| !d.thread_local)
            .map(|d| d.value)
            .min()
            .map(Resolution::Address)
    }

    /// The address `dlsym(RTLD_DEFAULT, name)` gives: the first definition in the global
    /// scope, an IFUNC's selected implementation.
    pub fn in_libraries(name: &str) -> Option<usize> {
        let name = std::ffi::CString::new(name).ok()?;
        // SAFETY: dlsym only looks the name up (for an IFUNC it runs the library's resolver,
        // as the dynamic linker does for every caller); the result is used as a number.
        let address = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        (!address.is_null()).then_some(address as usize)
    }
}

/// Whether `name` is a Rust symbol name (legacy `_ZN…17h<hash>E` or v0 `_R…`).
fn is_rust_mangled(name: &str) -> bool {
    name.starts_with("_R")
        || (name.starts_with("_ZN") && name.contains("17h") && name.ends_with('E'))
}

impl Resolve for ProgramResolver {
    fn resolve(&self, wanted: &Wanted<'_>) -> std::result::Result<Resolution, String> {
        if let Some(found) = self.in_executable(wanted)? {
            return Ok(found);
        }
        if wanted.thread_local {
            return Err(
                "not a thread-local of the executable (thread-locals of shared libraries are \
                 not supported)"
                    .into(),
            );
        }
        ProgramResolver::in_libraries(wanted.name)
            .map(Resolution::Address)
            .ok_or_else(|| "not defined by the program nor by any loaded library".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition(value: usize, global: bool, file: Option<u32>, function: bool) -> Definition {
        Definition {
            value,
            thread_local: false,
            function,
            global,
            file,
        }
    }

    #[test]
    fn a_promoted_rust_function_binds_to_a_copy_under_its_other_name() {
        let f = "_ZN3foo3bar17h0123456789abcdefE";
        let mut r = resolver(&[(
            &format!("{f}.llvm.111"),
            definition(0x3000, false, Some(0), true),
        )]);
        r.promoted
            .insert(f.into(), vec![definition(0x3000, false, Some(0), true)]);
        r.by_name
            .insert(f.into(), vec![definition(0x2000, false, Some(1), true)]);
        let wanted = |name: &'static str| Wanted {
            name,
            thread_local: false,
            file: None,
        };
        let promoted_elsewhere: &'static str = Box::leak(format!("{f}.llvm.999").into_boxed_str());
        assert_eq!(
            r.in_executable(&wanted(promoted_elsewhere)),
            Ok(Some(Resolution::Address(0x2000)))
        );
        // Not Rust, or not a promotion: no guess.
        assert_eq!(r.in_executable(&wanted("counter.llvm.999")), Ok(None));
        assert_eq!(
            r.in_executable(&wanted("_ZN3foo3baz17h0123456789abcdefE")),
            Ok(None)
        );
    }

    fn resolver(entries: &[(&str, Definition)]) -> ProgramResolver {
        let mut by_name: HashMap<String, Vec<Definition>> = HashMap::new();
        for (name, d) in entries {
            by_name
                .entry((*name).to_owned())
                .or_default()
                .push(d.clone());
        }
        ProgramResolver {
            by_name,
            promoted: HashMap::new(),
            files: vec!["a.c".into(), "b.c".into()],
        }
    }

    fn find(
        r: &ProgramResolver,
        name: &str,
        file: Option<&str>,
    ) -> std::result::Result<Option<Resolution>, String> {
        r.in_executable(&Wanted {
            name,
            thread_local: false,
            file,
        })
    }

    #[test]
    fn duplicate_local_names_are_told_apart_by_the_patchs_file_or_refused() {
        let r = resolver(&[
            ("count", definition(0x10, false, Some(0), false)),
            ("count", definition(0x20, false, Some(1), false)),
            ("shadowed", definition(0x30, false, Some(0), false)),
            ("shadowed", definition(0x40, true, None, false)),
            (
                "_ZN4core3fmt5write17h0123456789abcdefE",
                definition(0x60, false, Some(0), true),
            ),
            (
                "_ZN4core3fmt5write17h0123456789abcdefE",
                definition(0x50, false, Some(1), true),
            ),
            ("c_helper", definition(0x70, false, Some(0), true)),
            ("c_helper", definition(0x80, false, Some(1), true)),
        ]);
        assert_eq!(
            find(&r, "count", Some("b.c")),
            Ok(Some(Resolution::Address(0x20)))
        );
        let ambiguous = find(&r, "count", Some("other.c")).unwrap_err();
        assert!(
            ambiguous.contains("local in a.c") && ambiguous.contains("local in b.c"),
            "{ambiguous}"
        );
        // A file's own static shadows the global; elsewhere the global wins.
        assert_eq!(
            find(&r, "shadowed", Some("a.c")),
            Ok(Some(Resolution::Address(0x30)))
        );
        assert_eq!(
            find(&r, "shadowed", None),
            Ok(Some(Resolution::Address(0x40)))
        );
        // Copies of one Rust function: any is that function; the patch's own file's first.
        let rust = "_ZN4core3fmt5write17h0123456789abcdefE";
        assert_eq!(
            find(&r, rust, Some("a.c")),
            Ok(Some(Resolution::Address(0x60)))
        );
        assert_eq!(find(&r, rust, None), Ok(Some(Resolution::Address(0x50))));
        // Two C functions of one name are two functions.
        assert!(find(&r, "c_helper", None)
            .unwrap_err()
            .contains("ambiguous"));
        assert_eq!(find(&r, "missing", None), Ok(None));
    }
}
