//! Deterministic discrete-event simulator running the node's sans-IO cores.
//!
//! One run ([`run`]) builds `n` nodes, each with the real [`dwcp_consensus::Engine`] and
//! [`dwcp_reputation::Engine`], on a virtual millisecond clock, and drives them with events
//! from one ordered queue. Every random choice (keys, committee order, which nodes are
//! Byzantine, latencies, jitter, loss, partitions, crashes, request contents) comes from one
//! ChaCha RNG seeded by the run's seed, so a seed reproduces a run exactly; the run's trace
//! hash (every event and every decision fed into SHA-256) proves it ([`self_check`]).
//!
//! Messages cross the simulated network as the bytes of real [`SignedEnvelope`]s and are
//! decoded and signature-checked on arrival with `decode_verified`, exactly as a node does;
//! a forged or corrupted message is dropped there and never reaches an engine. (A message is
//! decoded and checked once, not once per receiver: every receiver would compute the same
//! result from the same bytes. Inside the engines, `dwcp-protocol`'s signature memo answers a
//! signature another simulated node already verified; it remembers only checks that
//! succeeded, and it changes no result.)
//!
//! # Phases
//!
//! 1. Fault phase: network chaos derived from the seed (loss, jitter, partitions, crashes and
//!    restarts with state kept) while the Byzantine nodes follow their [`Strategy`].
//! 2. Liveness phase: the network heals; Byzantine nodes keep misbehaving. Clients stop a
//!    drain period before the end; the run is live when every honest client's requests have
//!    committed and every honest node executed the same prefix.
//!
//! Safety invariants (`invariants/`, one file each) are checked after every event: agreement,
//! validity, view monotonicity, and quarantine of provable offenders (equivocation and
//! contradicting votes within `K` views; no honest node ever quarantined).
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod invariants;
mod link;
mod state_transfer;
mod strategy;

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    rc::Rc,
};

use dwcp_consensus::{
    Command, Committee, ConsensusMsg, Digest, Engine, Input, Offence, Request,
    committee::{self, Candidate, Eligibility, EpochRules, Membership, MembershipOp},
    transfer::{self, EpochLink},
};
use dwcp_protocol::{MessageKind, NodeId, NodeKey, SignedEnvelope, Timestamp, Verified};
use dwcp_reputation::{self as reputation, Evidence};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest as _, Sha256};

pub use link::LinkModel;
pub use strategy::Strategy;

use invariants::{
    Violation, agreement::Agreement, committees::Committees, quarantine::Quarantine,
    reputation_agreement::ReputationAgreement, validity::Validity, view_monotonic::ViewMonotonic,
};

/// The digest of a node's replicated state (committed reputation table and membership).
fn app_state_of(rep: &reputation::Engine, membership: &Membership) -> Digest {
    let table = invariants::reputation_agreement::table_digest(
        rep.scores(),
        rep.quarantined().iter().copied(),
    );
    let mut bytes = Vec::new();
    if ciborium::into_writer(membership, &mut bytes).is_err() {
        bytes.clear();
    }
    Digest::of("dwcp/sim/app-state", &[&table.0, &bytes])
}

/// How long after the faults stop the late joiner starts, ms.
const LATE_JOIN_AFTER_MS: u64 = 120_000;

/// Most ended epochs whose engines a node keeps (as the node does).
pub const MAX_OLD_EPOCHS: usize = 8;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Committee size `n`.
    pub nodes: usize,
    /// How many of them are Byzantine (at most `f` for the guarantees to hold).
    pub byzantine: usize,
    /// What the Byzantine nodes do.
    pub strategy: Strategy,
    /// The seed.
    pub seed: u64,
    /// Network chaos in the fault phase (loss, partitions, crashes).
    pub network_faults: bool,
    /// Length of the fault phase, virtual ms.
    pub fault_phase_ms: u64,
    /// Length of the liveness phase, virtual ms.
    pub liveness_phase_ms: u64,
    /// Clients stop this long before the end so everything can drain.
    pub drain_ms: u64,
    /// Link latencies.
    pub link: LinkModel,
    /// Engine parameters.
    pub consensus: dwcp_consensus::Config,
    /// Outstanding requests per honest client (closed loop).
    pub client_window: usize,
    /// A client resends a request not committed after this long.
    pub client_retry_ms: u64,
    /// Views within which an offender must be quarantined.
    pub quarantine_k_views: u64,
    /// Decisions per committee epoch (0: one epoch). At each epoch's last decision every node
    /// computes the next committee (the same nodes, ordered by a seed from the log digest, so
    /// primaries rotate) and continues the log with a new engine (`Engine::resume`); ended
    /// engines serve catch-up. A multiple of the checkpoint interval.
    pub epoch_length: u64,
    /// Nodes beyond the committee (`nodes`): observers that submit requests and execute
    /// decisions; with epochs, each committee is chosen from all `nodes + observers`, so
    /// members hand over to nodes that were observers. Byzantine nodes are drawn from all
    /// of them (at most `byzantine` in any committee).
    pub observers: usize,
    /// With epochs and observers: the last honest observer is not started until 120 s after
    /// the faults stop, and is not in the genesis membership. It joins then, many epochs
    /// behind, and catches up by state transfer (a certified snapshot from the node that sent
    /// it later-epoch traffic; Byzantine senders lie and are refused) or by replaying.
    pub late_joiner: bool,
}

impl Scenario {
    /// A chaos scenario: regional latencies, network faults for 60 s, then 10 minutes to
    /// recover; clients keep submitting for the first 60 s after the faults stop.
    pub fn chaos(nodes: usize, byzantine: usize, strategy: Strategy, seed: u64) -> Self {
        Self {
            nodes,
            byzantine,
            strategy,
            seed,
            network_faults: true,
            fault_phase_ms: 60_000,
            liveness_phase_ms: 600_000,
            drain_ms: 540_000,
            link: LinkModel::Regions,
            consensus: dwcp_consensus::Config {
                app_digests: true,
                ..dwcp_consensus::Config::default()
            },
            client_window: 1,
            client_retry_ms: 5_000,
            quarantine_k_views: 4,
            epoch_length: 0,
            observers: 0,
            late_joiner: false,
        }
    }

    /// A measurement scenario: uniform one-way latency, no faults, no Byzantine nodes.
    pub fn measure(
        nodes: usize,
        one_way_ms: u64,
        seed: u64,
        duration_ms: u64,
        client_window: usize,
    ) -> Self {
        Self {
            nodes,
            byzantine: 0,
            strategy: Strategy::Silence,
            seed,
            network_faults: false,
            fault_phase_ms: 0,
            liveness_phase_ms: duration_ms,
            drain_ms: duration_ms / 5,
            link: LinkModel::Uniform { one_way_ms },
            consensus: dwcp_consensus::Config {
                app_digests: true,
                ..dwcp_consensus::Config::default()
            },
            client_window,
            client_retry_ms: 5_000,
            quarantine_k_views: 4,
            epoch_length: 0,
            observers: 0,
            late_joiner: false,
        }
    }
}

