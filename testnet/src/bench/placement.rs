//! `dwcp-testnet bench placement`: ITP side by side with its baselines in one run.
//!
//! On snapshots of real Azure VM requests (VMs alive at several times) and on synthetic
//! GPU and affinity-heavy instances it prints, per instance: the lower bound (and the LP
//! relaxation where it solves), first-fit decreasing, first fit in random order (seeded),
//! best fit, ours, and the exact MILP on instances small enough. Columns: hosts used, ratio
//! to the bound, utilisation of the binding resource on the hosts used, solve time. Every
//! placement printed is checked by `verify` (capacity, eligibility, affinity and
//! anti-affinity) before it is counted. Then scale runs (batch and online) and a
//! rebalancing run with a migration budget.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use dwcp_placement as placement;
use placement::model::DIM_NAMES;
use placement::workload;
use placement::{
    Algorithm, AvoidList, NoDeadline, PlacementConfig, PlacementInput, Problem, SolverSettings,
    Timestamp,
};
use serde::Serialize;

/// Arguments of `bench placement`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// VM request CSV in the format of `data/vms/azure2017/vm_requests_dev.csv`.
    #[arg(long)]
    requests: PathBuf,
    /// Host fleet: `<cpu>c/<mem>G[/<n>x<gpu>][:count],...`; types without a count share
    /// 1.5x the CPU demand equally.
    #[arg(long, default_value = "48c/192G,64c/256G,96c/384G")]
    fleet: String,
    /// Number of snapshots (evenly spaced over the trace, the last at its end).
    #[arg(long, default_value_t = 5)]
    snapshots: usize,
    /// Memory kept free per host, in thousandths (manual default: 100 = 10 %).
    #[arg(long, default_value_t = 100)]
    min_free_memory_permille: u32,
    /// Host fleet of the small instances (exact MILP), same syntax as `--fleet`.
    #[arg(long, default_value = "16c/64G,32c/128G")]
    small_fleet: String,
    /// VMs per small instance (exact MILP).
    #[arg(long, default_value_t = 50)]
    small_vms: usize,
    /// Number of small Azure instances.
    #[arg(long, default_value_t = 5)]
    small_instances: usize,
    /// Time limit of the exact MILP per instance, seconds.
    #[arg(long, default_value_t = 20.0)]
    milp_time_limit_s: f64,
    /// Skip the 100,000-VM / 10,000-host scale run.
    #[arg(long)]
    quick: bool,
    /// Seed for sampling and the random-order baseline.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    algorithm: String,
    hosts: Option<f64>,
    ratio_to_bound: Option<f64>,
    binding_utilisation: Option<f64>,
    time_ms: Option<f64>,
    unplaced: usize,
    note: String,
}

