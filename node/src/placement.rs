//! The node's placement service: the tokio-side driver of the ITP engine
//! (`dwcp_placement::Engine`), and the operator controls behind `/v1/placement/...`.
//!
//! ```text
//!  POST /v1/placement/vms ──> Placement::create
//!      │  snapshot: ready members (announcement: donated share, region, GPUs;
//!      │            heartbeat: health, allocated) + this node's VM table
//!      │  hosts = donated share - min free memory - allocated - pending   (per node)
//!      │  Engine: Hosts, Place ──> Placed { host, score, filtered } | Rejected
//!      ├─ consensus on: commit a VM decision (id, spec, host, `placed`) ──> certificate
//!      ├─ chosen = this node ──> Vms::create (the backend re-checks the donated share)
//!      └─ chosen = other    ──> control request CreateVm + certificate
//!                               ──> host: check_decision ──> its Vms::create
//!                               refused / unreachable: `failed` decision, next node (3 tries)
//!      created: the host hands the certified record to state sync (`vms/<id>`)
//! ```
//!
//! With a committee configured (`acp.committee`), no VM is created anywhere without a
//! committed decision: the host refuses a create whose certificate is missing, does not
//! verify, names another host or another spec, or was used before. Without a committee,
//! placement is this node's own call and nothing is recorded in the cluster document.
//!
//! What the engine sees of a node is its placeable share as capacity (the donated share,
//! minus `placement.constraints.min_free_memory_percent` of its memory) and, recorded as
//! running load (`Input::Running`, one aggregate per node), what its defined VMs hold (the
//! `allocated` figures of its heartbeat; for this node, its VM table read at decision time)
//! plus creates this node forwarded to it that its heartbeats do not show yet. So decisions
//! see how full every node is and pack VMs onto nodes already in use, as the manual's bin
//! packing asks, instead of opening an idle volunteer's machine. Re-plans and migrations are
//! not driven (the node cannot migrate yet).
//!
//! Reputation is 1.0 for every node and nothing is quarantined until the reputation engine is
//! wired. Link quality and RTT come from PBA (`crate::pba`, see [`NodeSnapshot`]): RTT from
//! pings, quality from the bandwidth forecast while transfers to the node run (1.0 without
//! one). Avoidance (`placement avoid-node`) is local to this node's placement service: other nodes do not
//! learn about it. One placed create runs at a time per node.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Mutex,
    time::{Duration, Instant},
};

use dwcp_placement::{
    Command, Decision, Engine, EngineConfig, FilterReason, Health as HostHealth, Host, HostId,
    Input, PlaceError, PlacementConfig, Resources as Demand, SolverSettings, SolverStats,
    Timestamp, Vm, model::Dim,
};
use dwcp_protocol::{
    Allocation, DonatedShare, HealthStatus, NodeId, Resources, VmId,
    api::{
        AgreedView, AvoidMode, AvoidView, ConstraintKindShare, ConstraintView, FilteredNode,
        PlacementExplanation, PlacementStats, SetSolverRequest, SolverSettingsView,
        SolverStatsView, VmCreateRequest, VmView,
    },
    control::{ControlErrorCode, ControlRequest, ControlResponse},
};
use dwcp_statesync::{Certified, VmDecision, VmState};
use tracing::{info, warn};

use crate::{
    cert::VmDecisionOp, config::PlacementSection, daemon::Shared, metrics::Metrics, vms::VmError,
};

/// Nodes tried for one create before giving up (the first choice plus two more).
pub const MAX_ATTEMPTS: usize = 3;
/// Longest avoidance (`placement avoid-node --duration`).
pub const MAX_AVOID: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long a forwarded create is counted against its node when no newer heartbeat shows it.
pub const PENDING_TTL: Duration = Duration::from_secs(60);
/// Forwarded creates remembered at most until their nodes' heartbeats show them.
pub const MAX_PENDING: usize = 1024;
/// Forwarded creates this node serves at once; more are refused as busy.
pub const CONTROL_SLOTS: usize = 4;

/// One ready node as membership knows it, for a placement decision.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSnapshot {
    /// The node.
    pub id: NodeId,
    /// This node.
    pub is_self: bool,
    /// Whether its signed announcement is known (without it nothing is known of its share).
    pub announced: bool,
    /// Region.
    pub region: String,
    /// Total resources.
    pub resources: Resources,
    /// Donated share.
    pub donated: DonatedShare,
    /// Health status of its last heartbeat.
    pub status: Option<HealthStatus>,
    /// What its VMs hold (`None`: no hypervisor, or it did not say).
    pub allocated: Option<Allocation>,
    /// Sequence number of its last heartbeat.
    pub heartbeat_seq: u64,
    /// The link to it as PBA forecasts it (`p10 / mean` bandwidth at
    /// `pba.model.prediction_horizon`), in `[0, 1]`; 1.0 without a forecast and for this node.
    pub link_quality: f64,
    /// Expected RTT to it from PBA (pings and transfers), ms; 0 when unknown and for this node.
    pub rtt_ms: u32,
}

/// Why a placed create failed.
#[derive(Debug, thiserror::Error)]
pub enum PlaceFailure {
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// No node can take the VM.
    #[error("{0}")]
    NoNode(String),
    /// The committee did not agree to the placement (refused, or no commit in time).
    #[error("placement decision not agreed: {0}")]
    NotAgreed(String),
    /// The chosen (or pinned) node refused, or could not be asked.
    #[error("{0}")]
    Refused(String),
    /// Creating it on this node failed.
    #[error(transparent)]
    Local(#[from] VmError),
}

/// A forwarded create not yet visible in its node's heartbeats.
#[derive(Debug, Clone)]
struct Pending {
    node: NodeId,
    demand: Allocation,
    /// Dropped once a heartbeat with a larger sequence number arrives.
    after_seq: u64,
    expires: Instant,
}

#[derive(Debug, Default)]
struct Counters {
    decisions: u64,
    rejections: u64,
    forwarded: u64,
    forward_failures: u64,
    total_ms: f64,
    max_ms: f64,
    last: Option<SolverStatsView>,
}

#[derive(Debug)]
struct State {
    engine: Engine,
    host_of: BTreeMap<NodeId, HostId>,
    node_of: BTreeMap<HostId, NodeId>,
    avoided: BTreeMap<NodeId, (AvoidMode, Timestamp)>,
    pending: Vec<Pending>,
    settings: SolverSettings,
    counters: Counters,
    next_id: u64,
}

/// The limits placement keeps on every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// At most this many VMs per node.
    pub max_vms_per_node: u32,
    /// Memory kept free, per mille of the donated memory.
    pub min_free_memory_permille: u32,
}

/// The outcome of one decision.
#[derive(Debug, Clone)]
struct Chosen {
    node: NodeId,
    decision: Decision,
    soft_relaxed: bool,
    considered: usize,
    filtered: BTreeMap<String, usize>,
    examples: Vec<FilteredNode>,
    elapsed_ms: f64,
}

/// The placement service (one per node, in [`Shared`]).
#[derive(Debug)]
pub struct Placement {
    state: Mutex<State>,
    limits: Limits,
    epoch: Instant,
    create_lock: tokio::sync::Mutex<()>,
    control_slots: tokio::sync::Semaphore,
}

