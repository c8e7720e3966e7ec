//! The node's driver of ACP: the PBFT engine (`dwcp-consensus`) and the reputation state
//! machine (`dwcp-reputation`) on the real mesh, their metrics, and the local API of
//! `dwcp-cli consensus ...` and `dwcp-cli reputation ...`.
//!
//! ```text
//!  gossip dwcp/3/<cluster>/consensus ─┐                      ┌─> Broadcast: publish on the topic
//!  /dwcp/consensus/3.0.0 (one-way) ───┼─> decode_verified ──>│   Send: request to one member
//!  API: reputation quarantine ────────┘   Engine (pure) ─────┼─> Deliver: apply ops in order
//!                                                            │     evidence -> reputation (pure)
//!                                                            │     quarantine votes -> quorum rule
//!                                                            └─> ReportPeer: evidence request
//! ```
//!
//! **Committee.** The genesis committee comes from configuration (`acp.committee`, node ids,
//! size 3f+1), like a chain's genesis file: every node must be given the same list; the testnet
//! writes it. A node outside the committee runs the engine as an observer: it never votes,
//! fetches the members' commit certificates (served at most every 200 ms per observer) and
//! executes them, so it applies the same committed operations and computes the same
//! reputation; it submits its requests to every member directly and learns their fate from
//! the members' replies ([`ConsensusReply`]) or from its own execution, whichever comes
//! first.
//!
//! **Epochs** (`acp.epochs`). Every node commits its own [`MembershipOp`]s ([`MEMBERSHIP_OP_TAG`]):
//! a join at start and its readiness (`acp.epochs.serve`), renewed every third of
//! `ready_ttl`. Epoch `e` ends at sequence number `(e + 1) * length`; the engine orders
//! nothing above it. Once this node executes it, it computes the next committee from the
//! committed membership, reputation, log digest and batch time
//! (`dwcp_consensus::committee::next_committee`), the same on every honest node, and starts
//! that epoch's engine where the ended one stopped ([`Engine::resume`]); views of epoch `e`
//! start at `e * 2^32`. The ended engine stays (up to [`MAX_OLD_EPOCHS`]) to serve catch-up
//! to nodes still in that epoch; incoming messages go to the engine whose epoch covers them
//! ([`Engine::covers`]), and traffic of a later epoch makes a node that is behind ask for
//! decisions. The new committee goes into the shared [`CommitteeVerifier`], so certificates
//! of the new epoch verify in the cluster document.
//!
//! **Operations** (the first byte of a request's `op`):
//! * [`dwcp_reputation::EVIDENCE_OP_TAG`]: evidence of an offence the engine reported
//!   (equivocation, a vote against a certificate), or of a capacity claim contradicted by
//!   measurement (a node's signed announcement and f+1 members' signed measurements of what
//!   AMST transfers from it achieved, [`report_measurement`]), checked again by every replica
//!   when applied;
//! * [`QUARANTINE_VOTE_TAG`]: an operator's signed request to quarantine a node
//!   (`dwcp-cli reputation quarantine`). One node cannot quarantine another on its own: a node is
//!   quarantined when votes from f+1 distinct nodes are committed (so at least one honest node
//!   asked), or when its reputation falls below the threshold from committed evidence.
//!
//! Requests are applied with the batch time the primary assigned, the same on every replica,
//! so every honest node computes the same scores.
//!
//! * [`crate::cert::QUARANTINE_DECISION_TAG`]: a quarantine decision with its grounds (f+1
//!   signed member votes, or equivocation evidence), submitted by the first f+1 members once
//!   their state quarantined a node. The first valid one per node is applied; its
//!   certificate ([`crate::cert`]) goes to the statesync driver, which writes
//!   `quarantine/<node>` into the cluster document (the submitter at once, the others after
//!   [`FALLBACK_WRITE_AFTER`] if no record arrived).
//!
//! Only committee members' votes count (f bounds faulty members, not keys).
//!
//! * [`crate::cert::VM_DECISION_TAG`]: a VM decision (placement, later states), submitted by
//!   any ready node through [`Consensus::decide`] and applied under [`AcpState`]'s lifecycle
//!   rules. The submitter gets the commit certificate: a member from its own engine, a node
//!   outside the committee as PBFT's reply to the client (section 4.1), a signed
//!   [`ConsensusReply`] from each of the first f+1 members; the certificate proves itself,
//!   a refusal is believed from f+1 members. Placement (`crate::placement`) hands it to the
//!   host, which checks it before creating the VM, writes `vms/<id>` and commits `running`.
//!   A placement not `running` after [`PLACED_TTL_MS`] of decision time is failed by the
//!   first f+1 members ([`AcpState::overdue`]), whose decision goes into the document.
//!
//! * [`crate::cert::CUT_DECISION_TAG`]: a compaction cut of the cluster document with f+1
//!   member endorsements ([`crate::compaction`]); the first valid cut per document epoch is
//!   applied and handed to the statesync driver.
//!
//! **Restarts.** With epochs on, every epoch start writes a [`ResumePoint`] to sled (the
//! epoch's committee and end, the engine hand-over, the replicated state), and a restarted
//! node starts that epoch's engine from it and catches up by `Fetch` from there
//! (`quorum-status` shows "resumed from seq S"). Without epochs, or without a point, a
//! restarted replica starts a fresh engine (view 0, sequence 0) and catches up by `Fetch`
//! from genesis; every vote it sends is first made durable in its vote log
//! ([`crate::votelog`]), and a message whose vote conflicts with one cast before the restart
//! is held back, so it never equivocates (test
//! `a_restarted_primary_never_equivocates_and_decisions_go_on`).
//!
//! * [`PARTICIPATION_OP_TAG`]: a participation record, the commit certificate of a slot on
//!   the reward grid (every [`dwcp_reputation::PARTICIPATION_EVERY`]th), submitted by the member whose turn it
//!   is ([`dwcp_reputation::participation_turn`]); each of its 2f+1 voters earns +0.01, once
//!   per slot, on every node alike. Records off the grid or older than the reward window
//!   are refused (the reputation engine's rules).
//!
//! **State transfer** ([`crate::transfer`], with epochs): checkpoints sign the replicated
//! state ([`AcpState::digest`]) and, at an epoch's end, the next committee; each node keeps
//! the certified link ending every epoch (sled tree `consensus_links`). A node that sees
//! traffic two or more epochs ahead, or whose peers no longer hold the decisions it needs
//! next, asks a peer for its last epoch-start snapshot, checks the chain of links from the
//! committee it trusts, installs it and fetches only the decisions after it.
//!
//! **Not done yet:** certified records for quarantines from lesser offences and for
//! releases; without epochs (`acp.epochs.length: 0`) there are no links, so a node behind
//! more than `catch_up_mib` of certificates still cannot catch up. The committees a node
//! computed are kept in sled (tree `consensus_committees`) so certificates of later epochs
//! verify meanwhile.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use axum::{
    Json, Router,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use dwcp_consensus::{
    Command, Committee, ConsensusMsg, Engine, Input, Offence, Request,
    committee::{CommitteeError, EpochRules, Membership, MembershipOp},
};
use dwcp_net::{Client, GossipMessage, PeerId, Service, Validation};
use dwcp_protocol::{
    Message, MessageKind, NodeId, NodeKey, SignedEnvelope, Timestamp, ValidationError, Verified,
    VmId,
};
use dwcp_reputation::{EVIDENCE_OP_TAG, Evidence, PARTICIPATION_OP_TAG, Participation};
use dwcp_statesync::{
    CertError, CertificateVerifier, VmDecision, VmState, cert::MAX_CERTIFICATE_BYTES,
};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::{
    cert::{
        CUT_DECISION_TAG, CommitteeVerifier, CutDecisionOp, Grounds, QUARANTINE_DECISION_TAG,
        QuarantineDecisionOp, VM_DECISION_TAG, VmDecisionOp, compact_certificate_for,
    },
    config::AcpSection,
    daemon::Shared,
};

/// First byte of a probe: an operation that changes nothing, committed to measure latency
/// (`dwcp-cli consensus probe`).
pub const PROBE_TAG: u8 = 0xA0;
/// First byte of an operator's quarantine vote operation.
pub const QUARANTINE_VOTE_TAG: u8 = 0xA1;
/// Longest reason text in a quarantine vote.
pub const MAX_REASON_LEN: usize = 256;
const MAX_IN_FLIGHT: usize = 64;
/// Most overdue placements a member has `failed` decisions in flight for.
const MAX_EXPIRING: usize = 64;
/// Decisions remembered for `consensus analyze` / `reputation analyze`.
const MAX_HISTORY: usize = 256;

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An operator's vote to quarantine a node, carried as a request operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineVote {
    /// The node to quarantine.
    pub node: NodeId,
    /// Why (free text, at most [`MAX_REASON_LEN`] bytes).
    pub reason: String,
}

impl QuarantineVote {
    /// `QUARANTINE_VOTE_TAG || CBOR`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![QUARANTINE_VOTE_TAG];
        if ciborium::into_writer(self, &mut out).is_err() {
            out.truncate(1);
        }
        out
    }

    /// Decodes and checks the reason's length.
    pub fn decode(op: &[u8]) -> Result<Self, &'static str> {
        let Some((&QUARANTINE_VOTE_TAG, mut body)) = op.split_first() else {
            return Err("not a quarantine vote");
        };
        if body.len() > MAX_REASON_LEN + 128 {
            return Err("quarantine vote too large");
        }
        let v: Self = ciborium::from_reader(&mut body).map_err(|_| "malformed quarantine vote")?;
        if !body.is_empty() {
            return Err("trailing bytes after a quarantine vote");
        }
        if v.reason.len() > MAX_REASON_LEN {
            return Err("quarantine reason too long");
        }
        Ok(v)
    }
}

/// A committee member's answer to a node outside the committee that submitted a request
/// (PBFT's reply to its client, section 4.1): the request's commit certificate when the
/// replicated state accepted it, else why not. A certificate proves itself (2f+1 signed
/// commits); a refusal is believed once f+1 distinct members sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsensusReply {
    /// The request's nonce.
    pub nonce: u64,
    /// What became of it.
    pub outcome: ReplyOutcome,
}

/// What became of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplyOutcome {
    /// Applied; the certificate ([`crate::cert`]).
    Certified(#[serde(with = "dwcp_consensus::messages::serde_bytes_vec")] Vec<u8>),
    /// Committed but refused by the replicated state, with the reason.
    Refused(String),
}

impl Message for ConsensusReply {
    const KIND: MessageKind = MessageKind::ConsensusReply;

    fn validate(&self) -> Result<(), ValidationError> {
        let (field, len, max) = match &self.outcome {
            ReplyOutcome::Certified(c) => ("certificate", c.len(), MAX_CERTIFICATE_BYTES),
            ReplyOutcome::Refused(r) => ("reason", r.len(), MAX_REASON_LEN),
        };
        if len > max {
            return Err(ValidationError::TooLong { field, len, max });
        }
        Ok(())
    }
}

/// The replicated state the committed operations build: reputation plus operator votes.
/// Pure: applied in decision order with decision times, it is equal on every honest replica.
/// It serializes, for the node's resume point ([`ResumePoint`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AcpState {
    reputation: dwcp_reputation::Engine,
    /// node -> voters (and their reasons)
    votes: BTreeMap<NodeId, BTreeMap<NodeId, String>>,
    /// Nodes quarantined by f+1 operator votes.
    voted_out: BTreeSet<NodeId>,
    /// Offences applied per node (kind, decision seq).
    offences: BTreeMap<NodeId, Vec<(String, u64)>>,
    /// Nodes with a committed quarantine decision, and the batch it committed in.
    decided: BTreeMap<NodeId, u64>,
    /// VMs with a committed decision that are not finished: their last decision and its
    /// batch time (ms).
    vms: BTreeMap<VmId, (VmDecisionOp, u64)>,
    /// Compaction cuts applied so far (the document epoch the committed log has reached).
    cut_epoch: u64,
    /// Committed joins, readiness and leaves: where the next committees come from.
    membership: Membership,
}

use dwcp_consensus::committee::MEMBERSHIP_OP_TAG;

/// Most unfinished VMs the replicated state tracks; decisions placing more are refused.
pub const MAX_LIVE_VMS: usize = 100_000;
/// A VM still only `placed` this long (decision time) after its placement is overdue: its host
/// commits `running` once the VM exists, so the placing node or the host failed in between.
/// The first f+1 members then submit `failed` for it ([`AcpState::overdue`]).
pub const PLACED_TTL_MS: u64 = 15 * 60 * 1000;

/// What applying one operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Evidence was applied against a node.
    Penalised(NodeId),
    /// A vote was recorded; the node is quarantined when `quarantined`.
    Vote {
        /// The node voted on.
        node: NodeId,
        /// Distinct voters so far.
        votes: usize,
        /// Whether this vote reached f+1.
        quarantined: bool,
    },
    /// The first valid quarantine decision for a node: its certificate goes into the
    /// cluster document.
    Decided(NodeId),
    /// A VM decision was accepted: its certificate goes into the cluster document.
    Vm {
        /// The VM.
        vm: VmId,
        /// Its host after the decision.
        host: Option<NodeId>,
        /// Its state after the decision.
        state: VmState,
    },
    /// The compaction cut of the next document epoch: every node compacts at it.
    Cut(u64),
    /// A node joined, declared itself ready (or not) or left.
    Membership(MembershipOp),
    /// A participation record rewarded the voters of the certified slot (its sequence
    /// number).
    Rewarded(u64),
    /// Nothing (a repeat, or evidence that does not verify).
    Nothing(String),
}

impl AcpState {
    /// Digest of the replicated state (its CBOR encoding; maps in key order, the reputation
    /// engine's output queue left out): what checkpoints certify, and what a transferred
    /// snapshot must hash to. Equal on every honest replica after the same decisions.
    pub fn digest(&self) -> dwcp_consensus::Digest {
        let mut bytes = Vec::new();
        if let Err(e) = ciborium::into_writer(self, &mut bytes) {
            warn!(error = %e, "the replicated state does not encode");
            bytes.clear();
        }
        dwcp_consensus::Digest::of("dwcp/v3/acp-state", &[&bytes])
    }

    /// Fresh state with the manual's reputation rules.
    pub fn new() -> Self {
        Self {
            reputation: dwcp_reputation::Engine::new(dwcp_reputation::Config::default()),
            votes: BTreeMap::new(),
            voted_out: BTreeSet::new(),
            offences: BTreeMap::new(),
            decided: BTreeMap::new(),
            vms: BTreeMap::new(),
            cut_epoch: 0,
            membership: Membership::default(),
        }
    }

    /// The membership registry (committed joins, readiness, leaves).
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Applies one committed operation from `client` at batch time `time`, decision `seq`.
    pub fn apply(
        &mut self,
        time: Timestamp,
        seq: u64,
        committee: &Committee,
        client: NodeId,
        op: &[u8],
    ) -> Applied {
        self.reputation.on_time(time);
        match op.first() {
            Some(&EVIDENCE_OP_TAG) => match Evidence::decode(op) {
                Ok(ev) => match self.reputation.on_evidence(time, committee, &ev) {
                    Ok(Some(who)) => {
                        let kind = match ev {
                            Evidence::Equivocation { .. } => "equivocation",
                            Evidence::ContradictsCertificate { .. } => "contradicts_certificate",
                            Evidence::ClaimContradicted { .. } => "claim_contradicted",
                        };
                        self.offences
                            .entry(who)
                            .or_default()
                            .push((kind.to_owned(), seq));
                        Applied::Penalised(who)
                    }
                    Ok(None) => Applied::Nothing("offence already counted".into()),
                    Err(e) => Applied::Nothing(format!("evidence refused: {e}")),
                },
                Err(e) => Applied::Nothing(format!("evidence refused: {e}")),
            },
            Some(&QUARANTINE_VOTE_TAG) => match QuarantineVote::decode(op) {
                // Only members count: f bounds the faulty members, not the keys anyone can
                // make, and the decision's grounds are checked against the committee.
                Ok(_) if !committee.contains(&client) => {
                    Applied::Nothing("quarantine vote from a non-member".into())
                }
                Ok(v) => {
                    let voters = self.votes.entry(v.node).or_default();
                    voters.entry(client).or_insert(v.reason);
                    let n = voters.len();
                    let quarantined = n > committee.f() && self.voted_out.insert(v.node);
                    if quarantined {
                        self.offences
                            .entry(v.node)
                            .or_default()
                            .push(("operator_votes".to_owned(), seq));
                    }
                    Applied::Vote {
                        node: v.node,
                        votes: n,
                        quarantined,
                    }
                }
                Err(e) => Applied::Nothing(e.to_owned()),
            },
            Some(&QUARANTINE_DECISION_TAG) => {
                match QuarantineDecisionOp::decode(op).and_then(|d| d.check(committee).map(|()| d))
                {
                    Ok(d) if self.decided.contains_key(&d.node) => {
                        Applied::Nothing("quarantine already decided".into())
                    }
                    Ok(d) => {
                        self.decided.insert(d.node, seq);
                        if matches!(d.grounds, Grounds::Votes(_)) && self.voted_out.insert(d.node) {
                            self.offences
                                .entry(d.node)
                                .or_default()
                                .push(("operator_votes".to_owned(), seq));
                        }
                        Applied::Decided(d.node)
                    }
                    Err(e) => Applied::Nothing(format!("quarantine decision refused: {e}")),
                }
            }
            Some(&VM_DECISION_TAG) => match VmDecisionOp::decode(op) {
                Ok(_) if self.is_quarantined(&client) => {
                    Applied::Nothing("vm decision from a quarantined node".into())
                }
                Ok(d) => self.apply_vm(time, d),
                Err(e) => Applied::Nothing(format!("vm decision refused: {e}")),
            },
            Some(&CUT_DECISION_TAG) => {
                match CutDecisionOp::decode(op).and_then(|d| d.check(committee).map(|()| d)) {
                    Ok(d) if d.cut.epoch != self.cut_epoch + 1 => Applied::Nothing(format!(
                        "cut for epoch {} refused: the next epoch is {}",
                        d.cut.epoch,
                        self.cut_epoch + 1
                    )),
                    Ok(d) if d.cut.departed_before_ms > time.as_millis() => {
                        Applied::Nothing("cut refused: its departure bound is in the future".into())
                    }
                    Ok(d) => {
                        self.cut_epoch = d.cut.epoch;
                        Applied::Cut(d.cut.epoch)
                    }
                    Err(e) => Applied::Nothing(format!("cut refused: {e}")),
                }
            }
            // The reputation engine applies the rules: on the reward grid, within the window,
            // once per slot.
            Some(&PARTICIPATION_OP_TAG) => match Participation::decode(op)
                .and_then(|p| self.reputation.on_participation(time, committee, &p, seq))
            {
                Ok(Some(slot)) => Applied::Rewarded(slot),
                Ok(None) => Applied::Nothing("slot already rewarded".into()),
                Err(e) => Applied::Nothing(format!("participation record refused: {e}")),
            },
            Some(&MEMBERSHIP_OP_TAG) => match self.membership.apply_op(time, &client, op) {
                Ok(m) => Applied::Membership(m),
                Err(e) => Applied::Nothing(e.to_string()),
            },
            Some(&PROBE_TAG) if op.len() <= 64 => Applied::Nothing("probe".into()),
            _ => Applied::Nothing("unknown operation".into()),
        }
    }

