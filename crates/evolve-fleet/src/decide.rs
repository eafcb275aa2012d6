//! The controller's state machine: from what etcd shows, the next state of a rollout (or none).
//!
//! A pure function ([`decide`]) of the spec, the state, the registered nodes, their reports
//! and the members admitted so far, so every rule is tested without etcd:
//!
//! 1. A member (a node admitted by this or an earlier step) is **healthy**, **pending**
//!    (no report yet, staged, applied and checking its gates), **failed** (refused, a gate
//!    failed, its trial rolled it back) or **lost** (its lease expired: not registered).
//! 2. More failed members than the budget allows (`failure_budget × step`; none in the canary)
//!    **aborts**. Failed plus lost beyond it **pauses** (a lost node is no evidence against the
//!    patch); such an automatic pause resumes by itself once enough lost nodes return.
//! 3. Pending members past the step's deadline **abort** (the deadline acts; it does not only
//!    report). There is no barrier: lost and failed nodes within the budget do not hold a step.
//! 4. When no member is pending the step has **converged**; after the bake time the next step
//!    raises `admit` (or the rollout **completes** after the last).

use crate::model::{
    position, threshold, wave_count, NodeInfo, NodeReport, Phase, ProcessState, RolloutSpec,
    RolloutState,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What the controller sees of one rollout.
#[derive(Debug)]
pub struct View<'a> {
    /// The spec.
    pub spec: &'a RolloutSpec,
    /// The state.
    pub state: &'a RolloutState,
    /// Registered nodes, by name.
    pub nodes: &'a BTreeMap<String, NodeInfo>,
    /// Reports for this rollout, by node.
    pub reports: &'a BTreeMap<String, NodeReport>,
    /// Nodes admitted so far.
    pub members: &'a BTreeSet<String>,
    /// Unix milliseconds.
    pub now_ms: u64,
}

/// A member's standing in the current step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "detail")]
pub enum Standing {
    /// Every selected process healthy.
    Healthy,
    /// Not there yet (the report's state, or "no report").
    Pending(String),
    /// Refused or failed a gate (the cause).
    Failed(String),
    /// Its lease expired.
    Lost,
    /// Reverted after an abort.
    Reverted,
}

/// The members of the rollout and their standing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Member → standing.
    pub members: BTreeMap<String, Standing>,
    /// Counts.
    pub healthy: usize,
    /// Counts.
    pub pending: usize,
    /// Counts.
    pub failed: usize,
    /// Counts.
    pub lost: usize,
    /// Failed or lost members the budget allows at this step.
    pub allowed: usize,
    /// Selected nodes registered now.
    pub selected: usize,
}

/// The controller's decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing to write; look again by `wake_ms` (or at the next change).
    Wait {
        /// When a deadline or a bake ends.
        wake_ms: Option<u64>,
    },
    /// Write this state (and the members list) by compare-and-swap.
    Write {
        /// The next state.
        state: RolloutState,
        /// The members after the write.
        members: BTreeSet<String>,
    },
}

fn selected_positions<'a>(view: &View<'a>) -> Vec<(u64, &'a str)> {
    let mut positions: Vec<(u64, &str)> = view
        .nodes
        .values()
        .filter(|n| view.spec.selector.selects(n))
        .map(|n| (position(&view.spec.id, &n.name), n.name.as_str()))
        .collect();
    positions.sort();
    positions
}

/// Who is a member and how each one stands.
pub fn tally(view: &View<'_>) -> Tally {
    let positions = selected_positions(view);
    let mut members: BTreeSet<String> = view.members.clone();
    members.extend(
        positions
            .iter()
            .filter(|(p, _)| {
                view.state.admits(*p)
                    || view.state.phase == Phase::Aborted && *p <= view.state.admit
            })
            .map(|(_, n)| n.to_string()),
    );
    let mut tally = Tally {
        allowed: view.spec.gates.failure_budget * view.state.step,
        selected: positions.len(),
        ..Tally::default()
    };
    for member in members {
        let standing = if !view.nodes.contains_key(&member) {
            Standing::Lost
        } else {
            match view.reports.get(&member) {
                None => Standing::Pending("no report".into()),
                Some(report) => match report.state {
                    ProcessState::Healthy => Standing::Healthy,
                    ProcessState::Failed => Standing::Failed(
                        report
                            .processes
                            .iter()
                            .find_map(|p| p.cause.clone())
                            .unwrap_or_else(|| "failed".into()),
                    ),
                    ProcessState::Reverted if view.state.phase == Phase::Aborted => {
                        Standing::Reverted
                    }
                    ProcessState::Reverted => {
                        Standing::Failed("reverted while the rollout ran".into())
                    }
                    state => Standing::Pending(state.to_string()),
                },
            }
        };
        match standing {
            Standing::Healthy => tally.healthy += 1,
            Standing::Pending(_) => tally.pending += 1,
            Standing::Failed(_) => tally.failed += 1,
            Standing::Lost => tally.lost += 1,
            Standing::Reverted => {}
        }
        tally.members.insert(member, standing);
    }
    tally
}

