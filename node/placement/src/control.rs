//! Operator controls and statistics: solver settings (`placement set-solver`), the avoid
//! list (`placement avoid-node`), rule listing (`placement list-constraints`) and solver
//! statistics (`placement solver-stats`). Plain types; the CLI wiring lives in the node.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{HostId, Rule, RuleKind, RuleType};

/// Milliseconds on the caller's clock (wall clock in the node, virtual in the simulator).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Timestamp(pub u64);

/// A time budget the caller enforces: the core never reads a clock, it asks this.
///
/// The node implements it over `Instant`; tests and the simulator use [`NoDeadline`] or a
/// counter, which keeps solver output deterministic.
pub trait Deadline {
    /// True once the solver should stop improving and return what it has.
    fn expired(&self) -> bool;
}

/// A deadline that never expires.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDeadline;

impl Deadline for NoDeadline {
    fn expired(&self) -> bool {
        false
    }
}

/// Error from validating settings.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SettingsError {
    /// Target optimality outside `(0, 1]`.
    #[error("target optimality must be in (0, 1], got {0}")]
    TargetOptimality(f64),
    /// A zero time limit.
    #[error("max time must be positive")]
    ZeroMaxTime,
}

/// Solver settings (`placement set-solver --max-time --target-optimality`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SolverSettings {
    /// Wall-time budget the driver enforces through a [`Deadline`]; also passed to the MILP.
    pub max_time_ms: Option<u64>,
    /// Stop improving once `lower_bound / hosts_used >= target_optimality` (1.0: keep going
    /// until no move helps).
    pub target_optimality: f64,
    /// Largest instance (VMs) the exact MILP is tried on.
    pub exact_max_vms: usize,
    /// Seed for the randomised parts (tie-breaks and baselines).
    pub seed: u64,
    /// Local-search rounds at most (each round tries to empty every lightly-used host once).
    pub max_rounds: u32,
}

impl Default for SolverSettings {
    fn default() -> Self {
        Self {
            max_time_ms: None,
            target_optimality: 1.0,
            exact_max_vms: 50,
            seed: 0x5eed,
            max_rounds: 8,
        }
    }
}

impl SolverSettings {
    /// Checks the values.
    pub fn validate(self) -> Result<Self, SettingsError> {
        if !(self.target_optimality > 0.0 && self.target_optimality <= 1.0) {
            return Err(SettingsError::TargetOptimality(self.target_optimality));
        }
        if self.max_time_ms == Some(0) {
            return Err(SettingsError::ZeroMaxTime);
        }
        Ok(self)
    }
}

/// Hosts the operator asked to avoid until a given time (`placement avoid-node`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AvoidList {
    until: BTreeMap<HostId, Timestamp>,
}

impl AvoidList {
    /// Avoid `host` from `now` for `duration_ms` (a later call extends or shortens it).
    pub fn avoid(&mut self, host: HostId, now: Timestamp, duration_ms: u64) {
        self.until
            .insert(host, Timestamp(now.0.saturating_add(duration_ms)));
    }

    /// Stop avoiding `host`.
    pub fn clear(&mut self, host: HostId) -> bool {
        self.until.remove(&host).is_some()
    }

    /// The expiry of the avoidance of `host`, if it is still in force at `now`.
    pub fn avoided_until(&self, host: HostId, now: Timestamp) -> Option<Timestamp> {
        self.until.get(&host).copied().filter(|t| *t > now)
    }

    /// Drops expired entries; returns the hosts whose avoidance ended.
    pub fn expire(&mut self, now: Timestamp) -> Vec<HostId> {
        let done: Vec<HostId> = self
            .until
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(h, _)| *h)
            .collect();
        for h in &done {
            self.until.remove(h);
        }
        done
    }

    /// Active entries at `now`.
    pub fn active(&self, now: Timestamp) -> Vec<(HostId, Timestamp)> {
        self.until
            .iter()
            .filter(|(_, t)| **t > now)
            .map(|(h, t)| (*h, *t))
            .collect()
    }
}

/// Counts of the checks and scores a solver evaluated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalCounts {
    /// Capacity and VM-count checks.
    pub resource_checks: u64,
    /// Static eligibility checks (GPU model, region, SLA, host rules).
    pub eligibility_checks: u64,
    /// Anti-affinity checks.
    pub anti_affinity_checks: u64,
    /// Host scores computed.
    pub score_evals: u64,
}

impl EvalCounts {
    /// All constraint checks.
    pub fn constraint_checks(&self) -> u64 {
        self.resource_checks + self.eligibility_checks + self.anti_affinity_checks
    }

    /// Adds another count.
    pub fn add(&mut self, o: &EvalCounts) {
        self.resource_checks += o.resource_checks;
        self.eligibility_checks += o.eligibility_checks;
        self.anti_affinity_checks += o.anti_affinity_checks;
        self.score_evals += o.score_evals;
    }
}

/// What `placement solver-stats` shows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SolverStats {
    /// Which solver ran.
    pub solver: String,
    /// Wall time of the solve, measured by the caller around the call.
    pub elapsed_ms: f64,
    /// Hosts used by the result.
    pub hosts_used: usize,
    /// Best lower bound known (LP relaxation if solved, else the simple bound).
    pub lower_bound: f64,
    /// `(hosts_used - lower_bound) / hosts_used`: an upper bound on the distance to optimal.
    pub optimality_gap: f64,
    /// Share of evaluations that were constraint checks (the rest are scores).
    pub constraint_eval_share: f64,
    /// Share of constraint checks per kind: resource, eligibility, anti-affinity.
    pub constraint_kind_share: [f64; 3],
    /// Raw counts.
    pub evals: EvalCounts,
    /// VMs that could not be placed.
    pub unplaced: usize,
}

