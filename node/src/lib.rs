//! The DWCP node: the daemon behind `dwcp-node`, and the pieces `dwcp-cli` shares with it.
//!
//! - [`config`]: `node.yaml` (manual section 3.2 layout), validation, platform paths.
//! - [`identity`]: the node key file (0600, reused across restarts).
//! - [`membership`]: the pure membership table (`ready` / `unreachable`).
//! - [`daemon`]: the async shell that runs the network, the table, the API and metrics.
//! - [`gossip`]: validation of gossip messages (shared with bootstrap peers).
//! - [`api`]: the local HTTP API and the Prometheus endpoint.
//! - [`metrics`]: one Prometheus registry per node.
//! - [`store`]: sled persistence.
//! - [`vms`]: the VMs this node hosts (QEMU backend of `dwcp-hypervisor`).
//! - [`pba`]: the PBA driver: link samples, bandwidth forecasts, `/v1/pba` and retraining.
//! - [`placement`]: the ITP driver: where a VM goes, and the `/v1/placement` controls.
//! - [`control`]: the node-to-node control service (forwarded VM creates, transfer offers).
//! - [`amst`]: bulk transfers over many authenticated streams (`network speedtest`).
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod amst;
pub mod api;
pub mod cert;
pub mod compaction;
pub mod config;
pub mod consensus;
pub mod control;
pub mod daemon;
pub mod gossip;
pub mod host;
pub mod identity;
pub mod membership;
pub mod metrics;
pub mod pba;
pub mod placement;
pub mod stall;
pub mod statesync;
pub mod store;
pub mod transfer;
pub mod vms;
pub mod votelog;

/// Resolves on SIGTERM or SIGINT: how the daemons (`dwcp-node`, `dwcp-bootstrap`) learn to
/// stop. Without signal handlers (they could not be installed) it never resolves and the
/// process can only be killed.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
