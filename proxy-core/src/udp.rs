//! UDP ASSOCIATE: a UDP relay socket bound on the IP the client reached the proxy at.
//!
//! Datagrams from the client (only from its IP; its port is taken from the request, or from
//! its first datagram when the request left it zero) carry a SOCKS header naming the target;
//! the payload is sent there from one upstream socket (dual-stack, created on first use). Replies come back wrapped in a header naming their source. Every payload is
//! a packet of the association's own connection record (transport UDP). Fragmented
//! datagrams (FRAG != 0) are dropped, as RFC 1928 allows. The association ends when the TCP
//! control connection closes (closed by the client) or on shutdown.
//!
//! Unlike TCP connections an association holds two 64 KiB receive buffers for its lifetime
//! (associations are few); payloads are copied out of them into the history.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use bytes::Bytes;
use proto::common::{CloseKind, ClosedBy, Direction};
use tokio::{
    io::AsyncReadExt,
    net::{TcpStream, UdpSocket},
};

use crate::{
    conn::{ConnEnd, ConnState},
    dns::Dns,
    handshake,
    report::Reporter,
    shutdown::Shutdown,
    state::ProxyState,
};
use protocols::socks5::{self, Addr, Reply, UdpHeader};

const DATAGRAM: usize = 65_536;

async fn recv_opt(
    sock: &Option<(UdpSocket, bool)>,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr)> {
    match sock {
        Some((s, _)) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// One upstream socket for every target: dual-stack `[::]:0` when IPv6 is available (the
/// flag says so: IPv4 targets are then addressed as IPv4-mapped), else `0.0.0.0:0`.
async fn bind_upstream() -> Option<(UdpSocket, bool)> {
    if let Ok(s) = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).await {
        return Some((s, true));
    }
    match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await {
        Ok(s) => Some((s, false)),
        Err(e) => {
            tracing::warn!("binding an upstream UDP socket: {e}");
            None
        }
    }
}

fn to_v6(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
        v6 => v6,
    }
}

/// Maps IPv4-mapped IPv6 addresses to plain IPv4, so addresses compare alike.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Runs one association on `control` until it ends; returns how.
pub async fn associate(
    shared: &ProxyState,
    mut control: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    requested: &Addr,
    state: &ConnState,
    shutdown: &mut Shutdown,
) -> ConnEnd {
    let relay = match UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await {
        Ok(s) => s,
        Err(e) => {
            let _ = handshake::reply(&mut control, Reply::GeneralFailure, None).await;
            return ConnEnd::proxy(
                CloseKind::Error,
                format!("binding the UDP relay socket: {e}"),
            );
        }
    };
    let bound = relay.local_addr().ok();
    if let Err(e) = handshake::reply(&mut control, Reply::Succeeded, bound).await {
        return ConnEnd::new(
            ClosedBy::Client,
            CloseKind::Error,
            format!("writing the SOCKS reply: {e}"),
        );
    }
    let mut out = Outbound {
        client: match requested {
            Addr::Ip(a) if !a.ip().is_unspecified() && a.port() != 0 => Some(*a),
            _ => None,
        },
        upstream: None,
        resolved: None,
    };
    let mut cbuf = vec![0u8; DATAGRAM];
    let mut ubuf = vec![0u8; DATAGRAM];
    let mut ctl = [0u8; 64];
    let reporter = &shared.reporter;
    loop {
        tokio::select! {
            r = control.read(&mut ctl) => match r {
                Ok(0) => return ConnEnd::new(ClosedBy::Client, CloseKind::Fin, "client closed the UDP control connection (FIN)"),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return ConnEnd::new(ClosedBy::Client, CloseKind::Rst, "client reset the UDP control connection (RST)");
                }
                Err(e) => return ConnEnd::new(ClosedBy::Client, CloseKind::Error, format!("reading the UDP control connection: {e}")),
            },
            r = relay.recv_from(&mut cbuf) => {
                match r {
                    Ok((n, from)) => out.send(&cbuf[..n], from, peer, state, reporter, &shared.dns).await,
                    Err(e) => tracing::debug!("UDP relay receive: {e}"),
                }
            }
            r = recv_opt(&out.upstream, &mut ubuf) => forward_back(&relay, &ubuf, r, out.client, state, shared).await,
            () = shutdown.recv() => return ConnEnd::proxy(CloseKind::Fin, "proxy shut down"),
        }
    }
}

/// Where client datagrams go: the client's address once known, the upstream socket (bound
/// on first use) and the last name resolved.
struct Outbound {
    client: Option<SocketAddr>,
    upstream: Option<(UdpSocket, bool)>,
    resolved: Option<(String, u16, SocketAddr)>,
}

impl Outbound {
    /// A datagram from `from`: only the client's (IP `peer`, and its port once known) are
    /// taken; the SOCKS header names the target, the payload is recorded and sent there.
    async fn send(
        &mut self,
        datagram: &[u8],
        from: SocketAddr,
        peer: SocketAddr,
        state: &ConnState,
        reporter: &Reporter,
        dns: &Dns,
    ) {
        if from.ip() != peer.ip() || self.client.is_some_and(|c| c != from) {
            return;
        }
        self.client = Some(from);
        let Ok((hdr, off)) = socks5::parse_udp(datagram) else {
            return;
        };
        if hdr.frag != 0 {
            return;
        }
        let target = match &hdr.addr {
            Addr::Ip(a) => *a,
            Addr::Domain(h, p) => match &self.resolved {
                Some((rh, rp, a)) if rh == h && rp == p => *a,
                _ => match dns
                    .lookup(peer.ip(), h, *p)
                    .await
                    .ok()
                    .and_then(|v| v.first().copied())
                {
                    Some(a) => {
                        self.resolved = Some((h.clone(), *p, a));
                        a
                    }
                    None => return,
                },
            },
        };
        if self.upstream.is_none() {
            self.upstream = bind_upstream().await;
        }
        let payload = &datagram[off..];
        let ts = proto::time::now();
        let seq = state.record(Direction::C2s, payload.len());
        if reporter.history() {
            reporter.packet(
                state.id,
                seq,
                Direction::C2s,
                ts,
                Bytes::copy_from_slice(payload),
            );
        }
        if let Some((s, v6)) = self.upstream.as_ref() {
            let to = if *v6 {
                SocketAddr::new(to_v6(target.ip()), target.port())
            } else {
                target
            };
            if let Err(e) = s.send_to(payload, to).await {
                tracing::debug!(%target, "UDP send: {e}");
            }
        }
    }
}

async fn forward_back(
    relay: &UdpSocket,
    buf: &[u8],
    r: io::Result<(usize, SocketAddr)>,
    client: Option<SocketAddr>,
    state: &ConnState,
    shared: &ProxyState,
) {
    let (Ok((n, from)), Some(client)) = (r, client) else {
        return;
    };
    let payload = &buf[..n];
    let ts = proto::time::now();
    let seq = state.record(Direction::S2c, n);
    if shared.reporter.history() {
        shared.reporter.packet(
            state.id,
            seq,
            Direction::S2c,
            ts,
            Bytes::copy_from_slice(payload),
        );
    }
    let mut out = Vec::with_capacity(n + 22);
    socks5::encode_udp_header(
        &UdpHeader {
            frag: 0,
            addr: Addr::Ip(canonical(from)),
        },
        &mut out,
    );
    out.extend_from_slice(payload);
    if let Err(e) = relay.send_to(&out, client).await {
        tracing::debug!(%client, "UDP send to client: {e}");
    }
}
