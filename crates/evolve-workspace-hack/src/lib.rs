//! Nothing to use: this crate only asks for dependency features (see its `Cargo.toml`), so that
//! every build of Evolve's crates — the workspace's tests, a program that links the engine, a
//! patch build — resolves them alike and compiles each dependency once.
#![forbid(unsafe_code)]
