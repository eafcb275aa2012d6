//! The commands: each asks the agent (or the patch builder) and prints a human or JSON answer.

use crate::flags::{BuildPatch, Cli, Command, SwitchAction};
use crate::outln;
use crate::progress::Progress;
use crate::resolve;
use anyhow::{bail, Context as _, Result};
use evolve_agent::client::Connection;
use evolve_agent::paths;
use evolve_agent::protocol::*;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    let socket = cli.socket.as_deref();
    let call = |pid: u32, request: Request, timeout: Duration| -> Result<Value> {
        let mut c = resolve::connect(pid, socket)?;
        c.call(&request, timeout)
            .with_context(|| format!("{} on process {pid}", request.op()))
    };
    match cli.command {
        Command::Ps { prune } => ps(json, prune),
        Command::Status(t) => {
            let status: Status = typed(call(t.pid, Request::Status, TIMEOUT)?)?;
            print(json, &status, || show_status(&status))
        }
        Command::Functions {
            target: t,
            glob,
            symbols,
        } => {
            let symbols = glob.or(symbols);
            let f: Functions = typed(call(t.pid, Request::Functions { symbols }, TIMEOUT)?)?;
            print(json, &f, || show_functions(&f))
        }
        Command::BuildPatch(options) => build_patch(json, socket, options),
        Command::Keygen(args) => crate::fleet::keygen(json, args),
        Command::Node(args) => crate::fleet::node(args),
        Command::Fleet(args) => crate::fleet::fleet(json, args),
        Command::Apply {
            target,
            patch,
            trial,
            atomic,
            safe_point_timeout,
        } => {
            let path = patch
                .canonicalize()
                .with_context(|| format!("patch {}", patch.display()))?;
            let request = Request::Apply {
                path: path.display().to_string(),
                atomic,
                trial_ms: trial.map(|t| t.as_millis() as u64),
                safe_point_timeout_ms: Some(safe_point_timeout.as_millis() as u64),
            };
            let what = if atomic {
                format!("applying {} (waiting for safe points)", path.display())
            } else {
                format!("applying {}", path.display())
            };
            let progress = Progress::start(&what);
            let result = call(target.pid, request, safe_point_timeout + TIMEOUT);
            drop(progress);
            let applied: Applied = typed(result?)?;
            print(json, &applied, || {
                outln!(
                    "applied {} to process {} in {:.2} ms (verify {:.2}, load {:.2}, switch {:.2}){}{}",
                    applied.patch,
                    target.pid,
                    applied.total_ms,
                    applied.verify_ms,
                    applied.load_ms,
                    applied.switch_ms,
                    if applied.atomic { " (atomically)" } else { "" },
                    applied
                        .trial_ms
                        .map_or_else(String::new, |t| format!(", on trial for {t} ms"))
                );
                outln!("  updated: {}", list(&applied.updated));
                if !applied.added.is_empty() {
                    outln!("  added: {}", list(&applied.added));
                }
                if !applied.adapted.is_empty() {
                    outln!("  through adaptors: {}", list(&applied.adapted));
                }
            })
        }
        Command::Revert {
            target,
            what,
            to_version,
        } => {
            let r: Reverted = typed(call(
                target.pid,
                Request::Revert {
                    target: what,
                    version: to_version,
                },
                TIMEOUT,
            )?)?;
            print(json, &r, || {
                outln!("reverted {}; changed: {}", r.what, list(&r.changed))
            })
        }
        Command::History(t) => {
            let h: History = typed(call(t.pid, Request::History, TIMEOUT)?)?;
            print(json, &h, || show_history(&h))
        }
        Command::Switch {
            target,
            action: SwitchAction::Set { name, value },
        } => {
            let s: SwitchInfo = typed(call(
                target.pid,
                Request::SwitchSet { name, value },
                TIMEOUT,
            )?)?;
            print(json, &s, || {
                outln!(
                    "{} = {} (the code follows at the next `evolve commit`)",
                    s.name,
                    s.value
                )
            })
        }
        Command::Commit { target, name } => {
            let c: Committed = typed(call(target.pid, Request::Commit { switch: name }, TIMEOUT)?)?;
            print(json, &c, || show_committed("committed", &c))
        }
        Command::RevertSwitches { target, name } => {
            let c: Committed = typed(call(
                target.pid,
                Request::RevertSwitches { switch: name },
                TIMEOUT,
            )?)?;
            print(json, &c, || show_committed("reverted to generic code", &c))
        }
        Command::Gc(t) => {
            let progress = Progress::start("reclaiming");
            let result = call(t.pid, Request::Gc, Duration::from_secs(120));
            drop(progress);
            let c: Collected = typed(result?)?;
            print(json, &c, || show_collected(&c))
        }
        Command::Probe { target, action } => {
            let request = crate::probe::request(&action);
            let result = call(target.pid, request, TIMEOUT)?;
            if json {
                outln!("{}", serde_json::to_string(&result)?);
                Ok(())
            } else {
                crate::probe::show(target.pid, &action, &result)
            }
        }
        Command::Attach { target, agent } => crate::attach::attach(json, target.pid, agent),
        Command::Detach { target, revert } => crate::attach::detach(json, target.pid, revert),
        Command::Top {
            target,
            once,
            interval,
        } => {
            let socket = resolve::socket_of(target.pid, socket)?;
            let mut connection = Connection::connect(&socket)?;
            crate::top::run(&mut connection, target.pid, once, interval, json)
        }
    }
}

