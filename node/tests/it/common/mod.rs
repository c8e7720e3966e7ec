//! Shared by the node's integration tests: a real node daemon started in this process on
//! ports chosen by the OS.

use std::{
    net::TcpListener,
    path::Path,
    time::{Duration, Instant},
};

use dwcp_node::{config::NodeConfig, daemon, identity};
use dwcp_protocol::NodeId;
use std::process::Command;

/// A free TCP port on 127.0.0.1, below Linux's ephemeral range (32768-60999): a port from
/// that range, picked now and bound later, can meanwhile become the source port of one of
/// the earlier nodes' outgoing connections ("address already in use" at start, seen here).
/// Each test process starts at its own offset (by pid) and walks on from there.
fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let offset = (std::process::id() % 300) * 40;
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(n < SPAN, "no free port left below the ephemeral range");
        let port = (LOW + (offset + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The default config with a cluster id and fresh loopback ports for libp2p, API and metrics.
pub(crate) fn loopback_config(cluster: &str) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.cluster.id = cluster.into();
    c.network.listen = vec![format!("/ip4/127.0.0.1/tcp/{}", free_port())];
    c.api.rest.bind = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    c.monitoring.prometheus.bind = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    c
}

/// A node daemon running in this process.
pub(crate) struct RunningNode {
    pub(crate) id: NodeId,
    pub(crate) api: String,
    pub(crate) metrics: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningNode {
    /// Starts the daemon with `config` and the identity in `data_dir` (created if absent), and
    /// waits until its API answers.
    pub(crate) async fn start(config: NodeConfig, data_dir: &Path) -> Self {
        let config = config.validate().unwrap();
        let key = identity::load_or_create(&data_dir.join(identity::IDENTITY_FILE)).unwrap();
        let id = key.node_id();
        let api = format!("http://{}", config.api.rest.bind);
        let metrics = format!("http://{}", config.monitoring.prometheus.bind);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(daemon::run(
            daemon::NodeSetup {
                config,
                key,
                data_dir: data_dir.to_path_buf(),
            },
            async {
                let _ = stopped.await;
            },
        ));
        let start = Instant::now();
        let mut task = task;
        while reqwest::get(format!("{api}/v1/cluster/status"))
            .await
            .is_err()
        {
            // A daemon that stopped (a port taken since it was picked, say) says why.
            if task.is_finished() {
                let why = (&mut task).await;
                panic!("the node stopped while starting: {why:?}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "node API did not come up"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self {
            id,
            api,
            metrics,
            stop,
            task,
        }
    }

    /// Stops the daemon (as SIGTERM would) and waits for a clean exit.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// Kills every process whose command line mentions the test's directory when the test ends,
/// so a failing test leaves no QEMU behind (a passing one deletes its VM itself).
pub(crate) struct KillLeftovers(pub(crate) std::path::PathBuf);

impl Drop for KillLeftovers {
    fn drop(&mut self) {
        let needle = self.0.to_string_lossy().into_owned();
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return;
        };
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if pid != std::process::id() as i32 && String::from_utf8_lossy(&cmd).contains(&needle) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Runs `dwcp-cli --api <api> <args>`: (exit success, stdout, stderr).
pub(crate) async fn cli(api: &str, args: &[&str]) -> (bool, String, String) {
    let api = api.to_owned();
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_dwcp-cli"))
            .arg("--api")
            .arg(&api)
            .args(&args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// `dwcp-cli --format json vm create` of the test guest (1 vCPU, `memory`, its kernel,
/// initrd and command line) named `name`, plus `extra` arguments: (exit success, stdout,
/// stderr).
pub(crate) async fn create_guest(
    api: &str,
    guest: &dwcp_hypervisor::test_guest::TestGuest,
    name: &str,
    memory: &str,
    extra: &[&str],
) -> (bool, String, String) {
    let (kernel, initrd) = (
        guest.kernel.to_str().unwrap(),
        guest.initrd.to_str().unwrap(),
    );
    let mut args = vec![
        "--format",
        "json",
        "vm",
        "create",
        "--name",
        name,
        "--cpu",
        "1",
        "--memory",
        memory,
        "--kernel",
        kernel,
        "--initrd",
        initrd,
        "--append",
        &guest.cmdline,
    ];
    args.extend_from_slice(extra);
    cli(api, &args).await
}

/// The node id of the identity in `dir` (created if absent).
pub(crate) fn node_id_in(dir: &Path) -> NodeId {
    identity::load_or_create(&dir.join(identity::IDENTITY_FILE))
        .unwrap()
        .node_id()
}

/// `n` fresh data directories and the node ids of their identities.
pub(crate) fn fresh_dirs(n: usize) -> (Vec<tempfile::TempDir>, Vec<NodeId>) {
    let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let ids = dirs.iter().map(|d| node_id_in(d.path())).collect();
    (dirs, ids)
}

/// A node's exported cluster document, read back.
pub(crate) async fn exported_view(api: &str) -> dwcp_statesync::ClusterView {
    let bytes = reqwest::get(format!("{api}/v1/state-sync/export"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    dwcp_statesync::read_export(&bytes).unwrap()
}

/// Waits (at most 60 s in all) until `pick` finds what it looks for in the exported cluster
/// document of every API; returns what it found, in API order. `what` names it in the failure.
pub(crate) async fn wait_in_documents<T>(
    apis: &[&str],
    what: &str,
    pick: impl Fn(&dwcp_statesync::ClusterView) -> Option<T>,
) -> Vec<T> {
    let start = Instant::now();
    let mut out = Vec::new();
    for api in apis {
        loop {
            let view = exported_view(api).await;
            if let Some(found) = pick(&view) {
                out.push(found);
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{api}: no {what} in the cluster document: {view:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    out
}

/// Starts one node per `(config, data dir)`: the first on its own, every other
/// bootstrapping through it (the identities in the data dirs are created if absent).
pub(crate) async fn start_group(configs: Vec<NodeConfig>, dirs: &[&Path]) -> Vec<RunningNode> {
    let first = identity::load_or_create(&dirs[0].join(identity::IDENTITY_FILE))
        .unwrap()
        .node_id();
    let boot = format!(
        "{}/p2p/{}",
        configs[0].network.listen[0],
        first.to_peer_id().unwrap()
    );
    let mut nodes = Vec::new();
    for (i, (mut c, d)) in configs.into_iter().zip(dirs).enumerate() {
        if i > 0 {
            c.cluster.bootstrap = vec![boot.clone()];
        }
        nodes.push(RunningNode::start(c, d).await);
    }
    nodes
}

/// Starts node A in `root/a`, then node B in `root/b` bootstrapping through A.
pub(crate) async fn start_pair(
    root: &Path,
    a_cfg: NodeConfig,
    mut b_cfg: NodeConfig,
) -> (RunningNode, RunningNode) {
    let (dir_a, dir_b) = (root.join("a"), root.join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let a_key = identity::load_or_create(&dir_a.join(identity::IDENTITY_FILE)).unwrap();
    let a_addr = format!(
        "{}/p2p/{}",
        a_cfg.network.listen[0],
        a_key.node_id().to_peer_id().unwrap()
    );
    let a = RunningNode::start(a_cfg, &dir_a).await;
    b_cfg.cluster.bootstrap = vec![a_addr];
    let b = RunningNode::start(b_cfg, &dir_b).await;
    (a, b)
}

/// `GET /v1/consensus/status` of a node.
pub(crate) async fn consensus_status(api: &str) -> dwcp_node::consensus::QuorumStatus {
    reqwest::get(format!("{api}/v1/consensus/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Commits one no-op probe through `api`'s node (`POST /v1/consensus/probe`).
pub(crate) async fn probe(api: &str) -> Result<(), String> {
    let r = reqwest::Client::new()
        .post(format!("{api}/v1/consensus/probe"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status().is_success() {
        Ok(())
    } else {
        Err(r.text().await.unwrap_or_default())
    }
}

/// The sum of every sample of metric family `name` (all label sets) on a node's `/metrics`.
pub(crate) async fn metric(metrics: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}
