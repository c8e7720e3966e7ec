//! Verifiable state transfer: a chain of committees from genesis, each certified by the one
//! before, and a snapshot certified by the last.
//!
//! With [`Config::app_digests`](crate::Config::app_digests) every checkpoint signs
//! [`checkpoint_digest`]`(log, clients, app)`, where `app`
//! is [`app_digest`] of the application's state digest and, at an epoch's last checkpoint,
//! of the next epoch's committee. The next committee is computed from the state and the
//! pre-fold log digest ([`crate::committee::next_committee`] over [`crate::Decision::state`]),
//! so it is known before the checkpoint is signed, and 2f+1 signatures of the ending
//! committee on that checkpoint certify both the state and who comes next.
//!
//! An [`EpochLink`] carries one such certificate with the digests it covers. A node that
//! knows only the genesis committee checks links epoch by epoch ([`verify_chain`]); the last
//! link's `app_state` and `clients` are what a snapshot of the replicated state at that
//! epoch's start must hash to. A peer that lies about any part fails the check: it would
//! need 2f+1 signatures of a committee the node already trusts.

use crate::committee::Committee;
use crate::engine::{Handover, checkpoint_digest, epoch_of_view, stable_proof_digest};
use crate::messages::{ConsensusMsg, Digest};
use dwcp_protocol::SignedEnvelope;
use serde::{Deserialize, Serialize};

/// Most links one transfer carries (epochs since the node's newest known committee).
pub const MAX_LINKS: usize = 4096;

/// Why a link or chain is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// Epochs are not configured (epoch length 0): there are no links.
    #[error("epochs are off: state transfer needs an epoch length")]
    NoEpochs,
    /// The link does not end the epoch of the committee that must sign it.
    #[error("link at seq {seq} does not end epoch {epoch} (epochs of {length})")]
    WrongBoundary {
        /// The link's sequence number.
        seq: u64,
        /// The signing committee's epoch.
        epoch: u64,
        /// The epoch length.
        length: u64,
    },
    /// The next committee is not of the next epoch, or not a valid committee.
    #[error("the next committee is invalid: {0}")]
    BadCommittee(String),
    /// The proof is not 2f+1 checkpoint signatures of the ending committee on the digest.
    #[error("the checkpoint proof does not certify the link (seq {0})")]
    BadProof(u64),
    /// The chain is empty, too long, or has a gap.
    #[error("the chain is broken: {0}")]
    BrokenChain(&'static str),
    /// A snapshot does not match what the link certifies.
    #[error("{0}")]
    SnapshotMismatch(&'static str),
}

/// The epoch a consensus message belongs to, for a node that has not reached it: by view, or
/// by sequence number with epochs of `epoch_length` (None for messages that name neither).
pub fn message_epoch(m: &ConsensusMsg, epoch_length: u64) -> Option<u64> {
    let by_seq = |seq: u64| (epoch_length > 0).then(|| seq.saturating_sub(1) / epoch_length);
    match m {
        ConsensusMsg::PrePrepare(pp) => Some(epoch_of_view(pp.slot.view)),
        ConsensusMsg::Prepare { slot, .. } | ConsensusMsg::Commit(slot) => {
            Some(epoch_of_view(slot.view))
        }
        ConsensusMsg::ViewChange(vc) => Some(epoch_of_view(vc.new_view)),
        ConsensusMsg::NewView(nv) => Some(epoch_of_view(nv.view)),
        ConsensusMsg::Checkpoint { seq, .. } => by_seq(*seq),
        _ => None,
    }
}

/// The application part of a checkpoint digest: the application's own state digest, and at
/// an epoch's last checkpoint the committee of the next epoch (its epoch and members).
pub fn app_digest(state: &Digest, next: Option<&Committee>) -> Digest {
    let mut committee = Vec::new();
    if let Some(c) = next {
        committee.extend_from_slice(&c.epoch().to_be_bytes());
        for m in c.members() {
            committee.extend_from_slice(m.as_bytes());
        }
    }
    Digest::of("dwcp/v3/app-checkpoint", &[&state.0, &committee])
}

/// One epoch's hand-over, certified by the committee that ended: the committee of the next
/// epoch and the digests of what it starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochLink {
    /// The last sequence number of the epoch that ended (its last checkpoint).
    pub seq: u64,
    /// The log digest after decision `seq`, before the checkpoint fold.
    pub log: Digest,
    /// The executed-request windows after decision `seq`.
    pub clients: Digest,
    /// The application's state digest after decision `seq`.
    pub app_state: Digest,
    /// The next epoch's committee.
    pub next: Committee,
    /// 2f+1 signed checkpoint messages of the ending committee for `seq`.
    pub proof: Vec<SignedEnvelope>,
}

impl EpochLink {
    /// The checkpoint digest the link's proof must sign (and the next epoch's log starts
    /// from: [`crate::Handover::state`]).
    pub fn digest(&self) -> Digest {
        checkpoint_digest(
            &self.log,
            &self.clients,
            &app_digest(&self.app_state, Some(&self.next)),
        )
    }

    /// Checks the link against the committee of the epoch it ends and returns the next
    /// committee.
    pub fn verify(
        &self,
        ending: &Committee,
        epoch_length: u64,
    ) -> Result<Committee, TransferError> {
        if epoch_length == 0 {
            return Err(TransferError::NoEpochs);
        }
        let epoch = ending.epoch();
        if epoch
            .checked_add(1)
            .and_then(|e| e.checked_mul(epoch_length))
            != Some(self.seq)
        {
            return Err(TransferError::WrongBoundary {
                seq: self.seq,
                epoch,
                length: epoch_length,
            });
        }
        if self.next.epoch() != epoch + 1 {
            return Err(TransferError::BadCommittee(format!(
                "epoch {} follows epoch {epoch}",
                self.next.epoch()
            )));
        }
        // Re-checked through the constructor (members distinct, within the vote limit).
        let next = Committee::new(self.next.epoch(), self.next.members().to_vec())
            .map_err(|e| TransferError::BadCommittee(e.to_string()))?;
        match stable_proof_digest(ending, self.seq, &self.proof) {
            Some(d) if d == self.digest() => Ok(next),
            _ => Err(TransferError::BadProof(self.seq)),
        }
    }
}

impl EpochLink {
    /// Whether a snapshot of the epoch this link starts (the engine hand-over and the
    /// application's state digest) is what the link certifies.
    pub fn check_snapshot(
        &self,
        handover: &Handover,
        app_state: &Digest,
    ) -> Result<(), TransferError> {
        let mismatch = |why| Err(TransferError::SnapshotMismatch(why));
        if handover.seq != self.seq {
            return mismatch("the hand-over is at another sequence number");
        }
        if handover.state != self.digest() {
            return mismatch("the hand-over's log digest differs");
        }
        if handover.clients_digest() != self.clients {
            return mismatch("the hand-over's executed-request windows differ");
        }
        if *app_state != self.app_state {
            return mismatch("the replicated state's digest differs");
        }
        Ok(())
    }
}

/// Checks `links` in order from `known` (a committee the node trusts, e.g. genesis) and
/// returns the last link's next committee: the committee of the epoch the snapshot starts.
pub fn verify_chain(
    known: &Committee,
    links: &[EpochLink],
    epoch_length: u64,
) -> Result<Committee, TransferError> {
    if links.is_empty() {
        return Err(TransferError::BrokenChain("no links"));
    }
    if links.len() > MAX_LINKS {
        return Err(TransferError::BrokenChain("too many links"));
    }
    let mut committee = known.clone();
    for link in links {
        committee = link.verify(&committee, epoch_length)?;
    }
    Ok(committee)
}
