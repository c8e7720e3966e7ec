//! AMST in the node: bulk transfers to and from peers over many streams, each stream its own
//! TCP connection authenticated as the node's libp2p identity (`dwcp_net::amst`).
//!
//! ```text
//!  sender                                              receiver
//!  ── ControlRequest::AmstOffer{transfer, purpose} ──▶  checks: ready member, same cluster,
//!     (/dwcp/control/3.0.0)                            room (transport.amst.max_incoming)
//!  ◀── ControlResponse::AmstAccepted{port} ──────────  registers the transfer id for that peer
//!  N x TCP(+TCP_CONGESTION) + noise + /dwcp/amst/3.0.0 + transfer id ──▶ listener: routes the
//!     connection to the transfer only if the noise-proven PeerId is the offering peer
//!  dwcp_transport::io::send_with  ── chunks / acks ──▶  dwcp_transport::io::receive
//! ```
//!
//! The receiver's address is the IP of the libp2p connection we already have to the peer (a
//! relayed peer has none: AMST needs a direct TCP path and says so), with the port from the
//! acceptance. The scheduling itself (stream count, resends, resume within
//! `transport.amst.timeout`) is `dwcp-transport`'s sans-IO core.
//!
//! Today the node moves one kind of payload: `network speedtest` bytes from a seeded generator,
//! checked byte for byte at the receiver. Live migration will use the same path.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use dwcp_net::amst::{AmstConnector, Inbound, TransferId, upgrade_inbound};
use dwcp_net::{Multiaddr, PeerId};
use dwcp_protocol::NodeId;
use dwcp_protocol::control::{ControlErrorCode, ControlRequest, ControlResponse, TransferPurpose};
use dwcp_transport::io::{self, Accepted, Acceptor, BoxFuture, Conn, SendControl};
use dwcp_transport::pattern::{CheckingSink, Pattern};
use dwcp_transport::{Config, Progress};
use prometheus::{IntCounterVec, IntGauge, Registry};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{debug, info, warn};

use crate::config::AmstSection;

/// Finished transfers kept for `amst status`.
const HISTORY: usize = 32;
/// Connection handshakes in progress at once on the listener.
const MAX_HANDSHAKES: usize = 64;
/// Longest speed test.
pub const MAX_SPEEDTEST: Duration = Duration::from_secs(600);
/// Outgoing transfers at once.
const MAX_OUTGOING: usize = 8;
/// How often running transfers' views and the gauges are refreshed.
const REFRESH: Duration = Duration::from_millis(500);
/// Every this many refreshes (2 s: two or three samples per 5 s bin of the forecaster, which
/// averages them), each running send's rate goes to PBA as a throughput sample of its link.
const PBA_EVERY: u32 = 4;

/// The AMST metrics (manual section 4.3).
#[derive(Clone, Debug)]
struct AmstMetrics {
    streams_active: IntGauge,
    throughput_mbps: prometheus::Gauge,
    bytes: IntCounterVec,
    transfers: IntCounterVec,
    refused: IntCounterVec,
}

impl AmstMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let reg = crate::metrics::Reg(registry);
        let streams_active = reg.g(
            "dwcp_amst_streams_active",
            "Streams (connections) of this node's outgoing AMST transfers now",
        )?;
        let throughput_mbps = reg.register(prometheus::Gauge::new(
            "dwcp_amst_throughput_mbps",
            "Goodput of this node's outgoing AMST transfers now, Mbit/s (0 when idle)",
        )?)?;
        let bytes = reg.cv(
            "dwcp_amst_bytes_transmitted_total",
            "AMST payload bytes acknowledged by the receiver (sent) or delivered in order (received)",
            &["direction"],
        )?;
        let transfers = reg.cv(
            "dwcp_amst_transfers_total",
            "AMST transfers that ended, by direction and result",
            &["direction", "result"],
        )?;
        let refused = reg.cv(
            "dwcp_amst_connections_refused_total",
            "Incoming AMST connections closed before carrying data, by reason",
            &["reason"],
        )?;
        Ok(Self {
            streams_active,
            throughput_mbps,
            bytes,
            transfers,
            refused,
        })
    }
}

pub use dwcp_protocol::api::{AmstStatus, Direction, StreamView, TransferView};

/// `POST /v1/amst/streams` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SetStreamsRequest {
    /// New stream count.
    pub count: usize,
}

/// `POST /v1/network/speedtest` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SpeedtestRequest {
    /// The receiving node.
    pub target: NodeId,
    /// How long to send, seconds.
    pub seconds: f64,
    /// Fixed stream count for this test (adaptation off); default: adaptive.
    #[serde(default)]
    pub streams: Option<usize>,
}

