//! The placement model: hosts, VMs, rules and the cluster-wide configuration.
//!
//! Everything here is plain data (serde-friendly) that the node fills from the cluster
//! document. [`crate::Problem::compile`] turns it into the index-based form the solvers use.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Number of resource dimensions tracked per host and VM.
pub const DIMS: usize = 5;

/// Names of the resource dimensions, in the order of [`Resources::to_array`].
pub const DIM_NAMES: [&str; DIMS] = ["cpu", "memory", "disk", "gpu", "network"];

/// A resource dimension (serialisable name of an index into [`Resources::to_array`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Dim {
    /// vCPUs.
    Cpu,
    /// Memory.
    Memory,
    /// Disk.
    Disk,
    /// GPUs.
    Gpu,
    /// Network bandwidth.
    Network,
}

impl Dim {
    /// All dimensions in array order.
    pub const ALL: [Dim; DIMS] = [Dim::Cpu, Dim::Memory, Dim::Disk, Dim::Gpu, Dim::Network];

    /// Its name.
    pub fn name(self) -> &'static str {
        DIM_NAMES[self as usize]
    }
}

/// Index of the CPU dimension in [`Resources::to_array`].
pub const DIM_CPU: usize = 0;
/// Index of the memory dimension in [`Resources::to_array`].
pub const DIM_MEM: usize = 1;
/// Index of the GPU dimension in [`Resources::to_array`].
pub const DIM_GPU: usize = 3;

/// A vector of resources, in integer units so feasibility checks are exact.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Resources {
    /// Virtual CPUs in thousandths (1 vCPU = 1000).
    pub cpu_milli: u64,
    /// Memory in MiB.
    pub mem_mib: u64,
    /// Disk in GiB.
    pub disk_gib: u64,
    /// Whole GPUs.
    pub gpus: u64,
    /// Network bandwidth in Mbit/s (host: uplink; VM: reserved rate).
    pub net_mbps: u64,
}

impl Resources {
    /// CPU and memory only, the common case.
    pub fn cpu_mem(vcpus: u64, mem_mib: u64) -> Self {
        Self {
            cpu_milli: vcpus.saturating_mul(1000),
            mem_mib,
            ..Self::default()
        }
    }

    /// The dimensions as an array, in [`DIM_NAMES`] order.
    pub fn to_array(&self) -> [u64; DIMS] {
        [
            self.cpu_milli,
            self.mem_mib,
            self.disk_gib,
            self.gpus,
            self.net_mbps,
        ]
    }

    /// Builds resources from an array in [`DIM_NAMES`] order.
    pub fn from_array(a: [u64; DIMS]) -> Self {
        Self {
            cpu_milli: a[0],
            mem_mib: a[1],
            disk_gib: a[2],
            gpus: a[3],
            net_mbps: a[4],
        }
    }

    /// True if every dimension of `self` is at most the same dimension of `cap`.
    pub fn fits_in(&self, cap: &Resources) -> bool {
        self.to_array()
            .iter()
            .zip(cap.to_array())
            .all(|(a, b)| *a <= b)
    }
}

/// Health of a host as seen by the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Health {
    /// Reporting normally.
    Healthy,
    /// Reporting, but with problems: still placeable, scored lower.
    Degraded,
    /// Missing heartbeats or failing: nothing new is placed on it.
    Unhealthy,
}

/// Identifier of a host (the node maps its peer identity to this number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HostId(pub u64);

/// Identifier of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VmId(pub u64);

/// Identifier of a placement rule (e.g. `affinity-rule-123`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RuleId(pub String);

impl std::fmt::Display for HostId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "host-{}", self.0)
    }
}

impl std::fmt::Display for VmId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vm-{}", self.0)
    }
}

impl std::fmt::Display for RuleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A volunteer host as reported to the cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Host {
    /// Identifier.
    pub id: HostId,
    /// Physical resources of the machine.
    pub capacity: Resources,
    /// Share the volunteer donates, in thousandths (1000 = all of it). Only that share of
    /// every dimension is placeable (GPUs are rounded down to whole devices).
    pub donated_permille: u32,
    /// GPU model, if the host has GPUs (e.g. `a100`).
    pub gpu_model: Option<String>,
    /// Region (e.g. `eu-west`).
    pub region: String,
    /// Free-form labels (e.g. `ssd`, `tier-gold`).
    pub labels: BTreeSet<String>,
    /// Reputation in `[0, 1]` from the reputation engine.
    pub reputation: f64,
    /// Health as seen by the cluster.
    pub health: Health,
    /// Quarantined by consensus: never placeable.
    pub quarantined: bool,
    /// Predicted link quality in `[0, 1]` from the bandwidth predictor.
    pub link_quality: f64,
    /// Predicted round-trip time to the clients of its region, in milliseconds.
    pub rtt_ms: u32,
}

