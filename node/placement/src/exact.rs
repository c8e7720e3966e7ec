//! Exact solver: the placement MILP through `good_lp` with the pure-Rust `microlp` backend
//! (no C solver needed to build), for small instances and as the yardstick; and its LP
//! relaxation as a bound.
//!
//! Model (hard rules only; soft rules are the heuristics' business):
//! - `y_h` binary: host `h` is used; `x_ih` binary: item `i` (VMs tied by hard affinity)
//!   on host `h`, created only where the filter step allows it.
//! - every item on exactly one host; per dimension `sum_i d_ik / c_hk * x_ih <= y_h`
//!   (normalised for numerical sanity); `sum_i vms_i * x_ih <= max_vms * y_h`;
//!   `x_ih <= y_h` (tightens the relaxation); per hard anti-affinity group and host
//!   `sum_{i in g} x_ih <= 1`; `sum_h y_h >= ceil(lower bound)`.
//! - identical hosts (same capacity, labels, region, GPU model, RTT) are interchangeable:
//!   only as many of a class as the warm start uses are offered, and `y` is ordered within a
//!   class (`y_j >= y_{j+1}`), which removes symmetric branches.
//! - objective: minimise `sum_h y_h`. The heuristic's placement is the warm start.
//!
//! `microlp` reads the wall clock for its own time limit; that is the only clock use and
//! only when [`SolverSettings::max_time_ms`] is set.

use std::collections::BTreeMap;

use good_lp::{
    Expression, ProblemVariables, Solution, SolutionStatus, SolverModel, Variable,
    WithInitialSolution, WithTimeLimit, constraint, microlp, variable,
};
use serde::{Deserialize, Serialize};

use crate::bound::lower_bound;
use crate::control::SolverSettings;
use crate::model::DIMS;
use crate::problem::Problem;
use crate::state::Placement;

/// Why the exact solver gave no answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExactError {
    /// More VMs than [`SolverSettings::exact_max_vms`].
    #[error("instance has {vms} vms, exact solver limited to {limit}")]
    TooLarge {
        /// VMs.
        vms: usize,
        /// Limit.
        limit: usize,
    },
    /// Some VM has no host at all.
    #[error("no host can take some vm")]
    Infeasible,
    /// The solver failed (or hit the time limit before any solution).
    #[error("solver: {0}")]
    Solver(String),
}

/// Result of the exact solver.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExactOutput {
    /// The placement.
    pub placement: Placement,
    /// Hosts used.
    pub hosts_used: usize,
    /// True if optimality was proven (false: time limit hit, best found returned).
    pub proven_optimal: bool,
}

struct Model {
    vars: ProblemVariables,
    y: Vec<(usize, Variable)>,
    x: Vec<(usize, usize, Variable)>,
    constraints: Vec<good_lp::Constraint>,
    objective: Expression,
}

/// Host classes of interchangeable hosts, in host index order.
fn host_classes(p: &Problem) -> Vec<Vec<usize>> {
    let mut classes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for h in 0..p.num_hosts() {
        if p.host_block[h].is_some() {
            continue;
        }
        let host = &p.input.hosts[h];
        let key = format!(
            "{:?}|{:?}|{}|{:?}|{}",
            p.cap[h], host.labels, host.region, host.gpu_model, host.rtt_ms
        );
        classes.entry(key).or_default().push(h);
    }
    classes.into_values().collect()
}

