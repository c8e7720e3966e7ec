//! Multi-node tests of the state-sync core on the in-process harness: convergence under loss
//! and partitions, Byzantine writers, bounded messages, persistence, export and compaction.

use automerge::{ObjType, ReadDoc, ScalarValue, transaction::Transactable};
use dwcp_protocol::{
    DonatedShare, Gpu, Health, HealthStatus, Heartbeat, NodeAnnouncement, Resources, Timestamp,
    VmId,
};
use dwcp_statesync::{
    ChangeHash, ClusterDoc, Command, Config, EpochCut, LoadError, Offence, Reject, Violation,
    VmDecision, VmSpec, VmState,
    fake::{FakeCommittee, fake_node_key},
    harness::{SimCluster, SimConfig},
};

const T0: u64 = 1_800_000_000_000;

fn announcement(i: u64, region: &str) -> NodeAnnouncement {
    NodeAnnouncement {
        cluster_id: "sim".into(),
        seq: 1,
        issued_at: Timestamp(T0),
        region: region.into(),
        version: "3.0.0".into(),
        resources: Resources {
            vcpus: 8 + i as u32,
            memory_mib: 16384,
            disk_gib: 200,
            gpus: vec![Gpu {
                model: "a100".into(),
                count: 1,
            }],
        },
        donated: DonatedShare {
            vcpus: 4,
            memory_mib: 8192,
            disk_gib: 100,
            uplink_mbps: 100,
        },
        listen_addrs: vec![],
    }
}

fn heartbeat(seq: u64, at: u64) -> Heartbeat {
    Heartbeat {
        cluster_id: "sim".into(),
        seq,
        issued_at: Timestamp(at),
        uptime_s: seq * 5,
        health: Health {
            status: HealthStatus::Healthy,
            cpu_load_permille: 300,
            memory_used_mib: 1000,
            vms_running: 1,
            peers_connected: 8,
            allocated: None,
        },
    }
}

fn vm(i: u8) -> VmId {
    VmId::from_bytes([i; 16])
}

fn decision(i: u8, seq: u64, host: Option<dwcp_protocol::NodeId>, state: VmState) -> VmDecision {
    VmDecision {
        vm: vm(i),
        decision_seq: seq,
        spec: VmSpec {
            vcpus: 2,
            memory_mib: 2048,
            disk_gib: 20,
        },
        host,
        state,
    }
}

fn all(n: usize) -> Vec<usize> {
    (0..n).collect()
}

#[test]
fn genesis_is_identical_on_every_node_and_per_cluster() {
    let a = ClusterDoc::new(fake_node_key(1), "c1", 1).unwrap();
    let b = ClusterDoc::new(fake_node_key(2), "c1", 7).unwrap();
    let c = ClusterDoc::new(fake_node_key(3), "c2", 1).unwrap();
    assert_eq!(a.base_hash(), b.base_hash());
    assert_eq!(a.heads(), b.heads());
    assert_ne!(a.base_hash(), c.base_hash());
    assert_eq!(a.state_checksum(), b.state_checksum());
    assert_eq!(&a.actor().to_bytes()[..32], a.node_id().as_bytes());
}