    /// The VM lifecycle rules every replica applies in order: a VM is placed once, on a host
    /// that is not quarantined; later decisions (running, migrating to another host, stopped,
    /// failed) need a VM that is placed and not finished; a finished VM is forgotten.
    fn apply_vm(&mut self, time: Timestamp, d: VmDecisionOp) -> Applied {
        let refuse = |why: &str| Applied::Nothing(format!("vm decision refused: {why}"));
        let Some(state) = VmState::parse(&d.state) else {
            return refuse("unknown state");
        };
        if let Some(h) = &d.host
            && self.is_quarantined(h)
        {
            return refuse("the host is quarantined");
        }
        match state {
            VmState::Pending => return refuse("pending is not a decision"),
            VmState::Placed => {
                if self.vms.contains_key(&d.vm) {
                    return refuse("the vm is already placed");
                }
                if d.host.is_none() {
                    return refuse("a placement needs a host");
                }
                if self.vms.len() >= MAX_LIVE_VMS {
                    return refuse("too many vms");
                }
                self.vms.insert(d.vm, (d.clone(), time.as_millis()));
            }
            VmState::Running | VmState::Migrating => match self.vms.get_mut(&d.vm) {
                None => return refuse("unknown vm"),
                Some(last) => {
                    if d.host.is_none() {
                        return refuse("a running vm needs a host");
                    }
                    *last = (d.clone(), time.as_millis());
                }
            },
            VmState::Stopped | VmState::Failed => {
                if self.vms.remove(&d.vm).is_none() {
                    return refuse("unknown vm");
                }
            }
        }
        Applied::Vm {
            vm: d.vm,
            host: d.host,
            state,
        }
    }

    /// The host of an unfinished VM with a committed decision.
    pub fn vm_host(&self, vm: &VmId) -> Option<Option<NodeId>> {
        self.vms.get(vm).map(|(d, _)| d.host)
    }

    /// `failed` decisions for the VMs still only `placed` [`PLACED_TTL_MS`] after their
    /// placement, at decision time `now` (at most `max` of them, oldest VM ids first). Pure:
    /// every replica computes the same list from the same log.
    pub fn overdue(&self, now: Timestamp, max: usize) -> Vec<VmDecisionOp> {
        self.vms
            .values()
            .filter(|(d, since)| {
                d.state == VmState::Placed.as_str()
                    && since.saturating_add(PLACED_TTL_MS) <= now.as_millis()
            })
            .take(max)
            .map(|(d, _)| VmDecisionOp {
                state: VmState::Failed.as_str().to_owned(),
                ..d.clone()
            })
            .collect()
    }

    /// Whether a node is quarantined (by reputation or by votes).
    pub fn is_quarantined(&self, node: &NodeId) -> bool {
        self.reputation.is_quarantined(node) || self.voted_out.contains(node)
    }

    /// The document epoch of the last committed compaction cut (0: none yet).
    pub fn cut_epoch(&self) -> u64 {
        self.cut_epoch
    }

    /// Whether a quarantine decision for the node has committed.
    pub fn is_decided(&self, node: &NodeId) -> bool {
        self.decided.contains_key(node)
    }

    /// A node's score in [0, 1].
    pub fn score(&self, node: &NodeId) -> f64 {
        self.reputation.score(node)
    }

    /// Reputation outputs since the last call.
    pub fn poll_output(&mut self) -> Option<dwcp_reputation::Output> {
        self.reputation.poll_output()
    }
}

impl Default for AcpState {
    fn default() -> Self {
        Self::new()
    }
}

/// Inputs of the driver task.
#[derive(Debug)]
pub enum DriverInput {
    /// A message from the consensus gossip topic (the driver reports the verdict).
    Gossip(GossipMessage),
    /// An envelope a peer sent directly.
    Direct {
        /// Sender.
        peer: PeerId,
        /// Envelope bytes.
        data: Vec<u8>,
    },
    /// Submit an operation signed by this node; answers with its nonce.
    Submit(Vec<u8>, oneshot::Sender<anyhow::Result<u64>>),
    /// Submit an operation and answer once it committed: its certificate, or why the
    /// replicated state refused it.
    Decide(Vec<u8>, oneshot::Sender<anyhow::Result<Vec<u8>>>),
    /// Submit a probe and answer once it committed here, with the time it took.
    Probe(oneshot::Sender<anyhow::Result<Duration>>),
    /// A peer's reply to this node's state-transfer request.
    Transfer {
        /// The peer asked.
        peer: NodeId,
        /// Its reply (encoded [`crate::transfer::TransferReply`]); `None` when the request
        /// failed (the peer was unreachable or did not answer).
        reply: Option<Vec<u8>>,
    },
    /// This member measured what transfers from a node achieved: its signed
    /// `BandwidthMeasurement` and the node's signed announcement (its capacity claim). Kept,
    /// sent to the other members, and turned into evidence once f+1 members' measurements
    /// contradict the claim.
    Measured {
        /// The node's signed announcement.
        claim: SignedEnvelope,
        /// Our signed measurement of it.
        measurement: SignedEnvelope,
    },
}

/// Nodes whose claims and measurements a member keeps (and observers it serves).
const MAX_MEASURED: usize = 1024;
/// How often one observer's fetch is served.
const FETCH_EVERY: Duration = Duration::from_millis(200);
/// A request of ours not committed after this long is sent to every member again.
const RESEND_AFTER: Duration = Duration::from_secs(3);
/// Retransmission of a request stops after this long.
const GIVE_UP_AFTER: Duration = Duration::from_secs(300);
/// Most uncommitted requests of ours retransmitted (the oldest are given up first).
const MAX_UNANSWERED: usize = 256;
/// Smallest transfer whose rate counts as a measurement.
pub const MIN_MEASURED_BYTES: u64 = 8 * 1024 * 1024;

/// A member's measurement of a completed transfer from `from`: signed and handed to the
/// consensus driver with `from`'s signed announcement (its claim). Transfers shorter than a
/// second or smaller than [`MIN_MEASURED_BYTES`] say too little and are ignored.
pub fn report_measurement(
    shared: &Shared,
    key: &NodeKey,
    from: NodeId,
    bytes: u64,
    took: Duration,
) {
    let Some(c) = shared.consensus() else { return };
    let me = shared.node_id();
    if from == me
        || !c.committee().is_some_and(|g| g.contains(&me))
        || bytes < MIN_MEASURED_BYTES
        || took < Duration::from_secs(1)
    {
        return;
    }
    let Some(claim) = shared.announcement_envelope(&from) else {
        return;
    };
    let mbps = (bytes as f64 * 8.0 / took.as_secs_f64() / 1e6).min(f64::from(u32::MAX)) as u32;
    match Verified::sign(
        key,
        dwcp_reputation::BandwidthMeasurement {
            subject: from,
            measured_mbps: mbps,
            at: Timestamp(wall_ms()),
        },
    ) {
        Ok(m) => {
            debug!(node = %from.short(), mbps, "measured a transfer from a node");
            if !c.offer(DriverInput::Measured {
                claim,
                measurement: m.envelope().clone(),
            }) {
                debug!("consensus queue full: measurement dropped");
            }
        }
        Err(e) => warn!(error = %e, "could not sign a bandwidth measurement"),
    }
}

/// `GET /v1/consensus/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuorumStatus {
    /// This node.
    pub node: NodeId,
    /// Whether it runs a replica.
    pub replica: bool,
    /// Committee epoch.
    pub epoch: u64,
    /// Members.
    pub members: Vec<NodeId>,
    /// n, f and the quorum 2f+1.
    pub n: usize,
    /// Faults tolerated.
    pub f: usize,
    /// Quorum size.
    pub quorum: usize,
    /// Current view within the epoch (epoch `e` numbers its views from `e * 2^32`).
    pub view: u64,
    /// The epoch's last sequence number (none: the committee serves forever).
    #[serde(default)]
    pub epoch_ends_at: Option<u64>,
    /// Nodes in the committed membership registry.
    #[serde(default)]
    pub joined: usize,
    /// Of those, how many declared themselves ready.
    #[serde(default)]
    pub ready: usize,
    /// The sequence number this node resumed consensus from at its last start (the start of
    /// an epoch it had reached before stopping), `None` when it started from genesis.
    #[serde(default)]
    pub resumed_from: Option<u64>,
    /// The last catch-up reply offered only decisions above the next one this node needs:
    /// `(needed, first offered)`. Peers no longer hold the certificates in between: this
    /// node cannot replay the log, and asks peers for a certified snapshot.
    #[serde(default)]
    pub catch_up_gap: Option<(u64, u64)>,
    /// The last certified snapshot this node installed (state transfer): its sequence
    /// number, epoch and the peer it came from.
    #[serde(default)]
    pub transferred: Option<(u64, u64, NodeId)>,
    /// Snapshots this node refused since it started: replies that did not verify (a chain
    /// of epoch links without 2f+1 valid checkpoint signatures, or a state or hand-over
    /// that is not the one the last link certifies).
    #[serde(default)]
    pub transfers_refused: u64,
    /// Primary of the view.
    pub primary: Option<NodeId>,
    /// Whether the view is active (not changing).
    pub view_active: bool,
    /// Last executed sequence number.
    pub last_executed: u64,
    /// Stable checkpoint (low watermark).
    pub stable_checkpoint: u64,
    /// Requests waiting to be ordered.
    pub pending_requests: usize,
    /// Decisions applied since start.
    pub decisions: u64,
    /// View changes started since start.
    pub view_changes: u64,
    /// Recent decisions: (seq, view, requests, primary-assigned time ms).
    pub recent: Vec<(u64, u64, usize, u64)>,
    /// Milliseconds since this node last executed a decision (or started).
    #[serde(default)]
    pub quiet_ms: u64,
    /// Per member (in `members` order): milliseconds since this node last received a
    /// verified consensus message from it (0 for this node itself); `None`: never since
    /// this node started.
    #[serde(default)]
    pub heard_ms: Vec<Option<u64>>,
    /// Members heard from within `stall_after_ms` (this node included when a member).
    #[serde(default)]
    pub heard: usize,
    /// How long without a decision, while work waits, counts as a stall (three view-change
    /// timeouts); also the window for `heard`.
    #[serde(default)]
    pub stall_after_ms: u64,
    /// Set when decisions have stopped while work waits: for how long, and the likely
    /// cause ([`crate::stall`]).
    #[serde(default)]
    pub stall: Option<crate::stall::Stall>,
}

/// One row of `GET /v1/reputation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReputationRow {
    /// The node.
    pub node: NodeId,
    /// Score in [0, 1].
    pub score: f64,
    /// Whether it is quarantined.
    pub quarantined: bool,
    /// Offences applied (kind, decision seq).
    pub offences: Vec<(String, u64)>,
    /// Operator quarantine votes against it (voter, reason).
    pub votes: Vec<(NodeId, String)>,
}

/// `POST /v1/reputation/quarantine` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineRequest {
    /// Node id (hex).
    pub node: NodeId,
    /// Reason.
    pub reason: String,
}

/// What the API reads without waiting for the driver's queue (which can hold many votes
/// under load): refreshed by the driver at most every 200 ms and after every decision.
#[derive(Debug, Clone, Default)]
pub struct AcpView {
    /// `GET /v1/consensus/status`.
    pub status: Option<QuorumStatus>,
    /// `GET /v1/reputation`.
    pub reputation: Vec<ReputationRow>,
}

/// The daemon's handle on the driver.
#[derive(Debug, Clone)]
pub struct Consensus {
    tx: mpsc::Sender<DriverInput>,
    transfer: Option<crate::transfer::TransferStore>,
    /// Snapshots being served at once (each reads sled and encodes up to 8 MiB).
    serving: Arc<Semaphore>,
    /// Fault injection (feature `byzantine`, `acp.byzantine: forge-snapshot`): serve forged
    /// snapshots.
    forge_snapshots: bool,
    verifier: CommitteeVerifier,
    quarantined: watch::Receiver<BTreeSet<NodeId>>,
    view: watch::Receiver<Arc<AcpView>>,
}

impl Consensus {
    /// The answer to a state-transfer request from a peer ([`crate::transfer`]): this node's
    /// last epoch-start snapshot with the links proving it, or why not. Reads sled: call it
    /// off the async threads.
    pub fn serve_transfer(&self, request: &[u8]) -> Vec<u8> {
        let refuse = |why: &str| {
            let mut bytes = Vec::new();
            let no = crate::transfer::TransferReply::Refused(why.into());
            if ciborium::into_writer(&no, &mut bytes).is_err() {
                bytes.clear();
            }
            bytes
        };
        let Some(t) = &self.transfer else {
            return refuse("this node keeps no snapshots");
        };
        // Anyone may ask: at most MAX_SERVING snapshots are built at once, the rest are
        // told to ask again (the asker asks again after TRANSFER_EVERY).
        let Ok(_permit) = self.serving.try_acquire() else {
            return refuse("busy serving other snapshots; ask again later");
        };
        let reply = t.serve(request, dwcp_net::MAX_STATE_TRANSFER_FRAME);
        if self.forge_snapshots {
            return forge_snapshot(&reply).unwrap_or(reply);
        }
        reply
    }

    /// Nodes quarantined by committed decisions (excluded from placement, disconnected).
    pub fn quarantined(&self) -> BTreeSet<NodeId> {
        self.quarantined.borrow().clone()
    }

    /// Whether a node is quarantined.
    pub fn is_quarantined(&self, node: &NodeId) -> bool {
        self.quarantined.borrow().contains(node)
    }

    /// Checks a VM decision's certificate against the committees this node knows.
    pub fn verify_vm(&self, certificate: &[u8]) -> Result<VmDecision, CertError> {
        self.verifier.verify_vm(certificate)
    }

    /// Hands an input over without waiting; false when the queue is full.
    pub fn offer(&self, i: DriverInput) -> bool {
        self.tx.try_send(i).is_ok()
    }

    /// The committee of the latest epoch this node reached (the genesis committee,
    /// configuration `acp.committee`, until the first epoch change).
    pub fn committee(&self) -> Option<Committee> {
        self.verifier.latest()
    }

    /// Submits `op` and waits until it commits: its certificate ([`crate::cert`]), or why the
    /// replicated state refused it, or an error after `timeout`. Works on members and on
    /// nodes outside the committee (the first f+1 members reply to those).
    pub async fn decide(&self, op: Vec<u8>, timeout: Duration) -> anyhow::Result<Vec<u8>> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(DriverInput::Decide(op, tx))
            .await
            .map_err(|_| anyhow::anyhow!("the consensus driver has stopped"))?;
        tokio::time::timeout(timeout, rx)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the committee did not commit the decision within {} s",
                    timeout.as_secs()
                )
            })?
            .map_err(|_| anyhow::anyhow!("the consensus driver has stopped"))?
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> DriverInput,
    ) -> anyhow::Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| anyhow::anyhow!("the consensus driver has stopped"))?;
        tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .context("the consensus driver did not answer within 10 s")?
            .map_err(|_| anyhow::anyhow!("the consensus driver has stopped"))
    }
}

#[derive(Debug, Clone)]
struct AcpMetrics {
    latency: Histogram,
    view_changes: IntCounter,
    quarantined: IntGauge,
    score: IntGaugeVec,
    decisions: IntCounter,
    view: IntGauge,
    committee: IntGauge,
    epoch: IntGauge,
    dropped: IntCounter,
    withheld: IntCounter,
    participation_records: IntCounter,
    catch_up_gap: IntGauge,
    stalled: IntGauge,
    members_heard: IntGauge,
    state_transfers: IntCounter,
    transfers_refused: IntCounter,
    transfer_pages: IntCounter,
}

