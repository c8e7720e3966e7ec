//! Checking certificates and evidence without any replica state: anyone who knows the
//! committee can verify a commit certificate, and anyone can verify a piece of equivocation
//! evidence. Reputation (dwcp-reputation) uses these checks on committed evidence.

use std::collections::BTreeSet;

use dwcp_protocol::{NodeId, SignedEnvelope, Timestamp, Verified};
use serde::{Deserialize, Serialize};

use crate::{
    committee::Committee,
    messages::{
        CommitCertificate, ConsensusMsg, Digest, MAX_BATCH, Request, Slot, merkle_path,
        merkle_root_from_path, open, open_header,
    },
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
    /// The request is not in the certified batch (bad Merkle path, index or length).
    #[error("the request is not part of the certified batch")]
    NotInBatch,
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

/// Proof that one request was committed: the commit proof of its slot and a Merkle path
/// from the request to the slot's batch digest ([`Digest::of_batch`]). It carries one request
/// and `ceil(log2(batch_len))` hashes instead of the batch, so its size does not depend on
/// what else was batched with it: about `190 B x (2f+1) + 34 B x log2(batch) + request`.
/// Anyone who knows the committee can check it ([`RequestProof::verify`]); the node uses it
/// as the commit certificate of one decision in the cluster document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestProof {
    /// The slot's signed header and 2f+1 signed commits.
    pub proof: CommitProof,
    /// Number of requests in the batch.
    pub batch_len: u32,
    /// Position of the request in the batch.
    pub index: u32,
    /// Sibling hashes from the request's leaf up to the root (RFC 9162 inclusion path).
    pub path: Vec<Digest>,
    /// The signed request.
    pub request: SignedEnvelope,
}

/// What a valid [`RequestProof`] proves.
#[derive(Debug, Clone)]
pub struct CommittedRequest {
    /// The committed slot.
    pub slot: Slot,
    /// The batch time the primary assigned.
    pub time: Timestamp,
    /// Position of the request in the batch.
    pub index: u32,
    /// The request, verified (its signer is the client).
    pub request: Verified<Request>,
    /// The members whose commits are in the proof.
    pub voters: Vec<NodeId>,
}

impl RequestProof {
    /// Checks the commit proof against `committee`, the request's signature, and that the
    /// request sits at `index` of the committed batch.
    pub fn verify(&self, committee: &Committee) -> Result<CommittedRequest, CertificateError> {
        if self.batch_len as usize > MAX_BATCH || self.path.len() > 16 {
            return Err(CertificateError::NotInBatch);
        }
        let (slot, time, voters) =
            check_commits(committee, &self.proof.pre_prepare, &self.proof.commits)?;
        let root = merkle_root_from_path(
            Digest::of_request(&self.request),
            u64::from(self.index),
            u64::from(self.batch_len),
            &self.path,
        )
        .ok_or(CertificateError::NotInBatch)?;
        if Digest::of_batch_root(u64::from(self.batch_len), &root) != slot.digest {
            return Err(CertificateError::NotInBatch);
        }
        let request = self
            .request
            .clone()
            .verify::<Request>()
            .map_err(|_| CertificateError::BadRequest(self.index as usize))?;
        Ok(CommittedRequest {
            slot,
            time,
            index: self.index,
            request,
            voters,
        })
    }
}

/// One commit vote of a compact proof: the voter's index in the committee and its signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactVote {
    /// Position of the voter in the committee's member list.
    #[serde(rename = "m")]
    pub member: u16,
    /// The ed25519 signature of the voter's commit envelope (64 bytes).
    #[serde(rename = "g", with = "crate::messages::serde_bytes_vec")]
    pub signature: Vec<u8>,
}

