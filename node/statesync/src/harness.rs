//! An in-process, deterministic multi-node harness for tests and benchmarks: many engines on
//! a virtual clock, a random connection graph, per-message latency, loss and partitions.
//! Lost or partitioned sends come back to the sender as `handle_send_failed`, as libp2p
//! request-response reports an outbound failure. Nudges are delivered to every node in the
//! sender's partition (an idealised gossipsub) when enabled.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet, BinaryHeap},
};

use dwcp_protocol::{NodeId, Timestamp};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{
    ClusterDoc, Command, Config, Engine, Offence,
    fake::{FakeCertificateVerifier, fake_node_key},
};

/// Harness parameters.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Number of nodes.
    pub nodes: usize,
    /// Connections each node opens to random others (the graph is undirected).
    pub degree: usize,
    /// Seed for the graph, latency, loss and every engine's seed.
    pub seed: u64,
    /// Probability that a frame is lost.
    pub loss: f64,
    /// Latency range, ms.
    pub latency_ms: (u64, u64),
    /// Engine configuration (its seed is replaced per node).
    pub engine: Config,
    /// Deliver gossip nudges.
    pub nudges: bool,
    /// Cluster id.
    pub cluster: String,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            nodes: 10,
            degree: 8,
            seed: 1,
            loss: 0.0,
            latency_ms: (10, 60),
            engine: Config::default(),
            nudges: false,
            cluster: "sim".into(),
        }
    }
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Timer(usize),
    Deliver {
        from: usize,
        to: usize,
        bytes: Vec<u8>,
    },
    Nudge {
        from: usize,
        to: usize,
        bytes: Vec<u8>,
    },
    SendFailed {
        from: usize,
        to: usize,
    },
}

/// The harness.
pub struct SimCluster {
    /// The engines, by index.
    pub engines: Vec<Engine<FakeCertificateVerifier>>,
    /// Node ids by index.
    pub ids: Vec<NodeId>,
    index: BTreeMap<NodeId, usize>,
    links: Vec<BTreeSet<usize>>,
    now: u64,
    seq: u64,
    events: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    rng: ChaCha8Rng,
    cfg: SimConfig,
    group: Vec<u8>,
    /// Reports emitted: (reporter, offender, offence).
    pub reports: Vec<(usize, NodeId, Offence)>,
    /// Frames delivered.
    pub frames_delivered: u64,
    /// Bytes delivered (sync frames and nudges).
    pub bytes_delivered: u64,
    /// When `Some`, every delivered point-to-point frame is also appended here (analysis).
    pub frame_log: Option<Vec<Vec<u8>>>,
}

