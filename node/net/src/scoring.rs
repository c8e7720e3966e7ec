//! Gossipsub peer-scoring parameters, derived from protocol constants in one place (the shape
//! of Lighthouse's `gossipsub_scoring_parameters.rs`).
//!
//! The one behaviour we penalise hard is sending messages the application rejects
//! (bad signatures, malformed or oversized envelopes): each counts towards
//! `invalid_message_deliveries`, whose weight is squared in the score, so a handful of
//! invalid messages pushes a peer below the graylist threshold and gossipsub ignores it.
//! Everything else keeps libp2p's defaults. Reputation proper (PBFT evidence) lives in
//! `dwcp-reputation`; this score only protects the gossip layer.

use libp2p::gossipsub::{PeerScoreParams, PeerScoreThresholds, TopicHash, TopicScoreParams};

/// Weight of one invalid message (squared counter times this).
pub const INVALID_MESSAGE_WEIGHT: f64 = -10.0;

/// Thresholds below which gossipsub stops gossiping to, publishing to, and accepting from a
/// peer.
pub fn thresholds() -> PeerScoreThresholds {
    PeerScoreThresholds {
        gossip_threshold: -10.0,
        publish_threshold: -50.0,
        graylist_threshold: -80.0,
        accept_px_threshold: 10.0,
        opportunistic_graft_threshold: 3.0,
    }
}

/// Score parameters for the given topics.
pub fn params<'a>(topics: impl IntoIterator<Item = &'a TopicHash>) -> PeerScoreParams {
    let mut p = PeerScoreParams::default();
    for t in topics {
        let tp = TopicScoreParams {
            topic_weight: 1.0,
            // Mesh delivery scoring needs traffic estimates we do not have yet; keep it off.
            mesh_message_deliveries_weight: 0.0,
            mesh_failure_penalty_weight: 0.0,
            invalid_message_deliveries_weight: INVALID_MESSAGE_WEIGHT,
            invalid_message_deliveries_decay: 0.9,
            ..TopicScoreParams::default()
        };
        p.topics.insert(t.clone(), tp);
    }
    // Many test nodes share 127.0.0.1; do not penalise IP colocation on loopback meshes.
    p.ip_colocation_factor_weight = 0.0;
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_validate() {
        let t = TopicHash::from_raw("dwcp/3/x/heartbeat");
        assert!(params([&t]).validate().is_ok());
        assert!(thresholds().validate().is_ok());
    }

    #[test]
    fn three_invalid_messages_reach_graylist() {
        // score contribution = weight * count^2 (topic weight 1.0)
        let after_three = INVALID_MESSAGE_WEIGHT * 9.0;
        assert!(after_three < thresholds().graylist_threshold);
        let after_one = INVALID_MESSAGE_WEIGHT;
        assert!(after_one > thresholds().publish_threshold);
    }
}
