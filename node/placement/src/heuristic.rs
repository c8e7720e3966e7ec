//! Heuristic solvers: the baselines (first-fit decreasing, first fit in random order, best
//! fit) and ours, *spread-then-repack*.
//!
//! ## Why FFD strands capacity, and what ours does instead
//!
//! FFD sorts by size and packs the largest VMs first into the first host that takes them.
//! On the Azure mix the largest VMs by dominant share are the memory-heavy shapes (8 vCPU /
//! 56 GB): FFD puts three of them on one 48c/192G host, which is then full in memory with
//! half its CPU stranded, and it does that for every one of them. CPU, the binding resource
//! of the whole fleet, ends up idle on those hosts.
//!
//! Ours knows from the lower bound `L` how many hosts the demand needs at least, so it
//! opens the `L` largest usable hosts up front and places items largest first onto the
//! open host with the most free capacity in the binding dimension, ranked among the top
//! candidates by a weighted dot product of the item with the host's free vector (weights =
//! fleet-wide scarcity per dimension). Memory-heavy VMs therefore land one per host and
//! small CPU-heavy VMs fill around them, so each host's mix tracks the fleet's mix. Items
//! that fit nowhere open the next host. Then a repack phase empties the least-loaded hosts:
//! it moves each of their items to the tightest other host that takes it (best fit through
//! an index of hosts by free capacity) and keeps the result only if the whole host empties.
//!
//! Candidate hosts come from a `BTreeSet` of `(free capacity in the binding dimension,
//! host)`, so one placement costs `O(log H + K)` checks, not `O(H)`: that is what makes
//! 100,000 VMs on 10,000 hosts a seconds-scale job.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::bound::lower_bound;
use crate::control::{Deadline, EvalCounts, SolverSettings};
use crate::model::DIMS;
use crate::problem::Problem;
use crate::rng::SplitMix64;
use crate::state::{Packing, Placement};

/// The heuristic algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algorithm {
    /// First-fit decreasing by dominant share (the classic baseline).
    FirstFitDecreasing,
    /// First fit in a random order (seeded).
    FirstFitRandom,
    /// Best fit in input (arrival) order: the host left with least normalised free space.
    BestFit,
    /// Ours: spread over the lower-bound host set, then repack lightly loaded hosts.
    SpreadRepack,
}

impl Algorithm {
    /// Short display name.
    pub fn name(self) -> &'static str {
        match self {
            Self::FirstFitDecreasing => "ffd",
            Self::FirstFitRandom => "first-fit-random",
            Self::BestFit => "best-fit",
            Self::SpreadRepack => "ours (spread+repack)",
        }
    }
}

/// Result of a solve.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SolveOutput {
    /// The placement.
    pub placement: Placement,
    /// Hosts used.
    pub hosts_used: usize,
    /// VMs not placed (no host could take them).
    pub unplaced: usize,
    /// Checks and scores evaluated.
    pub evals: EvalCounts,
    /// Hosts emptied by the repack phase.
    pub repacked_hosts: usize,
}

/// Runs one of the heuristic algorithms.
pub fn solve(
    p: &Problem,
    alg: Algorithm,
    settings: &SolverSettings,
    deadline: &dyn Deadline,
) -> SolveOutput {
    let mut s = Solver::new(p);
    let repacked = 0;
    match alg {
        Algorithm::FirstFitDecreasing => {
            let order = s.decreasing_order();
            s.greedy(&order, Rule::FirstFit);
        }
        Algorithm::FirstFitRandom => {
            let mut order: Vec<u32> = (0..p.items.len() as u32).collect();
            let mut rng = SplitMix64::new(settings.seed);
            rng.shuffle(&mut order);
            s.greedy(&order, Rule::FirstFit);
        }
        Algorithm::BestFit => {
            let order: Vec<u32> = (0..p.items.len() as u32).collect();
            s.greedy(&order, Rule::BestFit);
        }
        Algorithm::SpreadRepack => return spread_repack(p, settings, deadline),
    }
    s.finish(repacked)
}

/// Largest `items x hosts` product for which ours also tries a random-order first fit.
const FIRST_FIT_WORK_LIMIT: u64 = 50_000_000;

