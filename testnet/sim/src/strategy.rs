//! Byzantine strategies. A Byzantine node runs the honest engine (so it knows the protocol
//! state) and the simulator rewrites what it sends, signing with the node's real key: the
//! attacks are what a node holding its own key can do.

use std::str::FromStr;

use dwcp_consensus::{ConsensusMsg, Digest, PrePrepare, Request, Slot, ViewChange};
use dwcp_protocol::{
    DonatedShare, MessageKind, NodeAnnouncement, NodeId, Resources, SignedEnvelope, Timestamp,
    Verified,
};
use dwcp_reputation::{BandwidthMeasurement, Evidence};
use rand::RngExt;
use serde::{Deserialize, Serialize};

use crate::{Event, Sim};

/// What a Byzantine node does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Strategy {
    /// As primary, sends one batch to half the replicas and another to the rest.
    Equivocate,
    /// Votes (prepare and commit) for a digest nobody proposed.
    ConflictingDigest,
    /// Never votes for anything and keeps asking for view changes.
    VoteAgainst,
    /// Sends nothing.
    Silence,
    /// Delays everything it sends by 2 to 12 s.
    Delay,
    /// Replays old messages of others to random replicas.
    Replay,
    /// Sends messages with forged signatures (claiming to be honest nodes) or corrupted bytes.
    Forge,
    /// Claims 100x the uplink it has (measured by honest nodes).
    LieCapacity,
}

impl Strategy {
    /// Every strategy.
    pub const ALL: [Strategy; 8] = [
        Self::Equivocate,
        Self::ConflictingDigest,
        Self::VoteAgainst,
        Self::Silence,
        Self::Delay,
        Self::Replay,
        Self::Forge,
        Self::LieCapacity,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Equivocate => "equivocate",
            Self::ConflictingDigest => "conflicting-digest",
            Self::VoteAgainst => "vote-against",
            Self::Silence => "silence",
            Self::Delay => "delay",
            Self::Replay => "replay",
            Self::Forge => "forge",
            Self::LieCapacity => "lie-capacity",
        }
    }

    /// Whether its offences are provable and outweigh the rewards for its correct votes, so
    /// its nodes must end up quarantined. (A capacity liar votes correctly otherwise: each lie
    /// costs 0.10 but its correct votes earn 0.01 each, so it is penalised, not quarantined.)
    pub fn provable(self) -> bool {
        matches!(self, Self::Equivocate | Self::ConflictingDigest)
    }
}

impl FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|x| x.name()).collect();
                format!("unknown strategy `{s}`; one of {}", names.join(", "))
            })
    }
}

/// The wire layout of an envelope, to build forged ones (see `dwcp_protocol::envelope`).
#[derive(Clone, Serialize, Deserialize)]
struct RawEnvelope {
    k: u16,
    s: NodeId,
    #[serde(with = "raw_bytes")]
    p: Vec<u8>,
    #[serde(with = "raw_bytes")]
    g: Vec<u8>,
}

mod raw_bytes {
    use serde::{Deserializer, Serializer, de};
    use std::fmt;

    pub(super) fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        // `deserialize_byte_buf`: ciborium's `deserialize_bytes` refuses byte strings longer
        // than 4 KiB, which left large messages unforged.
        d.deserialize_byte_buf(V)
    }
}

const TRUE_UPLINK_MBPS: u32 = 100;

impl Sim {
    fn sign_as(&self, i: usize, m: ConsensusMsg) -> Option<SignedEnvelope> {
        Verified::sign(&self.nodes[i].key, m)
            .ok()
            .map(|v| v.envelope().clone())
    }

    fn targets(&self, i: usize, to: Option<usize>) -> Vec<usize> {
        match to {
            Some(j) => vec![j],
            None => (0..self.nodes.len()).filter(|j| *j != i).collect(),
        }
    }

