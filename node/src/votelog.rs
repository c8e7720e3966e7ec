//! The votes this replica cast, on disk, so that it never casts a conflicting one after a
//! restart (PBFT's stable-storage requirement on a replica's log, Castro and Liskov, OSDI'99
//! section 4.2 and TOCS 2002 section 2.3.4).
//!
//! A restarted replica starts a fresh engine (view 0, sequence 0) and catches up by fetching
//! certificates. Until it has, its engine may be asked to vote again for a `(view, seq)` it
//! voted for before the restart, perhaps for another digest (an equivocating primary, or its
//! own new proposals as primary of view 0). Sending that vote would be equivocation, for which
//! the other replicas would rightly quarantine an honest node. So every outgoing message is
//! checked here first: each vote it carries (a pre-prepare, alone or inside a proposal or a
//! new-view; a prepare; a commit) is recorded as `(kind, view, seq) -> digest` and flushed to
//! sled before the message leaves; a message carrying a vote that conflicts with a recorded
//! one is not sent (to the other replicas that is a lost message, which PBFT tolerates: a
//! stuck primary is replaced by a view change). Votes below the last stable checkpoint are
//! pruned.

use dwcp_consensus::{ConsensusMsg, Digest, VoteKind, read_vote};
use dwcp_protocol::{NodeId, SignedEnvelope};

/// Why a message was held back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VoteLogError {
    /// The message carries a vote for a slot this replica voted for with another digest.
    #[error("{kind:?} for view {view} seq {seq} conflicts with the vote cast before")]
    Conflict {
        /// Kind of vote.
        kind: VoteKind,
        /// View.
        view: u64,
        /// Sequence number.
        seq: u64,
    },
    /// The vote could not be made durable.
    #[error("recording the vote failed: {0}")]
    Storage(String),
}

/// The votes this replica cast, by `(kind, view, seq)`, in a sled tree.
#[derive(Debug, Clone)]
pub struct VoteLog {
    tree: sled::Tree,
    me: NodeId,
}

fn kind_byte(k: VoteKind) -> u8 {
    match k {
        VoteKind::PrePrepare => 0,
        VoteKind::Prepare => 1,
        VoteKind::Commit => 2,
    }
}

fn key(kind: VoteKind, view: u64, seq: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = kind_byte(kind);
    k[1..9].copy_from_slice(&seq.to_be_bytes());
    k[9..17].copy_from_slice(&view.to_be_bytes());
    k
}

/// The votes by `me` that a consensus message carries: itself if it is a vote, the signed
/// pre-prepare header of a proposal, the pre-prepares of a new view.
fn votes_in(env: &SignedEnvelope, me: NodeId) -> Vec<dwcp_consensus::CastVote> {
    let mut out = Vec::new();
    if let Some(v) = read_vote(env) {
        out.push(v);
        return out;
    }
    let Ok(v) = env.clone().verify::<ConsensusMsg>() else {
        return out;
    };
    match v.message() {
        ConsensusMsg::Proposal { header, .. } => out.extend(read_vote(header)),
        ConsensusMsg::NewView(nv) => out.extend(nv.proposals.iter().filter_map(read_vote)),
        _ => {}
    }
    out.retain(|v| v.signer == me);
    out
}

impl VoteLog {
    /// The log of `me` in `tree`.
    pub fn new(tree: sled::Tree, me: NodeId) -> Self {
        Self { tree, me }
    }

    /// Votes recorded.
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// Whether no vote is recorded.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// Checks an outgoing message: records (durably) every vote of ours it carries, or refuses
    /// it if one conflicts with a recorded vote. Messages without votes pass.
    pub fn admit(&self, env: &SignedEnvelope) -> Result<(), VoteLogError> {
        let votes: Vec<_> = votes_in(env, self.me)
            .into_iter()
            .filter(|v| v.signer == self.me)
            .collect();
        if votes.is_empty() {
            return Ok(());
        }
        let storage = |e: sled::Error| VoteLogError::Storage(e.to_string());
        let mut fresh = false;
        for v in &votes {
            let k = key(v.kind, v.slot.view, v.slot.seq);
            match self.tree.get(k).map_err(storage)? {
                Some(d) if d.as_ref() != v.slot.digest.0.as_slice() => {
                    return Err(VoteLogError::Conflict {
                        kind: v.kind,
                        view: v.slot.view,
                        seq: v.slot.seq,
                    });
                }
                Some(_) => {}
                None => fresh = true,
            }
        }
        if fresh {
            for v in &votes {
                self.tree
                    .insert(key(v.kind, v.slot.view, v.slot.seq), &v.slot.digest.0[..])
                    .map_err(storage)?;
            }
            self.tree.flush().map_err(storage)?;
        }
        Ok(())
    }