/// Ours: spread + repack; where affordable also random-order first fit + repack, and the
/// better of the two (fewest unplaced, then fewest hosts) is returned.
fn spread_repack(p: &Problem, settings: &SolverSettings, deadline: &dyn Deadline) -> SolveOutput {
    let lb = lower_bound(p);
    let mut a = Solver::new(p);
    a.open_first(lb.hosts);
    let order = a.decreasing_order();
    a.spread(&order);
    let ra = a.repack(settings, lb.fractional, deadline);
    let mut best = a.finish(ra);
    let reached = |o: &SolveOutput| {
        o.unplaced == 0
            && (o.hosts_used <= lb.hosts
                || lb.fractional / o.hosts_used as f64 >= settings.target_optimality)
    };
    let work = p.items.len() as u64 * (best.hosts_used as u64 + 1);
    if work <= FIRST_FIT_WORK_LIMIT && !deadline.expired() && !reached(&best) {
        let mut b = Solver::new(p);
        let mut order: Vec<u32> = (0..p.items.len() as u32).collect();
        SplitMix64::new(settings.seed).shuffle(&mut order);
        b.greedy(&order, Rule::FirstFit);
        let rb = b.repack(settings, lb.fractional, deadline);
        let mut other = b.finish(rb);
        let evals = best.evals;
        if (other.unplaced, other.hosts_used) < (best.unplaced, best.hosts_used) {
            other.evals.add(&evals);
            best = other;
        } else {
            best.evals.add(&other.evals);
        }
    }
    best
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Rule {
    FirstFit,
    BestFit,
}

/// Candidates examined per placement in the spread phase.
const SPREAD_CANDIDATES: usize = 24;

pub(crate) struct Solver<'a> {
    p: &'a Problem,
    pub(crate) pk: Packing,
    /// Usable hosts, largest first: the order hosts are opened in.
    host_order: Vec<u32>,
    next_closed: usize,
    open: Vec<bool>,
    open_list: Vec<u32>,
    /// The binding dimension (index key).
    prim: usize,
    /// `(free in prim, host)` for open hosts: best fit walks it upwards from the need.
    index: BTreeSet<(u64, u32)>,
    /// `(free share of prim in 2^-20 units, host)` for open hosts: the spread phase walks
    /// it downwards, so a small host half empty ranks with a big host half empty.
    by_share: BTreeSet<(u64, u32)>,
    /// Scarcity weights per dimension, divided by scale.
    weight: [f64; DIMS],
    unplaced: Vec<u32>,
}

impl<'a> Solver<'a> {
    pub(crate) fn new(p: &'a Problem) -> Self {
        let pk = Packing::new(p);
        let mut host_order: Vec<u32> = (0..p.num_hosts() as u32)
            .filter(|h| p.host_block[*h as usize].is_none())
            .collect();
        let size = |h: u32| -> f64 {
            let c = &p.cap[h as usize];
            (0..DIMS)
                .filter(|k| p.scale[*k] > 0.0)
                .map(|k| c[k] as f64 / p.scale[k])
                .sum()
        };
        host_order.sort_by(|a, b| {
            size(*b)
                .total_cmp(&size(*a))
                .then(
                    p.input.hosts[*b as usize]
                        .reputation
                        .total_cmp(&p.input.hosts[*a as usize].reputation),
                )
                .then(a.cmp(b))
        });
        let mut demand = [0f64; DIMS];
        for it in &p.items {
            for k in 0..DIMS {
                demand[k] += it.demand[k] as f64;
            }
        }
        let mut capsum = [0f64; DIMS];
        for h in &host_order {
            for k in 0..DIMS {
                capsum[k] += p.cap[*h as usize][k] as f64;
            }
        }
        let mut weight = [0f64; DIMS];
        let mut prim = 0;
        let mut best = -1.0;
        for k in 0..DIMS {
            if capsum[k] > 0.0 && p.scale[k] > 0.0 {
                let scarcity = demand[k] / capsum[k];
                weight[k] = scarcity / p.scale[k];
                if scarcity > best {
                    best = scarcity;
                    prim = k;
                }
            }
        }
        Self {
            p,
            pk,
            host_order,
            next_closed: 0,
            open: vec![false; p.num_hosts()],
            open_list: Vec::new(),
            prim,
            index: BTreeSet::new(),
            by_share: BTreeSet::new(),
            weight,
            unplaced: Vec::new(),
        }
    }

    fn free_prim(&self, h: usize) -> u64 {
        self.p.cap[h][self.prim].saturating_sub(self.pk.used[h][self.prim])
    }

    fn free_share(&self, h: usize) -> u64 {
        let cap = self.p.cap[h][self.prim];
        if cap == 0 {
            0
        } else {
            ((u128::from(self.free_prim(h)) << 20) / u128::from(cap)) as u64
        }
    }

    fn unindex(&mut self, h: usize) {
        self.index.remove(&(self.free_prim(h), h as u32));
        self.by_share.remove(&(self.free_share(h), h as u32));
    }

