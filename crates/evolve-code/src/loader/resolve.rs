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
//! 4. otherwise the reference is refused, listing the candidates and their files.
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
    files: Vec<String>,
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
            let defined = shndx != elf::SHN_UNDEF && shndx != elf::SHN_ABS && shndx != elf::SHN_COMMON;
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
                    value: if thread_local { value } else { value.wrapping_add(bias) },
                    thread_local,
                    global,
                    file: if global { None } else { file },
                });
        }
        Ok(ProgramResolver { by_name, files })
    }

    /// Where the executable defines `wanted`: `Ok(None)` if it does not, an error if the
    /// definitions are ambiguous or of the wrong kind.
    pub fn in_executable(
        &self,
        wanted: &Wanted<'_>,
    ) -> std::result::Result<Option<Resolution>, String> {
        let Some(all) = self.by_name.get(wanted.name) else {
            return Ok(None);
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
            if in_file.len() == 1 {
                in_file
            } else if globals.len() == 1 {
                globals
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
            (true, false) => Err("the program's symbol is thread-local, the patch's use is not".into()),
            (false, true) => Err("the patch uses it as thread-local, the program's is not".into()),
        }
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
