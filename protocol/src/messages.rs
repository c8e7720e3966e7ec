//! The messages nodes sign and gossip about themselves: [`NodeAnnouncement`] and
//! [`Heartbeat`].

use serde::{Deserialize, Serialize};

use crate::{Message, MessageKind, Timestamp};

/// Longest region name.
pub const MAX_REGION_LEN: usize = 64;
/// Longest version string.
pub const MAX_VERSION_LEN: usize = 32;
/// Longest cluster id.
pub const MAX_CLUSTER_ID_LEN: usize = 64;
/// Most listen addresses in one announcement.
pub const MAX_ADDRESSES: usize = 16;
/// Longest listen address (a multiaddr in text form).
pub const MAX_ADDRESS_LEN: usize = 256;
/// Most GPU entries in one announcement.
pub const MAX_GPUS: usize = 16;
/// Longest GPU model name.
pub const MAX_GPU_MODEL_LEN: usize = 64;

/// A message that breaks a bound of its type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// A text field is longer than allowed.
    #[error("field `{field}` is {len} bytes long, the limit is {max}")]
    TooLong {
        /// Field name.
        field: &'static str,
        /// Actual length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A list holds more entries than allowed.
    #[error("field `{field}` has {len} entries, the limit is {max}")]
    TooMany {
        /// Field name.
        field: &'static str,
        /// Actual count.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A number is out of its range.
    #[error("field `{field}` is out of range: {reason}")]
    OutOfRange {
        /// Field name.
        field: &'static str,
        /// What the range is.
        reason: &'static str,
    },
}

fn check_len(field: &'static str, s: &str, max: usize) -> Result<(), ValidationError> {
    if s.len() > max {
        return Err(ValidationError::TooLong {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

fn check_count<T>(field: &'static str, v: &[T], max: usize) -> Result<(), ValidationError> {
    if v.len() > max {
        return Err(ValidationError::TooMany {
            field,
            len: v.len(),
            max,
        });
    }
    Ok(())
}

/// A GPU a host offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// Model name, e.g. `nvidia-a100`.
    pub model: String,
    /// How many of them.
    pub count: u32,
}

/// A host's total resources.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Logical CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disk in GiB.
    pub disk_gib: u64,
    /// GPUs.
    pub gpus: Vec<Gpu>,
}

/// The share of a host its volunteer lends to the cluster. Only this share is placeable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DonatedShare {
    /// vCPUs lent.
    pub vcpus: u32,
    /// Memory lent, MiB.
    pub memory_mib: u64,
    /// Disk lent, GiB.
    pub disk_gib: u64,
    /// Upload bandwidth lent, Mbit/s (0 means no cap).
    pub uplink_mbps: u32,
}

/// A node tells the cluster who it is and what it offers. Published on join, on change and
/// periodically; the newest (highest `seq`) wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAnnouncement {
    /// The cluster the node belongs to; messages for other clusters are ignored.
    pub cluster_id: String,
    /// Monotonic per node, so replays of older announcements are ignored.
    pub seq: u64,
    /// When it was issued (the author's clock).
    pub issued_at: Timestamp,
    /// Region, e.g. `eu-west-1`.
    pub region: String,
    /// Software version, semver text, e.g. `3.0.0`.
    pub version: String,
    /// Total resources of the host.
    pub resources: Resources,
    /// What of them is lent.
    pub donated: DonatedShare,
    /// Where the node listens, as multiaddrs.
    pub listen_addrs: Vec<String>,
}

impl Message for NodeAnnouncement {
    const KIND: MessageKind = MessageKind::NodeAnnouncement;

    fn validate(&self) -> Result<(), ValidationError> {
        check_len("cluster_id", &self.cluster_id, MAX_CLUSTER_ID_LEN)?;
        check_len("region", &self.region, MAX_REGION_LEN)?;
        check_len("version", &self.version, MAX_VERSION_LEN)?;
        check_count("listen_addrs", &self.listen_addrs, MAX_ADDRESSES)?;
        for a in &self.listen_addrs {
            check_len("listen_addrs[]", a, MAX_ADDRESS_LEN)?;
        }
        check_count("resources.gpus", &self.resources.gpus, MAX_GPUS)?;
        for g in &self.resources.gpus {
            check_len("resources.gpus[].model", &g.model, MAX_GPU_MODEL_LEN)?;
        }
        let r = &self.resources;
        let d = &self.donated;
        if d.vcpus > r.vcpus || d.memory_mib > r.memory_mib || d.disk_gib > r.disk_gib {
            return Err(ValidationError::OutOfRange {
                field: "donated",
                reason: "the donated share cannot exceed the host's resources",
            });
        }
        Ok(())
    }
}

/// How a node is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Accepting work.
    Healthy,
    /// Up but impaired (e.g. low memory); keeps its VMs, takes no new ones.
    Degraded,
    /// The volunteer paused donation; keeps nothing new.
    Paused,
    /// Shutting down.
    Draining,
}

