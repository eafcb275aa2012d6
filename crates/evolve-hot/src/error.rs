//! Hot-update errors: each names its cause; a refused patch changed nothing.

use std::fmt;

/// An error from applying, reverting or building a patch.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
}

/// The cause of an [`Error`].
#[derive(Debug)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The file is not an Evolve patch (not ELF, or no manifest in it).
    NotAPatch {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The file claims to be a patch but its manifest cannot be read.
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The patch was built against another binary.
    WrongBase {
        /// The build id the patch expects.
        expected: String,
        /// The running program's build id.
        running: String,
    },
    /// The patch was built with another toolchain.
    WrongToolchain {
        /// The patch's toolchain.
        patch: String,
        /// The running program's toolchain.
        running: String,
    },
    /// A hot function changed its signature and the patch ships no adaptor for the old one.
    SignatureChanged {
        /// The function.
        function: String,
        /// Its signature fingerprint in the running program.
        running: String,
        /// In the patch.
        patch: String,
    },
    /// A static of a patched crate changed its size and the patch ships no transfer function.
    StaticLayoutChanged {
        /// The static's symbol.
        symbol: String,
        /// Its size in the running program.
        running: u64,
        /// In the patch.
        patch: u64,
    },
    /// Symbols the patch needs are not in the running program.
    Unresolved {
        /// The file.
        path: String,
        /// The symbols (or the loader's message).
        symbols: Vec<String>,
    },
    /// No applied patch has that name.
    NoSuchPatch {
        /// The name given.
        name: String,
    },
    /// No hot function has that name.
    NoSuchFunction {
        /// The name given.
        name: String,
    },
    /// The function has no such earlier version.
    NoSuchVersion {
        /// The function.
        function: String,
        /// The version asked for.
        version: usize,
    },
    /// Building a patch failed.
    Build {
        /// The step that failed.
        step: String,
        /// Its output.
        detail: String,
    },
    /// Threads did not reach a safe point in time.
    SafePointTimeout {
        /// Milliseconds waited.
        waited_ms: u64,
        /// The threads that did not arrive, and where they were.
        blockers: Vec<String>,
    },
    /// An in-process canary could not start or end.
    Canary {
        /// Why.
        reason: String,
    },
    /// A format-2 patch was built against another version of a function than the one running
    /// (for instance a patch in between was reverted, or another was applied since).
    StaleVersion {
        /// The function.
        function: String,
        /// The version the patch was built against (`program`, or a patch's SHA-256).
        expected: String,
        /// The version running now, said the same way.
        running: String,
    },
    /// A format-2 patch asks for something this Evolve does not do with such patches yet.
    Unsupported {
        /// The file.
        path: String,
        /// What, and what to do instead.
        what: String,
    },
    /// The engine refused a change.
    Engine(evolve_code::Error),
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
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Error {
        Error { kind }
    }
}

impl From<evolve_code::Error> for Error {
    fn from(e: evolve_code::Error) -> Error {
        Error::new(ErrorKind::Engine(e))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ErrorKind::NotAPatch { path, reason } => {
                write!(f, "{path} is not an Evolve patch: {reason}")
            }
            ErrorKind::Corrupt { path, reason } => {
                write!(f, "patch {path} is corrupt: {reason}")
            }
            ErrorKind::WrongBase { expected, running } => write!(
                f,
                "patch was built for binary {expected}, but this process runs {running}"
            ),
            ErrorKind::WrongToolchain { patch, running } => write!(
                f,
                "patch was built with `{patch}`, but this process was built with `{running}`"
            ),
            ErrorKind::SignatureChanged {
                function,
                running,
                patch,
            } => write!(
                f,
                "hot function {function} changed its signature (fingerprint {running} -> \
                 {patch}) and the patch has no adaptor for the old one"
            ),
            ErrorKind::StaticLayoutChanged {
                symbol,
                running,
                patch,
            } => write!(
                f,
                "static {symbol} changed its type or layout ({running} -> {patch} bytes) and the \
                 patch has no transfer function for it"
            ),
            ErrorKind::Unresolved { path, symbols } => write!(
                f,
                "patch {path} needs symbols the running program does not have: {}",
                symbols.join(", ")
            ),
            ErrorKind::NoSuchPatch { name } => write!(f, "no applied patch named {name}"),
            ErrorKind::NoSuchFunction { name } => write!(f, "no hot function named {name}"),
            ErrorKind::NoSuchVersion { function, version } => {
                write!(f, "hot function {function} has no version {version}")
            }
            ErrorKind::Build { step, detail } => {
                write!(f, "building the patch failed at {step}: {detail}")
            }
            ErrorKind::SafePointTimeout {
                waited_ms,
                blockers,
            } => write!(
                f,
                "threads did not reach a safe point within {waited_ms} ms: {}",
                blockers.join("; ")
            ),
            ErrorKind::Canary { reason } => write!(f, "canary: {reason}"),
            ErrorKind::StaleVersion {
                function,
                expected,
                running,
            } => write!(
                f,
                "the patch replaces {function} as of version {expected}, but version {running} \
                 runs now: rebuild the patch against the running versions"
            ),
            ErrorKind::Unsupported { path, what } => {
                write!(f, "patch {path} is refused: {what}")
            }
            ErrorKind::Engine(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

/// Hot update's result type.
pub type Result<T> = std::result::Result<T, Error>;
