//! TLS interception benchmark (issue 4): intercepted bulk throughput (history on and off),
//! fresh intercepted TLS connections per second with a warm leaf cache, and small-request
//! latency on one kept-alive intercepted connection, each against a direct TLS connection
//! to the same rustls server from the same client in the same run, on loopback. Run with
//! `cargo run --release -p tests --bin bench-tls [bulk|cps|latency]`. Prints medians over
//! several runs.
//!
//! Client session resumption is off on both paths, so every fresh connection is a full
//! handshake (through the proxy: two full handshakes, client leg and upstream leg).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use rustls::{
    ClientConfig, RootCertStore,
    client::Resumption,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use tests::{
    Registry,
    bench_server::BenchServer,
    pki::UpstreamPki,
    proxy::{ProxyProc, socks_connected},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use tests::stats::{CpuMeter, cpu_line, median, percentile, settle};

const RUNS: usize = 5;
const BULK: u64 = 256 << 20;
const CPS_SECS: f64 = 2.0;
const CPS_CLIENTS: usize = 8;
const RTTS: usize = 5_000;
const MSG: usize = 64;

#[derive(Clone, Copy)]
enum Route {
    Direct,
    Socks(SocketAddr),
}

async fn open(
    route: Route,
    server: SocketAddr,
    connector: &TlsConnector,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let tcp = match route {
        Route::Direct => TcpStream::connect(server).await?,
        Route::Socks(p) => socks_connected(p, server).await?,
    };
    tcp.set_nodelay(true)?;
    Ok(connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?)
}

/// Bytes per second of one bulk download.
async fn bulk(route: Route, server: SocketAddr, c: &TlsConnector) -> anyhow::Result<f64> {
    let mut tls = open(route, server, c).await?;
    let start = Instant::now();
    tls.write_all(b"B").await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        match tls.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => got += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
    }
    if got != BULK {
        bail!("bulk: got {got} of {BULK} bytes");
    }
    Ok(got as f64 / start.elapsed().as_secs_f64())
}

