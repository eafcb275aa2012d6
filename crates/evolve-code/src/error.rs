//! The engine's error type: what went wrong, with the addresses and bytes involved.

use crate::site::SiteInsn;
use std::fmt;

/// An error from the code engine.
///
/// Every error names its cause and carries the addresses, bytes or OS error involved, so that a
/// refused change can be explained to an operator without a debugger. An operation that returns
/// an error has changed nothing (see each operation's documentation for the exact guarantee).
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
}

/// The cause of an [`Error`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The address was never registered as a patch site.
    UnknownSite {
        /// The address given.
        address: usize,
    },
    /// The bytes at the address are not one of the 5-byte instructions a site may hold
    /// (`jmp rel32`, `call rel32`, 5-byte NOP).
    NotASiteInstruction {
        /// The address given.
        address: usize,
        /// The bytes found there.
        found: [u8; 5],
    },
    /// The address does not lie in an executable mapping of this process.
    NotExecutable {
        /// The address given.
        address: usize,
    },
    /// The bytes at a site are not what the engine last wrote there: something else modified the
    /// code behind the engine's back.
    UnexpectedBytes {
        /// The site's address.
        address: usize,
        /// The bytes the caller expected.
        expected: [u8; 5],
        /// The bytes actually found.
        found: [u8; 5],
    },
    /// The site does not hold the instruction the caller expected (someone else retargeted it,
    /// or the caller's view is stale).
    UnexpectedInstruction {
        /// The site's address.
        address: usize,
        /// What the caller expected.
        expected: SiteInsn,
        /// What the site holds.
        found: SiteInsn,
    },
    /// The target cannot be reached from the site, not even through a springboard (no near
    /// memory could be reserved within ±2 GiB).
    Unreachable {
        /// The site's address.
        site: usize,
        /// The target asked for.
        target: usize,
    },
    /// A branch target is not in executable memory (null, data, unmapped).
    TargetNotExecutable {
        /// The site's address.
        site: usize,
        /// The target asked for.
        target: usize,
    },
    /// A stub was asked to jump to code compiled for another signature.
    FingerprintMismatch {
        /// The stub's address.
        stub: usize,
        /// The stub's signature fingerprint.
        expected: u64,
        /// The fingerprint of the code offered.
        found: u64,
    },
    /// The same site appears twice in one batch.
    DuplicateSite {
        /// The site's address.
        address: usize,
    },
    /// No memory could be reserved within ±2 GiB of the address.
    NoNearMemory {
        /// The address the memory had to be near.
        near: usize,
        /// The size asked for.
        size: usize,
    },
    /// A system call failed.
    Os {
        /// What the engine was doing.
        operation: &'static str,
        /// The OS error number.
        errno: i32,
    },
    /// The kernel lacks a facility the engine needs, and there is no safe fallback.
    Unsupported {
        /// What is missing, and why it is needed.
        what: &'static str,
    },
    /// Loading a shared object would run code before it could be verified (an initializer, an
    /// IFUNC resolver, a library not loaded yet), so it is not loaded.
    UnsafeObject {
        /// The file.
        path: String,
        /// What loading it would run.
        reason: String,
    },
    /// An ELF image of the process could not be read or parsed.
    Image {
        /// The file involved.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A function's prologue cannot be relocated into a trampoline, so no entry detour can be
    /// placed on it (too short, a branch into the overwritten bytes, an unsupported instruction).
    Unrelocatable {
        /// The function's address.
        function: usize,
        /// Why, naming the instruction involved.
        reason: String,
    },
    /// Stopping the world failed: these threads did not park within the time allowed (they
    /// block the stop signal, or are stuck in the kernel). Nothing was done; every thread runs.
    ThreadsDidNotStop {
        /// The threads, each with what is known of why (e.g. "1234 (blocks the stop signal)").
        threads: Vec<String>,
        /// How long the engine waited, in milliseconds.
        waited_ms: u64,
    },
    /// A patch object was refused by the loader (see `crate::loader`): nothing of it was mapped.
    PatchRefused {
        /// The patch file.
        path: String,
        /// Why, naming the section, symbol and relocation type involved.
        reason: String,
    },
    /// A function's entry cannot be redirected to another version (see `crate::redirect`):
    /// too short, a branch into the bytes the `jmp` replaces, a probe on it, an alias, …
    NotRedirectable {
        /// The function's symbol (demangled).
        function: String,
        /// Its address.
        address: usize,
        /// Why, naming the instruction, offset or symbol involved.
        reason: String,
    },
    /// A thread kept a place it resumes at inside the bytes an entry redirect replaces, through
    /// every attempt: the redirect was refused and every entry of the batch left as it was.
    ThreadInside {
        /// The function's symbol (demangled).
        function: String,
        /// Its address.
        address: usize,
        /// The thread.
        tid: i32,
        /// Where it resumes.
        pc: usize,
        /// How many times the world was stopped to try.
        attempts: usize,
    },
    /// A data slot (a GOT entry of the executable) does not hold what a batch expected: it was
    /// changed behind the batch's back, or the caller's view is stale.
    UnexpectedSlot {
        /// The slot's address.
        slot: usize,
        /// The value expected.
        expected: usize,
        /// The value found.
        found: usize,
    },
    /// A function handed to [`crate::PaddedFunction::prepare`] does not have the entry padding
    /// of `patchable_function_entry(7, 5)` (see [`crate::padded`]), or it is in a state the
    /// engine did not leave it in.
    NotPadded {
        /// The function's entry.
        function: usize,
        /// The bytes from five before the entry (the slot) to the end of the gate.
        found: Vec<u8>,
        /// What is wrong.
        reason: String,
    },
    /// Code was offered to a padded function, or a padded function was prepared again, with
    /// another signature identity (see [`crate::ForeignCode`]).
    SignatureMismatch {
        /// The padded function's entry.
        function: usize,
        /// Its signature identity.
        expected: u64,
        /// The identity of the code offered.
        found: u64,
    },
    /// An argument was invalid.
    InvalidArgument {
        /// What was wrong with it.
        reason: String,
    },
    /// A write failed part-way and the engine could not put everything back, because the kernel
    /// kept refusing the calls that undo it: the reason names the pages left writable or the
    /// sites left to the trap handler (which keeps running their old instruction).
    Incomplete {
        /// What was left, and the system call that kept failing.
        reason: String,
    },
}

