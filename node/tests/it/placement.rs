//! Placement across real nodes on loopback: two node daemons with the real QEMU backend
//! (TCG), node A lends no memory, node B lends 512 MiB. `dwcp-cli vm create` against A with no
//! target lands the VM on B through the control service, and the guest boots there (one real
//! boot: the test guest's marker on B's console). Then: a hard `avoid-node` of B leaves no
//! node, `--node A` is refused by A's own backend, and bad input gets clear errors. Needs
//! `scripts/build-guest.sh` (the test fails, saying so, without it).

use std::time::{Duration, Instant};

use crate::common::{cli, create_guest, loopback_config};
use dwcp_hypervisor::test_guest::TestGuest;
use dwcp_node::config::{AccelSetting, NodeConfig};

fn node_config(cpu_percent: u8, memory_percent: u8) -> NodeConfig {
    let mut c = loopback_config("placement-test");
    c.hypervisor.accel = AccelSetting::Tcg;
    c.node.resources.cpu = 2;
    c.node.resources.memory_mib = 1024;
    c.node.resources.disk_gib = 20;
    c.node.donated.cpu_percent = cpu_percent;
    c.node.donated.memory_percent = memory_percent;
    c.network.heartbeat_interval = Duration::from_millis(500);
    c.network.unreachable_after = Duration::from_secs(5);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_lands_on_the_node_with_room_and_boots_there() {
    let guest = TestGuest::locate().unwrap_or_else(|e| panic!("{e}"));
    let root = tempfile::tempdir().unwrap();
    let _cleanup = crate::common::KillLeftovers(root.path().to_path_buf());
    // A lends 1 vCPU and no memory; B lends 1 vCPU and 512 MiB and joins through A.
    let (a, b) =
        crate::common::start_pair(root.path(), node_config(50, 0), node_config(50, 50)).await;
    let (a_id, b_id) = (a.id.to_string(), b.id.to_string());

    // Each knows the other: ready, announced, and a heartbeat (with its allocation) received.
    // B serves A's forwarded create only once A is a ready member in B's table.
    for (api, other, donated) in [(&a.api, &b_id, 512), (&b.api, &a_id, 0)] {
        let t0 = Instant::now();
        loop {
            let (_, out, err) = cli(api, &["--format", "json", "node", "list"]).await;
            let nodes: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
            let seen = nodes.as_array().into_iter().flatten().any(|n| {
                n["id"] == other.as_str()
                    && n["status"] == "ready"
                    && n["donated"]["vcpus"] == 1
                    && n["donated"]["memory_mib"] == donated
                    && n["last_heartbeat_seq"].as_u64().unwrap_or(0) > 0
            });
            if seen {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{other} never became ready: {out}{err}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // No target: A places it, on B (A has no memory to lend), and B boots it.
    let (ok, out, err) = create_guest(&a.api, &guest, "placed-1", "128M", &[]).await;
    assert!(ok, "vm create failed: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let vm = v["id"].as_str().unwrap().to_owned();
    assert_eq!(v["node"], b_id.as_str(), "{out}");
    assert_eq!(v["state"], "running");
    let p = &v["placement"];
    assert_eq!(p["local"], false);
    assert_eq!(p["pinned"], false);
    assert_eq!(p["nodes_considered"], 2);
    assert_eq!(p["filtered"]["too-small:memory"], 1, "{p}");
    assert!(p["score"].as_f64().is_some());
    let why = p["examples"][0]["reason"].as_str().unwrap();
    assert!(
        p["examples"][0]["node"] == a_id.as_str() && why.contains("donated"),
        "{p}"
    );
    assert!(
        p["summary"]
            .as_str()
            .unwrap()
            .contains(&format!("placed on node {}", &b_id[..8])),
        "{p}"
    );

    // It is B's VM: listed there, not on A, and the guest runs.
    let (_, list_a, _) = cli(&a.api, &["--format", "json", "vm", "list"]).await;
    assert_eq!(list_a.trim(), "[]");
    let (_, list_b, _) = cli(&b.api, &["--format", "json", "vm", "list"]).await;
    assert!(list_b.contains(&vm), "{list_b}");
    let booted = Instant::now();
    loop {
        let (_, text, _) = cli(&b.api, &["vm", "console", "--vm", &vm, "--bytes", "65536"]).await;
        if text.contains("DWCP-GUEST-READY") {
            break;
        }
        assert!(
            booted.elapsed() < Duration::from_secs(120),
            "no marker on B; console:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Statistics and metrics on both sides.
    let (ok, stats, err) = cli(&a.api, &["--format", "json", "placement", "solver-stats"]).await;
    assert!(ok, "{err}");
    let s: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(s["decisions"], 1);
    assert_eq!(s["forwarded"], 1);
    assert!(s["last"]["elapsed_ms"].as_f64().unwrap() > 0.0, "{stats}");
    assert_eq!(s["last"]["hosts_used"], 1);
    let (ok, text, _) = cli(&a.api, &["placement", "solver-stats"]).await;
    assert!(ok && text.contains("Optimality gap:"), "{text}");
    eprintln!("placement: {}\n{text}", p["summary"]);
    let metrics = |url: String| async move {
        reqwest::get(format!("{url}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let ma = metrics(a.metrics.clone()).await;
    assert!(
        ma.contains("dwcp_itp_decisions_total{result=\"placed\"} 1"),
        "{ma}"
    );
    assert!(ma.contains("dwcp_itp_forwarded_total{result=\"created\"} 1"));
    assert!(ma.contains("dwcp_itp_decision_duration_seconds_count 1"));
    let mb = metrics(b.metrics.clone()).await;
    assert!(
        mb.contains("dwcp_itp_control_requests_total{result=\"created\"} 1"),
        "{mb}"
    );

    // Hard-avoid B on A: no node is left, and the error says why for each.
    let (ok, out, err) = cli(
        &a.api,
        &[
            "placement",
            "avoid-node",
            "--node",
            &b_id[..12],
            "--duration",
            "1h",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("avoiding node") && out.contains("1h"), "{out}");
    let (_, list, _) = cli(
        &a.api,
        &["placement", "list-constraints", "--type", "avoid"],
    )
    .await;
    assert!(list.contains(&format!("avoid:{b_id}")), "{list}");
    let (ok, _, err) = cli(
        &a.api,
        &[
            "vm", "create", "--name", "nowhere", "--memory", "64M", "--kernel", "/x",
        ],
    )
    .await;
    assert!(!ok);
    assert!(
        err.contains("no node can take the VM") && err.contains("avoided (hard) for another"),
        "{err}"
    );

    // Pinned to A: A's own backend refuses it against its donated share.
    let (ok, _, err) = cli(
        &a.api,
        &[
            "vm",
            "create",
            "--name",
            "pinned",
            "--memory",
            "64M",
            "--node",
            &a_id,
            "--kernel",
            guest.kernel.to_str().unwrap(),
        ],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("memory") && err.contains("donated"), "{err}");

    // Bad input: unknown node, bad duration.
    let (ok, _, err) = cli(
        &a.api,
        &[
            "placement",
            "avoid-node",
            "--node",
            "deadbeefdeadbeef",
            "--duration",
            "1h",
        ],
    )
    .await;
    assert!(!ok);
    assert_eq!(err.trim(), "error: unknown node deadbeefdeadbeef");
    let (ok, _, err) = cli(
        &a.api,
        &[
            "placement",
            "avoid-node",
            "--node",
            &b_id,
            "--duration",
            "soon",
        ],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("`soon` is not a duration"), "{err}");

    // Clean up B's guest.
    let (ok, _, err) = cli(&b.api, &["vm", "delete", "--vm", &vm]).await;
    assert!(ok, "{err}");
    b.stop().await;
    a.stop().await;
}
