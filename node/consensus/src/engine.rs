//! The PBFT replica state machine (sans-IO).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use dwcp_protocol::{MessageKind, NodeId, NodeKey, SignedEnvelope, Timestamp, Verified};

use crate::{
    certificate::{CommitProof, VoteKind, contradicts},
    committee::Committee,
    messages::{
        CommitCertificate, ConsensusMsg, Digest, MAX_BATCH, MAX_CERTS_PER_REPLY, MAX_PREPARED,
        MAX_PROOF_PART_BYTES, NewView, PrePrepare, PreparedProof, RawEnvelope, Request, Slot,
        ViewChange, ViewChangeProofs, VoteSignature, join, open, open_header, payload_of, split,
    },
};

/// Engine parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `K`: a checkpoint every this many sequence numbers (manual: 100).
    pub checkpoint_interval: u64,
    /// `L`: sequence numbers accepted above the low watermark (`H = h + L`), a multiple of `K`.
    pub log_window: u64,
    /// View-change timeout in milliseconds (manual: 10 s); doubles per failed view change.
    pub view_change_timeout_ms: u64,
    /// Most requests the primary puts in one batch.
    pub max_batch: usize,
    /// Most bytes of signed requests in one batch (keeps proposals well under the 256 KiB
    /// consensus payload limit).
    pub max_batch_bytes: usize,
    /// Most batches the primary keeps in flight (proposed, not executed); requests that arrive
    /// while the window is full wait and go out together in the next batch.
    pub max_inflight: u64,
    /// How often a stalled replica retransmits its votes and asks peers to catch it up.
    pub resend_interval_ms: u64,
    /// Most client requests waiting to be ordered.
    pub max_pending: usize,
    /// Most commit certificates kept to serve catch-up (the newest ones).
    pub retained_certificates: usize,
    /// Most bytes of commit certificates kept to serve catch-up (encoded size; the oldest go
    /// first). A replica that missed more decisions than its peers retain cannot replay them
    /// (it needs state transfer: [`crate::transfer`], driven by the application), so this
    /// bounds how long it may be down, not only memory.
    pub retained_certificate_bytes: usize,
    /// Largest difference between a batch's time and the local clock a backup accepts.
    pub max_clock_skew_ms: u64,
    /// Whether checkpoints certify the application's state: after delivering a checkpoint's
    /// decision the engine waits for [`Engine::on_app_state`] and signs a digest covering the
    /// log, the executed-request windows and that application digest
    /// ([`checkpoint_digest`]), so that 2f+1 checkpoint signatures certify a state snapshot
    /// a node can verify without the log (state transfer). Off: the application digest is
    /// all zeros and nothing waits.
    pub app_digests: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            checkpoint_interval: 100,
            log_window: 200,
            view_change_timeout_ms: 10_000,
            max_batch: 256,
            max_batch_bytes: 96 * 1024,
            max_inflight: 4,
            resend_interval_ms: 1_000,
            max_pending: 10_000,
            // The byte budget binds first: at n = 7 a certificate of a small batch is about
            // 2 KB, so 64 MiB keep some 30,000 decisions (minutes at the simulator's commit
            // rate; 400, the former count, was 13 s). Full 96 KiB batches keep about 650.
            retained_certificates: 65_536,
            retained_certificate_bytes: 64 * 1024 * 1024,
            max_clock_skew_ms: 60_000,
            app_digests: false,
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A parameter is zero or out of range.
    #[error("{0}")]
    Invalid(&'static str),
}

impl Config {
    /// Checks the parameters.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if self.checkpoint_interval == 0 {
            return Err(ConfigError::Invalid("checkpoint_interval must be positive"));
        }
        if self.log_window < self.checkpoint_interval
            || !self.log_window.is_multiple_of(self.checkpoint_interval)
            || 5 * self.log_window > MAX_PREPARED as u64
        {
            // A replica prepares up to L above a stable checkpoint it knows of, which is at
            // most 4L above its own: a view change may claim 5L slots, at most MAX_PREPARED.
            return Err(ConfigError::Invalid(
                "log_window must be a multiple of checkpoint_interval, at most 204",
            ));
        }
        if self.max_batch_bytes < 1024 || self.max_batch_bytes > 192 * 1024 {
            return Err(ConfigError::Invalid(
                "max_batch_bytes must be 1 KiB..=192 KiB",
            ));
        }
        if self.max_batch == 0 || self.max_batch > MAX_BATCH {
            return Err(ConfigError::Invalid("max_batch must be 1..=512"));
        }
        if self.max_inflight == 0
            || self.view_change_timeout_ms == 0
            || self.resend_interval_ms == 0
        {
            return Err(ConfigError::Invalid(
                "max_inflight and timeouts must be positive",
            ));
        }
        if self.max_pending == 0 {
            return Err(ConfigError::Invalid("max_pending must be positive"));
        }
        if self.retained_certificates == 0 || self.retained_certificate_bytes == 0 {
            return Err(ConfigError::Invalid(
                "retained_certificates and retained_certificate_bytes must be positive",
            ));
        }
        Ok(self)
    }
}

/// What goes into the engine.
#[derive(Debug, Clone)]
pub enum Input {
    /// A client request (from any node).
    Request(Verified<Request>),
    /// A consensus message from a peer.
    Message(Verified<ConsensusMsg>),
}

/// A committed batch, in sequence order, with its certificate.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The sequence number.
    pub seq: u64,
    /// The view it committed in.
    pub view: u64,
    /// The batch digest.
    pub digest: Digest,
    /// The time the primary assigned to the batch (the same on every replica).
    pub time: Timestamp,
    /// The requests to apply, without repeats of already executed `(client, nonce)` pairs.
    pub requests: Vec<Verified<Request>>,
    /// 2f+1 signed commits, checkable by anyone with [`CommitCertificate::verify`].
    pub certificate: CommitCertificate,
    /// Digest of the replicated log after this batch. At a checkpoint the engine then folds
    /// in the executed-request windows and the application digest ([`checkpoint_digest`]),
    /// and that is what the checkpoint signs and the log continues from.
    pub state: Digest,
}

/// Misbehaviour seen by the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offence {
    /// Two signed votes of one kind for one `(view, seq)` with different digests; anyone can
    /// check it with [`crate::check_equivocation`].
    Equivocation {
        /// The vote seen first.
        first: SignedEnvelope,
        /// The conflicting vote.
        second: SignedEnvelope,
    },
    /// A signed vote contradicting a committed certificate
    /// ([`crate::check_contradiction`]).
    ContradictsCertificate {
        /// The vote.
        vote: SignedEnvelope,
        /// What committed.
        proof: Box<CommitProof>,
    },
    /// A signed message that breaks the protocol in a way only the receiver can see (a
    /// proposal with a bad request, an invalid view-change proof). Not evidence for others.
    Invalid(&'static str),
}

/// What the engine asks its driver to do.
#[derive(Debug, Clone)]
pub enum Command {
    /// Send to every other committee member.
    Broadcast(SignedEnvelope),
    /// Send to one node.
    Send {
        /// Destination.
        to: NodeId,
        /// The message.
        envelope: SignedEnvelope,
    },
    /// Apply a committed batch (and persist it with its certificate).
    Deliver(Box<Decision>),
    /// A peer misbehaved.
    ReportPeer {
        /// The peer.
        peer: NodeId,
        /// What it did.
        offence: Offence,
    },
    /// This replica left its view and is changing to `view` (metric
    /// `dwcp_pbft_view_changes_total`).
    ViewChangeStarted {
        /// The view being moved to.
        view: u64,
    },
    /// A new view is installed.
    NewViewInstalled {
        /// The view.
        view: u64,
        /// Its primary.
        primary: NodeId,
    },
    /// A checkpoint became stable; the log below it was truncated.
    StableCheckpoint {
        /// Sequence number.
        seq: u64,
        /// State digest.
        state: Digest,
    },
}

/// Per-sequence-number log entry.
#[derive(Debug, Default)]
struct Entry {
    /// Accepted pre-prepare headers by view: (envelope, header).
    headers: BTreeMap<u64, (SignedEnvelope, PrePrepare)>,
    /// Batches (requests verified) by digest.
    batches: BTreeMap<Digest, Vec<Verified<Request>>>,
    /// Prepares by (view, digest) and signer, with the header each quotes.
    prepares: BTreeMap<(u64, Digest), BTreeMap<NodeId, (SignedEnvelope, SignedEnvelope)>>,
    /// Commits by (view, digest) and signer.
    commits: BTreeMap<(u64, Digest), BTreeMap<NodeId, SignedEnvelope>>,
    /// First vote of each kind per (kind, view, signer), to catch equivocation.
    first_vote: BTreeMap<(u8, u64, NodeId), (Digest, SignedEnvelope)>,
    /// Offenders already reported for this entry.
    reported: BTreeSet<(NodeId, u8, u64)>,
    /// Highest-view prepared certificate, with its header's content.
    prepared: Option<(u64, PrePrepare, PreparedProof)>,
    /// Own prepare and commit by view (for retransmission).
    my_prepare: Option<(u64, SignedEnvelope)>,
    my_commit: Option<(u64, SignedEnvelope)>,
    /// Committed-local: the certificate and its verified requests.
    committed: Option<(CommitCertificate, Vec<Verified<Request>>, PrePrepare)>,
}

/// A complete, well-formed view change (head and all its proof parts). Its signatures are
/// checked lazily, when `O` depends on them: the stable checkpoint proof if its checkpoint is
/// the highest in `V`, a prepared certificate if its claim is the highest-view one for its
/// slot. A failed check discards the whole view change. (Checking every certificate of every
/// view change costs 2f+1 times as much and changes nothing: only the chosen ones shape `O`.)
#[derive(Debug)]
struct ValidVc {
    signer: NodeId,
    new_view: u64,
    /// [`Digest::of_envelope`] of the head: how a new view names it.
    head: Digest,
    /// The head, then the proof parts (served to replicas that miss them).
    envelopes: Vec<SignedEnvelope>,
    stable_seq: u64,
    /// The checkpoint's state digest, once its proof was checked (always for seq 0).
    stable_state: Option<Digest>,
    stable_proof: Vec<SignedEnvelope>,
    /// seq -> claim.
    prepared: BTreeMap<u64, Claim>,
}

/// A claimed prepared slot and its certificate.
#[derive(Debug)]
struct Claim {
    slot: Slot,
    proof: PreparedProof,
    /// Once checked: the header's content and the nodes that vouched for holding the batch.
    checked: Option<(PrePrepare, Vec<NodeId>)>,
}

/// A view change being assembled from its head and proof parts.
#[derive(Debug)]
struct PartialVc {
    view: u64,
    head: Digest,
    head_msg: Option<(SignedEnvelope, ViewChange)>,
    /// first index -> (envelope, certificates)
    parts: BTreeMap<u32, (SignedEnvelope, Vec<PreparedProof>)>,
}

