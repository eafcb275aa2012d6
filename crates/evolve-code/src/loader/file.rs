//! The patch file: opened once, refused unless it is a regular file, its manifest's SHA-256
//! checked before anything of it is trusted.
//!
//! The digest covers the whole file with the contents of the `.evolve.manifest` section replaced
//! by zeros, so the manifest can carry the digest of the file it lives in: the builder writes the
//! manifest with a 64-character placeholder, hashes with [`patch_digest`], and writes the hex
//! digest over the placeholder (same length, so no offset moves).

use super::refused;
use crate::error::Result;
use object::elf;
use object::read::elf::{FileHeader, SectionHeader};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::ops::Range;
use std::path::Path;

/// The name of the non-allocated section that holds a patch's manifest (UTF-8 JSON).
pub const MANIFEST_SECTION: &str = ".evolve.manifest";

/// The largest patch file the loader reads.
const MAX_FILE: u64 = 1 << 30;

/// Reads the file at `path` once, refusing anything but a regular file before reading a byte
/// (a FIFO would block the caller, a device could be endless or have side effects on read).
pub(super) fn read_regular(path: &Path) -> Result<Vec<u8>> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let kind = |t: std::fs::FileType| {
        if t.is_fifo() {
            "a FIFO"
        } else if t.is_dir() {
            "a directory"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else if t.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        }
    };
    let before = std::fs::metadata(path).map_err(|e| refused(path, e.to_string()))?;
    if !before.is_file() {
        return Err(refused(
            path,
            format!(
                "{} is {}, not a regular file",
                path.display(),
                kind(before.file_type())
            ),
        ));
    }
    // O_NONBLOCK: should the path have been replaced by a FIFO since, opening it does not wait
    // for a writer; the type is checked again on the descriptor itself.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| refused(path, e.to_string()))?;
    let metadata = file.metadata().map_err(|e| refused(path, e.to_string()))?;
    if !metadata.is_file() {
        return Err(refused(
            path,
            format!(
                "{} is {}, not a regular file",
                path.display(),
                kind(metadata.file_type())
            ),
        ));
    }
    if metadata.len() > MAX_FILE {
        return Err(refused(
            path,
            format!(
                "{} bytes is larger than any patch ({MAX_FILE})",
                metadata.len()
            ),
        ));
    }
    let mut data = Vec::with_capacity(metadata.len() as usize);
    (&mut file)
        .take(MAX_FILE)
        .read_to_end(&mut data)
        .map_err(|e| refused(path, e.to_string()))?;
    Ok(data)
}

/// The byte range of the `.evolve.manifest` section's contents in an ELF64 file.
pub fn manifest_range(data: &[u8]) -> std::result::Result<Range<usize>, String> {
    let header = elf::FileHeader64::<object::Endianness>::parse(data)
        .map_err(|e| format!("not an ELF64 file: {e}"))?;
    let endian = header.endian().map_err(|e| e.to_string())?;
    let sections = header.sections(endian, data).map_err(|e| e.to_string())?;
    let mut found = None;
    for section in sections.iter() {
        if sections.section_name(endian, section).ok() == Some(MANIFEST_SECTION.as_bytes()) {
            if found.is_some() {
                return Err(format!("two {MANIFEST_SECTION} sections"));
            }
            let (offset, size) = section
                .file_range(endian)
                .ok_or_else(|| format!("{MANIFEST_SECTION} has no contents in the file"))?;
            let (start, len) = (offset as usize, size as usize);
            if start.checked_add(len).is_none_or(|end| end > data.len()) {
                return Err(format!("{MANIFEST_SECTION} lies outside the file"));
            }
            found = Some(start..start + len);
        }
    }
    found.ok_or_else(|| format!("no {MANIFEST_SECTION} section: not an Evolve patch object"))
}

/// The SHA-256 of a patch file: the whole file with the contents of its `.evolve.manifest`
/// section replaced by zeros (see the module docs). The builder writes it into the manifest's
/// `sha256` field; the loader recomputes it before loading.
///
/// # Errors
///
/// A message if `data` is not an ELF64 file with exactly one `.evolve.manifest` section.
///
/// # Example
///
/// ```
/// let not_a_patch = std::fs::read("/proc/self/exe").unwrap();
/// let err = evolve_code::loader::patch_digest(&not_a_patch).unwrap_err();
/// assert!(err.contains(".evolve.manifest"), "{err}");
/// ```
pub fn patch_digest(data: &[u8]) -> std::result::Result<[u8; 32], String> {
    let manifest = manifest_range(data)?;
    let mut hasher = Sha256::new();
    hasher.update(&data[..manifest.start]);
    let zeros = [0u8; 4096];
    let mut left = manifest.len();
    while left > 0 {
        let n = left.min(zeros.len());
        hasher.update(&zeros[..n]);
        left -= n;
    }
    hasher.update(&data[manifest.end..]);
    Ok(hasher.finalize().into())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks the manifest's `sha256` against the file and returns the manifest text.
pub(super) fn verify(path: &Path, data: &[u8]) -> Result<String> {
    let range = manifest_range(data).map_err(|e| refused(path, e))?;
    let text = std::str::from_utf8(&data[range])
        .map_err(|e| refused(path, format!("{MANIFEST_SECTION} is not UTF-8: {e}")))?
        .trim_end_matches('\0');
    let json: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| refused(path, format!("{MANIFEST_SECTION} is not JSON: {e}")))?;
    let claimed = json
        .get("sha256")
        .and_then(|v| v.as_str())
        .ok_or_else(|| refused(path, "the manifest has no \"sha256\" string"))?;
    let actual = hex(&patch_digest(data).map_err(|e| refused(path, e))?);
    if !claimed.eq_ignore_ascii_case(&actual) {
        return Err(refused(
            path,
            format!(
                "SHA-256 mismatch: the manifest says {claimed}, the file hashes to {actual} \
                 (corrupt or modified after it was built)"
            ),
        ));
    }
    Ok(text.to_owned())
}
