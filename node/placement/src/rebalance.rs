//! Batch mode: re-plan the cluster with a migration budget.
//!
//! Starting from the current placement the planner first moves VMs that must move (their
//! host is quarantined, unhealthy, avoided, over its placeable capacity, or breaks a hard
//! rule), then empties the least-loaded hosts while the budget lasts. Every move is checked
//! against the state *at that point of the plan*, with the VM counted on its target before
//! it leaves its source (a live migration holds both), so executing the list in order
//! never pushes a host over capacity. Each migration lists the earlier ones it must wait
//! for (those that free room on its target, and earlier moves of the same VM), so
//! independent migrations may run in parallel.

use serde::{Deserialize, Serialize};

use crate::bound::lower_bound;
use crate::control::{Deadline, SolverSettings};
use crate::heuristic::Solver;
use crate::model::{DIMS, HostId, VmId};
use crate::problem::Problem;
use crate::state::Placement;

/// One migration of a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// The VM.
    pub vm: VmId,
    /// Source host.
    pub from: HostId,
    /// Target host.
    pub to: HostId,
    /// Indices of earlier migrations in the plan that must finish first.
    pub after: Vec<usize>,
}

/// A re-plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RebalancePlan {
    /// Migrations in a capacity-safe order.
    pub migrations: Vec<Migration>,
    /// Hosts in use before.
    pub hosts_before: usize,
    /// Hosts in use after the plan.
    pub hosts_after: usize,
    /// VMs that had to move (filtered host, over capacity, broken hard rule) and did.
    pub evacuated: usize,
    /// VMs that had to move but found no host or no budget.
    pub stuck: Vec<VmId>,
    /// The placement after the plan.
    pub placement: Placement,
}

/// Why a re-plan was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RebalanceError {
    /// The current placement does not match the problem.
    #[error("current placement has {got} entries for {want} vms")]
    Length {
        /// Entries.
        got: usize,
        /// VMs.
        want: usize,
    },
    /// VMs bound by hard affinity are on different hosts: fix placement first.
    #[error("{0} is not on the same host as the VMs it has hard affinity with")]
    SplitAffinity(VmId),
    /// A host index out of range.
    #[error("host index {0} out of range")]
    UnknownHost(u32),
}

/// Migrations allowed in one re-plan for a budget of `max_fraction_per_hour` of the VMs
/// per hour (manual: under 5 %), for re-plans every `interval_ms`.
pub fn migration_budget(vms: usize, max_fraction_per_hour: f64, interval_ms: u64) -> usize {
    let per_hour = vms as f64 * max_fraction_per_hour.clamp(0.0, 1.0);
    (per_hour * interval_ms as f64 / 3_600_000.0).floor() as usize
}

