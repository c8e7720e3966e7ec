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
/// Largest encoded size of the certificates in one [`ViewChangeProofs`] part; with the
/// envelope around it a part stays under 160 KiB, well below the 256 KiB payload limit.
pub const MAX_PROOF_PART_BYTES: usize = 144 * 1024;
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

    /// The digest of a batch of signed requests: the root of a Merkle tree (RFC 9162 shape)
    /// over the requests' leaf hashes ([`Digest::of_request`]), bound to the batch length.
    /// The empty batch is PBFT's null request. Being a Merkle root, one request can be proven
    /// part of a committed batch with `log2(len)` hashes ([`crate::RequestProof`]) instead of
    /// the whole batch.
    pub fn of_batch(batch: &[SignedEnvelope]) -> Self {
        let leaves: Vec<Digest> = batch.iter().map(Self::of_request).collect();
        Self::of_batch_leaves(&leaves)
    }

    /// The Merkle leaf hash of one signed request (its envelope's wire bytes).
    pub fn of_request(env: &SignedEnvelope) -> Self {
        Self::of("dwcp/v3/pbft-request", &[&env.encode()])
    }

    /// [`Digest::of_batch`] from the leaf hashes.
    pub fn of_batch_leaves(leaves: &[Digest]) -> Self {
        Self::of_batch_root(leaves.len() as u64, &merkle_root(leaves))
    }

    /// The batch digest from the batch length and the Merkle root of its leaves.
    pub(crate) fn of_batch_root(len: u64, root: &Digest) -> Self {
        Self::of("dwcp/v3/pbft-batch", &[&len.to_be_bytes(), &root.0])
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

/// Interior node of the batch Merkle tree.
fn merkle_node(l: &Digest, r: &Digest) -> Digest {
    Digest::of("dwcp/v3/pbft-node", &[&l.0, &r.0])
}

/// RFC 9162 section 2.1.1 Merkle tree hash over leaf hashes (the zero digest for none): the
/// left subtree holds the largest power of two below the length.
pub(crate) fn merkle_root(leaves: &[Digest]) -> Digest {
    match leaves.len() {
        0 => Digest::default(),
        1 => leaves[0],
        n => {
            let k = split_point(n);
            merkle_node(&merkle_root(&leaves[..k]), &merkle_root(&leaves[k..]))
        }
    }
}

/// The largest power of two strictly below `n` (n >= 2).
fn split_point(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// RFC 9162 section 2.1.3.1 inclusion path of leaf `index` (sibling hashes, bottom up).
pub(crate) fn merkle_path(leaves: &[Digest], index: usize) -> Vec<Digest> {
    let n = leaves.len();
    if n <= 1 || index >= n {
        return Vec::new();
    }
    let k = split_point(n);
    if index < k {
        let mut p = merkle_path(&leaves[..k], index);
        p.push(merkle_root(&leaves[k..]));
        p
    } else {
        let mut p = merkle_path(&leaves[k..], index - k);
        p.push(merkle_root(&leaves[..k]));
        p
    }
}

/// RFC 9162 section 2.1.3.2: the root that `leaf` at `index` of a tree of `size` leaves
/// yields with `path`, or `None` if the path does not fit the position.
pub(crate) fn merkle_root_from_path(
    leaf: Digest,
    index: u64,
    size: u64,
    path: &[Digest],
) -> Option<Digest> {
    if index >= size {
        return None;
    }
    let (mut fnn, mut sn, mut r) = (index, size - 1, leaf);
    for p in path {
        if sn == 0 {
            return None;
        }
        if fnn & 1 == 1 || fnn == sn {
            r = merkle_node(p, &r);
            if fnn & 1 == 0 {
                while fnn & 1 == 0 && fnn != 0 {
                    fnn >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = merkle_node(&r, p);
        }
        fnn >>= 1;
        sn >>= 1;
    }
    (sn == 0).then_some(r)
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

/// One backup's prepare in compact form: its index in the committee and its signature. The
/// signed message is `Prepare { slot, header }` with the slot and header of the
/// [`PreparedProof`] it sits in, so the envelope is rebuilt from those and checked as usual.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoteSignature {
    /// Index of the signer in the committee's member list.
    #[serde(rename = "i")]
    pub signer: u16,
    /// The ed25519 signature of the signer's prepare envelope.
    #[serde(rename = "g", with = "serde_bytes_vec")]
    pub signature: Vec<u8>,
}

/// A prepared certificate (section 4.4, the paper's `P_m`) in compact form: the primary's
/// signed pre-prepare header and 2f prepare signatures from distinct backups, without the
/// batch (replicas that lack the batch fetch it with [`ConsensusMsg::FetchBatch`]). At n = 64
/// it is about 3 KB.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedProof {
    /// The primary's signed [`ConsensusMsg::PrePrepare`].
    pub pre_prepare: SignedEnvelope,
    /// 2f signatures of [`ConsensusMsg::Prepare`] quoting exactly `pre_prepare`.
    pub prepares: Vec<VoteSignature>,
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

/// `<VIEW-CHANGE, v+1, n, C, P, i>` (section 4.4), split so that every message stays far
/// below the 256 KiB consensus payload limit whatever the committee size: this head carries
/// `P` as the list of prepared slots `(v, n, d)`, and [`ViewChangeProofs`] messages carry the
/// prepared certificates for them, in order, each part under [`MAX_PROOF_PART_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewChange {
    /// The view being moved to.
    pub new_view: u64,
    /// `n`: sequence number of the sender's last stable checkpoint.
    pub stable_seq: u64,
    /// `C`: 2f+1 signed checkpoint messages proving it (empty for the genesis checkpoint 0).
    pub stable_proof: Vec<SignedEnvelope>,
    /// `P` as claims: the slot of every prepared certificate above `n`, by increasing sequence
    /// number.
    pub prepared: Vec<Slot>,
    /// How many [`ViewChangeProofs`] parts carry the certificates for `prepared`.
    pub proof_parts: u32,
}

/// Prepared certificates for a [`ViewChange`] head, `proofs[i]` proving `prepared[first + i]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewChangeProofs {
    /// The view being moved to.
    pub new_view: u64,
    /// [`Digest::of_envelope`] of the signed head these belong to.
    pub head: Digest,
    /// Index into the head's `prepared` of the first certificate here.
    pub first: u32,
    /// The certificates.
    pub proofs: Vec<PreparedProof>,
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
    /// `O`: the new primary's pre-prepares (signed headers), one per slot from min-s+1 to
    /// max-s. Batches are not carried: replicas use the batch they hold for the digest or fetch
    /// it ([`ConsensusMsg::FetchBatch`]); the empty batch is the null request.
    pub proposals: Vec<SignedEnvelope>,
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
    /// View change head (section 4.4).
    ViewChange(ViewChange),
    /// Prepared certificates of a view change.
    ViewChangeProofs(ViewChangeProofs),
    /// New view (section 4.4).
    NewView(NewView),
    /// Asks the primary of `view` for the view-change messages its new view names.
    FetchViewChanges {
        /// The view.
        view: u64,
    },
    /// Asks a replica for the batch with `digest` at `seq` (direct request).
    FetchBatch {
        /// Sequence number.
        seq: u64,
        /// Batch digest.
        digest: Digest,
    },
    /// Reply to [`ConsensusMsg::FetchBatch`]: a batch of signed requests.
    Batch {
        /// Sequence number.
        seq: u64,
        /// The signed requests.
        batch: Vec<SignedEnvelope>,
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
            Self::ViewChangeProofs(_) => "view-change-proofs",
            Self::FetchBatch { .. } => "fetch-batch",
            Self::Batch { .. } => "batch",
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
            | Self::FetchViewChanges { .. }
            | Self::FetchBatch { .. } => Ok(()),
            Self::Proposal { batch, .. } | Self::Batch { batch, .. } => {
                count("batch", batch.len(), MAX_BATCH)
            }
            Self::Prepare { .. } => Ok(()),
            Self::ViewChange(vc) => {
                count("stable_proof", vc.stable_proof.len(), MAX_VOTES)?;
                count("prepared", vc.prepared.len(), MAX_PREPARED)?;
                count("proof_parts", vc.proof_parts as usize, MAX_PREPARED)
            }
            Self::ViewChangeProofs(p) => {
                count("proofs", p.proofs.len(), MAX_PREPARED)?;
                for p in &p.proofs {
                    count("prepares", p.prepares.len(), MAX_VOTES)?;
                }
                Ok(())
            }
            Self::NewView(nv) => {
                count("view_changes", nv.view_changes.len(), MAX_VOTES)?;
                count("proposals", nv.proposals.len(), MAX_PREPARED)
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

/// The wire layout of a [`SignedEnvelope`] (`{k, s, p, g}`), to take an envelope apart into
/// its signed payload and signature and to put a compact vote back together. The result of
/// [`join`] goes through [`SignedEnvelope::decode`], so a layout mismatch yields `None`, never
/// a wrong envelope.
#[derive(Serialize, Deserialize)]
pub(crate) struct RawEnvelope {
    pub(crate) k: u16,
    pub(crate) s: NodeId,
    #[serde(with = "serde_bytes_vec")]
    pub(crate) p: Vec<u8>,
    #[serde(with = "serde_bytes_vec")]
    pub(crate) g: Vec<u8>,
}

/// Splits an envelope into its wire fields.
pub(crate) fn split(env: &SignedEnvelope) -> Option<RawEnvelope> {
    ciborium::from_reader(env.encode().as_slice()).ok()
}

/// Rebuilds an envelope from its wire fields (unverified).
pub(crate) fn join(raw: &RawEnvelope) -> Option<SignedEnvelope> {
    let mut bytes = Vec::new();
    ciborium::into_writer(raw, &mut bytes).ok()?;
    SignedEnvelope::decode(&bytes).ok()
}

/// The signed payload of a consensus message, as [`SignedEnvelope::sign`] produces it.
pub(crate) fn payload_of(msg: &ConsensusMsg) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    ciborium::into_writer(msg, &mut bytes).ok()?;
    Some(bytes)
}

/// Serialises `Vec<u8>` as a CBOR byte string (`#[serde(with = "...")]`; other crates' signed
/// messages use it too).
pub mod serde_bytes_vec {
    use serde::{Deserializer, Serializer, de};
    use std::fmt;

    /// Writes the bytes as one byte string.
    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }

    /// Reads one byte string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
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
