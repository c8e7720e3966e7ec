//! AMST connections: bulk-transfer streams, each on its own TCP connection, each
//! authenticated as a libp2p peer.
//!
//! Streams multiplexed on one connection share one congestion window, so under random loss
//! they are no faster than one stream (see `dwcp-transport`'s README for the measurements).
//! AMST therefore opens a new TCP connection per stream, chooses the congestion controller
//! on that socket (`TCP_CONGESTION`, which the swarm's TCP transport offers no hook for),
//! and upgrades it the way libp2p upgrades every connection, minus the muxer:
//!
//! ```text
//!  dialer                                         listener
//!  TcpSocket + TCP_CONGESTION ── connect ──────▶  TcpListener::accept
//!  multistream-select "/noise"  ◀────────────▶   (same)
//!  noise XX with the node's ed25519 identity     -> remote PeerId, proven by the handshake
//!  multistream-select "/dwcp/amst/3.0.0"  ◀───▶  (same)
//!  transfer id (16 bytes)  ─────────────────▶    route to the transfer that expects it
//!  AMST frames (hello, chunks / acks)  ◀─────▶
//! ```
//!
//! The dialer negotiates optimistically (multistream-select `V1Lazy`, as libp2p does when it
//! proposes a single protocol), so the two negotiations cost no extra round trip on a long
//! path. The dialer checks that the remote end proved the `PeerId` it meant to reach; the listener
//! learns the sender's `PeerId` from the handshake and hands it to the receiver's
//! `authorize` check. The payload is encrypted and authenticated by noise
//! (ChaCha20-Poly1305), like every other libp2p connection of the node.

use std::net::SocketAddr;
use std::time::Duration;

use dwcp_protocol::version::TRANSFER_PROTOCOL;
use dwcp_transport::io::{
    Accepted, Acceptor, BoxFuture, Conn, Connector, PathConn, connect_tcp, tcp_ends,
};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, Version};
pub use libp2p::identity::Keypair;
use libp2p::{PeerId, noise};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// Length of a transfer id.
pub const TRANSFER_ID_LEN: usize = 16;
/// A transfer id: chosen by the sender, announced in its offer, repeated on every stream.
pub type TransferId = [u8; TRANSFER_ID_LEN];

/// Longest a connect, the noise handshake and both negotiations may take together.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an AMST connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AmstConnError {
    /// Socket, connect or read/write failure.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The noise handshake failed (wrong key, not noise, tampered).
    #[error("noise handshake: {0}")]
    Noise(#[from] noise::Error),
    /// The peer does not speak the protocol.
    #[error("protocol negotiation: {0}")]
    Negotiation(#[from] libp2p::core::upgrade::NegotiationError),
    /// The remote end proved another identity than the one dialled.
    #[error("dialled {expected} but the remote end is {actual}")]
    WrongPeer {
        /// Whom we meant to reach.
        expected: PeerId,
        /// Who answered.
        actual: PeerId,
    },
    /// Set-up did not finish within [`HANDSHAKE_TIMEOUT`].
    #[error("connection set-up timed out")]
    Timeout,
}

impl From<AmstConnError> for std::io::Error {
    fn from(e: AmstConnError) -> Self {
        match e {
            AmstConnError::Io(e) => e,
            other => std::io::Error::other(other.to_string()),
        }
    }
}

/// Upgrades a dialled TCP connection: noise (proving `expected`), then the AMST protocol,
/// then the transfer id.
pub async fn upgrade_outbound(
    tcp: TcpStream,
    keypair: &Keypair,
    expected: PeerId,
    transfer: TransferId,
) -> Result<Box<dyn Conn>, AmstConnError> {
    let fut = async {
        let (proto, io) =
            multistream_select::dialer_select_proto(tcp.compat(), ["/noise"], Version::V1Lazy)
                .await?;
        let (actual, io) = noise::Config::new(keypair)?
            .upgrade_outbound(io, proto)
            .await?;
        if actual != expected {
            return Err(AmstConnError::WrongPeer { expected, actual });
        }
        let (_, io) =
            multistream_select::dialer_select_proto(io, [TRANSFER_PROTOCOL], Version::V1Lazy)
                .await?;
        let mut io = io.compat();
        io.write_all(&transfer).await?;
        io.flush().await?;
        Ok(Box::new(io) as Box<dyn Conn>)
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| AmstConnError::Timeout)?
}

/// An accepted, authenticated AMST connection.
pub struct Inbound {
    /// The sender, proven by the noise handshake.
    pub peer: PeerId,
    /// The transfer the connection is for.
    pub transfer: TransferId,
    /// The stream, positioned at the first AMST frame.
    pub conn: Box<dyn Conn>,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("peer", &self.peer)
            .field("transfer", &self.transfer)
            .finish_non_exhaustive()
    }
}

