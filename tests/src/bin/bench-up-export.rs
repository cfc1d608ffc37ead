//! `interpose up` export benchmark: what the exporter calling the registry in its own
//! process buys over reading it through `up`'s own gRPC port. Two `interpose` binaries, the
//! one before (BEFORE) and the one after (AFTER), serve in turn the same data directory, a
//! history of 256 MiB in 16 connections ingested once through the registry's gRPC API (as a
//! proxy would send it); each round starts each `up`, times `interpose export` of the
//! whole history to a file (synced), reads the CPU time `up` spent on it and its peak RSS,
//! and stops it. Reports the medians and the ratio after/before of the same run.
//!
//! Run with `cargo build --release -p tests --bin bench-up-export -p cli --bin interpose`,
//! then `target/release/bench-up-export BEFORE AFTER`.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, ensure};
use tests::{
    Ingest, Proc,
    stats::{cpu_secs, median, peak_rss_mib},
};

const ROUNDS: usize = 7;
const CONNECTIONS: u64 = 16;
/// Payload per connection: 16 MiB, so 16 connections hold 256 MiB.
const PER_CONNECTION: usize = 16 << 20;
const PACKET: usize = 16 << 10;

/// `interpose up` from `binary` on free loopback ports over `data`, without the web view.
async fn up(binary: &Path, data: &Path, log: PathBuf) -> anyhow::Result<(Proc, String)> {
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args([
        "up",
        "--socks",
        "127.0.0.1:0",
        "--grpc",
        "127.0.0.1:0",
        "--no-web",
        "--data-dir",
    ])
    .arg(data)
    .env_remove("INTERPOSE_TOKEN")
    .env("RUST_LOG", "warn");
    let proc = Proc::start(cmd, log).await?;
    let grpc = proc.field("grpc").context("grpc= in the ready line")?;
    tests::set_token_file(&grpc, proc.field("token").map(PathBuf::from));
    Ok((proc, grpc))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [before, after] = &args[..] else {
        anyhow::bail!("usage: bench-up-export BEFORE AFTER (two interpose binaries)");
    };
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");

    let (proc, url) = up(after, &data, dir.path().join("ingest.log")).await?;
    let t = Instant::now();
    let mut client = tests::registry_client(&url, None).await?;
    let mut ingest = Ingest::open(&mut client, "bench").await?;
    ingest
        .send_history(1, CONNECTIONS, PER_CONNECTION, PACKET)
        .await?;
    let total = CONNECTIONS * PER_CONNECTION as u64;
    println!(
        "ingested {} MiB in {CONNECTIONS} connections ({} KiB packets) in {:.1} s",
        total >> 20,
        PACKET >> 10,
        t.elapsed().as_secs_f64()
    );
    drop((ingest, client));
    ensure!(
        proc.terminate().await?,
        "interpose up (ingest) failed to stop"
    );

    let mut secs = [Vec::new(), Vec::new()];
    let mut cpu = [Vec::new(), Vec::new()];
    let mut rss = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        // Alternate which goes first, so neither always finds the page cache warmer.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let binary = [before, after][which];
            let log = dir.path().join(format!("up-{round}-{which}.log"));
            let (proc, url) = up(binary, &data, log).await?;
            let pid = proc.pid().context("up pid")?;
            let file = dir.path().join("export.pcap");
            let cpu_before = cpu_secs(pid).context("up's CPU time")?;
            // The client is the same for both: only the server differs.
            let (s, _) = tests::timed_export(after, &url, &file).await?;
            let used = cpu_secs(pid).context("up's CPU time")? - cpu_before;
            let size = std::fs::metadata(&file)?.len();
            std::fs::remove_file(&file)?;
            let peak = peak_rss_mib(pid)?;
            ensure!(proc.terminate().await?, "interpose up failed to stop");
            println!(
                "round {round} {}: export {s:.2} s ({} MiB file), up CPU {used:.2} s, up peak \
                 RSS {peak:.0} MiB",
                ["before", "after"][which],
                size >> 20
            );
            secs[which].push(s);
            cpu[which].push(used);
            rss[which].push(peak);
        }
    }
    let [sb, sa] = secs.map(median);
    let [cb, ca] = cpu.map(median);
    let [rb, ra] = rss.map(median);
    let mib = total as f64 / f64::from(1 << 20);
    println!(
        "median export of {mib:.0} MiB through up: before {sb:.2} s ({:.0} MiB/s), after \
         {sa:.2} s ({:.0} MiB/s): time after/before {:.2}",
        mib / sb,
        mib / sa,
        sa / sb
    );
    println!(
        "median up CPU per export: before {cb:.2} s, after {ca:.2} s: after/before {:.2}",
        ca / cb
    );
    println!("median up peak RSS: before {rb:.0} MiB, after {ra:.0} MiB");
    Ok(())
}
