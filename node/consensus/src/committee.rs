//! Committees without controllers: the replica set of an epoch is a pure function of committed
//! state, so every honest node computes the same one.
//!
//! Eligible nodes (ready, not quarantined, reputation at or above a threshold, minimum uptime)
//! are ordered by `SHA-256(seed || node id)` where the seed is derived from the state digest of
//! the last stable checkpoint and the epoch number ([`epoch_seed`]); the first `size` form the
//! committee. Nobody can pick their place: the seed is fixed by a checkpoint that 2f+1 replicas
//! signed before the epoch's candidates were known to be ordered by it.
//!
//! # Epochs
//!
//! Reconfiguration happens only at epoch boundaries: stable checkpoints whose sequence number
//! is a multiple of [`EpochRules::epoch_length`]. Joins and leaves are operations committed
//! through consensus and applied to a [`Membership`] in commit order with the batch time the
//! primary fixed; the committee of the next epoch is [`next_committee`] of the membership,
//! reputation and state digest *at the boundary*. Everything it reads is committed, so every
//! honest node computes the same committee, and an operation committed after the boundary only
//! counts at the next one: the set never splits.

use std::collections::BTreeMap;

use dwcp_protocol::{NodeId, Timestamp};
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

    /// The position of `node` in the member list (how compact votes name their signer).
    pub fn index_of(&self, node: &NodeId) -> Option<u16> {
        self.members
            .iter()
            .position(|m| m == node)
            .and_then(|i| u16::try_from(i).ok())
    }

    /// The member at position `index`.
    pub fn member(&self, index: u16) -> Option<NodeId> {
        self.members.get(usize::from(index)).copied()
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
    /// A node counts as ready only if it declared so at most this long ago, in seconds
    /// (nodes renew it; one that went away stops being chosen). 0: no limit.
    pub max_ready_age_s: u64,
}

impl Default for Eligibility {
    fn default() -> Self {
        Self {
            min_reputation: 0.5,
            min_uptime_s: 600,
            max_ready_age_s: 0,
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

/// A change of membership, committed through consensus as a request's operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipOp {
    /// A node joins (its uptime counts from the batch time of this operation).
    Join(NodeId),
    /// A node declares itself ready (or not) to serve; joins it if it had not joined.
    Ready(NodeId, bool),
    /// A node leaves.
    Leave(NodeId),
}

/// First byte of a request `op` that carries a [`MembershipOp`]: `0xA7` followed by the
/// operation as CBOR.
pub const MEMBERSHIP_OP_TAG: u8 = 0xA7;
/// Most nodes a [`Membership`] holds; joins beyond it are refused.
pub const MAX_MEMBERS: usize = 100_000;
/// Longest encoded membership operation accepted (a tag, a variant and a 32-byte id).
const MAX_MEMBERSHIP_OP: usize = 128;

/// Why a committed membership operation changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipRefused {
    /// The `op` is not a membership operation, or not a well-formed one.
    #[error("membership operation refused: {0}")]
    Malformed(String),
    /// A node may join, declare readiness and leave only for itself.
    #[error("membership operation about another node")]
    NotTheSigner,
    /// The registry holds [`MAX_MEMBERS`] nodes.
    #[error("membership registry full")]
    Full,
}

impl MembershipOp {
    /// The node the operation is about.
    pub fn node(&self) -> &NodeId {
        let (Self::Join(n) | Self::Ready(n, _) | Self::Leave(n)) = self;
        n
    }

    /// Encodes the operation as a request's `op` ([`MEMBERSHIP_OP_TAG`] + CBOR).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![MEMBERSHIP_OP_TAG];
        // Serializing an enum of node ids into a Vec cannot fail.
        let _ = ciborium::into_writer(self, &mut out);
        out
    }