#[test]
fn typed_writes_read_back() {
    let committee = FakeCommittee::new(9);
    let v = committee.verifier();
    let mut d = ClusterDoc::new(fake_node_key(1), "sim", 1).unwrap();
    let me = d.node_id();
    d.write_announcement(Timestamp(T0), &announcement(1, "eu-west-1"))
        .unwrap();
    d.write_heartbeat(Timestamp(T0 + 5), &heartbeat(1, T0 + 5))
        .unwrap();
    // An unchanged heartbeat field set writes nothing new except what changed.
    let ops_before = d.stats().ops;
    assert!(
        d.write_heartbeat(Timestamp(T0 + 6), &heartbeat(1, T0 + 5))
            .unwrap()
            .is_none()
    );
    assert_eq!(d.stats().ops, ops_before);
    let e = d.node(&me).unwrap();
    assert_eq!(e.region, "eu-west-1");
    assert_eq!(e.resources, [9, 16384, 200]);
    assert_eq!(e.gpus.get("a100"), Some(&1));
    assert_eq!(e.donated, [4, 8192, 100, 100]);
    assert_eq!(e.health_status, "healthy");
    assert_eq!(e.last_heartbeat_ms, T0 + 5);
    assert_eq!(d.lag(Timestamp(T0 + 2005)).get(&me), Some(&Some(2000)));

    let c = committee.certify_vm(decision(1, 10, Some(me), VmState::Running));
    d.write_vm(Timestamp(T0 + 10), &c, &v).unwrap();
    // Certified quarantine records: the newest decision per node counts.
    assert!(d.quarantined_nodes().is_empty());
    let bad = fake_node_key(77).node_id();
    let q = |seq, quarantined| {
        committee.certify_quarantine(dwcp_statesync::QuarantineDecision {
            node: bad,
            decision_seq: seq,
            quarantined,
            reason: "test".into(),
        })
    };
    d.write_quarantine(Timestamp(T0 + 10), &q(3, true), &v)
        .unwrap();
    assert_eq!(
        d.quarantined_nodes().into_iter().collect::<Vec<_>>(),
        vec![bad]
    );
    d.write_quarantine(Timestamp(T0 + 10), &q(4, false), &v)
        .unwrap();
    assert!(d.quarantined_nodes().is_empty());
    let r = d.vm(&vm(1)).unwrap();
    assert_eq!(
        (r.decision_seq, r.host, r.state),
        (10, Some(me), VmState::Running)
    );
    // Older decisions are skipped; a certificate for other content is refused.
    let old = committee.certify_vm(decision(1, 5, None, VmState::Pending));
    assert!(d.write_vm(Timestamp(T0 + 11), &old, &v).unwrap().is_none());
    let mut forged = committee.certify_vm(decision(1, 11, None, VmState::Stopped));
    forged.decision.state = VmState::Running;
    assert!(d.write_vm(Timestamp(T0 + 12), &forged, &v).is_err());
    assert_eq!(d.vm(&vm(1)).unwrap().decision_seq, 10);
    // A text field longer than the schema allows is refused before anything is written.
    let mut long = announcement(1, "x");
    long.region = "r".repeat(65);
    assert!(d.write_announcement(Timestamp(T0 + 13), &long).is_err());
}

#[test]
fn cluster_converges_under_loss_and_after_partition() {
    let committee = FakeCommittee::new(1);
    let cfg = SimConfig {
        nodes: 16,
        degree: 6,
        loss: 0.1,
        seed: 7,
        ..SimConfig::default()
    };
    let mut sim = SimCluster::new(cfg, &committee.verifier(), T0);
    for i in 0..16 {
        let now = Timestamp(sim.now());
        sim.engines[i]
            .write_announcement(now, &announcement(i as u64, "eu"))
            .unwrap();
        sim.drain(i);
    }
    let t = sim.run_until_pred(250, 30_000, |s| s.converged(&all(16)));
    assert!(
        t.is_some(),
        "16 nodes with 10% loss did not converge in 30 s"
    );
    assert_eq!(sim.engines[3].doc().node_ids().len(), 16);

    // Partition 0..8 | 8..16, write on both sides, heal, converge again.
    let side: Vec<usize> = (8..16).collect();
    sim.partition(&side);
    for i in [0usize, 12] {
        let now = Timestamp(sim.now());
        sim.engines[i]
            .write_heartbeat(now, &heartbeat(2, now.0))
            .unwrap();
        sim.drain(i);
    }
    sim.run_until(sim.now() + 10_000);
    assert!(
        !sim.converged(&all(16)),
        "a partition must keep the halves apart"
    );
    sim.heal();
    let t = sim.run_until_pred(250, 20_000, |s| s.converged(&all(16)));
    assert!(t.is_some(), "no convergence within 20 s after healing");
    let sum = sim.engines[0].doc().state_checksum();
    assert!(sim.engines.iter().all(|e| e.doc().state_checksum() == sum));
    assert!(
        sim.reports.is_empty(),
        "honest nodes reported: {:?}",
        sim.reports.first()
    );
}

