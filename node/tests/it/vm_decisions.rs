//! VM placements as committed decisions, on real nodes with the QEMU backend (TCG): four
//! committee members (only member 1 lends memory) and a node outside the committee. The
//! outsider places a VM: its placement is agreed by the committee (the members reply to the
//! outsider with the commit certificate), member 1 checks that certificate before it creates
//! the VM, and the certified `vms/<id>` record reaches every node's cluster document. A node
//! that skips consensus is refused by the host. Deleting the VM commits a `stopped` decision.
//! Needs `scripts/build-guest.sh` (the test fails, saying so, without it).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use crate::common::{
    KillLeftovers, cli, create_guest, loopback_config, node_id_in, start_group, wait_in_documents,
};
use dwcp_consensus::Committee;
use dwcp_hypervisor::test_guest::TestGuest;
use dwcp_node::{
    cert::CommitteeVerifier,
    config::{AccelSetting, NodeConfig},
};
use dwcp_protocol::{NodeId, VmId};
use dwcp_statesync::{CertificateVerifier, VmRecord, VmState};

fn config(memory_percent: u8) -> NodeConfig {
    let mut c = loopback_config("vm-decision-test");
    c.hypervisor.accel = AccelSetting::Tcg;
    c.node.resources.cpu = 2;
    c.node.resources.memory_mib = 1024;
    c.node.resources.disk_gib = 20;
    c.node.donated.cpu_percent = 50;
    c.node.donated.memory_percent = memory_percent;
    c.network.heartbeat_interval = Duration::from_millis(500);
    c.network.unreachable_after = Duration::from_secs(5);
    c.acp.pbft.view_change_timeout = Duration::from_secs(3);
    c
}

/// Waits until every API's document holds a record of `vm` in `state`; returns them.
async fn wait_records(apis: &[&str], vm: VmId, state: VmState) -> Vec<VmRecord> {
    wait_in_documents(
        apis,
        &format!("`{}` record of vm {vm}", state.as_str()),
        |v| v.vms.get(&vm).filter(|r| r.state == state).cloned(),
    )
    .await
}

