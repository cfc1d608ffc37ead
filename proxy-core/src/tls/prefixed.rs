//! An I/O wrapper that first yields bytes already read from the stream.
//!
//! The relay reads the ClientHello off the client socket to detect it; those bytes must be
//! fed to the TLS acceptor before anything else the socket delivers.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `inner`, with `prefix` read before anything from `inner`. Writes go straight to `inner`.
#[derive(Debug)]
pub struct PrefixedIo<IO> {
    prefix: Bytes,
    inner: IO,
}

impl<IO> PrefixedIo<IO> {
    /// Wraps `inner`; `prefix` is returned by the first reads.
    pub fn new(inner: IO, prefix: Bytes) -> Self {
        PrefixedIo { prefix, inner }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &IO {
        &self.inner
    }

    /// The wrapped stream, mutably.
    pub fn get_mut(&mut self) -> &mut IO {
        &mut self.inner
    }

    /// Bytes of the prefix not yet read.
    pub fn remaining_prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The wrapped stream and the unread rest of the prefix.
    pub fn into_parts(self) -> (IO, Bytes) {
        (self.inner, self.prefix)
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for PrefixedIo<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn prefix_then_inner() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut p = PrefixedIo::new(a, Bytes::from_static(b"hello "));
        b.write_all(b"world").await.expect("write");
        drop(b);
        let mut out = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            p.read_to_string(&mut out),
        )
        .await
        .expect("no timeout")
        .expect("read");
        assert_eq!(out, "hello world");
        assert!(p.remaining_prefix().is_empty());
    }
}
