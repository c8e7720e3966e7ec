//! `dwcp-testnet sim consensus`: the deterministic simulator's front end (crate dwcp-sim).
//!
//! Sweep mode runs seeds under network chaos and Byzantine strategies and reports safety
//! violations and liveness, printing a `--reproduce <seed>` command for every failing seed.
//! `--measure` runs fault-free with a uniform one-way latency and reports commit latency
//! p50/p99 and throughput.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use dwcp_sim::{Report, Scenario, Strategy};

/// Simulator commands.
#[derive(Debug, Subcommand)]
pub(crate) enum SimCmd {
    /// PBFT + reputation under chaos and Byzantine strategies.
    Consensus(ConsensusArgs),
    /// ASS state sync of many nodes: change spread, steady-state traffic, partition heal.
    Statesync(crate::sim_statesync::StatesyncArgs),
}

impl SimCmd {
    pub(crate) fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Consensus(a) => consensus(a),
            Self::Statesync(a) => crate::sim_statesync::run(a),
        }
    }
}

/// Arguments of `sim consensus`.
#[derive(Debug, Args)]
pub(crate) struct ConsensusArgs {
    /// Committee size n.
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// Byzantine nodes (default: f = (n-1)/3).
    #[arg(long)]
    byzantine: Option<usize>,
    /// Strategy of the Byzantine nodes, or `all` to rotate through them by seed.
    #[arg(long, default_value = "all")]
    strategy: String,
    /// Number of seeds.
    #[arg(long, default_value_t = 10)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// Run exactly this seed (as printed by a failing run).
    #[arg(long)]
    reproduce: Option<u64>,
    /// Also run the first seed twice and compare trace hashes.
    #[arg(long)]
    self_check: bool,
    /// Fault phase, virtual seconds.
    #[arg(long, default_value_t = 60)]
    fault_s: u64,
    /// Liveness phase after faults stop, virtual seconds.
    #[arg(long, default_value_t = 600)]
    liveness_s: u64,
    /// Decisions per committee epoch (0: one epoch); a multiple of 100 (the checkpoint
    /// interval). Every node switches to the next epoch's committee and engine at its end.
    #[arg(long, default_value_t = 0)]
    epoch_length: u64,
    /// Nodes beyond the committee: observers, and with epochs candidates for every
    /// committee (Byzantine nodes are drawn from all nodes).
    #[arg(long, default_value_t = 0)]
    observers: usize,
    /// With epochs and observers: the last honest observer starts 120 s after the faults
    /// stop, many epochs behind, and catches up by state transfer (or replay).
    #[arg(long)]
    late_joiner: bool,
    /// Measure latency and throughput: no faults, no Byzantine nodes, uniform links.
    #[arg(long)]
    measure: bool,
    /// One-way link latency for `--measure`, ms.
    #[arg(long, default_value_t = 50)]
    one_way_ms: u64,
    /// Simulated duration for `--measure`, virtual seconds.
    #[arg(long, default_value_t = 60)]
    duration_s: u64,
    /// Outstanding requests per client for `--measure` (load).
    #[arg(long, default_value_t = 1)]
    window: usize,
    /// Largest batch for `--measure`.
    #[arg(long, default_value_t = 256)]
    max_batch: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Seeds run in parallel (threads; each seed is still one deterministic run).
    #[arg(long, default_value_t = 1)]
    jobs: usize,
}

/// One seed's report and the wall time it took, or why it could not run.
type SeedResult = Result<(Report, f64), dwcp_sim::SimError>;

/// Runs `scenario(seed)` for every seed on `jobs` threads; results in seed order with the
/// wall time each seed took.
fn run_seeds(
    seeds: &[u64],
    jobs: usize,
    scenario: &(dyn Fn(u64) -> Scenario + Sync),
) -> anyhow::Result<Vec<(Report, f64)>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<BTreeMap<usize, SeedResult>> = Mutex::new(BTreeMap::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, 64) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(seed) = seeds.get(i) else {
                        break;
                    };
                    let t0 = Instant::now();
                    let r =
                        dwcp_sim::run(&scenario(*seed)).map(|r| (r, t0.elapsed().as_secs_f64()));
                    // Progress on stderr, one line per seed, so a long sweep can be followed
                    // (and its finished part read) while it runs.
                    if let Ok((r, secs)) = &r {
                        eprintln!(
                            "seed {} {} passed={} live={} violations={} max_view={} max_epoch={} membership_changes={} membership_ops={} quarantine_exclusions={} epoch_links={} transfers={}/{} trace={} {secs:.1} s",
                            r.seed,
                            r.strategy,
                            r.passed(),
                            r.live,
                            r.violations.len(),
                            r.max_view,
                            r.max_epoch,
                            r.membership_changes,
                            r.membership_ops,
                            r.quarantine_exclusions,
                            r.epoch_links_verified,
                            r.transfers_installed,
                            r.transfers_refused,
                            r.trace_hash
                        );
                    }
                    if let Ok(mut m) = results.lock() {
                        m.insert(i, r);
                    }
                }
            });
        }
    });
    let results = results
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a simulator thread panicked"))?;
    results
        .into_values()
        .map(|r| r.context("simulator"))
        .collect()
}