fn show_collected(c: &Collected) {
    outln!(
        "unloaded: {}; {} patch{} still loaded; threads stopped at most {:.2} ms, {} scanned",
        list(&c.unloaded),
        c.resident,
        if c.resident == 1 { "" } else { "es" },
        c.max_pause_us as f64 / 1000.0,
        bytes(c.bytes_scanned)
    );
    for kept in &c.kept {
        outln!(
            "  kept {}: referenced from {}",
            kept.patch,
            list(&kept.references)
        );
    }
}

/// A byte count for people: `512 B`, `3.4 MiB`.
fn bytes(n: usize) -> String {
    let units = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

fn typed<T: DeserializeOwned>(value: Value) -> Result<T> {
    serde_json::from_value(value).context("the agent's reply does not have the expected shape")
}

fn print<T: serde::Serialize>(json: bool, value: &T, human: impl FnOnce()) -> Result<()> {
    if json {
        outln!("{}", serde_json::to_string(value)?);
    } else {
        human();
    }
    Ok(())
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".into()
    } else {
        items.join(", ")
    }
}

fn ps(json: bool, prune: bool) -> Result<()> {
    let mut live = Vec::new();
    let mut stale = Vec::new();
    for dir in paths::candidate_dirs(None) {
        for found in paths::list_sockets(&dir) {
            let hello = if found.process_gone {
                Err("process gone".to_string())
            } else {
                Connection::connect(&found.path)
                    .map_err(|e| e.to_string())
                    .and_then(|mut c| {
                        c.call(&Request::Hello, Duration::from_secs(3))
                            .map_err(|e| e.to_string())
                    })
            };
            match hello {
                Ok(h) => {
                    let mut h = h;
                    h["socket"] = found.path.display().to_string().into();
                    live.push(h);
                }
                Err(reason) => {
                    // A live process whose agent refuses us is not stale.
                    let is_stale = found.process_gone || reason.contains("Connection refused");
                    if prune && is_stale {
                        std::fs::remove_file(&found.path).with_context(|| {
                            format!("removing stale socket {}", found.path.display())
                        })?;
                    }
                    stale.push(json!({
                        "pid": found.pid,
                        "socket": found.path.display().to_string(),
                        "stale": is_stale,
                        "reason": reason,
                        "removed": prune && is_stale,
                    }));
                }
            }
        }
    }
    let out = json!({"processes": live, "unreachable": stale});
    print(json, &out, || {
        outln!(
            "{:>8}  {:<24} {:>6} {:>8}  {:<8}  SOCKET",
            "PID",
            "PROGRAM",
            "UID",
            "UPTIME",
            "AGENT"
        );
        for p in &live {
            outln!(
                "{:>8}  {:<24} {:>6} {:>7}s  {:<8}  {}",
                p["pid"],
                p["program"].as_str().unwrap_or(""),
                p["uid"],
                p["uptime_s"],
                if p["attached"] == true {
                    "attached"
                } else {
                    "linked"
                },
                p["socket"].as_str().unwrap_or("")
            );
        }
        for s in &stale {
            outln!(
                "{:>8}  (unreachable: {}{}) {}",
                s["pid"],
                s["reason"].as_str().unwrap_or(""),
                if s["removed"] == true {
                    ", removed"
                } else if s["stale"] == true {
                    ", stale: `evolve ps --prune` removes it"
                } else {
                    ""
                },
                s["socket"].as_str().unwrap_or("")
            );
        }
    })
}

