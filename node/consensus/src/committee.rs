//! Committees without controllers: the replica set of an epoch is a pure function of committed
//! state, so every honest node computes the same one.
//!
//! Eligible nodes (ready, not quarantined, reputation at or above a threshold, minimum uptime)
//! are ordered by `SHA-256(seed || node id)` where the seed is derived from the state digest of
//! the last stable checkpoint and the epoch number ([`epoch_seed`]); the first `size` form the
//! committee. Nobody can pick their place: the seed is fixed by a checkpoint that 2f+1 replicas
//! signed before the epoch's candidates were known to be ordered by it.

use dwcp_protocol::NodeId;
use serde::{Deserialize, Serialize};

use crate::messages::{Digest, MAX_VOTES};

/// Why a committee could not be formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommitteeError {
    /// No members.
    #[error("a committee needs at least one member")]
    Empty,
    /// The same node is listed twice.
    #[error("node {0:?} is listed twice")]
    Duplicate(NodeId),
    /// More members than a certificate can hold.
    #[error("{0} members exceed the limit of {MAX_VOTES}")]
    TooLarge(usize),
    /// Fewer eligible candidates than the requested size.
    #[error("only {eligible} eligible candidates for a committee of {wanted}")]
    NotEnoughEligible {
        /// Eligible candidates found.
        eligible: usize,
        /// Committee size asked for.
        wanted: usize,
    },
}

/// The replicas of one epoch, in primary order: view `v` is led by `members[v mod n]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committee {
    epoch: u64,
    members: Vec<NodeId>,
}

