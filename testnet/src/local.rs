//! Multi-process testnet on loopback.

use std::{
    fs,
    net::TcpListener,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use dwcp_protocol::api::{ClusterStatus, NodeInfo, PeerStatus};
use serde::{Deserialize, Serialize};

/// The file `up` writes and `status`/`down` read.
pub const TESTNET_FILE: &str = "testnet.json";

/// The bootstrap peer of a testnet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootstrapEntry {
    /// libp2p peer id.
    pub peer_id: String,
    /// Full multiaddrs (with `/p2p/`).
    pub addrs: Vec<String>,
    /// Prometheus URL.
    pub metrics: String,
    /// Process id.
    pub pid: u32,
    /// Data directory.
    pub data_dir: PathBuf,
    /// libp2p port (TCP and QUIC) on 127.0.0.1 (on its WAN address with `--wan`).
    #[serde(default)]
    pub p2p_port: u16,
    /// Its network namespace (`--wan` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

/// One node of a testnet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeEntry {
    /// Node id (hex).
    pub id: String,
    /// API URL, e.g. `http://127.0.0.1:18080`.
    pub api: String,
    /// Prometheus URL.
    pub metrics: String,
    /// Process id.
    pub pid: u32,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Config file.
    pub config: PathBuf,
    /// Log file.
    pub log: PathBuf,
    /// The node's own loopback address (127.0.1.x): it listens there, so its QUIC packets
    /// carry it as source address.
    #[serde(default)]
    pub ip: String,
    /// libp2p port (TCP and QUIC) on `ip`. With libp2p's port reuse, the node's outgoing
    /// connections use it as source port, so packets name their node by port (see
    /// [`crate::partition`]).
    #[serde(default)]
    pub p2p_port: u16,
    /// Its network namespace (`--wan` only; `ip` is then its WAN address 10.233.0.x).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

/// `testnet.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Testnet {
    /// Cluster id.
    pub cluster_id: String,
    /// The bootstrap peer.
    pub bootstrap: BootstrapEntry,
    /// The nodes.
    pub nodes: Vec<NodeEntry>,
    /// The emulated WAN (`up --wan`): namespaces, emulator process, profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wan: Option<crate::wan::WanEntry>,
}

/// Options of [`up`].
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Number of nodes.
    pub nodes: usize,
    /// Directory for data dirs, logs and `testnet.json`.
    pub dir: PathBuf,
    /// Where `dwcp-node` and `dwcp-bootstrap` are.
    pub bin_dir: PathBuf,
    /// Cluster id.
    pub cluster_id: String,
    /// Heartbeat interval of the nodes.
    pub heartbeat_interval: Duration,
    /// Silence after which peers are unreachable.
    pub unreachable_after: Duration,
    /// How long to wait for the mesh to form.
    pub timeout: Duration,
    /// Further `dwcp-node init` overrides for every node, e.g. `["--ass-interval", "1s"]`.
    pub node_args: Vec<String>,
    /// Nodes listen on QUIC only (and reach the bootstrap peer over QUIC). Every packet then
    /// leaves the node's own UDP socket, so address and port name the node at both ends,
    /// which [`crate::partition`] needs: libp2p's TCP dials may use an ephemeral port from
    /// 127.0.0.1, which names no node.
    pub quic_only: bool,
    /// `(K, strategy)`: the last K members of the genesis committee misbehave.
    pub byzantine: Option<(usize, String)>,
    /// Committee epochs of this many decisions (`acp.epochs.length`, with no minimum uptime
    /// and a checkpoint every `min(100, N)`), so the committee is recomputed within a demo.
    /// `None`: the node default (1,000 decisions, 10 minutes of uptime to serve).
    pub epoch_length: Option<u64>,
    /// Run every node and the bootstrap peer in its own network namespace, joined by the
    /// `dwcp-wan` emulator with this profile (`internet`, `dc`, `lossy`, `trace:<file>`,
    /// `rate=..,rtt=..,loss=..`). Needs root and the `dwcp-wan` binary in `bin_dir`. See
    /// [`crate::wan`].
    pub wan: Option<String>,
}

