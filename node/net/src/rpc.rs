//! Direct request-response between two peers: one libp2p `request_response` behaviour per
//! DWCP [`Service`], each on its own protocol name, with length-prefixed byte frames and a
//! hard size limit per service.
//!
//! Payloads are opaque bytes to this layer: the services put signed envelopes in them and
//! verify them above. What this layer guarantees is that the remote end is the authenticated
//! libp2p peer (noise or QUIC/TLS) and that no frame above the service's limit is ever
//! buffered: the length prefix is checked before the body is read.
//!
//! ```text
//!  frame = u32 big-endian length || body      (length <= Service::max_frame())
//! ```

use std::io;

use dwcp_protocol::{
    envelope::MessageKind,
    version::{CONSENSUS_PROTOCOL, CONTROL_PROTOCOL, STATE_TRANSFER_PROTOCOL, SYNC_PROTOCOL},
};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;

/// Envelope framing overhead allowed on top of a kind's payload limit.
const FRAME_SLACK: usize = 4096;

/// A request-response service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    /// Automerge state sync (`/dwcp/sync/3.0.0`).
    Sync,
    /// PBFT catch-up and direct votes (`/dwcp/consensus/3.0.0`).
    Consensus,
    /// Node-to-node control: forwarded VM operations (`/dwcp/control/3.0.0`).
    Control,
    /// Consensus state transfer: a certified snapshot for a node too far behind to replay
    /// the log (`/dwcp/state-transfer/3.0.0`).
    StateTransfer,
}

/// The largest state-transfer frame (a snapshot with its chain of epoch links).
pub const MAX_STATE_TRANSFER_FRAME: usize = 8 * 1024 * 1024;

impl Service {
    /// Every service.
    pub const ALL: [Service; 4] = [
        Service::Sync,
        Service::Consensus,
        Service::Control,
        Service::StateTransfer,
    ];

    /// Its protocol name.
    pub const fn protocol_name(self) -> &'static str {
        match self {
            Service::Sync => SYNC_PROTOCOL,
            Service::Consensus => CONSENSUS_PROTOCOL,
            Service::Control => CONTROL_PROTOCOL,
            Service::StateTransfer => STATE_TRANSFER_PROTOCOL,
        }
    }

    /// The largest request or response frame body accepted, bytes.
    pub const fn max_frame(self) -> usize {
        match self {
            Service::Sync => MessageKind::StateSync.max_envelope() + FRAME_SLACK,
            Service::Consensus => MessageKind::Consensus.max_envelope() + FRAME_SLACK,
            Service::Control => 64 * 1024,
            Service::StateTransfer => MAX_STATE_TRANSFER_FRAME,
        }
    }

    /// A short label for metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Service::Sync => "sync",
            Service::Consensus => "consensus",
            Service::Control => "control",
            Service::StateTransfer => "state-transfer",
        }
    }
}

/// Length-prefixed byte frames with a size limit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameCodec {
    max: usize,
}

impl FrameCodec {
    pub(crate) fn new(max: usize) -> Self {
        Self { max }
    }
}

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the limit of {max}"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    max: usize,
    data: Vec<u8>,
) -> io::Result<()> {
    if data.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame of {} bytes exceeds the limit of {max}", data.len()),
        ));
    }
    let len = u32::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(&data).await?;
    io.close().await
}

impl libp2p::request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, self.max, req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, self.max, res).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_oversize_is_refused_before_reading_the_body() {
        futures::executor::block_on(async {
            let mut buf = Vec::new();
            write_frame(&mut buf, 16, b"hello".to_vec()).await.unwrap();
            assert_eq!(&buf[..4], &5u32.to_be_bytes());
            let got = read_frame(&mut &buf[..], 16).await.unwrap();
            assert_eq!(got, b"hello");

            // A header that claims 1 GiB with no body behind it: refused by size, not by EOF.
            let mut huge = (1u32 << 30).to_be_bytes().to_vec();
            huge.extend_from_slice(b"xx");
            let e = read_frame(&mut &huge[..], 1024).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(e.to_string().contains("exceeds the limit"));

            // Truncated body: an error, not a short frame.
            let mut short = 10u32.to_be_bytes().to_vec();
            short.extend_from_slice(b"abc");
            assert!(read_frame(&mut &short[..], 1024).await.is_err());

            // Writing above the limit is refused too.
            let mut out = Vec::new();
            assert!(write_frame(&mut out, 4, vec![0; 5]).await.is_err());
            assert!(out.is_empty());
        });
    }

    #[test]
    fn every_service_has_its_own_protocol_and_a_limit_above_its_envelope() {
        let names: std::collections::BTreeSet<_> =
            Service::ALL.iter().map(|s| s.protocol_name()).collect();
        assert_eq!(names.len(), Service::ALL.len());
        assert!(Service::Sync.max_frame() > MessageKind::StateSync.max_envelope());
        assert!(Service::Consensus.max_frame() > MessageKind::Consensus.max_envelope());
    }
}