/// Re-plans from `current` with at most `budget` migrations.
pub fn rebalance(
    p: &Problem,
    current: &Placement,
    budget: usize,
    settings: &SolverSettings,
    deadline: &dyn Deadline,
) -> Result<RebalancePlan, RebalanceError> {
    if current.host_of.len() != p.num_vms() {
        return Err(RebalanceError::Length {
            got: current.host_of.len(),
            want: p.num_vms(),
        });
    }
    let mut s = Solver::new(p);
    // Load the current placement (no checks: it may be over capacity).
    for (it, item) in p.items.iter().enumerate() {
        let h0 = current.host_of[item.vms[0] as usize];
        for &v in &item.vms {
            if current.host_of[v as usize] != h0 {
                return Err(RebalanceError::SplitAffinity(p.input.vms[v as usize].id));
            }
        }
        if let Some(h) = h0 {
            if h as usize >= p.num_hosts() {
                return Err(RebalanceError::UnknownHost(h));
            }
            s.force_open(h as usize);
            s.place_unchecked(it, h as usize);
        }
    }
    let hosts_before = s.pk.hosts_used();
    let mut moves: Vec<(usize, usize, usize)> = Vec::new(); // (item, from, to)
    let mut budget_left = budget;
    // 1. Items that must move.
    let mut must: Vec<usize> = Vec::new();
    for h in 0..p.num_hosts() {
        let items: Vec<usize> = s.pk.host_items[h].iter().map(|i| *i as usize).collect();
        if items.is_empty() {
            continue;
        }
        if p.host_block[h].is_some() {
            must.extend(items);
            continue;
        }
        // Hard rule broken (a rule or a label changed since it was placed).
        for &it in &items {
            s.unplace(it);
            let ok = s.rules_allow(it, h);
            s.place_unchecked(it, h);
            if !ok && !must.contains(&it) {
                must.push(it);
            }
        }
        // Over capacity (the volunteer lowered the donated share): move the largest items
        // out until what stays fits.
        let mut used = s.pk.used[h];
        let mut count = s.pk.count[h];
        for &it in &items {
            if must.contains(&it) {
                for k in 0..DIMS {
                    used[k] -= p.items[it].demand[k];
                }
                count -= p.items[it].vms.len() as u32;
            }
        }
        let mut by_size = items.clone();
        by_size.sort_by_key(|it| std::cmp::Reverse(p.items[*it].demand));
        for it in by_size {
            let over = (0..DIMS).any(|k| used[k] > p.cap[h][k]) || count > p.max_vms;
            if !over {
                break;
            }
            if !must.contains(&it) {
                must.push(it);
                for k in 0..DIMS {
                    used[k] -= p.items[it].demand[k];
                }
                count -= p.items[it].vms.len() as u32;
            }
        }
    }
    let mut evacuated = 0;
    let mut stuck = Vec::new();
    let mut draining = vec![false; p.num_hosts()];
    for it in must {
        let from = s.pk.item_host[it].map(|h| h as usize);
        let n = p.items[it].vms.len();
        let target = if n <= budget_left {
            s.move_target(it, &draining)
        } else {
            None
        };
        match (from, target) {
            (Some(from), Some(to)) => {
                // The VM holds its source until the copy completes: reserve the target.
                s.unplace(it);
                s.place_unchecked(it, to);
                moves.push((it, from, to));
                budget_left -= n;
                evacuated += n;
            }
            _ => stuck.extend(p.items[it].vms.iter().map(|v| p.input.vms[*v as usize].id)),
        }
    }
    // 2. Consolidate: empty the least-loaded hosts while the budget lasts.
    let lb = lower_bound(p);
    let mut hosts: Vec<usize> = (0..p.num_hosts()).filter(|h| s.pk.count[*h] > 0).collect();
    let load = |s: &Solver<'_>, h: usize| -> f64 {
        (0..DIMS)
            .filter(|k| p.cap[h][*k] > 0)
            .map(|k| s.pk.used[h][k] as f64 / p.cap[h][k] as f64)
            .fold(0.0, f64::max)
    };
    hosts.sort_by(|a, b| load(&s, *a).total_cmp(&load(&s, *b)).then(a.cmp(b)));
    let mut failures = 0;
    for h in hosts {
        if deadline.expired() || budget_left == 0 || s.pk.hosts_used() <= lb.hosts || failures > 32
        {
            break;
        }
        let n: usize = s.pk.host_items[h]
            .iter()
            .map(|it| p.items[*it as usize].vms.len())
            .sum();
        if n == 0 || n > budget_left || p.host_block[h].is_some() {
            continue;
        }
        match s.try_empty_recorded(h, &mut draining) {
            Some(done) => {
                budget_left -= n;
                moves.extend(done.into_iter().map(|(it, to)| (it, h, to)));
                failures = 0;
            }
            None => failures += 1,
        }
    }
    let _ = settings;
    // Emit per VM, with dependencies.
    let mut migrations: Vec<Migration> = Vec::new();
    for (it, from, to) in moves {
        for &v in &p.items[it].vms {
            let vm = p.input.vms[v as usize].id;
            let (from_id, to_id) = (p.input.hosts[from].id, p.input.hosts[to].id);
            let after = migrations
                .iter()
                .enumerate()
                .filter(|(_, m)| m.from == to_id || m.vm == vm)
                .map(|(i, _)| i)
                .collect();
            migrations.push(Migration {
                vm,
                from: from_id,
                to: to_id,
                after,
            });
        }
    }
    let placement = s.pk.to_placement(p);
    Ok(RebalancePlan {
        hosts_after: s.pk.hosts_used(),
        migrations,
        hosts_before,
        evacuated,
        stuck,
        placement,
    })
}

/// Replays a plan from `current` with live-migration semantics (the VM counts on both
/// hosts while it moves) and returns the first step that would overload its target.
pub fn first_unsafe_step(p: &Problem, current: &Placement, plan: &[Migration]) -> Option<usize> {
    let nh = p.num_hosts();
    let mut used = vec![[0u64; DIMS]; nh];
    let mut count = vec![0u32; nh];
    let mut at = current.host_of.clone();
    for (v, h) in current.host_of.iter().enumerate() {
        if let Some(h) = h {
            for (k, d) in p.input.vms[v].demand.to_array().iter().enumerate() {
                used[*h as usize][k] += d;
            }
            count[*h as usize] += 1;
        }
    }
    for (i, m) in plan.iter().enumerate() {
        let (Some(v), Some(from), Some(to)) =
            (p.vm_idx(m.vm), p.host_idx(m.from), p.host_idx(m.to))
        else {
            return Some(i);
        };
        if at[v] != Some(from as u32) {
            return Some(i);
        }
        let d = p.input.vms[v].demand.to_array();
        for k in 0..DIMS {
            used[to][k] += d[k];
            if used[to][k] > p.cap[to][k] {
                return Some(i);
            }
        }
        count[to] += 1;
        if count[to] > p.max_vms {
            return Some(i);
        }
        for k in 0..DIMS {
            used[from][k] -= d[k];
        }
        count[from] -= 1;
        at[v] = Some(to as u32);
    }
    None
}
