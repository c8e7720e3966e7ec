//! Workloads for tests and benchmarks: the Azure VM request CSV (format of
//! `data/vms/azure2017/vm_requests_dev.csv`), snapshots of VMs alive at a time, host
//! fleets from a spec such as `48c/192G,64c/256G,96c/384G`, and seeded synthetic GPU and
//! affinity-heavy instances.

use std::collections::BTreeSet;

use crate::model::{
    Host, HostMatch, PlacementConfig, PlacementInput, Resources, Rule, RuleId, RuleKind, Vm,
};
use crate::rng::SplitMix64;

/// Largest CSV accepted (bytes).
pub const MAX_CSV_BYTES: usize = 512 << 20;
/// Largest fleet a spec may build.
pub const MAX_FLEET_HOSTS: u64 = 1_000_000;

/// Bad workload input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    /// Input larger than the limit.
    #[error("input of {0} bytes exceeds the limit of {MAX_CSV_BYTES}")]
    TooLarge(usize),
    /// Missing header column.
    #[error("missing column {0}")]
    MissingColumn(&'static str),
    /// A bad line.
    #[error("line {line}: {msg}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// A bad fleet spec.
    #[error("bad fleet spec {0:?}: expected e.g. 48c/192G[/4xa100][:count],...")]
    BadFleet(String),
}

/// One VM request row.
#[derive(Clone, Debug, PartialEq)]
pub struct AzureRequest {
    /// End of the 300 s arrival bin (s).
    pub arrival_s: u64,
    /// Tenant batch.
    pub tenant_batch: u64,
    /// vCPUs.
    pub vcpus: u64,
    /// Memory (MiB).
    pub mem_mib: u64,
    /// Lifetime lower end (s).
    pub duration_lo_s: u64,
    /// Lifetime upper end (s).
    pub duration_hi_s: u64,
    /// Still running at the end of the trace.
    pub censored: bool,
}

/// Parses the Azure request CSV (columns found by header name).
pub fn parse_azure_csv(text: &str) -> Result<Vec<AzureRequest>, WorkloadError> {
    if text.len() > MAX_CSV_BYTES {
        return Err(WorkloadError::TooLarge(text.len()));
    }
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .collect();
    let col = |name: &'static str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or(WorkloadError::MissingColumn(name))
    };
    let c_arr = col("arrival_bin_end_s")?;
    let c_ten = col("tenant_batch_id")?;
    let c_cpu = col("vcpus")?;
    let c_mem = col("mem_gb")?;
    let c_cen = col("censored")?;
    let c_lo = col("duration_bin_lo_s")?;
    let c_hi = col("duration_bin_hi_s")?;
    let mut out = Vec::new();
    for (i, line) in lines.enumerate() {
        let line_no = i + 2;
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let bad = |msg: String| WorkloadError::BadLine { line: line_no, msg };
        let get = |c: usize| {
            f.get(c)
                .copied()
                .ok_or_else(|| bad(format!("missing field {c}")))
        };
        let int = |c: usize| -> Result<u64, WorkloadError> {
            let s = get(c)?;
            s.parse::<u64>().map_err(|e| bad(format!("{s:?}: {e}")))
        };
        let mem_s = get(c_mem)?;
        let mem_gb: f64 = mem_s.parse().map_err(|e| bad(format!("{mem_s:?}: {e}")))?;
        if !(mem_gb.is_finite() && (0.0..=1e6).contains(&mem_gb)) {
            return Err(bad(format!("memory {mem_gb} out of range")));
        }
        let vcpus = int(c_cpu)?;
        if vcpus > 100_000 {
            return Err(bad(format!("vcpus {vcpus} out of range")));
        }
        out.push(AzureRequest {
            arrival_s: int(c_arr)?,
            tenant_batch: int(c_ten)?,
            vcpus,
            mem_mib: (mem_gb * 1024.0).round() as u64,
            duration_lo_s: int(c_lo)?,
            duration_hi_s: int(c_hi)?,
            censored: int(c_cen)? != 0,
        });
    }
    Ok(out)
}

