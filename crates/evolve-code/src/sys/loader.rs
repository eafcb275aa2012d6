//! The dynamic loader's list of loaded objects (`dl_iterate_phdr(3)`).
//!
//! Self-inspection ([`crate::inspect`]) reads symbols and build ids from it; the stack walker
//! ([`crate::sys::walk`]) finds each object's unwind tables (`PT_GNU_EH_FRAME`) through it.
//!
//! # Safety
//!
//! The `dl_phdr_info` handed to the callback, its program headers and its name are valid for
//! the duration of the callback (the `dl_iterate_phdr` contract); the views built from them
//! borrow the callback's lifetime.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::raw::{c_int, c_void};

/// One loaded object as seen inside the `dl_iterate_phdr` callback.
pub struct Object<'a> {
    /// `dlpi_name`: empty for the main executable, a path or a bare name (the vdso).
    pub name: &'a [u8],
    /// `dlpi_addr`: run-time address minus link-time address.
    pub bias: usize,
    /// Where its program headers are mapped.
    pub phdr_address: usize,
    /// Its program headers.
    pub phdrs: &'a [libc::Elf64_Phdr],
    /// `dlpi_tls_modid`: the object's TLS module id (0 if it has no `PT_TLS`).
    pub tls_module: usize,
    /// `dlpi_tls_data`: the calling thread's instance of the object's TLS block, or 0.
    pub tls_data: usize,
}

impl Object<'_> {
    /// The run-time range of the first program header of type `p_type`.
    pub fn segment(&self, p_type: u32) -> Option<std::ops::Range<usize>> {
        let p = self.phdrs.iter().find(|p| p.p_type == p_type)?;
        let start = usize::try_from(p.p_vaddr).ok()?.checked_add(self.bias)?;
        Some(start..start.checked_add(usize::try_from(p.p_memsz).ok()?)?)
    }
}

/// Calls `f` for each loaded object, in the loader's order, until it returns `false`.
///
/// The loader holds its lock while `f` runs: `f` must not load or unload objects, and no
/// object can be unloaded meanwhile. Never call it with the world stopped (a stopped thread
/// may hold that lock).
pub fn for_each<F: FnMut(&Object<'_>) -> bool>(mut f: F) {
    unsafe extern "C" fn callback<F: FnMut(&Object<'_>) -> bool>(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: `data` is the `&mut F` that `for_each` passed to dl_iterate_phdr below; it is
        // live and not otherwise borrowed while dl_iterate_phdr runs.
        let f = unsafe { &mut *data.cast::<F>() };
        // SAFETY: dl_iterate_phdr passes a valid, initialized dl_phdr_info for the duration of
        // the callback.
        let info = unsafe { &*info };
        let phdrs = if info.dlpi_phdr.is_null() || info.dlpi_phnum == 0 {
            &[][..]
        } else {
            // SAFETY: dlpi_phdr points to dlpi_phnum program headers in the object's mapped
            // image, valid while the callback runs (the loader lock keeps the object mapped).
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
        };
        let name = if info.dlpi_name.is_null() {
            &[][..]
        } else {
            // SAFETY: a non-null dlpi_name is a NUL-terminated string owned by the loader, valid
            // while the callback runs.
            unsafe { CStr::from_ptr(info.dlpi_name) }.to_bytes()
        };
        let view = Object {
            name,
            bias: info.dlpi_addr as usize,
            phdr_address: info.dlpi_phdr as usize,
            phdrs,
            tls_module: info.dlpi_tls_modid,
            tls_data: info.dlpi_tls_data as usize,
        };
        // A non-zero return stops the iteration.
        c_int::from(!f(&view))
    }

    // SAFETY: the callback matches dl_iterate_phdr's expected signature, does not unwind (an
    // `extern "C"` function aborts instead), and `data` points to `f`, which outlives the call.
    unsafe {
        libc::dl_iterate_phdr(Some(callback::<F>), (&mut f as *mut F).cast::<c_void>());
    }
}
