//! Committee epochs on real nodes: a genesis committee of four, a fifth node that offers to
//! serve and a genesis member that does not (`acp.epochs.serve: false`). Every node commits
//! its join and readiness; at the end of epoch 0 every node computes the same next committee
//! from committed state (the fifth node in, the member that stopped serving out), the new
//! committee continues the same log, decisions keep committing from members and from the
//! node that left the committee, and a node started afterwards replays both epochs (the
//! ended epoch's engines serve it) to the same committee.

use std::time::{Duration, Instant};

use crate::common::{
    RunningNode, consensus_status as status, fresh_dirs, loopback_config, metric, probe,
    start_group,
};
use dwcp_node::consensus::QuorumStatus;
use dwcp_protocol::NodeId;

fn config(committee: &[NodeId], serve: bool) -> dwcp_node::config::NodeConfig {
    let mut c = loopback_config("epochs-test");
    c.hypervisor.enabled = false;
    c.network.heartbeat_interval = Duration::from_millis(500);
    c.acp.committee = committee.iter().map(|i| i.to_string()).collect();
    c.acp.pbft.checkpoint_interval = 10;
    c.acp.epochs.length = 20;
    c.acp.epochs.min_uptime = Duration::ZERO;
    c.acp.epochs.serve = serve;
    c.ass.compaction.after_changes = 0;
    c
}