/// Fresh TLS connections (handshake, one byte each way) per second, and how many were made
/// in all (the clients finish the round they are in after the measured time).
async fn cps(route: Route, server: SocketAddr, c: &TlsConnector) -> anyhow::Result<(f64, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CPS_CLIENTS {
        let (stop, done, c) = (stop.clone(), done.clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut tls = open(route, server, &c).await?;
                tls.write_all(b"C").await?;
                let mut b = [0u8; 1];
                tls.read_exact(&mut b).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(CPS_SECS)).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    for t in tasks {
        t.await??;
    }
    Ok((n as f64 / secs, done.load(Ordering::Relaxed)))
}

/// Round-trip times (µs) of small messages on one kept-alive connection.
async fn rtts(route: Route, server: SocketAddr, c: &TlsConnector) -> anyhow::Result<Vec<f64>> {
    let mut tls = open(route, server, c).await?;
    tls.write_all(b"E").await?;
    let msg = [7u8; MSG];
    let mut back = [0u8; MSG];
    let mut v = Vec::with_capacity(RTTS);
    for i in 0..RTTS + 200 {
        let t = Instant::now();
        tls.write_all(&msg).await?;
        tls.read_exact(&mut back).await?;
        if i >= 200 {
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(v)
}

fn mbps(v: f64) -> String {
    format!("{:.0} MiB/s", v / (1 << 20) as f64)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    proxy_core::tls::install_provider();
    let only: Vec<String> = std::env::args().skip(1).collect();
    let want = |s: &str| only.is_empty() || only.iter().any(|o| o == s);
    let dir = tempfile::tempdir()?;
    // Test PKI: a CA and a server certificate for localhost.
    let pki = UpstreamPki::create(dir.path(), "bench upstream CA")?;
    let upstream_ca = pki.ca_pem.clone();
    // The server runs as its own process, as a real one does.
    let bench_server =
        BenchServer::start(dir.path(), BULK, Some((&pki.cert_pem, &pki.key_pem))).await?;
    let server = bench_server.addr;

    let registry = Registry::start(&dir.path().join("registry")).await?;
    let data = dir.path().join("proxy-data");
    let ca_arg = upstream_ca.display().to_string();
    let data_arg = data.display().to_string();
    let mut proxies = Vec::new();
    for (node, history) in [("tls-on", "on"), ("tls-off", "off")] {
        proxies.push(
            ProxyProc::start_logging(
                dir.path(),
                &registry.url,
                node,
                &[
                    "--history",
                    history,
                    "--data-dir",
                    &data_arg,
                    "--upstream-ca",
                    &ca_arg,
                ],
                "warn",
            )
            .await?,
        );
    }
    let (on, off) = (
        Route::Socks(proxies[0].socks),
        Route::Socks(proxies[1].socks),
    );
    // The processes each path keeps busy, for the CPU accounting.
    let pid = |p: &tests::Proc| p.pid().context("process already gone");
    let ends = [
        ("client", std::process::id()),
        ("server", pid(&bench_server.proc)?),
    ];
    let (reg_pid, on_pid, off_pid) = (
        pid(&registry.proc)?,
        pid(&proxies[0].proc)?,
        pid(&proxies[1].proc)?,
    );
    let procs = |route: Route| -> Vec<(&'static str, u32)> {
        let mut v = ends.to_vec();
        match route {
            Route::Direct => {}
            Route::Socks(a) => {
                v.push((
                    "proxy",
                    if a == proxies[0].socks {
                        on_pid
                    } else {
                        off_pid
                    },
                ));
                v.push(("registry", reg_pid));
            }
        }
        v
    };

    // The client trusts both the server's CA and the proxy's CA; no session resumption.
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.clone())?;
    for c in CertificateDer::pem_file_iter(data.join("ca").join("ca-cert.pem"))? {
        roots.add(c?)?;
    }
    let mut client_cfg = ClientConfig::builder_with_provider(proxy_core::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_cfg.resumption = Resumption::disabled();
    let c = TlsConnector::from(Arc::new(client_cfg));

    // Warm up: the leaf cache, the connection pools, the registry.
    for route in [Route::Direct, on, off] {
        let mut tls = open(route, server, &c).await.context("warm-up")?;
        tls.write_all(b"C").await?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await?;
    }

    if want("bulk") {
        println!(
            "bulk: {} MiB per run from one TLS server, {RUNS} runs",
            BULK >> 20
        );
        let mut res = Vec::new();
        for (name, route) in [
            ("direct TLS", Route::Direct),
            ("intercepted, history off", off),
            ("intercepted, history on", on),
        ] {
            let mut v = Vec::new();
            let meter = CpuMeter::start(&procs(route));
            for _ in 0..RUNS {
                v.push(bulk(route, server, &c).await.context(name)?);
                settle(&[reg_pid, on_pid, off_pid]).await;
            }
            let cpu = meter.stop();
            let runs: Vec<String> = v.iter().map(|x| mbps(*x)).collect();
            let m = median(v);
            println!("  {name}: {}; median {}", runs.join(", "), mbps(m));
            let gib = (RUNS as u64 * BULK) as f64 / (1u64 << 30) as f64;
            println!("    CPU seconds per GiB: {}", cpu_line(&cpu, gib));
            res.push(m);
        }
        println!(
            "  ratio to direct: history off {:.2}x, history on {:.2}x",
            res[1] / res[0],
            res[2] / res[0]
        );
    }
    if want("cps") {
        println!(
            "fresh TLS connections: {CPS_CLIENTS} concurrent clients, {CPS_SECS} s per run, {RUNS} runs"
        );
        let mut cres = Vec::new();
        for (name, route) in [
            ("direct TLS", Route::Direct),
            ("intercepted, history on", on),
        ] {
            let mut v = Vec::new();
            let mut conns = 0;
            let meter = CpuMeter::start(&procs(route));
            for _ in 0..RUNS {
                let (rate, n) = cps(route, server, &c).await.context(name)?;
                settle(&[reg_pid, on_pid, off_pid]).await;
                v.push(rate);
                conns += n;
            }
            let cpu = meter.stop();
            let runs: Vec<String> = v.iter().map(|x| format!("{x:.0}")).collect();
            let m = median(v);
            println!("  {name} (conn/s): {}; median {m:.0}/s", runs.join(", "));
            println!(
                "    CPU milliseconds per connection: {}",
                cpu_line(&cpu, conns as f64 / 1000.0)
            );
            cres.push(m);
        }
        println!("  ratio to direct: {:.2}x", cres[1] / cres[0]);
    }
    if want("latency") {
        println!(
            "small requests: {MSG} B echo on one kept-alive connection, {RTTS} round trips, {RUNS} runs"
        );
        let mut lres = Vec::new();
        for (name, route) in [
            ("direct TLS", Route::Direct),
            ("intercepted, history on", on),
        ] {
            let mut p50s = Vec::new();
            let mut p99s = Vec::new();
            for _ in 0..RUNS {
                let mut v = rtts(route, server, &c).await.context(name)?;
                p50s.push(percentile(&mut v, 0.5));
                p99s.push(percentile(&mut v, 0.99));
            }
            let runs: Vec<String> = p50s.iter().map(|x| format!("{x:.0}")).collect();
            let (p50, p99) = (median(p50s), median(p99s));
            println!(
                "  {name}: p50 per run (µs) {}; median p50 {p50:.0} µs, median p99 {p99:.0} µs",
                runs.join(", ")
            );
            lres.push(p50);
        }
        println!("  p50 ratio to direct: {:.2}x", lres[1] / lres[0]);
    }
    Ok(())
}