async fn wait_ready(api: &str, others: &[NodeId], lender: NodeId) {
    let start = Instant::now();
    loop {
        let (_, out, _) = cli(api, &["--format", "json", "node", "list"]).await;
        let nodes: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let rows = nodes.as_array().cloned().unwrap_or_default();
        let ready = |id: &NodeId| {
            rows.iter().any(|n| {
                n["id"] == id.to_string().as_str()
                    && n["status"] == "ready"
                    && n["last_heartbeat_seq"].as_u64().unwrap_or(0) > 0
                    && (*id != lender || n["donated"]["memory_mib"] == 512)
            })
        };
        if others.iter().all(ready) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{api}: the mesh did not form: {out}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_is_a_committed_decision_the_host_checks() {
    let guest = TestGuest::locate().unwrap_or_else(|e| panic!("{e}"));
    let root = tempfile::tempdir().unwrap();
    let _cleanup = KillLeftovers(root.path().to_path_buf());
    // 0..4: the committee (only 1 lends memory); 4: outside the committee, same committee
    // list; 5: a node configured without consensus.
    let dirs: Vec<_> = (0..6).map(|i| root.path().join(format!("n{i}"))).collect();
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
    }
    let ids: Vec<NodeId> = dirs.iter().map(|d| node_id_in(d)).collect();
    let members: Vec<String> = ids[..4].iter().map(ToString::to_string).collect();
    let configs: Vec<NodeConfig> = (0..6)
        .map(|i| {
            let mut c = config(if i == 1 { 50 } else { 0 });
            if i < 5 {
                c.acp.committee = members.clone();
            }
            c
        })
        .collect();
    let dirs: Vec<&Path> = dirs.iter().map(|d| d.as_path()).collect();
    let nodes = start_group(configs, &dirs).await;
    let apis: Vec<&str> = nodes.iter().map(|n| n.api.as_str()).collect();
    let (host, outsider, rogue) = (ids[1], apis[4], apis[5]);
    for (i, api) in apis.iter().enumerate() {
        let others: Vec<NodeId> = ids.iter().copied().filter(|x| *x != ids[i]).collect();
        wait_ready(api, &others, host).await;
    }

    // The outsider runs no replica, yet its probes commit: members reply with certificates.
    let (ok, out, err) = cli(outsider, &["consensus", "probe", "--count", "2"]).await;
    assert!(ok && out.contains("probe 2: committed in"), "{out}{err}");

    // The outsider places a VM: it lands on the only lender, as a committed decision.
    let (ok, out, err) = create_guest(outsider, &guest, "agreed-1", "128M", &[]).await;
    assert!(ok, "vm create failed: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["node"], host.to_string().as_str(), "{out}");
    let agreed = &v["placement"]["agreed"];
    assert!(agreed["certificate_bytes"].as_u64().unwrap() > 0, "{out}");
    assert!(
        v["placement"]["summary"]
            .as_str()
            .unwrap()
            .contains("agreed by the committee"),
        "{out}"
    );
    let vm_hex = v["id"].as_str().unwrap().to_owned();
    let vm = VmId::from_bytes(hex::decode(&vm_hex).unwrap().try_into().unwrap());

    // Every node's document holds the certified record, and the certificate verifies
    // against the committee on its own: first the placement, then the host's `running`
    // (committed once the VM exists), which replaces it.
    let verifier = CommitteeVerifier::new(Some(Committee::new(0, ids[..4].to_vec()).unwrap()));
    // (Node 5 runs without a committee, so it cannot check certificates and keeps such
    // changes out of its document: only nodes 0..5 are asked.)
    let placed = wait_records(&apis[..5], vm, VmState::Running).await;
    for (api, r) in apis.iter().zip(&placed) {
        let d = verifier.verify_vm(&r.certificate).unwrap();
        assert_eq!(
            (d.vm, d.host, d.state),
            (vm, Some(host), VmState::Running),
            "{api}"
        );
        assert_eq!(
            (r.host, r.decision_seq),
            (Some(host), d.decision_seq),
            "{api}"
        );
        assert_eq!((r.spec.vcpus, r.spec.memory_mib), (1, 128), "{api}");
    }
    // `vm list --cluster` on a member that neither placed nor hosts it shows the record.
    let (ok, rows, err) = cli(apis[2], &["--format", "json", "vm", "list", "--cluster"]).await;
    assert!(ok, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&rows).unwrap();
    let row = &rows[0];
    assert_eq!(row["id"], vm_hex.as_str(), "{rows}");
    assert_eq!(row["host"], host.to_string().as_str(), "{rows}");
    assert_eq!(row["state"], "running", "{rows}");
    assert_eq!(
        row["certificate_bytes"].as_u64().unwrap() as usize,
        placed[2].certificate.len()
    );
    let mut forged = placed[0].certificate.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert!(verifier.verify_vm(&forged).is_err());

    // A node that skips consensus cannot place a VM on the host.
    let host_id = host.to_string();
    let (ok, _, err) = create_guest(rogue, &guest, "unagreed", "64M", &["--node", &host_id]).await;
    assert!(!ok, "a create without a decision was accepted");
    assert!(err.contains("no placement decision"), "{err}");
    let (_, list, _) = cli(apis[1], &["--format", "json", "vm", "list"]).await;
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let metrics = reqwest::get(format!("{}/metrics", nodes[1].metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("dwcp_itp_control_requests_total{result=\"not_agreed\"} 1"),
        "{metrics}"
    );

    // Deleting the VM on its host commits `stopped`, and every document follows.
    let (ok, _, err) = cli(apis[1], &["vm", "delete", "--vm", &vm_hex]).await;
    assert!(ok, "{err}");
    let stopped = wait_records(&apis[..5], vm, VmState::Stopped).await;
    for r in &stopped {
        let d = verifier.verify_vm(&r.certificate).unwrap();
        assert!(d.decision_seq > placed[0].decision_seq);
    }

    for n in nodes {
        n.stop().await;
    }
}