/// A re-proposed slot whose batch this replica does not hold yet.
#[derive(Debug)]
struct MissingBatch {
    header: SignedEnvelope,
    pp: PrePrepare,
    /// Nodes that vouched for holding it, asked in turn.
    holders: Vec<NodeId>,
    next: usize,
}

/// One slot of `O`: digest, the original batch time (none for a null request) and the nodes
/// known to hold the batch.
type Reproposal = (Digest, Option<Timestamp>, Vec<NodeId>);

/// The new view's `O`, computed from `V`.
#[derive(Debug)]
struct Reproposals {
    min_s: u64,
    min_state: Digest,
    min_proof: Vec<SignedEnvelope>,
    /// seq -> (digest, time, holders); the empty batch's digest is the null request.
    slots: BTreeMap<u64, Reproposal>,
}

/// Requests one client had executed: every nonce up to `floor`, and those in `above`.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct ClientWindow {
    floor: u64,
    above: BTreeSet<u64>,
}

const MAX_CLIENT_WINDOW: usize = 1024;

/// The digest a checkpoint signs: the log digest after its decision (`log`, a hash chain over
/// batch digests, as [`Decision::state`] reports it), the executed-request windows
/// (`clients`) and the application's state (`app`; zeros without [`Config::app_digests`]).
pub fn checkpoint_digest(log: &Digest, clients: &Digest, app: &Digest) -> Digest {
    Digest::of("dwcp/v3/pbft-checkpoint", &[&log.0, &clients.0, &app.0])
}

/// The digest that `proof` makes stable at `seq`: checkpoint messages for `seq` all signing
/// one digest, from 2f+1 distinct members of `committee` (section 4.3). None if any
/// envelope is not such a message, digests differ, or the signers are too few.
pub fn stable_proof_digest(
    committee: &Committee,
    seq: u64,
    proof: &[SignedEnvelope],
) -> Option<Digest> {
    let mut signers = BTreeSet::new();
    let mut state = None;
    for c in proof {
        let v = open(c)?;
        match v.message() {
            ConsensusMsg::Checkpoint { seq: s, state: d } if *s == seq => {
                if *state.get_or_insert(*d) != *d || !committee.contains(&v.signer()) {
                    return None;
                }
                signers.insert(v.signer());
            }
            _ => return None,
        }
    }
    if signers.len() >= committee.quorum() {
        state
    } else {
        None
    }
}

/// Digest of executed-request windows: per client (in key order) its id, floor and the
/// nonces above the floor.
fn clients_digest(executed: &BTreeMap<NodeId, ClientWindow>) -> Digest {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    h.update(b"dwcp/v3/pbft-clients");
    h.update((executed.len() as u64).to_be_bytes());
    for (client, w) in executed {
        h.update(client.as_bytes());
        h.update(w.floor.to_be_bytes());
        h.update((w.above.len() as u64).to_be_bytes());
        for n in &w.above {
            h.update(n.to_be_bytes());
        }
    }
    Digest(h.finalize().into())
}
/// Views of one epoch: epoch `e` uses views `e * 2^32 ..`, so no vote of one epoch can be
/// taken for a vote of another.
pub const VIEWS_PER_EPOCH: u64 = 1 << 32;

/// The first view of `epoch`.
pub fn first_view(epoch: u64) -> u64 {
    epoch.saturating_mul(VIEWS_PER_EPOCH)
}

/// The epoch a view belongs to.
pub fn epoch_of_view(view: u64) -> u64 {
    view / VIEWS_PER_EPOCH
}

/// What an engine of one epoch hands to the engine of the next once it has executed its last
/// sequence number: where the log stands and which requests already ran, so the next
/// committee continues the same replicated log and executes no request twice.
///
/// It serializes (without the waiting requests) so that a node can keep it on disk and, after
/// a restart, start the epoch's engine from it instead of replaying the log from genesis.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Handover {
    /// The last sequence number of the epoch that ended.
    pub seq: u64,
    /// Digest of the replicated log after it.
    pub state: Digest,
    /// Requests that were waiting, not executed (the next committee orders them). Not
    /// serialized: their clients resubmit them.
    #[serde(skip)]
    pub pending: Vec<Verified<Request>>,
    clients: BTreeMap<NodeId, ClientWindow>,
}
impl Handover {
    /// Digest of the executed-request windows it carries (see [`Engine::clients_digest`]):
    /// what a transferred hand-over is checked against.
    pub fn clients_digest(&self) -> Digest {
        clients_digest(&self.clients)
    }
}

const MAX_FUTURE_VIEWS: u64 = 4;
const KIND_HEADER: u8 = 0;
const KIND_PREPARE: u8 = 1;
const KIND_COMMIT: u8 = 2;
const KIND_CONTRADICTION: u8 = 9;

/// A PBFT replica (or an observer, when its key is not in the committee).
#[derive(Debug)]
pub struct Engine {
    cfg: Config,
    key: NodeKey,
    me: NodeId,
    committee: Committee,
    view: u64,
    active: bool,
    next_seq: u64,
    low: u64,
    stable_state: Digest,
    stable_proof: Vec<SignedEnvelope>,
    known_stable: u64,
    last_exec: u64,
    state: Digest,
    exec_states: BTreeMap<u64, Digest>,
    log: BTreeMap<u64, Entry>,
    checkpoints: BTreeMap<u64, BTreeMap<NodeId, (Digest, SignedEnvelope)>>,
    my_checkpoint: Option<SignedEnvelope>,
    /// Executed decisions' certificates served to replicas catching up, with their sizes.
    certs: BTreeMap<u64, (CommitCertificate, usize)>,
    /// Sum of the sizes in `certs`.
    cert_bytes: usize,
    pending: BTreeMap<(NodeId, u64), Verified<Request>>,
    pending_order: VecDeque<(NodeId, u64)>,
    proposed: BTreeSet<(NodeId, u64)>,
    executed: BTreeMap<NodeId, ClientWindow>,
    /// Latest valid view change per signer.
    vcs: BTreeMap<NodeId, (u64, ValidVc)>,
    /// View changes whose head or proof parts are still arriving, per signer.
    partial_vcs: BTreeMap<NodeId, PartialVc>,
    /// The last view change per signer found invalid (by head digest), not checked again.
    rejected_vcs: BTreeMap<NodeId, Digest>,
    /// Our view change: head and proof parts (retransmitted while the view change lasts).
    my_vc: Vec<SignedEnvelope>,
    /// When our view change was sent (it is retransmitted from a resend interval later).
    vc_started_at: Option<Timestamp>,
    /// Batches of re-proposed slots being fetched, by sequence number.
    missing: BTreeMap<u64, MissingBatch>,
    new_view_sent: Option<(u64, SignedEnvelope)>,
    /// The view changes our last new view names (served to replicas missing some).
    new_view_votes: Vec<SignedEnvelope>,
    /// A new view waiting for view changes we have not received, and whether we asked.
    pending_nv: Option<(NodeId, NewView, bool)>,
    vc_attempts: u32,
    progress_deadline: Option<Timestamp>,
    vc_deadline: Option<Timestamp>,
    next_tick: Option<Timestamp>,
    progressed_since_tick: bool,
    /// A catch-up reply whose certificates all start above the next sequence number this
    /// replica needs: (needed, first offered). Cleared when execution advances.
    catch_up_gap: Option<(u64, u64)>,
    restart_progress_timer: bool,
    fetch_rr: usize,
    out: VecDeque<Command>,
    /// The sequence number this engine's epoch starts after (its "checkpoint 0").
    start: u64,
    /// The replicated-log digest at `start`.
    start_state: Digest,
    /// The epoch's last sequence number (`u64::MAX`: open-ended).
    end: u64,
    /// A checkpoint's decision delivered whose application digest has not come yet
    /// ([`Config::app_digests`]): execution waits at it.
    awaiting_app: Option<u64>,
}

impl Engine {
    /// A replica with `key` for `committee`, starting at view 0 and sequence number 0.
    pub fn new(cfg: Config, key: NodeKey, committee: Committee) -> Result<Self, ConfigError> {
        let cfg = cfg.validate()?;
        let me = key.node_id();
        Ok(Self {
            cfg,
            key,
            me,
            committee,
            view: 0,
            active: true,
            next_seq: 1,
            low: 0,
            stable_state: Digest::default(),
            stable_proof: Vec::new(),
            known_stable: 0,
            last_exec: 0,
            state: Digest::default(),
            exec_states: BTreeMap::new(),
            log: BTreeMap::new(),
            checkpoints: BTreeMap::new(),
            my_checkpoint: None,
            certs: BTreeMap::new(),
            cert_bytes: 0,
            pending: BTreeMap::new(),
            pending_order: VecDeque::new(),
            proposed: BTreeSet::new(),
            executed: BTreeMap::new(),
            vcs: BTreeMap::new(),
            partial_vcs: BTreeMap::new(),
            rejected_vcs: BTreeMap::new(),
            my_vc: Vec::new(),
            vc_started_at: None,
            missing: BTreeMap::new(),
            new_view_sent: None,
            new_view_votes: Vec::new(),
            pending_nv: None,
            vc_attempts: 0,
            progress_deadline: None,
            vc_deadline: None,
            next_tick: None,
            progressed_since_tick: false,
            catch_up_gap: None,
            restart_progress_timer: false,
            fetch_rr: 0,
            out: VecDeque::new(),
            start: 0,
            start_state: Digest::default(),
            end: u64::MAX,
            awaiting_app: None,
        })
    }

    /// A replica of a later epoch's `committee`, continuing the log where the previous
    /// epoch's engine ended ([`Engine::handover`]): it starts in the epoch's first view
    /// ([`first_view`]) with `handover.seq` as its stable checkpoint, which needs no proof
    /// (every correct replica executed the same prefix to get there).
    pub fn resume(
        cfg: Config,
        key: NodeKey,
        committee: Committee,
        handover: Handover,
    ) -> Result<Self, ConfigError> {
        let mut e = Self::new(cfg, key, committee)?;
        if !handover.seq.is_multiple_of(e.cfg.checkpoint_interval) {
            return Err(ConfigError::Invalid(
                "an epoch must start at a multiple of checkpoint_interval",
            ));
        }
        e.view = first_view(e.committee.epoch());
        e.start = handover.seq;
        e.start_state = handover.state;
        e.next_seq = handover.seq + 1;
        e.low = handover.seq;
        e.known_stable = handover.seq;
        e.last_exec = handover.seq;
        e.state = handover.state;
        e.stable_state = handover.state;
        e.exec_states.insert(handover.seq, handover.state);
        e.executed = handover.clients;
        // Backups relay them: the new primary may never have seen them.
        for r in handover.pending {
            e.admit(r);
        }
        e.restart_progress_timer = true;
        Ok(e)
    }