impl Committee {
    /// A committee with the given members (order matters: it is the primary rotation).
    pub fn new(epoch: u64, members: Vec<NodeId>) -> Result<Self, CommitteeError> {
        if members.is_empty() {
            return Err(CommitteeError::Empty);
        }
        if members.len() > MAX_VOTES {
            return Err(CommitteeError::TooLarge(members.len()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for m in &members {
            if !seen.insert(*m) {
                return Err(CommitteeError::Duplicate(*m));
            }
        }
        Ok(Self { epoch, members })
    }

    /// The epoch this committee serves.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Members in primary order.
    pub fn members(&self) -> &[NodeId] {
        &self.members
    }

    /// `n`.
    pub fn n(&self) -> usize {
        self.members.len()
    }

    /// `f`: the most Byzantine members tolerated, `floor((n - 1) / 3)`.
    pub fn f(&self) -> usize {
        (self.n() - 1) / 3
    }

    /// Size of a quorum: `2f + 1` when `n = 3f + 1`; in general the smallest size whose
    /// pairwise intersections hold `f + 1` members, `floor((n + f) / 2) + 1`.
    pub fn quorum(&self) -> usize {
        (self.n() + self.f()) / 2 + 1
    }

    /// Whether `node` is a member.
    pub fn contains(&self, node: &NodeId) -> bool {
        self.members.contains(node)
    }

    /// The primary of `view`.
    pub fn primary(&self, view: u64) -> NodeId {
        // n >= 1 is checked at construction.
        let idx = (view % self.n() as u64) as usize;
        self.members[idx]
    }
}

/// What the committee selection knows about a node, all from committed state.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The node.
    pub node: NodeId,
    /// Whether it announced itself ready.
    pub ready: bool,
    /// Whether it is quarantined.
    pub quarantined: bool,
    /// Its reputation score.
    pub reputation: f64,
    /// How long it has been up, in seconds.
    pub uptime_s: u64,
}

/// Eligibility rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Eligibility {
    /// Lowest reputation score that may serve.
    pub min_reputation: f64,
    /// Shortest uptime that may serve, in seconds.
    pub min_uptime_s: u64,
}

impl Default for Eligibility {
    fn default() -> Self {
        Self {
            min_reputation: 0.5,
            min_uptime_s: 600,
        }
    }
}

/// The seed that orders candidates for `epoch`: derived from the replicated state digest of
/// the last stable checkpoint before the epoch starts.
pub fn epoch_seed(stable_state: &Digest, epoch: u64) -> Digest {
    Digest::of(
        "dwcp/v3/committee-seed",
        &[&stable_state.0, &epoch.to_be_bytes()],
    )
}

/// Chooses the committee of `epoch`: eligible candidates ordered by `H(seed || id)`, the first
/// `size` of them. Equal inputs give equal committees whatever the candidates' input order.
pub fn select(
    epoch: u64,
    candidates: &[Candidate],
    seed: &Digest,
    size: usize,
    rules: &Eligibility,
) -> Result<Committee, CommitteeError> {
    let mut ranked: Vec<(Digest, NodeId)> = candidates
        .iter()
        .filter(|c| {
            c.ready
                && !c.quarantined
                && c.reputation >= rules.min_reputation
                && c.uptime_s >= rules.min_uptime_s
        })
        .map(|c| {
            (
                Digest::of("dwcp/v3/committee-rank", &[&seed.0, c.node.as_bytes()]),
                c.node,
            )
        })
        .collect();
    ranked.sort();
    ranked.dedup_by(|a, b| a.1 == b.1);
    if ranked.len() < size {
        return Err(CommitteeError::NotEnoughEligible {
            eligible: ranked.len(),
            wanted: size,
        });
    }
    Committee::new(
        epoch,
        ranked.into_iter().take(size).map(|(_, n)| n).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use dwcp_protocol::NodeKey;

    fn node(i: u8) -> NodeId {
        NodeKey::from_secret_bytes([i; 32]).node_id()
    }

    fn cand(i: u8) -> Candidate {
        Candidate {
            node: node(i),
            ready: true,
            quarantined: false,
            reputation: 1.0,
            uptime_s: 3600,
        }
    }

    #[test]
    fn quorum_sizes_follow_3f_plus_1() {
        for (n, f, q) in [
            (1, 0, 1),
            (4, 1, 3),
            (7, 2, 5),
            (16, 5, 11),
            (31, 10, 21),
            (64, 21, 43),
        ] {
            let c = Committee::new(0, (0..n).map(|i| node(i as u8 + 1)).collect()).unwrap();
            assert_eq!((c.f(), c.quorum()), (f, q), "n = {n}");
            // Two quorums intersect in at least f + 1 members.
            assert!(2 * q - n > f);
        }
    }

    #[test]
    fn selection_is_deterministic_and_filters_ineligible() {
        let mut cands: Vec<Candidate> = (1..=10).map(cand).collect();
        cands[0].quarantined = true;
        cands[1].reputation = 0.2;
        cands[2].uptime_s = 10;
        cands[3].ready = false;
        let seed = epoch_seed(&Digest([9; 32]), 3);
        let a = select(3, &cands, &seed, 4, &Eligibility::default()).unwrap();
        cands.reverse();
        let b = select(3, &cands, &seed, 4, &Eligibility::default()).unwrap();
        assert_eq!(a, b);
        for bad in [node(1), node(2), node(3), node(4)] {
            assert!(!a.contains(&bad));
        }
        let other = select(
            3,
            &cands,
            &epoch_seed(&Digest([8; 32]), 3),
            6,
            &Eligibility::default(),
        )
        .unwrap();
        assert_eq!(other.n(), 6);
        assert_eq!(
            select(3, &cands, &seed, 7, &Eligibility::default()),
            Err(CommitteeError::NotEnoughEligible {
                eligible: 6,
                wanted: 7
            })
        );
    }

    #[test]
    fn duplicate_members_are_rejected() {
        assert_eq!(
            Committee::new(0, vec![node(1), node(1)]),
            Err(CommitteeError::Duplicate(node(1)))
        );
        assert_eq!(Committee::new(0, vec![]), Err(CommitteeError::Empty));
    }
}
