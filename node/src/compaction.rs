//! Compaction of the cluster document through consensus (issue 6: "keep memory and history
//! bounded"): a proposer cuts at its document's heads, collects f+1 member endorsements (each
//! member endorses only when it holds every head), and commits a [`CutDecisionOp`]. Every
//! member applies the first valid cut per epoch in decision order and hands it to its
//! state-sync driver, which replaces the history by the snapshot at the cut (dropping departed
//! nodes, finished VMs and released quarantines, `dwcp_statesync::ClusterDoc::compact`); nodes
//! outside the committee take it once f+1 members answer with it (`crate::statesync`).
//!
//! ```text
//!  proposer: summary (epoch e, heads H) -> CutSpec { e+1, H, now - departed_after }
//!     -> own endorsement + TAG_ENDORSE to each member (retried while heads travel)
//!     -> f+1 endorsements -> Consensus::decide(CutDecisionOp)  --commit-->  every member:
//!        AcpState: first valid cut of epoch e+1 -> statesync Input::Cut -> compact when H is here
//! ```
//!
//! Who proposes: `dwcp-cli state-sync compact` on any node with consensus, or, once the history
//! holds `ass.compaction.after_changes` changes, the committee member whose turn it is
//! (`epoch mod n`), the next ones after one and two more check intervals if nothing committed.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use dwcp_consensus::Committee;
use dwcp_net::{Client, Service};
use dwcp_protocol::{NodeId, SignedEnvelope};
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, task::JoinSet};
use tracing::{debug, info, warn};

use crate::{
    cert::{CutDecisionOp, CutEndorsement, CutSpec},
    config::AssCompaction,
    consensus::Consensus,
    statesync::{StateSync, TAG_ENDORSE},
};

/// How long a proposer keeps asking members for endorsements (heads travel by anti-entropy).
const ENDORSE_FOR: Duration = Duration::from_secs(20);
/// How long the committee has to commit the cut.
const DECIDE_TIMEOUT: Duration = Duration::from_secs(25);

