//! A seeded byte generator and a sink that checks bytes against it: how speed tests and
//! benchmarks move data they can verify without storing it.
//!
//! The generator is xorshift64 (Marsaglia), eight bytes per step, little-endian. It is not
//! for secrecy; it only makes every byte of a transfer checkable at the receiver, so that a
//! reordering or resume bug shows up as corruption instead of as a fast figure.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes one `poll_read` produces.
const MAX_READ: usize = 1 << 20;

/// An endless (or `limit`-long) pseudo-random byte stream from a seed.
#[derive(Clone, Debug)]
pub struct Pattern {
    x: u64,
    word: [u8; 8],
    idx: usize,
    pos: u64,
    limit: u64,
}

impl Pattern {
    /// A stream of `limit` bytes (`u64::MAX`: endless) from `seed`.
    pub fn new(seed: u64, limit: u64) -> Self {
        // xorshift has a fixed point at 0; mix the seed into a non-zero state.
        let x = (seed ^ 0x9E37_79B9_7F4A_7C15) | 1;
        Self {
            x,
            word: [0; 8],
            idx: 8,
            pos: 0,
            limit,
        }
    }

    /// A seed from a 16-byte transfer id (its first eight bytes).
    pub fn seed_of(transfer: &[u8; 16]) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&transfer[..8]);
        u64::from_le_bytes(b)
    }

    /// Fills `out` with the next bytes of the stream (ignores the limit).
    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.idx == 8 {
                self.x ^= self.x << 13;
                self.x ^= self.x >> 7;
                self.x ^= self.x << 17;
                self.word = self.x.to_le_bytes();
                self.idx = 0;
            }
            *b = self.word[self.idx];
            self.idx += 1;
        }
    }
}

impl AsyncRead for Pattern {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let left = self.limit - self.pos;
        let n = usize::try_from((buf.remaining() as u64).min(left))
            .unwrap_or(MAX_READ)
            .min(MAX_READ);
        let dst = buf.initialize_unfilled_to(n);
        self.fill(dst);
        buf.advance(n);
        self.pos += n as u64;
        Poll::Ready(Ok(()))
    }
}

/// Counts the bytes written to it and checks them against a [`Pattern`]; a mismatch sets
/// the `corrupt` flag (the bytes are still counted, so a caller sees how far it got).
#[derive(Debug)]
pub struct CheckingSink {
    expect: Pattern,
    /// Bytes written so far.
    pub bytes: Arc<AtomicU64>,
    /// Set once any byte differed from the pattern.
    pub corrupt: Arc<AtomicBool>,
    scratch: Vec<u8>,
}

impl CheckingSink {
    /// A sink expecting the stream `Pattern::new(seed, _)`.
    pub fn new(seed: u64) -> Self {
        Self {
            expect: Pattern::new(seed, u64::MAX),
            bytes: Arc::default(),
            corrupt: Arc::default(),
            scratch: Vec::new(),
        }
    }
}

impl AsyncWrite for CheckingSink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        this.scratch.resize(buf.len(), 0);
        this.expect.fill(&mut this.scratch);
        if buf != &this.scratch[..] {
            this.corrupt.store(true, Ordering::Relaxed);
        }
        this.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn sink_accepts_its_pattern_and_flags_a_changed_byte() {
        let mut data = Vec::new();
        Pattern::new(7, 100_000)
            .read_to_end(&mut data)
            .await
            .expect("read");
        assert_eq!(data.len(), 100_000);
        let mut ok = CheckingSink::new(7);
        ok.write_all(&data[..33_333]).await.expect("write");
        ok.write_all(&data[33_333..]).await.expect("write");
        assert!(!ok.corrupt.load(Ordering::Relaxed));
        assert_eq!(ok.bytes.load(Ordering::Relaxed), 100_000);

        data[50_000] ^= 1;
        let mut bad = CheckingSink::new(7);
        bad.write_all(&data).await.expect("write");
        assert!(bad.corrupt.load(Ordering::Relaxed));

        let mut other_seed = CheckingSink::new(8);
        other_seed.write_all(&data[..1000]).await.expect("write");
        assert!(other_seed.corrupt.load(Ordering::Relaxed));
    }
}
