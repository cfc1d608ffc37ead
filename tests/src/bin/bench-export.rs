//! Export benchmark: a history of 1 GiB (ingested through the registry's gRPC API, as a
//! proxy would send it) exported as PCAP by a separate release `export-svc` process through
//! `interpose export`, against copying the same payload bytes to a file in the same run.
//! Reports the throughput ratio (target >= 0.3x) and export-svc's peak RSS (target
//! <= 64 MiB). Run with `cargo run --release -p tests --bin bench-export`.

use std::{
    io::Write,
    time::{Duration, Instant},
};

use anyhow::Context;
use tests::{
    Ingest, Proc, Registry, bin,
    stats::{median, peak_rss_mib},
};

const RUNS: usize = 3;
const CONNECTIONS: u64 = 64;
/// Payload per connection: 16 MiB, so 64 connections hold 1 GiB.
const PER_CONNECTION: usize = 16 << 20;
const PACKET: usize = 16 << 10;

fn total_bytes() -> u64 {
    CONNECTIONS * PER_CONNECTION as u64
}

/// Ingests every connection: alternating 16 KiB packets each way, then a FIN close.
async fn ingest(reg: &Registry) -> anyhow::Result<()> {
    let mut client = reg.client().await?;
    let mut ingest = Ingest::open(&mut client, "bench").await?;
    if let Err(e) = ingest
        .send_history(1, CONNECTIONS, PER_CONNECTION, PACKET)
        .await
    {
        let why = ingest.next_error().await.map(|s| s.to_string());
        return Err(e.context(format!("the registry ended the ingest stream: {why:?}")));
    }
    Ok(())
}

/// Seconds to write the payload bytes to a file (the baseline).
fn copy_run(path: &std::path::Path) -> anyhow::Result<f64> {
    let payload = tests::proxy::payload(PACKET, 7);
    let start = Instant::now();
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    for _ in 0..total_bytes() / PACKET as u64 {
        f.write_all(&payload)?;
    }
    f.into_inner()?.sync_all()?;
    Ok(start.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let reg = Registry::start(&dir.path().join("registry")).await?;
    let t = Instant::now();
    ingest(&reg).await?;
    println!(
        "ingested {} MiB in {} connections ({} KiB packets) in {:.1} s",
        total_bytes() >> 20,
        CONNECTIONS,
        PACKET >> 10,
        t.elapsed().as_secs_f64()
    );
    let mut cmd = tokio::process::Command::new(bin("export-svc"));
    cmd.args(["--listen", "127.0.0.1:0", "--registry", &reg.url])
        .env_remove("INTERPOSE_TOKEN");
    // export-svc reads the registry with its token and wants the same from its clients.
    if let Some(token) = tests::token(&reg.url) {
        cmd.args(["--token", &token]);
    }
    let export = Proc::start(cmd, dir.path().join("export.log")).await?;
    let url = format!("http://{}", export.field("listen").context("listen=")?);
    tests::set_token_file(&url, tests::token_file(&reg.url));
    let pid = export.pid().context("export-svc pid")?;

    let (mut copies, mut exports) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        let copy = dir.path().join("copy.bin");
        copies.push(copy_run(&copy)?);
        std::fs::remove_file(&copy)?;
        let file = dir.path().join("export.pcap");
        let (secs, said) = tests::timed_export(&bin("interpose"), &url, &file).await?;
        eprintln!("  {said}");
        exports.push(secs);
        let size = std::fs::metadata(&file)?.len();
        std::fs::remove_file(&file)?;
        println!(
            "run {run}: copy {:.2} s, export {:.2} s ({} MiB file)",
            copies[run],
            exports[run],
            size >> 20
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let gib = total_bytes() as f64 / f64::from(1 << 30);
    let (copy, exp) = (median(copies), median(exports));
    println!(
        "median: copy {:.0} MiB/s, export {:.0} MiB/s of payload: ratio {:.2}x (target >= 0.3x)",
        gib * 1024.0 / copy,
        gib * 1024.0 / exp,
        copy / exp
    );
    println!(
        "export-svc peak RSS {:.1} MiB (target <= 64 MiB)",
        peak_rss_mib(pid)?
    );
    export.kill().await;
    reg.proc.kill().await;
    Ok(())
}
