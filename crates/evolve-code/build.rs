//! Builds the static-TLS object an attached agent loads (`src/thread_state/static_tls.s`, see
//! `src/thread_state.rs`). Without a C compiler driver the object is empty and an attached
//! agent uses the crate's ordinary (dynamic) thread-locals: slower probes, nothing else lost.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "src/thread_state/static_tls.s";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=CC");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("libevolve_static_tls.so");
    // The same driver rustc links with on Linux.
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let built = Command::new(&cc)
        .args([
            "-shared",
            "-nostdlib",
            "-Wl,-z,now",
            "-Wl,-z,noexecstack",
            "-o",
        ])
        .arg(&object)
        .arg(source)
        .status();
    match built {
        Ok(status) if status.success() => {}
        outcome => {
            println!(
                "cargo:warning=linking {source} with {cc} failed ({outcome:?}): attached agents \
                 will use dynamic TLS (the probes' slow path)"
            );
            std::fs::write(&object, []).expect("OUT_DIR is writable");
        }
    }
}
