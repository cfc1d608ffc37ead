//! Registry benchmark: ingest rate of small packets through the gRPC ingest stream into
//! sled, and the latency of listing 100,000 records. Run with
//! `cargo run --release -p tests --bin bench-registry`; it starts a release `registry-svc`
//! on loopback and prints medians over several runs.

use std::time::{Duration, Instant};

use proto::{common::Direction, registry::ListConnectionsRequest};
use tests::{Ingest, Registry, events};

use tests::stats::median;

const RUNS: usize = 5;
const PACKETS: u64 = 1_000_000;
const BATCH: u64 = 1_000;
const WINDOW: u64 = 32;
const PAYLOAD: usize = 64;
const RECORDS: u64 = 100_000;

/// Packets per second for one run on a fresh store.
async fn ingest_run() -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let reg = Registry::start(dir.path()).await?;
    let mut client = reg.client().await?;
    let mut ingest = Ingest::open(&mut client, "bench").await?;
    let payload = [0x41u8; PAYLOAD];
    // 100 connections, packets spread over them as a busy proxy would send them.
    ingest
        .send_durable((1..=100).map(|id| events::open(id, 1, "h", 80)).collect())
        .await?;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut last = 0;
    while sent < PACKETS {
        let evs = (sent..sent + BATCH)
            .map(|i| {
                let dir = if i % 2 == 0 {
                    Direction::C2s
                } else {
                    Direction::S2c
                };
                events::packet(i % 100 + 1, i / 100 + 1, dir, &payload)
            })
            .collect();
        last = ingest.send(evs).await?;
        sent += BATCH;
        if last > WINDOW {
            ingest.wait_ack(last - WINDOW).await?;
        }
    }
    ingest.wait_ack(last).await?;
    let secs = start.elapsed().as_secs_f64();
    reg.proc.kill().await;
    Ok(PACKETS as f64 / secs)
}

async fn list_all(
    client: &mut proto::registry::registry_client::RegistryClient<proto::client::AuthChannel>,
) -> anyhow::Result<(Duration, usize)> {
    let start = Instant::now();
    let mut n = 0;
    let mut token = String::new();
    loop {
        let page = client
            .list_connections(ListConnectionsRequest {
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        n += page.connections.len();
        if page.next_page_token.is_empty() {
            return Ok((start.elapsed(), n));
        }
        token = page.next_page_token;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rates = {
        let mut v = Vec::new();
        for _ in 0..RUNS {
            v.push(ingest_run().await?);
        }
        v
    };
    println!(
        "ingest: {PACKETS} packets of {PAYLOAD} B, batches of {BATCH}, {WINDOW} batches in flight"
    );
    println!(
        "  runs (packets/s): {}",
        rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("  median: {:.0} packets/s", median(rates));

    let dir = tempfile::tempdir()?;
    let reg = Registry::start(dir.path()).await?;
    let mut client = reg.client().await?;
    let mut ingest = Ingest::open(&mut client, "bench").await?;
    for chunk in (1..=RECORDS).collect::<Vec<_>>().chunks(1000) {
        ingest
            .send_durable(
                chunk
                    .iter()
                    .map(|&id| events::open(id, 40000, "example.test", 443))
                    .collect(),
            )
            .await?;
    }
    let mut times = Vec::new();
    for _ in 0..RUNS {
        let (t, n) = list_all(&mut client).await?;
        anyhow::ensure!(n == RECORDS as usize, "listed {n} records");
        times.push(t.as_secs_f64() * 1000.0);
    }
    let cli = tests::bin("interpose");
    let mut cli_times = Vec::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        let mut cmd = std::process::Command::new(&cli);
        cmd.args(["conns", "list", "--json", "--server", &reg.url]);
        if let Some(file) = tests::token_file(&reg.url) {
            cmd.env("INTERPOSE_TOKEN_FILE", file);
        }
        let out = cmd.output()?;
        anyhow::ensure!(out.status.success(), "interpose conns list failed");
        cli_times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    println!("list: {RECORDS} records");
    println!(
        "  gRPC ListConnections, all pages (ms): {}; median {:.0} ms",
        times
            .iter()
            .map(|t| format!("{t:.0}"))
            .collect::<Vec<_>>()
            .join(", "),
        median(times.clone())
    );
    println!(
        "  `interpose conns list --json` end to end (ms): {}; median {:.0} ms",
        cli_times
            .iter()
            .map(|t| format!("{t:.0}"))
            .collect::<Vec<_>>()
            .join(", "),
        median(cli_times.clone())
    );
    reg.proc.kill().await;
    Ok(())
}
