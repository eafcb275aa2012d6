//! Build-script helper for programs that accept Evolve hot updates.
//!
//! A thin patch binds to the running program's copies of everything it does not change (std,
//! dependencies, statics), so the program must export its symbols to the dynamic loader. Add
//! `evolve-build` to `[build-dependencies]` and one line to `build.rs`:
//!
//! ```text
//! // build.rs
//! fn main() {
//!     evolve_build::host();
//! }
//! ```
#![forbid(unsafe_code)]

/// Links this package's binaries, tests and examples with `-Wl,--export-dynamic`, so patches can
/// bind to them, and tells the builder which profile settings matter.
pub fn host() {
    println!("cargo:rustc-link-arg=-Wl,--export-dynamic");
}
