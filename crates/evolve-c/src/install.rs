//! Installing the C library into a prefix: `PREFIX/include/evolve.h`,
//! `PREFIX/lib/libevolve.so.0` (with `libevolve.so` pointing at it) and
//! `PREFIX/lib/pkgconfig/evolve.pc`, so that
//! `cc $(pkg-config --cflags --libs evolve) prog.c` builds a program against it.
//!
//! # Example
//!
//! ```no_run
//! let prefix = std::path::Path::new("/tmp/evolve-prefix");
//! let installed = evolve_c::install::install(prefix, &evolve_c::install::built_library()?)?;
//! println!("PKG_CONFIG_PATH={}", installed.pkgconfig_dir.display());
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io;
use std::path::{Path, PathBuf};

/// The header, as installed.
pub const HEADER: &str = include_str!("../include/evolve.h");

/// The file name cargo gives the shared library.
pub const BUILT_NAME: &str = "libevolve_c.so";

/// The shared library's soname (the name programs record).
pub const SONAME: &str = "libevolve.so.0";

/// What [`install`] wrote.
#[derive(Debug, Clone)]
pub struct Installed {
    /// `PREFIX/include/evolve.h`.
    pub header: PathBuf,
    /// `PREFIX/lib/libevolve.so.0`.
    pub library: PathBuf,
    /// `PREFIX/lib/pkgconfig` (for `PKG_CONFIG_PATH`).
    pub pkgconfig_dir: PathBuf,
}

/// The shared library cargo built next to the running executable: the installer's own
/// directory (`target/<profile>/`), or its parent for a test or benchmark binary
/// (`target/<profile>/deps/`).
///
/// # Errors
/// [`io::ErrorKind::NotFound`] naming the places looked at and the command that builds it.
pub fn built_library() -> io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut looked = Vec::new();
    for dir in exe.ancestors().skip(1).take(2) {
        for candidate in [dir.join(BUILT_NAME), dir.join("deps").join(BUILT_NAME)] {
            if candidate.is_file() {
                return Ok(candidate);
            }
            looked.push(candidate.display().to_string());
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "{BUILT_NAME} not found (looked at {}); build it with `cargo build -p evolve-c` in \
             the same profile",
            looked.join(", ")
        ),
    ))
}

/// The pkg-config file for a library installed in `prefix`. `Libs` links libevolve even under
/// `--as-needed` when it comes before the program's objects (`cc $(pkg-config ...) prog.c`),
/// and records the library directory as the run path, so that a program built against a
/// private prefix runs without `LD_LIBRARY_PATH`.
pub fn pkg_config(prefix: &Path) -> String {
    format!(
        "prefix={}\n\
         exec_prefix=${{prefix}}\n\
         libdir=${{exec_prefix}}/lib\n\
         includedir=${{prefix}}/include\n\
         \n\
         Name: evolve\n\
         Description: Evolve for C programs: hot functions, multiverse, the agent\n\
         Version: {}\n\
         Libs: -L${{libdir}} -Wl,-rpath,${{libdir}} -Wl,--push-state,--no-as-needed -levolve \
         -Wl,--pop-state\n\
         Cflags: -I${{includedir}}\n",
        prefix.display(),
        env!("CARGO_PKG_VERSION")
    )
}

/// Installs the header, the shared library `library` and the pkg-config file into `prefix`
/// (made absolute; directories created as needed; existing files replaced).
///
/// # Errors
/// The I/O error of the step that failed, naming the file.
pub fn install(prefix: &Path, library: &Path) -> io::Result<Installed> {
    let prefix = std::path::absolute(prefix)?;
    let named =
        |path: &Path, e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let include = prefix.join("include");
    let lib = prefix.join("lib");
    let pkgconfig_dir = lib.join("pkgconfig");
    for dir in [&include, &lib, &pkgconfig_dir] {
        std::fs::create_dir_all(dir).map_err(|e| named(dir, e))?;
    }
    let header = include.join("evolve.h");
    std::fs::write(&header, HEADER).map_err(|e| named(&header, e))?;
    // Write to a new file and rename: a running program keeps the library it mapped.
    let installed = lib.join(SONAME);
    let staging = lib.join(format!(".{SONAME}.new"));
    std::fs::copy(library, &staging).map_err(|e| named(library, e))?;
    std::fs::rename(&staging, &installed).map_err(|e| named(&installed, e))?;
    let link = lib.join("libevolve.so");
    match std::fs::remove_file(&link) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(named(&link, e)),
        _ => {}
    }
    std::os::unix::fs::symlink(SONAME, &link).map_err(|e| named(&link, e))?;
    let pc = pkgconfig_dir.join("evolve.pc");
    std::fs::write(&pc, pkg_config(&prefix)).map_err(|e| named(&pc, e))?;
    Ok(Installed {
        header,
        library: installed,
        pkgconfig_dir,
    })
}
