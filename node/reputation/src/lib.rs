//! ACP: peer reputation from committed evidence (sans-IO).
//!
//! Scores follow the operations manual (section 2.2.6): every node starts at 1.0, a correct
//! vote adds 0.01, an incorrect action subtracts 0.10, scores decay by 0.01 per day and a node
//! below 0.3 is quarantined (excluded from committees and placement, disconnected by the peer
//! manager).
//!
//! # Only committed evidence counts
//!
//! The engine changes a score only from input that went through consensus, in commit order,
//! with the batch time the primary fixed, so every honest node computes the same scores:
//!
//! * [`Engine::on_participation`]: a [`Participation`] record, i.e. a commit certificate
//!   (without its batch) that was itself committed as a request: each of its 2f+1 voters cast
//!   a correct vote (+0.01). A replica's *own* certificate for a slot must not be fed
//!   directly: each replica keeps the first 2f+1 commits it received, so the voter sets
//!   differ between replicas and so would the scores. The node and the simulator submit a
//!   record for every [`PARTICIPATION_EVERY`]th slot, by the member whose turn it is
//!   ([`participation_turn`]), so rewards are sampled, and equal for everyone.
//! * [`Engine::on_evidence`]: a piece of [`Evidence`] that was itself committed as a request
//!   (see [`Evidence::encode`]), checked here again by anyone:
//!   - equivocation: two signed votes of one kind for one `(view, seq)` with different digests;
//!   - a signed vote contradicting a committed certificate;
//!   - a signed capacity claim (a [`NodeAnnouncement`]'s donated uplink) contradicted by signed
//!     measurements from f+1 distinct committee members (so f liars cannot frame anyone).
//!
//!   Each offence counts once, however many nodes submit it (keyed by offender, kind and slot).
//!
//! Scores are kept as integers in units of 1e-4, so there is no floating-point drift and
//! equal inputs give bit-equal scores on every node (tested below).
//!
//! # Decisions
//!
//! * "Decay 0.01 per day" is read as decay *toward the starting score*: offences fade and a
//!   quarantined node whose score climbs back to the threshold is released. Decaying toward
//!   zero would quarantine every idle volunteer after 70 days.
//! * Scores are capped at the starting score 1.0.
//! * Equivocation (two signed, conflicting votes for one slot) is a cryptographic proof of
//!   malice, not a mistake: it costs the whole score (immediate quarantine,
//!   `equivocation_penalty`). The manual's -0.10 applies to votes contradicting a certificate
//!   and to contradicted claims, so those need 8 proven offences to quarantine.
//! * A quarantined node earns no rewards, so correct votes cannot buy it out; decay releases
//!   it after `(0.3 - score) / 0.01` days.
//! * Garbage, bad signatures and other offences only the receiver can see are not evidence; the
//!   peer manager handles those locally.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use dwcp_consensus::{CommitProof, Committee, Digest, check_contradiction, check_equivocation};
use dwcp_protocol::{
    Message, MessageKind, NodeAnnouncement, NodeId, SignedEnvelope, Timestamp, ValidationError,
};
use serde::{Deserialize, Serialize};

/// Score units per 1.0.
pub const UNIT: i64 = 10_000;
/// Largest encoded evidence accepted.
pub const MAX_EVIDENCE_LEN: usize = 60 * 1024;
const DAY_MS: u64 = 86_400_000;

/// Reputation parameters, in units of 1e-4.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Starting (and highest) score: 1.0.
    pub initial: i64,
    /// Added per correct vote: 0.01.
    pub reward: i64,
    /// Subtracted per proven incorrect action: 0.10.
    pub penalty: i64,
    /// Subtracted per proven equivocation: 1.0, i.e. immediate quarantine (see the crate
    /// docs).
    pub equivocation_penalty: i64,
    /// Decay toward the starting score per day: 0.01.
    pub decay_per_day: i64,
    /// Quarantine below this: 0.3.
    pub quarantine_below: i64,
    /// A capacity claim is contradicted when the median measurement is below this fraction
    /// (in percent) of the claim.
    pub claim_tolerance_pct: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            initial: UNIT,
            reward: UNIT / 100,
            penalty: UNIT / 10,
            equivocation_penalty: UNIT,
            decay_per_day: UNIT / 100,
            quarantine_below: 3 * UNIT / 10,
            claim_tolerance_pct: 50,
        }
    }
}

