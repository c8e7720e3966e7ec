//! Packing state shared by every solver, the placement result and an independent verifier.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::control::EvalCounts;
use crate::model::{DIM_NAMES, DIMS, Dim, HostId, RuleId, RuleKind, VmId};
use crate::problem::{FilterReason, Problem, host_rule_holds};

/// Incremental packing: per-host usage, VM counts and anti-affinity groups present.
#[derive(Clone, Debug)]
pub(crate) struct Packing {
    pub(crate) used: Vec<[u64; DIMS]>,
    pub(crate) count: Vec<u32>,
    /// Anti-affinity groups (hard and soft) present per host, with multiplicity.
    pub(crate) groups: Vec<Vec<u32>>,
    /// Host of each item.
    pub(crate) item_host: Vec<Option<u32>>,
    /// Items on each host.
    pub(crate) host_items: Vec<Vec<u32>>,
    pub(crate) evals: EvalCounts,
}

impl Packing {
    pub(crate) fn new(p: &Problem) -> Self {
        let h = p.num_hosts();
        Self {
            used: vec![[0; DIMS]; h],
            count: vec![0; h],
            groups: vec![Vec::new(); h],
            item_host: vec![None; p.items.len()],
            host_items: vec![Vec::new(); h],
            evals: EvalCounts::default(),
        }
    }

    /// Whether item `it` can go on host `h` now. With `strict`, soft rules count too.
    pub(crate) fn check(
        &mut self,
        p: &Problem,
        it: usize,
        h: usize,
        strict: bool,
    ) -> Result<(), FilterReason> {
        let item = &p.items[it];
        self.evals.resource_checks += 1;
        let cap = &p.cap[h];
        let used = &self.used[h];
        for k in 0..DIMS {
            if used[k] + item.demand[k] > cap[k] {
                return Err(FilterReason::Full {
                    dim: Dim::ALL[k],
                    need: item.demand[k],
                    free: cap[k].saturating_sub(used[k]),
                });
            }
        }
        if self.count[h] as usize + item.vms.len() > p.max_vms as usize {
            return Err(FilterReason::MaxVms { max: p.max_vms });
        }
        if item.restricted || p.host_block[h].is_some() {
            self.evals.eligibility_checks += 1;
            p.static_check(it, h, strict)?;
        }
        if !item.anti.is_empty() || (strict && !item.soft_anti.is_empty()) {
            self.evals.anti_affinity_checks += 1;
            let present = &self.groups[h];
            let hit = item
                .anti
                .iter()
                .chain(if strict {
                    item.soft_anti.iter()
                } else {
                    [].iter()
                })
                .find(|g| present.contains(g));
            if let Some(g) = hit {
                let rule = &p.input.rules[p.anti_rule[*g as usize]];
                return Err(FilterReason::AntiAffinity {
                    rule: rule.id.clone(),
                });
            }
        }
        Ok(())
    }

    /// Puts item `it` on host `h` (caller checked).
    pub(crate) fn place(&mut self, p: &Problem, it: usize, h: usize) {
        let item = &p.items[it];
        for k in 0..DIMS {
            self.used[h][k] += item.demand[k];
        }
        self.count[h] += item.vms.len() as u32;
        self.groups[h].extend(item.anti.iter().chain(item.soft_anti.iter()));
        self.item_host[it] = Some(h as u32);
        self.host_items[h].push(it as u32);
    }

    /// Takes item `it` off its host.
    pub(crate) fn remove(&mut self, p: &Problem, it: usize) -> Option<usize> {
        let h = self.item_host[it]? as usize;
        let item = &p.items[it];
        for k in 0..DIMS {
            self.used[h][k] -= item.demand[k];
        }
        self.count[h] -= item.vms.len() as u32;
        for g in item.anti.iter().chain(item.soft_anti.iter()) {
            if let Some(pos) = self.groups[h].iter().position(|x| x == g) {
                self.groups[h].swap_remove(pos);
            }
        }
        self.item_host[it] = None;
        if let Some(pos) = self.host_items[h].iter().position(|x| *x as usize == it) {
            self.host_items[h].swap_remove(pos);
        }
        Some(h)
    }

    pub(crate) fn to_placement(&self, p: &Problem) -> Placement {
        let mut host_of = vec![None; p.num_vms()];
        for (it, h) in self.item_host.iter().enumerate() {
            for &v in &p.items[it].vms {
                host_of[v as usize] = *h;
            }
        }
        Placement { host_of }
    }

    pub(crate) fn hosts_used(&self) -> usize {
        self.count.iter().filter(|c| **c > 0).count()
    }
}

/// A placement: the host index of every VM (by VM index), `None` when unplaced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Host index per VM index.
    pub host_of: Vec<Option<u32>>,
}

impl Placement {
    /// Hosts with at least one VM.
    pub fn hosts_used(&self) -> usize {
        let mut hs: Vec<u32> = self.host_of.iter().flatten().copied().collect();
        hs.sort_unstable();
        hs.dedup();
        hs.len()
    }

    /// VMs without a host.
    pub fn unplaced(&self) -> usize {
        self.host_of.iter().filter(|h| h.is_none()).count()
    }

    /// As ids.
    pub fn to_ids(&self, p: &Problem) -> BTreeMap<VmId, HostId> {
        self.host_of
            .iter()
            .enumerate()
            .filter_map(|(v, h)| h.map(|h| (p.input.vms[v].id, p.input.hosts[h as usize].id)))
            .collect()
    }
}

