//! The node's driver of the ASS state-sync engine (`dwcp-statesync`): the cluster document in
//! sled, Automerge sync over the mesh, metrics, and the local API of `dwcp-cli state-sync` and
//! `dwcp-cli gossip status`.
//!
//! ```text
//!  daemon ── Input (bounded) ──> driver task ── owns ──> Engine<CommitteeVerifier> (pure)
//!   │  frames from /dwcp/sync/3.0.0                 │        │ poll_command()
//!   │  nudges from gossip topic .../statesync       │        v
//!   │  peer up/down, own announcement/heartbeat,    │   Send  -> Client::request(peer, Sync)
//!   │  certified quarantine decisions (consensus)   │
//!   │                                               │   Publish -> gossipsub nudge
//!   └─ API handlers ── Query (oneshot) ────────────>│   ReportPeer -> log + metric (reputation later)
//!                                                   └─ sled tree "statesync": save() every
//!                                                      persist_interval when heads moved, and at stop
//! ```
//!
//! On the wire (service `Sync`) the first byte says what follows: `0` an engine frame (one-way;
//! the answer is an empty acknowledgement, anything else counts as a failed send), `1` a
//! checksum query (the answer is [`encode_checksum`]'s bytes), `2` a compaction cut query
//! (epoch, u64 BE; the answer is the certificate of that epoch's committed cut, or `0xff`), `3`
//! an endorsement request (CBOR [`CutSpec`]; the answer is this node's signed endorsement,
//! given only when its document holds every head and builds the same snapshot, or `0xff`),
//! `4` a snapshot request (epoch and offset; the answer is a chunk of that epoch's base
//! change). Frames are accepted only from
//! peers whose signed announcement we hold, and at most [`PEER_BYTES_PER_SEC`] per peer per
//! second: the engine checks every change's signature and ownership, which costs CPU a
//! stranger must not be able to spend.
//!
//! **Compaction.** A committed cut ([`crate::cert::CutDecisionOp`], proposed by
//! [`crate::compaction`]) reaches a member's driver from its consensus driver
//! ([`Input::Cut`]); the driver keeps the certificate in sled (`cut/<epoch>`) and compacts as
//! soon as its document holds the cut's heads. A node that meets a peer on a later epoch (the
//! engine's `EpochMismatch`) asks the committee members for that epoch's cut and takes it
//! once f+1 of them answer with the same verifying cut. A node that cannot compact (it lacks
//! the heads for [`ADOPT_AFTER`], or it is more than one epoch behind, or it is new) downloads
//! the snapshot (the base change) from a member and adopts it if it hashes to the base the
//! cut certifies.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use dwcp_net::{Client, GossipMessage, PeerId, ReplyHandle, Service, Validation};
use dwcp_protocol::{
    HealthStatus, Heartbeat, NodeAnnouncement, NodeId, NodeKey, SignedEnvelope, Timestamp,
    Verified, VmId,
    api::{
        ClusterVmRecord, ForceSyncRequest, GossipStatus, SyncChecksum, SyncLagRow, SyncLagStatus,
        SyncSessionRow, SyncVerdict, SyncVerifyReport, SyncVerifyRow,
    },
};
use dwcp_statesync::{
    Certified, ChangeHash, ClusterDoc, Command, Config, Engine, Offence, QuarantineDecision,
    VmDecision, VmRecord,
};
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::{
    cert::{CommitteeVerifier, CutDecisionOp, CutSpec},
    config::AssSection,
    daemon::Shared,
};

/// Tag of an engine frame on the sync service.
const TAG_FRAME: u8 = 0;
/// Tag of a checksum query on the sync service.
const TAG_CHECKSUM: u8 = 1;
/// Tag of a compaction cut query on the sync service.
const TAG_CUT: u8 = 2;
/// Tag of an endorsement request on the sync service.
pub const TAG_ENDORSE: u8 = 3;
/// Tag of a snapshot request on the sync service: epoch (u64 BE), offset (u32 BE); the
/// answer is the total length (u32 BE) and up to [`BASE_CHUNK`] bytes of that epoch's base
/// change from the offset on, or `0xff`.
const TAG_BASE: u8 = 4;
/// Bytes of a snapshot per answer.
const BASE_CHUNK: usize = 512 * 1024;
/// What an endorsement request is charged to the peer's byte budget (it makes this node build
/// a snapshot): at most a few per second per peer.
const ENDORSE_COST: usize = 2 * 1024 * 1024;
/// Largest snapshot a node downloads.
const MAX_BASE_BYTES: usize = 256 * 1024 * 1024;
/// How long a node waits for a cut's heads before it takes the snapshot from a peer.
const ADOPT_AFTER: Duration = Duration::from_secs(10);
/// Longest endorsement request body (a CBOR [`CutSpec`] with at most 64 heads).
const MAX_ENDORSE_REQUEST: usize = 4096;
/// Committed cuts kept in sled to answer nodes that are behind.
const KEEP_CUTS: usize = 8;
/// How long a node waits before asking again for a cut it could not learn.
const CUT_RETRY: Duration = Duration::from_secs(5);
/// The sled key prefix of committed cuts.
const CUT_PREFIX: &[u8] = b"cut/";
/// The sled key of the saved document.
const DOC_KEY: &[u8] = b"doc";
/// Sync bytes accepted from one peer per second (burst: twice that).
pub const PEER_BYTES_PER_SEC: u64 = 4 * 1024 * 1024;
/// Outbound sync requests in flight at once.
const MAX_IN_FLIGHT: usize = 64;
/// Most heads carried in a checksum answer.
const MAX_HEADS: usize = 64;

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the daemon and the API hand to the driver.
#[derive(Debug)]
pub enum Input {
    /// An engine frame a member sent us (already acknowledged).
    Frame {
        /// Sender.
        peer: NodeId,
        /// Frame bytes without the tag.
        data: Vec<u8>,
    },
    /// A nudge from the gossip topic; the driver reports the validation verdict.
    Nudge(GossipMessage),
    /// A member is connected: start a session.
    Connected(NodeId),
    /// A member's last connection closed.
    Disconnected(NodeId),
    /// Sending to a peer failed.
    SendFailed(NodeId),
    /// Our own new announcement.
    Announcement(NodeAnnouncement),
    /// Our own heartbeat.
    Heartbeat(Heartbeat),
    /// A committed quarantine decision with its certificate, from the consensus driver: write
    /// it into the document after `delay` unless a record at least as new arrived by then.
    Quarantine {
        /// The decision and its certificate.
        decision: Certified<QuarantineDecision>,
        /// How long to wait for another node's write first.
        delay: Duration,
    },
    /// A committed VM decision with its certificate, from the node that submitted it (the
    /// placing node, or the host for later states): written at once.
    Vm(Certified<VmDecision>),
    /// The certificate of a committed compaction cut (from the consensus driver, the
    /// proposer, or learned from f+1 members): kept, and applied once the heads are here.
    Cut(Vec<u8>),
    /// A downloaded snapshot of `epoch` (checked against the kept cut before use).
    Base {
        /// Its epoch.
        epoch: u64,
        /// The base change's bytes.
        bytes: Vec<u8>,
    },
    /// An API query.
    Query(Query),
}

