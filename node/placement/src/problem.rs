//! The filter step: compiles a [`PlacementInput`] into index form, filters hosts (hard
//! constraints, quarantined or unhealthy hosts out) and says why each host was filtered.
//!
//! VMs joined by hard affinity rules are merged into one *item* (they must share a host,
//! so every solver moves them together); hard anti-affinity becomes a group id per item
//! that at most one item per host may carry.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::control::{AvoidList, Timestamp};
use crate::model::{
    DIMS, Dim, Health, Host, HostId, HostMatch, PlacementInput, RuleId, RuleKind, VmId,
    effective_capacity,
};

/// Upper limits on input sizes (a decoder-style guard against absurd inputs).
pub const MAX_HOSTS: usize = 1_000_000;
/// Upper limit on VMs in one input.
pub const MAX_VMS: usize = 10_000_000;

/// Why an input cannot be compiled.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// Two hosts share an id.
    #[error("duplicate host id {0}")]
    DuplicateHost(HostId),
    /// Two VMs share an id.
    #[error("duplicate vm id {0}")]
    DuplicateVm(VmId),
    /// A rule names a VM that is not in the input.
    #[error("rule {rule} names unknown {vm}")]
    UnknownVm {
        /// The rule.
        rule: RuleId,
        /// The VM.
        vm: VmId,
    },
    /// Hard rules that cannot all hold (e.g. two VMs both affine and anti-affine).
    #[error("rules conflict: {0}")]
    ConflictingRules(String),
    /// Too many hosts or VMs.
    #[error("input too large: {0}")]
    TooLarge(&'static str),
    /// A non-finite or out-of-range number.
    #[error("invalid value: {0}")]
    InvalidValue(String),
}

/// Why a host cannot take a VM.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FilterReason {
    /// Quarantined by consensus.
    Quarantined,
    /// Unhealthy.
    Unhealthy,
    /// The operator asked to avoid it until this time.
    Avoided {
        /// Expiry of the avoidance.
        until: Timestamp,
    },
    /// Reputation below the configured minimum (thousandths).
    LowReputation {
        /// The host's reputation in thousandths.
        permille: u32,
    },
    /// Predicted link quality below the configured minimum (thousandths).
    PoorLink {
        /// The host's link quality in thousandths.
        permille: u32,
    },
    /// The VM is larger than the host's whole placeable capacity in a dimension.
    TooSmall {
        /// Dimension.
        dim: Dim,
        /// What the VM needs.
        need: u64,
        /// What the host can ever offer.
        capacity: u64,
    },
    /// Not enough free capacity right now.
    Full {
        /// Dimension.
        dim: Dim,
        /// What the VM needs.
        need: u64,
        /// What is free.
        free: u64,
    },
    /// The host already runs `max_vms_per_node` VMs.
    MaxVms {
        /// The limit.
        max: u32,
    },
    /// Wrong or no GPU model.
    GpuModel {
        /// Required model.
        want: String,
        /// The host's model.
        have: Option<String>,
    },
    /// The VM must run in another region.
    Region {
        /// Required region.
        want: String,
        /// The host's region.
        have: String,
    },
    /// The host's predicted RTT breaks the VM's latency SLA.
    Latency {
        /// Host RTT.
        rtt_ms: u32,
        /// SLA.
        max_ms: u32,
    },
    /// A host (anti-)affinity rule excludes the host.
    HostRule {
        /// The rule.
        rule: RuleId,
    },
    /// A VM anti-affinity rule: a peer VM already runs there.
    AntiAffinity {
        /// The rule.
        rule: RuleId,
    },
}

impl FilterReason {
    /// Short name for counting (`quarantined`, `full:cpu`, ...).
    pub fn kind(&self) -> String {
        match self {
            Self::Quarantined => "quarantined".into(),
            Self::Unhealthy => "unhealthy".into(),
            Self::Avoided { .. } => "avoided".into(),
            Self::LowReputation { .. } => "low-reputation".into(),
            Self::PoorLink { .. } => "poor-link".into(),
            Self::TooSmall { dim, .. } => format!("too-small:{}", dim.name()),
            Self::Full { dim, .. } => format!("full:{}", dim.name()),
            Self::MaxVms { .. } => "max-vms".into(),
            Self::GpuModel { .. } => "gpu-model".into(),
            Self::Region { .. } => "region".into(),
            Self::Latency { .. } => "latency-sla".into(),
            Self::HostRule { .. } => "host-rule".into(),
            Self::AntiAffinity { .. } => "anti-affinity".into(),
        }
    }
}

