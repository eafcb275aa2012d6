//! Misuse of `#[evolve::hot]` is a compile error that says what to do, not a raw compiler error
//! about generated code: the attribute on a single method (it gave "associated static items are
//! not allowed"), and the forms it refuses (const and generic functions, trait impls, arguments other than `local`).
//!
//! The expected messages are in `tests/ui/*.stderr` (`TRYBUILD=overwrite` rewrites them after a
//! deliberate change of a message or of the toolchain).
#[test]
fn hot_misuse_is_a_clear_compile_error() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