/// The result of a speed test.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpeedtestReport {
    /// Sender (this node).
    pub source: NodeId,
    /// Receiver.
    pub target: NodeId,
    /// Address the streams went to.
    pub addr: String,
    /// Congestion controller on the sockets.
    pub congestion_control: String,
    /// Bytes acknowledged by the receiver.
    pub bytes: u64,
    /// Wall time, including connection set-up and the final acknowledgements.
    pub seconds: f64,
    /// Goodput, Mbit/s.
    pub mbps: f64,
    /// Streams open in the last progress snapshot that had any (the streams close as the
    /// transfer drains).
    pub streams_active: usize,
    /// Per-stream rates in that snapshot, Mbit/s.
    pub stream_mbps: Vec<f64>,
    /// Chunks sent twice.
    pub resent_chunks: u64,
}

/// Why a transfer request failed, with the HTTP status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum AmstError {
    /// Bad request from the operator.
    #[error("{0}")]
    BadRequest(String),
    /// Too many transfers, the peer refused, or it cannot be reached directly.
    #[error("{0}")]
    Unavailable(String),
    /// The transfer failed.
    #[error("{0}")]
    Failed(String),
}

struct Running {
    view: TransferView,
    started: Instant,
    progress: Option<watch::Receiver<Progress>>,
    control: Option<mpsc::Sender<SendControl>>,
    received: Option<Arc<std::sync::atomic::AtomicU64>>,
    counted: u64,
    /// The last progress snapshot with streams open (a finished send has closed them all).
    last_busy: Option<Progress>,
}

/// Where the listener hands a receive's authenticated connections.
type ConnTx = mpsc::Sender<(Box<dyn Conn>, PeerId)>;

#[derive(Default)]
struct State {
    /// Receives we agreed to: transfer -> (sender, where its connections go).
    expected: BTreeMap<TransferId, (PeerId, ConnTx)>,
    running: BTreeMap<TransferId, Running>,
    recent: VecDeque<TransferView>,
    streams_default: usize,
}

/// Everything needed to start AMST.
#[derive(Debug)]
pub struct AmstSetup<'a> {
    /// `transport.amst`.
    pub cfg: &'a AmstSection,
    /// The node's identity (noise).
    pub keypair: libp2p::identity::Keypair,
    /// This node.
    pub node: NodeId,
    /// Our cluster.
    pub cluster_id: String,
    /// For offers and peer addresses.
    pub client: dwcp_net::Client,
    /// Where the metrics go.
    pub registry: &'a Registry,
    /// Throughput samples of sends feed the bandwidth forecaster.
    pub pba: Option<crate::pba::Pba>,
}

/// The node's AMST service (cheap to share through `Arc`).
pub struct Amst {
    keypair: libp2p::identity::Keypair,
    node: NodeId,
    cluster_id: String,
    client: dwcp_net::Client,
    base: Config,
    congestion: Option<String>,
    listen: SocketAddr,
    max_incoming: usize,
    metrics: AmstMetrics,
    pba: Option<crate::pba::Pba>,
    state: Mutex<State>,
    /// Where completed receives are reported: (sender, bytes, duration).
    received: Mutex<Option<mpsc::Sender<(NodeId, u64, Duration)>>>,
}

impl std::fmt::Debug for Amst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Amst")
            .field("node", &self.node)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// Resolves `transport.amst.congestion_control` against what the host offers.
fn resolve_congestion(wanted: &str, available: &[String]) -> Option<String> {
    let has = |n: &str| available.iter().any(|a| a == n);
    match wanted {
        "system" => None,
        "auto" => has("bbr").then(|| "bbr".to_owned()),
        name if has(name) => Some(name.to_owned()),
        name => {
            let fallback = has("bbr").then(|| "bbr".to_owned());
            warn!(
                wanted = name,
                available = %available.join(" "),
                using = fallback.as_deref().unwrap_or("system default"),
                "transport.amst.congestion_control is not offered by this host"
            );
            fallback
        }
    }
}

