//! Serving one request: parse the line, ask the capability, journal changes, build the reply.
//!
//! Parsing is strict and total: every line yields exactly one reply, and nothing a client sends
//! can panic the agent (the capability calls run under `catch_unwind` as a last resort).

use crate::journal::{Client, Journal};
use crate::probes::Probes;
use crate::protocol::*;
use evolve_hot::patch::{ApplyOptions, Revert};
use serde_json::Value;
use std::time::{Duration, Instant};

/// What the agent knows about itself, for `hello`.
pub struct Context {
    /// The process's journal (shared by every agent the process starts).
    pub journal: std::sync::Arc<Journal>,
    /// When the agent started.
    pub started: Instant,
    /// The probes added through the agent.
    pub probes: Probes,
}

type Outcome = Result<Value, (ErrorKind, String)>;

fn failed(e: impl std::fmt::Display) -> (ErrorKind, String) {
    (ErrorKind::Failed, e.to_string())
}

fn to_value<T: serde::Serialize>(t: &T) -> Value {
    serde_json::to_value(t).expect("results serialize")
}

/// Parses a request line (without its newline) into its id and request.
pub fn parse(line: &[u8]) -> Result<(Value, Request), (Value, ErrorKind, String)> {
    let text = std::str::from_utf8(line)
        .map_err(|e| (Value::Null, ErrorKind::Malformed, format!("not UTF-8: {e}")))?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| (Value::Null, ErrorKind::Malformed, format!("not JSON: {e}")))?;
    let Value::Object(mut object) = value else {
        return Err((
            Value::Null,
            ErrorKind::Malformed,
            "a request is a JSON object".into(),
        ));
    };
    let id = object.remove("id").unwrap_or(Value::Null);
    match object.remove("v") {
        Some(Value::Number(n)) if n.as_u64() == Some(u64::from(VERSION)) => {}
        Some(other) => {
            return Err((
                id,
                ErrorKind::UnsupportedVersion,
                format!("protocol version {other} (this agent speaks {VERSION})"),
            ))
        }
        None => {
            return Err((
                id,
                ErrorKind::UnsupportedVersion,
                format!("no protocol version \"v\" (this agent speaks {VERSION})"),
            ))
        }
    }
    match object.get("op") {
        Some(Value::String(op)) if Request::OPS.contains(&op.as_str()) => {}
        Some(op) => {
            return Err((
                id,
                ErrorKind::UnknownRequest,
                format!("unknown op {op} (known: {})", Request::OPS.join(", ")),
            ))
        }
        None => return Err((id, ErrorKind::UnknownRequest, "no \"op\"".into())),
    }
    match serde_json::from_value::<Request>(Value::Object(object)) {
        Ok(request) => Ok((id, request)),
        Err(e) => Err((id, ErrorKind::BadRequest, e.to_string())),
    }
}

