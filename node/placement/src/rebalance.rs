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
use crate::control::{AvoidList, Deadline, NoDeadline, SolverSettings, Timestamp};
use crate::heuristic::Solver;
use crate::model::{DIM_CPU, DIM_MEM, DIMS, HostId, PlacementInput, RuleKind, VmId};
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
    // 3. Windows: re-solve a few hosts whose free capacity is lopsided (full in one
    //    dimension, idle in another) together with the lightest ones; keep the result when
    //    it frees a host and its safe ordering fits the budget.
    let mut tried = vec![false; p.num_hosts()];
    for _ in 0..settings.max_rounds.saturating_mul(8) {
        if deadline.expired() || budget_left == 0 || s.pk.hosts_used() <= lb.hosts {
            break;
        }
        let Some(window) = pick_window(p, &s, &tried) else {
            break;
        };
        for &h in &window {
            tried[h] = true;
        }
        let current_pl = s.pk.to_placement(p);
        let Some(target) = resolve_window(p, &current_pl, &window, settings) else {
            continue;
        };
        let Ok(order) = order_migrations(p, &current_pl, &target) else {
            continue;
        };
        if order.len() > budget_left {
            continue;
        }
        budget_left -= order.len();
        for m in order {
            let (Some(v), Some(to)) = (p.vm_idx(m.vm), p.host_idx(m.to)) else {
                continue;
            };
            let it = p.vm_item[v] as usize;
            if let Some(from) = s.pk.item_host[it].map(|h| h as usize)
                && from != to
            {
                s.force_open(to);
                s.unplace(it);
                s.place_unchecked(it, to);
                moves.push((it, from, to));
            }
        }
    }
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

/// Window size for re-solving in [`rebalance`].
const WINDOW: usize = 12;

/// Hosts to re-solve together: the most lopsided (largest spread between their free shares
/// across CPU and memory) and the lightest, not tried before.
fn pick_window(p: &Problem, s: &Solver<'_>, tried: &[bool]) -> Option<Vec<usize>> {
    let share = |h: usize, k: usize| {
        if p.cap[h][k] == 0 {
            0.0
        } else {
            p.cap[h][k].saturating_sub(s.pk.used[h][k]) as f64 / p.cap[h][k] as f64
        }
    };
    let used: Vec<usize> = (0..p.num_hosts())
        .filter(|h| s.pk.count[*h] > 0 && p.host_block[*h].is_none() && !tried[*h])
        .collect();
    if used.len() < 2 {
        return None;
    }
    let lopsided = |h: usize| share(h, DIM_CPU) - share(h, DIM_MEM);
    let mut by_cpu_idle = used.clone();
    by_cpu_idle.sort_by(|a, b| lopsided(*b).total_cmp(&lopsided(*a)).then(a.cmp(b)));
    let mut window: Vec<usize> = Vec::new();
    let push = |w: &mut Vec<usize>, h: usize| {
        if !w.contains(&h) && w.len() < WINDOW {
            w.push(h);
        }
    };
    // CPU idle (memory full) and memory idle (CPU full) in equal parts, then the lightest.
    for i in 0..WINDOW / 3 {
        if let Some(&h) = by_cpu_idle.get(i) {
            push(&mut window, h);
        }
        if let Some(&h) = by_cpu_idle.get(by_cpu_idle.len().saturating_sub(1 + i)) {
            push(&mut window, h);
        }
    }
    let mut light = used;
    light.sort_by(|a, b| {
        (1.0 - share(*a, DIM_CPU).min(share(*a, DIM_MEM)))
            .total_cmp(&(1.0 - share(*b, DIM_CPU).min(share(*b, DIM_MEM))))
            .then(a.cmp(b))
    });
    for h in light {
        push(&mut window, h);
    }
    (window.len() >= 2).then_some(window)
}