fn build(
    p: &Problem,
    integer: bool,
    per_class: &BTreeMap<usize, usize>,
) -> Result<Model, ExactError> {
    let mut vars = ProblemVariables::new();
    let mut y = Vec::new();
    let mut constraints = Vec::new();
    let mut y_of = vec![None; p.num_hosts()];
    for class in host_classes(p) {
        let keep = per_class
            .get(&class[0])
            .copied()
            .unwrap_or(class.len())
            .min(class.len());
        let mut prev: Option<Variable> = None;
        for &h in &class[..keep] {
            let v = if integer {
                vars.add(variable().binary())
            } else {
                vars.add(variable().min(0).max(1))
            };
            if let Some(pv) = prev {
                constraints.push(constraint!(pv >= v));
            }
            prev = Some(v);
            y.push((h, v));
            y_of[h] = Some(v);
        }
    }
    let mut x = Vec::new();
    let mut per_item: Vec<Vec<(usize, Variable)>> = vec![Vec::new(); p.items.len()];
    for (it, slot) in per_item.iter_mut().enumerate() {
        for &(h, yh) in &y {
            if p.static_check(it, h, false).is_err() {
                continue;
            }
            let v = if integer {
                vars.add(variable().binary())
            } else {
                vars.add(variable().min(0).max(1))
            };
            constraints.push(constraint!(v <= yh));
            x.push((it, h, v));
            slot.push((h, v));
        }
        if slot.is_empty() {
            return Err(ExactError::Infeasible);
        }
        let sum: Expression = slot.iter().map(|(_, v)| *v).sum();
        constraints.push(constraint!(sum == 1));
    }
    // Per-host capacity, count and anti-affinity.
    let mut on_host: Vec<Vec<(usize, Variable)>> = vec![Vec::new(); p.num_hosts()];
    for &(it, h, v) in &x {
        on_host[h].push((it, v));
    }
    for &(h, yh) in &y {
        let list = &on_host[h];
        if list.is_empty() {
            continue;
        }
        for k in 0..DIMS {
            if p.cap[h][k] == 0 || list.iter().all(|(it, _)| p.items[*it].demand[k] == 0) {
                continue;
            }
            let load: Expression = list
                .iter()
                .map(|(it, v)| (p.items[*it].demand[k] as f64 / p.cap[h][k] as f64) * *v)
                .sum();
            constraints.push(constraint!(load <= yh));
        }
        let total_vms: usize = list.iter().map(|(it, _)| p.items[*it].vms.len()).sum();
        if total_vms > p.max_vms as usize {
            let count: Expression = list
                .iter()
                .map(|(it, v)| p.items[*it].vms.len() as f64 * *v)
                .sum();
            constraints.push(constraint!(count <= f64::from(p.max_vms) * yh));
        }
        let mut groups: BTreeMap<u32, Vec<Variable>> = BTreeMap::new();
        for (it, v) in list {
            for g in &p.items[*it].anti {
                groups.entry(*g).or_default().push(*v);
            }
        }
        for vs in groups.values().filter(|vs| vs.len() > 1) {
            let s: Expression = vs.iter().copied().sum();
            constraints.push(constraint!(s <= 1));
        }
    }
    let objective: Expression = y.iter().map(|(_, v)| *v).sum();
    let lb = lower_bound(p).hosts as f64;
    if lb > 0.0 {
        constraints.push(constraint!(objective.clone() >= lb));
    }
    Ok(Model {
        vars,
        y,
        x,
        constraints,
        objective,
    })
}

/// The LP relaxation's optimum: a lower bound on hosts used (fractional).
pub fn lp_relaxation(p: &Problem) -> Result<f64, ExactError> {
    let m = build(p, false, &BTreeMap::new())?;
    let mut model = m.vars.minimise(m.objective.clone()).using(microlp);
    for c in m.constraints {
        model.add_constraint(c);
    }
    let sol = model
        .solve()
        .map_err(|e| ExactError::Solver(e.to_string()))?;
    Ok(m.y.iter().map(|(_, v)| sol.value(*v)).sum())
}

