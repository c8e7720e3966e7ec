//! Lower bounds on the number of hosts.
//!
//! For one host size this is the textbook `max(sum cpu / C, sum mem / M)`. With mixed host
//! sizes it generalises to: in each dimension, the fewest hosts whose combined capacity
//! covers the total demand, taking the largest hosts first (no set of `k` hosts offers more
//! than the `k` largest). The VM count against `max_vms_per_node` is one more dimension.
//! VMs pinned to a GPU model add a pool bound: each model's pool must give at least the
//! hosts its pinned VMs need, and only the rest of the demand is covered from the others.

use serde::{Deserialize, Serialize};

use crate::model::{DIM_GPU, DIM_NAMES, DIMS};
use crate::problem::Problem;

/// A lower bound on the hosts any feasible placement of all VMs uses.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LowerBound {
    /// Fractional bound (the last host counted by the share of it needed).
    pub fractional: f64,
    /// Integer bound, `ceil(fractional)`.
    pub hosts: usize,
    /// The dimension that gives the bound (`cpu`, `memory`, ..., or `vm-count`).
    pub binding: &'static str,
    /// False if even all usable hosts together cannot hold the demand in some dimension.
    pub coverable: bool,
}

/// Fewest hosts covering `demand` from `caps` (largest first), as a fraction.
fn cover(mut caps: Vec<u64>, demand: u64) -> (f64, bool) {
    if demand == 0 {
        return (0.0, true);
    }
    caps.sort_unstable_by(|a, b| b.cmp(a));
    let mut left = demand;
    for (i, c) in caps.iter().enumerate() {
        if *c >= left {
            return (i as f64 + left as f64 / *c as f64, true);
        }
        left -= c;
    }
    (caps.len() as f64, false)
}

