//! Exports the server's symbols so that patches bind to its copies.
fn main() {
    evolve_build::host();
}