/// Solves the placement MILP exactly (or to the time limit), warm-started from `warm`.
pub fn solve_exact(
    p: &Problem,
    settings: &SolverSettings,
    warm: Option<&Placement>,
) -> Result<ExactOutput, ExactError> {
    if p.num_vms() > settings.exact_max_vms {
        return Err(ExactError::TooLarge {
            vms: p.num_vms(),
            limit: settings.exact_max_vms,
        });
    }
    // A feasible placement bounds how many hosts of each class can be useful.
    let classes = host_classes(p);
    let mut per_class = BTreeMap::new();
    let mut class_of = vec![usize::MAX; p.num_hosts()];
    for (c, class) in classes.iter().enumerate() {
        for &h in class {
            class_of[h] = c;
        }
    }
    let mut warm_map: BTreeMap<usize, usize> = BTreeMap::new();
    if let Some(w) = warm {
        let complete = w.unplaced() == 0 && w.host_of.len() == p.num_vms();
        if complete {
            let total_used = w.hosts_used();
            for class in &classes {
                per_class.insert(class[0], total_used.min(class.len()));
            }
            // Relabel the warm start's hosts onto the first hosts of each class.
            let mut used: Vec<usize> = w.host_of.iter().flatten().map(|h| *h as usize).collect();
            used.sort_unstable();
            used.dedup();
            let mut next = vec![0usize; classes.len()];
            for h in used {
                let c = class_of[h];
                if c == usize::MAX {
                    continue;
                }
                warm_map.insert(h, classes[c][next[c]]);
                next[c] += 1;
            }
        }
    }
    let m = build(p, true, &per_class)?;
    let mut initial = Vec::new();
    if let Some(w) = warm
        && !warm_map.is_empty()
    {
        let mut item_host = vec![None; p.items.len()];
        for (it, item) in p.items.iter().enumerate() {
            item_host[it] =
                w.host_of[item.vms[0] as usize].and_then(|h| warm_map.get(&(h as usize)).copied());
        }
        let used: Vec<bool> = (0..p.num_hosts())
            .map(|h| item_host.contains(&Some(h)))
            .collect();
        for &(h, v) in &m.y {
            initial.push((v, if used[h] { 1.0 } else { 0.0 }));
        }
        for &(it, h, v) in &m.x {
            initial.push((v, if item_host[it] == Some(h) { 1.0 } else { 0.0 }));
        }
    }
    let mut model = m.vars.minimise(m.objective.clone()).using(microlp);
    if let Some(ms) = settings.max_time_ms {
        model = model.with_time_limit(ms as f64 / 1000.0);
    }
    if !initial.is_empty() {
        model = model.with_initial_solution(initial);
    }
    for c in m.constraints {
        model.add_constraint(c);
    }
    let sol = model
        .solve()
        .map_err(|e| ExactError::Solver(e.to_string()))?;
    let mut host_of = vec![None; p.num_vms()];
    for &(it, h, v) in &m.x {
        if sol.value(v) > 0.5 {
            for &vm in &p.items[it].vms {
                host_of[vm as usize] = Some(h as u32);
            }
        }
    }
    let placement = Placement { host_of };
    if placement.unplaced() > 0 {
        return Err(ExactError::Solver("solution leaves a vm unplaced".into()));
    }
    Ok(ExactOutput {
        hosts_used: placement.hosts_used(),
        placement,
        proven_optimal: matches!(sol.status(), SolutionStatus::Optimal),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{AvoidList, NoDeadline, Timestamp};
    use crate::heuristic::{Algorithm, solve};
    use crate::model::{Host, PlacementInput, Resources, Rule, RuleId, RuleKind, Vm, VmId};
    use crate::state::verify;

    fn problem(sizes: &[(u64, u64)], hosts: usize, rules: Vec<Rule>) -> Problem {
        let hosts = (0..hosts as u64)
            .map(|i| Host::new(i, Resources::cpu_mem(10, 10 * 1024)))
            .collect();
        let vms = sizes
            .iter()
            .enumerate()
            .map(|(i, (c, m))| Vm::new(i as u64, Resources::cpu_mem(*c, *m * 1024)))
            .collect();
        let config = crate::model::PlacementConfig {
            min_free_memory_permille: 0,
            ..Default::default()
        };
        Problem::compile(
            PlacementInput {
                hosts,
                vms,
                rules,
                config,
            },
            Timestamp(0),
            &AvoidList::default(),
        )
        .unwrap()
    }

    #[test]
    fn exact_finds_the_known_optimum() {
        // 6+4, 6+4, 5+5: three hosts are optimal (sum 30 on capacity 10).
        let p = problem(&[(6, 1), (6, 1), (5, 1), (5, 1), (4, 1), (4, 1)], 6, vec![]);
        let warm = solve(
            &p,
            Algorithm::FirstFitRandom,
            &SolverSettings::default(),
            &NoDeadline,
        );
        let out = solve_exact(&p, &SolverSettings::default(), Some(&warm.placement)).unwrap();
        assert_eq!(out.hosts_used, 3);
        assert!(out.proven_optimal);
        verify(&p, &out.placement).unwrap();
        let lp = lp_relaxation(&p).unwrap();
        assert!((3.0 - 1e-6..=3.0 + 1e-6).contains(&lp), "lp {lp}");
    }

    #[test]
    fn exact_respects_anti_affinity() {
        let rules = vec![Rule {
            id: RuleId("anti".into()),
            kind: RuleKind::VmAntiAffinity {
                vms: vec![VmId(0), VmId(1), VmId(2)],
            },
            hard: true,
        }];
        let p = problem(&[(1, 1), (1, 1), (1, 1)], 4, rules);
        let out = solve_exact(&p, &SolverSettings::default(), None).unwrap();
        assert_eq!(out.hosts_used, 3);
        verify(&p, &out.placement).unwrap();
    }

    #[test]
    fn exact_refuses_large_and_infeasible() {
        let p = problem(&[(1, 1); 60], 10, vec![]);
        assert!(matches!(
            solve_exact(&p, &SolverSettings::default(), None),
            Err(ExactError::TooLarge { .. })
        ));
        let p = problem(&[(11, 1)], 2, vec![]);
        assert_eq!(
            solve_exact(&p, &SolverSettings::default(), None).err(),
            Some(ExactError::Infeasible)
        );
    }
}