impl AcpMetrics {
    fn new(r: &Registry) -> Result<Self, prometheus::Error> {
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "dwcp_consensus_latency_seconds",
                "From submitting a request to its commit at the submitting node",
            )
            .buckets(vec![
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )?;
        r.register(Box::new(latency.clone()))?;
        let reg = crate::metrics::Reg(r);
        let score = IntGaugeVec::new(
            Opts::new(
                "dwcp_reputation_score",
                "Reputation score per node, in units of 1e-4 (10000 = 1.0)",
            ),
            &["node"],
        )?;
        r.register(Box::new(score.clone()))?;
        Ok(Self {
            latency,
            view_changes: reg.c(
                "dwcp_pbft_view_changes_total",
                "View changes this replica started",
            )?,
            quarantined: reg.g(
                "dwcp_reputation_quarantined_nodes",
                "Nodes quarantined by committed evidence or operator votes",
            )?,
            score,
            decisions: reg.c(
                "dwcp_consensus_decisions_total",
                "Committed batches applied by this node",
            )?,
            view: reg.g("dwcp_pbft_view", "Current PBFT view of this replica")?,
            committee: reg.g(
                "dwcp_consensus_committee_size",
                "Members of the current committee (0: no committee configured)",
            )?,
            epoch: reg.g(
                "dwcp_pbft_epoch",
                "Committee epoch this node's consensus has reached",
            )?,
            dropped: reg.c(
                "dwcp_consensus_messages_dropped_total",
                "Consensus messages dropped: undecodable, bad signature, not from a member",
            )?,
            withheld: reg.c(
                "dwcp_pbft_votes_withheld_total",
                "Outgoing messages this replica held back because they carried a vote conflicting with one it cast before (after a restart), or the vote could not be made durable",
            )?,
            catch_up_gap: reg.g(
                "dwcp_pbft_catch_up_gap",
                "Decisions this node cannot replay because its peers no longer hold them (0: none); it then asks peers for a certified snapshot",
            )?,
            stalled: reg.g(
                "dwcp_pbft_stalled",
                "1 while decisions have stopped with work waiting for three view-change timeouts or more (dwcp-cli consensus quorum-status says why), else 0",
            )?,
            members_heard: reg.g(
                "dwcp_pbft_members_heard",
                "Members of the current committee this node heard a verified consensus message from within the stall window (itself included when a member); below the quorum 2f+1, decisions cannot complete",
            )?,
            state_transfers: reg.c(
                "dwcp_pbft_state_transfers_total",
                "Certified snapshots (state transfer) this node verified and installed",
            )?,
            transfers_refused: reg.c(
                "dwcp_pbft_state_transfers_refused_total",
                "Snapshots (state transfer) this node refused because they did not verify: a peer lied or sent garbage",
            )?,
            transfer_pages: reg.c(
                "dwcp_pbft_state_transfer_pages_total",
                "Pages of epoch links (a chain too long for one state-transfer reply) this node verified on its way to a snapshot",
            )?,
            participation_records: reg.c(
                "dwcp_reputation_participation_records_total",
                "Participation records (a slot's commit certificate, whose voters each earn +0.01) this member submitted",
            )?,
        })
    }
}

/// What the driver needs to start.
#[derive(Debug)]
pub struct AcpSetup<'a> {
    /// `acp:` configuration.
    pub cfg: &'a AcpSection,
    /// Node key (signs votes and requests).
    pub key: NodeKey,
    /// The network.
    pub client: Client,
    /// Consensus gossip topic.
    pub topic: String,
    /// Metrics registry.
    pub registry: &'a Registry,
    /// Turns true at shutdown.
    pub stop: watch::Receiver<bool>,
    /// The state-sync driver, which records certified decisions in the cluster document.
    pub statesync: Option<crate::statesync::StateSync>,
    /// Where this replica's votes are kept across restarts ([`crate::votelog`]).
    pub votes: Option<sled::Tree>,
    /// The committees this node knows, shared with the state-sync driver (the driver adds
    /// each epoch's committee as it reaches it).
    pub verifier: CommitteeVerifier,
    /// Where the committees of later epochs this node computed are kept across restarts, so
    /// certificates of those epochs in the cluster document verify before consensus has
    /// replayed that far.
    pub committees: Option<sled::Tree>,
    /// Where the resume point is kept ([`ResumePoint`]): with epochs on, a restarted node
    /// continues from the start of the last epoch it reached instead of replaying from
    /// genesis.
    pub resume: Option<sled::Tree>,
    /// Where the links ending each epoch are kept (with `resume`: what this node serves to
    /// nodes asking for state transfer, [`crate::transfer`]).
    pub links: Option<sled::Tree>,
}

/// The genesis committee of a configuration, or `None` when none is configured.
pub fn genesis_committee(cfg: &AcpSection) -> anyhow::Result<Option<Committee>> {
    if cfg.committee.is_empty() {
        return Ok(None);
    }
    let mut ids = Vec::new();
    for s in &cfg.committee {
        ids.push(
            s.parse::<NodeId>()
                .map_err(|e| anyhow::anyhow!("acp.committee: `{s}` is not a node id: {e}"))?,
        );
    }
    Committee::new(0, ids)
        .map(Some)
        .map_err(|e: CommitteeError| anyhow::anyhow!("acp.committee: {e}"))
}

struct Driver {
    me: NodeId,
    key: NodeKey,
    /// The engine of the current epoch.
    engine: Option<Engine>,
    /// Engines of ended epochs, newest first: they only serve catch-up to nodes still in
    /// those epochs (at most [`MAX_OLD_EPOCHS`]).
    old: std::collections::VecDeque<Engine>,
    ecfg: dwcp_consensus::Config,
    /// Epoch rules (`acp.epochs`); `None`: the genesis committee serves forever.
    rules: Option<EpochRules>,
    /// Committees of later epochs, on disk.
    committees: Option<sled::Tree>,
    /// The resume point, on disk.
    resume: Option<sled::Tree>,
    /// Where this node's consensus resumed from at start (`None`: genesis).
    resumed_from: Option<u64>,
    /// How often this node renews its readiness.
    ready_every: Duration,
    /// Whether it declares itself ready to serve (`acp.epochs.serve`).
    serve: bool,
    /// When the current engine was last asked to catch up because of later-epoch traffic.
    nudged: Option<Instant>,
    committee: Committee,
    state: AcpState,
    client: Client,
    topic: String,
    in_flight: Arc<Semaphore>,
    metrics: AcpMetrics,
    next_nonce: u64,
    /// nonce -> submitted at
    submitted: BTreeMap<u64, Instant>,
    /// Our requests not committed yet: nonce -> (first sent, last sent, envelope bytes).
    unanswered: BTreeMap<u64, (Instant, Instant, Vec<u8>)>,
    /// Offenders with an evidence request in flight.
    evidence_pending: BTreeSet<NodeId>,
    decisions: u64,
    view_changes: u64,
    recent: std::collections::VecDeque<(u64, u64, usize, u64)>,
    quarantined: watch::Sender<BTreeSet<NodeId>>,
    /// The API's view, and when it was last refreshed.
    view: watch::Sender<Arc<AcpView>>,
    view_at: Instant,
    view_dirty: bool,
    /// Probes waiting for their commit: nonce -> reply.
    probes: BTreeMap<u64, oneshot::Sender<anyhow::Result<Duration>>>,
    /// Fault injection (feature `byzantine`): equivocate on every vote.
    equivocate: bool,
    /// Fault injection (feature `byzantine`, `forge-snapshot`): serve observers no
    /// certificates, so that they need a snapshot (which the handle forges).
    withhold_log: bool,
    /// Where certified decisions go (the cluster document).
    sync: Option<crate::statesync::StateSync>,
    /// Overdue placements this member submitted `failed` for (bounded by [`MAX_EXPIRING`]).
    expiring: BTreeSet<VmId>,
    /// The votes this replica cast, on disk.
    votes: Option<crate::votelog::VoteLog>,
    /// Nodes' newest signed announcements (capacity claims): node -> (seq, envelope).
    claims: BTreeMap<NodeId, (u64, SignedEnvelope)>,
    /// Members' newest bandwidth measurements of nodes: node -> measurer -> envelope.
    measurements: BTreeMap<NodeId, BTreeMap<NodeId, SignedEnvelope>>,
    /// Claims this member submitted evidence against: (node, announcement seq).
    claims_accused: BTreeSet<(NodeId, u64)>,
    /// When each observer's last fetch was served.
    fetches: BTreeMap<NodeId, Instant>,
    /// Signed quarantine votes per target, the grounds of a decision (bounded).
    vote_envs: BTreeMap<NodeId, BTreeMap<NodeId, SignedEnvelope>>,
    /// Nodes this replica proposed a quarantine decision for.
    decisions_proposed: BTreeSet<NodeId>,
    /// Decisions this node submitted and waits for: nonce -> waiter.
    waiting: BTreeMap<u64, Waiter>,
    /// Opens the certificates members reply with.
    verifier: CommitteeVerifier,
    /// Epoch links and the resume point, served to nodes asking for state transfer.
    transfer: Option<crate::transfer::TransferStore>,
    /// The link ending the current epoch, waiting for its checkpoint's proof.
    pending_link: Option<dwcp_consensus::transfer::EpochLink>,
    /// When this node last asked a peer for a snapshot.
    transfer_asked: Option<Instant>,
    /// The last snapshot installed: (seq, epoch, peer).
    transferred: Option<(u64, u64, NodeId)>,
    /// Whether this node wants a snapshot (it saw peers two or more epochs ahead, or
    /// cannot replay what it needs).
    transfer_wanted: bool,
    /// Peers known to be ahead, oldest first (at most [`MAX_TRANSFER_PEERS`]).
    transfer_peers: std::collections::VecDeque<NodeId>,
    /// Peers whose snapshot failed or was refused since the last start over.
    transfer_failed: BTreeSet<NodeId>,
    /// The newest epoch whose committee this node verified through pages of epoch links
    /// (state transfer of a long chain); it asks from there.
    transfer_trusted: u64,
    /// The driver's own input queue (transfer replies come back through it).
    self_tx: mpsc::Sender<DriverInput>,
    /// When this node last executed a decision (or started).
    last_decision: Instant,
    /// When each member of the current committee was last heard from (a verified
    /// consensus message); only members are kept.
    heard: BTreeMap<NodeId, Instant>,
    /// [`crate::stall::stall_after_ms`] of the configured view-change timeout.
    stall_after_ms: u64,
    /// Whether a stall was reported (logged once per stall).
    stalled: bool,
}

/// Where a node's consensus stood at the start of an epoch: the epoch's committee and last
/// sequence number, the engine hand-over (log digest, executed-request windows) and the
/// replicated state after the previous epoch's last decision. Kept in sled (one entry,
/// replaced at every epoch start) so that a restarted node starts that epoch's engine
/// ([`Engine::resume`]) and fetches only the decisions after it, instead of replaying the
/// log from genesis, which the peers may no longer hold (they retain `catch_up_mib` of
/// certificates). It is the node's own record, trusted like its vote log.
#[derive(Debug, Serialize, Deserialize)]
pub struct ResumePoint {
    /// The genesis committee of the cluster the point belongs to: a point left in a data
    /// directory by another cluster is ignored.
    pub genesis: Vec<NodeId>,
    /// The epoch's committee.
    pub committee: Committee,
    /// The epoch's last sequence number.
    pub end: u64,
    /// The engine hand-over at the epoch's start.
    pub handover: dwcp_consensus::Handover,
    /// Replicated state after the previous epoch's last decision.
    pub state: AcpState,
}

/// The key of the resume point in its tree.
const RESUME_KEY: &[u8] = b"latest";

impl ResumePoint {
    /// Writes a point (replacing the previous one); a failure is logged, not fatal: the node
    /// then resumes from an older point, or replays from genesis, after a restart.
    pub(crate) fn store(&self, t: &sled::Tree) {
        let mut bytes = Vec::new();
        let r = ciborium::into_writer(self, &mut bytes)
            .map_err(|e| e.to_string())
            .and_then(|()| t.insert(RESUME_KEY, bytes).map_err(|e| e.to_string()));
        if let Err(e) = r {
            warn!(error = %e, "could not store the consensus resume point");
        }
    }

    /// The stored point, if there is one that decodes (a corrupt one is logged and ignored).
    pub fn load(t: &sled::Tree) -> Option<Self> {
        let bytes = t.get(RESUME_KEY).ok().flatten()?;
        match ciborium::from_reader::<Self, _>(bytes.as_ref()) {
            Ok(p) => Some(p),
            Err(e) => {
                warn!(error = %e, "the stored consensus resume point does not decode; ignored");
                None
            }
        }
    }

    /// The epoch's engine, started where the point stands.
    fn engine(
        &self,
        cfg: &dwcp_consensus::Config,
        key: &NodeKey,
        rules: &EpochRules,
        genesis: &Committee,
    ) -> anyhow::Result<Engine> {
        anyhow::ensure!(
            self.genesis == genesis.members(),
            "the stored point belongs to another genesis committee (another cluster)"
        );
        // Re-checked through the constructor (members distinct, within the vote limit).
        let committee = Committee::new(self.committee.epoch(), self.committee.members().to_vec())?;
        anyhow::ensure!(
            self.end == self.handover.seq + rules.epoch_length,
            "the stored epoch ends at {} but epochs are {} long now",
            self.end,
            rules.epoch_length
        );
        let mut e = Engine::resume(cfg.clone(), key.clone(), committee, self.handover.clone())?;
        e.set_end(self.end)?;
        Ok(e)
    }
}

/// Most peers a node remembers as ahead of it (to ask for a snapshot in turn).
pub const MAX_TRANSFER_PEERS: usize = 16;

/// Most state-transfer requests a node serves at once.
pub const MAX_SERVING: usize = 2;

/// Least time between two state-transfer requests of a node.
pub const TRANSFER_EVERY: Duration = Duration::from_secs(5);

/// How long a stopping node waits for its leave request to be sent.
const LEAVE_GRACE: Duration = Duration::from_millis(500);

/// Loads the committees of later epochs this node computed before a restart (the newest
/// [`crate::cert::MAX_KNOWN_COMMITTEES`]); an entry that does not decode is skipped.
pub(crate) fn load_committees(t: &sled::Tree, verifier: &CommitteeVerifier) {
    let mut loaded = 0;
    for item in t.iter().rev().take(crate::cert::MAX_KNOWN_COMMITTEES) {
        let Ok((k, v)) = item else { continue };
        // Re-checked through the constructor (members distinct, within the vote limit).
        let c = ciborium::from_reader::<Committee, _>(v.as_ref())
            .ok()
            .and_then(|c| Committee::new(c.epoch(), c.members().to_vec()).ok());
        match c {
            Some(c) if k.as_ref() == c.epoch().to_be_bytes() && c.epoch() > 0 => {
                verifier.insert(c);
                loaded += 1;
            }
            _ => warn!("a stored committee does not decode; skipped"),
        }
    }
    if loaded > 0 {
        info!(loaded, "committees of later epochs loaded");
    }
}

/// Most ended epochs whose engines are kept to serve catch-up; together they keep at most
/// `acp.pbft.catch_up_mib` of certificates (the oldest epochs go first).
pub const MAX_OLD_EPOCHS: usize = 64;

/// A submitted decision waiting for its commit.
#[derive(Debug)]
struct Waiter {
    reply: oneshot::Sender<anyhow::Result<Vec<u8>>>,
    /// Members that replied "refused", with their reasons.
    refusals: BTreeMap<NodeId, String>,
}

/// Most decisions waiting at once; the oldest gives up first.
const MAX_WAITING: usize = 256;

/// Most nodes with pending quarantine votes whose envelopes are kept.
const MAX_VOTE_TARGETS: usize = 1024;
/// When a replica that did not submit a decision writes its record itself, if the record
/// has not reached its document by then.
pub const FALLBACK_WRITE_AFTER: Duration = Duration::from_secs(5);

