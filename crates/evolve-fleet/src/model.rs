//! The rollout model: what etcd holds, as Rust values (each serialized as one small JSON value).
//!
//! - [`RolloutSpec`]: what to roll out, where, and under which gates. Written once, never changed.
//! - [`RolloutState`]: where the rollout is (its step, its phase, the admission threshold). Only
//!   the controller's commands write it, each time by compare-and-swap on its revision.
//! - [`NodeInfo`]: a node and its local processes, under the node's lease.
//! - [`NodeReport`]: what a node observed for one rollout, per process, under its lease.
//!
//! # Who is in the rollout
//!
//! Every node has a [`position`] in each rollout, a 64-bit hash of the rollout's id and the
//! node's name. The state holds one number, `admit`: a selected node whose position is at most
//! `admit` carries the patch. The canary is the `canary` nodes of lowest position; a wave of P %
//! raises `admit` to the position of the `ceil(P × N)`-th node; 100 % is `u64::MAX`. So each node
//! decides alone whether it is in, a step or an abort is one write whatever the fleet size, and a
//! node that joins later falls on the right side of the line.

use evolve_trust::{Digest, SignatureFile};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;

/// The patch file of a rollout, kept out of etcd: its digest, where to fetch it, its signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// The SHA-256 of the file: its name in every store.
    pub sha256: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// HTTP locations serving it (`http://HOST:PORT/artifacts/SHA256` for a controller).
    pub urls: Vec<String>,
    /// The operator's signature, if it was signed.
    pub signature: Option<SignatureFile>,
    /// The file name it was given (for display).
    pub name: String,
}

/// Which processes a rollout applies to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    /// The executable's GNU build id (hex): the binary the patch was built for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
    /// The executable's file name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<String>,
    /// Labels the node must carry (`evolve node --label k=v`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Selector {
    /// Whether `node` carries every label.
    pub fn matches_node(&self, node: &NodeInfo) -> bool {
        self.labels
            .iter()
            .all(|(k, v)| node.labels.get(k) == Some(v))
    }

    /// Whether `process` is selected (on a node that matches).
    pub fn matches_process(&self, process: &ProcessInfo) -> bool {
        self.build_id
            .as_ref()
            .is_none_or(|id| process.build_id.as_deref() == Some(id))
            && self.program.as_ref().is_none_or(|p| &process.program == p)
    }

    /// Whether `node` has at least one selected process.
    pub fn selects(&self, node: &NodeInfo) -> bool {
        self.matches_node(node) && node.processes.iter().any(|p| self.matches_process(p))
    }

    /// `build_id=… program=… label k=v`, for display.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(id) = &self.build_id {
            parts.push(format!("build-id={}", &id[..id.len().min(16)]));
        }
        if let Some(p) = &self.program {
            parts.push(format!("program={p}"));
        }
        for (k, v) in &self.labels {
            parts.push(format!("{k}={v}"));
        }
        if parts.is_empty() {
            "every process".into()
        } else {
            parts.join(" ")
        }
    }
}

/// A probe gate: a count probe on functions matching `pattern`, read over the check window;
/// the node fails if the calls exceed `max_calls` (e.g. the function that sends error replies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeGate {
    /// A function name or glob, as `evolve probe add` takes it.
    pub pattern: String,
    /// The most calls allowed during the window.
    pub max_calls: u64,
}

/// How the in-process canary splits the work between the old and the new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CanarySplit {
    /// A fraction of calls.
    Calls,
    /// A fraction of threads (each thread stays on its version).
    Threads,
    /// A fraction of connections (keys the program sets per connection).
    Connections,
}

/// An in-process canary before the full switch, on each node: the new version serves a
/// fraction of the work for `window_ms`, and the error probe's counts per version decide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InProcessCanary {
    /// What is split.
    pub split: CanarySplit,
    /// The fraction, 0 < f < 1.
    pub fraction: f64,
    /// How long the two versions run side by side.
    pub window_ms: u64,
    /// The functions whose calls count as errors (name or glob).
    pub errors: String,
}

