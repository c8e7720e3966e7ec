//! The cluster document's schema and its typed records.
//!
//! ```text
//! ROOT                                   written once, by the base change (genesis/epoch)
//! ├─ schema     "dwcp-cluster/1"
//! ├─ cluster    <cluster id>
//! ├─ epoch      u64                      0 for genesis, n after the n-th compaction
//! ├─ nodes      Map
//! │   └─ <node id, 64 hex>  Map          written only by that node (its actors)
//! │       ├─ region, version             str        (NodeAnnouncement)
//! │       ├─ announce_seq                u64
//! │       ├─ resources  Map { vcpus, memory_mib, disk_gib: u64, gpus: Map { <model>: u64 } }
//! │       ├─ donated    Map { vcpus, memory_mib, disk_gib, uplink_mbps: u64 }
//! │       ├─ health     Map { status: str, cpu_load_permille, memory_used_mib,
//! │       │                   vms_running, peers_connected: u64 }   (Heartbeat)
//! │       ├─ heartbeat_seq, uptime_s     u64
//! │       └─ last_heartbeat_ms           u64 (the author's clock, ms since the Unix epoch)
//! ├─ vms        Map
//! │   └─ <vm id, 32 hex>    Map          a certified record, immutable once written; a newer
//! │       ├─ decision_seq   u64          decision replaces the whole record (readers pick the
//! │       ├─ host           str          highest decision_seq among concurrent records)
//! │       ├─ state          str          pending|placed|running|migrating|stopped|failed
//! │       ├─ spec           Map { vcpus, memory_mib, disk_gib: u64 }
//! │       └─ cert           bytes        the commit certificate of the decision (empty in an
//! │                                      epoch snapshot: the committed cut certifies it)
//! └─ quarantine Map
//!     └─ <node id, 64 hex>  Map          a certified record, like a VM record
//!         ├─ decision_seq u64, quarantined bool, reason str
//!         └─ cert         bytes        (empty in an epoch snapshot, as for VMs)
//! ```
//!
//! Every value is a plain Automerge scalar or map, so any Automerge implementation can read an
//! exported document. `host` is absent when a VM is not placed.

use std::collections::BTreeMap;

use dwcp_protocol::{HealthStatus, NodeId, VmId};

/// Value of the root `schema` key.
pub const SCHEMA: &str = "dwcp-cluster/1";
/// Root key: schema name.
pub const K_SCHEMA: &str = "schema";
/// Root key: cluster id.
pub const K_CLUSTER: &str = "cluster";
/// Root key: epoch number.
pub const K_EPOCH: &str = "epoch";
/// Root key: node entries.
pub const K_NODES: &str = "nodes";
/// Root key: VM records.
pub const K_VMS: &str = "vms";
/// Root key: quarantine records.
pub const K_QUARANTINE: &str = "quarantine";

/// Longest text value (region, version, reason, GPU model) accepted in the document.
pub const MAX_TEXT_BYTES: usize = 64;
/// Most GPU models per node entry.
pub const MAX_GPU_MODELS: usize = 16;

/// Keys of a node entry that hold unsigned integers.
pub(crate) const NODE_UINT_KEYS: &[&str] = &[
    "announce_seq",
    "heartbeat_seq",
    "uptime_s",
    "last_heartbeat_ms",
];
/// Keys of a node entry that hold text.
pub(crate) const NODE_TEXT_KEYS: &[&str] = &["region", "version"];
/// Sub-maps of a node entry and the unsigned-integer keys each may hold.
pub(crate) const NODE_SUBMAPS: &[(&str, &[&str])] = &[
    ("resources", &["vcpus", "memory_mib", "disk_gib"]),
    (
        "donated",
        &["vcpus", "memory_mib", "disk_gib", "uplink_mbps"],
    ),
    (
        "health",
        &[
            "cpu_load_permille",
            "memory_used_mib",
            "vms_running",
            "peers_connected",
        ],
    ),
];
/// Text keys of the `health` sub-map.
pub(crate) const HEALTH_TEXT_KEYS: &[&str] = &["status"];
/// The GPU map inside `resources`.
pub(crate) const K_GPUS: &str = "gpus";

