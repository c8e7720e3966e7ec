//! `dwcp-cli state-sync ...` and `dwcp-cli gossip ...` (manual, Appendix A and section 8).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;
use dwcp_protocol::api::{
    ForceSyncRequest, GossipStatus, NodeInfo, SyncLagStatus, SyncVerdict, SyncVerifyReport,
};

use dwcp_node::{compaction::CompactReport, statesync::CompactRequest};

use super::{Api, ago, print_json, table};

/// `state-sync` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum StateSyncCmd {
    /// How old this node's view of every node is (lag of each node's entry).
    LagStatus {
        /// Every node, not only the 20 with the largest lag.
        #[arg(long)]
        show_all: bool,
    },
    /// Keys of the cluster document with concurrent values.
    Conflicts,
    /// Compares this node's state checksum with every ready node's and names those that differ.
    Verify {
        /// Accepted for the manual's spelling; the checksum is always compared.
        #[arg(long)]
        checksum: bool,
    },
    /// Writes the cluster document as plain Automerge bytes (loadable by any Automerge).
    Export {
        /// Output file.
        #[arg(long)]
        output: PathBuf,
    },
    /// Starts sync sessions now with these nodes (ids, peer ids or unique hex prefixes,
    /// comma-separated; default every connected peer).
    ForceSync {
        /// Nodes.
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
    },
    /// Compacts the cluster document through consensus: cuts at this node's heads, collects
    /// f+1 member endorsements, commits the cut; every node then replaces its history by the
    /// snapshot at the cut (departed nodes, finished VMs and released quarantines dropped).
    Compact {
        /// Drop node entries whose last heartbeat is older than this many seconds (default:
        /// the node's `ass.compaction.departed_after`).
        #[arg(long)]
        departed_after_s: Option<u64>,
    },
}

/// `gossip` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum GossipCmd {
    /// Gossipsub mesh per topic, peer scores and state-sync sessions.
    Status,
}

fn lag_text(l: Option<u64>) -> String {
    l.map(ago).unwrap_or_else(|| "no heartbeat".into())
}

