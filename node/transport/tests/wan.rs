//! AMST over the WAN emulator (real namespaces, TUNs and kernel TCP; needs root): a lossy,
//! delayed link that drops for two seconds while one connection is killed midway.
#![cfg(feature = "io")]
// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use dwcp_transport::Config;
use dwcp_transport::fault::KillFirstConnection;
use dwcp_transport::io::{self, TcpAcceptor, TcpConnector};
use dwcp_wan::{Emulator, EmulatorConfig, Profile, host_addr, in_namespace};

fn data(len: usize) -> Vec<u8> {
    let mut x = 0xDEAD_BEEF_u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Runs the future `make` builds on a current-thread runtime in host `host`'s namespace.
fn run_in<T, F>(
    emu: &Emulator,
    host: usize,
    make: impl FnOnce() -> F + Send + 'static,
) -> std::thread::JoinHandle<T>
where
    F: std::future::Future<Output = T>,
    T: Send + 'static,
{
    in_namespace(emu.namespace(host), move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(make())
    })
    .unwrap()
}

/// Starts a receiver in host 1's namespace listening on `addr`; returns once it listens. The
/// handle yields the bytes received and what was written to the sink.
fn spawn_receiver(
    emu: &Emulator,
    addr: std::net::SocketAddr,
    cfg: Config,
) -> std::thread::JoinHandle<(Result<u64, io::IoError>, Vec<u8>)> {
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let receiver = run_in(emu, 1, move || async move {
        let l = tokio::net::TcpListener::bind(addr).await.unwrap();
        ready_tx.send(()).unwrap();
        let mut sink = Vec::new();
        let r = io::receive(TcpAcceptor(l), cfg, None, |_| true, &mut sink).await;
        (r.map(|r| r.bytes), sink)
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    receiver
}

#[test]
fn survives_a_killed_connection_and_a_link_outage_on_an_emulated_wan() {
    let emu = Emulator::start(EmulatorConfig {
        hosts: 2,
        profile: Profile::parse("rate=100mbit,rtt=20ms,loss=0.5%").unwrap(),
        seed: 3,
    })
    .expect("emulator (root needed)");
    let cfg = Config {
        chunk_size: 64 * 1024,
        window_bytes: 4 << 20,
        stall_timeout: 1_000_000,
        ..Config::default()
    };
    let src = Arc::new(data(24 << 20));
    let addr = std::net::SocketAddr::from((host_addr(1), 7300));
    let receiver = spawn_receiver(&emu, addr, cfg.clone());
    let s2 = Arc::clone(&src);
    let sender = run_in(&emu, 0, move || async move {
        let conn = Arc::new(KillFirstConnection::new(
            TcpConnector {
                addr,
                congestion: Some("bbr".into()),
            },
            1 << 20,
        ));
        io::send(conn, cfg, [5; 16], &s2[..], None)
            .await
            .map(|r| r.progress)
    });
    std::thread::sleep(Duration::from_millis(800));
    emu.set_partitioned(0, 1, true).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    emu.set_partitioned(0, 1, false).unwrap();
    let progress = sender.join().unwrap().expect("sender completes");
    let (bytes, sink) = receiver.join().unwrap();
    assert_eq!(bytes.expect("receiver completes"), src.len() as u64);
    assert!(sink == *src, "payload differs");
    // The killed connection's chunks (and the outage's) were sent again.
    assert!(progress.unwrap().resent_chunks > 0);
    assert!(emu.stats(0, 1).unwrap().dropped_partition > 0);
}

#[test]
fn path_statistics_measure_the_emulated_loss_and_delay() {
    // 2 % random loss each way and a 20 ms RTT: every stream's TCP_INFO (through sock_diag)
    // must show retransmissions near the loss rate and an RTT of at least the link's.
    let emu = Emulator::start(EmulatorConfig {
        hosts: 2,
        profile: Profile::parse("rate=100mbit,rtt=20ms,loss=2%").unwrap(),
        seed: 11,
    })
    .expect("emulator (root needed)");
    let cfg = Config {
        chunk_size: 64 * 1024,
        window_bytes: 4 << 20,
        ..Config::default()
    };
    let src = Arc::new(data(24 << 20));
    let addr = std::net::SocketAddr::from((host_addr(1), 7301));
    let receiver = spawn_receiver(&emu, addr, cfg.clone());
    let s2 = Arc::clone(&src);
    let sender = run_in(&emu, 0, move || async move {
        let (tx, mut rx) = tokio::sync::watch::channel(dwcp_transport::Progress::default());
        let seen = tokio::spawn(async move {
            // (loss, rtt_us) of every stream snapshot that carries path statistics.
            let mut seen = Vec::new();
            while rx.changed().await.is_ok() {
                for s in &rx.borrow().streams {
                    if let (Some(l), Some(r)) = (s.path_loss, s.path_rtt_us) {
                        seen.push((l, r));
                    }
                }
            }
            seen
        });
        let conn = Arc::new(TcpConnector {
            addr,
            congestion: Some("cubic".into()),
        });
        let r = io::send(conn, cfg, [6; 16], &s2[..], Some(tx)).await;
        (r.map(|r| r.bytes), seen.await.unwrap())
    });
    let (sent, seen) = sender.join().unwrap();
    assert_eq!(sent.expect("sender completes"), src.len() as u64);
    let (received, sink) = receiver.join().unwrap();
    assert_eq!(received.expect("receiver completes"), src.len() as u64);
    assert!(sink == *src, "payload differs");
    assert!(
        !seen.is_empty(),
        "no path statistics reached the sender core"
    );
    let mean_loss = seen.iter().map(|(l, _)| l).sum::<f64>() / seen.len() as f64;
    let min_rtt_us = seen.iter().map(|(_, r)| *r).min().unwrap();
    eprintln!(
        "{} snapshots: mean loss {:.2} %, min RTT {:.1} ms",
        seen.len(),
        mean_loss * 100.0,
        min_rtt_us as f64 / 1000.0
    );
    assert!(
        (0.005..0.15).contains(&mean_loss),
        "mean loss {mean_loss} for a 2 % link"
    );
    assert!(min_rtt_us >= 18_000, "RTT {min_rtt_us} us on a 20 ms link");
}
