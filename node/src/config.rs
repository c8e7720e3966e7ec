//! `node.yaml`: the node's configuration, in the layout of the operations manual (section 3.2)
//! without its controller parts.
//!
//! Every field has a default, unknown keys are rejected with the key's name and position, and
//! [`NodeConfig::validate`] checks what serde cannot (addresses parse, shares fit the host).
//!
//! ```yaml
//! cluster:
//!   id: dwcp-local                 # nodes of other clusters are ignored
//!   bootstrap:                     # bootstrap peers, each ending in /p2p/<peer id>
//!     - /ip4/127.0.0.1/tcp/7000/p2p/12D3KooW...
//! node:
//!   region: local
//!   data_dir: /var/lib/dwcp        # identity, sled database, VM images
//!   resources: { cpu: 8, memory_mib: 16384, disk_gib: 200, gpu: { enabled: false } }
//!   donated:   { cpu_percent: 50, memory_percent: 50, disk_percent: 50, uplink_mbps: 0 }
//! network:
//!   listen: [/ip4/0.0.0.0/tcp/7070, /ip4/0.0.0.0/udp/7070/quic-v1]
//!   target_peers: 8
//!   heartbeat_interval: 2s
//!   unreachable_after: 10s
//! api:
//!   rest: { bind: 127.0.0.1:8080 }
//! monitoring:
//!   prometheus: { enabled: true, bind: 127.0.0.1:8084 }
//!   log: { level: info, format: text }
//! ass:                             # state sync (manual 2.2.4)
//!   gossip: { fanout: 6, interval: 1s }
//!   consistency: { max_staleness: 10s }  # our heartbeat is written into the document this often
//!   persist_interval: 5s
//!   compaction: { after_changes: 50000, departed_after: 24h, check_interval: 30s }  # 0: manual only
//! placement:                      # ITP (manual 2.2.5)
//!   constraints: { max_vms_per_node: 100, min_free_memory_percent: 10 }
//!   solver: { target_optimality: 1.0 }  # max_time: 5s bounds re-plans
//! pba:                             # bandwidth forecasts (manual 2.2.3)
//!   model: { path: "", prediction_horizon: 30s }  # empty path: retrained, installed or source model
//!   samples: { max_links: 64, max_mib_per_link: 4, segment_kib: 256 }
//!   training: { min_samples: 10000, epochs: 12, python: python3, timeout: 4h }
//!   accuracy_threshold: 0.70
//! acp:                             # agreement (manual 2.2.6)
//!   committee: [<node id>, ...]    # genesis committee, 3f+1 ids, same on every node; empty: off
//!   pbft: { checkpoint_interval: 100, view_change_timeout: 10s, catch_up_mib: 64 }
//!   epochs:                        # committee reconfiguration; a consensus rule: same everywhere
//!     { length: 1000, size: 0, min_uptime: 10m, min_reputation: 0.5, ready_ttl: 5m, serve: true,
//!       transfer_page_links: 1024 }
//! transport:
//!   amst:                          # multi-stream bulk transfers (manual 2.2.1)
//!     listen: 0.0.0.0:0            # port 0: any free port; behind NAT pick one and open it
//!     streams: { min: 4, max: 16, default: 8 }
//!     congestion_control: auto     # auto (bbr where offered) | system | bbr | cubic | ...
//!     reordering_buffer: 16MB
//!     timeout: 30s
//!     max_incoming: 8
//! hypervisor:
//!   enabled: true
//!   accel: auto                    # auto | kvm | tcg
//!   qemu_path: qemu-system-x86_64
//!   qemu_img_path: qemu-img
//!   cpu_model: qemu64
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Cluster membership.
    pub cluster: ClusterSection,
    /// This node.
    pub node: NodeSection,
    /// libp2p networking.
    pub network: NetworkSection,
    /// Local HTTP API.
    pub api: ApiSection,
    /// Metrics and logs.
    pub monitoring: MonitoringSection,
    /// The hypervisor that runs lent VMs.
    pub hypervisor: HypervisorSection,
    /// State sync of the cluster document.
    pub ass: AssSection,
    /// Agreement: PBFT committee and reputation.
    pub acp: AcpSection,
    /// VM placement (ITP, manual section 2.2.5).
    pub placement: PlacementSection,
    /// Bandwidth forecasts (PBA, manual section 2.2.3).
    pub pba: PbaSection,
    /// Bulk transfers (AMST, manual sections 2.2.1 and 3.2).
    pub transport: TransportSection,
}

/// `transport:` (manual section 3.2).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportSection {
    /// Multi-stream transfers.
    pub amst: AmstSection,
}

