//! Phase one: what the user typed, parsed and validated without looking at the world (no
//! processes, sockets or files are touched here).

use clap::{Args, Parser, Subcommand};
use evolve_agent::protocol::WhenExpr;
use std::path::PathBuf;
use std::time::Duration;

/// Change running programs without restarting them.
///
/// Talks to the agent of evolve-enabled processes (a program that called
/// `evolve::agent::start()`) over its Unix socket.
#[derive(Debug, Parser)]
#[command(name = "evolve", version, propagate_version = true)]
pub struct Cli {
    /// Print machine-readable JSON on stdout (errors too, as {"ok":false,"error":...}).
    #[arg(long, global = true)]
    pub json: bool,
    /// Talk to the agent on this socket instead of finding it by pid.
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
// Parsed once per run: the size of the largest variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List evolve-enabled processes (and stale sockets of dead ones).
    Ps {
        /// Remove the sockets of processes that are gone.
        #[arg(long)]
        prune: bool,
    },
    /// Versions, patches, pending reclamation and switch values of a process.
    Status(Target),
    /// Hot and multiverse functions of a process with their current versions, and with
    /// --symbols its function symbols (of the executable and its libraries, from .symtab,
    /// .dynsym, or a separate debug file found by build id under /usr/lib/debug).
    Functions {
        #[command(flatten)]
        target: Target,
        /// List every function symbol matching this glob (e.g. 'handle_*', '*' for all), hot
        /// or not, each with its versions (the program's, then each patch that replaced it).
        #[arg(value_name = "GLOB", conflicts_with = "symbols")]
        glob: Option<String>,
        /// The same as GLOB, as an option.
        #[arg(long, value_name = "GLOB")]
        symbols: Option<String>,
    },
    /// Build a patch from the edited source of a running program (see --format, --dry-run).
    BuildPatch(BuildPatch),
    /// Apply a patch to a running process.
    Apply {
        #[command(flatten)]
        target: Target,
        /// The patch file (from `evolve build-patch`).
        patch: PathBuf,
        /// Revert automatically if the patch's code panics within this time (e.g. 30s, 500ms).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        trial: Option<Duration>,
        /// Switch all the patch's functions at once, with threads held at safe points.
        #[arg(long)]
        atomic: bool,
        /// How long to wait for threads to reach safe points (with --atomic).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "5s")]
        safe_point_timeout: Duration,
    },
    /// Revert a patch, a function, or (with neither) the last patch.
    Revert {
        #[command(flatten)]
        target: Target,
        /// A patch name (see `history`/`status`) or a hot function name.
        what: Option<String>,
        /// For a function: the version to return to (default: the previous one).
        #[arg(long, requires = "what")]
        to_version: Option<usize>,
    },
    /// The journal of a process: what was applied, reverted, committed, when, by whom.
    History(Target),
    /// Multiverse switches.
    Switch {
        #[command(flatten)]
        target: Target,
        /// The switch operation.
        #[command(subcommand)]
        action: SwitchAction,
    },
    /// Commit switches: specialise the code for their current values (one switch, or all).
    Commit {
        #[command(flatten)]
        target: Target,
        /// The switch whose functions to commit (default: every multiversed function).
        name: Option<String>,
    },
    /// Restore the generic code of multiversed functions (one switch's, or all).
    RevertSwitches {
        #[command(flatten)]
        target: Target,
        /// The switch whose functions to revert (default: all).
        name: Option<String>,
    },
    /// Reclaim patches that nothing can reach any more.
    Gc(Target),
    /// Probes: count calls, time, histogram an argument, watch a predicate, or record coverage
    /// of any function of a live process; removing them restores the code exactly.
    Probe {
        #[command(flatten)]
        target: Target,
        /// The probe operation.
        #[command(subcommand)]
        action: ProbeAction,
    },
    /// Load the agent into a running process that never linked Evolve (Rust, C, C++; through
    /// ptrace: one thread is borrowed for well under a millisecond), or reuse the one it runs.
    Attach {
        #[command(flatten)]
        target: Target,
        /// The agent shared object (default: libevolve_attach_agent.so next to this binary).
        #[arg(long, value_name = "PATH")]
        agent: Option<PathBuf>,
    },
    /// Remove every probe from an attached process and stop its agent.
    Detach {
        #[command(flatten)]
        target: Target,
        /// Revert applied patches instead of refusing to detach.
        #[arg(long)]
        revert: bool,
    },
    /// Make an ed25519 signing key pair for patches (NAME.key, NAME.pub).
    Keygen(crate::fleet::KeygenArgs),
    /// The fleet's node daemon: registers this machine in etcd and applies the rollouts that
    /// select its processes.
    Node(crate::fleet::NodeArgs),
    /// Fleet rollouts on etcd: rollout, status, pause, resume, abort, history, controller.
    Fleet(crate::fleet::FleetArgs),
    /// A live view of a process's functions, versions, call counts and probes (q to quit).
    Top {
        #[command(flatten)]
        target: Target,
        /// Print one frame and exit (no terminal needed); with --json, the status with a
        /// `probes` field holding every probe's reading.
        #[arg(long)]
        once: bool,
        /// Refresh interval.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "1s")]
        interval: Duration,
    },
}