/// VMs alive at time `t`: arrived, and either censored (running at the trace end) or with
/// a lifetime (midpoint of its bin) reaching past `t`. VM ids are row numbers.
pub fn snapshot(reqs: &[AzureRequest], t: u64) -> Vec<Vm> {
    reqs.iter()
        .enumerate()
        .filter(|(_, r)| {
            let life = (r.duration_lo_s + r.duration_hi_s) / 2;
            r.arrival_s <= t && (r.censored || r.arrival_s.saturating_add(life) > t)
        })
        .map(|(i, r)| Vm::new(i as u64, Resources::cpu_mem(r.vcpus, r.mem_mib)))
        .collect()
}

/// `n` snapshot times spread evenly over the trace, the last at its end.
pub fn snapshot_times(reqs: &[AzureRequest], n: usize) -> Vec<u64> {
    let (Some(t0), Some(t1)) = (
        reqs.iter().map(|r| r.arrival_s).min(),
        reqs.iter().map(|r| r.arrival_s).max(),
    ) else {
        return Vec::new();
    };
    (1..=n as u64)
        .map(|k| t0 + (t1 - t0) * k / n as u64)
        .collect()
}

/// One host type of a fleet spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostType {
    /// vCPUs.
    pub vcpus: u64,
    /// Memory (GiB).
    pub mem_gib: u64,
    /// GPUs and model.
    pub gpus: Option<(u64, String)>,
    /// Explicit count; `None` = sized to the demand.
    pub count: Option<u64>,
}

