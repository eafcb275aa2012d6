//! The keys a process or node trusts, and why a patch is refused.

use crate::keys::PublicKey;
use crate::signature::SignatureFile;
use crate::{unhex, Digest, Error, DOMAIN};
use std::path::Path;

/// The environment variable naming a trusted-keys file or directory; when set, an agent accepts
/// only patches signed by one of those keys.
pub const TRUSTED_KEYS_ENV: &str = "EVOLVE_TRUSTED_KEYS";

/// A set of trusted public keys and where it came from.
#[derive(Debug, Clone)]
pub struct TrustedKeys {
    keys: Vec<PublicKey>,
    source: String,
}

/// Why a patch was refused: names the key and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// No signature came with it.
    Unsigned {
        /// The patch's digest.
        sha256: Digest,
        /// Where the trusted keys came from.
        source: String,
    },
    /// Signed by a key that is not trusted.
    UntrustedKey {
        /// The signer's key name, as the signature states it.
        key_name: String,
        /// Its id.
        key_id: String,
        /// The trusted keys (`name (id)`).
        trusted: Vec<String>,
    },
    /// Signed for other bytes: the file changed after it was signed.
    DigestMismatch {
        /// The signer's key name.
        key_name: String,
        /// The digest the signature covers.
        signed: Digest,
        /// The patch's digest.
        actual: Digest,
    },
    /// The signature does not verify with the key it names.
    BadSignature {
        /// The key name.
        key_name: String,
        /// Its id.
        key_id: String,
        /// The verifier's reason.
        reason: String,
    },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Unsigned { sha256, source } => write!(
                f,
                "patch sha256:{} is not signed, and only patches signed by a trusted key are \
                 accepted (trusted keys from {source})",
                sha256.short()
            ),
            Refusal::UntrustedKey {
                key_name,
                key_id,
                trusted,
            } => write!(
                f,
                "patch is signed by key {key_name} ({key_id}), which is not trusted (trusted: {})",
                if trusted.is_empty() {
                    "none".to_string()
                } else {
                    trusted.join(", ")
                }
            ),
            Refusal::DigestMismatch {
                key_name,
                signed,
                actual,
            } => write!(
                f,
                "the signature by key {key_name} covers sha256:{}, but the patch is sha256:{}: \
                 the file changed after it was signed",
                signed.short(),
                actual.short()
            ),
            Refusal::BadSignature {
                key_name,
                key_id,
                reason,
            } => write!(
                f,
                "the signature by key {key_name} ({key_id}) does not verify: {reason}"
            ),
        }
    }
}

impl std::error::Error for Refusal {}

impl TrustedKeys {
    /// A set of keys (tests, and keys carried in a configuration).
    pub fn from_keys(keys: Vec<PublicKey>) -> TrustedKeys {
        TrustedKeys {
            keys,
            source: "the given keys".into(),
        }
    }

    /// Reads a trusted-keys file (public key lines, `#` comments) or a directory of `*.pub`
    /// files. An empty set is an error: it would refuse everything.
    pub fn load(path: &Path) -> Result<TrustedKeys, Error> {
        let shown = path.display().to_string();
        let mut files = Vec::new();
        if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|e| Error::new(&shown, e.to_string()))?;
            for entry in entries.flatten() {
                if entry.path().extension().is_some_and(|e| e == "pub") {
                    files.push(entry.path());
                }
            }
            files.sort();
        } else {
            files.push(path.to_path_buf());
        }
        let mut keys = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| Error::new(file.display().to_string(), e.to_string()))?;
            for line in text.lines() {
                let line = line.split('#').next().unwrap_or_default().trim();
                if line.is_empty() {
                    continue;
                }
                keys.push(
                    PublicKey::parse_line(line)
                        .map_err(|e| Error::new(file.display().to_string(), e.reason))?,
                );
            }
        }
        if keys.is_empty() {
            return Err(Error::new(&shown, "no public keys in it"));
        }
        Ok(TrustedKeys {
            keys,
            source: shown,
        })
    }

    /// The set named by `EVOLVE_TRUSTED_KEYS`, if it is set.
    pub fn from_env() -> Result<Option<TrustedKeys>, Error> {
        match std::env::var_os(TRUSTED_KEYS_ENV) {
            Some(path) if !path.is_empty() => TrustedKeys::load(Path::new(&path)).map(Some),
            _ => Ok(None),
        }
    }

    /// The keys.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// Where they came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether `signature` is a valid signature of `digest` by a trusted key; the key if so.
    pub fn check(
        &self,
        digest: &Digest,
        signature: Option<&SignatureFile>,
    ) -> Result<&PublicKey, Refusal> {
        let Some(signature) = signature else {
            return Err(Refusal::Unsigned {
                sha256: *digest,
                source: self.source.clone(),
            });
        };
        let key_id = signature
            .key
            .get(..16)
            .unwrap_or(&signature.key)
            .to_string();
        let Some(key) = self.keys.iter().find(|k| k.to_hex() == signature.key) else {
            return Err(Refusal::UntrustedKey {
                key_name: signature.key_name.clone(),
                key_id,
                trusted: self
                    .keys
                    .iter()
                    .map(|k| format!("{} ({})", k.name, k.id()))
                    .collect(),
            });
        };
        if signature.sha256 != *digest {
            return Err(Refusal::DigestMismatch {
                key_name: key.name.clone(),
                signed: signature.sha256,
                actual: *digest,
            });
        }
        let bad = |reason: String| Refusal::BadSignature {
            key_name: key.name.clone(),
            key_id: key.id(),
            reason,
        };
        let bytes = unhex(&signature.signature)
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .ok_or_else(|| bad("the signature is not 128 hex digits".into()))?;
        let mut message = DOMAIN.to_vec();
        message.extend_from_slice(&digest.0);
        key.verifying()
            .verify_strict(&message, &ed25519_dalek::Signature::from_bytes(&bytes))
            .map_err(|e| bad(e.to_string()))?;
        Ok(key)
    }

    /// Checks the file at `patch` against its `PATCH.sig`.
    pub fn check_file(&self, patch: &Path) -> Result<(Digest, &PublicKey), CheckFileError> {
        let digest = Digest::of_file(patch).map_err(CheckFileError::Io)?;
        let signature = SignatureFile::read_for(patch).map_err(CheckFileError::Io)?;
        let key = self
            .check(&digest, signature.as_ref())
            .map_err(CheckFileError::Refused)?;
        Ok((digest, key))
    }
}