impl SimCluster {
    /// Builds the cluster at time `start_ms` with the given committee's verifier; every node
    /// connects to its peers (sessions start).
    pub fn new(cfg: SimConfig, verifier: &FakeCertificateVerifier, start_ms: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let n = cfg.nodes;
        let mut engines = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let key = fake_node_key(i as u64);
            ids.push(key.node_id());
            let doc = ClusterDoc::new(key, &cfg.cluster, 1).expect("genesis always builds");
            let ecfg = cfg
                .engine
                .clone()
                .with_seed(cfg.seed ^ (i as u64).wrapping_mul(0x9e37_79b9));
            engines.push(Engine::new(ecfg, doc, verifier.clone()).expect("valid config"));
        }
        let mut links = vec![BTreeSet::new(); n];
        // A random spanning tree first, so the graph is connected, then random extra links.
        for i in 1..n {
            let j = rng.random_range(0..i);
            links[i].insert(j);
            links[j].insert(i);
        }
        for i in 0..n {
            for _ in 0..cfg.degree.div_ceil(2) {
                if n < 2 {
                    break;
                }
                let j = rng.random_range(0..n);
                if j != i {
                    links[i].insert(j);
                    links[j].insert(i);
                }
            }
        }
        let index = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let mut sim = Self {
            engines,
            ids,
            index,
            links,
            now: start_ms,
            seq: 0,
            events: BinaryHeap::new(),
            rng,
            group: vec![0; n],
            cfg,
            reports: Vec::new(),
            frames_delivered: 0,
            bytes_delivered: 0,
            frame_log: None,
        };
        for i in 0..n {
            let phase = sim.rng.random_range(0..sim.cfg.engine.interval_ms);
            sim.schedule(start_ms + phase, Ev::Timer(i));
            let peers: Vec<usize> = sim.links[i].iter().copied().filter(|j| *j > i).collect();
            for j in peers {
                let (a, b) = (sim.ids[i], sim.ids[j]);
                sim.engines[i].handle_peer_connected(Timestamp(start_ms), b);
                sim.drain(i);
                sim.engines[j].handle_peer_connected(Timestamp(start_ms), a);
                sim.drain(j);
            }
        }
        sim
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse((at, self.seq, ev)));
    }

    /// Replaces node `i`'s document (e.g. a loaded one) and restarts its sessions.
    pub fn set_doc(&mut self, i: usize, doc: ClusterDoc, verifier: &FakeCertificateVerifier) {
        let ecfg = self
            .cfg
            .engine
            .clone()
            .with_seed(self.cfg.seed ^ (i as u64).wrapping_mul(0x9e37_79b9));
        self.index.remove(&self.ids[i]);
        self.ids[i] = doc.node_id();
        self.index.insert(self.ids[i], i);
        self.engines[i] = Engine::new(ecfg, doc, verifier.clone()).expect("valid config");
        let now = Timestamp(self.now);
        let peers: Vec<usize> = self.links[i].iter().copied().collect();
        for j in peers {
            let (a, b) = (self.ids[i], self.ids[j]);
            self.engines[i].handle_peer_connected(now, b);
            self.drain(i);
            self.engines[j].handle_peer_connected(now, a);
            self.drain(j);
        }
    }

    /// Current virtual time, ms.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Index of a node id.
    pub fn index_of(&self, id: &NodeId) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// Splits the cluster: nodes in `side` form group 1, the rest group 0. Frames between
    /// groups fail.
    pub fn partition(&mut self, side: &[usize]) {
        self.group = vec![0; self.engines.len()];
        for &i in side {
            self.group[i] = 1;
        }
    }

    /// Heals the partition.
    pub fn heal(&mut self) {
        self.group = vec![0; self.engines.len()];
    }

    /// Executes the commands a node queued.
    pub fn drain(&mut self, i: usize) {
        while let Some(c) = self.engines[i].poll_command() {
            match c {
                Command::Send { peer, bytes } => {
                    let Some(j) = self.index_of(&peer) else {
                        continue;
                    };
                    let (lo, hi) = self.cfg.latency_ms;
                    let lat = self.rng.random_range(lo..=hi);
                    let lost = self.cfg.loss > 0.0 && self.rng.random::<f64>() < self.cfg.loss;
                    if lost || self.group[i] != self.group[j] || !self.links[i].contains(&j) {
                        self.schedule(self.now + 2 * hi, Ev::SendFailed { from: i, to: j });
                    } else {
                        self.schedule(
                            self.now + lat,
                            Ev::Deliver {
                                from: i,
                                to: j,
                                bytes,
                            },
                        );
                    }
                }
                Command::Publish { bytes } => {
                    if !self.cfg.nudges {
                        continue;
                    }
                    for j in 0..self.engines.len() {
                        if j != i && self.group[j] == self.group[i] {
                            let (lo, hi) = self.cfg.latency_ms;
                            let lat = self.rng.random_range(lo..=hi) * 2;
                            self.schedule(
                                self.now + lat,
                                Ev::Nudge {
                                    from: i,
                                    to: j,
                                    bytes: bytes.clone(),
                                },
                            );
                        }
                    }
                }
                Command::ReportPeer { peer, offence } => self.reports.push((i, peer, offence)),
                _ => {}
            }
        }
    }

    /// Runs events up to `until_ms`.
    pub fn run_until(&mut self, until_ms: u64) {
        while let Some(Reverse((at, _, _))) = self.events.peek() {
            if *at > until_ms {
                break;
            }
            let Some(Reverse((at, _, ev))) = self.events.pop() else {
                break;
            };
            self.now = at;
            let now = Timestamp(at);
            match ev {
                Ev::Timer(i) => {
                    self.engines[i].handle_timeout(now);
                    self.drain(i);
                    let next = self.engines[i]
                        .poll_timeout()
                        .map_or(at + self.cfg.engine.interval_ms, |t| {
                            t.as_millis().max(at + 1)
                        });
                    self.schedule(next, Ev::Timer(i));
                }
                Ev::Deliver { from, to, bytes } => {
                    self.frames_delivered += 1;
                    self.bytes_delivered += bytes.len() as u64;
                    if let Some(log) = self.frame_log.as_mut() {
                        log.push(bytes.clone());
                    }
                    let id = self.ids[from];
                    self.engines[to].handle_message(now, id, &bytes);
                    self.drain(to);
                }
                Ev::Nudge { from, to, bytes } => {
                    self.frames_delivered += 1;
                    self.bytes_delivered += bytes.len() as u64;
                    let id = self.ids[from];
                    self.engines[to].handle_nudge(now, id, &bytes);
                    self.drain(to);
                }
                Ev::SendFailed { from, to } => {
                    let id = self.ids[to];
                    self.engines[from].handle_send_failed(now, id);
                }
            }
        }
        self.now = self.now.max(until_ms);
    }

    /// Runs until `pred` holds (checked every `step_ms`) or `limit_ms` passes; returns the
    /// time it took, or `None`.
    pub fn run_until_pred(
        &mut self,
        step_ms: u64,
        limit_ms: u64,
        mut pred: impl FnMut(&Self) -> bool,
    ) -> Option<u64> {
        let start = self.now;
        while self.now - start <= limit_ms {
            if pred(self) {
                return Some(self.now - start);
            }
            let t = self.now + step_ms;
            self.run_until(t);
        }
        None
    }

    /// Whether every node in `nodes` has the same heads.
    pub fn converged(&self, nodes: &[usize]) -> bool {
        let Some(first) = nodes.first() else {
            return true;
        };
        let h = self.engines[*first].doc().heads();
        nodes.iter().all(|i| self.engines[*i].doc().heads() == h)
    }

    /// Whether every node in `nodes` holds change `h`.
    pub fn all_have(&self, nodes: &[usize], h: &crate::ChangeHash) -> bool {
        nodes.iter().all(|i| self.engines[*i].doc().has_change(h))
    }
}