    /// Forgets votes for sequence numbers at or below a stable checkpoint.
    pub fn prune(&self, stable_seq: u64) {
        for kind in [VoteKind::PrePrepare, VoteKind::Prepare, VoteKind::Commit] {
            let start = key(kind, 0, 0);
            let end = key(kind, 0, stable_seq.saturating_add(1));
            let old: Vec<_> = self
                .tree
                .range(start..end)
                .keys()
                .filter_map(Result::ok)
                .collect();
            for k in old {
                let _ = self.tree.remove(k);
            }
        }
    }

    /// The digest recorded for a vote, if any.
    pub fn recorded(&self, kind: VoteKind, view: u64, seq: u64) -> Option<Digest> {
        let d = self.tree.get(key(kind, view, seq)).ok()??;
        <[u8; 32]>::try_from(d.as_ref()).ok().map(Digest)
    }
}

#[cfg(test)]
mod tests {
    use dwcp_consensus::{PrePrepare, Slot};
    use dwcp_protocol::{NodeKey, Timestamp, Verified};

    use super::*;

    fn slot(view: u64, seq: u64, d: u8) -> Slot {
        Slot {
            view,
            seq,
            digest: Digest([d; 32]),
        }
    }

    fn signed(k: &NodeKey, m: ConsensusMsg) -> SignedEnvelope {
        Verified::sign(k, m).unwrap().envelope().clone()
    }

    fn header(k: &NodeKey, s: Slot) -> SignedEnvelope {
        signed(
            k,
            ConsensusMsg::PrePrepare(PrePrepare {
                slot: s,
                time: Timestamp(1),
            }),
        )
    }

    #[test]
    fn a_restarted_replica_never_sends_a_conflicting_vote() {
        let dir = tempfile::tempdir().unwrap();
        let k = NodeKey::from_secret_bytes([3; 32]);
        let other = NodeKey::from_secret_bytes([4; 32]);
        {
            let db = sled::open(dir.path()).unwrap();
            let log = VoteLog::new(db.open_tree("votes").unwrap(), k.node_id());
            let commit = signed(&k, ConsensusMsg::Commit(slot(0, 1, 0xd1)));
            log.admit(&commit).unwrap();
            // The same vote again passes (retransmission).
            log.admit(&commit).unwrap();
            let proposal = signed(
                &k,
                ConsensusMsg::Proposal {
                    header: header(&k, slot(0, 2, 0xaa)),
                    batch: vec![],
                },
            );
            log.admit(&proposal).unwrap();
            // Messages without votes pass and record nothing.
            log.admit(&signed(&k, ConsensusMsg::FetchViewChanges { view: 3 }))
                .unwrap();
            assert_eq!(log.len(), 2);
        }
        // After a restart (the database reopened), the votes are still known. sled's
        // flusher thread may hold the file lock a moment after the first handle is dropped
        // (it failed once with WouldBlock on the loaded machine): retry for up to 5 s.
        let t0 = std::time::Instant::now();
        let db = loop {
            match sled::open(dir.path()) {
                Ok(db) => break db,
                Err(e) if t0.elapsed() < std::time::Duration::from_secs(5) => {
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopening the database: {e}"),
            }
        };
        let log = VoteLog::new(db.open_tree("votes").unwrap(), k.node_id());
        let conflicting = signed(&k, ConsensusMsg::Commit(slot(0, 1, 0xd2)));
        assert_eq!(
            log.admit(&conflicting),
            Err(VoteLogError::Conflict {
                kind: VoteKind::Commit,
                view: 0,
                seq: 1
            })
        );
        // A new proposal for the same (view, seq) with another batch is held back too.
        let reproposal = signed(
            &k,
            ConsensusMsg::Proposal {
                header: header(&k, slot(0, 2, 0xbb)),
                batch: vec![],
            },
        );
        assert!(matches!(
            log.admit(&reproposal),
            Err(VoteLogError::Conflict { .. })
        ));
        // Another kind, another view or another seq is not a conflict.
        log.admit(&signed(
            &k,
            ConsensusMsg::Prepare {
                slot: slot(0, 1, 0xd2),
                header: header(&other, slot(0, 1, 0xd2)),
            },
        ))
        .unwrap();
        log.admit(&signed(&k, ConsensusMsg::Commit(slot(1, 1, 0xd2))))
            .unwrap();
        // Someone else's vote forwarded by us is not ours to record.
        log.admit(&signed(&other, ConsensusMsg::Commit(slot(0, 1, 0xd3))))
            .unwrap();
        assert_eq!(
            log.recorded(VoteKind::Commit, 0, 1),
            Some(Digest([0xd1; 32]))
        );
        // Pruning below a stable checkpoint forgets those slots.
        log.prune(1);
        assert_eq!(log.recorded(VoteKind::Commit, 0, 1), None);
        assert_eq!(log.recorded(VoteKind::Commit, 1, 1), None);
        assert_eq!(
            log.recorded(VoteKind::PrePrepare, 0, 2),
            Some(Digest([0xaa; 32]))
        );
        log.admit(&conflicting).unwrap();
    }
}
