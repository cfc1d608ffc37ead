//! Intercept benchmark (issue 9), through one `interpose up` (history off, so that only
//! intercept differs between the paths), with intercept turned on and off between rounds of
//! the same run:
//!
//! - the latency a held-and-forwarded packet adds: 64-byte echo round trips with every
//!   client packet held (`intercept on --direction c2s`) and an automatic forwarder (a
//!   gRPC client here that watches the held queue and forwards each packet as soon as it
//!   sees it), against the same round trips with intercept off. The forwarder's own wait
//!   (from the held event to its `Forward` call) is measured and subtracted per packet;
//! - bulk download throughput with intercept on and a filter that matches nothing (a host
//!   filter, and a `--contains` filter that scans every packet), against intercept off.
//!
//! Run with `cargo run --release -p tests --bin bench-intercept`. Prints medians over
//! several interleaved rounds.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use platform::client::AuthChannel;
use proto::{
    common::Direction,
    intercept::{
        ForwardRequest, InterceptConfig, SetConfigRequest, WatchHeldRequest, held_event::Kind,
        intercept_client::InterceptClient,
    },
};
use tests::{
    Up,
    bench_server::BenchServer,
    proxy::socks_connected,
    stats::{median, percentile},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};

const RUNS: usize = 5;
const BULK: u64 = 1 << 30;
const RTTS: usize = 2_000;
const WARMUP: usize = 200;

type Client = InterceptClient<AuthChannel>;

/// Sets intercept's configuration and gives the proxy a moment to follow it (it does over
/// a stream; the round trips and downloads start with a warm-up anyway).
async fn configure(c: &Client, config: InterceptConfig) -> anyhow::Result<()> {
    c.clone()
        .set_config(SetConfigRequest {
            config: Some(config),
        })
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

fn off() -> InterceptConfig {
    InterceptConfig::default()
}

fn hold_c2s() -> InterceptConfig {
    InterceptConfig {
        enabled: true,
        direction: Direction::C2s as i32,
        ..Default::default()
    }
}

/// Watches the held queue and forwards every packet as it appears; sends the forwarder's
/// own wait for each (from receiving the event to making the `Forward` call) on the
/// returned channel.
async fn forwarder(c: &Client) -> anyhow::Result<mpsc::UnboundedReceiver<Duration>> {
    let mut events = c
        .clone()
        .watch_held(WatchHeldRequest {})
        .await?
        .into_inner();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut c = c.clone();
    tokio::spawn(async move {
        while let Ok(Some(ev)) = events.message().await {
            let seen = Instant::now();
            if ev.kind() != Kind::Added {
                continue;
            }
            let held_id = ev.held.map(|h| h.held_id).unwrap_or(ev.held_id);
            let req = ForwardRequest {
                held_id,
                replace: false,
                data: Default::default(),
            };
            let _ = tx.send(seen.elapsed());
            if let Err(e) = c.forward(req).await {
                eprintln!("forwarder: {}", e.message());
            }
        }
    });
    Ok(rx)
}

async fn echo_session(socks: SocketAddr, server: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut s = socks_connected(socks, server).await?;
    s.set_nodelay(true)?;
    s.write_all(b"E").await?;
    Ok(s)
}

async fn round_trip(s: &mut TcpStream) -> anyhow::Result<Duration> {
    let req = [0x42u8; 64];
    let mut resp = [0u8; 64];
    let t = Instant::now();
    s.write_all(&req).await?;
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut resp))
        .await
        .context("no echo within 10 s")??;
    Ok(t.elapsed())
}

/// Round-trip times (microseconds) with intercept off.
async fn rtts_off(socks: SocketAddr, server: SocketAddr) -> anyhow::Result<Vec<f64>> {
    let mut s = echo_session(socks, server).await?;
    for _ in 0..WARMUP {
        round_trip(&mut s).await?;
    }
    let mut out = Vec::with_capacity(RTTS);
    for _ in 0..RTTS {
        out.push(round_trip(&mut s).await?.as_secs_f64() * 1e6);
    }
    Ok(out)
}

