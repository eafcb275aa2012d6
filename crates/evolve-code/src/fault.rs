//! Faults in unloaded patches: a diagnostic that names the patch instead of a bare crash.
//!
//! After a patch is unloaded its address range stays reserved `PROT_NONE`, so a stale pointer
//! into it faults at once instead of running whatever was mapped there later. This module's
//! `SIGSEGV` handler recognises faults (by faulting address or instruction pointer) inside such
//! ranges, writes one line to standard error naming the patch, and lets the fault take its
//! default course. Faults elsewhere go to the program's handler (Rust's runtime uses one to
//! report stack overflows), installed before or after the engine's, exactly as the kernel would
//! have called it ([`crate::sys::signal::Chain`]).
//!
//! # Safety
//!
//! The handler reads only atomics of a fixed table and the `siginfo_t`/`ucontext_t` the kernel
//! passes, and calls only async-signal-safe functions (`write`, and the chain's).
#![allow(unsafe_code)]

use crate::sys::signal::Chain;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

const ENTRIES: usize = 256;
const NAME: usize = 48;

struct Entry {
    start: AtomicUsize,
    end: AtomicUsize,
    name: [AtomicU8; NAME],
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Entry = Entry {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    name: [const { AtomicU8::new(0) }; NAME],
};

static TABLE: [Entry; ENTRIES] = [EMPTY; ENTRIES];
static COUNT: AtomicUsize = AtomicUsize::new(0);

fn sigsegv() -> libc::c_int {
    libc::SIGSEGV
}

static CHAIN: Chain = Chain::new(sigsegv, on_segv, libc::SA_ONSTACK);

/// Remembers that `start..end` belonged to patch `name`, now unloaded.
pub(crate) fn record(start: usize, end: usize, name: &str) {
    install();
    let index = COUNT.fetch_add(1, Ordering::AcqRel) % ENTRIES;
    let entry = &TABLE[index];
    entry.end.store(0, Ordering::Release);
    for (slot, byte) in entry
        .name
        .iter()
        .zip(name.bytes().chain(std::iter::repeat(0)))
    {
        slot.store(byte, Ordering::Relaxed);
    }
    entry.start.store(start, Ordering::Release);
    entry.end.store(end, Ordering::Release);
}

fn install() {
    // Best effort: without the handler a stale pointer still faults, only without the name.
    let _ = CHAIN.install();
}

fn write_stderr(bytes: &[u8]) {
    // SAFETY: write(2) on stderr with a valid buffer; async-signal-safe.
    unsafe { libc::write(2, bytes.as_ptr() as *const libc::c_void, bytes.len()) };
}

fn hex(mut value: usize, out: &mut [u8; 18]) -> &[u8] {
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b"0123456789abcdef"[value & 15];
        value >>= 4;
        if value == 0 {
            break;
        }
    }
    i -= 1;
    out[i] = b'x';
    i -= 1;
    out[i] = b'0';
    &out[i..]
}

extern "C" fn on_segv(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: valid pointers from the kernel for an SA_SIGINFO handler.
    let (address, pc) = unsafe {
        (
            (*info).si_addr() as usize,
            (*(context as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RIP as usize]
                as usize,
        )
    };
    let count = COUNT.load(Ordering::Acquire).min(ENTRIES);
    for entry in TABLE.iter().take(count) {
        let (start, end) = (
            entry.start.load(Ordering::Acquire),
            entry.end.load(Ordering::Acquire),
        );
        let hit = |a: usize| (start..end).contains(&a);
        if end != 0 && (hit(address) || hit(pc)) {
            let mut name = [0u8; NAME];
            for (b, slot) in name.iter_mut().zip(&entry.name) {
                *b = slot.load(Ordering::Relaxed);
            }
            let len = name.iter().position(|b| *b == 0).unwrap_or(NAME);
            let mut buffer = [0u8; 18];
            write_stderr(b"evolve: the program reached unloaded patch `");
            write_stderr(&name[..len]);
            write_stderr(b"` at ");
            write_stderr(hex(address, &mut buffer));
            write_stderr(b": a pointer into it escaped the reference scan\n");
            break;
        }
    }
    // SAFETY: the kernel's arguments, passed on unchanged.
    unsafe { CHAIN.forward(signal, info, context) };
}
