//! The load run (issue 12) that `bench-load` reports and the opt-in `load` test checks: many
//! concurrent SOCKS connections through `interpose up` (history on), half plain and half
//! TLS-intercepted, each echoing paced messages with a `bench-server` for a bounded time,
//! while two more clients (one plain, one TLS) keep opening short connections that the
//! server closes. Afterwards every connection must have its record, disconnected, closed by
//! the side that closed it, with exactly the bytes each side sent, and the history must hold
//! those bytes; the RSS of `up` is sampled throughout and once more after it settles.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use platform::client::AuthChannel;
use proto::{
    common::{ClosedBy, ConnStatus, Connection, Direction},
    registry::{ConnectionStatsRequest, registry_client::RegistryClient},
};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::watch,
    task::JoinSet,
};
use tokio_rustls::TlsConnector;

use crate::{
    Up, WAIT,
    bench_server::BenchServer,
    pki::UpstreamPki,
    proxy::{all_connections, history, payload, socks_connected},
    stats::rss_bytes,
};

/// How often each long connection sends one message (and waits for its echo).
const MSG_EVERY: Duration = Duration::from_millis(250);
/// The pause between two short connections of one churning client.
const CHURN_EVERY: Duration = Duration::from_millis(100);
/// How many connections open at once while the long connections ramp up.
const OPENING: usize = 64;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct LoadConfig {
    /// Long connections, held open together (every second one TLS).
    pub connections: usize,
    /// How long they exchange messages once all are open.
    pub duration: Duration,
    /// Rounds against the same `up`: RSS that grows round after round is a leak, RSS that
    /// stays where the first round left it is memory kept for reuse.
    pub rounds: usize,
    /// History on (the default of `up`); off shows what the history costs in memory.
    pub history: bool,
}

/// What a run measured; every check has passed when [`run`] returns it.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub long_plain: usize,
    pub long_tls: usize,
    /// Bytes sent client to server and server to client, over every connection.
    pub bytes_c2s: u64,
    pub bytes_s2c: u64,
    /// History packets the registry stored for these connections.
    pub history_packets: u64,
    pub rounds: Vec<Round>,
    /// RSS of `up`, bytes: ready and idle, and the highest sample.
    pub rss_start: u64,
    pub rss_peak: u64,
}

/// One round's figures.
#[derive(Debug, Clone)]
pub struct Round {
    /// Short connections (closed by the server).
    pub short: usize,
    /// How long opening the long connections took.
    pub ramp: Duration,
    /// From the last close until every record was disconnected and complete.
    pub records_complete_after: Duration,
    /// RSS of `up` once it settled after the round, bytes.
    pub rss_after: u64,
}

/// What one client connection did, to compare with its record.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Sent {
    tls: bool,
    c2s: u64,
    s2c: u64,
    closed_by: i32,
}