/// Parses `48c/192G[/4xa100][:count],...`.
pub fn parse_fleet(spec: &str) -> Result<Vec<HostType>, WorkloadError> {
    let bad = || WorkloadError::BadFleet(spec.to_owned());
    let mut out = Vec::new();
    for tok in spec.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (shape, count) = match tok.split_once(':') {
            Some((s, c)) => (s, Some(c.parse::<u64>().map_err(|_| bad())?)),
            None => (tok, None),
        };
        let mut parts = shape.split('/');
        let cpu = parts
            .next()
            .and_then(|s| s.strip_suffix('c'))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(bad)?;
        let mem = parts
            .next()
            .and_then(|s| s.strip_suffix('G').or_else(|| s.strip_suffix('g')))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(bad)?;
        let gpus = match parts.next() {
            Some(g) => {
                let (n, model) = g.split_once('x').ok_or_else(bad)?;
                Some((n.parse::<u64>().map_err(|_| bad())?, model.to_owned()))
            }
            None => None,
        };
        if parts.next().is_some() || cpu == 0 || mem == 0 || cpu > 100_000 || mem > 100_000_000 {
            return Err(bad());
        }
        if count.is_some_and(|c| c > MAX_FLEET_HOSTS) {
            return Err(bad());
        }
        out.push(HostType {
            vcpus: cpu,
            mem_gib: mem,
            gpus,
            count,
        });
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

/// Builds hosts from host types. Types without a count get an equal share of
/// `headroom x` the CPU demand (so every size is needed, not just the largest).
pub fn build_fleet(types: &[HostType], demand_vcpus: u64, headroom: f64) -> Vec<Host> {
    let auto = types.iter().filter(|t| t.count.is_none()).count() as f64;
    let mut hosts = Vec::new();
    let mut id = 0u64;
    for t in types {
        let n = t.count.unwrap_or_else(|| {
            let share = demand_vcpus as f64 * headroom / auto.max(1.0);
            ((share / t.vcpus as f64).ceil() as u64).clamp(1, MAX_FLEET_HOSTS)
        });
        for _ in 0..n {
            let mut r = Resources::cpu_mem(t.vcpus, t.mem_gib * 1024);
            let mut h = Host::new(id, r);
            if let Some((g, model)) = &t.gpus {
                r.gpus = *g;
                h.capacity = r;
                h.gpu_model = Some(model.clone());
            }
            hosts.push(h);
            id += 1;
        }
    }
    hosts
}

/// A synthetic GPU instance: a mixed fleet where a fifth of the hosts carry GPUs of two
/// models, and VMs of which about 15 % need 1-4 GPUs of a given model.
pub fn synthetic_gpu(seed: u64, n_vms: usize) -> PlacementInput {
    let mut rng = SplitMix64::new(seed);
    let mut vms = Vec::with_capacity(n_vms);
    let mut cpu_total = 0;
    let mut gpu_demand = [0u64; 2];
    for i in 0..n_vms {
        let mut vm;
        if rng.unit() < 0.15 {
            let g = 1 + rng.below(4);
            let cpu = 4 * g + 4 * rng.below(3);
            vm = Vm::new(i as u64, Resources::cpu_mem(cpu, cpu * 6 * 1024));
            vm.demand.gpus = g;
            let m = rng.below(2) as usize;
            gpu_demand[m] += g;
            vm.gpu_model = Some(["a100", "l4"][m].into());
        } else {
            let cpu = 1 << rng.below(4);
            let per = [2, 4, 8][rng.below(3) as usize];
            vm = Vm::new(i as u64, Resources::cpu_mem(cpu, cpu * per * 1024));
            cpu_total += cpu;
        }
        vms.push(vm);
    }
    // GPU hosts: 1.5x the GPUs asked per model; plain hosts: 1.6x the other VMs' CPU.
    let types = [
        HostType {
            vcpus: 64,
            mem_gib: 256,
            gpus: None,
            count: None,
        },
        HostType {
            vcpus: 96,
            mem_gib: 384,
            gpus: None,
            count: None,
        },
        HostType {
            vcpus: 48,
            mem_gib: 384,
            gpus: Some((4, "a100".into())),
            count: Some((gpu_demand[0] * 3).div_ceil(8).max(1)),
        },
        HostType {
            vcpus: 48,
            mem_gib: 256,
            gpus: Some((8, "l4".into())),
            count: Some((gpu_demand[1] * 3).div_ceil(16).max(1)),
        },
    ];
    let hosts = build_fleet(&types, cpu_total, 1.6);
    PlacementInput {
        hosts,
        vms,
        rules: vec![],
        config: PlacementConfig::default(),
    }
}

/// A synthetic affinity-heavy instance: services of 2-6 replicas kept apart (hard
/// anti-affinity), sidecar pairs kept together (hard affinity), some VMs pinned to
/// labelled hosts, and soft anti-affinity across a few services.
pub fn synthetic_affinity(seed: u64, n_vms: usize) -> PlacementInput {
    let mut rng = SplitMix64::new(seed);
    let mut vms = Vec::with_capacity(n_vms);
    let mut rules = Vec::new();
    let mut id = 0u64;
    let mut cpu_total = 0;
    let mut rule_no = 0;
    let mut next_rule = |kind: &str| {
        rule_no += 1;
        RuleId(format!("{kind}-rule-{rule_no}"))
    };
    while vms.len() < n_vms {
        let replicas = (2 + rng.below(5)).min((n_vms - vms.len()) as u64).max(1);
        let cpu = 1 << rng.below(4);
        let mem = cpu * [2, 4, 7][rng.below(3) as usize] * 1024;
        let mut group = Vec::new();
        for _ in 0..replicas {
            vms.push(Vm::new(id, Resources::cpu_mem(cpu, mem)));
            group.push(crate::model::VmId(id));
            cpu_total += cpu;
            id += 1;
            // Sidecar pair: a small VM that must share the replica's host.
            if vms.len() < n_vms && rng.unit() < 0.3 {
                vms.push(Vm::new(id, Resources::cpu_mem(1, 1024)));
                rules.push(Rule {
                    id: next_rule("affinity"),
                    kind: RuleKind::VmAffinity {
                        vms: vec![crate::model::VmId(id - 1), crate::model::VmId(id)],
                    },
                    hard: true,
                });
                cpu_total += 1;
                id += 1;
            }
        }
        if group.len() > 1 {
            let hard = rng.unit() < 0.8;
            rules.push(Rule {
                id: next_rule("anti-affinity"),
                kind: RuleKind::VmAntiAffinity { vms: group.clone() },
                hard,
            });
        }
        if rng.unit() < 0.1 {
            rules.push(Rule {
                id: next_rule("label"),
                kind: RuleKind::Host {
                    vm: group[0],
                    target: HostMatch::Label("ssd".into()),
                    affine: true,
                },
                hard: true,
            });
        }
    }
    let types = [
        HostType {
            vcpus: 48,
            mem_gib: 192,
            gpus: None,
            count: None,
        },
        HostType {
            vcpus: 64,
            mem_gib: 256,
            gpus: None,
            count: None,
        },
    ];
    let mut hosts = build_fleet(&types, cpu_total, 1.6);
    // Replicas need distinct hosts: keep at least 12 whatever the size.
    while hosts.len() < 12 {
        let id = hosts.len() as u64;
        hosts.push(Host::new(id, Resources::cpu_mem(48, 192 * 1024)));
    }
    for (i, h) in hosts.iter_mut().enumerate() {
        if i % 3 == 0 {
            h.labels = BTreeSet::from(["ssd".to_owned()]);
        }
    }
    PlacementInput {
        hosts,
        vms,
        rules,
        config: PlacementConfig::default(),
    }
}

/// Keeps `n` VMs drawn at random (seeded), renumbered from 0.
pub fn subsample(vms: &[Vm], n: usize, seed: u64) -> Vec<Vm> {
    let mut idx: Vec<usize> = (0..vms.len()).collect();
    SplitMix64::new(seed).shuffle(&mut idx);
    idx.truncate(n);
    idx.sort_unstable();
    idx.iter()
        .enumerate()
        .map(|(i, &j)| Vm {
            id: crate::model::VmId(i as u64),
            ..vms[j].clone()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "arrival_bin_end_s,tenant_batch_id,flavor,vcpus,mem_gb,duration_bin,censored,duration_bin_lo_s,duration_bin_hi_s
1800000,0,m,8,14,1,0,300,300
1800000,1,a,1,0.75,4,0,1200,1200
1800300,2,o,8,56,13,1,3900,7200
";

    #[test]
    fn parses_and_snapshots() {
        let r = parse_azure_csv(CSV).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[1].mem_mib, 768);
        assert!(r[2].censored);
        assert_eq!(snapshot(&r, 1_800_000).len(), 2);
        // After 300 s the first VM is gone; the censored one stays forever.
        assert_eq!(snapshot(&r, 1_800_400).len(), 2);
        assert_eq!(snapshot(&r, 9_999_999).len(), 1);
        assert_eq!(snapshot_times(&r, 2), vec![1_800_150, 1_800_300]);
    }

    #[test]
    fn bad_csv_is_an_error() {
        assert_eq!(
            parse_azure_csv("a,b\n1,2\n"),
            Err(WorkloadError::MissingColumn("arrival_bin_end_s"))
        );
        let bad = CSV.replace("0.75", "x");
        assert!(matches!(
            parse_azure_csv(&bad),
            Err(WorkloadError::BadLine { line: 3, .. })
        ));
        let short = format!("{CSV}1800000,0\n");
        assert!(matches!(
            parse_azure_csv(&short),
            Err(WorkloadError::BadLine { line: 5, .. })
        ));
    }

    #[test]
    fn fleet_spec() {
        let t = parse_fleet("48c/192G:2, 96c/384G, 48c/384G/4xa100:1").unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t[2].gpus, Some((4, "a100".into())));
        let hosts = build_fleet(&t, 960, 1.0);
        // 2 fixed + ceil(960/96)=10 auto + 1 fixed GPU host.
        assert_eq!(hosts.len(), 13);
        assert_eq!(hosts[12].capacity.gpus, 4);
        assert!(parse_fleet("48/192G").is_err());
        assert!(parse_fleet("").is_err());
        assert!(parse_fleet("48c/192G:99999999999").is_err());
    }

    #[test]
    fn synthetic_instances_are_deterministic() {
        assert_eq!(synthetic_gpu(3, 200), synthetic_gpu(3, 200));
        let a = synthetic_affinity(3, 200);
        assert_eq!(a.vms.len(), 200);
        assert!(!a.rules.is_empty());
    }
}
