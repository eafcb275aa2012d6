//! Evolve's scale layer: a patch rolled out across a fleet, on etcd.
//!
//! One **node daemon** per machine ([`node`]) registers under a lease, watches the desired
//! state, applies patches to its selected local processes through their agents, checks the
//! health gates and reports what it observed. A leader-elected **controller** ([`controller`])
//! takes each rollout through its canary and waves, one compare-and-swap per step, aborting on
//! failed gates or missed deadlines. Patch bodies stay out of etcd: content-addressed, served
//! over HTTP ([`artifact`], [`web`]) and verified by every node against trusted ed25519 keys
//! ([`evolve_trust`]).
//!
//! | module | what |
//! |---|---|
//! | [`model`] | spec, state, reports; how a node knows it is in a wave |
//! | [`keys`] | the key layout in etcd |
//! | [`decide`] | the controller's state machine (pure) |
//! | [`controller`] | leader election, steps by compare-and-swap, operator commands, status |
//! | [`node`] | the node's state machine and its loop |
//! | [`host`] | what a node does to local processes: agents, or simulated |
//! | [`store`] | etcd access (counted), watches that resume |
//! | [`artifact`], [`web`] | the artifact store, HTTP serving and fetching, the operators' page |
//!
//! `docs/fleet.md` describes the model, the failure behaviour and the comparison with
//! livepatch tiers, KernelCare feeds, Argo Rollouts and Erlang's release handler.
//!
//! # Example
//!
//! Which nodes a rollout admits is a pure function of its id, the node names and one number:
//!
//! ```
//! use evolve_fleet::model::{position, threshold, wave_count};
//!
//! let mut positions: Vec<u64> = (0..20).map(|i| position("r1", &format!("node{i}"))).collect();
//! positions.sort();
//! let admit = threshold(&positions, wave_count(50.0, 20));
//! assert_eq!(positions.iter().filter(|&&p| p <= admit).count(), 10);
//! ```

pub mod artifact;
pub mod controller;
pub mod decide;
mod error;
pub mod host;
pub mod keys;
pub mod local_etcd;
pub mod model;
pub mod node;
pub mod store;
pub mod web;

pub use error::{Error, ErrorKind, Result};
pub use evolve_trust as trust;
