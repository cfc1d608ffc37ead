//! The relay with TLS interception: a CONNECT stream is relayed as plain TCP, and every
//! client-to-server read is checked with [`tls::could_be_tls`]; the first one that could
//! start a ClientHello (the very first read, or one after a plaintext preamble such as
//! SMTP `STARTTLS` or PostgreSQL `SSLRequest`) pauses both directions at a packet boundary,
//! the hello is accumulated until [`tls::detect`] decides, and a ClientHello is terminated
//! with [`tls::Interceptor::intercept`]. From there the same pumps relay the decrypted
//! streams ([`TlsReader`], [`TlsWriter`]), so history packets are decrypted application data.
//!
//! There is no fixed wait: both directions flow from the start, so a protocol where the
//! server speaks first is never delayed. Bytes that turn out not to be TLS, and hellos for
//! `--passthrough` hosts, are relayed as they are.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use proto::{
    common::{CloseKind, ClosedBy, Direction, TlsLeg},
    registry::ConnectionUpdate,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
    sync::Notify,
};

use crate::{
    conn::End,
    relay::{
        self, Ctx, MAX_READ, MIN_READ, PacketReader, PacketWriter, PumpEnd, TcpReader, TcpWriter,
        classify, forward,
    },
    server::Shutdown,
    tls::{
        self, ClientTlsStream, Detection, InterceptError, Interceptor, LegSummary, Target,
        TlsSummary, UpstreamTlsStream,
    },
};

/// Longest the proxy waits for the rest of a ClientHello whose first bytes arrived; after
/// that the bytes are relayed as plain data.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the server-to-client direction may take to finish the packet it is writing when
/// the client starts a TLS handshake.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// First read block of a decrypted stream (one TLS record's plaintext).
const TLS_READ: usize = 16 * 1024;

/// Relays `client` and `upstream` (already connected to `target`), intercepting TLS where a
/// ClientHello shows up. `leftover` is client data received with the SOCKS request.
pub async fn relay(
    client: TcpStream,
    leftover: Bytes,
    upstream: TcpStream,
    target: Target,
    interceptor: &Interceptor,
    ctx: &Ctx<'_>,
    shutdown: &mut Shutdown,
) -> End {
    let (cr, cw) = client.into_split();
    let (sr, sw) = upstream.into_split();
    let mut cr = TcpReader::new(cr, None);
    let mut cw = TcpWriter::new(cw);
    let mut sr = TcpReader::new(sr, None);
    let mut sw = TcpWriter::new(sw);
    let mut state = PhaseState {
        first: None,
        server_done: false,
        pending: Some(leftover).filter(|b| !b.is_empty()),
        pending_checked: false,
        deferred: None,
        detect: true,
    };
    loop {
        match plain_phase(
            &mut cr, &mut cw, &mut sr, &mut sw, ctx, shutdown, &mut state,
        )
        .await
        {
            Phase::Done(fatal) => {
                let first = state
                    .first
                    .take()
                    .unwrap_or_else(|| End::proxy(CloseKind::Error, "relay ended"));
                if fatal && first.kind == CloseKind::Rst {
                    match first.closed_by {
                        ClosedBy::Client => sw.abort(),
                        ClosedBy::Server => cw.abort(),
                        _ => {}
                    }
                }
                return first;
            }
            Phase::Resume(data) => {
                // The server ended while the client began a handshake: relay it as data.
                state.pending = Some(data);
                state.pending_checked = true;
                state.detect = false;
            }
            Phase::Upgrade(first_bytes) => {
                let (buf, hello) = accumulate(&mut cr, first_bytes, &mut state).await;
                let Some(hello) = hello else {
                    state.pending = Some(buf);
                    state.pending_checked = true;
                    continue;
                };
                if let Some(sni) = &hello.sni {
                    ctx.reporter.updated(ConnectionUpdate {
                        id: ctx.state.id,
                        sni: sni.clone(),
                        ..Default::default()
                    });
                }
                if interceptor.passthrough(hello.sni.as_deref(), &target) {
                    tracing::debug!(id = ctx.state.id, sni = ?hello.sni, "passthrough: relaying TLS without interception");
                    state.pending = Some(buf);
                    state.pending_checked = true;
                    state.detect = false;
                    continue;
                }
                let (Some(client), Some(upstream)) = (reunite(cr, cw), reunite(sr, sw)) else {
                    return End::proxy(CloseKind::Error, "internal error: stream halves lost");
                };
                // Boxed: the TLS state (two handshakes, two TLS sessions) is large, and
                // an unboxed future would make every connection's task that large, TLS
                // or not, idle or not.
                return Box::pin(intercept(
                    client,
                    buf,
                    &hello,
                    upstream,
                    &target,
                    interceptor,
                    ctx,
                    shutdown,
                ))
                .await;
            }
        }
    }
}

