//! The tokio shell (feature `io`): runs [`Sender`] and [`Receiver`] over real connections,
//! one connection per stream so that every stream has its own congestion controller.
//!
//! Where connections come from is pluggable: a [`Connector`] opens a new connection to the
//! peer for each stream, an [`Acceptor`] yields incoming connections with the identity of the
//! remote end, and the receiver refuses any identity its `authorize` callback rejects. The TCP
//! implementations here ([`TcpConnector`], [`TcpAcceptor`]) identify peers by address only;
//! the node's libp2p version (noise-authenticated connections, each proving the same
//! `PeerId`) plugs into the same traits.
//!
//! Cancellation: drop the future. Every task it spawned lives in a `JoinSet` it owns and is
//! aborted with it.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::wire::{DecodeError, Frame};
use crate::{Ack, Chunk, Command, Config, Input, Micros, Progress, Receiver, Sender, StreamId};
use crate::{ConfigError, TransferError};

/// A bidirectional byte stream (a TCP connection, a libp2p substream on its own connection).
pub trait Conn: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Conn for T {}

/// A boxed future, as the connection traits return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An accepted connection with the identity of its remote end.
pub type Accepted<I> = std::io::Result<(Box<dyn Conn>, I)>;

/// A connection and, when it runs over one TCP connection of ours, that connection's
/// `(local, peer)` addresses (its path statistics are read by them, [`crate::tcpinfo`]).
pub type PathConn = (Box<dyn Conn>, Option<(SocketAddr, SocketAddr)>);

/// Opens a new connection to the peer, one per stream.
pub trait Connector: Send + Sync + 'static {
    /// Connects (each call must give a new, independent connection).
    fn connect(&self) -> BoxFuture<'static, std::io::Result<Box<dyn Conn>>>;

    /// [`Connector::connect`], also telling the TCP connection's addresses where there is
    /// one. Without them a stream reports no path statistics (the default).
    fn connect_path(&self) -> BoxFuture<'static, std::io::Result<PathConn>> {
        let f = self.connect();
        Box::pin(async move { Ok((f.await?, None)) })
    }
}

/// Yields incoming connections with the remote identity.
pub trait Acceptor: Send + 'static {
    /// The identity of a remote end (a socket address for TCP, a `PeerId` for libp2p).
    type Identity: std::fmt::Debug + Send + 'static;
    /// Waits for the next connection.
    fn accept(&mut self) -> BoxFuture<'_, Accepted<Self::Identity>>;
}

/// TCP connections with a congestion controller chosen per socket.
#[derive(Clone, Debug)]
pub struct TcpConnector {
    /// The receiver's address.
    pub addr: SocketAddr,
    /// `TCP_CONGESTION` for each socket (`bbr`, `cubic`, `reno`); `None` keeps the default.
    pub congestion: Option<String>,
}

impl Connector for TcpConnector {
    fn connect(&self) -> BoxFuture<'static, std::io::Result<Box<dyn Conn>>> {
        let f = self.connect_path();
        Box::pin(async move { Ok(f.await?.0) })
    }

    fn connect_path(&self) -> BoxFuture<'static, std::io::Result<PathConn>> {
        let this = self.clone();
        Box::pin(async move {
            let stream = connect_tcp(this.addr, this.congestion.as_deref()).await?;
            let ends = tcp_ends(&stream);
            Ok((Box::new(stream) as Box<dyn Conn>, ends))
        })
    }
}

/// The `(local, peer)` addresses of a TCP connection, if the socket knows them.
pub fn tcp_ends(stream: &tokio::net::TcpStream) -> Option<(SocketAddr, SocketAddr)> {
    Some((stream.local_addr().ok()?, stream.peer_addr().ok()?))
}

/// A new TCP connection to `addr` whose socket got `TCP_CONGESTION` = `congestion` (if
/// given) before the handshake, with `TCP_NODELAY`, within the connect timeout (10 s).
pub async fn connect_tcp(
    addr: SocketAddr,
    congestion: Option<&str>,
) -> std::io::Result<tokio::net::TcpStream> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(cc) = congestion {
        set_congestion(&sock, cc)?;
    }
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sets `TCP_CONGESTION` on a socket.
pub fn set_congestion(sock: &impl std::os::fd::AsFd, name: &str) -> std::io::Result<()> {
    nix::sys::socket::setsockopt(
        sock,
        nix::sys::socket::sockopt::TcpCongestion,
        &std::ffi::OsString::from(name),
    )
    .map_err(std::io::Error::from)
}