/// Questions the API asks the driver.
#[derive(Debug)]
pub enum Query {
    /// Lag table and counters.
    Lag(oneshot::Sender<SyncLagStatus>),
    /// Our checksum.
    Checksum(oneshot::Sender<SyncChecksum>),
    /// Our checksum as the wire answer of a checksum query.
    ChecksumBytes(oneshot::Sender<Vec<u8>>),
    /// Plain Automerge bytes of the document.
    Export(oneshot::Sender<Vec<u8>>),
    /// Start sessions now with these peers (all connected when empty); answers how many.
    ForceSync(Vec<NodeId>, oneshot::Sender<usize>),
    /// Sessions for `gossip status`.
    Sessions(oneshot::Sender<(Vec<SyncSessionRow>, usize, u64)>),
    /// One VM's record in the document.
    Vm(VmId, oneshot::Sender<Option<VmRecord>>),
    /// Every VM record in the document.
    Vms(oneshot::Sender<Vec<ClusterVmRecord>>),
    /// Epoch, history length and heads (what a compaction proposal cuts at).
    Summary(oneshot::Sender<DocSummary>),
    /// Sign an endorsement of a cut if the document holds all its heads and builds the same
    /// snapshot.
    Endorse(CutSpec, oneshot::Sender<Result<SignedEnvelope, String>>),
    /// A cut at the current heads dropping nodes silent since the given time (ms), with the
    /// hash of the snapshot it builds.
    PlanCut(u64, oneshot::Sender<Result<CutSpec, String>>),
    /// A chunk of the current epoch's base change: (total length, bytes from the offset).
    Base(u64, usize, oneshot::Sender<Option<(usize, Vec<u8>)>>),
    /// The certificate of the committed cut of an epoch, if kept.
    Cut(u64, oneshot::Sender<Option<Vec<u8>>>),
}

/// What a compaction proposal needs to know of the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocSummary {
    /// Document epoch.
    pub epoch: u64,
    /// Changes in the history since the last compaction.
    pub changes: usize,
    /// Current heads.
    pub heads: Vec<[u8; 32]>,
}

/// The daemon's handle on the driver.
#[derive(Debug, Clone)]
pub struct StateSync {
    tx: mpsc::Sender<Input>,
    quarantined: watch::Receiver<BTreeSet<NodeId>>,
    budget: Arc<Mutex<PeerBudget>>,
    frames_refused: IntCounterVec,
}

impl StateSync {
    /// Whether the document holds a certified quarantine of `node` (how a node outside the
    /// committee, which runs no replica, learns quarantines).
    pub fn is_quarantined(&self, node: &NodeId) -> bool {
        self.quarantined.borrow().contains(node)
    }
}

impl StateSync {
    /// Hands an input to the driver without waiting; false when its queue is full (the
    /// input is dropped: sessions recover through anti-entropy).
    pub fn offer(&self, input: Input) -> bool {
        self.tx.try_send(input).is_ok()
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Query) -> anyhow::Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::Query(make(tx)))
            .await
            .map_err(|_| anyhow::anyhow!("the state-sync driver has stopped"))?;
        tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .context("the state-sync driver did not answer within 30 s")?
            .map_err(|_| anyhow::anyhow!("the state-sync driver has stopped"))
    }
}

/// Encodes a checksum answer: epoch (u64 BE), checksum (32), head count (u16 BE), heads (32 each).
pub fn encode_checksum(epoch: u64, checksum: &[u8; 32], heads: &[ChangeHash]) -> Vec<u8> {
    let heads = &heads[..heads.len().min(MAX_HEADS)];
    let mut out = Vec::with_capacity(8 + 32 + 2 + 32 * heads.len());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(checksum);
    out.extend_from_slice(&(heads.len() as u16).to_be_bytes());
    for h in heads {
        out.extend_from_slice(&h.0);
    }
    out
}

/// Decodes [`encode_checksum`]'s bytes, refusing anything malformed.
pub fn decode_checksum(node: NodeId, b: &[u8]) -> Result<SyncChecksum, &'static str> {
    if b.len() < 42 {
        return Err("checksum answer too short");
    }
    let epoch = u64::from_be_bytes(b[..8].try_into().map_err(|_| "epoch")?);
    let checksum = hex::encode(&b[8..40]);
    let n = usize::from(u16::from_be_bytes([b[40], b[41]]));
    if n > MAX_HEADS || b.len() != 42 + 32 * n {
        return Err("checksum answer has a bad head count");
    }
    let heads = b[42..].chunks_exact(32).map(hex::encode).collect();
    Ok(SyncChecksum {
        node,
        epoch,
        checksum,
        heads,
    })
}

fn hex_heads(heads: &[ChangeHash]) -> Vec<String> {
    heads.iter().map(|h| hex::encode(h.0)).collect()
}

/// The sync metrics (manual 4.2: `dwcp_state_sync_lag_seconds`).
#[derive(Debug, Clone)]
struct SyncMetrics {
    lag: IntGaugeVec,
    max_lag: IntGauge,
    conflicts: IntGaugeVec,
    nodes: IntGauge,
    frames_sent: IntCounter,
    bytes_sent: IntCounter,
    frames_received: IntCounter,
    bytes_received: IntCounter,
    changes_applied: IntCounter,
    changes_rejected: IntCounter,
    session_resets: IntCounter,
    peers_reported: IntCounterVec,
    frames_refused: IntCounterVec,
    doc_bytes: IntGauge,
    epoch: IntGauge,
    compactions: IntCounter,
    last: dwcp_statesync::SyncStats,
}

impl SyncMetrics {
    fn new(r: &Registry) -> Result<Self, prometheus::Error> {
        let reg = crate::metrics::Reg(r);
        Ok(Self {
            lag: reg.gv(
                "dwcp_state_sync_lag_seconds",
                "Age of this node's view of each node: now minus that node's newest heartbeat in the cluster document",
                &["node"],
            )?,
            max_lag: reg.g(
                "dwcp_state_sync_max_lag_seconds",
                "Largest dwcp_state_sync_lag_seconds over all nodes",
            )?,
            conflicts: reg.gv(
                "dwcp_state_sync_conflicts",
                "Keys of the cluster document with concurrent values, by kind",
                &["kind"],
            )?,
            nodes: reg.g(
                "dwcp_state_sync_nodes",
                "Node entries in the cluster document",
            )?,
            frames_sent: reg.c(
                "dwcp_state_sync_frames_sent_total",
                "Sync frames and nudges sent",
            )?,
            bytes_sent: reg.c(
                "dwcp_state_sync_bytes_sent_total",
                "Bytes of sync frames and nudges sent",
            )?,
            frames_received: reg.c(
                "dwcp_state_sync_frames_received_total",
                "Sync frames and nudges received",
            )?,
            bytes_received: reg.c(
                "dwcp_state_sync_bytes_received_total",
                "Bytes of sync frames and nudges received",
            )?,
            changes_applied: reg.c(
                "dwcp_state_sync_changes_applied_total",
                "Changes from the network that passed validation and were applied",
            )?,
            changes_rejected: reg.c(
                "dwcp_state_sync_changes_rejected_total",
                "Changes from the network refused by signature or ownership checks",
            )?,
            session_resets: reg.c(
                "dwcp_state_sync_session_resets_total",
                "Sync sessions reset (reconnect, failed send, overdue reply)",
            )?,
            peers_reported: reg.cv(
                "dwcp_state_sync_peers_reported_total",
                "Peers reported for sending malformed frames or refused changes",
                &["offence"],
            )?,
            frames_refused: reg.cv(
                "dwcp_state_sync_frames_refused_total",
                "Inbound sync frames dropped before the engine: from non-members, over the per-peer rate, queue full, malformed",
                &["reason"],
            )?,
            doc_bytes: reg.g(
                "dwcp_state_sync_document_bytes",
                "Size of the saved cluster document (history and signatures)",
            )?,
            epoch: reg.g(
                "dwcp_state_sync_epoch",
                "Document epoch: compactions at committed cuts so far",
            )?,
            compactions: reg.c(
                "dwcp_state_sync_compactions_total",
                "Compactions of the cluster document at committed cuts since start",
            )?,
            last: dwcp_statesync::SyncStats::default(),
        })
    }

