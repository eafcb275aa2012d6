//! The manifest a patch carries: what it was built against and what it contains.
//!
//! It is a JSON document in the patch's exported, NUL-terminated symbol
//! [`MANIFEST_SYMBOL`], read from the file before the file is loaded.

use serde::{Deserialize, Serialize};

/// The exported symbol holding the manifest.
pub const MANIFEST_SYMBOL: &str = "evolve_patch_manifest";

/// The manifest format this build reads and writes.
pub const FORMAT: u32 = 1;

/// What a patch declares about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version ([`FORMAT`]).
    pub format: u32,
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

/// Hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