fn list_members(tally: &Tally, want: impl Fn(&Standing) -> bool) -> String {
    let mut shown: Vec<String> = tally
        .members
        .iter()
        .filter(|(_, s)| want(s))
        .map(|(name, s)| match s {
            Standing::Failed(cause) => format!("{name}: {cause}"),
            Standing::Pending(state) => format!("{name} ({state})"),
            _ => name.clone(),
        })
        .collect();
    if shown.len() > 5 {
        let more = shown.len() - 5;
        shown.truncate(5);
        shown.push(format!("{more} more"));
    }
    shown.join("; ")
}

/// The next state of the rollout, if any (see the module docs).
pub fn decide(view: &View<'_>, by: &str) -> Decision {
    let state = view.state;
    let spec = view.spec;
    let now = view.now_ms;
    let tally = tally(view);
    let members: BTreeSet<String> = tally.members.keys().cloned().collect();
    let write = |state: RolloutState| Decision::Write {
        state,
        members: members.clone(),
    };
    match state.phase {
        Phase::Completed | Phase::Aborted => Decision::Wait { wake_ms: None },
        Phase::Paused => {
            if state.auto_paused && tally.failed + tally.lost <= tally.allowed {
                let mut next = state.clone();
                next.phase = Phase::Running;
                next.auto_paused = false;
                next.reason = None;
                next.step_started_ms = now;
                next.record(now, "lost nodes returned: resumed", by);
                write(next)
            } else {
                Decision::Wait { wake_ms: None }
            }
        }
        Phase::Running => {
            let step_name = spec.step_name(state.step);
            if tally.failed > tally.allowed {
                let mut next = state.clone();
                next.phase = Phase::Aborted;
                next.reason = Some(format!(
                    "{step_name}: {} node{} failed (budget {}): {}",
                    tally.failed,
                    if tally.failed == 1 { "" } else { "s" },
                    tally.allowed,
                    list_members(&tally, |s| matches!(s, Standing::Failed(_)))
                ));
                let why = next.reason.clone().unwrap_or_default();
                next.record(now, why, by);
                return write(next);
            }
            if tally.failed + tally.lost > tally.allowed {
                let mut next = state.clone();
                next.phase = Phase::Paused;
                next.auto_paused = true;
                next.reason = Some(format!(
                    "{step_name}: nodes lost beyond the budget of {}: {} (resumes when they \
                     return; `evolve fleet abort` to give up)",
                    tally.allowed,
                    list_members(&tally, |s| *s == Standing::Lost)
                ));
                let why = next.reason.clone().unwrap_or_default();
                next.record(now, why, by);
                return write(next);
            }
            let deadline = state.step_started_ms + spec.gates.step_deadline_ms;
            if tally.pending > 0 || tally.members.is_empty() {
                if now >= deadline {
                    let mut next = state.clone();
                    next.phase = Phase::Aborted;
                    next.reason = Some(format!(
                        "{step_name} missed its deadline of {} s: {}",
                        spec.gates.step_deadline_ms / 1000,
                        if tally.members.is_empty() {
                            "no node selected".to_string()
                        } else {
                            format!(
                                "still pending: {}",
                                list_members(&tally, |s| matches!(s, Standing::Pending(_)))
                            )
                        }
                    ));
                    let why = next.reason.clone().unwrap_or_default();
                    next.record(now, why, by);
                    return write(next);
                }
                return Decision::Wait {
                    wake_ms: Some(deadline),
                };
            }
            // Converged.
            let converged = match state.converged_ms {
                Some(at) => at,
                None if spec.bake_ms == 0 => now,
                None => {
                    let mut next = state.clone();
                    next.converged_ms = Some(now);
                    return write(next);
                }
            };
            if now < converged + spec.bake_ms {
                return Decision::Wait {
                    wake_ms: Some(converged + spec.bake_ms),
                };
            }
            let mut next = state.clone();
            next.converged_ms = None;
            if state.step + 1 >= spec.steps() {
                next.phase = Phase::Completed;
                next.admit = u64::MAX;
                next.record(
                    now,
                    format!("{step_name} passed: completed ({} healthy)", tally.healthy),
                    by,
                );
                return write(next);
            }
            next.step = state.step + 1;
            let percent = spec.waves[next.step - 1];
            let positions: Vec<u64> = selected_positions(view).iter().map(|(p, _)| *p).collect();
            let count = wave_count(percent, positions.len());
            next.admit = if percent >= 100.0 {
                u64::MAX
            } else {
                threshold(&positions, count).max(state.admit)
            };
            next.step_started_ms = now;
            next.record(
                now,
                format!(
                    "{step_name} passed ({} healthy, {} failed, {} lost): {}",
                    tally.healthy,
                    tally.failed,
                    tally.lost,
                    spec.step_name(next.step)
                ),
                by,
            );
            let mut members = members.clone();
            members.extend(
                selected_positions(view)
                    .iter()
                    .filter(|(p, _)| *p <= next.admit)
                    .map(|(_, n)| n.to_string()),
            );
            Decision::Write {
                state: next,
                members,
            }
        }
    }
}