/// Parses `K:strategy` (e.g. `1:equivocate`).
pub fn parse_byzantine(s: &str) -> Result<(usize, String), String> {
    let (k, strat) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}`: expected K:strategy, e.g. 1:equivocate"))?;
    let k: usize = k
        .parse()
        .map_err(|_| format!("`{k}` is not a number of nodes"))?;
    // dwcp-node's `acp.byzantine` values (its feature `byzantine`).
    const KNOWN: [&str; 2] = ["equivocate", "forge-snapshot"];
    if !KNOWN.contains(&strat) {
        return Err(format!(
            "unknown strategy `{strat}` (known: {})",
            KNOWN.join(", ")
        ));
    }
    Ok((k, strat.to_owned()))
}

impl UpOptions {
    /// Defaults for `n` nodes in `dir`, binaries next to the running executable.
    pub fn new(nodes: usize, dir: impl Into<PathBuf>) -> anyhow::Result<Self> {
        Ok(Self {
            nodes,
            dir: dir.into(),
            bin_dir: default_bin_dir()?,
            cluster_id: "dwcp-testnet".into(),
            heartbeat_interval: Duration::from_secs(1),
            unreachable_after: Duration::from_secs(5),
            timeout: Duration::from_secs(120),
            node_args: Vec::new(),
            quic_only: false,
            byzantine: None,
            epoch_length: None,
            wan: None,
        })
    }
}

/// The directory of the running executable (or its parent when it is a cargo test binary in
/// `deps/`), where cargo puts the workspace's binaries.
pub fn default_bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

fn bin(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} not found; build the binaries first (cargo build --bins) or pass --bin-dir",
            p.display()
        );
    }
    Ok(p)
}

/// A free TCP port on 127.0.0.1 (released before use: a small race, fine on a test machine).
fn free_port() -> anyhow::Result<u16> {
    free_port_on("127.0.0.1")
}

/// A free port on `ip` for both TCP and UDP (released before use).
fn free_port_on(ip: &str) -> anyhow::Result<u16> {
    for _ in 0..20 {
        let l =
            TcpListener::bind((ip, 0)).with_context(|| format!("finding a free port on {ip}"))?;
        let port = l.local_addr()?.port();
        if std::net::UdpSocket::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both TCP and UDP on {ip}")
}

/// Node `i`'s own loopback address: 127.0.1.1, 127.0.1.2, ... (250 per /24, then 127.0.2.x).
/// The whole of 127.0.0.0/8 is routed to `lo` on Linux, so no setup is needed.
pub fn node_ip(i: usize) -> String {
    format!("127.0.{}.{}", 1 + i / 250, 1 + i % 250)
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> anyhow::Result<u32> {
    let f = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let f2 = f.try_clone()?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        // Own process group: a Ctrl-C in the terminal that ran `up` does not reach the nodes.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    Ok(child.id())
}

fn http() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .context("HTTP client")
}

/// What `up` has started so far, removed again when it fails half way.
#[derive(Default)]
struct Started {
    pids: Vec<u32>,
    wan: Option<crate::wan::WanEntry>,
}

impl Started {
    /// Stops the processes (SIGTERM, SIGKILL after 3 s), removes the WAN set-up and
    /// `testnet.json`.
    async fn abort(self, dir: &Path) {
        stop_pids(&self.pids, Duration::from_secs(3)).await;
        if let Some(w) = self.wan {
            let _ = tokio::task::spawn_blocking(move || crate::wan::teardown(&w)).await;
            crate::wan::remove_record(dir);
        }
        let _ = fs::remove_file(dir.join(TESTNET_FILE));
    }
}

/// Starts a bootstrap peer and `opts.nodes` nodes, waits for the mesh, writes `testnet.json`.
/// On failure it stops what it started (and removes the WAN namespaces) before returning the
/// error; data dirs and logs stay.
pub async fn up(opts: &UpOptions) -> anyhow::Result<Testnet> {
    if opts.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    if opts.dir.join(TESTNET_FILE).exists() || opts.dir.join(crate::wan::WAN_FILE).exists() {
        bail!(
            "{} already holds a testnet; run `dwcp-testnet down --dir {}` first",
            opts.dir.display(),
            opts.dir.display()
        );
    }
    fs::create_dir_all(&opts.dir).with_context(|| format!("creating {}", opts.dir.display()))?;
    let mut started = Started::default();
    match up_inner(opts, &mut started).await {
        Ok(t) => Ok(t),
        Err(e) => {
            started.abort(&opts.dir).await;
            Err(e)
        }
    }
}

async fn up_inner(opts: &UpOptions, started: &mut Started) -> anyhow::Result<Testnet> {
    let node_bin = bin(&opts.bin_dir, "dwcp-node")?;
    let boot_bin = bin(&opts.bin_dir, "dwcp-bootstrap")?;
    if let Some(profile) = &opts.wan {
        let wan_bin = bin(&opts.bin_dir, "dwcp-wan")?;
        let (dir, hosts, profile) = (opts.dir.clone(), opts.nodes + 1, profile.clone());
        let w = tokio::task::spawn_blocking(move || {
            crate::wan::create(&dir, hosts, &profile, &wan_bin)
        })
        .await
        .context("WAN set-up task")??;
        started.wan = Some(w);
    }
    let wan = started.wan.clone();
    let netns = |h: usize| wan.as_ref().and_then(|w| w.namespaces.get(h).cloned());

    // Bootstrap peer.
    let bdir = opts.dir.join("bootstrap");
    fs::create_dir_all(&bdir)?;
    let (bip, bport, bmetrics) = match &wan {
        Some(w) => (
            crate::wan::wan_ip(0),
            crate::wan::P2P_PORT,
            format!("{}:{}", w.mgmt_ip(0), crate::wan::BOOTSTRAP_METRICS_PORT),
        ),
        None => (
            "127.0.0.1".to_owned(),
            free_port()?,
            format!("127.0.0.1:{}", free_port()?),
        ),
    };
    let mut bcmd = match netns(0) {
        Some(ns) => crate::wan::command_in(&ns, &boot_bin),
        None => Command::new(&boot_bin),
    };
    bcmd.arg("--data-dir")
        .arg(&bdir)
        .args(["--listen", &format!("/ip4/{bip}/tcp/{bport}")])
        .args(["--listen", &format!("/ip4/{bip}/udp/{bport}/quic-v1")])
        .args(["--cluster-id", &opts.cluster_id])
        .args(["--metrics-bind", &bmetrics]);
    let bpid = spawn_logged(&mut bcmd, &opts.dir.join("bootstrap.log"))?;
    started.pids.push(bpid);
    let bfile = bdir.join("bootstrap.json");
    let t0 = Instant::now();
    let bdoc: serde_json::Value = loop {
        if let Ok(text) = fs::read_to_string(&bfile)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && v["addrs"].as_array().is_some_and(|a| a.len() >= 2)
        {
            break v;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            bail!(
                "the bootstrap peer did not start; see {}",
                opts.dir.join("bootstrap.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let baddrs: Vec<String> = bdoc["addrs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let bootstrap = BootstrapEntry {
        peer_id: bdoc["peer_id"].as_str().unwrap_or_default().to_owned(),
        addrs: baddrs.clone(),
        metrics: format!("http://{bmetrics}"),
        pid: bpid,
        data_dir: bdir,
        p2p_port: bport,
        netns: netns(0),
    };
    let want = if opts.quic_only { "/quic-v1" } else { "/tcp/" };
    let tcp_boot = baddrs
        .iter()
        .find(|a| a.contains(want))
        .cloned()
        .ok_or_else(|| anyhow!("the bootstrap peer reported no {want} address"))?;

    let mut nodes = Vec::new();
    let mut testnet = Testnet {
        cluster_id: opts.cluster_id.clone(),
        bootstrap,
        nodes: Vec::new(),
        wan: wan.clone(),
    };
    for i in 0..opts.nodes {
        // With --wan, node i is host i + 1: libp2p on its TUN address, API and metrics on its
        // management address. Each namespace has its own ports, so the p2p port is fixed.
        let (ip, p2p, mgmt) = match &wan {
            Some(w) => (
                crate::wan::wan_ip(i + 1),
                crate::wan::P2P_PORT,
                w.mgmt_ip(i + 1),
            ),
            None => {
                let ip = node_ip(i);
                let p2p = free_port_on(&ip)?;
                (ip, p2p, "127.0.0.1".to_owned())
            }
        };
        let mut n = init_node(
            &node_bin,
            &NodeInit {
                dir: &opts.dir,
                cluster_id: &opts.cluster_id,
                bootstrap: &tcp_boot,
                heartbeat_interval: opts.heartbeat_interval,
                unreachable_after: opts.unreachable_after,
                node_args: &opts.node_args,
                quic_only: opts.quic_only,
            },
            i,
            (ip, p2p, mgmt),
        )?;
        n.netns = netns(i + 1);
        nodes.push(n);
    }
    let committee = genesis_committee(&nodes);
    let byzantine: Vec<String> = match &opts.byzantine {
        Some((k, _)) => {
            let f = (committee.len() - 1) / 3;
            if *k > f {
                bail!(
                    "{k} Byzantine members in a committee of {} (f = {f}): PBFT tolerates at most f",
                    committee.len()
                );
            }
            committee.iter().rev().take(*k).cloned().collect()
        }
        None => Vec::new(),
    };
    for n in &mut nodes {
        let strategy = opts
            .byzantine
            .as_ref()
            .filter(|_| byzantine.contains(&n.id))
            .map(|(_, s)| s.as_str());
        write_acp(&n.config, &committee, strategy, opts.epoch_length)?;
        n.pid = start_node(&node_bin, n, &n.log)?;
        started.pids.push(n.pid);
    }
    for n in &mut nodes {
        let (api, metrics) = wait_endpoints(n, opts.timeout).await?;
        n.api = format!("http://{api}");
        n.metrics = format!("http://{metrics}");
        // Restarts reuse the ports the node got.
        pin_endpoints(&n.config, &api, &metrics)?;
    }
    testnet.nodes = nodes;
    write(&opts.dir, &testnet)?;
    wait_ready(&testnet, opts.nodes, opts.timeout).await?;
    Ok(testnet)
}

/// What [`init_node`] needs besides the node's index and addresses.
struct NodeInit<'a> {
    dir: &'a Path,
    cluster_id: &'a str,
    bootstrap: &'a str,
    heartbeat_interval: Duration,
    unreachable_after: Duration,
    node_args: &'a [String],
    quic_only: bool,
}

/// Runs `dwcp-node init` for node `i` (data in `dir/node-iii`), listening on `(ip, p2p)`
/// with API and metrics on `mgmt` (port 0: the node reports what it bound). Not started.
fn init_node(
    node_bin: &Path,
    o: &NodeInit<'_>,
    i: usize,
    (ip, p2p, mgmt): (String, u16, String),
) -> anyhow::Result<NodeEntry> {
    let ndir = o.dir.join(format!("node-{i:03}"));
    let config = ndir.join("node.yaml");
    let mut listen = vec![format!("/ip4/{ip}/udp/{p2p}/quic-v1")];
    if !o.quic_only {
        listen.insert(0, format!("/ip4/{ip}/tcp/{p2p}"));
    }
    // API and metrics bind port 0; the node reports what it got (endpoints.json), so no
    // port is chosen here and lost to another process before the node binds it.
    let out = Command::new(node_bin)
        .arg("init")
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(&ndir)
        .args(["--cluster-id", o.cluster_id])
        .args(["--region", &format!("local-{}", i % 3)])
        .args(["--bootstrap", o.bootstrap])
        .args(listen.iter().flat_map(|l| ["--listen", l.as_str()]))
        .args(["--api-bind", &format!("{mgmt}:0")])
        .args(["--metrics-bind", &format!("{mgmt}:0")])
        // No KVM probe per node: the probe boots a tiny guest, ten at once load the host.
        .args(["--hypervisor-accel", "tcg"])
        .args([
            "--heartbeat-interval",
            &humantime::format_duration(o.heartbeat_interval).to_string(),
        ])
        .args([
            "--unreachable-after",
            &humantime::format_duration(o.unreachable_after).to_string(),
        ])
        .args(o.node_args)
        .output()
        .context("running dwcp-node init")?;
    if !out.status.success() {
        bail!(
            "dwcp-node init failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let id = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("node id:").map(|s| s.trim().to_owned()))
        .ok_or_else(|| anyhow!("dwcp-node init printed no node id"))?;
    Ok(NodeEntry {
        id,
        api: String::new(),
        metrics: String::new(),
        // Started once its configuration is complete.
        pid: 0,
        data_dir: ndir,
        config,
        log: o.dir.join(format!("node-{i:03}.log")),
        ip,
        p2p_port: p2p,
        netns: None,
    })
}

/// Options of [`join`].
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// The testnet directory.
    pub dir: PathBuf,
    /// Where `dwcp-node` is.
    pub bin_dir: PathBuf,
    /// Heartbeat interval of the new node.
    pub heartbeat_interval: Duration,
    /// Silence after which it calls peers unreachable.
    pub unreachable_after: Duration,
    /// How long to wait for it to listen.
    pub timeout: Duration,
}

/// Adds one node to a running loopback testnet, as a volunteer who installs later: same
/// cluster and bootstrap peer, the consensus settings of node 0 (genesis committee, epochs;
/// never its Byzantine mode). It starts from nothing: with epochs it catches up from the
/// committee's certified snapshots (state transfer) or by replaying decisions.
pub async fn join(opts: &JoinOptions) -> anyhow::Result<(Testnet, usize)> {
    let mut t = read(&opts.dir)?;
    if t.wan.is_some() {
        bail!("join works on loopback testnets (not --wan) for now");
    }
    let first = t
        .nodes
        .first()
        .ok_or_else(|| anyhow!("the testnet has no nodes"))?;
    // Like the others: QUIC only if node 0 listens on QUIC only (`up --quic-only`).
    let quic_only = !listens_tcp(&first.config)?;
    let want = if quic_only { "/quic-v1" } else { "/tcp/" };
    let boot = t
        .bootstrap
        .addrs
        .iter()
        .find(|a| a.contains(want))
        .cloned()
        .ok_or_else(|| anyhow!("the bootstrap peer has no {want} address"))?;
    let acp = read_acp(&first.config)?;
    let node_bin = bin(&opts.bin_dir, "dwcp-node")?;
    let i = t.nodes.len();
    let ip = node_ip(i);
    let p2p = free_port_on(&ip)?;
    let mut n = init_node(
        &node_bin,
        &NodeInit {
            dir: &opts.dir,
            cluster_id: &t.cluster_id,
            bootstrap: &boot,
            heartbeat_interval: opts.heartbeat_interval,
            unreachable_after: opts.unreachable_after,
            node_args: &[],
            quic_only,
        },
        i,
        (ip, p2p, "127.0.0.1".to_owned()),
    )?;
    set_acp(&n.config, acp)?;
    n.pid = start_node(&node_bin, &n, &n.log)?;
    let endpoints = wait_endpoints(&n, opts.timeout).await;
    let (api, metrics) = match endpoints {
        Ok(e) => e,
        Err(e) => {
            signal(n.pid, nix::sys::signal::Signal::SIGKILL);
            return Err(e);
        }
    };
    n.api = format!("http://{api}");
    n.metrics = format!("http://{metrics}");
    pin_endpoints(&n.config, &api, &metrics)?;
    t.nodes.push(n);
    write(&opts.dir, &t)?;
    Ok((t, i))
}

/// Whether a node's configuration listens on TCP.
fn listens_tcp(config: &Path) -> anyhow::Result<bool> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    Ok(text.contains("/tcp/"))
}

/// A node's `acp` section without its Byzantine mode.
fn read_acp(config: &Path) -> anyhow::Result<serde_yaml_ng::Value> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let v: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
    let mut acp = v
        .get("acp")
        .cloned()
        .ok_or_else(|| anyhow!("{} has no `acp` section", config.display()))?;
    if let Some(m) = acp.as_mapping_mut() {
        m.remove("byzantine");
    }
    Ok(acp)
}

/// Replaces a node configuration's `acp` section.
fn set_acp(config: &Path, acp: serde_yaml_ng::Value) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let mut v: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
    v["acp"] = acp;
    std::fs::write(config, serde_yaml_ng::to_string(&v)?)
        .with_context(|| format!("writing {}", config.display()))
}

/// The testnet's genesis consensus committee: the first 3f+1 nodes, for the largest f the
/// testnet allows (at most 10, n = 31).
pub fn genesis_committee(nodes: &[NodeEntry]) -> Vec<String> {
    let f = (nodes.len().saturating_sub(1) / 3).min(10);
    nodes.iter().take(3 * f + 1).map(|n| n.id.clone()).collect()
}

/// Sets `acp.committee` (and `acp.byzantine` for a misbehaving node) in a node's
/// configuration file.
fn write_acp(
    config: &Path,
    committee: &[String],
    byzantine: Option<&str>,
    epoch_length: Option<u64>,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let mut v: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
    let root = v
        .as_mapping_mut()
        .ok_or_else(|| anyhow!("{} is not a YAML mapping", config.display()))?;
    let acp = root
        .entry("acp".into())
        .or_insert_with(|| serde_yaml_ng::Value::Mapping(Default::default()));
    let acp = acp
        .as_mapping_mut()
        .ok_or_else(|| anyhow!("{}: `acp` is not a mapping", config.display()))?;
    acp.insert(
        "committee".into(),
        serde_yaml_ng::Value::Sequence(committee.iter().map(|s| s.as_str().into()).collect()),
    );
    if let Some(b) = byzantine {
        acp.insert("byzantine".into(), b.into());
    }
    if let Some(len) = epoch_length {
        let mut epochs = serde_yaml_ng::Mapping::new();
        epochs.insert("length".into(), len.into());
        epochs.insert("min_uptime".into(), "0s".into());
        acp.insert("epochs".into(), serde_yaml_ng::Value::Mapping(epochs));
        let mut pbft = serde_yaml_ng::Mapping::new();
        pbft.insert("checkpoint_interval".into(), len.min(100).into());
        acp.insert("pbft".into(), serde_yaml_ng::Value::Mapping(pbft));
    }
    std::fs::write(config, serde_yaml_ng::to_string(&v)?)
        .with_context(|| format!("writing {}", config.display()))
}

/// Waits for a started node to write the API and metrics addresses it bound.
async fn wait_endpoints(n: &NodeEntry, timeout: Duration) -> anyhow::Result<(String, String)> {
    let file = n.data_dir.join("endpoints.json");
    let start = std::time::Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", file.display()))?;
            let api = v["api"].as_str().map(str::to_owned);
            let metrics = v["metrics"].as_str().map(str::to_owned);
            if let (Some(a), Some(m)) = (api, metrics) {
                return Ok((a, m));
            }
            bail!("{} names no API or metrics address", file.display());
        }
        if !is_alive(n.pid) {
            bail!(
                "node {} exited before listening; see {}",
                n.id,
                n.log.display()
            );
        }
        if start.elapsed() > timeout {
            bail!(
                "node {} did not report its endpoints within {timeout:?}; see {}",
                n.id,
                n.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes the bound API and metrics addresses into a node's configuration file.
fn pin_endpoints(config: &Path, api: &str, metrics: &str) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let mut v: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
    v["api"]["rest"]["bind"] = api.into();
    v["monitoring"]["prometheus"]["bind"] = metrics.into();
    std::fs::write(config, serde_yaml_ng::to_string(&v)?)
        .with_context(|| format!("writing {}", config.display()))
}

/// Starts `dwcp-node run` for `n` (inside its namespace with `--wan`), logging to `log`.
fn start_node(node_bin: &Path, n: &NodeEntry, log: &Path) -> anyhow::Result<u32> {
    let mut cmd = match &n.netns {
        Some(ns) => crate::wan::command_in(ns, node_bin),
        None => Command::new(node_bin),
    };
    spawn_logged(cmd.arg("run").arg("--config").arg(&n.config), log)
}

/// Writes `testnet.json` atomically.
pub fn write(dir: &Path, t: &Testnet) -> anyhow::Result<()> {
    let tmp = dir.join("testnet.json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(t)?)?;
    fs::rename(&tmp, dir.join(TESTNET_FILE))?;
    Ok(())
}

/// Reads `testnet.json`.
pub fn read(dir: &Path) -> anyhow::Result<Testnet> {
    let p = dir.join(TESTNET_FILE);
    let text = fs::read_to_string(&p)
        .with_context(|| format!("no testnet in {} (missing {})", dir.display(), p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

/// The node list a node's API returns, or `None` if it does not answer.
pub async fn node_list(api: &str) -> Option<Vec<NodeInfo>> {
    let c = http().ok()?;
    let r = c.get(format!("{api}/v1/nodes")).send().await.ok()?;
    r.json().await.ok()
}

/// Waits until every node in `t` lists `expect` nodes as ready.
pub async fn wait_ready(t: &Testnet, expect: usize, timeout: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let mut worst = usize::MAX;
        let mut slowest = 0;
        for (i, n) in t.nodes.iter().enumerate() {
            let ready = node_list(&n.api)
                .await
                .map(|l| l.iter().filter(|r| r.status == PeerStatus::Ready).count())
                .unwrap_or(0);
            if ready < worst {
                worst = ready;
                slowest = i;
            }
        }
        if worst >= expect {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!(
                "after {timeout:?} the slowest node ({slowest}, process {}, log {}) lists {worst} of {expect} nodes as ready",
                if is_ours(t.nodes[slowest].pid) {
                    "running"
                } else {
                    "gone"
                },
                t.nodes[slowest].log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether a process this program just spawned is still running (not a zombie). Unlike
/// [`is_ours`] it does not read the command line, which can read empty while the child is
/// still in `exec`: taking that for an exit tore a starting WAN emulator down.
pub fn is_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// Whether `pid` is alive and is one of ours (its command line names a DWCP binary), so a
/// recycled pid is never signalled.
pub fn is_ours(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("dwcp-"))
        .unwrap_or(false)
        && is_alive(pid)
}

pub(crate) fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig);
    }
}

/// Kills node `i` with SIGKILL (for failure tests).
pub fn kill_node(t: &Testnet, i: usize) -> anyhow::Result<()> {
    let n = t.nodes.get(i).ok_or_else(|| anyhow!("no node {i}"))?;
    if is_ours(n.pid) {
        signal(n.pid, nix::sys::signal::Signal::SIGKILL);
    }
    Ok(())
}

/// Restarts node `i` with its data dir (same identity); updates and rewrites `testnet.json`.
pub fn restart_node(dir: &Path, t: &mut Testnet, i: usize, bin_dir: &Path) -> anyhow::Result<()> {
    let node_bin = bin(bin_dir, "dwcp-node")?;
    let n = t.nodes.get_mut(i).ok_or_else(|| anyhow!("no node {i}"))?;
    n.pid = start_node(&node_bin, n, &n.log.with_extension("restarted.log"))?;
    write(dir, t)
}

/// Sends SIGTERM to those of `pids` that are ours, waits up to `grace` for them to exit,
/// then SIGKILLs the rest. Returns how many were running.
async fn stop_pids(pids: &[u32], grace: Duration) -> usize {
    let mut stopped = 0;
    for &p in pids {
        if is_ours(p) {
            signal(p, nix::sys::signal::Signal::SIGTERM);
            stopped += 1;
        }
    }
    let start = Instant::now();
    while pids.iter().any(|&p| is_ours(p)) && start.elapsed() < grace {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for &p in pids {
        if is_ours(p) {
            signal(p, nix::sys::signal::Signal::SIGKILL);
        }
    }
    stopped
}

/// Stops every process of the testnet: SIGTERM, then SIGKILL after 5 s. Removes the
/// partition rules (if any) and `testnet.json`; data dirs and logs stay for inspection. With
/// `--wan` it then stops the emulator and deletes the namespaces and management links.
/// Returns how many node and bootstrap processes were running.
pub async fn down(dir: &Path) -> anyhow::Result<usize> {
    let t = match read(dir) {
        Ok(t) => t,
        Err(e) => {
            // An `up --wan` killed before it wrote testnet.json leaves only wan.json.
            if let Some(w) = crate::wan::read_record(dir) {
                tokio::task::spawn_blocking(move || crate::wan::teardown(&w))
                    .await
                    .context("WAN teardown task")?;
                crate::wan::remove_record(dir);
                return Ok(0);
            }
            return Err(e);
        }
    };
    if t.wan.is_none()
        && let Err(e) = crate::partition::heal(&t)
    {
        eprintln!("warning: removing the partition rules failed: {e:#}");
    }
    let pids: Vec<u32> = t
        .nodes
        .iter()
        .map(|n| n.pid)
        .chain(std::iter::once(t.bootstrap.pid))
        .collect();
    let stopped = stop_pids(&pids, Duration::from_secs(5)).await;
    if let Some(w) = t.wan.clone() {
        tokio::task::spawn_blocking(move || crate::wan::teardown(&w))
            .await
            .context("WAN teardown task")?;
        crate::wan::remove_record(dir);
    }
    fs::remove_file(dir.join(TESTNET_FILE))?;
    Ok(stopped)
}

/// One row of `status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusRow {
    /// Node index.
    pub index: usize,
    /// Node id.
    pub id: String,
    /// Process alive.
    pub running: bool,
    /// API URL.
    pub api: String,
    /// What the node reports, if it answers.
    pub status: Option<ClusterStatus>,
}

