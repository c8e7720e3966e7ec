//! `dwcp-testnet sim statesync`: the ASS state-sync engine (`dwcp-statesync`) of many nodes on
//! a virtual clock, driven by `dwcp_statesync::harness::SimCluster` (random connection graph,
//! per-frame latency, loss, partitions; `FakeCertificateVerifier` and `fake_node_key` stand in
//! for consensus and node keys).
//!
//! Phases, all in virtual time:
//! 1. warm-up (sessions settle), then node 0 writes one change; reported: time until each node
//!    holds it (p50 / p99 / all) - target: 1,000 nodes within 5 s at 1 s interval, fanout 6;
//! 2. steady state: every node writes a heartbeat change every `--write-every` (spread over
//!    the period); reported: sync bytes and frames sent per node per second;
//! 3. with `--partition`: the cluster splits in halves for that long, each half writes, then
//!    heals; reported: time until every node has equal heads.

use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use dwcp_protocol::{
    DonatedShare, Health, HealthStatus, Heartbeat, NodeAnnouncement, Resources, Timestamp,
};
use dwcp_statesync::{
    Config,
    fake::FakeCommittee,
    harness::{SimCluster, SimConfig},
};
use serde::Serialize;

/// Virtual start time (ms since the epoch).
const T0: u64 = 1_800_000_000_000;

/// Arguments of `sim statesync`.
#[derive(Debug, Args)]
pub(crate) struct StatesyncArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Peers contacted per anti-entropy round.
    #[arg(long, default_value_t = 6)]
    fanout: usize,
    /// Anti-entropy interval.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: std::time::Duration,
    /// Probability that a frame is lost (0..1).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Seed (graph, latency, loss, every engine's RNG).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Connections each node opens to random others.
    #[arg(long, default_value_t = 20)]
    degree: usize,
    /// Per-frame latency range in ms, `lo-hi`.
    #[arg(long, default_value = "10-60")]
    latency_ms: String,
    /// Deliver gossip nudges (idealised gossipsub: every node of the sender's side gets them).
    #[arg(long)]
    nudges: bool,
    /// Steady-state window (virtual); 0 skips the steady-state phase.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    steady: std::time::Duration,
    /// In steady state each node writes a heartbeat change this often (0: idle, probes only).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    write_every: std::time::Duration,
    /// Split the cluster in halves for this long, then heal and measure convergence.
    #[arg(long, value_parser = humantime::parse_duration)]
    partition: Option<std::time::Duration>,
    /// Give up waiting for convergence after this much virtual time.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    limit: std::time::Duration,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// What the run measured.
#[derive(Debug, Serialize)]
struct Report {
    nodes: usize,
    degree: usize,
    fanout: usize,
    interval_ms: u64,
    loss: f64,
    seed: u64,
    nudges: bool,
    /// Virtual ms after the write until half / 99% / all nodes held it (None: not within limit).
    change_p50_ms: Option<u64>,
    change_p99_ms: Option<u64>,
    change_all_ms: Option<u64>,
    /// Nodes that never got the change within the limit.
    change_missing: usize,
    /// Steady state: sync bytes / frames sent per node per virtual second.
    steady_window_s: f64,
    steady_write_every_s: f64,
    steady_bytes_per_node_s: Option<f64>,
    steady_frames_per_node_s: Option<f64>,
    /// Partition length and the virtual ms after the heal until every node had equal heads.
    partition_s: Option<f64>,
    heal_converged_ms: Option<u64>,
    /// Whether heads were equal on all nodes when the run ended.
    converged_at_end: bool,
    /// Reports of misbehaving peers (must be 0: every node is honest).
    peer_reports: usize,
    wall_s: f64,
}

fn announcement(i: usize, at: u64) -> NodeAnnouncement {
    NodeAnnouncement {
        cluster_id: "sim".into(),
        seq: 1,
        issued_at: Timestamp(at),
        region: format!("region-{}", i % 12),
        version: "3.0.0".into(),
        resources: Resources {
            vcpus: 16,
            memory_mib: 65536,
            disk_gib: 1000,
            gpus: vec![],
        },
        donated: DonatedShare {
            vcpus: 8,
            memory_mib: 32768,
            disk_gib: 500,
            uplink_mbps: 200,
        },
        listen_addrs: vec![],
    }
}

