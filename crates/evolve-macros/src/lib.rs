//! Evolve's procedural macros; use them through the `evolve` facade.
//!
//! - `#[evolve::switch]` declares a configuration switch (see `evolve::multiverse::Switch`), or
//!   on a function pointer static a function-pointer switch (`evolve::multiverse::FnSwitch`);
//! - `#[evolve::multiverse(SWITCHES...)]` generates a function's generic body and its variants;
//! - `#[derive(evolve::SwitchValue)]` makes a fieldless enum's variants a switch domain.
//!
//! Generated code names the runtime as `::evolve::multiverse`, so the crate using the macros
//! depends on `evolve`.
#![forbid(unsafe_code)]

use proc_macro::TokenStream;

mod fnswitch;
mod multiverse;
mod switch;

/// Declares a configuration switch: `#[evolve::switch] static NAME: T = value;`.
///
/// `T` is `bool`, an enum deriving `SwitchValue`, or an integer with a declared domain:
/// `#[evolve::switch(in 0..=3)]` or `#[evolve::switch(in [1, 4, 16])]`. The static becomes an
/// `evolve::multiverse::Switch<T>`, read with `.get()` and written with `.set(v)`.
///
/// A static of a function pointer type (`static HASH: fn(&[u8]) -> u64 = fnv;`) becomes a
/// function-pointer switch (`evolve::multiverse::FnSwitch`): `HASH.call(data)` calls its
/// function, and commit turns those calls into direct calls of the current one. The optional
/// `in [f, g]` names the functions control tools may select.
#[proc_macro_attribute]
pub fn switch(attr: TokenStream, item: TokenStream) -> TokenStream {
    switch::expand(attr.into(), item.into())
        .unwrap_or_else(|e| e.to_compile_error())
        .into()
}

/// Multiverses a function over switches: `#[evolve::multiverse(A, B = [v1, v2])]`.
///
/// Generates the generic body (switch reads `S.get()` at run time) and one variant per
/// assignment of the listed switches, in which each read is a constant. `B = [..]` binds `B`
/// only for the listed values (partial specialisation). The function's name then denotes an
/// `extern "C-unwind"` function pointer constant whose entry `evolve::multiverse::commit`
/// rewires.
#[proc_macro_attribute]
pub fn multiverse(attr: TokenStream, item: TokenStream) -> TokenStream {
    multiverse::expand(attr.into(), item.into())
        .unwrap_or_else(|e| e.to_compile_error())
        .into()
}

/// Implements `evolve::multiverse::SwitchValue` for a fieldless enum: its variants are the
/// domain.
#[proc_macro_derive(SwitchValue)]
pub fn derive_switch_value(item: TokenStream) -> TokenStream {
    switch::derive(item.into())
        .unwrap_or_else(|e| e.to_compile_error())
        .into()
}