/// A signed measurement of the bandwidth a transfer to `subject` achieved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BandwidthMeasurement {
    /// The node measured.
    pub subject: NodeId,
    /// What transfers achieved, in Mbit/s.
    pub measured_mbps: u32,
    /// When.
    pub at: Timestamp,
}

impl Message for BandwidthMeasurement {
    const KIND: MessageKind = MessageKind::Transfer;

    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}

/// Evidence of misbehaviour, committed through consensus as a request's operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Evidence {
    /// Two conflicting signed votes for one slot.
    Equivocation {
        /// First vote.
        first: SignedEnvelope,
        /// Conflicting vote.
        second: SignedEnvelope,
    },
    /// A signed vote against a committed certificate.
    ContradictsCertificate {
        /// The vote.
        vote: SignedEnvelope,
        /// Proof of what committed.
        proof: CommitProof,
    },
    /// A signed capacity claim contradicted by measurements.
    ClaimContradicted {
        /// The offender's signed [`NodeAnnouncement`].
        claim: SignedEnvelope,
        /// Signed [`BandwidthMeasurement`]s of the offender by committee members.
        measurements: Vec<SignedEnvelope>,
    },
}

/// Why evidence was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EvidenceError {
    /// Larger than [`MAX_EVIDENCE_LEN`].
    #[error("evidence of {0} bytes is too large")]
    TooLarge(usize),
    /// Not decodable.
    #[error("malformed evidence: {0}")]
    Malformed(String),
    /// The consensus messages do not prove an offence.
    #[error("not an offence: {0}")]
    Consensus(#[from] dwcp_consensus::CertificateError),
    /// A claim or measurement does not verify or does not contradict.
    #[error("claim not contradicted: {0}")]
    Claim(&'static str),
    /// A participation record for a slot off the reward grid ([`PARTICIPATION_EVERY`]).
    #[error("participation record for slot {0}, off the reward grid")]
    OffGrid(u64),
    /// A participation record for a slot older than [`PARTICIPATION_WINDOW`].
    #[error("participation record for slot {0} is older than the reward window")]
    Stale(u64),
}

/// The first byte of an operation that carries evidence (other operations use other tags).
pub const EVIDENCE_OP_TAG: u8 = 0xE1;

impl Evidence {
    /// Encodes as a consensus operation: [`EVIDENCE_OP_TAG`] then CBOR.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![EVIDENCE_OP_TAG];
        // Writing into a Vec cannot fail for these types.
        if ciborium::into_writer(self, &mut out).is_err() {
            out.truncate(1);
        }
        out
    }

    /// Decodes an operation produced by [`Evidence::encode`], with a size limit.
    pub fn decode(op: &[u8]) -> Result<Self, EvidenceError> {
        if op.len() > MAX_EVIDENCE_LEN {
            return Err(EvidenceError::TooLarge(op.len()));
        }
        let Some((&EVIDENCE_OP_TAG, mut body)) = op.split_first() else {
            return Err(EvidenceError::Malformed("not an evidence operation".into()));
        };
        let ev: Self = ciborium::from_reader(&mut body)
            .map_err(|e| EvidenceError::Malformed(e.to_string()))?;
        if !body.is_empty() {
            return Err(EvidenceError::Malformed("trailing bytes".into()));
        }
        Ok(ev)
    }

    /// Checks the evidence; returns the offender and a key that identifies the offence, so it
    /// counts once.
    pub fn verify(
        &self,
        committee: &Committee,
        cfg: &Config,
    ) -> Result<(NodeId, Digest), EvidenceError> {
        match self {
            Self::Equivocation { first, second } => {
                let (who, kind, view, seq) = check_equivocation(first, second)?;
                let key = Digest::of(
                    "dwcp/v3/offence/equivocation",
                    &[
                        who.as_bytes(),
                        &[kind as u8],
                        &view.to_be_bytes(),
                        &seq.to_be_bytes(),
                    ],
                );
                Ok((who, key))
            }
            Self::ContradictsCertificate { vote, proof } => {
                let who = check_contradiction(vote, proof, committee)?;
                let cast = dwcp_consensus::read_vote(vote)
                    .ok_or(EvidenceError::Claim("vote does not verify"))?;
                let key = Digest::of(
                    "dwcp/v3/offence/contradiction",
                    &[
                        who.as_bytes(),
                        &cast.slot.view.to_be_bytes(),
                        &cast.slot.seq.to_be_bytes(),
                    ],
                );
                Ok((who, key))
            }
            Self::ClaimContradicted {
                claim,
                measurements,
            } => {
                let claim = claim
                    .clone()
                    .verify::<NodeAnnouncement>()
                    .map_err(|_| EvidenceError::Claim("claim does not verify"))?;
                let who = claim.signer();
                let claimed = u64::from(claim.donated.uplink_mbps);
                let mut by = BTreeMap::new();
                for m in measurements {
                    let m = m
                        .clone()
                        .verify::<BandwidthMeasurement>()
                        .map_err(|_| EvidenceError::Claim("measurement does not verify"))?;
                    if m.subject != who || m.signer() == who || !committee.contains(&m.signer()) {
                        return Err(EvidenceError::Claim(
                            "measurement of another node or by a non-member",
                        ));
                    }
                    by.insert(m.signer(), u64::from(m.measured_mbps));
                }
                if by.len() <= committee.f() {
                    return Err(EvidenceError::Claim("fewer than f+1 distinct measurers"));
                }
                let mut vals: Vec<u64> = by.into_values().collect();
                vals.sort_unstable();
                let median = vals[vals.len() / 2];
                if median * 100 >= claimed * cfg.claim_tolerance_pct {
                    return Err(EvidenceError::Claim("measurements agree with the claim"));
                }
                let key = Digest::of(
                    "dwcp/v3/offence/claim",
                    &[who.as_bytes(), &claim.seq.to_be_bytes()],
                );
                Ok((who, key))
            }
        }
    }
}

