//! The TLS splice: a CONNECT stream is relayed as plain TCP, and every client-to-server read
//! is checked with [`tls::could_be_tls`]; the first one that could start a ClientHello (the
//! very first read, or one after a plaintext preamble such as SMTP `STARTTLS` or PostgreSQL
//! `SSLRequest`) stops both directions at a packet boundary, the hello is accumulated until
//! [`tls::detect`] decides, and a ClientHello is terminated with [`Splicer::terminate`]
//! (a leaf for the client, a real rustls client upstream). From there the one relay
//! ([`relay::relay`]) relays the decrypted legs ([`TlsLeg`]), so history packets are
//! decrypted application data.
//!
//! There is no fixed wait: both directions flow from the start, so a protocol where the
//! server speaks first is never delayed. Bytes that turn out not to be TLS, and hellos for
//! `--passthrough` hosts, are relayed as they are. The TCP streams stay whole throughout:
//! the plain phase borrows their halves, the TLS layer then takes them over.

use std::{
    io,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use proto::{
    common::{CloseKind, ClosedBy, Direction, TlsLeg as TlsLegInfo},
    registry::ConnectionUpdate,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadHalf, WriteHalf},
    net::TcpStream,
    sync::Notify,
};

use crate::{
    conn::ConnEnd,
    relay::{
        self, Boundary, Leg, MAX_READ, MIN_READ, PacketCheck, PacketReader, PumpEnd, Resume, Start,
        StreamWriter, Tap, classify, io::reset_tcp, pump,
    },
    shutdown::Shutdown,
    tls::{
        self, ClientHelloInfo, ClientTlsStream, Detection, LegSummary, SpliceError, Splicer,
        Target, TlsSummary, UpstreamTlsStream,
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

/// Relays `client` and `upstream` (already connected to `target`), splicing TLS where a
/// ClientHello shows up. `leftover` is client data received with the SOCKS request.
pub async fn splice(
    mut client: TcpStream,
    leftover: Bytes,
    mut upstream: TcpStream,
    target: Target,
    tls: &Splicer,
    tap: &Tap<'_>,
    shutdown: &mut Shutdown,
) -> ConnEnd {
    let mut st = PhaseState {
        first: None,
        server_done: false,
        c2s: Start::with(leftover),
        detect: true,
    };
    loop {
        match plain_phase(&mut client, &mut upstream, tap, shutdown, &mut st).await {
            Phase::Done(fatal) => {
                let first = st
                    .first
                    .take()
                    .unwrap_or_else(|| ConnEnd::proxy(CloseKind::Error, "relay ended"));
                relay::pass_reset(&first, fatal, &client, &upstream);
                return first;
            }
            Phase::Resume(data) => {
                // The server ended while the client began a handshake: relay it as data.
                st.c2s = Start::resume(Resume {
                    pending: Some(data),
                    checked: true,
                    ended: None,
                });
                st.detect = false;
            }
            Phase::Upgrade(first_bytes) => {
                let hello;
                (st.c2s, hello) = read_hello(&mut client, first_bytes).await;
                let Some(hello) = hello else { continue };
                // The record says the client spoke TLS from now on, whatever the outcome.
                tap.reporter.updated(ConnectionUpdate {
                    id: tap.conn_id(),
                    tls: true,
                    sni: hello.sni.clone().unwrap_or_default(),
                    ..Default::default()
                });
                if tls.passthrough(hello.sni.as_deref(), &target) {
                    tracing::debug!(id = tap.conn_id(), sni = ?hello.sni, "passthrough: relaying TLS as it is");
                    st.detect = false;
                    continue;
                }
                let prefix = st.c2s.take_pending().unwrap_or_default();
                // Boxed: the TLS state (two handshakes, two TLS sessions) is large, and
                // an unboxed future would make every connection's task that large, TLS
                // or not, idle or not.
                return Box::pin(terminate_and_relay(
                    client, prefix, &hello, upstream, &target, tls, tap, shutdown,
                ))
                .await;
            }
        }
    }
}

/// What carries over from one plain phase to the next.
struct PhaseState {
    /// The first end seen (the record's end).
    first: Option<ConnEnd>,
    /// The server-to-client direction has ended.
    server_done: bool,
    /// How the client-to-server direction starts: bytes read but not relayed yet, and the
    /// client's end if it came while a hello was being read.
    c2s: Start,
    /// Check client reads for a ClientHello.
    detect: bool,
}

impl PhaseState {
    /// Notes how one direction ended (reading from `from`); returns whether it was fatal.
    fn ended(&mut self, e: PumpEnd, from: ClosedBy) -> bool {
        let to = if from == ClosedBy::Client {
            ClosedBy::Server
        } else {
            ClosedBy::Client
        };
        let (end, fatal) = classify(e, from, to);
        self.first.get_or_insert(end);
        fatal
    }
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

/// Relays plainly until the connection ends or a client read could start a ClientHello.
async fn plain_phase(
    client: &mut TcpStream,
    server: &mut TcpStream,
    tap: &Tap<'_>,
    shutdown: &mut Shutdown,
    st: &mut PhaseState,
) -> Phase {
    let pause = Notify::new();
    let server_open = AtomicBool::new(!st.server_done);
    let (mut cr, mut cw) = Leg::split(client);
    let (mut sr, mut sw) = Leg::split(server);
    let hello_check: PacketCheck = tls::could_be_tls;
    let c2s_at = Boundary {
        before: st.detect.then_some((hello_check, &server_open)),
        pause: None,
    };
    let s2c_at = Boundary {
        before: None,
        pause: Some(&pause),
    };
    let c2s = pump(
        &mut cr,
        &mut sw,
        Direction::C2s,
        tap,
        &c2s_at,
        std::mem::take(&mut st.c2s),
    );
    let s2c = pump(
        &mut sr,
        &mut cw,
        Direction::S2c,
        tap,
        &s2c_at,
        Start::default(),
    );
    tokio::pin!(c2s, s2c);
    let mut client_done = false;
    loop {
        tokio::select! {
            e = &mut c2s, if !client_done => match e {
                PumpEnd::Stopped(Some(data)) => {
                    // Boxed: rare (a client read that could start TLS), and its timer would
                    // otherwise be part of every connection's future.
                    return Box::pin(pause_server(&mut s2c, &pause, data, st)).await;
                }
                e => {
                    client_done = true;
                    let fatal = st.ended(e, ClosedBy::Client);
                    if fatal || st.server_done {
                        return Phase::Done(fatal);
                    }
                }
            },
            e = &mut s2c, if !st.server_done => {
                // Only after a pause request, which `pause_server` awaits itself.
                if matches!(e, PumpEnd::Stopped(_)) {
                    return Phase::Done(true);
                }
                st.server_done = true;
                server_open.store(false, Ordering::Release);
                let fatal = st.ended(e, ClosedBy::Server);
                if fatal || client_done {
                    return Phase::Done(fatal);
                }
            },
            () = shutdown.recv() => {
                st.first.get_or_insert(ConnEnd::proxy(CloseKind::Fin, "proxy shut down"));
                return Phase::Done(true);
            }
        }
    }
}

/// The client may be starting TLS: stops the server-to-client pump between packets, or
/// says how the server side ended meanwhile.
async fn pause_server(
    s2c: impl std::future::Future<Output = PumpEnd>,
    pause: &Notify,
    data: Bytes,
    st: &mut PhaseState,
) -> Phase {
    if st.server_done {
        return Phase::Resume(data);
    }
    pause.notify_one();
    match tokio::time::timeout(PAUSE_TIMEOUT, s2c).await {
        Ok(PumpEnd::Stopped(_)) => Phase::Upgrade(data),
        Ok(e) => {
            st.server_done = true;
            if st.ended(e, ClosedBy::Server) {
                Phase::Done(true)
            } else {
                Phase::Resume(data)
            }
        }
        Err(_) => {
            st.first.get_or_insert(ConnEnd::proxy(
                CloseKind::Error,
                format!(
                    "the client started TLS while the server-to-client direction was stuck for {PAUSE_TIMEOUT:?}"
                ),
            ));
            Phase::Done(true)
        }
    }
}

/// Reads client bytes after `first` until [`tls::detect`] decides. Returns how the
/// client-to-server direction goes on (every byte read, already checked, and the client's
/// end if it came meanwhile) and the hello, or `None` when it is not one.
async fn read_hello(client: &mut TcpStream, first: Bytes) -> (Start, Option<ClientHelloInfo>) {
    let (mut reader, _) = Leg::split(client);
    let mut buf = BytesMut::from(&first[..]);
    let mut ended = None;
    let hello = loop {
        match tls::detect(&buf) {
            Detection::ClientHello(h) => break Some(h),
            Detection::NotTls { reason } => {
                tracing::debug!("client bytes are not a ClientHello: {reason}");
                break None;
            }
            Detection::NeedMore => {}
        }
        match tokio::time::timeout(HELLO_TIMEOUT, reader.read_packet()).await {
            Ok(Ok(Some(d))) => buf.extend_from_slice(&d),
            Ok(Ok(None)) => {
                ended = Some(PumpEnd::Eof);
                break None;
            }
            Ok(Err(e)) => {
                ended = Some(PumpEnd::Read(e));
                break None;
            }
            Err(_) => {
                tracing::debug!(
                    "incomplete ClientHello after {HELLO_TIMEOUT:?}: relaying it as data"
                );
                break None;
            }
        }
    };
    let start = Start::resume(Resume {
        pending: Some(buf.freeze()),
        checked: true,
        ended,
    });
    (start, hello)
}

fn leg(l: &LegSummary) -> TlsLegInfo {
    TlsLegInfo {
        version: l.version.clone(),
        cipher: l.cipher_suite.clone(),
        alpn: l.alpn.clone().unwrap_or_default(),
    }
}

/// The record update for a successful splice.
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

/// The record end for a failed TLS handshake.
pub fn handshake_end(e: &SpliceError) -> ConnEnd {
    let kind = match e {
        SpliceError::ClientClosed => CloseKind::Fin,
        SpliceError::ClientIo(io) if io.kind() == io::ErrorKind::ConnectionReset => CloseKind::Rst,
        _ => CloseKind::Error,
    };
    ConnEnd::new(e.closed_by(), kind, e.reason())
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

/// Terminates TLS on both legs, then relays the decrypted legs with the one relay.
#[allow(clippy::too_many_arguments)]
async fn terminate_and_relay(
    client: TcpStream,
    prefix: Bytes,
    hello: &ClientHelloInfo,
    upstream: TcpStream,
    target: &Target,
    tls: &Splicer,
    tap: &Tap<'_>,
    shutdown: &mut Shutdown,
) -> ConnEnd {
    let spliced = tokio::select! {
        r = tls.terminate(client, prefix, hello, upstream, target) => r,
        () = shutdown.recv() => return ConnEnd::proxy(CloseKind::Fin, "proxy shut down"),
    };
    let spliced = match spliced {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(id = tap.conn_id(), "TLS splice failed: {e}");
            return handshake_end(&e);
        }
    };
    let mut update = tls_update(tap.conn_id(), &spliced.summary);
    // Where the TLS began, for a replay to redo it at the same point (both directions are
    // paused at a packet boundary while the hello is handled).
    update.tls_after_seq = tap.state.last_seq();
    tap.reporter.updated(update);
    let mut client = TlsLeg::new(spliced.client, None);
    let mut server = TlsLeg::new(spliced.upstream, Some(spliced.summary));
    relay::relay(&mut client, &mut server, Bytes::new(), tap, shutdown.recv()).await
}

/// A TLS stream as a relay leg: the pumps read and write its plaintext. Split with tokio's
/// `split`, whose lock is never contended (both pumps run in the connection's one task):
/// rustls keeps one state for both directions.
pub struct TlsLeg<S> {
    stream: S,
    /// The summary, on the upstream leg (for error reasons).
    upstream: Option<TlsSummary>,
}

impl<S> TlsLeg<S> {
    /// A leg over `stream`; `upstream` carries the summary when this is the upstream leg.
    pub fn new(stream: S, upstream: Option<TlsSummary>) -> Self {
        Self { stream, upstream }
    }
}

impl<S: AsyncRead + AsyncWrite + TcpBacked + Unpin + Send> Leg for TlsLeg<S> {
    type Reader<'a>
        = TlsReader<'a, S>
    where
        S: 'a;
    type Writer<'a>
        = StreamWriter<WriteHalf<&'a mut S>>
    where
        S: 'a;

    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        let (r, w) = tokio::io::split(&mut self.stream);
        let reader = TlsReader {
            io: r,
            buf: BytesMut::new(),
            size: TLS_READ,
            upstream: self.upstream.as_ref(),
        };
        (reader, StreamWriter::new(w))
    }

    fn reset(&self) {
        reset_tcp(self.stream.tcp());
    }
}

/// The decrypted reading side of a TLS stream, one packet per read. A peer that closes TCP
/// without `close_notify` (`UnexpectedEof`) counts as a FIN.
pub struct TlsReader<'a, S> {
    io: ReadHalf<&'a mut S>,
    buf: BytesMut,
    size: usize,
    upstream: Option<&'a TlsSummary>,
}

impl<S: AsyncRead + Unpin + Send> PacketReader for TlsReader<'_, S> {
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
            Err(e) => match (self.upstream, tls::rustls_error(&e)) {
                (Some(summary), Some(_)) => Err(io::Error::new(
                    e.kind(),
                    tls::upstream_stream_error_reason(&e, summary),
                )),
                _ => Err(e),
            },
        }
    }
}
