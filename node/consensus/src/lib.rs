//! ACP: PBFT over ed25519-signed votes (sans-IO).
//!
//! This crate is the Byzantine agreement core of DWCP: Castro and Liskov's Practical Byzantine
//! Fault Tolerance (OSDI'99) over [`dwcp_protocol::SignedEnvelope`]s. It does no I/O: an
//! [`Engine`] takes `(now, Input)` and queues [`Command`]s, quinn-proto/openraft style:
//!
//! ```text
//!   driver / simulator                       Engine (this crate)
//!   ------------------                       -------------------
//!   bytes -> decode_verified -> Verified<T> --handle(now, Input)-->  log, votes, timers
//!   sleep_until(poll_timeout())            --handle_timeout(now)-->
//!   send / deliver / report  <--------------- poll_command() ------  Command queue
//! ```
//!
//! The engine only ever sees [`dwcp_protocol::Verified`] messages, so an unsigned or wrongly
//! signed message never reaches it; the driver drops those (and tells its peer manager).
//!
//! # Protocol (paper section in brackets)
//!
//! * Requests are signed by their client and keyed `(client, nonce)`; each executes at most
//!   once [4.1]. A backup relays a new request to the primary.
//! * Normal case [4.2]: the primary sends a *proposal*: its signed pre-prepare header
//!   `(v, n, d, t)` plus the batch. Backups check it and multicast a prepare that quotes the
//!   header; with 2f matching prepares the slot is *prepared* and each replica multicasts a
//!   commit; 2f+1 matching commits form a [`CommitCertificate`] (*committed-local*), and batches
//!   execute in sequence order, emitted as [`Command::Deliver`].
//! * Batching (the sliding window of the TOCS'02 version): the primary keeps at most
//!   `max_inflight` batches in flight; requests arriving meanwhile go out together.
//! * Checkpoints [4.3] every `K` = 100 sequence numbers sign a digest of the replicated log
//!   (a hash chain over batch digests), the executed-request windows and, with
//!   [`Config::app_digests`], the application's state ([`checkpoint_digest`]); 2f+1 matching
//!   make it stable, the log below is discarded and the watermarks move (`H = h + L`,
//!   `L = 2K`). Certified checkpoints at epoch ends chain committees for state transfer
//!   ([`transfer`]).
//! * View change [4.4]: a backup whose request timer (10 s, doubling per failed attempt) expires
//!   multicasts a view change: a head with its stable checkpoint proof and the *claims*
//!   `(v, n, d)` of its prepared slots, then [`ViewChangeProofs`] parts with the prepared
//!   certificates in compact form (header + 2f prepare signatures, no batch; each part under
//!   [`MAX_PROOF_PART_BYTES`]). The new primary collects 2f+1 complete view changes, computes
//!   `O` (the highest-view prepared digest per slot, null requests in the gaps) and multicasts
//!   a new view of signed headers only, which backups check by recomputing `O`. Replicas that
//!   lack a re-proposed batch fetch it (`FetchBatch` / `Batch`) from a node that vouched for
//!   it; the new primary proposes nothing new until it holds them all. f+1 view changes for
//!   higher views make a replica join [4.5.2].
//! * Catch-up: a replica that sees a stable checkpoint ahead of it, or is stalled, asks a peer
//!   (`Fetch`) and gets commit certificates (`Decided`), which it verifies before executing.
//!   Nodes outside the committee use the same path to learn decisions.
//! * Misbehaviour surfaces as [`Command::ReportPeer`]: equivocation (two signed votes of one
//!   kind for one slot with different digests, checkable by anyone with [`check_equivocation`])
//!   and votes contradicting a committed certificate ([`check_contradiction`]) are evidence for
//!   reputation; everything else is a local observation.
//! * The batch digest is a Merkle root (RFC 9162 shape) over the requests' hashes, bound to
//!   the batch length ([`Digest::of_batch`]), so a [`RequestProof`] (commit proof + one
//!   request + its Merkle path) proves that one request committed without carrying the batch:
//!   ~1.0 KB at n = 4, ~4.1 KB at n = 31 for a small request, growing by 34 bytes per
//!   doubling of the batch (test `request_proof_sizes_grow_with_the_quorum_not_the_batch`).
//!   Its compact form ([`CompactRequestProof`]) keeps each commit as the voter's committee
//!   index and signature (every commit of a slot signs the same `Commit(slot)`, so the
//!   envelope is rebuilt for checking): 684 B at n = 4, 1,980 B at n = 31. The node writes
//!   the compact form as the commit certificate of a decision in the cluster document.
//! * Committees are a pure function of committed state ([`committee::select`]), recomputed at
//!   epoch boundaries ([`committee::next_committee`] over a [`committee::Membership`] built
//!   from committed joins and leaves).
//!
//! # Message sizes
//!
//! Every message is one [`dwcp_protocol::SignedEnvelope`] of kind `Consensus` (payload limit
//! 256 KiB) or `ConsensusRequest` (64 KiB). What bounds each, whatever the committee size (up
//! to 256 members):
//!
//! | message | bound | typical size |
//! | --- | --- | --- |
//! | `Proposal` | batch cap `max_batch_bytes` (96 KiB default, at most 192 KiB) | 0.3-96 KiB |
//! | `Prepare`, `Commit`, `Checkpoint`, `Fetch*` | fixed | 150-350 B |
//! | `ViewChange` head | 1,024 claims of ~60 B + 2f+1 checkpoint signatures | 11 KB at n = 64, L = 200 |
//! | `ViewChangeProofs` part | [`MAX_PROOF_PART_BYTES`] (144 KiB) of certificates | ~3 KB per slot at n = 64 |
//! | `NewView` | 1,024 headers of ~180 B + 256 view-change digests | 41 KB at L = 200 |
//! | `Batch` | one batch | as `Proposal` |
//! | `Decided` | 64 certificates or 192 KiB, whichever first | |
//!
//! The worst case at n = 64 (every slot of the window prepared, nothing stable: 200
//! certificates of 42 prepares, 650 KB in all) is an 11 KB head and five parts (four of
//! 147 KB, one of 65 KB), and a 41 KB new view; the largest message is 56% of the limit
//! (test `worst_case_view_change_at_n64_stays_under_the_payload_limit`). Before, the same
//! view change was one message of ~2.8 MB (estimated: per slot the batch and 42 whole prepare
//! envelopes of ~330 B).
//!
//! # Driver contract (for the node's tokio task)
//!
//! The engine is a state machine without clock, sockets or threads. A driver (the node; the
//! simulator `dwcp-sim` is a second one) owns one [`Engine`] per committee epoch and must:
//!
//! **Feed it**
//! * every consensus envelope from the network, after `SignedEnvelope::decode_verified`
//!   (drop anything that fails; never pass unverified bytes), as
//!   [`Input::Message`], and every client request (`ConsensusRequest` envelopes, from local
//!   API calls or relayed) as [`Input::Request`], with `now` = the local wall clock in
//!   milliseconds since the Unix epoch;
//! * timers: after every call, read [`Engine::poll_timeout`] and call
//!   [`Engine::handle_timeout`] once that instant is reached (one `sleep_until` that is reset
//!   whenever the deadline changes; calling it early is harmless);
//! * committed state it needs across epochs: at a stable checkpoint that is an epoch boundary
//!   ([`committee::is_epoch_boundary`]), compute the next committee with
//!   [`committee::next_committee`] from the [`committee::Membership`] and the reputation
//!   table *as of that checkpoint* and start a new engine for it with [`Engine::resume`]
//!   (the node ends each epoch's engine with [`Engine::set_end`] at the boundary and switches
//!   once it executed it; see `node/src/consensus.rs`).
//!
//! **Act on every [`Command`]** (drain [`Engine::poll_command`] until `None` after each call):
//! * `Broadcast(env)`: publish `env.encode()` on the gossipsub topic of consensus votes
//!   (`dwcp/consensus/<epoch>`), which reaches every member. `Proposal`, `Prepare`, `Commit`,
//!   `Checkpoint`, `ViewChange`, `ViewChangeProofs` and `NewView` go this way. The gossip max
//!   transmit size must be at least `MessageKind::Consensus.max_envelope()`.
//! * `Send { to, envelope }`: a direct request-response on `/dwcp/consensus/3.0.0`
//!   (max frame = the consensus envelope limit): `Fetch`, `Decided`, `FetchViewChanges`,
//!   `FetchBatch`, `Batch`, and requests a backup relays to the primary. Replies come back as
//!   ordinary inputs (feed the response envelope as [`Input::Message`]); a lost or failed
//!   request needs no handling, the engine retries on its timers.
//! * `Deliver(decision)`: persist `decision.certificate` and apply `decision.requests` to the
//!   replicated state in order, exactly once per `decision.seq` (a restarted node replays from
//!   its store). Use `decision.time` (the primary's batch time, equal everywhere) as the time
//!   of every state change, never the local clock. Reputation changes come only from here:
//!   evidence operations and participation records (`dwcp_reputation::Participation`, the
//!   commit certificate of one slot submitted as a request). The decision's own certificate
//!   must not be used for rewards: its 2f+1 voters are the first to reach this replica and
//!   differ from replica to replica.
//! * `ReportPeer { peer, offence }`: `Equivocation` and `ContradictsCertificate` become
//!   evidence requests (`dwcp_reputation::Evidence`, submitted once per offender in flight);
//!   `Invalid` is local: log it and lower the peer's gossip score.
//! * `ViewChangeStarted`: increment `dwcp_pbft_view_changes_total`. `NewViewInstalled`,
//!   `StableCheckpoint`: log; a stable checkpoint is where the driver may prune its store
//!   below and check for an epoch boundary.
//! * Latency: `dwcp_consensus_latency_seconds` is from a request's submission to its
//!   `Deliver` at the submitting node.
//!
//! **Persistence.** A replica must not sign two different votes for one slot across a
//! restart: persist the engine's outgoing votes (or at least the highest view and the last
//! vote per slot) before sending, or restart as a fresh observer that catches up with `Fetch`
//! and only votes from the next view on. The node does the first (`node/src/votelog.rs`:
//! votes are made durable before they are sent, and a message whose vote conflicts with one
//! cast before the restart is held back). The engine itself keeps nothing on disk; state
//! transfer between nodes uses the epoch-start snapshots of [`transfer`].
//!
//! # What is measured (dwcp-sim, which runs this engine unchanged; details in its README)
//!
//! See `testnet/sim/README.md` and `docs/measurements.md` (consensus section) for commit
//! latency at n = 4/16/64 with 50 ms links, throughput with batching, and the chaos sweeps
//! (safety and liveness over seeds, n = 4, 7, 16, 31, every strategy).
//!
//! # Decisions
//!
//! * The pre-prepare header is signed on its own and quoted in prepares, so a primary that
//!   sends different batches to different backups is caught with two of its own signatures.
//!   Only prepares quoting the accepted header count toward `prepared`, and `committed-local`
//!   requires `prepared` (as in the paper), so the committed header (and its time) is the one
//!   2f+1 replicas vouched for.
//! * View changes carry digests and signatures, never batches: a prepared certificate is the
//!   header plus 2f `(committee index, signature)` pairs; the prepare envelopes are rebuilt
//!   from the header and verified. Its size is `~70 B x 2f` per slot, so at n = 64 a full
//!   window (200 slots) is ~600 KB: more than one message can hold, hence the parts.
//! * New-view messages name view changes by the digest of their head (replicas fetch missing
//!   ones, head and parts, with `FetchViewChanges`), so a new view stays small.
//! * The request timer restarts on every execution while requests wait (per-request timers
//!   would also catch a primary that starves one client while serving others).
//!
//! # Not done
//!
//! * The engine runs one committee; an epoch change means a new engine (the driver's job,
//!   above): [`Engine::set_end`] bounds an epoch, [`Engine::handover`] and
//!   [`Engine::take_pending`] give the next epoch's [`Engine::resume`] the log digest, the
//!   executed-request windows and the waiting requests, and [`Engine::covers`] routes
//!   messages between epochs. The simulator drives epochs the same way (`--epoch-length`).
//! * No snapshot of the engine's own state (its log, views, vote counts); a restarted
//!   replica starts a fresh engine and catches up (see the driver contract). Replicated
//!   state is snapshotted only at epoch starts ([`transfer`]).
//! * A replica whose view change does not complete re-sends all of it (head and every
//!   proof part) every resend interval (1 s) until it does; with many prepared slots that
//!   is several 144 KiB parts a second. Backing off, or re-sending the head alone and
//!   letting peers fetch the parts they lack (`FetchViewChanges`), would cost less; not
//!   done, since it changes every recorded simulator run.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod certificate;
pub mod committee;
mod engine;
pub mod messages;
pub mod transfer;

pub use certificate::{
    CastVote, CertificateError, CertifiedBatch, CommitProof, CommittedRequest, CompactRequestProof,
    CompactVote, RequestProof, VoteKind, check_contradiction, check_equivocation, contradicts,
    read_vote,
};
pub use committee::Committee;
pub use engine::{
    Command, Config, ConfigError, Decision, Engine, Handover, Input, Offence, VIEWS_PER_EPOCH,
    checkpoint_digest, epoch_of_view, first_view, stable_proof_digest,
};
pub use messages::{
    CommitCertificate, ConsensusMsg, Digest, MAX_PROOF_PART_BYTES, NewView, PrePrepare,
    PreparedProof, Request, Slot, ViewChange, ViewChangeProofs, VoteSignature,
};

#[cfg(test)]
mod engine_tests;
