//! The manifest a patch carries: what it was built against and what it contains.
//!
//! It is a JSON document in the patch's exported, NUL-terminated symbol
//! [`MANIFEST_SYMBOL`], read from the file before the file is loaded.
//!
//! # The content digest
//!
//! The manifest sits inside the file it describes, so it cannot hash itself. Its `sha256` is
//! defined as the SHA-256 of **the whole patch file with the bytes of the
//! [`MANIFEST_SYMBOL`] symbol zeroed** (all of the symbol's bytes, as the file's symbol table
//! locates them, its terminating NUL included): [`content_digest`]. Every other byte — code,
//! data, program and section headers, symbol tables — is covered, so a patch damaged anywhere
//! outside its manifest is refused as corrupt before any other check looks at it; damage inside
//! the manifest either breaks its JSON (refused as corrupt) or changes what it claims (refused by
//! the check of that claim: build id, toolchain, …). The builder writes the manifest with a
//! placeholder digest of the same length, hashes the linked file, and writes the digest in.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::ops::Range;

/// The exported symbol holding the manifest.
pub const MANIFEST_SYMBOL: &str = "evolve_patch_manifest";

/// The manifest format this build reads and writes (2: with the content digest).
pub const FORMAT: u32 = 2;

/// What a patch declares about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version ([`FORMAT`]).
    pub format: u32,
    /// SHA-256 (hex) of the patch file with this manifest's bytes zeroed ([`content_digest`]).
    pub sha256: String,
    /// GNU build id (hex) of the binary the patch was built against.
    pub base_build_id: String,
    /// `rustc -V` of the toolchain that built it.
    pub toolchain: String,
    /// The crates whose code the patch carries.
    pub crates: Vec<String>,
    /// Hot functions implemented in the patch.
    pub functions: Vec<FunctionEntry>,
    /// Adaptors: old-signature entry points of functions whose signature changed.
    #[serde(default)]
    pub adaptors: Vec<FunctionEntry>,
    /// Statics of the patched crates whose size differs from the program's.
    #[serde(default)]
    pub changed_statics: Vec<ChangedStatic>,
    /// State-transfer functions (`#[evolve::transfer]`), by exported symbol.
    #[serde(default)]
    pub transfers: Vec<String>,
}

/// A static whose size differs between the program and the patch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedStatic {
    /// Its path (`crate::module::NAME`).
    pub symbol: String,
    /// Its symbol in the program.
    #[serde(default)]
    pub running_symbol: String,
    /// Its size in the program.
    pub running: u64,
    /// Its size in the patch.
    pub patch: u64,
}

/// A hot function in a patch, by id and signature fingerprint (16 hex digits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionEntry {
    /// The id shared with the host (`__evolve_stub_{id}`).
    pub id: String,
    /// The signature fingerprint, hex.
    pub fingerprint: String,
}

impl FunctionEntry {
    /// The fingerprint as a number, if it is well-formed.
    pub fn fingerprint_value(&self) -> Option<u64> {
        u64::from_str_radix(&self.fingerprint, 16).ok()
    }
}

impl ChangedStatic {
    /// The transfer symbol `#[evolve::transfer]` exports for this static, given its crate.
    pub fn transfer_symbol(&self, krate: &str) -> String {
        let name = self.symbol.rsplit("::").next().unwrap_or(&self.symbol);
        format!("__evolve_transfer_{krate}__{name}")
    }
}

/// The SHA-256 of `file` with the bytes at `manifest` taken as zeros (see the module docs).
///
/// # Example
///
/// ```
/// use evolve_hot::manifest::{content_digest, hex};
/// let file = b"code{\"m\":1}\0more";
/// // Whatever the manifest says, the digest is that of the file with the manifest zeroed.
/// let zeroed = b"code\0\0\0\0\0\0\0\0more";
/// assert_eq!(content_digest(file, 4..12), content_digest(zeroed, 4..12));
/// assert_ne!(content_digest(file, 4..12), content_digest(b"codf{\"m\":1}\0more", 4..12));
/// assert_eq!(hex(&content_digest(b"", 0..0)).len(), 64);
/// ```
pub fn content_digest(file: &[u8], manifest: Range<usize>) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(&file[..manifest.start]);
    let zeros = [0u8; 4096];
    let mut left = manifest.len();
    while left > 0 {
        let n = left.min(zeros.len());
        hasher.update(&zeros[..n]);
        left -= n;
    }
    hasher.update(&file[manifest.end..]);
    hasher.finalize().into()
}

/// Hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Format 2: a patch that is a relocatable object (`ET_REL`) loaded by Evolve's own loader, for
/// any function of the program (no `#[evolve::hot]` needed). Its manifest is the contents of the
/// non-allocated section [`OBJECT_MANIFEST_SECTION`] (UTF-8 JSON, no NUL needed).
pub const OBJECT_FORMAT: u32 = 2;

/// The section of a format-2 patch that holds its manifest.
pub const OBJECT_MANIFEST_SECTION: &str = ".evolve.manifest";

/// A format-2 patch defines the replacement of the program's function `F` (its mangled symbol)
/// as `__evolve_new__F`; every reference to `F` inside the patch stays a reference to the
/// program's `F`.
pub const NEW_PREFIX: &str = "__evolve_new__";

/// What a format-2 patch declares about itself.
///
/// `sha256` is the SHA-256 of the whole patch file with the bytes of the
/// [`OBJECT_MANIFEST_SECTION`] section's contents taken as zeros; the builder writes 64 zeros,
/// hashes, then writes the digest in place (the same length).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectManifest {
    /// [`OBJECT_FORMAT`].
    pub format: u32,
    /// GNU build id (hex) of the program the patch was built against.
    pub base_build_id: String,
    /// `rustc -V` of the toolchain that built it (the program's).
    pub toolchain: String,
    /// The crates whose functions the patch carries.
    pub crates: Vec<String>,
    /// See the type's docs.
    pub sha256: String,
    /// Functions of the program (or of applied patches) the patch replaces.
    pub replaced: Vec<Replaced>,
    /// Functions the program does not have, carried because the patch's code needs them.
    #[serde(default)]
    pub added: Vec<Added>,
    /// Prepared (`#[evolve::hot]`) functions implemented in the patch, as in format 1.
    #[serde(default)]
    pub functions: Vec<FunctionEntry>,
    /// Adaptors, as in format 1.
    #[serde(default)]
    pub adaptors: Vec<FunctionEntry>,
    /// State-transfer functions, as in format 1.
    #[serde(default)]
    pub transfers: Vec<String>,
    /// Statics whose size differs from the program's (apply needs a transfer function).
    #[serde(default)]
    pub changed_statics: Vec<ChangedStatic>,
    /// Statics the program does not have, defined by the patch.
    #[serde(default)]
    pub new_statics: Vec<NewStatic>,
    /// Unprepared async bodies that changed: a patch is never written with any (the builder
    /// refuses); kept for tools that read a dry run's manifest.
    #[serde(default)]
    pub async_refused: Vec<String>,
}

/// A function a format-2 patch replaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replaced {
    /// The program's symbol of the function (mangled). A local symbol may name several copies
    /// (an `#[inline]` function instantiated in several codegen units): all are replaced.
    pub symbol: String,
    /// Demangled, without hash.
    pub name: String,
    /// The patch's symbol of the replacement: [`NEW_PREFIX`] + `symbol`.
    pub patch_symbol: String,
    /// The version the builder compared against: apply refuses the patch if another runs.
    pub expected: Expected,
    /// Why it is carried: `changed`, `inlines <path>`, `needs <path>`, …
    pub reason: String,
}

/// The version of a function a patch was built against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expected {
    /// `program`, or the `sha256` of the applied patch whose version was current.
    pub version: String,
    /// SHA-256 (hex) of that version's bytes (for the program: of its lowest-addressed copy).
    pub code_sha256: String,
}

/// A function a format-2 patch adds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Added {
    /// Its symbol in the patch.
    pub patch_symbol: String,
    /// Demangled, without hash.
    pub name: String,
}

/// A static a format-2 patch defines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewStatic {
    /// Its symbol in the patch.
    pub symbol: String,
    /// Demangled, without hash.
    pub name: String,
}
