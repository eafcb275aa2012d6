//! `evolve probe PID add|list|rm|read`: the requests and their human output.

use crate::flags::{KindFlags, ProbeAction};
use crate::outln;
use anyhow::{Context as _, Result};
use evolve_agent::protocol::{
    ProbeEntry, ProbeKindName, ProbeList, ProbeReadings, ProbeReport, Request,
};

/// The request for a probe action.
pub fn request(action: &ProbeAction) -> Request {
    match action {
        ProbeAction::Add { pattern, kind } => {
            let (name, arg, expr) = kind_request(kind);
            Request::ProbeAdd {
                pattern: pattern.clone(),
                kind: name,
                arg,
                expr,
            }
        }
        ProbeAction::List => Request::ProbeList,
        ProbeAction::Rm { what, all } => match what {
            // A probe id is a number; function names never are.
            Some(w) => match w.parse::<u64>() {
                Ok(id) => Request::ProbeRm {
                    probe: Some(id),
                    pattern: None,
                    all: false,
                },
                Err(_) => Request::ProbeRm {
                    probe: None,
                    pattern: Some(w.clone()),
                    all: false,
                },
            },
            None => Request::ProbeRm {
                probe: None,
                pattern: None,
                all: *all,
            },
        },
        ProbeAction::Read { id } => Request::ProbeRead { probe: *id },
    }
}

fn kind_request(k: &KindFlags) -> (ProbeKindName, Option<usize>, Option<String>) {
    if let Some(arg) = k.hist {
        (ProbeKindName::Hist, Some(arg), None)
    } else if let Some(e) = &k.when {
        (ProbeKindName::When, None, Some(e.to_string()))
    } else if k.latency {
        (ProbeKindName::Latency, None, None)
    } else if k.coverage {
        (ProbeKindName::Coverage, None, None)
    } else {
        (ProbeKindName::Count, None, None)
    }
}

/// Prints the agent's answer to `action` for a person.
pub fn show(pid: u32, action: &ProbeAction, result: &serde_json::Value) -> Result<()> {
    let shape = "the agent's reply does not have the expected shape";
    match action {
        ProbeAction::Add { .. } => {
            let list: ProbeList = serde_json::from_value(result.clone()).context(shape)?;
            for p in &list.probes {
                outln!(
                    "added probe {}: {} on {} ({:#x})",
                    p.id,
                    p.kind,
                    p.function,
                    p.address
                );
            }
            if let [p] = list.probes.as_slice() {
                outln!("  read it: evolve probe {pid} read {}", p.id);
            } else {
                outln!("  read them: evolve probe {pid} read");
            }
        }
        ProbeAction::List => {
            let list: ProbeList = serde_json::from_value(result.clone()).context(shape)?;
            show_list(&list.probes);
        }
        ProbeAction::Rm { .. } => {
            let list: ProbeList = serde_json::from_value(result.clone()).context(shape)?;
            if list.probes.is_empty() {
                outln!("no probes to remove");
            }
            for p in &list.probes {
                outln!("removed probe {}: {} on {}", p.id, p.kind, p.function);
            }
        }
        ProbeAction::Read { .. } => {
            let r: ProbeReadings = serde_json::from_value(result.clone()).context(shape)?;
            if r.readings.is_empty() {
                outln!("(no probes; add one with `evolve probe {pid} add PATTERN --count`)");
            }
            for (i, reading) in r.readings.iter().enumerate() {
                if i > 0 {
                    outln!();
                }
                show_reading(reading, r.at_ms);
            }
        }
    }
    Ok(())
}

fn show_list(probes: &[ProbeEntry]) {
    if probes.is_empty() {
        outln!("(no probes)");
        return;
    }
    outln!(
        "{:>4}  {:<22} {:<9} {:<40} PATTERN",
        "ID",
        "KIND",
        "ATTACHED",
        "FUNCTION"
    );
    for p in probes {
        outln!(
            "{:>4}  {:<22} {:<9} {:<40} {}",
            p.id,
            p.kind,
            if p.attached { "yes" } else { "no" },
            p.function,
            p.pattern.as_deref().unwrap_or("(added by the program)")
        );
    }
}