    /// Sends `env` from Byzantine node `i` (to `to`, or to everyone) the way its strategy says.
    pub(crate) fn byz_send(&mut self, i: usize, env: SignedEnvelope, to: Option<usize>) {
        let targets = self.targets(i, to);
        let msg = own_message(&env);
        match self.s.strategy {
            crate::Strategy::Silence => {}
            crate::Strategy::Delay => {
                let extra = self.rng.random_range(2_000..12_000);
                let bytes = self.encode(&env);
                for j in targets {
                    self.send_bytes(i, j, bytes.clone(), extra);
                }
            }
            crate::Strategy::Forge => {
                // Each receiver gets its own forgery (a claimed honest signer or a corrupted
                // signature). Receivers of the same forgery share one message, and so one
                // failed check, as they share a verified one.
                let bytes = env.encode();
                let raw = ciborium::from_reader::<RawEnvelope, _>(bytes.as_slice()).ok();
                let mut made: Vec<(Forgery, crate::Bytes)> = Vec::new();
                for j in targets {
                    let msg = match &raw {
                        Some(raw) => {
                            let how = self.forgery(i);
                            match made.iter().find(|(h, _)| *h == how) {
                                Some((_, m)) => m.clone(),
                                None => {
                                    let forged =
                                        forge(raw.clone(), how, |h| self.nodes[h].key.node_id())
                                            .unwrap_or_else(|| bytes.clone());
                                    let m = crate::Wire::new(forged);
                                    made.push((how, m.clone()));
                                    m
                                }
                            }
                        }
                        None => crate::Wire::new(bytes.clone()),
                    };
                    self.send_bytes(i, j, msg, 0);
                }
            }
            crate::Strategy::VoteAgainst => {
                if matches!(
                    msg,
                    Some(ConsensusMsg::Prepare { .. } | ConsensusMsg::Commit(_))
                ) {
                    return;
                }
                let bytes = self.encode(&env);
                for j in targets {
                    self.send_bytes(i, j, bytes.clone(), 0);
                }
            }
            crate::Strategy::ConflictingDigest => {
                let out = match msg {
                    Some(ConsensusMsg::Prepare { slot, header }) => {
                        let slot = Slot {
                            digest: Digest(self.rng.random()),
                            ..slot
                        };
                        self.sign_as(i, ConsensusMsg::Prepare { slot, header })
                    }
                    Some(ConsensusMsg::Commit(slot)) => {
                        let views = self.view_ranks();
                        self.quarantine.offence(i, &views);
                        let slot = Slot {
                            digest: Digest(self.rng.random()),
                            ..slot
                        };
                        self.sign_as(i, ConsensusMsg::Commit(slot))
                    }
                    _ => Some(env),
                };
                if let Some(out) = out {
                    let bytes = self.encode(&out);
                    for j in targets {
                        self.send_bytes(i, j, bytes.clone(), 0);
                    }
                }
            }
            crate::Strategy::Equivocate => {
                if let Some(ConsensusMsg::Proposal { header, batch }) = &msg
                    && let Some(alt) = self.equivocal_proposal(i, header, batch)
                {
                    let a = self.encode(&env);
                    let b = self.encode(&alt);
                    let half = targets.len() / 2;
                    for (k, j) in targets.into_iter().enumerate() {
                        self.send_bytes(i, j, if k < half { b.clone() } else { a.clone() }, 0);
                    }
                    return;
                }
                let bytes = self.encode(&env);
                for j in targets {
                    self.send_bytes(i, j, bytes.clone(), 0);
                }
            }
            crate::Strategy::Replay => {
                let bytes = self.encode(&env);
                for j in targets {
                    self.send_bytes(i, j, bytes.clone(), 0);
                }
                let stash_len = self.nodes[i].stash.len();
                if stash_len > 0 && self.rng.random_bool(0.5) {
                    let old = self.nodes[i].stash[self.rng.random_range(0..stash_len)].clone();
                    let j = self.rng.random_range(0..self.nodes.len());
                    self.send_bytes(i, j, old, 0);
                }
            }
            crate::Strategy::LieCapacity => {
                let bytes = self.encode(&env);
                for j in targets {
                    self.send_bytes(i, j, bytes.clone(), 0);
                }
            }
        }
    }

