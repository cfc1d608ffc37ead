//! The SOCKS listener and the per-connection handler (the shape of mini-redis `server.rs`).
//!
//! [`Listener`] accepts with backoff on errors (e.g. out of file descriptors: the proxy keeps
//! serving), bounds concurrent connections with a semaphore, and spawns one [`Handler`] per
//! connection. Graceful shutdown: dropping the listener drops the broadcast sender every
//! handler subscribed to, each handler records its connection as closed by the proxy and
//! drops its clone of an mpsc sender; the receiver completing tells the caller all are done.
//!
//! A client beyond the connection limit is not left waiting in the backlog: it is accepted,
//! taken through the handshake, answered 0x01 (general failure) and recorded as closed by
//! the proxy with a reason naming the limit, so both the client and `conns list` say why.
//! SOCKS5 has no "busy" answer at the greeting (0xFF there reads as an authentication
//! problem), and answering the request lets the record name the target.
//!
//! The same listener and handler serve both ingresses ([`Ingress`]): the SOCKS port and the
//! HTTP CONNECT port (`--http`). Only the first exchange differs ([`handshake`] or
//! [`http_ingress`]) and how the answer is written ([`Handler::answer`]); records, the
//! relay, TLS interception and the hold point are one code path. The route to the target
//! (direct or through an upstream proxy, [`crate::chain`]) is chosen from the target before
//! the record is made, so the record names it from the start.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use platform::retry::Backoff;
use proto::common::{CloseKind, ClosedBy, ConnStatus, Connection, Transport};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc},
};

use crate::{
    chain::{self, Scheme, Upstream},
    conn::{ConnEnd, ConnState},
    handshake::{self, Accepted, HandshakeError},
    hold::ConnHold,
    http_ingress,
    relay::{self, Tap},
    shutdown::Shutdown,
    state::ProxyState,
    tls, udp,
};
use protocols::{
    http_connect,
    socks5::{Addr, Command, Reply},
};

/// Most clients beyond the connection limit being refused at once (each holds a socket for
/// at most [`HANDSHAKE_TIMEOUT`]); further ones are closed at once without a reply.
pub const MAX_REFUSING: usize = 1024;
/// Longest a client may take to complete the SOCKS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the upstream connect may take (all addresses of a name together).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How an accept that failed (out of file descriptors, say) is retried.
const ACCEPT_RETRY: Backoff = Backoff::new(Duration::from_millis(5), Duration::from_secs(1));

/// Which listener a client came in on; the record's `ingress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingress {
    /// The SOCKS5 port.
    Socks5,
    /// The HTTP CONNECT port (`--http`).
    Http,
}

impl Ingress {
    /// The record's value: `socks5` or `http`.
    pub fn as_str(self) -> &'static str {
        match self {
            Ingress::Socks5 => "socks5",
            Ingress::Http => "http",
        }
    }

    /// The protocol's name in log lines: `SOCKS` or `HTTP CONNECT`.
    pub fn label(self) -> &'static str {
        match self {
            Ingress::Socks5 => "SOCKS",
            Ingress::Http => "HTTP CONNECT",
        }
    }
}

/// The accept loop.
pub struct Listener {
    /// The bound listener.
    pub listener: TcpListener,
    /// What its clients speak.
    pub ingress: Ingress,
    /// Shared handler state.
    pub shared: Arc<ProxyState>,
    /// The connection limit (`--max-connections`), for the refusal's reason.
    pub max_connections: usize,
    /// Connection limit: one permit per connection served.
    pub limit: Arc<Semaphore>,
    /// Clients beyond the limit being refused: one permit each.
    pub refusing: Arc<Semaphore>,
    /// Dropped to tell handlers to shut down.
    pub notify_shutdown: broadcast::Sender<()>,
    /// Cloned into every handler; the receiver completes once all are gone.
    pub shutdown_complete_tx: mpsc::Sender<()>,
}