/// A [`RequestProof`] whose commits are reduced to [`CompactVote`]s. Every commit of a slot
/// signs the same message (`Commit(slot)`, the slot read from the signed pre-prepare header),
/// so a vote is only its signer's committee index and its 64-byte signature: about 67 bytes
/// instead of an envelope of about 190. The verifier rebuilds each envelope
/// ([`SignedEnvelope::from_signature`]) and checks it exactly as [`RequestProof::verify`]
/// does. A small request's proof: 684 B instead of 994 at n = 4, 1,980 B instead of 4,108 at
/// n = 31 (test `request_proof_sizes_grow_with_the_quorum_not_the_batch`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactRequestProof {
    /// The primary's signed header.
    pub pre_prepare: SignedEnvelope,
    /// 2f+1 compact commits.
    pub commits: Vec<CompactVote>,
    /// Number of requests in the batch.
    pub batch_len: u32,
    /// Position of the request in the batch.
    pub index: u32,
    /// Sibling hashes from the request's leaf up to the root.
    pub path: Vec<Digest>,
    /// The signed request.
    pub request: SignedEnvelope,
}

impl RequestProof {
    /// The compact form, keeping the commits whose envelopes can be rebuilt from their
    /// signature (a canonical `Commit` of the header's slot by a member); `None` when fewer
    /// than a quorum can (use the full proof then).
    pub fn compact(&self, committee: &Committee) -> Option<CompactRequestProof> {
        let (_, pp) = open_header(&self.proof.pre_prepare)?;
        let vote = ConsensusMsg::Commit(pp.slot);
        let mut commits = Vec::with_capacity(self.proof.commits.len());
        let mut seen = BTreeSet::new();
        for c in &self.proof.commits {
            let signer = c.claimed_signer();
            let (Some(member), Some(sig)) = (committee.index_of(&signer), c.signature_bytes())
            else {
                continue;
            };
            if c.carries(&vote) && seen.insert(member) {
                commits.push(CompactVote {
                    member,
                    signature: sig.to_vec(),
                });
            }
        }
        if commits.len() < committee.quorum() {
            return None;
        }
        Some(CompactRequestProof {
            pre_prepare: self.proof.pre_prepare.clone(),
            commits,
            batch_len: self.batch_len,
            index: self.index,
            path: self.path.clone(),
            request: self.request.clone(),
        })
    }
}

impl CompactRequestProof {
    /// Rebuilds the full proof (not checked: [`CompactRequestProof::verify`] checks it).
    pub fn expand(&self, committee: &Committee) -> Result<RequestProof, CertificateError> {
        let (_, pp) = open_header(&self.pre_prepare).ok_or(CertificateError::BadHeader)?;
        let vote = ConsensusMsg::Commit(pp.slot);
        let mut commits = Vec::with_capacity(self.commits.len());
        for (i, c) in self.commits.iter().enumerate() {
            let member = committee
                .member(c.member)
                .ok_or(CertificateError::NotMember(i))?;
            let sig: [u8; 64] = c
                .signature
                .as_slice()
                .try_into()
                .map_err(|_| CertificateError::BadVote(i))?;
            commits.push(SignedEnvelope::from_signature(member, &vote, sig));
        }
        Ok(RequestProof {
            proof: CommitProof {
                pre_prepare: self.pre_prepare.clone(),
                commits,
            },
            batch_len: self.batch_len,
            index: self.index,
            path: self.path.clone(),
            request: self.request.clone(),
        })
    }

    /// Checks it as [`RequestProof::verify`] checks the full proof.
    pub fn verify(&self, committee: &Committee) -> Result<CommittedRequest, CertificateError> {
        if self.commits.len() > committee.n() {
            return Err(CertificateError::DuplicateSigner(committee.n()));
        }
        self.expand(committee)?.verify(committee)
    }
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

