//! `dwcp-testnet bench statesync`: ASS state sync on a real loopback testnet.
//!
//! Starts `--nodes` real `dwcp-node` processes (each on its own loopback address), which write
//! their heartbeat into the cluster document every `--max-staleness`, and polls every node's
//! `GET /v1/state-sync/lag` about every 100 ms:
//!
//! 1. **Propagation.** For every (observer, author) pair, the poll in which the observer's row
//!    of the author shows a newer heartbeat time (`poll time - lag_ms`) marks when it got the
//!    change; the write time is the earliest estimate of that heartbeat time over all polls
//!    of all nodes (the author's own poll included). Reported: p50 / p99 / max of the delay,
//!    and in sync intervals (target: p99 <= 3). The delay is an upper bound: a poll round
//!    takes ~100 ms plus the HTTP round trips.
//! 2. **Partition** (`--partition 60s`): the halves are cut apart with iptables
//!    ([`dwcp_testnet::partition`]), then healed. Reported: time after the heal until every
//!    node's view of every author holds that author's newest heartbeat of heal time
//!    ("caught up"), and until all nodes report equal heads at one poll (target: 10 s).
//!
//! Steady-state traffic (`bytes_sent` counters over the propagation window) is reported too.
//! Needs the release binaries (`cargo build --release -p dwcp-node -p dwcp-bootstrap`) and,
//! for `--partition`, root and iptables.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use dwcp_protocol::api::SyncLagStatus;
use dwcp_testnet::{
    local::{self, Testnet, UpOptions},
    partition,
};
use serde::Serialize;

/// Two heartbeat-time estimates closer than this are the same heartbeat.
const SAME_WRITE_MS: i64 = 400;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Number of nodes.
    #[arg(long, default_value_t = 20)]
    nodes: usize,
    /// Sync interval of the nodes (`ass.gossip.interval`).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// How often each node writes its heartbeat into the document
    /// (`ass.consistency.max_staleness`).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    max_staleness: Duration,
    /// Propagation measuring window.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    measure: Duration,
    /// Cut the testnet in halves for this long, then heal and measure convergence.
    #[arg(long, value_parser = humantime::parse_duration)]
    partition: Option<Duration>,
    /// Poll period.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    poll: Duration,
    /// Testnet directory (default: a fresh one under the temp dir; removed unless --keep).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the testnet's data and logs.
    #[arg(long)]
    keep: bool,
    /// Where dwcp-node and dwcp-bootstrap are (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    nodes: usize,
    interval_ms: u64,
    max_staleness_ms: u64,
    poll_ms: u64,
    startup_s: f64,
    initial_sync_s: f64,
    /// Propagation delays (observer != author), ms.
    samples: usize,
    p50_ms: Option<i64>,
    p99_ms: Option<i64>,
    max_ms: Option<i64>,
    p99_intervals: Option<f64>,
    /// Sent sync bytes per node per second during the propagation window.
    bytes_sent_per_node_s: Option<f64>,
    partition_s: Option<f64>,
    /// Largest lag of a cross-half row just before the heal (shows the cut held), ms.
    cross_lag_at_heal_ms: Option<u64>,
    caught_up_after_heal_ms: Option<u64>,
    equal_heads_after_heal_ms: Option<u64>,
    changes_rejected: u64,
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One poll of one node: when the answer came, and the answer.
type Poll = Option<(i64, SyncLagStatus)>;

async fn poll_all(c: &reqwest::Client, t: &Testnet) -> Vec<Poll> {
    let mut set = tokio::task::JoinSet::new();
    for (i, n) in t.nodes.iter().enumerate() {
        let c = c.clone();
        let url = format!("{}/v1/state-sync/lag", n.api);
        set.spawn(async move {
            let r = async {
                let s: SyncLagStatus = c.get(&url).send().await.ok()?.json().await.ok()?;
                Some((wall_ms(), s))
            }
            .await;
            (i, r)
        });
    }
    let mut out: Vec<Poll> = (0..t.nodes.len()).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        if let Ok((i, p)) = r {
            out[i] = p;
        }
    }
    out
}

/// Heartbeat time estimates `(observer, author) -> poll time - lag`.
fn estimates(polls: &[Poll], idx: &BTreeMap<String, usize>) -> BTreeMap<(usize, usize), i64> {
    let mut m = BTreeMap::new();
    for (o, p) in polls.iter().enumerate() {
        let Some((at, s)) = p else { continue };
        for row in &s.rows {
            if let (Some(&a), Some(l)) = (idx.get(&row.node.to_string()), row.lag_ms) {
                m.insert((o, a), at - l as i64);
            }
        }
    }
    m
}

fn pct(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .copied()
}

fn sum_counter(polls: &[Poll], key: &str) -> u64 {
    polls
        .iter()
        .flatten()
        .map(|(_, s)| s.counters.get(key).copied().unwrap_or(0))
        .sum()
}

