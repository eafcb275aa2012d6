//! `cargo run -p evolve-c --bin install -- --prefix DIR`: installs evolve.h, libevolve.so and
//! evolve.pc into DIR (see `docs/c.md`).

use clap::Parser;
use std::path::PathBuf;

/// Installs Evolve's C library into a prefix.
#[derive(Parser)]
#[command(about = "Install evolve.h, libevolve.so and evolve.pc into a prefix")]
struct Args {
    /// Where to install: PREFIX/include, PREFIX/lib, PREFIX/lib/pkgconfig.
    #[arg(long)]
    prefix: PathBuf,
    /// The shared library to install (default: the one cargo built with this installer).
    #[arg(long)]
    library: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    let result = args
        .library
        .map(Ok)
        .unwrap_or_else(evolve_c::install::built_library)
        .and_then(|library| evolve_c::install::install(&args.prefix, &library));
    match result {
        Ok(installed) => {
            println!("installed {}", installed.header.display());
            println!("installed {}", installed.library.display());
            println!(
                "installed {}",
                installed.pkgconfig_dir.join("evolve.pc").display()
            );
            println!(
                "build a program with:\n  PKG_CONFIG_PATH={} cc $(pkg-config --cflags --libs evolve) prog.c",
                installed.pkgconfig_dir.display()
            );
        }
        Err(e) => {
            eprintln!("install: {e}");
            std::process::exit(1);
        }
    }
}
