//! PBFT wire messages (Castro and Liskov, OSDI'99, section 4), each signed inside a
//! [`SignedEnvelope`] of kind [`MessageKind::Consensus`] (or [`MessageKind::ConsensusRequest`]
//! for client requests).
//!
//! The pre-prepare is split in two: the small signed header [`ConsensusMsg::PrePrepare`]
//! `<PRE-PREPARE, v, n, d, t>` and the [`ConsensusMsg::Proposal`] that carries the header with
//! the batch of requests. Prepares quote the primary's header, so two backups that were sent
//! different headers for one slot learn it from each other's prepares and hold a piece of
//! evidence (two headers signed by the same primary for the same `(v, n)`) that anyone can check.

use std::fmt;

use dwcp_protocol::{
    Message, MessageKind, NodeId, SignedEnvelope, Timestamp, ValidationError, Verified,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Most requests in one batch.
pub const MAX_BATCH: usize = 512;
/// Largest operation inside a request, in bytes.
pub const MAX_OP_LEN: usize = 32 * 1024;
/// Most signed votes in one certificate or proof (a committee of at most 256 members).
pub const MAX_VOTES: usize = 256;
/// Most prepared certificates in one view-change message (the watermark window).
pub const MAX_PREPARED: usize = 1024;
/// Most commit certificates in one catch-up reply.
pub const MAX_CERTS_PER_REPLY: usize = 64;

/// A SHA-256 digest: of a batch, or of the replicated state at a checkpoint.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Hashes `parts` under a domain tag, each part length-prefixed.
    pub fn of(domain: &str, parts: &[&[u8]]) -> Self {
        let mut h = Sha256::new();
        h.update((domain.len() as u64).to_be_bytes());
        h.update(domain.as_bytes());
        for p in parts {
            h.update((p.len() as u64).to_be_bytes());
            h.update(p);
        }
        Self(h.finalize().into())
    }

    /// The digest of a signed envelope's wire bytes.
    pub fn of_envelope(env: &SignedEnvelope) -> Self {
        Self::of("dwcp/v3/envelope", &[&env.encode()])
    }

    /// The digest of a batch of signed requests: the hash of their envelopes' wire bytes in
    /// order. The empty batch is PBFT's null request.
    pub fn of_batch(batch: &[SignedEnvelope]) -> Self {
        let encoded: Vec<Vec<u8>> = batch.iter().map(SignedEnvelope::encode).collect();
        let parts: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
        Self::of("dwcp/v3/pbft-batch", &parts)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", hex::encode(&self.0[..4]))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Digest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("32 bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Digest, E> {
                let a: [u8; 32] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(Digest(a))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// A client request `<REQUEST, o, t, c>` (section 4.1): an opaque operation and a per-client
/// nonce (the paper's timestamp `t`). The client is the envelope's signer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Per-client number; a request executes at most once per `(client, nonce)`.
    pub nonce: u64,
    /// The operation, interpreted by the replicated state machine.
    #[serde(with = "serde_bytes_vec")]
    pub op: Vec<u8>,
}

impl Message for Request {
    const KIND: MessageKind = MessageKind::ConsensusRequest;

    fn validate(&self) -> Result<(), ValidationError> {
        if self.op.len() > MAX_OP_LEN {
            return Err(ValidationError::TooLong {
                field: "op",
                len: self.op.len(),
                max: MAX_OP_LEN,
            });
        }
        Ok(())
    }
}

/// A vote on a slot: the body of prepares and commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Slot {
    /// View number `v`.
    pub view: u64,
    /// Sequence number `n`.
    pub seq: u64,
    /// Batch digest `d`.
    pub digest: Digest,
}

/// The pre-prepare header `<PRE-PREPARE, v, n, d>` plus the primary's timestamp for the batch
/// (section 4.6: non-determinism is resolved by the primary and checked by backups).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrePrepare {
    /// The slot.
    pub slot: Slot,
    /// Time the primary assigns to the batch; committed with it.
    pub time: Timestamp,
}

/// A prepared certificate (section 4.4, the paper's `P_m`): a pre-prepare and 2f matching
/// prepares from distinct backups, with the batch so a new primary can propose it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedProof {
    /// The primary's signed [`ConsensusMsg::PrePrepare`].
    pub pre_prepare: SignedEnvelope,
    /// The batch whose digest the header names.
    pub batch: Vec<SignedEnvelope>,
    /// 2f signed [`ConsensusMsg::Prepare`] from distinct backups.
    pub prepares: Vec<SignedEnvelope>,
}

/// A commit certificate: 2f+1 signed commits for one `(v, n, d)`, with the pre-prepare header
/// and the batch. Anyone who knows the committee can check it with
/// [`crate::CommitCertificate::verify`]; replicas outside the committee learn decisions this way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitCertificate {
    /// The primary's signed header (fixes the time).
    pub pre_prepare: SignedEnvelope,
    /// The batch.
    pub batch: Vec<SignedEnvelope>,
    /// 2f+1 signed [`ConsensusMsg::Commit`] from distinct members.
    pub commits: Vec<SignedEnvelope>,
}

/// `<VIEW-CHANGE, v+1, n, C, P, i>` (section 4.4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewChange {
    /// The view being moved to.
    pub new_view: u64,
    /// `n`: sequence number of the sender's last stable checkpoint.
    pub stable_seq: u64,
    /// `C`: 2f+1 signed checkpoint messages proving it (empty for the genesis checkpoint 0).
    pub stable_proof: Vec<SignedEnvelope>,
    /// `P`: a prepared certificate for every slot above `n` prepared at the sender.
    pub prepared: Vec<PreparedProof>,
}

