//! Exports the server's symbols to patches in the evolve build.
fn main() {
    // Export the server's symbols so patches bind to its copies (only in the evolve build: the
    // plain build is the benchmark's baseline and must not pay for it).
    if std::env::var_os("CARGO_FEATURE_EVOLVE").is_some() {
        evolve_build::host();
    }
}
