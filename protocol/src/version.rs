//! Protocol names, versions and the policy for peers on other versions.
//!
//! Every libp2p protocol DWCP speaks is named `/dwcp/<name>/<major>.<minor>.<patch>` and every
//! gossipsub topic `dwcp/<major>/<cluster-id>/<topic>`. The identify protocol version is
//! `dwcp/<major>.<minor>.<patch>`.
//!
//! # Version policy
//!
//! - **Same major version:** compatible. A node accepts peers of any minor or patch version of
//!   its own major. Message kinds it does not know ([`crate::DecodeError::UnknownKind`]) are
//!   dropped without penalty, so a newer minor version may add kinds; fields are never removed
//!   or re-typed within a major version.
//! - **Different major version:** incompatible. The libp2p protocol names differ, so streams
//!   and Kademlia queries between the two simply do not negotiate, and gossip topics differ, so
//!   no messages cross. When identify reports a peer with another major version, the node
//!   disconnects it, does not add it to its routing table and lists it in no membership table.
//!   It is not penalised: it is not misbehaving, only incompatible.
//! - **Cluster id:** announcements and heartbeats carry the cluster id; messages of another
//!   cluster are ignored (topics are per cluster too).

/// Major version of the wire protocol.
pub const PROTOCOL_MAJOR: u32 = 3;
/// Minor version of the wire protocol.
pub const PROTOCOL_MINOR: u32 = 0;
/// Patch version of the wire protocol.
pub const PROTOCOL_PATCH: u32 = 0;

/// The identify protocol version string of this node, e.g. `dwcp/3.0.0`.
pub fn identify_version() -> String {
    format!("dwcp/{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}.{PROTOCOL_PATCH}")
}

/// Kademlia protocol name.
pub const KAD_PROTOCOL: &str = "/dwcp/kad/3.0.0";
/// Request-response protocol for state sync.
pub const SYNC_PROTOCOL: &str = "/dwcp/sync/3.0.0";
/// Request-response protocol for consensus catch-up and direct votes.
pub const CONSENSUS_PROTOCOL: &str = "/dwcp/consensus/3.0.0";
/// Request-response protocol for node-to-node control (forwarded VM operations).
pub const CONTROL_PROTOCOL: &str = "/dwcp/control/3.0.0";
/// Request-response protocol for consensus state transfer (certified snapshots).
pub const STATE_TRANSFER_PROTOCOL: &str = "/dwcp/state-transfer/3.0.0";
/// Bulk transfer streams (AMST).
pub const TRANSFER_PROTOCOL: &str = "/dwcp/amst/3.0.0";

/// Gossipsub topic names, one set per cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Node announcements.
    pub announce: String,
    /// Heartbeats.
    pub heartbeat: String,
    /// Consensus messages.
    pub consensus: String,
    /// State-sync nudges.
    pub statesync: String,
}

impl Topics {
    /// The topics of a cluster.
    pub fn for_cluster(cluster_id: &str) -> Self {
        let t = |name: &str| format!("dwcp/{PROTOCOL_MAJOR}/{cluster_id}/{name}");
        Self {
            announce: t("announce"),
            heartbeat: t("heartbeat"),
            consensus: t("consensus"),
            statesync: t("statesync"),
        }
    }
}

/// What to do with a peer that reports `identify_version` text `theirs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerVersionVerdict {
    /// Same major version: keep it.
    Compatible,
    /// Another major version or not DWCP at all: disconnect, do not penalise.
    Incompatible,
}

/// Applies the version policy to a peer's identify protocol version.
pub fn check_peer_version(theirs: &str) -> PeerVersionVerdict {
    let Some(v) = theirs.strip_prefix("dwcp/") else {
        return PeerVersionVerdict::Incompatible;
    };
    let major = v.split('.').next().and_then(|m| m.parse::<u32>().ok());
    if major == Some(PROTOCOL_MAJOR) {
        PeerVersionVerdict::Compatible
    } else {
        PeerVersionVerdict::Incompatible
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_policy() {
        assert_eq!(
            check_peer_version(&identify_version()),
            PeerVersionVerdict::Compatible
        );
        assert_eq!(
            check_peer_version("dwcp/3.7.1"),
            PeerVersionVerdict::Compatible
        );
        assert_eq!(
            check_peer_version("dwcp/4.0.0"),
            PeerVersionVerdict::Incompatible
        );
        assert_eq!(
            check_peer_version("ipfs/0.1.0"),
            PeerVersionVerdict::Incompatible
        );
        assert_eq!(
            check_peer_version("dwcp/x"),
            PeerVersionVerdict::Incompatible
        );
    }

    #[test]
    fn topics_are_per_cluster() {
        let a = Topics::for_cluster("a");
        let b = Topics::for_cluster("b");
        assert_ne!(a.heartbeat, b.heartbeat);
        assert_eq!(a.announce, "dwcp/3/a/announce");
    }
}