/// Serves a parsed request from `client`.
pub fn serve(context: &Context, client: Client, request: Request) -> Outcome {
    match request {
        Request::Hello => Ok(to_value(&hello(context))),
        Request::Status => Ok(to_value(&status(context))),
        Request::Functions { symbols: None } => Ok(to_value(&functions(context))),
        Request::Functions {
            symbols: Some(pattern),
        } => {
            let (symbols, symbols_truncated) = symbols(&pattern)?;
            Ok(to_value(&Functions {
                symbols,
                symbols_truncated,
                ..functions(context)
            }))
        }
        Request::History => Ok(to_value(&History {
            entries: context.journal.entries(),
            file: context.journal.path().map(|p| p.display().to_string()),
        })),
        Request::Gc => {
            let result = evolve_hot::reclaim::collect(evolve_hot::reclaim::Policy::Scan)
                .map_err(|e| (ErrorKind::Failed, e.to_string()));
            context.journal.record(
                client,
                "gc",
                "scan".to_string(),
                result
                    .as_ref()
                    .map(|r| {
                        format!(
                            "unloaded [{}], kept {}, {} resident, longest pause {} µs",
                            r.unloaded.join(", "),
                            r.kept.len(),
                            r.resident,
                            r.max_pause_us
                        )
                    })
                    .map_err(|e| e.1.clone()),
            );
            result.map(|r| {
                serde_json::json!(Collected {
                    unloaded: r.unloaded,
                    kept: r
                        .kept
                        .into_iter()
                        .map(|(patch, references)| KeptPatch { patch, references })
                        .collect(),
                    resident: r.resident,
                    max_pause_us: r.max_pause_us,
                    bytes_scanned: r.bytes_scanned,
                })
            })
        }
        Request::Apply {
            path,
            atomic,
            trial_ms,
            safe_point_timeout_ms,
        } => {
            let target = format!(
                "{path}{}{}",
                if atomic { " --atomic" } else { "" },
                trial_ms.map_or_else(String::new, |t| format!(" --trial {t}ms"))
            );
            let result = apply(&path, atomic, trial_ms, safe_point_timeout_ms);
            context.journal.record(
                client,
                "apply",
                target,
                result
                    .as_ref()
                    .map(|a| format!("patch {} updated [{}]", a.patch, a.updated.join(", ")))
                    .map_err(|e| e.1.clone()),
            );
            result.map(|a| to_value(&a))
        }
        Request::Revert { target, version } => {
            let shown = match (&target, version) {
                (None, _) => "(last patch)".to_string(),
                (Some(t), None) => t.clone(),
                (Some(t), Some(v)) => format!("{t} to version {v}"),
            };
            let result = revert(target, version);
            context.journal.record(
                client,
                "revert",
                shown,
                result
                    .as_ref()
                    .map(|r| format!("{}: changed [{}]", r.what, r.changed.join(", ")))
                    .map_err(|e| e.1.clone()),
            );
            result.map(|r| to_value(&r))
        }
        Request::SwitchSet { name, value } => {
            let result = switch_set(&name, &value);
            context.journal.record(
                client,
                "switch_set",
                format!("{name}={value}"),
                result
                    .as_ref()
                    .map(|s| format!("{} = {}", s.name, s.value))
                    .map_err(|e| e.1.clone()),
            );
            result.map(|s| to_value(&s))
        }
        Request::Commit { switch } => {
            let result = commit(switch.as_deref(), true);
            journal_commit(context, client, "commit", switch, &result);
            result.map(|c| to_value(&c))
        }
        Request::RevertSwitches { switch } => {
            let result = commit(switch.as_deref(), false);
            journal_commit(context, client, "revert_switches", switch, &result);
            result.map(|c| to_value(&c))
        }
        Request::ProbeAdd {
            pattern,
            kind,
            arg,
            expr,
        } => {
            let result = context.probes.add(&pattern, kind, arg, expr.as_deref());
            let shown = match (&arg, &expr) {
                (Some(a), _) => format!(
                    "{pattern} {} arg{a}",
                    to_value(&kind).as_str().unwrap_or("?")
                ),
                (_, Some(e)) => format!("{pattern} when {e}"),
                _ => format!("{pattern} {}", to_value(&kind).as_str().unwrap_or("?")),
            };
            journal_probes(context, client, "probe_add", shown, &result);
            result.map(|r| to_value(&r))
        }
        Request::ProbeList => Ok(to_value(&context.probes.list())),
        Request::ProbeRm {
            probe: id,
            pattern,
            all,
        } => {
            let shown = match (id, &pattern) {
                (Some(id), _) => format!("id {id}"),
                (_, Some(p)) => p.clone(),
                _ => "(all)".into(),
            };
            let result = context.probes.remove(id, pattern.as_deref(), all);
            journal_probes(context, client, "probe_rm", shown, &result);
            result.map(|r| to_value(&r))
        }
        Request::ProbeRead { probe } => context.probes.read(probe).map(|r| to_value(&r)),
        Request::Detach { revert } => {
            crate::attached::detach(context, client, revert).map(|d| to_value(&d))
        }
        Request::CanaryStart {
            path,
            split,
            fraction,
            errors,
        } => {
            let result = crate::canary::start(&path, &split, fraction, &errors);
            context.journal.record(
                client,
                "canary_start",
                format!("{path} {split} {fraction} errors [{errors}]"),
                result
                    .as_ref()
                    .map(|c| format!("canary of {}", c.patch))
                    .map_err(|e| e.1.clone()),
            );
            result.map(|c| to_value(&c))
        }
        Request::CanaryRead => crate::canary::read().map(|c| to_value(&c)),
        Request::CanaryFinish { max_ratio } => {
            let result = crate::canary::finish(max_ratio);
            context.journal.record(
                client,
                "canary_finish",
                format!("max ratio {max_ratio}"),
                result
                    .as_ref()
                    .map(|c| {
                        format!(
                            "{} {}: new {}/{} errors/calls, old {}/{}",
                            c.patch,
                            if c.promoted == Some(true) {
                                "promoted"
                            } else {
                                "rolled back"
                            },
                            c.new_errors,
                            c.new_calls,
                            c.old_errors,
                            c.old_calls
                        )
                    })
                    .map_err(|e| e.1.clone()),
            );
            result.map(|c| to_value(&c))
        }
    }
}

