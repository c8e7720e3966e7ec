//! The event loop that owns the swarm, the [`Client`] that talks to it and the [`Event`]s it
//! emits.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Duration,
};

use dwcp_protocol::version::{KAD_PROTOCOL, PeerVersionVerdict, check_peer_version};
use futures::StreamExt;
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, autonat, connection_limits,
    gossipsub::{self, IdentTopic, MessageAcceptance, MessageAuthenticity, MessageId, TopicHash},
    identify, kad,
    multiaddr::Protocol,
    noise, ping, relay,
    request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel},
    swarm::{
        ConnectionId, SwarmEvent,
        dial_opts::{DialOpts, PeerCondition},
    },
    tcp, yamux,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::{
    NetConfig, NetError, Role, Service,
    behaviour::{Behaviour, BehaviourEvent, Rpc},
    rpc::FrameCodec,
    scoring,
};

/// A gossip message handed to the application for validation.
#[derive(Debug, Clone)]
pub struct GossipMessage {
    /// Gossipsub message id; pass it back in [`Client::report_validation`].
    pub id: MessageId,
    /// The peer that forwarded it to us (penalised if the message is rejected).
    pub propagation_source: PeerId,
    /// The peer that published it, as signed at the gossipsub layer.
    pub source: Option<PeerId>,
    /// Topic name.
    pub topic: String,
    /// Payload bytes.
    pub data: Vec<u8>,
}

/// The application's verdict on a gossip message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validation {
    /// Valid: deliver and forward.
    Accept,
    /// Invalid (bad signature, malformed, oversized): drop and penalise the forwarder.
    Reject,
    /// Not invalid but not wanted (stale, duplicate, other cluster): drop without penalty.
    Ignore,
}

/// Where to send the answer to an [`InboundRequest`]: pass it to [`Client::respond`]. Dropping
/// it without answering closes the stream, and the requester sees a failed request.
pub struct ReplyHandle {
    service: Service,
    channel: ResponseChannel<Vec<u8>>,
}

impl std::fmt::Debug for ReplyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyHandle")
            .field("service", &self.service)
            .finish()
    }
}

/// A request a peer sent us directly.
#[derive(Debug)]
pub struct InboundRequest {
    /// Which service it is for.
    pub service: Service,
    /// The authenticated peer that sent it.
    pub peer: PeerId,
    /// The request bytes (at most [`Service::max_frame`]).
    pub data: Vec<u8>,
    /// Where the response goes.
    pub reply: ReplyHandle,
}

/// What the network tells the application.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A gossip message that needs validation.
    Gossip(GossipMessage),
    /// A direct request from a peer; answer it with [`Client::respond`].
    Request(InboundRequest),
    /// A ping round trip to a connected peer completed.
    PingRtt {
        /// The peer.
        peer: PeerId,
        /// The measured round-trip time.
        rtt: Duration,
    },
    /// A connection to a peer was established (first connection to that peer).
    PeerConnected(PeerId),
    /// The last connection to a peer closed.
    PeerDisconnected(PeerId),
    /// A peer identified itself and is compatible.
    PeerIdentified {
        /// The peer.
        peer: PeerId,
        /// Its agent version.
        agent_version: String,
        /// Its listen addresses.
        listen_addrs: Vec<Multiaddr>,
    },
    /// A peer runs an incompatible protocol version and was disconnected.
    PeerIncompatible {
        /// The peer.
        peer: PeerId,
        /// The version it reported.
        protocol_version: String,
    },
    /// We listen on a new address.
    ListeningOn(Multiaddr),
}

/// A snapshot of the network's state.
#[derive(Debug, Clone, Default)]
pub struct NetStats {
    /// Our peer id.
    pub local_peer_id: Option<PeerId>,
    /// Addresses we listen on.
    pub listen_addrs: Vec<Multiaddr>,
    /// Peers with at least one open connection.
    pub connected_peers: Vec<PeerId>,
    /// Peers in our gossipsub mesh, per topic.
    pub mesh_peers: Vec<(String, usize)>,
    /// Entries in the Kademlia routing table.
    pub routing_table_size: usize,
    /// Gossip events dropped because the application's queue was full.
    pub events_dropped: u64,
    /// Gossipsub scores of connected peers.
    pub peer_scores: Vec<(PeerId, f64)>,
}