/// A group of VMs that must share a host (hard affinity), placed as one unit.
#[derive(Clone, Debug)]
pub(crate) struct Item {
    /// VM indices.
    pub(crate) vms: Vec<u32>,
    /// Summed demand.
    pub(crate) demand: [u64; DIMS],
    /// Hard anti-affinity groups (sorted, unique).
    pub(crate) anti: Vec<u32>,
    /// Soft anti-affinity groups (sorted, unique).
    pub(crate) soft_anti: Vec<u32>,
    /// Required GPU model.
    pub(crate) gpu_model: Option<String>,
    /// Required region.
    pub(crate) region: Option<String>,
    /// Tightest latency SLA.
    pub(crate) max_rtt: Option<u32>,
    /// Host rules: (rule index, hard).
    pub(crate) host_rules: Vec<(usize, bool)>,
    /// Highest priority of its VMs.
    pub(crate) priority: u8,
    /// True if anything beyond capacity restricts the hosts (slow path in checks).
    pub(crate) restricted: bool,
}

/// A compiled placement problem: the filter step's output.
#[derive(Clone, Debug)]
pub struct Problem {
    pub(crate) input: PlacementInput,
    pub(crate) cap: Vec<[u64; DIMS]>,
    pub(crate) host_block: Vec<Option<FilterReason>>,
    pub(crate) items: Vec<Item>,
    pub(crate) vm_item: Vec<u32>,
    pub(crate) vm_index: BTreeMap<VmId, u32>,
    pub(crate) host_index: BTreeMap<HostId, u32>,
    /// Rule index behind each anti-affinity group.
    pub(crate) anti_rule: Vec<usize>,
    pub(crate) max_vms: u32,
    /// Per-dimension scale (largest placeable capacity among usable hosts; 0 = unused).
    pub(crate) scale: [f64; DIMS],
}

fn union_find_root(parent: &mut [u32], mut x: u32) -> u32 {
    while parent[x as usize] != x {
        let p = parent[x as usize];
        parent[x as usize] = parent[p as usize];
        x = p;
    }
    x
}

fn check_unit(name: &str, v: f64) -> Result<(), ModelError> {
    if v.is_finite() && (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(ModelError::InvalidValue(format!(
            "{name} must be in [0, 1], got {v}"
        )))
    }
}