fn journal_probes(
    context: &Context,
    client: Client,
    op: &str,
    target: String,
    result: &Result<ProbeList, (ErrorKind, String)>,
) {
    context.journal.record(
        client,
        op,
        target,
        result
            .as_ref()
            .map(|l| {
                let probes: Vec<String> = l
                    .probes
                    .iter()
                    .map(|p| format!("{} {} {}", p.id, p.function, p.kind))
                    .collect();
                format!("probes [{}]", probes.join(", "))
            })
            .map_err(|e| e.1.clone()),
    );
}

fn journal_commit(
    context: &Context,
    client: Client,
    op: &str,
    switch: Option<String>,
    result: &Result<Committed, (ErrorKind, String)>,
) {
    context.journal.record(
        client,
        op,
        switch.unwrap_or_else(|| "(all)".into()),
        result
            .as_ref()
            .map(|c| format!("changed [{}]", c.changed.join(", ")))
            .map_err(|e| e.1.clone()),
    );
}

fn hello(context: &Context) -> Hello {
    let attached = crate::attached::is_attached();
    let static_tls = attached.then(evolve_code::attached::static_tls);
    let program = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    Hello {
        pid: std::process::id(),
        program,
        protocol: VERSION,
        agent: env!("CARGO_PKG_VERSION").to_string(),
        uid: rustix::process::geteuid().as_raw(),
        uptime_s: context.started.elapsed().as_secs(),
        attached,
        static_tls_offset: static_tls.clone().and_then(|t| t.ok()).map(|o| o as i64),
        static_tls_refused: static_tls.and_then(|t| t.err()),
    }
}

fn functions(context: &Context) -> Functions {
    Functions {
        hot: evolve_hot::patch::functions()
            .into_iter()
            .map(|f| HotFunction {
                name: f.name,
                versions: f.versions,
                current: f.current,
            })
            .chain(evolve_hot::padded::functions().into_iter().map(|f| {
                // A C hot function (evolve.h): the program's code, or redirected.
                let mut versions = vec!["program".to_string()];
                versions.extend(f.target().map(|t| format!("redirected to {t:#x}")));
                HotFunction {
                    name: f.name().to_string(),
                    current: versions.len() - 1,
                    versions,
                }
            }))
            .collect(),
        multiverse: evolve_multiverse::function_states()
            .into_iter()
            .map(|f| MultiverseFunction {
                name: f.name.to_string(),
                committed: f.committed,
            })
            .collect(),
        call_counts: context.probes.call_counts(),
        symbols: Vec::new(),
        symbols_truncated: false,
    }
}

