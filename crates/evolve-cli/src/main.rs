//! `evolve`: inspect, patch and switch evolve-enabled processes.
//!
//! Arguments are handled in two phases: [`flags`] parses and validates what was typed; the
//! commands then resolve the world ([`resolve`]: pids to agent sockets, patch paths) and talk to
//! the agent. Exit status: 0 on success, 1 when the operation failed or was refused (the cause on
//! stderr), 2 for a usage error.

mod commands;
mod flags;
mod fleet;
mod probe;
mod progress;
mod resolve;
mod top;

use clap::Parser;

fn main() {
    let cli = flags::Cli::parse();
    let json = cli.json;
    match commands::run(cli) {
        Ok(()) => {}
        Err(error) => {
            if json {
                let value = serde_json::json!({"ok": false, "error": format!("{error:#}")});
                println!("{value}");
            }
            eprintln!("evolve: error: {error:#}");
            std::process::exit(1);
        }
    }
}
