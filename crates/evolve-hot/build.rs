//! Records the toolchain this crate (and so the host program) is compiled with: a patch must be
//! built with the same one.
fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = std::process::Command::new(rustc)
        .arg("-V")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    println!("cargo:rustc-env=EVOLVE_HOST_TOOLCHAIN={}", version.trim());
    println!("cargo:rerun-if-env-changed=RUSTC");
}
