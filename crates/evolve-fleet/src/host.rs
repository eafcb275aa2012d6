//! What a node does to its local processes, behind one trait: the real [`AgentHost`] talks to
//! the agents of the processes on this machine; the benchmark's simulated nodes use
//! [`SimHost`], which records what it is asked in memory.
//!
//! Every method blocks (agent requests, health commands): the node calls them on tokio's
//! blocking pool.

use crate::model::{CanarySplit, InProcessCanary, ProcessInfo};
use evolve_agent::client::Connection;
use evolve_agent::protocol::{ProbeKindName, Request};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// What a node can do to the processes of its machine. Errors are the cause, as text.
pub trait Host: Send + Sync + 'static {
    /// The evolve-enabled processes now.
    fn processes(&self) -> Vec<ProcessInfo>;
    /// Applies the patch file to `pid` (on trial for `trial_ms` if given).
    fn apply(&self, pid: u32, patch: &Path, trial_ms: Option<u64>) -> Result<(), String>;
    /// Reverts the patch named `name` in `pid`.
    fn revert(&self, pid: u32, name: &str) -> Result<(), String>;
    /// Whether patch `name` is active in `pid` (`None`: the process cannot be asked).
    fn is_applied(&self, pid: u32, name: &str) -> Option<bool>;
    /// Adds a count probe on `pattern` in `pid`; the probes' ids.
    fn probe_add(&self, pid: u32, pattern: &str) -> Result<Vec<u64>, String>;
    /// The calls the probes counted since they were added.
    fn probe_read(&self, pid: u32, probes: &[u64]) -> Result<u64, String>;
    /// Removes the probes.
    fn probe_remove(&self, pid: u32, probes: &[u64]);
    /// Runs a health command for `pid`; `Err(cause)` if it fails.
    fn health(&self, pid: u32, command: &str, env: &[(String, String)]) -> Result<(), String>;
    /// The in-process canary, then the full switch: `Ok(summary)` once the new version serves
    /// everything, `Err(cause)` if it was rolled back.
    fn canary(&self, pid: u32, patch: &Path, canary: &InProcessCanary) -> Result<String, String>;
}

/// The processes of this machine whose agents listen in `socket_dir`.
#[derive(Debug)]
pub struct AgentHost {
    socket_dir: PathBuf,
    /// What is known of each process (its executable is read once, not at every scan).
    known: Mutex<BTreeMap<u32, ProcessInfo>>,
}

const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The GNU build id (hex) of a process's executable.
pub fn build_id_of(pid: u32) -> Option<String> {
    let bytes = std::fs::read(format!("/proc/{pid}/exe")).ok()?;
    let file = object::File::parse(&*bytes).ok()?;
    use object::Object;
    let id = file.build_id().ok()??;
    Some(evolve_trust::hex(id))
}

impl AgentHost {
    /// The processes whose agents put their sockets in `socket_dir`.
    pub fn new(socket_dir: &Path) -> AgentHost {
        AgentHost {
            socket_dir: socket_dir.to_path_buf(),
            known: Mutex::new(BTreeMap::new()),
        }
    }

    fn call(&self, pid: u32, request: &Request) -> Result<Value, String> {
        let socket = evolve_agent::paths::socket_path(&self.socket_dir, pid);
        let mut connection = Connection::connect(&socket).map_err(|e| e.to_string())?;
        connection
            .call(request, AGENT_TIMEOUT)
            .map_err(|e| e.to_string())
    }
}

impl Host for AgentHost {
    fn processes(&self) -> Vec<ProcessInfo> {
        let found: Vec<u32> = evolve_agent::paths::list_sockets(&self.socket_dir)
            .into_iter()
            .filter(|found| !found.process_gone)
            .map(|found| found.pid)
            .collect();
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known.retain(|pid, _| found.contains(pid));
        found
            .into_iter()
            .filter_map(|pid| {
                if let Some(info) = known.get(&pid) {
                    return Some(info.clone());
                }
                // A process answers once its agent serves: only then is it listed.
                let hello = self.call(pid, &Request::Hello).ok()?;
                let info = ProcessInfo {
                    pid,
                    program: hello["program"].as_str().unwrap_or_default().to_string(),
                    build_id: build_id_of(pid),
                };
                known.insert(pid, info.clone());
                Some(info)
            })
            .collect()
    }

    fn apply(&self, pid: u32, patch: &Path, trial_ms: Option<u64>) -> Result<(), String> {
        self.call(
            pid,
            &Request::Apply {
                path: patch.display().to_string(),
                atomic: false,
                trial_ms,
                safe_point_timeout_ms: None,
            },
        )
        .map(|_| ())
    }

    fn revert(&self, pid: u32, name: &str) -> Result<(), String> {
        self.call(
            pid,
            &Request::Revert {
                target: Some(name.to_string()),
                version: None,
            },
        )
        .map(|_| ())
    }

    fn is_applied(&self, pid: u32, name: &str) -> Option<bool> {
        let status = self.call(pid, &Request::Status).ok()?;
        Some(
            status["patches"]
                .as_array()?
                .iter()
                .any(|p| p["name"].as_str() == Some(name) && p["reverted_at"].is_null()),
        )
    }