/// The outcome of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Seed.
    pub seed: u64,
    /// `n`.
    pub nodes: usize,
    /// Byzantine nodes.
    pub byzantine: usize,
    /// Strategy name.
    pub strategy: &'static str,
    /// Safety violations (empty when safe).
    pub violations: Vec<String>,
    /// Whether liveness was restored after faults stopped.
    pub live: bool,
    /// Why not, if not.
    pub liveness_detail: String,
    /// Highest sequence number committed by an honest node.
    pub committed_seqs: u64,
    /// Honest client requests committed.
    pub requests_committed: u64,
    /// Client latency (submit to commit at the client), ms, one sample per request.
    pub client_latency_ms: Vec<u64>,
    /// Consensus latency (primary's proposal to commit at each honest replica), ms.
    pub consensus_latency_ms: Vec<u64>,
    /// Virtual time simulated, ms.
    pub virtual_ms: u64,
    /// Messages delivered.
    pub messages: u64,
    /// Messages rejected at decoding (forged or corrupted).
    pub rejected_messages: u64,
    /// Highest view reached (views of ended epochs counted, an epoch change as one).
    pub max_view: u64,
    /// Highest committee epoch a node reached.
    pub max_epoch: u64,
    /// Epochs whose committee has other members than the epoch before (not just another
    /// order): hand-overs to nodes that were observers.
    pub membership_changes: usize,
    /// Membership operations (joins, readiness, leaves) committed; honest nodes churn with
    /// epochs and observers.
    pub membership_ops: u64,
    /// Epochs whose committee left out a quarantined member of the one before.
    pub quarantine_exclusions: u64,
    /// Epoch links (the certified checkpoint ending an epoch, naming the next committee and
    /// the state it starts from) that honest nodes checked as a joiner would: all verified,
    /// or the run records an `epoch_links` violation.
    pub epoch_links_verified: u64,
    /// Certified snapshots honest nodes installed (state transfer from a peer, when two or
    /// more epochs behind).
    pub transfers_installed: u64,
    /// Snapshots refused: every one a Byzantine peer served (it changes the membership).
    pub transfers_refused: u64,
    /// Byzantine nodes that committed a provable offence.
    pub offenders: usize,
    /// Byzantine nodes quarantined by every honest node.
    pub quarantined_byzantine: usize,
    /// Byzantine nodes penalised (by committed evidence) at every honest node.
    pub penalised_byzantine: usize,
    /// Reputation tables compared between honest nodes after the same sequence number (all
    /// equal, or a `reputation_agreement` violation is reported).
    pub reputation_tables_compared: u64,
    /// SHA-256 over the whole trace.
    pub trace_hash: String,
}

impl Report {
    /// Whether the run is safe and live.
    pub fn passed(&self) -> bool {
        self.violations.is_empty() && self.live
    }
}

/// One message on the simulated wire, shared (`Rc`) by every delivery of it.
///
/// Its SHA-256 (for the trace) and its decoded, signature-checked form are computed once per
/// message, not once per receiver: every receiver would get the same answer from the same
/// bytes (decoding and verifying are pure functions of them), so this changes no result.
#[derive(Debug)]
struct Wire {
    bytes: Vec<u8>,
    digest: [u8; 32],
    decoded: std::cell::OnceCell<Option<Decoded>>,
}

impl Wire {
    fn new(bytes: Vec<u8>) -> Rc<Self> {
        Rc::new(Self {
            digest: Sha256::digest(&bytes).into(),
            bytes,
            decoded: std::cell::OnceCell::new(),
        })
    }
}

type Bytes = Rc<Wire>;

/// Most message bytes whose decoded form the content cache keeps (`Sim::decode`).
const CONTENT_CACHE_BYTES: usize = 64 << 20;

#[derive(Debug, Clone)]
enum Event {
    Deliver {
        from: usize,
        to: usize,
        msg: Bytes,
    },
    Timer {
        node: usize,
    },
    Submit {
        node: usize,
    },
    Retry {
        node: usize,
        nonce: u64,
    },
    Claim {
        node: usize,
    },
    Crash {
        node: usize,
    },
    Restart {
        node: usize,
    },
    Partition {
        group: Vec<usize>,
    },
    Heal,
    FaultsEnd,
    /// An honest node commits a change of its own membership.
    Churn {
        node: usize,
        change: Churn,
    },
    /// `from`'s reply to `to`'s state-transfer request arrives.
    Transfer {
        from: usize,
        to: usize,
    },
    /// The late joiner starts and commits its join.
    LateJoin {
        node: usize,
    },
}

/// A membership change an honest node makes during the fault phase (with epochs and
/// observers): it leaves and later joins again, or declares itself not ready and later ready.
/// It keeps running in between (an observer), so the committee it may still sit in keeps its
/// vote until the next epoch excludes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Churn {
    /// `MembershipOp::Leave`.
    Leave,
    /// `MembershipOp::Join` then `Ready(true)`.
    Rejoin,
    /// `MembershipOp::Ready(false)`.
    Unready,
    /// `MembershipOp::Ready(true)`.
    Ready,
}

impl Churn {
    fn code(self) -> u8 {
        match self {
            Self::Leave => 0,
            Self::Rejoin => 1,
            Self::Unready => 2,
            Self::Ready => 3,
        }
    }
}

#[derive(Debug, Clone)]
enum Decoded {
    Consensus(Verified<ConsensusMsg>),
    Request(Verified<Request>),
}

struct Node {
    key: NodeKey,
    engine: Engine,
    /// Engines of ended epochs, newest first (at most [`MAX_OLD_EPOCHS`]): they serve
    /// catch-up to nodes still in those epochs.
    old: Vec<Engine>,
    /// Views this node went through in ended epochs (an epoch change counts as one), so the
    /// view invariants see one increasing count across epochs.
    view_offset: u64,
    /// When this node last asked to catch up because of traffic of an epoch it has not
    /// reached (virtual ms).
    nudged_at: Option<u64>,
    rep: reputation::Engine,
    /// Committed joins, readiness and leaves (every node applies them, as a node does).
    membership: Membership,
    /// The link ending this node's last epoch, waiting for its checkpoint to become stable
    /// (its proof), with the committee that signs it.
    pending_link: Option<(EpochLink, Committee)>,
    /// Completed links by the epoch they end (what this node serves with its snapshot).
    links: BTreeMap<u64, EpochLink>,
    /// Its last epoch start (served to nodes asking for state transfer).
    snapshot: Option<state_transfer::Snapshot>,
    /// When it last asked for a snapshot (virtual ms).
    transfer_asked_at: Option<u64>,
    /// The peer whose last snapshot was refused or missing (not asked again next).
    transfer_refused_by: Option<usize>,
    /// Peers seen two or more epochs ahead (asked in turn).
    transfer_peers: BTreeSet<usize>,
    byz: bool,
    crashed: bool,
    timer_at: Option<u64>,
    next_nonce: u64,
    /// nonce -> (submit time, envelope)
    outstanding: BTreeMap<u64, (u64, SignedEnvelope)>,
    evidence_sent: BTreeSet<Vec<u8>>,
    evidence_nonce: u64,
    /// Evidence requests not yet committed: nonce -> offender (one per offender at a time).
    evidence_inflight: BTreeMap<u64, NodeId>,
    region: usize,
    stash: Vec<Bytes>,
}