/// Upgrades an accepted TCP connection: noise (learning the sender's `PeerId`), the AMST
/// protocol, and the transfer id.
pub async fn upgrade_inbound(tcp: TcpStream, keypair: &Keypair) -> Result<Inbound, AmstConnError> {
    let fut = async {
        let (proto, io) =
            multistream_select::listener_select_proto(tcp.compat(), ["/noise"]).await?;
        let (peer, io) = noise::Config::new(keypair)?
            .upgrade_inbound(io, proto)
            .await?;
        let (_, io) = multistream_select::listener_select_proto(io, [TRANSFER_PROTOCOL]).await?;
        let mut io = io.compat();
        let mut transfer = [0u8; TRANSFER_ID_LEN];
        io.read_exact(&mut transfer).await?;
        Ok(Inbound {
            peer,
            transfer,
            conn: Box::new(io) as Box<dyn Conn>,
        })
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| AmstConnError::Timeout)?
}

/// Opens AMST streams of one transfer to one peer: a new TCP connection each, with the
/// congestion controller set on the socket before it connects.
#[derive(Clone)]
pub struct AmstConnector {
    /// Our identity.
    pub keypair: Keypair,
    /// The receiver.
    pub peer: PeerId,
    /// Where its AMST listener is.
    pub addr: SocketAddr,
    /// `TCP_CONGESTION` for each socket; `None` keeps the system default.
    pub congestion: Option<String>,
    /// The transfer.
    pub transfer: TransferId,
}

impl std::fmt::Debug for AmstConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmstConnector")
            .field("peer", &self.peer)
            .field("addr", &self.addr)
            .field("congestion", &self.congestion)
            .finish_non_exhaustive()
    }
}

impl Connector for AmstConnector {
    fn connect(&self) -> BoxFuture<'static, std::io::Result<Box<dyn Conn>>> {
        let f = self.connect_path();
        Box::pin(async move { Ok(f.await?.0) })
    }

    fn connect_path(&self) -> BoxFuture<'static, std::io::Result<PathConn>> {
        let this = self.clone();
        Box::pin(async move {
            let tcp = connect_tcp(this.addr, this.congestion.as_deref()).await?;
            // Noise runs over this one TCP connection: its TCP_INFO is the stream's path.
            let ends = tcp_ends(&tcp);
            let conn = upgrade_outbound(tcp, &this.keypair, this.peer, this.transfer).await?;
            Ok((conn, ends))
        })
    }
}

/// Accepts AMST connections for one receive outside the node (benchmarks, tools): a task
/// accepts TCP connections and upgrades each on its own task, as the node's listener does
/// (noise, protocol, transfer id), so that one slow or lossy handshake never holds back the
/// others; upgraded connections are yielded with the sender's proven `PeerId`. The
/// transfer id is left to `dwcp_transport::io::receive`'s hello check. Connections whose
/// upgrade fails are dropped. The task ends when the acceptor is dropped.
#[derive(Debug)]
pub struct NoiseAcceptor {
    rx: tokio::sync::mpsc::Receiver<(Box<dyn Conn>, PeerId)>,
    task: tokio::task::JoinHandle<()>,
}

