//! Present so that the `[build-dependencies]` (the proc macros' `syn` features) take part in
//! feature resolution; it does nothing.
fn main() {}
