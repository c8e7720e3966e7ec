//! State transfer in the simulator, as the node does it (`node/src/transfer.rs`): a node that
//! sees traffic two or more epochs ahead asks the sender for its last epoch-start snapshot
//! and the epoch links from the node's own epoch, checks the chain from the committee it
//! has (`dwcp_consensus::transfer::verify_chain`) and the snapshot against the last link,
//! and installs it. A Byzantine sender lies: it serves a snapshot whose membership it
//! changed, which must be refused. An honest node that installed a wrong state would
//! break `reputation_agreement` or `committees` at its next decision or epoch.

use dwcp_consensus::{
    Committee, Engine, Handover,
    committee::Membership,
    committee::MembershipOp,
    transfer::{EpochLink, verify_chain},
};
use dwcp_protocol::Timestamp;
use dwcp_reputation as reputation;
use sha2::Digest as _;

use crate::{Event, Sim, app_state_of};

/// What a node keeps at each epoch start: what it serves to nodes asking for a snapshot.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub(crate) committee: Committee,
    pub(crate) end: u64,
    pub(crate) handover: Handover,
    pub(crate) rep: reputation::Engine,
    pub(crate) membership: Membership,
}

/// Least virtual time between two requests of one node, ms (the node's `TRANSFER_EVERY`).
const TRANSFER_EVERY_MS: u64 = 5_000;
/// Virtual time a request and its reply take, ms.
const TRANSFER_RTT_MS: u64 = 200;

impl Sim {
    /// Node `to` saw traffic of epoch `epoch` from node `from`: with epochs two or more
    /// ahead of its own, it asks `from` for a snapshot (at most every 5 s).
    pub(crate) fn maybe_ask_transfer(&mut self, to: usize, from: usize, epoch: u64) {
        let nd = &mut self.nodes[to];
        if self.s.epoch_length == 0 || epoch < nd.engine.committee().epoch() + 2 {
            return;
        }
        // Peers known to be ahead: asked in turn when one cannot serve.
        nd.transfer_peers.insert(from);
        if nd.transfer_refused_by == Some(from)
            || nd
                .transfer_asked_at
                .is_some_and(|t| self.now < t + TRANSFER_EVERY_MS)
        {
            return;
        }
        nd.transfer_asked_at = Some(self.now);
        let at = self.now + TRANSFER_RTT_MS;
        self.push(at, Event::Transfer { from, to });
    }

    /// `from` could not serve `to`: the next peer known to be ahead is asked 5 s later (the
    /// chain stops once `to` has caught up, see [`Sim::transfer`]).
    fn ask_next(&mut self, to: usize, from: usize) {
        let nd = &mut self.nodes[to];
        nd.transfer_refused_by = Some(from);
        let next = nd
            .transfer_peers
            .range(from + 1..)
            .chain(nd.transfer_peers.range(..from))
            .next()
            .copied()
            // None known yet: the same one again (by then others may be known).
            .unwrap_or(from);
        nd.transfer_asked_at = Some(self.now + TRANSFER_EVERY_MS);
        let at = self.now + TRANSFER_EVERY_MS + TRANSFER_RTT_MS;
        self.push(at, Event::Transfer { from: next, to });
    }

    /// `from` answers `to`'s request; `to` checks and installs what it got.
    pub(crate) fn transfer(&mut self, from: usize, to: usize) {
        if self.nodes[to].crashed || self.nodes[from].crashed {
            return;
        }
        if self.nodes[to].engine.committee().epoch() + 1
            >= self.nodes[from].engine.committee().epoch()
        {
            // Caught up meanwhile (by replay or an earlier snapshot): nothing to ask.
            return;
        }
        let known = self.nodes[to].engine.committee().clone();
        let src = &self.nodes[from];
        // A peer without a snapshot or with a gap in its links cannot serve (it may have
        // caught up across an epoch end, and so never seen that checkpoint's proof).
        let served = src.snapshot.clone().and_then(|snap| {
            let links = (known.epoch()..snap.committee.epoch())
                .map(|e| src.links.get(&e).cloned())
                .collect::<Option<Vec<EpochLink>>>()?;
            (!links.is_empty()).then_some((snap, links))
        });
        let Some((mut snap, links)) = served else {
            self.ask_next(to, from);
            return;
        };
        if src.byz {
            // The lie: the snapshot says the first member of its committee left.
            if let Some(m) = snap.committee.members().first() {
                snap.membership
                    .apply(Timestamp(self.now), &MembershipOp::Leave(*m));
            }
        }
        let checked = verify_chain(&known, &links, self.s.epoch_length)
            .ok()
            .zip(links.last())
            .filter(|(c, last)| {
                *c == snap.committee
                    && last
                        .check_snapshot(&snap.handover, &app_state_of(&snap.rep, &snap.membership))
                        .is_ok()
            })
            .is_some();
        if !checked {
            self.transfers_refused += 1;
            self.ask_next(to, from);
            return;
        }
        if snap.handover.seq <= self.nodes[to].engine.last_executed() {
            return;
        }
        let seq = snap.handover.seq;
        let cfg = self.s.consensus.clone();
        let nd = &mut self.nodes[to];
        let Ok(mut engine) = Engine::resume(cfg, nd.key.clone(), snap.committee, snap.handover)
        else {
            return;
        };
        if engine.set_end(snap.end).is_err() {
            return;
        }
        engine.handle_timeout(Timestamp(self.now));
        let ended = std::mem::replace(&mut nd.engine, engine);
        nd.view_offset += ended.view_in_epoch() + 1;
        nd.old.clear();
        nd.rep = snap.rep;
        nd.membership = snap.membership;
        nd.pending_link = None;
        nd.transfer_refused_by = None;
        // Its own requests that committed within the decisions it skipped are done (the
        // snapshot's executed-request windows say so).
        let me = nd.key.node_id();
        let engine = &nd.engine;
        nd.outstanding
            .retain(|nonce, _| !engine.has_executed(&me, *nonce));
        if !nd.byz {
            self.transfers_installed += 1;
            // The quarantines the snapshot carries are this node's now (the `quarantine`
            // invariant saw none of them happen here).
            let view = nd.view_offset;
            let quarantined: Vec<usize> = nd
                .rep
                .quarantined()
                .iter()
                .filter_map(|n| self.ids.get(n).copied())
                .collect();
            for j in quarantined {
                if let Err(v) = self.quarantine.quarantined(self.now, to, j, view) {
                    self.violation(v);
                }
            }
        }
        self.trace.update(b"transfer");
        self.trace.update((to as u64).to_be_bytes());
        self.trace.update(seq.to_be_bytes());
        self.drain(to);
    }
}