/// Puts a TCP stream back together for the TLS layer.
fn reunite(r: TcpReader, w: TcpWriter) -> Option<TcpStream> {
    let (r, _) = r.into_inner();
    r.reunite(w.into_inner()?).ok()
}

/// What carries over from one plain phase to the next.
struct PhaseState {
    /// The first end seen (the record's end).
    first: Option<End>,
    /// The server-to-client direction has ended.
    server_done: bool,
    /// Client bytes to relay before reading more.
    pending: Option<Bytes>,
    /// `pending` was already looked at (not a ClientHello): do not check it again.
    pending_checked: bool,
    /// How the client's side ended while a hello was being accumulated.
    deferred: Option<PumpEnd>,
    /// Check client reads for a ClientHello.
    detect: bool,
}

/// How a plain phase ended.
enum Phase {
    /// The connection is over (`true`: abruptly, both directions stopped).
    Done(bool),
    /// A client read could start a ClientHello; both directions are paused.
    Upgrade(Bytes),
    /// Like `Upgrade`, but the server ended meanwhile: relay the bytes as data.
    Resume(Bytes),
}

enum C2s {
    End(PumpEnd),
    Upgrade(Bytes),
}

enum S2c {
    End(PumpEnd),
    Paused,
}

async fn c2s_pump(
    r: &mut TcpReader,
    w: &mut TcpWriter,
    ctx: &Ctx<'_>,
    detect: bool,
    server_open: &AtomicBool,
    pending: Option<(Bytes, bool)>,
    deferred: Option<PumpEnd>,
) -> C2s {
    if let Some((data, checked)) = pending {
        if detect && !checked && tls::could_be_tls(&data) {
            return C2s::Upgrade(data);
        }
        if let Err(e) = forward(w, data, Direction::C2s, ctx).await {
            return C2s::End(PumpEnd::Write(e));
        }
    }
    if let Some(end) = deferred {
        if matches!(end, PumpEnd::Eof) {
            let _ = w.shutdown_write().await;
        }
        return C2s::End(end);
    }
    loop {
        let data = match r.read_packet().await {
            Ok(Some(d)) => d,
            Ok(None) => {
                let _ = w.shutdown_write().await;
                return C2s::End(PumpEnd::Eof);
            }
            Err(e) => return C2s::End(PumpEnd::Read(e)),
        };
        if detect && server_open.load(Ordering::Acquire) && tls::could_be_tls(&data) {
            return C2s::Upgrade(data);
        }
        if let Err(e) = forward(w, data, Direction::C2s, ctx).await {
            return C2s::End(PumpEnd::Write(e));
        }
    }
}

async fn s2c_pump(
    r: &mut TcpReader,
    w: &mut TcpWriter,
    ctx: &Ctx<'_>,
    pause: &Notify,
    server_open: &AtomicBool,
) -> S2c {
    loop {
        // Pausing is only honoured between packets: a packet is never half written.
        let read = tokio::select! {
            biased;
            () = pause.notified() => return S2c::Paused,
            r = r.read_packet() => r,
        };
        let data = match read {
            Ok(Some(d)) => d,
            Ok(None) => {
                server_open.store(false, Ordering::Release);
                let _ = w.shutdown_write().await;
                return S2c::End(PumpEnd::Eof);
            }
            Err(e) => {
                server_open.store(false, Ordering::Release);
                return S2c::End(PumpEnd::Read(e));
            }
        };
        if let Err(e) = forward(w, data, Direction::S2c, ctx).await {
            server_open.store(false, Ordering::Release);
            return S2c::End(PumpEnd::Write(e));
        }
    }
}

