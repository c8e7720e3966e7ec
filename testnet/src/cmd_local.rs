//! `dwcp-testnet up | status | down`.

use std::{path::PathBuf, time::Duration};

use clap::Args;
use dwcp_testnet::local;

/// `up`: start a bootstrap peer and N nodes on 127.0.0.1.
#[derive(Debug, Args)]
pub(crate) struct UpArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Directory for data dirs, logs and testnet.json.
    #[arg(long, default_value = "./dwcp-testnet")]
    dir: PathBuf,
    /// Where dwcp-node and dwcp-bootstrap are (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Cluster id.
    #[arg(long, default_value = "dwcp-testnet")]
    cluster_id: String,
    /// Node heartbeat interval.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// Silence after which a peer is unreachable.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    unreachable_after: Duration,
    /// Nodes listen on QUIC only (needed for reliable `partition`s: see its help).
    #[arg(long)]
    quic_only: bool,
    /// How long to wait for every node to see every other as ready.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Make K committee members Byzantine with a strategy, e.g. `1:equivocate` (the last K
    /// members of the genesis committee): `equivocate` (conflicting votes) or
    /// `forge-snapshot` (lies to nodes asking for a state transfer). Needs dwcp-node built with its `byzantine`
    /// feature (`cargo build --workspace --bins --all-features`).
    #[arg(long, value_parser = local::parse_byzantine)]
    byzantine: Option<(usize, String)>,
    /// Recompute the committee every N decisions (N <= 100, or a multiple of 100), with no
    /// minimum uptime, instead of the node default of 1,000 decisions and 10 minutes.
    #[arg(long, value_parser = parse_epoch_length)]
    epoch_length: Option<u64>,
    /// Run every node and the bootstrap peer in its own network namespace, joined by the
    /// dwcp-wan link emulator with this profile: dc, internet, lossy, trace:<file>, or
    /// custom values such as rate=100mbit,rtt=50ms,loss=0.5% (root; needs dwcp-wan next to
    /// dwcp-node). API and metrics stay reachable from the host on 10.234.x.y.
    #[arg(long)]
    wan: Option<String>,
}

/// `join`.
#[derive(Debug, Args)]
pub(crate) struct JoinArgs {
    /// The testnet directory.
    #[arg(long, default_value = "./dwcp-testnet")]
    dir: PathBuf,
    /// Where dwcp-node is (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Node heartbeat interval.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// Silence after which a peer is unreachable.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    unreachable_after: Duration,
    /// How long to wait for the node to listen.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

pub(crate) fn join(a: JoinArgs) -> anyhow::Result<()> {
    let o = local::JoinOptions {
        dir: a.dir.clone(),
        bin_dir: match a.bin_dir {
            Some(b) => b,
            None => local::default_bin_dir()?,
        },
        heartbeat_interval: a.heartbeat_interval,
        unreachable_after: a.unreachable_after,
        timeout: a.timeout,
    };
    let (t, i) = runtime()?.block_on(local::join(&o))?;
    let n = &t.nodes[i];
    println!(
        "node {i:<3}  {}  api {}  metrics {}/metrics  pid {}  joined",
        &n.id[..8],
        n.api,
        n.metrics,
        n.pid
    );
    println!("try:   dwcp-cli --api {} consensus quorum-status", n.api);
    Ok(())
}

/// `status` and `down`.
#[derive(Debug, Args)]
pub(crate) struct DirArgs {
    /// The testnet directory.
    #[arg(long, default_value = "./dwcp-testnet")]
    dir: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn parse_epoch_length(s: &str) -> Result<u64, String> {
    let n: u64 = s.parse().map_err(|e| format!("{e}"))?;
    if n == 0 || (n > 100 && !n.is_multiple_of(100)) {
        return Err("an epoch length is 1 to 100 decisions, or a multiple of 100".into());
    }
    Ok(n)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub(crate) fn up(a: UpArgs) -> anyhow::Result<()> {
    let mut o = local::UpOptions::new(a.nodes, &a.dir)?;
    if let Some(b) = a.bin_dir {
        o.bin_dir = b;
    }
    o.cluster_id = a.cluster_id;
    o.heartbeat_interval = a.heartbeat_interval;
    o.unreachable_after = a.unreachable_after;
    o.timeout = a.timeout;
    o.quic_only = a.quic_only;
    o.byzantine = a.byzantine;
    o.epoch_length = a.epoch_length;
    o.wan = a.wan;
    let started = std::time::Instant::now();
    let t = runtime()?.block_on(local::up(&o))?;
    println!(
        "testnet up: {} nodes, every node lists all {} as ready after {:.1}s",
        t.nodes.len(),
        t.nodes.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(w) = &t.wan {
        println!(
            "wan        {} ({}); emulator pid {}, log {}",
            w.profile,
            w.summary,
            w.emulator_pid,
            w.log.display()
        );
    }
    println!(
        "bootstrap  {}  pid {}",
        t.bootstrap.addrs.first().map(String::as_str).unwrap_or("?"),
        t.bootstrap.pid
    );
    for (i, n) in t.nodes.iter().enumerate() {
        println!(
            "node {i:<3}  {}  api {}  metrics {}/metrics  pid {}{}",
            &n.id[..8],
            n.api,
            n.metrics,
            n.pid,
            n.netns
                .as_ref()
                .map(|ns| format!("  netns {ns} ({})", n.ip))
                .unwrap_or_default()
        );
    }
    println!("state: {}", a.dir.join(local::TESTNET_FILE).display());
    println!("try:   dwcp-cli --api {} node list", t.nodes[0].api);
    println!("stop:  dwcp-testnet down --dir {}", a.dir.display());
    Ok(())
}

pub(crate) fn status(a: DirArgs) -> anyhow::Result<()> {
    let (t, rows) = runtime()?.block_on(local::status(&a.dir))?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "testnet": t, "nodes": rows }))?
        );
        return Ok(());
    }
    println!(
        "cluster {}  bootstrap pid {} ({})",
        t.cluster_id,
        t.bootstrap.pid,
        if local::is_ours(t.bootstrap.pid) {
            "running"
        } else {
            "stopped"
        }
    );
    if let Some(w) = &t.wan {
        let cut = dwcp_testnet::wan::partitions(w);
        println!(
            "wan {} ({}); emulator pid {} ({}); cut links: {}",
            w.profile,
            w.summary,
            w.emulator_pid,
            if local::is_ours(w.emulator_pid) {
                "running"
            } else {
                "stopped"
            },
            match cut {
                None => "? (emulator does not answer)".to_owned(),
                Some(c) if c.is_empty() => "none".to_owned(),
                Some(c) => c
                    .iter()
                    .map(|(a, b)| format!("{}-{}", host_name(*a), host_name(*b)))
                    .collect::<Vec<_>>()
                    .join(" "),
            }
        );
    }
    println!(
        "{:<5} {:<10} {:<8} {:<24} {:>6} {:>6} {:>6}",
        "NODE", "ID", "PROCESS", "API", "KNOWN", "READY", "PEERS"
    );
    for r in rows {
        let (k, rd, p) = r
            .status
            .as_ref()
            .map(|s| {
                (
                    s.nodes_known.to_string(),
                    s.nodes_ready.to_string(),
                    s.peers_connected.to_string(),
                )
            })
            .unwrap_or_else(|| ("-".into(), "-".into(), "-".into()));
        println!(
            "{:<5} {:<10} {:<8} {:<24} {:>6} {:>6} {:>6}",
            r.index,
            &r.id[..8.min(r.id.len())],
            if r.running { "running" } else { "stopped" },
            r.api,
            k,
            rd,
            p
        );
    }
    Ok(())
}