#[test]
fn byzantine_writer_changes_nothing_on_honest_nodes_and_is_reported() {
    let committee = FakeCommittee::new(2);
    let cfg = SimConfig {
        nodes: 6,
        degree: 5,
        seed: 3,
        ..SimConfig::default()
    };
    let mut sim = SimCluster::new(cfg, &committee.verifier(), T0);
    for i in 0..6 {
        let now = Timestamp(sim.now());
        sim.engines[i]
            .write_announcement(now, &announcement(i as u64, "eu"))
            .unwrap();
        sim.drain(i);
    }
    let honest: Vec<usize> = (0..5).collect();
    assert!(
        sim.run_until_pred(250, 20_000, |s| s.converged(&all(6)))
            .is_some()
    );
    let victim = sim.ids[0];
    let victim_hex = victim.to_string();
    let before = sim.engines[1].doc().node(&victim).unwrap();
    let byz = 5;
    let now = Timestamp(sim.now());
    // 1. Write into another node's entry with its own actor.
    let doc = sim.engines[byz].doc_mut_for_fakes();
    let h1 = doc
        .fake_raw_write(now, None, |tx, nodes, _| {
            let (_, e) = tx
                .get(nodes, victim_hex.as_str())?
                .expect("victim entry exists");
            tx.put(&e, "region", "hijacked")
        })
        .unwrap();
    // 2. Forge the victim's actor id (the signature is by the Byzantine key).
    let mut forged = victim.as_bytes().to_vec();
    forged.extend_from_slice(&1u64.to_be_bytes());
    let h2 = doc
        .fake_raw_write(now, Some(forged.into()), |tx, nodes, _| {
            let (_, e) = tx
                .get(nodes, victim_hex.as_str())?
                .expect("victim entry exists");
            tx.put(&e, "version", "0.0.0-evil")
        })
        .unwrap();
    // 3. A VM record without a valid certificate.
    let h3 = doc
        .fake_raw_write(now, None, |tx, _, vms| {
            let r = tx.put_object(vms, vm(9).to_string(), ObjType::Map)?;
            tx.put(&r, "decision_seq", ScalarValue::Uint(99))?;
            tx.put(&r, "cert", ScalarValue::Bytes(vec![0; 80]))
        })
        .unwrap();
    // 4. Delete the victim's entry.
    let h4 = doc
        .fake_raw_write(now, None, |tx, nodes, _| {
            tx.delete(nodes, victim_hex.as_str())
        })
        .unwrap();
    sim.drain(byz);
    sim.run_until(sim.now() + 10_000);
    for &i in &honest {
        let d = sim.engines[i].doc();
        for h in [h1, h2, h3, h4] {
            assert!(
                !d.has_change(&h),
                "honest node {i} applied a Byzantine change"
            );
        }
        assert_eq!(
            d.node(&victim).as_ref(),
            Some(&before),
            "node {i}: victim entry altered"
        );
        assert!(d.vm(&vm(9)).is_none());
    }
    assert!(sim.converged(&honest));
    let reported: Vec<_> = sim
        .reports
        .iter()
        .filter(|(_, p, _)| *p == sim.ids[byz])
        .collect();
    assert!(!reported.is_empty(), "the Byzantine node was not reported");
    assert!(
        sim.reports.iter().all(|(_, p, _)| *p == sim.ids[byz]),
        "an honest node was reported"
    );
    let reasons: Vec<&Reject> = reported
        .iter()
        .filter_map(|(_, _, o)| match o {
            Offence::InvalidChanges { first, .. } => Some(first),
            _ => None,
        })
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| matches!(r, Reject::Invalid(Violation::NotOwner(_))))
    );
}

