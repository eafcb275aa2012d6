//! The agent's trusted keys: when `EVOLVE_TRUSTED_KEYS` is set (a file of public keys or a
//! directory of `*.pub`), `apply` accepts only patches whose `PATCH.sig` is a valid signature by
//! one of them, and refuses the others naming the key and the reason. A setting that cannot be
//! read refuses every patch (failing open would defeat it).

use evolve_trust::TrustedKeys;
use std::path::Path;
use std::sync::OnceLock;

static TRUSTED: OnceLock<Result<Option<TrustedKeys>, String>> = OnceLock::new();

/// Reads the setting (once, when the agent starts).
pub fn load() {
    TRUSTED.get_or_init(|| TrustedKeys::from_env().map_err(|e| e.to_string()));
}

/// Whether the patch at `path` may be applied; the refusal's text if not.
pub fn check(path: &Path) -> Result<(), String> {
    load();
    match TRUSTED.get().expect("loaded") {
        Ok(None) => Ok(()),
        Err(e) => Err(format!(
            "patch refused: the trusted keys ({}) cannot be read: {e}",
            evolve_trust::TRUSTED_KEYS_ENV
        )),
        Ok(Some(trusted)) => trusted
            .check_file(path)
            .map(|_| ())
            .map_err(|e| format!("patch {} refused: {e}", path.display())),
    }
}
