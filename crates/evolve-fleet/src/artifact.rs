//! Patch artifacts: content-addressed files, served over HTTP, fetched and verified by nodes.
//!
//! etcd holds only an artifact's [`Artifact`] record (digest, size, locations, signature); the
//! bytes live in an [`ArtifactStore`] directory as `DIR/<sha256>` and travel over plain HTTP
//! (any server: the controller's, a CDN, a file server). Transport is not trusted: a node checks
//! the size and SHA-256 of what it received, then the signature against its trusted keys
//! ([`verify`]), before the file goes to an agent.

use crate::error::{Error, ErrorKind, Result};
use crate::model::Artifact;
use evolve_trust::{Digest, TrustedKeys};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A directory of files named by their SHA-256.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    dir: PathBuf,
}

impl ArtifactStore {
    /// The store in `dir` (created if missing).
    pub fn open(dir: &Path) -> Result<ArtifactStore> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(ArtifactStore {
            dir: dir.to_path_buf(),
        })
    }

    /// Where the file of `digest` is (or would be).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.to_string())
    }

    /// Copies the file at `path` in; its digest and size.
    pub fn add_file(&self, path: &Path) -> Result<(Digest, u64)> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let digest = Digest::of(&bytes);
        self.write(&digest, &bytes)?;
        Ok((digest, bytes.len() as u64))
    }

    /// Stores `bytes` (already checked to be `digest`), atomically.
    pub fn write(&self, digest: &Digest, bytes: &[u8]) -> Result<PathBuf> {
        let path = self.path(digest);
        let temporary = self.dir.join(format!(".{digest}.{}", std::process::id()));
        std::fs::write(&temporary, bytes).map_err(|e| Error::io(&temporary, e))?;
        std::fs::rename(&temporary, &path).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    }

    /// The bytes of `digest`, if stored and intact.
    pub fn read(&self, digest: &Digest) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.path(digest)).ok()?;
        (Digest::of(&bytes) == *digest).then_some(bytes)
    }
}

/// Checks `bytes` against the artifact record: size, digest, and (with `trusted`) signature.
pub fn verify(artifact: &Artifact, bytes: &[u8], trusted: Option<&TrustedKeys>) -> Result<()> {
    let refuse = |reason: String| {
        Error::new(ErrorKind::Artifact {
            sha256: artifact.sha256.to_string(),
            reason,
        })
    };
    if bytes.len() as u64 != artifact.size {
        return Err(refuse(format!(
            "received {} bytes, the rollout says {}",
            bytes.len(),
            artifact.size
        )));
    }
    let actual = Digest::of(bytes);
    if actual != artifact.sha256 {
        return Err(refuse(format!(
            "received bytes with SHA-256 {}: not the artifact",
            actual.short()
        )));
    }
    if let Some(trusted) = trusted {
        trusted
            .check(&actual, artifact.signature.as_ref())
            .map_err(|refusal| refuse(format!("refused: {refusal}")))?;
    }
    Ok(())
}

/// GETs `url`; the body, or why not.
pub async fn http_get(url: &str, timeout: Duration) -> std::result::Result<Vec<u8>, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let response = tokio::time::timeout(timeout, client.get(uri))
        .await
        .map_err(|_| format!("{url}: no answer within {timeout:?}"))?
        .map_err(|e| format!("{url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("{url}: HTTP {}", response.status()));
    }
    let body = tokio::time::timeout(timeout, response.into_body().collect())
        .await
        .map_err(|_| format!("{url}: body not received within {timeout:?}"))?
        .map_err(|e| format!("{url}: {e}"))?;
    Ok(body.to_bytes().to_vec())
}

/// The artifact's file in `cache`, fetched from its locations if not there yet, verified
/// either way (a cached file is checked again: disks and caches lie too).
pub async fn fetch(
    artifact: &Artifact,
    cache: &ArtifactStore,
    trusted: Option<&TrustedKeys>,
) -> Result<PathBuf> {
    if let Some(bytes) = cache.read(&artifact.sha256) {
        verify(artifact, &bytes, trusted)?;
        return Ok(cache.path(&artifact.sha256));
    }
    let mut failures = Vec::new();
    for url in &artifact.urls {
        match http_get(url, Duration::from_secs(30)).await {
            Ok(bytes) => {
                verify(artifact, &bytes, trusted)?;
                return cache.write(&artifact.sha256, &bytes);
            }
            Err(e) => failures.push(e),
        }
    }
    Err(Error::new(ErrorKind::Artifact {
        sha256: artifact.sha256.to_string(),
        reason: if failures.is_empty() {
            "no location to fetch it from".into()
        } else {
            format!("could not fetch it: {}", failures.join("; "))
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use evolve_trust::SecretKey;

    fn artifact_of(bytes: &[u8]) -> Artifact {
        Artifact {
            sha256: Digest::of(bytes),
            size: bytes.len() as u64,
            urls: vec![],
            signature: None,
            name: "p.so".into(),
        }
    }

    #[test]
    fn verification_checks_size_digest_and_signer() {
        let bytes = b"a patch".to_vec();
        let mut artifact = artifact_of(&bytes);
        verify(&artifact, &bytes, None).unwrap();
        let e = verify(&artifact, b"a patcH", None).unwrap_err().to_string();
        assert!(e.contains("not the artifact"), "{e}");
        let ops = SecretKey::generate("ops").unwrap();
        let trusted = TrustedKeys::from_keys(vec![ops.public()]);
        let e = verify(&artifact, &bytes, Some(&trusted))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not signed"), "{e}");
        artifact.signature = Some(ops.sign(&artifact.sha256));
        verify(&artifact, &bytes, Some(&trusted)).unwrap();
        let dev = SecretKey::generate("dev").unwrap();
        artifact.signature = Some(dev.sign(&artifact.sha256));
        let e = verify(&artifact, &bytes, Some(&trusted))
            .unwrap_err()
            .to_string();
        assert!(e.contains("key dev") && e.contains("not trusted"), "{e}");
    }

    #[test]
    fn a_corrupt_cached_file_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(dir.path()).unwrap();
        let bytes = b"the patch".to_vec();
        let digest = Digest::of(&bytes);
        store.write(&digest, &bytes).unwrap();
        assert_eq!(store.read(&digest).unwrap(), bytes);
        std::fs::write(store.path(&digest), b"tampered").unwrap();
        assert!(store.read(&digest).is_none());
    }
}