/// Relays plainly until the connection ends or a client read could start a ClientHello.
async fn plain_phase(
    cr: &mut TcpReader,
    cw: &mut TcpWriter,
    sr: &mut TcpReader,
    sw: &mut TcpWriter,
    ctx: &Ctx<'_>,
    shutdown: &mut Shutdown,
    st: &mut PhaseState,
) -> Phase {
    let pause = Notify::new();
    let server_open = AtomicBool::new(!st.server_done);
    let pending = st.pending.take().map(|p| (p, st.pending_checked));
    st.pending_checked = false;
    let c2s = c2s_pump(
        cr,
        sw,
        ctx,
        st.detect,
        &server_open,
        pending,
        st.deferred.take(),
    );
    let s2c = s2c_pump(sr, cw, ctx, &pause, &server_open);
    tokio::pin!(c2s, s2c);
    let mut client_done = false;
    loop {
        tokio::select! {
            r = &mut c2s, if !client_done => match r {
                C2s::Upgrade(data) => {
                    if st.server_done {
                        return Phase::Resume(data);
                    }
                    pause.notify_one();
                    match tokio::time::timeout(PAUSE_TIMEOUT, &mut s2c).await {
                        Ok(S2c::Paused) => return Phase::Upgrade(data),
                        Ok(S2c::End(e)) => {
                            st.server_done = true;
                            let (end, fatal) = classify(e, ClosedBy::Server, ClosedBy::Client);
                            st.first.get_or_insert(end);
                            if fatal {
                                return Phase::Done(true);
                            }
                            return Phase::Resume(data);
                        }
                        Err(_) => {
                            st.first.get_or_insert(End::proxy(
                                CloseKind::Error,
                                format!("the client started TLS while the server-to-client direction was stuck for {PAUSE_TIMEOUT:?}"),
                            ));
                            return Phase::Done(true);
                        }
                    }
                }
                C2s::End(e) => {
                    client_done = true;
                    let (end, fatal) = classify(e, ClosedBy::Client, ClosedBy::Server);
                    st.first.get_or_insert(end);
                    if fatal || st.server_done {
                        return Phase::Done(fatal);
                    }
                }
            },
            r = &mut s2c, if !st.server_done => match r {
                // Only after a pause request, which the c2s branch awaits itself.
                S2c::Paused => return Phase::Done(true),
                S2c::End(e) => {
                    st.server_done = true;
                    let (end, fatal) = classify(e, ClosedBy::Server, ClosedBy::Client);
                    st.first.get_or_insert(end);
                    if fatal || client_done {
                        return Phase::Done(fatal);
                    }
                }
            },
            () = shutdown.recv() => {
                st.first.get_or_insert(End::proxy(CloseKind::Fin, "proxy shut down"));
                return Phase::Done(true);
            }
        }
    }
}

/// Reads client bytes after `first` until [`tls::detect`] decides. Returns every byte read
/// and the hello, or `None` when it is not one (the client's end, if it came meanwhile, is
/// left in `st.deferred`).
async fn accumulate(
    cr: &mut TcpReader,
    first: Bytes,
    st: &mut PhaseState,
) -> (Bytes, Option<tls::ClientHelloInfo>) {
    let mut buf = BytesMut::from(&first[..]);
    loop {
        match tls::detect(&buf) {
            Detection::ClientHello(h) => return (buf.freeze(), Some(h)),
            Detection::NotTls { reason } => {
                tracing::debug!("client bytes are not a ClientHello: {reason}");
                return (buf.freeze(), None);
            }
            Detection::NeedMore => {}
        }
        match tokio::time::timeout(HELLO_TIMEOUT, cr.read_packet()).await {
            Ok(Ok(Some(d))) => buf.extend_from_slice(&d),
            Ok(Ok(None)) => {
                st.deferred = Some(PumpEnd::Eof);
                return (buf.freeze(), None);
            }
            Ok(Err(e)) => {
                st.deferred = Some(PumpEnd::Read(e));
                return (buf.freeze(), None);
            }
            Err(_) => {
                tracing::debug!(
                    "incomplete ClientHello after {HELLO_TIMEOUT:?}: relaying it as data"
                );
                return (buf.freeze(), None);
            }
        }
    }
}

fn leg(l: &LegSummary) -> TlsLeg {
    TlsLeg {
        version: l.version.clone(),
        cipher: l.cipher_suite.clone(),
        alpn: l.alpn.clone().unwrap_or_default(),
    }
}

/// The record update for a successful interception.
pub fn tls_update(id: u64, s: &TlsSummary) -> ConnectionUpdate {
    ConnectionUpdate {
        id,
        tls: true,
        sni: s.sni.clone().unwrap_or_default(),
        alpn: s.client.alpn.clone().unwrap_or_default(),
        client_tls: Some(leg(&s.client)),
        upstream_tls: Some(leg(&s.upstream)),
        upstream_insecure: s.insecure,
        ..Default::default()
    }
}

/// The record end for a failed interception.
pub fn intercept_end(e: &InterceptError) -> End {
    let closed_by = match e.closed_by() {
        tls::ClosedBy::Client => ClosedBy::Client,
        tls::ClosedBy::Server => ClosedBy::Server,
        tls::ClosedBy::Proxy => ClosedBy::Proxy,
    };
    let kind = match e {
        InterceptError::ClientClosed => CloseKind::Fin,
        InterceptError::ClientIo(io) if io.kind() == io::ErrorKind::ConnectionReset => {
            CloseKind::Rst
        }
        _ => CloseKind::Error,
    };
    End::new(closed_by, kind, e.reason())
}