/// Re-solves the items on `window` onto `window` alone; the full placement with that part
/// replaced if it uses fewer hosts.
fn resolve_window(
    p: &Problem,
    current: &Placement,
    window: &[usize],
    settings: &SolverSettings,
) -> Option<Placement> {
    let mut in_window = vec![usize::MAX; p.num_hosts()];
    for (i, h) in window.iter().enumerate() {
        in_window[*h] = i;
    }
    let vms: Vec<usize> = (0..p.num_vms())
        .filter(|v| current.host_of[*v].is_some_and(|h| in_window[h as usize] != usize::MAX))
        .collect();
    let mut local = vec![usize::MAX; p.num_vms()];
    for (i, v) in vms.iter().enumerate() {
        local[*v] = i;
    }
    // Rules restricted to the window's VMs (VMs outside sit on hosts outside the window).
    let mut rules = Vec::new();
    for r in &p.input.rules {
        let keep = |id: &VmId| p.vm_idx(*id).is_some_and(|v| local[v] != usize::MAX);
        let kind = match &r.kind {
            RuleKind::VmAffinity { vms } | RuleKind::VmAntiAffinity { vms } => {
                let kept: Vec<VmId> = vms.iter().copied().filter(keep).collect();
                if kept.len() < 2 {
                    continue;
                }
                if matches!(r.kind, RuleKind::VmAffinity { .. }) {
                    RuleKind::VmAffinity { vms: kept }
                } else {
                    RuleKind::VmAntiAffinity { vms: kept }
                }
            }
            RuleKind::Host { vm, .. } => {
                if !keep(vm) {
                    continue;
                }
                r.kind.clone()
            }
        };
        rules.push(crate::model::Rule {
            id: r.id.clone(),
            kind,
            hard: r.hard,
        });
    }
    let input = PlacementInput {
        hosts: window.iter().map(|h| p.input.hosts[*h].clone()).collect(),
        vms: vms.iter().map(|v| p.input.vms[*v].clone()).collect(),
        rules,
        config: p.input.config.clone(),
    };
    let sub = Problem::compile(input, Timestamp(0), &AvoidList::default()).ok()?;
    let out = crate::heuristic::solve(
        &sub,
        crate::heuristic::Algorithm::SpreadRepack,
        settings,
        &NoDeadline,
    );
    // Every window host runs VMs (pick_window takes hosts in use only).
    let before = window.len();
    if out.unplaced > 0 || out.hosts_used >= before {
        return None;
    }
    // Interchangeable hosts (same capacity and attributes) may swap bins: give each bin
    // the host that already holds most of its VMs, so fewer VMs move.
    let n = window.len();
    let same = |a: usize, b: usize| {
        let (ha, hb) = (&p.input.hosts[a], &p.input.hosts[b]);
        p.cap[a] == p.cap[b]
            && ha.labels == hb.labels
            && ha.region == hb.region
            && ha.gpu_model == hb.gpu_model
            && ha.rtt_ms == hb.rtt_ms
    };
    let mut overlap = vec![vec![0usize; n]; n]; // [bin][window host]
    for (i, v) in vms.iter().enumerate() {
        if let (Some(b), Some(h)) = (out.placement.host_of[i], current.host_of[*v]) {
            overlap[b as usize][in_window[h as usize]] += 1;
        }
    }
    let mut pairs: Vec<(usize, usize, usize)> = Vec::new();
    for (b, row) in overlap.iter().enumerate() {
        for (h, o) in row.iter().enumerate() {
            if same(window[b], window[h]) {
                pairs.push((*o, b, h));
            }
        }
    }
    pairs.sort_by(|x, y| y.0.cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let mut bin_host = vec![usize::MAX; n];
    let mut host_taken = vec![false; n];
    for (_, b, h) in pairs {
        if bin_host[b] == usize::MAX && !host_taken[h] {
            bin_host[b] = h;
            host_taken[h] = true;
        }
    }
    let mut target = current.clone();
    for (i, v) in vms.iter().enumerate() {
        target.host_of[*v] = out.placement.host_of[i].map(|b| {
            let h = bin_host[b as usize];
            window[if h == usize::MAX { b as usize } else { h }] as u32
        });
    }
    Some(target)
}

/// Replays a plan from `current` with live-migration semantics (the VM counts on both
/// hosts while it moves) and returns the first step that would overload its target, or
/// that names a VM or host that is not where the plan says (`Some(0)` if `current` itself
/// does not match the problem).
pub fn first_unsafe_step(p: &Problem, current: &Placement, plan: &[Migration]) -> Option<usize> {
    let nh = p.num_hosts();
    let mut used = vec![[0u64; DIMS]; nh];
    let mut count = vec![0u32; nh];
    let mut at = current.host_of.clone();
    if current.host_of.len() != p.num_vms()
        || current.host_of.iter().flatten().any(|h| *h as usize >= nh)
    {
        return Some(0);
    }
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

/// Why no safe order to a target placement was found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// Placements do not match the problem.
    #[error("placements have {got} entries for {want} vms")]
    Length {
        /// Entries.
        got: usize,
        /// VMs.
        want: usize,
    },
    /// VMs bound by hard affinity are split in one of the placements.
    #[error("{0} is split from the VMs it has hard affinity with")]
    SplitAffinity(VmId),
    /// A host index out of range.
    #[error("host index {0} out of range")]
    UnknownHost(u32),
    /// Some moves can neither run nor go through a staging host (e.g. the target itself is
    /// over capacity).
    #[error("{0} migrations cannot be ordered safely")]
    Stuck(usize),
}

/// Orders the migrations from `current` to `target` so that executing them in order (or in
/// parallel along [`Migration::after`]) never overloads a host. Moves that block each other
/// in a cycle go through a staging host with room (one extra migration each). VMs that
/// `target` leaves unplaced stay where they are.
pub fn order_migrations(
    p: &Problem,
    current: &Placement,
    target: &Placement,
) -> Result<Vec<Migration>, OrderError> {
    for pl in [current, target] {
        if pl.host_of.len() != p.num_vms() {
            return Err(OrderError::Length {
                got: pl.host_of.len(),
                want: p.num_vms(),
            });
        }
    }
    for pl in [current, target] {
        if let Some(h) = pl
            .host_of
            .iter()
            .flatten()
            .find(|h| **h as usize >= p.num_hosts())
        {
            return Err(OrderError::UnknownHost(*h));
        }
    }
    let mut s = Solver::new(p);
    let mut goal = vec![None; p.items.len()];
    for (it, item) in p.items.iter().enumerate() {
        let (c0, t0) = (
            current.host_of[item.vms[0] as usize],
            target.host_of[item.vms[0] as usize],
        );
        for &v in &item.vms {
            if current.host_of[v as usize] != c0 || target.host_of[v as usize] != t0 {
                return Err(OrderError::SplitAffinity(p.input.vms[v as usize].id));
            }
        }
        if let Some(h) = c0 {
            s.force_open(h as usize);
            s.place_unchecked(it, h as usize);
        }
        if let Some(t) = t0 {
            s.force_open(t as usize);
            if c0.is_some() && c0 != Some(t) {
                goal[it] = Some(t as usize);
            }
        }
    }
    let mut pending: Vec<usize> = (0..p.items.len())
        .filter(|it| goal[*it].is_some())
        .collect();
    let mut moves: Vec<(usize, usize, usize)> = Vec::new();
    let mut hops = 0;
    while !pending.is_empty() {
        let mut progress = false;
        let mut i = 0;
        while i < pending.len() {
            let it = pending[i];
            let to = goal[it].unwrap_or_default();
            if s.pk.check(p, it, to, false).is_ok() {
                let from = s.unplace(it).unwrap_or(to);
                s.place_unchecked(it, to);
                moves.push((it, from, to));
                pending.swap_remove(i);
                progress = true;
            } else {
                i += 1;
            }
        }
        if progress {
            continue;
        }
        // A cycle: park one VM on a host with room, then carry on.
        if hops >= p.items.len() {
            return Err(OrderError::Stuck(pending.len()));
        }
        // Park a VM that sits on another pending move's target, on a host no pending move
        // targets (tightest fit), so the cycle opens.
        let mut is_goal = vec![false; p.num_hosts()];
        for &it in &pending {
            if let Some(g) = goal[it] {
                is_goal[g] = true;
            }
        }
        let mut parked = false;
        let blockers: Vec<usize> = pending
            .iter()
            .copied()
            .filter(|it| s.pk.item_host[*it].is_some_and(|h| is_goal[h as usize]))
            .collect();
        for it in blockers {
            let Some(from) = s.pk.item_host[it].map(|h| h as usize) else {
                continue;
            };
            let mut stage: Option<(u64, usize)> = None;
            for h in 0..p.num_hosts() {
                if h == from || is_goal[h] || p.host_block[h].is_some() {
                    continue;
                }
                if s.pk.check(p, it, h, false).is_ok() {
                    let free = p.cap[h][0].saturating_sub(s.pk.used[h][0]);
                    if stage.is_none_or(|(f, _)| free < f) {
                        stage = Some((free, h));
                    }
                }
            }
            if let Some((_, stage)) = stage {
                s.force_open(stage);
                s.unplace(it);
                s.place_unchecked(it, stage);
                moves.push((it, from, stage));
                hops += 1;
                parked = true;
                break;
            }
        }
        if !parked {
            return Err(OrderError::Stuck(pending.len()));
        }
    }
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
    Ok(migrations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{AvoidList, NoDeadline, Timestamp};
    use crate::model::{Host, PlacementConfig, PlacementInput, Resources, Vm};

    fn two_full_hosts() -> Problem {
        let hosts = (0..3)
            .map(|i| Host::new(i, Resources::cpu_mem(4, 1 << 20)))
            .collect();
        let vms = (0..4)
            .map(|i| Vm::new(i, Resources::cpu_mem(2, 1024)))
            .collect();
        let config = PlacementConfig {
            min_free_memory_permille: 0,
            ..Default::default()
        };
        Problem::compile(
            PlacementInput {
                hosts,
                vms,
                rules: vec![],
                config,
            },
            Timestamp(0),
            &AvoidList::default(),
        )
        .unwrap()
    }

    #[test]
    fn swap_between_full_hosts_goes_through_staging() {
        let p = two_full_hosts();
        // Hosts 0 and 1 are full; the target swaps VM 1 and VM 2.
        let current = Placement {
            host_of: vec![Some(0), Some(0), Some(1), Some(1)],
        };
        let target = Placement {
            host_of: vec![Some(0), Some(1), Some(0), Some(1)],
        };
        let plan = order_migrations(&p, &current, &target).unwrap();
        assert_eq!(plan.len(), 3, "{plan:?}");
        assert_eq!(first_unsafe_step(&p, &current, &plan), None);
        // The naive two-step order overloads a host at its first step.
        let naive = vec![
            Migration {
                vm: VmId(1),
                from: HostId(0),
                to: HostId(1),
                after: vec![],
            },
            Migration {
                vm: VmId(2),
                from: HostId(1),
                to: HostId(0),
                after: vec![],
            },
        ];
        assert_eq!(first_unsafe_step(&p, &current, &naive), Some(0));
    }

    #[test]
    fn rebalance_evacuates_a_quarantined_host_within_budget() {
        let mut input = two_full_hosts().input().clone();
        input
            .hosts
            .push(Host::new(3, Resources::cpu_mem(8, 1 << 20)));
        input.hosts[0].quarantined = true;
        let p = Problem::compile(input, Timestamp(0), &AvoidList::default()).unwrap();
        let current = Placement {
            host_of: vec![Some(0), Some(0), Some(1), None],
        };
        let plan = rebalance(&p, &current, 1, &SolverSettings::default(), &NoDeadline).unwrap();
        assert_eq!(plan.migrations.len(), 1);
        assert_eq!(plan.stuck.len(), 1, "budget 1 leaves one VM stuck");
        let plan = rebalance(&p, &current, 10, &SolverSettings::default(), &NoDeadline).unwrap();
        assert_eq!(plan.evacuated, 2);
        assert!(plan.stuck.is_empty());
        // Evacuations come first; draining the lightly used host 1 may follow.
        assert!(plan.migrations[..2].iter().all(|m| m.from == HostId(0)));
        assert!(plan.placement.host_of.iter().all(|h| *h != Some(0)));
        assert_eq!(first_unsafe_step(&p, &current, &plan.migrations), None);
        assert_eq!(migration_budget(1000, 0.05, 15 * 60 * 1000), 12);
    }
}
