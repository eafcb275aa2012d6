//! Evolve's benchmark scenarios and demos.
//!
//! Each scenario prints one JSON object per run and compares Evolve with the baseline it must
//! beat, measured in the same run, as a ratio of medians of repeated runs. `demo` shows the
//! engine at work.

mod demo;
mod patch_sites;
mod stats;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Evolve's benchmark scenarios and demos (each prints JSON)")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Threads call through live patch sites while they are retargeted thousands of times.
    Demo(demo::Args),
    /// Retarget N sites as one batch (and back), against one batch per site.
    PatchSites {
        #[command(flatten)]
        args: patch_sites::Args,
        /// Accepted for uniformity: the output is always JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.scenario {
        Scenario::Demo(args) => demo::run(args).map(|record| {
            if args.json {
                println!("{record}");
            } else {
                demo::print_table(&record);
            }
            record
        }),
        Scenario::PatchSites { args, .. } => patch_sites::run(args).inspect(|r| println!("{r}")),
    };
    match result {
        Ok(record) if record.get("errors").and_then(|e| e.as_u64()).unwrap_or(0) > 0 => {
            eprintln!("evolve-bench: errors observed");
            std::process::exit(1);
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("evolve-bench: {e}");
            std::process::exit(2);
        }
    }
}