impl Amst {
    /// Binds the listener and starts accepting streams; runs until `stop` turns true.
    pub async fn start(
        setup: AmstSetup<'_>,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Arc<Self>> {
        let AmstSetup {
            cfg,
            keypair,
            node,
            cluster_id,
            client,
            registry,
            pba,
        } = setup;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("transport.amst.listen: cannot bind {}", cfg.listen))?;
        let listen = listener.local_addr()?;
        let base = Config {
            min_streams: cfg.streams.min,
            max_streams: cfg.streams.max,
            initial_streams: cfg.streams.default,
            window_bytes: cfg.reordering_buffer.0,
            resume_timeout: u64::try_from(cfg.timeout.as_micros()).unwrap_or(u64::MAX),
            ..Config::default()
        }
        .validate()
        .context("transport.amst")?;
        let available = dwcp_net::amst::available_congestion_controls();
        let congestion = resolve_congestion(&cfg.congestion_control, &available);
        let this = Arc::new(Self {
            keypair,
            node,
            cluster_id,
            client,
            base,
            congestion,
            listen,
            max_incoming: cfg.max_incoming,
            metrics: AmstMetrics::new(registry)?,
            pba,
            state: Mutex::new(State {
                streams_default: cfg.streams.default,
                ..State::default()
            }),
            received: Mutex::new(None),
        });
        info!(%listen, cc = this.cc_label(), "amst listening");
        let mut stop2 = stop.clone();
        let acceptor = Arc::clone(&this);
        tokio::spawn(async move {
            let gate = Arc::new(Semaphore::new(MAX_HANDSHAKES));
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    r = listener.accept() => match r {
                        Ok((tcp, from)) => {
                            let Ok(permit) = Arc::clone(&gate).try_acquire_owned() else {
                                acceptor.refused("busy");
                                continue;
                            };
                            let _ = tcp.set_nodelay(true);
                            let amst = Arc::clone(&acceptor);
                            tokio::spawn(async move {
                                let _permit = permit;
                                match upgrade_inbound(tcp, &amst.keypair).await {
                                    Ok(inb) => amst.route(inb),
                                    Err(e) => {
                                        debug!(%from, error = %e, "amst handshake failed");
                                        amst.refused("handshake");
                                    }
                                }
                            });
                        }
                        Err(e) => {
                            warn!(error = %e, "amst accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        });
        let ticker = Arc::clone(&this);
        tokio::spawn(async move {
            let mut t = tokio::time::interval(REFRESH);
            let mut n: u32 = 0;
            loop {
                tokio::select! {
                    _ = stop2.changed() => break,
                    _ = t.tick() => {
                        ticker.refresh_metrics();
                        n = n.wrapping_add(1);
                        if n.is_multiple_of(PBA_EVERY) {
                            ticker.report_throughput();
                        }
                    }
                }
            }
        });
        Ok(this)
    }

    /// Reports every completed receive from now on: (sender, bytes, duration), dropped when
    /// the queue is full.
    pub fn report_receives(&self, tx: mpsc::Sender<(NodeId, u64, Duration)>) {
        *self.received.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cc_label(&self) -> String {
        self.congestion.clone().unwrap_or_else(|| "system".into())
    }

    fn refused(&self, reason: &str) {
        self.metrics.refused.with_label_values(&[reason]).inc();
    }

    /// Hands an authenticated connection to the receive that expects it.
    fn route(&self, inb: Inbound) {
        let Inbound {
            peer,
            transfer,
            conn,
        } = inb;
        let st = self.lock();
        match st.expected.get(&transfer) {
            None => {
                drop(st);
                debug!(%peer, "amst connection for an unknown transfer");
                self.refused("unknown_transfer");
            }
            Some((from, _)) if *from != peer => {
                drop(st);
                warn!(%peer, "amst connection for a transfer another peer offered");
                self.refused("wrong_peer");
            }
            Some((_, tx)) => {
                if tx.try_send((conn, peer)).is_err() {
                    drop(st);
                    self.refused("busy");
                }
            }
        }
    }

    /// Serves an offer from a ready member `from` (the control service checked membership
    /// and cluster).
    pub fn on_offer(
        self: &Arc<Self>,
        from: NodeId,
        peer: PeerId,
        transfer: TransferId,
        purpose: TransferPurpose,
    ) -> ControlResponse {
        let (tx, rx) = mpsc::channel(self.base.max_streams * 2 + 4);
        let sink = match purpose {
            TransferPurpose::SpeedTest { seed } => CheckingSink::new(seed),
        };
        let received = Arc::clone(&sink.bytes);
        let corrupt = Arc::clone(&sink.corrupt);
        {
            let mut st = self.lock();
            if st.expected.len() >= self.max_incoming {
                return ControlResponse::refused(
                    ControlErrorCode::Unavailable,
                    format!(
                        "{} incoming transfers already (transport.amst.max_incoming)",
                        st.expected.len()
                    ),
                );
            }
            if st.expected.contains_key(&transfer) || st.running.contains_key(&transfer) {
                return ControlResponse::refused(
                    ControlErrorCode::BadRequest,
                    "transfer id already in use",
                );
            }
            st.expected.insert(transfer, (peer, tx));
            st.running.insert(
                transfer,
                Running {
                    view: new_view(transfer, Direction::Receive, from, purpose_label(purpose)),
                    started: Instant::now(),
                    progress: None,
                    control: None,
                    received: Some(Arc::clone(&received)),
                    counted: 0,
                    last_busy: None,
                },
            );
        }
        let cfg = self.base.clone();
        let amst = Arc::clone(self);
        let started = Instant::now();
        tokio::spawn(async move {
            let r = io::receive(
                ChannelAcceptor(rx),
                cfg,
                Some(transfer),
                |p: &PeerId| *p == peer,
                sink,
            )
            .await;
            let bytes = received.load(Ordering::Relaxed);
            let (state, error) = match r {
                Ok(_) if corrupt.load(Ordering::Relaxed) => {
                    warn!(%from, bytes, "amst speed test bytes differ from the generator");
                    (
                        "corrupt",
                        Some("received bytes differ from the generator".into()),
                    )
                }
                Ok(_) => ("done", None),
                Err(e) => ("failed", Some(e.to_string())),
            };
            amst.lock().expected.remove(&transfer);
            amst.finish(transfer, state, bytes, error);
            if state == "done"
                && let Some(tx) = amst
                    .received
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
            {
                let _ = tx.try_send((from, bytes, started.elapsed()));
            }
        });
        info!(%from, "amst transfer accepted");
        ControlResponse::AmstAccepted {
            port: self.listen.port(),
        }
    }

    /// Moves a transfer to the history; returns its last busy progress snapshot.
    fn finish(
        &self,
        transfer: TransferId,
        state: &str,
        bytes: u64,
        error: Option<String>,
    ) -> Option<Progress> {
        let mut st = self.lock();
        let mut run = st.running.remove(&transfer)?;
        if let Some(p) = &run.progress {
            let p = p.borrow().clone();
            if p.streams_active > 0 {
                run.last_busy = Some(p);
            }
        }
        let busy = run.last_busy.take();
        let dir = match run.view.direction {
            Direction::Send => "sent",
            Direction::Receive => "received",
        };
        self.metrics
            .bytes
            .with_label_values(&[dir])
            .inc_by(bytes.saturating_sub(run.counted));
        self.metrics
            .transfers
            .with_label_values(&[dir, state])
            .inc();
        let secs = run.started.elapsed().as_secs_f64();
        run.view.state = state.into();
        run.view.bytes = bytes;
        run.view.seconds = secs;
        run.view.mbps = mbps(bytes, secs);
        run.view.streams.clear();
        run.view.imbalance = None;
        run.view.error = error;
        if let Some(b) = &busy {
            run.view.streams_active = b.streams_active;
            run.view.streams_target = b.streams_target;
            run.view.resent_chunks = b.resent_chunks;
        }
        st.recent.push_front(run.view);
        st.recent.truncate(HISTORY);
        busy
    }

    /// Updates running views from their progress and the gauges from the running sends.
    fn refresh_metrics(&self) {
        let mut st = self.lock();
        let mut streams = 0usize;
        let mut rate = 0.0f64;
        let mut sent = 0u64;
        let mut received = 0u64;
        for run in st.running.values_mut() {
            let secs = run.started.elapsed().as_secs_f64();
            if let Some(p) = &run.progress {
                let p = p.borrow().clone();
                fill_from_progress(&mut run.view, &p);
                if p.streams_active > 0 {
                    run.last_busy = Some(p.clone());
                }
                streams += p.streams_active;
                rate += p.rate;
                sent += p.acked.saturating_sub(run.counted);
                run.counted = p.acked;
            }
            if let Some(r) = &run.received {
                let b = r.load(Ordering::Relaxed);
                run.view.bytes = b;
                received += b.saturating_sub(run.counted);
                run.counted = b;
            }
            run.view.seconds = secs;
            run.view.mbps = mbps(run.view.bytes, secs);
        }
        drop(st);
        self.metrics
            .streams_active
            .set(i64::try_from(streams).unwrap_or(i64::MAX));
        self.metrics.throughput_mbps.set(rate * 8.0 / 1e6);
        self.metrics.bytes.with_label_values(&["sent"]).inc_by(sent);
        self.metrics
            .bytes
            .with_label_values(&["received"])
            .inc_by(received);
    }

    /// Feeds the current goodput of every running send to PBA, with the path statistics of
    /// its streams' TCP connections where the kernel gave them: the lowest smoothed RTT and
    /// the mean loss (retransmitted over sent segments) across streams.
    fn report_throughput(&self) {
        let Some(pba) = &self.pba else {
            return;
        };
        type Sample = (NodeId, f64, Option<Duration>, Option<f64>);
        let samples: Vec<Sample> = self
            .lock()
            .running
            .values()
            .filter_map(|r| {
                let p = r.progress.as_ref()?.borrow().clone();
                if p.streams_active == 0 || p.rate <= 0.0 {
                    return None;
                }
                let rtt = p
                    .streams
                    .iter()
                    .filter_map(|s| s.path_rtt_us)
                    .min()
                    .map(Duration::from_micros);
                let losses: Vec<f64> = p.streams.iter().filter_map(|s| s.path_loss).collect();
                let loss =
                    (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64);
                Some((r.view.peer, p.rate * 8.0, rtt, loss))
            })
            .collect();
        for (peer, bps, rtt, loss) in samples {
            pba.record_throughput(&peer, bps, rtt, loss);
        }
    }

    /// `amst status`.
    pub fn status(&self) -> AmstStatus {
        self.refresh_metrics();
        let st = self.lock();
        AmstStatus {
            node: self.node,
            listen: self.listen.to_string(),
            congestion_control: self.cc_label(),
            streams_min: self.base.min_streams,
            streams_max: self.base.max_streams,
            streams_default: st.streams_default,
            active: st.running.values().map(|r| r.view.clone()).collect(),
            recent: st.recent.iter().cloned().collect(),
        }
    }

    /// Another node's `amst status`, asked over the control service (read-only).
    pub async fn remote_status(&self, node: NodeId) -> Result<AmstStatus, AmstError> {
        let peer = node
            .to_peer_id()
            .map_err(|e| AmstError::BadRequest(e.to_string()))?;
        let req = ControlRequest::AmstStatus {
            cluster_id: self.cluster_id.clone(),
        };
        let answer = self
            .client
            .request(peer, dwcp_net::Service::Control, req.encode())
            .await
            .map_err(|e| AmstError::Unavailable(format!("{} not asked: {e}", node.short())))?;
        match ControlResponse::decode(&answer) {
            Ok(ControlResponse::AmstStatus(st)) if st.node == node => Ok(*st),
            Ok(ControlResponse::AmstStatus(st)) => Err(AmstError::Failed(format!(
                "{} answered for another node ({})",
                node.short(),
                st.node.short()
            ))),
            Ok(ControlResponse::Refused { message, .. }) => Err(AmstError::Unavailable(format!(
                "{} refused: {message}",
                node.short()
            ))),
            Ok(_) => Err(AmstError::Failed(format!(
                "{} sent an unexpected answer",
                node.short()
            ))),
            Err(e) => Err(AmstError::Failed(format!(
                "{} sent a bad answer: {e}",
                node.short()
            ))),
        }
    }

    /// `amst set-streams`: the stream count new transfers start with, and a pin for the
    /// running sends (their controller adapts on from there).
    pub fn set_streams(&self, count: usize) -> Result<usize, AmstError> {
        if !(self.base.min_streams..=self.base.max_streams).contains(&count) {
            return Err(AmstError::BadRequest(format!(
                "--count must be within transport.amst.streams min..max ({}..{}), got {count}",
                self.base.min_streams, self.base.max_streams
            )));
        }
        let mut st = self.lock();
        st.streams_default = count;
        let mut pinned = 0;
        for run in st.running.values() {
            if let Some(c) = &run.control
                && c.try_send(SendControl::SetStreams(count)).is_ok()
            {
                pinned += 1;
            }
        }
        info!(count, running = pinned, "amst stream count set");
        Ok(pinned)
    }

    /// Where the peer's AMST listener is: the IP of our libp2p connection to it.
    async fn peer_ip(&self, peer: PeerId) -> Result<IpAddr, AmstError> {
        let addrs = self
            .client
            .peer_addresses(peer)
            .await
            .map_err(|e| AmstError::Unavailable(e.to_string()))?;
        addrs.iter().find_map(ip_of).ok_or_else(|| {
            AmstError::Unavailable(if addrs.is_empty() {
                "not connected to the target".into()
            } else {
                "the target is reachable only through a relay; AMST needs a direct path".into()
            })
        })
    }

    /// Sends generated bytes to `target` for `seconds` and reports the goodput. The target
    /// checks every byte against the generator.
    pub async fn speedtest(
        self: &Arc<Self>,
        req: SpeedtestRequest,
    ) -> Result<SpeedtestReport, AmstError> {
        let dur = Duration::try_from_secs_f64(req.seconds)
            .ok()
            .filter(|d| !d.is_zero() && *d <= MAX_SPEEDTEST)
            .ok_or_else(|| {
                AmstError::BadRequest(format!(
                    "duration must be more than 0 and at most {}s",
                    MAX_SPEEDTEST.as_secs()
                ))
            })?;
        if req.target == self.node {
            return Err(AmstError::BadRequest(
                "source and target are the same node".into(),
            ));
        }
        if let Some(n) = req.streams
            && !(1..=64).contains(&n)
        {
            return Err(AmstError::BadRequest(format!(
                "--streams must be 1 to 64, got {n}"
            )));
        }
        let transfer: TransferId = rand::random();
        let seed = Pattern::seed_of(&transfer);
        let source = Timed {
            inner: Pattern::new(seed, u64::MAX),
            until: tokio::time::Instant::now() + dur,
        };
        info!(target = %req.target, seconds = req.seconds, "amst speed test");
        let sent = self
            .send(
                req.target,
                transfer,
                TransferPurpose::SpeedTest { seed },
                source,
                req.streams,
            )
            .await?;
        let p = &sent.busy;
        Ok(SpeedtestReport {
            source: self.node,
            target: req.target,
            addr: sent.addr.to_string(),
            congestion_control: self.cc_label(),
            bytes: sent.bytes,
            seconds: sent.seconds,
            mbps: mbps(sent.bytes, sent.seconds),
            streams_active: p.streams_active,
            stream_mbps: p.streams.iter().map(|s| s.rate * 8.0 / 1e6).collect(),
            resent_chunks: p.resent_chunks,
        })
    }

    /// Sends everything `source` yields to `target` as transfer `transfer`: offers it over
    /// the control service, then runs [`io::send_with`] over AMST connections to the
    /// target's listener, visible in `amst status` and steerable by `set-streams` while it
    /// runs. `streams` fixes the stream count (adaptation off). Dropping the future cancels
    /// the transfer (its streams close; the receiver gives up after its resume timeout).
    pub async fn send<R: AsyncRead + Unpin>(
        self: &Arc<Self>,
        target: NodeId,
        transfer: TransferId,
        purpose: TransferPurpose,
        source: R,
        streams: Option<usize>,
    ) -> Result<Sent, AmstError> {
        let peer = target
            .to_peer_id()
            .map_err(|e| AmstError::BadRequest(e.to_string()))?;
        let offer = ControlRequest::AmstOffer {
            cluster_id: self.cluster_id.clone(),
            transfer,
            size: None,
            purpose,
        };
        let answer = self
            .client
            .request(peer, dwcp_net::Service::Control, offer.encode())
            .await
            .map_err(|e| AmstError::Unavailable(format!("offer not answered: {e}")))?;
        let port = match ControlResponse::decode(&answer) {
            Ok(ControlResponse::AmstAccepted { port }) => port,
            Ok(ControlResponse::Refused { message, .. }) => {
                return Err(AmstError::Unavailable(format!(
                    "{} refused the transfer: {message}",
                    target.short()
                )));
            }
            Ok(other) => {
                return Err(AmstError::Failed(format!(
                    "unexpected answer to a transfer offer: {other:?}"
                )));
            }
            Err(e) => return Err(AmstError::Failed(format!("bad answer: {e}"))),
        };
        let addr = SocketAddr::new(self.peer_ip(peer).await?, port);
        let (progress_tx, progress_rx) = watch::channel(Progress::default());
        let (ctl_tx, ctl_rx) = mpsc::channel(8);
        let cfg = {
            let mut st = self.lock();
            if st
                .running
                .values()
                .filter(|r| r.view.direction == Direction::Send)
                .count()
                >= MAX_OUTGOING
            {
                return Err(AmstError::Unavailable(format!(
                    "{MAX_OUTGOING} outgoing transfers already"
                )));
            }
            let cfg = match streams {
                Some(n) => self.base.clone().with_fixed_streams(n),
                None => Config {
                    initial_streams: st.streams_default,
                    ..self.base.clone()
                },
            };
            st.running.insert(
                transfer,
                Running {
                    view: new_view(transfer, Direction::Send, target, purpose_label(purpose)),
                    started: Instant::now(),
                    progress: Some(progress_rx.clone()),
                    control: Some(ctl_tx),
                    received: None,
                    counted: 0,
                    last_busy: None,
                },
            );
            cfg
        };
        // Moves the transfer to the history however this future ends, dropped included.
        let mut guard = SendGuard {
            amst: self,
            transfer,
            progress: progress_rx.clone(),
            armed: true,
        };
        let connector = Arc::new(AmstConnector {
            keypair: self.keypair.clone(),
            peer,
            addr,
            congestion: self.congestion.clone(),
            transfer,
        });
        let started = Instant::now();
        let r = io::send_with(
            connector,
            cfg,
            transfer,
            source,
            Some(progress_tx),
            Some(ctl_rx),
        )
        .await;
        guard.armed = false;
        let seconds = started.elapsed().as_secs_f64();
        let last = progress_rx.borrow().clone();
        match r {
            Ok(report) => {
                let busy = self
                    .finish(transfer, "done", report.bytes, None)
                    .unwrap_or(last);
                if let Some(pba) = &self.pba {
                    pba.record_throughput(&target, mbps(report.bytes, seconds) * 1e6, None, None);
                }
                Ok(Sent {
                    bytes: report.bytes,
                    seconds,
                    addr,
                    busy,
                })
            }
            Err(e) => {
                self.finish(transfer, "failed", last.acked, Some(e.to_string()));
                Err(AmstError::Failed(format!("transfer failed: {e}")))
            }
        }
    }
}

/// What [`Amst::send`] achieved.
#[derive(Clone, Debug)]
pub struct Sent {
    /// Bytes the receiver acknowledged.
    pub bytes: u64,
    /// Wall time from the first connection attempt to the last acknowledgement.
    pub seconds: f64,
    /// The receiver's AMST listener.
    pub addr: SocketAddr,
    /// The last progress snapshot with streams open.
    pub busy: Progress,
}

/// Records a send that ended by being dropped.
struct SendGuard<'a> {
    amst: &'a Amst,
    transfer: TransferId,
    progress: watch::Receiver<Progress>,
    armed: bool,
}

impl Drop for SendGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let acked = self.progress.borrow().acked;
            self.amst.finish(
                self.transfer,
                "cancelled",
                acked,
                Some("cancelled: the caller stopped waiting".into()),
            );
        }
    }
}

/// The AMST routes: `GET /v1/amst/status`, `POST /v1/amst/streams`,
/// `POST /v1/network/speedtest`.
pub fn routes() -> axum::Router<Arc<crate::daemon::Shared>> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/v1/amst/status", get(api_status))
        .route("/v1/amst/streams", post(api_set_streams))
        .route("/v1/network/speedtest", post(api_speedtest))
}