impl Host {
    /// A healthy host with the given resources and defaults for everything else.
    pub fn new(id: u64, capacity: Resources) -> Self {
        Self {
            id: HostId(id),
            capacity,
            donated_permille: 1000,
            gpu_model: None,
            region: "default".to_owned(),
            labels: BTreeSet::new(),
            reputation: 1.0,
            health: Health::Healthy,
            quarantined: false,
            link_quality: 1.0,
            rtt_ms: 0,
        }
    }
}

/// A VM to place.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Vm {
    /// Identifier.
    pub id: VmId,
    /// Resources it reserves.
    pub demand: Resources,
    /// GPU model required when `demand.gpus > 0` (`None`: any model).
    pub gpu_model: Option<String>,
    /// Region it must run in (`None`: anywhere).
    pub region: Option<String>,
    /// Latency SLA: the host's predicted RTT must be at most this.
    pub max_rtt_ms: Option<u32>,
    /// Priority: higher is placed first and unplaced last.
    pub priority: u8,
}

impl Vm {
    /// A VM with the given demand and no other requirement.
    pub fn new(id: u64, demand: Resources) -> Self {
        Self {
            id: VmId(id),
            demand,
            gpu_model: None,
            region: None,
            max_rtt_ms: None,
            priority: 0,
        }
    }
}

/// What a host rule matches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMatch {
    /// Hosts carrying this label.
    Label(String),
    /// Hosts in this region.
    Region(String),
}

/// The kinds of placement rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RuleKind {
    /// All these VMs run on the same host.
    VmAffinity {
        /// The VMs.
        vms: Vec<VmId>,
    },
    /// No two of these VMs run on the same host.
    VmAntiAffinity {
        /// The VMs.
        vms: Vec<VmId>,
    },
    /// The VM runs on a matching host (`affine`) or never on one (`!affine`).
    Host {
        /// The VM.
        vm: VmId,
        /// Which hosts.
        target: HostMatch,
        /// Affinity (true) or anti-affinity (false).
        affine: bool,
    },
}

/// Kind filter for listing rules (`placement list-constraints --type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RuleType {
    /// VM-VM and VM-host affinity.
    Affinity,
    /// VM-VM and VM-host anti-affinity.
    AntiAffinity,
}

/// A user-defined placement rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Identifier, e.g. `affinity-rule-123`.
    pub id: RuleId,
    /// What it says.
    pub kind: RuleKind,
    /// Hard rules are never violated; soft rules are kept when possible and reported when not.
    pub hard: bool,
}

impl Rule {
    /// Whether this rule is of the given type.
    pub fn is_type(&self, t: RuleType) -> bool {
        let affine = match &self.kind {
            RuleKind::VmAffinity { .. } => true,
            RuleKind::VmAntiAffinity { .. } => false,
            RuleKind::Host { affine, .. } => *affine,
        };
        affine == (t == RuleType::Affinity)
    }
}

/// Cluster-wide placement configuration (the manual's `itp.constraints`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlacementConfig {
    /// At most this many VMs per host (manual: 100).
    pub max_vms_per_node: u32,
    /// Memory kept free on every host, in thousandths of its donated memory (manual: 10 %).
    pub min_free_memory_permille: u32,
    /// Hosts with a lower reputation are filtered out.
    pub min_reputation: f64,
    /// Hosts with a lower predicted link quality are filtered out.
    pub min_link_quality: f64,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            max_vms_per_node: 100,
            min_free_memory_permille: 100,
            min_reputation: 0.2,
            min_link_quality: 0.0,
        }
    }
}

/// Everything a solver needs: the hosts, the VMs and the rules.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PlacementInput {
    /// Hosts.
    pub hosts: Vec<Host>,
    /// VMs to place.
    pub vms: Vec<Vm>,
    /// Rules.
    pub rules: Vec<Rule>,
    /// Configuration.
    pub config: PlacementConfig,
}

/// Placeable capacity of a host: the donated share, minus the memory kept free.
pub fn effective_capacity(host: &Host, config: &PlacementConfig) -> [u64; DIMS] {
    let share = u64::from(host.donated_permille.min(1000));
    let mut cap = host.capacity.to_array();
    for c in &mut cap {
        *c = (u128::from(*c) * u128::from(share) / 1000) as u64;
    }
    let keep = u64::from(config.min_free_memory_permille.min(1000));
    cap[DIM_MEM] = (u128::from(cap[DIM_MEM]) * u128::from(1000 - keep) / 1000) as u64;
    cap
}
