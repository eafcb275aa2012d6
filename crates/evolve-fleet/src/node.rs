//! The node daemon (`evolve node`): one per machine.
//!
//! # Loop
//!
//! 1. **Register** `P/nodes/NAME` (labels, local processes) under a lease kept alive every third
//!    of its TTL. If the lease is lost (etcd away longer than the TTL), a new one is granted and
//!    the registration and every report are written again.
//! 2. **Watch** `P/desired/` from the last revision seen. If the watch breaks, it resumes from
//!    that revision; if etcd compacted it meanwhile, the node lists `P/desired/` again and
//!    watches from the list's revision, so no transition is missed. While etcd is unreachable
//!    the node keeps the last state it had and acts on it (a restarted server is re-patched from
//!    the local cache); an abort issued meanwhile is obeyed when it reconnects.
//! 3. **Reconcile** after every change: for each rollout (oldest first) and each selected local
//!    process, the patch should be applied iff the state admits the node ([`RolloutState::admits`]).
//!    Applying runs as a task of its own ([`pipeline`]): fetch and verify the artifact, apply
//!    (or run the in-process canary), watch the gates for the check window, report. A gate that
//!    fails reverts the patch on that node and reports the cause; the node does not retry the
//!    rollout. Reverting (abort) asks the agent to revert the patch by its name
//!    (`fleet-<rollout>`), also when the node restarted and only the agent remembers it.
//! 4. **Report** `P/observed/ID/NAME` under the lease whenever a process's state changes.
//!
//! A process that restarts (new pid, same build id) has no record: the next reconcile applies
//! the rollouts that admit the node to it again.

use crate::artifact::{fetch, ArtifactStore};
use crate::error::Result;
use crate::host::Host;
use crate::model::{
    now_ms, position, NodeInfo, NodeReport, Phase, ProcessInfo, ProcessReport, ProcessState,
    RolloutSpec, RolloutState,
};
use crate::store::{Store, WatchEvent};
use evolve_trust::TrustedKeys;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Its name in the fleet.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// The lease TTL, seconds.
    pub lease_ttl_s: i64,
    /// Where fetched artifacts and patch files go.
    pub cache: PathBuf,
    /// Only patches signed by these keys are applied.
    pub trusted: Option<TrustedKeys>,
    /// The node's own health command, run after every apply (and periodically).
    pub health_command: Option<String>,
    /// How often local processes are listed again (restarts are noticed this quickly).
    pub scan_interval: Duration,
}

/// A rollout as the node last saw it.
#[derive(Debug, Clone)]
struct Desired {
    spec: Option<RolloutSpec>,
    state: Option<(RolloutState, i64)>,
}

/// What happened in one local process for one rollout.
#[derive(Debug, Clone)]
struct Record {
    state: ProcessState,
    cause: Option<String>,
    in_flight: bool,
}

/// The result of a pipeline task.
#[derive(Debug)]
struct Outcome {
    rollout: String,
    pid: u32,
    state: ProcessState,
    cause: Option<String>,
    /// False for progress (applied, gates being checked): the pipeline goes on.
    settled: bool,
}

/// Shared by the node's tasks.
struct Shared {
    options: NodeOptions,
    host: Arc<dyn Host>,
    cache: ArtifactStore,
}

/// A running node's counters, read by the benchmark.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Patches applied.
    pub applied: std::sync::atomic::AtomicU64,
    /// Reports written.
    pub reports: std::sync::atomic::AtomicU64,
}

/// The node daemon's state machine.
pub struct Node {
    shared: Arc<Shared>,
    store: Store,
    lease: i64,
    revision: i64,
    rollouts: BTreeMap<String, Desired>,
    processes: Vec<ProcessInfo>,
    records: BTreeMap<(String, u32), Record>,
    applies: BTreeMap<String, u32>,
    reported: BTreeMap<String, NodeReport>,
    outcomes: (mpsc::Sender<Outcome>, mpsc::Receiver<Outcome>),
    /// Its counters.
    pub stats: Arc<NodeStats>,
}