type SharedState = axum::extract::State<Arc<crate::daemon::Shared>>;

/// `?node=<id>` of `GET /v1/amst/status`.
#[derive(Debug, Deserialize)]
struct StatusQuery {
    node: Option<NodeId>,
}

async fn api_status(
    axum::extract::State(s): SharedState,
    axum::extract::Query(q): axum::extract::Query<StatusQuery>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match q.node {
        None => axum::Json(s.amst().status()).into_response(),
        Some(n) if n == s.node_id() => axum::Json(s.amst().status()).into_response(),
        Some(n) => match s.amst().remote_status(n).await {
            Ok(st) => axum::Json(st).into_response(),
            Err(e) => error_response(e),
        },
    }
}

async fn api_set_streams(
    axum::extract::State(s): SharedState,
    axum::Json(req): axum::Json<SetStreamsRequest>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match s.amst().set_streams(req.count) {
        Ok(running) => axum::Json(serde_json::json!({
            "count": req.count,
            "running_transfers_pinned": running,
        }))
        .into_response(),
        Err(e) => error_response(e),
    }
}

async fn api_speedtest(
    axum::extract::State(s): SharedState,
    axum::Json(req): axum::Json<SpeedtestRequest>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match s.amst().speedtest(req).await {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => error_response(e),
    }
}

