//! Commit certificates: the only authority under which a node may write a VM record or a
//! quarantine entry.
//!
//! Consensus (PBFT) produces a commit certificate for every decision: the decided value plus
//! 2f+1 signed commit votes. This crate does not know the certificate format; it treats a
//! certificate as opaque bytes and asks a [`CertificateVerifier`] (implemented by
//! `dwcp-consensus`) to check it and to return the decision it certifies. A VM record is
//! accepted only if every field it writes equals that decision.

use dwcp_protocol::{NodeId, VmId};

use crate::schema::{VmSpec, VmState};

/// Longest certificate accepted inside the document, in bytes.
pub const MAX_CERTIFICATE_BYTES: usize = 16 * 1024;

/// A consensus decision about one VM: where it runs, in which state, with which spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDecision {
    /// The VM.
    pub vm: VmId,
    /// The consensus sequence number of the decision. A higher one supersedes a lower one.
    pub decision_seq: u64,
    /// What the VM needs.
    pub spec: VmSpec,
    /// The host it is placed on, if any.
    pub host: Option<NodeId>,
    /// Its lifecycle state.
    pub state: VmState,
}

/// A consensus decision to quarantine (or release) a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineDecision {
    /// The node concerned.
    pub node: NodeId,
    /// The consensus sequence number of the decision.
    pub decision_seq: u64,
    /// True to quarantine, false to release.
    pub quarantined: bool,
    /// Short reason text (bounded by [`crate::schema::MAX_TEXT_BYTES`]).
    pub reason: String,
}

/// A decision together with the certificate that proves it was committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certified<D> {
    /// The decided value.
    pub decision: D,
    /// The commit certificate (opaque to this crate).
    pub certificate: Vec<u8>,
}

/// Why a certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The certificate bytes do not parse.
    #[error("malformed certificate: {0}")]
    Malformed(String),
    /// Signatures missing, wrong, or fewer than a quorum.
    #[error("certificate does not carry a valid quorum")]
    NoQuorum,
    /// The certificate certifies another kind of decision.
    #[error("certificate is for another kind of decision")]
    WrongKind,
    /// The certificate is longer than [`MAX_CERTIFICATE_BYTES`].
    #[error("certificate of {0} bytes is too long")]
    TooLong(usize),
    /// The certificate names a committee (epoch) the verifier does not know.
    #[error("certificate is from unknown committee epoch {0}")]
    UnknownCommittee(u64),
    /// The certified operation is not in the certified batch.
    #[error("the operation is not part of the certified batch")]
    NotInBatch,
    /// The certified operation is not a valid decision (bad grounds, bad fields).
    #[error("the certified operation is not a valid decision: {0}")]
    InvalidDecision(String),
}

/// Checks commit certificates. Implemented by consensus; tests use
/// `fake::FakeCertificateVerifier` (feature `test-utils`).
///
/// Implementations must be deterministic: every honest node must reach the same verdict for
/// the same bytes, or replicas would accept different changes and never converge.
pub trait CertificateVerifier {
    /// Verifies a certificate for a VM decision and returns the certified decision.
    fn verify_vm(&self, certificate: &[u8]) -> Result<VmDecision, CertError>;
    /// Verifies a certificate for a quarantine decision and returns it.
    fn verify_quarantine(&self, certificate: &[u8]) -> Result<QuarantineDecision, CertError>;
}