#[test]
fn forged_and_unsigned_changes_are_refused_by_ingest() {
    let committee = FakeCommittee::new(3);
    let v = committee.verifier();
    let mut honest = ClusterDoc::new(fake_node_key(1), "sim", 1).unwrap();
    let mut byz = ClusterDoc::new(fake_node_key(2), "sim", 1).unwrap();
    let victim = fake_node_key(3).node_id();
    let mut forged = victim.as_bytes().to_vec();
    forged.extend_from_slice(&1u64.to_be_bytes());
    // The Byzantine node creates the victim's entry under the victim's actor.
    let h = byz
        .fake_raw_write(Timestamp(T0), Some(forged.into()), |tx, nodes, _| {
            tx.put_object(nodes, victim.to_string(), ObjType::Map)
                .map(|_| ())
        })
        .unwrap();
    let c = byz.automerge().get_change_by_hash(&h).unwrap();
    let no_sigs = Default::default();
    let r = honest.ingest(vec![c.clone()], &no_sigs, &v).unwrap();
    assert_eq!(r.rejected, vec![(h, Reject::Unsigned)]);
    let sigs = [(h, *byz.signature(&h).unwrap())].into_iter().collect();
    let r = honest.ingest(vec![c], &sigs, &v).unwrap();
    assert_eq!(r.rejected, vec![(h, Reject::BadSignature)]);
    assert!(honest.node(&victim).is_none());
    // A VM record whose certificate certifies other content is refused.
    let mut byz = ClusterDoc::new(fake_node_key(5), "sim", 1).unwrap();
    let me = byz.node_id();
    let good = committee.certify_vm(decision(4, 1, Some(me), VmState::Running));
    let hv = byz
        .fake_raw_write(Timestamp(T0), None, |tx, _, vms| {
            let r = tx.put_object(vms, vm(4).to_string(), ObjType::Map)?;
            tx.put(&r, "decision_seq", ScalarValue::Uint(1))?;
            tx.put(&r, "state", "stopped")?;
            tx.put(&r, "host", me.to_string())?;
            let s = tx.put_object(&r, "spec", ObjType::Map)?;
            tx.put(&s, "vcpus", ScalarValue::Uint(2))?;
            tx.put(&s, "memory_mib", ScalarValue::Uint(2048))?;
            tx.put(&s, "disk_gib", ScalarValue::Uint(20))?;
            tx.put(&r, "cert", ScalarValue::Bytes(good.certificate.clone()))
        })
        .unwrap();
    let c = byz.automerge().get_change_by_hash(&hv).unwrap();
    let sigs = [(hv, *byz.signature(&hv).unwrap())].into_iter().collect();
    let r = honest.ingest(vec![c], &sigs, &v).unwrap();
    assert_eq!(r.rejected.len(), 1);
    assert!(
        matches!(r.rejected[0].1, Reject::Invalid(_)),
        "{:?}",
        r.rejected[0].1
    );
    // A later, valid change by the same writer depends on the refused one: refused too.
    let next = committee.certify_vm(decision(5, 1, Some(me), VmState::Running));
    let hn = byz.write_vm(Timestamp(T0 + 1), &next, &v).unwrap().unwrap();
    let c = byz.automerge().get_change_by_hash(&hn).unwrap();
    let sigs = [(hn, *byz.signature(&hn).unwrap())].into_iter().collect();
    let r = honest.ingest(vec![c], &sigs, &v).unwrap();
    assert_eq!(r.rejected, vec![(hn, Reject::DependsOnRejected)]);
    // The same valid record from a clean writer is applied.
    let mut clean = ClusterDoc::new(fake_node_key(4), "sim", 1).unwrap();
    let hc = clean
        .write_vm(Timestamp(T0 + 2), &next, &v)
        .unwrap()
        .unwrap();
    let c = clean.automerge().get_change_by_hash(&hc).unwrap();
    let sigs = [(hc, *clean.signature(&hc).unwrap())].into_iter().collect();
    let r = honest.ingest(vec![c], &sigs, &v).unwrap();
    assert_eq!(r.applied, vec![hc]);
    assert_eq!(honest.vm(&vm(5)).unwrap().host, Some(me));
}

#[test]
fn catch_up_messages_stay_under_the_limit() {
    let committee = FakeCommittee::new(4);
    let engine = Config::default().with_max_message_bytes(32 * 1024);
    let cfg = SimConfig {
        nodes: 2,
        degree: 1,
        seed: 5,
        engine,
        ..SimConfig::default()
    };
    let mut sim = SimCluster::new(cfg, &committee.verifier(), T0);
    // Node 0 writes 600 VM records while node 1 is partitioned away, then they meet.
    sim.partition(&[1]);
    let me = sim.ids[0];
    for i in 0..600u16 {
        let mut d = decision(0, 1, Some(me), VmState::Running);
        let mut b = [0u8; 16];
        b[..2].copy_from_slice(&i.to_be_bytes());
        d.vm = VmId::from_bytes(b);
        let c = committee.certify_vm(d);
        let now = Timestamp(sim.now());
        sim.engines[0].write_vm(now, &c).unwrap();
    }
    sim.drain(0);
    sim.run_until(sim.now() + 2000);
    sim.heal();
    let t = sim.run_until_pred(250, 60_000, |s| s.converged(&[0, 1]));
    assert!(
        t.is_some(),
        "{:?} {:?} vms={}",
        sim.engines[0].stats(),
        sim.engines[1].stats(),
        sim.engines[1].doc().vm_count()
    );
    assert_eq!(sim.engines[1].doc().vm_count(), 600);
    let s = sim.engines[0].stats();
    assert!(
        s.max_frame_sent <= 32 * 1024,
        "frame of {} bytes",
        s.max_frame_sent
    );
    assert!(
        s.messages_truncated > 0,
        "the catch-up should have needed several messages"
    );
}

