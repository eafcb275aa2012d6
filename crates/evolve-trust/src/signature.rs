//! The signature of a patch, as it travels: `PATCH.sig` beside the file, or a rollout's spec.

use crate::{Digest, Error};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A signature over a patch's digest, with the key that made it.
///
/// Written as JSON: `{"format":1,"key_name":"ops","key":"<64 hex>","sha256":"<64 hex>",
/// "signature":"<128 hex>"}`. The key and digest are carried for the refusal messages ("signed
/// by dev, not trusted"); only the trusted key set decides what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureFile {
    /// 1.
    pub format: u32,
    /// The signer's key name.
    pub key_name: String,
    /// The signer's public key, hex.
    pub key: String,
    /// The digest signed.
    pub sha256: Digest,
    /// The ed25519 signature, hex.
    pub signature: String,
}

impl SignatureFile {
    /// Where the signature of `patch` lives: `PATCH.sig`.
    pub fn path_for(patch: &Path) -> PathBuf {
        let mut name = patch.as_os_str().to_owned();
        name.push(".sig");
        PathBuf::from(name)
    }

    /// Reads `PATCH.sig`; `Ok(None)` if there is none.
    pub fn read_for(patch: &Path) -> Result<Option<SignatureFile>, Error> {
        let path = SignatureFile::path_for(patch);
        match std::fs::read_to_string(&path) {
            Ok(text) => SignatureFile::parse(&text)
                .map(Some)
                .map_err(|e| Error::new(path.display().to_string(), e.reason)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::new(path.display().to_string(), e.to_string())),
        }
    }

    /// Parses the JSON form.
    pub fn parse(text: &str) -> Result<SignatureFile, Error> {
        let signature: SignatureFile = serde_json::from_str(text)
            .map_err(|e| Error::new("signature", format!("malformed: {e}")))?;
        if signature.format != 1 {
            return Err(Error::new(
                "signature",
                format!("format {} (this Evolve reads 1)", signature.format),
            ));
        }
        Ok(signature)
    }

    /// The JSON form.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("signatures serialize")
    }

    /// Writes `PATCH.sig`.
    pub fn write_for(&self, patch: &Path) -> Result<PathBuf, Error> {
        let path = SignatureFile::path_for(patch);
        std::fs::write(&path, self.to_json() + "\n")
            .map_err(|e| Error::new(path.display().to_string(), e.to_string()))?;
        Ok(path)
    }
}