/// Where the clients connect, and how they speak TLS.
struct Target {
    socks: SocketAddr,
    plain: SocketAddr,
    tls: SocketAddr,
    connector: TlsConnector,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// `f`, or an error naming `what` after [`WAIT`].
async fn bounded<T>(what: &str, f: impl Future<Output = std::io::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(WAIT, f)
        .await
        .with_context(|| format!("{what}: timed out"))?
        .with_context(|| what.to_string())
}

impl Target {
    /// A connection through the proxy to the plain or the TLS server; its client port.
    async fn open(&self, tls: bool) -> anyhow::Result<(u16, Box<dyn Io>)> {
        let server = if tls { self.tls } else { self.plain };
        let tcp = socks_connected(self.socks, server).await?;
        let port = tcp.local_addr()?.port();
        if !tls {
            return Ok((port, Box::new(tcp)));
        }
        let name = ServerName::try_from("localhost")?;
        let s = bounded("TLS handshake", self.connector.connect(name, tcp)).await?;
        Ok((port, Box::new(s)))
    }
}

/// Reads until EOF and fails on any byte; a TLS peer that ends without close_notify is EOF.
async fn expect_eof(s: &mut Box<dyn Io>) -> anyhow::Result<()> {
    let mut rest = Vec::new();
    match tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await {
        Err(_) => bail!("no EOF within {WAIT:?}"),
        Ok(Err(e)) if e.kind() != std::io::ErrorKind::UnexpectedEof => Err(e.into()),
        Ok(_) if !rest.is_empty() => bail!("{} unexpected bytes before EOF", rest.len()),
        Ok(_) => Ok(()),
    }
}

/// One long connection: opens, waits for the start, echoes a message every [`MSG_EVERY`]
/// until the deadline, then closes (client first) and reads to the server's EOF.
async fn long_conn(
    t: Arc<Target>,
    i: usize,
    opened: Arc<AtomicUsize>,
    mut go: watch::Receiver<Option<Instant>>,
) -> anyhow::Result<(u16, Sent)> {
    let tls = i % 2 == 1;
    let (port, mut s) = t.open(tls).await?;
    bounded("command", s.write_all(b"E")).await?;
    opened.fetch_add(1, Ordering::Relaxed);
    let deadline = loop {
        if let Some(d) = *go.borrow_and_update() {
            break d;
        }
        go.changed().await?;
    };
    // Spread the connections over the interval, with sizes from 256 to 1,279 bytes.
    tokio::time::sleep(MSG_EVERY.mul_f64((i % 100) as f64 / 100.0)).await;
    let msg = payload(256 + (i * 37) % 1024, i as u8);
    let mut back = vec![0u8; msg.len()];
    let mut tick = tokio::time::interval(MSG_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = Sent {
        tls,
        c2s: 1,
        s2c: 0,
        closed_by: ClosedBy::Client as i32,
    };
    while Instant::now() < deadline {
        tick.tick().await;
        bounded("send", s.write_all(&msg)).await?;
        sent.c2s += msg.len() as u64;
        bounded("echo", s.read_exact(&mut back)).await?;
        sent.s2c += msg.len() as u64;
        if back != msg {
            bail!("connection {i}: the echo differs");
        }
    }
    bounded("close", s.shutdown()).await?;
    expect_eof(&mut s).await?;
    Ok((port, sent))
}

/// One churning client: short connections (one byte each way, the server closes first)
/// until the deadline.
async fn churn(t: Arc<Target>, tls: bool, deadline: Instant) -> anyhow::Result<Vec<(u16, Sent)>> {
    let mut done = Vec::new();
    while Instant::now() < deadline {
        let (port, mut s) = t.open(tls).await?;
        bounded("send", s.write_all(b"x")).await?;
        let mut b = [0u8; 1];
        bounded("reply", s.read_exact(&mut b)).await?;
        expect_eof(&mut s).await?;
        drop(s);
        done.push((
            port,
            Sent {
                tls,
                c2s: 1,
                s2c: 1,
                closed_by: ClosedBy::Server as i32,
            },
        ));
        tokio::time::sleep(CHURN_EVERY).await;
    }
    Ok(done)
}

/// Samples the RSS of `pid` every 100 ms; the highest sample so far.
fn sample_peak(pid: u32) -> Arc<AtomicU64> {
    let peak = Arc::new(AtomicU64::new(rss_bytes(pid).unwrap_or(0)));
    let p = peak.clone();
    tokio::spawn(async move {
        while let Some(rss) = rss_bytes(pid) {
            p.fetch_max(rss, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    peak
}

/// Runs the load against a fresh `up` in `dir` (servers included) and checks the outcome.
pub async fn run(dir: &Path, cfg: LoadConfig) -> anyhow::Result<LoadReport> {
    proxy_core::tls::install_provider();
    platform::limits::raise_open_files();
    let pki = UpstreamPki::create(dir, "load upstream CA")?;
    let (plain_dir, tls_dir) = (dir.join("plain-server"), dir.join("tls-server"));
    std::fs::create_dir_all(&plain_dir)?;
    std::fs::create_dir_all(&tls_dir)?;
    let plain = BenchServer::start(&plain_dir, 0, None).await?;
    let tls = BenchServer::start(&tls_dir, 0, Some((&pki.cert_pem, &pki.key_pem))).await?;
    let ca = pki.ca_pem.display().to_string();
    let history = if cfg.history { "on" } else { "off" };
    let up = Up::start(
        &dir.join("up"),
        &["--upstream-ca", &ca, "--history", history],
    )
    .await?;
    let up_pid = up.proc.pid().context("up already gone")?;
    let mut roots = RootCertStore::empty();
    let proxy_ca = up.proc.field("ca").context("ca= in the ready line")?;
    for c in CertificateDer::pem_file_iter(proxy_ca)? {
        roots.add(c?)?;
    }
    let client_cfg = ClientConfig::builder_with_provider(proxy_core::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let target = Arc::new(Target {
        socks: up.proc.addr("socks")?,
        plain: plain.addr,
        tls: tls.addr,
        connector: TlsConnector::from(Arc::new(client_cfg)),
    });
    let mut registry = crate::registry_client(&up.grpc, None).await?;

    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_start = rss_bytes(up_pid).context("RSS of up")?;
    let peak = sample_peak(up_pid);
    let mut sent: BTreeMap<u16, Vec<Sent>> = BTreeMap::new();
    let mut rounds = Vec::new();
    let mut records = Vec::new();
    for _ in 0..cfg.rounds.max(1) {
        let (r, all) = round(&target, &mut registry, cfg, &mut sent).await?;
        records = all;
        rounds.push(Round {
            rss_after: settled_rss(up_pid).await?,
            ..r
        });
    }
    let history_packets = if cfg.history {
        check_history(&registry, &records).await?
    } else {
        0
    };
    check_no_losses(&mut registry).await?;
    let all = sent.values().flatten();
    Ok(LoadReport {
        long_plain: cfg.connections.div_ceil(2),
        long_tls: cfg.connections / 2,
        bytes_c2s: all.clone().map(|s| s.c2s).sum(),
        bytes_s2c: all.map(|s| s.s2c).sum(),
        history_packets,
        rounds,
        rss_start,
        rss_peak: peak.load(Ordering::Relaxed),
    })
}

/// One round: opens the long connections (a bounded number at a time), starts them
/// together with the churning clients, and waits until every record of every round so far
/// (`sent`, which gains this round's connections) is complete. Returns the round's figures
/// (RSS not yet measured) and every record.
async fn round(
    target: &Arc<Target>,
    registry: &mut RegistryClient<AuthChannel>,
    cfg: LoadConfig,
    sent: &mut BTreeMap<u16, Vec<Sent>>,
) -> anyhow::Result<(Round, Vec<Connection>)> {
    let ramp_start = Instant::now();
    let opened = Arc::new(AtomicUsize::new(0));
    let (go_tx, go_rx) = watch::channel(None);
    let mut longs = JoinSet::new();
    for i in 0..cfg.connections {
        while opened.load(Ordering::Relaxed) + OPENING <= i {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        longs.spawn(long_conn(target.clone(), i, opened.clone(), go_rx.clone()));
    }
    let deadline = Instant::now() + WAIT * 3;
    while opened.load(Ordering::Relaxed) < cfg.connections {
        // A task that ended before the start has failed: report why.
        if let Some(r) = longs.try_join_next() {
            r??;
        }
        if Instant::now() > deadline {
            bail!(
                "{} of {} connections open after {:?}",
                opened.load(Ordering::Relaxed),
                cfg.connections,
                ramp_start.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ramp = ramp_start.elapsed();
    wait_active(registry, cfg.connections as u64).await?;
    let end = Instant::now() + cfg.duration;
    go_tx.send(Some(end))?;
    let churners = [false, true].map(|tls| tokio::spawn(churn(target.clone(), tls, end)));
    while let Some(r) = longs.join_next().await {
        let (port, s) = r??;
        sent.entry(port).or_default().push(s);
    }
    let mut short = 0;
    for c in churners {
        for (port, s) in c.await?? {
            short += 1;
            sent.entry(port).or_default().push(s);
        }
    }
    let closed = Instant::now();
    let records = wait_records(registry, sent).await?;
    let round = Round {
        short,
        ramp,
        records_complete_after: closed.elapsed(),
        rss_after: 0,
    };
    Ok((round, records))
}

/// Waits until the registry shows `n` active connections: all are open in the proxy at once.
async fn wait_active(registry: &mut RegistryClient<AuthChannel>, n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = registry
            .connection_stats(ConnectionStatsRequest::default())
            .await?
            .into_inner();
        let active = stats
            .by_status
            .iter()
            .find(|c| c.key == "active")
            .map_or(0, |c| c.count);
        if active == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{active} of {n} connections active in the registry");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The record of a connection, reduced to what the client knows about it.
fn as_sent(c: &Connection) -> Sent {
    Sent {
        tls: c.tls,
        c2s: c.bytes_c2s,
        s2c: c.bytes_s2c,
        closed_by: c.closed_by,
    }
}

/// Waits (bounded) until every connection's record is disconnected with exactly what its
/// client saw (matched by client port; a port reused by short connections matches as a set).
async fn wait_records(
    registry: &mut RegistryClient<AuthChannel>,
    sent: &BTreeMap<u16, Vec<Sent>>,
) -> anyhow::Result<Vec<Connection>> {
    let deadline = Instant::now() + WAIT * 3;
    loop {
        let records = all_connections(registry).await?;
        let mut got: BTreeMap<u16, Vec<Sent>> = BTreeMap::new();
        let mut active = 0;
        for c in &records {
            active += usize::from(c.status != ConnStatus::Disconnected as i32);
            let port = u16::try_from(c.src_port).unwrap_or(0);
            got.entry(port).or_default().push(as_sent(c));
        }
        got.values_mut().for_each(|v| v.sort());
        let mismatch = sent.iter().find(|(port, want)| {
            let mut want = (*want).clone();
            want.sort();
            got.get(port) != Some(&want)
        });
        match mismatch {
            None if active == 0 && got.len() == sent.len() => return Ok(records),
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(500)).await,
            m => bail!(
                "records: {} for {} client ports, {active} still active; first mismatch: {:?} vs {:?}",
                records.len(),
                sent.len(),
                m,
                m.and_then(|(port, _)| got.get(port))
            ),
        }
    }
}

/// Checks that the history of every record holds its byte counts, with gapless sequence
/// numbers; returns the number of packets.
async fn check_history(
    registry: &RegistryClient<AuthChannel>,
    records: &[Connection],
) -> anyhow::Result<u64> {
    let mut tasks = JoinSet::new();
    for chunk in records.chunks(records.len().div_ceil(8).max(1)) {
        let (mut client, chunk) = (registry.clone(), chunk.to_vec());
        tasks.spawn(async move {
            let mut packets = 0u64;
            for c in chunk {
                let h = history(&mut client, c.id).await?;
                let bytes = |d: Direction| -> u64 {
                    h.iter()
                        .filter(|p| p.direction == d as i32)
                        .map(|p| p.data.len() as u64)
                        .sum()
                };
                let gapless = h.iter().enumerate().all(|(i, p)| p.seq == i as u64 + 1);
                if (bytes(Direction::C2s), bytes(Direction::S2c)) != (c.bytes_c2s, c.bytes_s2c)
                    || !gapless
                {
                    bail!(
                        "history of {}: {} c2s and {} s2c bytes in {} packets (gapless: {gapless}), record says {} and {}",
                        c.id,
                        bytes(Direction::C2s),
                        bytes(Direction::S2c),
                        h.len(),
                        c.bytes_c2s,
                        c.bytes_s2c
                    );
                }
                packets += h.len() as u64;
            }
            anyhow::Ok(packets)
        });
    }
    let mut packets = 0;
    while let Some(r) = tasks.join_next().await {
        packets += r??;
    }
    Ok(packets)
}

/// Fails if any node reported something it could not record.
async fn check_no_losses(registry: &mut RegistryClient<AuthChannel>) -> anyhow::Result<()> {
    let stats = registry
        .connection_stats(ConnectionStatsRequest::default())
        .await?
        .into_inner();
    for (node, losses) in &stats.losses {
        if *losses != Default::default() {
            bail!("node {node} reported losses: {losses:?}");
        }
    }
    Ok(())
}

/// The RSS of `pid` once it changes by under 1% over 5 s (at most a minute).
async fn settled_rss(pid: u32) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = rss_bytes(pid).context("RSS of up")?;
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = rss_bytes(pid).context("RSS of up")?;
        if now.abs_diff(last) * 100 < last || Instant::now() > deadline {
            return Ok(now);
        }
        last = now;
    }
}
