//! Committees: every honest node computes the same committee for an epoch (`agreement`), a
//! fresh selection never picks a node quarantined in the committed reputation table
//! (`committee_eligibility`), and no committee holds more Byzantine members than its `f`
//! (`committee_fault_bound`).

use std::collections::BTreeMap;

use dwcp_consensus::Committee;
use dwcp_protocol::NodeId;

use super::Violation;

/// The committee of each epoch, as the first honest node to reach it computed it.
#[derive(Debug, Default)]
pub struct Committees {
    by_epoch: BTreeMap<u64, Committee>,
}

impl Committees {
    /// Starts with the genesis committee.
    pub fn new(genesis: Committee) -> Self {
        Self {
            by_epoch: BTreeMap::from([(genesis.epoch(), genesis)]),
        }
    }

    /// The committee of `epoch`, once an honest node computed it.
    pub fn get(&self, epoch: u64) -> Option<&Committee> {
        self.by_epoch.get(&epoch)
    }

    /// All committees, by epoch.
    pub fn all(&self) -> impl Iterator<Item = &Committee> {
        self.by_epoch.values()
    }

    /// Honest node `node` computed `next` after `current`; `quarantined` is its committed
    /// quarantine test, `byzantine` tells the simulator's Byzantine nodes. Returns whether this
    /// node was the first to reach the epoch and whether the new committee left out a
    /// quarantined member of `current`.
    pub fn check(
        &mut self,
        at_ms: u64,
        node: usize,
        current: &Committee,
        next: &Committee,
        quarantined: &dyn Fn(&NodeId) -> bool,
        byzantine: &dyn Fn(&NodeId) -> bool,
    ) -> Result<bool, Violation> {
        let epoch = next.epoch();
        if let Some(c) = self.by_epoch.get(&epoch) {
            if c != next {
                return Err(Violation {
                    invariant: "agreement",
                    detail: format!("node {node} computed another committee for epoch {epoch}"),
                    at_ms,
                });
            }
            return Ok(false);
        }
        self.by_epoch.insert(epoch, next.clone());
        // Current members carried over for want of candidates keep their order; a fresh
        // selection reorders them.
        if next.members() != current.members() && next.members().iter().any(quarantined) {
            return Err(Violation {
                invariant: "committee_eligibility",
                detail: format!("node {node}: epoch {epoch} committee holds a quarantined node"),
                at_ms,
            });
        }
        let byz = next.members().iter().filter(|m| byzantine(m)).count();
        if byz > next.f() {
            return Err(Violation {
                invariant: "committee_fault_bound",
                detail: format!(
                    "epoch {epoch} committee of {} holds {byz} Byzantine members (f = {})",
                    next.n(),
                    next.f()
                ),
                at_ms,
            });
        }
        Ok(current
            .members()
            .iter()
            .any(|m| quarantined(m) && !next.contains(m)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dwcp_protocol::NodeKey;

    fn node(i: u8) -> NodeId {
        NodeKey::from_secret_bytes([i; 32]).node_id()
    }

    fn committee(epoch: u64, ids: &[u8]) -> Committee {
        Committee::new(epoch, ids.iter().map(|i| node(*i)).collect()).unwrap()
    }

    #[test]
    fn each_rule_reports_its_violation() {
        let genesis = committee(0, &[1, 2, 3, 4]);
        let mut c = Committees::new(genesis.clone());
        let none = |_: &NodeId| false;
        let q4 = |n: &NodeId| *n == node(4);
        // Node 4 quarantined and left out: fine, counted.
        let e1 = committee(1, &[5, 2, 1, 3]);
        assert_eq!(c.check(0, 0, &genesis, &e1, &q4, &none), Ok(true));
        // Another honest node computing the same: fine; a different one: agreement.
        assert_eq!(c.check(0, 1, &genesis, &e1, &q4, &none), Ok(false));
        let other = committee(1, &[5, 2, 1, 6]);
        assert_eq!(
            c.check(0, 2, &genesis, &other, &q4, &none)
                .unwrap_err()
                .invariant,
            "agreement"
        );
        // A fresh selection holding a quarantined node.
        let e2 = committee(2, &[4, 5, 2, 1]);
        assert_eq!(
            c.check(0, 0, &e1, &e2, &q4, &none).unwrap_err().invariant,
            "committee_eligibility"
        );
        // Carried over unchanged: allowed even with a quarantined member.
        let mut c = Committees::new(genesis.clone());
        let carried = committee(1, &[1, 2, 3, 4]);
        assert_eq!(c.check(0, 0, &genesis, &carried, &q4, &none), Ok(false));
        // Two Byzantine members in a committee of four (f = 1).
        let byz = |n: &NodeId| *n == node(5) || *n == node(6);
        let e2 = committee(2, &[5, 6, 2, 1]);
        assert_eq!(
            c.check(0, 0, &carried, &e2, &none, &byz)
                .unwrap_err()
                .invariant,
            "committee_fault_bound"
        );
    }
}