/// The health gates of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gates {
    /// A command each node runs after applying (with `EVOLVE_PID`, `EVOLVE_NODE`,
    /// `EVOLVE_ROLLOUT` set); exit status 0 is healthy. The node's own `--health-cmd` runs too.
    #[serde(default)]
    pub health_command: Option<String>,
    /// A probe reading that must stay under a bound.
    #[serde(default)]
    pub probe: Option<ProbeGate>,
    /// Apply on trial: the agent reverts the patch if its code panics within this window.
    #[serde(default)]
    pub trial_ms: Option<u64>,
    /// How long a node watches its gates after applying before it reports healthy.
    #[serde(default)]
    pub check_ms: u64,
    /// Failed or lost nodes allowed per wave (cumulative: after wave k, k × budget); the
    /// canary allows none.
    #[serde(default)]
    pub failure_budget: usize,
    /// A step that has not converged within this time aborts the rollout.
    pub step_deadline_ms: u64,
    /// The in-process canary, if any.
    #[serde(default)]
    pub in_process_canary: Option<InProcessCanary>,
}

/// What to roll out, where, how: immutable once written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutSpec {
    /// `r<unix ms>-<digest prefix>`: sorts by creation.
    pub id: String,
    /// Unix milliseconds.
    pub created_ms: u64,
    /// `user@host`.
    pub created_by: String,
    /// The patch.
    pub artifact: Artifact,
    /// Where it goes.
    pub selector: Selector,
    /// Nodes in the canary (step 0).
    pub canary: usize,
    /// Percentages of the selected nodes after each later step, increasing, the last 100.
    pub waves: Vec<f64>,
    /// How long a converged step bakes before the next.
    pub bake_ms: u64,
    /// The gates.
    pub gates: Gates,
}

impl RolloutSpec {
    /// Steps in all: the canary plus the waves.
    pub fn steps(&self) -> usize {
        1 + self.waves.len()
    }

    /// A step's name: `canary`, `wave 1 (10%)`.
    pub fn step_name(&self, step: usize) -> String {
        match step {
            0 => format!("canary ({} node{})", self.canary, plural(self.canary)),
            s => format!(
                "wave {s} ({}%)",
                self.waves.get(s - 1).copied().unwrap_or(100.0)
            ),
        }
    }

    /// The file name nodes give the patch (its name in the agents' history).
    pub fn patch_name(&self) -> String {
        format!("fleet-{}", self.id)
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Steps advance as gates pass.
    Running,
    /// No step advances; nodes keep what they have.
    Paused,
    /// Every step passed; the patch stays, and nodes that join apply it.
    Completed,
    /// Every node that applied it reverts.
    Aborted,
}

impl Phase {
    /// Completed or aborted: nothing more happens.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Completed | Phase::Aborted)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Completed => "completed",
            Phase::Aborted => "aborted",
        })
    }
}

/// One change of a rollout's state, kept in the state (a few per rollout).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// The step after the change.
    pub step: usize,
    /// The phase after the change.
    pub phase: Phase,
    /// Why.
    pub why: String,
    /// Who wrote it (a controller's id, or `operator USER`).
    pub by: String,
}

/// Where a rollout is: written only by compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutState {
    /// The phase.
    pub phase: Phase,
    /// 0 = canary, k = wave k.
    pub step: usize,
    /// Nodes at or below this position are in ([`position`]).
    pub admit: u64,
    /// When the step started (its deadline runs from here).
    pub step_started_ms: u64,
    /// When every node of the step became healthy (the bake runs from here).
    pub converged_ms: Option<u64>,
    /// Why it is paused or aborted.
    pub reason: Option<String>,
    /// Paused by the controller itself (nodes lost beyond the budget): resumes by itself when
    /// they return.
    #[serde(default)]
    pub auto_paused: bool,
    /// Every change, oldest first.
    pub transitions: Vec<Transition>,
}

impl RolloutState {
    /// Whether the node at `position` carries the patch now.
    pub fn admits(&self, position: u64) -> bool {
        self.phase != Phase::Aborted && position <= self.admit
    }

    /// Records a change.
    pub fn record(&mut self, now_ms: u64, why: impl Into<String>, by: &str) {
        self.transitions.push(Transition {
            at_ms: now_ms,
            step: self.step,
            phase: self.phase,
            why: why.into(),
            by: by.to_string(),
        });
    }
}