impl SolverStats {
    /// Builds the statistics from a solve's outputs.
    pub fn new(
        solver: &str,
        elapsed_ms: f64,
        hosts_used: usize,
        lower_bound: f64,
        evals: EvalCounts,
        unplaced: usize,
    ) -> Self {
        let checks = evals.constraint_checks();
        let total = checks + evals.score_evals;
        let share = |n: u64| {
            if checks == 0 {
                0.0
            } else {
                n as f64 / checks as f64
            }
        };
        Self {
            solver: solver.to_owned(),
            elapsed_ms,
            hosts_used,
            lower_bound,
            optimality_gap: if hosts_used == 0 {
                0.0
            } else {
                ((hosts_used as f64 - lower_bound) / hosts_used as f64).max(0.0)
            },
            constraint_eval_share: if total == 0 {
                0.0
            } else {
                checks as f64 / total as f64
            },
            constraint_kind_share: [
                share(evals.resource_checks),
                share(evals.eligibility_checks),
                share(evals.anti_affinity_checks),
            ],
            evals,
            unplaced,
        }
    }
}

/// One line of `placement list-constraints`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConstraintSummary {
    /// Rule id.
    pub id: String,
    /// `affinity` or `anti-affinity`.
    pub kind: &'static str,
    /// Hard or soft.
    pub hard: bool,
    /// Human-readable description.
    pub description: String,
}

/// Lists the rules, optionally of one type.
pub fn list_constraints(rules: &[Rule], of_type: Option<RuleType>) -> Vec<ConstraintSummary> {
    rules
        .iter()
        .filter(|r| of_type.is_none_or(|t| r.is_type(t)))
        .map(|r| {
            let kind = if r.is_type(RuleType::Affinity) {
                "affinity"
            } else {
                "anti-affinity"
            };
            let description = match &r.kind {
                RuleKind::VmAffinity { vms } => format!("same host for {}", join_vms(vms)),
                RuleKind::VmAntiAffinity { vms } => format!("distinct hosts for {}", join_vms(vms)),
                RuleKind::Host { vm, target, affine } => format!(
                    "{vm} {} {}",
                    if *affine { "on" } else { "never on" },
                    match target {
                        crate::model::HostMatch::Label(l) => format!("hosts labelled {l}"),
                        crate::model::HostMatch::Region(r) => format!("region {r}"),
                    }
                ),
            };
            ConstraintSummary {
                id: r.id.0.clone(),
                kind,
                hard: r.hard,
                description,
            }
        })
        .collect()
}

fn join_vms(vms: &[crate::model::VmId]) -> String {
    let parts: Vec<String> = vms.iter().map(|v| v.to_string()).collect();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HostMatch, RuleId, VmId};

    #[test]
    fn avoid_list_expires_at_input_time() {
        let mut a = AvoidList::default();
        a.avoid(HostId(156), Timestamp(1_000), 3_600_000);
        assert_eq!(
            a.avoided_until(HostId(156), Timestamp(2_000)),
            Some(Timestamp(3_601_000))
        );
        assert_eq!(a.avoided_until(HostId(156), Timestamp(3_601_000)), None);
        assert!(a.expire(Timestamp(3_600_999)).is_empty());
        assert_eq!(a.expire(Timestamp(3_601_000)), vec![HostId(156)]);
        assert!(a.active(Timestamp(0)).is_empty());
    }

    #[test]
    fn settings_validate_rejects_bad_values() {
        let s = SolverSettings {
            target_optimality: 0.0,
            ..SolverSettings::default()
        };
        assert_eq!(s.validate(), Err(SettingsError::TargetOptimality(0.0)));
        let s = SolverSettings {
            max_time_ms: Some(0),
            ..SolverSettings::default()
        };
        assert_eq!(s.validate(), Err(SettingsError::ZeroMaxTime));
        assert!(SolverSettings::default().validate().is_ok());
    }

    #[test]
    fn list_constraints_filters_by_type() {
        let rules = vec![
            Rule {
                id: RuleId("affinity-rule-1".into()),
                kind: RuleKind::VmAffinity {
                    vms: vec![VmId(1), VmId(2)],
                },
                hard: true,
            },
            Rule {
                id: RuleId("anti-1".into()),
                kind: RuleKind::VmAntiAffinity {
                    vms: vec![VmId(1), VmId(3)],
                },
                hard: false,
            },
            Rule {
                id: RuleId("label-1".into()),
                kind: RuleKind::Host {
                    vm: VmId(4),
                    target: HostMatch::Label("ssd".into()),
                    affine: true,
                },
                hard: true,
            },
        ];
        let aff = list_constraints(&rules, Some(RuleType::Affinity));
        assert_eq!(aff.len(), 2);
        assert_eq!(aff[0].description, "same host for vm-1, vm-2");
        assert_eq!(aff[1].description, "vm-4 on hosts labelled ssd");
        let anti = list_constraints(&rules, Some(RuleType::AntiAffinity));
        assert_eq!(anti.len(), 1);
        assert_eq!(anti[0].kind, "anti-affinity");
        assert_eq!(list_constraints(&rules, None).len(), 3);
    }

    #[test]
    fn stats_gap_and_shares() {
        let evals = EvalCounts {
            resource_checks: 60,
            eligibility_checks: 30,
            anti_affinity_checks: 10,
            score_evals: 100,
        };
        let s = SolverStats::new("ours", 12.0, 100, 97.0, evals, 0);
        assert!((s.optimality_gap - 0.03).abs() < 1e-12);
        assert!((s.constraint_eval_share - 0.5).abs() < 1e-12);
        assert!((s.constraint_kind_share[0] - 0.6).abs() < 1e-12);
    }
}