    /// Ends this engine's epoch at `seq` (a multiple of `checkpoint_interval` above where it
    /// starts): nothing above it is proposed or accepted, and once it is executed the engine
    /// stops voting and only serves catch-up. Call before feeding inputs.
    pub fn set_end(&mut self, seq: u64) -> Result<(), ConfigError> {
        if seq <= self.start || !seq.is_multiple_of(self.cfg.checkpoint_interval) {
            return Err(ConfigError::Invalid(
                "an epoch must end at a multiple of checkpoint_interval after its start",
            ));
        }
        self.end = seq;
        Ok(())
    }

    /// The epoch's last sequence number, if it has one.
    pub fn end(&self) -> Option<u64> {
        (self.end != u64::MAX).then_some(self.end)
    }

    /// Bytes of commit certificates kept to serve catch-up (bounded by
    /// [`Config::retained_certificate_bytes`]).
    pub fn retained_certificate_bytes(&self) -> usize {
        self.cert_bytes
    }

    /// The sequence number the epoch started after.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Whether the epoch's last sequence number is executed (and, with
    /// [`Config::app_digests`], its checkpoint digest is complete).
    pub fn is_ended(&self) -> bool {
        self.last_exec >= self.end && self.awaiting_app.is_none()
    }

    /// The checkpoint whose application digest the engine waits for, if any.
    pub fn awaiting_app_state(&self) -> Option<u64> {
        self.awaiting_app
    }

    /// The application's state digest after the checkpoint decision `seq` (with
    /// [`Config::app_digests`]): completes the checkpoint's digest, signs and sends the
    /// checkpoint, and resumes execution. False (nothing done) when the engine does not wait
    /// for `seq`.
    pub fn on_app_state(&mut self, seq: u64, app: Digest) -> bool {
        if self.awaiting_app != Some(seq) {
            return false;
        }
        self.awaiting_app = None;
        self.checkpoint_executed(seq, app);
        self.execute_ready();
        true
    }

    /// The stable checkpoint: its sequence number, digest and the 2f+1 signed checkpoint
    /// messages proving it (none for the epoch's start, which needs no proof).
    pub fn stable_checkpoint(&self) -> (u64, Digest, &[SignedEnvelope]) {
        (self.low, self.stable_state, &self.stable_proof)
    }

    /// Whether `client`'s request `nonce` has been executed (in this engine's log or before
    /// its start, as its executed-request windows say).
    pub fn has_executed(&self, client: &NodeId, nonce: u64) -> bool {
        self.is_executed(client, nonce)
    }

    /// The 2f+1 signed checkpoint messages proving `seq` stable, if `seq` is this engine's
    /// stable checkpoint (and not its epoch's start, which has no proof).
    pub fn stable_proof_at(&self, seq: u64) -> Option<&[SignedEnvelope]> {
        (self.low == seq && !self.stable_proof.is_empty()).then_some(&self.stable_proof[..])
    }

    /// Digest of the executed-request windows (which requests already ran), part of every
    /// checkpoint digest and of [`Handover`].
    pub fn clients_digest(&self) -> Digest {
        clients_digest(&self.executed)
    }

    /// What the next epoch's engine starts from, once this one has ended.
    pub fn handover(&self) -> Option<Handover> {
        if !self.is_ended() {
            return None;
        }
        Some(Handover {
            seq: self.last_exec,
            state: self.state,
            pending: Vec::new(),
            clients: self.executed.clone(),
        })
    }

    /// Hands the requests still waiting to the next epoch (the engine has ended and orders
    /// nothing more).
    pub fn take_pending(&mut self) -> Vec<Verified<Request>> {
        self.pending_order.clear();
        self.proposed.clear();
        std::mem::take(&mut self.pending).into_values().collect()
    }

    /// Asks a member for decisions now (the driver saw traffic of a later epoch: this
    /// replica is behind). Does nothing once the epoch has ended.
    pub fn catch_up(&mut self) {
        if !self.is_ended() {
            self.send_fetch();
        }
    }

    /// Whether `m` belongs to this engine's epoch: by sequence number where it names one,
    /// by view otherwise. A driver running engines of several epochs routes with it.
    pub fn covers(&self, m: &ConsensusMsg) -> bool {
        let seq_in = |s: u64| s > self.start && s <= self.end;
        let view_in = |v: u64| epoch_of_view(v) == self.committee.epoch();
        match m {
            ConsensusMsg::PrePrepare(pp) => seq_in(pp.slot.seq),
            ConsensusMsg::Proposal { header, .. } => header
                .clone()
                .verify::<ConsensusMsg>()
                .ok()
                .is_some_and(|h| match h.message() {
                    ConsensusMsg::PrePrepare(pp) => seq_in(pp.slot.seq),
                    _ => false,
                }),
            ConsensusMsg::Prepare { slot, .. } | ConsensusMsg::Commit(slot) => seq_in(slot.seq),
            ConsensusMsg::Checkpoint { seq, .. }
            | ConsensusMsg::FetchBatch { seq, .. }
            | ConsensusMsg::Batch { seq, .. } => seq_in(*seq),
            ConsensusMsg::Fetch { from_seq } => seq_in(*from_seq),
            ConsensusMsg::Decided(certs) => certs
                .first()
                .and_then(CommitCertificate::seq_unverified)
                .is_some_and(seq_in),
            ConsensusMsg::ViewChange(vc) => view_in(vc.new_view),
            ConsensusMsg::ViewChangeProofs(p) => view_in(p.new_view),
            ConsensusMsg::NewView(nv) => view_in(nv.view),
            ConsensusMsg::FetchViewChanges { view } => view_in(*view),
        }
    }

    /// The last catch-up reply offered only decisions above the next one this replica needs:
    /// `(needed, first offered)`. The peer has dropped the certificates in between (it keeps
    /// `retained_certificate_bytes` of them), so this replica cannot replay the log from it;
    /// cleared once execution advances.
    pub fn catch_up_gap(&self) -> Option<(u64, u64)> {
        self.catch_up_gap
    }

    /// This replica's id.
    pub fn id(&self) -> NodeId {
        self.me
    }

    /// The current view.
    pub fn view(&self) -> u64 {
        self.view
    }

    /// The current view counted from the epoch's first view ([`first_view`]).
    pub fn view_in_epoch(&self) -> u64 {
        self.view.saturating_sub(first_view(self.committee.epoch()))
    }

    /// Whether the current view is installed (false during a view change).
    pub fn is_view_active(&self) -> bool {
        self.active
    }

    /// The last executed sequence number.
    pub fn last_executed(&self) -> u64 {
        self.last_exec
    }

    /// The last stable checkpoint (the low watermark `h`).
    pub fn low_watermark(&self) -> u64 {
        self.low
    }

    /// The committee.
    pub fn committee(&self) -> &Committee {
        &self.committee
    }

    /// The primary of the current view.
    pub fn primary(&self) -> NodeId {
        self.committee.primary(self.view)
    }

