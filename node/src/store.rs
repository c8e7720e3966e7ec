//! The node's persistent state in sled (`<data_dir>/db`): the last announcement of every peer
//! it has heard (so a restarted node knows the cluster before the first gossip arrives), and
//! small metadata.

use std::path::Path;

use anyhow::Context;
use dwcp_protocol::{NodeAnnouncement, NodeId, SignedEnvelope, Verified};

/// The sled database.
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    peers: sled::Tree,
}

impl Store {
    /// Opens (or creates) the database under `data_dir`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join("db");
        let db =
            sled::open(&path).with_context(|| format!("opening database {}", path.display()))?;
        let peers = db.open_tree("peers")?;
        Ok(Self { db, peers })
    }

    /// Saves a peer's announcement (its signed envelope, so it is re-verified on load).
    pub fn save_announcement(&self, a: &Verified<NodeAnnouncement>) -> anyhow::Result<()> {
        self.peers
            .insert(a.signer().as_bytes(), a.envelope().encode())?;
        Ok(())
    }

    /// Loads every saved announcement that still verifies; entries that do not are deleted and
    /// counted in the second value.
    pub fn load_announcements(&self) -> (Vec<Verified<NodeAnnouncement>>, usize) {
        let mut good = Vec::new();
        let mut bad = 0;
        for item in self.peers.iter() {
            let Ok((k, v)) = item else {
                bad += 1;
                continue;
            };
            match SignedEnvelope::decode_verified::<NodeAnnouncement>(&v) {
                Ok(a) if a.signer().as_bytes().as_slice() == k.as_ref() => good.push(a),
                _ => {
                    bad += 1;
                    let _ = self.peers.remove(k);
                }
            }
        }
        (good, bad)
    }

    /// A named tree of the node's database (e.g. `statesync` for the cluster document).
    pub fn tree(&self, name: &str) -> anyhow::Result<sled::Tree> {
        self.db
            .open_tree(name)
            .with_context(|| format!("opening the {name} tree"))
    }

    /// The tree mapping VM ids to the names they were created with.
    pub fn vm_names(&self) -> anyhow::Result<sled::Tree> {
        Ok(self.db.open_tree("vm_names")?)
    }

    /// Forgets a peer.
    pub fn forget(&self, id: &NodeId) -> anyhow::Result<()> {
        self.peers.remove(id.as_bytes())?;
        Ok(())
    }

    /// Increments and returns the number of times this node has started.
    pub fn bump_start_count(&self) -> anyhow::Result<u64> {
        let v = self.db.update_and_fetch("start_count", |old| {
            let n = old
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            Some((n + 1).to_be_bytes().to_vec())
        })?;
        Ok(v.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    /// Flushes to disk.
    pub fn flush(&self) -> anyhow::Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use dwcp_protocol::{DonatedShare, NodeKey, Resources, Timestamp};

    use super::*;

    #[test]
    fn announcements_survive_reopen_and_corruption_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let k = NodeKey::from_secret_bytes([3; 32]);
        let a = Verified::sign(
            &k,
            NodeAnnouncement {
                cluster_id: "c".into(),
                seq: 1,
                issued_at: Timestamp(1),
                region: "r".into(),
                version: "3.0.0".into(),
                resources: Resources::default(),
                donated: DonatedShare {
                    vcpus: 0,
                    memory_mib: 0,
                    disk_gib: 0,
                    uplink_mbps: 0,
                },
                listen_addrs: vec![],
            },
        )
        .unwrap();
        {
            let s = Store::open(d.path()).unwrap();
            s.save_announcement(&a).unwrap();
            s.peers.insert(b"garbage-key", b"garbage".to_vec()).unwrap();
            assert_eq!(s.bump_start_count().unwrap(), 1);
            s.flush().unwrap();
        }
        let s = Store::open(d.path()).unwrap();
        let (good, bad) = s.load_announcements();
        assert_eq!(good.len(), 1);
        assert_eq!(good[0].signer(), k.node_id());
        assert_eq!(bad, 1);
        assert_eq!(s.bump_start_count().unwrap(), 2);
    }
}
