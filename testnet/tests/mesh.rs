//! Real processes: a bootstrap peer and 10 `dwcp-node`s on loopback (issue 2's acceptance).
//!
//! Needs the workspace binaries built first (`cargo build --bins`; `.ci/run` does it).
// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use dwcp_protocol::api::PeerStatus;
use dwcp_testnet::local::{self, UpOptions};

async fn status_of(api: &str, id: &str) -> Option<PeerStatus> {
    local::node_list(api)
        .await?
        .into_iter()
        .find(|n| n.id.to_string() == id)
        .map(|n| n.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_nodes_form_a_mesh_notice_a_crash_and_take_the_node_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = UpOptions::new(10, dir.path()).unwrap();
    opts.unreachable_after = Duration::from_secs(5);
    opts.heartbeat_interval = Duration::from_secs(1);
    opts.timeout = Duration::from_secs(30);
    let started = Instant::now();
    let up = local::up(&opts).await;
    let mut t = match up {
        Ok(t) => t,
        Err(e) => {
            let _ = local::down(dir.path()).await;
            panic!("mesh did not form: {e:#}");
        }
    };
    let formed = started.elapsed();
    eprintln!("10-node mesh formed in {formed:?}");
    assert!(formed < Duration::from_secs(30));

    // SIGKILL node 3: every other node lists it as unreachable within silence + 5 s.
    let victim = t.nodes[3].id.clone();
    local::kill_node(&t, 3).unwrap();
    let killed = Instant::now();
    let deadline = opts.unreachable_after + Duration::from_secs(5);
    loop {
        let mut all = true;
        for (i, n) in t.nodes.iter().enumerate() {
            if i != 3 && status_of(&n.api, &victim).await != Some(PeerStatus::Unreachable) {
                all = false;
            }
        }
        if all {
            break;
        }
        assert!(
            killed.elapsed() < deadline,
            "not every node saw node 3 as unreachable within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("crash noticed by all after {:?}", killed.elapsed());

    // Restart with the same data dir: same id, ready everywhere again.
    local::restart_node(dir.path(), &mut t, 3, &opts.bin_dir).unwrap();
    local::wait_ready(&t, 10, Duration::from_secs(30))
        .await
        .unwrap();
    let me = local::node_list(&t.nodes[3].api).await.unwrap();
    let self_row = me.iter().find(|n| n.is_self).unwrap();
    assert_eq!(
        self_row.id.to_string(),
        victim,
        "restarted node kept its identity"
    );

    let stopped = local::down(dir.path()).await.unwrap();
    assert_eq!(stopped, 11);
    for n in &t.nodes {
        assert!(
            !local::is_ours(n.pid),
            "node process {} survived down",
            n.pid
        );
    }
}
