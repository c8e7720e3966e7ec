//! Compaction of the cluster document through consensus: four committee members, a node
//! outside the committee and a node that leaves. A member runs `dwcp-cli state-sync compact`;
//! the cut commits with f+1 endorsements, every member compacts at it, the node outside the
//! committee learns it from f+1 members, and the departed node's entry is gone everywhere
//! while the live nodes' entries survive and the documents converge again. A second cut then
//! takes every document to epoch 2.

use std::time::{Duration, Instant};

use crate::common::{cli, exported_view, fresh_dirs, loopback_config, start_group};
use dwcp_node::compaction::CompactReport;
use dwcp_protocol::{
    NodeId,
    api::{SyncLagStatus, SyncVerdict, SyncVerifyReport},
};

async fn lag(api: &str) -> SyncLagStatus {
    reqwest::get(format!("{api}/v1/state-sync/lag"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn node_ids_in_document(api: &str) -> Vec<NodeId> {
    exported_view(api).await.nodes.keys().copied().collect()
}

/// A node of these tests: no hypervisor, fast heartbeats, the given committee.
fn config(cluster: &str, committee: &[NodeId]) -> dwcp_node::config::NodeConfig {
    let mut c = loopback_config(cluster);
    c.hypervisor.enabled = false;
    c.network.heartbeat_interval = Duration::from_millis(500);
    c.network.unreachable_after = Duration::from_secs(5);
    c.acp.committee = committee.iter().map(|i| i.to_string()).collect();
    c.ass.compaction.after_changes = 0;
    c
}

/// Waits (at most `secs`) until `ok` holds for every API.
async fn wait_all<F, Fut>(apis: &[&str], secs: u64, what: &str, ok: F)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    for api in apis {
        loop {
            match ok(api.to_string()).await {
                Ok(()) => break,
                Err(e) => assert!(
                    start.elapsed() < Duration::from_secs(secs),
                    "{api}: {what}: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_cut_compacts_every_document_and_drops_departed_nodes() {
    let (dirs, ids) = fresh_dirs(6);
    let configs: Vec<_> = (0..6)
        .map(|_| config("compaction-test", &ids[..4]))
        .collect();
    let dir_paths: Vec<&std::path::Path> = dirs.iter().map(|d| d.path()).collect();
    let first_listen = configs[0].network.listen[0].clone();
    let mut nodes = start_group(configs, &dir_paths).await;
    let apis: Vec<String> = nodes.iter().map(|n| n.api.clone()).collect();
    let all: Vec<&str> = apis.iter().map(|s| s.as_str()).collect();

    // Every document holds all six nodes.
    wait_all(&all, 90, "six node entries", |api| async move {
        let n = node_ids_in_document(&api).await;
        if n.len() == 6 {
            Ok(())
        } else {
            Err(format!("{} entries", n.len()))
        }
    })
    .await;

    // Node 5 leaves; after a while its last heartbeat is old enough to count as departed.
    let leaver = nodes.pop().unwrap();
    let departed = leaver.id;
    leaver.stop().await;
    // Live nodes write their heartbeat into the document at least every 10 s
    // (`ass.consistency.max_staleness`); the cut drops entries older than 15 s.
    tokio::time::sleep(Duration::from_secs(17)).await;
    let live = &all[..5];
    let before: Vec<u64> = {
        let mut v = Vec::new();
        for api in live {
            v.push(lag(api).await.counters["history_changes"]);
        }
        v
    };
    assert!(before.iter().all(|c| *c > 20), "history before: {before:?}");

    // A member proposes; the cut commits with f+1 endorsements.
    let (ok, out, err) = cli(
        live[1],
        &[
            "state-sync",
            "compact",
            "--departed-after-s",
            "15",
            "--format",
            "json",
        ],
    )
    .await;
    assert!(ok, "compact failed: {out} {err}");
    let report: CompactReport = serde_json::from_str(&out).unwrap();
    assert_eq!(report.epoch, 1);
    assert_eq!(report.endorsers.len(), 2, "f+1 endorsements: {report:?}");
    assert!(report.endorsers.iter().all(|e| ids[..4].contains(e)));
    assert!(report.certificate_bytes > 0 && report.heads > 0);

    // Every live node, the one outside the committee included, reaches epoch 1 with a short
    // history, and none holds the departed node while all live ones are there.
    wait_all(live, 60, "compacted at epoch 1", |api| async move {
        let l = lag(&api).await;
        if l.epoch != 1 {
            return Err(format!("epoch {}", l.epoch));
        }
        let n = node_ids_in_document(&api).await;
        if n.contains(&departed) {
            return Err("the departed node is still in the document".into());
        }
        if n.len() != 5 {
            return Err(format!("{} node entries: {n:?}", n.len()));
        }
        Ok(())
    })
    .await;
    for (api, b) in live.iter().zip(&before) {
        let after = lag(api).await.counters["history_changes"];
        println!("{api}: history {b} -> {after} changes");
        assert!(after < *b, "{api}: history {b} -> {after}");
    }
    println!("cut: {report:?}");

    // The documents converge again: equal checksums everywhere.
    wait_all(&live[..1], 60, "equal checksums", |api| async move {
        let (ok, out, err) = cli(&api, &["state-sync", "verify", "--format", "json"]).await;
        if !ok {
            return Err(format!("{out} {err}"));
        }
        let v: SyncVerifyReport = serde_json::from_str(&out).unwrap();
        let same = v
            .rows
            .iter()
            .filter(|r| r.verdict == SyncVerdict::Same)
            .count();
        if same == 4 {
            Ok(())
        } else {
            Err(format!("{same} of 4 the same: {v:?}"))
        }
    })
    .await;

    // The epoch is exported as a metric.
    let m = reqwest::get(format!("{}/metrics", nodes[4].metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("dwcp_state_sync_epoch 1"), "{m}");

    // The next proposal (another member) cuts epoch 2.
    let (ok, out, err) = cli(live[3], &["state-sync", "compact", "--format", "json"]).await;
    assert!(ok, "second compact failed: {out} {err}");
    let r2: CompactReport = serde_json::from_str(&out).unwrap();
    assert_eq!(r2.epoch, 2);
    wait_all(live, 60, "compacted at epoch 2", |api| async move {
        let e = lag(&api).await.epoch;
        if e == 2 {
            Ok(())
        } else {
            Err(format!("epoch {e}"))
        }
    })
    .await;

    // A node that joins now (empty document, epoch 0) cannot build the snapshot (it never had
    // the heads): it downloads the base of epoch 2 from a member, checks it against the
    // certified hash, and then syncs normally.
    let late_dir = tempfile::tempdir().unwrap();
    let mut late_cfg = config("compaction-test", &ids[..4]);
    late_cfg.cluster.bootstrap = vec![format!(
        "{}/p2p/{}",
        first_listen,
        ids[0].to_peer_id().unwrap()
    )];
    let late = crate::common::RunningNode::start(late_cfg, late_dir.path()).await;
    let late_api = late.api.clone();
    let live_ids: Vec<NodeId> = ids[..5].to_vec();
    wait_all(
        &[late_api.as_str()],
        90,
        "late node on epoch 2 with every live node",
        |api| {
            let live_ids = live_ids.clone();
            async move {
                let l = lag(&api).await;
                if l.epoch != 2 {
                    return Err(format!("epoch {}", l.epoch));
                }
                let n = node_ids_in_document(&api).await;
                if live_ids.iter().all(|i| n.contains(i)) {
                    Ok(())
                } else {
                    Err(format!("{} node entries", n.len()))
                }
            }
        },
    )
    .await;
    // And the others learn about it.
    let late_id = late.id;
    wait_all(&live[..1], 60, "the late node's entry", |api| async move {
        if node_ids_in_document(&api).await.contains(&late_id) {
            Ok(())
        } else {
            Err("missing".into())
        }
    })
    .await;
    late.stop().await;

    for n in nodes {
        n.stop().await;
    }
}

/// With `ass.compaction.after_changes` set, the member whose turn it is proposes a cut on its
/// own once the history is that long, and every member compacts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_compact_on_their_own_past_the_history_threshold() {
    let (dirs, ids) = fresh_dirs(4);
    let configs: Vec<_> = (0..4)
        .map(|_| {
            let mut c = config("auto-compaction-test", &ids);
            c.ass.consistency.max_staleness = Duration::from_secs(1);
            c.ass.compaction.after_changes = 15;
            c.ass.compaction.check_interval = Duration::from_secs(2);
            c
        })
        .collect();
    let dir_paths: Vec<&std::path::Path> = dirs.iter().map(|d| d.path()).collect();
    let nodes = start_group(configs, &dir_paths).await;
    let apis: Vec<&str> = nodes.iter().map(|n| n.api.as_str()).collect();
    wait_all(&apis, 90, "compacted on their own", |api| async move {
        let e = lag(&api).await.epoch;
        if e >= 1 {
            Ok(())
        } else {
            Err(format!("epoch {e}"))
        }
    })
    .await;
    for n in nodes {
        n.stop().await;
    }
}