/// The position of `node` in rollout `rollout` (see the module docs).
pub fn position(rollout: &str, node: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(rollout.as_bytes())
        .chain_update([0u8])
        .chain_update(node.as_bytes())
        .finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// The admission threshold that lets in the `count` lowest of `positions` (sorted ascending).
pub fn threshold(sorted_positions: &[u64], count: usize) -> u64 {
    if count == 0 {
        return 0;
    }
    if count >= sorted_positions.len() {
        return u64::MAX;
    }
    sorted_positions[count - 1]
}

/// Nodes a wave of `percent` % lets in among `n` selected nodes (at least one).
pub fn wave_count(percent: f64, n: usize) -> usize {
    ((percent / 100.0 * n as f64).ceil() as usize).clamp(1, n.max(1))
}

/// A process on a node, as its agent describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Its pid.
    pub pid: u32,
    /// Its executable's file name.
    pub program: String,
    /// Its executable's build id (hex).
    pub build_id: Option<String>,
}

/// A node, registered under its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its name (unique in the fleet).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its evolve-enabled processes.
    pub processes: Vec<ProcessInfo>,
    /// Unix milliseconds of the registration.
    pub since_ms: u64,
}

/// What happened to a patch in one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessState {
    /// Fetched and verified; not applied yet.
    Staged,
    /// Applied; gates not passed yet.
    Applied,
    /// Applied and every gate passed.
    Healthy,
    /// Refused, or a gate failed (then reverted): see the cause.
    Failed,
    /// Reverted (abort).
    Reverted,
}

impl std::fmt::Display for ProcessState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProcessState::Staged => "staged",
            ProcessState::Applied => "applied",
            ProcessState::Healthy => "healthy",
            ProcessState::Failed => "failed",
            ProcessState::Reverted => "reverted",
        })
    }
}

/// One process's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessReport {
    /// The process.
    pub pid: u32,
    /// Its state.
    pub state: ProcessState,
    /// Why it failed, or what a gate read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// How many times the patch was applied to a process of this node (restarts re-apply).
    #[serde(default)]
    pub applies: u32,
}

/// What a node observed for one rollout (under its lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The node.
    pub node: String,
    /// The summary: the worst of its processes (failed > staged > applied > healthy), or
    /// reverted when all are.
    pub state: ProcessState,
    /// Per selected process.
    pub processes: Vec<ProcessReport>,
    /// The rollout state's revision the node acted on.
    pub state_revision: i64,
    /// Unix milliseconds.
    pub at_ms: u64,
}

impl NodeReport {
    /// The summary of `processes`.
    pub fn summarize(processes: &[ProcessReport]) -> ProcessState {
        use ProcessState::*;
        let has = |s| processes.iter().any(|p| p.state == s);
        if processes.is_empty() {
            return Reverted;
        }
        if has(Failed) {
            Failed
        } else if has(Staged) {
            Staged
        } else if has(Applied) {
            Applied
        } else if has(Healthy) {
            Healthy
        } else {
            Reverted
        }
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_let_in_the_lowest_positions_and_only_grow() {
        let mut positions: Vec<u64> = (0..20).map(|i| position("r1", &format!("n{i}"))).collect();
        positions.sort();
        let canary = threshold(&positions, 1);
        assert_eq!(positions.iter().filter(|&&p| p <= canary).count(), 1);
        let counts: Vec<usize> = [10.0, 50.0, 100.0]
            .iter()
            .map(|&p| {
                let t = threshold(&positions, wave_count(p, 20));
                positions.iter().filter(|&&q| q <= t).count()
            })
            .collect();
        assert_eq!(counts, [2, 10, 20]);
        assert_eq!(wave_count(10.0, 3), 1);
        assert_ne!(position("r1", "n1"), position("r2", "n1"));
    }

    #[test]
    fn a_report_summarizes_its_worst_process() {
        let p = |state| ProcessReport {
            pid: 1,
            state,
            cause: None,
            applies: 1,
        };
        use ProcessState::*;
        assert_eq!(NodeReport::summarize(&[p(Healthy), p(Applied)]), Applied);
        assert_eq!(NodeReport::summarize(&[p(Healthy), p(Failed)]), Failed);
        assert_eq!(NodeReport::summarize(&[p(Reverted)]), Reverted);
    }
}
