//! The deadline for a gRPC client's HTTP/2 preface.
//!
//! tonic bounds a connection's age only once its HTTP/2 handshake is done, and keepalive
//! pings need a peer that speaks HTTP/2: a TCP client that connects and sends nothing, or
//! the preface one byte at a time (slowloris), would hold a socket (and a file descriptor)
//! for ever. [`PrefaceDeadline`] wraps each accepted socket and fails its reads once the
//! deadline passes before the 24 bytes of the preface are in, so the server closes it; after
//! the preface it is a plain pass-through and the connection's other bounds apply.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Sleep,
};
use tonic::transport::server::Connected;

/// Default time a new gRPC connection has to send the HTTP/2 preface.
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);
/// Length of the client connection preface, `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n` (RFC 9113 §3.4).
pub const PREFACE_LEN: usize = 24;

/// A server-side socket whose reads fail with `TimedOut` when the client has not sent the
/// whole HTTP/2 preface within the deadline.
pub struct PrefaceDeadline<T> {
    inner: T,
    timeout: Duration,
    /// Until the preface is in: how many of its bytes are still to come, and the deadline.
    waiting: Option<(usize, Pin<Box<Sleep>>)>,
}

impl<T> PrefaceDeadline<T> {
    /// Wraps `inner`, accepted now, giving it `timeout` to send the preface.
    pub fn new(inner: T, timeout: Duration) -> Self {
        Self::until(inner, timeout, tokio::time::Instant::now() + timeout)
    }

    /// Wraps `inner`, which has until `deadline` to send the preface (`timeout` is what the
    /// error names): for a socket accepted earlier, e.g. before a TLS handshake.
    pub fn until(inner: T, timeout: Duration, deadline: tokio::time::Instant) -> Self {
        Self {
            inner,
            timeout,
            waiting: Some((PREFACE_LEN, Box::pin(tokio::time::sleep_until(deadline)))),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PrefaceDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if let Some((left, _)) = &mut this.waiting {
                    if n >= *left {
                        this.waiting = None;
                    } else {
                        *left -= n;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let expired = match &mut this.waiting {
                    Some((_, deadline)) => deadline.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if !expired {
                    return Poll::Pending;
                }
                tracing::debug!(timeout = ?this.timeout, "closing a gRPC connection that sent no HTTP/2 preface in time");
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no HTTP/2 preface within {:?}", this.timeout),
                )))
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PrefaceDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for PrefaceDeadline<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const SHORT: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn reads_fail_at_the_deadline_until_the_preface_is_in() {
        let (mut client, server) = tokio::io::duplex(64);
        let start = tokio::time::Instant::now();
        let mut s = PrefaceDeadline::new(server, SHORT);
        client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).await.unwrap(), 16);
        let err = s.read(&mut buf).await.expect_err("deadline");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= SHORT, "{:?}", start.elapsed());
    }

    #[tokio::test]
    async fn after_the_preface_silence_is_allowed() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut s = PrefaceDeadline::new(server, SHORT);
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).await.unwrap(), PREFACE_LEN);
        let late = tokio::spawn(async move {
            tokio::time::sleep(SHORT * 3).await;
            client.write_all(b"x").await.unwrap();
            client
        });
        assert_eq!(s.read(&mut buf).await.unwrap(), 1);
        drop(late.await.unwrap());
    }
}
