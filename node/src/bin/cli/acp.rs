//! `dwcp-cli consensus ...` and `dwcp-cli reputation ...` (manual, sections 6 and 9.2).

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use dwcp_node::{
    consensus::{QuarantineRequest, QuorumStatus, ReputationRow},
    stall::StallCause,
};
use dwcp_protocol::{NodeId, api::NodeInfo};

use super::{Api, Output, print_json, table};

/// `consensus` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum ConsensusCmd {
    /// The committee, the view, its primary and progress.
    QuorumStatus,
    /// Commit no-op requests through consensus and print how long each took.
    Probe {
        /// How many, one after the other.
        #[arg(long, default_value_t = 5)]
        count: u32,
    },
    /// One node's part in consensus: committee seat, primary or not, offences on record.
    Analyze {
        /// Node id, peer id or unique hex prefix.
        #[arg(long)]
        node: String,
    },
}

/// Sort order of `reputation list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum SortBy {
    /// Lowest score first.
    Score,
    /// By node id.
    Node,
}

/// `reputation` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum ReputationCmd {
    /// Scores of every node seen by consensus.
    List {
        /// Only nodes below this score.
        #[arg(long)]
        threshold: Option<f64>,
        /// Sort order.
        #[arg(long, value_enum, default_value_t = SortBy::Score)]
        sort: SortBy,
    },
    /// One node's score, offences and quarantine votes.
    Analyze {
        /// Node id, peer id or unique hex prefix.
        #[arg(long)]
        node: String,
    },
    /// Submit a signed vote, through consensus, to quarantine a node. It takes effect when
    /// f+1 distinct nodes voted (no single node can quarantine another).
    Quarantine {
        /// Node id, peer id or unique hex prefix.
        #[arg(long)]
        node: String,
        /// Why.
        #[arg(long)]
        reason: String,
    },
}

/// A node id from an id, peer id or unique hex prefix (asks the node behind --api).
pub(crate) async fn resolve(api: &Api, node: &str) -> anyhow::Result<NodeId> {
    if let Ok(id) = node.parse::<NodeId>() {
        return Ok(id);
    }
    let info: NodeInfo = api
        .get(&format!("/v1/nodes/{node}"))
        .await
        .with_context(|| format!("resolving node {node}"))?;
    Ok(info.id)
}

/// "850 ms", "12 s", "5 min 3 s".
fn ago(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..120_000 => format!("{} s", ms / 1000),
        _ => format!("{} min {} s", ms / 60_000, ms / 1000 % 60),
    }
}

fn heard_cell(me: bool, ms: Option<u64>) -> String {
    match (me, ms) {
        (true, _) => "(this node)".into(),
        (false, Some(ms)) => format!("{} ago", ago(ms)),
        (false, None) => "never since start".into(),
    }
}

/// What to do about a stall (manual 5.2.2, for a committee of peers).
fn stall_hint(cause: &StallCause) -> &'static str {
    match cause {
        StallCause::LostQuorum { .. } => {
            "Start the silent members again, or reconnect them (dwcp-cli node list shows who is unreachable); \
             decisions resume once 2f+1 are back, with nothing lost. Quarantine cannot help: \
             it needs a decision too."
        }
        StallCause::ViewChange => {
            "Members disagree on the view; they converge once messages flow (check \
             dwcp_pbft_view_changes_total and the members' clocks and links)."
        }
        StallCause::NoProgress => {
            "The primary may be withholding proposals (its backups replace it after the \
             view-change timeout), or this node receives no decisions: check its peers."
        }
    }
}

fn status_word(r: &ReputationRow) -> &'static str {
    if r.quarantined {
        "quarantined"
    } else if r.score < 0.5 {
        "suspect"
    } else {
        "healthy"
    }
}