    /// Requests waiting to be ordered.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    fn is_member(&self) -> bool {
        self.committee.contains(&self.me)
    }

    fn is_primary(&self) -> bool {
        self.primary() == self.me
    }

    /// Feeds one input.
    pub fn handle(&mut self, now: Timestamp, input: Input) {
        if self.next_tick.is_none() {
            self.next_tick = Some(Timestamp(now.0 + self.cfg.resend_interval_ms));
        }
        match input {
            Input::Request(r) => self.on_request(now, r),
            Input::Message(m) => self.on_message(now, m),
        }
        self.finish(now);
    }

    /// Work that needs the caller's clock after any input: restart the request timer after
    /// progress, and let the primary propose what is waiting.
    fn finish(&mut self, now: Timestamp) {
        if std::mem::take(&mut self.restart_progress_timer) {
            self.progress_deadline = if self.pending.is_empty()
                || !self.active
                || !self.is_member()
                || self.is_ended()
            {
                None
            } else {
                Some(Timestamp(now.0 + self.vc_timeout()))
            };
        }
        self.try_propose(now);
    }

    /// The next command, if any.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.out.pop_front()
    }

    /// When [`Engine::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        [self.progress_deadline, self.vc_deadline, self.next_tick]
            .into_iter()
            .flatten()
            .min()
    }

    /// Fires every timer that is due at `now`.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        if self.next_tick.is_none() {
            self.next_tick = Some(Timestamp(now.0 + self.cfg.resend_interval_ms));
        }
        if self.progress_deadline.is_some_and(|d| d <= now) {
            self.progress_deadline = None;
            if self.active && self.is_member() {
                // Section 4.4: the backup's timer expired while a request was waiting.
                self.start_view_change(now, self.view + 1);
            }
        }
        if self.vc_deadline.is_some_and(|d| d <= now) {
            self.vc_deadline = None;
            if !self.active && self.is_member() {
                self.vc_attempts = self.vc_attempts.saturating_add(1);
                // Section 4.4: no new-view in time after 2f+1 view changes; try v+1.
                self.start_view_change(now, self.view + 1);
            }
        }
        if self.next_tick.is_some_and(|d| d <= now) {
            self.next_tick = Some(Timestamp(now.0 + self.cfg.resend_interval_ms));
            self.tick(now);
        }
        self.finish(now);
    }

    // ----- requests -----------------------------------------------------------------------

    fn is_executed(&self, client: &NodeId, nonce: u64) -> bool {
        self.executed
            .get(client)
            .is_some_and(|w| nonce <= w.floor || w.above.contains(&nonce))
    }

    fn mark_executed(&mut self, client: NodeId, nonce: u64) {
        let w = self.executed.entry(client).or_default();
        if nonce > w.floor {
            w.above.insert(nonce);
        }
        while w.above.len() > MAX_CLIENT_WINDOW {
            if let Some(first) = w.above.pop_first() {
                w.floor = first;
            }
        }
    }

    /// Takes a request into `pending` unless it ran, waits already, the queue is full or the
    /// epoch ended; a backup relays it to the primary (section 4.1). False if not taken.
    fn admit(&mut self, r: Verified<Request>) -> bool {
        let key = (r.signer(), r.nonce);
        if self.is_executed(&key.0, key.1)
            || self.pending.contains_key(&key)
            || self.is_ended()
            || self.pending.len() >= self.cfg.max_pending
        {
            return false;
        }
        if !self.is_primary() && self.active && self.is_member() {
            self.out.push_back(Command::Send {
                to: self.primary(),
                envelope: r.envelope().clone(),
            });
        }
        self.pending.insert(key, r);
        self.pending_order.push_back(key);
        true
    }

    fn on_request(&mut self, now: Timestamp, r: Verified<Request>) {
        if !self.admit(r) {
            return;
        }
        if self.progress_deadline.is_none() && self.active && self.is_member() {
            self.progress_deadline = Some(Timestamp(now.0 + self.vc_timeout()));
        }
        self.try_propose(now);
    }

    fn vc_timeout(&self) -> u64 {
        self.cfg
            .view_change_timeout_ms
            .saturating_mul(1u64 << self.vc_attempts.min(6))
    }

    // ----- normal case (section 4.2) ------------------------------------------------------

    fn sign(&self, msg: ConsensusMsg) -> Option<SignedEnvelope> {
        // Our own messages are within bounds by construction; an error here means a bug, and
        // the message is dropped rather than the process stopped.
        Verified::sign(&self.key, msg)
            .ok()
            .map(|v| v.envelope().clone())
    }

    fn in_window(&self, seq: u64) -> bool {
        seq > self.low
            && seq <= self.end
            && seq <= self.low.max(self.known_stable) + self.cfg.log_window
    }

    fn try_propose(&mut self, now: Timestamp) {
        // A new primary still fetching batches of its re-proposed slots waits: they may hold
        // the very requests it would otherwise order a second time.
        if !self.active || !self.is_primary() || !self.missing.is_empty() {
            return;
        }
        while self.next_seq.saturating_sub(self.last_exec + 1) < self.cfg.max_inflight
            && self.next_seq <= self.low + self.cfg.log_window
            && self.next_seq <= self.end
        {
            let mut batch = Vec::new();
            let mut keys = Vec::new();
            let mut i = 0;
            let mut bytes = 0;
            while i < self.pending_order.len() && batch.len() < self.cfg.max_batch {
                let k = self.pending_order[i];
                i += 1;
                if self.proposed.contains(&k) {
                    continue;
                }
                if let Some(r) = self.pending.get(&k) {
                    // Envelope overhead (key, signature, framing) is under 200 bytes.
                    let size = r.op.len() + 200;
                    if !batch.is_empty() && bytes + size > self.cfg.max_batch_bytes {
                        break;
                    }
                    bytes += size;
                    batch.push(r.clone());
                    keys.push(k);
                }
            }
            if batch.is_empty() {
                return;
            }
            self.proposed.extend(keys);
            let seq = self.next_seq;
            self.next_seq += 1;
            let slot = Slot {
                view: self.view,
                seq,
                digest: Digest::of_batch(&envelopes(&batch)),
            };
            self.propose(slot, now, batch);
        }
    }

    /// Signs and broadcasts a pre-prepare for `slot`, recording it as accepted.
    fn propose(&mut self, slot: Slot, time: Timestamp, batch: Vec<Verified<Request>>) {
        let Some(header) = self.sign(ConsensusMsg::PrePrepare(PrePrepare { slot, time })) else {
            return;
        };
        let entry = self.log.entry(slot.seq).or_default();
        entry
            .headers
            .insert(slot.view, (header.clone(), PrePrepare { slot, time }));
        entry.first_vote.insert(
            (KIND_HEADER, slot.view, self.me),
            (slot.digest, header.clone()),
        );
        entry.batches.insert(slot.digest, batch.clone());
        if let Some(p) = self.sign(ConsensusMsg::Proposal {
            header,
            batch: envelopes(&batch),
        }) {
            self.out.push_back(Command::Broadcast(p));
        }
        self.check_slot(slot.seq, slot.view, slot.digest);
    }

    fn on_message(&mut self, now: Timestamp, m: Verified<ConsensusMsg>) {
        let from = m.signer();
        if from == self.me {
            return;
        }
        let member = self.committee.contains(&from);
        let env = m.envelope().clone();
        match m.into_message() {
            ConsensusMsg::Fetch { from_seq } => self.on_fetch(from, from_seq),
            ConsensusMsg::Decided(certs) => self.on_decided(certs),
            _ if !member => {}
            ConsensusMsg::PrePrepare(_) => {
                self.report(from, Offence::Invalid("bare pre-prepare header"));
            }
            ConsensusMsg::Proposal { header, batch } => self.on_proposal(now, from, header, batch),
            ConsensusMsg::Prepare { slot, header } => self.on_prepare(from, slot, header, env),
            ConsensusMsg::Commit(slot) => self.on_commit(from, slot, env),
            ConsensusMsg::Checkpoint { seq, state } => self.on_checkpoint(from, seq, state, env),
            ConsensusMsg::ViewChange(vc) => self.on_view_change(now, from, vc, env),
            ConsensusMsg::ViewChangeProofs(p) => self.on_vc_proofs(now, from, p, env),
            ConsensusMsg::FetchBatch { seq, digest } => self.on_fetch_batch(from, seq, digest),
            ConsensusMsg::Batch { seq, batch } => self.on_batch(seq, batch),
            ConsensusMsg::NewView(nv) => self.on_new_view(now, from, nv, false),
            ConsensusMsg::FetchViewChanges { view } => {
                if self.new_view_sent.as_ref().is_some_and(|(v, _)| *v == view) {
                    for vc in self.new_view_votes.clone() {
                        self.out.push_back(Command::Send {
                            to: from,
                            envelope: vc,
                        });
                    }
                }
            }
        }
    }

    fn report(&mut self, peer: NodeId, offence: Offence) {
        self.out.push_back(Command::ReportPeer { peer, offence });
    }

    /// Records a vote's digest for (kind, view, signer); reports equivocation once.
    /// Returns false if the vote conflicts with an earlier one (and must be dropped).
    fn note_vote(
        &mut self,
        seq: u64,
        kind: u8,
        view: u64,
        signer: NodeId,
        digest: Digest,
        env: &SignedEnvelope,
    ) -> bool {
        let entry = self.log.entry(seq).or_default();
        match entry.first_vote.get(&(kind, view, signer)) {
            None => {
                entry
                    .first_vote
                    .insert((kind, view, signer), (digest, env.clone()));
                true
            }
            Some((d, _)) if *d == digest => true,
            Some((_, first)) => {
                let first = first.clone();
                if entry.reported.insert((signer, kind, view)) {
                    self.report(
                        signer,
                        Offence::Equivocation {
                            first,
                            second: env.clone(),
                        },
                    );
                }
                false
            }
        }
    }

    /// Checks a primary's header; records it; returns its content if acceptable for `seq`.
    fn accept_header(
        &mut self,
        now: Timestamp,
        header: &SignedEnvelope,
        check_time: bool,
    ) -> Option<PrePrepare> {
        let (signer, pp) = open_header(header)?;
        let slot = pp.slot;
        if signer != self.committee.primary(slot.view) || !self.in_window(slot.seq) {
            return None;
        }
        if check_time && pp.time.0.abs_diff(now.0) > self.cfg.max_clock_skew_ms {
            self.report(
                signer,
                Offence::Invalid("batch time too far from the local clock"),
            );
            return None;
        }
        if !self.note_vote(
            slot.seq,
            KIND_HEADER,
            slot.view,
            signer,
            slot.digest,
            header,
        ) {
            return None;
        }
        Some(pp)
    }

    fn on_proposal(
        &mut self,
        now: Timestamp,
        from: NodeId,
        header: SignedEnvelope,
        batch: Vec<SignedEnvelope>,
    ) {
        if !self.active {
            return;
        }
        let Some(pp) = self.accept_header(now, &header, true) else {
            return;
        };
        let slot = pp.slot;
        if slot.view != self.view || from != self.committee.primary(slot.view) {
            return;
        }
        if self
            .log
            .get(&slot.seq)
            .is_some_and(|e| e.headers.contains_key(&slot.view))
        {
            // Already accepted (a retransmission).
            self.resend_prepare(slot.seq);
            return;
        }
        if Digest::of_batch(&batch) != slot.digest {
            self.report(
                from,
                Offence::Invalid("batch does not match the pre-prepare digest"),
            );
            return;
        }
        let Some(batch) = verify_batch(&batch) else {
            self.report(
                from,
                Offence::Invalid("proposal carries an invalid request"),
            );
            return;
        };
        self.accept_pre_prepare(header, pp, batch);
    }

    /// Section 4.2: a backup accepts the pre-prepare and multicasts a prepare.
    fn accept_pre_prepare(
        &mut self,
        header: SignedEnvelope,
        pp: PrePrepare,
        batch: Vec<Verified<Request>>,
    ) {
        let slot = pp.slot;
        for r in &batch {
            self.proposed.insert((r.signer(), r.nonce));
        }
        let entry = self.log.entry(slot.seq).or_default();
        entry.headers.insert(slot.view, (header.clone(), pp));
        entry.batches.insert(slot.digest, batch);
        if self.committee.primary(slot.view) != self.me
            && self.is_member()
            && let Some(p) = self.sign(ConsensusMsg::Prepare {
                slot,
                header: header.clone(),
            })
        {
            self.out.push_back(Command::Broadcast(p.clone()));
            let entry = self.log.entry(slot.seq).or_default();
            entry.my_prepare = Some((slot.view, p.clone()));
            entry
                .prepares
                .entry((slot.view, slot.digest))
                .or_default()
                .insert(self.me, (p, header));
        }
        self.check_slot(slot.seq, slot.view, slot.digest);
    }

    fn resend_prepare(&mut self, seq: u64) {
        if let Some((_, p)) = self.log.get(&seq).and_then(|e| e.my_prepare.clone()) {
            self.out.push_back(Command::Broadcast(p));
        }
    }

    fn on_prepare(
        &mut self,
        from: NodeId,
        slot: Slot,
        header: SignedEnvelope,
        env: SignedEnvelope,
    ) {
        if !self.in_window(slot.seq) || slot.view > self.view + MAX_FUTURE_VIEWS {
            return;
        }
        if from == self.committee.primary(slot.view) {
            return;
        }
        // The quoted header: if it differs from the one we accepted for this slot, check it;
        // two different headers from one primary are evidence of equivocation.
        let same = self
            .log
            .get(&slot.seq)
            .and_then(|e| e.headers.get(&slot.view))
            .is_some_and(|(h, _)| *h == header);
        if !same {
            match open_header(&header) {
                Some((p, pp)) if p == self.committee.primary(slot.view) && pp.slot == slot => {
                    self.note_vote(slot.seq, KIND_HEADER, slot.view, p, slot.digest, &header);
                }
                _ => {
                    self.report(from, Offence::Invalid("prepare quotes an invalid header"));
                    return;
                }
            }
        }
        if !self.note_vote(slot.seq, KIND_PREPARE, slot.view, from, slot.digest, &env) {
            return;
        }
        self.contradiction_check(slot.seq, from, slot, &env, VoteKind::Prepare);
        let entry = self.log.entry(slot.seq).or_default();
        entry
            .prepares
            .entry((slot.view, slot.digest))
            .or_default()
            .insert(from, (env, header));
        self.check_slot(slot.seq, slot.view, slot.digest);
    }

    fn on_commit(&mut self, from: NodeId, slot: Slot, env: SignedEnvelope) {
        if !self.in_window(slot.seq) || slot.view > self.view + MAX_FUTURE_VIEWS {
            return;
        }
        if !self.note_vote(slot.seq, KIND_COMMIT, slot.view, from, slot.digest, &env) {
            return;
        }
        self.contradiction_check(slot.seq, from, slot, &env, VoteKind::Commit);
        let entry = self.log.entry(slot.seq).or_default();
        entry
            .commits
            .entry((slot.view, slot.digest))
            .or_default()
            .insert(from, env);
        self.check_slot(slot.seq, slot.view, slot.digest);
    }

    /// A vote against an already committed slot is evidence.
    fn contradiction_check(
        &mut self,
        seq: u64,
        from: NodeId,
        slot: Slot,
        env: &SignedEnvelope,
        kind: VoteKind,
    ) {
        let Some(entry) = self.log.get_mut(&seq) else {
            return;
        };
        let Some((cert, _, pp)) = &entry.committed else {
            return;
        };
        if contradicts(kind, slot.view, pp.slot.view)
            && slot.digest != pp.slot.digest
            && entry.reported.insert((from, KIND_CONTRADICTION, slot.view))
        {
            let proof = Box::new(cert.proof());
            self.report(
                from,
                Offence::ContradictsCertificate {
                    vote: env.clone(),
                    proof,
                },
            );
        }
    }

    /// Evaluates `prepared` and `committed-local` for `(view, seq, digest)`.
    fn check_slot(&mut self, seq: u64, view: u64, digest: Digest) {
        let quorum = self.committee.quorum();
        let member = self.is_member();
        let me = self.me;
        let Some(entry) = self.log.get_mut(&seq) else {
            return;
        };
        let Some((header, pp)) = entry.headers.get(&view).cloned() else {
            return;
        };
        if pp.slot.digest != digest {
            return;
        }
        if !entry.batches.contains_key(&digest) {
            return;
        }
        // Only prepares quoting the accepted header count: a prepared certificate names one
        // signed header, and the compact certificate rebuilds each prepare from it. This runs
        // on every vote, so votes are counted here and copied only when a certificate is
        // built (copying them on every vote made a slot cost O(n^2) envelope copies).
        let prepare_count = entry
            .prepares
            .get(&(view, digest))
            .map_or(0, |m| quoting(m, &header).count());
        // prepared(m, v, n, i): the pre-prepare and 2f prepares from distinct backups.
        let prepared = prepare_count + 1 >= quorum;
        if prepared {
            if entry.prepared.as_ref().is_none_or(|(v, _, _)| *v < view) {
                let prepares: Vec<VoteSignature> = entry
                    .prepares
                    .get(&(view, digest))
                    .map(|m| {
                        quoting(m, &header)
                            .filter_map(|(n, (e, _))| {
                                Some(VoteSignature {
                                    signer: self.committee.index_of(n)?,
                                    signature: split(e)?.g,
                                })
                            })
                            .take(quorum - 1)
                            .collect()
                    })
                    .unwrap_or_default();
                entry.prepared = Some((
                    view,
                    pp,
                    PreparedProof {
                        pre_prepare: header.clone(),
                        prepares,
                    },
                ));
            }
            let sent = entry.my_commit.as_ref().is_some_and(|(v, _)| *v >= view);
            if member
                && !sent
                && view == self.view
                && self.active
                && let Some(c) = self.sign(ConsensusMsg::Commit(pp.slot))
            {
                let entry = self.log.entry(seq).or_default();
                entry.my_commit = Some((view, c.clone()));
                entry
                    .first_vote
                    .insert((KIND_COMMIT, view, me), (digest, c.clone()));
                entry
                    .commits
                    .entry((view, digest))
                    .or_default()
                    .insert(me, c.clone());
                self.out.push_back(Command::Broadcast(c));
            }
        }
        let Some(entry) = self.log.get_mut(&seq) else {
            return;
        };
        if entry.committed.is_some() {
            return;
        }
        let commit_count = entry.commits.get(&(view, digest)).map_or(0, BTreeMap::len);
        // committed-local(m, v, n, i): prepared(m, v, n, i) and 2f+1 matching commits. Requiring
        // prepared here (as the paper does) means the header this replica commits with is the
        // one 2f+1 replicas vouched for, so the batch time is the same at every replica.
        if prepared && commit_count >= quorum {
            let Some(batch) = entry.batches.get(&digest).cloned() else {
                return;
            };
            let commits: Vec<SignedEnvelope> = entry
                .commits
                .get(&(view, digest))
                .map(|m| m.values().take(quorum).cloned().collect())
                .unwrap_or_default();
            let cert = CommitCertificate {
                pre_prepare: header,
                batch: envelopes(&batch),
                commits,
            };
            entry.committed = Some((cert, batch, pp));
            self.after_commit(seq);
            self.execute_ready();
        }
    }

    /// After a slot commits, votes already received against it are evidence.
    fn after_commit(&mut self, seq: u64) {
        let Some(entry) = self.log.get_mut(&seq) else {
            return;
        };
        let Some((cert, _, pp)) = &entry.committed else {
            return;
        };
        let proof = cert.proof();
        let mut against = Vec::new();
        for ((kind, view, signer), (d, env)) in &entry.first_vote {
            let vk = if *kind == KIND_COMMIT {
                VoteKind::Commit
            } else {
                VoteKind::Prepare
            };
            if *kind != KIND_HEADER && contradicts(vk, *view, pp.slot.view) && *d != pp.slot.digest
            {
                against.push((*signer, *view, env.clone()));
            }
        }
        against.retain(|(signer, view, _)| {
            entry.reported.insert((*signer, KIND_CONTRADICTION, *view))
        });
        for (signer, _, vote) in against {
            let proof = Box::new(proof.clone());
            self.report(signer, Offence::ContradictsCertificate { vote, proof });
        }
    }

    /// Executes committed batches in sequence order (section 4.2, last paragraph).
    fn execute_ready(&mut self) {
        loop {
            if self.awaiting_app.is_some() {
                break;
            }
            let seq = self.last_exec + 1;
            let Some((cert, batch, pp)) = self.log.get(&seq).and_then(|e| e.committed.clone())
            else {
                break;
            };
            self.state = Digest::of(
                "dwcp/v3/pbft-state",
                &[&self.state.0, &seq.to_be_bytes(), &pp.slot.digest.0],
            );
            self.last_exec = seq;
            self.missing.remove(&seq);
            self.progressed_since_tick = true;
            let mut requests = Vec::new();
            for v in batch {
                let key = (v.signer(), v.nonce);
                self.pending.remove(&key);
                self.proposed.remove(&key);
                if self.is_executed(&key.0, key.1) {
                    continue;
                }
                self.mark_executed(key.0, key.1);
                requests.push(v);
            }
            self.retain_certificate(seq, cert.clone());
            self.out.push_back(Command::Deliver(Box::new(Decision {
                seq,
                view: pp.slot.view,
                digest: pp.slot.digest,
                time: pp.time,
                requests,
                certificate: cert,
                state: self.state,
            })));
            if seq.is_multiple_of(self.cfg.checkpoint_interval) {
                if self.cfg.app_digests {
                    // The application applies the decision, then calls `on_app_state`.
                    self.awaiting_app = Some(seq);
                    break;
                }
                self.checkpoint_executed(seq, Digest::default());
            }
        }
        let keep: BTreeSet<(NodeId, u64)> = self.pending.keys().copied().collect();
        self.pending_order.retain(|k| keep.contains(k));
        // The request timer restarts (with the caller's `now`) once this input is done.
        self.restart_progress_timer = true;
        if self.next_seq <= self.last_exec {
            self.next_seq = self.last_exec + 1;
        }
    }

    // ----- checkpoints (section 4.3) ------------------------------------------------------

    /// Folds the executed-request windows and the application digest into the log digest at
    /// checkpoint `seq` (the log continues from the folded digest), then signs it.
    fn checkpoint_executed(&mut self, seq: u64, app: Digest) {
        self.state = checkpoint_digest(&self.state, &self.clients_digest(), &app);
        self.exec_states.insert(seq, self.state);
        self.send_checkpoint(seq);
    }

    fn send_checkpoint(&mut self, seq: u64) {
        if !self.is_member() {
            return;
        }
        let state = self.state;
        if let Some(c) = self.sign(ConsensusMsg::Checkpoint { seq, state }) {
            self.checkpoints
                .entry(seq)
                .or_default()
                .insert(self.me, (state, c.clone()));
            self.my_checkpoint = Some(c.clone());
            self.out.push_back(Command::Broadcast(c));
        }
        self.check_stable(seq);
    }

    fn on_checkpoint(&mut self, from: NodeId, seq: u64, state: Digest, env: SignedEnvelope) {
        if seq <= self.low
            || !seq.is_multiple_of(self.cfg.checkpoint_interval)
            || seq > self.low + 4 * self.cfg.log_window
        {
            return;
        }
        self.checkpoints
            .entry(seq)
            .or_default()
            .entry(from)
            .or_insert((state, env));
        self.check_stable(seq);
    }

    fn check_stable(&mut self, seq: u64) {
        let quorum = self.committee.quorum();
        let Some(votes) = self.checkpoints.get(&seq) else {
            return;
        };
        let mut by_state: BTreeMap<Digest, Vec<SignedEnvelope>> = BTreeMap::new();
        for (d, e) in votes.values() {
            by_state.entry(*d).or_default().push(e.clone());
        }
        let Some((state, proof)) = by_state.into_iter().find(|(_, v)| v.len() >= quorum) else {
            return;
        };
        self.known_stable = self.known_stable.max(seq);
        if self.last_exec < seq {
            // Others are ahead: ask one of them for the decisions we miss.
            self.send_fetch();
            return;
        }
        if self.exec_states.get(&seq) != Some(&state) {
            return;
        }
        self.make_stable(seq, state, proof);
    }

    fn make_stable(&mut self, seq: u64, state: Digest, proof: Vec<SignedEnvelope>) {
        if seq <= self.low {
            return;
        }
        self.low = seq;
        self.stable_state = state;
        self.stable_proof = proof;
        self.known_stable = self.known_stable.max(seq);
        // Discard everything at or below the stable checkpoint.
        self.log = self.log.split_off(&(seq + 1));
        self.checkpoints = self.checkpoints.split_off(&(seq + 1));
        self.exec_states = self.exec_states.split_off(&seq);
        self.missing = self.missing.split_off(&(seq + 1));
        self.out.push_back(Command::StableCheckpoint { seq, state });
    }

    // ----- catch-up -----------------------------------------------------------------------

    fn send_fetch(&mut self) {
        let peers: Vec<NodeId> = self
            .committee
            .members()
            .iter()
            .copied()
            .filter(|m| *m != self.me)
            .collect();
        if peers.is_empty() {
            return;
        }
        let to = peers[self.fetch_rr % peers.len()];
        self.fetch_rr += 1;
        if let Some(f) = self.sign(ConsensusMsg::Fetch {
            from_seq: self.last_exec + 1,
        }) {
            self.out.push_back(Command::Send { to, envelope: f });
        }
    }

    fn on_fetch(&mut self, from: NodeId, from_seq: u64) {
        let mut certs = Vec::new();
        let mut bytes = 0usize;
        let mut last = from_seq;
        for (seq, (c, size)) in self.certs.range(from_seq..) {
            let size = *size;
            if certs.len() >= MAX_CERTS_PER_REPLY || bytes + size > 192 * 1024 {
                break;
            }
            bytes += size;
            last = *seq;
            certs.push(c.clone());
        }
        if certs.is_empty() {
            return;
        }
        if let Some(d) = self.sign(ConsensusMsg::Decided(certs)) {
            self.out.push_back(Command::Send {
                to: from,
                envelope: d,
            });
        }
        // The stable checkpoint's proof travels with the decisions it covers (section 4.3:
        // its 2f+1 signed checkpoint messages, forwarded as they are): a replica that
        // catches up across it, an epoch's end in particular, then holds the proof too,
        // which state transfer serves (`transfer::EpochLink`). It was broadcast while the
        // replica was away.
        if (from_seq..=last).contains(&self.low) {
            for env in &self.stable_proof {
                self.out.push_back(Command::Send {
                    to: from,
                    envelope: env.clone(),
                });
            }
        }
    }

    /// Keeps an executed decision's certificate for catch-up, dropping the oldest beyond the
    /// count and byte budgets.
    fn retain_certificate(&mut self, seq: u64, cert: CommitCertificate) {
        let size = std::iter::once(&cert.pre_prepare)
            .chain(&cert.batch)
            .chain(&cert.commits)
            .map(|e| e.encode().len())
            .sum::<usize>()
            + 256;
        if let Some((_, old)) = self.certs.insert(seq, (cert, size)) {
            self.cert_bytes = self.cert_bytes.saturating_sub(old);
        }
        self.cert_bytes = self.cert_bytes.saturating_add(size);
        while self.certs.len() > self.cfg.retained_certificates
            || self.cert_bytes > self.cfg.retained_certificate_bytes
        {
            let Some((_, (_, old))) = self.certs.pop_first() else {
                break;
            };
            self.cert_bytes = self.cert_bytes.saturating_sub(old);
        }
    }

    fn on_decided(&mut self, certs: Vec<CommitCertificate>) {
        let before = self.last_exec;
        let full = certs.len() == MAX_CERTS_PER_REPLY;
        let mut first_offered: Option<u64> = None;
        for cert in certs {
            let Some(seq) = cert.seq_unverified() else {
                continue;
            };
            if seq > self.last_exec && seq <= self.end {
                first_offered = Some(first_offered.map_or(seq, |f| f.min(seq)));
            }
            if seq <= self.last_exec
                || seq > self.end
                || seq > self.last_exec + 4 * self.cfg.log_window
                || self.log.get(&seq).is_some_and(|e| e.committed.is_some())
            {
                continue;
            }
            let Ok(cb) = cert.verify(&self.committee) else {
                continue;
            };
            let pp = PrePrepare {
                slot: cb.slot,
                time: cb.time,
            };
            let entry = self.log.entry(seq).or_default();
            entry.committed = Some((cert, cb.requests, pp));
        }
        self.execute_ready();
        if self.last_exec > before {
            self.catch_up_gap = None;
        } else if let Some(first) = first_offered
            && first > self.last_exec + 1
            && !self.log.contains_key(&(self.last_exec + 1))
        {
            // The peer no longer holds the next decision this replica needs (it retains a
            // bounded window of certificates): without state transfer it cannot catch up
            // from this peer.
            self.catch_up_gap = Some((self.last_exec + 1, first));
        }
        let ready: Vec<u64> = self
            .checkpoints
            .keys()
            .copied()
            .filter(|s| *s <= self.last_exec && *s > self.low)
            .collect();
        for seq in ready {
            self.check_stable(seq);
        }
        // Catching up: ask for the next certificates right away instead of at the next tick,
        // so a replica that is behind (or alone in a view change while the others keep
        // committing) catches up faster than the others commit, before the certificates it
        // needs leave their retention window.
        if self.last_exec > before && (full || !self.active) {
            self.send_fetch();
        }
    }

    // ----- timers -------------------------------------------------------------------------

    fn tick(&mut self, now: Timestamp) {
        if self.is_ended() {
            return;
        }
        self.fetch_missing();
        let progressed = std::mem::replace(&mut self.progressed_since_tick, false);
        let outstanding = !self.is_member()
            || !self.pending.is_empty()
            || self.log.range(self.last_exec + 1..).next().is_some()
            || self.known_stable > self.last_exec;
        if progressed || !outstanding {
            self.try_propose(now);
            return;
        }
        // Stalled with work outstanding: retransmit (messages may have been lost) and ask a
        // peer for decisions we may have missed.
        if self.is_member() {
            if self.active {
                let view = self.view;
                let primary = self.is_primary();
                let mut resend = Vec::new();
                for (_, e) in self.log.range(self.last_exec + 1..) {
                    if e.committed.is_some() {
                        continue;
                    }
                    if primary
                        && let Some((h, pp)) = e.headers.get(&view)
                        && let Some(b) = e.batches.get(&pp.slot.digest)
                    {
                        resend.push(ConsensusMsg::Proposal {
                            header: h.clone(),
                            batch: envelopes(b),
                        });
                    }
                    if let Some((v, p)) = &e.my_prepare
                        && *v == view
                    {
                        self.out.push_back(Command::Broadcast(p.clone()));
                    }
                    if let Some((v, c)) = &e.my_commit
                        && *v == view
                    {
                        self.out.push_back(Command::Broadcast(c.clone()));
                    }
                }
                for m in resend {
                    if let Some(p) = self.sign(m) {
                        self.out.push_back(Command::Broadcast(p));
                    }
                }
            } else if self
                .vc_started_at
                .is_some_and(|t| now.0 >= t.0 + self.cfg.resend_interval_ms)
            {
                for vc in self.my_vc.clone() {
                    self.out.push_back(Command::Broadcast(vc));
                }
            }
            if let Some(c) = self.my_checkpoint.clone() {
                self.out.push_back(Command::Broadcast(c));
            }
        }
        self.send_fetch();
        self.try_propose(now);
    }

    // ----- view changes (section 4.4) -----------------------------------------------------

    fn start_view_change(&mut self, now: Timestamp, view: u64) {
        // An ended epoch orders nothing more: its replicas moved on to the next committee.
        // Views stay inside the epoch's range.
        if view <= self.view || self.is_ended() || epoch_of_view(view) != self.committee.epoch() {
            return;
        }
        self.view = view;
        self.active = false;
        self.progress_deadline = None;
        self.vc_deadline = None;
        self.proposed.clear();
        self.missing.clear();
        let mut claims = Vec::new();
        let mut proofs = Vec::new();
        let mut own = BTreeMap::new();
        for (seq, e) in self.log.range(self.low + 1..=self.low + self.claim_span()) {
            if let Some((_, pp, proof)) = &e.prepared {
                if claims.len() == MAX_PREPARED {
                    break;
                }
                claims.push(pp.slot);
                own.insert(
                    *seq,
                    Claim {
                        slot: pp.slot,
                        proof: proof.clone(),
                        checked: Some((*pp, holders(&self.committee, self.me, pp, proof))),
                    },
                );
                proofs.push(proof.clone());
            }
        }
        // P's certificates go in parts under MAX_PROOF_PART_BYTES each, so no message of a
        // view change outgrows the payload limit whatever the committee size.
        let mut parts: Vec<Vec<PreparedProof>> = Vec::new();
        let mut size = 0;
        for p in proofs {
            let len = payload_size(&p);
            match parts.last_mut() {
                Some(last) if size + len <= MAX_PROOF_PART_BYTES => last.push(p),
                _ => {
                    size = 0;
                    parts.push(vec![p]);
                }
            }
            size += len;
        }
        let head = ViewChange {
            new_view: view,
            stable_seq: self.low,
            stable_proof: self.stable_proof.clone(),
            prepared: claims,
            proof_parts: u32::try_from(parts.len()).unwrap_or(u32::MAX),
        };
        self.out.push_back(Command::ViewChangeStarted { view });
        let Some(head_env) = self.sign(ConsensusMsg::ViewChange(head)) else {
            return;
        };
        let head_digest = Digest::of_envelope(&head_env);
        let mut envs = vec![head_env];
        let mut first = 0u32;
        for proofs in parts {
            let count = u32::try_from(proofs.len()).unwrap_or(u32::MAX);
            if let Some(e) = self.sign(ConsensusMsg::ViewChangeProofs(ViewChangeProofs {
                new_view: view,
                head: head_digest,
                first,
                proofs,
            })) {
                envs.push(e);
            }
            first = first.saturating_add(count);
        }
        for e in &envs {
            self.out.push_back(Command::Broadcast(e.clone()));
        }
        self.my_vc = envs.clone();
        self.vc_started_at = Some(now);
        let valid = ValidVc {
            signer: self.me,
            new_view: view,
            head: head_digest,
            envelopes: envs,
            stable_seq: self.low,
            stable_state: Some(self.stable_state),
            stable_proof: self.stable_proof.clone(),
            prepared: own,
        };
        self.vcs.insert(self.me, (view, valid));
        self.after_vc(now);
    }

    /// How far above its stable checkpoint a replica may have prepared slots: it accepts
    /// pre-prepares up to `L` above a stable checkpoint it knows of, which may be up to `4L`
    /// above its own.
    fn claim_span(&self) -> u64 {
        5 * self.cfg.log_window
    }

    /// Checks a complete view change's form (no signatures: see [`ValidVc`]).
    fn validate_vc(
        &self,
        vc: &ViewChange,
        head_env: SignedEnvelope,
        parts: Vec<(SignedEnvelope, Vec<PreparedProof>)>,
    ) -> Option<ValidVc> {
        if !vc.stable_seq.is_multiple_of(self.cfg.checkpoint_interval)
            || vc.stable_seq < self.start
            || (vc.stable_seq == self.start) != vc.stable_proof.is_empty()
            || (vc.stable_seq > self.start && vc.stable_proof.len() < self.committee.quorum())
        {
            return None;
        }
        let mut envelopes = vec![head_env.clone()];
        let mut proofs = Vec::with_capacity(vc.prepared.len());
        for (env, ps) in parts {
            envelopes.push(env);
            proofs.extend(ps);
        }
        if proofs.len() != vc.prepared.len() {
            return None;
        }
        let mut prepared = BTreeMap::new();
        let mut last_seq = vc.stable_seq;
        for (claim, proof) in vc.prepared.iter().zip(proofs) {
            if claim.view >= vc.new_view
                || claim.seq <= last_seq
                || claim.seq > vc.stable_seq + self.claim_span()
                || proof.prepares.len() + 1 < self.committee.quorum()
            {
                return None;
            }
            last_seq = claim.seq;
            prepared.insert(
                claim.seq,
                Claim {
                    slot: *claim,
                    proof,
                    checked: None,
                },
            );
        }
        Some(ValidVc {
            signer: head_env.claimed_signer(),
            new_view: vc.new_view,
            head: Digest::of_envelope(&head_env),
            envelopes,
            stable_seq: vc.stable_seq,
            stable_state: (vc.stable_seq == self.start).then_some(self.start_state),
            stable_proof: vc.stable_proof.clone(),
            prepared,
        })
    }

    /// Checks a stable checkpoint proof: 2f+1 members signed one state for `seq`.
    fn check_stable_proof(&self, seq: u64, proof: &[SignedEnvelope]) -> Option<Digest> {
        stable_proof_digest(&self.committee, seq, proof)
    }

    /// Checks a compact prepared certificate for `claim` in a view change to `new_view`: the
    /// header is the primary's for the claimed slot, and 2f distinct backups' prepare
    /// signatures verify (each prepare envelope is rebuilt from the header and checked).
    fn check_claim(
        &self,
        reporter: NodeId,
        new_view: u64,
        claim: &Slot,
        p: &PreparedProof,
    ) -> Option<(PrePrepare, Vec<NodeId>)> {
        let (primary, pp) = open_header(&p.pre_prepare)?;
        let slot = pp.slot;
        if slot != *claim || primary != self.committee.primary(slot.view) || slot.view >= new_view {
            return None;
        }
        let payload = payload_of(&ConsensusMsg::Prepare {
            slot,
            header: p.pre_prepare.clone(),
        })?;
        let mut signers = BTreeSet::new();
        for vote in &p.prepares {
            let signer = self.committee.member(vote.signer)?;
            if signer == primary || !signers.insert(signer) {
                return None;
            }
            let env = join(&RawEnvelope {
                k: MessageKind::Consensus.code(),
                s: signer,
                p: payload.clone(),
                g: vote.signature.clone(),
            })?;
            open(&env)?;
        }
        if signers.len() + 1 < self.committee.quorum() {
            return None;
        }
        Some((pp, holders(&self.committee, reporter, &pp, p)))
    }

    /// The checked content of `signer`'s claim at `seq` (checking it now if needed).
    fn checked_claim(&mut self, signer: NodeId, seq: u64) -> Option<(PrePrepare, Vec<NodeId>)> {
        let (_, vc) = self.vcs.get(&signer)?;
        let c = vc.prepared.get(&seq)?;
        if let Some(done) = &c.checked {
            return Some(done.clone());
        }
        let done = self.check_claim(signer, vc.new_view, &c.slot, &c.proof)?;
        if let Some(c) = self
            .vcs
            .get_mut(&signer)
            .and_then(|(_, vc)| vc.prepared.get_mut(&seq))
        {
            c.checked = Some(done.clone());
        }
        Some(done)
    }

    /// The checked state digest of `signer`'s stable checkpoint (checking it now if needed).
    fn checked_stable(&mut self, signer: NodeId) -> Option<Digest> {
        let (_, vc) = self.vcs.get(&signer)?;
        if let Some(d) = vc.stable_state {
            return Some(d);
        }
        let d = self.check_stable_proof(vc.stable_seq, &vc.stable_proof)?;
        if let Some((_, vc)) = self.vcs.get_mut(&signer) {
            vc.stable_state = Some(d);
        }
        Some(d)
    }

    /// Discards `signer`'s view change after a failed check, remembering it as invalid.
    fn reject_vc(&mut self, signer: NodeId) {
        if let Some((_, vc)) = self.vcs.remove(&signer) {
            self.rejected_vcs.insert(signer, vc.head);
        }
        self.report(
            signer,
            Offence::Invalid("view change with an invalid proof"),
        );
    }

    /// Whether a view-change message for `view` from `from` is still of use.
    fn wants_vc(&self, from: NodeId, view: u64) -> bool {
        !(view < self.view
            || (view == self.view && self.active)
            || self.vcs.get(&from).is_some_and(|(old, _)| *old >= view))
    }

    fn on_view_change(
        &mut self,
        now: Timestamp,
        from: NodeId,
        vc: ViewChange,
        env: SignedEnvelope,
    ) {
        let v = vc.new_view;
        if v < self.view || (v == self.view && self.active) {
            // A late view change for the view we lead: resend our new-view to its sender.
            if let Some((nv_view, nv)) = &self.new_view_sent
                && *nv_view == self.view
                && v == self.view
            {
                self.out.push_back(Command::Send {
                    to: from,
                    envelope: nv.clone(),
                });
            }
            return;
        }
        if !self.wants_vc(from, v) {
            return;
        }
        let head = Digest::of_envelope(&env);
        if self.rejected_vcs.get(&from) == Some(&head) {
            return;
        }
        match self.partial_vcs.get(&from) {
            Some(p) if p.view > v => return,
            // One head per signer and view: the first one wins.
            Some(p) if p.view == v && p.head_msg.is_some() => return,
            // Proof parts for this head arrived first.
            Some(p) if p.view == v && p.head == head => {}
            _ => {
                self.partial_vcs.insert(
                    from,
                    PartialVc {
                        view: v,
                        head,
                        head_msg: None,
                        parts: BTreeMap::new(),
                    },
                );
            }
        }
        if let Some(p) = self.partial_vcs.get_mut(&from) {
            p.head_msg = Some((env, vc));
        }
        self.try_complete_vc(now, from);
    }

    fn on_vc_proofs(
        &mut self,
        now: Timestamp,
        from: NodeId,
        part: ViewChangeProofs,
        env: SignedEnvelope,
    ) {
        let v = part.new_view;
        if !self.wants_vc(from, v) || self.rejected_vcs.get(&from) == Some(&part.head) {
            return;
        }
        let p = self.partial_vcs.entry(from).or_insert_with(|| PartialVc {
            view: v,
            head: part.head,
            head_msg: None,
            parts: BTreeMap::new(),
        });
        if p.view > v {
            return;
        }
        if p.view < v || (p.head != part.head && p.head_msg.is_none()) {
            *p = PartialVc {
                view: v,
                head: part.head,
                head_msg: None,
                parts: BTreeMap::new(),
            };
        }
        let held: usize = p.parts.values().map(|(_, x)| x.len()).sum();
        if p.head != part.head
            || p.parts.contains_key(&part.first)
            || held + part.proofs.len() > MAX_PREPARED
        {
            return;
        }
        p.parts.insert(part.first, (env, part.proofs));
        self.try_complete_vc(now, from);
    }

    /// Validates `from`'s view change once its head and every proof part are in.
    fn try_complete_vc(&mut self, now: Timestamp, from: NodeId) {
        let Some(p) = self.partial_vcs.get(&from) else {
            return;
        };
        let Some((_, head)) = &p.head_msg else {
            return;
        };
        let mut next = 0usize;
        for (first, (_, proofs)) in &p.parts {
            if *first as usize != next {
                return;
            }
            next += proofs.len();
        }
        if next != head.prepared.len() || p.parts.len() != head.proof_parts as usize {
            return;
        }
        let Some(p) = self.partial_vcs.remove(&from) else {
            return;
        };
        let Some((head_env, head)) = p.head_msg else {
            return;
        };
        let parts = p.parts.into_values().collect();
        let Some(valid) = self.validate_vc(&head, head_env, parts) else {
            self.rejected_vcs.insert(from, p.head);
            self.report(from, Offence::Invalid("malformed view change"));
            return;
        };
        self.vcs.insert(from, (head.new_view, valid));
        self.after_vc(now);
        if let Some((p, nv, asked)) = self.pending_nv.take()
            && nv.view >= self.view
        {
            self.on_new_view(now, p, nv, asked);
        }
    }

    fn after_vc(&mut self, now: Timestamp) {
        if !self.is_member() {
            return;
        }
        let f = self.committee.f();
        // Section 4.5.2: f+1 view changes for higher views make us join the smallest of them.
        let mut higher: Vec<u64> = self
            .vcs
            .iter()
            .filter(|(n, _)| **n != self.me)
            .map(|(_, (v, _))| *v)
            .filter(|v| *v > self.view)
            .collect();
        higher.sort_unstable();
        if higher.len() > f {
            let target = higher[0];
            if target > self.view {
                self.start_view_change(now, target);
                return;
            }
        }
        if self.active {
            return;
        }
        let view = self.view;
        let quorum = self.committee.quorum();
        // Section 4.4 starts the timer once 2f+1 replicas are changing to this view. A
        // replica that already asks for a later view counts too: its view change for this
        // one is replaced by the later one (the latest per signer is kept), and it will not
        // come back. Counting only exact matches left replicas stuck with no timer when some
        // honest ones had moved on after receiving the 2f+1 this one never completed, and too
        // few (<= f, the Byzantine silent) asked for the later view to pull it along (n = 16
        // sweep, seed 475).
        let count = self.vcs.values().filter(|(v, _)| *v >= view).count();
        if count >= quorum && self.vc_deadline.is_none() {
            self.vc_deadline = Some(Timestamp(now.0 + self.vc_timeout()));
        }
        if self.committee.primary(view) != self.me
            || self.new_view_sent.as_ref().is_some_and(|(v, _)| *v >= view)
        {
            return;
        }
        loop {
            let votes: Vec<NodeId> = self
                .vcs
                .iter()
                .filter(|(_, (v, _))| *v == view)
                .map(|(n, _)| *n)
                .collect();
            if votes.len() < quorum {
                return;
            }
            match self.compute_o(&votes) {
                Ok(o) => return self.send_new_view(now, view, &votes, o),
                // A view change whose chosen proof failed: drop it and try without it.
                Err(bad) => self.reject_vc(bad),
            }
        }
    }

    /// Computes `O` from the view changes of `votes` (section 4.4), checking the proofs it
    /// relies on; `Err(signer)` names a view change whose chosen proof does not hold.
    fn compute_o(&mut self, votes: &[NodeId]) -> Result<Reproposals, NodeId> {
        // min-s: the highest stable checkpoint in V (the last of equals, in V's order).
        let mut best: Option<(u64, NodeId)> = None;
        let mut max_s = 0;
        for n in votes {
            let Some((_, vc)) = self.vcs.get(n) else {
                return Err(*n);
            };
            if best.is_none_or(|(s, _)| vc.stable_seq >= s) {
                best = Some((vc.stable_seq, *n));
            }
            max_s = max_s.max(vc.prepared.keys().next_back().copied().unwrap_or(0));
        }
        let Some((min_s, best)) = best else {
            return Err(self.me);
        };
        let min_state = self.checked_stable(best).ok_or(best)?;
        let min_proof = self
            .vcs
            .get(&best)
            .map(|(_, vc)| vc.stable_proof.clone())
            .unwrap_or_default();
        let max_s = max_s.max(min_s);
        let mut slots = BTreeMap::new();
        let null = Digest::of_batch(&[]);
        for seq in min_s + 1..=max_s {
            // The claim with the highest view for seq (the last of equals, in V's order).
            let mut top: Option<((u64, Digest), NodeId)> = None;
            for n in votes {
                if let Some(c) = self.vcs.get(n).and_then(|(_, vc)| vc.prepared.get(&seq)) {
                    let key = (c.slot.view, c.slot.digest);
                    if top.is_none_or(|(k, _)| key >= k) {
                        top = Some((key, *n));
                    }
                }
            }
            match top {
                Some((_, n)) => {
                    let (pp, holders) = self.checked_claim(n, seq).ok_or(n)?;
                    slots.insert(seq, (pp.slot.digest, Some(pp.time), holders));
                }
                None => {
                    slots.insert(seq, (null, None, Vec::new()));
                }
            }
        }
        Ok(Reproposals {
            min_s,
            min_state,
            min_proof,
            slots,
        })
    }

    fn send_new_view(&mut self, now: Timestamp, view: u64, votes: &[NodeId], o: Reproposals) {
        let mut headers = Vec::new();
        for (seq, (digest, time, _)) in &o.slots {
            let pp = PrePrepare {
                slot: Slot {
                    view,
                    seq: *seq,
                    digest: *digest,
                },
                time: time.unwrap_or(now),
            };
            let Some(h) = self.sign(ConsensusMsg::PrePrepare(pp)) else {
                return;
            };
            headers.push((h, pp));
        }
        let vcs: Vec<&ValidVc> = votes
            .iter()
            .filter_map(|n| self.vcs.get(n).map(|(_, vc)| vc))
            .collect();
        let nv = NewView {
            view,
            view_changes: vcs.iter().map(|v| (v.signer, v.head)).collect(),
            proposals: headers.iter().map(|(h, _)| h.clone()).collect(),
        };
        let served: Vec<SignedEnvelope> = vcs.iter().flat_map(|v| v.envelopes.clone()).collect();
        let Some(env) = self.sign(ConsensusMsg::NewView(nv)) else {
            return;
        };
        self.new_view_sent = Some((view, env.clone()));
        self.new_view_votes = served;
        self.out.push_back(Command::Broadcast(env));
        self.install_new_view(now, view, o, headers);
    }

    fn on_new_view(&mut self, now: Timestamp, from: NodeId, nv: NewView, asked: bool) {
        if nv.view < self.view
            || (nv.view == self.view && self.active)
            || from != self.committee.primary(nv.view)
        {
            return;
        }
        let mut votes = Vec::new();
        let mut signers = BTreeSet::new();
        let mut missing = false;
        for (signer, digest) in &nv.view_changes {
            if !self.committee.contains(signer) || !signers.insert(*signer) {
                return self.report(
                    from,
                    Offence::Invalid("new view with a foreign or repeated view change"),
                );
            }
            match self.vcs.get(signer) {
                Some((v, vc)) if *v == nv.view && vc.head == *digest => {
                    votes.push(*signer);
                }
                _ => missing = true,
            }
        }
        if missing {
            // We lack some of V: keep the new view and ask its primary for them.
            if !asked && let Some(f) = self.sign(ConsensusMsg::FetchViewChanges { view: nv.view }) {
                self.out.push_back(Command::Send {
                    to: from,
                    envelope: f,
                });
            }
            self.pending_nv = Some((from, nv, true));
            return;
        }
        if votes.len() < self.committee.quorum() {
            return self.report(from, Offence::Invalid("new view without a quorum"));
        }
        // Recompute O and compare (section 4.4).
        let o = match self.compute_o(&votes) {
            Ok(o) => o,
            Err(bad) => {
                // The primary built O on a proof that does not hold.
                self.reject_vc(bad);
                return self.report(from, Offence::Invalid("new view on an invalid view change"));
            }
        };
        if o.slots.len() != nv.proposals.len() {
            return self.report(from, Offence::Invalid("new view with a wrong O"));
        }
        let mut headers = Vec::with_capacity(o.slots.len());
        for ((seq, (digest, time, _)), h) in o.slots.iter().zip(&nv.proposals) {
            let Some((signer, pp)) = open_header(h) else {
                return self.report(from, Offence::Invalid("new view with a bad pre-prepare"));
            };
            let ok = signer == from
                && pp.slot
                    == Slot {
                        view: nv.view,
                        seq: *seq,
                        digest: *digest,
                    }
                && time.is_none_or(|t| t == pp.time);
            if !ok {
                return self.report(from, Offence::Invalid("new view with a wrong O"));
            }
            headers.push((h.clone(), pp));
        }
        self.install_new_view(now, nv.view, o, headers);
    }

    fn install_new_view(
        &mut self,
        now: Timestamp,
        view: u64,
        o: Reproposals,
        headers: Vec<(SignedEnvelope, PrePrepare)>,
    ) {
        self.view = view;
        self.active = true;
        self.vc_deadline = None;
        self.vc_attempts = 0;
        self.my_vc.clear();
        self.pending_nv = None;
        self.proposed.clear();
        self.missing.clear();
        self.vcs.retain(|_, (v, _)| *v > view);
        self.partial_vcs.retain(|_, p| p.view > view);
        if o.min_s > self.low {
            if self.last_exec >= o.min_s && self.exec_states.get(&o.min_s) == Some(&o.min_state) {
                self.make_stable(o.min_s, o.min_state, o.min_proof);
            } else {
                // Bounded like checkpoints (on_checkpoint): prepared slots stay within 5L of
                // our own stable checkpoint, all of which our view changes can claim.
                let cap = self.low + 4 * self.cfg.log_window;
                self.known_stable = self.known_stable.max(o.min_s.min(cap));
                self.send_fetch();
            }
        }
        let max_s = o.slots.keys().copied().max().unwrap_or(o.min_s);
        let null = Digest::of_batch(&[]);
        let primary = self.committee.primary(view);
        for (h, pp) in headers {
            let slot = pp.slot;
            if !self.in_window(slot.seq) {
                continue;
            }
            let entry = self.log.entry(slot.seq).or_default();
            entry
                .first_vote
                .insert((KIND_HEADER, view, primary), (slot.digest, h.clone()));
            let batch = if slot.digest == null {
                Some(Vec::new())
            } else {
                entry.batches.get(&slot.digest).cloned()
            };
            if let Some(batch) = batch {
                self.accept_pre_prepare(h, pp, batch);
                continue;
            }
            // The batch is not here: record the header (so votes for it count) and fetch the
            // batch from the nodes that vouched for holding it.
            entry.headers.insert(view, (h.clone(), pp));
            let mut holders: Vec<NodeId> = o
                .slots
                .get(&slot.seq)
                .map(|s| s.2.clone())
                .unwrap_or_default();
            holders.retain(|n| *n != self.me);
            if holders.is_empty() {
                holders = self
                    .committee
                    .members()
                    .iter()
                    .copied()
                    .filter(|n| *n != self.me)
                    .collect();
            }
            self.missing.insert(
                slot.seq,
                MissingBatch {
                    header: h,
                    pp,
                    holders,
                    next: 0,
                },
            );
        }
        self.fetch_missing();
        self.next_seq = (max_s + 1).max(self.last_exec + 1);
        self.out
            .push_back(Command::NewViewInstalled { view, primary });
        if !self.pending.is_empty() {
            self.progress_deadline = Some(Timestamp(now.0 + self.vc_timeout()));
        }
        self.try_propose(now);
    }

    // ----- batch fetching (re-proposed slots) ---------------------------------------------

    /// Asks the next holder of every missing batch.
    fn fetch_missing(&mut self) {
        let mut asks = Vec::new();
        for (seq, m) in &mut self.missing {
            if m.holders.is_empty() {
                continue;
            }
            let to = m.holders[m.next % m.holders.len()];
            m.next = m.next.wrapping_add(1);
            asks.push((to, *seq, m.pp.slot.digest));
        }
        for (to, seq, digest) in asks {
            if let Some(f) = self.sign(ConsensusMsg::FetchBatch { seq, digest }) {
                self.out.push_back(Command::Send { to, envelope: f });
            }
        }
    }

    fn on_fetch_batch(&mut self, from: NodeId, seq: u64, digest: Digest) {
        let batch = self
            .log
            .get(&seq)
            .and_then(|e| e.batches.get(&digest))
            .map(|b| envelopes(b))
            .or_else(|| {
                self.certs
                    .get(&seq)
                    .map(|(c, _)| c)
                    .filter(|c| {
                        open_header(&c.pre_prepare).is_some_and(|(_, pp)| pp.slot.digest == digest)
                    })
                    .map(|c| c.batch.clone())
            });
        if let Some(batch) = batch
            && let Some(env) = self.sign(ConsensusMsg::Batch { seq, batch })
        {
            self.out.push_back(Command::Send {
                to: from,
                envelope: env,
            });
        }
    }

    fn on_batch(&mut self, seq: u64, batch: Vec<SignedEnvelope>) {
        let Some(m) = self.missing.get(&seq) else {
            return;
        };
        if Digest::of_batch(&batch) != m.pp.slot.digest {
            return;
        }
        let Some(verified) = verify_batch(&batch) else {
            return;
        };
        let Some(m) = self.missing.remove(&seq) else {
            return;
        };
        if m.pp.slot.view != self.view || !self.active {
            return;
        }
        self.accept_pre_prepare(m.header, m.pp, verified);
    }
}

