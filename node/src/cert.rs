//! Commit certificates of cluster decisions: how a decision committed by PBFT reaches the
//! cluster document (`dwcp-statesync`) in a form every node can check on its own.
//!
//! A decision is one consensus operation (a request's `op`):
//!
//! | tag | operation | document record |
//! | --- | --- | --- |
//! | [`QUARANTINE_DECISION_TAG`] `0xA2` | [`QuarantineDecisionOp`]: node, reason, grounds | `quarantine/<node>` |
//! | [`VM_DECISION_TAG`] `0xA3` | [`VmDecisionOp`]: vm, spec, host, state | `vms/<vm>` |
//! | [`CUT_DECISION_TAG`] `0xA5` | [`CutDecisionOp`]: a compaction cut with f+1 member endorsements | none: every node compacts its document at the cut |
//!
//! Its certificate is `0x02 || CBOR { epoch, proof }` ([`compact_certificate_for`]: each
//! commit as the voter's committee index and signature, what the node writes) or the full
//! form `0x01 || CBOR { epoch, proof }` where `proof` is a
//! [`dwcp_consensus::RequestProof`]: the primary's signed pre-prepare header, 2f+1 signed
//! commits of the slot, the signed request and its Merkle path to the batch digest. The
//! verifier ([`CommitteeVerifier`]) looks up the committee of `epoch`, checks the proof
//! against it, decodes the operation and returns the decision; `decision_seq` is
//! `seq * 1024 + index in the batch` ([`decision_seq`]), so later decisions supersede earlier
//! ones and two decisions never share a number. Everything is a pure function of the bytes and
//! the committee list, so every honest node reaches the same verdict (the document's
//! convergence depends on it).
//!
//! **Why a quarantine decision carries grounds.** A commit certificate proves that an
//! operation was ordered, not that the replicated state machine acted on it. Operator votes
//! quarantine a node only once f+1 distinct committee members voted, so one committed vote
//! proves nothing on its own. The decision operation therefore carries its grounds, checkable
//! without any replica state: exactly f+1 signed quarantine-vote requests from distinct
//! committee members ([`Grounds::Votes`]), or two conflicting signed votes of the node for one
//! slot ([`Grounds::Equivocation`], which quarantines at once under the reputation rules).
//! Replicas apply the first valid decision per node ([`crate::consensus::AcpState`]) and
//! ignore later ones.
//!
//! **Committees.** The genesis committee (configuration `acp.committee`, epoch 0), and each
//! later epoch's committee once this node's consensus driver reaches that epoch and computes
//! it from committed state ([`CommitteeVerifier::insert`]). A certificate
//! from an epoch not known is refused with [`CertError::UnknownCommittee`], which the document
//! does not remember as bad content, so the change is taken when it comes again later.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use dwcp_consensus::{
    CertificateError, CommitCertificate, CommittedRequest, Committee, CompactRequestProof,
    RequestProof, check_equivocation,
};
use dwcp_protocol::{NodeId, SignedEnvelope, VmId};
use dwcp_statesync::{
    CertError, CertificateVerifier, QuarantineDecision, VmDecision, VmSpec, VmState,
    cert::MAX_CERTIFICATE_BYTES, schema::MAX_TEXT_BYTES,
};
use serde::{Deserialize, Serialize};

use crate::consensus::{QUARANTINE_VOTE_TAG, QuarantineVote};

/// First byte of a quarantine decision operation.
pub const QUARANTINE_DECISION_TAG: u8 = 0xA2;
/// First byte of a VM decision operation.
pub const VM_DECISION_TAG: u8 = 0xA3;
/// First byte of a compaction cut decision operation.
pub const CUT_DECISION_TAG: u8 = 0xA5;
/// First byte of a member's endorsement of a compaction cut (a signed request that is never
/// submitted on its own; f+1 of them are the grounds of a [`CutDecisionOp`]).
pub const CUT_ENDORSE_TAG: u8 = 0xA6;
/// Most heads a compaction cut names.
pub const MAX_CUT_HEADS: usize = 64;
/// First byte of a certificate in the full form (format version 1: whole commit envelopes).
pub const CERT_VERSION: u8 = 1;
/// First byte of a certificate in the compact form (format version 2: each commit as its
/// voter's committee index and signature, [`dwcp_consensus::CompactRequestProof`]).
pub const CERT_VERSION_COMPACT: u8 = 2;
/// `decision_seq = seq * SEQ_STRIDE + index`; a batch holds at most 512 requests.
pub const SEQ_STRIDE: u64 = 1024;

/// The decision sequence number of the request at `index` of the batch committed at `seq`.
pub fn decision_seq(seq: u64, index: u32) -> u64 {
    seq.saturating_mul(SEQ_STRIDE)
        .saturating_add(u64::from(index))
}