fn show_functions(f: &Functions) {
    outln!("hot functions ({}):", f.hot.len());
    for h in &f.hot {
        outln!(
            "  {:<40} v{} {}{}",
            h.name,
            h.current,
            h.versions[h.current],
            if h.versions.len() > 1 {
                format!("  (versions: {})", h.versions.join(" → "))
            } else {
                String::new()
            }
        );
    }
    outln!("multiverse functions ({}):", f.multiverse.len());
    for m in &f.multiverse {
        outln!(
            "  {:<40} {}",
            m.name,
            if m.committed {
                "committed variant"
            } else {
                "generic"
            }
        );
    }
    if !f.symbols.is_empty() {
        outln!(
            "symbols ({}{}):",
            f.symbols.len(),
            if f.symbols_truncated {
                ", truncated"
            } else {
                ""
            }
        );
        for s in &f.symbols {
            outln!(
                "  {:#014x} {:>7} {:<40} {}{}{}",
                s.address,
                s.size,
                s.name,
                s.image,
                s.debug_file
                    .as_deref()
                    .map(|d| format!(" (symbols from {d})"))
                    .unwrap_or_default(),
                if s.versions.len() > 1 {
                    format!("  (versions: {})", s.versions.join(" → "))
                } else {
                    String::new()
                }
            );
        }
    }
}

fn show_status(s: &Status) {
    outln!(
        "process {} ({}), uid {}, agent {} (protocol {}), up {} s",
        s.hello.pid,
        s.hello.program,
        s.hello.uid,
        s.hello.agent,
        s.hello.protocol,
        s.hello.uptime_s
    );
    let patched = s.functions.hot.iter().filter(|h| h.current > 0).count();
    outln!(
        "hot functions: {} ({} patched)",
        s.functions.hot.len(),
        patched
    );
    for h in s.functions.hot.iter().filter(|h| h.current > 0) {
        outln!("  {} at v{} ({})", h.name, h.current, h.versions[h.current]);
    }
    outln!("patches: {}", s.patches.len());
    for p in &s.patches {
        outln!(
            "  {:<20} {} [{}]{}",
            p.name,
            p.path,
            p.functions.join(", "),
            if p.reverted_at.is_some() {
                " (reverted)"
            } else {
                ""
            }
        );
    }
    outln!(
        "reclamation: {}",
        if s.reclamation.available {
            format!("pending [{}]", s.reclamation.pending.join(", "))
        } else {
            s.reclamation.note.clone()
        }
    );
    outln!("switches: {}", s.switches.len());
    for sw in &s.switches {
        outln!("  {} = {} (domain {:?})", sw.name, sw.value, sw.domain);
    }
    let committed = s
        .functions
        .multiverse
        .iter()
        .filter(|m| m.committed)
        .count();
    outln!(
        "multiverse functions: {} ({} committed)",
        s.functions.multiverse.len(),
        committed
    );
    outln!("journal: {} entries", s.journal_entries);
}

fn show_history(h: &History) {
    if h.entries.is_empty() {
        outln!("(no changes yet)");
    }
    for e in &h.entries {
        outln!(
            "{:>4}  {}  uid {:<5} pid {:<7} {:<16} {:<30} {:<6} {}",
            e.seq,
            format_time(e.at_ms),
            e.uid,
            e.client_pid,
            e.op,
            e.target,
            e.outcome,
            e.detail
        );
    }
    if let Some(file) = &h.file {
        outln!("(journal file: {file})");
    }
}

/// `YYYY-MM-DD HH:MM:SS.mmm` UTC.
fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

fn show_committed(what: &str, c: &Committed) {
    outln!("{what}: {} ({} sites written)", list(&c.changed), c.sites);
    for u in &c.unmatched {
        outln!("  no variant for {u}: generic code runs");
    }
}

fn build_patch(json: bool, socket: Option<&Path>, o: BuildPatch) -> Result<()> {
    let base = match (&o.base, o.pid) {
        (Some(path), None) => evolve_builder::Base::Path(path.clone()),
        (None, Some(pid)) => {
            if !Path::new(&format!("/proc/{pid}/exe")).exists() {
                bail!("no process {pid} (or its binary is not readable)");
            }
            evolve_builder::Base::Pid(pid)
        }
        _ => bail!("give exactly one of --base PATH and --pid PID"),
    };
    let format = o.format.unwrap_or(if o.dry_run { 2 } else { 1 });
    if o.dry_run && format == 1 {
        bail!("--dry-run compares the rebuild function by function: it is format 2's");
    }
    if !o.c_source.is_empty() {
        build_c_patch(json, socket, base, o)
    } else if format == 1 {
        build_hot_patch(json, base, o)
    } else {
        build_object_patch(json, socket, base, o)
    }
}