/// The process a command addresses.
#[derive(Debug, Args)]
pub struct Target {
    /// The process id.
    pub pid: u32,
}

/// Switch operations.
#[derive(Debug, Subcommand)]
pub enum SwitchAction {
    /// Set a switch's value (the code follows at the next `commit`).
    Set {
        /// The switch's declared name.
        name: String,
        /// `true`, `false` or an integer in its domain.
        value: String,
    },
}

/// Probe operations.
#[derive(Debug, Subcommand)]
pub enum ProbeAction {
    /// Attach a probe to every function matching PATTERN.
    #[command(
        after_help = "EXPR (for --when): argN OP VALUE, where N is 0-5 (the integer \
        arguments rdi, rsi, rdx, rcx, r8, r9), OP one of == != < <= > >= (unsigned 64-bit) and \
        VALUE a decimal or 0x-hex integer (true/false for 1/0; a negative value with == and != \
        only, as its two's complement). Examples: 'arg0 == 0', 'arg1 > 100', 'arg2 != 0x10'."
    )]
    Add {
        /// An exact symbol name (a demangled Rust path like `my_crate::handle` or a C name) or
        /// a glob (`*`, `?`) over them, e.g. 'my_crate::handlers::*'.
        pattern: String,
        /// What the probe records.
        #[command(flatten)]
        kind: KindFlags,
    },
    /// List the probes of the process.
    List,
    /// Remove probes: one by id, those added with (or whose function matches) a pattern, or all.
    /// The last probe of a function restores its bytes exactly.
    Rm {
        /// A probe id (from `list`), or a pattern (the one given to `add`, or a glob over the
        /// probed functions' names).
        #[arg(required_unless_present = "all")]
        what: Option<String>,
        /// Remove every probe.
        #[arg(long, conflicts_with = "what")]
        all: bool,
    },
    /// What the probes recorded: counts, latency (mean, p50, p99), histograms, predicate hits
    /// with the first backtrace, coverage.
    Read {
        /// One probe's id (default: every probe).
        id: Option<u64>,
    },
}

/// The kind of probe `add` attaches (exactly one).
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct KindFlags {
    /// Count calls.
    #[arg(long)]
    pub count: bool,
    /// Time calls, entry to exit (mean, p50, p99, max).
    #[arg(long)]
    pub latency: bool,
    /// Log2 histogram of integer argument ARG (0-5, or arg0-arg5).
    #[arg(long, value_name = "ARG", value_parser = parse_arg)]
    pub hist: Option<usize>,
    /// Count calls where EXPR holds (e.g. 'arg0 == 0', 'arg1 > 100') and keep the first
    /// backtraces.
    #[arg(long, value_name = "EXPR", value_parser = parse_when)]
    pub when: Option<WhenExpr>,
    /// Record whether the function runs at all (the probe detaches itself after the first
    /// call).
    #[arg(long)]
    pub coverage: bool,
}

/// Parses an argument index: `1` or `arg1`, 0-5.
pub fn parse_arg(text: &str) -> Result<usize, String> {
    let t = text.trim();
    t.strip_prefix("arg")
        .unwrap_or(t)
        .parse::<usize>()
        .ok()
        .filter(|&n| n < 6)
        .ok_or_else(|| {
            format!("{text:?} is not an argument: 0-5 or arg0-arg5 (rdi, rsi, rdx, rcx, r8, r9)")
        })
}

