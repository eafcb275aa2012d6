//! The fleet end to end, in one test binary (the three scenarios share the harness and its
//! etcd/tonic code, which took as long to compile as each scenario three times over): a rollout
//! across 20 nodes, refusals that never spread, and failures a rollout rides out. The scenarios
//! hold `harness::serial()`: one fleet at a time.

mod failures;
mod harness;
mod refusals;
mod rollout;