#[test]
fn persistence_round_trip_and_restart_catches_up() {
    let committee = FakeCommittee::new(5);
    let cfg = SimConfig {
        nodes: 3,
        degree: 2,
        seed: 9,
        ..SimConfig::default()
    };
    let mut sim = SimCluster::new(cfg, &committee.verifier(), T0);
    for i in 0..3 {
        let now = Timestamp(sim.now());
        sim.engines[i]
            .write_announcement(now, &announcement(i as u64, "us"))
            .unwrap();
        sim.drain(i);
    }
    assert!(
        sim.run_until_pred(250, 20_000, |s| s.converged(&[0, 1, 2]))
            .is_some()
    );
    let saved = sim.engines[2].doc().save();
    let loaded = ClusterDoc::load(fake_node_key(2), "sim", &saved).unwrap();
    assert_eq!(loaded.heads(), sim.engines[2].doc().heads());
    assert_eq!(
        loaded.state_checksum(),
        sim.engines[2].doc().state_checksum()
    );
    assert_eq!(loaded.actor(), sim.engines[2].doc().actor());
    assert_eq!(
        ClusterDoc::load(fake_node_key(1), "sim", &saved).unwrap_err(),
        LoadError::WrongNode
    );
    assert!(matches!(
        ClusterDoc::load(fake_node_key(2), "other", &saved),
        Err(LoadError::WrongCluster(_))
    ));
    assert_eq!(
        ClusterDoc::load(fake_node_key(2), "sim", b"junk").unwrap_err(),
        LoadError::BadMagic
    );
    assert!(ClusterDoc::load(fake_node_key(2), "sim", &saved[..saved.len() / 2]).is_err());
    // Restart node 2 from its saved bytes while the others moved on; it catches up by sync.
    for i in 0..2 {
        let now = Timestamp(sim.now());
        sim.engines[i]
            .write_heartbeat(now, &heartbeat(5, now.0))
            .unwrap();
        sim.drain(i);
    }
    sim.run_until(sim.now() + 500);
    let restarted = ClusterDoc::load(fake_node_key(2), "sim", &saved).unwrap();
    sim.set_doc(2, restarted, &committee.verifier());
    assert!(
        sim.run_until_pred(250, 20_000, |s| s.converged(&[0, 1, 2]))
            .is_some()
    );
    assert_eq!(
        sim.engines[2]
            .doc()
            .node(&sim.ids[0])
            .unwrap()
            .heartbeat_seq,
        5
    );
    // The loaded node relays the signatures it persisted: a fresh node can sync from it alone.
    let mut fresh = ClusterDoc::new(fake_node_key(7), "sim", 1).unwrap();
    let changes = loaded.automerge().get_changes(&[]);
    let sigs = changes
        .iter()
        .filter_map(|c| Some((c.hash(), *loaded.signature(&c.hash())?)))
        .collect();
    let r = fresh.ingest(changes, &sigs, &committee.verifier()).unwrap();
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    assert_eq!(fresh.state_checksum(), loaded.state_checksum());
}

#[test]
fn export_is_plain_automerge() {
    let mut d = ClusterDoc::new(fake_node_key(1), "sim", 1).unwrap();
    d.write_announcement(Timestamp(T0), &announcement(1, "ap-south-1"))
        .unwrap();
    let plain = automerge::Automerge::load(&d.export()).unwrap();
    let (_, nodes) = plain.get(automerge::ROOT, "nodes").unwrap().unwrap();
    let (_, e) = plain.get(&nodes, d.node_id().to_string()).unwrap().unwrap();
    let (v, _) = plain.get(&e, "region").unwrap().unwrap();
    assert_eq!(v.as_str(), Some("ap-south-1"));
}

