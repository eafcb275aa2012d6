//! The target's memory, read and written through `/proc/PID/mem`.
//!
//! Writes go through the kernel's forced access (as a debugger's do), so the loader's code can
//! be written into a page the target mapped read-and-execute only: the target never holds a
//! writable executable page.

use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Access to one process's memory.
#[derive(Debug)]
pub struct Memory {
    pid: u32,
    file: File,
}

impl Memory {
    /// Opens `/proc/PID/mem` for reading and writing.
    ///
    /// # Errors
    /// The process is gone or may not be traced by us.
    pub fn open(pid: u32) -> Result<Memory> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .map_err(|e| crate::process::proc_error(pid, "opening /proc/PID/mem", e))?;
        Ok(Memory { pid, file })
    }

    /// `len` bytes at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut buffer = vec![0u8; len];
        self.file.read_exact_at(&mut buffer, addr).map_err(|e| {
            Error::system(
                format!("reading {len} bytes at {addr:#x} in process {}", self.pid),
                e.raw_os_error().unwrap_or(libc::EIO),
            )
        })?;
        Ok(buffer)
    }

    /// The `u64` at `addr`.
    pub fn read_u64(&self, addr: u64) -> Result<u64> {
        let b = self.read(addr, 8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// The `i32` at `addr`.
    pub fn read_i32(&self, addr: u64) -> Result<i32> {
        let b = self.read(addr, 4)?;
        Ok(i32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    /// Writes `bytes` at `addr`.
    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        self.file.write_all_at(bytes, addr).map_err(|e| {
            Error::system(
                format!(
                    "writing {} bytes at {addr:#x} in process {}",
                    bytes.len(),
                    self.pid
                ),
                e.raw_os_error().unwrap_or(libc::EIO),
            )
        })
    }
}