impl Listener {
    /// Accepts connections until the task running it is stopped.
    pub async fn run(&mut self) {
        let mut full = false;
        loop {
            let (socket, peer) = self.accept().await;
            let (permit, over_limit) = match self.limit.clone().try_acquire_owned() {
                Ok(p) => {
                    full = false;
                    (p, None)
                }
                Err(_) => {
                    if !full {
                        tracing::warn!(
                            limit = self.max_connections,
                            ingress = self.ingress.as_str(),
                            "connection limit reached: refusing new clients (--max-connections)"
                        );
                        full = true;
                    }
                    let Ok(p) = self.refusing.clone().try_acquire_owned() else {
                        tracing::info!(%peer, "closed without a reply: too many clients beyond the connection limit");
                        continue;
                    };
                    (p, Some(self.max_connections))
                }
            };
            let handler = Handler {
                shared: self.shared.clone(),
                ingress: self.ingress,
                shutdown: Shutdown::new(self.notify_shutdown.subscribe()),
                over_limit,
                _done: self.shutdown_complete_tx.clone(),
                _permit: permit,
            };
            // The handler's own future, not a wrapper around it: a wrapper would keep a
            // second copy of the socket and the handler in every connection's task.
            tokio::spawn(handler.run(socket, peer));
        }
    }

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        let mut retry = ACCEPT_RETRY.start(1);
        loop {
            match self.listener.accept().await {
                Ok(x) => return x,
                Err(e) => {
                    // One listener: every failure waits.
                    let wait = retry.failed().unwrap_or(ACCEPT_RETRY.min);
                    tracing::warn!(
                        "accepting a {} connection failed: {e}; retrying in {wait:?}",
                        self.ingress.label()
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// Serves one client connection.
pub struct Handler {
    shared: Arc<ProxyState>,
    ingress: Ingress,
    shutdown: Shutdown,
    /// The connection limit this client is beyond (it is refused), if it is.
    over_limit: Option<usize>,
    _done: mpsc::Sender<()>,
    /// This connection's place under the limit (or among the refusals beyond it), given
    /// back when the handler is dropped.
    _permit: OwnedSemaphorePermit,
}

impl Handler {
    async fn run(mut self, mut stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let local = match stream.local_addr() {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(%peer, "socket vanished before the handshake: {e}");
                return;
            }
        };
        let Some(Accepted { request, leftover }) = self.handshake(&mut stream, peer).await else {
            return;
        };
        let opened_at = proto::time::now();
        let transport = match request.command {
            Command::Connect => Transport::Tcp,
            Command::UdpAssociate => Transport::Udp,
            other => {
                tracing::info!(%peer, "unsupported SOCKS command {other:?}");
                let _ = handshake::reply(&mut stream, Reply::CommandNotSupported, None).await;
                return;
            }
        };
        let id = match self.shared.ids.next().await {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(%peer, target = %request.addr, "refusing the connection: {e}");
                let why = format!("no connection ID available: {e}");
                let _ = self
                    .answer(&mut stream, Reply::GeneralFailure, None, &why)
                    .await;
                return;
            }
        };
        let state = Arc::new(ConnState::new(id));
        // UDP associations are relayed directly (upstream proxies carry TCP streams).
        let via = match transport {
            Transport::Tcp => self.shared.routes.route(&request.addr).cloned(),
            _ => None,
        };
        let mut conn = self.record(id, peer, &request.addr, transport, opened_at);
        conn.ingress = self.ingress.as_str().to_string();
        conn.upstream = via.as_ref().map(|u| u.to_string()).unwrap_or_default();
        conn.replay_of = self.shared.replays.claim(peer, id);
        self.shared.reporter.opened(conn, state.clone());
        self.shared.resolver.request(id, peer, local);
        let end = if let Some(limit) = self.over_limit {
            tracing::info!(%peer, target = %request.addr, "refused: connection limit {limit} reached");
            let why = format!("refused: connection limit {limit} reached (--max-connections)");
            let _ = self
                .answer(&mut stream, Reply::GeneralFailure, None, &why)
                .await;
            ConnEnd::proxy(CloseKind::Error, why)
        } else if transport == Transport::Udp {
            udp::associate(
                &self.shared,
                stream,
                peer,
                local,
                &request.addr,
                &state,
                &mut self.shutdown,
            )
            .await
        } else {
            self.connect(
                stream,
                peer,
                local,
                &request.addr,
                via.as_deref(),
                leftover,
                &state,
            )
            .await
        };
        tracing::debug!(id, %peer, target = %request.addr, reason = %end.reason, "connection ended");
        self.shared.reporter.closed(&state, &end);
    }

    /// The SOCKS handshake, bounded by [`HANDSHAKE_TIMEOUT`] and by shutdown; a failure is
    /// logged. Its own function so that its state is not kept for the connection's life.
    async fn handshake(&mut self, stream: &mut TcpStream, peer: SocketAddr) -> Option<Accepted> {
        let auth = self.shared.auth.as_ref();
        let accepted = tokio::select! {
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                match self.ingress {
                    Ingress::Socks5 => handshake::accept(stream, auth).await.map_err(Failed::Socks),
                    Ingress::Http => http_ingress::accept(stream, auth).await.map_err(Failed::Http),
                }
            }) => r,
            () = self.shutdown.recv() => return None,
        };
        let name = self.ingress.label();
        match accepted {
            Ok(Ok(a)) => Some(a),
            Ok(Err(Failed::Socks(HandshakeError::HttpOnSocksPort))) => {
                self.wrong_port(stream, peer).await;
                None
            }
            Ok(Err(e)) => {
                tracing::info!(%peer, "{name} handshake failed: {e}");
                None
            }
            Err(_) => {
                tracing::info!(%peer, "{name} handshake timed out after {HANDSHAKE_TIMEOUT:?}");
                None
            }
        }
    }

    /// Answers an HTTP request that came to the SOCKS port with one line naming the HTTP
    /// CONNECT port (or how to open one), and warns once per client address.
    async fn wrong_port(&self, stream: &mut TcpStream, peer: SocketAddr) {
        let why = match self.shared.http {
            Some(http) => format!(
                "this is Interpose's SOCKS5 port; HTTP proxy clients use its HTTP CONNECT port {http}"
            ),
            None => "this is Interpose's SOCKS5 port; for HTTP proxy clients start it with \
                     --http 127.0.0.1:8080 and use that port"
                .to_string(),
        };
        if self.shared.first_http_on_socks(peer.ip()) {
            tracing::warn!(%peer, "HTTP request on the SOCKS port, answered: {why}");
        } else {
            tracing::debug!(%peer, "HTTP request on the SOCKS port");
        }
        let _ = http_ingress::answer(stream, 400, &why).await;
    }

    /// Answers the client's request: a SOCKS reply, or for an HTTP CONNECT client the
    /// matching status (`why` is the body of an error).
    async fn answer(
        &self,
        stream: &mut TcpStream,
        reply: Reply,
        bound: Option<SocketAddr>,
        why: &str,
    ) -> std::io::Result<()> {
        match self.ingress {
            Ingress::Socks5 => handshake::reply(stream, reply, bound).await,
            Ingress::Http => {
                http_ingress::answer(stream, http_connect::status_for_reply(reply), why).await
            }
        }
    }

    /// The new connection's record: who connected, where to, when.
    fn record(
        &self,
        id: u64,
        peer: SocketAddr,
        target: &Addr,
        transport: Transport,
        opened_at: prost_types::Timestamp,
    ) -> Connection {
        let tcp = transport == Transport::Tcp;
        let (dst_ip, dst_port) = match target {
            Addr::Ip(a) if tcp => (a.ip().to_string(), u32::from(a.port())),
            Addr::Domain(_, p) if tcp => (String::new(), u32::from(*p)),
            _ => (String::new(), 0),
        };
        Connection {
            id,
            node: self.shared.node.clone(),
            src_ip: peer.ip().to_string(),
            src_port: u32::from(peer.port()),
            dst_host: if tcp { target.host() } else { String::new() },
            dst_ip,
            dst_port,
            status: ConnStatus::Active as i32,
            opened_at: Some(opened_at),
            transport: transport as i32,
            ..Default::default()
        }
    }

    /// CONNECT: resolve, refuse our own ports, connect (directly or through `via`), reply,
    /// relay.
    #[allow(clippy::too_many_arguments)]
    async fn connect(
        &mut self,
        mut stream: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        target: &Addr,
        via: Option<&Upstream>,
        leftover: bytes::Bytes,
        state: &ConnState,
    ) -> ConnEnd {
        let established = tokio::select! {
            r = establish(&self.shared, peer.ip(), local, target, via) => r,
            () = self.shutdown.recv() => Err((Reply::GeneralFailure, ConnEnd::proxy(CloseKind::Fin, "proxy shut down"))),
        };
        let (upstream, reached) = match established {
            Ok(u) => u,
            Err((code, end)) => {
                let _ = self.answer(&mut stream, code, None, &end.reason).await;
                return end;
            }
        };
        if let (Addr::Domain(..), Some(a)) = (target, reached) {
            self.shared
                .reporter
                .updated(proto::registry::ConnectionUpdate {
                    id: state.id,
                    dst_ip: a.ip().to_string(),
                    ..Default::default()
                });
        }
        let _ = upstream.set_nodelay(true);
        if let Err(e) = self
            .answer(
                &mut stream,
                Reply::Succeeded,
                upstream.local_addr().ok(),
                "",
            )
            .await
        {
            return ConnEnd::new(
                ClosedBy::Client,
                CloseKind::Error,
                format!("writing the {} reply: {e}", self.ingress.label()),
            );
        }
        let mut tap = Tap::new(state, &self.shared.reporter);
        if let Some(holder) = &self.shared.holder {
            let (host, port) = match target {
                Addr::Domain(h, p) => (h.clone(), *p),
                Addr::Ip(a) => (a.ip().to_string(), a.port()),
            };
            tap.hold = Some(Arc::new(ConnHold::new(holder.clone(), &host, port)));
        }
        if let Some(splicer) = self.shared.splicer.clone() {
            // The target's address: through an upstream that resolved the name, unknown.
            let peer = reached.ok_or(());
            let target = tls::Target {
                host: match target {
                    Addr::Domain(h, _) => Some(h.clone()),
                    Addr::Ip(_) => None,
                },
                ip: match (&peer, target) {
                    (Ok(a), _) | (Err(_), Addr::Ip(a)) => a.ip(),
                    (Err(_), Addr::Domain(..)) => IpAddr::from([0, 0, 0, 0]),
                },
                port: match target {
                    Addr::Ip(a) => a.port(),
                    Addr::Domain(_, p) => *p,
                },
            };
            return tls::splice::splice(
                stream,
                leftover,
                upstream,
                target,
                &splicer,
                &tap,
                &mut self.shutdown,
            )
            .await;
        }
        let (mut client, mut upstream) = (stream, upstream);
        relay::relay(
            &mut client,
            &mut upstream,
            leftover,
            &tap,
            self.shutdown.recv(),
        )
        .await
    }
}

/// Whether connecting to `target` would reach the listener `own` (accepted on `local`).
pub fn reaches(target: SocketAddr, own: SocketAddr, local: SocketAddr) -> bool {
    if target.port() != own.port() {
        return false;
    }
    let (t, o) = (target.ip().to_canonical(), own.ip().to_canonical());
    t == o
        || t.is_unspecified()
        || (o.is_unspecified() && (t.is_loopback() || t == local.ip().to_canonical()))
}

/// Why a handshake failed, for either ingress.
enum Failed {
    Socks(HandshakeError),
    Http(http_ingress::IngressError),
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failed::Socks(e) => e.fmt(f),
            Failed::Http(e) => e.fmt(f),
        }
    }
}