impl Error {
    /// Creates an error of the given kind.
    pub fn new(kind: ErrorKind) -> Error {
        Error { kind }
    }

    /// The cause of this error.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// An [`ErrorKind::Os`] error from the current `errno`.
    pub(crate) fn last_os(operation: &'static str) -> Error {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        Error::new(ErrorKind::Os { operation, errno })
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Error {
        Error::new(kind)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ErrorKind::UnknownSite { address } => {
                write!(f, "{address:#x} is not a registered patch site")
            }
            ErrorKind::NotASiteInstruction { address, found } => write!(
                f,
                "{address:#x} holds [{}], which is not a 5-byte jmp rel32, call rel32 or NOP",
                hex(found)
            ),
            ErrorKind::NotExecutable { address } => {
                write!(f, "{address:#x} is not in an executable mapping of this process")
            }
            ErrorKind::UnexpectedBytes {
                address,
                expected,
                found,
            } => write!(
                f,
                "patch site {address:#x} holds [{}], but the engine left [{}] there: the code was \
                 modified behind the engine's back; nothing was changed",
                hex(found),
                hex(expected)
            ),
            ErrorKind::UnexpectedInstruction {
                address,
                expected,
                found,
            } => write!(
                f,
                "patch site {address:#x} holds `{found}`, expected `{expected}`; nothing was changed"
            ),
            ErrorKind::Unreachable { site, target } => write!(
                f,
                "target {target:#x} is out of rel32 range of site {site:#x} and no springboard \
                 could be placed near the site"
            ),
            ErrorKind::TargetNotExecutable { site, target } => write!(
                f,
                "cannot point patch site {site:#x} at {target:#x}: the target is not in \
                 executable memory; nothing was changed"
            ),
            ErrorKind::FingerprintMismatch {
                stub,
                expected,
                found,
            } => write!(
                f,
                "stub {stub:#x} has signature fingerprint {expected:016x}, the code offered has \
                 {found:016x}: the signatures differ"
            ),
            ErrorKind::DuplicateSite { address } => {
                write!(f, "patch site {address:#x} appears twice in one batch")
            }
            ErrorKind::NoNearMemory { near, size } => write!(
                f,
                "no free address range of {size} bytes within ±2 GiB of {near:#x}"
            ),
            ErrorKind::Os { operation, errno } => write!(
                f,
                "{operation} failed: {}",
                std::io::Error::from_raw_os_error(*errno)
            ),
            ErrorKind::Unsupported { what } => write!(f, "unsupported: {what}"),
            ErrorKind::Incomplete { reason } => write!(f, "write left incomplete: {reason}"),
            ErrorKind::Image { path, reason } => write!(f, "cannot read image {path}: {reason}"),
            ErrorKind::ThreadsDidNotStop { threads, waited_ms } => write!(
                f,
                "could not stop the world: thread(s) {} did not park within {waited_ms} ms; \
                 nothing was done",
                threads.join(", ")
            ),
            ErrorKind::UnsafeObject { path, reason } => {
                write!(f, "refusing to load {path}: {reason}; nothing was loaded")
            }
            ErrorKind::InvalidArgument { reason } => write!(f, "invalid argument: {reason}"),
            ErrorKind::PatchRefused { path, reason } => {
                write!(f, "patch {path} refused: {reason}; nothing was loaded")
            }
            ErrorKind::NotRedirectable {
                function,
                address,
                reason,
            } => write!(
                f,
                "cannot redirect `{function}` ({address:#x}): {reason}; nothing was changed"
            ),
            ErrorKind::ThreadInside {
                function,
                address,
                tid,
                pc,
                attempts,
            } => write!(
                f,
                "cannot redirect `{function}` ({address:#x}): thread {tid} resumes at {pc:#x} \
                 (offset {}), inside the bytes the jmp replaces, through {attempts} stops of the \
                 world; nothing was changed",
                pc.wrapping_sub(*address)
            ),
            ErrorKind::UnexpectedSlot {
                slot,
                expected,
                found,
            } => write!(
                f,
                "slot {slot:#x} holds {found:#x}, expected {expected:#x}: it changed behind the \
                 batch's back; nothing was changed"
            ),
            ErrorKind::NotPadded {
                function,
                found,
                reason,
            } => write!(
                f,
                "the function at {function:#x} cannot be redirected through its entry padding: \
                 {reason} (found [{}] from 5 bytes before the entry); nothing was changed",
                hex(found)
            ),
            ErrorKind::SignatureMismatch {
                function,
                expected,
                found,
            } => write!(
                f,
                "the code offered to the padded function at {function:#x} was declared for \
                 another C signature (identity {found:#x}, the function's is {expected:#x}); \
                 nothing was changed"
            ),
            ErrorKind::Unrelocatable { function, reason } => write!(
                f,
                "cannot detour the function at {function:#x}: {reason}; nothing was changed"
            ),
        }
    }
}

impl std::error::Error for Error {}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unexpected_bytes_message_names_address_and_both_byte_strings() {
        let e = Error::new(ErrorKind::UnexpectedBytes {
            address: 0x1000,
            expected: [0xe9, 1, 2, 3, 4],
            found: [0xe8, 0, 0, 0, 0],
        });
        let msg = e.to_string();
        assert!(msg.contains("0x1000"), "{msg}");
        assert!(msg.contains("e9 01 02 03 04"), "{msg}");
        assert!(msg.contains("e8 00 00 00 00"), "{msg}");
    }
}