/// `transport.amst:` (manual section 2.2.1): multi-stream bulk transfers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmstSection {
    /// TCP address of the AMST listener. Port 0 picks a free port (peers learn it from each
    /// transfer offer); behind NAT or a firewall, choose a fixed port and open it.
    pub listen: SocketAddr,
    /// Stream bounds.
    pub streams: AmstStreams,
    /// `TCP_CONGESTION` of every stream's socket: `auto` (BBR where the host offers it,
    /// else the system default), `system`, or a controller name (`bbr`, `cubic`, ...). A
    /// controller the host does not offer (the manual's `bbr2` on a mainline kernel) falls
    /// back to `auto` with a warning.
    pub congestion_control: String,
    /// Receiver reorder buffer and sender window, e.g. `16MB` (binary units: 16 MiB).
    pub reordering_buffer: ByteSize,
    /// A transfer with no working stream for this long fails.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Incoming transfers accepted at once.
    pub max_incoming: usize,
}

impl Default for AmstSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            streams: AmstStreams::default(),
            congestion_control: "auto".into(),
            reordering_buffer: ByteSize(16 << 20),
            timeout: Duration::from_secs(30),
            max_incoming: 8,
        }
    }
}

/// `transport.amst.streams:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmstStreams {
    /// Fewest streams.
    pub min: usize,
    /// Most streams.
    pub max: usize,
    /// Streams at the start of a transfer.
    pub default: usize,
}

impl Default for AmstStreams {
    fn default() -> Self {
        Self {
            min: 4,
            max: 16,
            default: 8,
        }
    }
}

/// A byte count written as a number of bytes or with a unit: `16MB`, `16 MiB`, `512KB`,
/// `1G`. Units are binary (K = 1024), as the manual's sizes mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `16MB`, `16MiB`, `16 M`, `4096`.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .with_context(|| format!("`{s}` is not a size (e.g. 16MB)"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            other => bail!("`{s}`: unknown size unit `{other}` (use B, KB, MB or GB)"),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .with_context(|| format!("`{s}` is too large"))
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
            write!(f, "{}GB", b >> 30)
        } else if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
            write!(f, "{}MB", b >> 20)
        } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
            write!(f, "{}KB", b >> 10)
        } else {
            write!(f, "{b}")
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// `placement:` (manual sections 2.2.5 and 3.2): how this node places the VMs it is asked to
/// create. The manual's `algorithm: genetic` is not a setting here: online placement uses
/// the ITP engine's best-fit-with-scores placer (see `node/placement`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementSection {
    /// Limits every host keeps (manual `itp.constraints`).
    pub constraints: PlacementConstraints,
    /// Solver settings (`dwcp-cli placement set-solver` changes them at run time).
    pub solver: PlacementSolver,
}

/// `placement.constraints:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementConstraints {
    /// At most this many VMs per node (manual: 100).
    pub max_vms_per_node: u32,
    /// Percent of a node's donated memory kept free by placement (manual: 10 %).
    pub min_free_memory_percent: u8,
}

impl Default for PlacementConstraints {
    fn default() -> Self {
        Self {
            max_vms_per_node: 100,
            min_free_memory_percent: 10,
        }
    }
}

/// `placement.solver:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementSolver {
    /// Time budget of a re-plan (unbounded when absent).
    #[serde(with = "humantime_serde")]
    pub max_time: Option<Duration>,
    /// Re-plans stop improving once `lower bound / hosts used` reaches this, in (0, 1].
    pub target_optimality: f64,
}

impl Default for PlacementSolver {
    fn default() -> Self {
        Self {
            max_time: None,
            target_optimality: 1.0,
        }
    }
}

/// `pba:` (manual section 2.2.3): link forecasts, the recorded samples and retraining. The
/// manual's `model.type`, `layers` and `sequence_length` describe the model file, not
/// settings: the shipped model's shape is in `models/MODEL_CARD.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PbaSection {
    /// Run PBA at all.
    pub enabled: bool,
    /// The model.
    pub model: PbaModel,
    /// The on-disk sample series (`<data_dir>/pba/links/<peer>/`).
    pub samples: PbaSamples,
    /// `dwcp-cli pba retrain`.
    pub training: PbaTraining,
    /// `pba metrics` flags accuracy below this (manual: 0.70).
    pub accuracy_threshold: f64,
}

impl Default for PbaSection {
    fn default() -> Self {
        Self {
            enabled: true,
            model: PbaModel::default(),
            samples: PbaSamples::default(),
            training: PbaTraining::default(),
            accuracy_threshold: 0.70,
        }
    }
}

/// `pba.model:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PbaModel {
    /// ONNX model file. Empty: a model retrained on this node
    /// (`<data_dir>/pba/model/pba_lstm.onnx`), else the installed one
    /// (`/usr/share/dwcp/models/pba_lstm.onnx`), else `models/pba_lstm.onnx` of the source
    /// tree the binary was built from. No model (or a node built without the `onnx`
    /// feature): forecasts come from the best baseline, and `pba metrics` says so.
    pub path: PathBuf,
    /// The horizon placement reads (30s, 60s, 120s or 300s); every horizon is forecast.
    #[serde(with = "humantime_serde")]
    pub prediction_horizon: Duration,
}