#[derive(Debug, Serialize)]
struct Instance {
    name: String,
    vms: usize,
    hosts_available: usize,
    binding: String,
    lower_bound: f64,
    rows: Vec<Row>,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    instances: Vec<Instance>,
    notes: Vec<String>,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Utilisation of dimension `dim` (or the VM count) over the hosts a placement uses.
fn binding_util(p: &Problem, pl: &placement::Placement, binding: &str) -> Option<f64> {
    let mut used = vec![false; p.num_hosts()];
    for h in pl.host_of.iter().flatten() {
        used[*h as usize] = true;
    }
    let input = p.input();
    if binding == "vm-count" {
        let cap: f64 =
            used.iter().filter(|u| **u).count() as f64 * f64::from(input.config.max_vms_per_node);
        return Some(pl.host_of.iter().flatten().count() as f64 / cap);
    }
    let k = DIM_NAMES.iter().position(|d| *d == binding)?;
    let cap: u64 = (0..p.num_hosts())
        .filter(|h| used[*h])
        .map(|h| p.capacity(h)[k])
        .sum();
    let dem: u64 = pl
        .host_of
        .iter()
        .enumerate()
        .filter(|(_, h)| h.is_some())
        .map(|(v, _)| input.vms[v].demand.to_array()[k])
        .sum();
    (cap > 0).then(|| dem as f64 / cap as f64)
}

fn compare(name: &str, input: PlacementInput, args: &Args, exact: bool) -> Result<Instance> {
    let p =
        Problem::compile(input, Timestamp(0), &AvoidList::default()).context("compile instance")?;
    let lb = placement::lower_bound(&p);
    let mut inst = Instance {
        name: name.to_owned(),
        vms: p.num_vms(),
        hosts_available: p.num_hosts(),
        binding: lb.binding.to_owned(),
        lower_bound: lb.fractional,
        rows: Vec::new(),
    };
    inst.rows.push(Row {
        algorithm: "lower bound".into(),
        hosts: Some(lb.fractional),
        ratio_to_bound: Some(1.0),
        binding_utilisation: None,
        time_ms: None,
        unplaced: 0,
        note: format!("max over dims of hosts covering demand ({})", lb.binding),
    });
    if exact {
        let t = Instant::now();
        match placement::lp_relaxation(&p) {
            Ok(v) => inst.rows.push(Row {
                algorithm: "LP relaxation".into(),
                hosts: Some(v),
                ratio_to_bound: Some(v / lb.fractional),
                binding_utilisation: None,
                time_ms: Some(ms(t)),
                unplaced: 0,
                note: String::new(),
            }),
            Err(e) => inst.notes_push(format!("LP relaxation failed: {e}")),
        }
    }
    let settings = SolverSettings {
        seed: args.seed,
        ..SolverSettings::default()
    };
    let mut ours = None;
    for alg in [
        Algorithm::FirstFitDecreasing,
        Algorithm::FirstFitRandom,
        Algorithm::BestFit,
        Algorithm::SpreadRepack,
    ] {
        let t = Instant::now();
        let out = placement::solve(&p, alg, &settings, &NoDeadline);
        let elapsed = ms(t);
        if let Err(v) = placement::verify(&p, &out.placement) {
            bail!("{name}: {} produced an invalid placement: {v}", alg.name());
        }
        inst.rows.push(Row {
            algorithm: alg.name().into(),
            hosts: Some(out.hosts_used as f64),
            ratio_to_bound: Some(out.hosts_used as f64 / lb.fractional),
            binding_utilisation: binding_util(&p, &out.placement, lb.binding),
            time_ms: Some(elapsed),
            unplaced: out.unplaced,
            note: if alg == Algorithm::SpreadRepack {
                format!("{} hosts emptied by repack", out.repacked_hosts)
            } else {
                String::new()
            },
        });
        if alg == Algorithm::SpreadRepack {
            ours = Some(out);
        }
    }
    if exact {
        let es = SolverSettings {
            max_time_ms: Some((args.milp_time_limit_s * 1000.0) as u64),
            exact_max_vms: 50,
            ..settings
        };
        let t = Instant::now();
        match placement::solve_exact(&p, &es, ours.as_ref().map(|o| &o.placement)) {
            Ok(out) => {
                if let Err(v) = placement::verify(&p, &out.placement) {
                    bail!("{name}: exact MILP produced an invalid placement: {v}");
                }
                inst.rows.push(Row {
                    algorithm: "exact MILP (microlp)".into(),
                    hosts: Some(out.hosts_used as f64),
                    ratio_to_bound: Some(out.hosts_used as f64 / lb.fractional),
                    binding_utilisation: binding_util(&p, &out.placement, lb.binding),
                    time_ms: Some(ms(t)),
                    unplaced: 0,
                    note: if out.proven_optimal {
                        "proven optimal".into()
                    } else {
                        "time limit: best found".into()
                    },
                });
            }
            Err(e) => inst.notes_push(format!("exact MILP: {e}")),
        }
    }
    Ok(inst)
}

impl Instance {
    fn notes_push(&mut self, note: String) {
        self.rows.push(Row {
            algorithm: "note".into(),
            hosts: None,
            ratio_to_bound: None,
            binding_utilisation: None,
            time_ms: None,
            unplaced: 0,
            note,
        });
    }
}

fn config(args: &Args) -> PlacementConfig {
    PlacementConfig {
        min_free_memory_permille: args.min_free_memory_permille,
        ..PlacementConfig::default()
    }
}

fn azure_input(
    vms: Vec<placement::Vm>,
    types: &[workload::HostType],
    args: &Args,
) -> PlacementInput {
    let cpu: u64 = vms.iter().map(|v| v.demand.cpu_milli.div_ceil(1000)).sum();
    let hosts = workload::build_fleet(types, cpu, 1.5);
    PlacementInput {
        hosts,
        vms,
        rules: vec![],
        config: config(args),
    }
}

pub(crate) fn run(args: Args) -> Result<()> {
    let meta = std::fs::metadata(&args.requests)
        .with_context(|| format!("stat {}", args.requests.display()))?;
    if meta.len() > workload::MAX_CSV_BYTES as u64 {
        bail!(
            "{} is larger than {} bytes",
            args.requests.display(),
            workload::MAX_CSV_BYTES
        );
    }
    let text = std::fs::read_to_string(&args.requests)
        .with_context(|| format!("read {}", args.requests.display()))?;
    let reqs = workload::parse_azure_csv(&text).context("parse requests")?;
    if reqs.is_empty() {
        bail!("{} holds no requests", args.requests.display());
    }
    let types = workload::parse_fleet(&args.fleet)?;
    let small_types = workload::parse_fleet(&args.small_fleet)?;
    let mut report = Report::default();
    let times = workload::snapshot_times(&reqs, args.snapshots);
    let mut last = Vec::new();
    for t in &times {
        let vms = workload::snapshot(&reqs, *t);
        if vms.is_empty() {
            continue;
        }
        let n = vms.len();
        last = vms.clone();
        let inst = compare(
            &format!("azure snapshot t={t}s ({n} VMs)"),
            azure_input(vms, &types, &args),
            &args,
            false,
        )?;
        report.instances.push(inst);
    }
    // Small instances: the exact MILP as yardstick.
    for i in 0..args.small_instances {
        let vms = workload::subsample(&last, args.small_vms, args.seed + i as u64);
        let inst = compare(
            &format!("azure sample {} ({} VMs)", i + 1, vms.len()),
            azure_input(vms, &small_types, &args),
            &args,
            true,
        )?;
        report.instances.push(inst);
    }
    let small = args.small_vms.min(40);
    report.instances.push(compare(
        &format!("synthetic GPU ({small} VMs)"),
        workload::synthetic_gpu(args.seed, small),
        &args,
        true,
    )?);
    report.instances.push(compare(
        &format!("synthetic affinity-heavy ({small} VMs)"),
        workload::synthetic_affinity(args.seed, small),
        &args,
        true,
    )?);
    report.instances.push(compare(
        "synthetic GPU (5000 VMs)",
        workload::synthetic_gpu(args.seed, 5000),
        &args,
        false,
    )?);
    report.instances.push(compare(
        "synthetic affinity-heavy (5000 VMs)",
        workload::synthetic_affinity(args.seed, 5000),
        &args,
        false,
    )?);
    scale_runs(&reqs, &last, &types, &args, &mut report)?;
    report.notes.push(format!(
        "fleet {}; min free memory {} %; max 100 VMs per host; every placement above passed verify()",
        args.fleet,
        f64::from(args.min_free_memory_permille) / 10.0
    ));
    print(&report, args.json)
}

fn row(
    algorithm: &str,
    hosts: usize,
    lb: f64,
    util: Option<f64>,
    time_ms: f64,
    unplaced: usize,
    note: String,
) -> Row {
    Row {
        algorithm: algorithm.into(),
        hosts: Some(hosts as f64),
        ratio_to_bound: Some(hosts as f64 / lb),
        binding_utilisation: util,
        time_ms: Some(time_ms),
        unplaced,
        note,
    }
}

/// Batch at 10,000 VMs / 1,000 hosts and 100,000 VMs / 10,000 hosts, online at 10,000
/// hosts, and a rebalance with a 5 % migration budget.
fn scale_runs(
    reqs: &[workload::AzureRequest],
    last: &[placement::Vm],
    types: &[workload::HostType],
    args: &Args,
    report: &mut Report,
) -> Result<()> {
    let all: Vec<placement::Vm> = reqs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            placement::Vm::new(i as u64, placement::Resources::cpu_mem(r.vcpus, r.mem_mib))
        })
        .collect();
    let mut sizes = vec![(10_000usize, 1_000usize)];
    if !args.quick {
        sizes.push((100_000, 10_000));
    }
    let settings = SolverSettings {
        seed: args.seed,
        ..SolverSettings::default()
    };
    for (n_vms, n_hosts) in sizes {
        let vms = workload::subsample(&all, n_vms, args.seed);
        let per = (n_hosts / types.len()) as u64;
        let fixed: Vec<workload::HostType> = types
            .iter()
            .map(|t| workload::HostType {
                count: Some(per),
                ..t.clone()
            })
            .collect();
        let hosts = workload::build_fleet(&fixed, 0, 1.0);
        let input = PlacementInput {
            hosts,
            vms,
            rules: vec![],
            config: config(args),
        };
        let p = Problem::compile(input, Timestamp(0), &AvoidList::default())?;
        let lb = placement::lower_bound(&p);
        let mut inst = Instance {
            name: format!("scale: batch {n_vms} Azure VMs on {} hosts", p.num_hosts()),
            vms: n_vms,
            hosts_available: p.num_hosts(),
            binding: lb.binding.into(),
            lower_bound: lb.fractional,
            rows: Vec::new(),
        };
        let algs: &[Algorithm] = if n_vms > 20_000 {
            &[Algorithm::SpreadRepack]
        } else {
            &[
                Algorithm::FirstFitDecreasing,
                Algorithm::FirstFitRandom,
                Algorithm::SpreadRepack,
            ]
        };
        for &alg in algs {
            let t = Instant::now();
            let out = placement::solve(&p, alg, &settings, &NoDeadline);
            let el = ms(t);
            if let Err(v) = placement::verify(&p, &out.placement) {
                bail!("scale {}: invalid placement: {v}", alg.name());
            }
            let util = binding_util(&p, &out.placement, lb.binding);
            inst.rows.push(row(
                alg.name(),
                out.hosts_used,
                lb.fractional,
                util,
                el,
                out.unplaced,
                String::new(),
            ));
        }
        report.instances.push(inst);
    }

    // Online: 10,000 hosts; the whole trace replayed in time order, VMs arriving and
    // leaving (departure = arrival + midpoint of the lifetime bin; censored VMs stay).
    let n_hosts = 10_000usize;
    let per = (n_hosts / types.len()) as u64;
    let fixed: Vec<workload::HostType> = types
        .iter()
        .map(|t| workload::HostType {
            count: Some(per),
            ..t.clone()
        })
        .collect();
    let hosts = workload::build_fleet(&fixed, 0, 1.0);
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(reqs.len() * 2);
    for (i, r) in reqs.iter().enumerate() {
        events.push((r.arrival_s, true, i));
        if !r.censored {
            events.push((
                r.arrival_s + (r.duration_lo_s + r.duration_hi_s) / 2,
                false,
                i,
            ));
        }
    }
    // Departures before arrivals at the same instant.
    events.sort_unstable_by_key(|(t, arrive, i)| (*t, *arrive, *i));
    let mut online = placement::OnlinePlacer::new(
        hosts.clone(),
        vec![],
        config(args),
        Timestamp(0),
        &AvoidList::default(),
    )?;
    let mut lat = Vec::with_capacity(reqs.len());
    let mut rejected = 0;
    let (mut max_checks, mut sum_checks) = (0usize, 0usize);
    let total = Instant::now();
    for (_, arrive, i) in &events {
        if *arrive {
            let t = Instant::now();
            let d = online.place(&all[*i]);
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
            match d {
                Ok(d) => {
                    let c = d.evals.resource_checks as usize;
                    max_checks = max_checks.max(c);
                    sum_checks += c;
                }
                Err(_) => rejected += 1,
            }
        } else {
            online.remove(all[*i].id);
        }
    }
    let total_ms = ms(total);
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| lat[((lat.len() as f64 - 1.0) * q) as usize];
    // The VMs alive at the end, where the online placer left them.
    let alive: Vec<placement::Vm> = all
        .iter()
        .filter(|v| online.host_of(v.id).is_some())
        .cloned()
        .collect();
    let host_of: Vec<Option<u32>> = alive
        .iter()
        .map(|v| online.host_of(v.id).map(|h| h.0 as u32))
        .collect();
    let input = PlacementInput {
        hosts,
        vms: alive.clone(),
        rules: vec![],
        config: config(args),
    };
    let p = Problem::compile(input, Timestamp(0), &AvoidList::default())?;
    let pl = placement::Placement { host_of };
    if let Err(v) = placement::verify(&p, &pl) {
        bail!("online: invalid placement: {v}");
    }
    let lb = placement::lower_bound(&p);
    let mut inst = Instance {
        name: format!(
            "scale: online, whole trace replayed ({} arrivals, departures on) on {} hosts; state at the end",
            lat.len(),
            p.num_hosts()
        ),
        vms: alive.len(),
        hosts_available: p.num_hosts(),
        binding: lb.binding.into(),
        lower_bound: lb.fractional,
        rows: Vec::new(),
    };
    inst.rows.push(row(
        "ours online",
        pl.hosts_used(),
        lb.fractional,
        binding_util(&p, &pl, lb.binding),
        pct(0.99),
        rejected,
        format!(
            "per VM: p50 {:.4} ms, p99 {:.4} ms, p99.9 {:.4} ms, max {:.3} ms; hosts checked per VM: mean {:.1}, max {max_checks}; replay {:.0} ms (time column = p99)",
            pct(0.5),
            pct(0.99),
            pct(0.999),
            lat.last().copied().unwrap_or(0.0),
            sum_checks as f64 / lat.len().max(1) as f64,
            total_ms
        ),
    ));
    let t = Instant::now();
    let batch = placement::solve(&p, Algorithm::SpreadRepack, &settings, &NoDeadline);
    inst.rows.push(row(
        "ours batch (same VMs)",
        batch.hosts_used,
        lb.fractional,
        binding_util(&p, &batch.placement, lb.binding),
        ms(t),
        batch.unplaced,
        "reference: the VMs alive at the end placed from scratch".into(),
    ));
    // The periodic re-plan the online placer relies on: 5 % of the VMs per hour.
    let budget = placement::migration_budget(alive.len(), 0.05, 3_600_000);
    let t = Instant::now();
    let plan = placement::rebalance(&p, &pl, budget, &settings, &NoDeadline)?;
    let el = ms(t);
    if let Some(step) = placement::first_unsafe_step(&p, &pl, &plan.migrations) {
        bail!("rebalance after online: step {step} overloads its target");
    }
    inst.rows.push(row(
        "ours online + rebalance",
        plan.hosts_after,
        lb.fractional,
        binding_util(&p, &plan.placement, lb.binding),
        el,
        plan.stuck.len(),
        format!(
            "{} migrations (budget {budget} = 5 %/h), every step within capacity",
            plan.migrations.len()
        ),
    ));
    report.instances.push(inst);

    // Rebalance: start from first fit in random order on the last snapshot, then 2 % of
    // the hosts in use are quarantined; re-plan with 5 % of the VMs as budget.
    let input = azure_input(last.to_vec(), types, args);
    let p0 = Problem::compile(input.clone(), Timestamp(0), &AvoidList::default())?;
    let lb = placement::lower_bound(&p0);
    let mut inst = Instance {
        name: format!("rebalance: last snapshot ({} VMs), 5 % budget", last.len()),
        vms: last.len(),
        hosts_available: p0.num_hosts(),
        binding: lb.binding.into(),
        lower_bound: lb.fractional,
        rows: Vec::new(),
    };
    for (start_alg, quarantine) in [
        (Algorithm::FirstFitDecreasing, false),
        (Algorithm::FirstFitRandom, true),
    ] {
        let start = placement::solve(&p0, start_alg, &settings, &NoDeadline);
        let mut inp = input.clone();
        let mut used: Vec<u32> = start.placement.host_of.iter().flatten().copied().collect();
        used.sort_unstable();
        used.dedup();
        let mut q = 0;
        if quarantine {
            for h in used.iter().step_by(50) {
                inp.hosts[*h as usize].quarantined = true;
                q += 1;
            }
        }
        let p = Problem::compile(inp, Timestamp(0), &AvoidList::default())?;
        let budget = placement::migration_budget(last.len(), 0.05, 3_600_000);
        let t = Instant::now();
        let plan = placement::rebalance(&p, &start.placement, budget, &settings, &NoDeadline)?;
        let el = ms(t);
        if let Some(step) = placement::first_unsafe_step(&p, &start.placement, &plan.migrations) {
            bail!("rebalance: step {step} overloads its target");
        }
        let mut start_row = row(
            &format!("start: {}", start_alg.name()),
            plan.hosts_before,
            lb.fractional,
            binding_util(&p, &start.placement, lb.binding),
            0.0,
            0,
            if quarantine {
                format!("then {q} of its hosts quarantined")
            } else {
                "every host full in one dimension: only window re-solves help".into()
            },
        );
        start_row.time_ms = None;
        inst.rows.push(start_row);
        inst.rows.push(row(
            "ours rebalance",
            plan.hosts_after,
            lb.fractional,
            binding_util(&p, &plan.placement, lb.binding),
            el,
            plan.stuck.len(),
            format!(
                "{} migrations (budget {budget}), {} evacuated, every step within capacity",
                plan.migrations.len(),
                plan.evacuated
            ),
        ));
    }
    report.instances.push(inst);
    Ok(())
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"))
}

