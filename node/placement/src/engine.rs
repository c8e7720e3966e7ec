//! The sans-IO engine around the solvers, in the workspace's core shape: `handle(now,
//! input)`, `handle_timeout(now)`, `poll_command()`, `poll_timeout()`.
//!
//! It keeps the cluster's hosts, rules and running VMs, places arriving VMs online,
//! re-plans every `rebalance_interval_ms` with the migration budget, and expires avoided
//! hosts at their deadline. Migrations are *proposed* ([`Command::ProposeMigrations`]);
//! the engine moves a VM only when told the migration finished
//! ([`Input::MigrationDone`]), since consensus and the migration itself happen elsewhere.
//! Not yet driven by the node: the driver and the CLI wiring are separate work.

use std::collections::{BTreeMap, VecDeque};

use crate::control::{
    AvoidList, ConstraintSummary, SolverSettings, SolverStats, Timestamp, list_constraints,
};
use crate::model::{Host, HostId, PlacementConfig, PlacementInput, Rule, RuleType, Vm, VmId};
use crate::online::{Decision, OnlinePlacer, PlaceError};
use crate::problem::{ModelError, Problem};
use crate::rebalance::{Migration, migration_budget, rebalance};
use crate::state::Placement;

/// Commands queued at most; beyond this the oldest are dropped and counted.
pub const MAX_QUEUED_COMMANDS: usize = 4096;

/// Engine configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// Cluster placement configuration.
    pub placement: PlacementConfig,
    /// Solver settings.
    pub settings: SolverSettings,
    /// Re-plan period (manual: 5 min).
    pub rebalance_interval_ms: u64,
    /// Migration budget as a share of the VMs per hour (manual: under 5 %).
    pub max_migration_fraction_per_hour: f64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            placement: PlacementConfig::default(),
            settings: SolverSettings::default(),
            rebalance_interval_ms: 5 * 60 * 1000,
            max_migration_fraction_per_hour: 0.05,
        }
    }
}

/// What goes into the engine.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// The current host list (from the cluster document).
    Hosts(Vec<Host>),
    /// The current rule set.
    Rules(Vec<Rule>),
    /// A VM asks for a host.
    Place {
        /// Echoed in the reply.
        request_id: u64,
        /// The VM.
        vm: Vm,
    },
    /// A VM already runs on `host` (placed elsewhere, or before this engine started): its
    /// demand counts against the host from now on, so online decisions see how full hosts
    /// are. Recording the same VM id again moves or resizes it.
    Running {
        /// The VM (or an aggregate standing for a host's reported load).
        vm: Vm,
        /// Its host.
        host: HostId,
    },
    /// A VM stopped or left.
    VmStopped(VmId),
    /// A proposed migration finished: the VM now runs on `to`.
    MigrationDone {
        /// The VM.
        vm: VmId,
        /// Its new host.
        to: HostId,
    },
    /// `placement avoid-node --node --duration`.
    AvoidNode {
        /// The host.
        host: HostId,
        /// For how long, from `now`.
        duration_ms: u64,
    },
    /// `placement set-solver`.
    SetSolver(SolverSettings),
}

/// What comes out.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// A VM was placed.
    Placed {
        /// From the request.
        request_id: u64,
        /// The decision and its reasons.
        decision: Decision,
    },
    /// A VM could not be placed.
    Rejected {
        /// From the request.
        request_id: u64,
        /// Why.
        error: PlaceError,
    },
    /// A re-plan: migrations to put to consensus, in a capacity-safe order.
    ProposeMigrations {
        /// The migrations.
        migrations: Vec<Migration>,
        /// Hosts in use before and after the plan.
        hosts_before_after: (usize, usize),
    },
    /// An avoided host became placeable again.
    AvoidExpired(HostId),
    /// A VM's host vanished from the host list: the VM needs a new home (re-send `Place`).
    VmLost(VmId),
    /// Input the engine could not use (the message says why).
    InputRejected(String),
}

/// The placement engine.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    hosts: Vec<Host>,
    rules: Vec<Rule>,
    vms: BTreeMap<VmId, Vm>,
    avoid: AvoidList,
    placer: OnlinePlacer,
    commands: VecDeque<Command>,
    dropped_commands: u64,
    next_rebalance: Timestamp,
    stats: Option<SolverStats>,
}

