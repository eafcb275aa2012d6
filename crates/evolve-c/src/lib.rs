//! Evolve for C programs: `evolve.h`, the shared library `libevolve.so` it declares, and the
//! pkg-config file that builds a program against them.
//!
//! ```sh
//! cargo run --release -p evolve-c --bin install -- --prefix ~/.local
//! PKG_CONFIG_PATH=~/.local/lib/pkgconfig cc $(pkg-config --cflags --libs evolve) prog.c
//! ```
//!
//! A C program gets the agent (`evolve_start()`), safe points, hot functions whose entry has
//! NOP padding the compiler reserved (`EVOLVE_HOT`: zero cost until redirected, no stub), and
//! multiverse without a compiler plugin (`EVOLVE_SWITCH`, `EVOLVE_MULTIVERSE`, the API of the
//! multiverse paper's Table 1). `docs/c.md` documents the API with a complete example, how it
//! works and what it costs.
//!
//! This crate is a thin C face over the Rust layers: [`ffi`] reads what C hands over (the only
//! unsafe code of the crate, at the C ABI boundary), [`module`] registers a module's
//! declarations with hot update ([`evolve_hot::padded`]) and multiverse
//! ([`evolve_multiverse::foreign`]), which do the work on the engine's padded entries
//! ([`evolve_code::padded`]). [`install`] installs the library into a prefix.

mod agent;
pub mod ffi;
pub mod install;
mod module;
mod state;
