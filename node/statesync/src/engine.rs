//! The sans-IO sync engine: per-peer Automerge sync sessions, anti-entropy rounds, gossip
//! nudges, validation before apply, and bounded messages.
//!
//! ```text
//!            handle_peer_connected / _disconnected / handle_send_failed
//!  driver -> handle_message(now, peer, bytes)   --decode, validate, apply, reply-->  Command::Send
//!            handle_nudge(now, from, bytes)      --apply, pull if behind-------->   Command::Send
//!            handle_timeout(now)                 --anti-entropy round----------->   Command::Send
//!            write_* (local change)              --commit, sign---------------->    Command::Publish
//!                                                 invalid change from a peer -->    Command::ReportPeer
//!  driver <- poll_command(), poll_timeout()
//! ```
//!
//! Automerge's sync protocol expects a reliable, ordered stream per peer. The engine keeps one
//! `automerge::sync::State` per peer, resets it when the peer reconnects, when a send fails,
//! and when a reply does not come within `response_timeout_ms` (a lost message would otherwise
//! leave the session waiting forever). A reset sends Automerge's sync-reset flag so the peer
//! forgets what it thinks it sent us.
//!
//! Message size is bounded: the engine never lets Automerge send a whole document (the V2
//! "send everything when more than a third is missing" path) because with the change
//! signatures it carries that message grows with the history; instead it withholds the V2
//! capability, and cuts change lists to `max_message_bytes`, returning the cut hashes to the
//! session so they go out in the next message.

use std::collections::{BTreeMap, VecDeque};

use automerge::{
    Change, ChangeHash, ReadDoc,
    sync::{self, Capability, SyncDoc},
};
use dwcp_protocol::{Heartbeat, NodeAnnouncement, NodeId, Timestamp};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{
    cert::{CertificateVerifier, Certified, QuarantineDecision, VmDecision},
    doc::{ChangeSignature, ClusterDoc, CompactError, EpochCut, IngestReport, WriteError},
    validate::Reject,
    wire::{Frame, FrameError},
};

/// Bytes a sync frame adds around the Automerge message (header, counts).
const FRAME_OVERHEAD: usize = 32;
/// Bytes each carried change costs besides its own bytes: its signature entry and length.
const PER_CHANGE_OVERHEAD: usize = 96 + 8;

/// Engine configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Peers contacted per anti-entropy round (manual: 6).
    pub fanout: usize,
    /// Anti-entropy interval in milliseconds (manual: 1 s).
    pub interval_ms: u64,
    /// Largest sync frame sent or accepted, in bytes. At most the protocol's state-sync
    /// payload limit (1 MiB).
    pub max_message_bytes: usize,
    /// A session waiting longer than this for a reply is reset.
    pub response_timeout_ms: u64,
    /// Largest nudge published; larger local changes are announced by heads only.
    pub nudge_max_bytes: usize,
    /// Whether anti-entropy probes peers believed in sync with a 44-byte heads digest (pull);
    /// a peer whose heads differ answers with a full sync message. Bounds how long a node can
    /// miss news.
    pub probe_in_sync_peers: bool,
    /// Whether a round pushes changes straight away to peers the session believes lack them.
    /// Off (default): a round only probes, and changes flow once digests differ. Pushing
    /// saves one round trip but delivers each change many times over (the session does not
    /// know what the peer learnt from others or from gossip since).
    pub push_on_round: bool,
    /// Seed of the engine's RNG (peer selection).
    pub seed: u64,
    /// Most commands queued before the driver drains them; further sends are dropped (and
    /// the session recovers through the response timeout).
    pub max_commands: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            fanout: 6,
            interval_ms: 1000,
            max_message_bytes: 512 * 1024,
            response_timeout_ms: 3000,
            nudge_max_bytes: 16 * 1024,
            probe_in_sync_peers: true,
            push_on_round: false,
            seed: 0,
            max_commands: 4096,
        }
    }
}

/// A configuration value out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Explains which value and why.
    #[error("invalid state-sync config: {0}")]
    Invalid(&'static str),
}