/// Connects to `target`, directly or through `via`; returns the stream (to the target, or
/// the tunnel through the upstream) and the target's address when it is known. A failure
/// says which reply and record end it deserves.
async fn establish(
    shared: &ProxyState,
    client: IpAddr,
    local: SocketAddr,
    target: &Addr,
    via: Option<&Upstream>,
) -> Result<(TcpStream, Option<SocketAddr>), (Reply, ConnEnd)> {
    let Some(up) = via else {
        let s = direct(shared, client, local, target).await?;
        let reached = s.peer_addr().ok();
        return Ok((s, reached));
    };
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    // What the upstream is asked for: with socks5:// names are resolved here, like a direct
    // connection's; with socks5h:// and http:// the upstream resolves them.
    let ask = match (up.scheme, target) {
        (Scheme::Socks5, Addr::Domain(..)) => {
            let addrs = resolve(shared, client, target).await?;
            refuse_own(shared, local, &addrs)?;
            Addr::Ip(addrs[0])
        }
        (_, Addr::Ip(a)) => {
            refuse_own(shared, local, &[*a])?;
            target.clone()
        }
        (_, Addr::Domain(..)) => target.clone(),
    };
    let unreachable = |what: String| {
        (
            Reply::GeneralFailure,
            ConnEnd::proxy(
                CloseKind::Error,
                format!("upstream {up} unreachable: {what}"),
            ),
        )
    };
    let up_addrs = match chain::literal_addr(up) {
        Some(a) => vec![a],
        None => shared
            .dns
            .lookup(client, &up.host, up.port)
            .await
            .map_err(|e| unreachable(format!("resolve {}: {e}", up.host)))?,
    };
    // An upstream that is this proxy itself would loop.
    refuse_own(shared, local, &up_addrs)?;
    let mut s = connect_any(&up_addrs, deadline)
        .await
        .map_err(|(a, e)| unreachable(format!("connect to {a}: {e}")))?;
    let _ = s.set_nodelay(true);
    match tokio::time::timeout_at(deadline, chain::dial::open(&mut s, up, &ask)).await {
        Ok(Ok(())) => Ok((
            s,
            match ask {
                Addr::Ip(a) => Some(a),
                Addr::Domain(..) => None,
            },
        )),
        Ok(Err(refusal)) => Err((
            refusal.reply,
            ConnEnd::proxy(CloseKind::Error, refusal.reason),
        )),
        Err(_) => Err((
            Reply::HostUnreachable,
            ConnEnd::proxy(
                CloseKind::Error,
                format!("upstream {up} did not answer within {CONNECT_TIMEOUT:?}"),
            ),
        )),
    }
}

