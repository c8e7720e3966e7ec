//! Consensus state transfer: a node too far behind to replay the log (a new volunteer, or
//! one that was away longer than its peers retain certificates) installs a certified
//! snapshot instead.
//!
//! Every node keeps, per ended epoch, the [`EpochLink`] that ended it: 2f+1 checkpoint
//! signatures of that epoch's committee on the log digest, the executed-request windows,
//! the replicated state's digest ([`AcpState::digest`]) and the next committee
//! (`dwcp_consensus::transfer`). With its resume point (the engine hand-over and the
//! replicated state at the start of its current epoch) that is a snapshot anyone can check
//! from a committee they already trust:
//!
//! ```text
//!  joiner                                   any peer (/dwcp/state-transfer/3.0.0)
//!  TransferRequest { known_epoch } ------->  links known_epoch .. E-1, hand-over, state at E
//!  verify_chain(known committee, links)  <--  TransferReply::Snapshot
//!  state.digest() == last link's app_state, hand-over == last link's digests
//!  -> start epoch E's engine there, fetch the decisions after it
//! ```
//!
//! The reply is not signed: a peer that lies fails the checks (it would need 2f+1
//! signatures of a committee the joiner trusts), and the joiner asks another peer later.
//!
//! A chain too long for one reply (more than `acp.epochs.transfer_page_links` links, or more
//! than fits in a frame with the snapshot) comes in pages: the peer answers
//! [`TransferReply::Links`] with the first links only, the joiner verifies them, trusts the
//! committee the last one names and asks again from there. A page never reaches the
//! snapshot's epoch, so the last request always gets the snapshot itself. Without pages a
//! cluster that had run more epochs than one frame of links holds could take no new node.

use dwcp_consensus::{
    Committee, Handover,
    transfer::{EpochLink, MAX_LINKS, TransferError, verify_chain},
};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::consensus::{AcpState, ResumePoint};

/// What a node asks a peer for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferRequest {
    /// The newest epoch whose committee the asking node trusts (links start there).
    pub known_epoch: u64,
}

/// A peer's answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum TransferReply {
    /// A snapshot at the start of an epoch, with the links from the asked epoch to it.
    Snapshot {
        /// Links ending epochs `known_epoch ..` up to the snapshot's epoch, in order.
        links: Vec<EpochLink>,
        /// The engine hand-over at the snapshot's epoch start.
        handover: Handover,
        /// The replicated state there.
        state: Box<AcpState>,
    },
    /// A page of the chain, for an asker further behind than one reply carries: links
    /// ending epochs `known_epoch ..`, in order, never up to the snapshot's epoch. The asker
    /// verifies them and asks again from the committee the last one names.
    Links {
        /// The links.
        links: Vec<EpochLink>,
    },
    /// The peer cannot serve (why).
    Refused(String),
    /// The peer's snapshot is not newer than the epoch asked from: the asker is not behind.
    NotBehind {
        /// The peer's snapshot epoch.
        epoch: u64,
    },
}

/// A verified reply.
#[derive(Debug)]
pub enum Checked {
    /// A snapshot, ready to install.
    Snapshot(Box<Verified>),
    /// A page of the chain: the committee its last link names is now trusted, and the
    /// asker asks again from that committee's epoch.
    Page {
        /// The committee the last link names.
        committee: Committee,
        /// The links checked, to keep (and serve) in turn.
        links: Vec<EpochLink>,
    },
}

