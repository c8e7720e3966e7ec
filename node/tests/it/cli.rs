//! `dwcp-cli` against a real node running in this process, and `dwcp-node`'s CLI-to-config
//! mapping (`--dump-config --immediate-shutdown`).

use std::{process::Command, time::Duration};

use crate::common::{RunningNode, loopback_config};
use dwcp_node::config::NodeConfig;

fn cli(api: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dwcp-cli"))
        .arg("--api")
        .arg(api)
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_talks_to_a_running_node_and_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = loopback_config("cli-test");
    c.node.region = "test-region".into();
    let node = RunningNode::start(c, dir.path()).await;
    let (id, api) = (node.id, node.api.clone());

    let out = tokio::task::spawn_blocking({
        let api = api.clone();
        move || cli(&api, &["node", "list", "--format", "json"])
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 1);
    for field in [
        "id",
        "status",
        "region",
        "version",
        "addresses",
        "resources",
    ] {
        assert!(
            arr[0].get(field).is_some(),
            "node list JSON lacks `{field}`"
        );
    }
    assert_eq!(arr[0]["id"], id.to_string());
    assert_eq!(arr[0]["status"], "ready");
    assert_eq!(arr[0]["region"], "test-region");

    let out = tokio::task::spawn_blocking({
        let api = api.clone();
        move || cli(&api, &["node", "metrics", "--node", &id.to_string()[..10]])
    })
    .await
    .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("dwcp_cluster_workers_ready"));

    let out = tokio::task::spawn_blocking({
        let api = api.clone();
        move || cli(&api, &["node", "metrics", "--node", "deadbeefdeadbeef"])
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), "error: unknown node deadbeefdeadbeef");

    let metrics = reqwest::get(format!("{}/metrics", node.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("dwcp_cluster_workers_ready 1"),
        "{metrics}"
    );

    // Output into a pipe the reader already closed (`dwcp-cli ... | head`): a quiet exit with
    // the shell's SIGPIPE status, not a panic.
    let out = tokio::task::spawn_blocking({
        let api = api.clone();
        move || {
            let mut child = Command::new(env!("CARGO_BIN_EXE_dwcp-cli"))
                .args(["--api", &api, "node", "list"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            drop(child.stdout.take());
            child.wait_with_output().unwrap()
        }
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(141), "{err}");

    node.stop().await;

    // The node is gone: one clear line, non-zero exit.
    let out = tokio::task::spawn_blocking(move || cli(&api, &["cluster", "status"]))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("is dwcp-node running?"), "{err}");
}

#[test]
fn flags_override_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_dwcp-node"))
        .args(["init", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--cluster-id", "from-init", "--region", "eu-west-1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = dir.path().join("dump.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_dwcp-node"))
        .args(["run", "--config"])
        .arg(&cfg)
        .args(["--cluster-id", "from-flag", "--api-bind", "127.0.0.1:9999"])
        .args(["--unreachable-after", "7s", "--dump-config"])
        .arg(&dump)
        .arg("--immediate-shutdown")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = NodeConfig::from_yaml(&std::fs::read_to_string(&dump).unwrap()).unwrap();
    assert_eq!(c.cluster.id, "from-flag");
    assert_eq!(c.node.region, "eu-west-1");
    assert_eq!(c.api.rest.bind.port(), 9999);
    assert_eq!(c.network.unreachable_after, Duration::from_secs(7));
    assert_eq!(c.node.data_dir, dir.path());

    // init twice refuses to overwrite; a bad key in the file is named.
    let again = Command::new(env!("CARGO_BIN_EXE_dwcp-node"))
        .args(["init", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    std::fs::write(&cfg, "node:\n  regoin: x\n").unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_dwcp-node"))
        .args(["run", "--config"])
        .arg(&cfg)
        .arg("--immediate-shutdown")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown field `regoin`"));
}
