//! Thread-locals of the executable, as a patch reaches them.
//!
//! A patch defines no thread-locals of its own (it would need a TLS block in every thread,
//! existing ones included); it uses the executable's, which live in the static TLS area at a
//! fixed offset from each thread's thread pointer (`%fs:0` on x86-64, TLS variant II). The
//! loader therefore needs two numbers, both from `dl_iterate_phdr`:
//! - the executable's TLS module id (`dlpi_tls_modid`, 1 when it has a `PT_TLS`), which goes into
//!   the GOT pairs that general- and local-dynamic accesses pass to `__tls_get_addr`;
//! - the offset of its TLS block from the thread pointer (`dlpi_tls_data - %fs:0`, the same in
//!   every thread for static TLS), from which initial- and local-exec accesses compute
//!   `tpoff(symbol) = block_offset + st_value`.
#![allow(unsafe_code)]

/// The executable's TLS block, as patches address it.
#[derive(Debug, Clone, Copy)]
pub(super) struct ExecutableTls {
    /// Its module id, for `__tls_get_addr`.
    pub module: usize,
    /// The block's offset from the thread pointer (negative on x86-64).
    pub block_from_tp: i64,
}

/// The executable's TLS block, or `None` if it has no `PT_TLS` segment.
pub(super) fn executable_tls() -> Option<ExecutableTls> {
    let (module, data) = crate::inspect::executable_tls()?;
    if data == 0 {
        return None;
    }
    Some(ExecutableTls {
        module,
        block_from_tp: data as i64 - thread_pointer() as i64,
    })
}

/// The calling thread's thread pointer (`%fs:0`, which the x86-64 TLS ABI stores there).
fn thread_pointer() -> usize {
    let tp: usize;
    // SAFETY: on x86-64 Linux %fs:0 holds the thread control block's self pointer (the ABI);
    // the load has no other effect.
    unsafe {
        std::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly, preserves_flags))
    };
    tp
}