impl Problem {
    /// Compiles and filters an input at time `now` (for the avoid list).
    pub fn compile(
        input: PlacementInput,
        now: Timestamp,
        avoid: &AvoidList,
    ) -> Result<Self, ModelError> {
        if input.hosts.len() > MAX_HOSTS {
            return Err(ModelError::TooLarge("hosts"));
        }
        if input.vms.len() > MAX_VMS {
            return Err(ModelError::TooLarge("vms"));
        }
        check_unit("min_reputation", input.config.min_reputation)?;
        check_unit("min_link_quality", input.config.min_link_quality)?;
        let mut host_index = BTreeMap::new();
        for (i, h) in input.hosts.iter().enumerate() {
            if host_index.insert(h.id, i as u32).is_some() {
                return Err(ModelError::DuplicateHost(h.id));
            }
            check_unit("reputation", h.reputation)?;
            check_unit("link_quality", h.link_quality)?;
        }
        let mut vm_index = BTreeMap::new();
        for (i, v) in input.vms.iter().enumerate() {
            if vm_index.insert(v.id, i as u32).is_some() {
                return Err(ModelError::DuplicateVm(v.id));
            }
        }
        let cfg = &input.config;
        let cap: Vec<[u64; DIMS]> = input
            .hosts
            .iter()
            .map(|h| effective_capacity(h, cfg))
            .collect();
        let host_block: Vec<Option<FilterReason>> = input
            .hosts
            .iter()
            .map(|h| host_filter(h, cfg, now, avoid))
            .collect();

        let lookup = |rule: &RuleId, vm: &VmId| {
            vm_index
                .get(vm)
                .copied()
                .ok_or_else(|| ModelError::UnknownVm {
                    rule: rule.clone(),
                    vm: *vm,
                })
        };
        // Hard affinity: union-find over VMs.
        let n = input.vms.len();
        let mut parent: Vec<u32> = (0..n as u32).collect();
        for r in &input.rules {
            match &r.kind {
                RuleKind::VmAffinity { vms } => {
                    let idx: Vec<u32> = vms
                        .iter()
                        .map(|v| lookup(&r.id, v))
                        .collect::<Result<_, _>>()?;
                    if !r.hard {
                        continue;
                    }
                    for w in idx.windows(2) {
                        let a = union_find_root(&mut parent, w[0]);
                        let b = union_find_root(&mut parent, w[1]);
                        if a != b {
                            parent[a.max(b) as usize] = a.min(b);
                        }
                    }
                }
                RuleKind::VmAntiAffinity { vms } => {
                    for v in vms {
                        lookup(&r.id, v)?;
                    }
                }
                RuleKind::Host { vm, .. } => {
                    lookup(&r.id, vm)?;
                }
            }
        }
        let mut root_item: BTreeMap<u32, u32> = BTreeMap::new();
        let mut vm_item = vec![0u32; n];
        let mut items: Vec<Item> = Vec::new();
        for v in 0..n as u32 {
            let root = union_find_root(&mut parent, v);
            let it = *root_item.entry(root).or_insert_with(|| {
                items.push(Item {
                    vms: Vec::new(),
                    demand: [0; DIMS],
                    anti: Vec::new(),
                    soft_anti: Vec::new(),
                    gpu_model: None,
                    region: None,
                    max_rtt: None,
                    host_rules: Vec::new(),
                    priority: 0,
                    restricted: false,
                });
                (items.len() - 1) as u32
            });
            vm_item[v as usize] = it;
            let vm = &input.vms[v as usize];
            let item = &mut items[it as usize];
            item.vms.push(v);
            for (d, x) in item.demand.iter_mut().zip(vm.demand.to_array()) {
                *d = d.saturating_add(x);
            }
            item.priority = item.priority.max(vm.priority);
            if vm.demand.gpus > 0
                && let Some(m) = &vm.gpu_model
            {
                merge_req(&mut item.gpu_model, m, "gpu model", vm.id)?;
            }
            if let Some(r) = &vm.region {
                merge_req(&mut item.region, r, "region", vm.id)?;
            }
            if let Some(ms) = vm.max_rtt_ms {
                item.max_rtt = Some(item.max_rtt.map_or(ms, |m| m.min(ms)));
            }
        }
        // Anti-affinity groups and host rules.
        let mut anti_rule = Vec::new();
        for (ri, r) in input.rules.iter().enumerate() {
            match &r.kind {
                RuleKind::VmAntiAffinity { vms } => {
                    let g = anti_rule.len() as u32;
                    anti_rule.push(ri);
                    let mut seen = std::collections::BTreeSet::new();
                    for v in vms {
                        let it = vm_item[vm_index[v] as usize];
                        if !seen.insert(it) {
                            if r.hard {
                                return Err(ModelError::ConflictingRules(format!(
                                    "{} puts VMs apart that hard affinity keeps together",
                                    r.id
                                )));
                            }
                            continue;
                        }
                        let item = &mut items[it as usize];
                        if r.hard {
                            item.anti.push(g)
                        } else {
                            item.soft_anti.push(g)
                        }
                    }
                }
                RuleKind::Host { vm, .. } => {
                    let it = vm_item[vm_index[vm] as usize];
                    items[it as usize].host_rules.push((ri, r.hard));
                }
                RuleKind::VmAffinity { .. } => {}
            }
        }
        for item in &mut items {
            item.anti.sort_unstable();
            item.anti.dedup();
            item.soft_anti.sort_unstable();
            item.soft_anti.dedup();
            item.restricted = item.gpu_model.is_some()
                || item.region.is_some()
                || item.max_rtt.is_some()
                || !item.host_rules.is_empty();
        }
        let mut scale = [0f64; DIMS];
        for (h, c) in cap.iter().enumerate() {
            if host_block[h].is_none() {
                for k in 0..DIMS {
                    scale[k] = scale[k].max(c[k] as f64);
                }
            }
        }
        let max_vms = cfg.max_vms_per_node;
        Ok(Self {
            input,
            cap,
            host_block,
            items,
            vm_item,
            vm_index,
            host_index,
            anti_rule,
            max_vms,
            scale,
        })
    }

    /// The compiled input.
    pub fn input(&self) -> &PlacementInput {
        &self.input
    }

    /// Number of hosts.
    pub fn num_hosts(&self) -> usize {
        self.cap.len()
    }

    /// Number of VMs.
    pub fn num_vms(&self) -> usize {
        self.vm_item.len()
    }