impl Engine {
    /// An engine with no hosts yet.
    pub fn new(config: EngineConfig, now: Timestamp) -> Self {
        let placer = OnlinePlacer::empty(config.placement.clone());
        Self {
            next_rebalance: Timestamp(now.0.saturating_add(config.rebalance_interval_ms)),
            config,
            hosts: Vec::new(),
            rules: Vec::new(),
            vms: BTreeMap::new(),
            avoid: AvoidList::default(),
            placer,
            commands: VecDeque::new(),
            dropped_commands: 0,
            stats: None,
        }
    }

    fn emit(&mut self, c: Command) {
        if self.commands.len() >= MAX_QUEUED_COMMANDS {
            self.commands.pop_front();
            self.dropped_commands += 1;
        }
        self.commands.push_back(c);
    }

    /// Rebuilds the online placer from hosts, rules and the VMs' current hosts.
    fn rebuild(&mut self, now: Timestamp) -> Result<(), ModelError> {
        let mut placer = OnlinePlacer::new(
            self.hosts.clone(),
            self.rules.clone(),
            self.config.placement.clone(),
            now,
            &self.avoid,
        )?;
        let mut lost = Vec::new();
        for vm in self.vms.values() {
            let kept = self
                .placer
                .host_of(vm.id)
                .is_some_and(|h| placer.record(vm, h));
            if !kept {
                lost.push(vm.id);
            }
        }
        self.placer = placer;
        for vm in lost {
            self.vms.remove(&vm);
            self.emit(Command::VmLost(vm));
        }
        Ok(())
    }

    /// Feeds one input.
    pub fn handle(&mut self, now: Timestamp, input: Input) {
        match input {
            Input::Hosts(hosts) => {
                let old = std::mem::replace(&mut self.hosts, hosts);
                if let Err(e) = self.rebuild(now) {
                    self.hosts = old;
                    self.emit(Command::InputRejected(format!("hosts: {e}")));
                }
            }
            Input::Rules(rules) => {
                let old = std::mem::replace(&mut self.rules, rules);
                if let Err(e) = self.rebuild(now) {
                    self.rules = old;
                    self.emit(Command::InputRejected(format!("rules: {e}")));
                }
            }
            Input::Place { request_id, vm } => match self.placer.place(&vm) {
                Ok(decision) => {
                    self.vms.insert(vm.id, vm);
                    self.emit(Command::Placed {
                        request_id,
                        decision,
                    });
                }
                Err(error) => self.emit(Command::Rejected { request_id, error }),
            },
            Input::Running { vm, host } => {
                self.placer.remove(vm.id);
                if self.placer.record(&vm, host) {
                    self.vms.insert(vm.id, vm);
                } else {
                    self.vms.remove(&vm.id);
                    self.emit(Command::InputRejected(format!(
                        "running {} on unknown {host}",
                        vm.id
                    )));
                }
            }
            Input::VmStopped(vm) => {
                self.placer.remove(vm);
                self.vms.remove(&vm);
            }
            Input::MigrationDone { vm, to } => {
                let Some(v) = self.vms.get(&vm).cloned() else {
                    self.emit(Command::InputRejected(format!("migration of unknown {vm}")));
                    return;
                };
                self.placer.remove(vm);
                if !self.placer.record(&v, to) {
                    self.emit(Command::InputRejected(format!(
                        "migration of {vm} to unknown {to}"
                    )));
                }
            }
            Input::AvoidNode { host, duration_ms } => {
                self.avoid.avoid(host, now, duration_ms);
                self.placer.refresh(now, &self.avoid);
            }
            Input::SetSolver(settings) => match settings.validate() {
                Ok(s) => self.config.settings = s,
                Err(e) => self.emit(Command::InputRejected(format!("set-solver: {e}"))),
            },
        }
    }