/// An emulator host as `status` names it: `b` for the bootstrap peer, else the node index.
fn host_name(h: usize) -> String {
    match h {
        0 => "b".to_owned(),
        h => (h - 1).to_string(),
    }
}

pub(crate) fn down(a: DirArgs) -> anyhow::Result<()> {
    let wan = local::read(&a.dir).ok().and_then(|t| t.wan);
    let n = runtime()?.block_on(local::down(&a.dir))?;
    println!(
        "stopped {n} processes; data and logs stay in {}",
        a.dir.display()
    );
    if let Some(w) = wan {
        println!(
            "stopped the WAN emulator and removed {} namespaces",
            w.namespaces.len()
        );
    }
    Ok(())
}

/// `partition`: cut the testnet into groups.
#[derive(Debug, Args)]
pub(crate) struct PartitionArgs {
    /// The testnet directory.
    #[arg(long, default_value = "./dwcp-testnet")]
    dir: PathBuf,
    /// Groups of node indices separated by `/`, e.g. `0-9/10-19` or `0,2/1,3-4`. The
    /// bootstrap peer joins the first group.
    #[arg(long)]
    groups: String,
}

pub(crate) fn partition(a: PartitionArgs) -> anyhow::Result<()> {
    let t = local::read(&a.dir)?;
    let groups = dwcp_testnet::partition::parse_groups(&a.groups, t.nodes.len())?;
    dwcp_testnet::partition::install(&t, &groups)?;
    let how = match &t.wan {
        Some(_) => "links cut in the WAN emulator".to_owned(),
        None => format!("iptables chain {}", dwcp_testnet::partition::chain_name(&t)),
    };
    println!(
        "partitioned into {} groups ({how}); undo: dwcp-testnet heal --dir {}",
        groups.len(),
        a.dir.display()
    );
    Ok(())
}

pub(crate) fn heal(a: DirArgs) -> anyhow::Result<()> {
    let t = local::read(&a.dir)?;
    dwcp_testnet::partition::heal(&t)?;
    println!(
        "{}",
        if t.wan.is_some() {
            "every emulated link restored"
        } else {
            "partition rules removed"
        }
    );
    Ok(())
}