impl Default for PbaModel {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            prediction_horizon: Duration::from_secs(30),
        }
    }
}

/// `pba.samples:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PbaSamples {
    /// Links tracked (and sample directories kept); the least recently heard goes first.
    pub max_links: usize,
    /// Sample files per link are trimmed to this many MiB (about 25,000 samples per MiB).
    pub max_mib_per_link: u64,
    /// One sample file is closed at this many KiB.
    pub segment_kib: u64,
}

impl Default for PbaSamples {
    fn default() -> Self {
        Self {
            max_links: 64,
            max_mib_per_link: 4,
            segment_kib: 256,
        }
    }
}

/// `pba.training:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PbaTraining {
    /// A retrain needs at least this many recorded bandwidth samples (manual: 10000).
    pub min_samples: u64,
    /// Training epochs.
    pub epochs: u32,
    /// Python interpreter with the packages of `models/requirements.txt`.
    pub python: PathBuf,
    /// The `models/` directory (holding `pba/train.py`). Empty: the source tree's, else
    /// `/usr/share/dwcp/models`.
    pub models_dir: PathBuf,
    /// The public traces (holding `derived_5s/`). Empty: `$DWCP_TRACES`, else
    /// `<models_dir>/../../shared/data/traces`.
    pub traces_dir: PathBuf,
    /// A training run taking longer is stopped.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for PbaTraining {
    fn default() -> Self {
        Self {
            min_samples: 10_000,
            epochs: 12,
            python: "python3".into(),
            models_dir: PathBuf::new(),
            traces_dir: PathBuf::new(),
            timeout: Duration::from_secs(4 * 3600),
        }
    }
}

/// `acp:` (manual section 2.2.6): PBFT and reputation. The manual's `mode`/`raft` keys belong
/// to its controller design and are not accepted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcpSection {
    /// The genesis committee: node ids (hex), 3f+1 of them, the same list on every node.
    /// Empty: consensus is off on this node.
    pub committee: Vec<String>,
    /// PBFT parameters.
    pub pbft: PbftSection,
    /// Committee epochs.
    pub epochs: EpochsSection,
    /// Testnet fault injection, only in builds with the `byzantine` feature: `equivocate`
    /// makes this replica sign a second, conflicting vote for every vote it casts and send it
    /// to the other members (so honest replicas hold proof of its equivocation);
    /// `forge-snapshot` makes this node answer state-transfer requests with a snapshot whose
    /// replicated state quarantines all but one member of its committee (the links and the
    /// hand-over stay true, so only the state digest check catches it), and serve no commit
    /// certificates to nodes outside the committee, so that they cannot replay around it.
    #[cfg(feature = "byzantine")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub byzantine: Option<String>,
}

/// The values `acp.byzantine` accepts (feature `byzantine`).
#[cfg(feature = "byzantine")]
pub const BYZANTINE_STRATEGIES: [&str; 2] = ["equivocate", "forge-snapshot"];

/// `acp.epochs:` when and from whom the committee is chosen again. Every node must have the
/// same values (like `acp.committee`): they decide which committee a decision needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EpochsSection {
    /// Decisions (sequence numbers) per epoch, a multiple of `pbft.checkpoint_interval`; at
    /// the end of each the next committee is computed from committed state. 0: the genesis
    /// committee serves forever.
    pub length: u64,
    /// Committee size: the largest 3f+1 not above it and not above the eligible nodes.
    /// 0: the genesis committee's size.
    pub size: usize,
    /// How long since its committed join a node must be a member before it may serve.
    #[serde(with = "humantime_serde")]
    pub min_uptime: Duration,
    /// Lowest reputation score that may serve.
    pub min_reputation: f64,
    /// A node is chosen only if it declared itself ready within this; nodes renew their
    /// readiness every third of it, so a node that went away stops being chosen. Short, since
    /// a committee with more than f members gone stops deciding until they return (at 1,000
    /// nodes the renewals are about 10 small requests a second, batched).
    #[serde(with = "humantime_serde")]
    pub ready_ttl: Duration,
    /// Whether this node offers to serve on committees (a volunteer may lend capacity
    /// without voting). Local: it decides what this node declares, not a consensus rule.
    pub serve: bool,
    /// Most epoch links this node puts in one state-transfer reply (also bounded by the
    /// 8 MiB frame). A node further behind gets the chain in pages, verifies each and asks
    /// again from the committee it reached. 1 to 4096.
    pub transfer_page_links: usize,
}

impl Default for EpochsSection {
    fn default() -> Self {
        Self {
            length: 1000,
            size: 0,
            min_uptime: Duration::from_secs(600),
            min_reputation: 0.5,
            ready_ttl: Duration::from_secs(300),
            serve: true,
            transfer_page_links: 1024,
        }
    }
}