/// `<NEW-VIEW, v+1, V, O>` (section 4.4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewView {
    /// The new view.
    pub view: u64,
    /// `V`: the 2f+1 view-change messages for `view`, by signer and digest of the signed
    /// envelope ([`Digest::of_envelope`]). Replicas hold the view changes themselves (every
    /// replica multicasts its own) and fetch missing ones from the new primary, so a new view
    /// stays small however large the view changes are.
    pub view_changes: Vec<(NodeId, Digest)>,
    /// `O`: the new primary's pre-prepares (signed headers) with their batches, one per slot
    /// from min-s+1 to max-s.
    pub proposals: Vec<(SignedEnvelope, Vec<SignedEnvelope>)>,
}

/// Every consensus message. Signed as [`MessageKind::Consensus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsensusMsg {
    /// The signed pre-prepare header; travels inside proposals, prepares and proofs.
    PrePrepare(PrePrepare),
    /// The primary's proposal: its signed header and the batch.
    Proposal {
        /// A signed [`ConsensusMsg::PrePrepare`].
        header: SignedEnvelope,
        /// Signed [`Request`]s whose digest is the header's.
        batch: Vec<SignedEnvelope>,
    },
    /// `<PREPARE, v, n, d, i>`, quoting the primary's header it prepares.
    Prepare {
        /// The slot voted for.
        slot: Slot,
        /// The primary's signed header for the slot.
        header: SignedEnvelope,
    },
    /// `<COMMIT, v, n, d, i>`.
    Commit(Slot),
    /// `<CHECKPOINT, n, d, i>` (section 4.3).
    Checkpoint {
        /// Sequence number.
        seq: u64,
        /// Digest of the state after executing `seq`.
        state: Digest,
    },
    /// View change (section 4.4).
    ViewChange(ViewChange),
    /// New view (section 4.4).
    NewView(NewView),
    /// Asks the primary of `view` for the view-change messages its new view names.
    FetchViewChanges {
        /// The view.
        view: u64,
    },
    /// Catch-up: asks for commit certificates from `from_seq` on.
    Fetch {
        /// First sequence number wanted.
        from_seq: u64,
    },
    /// Catch-up reply: commit certificates in sequence order.
    Decided(Vec<CommitCertificate>),
}

impl ConsensusMsg {
    /// A short name for logs and traces.
    pub fn name(&self) -> &'static str {
        match self {
            Self::PrePrepare(_) => "pre-prepare",
            Self::Proposal { .. } => "proposal",
            Self::Prepare { .. } => "prepare",
            Self::Commit(_) => "commit",
            Self::Checkpoint { .. } => "checkpoint",
            Self::ViewChange(_) => "view-change",
            Self::NewView(_) => "new-view",
            Self::Fetch { .. } => "fetch",
            Self::FetchViewChanges { .. } => "fetch-view-changes",
            Self::Decided(_) => "decided",
        }
    }
}

fn count(field: &'static str, len: usize, max: usize) -> Result<(), ValidationError> {
    if len > max {
        return Err(ValidationError::TooMany { field, len, max });
    }
    Ok(())
}

impl Message for ConsensusMsg {
    const KIND: MessageKind = MessageKind::Consensus;

    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            Self::PrePrepare(_)
            | Self::Commit(_)
            | Self::Checkpoint { .. }
            | Self::Fetch { .. }
            | Self::FetchViewChanges { .. } => Ok(()),
            Self::Proposal { batch, .. } => count("batch", batch.len(), MAX_BATCH),
            Self::Prepare { .. } => Ok(()),
            Self::ViewChange(vc) => {
                count("stable_proof", vc.stable_proof.len(), MAX_VOTES)?;
                count("prepared", vc.prepared.len(), MAX_PREPARED)?;
                for p in &vc.prepared {
                    count("batch", p.batch.len(), MAX_BATCH)?;
                    count("prepares", p.prepares.len(), MAX_VOTES)?;
                }
                Ok(())
            }
            Self::NewView(nv) => {
                count("view_changes", nv.view_changes.len(), MAX_VOTES)?;
                count("proposals", nv.proposals.len(), MAX_PREPARED)?;
                for (_, b) in &nv.proposals {
                    count("batch", b.len(), MAX_BATCH)?;
                }
                Ok(())
            }
            Self::Decided(certs) => {
                count("certificates", certs.len(), MAX_CERTS_PER_REPLY)?;
                for c in certs {
                    count("batch", c.batch.len(), MAX_BATCH)?;
                    count("commits", c.commits.len(), MAX_VOTES)?;
                }
                Ok(())
            }
        }
    }
}

/// Verifies an embedded envelope as a consensus message.
pub(crate) fn open(env: &SignedEnvelope) -> Option<Verified<ConsensusMsg>> {
    env.clone().verify::<ConsensusMsg>().ok()
}

/// Verifies an embedded envelope as a pre-prepare header, returning its signer and content.
pub(crate) fn open_header(env: &SignedEnvelope) -> Option<(NodeId, PrePrepare)> {
    let v = open(env)?;
    match v.message() {
        ConsensusMsg::PrePrepare(pp) => Some((v.signer(), *pp)),
        _ => None,
    }
}

/// Serialises `Vec<u8>` as a CBOR byte string.
pub(crate) mod serde_bytes_vec {
    use serde::{Deserializer, Serializer, de};
    use std::fmt;

    pub(crate) fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        // `deserialize_byte_buf`: ciborium's `deserialize_bytes` refuses byte strings longer
        // than its 4 KiB scratch buffer.
        d.deserialize_byte_buf(V)
    }
}