impl Config {
    /// Sets the fanout.
    pub fn with_fanout(mut self, f: usize) -> Self {
        self.fanout = f;
        self
    }
    /// Sets the interval.
    pub fn with_interval_ms(mut self, ms: u64) -> Self {
        self.interval_ms = ms;
        self
    }
    /// Sets the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// Sets the message limit.
    pub fn with_max_message_bytes(mut self, b: usize) -> Self {
        self.max_message_bytes = b;
        self
    }

    /// Checks ranges.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if self.fanout == 0 || self.fanout > 64 {
            return Err(ConfigError::Invalid("fanout must be 1..=64"));
        }
        if self.interval_ms == 0 {
            return Err(ConfigError::Invalid("interval must be positive"));
        }
        if self.max_message_bytes < 16 * 1024
            || self.max_message_bytes > dwcp_protocol::MessageKind::StateSync.max_payload()
        {
            return Err(ConfigError::Invalid(
                "max_message_bytes must be 16 KiB..=1 MiB",
            ));
        }
        if self.response_timeout_ms < self.interval_ms {
            return Err(ConfigError::Invalid(
                "response timeout must be at least one interval",
            ));
        }
        if self.max_commands < 16 {
            return Err(ConfigError::Invalid("max_commands must be at least 16"));
        }
        Ok(self)
    }
}

/// What a peer did wrong (reported to reputation).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Offence {
    /// Bytes that are not a valid frame or sync message.
    Malformed(String),
    /// Changes refused by validation (the first reason, and how many).
    InvalidChanges {
        /// How many changes were refused.
        count: usize,
        /// The reason for the first one.
        first: Reject,
    },
}

/// What the engine asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Command {
    /// Send a frame to a peer (request-response on the mesh).
    Send {
        /// Destination.
        peer: NodeId,
        /// The frame.
        bytes: Vec<u8>,
    },
    /// Publish a nudge on the state-sync gossipsub topic.
    Publish {
        /// The frame.
        bytes: Vec<u8>,
    },
    /// Report a misbehaving peer to reputation.
    ReportPeer {
        /// The peer.
        peer: NodeId,
        /// What it did.
        offence: Offence,
    },
    /// A peer is on another epoch: if theirs is higher, the driver should obtain the epoch
    /// cut from consensus and call [`Engine::compact`].
    EpochMismatch {
        /// The peer.
        peer: NodeId,
        /// Our epoch.
        ours: u64,
        /// Theirs.
        theirs: u64,
    },
}

/// Counters for metrics (`dwcp_state_sync_*`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    /// Frames sent (sync and nudge).
    pub frames_sent: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Frames received.
    pub frames_received: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Largest frame sent.
    pub max_frame_sent: u64,
    /// Changes applied from the network.
    pub changes_applied: u64,
    /// Changes refused.
    pub changes_rejected: u64,
    /// Changes held for missing dependencies (counted each time they are held).
    pub changes_deferred: u64,
    /// Heads-digest probes sent.
    pub probes_sent: u64,
    /// Messages whose change list was cut to the size limit.
    pub messages_truncated: u64,
    /// Session resets (reconnect, failure, timeout).
    pub session_resets: u64,
    /// Commands dropped because the queue was full.
    pub commands_dropped: u64,
}

/// One peer's session as shown by `gossip status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// The peer.
    pub peer: NodeId,
    /// Connected now.
    pub connected: bool,
    /// Whether its last known heads equal ours.
    pub in_sync: bool,
    /// Waiting for its reply.
    pub in_flight: bool,
    /// When we last sent to it.
    pub last_sent: Option<Timestamp>,
    /// When we last heard from it.
    pub last_received: Option<Timestamp>,
}

#[derive(Debug, Default)]
struct Peer {
    sync: sync::State,
    connected: bool,
    last_sent: Option<Timestamp>,
    last_received: Option<Timestamp>,
}

/// The state-sync engine of one node.
pub struct Engine<V> {
    cfg: Config,
    doc: ClusterDoc,
    verifier: V,
    peers: BTreeMap<NodeId, Peer>,
    rng: ChaCha8Rng,
    next_round: Option<Timestamp>,
    out: VecDeque<Command>,
    stats: SyncStats,
}

