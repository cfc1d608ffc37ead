//! Upstream chaining benchmark (issue 23): the relay through a dante upstream
//! (client -> proxy-core -> danted -> server) against the same chain without Interpose
//! (client -> danted -> server), both measured in the same run on loopback: bulk download
//! throughput and fresh connections per second. Run with
//! `cargo run --release -p tests --bin bench-upstream` (needs `danted` from Debian's
//! dante-server). Prints medians over several interleaved runs and their ratios.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tests::{
    Registry,
    bench_server::BenchServer,
    proxy::{ProxyProc, bench_download, socks_connected},
    stats::median,
    upstreams::Upstream,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Runs per path (`BENCH_RUNS` overrides).
fn runs() -> usize {
    std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}
/// Bytes per bulk download (`BENCH_BULK_MIB` overrides the 1 GiB).
fn bulk_bytes() -> u64 {
    std::env::var("BENCH_BULK_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1024)
        << 20
}
const CPS_SECS: f64 = 2.0;
const CPS_CLIENTS: usize = 16;

/// One SOCKS CONNECT to an IPv4 target with greeting and request in one write.
async fn socks_fast(proxy: SocketAddr, target: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    let SocketAddr::V4(t) = target else {
        bail!("IPv4 only");
    };
    let mut msg = vec![5, 1, 0, 5, 1, 0, 1];
    msg.extend_from_slice(&t.ip().octets());
    msg.extend_from_slice(&t.port().to_be_bytes());
    s.write_all(&msg).await?;
    let mut reply = [0u8; 12];
    s.read_exact(&mut reply).await?;
    if reply[3] != 0 {
        bail!("SOCKS reply {:#04x}", reply[3]);
    }
    Ok(s)
}

/// Fresh connections per second through `proxy` (each connects, sends a byte, reads it back
/// and the server's close), with `CPS_CLIENTS` clients at once.
async fn cps(proxy: SocketAddr, server: SocketAddr) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..CPS_CLIENTS {
        let (done, failed, stop) = (done.clone(), failed.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = async {
                    let mut s = socks_fast(proxy, server).await?;
                    s.write_all(b"x").await?;
                    let mut b = [0u8; 2];
                    s.read_exact(&mut b[..1]).await?;
                    if s.read(&mut b).await? != 0 {
                        bail!("expected the server's close");
                    }
                    anyhow::Ok(())
                }
                .await;
                let n = if r.is_ok() { &done } else { &failed };
                n.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(CPS_SECS)).await;
    let n = done.load(Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let f = failed.load(Ordering::Relaxed);
    if f > 0 {
        eprintln!("  ({f} connections failed)");
    }
    // Let this run's TIME_WAIT sockets age before the next.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(n as f64 / secs)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dante = Upstream::dante(&dir.path().join("dante"), [127, 0, 0, 1].into(), None)
        .await?
        .context("danted is needed (apt-get install dante-server)")?;
    let reg = Registry::start(&dir.path().join("reg")).await?;
    let upstream = format!("socks5://{}", dante.addr);
    let start = |node: &'static str, history: &'static str| {
        let (dir, reg, upstream) = (dir.path(), reg.url.clone(), upstream.clone());
        async move {
            ProxyProc::start_logging(
                dir,
                &reg,
                node,
                &["--upstream", &upstream, "--history", history],
                "warn",
            )
            .await
        }
    };
    let off = start("chain-off", "off").await?;
    let on = start("chain-on", "on").await?;
    let (runs, bulk_len) = (runs(), bulk_bytes());
    let server = BenchServer::start(dir.path(), bulk_len, None).await?;
    let paths = [
        ("dante alone", dante.addr),
        ("proxy-core (history off) -> dante", off.socks),
        ("proxy-core (history on) -> dante", on.socks),
    ];

    let mut bulk: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for run in 0..runs {
        eprintln!("bulk run {run}");
        for (i, (name, p)) in paths.iter().enumerate() {
            let mut s = socks_connected(*p, server.addr).await?;
            s.set_nodelay(true)?;
            let v = bench_download(&mut s, bulk_len)
                .await
                .with_context(|| format!("bulk via {name}"))?;
            bulk[i].push(v);
        }
    }
    println!(
        "bulk download of {} MiB, median of {runs} interleaved runs:",
        bulk_len >> 20
    );
    let base = median(bulk[0].clone());
    for (i, (name, _)) in paths.iter().enumerate() {
        let m = median(bulk[i].clone());
        println!(
            "  {name:<36} {:.2} GB/s  ({:.2}x dante alone)",
            m / 1e9,
            m / base
        );
    }

    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for run in 0..runs {
        eprintln!("cps run {run}");
        for (i, (_, p)) in paths.iter().enumerate() {
            rates[i].push(cps(*p, server.addr).await?);
        }
    }
    println!(
        "fresh connections per second ({CPS_CLIENTS} clients, {CPS_SECS} s), median of {runs}:"
    );
    let base = median(rates[0].clone());
    for (i, (name, _)) in paths.iter().enumerate() {
        let m = median(rates[i].clone());
        println!("  {name:<36} {m:>8.0}/s  ({:.2}x dante alone)", m / base);
    }
    Ok(())
}