    fn probe_add(&self, pid: u32, pattern: &str) -> Result<Vec<u64>, String> {
        let added = self.call(
            pid,
            &Request::ProbeAdd {
                pattern: pattern.to_string(),
                kind: ProbeKindName::Count,
                arg: None,
                expr: None,
            },
        )?;
        Ok(added["probes"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect())
            .unwrap_or_default())
    }

    fn probe_read(&self, pid: u32, probes: &[u64]) -> Result<u64, String> {
        let mut calls = 0;
        for &probe in probes {
            let read = self.call(pid, &Request::ProbeRead { probe: Some(probe) })?;
            calls += read["readings"][0]["calls"].as_u64().unwrap_or(0);
        }
        Ok(calls)
    }

    fn probe_remove(&self, pid: u32, probes: &[u64]) {
        for &probe in probes {
            let _ = self.call(
                pid,
                &Request::ProbeRm {
                    probe: Some(probe),
                    pattern: None,
                    all: false,
                },
            );
        }
    }

    fn health(&self, pid: u32, command: &str, env: &[(String, String)]) -> Result<(), String> {
        run_health_command(pid, command, env)
    }

    fn canary(&self, pid: u32, patch: &Path, canary: &InProcessCanary) -> Result<String, String> {
        let started = self.call(
            pid,
            &Request::CanaryStart {
                path: patch.display().to_string(),
                split: match canary.split {
                    CanarySplit::Calls => "calls",
                    CanarySplit::Threads => "threads",
                    CanarySplit::Connections => "connections",
                }
                .into(),
                fraction: canary.fraction,
                errors: canary.errors.clone(),
            },
        )?;
        std::thread::sleep(Duration::from_millis(canary.window_ms));
        let decided = self.call(pid, &Request::CanaryFinish { max_ratio: 2.0 })?;
        let promoted = decided["promoted"].as_bool().unwrap_or(false);
        let summary = format!(
            "in-process canary ({} of {}): new {} errors / {} calls, old {} errors / {} calls",
            canary.fraction,
            started["split"].as_str().unwrap_or("calls"),
            decided["new_errors"],
            decided["new_calls"],
            decided["old_errors"],
            decided["old_calls"],
        );
        if promoted {
            Ok(summary)
        } else {
            Err(format!("{summary}: rolled back"))
        }
    }
}

/// Runs `sh -c command` with `EVOLVE_PID` and `env` set, for at most 30 s.
pub fn run_health_command(pid: u32, command: &str, env: &[(String, String)]) -> Result<(), String> {
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("EVOLVE_PID", pid.to_string())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("health command `{command}` could not start: {e}"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut stderr);
                }
                let stderr = stderr.trim();
                return Err(format!(
                    "health command `{command}` failed ({status}){}",
                    if stderr.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", &stderr[..stderr.len().min(200)])
                    }
                ));
            }
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "health command `{command}` did not finish within 30 s"
                ));
            }
        }
    }
}

/// A simulated machine: one process per node that accepts every patch, for the benchmark's
/// thousand node state machines. It records what it was asked.
#[derive(Debug)]
pub struct SimHost {
    process: ProcessInfo,
    applied: Mutex<BTreeMap<String, bool>>,
    /// Patches applied so far, in order.
    pub log: Mutex<Vec<String>>,
}

impl SimHost {
    /// A machine running one process `program` (pid `pid`).
    pub fn new(pid: u32, program: &str) -> SimHost {
        SimHost {
            process: ProcessInfo {
                pid,
                program: program.to_string(),
                build_id: None,
            },
            applied: Mutex::new(BTreeMap::new()),
            log: Mutex::new(Vec::new()),
        }
    }
}

impl Host for SimHost {
    fn processes(&self) -> Vec<ProcessInfo> {
        vec![self.process.clone()]
    }

    fn apply(&self, _pid: u32, patch: &Path, _trial_ms: Option<u64>) -> Result<(), String> {
        let name = patch
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.applied
            .lock()
            .expect("not poisoned")
            .insert(name.clone(), true);
        self.log.lock().expect("not poisoned").push(name);
        Ok(())
    }

    fn revert(&self, _pid: u32, name: &str) -> Result<(), String> {
        self.applied
            .lock()
            .expect("not poisoned")
            .insert(name.to_string(), false);
        Ok(())
    }

    fn is_applied(&self, _pid: u32, name: &str) -> Option<bool> {
        Some(
            *self
                .applied
                .lock()
                .expect("not poisoned")
                .get(name)
                .unwrap_or(&false),
        )
    }

    fn probe_add(&self, _pid: u32, _pattern: &str) -> Result<Vec<u64>, String> {
        Ok(vec![])
    }

    fn probe_read(&self, _pid: u32, _probes: &[u64]) -> Result<u64, String> {
        Ok(0)
    }

    fn probe_remove(&self, _pid: u32, _probes: &[u64]) {}

    fn health(&self, pid: u32, command: &str, env: &[(String, String)]) -> Result<(), String> {
        run_health_command(pid, command, env)
    }

    fn canary(&self, pid: u32, patch: &Path, _canary: &InProcessCanary) -> Result<String, String> {
        self.apply(pid, patch, None).map(|_| "simulated".into())
    }
}