impl<V: std::fmt::Debug> std::fmt::Debug for Engine<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("doc", &self.doc)
            .field("peers", &self.peers.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn strip_v2(state: &mut sync::State) {
    if let Some(caps) = state.their_capabilities.as_mut() {
        caps.retain(|c| *c != Capability::MessageV2);
    }
}

/// A fresh session that asks the peer to forget what it sent us (sync-reset flag), keeping
/// what we know of its capabilities.
fn reset_state(old: &sync::State) -> sync::State {
    let mut s = sync::State::new();
    s.their_capabilities.clone_from(&old.their_capabilities);
    // Without known capabilities Automerge would signal the reset by sending empty heads,
    // which makes the peer send a whole document; only use the flag when it is understood.
    s.needs_reset = old
        .their_capabilities
        .as_ref()
        .is_some_and(|c| c.contains(&Capability::SyncReset));
    s
}

/// Splits Automerge storage chunks (`85 6f 4a 83 | checksum[4] | type | uleb len | data`) and
/// returns the changes they hold. Only change chunks (plain or compressed) are accepted.
fn extract_changes(data: &[u8], out: &mut Vec<Change>) -> Result<(), String> {
    const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
    let mut rest = data;
    while !rest.is_empty() {
        if rest.len() < 9 || rest[..4] != MAGIC {
            return Err("bad chunk header".into());
        }
        let ty = rest[8];
        let mut len: u64 = 0;
        let mut shift = 0;
        let mut i = 9;
        loop {
            let b = *rest.get(i).ok_or("truncated chunk length")?;
            if shift > 56 {
                return Err("chunk length overflow".into());
            }
            len |= u64::from(b & 0x7f) << shift;
            shift += 7;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| i.checked_add(l))
            .filter(|e| *e <= rest.len())
            .ok_or("truncated chunk")?;
        let chunk = &rest[..end];
        match ty {
            // Whole documents are refused: this engine never sends them (it withholds the V2
            // capability), and a compressed document from an untrusted peer can inflate far
            // beyond the frame limit.
            0 => return Err("whole-document chunks are not accepted".into()),
            1 | 2 => {
                // Bounded before parsing so a compressed change cannot inflate without limit.
                if chunk.len() > crate::validate::MAX_CHANGE_BYTES {
                    return Err(format!("change chunk of {} bytes", chunk.len()));
                }
                out.push(Change::from_bytes(chunk.to_vec()).map_err(|e| e.to_string())?);
            }
            t => return Err(format!("unknown chunk type {t}")),
        }
        rest = &rest[end..];
    }
    Ok(())
}

/// SHA-256 over sorted heads (the probe digest).
fn heads_digest(heads: &[ChangeHash]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for x in heads {
        h.update(x.0);
    }
    h.finalize().into()
}

/// Orders changes so that each comes after those of its dependencies that are in the set
/// (Kahn's algorithm; ties keep the input order).
fn topo_order(changes: Vec<Change>) -> Vec<Change> {
    let pos: BTreeMap<ChangeHash, usize> = changes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.hash(), i))
        .collect();
    let mut indegree = vec![0usize; changes.len()];
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); changes.len()];
    for (i, c) in changes.iter().enumerate() {
        for d in c.deps() {
            if let Some(&j) = pos.get(d) {
                indegree[i] += 1;
                children[j].push(i);
            }
        }
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..changes.len()).filter(|i| indegree[*i] == 0).collect();
    let mut order = Vec::with_capacity(changes.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &k in &children[i] {
            indegree[k] -= 1;
            if indegree[k] == 0 {
                ready.insert(k);
            }
        }
    }
    let mut slots: Vec<Option<Change>> = changes.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| slots[i].take()).collect()
}

impl<V: CertificateVerifier> Engine<V> {
    /// An engine over a document (fresh or loaded) with a certificate verifier.
    pub fn new(cfg: Config, doc: ClusterDoc, verifier: V) -> Result<Self, ConfigError> {
        let cfg = cfg.validate()?;
        Ok(Self {
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            cfg,
            doc,
            verifier,
            peers: BTreeMap::new(),
            next_round: None,
            out: VecDeque::new(),
            stats: SyncStats::default(),
        })
    }

