//! State sync on a real mesh: three node daemons in this process on loopback replicate the
//! cluster document over `/dwcp/sync/3.0.0` and gossip nudges, agree on its checksum, export
//! it as plain Automerge, serve `dwcp-cli state-sync`, and a restarted node reloads it from sled.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use crate::common::{RunningNode, loopback_config};
use dwcp_node::config::NodeConfig;
use dwcp_protocol::api::{SyncLagStatus, SyncVerdict, SyncVerifyReport};

const CLUSTER: &str = "statesync-test";

fn config(bootstrap: Option<&str>) -> NodeConfig {
    let mut c = loopback_config(CLUSTER);
    c.hypervisor.enabled = false;
    c.network.heartbeat_interval = Duration::from_millis(500);
    c.network.unreachable_after = Duration::from_secs(5);
    c.ass.consistency.max_staleness = Duration::from_secs(1);
    c.ass.persist_interval = Duration::from_millis(500);
    if let Some(b) = bootstrap {
        c.cluster.bootstrap = vec![b.to_owned()];
    }
    c
}

async fn lag(api: &str) -> SyncLagStatus {
    reqwest::get(format!("{api}/v1/state-sync/lag"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits until `api`'s document holds `n` node entries, each with a heartbeat.
async fn wait_for_entries(api: &str, n: usize, within: Duration) -> SyncLagStatus {
    let start = Instant::now();
    loop {
        let s = lag(api).await;
        if s.rows.len() == n && s.rows.iter().all(|r| r.lag_ms.is_some()) {
            return s;
        }
        assert!(
            start.elapsed() < within,
            "{api}: document did not reach {n} entries with heartbeats: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn cli(api: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dwcp-cli"))
        .arg("--api")
        .arg(api)
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_verify_export_and_reload_the_cluster_document() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let first_cfg = config(None);
    let first_addr = first_cfg.network.listen[0].clone();
    let a = RunningNode::start(first_cfg, dirs[0].path()).await;
    let boot = format!("{first_addr}/p2p/{}", a.id.to_peer_id().unwrap());
    let b = RunningNode::start(config(Some(&boot)), dirs[1].path()).await;
    let c_cfg = config(Some(&boot));
    let c = RunningNode::start(c_cfg.clone(), dirs[2].path()).await;

    // Every node's document holds all three entries, written by their owners only.
    for n in [&a, &b, &c] {
        let s = wait_for_entries(&n.api, 3, Duration::from_secs(60)).await;
        let mut ids: Vec<_> = s.rows.iter().map(|r| r.node).collect();
        ids.sort();
        let mut want = vec![a.id, b.id, c.id];
        want.sort();
        assert_eq!(ids, want);
        assert_eq!(s.counters["changes_rejected"], 0, "{s:?}");
    }

    // verify: A's checksum equals B's and C's once they hold the same heads.
    let start = Instant::now();
    loop {
        let r: SyncVerifyReport = reqwest::Client::new()
            .post(format!("{}/v1/state-sync/verify", a.api))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r.rows.len(), 2, "{r:?}");
        assert!(
            r.rows.iter().all(|x| x.verdict != SyncVerdict::Differs),
            "same history must mean same state: {r:?}"
        );
        if r.rows.iter().all(|x| x.verdict == SyncVerdict::Same) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "checksums did not converge: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The CLI: lag-status and gossip status as JSON, export to a file.
    let (api_a, out_file) = (a.api.clone(), dirs[0].path().join("state.automerge"));
    let (lag_out, gossip_out, export_out) = tokio::task::spawn_blocking({
        let out_file = out_file.clone();
        move || {
            (
                cli(&api_a, &["state-sync", "lag-status", "--format", "json"]),
                cli(&api_a, &["gossip", "status", "--format", "json"]),
                cli(
                    &api_a,
                    &[
                        "state-sync",
                        "export",
                        "--output",
                        out_file.to_str().unwrap(),
                    ],
                ),
            )
        }
    })
    .await
    .unwrap();
    for o in [&lag_out, &gossip_out, &export_out] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&lag_out.stdout).unwrap();
    assert_eq!(v["rows"].as_array().unwrap().len(), 3);
    let g: serde_json::Value = serde_json::from_slice(&gossip_out.stdout).unwrap();
    assert!(
        g["mesh"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t[0].as_str().unwrap().ends_with("/statesync")),
        "{g}"
    );
    let exported = std::fs::read(&out_file).unwrap();
    // Automerge's document magic bytes.
    assert_eq!(&exported[..4], &[0x85, 0x6f, 0x4a, 0x83]);

    // Metrics carry the manual's lag gauge for every node (refreshed every second).
    let start = Instant::now();
    loop {
        let text = reqwest::get(format!("{}/metrics", a.metrics))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let lag_lines = text
            .lines()
            .filter(|l| l.starts_with("dwcp_state_sync_lag_seconds{"))
            .count();
        if lag_lines == 3 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "expected 3 lag series: {text}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // C restarts alone (no bootstrap, no peers): it still knows all three nodes from sled.
    c.stop().await;
    let mut alone = c_cfg;
    alone.cluster.bootstrap.clear();
    let c2 = RunningNode::start(alone, dirs[2].path()).await;
    let s = lag(&c2.api).await;
    assert_eq!(s.rows.len(), 3, "the reloaded document lost entries: {s:?}");

    c2.stop().await;
    b.stop().await;
    a.stop().await;
}