enum Command {
    Publish {
        topic: String,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    ReportValidation {
        id: MessageId,
        source: PeerId,
        verdict: Validation,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Disconnect {
        peer: PeerId,
    },
    Stats {
        reply: oneshot::Sender<NetStats>,
    },
    PeerAddrs {
        peer: PeerId,
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Request {
        service: Service,
        peer: PeerId,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, NetError>>,
    },
    Respond {
        handle: ReplyHandle,
        data: Vec<u8>,
    },
}

/// A cheap, cloneable handle that sends commands to the [`EventLoop`].
#[derive(Clone)]
pub struct Client {
    tx: mpsc::Sender<Command>,
    local_peer_id: PeerId,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("local_peer_id", &self.local_peer_id)
            .finish()
    }
}

impl Client {
    /// Our peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    async fn send(&self, c: Command) -> Result<(), NetError> {
        self.tx.send(c).await.map_err(|_| NetError::Stopped)
    }

    /// Publishes bytes on a topic.
    pub async fn publish(&self, topic: &str, data: Vec<u8>) -> Result<(), NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Publish {
            topic: topic.to_owned(),
            data,
            reply,
        })
        .await?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Reports the application's verdict on a gossip message (exactly once per message).
    pub async fn report_validation(
        &self,
        msg: &GossipMessage,
        verdict: Validation,
    ) -> Result<(), NetError> {
        self.send(Command::ReportValidation {
            id: msg.id.clone(),
            source: msg.propagation_source,
            verdict,
        })
        .await
    }

    /// Dials an address.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Dial { addr, reply }).await?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Closes every connection to a peer.
    pub async fn disconnect(&self, peer: PeerId) -> Result<(), NetError> {
        self.send(Command::Disconnect { peer }).await
    }

    /// A snapshot of the network's state.
    pub async fn stats(&self) -> Result<NetStats, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Stats { reply }).await?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// The remote addresses of our open connections to `peer` (connections we dialled
    /// first: their address is one the peer listens on). Empty when not connected.
    pub async fn peer_addresses(&self, peer: PeerId) -> Result<Vec<Multiaddr>, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::PeerAddrs { peer, reply }).await?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// Sends a request to a peer on a service and waits for its response (at most
    /// [`NetConfig::request_timeout`]). The peer is dialled if it is not connected and its
    /// address is known.
    pub async fn request(
        &self,
        peer: PeerId,
        service: Service,
        data: Vec<u8>,
    ) -> Result<Vec<u8>, NetError> {
        if data.len() > service.max_frame() {
            return Err(NetError::Request {
                service: service.as_str(),
                peer,
                reason: format!(
                    "request of {} bytes exceeds the limit of {}",
                    data.len(),
                    service.max_frame()
                ),
            });
        }
        let (reply, rx) = oneshot::channel();
        self.send(Command::Request {
            service,
            peer,
            data,
            reply,
        })
        .await?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Answers a request received as [`Event::Request`].
    pub async fn respond(&self, handle: ReplyHandle, data: Vec<u8>) -> Result<(), NetError> {
        self.send(Command::Respond { handle, data }).await
    }
}

/// Owns the swarm; run it with [`EventLoop::run`].
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    config: NetConfig,
    bootstrap_peers: Vec<(PeerId, Multiaddr)>,
    listen_addrs: BTreeSet<Multiaddr>,
    events_dropped: u64,
    pending: HashMap<(Service, OutboundRequestId), PendingRequest>,
    /// Remote address of every open connection, and whether we dialled it.
    connections: HashMap<PeerId, BTreeMap<ConnectionId, (Multiaddr, bool)>>,
}

struct PendingRequest {
    peer: PeerId,
    reply: oneshot::Sender<Result<Vec<u8>, NetError>>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("peer", self.swarm.local_peer_id())
            .finish()
    }
}