fn error_response(e: AmstError) -> axum::response::Response {
    use axum::http::StatusCode;
    let code = match &e {
        AmstError::BadRequest(_) => StatusCode::BAD_REQUEST,
        AmstError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        AmstError::Failed(_) => StatusCode::BAD_GATEWAY,
    };
    crate::api::err(code, e)
}

fn purpose_label(p: TransferPurpose) -> &'static str {
    match p {
        TransferPurpose::SpeedTest { .. } => "speedtest",
    }
}

fn new_view(id: TransferId, direction: Direction, peer: NodeId, purpose: &str) -> TransferView {
    TransferView {
        id: hex::encode(id),
        direction,
        peer,
        purpose: purpose.into(),
        state: "running".into(),
        bytes: 0,
        seconds: 0.0,
        mbps: 0.0,
        streams_active: 0,
        streams_target: 0,
        streams: vec![],
        imbalance: None,
        resent_chunks: 0,
        error: None,
    }
}

fn fill_from_progress(v: &mut TransferView, p: &Progress) {
    v.bytes = p.acked;
    v.streams_active = p.streams_active;
    v.streams_target = p.streams_target;
    v.resent_chunks = p.resent_chunks;
    v.streams = p
        .streams
        .iter()
        .map(|s| StreamView {
            id: s.id.0,
            rate_mbps: s.rate * 8.0 / 1e6,
            in_flight: s.inflight,
        })
        .collect();
    v.imbalance = imbalance(&v.streams.iter().map(|s| s.rate_mbps).collect::<Vec<_>>());
}

