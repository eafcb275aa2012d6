//! Runs the multiverse scenarios until `main.rs` wires them: `multiverse_scenarios <name> [args]`.
#[path = "../src/multiverse_commit.rs"]
mod multiverse_commit;
#[path = "../src/multiverse_lock_elision.rs"]
mod multiverse_lock_elision;
#[path = "../src/multiverse_spinlock.rs"]
mod multiverse_spinlock;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = &args[1.min(args.len())..];
    let out = match args.first().map(String::as_str) {
        Some("multiverse-spinlock") => multiverse_spinlock::run(rest),
        Some("multiverse-lock-elision") => multiverse_lock_elision::run(rest),
        Some("multiverse-commit") => multiverse_commit::run(rest),
        _ => panic!("scenario: multiverse-spinlock | multiverse-lock-elision | multiverse-commit"),
    };
    println!("{out}");
}