fn config_err(component: &'static str, reason: impl ToString) -> NetError {
    NetError::Config {
        component,
        reason: reason.to_string(),
    }
}

fn make_behaviour(
    key: &libp2p::identity::Keypair,
    config: &NetConfig,
    relay_client: Option<relay::client::Behaviour>,
) -> Result<Behaviour, NetError> {
    let peer_id = key.public().to_peer_id();

    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(config.max_connections_per_peer))
        .with_max_pending_incoming(Some(64))
        .with_max_pending_outgoing(Some(64));

    let identify = identify::Behaviour::new(
        identify::Config::new(config.protocol_version.clone(), key.public())
            .with_agent_version(config.agent_version.clone())
            .with_push_listen_addr_updates(true),
    );

    let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    kad_config.set_query_timeout(Duration::from_secs(30));
    let mut kad =
        kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
    kad.set_mode(Some(kad::Mode::Server));

    let gossip_config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(config.gossip_heartbeat)
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(config.max_gossip_size)
        .build()
        .map_err(|e| config_err("gossipsub", e))?;
    let mut gossipsub =
        gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), gossip_config)
            .map_err(|e| config_err("gossipsub", e))?;
    let hashes: Vec<TopicHash> = config
        .topics
        .iter()
        .map(|t| IdentTopic::new(t.clone()).hash())
        .collect();
    gossipsub
        .with_peer_score(scoring::params(hashes.iter()), scoring::thresholds())
        .map_err(|e| config_err("gossipsub scoring", e))?;
    for t in &config.topics {
        gossipsub
            .subscribe(&IdentTopic::new(t.clone()))
            .map_err(|e| NetError::Subscribe {
                topic: t.clone(),
                reason: e.to_string(),
            })?;
    }

    let autonat = autonat::Behaviour::new(
        peer_id,
        autonat::Config {
            // Local testnets run on loopback and private addresses.
            only_global_ips: false,
            ..autonat::Config::default()
        },
    );

    let rpc = |service: Service| -> Rpc {
        // Bootstrap peers serve none of the application services: they only ever ask.
        let support = match config.role {
            Role::Node => ProtocolSupport::Full,
            Role::Bootstrap => ProtocolSupport::Outbound,
        };
        request_response::Behaviour::with_codec(
            FrameCodec::new(service.max_frame()),
            [(StreamProtocol::new(service.protocol_name()), support)],
            request_response::Config::default()
                .with_request_timeout(config.request_timeout)
                .with_max_concurrent_streams(config.max_concurrent_requests),
        )
    };

    let relay_server = match config.role {
        Role::Bootstrap => Some(relay::Behaviour::new(peer_id, relay::Config::default())),
        Role::Node => None,
    };

    Ok(Behaviour {
        limits: connection_limits::Behaviour::new(limits),
        identify,
        ping: ping::Behaviour::new(ping::Config::new()),
        kad,
        gossipsub,
        autonat,
        relay_server: relay_server.into(),
        relay_client: relay_client.into(),
        sync: rpc(Service::Sync),
        consensus: rpc(Service::Consensus),
        control: rpc(Service::Control),
        state_transfer: rpc(Service::StateTransfer),
    })
}

fn boxed(e: NetError) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

fn transport_err(e: impl std::error::Error + Send + Sync + 'static) -> NetError {
    NetError::Transport(Box::new(e))
}

