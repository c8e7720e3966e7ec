//! Property tests: every solver's output is feasible (capacity, eligibility, hard affinity
//! and anti-affinity), online placements never break a rule, and rebalancing plans never
//! overload a host at any step, whatever the instance.

use std::collections::BTreeSet;

use dwcp_placement::model::HostMatch;
use dwcp_placement::rng::SplitMix64;
use dwcp_placement::{
    Algorithm, AvoidList, Health, Host, HostId, NoDeadline, OnlinePlacer, Placement,
    PlacementConfig, PlacementInput, Problem, Resources, Rule, RuleId, RuleKind, SolverSettings,
    Timestamp, Vm, VmId, first_unsafe_step, order_migrations, rebalance, solve, solve_exact,
    verify,
};
use proptest::prelude::*;

/// A random instance: mixed host sizes (some GPU, labelled, blocked), VMs with random
/// shapes and requirements, and random hard and soft rules.
fn instance(seed: u64, max_hosts: u64, max_vms: u64) -> PlacementInput {
    let mut r = SplitMix64::new(seed);
    let n_hosts = 2 + r.below(max_hosts - 1);
    let mut hosts = Vec::new();
    for i in 0..n_hosts {
        let cpu = [4, 8, 16, 32][r.below(4) as usize];
        let mut h = Host::new(
            i,
            Resources::cpu_mem(cpu, cpu * [2, 4, 8][r.below(3) as usize] * 1024),
        );
        if r.unit() < 0.25 {
            h.capacity.gpus = 1 + r.below(4);
            h.gpu_model = Some(["a100", "l4"][r.below(2) as usize].into());
        }
        if r.unit() < 0.3 {
            h.labels = BTreeSet::from(["ssd".to_owned()]);
        }
        if r.unit() < 0.1 {
            h.quarantined = true;
        }
        if r.unit() < 0.1 {
            h.health = Health::Unhealthy;
        }
        h.donated_permille = [1000, 750, 500][r.below(3) as usize];
        h.region = ["eu", "us"][r.below(2) as usize].into();
        hosts.push(h);
    }
    let n_vms = 1 + r.below(max_vms);
    let mut vms = Vec::new();
    for i in 0..n_vms {
        let cpu = 1 + r.below(8);
        let mut v = Vm::new(i, Resources::cpu_mem(cpu, (1 + r.below(16)) * 1024));
        if r.unit() < 0.15 {
            v.demand.gpus = 1 + r.below(2);
            if r.unit() < 0.5 {
                v.gpu_model = Some(["a100", "l4"][r.below(2) as usize].into());
            }
        }
        if r.unit() < 0.1 {
            v.region = Some("eu".into());
        }
        vms.push(v);
    }
    let mut rules = Vec::new();
    for j in 0..r.below(6) {
        let k = 2 + r.below(3);
        let members: Vec<VmId> = (0..k)
            .map(|_| VmId(r.below(n_vms)))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let kind = match r.below(3) {
            0 => RuleKind::VmAffinity { vms: members },
            1 => RuleKind::VmAntiAffinity { vms: members },
            _ => RuleKind::Host {
                vm: members[0],
                target: if r.unit() < 0.5 {
                    HostMatch::Label("ssd".into())
                } else {
                    HostMatch::Region("us".into())
                },
                affine: r.unit() < 0.5,
            },
        };
        rules.push(Rule {
            id: RuleId(format!("rule-{j}")),
            kind,
            hard: r.unit() < 0.7,
        });
    }
    let config = PlacementConfig {
        max_vms_per_node: 2 + r.below(10) as u32,
        ..PlacementConfig::default()
    };
    PlacementInput {
        hosts,
        vms,
        rules,
        config,
    }
}