    fn update(&mut self, now: Timestamp, doc: &ClusterDoc, s: dwcp_statesync::SyncStats) {
        self.epoch.set(doc.epoch() as i64);
        let lag = doc.lag(now);
        self.lag.reset();
        let mut max = 0;
        for (id, l) in &lag {
            if let Some(ms) = l {
                let secs = (ms / 1000) as i64;
                max = max.max(secs);
                self.lag.with_label_values(&[&id.short()]).set(secs);
            }
        }
        self.max_lag.set(max);
        self.nodes.set(lag.len() as i64);
        let c = doc.conflicts();
        for (k, v) in [
            ("nodes", c.nodes),
            ("vms", c.vms),
            ("quarantine", c.quarantine),
        ] {
            self.conflicts.with_label_values(&[k]).set(v as i64);
        }
        let inc = |m: &IntCounter, new: u64, old: u64| m.inc_by(new.saturating_sub(old));
        let o = self.last;
        inc(&self.frames_sent, s.frames_sent, o.frames_sent);
        inc(&self.bytes_sent, s.bytes_sent, o.bytes_sent);
        inc(&self.frames_received, s.frames_received, o.frames_received);
        inc(&self.bytes_received, s.bytes_received, o.bytes_received);
        inc(&self.changes_applied, s.changes_applied, o.changes_applied);
        inc(
            &self.changes_rejected,
            s.changes_rejected,
            o.changes_rejected,
        );
        inc(&self.session_resets, s.session_resets, o.session_resets);
        self.last = s;
    }
}

/// A token bucket per peer, refilled from the monotonic clock.
#[derive(Debug, Default)]
struct PeerBudget {
    buckets: BTreeMap<NodeId, (f64, Instant)>,
}

impl PeerBudget {
    fn admit(&mut self, peer: NodeId, bytes: usize, now: Instant) -> bool {
        let cap = 2.0 * PEER_BYTES_PER_SEC as f64;
        let (tokens, at) = self.buckets.entry(peer).or_insert((cap, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * PEER_BYTES_PER_SEC as f64).min(cap);
        *at = now;
        if *tokens >= bytes as f64 {
            *tokens -= bytes as f64;
            true
        } else {
            false
        }
    }
}

/// Most certified records waiting to be written.
const MAX_PENDING_RECORDS: usize = 256;

struct Driver {
    engine: Engine<CommitteeVerifier>,
    /// Certified quarantine records to write when due.
    pending: Vec<(Instant, Certified<QuarantineDecision>)>,
    client: Client,
    topic: String,
    tree: sled::Tree,
    tx: mpsc::Sender<Input>,
    in_flight: Arc<Semaphore>,
    metrics: SyncMetrics,
    saved_heads: Vec<ChangeHash>,
    last_hb_write: Option<Instant>,
    last_hb_status: Option<HealthStatus>,
    max_staleness: Duration,
    /// Nodes the document's certified records quarantine.
    quarantined: watch::Sender<BTreeSet<NodeId>>,
    /// Signs endorsements of compaction cuts.
    key: NodeKey,
    /// Committed cuts by epoch: the operation and its certificate (the last [`KEEP_CUTS`]).
    cuts: BTreeMap<u64, (CutDecisionOp, Vec<u8>)>,
    /// The epoch whose cut is being asked for, and since when.
    learning: Option<(u64, Instant)>,
    /// The next epoch's cut waits for heads since then.
    stuck: Option<(u64, Instant)>,
    /// The epoch whose snapshot is being downloaded, and since when.
    fetching: Option<(u64, Instant)>,
    /// The last cut this node endorsed (a proposer asks again until it has f+1).
    endorsed: Option<(CutSpec, SignedEnvelope)>,
}

/// What the driver needs to start.
#[derive(Debug)]
pub struct SyncSetup<'a> {
    /// `ass:` configuration.
    pub cfg: &'a AssSection,
    /// The node key (actor id and change signatures).
    pub key: NodeKey,
    /// Cluster id.
    pub cluster_id: &'a str,
    /// The sled tree holding the saved document.
    pub tree: sled::Tree,
    /// The network.
    pub client: Client,
    /// The nudge topic.
    pub topic: String,
    /// Where the metrics register.
    pub registry: &'a Registry,
    /// Turns true at shutdown.
    pub stop: watch::Receiver<bool>,
    /// Checks the commit certificates of VM and quarantine records (the genesis committee).
    pub verifier: CommitteeVerifier,
}

/// Starts the driver: loads the document from sled (or creates it) and spawns the task. The
/// task stops when `stop` turns true, after a final save.
pub fn spawn(setup: SyncSetup<'_>) -> anyhow::Result<(StateSync, tokio::task::JoinHandle<()>)> {
    let SyncSetup {
        cfg,
        key,
        cluster_id,
        tree,
        client,
        topic,
        registry,
        stop,
        verifier,
    } = setup;
    let me = key.node_id();
    let doc = match tree.get(DOC_KEY).context("reading the state document")? {
        Some(bytes) => match ClusterDoc::load(key.clone(), cluster_id, &bytes) {
            Ok(d) => {
                info!(
                    nodes = d.node_ids().len(),
                    vms = d.vm_count(),
                    bytes = bytes.len(),
                    "loaded the cluster document"
                );
                d
            }
            Err(e) => {
                warn!(error = %e, "the saved cluster document does not load; starting a fresh one (peers will resend the state)");
                ClusterDoc::new(key.clone(), cluster_id, wall_ms())?
            }
        },
        None => ClusterDoc::new(key.clone(), cluster_id, wall_ms())?,
    };
    // The RNG seed only spreads anti-entropy partners; any per-node value does.
    let seed = u64::from_le_bytes(me.as_bytes()[..8].try_into().unwrap_or([0; 8])) ^ wall_ms();
    let ecfg = Config::default()
        .with_fanout(cfg.gossip.fanout)
        .with_interval_ms(cfg.gossip.interval.as_millis() as u64)
        .with_seed(seed);
    let ecfg = Config {
        response_timeout_ms: ecfg.response_timeout_ms.max(3 * ecfg.interval_ms),
        ..ecfg
    }
    .validate()?;
    let engine = Engine::new(ecfg, doc, verifier)?;
    let (tx, rx) = mpsc::channel(1024);
    let saved_heads = engine.doc().heads();
    let (q_tx, q_rx) = watch::channel(engine.doc().quarantined_nodes());
    let cuts = load_cuts(&tree, engine.verifier());
    let d = Driver {
        engine,
        pending: Vec::new(),
        client,
        topic,
        tree,
        tx: tx.clone(),
        in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        metrics: SyncMetrics::new(registry)?,
        saved_heads,
        last_hb_write: None,
        last_hb_status: None,
        max_staleness: cfg.consistency.max_staleness,
        quarantined: q_tx,
        key,
        cuts,
        learning: None,
        stuck: None,
        fetching: None,
        endorsed: None,
    };
    let frames_refused = d.metrics.frames_refused.clone();
    let task = tokio::spawn(d.run(rx, stop, cfg.persist_interval));
    Ok((
        StateSync {
            tx,
            quarantined: q_rx,
            budget: Arc::default(),
            frames_refused,
        },
        task,
    ))
}

impl Driver {
    fn now(&self) -> Timestamp {
        Timestamp(wall_ms())
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
        mut stop: watch::Receiver<bool>,
        persist_every: Duration,
    ) {
        let mut persist = tokio::time::interval(persist_every);
        persist.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refresh = tokio::time::interval(Duration::from_secs(1));
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = self.engine.poll_timeout().map(|t| {
                let wait = t.as_millis().saturating_sub(wall_ms());
                tokio::time::Instant::now() + Duration::from_millis(wait)
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
                input = rx.recv() => match input {
                    Some(i) => self.on_input(i).await,
                    None => break,
                },
                () = timer => {
                    let now = self.now();
                    self.engine.handle_timeout(now);
                }
                _ = persist.tick() => self.save(false),
                _ = refresh.tick() => {
                    self.write_due_records();
                    self.try_compact();
                    let now = self.now();
                    let stats = self.engine.stats();
                    self.metrics.update(now, self.engine.doc(), stats);
                    let q = self.engine.doc().quarantined_nodes();
                    self.quarantined.send_if_modified(|old| {
                        let changed = *old != q;
                        *old = q;
                        changed
                    });
                }
            }
            self.drain(None).await;
        }
        self.save(true);
        debug!("state-sync driver stopped");
    }