/// `850 ns`, `1.52 µs`, `3.40 ms`, `1.20 s`.
pub fn format_ns(ns: f64) -> String {
    if ns < 1_000.0 {
        format!("{ns:.0} ns")
    } else if ns < 1_000_000.0 {
        format!("{:.2} µs", ns / 1e3)
    } else if ns < 1_000_000_000.0 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

/// Calls per second since the probe was added (none if unknown or too recent to say).
pub fn rate(r: &ProbeReport, at_ms: u64) -> Option<f64> {
    let age_ms = at_ms.saturating_sub(r.probe.added_at_ms?);
    (age_ms >= 100).then(|| r.calls as f64 * 1000.0 / age_ms as f64)
}

fn bar(count: u64, max: u64) -> String {
    const WIDTH: u64 = 30;
    let n = if max == 0 {
        0
    } else {
        (count * WIDTH).div_ceil(max)
    };
    "█".repeat(n as usize)
}

/// A log2 bucket's range: `0`, `1`, `[2, 4)`, … (`show` formats the bounds).
fn bucket_label(low: u64, show: impl Fn(u64) -> String) -> String {
    match low {
        0 => show(0),
        1 => show(1),
        _ => format!("[{}, {})", show(low), show(low.saturating_mul(2))),
    }
}

fn show_reading(r: &ProbeReport, at_ms: u64) {
    let p = &r.probe;
    outln!(
        "probe {}  {}  {}  ({}{})",
        p.id,
        p.kind,
        p.function,
        p.pattern.as_deref().map_or_else(
            || "added by the program".to_string(),
            |pat| format!("pattern {pat}")
        ),
        if p.attached { "" } else { ", detached" }
    );
    outln!(
        "  calls     {}{}",
        r.calls,
        rate(r, at_ms).map_or_else(String::new, |rate| format!("  ({rate:.1}/s since added)"))
    );
    if let Some(l) = &r.latency {
        outln!(
            "  latency   mean {}  p50 ≤ {}  p99 ≤ {}  max {}  ({} timed{})",
            format_ns(l.mean_ns),
            format_ns(l.p50_ns),
            format_ns(l.p99_ns),
            format_ns(l.max_ns),
            l.count,
            if l.unwound > 0 {
                format!(", {} unwound by a panic", l.unwound)
            } else {
                String::new()
            }
        );
        let max = l.histogram_ns.iter().map(|b| b.1).max().unwrap_or(0);
        for &(low, count) in &l.histogram_ns {
            outln!(
                "    {:<22} {:>10}  {}",
                bucket_label(low, |v| format_ns(v as f64)),
                count,
                bar(count, max)
            );
        }
    }
    if p.kind.starts_with("hist") {
        let arg = p.kind.rsplit(' ').next().unwrap_or("argument");
        outln!("  {arg} values:");
        if r.histogram.is_empty() {
            outln!("    (no calls yet)");
        }
        let max = r.histogram.iter().map(|b| b.1).max().unwrap_or(0);
        for &(low, count) in &r.histogram {
            outln!(
                "    {:<22} {:>10}  {}",
                bucket_label(low, |v| v.to_string()),
                count,
                bar(count, max)
            );
        }
    }
    if let Some(expr) = p.kind.strip_prefix("when ") {
        outln!("  hits      {} of {} calls where {expr}", r.hits, r.calls);
        if let Some(bt) = r.backtraces.first() {
            let (frames, only_probe) = caller_frames(bt);
            if only_probe {
                outln!(
                    "  first backtrace (as captured: it does not reach past the probe's \
                     trampoline, so the callers are not known):"
                );
            } else {
                outln!("  first backtrace (from the caller):");
            }
            for line in frames {
                outln!("    {line}");
            }
        }
    }
    if p.kind == "coverage" {
        outln!(
            "  covered   {}",
            if r.covered {
                "yes: the function ran (the probe detached itself)"
            } else {
                "no: not run since the probe was added"
            }
        );
    }
}

/// The frames of a captured backtrace from the probed function's caller on, leaving out the
/// leading frames of the capture itself and of the probe's hook (std's backtrace,
/// evolve-probes, evolve-code, the trampoline without a symbol). Second: whether that left
/// nothing (the capture did not get past the trampoline); then every frame is returned.
fn caller_frames(bt: &str) -> (Vec<String>, bool) {
    let mut frames: Vec<Vec<&str>> = Vec::new();
    for line in bt.lines().filter(|l| !l.trim().is_empty()) {
        let t = line.trim_start();
        let starts_frame = t
            .split_once(": ")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        match frames.last_mut() {
            Some(frame) if !starts_frame => frame.push(line),
            _ => frames.push(vec![line]),
        }
    }
    let internal = |frame: &Vec<&str>| {
        let symbol = frame[0]
            .trim_start()
            .split_once(": ")
            .map_or("", |(_, s)| s);
        symbol == "<unknown>"
            || ["std::backtrace", "evolve_probes", "evolve_code"]
                .iter()
                .any(|p| symbol.contains(p))
            || frame[1..].iter().any(|at| {
                [
                    "/evolve-probes/src/",
                    "/evolve-code/src/",
                    "/std/src/backtrace",
                ]
                .iter()
                .any(|p| at.contains(p))
            })
    };
    let first_caller = frames.iter().position(|f| !internal(f));
    let lines = |frames: &[Vec<&str>]| {
        frames
            .iter()
            .flatten()
            .map(|l| l.trim_end().to_string())
            .collect()
    };
    match first_caller {
        Some(i) => (lines(&frames[i..]), false),
        None => (lines(&frames), true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_well() {
        assert_eq!(format_ns(850.0), "850 ns");
        assert_eq!(format_ns(1520.0), "1.52 µs");
        assert_eq!(format_ns(3_400_000.0), "3.40 ms");
        assert_eq!(format_ns(1.2e9), "1.20 s");
    }

    #[test]
    fn buckets_and_bars() {
        assert_eq!(bucket_label(0, |v| v.to_string()), "0");
        assert_eq!(bucket_label(512, |v| v.to_string()), "[512, 1024)");
        assert_eq!(bar(10, 10).chars().count(), 30);
        assert_eq!(bar(1, 1000).chars().count(), 1);
        assert_eq!(bar(0, 0), "");
    }

    #[test]
    fn backtraces_start_at_the_caller() {
        let bt = "   0: std::backtrace::Backtrace::force_capture\n             at /rustc/x/backtrace.rs:1:1\n   1: evolve_probes::point::Probe::on_entry\n   2: <unknown>\n   3: ctlhost::main::{{closure}}\n             at ./src/main.rs:40:5\n   4: std::rt::lang_start\n";
        let (frames, only_probe) = caller_frames(bt);
        assert!(!only_probe);
        assert_eq!(frames[0].trim(), "3: ctlhost::main::{{closure}}");
        assert_eq!(frames.len(), 3);
        // Release builds name frames briefly; the locations show they are the probe's.
        let bt = "   0: on_entry\n             at /w/crates/evolve-probes/src/point.rs:224:34\n   1: entry_thunk\n             at /w/crates/evolve-code/src/detour.rs:285:5\n   2: <unknown>\n";
        let (frames, only_probe) = caller_frames(bt);
        assert!(only_probe);
        assert_eq!(frames.len(), 5);
    }
}
