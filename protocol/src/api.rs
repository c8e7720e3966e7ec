//! JSON types of the node's local HTTP API, shared by the node, `dwcp-cli`, the tray GUI and
//! the testnet. They are the contract between those programs, so they live here.

use serde::{Deserialize, Serialize};

use crate::{DonatedShare, HealthStatus, NodeId, Resources};

/// A peer's status in a node's membership table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerStatus {
    /// Heartbeats are fresh.
    Ready,
    /// No heartbeat for longer than the configured silence.
    Unreachable,
}

/// One node as seen by the node answering (`GET /v1/nodes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id (hex public key).
    pub id: NodeId,
    /// libp2p peer id of the node.
    pub peer_id: String,
    /// `ready` or `unreachable`.
    pub status: PeerStatus,
    /// Whether this entry is the answering node itself.
    pub is_self: bool,
    /// Region.
    pub region: String,
    /// Software version.
    pub version: String,
    /// Listen addresses (multiaddrs).
    pub addresses: Vec<String>,
    /// Total resources.
    pub resources: Resources,
    /// Donated share.
    pub donated: DonatedShare,
    /// Health reported in the last heartbeat, if any arrived.
    pub health: Option<HealthStatus>,
    /// Milliseconds since the last heartbeat or announcement from it.
    pub last_seen_ms_ago: u64,
    /// Sequence number of the last heartbeat.
    pub last_heartbeat_seq: u64,
}

/// `GET /v1/cluster/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Cluster id.
    pub cluster_id: String,
    /// The answering node.
    pub node_id: NodeId,
    /// Its software version.
    pub version: String,
    /// Seconds it has been up.
    pub uptime_s: u64,
    /// Nodes known (including itself).
    pub nodes_known: usize,
    /// Nodes `ready` (including itself).
    pub nodes_ready: usize,
    /// Nodes `unreachable`.
    pub nodes_unreachable: usize,
    /// libp2p connections open.
    pub peers_connected: usize,
    /// Bootstrap peers configured.
    pub bootstrap_peers: usize,
    /// Listen addresses.
    pub listen_addrs: Vec<String>,
}

/// One check in `GET /v1/cluster/health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// Component name.
    pub component: String,
    /// Whether it passes.
    pub ok: bool,
    /// A one-line explanation with the figures behind the verdict.
    pub detail: String,
}

/// `GET /v1/cluster/health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterHealth {
    /// True when every check passes.
    pub healthy: bool,
    /// The checks.
    pub checks: Vec<HealthCheck>,
}

/// `GET /v1/nodes/{id}/metrics`: headline figures of one node as the answering node knows
/// them. For the full Prometheus text, scrape the node's metrics port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeMetrics {
    /// Node id.
    pub id: NodeId,
    /// Metric name to value, as in the Prometheus exposition (only for the answering node
    /// itself); for other nodes, the values from their last heartbeat.
    pub metrics: std::collections::BTreeMap<String, f64>,
}

/// The error body of every non-2xx API answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// One line saying what went wrong.
    pub error: String,
}

/// `POST /v1/vms`: a VM to create and start on the answering node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmCreateRequest {
    /// A human name (1 to 64 characters).
    pub name: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Disk: a base image's SHA-256 (already in the node's image store) or an absolute path to
    /// a qcow2/raw image the node imports by content hash.
    #[serde(default)]
    pub image: Option<String>,
    /// Virtual disk size in MiB (default: the image's size).
    #[serde(default)]
    pub disk_mib: Option<u64>,
    /// Direct kernel boot: absolute path of the kernel. Without it the VM boots its disk.
    #[serde(default)]
    pub kernel: Option<String>,
    /// Direct kernel boot: absolute path of the initramfs.
    #[serde(default)]
    pub initrd: Option<String>,
    /// Direct kernel boot: kernel command line.
    #[serde(default)]
    pub cmdline: Option<String>,
}

/// A VM as `GET /v1/vms` and `GET /v1/vms/{id}` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmView {
    /// VM id (32 hex characters).
    pub id: String,
    /// Name given at creation.
    pub name: String,
    /// `defined`, `running`, `paused`, `incoming`, `migrating` or `lost`.
    pub state: String,
    /// The node hosting it.
    pub node: NodeId,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Guest memory, bytes (`vm inspect --field memory_size`).
    pub memory_size: u64,
    /// QEMU's process id when running.
    pub pid: Option<u32>,
    /// Accelerator (`kvm` or `tcg`).
    pub accel: String,
    /// Resource use, when running (only on `GET /v1/vms/{id}`).
    pub stats: Option<VmStatsView>,
}

/// Resource use of a running VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatsView {
    /// CPU time of the vCPU threads, seconds.
    pub vcpu_seconds: f64,
    /// Host resident memory of the VM process, bytes.
    pub host_rss_bytes: Option<u64>,
    /// Peak memory charged to the VM's cgroup, bytes.
    pub cgroup_memory_peak_bytes: Option<u64>,
    /// Guest dirty rate, MiB/s, when measured.
    pub dirty_rate_mib_per_s: Option<u64>,
}

/// `GET /v1/vms/{id}/console`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConsole {
    /// The last bytes of the VM's serial console.
    pub text: String,
}