/// Why a quarantine is decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Grounds {
    /// Exactly f+1 signed quarantine-vote requests ([`QuarantineVote`]) for the node, from
    /// distinct committee members.
    Votes(Vec<SignedEnvelope>),
    /// Two signed votes of the node, of one kind, for one `(view, seq)`, with different
    /// digests.
    Equivocation {
        /// One vote.
        first: SignedEnvelope,
        /// The conflicting vote.
        second: SignedEnvelope,
    },
}

/// A quarantine decision, submitted by a replica whose state quarantined the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineDecisionOp {
    /// The node quarantined.
    pub node: NodeId,
    /// Short reason (at most 64 bytes, the document's text limit).
    pub reason: String,
    /// What proves it.
    pub grounds: Grounds,
}

/// A VM decision: where a VM runs, with which spec, in which state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDecisionOp {
    /// The VM.
    pub vm: VmId,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Disk, GiB.
    pub disk_gib: u64,
    /// Host, when placed.
    pub host: Option<NodeId>,
    /// State text (`pending`, `placed`, `running`, `migrating`, `stopped`, `failed`).
    pub state: String,
}

/// Where the cluster document is compacted: the heads whose state becomes the next epoch's
/// snapshot, and the heartbeat age below which node entries are dropped
/// (`dwcp_statesync::EpochCut`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutSpec {
    /// The document epoch this cut starts (current + 1).
    pub epoch: u64,
    /// Change hashes of the heads (at most [`MAX_CUT_HEADS`]).
    pub heads: Vec<[u8; 32]>,
    /// Node entries whose last heartbeat is older than this (ms since the Unix epoch) are
    /// dropped.
    pub departed_before_ms: u64,
    /// Hash of the base change the compaction builds (`ClusterDoc::cut_base`): endorsers
    /// check it, and a node that cannot build the snapshot takes it from a peer by this hash.
    pub base: [u8; 32],
}

impl CutSpec {
    /// The statesync core's form of the cut.
    pub fn to_epoch_cut(&self) -> dwcp_statesync::EpochCut {
        dwcp_statesync::EpochCut {
            epoch: self.epoch,
            heads: self
                .heads
                .iter()
                .map(|h| dwcp_statesync::ChangeHash(*h))
                .collect(),
            departed_before_ms: self.departed_before_ms,
        }
    }

    /// What a member signs to endorse this cut: its epoch and the digest of its CBOR form
    /// (so f+1 endorsements do not repeat the heads).
    pub fn endorsement(&self) -> CutEndorsement {
        let mut cbor = Vec::new();
        // Writing into a Vec cannot fail for this plain struct.
        let _ = ciborium::into_writer(self, &mut cbor);
        CutEndorsement {
            epoch: self.epoch,
            cut: dwcp_consensus::Digest::of("dwcp/v3/compaction-cut", &[&cbor]).0,
        }
    }

    /// The endorsement operation of this cut (`CUT_ENDORSE_TAG || CBOR(endorsement)`), which a
    /// member signs as a request once it holds every head.
    pub fn endorsement_op(&self) -> Vec<u8> {
        encode_tagged(CUT_ENDORSE_TAG, &self.endorsement())
    }
}

/// A member's endorsement of a compaction cut (the operation of a signed request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutEndorsement {
    /// The epoch the cut starts.
    pub epoch: u64,
    /// Digest of the cut's CBOR form.
    pub cut: [u8; 32],
}

impl CutEndorsement {
    /// Decodes an endorsement operation.
    pub fn decode(op: &[u8]) -> Result<Self, CertError> {
        decode_tagged(CUT_ENDORSE_TAG, op)
    }
}

/// A compaction of the cluster document, decided by the committee.
///
/// **Why endorsements.** A commit certificate proves that the operation was ordered, not that
/// anybody holds the heads it names: a faulty proposer could commit a cut of invented heads,
/// and no honest node could ever compact at it. So the operation carries exactly f+1 signed
/// endorsements of the same cut from distinct committee members; each member endorses only
/// when its document holds every head, so at least one honest node has them and anti-entropy
/// brings them to everyone. Replicas apply the first valid cut per epoch in decision order;
/// nodes outside the committee take a cut only when f+1 members answer with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutDecisionOp {
    /// The cut.
    pub cut: CutSpec,
    /// f+1 signed endorsement requests (op [`CutSpec::endorsement_op`]) from distinct members.
    pub endorsements: Vec<SignedEnvelope>,
}

impl CutDecisionOp {
    /// `CUT_DECISION_TAG || CBOR`.
    pub fn encode(&self) -> Vec<u8> {
        encode_tagged(CUT_DECISION_TAG, self)
    }

    /// Decodes an operation (see [`CutDecisionOp::check`] for the endorsements).
    pub fn decode(op: &[u8]) -> Result<Self, CertError> {
        decode_tagged(CUT_DECISION_TAG, op)
    }