    fn save(&mut self, force: bool) {
        let heads = self.engine.doc().heads();
        if !force && heads == self.saved_heads {
            return;
        }
        let bytes = self.engine.doc().save();
        self.metrics.doc_bytes.set(bytes.len() as i64);
        match self.tree.insert(DOC_KEY, bytes) {
            Ok(_) => self.saved_heads = heads,
            Err(e) => warn!(error = %e, "saving the cluster document failed"),
        }
        if force && let Err(e) = self.tree.flush() {
            warn!(error = %e, "flushing the cluster document failed");
        }
    }

    async fn on_input(&mut self, input: Input) {
        let now = self.now();
        match input {
            Input::Frame { peer, data } => self.engine.handle_message(now, peer, &data),
            Input::Nudge(m) => {
                let Some(from) = m.source.and_then(|p| NodeId::from_peer_id(&p).ok()) else {
                    let _ = self.client.report_validation(&m, Validation::Reject).await;
                    return;
                };
                self.engine.handle_nudge(now, from, &m.data);
                let verdict = self.drain(Some(from)).await;
                let _ = self.client.report_validation(&m, verdict).await;
            }
            Input::Connected(p) => self.engine.handle_peer_connected(now, p),
            Input::Disconnected(p) => self.engine.handle_peer_disconnected(now, p),
            Input::SendFailed(p) => self.engine.handle_send_failed(now, p),
            Input::Announcement(a) => {
                if let Err(e) = self.engine.write_announcement(now, &a) {
                    warn!(error = %e, "writing our announcement into the cluster document failed");
                }
            }
            Input::Heartbeat(hb) => {
                let due = self
                    .last_hb_write
                    .is_none_or(|t| t.elapsed() >= self.max_staleness)
                    || self.last_hb_status != Some(hb.health.status);
                if due {
                    match self.engine.write_heartbeat(now, &hb) {
                        Ok(()) => {
                            self.last_hb_write = Some(Instant::now());
                            self.last_hb_status = Some(hb.health.status);
                        }
                        Err(e) => {
                            warn!(error = %e, "writing our heartbeat into the cluster document failed")
                        }
                    }
                }
            }
            Input::Query(q) => self.on_query(now, q),
            Input::Vm(c) => {
                let d = &c.decision;
                if self
                    .engine
                    .doc()
                    .vm(&d.vm)
                    .is_some_and(|r| r.decision_seq >= d.decision_seq)
                {
                    return;
                }
                match self.engine.write_vm(self.now(), &c) {
                    Ok(()) => info!(
                        vm = %d.vm,
                        state = d.state.as_str(),
                        decision_seq = d.decision_seq,
                        cert_bytes = c.certificate.len(),
                        "vm record written into the cluster document"
                    ),
                    Err(e) => warn!(vm = %d.vm, error = %e, "writing a vm record failed"),
                }
            }
            Input::Cut(certificate) => self.on_cut(certificate),
            Input::Base { epoch, bytes } => self.on_base(epoch, &bytes),
            Input::Quarantine { decision, delay } => {
                if self.pending.len() >= MAX_PENDING_RECORDS {
                    warn!("too many certified records waiting; dropped the oldest");
                    self.pending.remove(0);
                }
                self.pending.push((Instant::now() + delay, decision));
                self.write_due_records();
            }
        }
    }

    /// Writes the certified records that are due, unless the document already holds a record
    /// at least as new (another node wrote it and it arrived by sync).
    fn write_due_records(&mut self) {
        let now = Instant::now();
        let (due, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(t, _)| *t <= now);
        self.pending = wait;
        for (_, c) in due {
            let d = &c.decision;
            if self
                .engine
                .doc()
                .quarantine(&d.node)
                .is_some_and(|r| r.decision_seq >= d.decision_seq)
            {
                continue;
            }
            match self.engine.write_quarantine(self.now(), &c) {
                Ok(()) => info!(
                    node = %d.node.short(),
                    decision_seq = d.decision_seq,
                    cert_bytes = c.certificate.len(),
                    "quarantine record written into the cluster document"
                ),
                Err(e) => {
                    warn!(node = %d.node.short(), error = %e, "writing a quarantine record failed")
                }
            }
        }
    }