    /// The document.
    pub fn doc(&self) -> &ClusterDoc {
        &self.doc
    }

    /// Mutable access to the document for Byzantine tests (raw writes).
    #[cfg(any(test, feature = "test-utils"))]
    pub fn doc_mut_for_fakes(&mut self) -> &mut ClusterDoc {
        &mut self.doc
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> SyncStats {
        self.stats
    }

    /// The certificate verifier.
    pub fn verifier(&self) -> &V {
        &self.verifier
    }

    /// Sessions, for `gossip status`.
    pub fn peer_status(&self) -> Vec<PeerStatus> {
        let heads = self.doc.heads();
        self.peers
            .iter()
            .map(|(id, p)| PeerStatus {
                peer: *id,
                connected: p.connected,
                in_sync: p.sync.their_heads.as_ref().is_some_and(|h| {
                    let mut h = h.clone();
                    h.sort();
                    h == heads
                }),
                in_flight: p.sync.in_flight,
                last_sent: p.last_sent,
                last_received: p.last_received,
            })
            .collect()
    }

    /// The next command for the driver.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.out.pop_front()
    }

    /// When to call [`Engine::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.next_round
    }

    fn push(&mut self, c: Command) {
        if self.out.len() >= self.cfg.max_commands {
            self.stats.commands_dropped += 1;
            return;
        }
        if let Command::Send { bytes, .. } | Command::Publish { bytes } = &c {
            self.stats.frames_sent += 1;
            self.stats.bytes_sent += bytes.len() as u64;
            self.stats.max_frame_sent = self.stats.max_frame_sent.max(bytes.len() as u64);
        }
        self.out.push_back(c);
    }

    fn ensure_timer(&mut self, now: Timestamp) {
        if self.next_round.is_none() {
            self.next_round = Some(Timestamp::from_millis(
                now.as_millis() + self.cfg.interval_ms,
            ));
        }
    }

    /// A peer connected (or reconnected): start a fresh session and send our first message.
    pub fn handle_peer_connected(&mut self, now: Timestamp, peer: NodeId) {
        if peer == self.doc.node_id() {
            return;
        }
        self.ensure_timer(now);
        let p = self.peers.entry(peer).or_default();
        p.sync = sync::State::new();
        p.connected = true;
        self.stats.session_resets += 1;
        let _ = self.send_to(now, peer);
    }

    /// A peer disconnected: forget the session (it restarts on reconnect).
    pub fn handle_peer_disconnected(&mut self, _now: Timestamp, peer: NodeId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.connected = false;
            p.sync = sync::State::new();
        }
    }

    /// The driver could not deliver a frame to `peer`: reset the session.
    pub fn handle_send_failed(&mut self, _now: Timestamp, peer: NodeId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.sync = reset_state(&p.sync);
            self.stats.session_resets += 1;
        }
    }

    /// Operator's `state-sync force-sync`: restart the sessions with these peers now.
    pub fn force_sync(&mut self, now: Timestamp, peers: &[NodeId]) {
        for peer in peers {
            if let Some(p) = self.peers.get_mut(peer)
                && p.connected
            {
                p.sync = reset_state(&p.sync);
                self.stats.session_resets += 1;
                let _ = self.send_to(now, *peer);
            }
        }
    }

    fn report(&mut self, peer: NodeId, offence: Offence) {
        self.push(Command::ReportPeer { peer, offence });
    }

    fn note_ingest(&mut self, peer: NodeId, r: &IngestReport) {
        self.stats.changes_applied += r.applied.len() as u64;
        self.stats.changes_rejected += r.rejected.len() as u64;
        self.stats.changes_deferred += r.deferred as u64;
        if let Some((_, first)) = r.rejected.first() {
            let offence = Offence::InvalidChanges {
                count: r.rejected.len(),
                first: first.clone(),
            };
            self.report(peer, offence);
        }
    }

    /// A sync frame from an authenticated peer (the transport guarantees `peer`).
    pub fn handle_message(&mut self, now: Timestamp, peer: NodeId, bytes: &[u8]) {
        self.ensure_timer(now);
        self.stats.frames_received += 1;
        self.stats.bytes_received += bytes.len() as u64;
        let frame = match Frame::decode(bytes, self.cfg.max_message_bytes) {
            Ok(f) => f,
            Err(e) => return self.report(peer, Offence::Malformed(e.to_string())),
        };
        if frame.epoch() != self.doc.epoch() {
            let theirs = frame.epoch();
            self.push(Command::EpochMismatch {
                peer,
                ours: self.doc.epoch(),
                theirs,
            });
            return;
        }
        let (sigs, msg) = match frame {
            Frame::Sync { sigs, msg, .. } => (sigs, msg),
            Frame::Nudge { .. } => return self.handle_nudge(now, peer, bytes),
            Frame::Probe { digest, .. } => {
                let heads = self.doc.doc.get_heads();
                let same = digest == heads_digest(&self.doc.heads());
                let p = self.peers.entry(peer).or_default();
                p.connected = true;
                p.last_received = Some(now);
                if p.sync.in_flight {
                    return;
                }
                if same {
                    // Equal digests mean equal heads: record what a full exchange would have
                    // taught the session, so it does not send the peer a stale full message
                    // later.
                    p.sync.their_heads = Some(heads.clone());
                    p.sync.shared_heads.clone_from(&heads);
                    p.sync.last_sent_heads = heads;
                    p.sync.have_responded = true;
                } else {
                    p.sync.have_responded = false;
                    let _ = self.send_to(now, peer);
                }
                return;
            }
        };
        let mut msg = match sync::Message::decode(&msg) {
            Ok(m) => m,
            Err(e) => return self.report(peer, Offence::Malformed(e.to_string())),
        };
        let mut changes = Vec::new();
        for chunk in msg.changes.iter() {
            if let Err(e) = extract_changes(chunk, &mut changes) {
                return self.report(peer, Offence::Malformed(e));
            }
        }
        let sigs: BTreeMap<ChangeHash, ChangeSignature> = sigs.into_iter().collect();
        let report = match self.doc.ingest(changes, &sigs, &self.verifier) {
            Ok(r) => r,
            Err(e) => return self.report(peer, Offence::Malformed(e.to_string())),
        };
        self.note_ingest(peer, &report);
        // The valid changes are applied; let the session see the rest of the message (heads,
        // have, need) so it knows what the peer has and wants.
        msg.changes = sync::ChunkList::empty();
        let p = self.peers.entry(peer).or_default();
        p.connected = true;
        p.last_received = Some(now);
        if report.orphans_evicted > 0 {
            // We dropped changes the peer believes it delivered; restart the session with the
            // sync-reset flag so it sends them again.
            p.sync = reset_state(&p.sync);
            self.stats.session_resets += 1;
        }
        if let Err(e) = self.doc.doc.receive_sync_message(&mut p.sync, msg) {
            return self.report(peer, Offence::Malformed(e.to_string()));
        }
        let _ = self.send_to(now, peer);
    }

    /// A nudge from gossip, published by `from`.
    pub fn handle_nudge(&mut self, now: Timestamp, from: NodeId, bytes: &[u8]) {
        self.stats.frames_received += 1;
        self.stats.bytes_received += bytes.len() as u64;
        let frame = match Frame::decode(bytes, self.cfg.nudge_max_bytes) {
            Ok(f) => f,
            Err(e) => return self.report(from, Offence::Malformed(e.to_string())),
        };
        let Frame::Nudge {
            epoch,
            heads,
            changes,
        } = frame
        else {
            return self.report(
                from,
                Offence::Malformed("sync frame on the gossip topic".into()),
            );
        };
        if epoch != self.doc.epoch() {
            return;
        }
        let mut parsed = Vec::with_capacity(changes.len());
        let mut sigs = BTreeMap::new();
        for (raw, sig) in changes {
            match Change::from_bytes(raw) {
                Ok(c) => {
                    sigs.insert(c.hash(), sig);
                    parsed.push(c);
                }
                Err(e) => return self.report(from, Offence::Malformed(e.to_string())),
            }
        }
        if !parsed.is_empty() {
            match self.doc.ingest(parsed, &sigs, &self.verifier) {
                Ok(r) => self.note_ingest(from, &r),
                Err(e) => return self.report(from, Offence::Malformed(e.to_string())),
            }
        }
        let behind = heads.iter().any(|h| !self.doc.has_change(h));
        if behind && self.peers.get(&from).is_some_and(|p| p.connected) {
            let _ = self.send_to(now, from);
        }
    }

    /// Timers: runs an anti-entropy round when due.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let Some(due) = self.next_round else {
            self.next_round = Some(Timestamp::from_millis(
                now.as_millis() + self.cfg.interval_ms,
            ));
            return;
        };
        if now < due {
            return;
        }
        self.next_round = Some(Timestamp::from_millis(
            now.as_millis() + self.cfg.interval_ms,
        ));
        // Sessions stuck waiting for a reply (lost message) restart.
        let timeout = self.cfg.response_timeout_ms;
        for p in self.peers.values_mut() {
            if p.sync.in_flight
                && p.last_sent
                    .is_some_and(|t| now.saturating_since(t) >= timeout)
            {
                p.sync = reset_state(&p.sync);
                self.stats.session_resets += 1;
            }
        }
        let connected: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.connected)
            .map(|(id, _)| *id)
            .collect();
        let k = self.cfg.fanout.min(connected.len());
        let mut pool = connected;
        for i in 0..k {
            let j = self.rng.random_range(i..pool.len());
            pool.swap(i, j);
        }
        pool.truncate(k);
        let digest = heads_digest(&self.doc.heads());
        for peer in pool {
            // Push what the session knows the peer lacks; otherwise probe with a digest of our
            // heads, and a peer that differs answers with a full sync message (pull).
            let pushed = self.cfg.push_on_round && self.send_to(now, peer);
            if !pushed
                && self.cfg.probe_in_sync_peers
                && self.peers.get(&peer).is_some_and(|p| !p.sync.in_flight)
            {
                let bytes = Frame::Probe {
                    epoch: self.doc.epoch(),
                    digest,
                }
                .encode();
                self.stats.probes_sent += 1;
                self.push(Command::Send { peer, bytes });
            }
        }
    }

    /// Generates and queues the next message of the session with `peer`, if any, with its
    /// change list cut to the size limit.
    fn send_to(&mut self, now: Timestamp, peer: NodeId) -> bool {
        let budget = self.cfg.max_message_bytes;
        let epoch = self.doc.epoch();
        let Some(p) = self.peers.get_mut(&peer) else {
            return false;
        };
        strip_v2(&mut p.sync);
        let Some(mut msg) = self.doc.doc.generate_sync_message(&mut p.sync) else {
            return false;
        };
        let extra = self.doc.missing_orphan_deps();
        if !extra.is_empty() {
            msg.need.extend(extra);
            // Automerge's encoder requires sorted hash lists.
            msg.need.sort();
            msg.need.dedup();
        }
        // Fixed part: header, heads, need, have (bloom filters).
        let fixed = FRAME_OVERHEAD
            + 1
            + 34 * (msg.heads.len() + msg.need.len())
            + msg
                .have
                .iter()
                .map(|h| 34 * h.last_sync.len() + h.bloom.to_bytes().len() + 8)
                .sum::<usize>()
            + 16;
        // Order the changes so every change follows its dependencies, then keep the longest
        // prefix that fits: a prefix of a topological order never strands a change whose
        // dependency was cut (the receiver would have to drop it).
        let parsed: Vec<Change> = msg
            .changes
            .iter()
            .filter_map(|c| Change::from_bytes(c.to_vec()).ok())
            .collect();
        let mut kept: Vec<Vec<u8>> = Vec::new();
        let mut sigs = Vec::new();
        let mut used = fixed;
        let mut cut: Vec<ChangeHash> = Vec::new();
        for c in topo_order(parsed) {
            let h = c.hash();
            let raw = c.raw_bytes();
            let cost = raw.len() + PER_CHANGE_OVERHEAD;
            if !cut.is_empty() || (used + cost > budget && !kept.is_empty()) {
                cut.push(h);
                continue;
            }
            used += cost;
            if let Some(s) = self.doc.signature(&h) {
                sigs.push((h, *s));
            }
            kept.push(raw.to_vec());
        }
        if !cut.is_empty() {
            self.stats.messages_truncated += 1;
            for h in &cut {
                p.sync.sent_hashes.remove(h);
            }
        }
        msg.changes = sync::ChunkList::from(kept);
        p.last_sent = Some(now);
        let frame = Frame::Sync {
            epoch,
            sigs,
            msg: msg.encode(),
        };
        let bytes = frame.encode();
        self.push(Command::Send { peer, bytes });
        true
    }

    fn after_local_write(
        &mut self,
        r: Result<Option<ChangeHash>, WriteError>,
    ) -> Result<(), WriteError> {
        r?;
        let hashes = self.doc.take_local_changes();
        if hashes.is_empty() {
            return Ok(());
        }
        let mut changes = Vec::new();
        let mut size = 64 + 32 * self.doc.heads().len();
        let mut fits = true;
        for h in &hashes {
            let (Some(c), Some(s)) = (self.doc.doc.get_change_by_hash(h), self.doc.signature(h))
            else {
                continue;
            };
            size += c.raw_bytes().len() + 68;
            if size > self.cfg.nudge_max_bytes || changes.len() >= crate::wire::MAX_NUDGE_CHANGES {
                fits = false;
                break;
            }
            changes.push((c.raw_bytes().to_vec(), *s));
        }
        if !fits {
            changes.clear();
        }
        let mut heads = self.doc.heads();
        heads.truncate(crate::wire::MAX_NUDGE_HEADS);
        let bytes = Frame::Nudge {
            epoch: self.doc.epoch(),
            heads,
            changes,
        }
        .encode();
        self.push(Command::Publish { bytes });
        Ok(())
    }

    /// Writes our own announcement into our node entry and nudges the cluster.
    pub fn write_announcement(
        &mut self,
        now: Timestamp,
        a: &NodeAnnouncement,
    ) -> Result<(), WriteError> {
        self.ensure_timer(now);
        let r = self.doc.write_announcement(now, a);
        self.after_local_write(r)
    }

    /// Writes our own heartbeat into our node entry and nudges the cluster.
    pub fn write_heartbeat(&mut self, now: Timestamp, hb: &Heartbeat) -> Result<(), WriteError> {
        self.ensure_timer(now);
        let r = self.doc.write_heartbeat(now, hb);
        self.after_local_write(r)
    }

    /// Writes a certified VM record and nudges the cluster.
    pub fn write_vm(
        &mut self,
        now: Timestamp,
        c: &Certified<VmDecision>,
    ) -> Result<(), WriteError> {
        self.ensure_timer(now);
        let r = self.doc.write_vm(now, c, &self.verifier);
        self.after_local_write(r)
    }

    /// Writes a certified quarantine record and nudges the cluster.
    pub fn write_quarantine(
        &mut self,
        now: Timestamp,
        c: &Certified<QuarantineDecision>,
    ) -> Result<(), WriteError> {
        self.ensure_timer(now);
        let r = self.doc.write_quarantine(now, c, &self.verifier);
        self.after_local_write(r)
    }

    /// Compacts the document at an agreed cut (see [`ClusterDoc::compact`]) and restarts every
    /// session, since the history changed.
    pub fn compact(&mut self, now: Timestamp, cut: &EpochCut) -> Result<ChangeHash, CompactError> {
        let base = self.doc.compact(now, cut, &self.verifier)?;
        self.restart_sessions();
        Ok(base)
    }

    /// Takes the snapshot of a later epoch from its base change's bytes (see
    /// [`ClusterDoc::adopt_base`]) and restarts every session.
    pub fn adopt_base(
        &mut self,
        now: Timestamp,
        epoch: u64,
        bytes: &[u8],
        base: ChangeHash,
    ) -> Result<(), CompactError> {
        self.doc
            .adopt_base(now, epoch, bytes, base, &self.verifier)?;
        self.restart_sessions();
        Ok(())
    }

    fn restart_sessions(&mut self) {
        let _ = self.doc.take_local_changes();
        for p in self.peers.values_mut() {
            p.sync = sync::State::new();
        }
    }
}

impl From<FrameError> for Offence {
    fn from(e: FrameError) -> Self {
        Offence::Malformed(e.to_string())
    }
}
