//! `up --wan`: the bootstrap peer and nodes each in a network namespace, joined by the
//! `dwcp-wan` link emulator; API and metrics reached from the host over management veths.
//!
//! Needs root and `ip netns` (CI runs as root; skipped with a message otherwise) and the
//! workspace binaries built first (`cargo build --bins`: dwcp-node, dwcp-bootstrap,
//! dwcp-wan).
// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use dwcp_protocol::api::PeerStatus;
use dwcp_testnet::{
    local::{self, UpOptions},
    partition, wan,
};

/// 50 ms RTT, 100 Mbit/s, 0.5 % loss each way.
const PROFILE: &str = "rate=100mbit,rtt=50ms,loss=0.5%";
const RTT_MS: f64 = 50.0;

fn namespaces() -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn ping(w: &wan::WanEntry, from: usize, to: usize, count: u32) -> (f64, u32) {
    let w = w.clone();
    tokio::task::spawn_blocking(move || wan::ping_ms(&w, from, to, count))
        .await
        .unwrap()
        .unwrap()
}

async fn status_of(api: &str, id: &str) -> Option<PeerStatus> {
    local::node_list(api)
        .await?
        .into_iter()
        .find(|n| n.id.to_string() == id)
        .map(|n| n.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_in_namespaces_mesh_over_the_emulated_wan_and_down_removes_everything() {
    if let Err(e) = wan::check_available() {
        eprintln!("SKIPPED wan_testnet: {e:#}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut opts = UpOptions::new(3, dir.path()).unwrap();
    opts.wan = Some(PROFILE.into());
    opts.heartbeat_interval = Duration::from_secs(1);
    opts.unreachable_after = Duration::from_secs(4);
    opts.timeout = Duration::from_secs(40);
    let started = Instant::now();
    let t = match local::up(&opts).await {
        Ok(t) => t,
        Err(e) => {
            let _ = local::down(dir.path()).await;
            panic!("WAN testnet did not start: {e:#}");
        }
    };
    eprintln!(
        "3 nodes ready over the emulated WAN after {:?}",
        started.elapsed()
    );
    let w = t.wan.clone().expect("testnet.json records the WAN");
    assert_eq!(w.namespaces.len(), 4, "bootstrap peer + 3 nodes");
    assert!(w.summary.contains("rtt 50 ms"), "{}", w.summary);
    assert_eq!(
        local::read(dir.path()).unwrap(),
        t,
        "testnet.json as returned"
    );

    // Every process runs inside its own namespace, and libp2p uses the emulated addresses.
    for (i, n) in t.nodes.iter().enumerate() {
        let ns = n.netns.as_deref().unwrap();
        assert_eq!(Some(ns), w.node_namespace(i));
        let pids = std::process::Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .unwrap();
        let pids = String::from_utf8_lossy(&pids.stdout).into_owned();
        assert!(
            pids.split_whitespace().any(|p| p == n.pid.to_string()),
            "node {i} (pid {}) is not in {ns}: {pids}",
            n.pid
        );
        assert_eq!(n.ip, wan::wan_ip(i + 1));
        assert!(n.api.contains(&w.mgmt_ip(i + 1)), "api {}", n.api);
    }
    assert!(
        t.bootstrap
            .addrs
            .iter()
            .any(|a| a.contains("/ip4/10.233.0.1/"))
    );
    let seen = local::node_list(&t.nodes[0].api).await.unwrap();
    let peer = seen
        .iter()
        .find(|r| r.id.to_string() == t.nodes[1].id)
        .unwrap();
    assert!(
        peer.addresses.iter().any(|a| a.contains("10.233.0.")),
        "node 1's addresses as node 0 sees them: {:?}",
        peer.addresses
    );

    // The profile's RTT between two nodes' namespaces (ICMP through the emulator).
    let (rtt, answered) = ping(&w, 1, 2, 10).await;
    eprintln!("ping node 0 -> node 1: median {rtt:.2} ms, {answered}/10 answered");
    assert!(answered >= 7, "only {answered}/10 pings answered");
    assert!(
        (RTT_MS..RTT_MS * 1.05 + 2.0).contains(&rtt),
        "median RTT {rtt:.2} ms, profile {RTT_MS} ms"
    );

    // `status` reaches every node over the management links.
    let (_, rows) = local::status(dir.path()).await.unwrap();
    assert!(
        rows.iter().all(|r| r.running && r.status.is_some()),
        "{rows:?}"
    );

    // Partition node 2 off in the emulator: its libp2p traffic stops, so node 0 marks it
    // unreachable; after healing every node is ready again.
    let groups = partition::parse_groups("0-1/2", 3).unwrap();
    partition::install(&t, &groups).unwrap();
    assert!(partition::active(&t));
    let (_, answered) = ping(&w, 1, 3, 2).await;
    assert_eq!(answered, 0, "node 0 still reaches node 2 across the cut");
    let cut = Instant::now();
    let deadline = opts.unreachable_after + Duration::from_secs(6);
    while status_of(&t.nodes[0].api, &t.nodes[2].id).await != Some(PeerStatus::Unreachable) {
        assert!(
            cut.elapsed() < deadline,
            "node 0 did not mark node 2 unreachable within {deadline:?} of the cut"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("partition noticed after {:?}", cut.elapsed());
    partition::heal(&t).unwrap();
    assert!(!partition::active(&t));
    let healed = local::wait_ready(&t, 3, Duration::from_secs(30))
        .await
        .unwrap();
    eprintln!("ready again {healed:?} after healing");

    // `down` stops every process and removes the namespaces, links and emulator.
    let stopped = local::down(dir.path()).await.unwrap();
    assert_eq!(stopped, 4, "3 nodes and the bootstrap peer");
    for n in &t.nodes {
        assert!(!local::is_ours(n.pid), "node {} still runs", n.id);
    }
    assert!(!local::is_ours(t.bootstrap.pid));
    assert!(!local::is_ours(w.emulator_pid), "emulator still runs");
    let left = namespaces();
    for ns in &w.namespaces {
        assert!(!left.contains(ns.as_str()), "namespace {ns} left behind");
        assert!(!wan::namespace_exists(ns));
    }
    for link in &w.mgmt_links {
        assert!(
            !std::path::Path::new(&format!("/sys/class/net/{link}")).exists(),
            "link {link} left behind"
        );
    }
    assert!(!w.control.exists(), "control socket left behind");
    eprintln!("whole test took {:?}", started.elapsed());
}
