//! Functions of every kind a format-2 patch replaces, none prepared. Each result is
//! `base << 4 | version`: the tests edit the `1 // NAME v1` markers, and the host checks the
//! base and reads the version of every call.

/// A free function.
#[inline(never)]
pub fn free(x: u64) -> u64 {
    (x * 3) << 4 | 1 // free v1
}

/// Called through `dyn Shape` and through a generic.
pub trait Shape {
    /// The area.
    fn area(&self) -> u64;
}

/// A square.
pub struct Square(pub u64);

impl Shape for Square {
    #[inline(never)]
    fn area(&self) -> u64 {
        (self.0 * self.0) << 4 | 1 // area v1
    }
}

/// Through a vtable.
#[inline(never)]
pub fn area_dyn(shape: &dyn Shape) -> u64 {
    shape.area()
}

/// Through a generic.
#[inline(never)]
pub fn area_generic<S: Shape>(shape: &S) -> u64 {
    shape.area()
}

/// Generic: instantiated in the caller's crate.
#[inline(never)]
pub fn twice<T: Into<u64> + Copy>(x: T) -> u64 {
    (x.into() * 2) << 4 | 1 // twice v1
}

/// Calls a closure through `dyn Fn`.
#[inline(never)]
pub fn apply_dyn(f: &dyn Fn(u64) -> u64, x: u64) -> u64 {
    f(x)
}

/// Hands a closure of its own to [`apply_dyn`].
#[inline(never)]
pub fn with_closure(x: u64) -> u64 {
    let k = std::hint::black_box(10);
    apply_dyn(&move |v| (v + k) << 4 | 1, x) // closure v1
}

/// Inlined into every caller: it has no code of its own.
#[inline(always)]
fn scale(x: u64) -> u64 {
    x.wrapping_mul(7) << 4 | 1 // scale v1
}

/// Inlines [`scale`].
#[inline(never)]
pub fn scaled(a: u64) -> u64 {
    scale(a)
}

/// Inlines [`scale`] too.
#[inline(never)]
pub fn scaled_xor(a: u64) -> u64 {
    scale(a) ^ (a << 8)
}

/// The handler of the Tokio service (`serve N` on the host): only its tasks call it, on the
/// runtime's workers, which catch a panic in a task. It may panic in every version: a patch
/// that made a function unwind which could not would change its callers' code too (their
/// cleanup paths), the service's async blocks among them.
#[inline(never)]
pub fn handle(x: u64) -> u64 {
    assert!(x != u64::MAX, "handle: no request {x}"); // handle guard v1
    (x + 1) << 4 | 1 // handle v1
}

/// Only for the second patch of a stack.
#[inline(never)]
pub fn other(x: u64) -> u64 {
    (x + 5) << 4 | 1 // other v1
}

// A function whose entry is a loop head: no jump may be written over it.
std::arch::global_asm!(
    ".globl plainlib_loop_entry",
    ".type plainlib_loop_entry,@function",
    "plainlib_loop_entry:",
    "    dec rdi",
    "    jnz plainlib_loop_entry",
    "    lea rax, [rsi + 1]", // loop v1
    "    ret",
    ".size plainlib_loop_entry, .-plainlib_loop_entry",
);

unsafe extern "C" {
    /// Counts `n` down to zero, then returns `r + 1`.
    pub safe fn plainlib_loop_entry(n: u64, r: u64) -> u64;
}