/// The first byte of an operation that carries a [`Participation`] record.
pub const PARTICIPATION_OP_TAG: u8 = 0xE2;
/// Rewards are sampled: a [`Participation`] record is submitted for every slot whose
/// sequence number is a multiple of this, by the committee member whose turn it is
/// ([`participation_turn`]).
pub const PARTICIPATION_EVERY: u64 = 10;
/// A participation record is accepted only while its slot is at most this many sequence
/// numbers below the decision that commits it; older rewarded slots are forgotten, so the
/// memory of rewarded slots stays bounded (`PARTICIPATION_WINDOW / PARTICIPATION_EVERY`).
pub const PARTICIPATION_WINDOW: u64 = 10_000;

/// The committee index of the member that records slot `seq` (of a committee of `n`), if
/// `seq` is on the reward grid.
pub fn participation_turn(seq: u64, n: usize) -> Option<usize> {
    if n == 0 || seq == 0 || !seq.is_multiple_of(PARTICIPATION_EVERY) {
        return None;
    }
    usize::try_from((seq / PARTICIPATION_EVERY) % n as u64).ok()
}

/// A participation record: the commit certificate of one slot, committed through consensus
/// as a request's operation so that every honest node rewards the same voters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Participation {
    /// 2f+1 signed commits and the header of the certified slot.
    pub proof: CommitProof,
}