/// The function symbols of every loaded image that match `pattern` (self-inspection is
/// read-only: the agent asks the engine directly, as the probes capability does to resolve).
fn symbols(pattern: &str) -> Result<(Vec<FunctionSymbol>, bool), (ErrorKind, String)> {
    let images = evolve_code::inspect::images().map_err(failed)?;
    // Functions of the executable that format-2 patches replaced, by symbol: their versions.
    let replaced: std::collections::HashMap<String, Vec<String>> = evolve_hot::patch::functions()
        .into_iter()
        .filter_map(|f| Some((f.symbol?, f.versions)))
        .collect();
    let glob = pattern.contains(['*', '?']);
    let mut out = Vec::new();
    for image in &images {
        for f in image.functions() {
            let hit = if glob {
                evolve_probes::glob_matches(pattern, &f.demangled)
                    || evolve_probes::glob_matches(pattern, &f.name)
            } else {
                f.demangled == pattern || f.name == pattern
            };
            if !hit {
                continue;
            }
            if out.len() == MAX_SYMBOLS {
                return Ok((out, true));
            }
            out.push(FunctionSymbol {
                name: f.demangled.clone(),
                address: f.address as u64,
                size: f.size as u64,
                image: image.path().display().to_string(),
                debug_file: image.debug_file().map(|d| d.display().to_string()),
                versions: replaced
                    .get(&f.name)
                    .filter(|_| image.is_main_executable())
                    .cloned()
                    .unwrap_or_else(|| vec![evolve_hot::unprepared::PROGRAM.to_string()]),
            });
        }
    }
    Ok((out, false))
}

fn switches() -> Vec<SwitchInfo> {
    let mut switches: Vec<SwitchInfo> = evolve_multiverse::switches()
        .into_iter()
        .map(|s| SwitchInfo {
            name: s.name().to_string(),
            value: s.raw(),
            domain: s.domain().to_vec(),
        })
        .collect();
    // Link order is arbitrary: show them by name.
    switches.sort_by(|a, b| a.name.cmp(&b.name));
    switches
}

fn status(context: &Context) -> Status {
    Status {
        hello: hello(context),
        functions: functions(context),
        patches: evolve_hot::patch::history()
            .into_iter()
            .map(|p| PatchInfo {
                name: p.name,
                path: p.path.display().to_string(),
                applied_at: p.applied_at,
                reverted_at: p.reverted_at,
                functions: p.functions,
            })
            .collect(),
        reclamation: Reclamation {
            available: true,
            pending: evolve_hot::patch::history()
                .into_iter()
                .filter(|p| p.reverted_at.is_some() && p.unloaded_at.is_none())
                .map(|p| p.name)
                .collect(),
            note: "policy scan: `evolve gc` unloads the patches nothing refers to".into(),
        },
        switches: switches(),
        journal_entries: context.journal.entries().len(),
    }
}

fn apply(
    path: &str,
    atomic: bool,
    trial_ms: Option<u64>,
    safe_point_timeout_ms: Option<u64>,
) -> Result<Applied, (ErrorKind, String)> {
    if !std::path::Path::new(path).is_absolute() {
        return Err((
            ErrorKind::BadRequest,
            format!("patch path {path:?} is relative: the agent needs an absolute path"),
        ));
    }
    crate::trust::check(std::path::Path::new(path)).map_err(|e| (ErrorKind::Failed, e))?;
    let mut options = ApplyOptions {
        atomic,
        trial: trial_ms.map(Duration::from_millis),
        ..ApplyOptions::default()
    };
    if let Some(t) = safe_point_timeout_ms {
        options.safe_point_timeout = Duration::from_millis(t);
    }
    let report = evolve_hot::patch::apply_with(path, &options).map_err(failed)?;
    Ok(Applied {
        patch: report.patch,
        updated: report.updated,
        added: report.added,
        adapted: report.adapted,
        atomic,
        trial_ms,
        total_ms: report.total_ms,
        verify_ms: report.verify_ms,
        load_ms: report.load_ms,
        switch_ms: report.apply_ms,
    })
}