pub(crate) async fn run_state_sync(api: &Api, json: bool, cmd: StateSyncCmd) -> anyhow::Result<()> {
    match cmd {
        StateSyncCmd::LagStatus { show_all } => {
            let s: SyncLagStatus = api.get("/v1/state-sync/lag").await?;
            if json {
                return print_json(&s);
            }
            let max = s.rows.iter().filter_map(|r| r.lag_ms).max();
            println!(
                "Node {} epoch {}: {} nodes, {} VMs in the document, {} heads, {} changes of history; max lag {}",
                s.node.short(),
                s.epoch,
                s.nodes,
                s.vms,
                s.heads.len(),
                s.counters.get("history_changes").copied().unwrap_or(0),
                lag_text(max)
            );
            let n = if show_all { s.rows.len() } else { 20 };
            table(
                &["NODE", "LAG"],
                s.rows
                    .iter()
                    .take(n)
                    .map(|r| {
                        vec![
                            format!(
                                "{}{}",
                                r.node.short(),
                                if r.node == s.node { "*" } else { "" }
                            ),
                            lag_text(r.lag_ms),
                        ]
                    })
                    .collect(),
            );
            if s.rows.len() > n {
                println!("({} more; --show-all lists them)", s.rows.len() - n);
            }
            let c = |k: &str| s.counters.get(k).copied().unwrap_or(0);
            println!(
                "Sent {} frames / {} bytes, received {} / {}; changes applied {}, refused {}; session resets {}",
                c("frames_sent"),
                c("bytes_sent"),
                c("frames_received"),
                c("bytes_received"),
                c("changes_applied"),
                c("changes_rejected"),
                c("session_resets")
            );
        }
        StateSyncCmd::Conflicts => {
            let s: SyncLagStatus = api.get("/v1/state-sync/lag").await?;
            if json {
                return print_json(&serde_json::json!({
                    "nodes": s.conflicts[0], "vms": s.conflicts[1], "quarantine": s.conflicts[2]
                }));
            }
            table(
                &["KIND", "KEYS WITH CONCURRENT VALUES"],
                ["nodes", "vms", "quarantine"]
                    .iter()
                    .zip(s.conflicts)
                    .map(|(k, v)| vec![(*k).to_owned(), v.to_string()])
                    .collect(),
            );
        }
        StateSyncCmd::Verify { checksum: _ } => {
            let r: SyncVerifyReport = api.post("/v1/state-sync/verify", None).await?;
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "Local {} epoch {} checksum {}",
                    r.local.node.short(),
                    r.local.epoch,
                    &r.local.checksum[..16.min(r.local.checksum.len())]
                );
                table(
                    &["NODE", "VERDICT", "CHECKSUM", "DETAIL"],
                    r.rows
                        .iter()
                        .map(|row| {
                            vec![
                                row.node.short(),
                                format!("{:?}", row.verdict).to_lowercase(),
                                row.checksum
                                    .as_ref()
                                    .map(|c| c.checksum.chars().take(16).collect())
                                    .unwrap_or_default(),
                                row.error.clone().unwrap_or_default(),
                            ]
                        })
                        .collect(),
                );
            }
            let differs: Vec<String> = r
                .rows
                .iter()
                .filter(|x| x.verdict == SyncVerdict::Differs)
                .map(|x| x.node.short())
                .collect();
            if !differs.is_empty() {
                bail!(
                    "{} node(s) hold the same history but another state: {}",
                    differs.len(),
                    differs.join(", ")
                );
            }
        }
        StateSyncCmd::Export { output } => {
            let bytes = api.get_bytes("/v1/state-sync/export").await?;
            std::fs::write(&output, &bytes)
                .with_context(|| format!("writing {}", output.display()))?;
            if json {
                return print_json(&serde_json::json!({
                    "output": output, "bytes": bytes.len()
                }));
            }
            println!(
                "wrote {} bytes of Automerge document to {}",
                bytes.len(),
                output.display()
            );
        }
        StateSyncCmd::ForceSync { nodes } => {
            let mut ids = Vec::new();
            for n in &nodes {
                let info: NodeInfo = api
                    .get(&format!("/v1/nodes/{n}"))
                    .await
                    .with_context(|| format!("resolving node {n}"))?;
                ids.push(info.id);
            }
            let body = serde_json::to_value(ForceSyncRequest { nodes: ids })?;
            let v: serde_json::Value = api.post("/v1/state-sync/force-sync", Some(body)).await?;
            if json {
                return print_json(&v);
            }
            println!("sync started with {} peer(s)", v["peers"]);
        }
        StateSyncCmd::Compact { departed_after_s } => {
            let body = serde_json::to_value(CompactRequest { departed_after_s })?;
            let r: CompactReport = api.post("/v1/state-sync/compact", Some(body)).await?;
            if json {
                return print_json(&r);
            }
            println!(
                "compaction cut for epoch {} committed in {} ms: {} head(s), {} changes in the proposer's history, certificate {} B",
                r.epoch, r.elapsed_ms, r.heads, r.changes_before, r.certificate_bytes
            );
            println!(
                "endorsed by: {}",
                r.endorsers
                    .iter()
                    .map(|n| n.short())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!(
                "every node compacts once it holds the cut's heads (state-sync lag-status shows the epoch)"
            );
        }
    }
    Ok(())
}

pub(crate) async fn run_gossip(api: &Api, json: bool, cmd: GossipCmd) -> anyhow::Result<()> {
    match cmd {
        GossipCmd::Status => {
            let g: GossipStatus = api.get("/v1/gossip/status").await?;
            if json {
                return print_json(&g);
            }
            println!("Gossipsub mesh:");
            table(
                &["TOPIC", "MESH PEERS"],
                g.mesh
                    .iter()
                    .map(|(t, n)| vec![t.clone(), n.to_string()])
                    .collect(),
            );
            println!(
                "\nState-sync anti-entropy: fanout {}, interval {} ms",
                g.fanout, g.interval_ms
            );
            let never = |t: Option<u64>| t.map(ago).unwrap_or_else(|| "never".into());
            table(
                &[
                    "PEER",
                    "CONNECTED",
                    "IN SYNC",
                    "IN FLIGHT",
                    "LAST SENT",
                    "LAST HEARD",
                ],
                g.sessions
                    .iter()
                    .map(|s| {
                        vec![
                            s.peer.short(),
                            s.connected.to_string(),
                            s.in_sync.to_string(),
                            s.in_flight.to_string(),
                            never(s.last_sent_ms_ago),
                            never(s.last_received_ms_ago),
                        ]
                    })
                    .collect(),
            );
            println!("\nGossipsub peer scores:");
            table(
                &["PEER", "SCORE"],
                g.peer_scores
                    .iter()
                    .map(|(p, s)| vec![p.clone(), format!("{s:.2}")])
                    .collect(),
            );
        }
    }
    Ok(())
}