    /// Placeable capacity of host `h` (index).
    pub fn capacity(&self, h: usize) -> [u64; DIMS] {
        self.cap[h]
    }

    /// Host-level filter result for host `h` (index): `None` if the host is usable.
    pub fn host_filter(&self, h: usize) -> Option<&FilterReason> {
        self.host_block[h].as_ref()
    }

    /// Hosts filtered out before optimisation, with the reason.
    pub fn filtered_hosts(&self) -> Vec<(HostId, FilterReason)> {
        self.host_block
            .iter()
            .enumerate()
            .filter_map(|(h, r)| r.clone().map(|r| (self.input.hosts[h].id, r)))
            .collect()
    }

    /// Index of a VM id.
    pub fn vm_idx(&self, id: VmId) -> Option<usize> {
        self.vm_index.get(&id).map(|i| *i as usize)
    }

    /// Index of a host id.
    pub fn host_idx(&self, id: HostId) -> Option<usize> {
        self.host_index.get(&id).map(|i| *i as usize)
    }

    /// Static check (ignoring what else runs there) of item `it` on host `h`. With
    /// `strict`, soft host rules count too.
    pub(crate) fn static_check(
        &self,
        it: usize,
        h: usize,
        strict: bool,
    ) -> Result<(), FilterReason> {
        if let Some(r) = &self.host_block[h] {
            return Err(r.clone());
        }
        let item = &self.items[it];
        let cap = &self.cap[h];
        for k in 0..DIMS {
            if item.demand[k] > cap[k] {
                return Err(FilterReason::TooSmall {
                    dim: Dim::ALL[k],
                    need: item.demand[k],
                    capacity: cap[k],
                });
            }
        }
        if item.vms.len() as u64 > u64::from(self.max_vms) {
            return Err(FilterReason::MaxVms { max: self.max_vms });
        }
        if item.restricted {
            let host = &self.input.hosts[h];
            check_host_requirements(item, host, &self.input, strict)?;
        }
        Ok(())
    }
}

fn check_host_requirements(
    item: &Item,
    host: &Host,
    input: &PlacementInput,
    strict: bool,
) -> Result<(), FilterReason> {
    if let Some(m) = &item.gpu_model
        && host.gpu_model.as_ref() != Some(m)
    {
        return Err(FilterReason::GpuModel {
            want: m.clone(),
            have: host.gpu_model.clone(),
        });
    }
    if let Some(r) = &item.region
        && &host.region != r
    {
        return Err(FilterReason::Region {
            want: r.clone(),
            have: host.region.clone(),
        });
    }
    if let Some(max) = item.max_rtt
        && host.rtt_ms > max
    {
        return Err(FilterReason::Latency {
            rtt_ms: host.rtt_ms,
            max_ms: max,
        });
    }
    for &(ri, hard) in &item.host_rules {
        if !hard && !strict {
            continue;
        }
        let rule = &input.rules[ri];
        if !host_rule_holds(&rule.kind, host) {
            return Err(FilterReason::HostRule {
                rule: rule.id.clone(),
            });
        }
    }
    Ok(())
}

/// Whether a host rule holds for a VM placed on `host` (true for non-host rules).
pub(crate) fn host_rule_holds(kind: &RuleKind, host: &Host) -> bool {
    if let RuleKind::Host { target, affine, .. } = kind {
        let matches = match target {
            HostMatch::Label(l) => host.labels.contains(l),
            HostMatch::Region(r) => &host.region == r,
        };
        matches == *affine
    } else {
        true
    }
}

fn merge_req(
    slot: &mut Option<String>,
    want: &str,
    what: &str,
    vm: VmId,
) -> Result<(), ModelError> {
    match slot {
        Some(s) if s != want => Err(ModelError::ConflictingRules(format!(
            "{vm} needs {what} {want} but VMs it must share a host with need {s}"
        ))),
        Some(_) => Ok(()),
        None => {
            *slot = Some(want.to_owned());
            Ok(())
        }
    }
}

