//! What each C thread can ask after a call: why it failed (`evolve_last_error`) and what a
//! commit did (`evolve_last_report`). Thread-local, so threads do not see each other's.
//!
//! Each is a fixed buffer per thread, rewritten in place: the pointer C receives stays valid
//! for the thread's life (its text is that of the latest call), so a program that reads it in
//! the same expression as another call gets a string, never freed memory.

use std::cell::RefCell;
use std::ffi::{c_char, c_int};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Longest message kept, with its NUL.
const CAPACITY: usize = 4096;

thread_local! {
    static LAST_ERROR: RefCell<Box<[u8; CAPACITY]>> = RefCell::new(Box::new([0; CAPACITY]));
    static LAST_REPORT: RefCell<Box<[u8; CAPACITY]>> = RefCell::new(Box::new([0; CAPACITY]));
}

type Buffer = &'static std::thread::LocalKey<RefCell<Box<[u8; CAPACITY]>>>;

fn store(buffer: Buffer, text: &str) {
    // Truncated on a character boundary; a NUL inside (from a C string) would end it early.
    let mut end = text.len().min(CAPACITY - 1);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let bytes = &text.as_bytes()[..end];
    buffer.with(|b| {
        let mut b = b.borrow_mut();
        for (dst, src) in b.iter_mut().zip(bytes) {
            *dst = if *src == 0 { b'?' } else { *src };
        }
        b[bytes.len()] = 0;
    });
}

fn pointer(buffer: Buffer) -> *const c_char {
    buffer.with(|b| b.borrow().as_ptr() as *const c_char)
}

/// Runs one C call: its result, or -1 with the error (or the panic) as the thread's last error.
/// A panic never crosses into C.
pub(crate) fn run(f: impl FnOnce() -> Result<c_int, String>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => {
            store(&LAST_ERROR, "");
            value
        }
        Ok(Err(message)) => {
            store(&LAST_ERROR, &message);
            -1
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            store(&LAST_ERROR, &format!("evolve: internal error: {what}"));
            -1
        }
    }
}

/// Records what the calling thread's commit or revert did.
pub(crate) fn set_report(report: &str) {
    store(&LAST_REPORT, report);
}

/// The calling thread's last error ("" after a call that succeeded).
pub(crate) fn last_error() -> *const c_char {
    pointer(&LAST_ERROR)
}

/// What the calling thread's last commit or revert did.
pub(crate) fn last_report() -> *const c_char {
    pointer(&LAST_REPORT)
}
