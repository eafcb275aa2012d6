//! `evolve attach` and `evolve detach`: the agent into and out of a process that never linked
//! Evolve ([`evolve_attach`] does the work).

use crate::outln;
use anyhow::{anyhow, Result};
use serde_json::json;
use std::path::PathBuf;

/// `evolve attach PID [--agent PATH]`.
pub fn attach(json: bool, pid: u32, agent: Option<PathBuf>) -> Result<()> {
    let options = evolve_attach::Options {
        agent,
        ..Default::default()
    };
    let a = evolve_attach::attach(pid, &options).map_err(|e| anyhow!("attach {pid}: {e}"))?;
    let stops: Vec<_> = a
        .stops
        .periods
        .iter()
        .map(|(tid, d)| json!({"tid": tid, "ms": d.as_secs_f64() * 1e3}))
        .collect();
    let value = json!({
        "pid": pid,
        "program": a.hello.program,
        "socket": a.socket.display().to_string(),
        "reused": a.reused,
        "linked": !a.hello.attached,
        "threads_seized": a.stops.seized,
        "borrowed_tid": a.stops.borrowed,
        "borrowed_in": a.stops.borrowed_in,
        "stops": stops,
        "max_stop_ms": a.stops.max().as_secs_f64() * 1e3,
        "load_ms": a.load.as_secs_f64() * 1e3,
        "attach_ms": a.total.as_secs_f64() * 1e3,
    });
    if json {
        outln!("{value}");
    } else if a.reused {
        outln!(
            "process {pid} ({}) already runs an agent ({}): reusing it on {}",
            a.hello.program,
            if a.hello.attached {
                "attached"
            } else {
                "linked"
            },
            a.socket.display()
        );
    } else {
        outln!(
            "attached to process {pid} ({}) in {:.1} ms: agent on {}",
            a.hello.program,
            a.total.as_secs_f64() * 1e3,
            a.socket.display()
        );
        outln!(
            "  {} threads seized; thread {} borrowed while in {}, stopped {:.3} ms; the agent \
             loaded in {:.1} ms",
            a.stops.seized,
            a.stops.borrowed.unwrap_or(0),
            a.stops.borrowed_in,
            a.stops.max().as_secs_f64() * 1e3,
            a.load.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

/// `evolve detach PID [--revert]`.
pub fn detach(json: bool, pid: u32, revert: bool) -> Result<()> {
    let d = evolve_attach::detach(pid, revert).map_err(|e| anyhow!("detach {pid}: {e}"))?;
    if json {
        outln!("{}", serde_json::to_string(&d)?);
    } else {
        outln!(
            "detached from process {pid}: {} probes removed{}; the agent stopped",
            d.probes_removed,
            if d.reverted.is_empty() {
                String::new()
            } else {
                format!(", reverted {}", d.reverted.join(", "))
            }
        );
    }
    Ok(())
}