    /// Checks the cut's bounds and its endorsements against `committee`; pure, the same on
    /// every node.
    pub fn check(&self, committee: &Committee) -> Result<(), CertError> {
        let bad = |s: &str| Err(CertError::InvalidDecision(s.to_owned()));
        if self.cut.heads.is_empty() || self.cut.heads.len() > MAX_CUT_HEADS {
            return bad("a cut names 1 to 64 heads");
        }
        if self.cut.epoch == 0 {
            return bad("epoch 0 is the genesis document");
        }
        if self.endorsements.len() != committee.f() + 1 {
            return bad("a cut needs exactly f+1 endorsements");
        }
        let mut endorsers = std::collections::BTreeSet::new();
        for env in &self.endorsements {
            let Ok(r) = env.clone().verify::<dwcp_consensus::Request>() else {
                return bad("an endorsement is not a validly signed request");
            };
            match CutEndorsement::decode(&r.op) {
                Ok(e) if e == self.cut.endorsement() => {}
                Ok(_) => return bad("an endorsement is for another cut"),
                Err(_) => return bad("an endorsement does not decode"),
            }
            if !committee.contains(&r.signer()) {
                return bad("an endorsement is from a non-member");
            }
            if !endorsers.insert(r.signer()) {
                return bad("two endorsements from one member");
            }
        }
        Ok(())
    }
}

fn encode_tagged<T: Serialize>(tag: u8, v: &T) -> Vec<u8> {
    let mut out = vec![tag];
    if ciborium::into_writer(v, &mut out).is_err() {
        out.truncate(1);
    }
    out
}

fn decode_tagged<T: for<'de> Deserialize<'de>>(tag: u8, op: &[u8]) -> Result<T, CertError> {
    if op.len() > MAX_CERTIFICATE_BYTES {
        return Err(CertError::TooLong(op.len()));
    }
    match op.split_first() {
        Some((t, _)) if *t != tag => Err(CertError::WrongKind),
        None => Err(CertError::WrongKind),
        Some((_, mut body)) => {
            let v: T = ciborium::from_reader(&mut body)
                .map_err(|e| CertError::Malformed(format!("operation: {e}")))?;
            if !body.is_empty() {
                return Err(CertError::Malformed(
                    "trailing bytes after the operation".into(),
                ));
            }
            Ok(v)
        }
    }
}

impl QuarantineDecisionOp {
    /// `QUARANTINE_DECISION_TAG || CBOR`.
    pub fn encode(&self) -> Vec<u8> {
        encode_tagged(QUARANTINE_DECISION_TAG, self)
    }

    /// Decodes an operation (no checks of the grounds; see [`QuarantineDecisionOp::check`]).
    pub fn decode(op: &[u8]) -> Result<Self, CertError> {
        decode_tagged(QUARANTINE_DECISION_TAG, op)
    }

    /// Checks the reason and the grounds against `committee`; pure, the same on every node.
    pub fn check(&self, committee: &Committee) -> Result<(), CertError> {
        let bad = |s: &str| Err(CertError::InvalidDecision(s.to_owned()));
        if self.reason.len() > MAX_TEXT_BYTES {
            return bad("reason longer than 64 bytes");
        }
        match &self.grounds {
            Grounds::Votes(votes) => {
                if votes.len() != committee.f() + 1 {
                    return bad("grounds must hold exactly f+1 votes");
                }
                let mut voters = std::collections::BTreeSet::new();
                for env in votes {
                    let Ok(r) = env.clone().verify::<dwcp_consensus::Request>() else {
                        return bad("a vote is not a validly signed request");
                    };
                    if r.op.first() != Some(&QUARANTINE_VOTE_TAG) {
                        return bad("a vote is not a quarantine vote");
                    }
                    let Ok(v) = QuarantineVote::decode(&r.op) else {
                        return bad("a vote does not decode");
                    };
                    if v.node != self.node {
                        return bad("a vote is for another node");
                    }
                    if !committee.contains(&r.signer()) {
                        return bad("a vote is from a non-member");
                    }
                    if !voters.insert(r.signer()) {
                        return bad("two votes from one member");
                    }
                }
                Ok(())
            }
            Grounds::Equivocation { first, second } => match check_equivocation(first, second) {
                Ok((who, ..)) if who == self.node && committee.contains(&who) => Ok(()),
                Ok(_) => bad("the equivocation is not by this member"),
                Err(e) => Err(CertError::InvalidDecision(format!("equivocation: {e}"))),
            },
        }
    }
}

impl VmDecisionOp {
    /// `VM_DECISION_TAG || CBOR`.
    pub fn encode(&self) -> Vec<u8> {
        encode_tagged(VM_DECISION_TAG, self)
    }

    /// Decodes an operation and checks its fields.
    pub fn decode(op: &[u8]) -> Result<Self, CertError> {
        let v: Self = decode_tagged(VM_DECISION_TAG, op)?;
        if VmState::parse(&v.state).is_none() {
            return Err(CertError::InvalidDecision(format!(
                "unknown VM state `{}`",
                v.state
            )));
        }
        Ok(v)
    }

