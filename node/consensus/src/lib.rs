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
//!   (a hash chain over batch digests); 2f+1 matching make it stable, the log below is
//!   discarded and the watermarks move (`H = h + L`, `L = 2K`).
//! * View change [4.4]: a backup whose request timer (10 s, doubling per failed attempt) expires
//!   multicasts a view change with its stable checkpoint proof and a prepared certificate per
//!   prepared slot; the new primary collects 2f+1, computes `O` (the highest-view prepared
//!   batch per slot, null requests in the gaps) and multicasts a new view, which backups check
//!   by recomputing `O`. f+1 view changes for higher views make a replica join [4.5.2].
//! * Catch-up: a replica that sees a stable checkpoint ahead of it, or is stalled, asks a peer
//!   (`Fetch`) and gets commit certificates (`Decided`), which it verifies before executing.
//!   Nodes outside the committee use the same path to learn decisions.
//! * Misbehaviour surfaces as [`Command::ReportPeer`]: equivocation (two signed votes of one
//!   kind for one slot with different digests, checkable by anyone with [`check_equivocation`])
//!   and votes contradicting a committed certificate ([`check_contradiction`]) are evidence for
//!   reputation; everything else is a local observation.
//! * Committees are a pure function of committed state ([`committee::select`]).
//!
//! # What is measured (dwcp-sim, which runs this engine unchanged; details in its README)
//!
//! * Commit latency with 50 ms one-way links: 150 ms p50 and p99 from proposal to commit at
//!   n = 4, 16 and 64 (exactly 3 one-way delays); 200 / 206 / 249 ms p50 from a client's
//!   submission to commit at that client.
//! * Throughput at n = 16: 72 req/s with one outstanding request per client, 1,782 req/s with
//!   32 (batching at unchanged latency), 33 req/s with batching off.
//! * Chaos sweeps (loss, partitions, crashes, f Byzantine of 3f+1 with eight strategies):
//!   0 safety violations (n = 4: 24 seeds, n = 7: 32, n = 16: 6); every seed live after faults
//!   stop except one n = 16 seed, where view changes outgrew the payload limit (below).
//!
//! # Decisions
//!
//! * The pre-prepare header is signed on its own and quoted in prepares, so a primary that
//!   sends different batches to different backups is caught with two of its own signatures.
//! * New-view messages name view changes by digest instead of embedding them (replicas fetch
//!   missing ones with `FetchViewChanges`), so a new view stays small.
//! * Batches are capped at 256 requests and 96 KiB. View-change messages still carry a
//!   prepared certificate (with its batch) per prepared slot above the stable checkpoint, as
//!   in the paper: with K = 100 and large committees they can outgrow the 256 KiB payload
//!   limit. Digest-only view changes with proof fetching (the paper's TOCS variant) are the
//!   fix; not done yet.
//! * The request timer restarts on every execution while requests wait (per-request timers
//!   would also catch a primary that starves one client while serving others).
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod certificate;
pub mod committee;
mod engine;
pub mod messages;

pub use certificate::{
    CastVote, CertificateError, CertifiedBatch, CommitProof, VoteKind, check_contradiction,
    check_equivocation, contradicts, read_vote,
};
pub use committee::Committee;
pub use engine::{Command, Config, ConfigError, Decision, Engine, Input, Offence};
pub use messages::{
    CommitCertificate, ConsensusMsg, Digest, NewView, PrePrepare, PreparedProof, Request, Slot,
    ViewChange,
};

#[cfg(test)]
mod engine_tests;