fn compile(input: PlacementInput) -> Option<Problem> {
    // Randomly drawn rules can contradict each other; that is a clean error, not a case.
    Problem::compile(input, Timestamp(0), &AvoidList::default()).ok()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn heuristic_output_is_always_feasible(seed in any::<u64>()) {
        let Some(p) = compile(instance(seed, 12, 60)) else { return Ok(()) };
        for alg in [Algorithm::FirstFitDecreasing, Algorithm::FirstFitRandom, Algorithm::BestFit, Algorithm::SpreadRepack] {
            let out = solve(&p, alg, &SolverSettings { seed, ..SolverSettings::default() }, &NoDeadline);
            prop_assert_eq!(out.placement.host_of.len(), p.num_vms());
            if let Err(v) = verify(&p, &out.placement) {
                return Err(TestCaseError::fail(format!("{}: {v}", alg.name())));
            }
            prop_assert_eq!(out.hosts_used, out.placement.hosts_used());
        }
    }

    #[test]
    fn online_placements_never_break_rules(seed in any::<u64>()) {
        let input = instance(seed, 10, 40);
        let Some(p) = compile(input.clone()) else { return Ok(()) };
        let mut online = OnlinePlacer::new(
            input.hosts.clone(), input.rules.clone(), input.config.clone(), Timestamp(0), &AvoidList::default(),
        ).unwrap();
        let mut host_of = vec![None; input.vms.len()];
        for (i, vm) in input.vms.iter().enumerate() {
            if let Ok(d) = online.place(vm) {
                host_of[i] = p.host_idx(d.host).map(|h| h as u32);
            }
        }
        let pl = Placement { host_of };
        if let Err(v) = verify(&p, &pl) {
            return Err(TestCaseError::fail(format!("online: {v}")));
        }
    }

    #[test]
    fn rebalancing_never_overloads_a_host_at_any_step(seed in any::<u64>(), budget in 0usize..40) {
        let mut input = instance(seed, 12, 60);
        let Some(p0) = compile(input.clone()) else { return Ok(()) };
        let start = solve(&p0, Algorithm::FirstFitRandom, &SolverSettings { seed, ..SolverSettings::default() }, &NoDeadline);
        // Then the world changes: one host is quarantined, another donates less.
        let mut r = SplitMix64::new(seed ^ 0xdead);
        let n = input.hosts.len() as u64;
        input.hosts[r.below(n) as usize].quarantined = true;
        input.hosts[r.below(n) as usize].donated_permille /= 2;
        let p = compile(input).expect("same rules compile");
        let plan = rebalance(&p, &start.placement, budget, &SolverSettings::default(), &NoDeadline).unwrap();
        prop_assert!(plan.migrations.len() <= budget);
        prop_assert_eq!(first_unsafe_step(&p, &start.placement, &plan.migrations), None);
        // Anti-affinity holds at every step (the moving VM counted on both hosts).
        let mut at: Vec<BTreeSet<HostId>> = start
            .placement
            .host_of
            .iter()
            .map(|h| h.map(|h| p.input().hosts[h as usize].id).into_iter().collect())
            .collect();
        for m in &plan.migrations {
            let v = p.vm_idx(m.vm).unwrap();
            for dep in &m.after {
                prop_assert!(*dep < plan.migrations.len());
            }
            at[v].insert(m.to);
            for rule in &p.input().rules {
                if let (true, RuleKind::VmAntiAffinity { vms }) = (rule.hard, &rule.kind) {
                    // A VM may be on two hosts mid-move; two VMs of the rule may not share one.
                    let hosts: Vec<HostId> = vms.iter().flat_map(|o| at[p.vm_idx(*o).unwrap()].iter().copied()).collect();
                    let uniq: BTreeSet<HostId> = hosts.iter().copied().collect();
                    prop_assert_eq!(uniq.len(), hosts.len(), "anti-affinity {} broken mid-plan", rule.id);
                }
            }
            at[v].remove(&m.from);
        }
        if plan.stuck.is_empty()
            && let Err(v) = verify(&p, &plan.placement)
        {
            return Err(TestCaseError::fail(format!("after plan: {v}")));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn exact_output_is_feasible_and_never_worse(seed in any::<u64>()) {
        let Some(p) = compile(instance(seed, 5, 9)) else { return Ok(()) };
        let settings = SolverSettings { max_time_ms: Some(5_000), ..SolverSettings::default() };
        let ours = solve(&p, Algorithm::SpreadRepack, &settings, &NoDeadline);
        match solve_exact(&p, &settings, (ours.unplaced == 0).then_some(&ours.placement)) {
            Ok(exact) => {
                if let Err(v) = verify(&p, &exact.placement) {
                    return Err(TestCaseError::fail(format!("exact: {v}")));
                }
                prop_assert_eq!(exact.placement.unplaced(), 0);
                if ours.unplaced == 0 && exact.proven_optimal {
                    prop_assert!(exact.hosts_used <= ours.hosts_used);
                }
            }
            // Infeasible instances (some VM fits no host) are allowed; the heuristic must
            // then leave something unplaced.
            Err(_) => prop_assert!(ours.unplaced > 0 || p.num_vms() == 0),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn ordered_migrations_to_any_target_are_safe(seed in any::<u64>()) {
        let Some(p) = compile(instance(seed, 10, 25)) else { return Ok(()) };
        let current = solve(&p, Algorithm::FirstFitRandom, &SolverSettings { seed, ..SolverSettings::default() }, &NoDeadline);
        let target = solve(&p, Algorithm::SpreadRepack, &SolverSettings::default(), &NoDeadline);
        match order_migrations(&p, &current.placement, &target.placement) {
            Ok(plan) => {
                prop_assert_eq!(first_unsafe_step(&p, &current.placement, &plan), None);
                // Replaying the plan lands every moved VM on its target.
                let mut at = current.placement.host_of.clone();
                for m in &plan {
                    at[p.vm_idx(m.vm).unwrap()] = p.host_idx(m.to).map(|h| h as u32);
                }
                for (v, t) in target.placement.host_of.iter().enumerate() {
                    if t.is_some() && current.placement.host_of[v].is_some() {
                        prop_assert_eq!(at[v], *t);
                    }
                }
            }
            // Allowed only when no staging host has room; never a wrong plan.
            Err(e) => prop_assert!(matches!(e, dwcp_placement::OrderError::Stuck(_)), "{e}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn ordering_with_a_spare_host_always_succeeds(seed in any::<u64>()) {
        let mut r = SplitMix64::new(seed);
        let n_hosts = 3 + r.below(6);
        let hosts = (0..n_hosts).map(|i| Host::new(i, Resources::cpu_mem(8, 1 << 20))).collect();
        let vms = (0..5 + r.below(30)).map(|i| Vm::new(i, Resources::cpu_mem(1 + r.below(4), 1024))).collect();
        let p = compile(PlacementInput { hosts, vms, rules: vec![], config: PlacementConfig::default() }).unwrap();
        let current = solve(&p, Algorithm::FirstFitRandom, &SolverSettings { seed, ..SolverSettings::default() }, &NoDeadline);
        let target = solve(&p, Algorithm::SpreadRepack, &SolverSettings::default(), &NoDeadline);
        if current.unplaced > 0 || target.unplaced > 0 || current.hosts_used == p.num_hosts() {
            return Ok(());
        }
        let plan = order_migrations(&p, &current.placement, &target.placement);
        prop_assert!(plan.is_ok(), "{:?}", plan.err());
        prop_assert_eq!(first_unsafe_step(&p, &current.placement, &plan.unwrap_or_default()), None);
    }
}