/// Asks every node of the testnet for its status.
pub async fn status(dir: &Path) -> anyhow::Result<(Testnet, Vec<StatusRow>)> {
    let t = read(dir)?;
    let c = http()?;
    let mut rows = Vec::new();
    for (i, n) in t.nodes.iter().enumerate() {
        let st = match c.get(format!("{}/v1/cluster/status", n.api)).send().await {
            Ok(r) => r.json::<ClusterStatus>().await.ok(),
            Err(_) => None,
        };
        rows.push(StatusRow {
            index: i,
            id: n.id.clone(),
            running: is_ours(n.pid),
            api: n.api.clone(),
            status: st,
        });
    }
    Ok((t, rows))
}

#[cfg(test)]
mod byzantine_option_tests {
    use super::parse_byzantine;

    #[test]
    fn byzantine_strategies_parse_and_unknown_ones_are_named() {
        assert_eq!(
            parse_byzantine("2:equivocate"),
            Ok((2, "equivocate".into()))
        );
        assert_eq!(
            parse_byzantine("1:forge-snapshot"),
            Ok((1, "forge-snapshot".into()))
        );
        let err = parse_byzantine("1:lie").unwrap_err();
        assert!(err.contains("equivocate, forge-snapshot"), "{err}");
        assert!(parse_byzantine("x:equivocate").is_err());
        assert!(parse_byzantine("equivocate").is_err());
    }
}