impl Participation {
    /// Encodes as a consensus operation: [`PARTICIPATION_OP_TAG`] then CBOR.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![PARTICIPATION_OP_TAG];
        if ciborium::into_writer(self, &mut out).is_err() {
            out.truncate(1);
        }
        out
    }

    /// Decodes an operation produced by [`Participation::encode`], with a size limit.
    pub fn decode(op: &[u8]) -> Result<Self, EvidenceError> {
        if op.len() > MAX_EVIDENCE_LEN {
            return Err(EvidenceError::TooLarge(op.len()));
        }
        let Some((&PARTICIPATION_OP_TAG, mut body)) = op.split_first() else {
            return Err(EvidenceError::Malformed(
                "not a participation record".into(),
            ));
        };
        let p: Self = ciborium::from_reader(&mut body)
            .map_err(|e| EvidenceError::Malformed(e.to_string()))?;
        if !body.is_empty() {
            return Err(EvidenceError::Malformed("trailing bytes".into()));
        }
        Ok(p)
    }
}

/// What the engine reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A node fell below the threshold (`dwcp_reputation_quarantined_nodes` goes up).
    Quarantined {
        /// The node.
        node: NodeId,
        /// Its score, units of 1e-4.
        score: i64,
    },
    /// A quarantined node recovered to the threshold.
    Released {
        /// The node.
        node: NodeId,
    },
    /// An offence was applied.
    Penalised {
        /// The node.
        node: NodeId,
        /// Its new score, units of 1e-4.
        score: i64,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Score {
    value: i64,
    at: Timestamp,
}

/// The reputation state machine. It serializes (without undelivered outputs) so that a node
/// can keep a snapshot of its committed state on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Engine {
    cfg: Config,
    scores: BTreeMap<NodeId, Score>,
    seen: BTreeSet<Digest>,
    /// Slots whose participation record was applied, within the reward window.
    #[serde(default)]
    rewarded: BTreeSet<u64>,
    quarantined: BTreeSet<NodeId>,
    #[serde(skip)]
    out: VecDeque<Output>,
}

impl Engine {
    /// A fresh engine.
    pub fn new(cfg: Config) -> Self {
        Self {
            cfg,
            scores: BTreeMap::new(),
            seen: BTreeSet::new(),
            rewarded: BTreeSet::new(),
            quarantined: BTreeSet::new(),
            out: VecDeque::new(),
        }
    }

    fn decayed(&self, s: Score, now: Timestamp) -> i64 {
        let days = i64::try_from(now.saturating_since(s.at) / DAY_MS).unwrap_or(i64::MAX);
        let recover = days.saturating_mul(self.cfg.decay_per_day);
        if s.value < self.cfg.initial {
            (s.value.saturating_add(recover)).min(self.cfg.initial)
        } else {
            s.value
        }
    }

    fn touch(&mut self, node: NodeId, now: Timestamp) -> i64 {
        let s = self.scores.get(&node).copied().unwrap_or(Score {
            value: self.cfg.initial,
            at: now,
        });
        // Decay is applied in whole days; keep the remainder by advancing `at` by whole days.
        let days = now.saturating_since(s.at) / DAY_MS;
        let v = self.decayed(s, now);
        self.scores.insert(
            node,
            Score {
                value: v,
                at: Timestamp(s.at.0 + days * DAY_MS),
            },
        );
        v
    }

    fn set(&mut self, node: NodeId, value: i64) {
        if let Some(s) = self.scores.get_mut(&node) {
            s.value = value.clamp(0, self.cfg.initial);
        }
        let v = self.scores.get(&node).map_or(value, |s| s.value);
        let below = v < self.cfg.quarantine_below;
        if below && self.quarantined.insert(node) {
            self.out.push_back(Output::Quarantined { node, score: v });
        } else if !below && self.quarantined.remove(&node) {
            self.out.push_back(Output::Released { node });
        }
    }

