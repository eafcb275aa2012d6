//! Misuse of the macros is a compile error that says what is wrong: the variant limit, the
//! shapes a multiverse function or a switch may not have, values outside a domain, and
//! function-pointer switches of unsupported types or given functions of another type, and a
//! state transfer (`#[evolve::transfer]`) to a static without interior mutability.
//!
//! The expected messages are in `tests/ui/*.stderr` (`TRYBUILD=overwrite` rewrites them after a
//! deliberate change of a message or of the toolchain).
#[test]
fn macro_misuse_is_a_clear_compile_error() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
