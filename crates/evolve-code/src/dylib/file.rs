//! Reading a patch file once, from a regular file only, and handing the loader exactly the
//! bytes that were checked.
//!
//! # Why not a path
//!
//! Checking a file and then loading it by its path is a race: the path may name another file by
//! the time the loader opens it, or the file's bytes may change in between. So the file is
//! opened once, its bytes read from that descriptor into memory, every check runs on those
//! bytes, and [`PatchFile::sealed`] copies them into a sealed `memfd` (no write, grow or shrink
//! is possible any more, by anyone) which the loader opens as `/proc/self/fd/N`: the object the
//! loader maps is byte for byte the one that was checked.
//!
//! # Only regular files
//!
//! Opening a FIFO for reading blocks until a writer appears, and opening a device may have side
//! effects. The path is therefore first opened with `O_PATH` (which opens nothing: no read, no
//! side effect, no wait), its type checked with `fstat`, and only a regular file is reopened for
//! reading, through the `O_PATH` descriptor's `/proc/self/fd` link (the same inode, whatever
//! the path names by then).

use crate::error::{Error, ErrorKind, Result};
use rustix::fs::{FileType, MemfdFlags, Mode, OFlags, SealFlags};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The largest patch file read (a patch holds the code of a few crates: megabytes).
pub const MAX_PATCH_BYTES: u64 = 256 << 20;

fn image_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::new(ErrorKind::Image {
        path: path.display().to_string(),
        reason: reason.into(),
    })
}

fn kind_of(file_type: FileType) -> &'static str {
    match file_type {
        FileType::Directory => "a directory",
        FileType::Fifo => "a FIFO",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Socket => "a socket",
        FileType::Symlink => "a symbolic link",
        _ => "not a regular file",
    }
}

/// Reads the regular file at `path`, at most `limit` bytes, without ever opening anything else
/// for reading: a FIFO, a device, a socket or a directory is refused before any read, naming
/// what it is (see the module docs).
///
/// # Example
///
/// ```
/// let err = evolve_code::dylib::read_regular_file("/dev/null".as_ref(), 1 << 20).unwrap_err();
/// assert!(err.to_string().contains("is a character device, not a regular file"), "{err}");
/// ```
pub fn read_regular_file(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let located = rustix::fs::open(path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| image_error(path, std::io::Error::from(e).to_string()))?;
    let stat = rustix::fs::fstat(&located)
        .map_err(|e| image_error(path, std::io::Error::from(e).to_string()))?;
    let file_type = FileType::from_raw_mode(stat.st_mode);
    if file_type != FileType::RegularFile {
        return Err(image_error(
            path,
            format!("it is {}, not a regular file", kind_of(file_type)),
        ));
    }
    if stat.st_size as u64 > limit {
        return Err(image_error(
            path,
            format!("it is {} bytes long, more than {limit}", stat.st_size),
        ));
    }
    // The same inode as `located`, whatever `path` names by now.
    let link = format!("/proc/self/fd/{}", located.as_raw_fd());
    let opened = rustix::fs::open(
        link.as_str(),
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )
    .map_err(|e| image_error(path, std::io::Error::from(e).to_string()))?;
    let mut data = Vec::with_capacity(stat.st_size as usize);
    std::fs::File::from(opened)
        .take(limit + 1)
        .read_to_end(&mut data)
        .map_err(|e| image_error(path, e.to_string()))?;
    if data.len() as u64 > limit {
        return Err(image_error(path, format!("it grew beyond {limit} bytes")));
    }
    Ok(data)
}

/// The name of the memfd a patch read from `path` is loaded from: `evolve-patch:` and the
/// file's name, so `/proc/PID/maps` says which patch a mapping is
/// (`/memfd:evolve-patch:fix.so (deleted)`). Cut to the kernel's limit of 249 bytes.
///
/// # Example
///
/// ```
/// let name = evolve_code::dylib::file::memfd_name("/var/patches/fix-42.so".as_ref());
/// assert_eq!(name, "evolve-patch:fix-42.so");
/// ```
pub fn memfd_name(path: &Path) -> String {
    const LIMIT: usize = 249;
    let file_name = path.file_name().unwrap_or(path.as_os_str());
    let mut name = format!("evolve-patch:{}", file_name.to_string_lossy());
    if name.len() > LIMIT {
        let mut end = LIMIT;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    name
}

/// A patch file's bytes, read once (see the module docs).
#[derive(Debug, Clone)]
pub struct PatchFile {
    path: PathBuf,
    data: Vec<u8>,
}

impl PatchFile {
    /// Reads the regular file at `path` (see [`read_regular_file`]).
    ///
    /// # Example
    ///
    /// ```
    /// let fifo = std::env::temp_dir().join(format!("evolve-doc-fifo-{}", std::process::id()));
    /// rustix::fs::mknodat(rustix::fs::CWD, &fifo, rustix::fs::FileType::Fifo,
    ///     rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR, 0).unwrap();
    /// // Refused at once, not after a writer appears.
    /// let err = evolve_code::dylib::PatchFile::read(&fifo).unwrap_err();
    /// assert!(err.to_string().contains("is a FIFO"), "{err}");
    /// std::fs::remove_file(fifo).unwrap();
    /// ```
    pub fn read(path: &Path) -> Result<PatchFile> {
        Ok(PatchFile {
            path: path.to_path_buf(),
            data: read_regular_file(path, MAX_PATCH_BYTES)?,
        })
    }

    /// A patch file made of `data`, as if read from `path` (for bytes that arrived otherwise,
    /// e.g. over a network, and were verified).
    pub fn from_bytes(path: &Path, data: Vec<u8>) -> PatchFile {
        PatchFile {
            path: path.to_path_buf(),
            data,
        }
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// A sealed in-memory copy of the bytes, named after the file (see [`memfd_name`]): no one
    /// can change them any more.
    pub(super) fn sealed(&self) -> Result<OwnedFd> {
        let os = |operation: &'static str| {
            move |e: rustix::io::Errno| {
                Error::new(ErrorKind::Os {
                    operation,
                    errno: e.raw_os_error(),
                })
            }
        };
        let fd = rustix::fs::memfd_create(
            memfd_name(&self.path).as_str(),
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(os("memfd_create for a patch"))?;
        let mut file = std::fs::File::from(fd);
        file.write_all(&self.data)
            .map_err(|e| image_error(&self.path, format!("copying it to a memfd: {e}")))?;
        let fd = OwnedFd::from(file);
        rustix::fs::fcntl_add_seals(
            &fd,
            SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
        )
        .map_err(os("sealing a patch's memfd"))?;
        Ok(fd)
    }
}