    /// A second proposal for the same `(v, n)` with another batch, signed by node `i`.
    fn equivocal_proposal(
        &mut self,
        i: usize,
        header: &SignedEnvelope,
        batch: &[SignedEnvelope],
    ) -> Option<SignedEnvelope> {
        let h = header.clone().verify::<ConsensusMsg>().ok()?;
        let ConsensusMsg::PrePrepare(pp) = h.message() else {
            return None;
        };
        let mut alt: Vec<SignedEnvelope> = batch.to_vec();
        if alt.len() > 1 {
            alt.pop();
        } else {
            self.byz_nonce += 1;
            let r = Verified::sign(
                &self.nodes[i].key,
                Request {
                    nonce: self.byz_nonce,
                    op: vec![0xBA; 8],
                },
            )
            .ok()?;
            self.validity.submitted(r.signer(), self.byz_nonce);
            alt.push(r.envelope().clone());
        }
        let slot = Slot {
            digest: Digest::of_batch(&alt),
            ..pp.slot
        };
        let h2 = self.sign_as(
            i,
            ConsensusMsg::PrePrepare(PrePrepare {
                slot,
                time: pp.time,
            }),
        )?;
        let views = self.view_ranks();
        self.quarantine.offence(i, &views);
        self.sign_as(
            i,
            ConsensusMsg::Proposal {
                header: h2,
                batch: alt,
            },
        )
    }

    /// How Byzantine node `i` forges its next message.
    fn forgery(&mut self, i: usize) -> Forgery {
        if self.rng.random_bool(0.5) {
            let honest: Vec<usize> = (0..self.nodes.len())
                .filter(|j| !self.nodes[*j].byz && *j != i)
                .collect();
            match honest.get(self.rng.random_range(0..honest.len().max(1))) {
                Some(&h) => Forgery::Signer(h),
                None => Forgery::Unchanged,
            }
        } else {
            Forgery::CorruptSignature
        }
    }

    /// Vote-against: ask for a view change to the next view at every tick.
    pub(crate) fn byz_spurious_view_change(&mut self, i: usize) {
        let vc = ViewChange {
            new_view: self.nodes[i].engine.view() + 1,
            stable_seq: 0,
            stable_proof: vec![],
            prepared: vec![],
            proof_parts: 0,
        };
        if let Some(env) = self.sign_as(i, ConsensusMsg::ViewChange(vc)) {
            self.broadcast_raw(i, &env, 0);
        }
    }

    /// Lie-capacity: a signed announcement claiming 100x the true uplink, every 5 s. Honest
    /// nodes measure the true uplink; each submits evidence with f+1 honest measurements
    /// (which in a real node arrive by gossip; here they are handed over directly).
    pub(crate) fn byz_claim(&mut self, i: usize) {
        if self.now + 5_000 < self.clients_stop_at {
            self.push(self.now + 5_000, Event::Claim { node: i });
        }
        let claim = NodeAnnouncement {
            cluster_id: "sim".into(),
            seq: self.now,
            issued_at: Timestamp(self.now),
            region: "sim".into(),
            version: "3.0.0".into(),
            resources: Resources {
                vcpus: 8,
                memory_mib: 16_384,
                disk_gib: 100,
                gpus: vec![],
            },
            donated: DonatedShare {
                vcpus: 4,
                memory_mib: 8_192,
                disk_gib: 50,
                uplink_mbps: TRUE_UPLINK_MBPS * 100,
            },
            listen_addrs: vec![],
        };
        let Ok(claim) = Verified::sign(&self.nodes[i].key, claim) else {
            return;
        };
        let subject = self.nodes[i].key.node_id();
        let f = self.committee.f();
        let honest: Vec<usize> = (0..self.nodes.len())
            .filter(|j| !self.nodes[*j].byz)
            .collect();
        let measurements: Vec<SignedEnvelope> = honest
            .iter()
            .take(f + 1)
            .filter_map(|j| {
                let m = BandwidthMeasurement {
                    subject,
                    measured_mbps: TRUE_UPLINK_MBPS,
                    at: Timestamp(self.now),
                };
                Verified::sign(&self.nodes[*j].key, m)
                    .ok()
                    .map(|v| v.envelope().clone())
            })
            .collect();
        let ev = Evidence::ClaimContradicted {
            claim: claim.envelope().clone(),
            measurements,
        };
        let op = ev.encode();
        for j in honest {
            if !self.nodes[j].crashed && self.nodes[j].evidence_sent.insert(op.clone()) {
                let _nonce = self.submit_op(j, op.clone());
                self.drain(j);
            }
        }
    }
}

