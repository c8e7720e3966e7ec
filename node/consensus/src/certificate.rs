//! Checking certificates and evidence without any replica state: anyone who knows the
//! committee can verify a commit certificate, and anyone can verify a piece of equivocation
//! evidence. Reputation (dwcp-reputation) uses these checks on committed evidence.

use std::collections::BTreeSet;

use dwcp_protocol::{NodeId, SignedEnvelope, Timestamp, Verified};
use serde::{Deserialize, Serialize};

use crate::{
    committee::Committee,
    messages::{CommitCertificate, ConsensusMsg, Digest, Request, Slot, open, open_header},
};

/// Why a certificate or a piece of evidence does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertificateError {
    /// The pre-prepare header is not a validly signed header.
    #[error("pre-prepare header is not a valid signed header")]
    BadHeader,
    /// The header is not signed by the primary of its view.
    #[error("header not signed by the primary of view {0}")]
    NotPrimary(u64),
    /// The batch does not hash to the header's digest.
    #[error("batch digest does not match the header")]
    DigestMismatch,
    /// A request in the batch does not verify.
    #[error("request {0} in the batch does not verify")]
    BadRequest(usize),
    /// A vote is not a valid signed vote for the certified slot.
    #[error("vote {0} is not a valid signed commit for the slot")]
    BadVote(usize),
    /// A vote comes from a node outside the committee.
    #[error("vote {0} is from a non-member")]
    NotMember(usize),
    /// Two votes from the same signer.
    #[error("vote {0} repeats a signer")]
    DuplicateSigner(usize),
    /// Fewer valid votes than a quorum.
    #[error("{got} votes, a quorum is {need}")]
    NoQuorum {
        /// Valid distinct votes.
        got: usize,
        /// Quorum size.
        need: usize,
    },
    /// The two messages of an equivocation claim do not conflict.
    #[error("the messages do not conflict: {0}")]
    NoConflict(&'static str),
}

/// A commit certificate without its batch: enough to prove that `(v, n, d)` committed, small
/// enough to travel as evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitProof {
    /// The primary's signed header.
    pub pre_prepare: SignedEnvelope,
    /// 2f+1 signed commits.
    pub commits: Vec<SignedEnvelope>,
}

/// What a valid commit certificate proves.
#[derive(Debug, Clone)]
pub struct CertifiedBatch {
    /// The committed slot.
    pub slot: Slot,
    /// The batch time assigned by the primary.
    pub time: Timestamp,
    /// The requests, each verified.
    pub requests: Vec<Verified<Request>>,
    /// The members whose commits are in the certificate.
    pub voters: Vec<NodeId>,
}

fn check_commits(
    committee: &Committee,
    pre_prepare: &SignedEnvelope,
    commits: &[SignedEnvelope],
) -> Result<(Slot, Timestamp, Vec<NodeId>), CertificateError> {
    let (primary, pp) = open_header(pre_prepare).ok_or(CertificateError::BadHeader)?;
    if committee.primary(pp.slot.view) != primary {
        return Err(CertificateError::NotPrimary(pp.slot.view));
    }
    let mut voters = BTreeSet::new();
    for (i, c) in commits.iter().enumerate() {
        let v = open(c).ok_or(CertificateError::BadVote(i))?;
        match v.message() {
            ConsensusMsg::Commit(s) if *s == pp.slot => {}
            _ => return Err(CertificateError::BadVote(i)),
        }
        if !committee.contains(&v.signer()) {
            return Err(CertificateError::NotMember(i));
        }
        if !voters.insert(v.signer()) {
            return Err(CertificateError::DuplicateSigner(i));
        }
    }
    if voters.len() < committee.quorum() {
        return Err(CertificateError::NoQuorum {
            got: voters.len(),
            need: committee.quorum(),
        });
    }
    Ok((pp.slot, pp.time, voters.into_iter().collect()))
}

impl CommitProof {
    /// Checks the proof against `committee`; returns the committed slot and the voters.
    pub fn verify(&self, committee: &Committee) -> Result<(Slot, Vec<NodeId>), CertificateError> {
        let (slot, _, voters) = check_commits(committee, &self.pre_prepare, &self.commits)?;
        Ok((slot, voters))
    }
}

impl CommitCertificate {
    /// Checks every signature, the quorum and the batch digest against `committee`.
    pub fn verify(&self, committee: &Committee) -> Result<CertifiedBatch, CertificateError> {
        let (slot, time, voters) = check_commits(committee, &self.pre_prepare, &self.commits)?;
        if Digest::of_batch(&self.batch) != slot.digest {
            return Err(CertificateError::DigestMismatch);
        }
        let mut requests = Vec::with_capacity(self.batch.len());
        for (i, r) in self.batch.iter().enumerate() {
            requests.push(
                r.clone()
                    .verify::<Request>()
                    .map_err(|_| CertificateError::BadRequest(i))?,
            );
        }
        Ok(CertifiedBatch {
            slot,
            time,
            requests,
            voters,
        })
    }