/// Accepts TCP connections; the identity is the remote address.
#[derive(Debug)]
pub struct TcpAcceptor(pub tokio::net::TcpListener);

impl Acceptor for TcpAcceptor {
    type Identity = SocketAddr;
    fn accept(&mut self) -> BoxFuture<'_, Accepted<SocketAddr>> {
        Box::pin(async move {
            let (s, a) = self.0.accept().await?;
            s.set_nodelay(true)?;
            Ok((Box::new(s) as Box<dyn Conn>, a))
        })
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How often a stream's TCP path statistics are read.
pub const PATH_STATS_EVERY: Duration = Duration::from_secs(1);
const READ_BUF: usize = 1 << 20;

/// Errors of the I/O drivers.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The transfer failed.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// Reading the source or writing the sink failed.
    #[error("local {what} failed")]
    Local {
        /// Source or sink.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Accepting connections failed.
    #[error("accept failed")]
    Accept(#[source] std::io::Error),
}

/// Final figures of a transfer.
#[derive(Clone, Debug)]
pub struct Report {
    /// Bytes transferred.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Last progress snapshot (sender side).
    pub progress: Option<Progress>,
}

fn micros(start: Instant) -> Micros {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

enum SendEvent {
    Opened(StreamId, mpsc::Sender<Chunk>),
    Input(Input),
}

/// What an operator can ask of a running send ([`send_with`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendControl {
    /// Pin the stream count to this many (clamped to the configured bounds by the core's
    /// controller); adaptation continues from there.
    SetStreams(usize),
    /// Stop: the send ends with [`TransferError::Cancelled`].
    Cancel,
}

/// Sends everything `source` yields to the peer behind `connector`, as transfer `transfer`.
/// Progress snapshots go to `progress` if given.
pub async fn send<R: AsyncRead + Unpin>(
    connector: Arc<dyn Connector>,
    cfg: Config,
    transfer: [u8; 16],
    source: R,
    progress: Option<watch::Sender<Progress>>,
) -> Result<Report, IoError> {
    send_with(connector, cfg, transfer, source, progress, None).await
}

/// [`send`], steerable while it runs through `control` (stream count, cancellation).
pub async fn send_with<R: AsyncRead + Unpin>(
    connector: Arc<dyn Connector>,
    cfg: Config,
    transfer: [u8; 16],
    mut source: R,
    progress: Option<watch::Sender<Progress>>,
    mut control: Option<mpsc::Receiver<SendControl>>,
) -> Result<Report, IoError> {
    let start = Instant::now();
    let mut core = Sender::new(cfg.clone(), 0)?;
    let (ev_tx, mut ev_rx) = mpsc::channel::<SendEvent>(4096);
    let mut writers: BTreeMap<StreamId, mpsc::Sender<Chunk>> = BTreeMap::new();
    let mut tasks = JoinSet::new();
    let mut buf = BytesMut::with_capacity(READ_BUF);
    let mut source_done = false;
    let mut carry: Option<Bytes> = None;
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let window = cfg.window_bytes / cfg.chunk_size as u64 + 4;
    loop {
        let now = micros(start);
        if let Some(rest) = carry.take()
            && core.wants() > 0
        {
            let rest = core.push(now, rest);
            carry = (!rest.is_empty()).then_some(rest);
        }
        while let Some(cmd) = core.poll_command() {
            match cmd {
                Command::OpenStream(id) => {
                    let connector = Arc::clone(&connector);
                    let ev = ev_tx.clone();
                    let cap = usize::try_from(window).unwrap_or(64);
                    tasks.spawn(sender_stream(connector, transfer, id, ev, cap));
                }
                Command::Send(id, chunk) => {
                    let ok = writers.get(&id).is_some_and(|w| w.try_send(chunk).is_ok());
                    if !ok {
                        writers.remove(&id);
                        core.handle(micros(start), Input::StreamFailed(id));
                    }
                }
                Command::CloseStream(id) => {
                    writers.remove(&id);
                }
                Command::Finished => {
                    let p = core.progress();
                    if let Some(tx) = &progress {
                        let _ = tx.send(p.clone());
                    }
                    return Ok(Report {
                        bytes: p.acked,
                        elapsed: start.elapsed(),
                        progress: Some(p),
                    });
                }
                Command::Failed(e) => return Err(e.into()),
            }
        }
        let deadline = core
            .poll_timeout()
            .map(|t| start + Duration::from_micros(t));
        let want_read = !source_done && carry.is_none() && core.wants() > 0;
        if want_read {
            buf.clear();
            buf.reserve(core.wants().min(READ_BUF));
        }
        tokio::select! {
            ev = ev_rx.recv() => {
                let now = micros(start);
                match ev {
                    Some(SendEvent::Opened(id, w)) => {
                        writers.insert(id, w);
                        core.handle(now, Input::StreamOpened(id));
                    }
                    Some(SendEvent::Input(i)) => {
                        if let Input::StreamFailed(id) = &i {
                            writers.remove(id);
                        }
                        core.handle(now, i);
                    }
                    None => {}
                }
            }
            r = read_some(&mut source, &mut buf, core.wants().min(READ_BUF)), if want_read => {
                let now = micros(start);
                match r {
                    Ok(0) => {
                        source_done = true;
                        core.finish(now);
                    }
                    Ok(_) => {
                        let rest = core.push(now, buf.split().freeze());
                        carry = (!rest.is_empty()).then_some(rest);
                    }
                    Err(source) => return Err(IoError::Local { what: "source read", source }),
                }
            }
            () = sleep_until_opt(deadline) => core.handle_timeout(micros(start)),
            c = recv_opt(&mut control) => match c {
                Some(SendControl::SetStreams(n)) => core.set_streams(micros(start), n),
                Some(SendControl::Cancel) => core.cancel(),
                None => control = None,
            },
            _ = tick.tick() => {
                if let Some(tx) = &progress {
                    let _ = tx.send(core.progress());
                }
            }
        }
    }
}

async fn read_some<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> std::io::Result<usize> {
    let mut limited = (&mut *r).take(max as u64);
    limited.read_buf(buf).await
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// One sender stream: connect, hello, then write chunks and read acks until either fails.
async fn sender_stream(
    connector: Arc<dyn Connector>,
    transfer: [u8; 16],
    id: StreamId,
    ev: mpsc::Sender<SendEvent>,
    queue: usize,
) {
    let fail = |ev: mpsc::Sender<SendEvent>| async move {
        let _ = ev.send(SendEvent::Input(Input::StreamFailed(id))).await;
    };
    let (conn, ends) = match connector.connect_path().await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(stream = id.0, error = %e, "amst connect failed");
            return fail(ev).await;
        }
    };
    let (mut rd, mut wr) = tokio::io::split(conn);
    let mut out = BytesMut::new();
    Frame::Hello {
        transfer,
        stream: id.0,
    }
    .encode(&mut out);
    // Flush after every burst: an encrypted connection (noise) buffers writes into frames
    // and would otherwise hold a short message back.
    if wr.write_all(&out).await.is_err() || wr.flush().await.is_err() {
        return fail(ev).await;
    }
    let mut inbuf = BytesMut::with_capacity(64 * 1024);
    let first = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut rd, &mut inbuf)).await;
    let Ok(Ok(Some(Frame::Ack(state)))) = first else {
        return fail(ev).await;
    };
    let (chunk_tx, chunk_rx) = mpsc::channel::<Chunk>(queue);
    if ev.send(SendEvent::Opened(id, chunk_tx)).await.is_err() {
        return;
    }
    let _ = ev.send(SendEvent::Input(Input::Ack(id, state))).await;
    let writer = write_chunks(wr, chunk_rx);
    let ev_acks = ev.clone();
    let reader = async move {
        loop {
            match read_frame(&mut rd, &mut inbuf).await {
                Ok(Some(Frame::Ack(a))) => {
                    if ev_acks
                        .send(SendEvent::Input(Input::Ack(id, a)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                _ => return,
            }
        }
    };
    tokio::pin!(reader);
    let stats = path_stats(id, ends, ev.clone());
    tokio::pin!(stats);
    tokio::select! {
        () = &mut stats => {}
        r = writer => {
            // Closed by the core (drained) or failed: either way the stream is done; a
            // failure with chunks in flight is reported so they are resent.
            if r.is_err() {
                return fail(ev).await;
            }
            // Keep reading acks for chunks still in flight until the peer closes.
            let _ = tokio::time::timeout(Duration::from_secs(30), &mut reader).await;
        }
        () = &mut reader => {}
    }
    fail(ev).await;
}

/// Reads the stream's TCP path statistics every [`PATH_STATS_EVERY`] and hands them to the
/// core ([`Input::PathStats`]: smoothed RTT, retransmitted over sent segments since the last
/// reading). Never returns while it can report; gives up quietly (pending forever) when the
/// connection has no TCP addresses or the kernel cannot be asked; returns when the transfer
/// is gone.
async fn path_stats(
    id: StreamId,
    ends: Option<(SocketAddr, SocketAddr)>,
    ev: mpsc::Sender<SendEvent>,
) {
    let Some((local, peer)) = ends else {
        return std::future::pending().await;
    };
    let mut meter = crate::tcpinfo::LossMeter::default();
    let mut tick = tokio::time::interval(PATH_STATS_EVERY);
    let mut failures = 0;
    loop {
        tick.tick().await;
        let q = tokio::task::spawn_blocking(move || crate::tcpinfo::query(local, peer)).await;
        let info = match q {
            Ok(Ok(info)) => info,
            other => {
                failures += 1;
                if failures >= 3 {
                    tracing::debug!(stream = id.0, ?other, "no path statistics for this stream");
                    return std::future::pending().await;
                }
                continue;
            }
        };
        failures = 0;
        let Some(loss) = meter.update(&info) else {
            continue;
        };
        let input = Input::PathStats {
            stream: id,
            rtt_us: u64::from(info.rtt_us),
            loss,
        };
        if ev.send(SendEvent::Input(input)).await.is_err() {
            return;
        }
    }
}

async fn write_chunks(
    mut wr: WriteHalf<Box<dyn Conn>>,
    mut rx: mpsc::Receiver<Chunk>,
) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    while let Some(chunk) = rx.recv().await {
        out.clear();
        Frame::Chunk(chunk).encode(&mut out);
        wr.write_all(&out).await?;
        if rx.is_empty() {
            wr.flush().await?;
        }
    }
    wr.shutdown().await
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
async fn read_frame(
    rd: &mut ReadHalf<Box<dyn Conn>>,
    buf: &mut BytesMut,
) -> Result<Option<Frame>, FrameReadError> {
    loop {
        if let Some(f) = Frame::decode(buf)? {
            return Ok(Some(f));
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        let n = rd.read_buf(buf).await?;
        if n == 0 {
            return Ok(None);
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum FrameReadError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

enum RecvEvent<I> {
    Hello {
        id: StreamId,
        transfer: [u8; 16],
        identity: I,
        acks: mpsc::Sender<Ack>,
    },
    Chunk(StreamId, Chunk),
    Closed(StreamId),
}

/// Receives one transfer from connections `acceptor` yields, writing it in order to `sink`.
/// Connections whose identity `authorize` rejects, or whose hello names another transfer
/// (`expected`, or the first one seen), are closed at once.
pub async fn receive<A: Acceptor, W: AsyncWrite + Unpin>(
    mut acceptor: A,
    cfg: Config,
    expected: Option<[u8; 16]>,
    authorize: impl Fn(&A::Identity) -> bool,
    mut sink: W,
) -> Result<Report, IoError> {
    let cfg = cfg.validate()?;
    let start = Instant::now();
    let mut core = Receiver::new(&cfg, 0);
    let (ev_tx, mut ev_rx) = mpsc::channel::<RecvEvent<A::Identity>>(256);
    let mut acks: BTreeMap<StreamId, mpsc::Sender<Ack>> = BTreeMap::new();
    let mut tasks = JoinSet::new();
    let mut transfer = expected;
    let mut complete_at: Option<Instant> = None;
    let mut next_conn: u32 = 0;
    loop {
        // Hand in-order bytes to the sink, then send the acks the core produced.
        while let Some(b) = core.read() {
            sink.write_all(&b).await.map_err(|source| IoError::Local {
                what: "sink write",
                source,
            })?;
        }
        while let Some((sid, ack)) = core.poll_ack() {
            let target = sid
                .filter(|s| acks.contains_key(s))
                .or_else(|| acks.keys().next_back().copied());
            if let Some(t) = target
                && let Some(tx) = acks.get(&t)
            {
                let _ = tx.try_send(ack);
            }
        }
        if core.is_complete() && complete_at.is_none() {
            sink.flush().await.map_err(|source| IoError::Local {
                what: "sink flush",
                source,
            })?;
            complete_at = Some(Instant::now());
        }
        if let Some(t) = complete_at
            && (acks.is_empty() || t.elapsed() > Duration::from_secs(5))
        {
            return Ok(Report {
                bytes: core.consumed(),
                elapsed: start.elapsed(),
                progress: None,
            });
        }
        let deadline = if complete_at.is_some() {
            Some(Instant::now() + Duration::from_millis(100))
        } else {
            core.poll_timeout()
                .map(|t| start + Duration::from_micros(t))
        };
        tokio::select! {
            r = acceptor.accept() => {
                let (conn, identity) = r.map_err(IoError::Accept)?;
                if !authorize(&identity) {
                    tracing::warn!(?identity, "amst: refused unauthorised sender");
                    drop(conn);
                    continue;
                }
                // Streams are keyed by a local connection number, never by what the peer
                // claims, so one connection cannot pose as another.
                let local = StreamId(next_conn);
                next_conn = next_conn.wrapping_add(1);
                tasks.spawn(receiver_stream(conn, local, identity, ev_tx.clone()));
            }
            ev = ev_rx.recv() => match ev {
                Some(RecvEvent::Hello { id, transfer: t, identity, acks: tx }) => {
                    if *transfer.get_or_insert(t) != t {
                        tracing::warn!(?identity, "amst: hello for another transfer refused");
                        continue;
                    }
                    let _ = tx.try_send(core.state_ack());
                    acks.insert(id, tx);
                    core.on_stream_opened(id);
                }
                Some(RecvEvent::Chunk(id, chunk)) => {
                    if !acks.contains_key(&id) {
                        continue;
                    }
                    if let Err(e) = core.handle_chunk(id, chunk) {
                        tracing::warn!(stream = id.0, error = %e, "amst: protocol violation, closing stream");
                        acks.remove(&id);
                        core.on_stream_closed(micros(start), id);
                    }
                }
                Some(RecvEvent::Closed(id)) => {
                    acks.remove(&id);
                    core.on_stream_closed(micros(start), id);
                }
                None => {}
            },
            () = sleep_until_opt(deadline) => {
                core.handle_timeout(micros(start))?;
            }
        }
    }
}

async fn receiver_stream<I: Send + 'static>(
    conn: Box<dyn Conn>,
    id: StreamId,
    identity: I,
    ev: mpsc::Sender<RecvEvent<I>>,
) {
    let (mut rd, mut wr) = tokio::io::split(conn);
    let mut inbuf = BytesMut::with_capacity(READ_BUF);
    let hello = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut rd, &mut inbuf)).await;
    let Ok(Ok(Some(Frame::Hello { transfer, .. }))) = hello else {
        return;
    };
    let (ack_tx, mut ack_rx) = mpsc::channel::<Ack>(1024);
    if ev
        .send(RecvEvent::Hello {
            id,
            transfer,
            identity,
            acks: ack_tx,
        })
        .await
        .is_err()
    {
        return;
    }
    let writer = async {
        let mut out = BytesMut::new();
        while let Some(a) = ack_rx.recv().await {
            out.clear();
            Frame::Ack(a).encode(&mut out);
            if wr.write_all(&out).await.is_err() {
                return;
            }
            if ack_rx.is_empty() && wr.flush().await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    };
    let reader = async {
        loop {
            match read_frame(&mut rd, &mut inbuf).await {
                Ok(Some(Frame::Chunk(c))) => {
                    if ev.send(RecvEvent::Chunk(id, c)).await.is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    };
    tokio::select! {
        () = writer => {}
        () = reader => {}
    }
    let _ = ev.send(RecvEvent::Closed(id)).await;
}
