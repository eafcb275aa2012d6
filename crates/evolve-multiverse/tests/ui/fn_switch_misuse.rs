fn a(_: &u8) {}

#[evolve::switch]
static NOT_SAFE: unsafe fn(&u8) = a;

#[evolve::switch]
static HIGHER_RANKED: for<'a> fn(&'a u8) = a;

#[evolve::switch]
static VARIADIC: extern "C" fn(u8, ...) = b;

fn main() {}
