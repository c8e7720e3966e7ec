//! AMST: adaptive multi-stream transfer of bulk data (VM memory, images) between two nodes.
//!
//! # Shape
//!
//! - [`Sender`] and [`Receiver`] are sans-IO state machines (`handle(now, input)`,
//!   `handle_timeout(now)`, `poll_command()`, `poll_timeout()`); time is [`Micros`] given by
//!   the caller, there are no sockets, threads or clocks in them. Tests drive them on a
//!   virtual clock over simulated streams (`tests/sim.rs`).
//! - [`wire`] is the frame codec (hello, chunk, ack), with a size limit on every field.
//! - `io` (crate feature `io`) is the tokio shell: one TCP connection per stream, each with
//!   its own congestion controller chosen per socket (`TCP_CONGESTION`), behind a pluggable
//!   [`io::Connector`]/listener pair so the node can substitute libp2p-authenticated
//!   connections.
//!
//! # Protocol
//!
//! A transfer is a byte source of known or unknown length cut into chunks (default 256 KiB)
//! with sequence numbers and offsets. Each stream starts with a hello (transfer id, stream
//! number); the receiver answers with an ack carrying its resume state. The receiver acks every
//! chunk on the stream it came on (selective ack), and advertises `window_end = consumed +
//! window` (default 16 MiB), where `consumed` moves only when the sink takes bytes: that is the
//! backpressure, and it bounds the reorder buffer. The sender keeps every chunk above the
//! receiver's consumed offset, so when a stream dies its unacknowledged chunks are sent again
//! on the others; when all streams die it reconnects with backoff and resumes from the last
//! acknowledged offset, and fails with [`TransferError::ResumeTimeout`] after the resume
//! timeout (default 30 s).
//!
//! # Physics, measurements and decisions
//!
//! Streams multiplexed on one connection share one congestion window, so under random loss
//! they are no faster than one stream. AMST therefore opens one TCP connection per stream,
//! each with its own congestion controller, and sets the controller per socket.
//!
//! Measured on the WAN emulator (`dwcp-testnet bench transport`, 10 s per cell; the full
//! table is in `README.md` beside this crate):
//!
//! - On 100 Mbit/s, 100 ms and 1 % loss, a CUBIC connection gets a few per cent of the link
//!   and iperf3 `-P 8` CUBIC about a fifth. One BBR connection gets most of the link, and
//!   AMST with BBR sockets reached 81.6 %, 4.5x iperf3 `-P 8` CUBIC. Decision: AMST asks for
//!   `bbr` per socket; CUBIC streams only scale by count, and the controller grows the count
//!   when that pays off.
//! - Per-stream rate: an EWMA of delivery-rate samples let queueing noise shrink the
//!   in-flight cap, and one stream on 1 Gbit/s, 20 ms reached about 50 %. A windowed maximum
//!   (BBR-style), Karn's rule (no samples from chunks sent twice) and earliest-delivery
//!   scheduling raised it to 91 %, above iperf3 `-P 1` BBR (82 %) in the same run.
//! - Scheduling: a chunk goes to the stream expected to acknowledge it first. A stream whose
//!   expected delivery lags the best one by more than the time needed to move half the
//!   window is skipped, so a slow stream cannot stall the 16 MiB reorder window.
//! - On a fast, clean, short path several streams only reorder. The controller sheds streams,
//!   but the manual's minimum of 4 (and its 16 MiB window) keeps multi-stream AMST below one
//!   stream on 1 Gbit/s, 20 ms. This is reported, not hidden: see the README.
#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod adapt;
#[cfg(feature = "io")]
pub mod fault;
#[cfg(feature = "io")]
pub mod io;
#[cfg(feature = "io")]
pub mod pattern;
pub mod receiver;
pub mod sender;
#[cfg(feature = "io")]
pub mod tcpinfo;
pub mod wire;

use bytes::Bytes;

pub use receiver::{ChunkError, Receiver};
pub use sender::{Command, Input, Progress, Sender, StreamProgress};

/// Microseconds on the caller's clock (any origin; only differences matter).
///
/// Transport needs finer time than the project's millisecond `Timestamp`: a data-centre RTT
/// is well under a millisecond.
pub type Micros = u64;

/// One stream (one connection) of a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(pub u32);

/// A sequenced piece of the transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Sequence number (chunks are numbered in offset order from 0).
    pub seq: u64,
    /// Byte offset in the transfer.
    pub offset: u64,
    /// This is the last chunk: the transfer is `offset + data.len()` bytes long.
    pub fin: bool,
    /// The payload.
    pub data: Bytes,
}