/// Largest relative deviation of a rate from the mean (None for fewer than two streams).
pub fn imbalance(rates: &[f64]) -> Option<f64> {
    if rates.len() < 2 {
        return None;
    }
    let mean = rates.iter().sum::<f64>() / rates.len() as f64;
    if mean <= 0.0 {
        return None;
    }
    rates
        .iter()
        .map(|r| (r - mean).abs() / mean)
        .fold(None, |m: Option<f64>, d| Some(m.map_or(d, |m| m.max(d))))
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 * 8.0 / secs / 1e6
    } else {
        0.0
    }
}

fn ip_of(a: &Multiaddr) -> Option<IpAddr> {
    use libp2p::multiaddr::Protocol;
    if a.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
        return None;
    }
    a.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// Connections the listener routed to one receive.
struct ChannelAcceptor(mpsc::Receiver<(Box<dyn Conn>, PeerId)>);

impl Acceptor for ChannelAcceptor {
    type Identity = PeerId;
    fn accept(&mut self) -> BoxFuture<'_, Accepted<PeerId>> {
        Box::pin(async move {
            match self.0.recv().await {
                Some(c) => Ok(c),
                // The listener keeps the sender while the transfer is expected, so this
                // happens only at shutdown; the receive then waits for its resume timeout.
                None => std::future::pending().await,
            }
        })
    }
}

