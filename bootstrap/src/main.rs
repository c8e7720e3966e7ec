//! `dwcp-bootstrap`: a lean, always-on peer that helps nodes find the mesh.
//!
//! It runs the same libp2p stack as a node in the bootstrap role: Kademlia server (nodes
//! bootstrap their routing tables from it), identify, AutoNAT server (nodes learn whether they
//! are reachable), relay v2 server (nodes behind NAT get a relayed address), and gossipsub
//! membership on the cluster's topics so that early nodes find a mesh. It validates gossip
//! exactly as nodes do (it forwards nothing unsigned or malformed), holds no cluster state, and
//! hosts no VMs. Its identity is persistent, so its multiaddr can go into node configs.
//!
//! At start it prints its full multiaddrs (`.../p2p/<peer id>`) and writes them to
//! `<data_dir>/bootstrap.json` (`{"peer_id": .., "addrs": [..]}`) for scripts.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use dwcp_net::{Event, Role, Validation};
use dwcp_node::{
    gossip::{Classified, classify},
    identity,
};
use dwcp_protocol::version::Topics;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tracing::{info, warn};

#[derive(Debug, Parser)]
#[command(name = "dwcp-bootstrap", version, about = "DWCP bootstrap peer")]
struct Cli {
    /// Data directory (identity key, bootstrap.json).
    #[arg(long, default_value = "/var/lib/dwcp-bootstrap")]
    data_dir: PathBuf,
    /// Listen multiaddrs (repeatable).
    #[arg(long, default_values_t = ["/ip4/0.0.0.0/tcp/7000".to_string(), "/ip4/0.0.0.0/udp/7000/quic-v1".to_string()])]
    listen: Vec<String>,
    /// Cluster ids whose gossip topics it joins (repeatable).
    #[arg(long = "cluster-id", default_values_t = ["dwcp-local".to_string()])]
    cluster_ids: Vec<String>,
    /// Other bootstrap peers to keep connected to (repeatable, with /p2p/).
    #[arg(long)]
    peer: Vec<String>,
    /// Prometheus bind address.
    #[arg(long, default_value = "127.0.0.1:8094")]
    metrics_bind: SocketAddr,
    /// Maximum connections.
    #[arg(long, default_value_t = 1024)]
    max_connections: u32,
    /// Log filter.
    #[arg(long, default_value = "info")]
    log_level: String,
}

struct Metrics {
    registry: Registry,
    peers: IntGauge,
    routing: IntGauge,
    gossip: IntCounterVec,
}

impl Metrics {
    fn new() -> anyhow::Result<Self> {
        let registry = Registry::new();
        let peers = IntGauge::new("dwcp_bootstrap_peers_connected", "Peers connected")?;
        let routing = IntGauge::new(
            "dwcp_bootstrap_routing_table_size",
            "Kademlia routing table entries",
        )?;
        let gossip = IntCounterVec::new(
            Opts::new(
                "dwcp_bootstrap_gossip_messages_total",
                "Gossip messages by verdict",
            ),
            &["verdict", "reason"],
        )?;
        registry.register(Box::new(peers.clone()))?;
        registry.register(Box::new(routing.clone()))?;
        registry.register(Box::new(gossip.clone()))?;
        Ok(Self {
            registry,
            peers,
            routing,
            gossip,
        })
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cli.data_dir)
        .with_context(|| format!("creating {}", cli.data_dir.display()))?;
    let key = identity::load_or_create(&cli.data_dir.join(identity::IDENTITY_FILE))?;
    let peer_id = key.node_id().to_peer_id()?;
    let topics: Vec<(String, Topics)> = cli
        .cluster_ids
        .iter()
        .map(|c| (c.clone(), Topics::for_cluster(c)))
        .collect();

    let mut net = dwcp_net::NetConfig::new(key.to_libp2p(), Role::Bootstrap);
    net.listen = cli
        .listen
        .iter()
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    net.bootstrap = cli
        .peer
        .iter()
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    net.topics = topics
        .iter()
        .flat_map(|(_, t)| [t.announce.clone(), t.heartbeat.clone()])
        .collect();
    net.max_connections = cli.max_connections;
    net.agent_version = format!("dwcp-bootstrap/{}", env!("CARGO_PKG_VERSION"));
    let (client, mut events, event_loop) = dwcp_net::new(net)?;
    let net_task = tokio::spawn(event_loop.run());

    let metrics = Arc::new(Metrics::new()?);
    let l = tokio::net::TcpListener::bind(cli.metrics_bind)
        .await
        .with_context(|| format!("binding metrics on {}", cli.metrics_bind))?;
    let m2 = metrics.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = m2.clone();
            async move {
                prometheus::TextEncoder::new()
                    .encode_to_string(&m.registry.gather())
                    .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
            }
        }),
    );
    tokio::spawn(async move { axum::serve(l, app).await });
    info!(%peer_id, metrics = %cli.metrics_bind, "bootstrap peer starting");

    let mut addrs: Vec<String> = Vec::new();
    let mut stats = tokio::time::interval(Duration::from_secs(2));
    let shutdown = dwcp_node::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = stats.tick() => {
                if let Ok(s) = client.stats().await {
                    metrics.peers.set(s.connected_peers.len() as i64);
                    metrics.routing.set(s.routing_table_size as i64);
                }
            }
            ev = events.recv() => match ev {
                None => anyhow::bail!("the network event loop stopped unexpectedly"),
                Some(Event::ListeningOn(a)) => {
                    let full = format!("{a}/p2p/{peer_id}");
                    println!("{full}");
                    addrs.push(full);
                    let doc = serde_json::json!({ "peer_id": peer_id.to_string(), "addrs": addrs });
                    let path = cli.data_dir.join("bootstrap.json");
                    let tmp = cli.data_dir.join("bootstrap.json.tmp");
                    std::fs::write(&tmp, serde_json::to_vec_pretty(&doc)?)
                        .and_then(|()| std::fs::rename(&tmp, &path))
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                Some(Event::Gossip(m)) => {
                    let verdict = topics
                        .iter()
                        .map(|(c, t)| classify(&m, t, c))
                        .find(|c| !matches!(c, Classified::Ignored(_)))
                        .unwrap_or(Classified::Ignored("unknown_topic"));
                    let (v, label, reason) = match verdict {
                        Classified::Heartbeat(_) | Classified::Announcement(_) => (Validation::Accept, "accepted", ""),
                        Classified::Invalid(r) => {
                            warn!(from = %m.propagation_source, reason = r, "rejected gossip message");
                            (Validation::Reject, "rejected", r)
                        }
                        Classified::Ignored(r) => (Validation::Ignore, "ignored", r),
                    };
                    metrics.gossip.with_label_values(&[label, reason]).inc();
                    let _ = client.report_validation(&m, v).await;
                }
                Some(_) => {}
            },
        }
    }
    info!("shutting down");
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(2), net_task).await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(cli))
}