/// A verified snapshot, ready to install.
#[derive(Debug)]
pub struct Verified {
    /// The committee of the epoch the snapshot starts (checked through the chain).
    pub committee: Committee,
    /// The engine hand-over (its log digest and windows match the last link).
    pub handover: Handover,
    /// The replicated state (its digest matches the last link).
    pub state: AcpState,
    /// The links checked, to keep (and serve) in turn.
    pub links: Vec<EpochLink>,
}

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferFailed {
    /// The reply does not decode.
    #[error("the reply does not decode: {0}")]
    Decode(String),
    /// The peer refused.
    #[error("the peer refused: {0}")]
    Refused(String),
    /// The peer is not ahead of the asker.
    #[error("the peer's snapshot (epoch {0}) is not newer")]
    NotBehind(u64),
    /// The chain of links does not verify.
    #[error("the chain of epoch links does not verify: {0}")]
    Chain(#[from] dwcp_consensus::transfer::TransferError),
    /// The snapshot does not match what the last link certifies.
    #[error("the snapshot does not match its certificate: {0}")]
    Mismatch(&'static str),
}

/// Checks a reply with the epoch length; `known` gives the committees the node trusts by
/// epoch (the chain must start at one of them: the node may have moved on while it waited).
pub fn verify(
    known: &dyn Fn(u64) -> Option<Committee>,
    epoch_length: u64,
    reply: &[u8],
) -> Result<Checked, TransferFailed> {
    let reply: TransferReply =
        ciborium::from_reader(reply).map_err(|e| TransferFailed::Decode(e.to_string()))?;
    let (links, handover, state) = match reply {
        TransferReply::Snapshot {
            links,
            handover,
            state,
        } => (links, handover, *state),
        TransferReply::Links { links } => {
            let committee = verify_links(known, epoch_length, &links)?;
            return Ok(Checked::Page { committee, links });
        }
        TransferReply::Refused(why) => return Err(TransferFailed::Refused(why)),
        TransferReply::NotBehind { epoch } => return Err(TransferFailed::NotBehind(epoch)),
    };
    let committee = verify_links(known, epoch_length, &links)?;
    let last = links.last().ok_or(TransferFailed::Mismatch("no links"))?;
    last.check_snapshot(&handover, &state.digest())
        .map_err(|e| match e {
            TransferError::SnapshotMismatch(why) => TransferFailed::Mismatch(why),
            other => TransferFailed::Chain(other),
        })?;
    Ok(Checked::Snapshot(Box::new(Verified {
        committee,
        handover,
        state,
        links,
    })))
}

/// Checks a chain from the committee `known` gives for its first link's epoch; returns the
/// committee the last link names.
fn verify_links(
    known: &dyn Fn(u64) -> Option<Committee>,
    epoch_length: u64,
    links: &[EpochLink],
) -> Result<Committee, TransferFailed> {
    let first = links
        .first()
        .map(|l| l.next.epoch().saturating_sub(1))
        .ok_or(TransferFailed::Mismatch("no links"))?;
    let start = known(first).ok_or(TransferFailed::Mismatch(
        "the chain starts at an epoch whose committee this node does not know",
    ))?;
    Ok(verify_chain(&start, links, epoch_length)?)
}

/// Where a node keeps its epoch links (one per ended epoch, keyed by that epoch) and its
/// resume point, and serves transfers from them.
#[derive(Debug, Clone)]
pub struct TransferStore {
    links: sled::Tree,
    resume: sled::Tree,
    page_links: usize,
}

/// Room a reply keeps, beyond its links and snapshot, for its own encoding.
const REPLY_SLACK: usize = 64 * 1024;

impl TransferStore {
    /// Over the `links` and `resume` trees; a reply carries at most `page_links` links
    /// (clamped to 1 ..= [`MAX_LINKS`]).
    pub fn new(links: sled::Tree, resume: sled::Tree, page_links: usize) -> Self {
        Self {
            links,
            resume,
            page_links: page_links.clamp(1, MAX_LINKS),
        }
    }

    /// Keeps the link ending epoch `ended` (replacing one kept before); a failure is logged.
    pub fn store_link(&self, ended: u64, link: &EpochLink) {
        let mut bytes = Vec::new();
        let r = ciborium::into_writer(link, &mut bytes)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                self.links
                    .insert(ended.to_be_bytes(), bytes)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = r {
            warn!(error = %e, ended, "could not store an epoch link");
        }
    }

    /// The link ending epoch `ended`, if kept and decodable.
    pub fn link(&self, ended: u64) -> Option<EpochLink> {
        let bytes = self.links.get(ended.to_be_bytes()).ok().flatten()?;
        ciborium::from_reader(bytes.as_ref()).ok()
    }

    /// Epoch links kept.
    pub fn links_kept(&self) -> usize {
        self.links.len()
    }

    /// The reply to `request` (encoded): the resume point's snapshot with the links from the
    /// asked epoch, a page of those links when they are too many for one reply, or why not.
    /// Never larger than `max_bytes`.
    pub fn serve(&self, request: &[u8], max_bytes: usize) -> Vec<u8> {
        let reply = match self.snapshot(request, max_bytes) {
            Ok(r) => r,
            Err(why) => TransferReply::Refused(why),
        };
        let mut bytes = Vec::new();
        if ciborium::into_writer(&reply, &mut bytes).is_err() || bytes.len() > max_bytes {
            bytes.clear();
            let why = TransferReply::Refused("the snapshot is too large to send".into());
            if ciborium::into_writer(&why, &mut bytes).is_err() {
                bytes.clear();
            }
        }
        bytes
    }

    fn snapshot(&self, request: &[u8], max_bytes: usize) -> Result<TransferReply, String> {
        let req: TransferRequest =
            ciborium::from_reader(request).map_err(|e| format!("bad request: {e}"))?;
        let point = ResumePoint::load(&self.resume).ok_or("no snapshot kept (epochs off?)")?;
        let epoch = point.committee.epoch();
        if req.known_epoch >= epoch {
            return Ok(TransferReply::NotBehind { epoch });
        }
        let mut snapshot_bytes = Vec::new();
        ciborium::into_writer(&(&point.handover, &point.state), &mut snapshot_bytes)
            .map_err(|e| format!("cannot encode the snapshot: {e}"))?;
        let budget = max_bytes.saturating_sub(REPLY_SLACK);
        // The links from the asked epoch while they fit (one page), then the snapshot if
        // every link up to it fit too.
        let mut links = Vec::new();
        let mut used = 0usize;
        for e in req.known_epoch..epoch {
            if links.len() == self.page_links {
                break;
            }
            let link = self
                .link(e)
                .ok_or(format!("the link ending epoch {e} is not kept"))?;
            let mut bytes = Vec::new();
            ciborium::into_writer(&link, &mut bytes).map_err(|e| e.to_string())?;
            if used + bytes.len() > budget {
                break;
            }
            used += bytes.len();
            links.push(link);
        }
        let all = links.len() as u64 == epoch - req.known_epoch;
        if all && used + snapshot_bytes.len() <= budget {
            return Ok(TransferReply::Snapshot {
                links,
                handover: point.handover,
                state: Box::new(point.state),
            });
        }
        // A page stops short of the snapshot's epoch: the last request gets the snapshot.
        if all {
            links.pop();
        }
        if links.is_empty() {
            return Err("the snapshot is too large to send".into());
        }
        Ok(TransferReply::Links { links })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use dwcp_consensus::{
        Command, Config, Engine, Input, Request,
        committee::{MembershipOp, next_committee},
        transfer::app_digest,
    };
    use dwcp_protocol::{NodeKey, Timestamp};

    /// A one-member cluster (quorum 1) run through `n` epochs of 2 decisions: the links
    /// ending them and the resume point of epoch `n`, as a node stores them.
    fn epochs(n: u64) -> (Committee, Vec<EpochLink>, ResumePoint) {
        let key = NodeKey::from_secret_bytes([7; 32]);
        let genesis = Committee::new(0, vec![key.node_id()]).unwrap();
        let cfg = Config {
            checkpoint_interval: 2,
            log_window: 4,
            app_digests: true,
            ..Config::default()
        };
        let mut e = Engine::new(cfg.clone(), key.clone(), genesis.clone()).unwrap();
        e.set_end(2).unwrap();
        let mut committee = genesis.clone();
        let mut state = AcpState::new();
        let rules = dwcp_consensus::committee::EpochRules {
            epoch_length: 2,
            size: 1,
            eligibility: Default::default(),
        };
        let mut links = Vec::new();
        let mut last = None;
        let mut nonce = 0u64;
        for epoch in 0..n {
            let mut link = None;
            for _ in 0..2 {
                nonce += 1;
                let op = MembershipOp::Join(key.node_id()).encode();
                let r = dwcp_protocol::Verified::sign(&key, Request { nonce, op }).unwrap();
                e.handle(Timestamp(nonce), Input::Request(r));
                while let Some(c) = e.poll_command() {
                    let Command::Deliver(d) = c else { continue };
                    for r in &d.requests {
                        state.apply(d.time, d.seq, &committee, r.signer(), &r.op);
                    }
                    if e.awaiting_app_state() == Some(d.seq) {
                        let reputation = |n: &dwcp_protocol::NodeId| (state.score(n), false);
                        let next = next_committee(
                            &committee,
                            d.seq,
                            &d.state,
                            d.time,
                            state.membership(),
                            &reputation,
                            &rules,
                        );
                        let s = state.digest();
                        assert!(e.on_app_state(d.seq, app_digest(&s, Some(&next))));
                        link = Some(EpochLink {
                            seq: d.seq,
                            log: d.state,
                            clients: e.clients_digest(),
                            app_state: s,
                            next,
                            proof: Vec::new(),
                        });
                    }
                }
            }
            let mut link = link.unwrap();
            let (seq, _, proof) = e.stable_checkpoint();
            assert_eq!(seq, 2 * (epoch + 1));
            link.proof = proof.to_vec();
            let handover = e.handover().unwrap();
            committee = link.next.clone();
            links.push(link);
            e = Engine::resume(
                cfg.clone(),
                key.clone(),
                committee.clone(),
                handover.clone(),
            )
            .unwrap();
            e.set_end(2 * (epoch + 2)).unwrap();
            last = Some(handover);
        }
        let point = ResumePoint {
            genesis: genesis.members().to_vec(),
            committee: committee.clone(),
            end: 2 * (n + 1),
            handover: last.unwrap(),
            state,
        };
        (genesis, links, point)
    }

    fn epoch_one() -> (Committee, EpochLink, ResumePoint) {
        let (genesis, mut links, point) = epochs(1);
        (genesis, links.remove(0), point)
    }

    fn snapshot(c: Checked) -> Verified {
        match c {
            Checked::Snapshot(v) => *v,
            Checked::Page { committee, .. } => panic!("a page up to epoch {}", committee.epoch()),
        }
    }

    /// Trusts `c` only.
    fn only(c: &Committee) -> impl Fn(u64) -> Option<Committee> + '_ {
        move |e| (e == c.epoch()).then(|| c.clone())
    }

    fn store() -> (sled::Db, TransferStore) {
        store_paged(MAX_LINKS)
    }

    fn store_paged(page_links: usize) -> (sled::Db, TransferStore) {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let t = TransferStore::new(
            db.open_tree("consensus_links").unwrap(),
            db.open_tree("consensus_resume").unwrap(),
            page_links,
        );
        (db, t)
    }

    fn request(known_epoch: u64) -> Vec<u8> {
        let mut b = Vec::new();
        ciborium::into_writer(&TransferRequest { known_epoch }, &mut b).unwrap();
        b
    }

    fn encode(r: &TransferReply) -> Vec<u8> {
        let mut b = Vec::new();
        ciborium::into_writer(r, &mut b).unwrap();
        b
    }

    #[test]
    fn a_served_snapshot_verifies_from_genesis_and_every_lie_is_refused() {
        let (genesis, link, point) = epoch_one();
        let (_db, t) = store();
        // Nothing kept yet: refused, with the reason.
        let no = verify(&only(&genesis), 2, &t.serve(&request(0), 1 << 20)).unwrap_err();
        assert!(matches!(no, TransferFailed::Refused(_)), "{no}");
        point.store(&t.resume);
        let missing = verify(&only(&genesis), 2, &t.serve(&request(0), 1 << 20)).unwrap_err();
        assert!(
            missing.to_string().contains("link ending epoch 0"),
            "{missing}"
        );
        t.store_link(0, &link);
        assert_eq!(t.links_kept(), 1);

        let v = snapshot(verify(&only(&genesis), 2, &t.serve(&request(0), 1 << 20)).unwrap());
        assert_eq!(v.committee, point.committee);
        assert_eq!(v.handover.seq, 2);
        assert_eq!(v.state.digest(), point.state.digest());
        assert_eq!(v.state.membership().len(), 1);

        // A node already at epoch 1 is not behind; a reply too large is refused.
        assert!(matches!(
            verify(&only(&genesis), 2, &t.serve(&request(1), 1 << 20)),
            Err(TransferFailed::NotBehind(1))
        ));
        assert!(
            verify(&only(&genesis), 2, &t.serve(&request(0), REPLY_SLACK + 64))
                .unwrap_err()
                .to_string()
                .contains("too large")
        );
        assert!(matches!(
            verify(&only(&genesis), 2, b"garbage"),
            Err(TransferFailed::Decode(_))
        ));
        assert!(matches!(
            verify(&only(&genesis), 2, &t.serve(b"garbage", 1 << 20)),
            Err(TransferFailed::Refused(_))
        ));

        // Another replicated state than the certified one.
        let mut other = point.state.clone();
        other.apply(
            Timestamp(9),
            3,
            &genesis,
            genesis.members()[0],
            &MembershipOp::Leave(genesis.members()[0]).encode(),
        );
        let lie = encode(&TransferReply::Snapshot {
            links: vec![link.clone()],
            handover: point.handover.clone(),
            state: Box::new(other),
        });
        assert!(matches!(
            verify(&only(&genesis), 2, &lie),
            Err(TransferFailed::Mismatch(_))
        ));
        // A link altered to name another committee: its proof no longer verifies.
        let mut forged = link.clone();
        forged.next =
            Committee::new(1, vec![NodeKey::from_secret_bytes([8; 32]).node_id()]).unwrap();
        let lie = encode(&TransferReply::Snapshot {
            links: vec![forged],
            handover: point.handover.clone(),
            state: Box::new(point.state.clone()),
        });
        assert!(matches!(
            verify(&only(&genesis), 2, &lie),
            Err(TransferFailed::Chain(_))
        ));
        // Checked from a committee that did not sign it.
        let stranger =
            Committee::new(0, vec![NodeKey::from_secret_bytes([9; 32]).node_id()]).unwrap();
        assert!(matches!(
            verify(&only(&stranger), 2, &t.serve(&request(0), 1 << 20)),
            Err(TransferFailed::Chain(_))
        ));
    }

    /// Follows a peer's pages from genesis as the driver does: trusts each page's last
    /// committee and asks again from there. Returns the pages and the snapshot.
    fn walk(t: &TransferStore, genesis: &Committee, max_bytes: usize) -> (usize, Verified) {
        let mut trusted = std::collections::BTreeMap::from([(0u64, genesis.clone())]);
        let mut pages = 0;
        loop {
            let known = *trusted.keys().last().unwrap();
            let reply = t.serve(&request(known), max_bytes);
            assert!(reply.len() <= max_bytes, "{} > {max_bytes}", reply.len());
            let lookup = |e: u64| trusted.get(&e).cloned();
            match verify(&lookup, 2, &reply).unwrap() {
                Checked::Snapshot(v) => return (pages, *v),
                Checked::Page { committee, links } => {
                    assert!(!links.is_empty());
                    assert!(committee.epoch() > known, "a page moves the asker on");
                    trusted.insert(committee.epoch(), committee);
                    pages += 1;
                    assert!(pages < 10, "pages do not end");
                }
            }
        }
    }

    #[test]
    fn a_chain_longer_than_a_page_comes_in_pages_that_each_verify() {
        let (genesis, links, point) = epochs(5);
        // At most 2 links a reply: epochs 0-1, 2-3, then the snapshot with link 4.
        let (_db, t) = store_paged(2);
        point.store(&t.resume);
        for (e, l) in links.iter().enumerate() {
            t.store_link(e as u64, l);
        }
        let (pages, v) = walk(&t, &genesis, 1 << 20);
        assert_eq!(pages, 2);
        assert_eq!(v.committee, point.committee);
        assert_eq!(v.links.len(), 1);
        assert_eq!(v.state.digest(), point.state.digest());

        // A page is never the whole chain: with room for every link but not the snapshot,
        // the last link is kept for the reply that carries the snapshot.
        let mut one = Vec::new();
        ciborium::into_writer(&links[0], &mut one).unwrap();
        let mut snap = Vec::new();
        ciborium::into_writer(&(&point.handover, &point.state), &mut snap).unwrap();
        let (_db2, t) = store();
        point.store(&t.resume);
        for (e, l) in links.iter().enumerate() {
            t.store_link(e as u64, l);
        }
        let tight = REPLY_SLACK + 2 * one.len() + snap.len() / 2;
        let (pages, v) = walk(&t, &genesis, tight);
        assert!(pages >= 2, "{pages} pages");
        assert_eq!(v.committee, point.committee);
        // Bytes for the snapshot but no link: refused.
        let none = t.serve(&request(0), REPLY_SLACK + one.len() / 2);
        assert!(matches!(
            verify(&only(&genesis), 2, &none),
            Err(TransferFailed::Refused(why)) if why.contains("too large")
        ));
    }

    #[test]
    fn a_forged_page_is_refused_and_a_page_from_an_unknown_epoch_too() {
        let (genesis, links, _) = epochs(3);
        let mut forged = links[..2].to_vec();
        forged[1].next =
            Committee::new(2, vec![NodeKey::from_secret_bytes([8; 32]).node_id()]).unwrap();
        let lie = encode(&TransferReply::Links { links: forged });
        assert!(matches!(
            verify(&only(&genesis), 2, &lie),
            Err(TransferFailed::Chain(_))
        ));
        // A true page, but starting at epoch 1 while only genesis is trusted.
        let skip = encode(&TransferReply::Links {
            links: links[1..].to_vec(),
        });
        assert!(matches!(
            verify(&only(&genesis), 2, &skip),
            Err(TransferFailed::Mismatch(_))
        ));
        let empty = encode(&TransferReply::Links { links: Vec::new() });
        assert!(verify(&only(&genesis), 2, &empty).is_err());
        // The true page verifies and names epoch 2's committee.
        let page = encode(&TransferReply::Links {
            links: links[..2].to_vec(),
        });
        match verify(&only(&genesis), 2, &page).unwrap() {
            Checked::Page { committee, links } => {
                assert_eq!(committee.epoch(), 2);
                assert_eq!(links.len(), 2);
            }
            Checked::Snapshot(_) => panic!("a page, not a snapshot"),
        }
    }
}
