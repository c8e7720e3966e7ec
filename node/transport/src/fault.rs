//! Fault injection for tests and benchmarks (never used by the node): a [`Connector`] whose
//! first connection breaks after a byte budget, as a peer's link dropping mid-transfer would.

use std::{
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering},
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::io::{BoxFuture, Conn, Connector};

/// Wraps a connector; the first connection it opens fails with `ConnectionReset` once
/// `budget` bytes were written on it. Later connections are untouched.
#[derive(Debug)]
pub struct KillFirstConnection<C> {
    inner: C,
    budget: usize,
    opened: AtomicUsize,
}

impl<C: Connector> KillFirstConnection<C> {
    /// Kills `inner`'s first connection after `budget` written bytes.
    pub fn new(inner: C, budget: usize) -> Self {
        Self {
            inner,
            budget,
            opened: AtomicUsize::new(0),
        }
    }
}

impl<C: Connector> Connector for KillFirstConnection<C> {
    fn connect(&self) -> BoxFuture<'static, std::io::Result<Box<dyn Conn>>> {
        let first = self.opened.fetch_add(1, Ordering::SeqCst) == 0;
        let budget = self.budget;
        let f = self.inner.connect();
        Box::pin(async move {
            let c = f.await?;
            Ok(if first {
                Box::new(Dying {
                    inner: c,
                    left: budget,
                }) as Box<dyn Conn>
            } else {
                c
            })
        })
    }
}

/// A connection that fails its writes after `left` more bytes.
struct Dying {
    inner: Box<dyn Conn>,
    left: usize,
}

impl AsyncRead for Dying {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Dying {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.left == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()));
        }
        let n = buf.len().min(self.left);
        let r = Pin::new(&mut self.inner).poll_write(cx, &buf[..n]);
        if let Poll::Ready(Ok(k)) = &r {
            self.left -= k;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
