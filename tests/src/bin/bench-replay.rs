//! Replay benchmark (issue 23): throughput of a 1 GiB client side replayed with
//! `--pace burst` against the original connection's through the same proxy, and connections
//! per second of `--times` with `--concurrency` against the original clients' at the same
//! concurrency; both in the same run, through a release `interpose up` on loopback. Run with
//! `cargo run --release -p tests --bin bench-replay`. Prints medians over several runs.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use tests::{Up, proxy::socks_connected, stats::median};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

const RUNS: usize = 3;
const BULK: u64 = 1 << 30;
const CHUNK: usize = 64 * 1024;
/// The original's bytes sent at once before its history is let catch up (under the
/// reporter's 256 MiB bound).
const PIECE: u64 = 128 << 20;
const CONNS: u64 = 2_000;
const CONCURRENCY: u64 = 32;

/// Reads everything and closes once the client has (a sink); returns the bytes read to
/// nobody.
async fn sink_server() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Answers one line with `PONG\n` and closes.
async fn ping_server() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = [0u8; 5];
                if s.read_exact(&mut buf).await.is_ok() {
                    let _ = s.write_all(b"PONG\n").await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// The original: 1 GiB sent through the proxy to the sink in pieces of `PIECE`, each at
/// full speed, waiting between pieces until the registry has stored the piece's history
/// (a 1 GiB burst outruns the history path, and the proxy would shed what it cannot queue:
/// counted, but then there is nothing whole to replay). Returns bytes/s over the time spent
/// sending, and the record's client port.
async fn original_bulk(
    up: &Up,
    socks: SocketAddr,
    server: SocketAddr,
) -> anyhow::Result<(f64, u16)> {
    let stored = || async { anyhow::Ok(tests::connection_stats(&up.grpc).await?.history_bytes) };
    let base = stored().await?;
    let mut s = socks_connected(socks, server).await?;
    let port = s.local_addr()?.port();
    let chunk = vec![0x5au8; CHUNK];
    let mut sending = Duration::ZERO;
    let mut sent = 0u64;
    while sent < BULK {
        let start = Instant::now();
        for _ in 0..PIECE / CHUNK as u64 {
            s.write_all(&chunk).await?;
        }
        sent += PIECE;
        sending += start.elapsed();
        let want = base + sent;
        tests::eventually("the piece's history stored", || async move {
            Ok((stored().await? >= want).then_some(()))
        })
        .await?;
    }
    let start = Instant::now();
    s.shutdown().await?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await?;
    sending += start.elapsed();
    Ok((BULK as f64 / sending.as_secs_f64(), port))
}

/// `interpose replay ARGS --json`: the finished and summary events.
async fn replay(up: &Up, args: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut all = vec!["replay"];
    all.extend(args);
    all.push("--json");
    // Not the harness's bounded runner: a 1 GiB replay may take longer than its bound.
    let mut cmd = tokio::process::Command::new(tests::bin("interpose"));
    cmd.args(&all)
        .args(["--server", &up.grpc])
        .env_remove("INTERPOSE_TOKEN")
        .env_remove("INTERPOSE_SERVER")
        .kill_on_drop(true);
    if let Some(f) = tests::token_file(&up.grpc) {
        cmd.env("INTERPOSE_TOKEN_FILE", f);
    }
    let out = cmd.output().await?;
    if !out.status.success() {
        bail!("replay failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).context("JSON"))
        .collect()
}

/// The ID of the record whose client port is `port`, once closed.
async fn record_of(up: &Up, port: u16) -> anyhow::Result<u64> {
    let rec = tests::tls::wait_record(up, "the original", |c| {
        c.src_port == u32::from(port) && tests::tls::disconnected(c)
    })
    .await?;
    Ok(rec.id)
}

/// Waits until the registry holds `bytes` client-to-server bytes of `id`'s history (the
/// history is stored behind the record's close).
async fn history_complete(up: &Up, id: u64, bytes: u64) -> anyhow::Result<()> {
    let mut got = 0u64;
    for _ in 0..120 {
        // A fresh connection each time: a failed poll is retried, not fatal.
        let mut client = tests::registry_client(&up.grpc, None).await?;
        got = 0;
        let mut token = String::new();
        loop {
            let page = match client
                .search_history(proto::registry::SearchHistoryRequest {
                    conn_id: id,
                    direction: proto::common::Direction::C2s as i32,
                    page_token: token,
                    ..Default::default()
                })
                .await
            {
                Ok(p) => p.into_inner(),
                Err(e) => {
                    eprintln!("  (history poll of {id}: {e}; retrying)");
                    break;
                }
            };
            got += page
                .packets
                .iter()
                .map(|p| p.data.len() as u64)
                .sum::<u64>();
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        if got == bytes {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    let stats = tests::connection_stats(&up.grpc).await?;
    bail!(
        "the history of {id} never reached {bytes} bytes (last poll: {got}); the registry: \
         {stats:?}"
    )
}

/// The originals' connections per second: `CONCURRENCY` clients, `CONNS` connections.
async fn original_cps(socks: SocketAddr, server: SocketAddr) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < CONNS {
                let mut s = socks_connected(socks, server).await?;
                s.set_nodelay(true)?;
                s.write_all(b"PING\n").await?;
                let mut back = Vec::new();
                s.read_to_end(&mut back).await?;
                ensure!(back == b"PONG\n", "answer {back:?}");
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(CONNS as f64 / start.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let up = Up::start(data.path(), &["--no-web"]).await?;
    let socks = up.proc.addr("socks")?;
    let sink = sink_server().await?;
    let ping = ping_server().await?;

    println!(
        "throughput: {} MiB client side, sink server, {RUNS} runs",
        BULK >> 20
    );
    let (mut orig, mut rep) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let (bps, port) = original_bulk(&up, socks, sink).await?;
        orig.push(bps / f64::from(1 << 20));
        let id = record_of(&up, port).await?;
        history_complete(&up, id, BULK).await?;
        let id = id.to_string();
        let evs = replay(&up, &[&id, "--pace", "burst", "--settle", "10ms"]).await?;
        let f = evs
            .iter()
            .find(|e| e["event"] == "finished")
            .context("finished")?;
        ensure!(f["error"].is_null(), "{f}");
        ensure!(f["bytes_sent"] == BULK, "{f}");
        let secs = f["elapsed_s"].as_f64().context("elapsed")?;
        rep.push(BULK as f64 / secs / f64::from(1 << 20));
    }
    let (o, r) = (median(orig.clone()), median(rep.clone()));
    println!("  original (MiB/s): {orig:.0?}; median {o:.0}");
    println!("  replay --pace burst (MiB/s): {rep:.0?}; median {r:.0}");
    println!("  replay / original: {:.2}", r / o);

    println!(
        "connections/s: {CONNS} connections, {CONCURRENCY} at once, one line and its answer, {RUNS} runs"
    );
    let (mut orig, mut rep) = (Vec::new(), Vec::new());
    // The connection the replays repeat.
    let mut s = socks_connected(socks, ping).await?;
    let port = s.local_addr()?.port();
    s.write_all(b"PING\n").await?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).await?;
    // The server closed its side; closing ours ends the connection.
    drop(s);
    let id = record_of(&up, port).await?.to_string();
    let (times, conc) = (CONNS.to_string(), CONCURRENCY.to_string());
    for _ in 0..RUNS {
        orig.push(original_cps(socks, ping).await?);
        let evs = replay(
            &up,
            &[
                &id,
                "--pace",
                "burst",
                "--settle",
                "10ms",
                "--times",
                &times,
                "--concurrency",
                &conc,
            ],
        )
        .await?;
        let s = evs
            .iter()
            .find(|e| e["event"] == "summary")
            .context("summary")?;
        ensure!(s["completed"] == CONNS && s["identical"] == CONNS, "{s}");
        rep.push(s["runs_per_s"].as_f64().context("runs_per_s")?);
    }
    let (o, r) = (median(orig.clone()), median(rep.clone()));
    println!("  original clients (conn/s): {orig:.0?}; median {o:.0}");
    println!("  replay --times --concurrency (conn/s): {rep:.0?}; median {r:.0}");
    println!("  replay / original: {:.2}", r / o);
    up.proc.kill().await;
    Ok(())
}