async fn measure(t: &Testnet, a: &Args, r: &mut Report, say: &dyn Fn(&str)) -> anyhow::Result<()> {
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()?;
    let n = t.nodes.len();
    let idx: BTreeMap<String, usize> = t
        .nodes
        .iter()
        .enumerate()
        .map(|(i, e)| (e.id.clone(), i))
        .collect();

    // Every node's view holds a heartbeat of every node.
    let start = Instant::now();
    loop {
        let polls = poll_all(&c, t).await;
        let full = polls.iter().all(|p| {
            p.as_ref()
                .is_some_and(|(_, s)| s.rows.iter().filter(|row| row.lag_ms.is_some()).count() >= n)
        });
        if full {
            break;
        }
        if start.elapsed() > Duration::from_secs(180) {
            bail!("after 180 s not every node holds a heartbeat of every node");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    r.initial_sync_s = start.elapsed().as_secs_f64();
    say(&format!(
        "every node holds every node's entry after {:.1} s; measuring propagation for {:?} ...",
        r.initial_sync_s, a.measure
    ));

    // 1. Propagation.
    let mut last: BTreeMap<(usize, usize), i64> = BTreeMap::new();
    // (observer, author, estimate, seen at)
    let mut seen: Vec<(usize, usize, i64, i64)> = Vec::new();
    // author -> earliest estimates of each of its heartbeats
    let mut writes: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
    let first = poll_all(&c, t).await;
    let (b0, t0) = (sum_counter(&first, "bytes_sent"), Instant::now());
    let mut latest = first;
    let until = Instant::now() + a.measure;
    while Instant::now() < until {
        let tick = Instant::now();
        let polls = poll_all(&c, t).await;
        let est = estimates(&polls, &idx);
        for (&(o, au), &e) in &est {
            let w = writes.entry(au).or_default();
            match w.iter_mut().find(|x| (**x - e).abs() < SAME_WRITE_MS) {
                Some(x) => *x = (*x).min(e),
                None => w.push(e),
            }
            match last.get(&(o, au)) {
                None => {
                    last.insert((o, au), e);
                }
                Some(&prev) if e > prev + SAME_WRITE_MS => {
                    last.insert((o, au), e);
                    if o != au
                        && let Some((at, _)) = &polls[o]
                    {
                        seen.push((o, au, e, *at));
                    }
                }
                Some(_) => {}
            }
        }
        if polls.iter().all(Option::is_some) {
            latest = polls;
        }
        tokio::time::sleep(a.poll.saturating_sub(tick.elapsed())).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    r.bytes_sent_per_node_s =
        Some((sum_counter(&latest, "bytes_sent").saturating_sub(b0)) as f64 / n as f64 / secs);
    let mut delays: Vec<i64> = seen
        .iter()
        .filter_map(|(_, au, e, at)| {
            let w = writes
                .get(au)?
                .iter()
                .find(|x| (**x - e).abs() < SAME_WRITE_MS)?;
            Some((at - w).max(0))
        })
        .collect();
    delays.sort_unstable();
    r.samples = delays.len();
    r.p50_ms = pct(&delays, 0.5);
    r.p99_ms = pct(&delays, 0.99);
    r.max_ms = delays.last().copied();
    r.p99_intervals = r
        .p99_ms
        .map(|p| p as f64 / a.interval.as_millis().max(1) as f64);
    say(&format!(
        "propagation: {} samples, p50 {:?} ms, p99 {:?} ms, max {:?} ms",
        r.samples, r.p50_ms, r.p99_ms, r.max_ms
    ));

    // 2. Partition and heal.
    if let Some(p) = a.partition {
        let groups = partition::halves(n);
        partition::install(t, &groups)?;
        say(&format!(
            "partitioned into halves for {p:?} (chain {}) ...",
            partition::chain_name(t)
        ));
        tokio::time::sleep(p).await;
        let polls = poll_all(&c, t).await;
        let half = |i: usize| usize::from(i >= n / 2);
        let mut cross = None;
        for (o, p) in polls.iter().enumerate() {
            let Some((_, s)) = p else { continue };
            for row in &s.rows {
                if let (Some(&au), Some(l)) = (idx.get(&row.node.to_string()), row.lag_ms)
                    && half(au) != half(o)
                {
                    cross = Some(cross.unwrap_or(0).max(l));
                }
            }
        }
        r.cross_lag_at_heal_ms = cross;
        // The newest heartbeat of each author anywhere at heal time.
        let mut target: BTreeMap<usize, i64> = BTreeMap::new();
        for ((_, au), e) in estimates(&polls, &idx) {
            let v = target.entry(au).or_insert(e);
            *v = (*v).max(e);
        }
        partition::heal(t)?;
        let healed = Instant::now();
        say("healed; waiting for convergence ...");
        while healed.elapsed() < Duration::from_secs(120)
            && (r.caught_up_after_heal_ms.is_none() || r.equal_heads_after_heal_ms.is_none())
        {
            let tick = Instant::now();
            let polls = poll_all(&c, t).await;
            let ms = healed.elapsed().as_millis() as u64;
            if r.caught_up_after_heal_ms.is_none() {
                let est = estimates(&polls, &idx);
                let ok = (0..n).all(|o| {
                    target.iter().all(|(&au, &want)| {
                        est.get(&(o, au)).is_some_and(|&e| e > want - SAME_WRITE_MS)
                    })
                });
                if ok {
                    r.caught_up_after_heal_ms = Some(ms);
                }
            }
            if r.equal_heads_after_heal_ms.is_none() && polls.iter().all(Option::is_some) {
                let mut heads = polls.iter().flatten().map(|(_, s)| {
                    let mut h = s.heads.clone();
                    h.sort();
                    h
                });
                let h0 = heads.next();
                if heads.all(|h| Some(&h) == h0.as_ref()) {
                    r.equal_heads_after_heal_ms = Some(ms);
                }
            }
            tokio::time::sleep(a.poll.saturating_sub(tick.elapsed())).await;
        }
        latest = poll_all(&c, t).await;
    }
    r.changes_rejected = sum_counter(&latest, "changes_rejected");
    Ok(())
}

pub(crate) fn run(a: Args) -> anyhow::Result<()> {
    if a.nodes < 2 {
        bail!("--nodes must be at least 2");
    }
    let tmp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!("dwcp-bench-statesync-{}", std::process::id()));
            tmp
        }
    };
    let mut opts = UpOptions::new(a.nodes, &dir)?;
    if let Some(b) = &a.bin_dir {
        opts.bin_dir = b.clone();
    }
    opts.timeout = Duration::from_secs(300);
    // Partitions need every packet to name its node (see dwcp_testnet::partition).
    opts.quic_only = a.partition.is_some();
    opts.node_args = vec![
        "--ass-interval".into(),
        humantime::format_duration(a.interval).to_string(),
        "--ass-max-staleness".into(),
        humantime::format_duration(a.max_staleness).to_string(),
    ];
    let json = a.json;
    let say = move |s: &str| {
        if !json {
            eprintln!("{s}");
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut r = Report {
        nodes: a.nodes,
        interval_ms: a.interval.as_millis() as u64,
        max_staleness_ms: a.max_staleness.as_millis() as u64,
        poll_ms: a.poll.as_millis() as u64,
        partition_s: a.partition.map(|p| p.as_secs_f64()),
        ..Report::default()
    };
    let result = rt.block_on(async {
        say(&format!(
            "starting {} nodes in {} ...",
            a.nodes,
            dir.display()
        ));
        let started = Instant::now();
        let t = match local::up(&opts).await {
            Ok(t) => t,
            Err(e) => {
                let _ = local::down(&dir).await;
                return Err(e).context("starting the testnet");
            }
        };
        r.startup_s = started.elapsed().as_secs_f64();
        let m = measure(&t, &a, &mut r, &say).await;
        // Heal first (also on failure), then stop.
        let h = partition::heal(&t);
        let d = local::down(&dir).await;
        m.and(h).and(d.map(|_| ()))
    });
    if !a.keep && a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let ms = |v: Option<i64>| v.map_or("-".into(), |v| format!("{v} ms"));
    let ums = |v: Option<u64>| v.map_or("not within 120 s".into(), |v| format!("{v} ms"));
    println!(
        "# bench statesync: {} real nodes on loopback, sync interval {} ms, a heartbeat change per node every {} ms, polled every {} ms\n",
        r.nodes, r.interval_ms, r.max_staleness_ms, r.poll_ms
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| startup (all ready) / every node holds every entry | {:.1} s / {:.1} s |",
        r.startup_s, r.initial_sync_s
    );
    println!(
        "| change visible on another node: p50 / p99 / max ({} samples) | {} / {} / {} |",
        r.samples,
        ms(r.p50_ms),
        ms(r.p99_ms),
        ms(r.max_ms)
    );
    if let Some(p) = r.p99_intervals {
        println!(
            "| p99 in sync intervals (target <= 3) | {p:.2} ({}) |",
            if p <= 3.0 { "met" } else { "NOT met" }
        );
    }
    if let Some(b) = r.bytes_sent_per_node_s {
        println!("| sync bytes sent per node per s | {b:.0} |");
    }
    if let Some(p) = r.partition_s {
        println!(
            "| partition in halves for | {p} s (largest cross-half lag at heal: {}) |",
            r.cross_lag_at_heal_ms
                .map_or("-".into(), |v| format!("{:.1} s", v as f64 / 1000.0))
        );
        println!(
            "| after heal: every node holds every newest heartbeat | {} |",
            ums(r.caught_up_after_heal_ms)
        );
        println!(
            "| after heal: equal heads on all nodes (target <= 10 s) | {} |",
            ums(r.equal_heads_after_heal_ms)
        );
    }
    println!(
        "| changes rejected (all honest: expect 0) | {} |",
        r.changes_rejected
    );
    Ok(())
}
