//! The controller: creates rollouts, and, when elected leader, takes their steps.
//!
//! Several controllers may run; etcd's election picks one leader (the candidate's key lives
//! under its lease, so a dead leader is replaced within the lease TTL). The leader reads the
//! fleet, asks [`decide`] for the next state, and writes it with one transaction that
//! succeeds only if the state's revision is still the one it read **and** its leader key still
//! exists: a step is never taken twice, nor by a controller that lost its leadership. After a
//! conflict it reads again.
//!
//! Operator commands (`pause`, `resume`, `abort`) are the same kind of write: read the state,
//! change it, compare-and-swap. They need no controller to be running — an abort is obeyed by the
//! nodes directly.

use crate::decide::{decide, initial_state, tally, Decision, Tally, View};
use crate::error::{Error, Result};
use crate::model::{now_ms, position, NodeInfo, NodeReport, Phase, RolloutSpec, RolloutState};
use crate::store::{Conflict, Store};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// One rollout as etcd holds it.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Its spec.
    pub spec: RolloutSpec,
    /// Its state.
    pub state: RolloutState,
    /// The state key's revision (what a compare-and-swap expects).
    pub state_revision: i64,
    /// Nodes admitted so far.
    pub members: BTreeSet<String>,
    /// The members key's revision (0: none).
    pub members_revision: i64,
}

/// Every rollout, oldest first.
pub async fn rollouts(store: &Store) -> Result<Vec<Loaded>> {
    let keys = store.keys().clone();
    let (entries, _) = store.list(&keys.desired()).await?;
    let mut specs = BTreeMap::new();
    let mut states = BTreeMap::new();
    for entry in &entries {
        match keys.parse_desired(&entry.key) {
            Some((id, "spec")) => {
                specs.insert(id.to_string(), entry.json::<RolloutSpec>()?);
            }
            Some((id, "state")) => {
                states.insert(
                    id.to_string(),
                    (entry.json::<RolloutState>()?, entry.mod_revision),
                );
            }
            _ => {}
        }
    }
    let (member_entries, _) = store.list(&format!("{}/members/", keys.prefix())).await?;
    let mut members: BTreeMap<String, (BTreeSet<String>, i64)> = BTreeMap::new();
    for entry in &member_entries {
        if let Some(id) = entry.key.rsplit('/').next() {
            members.insert(id.to_string(), (entry.json()?, entry.mod_revision));
        }
    }
    Ok(specs
        .into_iter()
        .filter_map(|(id, spec)| {
            let (state, state_revision) = states.remove(&id)?;
            let (members, members_revision) = members.remove(&id).unwrap_or_default();
            Some(Loaded {
                spec,
                state,
                state_revision,
                members,
                members_revision,
            })
        })
        .collect())
}

/// The rollout `id`, or the newest one.
pub async fn rollout(store: &Store, id: Option<&str>) -> Result<Loaded> {
    let all = rollouts(store).await?;
    match id {
        Some(id) => all
            .into_iter()
            .find(|l| l.spec.id == id)
            .ok_or_else(|| Error::not_found(format!("rollout {id}"))),
        None => all
            .into_iter()
            .next_back()
            .ok_or_else(|| Error::not_found("a rollout (none was ever started)")),
    }
}

/// Registered nodes.
pub async fn nodes(store: &Store) -> Result<BTreeMap<String, NodeInfo>> {
    let (entries, _) = store.list(&store.keys().nodes()).await?;
    entries
        .iter()
        .map(|e| Ok((e.json::<NodeInfo>()?.name, e.json()?)))
        .collect()
}

/// The reports of rollout `id`, by node.
pub async fn reports(store: &Store, id: &str) -> Result<BTreeMap<String, NodeReport>> {
    let (entries, _) = store.list(&store.keys().observed(id)).await?;
    entries
        .iter()
        .map(|e| {
            let report: NodeReport = e.json()?;
            Ok((report.node.clone(), report))
        })
        .collect()
}

/// Writes a new rollout: its spec, its first state (the canary admitted) and its members.
/// Refused while another rollout is running or paused.
pub async fn create(store: &Store, spec: &RolloutSpec, by: &str) -> Result<RolloutState> {
    if let Some(active) = rollouts(store)
        .await?
        .iter()
        .find(|l| !l.state.phase.is_final())
    {
        return Err(Error::invalid(format!(
            "rollout {} is {} ({}): finish, or abort it first",
            active.spec.id,
            active.state.phase,
            active.spec.step_name(active.state.step)
        )));
    }
    let nodes = nodes(store).await?;
    if !nodes.values().any(|n| spec.selector.selects(n)) {
        return Err(Error::invalid(format!(
            "no registered node has a process matching the selector ({}); {} node{} registered",
            spec.selector.describe(),
            nodes.len(),
            if nodes.len() == 1 { "" } else { "s" }
        )));
    }
    let (state, members) = initial_state(spec, &nodes, now_ms(), by);
    let keys = store.keys();
    let written = store
        .compare_and_swap(
            &[(keys.spec(&spec.id), 0)],
            None,
            vec![
                (
                    keys.spec(&spec.id),
                    serde_json::to_vec(spec).expect("serializes"),
                ),
                (
                    keys.state(&spec.id),
                    serde_json::to_vec(&state).expect("serializes"),
                ),
                (
                    keys.members(&spec.id),
                    serde_json::to_vec(&members).expect("serializes"),
                ),
            ],
        )
        .await?;
    match written {
        Ok(_) => Ok(state),
        Err(Conflict) => Err(Error::invalid(format!(
            "rollout {} exists already",
            spec.id
        ))),
    }
}