    /// Keeps a committed cut (checked again here: it may come from the network) and compacts
    /// if its epoch is next.
    fn on_cut(&mut self, certificate: Vec<u8>) {
        let (op, _) = match self.engine.verifier().verify_cut(&certificate) {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "a compaction cut certificate does not verify; ignored");
                return;
            }
        };
        let epoch = op.cut.epoch;
        if epoch <= self.engine.doc().epoch() || self.cuts.contains_key(&epoch) {
            return;
        }
        let mut key = CUT_PREFIX.to_vec();
        key.extend_from_slice(&epoch.to_be_bytes());
        if let Err(e) = self.tree.insert(key, certificate.as_slice()) {
            warn!(error = %e, "saving a compaction cut failed");
        }
        self.cuts.insert(epoch, (op, certificate));
        while self.cuts.len() > KEEP_CUTS {
            if let Some((old, _)) = self.cuts.pop_first() {
                let mut key = CUT_PREFIX.to_vec();
                key.extend_from_slice(&old.to_be_bytes());
                let _ = self.tree.remove(key);
            }
        }
        self.try_compact();
    }

    /// Compacts at every kept cut whose epoch is next, as long as the document holds its heads
    /// (otherwise waits: anti-entropy brings them, and the refresh tick tries again). A node
    /// that waited [`ADOPT_AFTER`] for the heads, or is more than one epoch behind, downloads
    /// the latest cut's snapshot instead.
    fn try_compact(&mut self) {
        loop {
            let next = self.engine.doc().epoch() + 1;
            let Some((op, _)) = self.cuts.get(&next) else {
                break;
            };
            let cut = op.cut.to_epoch_cut();
            let certified = op.cut.base;
            let before = self.engine.doc().stats().changes;
            let now = self.now();
            match self.engine.compact(now, &cut) {
                Ok(base) => {
                    if base.0 != certified {
                        warn!(
                            epoch = next,
                            "the snapshot built here differs from the certified one"
                        );
                    }
                    self.compacted(
                        next,
                        before,
                        "compacted the cluster document at the committed cut",
                    );
                }
                Err(dwcp_statesync::CompactError::MissingHeads(n)) => {
                    debug!(epoch = next, missing = n, "waiting for the cut's heads");
                    if self.stuck.is_none_or(|(e, _)| e != next) {
                        self.stuck = Some((next, Instant::now()));
                    }
                    break;
                }
                Err(e) => {
                    warn!(epoch = next, error = %e, "compacting at the committed cut failed");
                    return;
                }
            }
        }
        let ours = self.engine.doc().epoch();
        let Some((&latest, (op, _))) = self.cuts.last_key_value() else {
            return;
        };
        let waited = self
            .stuck
            .is_some_and(|(e, t)| e == ours + 1 && t.elapsed() >= ADOPT_AFTER);
        if latest > ours + 1 || (latest == ours + 1 && waited) {
            self.fetch_base(latest, op.cut.base);
        }
    }

    fn compacted(&mut self, epoch: u64, before: usize, what: &str) {
        let after = self.engine.doc().stats().changes;
        info!(
            epoch,
            changes_before = before,
            changes_after = after,
            nodes = self.engine.doc().node_ids().len(),
            vms = self.engine.doc().vm_count(),
            "{what}"
        );
        self.metrics.compactions.inc();
        self.metrics.epoch.set(epoch as i64);
        self.learning = None;
        self.stuck = None;
        self.fetching = None;
        self.save(true);
    }

    /// Downloads the snapshot of `epoch` from a committee member (at most every
    /// [`CUT_RETRY`] twice over); the driver checks it against the certified hash.
    fn fetch_base(&mut self, epoch: u64, base: [u8; 32]) {
        if self
            .fetching
            .is_some_and(|(_, at)| at.elapsed() < 2 * CUT_RETRY)
        {
            return;
        }
        let Some(committee) = self.engine.verifier().latest() else {
            return;
        };
        self.fetching = Some((epoch, Instant::now()));
        let me = self.engine.doc().node_id();
        let (client, tx) = (self.client.clone(), self.tx.clone());
        info!(
            epoch,
            "downloading the snapshot of a later epoch from a committee member"
        );
        tokio::spawn(async move {
            for m in committee.members().iter().filter(|m| **m != me) {
                let Ok(pid) = m.to_peer_id() else { continue };
                match download_base(&client, pid, epoch).await {
                    Some(bytes)
                        if dwcp_statesync::change_hash(&bytes)
                            == Some(dwcp_statesync::ChangeHash(base)) =>
                    {
                        let _ = tx.send(Input::Base { epoch, bytes }).await;
                        return;
                    }
                    Some(_) => {
                        warn!(peer = %m.short(), epoch, "a member sent a snapshot that is not the certified one")
                    }
                    None => debug!(peer = %m.short(), epoch, "no snapshot from this member"),
                }
            }
        });
    }

    /// Adopts a downloaded snapshot if a kept cut certifies it.
    fn on_base(&mut self, epoch: u64, bytes: &[u8]) {
        let Some((op, _)) = self.cuts.get(&epoch) else {
            return;
        };
        let base = dwcp_statesync::ChangeHash(op.cut.base);
        let before = self.engine.doc().stats().changes;
        let now = self.now();
        match self.engine.adopt_base(now, epoch, bytes, base) {
            Ok(()) => self.compacted(
                epoch,
                before,
                "took the snapshot of a later epoch from a peer",
            ),
            Err(e) => warn!(epoch, error = %e, "the downloaded snapshot was refused"),
        }
    }

    /// Signs an endorsement of `spec` if it is the next epoch's cut, its departure bound is
    /// not in the future and the document holds every head.
    fn endorse(&mut self, now: Timestamp, spec: CutSpec) -> Result<SignedEnvelope, String> {
        if let Some((s, env)) = &self.endorsed
            && *s == spec
        {
            return Ok(env.clone());
        }
        let doc = self.engine.doc();
        if spec.epoch != doc.epoch() + 1 {
            return Err(format!(
                "the cut is for epoch {}, the next epoch here is {}",
                spec.epoch,
                doc.epoch() + 1
            ));
        }
        if spec.heads.is_empty() || spec.heads.len() > crate::cert::MAX_CUT_HEADS {
            return Err("a cut names 1 to 64 heads".into());
        }
        if spec.departed_before_ms > now.as_millis() {
            return Err("the departure bound is in the future".into());
        }
        let missing = spec
            .heads
            .iter()
            .filter(|h| !doc.has_change(&ChangeHash(**h)))
            .count();
        if missing > 0 {
            return Err(format!("{missing} heads of the cut are not here yet"));
        }
        match doc.cut_base(&spec.to_epoch_cut()) {
            Ok(b) if b.0 == spec.base => {}
            Ok(_) => return Err("the cut builds another snapshot here".into()),
            Err(e) => return Err(e.to_string()),
        }
        let env = Verified::sign(
            &self.key,
            dwcp_consensus::Request {
                nonce: spec.epoch,
                op: spec.endorsement_op(),
            },
        )
        .map(|v| v.envelope().clone())
        .map_err(|e| e.to_string())?;
        self.endorsed = Some((spec, env.clone()));
        Ok(env)
    }

    /// A peer is on a later epoch: ask the committee for the cut of our next epoch (at most
    /// every [`CUT_RETRY`]) and take it once f+1 members answer with the same verifying cut.
    fn learn_cut(&mut self, theirs: u64) {
        // The peer's epoch: if it is more than one ahead, only its snapshot can catch us up.
        let next = theirs;
        if next <= self.engine.doc().epoch() || self.cuts.contains_key(&next) {
            self.try_compact();
            return;
        }
        // One question at a time whatever the epoch: a peer claiming ever higher epochs must
        // not make this node flood the committee.
        if self
            .learning
            .is_some_and(|(_, at)| at.elapsed() < CUT_RETRY)
        {
            return;
        }
        let Some(committee) = self.engine.verifier().latest() else {
            return;
        };
        self.learning = Some((next, Instant::now()));
        let verifier = self.engine.verifier().clone();
        let client = self.client.clone();
        let tx = self.tx.clone();
        let me = self.engine.doc().node_id();
        tokio::spawn(async move {
            let mut asks = tokio::task::JoinSet::new();
            for m in committee.members().iter().filter(|m| **m != me) {
                let Ok(pid) = m.to_peer_id() else { continue };
                let client = client.clone();
                let member = *m;
                let mut q = vec![TAG_CUT];
                q.extend_from_slice(&next.to_be_bytes());
                asks.spawn(async move {
                    let r = tokio::time::timeout(
                        Duration::from_secs(5),
                        client.request(pid, Service::Sync, q),
                    )
                    .await;
                    (member, r.ok().and_then(|r| r.ok()))
                });
            }
            // Matching answers by the operation they prove (certificates of one decision
            // differ between members: each holds the commits that reached it first).
            let mut seen: BTreeMap<Vec<u8>, (BTreeSet<NodeId>, Vec<u8>)> = BTreeMap::new();
            while let Some(Ok((member, answer))) = asks.join_next().await {
                let Some(cert) = answer.filter(|a| a.first() != Some(&0xff) && !a.is_empty())
                else {
                    continue;
                };
                let Ok((op, _)) = verifier.verify_cut(&cert) else {
                    warn!(peer = %member.short(), "a member answered with a cut that does not verify");
                    continue;
                };
                if op.cut.epoch != next {
                    continue;
                }
                let e = seen
                    .entry(op.encode())
                    .or_insert_with(|| (BTreeSet::new(), cert));
                e.0.insert(member);
                if e.0.len() > committee.f() {
                    let _ = tx.send(Input::Cut(e.1.clone())).await;
                    return;
                }
            }
            debug!(epoch = next, "fewer than f+1 members answered with the cut");
        });
    }

    fn checksum(&self) -> SyncChecksum {
        let doc = self.engine.doc();
        SyncChecksum {
            node: doc.node_id(),
            epoch: doc.epoch(),
            checksum: hex::encode(doc.state_checksum()),
            heads: hex_heads(&doc.heads()),
        }
    }

    fn on_query(&mut self, now: Timestamp, q: Query) {
        match q {
            Query::Vm(vm, reply) => {
                let _ = reply.send(self.engine.doc().vm(&vm));
            }
            Query::Summary(reply) => {
                let doc = self.engine.doc();
                let _ = reply.send(DocSummary {
                    epoch: doc.epoch(),
                    changes: doc.stats().changes,
                    heads: doc.heads().into_iter().map(|h| h.0).collect(),
                });
            }
            Query::Endorse(spec, reply) => {
                let _ = reply.send(self.endorse(now, spec));
            }
            Query::PlanCut(departed_before_ms, reply) => {
                let doc = self.engine.doc();
                let heads: Vec<[u8; 32]> = doc
                    .heads()
                    .into_iter()
                    .take(crate::cert::MAX_CUT_HEADS)
                    .map(|h| h.0)
                    .collect();
                let mut spec = CutSpec {
                    epoch: doc.epoch() + 1,
                    heads,
                    departed_before_ms,
                    base: [0; 32],
                };
                let r = doc
                    .cut_base(&spec.to_epoch_cut())
                    .map(|b| {
                        spec.base = b.0;
                        spec
                    })
                    .map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
            Query::Base(epoch, offset, reply) => {
                let doc = self.engine.doc();
                let chunk = (doc.epoch() == epoch && epoch > 0)
                    .then(|| doc.base_change_bytes())
                    .flatten()
                    .filter(|b| offset <= b.len())
                    .map(|b| {
                        let end = (offset + BASE_CHUNK).min(b.len());
                        (b.len(), b[offset..end].to_vec())
                    });
                let _ = reply.send(chunk);
            }
            Query::Cut(epoch, reply) => {
                let _ = reply.send(self.cuts.get(&epoch).map(|(_, c)| c.clone()));
            }
            Query::Vms(reply) => {
                let rows = self
                    .engine
                    .doc()
                    .view()
                    .vms
                    .into_iter()
                    .map(|(id, r)| ClusterVmRecord {
                        id: id.to_string(),
                        host: r.host,
                        state: r.state.as_str().to_owned(),
                        decision_seq: r.decision_seq,
                        vcpus: r.spec.vcpus,
                        memory_mib: r.spec.memory_mib,
                        disk_gib: r.spec.disk_gib,
                        certificate_bytes: r.certificate.len(),
                    })
                    .collect();
                let _ = reply.send(rows);
            }
            Query::Lag(reply) => {
                let doc = self.engine.doc();
                let mut rows: Vec<SyncLagRow> = doc
                    .lag(now)
                    .into_iter()
                    .map(|(node, lag_ms)| SyncLagRow { node, lag_ms })
                    .collect();
                rows.sort_by(|a, b| b.lag_ms.cmp(&a.lag_ms).then(a.node.cmp(&b.node)));
                let c = doc.conflicts();
                let s = self.engine.stats();
                let counters = [
                    ("frames_sent", s.frames_sent),
                    ("bytes_sent", s.bytes_sent),
                    ("frames_received", s.frames_received),
                    ("bytes_received", s.bytes_received),
                    ("max_frame_sent", s.max_frame_sent),
                    ("changes_applied", s.changes_applied),
                    ("changes_rejected", s.changes_rejected),
                    ("changes_deferred", s.changes_deferred),
                    ("probes_sent", s.probes_sent),
                    ("messages_truncated", s.messages_truncated),
                    ("session_resets", s.session_resets),
                    ("commands_dropped", s.commands_dropped),
                    ("history_changes", doc.stats().changes as u64),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
                let _ = reply.send(SyncLagStatus {
                    node: doc.node_id(),
                    epoch: doc.epoch(),
                    nodes: rows.len(),
                    vms: doc.vm_count(),
                    heads: hex_heads(&doc.heads()),
                    rows,
                    conflicts: [c.nodes, c.vms, c.quarantine],
                    counters,
                });
            }
            Query::Checksum(reply) => {
                let _ = reply.send(self.checksum());
            }
            Query::ChecksumBytes(reply) => {
                let doc = self.engine.doc();
                let _ = reply.send(encode_checksum(
                    doc.epoch(),
                    &doc.state_checksum(),
                    &doc.heads(),
                ));
            }
            Query::Export(reply) => {
                let _ = reply.send(self.engine.doc().export());
            }
            Query::ForceSync(nodes, reply) => {
                let peers: Vec<NodeId> = if nodes.is_empty() {
                    self.engine
                        .peer_status()
                        .into_iter()
                        .filter(|p| p.connected)
                        .map(|p| p.peer)
                        .collect()
                } else {
                    nodes
                };
                self.engine.force_sync(now, &peers);
                let _ = reply.send(peers.len());
            }
            Query::Sessions(reply) => {
                let ago =
                    |t: Option<Timestamp>| t.map(|t| now.as_millis().saturating_sub(t.as_millis()));
                let rows = self
                    .engine
                    .peer_status()
                    .into_iter()
                    .map(|p| SyncSessionRow {
                        peer: p.peer,
                        connected: p.connected,
                        in_sync: p.in_sync,
                        in_flight: p.in_flight,
                        last_sent_ms_ago: ago(p.last_sent),
                        last_received_ms_ago: ago(p.last_received),
                    })
                    .collect();
                let c = self.engine.config();
                let _ = reply.send((rows, c.fanout, c.interval_ms));
            }
        }
    }

    /// Carries out the engine's commands. Returns the gossip verdict for a nudge from
    /// `nudge_from`: `Reject` if the engine reported that peer while handling it.
    async fn drain(&mut self, nudge_from: Option<NodeId>) -> Validation {
        let mut verdict = Validation::Accept;
        while let Some(c) = self.engine.poll_command() {
            match c {
                Command::Send { peer, bytes } => self.send(peer, bytes),
                Command::Publish { bytes } => {
                    if let Err(e) = self.client.publish(&self.topic, bytes).await {
                        debug!(error = %e, "publishing a state-sync nudge failed");
                    }
                }
                Command::ReportPeer { peer, offence } => {
                    if Some(peer) == nudge_from {
                        verdict = Validation::Reject;
                    }
                    let label = match &offence {
                        Offence::Malformed(_) => "malformed",
                        Offence::InvalidChanges { .. } => "invalid_changes",
                        _ => "other",
                    };
                    self.metrics
                        .peers_reported
                        .with_label_values(&[label])
                        .inc();
                    warn!(peer = %peer.short(), ?offence, "peer sent state-sync data that was refused");
                }
                Command::EpochMismatch { peer, ours, theirs } => {
                    debug!(peer = %peer.short(), ours, theirs, "peer is on another document epoch");
                    if theirs > ours {
                        self.learn_cut(theirs);
                    }
                }
                other => debug!(?other, "unhandled state-sync command"),
            }
        }
        verdict
    }

    fn send(&self, peer: NodeId, bytes: Vec<u8>) {
        let Ok(pid) = peer.to_peer_id() else {
            let _ = self.tx.try_send(Input::SendFailed(peer));
            return;
        };
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            let _ = self.tx.try_send(Input::SendFailed(peer));
            return;
        };
        let client = self.client.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut data = Vec::with_capacity(bytes.len() + 1);
            data.push(TAG_FRAME);
            data.extend_from_slice(&bytes);
            let ok =
                matches!(client.request(pid, Service::Sync, data).await, Ok(r) if r.is_empty());
            drop(permit);
            if !ok {
                let _ = tx.try_send(Input::SendFailed(peer));
            }
        });
    }
}

