//! AMST over the WAN emulator (real namespaces, TUNs and kernel TCP; needs root): a lossy,
//! delayed link that drops for two seconds while one connection is killed midway.
#![cfg(feature = "io")]

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
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let rcfg = cfg.clone();
    let receiver = in_namespace(emu.namespace(1), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind(addr).await.unwrap();
            ready_tx.send(()).unwrap();
            let mut sink = Vec::new();
            let r = io::receive(TcpAcceptor(l), rcfg, None, |_| true, &mut sink).await;
            (r.map(|r| r.bytes), sink)
        })
    })
    .unwrap();
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let s2 = Arc::clone(&src);
    let sender = in_namespace(emu.namespace(0), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
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
        })
    })
    .unwrap();
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
