//! The receiving half: a bounded reorder buffer that hands bytes to the sink in order.
//!
//! Backpressure: the receiver advertises `window_end = consumed + window`, where `consumed`
//! only moves when the sink takes bytes ([`Receiver::read`]). A sender that respects it can
//! never make the buffer hold more than `window` bytes; a chunk beyond it is a protocol
//! violation and is refused.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use crate::{Ack, Chunk, Config, Micros, StreamId, TransferError};

/// Why a chunk was refused (the stream that carried it should be closed).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The chunk lies (partly) beyond the advertised window.
    #[error("chunk at offset {offset}+{len} is beyond the window end {window_end}")]
    BeyondWindow {
        /// Chunk offset.
        offset: u64,
        /// Chunk length.
        len: u64,
        /// Advertised window end.
        window_end: u64,
    },
    /// Larger than the configured chunk size.
    #[error("chunk of {0} bytes is larger than the configured chunk size")]
    TooLarge(usize),
    /// Data after the end of the transfer, or two different ends.
    #[error("chunk at offset {offset}+{len} contradicts the transfer end {end}")]
    PastEnd {
        /// Chunk offset.
        offset: u64,
        /// Chunk length.
        len: u64,
        /// The end announced earlier.
        end: u64,
    },
    /// A chunk that overlaps another one at a different offset.
    #[error("chunk at offset {0} overlaps buffered data")]
    Overlap(u64),
}

/// Receiving state of one transfer.
#[derive(Debug)]
pub struct Receiver {
    window: u64,
    max_chunk: usize,
    resume_timeout: Micros,
    consumed: u64,
    buffer: BTreeMap<u64, Bytes>,
    buffered: u64,
    end: Option<u64>,
    acks: VecDeque<(Option<StreamId>, Ack)>,
    last_window_sent: u64,
    streams: BTreeSet<StreamId>,
    disconnected_since: Option<Micros>,
    failed: Option<TransferError>,
    peak_buffered: u64,
}

impl Receiver {
    /// A receiver for a transfer that starts at `now` (its first stream counts as a resume).
    pub fn new(cfg: &Config, now: Micros) -> Self {
        Self {
            window: cfg.window_bytes,
            max_chunk: cfg.chunk_size,
            resume_timeout: cfg.resume_timeout,
            consumed: 0,
            buffer: BTreeMap::new(),
            buffered: 0,
            end: None,
            acks: VecDeque::new(),
            last_window_sent: 0,
            streams: BTreeSet::new(),
            disconnected_since: Some(now),
            failed: None,
            peak_buffered: 0,
        }
    }

    /// The ack that answers a new stream's hello: where to resume, how far to send.
    pub fn state_ack(&self) -> Ack {
        Ack {
            cumulative: self.consumed,
            window_end: self.consumed + self.window,
            received: Vec::new(),
        }
    }

    /// A stream of this transfer was established.
    pub fn on_stream_opened(&mut self, stream: StreamId) {
        self.streams.insert(stream);
        self.disconnected_since = None;
    }

    /// A stream closed or failed.
    pub fn on_stream_closed(&mut self, now: Micros, stream: StreamId) {
        self.streams.remove(&stream);
        if self.streams.is_empty() && !self.is_complete() {
            self.disconnected_since.get_or_insert(now);
        }
    }

