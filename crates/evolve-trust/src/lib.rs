//! Trust in patches: content addresses and ed25519 signatures.
//!
//! A patch is named by the SHA-256 of its bytes (its [`Digest`]): the fleet stores and serves it
//! under that name and every node checks the bytes it fetched against it. A patch is **signed**
//! by an operator's key ([`SecretKey`], made by `evolve keygen`): the signature covers the
//! digest, so it travels beside the file (`PATCH.sig`, a small JSON document, see
//! [`SignatureFile`]) or inside a rollout's spec, never inside the patch.
//!
//! A process or node configured with [`TrustedKeys`] (the `EVOLVE_TRUSTED_KEYS` environment
//! variable, or `evolve node --trusted-keys`) accepts only patches signed by one of them and
//! refuses the others with a [`Refusal`] that names the key and the reason: no signature, a key
//! that is not trusted, a signature that does not verify, or a file changed after signing.
//!
//! The signed message is the domain string [`DOMAIN`] followed by the 32 digest bytes, so a
//! signature over a patch cannot be replayed as a signature over anything else.
//!
//! This crate is small on purpose: the agent, linked into every server, verifies patches with it
//! without linking the fleet's network stack.
//!
//! # Example
//!
//! ```
//! use evolve_trust::{Digest, SecretKey, TrustedKeys};
//!
//! let key = SecretKey::generate("ops").unwrap();
//! let patch = b"the bytes of a patch";
//! let digest = Digest::of(patch);
//! let signature = key.sign(&digest);
//!
//! let trusted = TrustedKeys::from_keys(vec![key.public()]);
//! assert_eq!(trusted.check(&digest, Some(&signature)).unwrap().name, "ops");
//!
//! // Another key, or no signature, is refused with the reason.
//! let other = SecretKey::generate("dev").unwrap();
//! let refusal = trusted.check(&digest, Some(&other.sign(&digest))).unwrap_err();
//! assert!(refusal.to_string().contains("dev"), "{refusal}");
//! assert!(trusted.check(&digest, None).is_err());
//! ```

mod digest;
mod keys;
mod signature;
mod trusted;

pub use digest::Digest;
pub use keys::{PublicKey, SecretKey};
pub use signature::SignatureFile;
pub use trusted::{CheckFileError, Refusal, TrustedKeys, TRUSTED_KEYS_ENV};

/// What a signature signs, before the digest: binds it to "an Evolve patch, format 1".
pub const DOMAIN: &[u8] = b"evolve patch signature v1\0";

/// An error reading or writing keys and signatures (the file and what is wrong with it).
#[derive(Debug)]
pub struct Error {
    /// The file or value concerned.
    pub what: String,
    /// What is wrong.
    pub reason: String,
}

impl Error {
    pub(crate) fn new(what: impl Into<String>, reason: impl Into<String>) -> Error {
        Error {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.reason)
    }
}

impl std::error::Error for Error {}

/// Hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of an even-length hex string.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}