/// An operator's change of a rollout's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Stop advancing.
    Pause,
    /// Advance again (the step's deadline restarts).
    Resume,
    /// Revert every node.
    Abort,
}

/// Applies an operator command to rollout `id` (or the newest), by compare-and-swap.
pub async fn command(
    store: &Store,
    id: Option<&str>,
    command: Command,
    by: &str,
    reason: Option<&str>,
) -> Result<Loaded> {
    loop {
        let mut loaded = rollout(store, id).await?;
        let state = &mut loaded.state;
        let now = now_ms();
        match (command, state.phase) {
            (_, phase) if phase.is_final() => {
                return Err(Error::invalid(format!(
                    "rollout {} is {phase}: nothing to {}",
                    loaded.spec.id,
                    match command {
                        Command::Pause => "pause",
                        Command::Resume => "resume",
                        Command::Abort => "abort",
                    }
                )))
            }
            (Command::Pause, Phase::Paused) | (Command::Resume, Phase::Running) => {
                return Ok(loaded)
            }
            (Command::Pause, _) => {
                state.phase = Phase::Paused;
                state.auto_paused = false;
                state.reason = Some(reason.unwrap_or("paused by the operator").to_string());
                let why = state.reason.clone().unwrap_or_default();
                state.record(now, why, by);
            }
            (Command::Resume, _) => {
                state.phase = Phase::Running;
                state.auto_paused = false;
                state.reason = None;
                state.step_started_ms = now;
                state.record(now, "resumed by the operator", by);
            }
            (Command::Abort, _) => {
                state.phase = Phase::Aborted;
                state.reason = Some(reason.unwrap_or("aborted by the operator").to_string());
                let why = state.reason.clone().unwrap_or_default();
                state.record(now, why, by);
            }
        }
        let key = store.keys().state(&loaded.spec.id);
        let written = store
            .compare_and_swap(
                &[(key.clone(), loaded.state_revision)],
                None,
                vec![(key, serde_json::to_vec(&loaded.state).expect("serializes"))],
            )
            .await?;
        if let Ok(revision) = written {
            loaded.state_revision = revision;
            return Ok(loaded);
        }
    }
}

/// How a controller runs.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// Its name in the election (`host:pid`).
    pub name: String,
    /// Its lease TTL, seconds (a dead leader is replaced after it).
    pub lease_ttl_s: i64,
    /// Return once this rollout is completed or aborted (none: run until stopped).
    pub until: Option<String>,
}

/// Steps taken by this controller (its writes that succeeded), for tests and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The rollout.
    pub rollout: String,
    /// The revision of the write.
    pub revision: i64,
    /// The state written.
    pub state: RolloutState,
}

/// Runs a controller: campaigns, and while leader takes every rollout's steps. Returns the
/// final phase of `options.until` when it ends.
pub async fn run(
    store: &Store,
    options: &ControllerOptions,
    mut on_step: impl FnMut(&Step),
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Option<Phase>> {
    loop {
        let lease = store.grant(options.lease_ttl_s).await?;
        let (lost_sender, mut lost) = tokio::sync::watch::channel(false);
        let keeper_store = store.clone();
        let every = Duration::from_millis(options.lease_ttl_s as u64 * 1000 / 3);
        let keeper = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if !matches!(keeper_store.keep_alive_once(lease).await, Ok(true)) {
                    let _ = lost_sender.send(true);
                    return;
                }
            }
        });
        let leader = tokio::select! {
            _ = stop.changed() => { keeper.abort(); return Ok(None); }
            _ = lost.changed() => { keeper.abort(); continue; }
            leader = campaign(store, &options.name, lease) => leader,
        };
        let Ok((leader_key, leader_revision)) = leader else {
            // etcd's request timeout ends a long campaign: withdraw this candidacy at once
            // (no stale candidate ahead of the next one) and campaign again.
            keeper.abort();
            let _ = store.revoke(lease).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        tracing::info!("controller {} leads", options.name);
        let mut events = store
            .watch(&format!("{}/", store.keys().prefix()), 0)
            .await?;
        let result = loop {
            let wake =
                match lead_once(store, options, &leader_key, leader_revision, &mut on_step).await {
                    Ok(Ok(wake)) => wake,
                    Ok(Err(phase)) => break Some(phase),
                    Err(e) => {
                        tracing::warn!("controller {}: {e}", options.name);
                        Some(now_ms() + 500)
                    }
                };
            let sleep_ms = wake.map_or(1000, |w| w.saturating_sub(now_ms()).clamp(1, 1000));
            tokio::select! {
                _ = stop.changed() => break None,
                _ = lost.changed() => break None,
                event = events.recv() => {
                    if event.is_none() {
                        events = match store.watch(&format!("{}/", store.keys().prefix()), 0).await {
                            Ok(e) => e,
                            Err(_) => { tokio::time::sleep(Duration::from_millis(300)).await; continue; }
                        };
                    }
                    // Coalesce a burst of changes into one look.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    while events.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
            }
        };
        keeper.abort();
        let _ = store.revoke(lease).await;
        match result {
            Some(phase) => return Ok(Some(phase)),
            None if *stop.borrow() => return Ok(None),
            None => continue,
        }
    }
}