    /// A committed [`Participation`] record at batch time `time`, in the decision `at_seq`:
    /// checks the certificate against `committee` and rewards its voters, once per sequence
    /// number, for slots on the reward grid ([`PARTICIPATION_EVERY`]) within
    /// [`PARTICIPATION_WINDOW`] of `at_seq`. Returns the certified
    /// sequence number if it was applied.
    pub fn on_participation(
        &mut self,
        time: Timestamp,
        committee: &Committee,
        record: &Participation,
        at_seq: u64,
    ) -> Result<Option<u64>, EvidenceError> {
        let (slot, voters) = record.proof.verify(committee)?;
        if !slot.seq.is_multiple_of(PARTICIPATION_EVERY) {
            return Err(EvidenceError::OffGrid(slot.seq));
        }
        // Slots older than the window are forgotten, so their records are refused: a record
        // replayed after its slot left the window cannot reward twice.
        let floor = at_seq.saturating_sub(PARTICIPATION_WINDOW);
        if slot.seq < floor {
            return Err(EvidenceError::Stale(slot.seq));
        }
        if self.rewarded.first().is_some_and(|f| *f < floor) {
            self.rewarded = self.rewarded.split_off(&floor);
        }
        if !self.rewarded.insert(slot.seq) {
            return Ok(None);
        }
        self.on_certificate(time, &voters);
        Ok(Some(slot.seq))
    }

    /// Rewards `voters` for a correct vote each at batch time `time`. Only for voter sets
    /// every honest node has in the same order (from committed input, as
    /// [`Engine::on_participation`] does). A quarantined node earns nothing (its votes no
    /// longer count); only decay releases it.
    pub fn on_certificate(&mut self, time: Timestamp, voters: &[NodeId]) {
        for v in voters {
            if self.quarantined.contains(v) {
                continue;
            }
            let s = self.touch(*v, time);
            self.set(*v, s + self.cfg.reward);
        }
    }

    /// Committed evidence at batch time `time`. Returns the offender if it was applied; an
    /// offence already counted, or evidence that does not verify, changes nothing.
    pub fn on_evidence(
        &mut self,
        time: Timestamp,
        committee: &Committee,
        ev: &Evidence,
    ) -> Result<Option<NodeId>, EvidenceError> {
        let (who, key) = ev.verify(committee, &self.cfg)?;
        if !self.seen.insert(key) {
            return Ok(None);
        }
        let penalty = match ev {
            Evidence::Equivocation { .. } => self.cfg.equivocation_penalty,
            _ => self.cfg.penalty,
        };
        let s = self.touch(who, time);
        self.set(who, s - penalty);
        let score = self.scores.get(&who).map_or(0, |s| s.value);
        self.out.push_back(Output::Penalised { node: who, score });
        Ok(Some(who))
    }

    /// Lets time pass (batch time of a committed decision): decay may release nodes.
    pub fn on_time(&mut self, time: Timestamp) {
        let nodes: Vec<NodeId> = self.quarantined.iter().copied().collect();
        for n in nodes {
            let v = self.touch(n, time);
            self.set(n, v);
        }
    }

    /// A node's score in units of 1e-4 (1.0 for a node never seen).
    pub fn score_units(&self, node: &NodeId) -> i64 {
        self.scores.get(node).map_or(self.cfg.initial, |s| s.value)
    }

    /// A node's score as a number in [0, 1] (`dwcp_reputation_score`).
    pub fn score(&self, node: &NodeId) -> f64 {
        self.score_units(node) as f64 / UNIT as f64
    }

    /// Whether a node is quarantined.
    pub fn is_quarantined(&self, node: &NodeId) -> bool {
        self.quarantined.contains(node)
    }

    /// Quarantined nodes (`dwcp_reputation_quarantined_nodes` is its length).
    pub fn quarantined(&self) -> &BTreeSet<NodeId> {
        &self.quarantined
    }