/// Downloads a peer's base change of `epoch` in chunks (at most [`MAX_BASE_BYTES`]).
async fn download_base(client: &Client, peer: PeerId, epoch: u64) -> Option<Vec<u8>> {
    let mut out: Vec<u8> = Vec::new();
    loop {
        let mut q = vec![TAG_BASE];
        q.extend_from_slice(&epoch.to_be_bytes());
        q.extend_from_slice(&u32::try_from(out.len()).ok()?.to_be_bytes());
        let a = tokio::time::timeout(
            Duration::from_secs(10),
            client.request(peer, Service::Sync, q),
        )
        .await
        .ok()?
        .ok()?;
        if a.len() < 4 || a.first() == Some(&0xff) && a.len() == 1 {
            return None;
        }
        let total = u32::from_be_bytes(a[..4].try_into().ok()?) as usize;
        let chunk = &a[4..];
        if total > MAX_BASE_BYTES || out.len() + chunk.len() > total {
            return None;
        }
        out.extend_from_slice(chunk);
        if out.len() == total {
            return Some(out);
        }
        if chunk.is_empty() {
            return None;
        }
    }
}

/// Loads the kept cuts from sled; a cut that no longer verifies is dropped.
fn load_cuts(
    tree: &sled::Tree,
    verifier: &CommitteeVerifier,
) -> BTreeMap<u64, (CutDecisionOp, Vec<u8>)> {
    let mut cuts = BTreeMap::new();
    for (k, v) in tree.scan_prefix(CUT_PREFIX).flatten() {
        match verifier.verify_cut(&v) {
            Ok((op, _)) if k.len() == CUT_PREFIX.len() + 8 => {
                cuts.insert(op.cut.epoch, (op, v.to_vec()));
            }
            _ => {
                warn!("a saved compaction cut does not verify; dropped");
                let _ = tree.remove(k);
            }
        }
    }
    cuts
}

