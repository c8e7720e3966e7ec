//! Online mode: place one arriving VM in well under a millisecond at 10,000 hosts.
//!
//! Hosts sit in a `BTreeSet` keyed by free CPU, so a placement walks upwards from the VM's
//! CPU need (best fit on CPU) and scores at most [`ONLINE_CANDIDATES`] hosts that pass every
//! check; it never scans hosts that are too full. The score prefers hosts already in use
//! (fewer hosts powered), a balanced leftover across dimensions, then reputation and link
//! quality; soft rules add penalties. Every decision carries its explanation: counts of
//! hosts filtered by reason with examples, the chosen host's score and soft rules broken.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::control::{AvoidList, EvalCounts, Timestamp};
use crate::model::{
    DIM_CPU, DIMS, Dim, Host, HostId, PlacementConfig, Rule, RuleId, RuleKind, Vm, VmId,
    effective_capacity,
};
use crate::problem::{FilterReason, ModelError, host_filter, host_rule_holds};

/// Hosts scored per placement at most.
pub const ONLINE_CANDIDATES: usize = 32;
/// Empty hosts scored per placement at most.
const EMPTY_CANDIDATES: usize = 4;
/// Examples of filtered hosts kept in a decision.
const EXAMPLES: usize = 8;

/// Why a VM could not be placed online.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PlaceError {
    /// The VM id is already placed.
    #[error("{0} is already placed")]
    AlreadyPlaced(VmId),
    /// No host passes the checks.
    #[error("no host can take {vm}: {filtered:?}")]
    NoHost {
        /// The VM.
        vm: VmId,
        /// Hosts filtered, by reason.
        filtered: BTreeMap<String, usize>,
    },
}

/// An online placement decision and why it was made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The VM.
    pub vm: VmId,
    /// The host chosen.
    pub host: HostId,
    /// Its score (lower is better).
    pub score: f64,
    /// Hosts that passed every check and were scored.
    pub scored: usize,
    /// Hosts filtered out, by reason (`full:cpu` counts every host with too little CPU).
    pub filtered: BTreeMap<String, usize>,
    /// A few filtered hosts with their reason.
    pub examples: Vec<(HostId, FilterReason)>,
    /// Soft rules this placement breaks.
    pub soft_violations: Vec<RuleId>,
    /// Checks and scores evaluated.
    pub evals: EvalCounts,
}

/// Online placer: the cluster's current placement plus an index of hosts by free CPU.
#[derive(Clone, Debug)]
pub struct OnlinePlacer {
    hosts: Vec<Host>,
    cap: Vec<[u64; DIMS]>,
    used: Vec<[u64; DIMS]>,
    count: Vec<u32>,
    block: Vec<Option<FilterReason>>,
    config: PlacementConfig,
    rules: Vec<Rule>,
    /// Rules mentioning each VM.
    vm_rules: BTreeMap<VmId, Vec<usize>>,
    placed: BTreeMap<VmId, (u32, [u64; DIMS])>,
    /// `(free cpu, host)` of usable hosts running VMs.
    index: BTreeSet<(u64, u32)>,
    /// Usable empty hosts, best first: `(MAX - size, MAX - reputation, host)`.
    empty: BTreeSet<(u64, u64, u32)>,
    host_idx: BTreeMap<HostId, u32>,
}

impl OnlinePlacer {
    /// A placer over `hosts` with `rules`, filtered at `now`.
    pub fn new(
        hosts: Vec<Host>,
        rules: Vec<Rule>,
        config: PlacementConfig,
        now: Timestamp,
        avoid: &AvoidList,
    ) -> Result<Self, ModelError> {
        let mut host_idx = BTreeMap::new();
        for (i, h) in hosts.iter().enumerate() {
            if host_idx.insert(h.id, i as u32).is_some() {
                return Err(ModelError::DuplicateHost(h.id));
            }
        }
        let cap: Vec<[u64; DIMS]> = hosts
            .iter()
            .map(|h| effective_capacity(h, &config))
            .collect();
        let mut vm_rules: BTreeMap<VmId, Vec<usize>> = BTreeMap::new();
        for (ri, r) in rules.iter().enumerate() {
            match &r.kind {
                RuleKind::VmAffinity { vms } | RuleKind::VmAntiAffinity { vms } => {
                    for v in vms {
                        vm_rules.entry(*v).or_default().push(ri);
                    }
                }
                RuleKind::Host { vm, .. } => vm_rules.entry(*vm).or_default().push(ri),
            }
        }
        let n = hosts.len();
        let mut s = Self {
            hosts,
            cap,
            used: vec![[0; DIMS]; n],
            count: vec![0; n],
            block: vec![None; n],
            config,
            rules,
            vm_rules,
            placed: BTreeMap::new(),
            index: BTreeSet::new(),
            empty: BTreeSet::new(),
            host_idx,
        };
        s.refresh(now, avoid);
        Ok(s)
    }

