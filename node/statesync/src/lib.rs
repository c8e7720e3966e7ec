//! ASS: the cluster state of DWCP in one Automerge document, synced peer to peer, that a
//! Byzantine writer cannot corrupt. Sans-IO: no clock, no sockets, no threads; time comes in
//! as `now`, randomness from a seed in [`Config`].
//!
//! # Pieces
//!
//! | module | what |
//! | --- | --- |
//! | [`schema`] | the documented document layout and typed records |
//! | [`doc`] | [`ClusterDoc`]: typed writers, readers, actor binding, change signatures, ingest, save/load, export, checksum, lag, conflicts, compaction |
//! | [`validate`] | the ownership rules every change from the network must pass |
//! | [`cert`] | [`CertificateVerifier`]: consensus's commit certificates, opaque here |
//! | [`engine`] | [`Engine`]: per-peer sync sessions, anti-entropy, nudges, bounded messages |
//! | [`wire`] | the frames (sync, nudge, probe) |
//! | `fake`, `harness` | (feature `test-utils`) a fake committee and an in-process multi-node harness |
//!
//! # Ownership and the actor binding
//!
//! A node's actor id is its node id (ed25519 public key, 32 bytes) plus an 8-byte
//! incarnation. Automerge changes are unsigned and are relayed by third nodes, so every change
//! travels with an ed25519 signature by the actor's node key over its hash; the hash chains
//! the change to its dependencies. A change is applied only if (1) its signature verifies for
//! the node named by its actor, (2) every operation writes either inside the author's own
//! `nodes/<id>` entry, with schema keys and types, or creates a VM/quarantine record whose
//! fields equal the decision its commit certificate certifies, and (3) it does not depend on a
//! refused change. The check runs on the decoded operations before Automerge sees the change,
//! against an index of objects built from the accepted history only, so every honest replica
//! reaches the same verdict. Refused changes are dropped, the peer is reported
//! ([`Command::ReportPeer`]), and the rest of the message is processed.
//!
//! # Sync
//!
//! One `automerge::sync::State` per peer. Every `interval_ms` (1 s) the engine picks `fanout`
//! (6) connected peers with its seeded RNG and sends each a 44-byte probe (a digest of its
//! heads); a peer whose heads differ answers with a full sync message and the Automerge
//! exchange runs from there. Probing first instead of pushing (`push_on_round`, off by
//! default) cost 0.1 round of latency and cut steady traffic by a third in the bench, because
//! a session cannot know what its peer learnt from others since. A local write publishes a
//! gossip nudge that carries the new change itself when it is small. Sessions reset on reconnect, on a failed send and when
//! a reply is overdue. Messages are bounded by `max_message_bytes` (512 KiB by default): the
//! engine withholds Automerge's V2 capability so it never sends the whole document (the
//! "more than a third missing" path), and cuts change lists at a topological prefix that
//! fits; the rest goes in the next message. Changes whose dependencies have not arrived are
//! held (up to 8 MiB) and their dependencies requested.
//!
//! # Durability and size
//!
//! [`ClusterDoc::save`] gives bytes for the driver to write to sled (header, signatures,
//! Automerge document); [`ClusterDoc::load`] restores them and the node catches up through
//! normal sync. [`ClusterDoc::compact`] replaces the history by an epoch snapshot at a cut
//! agreed through consensus ([`EpochCut`]): every node builds the byte-identical base change
//! (fixed epoch actor, time 0, key order), dropping departed nodes, finished VMs and released
//! quarantines, then re-writes its own entry and any certified record newer than the cut.
//!
//! # Measured (release build, `examples/bench.rs`; see `README.md` for the full tables)
//!
//! - 1,000 nodes, 20 connections each, fanout 6, interval 1 s: a new change reaches every
//!   node in 3.1 s (p99 3.1 s) with the default probe-first anti-entropy, 4.1 s with 10 %
//!   loss, 6.05 s with push only (baseline), 0.15 s with the gossip nudge. 10,000 nodes: all
//!   in 4.1 s (p99 4.05 s).
//! - 1,000 nodes + 10,000 VMs: 13.2 MB in memory with the full history of 12,001 signed
//!   changes and fake 143 B certificates (18.7 MB with the node's 720 B certificates at
//!   n = 4, 31 MB at n = 31), 4.9 MB after compaction at any committee size (target
//!   <= 20 MB). Automerge's whole-document message
//!   would be 1.7 MB, over the 1 MiB protocol limit, hence the bounded change batches.
//! - Steady traffic: 264-436 B/node/s when idle (probes). With every node writing a heartbeat
//!   every 10 s it is dominated by change bytes delivered several times over (epidemic
//!   redundancy; each change also lists its dependencies' hashes): 9.8 KB/node/s at 30
//!   nodes, 61 KB/node/s at 100 nodes (push-only baseline: 14.7 and 92 KB/node/s). Heartbeats should therefore be written into the
//!   document rarely (status changes, or every minute); liveness travels in gossip heartbeats.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cert;
pub mod doc;
pub mod engine;
#[cfg(any(test, feature = "test-utils"))]
pub mod fake;
#[cfg(any(test, feature = "test-utils"))]
pub mod harness;
pub mod schema;
pub mod validate;
pub mod wire;

pub use automerge::ChangeHash;
pub use cert::{CertError, CertificateVerifier, Certified, QuarantineDecision, VmDecision};
pub use doc::{
    ChangeSignature, ClusterDoc, CompactError, ConflictCounts, DocStats, EpochCut, IngestReport,
    LoadError, WriteError, change_hash, read_export,
};
pub use engine::{Command, Config, ConfigError, Engine, Offence, PeerStatus, SyncStats};
pub use schema::{ClusterView, NodeEntry, QuarantineRecord, VmRecord, VmSpec, VmState};
pub use validate::{Reject, Violation};
pub use wire::{Frame, FrameError};