    /// The next decision about the VM of `prev`: same spec and host, state `state`.
    pub fn next(prev: &VmDecision, state: VmState) -> Self {
        Self {
            vm: prev.vm,
            vcpus: prev.spec.vcpus,
            memory_mib: prev.spec.memory_mib,
            disk_gib: prev.spec.disk_gib,
            host: prev.host,
            state: state.as_str().to_owned(),
        }
    }

    fn decision(&self, decision_seq: u64) -> Result<VmDecision, CertError> {
        Ok(VmDecision {
            vm: self.vm,
            decision_seq,
            spec: VmSpec {
                vcpus: self.vcpus,
                memory_mib: self.memory_mib,
                disk_gib: self.disk_gib,
            },
            host: self.host,
            state: VmState::parse(&self.state)
                .ok_or_else(|| CertError::InvalidDecision("unknown VM state".into()))?,
        })
    }
}

#[derive(Serialize, Deserialize)]
struct WireCertificate {
    epoch: u64,
    proof: RequestProof,
}

#[derive(Serialize, Deserialize)]
struct WireCompactCertificate {
    epoch: u64,
    proof: CompactRequestProof,
}

/// The compact certificate ([`CERT_VERSION_COMPACT`]) of the request at `index` of a batch
/// `committee` committed: what the node writes into the cluster document (684 B instead of
/// 994 at n = 4, 1,980 instead of 4,108 at n = 31 for a small operation). Falls back to the
/// full form if fewer than a quorum of the commits can be rebuilt from their signatures.
pub fn compact_certificate_for(
    cert: &CommitCertificate,
    committee: &Committee,
    index: usize,
) -> Option<Vec<u8>> {
    let proof = cert.request_proof(index)?;
    let Some(compact) = proof.compact(committee) else {
        return certificate_for(cert, committee.epoch(), index);
    };
    let mut out = vec![CERT_VERSION_COMPACT];
    ciborium::into_writer(
        &WireCompactCertificate {
            epoch: committee.epoch(),
            proof: compact,
        },
        &mut out,
    )
    .ok()?;
    Some(out)
}

/// The certificate of the request at `index` of a committed batch, or `None` if there is no
/// such request.
pub fn certificate_for(cert: &CommitCertificate, epoch: u64, index: usize) -> Option<Vec<u8>> {
    let proof = cert.request_proof(index)?;
    let mut out = vec![CERT_VERSION];
    ciborium::into_writer(&WireCertificate { epoch, proof }, &mut out).ok()?;
    Some(out)
}

fn cert_error(e: CertificateError) -> CertError {
    match e {
        CertificateError::NotInBatch | CertificateError::DigestMismatch => CertError::NotInBatch,
        CertificateError::BadRequest(_) => {
            CertError::Malformed("the request does not verify".into())
        }
        _ => CertError::NoQuorum,
    }
}

/// Checks decision certificates against the committees it knows: the genesis committee from
/// `acp.committee` and every later epoch's committee this node computed from committed state
/// (the consensus driver adds them). Clones share one table, so the state-sync driver and the
/// API learn a new epoch's committee the moment consensus reaches it. With no committee it
/// refuses every certificate, so the document holds node entries only.
#[derive(Debug, Clone, Default)]
pub struct CommitteeVerifier {
    committees: Arc<RwLock<BTreeMap<u64, Committee>>>,
}

/// Most committees a verifier keeps (the oldest go first; certificates of those epochs are
/// refused as of an unknown committee, and compaction drops their records anyway).
pub const MAX_KNOWN_COMMITTEES: usize = 1024;

impl CommitteeVerifier {
    /// A verifier knowing `genesis` (none: refuses everything).
    pub fn new(genesis: Option<Committee>) -> Self {
        let v = Self::default();
        if let Some(c) = genesis {
            v.insert(c);
        }
        v
    }