fn revert(target: Option<String>, version: Option<usize>) -> Result<Reverted, (ErrorKind, String)> {
    let Some(target) = target else {
        let changed = evolve_hot::patch::revert(Revert::Last).map_err(failed)?;
        return Ok(Reverted {
            what: "last patch".into(),
            changed,
        });
    };
    let is_patch = evolve_hot::patch::history()
        .iter()
        .any(|p| p.name == target && p.reverted_at.is_none());
    if is_patch && version.is_none() {
        let changed = evolve_hot::patch::revert(Revert::Patch(target.clone())).map_err(failed)?;
        return Ok(Reverted {
            what: format!("patch {target}"),
            changed,
        });
    }
    let function = evolve_hot::patch::functions()
        .into_iter()
        .find(|f| f.name == target || f.name.ends_with(&format!("::{target}")));
    let Some(function) = function else {
        return Err((
            ErrorKind::Failed,
            format!("{target:?} is neither an active patch nor a hot function of this process"),
        ));
    };
    let version = match version {
        Some(v) => v,
        None if function.current == 0 => {
            return Err((
                ErrorKind::Failed,
                format!(
                    "{} runs the program's own version: nothing to revert",
                    function.name
                ),
            ))
        }
        None => function.current - 1,
    };
    let changed = evolve_hot::patch::revert(Revert::Function {
        name: function.name.clone(),
        version,
    })
    .map_err(failed)?;
    Ok(Reverted {
        what: format!("function {} to version {version}", function.name),
        changed,
    })
}

/// Parses a switch value: `true`, `false`, or an integer (negative ones in raw form).
fn parse_value(text: &str) -> Option<u64> {
    match text {
        "true" => Some(1),
        "false" => Some(0),
        _ => text
            .parse::<u64>()
            .ok()
            .or_else(|| text.parse::<i64>().ok().map(|v| v as u64)),
    }
}

fn switch_set(name: &str, value: &str) -> Result<SwitchInfo, (ErrorKind, String)> {
    let switch = find_switch(name)?;
    let raw = parse_value(value).ok_or_else(|| {
        (
            ErrorKind::BadRequest,
            format!("switch value {value:?}: expected true, false or an integer"),
        )
    })?;
    if !switch.domain().contains(&raw) {
        return Err((
            ErrorKind::Failed,
            format!(
                "{value} is not in the domain of switch {name} {:?}: refused",
                switch.domain()
            ),
        ));
    }
    switch.set_raw(raw);
    Ok(SwitchInfo {
        name: switch.name().to_string(),
        value: switch.raw(),
        domain: switch.domain().to_vec(),
    })
}

fn find_switch(
    name: &str,
) -> Result<&'static dyn evolve_multiverse::AnySwitch, (ErrorKind, String)> {
    evolve_multiverse::switch_named(name).ok_or_else(|| {
        let known: Vec<&str> = evolve_multiverse::switches()
            .iter()
            .map(|s| s.name())
            .collect();
        (
            ErrorKind::Failed,
            format!(
                "no switch named {name:?} (or several) in this process; switches: [{}]",
                known.join(", ")
            ),
        )
    })
}

fn commit(switch: Option<&str>, commit: bool) -> Result<Committed, (ErrorKind, String)> {
    let report = match (switch, commit) {
        (None, true) => evolve_multiverse::commit(),
        (None, false) => evolve_multiverse::revert(),
        (Some(name), true) => evolve_multiverse::commit_refs_dyn(find_switch(name)?),
        (Some(name), false) => evolve_multiverse::revert_refs_dyn(find_switch(name)?),
    }
    .map_err(failed)?;
    Ok(Committed {
        changed: report.changed.iter().map(|s| s.to_string()).collect(),
        unmatched: report
            .unmatched
            .iter()
            .map(|u| format!("{}: {}={}", u.function, u.switch, u.value))
            .collect(),
        sites: report.batch.changed,
    })
}