/// What a VM needs from its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmSpec {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Disk, GiB.
    pub disk_gib: u64,
}

/// A VM's lifecycle state as decided by consensus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum VmState {
    /// Requested, not yet placed.
    Pending,
    /// Placed on a host, not yet started.
    Placed,
    /// Running on its host.
    Running,
    /// Being live-migrated away from its host.
    Migrating,
    /// Stopped for good (finished); removed at the next compaction.
    Stopped,
    /// Failed for good; removed at the next compaction.
    Failed,
}

impl VmState {
    /// The text stored in the document.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Placed => "placed",
            Self::Running => "running",
            Self::Migrating => "migrating",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }

    /// Parses the stored text.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "placed" => Self::Placed,
            "running" => Self::Running,
            "migrating" => Self::Migrating,
            "stopped" => Self::Stopped,
            "failed" => Self::Failed,
            _ => return None,
        })
    }

    /// True when the VM will never run again, so compaction may drop its record.
    pub const fn is_finished(self) -> bool {
        matches!(self, Self::Stopped | Self::Failed)
    }
}

/// Health status as stored text.
pub fn health_str(s: HealthStatus) -> &'static str {
    match s {
        HealthStatus::Healthy => "healthy",
        HealthStatus::Degraded => "degraded",
        HealthStatus::Paused => "paused",
        HealthStatus::Draining => "draining",
    }
}

/// Parses stored health text.
pub fn parse_health(s: &str) -> Option<HealthStatus> {
    Some(match s {
        "healthy" => HealthStatus::Healthy,
        "degraded" => HealthStatus::Degraded,
        "paused" => HealthStatus::Paused,
        "draining" => HealthStatus::Draining,
        _ => return None,
    })
}

/// A node entry as read from the document. Fields the node has not written yet read as
/// defaults (zero, empty).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeEntry {
    /// Region.
    pub region: String,
    /// Software version.
    pub version: String,
    /// Sequence number of the last announcement written.
    pub announce_seq: u64,
    /// Total resources: vcpus, memory MiB, disk GiB.
    pub resources: [u64; 3],
    /// GPUs: model to count.
    pub gpus: BTreeMap<String, u64>,
    /// Donated share: vcpus, memory MiB, disk GiB, uplink Mbit/s.
    pub donated: [u64; 4],
    /// Health status text (`healthy`, `degraded`, `paused`, `draining`), empty before the
    /// first heartbeat.
    pub health_status: String,
    /// Health numbers: cpu load per mille, memory used MiB, VMs running, peers connected.
    pub health: [u64; 4],
    /// Sequence number of the last heartbeat written.
    pub heartbeat_seq: u64,
    /// Uptime reported in the last heartbeat.
    pub uptime_s: u64,
    /// When the last heartbeat was issued (the author's clock, ms since the Unix epoch).
    pub last_heartbeat_ms: u64,
}

/// A VM record as read from the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRecord {
    /// Decision sequence number.
    pub decision_seq: u64,
    /// Spec.
    pub spec: VmSpec,
    /// Host, if placed.
    pub host: Option<NodeId>,
    /// State.
    pub state: VmState,
    /// The commit certificate.
    pub certificate: Vec<u8>,
}

/// A quarantine record as read from the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineRecord {
    /// Decision sequence number.
    pub decision_seq: u64,
    /// Whether the node is quarantined (false: released).
    pub quarantined: bool,
    /// Reason text.
    pub reason: String,
    /// The commit certificate.
    pub certificate: Vec<u8>,
}

/// The whole cluster state, materialised into ordered maps (used for checksums, compaction
/// and the CLI).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterView {
    /// Node entries by node id.
    pub nodes: BTreeMap<NodeId, NodeEntry>,
    /// VM records by VM id (the winning record among concurrent ones).
    pub vms: BTreeMap<VmId, VmRecord>,
    /// Quarantine records by node id.
    pub quarantine: BTreeMap<NodeId, QuarantineRecord>,
}