/// The discovered features of `package` for format 1, unless the user gave them.
fn discovered_features(
    o: &BuildPatch,
    base: &evolve_builder::Base,
    package: &str,
) -> (Vec<String>, bool) {
    if !o.features.is_empty() || o.no_default_features {
        return (o.features.clone(), o.no_default_features);
    }
    match evolve_builder::discover_package_features(&o.manifest_path, base, &[], package) {
        Ok(Some(found)) => found,
        _ => (Vec::new(), false),
    }
}

fn build_hot_patch(json: bool, base: evolve_builder::Base, o: BuildPatch) -> Result<()> {
    use evolve_builder::so::{build_patch, BuildOptions};
    let [package] = o.package.as_slice() else {
        bail!("format 1 builds one package's library: give it with -p PACKAGE");
    };
    let package = package.clone();
    let output = o
        .output
        .clone()
        .unwrap_or_else(|| Path::new("target/evolve").join(format!("{package}.so")));
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let (features, no_default_features) = discovered_features(&o, &base, &package);
    let options = BuildOptions {
        manifest_path: o.manifest_path,
        package: package.clone(),
        base,
        output,
        profile: o.profile.unwrap_or_else(|| "release".into()),
        env: Vec::new(),
        features,
        no_default_features,
        built_with: Vec::new(),
    };
    let progress = Progress::start(&format!("building a patch of {package} (cargo)"));
    let result = build_patch(&options);
    drop(progress);
    let report = result.context("building the patch")?;
    let signature = match &o.sign {
        Some(key) => Some(crate::fleet::sign(&report.output, key).context("signing the patch")?),
        None => None,
    };
    let out = json!({
        "output": report.output.display().to_string(),
        "signed_by": signature.as_ref().map(|s| s.key_name.clone()),
        "sha256": signature.as_ref().map(|s| s.sha256.to_string()),
        "functions": report.manifest.functions.iter().map(|f| f.id.clone()).collect::<Vec<_>>(),
        "warnings": report.warnings,
        "compile_seconds": report.compile_seconds,
    });
    print(json, &out, || {
        outln!(
            "built {} ({} hot functions) in {:.1} s",
            report.output.display(),
            report.manifest.functions.len(),
            report.compile_seconds
        );
        if let Some(signature) = &signature {
            outln!(
                "  signed by key {} (sha256:{}): {}",
                signature.key_name,
                signature.sha256.short(),
                evolve_fleet::trust::SignatureFile::path_for(&report.output).display()
            );
        }
        for w in &report.warnings {
            outln!("  warning: {w}");
        }
    })
}

/// The format-2 patches applied to the process, oldest first, as its agent lists them (none
/// when it has no agent: nothing can have been applied to it).
fn applied_patches(pid: u32, socket: Option<&Path>) -> Vec<std::path::PathBuf> {
    let Ok(mut connection) = resolve::connect(pid, socket) else {
        return Vec::new();
    };
    let Ok(value) = connection.call(&Request::Status, TIMEOUT) else {
        return Vec::new();
    };
    let Ok(status) = typed::<Status>(value) else {
        return Vec::new();
    };
    status
        .patches
        .iter()
        .filter(|p| p.reverted_at.is_none())
        .map(|p| std::path::PathBuf::from(&p.path))
        .filter(|p| evolve_builder::read_applied(p).is_ok())
        .collect()
}

fn build_object_patch(
    json: bool,
    socket: Option<&Path>,
    base: evolve_builder::Base,
    o: BuildPatch,
) -> Result<()> {
    let output = o
        .output
        .clone()
        .unwrap_or_else(|| Path::new("target/evolve").join("patch.o"));
    let applied = match (&base, o.applied.is_empty()) {
        (evolve_builder::Base::Pid(pid), true) => applied_patches(*pid, socket),
        _ => o.applied.clone(),
    };
    let mut options = evolve_builder::BuildOptions::new(&o.manifest_path, base, output);
    options.applied = applied;
    options.dry_run = o.dry_run;
    options.crates = o.package.iter().map(|p| p.replace('-', "_")).collect();
    options.overrides = evolve_builder::Overrides {
        profile: o.profile.clone(),
        features: (!o.features.is_empty() || o.no_default_features).then(|| o.features.clone()),
        no_default_features: o.no_default_features,
    };
    let progress = Progress::start("rebuilding the program and comparing it with the running code");
    let result = evolve_builder::build_patch(&options);
    drop(progress);
    let report = result.context("building the patch")?;
    show_object_report(json, o.dry_run, &report)
}

