//! The membership table: who is in the cluster and whether they are `ready`. Sans-IO: every
//! method takes `now` (milliseconds on the node's monotonic clock) and verified messages.
//!
//! A peer is `ready` while its last heartbeat (or announcement) is younger than
//! `unreachable_after`, and `unreachable` after that. Messages older than what we hold (by
//! `seq`) are ignored, so replayed gossip cannot move a peer back in time. A heartbeat from a
//! node whose announcement we have not seen yet still counts as a sign of life; its details
//! fill in when the announcement arrives.

use std::collections::BTreeMap;

use dwcp_protocol::{
    Heartbeat, NodeAnnouncement, NodeId, Verified,
    api::{NodeInfo, PeerStatus},
};

/// What happened to a message offered to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// It was newer than what we had and was applied.
    Applied,
    /// It was not newer (replay or reordering) and was ignored.
    Stale,
}

#[derive(Debug, Clone)]
struct Member {
    announcement: Option<Verified<NodeAnnouncement>>,
    last_heartbeat: Option<Heartbeat>,
    last_seen: u64,
    seen_alive: bool,
}

/// The table.
#[derive(Debug, Clone)]
pub struct Membership {
    unreachable_after_ms: u64,
    members: BTreeMap<NodeId, Member>,
}

impl Membership {
    /// An empty table.
    pub fn new(unreachable_after_ms: u64) -> Self {
        Self {
            unreachable_after_ms,
            members: BTreeMap::new(),
        }
    }

    /// Offers an announcement.
    pub fn on_announcement(&mut self, now: u64, a: Verified<NodeAnnouncement>) -> Update {
        let id = a.signer();
        let m = self.members.entry(id).or_insert(Member {
            announcement: None,
            last_heartbeat: None,
            last_seen: now,
            seen_alive: true,
        });
        if let Some(old) = &m.announcement
            && old.seq >= a.seq
        {
            return Update::Stale;
        }
        m.announcement = Some(a);
        m.last_seen = now;
        m.seen_alive = true;
        Update::Applied
    }

    /// Loads an announcement from disk at start: known, but not yet seen alive.
    pub fn restore(&mut self, a: Verified<NodeAnnouncement>) {
        let id = a.signer();
        self.members.entry(id).or_insert(Member {
            announcement: Some(a),
            last_heartbeat: None,
            last_seen: 0,
            seen_alive: false,
        });
    }

    /// Offers a heartbeat.
    pub fn on_heartbeat(&mut self, now: u64, hb: Verified<Heartbeat>) -> Update {
        let id = hb.signer();
        let m = self.members.entry(id).or_insert(Member {
            announcement: None,
            last_heartbeat: None,
            last_seen: now,
            seen_alive: true,
        });
        if let Some(old) = &m.last_heartbeat
            && old.seq >= hb.seq
        {
            return Update::Stale;
        }
        m.last_heartbeat = Some(hb.into_message());
        m.last_seen = now;
        m.seen_alive = true;
        Update::Applied
    }

    /// A peer's status at `now`, if it is known.
    pub fn status(&self, now: u64, id: &NodeId) -> Option<PeerStatus> {
        self.members.get(id).map(|m| self.status_of(now, m))
    }

    fn status_of(&self, now: u64, m: &Member) -> PeerStatus {
        if m.seen_alive && now.saturating_sub(m.last_seen) < self.unreachable_after_ms {
            PeerStatus::Ready
        } else {
            PeerStatus::Unreachable
        }
    }

    /// Number of known peers and of ready peers.
    pub fn counts(&self, now: u64) -> (usize, usize) {
        let ready = self
            .members
            .values()
            .filter(|m| self.status_of(now, m) == PeerStatus::Ready)
            .count();
        (self.members.len(), ready)
    }

    /// The last announcement of a peer.
    pub fn announcement(&self, id: &NodeId) -> Option<&Verified<NodeAnnouncement>> {
        self.members.get(id).and_then(|m| m.announcement.as_ref())
    }