/// A hard constraint a placement breaks (found by [`verify`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// Wrong length.
    #[error("placement has {got} entries for {want} vms")]
    Length {
        /// Entries.
        got: usize,
        /// VMs.
        want: usize,
    },
    /// A host index out of range.
    #[error("{vm} on unknown host index {host}")]
    UnknownHost {
        /// VM.
        vm: VmId,
        /// Index.
        host: u32,
    },
    /// Over capacity.
    #[error("{host} over capacity in {dim}: {used} > {cap}")]
    Capacity {
        /// Host.
        host: HostId,
        /// Dimension.
        dim: &'static str,
        /// Used.
        used: u64,
        /// Capacity.
        cap: u64,
    },
    /// Too many VMs.
    #[error("{host} runs {count} vms, max {max}")]
    MaxVms {
        /// Host.
        host: HostId,
        /// Count.
        count: u32,
        /// Limit.
        max: u32,
    },
    /// A VM on a host it may not use.
    #[error("{vm} on {host}: {reason:?}")]
    Ineligible {
        /// VM.
        vm: VmId,
        /// Host.
        host: HostId,
        /// Why.
        reason: FilterReason,
    },
    /// Hard affinity broken.
    #[error("affinity {0} broken")]
    Affinity(RuleId),
    /// Hard anti-affinity broken.
    #[error("anti-affinity {0} broken")]
    AntiAffinity(RuleId),
}

/// A soft rule a placement does not keep.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SoftViolation {
    /// The rule.
    pub rule: RuleId,
    /// VMs involved.
    pub vms: Vec<VmId>,
}

/// Checks every hard constraint from scratch (independently of the solvers' bookkeeping)
/// and returns the soft rules that are not kept. Unplaced VMs are allowed (not a violation).
pub fn verify(p: &Problem, pl: &Placement) -> Result<Vec<SoftViolation>, Violation> {
    let input = &p.input;
    if pl.host_of.len() != input.vms.len() {
        return Err(Violation::Length {
            got: pl.host_of.len(),
            want: input.vms.len(),
        });
    }
    let nh = input.hosts.len();
    let mut used = vec![[0u64; DIMS]; nh];
    let mut count = vec![0u32; nh];
    for (v, h) in pl.host_of.iter().enumerate() {
        let Some(h) = *h else { continue };
        let vm = &input.vms[v];
        if h as usize >= nh {
            return Err(Violation::UnknownHost { vm: vm.id, host: h });
        }
        let host = &input.hosts[h as usize];
        if let Some(r) = &p.host_block[h as usize] {
            return Err(Violation::Ineligible {
                vm: vm.id,
                host: host.id,
                reason: r.clone(),
            });
        }
        let ineligible = |reason| Violation::Ineligible {
            vm: vm.id,
            host: host.id,
            reason,
        };
        if vm.demand.gpus > 0
            && let Some(m) = &vm.gpu_model
            && host.gpu_model.as_ref() != Some(m)
        {
            return Err(ineligible(FilterReason::GpuModel {
                want: m.clone(),
                have: host.gpu_model.clone(),
            }));
        }
        if let Some(r) = &vm.region
            && &host.region != r
        {
            return Err(ineligible(FilterReason::Region {
                want: r.clone(),
                have: host.region.clone(),
            }));
        }
        if let Some(max) = vm.max_rtt_ms
            && host.rtt_ms > max
        {
            return Err(ineligible(FilterReason::Latency {
                rtt_ms: host.rtt_ms,
                max_ms: max,
            }));
        }
        for (k, d) in vm.demand.to_array().iter().enumerate() {
            used[h as usize][k] += d;
        }
        count[h as usize] += 1;
    }
    for h in 0..nh {
        for k in 0..DIMS {
            if used[h][k] > p.cap[h][k] {
                return Err(Violation::Capacity {
                    host: input.hosts[h].id,
                    dim: DIM_NAMES[k],
                    used: used[h][k],
                    cap: p.cap[h][k],
                });
            }
        }
        if count[h] > p.max_vms {
            return Err(Violation::MaxVms {
                host: input.hosts[h].id,
                count: count[h],
                max: p.max_vms,
            });
        }
    }
    let host_of = |id: &VmId| p.vm_index.get(id).and_then(|v| pl.host_of[*v as usize]);
    let mut soft = Vec::new();
    for r in &input.rules {
        let ok = match &r.kind {
            RuleKind::VmAffinity { vms } => {
                let placed: Vec<Option<u32>> = vms.iter().map(host_of).collect();
                // Unplaced VMs do not break affinity; placed ones must share one host.
                let mut hs: Vec<u32> = placed.iter().flatten().copied().collect();
                hs.dedup();
                hs.windows(2).all(|w| w[0] == w[1])
            }
            RuleKind::VmAntiAffinity { vms } => {
                let mut hs: Vec<u32> = vms.iter().filter_map(host_of).collect();
                let n = hs.len();
                hs.sort_unstable();
                hs.dedup();
                hs.len() == n
            }
            RuleKind::Host { vm, .. } => {
                host_of(vm).is_none_or(|h| host_rule_holds(&r.kind, &input.hosts[h as usize]))
            }
        };
        if !ok {
            if r.hard {
                return Err(match r.kind {
                    RuleKind::VmAntiAffinity { .. } => Violation::AntiAffinity(r.id.clone()),
                    _ => Violation::Affinity(r.id.clone()),
                });
            }
            let vms = match &r.kind {
                RuleKind::VmAffinity { vms } | RuleKind::VmAntiAffinity { vms } => vms.clone(),
                RuleKind::Host { vm, .. } => vec![*vm],
            };
            soft.push(SoftViolation {
                rule: r.id.clone(),
                vms,
            });
        }
    }
    Ok(soft)
}
