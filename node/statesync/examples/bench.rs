//! State-sync measurements: convergence, memory, whole-document size, catch-up and steady
//! sync traffic. Run with
//! `cargo run -p dwcp-statesync --release --features test-utils --example bench [-- --big]`
//! (`--only conv --big` runs the 10,000-node convergence instead of the 1,000-node ones).
// A benchmark binary, not part of the sans-IO core: it reads the wall clock to report how long
// the simulated runs took.
#![allow(clippy::disallowed_methods)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

use automerge::Change;
use dwcp_protocol::{
    DonatedShare, Health, HealthStatus, Heartbeat, NodeAnnouncement, Resources, Timestamp, VmId,
};
use dwcp_statesync::{
    ChangeHash, ClusterDoc, Config, VmDecision, VmSpec, VmState,
    fake::{FakeCommittee, fake_node_key},
    harness::{SimCluster, SimConfig},
};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts bytes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` was allocated by `System` with `l`.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

const T0: u64 = 1_800_000_000_000;

fn ann(i: u64) -> NodeAnnouncement {
    NodeAnnouncement {
        cluster_id: "bench".into(),
        seq: 1,
        issued_at: Timestamp(T0),
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

fn hb(seq: u64, at: u64) -> Heartbeat {
    Heartbeat {
        cluster_id: "bench".into(),
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

fn mib(b: usize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Convergence of one new change through `n` nodes; returns (p50, p99, max) ms after the
/// write, and the wall time.
fn convergence(
    n: usize,
    degree: usize,
    probe: bool,
    push: bool,
    nudges: bool,
    loss: f64,
) -> (u64, u64, u64, f64) {
    let committee = FakeCommittee::new(1);
    let engine = Config {
        probe_in_sync_peers: probe,
        push_on_round: push,
        ..Config::default()
    };
    let cfg = SimConfig {
        nodes: n,
        degree,
        seed: 42,
        loss,
        nudges,
        engine,
        cluster: "bench".into(),
        ..SimConfig::default()
    };
    let wall = Instant::now();
    let mut sim = SimCluster::new(cfg, &committee.verifier(), T0);
    sim.run_until(T0 + 3000);
    let now = Timestamp(sim.now());
    sim.engines[0]
        .write_announcement(now, &ann(0))
        .expect("write");
    sim.drain(0);
    let h: ChangeHash = sim.engines[0].doc().heads()[0];
    let start = sim.now();
    let mut got: Vec<Option<u64>> = vec![None; n];
    got[0] = Some(0);
    while got.iter().any(Option::is_none) && sim.now() - start < 60_000 {
        let t = sim.now() + 50;
        sim.run_until(t);
        for (i, g) in got.iter_mut().enumerate() {
            if g.is_none() && sim.engines[i].doc().has_change(&h) {
                *g = Some(sim.now() - start);
            }
        }
    }
    let mut t: Vec<u64> = got.iter().map(|g| g.unwrap_or(u64::MAX)).collect();
    t.sort_unstable();
    let p = |q: f64| t[((n as f64 - 1.0) * q).round() as usize];
    (p(0.5), p(0.99), t[n - 1], wall.elapsed().as_secs_f64())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let big = args.iter().any(|a| a == "--big");
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let want = |s: &str| only.as_deref().is_none_or(|o| o == s);
    let steady_nodes: usize = args
        .iter()
        .position(|a| a == "--nodes")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    // `--cert-bytes N`: VM certificates of N bytes (the real ones: ~1 KB at n = 4).
    let cert_bytes: usize = args
        .iter()
        .position(|a| a == "--cert-bytes")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    println!("# dwcp-statesync bench (virtual time; interval 1 s, fanout 6, latency 10-60 ms)\n");

    // 1. Convergence of one change.
    if want("conv") {
        println!(
            "## Convergence of one new change (ms after the write; target: all within 5 s = 5 rounds)\n"
        );
        println!(
            "| nodes | connections/node | variant | loss | p50 ms | p99 ms | all ms | rounds (all) | wall s |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        type Run = (usize, usize, &'static str, bool, bool, bool, f64);
        let mut runs: Vec<Run> = vec![
            (1000, 20, "push only (baseline)", false, true, false, 0.0),
            (1000, 20, "push + probe", true, true, false, 0.0),
            (1000, 20, "probe-first (default)", true, false, false, 0.0),
            (1000, 20, "probe-first, 10% loss", true, false, false, 0.1),
            (
                1000,
                20,
                "probe-first + gossip nudge",
                true,
                false,
                true,
                0.0,
            ),
        ];
        if big {
            runs = vec![(10_000, 20, "probe-first (default)", true, false, false, 0.0)];
        }
        for (n, d, name, probe, push, nudges, loss) in runs {
            let (p50, p99, all, wall) = convergence(n, d, probe, push, nudges, loss);
            println!(
                "| {n} | {d} | {name} | {:.0}% | {p50} | {p99} | {all} | {:.1} | {wall:.1} |",
                loss * 100.0,
                all as f64 / 1000.0
            );
        }
    }

    // 2. Memory of 10,000 VMs + 1,000 nodes.
    if want("mem") {
        println!(
            "\n## State of 1,000 nodes + 10,000 VMs (target <= 20 MB; manual: ~100 MB per 10,000 VMs)\n"
        );
        let committee = FakeCommittee::with_certificate_bytes(2, cert_bytes);
        let v = committee.verifier();
        let mut changes: Vec<Change> = Vec::new();
        let mut sigs = std::collections::BTreeMap::new();
        let wall = Instant::now();
        let mut hosts = Vec::new();
        for i in 0..1000u64 {
            let mut d = ClusterDoc::new(fake_node_key(i), "bench", 1).expect("doc");
            d.write_announcement(Timestamp(T0), &ann(i)).expect("ann");
            d.write_heartbeat(Timestamp(T0 + 1), &hb(1, T0 + 1))
                .expect("hb");
            hosts.push(d.node_id());
            for c in d.automerge().get_changes(&[]) {
                if let Some(s) = d.signature(&c.hash()) {
                    sigs.insert(c.hash(), *s);
                    changes.push(c);
                }
            }
        }
        let mut writer = ClusterDoc::new(fake_node_key(5000), "bench", 1).expect("doc");
        let mut cert_len = 0;
        for i in 0..10_000u32 {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&i.to_be_bytes());
            let d = VmDecision {
                vm: VmId::from_bytes(b),
                decision_seq: u64::from(i) + 1,
                spec: VmSpec {
                    vcpus: 2,
                    memory_mib: 4096,
                    disk_gib: 40,
                },
                host: Some(hosts[(i % 1000) as usize]),
                state: VmState::Running,
            };
            let c = committee.certify_vm(d);
            cert_len = c.certificate.len();
            writer.write_vm(Timestamp(T0 + 2), &c, &v).expect("vm");
        }
        for c in writer.automerge().get_changes(&[]) {
            if let Some(s) = writer.signature(&c.hash()) {
                sigs.insert(c.hash(), *s);
                changes.push(c);
            }
        }
        let change_bytes: usize = changes.iter().map(|c| c.raw_bytes().len()).sum();
        let n_changes = changes.len();
        let mut full = ClusterDoc::new(fake_node_key(9000), "bench", 1).expect("doc");
        let t = Instant::now();
        let r = full.ingest(changes, &sigs, &v).expect("ingest");
        let ingest_s = t.elapsed().as_secs_f64();
        assert!(
            r.rejected.is_empty() && r.deferred == 0,
            "{:?}",
            r.rejected.first()
        );
        let saved = full.save();
        let export = full.export();
        let build_s = wall.elapsed().as_secs_f64();
        drop(full);
        drop(writer);
        drop(sigs);
        let before = LIVE.load(Ordering::Relaxed);
        let t = Instant::now();
        let loaded = ClusterDoc::load(fake_node_key(9000), "bench", &saved).expect("load");
        let load_s = t.elapsed().as_secs_f64();
        let mem_history = LIVE.load(Ordering::Relaxed) - before;
        let st = loaded.stats();
        let view = loaded.view();
        let t = Instant::now();
        let sum = loaded.state_checksum();
        let checksum_ms = t.elapsed().as_secs_f64() * 1000.0;
        // After compaction: one base change holding the same state.
        let mut compacted = ClusterDoc::load(fake_node_key(9000), "bench", &saved).expect("load");
        let cut = dwcp_statesync::EpochCut {
            epoch: 1,
            heads: compacted.heads(),
            departed_before_ms: 0,
        };
        let t = Instant::now();
        compacted
            .compact(Timestamp(T0 + 10), &cut, &v)
            .expect("compact");
        let compact_s = t.elapsed().as_secs_f64();
        let compact_saved = compacted.save();
        drop(compacted);
        let before = LIVE.load(Ordering::Relaxed);
        let compacted =
            ClusterDoc::load(fake_node_key(9000), "bench", &compact_saved).expect("load");
        let mem_compacted = LIVE.load(Ordering::Relaxed) - before;
        // The same state, its records without certificates (the cut certifies the snapshot).
        let mut expected = view.clone();
        for r in expected.vms.values_mut() {
            r.certificate.clear();
        }
        for r in expected.quarantine.values_mut() {
            r.certificate.clear();
        }
        assert_eq!(compacted.view(), expected);
        println!("| measure | value |");
        println!("|---|---|");
        println!(
            "| nodes / VMs in the view | {} / {} |",
            view.nodes.len(),
            view.vms.len()
        );
        println!("| VM certificate size | {cert_len} B |");
        println!("| changes / ops in history | {} / {} |", st.changes, st.ops);
        println!(
            "| memory, document with full history (loaded) | {:.2} MB |",
            mib(mem_history)
        );
        println!(
            "| memory, after compaction (loaded) | {:.2} MB |",
            mib(mem_compacted)
        );
        println!(
            "| save file, full history (doc + {} signatures) | {:.2} MB |",
            st.signatures,
            mib(saved.len())
        );
        println!(
            "| save file, compacted | {:.2} MB |",
            mib(compact_saved.len())
        );
        println!(
            "| plain Automerge export (= Automerge's whole-document sync message) | {:.2} MB |",
            mib(export.len())
        );
        println!(
            "| sum of individual changes | {:.2} MB ({} changes) |",
            mib(change_bytes),
            n_changes
        );
        println!(
            "| build + ingest 11,000 signed changes | {build_s:.1} s (ingest {ingest_s:.1} s) |"
        );
        println!("| load full history / compact | {load_s:.2} s / {compact_s:.2} s |");
        println!(
            "| state checksum | {checksum_ms:.0} ms ({}) |",
            hex(&sum[..4])
        );
        drop(compacted);

        // 3. Catch-up of a fresh node from the full document, messages bounded to 512 KiB.
        println!("\n## Fresh node catching up with that document (max message 512 KiB)\n");
        let engine = Config {
            probe_in_sync_peers: true,
            ..Config::default()
        };
        let cfg = SimConfig {
            nodes: 2,
            degree: 1,
            seed: 3,
            engine,
            cluster: "bench".into(),
            ..SimConfig::default()
        };
        let mut sim = SimCluster::new(cfg, &v, T0);
        // Node 0 becomes the holder of the full document (under its own key: reload it).
        let holder = ClusterDoc::load(fake_node_key(9000), "bench", &saved).expect("load");
        drop(loaded);
        sim.set_doc(0, holder, &v);
        let start = sim.now();
        let t = Instant::now();
        let done = sim.run_until_pred(100, 120_000, |s| s.converged(&[0, 1]));
        let s0 = sim.engines[0].stats();
        println!("| measure | value |");
        println!("|---|---|");
        println!(
            "| virtual time to equal heads | {} ms |",
            done.map_or("not converged".to_string(), |d| d.to_string())
        );
        println!(
            "| frames sent by holder | {} ({} truncated to the limit) |",
            s0.frames_sent, s0.messages_truncated
        );
        println!(
            "| bytes sent by holder | {:.2} MB |",
            mib(s0.bytes_sent as usize)
        );
        println!(
            "| largest frame | {} bytes (limit {}) |",
            s0.max_frame_sent,
            512 * 1024
        );
        println!("| wall time | {:.1} s |", t.elapsed().as_secs_f64());
        let _ = start;
    }

    // 4. Steady-state traffic.
    if !want("steady") {
        return;
    }
    let v = FakeCommittee::new(2).verifier();
    println!(
        "\n## Steady state: bytes per node per second ({steady_nodes} nodes, 20 connections, heartbeat written every 10 s)\n"
    );
    println!("| variant | sent B/node/s | frames/node/s | wall s |");
    println!("|---|---|---|---|");
    for (name, probe, push, nudges, writes) in [
        ("idle, probes", true, false, false, false),
        (
            "heartbeats, probe-first (default)",
            true,
            false,
            false,
            true,
        ),
        (
            "heartbeats, probe-first + gossip nudges",
            true,
            false,
            true,
            true,
        ),
        ("heartbeats, push + probe", true, true, false, true),
        ("heartbeats, push only (baseline)", false, true, false, true),
    ] {
        let engine = Config {
            probe_in_sync_peers: probe,
            push_on_round: push,
            ..Config::default()
        };
        let n = steady_nodes;
        let wall = Instant::now();
        let cfg = SimConfig {
            nodes: n,
            degree: 20,
            seed: 8,
            nudges,
            engine,
            cluster: "bench".into(),
            ..SimConfig::default()
        };
        let mut sim = SimCluster::new(cfg, &v, T0);
        for i in 0..n {
            let now = Timestamp(sim.now());
            sim.engines[i]
                .write_announcement(now, &ann(i as u64))
                .expect("ann");
            sim.drain(i);
        }
        sim.run_until(T0 + 20_000);
        sim.frame_log = Some(Vec::new());
        let b0 = sim.bytes_delivered;
        let f0 = sim.frames_delivered;
        let t0 = sim.now();
        let secs = 20;
        for s in 0..secs {
            if writes {
                // Each node writes one heartbeat per 10 s, spread over the interval.
                for i in (0..n).filter(|i| (i + s) % 10 == 0) {
                    let now = Timestamp(sim.now());
                    sim.engines[i]
                        .write_heartbeat(now, &hb(s as u64 + 2, now.0))
                        .expect("hb");
                    sim.drain(i);
                }
            }
            let t = sim.now() + 1000;
            sim.run_until(t);
        }
        let dt = (sim.now() - t0) as f64 / 1000.0;
        if std::env::var_os("DWCP_BENCH_FRAMES").is_some() {
            analyse_frames(name, sim.frame_log.take().unwrap_or_default());
        }
        println!(
            "| {name} | {:.0} | {:.1} | {:.1} |",
            (sim.bytes_delivered - b0) as f64 / n as f64 / dt,
            (sim.frames_delivered - f0) as f64 / n as f64 / dt,
            wall.elapsed().as_secs_f64()
        );
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Breaks delivered sync frames down into their parts (set DWCP_BENCH_FRAMES=1).
fn analyse_frames(name: &str, frames: Vec<Vec<u8>>) {
    let (mut probes, mut syncs, mut heads, mut need, mut have, mut changes, mut sigs, mut total) = (
        0usize, 0usize, 0usize, 0usize, 0usize, 0usize, 0usize, 0usize,
    );
    for f in &frames {
        total += f.len();
        match dwcp_statesync::Frame::decode(f, usize::MAX) {
            Ok(dwcp_statesync::Frame::Probe { .. }) => probes += 1,
            Ok(dwcp_statesync::Frame::Sync { sigs: s, msg, .. }) => {
                syncs += 1;
                sigs += s.len() * 96;
                if let Ok(m) = automerge::sync::Message::decode(&msg) {
                    heads += m.heads.len() * 32;
                    need += m.need.len() * 32;
                    have += m
                        .have
                        .iter()
                        .map(|h| h.last_sync.len() * 32 + h.bloom.to_bytes().len())
                        .sum::<usize>();
                    changes += m.changes.iter().map(<[u8]>::len).sum::<usize>();
                }
            }
            _ => {}
        }
    }
    eprintln!(
        "{name}: frames {} (probes {probes}, sync {syncs}); bytes {total}: heads {heads}, need {need}, have {have}, changes {changes}, sigs {sigs}",
        frames.len()
    );
}