#[test]
fn malformed_frames_are_reported_not_fatal() {
    let committee = FakeCommittee::new(6);
    let doc = ClusterDoc::new(fake_node_key(1), "sim", 1).unwrap();
    let mut e = dwcp_statesync::Engine::new(Config::default(), doc, committee.verifier()).unwrap();
    let peer = fake_node_key(2).node_id();
    e.handle_peer_connected(Timestamp(T0), peer);
    while e.poll_command().is_some() {}
    let mut sync_frame = dwcp_statesync::Frame::Sync {
        epoch: 0,
        sigs: vec![],
        msg: vec![0x42, 0xff, 0xff],
    }
    .encode();
    for bad in [
        vec![],
        vec![1, 2, 3],
        sync_frame.clone(),
        vec![0u8; 600 * 1024],
    ] {
        e.handle_message(Timestamp(T0 + 1), peer, &bad);
        let cmds: Vec<_> = std::iter::from_fn(|| e.poll_command()).collect();
        assert!(
            cmds.iter().any(|c| matches!(
                c,
                Command::ReportPeer {
                    offence: Offence::Malformed(_),
                    ..
                }
            )),
            "no report for {} bytes",
            bad.len()
        );
    }
    sync_frame[4..12].copy_from_slice(&5u64.to_be_bytes());
    e.handle_message(Timestamp(T0 + 2), peer, &sync_frame);
    assert!(matches!(
        e.poll_command(),
        Some(Command::EpochMismatch { theirs: 5, .. })
    ));
}

#[test]
fn concurrent_certified_records_resolve_to_the_newest_decision() {
    let committee = FakeCommittee::new(7);
    let cfg = SimConfig {
        nodes: 2,
        degree: 1,
        seed: 11,
        ..SimConfig::default()
    };
    let mut sim = SimCluster::new(cfg, &committee.verifier(), T0);
    sim.partition(&[1]);
    let (a, b) = (sim.ids[0], sim.ids[1]);
    // Concurrent decisions for the same VM; seq 8 must win everywhere whatever Automerge's
    // own last-writer-wins order says.
    let now = Timestamp(sim.now());
    sim.engines[0]
        .write_vm(
            now,
            &committee.certify_vm(decision(3, 8, Some(a), VmState::Running)),
        )
        .unwrap();
    sim.engines[1]
        .write_vm(
            now,
            &committee.certify_vm(decision(3, 7, Some(b), VmState::Placed)),
        )
        .unwrap();
    sim.drain(0);
    sim.drain(1);
    sim.run_until(sim.now() + 3000);
    sim.heal();
    assert!(
        sim.run_until_pred(250, 20_000, |s| s.converged(&[0, 1]))
            .is_some()
    );
    for e in &sim.engines {
        let r = e.doc().vm(&vm(3)).unwrap();
        assert_eq!((r.decision_seq, r.host), (8, Some(a)));
        assert_eq!(e.doc().conflicts().vms, 1);
    }
}

