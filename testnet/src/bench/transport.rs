//! `dwcp-testnet bench transport`: AMST against single connections and iperf3 on emulated
//! WAN links (`dwcp-wan`: two network namespaces joined by the user-space link emulator).
//!
//! For each link it measures, in the same run and on the same emulator:
//! - AMST adaptive (4..16 streams, one TCP connection each) with BBR and with CUBIC sockets;
//! - AMST pinned to one stream (one connection: what a single libp2p stream gets);
//! - iperf3 `-P 1` and `-P 8` with CUBIC and with BBR (Debian's iperf3).
//!
//! Each figure is goodput as a fraction of the link rate over a fixed duration. AMST bytes
//! are checked against the generator as they arrive. CPU use of the whole process during the
//! AMST runs and of the emulator threads alone is reported too.
//!
//! The full grid is {100 Mbit/s, 1 Gbit/s} x RTT {20, 100, 200 ms} x loss {0, 0.1 %, 1 %};
//! `--rate 100mbit --rtt 100ms --loss 1%` runs one link.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use dwcp_transport::Config;
use dwcp_transport::fault::KillFirstConnection;
use dwcp_transport::io::{self, TcpAcceptor, TcpConnector};
use dwcp_transport::pattern::{CheckingSink, Pattern};
use dwcp_wan::{Emulator, EmulatorConfig, Profile, host_addr, in_namespace};
use serde::Serialize;

/// Arguments of `bench transport`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Link rate (one link instead of the grid), e.g. 100mbit.
    #[arg(long)]
    rate: Option<String>,
    /// Round-trip time, e.g. 100ms.
    #[arg(long)]
    rtt: Option<String>,
    /// Random loss per direction, e.g. 1%.
    #[arg(long)]
    loss: Option<String>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Skip the iperf3 baselines.
    #[arg(long)]
    no_iperf: bool,
    /// Run only the measurements whose name contains this text (e.g. "amst", "bbr").
    #[arg(long)]
    only: Option<String>,
    /// Instead of the grid: send this many MiB once while one stream's connection is killed
    /// midway and the link drops for `--drop-seconds`, then check the bytes.
    #[arg(long)]
    resilience_mib: Option<u64>,
    /// Length of the link outage in the resilience run.
    #[arg(long, default_value_t = 10)]
    drop_seconds: u64,
}

#[derive(Clone, Debug, Serialize)]
struct Measurement {
    what: String,
    goodput_mbps: f64,
    fraction: f64,
    /// Process CPU (cores) during the run, emulator included.
    process_cores: Option<f64>,
    /// Emulator threads' CPU (cores).
    emulator_cores: f64,
    /// Streams at the end (AMST only).
    streams: Option<usize>,
}

#[derive(Clone, Debug, Serialize)]
struct LinkResult {
    link: String,
    rate_mbps: f64,
    rtt_ms: f64,
    loss_percent: f64,
    results: Vec<Measurement>,
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("bench transport needs root (network namespaces and TUN devices)");
    }
    if let Some(mib) = args.resilience_mib {
        return resilience(&args, mib);
    }
    let links: Vec<(String, String, String)> = match (&args.rate, &args.rtt, &args.loss) {
        (None, None, None) => {
            let mut v = Vec::new();
            for rate in ["100mbit", "1gbit"] {
                for rtt in ["20ms", "100ms", "200ms"] {
                    for loss in ["0%", "0.1%", "1%"] {
                        v.push((rate.into(), rtt.into(), loss.into()));
                    }
                }
            }
            v
        }
        (r, t, l) => vec![(
            r.clone().unwrap_or_else(|| "100mbit".into()),
            t.clone().unwrap_or_else(|| "100ms".into()),
            l.clone().unwrap_or_else(|| "0%".into()),
        )],
    };
    let mut all = Vec::new();
    for (rate, rtt, loss) in links {
        let spec = format!("rate={rate},rtt={rtt},loss={loss}");
        let profile = Profile::parse(&spec).with_context(|| format!("profile {spec}"))?;
        let r = bench_link(&profile, &args).with_context(|| format!("link {spec}"))?;
        if !args.json {
            print_link(&r);
        }
        all.push(r);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        print_targets(&all);
    }
    Ok(())
}

