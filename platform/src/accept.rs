//! The connections a gRPC server accepts, and the bounds on how long one may hold a socket
//! without using it.
//!
//! [`incoming`] accepts TCP connections, runs the TLS handshake of a `--grpc-tls` server
//! (each in its own task, so a slow one holds up no other, and within the preface deadline),
//! and hands tonic a [`Conn`]: the socket behind the HTTP/2 preface deadline
//! ([`crate::preface`]) and an idle bound. tonic knows when a connection is old but not when
//! it is unused, so [`CountCalls`] counts each connection's calls in progress (a call lasts
//! until its response body is done: a watch or an ingest stream counts for as long as it is
//! open), and a connection with none is closed after [`FIRST_CALL_TIMEOUT`] from accept
//! when it never made a call, or after the idle timeout since its last call ended. The close
//! is a failed read, which makes hyper drop the connection; a tonic client reconnects on
//! its next call.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::{Instant, Sleep},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::{preface::PrefaceDeadline, retry::Backoff};

/// How long a new connection has to start its first call (the same bound as the preface's).
pub const FIRST_CALL_TIMEOUT: Duration = crate::preface::PREFACE_TIMEOUT;
/// Default bound on how long a connection may stay open with no call in progress.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the accept loop waits after an accept that failed (a fixed wait).
const ACCEPT_RETRY: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(50));

/// The time bounds of accepted connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    /// For the TLS handshake and the HTTP/2 preface, both counted from accept.
    pub preface: Duration,
    /// For the first call, from accept.
    pub first_call: Duration,
    /// With no call in progress, after the first.
    pub idle: Duration,
}

/// Accepts on `listener` until the returned stream is dropped (which closes the listener).
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    bounds: Bounds,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut retry = ACCEPT_RETRY.start(1);
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, or a connection reset before accept: wait a little
                    // rather than spin, and keep serving.
                    tracing::debug!("gRPC accept: {e}");
                    tokio::time::sleep(retry.failed().unwrap_or(ACCEPT_RETRY.min)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let start = Instant::now();
            match &tls {
                None => {
                    let conn = Conn::new(Transport::Plain(tcp), peer, start, bounds);
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Some(acceptor) => {
                    let (acceptor, tx) = (acceptor.clone(), tx.clone());
                    tokio::spawn(async move {
                        let shake = acceptor.accept(tcp);
                        match tokio::time::timeout_at(start + bounds.preface, shake).await {
                            Ok(Ok(s)) => {
                                let t = Transport::Tls(Box::new(s));
                                let _ = tx.send(Ok(Conn::new(t, peer, start, bounds))).await;
                            }
                            Ok(Err(e)) => tracing::info!(%peer, "gRPC TLS handshake failed: {e}"),
                            Err(_) => tracing::debug!(%peer, "gRPC TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// The byte stream under HTTP/2: TCP, or TLS over TCP.
enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The calls in progress on one connection.
#[derive(Default)]
pub(crate) struct Calls {
    active: AtomicUsize,
    /// Calls started so far: a change means the connection was used since a timer was set.
    started: AtomicU64,
    /// The connection's reader, woken when the last call in progress ends.
    reader: Mutex<Option<Waker>>,
}

/// One call in progress; dropped when its response is done.
pub(crate) struct CallGuard(Arc<Calls>);

impl Calls {
    fn start(self: &Arc<Self>) -> CallGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        self.started.fetch_add(1, Ordering::SeqCst);
        CallGuard(self.clone())
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            let waker = self
                .0
                .reader
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

/// What tonic puts in every request's extensions for a [`Conn`].
#[derive(Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub remote: SocketAddr,
    calls: Arc<Calls>,
    /// Its streaming calls open now (see [`crate::streams`]).
    pub(crate) streams: Arc<AtomicUsize>,
}

impl ConnInfo {
    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        Self {
            remote: SocketAddr::from(([127, 0, 0, 1], 1)),
            calls: Arc::default(),
            streams: Arc::default(),
        }
    }
}

/// An accepted gRPC connection, closed when unused for too long (see the module docs).
pub struct Conn {
    io: PrefaceDeadline<Transport>,
    info: ConnInfo,
    bounds: Bounds,
    timer: Pin<Box<Sleep>>,
    /// `Calls::started` when the timer was last set; `None` while calls are in progress.
    armed_at: Option<u64>,
}

impl Conn {
    fn new(t: Transport, remote: SocketAddr, accepted: Instant, bounds: Bounds) -> Self {
        Self {
            io: PrefaceDeadline::until(t, bounds.preface, accepted + bounds.preface),
            info: ConnInfo {
                remote,
                calls: Arc::default(),
                streams: Arc::default(),
            },
            bounds,
            timer: Box::pin(tokio::time::sleep_until(accepted + bounds.first_call)),
            armed_at: Some(0),
        }
    }

    /// Whether the connection has been unused past its bound (registering for a wake-up
    /// otherwise).
    fn unused_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        let calls = &self.info.calls;
        *calls.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        if calls.active.load(Ordering::SeqCst) > 0 {
            self.armed_at = None;
            return false;
        }
        let started = calls.started.load(Ordering::SeqCst);
        if self.armed_at != Some(started) {
            self.timer.as_mut().reset(Instant::now() + self.bounds.idle);
            self.armed_at = Some(started);
        }
        self.timer.as_mut().poll(cx).is_ready()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Pending if this.unused_too_long(cx) => {
                let never = this.armed_at == Some(0);
                tracing::debug!(remote = %this.info.remote, never, "closing an unused gRPC connection");
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    if never {
                        "no gRPC call started in time"
                    } else {
                        "gRPC connection idle"
                    },
                )))
            }
            other => other,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

/// Counts each connection's calls in progress (see the module docs).
#[derive(Clone, Copy, Default)]
pub(crate) struct CountCallsLayer;

impl<S> tower_layer::Layer<S> for CountCallsLayer {
    type Service = CountCalls<S>;

    fn layer(&self, inner: S) -> CountCalls<S> {
        CountCalls { inner }
    }
}

/// The service of [`CountCallsLayer`].
#[derive(Clone)]
pub(crate) struct CountCalls<S> {
    inner: S,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for CountCalls<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = http::Response<Counted<R>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // Counted from the moment the call is dispatched, before any of it runs.
        let info = req.extensions().get::<ConnInfo>();
        // Which callers use the API: `interpose up`'s test that no service of its own is one.
        tracing::debug!(
            method = req.uri().path(),
            peer = ?info.map(|i| i.remote),
            "gRPC call"
        );
        let guard = info.map(|i| i.calls.start());
        let call = self.inner.call(req);
        Box::pin(async move {
            let response = call.await?;
            Ok(response.map(|body| Counted { body, guard }))
        })
    }
}

/// A response body that holds its call's [`CallGuard`] until it is done or dropped.
pub(crate) struct Counted<B> {
    body: B,
    #[allow(dead_code)] // Held for its Drop.
    guard: Option<CallGuard>,
}

impl<B: http_body::Body + Unpin> http_body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