/// `acp.pbft:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PbftSection {
    /// A checkpoint every this many sequence numbers.
    pub checkpoint_interval: u64,
    /// View-change timeout (doubles per failed view change).
    #[serde(with = "humantime_serde")]
    pub view_change_timeout: Duration,
    /// MiB of commit certificates a replica keeps to catch up others: a replica that missed
    /// more decisions than its peers keep cannot replay them; with epochs it installs a
    /// certified snapshot instead (state transfer), without epochs it stays behind.
    pub catch_up_mib: usize,
}

impl Default for PbftSection {
    fn default() -> Self {
        Self {
            checkpoint_interval: 100,
            view_change_timeout: Duration::from_secs(10),
            catch_up_mib: 64,
        }
    }
}

/// `ass:` (manual section 2.2.4): the Automerge cluster document and its sync.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AssSection {
    /// Anti-entropy.
    pub gossip: AssGossip,
    /// Staleness bounds.
    pub consistency: AssConsistency,
    /// How often the document is saved to sled when it changed (and always at shutdown).
    #[serde(with = "humantime_serde")]
    pub persist_interval: Duration,
    /// When the document is compacted at a committed cut.
    pub compaction: AssCompaction,
}

impl Default for AssSection {
    fn default() -> Self {
        Self {
            gossip: AssGossip::default(),
            consistency: AssConsistency::default(),
            persist_interval: Duration::from_secs(5),
            compaction: AssCompaction::default(),
        }
    }
}

/// `ass.compaction:` when a committee member proposes a compaction cut, and what it drops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AssCompaction {
    /// Propose a cut once the history since the last one holds this many changes (0: only
    /// when an operator runs `dwcp-cli state-sync compact`).
    pub after_changes: usize,
    /// Node entries whose last heartbeat is older than this at the cut are dropped.
    #[serde(with = "humantime_serde")]
    pub departed_after: Duration,
    /// How often the history length is checked.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
}

impl Default for AssCompaction {
    fn default() -> Self {
        Self {
            after_changes: 50_000,
            departed_after: Duration::from_secs(24 * 3600),
            check_interval: Duration::from_secs(30),
        }
    }
}

/// `ass.gossip:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AssGossip {
    /// Peers contacted per anti-entropy round.
    pub fanout: usize,
    /// Anti-entropy interval.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for AssGossip {
    fn default() -> Self {
        Self {
            fanout: 6,
            interval: Duration::from_secs(1),
        }
    }
}

/// `ass.consistency:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AssConsistency {
    /// The node writes its heartbeat into the document at least this often (and at once when
    /// its health status changes), so peers' views of it are never older than this plus the
    /// sync delay. Liveness itself travels in gossip heartbeats.
    #[serde(with = "humantime_serde")]
    pub max_staleness: Duration,
}

impl Default for AssConsistency {
    fn default() -> Self {
        Self {
            max_staleness: Duration::from_secs(10),
        }
    }
}

/// `hypervisor:` (manual section 3.2.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HypervisorSection {
    /// Lend VM capacity at all. A node without QEMU still takes part in the mesh.
    pub enabled: bool,
    /// `kvm` (KVM or fail), `tcg` (software emulation, no probe) or `auto` (probe KVM with a
    /// real guest at start, fall back to TCG).
    pub accel: AccelSetting,
    /// QEMU system emulator.
    pub qemu_path: PathBuf,
    /// `qemu-img`.
    pub qemu_img_path: PathBuf,
    /// Guest CPU model, the same on every host so guests can migrate (see dwcp-hypervisor).
    pub cpu_model: String,
}

impl Default for HypervisorSection {
    fn default() -> Self {
        Self {
            enabled: true,
            accel: AccelSetting::Auto,
            qemu_path: "qemu-system-x86_64".into(),
            qemu_img_path: "qemu-img".into(),
            cpu_model: "qemu64".into(),
        }
    }
}

/// `hypervisor.accel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AccelSetting {
    /// Probe KVM, fall back to TCG.
    Auto,
    /// KVM or fail.
    Kvm,
    /// TCG only.
    Tcg,
}

/// `cluster:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// Cluster id; nodes only talk to nodes of the same cluster.
    pub id: String,
    /// Bootstrap peers' multiaddrs, each ending in `/p2p/<peer id>`.
    pub bootstrap: Vec<String>,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            id: "dwcp-local".into(),
            bootstrap: Vec::new(),
        }
    }
}

/// `node:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// Region, e.g. `eu-west-1`.
    pub region: String,
    /// Where identity, database and images live. Empty means the platform default.
    pub data_dir: PathBuf,
    /// The host's resources (`auto` values are detected at start).
    pub resources: ResourcesSection,
    /// The share of them lent to the cluster.
    pub donated: DonatedSection,
}

impl Default for NodeSection {
    fn default() -> Self {
        Self {
            region: "local".into(),
            data_dir: PathBuf::new(),
            resources: ResourcesSection::default(),
            donated: DonatedSection::default(),
        }
    }
}