fn bench_link(profile: &Profile, args: &Args) -> anyhow::Result<LinkResult> {
    let rate = profile
        .rate_bps()
        .context("the benchmark needs a rate-limited link")?;
    let emu = Emulator::start(EmulatorConfig {
        hosts: 2,
        profile: profile.clone(),
        seed: 42,
    })?;
    let secs = args.seconds;
    let mut results = Vec::new();
    // The last run is the node's own path: every stream a noise-authenticated libp2p
    // connection (`dwcp_net::amst`), encrypted, as `network speedtest` and migrations use.
    let amst_runs: [(&str, Option<usize>, &str, bool); 5] = [
        ("amst adaptive, bbr", None, "bbr", false),
        ("amst adaptive, cubic", None, "cubic", false),
        ("amst 1 stream, bbr", Some(1), "bbr", false),
        ("amst 1 stream, cubic", Some(1), "cubic", false),
        ("amst adaptive, bbr, noise", None, "bbr", true),
    ];
    let selected = |name: &str| args.only.as_ref().is_none_or(|o| name.contains(o.as_str()));
    for (i, (name, streams, cc, noise)) in amst_runs.into_iter().enumerate() {
        if !selected(name) {
            continue;
        }
        let port = 7100 + u16::try_from(i).unwrap_or(0);
        let m = run_amst(&emu, rate, secs, streams, cc, noise, port)
            .with_context(|| name.to_string())?;
        results.push(Measurement {
            what: name.into(),
            ..m
        });
    }
    if !args.no_iperf {
        let iperf_runs: [(&str, u32, &str); 4] = [
            ("iperf3 -P1 cubic", 1, "cubic"),
            ("iperf3 -P1 bbr", 1, "bbr"),
            ("iperf3 -P8 cubic", 8, "cubic"),
            ("iperf3 -P8 bbr", 8, "bbr"),
        ];
        for (i, (name, p, cc)) in iperf_runs.into_iter().enumerate() {
            if !selected(name) {
                continue;
            }
            let port = 5300 + u16::try_from(i).unwrap_or(0);
            let cpu0 = emu.cpu_seconds();
            let t0 = Instant::now();
            let bps = run_iperf(&emu, secs, p, cc, port).with_context(|| name.to_string())?;
            let emulator_cores = (emu.cpu_seconds() - cpu0) / t0.elapsed().as_secs_f64();
            results.push(Measurement {
                what: name.into(),
                goodput_mbps: bps / 1e6,
                fraction: bps / rate,
                process_cores: None,
                emulator_cores,
                streams: Some(p as usize),
            });
        }
    }
    let loss = profile.loss.mean() * 100.0;
    Ok(LinkResult {
        link: profile.name.clone(),
        rate_mbps: rate / 1e6,
        rtt_ms: profile.rtt_ns as f64 / 1e6,
        loss_percent: loss,
        results,
    })
}

