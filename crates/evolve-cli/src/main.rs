//! `evolve`: inspect, patch and switch evolve-enabled processes.
//!
//! Arguments are handled in two phases: [`flags`] parses and validates what was typed; the
//! commands then resolve the world ([`resolve`]: pids to agent sockets, patch paths) and talk to
//! the agent. Exit status: 0 on success, 1 when the operation failed or was refused (the cause on
//! stderr), 2 for a usage error.
#![forbid(unsafe_code)]

mod attach;
mod commands;
mod flags;
mod probe;
mod progress;
mod resolve;
mod top;

use clap::Parser;

/// `println!` for the command's output, which may go to a pipe that closes early
/// (`evolve history PID | head -1`): a closed pipe ends the command quietly with status 0, as
/// `cat` and `grep` do, instead of panicking; any other write error is reported.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(error) = writeln!(std::io::stdout(), $($arg)*) {
            $crate::output_failed(error);
        }
    }};
}
pub(crate) use outln;

/// Ends the process after a failed write of its output (see [`outln`]).
fn output_failed(error: std::io::Error) -> ! {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("evolve: error: writing the output: {error}");
    std::process::exit(1);
}

fn main() {
    let cli = flags::Cli::parse();
    let json = cli.json;
    match commands::run(cli) {
        Ok(()) => {}
        Err(error) => {
            if json {
                let value = serde_json::json!({"ok": false, "error": format!("{error:#}")});
                outln!("{value}");
            }
            eprintln!("evolve: error: {error:#}");
            std::process::exit(1);
        }
    }
}
