//! `dwcp-cli`: the operator CLI (operations manual, Appendix A). It talks to a node's local
//! API (`--api`, default the local node) and prints tables or JSON (`--format json`).

use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand, ValueEnum};
use dwcp_protocol::api::{
    ApiError, ClusterHealth, ClusterStatus, ClusterVmRecord, NodeInfo, NodeMetrics, PeerStatus,
    VmConsole, VmCreateRequest, VmView,
};
use serde::de::DeserializeOwned;

#[path = "cli/acp.rs"]
mod acp_cmd;
#[path = "cli/amst.rs"]
mod amst_cmd;
#[path = "cli/statesync.rs"]
mod statesync_cmd;

#[path = "cli/placement.rs"]
mod placement_cmd;

#[path = "cli/pba.rs"]
mod pba_cmd;

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
    /// Output format (`--output` names files, as in the manual's `state-sync export --output`).
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    format: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Human-readable tables.
    Table,
    /// JSON, for scripts.
    Json,
    /// Node ids only, one per line (lists that support it; tables elsewhere).
    Id,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Cluster-wide views.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// VMs on the node behind --api.
    #[command(subcommand)]
    Vm(VmCmd),
    /// The replicated cluster document (ASS).
    #[command(subcommand, name = "state-sync")]
    StateSync(statesync_cmd::StateSyncCmd),
    /// Gossip and sync sessions.
    #[command(subcommand)]
    Gossip(statesync_cmd::GossipCmd),
    /// PBFT committee and decisions (ACP).
    #[command(subcommand)]
    Consensus(acp_cmd::ConsensusCmd),
    /// Reputation scores and quarantine (ACP).
    #[command(subcommand)]
    Reputation(acp_cmd::ReputationCmd),
    /// VM placement (ITP) on the node behind --api.
    #[command(subcommand)]
    Placement(placement_cmd::PlacementCmd),
    /// Bandwidth forecasts (PBA) of the node behind --api.
    #[command(subcommand)]
    Pba(pba_cmd::PbaCmd),
    /// Multi-stream bulk transfers (AMST) of the node behind --api.
    #[command(subcommand)]
    Amst(amst_cmd::AmstCmd),
    /// Network tests between nodes.
    #[command(subcommand)]
    Network(amst_cmd::NetworkCmd),
}

#[derive(Debug, Subcommand)]
enum VmCmd {
    /// Create and start a VM on the node placement chooses among the ready nodes (or the
    /// one given with --node); the answer says where and why.
    Create {
        /// Create it on this node (id, peer id or unique hex prefix): placement does not choose.
        #[arg(long)]
        node: Option<String>,
        /// A name for it.
        #[arg(long)]
        name: String,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        cpu: u32,
        /// Memory: MiB, or with a unit (512M, 2G).
        #[arg(long, default_value = "256M", value_parser = parse_mib)]
        memory: u64,
        /// Disk image: an absolute path (imported by content hash) or the SHA-256 of an image
        /// already in the node's store.
        #[arg(long)]
        image: Option<String>,
        /// Disk size (MiB or with a unit); default the image's size.
        #[arg(long, value_parser = parse_mib)]
        disk: Option<u64>,
        /// Direct kernel boot: kernel path.
        #[arg(long)]
        kernel: Option<String>,
        /// Direct kernel boot: initramfs path.
        #[arg(long)]
        initrd: Option<String>,
        /// Direct kernel boot: kernel command line.
        #[arg(long)]
        append: Option<String>,
    },
    /// VMs on this node; `--cluster`: every VM record of the cluster document (committed
    /// placements, wherever they run).
    List {
        /// List the cluster document's VM records instead.
        #[arg(long)]
        cluster: bool,
    },
    /// One VM; `--field memory_size` prints just that field.
    Inspect {
        /// VM id.
        #[arg(long)]
        vm: String,
        /// Print only this field of the JSON view.
        #[arg(long)]
        field: Option<String>,
    },
    /// Power a VM off (keeps its definition and disk).
    Stop {
        /// VM id.
        #[arg(long)]
        vm: String,
    },
    /// Start a stopped VM.
    Start {
        /// VM id.
        #[arg(long)]
        vm: String,
    },
    /// Pause a VM's vCPUs.
    Pause {
        /// VM id.
        #[arg(long)]
        vm: String,
    },
    /// Resume a paused VM.
    Resume {
        /// VM id.
        #[arg(long)]
        vm: String,
    },
    /// Stop a VM and remove everything of it.
    Delete {
        /// VM id.
        #[arg(long)]
        vm: String,
    },
    /// The tail of a VM's serial console.
    Console {
        /// VM id.
        #[arg(long)]
        vm: String,
        /// Bytes to show.
        #[arg(long, default_value_t = 4096)]
        bytes: usize,
    },
    /// Number of running VMs on a node.
    Count {
        /// Node id, peer id or unique hex prefix.
        #[arg(long)]
        node: String,
    },
}