/// An acknowledgement from the receiver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// Bytes the receiver handed to its sink (in order): the resume point.
    pub cumulative: u64,
    /// The sender may send bytes below this offset.
    pub window_end: u64,
    /// Sequence numbers of chunks received (selective acknowledgement).
    pub received: Vec<u64>,
}

/// How a transfer ended badly.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// No stream could be (re)established within the resume timeout.
    #[error(
        "peer unreachable: no stream for {waited_ms} ms (resume timeout); {acked_offset} bytes were acknowledged"
    )]
    ResumeTimeout {
        /// How long the transfer waited.
        waited_ms: u64,
        /// Bytes delivered before the loss.
        acked_offset: u64,
    },
    /// The local side cancelled.
    #[error("transfer cancelled")]
    Cancelled,
    /// The peer broke the protocol.
    #[error("protocol violation by the peer: {0}")]
    Protocol(String),
}

/// Why a configuration was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Stream bounds are inconsistent.
    #[error("streams must satisfy 1 <= min ({min}) <= initial ({initial}) <= max ({max}) <= 256")]
    Streams {
        /// Minimum.
        min: usize,
        /// Initial.
        initial: usize,
        /// Maximum.
        max: usize,
    },
    /// Chunk size out of range.
    #[error("chunk size {0} must be in 1 KiB..=4 MiB")]
    ChunkSize(usize),
    /// Window smaller than two chunks.
    #[error("window {window} must hold at least two chunks of {chunk} bytes")]
    Window {
        /// Window bytes.
        window: u64,
        /// Chunk bytes.
        chunk: usize,
    },
}

/// Transfer settings (the manual's `amst:` section).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Fewest streams (manual: 4).
    pub min_streams: usize,
    /// Most streams (manual: 16).
    pub max_streams: usize,
    /// Streams at start (manual: 8).
    pub initial_streams: usize,
    /// Chunk payload size.
    pub chunk_size: usize,
    /// Receiver reorder buffer and sender window (manual: 16 MiB).
    pub window_bytes: u64,
    /// Give up after this long without any stream (manual: 30 s).
    pub resume_timeout: Micros,
    /// A stream with data in flight and no ack for this long is declared dead.
    pub stall_timeout: Micros,
    /// Shortest adaptation epoch.
    pub min_epoch: Micros,
    /// Relative goodput change that counts as a gain or a loss.
    pub gain_threshold: f64,
    /// Adapt the stream count (off: stay at `initial_streams` unless set).
    pub adaptive: bool,
    /// First reconnection delay while no stream works.
    pub reopen_backoff_min: Micros,
    /// Longest reconnection delay.
    pub reopen_backoff_max: Micros,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            min_streams: 4,
            max_streams: 16,
            initial_streams: 8,
            chunk_size: 128 * 1024,
            window_bytes: 16 * 1024 * 1024,
            resume_timeout: 30_000_000,
            stall_timeout: 5_000_000,
            min_epoch: 1_000_000,
            gain_threshold: 0.05,
            adaptive: true,
            reopen_backoff_min: 250_000,
            reopen_backoff_max: 4_000_000,
        }
    }
}

impl Config {
    /// Checks the settings.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if !(1 <= self.min_streams
            && self.min_streams <= self.initial_streams
            && self.initial_streams <= self.max_streams
            && self.max_streams <= 256)
        {
            return Err(ConfigError::Streams {
                min: self.min_streams,
                initial: self.initial_streams,
                max: self.max_streams,
            });
        }
        if !(1024..=wire::MAX_CHUNK_BYTES).contains(&self.chunk_size) {
            return Err(ConfigError::ChunkSize(self.chunk_size));
        }
        if self.window_bytes < 2 * self.chunk_size as u64 {
            return Err(ConfigError::Window {
                window: self.window_bytes,
                chunk: self.chunk_size,
            });
        }
        Ok(self)
    }

    /// A fixed stream count (adaptation off).
    pub fn with_fixed_streams(mut self, n: usize) -> Self {
        self.min_streams = n;
        self.max_streams = n;
        self.initial_streams = n;
        self.adaptive = false;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        assert!(Config::default().validate().is_ok());
        let bad = Config {
            min_streams: 9,
            ..Config::default()
        };
        assert!(matches!(bad.validate(), Err(ConfigError::Streams { .. })));
        let bad = Config {
            chunk_size: 10,
            ..Config::default()
        };
        assert_eq!(bad.validate(), Err(ConfigError::ChunkSize(10)));
        let bad = Config {
            window_bytes: 1000,
            ..Config::default()
        };
        assert!(matches!(bad.validate(), Err(ConfigError::Window { .. })));
    }
}