/// Waits until every status satisfies `done` (at most `secs`), probing through `probe_api`
/// (when given) to make decisions.
async fn drive_until(
    probe_api: Option<&str>,
    apis: &[&str],
    secs: u64,
    what: &str,
    done: impl Fn(&QuorumStatus) -> bool,
) -> Vec<QuorumStatus> {
    let start = Instant::now();
    loop {
        let mut all = Vec::new();
        for a in apis {
            all.push(status(a).await);
        }
        if all.iter().all(&done) {
            return all;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{what}: {:?}",
            all.iter()
                .map(|s| (s.epoch, s.last_executed, s.joined, s.ready))
                .collect::<Vec<_>>()
        );
        if let Some(api) = probe_api {
            let _ = probe(api).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committee_of_the_next_epoch_comes_from_committed_membership() {
    let (dirs, ids) = fresh_dirs(6);
    let genesis = &ids[..4];
    let configs: Vec<_> = (0..5).map(|i| config(genesis, i != 3)).collect();
    let dir_paths: Vec<&std::path::Path> = dirs.iter().map(|d| d.path()).collect();
    let first_listen = configs[0].network.listen[0].clone();
    let nodes = start_group(configs, &dir_paths[..5]).await;
    let apis: Vec<String> = nodes.iter().map(|n| n.api.clone()).collect();
    let all: Vec<&str> = apis.iter().map(|s| s.as_str()).collect();

    // Every node commits its join and readiness (node 3 declares itself not ready).
    let before = drive_until(None, &all, 90, "joins committed", |s| {
        s.joined == 5 && s.ready == 4
    })
    .await;
    assert!(
        before
            .iter()
            .all(|s| s.epoch == 0 && s.epoch_ends_at == Some(20))
    );

    // Decisions until every node passed the end of epoch 0.
    let after = drive_until(Some(all[1]), &all, 120, "epoch 1 reached", |s| s.epoch >= 1).await;
    let sorted = |s: &QuorumStatus| {
        let mut m = s.members.clone();
        m.sort();
        m
    };
    let mut expected: Vec<NodeId> = vec![ids[0], ids[1], ids[2], ids[4]];
    expected.sort();
    for (i, s) in after.iter().enumerate() {
        assert_eq!(
            sorted(s),
            expected,
            "node {i}: ready nodes 0, 1, 2 and 4 serve"
        );
        assert_eq!(s.n, 4);
        assert_eq!(s.replica, i != 3, "node {i}");
    }

    // The new committee commits: probes from the new member and from the node that left.
    for api in [all[4], all[3]] {
        let t = Instant::now();
        loop {
            match probe(api).await {
                Ok(()) => break,
                Err(e) => assert!(t.elapsed() < Duration::from_secs(60), "{api}: {e}"),
            }
        }
    }
    let s4 = status(all[4]).await;
    assert!(s4.last_executed > 20, "{s4:?}");
    // Rewards: the member whose turn it was recorded slot 10's certificate (slot 20, the
    // epoch's last, is not recorded: its record would commit under the next committee).
    let mut records = 0.0;
    for n in &nodes {
        records += metric(&n.metrics, "dwcp_reputation_participation_records_total").await;
    }
    assert!(records >= 1.0, "no participation record submitted");

    // A node started now replays epoch 0 from the ended engines and epoch 1 from the
    // current ones, reaching the same committee.
    // It does not offer to serve, so the committee stays the same set meanwhile.
    let mut late = config(genesis, false);
    late.cluster.bootstrap = vec![format!(
        "{first_listen}/p2p/{}",
        ids[0].to_peer_id().unwrap()
    )];
    let late = RunningNode::start(late, dir_paths[5]).await;
    let target = status(all[0]).await;
    let s = drive_until(
        None,
        &[late.api.as_str()],
        90,
        "late node catches up",
        |s| s.epoch >= target.epoch && s.last_executed >= target.last_executed && s.joined == 6,
    )
    .await;
    assert_eq!(sorted(&s[0]), expected);
    assert!(!s[0].replica);
    // A node that stops leaves the membership (committed; the next committees are chosen
    // without it).
    late.stop().await;
    drive_until(None, &all, 30, "the late node's leave committed", |s| {
        s.joined == 5
    })
    .await;
    for n in nodes {
        n.stop().await;
    }
}

/// A member that restarts after two epochs resumes from the start of the last epoch it
/// reached (its resume point on disk: committee, log hand-over, replicated state), fetches
/// only the decisions after it, and commits again with the same membership as the others.
/// Then a new node, which never saw the first epochs, installs a certified snapshot from a
/// peer (state transfer) instead of replaying the log. The members put one epoch link in a
/// reply (`acp.epochs.transfer_page_links: 1`), so the new node gets the chain in pages,
/// verifies each and asks again, as it would from a cluster with thousands of epochs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_resumes_from_its_last_epoch_and_a_new_node_installs_a_snapshot() {
    let (dirs, all_ids) = fresh_dirs(5);
    let ids = &all_ids[..4];
    let configs: Vec<_> = (0..4)
        .map(|_| {
            let mut c = config(ids, true);
            c.acp.epochs.transfer_page_links = 1;
            c
        })
        .collect();
    let dir_paths: Vec<&std::path::Path> = dirs.iter().map(|d| d.path()).collect();
    let mut nodes = start_group(configs.clone(), &dir_paths[..4]).await;
    let apis: Vec<String> = nodes.iter().map(|n| n.api.clone()).collect();
    let all: Vec<&str> = apis.iter().map(|s| s.as_str()).collect();
    let before = drive_until(Some(all[0]), &all, 120, "epoch 2 reached", |s| s.epoch >= 2).await;
    assert!(before.iter().all(|s| s.resumed_from.is_none()));

    // Restart node 3 with the same identity, data and ports.
    let third = nodes.remove(3);
    third.stop().await;
    let mut cfg = configs[3].clone();
    cfg.cluster.bootstrap = bootstrap_via_node0(&configs, ids);
    let third = RunningNode::start(cfg, dir_paths[3]).await;
    let s = status(&third.api).await;
    let from = s.resumed_from.expect("resumed from its resume point");
    assert!(from >= 40 && from % 20 == 0, "{s:?}");
    assert!(s.epoch >= 2 && s.last_executed >= from, "{s:?}");

    // It catches up from there and commits again.
    let target = status(all[0]).await;
    let caught = drive_until(
        Some(all[0]),
        &[third.api.as_str()],
        90,
        "restarted member catches up",
        |s| s.last_executed >= target.last_executed && s.joined == 4,
    )
    .await;
    assert_eq!(caught[0].members.len(), 4);
    let t = Instant::now();
    while let Err(e) = probe(&third.api).await {
        assert!(t.elapsed() < Duration::from_secs(60), "{e}");
    }

    // A new node (fresh data, genesis committee only) sees traffic two or more epochs
    // ahead, asks a peer for its snapshot, checks the chain of epoch links from genesis
    // (2f+1 checkpoint signatures of each committee on the next one and the state it
    // starts from), installs it and fetches only the decisions after it.
    let mut new = config(ids, false);
    new.cluster.bootstrap = bootstrap_via_node0(&configs, ids);
    let new = RunningNode::start(new, dir_paths[4]).await;
    let target = status(all[0]).await;
    let s = drive_until(
        Some(all[0]),
        &[new.api.as_str()],
        90,
        "the new node installs a snapshot and catches up",
        |s| s.transferred.is_some() && s.last_executed >= target.last_executed && s.joined == 5,
    )
    .await;
    let (seq, epoch, _) = s[0].transferred.expect("a snapshot was installed");
    assert!(seq >= 40 && seq % 20 == 0 && epoch >= 2, "{:?}", s[0]);
    assert!(s[0].resumed_from.is_none(), "it started from nothing");
    assert!(metric(&new.metrics, "dwcp_pbft_state_transfers_total").await >= 1.0);
    // Epochs 0 .. epoch-1 ended: epoch links, one a reply; the last comes with the snapshot.
    let pages = metric(&new.metrics, "dwcp_pbft_state_transfer_pages_total").await;
    assert!(
        pages >= (epoch - 1) as f64,
        "{pages} pages for {epoch} links"
    );
    let member = status(all[0]).await;
    if member.epoch == s[0].epoch {
        assert_eq!(member.members, s[0].members);
    }
    new.stop().await;
    third.stop().await;
    for n in nodes {
        n.stop().await;
    }
}

/// Every member lies to nodes asking for a snapshot (`acp.byzantine: forge-snapshot`: true
/// epoch links and hand-over, a state that quarantines three of the four members) and
/// serves them no certificates, so they cannot replay the log. A new node must refuse each
/// lie and install nothing; once one member is restarted honest (it holds no certificates
/// from before its resume point, so the joiner still needs a snapshot), the new node installs
/// that member's snapshot, with the true membership and no one quarantined.
/// Serving is not a consensus vote: here more than f (all) of the servers lie, and the
/// joiner still installs only what 2f+1 checkpoint signatures certify.
#[cfg(feature = "byzantine")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_node_refuses_forged_snapshots_and_installs_a_true_one() {
    let (dirs, all_ids) = fresh_dirs(5);
    let ids = &all_ids[..4];
    let honest: Vec<_> = (0..4).map(|_| config(ids, true)).collect();
    let lying: Vec<_> = honest
        .iter()
        .map(|c| {
            let mut c = c.clone();
            c.acp.byzantine = Some("forge-snapshot".into());
            c
        })
        .collect();
    let dir_paths: Vec<&std::path::Path> = dirs.iter().map(|d| d.path()).collect();
    let mut nodes = start_group(lying.clone(), &dir_paths[..4]).await;
    let apis: Vec<String> = nodes.iter().map(|n| n.api.clone()).collect();
    let all: Vec<&str> = apis.iter().map(|s| s.as_str()).collect();
    drive_until(Some(all[1]), &all, 120, "epoch 2 reached", |s| s.epoch >= 2).await;

    // Only lies on offer: each is refused, nothing is installed.
    let mut new = config(ids, false);
    new.cluster.bootstrap = bootstrap_via(&honest, ids, 1);
    let new = RunningNode::start(new, dir_paths[4]).await;
    let refused = drive_until(
        Some(all[1]),
        &[new.api.as_str()],
        60,
        "the new node refuses forged snapshots",
        |s| s.transfers_refused >= 2,
    )
    .await;
    assert!(refused[0].transferred.is_none(), "{:?}", refused[0]);
    assert!(refused[0].epoch < 2, "{:?}", refused[0]);
    assert!(metric(&new.metrics, "dwcp_pbft_state_transfers_refused_total").await >= 2.0);
    assert_eq!(
        metric(&new.metrics, "dwcp_pbft_state_transfers_total").await,
        0.0
    );

    // Member 0 comes back honest (same identity, data and ports): its snapshot verifies.
    let first = nodes.remove(0);
    first.stop().await;
    let mut cfg = honest[0].clone();
    cfg.cluster.bootstrap = bootstrap_via(&honest, ids, 1);
    let first = RunningNode::start(cfg, dir_paths[0]).await;
    let target = status(all[1]).await;
    let s = drive_until(
        Some(all[1]),
        &[new.api.as_str()],
        120,
        "the new node installs the honest member's snapshot",
        |s| s.transferred.is_some() && s.last_executed >= target.last_executed,
    )
    .await;
    let (seq, epoch, from) = s[0].transferred.expect("a snapshot was installed");
    assert_eq!(from, ids[0], "only the honest member's snapshot verifies");
    assert!(seq >= 40 && seq % 20 == 0 && epoch >= 2, "{:?}", s[0]);
    let rows: Vec<dwcp_node::consensus::ReputationRow> =
        reqwest::get(format!("{}/v1/reputation", new.api))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert!(
        rows.iter().all(|r| !r.quarantined),
        "a forged quarantine was installed: {rows:?}"
    );
    let member = status(all[1]).await;
    if member.epoch == s[0].epoch {
        assert_eq!(member.members, s[0].members);
    }
    new.stop().await;
    first.stop().await;
    for n in nodes {
        n.stop().await;
    }
}

/// Node 0 as the bootstrap peer.
fn bootstrap_via_node0(configs: &[dwcp_node::config::NodeConfig], ids: &[NodeId]) -> Vec<String> {
    bootstrap_via(configs, ids, 0)
}

/// Node `i` as the bootstrap peer.
fn bootstrap_via(
    configs: &[dwcp_node::config::NodeConfig],
    ids: &[NodeId],
    i: usize,
) -> Vec<String> {
    vec![format!(
        "{}/p2p/{}",
        configs[i].network.listen[0],
        ids[i].to_peer_id().unwrap()
    )]
}
