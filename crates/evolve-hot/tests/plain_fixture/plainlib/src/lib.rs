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

/// The version of the [`MANY`] functions (the stress test's patches change it: each patch
/// replaces all 100).
const MANY_VERSION: u64 = 1; // many v1

macro_rules! many {
    ($($name:ident $n:literal),*) => {
        $(
            /// One of the stress test's functions: `(x + N + 1000) << 4 | MANY_VERSION` (distinct from every other function: none is folded into another).
            #[inline(never)]
            pub fn $name(x: u64) -> u64 {
                (x + $n + 1000) << 4 | MANY_VERSION
            }
        )*
        /// The 100 functions, by `N`.
        pub const MANY: &[fn(u64) -> u64] = &[$($name),*];
    };
}

many!(many_0 0, many_1 1, many_2 2, many_3 3, many_4 4, many_5 5, many_6 6, many_7 7, many_8 8, many_9 9, many_10 10, many_11 11, many_12 12, many_13 13, many_14 14, many_15 15, many_16 16, many_17 17, many_18 18, many_19 19, many_20 20, many_21 21, many_22 22, many_23 23, many_24 24, many_25 25, many_26 26, many_27 27, many_28 28, many_29 29, many_30 30, many_31 31, many_32 32, many_33 33, many_34 34, many_35 35, many_36 36, many_37 37, many_38 38, many_39 39, many_40 40, many_41 41, many_42 42, many_43 43, many_44 44, many_45 45, many_46 46, many_47 47, many_48 48, many_49 49, many_50 50, many_51 51, many_52 52, many_53 53, many_54 54, many_55 55, many_56 56, many_57 57, many_58 58, many_59 59, many_60 60, many_61 61, many_62 62, many_63 63, many_64 64, many_65 65, many_66 66, many_67 67, many_68 68, many_69 69, many_70 70, many_71 71, many_72 72, many_73 73, many_74 74, many_75 75, many_76 76, many_77 77, many_78 78, many_79 79, many_80 80, many_81 81, many_82 82, many_83 83, many_84 84, many_85 85, many_86 86, many_87 87, many_88 88, many_89 89, many_90 90, many_91 91, many_92 92, many_93 93, many_94 94, many_95 95, many_96 96, many_97 97, many_98 98, many_99 99);

/// Calls the `x % 100`th of [`MANY`] directly (a call site the patches retarget).
#[inline(never)]
pub fn call_many(x: u64) -> u64 {
    macro_rules! dispatch {
        ($($name:ident $n:literal),*) => {
            match x % 100 {
                $($n => $name(x),)*
                _ => unreachable!(),
            }
        };
    }
    dispatch!(many_0 0, many_1 1, many_2 2, many_3 3, many_4 4, many_5 5, many_6 6, many_7 7, many_8 8, many_9 9, many_10 10, many_11 11, many_12 12, many_13 13, many_14 14, many_15 15, many_16 16, many_17 17, many_18 18, many_19 19, many_20 20, many_21 21, many_22 22, many_23 23, many_24 24, many_25 25, many_26 26, many_27 27, many_28 28, many_29 29, many_30 30, many_31 31, many_32 32, many_33 33, many_34 34, many_35 35, many_36 36, many_37 37, many_38 38, many_39 39, many_40 40, many_41 41, many_42 42, many_43 43, many_44 44, many_45 45, many_46 46, many_47 47, many_48 48, many_49 49, many_50 50, many_51 51, many_52 52, many_53 53, many_54 54, many_55 55, many_56 56, many_57 57, many_58 58, many_59 59, many_60 60, many_61 61, many_62 62, many_63 63, many_64 64, many_65 65, many_66 66, many_67 67, many_68 68, many_69 69, many_70 70, many_71 71, many_72 72, many_73 73, many_74 74, many_75 75, many_76 76, many_77 77, many_78 78, many_79 79, many_80 80, many_81 81, many_82 82, many_83 83, many_84 84, many_85 85, many_86 86, many_87 87, many_88 88, many_89 89, many_90 90, many_91 91, many_92 92, many_93 93, many_94 94, many_95 95, many_96 96, many_97 97, many_98 98, many_99 99)
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