pub(crate) async fn run_consensus(api: &Api, out: Output, cmd: ConsensusCmd) -> anyhow::Result<()> {
    let s: QuorumStatus = api.get("/v1/consensus/status").await?;
    match cmd {
        ConsensusCmd::QuorumStatus => {
            if out == Output::Json {
                return print_json(&s);
            }
            println!(
                "Committee epoch {}: n={} f={} quorum={} ({} replica here)",
                s.epoch,
                s.n,
                s.f,
                s.quorum,
                if s.replica { "a" } else { "no" }
            );
            println!(
                "View {} ({}), primary {}",
                s.view,
                if s.view_active { "active" } else { "changing" },
                s.primary.map(|p| p.short()).unwrap_or_else(|| "-".into())
            );
            println!(
                "Executed up to seq {}, stable checkpoint {}, {} requests pending; {} decisions and {} view changes since start",
                s.last_executed,
                s.stable_checkpoint,
                s.pending_requests,
                s.decisions,
                s.view_changes
            );
            println!(
                "Epoch ends at seq {}; membership: {} joined, {} ready to serve",
                s.epoch_ends_at
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "- (no epochs)".into()),
                s.joined,
                s.ready
            );
            if let Some(seq) = s.resumed_from {
                println!("Resumed at start from seq {seq} (its epoch's resume point on disk)");
            }
            if let Some((seq, epoch, peer)) = s.transferred {
                println!(
                    "Installed a certified snapshot at seq {seq} (epoch {epoch}) from {} \
                     (state transfer)",
                    peer.short()
                );
            }
            if s.transfers_refused > 0 {
                println!(
                    "Refused {} snapshot(s) that did not verify (a peer lied or sent garbage)",
                    s.transfers_refused
                );
            }
            if let Some(st) = s.stall {
                println!(
                    "CONSENSUS STALLED: last decision {} ago, {} requests pending, view {} ({})",
                    ago(st.quiet_ms),
                    s.pending_requests,
                    s.view,
                    if s.view_active {
                        "active"
                    } else {
                        "stuck changing"
                    }
                );
                println!("  Cause: {}", st.cause);
                println!("  {}", stall_hint(&st.cause));
            }
            if let Some((needed, offered)) = s.catch_up_gap {
                println!(
                    "CANNOT CATCH UP: needs seq {needed}, peers hold decisions from {offered} on \
                     (they keep acp.pbft.catch_up_mib of certificates); asking peers for a \
                     certified snapshot"
                );
            }
            table(
                &["MEMBER", "ROLE", "LAST HEARD"],
                s.members
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        vec![
                            format!("{}{}", m.short(), if *m == s.node { "*" } else { "" }),
                            if Some(*m) == s.primary {
                                "primary".into()
                            } else {
                                "backup".into()
                            },
                            heard_cell(*m == s.node, s.heard_ms.get(i).copied().flatten()),
                        ]
                    })
                    .collect(),
            );
            println!(
                "Members heard from in the last {}: {} of {} (a committee with nothing to \
                 decide sends few messages)",
                ago(s.stall_after_ms),
                s.heard,
                s.n
            );
        }
        ConsensusCmd::Probe { count } => {
            let mut ms = Vec::new();
            for i in 0..count {
                let v: serde_json::Value = api.post("/v1/consensus/probe", None).await?;
                let l = v["latency_ms"].as_f64().unwrap_or(f64::NAN);
                if out != Output::Json {
                    println!("probe {}: committed in {l:.1} ms", i + 1);
                }
                ms.push(l);
            }
            ms.sort_by(f64::total_cmp);
            if out == Output::Json {
                return print_json(&serde_json::json!({ "latency_ms": ms }));
            }
            if let (Some(min), Some(max)) = (ms.first(), ms.last()) {
                println!(
                    "min {min:.1} ms, median {:.1} ms, max {max:.1} ms",
                    ms[ms.len() / 2]
                );
            }
        }
        ConsensusCmd::Analyze { node } => {
            let id = resolve(api, &node).await?;
            let r: ReputationRow = api.get(&format!("/v1/reputation/{id}")).await?;
            let seat = s.members.iter().position(|m| *m == id);
            if out == Output::Json {
                return print_json(&serde_json::json!({
                    "node": id, "committee_index": seat, "primary": s.primary == Some(id),
                    "reputation": r,
                }));
            }
            println!("Node {id}");
            match seat {
                Some(i) => println!(
                    "Committee seat {i} of {}{}",
                    s.n,
                    if s.primary == Some(id) {
                        ", primary of the current view"
                    } else {
                        ""
                    }
                ),
                None => println!("Not in the committee (submits requests, votes on nothing)"),
            }
            println!("Score {:.2} ({})", r.score, status_word(&r));
            if r.offences.is_empty() {
                println!("No committed offences.");
            }
            for (kind, seq) in &r.offences {
                println!("Offence {kind} committed at seq {seq}");
            }
        }
    }
    Ok(())
}

pub(crate) async fn run_reputation(
    api: &Api,
    out: Output,
    cmd: ReputationCmd,
) -> anyhow::Result<()> {
    match cmd {
        ReputationCmd::List { threshold, sort } => {
            let mut rows: Vec<ReputationRow> = api.get("/v1/reputation").await?;
            if let Some(t) = threshold {
                rows.retain(|r| r.score < t);
            }
            match sort {
                SortBy::Score => rows.sort_by(|a, b| a.score.total_cmp(&b.score)),
                SortBy::Node => rows.sort_by_key(|r| r.node),
            }
            match out {
                Output::Json => return print_json(&rows),
                Output::Id => {
                    for r in &rows {
                        println!("{}", r.node);
                    }
                }
                Output::Table => table(
                    &["NODE", "SCORE", "OFFENCES", "VOTES", "STATUS"],
                    rows.iter()
                        .map(|r| {
                            vec![
                                r.node.short(),
                                format!("{:.2}", r.score),
                                r.offences.len().to_string(),
                                r.votes.len().to_string(),
                                status_word(r).into(),
                            ]
                        })
                        .collect(),
                ),
            }
        }
        ReputationCmd::Analyze { node } => {
            let id = resolve(api, &node).await?;
            let r: ReputationRow = api.get(&format!("/v1/reputation/{id}")).await?;
            if out == Output::Json {
                return print_json(&r);
            }
            println!(
                "Node {}: score {:.2} ({})",
                r.node,
                r.score,
                status_word(&r)
            );
            for (kind, seq) in &r.offences {
                println!("  offence {kind} (committed at seq {seq})");
            }
            for (voter, reason) in &r.votes {
                println!("  quarantine vote by {}: {reason}", voter.short());
            }
        }
        ReputationCmd::Quarantine { node, reason } => {
            let id = resolve(api, &node).await?;
            let body = serde_json::to_value(QuarantineRequest { node: id, reason })?;
            let v: serde_json::Value = api.post("/v1/reputation/quarantine", Some(body)).await?;
            if out == Output::Json {
                return print_json(&v);
            }
            println!(
                "quarantine vote for {} submitted to consensus (request nonce {}); it takes effect once f+1 nodes voted",
                id.short(),
                v["nonce"]
            );
        }
    }
    Ok(())
}
