//! A peer that publishes a malformed message, an oversized one and one with a bad signature:
//! the node rejects and counts each, penalises the sender, and keeps serving its API.
// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use dwcp_net::{NetConfig, Role};
use dwcp_protocol::{
    Health, HealthStatus, Heartbeat, NodeKey, SignedEnvelope, Timestamp, version::Topics,
};
use dwcp_testnet::local::{self, UpOptions};

async fn rejected(metrics: &str, reason: &str) -> f64 {
    let text = reqwest::get(format!("{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("dwcp_gossip_messages_rejected_total")
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_forged_messages_are_rejected_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = UpOptions::new(2, dir.path()).unwrap();
    opts.timeout = Duration::from_secs(30);
    let t = match local::up(&opts).await {
        Ok(t) => t,
        Err(e) => {
            let _ = local::down(dir.path()).await;
            panic!("testnet did not start: {e:#}");
        }
    };
    let target = &t.nodes[0];
    let addr = local::node_list(&target.api).await.unwrap()[0]
        .addresses
        .iter()
        .find(|a| a.contains("/tcp/"))
        .cloned()
        .unwrap();
    let target_peer = local::node_list(&target.api).await.unwrap()[0]
        .peer_id
        .clone();

    // The attacker: a real libp2p peer with a valid identity, connected straight to node 0.
    let key = NodeKey::from_secret_bytes([42; 32]);
    let topics = Topics::for_cluster(&t.cluster_id);
    let mut cfg = NetConfig::new(key.to_libp2p(), Role::Node);
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.topics = vec![topics.heartbeat.clone()];
    let (client, _events, el) = dwcp_net::new(cfg).unwrap();
    tokio::spawn(el.run());
    client
        .dial(format!("{addr}/p2p/{target_peer}").parse().unwrap())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let good = Heartbeat {
        cluster_id: t.cluster_id.clone(),
        seq: 1,
        issued_at: Timestamp(1),
        uptime_s: 1,
        health: Health {
            status: HealthStatus::Healthy,
            cpu_load_permille: 0,
            memory_used_mib: 0,
            vms_running: 0,
            peers_connected: 1,
            allocated: None,
        },
    };
    let mut forged = SignedEnvelope::sign(&key, &good).encode();
    let n = forged.len();
    forged[n - 1] ^= 0x01; // last byte of the signature
    let cases: [(&str, Vec<u8>); 3] = [
        ("malformed", b"\xa4this is not an envelope".to_vec()),
        ("oversized", vec![0u8; 64 * 1024]),
        ("bad_signature", forged),
    ];
    for (reason, bytes) in cases {
        let before = rejected(&target.metrics, reason).await;
        client.publish(&topics.heartbeat, bytes).await.unwrap();
        let start = Instant::now();
        while rejected(&target.metrics, reason).await <= before {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{reason} message was not counted"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Still serving.
    let st = reqwest::get(format!("{}/v1/cluster/status", target.api))
        .await
        .unwrap();
    assert!(st.status().is_success());
    // The attacker's messages never made it a member: the node lists only the 2 real nodes.
    let members = local::node_list(&target.api).await.unwrap();
    assert_eq!(members.len(), 2, "the attacker never became a member");
    local::down(dir.path()).await.unwrap();
}