fn run_iperf(emu: &Emulator, secs: u64, parallel: u32, cc: &str, port: u16) -> anyhow::Result<f64> {
    let mut server = emu
        .command(1, "iperf3")
        .args([
            "-s",
            "-1",
            "-B",
            &host_addr(1).to_string(),
            "-p",
            &port.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("start iperf3 server (apt-get install iperf3)")?;
    std::thread::sleep(Duration::from_millis(300));
    let out = emu
        .command(0, "iperf3")
        .args([
            "-c",
            &host_addr(1).to_string(),
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
            "-P",
            &parallel.to_string(),
            "-C",
            cc,
            "-J",
        ])
        .output()
        .context("run iperf3 client");
    let _ = server.kill();
    let _ = server.wait();
    let out = out?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    if let Some(e) = v.get("error") {
        bail!("iperf3: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 output without sum_received")
}

fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (get(11) + get(12)) / 100.0
}

fn run_amst(
    emu: &Emulator,
    rate_bps: f64,
    secs: u64,
    streams: Option<usize>,
    cc: &str,
    noise: bool,
    port: u16,
) -> anyhow::Result<Measurement> {
    let receiver_key = dwcp_net::amst::Keypair::generate_ed25519();
    let receiver_id = receiver_key.public().to_peer_id();
    let cfg = match streams {
        Some(n) => Config::default().with_fixed_streams(n),
        None => Config::default(),
    };
    let addr = std::net::SocketAddr::from((host_addr(1), port));
    let bytes = Arc::new(AtomicU64::new(0));
    let corrupt = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<anyhow::Result<()>>(1);
    let run_for = Duration::from_secs(secs);
    let recv_cfg = cfg.clone();
    let (b2, c2) = (Arc::clone(&bytes), Arc::clone(&corrupt));
    let receiver = in_namespace(emu.namespace(1), move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let l = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return Ok(());
                }
            };
            let _ = ready_tx.send(Ok(()));
            let mut sink = CheckingSink::new(0);
            sink.bytes = b2;
            sink.corrupt = c2;
            let budget = run_for + Duration::from_secs(3);
            let r = if noise {
                let acceptor = dwcp_net::amst::NoiseAcceptor::spawn(l, receiver_key);
                tokio::time::timeout(
                    budget,
                    io::receive(acceptor, recv_cfg, None, |_| true, sink),
                )
                .await
            } else {
                tokio::time::timeout(
                    budget,
                    io::receive(TcpAcceptor(l), recv_cfg, None, |_| true, sink),
                )
                .await
            };
            // Timing out is the normal end of a fixed-duration run.
            if let Ok(Err(e)) = r {
                return Err(e.into());
            }
            Ok(())
        })
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("receiver did not start")??;
    let cc = cc.to_string();
    let (p_tx, p_rx) = tokio::sync::watch::channel(dwcp_transport::Progress::default());
    let cpu0 = process_cpu_seconds();
    let emu0 = emu.cpu_seconds();
    let t0 = Instant::now();
    let start_bytes = bytes.load(Ordering::Relaxed);
    let sender = in_namespace(emu.namespace(0), move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let conn: Arc<dyn io::Connector> = if noise {
                Arc::new(dwcp_net::amst::AmstConnector {
                    keypair: dwcp_net::amst::Keypair::generate_ed25519(),
                    peer: receiver_id,
                    addr,
                    congestion: Some(cc),
                    transfer: [7; 16],
                })
            } else {
                Arc::new(TcpConnector {
                    addr,
                    congestion: Some(cc),
                })
            };
            let r = tokio::time::timeout(
                run_for,
                io::send(conn, cfg, [7; 16], Pattern::new(0, u64::MAX), Some(p_tx)),
            )
            .await;
            if let Ok(Err(e)) = r {
                return Err(e.into());
            }
            Ok(())
        })
    })?;
    // Sample the sink exactly at the end of the run (DWCP_BENCH_TRACE=1 prints progress).
    if std::env::var_os("DWCP_BENCH_TRACE").is_some() {
        while t0.elapsed() + Duration::from_millis(500) < run_for {
            std::thread::sleep(Duration::from_millis(500));
            eprintln!("{:>5.1}s {:?}", t0.elapsed().as_secs_f64(), *p_rx.borrow());
        }
    }
    std::thread::sleep(run_for.saturating_sub(t0.elapsed()));
    let got = bytes.load(Ordering::Relaxed) - start_bytes;
    let elapsed = t0.elapsed().as_secs_f64();
    let process_cores = (process_cpu_seconds() - cpu0) / elapsed;
    let emulator_cores = (emu.cpu_seconds() - emu0) / elapsed;
    let streams_now = p_rx.borrow().streams_active;
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
    if corrupt.load(Ordering::Relaxed) {
        bail!("received bytes differ from the source");
    }
    let bps = got as f64 * 8.0 / elapsed;
    Ok(Measurement {
        what: String::new(),
        goodput_mbps: bps / 1e6,
        fraction: bps / rate_bps,
        process_cores: Some(process_cores),
        emulator_cores,
        streams: Some(streams_now),
    })
}

fn print_link(r: &LinkResult) {
    println!(
        "\nlink {:>6.0} Mbit/s  rtt {:>4.0} ms  loss {:>4.2} %",
        r.rate_mbps, r.rtt_ms, r.loss_percent
    );
    println!(
        "  {:<24} {:>10} {:>9} {:>8} {:>10} {:>9}",
        "what", "Mbit/s", "of link", "streams", "proc CPU", "emu CPU"
    );
    for m in &r.results {
        println!(
            "  {:<24} {:>10.1} {:>8.1}% {:>8} {:>10} {:>9.2}",
            m.what,
            m.goodput_mbps,
            m.fraction * 100.0,
            m.streams.map_or("-".into(), |s| s.to_string()),
            m.process_cores.map_or("-".into(), |c| format!("{c:.2}")),
            m.emulator_cores
        );
    }
}

fn print_targets(all: &[LinkResult]) {
    let find = |r: &LinkResult, w: &str| r.results.iter().find(|m| m.what == w).map(|m| m.fraction);
    for r in all {
        let (Some(amst), cubic8) = (find(r, "amst adaptive, bbr"), find(r, "iperf3 -P8 cubic"))
        else {
            continue;
        };
        if (r.rate_mbps - 100.0).abs() < 1.0
            && (r.rtt_ms - 100.0).abs() < 1.0
            && (r.loss_percent - 1.0).abs() < 0.01
        {
            println!(
                "\ntarget 100 Mbit/s, 100 ms, 1 %: AMST {:.1} % of link (>= 80 %: {}); vs iperf3 -P8 cubic: {}",
                amst * 100.0,
                amst >= 0.8,
                cubic8.map_or("not measured".into(), |c| format!(
                    "{:.2}x (>= 1.2x: {})",
                    amst / c,
                    amst >= 1.2 * c
                ))
            );
        }
        if (r.rate_mbps - 1000.0).abs() < 1.0
            && (r.rtt_ms - 20.0).abs() < 1.0
            && r.loss_percent == 0.0
        {
            println!(
                "target 1 Gbit/s, 20 ms, clean: AMST {:.1} % of link (>= 80 %: {})",
                amst * 100.0,
                amst >= 0.8
            );
        }
    }
}