    /// All known scores, for `reputation list`.
    pub fn scores(&self) -> impl Iterator<Item = (NodeId, i64)> + '_ {
        self.scores.iter().map(|(n, s)| (*n, s.value))
    }

    /// The next output.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dwcp_consensus::{ConsensusMsg, Slot};
    use dwcp_protocol::{DonatedShare, NodeKey, Resources, Verified};

    fn key(i: u8) -> NodeKey {
        NodeKey::from_secret_bytes([i; 32])
    }

    fn committee() -> Committee {
        Committee::new(0, (1..=4).map(|i| key(i).node_id()).collect()).unwrap()
    }

    fn vote(i: u8, seq: u64, d: u8) -> SignedEnvelope {
        let slot = Slot {
            view: 0,
            seq,
            digest: Digest([d; 32]),
        };
        Verified::sign(&key(i), ConsensusMsg::Commit(slot))
            .unwrap()
            .envelope()
            .clone()
    }

    fn equivocation(i: u8, seq: u64) -> Evidence {
        Evidence::Equivocation {
            first: vote(i, seq, 1),
            second: vote(i, seq, 2),
        }
    }

    #[test]
    fn manual_rules_penalty_reward_quarantine_and_decay() {
        let _e = Engine::new(Config::default());
        let bad = key(2).node_id();
        let t0 = Timestamp(0);
        let cfg = Config {
            equivocation_penalty: UNIT / 10,
            ..Config::default()
        };
        let mut e = Engine::new(cfg);
        // -0.10 per distinct offence: 1.0 -> 0.3 after 7 offences (not below), quarantined at
        // the 8th (0.2).
        for seq in 1..=7 {
            assert_eq!(
                e.on_evidence(t0, &committee(), &equivocation(2, seq))
                    .unwrap(),
                Some(bad)
            );
        }
        assert_eq!(e.score_units(&bad), 3_000);
        assert!(!e.is_quarantined(&bad));
        // +0.01 per correct vote.
        e.on_certificate(t0, &[bad]);
        assert_eq!(e.score_units(&bad), 3_100);
        e.on_evidence(t0, &committee(), &equivocation(2, 8))
            .unwrap();
        e.on_evidence(t0, &committee(), &equivocation(2, 9))
            .unwrap();
        assert_eq!(e.score_units(&bad), 1_100);
        assert!(e.is_quarantined(&bad));
        // The same offence again (submitted by another node) counts once.
        assert_eq!(
            e.on_evidence(t0, &committee(), &equivocation(2, 9))
                .unwrap(),
            None
        );
        assert_eq!(e.score_units(&bad), 1_100);
        // A quarantined node earns nothing for votes.
        e.on_certificate(t0, &[bad]);
        assert_eq!(e.score_units(&bad), 1_100);
        // Decay toward 1.0 at 0.01 per day: 19 days later 0.30, released.
        e.on_time(Timestamp(19 * DAY_MS));
        assert_eq!(e.score_units(&bad), 3_000);
        assert!(!e.is_quarantined(&bad));
        let outs: Vec<Output> = std::iter::from_fn(|| e.poll_output()).collect();
        assert!(outs.contains(&Output::Quarantined {
            node: bad,
            score: 2_100
        }));
        assert!(outs.contains(&Output::Released { node: bad }));
        // Honest nodes stay capped at 1.0.
        let good = key(1).node_id();
        e.on_certificate(t0, &[good]);
        assert_eq!(e.score(&good), 1.0);
    }

    #[test]
    fn equivocation_quarantines_at_once_by_default() {
        let mut e = Engine::new(Config::default());
        let bad = key(3).node_id();
        e.on_evidence(Timestamp(0), &committee(), &equivocation(3, 1))
            .unwrap();
        assert_eq!(e.score_units(&bad), 0);
        assert!(e.is_quarantined(&bad));
    }

    #[test]
    fn evidence_that_does_not_prove_anything_is_refused() {
        let mut e = Engine::new(Config::default());
        let same = Evidence::Equivocation {
            first: vote(2, 1, 1),
            second: vote(2, 1, 1),
        };
        assert!(e.on_evidence(Timestamp(0), &committee(), &same).is_err());
        let two_signers = Evidence::Equivocation {
            first: vote(2, 1, 1),
            second: vote(3, 1, 2),
        };
        assert!(
            e.on_evidence(Timestamp(0), &committee(), &two_signers)
                .is_err()
        );
        assert_eq!(e.score_units(&key(2).node_id()), UNIT);
        assert!(Evidence::decode(&[0u8; 3]).is_err());
        assert!(matches!(
            Evidence::decode(&vec![EVIDENCE_OP_TAG; MAX_EVIDENCE_LEN + 1]),
            Err(EvidenceError::TooLarge(_))
        ));
        let ev = equivocation(2, 1);
        assert_eq!(Evidence::decode(&ev.encode()).unwrap(), ev);
    }

    fn claim(i: u8, mbps: u32) -> SignedEnvelope {
        let a = NodeAnnouncement {
            cluster_id: "c".into(),
            seq: 1,
            issued_at: Timestamp(0),
            region: "eu".into(),
            version: "3.0.0".into(),
            resources: Resources {
                vcpus: 4,
                memory_mib: 4096,
                disk_gib: 10,
                gpus: vec![],
            },
            donated: DonatedShare {
                vcpus: 2,
                memory_mib: 2048,
                disk_gib: 5,
                uplink_mbps: mbps,
            },
            listen_addrs: vec![],
        };
        Verified::sign(&key(i), a).unwrap().envelope().clone()
    }

    fn measure(by: u8, of: u8, mbps: u32) -> SignedEnvelope {
        let m = BandwidthMeasurement {
            subject: key(of).node_id(),
            measured_mbps: mbps,
            at: Timestamp(0),
        };
        Verified::sign(&key(by), m).unwrap().envelope().clone()
    }

    #[test]
    fn capacity_lie_needs_f_plus_one_measurers() {
        let mut e = Engine::new(Config::default());
        let liar = key(4).node_id();
        let one = Evidence::ClaimContradicted {
            claim: claim(4, 1000),
            measurements: vec![measure(1, 4, 10)],
        };
        assert!(
            e.on_evidence(Timestamp(0), &committee(), &one).is_err(),
            "f = 1 liar cannot frame"
        );
        let honest = Evidence::ClaimContradicted {
            claim: claim(4, 1000),
            measurements: vec![measure(1, 4, 900), measure(2, 4, 950)],
        };
        assert!(e.on_evidence(Timestamp(0), &committee(), &honest).is_err());
        let lie = Evidence::ClaimContradicted {
            claim: claim(4, 1000),
            measurements: vec![measure(1, 4, 10), measure(2, 4, 12)],
        };
        assert_eq!(
            e.on_evidence(Timestamp(0), &committee(), &lie).unwrap(),
            Some(liar)
        );
        assert_eq!(e.score_units(&liar), 9_000);
    }

    #[test]
    fn participation_records_reward_their_voters_once() {
        // The header of slot (0, seq, d) from the primary of view 0 (member 1), three commits.
        let record_of = |seq: u64| {
            let slot = Slot {
                view: 0,
                seq,
                digest: Digest([3; 32]),
            };
            let header = Verified::sign(
                &key(1),
                ConsensusMsg::PrePrepare(dwcp_consensus::PrePrepare {
                    slot,
                    time: Timestamp(0),
                }),
            )
            .unwrap()
            .envelope()
            .clone();
            Participation {
                proof: CommitProof {
                    pre_prepare: header,
                    commits: (1..=3).map(|i| vote(i, seq, 3)).collect(),
                },
            }
        };
        const S: u64 = PARTICIPATION_EVERY;
        let record = record_of(S);
        assert_eq!(Participation::decode(&record.encode()).unwrap(), record);
        let mut e = Engine::new(Config::default());
        let voter = key(2).node_id();
        // Start the voter below the cap so the reward shows.
        e.on_evidence(Timestamp(0), &committee(), &equivocation(2, 1))
            .unwrap();
        let before = e.score_units(&voter);
        let mut q = Engine::new(Config::default());
        let other = key(4).node_id();
        assert_eq!(
            e.on_participation(Timestamp(1), &committee(), &record, S + 1)
                .unwrap(),
            Some(S)
        );
        // A quarantined node earns nothing; key 3 voted and is at the cap.
        assert_eq!(e.score_units(&voter), before);
        q.on_evidence(
            Timestamp(0),
            &committee(),
            &Evidence::ContradictsCertificate {
                vote: vote(2, S, 9),
                proof: record.proof.clone(),
            },
        )
        .unwrap();
        assert_eq!(q.score_units(&voter), 9_000);
        assert_eq!(
            q.on_participation(Timestamp(1), &committee(), &record, S + 1)
                .unwrap(),
            Some(S)
        );
        assert_eq!(q.score_units(&voter), 9_100, "+0.01 for the correct vote");
        // The same slot recorded again (by another submitter) counts once.
        assert_eq!(
            q.on_participation(Timestamp(2), &committee(), &record, S + 2)
                .unwrap(),
            None
        );
        assert_eq!(q.score_units(&voter), 9_100);
        // Member 4 did not vote: unchanged. A record short of a quorum is refused.
        assert_eq!(q.score_units(&other), UNIT);
        let mut short = record.clone();
        short.proof.commits.truncate(2);
        assert!(
            q.on_participation(Timestamp(3), &committee(), &short, S + 3)
                .is_err()
        );
        assert!(Participation::decode(&[EVIDENCE_OP_TAG, 0]).is_err());
        // Off the reward grid: refused, whoever submits it (a member cannot reward voters
        // more often by recording every slot).
        assert_eq!(
            q.on_participation(Timestamp(3), &committee(), &record_of(S + 1), S + 3),
            Err(EvidenceError::OffGrid(S + 1))
        );
        // Past the window the slot is forgotten and its record refused, so the memory of
        // rewarded slots stays bounded and a late replay rewards nothing.
        let late = S + PARTICIPATION_WINDOW + 1;
        assert_eq!(
            q.on_participation(Timestamp(4), &committee(), &record, late),
            Err(EvidenceError::Stale(S))
        );
        assert_eq!(q.score_units(&voter), 9_100);
        assert!(q.rewarded.len() <= 1);
    }

    #[test]
    fn equal_inputs_give_equal_scores_on_every_node() {
        // Three "nodes" apply the same committed sequence; a fourth applies it with the
        // evidence submitted twice (by two reporters). All end bit-equal.
        let events: Vec<(u64, Option<Evidence>, Vec<NodeId>)> = (0..200u64)
            .map(|i| {
                let ev = (i % 7 == 3).then(|| equivocation(2 + (i % 3) as u8, i));
                let voters = (1..=4)
                    .filter(|v| (i + u64::from(*v)) % 4 != 0)
                    .map(|v| key(v).node_id())
                    .collect();
                (i * 3_600_000, ev, voters)
            })
            .collect();
        let run = |dup: bool| {
            let mut e = Engine::new(Config::default());
            for (t, ev, voters) in &events {
                e.on_certificate(Timestamp(*t), voters);
                if let Some(ev) = ev {
                    e.on_evidence(Timestamp(*t), &committee(), ev).unwrap();
                    if dup {
                        e.on_evidence(Timestamp(*t), &committee(), ev).unwrap();
                    }
                }
                e.on_time(Timestamp(*t));
            }
            (e.scores().collect::<Vec<_>>(), e.quarantined().clone())
        };
        let a = run(false);
        assert_eq!(a, run(false));
        assert_eq!(a, run(true));
        assert!(a.0.iter().any(|(_, s)| *s < UNIT), "some penalties applied");
    }
}