    /// A proof that the request at `index` of this certificate's batch was committed (not
    /// checked here; [`RequestProof::verify`] checks it).
    pub fn request_proof(&self, index: usize) -> Option<RequestProof> {
        let request = self.batch.get(index)?.clone();
        let leaves: Vec<Digest> = self.batch.iter().map(Digest::of_request).collect();
        Some(RequestProof {
            proof: self.proof(),
            batch_len: u32::try_from(self.batch.len()).ok()?,
            index: u32::try_from(index).ok()?,
            path: merkle_path(&leaves, index),
            request,
        })
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

#[cfg(test)]
mod tests {
    use dwcp_protocol::NodeKey;

    use super::*;
    use crate::messages::{PrePrepare, merkle_root};

    fn key(i: usize) -> NodeKey {
        NodeKey::from_secret_bytes([i as u8 + 1; 32])
    }

    fn committee(n: usize) -> Committee {
        Committee::new(0, (0..n).map(|i| key(i).node_id()).collect()).unwrap()
    }

    fn request(client: usize, nonce: u64, len: usize) -> SignedEnvelope {
        Verified::sign(
            &key(client),
            Request {
                nonce,
                op: vec![nonce as u8; len],
            },
        )
        .unwrap()
        .envelope()
        .clone()
    }

    /// A certificate for `batch` at seq 7 signed by the first 2f+1 members of `c`.
    fn certificate(c: &Committee, n: usize, batch: Vec<SignedEnvelope>) -> CommitCertificate {
        let slot = Slot {
            view: 0,
            seq: 7,
            digest: Digest::of_batch(&batch),
        };
        let pre_prepare = Verified::sign(
            &key(0),
            ConsensusMsg::PrePrepare(PrePrepare {
                slot,
                time: Timestamp(5),
            }),
        )
        .unwrap()
        .envelope()
        .clone();
        let commits = (0..c.quorum())
            .map(|i| {
                assert!(i < n);
                Verified::sign(&key(i), ConsensusMsg::Commit(slot))
                    .unwrap()
                    .envelope()
                    .clone()
            })
            .collect();
        CommitCertificate {
            pre_prepare,
            batch,
            commits,
        }
    }

    #[test]
    fn merkle_paths_prove_every_leaf_and_nothing_else() {
        for size in 1..=40usize {
            let leaves: Vec<Digest> = (0..size)
                .map(|i| Digest::of("leaf", &[&(i as u64).to_be_bytes()]))
                .collect();
            let root = merkle_root(&leaves);
            for (i, leaf) in leaves.iter().enumerate() {
                let path = merkle_path(&leaves, i);
                assert!(path.len() <= 6, "size {size}: path of {}", path.len());
                let got = merkle_root_from_path(*leaf, i as u64, size as u64, &path);
                assert_eq!(got, Some(root), "size {size} index {i}");
                // Another leaf, another index or another size does not give the root.
                let other = Digest::of("other", &[]);
                assert_ne!(
                    merkle_root_from_path(other, i as u64, size as u64, &path),
                    Some(root)
                );
                if size > 1 {
                    let j = (i + 1) % size;
                    assert_ne!(
                        merkle_root_from_path(*leaf, j as u64, size as u64, &path),
                        Some(root),
                        "size {size}: leaf {i} passes as {j}"
                    );
                }
                assert_eq!(
                    merkle_root_from_path(*leaf, size as u64, size as u64, &path),
                    None
                );
            }
        }
    }

    #[test]
    fn a_request_proof_proves_one_committed_request() {
        let c = committee(4);
        let batch: Vec<SignedEnvelope> = (0..5).map(|i| request(9, i, 40)).collect();
        let cert = certificate(&c, 4, batch.clone());
        cert.verify(&c).unwrap();
        for (i, env) in batch.iter().enumerate() {
            let p = cert.request_proof(i).unwrap();
            let got = p.verify(&c).unwrap();
            assert_eq!(got.slot.seq, 7);
            assert_eq!(got.time, Timestamp(5));
            assert_eq!(got.index as usize, i);
            assert_eq!(got.request.envelope(), env);
            assert_eq!(got.voters.len(), 3);
        }
        assert!(cert.request_proof(5).is_none());

        let good = cert.request_proof(2).unwrap();
        // A request that was not in the batch.
        let mut p = good.clone();
        p.request = request(9, 99, 40);
        assert_eq!(p.verify(&c).unwrap_err(), CertificateError::NotInBatch);
        // The right request claimed at another index, or a wrong batch length.
        let mut p = good.clone();
        p.index = 3;
        assert_eq!(p.verify(&c).unwrap_err(), CertificateError::NotInBatch);
        let mut p = good.clone();
        p.batch_len = 6;
        assert_eq!(p.verify(&c).unwrap_err(), CertificateError::NotInBatch);
        // Too few commits.
        let mut p = good.clone();
        p.proof.commits.pop();
        assert_eq!(
            p.verify(&c).unwrap_err(),
            CertificateError::NoQuorum { got: 2, need: 3 }
        );
        // Another committee.
        let other = Committee::new(0, (10..14).map(|i| key(i).node_id()).collect()).unwrap();
        assert!(matches!(
            good.verify(&other).unwrap_err(),
            CertificateError::NotPrimary(0) | CertificateError::NotMember(_)
        ));
    }

    #[test]
    fn a_compact_proof_proves_the_same_and_is_checked_as_strictly() {
        let c = committee(7);
        let batch: Vec<SignedEnvelope> = (0..5).map(|i| request(9, i, 40)).collect();
        let cert = certificate(&c, 7, batch);
        let full = cert.request_proof(3).unwrap();
        let compact = full.compact(&c).unwrap();
        assert_eq!(compact.commits.len(), c.quorum());
        assert_eq!(compact.expand(&c).unwrap(), full);
        let a = full.verify(&c).unwrap();
        let b = compact.verify(&c).unwrap();
        assert_eq!((a.slot, a.index, a.voters), (b.slot, b.index, b.voters));
        // A flipped signature bit, a voter index outside the committee, a repeated voter,
        // a short signature, too few votes, another committee: all refused.
        let mut p = compact.clone();
        p.commits[0].signature[5] ^= 1;
        assert_eq!(p.verify(&c).unwrap_err(), CertificateError::BadVote(0));
        let mut p = compact.clone();
        p.commits[1].member = 200;
        assert_eq!(p.verify(&c).unwrap_err(), CertificateError::NotMember(1));
        let mut p = compact.clone();
        p.commits[1] = p.commits[0].clone();
        assert!(p.verify(&c).is_err());
        let mut p = compact.clone();
        p.commits[2].signature.truncate(63);
        assert_eq!(p.verify(&c).unwrap_err(), CertificateError::BadVote(2));
        let mut p = compact.clone();
        p.commits.pop();
        assert!(matches!(
            p.verify(&c).unwrap_err(),
            CertificateError::NoQuorum { .. }
        ));
        let other = Committee::new(0, (10..17).map(|i| key(i).node_id()).collect()).unwrap();
        assert!(compact.verify(&other).is_err());
        // A proof with too few rebuildable commits has no compact form.
        let mut short = full.clone();
        short.proof.commits.truncate(c.quorum() - 1);
        assert!(short.compact(&c).is_none());
    }

    /// Sizes of one-request proofs for committees n = 3f+1 up to 31 (printed; the node's
    /// certificate bound is checked against the largest in `dwcp-node`'s `cert` tests).
    #[test]
    fn request_proof_sizes_grow_with_the_quorum_not_the_batch() {
        let mut sizes = Vec::new();
        for n in [4usize, 7, 16, 31] {
            let c = committee(n);
            for batch_len in [1usize, 64, 512] {
                let batch: Vec<SignedEnvelope> =
                    (0..batch_len).map(|i| request(40, i as u64, 100)).collect();
                let cert = certificate(&c, n, batch);
                let p = cert.request_proof(batch_len / 2).unwrap();
                let mut bytes = Vec::new();
                ciborium::into_writer(&p, &mut bytes).unwrap();
                p.verify(&c).unwrap();
                let compact = p.compact(&c).unwrap();
                let mut small = Vec::new();
                ciborium::into_writer(&compact, &mut small).unwrap();
                compact.verify(&c).unwrap();
                assert!(small.len() < bytes.len());
                sizes.push((n, batch_len, bytes.len(), small.len()));
            }
        }
        for (n, b, s, k) in &sizes {
            println!("n={n:2} batch={b:3}: request proof {s} bytes, compact {k} bytes");
        }
        // Doubling the quorum roughly doubles the size; the batch adds only its path.
        let at = |n: usize, b: usize| sizes.iter().find(|x| x.0 == n && x.1 == b).unwrap().2;
        let compact = |n: usize| sizes.iter().find(|x| x.0 == n && x.1 == 1).unwrap().3;
        // The compact form pays ~67 bytes per vote instead of ~190.
        assert!(compact(31) * 2 < at(31, 1), "{sizes:?}");
        assert!(at(31, 512) - at(31, 1) < 32 * 12, "{sizes:?}");
        assert!(at(31, 1) > 4 * at(4, 1), "{sizes:?}");
    }
}
