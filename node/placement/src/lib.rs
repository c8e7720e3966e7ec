#![doc = include_str!("docs.md")]
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
// Resource vectors (demand, used, capacity) are walked in parallel by dimension index;
// index loops read clearer than zipped iterators over three arrays.
#![allow(clippy::needless_range_loop)]

pub mod bound;
pub mod control;
pub mod engine;
pub mod exact;
pub mod heuristic;
pub mod model;
pub mod online;
pub mod problem;
pub mod rebalance;
pub mod rng;
pub mod state;
pub mod workload;

pub use bound::{LowerBound, lower_bound};
pub use control::{
    AvoidList, Deadline, EvalCounts, NoDeadline, SolverSettings, SolverStats, Timestamp,
};
pub use engine::{Command, Engine, EngineConfig, Input};
pub use exact::{ExactError, ExactOutput, lp_relaxation, solve_exact};
pub use heuristic::{Algorithm, SolveOutput, solve};
pub use model::{
    Health, Host, HostId, PlacementConfig, PlacementInput, Resources, Rule, RuleId, RuleKind, Vm,
    VmId,
};
pub use online::{Decision, OnlinePlacer, PlaceError};
pub use problem::{FilterReason, ModelError, Problem};
pub use rebalance::{
    Migration, OrderError, RebalanceError, RebalancePlan, first_unsafe_step, migration_budget,
    order_migrations, rebalance,
};
pub use state::{Placement, SoftViolation, Violation, verify};
