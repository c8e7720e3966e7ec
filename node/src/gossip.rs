//! Validation of gossip messages, shared by nodes and bootstrap peers: every message must be a
//! signed envelope of the kind its topic carries, signed by the peer that published it at the
//! gossipsub layer, for our cluster. Invalid messages are rejected (gossipsub penalises the
//! forwarder); valid but unwanted ones are ignored without penalty.

use dwcp_net::GossipMessage;
use dwcp_protocol::{
    DecodeError, Heartbeat, Message, NodeAnnouncement, NodeId, SignedEnvelope, Verified,
    version::Topics,
};

/// A gossip message after validation.
#[derive(Debug)]
pub enum Classified {
    /// A valid heartbeat.
    Heartbeat(Verified<Heartbeat>),
    /// A valid announcement.
    Announcement(Verified<NodeAnnouncement>),
    /// Invalid: reject and penalise. The reason is a metric label.
    Invalid(&'static str),
    /// Valid but not for us: drop without penalty. The reason is a metric label.
    Ignored(&'static str),
}

fn reject_reason(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::TooLarge { .. } => "oversized",
        DecodeError::BadSignature | DecodeError::BadSigner => "bad_signature",
        DecodeError::Invalid(_) => "invalid",
        _ => "malformed",
    }
}

/// Why a message was dropped: `Err(true, reason)` is invalid, `Err(false, reason)` unwanted.
type Dropped = (bool, &'static str);

fn check<T: Message>(
    m: &GossipMessage,
    cluster_id: &str,
    cluster_of: impl Fn(&T) -> &str,
) -> Result<Verified<T>, Dropped> {
    let v = SignedEnvelope::decode_verified::<T>(&m.data).map_err(|e| (true, reject_reason(&e)))?;
    let publisher = m
        .source
        .and_then(|p| NodeId::from_peer_id(&p).ok())
        .ok_or((true, "unsigned_gossip"))?;
    if publisher != v.signer() {
        return Err((true, "signer_mismatch"));
    }
    if cluster_of(v.message()) != cluster_id {
        return Err((false, "other_cluster"));
    }
    Ok(v)
}

fn dropped((invalid, reason): Dropped) -> Classified {
    if invalid {
        Classified::Invalid(reason)
    } else {
        Classified::Ignored(reason)
    }
}

/// Validates one gossip message.
pub fn classify(m: &GossipMessage, topics: &Topics, cluster_id: &str) -> Classified {
    if m.topic == topics.heartbeat {
        check::<Heartbeat>(m, cluster_id, |h| &h.cluster_id)
            .map_or_else(dropped, Classified::Heartbeat)
    } else if m.topic == topics.announce {
        check::<NodeAnnouncement>(m, cluster_id, |a| &a.cluster_id)
            .map_or_else(dropped, Classified::Announcement)
    } else {
        Classified::Ignored("unknown_topic")
    }
}

#[cfg(test)]
mod tests {
    use dwcp_protocol::{Health, HealthStatus, NodeKey, Timestamp};
    use libp2p::PeerId;

    use super::*;

    fn msg(topic: &str, data: Vec<u8>, source: Option<PeerId>) -> GossipMessage {
        GossipMessage {
            id: libp2p::gossipsub::MessageId::new(b"x"),
            propagation_source: PeerId::random(),
            source,
            topic: topic.into(),
            data,
        }
    }

    fn hb(cluster: &str) -> Heartbeat {
        Heartbeat {
            cluster_id: cluster.into(),
            seq: 1,
            issued_at: Timestamp(1),
            uptime_s: 1,
            health: Health {
                status: HealthStatus::Healthy,
                cpu_load_permille: 0,
                memory_used_mib: 0,
                vms_running: 0,
                peers_connected: 0,
                allocated: None,
            },
        }
    }

    #[test]
    fn verdicts() {
        let t = Topics::for_cluster("c");
        let k = NodeKey::from_secret_bytes([5; 32]);
        let me = Some(k.node_id().to_peer_id().unwrap());
        let good = SignedEnvelope::sign(&k, &hb("c")).encode();
        assert!(matches!(
            classify(&msg(&t.heartbeat, good.clone(), me), &t, "c"),
            Classified::Heartbeat(_)
        ));
        // Relayed under another publisher's name: the signer must be the publisher.
        let other = Some(
            NodeKey::from_secret_bytes([6; 32])
                .node_id()
                .to_peer_id()
                .unwrap(),
        );
        assert!(matches!(
            classify(&msg(&t.heartbeat, good.clone(), other), &t, "c"),
            Classified::Invalid("signer_mismatch")
        ));
        assert!(matches!(
            classify(&msg(&t.heartbeat, good, None), &t, "c"),
            Classified::Invalid("unsigned_gossip")
        ));
        assert!(matches!(
            classify(&msg(&t.heartbeat, b"junk".to_vec(), me), &t, "c"),
            Classified::Invalid("malformed")
        ));
        assert!(matches!(
            classify(&msg(&t.heartbeat, vec![0; 64 * 1024], me), &t, "c"),
            Classified::Invalid("oversized")
        ));
        let foreign = SignedEnvelope::sign(&k, &hb("other")).encode();
        assert!(matches!(
            classify(&msg(&t.heartbeat, foreign, me), &t, "c"),
            Classified::Ignored("other_cluster")
        ));
        let ann_on_hb_topic = SignedEnvelope::sign(&k, &hb("c")).encode();
        assert!(matches!(
            classify(&msg(&t.announce, ann_on_hb_topic, me), &t, "c"),
            Classified::Invalid("malformed")
        ));
    }
}