impl Node {
    /// A node on `store`, acting through `host`.
    pub fn new(store: Store, host: Arc<dyn Host>, options: NodeOptions) -> Result<Node> {
        let cache = ArtifactStore::open(&options.cache)?;
        Ok(Node {
            shared: Arc::new(Shared {
                options,
                host,
                cache,
            }),
            store,
            lease: 0,
            revision: 0,
            rollouts: BTreeMap::new(),
            processes: Vec::new(),
            records: BTreeMap::new(),
            applies: BTreeMap::new(),
            reported: BTreeMap::new(),
            outcomes: mpsc::channel(256),
            stats: Arc::new(NodeStats::default()),
        })
    }

    fn info(&self) -> NodeInfo {
        NodeInfo {
            name: self.shared.options.name.clone(),
            labels: self.shared.options.labels.clone(),
            processes: self.processes.clone(),
            since_ms: now_ms(),
        }
    }

    async fn scan(&mut self) -> bool {
        let host = self.shared.host.clone();
        let processes = tokio::task::spawn_blocking(move || host.processes())
            .await
            .unwrap_or_default();
        if processes == self.processes {
            return false;
        }
        let alive: BTreeSet<u32> = processes.iter().map(|p| p.pid).collect();
        // Records of processes that are gone: a restart gets a fresh apply.
        self.records
            .retain(|(_, pid), r| alive.contains(pid) || r.in_flight);
        self.processes = processes;
        true
    }

    /// Registers (with a new lease) and writes every report again.
    async fn register(&mut self) -> Result<()> {
        self.lease = self.store.grant(self.shared.options.lease_ttl_s).await?;
        let key = self.store.keys().node(&self.shared.options.name);
        self.store
            .put(
                &key,
                serde_json::to_vec(&self.info()).expect("serializes"),
                Some(self.lease),
            )
            .await?;
        let reports: Vec<(String, NodeReport)> = self
            .reported
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (rollout, report) in reports {
            self.write_report(&rollout, report).await?;
        }
        Ok(())
    }