/// Host-level filter: reasons that exclude a host for every VM.
pub fn host_filter(
    h: &Host,
    cfg: &crate::model::PlacementConfig,
    now: Timestamp,
    avoid: &AvoidList,
) -> Option<FilterReason> {
    if h.quarantined {
        return Some(FilterReason::Quarantined);
    }
    if h.health == Health::Unhealthy {
        return Some(FilterReason::Unhealthy);
    }
    if let Some(until) = avoid.avoided_until(h.id, now) {
        return Some(FilterReason::Avoided { until });
    }
    if h.reputation < cfg.min_reputation {
        return Some(FilterReason::LowReputation {
            permille: (h.reputation * 1000.0) as u32,
        });
    }
    if h.link_quality < cfg.min_link_quality {
        return Some(FilterReason::PoorLink {
            permille: (h.link_quality * 1000.0) as u32,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Resources, Rule, Vm};

    fn input() -> PlacementInput {
        let mut hosts: Vec<Host> = (0..4)
            .map(|i| Host::new(i, Resources::cpu_mem(8, 32_768)))
            .collect();
        hosts[1].quarantined = true;
        hosts[2].health = Health::Unhealthy;
        let vms = (0..3)
            .map(|i| Vm::new(i, Resources::cpu_mem(2, 4096)))
            .collect();
        PlacementInput {
            hosts,
            vms,
            rules: vec![],
            config: Default::default(),
        }
    }

    #[test]
    fn filter_explains_each_host() {
        let mut avoid = AvoidList::default();
        avoid.avoid(HostId(3), Timestamp(0), 1000);
        let p = Problem::compile(input(), Timestamp(10), &avoid).unwrap();
        let f = p.filtered_hosts();
        assert_eq!(
            f,
            vec![
                (HostId(1), FilterReason::Quarantined),
                (HostId(2), FilterReason::Unhealthy),
                (
                    HostId(3),
                    FilterReason::Avoided {
                        until: Timestamp(1000)
                    }
                ),
            ]
        );
        // After expiry host 3 is usable again.
        let p = Problem::compile(input(), Timestamp(1000), &avoid).unwrap();
        assert_eq!(p.filtered_hosts().len(), 2);
    }

    #[test]
    fn affinity_merges_and_conflicts_are_errors() {
        let mut inp = input();
        inp.rules.push(Rule {
            id: RuleId("a".into()),
            kind: RuleKind::VmAffinity {
                vms: vec![VmId(0), VmId(1)],
            },
            hard: true,
        });
        let p = Problem::compile(inp.clone(), Timestamp(0), &AvoidList::default()).unwrap();
        assert_eq!(p.items.len(), 2);
        assert_eq!(p.items[0].demand[0], 4000);
        inp.rules.push(Rule {
            id: RuleId("b".into()),
            kind: RuleKind::VmAntiAffinity {
                vms: vec![VmId(0), VmId(1)],
            },
            hard: true,
        });
        assert!(matches!(
            Problem::compile(inp.clone(), Timestamp(0), &AvoidList::default()),
            Err(ModelError::ConflictingRules(_))
        ));
        inp.rules.push(Rule {
            id: RuleId("c".into()),
            kind: RuleKind::VmAntiAffinity {
                vms: vec![VmId(0), VmId(99)],
            },
            hard: true,
        });
        assert!(matches!(
            Problem::compile(inp, Timestamp(0), &AvoidList::default()),
            Err(ModelError::ConflictingRules(_) | ModelError::UnknownVm { .. })
        ));
    }

    #[test]
    fn bad_numbers_are_errors_not_panics() {
        let mut inp = input();
        inp.hosts[0].reputation = f64::NAN;
        assert!(matches!(
            Problem::compile(inp, Timestamp(0), &AvoidList::default()),
            Err(ModelError::InvalidValue(_))
        ));
        let mut inp = input();
        inp.vms.push(Vm::new(0, Resources::default()));
        assert_eq!(
            Problem::compile(inp, Timestamp(0), &AvoidList::default()).err(),
            Some(ModelError::DuplicateVm(VmId(0)))
        );
    }

    #[test]
    fn static_check_reports_requirements() {
        let mut inp = input();
        inp.vms[0].demand.gpus = 1;
        inp.vms[0].gpu_model = Some("a100".into());
        inp.vms[1].demand = Resources::cpu_mem(16, 1024);
        let p = Problem::compile(inp, Timestamp(0), &AvoidList::default()).unwrap();
        assert!(matches!(
            p.static_check(0, 0, true),
            Err(FilterReason::TooSmall { dim: Dim::Gpu, .. })
        ));
        assert!(matches!(
            p.static_check(1, 0, true),
            Err(FilterReason::TooSmall { dim: Dim::Cpu, .. })
        ));
        assert_eq!(p.static_check(2, 0, true), Ok(()));
        assert_eq!(p.static_check(2, 1, true), Err(FilterReason::Quarantined));
    }
}