fn heartbeat(seq: u64, at: u64) -> Heartbeat {
    Heartbeat {
        cluster_id: "sim".into(),
        seq,
        issued_at: Timestamp(at),
        uptime_s: seq * 10,
        health: Health {
            status: HealthStatus::Healthy,
            cpu_load_permille: 100 + (seq % 700) as u32,
            memory_used_mib: 1000 + seq % 5000,
            vms_running: (seq % 10) as u32,
            peers_connected: 20,
            allocated: None,
        },
    }
}

fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).copied().filter(|v| *v != u64::MAX)
}

fn parse_latency(s: &str) -> anyhow::Result<(u64, u64)> {
    let (a, b) = s
        .split_once('-')
        .context("--latency-ms must be `lo-hi`, e.g. 10-60")?;
    let (lo, hi) = (a.trim().parse()?, b.trim().parse()?);
    if lo > hi || hi == 0 {
        bail!("--latency-ms: need 0 <= lo <= hi, hi > 0");
    }
    Ok((lo, hi))
}

/// Runs the simulation and prints the report.
pub(crate) fn run(a: StatesyncArgs) -> anyhow::Result<()> {
    if a.nodes < 2 {
        bail!("--nodes must be at least 2");
    }
    if !(0.0..1.0).contains(&a.loss) {
        bail!("--loss must be in [0, 1)");
    }
    let interval_ms = a.interval.as_millis() as u64;
    let engine = Config::default()
        .with_fanout(a.fanout)
        .with_interval_ms(interval_ms);
    let engine = Config {
        response_timeout_ms: engine.response_timeout_ms.max(3 * interval_ms),
        ..engine
    }
    .validate()?;
    let cfg = SimConfig {
        nodes: a.nodes,
        degree: a.degree,
        seed: a.seed,
        loss: a.loss,
        latency_ms: parse_latency(&a.latency_ms)?,
        engine,
        nudges: a.nudges,
        cluster: "sim".into(),
    };
    let wall = Instant::now();
    let committee = FakeCommittee::new(1);
    let verifier = committee.verifier();
    if !a.json {
        eprintln!(
            "building {} engines ({} connections each) ...",
            a.nodes, a.degree
        );
    }
    let mut sim = SimCluster::new(cfg, &verifier, T0);
    sim.run_until(T0 + 3 * interval_ms);
    let n = a.nodes;
    let all: Vec<usize> = (0..n).collect();
    let limit_ms = a.limit.as_millis() as u64;

    // 1. One new change from node 0.
    let now = sim.now();
    sim.engines[0]
        .write_announcement(Timestamp(now), &announcement(0, now))
        .context("writing the announcement")?;
    sim.drain(0);
    let h = *sim.engines[0]
        .doc()
        .heads()
        .first()
        .context("no head after a write")?;
    let start = sim.now();
    let mut got: Vec<Option<u64>> = vec![None; n];
    got[0] = Some(0);
    while got.iter().any(Option::is_none) && sim.now() - start < limit_ms {
        let t = sim.now() + 50;
        sim.run_until(t);
        for (i, g) in got.iter_mut().enumerate() {
            if g.is_none() && sim.engines[i].doc().has_change(&h) {
                *g = Some(sim.now() - start);
            }
        }
    }
    let mut times: Vec<u64> = got.iter().map(|g| g.unwrap_or(u64::MAX)).collect();
    times.sort_unstable();
    let missing = got.iter().filter(|g| g.is_none()).count();
    if !a.json {
        eprintln!(
            "change spread measured ({:.1} s wall); steady state ...",
            wall.elapsed().as_secs_f64()
        );
    }

    // 2. Steady state: heartbeats spread evenly over the write period.
    let (mut bytes_rate, mut frames_rate) = (None, None);
    let steady_ms = a.steady.as_millis() as u64;
    // Writes happen on a 100 ms grid.
    let every_ms = a.write_every.as_millis() as u64 / 100 * 100;
    if steady_ms > 0 {
        let mut seqs = vec![1u64; n];
        let mut writes = |sim: &mut SimCluster, from: u64, to: u64| -> anyhow::Result<()> {
            // Node i writes at times t with t % every == i * every / n.
            let mut t = from - from % 100 + 100;
            while t <= to {
                sim.run_until(t);
                if every_ms > 0 {
                    for (i, seq) in seqs.iter_mut().enumerate() {
                        let slot = (i as u64 * every_ms / n as u64) / 100 * 100;
                        if t % every_ms == slot {
                            *seq += 1;
                            sim.engines[i]
                                .write_heartbeat(Timestamp(t), &heartbeat(*seq, t))
                                .context("writing a heartbeat")?;
                            sim.drain(i);
                        }
                    }
                }
                t += 100;
            }
            Ok(())
        };
        // Warm-up of one write period (at most 20 s) so the write rate is steady.
        let s0 = sim.now();
        writes(&mut sim, s0, s0 + every_ms.clamp(2 * interval_ms, 20_000))?;
        let before: (u64, u64) = sim.engines.iter().fold((0, 0), |acc, e| {
            let s = e.stats();
            (acc.0 + s.bytes_sent, acc.1 + s.frames_sent)
        });
        let s1 = sim.now();
        writes(&mut sim, s1, s1 + steady_ms)?;
        let after: (u64, u64) = sim.engines.iter().fold((0, 0), |acc, e| {
            let s = e.stats();
            (acc.0 + s.bytes_sent, acc.1 + s.frames_sent)
        });
        let secs = (sim.now() - s1) as f64 / 1000.0;
        bytes_rate = Some((after.0 - before.0) as f64 / n as f64 / secs);
        frames_rate = Some((after.1 - before.1) as f64 / n as f64 / secs);
    }

    // 3. Partition in halves, a write on each side, heal.
    let mut heal_ms = None;
    if let Some(p) = a.partition {
        if !a.json {
            eprintln!(
                "partition ({:.1} s wall so far) ...",
                wall.elapsed().as_secs_f64()
            );
        }
        let side: Vec<usize> = (n / 2..n).collect();
        sim.partition(&side);
        let t = sim.now();
        for i in [1, n - 1] {
            sim.engines[i]
                .write_announcement(Timestamp(t), &announcement(i, t))
                .context("writing an announcement")?;
            sim.drain(i);
        }
        sim.run_until(t + p.as_millis() as u64);
        sim.heal();
        heal_ms = sim.run_until_pred(100, limit_ms, |s| s.converged(&all));
    }
    let converged_at_end = sim.converged(&all);

    let r = Report {
        nodes: n,
        degree: a.degree,
        fanout: a.fanout,
        interval_ms,
        loss: a.loss,
        seed: a.seed,
        nudges: a.nudges,
        change_p50_ms: percentile(&times, 0.5),
        change_p99_ms: percentile(&times, 0.99),
        change_all_ms: percentile(&times, 1.0),
        change_missing: missing,
        steady_window_s: steady_ms as f64 / 1000.0,
        steady_write_every_s: every_ms as f64 / 1000.0,
        steady_bytes_per_node_s: bytes_rate,
        steady_frames_per_node_s: frames_rate,
        partition_s: a.partition.map(|p| p.as_secs_f64()),
        heal_converged_ms: heal_ms,
        converged_at_end,
        peer_reports: sim.reports.len(),
        wall_s: wall.elapsed().as_secs_f64(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let ms = |v: Option<u64>| v.map_or("not within limit".to_string(), |v| format!("{v} ms"));
    println!(
        "# sim statesync: {} nodes, {} connections/node, fanout {}, interval {} ms, loss {:.0}%, nudges {}, seed {}",
        r.nodes,
        r.degree,
        r.fanout,
        r.interval_ms,
        r.loss * 100.0,
        if r.nudges { "on" } else { "off" },
        r.seed
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| one new change: p50 / p99 / all nodes | {} / {} / {} |",
        ms(r.change_p50_ms),
        ms(r.change_p99_ms),
        ms(r.change_all_ms)
    );
    println!(
        "| nodes without the change after {} s | {} |",
        limit_ms / 1000,
        r.change_missing
    );
    if let (Some(b), Some(f)) = (r.steady_bytes_per_node_s, r.steady_frames_per_node_s) {
        println!(
            "| steady state ({} s, a heartbeat change per node every {} s): sent bytes / frames per node per s | {b:.0} / {f:.1} |",
            r.steady_window_s, r.steady_write_every_s
        );
    }
    if let Some(p) = r.partition_s {
        println!(
            "| after a {p} s partition in halves heals: equal heads on all nodes | {} |",
            ms(r.heal_converged_ms)
        );
    }
    println!(
        "| peer reports (all honest: expect 0) | {} |",
        r.peer_reports
    );
    println!("| wall time | {:.1} s |", r.wall_s);
    if r.nodes >= 1000 && (r.interval_ms, r.fanout) == (1000, 6) {
        let ok = r.change_all_ms.is_some_and(|v| v <= 5000);
        println!(
            "\ntarget (1,000+ nodes, 1 s, fanout 6): all nodes within 5 s: {}",
            if ok { "met" } else { "NOT met" }
        );
    }
    Ok(())
}