#[allow(clippy::too_many_arguments)]
async fn intercept(
    client: TcpStream,
    prefix: Bytes,
    hello: &tls::ClientHelloInfo,
    upstream: TcpStream,
    target: &Target,
    interceptor: &Interceptor,
    ctx: &Ctx<'_>,
    shutdown: &mut Shutdown,
) -> End {
    let intercepted = tokio::select! {
        r = interceptor.intercept(client, prefix, hello, upstream, target) => r,
        () = shutdown.recv() => return End::proxy(CloseKind::Fin, "proxy shut down"),
    };
    let i = match intercepted {
        Ok(i) => i,
        Err(e) => {
            tracing::info!(id = ctx.state.id, "TLS interception failed: {e}");
            return intercept_end(&e);
        }
    };
    ctx.reporter.updated(tls_update(ctx.state.id, &i.summary));
    let summary = Arc::new(i.summary);
    let (mut cr, mut cw) = split(i.client, None);
    let (mut sr, mut sw) = split(i.upstream, Some(summary));
    relay::relay((&mut cr, &mut cw), (&mut sr, &mut sw), ctx, shutdown.recv()).await
}

/// A TLS stream whose TCP socket can be reached (to make its close a reset).
pub trait TcpBacked {
    /// The underlying socket.
    fn tcp(&self) -> &TcpStream;
}

impl TcpBacked for ClientTlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0.get_ref()
    }
}

impl TcpBacked for UpstreamTlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// Splits a TLS stream into a [`TlsReader`] and a [`TlsWriter`] sharing it. `upstream`
/// carries the summary when this is the upstream leg (for error reasons).
pub fn split<S>(stream: S, upstream: Option<Arc<TlsSummary>>) -> (TlsReader<S>, TlsWriter<S>)
where
    S: AsyncRead + AsyncWrite + TcpBacked + Unpin + Send,
{
    let io = Arc::new(Mutex::new(stream));
    (
        TlsReader {
            io: Half(io.clone()),
            buf: BytesMut::new(),
            size: TLS_READ,
            upstream,
        },
        TlsWriter {
            io: Half(io),
            aborted: false,
        },
    )
}

/// One half of a shared stream; each poll locks it briefly (never across an await).
struct Half<S>(Arc<Mutex<S>>);

impl<S> Half<S> {
    fn lock(&self) -> std::sync::MutexGuard<'_, S> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Half<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Half<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_shutdown(cx)
    }
}

/// The decrypted reading side of a TLS stream, one packet per read. A peer that closes TCP
/// without `close_notify` (`UnexpectedEof`) counts as a FIN.
pub struct TlsReader<S> {
    io: Half<S>,
    buf: BytesMut,
    size: usize,
    upstream: Option<Arc<TlsSummary>>,
}

impl<S: AsyncRead + Unpin + Send> PacketReader for TlsReader<S> {
    async fn read_packet(&mut self) -> io::Result<Option<Bytes>> {
        if self.buf.capacity() - self.buf.len() < MIN_READ / 2 {
            self.buf = BytesMut::with_capacity(self.size);
        }
        let spare = self.buf.capacity() - self.buf.len();
        match self.io.read_buf(&mut self.buf).await {
            Ok(0) => Ok(None),
            Ok(n) => {
                if n == spare && self.size < MAX_READ {
                    self.size *= 2;
                }
                Ok(Some(self.buf.split_to(n).freeze()))
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => match (&self.upstream, tls::rustls_error(&e)) {
                (Some(summary), Some(_)) => Err(io::Error::new(
                    e.kind(),
                    tls::upstream_stream_error_reason(&e, summary),
                )),
                _ => Err(e),
            },
        }
    }
}

/// The encrypting writing side of a TLS stream.
pub struct TlsWriter<S> {
    io: Half<S>,
    aborted: bool,
}

impl<S: AsyncWrite + TcpBacked + Unpin + Send> PacketWriter for TlsWriter<S> {
    async fn write_packet(&mut self, data: &[u8]) -> io::Result<()> {
        if self.aborted {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "connection aborted by the proxy",
            ));
        }
        self.io.write_all(data).await?;
        self.io.flush().await
    }

    async fn shutdown_write(&mut self) -> io::Result<()> {
        // close_notify, then FIN.
        self.io.shutdown().await
    }

    fn abort(&mut self) {
        self.aborted = true;
        // SO_LINGER 0: closing the socket (when both halves are dropped) sends RST.
        #[allow(deprecated)]
        let _ = self.io.lock().tcp().set_linger(Some(Duration::ZERO));
    }
}
