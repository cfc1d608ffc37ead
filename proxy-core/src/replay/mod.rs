//! Replay: a recorded connection's client-to-server packets sent again on a new connection,
//! recorded as a replay of the original (`Connection.replay_of`).
//!
//! A replay connects through the proxy's own SOCKS port, so the new connection takes the
//! path every connection takes: a record, the TLS splice (which finds the replay's
//! ClientHello at the same point of the stream as the original's, and presents any client
//! certificate configured for the host upstream), the hold point (intercept rules apply),
//! the history. The proxy recognises its replays by their local address, announced in
//! [`Pending`] just before they connect.
//!
//! - [`edit`]: the request's edits to the client packets (sans I/O).
//! - [`compare`]: the comparison with the original's server side (sans I/O).
//! - [`source`]: the original's record and history, from the registry.
//! - [`run`]: one run over the network; [`service`]: the gRPC service.

pub mod compare;
pub mod edit;
pub mod run;
pub mod service;
pub mod source;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use proto::{
    common::{Connection, Direction, Transport},
    replay::{Pace, ReplayEvent, ReplayRequest, ReplaySummary},
};
use rustls::pki_types::ServerName;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::tls::Splicer;
use protocols::socks5::Addr;

/// Default quiet time (`PACE_WAIT`, and at the end of a run).
pub const DEFAULT_SETTLE: Duration = Duration::from_millis(200);
/// Longest quiet time a request may ask for.
pub const MAX_SETTLE: Duration = Duration::from_secs(60);
/// Most runs in one request.
pub const MAX_TIMES: u32 = 100_000;
/// Most runs at once in one request.
pub const MAX_CONCURRENCY: u32 = 1_000;
/// Events buffered towards a slow caller before the runs wait for it.
const EVENTS_BOUND: usize = 256;

/// Announced replays by local address: the original's ID, and where the new record's ID goes.
type Announced = HashMap<SocketAddr, (u64, oneshot::Sender<u64>)>;

/// The proxy's replays on their way in: local address -> (original ID, where to tell the
/// new record's ID). The SOCKS handler claims an entry when it opens the record.
#[derive(Clone, Default)]
pub struct Pending {
    map: Arc<Mutex<Announced>>,
    /// Entries in `map`: the handler of an ordinary connection takes no lock while it is 0.
    len: Arc<AtomicUsize>,
}

impl Pending {
    /// Announces a replay of `original` connecting from `local`; the receiver gets the
    /// record's ID once the proxy opened it.
    pub fn announce(&self, local: SocketAddr, original: u64) -> oneshot::Receiver<u64> {
        let (tx, rx) = oneshot::channel();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.insert(local, (original, tx)).is_none() {
            self.len.fetch_add(1, Ordering::AcqRel);
        }
        rx
    }