/// A source that ends at a deadline.
struct Timed<R> {
    inner: R,
    until: tokio::time::Instant,
}

impl<R: AsyncRead + Unpin> AsyncRead for Timed<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if tokio::time::Instant::now() >= self.until {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// Checks a speed-test request before anything is sent (used by the CLI too).
pub fn check_duration(seconds: f64) -> anyhow::Result<()> {
    if !(seconds > 0.0 && seconds <= MAX_SPEEDTEST.as_secs_f64()) {
        bail!(
            "duration must be more than 0 and at most {}s",
            MAX_SPEEDTEST.as_secs()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn congestion_control_resolution() {
        let both = vec!["reno".to_owned(), "cubic".to_owned(), "bbr".to_owned()];
        let no_bbr = vec!["reno".to_owned(), "cubic".to_owned()];
        assert_eq!(resolve_congestion("auto", &both).as_deref(), Some("bbr"));
        assert_eq!(resolve_congestion("auto", &no_bbr), None);
        assert_eq!(resolve_congestion("system", &both), None);
        assert_eq!(resolve_congestion("cubic", &both).as_deref(), Some("cubic"));
        // The manual's bbr2 is not in mainline kernels: fall back to bbr where offered.
        assert_eq!(resolve_congestion("bbr2", &both).as_deref(), Some("bbr"));
        assert_eq!(resolve_congestion("bbr2", &no_bbr), None);
    }

    #[test]
    fn imbalance_is_the_largest_relative_deviation() {
        assert_eq!(imbalance(&[10.0]), None);
        assert_eq!(imbalance(&[0.0, 0.0]), None);
        let i = imbalance(&[10.0, 10.0, 10.0, 30.0]).expect("some");
        // mean 15: deviations 1/3 and 1.
        assert!((i - 1.0).abs() < 1e-9, "{i}");
        assert_eq!(imbalance(&[5.0, 5.0]), Some(0.0));
    }

    #[test]
    fn relayed_addresses_have_no_direct_ip() {
        let direct: Multiaddr = "/ip4/10.0.0.2/tcp/7070".parse().expect("addr");
        let relayed: Multiaddr = "/ip4/1.2.3.4/tcp/7000/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit"
            .parse()
            .expect("addr");
        assert_eq!(ip_of(&direct), Some("10.0.0.2".parse().expect("ip")));
        assert_eq!(ip_of(&relayed), None);
    }

    #[tokio::test]
    async fn timed_source_ends_at_its_deadline() {
        use tokio::io::AsyncReadExt;
        let mut t = Timed {
            inner: Pattern::new(1, u64::MAX),
            until: tokio::time::Instant::now() + Duration::from_millis(50),
        };
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            let n = t.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            total += n as u64;
            tokio::task::yield_now().await;
        }
        assert!(total > 0);
    }
}
