//! The tokio shell over real TCP connections on loopback: bit-exact delivery, a stream
//! killed midway, and a refused sender.
#![cfg(feature = "io")]

use std::sync::Arc;

use dwcp_transport::fault::KillFirstConnection;
use dwcp_transport::io::{self, Acceptor, Connector, TcpAcceptor, TcpConnector};
use dwcp_transport::{Config, TransferError};

fn data(len: usize) -> Vec<u8> {
    let mut x = 0x1234_5678_9abc_def0u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn cfg() -> Config {
    Config {
        chunk_size: 64 * 1024,
        window_bytes: 4 << 20,
        ..Config::default()
    }
}

async fn listener() -> (TcpAcceptor, std::net::SocketAddr) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let a = l.local_addr().expect("local addr");
    (TcpAcceptor(l), a)
}

async fn transfer(
    connector: Arc<dyn Connector>,
    acceptor: impl Acceptor,
    cfg: Config,
    src: Vec<u8>,
) -> (
    Result<io::Report, io::IoError>,
    Result<io::Report, io::IoError>,
    Vec<u8>,
) {
    let recv_cfg = cfg.clone();
    let rx = tokio::spawn(async move {
        let mut sink = Vec::new();
        let r = io::receive(acceptor, recv_cfg, None, |_| true, &mut sink).await;
        (r, sink)
    });
    let tx = io::send(connector, cfg, [9; 16], &src[..], None).await;
    let (rr, sink) = rx.await.expect("receiver task");
    (tx, rr, sink)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_transfer_is_bit_exact_with_cubic_sockets() {
    let (acc, addr) = listener().await;
    let src = data(8 << 20);
    let conn = Arc::new(TcpConnector {
        addr,
        congestion: Some("cubic".into()),
    });
    let (tx, rx, sink) = transfer(conn, acc, cfg(), src.clone()).await;
    let tx = tx.unwrap();
    assert_eq!(tx.bytes, src.len() as u64);
    assert_eq!(rx.unwrap().bytes, src.len() as u64);
    assert!(sink == src, "payload differs");
    assert_eq!(tx.progress.unwrap().total, Some(src.len() as u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_congestion_controller_is_an_error_not_a_panic() {
    let (_acc, addr) = listener().await;
    let c = TcpConnector {
        addr,
        congestion: Some("no-such-cc".into()),
    };
    assert!(c.connect().await.is_err());
}

/// A connection that fails after a byte budget (one stream's connection killed midway).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_connection_midway_still_gives_bit_exact_data() {
    let (acc, addr) = listener().await;
    let src = data(16 << 20);
    let conn = Arc::new(KillFirstConnection::new(
        TcpConnector {
            addr,
            congestion: None,
        },
        1 << 20,
    ));
    let (tx, rx, sink) = transfer(conn, acc, cfg(), src.clone()).await;
    assert_eq!(tx.unwrap().bytes, src.len() as u64);
    rx.unwrap();
    assert!(sink == src, "payload differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthorised_sender_is_refused_and_fails_clearly() {
    let (acc, addr) = listener().await;
    let cfg = Config {
        resume_timeout: 1_500_000,
        ..cfg()
    };
    let recv_cfg = cfg.clone();
    let rx = tokio::spawn(async move {
        let mut sink = Vec::new();
        io::receive(acc, recv_cfg, None, |_| false, &mut sink).await
    });
    let conn = Arc::new(TcpConnector {
        addr,
        congestion: None,
    });
    let src = data(1 << 20);
    let r = io::send(conn, cfg, [1; 16], &src[..], None).await;
    match r {
        Err(io::IoError::Transfer(TransferError::ResumeTimeout { acked_offset, .. })) => {
            assert_eq!(acked_offset, 0)
        }
        other => panic!("expected a resume timeout, got {other:?}"),
    }
    // The receiver saw no stream either, so it gives up after its own resume timeout.
    let rr = rx.await.unwrap();
    assert!(matches!(
        rr,
        Err(io::IoError::Transfer(TransferError::ResumeTimeout { .. }))
    ));
}
