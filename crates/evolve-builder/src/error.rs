//! The builder's errors: each names its cause; a refused build writes nothing.

use std::fmt;

/// An error from building a patch (format 2).
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
}

/// The cause of an [`Error`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A file could not be read or written.
    Io {
        /// The file.
        path: String,
        /// The system's message.
        reason: String,
    },
    /// A binary or object is not what the builder can read.
    Object {
        /// The file (or `file(member)` of an archive).
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The program's build could not be found or read (target directory, cargo unit,
    /// fingerprint).
    Discovery {
        /// What was looked for and where.
        detail: String,
    },
    /// The builder's toolchain is not the one that built the program.
    Toolchain {
        /// The program's (from its `.comment` section).
        program: String,
        /// `rustc -V` where the workspace builds.
        builder: String,
    },
    /// The program was built with link-time optimisation, which the builder refuses.
    Lto {
        /// The cargo profile.
        profile: String,
        /// The flag rustc was given (`-C lto=fat`, `-C linker-plugin-lto`…).
        flag: String,
    },
    /// The reproduced build is not the program's: another configuration.
    Configuration {
        /// What differs: `features`, `profile`, `flags`, `toolchain`, `target`, `dependencies`.
        cause: String,
        /// The details: both values, and what to do.
        detail: String,
    },
    /// The reproduced code differs from the running code where no edit explains it.
    NotReproducible {
        /// How many functions differ, which, and why that is not an edit.
        detail: String,
    },
    /// The compiler failed — cargo, rustc, or a C unit's gcc (the edited source does not
    /// compile, …).
    Cargo {
        /// The command.
        command: String,
        /// Its diagnostics (the last lines).
        output: String,
    },
    /// Changed bodies of unprepared `async fn`s: futures in flight would resume in code compiled
    /// for another state layout.
    AsyncBodyChanged {
        /// The async functions (demangled paths) whose bodies changed.
        functions: Vec<String>,
    },
    /// The patch would define thread-locals, which the loader cannot create in a live process.
    NewThreadLocal {
        /// Their symbols.
        symbols: Vec<String>,
    },
    /// The patch's code needs something the builder cannot express for the loader.
    Unsupported {
        /// The function concerned.
        function: String,
        /// What it needs.
        what: String,
    },
    /// Nothing differs from the running code: there is nothing to patch.
    NothingChanged {
        /// How many functions were compared.
        compared: usize,
    },
}

impl Error {
    /// An error of the given kind.
    pub fn new(kind: ErrorKind) -> Error {
        Error { kind }
    }

    /// The cause.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    pub(crate) fn io(path: &std::path::Path, error: impl fmt::Display) -> Error {
        Error::new(ErrorKind::Io {
            path: path.display().to_string(),
            reason: error.to_string(),
        })
    }

    pub(crate) fn object(path: impl fmt::Display, reason: impl fmt::Display) -> Error {
        Error::new(ErrorKind::Object {
            path: path.to_string(),
            reason: reason.to_string(),
        })
    }

    pub(crate) fn discovery(detail: impl Into<String>) -> Error {
        Error::new(ErrorKind::Discovery {
            detail: detail.into(),
        })
    }

    pub(crate) fn configuration(cause: &str, detail: impl Into<String>) -> Error {
        Error::new(ErrorKind::Configuration {
            cause: cause.to_string(),
            detail: detail.into(),
        })
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Error {
        Error { kind }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ErrorKind::Io { path, reason } => write!(f, "{path}: {reason}"),
            ErrorKind::Object { path, reason } => write!(f, "cannot read {path}: {reason}"),
            ErrorKind::Discovery { detail } => {
                write!(f, "cannot find how the program was built: {detail}")
            }
            ErrorKind::Toolchain { program, builder } => write!(
                f,
                "the program was built by `{program}`, but this workspace builds with \
                 `{builder}`: a patch must be compiled by the program's toolchain (select it \
                 with rustup, e.g. a rust-toolchain.toml)"
            ),
            ErrorKind::Lto { profile, flag } => write!(
                f,
                "the program was built with link-time optimisation (profile `{profile}`: \
                 `{flag}`): LTO inlines and merges code across crates, so the running code \
                 cannot be matched function by function with a rebuild. Build the program \
                 without LTO (`lto = false` in [profile.{profile}]) to patch it"
            ),
            ErrorKind::Configuration { cause, detail } => write!(
                f,
                "the reproduced build is not the running program's ({cause} differ): {detail}"
            ),
            ErrorKind::NotReproducible { detail } => write!(
                f,
                "the rebuild does not reproduce the running code: {detail}"
            ),
            ErrorKind::Cargo { command, output } => write!(f, "`{command}` failed:\n{output}"),
            ErrorKind::AsyncBodyChanged { functions } => write!(
                f,
                "the body of unprepared async fn {} changed: a future already in flight would \
                 resume in code compiled for another state layout. Mark it \
                 `#[evolve::hot] async fn` (its futures then keep the version they started \
                 with) and rebuild the program, or leave its body unchanged",
                functions.join(", ")
            ),
            ErrorKind::NewThreadLocal { symbols } => write!(
                f,
                "the patch would define new thread-locals ({}): threads already running have no \
                 storage for them; keep them in the program, or use a static",
                symbols.join(", ")
            ),
            ErrorKind::Unsupported { function, what } => {
                write!(f, "{function} cannot be patched: {what}")
            }
            ErrorKind::NothingChanged { compared } => write!(
                f,
                "nothing to patch: the {compared} functions compiled from the edited source are \
                 identical to the running code"
            ),
        }
    }
}

impl std::error::Error for Error {}

/// The builder's result type.
pub type Result<T> = std::result::Result<T, Error>;