    /// A placer with no hosts (the engine's state before the first host list).
    pub fn empty(config: PlacementConfig) -> Self {
        Self {
            hosts: Vec::new(),
            cap: Vec::new(),
            used: Vec::new(),
            count: Vec::new(),
            block: Vec::new(),
            config,
            rules: Vec::new(),
            vm_rules: BTreeMap::new(),
            placed: BTreeMap::new(),
            index: BTreeSet::new(),
            empty: BTreeSet::new(),
            host_idx: BTreeMap::new(),
        }
    }

    /// Re-applies the host filter (health, quarantine, avoid list) at `now`.
    pub fn refresh(&mut self, now: Timestamp, avoid: &AvoidList) {
        self.index.clear();
        self.empty.clear();
        for h in 0..self.hosts.len() {
            self.block[h] = host_filter(&self.hosts[h], &self.config, now, avoid);
            self.insert(h);
        }
    }

    /// Key of an empty host: largest (CPU, then memory) and most reputable first.
    fn empty_key(&self, h: usize) -> (u64, u64, u32) {
        let size = self.cap[h][DIM_CPU]
            .saturating_mul(1 << 20)
            .saturating_add(self.cap[h][1] >> 10);
        let rep = (self.hosts[h].reputation * 1e6) as u64;
        (u64::MAX - size, u64::MAX - rep, h as u32)
    }

    fn insert(&mut self, h: usize) {
        if self.block[h].is_some() {
            return;
        }
        if self.count[h] == 0 {
            self.empty.insert(self.empty_key(h));
        } else {
            self.index.insert((self.free(h, DIM_CPU), h as u32));
        }
    }

    fn take_out(&mut self, h: usize) {
        if self.count[h] == 0 {
            self.empty.remove(&self.empty_key(h));
        } else {
            self.index.remove(&(self.free(h, DIM_CPU), h as u32));
        }
    }

    fn free(&self, h: usize, k: usize) -> u64 {
        self.cap[h][k].saturating_sub(self.used[h][k])
    }

    /// Host of a placed VM.
    pub fn host_of(&self, vm: VmId) -> Option<HostId> {
        self.placed
            .get(&vm)
            .map(|(h, _)| self.hosts[*h as usize].id)
    }

    /// Hosts with at least one VM.
    pub fn hosts_used(&self) -> usize {
        self.count.iter().filter(|c| **c > 0).count()
    }

    /// Records a VM already running on `host` (e.g. at start-up), without checks.
    pub fn record(&mut self, vm: &Vm, host: HostId) -> bool {
        let Some(&h) = self.host_idx.get(&host) else {
            return false;
        };
        if self.placed.contains_key(&vm.id) {
            return false;
        }
        self.add(vm.id, h as usize, vm.demand.to_array());
        true
    }

    fn add(&mut self, vm: VmId, h: usize, d: [u64; DIMS]) {
        self.take_out(h);
        for k in 0..DIMS {
            self.used[h][k] += d[k];
        }
        self.count[h] += 1;
        self.insert(h);
        self.placed.insert(vm, (h as u32, d));
    }

    /// Removes a VM (it stopped or left); returns its host.
    pub fn remove(&mut self, vm: VmId) -> Option<HostId> {
        let (h, d) = self.placed.remove(&vm)?;
        let h = h as usize;
        self.take_out(h);
        for k in 0..DIMS {
            self.used[h][k] -= d[k];
        }
        self.count[h] -= 1;
        self.insert(h);
        Some(self.hosts[h].id)
    }

