//! A Byzantine member in a real testnet: its own key, a validly signed announcement on gossip
//! (so the nodes accept it as a member and sync with it), and a state-sync engine of its own
//! (`dwcp-statesync`) that first syncs the cluster document, then ships changes written with
//! the test-only `fake_raw_write`: one into another node's entry, one creating a VM record
//! without a commit certificate. The honest nodes must refuse both - their documents never
//! hold the changes, the victim's entry and the VM map stay as they were - and report the
//! sender (`dwcp_state_sync_changes_rejected_total`, `dwcp_state_sync_peers_reported_total`).
// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use automerge::{ROOT, ReadDoc, ScalarValue, Value};
use dwcp_net::{Client, Event, NetConfig, Role, Service};
use dwcp_protocol::{
    DonatedShare, NodeAnnouncement, NodeId, NodeKey, Resources, SignedEnvelope, Timestamp,
    version::Topics,
};
use dwcp_statesync::{
    ChangeHash, ClusterDoc, Command, Config, Engine,
    fake::{FakeCertificateVerifier, FakeCommittee},
};
use dwcp_testnet::local::{self, Testnet, UpOptions};
use tokio::sync::mpsc;

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn metric(metrics: &str, name: &str, label: Option<&str>) -> f64 {
    let text = reqwest::get(format!("{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && label.is_none_or(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn export(api: &str) -> automerge::Automerge {
    let bytes = reqwest::get(format!("{api}/v1/state-sync/export"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    automerge::Automerge::load(&bytes).unwrap()
}

fn map(doc: &automerge::Automerge, obj: &automerge::ObjId, key: &str) -> Option<automerge::ObjId> {
    match doc.get(obj, key).unwrap() {
        Some((Value::Object(_), id)) => Some(id),
        _ => None,
    }
}

fn region_of(doc: &automerge::Automerge, node: &NodeId) -> Option<String> {
    let nodes = map(doc, &ROOT, "nodes")?;
    let e = map(doc, &nodes, &node.to_string())?;
    match doc.get(&e, "region").unwrap() {
        Some((Value::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Str(s) => Some(s.to_string()),
            _ => None,
        },
        _ => None,
    }
}

fn vm_count(doc: &automerge::Automerge) -> usize {
    map(doc, &ROOT, "vms").map_or(0, |v| doc.keys(&v).count())
}

async fn lag_rows(api: &str) -> usize {
    let Ok(r) = reqwest::get(format!("{api}/v1/state-sync/lag")).await else {
        return 0;
    };
    let Ok(s) = r.json::<dwcp_protocol::api::SyncLagStatus>().await else {
        return 0;
    };
    s.rows.iter().filter(|r| r.lag_ms.is_some()).count()
}

/// The Byzantine peer: a libp2p endpoint with its own key and a state-sync engine.
struct Byzantine {
    client: Client,
    events: mpsc::Receiver<Event>,
    engine: Engine<FakeCertificateVerifier>,
}

impl Byzantine {
    /// One driver step: an inbound sync frame (acknowledged, handed to the engine) or a timer
    /// tick, then the engine's sends go out as sync requests.
    async fn step(&mut self) {
        tokio::select! {
            ev = self.events.recv() => {
                if let Some(Event::Request(r)) = ev {
                    let ok = r.service == Service::Sync;
                    let from = NodeId::from_peer_id(&r.peer).ok();
                    let _ = self.client.respond(r.reply, Vec::new()).await;
                    if let (true, Some(from), Some((&0, frame))) = (ok, from, r.data.split_first()) {
                        self.engine.handle_message(Timestamp(wall_ms()), from, frame);
                    }
                }
            }
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                self.engine.handle_timeout(Timestamp(wall_ms()));
            }
        }
        while let Some(c) = self.engine.poll_command() {
            if let Command::Send { peer, bytes } = c {
                let client = self.client.clone();
                let pid = peer.to_peer_id().unwrap();
                let mut data = vec![0u8];
                data.extend_from_slice(&bytes);
                tokio::spawn(async move {
                    let _ = client.request(pid, Service::Sync, data).await;
                });
            }
        }
    }
}

async fn join(t: &Testnet, key: &NodeKey) -> Byzantine {
    let target = &t.nodes[0];
    let me = local::node_list(&target.api).await.unwrap();
    let row = me.iter().find(|r| r.is_self).unwrap();
    let addr = row
        .addresses
        .iter()
        .find(|a| a.contains("/tcp/"))
        .cloned()
        .unwrap();
    let topics = Topics::for_cluster(&t.cluster_id);
    let mut cfg = NetConfig::new(key.to_libp2p(), Role::Node);
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.topics = vec![topics.announce.clone(), topics.statesync.clone()];
    let (client, events, el) = dwcp_net::new(cfg).unwrap();
    tokio::spawn(el.run());
    client
        .dial(format!("{addr}/p2p/{}", row.peer_id).parse().unwrap())
        .await
        .unwrap();
    let engine = Engine::new(
        Config::default().with_seed(7),
        ClusterDoc::new(key.clone(), &t.cluster_id, wall_ms()).unwrap(),
        FakeCommittee::new(9).verifier(),
    )
    .unwrap();
    Byzantine {
        client,
        events,
        engine,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byzantine_member_cannot_write_into_other_entries_or_vms_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = UpOptions::new(3, dir.path()).unwrap();
    opts.timeout = Duration::from_secs(40);
    let t = match local::up(&opts).await {
        Ok(t) => t,
        Err(e) => {
            let _ = local::down(dir.path()).await;
            panic!("testnet did not start: {e:#}");
        }
    };
    let result = tokio::time::timeout(Duration::from_secs(50), scenario(&t)).await;
    local::down(dir.path()).await.unwrap();
    result.expect("the scenario took longer than 50 s");
}

async fn scenario(t: &Testnet) {
    // Every honest document holds every honest node's heartbeat.
    let start = Instant::now();
    for n in &t.nodes {
        while lag_rows(&n.api).await < 3 {
            assert!(start.elapsed() < Duration::from_secs(20), "no initial sync");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let target = &t.nodes[0];
    let victim: NodeId = t.nodes[1].id.parse().unwrap();

    // Join as a member: a validly signed announcement, republished until node 0 lists us.
    let key = NodeKey::from_secret_bytes([77; 32]);
    let mut byz = join(t, &key).await;
    let topics = Topics::for_cluster(&t.cluster_id);
    let ann = NodeAnnouncement {
        cluster_id: t.cluster_id.clone(),
        seq: 1,
        issued_at: Timestamp(wall_ms()),
        region: "evil".into(),
        version: "3.0.0".into(),
        resources: Resources {
            vcpus: 4,
            memory_mib: 8192,
            disk_gib: 100,
            gpus: vec![],
        },
        donated: DonatedShare {
            vcpus: 2,
            memory_mib: 4096,
            disk_gib: 50,
            uplink_mbps: 100,
        },
        listen_addrs: vec![],
    };
    let envelope = SignedEnvelope::sign(&key, &ann).encode();
    let start = Instant::now();
    loop {
        let _ = byz.client.publish(&topics.announce, envelope.clone()).await;
        let members = local::node_list(&target.api).await.unwrap_or_default();
        if members.iter().any(|m| m.id == key.node_id()) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "node 0 never accepted the Byzantine announcement"
        );
        for _ in 0..5 {
            byz.step().await;
        }
    }

    // Sync the document like an honest member until it holds the victim's entry.
    let target_id: NodeId = target.id.parse().unwrap();
    byz.engine
        .handle_peer_connected(Timestamp(wall_ms()), target_id);
    let start = Instant::now();
    while byz.engine.doc().node(&victim).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the Byzantine peer never received the document"
        );
        byz.step().await;
    }

    let before: Vec<(Option<String>, usize)> = {
        let mut v = Vec::new();
        for n in &t.nodes {
            let d = export(&n.api).await;
            v.push((region_of(&d, &victim), vm_count(&d)));
        }
        v
    };
    assert!(before.iter().all(|b| b.0.is_some() && b.1 == 0));
    let rejected0 = metric(
        &target.metrics,
        "dwcp_state_sync_changes_rejected_total",
        None,
    )
    .await;
    let reported0 = metric(
        &target.metrics,
        "dwcp_state_sync_peers_reported_total",
        Some("offence=\"invalid_changes\""),
    )
    .await;

    // The Byzantine writes, signed with its own key.
    let now = Timestamp(wall_ms());
    let victim_hex = victim.to_string();
    let doc = byz.engine.doc_mut_for_fakes();
    let hijack: ChangeHash = doc
        .fake_raw_write(now, None, |tx, nodes, _| {
            use automerge::transaction::Transactable;
            let (_, e) = tx
                .get(nodes, victim_hex.as_str())?
                .expect("victim entry exists");
            tx.put(&e, "region", "hijacked")
        })
        .unwrap();
    let vm: ChangeHash = doc
        .fake_raw_write(now, None, |tx, _, vms| {
            use automerge::transaction::Transactable;
            let r = tx.put_object(
                vms,
                "00000000000000000000000000000009",
                automerge::ObjType::Map,
            )?;
            tx.put(&r, "decision_seq", ScalarValue::Uint(99))?;
            tx.put(&r, "host", victim_hex.as_str())?;
            tx.put(&r, "cert", ScalarValue::Bytes(vec![0; 80]))
        })
        .unwrap();
    assert_eq!(
        byz.engine.doc().node(&victim).map(|n| n.region),
        Some("hijacked".to_string()),
        "the fake write applies locally"
    );
    byz.engine.force_sync(Timestamp(wall_ms()), &[target_id]);

    // Node 0 refuses and reports.
    let start = Instant::now();
    loop {
        byz.step().await;
        let rejected = metric(
            &target.metrics,
            "dwcp_state_sync_changes_rejected_total",
            None,
        )
        .await;
        let reported = metric(
            &target.metrics,
            "dwcp_state_sync_peers_reported_total",
            Some("offence=\"invalid_changes\""),
        )
        .await;
        if rejected > rejected0 && reported > reported0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "node 0 did not count the refused changes (rejected {rejected0} -> {rejected}, reported {reported0} -> {reported})"
        );
    }
    // Let anything that slipped through spread, then look at every honest document.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(3) {
        byz.step().await;
    }
    for (i, n) in t.nodes.iter().enumerate() {
        let d = export(&n.api).await;
        assert!(
            d.get_change_by_hash(&hijack).is_none() && d.get_change_by_hash(&vm).is_none(),
            "honest node {i} holds a Byzantine change"
        );
        assert_eq!(
            (region_of(&d, &victim), vm_count(&d)),
            before[i],
            "honest node {i}: victim entry or VM map altered"
        );
    }
}