/// `node.resources:` (zero means detect).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourcesSection {
    /// vCPUs; 0 = number of logical CPUs.
    pub cpu: u32,
    /// Memory in MiB; 0 = physical memory.
    pub memory_mib: u64,
    /// Disk in GiB; 0 = free space of the data dir's filesystem.
    pub disk_gib: u64,
    /// GPUs.
    pub gpu: GpuSection,
}

/// `node.resources.gpu:`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuSection {
    /// Whether GPUs are offered.
    pub enabled: bool,
    /// Model, e.g. `nvidia-a100`.
    #[serde(rename = "type")]
    pub model: String,
    /// How many.
    pub count: u32,
}

/// `node.donated:` the share lent, in percent of the resources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DonatedSection {
    /// Percent of vCPUs.
    pub cpu_percent: u8,
    /// Percent of memory.
    pub memory_percent: u8,
    /// Percent of disk.
    pub disk_percent: u8,
    /// Upload cap in Mbit/s, 0 for none.
    pub uplink_mbps: u32,
}

impl Default for DonatedSection {
    fn default() -> Self {
        Self {
            cpu_percent: 50,
            memory_percent: 50,
            disk_percent: 50,
            uplink_mbps: 0,
        }
    }
}

/// `network:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// Listen multiaddrs.
    pub listen: Vec<String>,
    /// Connections to keep.
    pub target_peers: usize,
    /// Hard cap on connections.
    pub max_connections: u32,
    /// How often to publish a heartbeat.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A peer silent for this long is `unreachable`.
    #[serde(with = "humantime_serde")]
    pub unreachable_after: Duration,
    /// How often to re-publish the announcement.
    #[serde(with = "humantime_serde")]
    pub announce_interval: Duration,
}

impl Default for NetworkSection {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/0.0.0.0/tcp/7070".into(),
                "/ip4/0.0.0.0/udp/7070/quic-v1".into(),
            ],
            target_peers: 8,
            max_connections: 128,
            heartbeat_interval: Duration::from_secs(2),
            unreachable_after: Duration::from_secs(10),
            announce_interval: Duration::from_secs(30),
        }
    }
}

/// `api:`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// REST API.
    pub rest: RestSection,
}

/// `api.rest:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestSection {
    /// Bind address; keep it on loopback (the API has no authentication).
    pub bind: SocketAddr,
}

impl Default for RestSection {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
        }
    }
}

/// `monitoring:`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitoringSection {
    /// Prometheus endpoint.
    pub prometheus: PrometheusSection,
    /// Logging.
    pub log: LogSection,
}

/// `monitoring.prometheus:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusSection {
    /// Serve `/metrics`.
    pub enabled: bool,
    /// Bind address.
    pub bind: SocketAddr,
}

impl Default for PrometheusSection {
    fn default() -> Self {
        Self {
            enabled: true,
            bind: SocketAddr::from(([127, 0, 0, 1], 8084)),
        }
    }
}

/// `monitoring.log:`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `tracing` filter, e.g. `info` or `dwcp=debug,libp2p=info`.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where files go by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// The config file.
    pub config: PathBuf,
    /// The data directory.
    pub data_dir: PathBuf,
}

impl Paths {
    /// `/etc/dwcp/node.yaml` and `/var/lib/dwcp` for the system service.
    pub fn system() -> Self {
        Self {
            config: "/etc/dwcp/node.yaml".into(),
            data_dir: "/var/lib/dwcp".into(),
        }
    }

    /// The desktop user's platform directories (XDG on Linux).
    pub fn user() -> anyhow::Result<Self> {
        let dirs = directories::ProjectDirs::from("org", "dwcp", "dwcp")
            .context("no home directory to put the configuration in")?;
        Ok(Self {
            config: dirs.config_dir().join("node.yaml"),
            data_dir: dirs.data_dir().to_path_buf(),
        })
    }

    /// System paths when running as root, the user's otherwise.
    pub fn default_for_user() -> anyhow::Result<Self> {
        if nix::unistd::geteuid().is_root() {
            Ok(Self::system())
        } else {
            Self::user()
        }
    }
}