    /// Forgets the announcement for `local` (claimed or not).
    pub fn withdraw(&self, local: SocketAddr) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.remove(&local).is_some() {
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Called by the SOCKS handler for a new record `id` of a client at `peer`: the ID of
    /// the connection it replays, or 0 when it is not a replay.
    pub fn claim(&self, peer: SocketAddr, id: u64) -> u64 {
        if self.len.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.remove(&peer) {
            Some((original, tx)) => {
                self.len.fetch_sub(1, Ordering::AcqRel);
                let _ = tx.send(id);
                original
            }
            None => 0,
        }
    }
}

/// What a proxy needs to make replays; one per [`crate::Proxy`].
pub struct Replayer {
    /// This proxy's node name.
    pub node: String,
    /// The SOCKS address replays connect to.
    pub socks: SocketAddr,
    /// The SOCKS credentials, when the proxy requires them.
    pub auth: Option<(String, String)>,
    /// The registry, for the original's record and history.
    pub registry: Arc<dyn source::Originals>,
    /// The TLS splice, whose CA the replay's TLS client trusts; `None` replays TLS as bytes.
    pub splicer: Option<Arc<Splicer>>,
    /// Announced replays.
    pub pending: Pending,
}

impl Replayer {
    /// Checks `req`, reads the original, and starts the runs; the receiver yields their
    /// events and ends with a summary.
    pub async fn start(
        self: &Arc<Self>,
        req: ReplayRequest,
    ) -> Result<mpsc::Receiver<Result<ReplayEvent, Status>>, Status> {
        let times = req.times.max(1);
        let concurrency = req.concurrency.max(1);
        if times > MAX_TIMES {
            return Err(Status::invalid_argument(format!(
                "times {times}: at most {MAX_TIMES}"
            )));
        }
        if concurrency > MAX_CONCURRENCY {
            return Err(Status::invalid_argument(format!(
                "concurrency {concurrency}: at most {MAX_CONCURRENCY}"
            )));
        }
        let settle = match req.settle {
            None => DEFAULT_SETTLE,
            Some(d) => Duration::try_from(d)
                .ok()
                .filter(|d| *d <= MAX_SETTLE)
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "settle: between 0 and {}s",
                        MAX_SETTLE.as_secs()
                    ))
                })?,
        };
        let pace = match Pace::try_from(req.pace) {
            Ok(Pace::Unspecified) => Pace::Wait,
            Ok(p) => p,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown pace {}",
                    req.pace
                )));
            }
        };
        let edits = edit::Edits::new(&req).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if req.conn_id == 0 {
            return Err(Status::invalid_argument("conn_id is required"));
        }
        let conn = source::record(&*self.registry, req.conn_id).await?;
        self.check_original(&conn, req.any_node)?;
        let target = if req.to.is_empty() {
            original_target(&conn)?
        } else {
            parse_target(&req.to).map_err(Status::invalid_argument)?
        };
        if conn.packets_c2s == 0 {
            return Err(Status::failed_precondition(format!(
                "connection {} has no client-to-server packets to replay",
                conn.id
            )));
        }
        let source = source::Source::new(self.registry.clone(), &conn).await?;
        if source
            .feed(Direction::C2s)
            .recv()
            .await
            .transpose()?
            .is_none()
        {
            return Err(Status::failed_precondition(format!(
                "connection {} has no client-to-server packets in the history (recorded with \
                 --history off, purged or evicted)",
                conn.id
            )));
        }
        let named = edits.unknown_seqs(|_| false);
        if !named.is_empty() {
            let seqs = source::c2s_seqs(&source).await?;
            if seqs.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "connection {} has no client-to-server packets in the history (history off, \
                     purged or evicted?)",
                    conn.id
                )));
            }
            let unknown = edits.unknown_seqs(|s| seqs.contains(&s));
            if !unknown.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "connection {} has no client-to-server packet {}",
                    conn.id,
                    unknown
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        let tls = self.tls_plan(&conn, &target, &source).await?;
        let plan = Arc::new(run::RunPlan {
            socks: connectable(self.socks),
            auth: self.auth.clone(),
            pending: self.pending.clone(),
            original: conn.id,
            target,
            tls,
            pace,
            settle,
            edits,
            source,
            omit_data: req.omit_data,
        });
        tracing::info!(
            original = conn.id,
            target = %plan.target,
            times,
            concurrency,
            tls = plan.tls.is_some(),
            "replaying"
        );
        let (tx, rx) = mpsc::channel(EVENTS_BOUND);
        tokio::spawn(drive(plan, times, concurrency, tx));
        Ok(rx)
    }

    fn check_original(&self, conn: &Connection, any_node: bool) -> Result<(), Status> {
        if conn.transport == Transport::Udp as i32 {
            return Err(Status::failed_precondition(format!(
                "connection {} is a UDP association: only TCP connections can be replayed",
                conn.id
            )));
        }
        if !any_node && !conn.node.is_empty() && conn.node != self.node {
            return Err(Status::failed_precondition(format!(
                "connection {} was carried by node {:?}, this proxy is {:?}: replay it on that \
                 node's proxy-core (its --listen), or ask for any node",
                conn.id, conn.node, self.node
            )));
        }
        Ok(())
    }

    /// TLS as the original spoke it, when it was intercepted and this proxy splices TLS.
    async fn tls_plan(
        &self,
        conn: &Connection,
        target: &Addr,
        source: &source::Source,
    ) -> Result<Option<run::TlsPlan>, Status> {
        if !conn.tls || conn.client_tls.is_none() {
            return Ok(None);
        }
        let Some(splicer) = &self.splicer else {
            return Err(Status::failed_precondition(format!(
                "connection {} was intercepted TLS and this proxy does not intercept TLS",
                conn.id
            )));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(splicer.ca().cert_der().clone())
            .map_err(|e| Status::internal(format!("the proxy's CA as a root: {e}")))?;
        let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Status::internal(format!("TLS client configuration: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        if !conn.alpn.is_empty() {
            config.alpn_protocols = vec![conn.alpn.as_bytes().to_vec()];
        }
        // No SNI when the original sent none (the proxy's leaf is then for the target).
        config.enable_sni = !conn.sni.is_empty();
        let name = if conn.sni.is_empty() {
            target.host()
        } else {
            conn.sni.clone()
        };
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| Status::failed_precondition(format!("TLS server name {name:?}: {e}")))?;
        let s2c_before = source::s2c_bytes_through(source, conn.tls_after_seq).await?;
        Ok(Some(run::TlsPlan {
            after_seq: conn.tls_after_seq,
            s2c_before,
            server_name,
            config: Arc::new(config),
        }))
    }
}