/// Resolves `target` for `client`.
async fn resolve(
    shared: &ProxyState,
    client: IpAddr,
    target: &Addr,
) -> Result<Vec<SocketAddr>, (Reply, ConnEnd)> {
    match target {
        Addr::Ip(a) => Ok(vec![*a]),
        Addr::Domain(host, port) => match shared.dns.lookup(client, host, *port).await {
            Ok(v) if !v.is_empty() => Ok(v),
            Ok(_) => Err((
                Reply::HostUnreachable,
                ConnEnd::proxy(CloseKind::Error, format!("resolve {host}: no address")),
            )),
            Err(e) => Err((
                Reply::HostUnreachable,
                ConnEnd::proxy(CloseKind::Error, format!("resolve {host}: {e}")),
            )),
        },
    }
}

/// Refuses addresses that reach the proxy's own ports or what `--deny` names.
fn refuse_own(
    shared: &ProxyState,
    local: SocketAddr,
    addrs: &[SocketAddr],
) -> Result<(), (Reply, ConnEnd)> {
    match addrs
        .iter()
        .find(|a| shared.refuse.iter().any(|own| reaches(**a, *own, local)))
    {
        None => Ok(()),
        Some(a) => Err((
            Reply::NotAllowed,
            ConnEnd::proxy(
                CloseKind::Error,
                format!(
                    "refused: {a} is the proxy's own SOCKS or management port, or denied \
                     (--deny)"
                ),
            ),
        )),
    }
}

