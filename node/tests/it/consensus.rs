//! PBFT on a real mesh: four node daemons in this process form the genesis committee (n = 4,
//! f = 1), agree on operator quarantine votes submitted through two different nodes, and
//! every node applies them identically: one vote changes nothing, f+1 = 2 quarantine. The
//! certified quarantine decision then reaches every node's cluster document.

use std::time::{Duration, Instant};

use crate::common::{
    RunningNode, consensus_status as status, fresh_dirs, loopback_config, metric, probe,
    start_group, wait_in_documents,
};
use dwcp_consensus::Committee;
use dwcp_node::cert::CommitteeVerifier;
use dwcp_node::consensus::{QuarantineRequest, ReputationRow};
use dwcp_protocol::NodeId;
use dwcp_statesync::{CertificateVerifier, QuarantineRecord};

async fn reputation(api: &str) -> Vec<ReputationRow> {
    reqwest::get(format!("{api}/v1/reputation"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn vote(api: &str, node: NodeId) {
    let r = reqwest::Client::new()
        .post(format!("{api}/v1/reputation/quarantine"))
        .json(&QuarantineRequest {
            node,
            reason: "test".into(),
        })
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
}

/// Waits until every node reports `victim` with `votes` votes and the given quarantine state.
async fn wait_all(apis: &[String], victim: NodeId, votes: usize, quarantined: bool) {
    let start = Instant::now();
    for api in apis {
        loop {
            let rows = reputation(api).await;
            let row = rows.iter().find(|r| r.node == victim);
            if row.is_some_and(|r| r.votes.len() == votes && r.quarantined == quarantined) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{api}: expected {votes} votes, quarantined={quarantined}: {rows:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Starts four nodes forming the genesis committee; `byzantine` marks node 3 as an equivocator
/// (feature `byzantine` only); `uplink_claim` is node 3's announced uplink (Mbit/s).
async fn committee(
    byzantine: bool,
    uplink_claim: u32,
) -> (
    Vec<tempfile::TempDir>,
    Vec<NodeId>,
    Vec<RunningNode>,
    Vec<String>,
    Vec<dwcp_node::config::NodeConfig>,
) {
    let (dirs, ids) = fresh_dirs(4);
    let mut configs = Vec::new();
    for _ in 0..4 {
        let mut c = loopback_config("consensus-test");
        c.hypervisor.enabled = false;
        c.network.heartbeat_interval = Duration::from_millis(500);
        c.network.unreachable_after = Duration::from_secs(5);
        c.acp.committee = ids.iter().map(|i| i.to_string()).collect();
        c.acp.pbft.view_change_timeout = Duration::from_secs(3);
        configs.push(c);
    }
    configs[3].node.donated.uplink_mbps = uplink_claim;
    if byzantine {
        #[cfg(feature = "byzantine")]
        {
            configs[3].acp.byzantine = Some("equivocate".into());
        }
    }
    let dir_paths: Vec<&std::path::Path> = dirs.iter().map(|d| d.path()).collect();
    let kept = configs.clone();
    let nodes = start_group(configs, &dir_paths).await;
    let apis: Vec<String> = nodes.iter().map(|n| n.api.clone()).collect();
    assert!(nodes.iter().zip(&ids).all(|(n, i)| n.id == *i));

    // Wait for the mesh: every node knows the three others.
    let start = Instant::now();
    for api in &apis {
        loop {
            let rows: Vec<serde_json::Value> = reqwest::get(format!("{api}/v1/nodes"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if rows.iter().filter(|r| r["status"] == "ready").count() == 4 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "mesh did not form"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    (dirs, ids, nodes, apis, kept)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_four_node_committee_commits_quarantine_votes_identically() {
    let (_dirs, ids, nodes, apis, _) = committee(false, 0).await;
    let s = status(&apis[0]).await;
    assert_eq!((s.n, s.f, s.quorum), (4, 1, 3));
    assert!(s.replica);

    let victim = ids[3];
    // One vote (through node 1): committed everywhere, not enough to quarantine.
    vote(&apis[1], victim).await;
    wait_all(&apis, victim, 1, false).await;
    // A second, distinct voter (node 2): f+1 = 2, quarantined on every other node. (The
    // victim itself may not see it: the others disconnect a quarantined node at once, and
    // the race with the last commits reaching it is lost about one run in ten.)
    vote(&apis[2], victim).await;
    wait_all(&apis[..3], victim, 2, true).await;

    // The other nodes executed the same decisions; the submitters measured commit latency.
    let execs: Vec<u64> = {
        let mut v = Vec::new();
        for api in &apis[..3] {
            v.push(status(api).await.last_executed);
        }
        v
    };
    assert!(execs.iter().all(|e| *e >= 2), "{execs:?}");
    let text = reqwest::get(format!("{}/metrics", nodes[1].metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("dwcp_consensus_latency_seconds_count") && !l.ends_with(" 0")),
        "{text}"
    );
    assert!(
        text.contains("dwcp_reputation_quarantined_nodes 1"),
        "{text}"
    );

    // The decision reached every other node's cluster document with a certificate that verifies
    // against the committee, and the record says what the certificate certifies.
    let verifier = CommitteeVerifier::new(Some(Committee::new(0, ids.clone()).unwrap()));
    // (The quarantined node itself is disconnected by everyone, so its document is not
    // synced any more: only the three others are checked.)
    let records = wait_quarantine_records(&apis[..3], victim).await;
    for (api, rec) in apis.iter().zip(&records) {
        let d = verifier.verify_quarantine(&rec.certificate).unwrap();
        assert_eq!(d.node, victim, "{api}");
        assert!(rec.quarantined && d.quarantined, "{api}: {rec:?}");
        assert_eq!(rec.decision_seq, d.decision_seq, "{api}");
        assert_eq!(rec.reason, d.reason, "{api}");
        assert!(d.reason.starts_with("operator votes"), "{}", d.reason);
    }
    assert!(
        records.iter().all(|r| r == &records[0]),
        "nodes hold different records: {records:?}"
    );
    // A forged certificate (one byte of a signature flipped) does not verify.
    let mut forged = records[0].certificate.clone();
    let n = forged.len();
    forged[n - 10] ^= 1;
    assert!(verifier.verify_quarantine(&forged).is_err());

    for n in nodes {
        n.stop().await;
    }
}

/// Waits until every node's exported cluster document holds a quarantine record for `victim`.
async fn wait_quarantine_records(apis: &[String], victim: NodeId) -> Vec<QuarantineRecord> {
    let apis: Vec<&str> = apis.iter().map(String::as_str).collect();
    wait_in_documents(&apis, "quarantine record", |v| {
        v.quarantine.get(&victim).cloned()
    })
    .await
}

/// An equivocating member (it signs a second, conflicting prepare and commit for every slot
/// and sends it to the others) is caught by the honest replicas, whose evidence commits and
/// quarantines it on every honest node; probes keep committing with three honest replicas.
#[cfg(feature = "byzantine")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_equivocating_member_is_quarantined_and_decisions_go_on() {
    let (_dirs, ids, nodes, apis, _) = committee(true, 0).await;
    let byz = ids[3];
    let start = Instant::now();
    'outer: loop {
        // Probes give the committee something to vote on.
        let _ = reqwest::Client::new()
            .post(format!("{}/v1/consensus/probe", apis[0]))
            .send()
            .await;
        let mut all = true;
        for api in &apis[..3] {
            let rows = reputation(api).await;
            all &= rows.iter().any(|r| r.node == byz && r.quarantined);
        }
        if all {
            break 'outer;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the equivocator was not quarantined on every honest node: {:?}",
            reputation(&apis[0]).await
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let rows = reputation(&apis[1]).await;
    let row = rows.iter().find(|r| r.node == byz).unwrap();
    assert!(
        row.offences.iter().any(|(k, _)| k == "equivocation"),
        "{row:?}"
    );
    // No honest node was quarantined.
    for api in &apis[..3] {
        let rows = reputation(api).await;
        assert!(
            rows.iter().all(|r| r.node == byz || !r.quarantined),
            "{rows:?}"
        );
    }
    // The equivocation decision reached the honest nodes' documents, certified.
    let verifier = CommitteeVerifier::new(Some(Committee::new(0, ids.clone()).unwrap()));
    for rec in wait_quarantine_records(&apis[..3], byz).await {
        let d = verifier.verify_quarantine(&rec.certificate).unwrap();
        assert_eq!((d.node, d.reason.as_str()), (byz, "equivocation"));
    }
    // Decisions go on.
    let r: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v1/consensus/probe", apis[1]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["committed"], true, "{r}");
    for n in nodes {
        n.stop().await;
    }
}

/// The primary of view 0 restarts: its fresh engine is primary of view 0 at sequence 0 again
/// and would propose new batches for sequence numbers it already proposed (equivocation, for
/// which an honest node would be quarantined). Its vote log (`dwcp_node::votelog`) holds
/// those back; the others change view, decisions go on, and nobody accuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_primary_never_equivocates_and_decisions_go_on() {
    let (dirs, ids, mut nodes, apis, configs) = committee(false, 0).await;
    for _ in 0..3 {
        probe(&apis[1]).await.unwrap();
    }
    let before = status(&apis[1]).await.last_executed;
    assert!(before >= 3, "{before}");

    // Restart node 0 (the primary of view 0) with the same identity, data and ports.
    let first = nodes.remove(0);
    first.stop().await;
    let mut cfg = configs[0].clone();
    cfg.cluster.bootstrap = vec![format!(
        "{}/p2p/{}",
        configs[1].network.listen[0],
        ids[1].to_peer_id().unwrap()
    )];
    nodes.insert(0, RunningNode::start(cfg, dirs[0].path()).await);

    // Requests through the restarted node and through another one commit.
    let start = Instant::now();
    let mut committed = 0;
    while committed < 4 {
        let api = &apis[committed % 2];
        match probe(api).await {
            Ok(()) => committed += 1,
            Err(e) => assert!(
                start.elapsed() < Duration::from_secs(120),
                "probes stopped committing after the restart: {e}"
            ),
        }
    }
    assert!(status(&apis[1]).await.last_executed > before);

    // Nobody holds an offence against the restarted node.
    for api in &apis {
        let rows = reputation(api).await;
        let row = rows.iter().find(|r| r.node == ids[0]);
        assert!(
            row.is_none_or(|r| !r.quarantined && r.offences.is_empty()),
            "{api}: {row:?}"
        );
    }
    let text = reqwest::get(format!("{}/metrics", nodes[0].metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let withheld = text
        .lines()
        .find(|l| l.starts_with("dwcp_pbft_votes_withheld_total"))
        .unwrap_or("none");
    println!("restarted primary: {withheld}");

    for n in nodes {
        n.stop().await;
    }
}

/// Manual 5.2.2 ("Consensus Stall") on a committee of peers: two of four members stop, so
/// only 2 of the 3 a decision needs are left. A request waits; after three view-change
/// timeouts the remaining nodes report the stall and its cause (`quorum-status`, the
/// `dwcp_pbft_stalled` and `dwcp_pbft_members_heard` gauges, `dwcp-cli`). One member comes
/// back: the waiting request commits and the stall clears, with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_silent_members_are_reported_as_lost_quorum_and_decisions_resume_when_one_returns() {
    let (dirs, ids, mut nodes, apis, configs) = committee(false, 0).await;
    probe(&apis[0]).await.unwrap();
    let before = status(&apis[0]).await;
    assert!(before.stall.is_none(), "{before:?}");
    assert!(before.last_executed >= 1);
    assert_eq!(
        before.stall_after_ms, 9_000,
        "three 3 s view-change timeouts"
    );

    let fourth = nodes.pop().unwrap();
    let third = nodes.pop().unwrap();
    third.stop().await;
    fourth.stop().await;

    // A request that cannot commit while two members are away.
    let waiting = tokio::spawn({
        let api = apis[0].clone();
        async move { probe(&api).await }
    });
    let start = Instant::now();
    let stalled = loop {
        let s = status(&apis[0]).await;
        if s.stall.is_some() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no stall reported: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let stall = stalled.stall.unwrap();
    assert!(stall.quiet_ms >= 9_000, "{stall:?}");
    match stall.cause {
        dwcp_node::stall::StallCause::LostQuorum { heard, quorum } => {
            assert_eq!(quorum, 3);
            assert!(heard < 3, "{stalled:?}");
        }
        other => panic!("expected lost quorum, got {other:?}: {stalled:?}"),
    }
    // The stopped members are not among those heard from within the window.
    for (m, heard) in stalled.members.iter().zip(&stalled.heard_ms) {
        if *m == ids[2] || *m == ids[3] {
            assert!(
                heard.is_none_or(|ms| ms > stalled.stall_after_ms),
                "{m}: {heard:?}"
            );
        }
    }
    assert_eq!(metric(&nodes[0].metrics, "dwcp_pbft_stalled").await, 1.0);
    assert!(metric(&nodes[0].metrics, "dwcp_pbft_members_heard").await < 3.0);
    let out = tokio::task::spawn_blocking({
        let api = apis[0].clone();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_dwcp-cli"))
                .args(["--api", &api, "consensus", "quorum-status"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("CONSENSUS STALLED"), "{text}");
    assert!(text.contains("lost quorum"), "{text}");
    assert!(text.contains("a decision needs 3"), "{text}");
    assert!(
        text.contains(": 2 of 4") || text.contains(": 1 of 4"),
        "{text}"
    );
    println!("{text}");

    // One member returns with its data: 3 of 4 again.
    let mut cfg = configs[2].clone();
    cfg.cluster.bootstrap = vec![format!(
        "{}/p2p/{}",
        configs[0].network.listen[0],
        ids[0].to_peer_id().unwrap()
    )];
    nodes.push(RunningNode::start(cfg, dirs[2].path()).await);
    let start = Instant::now();
    loop {
        let s = status(&apis[0]).await;
        if s.stall.is_none() && s.last_executed > before.last_executed {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "decisions did not resume: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(metric(&nodes[0].metrics, "dwcp_pbft_stalled").await, 0.0);
    // The probe that waited through the stall committed, unless its caller's 30 s gave up
    // first (the request itself stays queued and is resent); new requests commit.
    let r = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("the probe call returns within its 30 s")
        .unwrap();
    assert!(
        r.is_ok()
            || r.as_ref()
                .is_err_and(|e| e.contains("did not commit within 30 s")),
        "{r:?}"
    );
    println!("probe sent during the stall: {r:?}");
    probe(&apis[1]).await.unwrap();
    for n in nodes {
        n.stop().await;
    }
}

/// A member announces an uplink of 1 Tbit/s; two other members measure what its AMST
/// speed tests to them achieve, sign the measurements and share them; once f+1 = 2 contradict
/// the claim (median below half of it), the evidence is committed and every node lowers the
/// liar's score by the same 0.10. Nodes that claim nothing are not accused. A node outside
/// the committee (an observer: it fetches and executes the members' certificates) computes
/// the same scores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measurements_that_contradict_a_capacity_claim_become_committed_evidence() {
    let (_dirs, ids, mut nodes, mut apis, configs) = committee(false, 1_000_000).await;
    let liar = ids[3];
    let observer_dir = tempfile::tempdir().unwrap();
    let mut oc = loopback_config("consensus-test");
    oc.hypervisor.enabled = false;
    oc.network.heartbeat_interval = Duration::from_millis(500);
    oc.acp.committee = configs[0].acp.committee.clone();
    oc.cluster.bootstrap = vec![format!(
        "{}/p2p/{}",
        configs[0].network.listen[0],
        ids[0].to_peer_id().unwrap()
    )];
    let observer = RunningNode::start(oc, observer_dir.path()).await;
    assert!(!status(&observer.api).await.replica);
    apis.push(observer.api.clone());
    nodes.push(observer);
    for target in [ids[0], ids[1]] {
        let t = target.to_string();
        let (ok, out, err) = crate::common::cli(
            &apis[3],
            &["network", "speedtest", "--target", &t, "--duration", "2s"],
        )
        .await;
        assert!(ok, "speedtest failed: {out}{err}");
    }
    let start = Instant::now();
    for api in &apis {
        loop {
            let rows = reputation(api).await;
            let row = rows.iter().find(|r| r.node == liar);
            if let Some(r) = row
                && r.offences.iter().any(|(k, _)| k == "claim_contradicted")
            {
                assert!((r.score - 0.90).abs() < 1e-6, "{api}: {r:?}");
                assert_eq!(r.offences.len(), 1, "{api}: {r:?}");
                assert!(
                    rows.iter()
                        .filter(|o| o.node != liar)
                        .all(|o| o.offences.is_empty()),
                    "{api}: {rows:?}"
                );
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{api}: no committed claim evidence: {rows:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    for n in nodes {
        n.stop().await;
    }
}
