//! ed25519 keys: generated from the kernel's random source, stored as one-line text files.
//!
//! A public key file holds `evolve-ed25519 <64 hex digits> <name>`; a trusted-keys file is any
//! number of such lines (`#` starts a comment). A secret key file holds
//! `evolve-ed25519-secret <64 hex digits> <name>` and is written mode 0600.

use crate::signature::SignatureFile;
use crate::{hex, unhex, Digest, Error, DOMAIN};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const PUBLIC_TAG: &str = "evolve-ed25519";
const SECRET_TAG: &str = "evolve-ed25519-secret";

/// A signing key and the name its owner gave it.
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKey")
            .field("name", &self.name)
            .field("public", &self.public().id())
            .finish_non_exhaustive()
    }
}

/// A public key: what nodes and agents trust.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// The name its owner gave it (`ops`, `release-2026`).
    pub name: String,
    key: VerifyingKey,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.id())
    }
}

fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::new(
            format!("key name {name:?}"),
            "a key name is one word without spaces",
        ));
    }
    Ok(())
}

impl SecretKey {
    /// A new random key named `name` (one word).
    pub fn generate(name: &str) -> Result<SecretKey, Error> {
        check_name(name)?;
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(|e| Error::new("/dev/urandom", e.to_string()))?;
        Ok(SecretKey {
            name: name.to_string(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its public half.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Signs a patch's digest.
    pub fn sign(&self, digest: &Digest) -> SignatureFile {
        let mut message = DOMAIN.to_vec();
        message.extend_from_slice(&digest.0);
        SignatureFile {
            format: 1,
            key_name: self.name.clone(),
            key: hex(self.key.verifying_key().as_bytes()),
            sha256: *digest,
            signature: hex(&self.key.sign(&message).to_bytes()),
        }
    }

    /// Writes `DIR/NAME.key` (mode 0600, refusing to overwrite) and `DIR/NAME.pub`.
    pub fn save(&self, dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf), Error> {
        let secret_path = dir.join(format!("{}.key", self.name));
        let public_path = dir.join(format!("{}.pub", self.name));
        let shown = secret_path.display().to_string();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&secret_path)
            .map_err(|e| Error::new(&shown, e.to_string()))?;
        use std::io::Write;
        writeln!(
            file,
            "{SECRET_TAG} {} {}",
            hex(self.key.as_bytes()),
            self.name
        )
        .map_err(|e| Error::new(&shown, e.to_string()))?;
        std::fs::write(&public_path, self.public().to_line() + "\n")
            .map_err(|e| Error::new(public_path.display().to_string(), e.to_string()))?;
        Ok((secret_path, public_path))
    }

    /// Reads a secret key file.
    pub fn load(path: &Path) -> Result<SecretKey, Error> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::new(&shown, e.to_string()))?;
        let words: Vec<&str> = text.split_whitespace().collect();
        match words.as_slice() {
            [tag, secret, name] if *tag == SECRET_TAG => {
                let bytes = unhex(secret)
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| Error::new(&shown, "the secret is not 64 hex digits"))?;
                Ok(SecretKey {
                    name: name.to_string(),
                    key: SigningKey::from_bytes(&bytes),
                })
            }
            [tag, ..] if *tag == PUBLIC_TAG => Err(Error::new(
                &shown,
                "this is a public key; signing needs the secret key (NAME.key)",
            )),
            _ => Err(Error::new(
                &shown,
                format!("not an Evolve secret key (expected `{SECRET_TAG} HEX NAME`)"),
            )),
        }
    }
}

impl PublicKey {
    /// A key from its 32 bytes in hex, with a name.
    pub fn from_hex(name: &str, key: &str) -> Result<PublicKey, Error> {
        let bytes = unhex(key)
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| Error::new(format!("key {name}"), "not 64 hex digits"))?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|e| Error::new(format!("key {name}"), e.to_string()))?;
        Ok(PublicKey {
            name: name.to_string(),
            key,
        })
    }

    /// Parses one line `evolve-ed25519 HEX NAME`.
    pub fn parse_line(line: &str) -> Result<PublicKey, Error> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [tag, key, name] if *tag == PUBLIC_TAG => PublicKey::from_hex(name, key),
            _ => Err(Error::new(
                line,
                format!("not a public key line (expected `{PUBLIC_TAG} HEX NAME`)"),
            )),
        }
    }

    /// Its line in a public key or trusted-keys file.
    pub fn to_line(&self) -> String {
        format!("{PUBLIC_TAG} {} {}", hex(self.key.as_bytes()), self.name)
    }

    /// A short identity: the first 16 hex digits of the key.
    pub fn id(&self) -> String {
        hex(&self.key.as_bytes()[..8])
    }

    /// The key's bytes in hex.
    pub fn to_hex(&self) -> String {
        hex(self.key.as_bytes())
    }

    pub(crate) fn verifying(&self) -> &VerifyingKey {
        &self.key
    }
}
