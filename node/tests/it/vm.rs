//! A real guest (QEMU, TCG) through the node's API and `dwcp-cli`: boot, marker on the serial
//! console, pause and resume (the counter continues), the donated share enforced, stop and
//! delete leaving nothing behind. Needs `scripts/build-guest.sh` (the test fails, saying so,
//! without it).

use std::time::{Duration, Instant};

use crate::common::{RunningNode, cli, create_guest, loopback_config};
use dwcp_hypervisor::test_guest::{TestGuest, last_tick, ticks};
use dwcp_node::config::{AccelSetting, NodeConfig};

async fn console(api: &str, vm: &str) -> String {
    cli(api, &["vm", "console", "--vm", vm, "--bytes", "65536"])
        .await
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_guest_through_the_node_api() {
    let guest = TestGuest::locate().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = crate::common::KillLeftovers(dir.path().to_path_buf());
    let mut c = loopback_config("vm-test");
    c.hypervisor.accel = AccelSetting::Tcg;
    // Lend exactly 1 vCPU and 512 MiB, whatever the host has.
    c.node.resources.cpu = 2;
    c.node.resources.memory_mib = 1024;
    c.node.donated.cpu_percent = 50;
    c.node.donated.memory_percent = 50;
    let cfg_path = dir.path().join("node.yaml");
    std::fs::write(&cfg_path, c.to_yaml().unwrap()).unwrap();
    let node = RunningNode::start(c, dir.path()).await;
    let (id, api) = (node.id.to_string(), node.api.clone());

    // Larger than the donated share: refused with a clear error, nothing started.
    let (ok, _, err) = create_guest(&api, &guest, "too-big", "2G", &[]).await;
    assert!(!ok);
    assert!(err.contains("memory") && err.contains("donated"), "{err}");

    let booted = Instant::now();
    let (ok, out, err) = create_guest(&api, &guest, "guest-1", "128M", &[]).await;
    assert!(ok, "vm create failed: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let vm = v["id"].as_str().unwrap().to_owned();
    assert_eq!(v["state"], "running");
    assert_eq!(v["accel"], "tcg");
    let pid = v["pid"].as_u64().unwrap();

    // Marker, then ticks.
    loop {
        let text = console(&api, &vm).await;
        if text.contains("DWCP-GUEST-READY") && last_tick(&text).is_some() {
            break;
        }
        assert!(
            booted.elapsed() < Duration::from_secs(120),
            "no marker; console:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "boot to marker through the node API: {:?}",
        booted.elapsed()
    );

    // Pause: the counter stops. Resume: it goes on from where it was (no restart).
    assert!(cli(&api, &["vm", "pause", "--vm", &vm]).await.0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paused_at = last_tick(&console(&api, &vm).await).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        last_tick(&console(&api, &vm).await).unwrap(),
        paused_at,
        "ticked while paused"
    );
    assert!(cli(&api, &["vm", "resume", "--vm", &vm]).await.0);
    let resumed = Instant::now();
    loop {
        let text = console(&api, &vm).await;
        let t = last_tick(&text).unwrap();
        if t > paused_at {
            assert_eq!(
                ticks(&text).iter().filter(|&&t| t == 1).count(),
                1,
                "the guest restarted"
            );
            break;
        }
        assert!(
            resumed.elapsed() < Duration::from_secs(60),
            "no tick after resume"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let (_, size, _) = cli(
        &api,
        &["vm", "inspect", "--vm", &vm, "--field", "memory_size"],
    )
    .await;
    assert_eq!(size.trim(), (128u64 << 20).to_string());
    let (_, count, _) = cli(&api, &["vm", "count", "--node", &id]).await;
    // The count comes from the gauge the heartbeat refreshes; wait for one heartbeat.
    let mut count = count;
    let t0 = Instant::now();
    while count.trim() != "1" && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        count = cli(&api, &["vm", "count", "--node", &id]).await.1;
    }
    assert_eq!(count.trim(), "1");
    let metrics = reqwest::get(format!("{}/metrics", node.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("dwcp_vm_count_total{state=\"running\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dwcp_hypervisor_info{accel=\"tcg\""),
        "{metrics}"
    );

    // The node restarts; the guest keeps running and the node re-attaches to it.
    node.stop().await;
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "node shutdown killed the guest"
    );
    let before =
        last_tick(&std::fs::read_to_string(serial_log(dir.path(), &vm)).unwrap_or_default());
    let node = RunningNode::start(NodeConfig::load(&cfg_path).unwrap(), dir.path()).await;
    let (ok, out, err) = cli(&api, &["--format", "json", "vm", "inspect", "--vm", &vm]).await;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["state"], "running");
    assert_eq!(v["pid"].as_u64(), Some(pid), "re-attached to the same QEMU");
    assert_eq!(v["name"], "guest-1");
    let t0 = Instant::now();
    loop {
        let now = last_tick(&console(&api, &vm).await);
        if now > before {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "guest stopped ticking across the restart"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Stop, delete: no process, no files.
    assert!(cli(&api, &["vm", "stop", "--vm", &vm]).await.0);
    let (ok, _, err) = cli(&api, &["vm", "delete", "--vm", &vm]).await;
    assert!(ok, "{err}");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "qemu {pid} survived"
    );
    let (_, list, _) = cli(&api, &["--format", "json", "vm", "list"]).await;
    assert_eq!(list.trim(), "[]");
    let leftovers: Vec<_> = walk(&dir.path().join("hypervisor"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(&vm))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");

    node.stop().await;
}

/// The serial log file of a VM, found under the node's hypervisor state dir.
fn serial_log(data_dir: &std::path::Path, vm: &str) -> std::path::PathBuf {
    walk(&data_dir.join("hypervisor"))
        .into_iter()
        .find(|p| p.to_string_lossy().contains(vm) && p.to_string_lossy().contains("serial"))
        .unwrap_or_default()
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            out.push(e.path());
            out.extend(walk(&e.path()));
        }
    }
    out
}