/// Parses a `--when` expression (see [`WhenExpr`]).
pub fn parse_when(text: &str) -> Result<WhenExpr, String> {
    text.parse()
}

/// `build-patch` options.
///
/// The build configuration (profile, features of the program and of the workspace crates it
/// links) is discovered from the program and its cargo target directory; the flags below
/// override it.
#[derive(Debug, Args)]
pub struct BuildPatch {
    /// The program workspace's Cargo.toml (the one it was built from).
    #[arg(long, default_value = "Cargo.toml")]
    pub manifest_path: PathBuf,
    /// Format 1: the package whose library holds the changed `#[evolve::hot]` functions.
    /// Format 2: only compare this package's crate (repeatable; default: every workspace crate
    /// the program links, and its binary crate).
    #[arg(long, short)]
    pub package: Vec<String>,
    /// The program's binary.
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "pid",
        required_unless_present = "pid"
    )]
    pub base: Option<PathBuf>,
    /// The running process (its binary through /proc/PID/exe).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Where to write the patch (default: target/evolve/<package>.so, or
    /// target/evolve/patch.o for format 2).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// The patch format: 1, a shared object of `#[evolve::hot]` functions (what `evolve apply`
    /// loads today); 2, a relocatable object carrying exactly the changed functions, any
    /// function (the default with --dry-run).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=2))]
    pub format: Option<u32>,
    /// List the functions the patch would carry, each with why, and write nothing (format 2).
    #[arg(long)]
    pub dry_run: bool,
    /// Format 2: a patch applied to the process, whose functions are the current versions to
    /// compare with (repeatable, oldest first; default: asked of the process's agent).
    #[arg(long, value_name = "PATCH")]
    pub applied: Vec<PathBuf>,
    /// The cargo profile the program was built with (default: discovered).
    #[arg(long)]
    pub profile: Option<String>,
    /// The features the program's build enabled, comma-separated like cargo's (default:
    /// discovered).
    #[arg(long, short = 'F', value_delimiter = ',')]
    pub features: Vec<String>,
    /// The program's build had no default features (default: discovered).
    #[arg(long)]
    pub no_default_features: bool,
    /// A C program: an edited translation unit, `EDITED` or `ORIGINAL=EDITED` (repeatable).
    /// Its compiler flags are read from the program's DWARF (`DW_AT_producer`); with the
    /// original, the builder first checks that they reproduce the running code. Format 2.
    #[arg(long, value_name = "[ORIGINAL=]EDITED")]
    pub c_source: Vec<String>,
    /// The C compiler (default: gcc; it must be the version that built the program).
    #[arg(long, value_name = "COMPILER", requires = "c_source")]
    pub cc: Option<String>,
    /// C flags gcc does not record in DWARF (`-DHAVE_CONFIG_H -I.`), space-separated.
    #[arg(
        long,
        value_name = "FLAGS",
        requires = "c_source",
        allow_hyphen_values = true,
        value_delimiter = ' '
    )]
    pub cflags: Vec<String>,
    /// Sign the patch with this secret key (from `evolve keygen`): writes PATCH.sig.
    #[arg(long, value_name = "KEY")]
    pub sign: Option<PathBuf>,
}

/// Parses `500ms`, `30s`, `2m`, `1h`, or a number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 30s, 500ms, 2m)"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if !seconds.is_finite() || seconds <= 0.0 || seconds > 86_400.0 * 365.0 {
        return Err(format!("{text:?}: out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("3d").is_err());
    }

    #[test]
    fn probe_arguments() {
        assert_eq!(parse_arg("arg2"), Ok(2));
        assert_eq!(parse_arg("0"), Ok(0));
        assert!(parse_arg("6").is_err());
        assert!(parse_arg("rsi").is_err());
        assert_eq!(parse_when("arg0==0").unwrap().to_string(), "arg0 == 0");
        let e = parse_when("arg0 ~ 1").unwrap_err();
        assert!(e.contains("argN OP VALUE"), "{e}");
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