#[test]
fn compaction_is_identical_everywhere_and_drops_departed_and_finished() {
    let committee = FakeCommittee::new(8);
    let cfg = SimConfig {
        nodes: 3,
        degree: 2,
        seed: 13,
        ..SimConfig::default()
    };
    let mut sim = SimCluster::new(cfg, &committee.verifier(), T0);
    for i in 0..3 {
        let now = Timestamp(sim.now());
        sim.engines[i]
            .write_announcement(now, &announcement(i as u64, "eu"))
            .unwrap();
        // Node 2 heartbeats long ago: it has departed by the cut.
        let at = if i == 2 { T0 - 3_600_000 } else { now.0 };
        sim.engines[i]
            .write_heartbeat(now, &heartbeat(1, at))
            .unwrap();
        for s in 1..20 {
            sim.engines[i]
                .write_heartbeat(now, &heartbeat(s, at + s))
                .unwrap();
        }
        sim.drain(i);
    }
    let me = sim.ids[0];
    let now = Timestamp(sim.now());
    sim.engines[0]
        .write_vm(
            now,
            &committee.certify_vm(decision(1, 1, Some(me), VmState::Running)),
        )
        .unwrap();
    sim.engines[0]
        .write_vm(
            now,
            &committee.certify_vm(decision(2, 2, Some(me), VmState::Stopped)),
        )
        .unwrap();
    sim.drain(0);
    assert!(
        sim.run_until_pred(250, 20_000, |s| s.converged(&[0, 1, 2]))
            .is_some()
    );
    let ops_before = sim.engines[0].doc().stats().ops;
    let cut = EpochCut {
        epoch: 1,
        heads: sim.engines[0].doc().heads(),
        departed_before_ms: T0 - 60_000,
    };
    // The base a cut would build is known before compacting (what a proposer certifies).
    let planned = sim.engines[2].doc().cut_base(&cut).unwrap();
    let mut bases = Vec::new();
    for i in 0..2 {
        let now = Timestamp(sim.now());
        bases.push(sim.engines[i].compact(now, &cut).unwrap());
    }
    assert!(bases.iter().all(|b| *b == planned), "snapshots differ");
    // Node 2 takes the snapshot from node 0's bytes instead of building it: tampered bytes,
    // another hash or an old epoch are refused; the real bytes give the same document.
    let bytes = sim.engines[0].doc().base_change_bytes().unwrap();
    let now = Timestamp(sim.now());
    let mut tampered = bytes.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(
        sim.engines[2]
            .adopt_base(now, 1, &tampered, planned)
            .is_err()
    );
    assert!(
        sim.engines[2]
            .adopt_base(now, 1, &bytes, ChangeHash([7; 32]))
            .is_err()
    );
    assert!(sim.engines[2].adopt_base(now, 0, &bytes, planned).is_err());
    assert_eq!(sim.engines[2].doc().epoch(), 0);
    sim.engines[2].adopt_base(now, 1, &bytes, planned).unwrap();
    assert_eq!(sim.engines[2].doc().epoch(), 1);
    assert_eq!(sim.engines[2].doc().base_change_bytes().unwrap(), bytes);
    // Node 2 departed by the cut, so the snapshot lacks it; adopting re-wrote its own entry.
    assert!(sim.engines[2].doc().node(&sim.ids[2]).is_some());
    let d = sim.engines[1].doc();
    assert_eq!(d.epoch(), 1);
    assert!(d.node(&sim.ids[2]).is_none(), "departed node kept");
    assert!(d.vm(&vm(2)).is_none(), "finished VM kept");
    // Kept, without its certificate: the cut certifies the snapshot as a whole.
    assert!(d.vm(&vm(1)).unwrap().certificate.is_empty());
    assert!(
        d.stats().ops < ops_before,
        "{} !< {ops_before}",
        d.stats().ops
    );
    // Compacting twice at the same epoch is refused; sync keeps working in the new epoch.
    let now = Timestamp(sim.now());
    assert!(sim.engines[1].compact(now, &cut).is_err());
    let now = Timestamp(sim.now());
    sim.engines[1]
        .write_heartbeat(now, &heartbeat(30, now.0))
        .unwrap();
    sim.drain(1);
    for i in 0..3 {
        let peers: Vec<_> = (0..3).filter(|j| *j != i).map(|j| sim.ids[j]).collect();
        sim.engines[i].force_sync(now, &peers);
        sim.drain(i);
    }
    assert!(
        sim.run_until_pred(250, 20_000, |s| s.converged(&[0, 1, 2]))
            .is_some()
    );
    assert_eq!(
        sim.engines[0]
            .doc()
            .node(&sim.ids[1])
            .unwrap()
            .heartbeat_seq,
        30
    );
}

#[test]
fn same_seed_same_run() {
    let committee = FakeCommittee::new(10);
    let run = || {
        let cfg = SimConfig {
            nodes: 8,
            degree: 4,
            loss: 0.2,
            seed: 21,
            ..SimConfig::default()
        };
        let mut sim = SimCluster::new(cfg, &committee.verifier(), T0);
        for i in 0..8 {
            let now = Timestamp(sim.now());
            sim.engines[i]
                .write_announcement(now, &announcement(i as u64, "eu"))
                .unwrap();
            sim.drain(i);
        }
        sim.run_until(T0 + 8000);
        (sim.bytes_delivered, sim.engines[0].doc().heads())
    };
    assert_eq!(run(), run());
}

type RawWrite = Box<
    dyn Fn(
        &mut automerge::transaction::Transaction<'_>,
        &automerge::ObjId,
        &str,
    ) -> Result<(), automerge::AutomergeError>,
>;