/// Runs `times` runs of `plan`, `concurrency` at once, then sends the summary.
async fn drive(
    plan: Arc<run::RunPlan>,
    times: u32,
    concurrency: u32,
    tx: mpsc::Sender<Result<ReplayEvent, Status>>,
) {
    let started = Instant::now();
    let events = tx.clone();
    let mut runs = futures::stream::iter(1..=times)
        .map(|i| {
            let plan = plan.clone();
            let events = events.clone();
            async move {
                // Each run its own task: runs at once use both cores.
                tokio::spawn(async move { run::run(&plan, i, &events).await })
                    .await
                    .ok()
            }
        })
        .buffer_unordered(concurrency as usize);
    let mut summary = ReplaySummary {
        runs: times,
        ..Default::default()
    };
    while let Some(done) = runs.next().await {
        let Some(done) = done else { continue };
        if done.error.is_empty() {
            summary.completed += 1;
        }
        if done.comparison.as_ref().is_some_and(|c| c.identical) {
            summary.identical += 1;
        }
        if tx
            .send(Ok(ReplayEvent {
                finished: Some(done),
                ..Default::default()
            }))
            .await
            .is_err()
        {
            // The caller went away: the runs in flight end with the stream.
            return;
        }
    }
    summary.elapsed = prost_types::Duration::try_from(started.elapsed()).ok();
    let _ = tx
        .send(Ok(ReplayEvent {
            summary: Some(summary),
            ..Default::default()
        }))
        .await;
}

/// The address to connect to for a listener bound to `addr` (the unspecified address is
/// reached on loopback).
fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), a.port())
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), a.port())
        }
        a => a,
    }
}

/// The original's destination as its client named it.
fn original_target(conn: &Connection) -> Result<Addr, Status> {
    let port = u16::try_from(conn.dst_port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            Status::failed_precondition(format!("connection {} has no target port", conn.id))
        })?;
    let host = if conn.dst_host.is_empty() {
        &conn.dst_ip
    } else {
        &conn.dst_host
    };
    if host.is_empty() {
        return Err(Status::failed_precondition(format!(
            "connection {} has no target host",
            conn.id
        )));
    }
    Ok(match host.parse::<std::net::IpAddr>() {
        Ok(ip) => Addr::Ip(SocketAddr::new(ip, port)),
        Err(_) => Addr::Domain(host.clone(), port),
    })
}

/// `HOST:PORT` (IPv6 in brackets) as a SOCKS target.
pub fn parse_target(s: &str) -> Result<Addr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(Addr::Ip(a));
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("target {s:?}: expected HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("target {s:?}: {port:?} is not a port (1-65535)"))?;
    if host.is_empty() || host.len() > 255 || host.contains(['[', ']', ':', ' ', '/']) {
        return Err(format!(
            "target {s:?}: {host:?} is not a host name or IP address"
        ));
    }
    Ok(Addr::Domain(host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_or_say_what_is_wrong() {
        assert_eq!(
            parse_target("127.0.0.1:5").unwrap(),
            Addr::Ip("127.0.0.1:5".parse().unwrap())
        );
        assert_eq!(
            parse_target("[::1]:5").unwrap(),
            Addr::Ip("[::1]:5".parse().unwrap())
        );
        assert_eq!(
            parse_target("example.com:443").unwrap(),
            Addr::Domain("example.com".into(), 443)
        );
        for (bad, says) in [
            ("example.com", "HOST:PORT"),
            ("example.com:0", "not a port"),
            ("example.com:x", "not a port"),
            (":80", "not a host"),
        ] {
            let e = parse_target(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn only_announced_peers_are_replays() {
        let p = Pending::default();
        let a: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:4001".parse().unwrap();
        assert_eq!(p.claim(a, 9), 0);
        let mut rx = p.announce(a, 7);
        assert_eq!(p.claim(b, 9), 0);
        assert_eq!(p.claim(a, 9), 7);
        assert_eq!(rx.try_recv().unwrap(), 9);
        assert_eq!(p.claim(a, 10), 0, "claimed once");
        let _rx = p.announce(b, 3);
        p.withdraw(b);
        assert_eq!(p.claim(b, 11), 0);
        assert_eq!(p.len.load(Ordering::Acquire), 0);
    }
}
