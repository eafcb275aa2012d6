//! The key layout in etcd, under one prefix (default `/evolve/fleet`):
//!
//! | key | value | written by | lease |
//! |---|---|---|---|
//! | `P/nodes/NODE` | [`NodeInfo`](crate::model::NodeInfo) | the node | the node's |
//! | `P/desired/ID/spec` | [`RolloutSpec`](crate::model::RolloutSpec), immutable | `fleet rollout` | — |
//! | `P/desired/ID/state` | [`RolloutState`](crate::model::RolloutState) | the controller's commands, by compare-and-swap | — |
//! | `P/members/ID` | the nodes admitted so far (the controller's bookkeeping, to notice lost nodes) | with each step, in the same transaction | — |
//! | `P/observed/ID/NODE` | [`NodeReport`](crate::model::NodeReport) | the node | the node's |
//! | `P/leader` | the election of the controllers (etcd's election API) | controllers | each candidate's |
//!
//! Nodes watch `P/desired/` only: the spec and state of every rollout, a few small values, so a
//! step costs each node one event whatever the size of the fleet. The controller watches
//! `P/nodes/` and `P/observed/`.

/// The keys of one fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

/// The default prefix.
pub const DEFAULT_PREFIX: &str = "/evolve/fleet";

impl Keys {
    /// The keys under `prefix` (no trailing slash).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `P/nodes/`
    pub fn nodes(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    /// `P/nodes/NODE`
    pub fn node(&self, node: &str) -> String {
        format!("{}/nodes/{node}", self.prefix)
    }

    /// `P/desired/`
    pub fn desired(&self) -> String {
        format!("{}/desired/", self.prefix)
    }

    /// `P/desired/ID/spec`
    pub fn spec(&self, id: &str) -> String {
        format!("{}/desired/{id}/spec", self.prefix)
    }

    /// `P/desired/ID/state`
    pub fn state(&self, id: &str) -> String {
        format!("{}/desired/{id}/state", self.prefix)
    }

    /// `P/members/ID`
    pub fn members(&self, id: &str) -> String {
        format!("{}/members/{id}", self.prefix)
    }

    /// `P/observed/`
    pub fn observed_all(&self) -> String {
        format!("{}/observed/", self.prefix)
    }

    /// `P/observed/ID/`
    pub fn observed(&self, id: &str) -> String {
        format!("{}/observed/{id}/", self.prefix)
    }

    /// `P/observed/ID/NODE`
    pub fn report(&self, id: &str, node: &str) -> String {
        format!("{}/observed/{id}/{node}", self.prefix)
    }

    /// `P/leader`
    pub fn leader(&self) -> String {
        format!("{}/leader", self.prefix)
    }

    /// Parses `P/desired/ID/(spec|state)` into (ID, "spec" | "state").
    pub fn parse_desired<'a>(&self, key: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix("/desired/")?;
        rest.split_once('/')
    }

    /// Parses `P/observed/ID/NODE` into (ID, NODE).
    pub fn parse_report<'a>(&self, key: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix("/observed/")?;
        rest.split_once('/')
    }

    /// Parses `P/nodes/NODE` into NODE.
    pub fn parse_node<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(&self.prefix)?.strip_prefix("/nodes/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_back() {
        let k = Keys::new("/f/");
        assert_eq!(k.parse_desired(&k.state("r1")), Some(("r1", "state")));
        assert_eq!(k.parse_report(&k.report("r1", "n7")), Some(("r1", "n7")));
        assert_eq!(k.parse_node(&k.node("n7")), Some("n7"));
        assert_eq!(k.parse_node(&k.spec("r1")), None);
    }
}