fn parse_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, 'G' | 'g')) => (&t[..i], 1024),
        Some((i, 'M' | 'm')) => (&t[..i], 1),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .map(|v| v * mul)
        .map_err(|_| format!("`{s}` is not a size in MiB (e.g. 512, 512M or 2G)"))
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
    /// Replaces the client's 60 s timeout (long-running calls such as speed tests).
    timeout: Option<Duration>,
}

impl Api {
    fn new(base: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            // VM creation waits for QEMU to start and for a stop's grace period.
            .timeout(Duration::from_secs(60))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            http,
            timeout: None,
        })
    }

    /// The same API with a longer (or shorter) timeout per request.
    fn with_timeout(&self, t: Duration) -> Self {
        Self {
            base: self.base.clone(),
            http: self.http.clone(),
            timeout: Some(t),
        }
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// A raw body (e.g. an export), with the same error handling as JSON calls.
    async fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        self.raw(reqwest::Method::GET, path, None).await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        self.call(reqwest::Method::POST, path, body).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        let body = self.raw(method, path, body).await?;
        let body = if body.is_empty() {
            &b"null"[..]
        } else {
            &body[..]
        };
        serde_json::from_slice(body)
            .with_context(|| format!("unexpected answer from {}{path}", self.base))
    }

    /// Sends a request; the answer's body, or the node's error message as the error.
    async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<Vec<u8>> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = self.timeout {
            req = req.timeout(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
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
        Ok(body.to_vec())
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
    let json = cli.format == Output::Json;
    match cli.cmd {
        Cmd::Vm(cmd) => return run_vm(&api, json, cmd).await,
        Cmd::StateSync(cmd) => return statesync_cmd::run_state_sync(&api, json, cmd).await,
        Cmd::Gossip(cmd) => return statesync_cmd::run_gossip(&api, json, cmd).await,
        Cmd::Consensus(cmd) => return acp_cmd::run_consensus(&api, cli.format, cmd).await,
        Cmd::Reputation(cmd) => return acp_cmd::run_reputation(&api, cli.format, cmd).await,
        Cmd::Placement(cmd) => return placement_cmd::run_placement(&api, json, cmd).await,
        Cmd::Pba(cmd) => return pba_cmd::run_pba(&api, cli.format, cmd).await,
        Cmd::Amst(cmd) => return amst_cmd::run_amst(&api, cli.format, cmd).await,
        Cmd::Network(cmd) => return amst_cmd::run_network(&api, cli.format, cmd).await,
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

fn vm_table(vms: &[VmView]) {
    table(
        &["ID", "NAME", "STATE", "VCPU", "MEM_MIB", "ACCEL", "PID"],
        vms.iter()
            .map(|v| {
                vec![
                    v.id.clone(),
                    v.name.clone(),
                    v.state.clone(),
                    v.vcpus.to_string(),
                    v.memory_mib.to_string(),
                    v.accel.clone(),
                    v.pid.map(|p| p.to_string()).unwrap_or_default(),
                ]
            })
            .collect(),
    );
}

async fn run_vm(api: &Api, json: bool, cmd: VmCmd) -> anyhow::Result<()> {
    let act = |verb: &'static str, vm: String| async move {
        let v: VmView = api.post(&format!("/v1/vms/{vm}/{verb}"), None).await?;
        anyhow::Ok(v)
    };
    let view = match cmd {
        VmCmd::Create {
            node,
            name,
            cpu,
            memory,
            image,
            disk,
            kernel,
            initrd,
            append,
        } => {
            let req = VmCreateRequest {
                name,
                vcpus: cpu,
                memory_mib: memory,
                image,
                disk_mib: disk,
                kernel,
                initrd,
                cmdline: append,
            };
            let req = dwcp_protocol::api::PlacedVmCreateRequest { vm: req, node };
            let placed: dwcp_protocol::api::PlacedVm = api
                .post("/v1/placement/vms", Some(serde_json::to_value(&req)?))
                .await?;
            if json {
                return print_json(&placed);
            }
            vm_table(std::slice::from_ref(&placed.vm));
            placement_cmd::print_placement(&placed);
            return Ok(());
        }
        VmCmd::List { cluster: true } => {
            let rows: Vec<ClusterVmRecord> = api.get("/v1/state-sync/vms").await?;
            if json {
                return print_json(&rows);
            }
            table(
                &[
                    "ID", "HOST", "STATE", "VCPU", "MEM_MIB", "DECISION", "CERT_B",
                ],
                rows.iter()
                    .map(|r| {
                        vec![
                            r.id.clone(),
                            r.host.map(|h| h.short()).unwrap_or_default(),
                            r.state.clone(),
                            r.vcpus.to_string(),
                            r.memory_mib.to_string(),
                            r.decision_seq.to_string(),
                            r.certificate_bytes.to_string(),
                        ]
                    })
                    .collect(),
            );
            return Ok(());
        }
        VmCmd::List { cluster: false } => {
            let vms: Vec<VmView> = api.get("/v1/vms").await?;
            if json {
                return print_json(&vms);
            }
            vm_table(&vms);
            return Ok(());
        }
        VmCmd::Inspect { vm, field } => {
            let v: VmView = api.get(&format!("/v1/vms/{vm}")).await?;
            if let Some(f) = field {
                let j = serde_json::to_value(&v)?;
                let val = j
                    .get(&f)
                    .ok_or_else(|| anyhow!("a VM has no field `{f}`"))?;
                match val {
                    serde_json::Value::String(s) => println!("{s}"),
                    other => println!("{other}"),
                }
                return Ok(());
            }
            v
        }
        VmCmd::Stop { vm } => act("stop", vm).await?,
        VmCmd::Start { vm } => act("start", vm).await?,
        VmCmd::Pause { vm } => act("pause", vm).await?,
        VmCmd::Resume { vm } => act("resume", vm).await?,
        VmCmd::Delete { vm } => {
            let _: serde_json::Value = api
                .call(reqwest::Method::DELETE, &format!("/v1/vms/{vm}"), None)
                .await?;
            println!("deleted {vm}");
            return Ok(());
        }
        VmCmd::Console { vm, bytes } => {
            let c: VmConsole = api
                .get(&format!("/v1/vms/{vm}/console?bytes={bytes}"))
                .await?;
            print!("{}", c.text);
            return Ok(());
        }
        VmCmd::Count { node } => {
            let m: NodeMetrics = api.get(&format!("/v1/nodes/{node}/metrics")).await?;
            let n: f64 = m
                .metrics
                .get("vms_running")
                .copied()
                .or_else(|| {
                    m.metrics
                        .get("dwcp_vm_count_total{state=\"running\"}")
                        .copied()
                })
                .unwrap_or(0.0);
            if json {
                return print_json(&serde_json::json!({ "node": m.id, "vms_running": n }));
            }
            println!("{n}");
            return Ok(());
        }
    };
    if json {
        print_json(&view)
    } else {
        vm_table(&[view]);
        Ok(())
    }
}

/// `dwcp-cli ... | head` closes the pipe early; `println!` then panics. Like any Unix tool,
/// exit quietly instead (status 141, what a shell reports for SIGPIPE).
fn exit_quietly_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() {
    exit_quietly_on_broken_pipe();
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