/// Connects to the first of `addrs` that answers before `deadline`; else the last failure.
async fn connect_any(
    addrs: &[SocketAddr],
    deadline: tokio::time::Instant,
) -> Result<TcpStream, (SocketAddr, std::io::Error)> {
    let mut last: Option<(SocketAddr, std::io::Error)> = None;
    for a in addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(a)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = Some((*a, e)),
            Err(_) => {
                last = Some((
                    *a,
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("timed out after {CONNECT_TIMEOUT:?}"),
                    ),
                ));
                break;
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        (
            SocketAddr::from(([0, 0, 0, 0], 0)),
            std::io::Error::other("no address to connect to"),
        )
    }))
}

/// Resolves (for `client`) and connects directly, or says which reply and record end the
/// failure deserves.
async fn direct(
    shared: &ProxyState,
    client: IpAddr,
    local: SocketAddr,
    target: &Addr,
) -> Result<TcpStream, (Reply, ConnEnd)> {
    let addrs = resolve(shared, client, target).await?;
    refuse_own(shared, local, &addrs)?;
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    connect_any(&addrs, deadline).await.map_err(|(a, e)| {
        (
            Reply::for_connect_error(&e),
            ConnEnd::proxy(CloseKind::Error, format!("connect to {a}: {e}")),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_ports_are_recognised() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let local = a("127.0.0.1:1080");
        assert!(reaches(a("127.0.0.1:1080"), a("127.0.0.1:1080"), local));
        assert!(reaches(a("0.0.0.0:1080"), a("127.0.0.1:1080"), local));
        assert!(reaches(
            a("[::ffff:127.0.0.1]:1080"),
            a("127.0.0.1:1080"),
            local
        ));
        assert!(!reaches(a("127.0.0.1:1081"), a("127.0.0.1:1080"), local));
        assert!(!reaches(a("127.0.0.2:1080"), a("127.0.0.1:1080"), local));
        assert!(reaches(a("127.0.0.2:1080"), a("0.0.0.0:1080"), local));
        assert!(reaches(
            a("10.1.2.3:1080"),
            a("0.0.0.0:1080"),
            a("10.1.2.3:1080")
        ));
        assert!(!reaches(a("10.9.9.9:1080"), a("0.0.0.0:1080"), local));
    }
}