impl StateSync {
    /// Answers an inbound request on the sync service. `member` says whether the sender's
    /// signed announcement is known.
    pub async fn on_request(
        &self,
        client: &Client,
        peer: PeerId,
        member: bool,
        data: Vec<u8>,
        reply: ReplyHandle,
    ) {
        let answer = self.answer(peer, member, data).await;
        let bytes = match answer {
            Ok(b) => b,
            Err(reason) => {
                debug!(%peer, reason, "refused a state-sync request");
                self.frames_refused.with_label_values(&[reason]).inc();
                vec![0xff]
            }
        };
        let _ = client.respond(reply, bytes).await;
    }

    async fn answer(
        &self,
        peer: PeerId,
        member: bool,
        data: Vec<u8>,
    ) -> Result<Vec<u8>, &'static str> {
        let node = NodeId::from_peer_id(&peer).map_err(|_| "bad_peer_id")?;
        if !member {
            return Err("not_member");
        }
        // Snapshot chunks and endorsements cost the answering node far more than the request's
        // bytes (a copy of the snapshot; building a snapshot to compare hashes), so they are
        // charged to the peer's budget at that cost.
        let cost = match data.first() {
            Some(&TAG_BASE) => BASE_CHUNK,
            Some(&TAG_ENDORSE) => ENDORSE_COST,
            _ => 0,
        };
        if cost > 0
            && !self.budget.lock().unwrap_or_else(|p| p.into_inner()).admit(
                node,
                cost,
                Instant::now(),
            )
        {
            return Err("rate");
        }
        match data.split_first() {
            Some((&TAG_FRAME, frame)) => {
                let admitted = self.budget.lock().unwrap_or_else(|p| p.into_inner()).admit(
                    node,
                    frame.len(),
                    Instant::now(),
                );
                if !admitted {
                    return Err("rate");
                }
                if self.offer(Input::Frame {
                    peer: node,
                    data: frame.to_vec(),
                }) {
                    Ok(Vec::new())
                } else {
                    Err("queue_full")
                }
            }
            Some((&TAG_CHECKSUM, [])) => {
                self.ask(Query::ChecksumBytes).await.map_err(|_| "stopped")
            }
            Some((&TAG_CUT, epoch)) => {
                let epoch = u64::from_be_bytes(epoch.try_into().map_err(|_| "malformed")?);
                self.ask(|tx| Query::Cut(epoch, tx))
                    .await
                    .map_err(|_| "stopped")?
                    .ok_or("no_cut")
            }
            Some((&TAG_BASE, q)) if q.len() == 12 => {
                let epoch = u64::from_be_bytes(q[..8].try_into().map_err(|_| "malformed")?);
                let offset = u32::from_be_bytes(q[8..].try_into().map_err(|_| "malformed")?);
                let (total, chunk) = self
                    .ask(|tx| Query::Base(epoch, offset as usize, tx))
                    .await
                    .map_err(|_| "stopped")?
                    .ok_or("no_snapshot")?;
                let mut out = Vec::with_capacity(4 + chunk.len());
                out.extend_from_slice(&(total as u32).to_be_bytes());
                out.extend_from_slice(&chunk);
                Ok(out)
            }
            Some((&TAG_ENDORSE, mut body)) if body.len() <= MAX_ENDORSE_REQUEST => {
                let spec: CutSpec = ciborium::from_reader(&mut body).map_err(|_| "malformed")?;
                if !body.is_empty() {
                    return Err("malformed");
                }
                match self.endorse(spec).await {
                    Ok(env) => Ok(env.encode()),
                    Err(e) => {
                        debug!(error = %e, "did not endorse a compaction cut");
                        Err("not_endorsed")
                    }
                }
            }
            _ => Err("malformed"),
        }
    }

    /// Epoch, history length and heads of the document.
    pub async fn summary(&self) -> anyhow::Result<DocSummary> {
        self.ask(Query::Summary).await
    }

    /// A cut at the current heads (see [`Query::PlanCut`]).
    pub async fn plan_cut(&self, departed_before_ms: u64) -> anyhow::Result<CutSpec> {
        self.ask(|tx| Query::PlanCut(departed_before_ms, tx))
            .await?
            .map_err(|e| anyhow::anyhow!(e))
    }

    /// This node's endorsement of a compaction cut, or why it gives none.
    pub async fn endorse(&self, spec: CutSpec) -> anyhow::Result<SignedEnvelope> {
        self.ask(|tx| Query::Endorse(spec, tx))
            .await?
            .map_err(|e| anyhow::anyhow!(e))
    }

    /// `GET /v1/state-sync/lag`.
    pub async fn lag(&self) -> anyhow::Result<SyncLagStatus> {
        self.ask(Query::Lag).await
    }

    /// Our checksum.
    pub async fn checksum(&self) -> anyhow::Result<SyncChecksum> {
        self.ask(Query::Checksum).await
    }

    /// Asks a peer for its checksum.
    pub async fn peer_checksum(
        &self,
        client: &Client,
        node: NodeId,
    ) -> anyhow::Result<SyncChecksum> {
        let pid = node.to_peer_id()?;
        let r = client
            .request(pid, Service::Sync, vec![TAG_CHECKSUM])
            .await?;
        decode_checksum(node, &r).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Plain Automerge bytes of the document.
    pub async fn export(&self) -> anyhow::Result<Vec<u8>> {
        self.ask(Query::Export).await
    }

    /// Starts sessions now; returns how many peers.
    pub async fn force_sync(&self, nodes: Vec<NodeId>) -> anyhow::Result<usize> {
        self.ask(|r| Query::ForceSync(nodes, r)).await
    }

    /// One VM's record in this node's view of the document.
    pub async fn vm_record(&self, vm: VmId) -> anyhow::Result<Option<VmRecord>> {
        self.ask(|r| Query::Vm(vm, r)).await
    }

    /// Every VM record in this node's view of the document.
    pub async fn vm_records(&self) -> anyhow::Result<Vec<ClusterVmRecord>> {
        self.ask(Query::Vms).await
    }

    /// Sessions, fanout and interval.
    pub async fn sessions(&self) -> anyhow::Result<(Vec<SyncSessionRow>, usize, u64)> {
        self.ask(Query::Sessions).await
    }
}

/// The local API routes of state sync and gossip status.
pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/state-sync/lag", get(api_lag))
        .route("/v1/state-sync/checksum", get(api_checksum))
        .route("/v1/state-sync/verify", post(api_verify))
        .route("/v1/state-sync/export", get(api_export))
        .route("/v1/state-sync/vms", get(api_vms))
        .route("/v1/state-sync/force-sync", post(api_force_sync))
        .route("/v1/state-sync/compact", post(api_compact))
        .route("/v1/gossip/status", get(api_gossip_status))
}

use crate::api::err as fail;

fn not_running() -> Response {
    fail(StatusCode::SERVICE_UNAVAILABLE, "state sync is not running")
}