/// Measured health numbers in a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Overall status.
    pub status: HealthStatus,
    /// CPU load in per-mille of the donated vCPUs (0..=1000, more when overloaded).
    pub cpu_load_permille: u32,
    /// Memory in use, MiB.
    pub memory_used_mib: u64,
    /// VMs running on the node.
    pub vms_running: u32,
    /// Peers the node is connected to.
    pub peers_connected: u32,
    /// What the node's defined VMs hold of its donated share; absent when the node runs no
    /// hypervisor (or predates the field). Left out of the encoding when absent, so a
    /// heartbeat without it is byte-for-byte what older nodes send and sign.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<Allocation>,
}

/// Most VMs a heartbeat may report as defined on one node.
pub const MAX_ALLOCATED_VMS: u32 = 100_000;
/// Most vCPUs a heartbeat may report as allocated.
pub const MAX_ALLOCATED_VCPUS: u32 = 1 << 20;
/// Most memory (MiB, 1 PiB) a heartbeat may report as allocated.
pub const MAX_ALLOCATED_MEMORY_MIB: u64 = 1 << 30;

/// What the VMs defined on a node (running or not) hold of its donated share: the figures
/// its hypervisor admits new VMs against. Placement on other nodes reads them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// vCPUs held.
    pub vcpus: u32,
    /// Guest memory held, MiB.
    pub memory_mib: u64,
    /// Virtual disk held, MiB.
    pub disk_mib: u64,
    /// VMs defined.
    pub vms: u32,
}

/// A node's periodic sign of life. A peer is `ready` while these keep arriving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The cluster the node belongs to.
    pub cluster_id: String,
    /// Monotonic per node.
    pub seq: u64,
    /// When it was issued (the author's clock).
    pub issued_at: Timestamp,
    /// Seconds the node has been up.
    pub uptime_s: u64,
    /// Health numbers.
    pub health: Health,
}

impl Message for Heartbeat {
    const KIND: MessageKind = MessageKind::Heartbeat;

    fn validate(&self) -> Result<(), ValidationError> {
        check_len("cluster_id", &self.cluster_id, MAX_CLUSTER_ID_LEN)?;
        if self.health.cpu_load_permille > 100_000 {
            return Err(ValidationError::OutOfRange {
                field: "health.cpu_load_permille",
                reason: "must be at most 100000",
            });
        }
        if let Some(a) = &self.health.allocated
            && (a.vms > MAX_ALLOCATED_VMS
                || a.vcpus > MAX_ALLOCATED_VCPUS
                || a.memory_mib > MAX_ALLOCATED_MEMORY_MIB
                || a.disk_mib > MAX_ALLOCATED_MEMORY_MIB.saturating_mul(1024))
        {
            return Err(ValidationError::OutOfRange {
                field: "health.allocated",
                reason: "at most 100000 VMs, 2^20 vCPUs, 1 PiB of memory and 1 EiB of disk",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NodeKey, SignedEnvelope, Verified};

    /// `Health` as it was before `allocated`: what older nodes encode and sign.
    #[derive(Serialize)]
    struct HealthBefore {
        status: HealthStatus,
        cpu_load_permille: u32,
        memory_used_mib: u64,
        vms_running: u32,
        peers_connected: u32,
    }

    fn health(allocated: Option<Allocation>) -> Health {
        Health {
            status: HealthStatus::Healthy,
            cpu_load_permille: 10,
            memory_used_mib: 300,
            vms_running: 1,
            peers_connected: 2,
            allocated,
        }
    }

    #[test]
    fn allocation_is_optional_and_old_encodings_are_unchanged() {
        let old = HealthBefore {
            status: HealthStatus::Healthy,
            cpu_load_permille: 10,
            memory_used_mib: 300,
            vms_running: 1,
            peers_connected: 2,
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        ciborium::into_writer(&old, &mut a).unwrap();
        ciborium::into_writer(&health(None), &mut b).unwrap();
        assert_eq!(
            a, b,
            "a heartbeat without allocation is byte-for-byte the old one"
        );
        let back: Health = ciborium::from_reader(&a[..]).unwrap();
        assert_eq!(back.allocated, None);

        let k = NodeKey::from_secret_bytes([9; 32]);
        let hb = |allocated| Heartbeat {
            cluster_id: "c".into(),
            seq: 1,
            issued_at: crate::Timestamp(1),
            uptime_s: 1,
            health: health(allocated),
        };
        let with = Some(Allocation {
            vcpus: 2,
            memory_mib: 512,
            disk_mib: 1024,
            vms: 1,
        });
        let bytes = Verified::sign(&k, hb(with)).unwrap().envelope().encode();
        let v = SignedEnvelope::decode_verified::<Heartbeat>(&bytes).unwrap();
        assert_eq!(v.health.allocated, with);
        let huge = Some(Allocation {
            vms: MAX_ALLOCATED_VMS + 1,
            ..Allocation::default()
        });
        assert!(Verified::sign(&k, hb(huge)).is_err());
    }
}