/// What a forger changes in an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Forgery {
    /// Claims this (honest) node signed it.
    Signer(usize),
    /// Flips a bit of the signature.
    CorruptSignature,
    /// Nothing (no honest node to impersonate).
    Unchanged,
}

/// The bytes of envelope `raw` forged `how`; `None` if they cannot be encoded.
fn forge(
    mut raw: RawEnvelope,
    how: Forgery,
    id_of: impl FnOnce(usize) -> NodeId,
) -> Option<Vec<u8>> {
    match how {
        Forgery::Signer(h) => raw.s = id_of(h),
        Forgery::CorruptSignature => {
            if let Some(b) = raw.g.first_mut() {
                *b ^= 0x01;
            }
        }
        Forgery::Unchanged => {}
    }
    let mut out = Vec::new();
    ciborium::into_writer(&raw, &mut out).ok()?;
    Some(out)
}

/// The consensus message inside an envelope a Byzantine node's own engine just signed, read
/// without checking the signature again (it is the node's own; the receivers check it).
fn own_message(env: &SignedEnvelope) -> Option<ConsensusMsg> {
    if env.kind() != MessageKind::Consensus {
        return None;
    }
    let raw = ciborium::from_reader::<RawEnvelope, _>(env.encode().as_slice()).ok()?;
    ciborium::from_reader::<ConsensusMsg, _>(raw.p.as_slice()).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use dwcp_protocol::{DecodeError, NodeKey};

    fn slot() -> Slot {
        Slot {
            view: 1,
            seq: 2,
            digest: Digest([3; 32]),
        }
    }

    fn signed() -> SignedEnvelope {
        let key = NodeKey::from_secret_bytes([7; 32]);
        Verified::sign(&key, ConsensusMsg::Commit(slot()))
            .unwrap()
            .envelope()
            .clone()
    }

    fn raw(env: &SignedEnvelope) -> RawEnvelope {
        ciborium::from_reader(env.encode().as_slice()).unwrap()
    }

    #[test]
    fn forgeries_are_refused_for_their_signature_and_an_unchanged_copy_is_not() {
        let env = signed();
        let honest = NodeKey::from_secret_bytes([8; 32]).node_id();
        let claimed = forge(raw(&env), Forgery::Signer(3), |_| honest).unwrap();
        assert!(matches!(
            SignedEnvelope::decode_verified::<ConsensusMsg>(&claimed),
            Err(DecodeError::BadSignature)
        ));
        assert_eq!(
            SignedEnvelope::decode(&claimed).unwrap().claimed_signer(),
            honest
        );
        let corrupt = forge(raw(&env), Forgery::CorruptSignature, |_| honest).unwrap();
        assert!(matches!(
            SignedEnvelope::decode_verified::<ConsensusMsg>(&corrupt),
            Err(DecodeError::BadSignature)
        ));
        // Unchanged re-encodes to the very bytes that were signed.
        let same = forge(raw(&env), Forgery::Unchanged, |_| honest).unwrap();
        assert_eq!(same, env.encode());
        assert!(SignedEnvelope::decode_verified::<ConsensusMsg>(&same).is_ok());
        // Equal forgeries are equal bytes (so receivers can share one failed check).
        assert_eq!(
            forge(raw(&env), Forgery::CorruptSignature, |_| honest).unwrap(),
            corrupt
        );
    }

    #[test]
    fn own_message_reads_consensus_payloads_only() {
        let env = signed();
        assert_eq!(own_message(&env), Some(ConsensusMsg::Commit(slot())));
        let key = NodeKey::from_secret_bytes([7; 32]);
        let req = Verified::sign(
            &key,
            Request {
                nonce: 1,
                op: vec![1],
            },
        )
        .unwrap();
        assert_eq!(own_message(req.envelope()), None);
    }
}