    fn reindex(&mut self, h: usize) {
        self.index.insert((self.free_prim(h), h as u32));
        self.by_share.insert((self.free_share(h), h as u32));
    }

    fn open_host(&mut self, h: usize) {
        if !self.open[h] {
            self.open[h] = true;
            self.open_list.push(h as u32);
            self.reindex(h);
        }
    }

    fn open_first(&mut self, n: usize) {
        for i in 0..n.min(self.host_order.len()) {
            self.open_host(self.host_order[i] as usize);
        }
        self.next_closed = n.min(self.host_order.len());
    }

    /// Opens host `h` (rebalancing starts from the hosts in use).
    pub(crate) fn force_open(&mut self, h: usize) {
        self.open_host(h);
    }

    /// Puts `it` on `h` without checking (loading a current placement, or a checked move).
    pub(crate) fn place_unchecked(&mut self, it: usize, h: usize) {
        self.place(it, h);
    }

    /// Whether `it` could stay on `h` as far as hard rules go (eligibility, anti-affinity),
    /// ignoring capacity. `it` must not be on `h` while asking.
    pub(crate) fn rules_allow(&mut self, it: usize, h: usize) -> bool {
        if self.p.static_check(it, h, false).is_err() {
            return false;
        }
        let present = &self.pk.groups[h];
        !self.p.items[it].anti.iter().any(|g| present.contains(g))
    }

    /// Where to move `it`: the tightest used host, else a newly opened one.
    pub(crate) fn move_target(&mut self, it: usize, except: &[bool]) -> Option<usize> {
        self.best_fit_host(it, except, true)
            .or_else(|| self.best_fit_host(it, except, false))
            .or_else(|| self.open_for(it).filter(|h| !except[*h]))
    }

    fn place(&mut self, it: usize, h: usize) {
        self.unindex(h);
        self.pk.place(self.p, it, h);
        self.reindex(h);
    }

    pub(crate) fn unplace(&mut self, it: usize) -> Option<usize> {
        let h = self.pk.item_host[it]? as usize;
        self.unindex(h);
        self.pk.remove(self.p, it);
        self.reindex(h);
        Some(h)
    }

    /// Items by dominant normalised share, largest first; restricted items and higher
    /// priorities before the rest.
    fn decreasing_order(&self) -> Vec<u32> {
        let p = self.p;
        let dom = |it: &crate::problem::Item| -> f64 {
            (0..DIMS)
                .filter(|k| p.scale[*k] > 0.0)
                .map(|k| it.demand[k] as f64 / p.scale[k])
                .fold(0.0, f64::max)
        };
        let mut order: Vec<u32> = (0..p.items.len() as u32).collect();
        let keys: Vec<(u8, bool, f64)> = p
            .items
            .iter()
            .map(|it| (it.priority, it.restricted || !it.anti.is_empty(), dom(it)))
            .collect();
        order.sort_by(|a, b| {
            let (ka, kb) = (&keys[*a as usize], &keys[*b as usize]);
            kb.0.cmp(&ka.0)
                .then(kb.1.cmp(&ka.1))
                .then(kb.2.total_cmp(&ka.2))
                .then(a.cmp(b))
        });
        order
    }

    /// Opens the next closed host (in size order) that item `it` may use.
    fn open_for(&mut self, it: usize) -> Option<usize> {
        for strict in [true, false] {
            for i in self.next_closed..self.host_order.len() {
                let h = self.host_order[i] as usize;
                if self.open[h] {
                    continue;
                }
                if self.pk.check(self.p, it, h, strict).is_ok() {
                    self.open_host(h);
                    while self.next_closed < self.host_order.len()
                        && self.open[self.host_order[self.next_closed] as usize]
                    {
                        self.next_closed += 1;
                    }
                    return Some(h);
                }
            }
        }
        None
    }