    /// The certificate without its batch.
    pub fn proof(&self) -> CommitProof {
        CommitProof {
            pre_prepare: self.pre_prepare.clone(),
            commits: self.commits.clone(),
        }
    }

    /// The certified sequence number, read from the header without checking signatures.
    pub fn seq_unverified(&self) -> Option<u64> {
        let env = self.pre_prepare.clone().verify::<ConsensusMsg>().ok()?;
        match env.message() {
            ConsensusMsg::PrePrepare(pp) => Some(pp.slot.seq),
            _ => None,
        }
    }
}

/// The kind of vote a signed message casts on a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum VoteKind {
    /// A primary's pre-prepare header.
    PrePrepare,
    /// A prepare.
    Prepare,
    /// A commit.
    Commit,
}

/// A vote read from a signed message: who cast which kind for which slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CastVote {
    /// The signer.
    pub signer: NodeId,
    /// The kind of vote.
    pub kind: VoteKind,
    /// The slot voted for.
    pub slot: Slot,
}

/// Reads the vote a signed consensus message casts, verifying its signature.
pub fn read_vote(env: &SignedEnvelope) -> Option<CastVote> {
    let v = open(env)?;
    let (kind, slot) = match v.message() {
        ConsensusMsg::PrePrepare(pp) => (VoteKind::PrePrepare, pp.slot),
        ConsensusMsg::Prepare { slot, .. } => (VoteKind::Prepare, *slot),
        ConsensusMsg::Commit(slot) => (VoteKind::Commit, *slot),
        _ => return None,
    };
    Some(CastVote {
        signer: v.signer(),
        kind,
        slot,
    })
}

/// Checks equivocation evidence: two validly signed votes of the same kind, by the same signer,
/// for the same `(view, seq)` with different digests. Returns the offender and the vote kind.
pub fn check_equivocation(
    a: &SignedEnvelope,
    b: &SignedEnvelope,
) -> Result<(NodeId, VoteKind, u64, u64), CertificateError> {
    let x = read_vote(a).ok_or(CertificateError::NoConflict("first message is not a vote"))?;
    let y = read_vote(b).ok_or(CertificateError::NoConflict("second message is not a vote"))?;
    if x.signer != y.signer {
        return Err(CertificateError::NoConflict("different signers"));
    }
    if x.kind != y.kind {
        return Err(CertificateError::NoConflict("different kinds of vote"));
    }
    if (x.slot.view, x.slot.seq) != (y.slot.view, y.slot.seq) {
        return Err(CertificateError::NoConflict("different slots"));
    }
    if x.slot.digest == y.slot.digest {
        return Err(CertificateError::NoConflict("same digest"));
    }
    Ok((x.signer, x.kind, x.slot.view, x.slot.seq))
}

/// Whether a vote of `kind` in `vote_view` for another digest than a certificate of
/// `cert_view` proves misbehaviour. A commit in the certified view or later does: two digests
/// cannot both be prepared in one view (quorum intersection), and once `(v, n, d)` commits the
/// view-change rule of section 4.4 makes every later primary propose `d` at `n`. A prepare only
/// in a later view: in the certified view itself an honest backup may have prepared what an
/// equivocating primary sent it.
pub fn contradicts(kind: VoteKind, vote_view: u64, cert_view: u64) -> bool {
    match kind {
        VoteKind::Commit => vote_view >= cert_view,
        VoteKind::Prepare => vote_view > cert_view,
        VoteKind::PrePrepare => false,
    }
}

/// Checks that a signed prepare or commit contradicts a committed certificate (same sequence
/// number, another digest, a view where [`contradicts`] holds). Returns the offender.
pub fn check_contradiction(
    vote: &SignedEnvelope,
    proof: &CommitProof,
    committee: &Committee,
) -> Result<NodeId, CertificateError> {
    let (slot, _) = proof.verify(committee)?;
    let v = read_vote(vote).ok_or(CertificateError::NoConflict("not a vote"))?;
    if v.kind == VoteKind::PrePrepare {
        return Err(CertificateError::NoConflict("a pre-prepare is not a vote"));
    }
    if v.slot.seq != slot.seq
        || v.slot.digest == slot.digest
        || !contradicts(v.kind, v.slot.view, slot.view)
    {
        return Err(CertificateError::NoConflict(
            "vote agrees with or predates the certificate",
        ));
    }
    Ok(v.signer)
}