/// `s` cut to at most `max` bytes at a character boundary.
fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Whether the configuration asks this node for the fault `strategy` (`acp.byzantine`,
/// feature `byzantine` only).
fn byzantine_is(cfg: &AcpSection, strategy: &str) -> bool {
    #[cfg(feature = "byzantine")]
    {
        cfg.byzantine.as_deref() == Some(strategy)
    }
    #[cfg(not(feature = "byzantine"))]
    {
        let _ = (cfg, strategy);
        false
    }
}

/// Fault injection (`acp.byzantine: forge-snapshot`): the honest snapshot reply with a
/// replicated state that quarantines every member of the snapshot's committee but the first.
/// The epoch links and the hand-over stay true, so only the check of the state's digest
/// against the last link refuses it. `None` when the reply is not a snapshot.
fn forge_snapshot(reply: &[u8]) -> Option<Vec<u8>> {
    use crate::transfer::TransferReply;
    let TransferReply::Snapshot {
        links,
        handover,
        mut state,
    } = ciborium::from_reader(reply).ok()?
    else {
        return None;
    };
    let members = links.last()?.next.members().to_vec();
    // The first member stays in: a liar quarantines the others.
    for m in members.iter().skip(1) {
        state.voted_out.insert(*m);
    }
    let mut bytes = Vec::new();
    ciborium::into_writer(
        &TransferReply::Snapshot {
            links,
            handover,
            state,
        },
        &mut bytes,
    )
    .ok()?;
    Some(bytes)
}

/// Starts the driver when a committee is configured; `Ok(None)` otherwise.
pub fn spawn(
    setup: AcpSetup<'_>,
) -> anyhow::Result<Option<(Consensus, tokio::task::JoinHandle<()>)>> {
    let AcpSetup {
        cfg,
        key,
        client,
        topic,
        registry,
        stop,
        statesync,
        votes,
        verifier,
        committees,
        resume,
        links,
    } = setup;
    let metrics = AcpMetrics::new(registry)?;
    let Some(committee) = genesis_committee(cfg)? else {
        info!("no consensus committee configured (acp.committee): consensus is off");
        return Ok(None);
    };
    metrics.committee.set(committee.n() as i64);
    let me = key.node_id();
    let ecfg = dwcp_consensus::Config {
        checkpoint_interval: cfg.pbft.checkpoint_interval,
        log_window: 2 * cfg.pbft.checkpoint_interval,
        view_change_timeout_ms: cfg.pbft.view_change_timeout.as_millis() as u64,
        retained_certificate_bytes: cfg.pbft.catch_up_mib.saturating_mul(1024 * 1024),
        // Checkpoints certify the replicated state (`AcpState::digest`): state transfer.
        app_digests: true,
        ..dwcp_consensus::Config::default()
    }
    .validate()?;
    // Nodes outside the committee run the engine as an observer: it never votes, fetches
    // the members' commit certificates and executes them, so every node applies the same
    // committed operations (reputation, quarantines, VM lifecycle, compaction cuts).
    let rules = (cfg.epochs.length > 0).then(|| EpochRules {
        epoch_length: cfg.epochs.length,
        size: if cfg.epochs.size == 0 {
            committee.n()
        } else {
            cfg.epochs.size
        },
        eligibility: dwcp_consensus::committee::Eligibility {
            min_reputation: cfg.epochs.min_reputation,
            min_uptime_s: cfg.epochs.min_uptime.as_secs(),
            max_ready_age_s: cfg.epochs.ready_ttl.as_secs(),
        },
    });
    let mut engine = Engine::new(ecfg.clone(), key.clone(), committee.clone())?;
    if let Some(r) = &rules {
        engine.set_end(r.epoch_length)?;
    }
    let mut state = AcpState::new();
    let mut resumed_from = None;
    let mut committee = committee;
    // With epochs, continue from the start of the last epoch this node reached.
    if let (Some(r), Some(t)) = (&rules, &resume)
        && let Some(p) = ResumePoint::load(t)
    {
        match p.engine(&ecfg, &key, r, &committee) {
            Ok(e) => {
                info!(
                    seq = p.handover.seq,
                    epoch = p.committee.epoch(),
                    "consensus resumes from the start of the last epoch reached"
                );
                resumed_from = Some(p.handover.seq);
                metrics.epoch.set(p.committee.epoch() as i64);
                metrics.committee.set(p.committee.n() as i64);
                verifier.insert(p.committee.clone());
                engine = e;
                state = p.state;
                committee = p.committee;
            }
            Err(e) => {
                warn!(error = %e, "the stored resume point does not start an engine; replaying from genesis")
            }
        }
    }
    let engine = Some(engine);
    info!(
        n = committee.n(),
        f = committee.f(),
        replica = committee.contains(&me),
        "consensus committee loaded"
    );
    // The daemon loaded the stored committees of later epochs before state sync started.
    verifier.insert(committee.clone());
    let d_verifier = verifier.clone();
    let (tx, rx) = mpsc::channel(1024);
    let (q_tx, q_rx) = watch::channel(BTreeSet::new());
    let (v_tx, v_rx) = watch::channel(Arc::new(AcpView::default()));
    let transfer = match (&links, &resume) {
        (Some(l), Some(r)) => Some(crate::transfer::TransferStore::new(
            l.clone(),
            r.clone(),
            cfg.epochs.transfer_page_links,
        )),
        _ => None,
    };
    let d = Driver {
        me,
        key,
        transfer: transfer.clone(),
        pending_link: None,
        transfer_asked: None,
        transferred: None,
        transfer_wanted: false,
        transfer_peers: std::collections::VecDeque::new(),
        transfer_failed: BTreeSet::new(),
        transfer_trusted: 0,
        self_tx: tx.clone(),
        last_decision: Instant::now(),
        heard: BTreeMap::new(),
        stall_after_ms: crate::stall::stall_after_ms(
            cfg.pbft.view_change_timeout.as_millis() as u64
        ),
        stalled: false,
        engine,
        old: std::collections::VecDeque::new(),
        ecfg,
        rules,
        committees,
        resume,
        resumed_from,
        ready_every: cfg.epochs.ready_ttl / 3,
        serve: cfg.epochs.serve,
        nudged: None,
        committee,
        state,
        client,
        topic,
        in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        metrics,
        // Nonces grow across restarts: the wall clock in ms.
        next_nonce: wall_ms(),
        submitted: BTreeMap::new(),
        unanswered: BTreeMap::new(),
        evidence_pending: BTreeSet::new(),
        decisions: 0,
        view_changes: 0,
        recent: std::collections::VecDeque::new(),
        quarantined: q_tx,
        view: v_tx,
        view_at: Instant::now(),
        view_dirty: true,
        probes: BTreeMap::new(),
        equivocate: byzantine_is(cfg, "equivocate"),
        withhold_log: byzantine_is(cfg, "forge-snapshot"),
        sync: statesync,
        vote_envs: BTreeMap::new(),
        decisions_proposed: BTreeSet::new(),
        expiring: BTreeSet::new(),
        votes: votes.map(|t| crate::votelog::VoteLog::new(t, me)),
        claims: BTreeMap::new(),
        measurements: BTreeMap::new(),
        claims_accused: BTreeSet::new(),
        fetches: BTreeMap::new(),
        waiting: BTreeMap::new(),
        verifier,
    };
    if d.equivocate {
        warn!("BYZANTINE TEST MODE: this replica equivocates on every vote (acp.byzantine)");
    }
    if d.withhold_log {
        warn!(
            "BYZANTINE TEST MODE: this node serves forged snapshots and no certificates to observers (acp.byzantine)"
        );
    }
    // The same fault serves forged snapshots (the handle) and withholds the log (the driver).
    let forge_snapshots = d.withhold_log;
    let task = tokio::spawn(d.run(rx, stop));
    Ok(Some((
        Consensus {
            tx,
            transfer,
            serving: Arc::new(Semaphore::new(MAX_SERVING)),
            forge_snapshots,
            verifier: d_verifier,
            quarantined: q_rx,
            view: v_rx,
        },
        task,
    )))
}

enum Decoded {
    Msg(Verified<ConsensusMsg>),
    Req(Verified<Request>),
    Reply(Verified<ConsensusReply>),
    Claim(SignedEnvelope, Verified<dwcp_protocol::NodeAnnouncement>),
    Measurement(
        SignedEnvelope,
        Verified<dwcp_reputation::BandwidthMeasurement>,
    ),
}

fn decode(bytes: &[u8]) -> Result<Decoded, String> {
    let env = SignedEnvelope::decode(bytes).map_err(|e| e.to_string())?;
    match env.kind() {
        MessageKind::Consensus => env
            .verify::<ConsensusMsg>()
            .map(Decoded::Msg)
            .map_err(|e| e.to_string()),
        MessageKind::ConsensusRequest => env
            .verify::<Request>()
            .map(Decoded::Req)
            .map_err(|e| e.to_string()),
        MessageKind::ConsensusReply => env
            .verify::<ConsensusReply>()
            .map(Decoded::Reply)
            .map_err(|e| e.to_string()),
        MessageKind::NodeAnnouncement => env
            .clone()
            .verify::<dwcp_protocol::NodeAnnouncement>()
            .map(|v| Decoded::Claim(env, v))
            .map_err(|e| e.to_string()),
        MessageKind::Transfer => env
            .clone()
            .verify::<dwcp_reputation::BandwidthMeasurement>()
            .map(|v| Decoded::Measurement(env, v))
            .map_err(|e| e.to_string()),
        k => Err(format!("unexpected kind {k:?} on the consensus path")),
    }
}

impl Driver {
    fn publish_view(&mut self) {
        self.view.send_replace(Arc::new(AcpView {
            status: Some(self.status()),
            reputation: self.reputation_rows(),
        }));
        self.view_at = Instant::now();
        self.view_dirty = false;
    }

    async fn run(mut self, mut rx: mpsc::Receiver<DriverInput>, mut stop: watch::Receiver<bool>) {
        self.publish_view();
        let mut resend = tokio::time::interval(RESEND_AFTER);
        resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // With epochs, a node joins the membership and renews its readiness (the first
        // tick is immediate).
        let mut ready = tokio::time::interval(self.ready_every.max(Duration::from_secs(1)));
        ready.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut joined = false;
        loop {
            let wake = self
                .engine
                .iter()
                .chain(self.old.iter())
                .filter_map(|e| e.poll_timeout())
                .min()
                .map(|t| {
                    tokio::time::Instant::now()
                        + Duration::from_millis(t.as_millis().saturating_sub(wall_ms()))
                });
            let timer = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                r = stop.changed() => {
                    if r.is_err() || *stop.borrow() {
                        break;
                    }
                }
                i = rx.recv() => match i {
                    Some(i) => self.on_input(i).await,
                    None => break,
                },
                () = timer => {
                    let now = Timestamp(wall_ms());
                    for e in self.engine.iter_mut().chain(self.old.iter_mut()) {
                        if e.poll_timeout().is_some_and(|t| t <= now) {
                            e.handle_timeout(now);
                        }
                    }
                }
                _ = resend.tick() => {
                    self.retransmit();
                    // A snapshot still wanted is asked of the next peer, traffic or not.
                    self.try_transfer();
                }
                _ = ready.tick(), if self.rules.is_some() => {
                    let mut ops = Vec::new();
                    if !std::mem::replace(&mut joined, true) {
                        ops.push(MembershipOp::Join(self.me));
                    }
                    ops.push(MembershipOp::Ready(self.me, self.serve));
                    for op in ops {
                        if let Err(e) = self.submit(op.encode()) {
                            warn!(error = %e, "could not submit a membership operation");
                        }
                    }
                }
            }
            self.drain().await;
            if let Some(e) = &self.engine {
                self.metrics.view.set(e.view_in_epoch() as i64);
                let gap = e.catch_up_gap();
                let size = gap.map_or(0, |(needed, offered)| offered.saturating_sub(needed));
                if self.metrics.catch_up_gap.get() != size as i64 {
                    self.metrics.catch_up_gap.set(size as i64);
                    if let Some((needed, offered)) = gap {
                        warn!(
                            needed,
                            offered,
                            "cannot catch up: peers no longer hold the decisions this node needs next; asking for a certified snapshot"
                        );
                    }
                }
                if gap.is_some() {
                    for m in self.other_members() {
                        self.want_transfer(m);
                    }
                    self.try_transfer();
                }
            }
            self.check_stall();
            if self.view_dirty || self.view_at.elapsed() >= Duration::from_millis(200) {
                self.publish_view();
            }
        }
        if self.rules.is_some() && joined {
            // Leaving on purpose: the next committees are chosen without this node at once
            // instead of after its readiness expires. The members order the request whether
            // or not this node is still up; the sends get a moment to leave.
            match self.submit(MembershipOp::Leave(self.me).encode()) {
                Ok(_) => tokio::time::sleep(LEAVE_GRACE).await,
                Err(e) => warn!(error = %e, "could not submit the leave"),
            }
        }
        debug!("consensus driver stopped");
    }

    fn feed(&mut self, d: Decoded) -> Result<(), &'static str> {
        let now = Timestamp(wall_ms());
        match d {
            Decoded::Msg(m) => {
                // Any verified message from a member of the current committee shows it is
                // up, whatever epoch it is about (a quarantined member counts as silent).
                let signer = m.signer();
                if self.committee.contains(&signer) && !self.state.is_quarantined(&signer) {
                    self.heard.insert(signer, Instant::now());
                }
                // The engine of the message's epoch: the current one, or an ended one that
                // serves nodes still catching up in it.
                let target = if self.engine.as_ref().is_some_and(|e| e.covers(m.message())) {
                    Some(0)
                } else {
                    self.old
                        .iter()
                        .position(|e| e.covers(m.message()))
                        .map(|i| i + 1)
                };
                let Some(target) = target else {
                    // Traffic two or more epochs ahead: a certified snapshot is quicker than
                    // replaying (and the log may no longer be held).
                    if let Some(len) = self.rules.as_ref().map(|r| r.epoch_length)
                        && dwcp_consensus::transfer::message_epoch(m.message(), len)
                            .is_some_and(|e| e >= self.committee.epoch() + 2)
                    {
                        self.want_transfer(m.signer());
                        self.try_transfer();
                    }
                    // Traffic of an epoch this node has not reached: it is behind, so it
                    // asks for decisions (at most once a second).
                    if self
                        .nudged
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
                        && let Some(e) = self.engine.as_mut()
                    {
                        self.nudged = Some(Instant::now());
                        e.catch_up();
                    }
                    return Err("other_epoch");
                };
                let member = match target {
                    0 => self.engine.as_ref().map(Engine::committee),
                    i => self.old.get(i - 1).map(Engine::committee),
                }
                .is_some_and(|c| c.contains(&m.signer()));
                if !member {
                    // Observers (nodes outside the committee) may ask for certificates, at
                    // most every FETCH_EVERY each.
                    if !matches!(m.message(), ConsensusMsg::Fetch { .. })
                        || !self.admit_fetch(m.signer())
                    {
                        return Err("not_member");
                    }
                    if self.withhold_log {
                        return Err("byzantine_withheld");
                    }
                }
                // A quarantined member is treated as silent: PBFT tolerates f of those.
                if self.state.is_quarantined(&m.signer()) {
                    return Err("quarantined");
                }
                let e = match target {
                    0 => self.engine.as_mut(),
                    i => self.old.get_mut(i - 1),
                };
                if let Some(e) = e {
                    e.handle(now, Input::Message(m));
                }
                Ok(())
            }
            Decoded::Req(r) => {
                if let Some(e) = self.engine.as_mut() {
                    e.handle(now, Input::Request(r));
                }
                Ok(())
            }
            Decoded::Reply(r) => {
                if !self.is_recent_member(&r.signer()) {
                    return Err("not_member");
                }
                self.on_reply(&r)
            }
            Decoded::Claim(env, a) => {
                self.remember_claim(env, &a);
                Ok(())
            }
            Decoded::Measurement(env, m) => {
                if !self.is_recent_member(&m.signer()) || m.signer() == m.subject {
                    return Err("not_member");
                }
                self.remember_measurement(env, &m);
                Ok(())
            }
        }
    }

    /// Whether `node` is a member of the current committee or of one of the ended epochs
    /// kept (replies and measurements may come from the committee that just handed over).
    fn is_recent_member(&self, node: &NodeId) -> bool {
        self.committee.contains(node) || self.old.iter().any(|e| e.committee().contains(node))
    }

    /// The next command of any engine: the current epoch's first, then ended ones'.
    fn next_command(&mut self) -> Option<Command> {
        if let Some(c) = self.engine.as_mut().and_then(Engine::poll_command) {
            return Some(c);
        }
        self.old.iter_mut().find_map(Engine::poll_command)
    }

    /// The next epoch's committee, from committed state (membership, reputation, the log
    /// digest and batch time of the epoch's last decision `d`). Every honest node computes
    /// the same committee.
    fn next_committee(&self, d: &dwcp_consensus::Decision) -> Option<Committee> {
        let rules = self.rules.as_ref()?;
        let state = &self.state;
        let reputation = |n: &NodeId| (state.score(n), state.is_quarantined(n));
        Some(dwcp_consensus::committee::next_committee(
            &self.committee,
            d.seq,
            &d.state,
            d.time,
            &state.membership,
            &reputation,
            rules,
        ))
    }

    /// At the end of an epoch (its last decision applied and its checkpoint signed): starts
    /// `next`'s engine where this one ended, and keeps the ended engine to serve catch-up.
    fn next_epoch(&mut self, d: &dwcp_consensus::Decision, next: Committee) {
        let Some(rules) = self.rules.clone() else {
            return;
        };
        let Some(mut ended) = self.engine.take() else {
            return;
        };
        let Some(mut handover) = ended.handover() else {
            self.engine = Some(ended);
            return;
        };
        handover.pending = ended.take_pending();
        // What a restart resumes from (the waiting requests are not kept: clients resend).
        let mut resumed_at = handover.clone();
        resumed_at.pending.clear();
        let started = Engine::resume(self.ecfg.clone(), self.key.clone(), next.clone(), handover)
            .and_then(|mut e| {
                e.set_end(d.seq + rules.epoch_length)?;
                Ok(e)
            });
        let mut engine = match started {
            Ok(e) => e,
            Err(e) => {
                // Only a configuration error can get here (validated at start).
                warn!(error = %e, "could not start the next epoch's engine");
                self.engine = Some(ended);
                return;
            }
        };
        engine.handle_timeout(Timestamp(wall_ms()));
        let changed = next.members() != self.committee.members();
        info!(
            epoch = next.epoch(),
            seq = d.seq,
            n = next.n(),
            f = next.f(),
            changed,
            replica = next.contains(&self.me),
            members = ?next.members().iter().map(NodeId::short).collect::<Vec<_>>(),
            "consensus epoch begins"
        );
        self.old.push_front(ended);
        self.old.truncate(MAX_OLD_EPOCHS);
        let budget = self.ecfg.retained_certificate_bytes;
        let mut kept = 0usize;
        let keep = self
            .old
            .iter()
            .take_while(|e| {
                kept = kept.saturating_add(e.retained_certificate_bytes());
                kept <= budget
            })
            .count()
            .max(1);
        self.old.truncate(keep);
        self.engine = Some(engine);
        self.verifier.insert(next.clone());
        self.store_committee(&next);
        self.metrics.committee.set(next.n() as i64);
        self.metrics.epoch.set(next.epoch() as i64);
        if let (Some(t), Some(genesis)) = (&self.resume, self.verifier.committee(0)) {
            ResumePoint {
                genesis: genesis.members().to_vec(),
                committee: next.clone(),
                end: d.seq + rules.epoch_length,
                handover: resumed_at,
                state: self.state.clone(),
            }
            .store(t);
        }
        self.committee = next;
        self.forget_former_members();
        self.view_dirty = true;
        // Our requests still waiting go to the new members at once.
        if let Some(due) = Instant::now().checked_sub(RESEND_AFTER) {
            for (_, last, _) in self.unanswered.values_mut() {
                *last = due;
            }
        }
        self.retransmit();
    }

    /// PBFT's client retransmission (section 4.1): a request of ours not committed after
    /// [`RESEND_AFTER`] goes to every member again (the engines drop repeats by client and
    /// nonce), so a request whose first sends were lost still reaches the primary and the
    /// backups' timers; given up after [`GIVE_UP_AFTER`].
    fn retransmit(&mut self) {
        let now = Instant::now();
        self.unanswered
            .retain(|_, (first, _, _)| now.duration_since(*first) < GIVE_UP_AFTER);
        let due: Vec<Vec<u8>> = self
            .unanswered
            .values_mut()
            .filter(|(_, last, _)| now.duration_since(*last) >= RESEND_AFTER)
            .map(|(_, last, bytes)| {
                *last = now;
                bytes.clone()
            })
            .collect();
        if due.is_empty() {
            return;
        }
        debug!(
            requests = due.len(),
            "retransmitting requests not committed yet"
        );
        let members = self.other_members();
        for bytes in due {
            for m in &members {
                self.send(*m, bytes.clone());
            }
        }
    }

    /// The current committee's members other than this node.
    fn other_members(&self) -> Vec<NodeId> {
        let me = self.me;
        self.committee
            .members()
            .iter()
            .copied()
            .filter(|m| *m != me)
            .collect()
    }

    /// Whether an observer's fetch may be served now (per-observer rate limit).
    fn admit_fetch(&mut self, who: NodeId) -> bool {
        let now = Instant::now();
        if let Some(last) = self.fetches.get(&who)
            && now.duration_since(*last) < FETCH_EVERY
        {
            return false;
        }
        if !self.fetches.contains_key(&who) && self.fetches.len() >= MAX_MEASURED {
            self.fetches
                .retain(|_, t| now.duration_since(*t) < FETCH_EVERY);
            if self.fetches.len() >= MAX_MEASURED {
                return false;
            }
        }
        self.fetches.insert(who, now);
        true
    }

    /// Keeps a node's newest signed announcement (its capacity claim).
    fn remember_claim(
        &mut self,
        env: SignedEnvelope,
        a: &Verified<dwcp_protocol::NodeAnnouncement>,
    ) {
        let who = a.signer();
        if !self.claims.contains_key(&who) && self.claims.len() >= MAX_MEASURED {
            return;
        }
        let newer = self.claims.get(&who).is_none_or(|(seq, _)| a.seq > *seq);
        if newer {
            self.claims.insert(who, (a.seq, env));
            self.check_claim(who);
        }
    }

    /// Keeps a member's newest measurement of a node.
    fn remember_measurement(
        &mut self,
        env: SignedEnvelope,
        m: &Verified<dwcp_reputation::BandwidthMeasurement>,
    ) {
        if !self.measurements.contains_key(&m.subject) && self.measurements.len() >= MAX_MEASURED {
            return;
        }
        self.measurements
            .entry(m.subject)
            .or_default()
            .insert(m.signer(), env);
        self.check_claim(m.subject);
    }

    /// Submits claim evidence against `who` once f+1 members' measurements contradict its
    /// newest claim (checked with the same rule every replica applies), once per claim.
    fn check_claim(&mut self, who: NodeId) {
        let (Some((seq, claim)), Some(by)) = (self.claims.get(&who), self.measurements.get(&who))
        else {
            return;
        };
        if by.len() <= self.committee.f() || self.claims_accused.contains(&(who, *seq)) {
            return;
        }
        let ev = Evidence::ClaimContradicted {
            claim: claim.clone(),
            measurements: by.values().cloned().collect(),
        };
        if ev
            .verify(&self.committee, &dwcp_reputation::Config::default())
            .is_err()
        {
            return;
        }
        let key = (who, *seq);
        info!(node = %who.short(), measurers = by.len(), "measurements contradict a capacity claim; submitting evidence");
        match self.submit(ev.encode()) {
            Ok(_) => {
                self.claims_accused.insert(key);
            }
            Err(e) => warn!(error = %e, "submitting claim evidence failed"),
        }
    }

    /// A member's reply to a request this node submitted (see [`ConsensusReply`]).
    fn on_reply(&mut self, r: &Verified<ConsensusReply>) -> Result<(), &'static str> {
        let nonce = r.message().nonce;
        if !self.waiting.contains_key(&nonce) && !self.probes.contains_key(&nonce) {
            return Ok(()); // answered already, or not ours
        }
        match &r.message().outcome {
            ReplyOutcome::Certified(c) => match self.verifier.open(c) {
                Ok((_, req)) if req.request.signer() == self.me && req.request.nonce == nonce => {
                    self.unanswered.remove(&nonce);
                    if let Some(at) = self.submitted.remove(&nonce) {
                        self.metrics.latency.observe(at.elapsed().as_secs_f64());
                        if let Some(p) = self.probes.remove(&nonce) {
                            let _ = p.send(Ok(at.elapsed()));
                        }
                    }
                    if let Some(w) = self.waiting.remove(&nonce) {
                        let _ = w.reply.send(Ok(c.clone()));
                    }
                    Ok(())
                }
                Ok(_) => Err("certificate_for_another_request"),
                Err(e) => {
                    warn!(member = %r.signer().short(), error = %e, "a member replied with a certificate that does not verify");
                    Err("bad_certificate")
                }
            },
            ReplyOutcome::Refused(why) => {
                let Some(w) = self.waiting.get_mut(&nonce) else {
                    return Ok(());
                };
                w.refusals.insert(r.signer(), why.clone());
                if w.refusals.len() > self.committee.f()
                    && let Some(w) = self.waiting.remove(&nonce)
                {
                    let _ = w.reply.send(Err(anyhow::anyhow!(
                        "the committee refused the decision: {why}"
                    )));
                }
                Ok(())
            }
        }
    }

    async fn on_input(&mut self, i: DriverInput) {
        match i {
            DriverInput::Gossip(m) => {
                let verdict = match decode(&m.data) {
                    Ok(d) => match self.feed(d) {
                        Ok(()) => Validation::Accept,
                        Err(_) => Validation::Ignore,
                    },
                    Err(e) => {
                        self.metrics.dropped.inc();
                        debug!(error = %e, "dropped a consensus gossip message");
                        Validation::Reject
                    }
                };
                let _ = self.client.report_validation(&m, verdict).await;
            }
            DriverInput::Direct { peer, data } => match decode(&data) {
                Ok(d) => {
                    if self.feed(d).is_err() {
                        self.metrics.dropped.inc();
                    }
                }
                Err(e) => {
                    self.metrics.dropped.inc();
                    debug!(%peer, error = %e, "dropped a direct consensus message");
                }
            },
            DriverInput::Submit(op, reply) => {
                let _ = reply.send(self.submit(op));
            }
            DriverInput::Decide(op, reply) => {
                self.waiting.retain(|_, w| !w.reply.is_closed());
                if self.waiting.len() >= MAX_WAITING
                    && let Some((_, old)) = self.waiting.pop_first()
                {
                    let _ = old
                        .reply
                        .send(Err(anyhow::anyhow!("too many decisions waiting")));
                }
                match self.submit(op) {
                    Ok(nonce) => {
                        self.waiting.insert(
                            nonce,
                            Waiter {
                                reply,
                                refusals: BTreeMap::new(),
                            },
                        );
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            DriverInput::Probe(reply) => {
                // Waiters are bounded: the oldest gives up first.
                if self.probes.len() >= 256
                    && let Some((_, old)) = self.probes.pop_first()
                {
                    let _ = old.send(Err(anyhow::anyhow!("too many probes waiting")));
                }
                let mut op = vec![PROBE_TAG];
                op.extend_from_slice(&wall_ms().to_be_bytes());
                match self.submit(op) {
                    Ok(nonce) => {
                        self.probes.insert(nonce, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            DriverInput::Measured { claim, measurement } => {
                // Both go to the other members, which check them as they check any input.
                for m in self.other_members() {
                    self.send(m, claim.encode());
                    self.send(m, measurement.encode());
                }
                for env in [claim, measurement] {
                    if let Ok(d) = decode(&env.encode()) {
                        let _ = self.feed(d);
                    }
                }
            }
            DriverInput::Transfer {
                peer,
                reply: Some(reply),
            } => self.on_transfer(peer, &reply),
            DriverInput::Transfer { peer, reply: None } => {
                // Not a lie: the peer is tried again after the others.
                self.transfer_failed.insert(peer);
            }
        }
    }

    /// `peer` is known to be ahead of this node (two or more epochs, or it holds decisions
    /// this node cannot replay): a snapshot is wanted, and `peer` may serve it.
    fn want_transfer(&mut self, peer: NodeId) {
        if self.rules.is_none() || self.transfer.is_none() || peer == self.me {
            return;
        }
        self.transfer_wanted = true;
        if !self.transfer_peers.contains(&peer) {
            if self.transfer_peers.len() >= MAX_TRANSFER_PEERS
                && let Some(gone) = self.transfer_peers.pop_front()
            {
                // The failed set stays a subset of the known peers (bounded with them).
                self.transfer_failed.remove(&gone);
            }
            self.transfer_peers.push_back(peer);
        }
    }

    /// Asks the first peer known to be ahead that has not failed this node yet (all failed:
    /// start over), at most every [`TRANSFER_EVERY`]. A peer that lies, or cannot serve,
    /// is not asked again before the others, so a Byzantine peer that always speaks first
    /// cannot keep a node from its snapshot.
    fn try_transfer(&mut self) {
        if !self.transfer_wanted
            || self
                .transfer_asked
                .is_some_and(|t| t.elapsed() < TRANSFER_EVERY)
        {
            return;
        }
        if self
            .transfer_peers
            .iter()
            .all(|p| self.transfer_failed.contains(p))
        {
            self.transfer_failed.clear();
        }
        let Some(peer) = self
            .transfer_peers
            .iter()
            .find(|p| !self.transfer_failed.contains(*p))
            .copied()
        else {
            return;
        };
        self.ask_transfer(peer);
    }

    /// Keeps verified epoch links (served to others in turn) and trusts the committees
    /// they name.
    fn keep_links(&mut self, links: &[dwcp_consensus::transfer::EpochLink]) {
        if let Some(t) = &self.transfer {
            for link in links {
                t.store_link(link.next.epoch().saturating_sub(1), link);
            }
        }
        for link in links {
            self.verifier.insert(link.next.clone());
            self.store_committee(&link.next);
        }
    }

    /// Asks `peer` for a certified snapshot; the reply comes back as
    /// [`DriverInput::Transfer`].
    fn ask_transfer(&mut self, peer: NodeId) {
        let Ok(pid) = peer.to_peer_id() else { return };
        self.transfer_asked = Some(Instant::now());
        let req = crate::transfer::TransferRequest {
            known_epoch: self.committee.epoch().max(self.transfer_trusted),
        };
        let mut bytes = Vec::new();
        if ciborium::into_writer(&req, &mut bytes).is_err() {
            return;
        }
        info!(peer = %peer.short(), known_epoch = req.known_epoch, "asking a peer for a certified snapshot (state transfer)");
        let client = self.client.clone();
        let tx = self.self_tx.clone();
        tokio::spawn(async move {
            let reply = client
                .request(pid, Service::StateTransfer, bytes)
                .await
                .map_err(|e| debug!(error = %e, "state-transfer request failed"))
                .ok();
            let _ = tx.send(DriverInput::Transfer { peer, reply }).await;
        });
    }

    /// A peer's snapshot: verified from the current committee through its chain of epoch
    /// links, then installed if it is ahead of this node.
    fn on_transfer(&mut self, peer: NodeId, reply: &[u8]) {
        let Some(rules) = self.rules.clone() else {
            return;
        };
        let known = |e: u64| self.verifier.committee(e);
        let v = match crate::transfer::verify(&known, rules.epoch_length, reply) {
            Ok(crate::transfer::Checked::Snapshot(v)) => *v,
            Ok(crate::transfer::Checked::Page { committee, links }) => {
                // Verified links: keep them (and serve them in turn), trust the committee
                // the last one names, and ask the same peer for the rest at once.
                info!(
                    peer = %peer.short(),
                    links = links.len(),
                    epoch = committee.epoch(),
                    "verified a page of epoch links; asking for the rest"
                );
                self.keep_links(&links);
                self.transfer_trusted = self.transfer_trusted.max(committee.epoch());
                self.metrics.transfer_pages.inc();
                self.ask_transfer(peer);
                return;
            }
            Err(crate::transfer::TransferFailed::NotBehind(epoch)) => {
                debug!(peer = %peer.short(), epoch, "the peer is not ahead of this node");
                // Caught up with it (a lie at worst delays this node until the next traffic
                // from ahead): wanted no more once no known peer is ahead.
                self.transfer_failed.insert(peer);
                if self
                    .transfer_peers
                    .iter()
                    .all(|p| self.transfer_failed.contains(p))
                {
                    self.transfer_wanted = false;
                }
                return;
            }
            Err(crate::transfer::TransferFailed::Refused(why)) => {
                info!(peer = %peer.short(), why, "the peer has no snapshot for this node");
                self.transfer_failed.insert(peer);
                return;
            }
            Err(e) => {
                warn!(peer = %peer.short(), error = %e, "refused a snapshot");
                self.metrics.transfers_refused.inc();
                self.transfer_failed.insert(peer);
                return;
            }
        };
        let seq = v.handover.seq;
        let here = self.engine.as_ref().map_or(0, Engine::last_executed);
        if seq <= here {
            debug!(seq, here, "a snapshot not ahead of this node; ignored");
            // Caught up meanwhile (by replay): nothing more wanted.
            self.transfer_wanted = false;
            return;
        }
        let started = Engine::resume(
            self.ecfg.clone(),
            self.key.clone(),
            v.committee.clone(),
            v.handover.clone(),
        )
        .and_then(|mut e| {
            e.set_end(seq + rules.epoch_length)?;
            Ok(e)
        });
        let mut engine = match started {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "a verified snapshot does not start an engine");
                return;
            }
        };
        engine.handle_timeout(Timestamp(wall_ms()));
        let epoch = v.committee.epoch();
        self.keep_links(&v.links);
        if let (Some(t), Some(genesis)) = (&self.resume, self.verifier.committee(0)) {
            ResumePoint {
                genesis: genesis.members().to_vec(),
                committee: v.committee.clone(),
                end: seq + rules.epoch_length,
                handover: v.handover,
                state: v.state.clone(),
            }
            .store(t);
        }
        self.engine = Some(engine);
        self.old.clear();
        self.pending_link = None;
        self.state = v.state;
        self.committee = v.committee;
        self.forget_former_members();
        self.transferred = Some((seq, epoch, peer));
        // This node's own requests that committed within the skipped decisions are done;
        // their certificates are not here (a waiting caller is told so).
        let me = self.me;
        let done: Vec<u64> = self
            .unanswered
            .keys()
            .copied()
            .filter(|n| {
                self.engine
                    .as_ref()
                    .is_some_and(|e| e.has_executed(&me, *n))
            })
            .collect();
        for n in done {
            self.unanswered.remove(&n);
            self.submitted.remove(&n);
            if let Some(w) = self.waiting.remove(&n) {
                let _ = w.reply.send(Err(anyhow::anyhow!(
                    "committed within the decisions a snapshot skipped; no certificate here"
                )));
            }
            if let Some(p) = self.probes.remove(&n) {
                let _ = p.send(Err(anyhow::anyhow!(
                    "committed within the decisions a snapshot skipped"
                )));
            }
        }
        self.transfer_wanted = false;
        self.transfer_failed.clear();
        self.transfer_peers.clear();
        self.metrics.state_transfers.inc();
        self.metrics.epoch.set(epoch as i64);
        self.metrics.committee.set(self.committee.n() as i64);
        self.refresh_reputation_metrics();
        self.publish_quarantine();
        self.view_dirty = true;
        info!(
            seq,
            epoch,
            links = v.links.len(),
            peer = %peer.short(),
            "installed a certified snapshot (state transfer); fetching the decisions after it"
        );
    }

    /// Keeps a later epoch's committee on disk (certificates of that epoch then verify
    /// after a restart).
    fn store_committee(&self, c: &Committee) {
        if let Some(t) = &self.committees {
            let mut bytes = Vec::new();
            if ciborium::into_writer(c, &mut bytes).is_ok()
                && let Err(e) = t.insert(c.epoch().to_be_bytes(), bytes)
            {
                warn!(error = %e, "could not store the epoch's committee");
            }
        }
    }

    fn submit(&mut self, op: Vec<u8>) -> anyhow::Result<u64> {
        self.next_nonce = self.next_nonce.max(wall_ms()) + 1;
        let nonce = self.next_nonce;
        let req = Verified::sign(&self.key, Request { nonce, op })?;
        let bytes = req.envelope().encode();
        self.submitted.insert(nonce, Instant::now());
        self.unanswered
            .insert(nonce, (Instant::now(), Instant::now(), bytes.clone()));
        while self.unanswered.len() > MAX_UNANSWERED {
            self.unanswered.pop_first();
        }
        if self.submitted.len() > 4096
            && let Some(&oldest) = self.submitted.keys().next()
        {
            self.submitted.remove(&oldest);
        }
        if let Some(e) = self.engine.as_mut() {
            e.handle(Timestamp(wall_ms()), Input::Request(req));
        }
        // Every member gets it (the engine deduplicates by (client, nonce)), so a silent or
        // faulty primary cannot drop it: backups relay it and start their timers.
        let members: Vec<NodeId> = self
            .committee
            .members()
            .iter()
            .copied()
            .filter(|m| *m != self.me)
            .collect();
        for m in members {
            self.send(m, bytes.clone());
        }
        Ok(nonce)
    }

    fn send(&self, to: NodeId, bytes: Vec<u8>) {
        let Ok(pid) = to.to_peer_id() else { return };
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            debug!(to = %to.short(), "too many consensus sends in flight; dropped (the engine retries)");
            return;
        };
        let client = self.client.clone();
        tokio::spawn(async move {
            if let Err(e) = client.request(pid, Service::Consensus, bytes).await {
                debug!(error = %e, "consensus send failed (the engine retries on its timers)");
            }
            drop(permit);
        });
    }

    async fn drain(&mut self) {
        while let Some(c) = self.next_command() {
            match c {
                Command::Broadcast(env) => {
                    if !self.may_send(&env) {
                        continue;
                    }
                    if self.equivocate {
                        self.equivocate_on(&env);
                    }
                    if let Err(e) = self.client.publish(&self.topic, env.encode()).await {
                        debug!(error = %e, "publishing a consensus message failed");
                        // Gossip needs mesh peers; fall back to direct sends.
                        for m in self.other_members() {
                            self.send(m, env.encode());
                        }
                    }
                }
                Command::Send { to, envelope } => {
                    if self.may_send(&envelope) {
                        self.send(to, envelope.encode());
                    }
                }
                Command::Deliver(d) => self.apply(*d),
                Command::ReportPeer { peer, offence } => self.on_offence(peer, offence),
                Command::ViewChangeStarted { view } => {
                    self.view_changes += 1;
                    self.metrics.view_changes.inc();
                    info!(view, "view change started");
                }
                Command::NewViewInstalled { view, primary } => {
                    info!(view, primary = %primary.short(), "new view installed");
                }
                Command::StableCheckpoint { seq, .. } => {
                    debug!(seq, "stable checkpoint");
                    self.complete_link(seq);
                    if let Some(v) = &self.votes {
                        v.prune(seq);
                    }
                }
            }
        }
    }

    /// The checkpoint ending the last epoch became stable at `seq`: its proof completes the
    /// epoch's link, which is kept to serve state transfer.
    fn complete_link(&mut self, seq: u64) {
        if self.pending_link.as_ref().is_none_or(|l| l.seq != seq) {
            return;
        }
        let Some(proof) = self
            .old
            .iter()
            .find_map(|e| e.stable_proof_at(seq))
            .map(<[_]>::to_vec)
        else {
            return;
        };
        let Some(mut link) = self.pending_link.take() else {
            return;
        };
        link.proof = proof;
        let ended = link.next.epoch().saturating_sub(1);
        let Some(len) = self.rules.as_ref().map(|r| r.epoch_length) else {
            return;
        };
        match self.verifier.committee(ended) {
            Some(c) => match link.verify(&c, len) {
                Ok(_) => {
                    if let Some(t) = &self.transfer {
                        t.store_link(ended, &link);
                    }
                }
                Err(e) => warn!(error = %e, ended, "this node's own epoch link does not verify"),
            },
            None => debug!(
                ended,
                "the ended epoch's committee is not known; link not kept"
            ),
        }
    }

    /// Records the votes an outgoing message carries before it leaves; false (message held
    /// back) if one conflicts with a vote cast before a restart or cannot be made durable.
    fn may_send(&self, env: &SignedEnvelope) -> bool {
        let Some(v) = &self.votes else { return true };
        match v.admit(env) {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "held back an outgoing consensus message");
                self.metrics.withheld.inc();
                false
            }
        }
    }

    /// Fault injection: for a prepare or commit this replica broadcasts, sign a second one for
    /// the same slot with another digest and send it directly to every other member.
    fn equivocate_on(&self, env: &SignedEnvelope) {
        let Ok(v) = env.clone().verify::<ConsensusMsg>() else {
            return;
        };
        let mut bad = [0u8; 32];
        for (i, b) in bad.iter_mut().enumerate() {
            *b = (wall_ms() as u8).wrapping_add(i as u8) ^ 0x5a;
        }
        let conflicting = match v.message().clone() {
            ConsensusMsg::Prepare { slot, header } => ConsensusMsg::Prepare {
                slot: dwcp_consensus::Slot {
                    digest: dwcp_consensus::Digest(bad),
                    ..slot
                },
                header,
            },
            ConsensusMsg::Commit(slot) => ConsensusMsg::Commit(dwcp_consensus::Slot {
                digest: dwcp_consensus::Digest(bad),
                ..slot
            }),
            _ => return,
        };
        let Ok(signed) = Verified::sign(&self.key, conflicting) else {
            return;
        };
        let bytes = signed.envelope().encode();
        for m in self.committee.members().iter().filter(|m| **m != self.me) {
            self.send(*m, bytes.clone());
        }
    }

    fn on_offence(&mut self, peer: NodeId, offence: Offence) {
        let ev = match offence {
            Offence::Equivocation { first, second } => Evidence::Equivocation { first, second },
            Offence::ContradictsCertificate { vote, proof } => Evidence::ContradictsCertificate {
                vote,
                proof: *proof,
            },
            Offence::Invalid(why) => {
                warn!(peer = %peer.short(), why, "invalid consensus message from a member");
                return;
            }
        };
        if self.state.is_quarantined(&peer) {
            // Already out: more evidence changes nothing and costs every replica a check.
            return;
        }
        warn!(peer = %peer.short(), "misbehaviour seen; submitting the evidence");
        if self.evidence_pending.insert(peer)
            && let Err(e) = self.submit(ev.encode())
        {
            warn!(error = %e, "submitting evidence failed");
            self.evidence_pending.remove(&peer);
        }
    }

    fn apply(&mut self, d: dwcp_consensus::Decision) {
        self.view_dirty = true;
        self.last_decision = Instant::now();
        self.decisions += 1;
        self.metrics.decisions.inc();
        for r in &d.requests {
            let client = r.signer();
            if client == self.me
                && let Some(at) = {
                    self.unanswered.remove(&r.nonce);
                    self.submitted.remove(&r.nonce)
                }
            {
                self.metrics.latency.observe(at.elapsed().as_secs_f64());
                if let Some(w) = self.probes.remove(&r.nonce) {
                    let _ = w.send(Ok(at.elapsed()));
                }
            }
            let out = self
                .state
                .apply(d.time, d.seq, &self.committee, client, &r.op);
            match &out {
                Applied::Penalised(who) => {
                    self.evidence_pending.remove(who);
                    info!(node = %who.short(), seq = d.seq, "committed evidence applied");
                    if self.state.is_quarantined(who)
                        && let Ok(Evidence::Equivocation { first, second }) =
                            Evidence::decode(&r.op)
                    {
                        self.propose_decision(*who, Grounds::Equivocation { first, second });
                    }
                }
                Applied::Vote {
                    node,
                    votes,
                    quarantined,
                } => {
                    info!(node = %node.short(), votes, quarantined, "committed quarantine vote");
                    self.remember_vote(*node, client, r.envelope().clone());
                    if *quarantined {
                        self.propose_vote_decision(*node);
                    }
                }
                Applied::Decided(node) => {
                    info!(node = %node.short(), seq = d.seq, "quarantine decision committed");
                    self.vote_envs.remove(node);
                    self.record_decision(&d, r, *node, client);
                }
                Applied::Vm { vm, host, state } => {
                    info!(%vm, host = ?host.map(|h| h.short()), state = state.as_str(), seq = d.seq, "vm decision committed");
                    if client == self.me && self.expiring.remove(vm) {
                        self.record_vm(&d, r);
                    }
                }
                Applied::Cut(epoch) => {
                    info!(epoch, seq = d.seq, "compaction cut committed");
                    self.hand_cut_over(&d, r, *epoch);
                }
                Applied::Membership(op) => {
                    debug!(?op, seq = d.seq, "membership operation committed")
                }
                Applied::Rewarded(slot) => {
                    debug!(
                        slot,
                        seq = d.seq,
                        "participation record rewarded its voters"
                    )
                }
                Applied::Nothing(why) => debug!(why, "committed operation changed nothing"),
            }
            self.answer(&d, r, client, &out);
        }
        while let Some(o) = self.state.poll_output() {
            match o {
                dwcp_reputation::Output::Quarantined { node, score } => {
                    warn!(node = %node.short(), score, "node quarantined")
                }
                dwcp_reputation::Output::Released { node } => {
                    info!(node = %node.short(), "node released from quarantine")
                }
                dwcp_reputation::Output::Penalised { .. } => {}
            }
        }
        self.record_participation(&d);
        self.expire_overdue(d.time);
        self.refresh_reputation_metrics();
        self.publish_quarantine();
        self.recent
            .push_back((d.seq, d.view, d.requests.len(), d.time.as_millis()));
        while self.recent.len() > MAX_HISTORY.min(32) {
            self.recent.pop_front();
        }
        // The epoch's last decision (an engine catching up executes many decisions before
        // the driver applies them: switch at the last one, not as soon as the engine ended).
        let next = if self.engine.as_ref().and_then(Engine::end) == Some(d.seq) {
            self.next_committee(&d)
        } else {
            None
        };
        // A checkpoint signs the replicated state (and, at an epoch's end, the next
        // committee): the engine waits for it before signing and executing further.
        if let Some(e) = self.engine.as_mut()
            && e.awaiting_app_state() == Some(d.seq)
        {
            let state = self.state.digest();
            e.on_app_state(
                d.seq,
                dwcp_consensus::transfer::app_digest(&state, next.as_ref()),
            );
            if let Some(next) = &next {
                self.pending_link = Some(dwcp_consensus::transfer::EpochLink {
                    seq: d.seq,
                    log: d.state,
                    clients: e.clients_digest(),
                    app_state: state,
                    next: next.clone(),
                    proof: Vec::new(),
                });
            }
        }
        if let Some(next) = next {
            self.next_epoch(&d, next);
        }
    }

    /// Rewards for correct votes: when slot `d.seq` is on the reward grid and it is this
    /// member's turn, submit the slot's commit certificate as a participation record. Its
    /// voters get +0.01 on every node once it commits (a replica's own certificate cannot be
    /// applied directly: each replica's voter set is the first 2f+1 commits it received).
    /// Not for decisions replayed while catching up (older than a minute of batch time),
    /// nor for an epoch's last slot (its record would commit under the next committee,
    /// against which the certificate does not verify).
    fn record_participation(&mut self, d: &dwcp_consensus::Decision) {
        let turn = dwcp_reputation::participation_turn(d.seq, self.committee.n());
        if turn.is_none()
            || self.committee.index_of(&self.me).map(usize::from) != turn
            || wall_ms().abs_diff(d.time.as_millis()) > 60_000
            || self.engine.as_ref().and_then(Engine::end) == Some(d.seq)
        {
            return;
        }
        let op = Participation {
            proof: d.certificate.proof(),
        }
        .encode();
        match self.submit(op) {
            Ok(_) => self.metrics.participation_records.inc(),
            Err(e) => debug!(error = %e, seq = d.seq, "participation record not submitted"),
        }
    }

    /// The position in its batch and the certificate ([`crate::cert`], compact form) of
    /// request `r` committed in `d`.
    fn certificate_of(
        &self,
        d: &dwcp_consensus::Decision,
        r: &Verified<Request>,
    ) -> Option<(usize, Vec<u8>)> {
        let Some(index) = d.certificate.batch.iter().position(|e| e == r.envelope()) else {
            warn!("a committed request is missing from its certificate's batch");
            return None;
        };
        Some((
            index,
            compact_certificate_for(&d.certificate, &self.committee, index)?,
        ))
    }

    /// Tells the submitter of a committed request what became of it: this node's own waiter,
    /// or (if this node is one of the first f+1 members) a signed [`ConsensusReply`] to a
    /// submitter outside the committee. Members learn their requests' fate themselves.
    fn answer(
        &mut self,
        d: &dwcp_consensus::Decision,
        r: &Verified<Request>,
        client: NodeId,
        out: &Applied,
    ) {
        if client == self.me {
            if let Some(w) = self.waiting.remove(&r.nonce) {
                let res = match out {
                    Applied::Nothing(why) => {
                        Err(anyhow::anyhow!("the committee refused the decision: {why}"))
                    }
                    _ => self
                        .certificate_of(d, r)
                        .map(|(_, c)| c)
                        .ok_or_else(|| anyhow::anyhow!("no certificate for a committed request")),
                };
                let _ = w.reply.send(res);
            }
            return;
        }
        if !self.committee.contains(&self.me) || self.committee.contains(&client) {
            return;
        }
        let answers = self
            .committee
            .members()
            .iter()
            .take(self.committee.f() + 1)
            .any(|m| *m == self.me);
        if !answers {
            return;
        }
        // A probe changes nothing by design: its commit is the answer.
        let probe = r.op.first() == Some(&PROBE_TAG);
        let outcome = match out {
            Applied::Nothing(why) if !probe => ReplyOutcome::Refused(truncate(why, MAX_REASON_LEN)),
            _ => match self.certificate_of(d, r).map(|(_, c)| c) {
                Some(c) => ReplyOutcome::Certified(c),
                None => return,
            },
        };
        match Verified::sign(
            &self.key,
            ConsensusReply {
                nonce: r.nonce,
                outcome,
            },
        ) {
            Ok(reply) => self.send(client, reply.envelope().encode()),
            Err(e) => warn!(error = %e, "could not sign a consensus reply"),
        }
    }

    /// Keeps the signed vote requests against a node until a decision commits: they are the
    /// grounds of that decision.
    fn remember_vote(&mut self, node: NodeId, voter: NodeId, env: SignedEnvelope) {
        if self.state.is_decided(&node) {
            return;
        }
        if !self.vote_envs.contains_key(&node) && self.vote_envs.len() >= MAX_VOTE_TARGETS {
            return;
        }
        self.vote_envs
            .entry(node)
            .or_default()
            .entry(voter)
            .or_insert(env);
    }

    fn propose_vote_decision(&mut self, node: NodeId) {
        let need = self.committee.f() + 1;
        let Some(votes) = self.vote_envs.get(&node) else {
            return;
        };
        if votes.len() < need {
            return;
        }
        let envs: Vec<SignedEnvelope> = votes.values().take(need).cloned().collect();
        self.propose_decision(node, Grounds::Votes(envs));
    }

    /// Submits a quarantine decision with its grounds, if this replica is one of the first
    /// f+1 members in committee order (not counting the node itself): at least one of those
    /// is honest, and the others stay quiet. Replicas apply the first valid decision.
    fn propose_decision(&mut self, node: NodeId, grounds: Grounds) {
        if self.state.is_decided(&node) || !self.decisions_proposed.insert(node) {
            return;
        }
        let proposers = self
            .committee
            .members()
            .iter()
            .filter(|m| **m != node)
            .take(self.committee.f() + 1)
            .any(|m| *m == self.me);
        if !proposers {
            return;
        }
        let reason = match &grounds {
            Grounds::Votes(v) => v
                .first()
                .and_then(|e| e.clone().verify::<Request>().ok())
                .and_then(|r| QuarantineVote::decode(&r.op).ok())
                .map(|v| truncate(&format!("operator votes: {}", v.reason), 64))
                .unwrap_or_else(|| "operator votes".to_owned()),
            Grounds::Equivocation { .. } => "equivocation".to_owned(),
        };
        let op = QuarantineDecisionOp {
            node,
            reason,
            grounds,
        };
        info!(node = %node.short(), "proposing a quarantine decision");
        if let Err(e) = self.submit(op.encode()) {
            warn!(error = %e, "submitting a quarantine decision failed");
            self.decisions_proposed.remove(&node);
        }
    }

    /// Hands the certified decision to state sync, which writes it into the cluster document:
    /// at once when this node submitted it, after [`FALLBACK_WRITE_AFTER`] otherwise (only if
    /// the record has not arrived by then), so normally one node writes it.
    fn record_decision(
        &self,
        d: &dwcp_consensus::Decision,
        r: &Verified<Request>,
        node: NodeId,
        client: NodeId,
    ) {
        // Observers apply the decision too but leave the writing to the members: a cluster of
        // many observers would otherwise write the same record many times.
        if !self.committee.contains(&self.me) {
            return;
        }
        let Some(sync) = &self.sync else { return };
        let Some((index, certificate)) = self.certificate_of(d, r) else {
            return;
        };
        let Ok(op) = QuarantineDecisionOp::decode(&r.op) else {
            return;
        };
        let decision = dwcp_statesync::Certified {
            decision: dwcp_statesync::QuarantineDecision {
                node,
                decision_seq: crate::cert::decision_seq(d.seq, index as u32),
                quarantined: true,
                reason: op.reason,
            },
            certificate,
        };
        let delay = if client == self.me {
            Duration::ZERO
        } else {
            FALLBACK_WRITE_AFTER
        };
        if !sync.offer(crate::statesync::Input::Quarantine { decision, delay }) {
            warn!(node = %node.short(), "state-sync queue full: quarantine record not handed over");
        }
    }

    /// Submits `failed` for placements still not `running` [`PLACED_TTL_MS`] after they
    /// committed, if this replica is one of the first f+1 members (at least one is honest; the
    /// first decision that commits ends the VM, the others are refused as repeats).
    fn expire_overdue(&mut self, now: Timestamp) {
        if !self.committee.contains(&self.me)
            || !self
                .committee
                .members()
                .iter()
                .take(self.committee.f() + 1)
                .any(|m| *m == self.me)
        {
            return;
        }
        // Ours that another member's decision ended are done.
        let state = &self.state;
        self.expiring.retain(|vm| state.vm_host(vm).is_some());
        let room = MAX_EXPIRING.saturating_sub(self.expiring.len());
        let overdue: Vec<VmDecisionOp> = self
            .state
            .overdue(now, MAX_EXPIRING)
            .into_iter()
            .filter(|op| !self.expiring.contains(&op.vm))
            .take(room)
            .collect();
        for op in overdue {
            warn!(vm = %op.vm, host = ?op.host.map(|h| h.short()), "placement never reported running; submitting `failed`");
            match self.submit(op.encode()) {
                Ok(_) => {
                    self.expiring.insert(op.vm);
                }
                Err(e) => warn!(error = %e, "submitting a vm decision failed"),
            }
        }
    }

    /// Writes the record of a VM decision this node submitted into the cluster document.
    fn record_vm(&self, d: &dwcp_consensus::Decision, r: &Verified<Request>) {
        let Some(sync) = &self.sync else { return };
        let Some((_, certificate)) = self.certificate_of(d, r) else {
            return;
        };
        match self.verifier.verify_vm(&certificate) {
            Ok(decision) => {
                if !sync.offer(crate::statesync::Input::Vm(dwcp_statesync::Certified {
                    decision,
                    certificate,
                })) {
                    warn!("state-sync queue full: vm record not handed over");
                }
            }
            Err(e) => warn!(error = %e, "the certificate of our own vm decision does not verify"),
        }
    }

    /// Hands a committed compaction cut with its certificate to state sync, which keeps it
    /// (to answer nodes outside the committee) and compacts once it holds the heads.
    fn hand_cut_over(&self, d: &dwcp_consensus::Decision, r: &Verified<Request>, epoch: u64) {
        let Some(sync) = &self.sync else { return };
        let Some((_, certificate)) = self.certificate_of(d, r) else {
            return;
        };
        if !sync.offer(crate::statesync::Input::Cut(certificate)) {
            warn!(
                epoch,
                "state-sync queue full: compaction cut not handed over"
            );
        }
    }

    fn known_nodes(&self) -> BTreeSet<NodeId> {
        let mut s: BTreeSet<NodeId> = self.committee.members().iter().copied().collect();
        s.extend(self.state.offences.keys().copied());
        s.extend(self.state.votes.keys().copied());
        s
    }

    /// Shares the quarantined set with the daemon (placement, peer manager) and closes the
    /// connections of newly quarantined nodes.
    fn publish_quarantine(&self) {
        let now: BTreeSet<NodeId> = self
            .known_nodes()
            .into_iter()
            .filter(|n| self.state.is_quarantined(n))
            .collect();
        let before = self.quarantined.borrow().clone();
        for n in now.difference(&before) {
            if *n != self.me
                && let Ok(pid) = n.to_peer_id()
            {
                let client = self.client.clone();
                tokio::spawn(async move {
                    let _ = client.disconnect(pid).await;
                });
            }
        }
        if now != before {
            self.quarantined.send_replace(now);
        }
    }

    fn refresh_reputation_metrics(&self) {
        let nodes = self.known_nodes();
        let mut q = 0;
        for n in &nodes {
            if self.state.is_quarantined(n) {
                q += 1;
            }
            self.metrics
                .score
                .with_label_values(&[&n.short()])
                .set((self.state.score(n) * 10_000.0).round() as i64);
        }
        self.metrics.quarantined.set(q);
    }

    fn status(&self) -> QuorumStatus {
        let (heard_ms, obs) = self.observe();
        let c = &self.committee;
        let e = self.engine.as_ref();
        QuorumStatus {
            node: self.me,
            replica: c.contains(&self.me),
            epoch: c.epoch(),
            members: c.members().to_vec(),
            n: c.n(),
            f: c.f(),
            quorum: c.quorum(),
            view: e.map(Engine::view_in_epoch).unwrap_or(0),
            epoch_ends_at: e.and_then(Engine::end),
            joined: self.state.membership.len(),
            ready: self.state.membership.nodes().filter(|(_, r)| *r).count(),
            resumed_from: self.resumed_from,
            catch_up_gap: e.and_then(Engine::catch_up_gap),
            transferred: self.transferred,
            transfers_refused: self.metrics.transfers_refused.get(),
            primary: e.map(|e| e.primary()),
            view_active: e.is_some_and(|e| e.is_view_active()),
            last_executed: e.map(|e| e.last_executed()).unwrap_or(0),
            stable_checkpoint: e.map(|e| e.low_watermark()).unwrap_or(0),
            pending_requests: e.map(|e| e.pending_requests()).unwrap_or(0),
            decisions: self.decisions,
            view_changes: self.view_changes,
            recent: self.recent.iter().copied().collect(),
            quiet_ms: obs.quiet_ms,
            heard_ms,
            heard: obs.heard,
            stall_after_ms: self.stall_after_ms,
            stall: crate::stall::diagnose(&obs, self.stall_after_ms),
        }
    }

    /// Per member of the current committee, milliseconds since it was last heard from (0
    /// for this node), and what the stall diagnosis reads.
    fn observe(&self) -> (Vec<Option<u64>>, crate::stall::Observed) {
        let now = Instant::now();
        let heard_ms: Vec<Option<u64>> = self
            .committee
            .members()
            .iter()
            .map(|m| {
                if *m == self.me {
                    Some(0)
                } else {
                    self.heard
                        .get(m)
                        .map(|t| now.duration_since(*t).as_millis() as u64)
                }
            })
            .collect();
        let e = self.engine.as_ref();
        let view_active = e.is_some_and(|e| e.is_view_active());
        let obs = crate::stall::Observed {
            waiting: !self.unanswered.is_empty()
                || e.is_some_and(|e| e.pending_requests() > 0)
                || (self.committee.contains(&self.me) && !view_active),
            quiet_ms: now.duration_since(self.last_decision).as_millis() as u64,
            heard: heard_ms
                .iter()
                .filter(|a| a.is_some_and(|a| a <= self.stall_after_ms))
                .count(),
            quorum: self.committee.quorum(),
            view_active,
        };
        (heard_ms, obs)
    }

    /// After a committee change: last-heard times are kept for members only.
    fn forget_former_members(&mut self) {
        let committee = &self.committee;
        self.heard.retain(|m, _| committee.contains(m));
    }

    /// Updates the stall gauges, and logs a stall once when it starts and when it ends.
    fn check_stall(&mut self) {
        let (_, obs) = self.observe();
        self.metrics.members_heard.set(obs.heard as i64);
        let stall = crate::stall::diagnose(&obs, self.stall_after_ms);
        self.metrics.stalled.set(i64::from(stall.is_some()));
        match (stall, self.stalled) {
            (Some(s), false) => {
                warn!(
                    quiet_s = s.quiet_ms / 1000,
                    cause = %s.cause,
                    "consensus stalled: no decision while work waits (dwcp-cli consensus quorum-status)"
                );
                self.stalled = true;
                self.view_dirty = true;
            }
            (None, true) => {
                info!("consensus resumed: decisions flow again, or nothing waits");
                self.stalled = false;
                self.view_dirty = true;
            }
            _ => {}
        }
    }

    fn reputation_rows(&self) -> Vec<ReputationRow> {
        self.known_nodes()
            .into_iter()
            .map(|n| ReputationRow {
                node: n,
                score: self.state.score(&n),
                quarantined: self.state.is_quarantined(&n),
                offences: self.state.offences.get(&n).cloned().unwrap_or_default(),
                votes: self
                    .state
                    .votes
                    .get(&n)
                    .map(|v| v.iter().map(|(k, r)| (*k, r.clone())).collect())
                    .unwrap_or_default(),
            })
            .collect()
    }
}

/// Local API routes of consensus and reputation.
pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/consensus/status", get(api_status))
        .route("/v1/consensus/probe", post(api_probe))
        .route("/v1/reputation", get(api_reputation))
        .route("/v1/reputation/{node}", get(api_reputation_node))
        .route("/v1/reputation/quarantine", post(api_quarantine))
}

