//! Wire types of DWCP v3: identifiers, the signed envelope, messages, protocol versions and
//! the JSON types of the node's local API.
//!
//! This crate does no I/O. Everything that crosses the network between nodes is a
//! [`SignedEnvelope`]: canonical CBOR bytes of one message, signed with the author's ed25519
//! key under a domain-separation tag for that message kind. A receiver turns the bytes into a
//! [`Verified<T>`] with [`SignedEnvelope::decode_verified`]; it is the only way to obtain one,
//! so code that takes a `Verified<T>` never sees an unsigned, wrongly signed, oversized or
//! malformed message.
//!
//! ```text
//!  bytes from the network
//!        |  decode envelope (size limit per kind, no trailing bytes)
//!        v
//!  SignedEnvelope { kind, signer, payload, signature }
//!        |  verify_strict(signature, domain(kind) || payload)
//!        |  decode payload as T (size limit, canonical re-encoding, T::validate)
//!        v
//!  Verified<T>   <- the engines only accept this
//! ```
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod api;
pub mod control;
pub mod envelope;
pub mod ids;
pub mod messages;
mod sigcache;
pub mod version;

pub use envelope::{DecodeError, Message, MessageKind, SignedEnvelope, Verified};
pub use ids::{IdError, NodeId, NodeKey, Timestamp, VmId};
pub use messages::{
    Allocation, DonatedShare, Gpu, Health, HealthStatus, Heartbeat, NodeAnnouncement, Resources,
    ValidationError,
};
pub use sigcache::signature_cache_stats;