impl NodeConfig {
    /// Parses YAML text; errors name the offending key and its line.
    pub fn from_yaml(text: &str) -> anyhow::Result<Self> {
        let cfg: Self = serde_yaml_ng::from_str(text)?;
        Ok(cfg)
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let cfg =
            Self::from_yaml(&text).with_context(|| format!("in config {}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("in config {}", path.display()))
    }

    /// The YAML text of this config.
    pub fn to_yaml(&self) -> anyhow::Result<String> {
        Ok(serde_yaml_ng::to_string(self)?)
    }

    /// Checks what serde cannot.
    pub fn validate(self) -> anyhow::Result<Self> {
        if self.cluster.id.is_empty() || self.cluster.id.len() > 64 {
            bail!("cluster.id must be 1 to 64 characters");
        }
        if !self
            .cluster
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("cluster.id may only hold letters, digits, '-' and '_'");
        }
        for a in &self.cluster.bootstrap {
            let m: libp2p::Multiaddr = a
                .parse()
                .with_context(|| format!("cluster.bootstrap: `{a}` is not a multiaddr"))?;
            if !matches!(m.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
                bail!("cluster.bootstrap: `{a}` must end with /p2p/<peer id>");
            }
        }
        for a in &self.network.listen {
            a.parse::<libp2p::Multiaddr>()
                .with_context(|| format!("network.listen: `{a}` is not a multiaddr"))?;
        }
        let d = &self.node.donated;
        for (name, v) in [
            ("cpu", d.cpu_percent),
            ("memory", d.memory_percent),
            ("disk", d.disk_percent),
        ] {
            if v > 100 {
                bail!("node.donated.{name}_percent must be at most 100, got {v}");
            }
        }
        if self.node.region.is_empty() || self.node.region.len() > 64 {
            bail!("node.region must be 1 to 64 characters");
        }
        if self.network.heartbeat_interval.is_zero() {
            bail!("network.heartbeat_interval must be positive");
        }
        if self.network.unreachable_after <= self.network.heartbeat_interval {
            bail!(
                "network.unreachable_after ({:?}) must be longer than network.heartbeat_interval ({:?})",
                self.network.unreachable_after,
                self.network.heartbeat_interval
            );
        }
        if self.network.target_peers == 0 {
            bail!("network.target_peers must be at least 1");
        }
        let a = &self.ass;
        if a.gossip.fanout == 0 || a.gossip.fanout > 64 {
            bail!("ass.gossip.fanout must be 1 to 64, got {}", a.gossip.fanout);
        }
        if a.gossip.interval < Duration::from_millis(50) {
            bail!("ass.gossip.interval must be at least 50ms");
        }
        if a.consistency.max_staleness < a.gossip.interval {
            bail!("ass.consistency.max_staleness must be at least ass.gossip.interval");
        }
        if a.compaction.check_interval.is_zero() {
            bail!("ass.compaction.check_interval must be positive");
        }
        if a.persist_interval.is_zero() {
            bail!("ass.persist_interval must be positive");
        }
        let t = &self.transport.amst;
        if !(1 <= t.streams.min
            && t.streams.min <= t.streams.default
            && t.streams.default <= t.streams.max
            && t.streams.max <= 64)
        {
            bail!(
                "transport.amst.streams must satisfy 1 <= min ({}) <= default ({}) <= max ({}) <= 64",
                t.streams.min,
                t.streams.default,
                t.streams.max
            );
        }
        if !((1 << 20)..=(1 << 30)).contains(&t.reordering_buffer.0) {
            bail!(
                "transport.amst.reordering_buffer must be 1MB to 1GB, got {}",
                t.reordering_buffer
            );
        }
        if t.timeout < Duration::from_secs(1) {
            bail!("transport.amst.timeout must be at least 1s");
        }
        if t.max_incoming == 0 || t.max_incoming > 256 {
            bail!(
                "transport.amst.max_incoming must be 1 to 256, got {}",
                t.max_incoming
            );
        }
        if t.congestion_control.is_empty()
            || t.congestion_control.len() > 15
            || !t
                .congestion_control
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            bail!(
                "transport.amst.congestion_control `{}` is not a controller name (auto, system, bbr, cubic, ...)",
                t.congestion_control
            );
        }
        let p = &self.acp.pbft;
        if p.checkpoint_interval == 0 {
            bail!("acp.pbft.checkpoint_interval must be positive");
        }
        if p.view_change_timeout < Duration::from_millis(100) {
            bail!("acp.pbft.view_change_timeout must be at least 100ms");
        }
        if p.catch_up_mib == 0 || p.catch_up_mib > 4096 {
            bail!("acp.pbft.catch_up_mib must be 1 to 4096");
        }
        let e = &self.acp.epochs;
        if !e.length.is_multiple_of(p.checkpoint_interval) {
            bail!(
                "acp.epochs.length ({}) must be a multiple of acp.pbft.checkpoint_interval ({})",
                e.length,
                p.checkpoint_interval
            );
        }
        if e.size > dwcp_consensus::messages::MAX_VOTES {
            bail!(
                "acp.epochs.size must be at most {}",
                dwcp_consensus::messages::MAX_VOTES
            );
        }
        if !(0.0..=1.0).contains(&e.min_reputation) {
            bail!("acp.epochs.min_reputation must be between 0 and 1");
        }
        if e.ready_ttl < Duration::from_secs(3) {
            bail!("acp.epochs.ready_ttl must be at least 3s");
        }
        if !(1..=dwcp_consensus::transfer::MAX_LINKS).contains(&e.transfer_page_links) {
            bail!(
                "acp.epochs.transfer_page_links must be 1 to {}",
                dwcp_consensus::transfer::MAX_LINKS
            );
        }
        #[cfg(feature = "byzantine")]
        if let Some(b) = &self.acp.byzantine
            && !BYZANTINE_STRATEGIES.contains(&b.as_str())
        {
            bail!(
                "acp.byzantine: unknown strategy `{b}` (known: {})",
                BYZANTINE_STRATEGIES.join(", ")
            );
        }
        for id in &self.acp.committee {
            id.parse::<dwcp_protocol::NodeId>()
                .map_err(|e| anyhow::anyhow!("acp.committee: `{id}` is not a node id: {e}"))?;
        }
        let p = &self.placement;
        if p.constraints.max_vms_per_node == 0 || p.constraints.max_vms_per_node > 10_000 {
            bail!(
                "placement.constraints.max_vms_per_node must be 1 to 10000, got {}",
                p.constraints.max_vms_per_node
            );
        }
        if p.constraints.min_free_memory_percent > 90 {
            bail!(
                "placement.constraints.min_free_memory_percent must be at most 90, got {}",
                p.constraints.min_free_memory_percent
            );
        }
        if !(p.solver.target_optimality > 0.0 && p.solver.target_optimality <= 1.0) {
            bail!(
                "placement.solver.target_optimality must be in (0, 1], got {}",
                p.solver.target_optimality
            );
        }
        if p.solver.max_time.is_some_and(|d| d.is_zero()) {
            bail!("placement.solver.max_time must be positive");
        }
        let b = &self.pba;
        if ![30, 60, 120, 300].contains(&b.model.prediction_horizon.as_secs())
            || b.model.prediction_horizon.subsec_nanos() != 0
        {
            bail!(
                "pba.model.prediction_horizon must be 30s, 60s, 120s or 300s, got {:?}",
                b.model.prediction_horizon
            );
        }
        if b.samples.max_links == 0 || b.samples.max_links > 4096 {
            bail!("pba.samples.max_links must be 1 to 4096");
        }
        if b.samples.segment_kib == 0 || b.samples.segment_kib > 64 * 1024 {
            bail!("pba.samples.segment_kib must be 1 to 65536");
        }
        if b.samples.max_mib_per_link.saturating_mul(1024) < 2 * b.samples.segment_kib {
            bail!("pba.samples.max_mib_per_link must hold two segments (segment_kib)");
        }
        if !(b.accuracy_threshold > 0.0 && b.accuracy_threshold <= 1.0) {
            bail!(
                "pba.accuracy_threshold must be in (0, 1], got {}",
                b.accuracy_threshold
            );
        }
        if b.training.min_samples < 100 {
            bail!("pba.training.min_samples must be at least 100");
        }
        if b.training.epochs == 0 || b.training.epochs > 1000 {
            bail!("pba.training.epochs must be 1 to 1000");
        }
        if b.training.timeout.is_zero() {
            bail!("pba.training.timeout must be positive");
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = NodeConfig::from_yaml("{}").unwrap().validate().unwrap();
        assert_eq!(c, NodeConfig::default());
    }

    #[test]
    fn round_trips_through_yaml() {
        let mut c = NodeConfig::default();
        c.cluster.id = "prod-1".into();
        c.network.unreachable_after = Duration::from_secs(7);
        let back = NodeConfig::from_yaml(&c.to_yaml().unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = NodeConfig::from_yaml("node:\n  regoin: x\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `regoin`"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn bad_values_are_explained() {
        let c = NodeConfig::from_yaml("cluster:\n  bootstrap: [/ip4/1.2.3.4/tcp/1]\n").unwrap();
        let err = format!("{:#}", c.validate().unwrap_err());
        assert!(err.contains("must end with /p2p/"), "{err}");
        let c = NodeConfig::from_yaml("node:\n  donated:\n    cpu_percent: 150\n").unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("cpu_percent")
        );
        let c =
            NodeConfig::from_yaml("network:\n  heartbeat_interval: 5s\n  unreachable_after: 2s\n")
                .unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("unreachable_after")
        );
        for (yaml, named) in [
            ("acp:\n  pbft:\n    catch_up_mib: 0\n", "catch_up_mib"),
            ("acp:\n  epochs:\n    length: 150\n", "acp.epochs.length"),
            (
                "acp:\n  epochs:\n    transfer_page_links: 0\n",
                "acp.epochs.transfer_page_links",
            ),
            ("acp:\n  epochs:\n    min_reputation: 2\n", "min_reputation"),
            ("acp:\n  epochs:\n    ready_ttl: 1s\n", "ready_ttl"),
            (
                "ass:\n  compaction:\n    check_interval: 0s\n",
                "compaction.check_interval",
            ),
        ] {
            let err = NodeConfig::from_yaml(yaml)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{yaml}: {err}");
        }
        #[cfg(feature = "byzantine")]
        {
            let err = NodeConfig::from_yaml("acp:\n  byzantine: lie-loudly\n")
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains("forge-snapshot"), "{err}");
            for s in BYZANTINE_STRATEGIES {
                let c = NodeConfig::from_yaml(&format!("acp:\n  byzantine: {s}\n")).unwrap();
                assert!(c.validate().is_ok(), "{s}");
            }
        }
        let c = NodeConfig::from_yaml(
            "acp:\n  pbft:\n    catch_up_mib: 16\nass:\n  compaction:\n    after_changes: 0\n    departed_after: 1h\n",
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(c.acp.pbft.catch_up_mib, 16);
        assert_eq!(c.ass.compaction.after_changes, 0);
        assert_eq!(
            c.ass.compaction.departed_after,
            std::time::Duration::from_secs(3600)
        );
    }

    #[test]
    fn transport_section_takes_the_manuals_layout() {
        // Manual section 3.2 plus 2.2.1's keys, as an operator would paste them.
        let c = NodeConfig::from_yaml(
            "transport:\n  amst:\n    streams:\n      min: 4\n      max: 16\n      default: 8\n    \
             congestion_control: bbr2\n    reordering_buffer: 16MB\n    timeout: 30s\n",
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(c.transport.amst.reordering_buffer, ByteSize(16 << 20));
        assert_eq!(c.transport.amst.congestion_control, "bbr2");
        assert_eq!(c.transport.amst.timeout, Duration::from_secs(30));
        for (text, bytes) in [
            ("4096", 4096),
            ("512KB", 512 << 10),
            ("2 GiB", 2 << 30),
            ("1m", 1 << 20),
        ] {
            assert_eq!(ByteSize::parse(text).unwrap(), ByteSize(bytes), "{text}");
        }
        assert!(
            ByteSize::parse("16XB")
                .unwrap_err()
                .to_string()
                .contains("unknown size unit")
        );
        assert!(ByteSize::parse("MB").is_err());
        assert!(ByteSize::parse("99999999999999999999GB").is_err());
        for (yaml, field) in [
            (
                "transport:\n  amst:\n    streams: { min: 9, default: 8 }\n",
                "transport.amst.streams",
            ),
            (
                "transport:\n  amst:\n    reordering_buffer: 1KB\n",
                "reordering_buffer",
            ),
            (
                "transport:\n  amst:\n    congestion_control: \"bbr; rm\"\n",
                "congestion_control",
            ),
            ("transport:\n  amst:\n    max_incoming: 0\n", "max_incoming"),
        ] {
            let err = NodeConfig::from_yaml(yaml)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{yaml}: {err}");
        }
    }

    #[test]
    fn placement_section_parses_and_bad_values_are_named() {
        let c = NodeConfig::from_yaml(
            "placement:\n  constraints: { max_vms_per_node: 80, min_free_memory_percent: 5 }\n  \
             solver: { max_time: 5s, target_optimality: 0.9 }\n",
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(c.placement.constraints.max_vms_per_node, 80);
        assert_eq!(c.placement.solver.max_time, Some(Duration::from_secs(5)));
        assert_eq!(
            NodeConfig::default()
                .placement
                .constraints
                .min_free_memory_percent,
            10
        );
        for (yaml, field) in [
            (
                "placement:\n  solver: { target_optimality: 1.5 }\n",
                "target_optimality",
            ),
            (
                "placement:\n  constraints: { max_vms_per_node: 0 }\n",
                "max_vms_per_node",
            ),
            (
                "placement:\n  constraints: { min_free_memory_percent: 95 }\n",
                "min_free_memory",
            ),
        ] {
            let e = NodeConfig::from_yaml(yaml).unwrap().validate().unwrap_err();
            assert!(e.to_string().contains(field), "{e}");
        }
    }

    #[test]
    fn pba_section_parses_and_bad_values_are_named() {
        let c = NodeConfig::from_yaml(
            "pba:\n  model: { path: /m.onnx, prediction_horizon: 2m }\n  \
             training: { min_samples: 500 }\n",
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(c.pba.model.prediction_horizon, Duration::from_secs(120));
        assert_eq!(c.pba.training.min_samples, 500);
        assert!(c.pba.enabled);
        for (yaml, field) in [
            (
                "pba:\n  model: { prediction_horizon: 45s }\n",
                "prediction_horizon",
            ),
            ("pba:\n  accuracy_threshold: 1.5\n", "accuracy_threshold"),
            (
                "pba:\n  samples: { max_mib_per_link: 0 }\n",
                "max_mib_per_link",
            ),
        ] {
            let e = NodeConfig::from_yaml(yaml).unwrap().validate().unwrap_err();
            assert!(e.to_string().contains(field), "{e}");
        }
        let e = NodeConfig::from_yaml("pba:\n  model: { layers: [128] }\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `layers`"), "{e}");
    }

    #[test]
    fn durations_are_human_readable() {
        let c = NodeConfig::from_yaml("network:\n  heartbeat_interval: 500ms\n").unwrap();
        assert_eq!(c.network.heartbeat_interval, Duration::from_millis(500));
    }
}
