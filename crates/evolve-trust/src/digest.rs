//! Content addresses: the SHA-256 of a patch's bytes.

use crate::{hex, unhex, Error};
use sha2::{Digest as _, Sha256};
use std::io::Read;
use std::path::Path;

/// The SHA-256 of some bytes; shown and parsed as 64 hex digits.
///
/// ```
/// let d = evolve_trust::Digest::of(b"abc");
/// assert!(d.to_string().starts_with("ba7816bf"));
/// assert_eq!(d.to_string().parse::<evolve_trust::Digest>().unwrap(), d);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    /// The digest of a file's contents, read in chunks.
    pub fn of_file(path: &Path) -> Result<Digest, Error> {
        let shown = path.display().to_string();
        let mut file = std::fs::File::open(path).map_err(|e| Error::new(&shown, e.to_string()))?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 64 << 10];
        loop {
            let n = file
                .read(&mut buffer)
                .map_err(|e| Error::new(&shown, e.to_string()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
        Ok(Digest(hasher.finalize().into()))
    }

    /// The first 12 hex digits, for display.
    pub fn short(&self) -> String {
        hex(&self.0[..6])
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", hex(&self.0))
    }
}

impl std::str::FromStr for Digest {
    type Err = Error;

    fn from_str(text: &str) -> Result<Digest, Error> {
        let text = text.strip_prefix("sha256:").unwrap_or(text);
        let bytes = unhex(text)
            .filter(|b| b.len() == 32)
            .ok_or_else(|| Error::new(text, "not a SHA-256 digest (64 hex digits)"))?;
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&bytes);
        Ok(Digest(digest))
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_and_its_bytes_have_one_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(Digest::of_file(&path).unwrap(), Digest::of(&bytes));
        assert!("abc".parse::<Digest>().is_err());
    }
}