    fn greedy(&mut self, order: &[u32], rule: Rule) {
        for &it in order {
            let it = it as usize;
            let mut chosen = None;
            'passes: for strict in [true, false] {
                let mut best: Option<(f64, usize)> = None;
                for i in 0..self.open_list.len() {
                    let h = self.open_list[i] as usize;
                    if self.pk.check(self.p, it, h, strict).is_err() {
                        continue;
                    }
                    match rule {
                        Rule::FirstFit => {
                            chosen = Some(h);
                            break 'passes;
                        }
                        Rule::BestFit => {
                            let s = self.residual_after(it, h);
                            if best.is_none_or(|(b, _)| s < b) {
                                best = Some((s, h));
                            }
                        }
                    }
                }
                if let Some((_, h)) = best {
                    chosen = Some(h);
                    break;
                }
            }
            let chosen = chosen.or_else(|| self.open_for(it));
            match chosen {
                Some(h) => self.place(it, h),
                None => self.unplaced.push(it as u32),
            }
        }
    }

    /// Normalised free space left on `h` if `it` goes there.
    fn residual_after(&mut self, it: usize, h: usize) -> f64 {
        self.pk.evals.score_evals += 1;
        let p = self.p;
        (0..DIMS)
            .filter(|k| p.scale[*k] > 0.0)
            .map(|k| (p.cap[h][k] - self.pk.used[h][k] - p.items[it].demand[k]) as f64 / p.scale[k])
            .sum()
    }

    /// Spread phase: most-free hosts first, best dot product among the first candidates.
    fn spread(&mut self, order: &[u32]) {
        for &it in order {
            let it = it as usize;
            let mut chosen = None;
            for strict in [true, false] {
                let Self {
                    p,
                    pk,
                    by_share,
                    weight,
                    ..
                } = self;
                let mut best: Option<(f64, usize)> = None;
                let mut found = 0;
                for &(_, h) in by_share.iter().rev() {
                    let h = h as usize;
                    if pk.check(p, it, h, strict).is_err() {
                        continue;
                    }
                    pk.evals.score_evals += 1;
                    // Weighted dot product of the demand with the host's free *shares*.
                    let d = &p.items[it].demand;
                    let s: f64 = (0..DIMS)
                        .filter(|k| p.cap[h][*k] > 0)
                        .map(|k| {
                            weight[k] * d[k] as f64 * (p.cap[h][k] - pk.used[h][k]) as f64
                                / p.cap[h][k] as f64
                        })
                        .sum();
                    if best.is_none_or(|(b, _)| s > b) {
                        best = Some((s, h));
                    }
                    found += 1;
                    if found >= SPREAD_CANDIDATES {
                        break;
                    }
                }
                if let Some((_, h)) = best {
                    chosen = Some(h);
                    break;
                }
            }
            let chosen = chosen.or_else(|| self.open_for(it));
            match chosen {
                Some(h) => self.place(it, h),
                None => self.unplaced.push(it as u32),
            }
        }
    }

    /// Tightest open host (other than `except`) that takes `it`, found through the index.
    pub(crate) fn best_fit_host(
        &mut self,
        it: usize,
        except: &[bool],
        strict: bool,
    ) -> Option<usize> {
        let Self {
            p, pk, index, prim, ..
        } = self;
        let need = p.items[it].demand[*prim];
        for &(_, h) in index.range((need, 0)..) {
            let h = h as usize;
            if except[h] || pk.count[h] == 0 {
                continue;
            }
            if pk.check(p, it, h, strict).is_ok() {
                return Some(h);
            }
        }
        None
    }

    /// Repack phase: try to empty lightly loaded hosts. Returns hosts emptied.
    fn repack(&mut self, settings: &SolverSettings, bound: f64, deadline: &dyn Deadline) -> usize {
        let mut emptied = 0;
        let mut draining = vec![false; self.p.num_hosts()];
        for _round in 0..settings.max_rounds {
            let mut used: Vec<u32> = self
                .open_list
                .iter()
                .copied()
                .filter(|h| self.pk.count[*h as usize] > 0)
                .collect();
            let load = |s: &Self, h: u32| -> f64 {
                let h = h as usize;
                let p = s.p;
                (0..DIMS)
                    .filter(|k| p.cap[h][*k] > 0 && p.scale[*k] > 0.0)
                    .map(|k| s.pk.used[h][k] as f64 / p.cap[h][k] as f64)
                    .fold(0.0, f64::max)
            };
            used.sort_by(|a, b| load(self, *a).total_cmp(&load(self, *b)).then(a.cmp(b)));
            let mut progress = false;
            let mut failures = 0;
            for h in used {
                let used_now = self.pk.hosts_used();
                if deadline.expired()
                    || (used_now as f64) <= bound.ceil()
                    || bound / used_now as f64 >= settings.target_optimality
                {
                    return emptied;
                }
                if self.try_empty_recorded(h as usize, &mut draining).is_some() {
                    emptied += 1;
                    progress = true;
                    failures = 0;
                } else {
                    failures += 1;
                    // The lightest hosts are the likeliest to empty; stop after a run of
                    // failures instead of walking the whole fleet.
                    if failures > 32 {
                        break;
                    }
                }
            }
            if !progress {
                break;
            }
        }
        emptied
    }

    /// Moves every item off `h` into other used hosts, or changes nothing. Returns the
    /// moves `(item, target)` in the order made.
    pub(crate) fn try_empty_recorded(
        &mut self,
        h: usize,
        draining: &mut [bool],
    ) -> Option<Vec<(usize, usize)>> {
        let mut items: Vec<u32> = self.pk.host_items[h].clone();
        let p = self.p;
        items.sort_by(|a, b| {
            let da = &p.items[*a as usize].demand;
            let db = &p.items[*b as usize].demand;
            db[self.prim].cmp(&da[self.prim]).then(a.cmp(b))
        });
        draining[h] = true;
        let mut moved: Vec<(usize, usize)> = Vec::new();
        let mut ok = true;
        for &it in &items {
            let it = it as usize;
            let target = self
                .best_fit_host(it, draining, true)
                .or_else(|| self.best_fit_host(it, draining, false));
            match target {
                Some(t) => {
                    self.unplace(it);
                    self.place(it, t);
                    moved.push((it, t));
                }
                None => {
                    ok = false;
                    break;
                }
            }
        }
        draining[h] = false;
        if !ok {
            for &(it, _) in moved.iter().rev() {
                self.unplace(it);
                self.place(it, h);
            }
            return None;
        }
        Some(moved)
    }

    fn finish(mut self, repacked: usize) -> SolveOutput {
        let placement = self.pk.to_placement(self.p);
        let hosts_used = self.pk.hosts_used();
        self.unplaced.sort_unstable();
        SolveOutput {
            unplaced: placement.unplaced(),
            placement,
            hosts_used,
            evals: self.pk.evals,
            repacked_hosts: repacked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{AvoidList, NoDeadline, Timestamp};
    use crate::model::{Host, PlacementInput, Resources, Vm};
    use crate::state::verify;

    /// The Azure failure mode in miniature: memory-heavy 8c/56G VMs among many 1c/1.75G.
    fn stranding_instance() -> Problem {
        let hosts = (0..60)
            .map(|i| Host::new(i, Resources::cpu_mem(48, 192 * 1024)))
            .collect();
        let mut vms: Vec<Vm> = (0..40)
            .map(|i| Vm::new(i, Resources::cpu_mem(8, 56 * 1024)))
            .collect();
        vms.extend((40..840).map(|i| Vm::new(i, Resources::cpu_mem(1, 1792))));
        let input = PlacementInput {
            hosts,
            vms,
            rules: vec![],
            config: Default::default(),
        };
        Problem::compile(input, Timestamp(0), &AvoidList::default()).unwrap()
    }

    #[test]
    fn ours_does_not_strand_cpu_like_ffd() {
        let p = stranding_instance();
        let lb = lower_bound(&p);
        let s = SolverSettings::default();
        let ffd = solve(&p, Algorithm::FirstFitDecreasing, &s, &NoDeadline);
        let ours = solve(&p, Algorithm::SpreadRepack, &s, &NoDeadline);
        verify(&p, &ffd.placement).unwrap();
        verify(&p, &ours.placement).unwrap();
        assert_eq!((ffd.unplaced, ours.unplaced), (0, 0));
        // FFD puts three 56G VMs per host (memory full, 24 cores idle) and needs 31 hosts.
        assert_eq!(lb.hosts, 24);
        assert!(ffd.hosts_used >= 30, "ffd {}", ffd.hosts_used);
        assert!(
            ours.hosts_used <= lb.hosts + 1,
            "ours {} bound {}",
            ours.hosts_used,
            lb.hosts
        );
    }

    #[test]
    fn same_seed_same_placement() {
        let p = stranding_instance();
        let s = SolverSettings {
            seed: 9,
            ..SolverSettings::default()
        };
        for alg in [Algorithm::FirstFitRandom, Algorithm::SpreadRepack] {
            assert_eq!(
                solve(&p, alg, &s, &NoDeadline),
                solve(&p, alg, &s, &NoDeadline)
            );
        }
    }

    #[test]
    fn expired_deadline_still_returns_a_feasible_placement() {
        struct Expired;
        impl Deadline for Expired {
            fn expired(&self) -> bool {
                true
            }
        }
        let p = stranding_instance();
        let out = solve(
            &p,
            Algorithm::SpreadRepack,
            &SolverSettings::default(),
            &Expired,
        );
        verify(&p, &out.placement).unwrap();
        assert_eq!(out.unplaced, 0);
        assert_eq!(out.repacked_hosts, 0);
    }
}