impl Placement {
    /// A service with the limits and solver settings of `placement:`.
    pub fn new(cfg: &PlacementSection) -> Self {
        let limits = Limits {
            max_vms_per_node: cfg.constraints.max_vms_per_node,
            min_free_memory_permille: u32::from(cfg.constraints.min_free_memory_percent) * 10,
        };
        let settings = SolverSettings {
            max_time_ms: cfg.solver.max_time.map(|d| d.as_millis() as u64),
            target_optimality: cfg.solver.target_optimality,
            ..SolverSettings::default()
        };
        let engine = Engine::new(
            EngineConfig {
                // Capacities handed to the engine are already net of the memory kept free
                // and of what runs; the VM count is checked here against reported figures.
                placement: PlacementConfig {
                    max_vms_per_node: u32::MAX,
                    min_free_memory_permille: 0,
                    ..PlacementConfig::default()
                },
                settings: settings.clone(),
                // Re-plans need migrations, which the node cannot do yet.
                rebalance_interval_ms: u64::MAX / 2,
                ..EngineConfig::default()
            },
            Timestamp(0),
        );
        Self {
            state: Mutex::new(State {
                engine,
                host_of: BTreeMap::new(),
                node_of: BTreeMap::new(),
                avoided: BTreeMap::new(),
                pending: Vec::new(),
                settings,
                counters: Counters::default(),
                next_id: 1,
            }),
            limits,
            epoch: Instant::now(),
            create_lock: tokio::sync::Mutex::new(()),
            control_slots: tokio::sync::Semaphore::new(CONTROL_SLOTS),
        }
    }