/// `build-patch --c-source`: a format-2 patch from edited C units.
fn build_c_patch(
    json: bool,
    socket: Option<&Path>,
    base: evolve_builder::Base,
    o: BuildPatch,
) -> Result<()> {
    if o.format == Some(1) {
        bail!("a C patch is format 2 (format 1 is for #[evolve::hot] Rust functions)");
    }
    let applied = match (&base, o.applied.is_empty()) {
        (evolve_builder::Base::Pid(pid), true) => applied_patches(*pid, socket),
        _ => o.applied.clone(),
    };
    let sources = o
        .c_source
        .iter()
        .map(|text| match text.split_once('=') {
            Some((original, edited)) => evolve_builder::c::CSource {
                edited: edited.into(),
                original: Some(original.into()),
                unit: None,
            },
            None => evolve_builder::c::CSource {
                edited: text.into(),
                original: None,
                unit: None,
            },
        })
        .collect();
    let options = evolve_builder::c::CBuildOptions {
        base,
        sources,
        compiler: o.cc.clone(),
        cflags: o.cflags.clone(),
        output: o
            .output
            .clone()
            .unwrap_or_else(|| Path::new("target/evolve").join("patch.o")),
        applied,
        dry_run: o.dry_run,
    };
    let progress =
        Progress::start("compiling the C units and comparing them with the running code");
    let result = evolve_builder::c::build_patch(&options);
    drop(progress);
    let report = result.context("building the patch")?;
    show_object_report(json, o.dry_run, &report)
}

fn show_object_report(
    json: bool,
    dry_run: bool,
    report: &evolve_builder::BuildReport,
) -> Result<()> {
    let out = json!({
        "output": report.output.as_ref().map(|p| p.display().to_string()),
        "dry_run": dry_run,
        "carried": report.carried.iter().map(|c| json!({
            "name": c.name,
            "symbol": c.symbol,
            "crate": c.krate,
            "reason": c.reason,
            "replaces": c.replaces,
            "detail": c.detail,
        })).collect::<Vec<_>>(),
        "compared": report.compared,
        "configuration": {
            "profile": report.configuration.profile,
            "package": report.configuration.package,
            "bin": report.configuration.bin,
            "unit": report.configuration.unit,
            "found_by": report.configuration.found_by,
            "features": report.configuration.features,
            "command": report.configuration.command,
        },
        "async_refused": report.manifest.async_refused,
        "warnings": report.warnings,
        "compile_seconds": report.compile_seconds,
        "compare_seconds": report.compare_seconds,
    });
    print(json, &out, || {
        let c = &report.configuration;
        // A C program's units are found in its DWARF, and compiled by gcc, not cargo.
        let c_program = c.found_by == "DW_AT_producer";
        if c_program {
            outln!(
                "program: {} (C units {} found by {})",
                c.bin,
                c.unit,
                c.found_by
            );
        } else {
            outln!(
                "program: {} of {} (profile {}, features [{}]; cargo unit {} found by {})",
                c.bin,
                c.package,
                c.profile,
                c.features.join(", "),
                c.unit,
                c.found_by
            );
        }
        outln!(
            "compared {} functions with the running code ({:.1} s of {}, {:.2} s of comparison)",
            report.compared,
            report.compile_seconds,
            if c_program { "gcc" } else { "cargo" },
            report.compare_seconds
        );
        match &report.output {
            Some(path) => outln!(
                "wrote {} carrying {} functions:",
                path.display(),
                report.carried.len()
            ),
            None => outln!(
                "would carry {} functions (dry run, nothing written):",
                report.carried.len()
            ),
        }
        for c in &report.carried {
            let kind = if c.replaces { "" } else { " (new)" };
            outln!("  {}{kind}: {}", c.name, c.reason);
        }
        for w in &report.warnings {
            outln!("  warning: {w}");
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_utc_civil() {
        assert_eq!(super::format_time(0), "1970-01-01 00:00:00.000Z");
        assert_eq!(
            super::format_time(1_700_000_000_123),
            "2023-11-14 22:13:20.123Z"
        );
    }
}