    /// Every peer as an API row (without the local node; the caller adds it).
    pub fn rows(&self, now: u64) -> Vec<NodeInfo> {
        self.members
            .iter()
            .map(|(id, m)| {
                let a = m.announcement.as_ref().map(|a| a.message());
                NodeInfo {
                    id: *id,
                    peer_id: id.to_peer_id().map(|p| p.to_string()).unwrap_or_default(),
                    status: self.status_of(now, m),
                    is_self: false,
                    region: a.map(|a| a.region.clone()).unwrap_or_default(),
                    version: a.map(|a| a.version.clone()).unwrap_or_default(),
                    addresses: a.map(|a| a.listen_addrs.clone()).unwrap_or_default(),
                    resources: a.map(|a| a.resources.clone()).unwrap_or_default(),
                    donated: a
                        .map(|a| a.donated.clone())
                        .unwrap_or(dwcp_protocol::DonatedShare {
                            vcpus: 0,
                            memory_mib: 0,
                            disk_gib: 0,
                            uplink_mbps: 0,
                        }),
                    health: m.last_heartbeat.as_ref().map(|h| h.health.status),
                    last_seen_ms_ago: if m.seen_alive {
                        now.saturating_sub(m.last_seen)
                    } else {
                        u64::MAX
                    },
                    last_heartbeat_seq: m.last_heartbeat.as_ref().map(|h| h.seq).unwrap_or(0),
                }
            })
            .collect()
    }

    /// The last heartbeat of a peer.
    pub fn heartbeat(&self, id: &NodeId) -> Option<&Heartbeat> {
        self.members.get(id).and_then(|m| m.last_heartbeat.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use dwcp_protocol::{DonatedShare, Health, HealthStatus, NodeKey, Resources, Timestamp};

    use super::*;

    fn hb(key: &NodeKey, seq: u64) -> Verified<Heartbeat> {
        Verified::sign(
            key,
            Heartbeat {
                cluster_id: "c".into(),
                seq,
                issued_at: Timestamp(seq),
                uptime_s: 1,
                health: Health {
                    status: HealthStatus::Healthy,
                    cpu_load_permille: 0,
                    memory_used_mib: 0,
                    vms_running: 0,
                    peers_connected: 0,
                    allocated: None,
                },
            },
        )
        .unwrap()
    }

    fn ann(key: &NodeKey, seq: u64, region: &str) -> Verified<NodeAnnouncement> {
        Verified::sign(
            key,
            NodeAnnouncement {
                cluster_id: "c".into(),
                seq,
                issued_at: Timestamp(seq),
                region: region.into(),
                version: "3.0.0".into(),
                resources: Resources {
                    vcpus: 4,
                    memory_mib: 4096,
                    disk_gib: 10,
                    gpus: vec![],
                },
                donated: DonatedShare {
                    vcpus: 2,
                    memory_mib: 2048,
                    disk_gib: 5,
                    uplink_mbps: 0,
                },
                listen_addrs: vec![],
            },
        )
        .unwrap()
    }

    #[test]
    fn ready_until_silent_then_unreachable() {
        let k = NodeKey::from_secret_bytes([1; 32]);
        let mut m = Membership::new(5_000);
        assert_eq!(m.on_heartbeat(1_000, hb(&k, 1)), Update::Applied);
        assert_eq!(m.status(5_999, &k.node_id()), Some(PeerStatus::Ready));
        assert_eq!(m.status(6_000, &k.node_id()), Some(PeerStatus::Unreachable));
        assert_eq!(m.on_heartbeat(7_000, hb(&k, 2)), Update::Applied);
        assert_eq!(m.status(7_000, &k.node_id()), Some(PeerStatus::Ready));
    }

    #[test]
    fn replayed_messages_do_not_refresh_liveness() {
        let k = NodeKey::from_secret_bytes([1; 32]);
        let mut m = Membership::new(5_000);
        let first = hb(&k, 10);
        m.on_heartbeat(0, first.clone());
        assert_eq!(m.on_heartbeat(9_000, first), Update::Stale);
        assert_eq!(m.status(9_000, &k.node_id()), Some(PeerStatus::Unreachable));
        assert_eq!(m.on_announcement(0, ann(&k, 5, "a")), Update::Applied);
        assert_eq!(m.on_announcement(0, ann(&k, 4, "old")), Update::Stale);
        assert_eq!(m.announcement(&k.node_id()).unwrap().region, "a");
    }

    #[test]
    fn restored_peers_are_unreachable_until_heard() {
        let k = NodeKey::from_secret_bytes([2; 32]);
        let mut m = Membership::new(5_000);
        m.restore(ann(&k, 1, "r"));
        assert_eq!(m.status(0, &k.node_id()), Some(PeerStatus::Unreachable));
        assert_eq!(m.counts(0), (1, 0));
        m.on_heartbeat(10, hb(&k, 1));
        assert_eq!(m.counts(10), (1, 1));
        let rows = m.rows(10);
        assert_eq!(rows[0].region, "r");
        assert_eq!(rows[0].status, PeerStatus::Ready);
    }
}
