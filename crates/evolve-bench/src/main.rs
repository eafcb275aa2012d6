//! Evolve's benchmark scenarios and demos.
fn main() {}