fn pct(v: &[u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let idx = ((s.len() - 1) as f64 * p).round() as usize;
    s[idx.min(s.len() - 1)]
}

fn consensus(a: ConsensusArgs) -> anyhow::Result<()> {
    if a.nodes == 0 || a.nodes > 256 {
        bail!("--nodes must be 1..=256");
    }
    let f = (a.nodes - 1) / 3;
    if a.measure {
        return measure(&a);
    }
    let byzantine = a.byzantine.unwrap_or(f);
    if byzantine > f {
        eprintln!(
            "warning: {byzantine} Byzantine nodes exceed f = {f}; PBFT's guarantees do not hold"
        );
    }
    let fixed: Option<Strategy> = match a.strategy.as_str() {
        "all" => None,
        s => Some(
            s.parse::<Strategy>()
                .map_err(anyhow::Error::msg)
                .context("--strategy")?,
        ),
    };
    let seeds: Vec<u64> = match a.reproduce {
        Some(s) => vec![s],
        None => (a.first_seed..a.first_seed + a.seeds).collect(),
    };
    let scenario = |seed: u64| {
        let strategy = fixed.unwrap_or(Strategy::ALL[(seed % Strategy::ALL.len() as u64) as usize]);
        let mut s = Scenario::chaos(a.nodes, byzantine, strategy, seed);
        s.fault_phase_ms = a.fault_s * 1_000;
        s.liveness_phase_ms = a.liveness_s * 1_000;
        // Clients keep submitting for 60 s after the faults stop, then the run drains.
        s.drain_ms = s.liveness_phase_ms.saturating_sub(60_000);
        s.epoch_length = a.epoch_length;
        s.observers = a.observers;
        s.late_joiner = a.late_joiner;
        s
    };
    let started = Instant::now();
    let mut reports: Vec<Report> = Vec::new();
    let mut failures = Vec::new();
    let mut per_strategy: BTreeMap<&'static str, (u64, usize, usize, f64)> = BTreeMap::new();
    for (r, secs) in run_seeds(&seeds, a.jobs, &scenario)? {
        let seed = r.seed;
        let e = per_strategy.entry(r.strategy).or_default();
        e.0 += 1;
        e.1 += usize::from(!r.violations.is_empty());
        e.2 += usize::from(!r.live);
        e.3 += secs;
        if !r.passed() {
            failures.push(format!(
                "seed {seed} ({}): violations {:?}; live: {} {}\n  reproduce: dwcp-testnet sim consensus --nodes {} --byzantine {byzantine} --strategy {} --epoch-length {} --observers {}{} --reproduce {seed}",
                r.strategy, r.violations, r.live, r.liveness_detail, a.nodes, r.strategy, a.epoch_length, a.observers, if a.late_joiner { " --late-joiner" } else { "" }
            ));
        }
        reports.push(r);
    }
    let determinism = if a.self_check {
        Some(match dwcp_sim::self_check(&scenario(seeds[0])) {
            Ok(_) => true,
            Err(dwcp_sim::SimError::Nondeterministic(..)) => false,
            Err(e) => return Err(e).context("simulator"),
        })
    } else {
        None
    };
    let wall = started.elapsed().as_secs_f64();
    let safety: usize = reports.iter().map(|r| r.violations.len()).sum();
    let unsafe_seeds = reports.iter().filter(|r| !r.violations.is_empty()).count();
    let not_live = reports.iter().filter(|r| !r.live).count();
    let lat: Vec<u64> = reports
        .iter()
        .flat_map(|r| r.consensus_latency_ms.iter().copied())
        .collect();
    let quarantined: usize = reports.iter().map(|r| r.quarantined_byzantine).sum();
    let offenders: usize = reports.iter().map(|r| r.offenders).sum();
    let summary = serde_json::json!({
        "nodes": a.nodes,
        "byzantine": byzantine,
        "strategy": a.strategy,
        "seeds": seeds.len(),
        "safety_violations": safety,
        "unsafe_seeds": unsafe_seeds,
        "liveness_failures": not_live,
        "offenders": offenders,
        "offenders_quarantined": quarantined,
        "consensus_latency_ms_p50": pct(&lat, 0.5),
        "consensus_latency_ms_p99": pct(&lat, 0.99),
        "messages": reports.iter().map(|r| r.messages).sum::<u64>(),
        "rejected_forged_messages": reports.iter().map(|r| r.rejected_messages).sum::<u64>(),
        "max_view": reports.iter().map(|r| r.max_view).max().unwrap_or(0),
        "max_epoch": reports.iter().map(|r| r.max_epoch).max().unwrap_or(0),
        "membership_changes": reports.iter().map(|r| r.membership_changes).sum::<usize>(),
        "membership_ops": reports.iter().map(|r| r.membership_ops).sum::<u64>(),
        "quarantine_exclusions": reports.iter().map(|r| r.quarantine_exclusions).sum::<u64>(),
        "epoch_links_verified": reports.iter().map(|r| r.epoch_links_verified).sum::<u64>(),
        "transfers_installed": reports.iter().map(|r| r.transfers_installed).sum::<u64>(),
        "transfers_refused": reports.iter().map(|r| r.transfers_refused).sum::<u64>(),
        "determinism_self_check": determinism,
        // Per seed: equal hashes mean equal runs (event for event), across builds too.
        "trace_hashes": reports
            .iter()
            .map(|r| (r.seed.to_string(), serde_json::Value::from(r.trace_hash.clone())))
            .collect::<serde_json::Map<String, serde_json::Value>>(),
        "wall_seconds": wall,
        "jobs": a.jobs,
        "per_strategy": per_strategy
            .iter()
            .map(|(name, (seeds, unsafe_seeds, not_live, secs))| {
                (
                    name.to_string(),
                    serde_json::json!({
                        "seeds": seeds,
                        "unsafe_seeds": unsafe_seeds,
                        "liveness_failures": not_live,
                        "seed_seconds_total": secs,
                        "seed_seconds_mean": secs / (*seeds).max(1) as f64,
                    }),
                )
            })
            .collect::<serde_json::Map<String, serde_json::Value>>(),
        "failures": failures,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "sim consensus: n={} byzantine={} strategy={} seeds={}",
            a.nodes,
            byzantine,
            a.strategy,
            seeds.len()
        );
        println!("  safety violations   {safety} (in {unsafe_seeds} seeds)");
        println!("  liveness failures   {not_live}");
        println!("  offenders quarantined {quarantined}/{offenders}");
        println!(
            "  consensus latency   p50 {} ms, p99 {} ms (proposal -> commit, chaos links)",
            pct(&lat, 0.5),
            pct(&lat, 0.99)
        );
        println!(
            "  forged msgs dropped {}",
            summary["rejected_forged_messages"]
        );
        if let Some(d) = determinism {
            println!(
                "  determinism         {}",
                if d {
                    "same trace hash twice"
                } else {
                    "TRACE HASHES DIFFER"
                }
            );
        }
        for (name, (n, bad, not_live, secs)) in &per_strategy {
            println!(
                "  {name:<20} seeds {n:>5}  unsafe {bad}  not live {not_live}  {:.1} s/seed",
                secs / (*n).max(1) as f64
            );
        }
        println!("  wall time           {wall:.1} s ({} jobs)", a.jobs);
        for f in &failures {
            println!("FAIL {f}");
        }
    }
    if !failures.is_empty() || determinism == Some(false) {
        bail!("{} failing seeds", failures.len());
    }
    Ok(())
}

fn measure(a: &ConsensusArgs) -> anyhow::Result<()> {
    let seed = a.reproduce.unwrap_or(a.first_seed);
    let mut s = Scenario::measure(a.nodes, a.one_way_ms, seed, a.duration_s * 1_000, a.window);
    s.consensus.max_batch = a.max_batch;
    let active_ms = (s.liveness_phase_ms - s.drain_ms) as f64;
    let started = Instant::now();
    let r = dwcp_sim::run(&s).context("simulator")?;
    let wall = started.elapsed().as_secs_f64();
    let tput = r.requests_committed as f64 / (active_ms / 1_000.0);
    let out = serde_json::json!({
        "nodes": a.nodes,
        "one_way_ms": a.one_way_ms,
        "window": a.window,
        "max_batch": a.max_batch,
        "requests_committed": r.requests_committed,
        "batches_committed": r.committed_seqs,
        "throughput_req_per_s": tput,
        "consensus_latency_ms_p50": pct(&r.consensus_latency_ms, 0.5),
        "consensus_latency_ms_p99": pct(&r.consensus_latency_ms, 0.99),
        "client_latency_ms_p50": pct(&r.client_latency_ms, 0.5),
        "client_latency_ms_p99": pct(&r.client_latency_ms, 0.99),
        "messages": r.messages,
        "wall_seconds": wall,
        "wall_us_per_message": wall * 1e6 / r.messages.max(1) as f64,
        "passed": r.passed(),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "n={:<3} one-way={}ms window={} batch<={}: consensus p50 {} ms p99 {} ms | client p50 {} ms p99 {} ms | {:.0} req/s, {} batches | {:.1} us/msg wall",
            a.nodes,
            a.one_way_ms,
            a.window,
            a.max_batch,
            out["consensus_latency_ms_p50"],
            out["consensus_latency_ms_p99"],
            out["client_latency_ms_p50"],
            out["client_latency_ms_p99"],
            tput,
            r.committed_seqs,
            out["wall_us_per_message"].as_f64().unwrap_or(0.0),
        );
    }
    if !r.passed() {
        bail!(
            "measurement run failed: {:?} {}",
            r.violations,
            r.liveness_detail
        );
    }
    Ok(())
}