type Case = (&'static str, RawWrite, fn(&Violation) -> bool);

/// Raw writes a Byzantine node might try inside its *own* entry or elsewhere, each refused
/// with the rule it breaks.
#[test]
fn schema_violations_are_named() {
    let committee = FakeCommittee::new(11);
    let v = committee.verifier();
    let cases: Vec<Case> = vec![
        (
            "root write",
            Box::new(|tx, _, _| tx.put(automerge::ROOT, "epoch", ScalarValue::Uint(9))),
            |x| matches!(x, Violation::RootWrite),
        ),
        (
            "unknown key",
            Box::new(|tx, nodes, me| {
                let e = tx.put_object(nodes, me, ObjType::Map)?;
                tx.put(&e, "owner_is_admin", true)
            }),
            |x| matches!(x, Violation::UnknownKey(_)),
        ),
        (
            "wrong type",
            Box::new(|tx, nodes, me| {
                let e = tx.put_object(nodes, me, ObjType::Map)?;
                tx.put(&e, "last_heartbeat_ms", "soon")
            }),
            |x| matches!(x, Violation::BadValue(_)),
        ),
        (
            "list object",
            Box::new(|tx, nodes, me| {
                let e = tx.put_object(nodes, me, ObjType::Map)?;
                tx.put_object(&e, "region", ObjType::List).map(|_| ())
            }),
            |x| matches!(x, Violation::BadValue(_) | Violation::BadOperation),
        ),
        (
            "long text",
            Box::new(|tx, nodes, me| {
                let e = tx.put_object(nodes, me, ObjType::Map)?;
                tx.put(&e, "region", "x".repeat(65))
            }),
            |x| matches!(x, Violation::BadValue(_)),
        ),
    ];
    for (name, f, want) in cases {
        let mut honest = ClusterDoc::new(fake_node_key(1), "sim", 1).unwrap();
        let mut byz = ClusterDoc::new(fake_node_key(2), "sim", 1).unwrap();
        let me = byz.node_id().to_string();
        let h = byz
            .fake_raw_write(Timestamp(T0), None, |tx, nodes, _| f(tx, nodes, &me))
            .unwrap();
        let c = byz.automerge().get_change_by_hash(&h).unwrap();
        let sigs = [(h, *byz.signature(&h).unwrap())].into_iter().collect();
        let r = honest.ingest(vec![c], &sigs, &v).unwrap();
        match r.rejected.as_slice() {
            [(_, Reject::Invalid(x))] => assert!(want(x), "{name}: wrong reason {x:?}"),
            other => panic!("{name}: not refused as invalid: {other:?}"),
        }
    }
}

/// Mutated sync frames (bit flips, truncation) must never panic the engine.
#[test]
fn mutated_frames_never_panic() {
    let committee = FakeCommittee::new(12);
    let v = committee.verifier();
    let mut a = dwcp_statesync::Engine::new(
        Config::default(),
        ClusterDoc::new(fake_node_key(1), "sim", 1).unwrap(),
        v.clone(),
    )
    .unwrap();
    let mut b = dwcp_statesync::Engine::new(
        Config::default(),
        ClusterDoc::new(fake_node_key(2), "sim", 1).unwrap(),
        v.clone(),
    )
    .unwrap();
    a.write_announcement(Timestamp(T0), &announcement(1, "eu"))
        .unwrap();
    let me = a.doc().node_id();
    a.write_vm(
        Timestamp(T0),
        &committee.certify_vm(decision(1, 1, Some(me), VmState::Running)),
    )
    .unwrap();
    while a.poll_command().is_some() {}
    let (ida, idb) = (a.doc().node_id(), b.doc().node_id());
    b.handle_peer_connected(Timestamp(T0), ida);
    a.handle_peer_connected(Timestamp(T0), idb);
    let mut frames = Vec::new();
    // Collect a few real frames a -> b by running the exchange.
    for _ in 0..6 {
        while let Some(c) = a.poll_command() {
            if let Command::Send { bytes, .. } = c {
                frames.push(bytes.clone());
                b.handle_message(Timestamp(T0 + 1), ida, &bytes);
            }
        }
        while let Some(c) = b.poll_command() {
            if let Command::Send { bytes, .. } = c {
                a.handle_message(Timestamp(T0 + 1), idb, &bytes);
            }
        }
    }
    assert!(!frames.is_empty());
    assert_eq!(a.doc().heads(), b.doc().heads());
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for f in &frames {
        for _ in 0..150 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut m = f.clone();
            let pos = (x as usize) % m.len();
            m[pos] ^= 1 << (x % 8);
            if x.is_multiple_of(5) {
                m.truncate(pos);
            }
            let mut fresh = dwcp_statesync::Engine::new(
                Config::default(),
                ClusterDoc::new(fake_node_key(3), "sim", 1).unwrap(),
                v.clone(),
            )
            .unwrap();
            fresh.handle_message(Timestamp(T0 + 2), ida, &m);
            while fresh.poll_command().is_some() {}
        }
    }
}