/// Why [`TrustedKeys::check_file`] failed.
#[derive(Debug)]
pub enum CheckFileError {
    /// The patch or its signature could not be read.
    Io(Error),
    /// The patch was refused.
    Refused(Refusal),
}

impl std::fmt::Display for CheckFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckFileError::Io(e) => write!(f, "{e}"),
            CheckFileError::Refused(r) => write!(f, "{r}"),
        }
    }
}

impl std::error::Error for CheckFileError {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SecretKey;

    #[test]
    fn every_refusal_names_its_key_and_reason() {
        let dir = tempfile::tempdir().unwrap();
        let ops = SecretKey::generate("ops").unwrap();
        let dev = SecretKey::generate("dev").unwrap();
        ops.save(dir.path()).unwrap();
        let trusted = TrustedKeys::load(&dir.path().join("ops.pub")).unwrap();
        let patch = dir.path().join("fix.so");
        std::fs::write(&patch, b"patch bytes").unwrap();

        let unsigned = trusted.check_file(&patch).unwrap_err().to_string();
        assert!(unsigned.contains("not signed"), "{unsigned}");

        dev.sign(&Digest::of_file(&patch).unwrap())
            .write_for(&patch)
            .unwrap();
        let untrusted = trusted.check_file(&patch).unwrap_err().to_string();
        assert!(untrusted.contains("key dev") && untrusted.contains("not trusted"));
        assert!(untrusted.contains(&format!("ops ({})", ops.public().id())));

        ops.sign(&Digest::of_file(&patch).unwrap())
            .write_for(&patch)
            .unwrap();
        let (_, key) = trusted.check_file(&patch).unwrap();
        assert_eq!(key.name, "ops");

        std::fs::write(&patch, b"patch bytes, changed").unwrap();
        let changed = trusted.check_file(&patch).unwrap_err().to_string();
        assert!(changed.contains("changed after it was signed"), "{changed}");

        // A forged signature: right key and digest, wrong bytes.
        let mut forged = ops.sign(&Digest::of_file(&patch).unwrap());
        forged.signature = "00".repeat(64);
        forged.write_for(&patch).unwrap();
        let bad = trusted.check_file(&patch).unwrap_err().to_string();
        assert!(
            bad.contains("does not verify") && bad.contains("ops"),
            "{bad}"
        );
    }

    #[test]
    fn keys_round_trip_through_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate("release").unwrap();
        let (secret, public) = key.save(dir.path()).unwrap();
        let mode = std::fs::metadata(&secret).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
        assert!(
            key.save(dir.path()).is_err(),
            "an existing key is not overwritten"
        );
        let loaded = SecretKey::load(&secret).unwrap();
        assert_eq!(loaded.public(), key.public());
        assert!(SecretKey::load(&public)
            .unwrap_err()
            .to_string()
            .contains("public key"));
        assert!(TrustedKeys::load(dir.path()).unwrap().keys().len() == 1);
        assert!(SecretKey::generate("two words").is_err());
    }
}