pub(crate) fn build(
    config: NetConfig,
) -> Result<(Client, mpsc::Receiver<Event>, EventLoop), NetError> {
    let idle = config.idle_timeout;
    let tcp_config = tcp::Config::default().nodelay(true);
    let mut swarm = match config.role {
        Role::Node => SwarmBuilder::with_existing_identity(config.keypair.clone())
            .with_tokio()
            .with_tcp(tcp_config, noise::Config::new, yamux::Config::default)
            .map_err(transport_err)?
            .with_quic()
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(transport_err)?
            .with_behaviour(|key, relay_client| {
                make_behaviour(key, &config, Some(relay_client)).map_err(boxed)
            })
            .map_err(|e| config_err("behaviour", e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build(),
        Role::Bootstrap => SwarmBuilder::with_existing_identity(config.keypair.clone())
            .with_tokio()
            .with_tcp(tcp_config, noise::Config::new, yamux::Config::default)
            .map_err(transport_err)?
            .with_quic()
            .with_behaviour(|key| make_behaviour(key, &config, None).map_err(boxed))
            .map_err(|e| config_err("behaviour", e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build(),
    };

    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|source| NetError::Listen {
                addr: addr.clone(),
                source,
            })?;
    }

    let mut bootstrap_peers = Vec::new();
    for addr in &config.bootstrap {
        let Some(Protocol::P2p(peer)) = addr.iter().last() else {
            return Err(config_err(
                "bootstrap",
                format!("bootstrap address {addr} must end with /p2p/<peer id>"),
            ));
        };
        if peer == *swarm.local_peer_id() {
            continue;
        }
        swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
        bootstrap_peers.push((peer, addr.clone()));
    }

    let (cmd_tx, cmd_rx) = mpsc::channel(config.channel_capacity);
    let (ev_tx, ev_rx) = mpsc::channel(config.channel_capacity);
    let client = Client {
        tx: cmd_tx,
        local_peer_id: *swarm.local_peer_id(),
    };
    let el = EventLoop {
        swarm,
        commands: cmd_rx,
        events: ev_tx,
        config,
        bootstrap_peers,
        listen_addrs: BTreeSet::new(),
        events_dropped: 0,
        pending: HashMap::new(),
        connections: HashMap::new(),
    };
    Ok((client, ev_rx, el))
}

impl EventLoop {
    /// Runs until every [`Client`] is dropped.
    pub async fn run(mut self) {
        self.dial_bootstrap();
        let mut discovery = tokio::time::interval(self.config.discovery_interval);
        discovery.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Local work first (libp2p coding guidelines): commands before new remote work.
                biased;
                cmd = self.commands.recv() => match cmd {
                    Some(c) => self.handle_command(c),
                    None => break,
                },
                ev = self.swarm.select_next_some() => self.handle_swarm_event(ev),
                _ = discovery.tick() => self.discover(),
            }
        }
        debug!("network event loop stopped");
    }

    fn dial_bootstrap(&mut self) {
        for (peer, addr) in self.bootstrap_peers.clone() {
            if self.swarm.is_connected(&peer) {
                continue;
            }
            let opts = DialOpts::peer_id(peer)
                .addresses(vec![addr.clone()])
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                debug!(%addr, error = %e, "dialling bootstrap peer failed");
            }
        }
        if !self.bootstrap_peers.is_empty() {
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
        }
    }

    /// Periodic discovery: reconnect to bootstrap peers when alone, walk the DHT, and dial
    /// known peers until the target connection count is reached.
    fn discover(&mut self) {
        if self.swarm.connected_peers().next().is_none() {
            self.dial_bootstrap();
            return;
        }
        if self.config.role == Role::Bootstrap {
            return;
        }
        let _ = self.swarm.behaviour_mut().kad.bootstrap();
        self.fill_connections();
    }

    fn fill_connections(&mut self) {
        let connected = self.swarm.connected_peers().count();
        if connected >= self.config.target_peers {
            return;
        }
        let mut candidates = Vec::new();
        for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
            for entry in bucket.iter() {
                candidates.push(*entry.node.key.preimage());
            }
        }
        let mut budget = self.config.target_peers - connected;
        for peer in candidates {
            if budget == 0 {
                break;
            }
            if self.swarm.is_connected(&peer) {
                continue;
            }
            let opts = DialOpts::peer_id(peer)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if self.swarm.dial(opts).is_ok() {
                budget -= 1;
            }
        }
    }

    fn emit(&mut self, ev: Event) {
        if let Err(mpsc::error::TrySendError::Full(ev)) = self.events.try_send(ev) {
            self.events_dropped += 1;
            // A gossip message we cannot hand over must still be released from the cache.
            if let Event::Gossip(m) = ev {
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(
                        &m.id,
                        &m.propagation_source,
                        MessageAcceptance::Ignore,
                    );
            }
        }
    }

    fn handle_command(&mut self, c: Command) {
        match c {
            Command::Publish { topic, data, reply } => {
                let r = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(IdentTopic::new(topic.clone()), data)
                    .map(|_| ())
                    .map_err(|e| NetError::Publish {
                        topic,
                        reason: e.to_string(),
                    });
                let _ = reply.send(r);
            }
            Command::ReportValidation {
                id,
                source,
                verdict,
            } => {
                let acceptance = match verdict {
                    Validation::Accept => MessageAcceptance::Accept,
                    Validation::Reject => MessageAcceptance::Reject,
                    Validation::Ignore => MessageAcceptance::Ignore,
                };
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&id, &source, acceptance);
            }
            Command::Dial { addr, reply } => {
                let r = self.swarm.dial(addr.clone()).map_err(|e| NetError::Dial {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                });
                let _ = reply.send(r);
            }
            Command::Disconnect { peer } => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            Command::PeerAddrs { peer, reply } => {
                let mut addrs: Vec<(bool, Multiaddr)> = self
                    .connections
                    .get(&peer)
                    .map(|c| c.values().map(|(a, d)| (!*d, a.clone())).collect())
                    .unwrap_or_default();
                addrs.sort();
                addrs.dedup();
                let _ = reply.send(addrs.into_iter().map(|(_, a)| a).collect());
            }
            Command::Request {
                service,
                peer,
                data,
                reply,
            } => {
                let id = self.rpc(service).send_request(&peer, data);
                self.pending
                    .insert((service, id), PendingRequest { peer, reply });
            }
            Command::Respond { handle, data } => {
                let ReplyHandle { service, channel } = handle;
                if self.rpc(service).send_response(channel, data).is_err() {
                    debug!(
                        service = service.as_str(),
                        "response dropped: the requester went away"
                    );
                }
            }
        }
    }

    fn rpc(&mut self, service: Service) -> &mut Rpc {
        let b = self.swarm.behaviour_mut();
        match service {
            Service::Sync => &mut b.sync,
            Service::Consensus => &mut b.consensus,
            Service::Control => &mut b.control,
            Service::StateTransfer => &mut b.state_transfer,
        }
    }

    fn on_rpc(&mut self, service: Service, ev: request_response::Event<Vec<u8>, Vec<u8>>) {
        use request_response::{Event as E, Message as M};
        match ev {
            E::Message {
                peer,
                message: M::Request {
                    request, channel, ..
                },
                ..
            } => self.emit(Event::Request(InboundRequest {
                service,
                peer,
                data: request,
                reply: ReplyHandle { service, channel },
            })),
            E::Message {
                message:
                    M::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(p) = self.pending.remove(&(service, request_id)) {
                    let _ = p.reply.send(Ok(response));
                }
            }
            E::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some(p) = self.pending.remove(&(service, request_id)) {
                    let _ = p.reply.send(Err(NetError::Request {
                        service: service.as_str(),
                        peer: p.peer,
                        reason: error.to_string(),
                    }));
                }
            }
            E::InboundFailure { peer, error, .. } => {
                debug!(service = service.as_str(), %peer, %error, "inbound request failed");
            }
            E::ResponseSent { .. } => {}
        }
    }

    fn stats(&mut self) -> NetStats {
        let connected: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        let gs = &self.swarm.behaviour().gossipsub;
        let mesh_peers = self
            .config
            .topics
            .iter()
            .map(|t| {
                (
                    t.clone(),
                    gs.mesh_peers(&IdentTopic::new(t.clone()).hash()).count(),
                )
            })
            .collect();
        let peer_scores = connected
            .iter()
            .filter_map(|p| gs.peer_score(p).map(|s| (*p, s)))
            .collect();
        let routing_table_size = self
            .swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .map(|b| b.num_entries())
            .sum();
        NetStats {
            local_peer_id: Some(*self.swarm.local_peer_id()),
            listen_addrs: self.listen_addrs.iter().cloned().collect(),
            connected_peers: connected,
            mesh_peers,
            routing_table_size,
            events_dropped: self.events_dropped,
            peer_scores,
        }
    }

    fn handle_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                self.listen_addrs.insert(address.clone());
                self.emit(Event::ListeningOn(address));
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.remove(&address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                num_established,
                endpoint,
                ..
            } => {
                debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                self.connections.entry(peer_id).or_default().insert(
                    connection_id,
                    (endpoint.get_remote_address().clone(), endpoint.is_dialer()),
                );
                if num_established.get() == 1 {
                    self.emit(Event::PeerConnected(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } if num_established > 0 => {
                if let Some(c) = self.connections.get_mut(&peer_id) {
                    c.remove(&connection_id);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.connections.remove(&peer_id);
                debug!(peer = %peer_id, "disconnected");
                self.emit(Event::PeerDisconnected(peer_id));
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
                self.emit(Event::Gossip(GossipMessage {
                    id: message_id,
                    propagation_source,
                    source: message.source,
                    topic: message.topic.as_str().to_owned(),
                    data: message.data,
                }));
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => self.on_identified(peer_id, info),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, ..
            })) => {
                debug!(%peer, "routing table updated");
                if self.config.role == Role::Node {
                    self.fill_connections();
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Sync(e)) => self.on_rpc(Service::Sync, e),
            SwarmEvent::Behaviour(BehaviourEvent::Consensus(e)) => {
                self.on_rpc(Service::Consensus, e)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Control(e)) => self.on_rpc(Service::Control, e),
            SwarmEvent::Behaviour(BehaviourEvent::StateTransfer(e)) => {
                self.on_rpc(Service::StateTransfer, e)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => self.emit(Event::PingRtt { peer, rtt }),
            // A connection whose pings time out is dead (a partition, a vanished host): close
            // it, so the peer counts as disconnected and discovery dials again once packets
            // flow, instead of waiting out TCP's retransmission backoff on a stalled stream.
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(e),
            })) if !matches!(e, ping::Failure::Unsupported) => {
                debug!(%peer, error = %e, "ping failed; closing the connection");
                self.swarm.close_connection(connection);
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                // A node with no connection at all depends on its bootstrap peers: say why
                // it cannot reach them (once a discovery interval, when it dials them again),
                // or it only ever reports "no peers".
                let bootstrap = peer_id.and_then(|p| {
                    self.bootstrap_peers
                        .iter()
                        .find(|(b, _)| *b == p)
                        .map(|(_, addr)| addr.clone())
                });
                match bootstrap {
                    Some(addr) if self.swarm.connected_peers().next().is_none() => warn!(
                        %addr,
                        %error,
                        retry_in_s = self.config.discovery_interval.as_secs(),
                        "cannot reach a bootstrap peer and no other peer is connected"
                    ),
                    _ => debug!(peer = ?peer_id, %error, "outgoing connection failed"),
                }
            }
            _ => {}
        }
    }

    fn on_identified(&mut self, peer: PeerId, info: identify::Info) {
        if check_peer_version(&info.protocol_version) == PeerVersionVerdict::Incompatible {
            warn!(%peer, version = %info.protocol_version, "incompatible protocol version; disconnecting");
            self.swarm.behaviour_mut().kad.remove_peer(&peer);
            let _ = self.swarm.disconnect_peer_id(peer);
            self.emit(Event::PeerIncompatible {
                peer,
                protocol_version: info.protocol_version,
            });
            return;
        }
        let kad_proto = StreamProtocol::new(KAD_PROTOCOL);
        if info.protocols.contains(&kad_proto) {
            for addr in &info.listen_addrs {
                if is_dialable(addr) {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                }
            }
        }
        self.emit(Event::PeerIdentified {
            peer,
            agent_version: info.agent_version,
            listen_addrs: info.listen_addrs,
        });
    }
}

/// Addresses worth putting in the routing table: not unspecified (0.0.0.0) and not relayed
/// circuits through ourselves.
fn is_dialable(addr: &Multiaddr) -> bool {
    !addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}
