//! One `#[evolve::hot]` function for `evolve-bench reclaim`: the scenario patches it a thousand
//! times in a row and checks that old patches are unloaded.
//!
//! `work(x)` returns `x * 10 + VARIANT`, where `VARIANT` is 1, or 2 when the crate is compiled
//! with `EVOLVE_BENCH_RECLAIM_VARIANT` set (how the scenario builds its patch from this same
//! source, keeping the symbol hashes).

/// 1 for the program, 2 for the patch.
pub const VARIANT: u64 = match option_env!("EVOLVE_BENCH_RECLAIM_VARIANT") {
    Some(_) => 2,
    None => 1,
};

/// The patched function.
#[evolve::hot]
pub fn work(x: u64) -> u64 {
    x * 10 + VARIANT
}
