//! The composed behaviour.

use libp2p::{
    autonat, connection_limits, gossipsub, identify, kad, ping, relay, request_response,
    swarm::{NetworkBehaviour, behaviour::toggle::Toggle},
};

use crate::rpc::FrameCodec;

/// One request-response behaviour; there is one per [`crate::Service`].
pub(crate) type Rpc = request_response::Behaviour<FrameCodec>;

/// Every protocol a DWCP peer speaks, in one behaviour.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) kad: kad::Behaviour<kad::store::MemoryStore>,
    pub(crate) gossipsub: gossipsub::Behaviour,
    pub(crate) autonat: autonat::Behaviour,
    pub(crate) relay_server: Toggle<relay::Behaviour>,
    pub(crate) relay_client: Toggle<relay::client::Behaviour>,
    pub(crate) sync: Rpc,
    pub(crate) consensus: Rpc,
    pub(crate) control: Rpc,
    pub(crate) state_transfer: Rpc,
}
