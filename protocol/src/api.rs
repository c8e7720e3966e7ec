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

/// One node's row in `GET /v1/state-sync/lag`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncLagRow {
    /// The node whose entry this is.
    pub node: NodeId,
    /// Milliseconds between now and the newest heartbeat of that node in our cluster
    /// document (`None`: its entry holds no heartbeat yet). Uses the author's clock.
    pub lag_ms: Option<u64>,
}

/// `GET /v1/state-sync/lag`: how old this node's view of every node is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncLagStatus {
    /// The answering node.
    pub node: NodeId,
    /// Document epoch.
    pub epoch: u64,
    /// Nodes in the document.
    pub nodes: usize,
    /// VM records in the document.
    pub vms: usize,
    /// Current heads (hex change hashes).
    pub heads: Vec<String>,
    /// Every node's lag, largest first.
    pub rows: Vec<SyncLagRow>,
    /// Keys with concurrent values: node entries, VM records, quarantine records.
    pub conflicts: [usize; 3],
    /// Engine counters (frames and bytes sent and received, changes applied and refused...).
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// A VM record of the cluster document (`GET /v1/state-sync/vms`, `dwcp-cli vm list
/// --cluster`): the last committed decision about the VM, as this node's view holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterVmRecord {
    /// VM id (32 hex characters).
    pub id: String,
    /// Host, when placed.
    pub host: Option<NodeId>,
    /// `placed`, `running`, `migrating`, `stopped`, `failed`.
    pub state: String,
    /// Decision sequence number of the record.
    pub decision_seq: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Disk, GiB.
    pub disk_gib: u64,
    /// Size of the record's commit certificate, bytes.
    pub certificate_bytes: usize,
}

/// A node's state checksum (`GET /v1/state-sync/checksum`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncChecksum {
    /// The node.
    pub node: NodeId,
    /// Document epoch.
    pub epoch: u64,
    /// Hex SHA-256 of the canonical cluster view and epoch.
    pub checksum: String,
    /// Hex heads the checksum was computed at.
    pub heads: Vec<String>,
}

/// How a peer's state compares with ours in `state-sync verify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncVerdict {
    /// Same checksum as ours.
    Same,
    /// Same heads but another checksum: the views diverged although the histories agree.
    Differs,
    /// Other heads and another checksum: still syncing (or partitioned).
    Syncing,
    /// It did not answer.
    Unreachable,
}

/// One row of `POST /v1/state-sync/verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncVerifyRow {
    /// The node asked.
    pub node: NodeId,
    /// The verdict.
    pub verdict: SyncVerdict,
    /// Its answer, if any.
    pub checksum: Option<SyncChecksum>,
    /// Why it did not answer.
    pub error: Option<String>,
}

/// `POST /v1/state-sync/verify`: this node's checksum against every ready node's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncVerifyReport {
    /// Ours.
    pub local: SyncChecksum,
    /// Every other ready node.
    pub rows: Vec<SyncVerifyRow>,
}

/// `POST /v1/state-sync/force-sync` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForceSyncRequest {
    /// Nodes to sync with now (empty: every connected peer).
    pub nodes: Vec<NodeId>,
}

/// One state-sync session in `GET /v1/gossip/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncSessionRow {
    /// The peer.
    pub peer: NodeId,
    /// Connected now.
    pub connected: bool,
    /// Its last known heads equal ours.
    pub in_sync: bool,
    /// Waiting for its reply.
    pub in_flight: bool,
    /// Milliseconds since we last sent to it.
    pub last_sent_ms_ago: Option<u64>,
    /// Milliseconds since we last heard from it.
    pub last_received_ms_ago: Option<u64>,
}

/// `GET /v1/gossip/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GossipStatus {
    /// Gossipsub mesh peers per topic.
    pub mesh: Vec<(String, usize)>,
    /// Gossipsub scores of connected peers (peer id, score).
    pub peer_scores: Vec<(String, f64)>,
    /// State-sync sessions.
    pub sessions: Vec<SyncSessionRow>,
    /// Anti-entropy fanout and interval in use.
    pub fanout: usize,
    /// Interval, milliseconds.
    pub interval_ms: u64,
}

