//! The shared library's soname: C programs record `libevolve.so.0` (the installer puts the
//! library there, with `libevolve.so` pointing at it for the linker).
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libevolve.so.0");
}