#[derive(Debug, Serialize)]
struct ResilienceResult {
    link: String,
    bytes: u64,
    received: u64,
    bit_exact: bool,
    killed_connection_after_bytes: u64,
    outage_seconds: u64,
    elapsed_seconds: f64,
    goodput_mbps: f64,
    resent_chunks: u64,
}

fn resilience(args: &Args, mib: u64) -> anyhow::Result<()> {
    let spec = format!(
        "rate={},rtt={},loss={}",
        args.rate.as_deref().unwrap_or("1gbit"),
        args.rtt.as_deref().unwrap_or("20ms"),
        args.loss.as_deref().unwrap_or("0%")
    );
    let profile = Profile::parse(&spec)?;
    let emu = Emulator::start(EmulatorConfig {
        hosts: 2,
        profile: profile.clone(),
        seed: 42,
    })?;
    let total = mib << 20;
    let kill_after = total / 16;
    let addr = std::net::SocketAddr::from((host_addr(1), 7200));
    let bytes = Arc::new(AtomicU64::new(0));
    let corrupt = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<anyhow::Result<()>>(1);
    let (b2, c2) = (Arc::clone(&bytes), Arc::clone(&corrupt));
    let receiver = in_namespace(emu.namespace(1), move || -> anyhow::Result<u64> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind(addr).await;
            let l = match l {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return Ok(0);
                }
            };
            let mut sink = CheckingSink::new(0);
            sink.bytes = b2;
            sink.corrupt = c2;
            let r = io::receive(TcpAcceptor(l), Config::default(), None, |_| true, sink).await?;
            Ok(r.bytes)
        })
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("receiver did not start")??;
    let t0 = Instant::now();
    let (p_tx, p_rx) = tokio::sync::watch::channel(dwcp_transport::Progress::default());
    let sender = in_namespace(emu.namespace(0), move || -> anyhow::Result<io::Report> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let conn = Arc::new(KillFirstConnection::new(
                TcpConnector {
                    addr,
                    congestion: Some("bbr".into()),
                },
                usize::try_from(kill_after).unwrap_or(usize::MAX),
            ));
            Ok(io::send(
                conn,
                Config::default(),
                [3; 16],
                Pattern::new(0, total),
                Some(p_tx),
            )
            .await?)
        })
    })?;
    // Cut the link once a third of the data arrived, for `drop_seconds`.
    while bytes.load(Ordering::Relaxed) < total / 3 && !sender.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
    }
    emu.set_partitioned(0, 1, true)?;
    eprintln!(
        "link cut at {:.1}s after {} MiB",
        t0.elapsed().as_secs_f64(),
        bytes.load(Ordering::Relaxed) >> 20
    );
    std::thread::sleep(Duration::from_secs(args.drop_seconds));
    emu.set_partitioned(0, 1, false)?;
    eprintln!("link restored at {:.1}s", t0.elapsed().as_secs_f64());
    let report = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender thread panicked"))?;
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
    let report = report?;
    let elapsed = t0.elapsed().as_secs_f64();
    let res = ResilienceResult {
        link: spec,
        bytes: total,
        received,
        bit_exact: received == total && !corrupt.load(Ordering::Relaxed),
        killed_connection_after_bytes: kill_after,
        outage_seconds: args.drop_seconds,
        elapsed_seconds: elapsed,
        goodput_mbps: total as f64 * 8.0 / elapsed / 1e6,
        resent_chunks: report
            .progress
            .map_or(p_rx.borrow().resent_chunks, |p| p.resent_chunks),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&res)?);
    } else {
        println!(
            "resilience on {}: {} MiB, connection 0 killed after {} MiB, link down {} s: \
             received {} bytes, bit-exact {}, {:.1} s ({:.1} Mbit/s incl. the outage), {} chunks resent",
            res.link,
            mib,
            kill_after >> 20,
            res.outage_seconds,
            res.received,
            res.bit_exact,
            res.elapsed_seconds,
            res.goodput_mbps,
            res.resent_chunks
        );
    }
    if !res.bit_exact {
        bail!("transfer was not bit-exact");
    }
    Ok(())
}