/// `POST /v1/placement/vms`: a VM to create somewhere in the cluster. Without `node`, the
/// answering node runs online placement over the cluster's ready nodes and creates the VM on
/// the chosen one (itself, or another node through the control service).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacedVmCreateRequest {
    /// The VM. Paths in it (image, kernel, initrd) are resolved on the node that creates it.
    pub vm: VmCreateRequest,
    /// Pin: create it on this node (hex id, peer id or unique hex prefix), no placement.
    #[serde(default)]
    pub node: Option<String>,
}

/// A node a placement decision left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilteredNode {
    /// The node.
    pub node: NodeId,
    /// Why (e.g. `too-small:memory: needs 512, placeable 0`).
    pub reason: String,
}

/// Why a VM went where it went (the answer of `vm create` carries it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacementExplanation {
    /// The node that now hosts the VM.
    pub node: NodeId,
    /// The VM was created by the answering node itself (not forwarded).
    pub local: bool,
    /// The node was given with `--node` (placement did not choose it).
    pub pinned: bool,
    /// Score of the chosen node (lower is better), when placement chose it.
    pub score: Option<f64>,
    /// Ready nodes the decision considered (the answering node included).
    pub nodes_considered: usize,
    /// Nodes that passed every check and were scored.
    pub nodes_scored: usize,
    /// Nodes filtered out, counted by reason (`too-small:memory`, `avoided`, ...).
    pub filtered: std::collections::BTreeMap<String, usize>,
    /// Filtered nodes with their reason (at most a few).
    pub examples: Vec<FilteredNode>,
    /// Soft rules the placement breaks.
    pub soft_violations: Vec<String>,
    /// Chosen nodes that refused or could not be reached before the VM landed, and why.
    pub refused: Vec<FilteredNode>,
    /// Wall time of the placement decisions, milliseconds (creation not included).
    pub decision_ms: f64,
    /// The committed decision behind it, when the cluster runs consensus.
    #[serde(default)]
    pub agreed: Option<AgreedView>,
    /// One line for humans.
    pub summary: String,
}

/// A placement's committed decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgreedView {
    /// Its decision sequence number (`seq * 1024 + index in the batch`).
    pub decision_seq: u64,
    /// Size of its commit certificate, bytes.
    pub certificate_bytes: usize,
    /// From submission to commit, milliseconds.
    pub commit_ms: f64,
}

/// `POST /v1/placement/vms` answer: the VM (same fields as [`VmView`]) plus `placement`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacedVm {
    /// The VM as its host reports it.
    #[serde(flatten)]
    pub vm: VmView,
    /// Where it went and why.
    pub placement: PlacementExplanation,
}

/// Shares of constraint checks by kind (`placement solver-stats`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ConstraintKindShare {
    /// Capacity and VM-count checks.
    pub resource: f64,
    /// GPU model, region, latency and host-rule checks.
    pub eligibility: f64,
    /// Anti-affinity checks.
    pub anti_affinity: f64,
}

/// Statistics of the last placement solve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SolverStatsView {
    /// Which solver ran (`online`).
    pub solver: String,
    /// Wall time of the solve measured by the node, milliseconds.
    pub elapsed_ms: f64,
    /// Nodes holding VMs after the decision (as reported plus the new VM).
    pub hosts_used: usize,
    /// Lower bound on the nodes the cluster's allocated demand needs (fractional).
    pub lower_bound: f64,
    /// `(hosts_used - lower_bound) / hosts_used`: how far from optimal at most.
    pub optimality_gap: f64,
    /// Share of evaluations that were constraint checks (the rest are scores); counts, not
    /// time.
    pub constraint_eval_share: f64,
    /// Constraint checks by kind.
    pub constraint_kind_share: ConstraintKindShare,
    /// Constraint checks plus scores evaluated.
    pub evaluations: u64,
}

/// Solver settings (`placement set-solver`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SolverSettingsView {
    /// Time budget of a re-plan, milliseconds (none: unbounded).
    pub max_time_ms: Option<u64>,
    /// Re-plans stop once `lower_bound / hosts_used` reaches this.
    pub target_optimality: f64,
}