use crate::api::err as fail;

fn off() -> Response {
    fail(
        StatusCode::SERVICE_UNAVAILABLE,
        "consensus is off on this node: no committee configured (acp.committee)",
    )
}

async fn api_status(State(s): State<Arc<Shared>>) -> Response {
    let Some(c) = s.consensus() else { return off() };
    let v = c.view.borrow().clone();
    match &v.status {
        Some(st) => Json(st).into_response(),
        None => fail(StatusCode::SERVICE_UNAVAILABLE, "consensus is starting"),
    }
}

/// `POST /v1/consensus/probe`: commits a no-op request and answers with its latency.
async fn api_probe(State(s): State<Arc<Shared>>) -> Response {
    let Some(c) = s.consensus() else { return off() };
    let (tx, rx) = oneshot::channel();
    if c.tx.send(DriverInput::Probe(tx)).await.is_err() {
        return fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "the consensus driver has stopped",
        );
    }
    match tokio::time::timeout(Duration::from_secs(30), rx).await {
        Ok(Ok(Ok(d))) => {
            Json(serde_json::json!({ "committed": true, "latency_ms": d.as_secs_f64() * 1e3 }))
                .into_response()
        }
        Ok(Ok(Err(e))) => fail(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
        Ok(Err(_)) => fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "the consensus driver has stopped",
        ),
        Err(_) => fail(
            StatusCode::GATEWAY_TIMEOUT,
            "the probe did not commit within 30 s (no quorum reachable?)",
        ),
    }
}