async fn api_lag(State(s): State<Arc<Shared>>) -> Response {
    let Some(sync) = s.statesync() else {
        return not_running();
    };
    match sync.lag().await {
        Ok(v) => Json(v).into_response(),
        Err(e) => fail(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn api_checksum(State(s): State<Arc<Shared>>) -> Response {
    let Some(sync) = s.statesync() else {
        return not_running();
    };
    match sync.checksum().await {
        Ok(v) => Json(v).into_response(),
        Err(e) => fail(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn api_vms(State(s): State<Arc<Shared>>) -> Response {
    let Some(sync) = s.statesync() else {
        return not_running();
    };
    match sync.vm_records().await {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => fail(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn api_export(State(s): State<Arc<Shared>>) -> Response {
    let Some(sync) = s.statesync() else {
        return not_running();
    };
    match sync.export().await {
        Ok(bytes) => (
            [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
            bytes,
        )
            .into_response(),
        Err(e) => fail(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn api_force_sync(
    State(s): State<Arc<Shared>>,
    Json(req): Json<ForceSyncRequest>,
) -> Response {
    let Some(sync) = s.statesync() else {
        return not_running();
    };
    match sync.force_sync(req.nodes).await {
        Ok(n) => Json(serde_json::json!({ "peers": n })).into_response(),
        Err(e) => fail(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// `POST /v1/state-sync/compact` (`dwcp-cli state-sync compact`): proposes a compaction cut
/// at this node's heads and answers once it committed.
async fn api_compact(State(s): State<Arc<Shared>>, body: Option<Json<CompactRequest>>) -> Response {
    let Some(sync) = s.statesync() else {
        return not_running();
    };
    let Some(consensus) = s.consensus() else {
        return fail(
            StatusCode::CONFLICT,
            "compaction is decided by the committee; no committee is configured (acp.committee)",
        );
    };
    let departed_after = body
        .and_then(|Json(b)| b.departed_after_s)
        .map(Duration::from_secs)
        .unwrap_or(s.compaction_config().departed_after);
    match crate::compaction::compact_now(sync, consensus, s.client(), s.node_id(), departed_after)
        .await
    {
        Ok(r) => Json(r).into_response(),
        Err(e) => fail(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")),
    }
}

/// Body of `POST /v1/state-sync/compact`.
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
pub struct CompactRequest {
    /// Drop node entries whose last heartbeat is older than this many seconds (default:
    /// `ass.compaction.departed_after`).
    pub departed_after_s: Option<u64>,
}

async fn api_verify(State(s): State<Arc<Shared>>) -> Response {
    let Some(sync) = s.statesync().cloned() else {
        return not_running();
    };
    let local = match sync.checksum().await {
        Ok(c) => c,
        Err(e) => return fail(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    let client = s.client().clone();
    let peers: Vec<NodeId> = s
        .node_rows()
        .into_iter()
        .filter(|r| !r.is_self && r.status == dwcp_protocol::api::PeerStatus::Ready)
        .map(|r| r.id)
        .collect();
    let asks = peers.into_iter().map(|node| {
        let sync = sync.clone();
        let client = client.clone();
        async move { (node, sync.peer_checksum(&client, node).await) }
    });
    let answers = futures::future::join_all(asks).await;
    let rows = answers
        .into_iter()
        .map(|(node, r)| match r {
            Ok(c) => SyncVerifyRow {
                node,
                verdict: if c.checksum == local.checksum && c.epoch == local.epoch {
                    SyncVerdict::Same
                } else if c.heads == local.heads {
                    SyncVerdict::Differs
                } else {
                    SyncVerdict::Syncing
                },
                checksum: Some(c),
                error: None,
            },
            Err(e) => SyncVerifyRow {
                node,
                verdict: SyncVerdict::Unreachable,
                checksum: None,
                error: Some(format!("{e:#}")),
            },
        })
        .collect();
    Json(SyncVerifyReport { local, rows }).into_response()
}

async fn api_gossip_status(State(s): State<Arc<Shared>>) -> Response {
    let net = match s.client().stats().await {
        Ok(n) => n,
        Err(e) => return fail(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    let (sessions, fanout, interval_ms) = match s.statesync() {
        Some(sync) => sync.sessions().await.unwrap_or_default(),
        None => (Vec::new(), 0, 0),
    };
    Json(GossipStatus {
        mesh: net.mesh_peers,
        peer_scores: net
            .peer_scores
            .into_iter()
            .map(|(p, sc)| (p.to_string(), sc))
            .collect(),
        sessions,
        fanout,
        interval_ms,
    })
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_answers_round_trip_and_malformed_ones_are_refused() {
        let node = NodeKey::from_secret_bytes([7; 32]).node_id();
        let heads = vec![ChangeHash([1; 32]), ChangeHash([2; 32])];
        let b = encode_checksum(3, &[9; 32], &heads);
        let c = decode_checksum(node, &b).unwrap();
        assert_eq!(c.epoch, 3);
        assert_eq!(c.checksum, hex::encode([9u8; 32]));
        assert_eq!(
            c.heads,
            vec![hex::encode([1u8; 32]), hex::encode([2u8; 32])]
        );
        assert!(decode_checksum(node, &b[..b.len() - 1]).is_err());
        assert!(decode_checksum(node, &b[..10]).is_err());
        let mut lying = b.clone();
        lying[41] = 200; // claims 200 heads
        assert!(decode_checksum(node, &lying).is_err());
    }

    #[test]
    fn the_peer_budget_refills_and_refuses_floods() {
        let mut b = PeerBudget::default();
        let p = NodeKey::from_secret_bytes([1; 32]).node_id();
        let q = NodeKey::from_secret_bytes([2; 32]).node_id();
        let t0 = Instant::now();
        let burst = 2 * PEER_BYTES_PER_SEC as usize;
        assert!(b.admit(p, burst, t0));
        assert!(!b.admit(p, 1024, t0), "the burst is spent");
        assert!(b.admit(q, 1024, t0), "another peer has its own budget");
        assert!(
            b.admit(p, 1024, t0 + Duration::from_millis(10)),
            "refills with time"
        );
    }

    #[test]
    fn without_a_committee_every_certificate_is_refused() {
        use dwcp_statesync::{CertError, CertificateVerifier};
        let v = CommitteeVerifier::new(None);
        assert!(v.verify_vm(b"x").is_err());
        assert!(v.verify_quarantine(b"x").is_err());
        // Even a well-formed certificate names a committee this node does not know.
        let c =
            dwcp_consensus::Committee::new(0, vec![NodeKey::from_secret_bytes([1; 32]).node_id()])
                .unwrap();
        let env = dwcp_protocol::Verified::sign(
            &NodeKey::from_secret_bytes([1; 32]),
            dwcp_consensus::Request {
                nonce: 1,
                op: vec![0xA2],
            },
        )
        .unwrap()
        .envelope()
        .clone();
        let slot = dwcp_consensus::Slot {
            view: 0,
            seq: 1,
            digest: dwcp_consensus::Digest::of_batch(std::slice::from_ref(&env)),
        };
        let sign = |m: dwcp_consensus::ConsensusMsg| {
            dwcp_protocol::Verified::sign(&NodeKey::from_secret_bytes([1; 32]), m)
                .unwrap()
                .envelope()
                .clone()
        };
        let cert = dwcp_consensus::CommitCertificate {
            pre_prepare: sign(dwcp_consensus::ConsensusMsg::PrePrepare(
                dwcp_consensus::PrePrepare {
                    slot,
                    time: Timestamp(1),
                },
            )),
            batch: vec![env],
            commits: vec![sign(dwcp_consensus::ConsensusMsg::Commit(slot))],
        };
        let bytes = crate::cert::certificate_for(&cert, 0, 0).unwrap();
        assert_eq!(
            v.verify_quarantine(&bytes),
            Err(CertError::UnknownCommittee(0))
        );
        // The committee that signed it gets past the proof to the operation.
        assert!(matches!(
            CommitteeVerifier::new(Some(c)).verify_quarantine(&bytes),
            Err(CertError::Malformed(_))
        ));
    }
}