impl NoiseAcceptor {
    /// Starts accepting on `listener` as `keypair` (needs a tokio runtime).
    pub fn spawn(listener: tokio::net::TcpListener, keypair: Keypair) -> Self {
        const MAX_PENDING: usize = 64;
        let (tx, rx) = tokio::sync::mpsc::channel(MAX_PENDING);
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_PENDING));
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, from)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Ok(permit) = std::sync::Arc::clone(&gate).try_acquire_owned() else {
                    continue;
                };
                let (tx, keypair) = (tx.clone(), keypair.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = tcp.set_nodelay(true);
                    match upgrade_inbound(tcp, &keypair).await {
                        Ok(inb) => {
                            let _ = tx.send((inb.conn, inb.peer)).await;
                        }
                        Err(e) => tracing::debug!(%from, error = %e, "amst handshake failed"),
                    }
                });
            }
        });
        Self { rx, task }
    }
}

impl Drop for NoiseAcceptor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Acceptor for NoiseAcceptor {
    type Identity = PeerId;
    fn accept(&mut self) -> BoxFuture<'_, Accepted<PeerId>> {
        Box::pin(async move {
            self.rx.recv().await.ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "acceptor stopped")
            })
        })
    }
}

/// Congestion controllers this host offers (`/proc/sys/net/ipv4/tcp_available_congestion_control`);
/// empty where the file cannot be read.
pub fn available_congestion_controls() -> Vec<String> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (tokio::net::TcpListener, SocketAddr) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let a = l.local_addr().expect("addr");
        (l, a)
    }

    #[tokio::test]
    async fn authenticated_round_trip_names_the_sender() {
        let (l, addr) = pair().await;
        let server_key = Keypair::generate_ed25519();
        let client_key = Keypair::generate_ed25519();
        let server_id = server_key.public().to_peer_id();
        let client_id = client_key.public().to_peer_id();
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.expect("accept");
            let mut inb = upgrade_inbound(tcp, &server_key).await.expect("inbound");
            let mut buf = [0u8; 5];
            inb.conn.read_exact(&mut buf).await.expect("read");
            inb.conn.write_all(b"world").await.expect("write");
            inb.conn.flush().await.expect("flush");
            (inb.peer, inb.transfer, buf)
        });
        let conn = AmstConnector {
            keypair: client_key,
            peer: server_id,
            addr,
            congestion: None,
            transfer: [3; 16],
        };
        let mut c = conn.connect().await.expect("connect");
        c.write_all(b"hello").await.expect("write");
        c.flush().await.expect("flush");
        let mut back = [0u8; 5];
        c.read_exact(&mut back).await.expect("read");
        let (peer, transfer, got) = server.await.expect("join");
        assert_eq!(peer, client_id);
        assert_eq!(transfer, [3; 16]);
        assert_eq!(&got, b"hello");
        assert_eq!(&back, b"world");
    }

    #[tokio::test]
    async fn dialling_the_wrong_identity_fails() {
        let (l, addr) = pair().await;
        let server_key = Keypair::generate_ed25519();
        tokio::spawn(async move {
            let (tcp, _) = l.accept().await.expect("accept");
            let _ = upgrade_inbound(tcp, &server_key).await;
        });
        let someone_else = Keypair::generate_ed25519().public().to_peer_id();
        let conn = AmstConnector {
            keypair: Keypair::generate_ed25519(),
            peer: someone_else,
            addr,
            congestion: None,
            transfer: [0; 16],
        };
        let err = conn.connect().await.err().expect("must fail");
        assert!(err.to_string().contains("remote end is"), "{err}");
    }

    #[tokio::test]
    async fn plain_tcp_garbage_is_refused_without_panic() {
        let (l, addr) = pair().await;
        let key = Keypair::generate_ed25519();
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.expect("accept");
            upgrade_inbound(tcp, &key).await
        });
        let mut raw = TcpStream::connect(addr).await.expect("connect");
        raw.write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        drop(raw);
        assert!(server.await.expect("join").is_err());
    }

    #[tokio::test]
    async fn unknown_congestion_control_is_an_error() {
        let conn = AmstConnector {
            keypair: Keypair::generate_ed25519(),
            peer: Keypair::generate_ed25519().public().to_peer_id(),
            addr: "127.0.0.1:9".parse().expect("addr"),
            congestion: Some("no-such-cc".into()),
            transfer: [0; 16],
        };
        assert!(conn.connect().await.is_err());
    }
}
