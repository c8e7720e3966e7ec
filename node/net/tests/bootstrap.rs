//! A node whose bootstrap peers cannot be reached says so in its log, with the dial error,
//! instead of only ever reporting that it has no peers.
#![allow(clippy::unwrap_used)]

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use dwcp_net::{Multiaddr, NetConfig, Role};
use libp2p::identity::Keypair;
use tracing_subscriber::fmt::MakeWriter;

/// Log lines written by the test's subscriber.
#[derive(Clone, Default)]
struct CapturedLog(Arc<Mutex<Vec<u8>>>);

impl CapturedLog {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for CapturedLog {
    type Writer = CapturedLog;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn node_config(bootstrap: Vec<Multiaddr>) -> NetConfig {
    let mut config = NetConfig::new(Keypair::generate_ed25519(), Role::Node);
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    config.bootstrap = bootstrap;
    config
}

async fn log_after(config: NetConfig, wait: Duration, want: &str) -> String {
    let log = CapturedLog::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(log.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    // Thread-local: the current-thread runtime polls the event loop on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);
    let (client, _events, event_loop) = dwcp_net::new(config).unwrap();
    let task = tokio::spawn(event_loop.run());
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline && !log.text().contains(want) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(client);
    task.abort();
    log.text()
}

#[tokio::test(flavor = "current_thread")]
async fn an_unreachable_bootstrap_peer_is_reported_with_its_address_and_error() {
    // A port nobody listens on: bound, then released.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let peer = Keypair::generate_ed25519().public().to_peer_id();
    let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{peer}")
        .parse()
        .unwrap();
    let want = "cannot reach a bootstrap peer";
    let log = log_after(node_config(vec![addr]), Duration::from_secs(10), want).await;
    let line = log
        .lines()
        .find(|l| l.contains(want))
        .unwrap_or_else(|| panic!("no warning in the log:\n{log}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(&format!("/tcp/{port}/")), "{line}");
    assert!(line.contains("error="), "{line}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_reachable_bootstrap_peer_brings_no_warning() {
    let mut boot = NetConfig::new(Keypair::generate_ed25519(), Role::Bootstrap);
    boot.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    let boot_peer = boot.keypair.public().to_peer_id();
    let (boot_client, _boot_events, boot_loop) = dwcp_net::new(boot).unwrap();
    let boot_task = tokio::spawn(boot_loop.run());
    let mut listening = Vec::new();
    for _ in 0..100 {
        listening = boot_client.stats().await.unwrap().listen_addrs;
        if !listening.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let addr = listening
        .into_iter()
        .next()
        .expect("the bootstrap peer listens")
        .with(libp2p::multiaddr::Protocol::P2p(boot_peer));
    let log = log_after(node_config(vec![addr]), Duration::from_secs(3), "never").await;
    assert!(
        !log.contains("cannot reach a bootstrap peer"),
        "warned although the bootstrap peer listens:\n{log}"
    );
    boot_task.abort();
}