async fn api_reputation(State(s): State<Arc<Shared>>) -> Response {
    let Some(c) = s.consensus() else { return off() };
    let v = c.view.borrow().clone();
    Json(v.reputation.clone()).into_response()
}

async fn api_reputation_node(State(s): State<Arc<Shared>>, Path(node): Path<String>) -> Response {
    let Some(c) = s.consensus() else { return off() };
    let Ok(row) = node.parse::<NodeId>() else {
        return fail(
            StatusCode::BAD_REQUEST,
            format!("`{node}` is not a node id (resolve prefixes with GET /v1/nodes/{{id}})"),
        );
    };
    let v = c.view.borrow().clone();
    let r = v
        .reputation
        .iter()
        .find(|r| r.node == row)
        .cloned()
        .unwrap_or(ReputationRow {
            node: row,
            score: 1.0,
            quarantined: false,
            offences: Vec::new(),
            votes: Vec::new(),
        });
    Json(r).into_response()
}

async fn api_quarantine(
    State(s): State<Arc<Shared>>,
    Json(req): Json<QuarantineRequest>,
) -> Response {
    let Some(c) = s.consensus() else { return off() };
    if req.reason.is_empty() || req.reason.len() > MAX_REASON_LEN {
        return fail(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the reason must be 1 to {MAX_REASON_LEN} bytes"),
        );
    }
    let op = QuarantineVote {
        node: req.node,
        reason: req.reason,
    }
    .encode();
    match c.ask(|r| DriverInput::Submit(op, r)).await {
        Ok(Ok(nonce)) => {
            Json(serde_json::json!({ "submitted": true, "nonce": nonce })).into_response()
        }
        Ok(Err(e)) | Err(e) => fail(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u8) -> Vec<NodeKey> {
        (1..=n)
            .map(|i| NodeKey::from_secret_bytes([i; 32]))
            .collect()
    }

    #[test]
    fn quarantine_votes_need_f_plus_one_distinct_voters() {
        let keys = ids(4);
        let committee = Committee::new(0, keys.iter().map(|k| k.node_id()).collect()).unwrap();
        assert_eq!(committee.f(), 1);
        let victim = keys[3].node_id();
        let op = QuarantineVote {
            node: victim,
            reason: "vote_manipulation".into(),
        }
        .encode();
        let mut s = AcpState::new();
        let t = Timestamp(1_000);
        // One voter, even repeating itself, is not enough.
        for seq in 1..=3 {
            let a = s.apply(t, seq, &committee, keys[0].node_id(), &op);
            assert!(
                matches!(
                    a,
                    Applied::Vote {
                        votes: 1,
                        quarantined: false,
                        ..
                    }
                ),
                "{a:?}"
            );
        }
        assert!(!s.is_quarantined(&victim));
        let a = s.apply(t, 4, &committee, keys[1].node_id(), &op);
        assert!(
            matches!(
                a,
                Applied::Vote {
                    votes: 2,
                    quarantined: true,
                    ..
                }
            ),
            "{a:?}"
        );
        assert!(s.is_quarantined(&victim));
    }

    #[test]
    fn participation_records_reward_voters_once_and_only_on_the_grid() {
        let keys = ids(4);
        let committee = Committee::new(0, keys.iter().map(|k| k.node_id()).collect()).unwrap();
        let primary = keys
            .iter()
            .find(|k| k.node_id() == committee.primary(0))
            .unwrap();
        let sign = |k: &NodeKey, m: ConsensusMsg| Verified::sign(k, m).unwrap().envelope().clone();
        let slot = |seq: u64, d: u8| dwcp_consensus::Slot {
            view: 0,
            seq,
            digest: dwcp_consensus::Digest([d; 32]),
        };
        let proof = |seq: u64, voters: &[usize]| {
            let pp = dwcp_consensus::PrePrepare {
                slot: slot(seq, 7),
                time: Timestamp(0),
            };
            dwcp_consensus::CommitProof {
                pre_prepare: sign(primary, ConsensusMsg::PrePrepare(pp)),
                commits: voters
                    .iter()
                    .map(|i| sign(&keys[*i], ConsensusMsg::Commit(slot(seq, 7))))
                    .collect(),
            }
        };
        let record = |seq: u64, voters: &[usize]| {
            Participation {
                proof: proof(seq, voters),
            }
            .encode()
        };
        let mut s = AcpState::new();
        let t = Timestamp(1_000);
        let (voter, absent) = (keys[1].node_id(), keys[3].node_id());
        // Bring the voter below the cap (1.0) so a reward shows: a commit contradicting a
        // committed certificate, -0.10.
        let ev = Evidence::ContradictsCertificate {
            vote: sign(&keys[1], ConsensusMsg::Commit(slot(5, 9))),
            proof: proof(5, &[0, 2, 3]),
        };
        let a = s.apply(t, 6, &committee, keys[0].node_id(), &ev.encode());
        assert_eq!(a, Applied::Penalised(voter));
        assert_eq!(s.reputation.score_units(&voter), 9_000);

        use dwcp_reputation::PARTICIPATION_EVERY;
        let on_grid = record(PARTICIPATION_EVERY, &[0, 1, 2]);
        let a = s.apply(t, 12, &committee, keys[2].node_id(), &on_grid);
        assert_eq!(a, Applied::Rewarded(PARTICIPATION_EVERY));
        assert_eq!(s.reputation.score_units(&voter), 9_100, "+0.01");
        assert_eq!(s.reputation.score_units(&absent), 10_000);
        // The same slot again, from anyone: once.
        let a = s.apply(t, 13, &committee, keys[0].node_id(), &on_grid);
        assert!(
            matches!(a, Applied::Nothing(ref w) if w.contains("already")),
            "{a:?}"
        );
        // Off the grid, short of a quorum, or not a record: nothing.
        for (op, why) in [
            (record(PARTICIPATION_EVERY + 1, &[0, 1, 2]), "grid"),
            (record(2 * PARTICIPATION_EVERY, &[0, 1]), "refused"),
            (vec![PARTICIPATION_OP_TAG, 0xff], "refused"),
        ] {
            let a = s.apply(t, 30, &committee, keys[0].node_id(), &op);
            assert!(
                matches!(a, Applied::Nothing(ref w) if w.contains(why)),
                "{a:?}"
            );
        }
        assert_eq!(s.reputation.score_units(&voter), 9_100);
        assert_eq!(dwcp_reputation::participation_turn(20, 4), Some(2));
        assert_eq!(dwcp_reputation::participation_turn(21, 4), None);
    }

    fn cut_op(keys: &[NodeKey], endorsers: &[usize], epoch: u64, departed: u64) -> Vec<u8> {
        let cut = crate::cert::CutSpec {
            epoch,
            heads: vec![[7; 32]],
            departed_before_ms: departed,
            base: [8; 32],
        };
        let endorsements = endorsers
            .iter()
            .map(|i| {
                Verified::sign(
                    &keys[*i],
                    Request {
                        nonce: epoch,
                        op: cut.endorsement_op(),
                    },
                )
                .unwrap()
                .envelope()
                .clone()
            })
            .collect();
        CutDecisionOp { cut, endorsements }.encode()
    }

    #[test]
    fn compaction_cuts_apply_once_per_epoch_in_order() {
        let keys = ids(5);
        let committee = Committee::new(0, keys[..4].iter().map(|k| k.node_id()).collect()).unwrap();
        let mut s = AcpState::new();
        let t = Timestamp(10_000);
        let by = keys[0].node_id();
        // Not the next epoch, too few endorsers, a non-member endorser, a bound in the future.
        let refused = [
            cut_op(&keys, &[0, 1], 2, 5_000),
            cut_op(&keys, &[0], 1, 5_000),
            cut_op(&keys, &[0, 4], 1, 5_000),
            cut_op(&keys, &[0, 0], 1, 5_000),
            cut_op(&keys, &[0, 1], 1, 20_000),
        ];
        for (i, op) in refused.iter().enumerate() {
            let a = s.apply(t, i as u64, &committee, by, op);
            assert!(matches!(a, Applied::Nothing(_)), "case {i}: {a:?}");
            assert_eq!(s.cut_epoch(), 0);
        }
        assert_eq!(
            s.apply(t, 10, &committee, by, &cut_op(&keys, &[2, 1], 1, 5_000)),
            Applied::Cut(1)
        );
        assert_eq!(s.cut_epoch(), 1);
        // A second valid cut for epoch 1 (another proposer, later in the log) is ignored.
        let again = s.apply(t, 11, &committee, by, &cut_op(&keys, &[0, 3], 1, 4_000));
        assert!(matches!(again, Applied::Nothing(_)), "{again:?}");
        assert_eq!(
            s.apply(t, 12, &committee, by, &cut_op(&keys, &[0, 3], 2, 4_000)),
            Applied::Cut(2)
        );
        // Endorsements of another cut do not count for this one.
        let mut op = CutDecisionOp::decode(&cut_op(&keys, &[0, 1], 3, 1)).unwrap();
        op.cut.departed_before_ms = 2;
        let a = s.apply(t, 13, &committee, by, &op.encode());
        assert!(matches!(a, Applied::Nothing(_)), "{a:?}");
        assert_eq!(s.cut_epoch(), 2);
    }

    #[test]
    fn non_member_votes_do_not_count_and_the_first_valid_decision_wins() {
        let keys = ids(6);
        let committee = Committee::new(0, keys[..4].iter().map(|k| k.node_id()).collect()).unwrap();
        let victim = keys[3].node_id();
        let op = QuarantineVote {
            node: victim,
            reason: "r".into(),
        }
        .encode();
        let mut s = AcpState::new();
        let t = Timestamp(1);
        // Two outsiders (keys 4 and 5) cannot quarantine a member.
        for k in &keys[4..] {
            let a = s.apply(t, 1, &committee, k.node_id(), &op);
            assert!(matches!(a, Applied::Nothing(_)), "{a:?}");
        }
        assert!(!s.is_quarantined(&victim));
        // A decision needs valid grounds: one member's vote is not enough.
        let sign = |i: usize| {
            Verified::sign(
                &keys[i],
                Request {
                    nonce: 1,
                    op: op.clone(),
                },
            )
            .unwrap()
            .envelope()
            .clone()
        };
        let weak = QuarantineDecisionOp {
            node: victim,
            reason: "r".into(),
            grounds: Grounds::Votes(vec![sign(0)]),
        };
        let a = s.apply(t, 2, &committee, keys[0].node_id(), &weak.encode());
        assert!(matches!(a, Applied::Nothing(_)), "{a:?}");
        assert!(!s.is_decided(&victim) && !s.is_quarantined(&victim));
        // f+1 = 2 member votes: applied once, quarantines; a second decision is ignored.
        let good = QuarantineDecisionOp {
            grounds: Grounds::Votes(vec![sign(0), sign(1)]),
            ..weak
        };
        let a = s.apply(t, 3, &committee, keys[1].node_id(), &good.encode());
        assert_eq!(a, Applied::Decided(victim));
        assert!(s.is_decided(&victim) && s.is_quarantined(&victim));
        let a = s.apply(t, 4, &committee, keys[2].node_id(), &good.encode());
        assert!(matches!(a, Applied::Nothing(_)), "{a:?}");
    }

    fn vm_op(vm: u8, host: Option<NodeId>, state: VmState) -> Vec<u8> {
        VmDecisionOp {
            vm: VmId::from_bytes([vm; 16]),
            vcpus: 1,
            memory_mib: 128,
            disk_gib: 0,
            host,
            state: state.as_str().to_owned(),
        }
        .encode()
    }

    #[test]
    fn placements_never_reported_running_become_overdue() {
        let keys = ids(4);
        let committee = Committee::new(0, keys.iter().map(|k| k.node_id()).collect()).unwrap();
        let host = Some(keys[1].node_id());
        let by = keys[0].node_id();
        let mut s = AcpState::new();
        let t0 = Timestamp(1_000_000);
        for vm in [1u8, 2, 3] {
            s.apply(
                t0,
                u64::from(vm),
                &committee,
                by,
                &vm_op(vm, host, VmState::Placed),
            );
        }
        // VM 2's host reports it running; VM 3 is stopped.
        let t1 = Timestamp(t0.as_millis() + 60_000);
        s.apply(t1, 4, &committee, by, &vm_op(2, host, VmState::Running));
        s.apply(t1, 5, &committee, by, &vm_op(3, host, VmState::Stopped));
        // Just before the deadline nothing is overdue; at it, only VM 1.
        let deadline = t0.as_millis() + PLACED_TTL_MS;
        assert!(s.overdue(Timestamp(deadline - 1), 10).is_empty());
        let due = s.overdue(Timestamp(deadline), 10);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].vm, VmId::from_bytes([1; 16]));
        assert_eq!(due[0].state, "failed");
        assert_eq!(due[0].host, host);
        assert!(s.overdue(Timestamp(deadline), 0).is_empty());
        // Its `failed` decision applies and ends it; the list is empty afterwards, and a
        // second `failed` for it is refused.
        let failed = due[0].encode();
        assert!(matches!(
            s.apply(Timestamp(deadline), 6, &committee, by, &failed),
            Applied::Vm {
                state: VmState::Failed,
                ..
            }
        ));
        assert!(
            s.overdue(Timestamp(deadline + PLACED_TTL_MS), 10)
                .is_empty()
        );
        assert!(matches!(
            s.apply(Timestamp(deadline), 7, &committee, by, &failed),
            Applied::Nothing(_)
        ));
    }

    #[test]
    fn vm_decisions_follow_the_lifecycle_rules() {
        let keys = ids(5);
        let committee = Committee::new(0, keys[..4].iter().map(|k| k.node_id()).collect()).unwrap();
        let outsider = keys[4].node_id();
        let (h1, h2) = (keys[1].node_id(), keys[2].node_id());
        let mut s = AcpState::new();
        let apply =
            |s: &mut AcpState, op: Vec<u8>| s.apply(Timestamp(1), 1, &committee, outsider, &op);
        let refused = |a: Applied, why: &str| match a {
            Applied::Nothing(w) => assert!(w.contains(why), "{w} (wanted {why})"),
            other => panic!("{other:?} (wanted refusal: {why})"),
        };
        // Later states need a placed VM; a placement needs a host.
        refused(
            apply(&mut s, vm_op(1, Some(h1), VmState::Running)),
            "unknown vm",
        );
        refused(
            apply(&mut s, vm_op(1, None, VmState::Placed)),
            "needs a host",
        );
        refused(
            apply(&mut s, vm_op(1, Some(h1), VmState::Pending)),
            "not a decision",
        );
        // Placed once, by a node outside the committee too.
        assert_eq!(
            apply(&mut s, vm_op(1, Some(h1), VmState::Placed)),
            Applied::Vm {
                vm: VmId::from_bytes([1; 16]),
                host: Some(h1),
                state: VmState::Placed
            }
        );
        assert_eq!(s.vm_host(&VmId::from_bytes([1; 16])), Some(Some(h1)));
        refused(
            apply(&mut s, vm_op(1, Some(h2), VmState::Placed)),
            "already placed",
        );
        // Migrating moves it; stopped ends it; then it is unknown again.
        assert!(matches!(
            apply(&mut s, vm_op(1, Some(h2), VmState::Migrating)),
            Applied::Vm { .. }
        ));
        assert_eq!(s.vm_host(&VmId::from_bytes([1; 16])), Some(Some(h2)));
        assert!(matches!(
            apply(&mut s, vm_op(1, Some(h2), VmState::Stopped)),
            Applied::Vm { .. }
        ));
        assert_eq!(s.vm_host(&VmId::from_bytes([1; 16])), None);
        refused(
            apply(&mut s, vm_op(1, Some(h2), VmState::Failed)),
            "unknown vm",
        );
        // No placement on a quarantined host, and none from a quarantined submitter.
        for voter in [0, 3] {
            let vote = QuarantineVote {
                node: h1,
                reason: "test".into(),
            }
            .encode();
            s.apply(Timestamp(1), 2, &committee, keys[voter].node_id(), &vote);
        }
        assert!(s.is_quarantined(&h1));
        refused(
            apply(&mut s, vm_op(2, Some(h1), VmState::Placed)),
            "quarantined",
        );
        let from_quarantined = s.apply(
            Timestamp(1),
            3,
            &committee,
            h1,
            &vm_op(3, Some(h2), VmState::Placed),
        );
        refused(from_quarantined, "quarantined node");
        // Garbage after the tag is refused, never a panic.
        refused(
            apply(&mut s, vec![VM_DECISION_TAG, 0xff, 0x00]),
            "vm decision refused",
        );
    }

    #[test]
    fn consensus_replies_are_bounded_and_signed() {
        let key = NodeKey::from_secret_bytes([9; 32]);
        let ok = ConsensusReply {
            nonce: 7,
            outcome: ReplyOutcome::Refused("the host is quarantined".into()),
        };
        let env = Verified::sign(&key, ok.clone())
            .unwrap()
            .envelope()
            .encode();
        match decode(&env) {
            Ok(Decoded::Reply(r)) => {
                assert_eq!(r.message(), &ok);
                assert_eq!(r.signer(), key.node_id());
            }
            _ => panic!("a signed reply did not decode as one"),
        }
        let big = ConsensusReply {
            nonce: 7,
            outcome: ReplyOutcome::Certified(vec![0; MAX_CERTIFICATE_BYTES + 1]),
        };
        assert!(Verified::sign(&key, big).is_err());
        let long = ConsensusReply {
            nonce: 7,
            outcome: ReplyOutcome::Refused("x".repeat(MAX_REASON_LEN + 1)),
        };
        assert!(Verified::sign(&key, long).is_err());
        let mut forged = env.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert!(decode(&forged).is_err());
    }

    #[test]
    fn a_resume_point_of_another_cluster_or_epoch_length_is_refused() {
        let keys = ids(4);
        let genesis = Committee::new(0, keys.iter().map(|k| k.node_id()).collect()).unwrap();
        let epoch1 = Committee::new(1, genesis.members().to_vec()).unwrap();
        // A hand-over at seq 20, as an engine would serialize it.
        let h = ciborium::Value::Map(vec![
            ("seq".into(), 20u64.into()),
            ("state".into(), ciborium::Value::Bytes(vec![7; 32])),
            ("clients".into(), ciborium::Value::Map(vec![])),
        ]);
        let mut hb = Vec::new();
        ciborium::into_writer(&h, &mut hb).unwrap();
        let handover: dwcp_consensus::Handover = ciborium::from_reader(&hb[..]).unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let t = db.open_tree("consensus_resume").unwrap();
        ResumePoint {
            genesis: genesis.members().to_vec(),
            committee: epoch1.clone(),
            end: 40,
            handover,
            state: AcpState::new(),
        }
        .store(&t);
        let p = ResumePoint::load(&t).expect("stored point loads");
        assert_eq!(p.committee, epoch1);
        let cfg = dwcp_consensus::Config {
            checkpoint_interval: 10,
            log_window: 20,
            ..dwcp_consensus::Config::default()
        }
        .validate()
        .unwrap();
        let rules = |len| EpochRules {
            epoch_length: len,
            size: 4,
            eligibility: dwcp_consensus::committee::Eligibility::default(),
        };
        let e = p.engine(&cfg, &keys[0], &rules(20), &genesis).unwrap();
        assert_eq!(e.last_executed(), 20);
        assert_eq!(e.end(), Some(40));
        // Another cluster's genesis, or another epoch length: refused (replay from genesis).
        let other = Committee::new(0, ids(5)[1..].iter().map(|k| k.node_id()).collect()).unwrap();
        assert!(p.engine(&cfg, &keys[0], &rules(20), &other).is_err());
        assert!(p.engine(&cfg, &keys[0], &rules(30), &genesis).is_err());
    }

    #[test]
    fn a_missing_or_corrupt_resume_point_means_genesis() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let t = db.open_tree("consensus_resume").unwrap();
        assert!(ResumePoint::load(&t).is_none());
        t.insert(RESUME_KEY, vec![0xa4, 0x00, 0xff]).unwrap();
        assert!(
            ResumePoint::load(&t).is_none(),
            "garbage is ignored, not fatal"
        );
    }

    #[test]
    fn stored_committees_load_and_bad_entries_are_skipped() {
        let keys = ids(5);
        let c2 = Committee::new(2, keys[1..].iter().map(|k| k.node_id()).collect()).unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let t = db.open_tree("consensus_committees").unwrap();
        let mut good = Vec::new();
        ciborium::into_writer(&c2, &mut good).unwrap();
        t.insert(2u64.to_be_bytes(), good.clone()).unwrap();
        // Stored under another epoch's key, and garbage: both skipped.
        t.insert(3u64.to_be_bytes(), good).unwrap();
        t.insert(4u64.to_be_bytes(), vec![0xff, 0x00]).unwrap();
        let v = CommitteeVerifier::new(None);
        load_committees(&t, &v);
        assert_eq!(v.committee(2), Some(c2));
        assert_eq!(v.committee(3), None);
        assert_eq!(v.committee(4), None);
    }

    #[test]
    fn membership_operations_speak_only_for_their_signer() {
        let keys = ids(4);
        let committee = Committee::new(0, keys.iter().map(|k| k.node_id()).collect()).unwrap();
        let (a, b) = (keys[0].node_id(), keys[1].node_id());
        let mut s = AcpState::new();
        // Another node's join or readiness is refused; malformed bodies too.
        for (client, op) in [
            (a, MembershipOp::Join(b).encode()),
            (a, MembershipOp::Ready(b, true).encode()),
            (a, vec![MEMBERSHIP_OP_TAG, 0xff]),
            (a, [MembershipOp::Join(a).encode(), vec![0]].concat()),
        ] {
            let out = s.apply(Timestamp(1), 1, &committee, client, &op);
            assert!(matches!(out, Applied::Nothing(_)), "{out:?}");
        }
        assert!(s.membership().is_empty());
        let out = s.apply(
            Timestamp(2),
            2,
            &committee,
            b,
            &MembershipOp::Ready(b, true).encode(),
        );
        assert_eq!(out, Applied::Membership(MembershipOp::Ready(b, true)));
        assert_eq!(s.membership().nodes().collect::<Vec<_>>(), vec![(&b, true)]);
        s.apply(
            Timestamp(3),
            3,
            &committee,
            b,
            &MembershipOp::Leave(b).encode(),
        );
        assert!(s.membership().is_empty());
    }

    #[test]
    fn malformed_operations_change_nothing() {
        let keys = ids(4);
        let committee = Committee::new(0, keys.iter().map(|k| k.node_id()).collect()).unwrap();
        let mut s = AcpState::new();
        for op in [
            vec![],
            vec![0x00, 1, 2],
            vec![QUARANTINE_VOTE_TAG, 0xff, 0xff],
            vec![EVIDENCE_OP_TAG, 0xa0],
        ] {
            let a = s.apply(Timestamp(1), 1, &committee, keys[0].node_id(), &op);
            assert!(matches!(a, Applied::Nothing(_)), "{op:?}: {a:?}");
        }
        let long = QuarantineVote {
            node: keys[1].node_id(),
            reason: "x".repeat(MAX_REASON_LEN + 1),
        }
        .encode();
        assert!(QuarantineVote::decode(&long).is_err());
        assert!(keys.iter().all(|k| !s.is_quarantined(&k.node_id())));
    }

    #[test]
    fn equal_committed_inputs_give_equal_state_on_every_replica() {
        let keys = ids(4);
        let committee = Committee::new(0, keys.iter().map(|k| k.node_id()).collect()).unwrap();
        let ops: Vec<(NodeId, Vec<u8>)> = (0..3)
            .map(|i| {
                (
                    keys[i].node_id(),
                    QuarantineVote {
                        node: keys[3].node_id(),
                        reason: format!("r{i}"),
                    }
                    .encode(),
                )
            })
            .collect();
        let run = || {
            let mut s = AcpState::new();
            for (i, (c, op)) in ops.iter().enumerate() {
                s.apply(Timestamp(10 * i as u64), i as u64, &committee, *c, op);
            }
            keys.iter()
                .map(|k| (s.score(&k.node_id()), s.is_quarantined(&k.node_id())))
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        // And that state is the rule's outcome, not merely repeatable: three distinct voters
        // (>= f+1) quarantine node 3, nobody else is touched.
        assert_eq!(a[3], (1.0, true), "{a:?}");
        assert!(a[..3].iter().all(|x| *x == (1.0, false)), "{a:?}");
    }

    #[test]
    fn a_configured_committee_must_parse() {
        let mut cfg = AcpSection::default();
        assert!(genesis_committee(&cfg).unwrap().is_none());
        cfg.committee = vec!["not-a-node-id".into()];
        assert!(genesis_committee(&cfg).is_err());
        cfg.committee = ids(4).iter().map(|k| k.node_id().to_string()).collect();
        let c = genesis_committee(&cfg).unwrap().unwrap();
        assert_eq!((c.n(), c.f(), c.quorum()), (4, 1, 3));
    }
}
