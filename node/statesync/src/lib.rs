//! ASS: the cluster state of DWCP in an Automerge document, synced peer to peer, that a
//! Byzantine writer cannot corrupt. Sans-IO: no clock, no sockets, no threads; time and
//! randomness (a seed) come in as inputs.
//!
//! (The design, measured figures and decisions are summarised at the end of this page and in
//! `node/statesync/README.md`.)
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
    LoadError, WriteError,
};
pub use engine::{Command, Config, ConfigError, Engine, Offence, PeerStatus, SyncStats};
pub use schema::{ClusterView, NodeEntry, QuarantineRecord, VmRecord, VmSpec, VmState};
pub use validate::{Reject, Violation};
pub use wire::{Frame, FrameError};
