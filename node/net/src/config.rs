//! Network configuration.

use std::time::Duration;

use libp2p::{Multiaddr, identity::Keypair};

/// What this peer is in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A volunteer node: relay client, dials discovered peers up to its target.
    Node,
    /// A bootstrap peer: relay server, AutoNAT server, accepts many connections, never dials
    /// out except to other bootstrap peers.
    Bootstrap,
}

/// Configuration of the libp2p swarm.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The node's identity (its DWCP node key as a libp2p keypair).
    pub keypair: Keypair,
    /// Node or bootstrap.
    pub role: Role,
    /// Addresses to listen on (`/ip4/0.0.0.0/tcp/7070`, `/ip4/0.0.0.0/udp/7070/quic-v1`).
    pub listen: Vec<Multiaddr>,
    /// Bootstrap peers, each with its `/p2p/<peer id>` suffix.
    pub bootstrap: Vec<Multiaddr>,
    /// Gossipsub topics to subscribe to.
    pub topics: Vec<String>,
    /// Connections a node tries to keep (it dials discovered peers until it has this many).
    pub target_peers: usize,
    /// Hard cap on established connections.
    pub max_connections: u32,
    /// Hard cap on connections per peer.
    pub max_connections_per_peer: u32,
    /// Largest gossipsub message accepted or sent, bytes.
    pub max_gossip_size: usize,
    /// Gossipsub heartbeat.
    pub gossip_heartbeat: Duration,
    /// How often to run a Kademlia random walk to find more peers.
    pub discovery_interval: Duration,
    /// Idle connections are closed after this long.
    pub idle_timeout: Duration,
    /// Identify protocol version (see [`dwcp_protocol::version`]).
    pub protocol_version: String,
    /// Identify agent version, e.g. `dwcp-node/3.0.0`.
    pub agent_version: String,
    /// Capacity of the command and event channels.
    pub channel_capacity: usize,
    /// How long a direct request waits for its response.
    pub request_timeout: Duration,
    /// Concurrent inbound plus outbound request streams per connection and service.
    pub max_concurrent_requests: usize,
}

impl NetConfig {
    /// Defaults for a node with the given identity.
    pub fn new(keypair: Keypair, role: Role) -> Self {
        Self {
            keypair,
            role,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            topics: Vec::new(),
            target_peers: 8,
            max_connections: match role {
                Role::Node => 128,
                Role::Bootstrap => 1024,
            },
            max_connections_per_peer: 2,
            max_gossip_size: 1024 * 1024 + 4096,
            gossip_heartbeat: Duration::from_millis(700),
            discovery_interval: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            protocol_version: dwcp_protocol::version::identify_version(),
            agent_version: format!("dwcp/{}", env!("CARGO_PKG_VERSION")),
            channel_capacity: 1024,
            request_timeout: Duration::from_secs(10),
            max_concurrent_requests: 32,
        }
    }
}