/// The simulator state for one run.
struct Sim {
    s: Scenario,
    rng: ChaCha8Rng,
    now: u64,
    queue: BTreeMap<(u64, u64), Event>,
    order: u64,
    nodes: Vec<Node>,
    ids: BTreeMap<NodeId, usize>,
    committee: Committee,
    /// The committee of each epoch, as the first honest node to reach it computed it.
    committees: Committees,
    loss: f64,
    partition: Option<BTreeSet<usize>>,
    faults_over: bool,
    clients_stop_at: u64,
    end_at: u64,
    trace: Sha256,
    /// Decoded messages by the SHA-256 of their bytes, oldest first in `content_order`, at
    /// most `CONTENT_CACHE_BYTES` of accepted messages (`content_bytes`; a refused one
    /// counts 64 bytes).
    content: BTreeMap<[u8; 32], Option<Decoded>>,
    content_order: VecDeque<([u8; 32], usize)>,
    content_bytes: usize,
    agreement: Agreement,
    validity: Validity,
    views: ViewMonotonic,
    quarantine: Quarantine,
    reputation: ReputationAgreement,
    violations: Vec<Violation>,
    proposal_time: BTreeMap<u64, u64>,
    client_latency: Vec<u64>,
    consensus_latency: Vec<u64>,
    requests_committed: u64,
    messages: u64,
    rejected: u64,
    byz_nonce: u64,
    fault_end_submitted: BTreeSet<(usize, u64)>,
    penalised: BTreeSet<(usize, usize)>,
    /// Membership operations committed (counted once, at the first honest node).
    membership_ops: u64,
    /// Epochs whose committee left out a member of the previous one because it was
    /// quarantined.
    quarantine_exclusions: u64,
    epoch_links_verified: u64,
    transfers_installed: u64,
    transfers_refused: u64,
    /// The node that joins late (`Scenario::late_joiner`), until it has started.
    late: Option<usize>,
}