/// The first state of a rollout: the canary admitted.
pub fn initial_state(
    spec: &RolloutSpec,
    nodes: &BTreeMap<String, NodeInfo>,
    now_ms: u64,
    by: &str,
) -> (RolloutState, BTreeSet<String>) {
    let mut positions: Vec<(u64, String)> = nodes
        .values()
        .filter(|n| spec.selector.selects(n))
        .map(|n| (position(&spec.id, &n.name), n.name.clone()))
        .collect();
    positions.sort();
    let sorted: Vec<u64> = positions.iter().map(|(p, _)| *p).collect();
    let admit = if spec.canary >= sorted.len() && !sorted.is_empty() {
        // Fewer nodes than the canary asks: all of them, but not those joining later.
        *sorted.last().expect("not empty")
    } else {
        threshold(&sorted, spec.canary)
    };
    let members = positions
        .iter()
        .filter(|(p, _)| *p <= admit && spec.canary > 0)
        .map(|(_, n)| n.clone())
        .collect();
    let mut state = RolloutState {
        phase: Phase::Running,
        step: 0,
        admit: if spec.canary == 0 { 0 } else { admit },
        step_started_ms: now_ms,
        converged_ms: None,
        reason: None,
        auto_paused: false,
        transitions: Vec::new(),
    };
    state.record(
        now_ms,
        format!(
            "started: {} of {} selected nodes",
            spec.step_name(0),
            sorted.len()
        ),
        by,
    );
    (state, members)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;

    fn spec(budget: usize, bake_ms: u64) -> RolloutSpec {
        RolloutSpec {
            id: "r1".into(),
            created_ms: 0,
            created_by: "t".into(),
            artifact: Artifact {
                sha256: evolve_trust::Digest::of(b"x"),
                size: 1,
                urls: vec![],
                signature: None,
                name: "x.so".into(),
            },
            selector: Selector::default(),
            canary: 1,
            waves: vec![10.0, 50.0, 100.0],
            bake_ms,
            gates: Gates {
                health_command: None,
                probe: None,
                trial_ms: None,
                check_ms: 0,
                failure_budget: budget,
                step_deadline_ms: 60_000,
                in_process_canary: None,
            },
        }
    }

    fn nodes(n: usize) -> BTreeMap<String, NodeInfo> {
        (0..n)
            .map(|i| {
                let name = format!("n{i:02}");
                let info = NodeInfo {
                    name: name.clone(),
                    labels: BTreeMap::new(),
                    processes: vec![ProcessInfo {
                        pid: 1,
                        program: "kv-server".into(),
                        build_id: None,
                    }],
                    since_ms: 0,
                };
                (name, info)
            })
            .collect()
    }

    fn report(node: &str, state: ProcessState) -> NodeReport {
        NodeReport {
            node: node.into(),
            state,
            processes: vec![ProcessReport {
                pid: 1,
                state,
                cause: (state == ProcessState::Failed).then(|| "health command failed".into()),
                applies: 1,
            }],
            state_revision: 1,
            at_ms: 0,
        }
    }

    /// Every admitted node reports `state`; returns the decision.
    fn run(
        spec: &RolloutSpec,
        state: &RolloutState,
        nodes: &BTreeMap<String, NodeInfo>,
        members: &BTreeSet<String>,
        reported: impl Fn(&str) -> Option<ProcessState>,
        now_ms: u64,
    ) -> Decision {
        let reports: BTreeMap<String, NodeReport> = nodes
            .keys()
            .filter(|n| state.admits(position(&spec.id, n)))
            .filter_map(|n| reported(n).map(|s| (n.clone(), report(n, s))))
            .collect();
        decide(
            &View {
                spec,
                state,
                nodes,
                reports: &reports,
                members,
                now_ms,
            },
            "test",
        )
    }

    #[test]
    fn a_healthy_fleet_goes_canary_then_waves_then_completes() {
        let spec = spec(0, 0);
        let nodes = nodes(20);
        let (mut state, mut members) = initial_state(&spec, &nodes, 0, "test");
        assert_eq!(members.len(), 1);
        let mut admitted = vec![];
        for _ in 0..4 {
            let Decision::Write {
                state: next,
                members: m,
            } = run(
                &spec,
                &state,
                &nodes,
                &members,
                |_| Some(ProcessState::Healthy),
                10,
            )
            else {
                panic!("a converged step advances")
            };
            state = next;
            members = m;
            admitted.push(members.len());
        }
        assert_eq!(admitted, [2, 10, 20, 20]);
        assert_eq!(state.phase, Phase::Completed);
    }

    #[test]
    fn a_failed_canary_aborts_and_names_the_cause() {
        let spec = spec(1, 0);
        let nodes = nodes(20);
        let (state, members) = initial_state(&spec, &nodes, 0, "test");
        let Decision::Write { state, .. } = run(
            &spec,
            &state,
            &nodes,
            &members,
            |_| Some(ProcessState::Failed),
            10,
        ) else {
            panic!("a failed canary aborts")
        };
        assert_eq!(state.phase, Phase::Aborted);
        assert!(state.reason.unwrap().contains("health command failed"));
    }

    #[test]
    fn pending_nodes_abort_at_the_deadline_not_before() {
        let spec = spec(0, 0);
        let nodes = nodes(5);
        let (state, members) = initial_state(&spec, &nodes, 0, "test");
        let d = run(&spec, &state, &nodes, &members, |_| None, 59_999);
        assert_eq!(
            d,
            Decision::Wait {
                wake_ms: Some(60_000)
            }
        );
        let Decision::Write { state, .. } = run(&spec, &state, &nodes, &members, |_| None, 60_000)
        else {
            panic!("the deadline aborts")
        };
        assert_eq!(state.phase, Phase::Aborted);
        assert!(state.reason.unwrap().contains("missed its deadline"));
    }

    #[test]
    fn lost_nodes_within_the_budget_do_not_hold_a_wave_and_beyond_it_pause() {
        let spec = spec(1, 0);
        let mut nodes = nodes(20);
        let (mut state, mut members) = initial_state(&spec, &nodes, 0, "test");
        // Canary, then wave 1 (2 nodes).
        let Decision::Write {
            state: s,
            members: m,
        } = run(
            &spec,
            &state,
            &nodes,
            &members,
            |_| Some(ProcessState::Healthy),
            1,
        )
        else {
            panic!()
        };
        (state, members) = (s, m);
        assert_eq!(state.step, 1);
        // One member of wave 1 dies: within the budget of 1, the wave completes.
        let victim = members.iter().find(|m| !m.is_empty()).cloned().unwrap();
        nodes.remove(&victim);
        let Decision::Write {
            state: s,
            members: m,
        } = run(
            &spec,
            &state,
            &nodes,
            &members,
            |_| Some(ProcessState::Healthy),
            2,
        )
        else {
            panic!("within budget the wave goes on")
        };
        (state, members) = (s, m);
        assert_eq!(state.step, 2);
        // A second loss exceeds 2 × 1? No: budget at step 2 is 2. A third one pauses.
        let others: Vec<String> = members
            .iter()
            .filter(|m| **m != victim)
            .take(2)
            .cloned()
            .collect();
        for o in &others {
            nodes.remove(o);
        }
        let Decision::Write { state: s, .. } = run(
            &spec,
            &state,
            &nodes,
            &members,
            |_| Some(ProcessState::Healthy),
            3,
        ) else {
            panic!("beyond the budget it pauses")
        };
        assert_eq!(s.phase, Phase::Paused);
        assert!(s.auto_paused);
        // They return: it resumes by itself.
        let all = super::tests::nodes(20);
        let Decision::Write { state: s, .. } = run(
            &spec,
            &s,
            &all,
            &members,
            |_| Some(ProcessState::Healthy),
            4,
        ) else {
            panic!("resumes")
        };
        assert_eq!(s.phase, Phase::Running);
    }

    #[test]
    fn a_bake_waits_after_convergence() {
        let spec = spec(0, 5_000);
        let nodes = nodes(4);
        let (state, members) = initial_state(&spec, &nodes, 0, "test");
        let Decision::Write { state, .. } = run(
            &spec,
            &state,
            &nodes,
            &members,
            |_| Some(ProcessState::Healthy),
            100,
        ) else {
            panic!()
        };
        assert_eq!(state.converged_ms, Some(100));
        assert_eq!(state.step, 0);
        let d = run(
            &spec,
            &state,
            &nodes,
            &members,
            |_| Some(ProcessState::Healthy),
            200,
        );
        assert_eq!(
            d,
            Decision::Wait {
                wake_ms: Some(5_100)
            }
        );
        let Decision::Write { state, .. } = run(
            &spec,
            &state,
            &nodes,
            &members,
            |_| Some(ProcessState::Healthy),
            5_100,
        ) else {
            panic!()
        };
        assert_eq!(state.step, 1);
    }
}