    fn now(&self) -> Timestamp {
        Timestamp(self.epoch.elapsed().as_millis() as u64)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot to serve one forwarded create, if one is free.
    pub(crate) fn control_slot(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.control_slots.try_acquire().ok()
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Ready nodes, this node's allocation filled in from its VM table.
    async fn snapshot(shared: &Shared) -> Vec<NodeSnapshot> {
        let mut nodes = shared.placement_view();
        let mine = shared.vms.allocation().await;
        for n in nodes.iter_mut().filter(|n| n.is_self) {
            n.allocated = mine;
        }
        nodes
    }

    /// Creates a VM where placement puts it (`node` = `None`) or on the given node.
    pub async fn create(
        &self,
        shared: &Shared,
        vm: VmCreateRequest,
        pinned: Option<NodeId>,
    ) -> Result<(VmView, PlacementExplanation), PlaceFailure> {
        check_request(&vm)?;
        let _one_at_a_time = self.create_lock.lock().await;
        if let Some(node) = pinned {
            let started = Instant::now();
            let (view, agreed) = match self.create_on(shared, node, &vm).await {
                Ok(v) => v,
                Err(PlaceFailure::Refused(why)) => {
                    return Err(PlaceFailure::Refused(format!(
                        "node {}: {why}",
                        node.short()
                    )));
                }
                Err(e) => return Err(e),
            };
            let local = node == shared.node_id();
            if !local {
                self.reserve(shared, node, demand_of(&vm));
            }
            return Ok((
                view,
                PlacementExplanation {
                    node,
                    local,
                    pinned: true,
                    score: None,
                    nodes_considered: 1,
                    nodes_scored: 0,
                    filtered: BTreeMap::new(),
                    examples: Vec::new(),
                    soft_violations: Vec::new(),
                    refused: Vec::new(),
                    decision_ms: 0.0,
                    summary: format!(
                        "pinned to node {} with --node (not chosen by placement; created in {:.0} ms){}",
                        node.short(),
                        started.elapsed().as_secs_f64() * 1e3,
                        agreed_note(agreed.as_ref())
                    ),
                    agreed,
                },
            ));
        }
        let demand = demand_of(&vm);
        let mut refused: Vec<FilteredNode> = Vec::new();
        let mut decision_ms = 0.0;
        for _ in 0..MAX_ATTEMPTS {
            let nodes = Self::snapshot(shared).await;
            let exclude: BTreeSet<NodeId> = refused.iter().map(|r| r.node).collect();
            let chosen = match self.decide(&shared.metrics, &nodes, &demand, &exclude) {
                Ok(c) => c,
                Err(msg) => {
                    let mut msg = msg;
                    for r in &refused {
                        msg.push_str(&format!("; tried node {}: {}", r.node.short(), r.reason));
                    }
                    return Err(PlaceFailure::NoNode(msg));
                }
            };
            decision_ms += chosen.elapsed_ms;
            match self.create_on(shared, chosen.node, &vm).await {
                Ok((view, agreed)) => {
                    let local = chosen.node == shared.node_id();
                    if !local {
                        self.reserve(shared, chosen.node, demand);
                    }
                    let summary = format!(
                        "{}{}",
                        summary(&chosen, &refused, local),
                        agreed_note(agreed.as_ref())
                    );
                    info!(vm = %view.id, node = %chosen.node, score = chosen.decision.score, "vm placed");
                    return Ok((
                        view,
                        PlacementExplanation {
                            node: chosen.node,
                            local,
                            pinned: false,
                            score: Some(chosen.decision.score),
                            nodes_considered: chosen.considered,
                            nodes_scored: chosen.decision.scored,
                            filtered: chosen.filtered,
                            examples: chosen.examples,
                            soft_violations: chosen
                                .decision
                                .soft_violations
                                .iter()
                                .map(|r| r.0.clone())
                                .collect(),
                            refused,
                            decision_ms,
                            agreed,
                            summary,
                        },
                    ));
                }
                Err(PlaceFailure::Refused(why)) => {
                    warn!(node = %chosen.node, %why, "chosen node refused the vm; trying another");
                    refused.push(FilteredNode {
                        node: chosen.node,
                        reason: why,
                    });
                }
                Err(PlaceFailure::Local(e)) if chosen.node == shared.node_id() => {
                    // This node was chosen but its backend refused: next node, unless the
                    // request itself is at fault.
                    if matches!(e, VmError::BadRequest(_)) {
                        return Err(PlaceFailure::Local(e));
                    }
                    refused.push(FilteredNode {
                        node: chosen.node,
                        reason: e.to_string(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        let list: Vec<String> = refused
            .iter()
            .map(|r| format!("node {}: {}", r.node.short(), r.reason))
            .collect();
        Err(PlaceFailure::Refused(format!(
            "{} chosen nodes refused the VM: {}",
            refused.len(),
            list.join("; ")
        )))
    }

    /// Counts a VM just created on another node against it until its heartbeats show it.
    fn reserve(&self, shared: &Shared, node: NodeId, demand: Allocation) {
        let seq = shared
            .placement_view()
            .iter()
            .find(|n| n.id == node)
            .map_or(0, |n| n.heartbeat_seq);
        let mut st = self.lock();
        if st.pending.len() >= MAX_PENDING {
            st.pending.remove(0);
        }
        st.pending.push(Pending {
            node,
            demand,
            after_seq: seq,
            expires: Instant::now() + PENDING_TTL,
        });
    }

    /// Creates the VM on `node`: here, or through the control service.
    /// With consensus on, the placement is first agreed (a committed VM decision naming the
    /// VM id, its spec and `node`); the host checks that certificate before it creates the
    /// VM, and the certified record goes into the cluster document. A VM the host then
    /// refuses gets a `failed` decision, so the cluster does not count it.
    async fn create_on(
        &self,
        shared: &Shared,
        node: NodeId,
        vm: &VmCreateRequest,
    ) -> Result<(VmView, Option<AgreedView>), PlaceFailure> {
        let agreed = agree(shared, node, vm).await?;
        let result = self.create_agreed(shared, node, vm, agreed.as_ref()).await;
        let view = agreed.as_ref().map(|a| AgreedView {
            decision_seq: a.decision.decision_seq,
            certificate_bytes: a.certificate.len(),
            commit_ms: a.commit_ms,
        });
        if let Some(a) = agreed {
            match &result {
                // The host writes the record of a VM it created for another node.
                Ok(_) if node == shared.node_id() => created(shared, a),
                Ok(_) => {}
                Err(e) => {
                    info!(vm = %a.decision.vm, error = %e, "agreed placement failed on its host; deciding `failed`");
                    spawn_next(shared, &a.decision, VmState::Failed);
                }
            }
        }
        result.map(|v| (v, view))
    }

    async fn create_agreed(
        &self,
        shared: &Shared,
        node: NodeId,
        vm: &VmCreateRequest,
        agreed: Option<&Agreed>,
    ) -> Result<VmView, PlaceFailure> {
        if node == shared.node_id() {
            return Ok(shared
                .vms
                .create(vm.clone(), agreed.map(|a| a.decision.vm))
                .await?);
        }
        let metrics = &shared.metrics;
        self.lock().counters.forwarded += 1;
        let result = forward(shared, node, vm, agreed).await;
        let label = match &result {
            Ok(_) => "created",
            Err(ForwardError::Refused { .. }) => "refused",
            Err(ForwardError::Unreachable(_)) => "unreachable",
        };
        metrics.itp_forwarded.with_label_values(&[label]).inc();
        match result {
            Ok(v) => Ok(v),
            Err(e) => {
                self.lock().counters.forward_failures += 1;
                if let ForwardError::Refused {
                    code: ControlErrorCode::BadRequest,
                    ..
                } = e
                {
                    return Err(PlaceFailure::BadRequest(format!(
                        "node {}: {e}",
                        node.short()
                    )));
                }
                Err(PlaceFailure::Refused(e.to_string()))
            }
        }
    }

    /// One decision over `nodes`, leaving out `exclude`. Synchronous: the state lock is held
    /// for the decision only.
    fn decide(
        &self,
        m: &Metrics,
        nodes: &[NodeSnapshot],
        demand: &Allocation,
        exclude: &BTreeSet<NodeId>,
    ) -> Result<Chosen, String> {
        let started = Instant::now();
        let now = self.now();
        let mut st = self.lock();
        let st = &mut *st;
        expire(st, now, nodes);
        for n in nodes {
            host_id(st, n.id);
        }
        let built = build_hosts(nodes, &st.pending, self.limits, exclude, |id| {
            st.host_of.get(&id).copied().unwrap_or(HostId(u64::MAX))
        });
        let mut filtered: BTreeMap<String, usize> = BTreeMap::new();
        let mut examples: Vec<FilteredNode> = Vec::new();
        for (id, why) in &built.prefiltered {
            *filtered.entry(why.0.to_owned()).or_default() += 1;
            examples.push(FilteredNode {
                node: *id,
                reason: why.1.clone(),
            });
        }
        st.engine.handle(now, Input::Hosts(built.hosts.clone()));
        for h in &built.hosts {
            let load = built.used.get(&h.id).copied().unwrap_or_default();
            st.engine.handle(
                now,
                Input::Running {
                    vm: Vm::new(load_vm_id(h.id).0, load),
                    host: h.id,
                },
            );
        }
        let vm_id = st.next_id;
        st.next_id += 1;
        let vm = Vm::new(vm_id, to_demand(demand));
        let mut result = place(st, now, vm.clone());
        let mut soft_relaxed = false;
        let soft: Vec<(HostId, Timestamp)> = st
            .avoided
            .iter()
            .filter(|(_, (m, until))| *m == AvoidMode::Soft && *until > now)
            .filter_map(|(n, (_, until))| st.host_of.get(n).map(|h| (*h, *until)))
            .collect();
        if matches!(result, Err(PlaceError::NoHost { .. })) && !soft.is_empty() {
            // Soft avoidance gives way when nothing else fits: lift it for one try.
            for (h, _) in &soft {
                st.engine.handle(
                    now,
                    Input::AvoidNode {
                        host: *h,
                        duration_ms: 0,
                    },
                );
            }
            result = place(st, now, vm);
            soft_relaxed = result.is_ok();
            for (h, until) in &soft {
                st.engine.handle(
                    now,
                    Input::AvoidNode {
                        host: *h,
                        duration_ms: until.0.saturating_sub(now.0),
                    },
                );
            }
        }
        let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        m.itp_decision_seconds.observe(elapsed_ms / 1e3);
        st.counters.total_ms += elapsed_ms;
        st.counters.max_ms = st.counters.max_ms.max(elapsed_ms);
        let (engine_filtered, decision) = match result {
            Ok(d) => (d.filtered.clone(), Some(d)),
            Err(PlaceError::NoHost { filtered, .. }) => (filtered, None),
            Err(PlaceError::AlreadyPlaced(v)) => (
                BTreeMap::from([(format!("internal: {v} already placed"), 1)]),
                None,
            ),
        };
        for (k, n) in engine_filtered {
            *filtered.entry(k).or_default() += n;
        }
        for (k, n) in &filtered {
            m.itp_filtered
                .with_label_values(&[k.as_str()])
                .inc_by(*n as u64);
        }
        let Some(decision) = decision else {
            st.counters.rejections += 1;
            m.itp_decisions.with_label_values(&["rejected"]).inc();
            let mut reasons: Vec<String> = filtered
                .iter()
                .map(|(k, n)| format!("{n} {}", describe_kind(k)))
                .collect();
            if nodes.is_empty() {
                reasons.push("no ready node".into());
            }
            // The engine gives counts only when nothing fits: say per node what stopped it.
            for h in &built.hosts {
                let Some(n) = st
                    .node_of
                    .get(&h.id)
                    .and_then(|id| nodes.iter().find(|s| s.id == *id))
                else {
                    continue;
                };
                examples.push(FilteredNode {
                    node: n.id,
                    reason: why_not(
                        h,
                        built.used.get(&h.id),
                        n,
                        demand,
                        st.avoided.get(&n.id),
                        now,
                        self.limits,
                    ),
                });
            }
            let details: Vec<String> = examples
                .iter()
                .map(|e| format!("node {}: {}", e.node.short(), e.reason))
                .collect();
            return Err(format!(
                "no node can take the VM ({} vCPU, {} MiB memory) among {} ready: {}{}",
                demand.vcpus,
                demand.memory_mib,
                nodes.len(),
                reasons.join(", "),
                if details.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", details.join("; "))
                }
            ));
        };
        // The engine keeps no VM between decisions: usage comes from the nodes' reports.
        st.engine
            .handle(now, Input::VmStopped(dwcp_placement::VmId(vm_id)));
        for (h, r) in &decision.examples {
            if let Some(n) = st.node_of.get(h) {
                examples.push(FilteredNode {
                    node: *n,
                    reason: explain_reason(r, nodes.iter().find(|s| s.id == *n), self.limits),
                });
            }
        }
        let Some(&node) = st.node_of.get(&decision.host) else {
            return Err(format!("internal: unknown {}", decision.host));
        };
        let (used, bound) = usage_bound(nodes, &st.pending, self.limits, node, demand);
        let stats = SolverStats::new("online", elapsed_ms, used, bound, decision.evals, 0);
        m.itp_optimality_gap.set(stats.optimality_gap);
        m.itp_constraint_eval_share.set(stats.constraint_eval_share);
        m.itp_decisions.with_label_values(&["placed"]).inc();
        st.counters.decisions += 1;
        st.counters.last = Some(stats_view(&stats));
        Ok(Chosen {
            node,
            considered: nodes.len(),
            decision,
            soft_relaxed,
            filtered,
            examples,
            elapsed_ms,
        })
    }

    /// `placement avoid-node`: avoid `node` for `duration`, hard or soft.
    pub fn avoid(
        &self,
        metrics: &Metrics,
        node: NodeId,
        duration: Duration,
        mode: AvoidMode,
    ) -> Result<AvoidView, String> {
        if duration.is_zero() || duration > MAX_AVOID {
            return Err(format!(
                "duration must be between 1ms and {}, got {}",
                humantime::format_duration(MAX_AVOID),
                humantime::format_duration(duration)
            ));
        }
        let now = self.now();
        let mut st = self.lock();
        let h = host_id(&mut st, node);
        let ms = duration.as_millis() as u64;
        st.engine.handle(
            now,
            Input::AvoidNode {
                host: h,
                duration_ms: ms,
            },
        );
        st.avoided
            .insert(node, (mode, Timestamp(now.0.saturating_add(ms))));
        metrics.itp_avoided_nodes.set(st.avoided.len() as i64);
        info!(%node, ?mode, duration = %humantime::format_duration(duration), "placement avoids node");
        Ok(AvoidView {
            node,
            mode,
            remaining_ms: ms,
        })
    }

    /// Nodes avoided now.
    pub fn avoided(&self, metrics: &Metrics) -> Vec<AvoidView> {
        let now = self.now();
        let mut st = self.lock();
        expire(&mut st, now, &[]);
        metrics.itp_avoided_nodes.set(st.avoided.len() as i64);
        st.avoided
            .iter()
            .map(|(n, (mode, until))| AvoidView {
                node: *n,
                mode: *mode,
                remaining_ms: until.0.saturating_sub(now.0),
            })
            .collect()
    }

    /// `placement set-solver`: validated, then handed to the engine.
    pub fn set_solver(&self, req: &SetSolverRequest) -> Result<SolverSettingsView, String> {
        let mut st = self.lock();
        let mut s = st.settings.clone();
        if let Some(t) = req.max_time_ms {
            s.max_time_ms = Some(t);
        }
        if let Some(o) = req.target_optimality {
            s.target_optimality = o;
        }
        let s = s.validate().map_err(|e| e.to_string())?;
        let now = self.now();
        st.engine.handle(now, Input::SetSolver(s.clone()));
        while let Some(c) = st.engine.poll_command() {
            if let Command::InputRejected(why) = c {
                return Err(why);
            }
        }
        st.settings = s;
        Ok(settings_view(&st.settings))
    }

    /// `placement solver-stats`.
    pub fn stats(&self) -> PlacementStats {
        let st = self.lock();
        let c = &st.counters;
        PlacementStats {
            decisions: c.decisions,
            rejections: c.rejections,
            forwarded: c.forwarded,
            forward_failures: c.forward_failures,
            mean_decision_ms: if c.decisions + c.rejections == 0 {
                0.0
            } else {
                c.total_ms / (c.decisions + c.rejections) as f64
            },
            max_decision_ms: c.max_ms,
            last: c.last.clone(),
            settings: settings_view(&st.settings),
        }
    }

    /// `placement list-constraints [--type]`: the built-in limits, avoided nodes and rules.
    pub fn constraints(
        &self,
        metrics: &Metrics,
        of_type: Option<&str>,
    ) -> Result<Vec<ConstraintView>, String> {
        let rule_type = match of_type {
            None | Some("builtin") | Some("avoid") => None,
            Some("affinity") => Some(dwcp_placement::model::RuleType::Affinity),
            Some("anti-affinity") => Some(dwcp_placement::model::RuleType::AntiAffinity),
            Some(other) => {
                return Err(format!(
                    "unknown constraint type `{other}`: use builtin, avoid, affinity or anti-affinity"
                ));
            }
        };
        let mut out = Vec::new();
        if matches!(of_type, None | Some("builtin")) {
            out.extend(builtin_constraints(self.limits));
        }
        if matches!(of_type, None | Some("avoid")) {
            for a in self.avoided(metrics) {
                out.push(ConstraintView {
                    id: format!("avoid:{}", a.node),
                    kind: "avoid".into(),
                    hard: a.mode == AvoidMode::Hard,
                    description: format!(
                        "avoid node {} ({}) for another {} (local to this node's placement)",
                        a.node.short(),
                        match a.mode {
                            AvoidMode::Hard => "hard",
                            AvoidMode::Soft => "soft: used when no other node fits",
                        },
                        humantime::format_duration(Duration::from_secs(a.remaining_ms / 1000))
                    ),
                });
            }
        }
        if of_type.is_none() || rule_type.is_some() {
            let st = self.lock();
            for c in st.engine.list_constraints(rule_type) {
                out.push(ConstraintView {
                    id: c.id,
                    kind: c.kind.into(),
                    hard: c.hard,
                    description: c.description,
                });
            }
        }
        Ok(out)
    }
}

/// The built-in constraints every decision applies.
fn builtin_constraints(limits: Limits) -> Vec<ConstraintView> {
    let c = |id: &str, d: String| ConstraintView {
        id: format!("builtin:{id}"),
        kind: "builtin".into(),
        hard: true,
        description: d,
    };
    vec![
        c(
            "ready",
            "only ready cluster members (fresh heartbeats, signed announcement) whose \
             hypervisor runs; paused and draining nodes take nothing new"
                .into(),
        ),
        c(
            "donated-share",
            "a VM fits what is left of the node's donated vCPUs, memory and disk; the node \
             re-checks when it creates the VM"
                .into(),
        ),
        c(
            "min-free-memory",
            format!(
                "{} % of each node's donated memory is kept free",
                limits.min_free_memory_permille / 10
            ),
        ),
        c(
            "max-vms-per-node",
            format!("at most {} VMs per node", limits.max_vms_per_node),
        ),
    ]
}

fn settings_view(s: &SolverSettings) -> SolverSettingsView {
    SolverSettingsView {
        max_time_ms: s.max_time_ms,
        target_optimality: s.target_optimality,
    }
}

fn stats_view(s: &SolverStats) -> SolverStatsView {
    SolverStatsView {
        solver: s.solver.clone(),
        elapsed_ms: s.elapsed_ms,
        hosts_used: s.hosts_used,
        lower_bound: s.lower_bound,
        optimality_gap: s.optimality_gap,
        constraint_eval_share: s.constraint_eval_share,
        constraint_kind_share: ConstraintKindShare {
            resource: s.constraint_kind_share[0],
            eligibility: s.constraint_kind_share[1],
            anti_affinity: s.constraint_kind_share[2],
        },
        evaluations: s.evals.constraint_checks() + s.evals.score_evals,
    }
}

/// Places one VM; the engine answers through its command queue.
fn place(st: &mut State, now: Timestamp, vm: Vm) -> Result<Decision, PlaceError> {
    let request_id = vm.id.0;
    st.engine.handle(now, Input::Place { request_id, vm });
    let mut out = Err(PlaceError::NoHost {
        vm: dwcp_placement::VmId(request_id),
        filtered: BTreeMap::new(),
    });
    while let Some(c) = st.engine.poll_command() {
        match c {
            Command::Placed {
                request_id: r,
                decision,
            } if r == request_id => out = Ok(decision),
            Command::Rejected {
                request_id: r,
                error,
            } if r == request_id => out = Err(error),
            Command::InputRejected(why) => warn!(%why, "placement engine refused an input"),
            _ => {}
        }
    }
    out
}

/// Expires avoidances and pending reservations at `now`.
fn expire(st: &mut State, now: Timestamp, nodes: &[NodeSnapshot]) {
    st.engine.handle_timeout(now);
    while st.engine.poll_command().is_some() {}
    st.avoided.retain(|_, (_, until)| *until > now);
    let t = Instant::now();
    st.pending.retain(|p| {
        p.expires > t
            && nodes
                .iter()
                .find(|n| n.id == p.node)
                .is_none_or(|n| n.heartbeat_seq <= p.after_seq)
    });
}

fn host_id(st: &mut State, node: NodeId) -> HostId {
    if let Some(h) = st.host_of.get(&node) {
        return *h;
    }
    let h = HostId(st.host_of.len() as u64);
    st.host_of.insert(node, h);
    st.node_of.insert(h, node);
    h
}

/// What a VM request holds of a share.
fn demand_of(vm: &VmCreateRequest) -> Allocation {
    Allocation {
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        disk_mib: vm.disk_mib.unwrap_or(0),
        vms: 1,
    }
}

fn to_demand(a: &Allocation) -> Demand {
    Demand {
        cpu_milli: u64::from(a.vcpus).saturating_mul(1000),
        mem_mib: a.memory_mib,
        disk_gib: a.disk_mib.div_ceil(1024),
        gpus: 0,
        net_mbps: 0,
    }
}

fn check_request(vm: &VmCreateRequest) -> Result<(), PlaceFailure> {
    if vm.vcpus == 0 {
        return Err(PlaceFailure::BadRequest(
            "a VM needs at least 1 vCPU".into(),
        ));
    }
    if vm.memory_mib == 0 {
        return Err(PlaceFailure::BadRequest(
            "a VM needs some memory (e.g. --memory 256M)".into(),
        ));
    }
    if vm.name.is_empty() || vm.name.len() > 64 || vm.name.chars().any(char::is_control) {
        return Err(PlaceFailure::BadRequest(
            "name must be 1 to 64 printable characters".into(),
        ));
    }
    // The same bounds the receiving node checks, so a forwarded request never fails on them.
    ControlRequest::CreateVm {
        cluster_id: String::new(),
        vm: vm.clone(),
        decision: None,
    }
    .validate()
    .map_err(|e| PlaceFailure::BadRequest(e.to_string()))
}

/// Hosts for the engine, and nodes left out before it with `(reason kind, text)`.
#[derive(Debug, Default)]
struct Built {
    hosts: Vec<Host>,
    /// What each host already holds (its reported load), fed as `Input::Running`.
    used: BTreeMap<HostId, Demand>,
    prefiltered: Vec<(NodeId, (&'static str, String))>,
}

/// The engine VM id standing for a host's reported load (far from the ids of requests).
fn load_vm_id(h: HostId) -> dwcp_placement::VmId {
    dwcp_placement::VmId(u64::MAX - h.0)
}

/// The placeable share of a node: donated, memory kept free taken off.
fn placeable(n: &NodeSnapshot, limits: Limits) -> Allocation {
    let keep = u64::from(limits.min_free_memory_permille.min(1000));
    Allocation {
        vcpus: n.donated.vcpus,
        memory_mib: n.donated.memory_mib * (1000 - keep) / 1000,
        disk_mib: n.donated.disk_gib.saturating_mul(1024),
        vms: limits.max_vms_per_node,
    }
}

/// What a node holds: its report plus forwarded creates it does not show yet.
fn held(n: &NodeSnapshot, pending: &[Pending]) -> Allocation {
    let mut a = n.allocated.unwrap_or_default();
    for p in pending.iter().filter(|p| p.node == n.id) {
        a.vcpus = a.vcpus.saturating_add(p.demand.vcpus);
        a.memory_mib = a.memory_mib.saturating_add(p.demand.memory_mib);
        a.disk_mib = a.disk_mib.saturating_add(p.demand.disk_mib);
        a.vms = a.vms.saturating_add(p.demand.vms);
    }
    a
}

fn build_hosts(
    nodes: &[NodeSnapshot],
    pending: &[Pending],
    limits: Limits,
    exclude: &BTreeSet<NodeId>,
    mut host_id: impl FnMut(NodeId) -> HostId,
) -> Built {
    let mut b = Built::default();
    for n in nodes {
        if exclude.contains(&n.id) {
            continue;
        }
        if !n.announced {
            b.prefiltered.push((
                n.id,
                (
                    "no-announcement",
                    "its announcement has not arrived yet".into(),
                ),
            ));
            continue;
        }
        if n.allocated.is_none() {
            b.prefiltered.push((
                n.id,
                (
                    "no-hypervisor",
                    "it runs no hypervisor (or reports no VM allocation)".into(),
                ),
            ));
            continue;
        }
        let cap = placeable(n, limits);
        let used = held(n, pending);
        if used.vms >= limits.max_vms_per_node {
            b.prefiltered.push((
                n.id,
                (
                    "max-vms",
                    format!(
                        "it holds {} VMs, the limit is {}",
                        used.vms, limits.max_vms_per_node
                    ),
                ),
            ));
            continue;
        }
        let gpus: u32 = n.resources.gpus.iter().map(|g| g.count).sum();
        let mut h = Host::new(
            host_id(n.id).0,
            Demand {
                cpu_milli: u64::from(cap.vcpus) * 1000,
                mem_mib: cap.memory_mib,
                disk_gib: cap.disk_mib / 1024,
                gpus: u64::from(gpus),
                net_mbps: 0,
            },
        );
        // Held load beyond the share (a node over-committed, or a share that shrank) is
        // clamped: the node is then simply full.
        let load = Demand {
            cpu_milli: (u64::from(used.vcpus) * 1000).min(h.capacity.cpu_milli),
            mem_mib: used.memory_mib.min(h.capacity.mem_mib),
            disk_gib: used.disk_mib.div_ceil(1024).min(h.capacity.disk_gib),
            gpus: 0,
            net_mbps: 0,
        };
        if load != Demand::default() {
            b.used.insert(h.id, load);
        }
        h.gpu_model = n.resources.gpus.first().map(|g| g.model.clone());
        h.link_quality = if n.link_quality.is_finite() {
            n.link_quality.clamp(0.0, 1.0)
        } else {
            1.0
        };
        h.rtt_ms = n.rtt_ms;
        h.region = n.region.clone();
        h.health = match n.status {
            Some(HealthStatus::Healthy) | None => HostHealth::Healthy,
            Some(HealthStatus::Degraded) => HostHealth::Degraded,
            Some(HealthStatus::Paused | HealthStatus::Draining) => HostHealth::Unhealthy,
        };
        b.hosts.push(h);
    }
    b
}

/// Nodes holding VMs after placing `demand` on `chosen`, and the fractional lower bound on
/// the nodes that the cluster's whole allocated demand needs (in each of vCPUs and memory,
/// the fewest placeable shares covering it, largest first).
fn usage_bound(
    nodes: &[NodeSnapshot],
    pending: &[Pending],
    limits: Limits,
    chosen: NodeId,
    demand: &Allocation,
) -> (usize, f64) {
    let mut used = 0;
    let (mut cpu, mut mem) = (0u64, 0u64);
    let mut caps_cpu = Vec::new();
    let mut caps_mem = Vec::new();
    for n in nodes.iter().filter(|n| n.allocated.is_some()) {
        let h = held(n, pending);
        let mut vcpus = u64::from(h.vcpus);
        let mut mib = h.memory_mib;
        if n.id == chosen {
            vcpus += u64::from(demand.vcpus);
            mib += demand.memory_mib;
        }
        if h.vms > 0 || n.id == chosen {
            used += 1;
        }
        cpu += vcpus;
        mem += mib;
        let cap = placeable(n, limits);
        caps_cpu.push(u64::from(cap.vcpus));
        caps_mem.push(cap.memory_mib);
    }
    (used, cover(caps_cpu, cpu).max(cover(caps_mem, mem)))
}

/// Fewest capacities (largest first) covering `demand`, as a fraction.
fn cover(mut caps: Vec<u64>, demand: u64) -> f64 {
    if demand == 0 {
        return 0.0;
    }
    caps.sort_unstable_by(|a, b| b.cmp(a));
    let mut left = demand;
    for (i, c) in caps.iter().enumerate() {
        if *c >= left {
            return i as f64 + left as f64 / *c as f64;
        }
        left -= c;
    }
    caps.len() as f64
}

/// Why `host` (the engine's view of node `n`) cannot take `demand`, in operator terms.
fn why_not(
    host: &Host,
    used: Option<&Demand>,
    n: &NodeSnapshot,
    demand: &Allocation,
    avoided: Option<&(AvoidMode, Timestamp)>,
    now: Timestamp,
    limits: Limits,
) -> String {
    if let Some((mode, until)) = avoided.filter(|(_, until)| *until > now) {
        return format!(
            "avoided ({}) for another {}",
            match mode {
                AvoidMode::Hard => "hard",
                AvoidMode::Soft => "soft",
            },
            humantime::format_duration(Duration::from_secs(until.0.saturating_sub(now.0) / 1000))
        );
    }
    if host.health == HostHealth::Unhealthy {
        return "paused or draining".into();
    }
    let need = to_demand(demand).to_array();
    let cap = host.capacity.to_array();
    let used = used.copied().unwrap_or_default().to_array();
    let free: Vec<u64> = cap
        .iter()
        .zip(used)
        .map(|(c, u)| c.saturating_sub(u))
        .collect();
    for (k, d) in Dim::ALL.iter().enumerate() {
        if need[k] > free[k] {
            let r = FilterReason::TooSmall {
                dim: *d,
                need: need[k],
                capacity: free[k],
            };
            return explain_reason(&r, Some(n), limits);
        }
    }
    "no room under the placement rules".into()
}

/// A readable reason kind for error messages.
fn describe_kind(k: &str) -> String {
    if let Some(d) = k.strip_prefix("too-small:") {
        return format!("whose whole donated {d} is too small");
    }
    if let Some(d) = k.strip_prefix("full:") {
        // The engine counts hosts short of free CPU from its index without telling a full
        // host from one too small; the per-node lines that follow say which.
        return format!("without enough free {d}");
    }
    match k {
        "no-hypervisor" => "running no hypervisor".into(),
        "no-announcement" => "not yet announced".into(),
        "max-vms" => "at the VM limit".into(),
        "avoided" => "avoided (placement avoid-node)".into(),
        "unhealthy" => "paused or draining".into(),
        other => other.to_owned(),
    }
}

fn unit(d: Dim, v: u64) -> String {
    match d {
        Dim::Cpu => format!("{} vCPU", v / 1000),
        Dim::Memory => format!("{v} MiB memory"),
        Dim::Disk => format!("{v} GiB disk"),
        Dim::Gpu => format!("{v} GPUs"),
        Dim::Network => format!("{v} Mbit/s"),
    }
}

/// One filter reason in operator terms. The engine sees free shares as capacities, so its
/// `TooSmall` means "not enough free": the donated share tells which of the two it is.
fn explain_reason(r: &FilterReason, n: Option<&NodeSnapshot>, limits: Limits) -> String {
    match r {
        FilterReason::TooSmall {
            dim,
            need,
            capacity,
        }
        | FilterReason::Full {
            dim,
            need,
            free: capacity,
        } => {
            let whole = n.map(|n| placeable(n, limits));
            let whole = whole.map(|w| match dim {
                Dim::Cpu => u64::from(w.vcpus) * 1000,
                Dim::Memory => w.memory_mib,
                Dim::Disk => w.disk_mib / 1024,
                _ => 0,
            });
            match whole {
                Some(w) if w < *need => format!(
                    "too small: needs {}, its donated share leaves {} placeable",
                    unit(*dim, *need),
                    unit(*dim, w)
                ),
                Some(w) => format!(
                    "full: needs {}, {} free of {} placeable",
                    unit(*dim, *need),
                    unit(*dim, *capacity),
                    unit(*dim, w)
                ),
                None => format!(
                    "needs {}, {} free",
                    unit(*dim, *need),
                    unit(*dim, *capacity)
                ),
            }
        }
        FilterReason::Avoided { .. } => "avoided (placement avoid-node)".into(),
        FilterReason::Unhealthy => "paused or draining".into(),
        other => other.kind(),
    }
}

fn summary(c: &Chosen, refused: &[FilteredNode], local: bool) -> String {
    let mut s = format!(
        "placed on {} {} (score {:.3}, lower is better): {} of {} ready nodes scored",
        if local { "this node" } else { "node" },
        c.node.short(),
        c.decision.score,
        c.decision.scored,
        c.considered
    );
    if !c.filtered.is_empty() {
        let f: Vec<String> = c
            .filtered
            .iter()
            .map(|(k, n)| format!("{n} {}", describe_kind(k)))
            .collect();
        s.push_str(&format!(", filtered: {}", f.join(", ")));
    }
    if c.soft_relaxed {
        s.push_str("; soft avoidance lifted: no other node could take it");
    }
    for r in refused {
        s.push_str(&format!(
            "; tried node {} first: {}",
            r.node.short(),
            r.reason
        ));
    }
    s
}

/// Why a forwarded create failed.
/// How long a placement waits for its decision to commit: longer than one view change
/// (10 s by default), so a silent primary does not fail the create.
pub const DECISION_TIMEOUT: Duration = Duration::from_secs(25);

/// A placement decision the committee committed.
#[derive(Debug, Clone)]
pub struct Agreed {
    /// What the certificate proves.
    pub decision: VmDecision,
    /// The commit certificate ([`crate::cert`]).
    pub certificate: Vec<u8>,
    /// From submission to commit, milliseconds.
    pub commit_ms: f64,
}

/// The summary's note on the committed decision.
fn agreed_note(a: Option<&AgreedView>) -> String {
    a.map(|a| {
        format!(
            "; agreed by the committee in {:.0} ms (decision {}, certificate {} B)",
            a.commit_ms, a.decision_seq, a.certificate_bytes
        )
    })
    .unwrap_or_default()
}

/// The spec a VM decision records for a create request (disk rounded up to whole GiB).
fn decision_op(vm: &VmCreateRequest, id: VmId, host: NodeId, state: VmState) -> VmDecisionOp {
    VmDecisionOp {
        vm: id,
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        disk_gib: vm.disk_mib.unwrap_or(0).div_ceil(1024),
        host: Some(host),
        state: state.as_str().to_owned(),
    }
}

/// Agrees on placing `vm` on `node` through consensus, under a fresh VM id. `None` when the
/// node runs no consensus (no committee configured): placement is then this node's own call.
pub async fn agree(
    shared: &Shared,
    node: NodeId,
    vm: &VmCreateRequest,
) -> Result<Option<Agreed>, PlaceFailure> {
    let Some(c) = shared.consensus() else {
        return Ok(None);
    };
    let id = VmId::from_bytes(rand::random());
    let op = decision_op(vm, id, node, VmState::Placed);
    let started = Instant::now();
    let certificate = c
        .decide(op.encode(), DECISION_TIMEOUT)
        .await
        .map_err(|e| PlaceFailure::NotAgreed(format!("{e:#}")))?;
    let decision = c
        .verify_vm(&certificate)
        .map_err(|e| PlaceFailure::NotAgreed(format!("the certificate does not verify: {e}")))?;
    if decision.vm != id || decision.host != Some(node) {
        return Err(PlaceFailure::NotAgreed(
            "the certificate is for another decision".into(),
        ));
    }
    info!(vm = %id, host = %node.short(), ms = started.elapsed().as_millis() as u64, cert_bytes = certificate.len(), "placement agreed by the committee");
    Ok(Some(Agreed {
        decision,
        certificate,
        commit_ms: started.elapsed().as_secs_f64() * 1e3,
    }))
}

/// Hands a certified VM record to state sync (written into the cluster document at once).
pub fn record(shared: &Shared, a: Agreed) {
    record_in(shared.statesync(), a);
}

/// What the host does once it created an agreed VM: commits `running` and writes that record
/// (one certified record per VM in the document's history instead of two); if `running`
/// does not commit, the placement's own record is written instead.
pub fn created(shared: &Shared, a: Agreed) {
    let Some(c) = shared.consensus().cloned() else {
        record(shared, a);
        return;
    };
    let sync = shared.statesync().cloned();
    let op = VmDecisionOp::next(&a.decision, VmState::Running);
    tokio::spawn(async move {
        let running = match c.decide(op.encode(), DECISION_TIMEOUT).await {
            Ok(certificate) => c
                .verify_vm(&certificate)
                .map(|decision| Agreed {
                    decision,
                    certificate,
                    commit_ms: 0.0,
                })
                .map_err(|e| anyhow::anyhow!(e)),
            Err(e) => Err(e),
        };
        match running {
            Ok(r) => record_in(sync.as_ref(), r),
            Err(e) => {
                warn!(vm = %op.vm, error = %format!("{e:#}"), "`running` not agreed; recording the placement");
                record_in(sync.as_ref(), a);
            }
        }
    });
}

fn record_in(sync: Option<&crate::statesync::StateSync>, a: Agreed) {
    let Some(sync) = sync else {
        return;
    };
    let vm = a.decision.vm;
    if !sync.offer(crate::statesync::Input::Vm(Certified {
        decision: a.decision,
        certificate: a.certificate,
    })) {
        warn!(%vm, "state-sync queue full: vm record not written");
    }
}

/// Decides a later state of an agreed VM (`running` once its host created it, `stopped`,
/// `failed`) in the background and records it; failures are logged (a VM left `placed` is
/// failed by the committee after `PLACED_TTL_MS`; a `stopped` that did not commit leaves the
/// record `running` until a later decision).
pub fn spawn_next(shared: &Shared, prev: &VmDecision, state: VmState) {
    if prev.host.is_none() {
        return;
    }
    let Some(c) = shared.consensus().cloned() else {
        return;
    };
    let sync = shared.statesync().cloned();
    let op = VmDecisionOp::next(prev, state);
    tokio::spawn(async move {
        match c.decide(op.encode(), DECISION_TIMEOUT).await {
            Ok(certificate) => match c.verify_vm(&certificate) {
                Ok(decision) => record_in(
                    sync.as_ref(),
                    Agreed {
                        decision,
                        certificate,
                        commit_ms: 0.0,
                    },
                ),
                Err(e) => warn!(vm = %op.vm, error = %e, "vm decision certificate does not verify"),
            },
            Err(e) => {
                warn!(vm = %op.vm, state = %op.state, error = %format!("{e:#}"), "vm decision not agreed")
            }
        }
    });
}

/// What a host checks before it creates a VM another node placed on it: with consensus on,
/// a certificate of a committed `placed` decision naming this node as host and the request's
/// spec; its VM id is the id to use, and the host writes the record once the VM exists.
/// Without consensus: nothing to check.
pub fn check_decision(
    shared: &Shared,
    vm: &VmCreateRequest,
    certificate: Option<&[u8]>,
) -> Result<Option<Agreed>, String> {
    let Some(c) = shared.consensus() else {
        return Ok(None);
    };
    let Some(cert) = certificate else {
        return Err(
            "this cluster places VMs by consensus: the create carries no placement decision".into(),
        );
    };
    let d = c
        .verify_vm(cert)
        .map_err(|e| format!("the placement decision does not verify: {e}"))?;
    if d.host != Some(shared.node_id()) {
        return Err("the placement decision names another host".into());
    }
    if d.state != VmState::Placed {
        return Err(format!(
            "the decision is `{}`, not a placement",
            d.state.as_str()
        ));
    }
    let want = decision_op(vm, d.vm, shared.node_id(), VmState::Placed);
    if (d.spec.vcpus, d.spec.memory_mib, d.spec.disk_gib)
        != (want.vcpus, want.memory_mib, want.disk_gib)
    {
        return Err("the VM differs from the one the placement decision names".into());
    }
    Ok(Some(Agreed {
        decision: d,
        certificate: cert.to_vec(),
        commit_ms: 0.0,
    }))
}

#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("{message}")]
    Refused {
        code: ControlErrorCode,
        message: String,
    },
    #[error("{0}")]
    Unreachable(String),
}

async fn forward(
    shared: &Shared,
    node: NodeId,
    vm: &VmCreateRequest,
    agreed: Option<&Agreed>,
) -> Result<VmView, ForwardError> {
    let peer = node
        .to_peer_id()
        .map_err(|e| ForwardError::Unreachable(format!("bad node id: {e}")))?;
    let req = ControlRequest::CreateVm {
        cluster_id: shared.cluster_id().to_owned(),
        vm: vm.clone(),
        decision: agreed.map(|a| a.certificate.clone()),
    };
    let bytes = shared
        .client()
        .request(peer, dwcp_net::Service::Control, req.encode())
        .await
        .map_err(|e| {
            ForwardError::Unreachable(format!(
                "could not be asked ({e}); if it timed out, the VM may still have been created \
                 there: check its `vm list`"
            ))
        })?;
    match ControlResponse::decode(&bytes) {
        Ok(ControlResponse::VmCreated(v)) if v.node == node => Ok(v),
        Ok(ControlResponse::VmCreated(v)) => Err(ForwardError::Unreachable(format!(
            "answered for another node ({})",
            v.node.short()
        ))),
        Ok(ControlResponse::Refused { code, message }) => {
            Err(ForwardError::Refused { code, message })
        }
        Ok(ControlResponse::AmstAccepted { .. } | ControlResponse::AmstStatus(_)) => Err(
            ForwardError::Unreachable("answered a VM create with an AMST answer".into()),
        ),
        Err(e) => Err(ForwardError::Unreachable(format!("sent a bad answer: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dwcp_protocol::NodeKey;

    fn node(b: u8, vcpus: u32, mem: u64, alloc: Option<(u32, u64, u32)>) -> NodeSnapshot {
        NodeSnapshot {
            id: NodeKey::from_secret_bytes([b; 32]).node_id(),
            is_self: b == 1,
            announced: true,
            region: "r".into(),
            resources: Resources {
                vcpus: vcpus * 2,
                memory_mib: mem * 2,
                disk_gib: 100,
                gpus: vec![],
            },
            donated: DonatedShare {
                vcpus,
                memory_mib: mem,
                disk_gib: 50,
                uplink_mbps: 0,
            },
            status: Some(HealthStatus::Healthy),
            allocated: alloc.map(|(vcpus, memory_mib, vms)| Allocation {
                vcpus,
                memory_mib,
                disk_mib: 0,
                vms,
            }),
            heartbeat_seq: 5,
            link_quality: 1.0,
            rtt_ms: 0,
        }
    }

    const LIMITS: Limits = Limits {
        max_vms_per_node: 2,
        min_free_memory_permille: 100,
    };

    #[test]
    fn hosts_are_free_shares_and_prefilters_say_why() {
        let nodes = vec![
            node(1, 4, 1000, Some((1, 400, 1))),
            node(2, 4, 1000, None),
            node(3, 4, 1000, Some((0, 0, 2))),
            NodeSnapshot {
                announced: false,
                ..node(4, 4, 1000, Some((0, 0, 0)))
            },
            NodeSnapshot {
                status: Some(HealthStatus::Draining),
                ..node(5, 8, 8000, Some((0, 0, 0)))
            },
        ];
        let pending = vec![Pending {
            node: nodes[0].id,
            demand: Allocation {
                vcpus: 1,
                memory_mib: 100,
                disk_mib: 0,
                vms: 1,
            },
            after_seq: 5,
            expires: Instant::now() + PENDING_TTL,
        }];
        let mut next = 0;
        let b = build_hosts(&nodes, &pending, LIMITS, &BTreeSet::new(), |_| {
            next += 1;
            HostId(next)
        });
        // Node 1: 4 vCPU - 1 - 1 pending; 900 MiB placeable - 400 - 100 pending. It holds 2
        // VMs with the pending one: at the limit.
        let kinds: Vec<&str> = b.prefiltered.iter().map(|(_, (k, _))| *k).collect();
        assert_eq!(
            kinds,
            ["max-vms", "no-hypervisor", "max-vms", "no-announcement"]
        );
        assert_eq!(b.hosts.len(), 1);
        assert_eq!(b.hosts[0].health, HostHealth::Unhealthy);
        let b = build_hosts(&nodes[..1], &[], LIMITS, &BTreeSet::new(), |_| HostId(7));
        // Capacity is the placeable share (4 vCPU, 900 MiB); the held 1 vCPU / 400 MiB is load.
        assert_eq!(b.hosts[0].capacity.cpu_milli, 4000);
        assert_eq!(b.hosts[0].capacity.mem_mib, 900);
        assert_eq!(b.used[&HostId(7)].cpu_milli, 1000);
        assert_eq!(b.used[&HostId(7)].mem_mib, 400);
        assert_eq!(b.hosts[0].id, HostId(7));
        let ex = BTreeSet::from([nodes[0].id]);
        assert!(
            build_hosts(&nodes[..1], &[], LIMITS, &ex, |_| HostId(7))
                .hosts
                .is_empty()
        );
    }

    #[test]
    fn bound_and_usage() {
        let nodes = vec![
            node(1, 4, 1000, Some((2, 0, 1))),
            node(2, 4, 1000, Some((0, 0, 0))),
            node(3, 8, 1000, Some((0, 0, 0))),
        ];
        let demand = Allocation {
            vcpus: 4,
            memory_mib: 10,
            disk_mib: 0,
            vms: 1,
        };
        // 6 vCPUs over shares of 8, 4, 4: 6/8 of the largest; 2 nodes used.
        let (used, lb) = usage_bound(&nodes, &[], LIMITS, nodes[1].id, &demand);
        assert_eq!(used, 2);
        assert!((lb - 0.75).abs() < 1e-9, "{lb}");
        assert_eq!(cover(vec![4, 4], 12), 2.0);
        assert_eq!(cover(vec![4, 8], 10), 1.5);
    }

    #[test]
    fn reasons_tell_too_small_from_full() {
        let n = node(1, 4, 1000, Some((0, 800, 1)));
        let r = FilterReason::TooSmall {
            dim: Dim::Memory,
            need: 512,
            capacity: 100,
        };
        let t = explain_reason(&r, Some(&n), LIMITS);
        assert!(
            t.starts_with("full: needs 512 MiB memory, 100 MiB memory free of 900"),
            "{t}"
        );
        let n0 = node(2, 4, 0, Some((0, 0, 0)));
        let t = explain_reason(&r, Some(&n0), LIMITS);
        assert!(t.contains("too small") && t.contains("donated"), "{t}");
        assert_eq!(
            describe_kind("too-small:memory"),
            "whose whole donated memory is too small"
        );
        assert_eq!(describe_kind("full:cpu"), "without enough free cpu");
    }

    #[test]
    fn requests_are_checked_before_placement() {
        let vm = VmCreateRequest {
            name: "a".into(),
            vcpus: 0,
            memory_mib: 1,
            image: None,
            disk_mib: Some(1500),
            kernel: None,
            initrd: None,
            cmdline: None,
        };
        assert!(matches!(
            check_request(&vm),
            Err(PlaceFailure::BadRequest(_))
        ));
        let ok = VmCreateRequest { vcpus: 1, ..vm };
        assert!(check_request(&ok).is_ok());
        assert_eq!(to_demand(&demand_of(&ok)).disk_gib, 2);
        let long = VmCreateRequest {
            kernel: Some("/".repeat(5000)),
            ..ok
        };
        assert!(matches!(
            check_request(&long),
            Err(PlaceFailure::BadRequest(_))
        ));
    }

    #[test]
    fn avoid_and_solver_settings_are_validated() {
        let p = Placement::new(&PlacementSection::default());
        let s = p
            .set_solver(&SetSolverRequest {
                max_time_ms: Some(5000),
                target_optimality: Some(0.9),
            })
            .unwrap();
        assert_eq!(s.max_time_ms, Some(5000));
        assert_eq!(s.target_optimality, 0.9);
        assert!(
            p.set_solver(&SetSolverRequest {
                max_time_ms: None,
                target_optimality: Some(1.5),
            })
            .unwrap_err()
            .contains("target optimality")
        );
        assert!(
            p.set_solver(&SetSolverRequest {
                max_time_ms: Some(0),
                target_optimality: None,
            })
            .is_err()
        );
        // The rejected changes left the settings alone.
        assert_eq!(p.stats().settings.target_optimality, 0.9);
        let c = builtin_constraints(p.limits());
        assert!(c.iter().any(|c| c.description.contains("at most 100 VMs")));
    }

    /// The engine driven as the service drives it: the node without room is filtered with
    /// its reason, soft avoidance gives way only when nothing else fits, hard does not.
    #[test]
    fn engine_decisions_follow_avoidance_modes() {
        let p = Placement::new(&PlacementSection::default());
        let nodes = vec![
            node(1, 4, 0, Some((0, 0, 0))),
            node(2, 4, 2000, Some((0, 0, 0))),
        ];
        let demand = Allocation {
            vcpus: 1,
            memory_mib: 256,
            disk_mib: 0,
            vms: 1,
        };
        let metrics = crate::metrics::Metrics::new().unwrap();
        let decide = |p: &Placement| p.decide(&metrics, &nodes, &demand, &BTreeSet::new());
        let c = decide(&p).unwrap();
        assert_eq!(c.node, nodes[1].id);
        assert_eq!(c.filtered.get("too-small:memory"), Some(&1));
        assert!(c.examples[0].reason.contains("too small"));
        p.avoid(
            &metrics,
            nodes[1].id,
            Duration::from_secs(60),
            AvoidMode::Soft,
        )
        .unwrap();
        let c = decide(&p).unwrap();
        assert_eq!(c.node, nodes[1].id);
        assert!(c.soft_relaxed);
        p.avoid(
            &metrics,
            nodes[1].id,
            Duration::from_secs(60),
            AvoidMode::Hard,
        )
        .unwrap();
        let e = decide(&p).unwrap_err();
        // "1m", or "59s" when the machine is slow between the avoid and the decision.
        assert!(e.contains("avoided (hard) for another "), "{e}");
        assert!(e.contains("too small: needs 256 MiB memory"), "{e}");
        let st = p.stats();
        assert_eq!((st.decisions, st.rejections), (2, 1));
        assert!(st.last.unwrap().elapsed_ms > 0.0);
        assert!(
            p.avoid(&metrics, nodes[1].id, Duration::ZERO, AvoidMode::Hard)
                .is_err()
        );
    }
}