    /// Checks the resume deadline: with no stream for longer than the resume timeout the
    /// transfer fails.
    pub fn handle_timeout(&mut self, now: Micros) -> Result<(), TransferError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if let Some(since) = self.disconnected_since
            && now.saturating_sub(since) >= self.resume_timeout
        {
            let e = TransferError::ResumeTimeout {
                waited_ms: now.saturating_sub(since) / 1000,
                acked_offset: self.consumed,
            };
            self.failed = Some(e.clone());
            return Err(e);
        }
        Ok(())
    }

    /// When [`Receiver::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<Micros> {
        self.disconnected_since.map(|s| s + self.resume_timeout)
    }

    /// Takes a chunk that arrived on `stream`. Duplicates are acknowledged and dropped.
    pub fn handle_chunk(&mut self, stream: StreamId, chunk: Chunk) -> Result<(), ChunkError> {
        let len = chunk.data.len() as u64;
        if chunk.data.len() > self.max_chunk {
            return Err(ChunkError::TooLarge(chunk.data.len()));
        }
        let window_end = self.consumed + self.window;
        let end_of_chunk = chunk.offset + len;
        if end_of_chunk > window_end {
            return Err(ChunkError::BeyondWindow {
                offset: chunk.offset,
                len,
                window_end,
            });
        }
        if let Some(end) = self.end
            && (end_of_chunk > end || (chunk.fin && end_of_chunk != end))
        {
            return Err(ChunkError::PastEnd {
                offset: chunk.offset,
                len,
                end,
            });
        }
        let duplicate = chunk.offset < self.consumed || self.buffer.contains_key(&chunk.offset);
        if !duplicate {
            // Chunks never overlap in a correct sender: check the neighbours.
            if let Some((&o, b)) = self.buffer.range(..chunk.offset).next_back()
                && o + b.len() as u64 > chunk.offset
            {
                return Err(ChunkError::Overlap(chunk.offset));
            }
            if let Some((&o, _)) = self.buffer.range(chunk.offset..).next()
                && o < end_of_chunk
            {
                return Err(ChunkError::Overlap(chunk.offset));
            }
            if chunk.fin {
                self.end = Some(end_of_chunk);
            }
            if len > 0 {
                self.buffered += len;
                self.peak_buffered = self.peak_buffered.max(self.buffered);
                self.buffer.insert(chunk.offset, chunk.data);
            }
        }
        self.acks.push_back((
            Some(stream),
            Ack {
                cumulative: self.consumed,
                window_end,
                received: vec![chunk.seq],
            },
        ));
        Ok(())
    }

    /// Hands the next in-order bytes to the sink, if any. Taking bytes opens the window.
    pub fn read(&mut self) -> Option<Bytes> {
        let data = self.buffer.remove(&self.consumed)?;
        let len = data.len() as u64;
        self.consumed += len;
        self.buffered -= len;
        if self.consumed - self.last_window_sent >= self.window / 8 || self.is_complete() {
            self.last_window_sent = self.consumed;
            self.acks.push_back((None, self.state_ack()));
        }
        Some(data)
    }

    /// The next ack to send: on the given stream, or on any stream when `None`.
    pub fn poll_ack(&mut self) -> Option<(Option<StreamId>, Ack)> {
        self.acks.pop_front()
    }

    /// Bytes handed to the sink so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Bytes held in the reorder buffer now.
    pub fn buffered(&self) -> u64 {
        self.buffered
    }

    /// Most bytes the reorder buffer ever held.
    pub fn peak_buffered(&self) -> u64 {
        self.peak_buffered
    }

    /// The transfer length, once the last chunk arrived.
    pub fn total_len(&self) -> Option<u64> {
        self.end
    }

    /// All bytes arrived and were handed to the sink.
    pub fn is_complete(&self) -> bool {
        self.end == Some(self.consumed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seq: u64, offset: u64, data: &'static [u8], fin: bool) -> Chunk {
        Chunk {
            seq,
            offset,
            fin,
            data: Bytes::from_static(data),
        }
    }

    fn small_cfg() -> Config {
        Config {
            chunk_size: 4,
            window_bytes: 8,
            ..Config::default()
        }
    }

    #[test]
    fn reorders_and_dedups() {
        let mut r = Receiver::new(&small_cfg(), 0);
        let s = StreamId(1);
        r.handle_chunk(s, chunk(1, 4, b"efgh", false)).unwrap();
        assert_eq!(r.read(), None);
        r.handle_chunk(s, chunk(0, 0, b"abcd", false)).unwrap();
        r.handle_chunk(s, chunk(0, 0, b"abcd", false)).unwrap();
        assert_eq!(r.read().unwrap(), "abcd");
        assert_eq!(r.read().unwrap(), "efgh");
        r.handle_chunk(s, chunk(2, 8, b"ij", true)).unwrap();
        assert_eq!(r.read().unwrap(), "ij");
        assert!(r.is_complete());
        // Every chunk, duplicates too, is acknowledged on its stream.
        let sacks: Vec<u64> = std::iter::from_fn(|| r.poll_ack())
            .flat_map(|(_, a)| a.received)
            .collect();
        assert_eq!(sacks, vec![1, 0, 0, 2]);
    }

    #[test]
    fn window_is_enforced_until_the_sink_reads() {
        let mut r = Receiver::new(&small_cfg(), 0);
        let s = StreamId(0);
        r.handle_chunk(s, chunk(0, 0, b"abcd", false)).unwrap();
        r.handle_chunk(s, chunk(1, 4, b"efgh", false)).unwrap();
        assert_eq!(
            r.handle_chunk(s, chunk(2, 8, b"ijkl", false)),
            Err(ChunkError::BeyondWindow {
                offset: 8,
                len: 4,
                window_end: 8
            })
        );
        assert_eq!(r.buffered(), 8);
        r.read().unwrap();
        r.handle_chunk(s, chunk(2, 8, b"ijkl", false)).unwrap();
        assert!(r.peak_buffered() <= 8);
    }

    #[test]
    fn malformed_chunks_are_refused() {
        let mut r = Receiver::new(&small_cfg(), 0);
        let s = StreamId(0);
        assert_eq!(
            r.handle_chunk(s, chunk(0, 0, b"abcde", false)),
            Err(ChunkError::TooLarge(5))
        );
        r.handle_chunk(s, chunk(0, 0, b"ab", true)).unwrap();
        assert!(matches!(
            r.handle_chunk(s, chunk(1, 2, b"cd", false)),
            Err(ChunkError::PastEnd { .. })
        ));
        let mut r2 = Receiver::new(&small_cfg(), 0);
        r2.handle_chunk(s, chunk(0, 0, b"abcd", false)).unwrap();
        assert_eq!(
            r2.handle_chunk(s, chunk(1, 2, b"cd", false)),
            Err(ChunkError::Overlap(2))
        );
    }

    #[test]
    fn resume_deadline() {
        let cfg = small_cfg();
        let mut r = Receiver::new(&cfg, 0);
        r.on_stream_opened(StreamId(0));
        r.on_stream_closed(1_000, StreamId(0));
        assert_eq!(r.poll_timeout(), Some(1_000 + cfg.resume_timeout));
        assert!(r.handle_timeout(cfg.resume_timeout).is_ok());
        r.on_stream_opened(StreamId(1));
        assert_eq!(r.poll_timeout(), None);
        r.on_stream_closed(2_000, StreamId(1));
        assert!(matches!(
            r.handle_timeout(2_000 + cfg.resume_timeout),
            Err(TransferError::ResumeTimeout { .. })
        ));
    }
}