    /// Checks `vm` on host `h` against everything; `Ok(soft rules broken)`.
    fn check(
        &self,
        vm: &Vm,
        h: usize,
        evals: &mut EvalCounts,
    ) -> Result<Vec<RuleId>, FilterReason> {
        if let Some(r) = &self.block[h] {
            return Err(r.clone());
        }
        evals.resource_checks += 1;
        let d = vm.demand.to_array();
        for k in 0..DIMS {
            if d[k] > self.cap[h][k] {
                return Err(FilterReason::TooSmall {
                    dim: Dim::ALL[k],
                    need: d[k],
                    capacity: self.cap[h][k],
                });
            }
            if self.used[h][k] + d[k] > self.cap[h][k] {
                return Err(FilterReason::Full {
                    dim: Dim::ALL[k],
                    need: d[k],
                    free: self.free(h, k),
                });
            }
        }
        if self.count[h] >= self.config.max_vms_per_node {
            return Err(FilterReason::MaxVms {
                max: self.config.max_vms_per_node,
            });
        }
        let host = &self.hosts[h];
        evals.eligibility_checks += 1;
        if vm.demand.gpus > 0
            && let Some(m) = &vm.gpu_model
            && host.gpu_model.as_ref() != Some(m)
        {
            return Err(FilterReason::GpuModel {
                want: m.clone(),
                have: host.gpu_model.clone(),
            });
        }
        if let Some(r) = &vm.region
            && &host.region != r
        {
            return Err(FilterReason::Region {
                want: r.clone(),
                have: host.region.clone(),
            });
        }
        if let Some(max) = vm.max_rtt_ms
            && host.rtt_ms > max
        {
            return Err(FilterReason::Latency {
                rtt_ms: host.rtt_ms,
                max_ms: max,
            });
        }
        let mut soft = Vec::new();
        for &ri in self.vm_rules.get(&vm.id).map(Vec::as_slice).unwrap_or(&[]) {
            let rule = &self.rules[ri];
            let ok = match &rule.kind {
                RuleKind::Host { .. } => host_rule_holds(&rule.kind, host),
                RuleKind::VmAntiAffinity { vms } => {
                    evals.anti_affinity_checks += 1;
                    !vms.iter().any(|o| {
                        *o != vm.id && self.placed.get(o).is_some_and(|(oh, _)| *oh as usize == h)
                    })
                }
                RuleKind::VmAffinity { vms } => vms.iter().all(|o| {
                    *o == vm.id || self.placed.get(o).is_none_or(|(oh, _)| *oh as usize == h)
                }),
            };
            if !ok {
                if rule.hard {
                    return Err(match rule.kind {
                        RuleKind::VmAntiAffinity { .. } => FilterReason::AntiAffinity {
                            rule: rule.id.clone(),
                        },
                        _ => FilterReason::HostRule {
                            rule: rule.id.clone(),
                        },
                    });
                }
                soft.push(rule.id.clone());
            }
        }
        Ok(soft)
    }

    fn score(&self, vm: &Vm, h: usize, soft: usize) -> f64 {
        // Normalised leftover after placing, its imbalance, an empty-host penalty, then
        // host quality. Lower is better.
        let d = vm.demand.to_array();
        let mut left = [0f64; DIMS];
        let mut n = 0.0;
        let mut sum = 0.0;
        for k in 0..DIMS {
            if self.cap[h][k] > 0 && (d[k] > 0 || k == DIM_CPU || k == 1) {
                left[k] = (self.cap[h][k] - self.used[h][k] - d[k]) as f64 / self.cap[h][k] as f64;
                sum += left[k];
                n += 1.0;
            }
        }
        let mean = if n > 0.0 { sum / n } else { 0.0 };
        let imbalance: f64 = left.iter().map(|l| (l - mean).abs()).sum::<f64>();
        let host = &self.hosts[h];
        let fit = if self.count[h] == 0 {
            10.0
        } else {
            mean + 0.5 * imbalance
        };
        fit + 0.2 * (1.0 - host.reputation) + 0.2 * (1.0 - host.link_quality) + 100.0 * soft as f64
    }

    /// Places one VM, committing it, and says why.
    pub fn place(&mut self, vm: &Vm) -> Result<Decision, PlaceError> {
        if self.placed.contains_key(&vm.id) {
            return Err(PlaceError::AlreadyPlaced(vm.id));
        }
        let mut evals = EvalCounts::default();
        let mut filtered: BTreeMap<String, usize> = BTreeMap::new();
        let mut examples = Vec::new();
        for (h, b) in self.block.iter().enumerate() {
            if let Some(r) = b {
                *filtered.entry(r.kind()).or_default() += 1;
                if examples.len() < EXAMPLES {
                    examples.push((self.hosts[h].id, r.clone()));
                }
            }
        }
        let need = vm.demand.cpu_milli;
        // Hosts in use without the CPU (counted, not scanned one by one for a reason).
        let too_full = self.index.range(..(need, 0)).count();
        if too_full > 0 {
            *filtered.entry("full:cpu".into()).or_default() += too_full;
        }
        let mut best: Option<(f64, usize, Vec<RuleId>)> = None;
        let mut scored = 0;
        let mut consider =
            |this: &Self, h: usize, evals: &mut EvalCounts, scored: &mut usize| match this
                .check(vm, h, evals)
            {
                Ok(soft) => {
                    evals.score_evals += 1;
                    let s = this.score(vm, h, soft.len());
                    if best.as_ref().is_none_or(|(b, _, _)| s < *b) {
                        best = Some((s, h, soft));
                    }
                    *scored += 1;
                }
                Err(r) => {
                    *filtered.entry(r.kind()).or_default() += 1;
                    if examples.len() < EXAMPLES {
                        examples.push((this.hosts[h].id, r));
                    }
                }
            };
        // Hosts in use, tightest CPU fit first.
        for &(_, h) in self.index.range((need, 0)..) {
            consider(self, h as usize, &mut evals, &mut scored);
            if scored >= ONLINE_CANDIDATES {
                break;
            }
        }
        // Then a few empty hosts, largest and most reputable first (they score worse than
        // any host in use, so they win only when no host in use can take the VM or a soft
        // rule would break there).
        let before = scored;
        for &(_, _, h) in &self.empty {
            consider(self, h as usize, &mut evals, &mut scored);
            if scored >= before + EMPTY_CANDIDATES {
                break;
            }
        }
        let Some((score, h, soft)) = best else {
            return Err(PlaceError::NoHost {
                vm: vm.id,
                filtered,
            });
        };
        self.add(vm.id, h, vm.demand.to_array());
        Ok(Decision {
            vm: vm.id,
            host: self.hosts[h].id,
            score,
            scored,
            filtered,
            examples,
            soft_violations: soft,
            evals,
        })
    }

