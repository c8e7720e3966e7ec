//! `dwcp-cli`: the operator CLI (operations manual, Appendix A). It talks to a node's local
//! API (`--api`, default the local node) and prints tables or JSON (`--output json`).

use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand, ValueEnum};
use dwcp_protocol::api::{
    ApiError, ClusterHealth, ClusterStatus, NodeInfo, NodeMetrics, PeerStatus,
};
use serde::de::DeserializeOwned;

#[derive(Debug, Parser)]
#[command(
    name = "dwcp-cli",
    version,
    about = "Operate a DWCP cluster through a node's local API"
)]
struct Cli {
    /// The node API to talk to.
    #[arg(
        long,
        global = true,
        env = "DWCP_API",
        default_value = "http://127.0.0.1:8080"
    )]
    api: String,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Cluster-wide views.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Nodes.
    #[command(subcommand)]
    Node(NodeCmd),
}

#[derive(Debug, Subcommand)]
enum ClusterCmd {
    /// The cluster as this node sees it.
    Status,
    /// Component checks, with the figures behind each verdict.
    Health,
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// Every node this node knows, with its status.
    List,
    /// Headline metrics of one node.
    Metrics {
        /// Node id, libp2p peer id, or a unique hex prefix of the id.
        #[arg(long)]
        node: String,
    },
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(base: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            http,
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let resp = self.http.get(&url).send().await.map_err(|e| {
            if e.is_connect() || e.is_timeout() {
                anyhow!(
                    "cannot reach the node API at {}: is dwcp-node running?",
                    self.base
                )
            } else {
                anyhow!("request to {url} failed: {e}")
            }
        })?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .with_context(|| format!("reading the answer of {url}"))?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<ApiError>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(anyhow!("{msg}"));
        }
        serde_json::from_slice(&body).with_context(|| format!("unexpected answer from {url}"))
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn ago(ms: u64) -> String {
    if ms == u64::MAX {
        "never".into()
    } else if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        line(r);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let api = Api::new(&cli.api)?;
    let json = cli.output == Output::Json;
    match cli.cmd {
        Cmd::Cluster(ClusterCmd::Status) => {
            let s: ClusterStatus = api.get("/v1/cluster/status").await?;
            if json {
                return print_json(&s);
            }
            println!("Cluster:    {}", s.cluster_id);
            println!(
                "Node:       {} (v{}, up {}s)",
                s.node_id, s.version, s.uptime_s
            );
            println!(
                "Nodes:      {} known, {} ready, {} unreachable",
                s.nodes_known, s.nodes_ready, s.nodes_unreachable
            );
            println!(
                "Peers:      {} connected, {} bootstrap configured",
                s.peers_connected, s.bootstrap_peers
            );
            println!("Controllers: none (peer-to-peer: every node is equal)");
            for a in &s.listen_addrs {
                println!("Listening:  {a}");
            }
        }
        Cmd::Cluster(ClusterCmd::Health) => {
            let h: ClusterHealth = api.get("/v1/cluster/health").await?;
            if json {
                print_json(&h)?;
            } else {
                for c in &h.checks {
                    println!(
                        "{} {}: {}",
                        if c.ok { "✓" } else { "✗" },
                        c.component,
                        c.detail
                    );
                }
            }
            if !h.healthy {
                std::process::exit(2);
            }
        }
        Cmd::Node(NodeCmd::List) => {
            let nodes: Vec<NodeInfo> = api.get("/v1/nodes").await?;
            if json {
                return print_json(&nodes);
            }
            table(
                &[
                    "ID",
                    "STATUS",
                    "REGION",
                    "VERSION",
                    "VCPU",
                    "MEM_MIB",
                    "DONATED",
                    "LAST_SEEN",
                    "ADDRESS",
                ],
                nodes
                    .iter()
                    .map(|n| {
                        vec![
                            format!("{}{}", n.id.short(), if n.is_self { "*" } else { "" }),
                            match n.status {
                                PeerStatus::Ready => "ready".into(),
                                PeerStatus::Unreachable => "unreachable".into(),
                            },
                            n.region.clone(),
                            n.version.clone(),
                            n.resources.vcpus.to_string(),
                            n.resources.memory_mib.to_string(),
                            format!("{}c/{}M", n.donated.vcpus, n.donated.memory_mib),
                            ago(n.last_seen_ms_ago),
                            n.addresses.first().cloned().unwrap_or_default(),
                        ]
                    })
                    .collect(),
            );
        }
        Cmd::Node(NodeCmd::Metrics { node }) => {
            let m: NodeMetrics = api.get(&format!("/v1/nodes/{node}/metrics")).await?;
            if json {
                return print_json(&m);
            }
            println!("Node {}", m.id);
            table(
                &["METRIC", "VALUE"],
                m.metrics
                    .iter()
                    .map(|(k, v)| vec![k.clone(), format!("{v}")])
                    .collect(),
            );
        }
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
