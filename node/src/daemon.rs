//! The node daemon: joins the mesh, publishes its signed announcement and heartbeats, keeps
//! the membership table, persists what it learns, and serves the local API and metrics.
//!
//! ```text
//!            +------------------- dwcp-node -------------------+
//! gossip --> | dwcp-net EventLoop --Event--> Daemon::on_gossip |
//!            |   ^                 verify (Verified<T>) ------> Membership (pure)
//!            |   | report_validation(Accept|Reject|Ignore)     |  \--> Store (sled)
//!            |   +---- Client::publish <--- heartbeat timer    |
//!            | axum API (127.0.0.1:8080) / metrics (:8084) <-- Shared
//!            +-------------------------------------------------+
//! ```

use std::{
    collections::BTreeSet,
    future::Future,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use dwcp_net::{Event, GossipMessage, NetStats, PeerId, Service, Validation};
use dwcp_protocol::{
    DonatedShare, Gpu, Health, HealthStatus, Heartbeat, NodeAnnouncement, NodeId, NodeKey,
    Resources, Timestamp, Verified,
    api::{ClusterHealth, ClusterStatus, HealthCheck, NodeInfo, NodeMetrics, PeerStatus},
    version::Topics,
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    config::NodeConfig,
    gossip::{Classified, classify},
    host,
    membership::{Membership, Update},
    metrics::Metrics,
    statesync::{self, StateSync},
    store::Store,
};

/// State shared between the daemon loop and the API handlers. Locks are held only for short,
/// synchronous sections, never across an `.await`.
#[derive(Debug)]
pub struct Shared {
    /// This node's metrics.
    pub metrics: Metrics,
    /// This node's VMs.
    pub vms: crate::vms::Vms,
    /// This node's placement service (ITP).
    pub placement: crate::placement::Placement,
    client: dwcp_net::Client,
    statesync: Option<StateSync>,
    consensus: Option<crate::consensus::Consensus>,
    pba: Option<crate::pba::Pba>,
    amst: Arc<crate::amst::Amst>,
    id: NodeId,
    cluster_id: String,
    started: Instant,
    bootstrap_peers: usize,
    compaction: crate::config::AssCompaction,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    membership: Membership,
    me: Verified<NodeAnnouncement>,
    health: Health,
    net: NetStats,
}

impl Shared {
    /// The network client.
    pub fn client(&self) -> &dwcp_net::Client {
        &self.client
    }

    /// The bulk-transfer service (AMST).
    pub fn amst(&self) -> &Arc<crate::amst::Amst> {
        &self.amst
    }

    /// `ass.compaction` configuration.
    pub fn compaction_config(&self) -> &crate::config::AssCompaction {
        &self.compaction
    }

    /// The consensus driver, when a committee is configured.
    pub fn consensus(&self) -> Option<&crate::consensus::Consensus> {
        self.consensus.as_ref()
    }

    /// The PBA driver (link samples and bandwidth forecasts), unless `pba.enabled` is false.
    pub fn pba(&self) -> Option<&crate::pba::Pba> {
        self.pba.as_ref()
    }

    /// Whether a node is quarantined: by this node's replicated consensus state, or by a
    /// certified record in the cluster document (all a node outside the committee has).
    pub fn is_quarantined(&self, node: &NodeId) -> bool {
        self.consensus().is_some_and(|c| c.is_quarantined(node))
            || self.statesync().is_some_and(|s| s.is_quarantined(node))
    }

    /// The state-sync driver, when it runs.
    pub fn statesync(&self) -> Option<&StateSync> {
        self.statesync.as_ref()
    }

    /// A peer's signed announcement (its capacity claim), if known.
    pub fn announcement_envelope(&self, id: &NodeId) -> Option<dwcp_protocol::SignedEnvelope> {
        self.lock()
            .membership
            .announcement(id)
            .map(|a| a.envelope().clone())
    }

    /// Whether a peer's signed announcement is known (it is a member of our cluster).
    pub fn is_member(&self, id: &NodeId) -> bool {
        self.lock().membership.announcement(id).is_some()
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.id
    }

    /// The cluster id.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// Ready nodes for placement, this node first (its allocation is left to the caller,
    /// who reads the VM table).
    pub fn placement_view(&self) -> Vec<crate::placement::NodeSnapshot> {
        let rows = self.node_rows();
        let g = self.lock();
        rows.into_iter()
            .filter(|r| r.status == dwcp_protocol::api::PeerStatus::Ready)
            // Quarantined nodes never host VMs.
            .filter(|r| !self.is_quarantined(&r.id))
            .map(|r| {
                let hb = g.membership.heartbeat(&r.id);
                let link = (!r.is_self)
                    .then(|| self.pba().and_then(|p| p.link(&r.id)))
                    .flatten();
                crate::placement::NodeSnapshot {
                    id: r.id,
                    is_self: r.is_self,
                    announced: r.is_self || g.membership.announcement(&r.id).is_some(),
                    region: r.region,
                    resources: r.resources,
                    donated: r.donated,
                    status: r.health,
                    allocated: hb.and_then(|h| h.health.allocated),
                    heartbeat_seq: hb.map_or(0, |h| h.seq),
                    link_quality: link.and_then(|l| l.quality).unwrap_or(1.0),
                    rtt_ms: link
                        .and_then(|l| l.rtt_ms)
                        .map_or(0, |ms| ms.round().clamp(0.0, f64::from(u32::MAX)) as u32),
                }
            })
            .collect()
    }

    /// Milliseconds since the node started (the membership table's clock).
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every node, this one first.
    pub fn node_rows(&self) -> Vec<NodeInfo> {
        let now = self.now();
        let g = self.lock();
        let a = g.me.message();
        let mut rows = vec![NodeInfo {
            id: self.id,
            peer_id: self
                .id
                .to_peer_id()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            status: PeerStatus::Ready,
            is_self: true,
            region: a.region.clone(),
            version: a.version.clone(),
            addresses: a.listen_addrs.clone(),
            resources: a.resources.clone(),
            donated: a.donated.clone(),
            health: Some(g.health.status),
            last_seen_ms_ago: 0,
            last_heartbeat_seq: 0,
        }];
        rows.extend(
            g.membership
                .rows(now)
                .into_iter()
                .filter(|r| r.id != self.id),
        );
        rows
    }

    /// Refreshes the gauges derived from state (called before each scrape and periodically).
    pub fn refresh_gauges(&self) {
        let now = self.now();
        let g = self.lock();
        let (known, ready) = g.membership.counts(now);
        self.metrics.nodes_known.set(known as i64 + 1);
        self.metrics.workers_ready.set(ready as i64 + 1);
        self.metrics.nodes_unreachable.set((known - ready) as i64);
        self.metrics
            .peers_connected
            .set(g.net.connected_peers.len() as i64);
        self.metrics
            .routing_table_size
            .set(g.net.routing_table_size as i64);
        self.metrics.events_dropped.set(g.net.events_dropped as i64);
        for (t, n) in &g.net.mesh_peers {
            self.metrics
                .mesh_peers
                .with_label_values(&[t.as_str()])
                .set(*n as i64);
        }
        self.metrics
            .uptime_seconds
            .set(self.started.elapsed().as_secs() as i64);
    }

    /// `GET /v1/cluster/status`.
    pub fn cluster_status(&self) -> ClusterStatus {
        let now = self.now();
        let g = self.lock();
        let (known, ready) = g.membership.counts(now);
        ClusterStatus {
            cluster_id: self.cluster_id.clone(),
            node_id: self.id,
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_s: self.started.elapsed().as_secs(),
            nodes_known: known + 1,
            nodes_ready: ready + 1,
            nodes_unreachable: known - ready,
            peers_connected: g.net.connected_peers.len(),
            bootstrap_peers: self.bootstrap_peers,
            listen_addrs: g.net.listen_addrs.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// `GET /v1/cluster/health`: only components that exist are checked.
    pub fn cluster_health(&self) -> ClusterHealth {
        let st = self.cluster_status();
        let g = self.lock();
        let heartbeat_mesh = g
            .net
            .mesh_peers
            .iter()
            .filter(|(t, _)| t.ends_with("/heartbeat"))
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0);
        let checks = vec![
            HealthCheck {
                component: "network".into(),
                ok: st.peers_connected > 0 || self.bootstrap_peers == 0,
                detail: format!(
                    "{} peers connected, {} bootstrap peers configured",
                    st.peers_connected, self.bootstrap_peers
                ),
            },
            HealthCheck {
                component: "gossip".into(),
                ok: heartbeat_mesh > 0 || st.nodes_known == 1,
                detail: format!("{heartbeat_mesh} peers in the heartbeat mesh"),
            },
            match self.vms.unavailable_reason() {
                None => {
                    let i = self.vms.info();
                    HealthCheck {
                        component: "hypervisor".into(),
                        ok: true,
                        detail: format!(
                            "qemu, accel {}, cpu model {}{}",
                            i.and_then(|i| i.accel).map(|a| a.as_str()).unwrap_or("?"),
                            i.map(|i| i.cpu_model.as_str()).unwrap_or("?"),
                            i.map(|i| format!(" ({})", i.accel_reason))
                                .unwrap_or_default()
                        ),
                    }
                }
                Some(why) => HealthCheck {
                    component: "hypervisor".into(),
                    // Not lending VMs is a volunteer's choice, not a fault.
                    ok: true,
                    detail: format!("no VMs: {why}"),
                },
            },
            HealthCheck {
                component: "membership".into(),
                ok: st.nodes_unreachable * 10 <= st.nodes_known,
                detail: format!(
                    "{}/{} nodes ready, {} unreachable",
                    st.nodes_ready, st.nodes_known, st.nodes_unreachable
                ),
            },
        ];
        ClusterHealth {
            healthy: checks.iter().all(|c| c.ok),
            checks,
        }
    }

    /// `GET /v1/nodes/{id}/metrics`.
    pub fn node_metrics(&self, row: &NodeInfo) -> NodeMetrics {
        if row.is_self {
            self.refresh_gauges();
            return NodeMetrics {
                id: row.id,
                metrics: self.metrics.flatten(),
            };
        }
        let g = self.lock();
        let mut m = std::collections::BTreeMap::new();
        m.insert("last_seen_ms_ago".into(), row.last_seen_ms_ago as f64);
        m.insert(
            "ready".into(),
            f64::from(u8::from(row.status == PeerStatus::Ready)),
        );
        if let Some(hb) = g.membership.heartbeat(&row.id) {
            m.insert("uptime_seconds".into(), hb.uptime_s as f64);
            m.insert(
                "cpu_load_permille".into(),
                f64::from(hb.health.cpu_load_permille),
            );
            m.insert("memory_used_mib".into(), hb.health.memory_used_mib as f64);
            m.insert("vms_running".into(), f64::from(hb.health.vms_running));
            m.insert(
                "peers_connected".into(),
                f64::from(hb.health.peers_connected),
            );
        }
        NodeMetrics {
            id: row.id,
            metrics: m,
        }
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A sequence number that keeps growing across restarts: the wall clock in ms, or one more than
/// the last one if the clock stepped back.
#[derive(Debug, Default)]
struct SeqGen(u64);

impl SeqGen {
    fn next(&mut self) -> u64 {
        self.0 = wall_ms().max(self.0 + 1);
        self.0
    }
}

/// File in the data directory naming the API and metrics addresses the node bound
/// (`{"api": "127.0.0.1:PORT", "metrics": "127.0.0.1:PORT"}`), rewritten at every start.
pub const ENDPOINTS_FILE: &str = "endpoints.json";

/// Everything the daemon needs to start.
#[derive(Debug)]
pub struct NodeSetup {
    /// Validated configuration.
    pub config: NodeConfig,
    /// The node's key.
    pub key: NodeKey,
    /// Resolved data directory.
    pub data_dir: PathBuf,
}

struct Daemon {
    shared: Arc<Shared>,
    sync: StateSync,
    /// Peers with an open connection.
    connected: BTreeSet<PeerId>,
    /// Members the state-sync engine was told are connected.
    sync_peers: BTreeSet<NodeId>,
    client: dwcp_net::Client,
    store: Store,
    topics: Topics,
    key: NodeKey,
    config: NodeConfig,
    seq: SeqGen,
    announce_due: bool,
    listen_addrs: Vec<String>,
}

fn resources_of(cfg: &NodeConfig, data_dir: &std::path::Path) -> (Resources, DonatedShare) {
    let r = &cfg.node.resources;
    let resources = Resources {
        vcpus: if r.cpu == 0 { host::cpus() } else { r.cpu },
        memory_mib: if r.memory_mib == 0 {
            host::memory_mib()
        } else {
            r.memory_mib
        },
        disk_gib: if r.disk_gib == 0 {
            host::disk_free_gib(data_dir)
        } else {
            r.disk_gib
        },
        gpus: if r.gpu.enabled && r.gpu.count > 0 {
            vec![Gpu {
                model: r.gpu.model.clone(),
                count: r.gpu.count,
            }]
        } else {
            vec![]
        },
    };
    let d = &cfg.node.donated;
    let pct = |v: u64, p: u8| v * u64::from(p) / 100;
    let donated = DonatedShare {
        vcpus: (u64::from(resources.vcpus) * u64::from(d.cpu_percent) / 100) as u32,
        memory_mib: pct(resources.memory_mib, d.memory_percent),
        disk_gib: pct(resources.disk_gib, d.disk_percent),
        uplink_mbps: d.uplink_mbps,
    };
    (resources, donated)
}

impl Daemon {
    fn announcement(&mut self) -> anyhow::Result<Verified<NodeAnnouncement>> {
        let (resources, donated) = resources_of(&self.config, &self.shared_data_dir());
        let a = NodeAnnouncement {
            cluster_id: self.config.cluster.id.clone(),
            seq: self.seq.next(),
            issued_at: Timestamp(wall_ms()),
            region: self.config.node.region.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            resources,
            donated,
            listen_addrs: self.listen_addrs.iter().take(16).cloned().collect(),
        };
        Ok(Verified::sign(&self.key, a)?)
    }

    fn shared_data_dir(&self) -> PathBuf {
        self.config.node.data_dir.clone()
    }

    /// Publishes; false when it failed (e.g. no peer in the topic yet).
    async fn publish(&self, topic: &str, bytes: Vec<u8>) -> bool {
        match self.client.publish(topic, bytes).await {
            Ok(()) => {
                self.shared
                    .metrics
                    .gossip_published
                    .with_label_values(&[topic])
                    .inc();
                true
            }
            Err(e) => {
                self.shared.metrics.gossip_publish_errors.inc();
                debug!(%topic, error = %e, "publish failed");
                false
            }
        }
    }

    async fn announce(&mut self) -> anyhow::Result<()> {
        let a = self.announcement()?;
        let bytes = a.envelope().encode();
        self.sync
            .offer(statesync::Input::Announcement(a.message().clone()));
        self.shared.lock().me = a;
        let topic = self.topics.announce.clone();
        // Retried on the next heartbeat until it reaches at least one peer.
        self.announce_due = !self.publish(&topic, bytes).await;
        Ok(())
    }

    async fn heartbeat(&mut self, status: HealthStatus) -> anyhow::Result<()> {
        let net = self.client.stats().await?;
        let counts = self.shared.vms.counts().await;
        self.shared.metrics.vm_count.reset();
        let mut running = 0;
        for (state, n) in &counts {
            self.shared
                .metrics
                .vm_count
                .with_label_values(&[state.as_str()])
                .set(*n as i64);
            if state == "running" {
                running = *n as u32;
            }
        }
        let health = Health {
            status,
            cpu_load_permille: host::cpu_load_permille(),
            memory_used_mib: host::memory_used_mib(),
            vms_running: running,
            peers_connected: net.connected_peers.len() as u32,
            allocated: self.shared.vms.allocation().await,
        };
        {
            let mut g = self.shared.lock();
            g.health = health.clone();
            g.net = net;
        }
        let hb = Heartbeat {
            cluster_id: self.config.cluster.id.clone(),
            seq: self.seq.next(),
            issued_at: Timestamp(wall_ms()),
            uptime_s: self.shared.started.elapsed().as_secs(),
            health,
        };
        self.sync.offer(statesync::Input::Heartbeat(hb.clone()));
        let bytes = Verified::sign(&self.key, hb)?.envelope().encode();
        let topic = self.topics.heartbeat.clone();
        let _ = self.publish(&topic, bytes).await;
        self.shared.refresh_gauges();
        Ok(())
    }

    async fn on_gossip(&mut self, m: GossipMessage) {
        if m.topic == self.topics.consensus {
            let fallback = m.clone();
            let taken = self
                .shared
                .consensus()
                .is_some_and(|c| c.offer(crate::consensus::DriverInput::Gossip(m)));
            if !taken {
                let _ = self
                    .client
                    .report_validation(&fallback, Validation::Ignore)
                    .await;
            }
            return;
        }
        if m.topic == self.topics.statesync {
            // The driver validates nudges itself and reports the verdict.
            let fallback = m.clone();
            if !self.sync.offer(statesync::Input::Nudge(m)) {
                let _ = self
                    .client
                    .report_validation(&fallback, Validation::Ignore)
                    .await;
            }
            return;
        }
        let now = self.shared.now();
        let verdict: Result<(), (Validation, &'static str)> =
            match classify(&m, &self.topics, &self.config.cluster.id) {
                Classified::Heartbeat(v) => {
                    match self.shared.lock().membership.on_heartbeat(now, v) {
                        Update::Applied => Ok(()),
                        Update::Stale => Err((Validation::Ignore, "stale")),
                    }
                }
                Classified::Announcement(v) => {
                    let saved = v.clone();
                    let update = self.shared.lock().membership.on_announcement(now, v);
                    match update {
                        Update::Applied => {
                            self.sync_peer_up(saved.signer());
                            if let Err(e) = self.store.save_announcement(&saved) {
                                warn!(error = %e, "persisting an announcement failed");
                            }
                            Ok(())
                        }
                        Update::Stale => Err((Validation::Ignore, "stale")),
                    }
                }
                Classified::Invalid(r) => Err((Validation::Reject, r)),
                Classified::Ignored(r) => Err((Validation::Ignore, r)),
            };
        let metrics = &self.shared.metrics;
        let v = match verdict {
            Ok(()) => {
                metrics
                    .gossip_received
                    .with_label_values(&[m.topic.as_str()])
                    .inc();
                Validation::Accept
            }
            Err((Validation::Reject, reason)) => {
                metrics
                    .gossip_rejected
                    .with_label_values(&[m.topic.as_str(), reason])
                    .inc();
                warn!(topic = %m.topic, from = %m.propagation_source, %reason, "rejected gossip message");
                Validation::Reject
            }
            Err((v, reason)) => {
                metrics
                    .gossip_ignored
                    .with_label_values(&[m.topic.as_str(), reason])
                    .inc();
                v
            }
        };
        if let Err(e) = self.client.report_validation(&m, v).await {
            warn!(error = %e, "reporting a validation result failed");
        }
    }

    /// Tells state sync about a member with an open connection (once).
    fn sync_peer_up(&mut self, id: NodeId) {
        let Ok(pid) = id.to_peer_id() else { return };
        if id != self.shared.id
            && self.connected.contains(&pid)
            && self.shared.is_member(&id)
            && self.sync_peers.insert(id)
        {
            self.sync.offer(statesync::Input::Connected(id));
        }
    }

    fn on_request(&mut self, r: dwcp_net::InboundRequest) {
        match r.service {
            Service::Sync => {
                let member = NodeId::from_peer_id(&r.peer)
                    .map(|id| self.shared.is_member(&id))
                    .unwrap_or(false);
                let sync = self.sync.clone();
                let client = self.client.clone();
                // A checksum query waits for the driver; never block the event loop on it.
                tokio::spawn(async move {
                    sync.on_request(&client, r.peer, member, r.data, r.reply)
                        .await;
                });
            }
            Service::Control => crate::control::on_request(self.shared.clone(), r),
            Service::StateTransfer => {
                // A certified snapshot from sled, off the event loop; anyone may ask (the
                // reply proves itself), the request-response layer bounds the frames.
                let client = self.client.clone();
                let c = self.shared.consensus().cloned();
                let dwcp_net::InboundRequest { data, reply, .. } = r;
                tokio::spawn(async move {
                    let bytes = match c {
                        Some(c) => tokio::task::spawn_blocking(move || c.serve_transfer(&data))
                            .await
                            .unwrap_or_default(),
                        None => Vec::new(),
                    };
                    let _ = client.respond(reply, bytes).await;
                });
            }
            Service::Consensus => {
                // One-way: acknowledge at once (empty), then hand the envelope to the driver,
                // which verifies it. Nodes without a replica drop it.
                let client = self.client.clone();
                let c = self.shared.consensus().cloned();
                let dwcp_net::InboundRequest {
                    peer, data, reply, ..
                } = r;
                let ok = c
                    .is_some_and(|c| c.offer(crate::consensus::DriverInput::Direct { peer, data }));
                tokio::spawn(async move {
                    let _ = client
                        .respond(reply, if ok { Vec::new() } else { vec![0xff] })
                        .await;
                });
            }
        }
    }

    fn on_event(&mut self, ev: Event) -> Option<GossipMessage> {
        match ev {
            Event::Gossip(m) => return Some(m),
            Event::Request(r) => self.on_request(r),
            Event::PeerDisconnected(p) => {
                self.connected.remove(&p);
                if let Ok(id) = NodeId::from_peer_id(&p)
                    && self.sync_peers.remove(&id)
                {
                    self.sync.offer(statesync::Input::Disconnected(id));
                }
            }
            Event::PeerConnected(p) => {
                debug!(peer = %p, "peer connected");
                if let Ok(id) = NodeId::from_peer_id(&p)
                    && self.shared.is_quarantined(&id)
                {
                    // The peer manager keeps quarantined nodes out.
                    let client = self.client.clone();
                    tokio::spawn(async move {
                        let _ = client.disconnect(p).await;
                    });
                    return None;
                }
                self.connected.insert(p);
                if let Ok(id) = NodeId::from_peer_id(&p) {
                    self.sync_peer_up(id);
                }
                // Newcomers learn about us sooner than the next periodic announcement.
                self.announce_due = true;
            }
            Event::ListeningOn(a) => {
                let s = a.to_string();
                if !s.contains("/0.0.0.0/") && !self.listen_addrs.contains(&s) {
                    self.listen_addrs.push(s);
                    self.announce_due = true;
                }
            }
            Event::PingRtt { peer, rtt } => {
                if let (Some(p), Ok(id)) = (self.shared.pba(), NodeId::from_peer_id(&peer)) {
                    p.record_rtt(&id, rtt);
                }
            }
            Event::PeerIncompatible {
                peer,
                protocol_version,
            } => {
                info!(%peer, %protocol_version, "peer runs an incompatible version");
            }
            _ => {}
        }
        None
    }
}

/// Runs the node until `shutdown` resolves.
pub async fn run(setup: NodeSetup, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let NodeSetup {
        mut config,
        key,
        data_dir,
    } = setup;
    config.node.data_dir = data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let store = Store::open(&data_dir)?;
    let starts = store.bump_start_count()?;
    let id = key.node_id();
    info!(node = %id, peer = %id.to_peer_id()?, starts, cluster = %config.cluster.id, "starting node");

    let topics = Topics::for_cluster(&config.cluster.id);
    let mut net = dwcp_net::NetConfig::new(key.to_libp2p(), dwcp_net::Role::Node);
    net.listen = config
        .network
        .listen
        .iter()
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    net.bootstrap = config
        .cluster
        .bootstrap
        .iter()
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    net.topics = vec![
        topics.announce.clone(),
        topics.heartbeat.clone(),
        topics.statesync.clone(),
        topics.consensus.clone(),
    ];
    net.target_peers = config.network.target_peers;
    net.max_connections = config.network.max_connections;
    net.agent_version = format!("dwcp-node/{}", env!("CARGO_PKG_VERSION"));
    let (client, mut events, event_loop) = dwcp_net::new(net)?;
    let net_task = tokio::spawn(event_loop.run());

    let metrics = Metrics::new()?;
    let mut membership = Membership::new(config.network.unreachable_after.as_millis() as u64);
    let (restored, dropped) = store.load_announcements();
    if dropped > 0 {
        warn!(
            dropped,
            "dropped stored announcements that no longer verify"
        );
    }
    for a in restored
        .into_iter()
        .filter(|a| a.signer() != id && a.cluster_id == config.cluster.id)
    {
        membership.restore(a);
    }
    let (resources, donated) = resources_of(&config, &data_dir);
    let me = Verified::sign(
        &key,
        NodeAnnouncement {
            cluster_id: config.cluster.id.clone(),
            seq: 0,
            issued_at: Timestamp(wall_ms()),
            region: config.node.region.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            resources,
            donated,
            listen_addrs: vec![],
        },
    )?;
    let share = dwcp_hypervisor::DonatedShare {
        vcpus: me.donated.vcpus,
        memory_mib: me.donated.memory_mib,
        disk_mib: me.donated.disk_gib * 1024,
    };
    let vms =
        crate::vms::Vms::open(&config.hypervisor, &data_dir, share, store.vm_names()?, id).await;
    if let Some(i) = vms.info() {
        let cgroup = match &i.cgroup {
            dwcp_hypervisor::CgroupMode::V2 { .. } => "v2",
            dwcp_hypervisor::CgroupMode::V1 { .. } => "v1",
            _ => "none",
        };
        metrics
            .hypervisor_info
            .with_label_values(&[
                i.accel.map(|a| a.as_str()).unwrap_or("none"),
                &i.cpu_model,
                cgroup,
            ])
            .set(1);
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    // One table of committees for both drivers: consensus adds each epoch's committee.
    let verifier =
        crate::cert::CommitteeVerifier::new(crate::consensus::genesis_committee(&config.acp)?);
    let committees = store.tree("consensus_committees")?;
    if verifier.committee(0).is_some() {
        // Before state sync loads its cuts: their certificates may be of later epochs.
        crate::consensus::load_committees(&committees, &verifier);
    }
    let (sync, sync_task) = statesync::spawn(statesync::SyncSetup {
        cfg: &config.ass,
        key: key.clone(),
        cluster_id: &config.cluster.id,
        tree: store.tree("statesync")?,
        client: client.clone(),
        topic: topics.statesync.clone(),
        registry: &metrics.registry,
        stop: stop_rx.clone(),
        verifier: verifier.clone(),
    })?;
    let acp = crate::consensus::spawn(crate::consensus::AcpSetup {
        cfg: &config.acp,
        key: key.clone(),
        client: client.clone(),
        topic: topics.consensus.clone(),
        registry: &metrics.registry,
        stop: stop_rx.clone(),
        statesync: Some(sync.clone()),
        votes: Some(store.tree("consensus_votes")?),
        verifier,
        committees: Some(committees),
        resume: Some(store.tree("consensus_resume")?),
        links: Some(store.tree("consensus_links")?),
    })?;
    let (pba, pba_task) = match crate::pba::spawn(crate::pba::PbaSetup {
        cfg: &config.pba,
        data_dir: &data_dir,
        registry: &metrics.registry,
        stop: stop_rx.clone(),
    })? {
        Some((p, t)) => (Some(p), Some(t)),
        None => (None, None),
    };
    let (consensus, acp_task) = match acp {
        Some((c, t)) => (Some(c), Some(t)),
        None => (None, None),
    };
    let amst = crate::amst::Amst::start(
        crate::amst::AmstSetup {
            cfg: &config.transport.amst,
            keypair: key.to_libp2p(),
            node: id,
            cluster_id: config.cluster.id.clone(),
            client: client.clone(),
            registry: &metrics.registry,
            pba: pba.clone(),
        },
        stop_rx.clone(),
    )
    .await?;
    let shared = Arc::new(Shared {
        amst,
        metrics,
        vms,
        placement: crate::placement::Placement::new(&config.placement),
        client: client.clone(),
        statesync: Some(sync.clone()),
        consensus,
        pba,
        id,
        cluster_id: config.cluster.id.clone(),
        started: Instant::now(),
        bootstrap_peers: config.cluster.bootstrap.len(),
        compaction: config.ass.compaction.clone(),
        inner: Mutex::new(Inner {
            membership,
            me,
            health: Health {
                status: HealthStatus::Healthy,
                cpu_load_permille: 0,
                memory_used_mib: 0,
                vms_running: 0,
                peers_connected: 0,
                allocated: None,
            },
            net: NetStats::default(),
        }),
    });

    // Members measure what transfers from other nodes achieve (AMST receives): the
    // measurements check their capacity claims (reputation evidence).
    let measure_task = {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(NodeId, u64, Duration)>(64);
        shared.amst().report_receives(tx);
        let (shared, key) = (shared.clone(), key.clone());
        tokio::spawn(async move {
            while let Some((from, bytes, took)) = rx.recv().await {
                crate::consensus::report_measurement(&shared, &key, from, bytes, took);
            }
        })
    };
    let compaction_task = shared.consensus().cloned().and_then(|c| {
        crate::compaction::spawn(
            config.ass.compaction.clone(),
            sync.clone(),
            c,
            client.clone(),
            id,
            stop_rx.clone(),
        )
    });

    let endpoints_file = data_dir.join(ENDPOINTS_FILE);
    let _ = std::fs::remove_file(&endpoints_file);
    let api = tokio::net::TcpListener::bind(config.api.rest.bind)
        .await
        .with_context(|| format!("binding the API on {}", config.api.rest.bind))?;
    let api_addr = api.local_addr()?;
    info!(addr = %api_addr, "API listening");
    let api_task = {
        let mut rx = stop_rx.clone();
        let app = crate::api::router(shared.clone());
        tokio::spawn(async move {
            axum::serve(api, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await
        })
    };
    let mut metrics_addr = None;
    let metrics_task = if config.monitoring.prometheus.enabled {
        let l = tokio::net::TcpListener::bind(config.monitoring.prometheus.bind)
            .await
            .with_context(|| format!("binding metrics on {}", config.monitoring.prometheus.bind))?;
        metrics_addr = Some(l.local_addr()?);
        info!(addr = %l.local_addr()?, "metrics listening");
        let mut rx = stop_rx.clone();
        let app = crate::api::metrics_router(shared.clone());
        Some(tokio::spawn(async move {
            axum::serve(l, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await
        }))
    } else {
        None
    };
    // The addresses actually bound (port 0 in the configuration picks a free one), for
    // supervisors such as the testnet: written once both listen.
    let endpoints = serde_json::json!({
        "api": api_addr.to_string(),
        "metrics": metrics_addr.map(|a| a.to_string()),
    });
    let tmp = endpoints_file.with_extension("tmp");
    std::fs::write(&tmp, endpoints.to_string())
        .and_then(|()| std::fs::rename(&tmp, &endpoints_file))
        .with_context(|| format!("writing {}", endpoints_file.display()))?;

    let mut d = Daemon {
        shared: shared.clone(),
        sync,
        connected: BTreeSet::new(),
        sync_peers: BTreeSet::new(),
        client,
        store,
        topics,
        key,
        config: config.clone(),
        seq: SeqGen::default(),
        announce_due: true,
        listen_addrs: Vec::new(),
    };
    let mut heartbeat = tokio::time::interval(config.network.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut announce = tokio::time::interval(config.network.announce_interval);
    announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            ev = events.recv() => match ev {
                Some(ev) => if let Some(m) = d.on_event(ev) { d.on_gossip(m).await },
                None => anyhow::bail!("the network event loop stopped unexpectedly"),
            },
            _ = heartbeat.tick() => {
                if d.announce_due {
                    d.announce().await?;
                }
                d.heartbeat(HealthStatus::Healthy).await?;
            }
            _ = announce.tick() => d.announce().await?,
        }
    }
    info!("shutting down");
    // Tell peers we are leaving; best effort.
    let _ = tokio::time::timeout(Duration::from_secs(1), d.heartbeat(HealthStatus::Draining)).await;
    let _ = stop_tx.send(true);
    let _ = api_task.await;
    let _ = tokio::time::timeout(Duration::from_secs(5), sync_task).await;
    if let Some(t) = pba_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    if let Some(t) = acp_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    if let Some(t) = compaction_task {
        t.abort();
    }
    measure_task.abort();
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    d.store.flush()?;
    drop(d);
    let _ = tokio::time::timeout(Duration::from_secs(2), net_task).await;
    info!("stopped");
    Ok(())
}