/// The nodes that vouched for holding the batch of a prepared certificate: the one reporting
/// it, the primary that proposed it and the backups that prepared it.
fn holders(
    committee: &Committee,
    reporter: NodeId,
    pp: &PrePrepare,
    proof: &PreparedProof,
) -> Vec<NodeId> {
    let mut out = vec![reporter, committee.primary(pp.slot.view)];
    for v in &proof.prepares {
        if let Some(n) = committee.member(v.signer)
            && !out.contains(&n)
        {
            out.push(n);
        }
    }
    out.dedup();
    out
}

/// Encoded size of a prepared certificate.
fn payload_size(p: &PreparedProof) -> usize {
    let mut bytes = Vec::new();
    match ciborium::into_writer(p, &mut bytes) {
        Ok(()) => bytes.len(),
        Err(_) => MAX_PROOF_PART_BYTES,
    }
}

/// The prepares of one `(view, digest)` that quote `header`.
fn quoting<'a>(
    prepares: &'a BTreeMap<NodeId, (SignedEnvelope, SignedEnvelope)>,
    header: &'a SignedEnvelope,
) -> impl Iterator<Item = (&'a NodeId, &'a (SignedEnvelope, SignedEnvelope))> + 'a {
    prepares
        .iter()
        .filter(move |(_, (_, quoted))| quoted == header)
}

/// Verifies every request of a batch; `None` if one does not verify.
fn verify_batch(batch: &[SignedEnvelope]) -> Option<Vec<Verified<Request>>> {
    if batch.len() > MAX_BATCH {
        return None;
    }
    batch
        .iter()
        .map(|r| r.clone().verify::<Request>().ok())
        .collect()
}

fn envelopes(batch: &[Verified<Request>]) -> Vec<SignedEnvelope> {
    batch.iter().map(|r| r.envelope().clone()).collect()
}
