//! Reputation agreement: equal committed inputs give equal scores. After executing sequence
//! number `s`, every honest node's reputation table (every score, in integer units, and the
//! quarantine set) must be identical to every other honest node's after `s`.

use std::collections::BTreeMap;

use dwcp_consensus::Digest;
use dwcp_protocol::NodeId;

use super::Violation;

/// The first table digest an honest node reached after each sequence number.
#[derive(Debug, Default)]
pub struct ReputationAgreement {
    after: BTreeMap<u64, (Digest, usize)>,
    compared: u64,
}

/// The digest of a reputation table: scores by node, then the quarantined nodes.
pub fn table_digest(
    scores: impl Iterator<Item = (NodeId, i64)>,
    quarantined: impl Iterator<Item = NodeId>,
) -> Digest {
    let mut bytes = Vec::new();
    for (n, s) in scores {
        bytes.extend_from_slice(n.as_bytes());
        bytes.extend_from_slice(&s.to_be_bytes());
    }
    bytes.push(0xFF);
    for n in quarantined {
        bytes.extend_from_slice(n.as_bytes());
    }
    Digest::of("dwcp-sim/reputation-table", &[&bytes])
}

impl ReputationAgreement {
    /// Honest node `node` has table `table` after executing `seq`.
    pub fn check(
        &mut self,
        at_ms: u64,
        node: usize,
        seq: u64,
        table: Digest,
    ) -> Result<(), Violation> {
        match self.after.get(&seq) {
            None => {
                self.after.insert(seq, (table, node));
                Ok(())
            }
            Some((d, _)) if *d == table => {
                self.compared += 1;
                Ok(())
            }
            Some((_, first)) => Err(Violation {
                invariant: "reputation_agreement",
                detail: format!(
                    "after seq {seq}: node {node}'s reputation scores differ from node {first}'s"
                ),
                at_ms,
            }),
        }
    }

    /// How many tables were compared with an earlier node's (and matched).
    pub fn compared(&self) -> u64 {
        self.compared
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dwcp_protocol::NodeKey;

    #[test]
    fn differing_scores_are_caught() {
        let a = NodeKey::from_secret_bytes([1; 32]).node_id();
        let t1 = table_digest([(a, 10_000)].into_iter(), std::iter::empty());
        let t2 = table_digest([(a, 9_900)].into_iter(), std::iter::empty());
        let mut r = ReputationAgreement::default();
        r.check(0, 0, 5, t1).unwrap();
        r.check(1, 1, 5, t1).unwrap();
        assert_eq!(r.compared(), 1);
        let v = r.check(2, 2, 5, t2).unwrap_err();
        assert_eq!(v.invariant, "reputation_agreement");
    }
}