    async fn write_report(&mut self, rollout: &str, report: NodeReport) -> Result<()> {
        let key = self.store.keys().report(rollout, &self.shared.options.name);
        self.store
            .put(
                &key,
                serde_json::to_vec(&report).expect("serializes"),
                Some(self.lease),
            )
            .await?;
        self.stats
            .reports
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Lists `P/desired/` and replaces what the node knew.
    async fn relist(&mut self) -> Result<()> {
        let (entries, revision) = self.store.list(&self.store.keys().desired()).await?;
        self.rollouts.clear();
        for entry in entries {
            self.absorb(WatchEvent::Put(entry));
        }
        self.revision = revision;
        Ok(())
    }

    fn absorb(&mut self, event: WatchEvent) {
        let keys = self.store.keys().clone();
        match event {
            WatchEvent::Put(entry) => {
                self.revision = self.revision.max(entry.mod_revision);
                let Some((id, what)) = keys.parse_desired(&entry.key) else {
                    return;
                };
                let desired = self.rollouts.entry(id.to_string()).or_insert(Desired {
                    spec: None,
                    state: None,
                });
                match what {
                    "spec" => desired.spec = entry.json().ok(),
                    "state" => desired.state = entry.json().ok().map(|s| (s, entry.mod_revision)),
                    _ => {}
                }
            }
            WatchEvent::Delete { key, revision } => {
                self.revision = self.revision.max(revision);
                if let Some((id, _)) = keys.parse_desired(&key) {
                    self.rollouts.remove(id);
                }
            }
            WatchEvent::Progress(revision) => self.revision = self.revision.max(revision),
            WatchEvent::Compacted(_) => {}
        }
    }

    /// Runs until the process ends (or `stop` fires).
    pub async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) -> Result<()> {
        self.scan().await;
        let mut backoff = Duration::from_millis(200);
        // Until the first registration succeeds, there is nothing to keep.
        loop {
            match async {
                self.register().await?;
                self.relist().await
            }
            .await
            {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!("node {}: {e}; retrying", self.shared.options.name);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        self.reconcile().await;
        let mut watch = self
            .store
            .watch(&self.store.keys().desired(), self.revision + 1)
            .await
            .ok();
        let keep_alive_every =
            Duration::from_millis(self.shared.options.lease_ttl_s as u64 * 1000 / 3);
        let mut keep_alive = tokio::time::interval(keep_alive_every);
        let mut scan = tokio::time::interval(self.shared.options.scan_interval);
        let mut lease_lost = false;
        loop {
            let mut changed = false;
            tokio::select! {
                _ = stop.changed() => return Ok(()),
                events = async {
                    match watch.as_mut() {
                        Some(w) => w.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    match events {
                        Some(events) => {
                            for event in events {
                                if let WatchEvent::Compacted(_) = event {
                                    // Re-list, then watch from the list's revision.
                                    watch = None;
                                    if self.relist().await.is_ok() {
                                        watch = self.store.watch(&self.store.keys().desired(), self.revision + 1).await.ok();
                                    }
                                } else {
                                    self.absorb(event);
                                }
                            }
                            changed = true;
                        }
                        None => watch = None,
                    }
                }
                Some(outcome) = self.outcomes.1.recv() => {
                    self.finish(outcome);
                    changed = true;
                }
                _ = keep_alive.tick() => {
                    match self.store.keep_alive_once(self.lease).await {
                        Ok(true) if !lease_lost => {}
                        Ok(_) | Err(_) => {
                            // Expired, or etcd away: register again when it answers.
                            lease_lost = true;
                            if self.register().await.is_ok() {
                                lease_lost = false;
                            }
                        }
                    }
                    if watch.is_none() {
                        // Resume from the last revision seen (re-list if it was compacted:
                        // the watch says so with its first message).
                        watch = self.store.watch(&self.store.keys().desired(), self.revision + 1).await.ok();
                    }
                }
                _ = scan.tick() => {
                    if self.scan().await {
                        let key = self.store.keys().node(&self.shared.options.name);
                        let _ = self.store.put(&key, serde_json::to_vec(&self.info()).expect("serializes"), Some(self.lease)).await;
                        changed = true;
                    }
                    if watch.is_none() {
                        watch = self.store.watch(&self.store.keys().desired(), self.revision + 1).await.ok();
                    }
                }
            }
            if changed {
                self.reconcile().await;
            }
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        if outcome.state == ProcessState::Healthy {
            self.stats
                .applied
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.records.insert(
            (outcome.rollout, outcome.pid),
            Record {
                state: outcome.state,
                cause: outcome.cause,
                // Progress (applied, gates being checked): the pipeline still owns the process.
                in_flight: !outcome.settled,
            },
        );
    }

    /// Brings every selected process to what the rollouts want; writes changed reports.
    async fn reconcile(&mut self) {
        let name = self.shared.options.name.clone();
        let node = self.info();
        let rollouts: Vec<(RolloutSpec, RolloutState, i64)> = self
            .rollouts
            .values()
            .filter_map(|d| {
                let (state, rev) = d.state.clone()?;
                Some((d.spec.clone()?, state, rev))
            })
            .collect();
        for (spec, state, state_revision) in rollouts {
            if !spec.selector.matches_node(&node) {
                continue;
            }
            let wanted = state.admits(position(&spec.id, &name));
            let selected: Vec<ProcessInfo> = self
                .processes
                .iter()
                .filter(|p| spec.selector.matches_process(p))
                .cloned()
                .collect();
            for process in &selected {
                let key = (spec.id.clone(), process.pid);
                let record = self.records.get(&key).cloned();
                match (&record, wanted) {
                    (Some(r), _) if r.in_flight => {}
                    (None, true) => {
                        *self.applies.entry(spec.id.clone()).or_default() += 1;
                        self.records.insert(
                            key,
                            Record {
                                state: ProcessState::Staged,
                                cause: None,
                                in_flight: true,
                            },
                        );
                        self.start_pipeline(spec.clone(), process.pid);
                    }
                    (Some(r), false)
                        if matches!(
                            r.state,
                            ProcessState::Applied | ProcessState::Healthy | ProcessState::Staged
                        ) =>
                    {
                        let outcome = self.revert(&spec, process.pid).await;
                        self.records.insert(key, outcome);
                    }
                    (None, false) if state.phase == Phase::Aborted => {
                        // Patched before this node (re)started? Only the agent knows.
                        let host = self.shared.host.clone();
                        let (pid, patch) = (process.pid, spec.patch_name());
                        let applied =
                            tokio::task::spawn_blocking(move || host.is_applied(pid, &patch))
                                .await
                                .ok()
                                .flatten();
                        if applied == Some(true) {
                            let outcome = self.revert(&spec, process.pid).await;
                            self.records.insert(key, outcome);
                        }
                    }
                    _ => {}
                }
            }
            // The report: every selected process past staging (fetching and verifying are not
            // reported: with no check window, one write per process and step).
            let processes: Vec<ProcessReport> = selected
                .iter()
                .filter_map(|p| {
                    let r = self
                        .records
                        .get(&(spec.id.clone(), p.pid))
                        .filter(|r| r.state != ProcessState::Staged)?;
                    Some(ProcessReport {
                        pid: p.pid,
                        state: r.state,
                        cause: r.cause.clone(),
                        applies: self.applies.get(&spec.id).copied().unwrap_or(0),
                    })
                })
                .collect();
            if processes.is_empty() {
                continue;
            }
            let report = NodeReport {
                node: name.clone(),
                state: NodeReport::summarize(&processes),
                processes,
                state_revision,
                at_ms: now_ms(),
            };
            let unchanged = self
                .reported
                .get(&spec.id)
                .is_some_and(|old| old.state == report.state && old.processes == report.processes);
            if !unchanged {
                self.reported.insert(spec.id.clone(), report.clone());
                if let Err(e) = self.write_report(&spec.id, report).await {
                    // Written again at the next registration.
                    tracing::warn!("node {name}: report for {}: {e}", spec.id);
                }
            }
        }
    }

    async fn revert(&self, spec: &RolloutSpec, pid: u32) -> Record {
        let host = self.shared.host.clone();
        let patch = spec.patch_name();
        let result = tokio::task::spawn_blocking(move || match host.is_applied(pid, &patch) {
            Some(false) => Ok(()),
            _ => host.revert(pid, &patch),
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match result {
            Ok(()) => Record {
                state: ProcessState::Reverted,
                cause: None,
                in_flight: false,
            },
            Err(cause) => Record {
                state: ProcessState::Failed,
                cause: Some(format!("revert failed: {cause}")),
                in_flight: false,
            },
        }
    }

    fn start_pipeline(&self, spec: RolloutSpec, pid: u32) {
        let shared = self.shared.clone();
        let sender = self.outcomes.0.clone();
        tokio::spawn(async move {
            let (state, cause) = pipeline(&shared, &spec, pid, sender.clone()).await;
            let _ = sender
                .send(Outcome {
                    rollout: spec.id.clone(),
                    pid,
                    state,
                    cause,
                    settled: true,
                })
                .await;
        });
    }
}

/// Fetch, verify, apply (or canary), watch the gates, revert on failure.
async fn pipeline(
    shared: &Shared,
    spec: &RolloutSpec,
    pid: u32,
    progress: mpsc::Sender<Outcome>,
) -> (ProcessState, Option<String>) {
    let options = &shared.options;
    let fetched = fetch(&spec.artifact, &shared.cache, options.trusted.as_ref()).await;
    let file = match fetched {
        Ok(file) => file,
        Err(e) => return (ProcessState::Failed, Some(e.to_string())),
    };
    // The agent loads `fleet-ID.so` (its name in the agent's history), with the signature
    // beside it for agents that check signatures themselves.
    let patch = options
        .cache
        .join("patches")
        .join(format!("{}.so", spec.patch_name()));
    let staged = (|| -> std::io::Result<()> {
        std::fs::create_dir_all(patch.parent().expect("has a parent"))?;
        if !patch.exists() {
            std::fs::copy(&file, &patch)?;
        }
        if let Some(signature) = &spec.artifact.signature {
            signature
                .write_for(&patch)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        Ok(())
    })();
    if let Err(e) = staged {
        return (
            ProcessState::Failed,
            Some(format!("staging {}: {e}", patch.display())),
        );
    }
    let host = shared.host.clone();
    let gates = spec.gates.clone();
    let spec_id = spec.id.clone();
    let patch_name = spec.patch_name();
    let node_name = options.name.clone();
    let node_health = options.health_command.clone();
    let blocking = tokio::task::spawn_blocking(move || {
        let probes = match &gates.probe {
            Some(gate) => match host.probe_add(pid, &gate.pattern) {
                Ok(ids) => ids,
                Err(e) => return (ProcessState::Failed, Some(format!("probe gate: {e}"))),
            },
            None => Vec::new(),
        };
        // A node that restarted finds the patch already active: it only checks the gates.
        let applied = match (&gates.in_process_canary, host.is_applied(pid, &patch_name)) {
            (_, Some(true)) => Ok(None),
            (Some(canary), _) => host.canary(pid, &patch, canary).map(Some),
            (None, _) => host.apply(pid, &patch, gates.trial_ms).map(|_| None),
        };
        let canary_summary = match applied {
            Ok(summary) => summary,
            Err(cause) => {
                host.probe_remove(pid, &probes);
                return (ProcessState::Failed, Some(cause));
            }
        };
        let before = host.probe_read(pid, &probes).unwrap_or(0);
        if gates.check_ms > 0 {
            let _ = progress.blocking_send(Outcome {
                rollout: spec_id.clone(),
                pid,
                state: ProcessState::Applied,
                cause: canary_summary.clone(),
                settled: false,
            });
            std::thread::sleep(Duration::from_millis(gates.check_ms));
        }
        let mut failure = None;
        if let Some(gate) = &gates.probe {
            match host.probe_read(pid, &probes) {
                Ok(after) if after.saturating_sub(before) > gate.max_calls => {
                    failure = Some(format!(
                        "probe gate: {} called {} times in {} ms (at most {} allowed)",
                        gate.pattern,
                        after - before,
                        gates.check_ms,
                        gate.max_calls
                    ))
                }
                Ok(_) => {}
                Err(e) => failure = Some(format!("probe gate: {e}")),
            }
        }
        host.probe_remove(pid, &probes);
        if failure.is_none()
            && gates.trial_ms.is_some()
            && host.is_applied(pid, &patch_name) == Some(false)
        {
            failure = Some(
                "trial rollback: the patch panicked during its trial and the agent reverted it"
                    .into(),
            );
        }
        let env = vec![
            ("EVOLVE_NODE".to_string(), node_name),
            ("EVOLVE_ROLLOUT".to_string(), spec_id),
        ];
        for command in gates.health_command.iter().chain(node_health.iter()) {
            if failure.is_none() {
                failure = host.health(pid, command, &env).err();
            }
        }
        match failure {
            None => (ProcessState::Healthy, canary_summary),
            Some(cause) => {
                // Leave the process as it was before the rollout reached it.
                if host.is_applied(pid, &patch_name) != Some(false) {
                    let _ = host.revert(pid, &patch_name);
                }
                (ProcessState::Failed, Some(cause))
            }
        }
    });
    blocking
        .await
        .unwrap_or_else(|e| (ProcessState::Failed, Some(format!("node task: {e}"))))
}