    /// Timers: expire avoided hosts, re-plan when due.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let expired = self.avoid.expire(now);
        if !expired.is_empty() {
            self.placer.refresh(now, &self.avoid);
            for h in expired {
                self.emit(Command::AvoidExpired(h));
            }
        }
        if now >= self.next_rebalance {
            self.next_rebalance =
                Timestamp(now.0.saturating_add(self.config.rebalance_interval_ms));
            self.replan(now);
        }
    }

    /// Re-plans now with the budget of one interval.
    pub fn replan(&mut self, now: Timestamp) {
        let vms: Vec<Vm> = self.vms.values().cloned().collect();
        let input = PlacementInput {
            hosts: self.hosts.clone(),
            vms,
            rules: self.rules.clone(),
            config: self.config.placement.clone(),
        };
        let p = match Problem::compile(input, now, &self.avoid) {
            Ok(p) => p,
            Err(e) => {
                self.emit(Command::InputRejected(format!("re-plan: {e}")));
                return;
            }
        };
        let host_of = p
            .input()
            .vms
            .iter()
            .map(|v| {
                self.placer
                    .host_of(v.id)
                    .and_then(|h| p.host_idx(h))
                    .map(|h| h as u32)
            })
            .collect();
        let current = Placement { host_of };
        let budget = migration_budget(
            p.num_vms(),
            self.config.max_migration_fraction_per_hour,
            self.config.rebalance_interval_ms,
        );
        match rebalance(
            &p,
            &current,
            budget,
            &self.config.settings,
            &crate::control::NoDeadline,
        ) {
            Ok(plan) => {
                let lb = crate::bound::lower_bound(&p);
                self.stats = Some(SolverStats::new(
                    "rebalance",
                    0.0,
                    plan.hosts_after,
                    lb.fractional,
                    crate::control::EvalCounts::default(),
                    plan.stuck.len(),
                ));
                if !plan.migrations.is_empty() {
                    self.emit(Command::ProposeMigrations {
                        migrations: plan.migrations,
                        hosts_before_after: (plan.hosts_before, plan.hosts_after),
                    });
                }
            }
            Err(e) => self.emit(Command::InputRejected(format!("re-plan: {e}"))),
        }
    }

    /// Next command, if any.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// When to call [`Engine::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let next_expiry = self
            .avoid
            .active(Timestamp(0))
            .into_iter()
            .map(|(_, t)| t)
            .min();
        Some(next_expiry.map_or(self.next_rebalance, |t| t.min(self.next_rebalance)))
    }

    /// Statistics of the last re-plan (`elapsed_ms` is the driver's to fill).
    pub fn solver_stats(&self) -> Option<&SolverStats> {
        self.stats.as_ref()
    }

    /// `placement list-constraints [--type]`.
    pub fn list_constraints(&self, of_type: Option<RuleType>) -> Vec<ConstraintSummary> {
        list_constraints(&self.rules, of_type)
    }

    /// Host of a VM.
    pub fn host_of(&self, vm: VmId) -> Option<HostId> {
        self.placer.host_of(vm)
    }

    /// Commands dropped because the queue was full.
    pub fn dropped_commands(&self) -> u64 {
        self.dropped_commands
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Resources;

    fn hosts() -> Vec<Host> {
        (0..4)
            .map(|i| Host::new(i, Resources::cpu_mem(8, 32 * 1024)))
            .collect()
    }

    #[test]
    fn running_load_makes_online_decisions_pack_onto_used_hosts() {
        let mut e = Engine::new(EngineConfig::default(), Timestamp(0));
        e.handle(Timestamp(0), Input::Hosts(hosts()));
        // Host 2 already carries load reported by its node.
        e.handle(
            Timestamp(0),
            Input::Running {
                vm: Vm::new(1_000, Resources::cpu_mem(4, 8 * 1024)),
                host: HostId(2),
            },
        );
        assert_eq!(e.poll_command(), None);
        e.handle(
            Timestamp(1),
            Input::Place {
                request_id: 1,
                vm: Vm::new(1, Resources::cpu_mem(2, 4 * 1024)),
            },
        );
        let Some(Command::Placed { decision, .. }) = e.poll_command() else {
            panic!("no placement")
        };
        assert_eq!(decision.host, HostId(2), "packs next to the running load");
        // The load grows past what host 2 can add: the next VM goes elsewhere.
        e.handle(
            Timestamp(2),
            Input::Running {
                vm: Vm::new(1_000, Resources::cpu_mem(6, 28 * 1024)),
                host: HostId(2),
            },
        );
        e.handle(
            Timestamp(3),
            Input::Place {
                request_id: 2,
                vm: Vm::new(2, Resources::cpu_mem(2, 4 * 1024)),
            },
        );
        let Some(Command::Placed { decision, .. }) = e.poll_command() else {
            panic!("no placement")
        };
        assert_ne!(decision.host, HostId(2), "host 2 is full");
        // Load on a host the engine does not know is refused, not silently dropped.
        e.handle(
            Timestamp(4),
            Input::Running {
                vm: Vm::new(1_001, Resources::cpu_mem(1, 1024)),
                host: HostId(99),
            },
        );
        assert!(matches!(e.poll_command(), Some(Command::InputRejected(_))));
    }

    #[test]
    fn places_avoids_expires_and_replans() {
        let cfg = EngineConfig {
            rebalance_interval_ms: 60_000,
            ..EngineConfig::default()
        };
        let mut e = Engine::new(cfg, Timestamp(0));
        e.handle(Timestamp(0), Input::Hosts(hosts()));
        e.handle(
            Timestamp(0),
            Input::AvoidNode {
                host: HostId(0),
                duration_ms: 10_000,
            },
        );
        assert_eq!(e.poll_timeout(), Some(Timestamp(10_000)));
        e.handle(
            Timestamp(1),
            Input::Place {
                request_id: 7,
                vm: Vm::new(1, Resources::cpu_mem(2, 1024)),
            },
        );
        let Some(Command::Placed {
            request_id: 7,
            decision,
        }) = e.poll_command()
        else {
            panic!("no placement")
        };
        assert_ne!(decision.host, HostId(0), "avoided host used");
        assert_eq!(decision.filtered.get("avoided"), Some(&1));
        e.handle_timeout(Timestamp(10_000));
        assert_eq!(e.poll_command(), Some(Command::AvoidExpired(HostId(0))));
        assert_eq!(e.poll_timeout(), Some(Timestamp(60_000)));
        // The VM's host gets quarantined: the next re-plan proposes to move it.
        let mut hs = hosts();
        hs[decision.host.0 as usize].quarantined = true;
        e.handle(Timestamp(20_000), Input::Hosts(hs));
        // 5 %/h of one VM over a minute is zero migrations: nothing proposed.
        e.handle_timeout(Timestamp(60_000));
        assert_eq!(e.poll_command(), None);
        let cfg = EngineConfig {
            max_migration_fraction_per_hour: 1.0,
            rebalance_interval_ms: 3_600_000,
            ..e.config.clone()
        };
        e.config = cfg;
        e.replan(Timestamp(60_001));
        let Some(Command::ProposeMigrations { migrations, .. }) = e.poll_command() else {
            panic!("no plan")
        };
        assert_eq!(migrations.len(), 1);
        assert_eq!(migrations[0].from, decision.host);
        e.handle(
            Timestamp(60_002),
            Input::MigrationDone {
                vm: VmId(1),
                to: migrations[0].to,
            },
        );
        assert_eq!(e.host_of(VmId(1)), Some(migrations[0].to));
        assert!(e.solver_stats().is_some());
        // A host list without the VM's host: the engine says the VM is lost.
        let hs: Vec<Host> = hosts()
            .into_iter()
            .filter(|h| h.id != migrations[0].to)
            .collect();
        e.handle(Timestamp(60_003), Input::Hosts(hs));
        assert_eq!(e.poll_command(), Some(Command::VmLost(VmId(1))));
        assert_eq!(e.host_of(VmId(1)), None);
    }

    #[test]
    fn bad_inputs_are_reported_not_fatal() {
        let mut e = Engine::new(EngineConfig::default(), Timestamp(0));
        let mut hs = hosts();
        hs.push(Host::new(0, Resources::cpu_mem(1, 1)));
        e.handle(Timestamp(0), Input::Hosts(hs));
        assert!(matches!(e.poll_command(), Some(Command::InputRejected(_))));
        e.handle(
            Timestamp(0),
            Input::SetSolver(SolverSettings {
                target_optimality: 2.0,
                ..SolverSettings::default()
            }),
        );
        assert!(matches!(e.poll_command(), Some(Command::InputRejected(_))));
        e.handle(
            Timestamp(0),
            Input::MigrationDone {
                vm: VmId(9),
                to: HostId(1),
            },
        );
        assert!(matches!(e.poll_command(), Some(Command::InputRejected(_))));
        e.handle(
            Timestamp(0),
            Input::Place {
                request_id: 1,
                vm: Vm::new(1, Resources::cpu_mem(1, 1)),
            },
        );
        assert!(matches!(
            e.poll_command(),
            Some(Command::Rejected { request_id: 1, .. })
        ));
    }
}