    /// Why each host could or could not take `vm` right now (`None`: it could).
    pub fn explain(&self, vm: &Vm) -> Vec<(HostId, Option<FilterReason>)> {
        let mut evals = EvalCounts::default();
        (0..self.hosts.len())
            .map(|h| (self.hosts[h].id, self.check(vm, h, &mut evals).err()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HostMatch, Resources};

    fn placer(rules: Vec<Rule>) -> OnlinePlacer {
        let mut hosts: Vec<Host> = (0..6)
            .map(|i| Host::new(i, Resources::cpu_mem(8, 32 * 1024)))
            .collect();
        hosts[5].quarantined = true;
        hosts[4].labels.insert("ssd".into());
        OnlinePlacer::new(
            hosts,
            rules,
            PlacementConfig::default(),
            Timestamp(0),
            &AvoidList::default(),
        )
        .unwrap()
    }

    #[test]
    fn packs_onto_used_hosts_and_explains() {
        let mut p = placer(vec![]);
        let a = p.place(&Vm::new(1, Resources::cpu_mem(4, 4096))).unwrap();
        let b = p.place(&Vm::new(2, Resources::cpu_mem(4, 4096))).unwrap();
        assert_eq!(a.host, b.host, "second VM fills the used host");
        assert_eq!(a.filtered.get("quarantined"), Some(&1));
        let c = p.place(&Vm::new(3, Resources::cpu_mem(2, 4096))).unwrap();
        assert_ne!(c.host, a.host);
        assert_eq!(c.filtered.get("full:cpu"), Some(&1));
        assert_eq!(p.hosts_used(), 2);
        assert_eq!(
            p.place(&Vm::new(3, Resources::cpu_mem(1, 1))),
            Err(PlaceError::AlreadyPlaced(VmId(3)))
        );
        let too_big = p.place(&Vm::new(9, Resources::cpu_mem(64, 1)));
        assert!(matches!(too_big, Err(PlaceError::NoHost { .. })));
        assert_eq!(p.remove(VmId(1)), Some(a.host));
        let e = p.explain(&Vm::new(10, Resources::cpu_mem(1, 1)));
        assert_eq!(e[5].1, Some(FilterReason::Quarantined));
    }

    #[test]
    fn online_rules_hold() {
        let rules = vec![
            Rule {
                id: RuleId("anti".into()),
                kind: RuleKind::VmAntiAffinity {
                    vms: vec![VmId(1), VmId(2)],
                },
                hard: true,
            },
            Rule {
                id: RuleId("aff".into()),
                kind: RuleKind::VmAffinity {
                    vms: vec![VmId(3), VmId(1)],
                },
                hard: true,
            },
            Rule {
                id: RuleId("ssd".into()),
                kind: RuleKind::Host {
                    vm: VmId(4),
                    target: HostMatch::Label("ssd".into()),
                    affine: true,
                },
                hard: true,
            },
            Rule {
                id: RuleId("soft".into()),
                kind: RuleKind::VmAntiAffinity {
                    vms: vec![VmId(5), VmId(6)],
                },
                hard: false,
            },
        ];
        let mut p = placer(rules);
        let one = p
            .place(&Vm::new(1, Resources::cpu_mem(1, 1024)))
            .unwrap()
            .host;
        let two = p
            .place(&Vm::new(2, Resources::cpu_mem(1, 1024)))
            .unwrap()
            .host;
        assert_ne!(one, two);
        let three = p
            .place(&Vm::new(3, Resources::cpu_mem(1, 1024)))
            .unwrap()
            .host;
        assert_eq!(three, one);
        assert_eq!(
            p.place(&Vm::new(4, Resources::cpu_mem(1, 1024)))
                .unwrap()
                .host,
            HostId(4)
        );
        let five = p.place(&Vm::new(5, Resources::cpu_mem(1, 1024))).unwrap();
        let six = p.place(&Vm::new(6, Resources::cpu_mem(1, 1024))).unwrap();
        assert_ne!(five.host, six.host);
        assert!(six.soft_violations.is_empty());
    }
}