/// The bound for all VMs of `p` over its usable hosts.
pub fn lower_bound(p: &Problem) -> LowerBound {
    let usable: Vec<usize> = (0..p.num_hosts())
        .filter(|h| p.host_block[*h].is_none())
        .collect();
    let mut demand = [0u64; DIMS];
    for it in &p.items {
        for k in 0..DIMS {
            demand[k] = demand[k].saturating_add(it.demand[k]);
        }
    }
    let mut best = (0.0, "cpu", true);
    for k in 0..DIMS {
        let (f, ok) = cover(usable.iter().map(|h| p.cap[*h][k]).collect(), demand[k]);
        best.2 &= ok;
        if f > best.0 {
            best = (f, DIM_NAMES[k], best.2);
        }
    }
    let (f, ok) = cover(vec![u64::from(p.max_vms); usable.len()], p.num_vms() as u64);
    best.2 &= ok;
    if f > best.0 {
        best = (f, "vm-count", best.2);
    }
    // VMs that need one GPU model can only use hosts with that model: each such pool must
    // supply at least enough of its hosts for them, and those hosts count in full.
    let mut pools: std::collections::BTreeMap<&str, (Vec<usize>, [u64; DIMS])> =
        std::collections::BTreeMap::new();
    for &h in &usable {
        if let Some(m) = &p.input.hosts[h].gpu_model {
            pools.entry(m.as_str()).or_default().0.push(h);
        }
    }
    let mut any_pinned = false;
    for it in &p.items {
        if it.demand[DIM_GPU] > 0
            && let Some(m) = &it.gpu_model
            && let Some(pool) = pools.get_mut(m.as_str())
        {
            any_pinned = true;
            for k in 0..DIMS {
                pool.1[k] = pool.1[k].saturating_add(it.demand[k]);
            }
        }
    }
    if any_pinned {
        let mut forced: Vec<(usize, &Vec<usize>)> = Vec::new();
        for (hosts, dem) in pools.values() {
            let mut need = 0.0f64;
            for k in 0..DIMS {
                need = need.max(cover(hosts.iter().map(|h| p.cap[*h][k]).collect(), dem[k]).0);
            }
            forced.push((((need - 1e-9).ceil().max(0.0)) as usize, hosts));
        }
        let n_forced: usize = forced.iter().map(|(n, _)| *n).sum();
        for k in 0..DIMS {
            // Per dimension, the forced hosts are at best the largest of their pool.
            let mut left: Vec<u64> = Vec::new();
            let mut supplied = 0u64;
            let mut in_pool = vec![false; p.num_hosts()];
            for (n, hosts) in &forced {
                let mut caps: Vec<u64> = hosts.iter().map(|h| p.cap[*h][k]).collect();
                caps.sort_unstable_by(|a, b| b.cmp(a));
                supplied = supplied.saturating_add(caps.iter().take(*n).sum::<u64>());
                left.extend(caps.iter().skip(*n));
                for h in hosts.iter() {
                    in_pool[*h] = true;
                }
            }
            left.extend(
                usable
                    .iter()
                    .filter(|h| !in_pool[**h])
                    .map(|h| p.cap[*h][k]),
            );
            let (f, ok) = cover(left, demand[k].saturating_sub(supplied));
            best.2 &= ok;
            let total = n_forced as f64 + f;
            if total > best.0 {
                best = (total, DIM_NAMES[k], best.2);
            }
        }
    }
    // Guard against float noise turning 12.000000001 into 13.
    let hosts = (best.0 - 1e-9).ceil().max(0.0) as usize;
    LowerBound {
        fractional: best.0,
        hosts,
        binding: best.1,
        coverable: best.2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{AvoidList, Timestamp};
    use crate::model::{Host, PlacementConfig, PlacementInput, Resources, Vm};

    #[test]
    fn textbook_bound_on_one_host_size() {
        let hosts = (0..10)
            .map(|i| Host::new(i, Resources::cpu_mem(48, 192 * 1024)))
            .collect();
        // 100 vCPU, 100 GiB: cpu binds at 100/48.
        let vms = (0..50)
            .map(|i| Vm::new(i, Resources::cpu_mem(2, 2048)))
            .collect();
        let config = PlacementConfig {
            min_free_memory_permille: 0,
            ..Default::default()
        };
        let p = Problem::compile(
            PlacementInput {
                hosts,
                vms,
                rules: vec![],
                config,
            },
            Timestamp(0),
            &AvoidList::default(),
        )
        .unwrap();
        let b = lower_bound(&p);
        assert!((b.fractional - 100.0 / 48.0).abs() < 1e-9);
        assert_eq!(b.hosts, 3);
        assert_eq!(b.binding, "cpu");
        assert!(b.coverable);
    }

    #[test]
    fn mixed_sizes_take_largest_first() {
        let mut hosts: Vec<Host> = (0..3)
            .map(|i| Host::new(i, Resources::cpu_mem(48, 1 << 20)))
            .collect();
        hosts.push(Host::new(9, Resources::cpu_mem(96, 1 << 20)));
        let vms = (0..120)
            .map(|i| Vm::new(i, Resources::cpu_mem(1, 1)))
            .collect();
        let p = Problem::compile(
            PlacementInput {
                hosts,
                vms,
                rules: vec![],
                config: Default::default(),
            },
            Timestamp(0),
            &AvoidList::default(),
        )
        .unwrap();
        // 96 from the big host, then 24 of a 48 = 1.5; but vm-count: 120 / 100 = 1.2.
        let b = lower_bound(&p);
        assert!((b.fractional - 1.5).abs() < 1e-9);
        assert_eq!(b.hosts, 2);
    }

    #[test]
    fn gpu_pool_tightens_the_bound() {
        // Three 2-GPU hosts and three plain ones; three VMs pinned to a100 need 3 GPUs.
        let mut hosts: Vec<Host> = (0..6)
            .map(|i| Host::new(i, Resources::cpu_mem(10, 1 << 20)))
            .collect();
        for h in hosts.iter_mut().take(3) {
            h.capacity.gpus = 2;
            h.gpu_model = Some("a100".into());
        }
        let mut vms: Vec<Vm> = (0..3)
            .map(|i| {
                let mut v = Vm::new(i, Resources::cpu_mem(1, 1));
                v.demand.gpus = 1;
                v.gpu_model = Some("a100".into());
                v
            })
            .collect();
        vms.push(Vm::new(10, Resources::cpu_mem(1, 1)));
        let config = PlacementConfig {
            min_free_memory_permille: 0,
            ..Default::default()
        };
        let p = Problem::compile(
            PlacementInput {
                hosts,
                vms,
                rules: vec![],
                config,
            },
            Timestamp(0),
            &AvoidList::default(),
        )
        .unwrap();
        // Plain bound: 3 GPUs over 2-GPU hosts = 1.5; pool bound: 2 GPU hosts forced.
        let b = lower_bound(&p);
        assert!((b.fractional - 2.0).abs() < 1e-9, "{b:?}");
        assert_eq!(b.hosts, 2);
    }
}