    fn table(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Committee>> {
        // A panic while holding the lock cannot leave the map half-written (insert is one
        // call), so a poisoned lock is still consistent.
        self.committees.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds the committee of its epoch (replacing one known for that epoch).
    pub fn insert(&self, committee: Committee) {
        let mut t = self.committees.write().unwrap_or_else(|e| e.into_inner());
        t.insert(committee.epoch(), committee);
        while t.len() > MAX_KNOWN_COMMITTEES {
            t.pop_first();
        }
    }

    /// The committee of `epoch`, if known.
    pub fn committee(&self, epoch: u64) -> Option<Committee> {
        self.table().get(&epoch).cloned()
    }

    /// The committee of the latest epoch known.
    pub fn latest(&self) -> Option<Committee> {
        self.table().values().next_back().cloned()
    }

    /// Opens a certificate: bounds, format, committee, commit proof, Merkle path. The
    /// certificate's epoch must be the one of the view its slot committed in.
    pub fn open(&self, certificate: &[u8]) -> Result<(Committee, CommittedRequest), CertError> {
        if certificate.len() > MAX_CERTIFICATE_BYTES {
            return Err(CertError::TooLong(certificate.len()));
        }
        fn read<T: for<'de> Deserialize<'de>>(mut body: &[u8]) -> Result<T, CertError> {
            let w: T = ciborium::from_reader(&mut body)
                .map_err(|e| CertError::Malformed(e.to_string()))?;
            if !body.is_empty() {
                return Err(CertError::Malformed("trailing bytes".into()));
            }
            Ok(w)
        }
        let committee_of = |epoch: u64| {
            self.committee(epoch)
                .ok_or(CertError::UnknownCommittee(epoch))
        };
        let same_epoch = |epoch: u64, req: CommittedRequest| {
            if dwcp_consensus::epoch_of_view(req.slot.view) == epoch {
                Ok(req)
            } else {
                Err(CertError::Malformed(
                    "the certificate's epoch is not the one of its view".into(),
                ))
            }
        };
        match certificate.split_first() {
            Some((&CERT_VERSION, body)) => {
                let w: WireCertificate = read(body)?;
                let committee = committee_of(w.epoch)?;
                let req = w.proof.verify(&committee).map_err(cert_error)?;
                Ok((committee, same_epoch(w.epoch, req)?))
            }
            Some((&CERT_VERSION_COMPACT, body)) => {
                let w: WireCompactCertificate = read(body)?;
                let committee = committee_of(w.epoch)?;
                let req = w.proof.verify(&committee).map_err(cert_error)?;
                Ok((committee, same_epoch(w.epoch, req)?))
            }
            _ => Err(CertError::Malformed("unknown certificate version".into())),
        }
    }
}

impl CommitteeVerifier {
    /// Opens the certificate of a compaction cut decision and checks its endorsements; returns
    /// the operation and its decision sequence number.
    pub fn verify_cut(&self, certificate: &[u8]) -> Result<(CutDecisionOp, u64), CertError> {
        let (committee, req) = self.open(certificate)?;
        let op = CutDecisionOp::decode(&req.request.op)?;
        op.check(&committee)?;
        Ok((op, decision_seq(req.slot.seq, req.index)))
    }
}

impl CertificateVerifier for CommitteeVerifier {
    fn verify_vm(&self, certificate: &[u8]) -> Result<VmDecision, CertError> {
        let (_, req) = self.open(certificate)?;
        let op = VmDecisionOp::decode(&req.request.op)?;
        op.decision(decision_seq(req.slot.seq, req.index))
    }

    fn verify_quarantine(&self, certificate: &[u8]) -> Result<QuarantineDecision, CertError> {
        let (committee, req) = self.open(certificate)?;
        let op = QuarantineDecisionOp::decode(&req.request.op)?;
        op.check(&committee)?;
        Ok(QuarantineDecision {
            node: op.node,
            decision_seq: decision_seq(req.slot.seq, req.index),
            quarantined: true,
            reason: op.reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use dwcp_consensus::{ConsensusMsg, Digest, PrePrepare, Request, Slot};
    use dwcp_protocol::{NodeKey, Timestamp, Verified};

    use super::*;

    fn key(i: usize) -> NodeKey {
        NodeKey::from_secret_bytes([i as u8 + 1; 32])
    }

    fn committee(n: usize) -> Committee {
        Committee::new(0, (0..n).map(|i| key(i).node_id()).collect()).unwrap()
    }

    fn request(client: usize, nonce: u64, op: Vec<u8>) -> SignedEnvelope {
        Verified::sign(&key(client), Request { nonce, op })
            .unwrap()
            .envelope()
            .clone()
    }

    fn vote(voter: usize, node: NodeId, reason: &str) -> SignedEnvelope {
        request(
            voter,
            7,
            QuarantineVote {
                node,
                reason: reason.into(),
            }
            .encode(),
        )
    }

    /// A commit certificate for `batch` at `seq`, with commits from the first 2f+1 members
    /// (or from `signers` when given).
    fn commit(
        c: &Committee,
        seq: u64,
        batch: Vec<SignedEnvelope>,
        signers: Option<Vec<usize>>,
    ) -> CommitCertificate {
        let slot = Slot {
            view: 0,
            seq,
            digest: Digest::of_batch(&batch),
        };
        let pre_prepare = Verified::sign(
            &key(0),
            ConsensusMsg::PrePrepare(PrePrepare {
                slot,
                time: Timestamp(1),
            }),
        )
        .unwrap()
        .envelope()
        .clone();
        let signers = signers.unwrap_or_else(|| (0..c.quorum()).collect());
        CommitCertificate {
            pre_prepare,
            batch,
            commits: signers
                .into_iter()
                .map(|i| {
                    Verified::sign(&key(i), ConsensusMsg::Commit(slot))
                        .unwrap()
                        .envelope()
                        .clone()
                })
                .collect(),
        }
    }

    fn quarantine_op(n: usize, victim: usize, reason_len: usize) -> QuarantineDecisionOp {
        let c = committee(n);
        let node = key(victim).node_id();
        QuarantineDecisionOp {
            node,
            reason: "operator votes".into(),
            grounds: Grounds::Votes(
                (0..=c.f())
                    .map(|i| vote(i, node, &"r".repeat(reason_len)))
                    .collect(),
            ),
        }
    }

    #[test]
    fn a_valid_quarantine_certificate_is_accepted() {
        let c = committee(4);
        let op = quarantine_op(4, 3, 8);
        let batch = vec![
            request(1, 1, vec![crate::consensus::PROBE_TAG]),
            request(2, 2, op.encode()),
        ];
        let cert = certificate_for(&commit(&c, 5, batch, None), 0, 1).unwrap();
        let v = CommitteeVerifier::new(Some(c));
        let d = v.verify_quarantine(&cert).unwrap();
        assert_eq!(
            d,
            QuarantineDecision {
                node: key(3).node_id(),
                decision_seq: 5 * SEQ_STRIDE + 1,
                quarantined: true,
                reason: "operator votes".into(),
            }
        );
        // A quarantine certificate is not a VM certificate.
        assert_eq!(v.verify_vm(&cert).unwrap_err(), CertError::WrongKind);
    }

    fn cut_op(endorsers: &[usize], heads: usize) -> CutDecisionOp {
        let cut = CutSpec {
            epoch: 1,
            heads: (0..heads).map(|i| [i as u8; 32]).collect(),
            departed_before_ms: 1,
            base: [9; 32],
        };
        let endorsements = endorsers
            .iter()
            .map(|i| request(*i, 1, cut.endorsement_op()))
            .collect();
        CutDecisionOp { cut, endorsements }
    }

    #[test]
    fn cut_certificates_verify_with_f_plus_one_endorsements_and_fit_at_n31() {
        let c = committee(4);
        let v = CommitteeVerifier::new(Some(c.clone()));
        let op = cut_op(&[0, 2], 3);
        let cert = compact_certificate_for(
            &commit(&c, 7, vec![request(1, 1, op.encode())], None),
            &c,
            0,
        )
        .unwrap();
        let (got, seq) = v.verify_cut(&cert).unwrap();
        assert_eq!((got, seq), (op.clone(), 7 * SEQ_STRIDE));
        // A cut certificate is not a VM or quarantine certificate, and vice versa.
        assert_eq!(v.verify_vm(&cert).unwrap_err(), CertError::WrongKind);
        let q = certificate_for(
            &commit(
                &c,
                5,
                vec![request(2, 2, quarantine_op(4, 3, 8).encode())],
                None,
            ),
            0,
            0,
        )
        .unwrap();
        assert_eq!(v.verify_cut(&q).unwrap_err(), CertError::WrongKind);
        // Ordered but without valid grounds: refused by every verifier.
        for (what, bad) in [
            ("one endorsement", cut_op(&[0], 3)),
            ("a non-member", cut_op(&[0, 9], 3)),
            ("twice one member", cut_op(&[1, 1], 3)),
            ("no heads", cut_op(&[0, 1], 0)),
            ("65 heads", cut_op(&[0, 1], 65)),
            ("another cut", {
                let mut o = cut_op(&[0, 1], 3);
                o.cut.heads[0] = [0xee; 32];
                o
            }),
        ] {
            let cert = compact_certificate_for(
                &commit(&c, 7, vec![request(1, 1, bad.encode())], None),
                &c,
                0,
            )
            .unwrap();
            assert!(
                matches!(v.verify_cut(&cert), Err(CertError::InvalidDecision(_))),
                "{what}"
            );
        }
        // The largest cut (64 heads) with f+1 = 11 endorsements at n = 31 fits.
        let c31 = committee(31);
        let op = cut_op(&(0..11).collect::<Vec<_>>(), MAX_CUT_HEADS);
        let cert = compact_certificate_for(
            &commit(&c31, 7, vec![request(1, 1, op.encode())], None),
            &c31,
            0,
        )
        .unwrap();
        println!("n=31 cut with 64 heads: certificate {} bytes", cert.len());
        assert!(cert.len() <= MAX_CERTIFICATE_BYTES);
        CommitteeVerifier::new(Some(c31)).verify_cut(&cert).unwrap();
    }

    #[test]
    fn a_valid_vm_certificate_is_accepted() {
        let c = committee(4);
        let op = VmDecisionOp {
            vm: VmId::from_bytes([9; 16]),
            vcpus: 2,
            memory_mib: 512,
            disk_gib: 4,
            host: Some(key(2).node_id()),
            state: "placed".into(),
        };
        let cert =
            certificate_for(&commit(&c, 3, vec![request(1, 1, op.encode())], None), 0, 0).unwrap();
        let v = CommitteeVerifier::new(Some(c));
        let d = v.verify_vm(&cert).unwrap();
        assert_eq!(d.vm, op.vm);
        assert_eq!(d.decision_seq, 3 * SEQ_STRIDE);
        assert_eq!(d.host, op.host);
        assert_eq!(d.state, VmState::Placed);
        assert_eq!(d.spec.memory_mib, 512);
        assert_eq!(
            v.verify_quarantine(&cert).unwrap_err(),
            CertError::WrongKind
        );
    }

    #[test]
    fn a_compact_vm_certificate_says_the_same_and_a_flipped_bit_breaks_it() {
        let c = committee(7);
        let op = VmDecisionOp {
            vm: VmId::from_bytes([7; 16]),
            vcpus: 1,
            memory_mib: 128,
            disk_gib: 0,
            host: Some(key(3).node_id()),
            state: "placed".into(),
        };
        let commit = commit(&c, 4, vec![request(1, 1, op.encode())], None);
        let full = certificate_for(&commit, 0, 0).unwrap();
        let compact = compact_certificate_for(&commit, &c, 0).unwrap();
        assert_eq!(compact[0], CERT_VERSION_COMPACT);
        assert!(
            compact.len() * 10 < full.len() * 7,
            "{} vs {}",
            compact.len(),
            full.len()
        );
        let v = CommitteeVerifier::new(Some(c));
        assert_eq!(v.verify_vm(&compact).unwrap(), v.verify_vm(&full).unwrap());
        // Every single-bit flip in the compact form is refused (or, in padding-free CBOR,
        // changes nothing the verifier accepts as the same decision).
        let good = v.verify_vm(&compact).unwrap();
        for i in 0..compact.len() {
            let mut bad = compact.clone();
            bad[i] ^= 0x01;
            if let Ok(d) = v.verify_vm(&bad) {
                panic!("byte {i}: a flipped bit still verifies as {d:?} (good: {good:?})");
            }
        }
        let mut unknown = compact.clone();
        unknown[0] = 9;
        assert!(matches!(
            v.verify_vm(&unknown),
            Err(CertError::Malformed(_))
        ));
    }

    #[test]
    fn bad_certificates_are_refused_with_the_matching_error() {
        let c = committee(4);
        let v = CommitteeVerifier::new(Some(c.clone()));
        let op = quarantine_op(4, 3, 8);
        let batch = vec![request(1, 1, op.encode()), request(2, 2, vec![0xA0])];
        let good = commit(&c, 5, batch.clone(), None);
        assert!(
            v.verify_quarantine(&certificate_for(&good, 0, 0).unwrap())
                .is_ok()
        );

        // Too few signatures: 2 commits where the quorum is 3.
        let few = commit(&c, 5, batch.clone(), Some(vec![0, 1]));
        assert_eq!(
            v.verify_quarantine(&certificate_for(&few, 0, 0).unwrap()),
            Err(CertError::NoQuorum)
        );
        // Forged: a commit signed by a non-member key in place of a member's.
        let forged = commit(&c, 5, batch.clone(), Some(vec![0, 1, 9]));
        assert_eq!(
            v.verify_quarantine(&certificate_for(&forged, 0, 0).unwrap()),
            Err(CertError::NoQuorum)
        );
        // Forged: a member's commit whose signature bytes were altered.
        let mut tampered = certificate_for(&good, 0, 0).unwrap();
        let n = tampered.len();
        tampered[n - 5] ^= 1;
        assert!(v.verify_quarantine(&tampered).is_err());
        // Wrong committee: the same certificate checked by a verifier of another committee,
        // and a certificate naming an epoch nobody configured.
        let other = CommitteeVerifier::new(Some(
            Committee::new(0, (10..14).map(|i| key(i).node_id()).collect()).unwrap(),
        ));
        assert_eq!(
            other.verify_quarantine(&certificate_for(&good, 0, 0).unwrap()),
            Err(CertError::NoQuorum)
        );
        assert_eq!(
            v.verify_quarantine(&certificate_for(&good, 3, 0).unwrap()),
            Err(CertError::UnknownCommittee(3))
        );
        assert_eq!(
            CommitteeVerifier::new(None).verify_quarantine(&certificate_for(&good, 0, 0).unwrap()),
            Err(CertError::UnknownCommittee(0))
        );
        // Wrong operation: index 1 is a probe, not a decision.
        assert_eq!(
            v.verify_quarantine(&certificate_for(&good, 0, 1).unwrap()),
            Err(CertError::WrongKind)
        );
        // An operation that was not in the batch, spliced into a valid proof.
        let mut w: WireCertificate =
            ciborium::from_reader(&certificate_for(&good, 0, 0).unwrap()[1..]).unwrap();
        w.proof.request = request(1, 99, quarantine_op(4, 2, 8).encode());
        let mut spliced = vec![CERT_VERSION];
        ciborium::into_writer(&w, &mut spliced).unwrap();
        assert_eq!(v.verify_quarantine(&spliced), Err(CertError::NotInBatch));
        // Malformed bytes, an unknown version, trailing bytes.
        assert!(matches!(
            v.verify_quarantine(&[CERT_VERSION, 0xff, 0x00]),
            Err(CertError::Malformed(_))
        ));
        assert!(matches!(
            v.verify_quarantine(&[7, 1, 2]),
            Err(CertError::Malformed(_))
        ));
        let mut trailing = certificate_for(&good, 0, 0).unwrap();
        trailing.push(0);
        assert!(matches!(
            v.verify_quarantine(&trailing),
            Err(CertError::Malformed(_))
        ));
        // Oversized.
        let big = vec![CERT_VERSION; MAX_CERTIFICATE_BYTES + 1];
        assert_eq!(
            v.verify_quarantine(&big),
            Err(CertError::TooLong(MAX_CERTIFICATE_BYTES + 1))
        );
    }

    #[test]
    fn a_committed_decision_without_valid_grounds_is_refused() {
        let c = committee(4);
        let v = CommitteeVerifier::new(Some(c.clone()));
        let victim = key(3).node_id();
        let cases = [
            // One vote where f+1 = 2 are needed.
            Grounds::Votes(vec![vote(0, victim, "x")]),
            // Two votes from the same member.
            Grounds::Votes(vec![vote(0, victim, "x"), vote(0, victim, "y")]),
            // A vote from a non-member.
            Grounds::Votes(vec![vote(0, victim, "x"), vote(9, victim, "y")]),
            // A vote against another node.
            Grounds::Votes(vec![vote(0, victim, "x"), vote(1, key(2).node_id(), "y")]),
            // Not an equivocation: the same vote twice.
            Grounds::Equivocation {
                first: vote(0, victim, "x"),
                second: vote(0, victim, "x"),
            },
        ];
        for g in cases {
            let op = QuarantineDecisionOp {
                node: victim,
                reason: "r".into(),
                grounds: g.clone(),
            };
            let cert =
                certificate_for(&commit(&c, 2, vec![request(1, 1, op.encode())], None), 0, 0)
                    .unwrap();
            assert!(
                matches!(
                    v.verify_quarantine(&cert),
                    Err(CertError::InvalidDecision(_))
                ),
                "{g:?} was accepted"
            );
        }
    }

    #[test]
    fn equivocation_grounds_are_checked() {
        let c = committee(4);
        let v = CommitteeVerifier::new(Some(c.clone()));
        let slot = |d: u8| Slot {
            view: 0,
            seq: 4,
            digest: Digest([d; 32]),
        };
        let sign = |i: usize, d: u8| {
            Verified::sign(&key(i), ConsensusMsg::Commit(slot(d)))
                .unwrap()
                .envelope()
                .clone()
        };
        let op = |node: NodeId| QuarantineDecisionOp {
            node,
            reason: "equivocation".into(),
            grounds: Grounds::Equivocation {
                first: sign(3, 1),
                second: sign(3, 2),
            },
        };
        let cert = |o: &QuarantineDecisionOp| {
            certificate_for(&commit(&c, 2, vec![request(1, 1, o.encode())], None), 0, 0).unwrap()
        };
        assert!(v.verify_quarantine(&cert(&op(key(3).node_id()))).is_ok());
        // The same evidence cannot quarantine someone else.
        assert!(matches!(
            v.verify_quarantine(&cert(&op(key(2).node_id()))),
            Err(CertError::InvalidDecision(_))
        ));
    }

    /// Certificate sizes for committees n = 3f+1 up to 31, with the largest quarantine
    /// decision the replicas accept (f+1 votes with reasons of the maximum 256 bytes) in a
    /// batch of 512 requests (the longest Merkle path). Printed with `--nocapture`.
    #[test]
    fn certificates_fit_the_document_limit_for_committees_up_to_31() {
        for n in [4usize, 7, 10, 16, 31] {
            let c = committee(n);
            let op = quarantine_op(n, n - 1, crate::consensus::MAX_REASON_LEN);
            let mut batch: Vec<SignedEnvelope> =
                (0..511).map(|i| request(1, i, vec![0xA0; 9])).collect();
            batch.push(request(2, 1, op.encode()));
            let cert = certificate_for(&commit(&c, 9, batch, None), 0, 511).unwrap();
            let small = certificate_for(
                &commit(&c, 9, vec![request(2, 1, vec![0xA0; 9])], None),
                0,
                0,
            )
            .unwrap();
            println!(
                "n={n:2} f={:2}: quarantine certificate (f+1 votes, 256-byte reasons, batch 512) {} bytes; one small op alone {} bytes; limit {MAX_CERTIFICATE_BYTES}",
                c.f(),
                cert.len(),
                small.len()
            );
            assert!(cert.len() <= MAX_CERTIFICATE_BYTES, "n={n}: {}", cert.len());
            let compact = compact_certificate_for(
                &commit(&c, 9, vec![request(2, 1, vec![0xA0; 9])], None),
                &c,
                0,
            )
            .unwrap();
            println!("      compact: one small op alone {} bytes", compact.len());
            assert_eq!(compact[0], CERT_VERSION_COMPACT);
            assert!(compact.len() < small.len());
            let v = CommitteeVerifier::new(Some(c));
            v.verify_quarantine(&cert).unwrap();
            v.open(&compact).unwrap();
        }
    }
}