fn print(report: &Report, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    for inst in &report.instances {
        println!(
            "\n#### {}: {} hosts available, bound {:.2} hosts ({} binds)",
            inst.name, inst.hosts_available, inst.lower_bound, inst.binding
        );
        println!(
            "| {:<22} | {:>9} | {:>8} | {:>11} | {:>10} | {:>8} | note |",
            "algorithm", "hosts", "x bound", "util (bind)", "time ms", "unplaced"
        );
        println!(
            "|{:-<24}|{:->11}|{:->10}|{:->13}|{:->12}|{:->10}|------|",
            "", "", "", "", "", ""
        );
        for r in &inst.rows {
            println!(
                "| {:<22} | {:>9} | {:>8} | {:>11} | {:>10} | {:>8} | {} |",
                r.algorithm,
                fmt_opt(
                    r.hosts,
                    if r.algorithm.contains("bound") || r.algorithm.contains("LP") {
                        2
                    } else {
                        0
                    }
                ),
                fmt_opt(r.ratio_to_bound, 3),
                fmt_opt(r.binding_utilisation.map(|u| u * 100.0), 1)
                    + if r.binding_utilisation.is_some() {
                        " %"
                    } else {
                        ""
                    },
                fmt_opt(
                    r.time_ms,
                    if r.time_ms.is_some_and(|t| t < 1.0) {
                        3
                    } else {
                        1
                    }
                ),
                r.unplaced,
                r.note
            );
        }
    }
    for n in &report.notes {
        println!("\nnote: {n}");
    }
    Ok(())
}