async fn campaign(store: &Store, name: &str, lease: i64) -> Result<(Vec<u8>, i64)> {
    store.campaign(name, lease).await
}

/// One look at the fleet as leader. `Ok(Err(phase))`: the rollout waited for is final.
async fn lead_once(
    store: &Store,
    options: &ControllerOptions,
    leader_key: &[u8],
    leader_revision: i64,
    on_step: &mut impl FnMut(&Step),
) -> Result<std::result::Result<Option<u64>, Phase>> {
    let all = rollouts(store).await?;
    if let Some(until) = &options.until {
        if let Some(done) = all
            .iter()
            .find(|l| &l.spec.id == until && l.state.phase.is_final())
        {
            return Ok(Err(done.state.phase));
        }
    }
    let active: Vec<&Loaded> = all.iter().filter(|l| !l.state.phase.is_final()).collect();
    if active.is_empty() {
        return Ok(Ok(None));
    }
    let nodes = nodes(store).await?;
    let mut wake: Option<u64> = None;
    for loaded in active {
        let reports = reports(store, &loaded.spec.id).await?;
        let view = View {
            spec: &loaded.spec,
            state: &loaded.state,
            nodes: &nodes,
            reports: &reports,
            members: &loaded.members,
            now_ms: now_ms(),
        };
        match decide(&view, &options.name) {
            Decision::Wait { wake_ms } => {
                if let Some(w) = wake_ms {
                    wake = Some(wake.map_or(w, |x| x.min(w)));
                }
            }
            Decision::Write { state, members } => {
                let keys = store.keys();
                let mut writes = vec![(
                    keys.state(&loaded.spec.id),
                    serde_json::to_vec(&state).expect("serializes"),
                )];
                let mut expect = vec![(keys.state(&loaded.spec.id), loaded.state_revision)];
                if members != loaded.members {
                    writes.push((
                        keys.members(&loaded.spec.id),
                        serde_json::to_vec(&members).expect("serializes"),
                    ));
                    expect.push((keys.members(&loaded.spec.id), loaded.members_revision));
                }
                let written = store
                    .compare_and_swap(&expect, Some((leader_key, leader_revision)), writes)
                    .await?;
                if let Ok(revision) = written {
                    on_step(&Step {
                        rollout: loaded.spec.id.clone(),
                        revision,
                        state: state.clone(),
                    });
                }
                // Look again at once, whether it was written or someone else wrote first.
                wake = Some(now_ms());
            }
        }
    }
    Ok(Ok(wake))
}

/// A node's row in a rollout's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRow {
    /// The node.
    pub name: String,
    /// Whether it is registered now (its lease is alive).
    pub registered: bool,
    /// Whether the state admits it.
    pub admitted: bool,
    /// Its report, if any.
    pub report: Option<NodeReport>,
}

/// Everything `fleet status` and the web page show of a rollout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// The spec.
    pub spec: RolloutSpec,
    /// The state.
    pub state: RolloutState,
    /// Its revision.
    pub state_revision: i64,
    /// Members and their standing.
    pub tally: Tally,
    /// Every selected or reporting node.
    pub nodes: Vec<NodeRow>,
    /// The controller leading now, if any.
    pub leader: Option<String>,
}

/// The status of rollout `id` (or the newest).
pub async fn status(store: &Store, id: Option<&str>) -> Result<RolloutStatus> {
    let loaded = rollout(store, id).await?;
    let nodes = nodes(store).await?;
    let reports = reports(store, &loaded.spec.id).await?;
    let tally = tally(&View {
        spec: &loaded.spec,
        state: &loaded.state,
        nodes: &nodes,
        reports: &reports,
        members: &loaded.members,
        now_ms: now_ms(),
    });
    let mut names: BTreeSet<String> = nodes
        .values()
        .filter(|n| loaded.spec.selector.selects(n))
        .map(|n| n.name.clone())
        .collect();
    names.extend(reports.keys().cloned());
    names.extend(loaded.members.iter().cloned());
    let rows = names
        .into_iter()
        .map(|name| NodeRow {
            registered: nodes.contains_key(&name),
            admitted: position(&loaded.spec.id, &name) <= loaded.state.admit,
            report: reports.get(&name).cloned(),
            name,
        })
        .collect();
    Ok(RolloutStatus {
        leader: store.leader().await.unwrap_or(None),
        spec: loaded.spec,
        state: loaded.state,
        state_revision: loaded.state_revision,
        tally,
        nodes: rows,
    })
}