    /// Decodes a request's `op`; refuses other tags, oversized input and trailing bytes.
    pub fn decode(op: &[u8]) -> Result<Self, MembershipRefused> {
        let Some((&MEMBERSHIP_OP_TAG, mut body)) = op.split_first() else {
            return Err(MembershipRefused::Malformed(
                "not a membership operation".into(),
            ));
        };
        if op.len() > MAX_MEMBERSHIP_OP {
            return Err(MembershipRefused::Malformed("too long".into()));
        }
        let m: Self = ciborium::from_reader(&mut body)
            .map_err(|e| MembershipRefused::Malformed(e.to_string()))?;
        if !body.is_empty() {
            return Err(MembershipRefused::Malformed("trailing bytes".into()));
        }
        Ok(m)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct MemberRecord {
    joined_at: Timestamp,
    ready: bool,
    /// When the node last declared itself ready (its heartbeat in committed state).
    ready_at: Timestamp,
}

/// The membership registry of a committed prefix: a pure function of the committed
/// [`MembershipOp`]s in commit order with their batch times.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    nodes: BTreeMap<NodeId, MemberRecord>,
}

impl Membership {
    /// Applies a committed operation at its batch time.
    pub fn apply(&mut self, time: Timestamp, op: &MembershipOp) {
        match op {
            MembershipOp::Join(n) => {
                self.nodes.entry(*n).or_insert(MemberRecord {
                    joined_at: time,
                    ready: false,
                    ready_at: time,
                });
            }
            MembershipOp::Ready(n, ready) => {
                // Readiness implies a join: a node's two requests may be ordered either way.
                let r = self.nodes.entry(*n).or_insert(MemberRecord {
                    joined_at: time,
                    ready: false,
                    ready_at: time,
                });
                r.ready = *ready;
                r.ready_at = time;
            }
            MembershipOp::Leave(n) => {
                self.nodes.remove(n);
            }
        }
    }

    /// Applies a committed request's `op` from `client` at its batch time, with the rules
    /// every replica applies: a node speaks only for itself, and the registry is bounded
    /// (a leave is always accepted; a join or readiness of an unknown node only below
    /// [`MAX_MEMBERS`]).
    pub fn apply_op(
        &mut self,
        time: Timestamp,
        client: &NodeId,
        op: &[u8],
    ) -> Result<MembershipOp, MembershipRefused> {
        let m = MembershipOp::decode(op)?;
        if m.node() != client {
            return Err(MembershipRefused::NotTheSigner);
        }
        if !matches!(m, MembershipOp::Leave(_))
            && !self.contains(m.node())
            && self.len() >= MAX_MEMBERS
        {
            return Err(MembershipRefused::Full);
        }
        self.apply(time, &m);
        Ok(m)
    }

    /// Joined nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether nobody joined.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Whether `node` joined (and did not leave).
    pub fn contains(&self, node: &NodeId) -> bool {
        self.nodes.contains_key(node)
    }

    /// Joined nodes and whether each declared itself ready.
    pub fn nodes(&self) -> impl Iterator<Item = (&NodeId, bool)> {
        self.nodes.iter().map(|(n, r)| (n, r.ready))
    }

    /// The candidates at batch time `now`; `reputation(node)` gives its committed score and
    /// whether it is quarantined. A node whose last readiness is older than
    /// `max_ready_age_s` (0: no limit) counts as not ready.
    pub fn candidates(
        &self,
        now: Timestamp,
        max_ready_age_s: u64,
        reputation: &dyn Fn(&NodeId) -> (f64, bool),
    ) -> Vec<Candidate> {
        self.nodes
            .iter()
            .map(|(n, r)| {
                let (score, quarantined) = reputation(n);
                let fresh = max_ready_age_s == 0
                    || now.saturating_since(r.ready_at) / 1_000 <= max_ready_age_s;
                Candidate {
                    node: *n,
                    ready: r.ready && fresh,
                    quarantined,
                    reputation: score,
                    uptime_s: now.saturating_since(r.joined_at) / 1_000,
                }
            })
            .collect()
    }
}

/// When and how committees are recomputed.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochRules {
    /// An epoch boundary every this many sequence numbers (a multiple of the checkpoint
    /// interval, so a boundary is a stable checkpoint).
    pub epoch_length: u64,
    /// Committee size wanted (3f+1).
    pub size: usize,
    /// Who may serve.
    pub eligibility: Eligibility,
}