/// `GET /v1/placement/stats` (`placement solver-stats`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacementStats {
    /// Placement decisions that chose a node.
    pub decisions: u64,
    /// Decisions that found no node.
    pub rejections: u64,
    /// VM creates forwarded to another node.
    pub forwarded: u64,
    /// Forwarded creates the chosen node refused or could not be asked.
    pub forward_failures: u64,
    /// Mean decision time, milliseconds.
    pub mean_decision_ms: f64,
    /// Largest decision time, milliseconds.
    pub max_decision_ms: f64,
    /// The last decision's statistics.
    pub last: Option<SolverStatsView>,
    /// Current solver settings.
    pub settings: SolverSettingsView,
}

/// One constraint (`placement list-constraints`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConstraintView {
    /// Identifier (`builtin:max-vms-per-node`, `avoid:<node>`, or a rule id).
    pub id: String,
    /// `builtin`, `avoid`, `affinity` or `anti-affinity`.
    pub kind: String,
    /// Hard (never broken) or soft (broken only when nothing else fits).
    pub hard: bool,
    /// What it says.
    pub description: String,
}

/// Hard or soft avoidance of a node (`placement avoid-node --mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AvoidMode {
    /// Never placed on until the avoidance expires.
    Hard,
    /// Placed on only when no other node can take the VM.
    Soft,
}

/// `POST /v1/placement/avoid` (`placement avoid-node`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AvoidNodeRequest {
    /// Node id, peer id or unique hex prefix.
    pub node: String,
    /// For how long, milliseconds (1 ms to 30 days).
    pub duration_ms: u64,
    /// Hard or soft (default hard).
    #[serde(default = "default_avoid_mode")]
    pub mode: AvoidMode,
}

fn default_avoid_mode() -> AvoidMode {
    AvoidMode::Hard
}

/// An avoided node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AvoidView {
    /// The node.
    pub node: NodeId,
    /// Hard or soft.
    pub mode: AvoidMode,
    /// Milliseconds until it ends.
    pub remaining_ms: u64,
}

/// `POST /v1/placement/solver` (`placement set-solver`): fields left out keep their value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetSolverRequest {
    /// Re-plan time budget, milliseconds (positive).
    #[serde(default)]
    pub max_time_ms: Option<u64>,
    /// Target optimality in (0, 1].
    #[serde(default)]
    pub target_optimality: Option<f64>,
}

/// Which way a transfer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// This node sends.
    Send,
    /// This node receives.
    Receive,
}

/// One stream of a running send, for `amst status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamView {
    /// Stream number.
    pub id: u32,
    /// Estimated delivery rate, Mbit/s.
    pub rate_mbps: f64,
    /// Bytes in flight.
    pub in_flight: u64,
}

/// A transfer, running or finished, as `amst status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransferView {
    /// Transfer id (hex).
    pub id: String,
    /// Send or receive.
    pub direction: Direction,
    /// The other node.
    pub peer: NodeId,
    /// `speedtest`, ...
    pub purpose: String,
    /// `running`, `done`, `failed`, `corrupt`.
    pub state: String,
    /// Payload bytes (acknowledged for a send, delivered for a receive).
    pub bytes: u64,
    /// Seconds since it started (or that it took).
    pub seconds: f64,
    /// Average goodput, Mbit/s.
    pub mbps: f64,
    /// Streams now (sends only).
    pub streams_active: usize,
    /// Streams the controller wants (sends only).
    pub streams_target: usize,
    /// Per-stream figures (running sends only).
    pub streams: Vec<StreamView>,
    /// Largest relative deviation of a stream's rate from the mean (running sends with two
    /// or more streams); the manual flags more than 0.2.
    pub imbalance: Option<f64>,
    /// Chunks sent twice.
    pub resent_chunks: u64,
    /// Why it failed.
    pub error: Option<String>,
}

/// `GET /v1/amst/status[?node=<id>]`: a node's AMST transfers (also the control service's
/// answer to `ControlRequest::AmstStatus`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AmstStatus {
    /// This node.
    pub node: NodeId,
    /// Where the AMST listener is bound.
    pub listen: String,
    /// The congestion controller set on stream sockets (`system`: left at the OS default).
    pub congestion_control: String,
    /// Stream bounds.
    pub streams_min: usize,
    /// Stream bounds.
    pub streams_max: usize,
    /// Streams a new transfer starts with (the configured default or `set-streams`).
    pub streams_default: usize,
    /// Running transfers.
    pub active: Vec<TransferView>,
    /// The most recent finished transfers, newest first.
    pub recent: Vec<TransferView>,
}
