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

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use proto::common::{CloseKind, ClosedBy, ConnStatus, Connection, Transport};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc},
};

use crate::{
    conn::{ConnState, End},
    handshake::{self, Accepted},
    hold::ConnHold,
    relay::{self, Tap},
    shared::Shared,
    shutdown::Shutdown,
    socks5::{Addr, Command, Reply},
    tls, udp,
};

/// Most clients beyond the connection limit being refused at once (each holds a socket for
/// at most [`HANDSHAKE_TIMEOUT`]); further ones are closed at once without a reply.
pub const MAX_REFUSING: usize = 1024;
/// Longest a client may take to complete the SOCKS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the upstream connect may take (all addresses of a name together).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The accept loop.
pub struct Listener {
    /// The bound SOCKS listener.
    pub listener: TcpListener,
    /// Shared handler state.
    pub shared: Arc<Shared>,
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
                            "connection limit reached: refusing new SOCKS clients (--max-connections)"
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
        let mut backoff = Duration::from_millis(5);
        loop {
            match self.listener.accept().await {
                Ok(x) => return x,
                Err(e) => {
                    tracing::warn!(
                        "accepting a SOCKS connection failed: {e}; retrying in {backoff:?}"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// Serves one client connection.
pub struct Handler {
    shared: Arc<Shared>,
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
                let _ = handshake::reply(&mut stream, Reply::GeneralFailure, None).await;
                return;
            }
        };
        let state = Arc::new(ConnState::new(id));
        let mut conn = self.record(id, peer, &request.addr, transport, opened_at);
        conn.replay_of = self.shared.replays.claim(peer, id);
        self.shared.reporter.opened(conn, state.clone());
        self.shared.resolver.request(id, peer, local);
        let end = if let Some(limit) = self.over_limit {
            tracing::info!(%peer, target = %request.addr, "refused: connection limit {limit} reached");
            let _ = handshake::reply(&mut stream, Reply::GeneralFailure, None).await;
            End::proxy(
                CloseKind::Error,
                format!("refused: connection limit {limit} reached (--max-connections)"),
            )
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
            self.connect(stream, peer, local, &request.addr, leftover, &state)
                .await
        };
        tracing::debug!(id, %peer, target = %request.addr, reason = %end.reason, "connection ended");
        self.shared.reporter.closed(&state, &end);
    }

    /// The SOCKS handshake, bounded by [`HANDSHAKE_TIMEOUT`] and by shutdown; a failure is
    /// logged. Its own function so that its state is not kept for the connection's life.
    async fn handshake(&mut self, stream: &mut TcpStream, peer: SocketAddr) -> Option<Accepted> {
        let accepted = tokio::select! {
            r = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                handshake::accept(stream, self.shared.auth.as_ref()),
            ) => r,
            () = self.shutdown.recv() => return None,
        };
        match accepted {
            Ok(Ok(a)) => Some(a),
            Ok(Err(e)) => {
                tracing::info!(%peer, "SOCKS handshake failed: {e}");
                None
            }
            Err(_) => {
                tracing::info!(%peer, "SOCKS handshake timed out after {HANDSHAKE_TIMEOUT:?}");
                None
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

    /// CONNECT: resolve, refuse our own ports, connect, reply, relay.
    async fn connect(
        &mut self,
        mut stream: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        target: &Addr,
        leftover: bytes::Bytes,
        state: &ConnState,
    ) -> End {
        let established = tokio::select! {
            r = establish(&self.shared, peer.ip(), local, target) => r,
            () = self.shutdown.recv() => Err((Reply::GeneralFailure, End::proxy(CloseKind::Fin, "proxy shut down"))),
        };
        let upstream = match established {
            Ok(u) => u,
            Err((code, end)) => {
                let _ = handshake::reply(&mut stream, code, None).await;
                return end;
            }
        };
        if let (Addr::Domain(..), Ok(a)) = (target, upstream.peer_addr()) {
            self.shared
                .reporter
                .updated(proto::registry::ConnectionUpdate {
                    id: state.id,
                    dst_ip: a.ip().to_string(),
                    ..Default::default()
                });
        }
        let _ = upstream.set_nodelay(true);
        if let Err(e) =
            handshake::reply(&mut stream, Reply::Succeeded, upstream.local_addr().ok()).await
        {
            return End::new(
                ClosedBy::Client,
                CloseKind::Error,
                format!("writing the SOCKS reply: {e}"),
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
            let peer = upstream.peer_addr();
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

/// Resolves (for `client`) and connects, or says which reply and record end the failure
/// deserves.
async fn establish(
    shared: &Shared,
    client: IpAddr,
    local: SocketAddr,
    target: &Addr,
) -> Result<TcpStream, (Reply, End)> {
    let refuse = &shared.refuse;
    let addrs: Vec<SocketAddr> = match target {
        Addr::Ip(a) => vec![*a],
        Addr::Domain(host, port) => match shared.dns.lookup(client, host, *port).await {
            Ok(v) => v,
            Err(e) => {
                return Err((
                    Reply::HostUnreachable,
                    End::proxy(CloseKind::Error, format!("resolve {host}: {e}")),
                ));
            }
        },
    };
    if let Some(a) = addrs
        .iter()
        .find(|a| refuse.iter().any(|own| reaches(**a, *own, local)))
    {
        return Err((
            Reply::NotAllowed,
            End::proxy(
                CloseKind::Error,
                format!(
                    "refused: {a} is the proxy's own SOCKS or management port, or denied \
                     (--deny)"
                ),
            ),
        ));
    }
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let mut last: Option<(SocketAddr, std::io::Error)> = None;
    for a in &addrs {
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
    let (a, e) =
        last.unwrap_or_else(|| (addrs[0], std::io::Error::other("no address to connect to")));
    Err((
        Reply::for_connect_error(&e),
        End::proxy(CloseKind::Error, format!("connect to {a}: {e}")),
    ))
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