/// What a compaction proposal did (`POST /v1/state-sync/compact`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactReport {
    /// The document epoch the cut starts.
    pub epoch: u64,
    /// Heads cut at.
    pub heads: usize,
    /// Changes in the proposer's history when it cut.
    pub changes_before: usize,
    /// Members whose endorsements the decision carries.
    pub endorsers: Vec<NodeId>,
    /// Size of the decision's commit certificate.
    pub certificate_bytes: usize,
    /// Milliseconds from the start of the proposal to the commit.
    pub elapsed_ms: u64,
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Proposes a cut at this node's heads and waits until it commits. The state-sync driver
/// compacts once the cut reaches it (from consensus, or from the returned certificate here).
pub async fn compact_now(
    sync: &StateSync,
    consensus: &Consensus,
    client: &Client,
    me: NodeId,
    departed_after: Duration,
) -> anyhow::Result<CompactReport> {
    let started = Instant::now();
    let committee = consensus
        .committee()
        .context("no committee is configured")?;
    let changes_before = sync.summary().await?.changes;
    let spec = sync
        .plan_cut(wall_ms().saturating_sub(departed_after.as_millis() as u64))
        .await?;
    let (endorsers, endorsements) = endorse(sync, client, &committee, me, &spec)
        .await?
        .into_iter()
        .unzip();
    let op = CutDecisionOp {
        cut: spec.clone(),
        endorsements,
    };
    info!(
        epoch = spec.epoch,
        heads = spec.heads.len(),
        "proposing a compaction cut"
    );
    let certificate = consensus.decide(op.encode(), DECIDE_TIMEOUT).await?;
    let certificate_bytes = certificate.len();
    // Members get the cut from their consensus driver too; a node outside the committee
    // learns its own decision here.
    sync.offer(crate::statesync::Input::Cut(certificate));
    Ok(CompactReport {
        epoch: spec.epoch,
        heads: spec.heads.len(),
        changes_before,
        endorsers,
        certificate_bytes,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

/// Collects f+1 endorsements of `spec` from distinct members: this node's own (if a member)
/// and the others' over the sync service, asking again every second for up to
/// [`ENDORSE_FOR`] while the heads travel.
async fn endorse(
    sync: &StateSync,
    client: &Client,
    committee: &Committee,
    me: NodeId,
    spec: &CutSpec,
) -> anyhow::Result<Vec<(NodeId, SignedEnvelope)>> {
    let need = committee.f() + 1;
    let mut got: Vec<(NodeId, SignedEnvelope)> = Vec::new();
    let mut from: BTreeSet<NodeId> = BTreeSet::new();
    let mut body = vec![TAG_ENDORSE];
    ciborium::into_writer(spec, &mut body).context("encoding the cut")?;
    let deadline = Instant::now() + ENDORSE_FOR;
    let mut last_refusal = String::new();
    loop {
        if committee.contains(&me) && !from.contains(&me) {
            match sync.endorse(spec.clone()).await {
                Ok(env) => {
                    from.insert(me);
                    got.push((me, env));
                }
                Err(e) => last_refusal = format!("this node: {e}"),
            }
        }
        let mut asks = JoinSet::new();
        for m in committee.members() {
            if *m == me || from.contains(m) {
                continue;
            }
            let Ok(pid) = m.to_peer_id() else { continue };
            let (client, body, member) = (client.clone(), body.clone(), *m);
            asks.spawn(async move {
                let r = tokio::time::timeout(
                    Duration::from_secs(3),
                    client.request(pid, Service::Sync, body),
                )
                .await;
                (member, r.ok().and_then(|r| r.ok()))
            });
        }
        while let Some(Ok((member, answer))) = asks.join_next().await {
            let Some(bytes) = answer else { continue };
            if bytes.first() == Some(&0xff) {
                last_refusal = format!("{} refused", member.short());
                continue;
            }
            match endorsement_from(&bytes, member, spec) {
                Ok(env) => {
                    if from.insert(member) {
                        got.push((member, env));
                    }
                }
                Err(e) => {
                    warn!(peer = %member.short(), error = %e, "a member's endorsement is invalid")
                }
            }
        }
        if got.len() >= need {
            got.truncate(need);
            return Ok(got);
        }
        if Instant::now() >= deadline {
            bail!(
                "only {} of the {need} endorsements needed within {} s (last refusal: {})",
                got.len(),
                ENDORSE_FOR.as_secs(),
                if last_refusal.is_empty() {
                    "none"
                } else {
                    &last_refusal
                }
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Checks a member's answer: a signed request by that member endorsing exactly `spec`.
fn endorsement_from(
    bytes: &[u8],
    member: NodeId,
    spec: &CutSpec,
) -> anyhow::Result<SignedEnvelope> {
    let env = SignedEnvelope::decode(bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let r = env
        .clone()
        .verify::<dwcp_consensus::Request>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if r.signer() != member {
        bail!("signed by another node");
    }
    if CutEndorsement::decode(&r.op).map_err(|e| anyhow::anyhow!("{e}"))? != spec.endorsement() {
        bail!("endorses another cut");
    }
    Ok(env)
}

/// Proposes cuts on its own once the history is long (`ass.compaction.after_changes`), if
/// this node is a committee member: the member at `epoch mod n` first, member `k` places
/// later after `k` more check intervals, so normally one member proposes.
pub fn spawn(
    cfg: AssCompaction,
    sync: StateSync,
    consensus: Consensus,
    client: Client,
    me: NodeId,
    mut stop: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    if cfg.after_changes == 0 {
        return None;
    }
    consensus.committee()?;
    let cfg = Arc::new(cfg);
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(cfg.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // (epoch, ticks seen over the threshold)
        let mut over: Option<(u64, u64)> = None;
        loop {
            tokio::select! {
                r = stop.changed() => if r.is_err() || *stop.borrow() { break },
                _ = tick.tick() => {}
            }
            let Ok(s) = sync.summary().await else {
                continue;
            };
            if s.changes < cfg.after_changes {
                over = None;
                continue;
            }
            let ticks = match over {
                Some((e, t)) if e == s.epoch => t + 1,
                _ => 0,
            };
            over = Some((s.epoch, ticks));
            // The committee of the current consensus epoch takes turns.
            let Some(committee) = consensus.committee() else {
                continue;
            };
            let Some(my_index) = committee.index_of(&me) else {
                continue;
            };
            let (my_index, n) = (u64::from(my_index), committee.n() as u64);
            let turn = (my_index + n - s.epoch % n) % n;
            if ticks < turn {
                continue;
            }
            debug!(
                epoch = s.epoch,
                changes = s.changes,
                "history is long; proposing a cut"
            );
            match compact_now(&sync, &consensus, &client, me, cfg.departed_after).await {
                Ok(r) => info!(
                    epoch = r.epoch,
                    changes_before = r.changes_before,
                    elapsed_ms = r.elapsed_ms,
                    "compaction cut committed"
                ),
                Err(e) => warn!(error = %e, "compaction proposal failed"),
            }
        }
    }))
}