/// A scenario that cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The committee cannot be formed (e.g. no nodes).
    #[error("committee: {0}")]
    Committee(#[from] dwcp_consensus::committee::CommitteeError),
    /// The engine configuration is invalid.
    #[error("consensus config: {0}")]
    Config(#[from] dwcp_consensus::ConfigError),
    /// The two runs of a self-check differ.
    #[error("nondeterminism: trace {0} then {1}")]
    Nondeterministic(String, String),
}

/// Runs one scenario to completion.
pub fn run(s: &Scenario) -> Result<Report, SimError> {
    let mut sim = Sim::new(s.clone())?;
    sim.run();
    Ok(sim.report())
}

/// Runs `s` twice and compares the trace hashes; returns the hash.
pub fn self_check(s: &Scenario) -> Result<String, SimError> {
    let a = run(s)?.trace_hash;
    let b = run(s)?.trace_hash;
    if a == b {
        Ok(a)
    } else {
        Err(SimError::Nondeterministic(a, b))
    }
}

fn derive_key(seed: u64, i: usize) -> NodeKey {
    let mut h = Sha256::new();
    h.update(b"dwcp-sim/key");
    h.update(seed.to_be_bytes());
    h.update((i as u64).to_be_bytes());
    NodeKey::from_secret_bytes(h.finalize().into())
}

impl Sim {
    fn new(s: Scenario) -> Result<Self, SimError> {
        let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
        // Committee size n; every node beyond it starts as an observer. With epochs, each
        // epoch's committee is chosen from all of them.
        let committee_size = s.nodes;
        let n = s.nodes + s.observers;
        let keys: Vec<NodeKey> = (0..n).map(|i| derive_key(s.seed, i)).collect();
        let candidates: Vec<Candidate> = keys
            .iter()
            .map(|k| Candidate {
                node: k.node_id(),
                ready: true,
                quarantined: false,
                reputation: 1.0,
                uptime_s: 3_600,
            })
            .collect();
        let seed_digest =
            committee::epoch_seed(&Digest::of("dwcp-sim/genesis", &[&s.seed.to_be_bytes()]), 0);
        let committee = committee::select(
            0,
            &candidates,
            &seed_digest,
            committee_size,
            &Eligibility::default(),
        )
        .or_else(|_| {
            Committee::new(
                0,
                keys.iter()
                    .take(committee_size)
                    .map(NodeKey::node_id)
                    .collect(),
            )
        });
        let committee = committee?;
        let mut byz_idx: BTreeSet<usize> = BTreeSet::new();
        while byz_idx.len() < s.byzantine.min(n) {
            byz_idx.insert(rng.random_range(0..n));
        }
        let cfg = s.consensus.clone().validate()?;
        // The late joiner: the last honest node outside the genesis committee (it must not be
        // needed by a committee before it starts).
        let late = (s.late_joiner && s.epoch_length > 0 && s.observers > 0)
            .then(|| {
                (0..n)
                    .rev()
                    .find(|i| !byz_idx.contains(i) && !committee.contains(&keys[*i].node_id()))
            })
            .flatten();
        // Genesis membership: every node joined and ready at time 0 (but the late joiner).
        let mut membership = Membership::default();
        for (i, k) in keys.iter().enumerate() {
            if Some(i) != late {
                membership.apply(Timestamp(0), &MembershipOp::Ready(k.node_id(), true));
            }
        }
        let mut nodes: Vec<Node> = Vec::with_capacity(n);
        for (i, k) in keys.iter().enumerate() {
            let mut engine = Engine::new(cfg.clone(), k.clone(), committee.clone())?;
            if s.epoch_length > 0 {
                engine.set_end(s.epoch_length)?;
            }
            nodes.push(Node {
                key: k.clone(),
                engine,
                old: Vec::new(),
                view_offset: 0,
                nudged_at: None,
                rep: reputation::Engine::new(reputation::Config::default()),
                membership: membership.clone(),
                pending_link: None,
                links: BTreeMap::new(),
                snapshot: None,
                transfer_asked_at: None,
                transfer_refused_by: None,
                transfer_peers: BTreeSet::new(),
                byz: byz_idx.contains(&i),
                // The late joiner is "down" (not started) until it joins.
                crashed: Some(i) == late,
                timer_at: None,
                next_nonce: 1,
                outstanding: BTreeMap::new(),
                evidence_sent: BTreeSet::new(),
                evidence_nonce: 1 << 62,
                evidence_inflight: BTreeMap::new(),
                region: rng.random_range(0..link::REGIONS),
                stash: Vec::new(),
            });
        }
        let ids = nodes
            .iter()
            .enumerate()
            .map(|(i, nd)| (nd.key.node_id(), i))
            .collect();
        let honest: Vec<bool> = nodes.iter().map(|nd| !nd.byz).collect();
        let end_at = s.fault_phase_ms + s.liveness_phase_ms;
        let clients_stop_at = end_at.saturating_sub(s.drain_ms);
        let k = s.quarantine_k_views;
        let mut sim = Self {
            rng,
            now: 0,
            queue: BTreeMap::new(),
            order: 0,
            views: ViewMonotonic::new(n),
            quarantine: Quarantine::new(honest, k),
            reputation: ReputationAgreement::default(),
            nodes,
            ids,
            committees: Committees::new(committee.clone()),
            committee,
            loss: 0.0,
            partition: None,
            faults_over: s.fault_phase_ms == 0,
            clients_stop_at,
            end_at,
            trace: Sha256::new(),
            content: BTreeMap::new(),
            content_order: VecDeque::new(),
            content_bytes: 0,
            agreement: Agreement::default(),
            validity: Validity::default(),
            violations: Vec::new(),
            proposal_time: BTreeMap::new(),
            client_latency: Vec::new(),
            consensus_latency: Vec::new(),
            requests_committed: 0,
            messages: 0,
            rejected: 0,
            byz_nonce: 1 << 61,
            fault_end_submitted: BTreeSet::new(),
            penalised: BTreeSet::new(),
            membership_ops: 0,
            quarantine_exclusions: 0,
            epoch_links_verified: 0,
            transfers_installed: 0,
            transfers_refused: 0,
            late,
            s,
        };
        sim.schedule_start();
        Ok(sim)
    }

    fn push(&mut self, at: u64, ev: Event) {
        self.order += 1;
        self.queue.insert((at, self.order), ev);
    }

    fn schedule_start(&mut self) {
        let n = self.nodes.len();
        for i in 0..n {
            self.push(0, Event::Timer { node: i });
            if !self.nodes[i].byz {
                for _ in 0..self.s.client_window {
                    let at = self.rng.random_range(0..100);
                    self.push(at, Event::Submit { node: i });
                }
            } else if self.s.strategy == Strategy::LieCapacity {
                self.push(1_000, Event::Claim { node: i });
            }
        }
        if self.s.fault_phase_ms > 0 {
            self.push(self.s.fault_phase_ms, Event::FaultsEnd);
        }
        if let Some(node) = self.late {
            let at = self.s.fault_phase_ms + LATE_JOIN_AFTER_MS;
            self.push(at, Event::LateJoin { node });
        }
        if self.s.network_faults && self.s.fault_phase_ms > 0 {
            self.loss = self.rng.random_range(0.0..0.03);
            let fp = self.s.fault_phase_ms;
            for _ in 0..self.rng.random_range(0..3u32) {
                let at = self.rng.random_range(0..fp);
                let size = self.rng.random_range(1..=(n / 2).max(1));
                let mut group = BTreeSet::new();
                while group.len() < size {
                    group.insert(self.rng.random_range(0..n));
                }
                let dur = self.rng.random_range(2_000..20_000);
                self.push(
                    at,
                    Event::Partition {
                        group: group.into_iter().collect(),
                    },
                );
                self.push((at + dur).min(fp), Event::Heal);
            }
            for _ in 0..self.rng.random_range(0..3u32) {
                let node = self.rng.random_range(0..n);
                if self.nodes[node].byz {
                    continue;
                }
                let at = self.rng.random_range(0..fp);
                let dur = self.rng.random_range(1_000..20_000);
                self.push(at, Event::Crash { node });
                self.push((at + dur).min(fp), Event::Restart { node });
            }
            self.schedule_churn();
        }
    }

    /// With epochs and observers: up to `observers - byzantine` honest nodes change their
    /// membership once each during the fault phase (leave and rejoin, or not ready and ready
    /// again). At most that many are out at once, so at least `nodes` (the committee size)
    /// stay eligible even with every Byzantine node quarantined: committees keep their size
    /// and the fault bound `f` (checked at every epoch, `committee_fault_bound`).
    fn schedule_churn(&mut self) {
        if self.s.epoch_length == 0 || self.s.observers == 0 {
            return;
        }
        let budget = self.s.observers.saturating_sub(self.s.byzantine);
        let fp = self.s.fault_phase_ms;
        let honest: Vec<usize> = (0..self.nodes.len())
            .filter(|i| !self.nodes[*i].byz)
            .collect();
        if honest.is_empty() || fp < 2 {
            return;
        }
        let mut chosen = BTreeSet::new();
        for _ in 0..budget {
            if self.rng.random_range(0..4u32) == 0 {
                continue;
            }
            chosen.insert(honest[self.rng.random_range(0..honest.len())]);
        }
        for node in chosen {
            let at = self.rng.random_range(0..fp / 2);
            let back = (at + self.rng.random_range(5_000..30_000)).min(fp - 1);
            let (out, back_in) = if self.rng.random_range(0..2u32) == 0 {
                (Churn::Leave, Churn::Rejoin)
            } else {
                (Churn::Unready, Churn::Ready)
            };
            self.push(at, Event::Churn { node, change: out });
            self.push(
                back,
                Event::Churn {
                    node,
                    change: back_in,
                },
            );
        }
    }

    fn churn(&mut self, node: usize, change: Churn) {
        if self.nodes[node].crashed {
            return;
        }
        let me = self.nodes[node].key.node_id();
        let ops = match change {
            Churn::Leave => vec![MembershipOp::Leave(me)],
            Churn::Rejoin => vec![MembershipOp::Join(me), MembershipOp::Ready(me, true)],
            Churn::Unready => vec![MembershipOp::Ready(me, false)],
            Churn::Ready => vec![MembershipOp::Ready(me, true)],
        };
        for op in ops {
            self.submit_op(node, op.encode());
        }
    }

    fn run(&mut self) {
        while let Some(((at, _), ev)) = self.queue.pop_first() {
            if at > self.end_at {
                break;
            }
            self.now = at;
            self.trace_event(&ev);
            self.step(ev);
        }
        self.now = self.end_at;
    }

    fn trace_event(&mut self, ev: &Event) {
        self.trace.update(self.now.to_be_bytes());
        match ev {
            Event::Deliver { from, to, msg } => {
                self.trace.update([0]);
                self.trace.update((*from as u64).to_be_bytes());
                self.trace.update((*to as u64).to_be_bytes());
                self.trace.update(msg.digest);
            }
            Event::Timer { node }
            | Event::Submit { node }
            | Event::Claim { node }
            | Event::Crash { node }
            | Event::Restart { node } => {
                self.trace.update([1]);
                self.trace.update((*node as u64).to_be_bytes());
            }
            Event::Retry { node, nonce } => {
                self.trace.update([2]);
                self.trace.update((*node as u64).to_be_bytes());
                self.trace.update(nonce.to_be_bytes());
            }
            Event::Partition { group } => {
                self.trace.update([3]);
                for g in group {
                    self.trace.update((*g as u64).to_be_bytes());
                }
            }
            Event::Heal | Event::FaultsEnd => self.trace.update([4]),
            Event::LateJoin { node } => {
                self.trace.update([7]);
                self.trace.update((*node as u64).to_be_bytes());
            }
            Event::Transfer { from, to } => {
                self.trace.update([6]);
                self.trace.update((*from as u64).to_be_bytes());
                self.trace.update((*to as u64).to_be_bytes());
            }
            Event::Churn { node, change } => {
                self.trace.update([5, change.code()]);
                self.trace.update((*node as u64).to_be_bytes());
            }
        }
    }

    fn violation(&mut self, v: Violation) {
        if self.violations.len() < 16 {
            self.violations.push(v);
        }
    }

    fn step(&mut self, ev: Event) {
        match ev {
            Event::Deliver { from, to, msg } => self.deliver(from, to, msg),
            Event::Timer { node } => {
                let nd = &mut self.nodes[node];
                if nd.crashed || nd.timer_at.is_some_and(|t| t != self.now) {
                    return;
                }
                nd.timer_at = None;
                let now = Timestamp(self.now);
                for e in std::iter::once(&mut nd.engine).chain(nd.old.iter_mut()) {
                    if e.poll_timeout().is_some_and(|t| t <= now) {
                        e.handle_timeout(now);
                    }
                }
                if nd.byz && self.s.strategy == Strategy::VoteAgainst {
                    self.byz_spurious_view_change(node);
                }
                self.drain(node);
            }
            Event::Submit { node } => self.submit(node),
            Event::Retry { node, nonce } => {
                let Some((_, env)) = self.nodes[node].outstanding.get(&nonce).cloned() else {
                    return;
                };
                if !self.nodes[node].crashed {
                    self.broadcast_raw(node, &env, 0);
                }
                let at = self.now + self.s.client_retry_ms;
                self.push(at, Event::Retry { node, nonce });
            }
            Event::Claim { node } => self.byz_claim(node),
            Event::Crash { node } => self.nodes[node].crashed = true,
            Event::Restart { node } => {
                self.nodes[node].crashed = false;
                self.nodes[node].timer_at = None;
                self.push(self.now, Event::Timer { node });
            }
            Event::Partition { group } => self.partition = Some(group.into_iter().collect()),
            Event::Heal => self.partition = None,
            Event::Churn { node, change } => self.churn(node, change),
            Event::Transfer { from, to } => self.transfer(from, to),
            Event::LateJoin { node } => {
                self.late = None;
                self.nodes[node].crashed = false;
                self.nodes[node].timer_at = None;
                self.push(self.now, Event::Timer { node });
                self.churn(node, Churn::Rejoin);
            }
            Event::FaultsEnd => {
                self.faults_over = true;
                self.loss = 0.0;
                self.partition = None;
                for i in 0..self.nodes.len() {
                    if self.nodes[i].crashed && self.late != Some(i) {
                        self.nodes[i].crashed = false;
                        self.nodes[i].timer_at = None;
                        self.push(self.now, Event::Timer { node: i });
                    }
                    if !self.nodes[i].byz {
                        let outstanding: Vec<u64> =
                            self.nodes[i].outstanding.keys().copied().collect();
                        for nonce in outstanding {
                            self.fault_end_submitted.insert((i, nonce));
                        }
                    }
                }
            }
        }
    }

    fn encode(&mut self, env: &SignedEnvelope) -> Bytes {
        Wire::new(env.encode())
    }

    fn send_bytes(&mut self, from: usize, to: usize, msg: Bytes, extra_delay: u64) {
        if from == to || self.nodes[from].crashed {
            return;
        }
        if let Some(p) = &self.partition
            && p.contains(&from) != p.contains(&to)
        {
            return;
        }
        if self.loss > 0.0 && self.rng.random_bool(self.loss) {
            return;
        }
        let delay = self.s.link.delay(
            &mut self.rng,
            self.nodes[from].region,
            self.nodes[to].region,
        );
        let at = self.now + delay + extra_delay;
        self.push(at, Event::Deliver { from, to, msg });
    }

    fn broadcast_raw(&mut self, from: usize, env: &SignedEnvelope, extra_delay: u64) {
        let msg = self.encode(env);
        for to in 0..self.nodes.len() {
            self.send_bytes(from, to, msg.clone(), extra_delay);
        }
    }

    /// The message decoded and checked: once per message, and once per distinct bytes while
    /// they stay in the content cache (a retransmission or a repeated forgery is new bytes
    /// equal to old ones).
    fn decode(&mut self, msg: &Wire) -> Option<Decoded> {
        if let Some(d) = msg.decoded.get() {
            return d.clone();
        }
        let d = match self.content.get(&msg.digest) {
            Some(d) => d.clone(),
            None => {
                let d = decode_checked(&msg.bytes);
                // A refused message is remembered as its digest alone.
                let kept = if d.is_some() { msg.bytes.len() } else { 64 };
                self.content.insert(msg.digest, d.clone());
                self.content_order.push_back((msg.digest, kept));
                self.content_bytes += kept;
                while self.content_bytes > CONTENT_CACHE_BYTES {
                    let Some((old, len)) = self.content_order.pop_front() else {
                        break;
                    };
                    self.content.remove(&old);
                    self.content_bytes -= len;
                }
                d
            }
        };
        let _ = msg.decoded.set(d.clone());
        d
    }

    fn deliver(&mut self, _from: usize, to: usize, msg: Bytes) {
        if self.nodes[to].crashed {
            return;
        }
        self.messages += 1;
        let Some(decoded) = self.decode(&msg) else {
            // Forged or corrupted: dropped before any core sees it; the peer manager of a real
            // node would penalise the transport peer `from` locally.
            self.rejected += 1;
            return;
        };
        if self.nodes[to].byz
            && self.s.strategy == Strategy::Replay
            && self.nodes[to].stash.len() < 256
        {
            self.nodes[to].stash.push(msg.clone());
        }
        let now = Timestamp(self.now);
        match decoded {
            Decoded::Request(r) => self.nodes[to].engine.handle(now, Input::Request(r)),
            Decoded::Consensus(m) => {
                let nd = &mut self.nodes[to];
                // The engine of the message's epoch, as the node routes.
                let target = if nd.engine.covers(m.message()) {
                    Some(&mut nd.engine)
                } else {
                    nd.old.iter_mut().find(|e| e.covers(m.message()))
                };
                match target {
                    Some(e) => e.handle(now, Input::Message(m)),
                    None => {
                        // An epoch this node has not reached: it is behind.
                        if nd.nudged_at.is_none_or(|t| self.now >= t + 1_000) {
                            nd.nudged_at = Some(self.now);
                            nd.engine.catch_up();
                        }
                        let epoch = transfer::message_epoch(m.message(), self.s.epoch_length);
                        if let (Some(epoch), Some(&from)) = (epoch, self.ids.get(&m.signer())) {
                            self.maybe_ask_transfer(to, from, epoch);
                        }
                    }
                }
            }
        }
        self.drain(to);
    }

    fn submit(&mut self, node: usize) {
        if self.now >= self.clients_stop_at
            || self.nodes[node].crashed && (!self.faults_over || self.late == Some(node))
        {
            if self.now < self.clients_stop_at {
                let at = self.now + 1_000;
                self.push(at, Event::Submit { node });
            }
            return;
        }
        let nonce = self.nodes[node].next_nonce;
        self.nodes[node].next_nonce += 1;
        let op: Vec<u8> = (0..16).map(|_| self.rng.random::<u8>()).collect();
        let Ok(req) = Verified::sign(&self.nodes[node].key, Request { nonce, op }) else {
            return;
        };
        self.validity.submitted(req.signer(), nonce);
        let env = req.envelope().clone();
        self.nodes[node]
            .outstanding
            .insert(nonce, (self.now, env.clone()));
        if self.faults_over {
            self.fault_end_submitted.insert((node, nonce));
        }
        self.nodes[node]
            .engine
            .handle(Timestamp(self.now), Input::Request(req));
        self.broadcast_raw(node, &env, 0);
        self.drain(node);
        let at = self.now + self.s.client_retry_ms;
        self.push(at, Event::Retry { node, nonce });
    }

    fn submit_op(&mut self, node: usize, op: Vec<u8>) -> u64 {
        let nonce = self.nodes[node].evidence_nonce;
        self.nodes[node].evidence_nonce += 1;
        let Ok(req) = Verified::sign(&self.nodes[node].key, Request { nonce, op }) else {
            return nonce;
        };
        self.validity.submitted(req.signer(), nonce);
        let env = req.envelope().clone();
        self.nodes[node]
            .engine
            .handle(Timestamp(self.now), Input::Request(req));
        self.broadcast_raw(node, &env, 0);
        nonce
    }

    fn next_command(&mut self, i: usize) -> Option<Command> {
        let nd = &mut self.nodes[i];
        if let Some(c) = nd.engine.poll_command() {
            return Some(c);
        }
        nd.old.iter_mut().find_map(Engine::poll_command)
    }

    /// Every node's view count ([`Sim::view_rank`]).
    pub(crate) fn view_ranks(&self) -> Vec<u64> {
        (0..self.nodes.len()).map(|j| self.view_rank(j)).collect()
    }

    /// Views node `i` went through, counting an epoch change as one.
    fn view_rank(&self, i: usize) -> u64 {
        self.nodes[i].view_offset + self.nodes[i].engine.view_in_epoch()
    }

    /// The digest of node `i`'s replicated state (committed reputation table and
    /// membership) that its checkpoints sign ([`dwcp_consensus::Config::app_digests`]).
    fn app_state(&self, i: usize) -> Digest {
        app_state_of(&self.nodes[i].rep, &self.nodes[i].membership)
    }

    /// Node `i` executed its epoch's last decision `d`: the next committee, by the node's
    /// own rule (`committee::next_committee`: eligible members of the committed membership,
    /// not quarantined and at or above the reputation threshold in its committed reputation
    /// table, ordered by a seed from the log digest). Checks it for honest nodes.
    fn next_committee(&mut self, i: usize, d: &dwcp_consensus::Decision) -> Committee {
        let len = self.s.epoch_length;
        let rules = EpochRules {
            epoch_length: len,
            size: self.s.nodes,
            eligibility: Eligibility {
                min_uptime_s: 0,
                max_ready_age_s: 0,
                ..Eligibility::default()
            },
        };
        let nd = &self.nodes[i];
        let current = nd.engine.committee().clone();
        let rep = &nd.rep;
        let next = committee::next_committee(
            &current,
            d.seq,
            &d.state,
            d.time,
            &nd.membership,
            &|id: &NodeId| (rep.score(id), rep.is_quarantined(id)),
            &rules,
        );
        if !nd.byz {
            let byz: BTreeSet<NodeId> = self
                .nodes
                .iter()
                .filter(|n| n.byz)
                .map(|n| n.key.node_id())
                .collect();
            match self.committees.check(
                self.now,
                i,
                &current,
                &next,
                &|id: &NodeId| rep.is_quarantined(id),
                &|id: &NodeId| byz.contains(id),
            ) {
                Ok(true) => self.quarantine_exclusions += 1,
                Ok(false) => {}
                Err(v) => self.violation(v),
            }
        }
        next
    }

    /// Node `i` continues the log with `next`'s engine after its epoch's last decision `d`;
    /// the ended engine stays to serve catch-up.
    fn next_epoch(&mut self, i: usize, d: &dwcp_consensus::Decision, next: Committee) {
        let len = self.s.epoch_length;
        let epoch = d.seq / len;
        let nd = &mut self.nodes[i];
        let Some(mut handover) = nd.engine.handover() else {
            return;
        };
        nd.snapshot = Some(state_transfer::Snapshot {
            committee: next.clone(),
            end: d.seq + len,
            handover: handover.clone(),
            rep: nd.rep.clone(),
            membership: nd.membership.clone(),
        });
        handover.pending = nd.engine.take_pending();
        let cfg = self.s.consensus.clone();
        let Ok(mut engine) = Engine::resume(cfg, nd.key.clone(), next, handover) else {
            return;
        };
        if engine.set_end(d.seq + len).is_err() {
            return;
        }
        engine.handle_timeout(Timestamp(self.now));
        let ended = std::mem::replace(&mut nd.engine, engine);
        nd.view_offset += ended.view_in_epoch() + 1;
        nd.old.insert(0, ended);
        nd.old.truncate(MAX_OLD_EPOCHS);
        self.trace.update(b"epoch");
        self.trace.update((i as u64).to_be_bytes());
        self.trace.update(epoch.to_be_bytes());
    }

    /// Node `i` applied decision `d`: at an epoch's end it computes the next committee; at a
    /// checkpoint it gives the engine its state digest (naming the next committee at an
    /// epoch's end, and keeping the link to check once the checkpoint is stable); then it
    /// switches epochs.
    fn after_decision(&mut self, i: usize, d: &dwcp_consensus::Decision) {
        let boundary = self.s.epoch_length > 0 && self.nodes[i].engine.end() == Some(d.seq);
        let next = boundary.then(|| self.next_committee(i, d));
        if self.nodes[i].engine.awaiting_app_state() == Some(d.seq) {
            let state = self.app_state(i);
            let nd = &mut self.nodes[i];
            nd.engine
                .on_app_state(d.seq, transfer::app_digest(&state, next.as_ref()));
            if let Some(next) = &next {
                let link = EpochLink {
                    seq: d.seq,
                    log: d.state,
                    clients: nd.engine.clients_digest(),
                    app_state: state,
                    next: next.clone(),
                    proof: Vec::new(),
                };
                nd.pending_link = Some((link, nd.engine.committee().clone()));
            }
        }
        if let Some(next) = next {
            self.next_epoch(i, d, next);
        }
    }

    /// A checkpoint of node `i` became stable at `seq`: if it ends the epoch of its pending
    /// link, the link gets the checkpoint's proof and is checked as a joiner would.
    fn on_stable(&mut self, i: usize, seq: u64) {
        let nd = &mut self.nodes[i];
        if nd.pending_link.as_ref().is_none_or(|(l, _)| l.seq != seq) {
            return;
        }
        let Some(proof) = nd
            .old
            .iter()
            .find_map(|e| e.stable_proof_at(seq))
            .map(<[_]>::to_vec)
        else {
            return;
        };
        let Some((mut link, ending)) = nd.pending_link.take() else {
            return;
        };
        link.proof = proof;
        if self.nodes[i].byz {
            // Byzantine nodes serve their links too (and lie about the snapshot).
            self.nodes[i].links.insert(ending.epoch(), link);
            return;
        }
        let expected = self.committees.get(link.next.epoch());
        match invariants::epoch_links::check(
            self.now,
            i,
            &link,
            &ending,
            self.s.epoch_length,
            expected,
        ) {
            Ok(()) => {
                self.epoch_links_verified += 1;
                self.nodes[i].links.insert(ending.epoch(), link);
            }
            Err(v) => self.violation(v),
        }
    }

    fn drain(&mut self, i: usize) {
        let mut guard = 0;
        while let Some(c) = self.next_command(i) {
            guard += 1;
            if guard > 1_000_000 {
                break;
            }
            match c {
                Command::Broadcast(env) => {
                    self.note_proposal(i, &env);
                    if self.nodes[i].byz {
                        self.byz_send(i, env, None);
                    } else {
                        self.broadcast_raw(i, &env, 0);
                    }
                }
                Command::Send { to, envelope } => {
                    let Some(&j) = self.ids.get(&to) else {
                        continue;
                    };
                    if self.nodes[i].byz {
                        self.byz_send(i, envelope, Some(j));
                    } else {
                        let msg = self.encode(&envelope);
                        self.send_bytes(i, j, msg, 0);
                    }
                }
                Command::Deliver(d) => {
                    // Byzantine nodes run the same node software: they apply committed
                    // state (reputation, membership) and so compute the same committees;
                    // no invariant is checked for them.
                    self.on_decision(i, &d);
                    self.after_decision(i, &d);
                }
                Command::ReportPeer { peer, offence } => {
                    if !self.nodes[i].byz {
                        self.on_report(i, peer, offence);
                    }
                }
                Command::StableCheckpoint { seq, .. } => self.on_stable(i, seq),
                Command::ViewChangeStarted { .. } | Command::NewViewInstalled { .. } => {}
            }
        }
        let view = self.view_rank(i);
        if let Err(v) = self.views.check(self.now, i, view) {
            self.violation(v);
        }
        let nd = &self.nodes[i];
        let t = std::iter::once(&nd.engine)
            .chain(nd.old.iter())
            .filter_map(Engine::poll_timeout)
            .min()
            .map(|t| t.0.max(self.now));
        if t.is_some() && t != self.nodes[i].timer_at {
            self.nodes[i].timer_at = t;
            if let Some(t) = t {
                self.push(t, Event::Timer { node: i });
            }
        }
    }

    fn note_proposal(&mut self, i: usize, env: &SignedEnvelope) {
        // Only a primary proposes; skip checking everyone else's broadcasts.
        let e = &self.nodes[i].engine;
        if self.nodes[i].byz || e.primary() != e.id() {
            return;
        }
        let Ok(v) = env.clone().verify::<ConsensusMsg>() else {
            return;
        };
        if let ConsensusMsg::Proposal { header, .. } = v.message()
            && let Some(pp) =
                header
                    .clone()
                    .verify::<ConsensusMsg>()
                    .ok()
                    .and_then(|h| match h.message() {
                        ConsensusMsg::PrePrepare(pp) => Some(*pp),
                        _ => None,
                    })
        {
            self.proposal_time.entry(pp.slot.seq).or_insert(self.now);
        }
    }

    fn on_decision(&mut self, i: usize, d: &dwcp_consensus::Decision) {
        let honest = !self.nodes[i].byz;
        let epoch = dwcp_consensus::epoch_of_view(d.view);
        // The committee of the epoch the decision committed in, as this node has it.
        let nd = &self.nodes[i];
        let committee = std::iter::once(&nd.engine)
            .chain(nd.old.iter())
            .map(Engine::committee)
            .find(|c| c.epoch() == epoch)
            .or_else(|| self.committees.get(epoch))
            .unwrap_or(&self.committee)
            .clone();
        let mut first = false;
        if honest {
            self.trace.update(b"decision");
            self.trace.update((i as u64).to_be_bytes());
            self.trace.update(d.seq.to_be_bytes());
            self.trace.update(d.digest.0);
            first = self.agreement.highest() < d.seq;
            if let Err(v) = self.agreement.check(self.now, i, d.seq, d.digest) {
                self.violation(v);
            }
            if let Err(v) = self.validity.check(self.now, i, d, &committee, first) {
                self.violation(v);
            }
            if let Some(t0) = self.proposal_time.get(&d.seq) {
                self.consensus_latency.push(self.now - t0);
            }
        }
        let nd = &mut self.nodes[i];
        // Reputation and membership change only from committed operations, in commit order:
        // evidence, participation records (rewards) and membership operations. The node's
        // own certificate is not used: its voter set differs from replica to replica.
        let mut refused: Vec<&'static [u8]> = Vec::new();
        let mut membership_ops = 0;
        for r in &d.requests {
            if r.op.first() == Some(&reputation::EVIDENCE_OP_TAG)
                && let Ok(ev) = Evidence::decode(&r.op)
            {
                // Evidence that does not verify changes nothing (the reputation engine checks
                // it again); a Byzantine submitter gains nothing by committing garbage.
                if nd.rep.on_evidence(d.time, &committee, &ev).is_err() {
                    refused.push(b"evidence-refused");
                }
            } else if r.op.first() == Some(&reputation::PARTICIPATION_OP_TAG)
                && let Ok(p) = reputation::Participation::decode(&r.op)
                && nd
                    .rep
                    .on_participation(d.time, &committee, &p, d.seq)
                    .is_err()
            {
                refused.push(b"participation-refused");
            } else if r.op.first() == Some(&committee::MEMBERSHIP_OP_TAG) {
                match nd.membership.apply_op(d.time, &r.signer(), &r.op) {
                    Ok(_) => membership_ops += 1,
                    Err(_) => refused.push(b"membership-refused"),
                }
            }
        }
        nd.rep.on_time(d.time);
        if !honest {
            // A Byzantine node's table is its own business: drain its outputs unchecked.
            while nd.rep.poll_output().is_some() {}
            return;
        }
        for r in refused {
            self.trace.update(r);
        }
        if first {
            self.membership_ops += membership_ops;
        }
        let rep = &self.nodes[i].rep;
        let table = invariants::reputation_agreement::table_digest(
            rep.scores(),
            rep.quarantined().iter().copied(),
        );
        if let Err(v) = self.reputation.check(self.now, i, d.seq, table) {
            self.violation(v);
        }
        // Node policy: the member whose turn it is records this slot's certificate.
        let me = self.nodes[i].key.node_id();
        if let Some(turn) = reputation::participation_turn(d.seq, committee.n())
            && committee.index_of(&me).map(usize::from) == Some(turn)
        {
            let op = reputation::Participation {
                proof: d.certificate.proof(),
            }
            .encode();
            self.submit_op(i, op);
        }
        let view = self.view_rank(i);
        while let Some(out) = self.nodes[i].rep.poll_output() {
            match out {
                reputation::Output::Quarantined { node, .. } => {
                    if let Some(&j) = self.ids.get(&node)
                        && let Err(v) = self.quarantine.quarantined(self.now, i, j, view)
                    {
                        self.violation(v);
                    }
                }
                reputation::Output::Penalised { node, .. } => {
                    if let Some(&j) = self.ids.get(&node) {
                        self.penalised.insert((i, j));
                    }
                }
                reputation::Output::Released { .. } => {}
            }
        }
        for r in &d.requests {
            if r.signer() == me {
                self.nodes[i].evidence_inflight.remove(&r.nonce);
            }
            if r.signer() == me
                && let Some((t0, _)) = self.nodes[i].outstanding.remove(&r.nonce)
            {
                self.client_latency.push(self.now - t0);
                self.requests_committed += 1;
                self.fault_end_submitted.remove(&(i, r.nonce));
                self.push(self.now, Event::Submit { node: i });
            }
        }
    }

    fn on_report(&mut self, i: usize, peer: NodeId, offence: Offence) {
        // Node policy: evidence against a node this node already quarantined adds nothing.
        // One evidence request per offender in flight: the offender's next offence is reported
        // once this one committed (bounds the load a flood of bad votes can cause).
        if self.nodes[i].rep.is_quarantined(&peer)
            || self.nodes[i].evidence_inflight.values().any(|p| *p == peer)
        {
            return;
        }
        let ev = match offence {
            Offence::Equivocation { first, second } => Evidence::Equivocation { first, second },
            Offence::ContradictsCertificate { vote, proof } => Evidence::ContradictsCertificate {
                vote,
                proof: *proof,
            },
            Offence::Invalid(_) => return,
        };
        let op = ev.encode();
        if self.nodes[i].evidence_sent.insert(op.clone()) {
            let nonce = self.submit_op(i, op);
            self.nodes[i].evidence_inflight.insert(nonce, peer);
        }
    }

    fn report(mut self) -> Report {
        let mut live = true;
        let mut detail = String::new();
        let honest: Vec<usize> = (0..self.nodes.len())
            .filter(|i| !self.nodes[*i].byz)
            .collect();
        if let Some((node, nonce)) = self.fault_end_submitted.iter().next() {
            live = false;
            detail = format!(
                "request {nonce} of honest client {node} never committed after faults stopped"
            );
        }
        let execs: BTreeSet<u64> = honest
            .iter()
            .map(|i| self.nodes[*i].engine.last_executed())
            .collect();
        if live && execs.len() > 1 {
            live = false;
            detail = format!("honest nodes stopped at different sequence numbers: {execs:?}");
        }
        if live && let Err(v) = self.quarantine.check_end(self.now) {
            self.violation(v);
        }
        let quarantined_byzantine = (0..self.nodes.len())
            .filter(|b| self.nodes[*b].byz)
            .filter(|b| {
                let id = self.nodes[*b].key.node_id();
                honest
                    .iter()
                    .all(|h| self.nodes[*h].rep.is_quarantined(&id))
            })
            .count();
        let penalised_byzantine = (0..self.nodes.len())
            .filter(|b| self.nodes[*b].byz)
            .filter(|b| honest.iter().all(|h| self.penalised.contains(&(*h, *b))))
            .count();
        let hash = self.trace.clone().finalize();
        Report {
            seed: self.s.seed,
            nodes: self.s.nodes,
            byzantine: self.s.byzantine,
            strategy: self.s.strategy.name(),
            violations: self
                .violations
                .iter()
                .map(|v| format!("{} at {} ms: {}", v.invariant, v.at_ms, v.detail))
                .collect(),
            live,
            liveness_detail: detail,
            committed_seqs: self.agreement.highest(),
            requests_committed: self.requests_committed,
            client_latency_ms: self.client_latency,
            consensus_latency_ms: self.consensus_latency,
            virtual_ms: self.now,
            messages: self.messages,
            rejected_messages: self.rejected,
            max_view: self.views.max(),
            max_epoch: self
                .nodes
                .iter()
                .map(|nd| nd.engine.committee().epoch())
                .max()
                .unwrap_or(0),
            membership_changes: {
                let sets: Vec<BTreeSet<NodeId>> = self
                    .committees
                    .all()
                    .map(|c| c.members().iter().copied().collect())
                    .collect();
                sets.windows(2).filter(|w| w[0] != w[1]).count()
            },
            membership_ops: self.membership_ops,
            quarantine_exclusions: self.quarantine_exclusions,
            epoch_links_verified: self.epoch_links_verified,
            transfers_installed: self.transfers_installed,
            transfers_refused: self.transfers_refused,
            offenders: self.quarantine.offenders(),
            quarantined_byzantine,
            penalised_byzantine,
            reputation_tables_compared: self.reputation.compared(),
            trace_hash: hash.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

/// Decodes and signature-checks bytes from the simulated wire, as a node does on receipt.
fn decode_checked(bytes: &[u8]) -> Option<Decoded> {
    // The kind is the envelope's first field: `{"k": code, ...}`.
    match kind_of(bytes) {
        Some(k) if k == MessageKind::Consensus.code() => {
            SignedEnvelope::decode_verified::<ConsensusMsg>(bytes)
                .ok()
                .map(Decoded::Consensus)
        }
        Some(k) if k == MessageKind::ConsensusRequest.code() => {
            SignedEnvelope::decode_verified::<Request>(bytes)
                .ok()
                .map(Decoded::Request)
        }
        _ => None,
    }
}

/// The kind code of an encoded envelope (CBOR map whose first entry is `"k": code`).
fn kind_of(bytes: &[u8]) -> Option<u16> {
    // map header, text "k" (0x61 0x6b), then an unsigned integer < 24 (one byte).
    match bytes {
        [0xa4, 0x61, b'k', code, ..] if *code < 24 => Some(u16::from(*code)),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