/// Round-trip times (microseconds) with every client packet held and forwarded, less the
/// forwarder's own wait for that packet.
async fn rtts_held(
    socks: SocketAddr,
    server: SocketAddr,
    waits: &mut mpsc::UnboundedReceiver<Duration>,
    own: &mut Vec<f64>,
) -> anyhow::Result<Vec<f64>> {
    while waits.try_recv().is_ok() {}
    let mut s = echo_session(socks, server).await?;
    // Until the proxy holds (it follows the setting over a stream), packets pass.
    let started = Instant::now();
    while waits.try_recv().is_err() {
        round_trip(&mut s).await?;
        if started.elapsed() > Duration::from_secs(10) {
            bail!("the proxy never held a packet");
        }
    }
    // Drop what is left of the start (the session's command byte may have been held too),
    // so that each round trip below finds exactly its own packet's wait.
    tokio::time::sleep(Duration::from_millis(50)).await;
    while waits.try_recv().is_ok() {}
    for _ in 0..WARMUP {
        round_trip(&mut s).await?;
        waits.try_recv().context("a warm-up packet was not held")?;
    }
    let mut out = Vec::with_capacity(RTTS);
    for _ in 0..RTTS {
        let rtt = round_trip(&mut s).await?;
        // The forwarder sent its wait before forwarding, so before the echo came back.
        let wait = waits.try_recv().context("a measured packet was not held")?;
        out.push(rtt.saturating_sub(wait).as_secs_f64() * 1e6);
        own.push(wait.as_secs_f64() * 1e6);
    }
    Ok(out)
}

/// Bytes per second downloading `BULK` bytes.
async fn bulk(socks: SocketAddr, server: SocketAddr) -> anyhow::Result<f64> {
    let mut s = socks_connected(socks, server).await?;
    s.set_nodelay(true)?;
    tests::proxy::bench_download(&mut s, BULK).await
}

async fn latency(c: &Client, socks: SocketAddr, server: SocketAddr) -> anyhow::Result<()> {
    let mut waits = forwarder(c).await?;
    let (mut off50, mut off99, mut on50, mut on99, mut own) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        configure(c, off()).await?;
        let mut v = rtts_off(socks, server).await?;
        off50.push(percentile(&mut v, 0.5));
        off99.push(percentile(&mut v, 0.99));
        configure(c, hold_c2s()).await?;
        let mut v = rtts_held(socks, server, &mut waits, &mut own).await?;
        on50.push(percentile(&mut v, 0.5));
        on99.push(percentile(&mut v, 0.99));
    }
    configure(c, off()).await?;
    let (off50, off99, on50, on99) = (median(off50), median(off99), median(on50), median(on99));
    println!(
        "64-byte echo round trips through interpose up ({RTTS} per round after {WARMUP} warm-up), median of {RUNS} interleaved rounds:"
    );
    println!("  intercept off                     p50 {off50:>7.1} us  p99 {off99:>7.1} us");
    println!(
        "  every c2s packet held, forwarded  p50 {on50:>7.1} us  p99 {on99:>7.1} us  (forwarder's own wait subtracted)"
    );
    println!(
        "  the forwarder's own wait (event to Forward call): p50 {:.1} us, p99 {:.1} us",
        percentile(&mut own, 0.5),
        percentile(&mut own, 0.99)
    );
    println!(
        "  added per held-and-forwarded packet: p50 {:.3} ms, p99 {:.3} ms (target: p99 at most 2 ms)",
        (on50 - off50) / 1e3,
        (on99 - off99) / 1e3
    );
    Ok(())
}

async fn throughput(c: &Client, socks: SocketAddr, server: SocketAddr) -> anyhow::Result<()> {
    let paths = [
        ("intercept off", off()),
        (
            "on, host filter misses",
            InterceptConfig {
                enabled: true,
                hosts: vec!["nowhere.invalid".into()],
                ..Default::default()
            },
        ),
        (
            "on, --contains misses",
            InterceptConfig {
                enabled: true,
                contains: b"never in the data".to_vec(),
                ..Default::default()
            },
        ),
    ];
    let mut res: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for _ in 0..RUNS {
        for (i, (name, config)) in paths.iter().enumerate() {
            configure(c, config.clone()).await?;
            let v = bulk(socks, server)
                .await
                .with_context(|| format!("bulk with {name}"))?;
            res[i].push(v);
        }
    }
    configure(c, off()).await?;
    println!(
        "bulk download of 1 GiB (server to client; filters on both directions), median of {RUNS} interleaved rounds:"
    );
    let base = median(res[0].clone());
    for (i, (name, _)) in paths.iter().enumerate() {
        let m = median(res[i].clone());
        println!(
            "  {name:<24} {:.2} GB/s  ({:.3}x intercept off; target at least 0.95x)",
            m / 1e9,
            m / base
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let only: Vec<String> = std::env::args().skip(1).collect();
    let want = |s: &str| only.is_empty() || only.iter().any(|o| o == s);
    let dir = tempfile::tempdir()?;
    let up = Up::start(&dir.path().join("up"), &["--history", "off"]).await?;
    let socks = up.proc.addr("socks")?;
    let c = InterceptClient::new(tests::channel(&up.grpc, None).await?);
    // The server runs as its own process, as a real one does.
    let server = BenchServer::start(dir.path(), BULK, None).await?;
    if want("latency") {
        latency(&c, socks, server.addr).await?;
    }
    if want("bulk") {
        throughput(&c, socks, server.addr).await?;
    }
    Ok(())
}