/// Whether the stable checkpoint at `seq` starts a new epoch.
pub fn is_epoch_boundary(seq: u64, rules: &EpochRules) -> bool {
    rules.epoch_length > 0 && seq > 0 && seq.is_multiple_of(rules.epoch_length)
}

/// The committee of the epoch that starts at the stable checkpoint `boundary_seq`, whose
/// replicated state digest is `boundary_state` and whose last batch has time `boundary_time`,
/// from the membership and reputation as of that checkpoint.
///
/// Eligible candidates are ranked by [`epoch_seed`] as in [`select`]. With fewer eligible
/// candidates than `rules.size` the committee is the largest `3f+1` that fits, but never
/// smaller than 4 while the current committee has 4 or more; otherwise (and with none
/// eligible) the current members carry over into the new epoch (a cluster never loses its
/// committee, nor its fault tolerance, for want of candidates).
pub fn next_committee(
    current: &Committee,
    boundary_seq: u64,
    boundary_state: &Digest,
    boundary_time: Timestamp,
    membership: &Membership,
    reputation: &dyn Fn(&NodeId) -> (f64, bool),
    rules: &EpochRules,
) -> Committee {
    let epoch = boundary_seq / rules.epoch_length.max(1);
    let seed = epoch_seed(boundary_state, epoch);
    let candidates =
        membership.candidates(boundary_time, rules.eligibility.max_ready_age_s, reputation);
    let eligible = candidates
        .iter()
        .filter(|c| {
            c.ready
                && !c.quarantined
                && c.reputation >= rules.eligibility.min_reputation
                && c.uptime_s >= rules.eligibility.min_uptime_s
        })
        .count();
    let fit = rules.size.min(eligible).min(MAX_VOTES);
    // The largest 3f+1 <= fit.
    let size = if fit == 0 { 0 } else { (fit - 1) / 3 * 3 + 1 };
    // Never shrink to a committee that tolerates no fault (n < 4) while the current one
    // does: with too few eligible nodes the current members carry over (a quarantined or
    // gone member among them counts as one of the f faults).
    if size > 0
        && (size >= 4 || size >= current.n())
        && let Ok(c) = select(epoch, &candidates, &seed, size, &rules.eligibility)
    {
        return c;
    }
    Committee {
        epoch,
        members: current.members.clone(),
    }
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

    #[test]
    fn epochs_reconfigure_from_committed_state_only() {
        // A committed stream of (seq, batch time, membership op). Nodes 1..=12 join over the
        // first epochs, some leave; node 5 is quarantined during epoch 2. Epochs are 100
        // sequence numbers; committees of 4 (f = 1); 60 s minimum uptime.
        let rules = EpochRules {
            epoch_length: 100,
            size: 4,
            eligibility: Eligibility {
                min_reputation: 0.5,
                min_uptime_s: 60,
                max_ready_age_s: 0,
            },
        };
        // Batch time of seq s is s seconds.
        let mut stream: Vec<(u64, MembershipOp)> = Vec::new();
        for i in 1..=6u8 {
            stream.push((u64::from(i), MembershipOp::Join(node(i))));
            stream.push((u64::from(i) + 10, MembershipOp::Ready(node(i), true)));
        }
        // Joined at 157..162 s: at the boundary at 200 (200 s) under 60 s up, eligible at 300.
        for i in 7..=12u8 {
            let seq = 150 + u64::from(i);
            stream.push((seq, MembershipOp::Join(node(i))));
            stream.push((seq + 20, MembershipOp::Ready(node(i), true)));
        }
        stream.push((250, MembershipOp::Leave(node(1))));
        stream.push((260, MembershipOp::Leave(node(2))));
        // Joined at seq 399, just before the boundary at 400: too young to serve there.
        stream.push((399, MembershipOp::Join(node(13))));
        stream.push((399, MembershipOp::Ready(node(13), true)));
        stream.sort_by_key(|x| x.0);
        let batch_time = |seq: u64| Timestamp(seq * 1_000);
        let state_at = |seq: u64| Digest::of("test/state", &[&seq.to_be_bytes()]);
        // Node 5 is quarantined by committed evidence at seq 220.
        let reputation = |seq: u64| {
            move |n: &NodeId| {
                if *n == node(5) && seq >= 220 {
                    (0.1, true)
                } else {
                    (1.0, false)
                }
            }
        };
        let genesis = Committee::new(0, (1..=4).map(node).collect()).unwrap();

        // Each observer applies the committed stream in order but in chunks of a different
        // size (as a lagging node catching up would), recomputing at every boundary it passes.
        let observe = |chunk: usize| {
            let mut m = Membership::default();
            let mut c = genesis.clone();
            let mut committees = vec![c.clone()];
            let mut next_op = 0;
            let mut seq = 0u64;
            while seq < 500 {
                let to = (seq + chunk as u64).min(500);
                for s in seq + 1..=to {
                    while next_op < stream.len() && stream[next_op].0 == s {
                        m.apply(batch_time(s), &stream[next_op].1);
                        next_op += 1;
                    }
                    if is_epoch_boundary(s, &rules) {
                        let rep = reputation(s);
                        c = next_committee(&c, s, &state_at(s), batch_time(s), &m, &rep, &rules);
                        committees.push(c.clone());
                    }
                }
                seq = to;
            }
            committees
        };
        let views: Vec<Vec<Committee>> = [1, 7, 33, 100, 500].map(observe).into();
        for v in &views[1..] {
            assert_eq!(*v, views[0], "every observer computes the same committees");
        }
        let epochs = &views[0];
        assert_eq!(epochs.len(), 6, "genesis + boundaries 100..=500");
        for (e, c) in epochs.iter().enumerate() {
            assert_eq!(c.epoch(), e as u64);
            assert_eq!(c.n(), 4);
        }
        // Epoch 1 (boundary 100): only nodes 1..=6 joined.
        assert!(
            epochs[1]
                .members()
                .iter()
                .all(|n| (1..=6).any(|i| node(i) == *n))
        );
        // Node 5 quarantined at seq 220: excluded from epoch 3 (boundary 300) on.
        for c in &epochs[3..] {
            assert!(
                !c.contains(&node(5)),
                "quarantined node 5 in epoch {}",
                c.epoch()
            );
        }
        // Nodes 1 and 2 left: gone from epoch 3 on.
        for c in &epochs[3..] {
            assert!(!c.contains(&node(1)) && !c.contains(&node(2)));
        }
        // Node 13 joined one sequence number before the boundary at 400: not yet eligible.
        assert!(!epochs[4].contains(&node(13)));
        // Everyone joined has served or been ranked by a different seed each epoch: the
        // committees of epochs 3, 4, 5 are drawn from {3, 4, 6, 7..=12} (plus 13 at 500).
        let pool: Vec<NodeId> = [3, 4, 6, 7, 8, 9, 10, 11, 12, 13].map(node).into();
        for c in &epochs[3..] {
            assert!(c.members().iter().all(|n| pool.contains(n)));
        }
        // A node whose join is not committed (say, only announced by gossip) is never a
        // candidate: only committed operations reach `Membership`.
        let m = Membership::default();
        let c = next_committee(
            &genesis,
            100,
            &state_at(100),
            batch_time(100),
            &m,
            &reputation(100),
            &rules,
        );
        assert_eq!(
            c.members(),
            genesis.members(),
            "nobody eligible: carry over"
        );
        assert_eq!(c.epoch(), 1);
    }

    #[test]
    fn too_few_eligible_gives_the_largest_3f_plus_1() {
        let rules = EpochRules {
            epoch_length: 100,
            size: 7,
            eligibility: Eligibility {
                min_reputation: 0.5,
                min_uptime_s: 0,
                max_ready_age_s: 0,
            },
        };
        let mut m = Membership::default();
        for i in 1..=6u8 {
            m.apply(Timestamp(0), &MembershipOp::Join(node(i)));
            m.apply(Timestamp(0), &MembershipOp::Ready(node(i), true));
        }
        let genesis = Committee::new(0, (1..=4).map(node).collect()).unwrap();
        let c = next_committee(
            &genesis,
            200,
            &Digest([1; 32]),
            Timestamp(5_000),
            &m,
            &|_| (1.0, false),
            &rules,
        );
        assert_eq!((c.epoch(), c.n()), (2, 4), "6 eligible: n = 4 (f = 1)");
    }

    #[test]
    fn nodes_that_stop_renewing_readiness_are_not_chosen() {
        let mut m = Membership::default();
        for i in 1..=5u8 {
            m.apply(Timestamp(0), &MembershipOp::Join(node(i)));
            m.apply(Timestamp(1_000), &MembershipOp::Ready(node(i), true));
        }
        // Nodes 1-4 renew at 50 min; node 5 went away after its first declaration.
        for i in 1..=4u8 {
            m.apply(Timestamp(3_000_000), &MembershipOp::Ready(node(i), true));
        }
        let now = Timestamp(3_600_000);
        let ok = |_: &NodeId| (1.0, false);
        let ready = |age| {
            m.candidates(now, age, &ok)
                .into_iter()
                .filter(|c| c.ready)
                .map(|c| c.node)
                .collect::<Vec<_>>()
        };
        assert_eq!(ready(0).len(), 5, "no limit");
        let fresh = ready(1_800);
        assert_eq!(fresh.len(), 4);
        assert!(!fresh.contains(&node(5)));
        assert!(m.contains(&node(5)));
        m.apply(now, &MembershipOp::Leave(node(5)));
        assert!(!m.contains(&node(5)));
    }

    #[test]
    fn too_few_eligible_never_shrinks_below_one_fault_tolerated() {
        let rules = EpochRules {
            epoch_length: 100,
            size: 4,
            eligibility: Eligibility {
                min_reputation: 0.5,
                min_uptime_s: 0,
                max_ready_age_s: 0,
            },
        };
        let genesis = Committee::new(0, (1..=4).map(node).collect()).unwrap();
        let mut m = Membership::default();
        for i in 1..=3u8 {
            m.apply(Timestamp(0), &MembershipOp::Ready(node(i), true));
        }
        let ok = |_: &NodeId| (1.0, false);
        let next = |m: &Membership| {
            next_committee(
                &genesis,
                100,
                &Digest([1; 32]),
                Timestamp(0),
                m,
                &ok,
                &rules,
            )
        };
        let c = next(&m);
        assert_eq!(
            c.members(),
            genesis.members(),
            "3 eligible: carry over, not n = 1"
        );
        assert_eq!(c.epoch(), 1);
        m.apply(Timestamp(0), &MembershipOp::Ready(node(5), true));
        let c = next(&m);
        assert_eq!(c.n(), 4);
        assert!(c.contains(&node(5)));
    }

    #[test]
    fn membership_ops_decode_strictly_and_speak_only_for_their_signer() {
        let (a, b) = (node(1), node(2));
        for op in [
            MembershipOp::Join(a),
            MembershipOp::Ready(a, true),
            MembershipOp::Ready(a, false),
            MembershipOp::Leave(a),
        ] {
            assert_eq!(MembershipOp::decode(&op.encode()), Ok(op));
        }
        let join = MembershipOp::Join(a).encode();
        let refused = |r: Result<MembershipOp, MembershipRefused>| {
            matches!(r, Err(MembershipRefused::Malformed(_)))
        };
        assert!(refused(MembershipOp::decode(
            &[join.clone(), vec![0]].concat()
        )));
        assert!(refused(MembershipOp::decode(&join[..join.len() - 1])));
        assert!(refused(MembershipOp::decode(&[0xA5, 0x00])));
        assert!(refused(MembershipOp::decode(&[])));
        let mut long = vec![MEMBERSHIP_OP_TAG];
        long.resize(MAX_MEMBERSHIP_OP + 1, 0x41);
        assert!(refused(MembershipOp::decode(&long)));

        let mut m = Membership::default();
        let t = Timestamp(1_000);
        assert_eq!(
            m.apply_op(t, &b, &join),
            Err(MembershipRefused::NotTheSigner)
        );
        assert!(m.is_empty(), "a refused operation changes nothing");
        assert_eq!(m.apply_op(t, &a, &join), Ok(MembershipOp::Join(a)));
        let leave = MembershipOp::Leave(a).encode();
        assert_eq!(m.apply_op(t, &a, &leave), Ok(MembershipOp::Leave(a)));
        assert!(!m.contains(&a));
    }
}
