//! DWCP's libp2p networking: one composed [`NetworkBehaviour`](libp2p::swarm::NetworkBehaviour)
//! behind a [`Client`] / [`EventLoop`] / [`Event`] split (the shape of rust-libp2p's
//! `examples/file-sharing`).
//!
//! - **Transports:** QUIC (v1) first, TCP with noise and yamux as the fallback; a relay v2
//!   client on nodes and a relay v2 server on bootstrap peers.
//! - **Discovery:** Kademlia in server mode on [`KAD_PROTOCOL`](dwcp_protocol::version::KAD_PROTOCOL),
//!   bootstrapped from the configured bootstrap peers and refreshed by random walks. Peers
//!   found are dialled until the node has [`NetConfig::target_peers`] connections.
//! - **Dissemination:** gossipsub with signed messages, strict validation and
//!   `validate_messages()`: nothing is forwarded until the application has checked it and called
//!   [`Client::report_validation`]. Peer scoring (see [`scoring`]) penalises peers that send
//!   messages the application rejects.
//! - **Direct requests:** one `request_response` behaviour per [`Service`] (state sync,
//!   consensus, control), length-prefixed frames with a per-service size limit checked
//!   before the body is read; [`Client::request`] and [`Event::Request`] / [`Client::respond`].
//! - **Housekeeping:** identify (with the DWCP version policy: peers of another major version
//!   are disconnected), ping, AutoNAT, connection limits.
//!
//! ```text
//!   application (dwcp-node)              dwcp-net                       network
//!   ----------------------   Command    ------------   Swarm events   ----------
//!   Client::publish(..)  ------------>  EventLoop    <--------------  peers
//!   Event::Gossip{..}    <------------  (owns Swarm) -------------->
//!   Client::report_validation(..) --->      |  bounded channels both ways
//! ```
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod amst;
mod behaviour;
mod config;
mod event_loop;
mod rpc;
pub mod scoring;

pub use config::{NetConfig, Role};
pub use event_loop::{
    Client, Event, EventLoop, GossipMessage, InboundRequest, NetStats, ReplyHandle, Validation,
};
pub use libp2p::{Multiaddr, PeerId};
pub use rpc::{MAX_STATE_TRANSFER_FRAME, Service};

/// Why the network could not be started or a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// A transport could not be built.
    #[error("building the libp2p transport")]
    Transport(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A behaviour's configuration is invalid.
    #[error("invalid {component} configuration: {reason}")]
    Config {
        /// Which behaviour.
        component: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Listening on an address failed.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// The cause.
        #[source]
        source: libp2p::TransportError<std::io::Error>,
    },
    /// Subscribing to a topic failed.
    #[error("cannot subscribe to {topic}: {reason}")]
    Subscribe {
        /// Topic.
        topic: String,
        /// Cause.
        reason: String,
    },
    /// Publishing failed (no peers in the topic yet, message too large, duplicate, ...).
    #[error("cannot publish on {topic}: {reason}")]
    Publish {
        /// Topic.
        topic: String,
        /// Cause.
        reason: String,
    },
    /// Dialling failed.
    #[error("cannot dial {addr}: {reason}")]
    Dial {
        /// Address.
        addr: String,
        /// Cause.
        reason: String,
    },
    /// A request to a peer failed (dial failure, timeout, connection closed, the peer does
    /// not speak the protocol, or an I/O error such as an oversized frame).
    #[error("{service} request to {peer} failed: {reason}")]
    Request {
        /// Service label.
        service: &'static str,
        /// The peer asked.
        peer: PeerId,
        /// Cause.
        reason: String,
    },
    /// The event loop has stopped.
    #[error("the network event loop has stopped")]
    Stopped,
}

/// Builds the swarm and returns the three handles. Spawn [`EventLoop::run`] on the runtime;
/// keep the [`Client`] to send commands and read [`Event`]s from the receiver.
pub fn new(
    config: NetConfig,
) -> Result<(Client, tokio::sync::mpsc::Receiver<Event>, EventLoop), NetError> {
    event_loop::build(config)
}
